//! The one harness of the end-to-end tests, the fault suite and the
//! benchmark: the local stack started by `scripts/stack.sh`, a [`broker`]
//! (tansu or the mock cluster), a [`pipeline`] (topic, service, sink, what
//! was produced and what the sink holds), the services' command lines
//! ([`service`]), their /metrics ([`metrics`]), and [`poll_until`].
//!
//! Every test talks to real components on loopback. The stack's addresses
//! come from the environment (`eval "$(scripts/stack.sh up)"`, which `make
//! test` does) or, failing that, from `.stack/env` at the workspace root.

pub mod bigquery;
pub mod broker;
pub mod fake_google;
pub mod generator;
pub mod grpc_proxy;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod process;
pub mod read_api;
pub mod redis;
pub mod redis_cluster;
pub mod redis_model;
pub mod secured_kafka;
pub mod service;
pub mod tcp_front;
pub mod tls;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Partitions of every topic the tests create (as in production).
pub const PARTITIONS: i32 = 3;

/// Addresses of the running stack.
#[derive(Debug, Clone)]
pub struct Stack {
    /// `host:port` of the Kafka-protocol broker (tansu).
    pub kafka: String,
    /// `redis://host:port` of redis-server.
    pub redis_url: String,
    /// The seed nodes of the stack's Redis Cluster, comma-separated
    /// (`STACK_REDIS=both` or `cluster`).
    pub redis_cluster_url: Option<String>,
    /// Base URL of the BigQuery REST emulator.
    pub bigquery_endpoint: String,
    /// URL of the emulator's Storage Write API (gRPC).
    pub bigquery_grpc_endpoint: String,
    /// BigQuery project of the emulator.
    pub bigquery_project: String,
    /// Dataset created by the stack script.
    pub bigquery_dataset: String,
    /// The stack's run directory.
    pub dir: PathBuf,
}

impl Stack {
    /// The running stack, or an error saying how to start it.
    pub fn get() -> anyhow::Result<Self> {
        let file = workspace_root().join(".stack/env");
        let mut vars: HashMap<String, String> = std::fs::read_to_string(&file)
            .map(|text| parse_env_file(&text))
            .unwrap_or_default();
        for key in [
            "KAFKA_BOOTSTRAP_SERVERS",
            "REDIS_URL",
            "REDIS_CLUSTER_URL",
            "BIGQUERY_ENDPOINT",
            "BIGQUERY_GRPC_ENDPOINT",
            "BIGQUERY_PROJECT",
            "BIGQUERY_DATASET",
            "STACK_DIR",
        ] {
            if let Ok(value) = std::env::var(key) {
                vars.insert(key.to_owned(), value);
            }
        }
        let get = |key: &str| -> anyhow::Result<String> {
            match vars.get(key) {
                Some(value) if !value.is_empty() => Ok(value.clone()),
                _ => bail!(
                    "{key} is not set and {} has no value for it: start the local stack with \
                     `scripts/stack.sh up` (or run the tests with `make test`)",
                    file.display()
                ),
            }
        };
        Ok(Self {
            kafka: get("KAFKA_BOOTSTRAP_SERVERS")?,
            redis_url: get("REDIS_URL")?,
            redis_cluster_url: get("REDIS_CLUSTER_URL").ok(),
            bigquery_endpoint: get("BIGQUERY_ENDPOINT")?,
            bigquery_grpc_endpoint: get("BIGQUERY_GRPC_ENDPOINT")?,
            bigquery_project: get("BIGQUERY_PROJECT")?,
            bigquery_dataset: get("BIGQUERY_DATASET")?,
            dir: PathBuf::from(get("STACK_DIR")?),
        })
    }
}

impl Stack {
    /// The seed nodes of the stack's Redis Cluster, or an error saying how
    /// to start one.
    pub fn redis_cluster_url(&self) -> anyhow::Result<&str> {
        self.redis_cluster_url.as_deref().context(
            "the stack has no Redis Cluster: start it with `STACK_REDIS=both scripts/stack.sh up` \
             (`make test` does)",
        )
    }
}

/// The `export KEY=value` lines stack.sh writes (values quoted by
/// `printf %q`: a backslash escapes the next character).
fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("export ").or(Some(line.trim())))
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| {
            let mut value = String::new();
            let mut chars = v.trim().trim_matches(['"', '\'']).chars();
            while let Some(c) = chars.next() {
                value.extend(if c == '\\' { chars.next() } else { Some(c) });
            }
            (k.trim().to_owned(), value)
        })
        .collect()
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// A name no other test (or earlier run) uses: topics and groups per test.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// A loopback port free right now (for a service's --metrics-addr).
pub fn free_port() -> anyhow::Result<u16> {
    let [port] = free_ports()?;
    Ok(port)
}

/// `N` different loopback ports free right now. (Taken one after the other,
/// a port freed by the first could come back as the second.)
pub fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// Whether the service serving metrics on `port` answers /readyz with 200
/// (false while it is not listening).
pub async fn ready(port: u16) -> anyhow::Result<bool> {
    match reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await {
        Ok(response) => Ok(response.status().is_success()),
        Err(_) => Ok(false),
    }
}

/// What one look of [`poll_until`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check<T> {
    /// What was awaited, with its value.
    Done(T),
    /// Not yet; what the look saw instead (for the message on timing out,
    /// may be empty).
    NotYet(String),
}

impl Check<()> {
    /// Done if `holds`, else not yet, having seen what `seen` says.
    pub fn done_if(holds: bool, seen: impl FnOnce() -> String) -> Self {
        if holds {
            Self::Done(())
        } else {
            Self::NotYet(seen())
        }
    }
}

impl<T> From<Option<T>> for Check<T> {
    fn from(value: Option<T>) -> Self {
        value.map_or_else(|| Self::NotYet(String::new()), Self::Done)
    }
}

/// Looks with `look` every `every` until it finds what it waits for, and
/// returns that; fails with `what` (and what the last look saw) if that
/// does not happen within `timeout`, or with the look's own error.
pub async fn poll_until<T, F, Fut>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut look: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Check<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let seen = match look()
            .await
            .with_context(|| format!("while waiting for {what}"))?
        {
            Check::Done(value) => return Ok(value),
            Check::NotYet(seen) => seen,
        };
        if Instant::now() >= deadline {
            let seen = if seen.is_empty() {
                seen
            } else {
                format!(" ({seen})")
            };
            bail!("timed out after {timeout:?} waiting for {what}{seen}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Awaits a condition, checking it every 20 ms, and fails with `what` if it
/// does not hold within `timeout`.
pub async fn wait_for<F>(timeout: Duration, what: &str, mut condition: F) -> anyhow::Result<()>
where
    F: FnMut() -> bool,
{
    poll_until(timeout, Duration::from_millis(20), what, || {
        std::future::ready(Ok(condition().then_some(()).into()))
    })
    .await
}

/// Same as [`wait_for`] with an async condition, checked every 50 ms.
pub async fn wait_for_async<F, Fut>(
    timeout: Duration,
    what: &str,
    mut condition: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    poll_until(timeout, Duration::from_millis(50), what, || {
        let holds = condition();
        async move { Ok(holds.await?.then_some(()).into()) }
    })
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_stack_env_file_is_read_as_the_shell_reads_it() {
        let vars = super::parse_env_file(
            "export REDIS_URL=redis://127.0.0.1:1\nexport REDIS_CLUSTER_URL=redis://a:1\\,redis://b:2\n",
        );
        assert_eq!(vars["REDIS_URL"], "redis://127.0.0.1:1");
        assert_eq!(vars["REDIS_CLUSTER_URL"], "redis://a:1,redis://b:2");
    }
}

//! redis-sink's sink in the harness ([`RedisSide`]), and reading its state
//! in Redis: connections, and the offsets it stores beside the data
//! (docs/redis-keys.md).
//!
//! (Inside this crate `redis::` still names the redis crate: this module is
//! `crate::redis`, in scope only where it is imported.)

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use futures::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis_sink::access::RedisAccess;
pub use redis_sink::client::RedisConn;

use redis_sink::decode::Kind;
use redis_sink::keys::Keys;

use crate::generator::{Generated, Mix, Truth};
use crate::pipeline::{Coordinates, Item, SinkSide, Tally};
use crate::redis_model;
use crate::service::ServiceFlags;

/// A connection to the Redis at `url` (a standalone server, or a cluster
/// given by one or more of its nodes, comma-separated).
pub async fn connect(url: &str) -> anyhow::Result<RedisConn> {
    connect_with(&RedisAccess::url(url)).await
}

/// A connection to the Redis `access` describes (TLS and password files
/// as redis-sink reads them), standalone or cluster as redis-sink finds it.
pub async fn connect_with(access: &RedisAccess) -> anyhow::Result<RedisConn> {
    redis_sink::client::open(access).await
}

/// A connection to the one server `access` leads to (a cluster node
/// itself, not the cluster).
pub async fn connect_to_node(access: &RedisAccess) -> anyhow::Result<MultiplexedConnection> {
    Ok(access.client()?.get_multiplexed_async_connection().await?)
}

/// Every key matching `pattern`: SCAN on a standalone server, on every
/// primary of a cluster.
pub async fn scan_keys(conn: &mut RedisConn, pattern: &str) -> anyhow::Result<Vec<String>> {
    let nodes: Vec<Option<(String, u16)>> = match conn {
        RedisConn::Standalone(_) => vec![None],
        RedisConn::Cluster(_) => primaries(conn)
            .await?
            .into_iter()
            .map(|(host, port)| Some((host, port)))
            .collect(),
    };
    let mut keys = Vec::new();
    for node in nodes {
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, batch): (u64, Vec<String>) = match (&node, &mut *conn) {
                (Some((host, port)), RedisConn::Cluster(cluster)) => redis::from_redis_value(
                    cluster
                        .route_command(
                            scan,
                            RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                                host: host.clone(),
                                port: *port,
                            }),
                        )
                        .await
                        .context("SCAN")?,
                )?,
                _ => scan.query_async(conn).await.context("SCAN")?,
            };
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
    Ok(keys)
}

/// Waits until the server behind `conn` shows `line` in `INFO replication`
/// (`role:master`, `master_link_status:up`).
pub async fn wait_for_replication(
    conn: &MultiplexedConnection,
    line: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    crate::wait_for_async(timeout, &format!("INFO replication to show {line}"), || {
        let mut conn = conn.clone();
        async move {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await?;
            Ok(info.lines().any(|l| l.trim() == line))
        }
    })
    .await
}

/// How many times the server behind `conn` has run `command` (lowercase,
/// as `INFO commandstats` names it), scripts' calls included.
pub async fn command_calls(conn: &mut MultiplexedConnection, command: &str) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

/// The (host, port) of each primary of the cluster, from `CLUSTER NODES`.
pub async fn primaries(conn: &mut RedisConn) -> anyhow::Result<Vec<(String, u16)>> {
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(conn)
        .await
        .context("CLUSTER NODES")?;
    nodes
        .lines()
        // <id> <host:port@bus> <flags> ...
        .filter(|line| {
            let flags = line.split(' ').nth(2).unwrap_or_default();
            flags.split(',').any(|f| f == "master") && !flags.contains("fail")
        })
        .map(|line| {
            let addr = line.split(' ').nth(1).unwrap_or_default();
            let addr = addr.split('@').next().unwrap_or_default();
            let (host, port) = addr
                .rsplit_once(':')
                .with_context(|| format!("CLUSTER NODES line without host:port: {line}"))?;
            Ok((host.to_owned(), port.parse()?))
        })
        .collect()
}

/// The command-line flags that give a redis-sink command `access`.
pub fn access_flags(access: &RedisAccess) -> Vec<(&'static str, String)> {
    let files = [
        ("--redis-password-file", &access.redis_password_file),
        ("--redis-ca-file", &access.redis_ca_file),
        ("--redis-cert-file", &access.redis_cert_file),
        ("--redis-key-file", &access.redis_key_file),
    ];
    std::iter::once(("--redis-url", access.redis_url.clone()))
        .chain(
            files
                .into_iter()
                .filter_map(|(flag, file)| file.as_ref().map(|f| (flag, f.display().to_string()))),
        )
        .collect()
}

/// The HASH (partition → next offset to apply) in which redis-sink keeps
/// `topic`'s offsets under `prefix`.
pub fn offsets_key(prefix: &str, topic: &str) -> String {
    redis_sink::keys::Keys::new(prefix).offsets(topic)
}

/// The next offset per partition `0..partitions` stored in the offsets
/// HASH `key` (0 where none is stored).
pub async fn stored_offsets(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    key: &str,
    partitions: i32,
) -> anyhow::Result<Vec<i64>> {
    let stored: BTreeMap<i32, i64> = redis::cmd("HGETALL").arg(key).query_async(conn).await?;
    Ok((0..partitions)
        .map(|p| stored.get(&p).copied().unwrap_or(0))
        .collect())
}

/// The next offset per partition redis-sink has applied of `topic` under
/// `prefix` (0 where none).
pub async fn applied_offsets(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    prefix: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<Vec<i64>> {
    stored_offsets(conn, &offsets_key(prefix, topic), partitions).await
}

/// redis-sink's side of a [`Pipeline`](crate::pipeline::Pipeline): a Redis
/// and a fresh key prefix that isolates the pipeline's keys. Cheap to
/// clone: a test keeps a clone to look at Redis itself.
#[derive(Clone)]
pub struct RedisSide {
    /// How redis-sink (and the test) reach that Redis.
    pub access: RedisAccess,
    /// `--key-prefix`.
    pub prefix: String,
}

/// `--history-size` of redis-sink (its default).
pub const HISTORY_SIZE: usize = 50;

impl RedisSide {
    /// The Redis at `url`, under a fresh key prefix. Connects only when
    /// asked: a test may start the service before that Redis serves.
    pub async fn new(url: &str) -> anyhow::Result<Self> {
        Self::with_access(RedisAccess::url(url)).await
    }

    /// The Redis `access` leads to, under a fresh key prefix.
    pub async fn with_access(access: RedisAccess) -> anyhow::Result<Self> {
        Ok(Self {
            access,
            prefix: format!("{}:", crate::unique("user3")),
        })
    }

    /// The stack's redis-server.
    pub async fn on_stack(stack: &crate::Stack) -> anyhow::Result<Self> {
        Self::new(&stack.redis_url).await
    }

    /// The stack's Redis Cluster.
    pub async fn on_stack_cluster(stack: &crate::Stack) -> anyhow::Result<Self> {
        Self::new(stack.redis_cluster_url()?).await
    }

    /// A new connection.
    pub async fn connect(&self) -> anyhow::Result<RedisConn> {
        connect_with(&self.access).await
    }

    /// Every key of the contract under the prefix, with its members.
    pub async fn dump(&self) -> anyhow::Result<redis_model::State> {
        redis_model::dump(&mut self.connect().await?, &self.prefix).await
    }

    /// What the contract says Redis holds after `truths` (default
    /// `--history-size`).
    pub fn expected<'a>(&self, truths: impl IntoIterator<Item = &'a Truth>) -> redis_model::State {
        redis_model::expected(&self.prefix, truths, HISTORY_SIZE)
    }

    /// Fails with the difference unless Redis holds what `truths` make.
    pub async fn assert_matches<'a>(
        &self,
        truths: impl IntoIterator<Item = &'a Truth>,
    ) -> anyhow::Result<redis_model::State> {
        let want = self.expected(truths);
        let got = self.dump().await?;
        anyhow::ensure!(
            want == got,
            "Redis state differs from the model: {}",
            redis_model::diff(&want, &got)
        );
        Ok(got)
    }

    /// The offsets redis-sink stores for `topic`.
    pub async fn applied(&self, topic: &str) -> anyhow::Result<Vec<i64>> {
        applied_offsets(
            &mut self.connect().await?,
            &self.prefix,
            topic,
            crate::PARTITIONS,
        )
        .await
    }
}

impl SinkSide for RedisSide {
    fn binary(&self) -> &'static str {
        "redis-sink"
    }

    fn mix(&self) -> Mix {
        Mix::User3
    }

    fn flags(&self, bootstrap: &str, topic: &str, group: &str) -> ServiceFlags {
        ServiceFlags::redis_sink(bootstrap, topic, group, &self.access, &self.prefix)
    }

    fn keeps(&self, event: &Generated) -> bool {
        event.valid && event.truth.is_some()
    }

    fn stored_offsets<'a>(
        &'a self,
        topic: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Option<Vec<i64>>>> {
        Box::pin(async move { Ok(Some(self.applied(topic).await?)) })
    }

    /// Each valid event adds exactly 1 to one `{rank}:*:total` member, so the
    /// totals are compared member by member with the model (short = lost,
    /// over = double-counted), and every key of the contract must equal the
    /// model.
    fn tally<'a>(
        &'a self,
        _topic: &'a str,
        produced: &'a BTreeMap<Coordinates, Item>,
        tally: &'a mut Tally,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let want = self.expected(produced.values().filter_map(|i| i.truth.as_ref()));
            let got = self.dump().await?;
            for kind in [Kind::Search, Kind::Movie] {
                let key = Keys::new(&self.prefix).total(kind);
                let empty = BTreeMap::new();
                let (want_total, got_total) = (
                    want.get(&key).unwrap_or(&empty),
                    got.get(&key).unwrap_or(&empty),
                );
                let members: BTreeSet<&String> =
                    want_total.keys().chain(got_total.keys()).collect();
                for member in members {
                    let w = want_total.get(member).copied().unwrap_or(0);
                    let g = got_total.get(member).copied().unwrap_or(0);
                    tally.in_sink += usize::try_from(g).unwrap_or(0);
                    tally.lost += usize::try_from(w - g).unwrap_or(0);
                    tally.double_counted += usize::try_from(g - w).unwrap_or(0);
                }
            }
            if want != got {
                tally.problems.push(format!(
                    "Redis state differs from the model: {}",
                    redis_model::diff(&want, &got)
                ));
            }
            Ok(())
        })
    }
}

/// A redis-sink pipeline on `broker` writing to the Redis at `url` under a
/// fresh prefix; a clone of its Redis side, for the test to look at Redis
/// itself; and a time (ms) before any key under that prefix was written.
pub async fn pipeline(
    stack: &crate::Stack,
    broker: crate::broker::Broker,
    url: &str,
) -> anyhow::Result<(crate::pipeline::Pipeline, RedisSide, i64)> {
    let since = chrono::Utc::now().timestamp_millis();
    let redis = RedisSide::new(url).await?;
    let p = crate::pipeline::Pipeline::new(stack, broker, Box::new(redis.clone())).await?;
    Ok((p, redis, since))
}

/// Which of the stack's Redis deployments a test runs against.
#[derive(Debug, Clone, Copy)]
pub enum Topology {
    /// One redis-server.
    Standalone,
    /// A Redis Cluster of 3 primaries, each with a replica.
    Cluster,
}

impl Topology {
    /// The seed URL(s) of that Redis on `stack`.
    pub fn url(self, stack: &crate::Stack) -> anyhow::Result<&str> {
        match self {
            Self::Standalone => Ok(&stack.redis_url),
            Self::Cluster => stack.redis_cluster_url(),
        }
    }
}

/// Runs the scenario `$name(topology)` as two tests, `$name::standalone`
/// and `$name::cluster`: every promise holds on both. The test file
/// imports [`Topology`](crate::redis::Topology).
#[macro_export]
macro_rules! on_both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn standalone() -> anyhow::Result<()> {
                super::$name(super::Topology::Standalone).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cluster() -> anyhow::Result<()> {
                super::$name(super::Topology::Cluster).await
            }
        }
    };
}

/// A pipeline on the stack's tansu and its `topology` Redis, as
/// [`pipeline`] makes it.
pub async fn on_stack(
    topology: Topology,
) -> anyhow::Result<(crate::pipeline::Pipeline, RedisSide, i64)> {
    let stack = crate::Stack::get()?;
    pipeline(
        &stack,
        crate::broker::Broker::tansu(&stack),
        topology.url(&stack)?,
    )
    .await
}

/// Waits until `instance` has applied everything produced: the offsets
/// stored in Redis are then exactly the produced ends, no further.
pub async fn caught_up(
    p: &crate::pipeline::Pipeline,
    instance: &crate::pipeline::Instance,
) -> anyhow::Result<()> {
    p.wait_caught_up(instance).await?;
    assert_eq!(
        p.applied().await?,
        p.produced_ends(),
        "stored offsets = produced per partition"
    );
    Ok(())
}

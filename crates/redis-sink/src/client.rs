//! The connection to Redis: a standalone primary or a Redis Cluster, found
//! out from the server itself, checked at start (it must keep our
//! guarantees), then followed through failovers.
//!
//! Managed Redis (ElastiCache, Memorystore, Azure, Sentinel behind a DNS
//! name) fails over by promoting a replica and moving the address to it. A
//! connection opened before keeps talking to the old primary, now a replica
//! answering `READONLY`, or to a node answering `LOADING` / `MASTERDOWN`.
//! redis-rs's [`ConnectionManager`] only reconnects on I/O errors, so
//! without [`Primary::follow`] every retry would go to the same replica
//! forever. A cluster connection follows failovers and resharding itself
//! (`MOVED` / `ASK` redirect it and refresh its slot map).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};
use sink_core::SinkError;

use crate::access::RedisAccess;
use crate::error::tls_refusal;

/// Error kinds (see `error::classify`) that mean the server behind the
/// connection is not a writable primary (any more, or yet): the next
/// attempt goes over a new connection, which resolves the address again.
pub const NOT_PRIMARY: &[&str] = &["redis_read_only", "redis_loading", "redis_master_down"];

/// A connection to a standalone primary or to a cluster: the sink sends the
/// same commands over both, and a handle is cheap to clone.
#[derive(Clone)]
pub enum RedisConn {
    /// One server (a primary, or whatever a failover put behind its address).
    Standalone(ConnectionManager),
    /// A Redis Cluster: each command goes to the node owning its key's slot.
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Whether this is a cluster connection (commands of one pipeline must
    /// then share a hash slot).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Standalone(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// How to open the connection again (one per process: its size is no matter).
#[allow(clippy::large_enum_variant)]
enum Reopen {
    /// A standalone primary: the URL may lead elsewhere after a failover.
    Standalone(redis::Client, ConnectionManagerConfig),
    /// A cluster: its connection follows failovers and moved slots itself,
    /// but after a failover under load redis-rs 1.8's connection was seen
    /// to stop answering for good (every request timing out after a slot
    /// refresh began); a new one from the seeds recovers.
    /// With the client of the history pipelines
    /// ([`RedisAccess::pipeline_cluster_client`]).
    Cluster(redis::cluster::ClusterClient, redis::cluster::ClusterClient),
}

/// A connection to whatever the URL leads to now.
pub struct Primary {
    reopen: Reopen,
    /// The connection in use and its generation (bumped on each reconnect).
    current: Mutex<(u64, Connections)>,
    /// One reconnect at a time: batches in flight fail together.
    reconnecting: tokio::sync::Mutex<()>,
    reconnects: AtomicU64,
}

/// What [`Primary`] holds: the connection, and on a cluster the one for
/// history pipelines.
#[derive(Clone)]
struct Connections {
    inner: RedisConn,
    pipelines: Option<ClusterConnection>,
}

/// A connection handed out by [`Primary::get`], with its generation.
#[derive(Clone)]
pub struct Conn {
    generation: u64,
    /// The connection itself (cheap to clone: a handle).
    pub inner: RedisConn,
    /// On a cluster, the connection for one pipeline per primary, which
    /// redis-rs does not retry (see [`RedisAccess::pipeline_cluster_client`]).
    pub pipelines: Option<ClusterConnection>,
}

impl Primary {
    /// Wraps an open connection to a standalone server made from `client`
    /// with `config`.
    pub fn new(
        client: redis::Client,
        config: ConnectionManagerConfig,
        conn: ConnectionManager,
    ) -> Self {
        Self::over(
            Reopen::Standalone(client, config),
            Connections {
                inner: RedisConn::Standalone(conn),
                pipelines: None,
            },
        )
    }

    fn over(reopen: Reopen, conns: Connections) -> Self {
        Self {
            reopen,
            current: Mutex::new((0, conns)),
            reconnecting: tokio::sync::Mutex::new(()),
            reconnects: AtomicU64::new(0),
        }
    }

    /// The connection to use now.
    pub fn get(&self) -> Conn {
        let current = self.lock();
        Conn {
            generation: current.0,
            inner: current.1.inner.clone(),
            pipelines: current.1.pipelines.clone(),
        }
    }

    /// Passes `result` through; when its error says the server `used` talks
    /// to is not a writable primary, first replaces that connection (once,
    /// however many writes failed on it), so the retry reaches the new one.
    pub async fn follow<T>(
        &self,
        used: &Conn,
        result: Result<T, SinkError>,
    ) -> Result<T, SinkError> {
        if let Err(err) = &result {
            let reopen = match self.reopen {
                Reopen::Standalone(..) => NOT_PRIMARY,
                Reopen::Cluster(..) => crate::error::CLUSTER_STUCK,
            };
            if reopen.contains(&err.kind()) {
                self.reconnect(used.generation, err.kind()).await;
            }
        }
        result
    }

    async fn reconnect(&self, failed: u64, why: &str) {
        let _one_at_a_time = self.reconnecting.lock().await;
        if self.lock().0 != failed {
            return; // another write already replaced it
        }
        let opened = match &self.reopen {
            Reopen::Standalone(client, config) => {
                ConnectionManager::new_with_config(client.clone(), config.clone())
                    .await
                    .map(|conn| Connections {
                        inner: RedisConn::Standalone(conn),
                        pipelines: None,
                    })
            }
            Reopen::Cluster(client, pipelines) => open_cluster(client, pipelines).await,
        };
        match opened {
            Ok(conn) => {
                let mut current = self.lock();
                *current = (failed + 1, conn);
                let reconnects = self.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    reply = why,
                    reconnects,
                    "reconnected to Redis after a failover reply (or, on a cluster, a failed \
                     write): the next attempt goes wherever the addresses lead now"
                );
            }
            // The retry fails again and comes back here.
            Err(err) => tracing::warn!(%err, "cannot reconnect to Redis after a failover reply"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Connections)> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Both cluster connections (see [`Reopen::Cluster`]).
async fn open_cluster(
    client: &redis::cluster::ClusterClient,
    pipelines: &redis::cluster::ClusterClient,
) -> redis::RedisResult<Connections> {
    Ok(Connections {
        inner: RedisConn::Cluster(client.get_async_connection().await?),
        pipelines: Some(pipelines.get_async_connection().await?),
    })
}

/// How long a connection attempt and a reply may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens a connection that reconnects by itself, waiting (with backoff) for
/// Redis to come up, and checks the server can keep our guarantees. The
/// first seed node that answers says whether Redis is a cluster; then a
/// cluster connection is made from all of them. Bad URLs or files, replicas
/// and too old servers fail at once.
pub async fn connect(access: &RedisAccess) -> anyhow::Result<Primary> {
    let seeds = access.clients()?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECTION_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(1);
    let (client, mut conn) = first_answering(&seeds, &config).await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .arg("cluster")
        .arg("replication")
        .query_async(&mut conn)
        .await
        .context("INFO")?;
    check_server(&info)?;
    let primary = if info.lines().any(|l| l.trim() == "cluster_enabled:1") {
        let (cluster_client, pipeline_client) =
            (access.cluster_client()?, access.pipeline_cluster_client()?);
        let seed = client.get_connection_info().addr().to_string();
        let conns = cluster_serving(&cluster_client, &pipeline_client, &seed).await?;
        tracing::info!("Redis is a cluster: histories go to the nodes owning their slots");
        Primary::over(Reopen::Cluster(cluster_client, pipeline_client), conns)
    } else {
        if access.urls().count() > 1 {
            bail!(
                "--redis-url (REDIS_URL) lists several URLs, which are for a Redis Cluster's \
                 seed nodes, but {} is a standalone Redis: give only its URL",
                client.get_connection_info().addr()
            );
        }
        Primary::new(client, config, conn)
    };
    let mut conn = primary.get().inner;
    for (node, info) in info_memory(&mut conn).await? {
        check_eviction_policy(&info).map_err(|refusal| {
            anyhow::anyhow!(
                "{refusal} (node {node}). Set maxmemory-policy to noeviction in the managed \
                 service's parameter group or configuration (ElastiCache, Memorystore and Azure \
                 default to volatile-lru), or with `CONFIG SET maxmemory-policy noeviction` and \
                 in redis.conf, then restart"
            )
        })?;
    }
    // History deadlines are computed from this host's clock (see
    // sink::HistoryCommands): it has to agree with Redis's.
    let (secs, micros): (i64, i64) = redis::cmd("TIME")
        .query_async(&mut conn)
        .await
        .context("TIME")?;
    check_clock(
        secs.saturating_mul(1000).saturating_add(micros / 1000),
        chrono::Utc::now().timestamp_millis(),
    )?;
    Ok(primary)
}

/// A connection to Redis as `access` describes it, standalone or cluster as
/// the first answering node says, without the checks of [`connect`] and
/// without waiting: for readers and tools.
pub async fn open(access: &RedisAccess) -> anyhow::Result<RedisConn> {
    open_with(access, || access.cluster_client()).await
}

/// As [`open`], for the read API: on a cluster, with the reader's short
/// timeouts, and reading from replicas when `from_replicas` (a standalone
/// reader reads a replica by its URL).
pub async fn open_for_reads(
    access: &RedisAccess,
    from_replicas: bool,
) -> anyhow::Result<RedisConn> {
    open_with(access, || access.reader_cluster_client(from_replicas)).await
}

async fn open_with(
    access: &RedisAccess,
    cluster_client: impl FnOnce() -> anyhow::Result<redis::cluster::ClusterClient>,
) -> anyhow::Result<RedisConn> {
    let mut last = None;
    for client in access.clients()? {
        let url = client.get_connection_info().addr().to_string();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECTION_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let info = match ConnectionManager::new_with_config(client, config).await {
            Ok(mut conn) => redis::cmd("INFO")
                .arg("cluster")
                .query_async::<String>(&mut conn)
                .await
                .map(|info| (conn, info)),
            Err(err) => Err(err),
        };
        let (conn, info) = match info {
            Ok(answer) => answer,
            // No other seed fixes a refused certificate: say which flag does.
            Err(err) => match tls_refusal(&err) {
                Some(why) => bail!("cannot connect to Redis at {url}: {why}"),
                None => {
                    last = Some(
                        anyhow::Error::new(err)
                            .context(format!("cannot connect to Redis at {url}")),
                    );
                    continue;
                }
            },
        };
        if !info.lines().any(|l| l.trim() == "cluster_enabled:1") {
            return Ok(RedisConn::Standalone(conn));
        }
        let cluster = cluster_client()?.get_async_connection().await?;
        return Ok(RedisConn::Cluster(cluster));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("--redis-url (REDIS_URL) names no Redis")))
}

/// A connection to the first of `seeds` that answers, trying them all in
/// turn (with backoff) until one does.
async fn first_answering(
    seeds: &[redis::Client],
    config: &ConnectionManagerConfig,
) -> anyhow::Result<(redis::Client, ConnectionManager)> {
    let mut delay = Duration::from_millis(200);
    loop {
        for client in seeds {
            let url = client.get_connection_info().addr().to_string();
            let err = match ConnectionManager::new_with_config(client.clone(), config.clone()).await
            {
                Ok(conn) => return Ok((client.clone(), conn)),
                Err(err) => err,
            };
            // No retry fixes a refused certificate: stop, saying which flag to fix.
            if let Some(why) = tls_refusal(&err) {
                bail!("cannot connect to Redis at {url}: {why}");
            }
            if !(err.is_connection_refusal() || err.is_timeout() || err.is_io_error()) {
                return Err(err).with_context(|| format!("cannot connect to Redis at {url}"));
            }
            sink_core::metrics::retry("connect", "redis_unreachable");
            tracing::warn!(%url, error = %err, retry_in = ?delay, "Redis is not reachable yet");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Both cluster connections, once every primary answers: waits (with
/// backoff, counted as connect retries) while the cluster cannot serve yet
/// (being created, a failover under way, a primary down), as a standalone
/// start waits for its server. What no wait fixes (a refused certificate or
/// password) stops the start.
async fn cluster_serving(
    client: &redis::cluster::ClusterClient,
    pipelines: &redis::cluster::ClusterClient,
    seed: &str,
) -> anyhow::Result<Connections> {
    // What no wait fixes stops the start; anything else is why we wait.
    let waited_for = |err: RedisError| -> anyhow::Result<String> {
        if let Some(why) = tls_refusal(&err) {
            bail!("cannot connect to the Redis Cluster node a seed leads to: {why}");
        }
        match crate::error::classify(err) {
            SinkError::Unavailable { kind, source } => Err(source).with_context(|| {
                format!("{seed} is a Redis Cluster node, but the cluster refuses us ({kind})")
            }),
            transient => Ok(transient.to_string()),
        }
    };
    let mut delay = Duration::from_millis(200);
    loop {
        let why = match open_cluster(client, pipelines).await {
            Ok(mut conns) => match serving(&mut conns.inner).await {
                Ok(true) => return Ok(conns),
                Ok(false) => "a primary says cluster_state is not ok".to_owned(),
                Err(err) => waited_for(err)?,
            },
            Err(err) => waited_for(err)?,
        };
        sink_core::metrics::retry("connect", "redis_cluster_down");
        tracing::warn!(
            %seed, error = why, retry_in = ?delay,
            "the Redis Cluster cannot serve yet (is it created, every slot assigned, every \
             primary up and reachable at the address it announces?)"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Whether the primaries say the cluster is ok (every slot served).
async fn serving(conn: &mut RedisConn) -> Result<bool, RedisError> {
    use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
    let RedisConn::Cluster(conn) = conn else {
        return Ok(true);
    };
    let primaries = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
    let replies = conn
        .route_command(redis::cmd("CLUSTER").arg("INFO").clone(), primaries)
        .await?;
    // Answered as a map node → reply.
    let replies: Vec<(String, String)> = redis::from_redis_value(replies)?;
    Ok(replies
        .iter()
        .all(|(_, info)| info.lines().any(|l| l.trim() == "cluster_state:ok")))
}

/// How far this host's clock may be from Redis's.
const MAX_CLOCK_SKEW_MS: i64 = 60_000;

fn check_clock(redis_ms: i64, local_ms: i64) -> anyhow::Result<()> {
    let skew = local_ms.saturating_sub(redis_ms);
    if skew.abs() > MAX_CLOCK_SKEW_MS {
        bail!(
            "this host's clock is {} s {} Redis's: history keys expire at a time computed here \
             (PEXPIREAT), so the two clocks must agree within {} s. Sync them (NTP) and restart",
            skew.abs() / 1000,
            if skew > 0 { "ahead of" } else { "behind" },
            MAX_CLOCK_SKEW_MS / 1000
        );
    }
    Ok(())
}

/// Redis's `INFO memory` section, per node (every node of a cluster). Read
/// instead of `CONFIG GET`, which managed Redis services often disable.
pub(crate) async fn info_memory(conn: &mut RedisConn) -> Result<Vec<(String, String)>, RedisError> {
    info_of_each_node(conn, "memory").await
}

/// `INFO section` of the server, or of every node of a cluster (node →
/// reply).
async fn info_of_each_node(
    conn: &mut RedisConn,
    section: &str,
) -> Result<Vec<(String, String)>, RedisError> {
    let cmd = redis::cmd("INFO").arg(section).clone();
    match conn {
        RedisConn::Standalone(conn) => {
            Ok(vec![("primary".to_owned(), cmd.query_async(conn).await?)])
        }
        // Sent to every node, answered as a map node → reply.
        RedisConn::Cluster(conn) => {
            let replies: Vec<(String, Value)> = cmd.query_async(conn).await?;
            replies
                .into_iter()
                .map(|(node, reply)| Ok((node, redis::from_redis_value(reply)?)))
                .collect()
        }
    }
}

/// Warns about every primary with fewer than `replicas` replicas attached:
/// with `--redis-wait-replicas` its writes wait until enough are.
pub async fn warn_if_fewer_replicas(conn: &mut RedisConn, replicas: u32) -> anyhow::Result<()> {
    for (node, info) in info_of_each_node(conn, "replication").await? {
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .map(str::to_owned)
        };
        if field("role:").as_deref() != Some("master") {
            continue;
        }
        let attached: u32 = field("connected_slaves:")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if attached < replicas {
            tracing::warn!(
                %node,
                attached,
                wanted = replicas,
                "a Redis primary has fewer replicas than --redis-wait-replicas (REDIS_WAIT_REPLICAS): \
                 no batch is counted until enough are attached"
            );
        }
    }
    Ok(())
}

/// Refuses any eviction policy but `noeviction`: `allkeys-*` may evict the
/// offsets hash (replays then count twice), `volatile-*` evicts hourly
/// buckets and histories (they have TTLs) while the offsets say they were
/// applied. Under `noeviction` a full Redis refuses writes (OOM), which the
/// sink retries without losing anything.
pub(crate) fn check_eviction_policy(info_memory: &str) -> Result<(), String> {
    let policy = info_memory
        .lines()
        .find_map(|l| l.strip_prefix("maxmemory_policy:"))
        .map(str::trim);
    match policy {
        Some("noeviction") => Ok(()),
        Some(policy) => Err(format!(
            "Redis maxmemory-policy is {policy}: Redis may evict keys whose counts the stored \
             offsets say are applied, so the rankings would silently lose counts. redis-sink \
             needs maxmemory-policy noeviction"
        )),
        None => Err(
            "Redis did not report its maxmemory_policy in INFO memory, so redis-sink cannot tell \
             whether Redis evicts keys; it needs maxmemory-policy noeviction"
                .to_owned(),
        ),
    }
}

/// Refuses a standalone replica (a cluster's replica is only a seed: the
/// cluster connection finds the primaries) and servers too old.
fn check_server(info: &str) -> anyhow::Result<()> {
    let cluster = info.lines().any(|l| l.trim() == "cluster_enabled:1");
    if !cluster && info.lines().any(|l| l.trim() == "role:slave") {
        bail!(
            "--redis-url (REDIS_URL) leads to a replica, which refuses writes: point it at the \
             primary (the managed service's primary endpoint, not a reader endpoint)"
        );
    }
    if let Some(version) = info.lines().find_map(|l| l.strip_prefix("redis_version:")) {
        let mut parts = version
            .trim()
            .split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) < (6, 2) {
            bail!(
                "Redis {} is too old: ZADD GT needs Redis 6.2 or later",
                version.trim()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_is_refused_at_start() {
        let replica = "# Server\r\nredis_version:7.0.15\r\n# Replication\r\nrole:slave\r\n";
        let err = check_server(replica).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("leads to a replica")),
            "{err:?}"
        );
        let primary = "# Server\r\nredis_version:7.0.15\r\n# Replication\r\nrole:master\r\n";
        assert!(check_server(primary).is_ok());
    }

    #[test]
    fn clocks_must_agree_within_a_minute() {
        let refusal =
            |redis_ms, local_ms| check_clock(redis_ms, local_ms).err().map(|e| e.to_string());
        assert_eq!(refusal(1_000_000, 1_000_000 + MAX_CLOCK_SKEW_MS), None);
        assert_eq!(refusal(1_000_000 + MAX_CLOCK_SKEW_MS, 1_000_000), None);
        for (redis_ms, local_ms, says) in [
            (
                1_000_000 + 3_600_000,
                1_000_000,
                "this host's clock is 3600 s behind Redis's",
            ),
            (
                1_000_000,
                1_000_000 + 61_000,
                "this host's clock is 61 s ahead of Redis's",
            ),
        ] {
            let refused = refusal(redis_ms, local_ms);
            assert!(
                refused.as_deref().is_some_and(|e| e.starts_with(says)),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn only_noeviction_is_accepted() {
        let info =
            |policy: &str| format!("# Memory\r\nused_memory:1\r\nmaxmemory_policy:{policy}\r\n");
        assert_eq!(check_eviction_policy(&info("noeviction")), Ok(()));
        for policy in [
            "volatile-lru",
            "allkeys-lru",
            "volatile-ttl",
            "allkeys-random",
        ] {
            let refusal = check_eviction_policy(&info(policy))
                .err()
                .unwrap_or_default();
            assert!(
                refusal.starts_with(&format!("Redis maxmemory-policy is {policy}:"))
                    && refusal.ends_with("needs maxmemory-policy noeviction"),
                "{refusal}"
            );
        }
        assert!(check_eviction_policy("# Memory\r\nused_memory:1\r\n").is_err());
    }
}

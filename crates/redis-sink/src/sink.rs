//! The [`Sink`] over Redis: a batch becomes history writes, then one
//! ranking script per partition.

use std::time::Duration;

use redis::Script;
use sink_core::{Batch, PartitionRange, Record, Rejection, Sink, SinkError, WriteOutcome};

use crate::client::{check_eviction_policy, info_memory, Conn, Primary, RedisConn};
use std::collections::HashMap;

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::SingleNodeRoutingInfo;

use crate::config::{RedisSettings, ReplicaAcks};
use crate::decode::{decode, Action};
use crate::error::classify;
use crate::plan::{build, History, OffsetFence, Retention};
use crate::script::{APPLY_BATCH, RESET_FENCE};
use crate::slots::{slot_of, Node, SlotCache};

/// Batches written at once. More than one, so that Redis runs one batch's
/// commands while the next ones are being built and encoded: with one,
/// Redis sat idle for about a third of the time (perf). Three kept Redis
/// busier than two (about +10 % events/s); four were no faster and took
/// more memory (docs/benchmarks.md).
const MAX_IN_FLIGHT: usize = 3;

/// How often the eviction policy is read again while running: a policy
/// changed under a running sink stops its writes within this time.
const POLICY_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Writes user3 batches into Redis, exactly once per event.
pub struct RedisSink {
    primary: Primary,
    settings: RedisSettings,
    script: Script,
    /// Moves the fence, compare-and-set (see `reset_stored_offsets`).
    reset_script: Script,
    scripts: ScriptOrder,
    /// Which cluster node owns which history (unused on a standalone Redis).
    slots: SlotCache,
    /// When `maxmemory-policy` was last seen to be `noeviction`.
    policy_ok_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl RedisSink {
    /// A sink over an open connection.
    pub fn new(primary: Primary, settings: RedisSettings) -> Self {
        Self {
            primary,
            settings,
            script: Script::new(APPLY_BATCH),
            reset_script: Script::new(RESET_FENCE),
            scripts: ScriptOrder::default(),
            slots: SlotCache::default(),
            policy_ok_at: std::sync::Mutex::new(None),
        }
    }

    /// Fails while Redis may evict keys (see [`check_eviction_policy`]),
    /// reading the policy at most every [`POLICY_CHECK_INTERVAL`]: an
    /// operator may change it under a running sink.
    async fn ensure_no_eviction(&self, conn: &Conn) -> Result<(), SinkError> {
        let lock = || {
            self.policy_ok_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if lock().is_some_and(|at| at.elapsed() < POLICY_CHECK_INTERVAL) {
            return Ok(());
        }
        let nodes = info_memory(&mut conn.inner.clone())
            .await
            .map_err(classify)?;
        for (node, info) in nodes {
            check_eviction_policy(&info).map_err(|refusal| {
                *lock() = None;
                SinkError::unavailable(
                    "redis_eviction_policy",
                    anyhow::anyhow!(
                        "{refusal} (node {node}); nothing is written until it is noeviction again \
                         (the managed service's parameter group, or CONFIG SET maxmemory-policy noeviction)"
                    ),
                )
            })?;
        }
        *lock() = Some(std::time::Instant::now());
        Ok(())
    }

    /// Applies one partition's part of a batch. `Some((partition, stored))`
    /// when Redis says the partition stands elsewhere (nothing counted).
    async fn write_partition(
        &self,
        conn: &Conn,
        batch: &Batch<Action>,
        range: &PartitionRange,
        offsets_key: &str,
        now_ms: i64,
    ) -> Result<Option<(i32, i64)>, SinkError> {
        let actions = batch
            .entries
            .iter()
            .filter(|e| e.record.partition == range.partition)
            .map(|e| &e.item);
        let fence = OffsetFence {
            key: offsets_key.to_owned(),
            field: range.partition.to_string(),
            first: range.first,
            next: range.next,
        };
        let plan = build(
            &self.settings.keys,
            self.settings.retention,
            fence,
            actions,
            now_ms,
        );
        // Histories first, and the script only once they are all in: see
        // crate::script for why this order makes both exactly-once.
        write_histories(
            &conn.inner,
            &plan.histories,
            self.settings.retention,
            now_ms,
            &self.slots,
        )
        .await?;
        // On a cluster the histories may live on other primaries than the
        // `{rank}` node: one failing over before its replica has them
        // loses them, while the fence moved past them would keep them from
        // being written again. Waiting here closes that (docs/redis-keys.md).
        // The script needs no wait of its own: if its node loses it, it
        // loses the fence with the counts, which the next batch finds
        // behind and replays.
        if let Some(acks) = self.settings.replica_acks {
            wait_for_replicas(&conn.inner, acks).await?;
        }
        let mut conn = conn.inner.clone();
        self.scripts.turn(range).await;
        let mut invocation = self.script.prepare_invoke();
        for key in &plan.keys {
            invocation.key(key);
        }
        for arg in &plan.args {
            invocation.arg(arg);
        }
        let stored: i64 = invocation.invoke_async(&mut conn).await.map_err(classify)?;
        self.scripts.answer(range);
        if stored > range.next {
            // Another writer applied this range (a stale consumer, another
            // group) or a later batch followed a lost reply: counted as
            // sink-core counts the refusals it is told about.
            metrics::counter!(sink_core::metrics::ALREADY_APPLIED, "topic" => batch.topic.to_string())
                .increment(1);
        }
        // At or past `next`: Redis holds every record of this range, counted
        // once (an earlier attempt got through before its reply was lost,
        // and maybe later batches after it): applied. Resuming at `stored`
        // instead would make the loop seek for nothing.
        // Below `next`: resume there (a replay ahead of `first`, or Redis
        // lost writes behind it).
        Ok((stored >= 0 && stored < range.next).then_some((range.partition, stored)))
    }
}

impl Sink for RedisSink {
    type Item = Action;

    fn decode(&self, record: &Record) -> Result<Action, Rejection> {
        decode(record, self.settings.rules)
    }

    async fn write(&self, batch: &Batch<Action>) -> Result<WriteOutcome, SinkError> {
        let conn = self.primary.get();
        let written = self.write_over(&conn, batch).await;
        self.primary.follow(&conn, written).await
    }

    async fn stored_offsets(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<Option<i64>>, SinkError> {
        let conn = self.primary.get();
        let stored = self.stored_offsets_over(&conn, topic, partitions).await;
        self.primary.follow(&conn, stored).await
    }

    async fn reset_stored_offsets(
        &self,
        topic: &str,
        resets: &[(i32, i64, i64)],
    ) -> Result<(), SinkError> {
        let mut invocation = self.reset_script.prepare_invoke();
        invocation.key(self.settings.keys.offsets(topic));
        for (partition, from, to) in resets {
            invocation.arg(partition).arg(from).arg(to);
        }
        let conn = self.primary.get();
        let result = invocation
            .invoke_async::<Vec<i64>>(&mut conn.inner.clone())
            .await
            .map_err(classify)
            .and_then(|moved_on| {
                if moved_on.is_empty() {
                    return Ok(());
                }
                Err(SinkError::transient(
                    "reset_conflict",
                    anyhow::anyhow!(
                        "partitions {moved_on:?} no longer stand where the reset expected \
                         (another owner wrote since): not reset"
                    ),
                ))
            });
        self.primary.follow(&conn, result).await
    }

    fn max_in_flight(&self) -> usize {
        MAX_IN_FLIGHT
    }

    /// Every decoded action is applied: what Redis could refuse, it
    /// refuses for the whole batch (retried), never for one event.
    fn rejects_at_write(&self) -> bool {
        false
    }

    fn dispatched(&self, batch: &Batch<Action>) {
        self.scripts.owe(&batch.ranges);
    }

    async fn check(&self) -> Result<(), SinkError> {
        let conn = self.primary.get();
        let checked = self.check_over(&conn).await;
        self.primary.follow(&conn, checked).await
    }
}

/// The [`Sink`] methods over one connection: each may fail because the
/// server behind it stopped being the primary, which `Primary::follow`
/// handles around them.
impl RedisSink {
    async fn write_over(
        &self,
        conn: &Conn,
        batch: &Batch<Action>,
    ) -> Result<WriteOutcome, SinkError> {
        self.ensure_no_eviction(conn).await?;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let offsets_key = self.settings.keys.offsets(&batch.topic);
        // Partitions are independent (own offset, fenced separately), so
        // they go concurrently over the one connection: Redis runs one
        // partition's commands while the next partition's are being built.
        let writes = batch
            .ranges
            .iter()
            .map(|range| self.write_partition(conn, batch, range, &offsets_key, now_ms));
        let mut outcome = WriteOutcome::default();
        // Every partition finishes before an error is returned: a retry of
        // the batch finds those that got through already applied.
        for result in futures::future::join_all(writes).await {
            if let Some(stored) = result? {
                outcome.already_applied.push(stored);
            }
        }
        Ok(outcome)
    }

    async fn stored_offsets_over(
        &self,
        conn: &Conn,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<Option<i64>>, SinkError> {
        redis::cmd("HMGET")
            .arg(self.settings.keys.offsets(topic))
            .arg(partitions)
            .query_async(&mut conn.inner.clone())
            .await
            .map_err(classify)
    }

    async fn check_over(&self, conn: &Conn) -> Result<(), SinkError> {
        redis::cmd("PING")
            .query_async::<String>(&mut conn.inner.clone())
            .await
            .map_err(classify)?;
        self.ensure_no_eviction(conn).await
    }
}

/// Keeps each partition's scripts in dispatch order while several batches
/// are in flight: a batch's script for a partition waits until the script
/// of the batch before it (the one whose range ends where this one starts)
/// has been answered, however many attempts that takes. Without it, after a failed
/// write the later batch could be counted first, and the offset check would
/// then refuse the earlier one as a replay: its records would never count.
#[derive(Default)]
struct ScriptOrder {
    /// Scripts dispatched and not yet answered: (partition, first, next).
    owed: std::sync::Mutex<Vec<(i32, i64, i64)>>,
    /// Signalled whenever a script is answered.
    answered: tokio::sync::Notify,
}

impl ScriptOrder {
    /// A batch was dispatched: each of its partitions owes a script.
    fn owe(&self, ranges: &[PartitionRange]) {
        self.lock()
            .extend(ranges.iter().map(|r| (r.partition, r.first, r.next)));
    }

    /// Waits until the script before `range` in its partition is answered.
    async fn turn(&self, range: &PartitionRange) {
        loop {
            let answered = self.answered.notified();
            tokio::pin!(answered);
            // Registered before checking, so an answer in between still wakes.
            answered.as_mut().enable();
            let before = self
                .lock()
                .iter()
                .any(|&(p, _, next)| p == range.partition && next == range.first);
            if !before {
                return;
            }
            answered.await;
        }
    }

    /// The script of `range` was answered (applied or refused).
    fn answer(&self, range: &PartitionRange) {
        let entry = (range.partition, range.first, range.next);
        let mut owed = self.lock();
        if let Some(i) = owed.iter().position(|e| *e == entry) {
            owed.swap_remove(i);
        }
        drop(owed);
        self.answered.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(i32, i64, i64)>> {
        self.owed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Commands per history in [`write_histories`]: `ZADD`, the trim, `PEXPIREAT`.
const COMMANDS_PER_HISTORY: usize = 3;

/// Bytes of the longest decimal i64 or u64.
const MAX_INT_DIGITS: usize = 20;

/// Writes the histories: in one pipeline on a standalone Redis, in one
/// pipeline per primary on a cluster. Succeeds only if every command did:
/// a key of another type fails the write (naming the key), and the retry
/// writes them all again, which changes nothing for those already written.
///
/// Each key expires `history_ttl_secs` after `now_ms`, set by `PEXPIREAT`
/// rather than `EXPIRE`: Redis logs an `EXPIRE` in the append-only file as a
/// `PEXPIREAT`, rewriting the command first, and sparing it that cut
/// Redis's CPU by about 6 % with AOF on (docs/benchmarks.md). [`connect`]
/// checks that the clocks agree.
///
/// [`connect`]: crate::client::connect
async fn write_histories(
    conn: &RedisConn,
    histories: &[History<'_>],
    retention: Retention,
    now_ms: i64,
    slots: &SlotCache,
) -> Result<(), SinkError> {
    if histories.is_empty() {
        return Ok(());
    }
    let commands = HistoryCommands::new(retention, now_ms);
    let RedisConn::Cluster(cluster) = conn else {
        let all: Vec<&History<'_>> = histories.iter().collect();
        return send_histories(conn.clone(), commands.pipeline(&all), &all).await;
    };
    let written = write_per_node(cluster, histories, &commands, slots).await;
    let redirected = match written {
        Ok(redirected) => redirected,
        Err(err) => {
            slots.forget();
            return Err(err);
        }
    };
    if redirected.is_empty() {
        return Ok(());
    }
    // A slot moved or failed over since the map was read: those histories
    // go through redis-rs's routing, which follows MOVED and ASK, each
    // history's commands one after the other (in order: an expiry set
    // before the key exists would be lost). Not as a pipeline: redis-rs
    // sends a redirected pipeline whole to the new node, which while a slot
    // moves split one history over two nodes and blocked the move
    // (MIGRATE: BUSYKEY).
    slots.forget();
    let writes = redirected.into_iter().map(|history| {
        let mut conn = conn.clone();
        let commands = &commands;
        async move {
            for command in commands.of(history) {
                command
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|err| history_error(err, history))?;
            }
            Ok::<(), SinkError>(())
        }
    });
    // Every history finishes before an error is returned (as partitions do
    // in `write_over`).
    futures::future::join_all(writes)
        .await
        .into_iter()
        .collect()
}

/// Sends each primary the histories of its slots (by `slots`), one pipeline
/// per primary, all at once. The histories a node answered MOVED or ASK
/// for (or whose node the connection does not know) are returned, to be
/// written through redis-rs's routing: a pipeline sent to one address is
/// not redirected.
async fn write_per_node<'a, 'h>(
    cluster: &ClusterConnection,
    histories: &'a [History<'h>],
    commands: &HistoryCommands,
    slots: &SlotCache,
) -> Result<Vec<&'a History<'h>>, SinkError> {
    let map = slots.get(&mut cluster.clone()).await.map_err(classify)?;
    let mut by_node: HashMap<&Node, Vec<&History<'_>>> = HashMap::new();
    let mut redirected = Vec::new();
    for history in histories {
        match map.node_of(slot_of(history.key.as_bytes())) {
            Some(node) => by_node.entry(node).or_default().push(history),
            None => redirected.push(history),
        }
    }
    let sends = by_node.into_iter().map(|(node, histories)| {
        let mut cluster = cluster.clone();
        let route = SingleNodeRoutingInfo::ByAddress {
            host: node.host.clone(),
            port: node.port,
        };
        let pipe = commands.pipeline(&histories);
        async move {
            let count = histories.len() * COMMANDS_PER_HISTORY;
            match cluster.route_pipeline(pipe, 0, count, route).await {
                Ok(replies) => not_written_here(&replies, &histories),
                Err(err) if err.kind() == redis::ErrorKind::ClusterConnectionNotFound => {
                    Ok(histories)
                }
                Err(err) => Err(classify(err)),
            }
        }
    });
    for sent in futures::future::join_all(sends).await {
        redirected.extend(sent?);
    }
    Ok(redirected)
}

/// The histories among `histories` whose commands a node redirected
/// (`MOVED`, `ASK`); any other error reply fails the write.
fn not_written_here<'a, 'h>(
    replies: &[redis::Value],
    histories: &[&'a History<'h>],
) -> Result<Vec<&'a History<'h>>, SinkError> {
    let mut redirected: Vec<&History<'_>> = Vec::new();
    for (index, reply) in replies.iter().enumerate() {
        let redis::Value::ServerError(error) = reply else {
            continue;
        };
        let Some(&history) = histories.get(index / COMMANDS_PER_HISTORY) else {
            continue;
        };
        if matches!(error.code(), "MOVED" | "ASK") {
            if !redirected
                .last()
                .is_some_and(|last| std::ptr::eq(*last, history))
            {
                redirected.push(history);
            }
        } else {
            return Err(history_error(
                redis::RedisError::from(error.clone()),
                history,
            ));
        }
    }
    Ok(redirected)
}

/// Waits until `acks.replicas` replicas of every primary hold what this
/// connection wrote to it (`WAIT`: per connection, hence the same one the
/// histories went over; on a cluster redis-rs asks every primary and keeps
/// the lowest count). Too few in time fails the write, which is retried:
/// its histories are written again first, so a history a failover lost in
/// between is back before the fence moves.
async fn wait_for_replicas(conn: &RedisConn, acks: ReplicaAcks) -> Result<(), SinkError> {
    let acked: i64 = redis::cmd("WAIT")
        .arg(acks.replicas)
        .arg(acks.timeout_ms)
        .query_async(&mut conn.clone())
        .await
        .map_err(classify)?;
    if acked < i64::from(acks.replicas) {
        return Err(SinkError::transient(
            "redis_replicas_behind",
            anyhow::anyhow!(
                "only {acked} replica(s) of a Redis primary acknowledged the histories within \
                 {} ms, {} wanted (--redis-wait-replicas): a replica is down, lagging or was \
                 never attached; counts and offsets wait until it catches up",
                acks.timeout_ms,
                acks.replicas
            ),
        ));
    }
    Ok(())
}

/// How each history is written: the same expiry and trim for all of a batch.
struct HistoryCommands {
    /// `PEXPIREAT` deadline.
    expire_at: i64,
    /// Ranks 0 ..= `last_dropped`: all but the newest `history_size`.
    last_dropped: i64,
}

impl HistoryCommands {
    fn new(retention: Retention, now_ms: i64) -> Self {
        let ttl_ms = i64::try_from(retention.history_ttl_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        let size = i64::try_from(retention.history_size).unwrap_or(i64::MAX - 1);
        Self {
            expire_at: now_ms.saturating_add(ttl_ms),
            last_dropped: -(size + 1),
        }
    }

    /// [`COMMANDS_PER_HISTORY`] commands for each of `histories`, in order.
    fn pipeline(&self, histories: &[&History<'_>]) -> redis::Pipeline {
        let mut pipe = redis::Pipeline::with_capacity(histories.len() * COMMANDS_PER_HISTORY);
        for history in histories {
            for command in self.of(history) {
                pipe.add_command(command);
            }
        }
        pipe
    }

    /// The commands of one history: `ZADD`, the trim, `PEXPIREAT`.
    fn of(&self, history: &History<'_>) -> [redis::Cmd; COMMANDS_PER_HISTORY] {
        // Sized up front: growing each command's buffers argument by
        // argument was a tenth of the sink's CPU (perf).
        let key = history.key.as_str();
        let members: usize = history.items.iter().map(|(_, m)| m.len()).sum();
        let mut zadd = redis::Cmd::with_capacity(
            3 + 2 * history.items.len(),
            6 + key.len() + members + MAX_INT_DIGITS * history.items.len(),
        );
        zadd.arg("ZADD").arg(key).arg("GT");
        for (time, member) in &history.items {
            zadd.arg(time).arg(member);
        }
        let mut trim = redis::Cmd::with_capacity(4, 16 + key.len() + MAX_INT_DIGITS);
        trim.arg("ZREMRANGEBYRANK")
            .arg(key)
            .arg(0)
            .arg(self.last_dropped);
        let mut expire = redis::Cmd::with_capacity(3, 9 + key.len() + MAX_INT_DIGITS);
        expire.arg("PEXPIREAT").arg(key).arg(self.expire_at);
        [zadd, trim, expire]
    }
}

/// Sends `pipe`, the commands of `histories`; a `WRONGTYPE` reply names
/// the history's key.
async fn send_histories(
    mut conn: RedisConn,
    pipe: redis::Pipeline,
    histories: &[&History<'_>],
) -> Result<(), SinkError> {
    pipe.query_async::<()>(&mut conn).await.map_err(|err| {
        let failed = err.clone().into_server_errors().and_then(|errors| {
            let (index, _) = errors.iter().find(|(_, e)| e.code() == "WRONGTYPE")?;
            histories.get(index / COMMANDS_PER_HISTORY)
        });
        match failed {
            Some(history) => history_error(err, history),
            None => classify(err),
        }
    })
}

/// `err` from writing `history`: a `WRONGTYPE` names its key.
fn history_error(err: redis::RedisError, history: &History<'_>) -> SinkError {
    let wrong_type = err.code() == Some("WRONGTYPE")
        || err
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| e.code() == "WRONGTYPE"));
    if !wrong_type {
        return classify(err);
    }
    SinkError::unavailable(
        "redis_wrong_type",
        anyhow::anyhow!(
            "WRONGTYPE key {} holds another type than a sorted set: remove or rename it",
            history.key
        ),
    )
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;

    use super::*;

    fn range(partition: i32, first: i64, next: i64) -> PartitionRange {
        PartitionRange {
            partition,
            first,
            next,
        }
    }

    fn reply(resp: &[u8]) -> redis::Value {
        redis::parse_redis_value(resp).unwrap_or(redis::Value::Nil)
    }

    #[test]
    fn redirected_histories_are_sent_again_and_other_errors_fail_naming_the_key() {
        let history = |user: &str| History {
            key: format!("history:search:{user}"),
            items: vec![(1, "k")],
        };
        let (a, b, c) = (history("a"), history("b"), history("c"));
        let sent = [&a, &b, &c];
        let ok = || reply(b":1\r\n");
        let moved = || reply(b"-MOVED 3999 127.0.0.1:6381\r\n");
        // b's slot moved after its ZADD went through; c's before any.
        let replies = [
            ok(),
            ok(),
            ok(),
            ok(),
            moved(),
            moved(),
            reply(b"-ASK 7000 127.0.0.1:6382\r\n"),
            moved(),
            moved(),
        ];
        let again = not_written_here(&replies, &sent).unwrap_or_default();
        assert_eq!(
            again.iter().map(|h| h.key.as_str()).collect::<Vec<_>>(),
            ["history:search:b", "history:search:c"]
        );

        let mut replies = vec![ok(); 9];
        replies[3] =
            reply(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n");
        let refused = not_written_here(&replies, &sent).err();
        assert_eq!(
            refused.as_ref().map(SinkError::kind),
            Some("redis_wrong_type")
        );
        assert!(refused.is_some_and(|e| e.to_string().contains("history:search:b")));
    }

    #[tokio::test]
    async fn a_script_waits_until_the_one_before_it_is_answered() {
        let order = ScriptOrder::default();
        let (earlier, later) = (range(0, 0, 10), range(0, 10, 20));
        order.owe(&[earlier, range(1, 0, 10)]);
        order.owe(&[later, range(1, 10, 20)]);
        assert!(
            order.turn(&earlier).now_or_never().is_some(),
            "nothing owed before the first"
        );
        assert!(
            order.turn(&range(0, 30, 40)).now_or_never().is_some(),
            "no owed script ends where it starts (a seek moved the partition)"
        );

        let waiting = order.turn(&later);
        tokio::pin!(waiting);
        assert!(
            waiting.as_mut().now_or_never().is_none(),
            "0..10 is owed: a failed attempt of it, to be retried, still is"
        );
        order.answer(&range(1, 0, 10));
        assert!(
            waiting.as_mut().now_or_never().is_none(),
            "another partition's answer changes nothing"
        );
        order.answer(&earlier);
        assert!(
            waiting.now_or_never().is_some(),
            "woken when the earlier script is answered"
        );
    }
}

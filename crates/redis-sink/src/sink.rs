//! The [`Sink`] over Redis: a batch becomes history writes, then one
//! ranking script per partition.

use std::collections::HashMap;
use std::time::Duration;

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::Script;
use sink_core::{Batch, PartitionRange, Record, Rejection, Sink, SinkError, WriteOutcome};

use crate::client::{check_eviction_policy, info_memory, Conn, Primary};
use crate::config::{RedisSettings, ReplicaAcks};
use crate::decode::{decode, Action};
use crate::error::classify;
use crate::plan::{build, History, OffsetFence, Plan, Retention};
use crate::script::{APPLY_BATCH, RESET_FENCE};
use crate::slots::{slot_of, SlotCache};

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
    /// Where each partition's fence began, as far as this process knows.
    origins: FenceOrigins,
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
            origins: FenceOrigins::default(),
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

    /// What one partition's part of a batch writes.
    fn plan<'b>(
        &self,
        batch: &'b Batch<Action>,
        range: &PartitionRange,
        offsets_key: &str,
        now_ms: i64,
    ) -> Plan<'b> {
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
        build(
            &self.settings.keys,
            self.settings.retention,
            fence,
            actions,
            now_ms,
        )
    }

    /// Runs one partition's ranking script, once its histories are in.
    /// `Some((partition, stored))` when Redis says the partition stands
    /// elsewhere (nothing counted).
    async fn write_partition(
        &self,
        conn: &Conn,
        range: &PartitionRange,
        plan: &Plan<'_>,
        topic: &str,
    ) -> Result<Option<(i32, i64)>, SinkError> {
        let mut conn = conn.inner.clone();
        self.scripts.turn(range).await;
        let mut invocation = self.script.prepare_invoke();
        for key in &plan.keys {
            invocation.key(key);
        }
        for arg in &plan.args {
            invocation.arg(arg);
        }
        // Read once the batch before has been answered: its reply may have
        // settled what this process knows of the fence.
        let origin = self.origins.of(range);
        invocation.arg(origin.map_or_else(String::new, |o| o.to_string()));
        let stored: i64 = invocation.invoke_async(&mut conn).await.map_err(classify)?;
        if stored == FENCE_LOST {
            // Not answered: the partition's later batches keep waiting
            // behind this one, whose first offset the error names.
            return Err(fence_lost(plan, range, topic));
        }
        self.scripts.answer(range);
        self.origins.answered(range, origin, stored);
        if (0..range.first).contains(&stored) {
            tracing::warn!(
                topic,
                partition = range.partition,
                stored,
                first = range.first,
                "Redis holds less of this partition than was written (it lost writes: a failover \
                 to a replica that missed them, or a restart from an older file): counting again \
                 from the offset it holds"
            );
        }
        if stored > range.next {
            // Another writer applied this range (a stale consumer, another
            // group) or a later batch followed a lost reply: counted as
            // sink-core counts the refusals it is told about.
            metrics::counter!(sink_core::metrics::ALREADY_APPLIED, "topic" => topic.to_owned())
                .increment(1);
        }
        // At or past `next`: Redis holds every record of this range, counted
        // once (an earlier attempt got through before its reply was lost,
        // and maybe later batches after it): applied. Resuming at `stored`
        // instead would make the loop seek for nothing.
        // Below `next`: resume there (a replay ahead of `first`, or Redis
        // lost writes behind it).
        Ok((0..range.next)
            .contains(&stored)
            .then_some((range.partition, stored)))
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
        self.origins.dispatched(&batch.ranges);
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
        let plans: Vec<(&PartitionRange, Plan<'_>)> = batch
            .ranges
            .iter()
            .map(|range| (range, self.plan(batch, range, &offsets_key, now_ms)))
            .collect();
        // Every history of the batch first, and the scripts only once they
        // are all in (and, if asked, on replicas): see crate::script for why
        // this order makes both exactly-once.
        let histories: Vec<&History<'_>> =
            plans.iter().flat_map(|(_, plan)| &plan.histories).collect();
        let history_writes = HistoryWrites {
            commands: HistoryCommands::new(self.settings.retention, now_ms),
            replica_acks: self.settings.replica_acks,
        };
        history_writes.write(conn, &histories, &self.slots).await?;
        // Partitions are independent (own offset, fenced separately), so
        // their scripts go concurrently.
        let writes = plans
            .iter()
            .map(|(range, plan)| self.write_partition(conn, range, plan, &batch.topic));
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
        // Before anything can fail: if this read does not return, the loop
        // starts these partitions from Kafka's offsets, knowing nothing.
        self.origins.forget(partitions);
        let stored: Vec<Option<i64>> = redis::cmd("HMGET")
            .arg(self.settings.keys.offsets(topic))
            .arg(partitions)
            .query_async(&mut conn.inner.clone())
            .await
            .map_err(classify)?;
        self.origins.found(partitions.iter().zip(&stored));
        Ok(stored)
    }

    async fn check_over(&self, conn: &Conn) -> Result<(), SinkError> {
        redis::cmd("PING")
            .query_async::<String>(&mut conn.inner.clone())
            .await
            .map_err(classify)?;
        self.ensure_no_eviction(conn).await
    }
}

/// What the script returns when a fence this process found is gone.
const FENCE_LOST: i64 = -2;
/// What the script returns when it applied a batch and began the fence.
const FENCE_BEGUN: i64 = -3;

/// The error for a fence gone from Redis though this process found it:
/// says what happened and how to go on.
fn fence_lost(plan: &Plan<'_>, range: &PartitionRange, topic: &str) -> SinkError {
    let key = plan.keys.first().map_or("", String::as_str);
    SinkError::unavailable(
        "redis_fence_lost",
        anyhow::anyhow!(
            "Redis no longer holds the offset fence of {topic} partition {p} (field {p} of \
             {key}), which it held before: Redis lost data (a restart without persistence, a \
             failover to a replica that missed writes) or the key was deleted, so the counts \
             before offset {first} may be incomplete. Nothing more is counted until the fence \
             is back; to go on from here, accepting what was lost: HSET {key} {p} {first} \
             (docs/redis-keys.md, Exactly once)",
            p = range.partition,
            first = range.first,
        ),
    )
}

/// What this process knows of each partition's fence, so that a missing
/// fence is told apart from a new one (see crate::script).
#[derive(Default)]
struct FenceOrigins(std::sync::Mutex<HashMap<i32, Origin>>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// Redis held the fence when asked (at assignment or by a reply): its
    /// absence would be lost data.
    Found,
    /// Not known yet: the first batch dispatched since the partition was
    /// taken starts at this offset, and begins the fence there if Redis
    /// has none.
    Pending(i64),
    /// This process began the fence at this offset: if it goes missing,
    /// Redis lost it together with every count since, which are counted
    /// again from here.
    Began(i64),
}

impl FenceOrigins {
    /// Partitions being taken: whatever was known of them is stale.
    fn forget(&self, partitions: &[i32]) {
        let mut origins = self.lock();
        for partition in partitions {
            origins.remove(partition);
        }
    }

    /// The stored offsets read for partitions just taken.
    fn found<'a>(&self, stored: impl IntoIterator<Item = (&'a i32, &'a Option<i64>)>) {
        let mut origins = self.lock();
        for (partition, offset) in stored {
            if offset.is_some() {
                origins.insert(*partition, Origin::Found);
            }
        }
    }

    /// Batches dispatched in offset order: the first for a partition
    /// whose fence is not known is where this process would begin it.
    fn dispatched(&self, ranges: &[PartitionRange]) {
        let mut origins = self.lock();
        for range in ranges {
            origins
                .entry(range.partition)
                .or_insert(Origin::Pending(range.first));
        }
    }

    /// The origin to send with `range`'s script: none once the fence was
    /// seen in Redis.
    fn of(&self, range: &PartitionRange) -> Option<i64> {
        match self.lock().get(&range.partition) {
            Some(Origin::Found) => None,
            Some(Origin::Pending(origin) | Origin::Began(origin)) => Some(*origin),
            // Not dispatched through the loop (a direct write): new.
            None => Some(range.first),
        }
    }

    /// What the script's reply `stored` to `range` (sent with `origin`)
    /// says of the fence.
    fn answered(&self, range: &PartitionRange, origin: Option<i64>, stored: i64) {
        let mut origins = self.lock();
        let Some(state) = origins.get_mut(&range.partition) else {
            return;
        };
        if let Origin::Pending(pending) = *state {
            *state = match stored {
                FENCE_BEGUN => Origin::Began(pending),
                // Sent back to the origin: no fence seen yet.
                _ if Some(stored) == origin => return,
                // Applied onto a fence, or one that stands elsewhere.
                _ => Origin::Found,
            };
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Origin>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// Commands per history ([`HistoryCommands::of`]): `ZADD`, the trim, `PEXPIREAT`.
const COMMANDS_PER_HISTORY: usize = 3;

/// Bytes of the longest decimal i64 or u64.
const MAX_INT_DIGITS: usize = 20;

/// How a batch's histories are written: the commands, and whether to wait
/// for replicas before the scripts.
struct HistoryWrites {
    commands: HistoryCommands,
    replica_acks: Option<ReplicaAcks>,
}

impl HistoryWrites {
    /// Writes `histories`: one pipeline on a standalone Redis, one per
    /// primary on a cluster, each ending in `WAIT` when replicas must
    /// acknowledge (`WAIT` counts the writes of its own connection, so it
    /// goes on the one the histories went over). Succeeds only if every
    /// command did: a key of another type fails the write (naming the key),
    /// and the retry writes them all again, which changes nothing for those
    /// already written.
    async fn write(
        &self,
        conn: &Conn,
        histories: &[&History<'_>],
        slots: &SlotCache,
    ) -> Result<(), SinkError> {
        if histories.is_empty() {
            return Ok(());
        }
        let Some(pipelines) = &conn.pipelines else {
            let replies = self
                .pipeline(histories)
                .query_async::<Vec<redis::Value>>(&mut conn.inner.clone())
                .await
                .map_err(|err| pipeline_error(err, histories))?;
            return self.check_replicas(&replies);
        };
        let map = slots.get(&mut conn.inner.clone()).await.map_err(classify)?;
        let mut by_node: HashMap<Option<&str>, Vec<&History<'_>>> = HashMap::new();
        for &history in histories {
            let node = map.node_of(slot_of(history.key.as_bytes()));
            by_node.entry(node).or_default().push(history);
        }
        let sends = by_node
            .into_values()
            .map(|group| self.write_on_node(pipelines.clone(), group, slots));
        // Every group finishes before an error is returned (as partitions
        // do in `write_over`).
        crate::error::to_report(futures::future::join_all(sends).await)
    }

    /// Writes `histories` (all of one primary, by the slot map) as one
    /// pipeline routed by the slot of the first. A redirect makes redis-rs
    /// give up at once (`pipeline_cluster_client`: no retries) and fails
    /// the write, which is retried; histories already written are written
    /// again, which changes nothing.
    async fn write_on_node(
        &self,
        mut pipelines: ClusterConnection,
        histories: Vec<&History<'_>>,
        slots: &SlotCache,
    ) -> Result<(), SinkError> {
        let Some(first) = histories.first() else {
            return Ok(());
        };
        let pipe = self.pipeline(&histories);
        let route = SingleNodeRoutingInfo::SpecificNode(Route::new(
            slot_of(first.key.as_bytes()),
            SlotAddr::Master,
        ));
        let count = pipe.len();
        match pipelines.route_pipeline(pipe, 0, count, route).await {
            Ok(replies) => {
                if let Some((index, error)) =
                    replies.iter().enumerate().find_map(|(i, r)| match r {
                        redis::Value::ServerError(e) => Some((i, e.clone())),
                        _ => None,
                    })
                {
                    let err = redis::RedisError::from(error);
                    return Err(match histories.get(index / COMMANDS_PER_HISTORY) {
                        Some(history) => history_error(err, history),
                        None => classify(err),
                    });
                }
                self.check_replicas(&replies)
            }
            // The slot is moving, some of its keys on the new node already:
            // retried with backoff until the move ends. Not through
            // redis-rs's routing: it follows ASK with `ASKING` as a request
            // of its own on the shared connection, which another command
            // can take first; the `MOVED` that follows started a slot
            // refresh that did not end while the slot was moving (tested).
            Err(err) if matches!(err.code(), Some("ASK" | "TRYAGAIN")) => {
                slots.forget();
                Err(SinkError::transient(
                    "redis_slot_moving",
                    anyhow::anyhow!(
                        "a slot of these histories is being moved between nodes ({err}): the \
                         write is retried until the move has ended (a slot left MIGRATING by \
                         an interrupted resharding needs `redis-cli --cluster fix`)"
                    ),
                ))
            }
            // The slot map was stale (a slot moved, a failover): the retry
            // reads it again and sends each group where it belongs now.
            Err(err)
                if err.code() == Some("MOVED")
                    || err.kind() == redis::ErrorKind::ClusterConnectionNotFound =>
            {
                slots.forget();
                Err(SinkError::transient(
                    "redis_slot_map_changed",
                    anyhow::anyhow!("the cluster's slot map changed ({err}): the write is retried"),
                ))
            }
            Err(err) => {
                slots.forget();
                Err(classify(err))
            }
        }
    }

    /// The pipeline of `histories`, ending in `WAIT` if replicas must
    /// acknowledge.
    fn pipeline(&self, histories: &[&History<'_>]) -> redis::Pipeline {
        let mut pipe = self.commands.pipeline(histories);
        if let Some(acks) = self.replica_acks {
            pipe.add_command(acks.command());
        }
        pipe
    }

    /// Fails unless the `WAIT` that ends `replies` counted enough replicas.
    fn check_replicas(&self, replies: &[redis::Value]) -> Result<(), SinkError> {
        let Some(acks) = self.replica_acks else {
            return Ok(());
        };
        let acked = match replies.last() {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        };
        if acked >= i64::from(acks.replicas) {
            return Ok(());
        }
        Err(SinkError::transient(
            "redis_replicas_behind",
            anyhow::anyhow!(
                "only {acked} replica(s) of a Redis primary acknowledged the histories within \
                 {} ms, {} wanted (--redis-wait-replicas): a replica is down, lagging or was \
                 never attached; counts and offsets wait until it catches up",
                acks.timeout_ms,
                acks.replicas
            ),
        ))
    }
}

/// How each history is written: the same expiry and trim for all of a batch.
///
/// Each key expires `history_ttl_secs` after `now_ms`, set by `PEXPIREAT`
/// rather than `EXPIRE`: Redis logs an `EXPIRE` in the append-only file as a
/// `PEXPIREAT`, rewriting the command first, and sparing it that cut
/// Redis's CPU by about 6 % with AOF on (docs/benchmarks.md). [`connect`]
/// checks that the clocks agree.
///
/// [`connect`]: crate::client::connect
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
        // Always changes the key, so Redis always replicates it: a retry
        // over a new connection then moves that connection's replication
        // offset past everything before, and its `WAIT` covers the rewrite
        // even where `ZADD GT` and the trim changed nothing (no NX/GT here).
        let mut expire = redis::Cmd::with_capacity(3, 9 + key.len() + MAX_INT_DIGITS);
        expire.arg("PEXPIREAT").arg(key).arg(self.expire_at);
        [zadd, trim, expire]
    }
}

/// `err` from the pipeline of `histories`: a `WRONGTYPE` reply names the
/// history's key.
fn pipeline_error(err: redis::RedisError, histories: &[&History<'_>]) -> SinkError {
    let failed = err.clone().into_server_errors().and_then(|errors| {
        let (index, _) = errors.iter().find(|(_, e)| e.code() == "WRONGTYPE")?;
        histories.get(index / COMMANDS_PER_HISTORY)
    });
    match failed {
        Some(history) => history_error(err, history),
        None => classify(err),
    }
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

    #[test]
    fn a_fence_is_begun_only_by_the_first_batch_since_the_partition_was_taken() {
        let origins = FenceOrigins::default();
        // Partition 0 had a fence at assignment, 1 had none, 2's read failed.
        origins.forget(&[0, 1, 2]);
        origins.found([(&0, &Some(7)), (&1, &None)]);
        origins.dispatched(&[range(0, 7, 10), range(1, 0, 10), range(2, 50, 60)]);
        origins.dispatched(&[range(1, 10, 20)]);
        assert_eq!(
            origins.of(&range(0, 7, 10)),
            None,
            "found: a loss is an error"
        );
        assert_eq!(origins.of(&range(1, 10, 20)), Some(0));
        assert_eq!(origins.of(&range(2, 50, 60)), Some(50));

        // 1: applied and begun; later batches keep that origin.
        origins.answered(&range(1, 0, 10), Some(0), FENCE_BEGUN);
        origins.answered(&range(1, 10, 20), Some(0), -1);
        assert_eq!(origins.lock().get(&1), Some(&Origin::Began(0)));
        // 2: its fence was there after all (applied onto it): found.
        origins.answered(&range(2, 50, 60), Some(50), -1);
        assert_eq!(origins.of(&range(2, 60, 70)), None);

        // Taken again: what was known is forgotten until the read says.
        origins.forget(&[1]);
        origins.dispatched(&[range(1, 20, 30)]);
        assert_eq!(origins.lock().get(&1), Some(&Origin::Pending(20)));
        // A reply sending it back to its origin says nothing of the fence.
        origins.answered(&range(1, 25, 30), Some(20), 20);
        assert_eq!(origins.lock().get(&1), Some(&Origin::Pending(20)));
        // A fence standing elsewhere: found.
        origins.answered(&range(1, 20, 30), Some(20), 40);
        assert_eq!(origins.lock().get(&1), Some(&Origin::Found));
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

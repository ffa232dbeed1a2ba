//! The consume → batch → write → dead-letter → commit loop, written once.
//!
//! Guarantee: at-least-once with no loss. A partition's committed offset only
//! moves past records the sink acknowledged or the dead-letter topic
//! accepted, and only for partitions this consumer owns. A sink that stores
//! its offsets with its writes (Redis) turns this into exactly-once effects.
//!
//! Shape of the loop (one task):
//! - fetch a record, decode it (the sink's pure `decode`), add it to the batcher;
//! - sealed batches are written by spawned tasks, at most `max_in_flight` at
//!   once; a task retries until the sink accepts, sends dead letters first,
//!   then marks its offsets done in the shared [`OffsetTracker`];
//! - when sealed batches pile up (the sink is behind or down), the assignment
//!   is paused but polling goes on, so the consumer stays in its group;
//! - rebalances run inside `recv()`: a revoke waits (bounded) for in-flight
//!   batches of the revoked partitions and commits what they acknowledged; an
//!   assignment starts each partition where the sink says it stands.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::FutureExt as _;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedHeaders, BorrowedMessage, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::task::JoinSet;

use crate::batch::{Batcher, Work};
use crate::config::{kafka_config_context, redact_url, ConsumerArgs, ResetTo};
use crate::dlq::DeadLetters;
use crate::flow::{Fetching, FlowControl};
use crate::health::Health;
use crate::http;
use crate::lock;
use crate::metrics as m;
use crate::offsets::{BatchId, OffsetTracker, Skip};
use crate::retry;
use crate::sink::{Record, Rejection, Sink};
use crate::stall::{Change, Observation, StallWatch};
use crate::starts::{self, marked_offsets_list, offsets_list, Unreadable, Why};

/// How long an assignment waits for the sink to say where partitions start.
/// Past it, Kafka's committed offsets are used: a sink that stores offsets
/// still refuses a replay at write time, so this costs a seek, not accuracy.
const STORED_OFFSETS_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a seek may take (the loop waits: the fetch position must have
/// moved before the tracker says so).
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// Most records taken in one burst (see `Loop::take_ready`).
const BURST: usize = 1_000;

/// Most of the shutdown timeout kept for leaving the group and flushing
/// dead letters after the last writes (a quarter of it when that is less).
const EXIT_RESERVE: Duration = Duration::from_secs(3);

/// How often a reset of refused partitions that failed (the sink did not
/// answer, another owner moved it) is tried again.
const REFUSED_RECHECK: Duration = Duration::from_secs(30);

/// How often an idle sink is probed for readiness.
const CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// How often the sink is probed while it is down: the probe is what wakes
/// writes waiting out a long backoff, so this bounds recovery after an
/// outage.
const DOWN_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// State shared by the loop, the batch tasks and the rebalance callback.
struct Shared {
    tracker: Mutex<OffsetTracker>,
    /// Signalled whenever a batch completes (a revoke may be waiting).
    batch_done: Condvar,
    /// Set once shutdown started: rebalance callbacks stop waiting.
    closing: AtomicBool,
    /// Counts rebalances, so the loop knows librdkafka reset its pause state.
    rebalances: AtomicU64,
    /// Counts write attempts, so the idle readiness probe stays out of the way.
    writes: AtomicU64,
    /// False while the loop holds or pauses fetching for the sink.
    taking: AtomicBool,
    /// The last consumer error librdkafka reported, for the stall log.
    last_error: Mutex<Option<String>>,
    /// Assigned partitions refused: they start beyond their log's end, or
    /// their log went back.
    refused: Mutex<std::collections::BTreeSet<i32>>,
    /// Refused partitions whose log went back: their commits carry
    /// [`starts::WENT_BACK`], so every later owner refuses them too.
    went_back: Mutex<std::collections::BTreeSet<i32>>,
    stalls: Mutex<StallWatch>,
}

impl Shared {
    fn tracker(&self) -> MutexGuard<'_, OffsetTracker> {
        lock(&self.tracker)
    }

    /// `commits` as a list to commit: refused partitions whose log went
    /// back keep saying so.
    fn commit_list(&self, topic: &str, commits: &[(i32, i64)]) -> TopicPartitionList {
        let went_back: Vec<i32> = lock(&self.went_back).iter().copied().collect();
        marked_offsets_list(topic, commits, &went_back)
    }
}

/// librdkafka callbacks: rebalances, statistics, commit results.
struct LoopContext<S: Sink> {
    shared: Arc<Shared>,
    sink: Arc<S>,
    topic: Arc<str>,
    health: Arc<Health>,
    drain_timeout: Duration,
    reset_to: Option<ResetTo>,
}

impl<S: Sink> ClientContext for LoopContext<S> {
    fn stats(&self, statistics: Statistics) {
        m::record_statistics(&statistics);
        self.watch_stalls(&statistics);
    }
}

impl<S: Sink> ConsumerContext for LoopContext<S> {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let refused = self.on_assign(consumer, &partitions, tpl);
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                // A pause set by the application survives revoke and
                // re-assign in librdkafka; the loop treats a new assignment
                // as unpaused, so make it so (it pauses again if needed).
                // Refused partitions stay paused: nothing of them is read.
                let refused: Vec<(i32, i64)> = refused.iter().map(|p| (*p, 0)).collect();
                assigned
                    .and_then(|()| consumer.resume(tpl))
                    .and_then(|()| consumer.pause(&offsets_list(&self.topic, &refused)))
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.on_revoke(consumer, &partitions);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed; dropping the assignment");
                // Like a lost assignment: nothing of it may be committed.
                let mut tracker = self.shared.tracker();
                let assigned = tracker.assigned();
                for partition in &assigned {
                    tracker.revoke(*partition);
                }
                drop(tracker);
                self.forget_stalls(&assigned);
                let refused: Vec<i32> = lock(&self.shared.refused).iter().copied().collect();
                self.forget_refused(&refused);
                self.health.set_owned(Vec::new());
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
        };
        self.shared.rebalances.fetch_add(1, Ordering::Relaxed);
        if let Err(err) = result {
            tracing::error!(%err, "cannot apply the new assignment");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(err) = result {
            // Not fatal: the next commit carries a later offset, and anything
            // uncommitted is re-delivered (the sink copes with replays).
            tracing::warn!(%err, offsets = ?offsets.to_topic_map(), "offset commit failed");
        }
    }
}

impl<S: Sink> LoopContext<S> {
    /// Feeds the stall watch with where each assigned partition stands and
    /// where its log ends, and reports what changed.
    fn watch_stalls(&self, statistics: &Statistics) {
        let Some(topic_stats) = statistics.topics.get(&*self.topic) else {
            return;
        };
        let reading = self.shared.tracker().reading();
        let taking = self.shared.taking.load(Ordering::Relaxed);
        let now = Instant::now();
        let mut stalls = lock(&self.shared.stalls);
        for partition in reading {
            let Some(p) = topic_stats.partitions.get(&partition) else {
                continue;
            };
            // librdkafka's fetch position: past transaction markers, which
            // never reach the loop; unknown (negative) while it looks up
            // where to start, whatever state it is stuck in.
            let log_end = [p.ls_offset, p.hi_offset].into_iter().find(|o| *o >= 0);
            let seen = Observation {
                position: (p.next_offset >= 0).then_some(p.next_offset),
                log_end,
            };
            if let Some(change) = stalls.observe(partition, seen, taking, now) {
                self.report_stall(change);
            }
        }
        self.health.set_stalled(stalls.stalled());
    }

    /// Stops watching revoked partitions.
    fn forget_stalls(&self, partitions: &[i32]) {
        let mut stalls = lock(&self.shared.stalls);
        for partition in partitions {
            if let Some(change) = stalls.forget(*partition) {
                self.report_stall(change);
            }
        }
        self.health.set_stalled(stalls.stalled());
    }

    fn report_stall(&self, change: Change) {
        let (partition, stalled) = match change {
            Change::Stalled {
                partition,
                position,
                log_end,
                for_,
            } => {
                let last_error = lock(&self.shared.last_error).clone();
                tracing::error!(
                    topic = %self.topic,
                    partition,
                    offset = position,
                    log_end,
                    stalled_secs = for_.as_secs(),
                    last_consumer_error = last_error.as_deref().unwrap_or("none"),
                    "partition stopped advancing: the records from this offset cannot be \
                     read (a corrupt or undecodable record batch, a broker refusing fetches); \
                     nothing past it is committed. See the last consumer error and the broker's log"
                );
                (partition, 1.0)
            }
            Change::Moving { partition } => {
                tracing::info!(topic = %self.topic, partition, "partition advancing again");
                (partition, 0.0)
            }
        };
        metrics::gauge!(m::PARTITION_STALLED, "topic" => self.topic.to_string(), "partition" => partition.to_string())
            .set(stalled);
    }

    /// Decides where each assigned partition starts: where the sink says it
    /// stands, else Kafka's committed offset. A start beyond the log's end
    /// is refused (or reset, if the operator said so). Returns the refused
    /// partitions, which the caller keeps paused.
    fn on_assign(
        &self,
        consumer: &BaseConsumer<Self>,
        partitions: &[i32],
        tpl: &mut TopicPartitionList,
    ) -> Vec<i32> {
        let closing = self.shared.closing.load(Ordering::Relaxed);
        let stored = if closing || partitions.is_empty() {
            None
        } else {
            let lookup = self.sink.stored_offsets(&self.topic, partitions);
            match block_on(async { tokio::time::timeout(STORED_OFFSETS_TIMEOUT, lookup).await }) {
                Some(Ok(Ok(offsets))) if offsets.len() == partitions.len() => Some(offsets),
                Some(Ok(Ok(_))) => {
                    tracing::error!(
                        "sink returned stored offsets for the wrong number of partitions"
                    );
                    None
                }
                Some(Ok(Err(err))) => {
                    tracing::warn!(error = %err, "cannot read the sink's stored offsets; starting from Kafka's");
                    None
                }
                Some(Err(_)) => {
                    tracing::warn!(
                        "the sink's stored offsets took too long; starting from Kafka's"
                    );
                    None
                }
                None => None,
            }
        };
        let mut starts: Vec<Option<i64>> = stored.unwrap_or_else(|| vec![None; partitions.len()]);
        let mut refused = Vec::new();
        if !closing {
            // Broker round trips: off the runtime's worker, as the drain.
            let unreadable = blocking(|| {
                starts::unreadable(consumer, &self.topic, partitions, &mut starts, &[])
            });
            let (reset, refuse) = self.reset_or_refuse(consumer, unreadable);
            for (partition, offset) in reset {
                if let Some(i) = partitions.iter().position(|p| *p == partition) {
                    starts[i] = Some(offset);
                }
            }
            refused = refuse;
        }
        let mut tracker = self.shared.tracker();
        for (partition, start) in partitions.iter().zip(&starts) {
            if refused.contains(partition) {
                continue;
            }
            if let Some(offset) = start {
                if let Err(err) =
                    tpl.set_partition_offset(&self.topic, *partition, Offset::Offset(*offset))
                {
                    tracing::error!(%err, partition, "cannot set the start offset");
                }
            }
            tracker.assign(*partition, *start);
        }
        drop(tracker);
        lock(&self.shared.refused).extend(&refused);
        self.publish_refused(&refused, 1.0);
        let owned = self.set_owned();
        self.health.set_in_group(true);
        // Incremental rebalances assign only what changes owner: say what
        // this replica owns too (last, so the line ends with it).
        tracing::info!(topic = %self.topic, added = ?partitions, ?owned, "partitions assigned");
        refused
    }

    /// Partitions that cannot start where they stand: reset where the
    /// operator said (the sink told first), or refused with an error.
    /// Returns (partition, new start) for the reset ones, and the refused.
    fn reset_or_refuse<K: Consumer<Self>>(
        &self,
        consumer: &K,
        unreadable: Vec<Unreadable>,
    ) -> (Vec<(i32, i64)>, Vec<i32>) {
        let Some(reset_to) = self.reset_to else {
            for u in &unreadable {
                let why = match u.why {
                    Why::BeyondLogEnd => {
                        "partition refused: where it stands (the sink's or Kafka's stored offset) \
                         lies beyond the end of its log, so the log is not the one it was read \
                         from (the topic was recreated, an unclean leader election truncated it, a \
                         failover to a mirror). Nothing of it is read or committed"
                    }
                    Why::LogWentBack => {
                        "partition refused: its log went back while it was read (its committed \
                         offset says so), so the log is not the one it was read from (the topic \
                         was recreated, an unclean leader election truncated it, a failover to a \
                         mirror), and its records below the stored offset were never read. \
                         Nothing of it is read or committed"
                    }
                };
                tracing::error!(
                    topic = %self.topic,
                    partition = u.partition,
                    stored_offset = u.start,
                    log_start = u.log_start,
                    log_end = u.log_end,
                    "{why}. Restart with --reset-offsets-beyond-log-end earliest (a recreated \
                     topic: every record is new) or latest (a truncated log: what it holds below \
                     its end was written), then remove the flag"
                );
            }
            let went_back = unreadable.iter().filter(|u| u.why == Why::LogWentBack);
            lock(&self.shared.went_back).extend(went_back.map(|u| u.partition));
            return (Vec::new(), unreadable.iter().map(|u| u.partition).collect());
        };
        if unreadable.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let resets: Vec<(i32, i64, i64)> = unreadable
            .iter()
            .map(|u| {
                let to = match reset_to {
                    ResetTo::Earliest => u.log_start,
                    ResetTo::Latest => u.log_end,
                };
                tracing::warn!(
                    topic = %self.topic,
                    partition = u.partition,
                    stored_offset = u.start,
                    reset_to = to,
                    why = ?u.why,
                    "resetting where the partition starts, as --reset-offsets-beyond-log-end says"
                );
                (u.partition, u.start, to)
            })
            .collect();
        let all: Vec<i32> = resets.iter().map(|(p, _, _)| *p).collect();
        let reset = self.sink.reset_stored_offsets(&self.topic, &resets);
        match block_on(async { tokio::time::timeout(STORED_OFFSETS_TIMEOUT, reset).await }) {
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(err))) => {
                tracing::error!(error = %err, partitions = ?all, "cannot reset the sink's stored offsets: refusing those partitions (checked again every 30 s)");
                return (Vec::new(), all);
            }
            Some(Err(_)) | None => {
                tracing::error!(partitions = ?all, "resetting the sink's stored offsets took too long: refusing those partitions (checked again every 30 s)");
                return (Vec::new(), all);
            }
        }
        // Kafka's committed offsets too, without the went-back mark: a later
        // owner that cannot read the sink's starts from them, and must not
        // find them beyond the end or marked. Until that commit goes
        // through, the partitions stay refused; the sink's reset, done
        // again, moves nothing more (from `to` to the same `to`, unless
        // the log moved).
        let moved: Vec<(i32, i64)> = resets.iter().map(|(p, _, to)| (*p, *to)).collect();
        if let Err(err) = consumer.commit(&offsets_list(&self.topic, &moved), CommitMode::Sync) {
            tracing::error!(%err, partitions = ?all, "cannot commit the reset offsets: refusing those partitions (checked again every 30 s)");
            return (Vec::new(), all);
        }
        let mut went_back = lock(&self.shared.went_back);
        for partition in &all {
            went_back.remove(partition);
        }
        (moved, Vec::new())
    }

    /// Sets `sink_partition_refused` of `partitions` and readiness.
    fn publish_refused(&self, partitions: &[i32], value: f64) {
        for partition in partitions {
            metrics::gauge!(m::PARTITION_REFUSED, "topic" => self.topic.to_string(), "partition" => partition.to_string())
                .set(value);
        }
        self.health.set_refused(lock(&self.shared.refused).len());
    }

    /// Stops refusing partitions that are no longer ours.
    fn forget_refused(&self, partitions: &[i32]) {
        let mut went_back = lock(&self.shared.went_back);
        for partition in partitions {
            went_back.remove(partition);
        }
        drop(went_back);
        let mut refused = lock(&self.shared.refused);
        let gone: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| refused.remove(p))
            .collect();
        drop(refused);
        self.publish_refused(&gone, 0.0);
    }

    /// /metrics shows per-partition series of the partitions this consumer
    /// owns: those it reads and those it refuses. Returns them.
    fn set_owned(&self) -> Vec<i32> {
        let mut owned = self.shared.tracker().assigned();
        owned.extend(lock(&self.shared.refused).iter());
        owned.sort_unstable();
        owned.dedup();
        self.health.set_owned(owned.clone());
        owned
    }

    fn on_revoke(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) {
        let lost = consumer.assignment_lost();
        if !lost && !self.shared.closing.load(Ordering::Relaxed) {
            self.drain(partitions);
        }
        let commits: Vec<(i32, i64)> = {
            let mut tracker = self.shared.tracker();
            partitions
                .iter()
                .filter_map(|p| tracker.revoke(*p).map(|offset| (*p, offset)))
                .collect()
        };
        // Listed before the refusals are forgotten: they mark what they say.
        let commits = self.shared.commit_list(&self.topic, &commits);
        self.forget_stalls(partitions);
        self.forget_refused(partitions);
        let owned = self.set_owned();
        // After a lost assignment the partitions already belong to others:
        // a commit now would be refused, and must not win if it were not.
        if !lost && commits.count() > 0 {
            if let Err(err) = consumer.commit(&commits, CommitMode::Sync) {
                tracing::warn!(%err, "commit on revoke failed; the next owner re-reads those records");
            }
        }
        tracing::info!(topic = %self.topic, revoked = ?partitions, lost, ?owned, "partitions revoked");
    }

    /// Waits, up to the drain timeout, for batches holding revoked partitions.
    /// They run on other tasks; this thread is only parked.
    fn drain(&self, partitions: &[i32]) {
        let deadline = Instant::now() + self.drain_timeout;
        let mut tracker = self.shared.tracker();
        while tracker.in_flight(partitions) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                tracing::warn!(?partitions, "in-flight batches did not finish before the drain deadline; the next owner re-reads them");
                return;
            };
            tracker = match block_in_place(|| self.shared.batch_done.wait_timeout(tracker, left)) {
                Some(Ok((guard, _))) => guard,
                Some(Err(poisoned)) => poisoned.into_inner().0,
                None => return,
            };
        }
    }
}

/// Runs a future to completion from a librdkafka callback, which is
/// synchronous. Only possible on a multi-thread runtime; elsewhere `None`.
fn block_on<F: Future>(future: F) -> Option<F::Output> {
    let handle = Handle::try_current().ok()?;
    if handle.runtime_flavor() == RuntimeFlavor::CurrentThread {
        return None;
    }
    Some(tokio::task::block_in_place(|| handle.block_on(future)))
}

/// Runs `f`, which blocks (broker round trips), without starving the
/// runtime's other tasks where it can.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() != RuntimeFlavor::CurrentThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Blocks this thread without starving the runtime's other tasks; `None`
/// on a current-thread runtime, where nothing else would run meanwhile.
fn block_in_place<T>(f: impl FnOnce() -> T) -> Option<T> {
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::CurrentThread => None,
        Ok(_) => Some(tokio::task::block_in_place(f)),
        Err(_) => Some(f()),
    }
}

/// Consumes `args.topic` into `sink` until `shutdown` resolves, then writes
/// and commits what it fetched (within `--shutdown-timeout-secs`) and leaves
/// the group. Also serves /metrics, /healthz and /readyz on
/// `--metrics-addr`. Needs a multi-thread tokio runtime: rebalance callbacks
/// wait for in-flight writes while other tasks keep running.
pub async fn run<S: Sink>(
    args: &ConsumerArgs,
    sink: S,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_connecting(args, async { Ok(sink) }, shutdown).await
}

/// [`run`] with a sink still to connect: /metrics, /healthz and /readyz
/// answer while `connect` waits for its service (live, not ready,
/// `sink_starting` 1, the connect retries counted), so a service stuck at
/// start shows why instead of being killed without a trace. Shutdown
/// during the wait exits at once; an error from `connect` is returned.
pub async fn run_connecting<S: Sink>(
    args: &ConsumerArgs,
    connect: impl Future<Output = anyhow::Result<S>>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    args.validate()?;
    let health = Health::new();
    health.set_liveness_timeout(Duration::from_secs(args.liveness_timeout_secs));
    let metrics = m::install()?;
    let metrics_addr = http::serve(args.metrics_addr, metrics, Arc::clone(&health)).await?;
    let starting = metrics::gauge!(m::STARTING);
    starting.set(1.0);
    tokio::pin!(shutdown);
    let sink = tokio::select! {
        sink = connect => sink?,
        () = &mut shutdown => return Ok(()),
    };
    starting.set(0.0);
    let topic: Arc<str> = args.topic.as_str().into();
    tracing::info!(
        topic = %topic,
        group = %args.group_id,
        bootstrap = %redact_url(&args.bootstrap_servers),
        dlq = %args.dlq_topic(),
        kafka_options = %args.redacted_kafka_options(),
        metrics = %metrics_addr,
        "starting consumer"
    );

    let sink = Arc::new(sink);
    let shared = Arc::new(Shared {
        tracker: Mutex::new(OffsetTracker::default()),
        batch_done: Condvar::new(),
        closing: AtomicBool::new(false),
        rebalances: AtomicU64::new(0),
        writes: AtomicU64::new(0),
        taking: AtomicBool::new(true),
        last_error: Mutex::new(None),
        refused: Mutex::new(std::collections::BTreeSet::new()),
        went_back: Mutex::new(std::collections::BTreeSet::new()),
        stalls: Mutex::new(StallWatch::new(args.stall_timeout())),
    });
    let context = LoopContext {
        shared: Arc::clone(&shared),
        sink: Arc::clone(&sink),
        topic: Arc::clone(&topic),
        health: Arc::clone(&health),
        // As Vector does: half the session timeout, so a slow drain never
        // gets this member evicted mid-rebalance.
        drain_timeout: Duration::from_millis(args.session_timeout_ms / 2),
        reset_to: args.reset_offsets_beyond_log_end,
    };
    let consumer: StreamConsumer<LoopContext<S>> = kafka_config_context(
        args.consumer_config().create_with_context(context),
        "consumer",
    )?;
    consumer
        .subscribe(&[&topic])
        .with_context(|| format!("cannot subscribe to topic {topic}"))?;
    let dlq = Arc::new(DeadLetters::new(args)?);

    let checker = tokio::spawn(probe_sink(
        Arc::clone(&sink),
        Arc::clone(&shared),
        Arc::clone(&health),
    ));
    let mut consume = Loop {
        consumed: metrics::counter!(m::EVENTS_CONSUMED, "topic" => topic.to_string()),
        gaps: metrics::counter!(m::OFFSET_GAPS, "topic" => topic.to_string()),
        stale: metrics::counter!(m::STALE_RECORDS, "topic" => topic.to_string()),
        stale_runs: std::collections::HashSet::new(),
        buffered: metrics::gauge!(m::BUFFERED_EVENTS),
        holding: metrics::gauge!(m::PAUSED),
        batcher: Batcher::new(Arc::clone(&topic), args.batch_limits()),
        max_in_flight: sink.max_in_flight().max(1),
        consumer,
        sink,
        dlq: Arc::clone(&dlq),
        shared: Arc::clone(&shared),
        health: Arc::clone(&health),
        topic,
        tasks: JoinSet::new(),
        flow: FlowControl::default(),
        rebalances_seen: 0,
        refused_checked_at: Instant::now(),
    };
    let result = consume.run(shutdown).await;
    // --shutdown-timeout-secs bounds the whole exit: writing what was
    // fetched gets all but a reserve for leaving the group and flushing
    // dead letters, which wait on the broker.
    let deadline = Instant::now() + args.shutdown_timeout();
    let reserve = (args.shutdown_timeout() / 4).min(EXIT_RESERVE);
    let leftover = consume.drain(args.shutdown_timeout() - reserve).await;
    checker.abort();
    health.set_in_group(false);
    shared.closing.store(true, Ordering::Relaxed);
    let Loop { consumer, .. } = consume;
    // Closing leaves the group and may block on the network: off the runtime.
    // A close that never returns (a broker that stopped answering) is left
    // behind: block_on_main does not wait for it.
    let closed = tokio::task::spawn_blocking(move || drop(consumer));
    if tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), closed)
        .await
        .is_err()
    {
        tracing::warn!(
            "leaving the consumer group took too long; the broker will time this member out"
        );
    }
    dlq.flush(deadline.saturating_duration_since(Instant::now()));
    if leftover.buffered == 0 && leftover.batches == 0 {
        tracing::info!("stopped; everything fetched was written and committed");
    } else {
        tracing::warn!(
            buffered_records = leftover.buffered,
            unfinished_batches = leftover.batches,
            "stopped before the sink took everything; the rest was not committed and will be consumed again"
        );
    }
    result
}

/// What shutdown could not write before its deadline.
struct Leftover {
    buffered: usize,
    batches: usize,
}

/// Probes the sink for readiness while no write says anything about it.
async fn probe_sink<S: Sink>(sink: Arc<S>, shared: Arc<Shared>, health: Arc<Health>) {
    // Probe at start; afterwards only in rounds without a write, whose
    // outcome already sets readiness.
    let mut writes_seen = None;
    // While the sink is down, probes run every second but warn every 10 s.
    let mut warned_at: Option<Instant> = None;
    loop {
        let writes = shared.writes.load(Ordering::Relaxed);
        if writes_seen.is_none_or(|seen| seen == writes) {
            match sink.check().await {
                Ok(()) => {
                    health.set_sink_ok(true);
                    warned_at = None;
                }
                Err(err) => {
                    health.set_sink_ok(false);
                    if warned_at.is_none_or(|at| at.elapsed() >= CHECK_INTERVAL) {
                        tracing::warn!(error = %err, "sink is not reachable");
                        warned_at = Some(Instant::now());
                    }
                }
            }
        }
        writes_seen = Some(writes);
        let interval = if health.sink_ok() {
            CHECK_INTERVAL
        } else {
            DOWN_CHECK_INTERVAL
        };
        tokio::time::sleep(interval).await;
    }
}

struct Loop<S: Sink> {
    consumer: StreamConsumer<LoopContext<S>>,
    sink: Arc<S>,
    dlq: Arc<DeadLetters>,
    shared: Arc<Shared>,
    health: Arc<Health>,
    topic: Arc<str>,
    batcher: Batcher<S::Item>,
    tasks: JoinSet<()>,
    max_in_flight: usize,
    flow: FlowControl,
    rebalances_seen: u64,
    /// When refused partitions were last checked again.
    refused_checked_at: Instant,
    /// Counted per record: a handle, not a lookup by name each time.
    consumed: metrics::Counter,
    gaps: metrics::Counter,
    stale: metrics::Counter,
    /// Partitions whose last fetched record was dropped as stale.
    stale_runs: std::collections::HashSet<i32>,
    /// Set on every turn of the loop, so handles too.
    buffered: metrics::Gauge,
    holding: metrics::Gauge,
}

impl<S: Sink> Loop<S> {
    async fn run(&mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        loop {
            self.dispatch();
            self.flow_control(Instant::now());
            let linger = self.batcher.deadline();
            let pause_at = self.flow.pause_at();
            // A timer whenever resets are allowed: partitions get refused
            // inside recv(), after this select was set up.
            let recheck_at = self
                .consumer
                .context()
                .reset_to
                .map(|_| self.refused_checked_at + REFUSED_RECHECK);
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                () = sleep_until(recheck_at), if recheck_at.is_some() => self.recheck_refused().await,
                Some(joined) = self.tasks.join_next() => joined.context("a batch task panicked")?,
                () = sleep_until(linger), if linger.is_some() => self.batcher.tick(Instant::now()),
                () = sleep_until(pause_at), if pause_at.is_some() => {}
                message = self.consumer.recv(), if self.taking() => {
                    let message = message.map(|m| detach(&self.topic, &m));
                    // A rebalance inside this recv() may have revoked what the
                    // batcher holds: purge before adding the new record. Seeks
                    // wait for the after_step below (see there).
                    self.purge_revoked();
                    let now = Instant::now();
                    self.take(message, now);
                    self.take_ready(now);
                }
            }
            self.after_step();
        }
    }

    /// Takes the messages librdkafka already holds, without another turn of
    /// the loop: a turn (timers, task set, gauges) cost more than decoding a
    /// record. Stops at [`BURST`] records, when none is ready, at an error,
    /// or when a batch seals, so writes still start and timers still fire
    /// promptly.
    /// What each turn would do between messages is still done where it
    /// matters: a rebalance inside a poll purges before the next record is
    /// added; a seek a finished batch asked for waits at most one burst,
    /// and what was fetched meanwhile is purged by it. The burst's records
    /// all arrived `now` as far as linger goes: a burst lasts milliseconds,
    /// and reading the clock per record showed in profiles.
    fn take_ready(&mut self, now: Instant) {
        for _ in 0..BURST {
            if !self.taking() || self.batcher.has_sealed() {
                return;
            }
            let rebalances = self.shared.rebalances.load(Ordering::Relaxed);
            let Some(message) = self.consumer.recv().now_or_never() else {
                return;
            };
            let message = message.map(|m| detach(&self.topic, &m));
            if self.shared.rebalances.load(Ordering::Relaxed) != rebalances {
                self.purge_revoked();
            }
            // Errors come in bursts too (a broker down): one warning per
            // burst, not one per error.
            if !self.take(message, now) {
                return;
            }
        }
    }

    /// Adds a received record to the open batch, or logs the consumer
    /// error; false for an error.
    fn take(&mut self, message: KafkaResult<Record>, now: Instant) -> bool {
        match message {
            Ok(record) => {
                self.accept(record, now);
                true
            }
            Err(err) => {
                if err.rdkafka_error_code() == Some(RDKafkaErrorCode::InconsistentGroupProtocol) {
                    tracing::error!(
                        %err,
                        "this member cannot join its group: the members in it use another kind \
                         of partition.assignment.strategy (cooperative-sticky here; eager range or \
                         roundrobin there, as versions before cooperative rebalancing). Stop the \
                         old members first, or set --kafka-option \
                         partition.assignment.strategy=range (deploy/README.md)"
                    );
                } else {
                    tracing::warn!(%err, "Kafka consumer error");
                }
                *lock(&self.shared.last_error) = Some(err.to_string());
                false
            }
        }
    }

    /// Adds a fetched record to the open batch, unless it is stale.
    fn accept(&mut self, record: Record, now: Instant) {
        let accepted = self
            .shared
            .tracker()
            .accept(record.partition, record.offset);
        let resumed_from = match accepted {
            Ok(resumed_from) => resumed_from,
            Err(Skip::NotOwned | Skip::Refused) => return,
            Err(Skip::Stale { expected }) => {
                self.stale.increment(1);
                // Once per run of stale records, not once per record.
                if self.stale_runs.insert(record.partition) {
                    tracing::warn!(
                        partition = record.partition,
                        expected,
                        got = record.offset,
                        "dropping records fetched before a seek, below where this partition resumes"
                    );
                }
                return;
            }
            Err(Skip::WentBack { expected, last }) => {
                self.refuse_went_back(record.partition, record.offset, expected, last);
                return;
            }
        };
        self.stale_runs.remove(&record.partition);
        if record.offset > resumed_from {
            // Kafka only skips offsets for transaction markers or compaction;
            // neither applies to Logstash's topics. Anything else means the
            // broker skipped records: say so loudly.
            self.gaps
                .increment(u64::try_from(record.offset - resumed_from).unwrap_or(0));
            tracing::warn!(
                partition = record.partition,
                expected = resumed_from,
                got = record.offset,
                "offset gap: the broker returned a later offset than requested"
            );
        }
        self.consumed.increment(1);
        let decoded = self.sink.decode(&record);
        self.batcher.push(record, decoded, resumed_from, now);
    }

    /// Refuses a partition whose log went back under the fetcher: what was
    /// read before is still written and committed, nothing after is read.
    fn refuse_went_back(&mut self, partition: i32, got: i64, expected: i64, last: Option<i64>) {
        let what = if last.is_some() {
            "its fetcher went back below a record this service already read"
        } else {
            "its fetcher started below the offset it was given (not in the log)"
        };
        tracing::error!(
            topic = %self.topic,
            partition,
            offset = got,
            last_read = last,
            resume_offset = expected,
            "partition refused: {what}, so the log was truncated or replaced under it (an unclean \
             leader election, a recreated topic, a failover to a mirror; librdkafka logs its \
             offset reset). Records the new log holds below the resume offset were never read. \
             What was read before is written and committed; nothing more of this partition is, \
             by this replica or any later owner (its commit says so), until a restart with \
             --reset-offsets-beyond-log-end earliest (every record of the new log is new) or \
             latest (it holds what was read) says where to start"
        );
        if let Err(err) = self
            .consumer
            .pause(&offsets_list(&self.topic, &[(partition, 0)]))
        {
            tracing::warn!(%err, partition, "cannot pause a refused partition; its records are dropped");
        }
        lock(&self.shared.refused).insert(partition);
        lock(&self.shared.went_back).insert(partition);
        // Committed with the mark now, not only with its next batch.
        self.shared.tracker().commit_again(partition);
        let context = self.consumer.context();
        context.publish_refused(&[partition], 1.0);
        context.forget_stalls(&[partition]);
        context.set_owned();
    }

    /// Starts writing sealed batches while there is room.
    fn dispatch(&mut self) {
        while self.tasks.len() < self.max_in_flight {
            let Some(work) = self.batcher.pop_sealed() else {
                break;
            };
            let batch_id = self.shared.tracker().begin(&work.batch.ranges);
            self.sink.dispatched(&work.batch);
            self.tasks.spawn(write_batch(
                Arc::clone(&self.sink),
                Arc::clone(&self.dlq),
                Arc::clone(&self.shared),
                Arc::clone(&self.health),
                batch_id,
                work,
            ));
        }
        let buffered = self.batcher.buffered();
        self.buffered.set(buffered as f64);
        self.health
            .set_pending(buffered > 0 || !self.tasks.is_empty(), Instant::now());
    }

    /// Holds or pauses fetching while the sink is behind (see [`crate::flow`]).
    fn flow_control(&mut self, now: Instant) {
        let rebalances = self.shared.rebalances.load(Ordering::Relaxed);
        if rebalances != self.rebalances_seen {
            self.rebalances_seen = rebalances;
            // The callback resumes what it assigns, and a cooperative
            // rebalance leaves kept partitions as they were: while paused,
            // pause the whole assignment again, so `paused` holds for every
            // partition and the resume below reaches them all.
            if self.flow.paused() {
                if let Err(err) = self.pause_assignment(true) {
                    tracing::warn!(%err, "cannot pause the new assignment");
                }
            }
        }
        let waiting = self.batcher.sealed_len();
        if let Some(fetching) = self.flow.update(waiting, now) {
            match self.pause_assignment(fetching == Fetching::Pause) {
                Ok(()) => {
                    self.flow.fetching_set(fetching);
                    match fetching {
                        Fetching::Pause => tracing::info!(
                            waiting_batches = waiting,
                            "the sink is behind: fetching paused"
                        ),
                        Fetching::Resume => tracing::info!("the sink caught up: fetching resumed"),
                    }
                }
                Err(err) => tracing::warn!(%err, "cannot pause/resume fetching"),
            }
        }
        let holding = self.flow.holding();
        self.holding.set(if holding { 1.0 } else { 0.0 });
        self.shared.taking.store(!holding, Ordering::Relaxed);
    }

    /// Whether to take messages now (see [`FlowControl::taking`]).
    fn taking(&self) -> bool {
        self.flow.taking()
    }

    /// Pauses or resumes every partition of the assignment it reads.
    fn pause_assignment(&self, pause: bool) -> KafkaResult<()> {
        let partitions: Vec<(i32, i64)> = self
            .shared
            .tracker()
            .reading()
            .into_iter()
            .map(|p| (p, 0))
            .collect();
        let tpl = offsets_list(&self.topic, &partitions);
        if pause {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        }
    }

    /// Tries the reset of refused partitions again, and starts those it
    /// moved. Only a reset starts a refused partition: one whose log has
    /// meanwhile grown past its stored offset would otherwise skip the
    /// records between the old end and that offset without a word.
    async fn recheck_refused(&mut self) {
        self.refused_checked_at = Instant::now();
        // A partition refused while it was read may still have records
        // buffered or in flight: they are written and committed first, so a
        // reset starts from a tracker that nothing of the old log touches.
        let refused: Vec<i32> = {
            let tracker = self.shared.tracker();
            lock(&self.shared.refused)
                .iter()
                .copied()
                .filter(|p| !tracker.in_flight(&[*p]) && !self.batcher.holds(*p))
                .collect()
        };
        if refused.is_empty() {
            return;
        }
        let lookup = self.sink.stored_offsets(&self.topic, &refused);
        let mut starts = match tokio::time::timeout(STORED_OFFSETS_TIMEOUT, lookup).await {
            Ok(Ok(starts)) if starts.len() == refused.len() => starts,
            _ => return, // the sink cannot say: still refused, next time
        };
        let went_back: Vec<i32> = lock(&self.shared.went_back).iter().copied().collect();
        let consumer = &self.consumer;
        let unreadable = blocking(|| {
            starts::unreadable(consumer, &self.topic, &refused, &mut starts, &went_back)
        });
        let (reset, still) = self
            .consumer
            .context()
            .reset_or_refuse(&self.consumer, unreadable);
        for partition in refused.iter().filter(|p| !still.contains(p)) {
            if !reset.iter().any(|(p, _)| p == partition) {
                tracing::error!(
                    topic = %self.topic,
                    partition,
                    "a refused partition's log has grown past its stored offset: the records \
                     between the old end and it were never read. Still refused; check what the \
                     log holds before restarting, which starts it at the stored offset"
                );
            }
        }
        let mut started = Vec::new();
        for (partition, offset) in reset {
            let seek = || {
                self.consumer
                    .seek(&self.topic, partition, Offset::Offset(offset), SEEK_TIMEOUT)
            };
            if let Err(err) = blocking(seek) {
                tracing::warn!(%err, partition, offset, "cannot seek a partition just reset; tried again later");
                continue;
            }
            self.shared.tracker().assign(partition, Some(offset));
            started.push((partition, 0));
        }
        if started.is_empty() {
            return;
        }
        let partitions: Vec<i32> = started.iter().map(|(p, _)| *p).collect();
        let context = self.consumer.context();
        context.forget_refused(&partitions);
        context.set_owned();
        let tpl = offsets_list(&self.topic, &started);
        // Paused with the rest while the loop is paused; resumed with it.
        let resumed = if self.flow.paused() {
            Ok(())
        } else {
            self.consumer.resume(&tpl)
        };
        match resumed {
            Ok(()) => {
                tracing::info!(topic = %self.topic, ?partitions, "partitions no longer refused: reading them")
            }
            Err(err) => tracing::warn!(%err, "cannot resume partitions no longer refused"),
        }
    }

    /// Drops the buffered records of partitions revoked since the last call.
    fn purge_revoked(&mut self) {
        let revoked = self.shared.tracker().take_revoked();
        for partition in revoked {
            self.batcher.purge(partition);
        }
    }

    /// Applies what rebalances and completed batches decided: drops records of
    /// revoked partitions, seeks where the sink stands, commits.
    ///
    /// Only called when every record received so far is in the batcher:
    /// a seek purges its partition there, and the fetcher starts again at
    /// the seek's offset. A record received before the seek but taken
    /// after it would escape the purge and become the first record after
    /// the seek: the records between the seek's offset and it would then
    /// be dropped as stale when fetched again, and never written.
    fn after_step(&mut self) {
        self.purge_revoked();
        let (seeks, commits) = {
            let mut tracker = self.shared.tracker();
            (tracker.take_seeks(), tracker.take_commits())
        };
        for (partition, offset) in seeks {
            self.batcher.purge(partition);
            tracing::info!(
                partition,
                offset,
                "the sink already holds records up to this offset; resuming there"
            );
            self.shared.tracker().seeking(partition, offset);
            // Bounded wait: the position may only move once the fetcher did.
            let seek = || {
                self.consumer
                    .seek(&self.topic, partition, Offset::Offset(offset), SEEK_TIMEOUT)
            };
            match blocking(seek) {
                Ok(()) => self.shared.tracker().moved_to(partition, offset),
                Err(err) => tracing::warn!(
                    %err, partition, offset,
                    "seek failed; the sink refuses the records fetched meanwhile and asks again"
                ),
            }
        }
        if !commits.is_empty() {
            let commits = self.shared.commit_list(&self.topic, &commits);
            if let Err(err) = self.consumer.commit(&commits, CommitMode::Async) {
                tracing::warn!(%err, "cannot send offset commit");
            }
        }
    }

    /// Shutdown: writes what was fetched, within the deadline, and commits it
    /// synchronously. Returns what was left unwritten.
    async fn drain(&mut self, timeout: Duration) -> Leftover {
        let deadline = tokio::time::Instant::now() + timeout;
        // A rebalance may have run in the last recv(): purge before sealing.
        self.after_step();
        self.batcher.seal();
        while !self.tasks.is_empty() || self.batcher.has_sealed() {
            self.dispatch();
            tokio::select! {
                joined = self.tasks.join_next() => {
                    if let Some(Err(err)) = joined {
                        tracing::error!(%err, "a batch task failed during shutdown");
                    }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
            self.after_step();
        }
        let unfinished = self.tasks.len();
        self.tasks.abort_all();
        let commits = self.shared.tracker().take_commits();
        if !commits.is_empty() {
            // Async: a synchronous commit would hold this thread for as
            // long as the broker takes to answer, past the deadline.
            // Closing the consumer waits for it, within the deadline.
            let commits = self.shared.commit_list(&self.topic, &commits);
            if let Err(err) = self.consumer.commit(&commits, CommitMode::Async) {
                tracing::warn!(%err, "final commit failed; the next owner re-reads the last batches");
            }
        }
        Leftover {
            buffered: self.batcher.buffered(),
            batches: unfinished,
        }
    }
}

/// Copies a message out of librdkafka's buffer (a batch outlives the poll).
fn detach(topic: &Arc<str>, message: &BorrowedMessage<'_>) -> Record {
    Record {
        topic: Arc::clone(topic),
        partition: message.partition(),
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        // Copied as bytes: reading keys as strings (Headers::iter) panics
        // on a key that is not UTF-8, which any producer may send.
        headers: message.headers().map(BorrowedHeaders::detach),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// Writes one batch: dead letters first (a sink that stores offsets moves
/// past them in the same write), then the sink, then its own rejections.
/// Retries until each step succeeds, then marks the offsets done.
async fn write_batch<S: Sink>(
    sink: Arc<S>,
    dlq: Arc<DeadLetters>,
    shared: Arc<Shared>,
    health: Arc<Health>,
    batch_id: BatchId,
    work: Work<S::Item>,
) {
    let started = Instant::now();
    if !work.dead_letters.is_empty() {
        let letters: Vec<(&Record, &Rejection)> =
            work.dead_letters.iter().map(|(r, why)| (r, why)).collect();
        retry::until_ok("dead_letter", || dlq.send(&letters), &health).await;
    }
    let outcome = retry::until_ok(
        "write",
        || {
            shared.writes.fetch_add(1, Ordering::Relaxed);
            sink.write(&work.batch)
        },
        &health,
    )
    .await;
    health.set_sink_ok(true);
    if !outcome.rejected.is_empty() {
        let letters: Vec<(&Record, &Rejection)> = outcome
            .rejected
            .iter()
            .filter_map(|(index, why)| {
                let entry = work.batch.entries.get(*index);
                if entry.is_none() {
                    tracing::error!(index, reason = %why.reason, "the sink rejected an entry that is not in the batch (a sink bug)");
                }
                entry.map(|e| (&e.record, why))
            })
            .collect();
        retry::until_ok("dead_letter", || dlq.send(&letters), &health).await;
    }
    // Counted here, not where the loop seeks: a refused batch of a partition
    // this consumer has lost meanwhile (a stale consumer) needs no seek, but
    // is exactly what an operator wants to see counted.
    for (partition, stored) in &outcome.already_applied {
        metrics::counter!(m::ALREADY_APPLIED, "topic" => work.batch.topic.to_string()).increment(1);
        tracing::info!(
            partition,
            stored,
            "the sink already holds this batch's records: not applied again"
        );
    }
    metrics::counter!(m::BATCHES, "topic" => work.batch.topic.to_string()).increment(1);
    metrics::histogram!(m::BATCH_DURATION).record(started.elapsed().as_secs_f64());
    metrics::histogram!(m::BATCH_EVENTS).record(work.len() as f64);
    shared
        .tracker()
        .complete(batch_id, &outcome.already_applied);
    shared.batch_done.notify_all();
    health.batch_done(Instant::now());
}

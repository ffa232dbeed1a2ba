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
//!   once; a task retries until the sink accepts and the dead-letter topic
//!   took the batch's letters (sent before the write for a sink that stores
//!   offsets, beside it otherwise), then acknowledges the batch (`Shared::acknowledge`, the one way
//!   offsets become committable) to the [`OffsetTracker`], the one owner
//!   of offset state, which the loop and the rebalance callbacks only
//!   change through its methods;
//! - when sealed batches pile up (the sink is behind or down), the assignment
//!   is paused but polling goes on, so the consumer stays in its group;
//! - rebalances run inside `recv()`: a revoke waits (bounded) for in-flight
//!   batches of the revoked partitions and commits what they acknowledged; an
//!   assignment starts each partition where the sink says it stands.
//!
//! Rooms: this file holds the shared state, start-up and one turn of the
//! loop; `intake.rs` takes records into the batcher; `writer.rs` writes a
//! batch (and probes the sink while idle); `staged.rs` records and
//! publishes a batch's staged write; `commit.rs` seeks and commits at
//! the end of each turn and at shutdown; `assignment.rs` is the rebalance
//! callbacks. The pure parts are crate modules: [`crate::batch`],
//! [`crate::offsets`], [`crate::flow`], [`crate::starts`].

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
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
use crate::offsets::{BatchId, OffsetTracker, Skip, Stage};
use crate::retry;
use crate::sink::{PartitionRange, Record, Rejection, Sink, SinkError, Staged};
use crate::stall::{Change, Observation, StallWatch};
use crate::starts::{self, offsets_list, BeyondLogEnd};

mod assignment;
mod commit;
mod intake;
mod staged;
mod writer;

use intake::detach;
use writer::{probe_sink, write_batch};

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
    /// Assigned partitions refused: they start beyond their log's end (not
    /// in the tracker), or their log went back while read (in the tracker,
    /// marked refused).
    refused: Mutex<std::collections::BTreeSet<i32>>,
    stalls: Mutex<StallWatch>,
    /// Held while a staged write is recorded in Kafka, and by a revoke
    /// before it lets partitions go (see `writer::StagedWrite`).
    staging: Mutex<()>,
    /// Set once the broker was checked to keep commit metadata.
    metadata_checked: AtomicBool,
}

impl Shared {
    fn new(stall_timeout: Duration) -> Self {
        Self {
            tracker: Mutex::new(OffsetTracker::default()),
            batch_done: Condvar::new(),
            closing: AtomicBool::new(false),
            rebalances: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            taking: AtomicBool::new(true),
            last_error: Mutex::new(None),
            refused: Mutex::new(std::collections::BTreeSet::new()),
            stalls: Mutex::new(StallWatch::new(stall_timeout)),
            staging: Mutex::new(()),
            metadata_checked: AtomicBool::new(false),
        }
    }

    fn tracker(&self) -> MutexGuard<'_, OffsetTracker> {
        lock(&self.tracker)
    }

    /// The acknowledgement path, and its only way in: batch `batch_id` is
    /// durably done (its dead letters accepted, its records written or
    /// already held by the sink as `already_applied` says). From here on
    /// its offsets may be committed, by the loop's next turn
    /// (`commit.rs`) or by a revoke waiting for it (`assignment.rs`),
    /// which this wakes.
    fn acknowledge(&self, batch_id: BatchId, already_applied: &[(i32, i64)]) {
        self.tracker().complete(batch_id, already_applied);
        self.batch_done.notify_all();
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
    /// Where a partition the group never committed starts
    /// ([`starts::never_committed_start`]).
    never_committed_start: Option<Offset>,
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
    let shared = Arc::new(Shared::new(args.stall_timeout()));
    let consumer_config = args.consumer_config();
    let context = LoopContext {
        shared: Arc::clone(&shared),
        sink: Arc::clone(&sink),
        topic: Arc::clone(&topic),
        health: Arc::clone(&health),
        drain_timeout: crate::drain_timeout(args.session_timeout_ms),
        reset_to: args.reset_offsets_beyond_log_end,
        never_committed_start: starts::never_committed_start(
            consumer_config.get("auto.offset.reset"),
        ),
    };
    let consumer: StreamConsumer<LoopContext<S>> =
        kafka_config_context(consumer_config.create_with_context(context), "consumer")?;
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
        batcher: {
            let batcher = Batcher::new(Arc::clone(&topic), args.batch_limits());
            if sink.rejects_at_write() {
                batcher
            } else {
                batcher.dropping_decoded_payloads()
            }
        },
        max_in_flight: sink.max_in_flight().max(1),
        consumer: Arc::new(consumer),
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

/// `commits` as librdkafka takes them, each carrying the record of a staged
/// write made at its offset ([`OffsetTracker::metadata_at`]): a commit
/// without it would erase the record while its write may still be
/// published.
fn commit_list(topic: &str, commits: &[(i32, i64)], tracker: &OffsetTracker) -> TopicPartitionList {
    let list = offsets_list(topic, commits);
    for (partition, offset) in commits {
        if let (Some(metadata), Some(mut entry)) = (
            tracker.metadata_at(*partition, *offset),
            list.find_partition(topic, *partition),
        ) {
            entry.set_metadata(metadata);
        }
    }
    list
}

/// What shutdown could not write before its deadline.
struct Leftover {
    buffered: usize,
    batches: usize,
}

struct Loop<S: Sink> {
    /// Shared with the writers only as `Weak` (they record staged writes),
    /// so dropping this closes the consumer.
    consumer: Arc<StreamConsumer<LoopContext<S>>>,
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
                Arc::downgrade(&self.consumer),
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
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

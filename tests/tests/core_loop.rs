//! The shared consume loop against the real broker, with a recording sink.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use e2e::broker::{Broker, Mock};
use e2e::metrics::Scrape;
use e2e::service::ServiceFlags;
use e2e::{
    free_port, kafka, poll_until, ready, unique, wait_for, wait_for_async, Check, Stack, PARTITIONS,
};
use rdkafka::producer::FutureProducer;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use sink_core::config::try_parse_args_from;
use sink_core::metrics::{PARTITION_REFUSED, PARTITION_STALLED, RETRIES};
use sink_core::{
    Batch, ConsumerArgs, PartitionRange, Record, Rejection, ServiceDefaults, Sink, SinkError,
    WriteOutcome,
};
use tokio::sync::oneshot;

const TIMEOUT: Duration = Duration::from_secs(60);

/// What the sink saw: (partition, offset, payload) in write order.
type Seen = Arc<Mutex<Vec<(i32, i64, String)>>>;

/// What `Sink::stored_offsets` returns.
type StoredOffsets = Result<Vec<Option<i64>>, SinkError>;

/// What a [`RecordingSink`] shares with its test.
#[derive(Clone, Default)]
struct Shared {
    seen: Seen,
    /// Each batch's ranges, as `Sink::dispatched` reported them.
    dispatched: Arc<Mutex<Vec<Vec<PartitionRange>>>>,
    /// Write attempts so far.
    writes: Arc<AtomicUsize>,
    /// Fails every write while set (an outage).
    down: Arc<AtomicBool>,
    /// Partitions assigned so far (asked for their stored offsets).
    assigned: Arc<Mutex<Vec<i32>>>,
    /// Offsets reset by the loop; they replace `stored`.
    resets: Arc<Mutex<BTreeMap<i32, i64>>>,
}

/// Accepts everything except payloads starting with "BAD" (rejected at
/// decode) and "REFUSE" (rejected at write); fails its first `fail_first`
/// writes; can claim partitions are already applied up to an offset; writes
/// `in_flight` batches at once (1 by default: with more, batches may finish
/// in any order, and only the commits stay in order).
#[derive(Default)]
struct RecordingSink {
    shared: Shared,
    fail_first: AtomicUsize,
    stored: BTreeMap<i32, i64>,
    in_flight: usize,
    /// Fails its first resets (the sink did not answer).
    fail_resets: AtomicUsize,
    /// Writes a batch while its dead letters are sent, as a sink whose
    /// offsets only Kafka commits may (`Sink::dead_letters_first`).
    letters_beside_write: bool,
}

impl RecordingSink {
    /// A sink down (failing every write) from the start.
    fn down() -> Self {
        let sink = Self::default();
        sink.shared.down.store(true, Ordering::SeqCst);
        sink
    }

    fn stored(&self, partition: i32) -> Option<i64> {
        let reset = self.shared.resets.lock().ok()?.get(&partition).copied();
        reset.or_else(|| self.stored.get(&partition).copied())
    }
}

/// Locks a test sink's state (poisoned: a transient failure).
fn lock<T>(mutex: &Mutex<T>) -> Result<MutexGuard<'_, T>, SinkError> {
    mutex
        .lock()
        .map_err(|_| SinkError::transient("poisoned", anyhow::anyhow!("lock")))
}

/// Whether `counter` had failures left to inject (and takes one).
fn take_failure(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// An injected `what` ("outage", "failure"), transient.
fn injected(what: &str) -> SinkError {
    SinkError::transient("test_outage", anyhow::anyhow!("injected {what}"))
}

impl Sink for RecordingSink {
    type Item = String;

    fn decode(&self, record: &Record) -> Result<String, Rejection> {
        let text = String::from_utf8_lossy(&record.payload).into_owned();
        if text.starts_with("BAD") {
            return Err(Rejection::new(
                "bad_test_payload",
                format!("payload {text} is bad"),
            ));
        }
        Ok(text)
    }

    fn dispatched(&self, batch: &Batch<String>) {
        if let Ok(mut dispatched) = self.shared.dispatched.lock() {
            dispatched.push(batch.ranges.clone());
        }
    }

    async fn write(&self, batch: &Batch<String>) -> Result<WriteOutcome, SinkError> {
        self.shared.writes.fetch_add(1, Ordering::SeqCst);
        if self.shared.down.load(Ordering::SeqCst) {
            return Err(injected("outage"));
        }
        if take_failure(&self.fail_first) {
            return Err(injected("failure"));
        }
        let mut outcome = WriteOutcome::default();
        let mut seen = lock(&self.shared.seen)?;
        for range in &batch.ranges {
            if let Some(stored) = self.stored(range.partition) {
                if range.first < stored {
                    outcome.already_applied.push((range.partition, stored));
                }
            }
        }
        for (index, entry) in batch.entries.iter().enumerate() {
            let partition = entry.record.partition;
            if outcome.already_applied.iter().any(|(p, _)| *p == partition) {
                continue;
            }
            if entry.item.starts_with("REFUSE") {
                outcome
                    .rejected
                    .push((index, Rejection::new("refused", "sink refused it")));
                continue;
            }
            seen.push((partition, entry.record.offset, entry.item.clone()));
        }
        Ok(outcome)
    }

    async fn stored_offsets(&self, _topic: &str, partitions: &[i32]) -> StoredOffsets {
        if let Ok(mut assigned) = self.shared.assigned.lock() {
            assigned.extend(partitions);
        }
        Ok(partitions.iter().map(|p| self.stored(*p)).collect())
    }

    async fn reset_stored_offsets(
        &self,
        _topic: &str,
        resets: &[(i32, i64, i64)],
    ) -> Result<(), SinkError> {
        if take_failure(&self.fail_resets) {
            return Err(injected("failure"));
        }
        let mut done = lock(&self.shared.resets)?;
        done.extend(resets.iter().map(|(partition, _, to)| (*partition, *to)));
        Ok(())
    }

    fn max_in_flight(&self) -> usize {
        self.in_flight.max(1)
    }

    fn dead_letters_first(&self) -> bool {
        !self.letters_beside_write
    }
}

/// The consumer arguments of `flags`, parsed in this process.
fn consumer_args(flags: &ServiceFlags) -> anyhow::Result<ConsumerArgs> {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        consumer: ConsumerArgs,
    }
    let defaults = ServiceDefaults {
        topic: "unused",
        group_id: "unused",
        batch_max_events: 500,
        batch_max_bytes: 1 << 20,
        batch_linger_ms: 50,
        prefetch_kbytes: 4_096,
    };
    let argv = std::iter::once("test".to_owned()).chain(flags.args());
    Ok(try_parse_args_from::<Cli, _, _>(&defaults, argv)?.consumer)
}

/// A consumer running in the background until `stop` is called.
struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    fn start(args: ConsumerArgs, sink: impl Sink) -> Self {
        sink_core::telemetry::init(sink_core::telemetry::LogFormat::Pretty);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            sink_core::run(&args, sink, async {
                let _ = stopped.await;
            })
            .await
        });
        Self {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the consumer and returns how its run ended (once; later calls
    /// do nothing).
    async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.context("consumer task")?,
            None => Ok(()),
        }
    }
}

/// A test's topic and its dead-letter topic on a broker, the group its
/// consumers share, a producer, and a reader of the group's commits.
struct Setup {
    broker: Broker,
    topic: String,
    group: String,
    producer: FutureProducer,
    offsets: kafka::OffsetReader,
}

impl Setup {
    /// On the stack's tansu.
    async fn on_tansu() -> anyhow::Result<Self> {
        Self::on(Broker::tansu(&Stack::get()?), "core").await
    }

    /// On librdkafka's mock cluster (one broker, in this process), the topic
    /// named after `prefix`.
    async fn on_mock(prefix: &str) -> anyhow::Result<Self> {
        Self::on(Broker::mock_cluster(1)?, prefix).await
    }

    async fn on(broker: Broker, prefix: &str) -> anyhow::Result<Self> {
        let topic = broker.topic_with_dlq(prefix).await?;
        let group = unique("group");
        let producer = broker.producer()?;
        let offsets = kafka::OffsetReader::new(broker.bootstrap(), &group, &topic, PARTITIONS)?;
        Ok(Self {
            broker,
            topic,
            group,
            producer,
            offsets,
        })
    }

    /// The mock cluster, to inject faults.
    fn faults(&self) -> anyhow::Result<Rc<Mock>> {
        self.broker.mock().context("faults need the mock cluster")
    }

    /// Arguments of a consumer of the topic in the group: the tests' flags,
    /// /metrics on `metrics_port` if given, and `extra`.
    fn args(&self, metrics_port: Option<u16>, extra: &[&str]) -> anyhow::Result<ConsumerArgs> {
        let flags =
            ServiceFlags::consumer("test", self.broker.bootstrap(), &self.topic, &self.group)
                .for_tests();
        let flags = match metrics_port {
            Some(port) => flags.metrics_port(port),
            None => flags,
        };
        consumer_args(&flags.extra(extra))
    }

    /// Starts a consumer of the topic in the group with `sink`, /metrics on
    /// a free port, and `extra` flags.
    fn start(&self, sink: RecordingSink, extra: &[&str]) -> anyhow::Result<Consumer> {
        let port = free_port()?;
        let shared = sink.shared.clone();
        let running = Running::start(self.args(Some(port), extra)?, sink);
        Ok(Consumer {
            running,
            sink: shared,
            port,
            topic: self.topic.clone(),
        })
    }

    /// Produces `records` (partition, payload) to the topic.
    async fn produce(
        &self,
        records: impl IntoIterator<Item = (i32, Vec<u8>)>,
    ) -> anyhow::Result<()> {
        kafka::produce(&self.producer, &self.topic, records).await
    }

    /// The group's committed offset per partition.
    fn committed(&self) -> anyhow::Result<Vec<Option<i64>>> {
        self.offsets.committed()
    }

    /// Waits until the group's committed offsets are `expected`.
    async fn wait_for_committed(&self, what: &str, expected: &[Option<i64>]) -> anyhow::Result<()> {
        poll_until(TIMEOUT, Duration::from_millis(50), what, || {
            let check = match self.committed() {
                Ok(committed) if committed == expected => Check::Done(()),
                Ok(committed) => {
                    Check::NotYet(format!("committed {committed:?}, expected {expected:?}"))
                }
                Err(err) => Check::NotYet(format!("{err:#}, expected {expected:?}")),
            };
            std::future::ready(Ok(check))
        })
        .await
    }

    /// The first `count` dead letters of the topic.
    fn dead_letters(&self, count: usize) -> anyhow::Result<Vec<kafka::ReadMessage>> {
        let dlq = format!("{}.dlq", self.topic);
        kafka::read_messages(self.broker.bootstrap(), &dlq, count, TIMEOUT)
    }
}

/// A consumer of a [`Setup`]'s topic running in this process with a
/// [`RecordingSink`], /metrics on `port`.
struct Consumer {
    running: Running,
    /// What its sink shares.
    sink: Shared,
    port: u16,
    topic: String,
}

impl Consumer {
    async fn stop(&mut self) -> anyhow::Result<()> {
        self.running.stop().await
    }

    /// How many events the sink took.
    fn len(&self) -> usize {
        self.sink.seen.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// The events the sink took, in write order.
    fn seen(&self) -> anyhow::Result<Vec<(i32, i64, String)>> {
        Ok(self
            .sink
            .seen
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone())
    }

    /// Waits until the sink took `n` events (`what`).
    async fn wait_seen(&self, what: &str, n: usize) -> anyhow::Result<()> {
        self.wait_seen_within(TIMEOUT, what, n).await
    }

    async fn wait_seen_within(
        &self,
        timeout: Duration,
        what: &str,
        n: usize,
    ) -> anyhow::Result<()> {
        wait_for(timeout, what, || self.len() >= n).await
    }

    async fn ready(&self) -> anyhow::Result<bool> {
        ready(self.port).await
    }

    /// Waits until readiness is `expected` (`what`).
    async fn wait_ready(&self, what: &str, expected: bool) -> anyhow::Result<()> {
        wait_for_async(TIMEOUT, what, || async move {
            Ok(self.ready().await? == expected)
        })
        .await
    }

    /// Reads readiness every `every` for `span`: fails with `why` the first
    /// time it is not `expected`.
    async fn hold_readiness(
        &self,
        expected: bool,
        span: Duration,
        every: Duration,
        why: &str,
    ) -> anyhow::Result<()> {
        let until = Instant::now() + span;
        while Instant::now() < until {
            anyhow::ensure!(
                self.ready().await? == expected,
                "{why} (stalled: {:?})",
                self.stalled_partitions().await?
            );
            tokio::time::sleep(every).await;
        }
        Ok(())
    }

    /// Whether /healthz passes (`None` while nothing listens).
    async fn live(&self) -> Option<bool> {
        let response = reqwest::get(format!("http://127.0.0.1:{}/healthz", self.port)).await;
        response.ok().map(|r| r.status().is_success())
    }

    /// Waits until /healthz answers `expected` (`what`).
    async fn wait_live(&self, what: &str, expected: bool) -> anyhow::Result<()> {
        wait_for_async(TIMEOUT, what, || async move {
            Ok(self.live().await == Some(expected))
        })
        .await
    }

    /// The labels of the topic's partitions whose stalled gauge is 1.
    async fn stalled_partitions(&self) -> anyhow::Result<Vec<String>> {
        let scrape = Scrape::from_port(self.port).await?;
        Ok(scrape
            .matching(PARTITION_STALLED, &[("topic", &self.topic)])
            .iter()
            .filter(|s| s.value == 1.0)
            .map(|s| s.labels.to_owned())
            .collect())
    }

    /// Waits until /metrics says `partition` of the topic is refused.
    async fn wait_for_refused(&self, partition: i32) -> anyhow::Result<()> {
        let partition = partition.to_string();
        let labels = [("topic", self.topic.as_str()), ("partition", &partition)];
        let what = format!("partition {partition} refused on /metrics");
        wait_for_async(TIMEOUT, &what, || async move {
            let scrape = Scrape::or_empty(self.port).await;
            Ok(scrape
                .matching(PARTITION_REFUSED, &labels)
                .iter()
                .any(|s| s.value == 1.0))
        })
        .await
    }

    /// Whether /metrics counts at least 3 dead-letter retries of `kind`
    /// (false while nothing listens).
    async fn dead_letter_retries(&self, kind: &str) -> anyhow::Result<bool> {
        let scrape = Scrape::or_empty(self.port).await;
        Ok(scrape
            .matching(RETRIES, &[("operation", "dead_letter"), ("kind", kind)])
            .iter()
            .any(|s| s.value >= 3.0))
    }
}

/// `<prefix>-<i>` for each `i` of `range`, to partition `i % PARTITIONS`.
fn spread<P: Display>(prefix: P, range: Range<i32>) -> impl Iterator<Item = (i32, Vec<u8>)> {
    range.map(move |i| (i % PARTITIONS, format!("{prefix}-{i}").into_bytes()))
}

/// `payloads`, in this order, to `partition`.
fn to_partition<'a>(
    partition: i32,
    payloads: &'a [&str],
) -> impl Iterator<Item = (i32, Vec<u8>)> + 'a {
    payloads
        .iter()
        .map(move |p| (partition, p.as_bytes().to_vec()))
}

/// 10 events to partition 0 and 5 to partition 1.
fn ten_and_five() -> impl Iterator<Item = (i32, Vec<u8>)> {
    (0..15).map(|i| (i32::from(i >= 10), format!("event-{i}").into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_once_in_partition_order_then_committed() -> anyhow::Result<()> {
    let setup = Setup::on_tansu().await?;
    let n = 10_000;
    setup.produce(spread("event", 0..n)).await?;

    let mut consumer = setup.start(RecordingSink::default(), &[])?;
    consumer.wait_seen("all 10,000 events", n as usize).await?;
    consumer.stop().await?;

    // Sink::dispatched saw every batch in offset order: per partition, the
    // ranges chain from 0 to the end without a hole or an overlap (what a
    // sink writing several batches at once orders its writes by).
    let dispatched = consumer
        .sink
        .dispatched
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    for p in 0..PARTITIONS {
        let ranges: Vec<(i64, i64)> = dispatched
            .iter()
            .flatten()
            .filter(|r| r.partition == p)
            .map(|r| (r.first, r.next))
            .collect();
        let mut at = 0;
        for &(first, next) in &ranges {
            assert_eq!(first, at, "partition {p}: dispatched ranges {ranges:?}");
            at = next;
        }
        let produced = (0..n).filter(|i| i % PARTITIONS == p).count() as i64;
        assert_eq!(at, produced, "partition {p}: dispatched ranges {ranges:?}");
    }

    let seen = consumer.seen()?;
    assert_eq!(seen.len(), n as usize, "each event exactly once");
    for p in 0..PARTITIONS {
        let payloads: Vec<&str> = seen
            .iter()
            .filter(|(q, _, _)| *q == p)
            .map(|(_, _, s)| s.as_str())
            .collect();
        let expected: Vec<String> = (0..n)
            .filter(|i| i % PARTITIONS == p)
            .map(|i| format!("event-{i}"))
            .collect();
        let first_difference = payloads.iter().zip(&expected).position(|(a, b)| a != b);
        assert!(
            payloads.len() == expected.len() && first_difference.is_none(),
            "partition {p}: {} events seen, {} expected, first difference at {first_difference:?}: {:?}",
            payloads.len(),
            expected.len(),
            first_difference.map(|i| (&payloads[i.saturating_sub(2)..(i + 3).min(payloads.len())], &expected[i.saturating_sub(2)..(i + 3).min(expected.len())])),
        );
    }
    let expected: Vec<Option<i64>> = (0..PARTITIONS)
        .map(|p| Some(((0..n).filter(|i| i % PARTITIONS == p).count()) as i64))
        .collect();
    assert_eq!(
        setup.committed()?,
        expected,
        "offsets committed after the sink took everything"
    );

    // The same group again: only what is produced now arrives.
    let mut consumer = setup.start(RecordingSink::default(), &[])?;
    setup.produce(spread("late", 0..PARTITIONS)).await?;
    consumer.wait_seen("the 3 late events", 3).await?;
    consumer.stop().await?;
    let mut payloads: Vec<String> = consumer.seen()?.into_iter().map(|s| s.2).collect();
    payloads.sort();
    assert_eq!(
        payloads,
        vec!["late-0", "late-1", "late-2"],
        "nothing already committed came back"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_sink_gets_everything_later_and_nothing_is_committed_before() -> anyhow::Result<()>
{
    let setup = Setup::on_tansu().await?;
    let n = 900;
    setup.produce(spread("event", 0..n)).await?;

    let fail_first = 4;
    let sink = RecordingSink {
        fail_first: AtomicUsize::new(fail_first),
        in_flight: 3,
        ..RecordingSink::default()
    };
    let mut consumer = setup.start(sink, &[])?;
    consumer
        .wait_seen("every event after the outage", n as usize)
        .await?;
    consumer.stop().await?;
    let mut offsets: Vec<(i32, i64)> = consumer.seen()?.iter().map(|s| (s.0, s.1)).collect();
    let total = offsets.len();
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(
        (total, offsets.len()),
        (n as usize, n as usize),
        "every event, none twice"
    );
    assert_eq!(setup.committed()?, vec![Some(300); 3]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_committed_past_what_the_sink_has_not_accepted() -> anyhow::Result<()> {
    // Commits are flowing (partition 0 committed), then the sink fails every
    // write for a while: neither partition 0's new records nor partition 1's
    // may be committed until the sink accepts them.
    let setup = Setup::on_tansu().await?;
    let records = |partition: i32, from: usize| {
        (from..from + 300).map(move |i| (partition, format!("event-{partition}-{i}").into_bytes()))
    };
    let mut consumer = setup.start(RecordingSink::default(), &[])?;
    setup.produce(records(0, 0)).await?;
    setup
        .wait_for_committed("committed offsets", &[Some(300), None, None])
        .await?;

    consumer.sink.down.store(true, Ordering::SeqCst);
    let attempts = consumer.sink.writes.load(Ordering::SeqCst);
    setup.produce(records(0, 300).chain(records(1, 0))).await?;
    wait_for(TIMEOUT, "three failed write attempts", || {
        consumer.sink.writes.load(Ordering::SeqCst) >= attempts + 3
    })
    .await?;
    assert_eq!(
        setup.committed()?,
        vec![Some(300), None, None],
        "committed records the sink had not accepted"
    );
    assert_eq!(consumer.len(), 300);

    consumer.sink.down.store(false, Ordering::SeqCst);
    setup
        .wait_for_committed("committed offsets", &[Some(600), Some(300), None])
        .await?;
    assert_eq!(consumer.len(), 900, "every record once");
    consumer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_records_land_in_the_dlq_with_headers() -> anyhow::Result<()> {
    let setup = Setup::on_tansu().await?;
    let payloads = ["ok-1", "BAD-1", "ok-2", "REFUSE-1", "ok-3", "BAD-2"];
    setup.produce(to_partition(1, &payloads)).await?;

    let mut consumer = setup.start(RecordingSink::default(), &[])?;
    consumer.wait_seen("the 3 good events", 3).await?;
    setup
        .wait_for_committed("committed offsets", &[None, Some(6), None])
        .await?;
    consumer.stop().await?;

    let letters = setup.dead_letters(3)?;
    let mut by_payload: BTreeMap<String, &kafka::ReadMessage> = BTreeMap::new();
    for letter in &letters {
        by_payload.insert(
            String::from_utf8_lossy(&letter.payload).into_owned(),
            letter,
        );
    }
    assert_eq!(
        by_payload.keys().collect::<Vec<_>>(),
        vec!["BAD-1", "BAD-2", "REFUSE-1"]
    );
    let bad = by_payload["BAD-1"];
    assert_eq!(bad.headers["error"], "payload BAD-1 is bad");
    assert_eq!(bad.headers["error.code"], "bad_test_payload");
    assert_eq!(bad.headers["source.topic"], setup.topic);
    assert_eq!(bad.headers["source.partition"], "1");
    assert_eq!(bad.headers["source.offset"], "1");
    assert!(bad.headers["failed.at"].ends_with('Z'), "{:?}", bad.headers);
    assert_eq!(by_payload["REFUSE-1"].headers["error"], "sink refused it");
    assert_eq!(by_payload["REFUSE-1"].headers["source.offset"], "3");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_the_topic_goes_with_its_payload_cut() -> anyhow::Result<()> {
    let setup = Setup::on_tansu().await?;
    let big = format!("BAD-{}", "x".repeat(100_000));
    setup
        .produce(to_partition(2, &["ok-1", big.as_str(), "ok-2"]))
        .await?;

    // The dead-letter producer accepts at most 20,000 bytes, as a topic
    // with a smaller max.message.bytes than its source would.
    let mut consumer = setup.start(
        RecordingSink::default(),
        &["--kafka-option", "message.max.bytes=20000"],
    )?;
    consumer.wait_seen("the 2 good events", 2).await?;
    setup
        .wait_for_committed("committed offsets", &[None, None, Some(3)])
        .await?;
    consumer.stop().await?;

    let letters = setup.dead_letters(1)?;
    let letter = &letters[0];
    assert_eq!(letter.headers["payload.truncated"], big.len().to_string());
    assert_eq!(letter.headers["source.offset"], "1");
    assert_eq!(letter.headers["error.code"], "bad_test_payload");
    // The test sink's reason quotes the payload: cut to 1 KB with it.
    assert!(letter.headers["error"].starts_with("payload BAD-xxx"));
    assert_eq!(letter.headers["error"].len(), 1_024);
    assert_eq!(
        letter.payload,
        big.as_bytes()[..sink_core::dlq::TRUNCATED_PAYLOAD_BYTES].to_vec()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_stores_offsets_decides_where_partitions_start() -> anyhow::Result<()> {
    let setup = Setup::on_tansu().await?;
    setup.produce(spread("event", 0..30)).await?;

    // Partition 0 already applied up to offset 4, partition 2 up to 10 (all of it).
    let sink = RecordingSink {
        stored: BTreeMap::from([(0, 4), (2, 10)]),
        ..RecordingSink::default()
    };
    let mut consumer = setup.start(sink, &[])?;
    setup
        .wait_for_committed("committed offsets", &[Some(10), Some(10), None])
        .await?;
    consumer.stop().await?;
    let mut got: Vec<(i32, i64)> = consumer.seen()?.iter().map(|s| (s.0, s.1)).collect();
    got.sort_unstable();
    let expected: Vec<(i32, i64)> = (4..10)
        .map(|o| (0, o))
        .chain((0..10).map(|o| (1, o)))
        .collect();
    assert_eq!(
        got, expected,
        "partition 0 from 4, partition 1 from the start, partition 2 nothing"
    );
    Ok(())
}

/// The assignment strategies a group may use: incremental (the default) and
/// eager, as `--kafka-option` flags.
const COOPERATIVE: &[&str] = &[];
const EAGER: &[&str] = &["--kafka-option", "partition.assignment.strategy=range"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_consumer_resumes_after_a_cooperative_rebalance() -> anyhow::Result<()> {
    a_paused_consumer_resumes_after_a_rebalance(COOPERATIVE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_consumer_resumes_after_an_eager_rebalance() -> anyhow::Result<()> {
    a_paused_consumer_resumes_after_a_rebalance(EAGER).await
}

/// The sink is down long enough for the loop to pause its assignment, with
/// the backlog in partition 0; meanwhile a second consumer joins and takes
/// partition 0. librdkafka keeps an application's pause across revoke and
/// re-assign, and a cooperative rebalance leaves the partitions a consumer
/// keeps untouched: unless the loop resumes them all, they stall forever.
/// (With partition 0 gone, the loop is no longer behind: the paused flag
/// must still be true for it to resume.)
async fn a_paused_consumer_resumes_after_a_rebalance(strategy: &[&str]) -> anyhow::Result<()> {
    let setup = Setup::on_tansu().await?;
    let backlog = 30_000;
    setup
        .produce((0..backlog).map(|i| (0, format!("event-{i}").into_bytes())))
        .await?;

    let mut first = setup.start(RecordingSink::down(), strategy)?;
    // Past the loop's 5 s hold: it has paused by now.
    wait_for(TIMEOUT, "the outage to begin", || {
        first.sink.writes.load(Ordering::SeqCst) > 0
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut second = setup.start(RecordingSink::default(), strategy)?;
    wait_for(TIMEOUT, "the second consumer's partitions", || {
        second.sink.assigned.lock().is_ok_and(|a| !a.is_empty())
    })
    .await?;
    let more = 3_000;
    setup.produce(spread("more", 0..more)).await?;
    first.sink.down.store(false, Ordering::SeqCst);
    let n = (backlog + more) as usize;
    wait_for(
        Duration::from_secs(120),
        "every event, in one consumer or the other",
        || first.len() + second.len() >= n,
    )
    .await?;
    second.stop().await?;
    first.stop().await?;
    let mut offsets: Vec<(i32, i64)> = Vec::new();
    for consumer in [&first, &second] {
        offsets.extend(consumer.seen()?.iter().map(|e| (e.0, e.1)));
    }
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(offsets.len(), n, "every offset at least once");
    Ok(())
}

/// A sink that keeps its own offsets, like redis-sink's fence: a batch
/// applies only where the partition stands. Every third batch it reports
/// that it already holds the first half of the batch (as a sink whose
/// stored offset another writer moved would), so the loop seeks back into
/// records it has already fetched, again and again, while records keep
/// arriving.
#[derive(Default)]
struct FencedSink {
    state: Arc<Mutex<FenceState>>,
}

#[derive(Default)]
struct FenceState {
    /// Next offset to apply, per partition.
    stored: BTreeMap<i32, i64>,
    /// The offset of every record the sink holds, per partition, in the
    /// order taken.
    held: BTreeMap<i32, Vec<i64>>,
    writes: u64,
}

impl Sink for FencedSink {
    type Item = ();

    fn decode(&self, _record: &Record) -> Result<(), Rejection> {
        Ok(())
    }

    async fn write(&self, batch: &Batch<()>) -> Result<WriteOutcome, SinkError> {
        // Finish at scattered moments, so that completions land while the
        // loop is between receiving a record and taking it.
        tokio::time::sleep(Duration::from_micros(u64::from(
            rand::random::<u16>() % 500,
        )))
        .await;
        let mut state = lock(&self.state)?;
        state.writes += 1;
        let claim_half = state.writes % 3 == 0;
        let mut outcome = WriteOutcome::default();
        for range in &batch.ranges {
            let stored = *state.stored.get(&range.partition).unwrap_or(&0);
            if stored != range.first {
                outcome.already_applied.push((range.partition, stored));
                continue;
            }
            let mid = range.first + (range.next - range.first) / 2;
            let upto = if claim_half && mid > range.first {
                outcome.already_applied.push((range.partition, mid));
                mid
            } else {
                range.next
            };
            let offsets = batch
                .entries
                .iter()
                .map(|e| &e.record)
                .filter(|r| r.partition == range.partition && r.offset < upto)
                .map(|r| r.offset);
            state
                .held
                .entry(range.partition)
                .or_default()
                .extend(offsets);
            state.stored.insert(range.partition, upto);
        }
        Ok(outcome)
    }

    async fn stored_offsets(&self, _topic: &str, partitions: &[i32]) -> StoredOffsets {
        let state = lock(&self.state)?;
        Ok(partitions
            .iter()
            .map(|p| state.stored.get(p).copied())
            .collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seek_never_skips_records_fetched_before_it() -> anyhow::Result<()> {
    // Records keep arriving while the sink makes the loop seek back over and
    // over: a record the loop had already fetched when a seek was decided
    // must not be taken as the first record after it, or the records in
    // between are dropped as stale and never reach the sink.
    let setup = Setup::on_mock("seek").await?;
    let args = setup.args(None, &["--batch-max-events", "7", "--batch-linger-ms", "1"])?;
    let sink = FencedSink::default();
    let state = Arc::clone(&sink.state);
    let mut running = Running::start(args, sink);
    // In small chunks, so that records keep arriving while the loop seeks.
    let (chunks, per_chunk) = (600, 30);
    for chunk in 0..chunks {
        setup.produce(spread(chunk, 0..per_chunk)).await?;
    }
    let per_partition = i64::from(chunks * per_chunk / PARTITIONS);
    let stored = || {
        state
            .lock()
            .map(|s| s.stored.values().copied().collect::<Vec<i64>>())
            .unwrap_or_default()
    };
    let result = wait_for(TIMEOUT, "every record held by the sink", || {
        stored() == vec![per_partition; PARTITIONS as usize]
    })
    .await;
    running.stop().await?;
    let state = state.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    for (partition, held) in &state.held {
        let expected: Vec<i64> = (0..per_partition).collect();
        let first_difference = held.iter().zip(&expected).position(|(a, b)| a != b);
        assert!(
            first_difference.is_none() && held.len() == expected.len(),
            "partition {partition}: the sink holds {} records, first difference at {first_difference:?}",
            held.len()
        );
    }
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_stops_advancing_shows_and_recovers() -> anyhow::Result<()> {
    // Records wait in the log but every fetch fails (as when a record batch
    // cannot be read): the stalled partitions show in a metric and in
    // readiness, and once fetches succeed again everything arrives.
    let setup = Setup::on_mock("stall").await?;
    let mut consumer = setup.start(
        RecordingSink::default(),
        &[
            "--stall-timeout-secs",
            "10",
            "--kafka-option",
            "statistics.interval.ms=1000,fetch.error.backoff.ms=1000",
        ],
    )?;
    setup.produce(spread("event", 0..30)).await?;
    consumer.wait_seen("the first 30 events", 30).await?;
    consumer.wait_ready("readiness", true).await?;

    // About 40 s of failed fetches, then records to read.
    setup.faults()?.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_KAFKA_STORAGE_ERROR; 40],
    );
    setup.produce(spread("event", 30..60)).await?;
    consumer
        .wait_ready("readiness to turn false", false)
        .await?;
    let stalled = consumer.stalled_partitions().await?;
    assert!(!stalled.is_empty(), "no partition reported stalled");
    assert!(consumer.len() < 60, "stalled, yet every event arrived");

    consumer
        .wait_seen_within(
            Duration::from_secs(120),
            "every event after the failures",
            60,
        )
        .await?;
    consumer.wait_ready("readiness again", true).await?;
    assert_eq!(consumer.stalled_partitions().await?, Vec::<String>::new());
    consumer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_starts_at_the_log_end_is_not_stalled() -> anyhow::Result<()> {
    // Records older than where a new group starts (auto.offset.reset=latest)
    // are no records to read: readiness stays true past the stall timeout.
    let setup = Setup::on_mock("latest").await?;
    setup.produce(spread("old", 0..30)).await?;
    let mut consumer = setup.start(
        RecordingSink::default(),
        &[
            "--stall-timeout-secs",
            "10",
            "--kafka-option",
            "auto.offset.reset=latest,statistics.interval.ms=1000",
        ],
    )?;
    consumer.wait_ready("readiness", true).await?;
    // Twice the stall timeout, reading readiness all along.
    consumer
        .hold_readiness(
            true,
            Duration::from_secs(20),
            Duration::from_millis(200),
            "not ready",
        )
        .await?;
    assert_eq!(consumer.len(), 0, "none of the records before the start");
    consumer.stop().await
}

/// The sink stores offset 1,000 for partition 0, whose log ends at 10 (the
/// topic was recreated): reading on would drop the new records as already
/// written. The partition is refused (metric, readiness false, nothing read
/// or committed) while the others go on, until the operator restarts with
/// `--reset-offsets-beyond-log-end`: then the sink is told (a reset it
/// fails is tried again), and every record of the new log is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_stored_beyond_its_log_end_is_refused_until_reset() -> anyhow::Result<()> {
    let setup = Setup::on_mock("recreated").await?;
    setup.produce(ten_and_five()).await?;
    let stored = BTreeMap::from([(0, 1_000)]);
    let sink = RecordingSink {
        stored: stored.clone(),
        ..RecordingSink::default()
    };
    let mut consumer = setup.start(sink, &[])?;
    consumer.wait_for_refused(0).await?;
    // The other partitions go on.
    consumer.wait_seen("partition 1's 5 events", 5).await?;
    assert!(
        !consumer.ready().await?,
        "ready while a partition is refused"
    );
    setup
        .wait_for_committed("partition 1 committed", &[None, Some(5), None])
        .await?;
    assert!(
        consumer.seen()?.iter().all(|(p, _, _)| *p == 1),
        "nothing of partition 0 was written"
    );
    consumer.stop().await?;

    let sink = RecordingSink {
        stored,
        fail_resets: AtomicUsize::new(1),
        ..RecordingSink::default()
    };
    let mut consumer = setup.start(sink, &["--reset-offsets-beyond-log-end", "earliest"])?;
    // The first reset fails; the next, 30 s later, goes through.
    consumer.wait_seen("partition 0's 10 events", 10).await?;
    setup
        .wait_for_committed("everything committed", &[Some(10), Some(5), None])
        .await?;
    consumer.stop().await?;
    assert_eq!(
        *consumer
            .sink
            .resets
            .lock()
            .map_err(|_| anyhow::anyhow!("lock"))?,
        BTreeMap::from([(0, 0)])
    );
    assert_eq!(consumer.len(), 10, "each record of the new log once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_goes_back_while_read_is_refused() -> anyhow::Result<()> {
    let setup = Setup::on_mock("truncated").await?;
    setup.produce(ten_and_five()).await?;
    let mut consumer = setup.start(RecordingSink::default(), &[])?;
    setup
        .wait_for_committed("partitions 0 and 1 committed", &[Some(10), Some(5), None])
        .await?;

    // The broker answers as for a log truncated or replaced under the
    // reader: librdkafka resets the fetch to the log's start, and records
    // come again from offset 0.
    setup.faults()?.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE],
    );
    for partition in [0, 1] {
        consumer.wait_for_refused(partition).await?;
    }
    assert!(
        !consumer.ready().await?,
        "ready while partitions are refused"
    );
    // Partition 2 (empty when the fetch failed) goes on; 0 is not read.
    setup
        .produce((0..6).map(|i| (if i < 3 { 2 } else { 0 }, format!("later-{i}").into_bytes())))
        .await?;
    setup
        .wait_for_committed("partition 2 committed", &[Some(10), Some(5), Some(3)])
        .await?;
    consumer.stop().await?;
    let seen = consumer.seen()?;
    let later: Vec<&(i32, i64, String)> = seen
        .iter()
        .filter(|(_, _, e)| e.starts_with("later"))
        .collect();
    assert_eq!(
        seen.len(),
        18,
        "each record before the reset once, and partition 2's: {seen:?}"
    );
    assert!(
        later.iter().all(|(p, _, _)| *p == 2),
        "nothing after the reset of partition 0: {later:?}"
    );

    // A restart resumes at the stored offsets (this log still holds them):
    // partition 0's later records, once.
    let mut consumer = setup.start(RecordingSink::default(), &[])?;
    setup
        .wait_for_committed(
            "partition 0's later records committed",
            &[Some(13), Some(5), Some(3)],
        )
        .await?;
    consumer.stop().await?;
    assert_eq!(
        consumer
            .seen()?
            .iter()
            .map(|(p, o, _)| (*p, *o))
            .collect::<Vec<_>>(),
        vec![(0, 10), (0, 11), (0, 12)],
        "after the restart: what the refused partition did not read, once"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_fails_while_records_wait_and_nothing_is_written() -> anyhow::Result<()> {
    // Idle is alive; records that wait past --liveness-timeout-secs with
    // nothing written make /healthz fail, so that the orchestrator restarts
    // the service; a write that gets through makes it pass again.
    let setup = Setup::on_mock("liveness").await?;
    let mut consumer = setup.start(RecordingSink::down(), &["--liveness-timeout-secs", "10"])?;
    consumer.wait_live("/healthz to answer", true).await?;
    setup.produce(spread("event", 0..30)).await?;
    consumer.wait_live("/healthz to fail", false).await?;
    consumer.sink.down.store(false, Ordering::SeqCst);
    consumer
        .wait_seen_within(Duration::from_secs(120), "every event", 30)
        .await?;
    consumer.wait_live("/healthz to pass again", true).await?;
    consumer.stop().await
}

/// A sink whose offsets only Kafka commits does not wait for a batch's
/// dead letters to write it: its good records are written while the
/// letter is refused, and nothing is committed past the letter until the
/// topic takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_without_stored_offsets_writes_while_its_dead_letters_wait() -> anyhow::Result<()> {
    let setup = Setup::on_mock("beside").await?;
    setup
        .produce(to_partition(0, &["ok-1", "BAD-1", "ok-2"]))
        .await?;
    let refused = RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED;
    setup
        .faults()?
        .request_errors(RDKafkaApiKey::Produce, &[refused; 1_000]);
    let sink = RecordingSink {
        letters_beside_write: true,
        ..RecordingSink::default()
    };
    let mut consumer = setup.start(sink, &[])?;
    consumer
        .wait_seen("the good events, while the letter is refused", 2)
        .await?;
    wait_for_async(TIMEOUT, "the letter's retries", || {
        consumer.dead_letter_retries("dlq_not_authorized")
    })
    .await?;
    // Written once, and still not ready: the letter is what is missing.
    let seen: Vec<(i32, i64)> = consumer.seen()?.iter().map(|s| (s.0, s.1)).collect();
    assert_eq!(seen, vec![(0, 0), (0, 2)]);
    consumer
        .hold_readiness(
            false,
            Duration::from_secs(1),
            Duration::from_millis(50),
            "ready while a dead letter is refused",
        )
        .await?;
    assert_eq!(
        setup.committed()?,
        vec![None, None, None],
        "committed past a dead letter the topic refused"
    );

    setup.faults()?.clear_request_errors(RDKafkaApiKey::Produce);
    setup
        .wait_for_committed("the commit past the dead letter", &[Some(3), None, None])
        .await?;
    consumer.stop().await?;
    let letters = setup.dead_letters(1)?;
    assert_eq!(letters[0].headers["source.offset"], "1");
    Ok(())
}

/// A dead letter the topic refuses (no WRITE permission, a compacted topic
/// refusing a record without a key, a key too large for the topic even with
/// the payload cut) can only be fixed by an operator: its partition stops
/// there, loudly (the retry counted under its kind, readiness false while
/// the sink itself is fine), and moves on once fixed. The letter keeps the
/// source record's headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_topic_refuses_blocks_its_partition_loudly() -> anyhow::Result<()> {
    let cases = [
        (
            "dlq_not_authorized",
            Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED),
            0,
        ),
        (
            "dlq_invalid_record",
            Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD),
            0,
        ),
        // The producer takes at most 20,000 bytes: a 30,000-byte key is too
        // large whatever is cut from the payload.
        ("dlq_too_large", None, 30_000),
    ];
    for (kind, broker_error, key_bytes) in cases {
        let setup = Setup::on_mock("refused").await?;
        let key = vec![b'k'; key_bytes];
        for (payload, traced) in [("ok-1", false), ("BAD-1", true), ("ok-2", false)] {
            let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "trace-id",
                value: Some(if traced { "abc" } else { "-" }),
            });
            setup
                .producer
                .send(
                    rdkafka::producer::FutureRecord::to(&setup.topic)
                        .partition(0)
                        .key(key.as_slice())
                        .headers(headers)
                        .payload(payload),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(err, _)| err)?;
        }
        if let Some(error) = broker_error {
            setup
                .faults()?
                .request_errors(RDKafkaApiKey::Produce, &[error; 1_000]);
        }
        let mut consumer = setup.start(
            RecordingSink::default(),
            &["--kafka-option", "message.max.bytes=20000"],
        )?;

        wait_for_async(
            TIMEOUT,
            &format!("dead-letter retries of kind {kind}"),
            || consumer.dead_letter_retries(kind),
        )
        .await?;
        // Not ready while the letter is refused (that a probe finding the
        // sink itself fine does not flip it is health.rs's unit test).
        consumer
            .hold_readiness(
                false,
                Duration::from_secs(1),
                Duration::from_millis(50),
                &format!("{kind}: ready while a dead letter is refused"),
            )
            .await?;
        assert_eq!(
            consumer.len(),
            0,
            "{kind}: the batch waits for its dead letter"
        );
        assert_eq!(setup.committed()?, vec![None, None, None], "{kind}");

        // The operator's fix: the broker takes letters again (for the key,
        // a larger limit: here a restart with the default).
        if broker_error.is_some() {
            setup.faults()?.clear_request_errors(RDKafkaApiKey::Produce);
        } else {
            consumer.stop().await?;
            let sink = RecordingSink {
                shared: Shared {
                    seen: Arc::clone(&consumer.sink.seen),
                    ..Shared::default()
                },
                ..RecordingSink::default()
            };
            consumer = setup.start(sink, &[])?;
        }
        consumer.wait_seen("the good events", 2).await?;
        setup
            .wait_for_committed("the commit past the dead letter", &[Some(3), None, None])
            .await?;
        consumer.stop().await?;
        let letters = setup.dead_letters(1)?;
        assert_eq!(letters[0].headers["trace-id"], "abc", "{kind}");
        assert_eq!(
            letters[0].headers["error.code"], "bad_test_payload",
            "{kind}"
        );
    }
    Ok(())
}

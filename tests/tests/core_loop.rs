//! The shared consume loop against the real broker, with a recording sink.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use e2e::service::ServiceFlags;
use e2e::{kafka, unique, wait_for, Stack};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use sink_core::config::try_parse_args_from;
use sink_core::{
    Batch, ConsumerArgs, PartitionRange, Record, Rejection, ServiceDefaults, Sink, SinkError,
    WriteOutcome,
};
use tokio::sync::oneshot;

const PARTITIONS: i32 = 3;
const TIMEOUT: Duration = Duration::from_secs(60);

/// What the sink saw: (partition, offset, payload) in write order.
type Seen = Arc<Mutex<Vec<(i32, i64, String)>>>;

/// Accepts everything except payloads starting with "BAD" (rejected at
/// decode) and "REFUSE" (rejected at write); fails its first `fail_first`
/// writes; can claim partitions are already applied up to an offset; writes
/// `in_flight` batches at once (1 by default: with more, batches may finish
/// in any order, and only the commits stay in order).
#[derive(Default)]
struct RecordingSink {
    seen: Seen,
    /// Each batch's ranges, as `Sink::dispatched` reported them.
    dispatched: Arc<Mutex<Vec<Vec<PartitionRange>>>>,
    fail_first: AtomicUsize,
    writes: Arc<AtomicUsize>,
    stored: BTreeMap<i32, i64>,
    in_flight: usize,
    /// Fails every write until then (an outage).
    down_until: Option<std::time::Instant>,
    /// Fails every write while set.
    down: Arc<AtomicBool>,
    /// Partitions assigned so far (asked for their stored offsets).
    assigned: Arc<Mutex<Vec<i32>>>,
    /// Offsets reset by the loop; they replace `stored`.
    resets: Arc<Mutex<BTreeMap<i32, i64>>>,
    /// Fails its first resets (the sink did not answer).
    fail_resets: AtomicUsize,
}

impl RecordingSink {
    fn stored(&self, partition: i32) -> Option<i64> {
        let reset = self.resets.lock().ok()?.get(&partition).copied();
        reset.or_else(|| self.stored.get(&partition).copied())
    }
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
        if let Ok(mut dispatched) = self.dispatched.lock() {
            dispatched.push(batch.ranges.clone());
        }
    }

    async fn write(&self, batch: &Batch<String>) -> Result<WriteOutcome, SinkError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst)
            || self
                .down_until
                .is_some_and(|until| std::time::Instant::now() < until)
        {
            return Err(SinkError::transient(
                "test_outage",
                anyhow::anyhow!("injected outage"),
            ));
        }
        if self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SinkError::transient(
                "test_outage",
                anyhow::anyhow!("injected failure"),
            ));
        }
        let mut outcome = WriteOutcome::default();
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| SinkError::transient("poisoned", anyhow::anyhow!("lock")))?;
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

    async fn stored_offsets(
        &self,
        _topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<Option<i64>>, SinkError> {
        if let Ok(mut assigned) = self.assigned.lock() {
            assigned.extend(partitions);
        }
        Ok(partitions.iter().map(|p| self.stored(*p)).collect())
    }

    async fn reset_stored_offsets(
        &self,
        _topic: &str,
        resets: &[(i32, i64, i64)],
    ) -> Result<(), SinkError> {
        if self
            .fail_resets
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SinkError::transient(
                "test_outage",
                anyhow::anyhow!("injected failure"),
            ));
        }
        let mut done = self
            .resets
            .lock()
            .map_err(|_| SinkError::transient("poisoned", anyhow::anyhow!("lock")))?;
        done.extend(resets.iter().map(|(partition, _, to)| (*partition, *to)));
        Ok(())
    }

    fn max_in_flight(&self) -> usize {
        self.in_flight.max(1)
    }
}

fn args(stack: &Stack, topic: &str, group: &str) -> anyhow::Result<ConsumerArgs> {
    args_with(&stack.kafka, topic, group, &[])
}

/// [`args`] and `extra` flags.
fn args_with(
    bootstrap: &str,
    topic: &str,
    group: &str,
    extra: &[&str],
) -> anyhow::Result<ConsumerArgs> {
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
    };
    // The flags every test service gets, parsed in this process.
    let flags = ServiceFlags::consumer("test", bootstrap, topic, group)
        .for_tests()
        .extra(extra);
    let argv = std::iter::once("test".to_owned()).chain(flags.args());
    Ok(try_parse_args_from::<Cli, _, _>(&defaults, argv)?.consumer)
}

/// A consumer running in the background until `stop` is called.
struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
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
            task,
        }
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.context("consumer task")?
    }
}

async fn topic_with_dlq(stack: &Stack) -> anyhow::Result<String> {
    let topic = unique("core");
    kafka::create_topic(&stack.kafka, &topic, PARTITIONS).await?;
    kafka::create_topic(&stack.kafka, &format!("{topic}.dlq"), PARTITIONS).await?;
    Ok(topic)
}

/// librdkafka's mock cluster (one broker, in this process) with a topic of
/// [`PARTITIONS`] partitions and its dead-letter topic: the cluster (keep
/// it alive), the topic and the bootstrap address.
fn mock_topic(
    prefix: &str,
) -> anyhow::Result<(
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
    String,
)> {
    let mock = rdkafka::mocking::MockCluster::new(1)?;
    let topic = unique(prefix);
    mock.create_topic(&topic, PARTITIONS, 1)?;
    mock.create_topic(&format!("{topic}.dlq"), PARTITIONS, 1)?;
    let bootstrap = mock.bootstrap_servers();
    Ok((mock, topic, bootstrap))
}

fn len(seen: &Seen) -> usize {
    seen.lock().map(|s| s.len()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_once_in_partition_order_then_committed() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let topic = topic_with_dlq(&stack).await?;
    let group = unique("group");
    let producer = kafka::producer(&stack.kafka)?;
    let n = 10_000;
    kafka::produce(
        &producer,
        &topic,
        (0..n).map(|i| (i % PARTITIONS, format!("event-{i}").into_bytes())),
    )
    .await?;

    let sink = RecordingSink::default();
    let seen = Arc::clone(&sink.seen);
    let dispatched = Arc::clone(&sink.dispatched);
    let running = Running::start(args(&stack, &topic, &group)?, sink);
    wait_for(TIMEOUT, "all 10,000 events", || len(&seen) >= n as usize).await?;
    running.stop().await?;

    // Sink::dispatched saw every batch in offset order: per partition, the
    // ranges chain from 0 to the end without a hole or an overlap (what a
    // sink writing several batches at once orders its writes by).
    let dispatched = dispatched
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

    let seen = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
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
    let committed = kafka::committed(&stack.kafka, &group, &topic, PARTITIONS)?;
    let expected: Vec<Option<i64>> = (0..PARTITIONS)
        .map(|p| Some(((0..n).filter(|i| i % PARTITIONS == p).count()) as i64))
        .collect();
    assert_eq!(
        committed, expected,
        "offsets committed after the sink took everything"
    );

    // The same group again: only what is produced now arrives.
    let sink = RecordingSink::default();
    let seen = Arc::clone(&sink.seen);
    let running = Running::start(args(&stack, &topic, &group)?, sink);
    kafka::produce(
        &producer,
        &topic,
        (0..PARTITIONS).map(|p| (p, format!("late-{p}").into_bytes())),
    )
    .await?;
    wait_for(TIMEOUT, "the 3 late events", || len(&seen) >= 3).await?;
    running.stop().await?;
    let mut payloads: Vec<String> = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
        .map(|s| s.2.clone())
        .collect();
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
    let stack = Stack::get()?;
    let topic = topic_with_dlq(&stack).await?;
    let group = unique("group");
    let producer = kafka::producer(&stack.kafka)?;
    let n = 900;
    kafka::produce(
        &producer,
        &topic,
        (0..n).map(|i| (i % PARTITIONS, format!("event-{i}").into_bytes())),
    )
    .await?;

    let fail_first = 4;
    let sink = RecordingSink {
        fail_first: AtomicUsize::new(fail_first),
        in_flight: 3,
        ..RecordingSink::default()
    };
    let seen = Arc::clone(&sink.seen);
    let running = Running::start(args(&stack, &topic, &group)?, sink);
    wait_for(TIMEOUT, "every event after the outage", || {
        len(&seen) >= n as usize
    })
    .await?;
    running.stop().await?;
    let mut offsets: Vec<(i32, i64)> = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
        .map(|s| (s.0, s.1))
        .collect();
    let total = offsets.len();
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(
        (total, offsets.len()),
        (n as usize, n as usize),
        "every event, none twice"
    );
    let committed = kafka::committed(&stack.kafka, &group, &topic, PARTITIONS)?;
    assert_eq!(committed, vec![Some(300); 3]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_records_land_in_the_dlq_with_headers() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let topic = topic_with_dlq(&stack).await?;
    let group = unique("group");
    let producer = kafka::producer(&stack.kafka)?;
    let payloads = ["ok-1", "BAD-1", "ok-2", "REFUSE-1", "ok-3", "BAD-2"];
    kafka::produce(
        &producer,
        &topic,
        payloads.iter().map(|p| (1, p.as_bytes().to_vec())),
    )
    .await?;

    let sink = RecordingSink::default();
    let seen = Arc::clone(&sink.seen);
    let running = Running::start(args(&stack, &topic, &group)?, sink);
    wait_for(TIMEOUT, "the 3 good events", || len(&seen) >= 3).await?;
    wait_for_committed(&stack, &group, &topic, vec![None, Some(6), None]).await?;
    running.stop().await?;

    let letters = kafka::read_messages(&stack.kafka, &format!("{topic}.dlq"), 3, TIMEOUT)?;
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
    assert_eq!(bad.headers["source.topic"], topic);
    assert_eq!(bad.headers["source.partition"], "1");
    assert_eq!(bad.headers["source.offset"], "1");
    assert!(bad.headers["failed.at"].ends_with('Z'), "{:?}", bad.headers);
    assert_eq!(by_payload["REFUSE-1"].headers["error"], "sink refused it");
    assert_eq!(by_payload["REFUSE-1"].headers["source.offset"], "3");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_the_topic_goes_with_its_payload_cut() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let topic = topic_with_dlq(&stack).await?;
    let group = unique("group");
    let producer = kafka::producer(&stack.kafka)?;
    let big = format!("BAD-{}", "x".repeat(100_000));
    kafka::produce(
        &producer,
        &topic,
        ["ok-1", big.as_str(), "ok-2"]
            .iter()
            .map(|p| (2, p.as_bytes().to_vec())),
    )
    .await?;

    // The dead-letter producer accepts at most 20,000 bytes, as a topic
    // with a smaller max.message.bytes than its source would.
    let args = args_with(
        &stack.kafka,
        &topic,
        &group,
        &["--kafka-option", "message.max.bytes=20000"],
    )?;
    let sink = RecordingSink::default();
    let seen = Arc::clone(&sink.seen);
    let running = Running::start(args, sink);
    wait_for(TIMEOUT, "the 2 good events", || len(&seen) >= 2).await?;
    wait_for_committed(&stack, &group, &topic, vec![None, None, Some(3)]).await?;
    running.stop().await?;

    let letters = kafka::read_messages(&stack.kafka, &format!("{topic}.dlq"), 1, TIMEOUT)?;
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
    let stack = Stack::get()?;
    let topic = topic_with_dlq(&stack).await?;
    let group = unique("group");
    let producer = kafka::producer(&stack.kafka)?;
    kafka::produce(
        &producer,
        &topic,
        (0..30).map(|i| (i % PARTITIONS, format!("event-{i}").into_bytes())),
    )
    .await?;

    // Partition 0 already applied up to offset 4, partition 2 up to 10 (all of it).
    let sink = RecordingSink {
        stored: BTreeMap::from([(0, 4), (2, 10)]),
        ..RecordingSink::default()
    };
    let seen = Arc::clone(&sink.seen);
    let running = Running::start(args(&stack, &topic, &group)?, sink);
    wait_for_committed(&stack, &group, &topic, vec![Some(10), Some(10), None]).await?;
    running.stop().await?;
    let mut got: Vec<(i32, i64)> = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
        .map(|s| (s.0, s.1))
        .collect();
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
    let stack = Stack::get()?;
    let topic = topic_with_dlq(&stack).await?;
    let group = unique("group");
    let producer = kafka::producer(&stack.kafka)?;
    let backlog = 30_000;
    kafka::produce(
        &producer,
        &topic,
        (0..backlog).map(|i| (0, format!("event-{i}").into_bytes())),
    )
    .await?;

    let first = RecordingSink::default();
    first.down.store(true, Ordering::SeqCst);
    let (seen_first, writes, down) = (
        Arc::clone(&first.seen),
        Arc::clone(&first.writes),
        Arc::clone(&first.down),
    );
    let running_first = Running::start(args_with(&stack.kafka, &topic, &group, strategy)?, first);
    // Past the loop's 5 s hold: it has paused by now.
    wait_for(TIMEOUT, "the outage to begin", || {
        writes.load(Ordering::SeqCst) > 0
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let second = RecordingSink::default();
    let (seen_second, assigned_second) = (Arc::clone(&second.seen), Arc::clone(&second.assigned));
    let running_second = Running::start(args_with(&stack.kafka, &topic, &group, strategy)?, second);
    wait_for(TIMEOUT, "the second consumer's partitions", || {
        assigned_second.lock().is_ok_and(|a| !a.is_empty())
    })
    .await?;
    let more = 3_000;
    kafka::produce(
        &producer,
        &topic,
        (0..more).map(|i| (i % PARTITIONS, format!("more-{i}").into_bytes())),
    )
    .await?;
    down.store(false, Ordering::SeqCst);
    let n = (backlog + more) as usize;
    wait_for(
        Duration::from_secs(120),
        "every event, in one consumer or the other",
        || len(&seen_first) + len(&seen_second) >= n,
    )
    .await?;
    running_second.stop().await?;
    running_first.stop().await?;
    let mut offsets: Vec<(i32, i64)> = [&seen_first, &seen_second]
        .iter()
        .flat_map(|seen| {
            seen.lock()
                .map(|s| s.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect();
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(offsets.len(), n, "every offset at least once");
    Ok(())
}

async fn wait_for_committed(
    stack: &Stack,
    group: &str,
    topic: &str,
    expected: Vec<Option<i64>>,
) -> anyhow::Result<()> {
    let offsets = kafka::OffsetReader::new(&stack.kafka, group, topic, PARTITIONS)?;
    let mut last = Vec::new();
    let result = e2e::wait_for_async(TIMEOUT, "committed offsets", || {
        let current = offsets.committed();
        let matches = current.as_ref().map(|c| *c == expected).unwrap_or(false);
        if let Ok(c) = current {
            last = c;
        }
        async move { Ok(matches) }
    })
    .await;
    result.with_context(|| format!("committed {last:?}, expected {expected:?}"))
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
        let mut state = self
            .state
            .lock()
            .map_err(|_| SinkError::transient("poisoned", anyhow::anyhow!("lock")))?;
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

    async fn stored_offsets(
        &self,
        _topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<Option<i64>>, SinkError> {
        let state = self
            .state
            .lock()
            .map_err(|_| SinkError::transient("poisoned", anyhow::anyhow!("lock")))?;
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
    let (_mock, topic, bootstrap) = mock_topic("seek")?;
    let group = unique("group");
    let args = args_with(
        &bootstrap,
        &topic,
        &group,
        &["--batch-max-events", "7", "--batch-linger-ms", "1"],
    )?;
    let sink = FencedSink::default();
    let state = Arc::clone(&sink.state);
    let running = Running::start(args, sink);
    let producer = kafka::producer(&bootstrap)?;
    // In small chunks, so that records keep arriving while the loop seeks.
    let (chunks, per_chunk) = (600, 30);
    for chunk in 0..chunks {
        kafka::produce(
            &producer,
            &topic,
            (0..per_chunk).map(|i| (i % PARTITIONS, format!("{chunk}-{i}").into_bytes())),
        )
        .await?;
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
    use rdkafka::types::RDKafkaApiKey;
    use rdkafka::types::RDKafkaRespErr;

    let (mock, topic, bootstrap) = mock_topic("stall")?;
    let port = e2e::free_port()?;
    let metrics = format!("127.0.0.1:{port}");
    let args = args_with(
        &bootstrap,
        &topic,
        &unique("group"),
        &[
            "--metrics-addr",
            &metrics,
            "--stall-timeout-secs",
            "10",
            "--kafka-option",
            "statistics.interval.ms=1000,fetch.error.backoff.ms=1000",
        ],
    )?;
    let sink = RecordingSink::default();
    let seen = Arc::clone(&sink.seen);
    let running = Running::start(args, sink);
    let producer = kafka::producer(&bootstrap)?;
    let batch = |from: usize| {
        (from..from + 30).map(|i| ((i % 3) as i32, format!("event-{i}").into_bytes()))
    };
    kafka::produce(&producer, &topic, batch(0)).await?;
    wait_for(TIMEOUT, "the first 30 events", || len(&seen) >= 30).await?;
    e2e::wait_for_async(TIMEOUT, "readiness", || e2e::ready(port)).await?;

    // About 40 s of failed fetches, then records to read.
    mock.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_KAFKA_STORAGE_ERROR; 40],
    );
    kafka::produce(&producer, &topic, batch(30)).await?;
    e2e::wait_for_async(TIMEOUT, "readiness to turn false", || async {
        Ok(!e2e::ready(port).await?)
    })
    .await?;
    let stalled = stalled_partitions(port, &topic).await?;
    assert!(!stalled.is_empty(), "no partition reported stalled");
    assert!(len(&seen) < 60, "stalled, yet every event arrived");

    wait_for(
        Duration::from_secs(120),
        "every event after the failures",
        || len(&seen) >= 60,
    )
    .await?;
    e2e::wait_for_async(TIMEOUT, "readiness again", || e2e::ready(port)).await?;
    assert_eq!(
        stalled_partitions(port, &topic).await?,
        Vec::<String>::new()
    );
    running.stop().await
}

/// The partitions of `topic` whose `sink_partition_stalled` gauge is 1.
async fn stalled_partitions(port: u16, topic: &str) -> anyhow::Result<Vec<String>> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with(sink_core::metrics::PARTITION_STALLED)
                && l.contains(&format!("topic=\"{topic}\""))
                && l.ends_with(" 1")
        })
        .map(str::to_owned)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_committed_past_what_the_sink_has_not_accepted() -> anyhow::Result<()> {
    // Commits are flowing (partition 0 committed), then the sink fails every
    // write for a while: neither partition 0's new records nor partition 1's
    // may be committed until the sink accepts them.
    let stack = Stack::get()?;
    let topic = topic_with_dlq(&stack).await?;
    let group = unique("group");
    let producer = kafka::producer(&stack.kafka)?;
    let records = |partition: i32, from: usize| {
        (from..from + 300).map(move |i| (partition, format!("event-{partition}-{i}").into_bytes()))
    };
    let sink = RecordingSink::default();
    let (seen, writes, down) = (
        Arc::clone(&sink.seen),
        Arc::clone(&sink.writes),
        Arc::clone(&sink.down),
    );
    let running = Running::start(args(&stack, &topic, &group)?, sink);
    kafka::produce(&producer, &topic, records(0, 0)).await?;
    wait_for_committed(&stack, &group, &topic, vec![Some(300), None, None]).await?;

    down.store(true, Ordering::SeqCst);
    let attempts = writes.load(Ordering::SeqCst);
    kafka::produce(&producer, &topic, records(0, 300).chain(records(1, 0))).await?;
    wait_for(TIMEOUT, "three failed write attempts", || {
        writes.load(Ordering::SeqCst) >= attempts + 3
    })
    .await?;
    assert_eq!(
        kafka::committed(&stack.kafka, &group, &topic, PARTITIONS)?,
        vec![Some(300), None, None],
        "committed records the sink had not accepted"
    );
    assert_eq!(len(&seen), 300);

    down.store(false, Ordering::SeqCst);
    wait_for_committed(&stack, &group, &topic, vec![Some(600), Some(300), None]).await?;
    assert_eq!(len(&seen), 900, "every record once");
    running.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_starts_at_the_log_end_is_not_stalled() -> anyhow::Result<()> {
    // Records older than where a new group starts (auto.offset.reset=latest)
    // are no records to read: readiness stays true past the stall timeout.
    let (_mock, topic, bootstrap) = mock_topic("latest")?;
    let producer = kafka::producer(&bootstrap)?;
    kafka::produce(
        &producer,
        &topic,
        (0..30).map(|i| (i % PARTITIONS, format!("old-{i}").into_bytes())),
    )
    .await?;
    let port = e2e::free_port()?;
    let metrics = format!("127.0.0.1:{port}");
    let args = args_with(
        &bootstrap,
        &topic,
        &unique("group"),
        &[
            "--metrics-addr",
            &metrics,
            "--stall-timeout-secs",
            "10",
            "--kafka-option",
            "auto.offset.reset=latest,statistics.interval.ms=1000",
        ],
    )?;
    let sink = RecordingSink::default();
    let seen = Arc::clone(&sink.seen);
    let running = Running::start(args, sink);
    e2e::wait_for_async(TIMEOUT, "readiness", || e2e::ready(port)).await?;
    // Twice the stall timeout, reading readiness all along.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < until {
        assert!(
            e2e::ready(port).await?,
            "not ready: {:?}",
            stalled_partitions(port, &topic).await?
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(len(&seen), 0, "none of the records before the start");
    running.stop().await
}

/// The sink stores offset 1,000 for partition 0, whose log ends at 10 (the
/// topic was recreated): reading on would drop the new records as already
/// written. The partition is refused (metric, readiness false, nothing read
/// or committed) while the others go on, until the operator restarts with
/// `--reset-offsets-beyond-log-end`: then the sink is told (a reset it
/// fails is tried again), and every record of the new log is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_stored_beyond_its_log_end_is_refused_until_reset() -> anyhow::Result<()> {
    let (_mock, topic, bootstrap) = mock_topic("recreated")?;
    let producer = kafka::producer(&bootstrap)?;
    ten_and_five(&producer, &topic).await?;
    let group = unique("group");
    let (port, metrics) = metrics_addr()?;
    let args = args_with(&bootstrap, &topic, &group, &["--metrics-addr", &metrics])?;
    let stored = BTreeMap::from([(0, 1_000)]);
    let sink = RecordingSink {
        stored: stored.clone(),
        ..RecordingSink::default()
    };
    let seen = Arc::clone(&sink.seen);
    let running = Running::start(args, sink);
    let refused = format!("sink_partition_refused{{topic=\"{topic}\",partition=\"0\"}} 1");
    e2e::wait_for_async(TIMEOUT, "partition 0 refused on /metrics", || async {
        let text = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
            Ok(response) => response.text().await?,
            Err(_) => return Ok(false), // not listening yet
        };
        Ok(text.lines().any(|l| l == refused))
    })
    .await?;
    // The other partitions go on.
    wait_for(TIMEOUT, "partition 1's 5 events", || len(&seen) >= 5).await?;
    assert!(
        !e2e::ready(port).await?,
        "ready while a partition is refused"
    );
    let offsets = kafka::OffsetReader::new(&bootstrap, &group, &topic, PARTITIONS)?;
    e2e::wait_for_async(TIMEOUT, "partition 1 committed", || {
        let committed = offsets.committed();
        async move { Ok(committed? == vec![None, Some(5), None]) }
    })
    .await?;
    assert!(
        seen.lock().is_ok_and(|s| s.iter().all(|(p, _, _)| *p == 1)),
        "nothing of partition 0 was written"
    );
    running.stop().await?;

    let args = args_with(
        &bootstrap,
        &topic,
        &group,
        &["--reset-offsets-beyond-log-end", "earliest"],
    )?;
    let sink = RecordingSink {
        stored,
        fail_resets: AtomicUsize::new(1),
        ..RecordingSink::default()
    };
    let (seen, resets) = (Arc::clone(&sink.seen), Arc::clone(&sink.resets));
    let running = Running::start(args, sink);
    // The first reset fails; the next, 30 s later, goes through.
    wait_for(TIMEOUT, "partition 0's 10 events", || len(&seen) >= 10).await?;
    e2e::wait_for_async(TIMEOUT, "everything committed", || {
        let committed = offsets.committed();
        async move { Ok(committed? == vec![Some(10), Some(5), None]) }
    })
    .await?;
    running.stop().await?;
    assert_eq!(
        *resets.lock().map_err(|_| anyhow::anyhow!("lock"))?,
        BTreeMap::from([(0, 0)])
    );
    assert_eq!(len(&seen), 10, "each record of the new log once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_goes_back_while_read_is_refused() -> anyhow::Result<()> {
    let (mock, topic, bootstrap) = mock_topic("truncated")?;
    let producer = kafka::producer(&bootstrap)?;
    ten_and_five(&producer, &topic).await?;
    let group = unique("group");
    let (port, metrics) = metrics_addr()?;
    let args = args_with(&bootstrap, &topic, &group, &["--metrics-addr", &metrics])?;
    let sink = RecordingSink::default();
    let seen = Arc::clone(&sink.seen);
    let running = Running::start(args, sink);
    let offsets = kafka::OffsetReader::new(&bootstrap, &group, &topic, PARTITIONS)?;
    e2e::wait_for_async(TIMEOUT, "partitions 0 and 1 committed", || {
        let committed = offsets.committed();
        async move { Ok(committed? == vec![Some(10), Some(5), None]) }
    })
    .await?;

    // The broker answers as for a log truncated or replaced under the
    // reader: librdkafka resets the fetch to the log's start, and records
    // come again from offset 0.
    mock.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE],
    );
    for partition in [0, 1] {
        wait_for_refused(port, &topic, partition).await?;
    }
    assert!(
        !e2e::ready(port).await?,
        "ready while partitions are refused"
    );
    // Partition 2 (empty when the fetch failed) goes on; 0 is not read.
    kafka::produce(
        &producer,
        &topic,
        (0..6).map(|i| (if i < 3 { 2 } else { 0 }, format!("later-{i}").into_bytes())),
    )
    .await?;
    e2e::wait_for_async(TIMEOUT, "partition 2 committed", || {
        let committed = offsets.committed();
        async move { Ok(committed? == vec![Some(10), Some(5), Some(3)]) }
    })
    .await?;
    running.stop().await?;
    let seen = seen.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
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
    let args = args_with(&bootstrap, &topic, &group, &[])?;
    let sink = RecordingSink::default();
    let seen = Arc::clone(&sink.seen);
    let running = Running::start(args, sink);
    e2e::wait_for_async(TIMEOUT, "partition 0's later records committed", || {
        let committed = offsets.committed();
        async move { Ok(committed? == vec![Some(13), Some(5), Some(3)]) }
    })
    .await?;
    running.stop().await?;
    let seen = seen.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
    assert_eq!(
        seen.iter().map(|(p, o, _)| (*p, *o)).collect::<Vec<_>>(),
        vec![(0, 10), (0, 11), (0, 12)],
        "after the restart: what the refused partition did not read, once"
    );
    Ok(())
}

/// Produces 10 events to partition 0 and 5 to partition 1 of `topic`.
async fn ten_and_five(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
) -> anyhow::Result<()> {
    let events = (0..15).map(|i| (i32::from(i >= 10), format!("event-{i}").into_bytes()));
    kafka::produce(producer, topic, events).await?;
    Ok(())
}

/// A free loopback port for /metrics, and the address to pass.
fn metrics_addr() -> anyhow::Result<(u16, String)> {
    let port = e2e::free_port()?;
    Ok((port, format!("127.0.0.1:{port}")))
}

/// Waits until /metrics on `port` says `partition` of `topic` is refused.
async fn wait_for_refused(port: u16, topic: &str, partition: i32) -> anyhow::Result<()> {
    let refused =
        format!("sink_partition_refused{{topic=\"{topic}\",partition=\"{partition}\"}} 1");
    e2e::wait_for_async(TIMEOUT, "the partition refused on /metrics", || async {
        let text = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
            Ok(response) => response.text().await?,
            Err(_) => return Ok(false), // not listening yet
        };
        Ok(text.lines().any(|l| l == refused))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_fails_while_records_wait_and_nothing_is_written() -> anyhow::Result<()> {
    // Idle is alive; records that wait past --liveness-timeout-secs with
    // nothing written make /healthz fail, so that the orchestrator restarts
    // the service; a write that gets through makes it pass again.
    let (_mock, topic, bootstrap) = mock_topic("liveness")?;
    let port = e2e::free_port()?;
    let metrics = format!("127.0.0.1:{port}");
    let args = args_with(
        &bootstrap,
        &topic,
        &unique("group"),
        &["--metrics-addr", &metrics, "--liveness-timeout-secs", "10"],
    )?;
    let sink = RecordingSink::default();
    let (seen, down) = (Arc::clone(&sink.seen), Arc::clone(&sink.down));
    down.store(true, Ordering::SeqCst);
    let running = Running::start(args, sink);
    let live = || async move {
        match reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await {
            Ok(response) => Some(response.status().is_success()),
            Err(_) => None, // not listening yet
        }
    };
    e2e::wait_for_async(TIMEOUT, "/healthz to answer", || async {
        Ok(live().await == Some(true))
    })
    .await?;
    let producer = kafka::producer(&bootstrap)?;
    kafka::produce(
        &producer,
        &topic,
        (0..30).map(|i| (i % PARTITIONS, format!("event-{i}").into_bytes())),
    )
    .await?;
    e2e::wait_for_async(TIMEOUT, "/healthz to fail", || async {
        Ok(live().await == Some(false))
    })
    .await?;
    down.store(false, Ordering::SeqCst);
    wait_for(Duration::from_secs(120), "every event", || len(&seen) >= 30).await?;
    e2e::wait_for_async(TIMEOUT, "/healthz to pass again", || async {
        Ok(live().await == Some(true))
    })
    .await?;
    running.stop().await
}

/// A dead letter the topic refuses (no WRITE permission, a compacted topic
/// refusing a record without a key, a key too large for the topic even with
/// the payload cut) can only be fixed by an operator: its partition stops
/// there, loudly (the retry counted under its kind, readiness false while
/// the sink itself is fine), and moves on once fixed. The letter keeps the
/// source record's headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_topic_refuses_blocks_its_partition_loudly() -> anyhow::Result<()> {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

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
        let (mock, topic, bootstrap) = mock_topic("refused")?;
        let group = unique("group");
        let producer = kafka::producer(&bootstrap)?;
        let key = vec![b'k'; key_bytes];
        for (payload, traced) in [("ok-1", false), ("BAD-1", true), ("ok-2", false)] {
            let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "trace-id",
                value: Some(if traced { "abc" } else { "-" }),
            });
            producer
                .send(
                    rdkafka::producer::FutureRecord::to(&topic)
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
            mock.request_errors(RDKafkaApiKey::Produce, &[error; 1_000]);
        }
        let port = e2e::free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let args = args_with(
            &bootstrap,
            &topic,
            &group,
            &[
                "--metrics-addr",
                &addr,
                "--kafka-option",
                "message.max.bytes=20000",
            ],
        )?;
        let sink = RecordingSink::default();
        let seen = Arc::clone(&sink.seen);
        let running = Running::start(args, sink);

        e2e::wait_for_async(
            TIMEOUT,
            &format!("dead-letter retries of kind {kind}"),
            || dead_letter_retries(port, kind),
        )
        .await?;
        // Not ready while the letter is refused (that a probe finding the
        // sink itself fine does not flip it is health.rs's unit test).
        let until = std::time::Instant::now() + Duration::from_secs(1);
        while std::time::Instant::now() < until {
            assert!(
                !e2e::ready(port).await?,
                "{kind}: ready while a dead letter is refused"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(len(&seen), 0, "{kind}: the batch waits for its dead letter");
        let offsets = kafka::OffsetReader::new(&bootstrap, &group, &topic, PARTITIONS)?;
        assert_eq!(offsets.committed()?, vec![None, None, None], "{kind}");

        // The operator's fix: the broker takes letters again (for the key,
        // a larger limit: here a restart with the default).
        let running = if broker_error.is_some() {
            mock.clear_request_errors(RDKafkaApiKey::Produce);
            running
        } else {
            running.stop().await?;
            let sink = RecordingSink {
                seen: Arc::clone(&seen),
                ..RecordingSink::default()
            };
            Running::start(args_with(&bootstrap, &topic, &group, &[])?, sink)
        };
        wait_for(TIMEOUT, "the good events", || len(&seen) >= 2).await?;
        let offsets = kafka::OffsetReader::new(&bootstrap, &group, &topic, PARTITIONS)?;
        e2e::wait_for_async(TIMEOUT, "the commit past the dead letter", || {
            let committed = offsets.committed();
            async move { Ok(committed? == vec![Some(3), None, None]) }
        })
        .await?;
        running.stop().await?;
        let letters = kafka::read_messages(&bootstrap, &format!("{topic}.dlq"), 1, TIMEOUT)?;
        assert_eq!(letters[0].headers["trace-id"], "abc", "{kind}");
        assert_eq!(
            letters[0].headers["error.code"], "bad_test_payload",
            "{kind}"
        );
    }
    Ok(())
}

/// Whether /metrics on `port` counts at least 3 dead-letter retries of `kind`.
/// (False while the service is not listening yet.)
async fn dead_letter_retries(port: u16, kind: &str) -> anyhow::Result<bool> {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return Ok(false);
    };
    let text = response.text().await?;
    Ok(text.lines().any(|l| {
        l.starts_with(sink_core::metrics::RETRIES)
            && l.contains("operation=\"dead_letter\"")
            && l.contains(&format!("kind=\"{kind}\""))
            && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) >= Some(3.0)
    }))
}

//! bigquery-sink end to end: real broker, the BigQuery emulator, the real
//! binary, and (where a test says so) a fault proxy between the sink and the
//! emulator. Every test uses its own topic and table, and compares what is
//! in the table with what it produced, record by record.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use e2e::bigquery::{int, Emulator, Fault, FaultProxy};
use e2e::generator::{Generator, Mix};
use e2e::process::{restart_alone, Service};
use e2e::service::ServiceFlags;
use e2e::{kafka, poll_until, unique, wait_for, Check, Stack};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::Value;

const PARTITIONS: i32 = 3;
const TIMEOUT: Duration = Duration::from_secs(240);

/// (partition, offset) of a Kafka record.
type Coordinates = (i32, i64);

struct Fixture {
    stack: Stack,
    emulator: Emulator,
    topic: String,
    group: String,
    table: String,
    producer: FutureProducer,
    /// Every record produced, by its coordinates.
    produced: BTreeMap<Coordinates, Vec<u8>>,
    sent: usize,
    services: usize,
    /// The in-process broker `stack.kafka` points at, for fixtures made
    /// with [`Fixture::on_mock_cluster`]; dropping it stops the brokers.
    _mock: Option<MockCluster<'static, DefaultProducerContext>>,
}

impl Fixture {
    async fn new() -> anyhow::Result<Self> {
        let stack = Stack::get()?;
        let topic = unique("user2");
        kafka::create_topic(&stack.kafka, &topic, PARTITIONS).await?;
        kafka::create_topic(&stack.kafka, &format!("{topic}.dlq"), PARTITIONS).await?;
        let producer = kafka::producer(&stack.kafka)?;
        Self::on_topic(stack, topic, producer, None)
    }

    /// On librdkafka's mock cluster (3 brokers, in this process), which
    /// serves batched and compressed record batches as Kafka does, fed by a
    /// producer set as Logstash's kafka output with `compression`. (tansu,
    /// behind [`Fixture::new`], needs one record per batch.)
    async fn on_mock_cluster(compression: &str) -> anyhow::Result<Self> {
        let mock = MockCluster::new(3)?;
        let topic = unique("user2");
        mock.create_topic(&topic, PARTITIONS, 3)?;
        mock.create_topic(&format!("{topic}.dlq"), PARTITIONS, 3)?;
        let mut stack = Stack::get()?;
        stack.kafka = mock.bootstrap_servers();
        let producer = kafka::logstash_producer(&stack.kafka, compression)?;
        Self::on_topic(stack, topic, producer, Some(mock))
    }

    fn on_topic(
        stack: Stack,
        topic: String,
        producer: FutureProducer,
        mock: Option<MockCluster<'static, DefaultProducerContext>>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            emulator: Emulator::new(&stack)?,
            producer,
            group: unique("bigquery-sink"),
            table: unique("user_logs").replace('-', "_"),
            topic,
            stack,
            produced: BTreeMap::new(),
            sent: 0,
            services: 0,
            _mock: mock,
        })
    }

    /// Produces payloads round-robin over the partitions and remembers where
    /// each one landed.
    async fn produce(&mut self, payloads: Vec<Vec<u8>>) -> anyhow::Result<()> {
        let mut pending = Vec::new();
        for payload in payloads {
            let partition = (self.sent % PARTITIONS as usize) as i32;
            self.sent += 1;
            let producer = self.producer.clone();
            let topic = self.topic.clone();
            pending.push(async move {
                let record = FutureRecord::<(), _>::to(&topic)
                    .partition(partition)
                    .payload(&payload);
                match producer
                    .send(record, Timeout::After(Duration::from_secs(30)))
                    .await
                {
                    Ok(delivery) => Ok(((delivery.partition, delivery.offset), payload)),
                    Err((err, _)) => Err(anyhow!("delivery failed: {err}")),
                }
            });
        }
        for result in futures::future::join_all(pending).await {
            let (coordinates, payload) = result?;
            self.produced.insert(coordinates, payload);
        }
        Ok(())
    }

    /// Starts the sink against `endpoint` (the emulator, or a proxy);
    /// `extra` may override any of the fixture's flags.
    fn start(&mut self, endpoint: &str, extra: &[&str]) -> anyhow::Result<Service> {
        self.services += 1;
        let name = format!("{}-{}", self.topic, self.services);
        ServiceFlags::bigquery_sink(
            &self.stack.kafka,
            &self.topic,
            &self.group,
            endpoint,
            &self.emulator.project,
            &self.emulator.dataset,
            &self.table,
        )
        .for_tests()
        .extra(extra)
        .start(&self.stack.dir.join("logs"), &name)
    }

    /// Waits until `relation` holds at least `rows` rows.
    async fn wait_rows(&self, relation: &str, rows: i64, service: &Service) -> anyhow::Result<()> {
        let stored = poll_until(
            TIMEOUT,
            Duration::from_millis(200),
            &format!("{rows} rows in {relation}"),
            || async {
                let count = self.emulator.count(relation).await?;
                Ok(Check::done_if(count >= rows, || format!("{count} rows")))
            },
        )
        .await;
        service.with_log(stored)
    }

    /// Creates the de-duplicated view exactly as docs/bigquery.md gives it.
    async fn create_dedup_view(&self) -> anyhow::Result<String> {
        self.emulator
            .create_documented_dedup_view(&self.table)
            .await
    }

    /// Every (partition, offset) in `relation`, with repeats.
    async fn coordinates(&self, relation: &str) -> anyhow::Result<Vec<Coordinates>> {
        self.emulator.coordinates(relation, &self.topic).await
    }

    /// `relation` holds exactly one row per expected record, and no other.
    async fn assert_exactly(
        &self,
        relation: &str,
        expected: &BTreeSet<Coordinates>,
    ) -> anyhow::Result<()> {
        let got = self.coordinates(relation).await?;
        let want: Vec<Coordinates> = expected.iter().copied().collect();
        if got != want {
            let mut counts: BTreeMap<Coordinates, usize> = BTreeMap::new();
            for c in &got {
                *counts.entry(*c).or_default() += 1;
            }
            let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(10).collect();
            let missing: Vec<_> = expected
                .iter()
                .filter(|c| !counts.contains_key(c))
                .take(10)
                .collect();
            let extra: Vec<_> = counts
                .keys()
                .filter(|c| !expected.contains(c))
                .take(10)
                .collect();
            bail!(
                "{relation}: {} rows for {} records; repeated {repeated:?}, missing {missing:?}, unexpected {extra:?}",
                got.len(),
                expected.len()
            );
        }
        Ok(())
    }

    fn all(&self) -> BTreeSet<Coordinates> {
        self.produced.keys().copied().collect()
    }

    fn dlq(&self) -> String {
        format!("{}.dlq", self.topic)
    }

    /// Nothing reached the dead-letter topic.
    fn assert_no_dead_letters(&self) {
        let letters =
            kafka::read_messages(&self.stack.kafka, &self.dlq(), 1, Duration::from_secs(3));
        assert!(letters.is_err(), "unexpected dead letters: {letters:?}");
    }
}

fn events(seed: u64, n: usize, bad_fraction: f64) -> Vec<Vec<u8>> {
    let mut generator = Generator::new(seed, Mix::All, chrono::Utc::now().timestamp_millis())
        .bad_fraction(bad_fraction);
    (0..n).map(|_| generator.next_event().payload).collect()
}

/// What the table must say about an event, worked out from its JSON with
/// serde_json and chrono alone: `None` if the sink must refuse it (not a
/// JSON object, or a present `@timestamp` that is not RFC 3339), else the
/// typed columns (`event_time` in microseconds when `@timestamp` is given).
fn oracle(payload: &[u8]) -> Option<(Option<i64>, [Option<String>; 5])> {
    let value: Value = serde_json::from_slice(payload).ok()?;
    let object = value.as_object()?;
    let time = match object.get("@timestamp") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            chrono::DateTime::parse_from_rfc3339(s)
                .ok()?
                .timestamp_micros(),
        ),
        Some(_) => return None,
    };
    let text = |k: &str| object.get(k).and_then(Value::as_str).map(str::to_owned);
    let id = |k: &str| match object.get(k) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    };
    Some((
        time,
        [
            text("info"),
            id("user_id"),
            text("keyword"),
            id("movie_id"),
            text("host"),
        ],
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_events_of_every_kind_land_once_with_their_payload() -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    f.produce(events(1, 20_000, 0.0)).await?;
    let endpoint = f.stack.bigquery_endpoint.clone();
    let service = f.start(&endpoint, &[])?;
    f.wait_rows(&f.table, 20_000, &service).await?;
    f.assert_exactly(&f.table, &f.all()).await?;

    // The table was created with the documented schema.
    let schema: Vec<String> = f
        .emulator
        .schema(&f.table)
        .await?
        .into_iter()
        .map(|(name, kind, mode)| format!("{name} {kind} {mode}"))
        .collect();
    assert_eq!(
        schema,
        [
            "event_time TIMESTAMP REQUIRED",
            "info STRING NULLABLE",
            "user_id STRING NULLABLE",
            "keyword STRING NULLABLE",
            "movie_id STRING NULLABLE",
            "host STRING NULLABLE",
            "payload JSON NULLABLE",
            "kafka_topic STRING NULLABLE",
            "kafka_partition INT64 NULLABLE",
            "kafka_offset INT64 NULLABLE",
            "ingested_at TIMESTAMP NULLABLE",
        ]
    );

    // A field outside the schema is queryable in every row: `message` is
    // unique per event.
    let t = f.emulator.sql_name(&f.table);
    let messages = f
        .emulator
        .scalar(&format!(
            "SELECT COUNT(DISTINCT JSON_VALUE(payload, '$.message')) FROM {t}"
        ))
        .await?;
    assert_eq!(messages, 20_000);

    // Kinds as generated.
    let mut want_kinds: BTreeMap<String, i64> = BTreeMap::new();
    for payload in f.produced.values() {
        let value: Value = serde_json::from_slice(payload)?;
        *want_kinds
            .entry(value["info"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let got_kinds: BTreeMap<String, i64> = f
        .emulator
        .query(&format!("SELECT info, COUNT(*) FROM {t} GROUP BY info"))
        .await?
        .iter()
        .map(|row| {
            (
                row[0].as_str().unwrap_or_default().to_owned(),
                int(&row[1]).unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(got_kinds, want_kinds);

    // Row by row for a sample: the payload round-trips, columns are typed.
    let sample = f
        .emulator
        .query(&format!(
            "SELECT kafka_partition, kafka_offset, TO_JSON_STRING(payload), JSON_VALUE(payload, '$.message'), \
             event_time, info, user_id, keyword, movie_id, host FROM {t} WHERE kafka_offset < 100"
        ))
        .await?;
    assert_eq!(sample.len(), 300);
    for row in &sample {
        let at = (
            i32::try_from(int(&row[0]).context("partition")?)?,
            int(&row[1]).context("offset")?,
        );
        let payload = f.produced.get(&at).context("a row nobody produced")?;
        let original: Value = serde_json::from_slice(payload)?;
        let stored: Value = serde_json::from_str(row[2].as_str().context("payload")?)?;
        assert_eq!(stored, original, "payload of {at:?}");
        assert_eq!(
            row[3].as_str(),
            original["message"].as_str(),
            "JSON_VALUE of {at:?}"
        );
        let (time, columns) = oracle(payload).context("a valid event")?;
        assert_eq!(int(&row[4]), time, "event_time of {at:?}");
        let got: Vec<Option<String>> = row[5..10]
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect();
        assert_eq!(got, columns.to_vec(), "typed columns of {at:?}");
    }
    f.assert_no_dead_letters();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_bigquery_refuses_go_to_the_dlq_with_its_reason_and_the_rest_lands(
) -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    // Malformed lines of every kind, and events BigQuery refuses: year 0 is
    // valid RFC 3339, but not a BigQuery TIMESTAMP.
    let mut payloads = events(2, 3_000, 0.1);
    for i in 0..30 {
        let year0 = format!(
            r#"{{"@timestamp":"0000-01-01T00:00:00Z","info":"login","user_id":"u{i}","message":"year 0 #{i}"}}"#
        );
        payloads.insert(i * 100, year0.into_bytes());
    }
    f.produce(payloads).await?;

    let mut refused_by_bigquery = BTreeSet::new();
    let mut refused_at_decode = BTreeSet::new();
    let mut kept = BTreeSet::new();
    for (at, payload) in &f.produced {
        if payload.starts_with(br#"{"@timestamp":"0000"#) {
            refused_by_bigquery.insert(*at);
        } else if oracle(payload).is_none() {
            refused_at_decode.insert(*at);
        } else {
            kept.insert(*at);
        }
    }
    assert!(
        refused_at_decode.len() > 50 && kept.len() > 2_700,
        "{} refused, {} kept",
        refused_at_decode.len(),
        kept.len()
    );

    let endpoint = f.stack.bigquery_endpoint.clone();
    let service = f.start(&endpoint, &[])?;
    f.wait_rows(&f.table, kept.len() as i64, &service).await?;
    let dead = refused_by_bigquery.len() + refused_at_decode.len();
    let letters = kafka::read_messages(&f.stack.kafka, &f.dlq(), dead, TIMEOUT)?;
    f.assert_exactly(&f.table, &kept).await?;

    let mut lettered = BTreeSet::new();
    for letter in &letters {
        let header = |k: &str| letter.headers.get(k).cloned().unwrap_or_default();
        assert_eq!(header("source.topic"), f.topic);
        let at: Coordinates = (
            header("source.partition").parse()?,
            header("source.offset").parse()?,
        );
        assert_eq!(
            f.produced.get(&at),
            Some(&letter.payload),
            "dead letter {at:?} carries the original bytes"
        );
        let (code, reason) = (header("error.code"), header("error"));
        if refused_by_bigquery.contains(&at) {
            assert_eq!(code, "bigquery_invalid", "{at:?}: {reason}");
            assert!(
                reason.starts_with("BigQuery refused the row: ") && reason.contains("0000-01-01"),
                "{reason}"
            );
        } else {
            assert!(
                refused_at_decode.contains(&at),
                "{at:?} should not be a dead letter: {code} {reason}"
            );
            assert!(
                [
                    "not_json",
                    "empty",
                    "invalid_utf8",
                    "not_an_object",
                    "bad_timestamp"
                ]
                .contains(&code.as_str()),
                "{at:?}: {code}"
            );
            assert!(!reason.is_empty());
        }
        lettered.insert(at);
    }
    assert_eq!(lettered.len(), dead, "each refused record once in the DLQ");
    let extra = kafka::read_messages(&f.stack.kafka, &f.dlq(), dead + 1, Duration::from_secs(3));
    assert!(extra.is_err(), "more dead letters than refused records");
    Ok(())
}

/// What Logstash sends with each `compression_type`: many records per
/// record batch, compressed, on a broker that serves them as Kafka does
/// (tansu needs one record per batch). Records inside a batch carry their
/// offsets as deltas from the batch's, so a slip there would file events
/// under the wrong coordinates, skip them or repeat them: every valid event
/// lands once, at its coordinates and with its own payload, and every
/// malformed line is dead-lettered once.
async fn compressed_batches_land_exactly_once(compression: &str) -> anyhow::Result<()> {
    let mut f = Fixture::on_mock_cluster(compression).await?;
    f.produce(events(10, 5_000, 0.02)).await?;
    let mut kept = BTreeSet::new();
    let mut refused = BTreeSet::new();
    for (at, payload) in &f.produced {
        if oracle(payload).is_some() {
            kept.insert(*at);
        } else {
            refused.insert(*at);
        }
    }
    assert!(
        refused.len() > 50 && kept.len() > 4_800,
        "{} refused, {} kept",
        refused.len(),
        kept.len()
    );

    let endpoint = f.stack.bigquery_endpoint.clone();
    let service = f.start(&endpoint, &[])?;
    f.wait_rows(&f.table, kept.len() as i64, &service).await?;
    let letters = kafka::read_messages(&f.stack.kafka, &f.dlq(), refused.len(), TIMEOUT)?;
    f.assert_exactly(&f.table, &kept).await?;

    // Each row holds the payload produced at its coordinates.
    let t = f.emulator.sql_name(&f.table);
    let rows = f
        .emulator
        .query(&format!(
            "SELECT kafka_partition, kafka_offset, TO_JSON_STRING(payload) FROM {t}"
        ))
        .await?;
    assert_eq!(rows.len(), kept.len());
    for row in &rows {
        let at = (
            i32::try_from(int(&row[0]).context("partition")?)?,
            int(&row[1]).context("offset")?,
        );
        let original: Value =
            serde_json::from_slice(f.produced.get(&at).context("a row nobody produced")?)?;
        let stored: Value = serde_json::from_str(row[2].as_str().context("payload")?)?;
        assert_eq!(stored, original, "payload of {at:?}");
    }

    let mut lettered = BTreeSet::new();
    for letter in &letters {
        let header = |k: &str| letter.headers.get(k).cloned().unwrap_or_default();
        assert_eq!(header("source.topic"), f.topic);
        let at: Coordinates = (
            header("source.partition").parse()?,
            header("source.offset").parse()?,
        );
        let (code, reason) = (header("error.code"), header("error"));
        assert!(
            refused.contains(&at),
            "{at:?} should not be a dead letter: {code} {reason}"
        );
        assert_eq!(
            f.produced.get(&at),
            Some(&letter.payload),
            "dead letter {at:?} carries the original bytes"
        );
        assert!(
            [
                "not_json",
                "empty",
                "invalid_utf8",
                "not_an_object",
                "bad_timestamp"
            ]
            .contains(&code.as_str()),
            "{at:?}: {code} {reason}"
        );
        lettered.insert(at);
    }
    assert_eq!(lettered, refused, "each malformed line once in the DLQ");
    let extra = kafka::read_messages(
        &f.stack.kafka,
        &f.dlq(),
        refused.len() + 1,
        Duration::from_secs(3),
    );
    assert!(extra.is_err(), "more dead letters than malformed lines");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_batches_land_exactly_once() -> anyhow::Result<()> {
    compressed_batches_land_exactly_once("gzip").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snappy_batches_land_exactly_once() -> anyhow::Result<()> {
    compressed_batches_land_exactly_once("snappy").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lz4_batches_land_exactly_once() -> anyhow::Result<()> {
    compressed_batches_land_exactly_once("lz4").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_batches_land_exactly_once() -> anyhow::Result<()> {
    compressed_batches_land_exactly_once("zstd").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_dropped_connections_lose_nothing() -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    f.produce(events(3, 10_000, 0.0)).await?;
    let proxy = FaultProxy::start(&f.stack.bigquery_endpoint)?;
    proxy.set_faults(vec![
        Fault::Status(500),
        Fault::Forward,
        Fault::Status(429),
        Fault::Drop,
        Fault::Forward,
        Fault::DropAfterForward,
        Fault::PlainStatus(503),
        Fault::Status(502),
        Fault::Forward,
    ]);
    let service = f.start(&proxy.endpoint(), &["--batch-max-rows", "100"])?;
    wait_for(TIMEOUT, "40 faults served", || proxy.faults_served() >= 40).await?;
    proxy.clear_faults();
    let served = proxy.served();
    assert_eq!(
        served.len(),
        6,
        "every kind of fault was served: {served:?}"
    );

    let view = f.create_dedup_view().await?;
    f.wait_rows(&view, 10_000, &service).await?;
    f.assert_exactly(&view, &f.all()).await?;
    // Forwarded-then-dropped requests were stored and sent again.
    assert!(f.emulator.count(&f.table).await? >= 10_000);
    f.assert_no_dead_letters();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_rows_bigquery_did_not_take_are_sent_again() -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    f.produce(events(6, 5_000, 0.0)).await?;
    let proxy = FaultProxy::start(&f.stack.bigquery_endpoint)?;
    // Rows refused with `backendError`, and requests refused as too large
    // (nothing stored): no row may end up twice in the table itself.
    proxy.set_faults(vec![
        Fault::FailOddRows,
        Fault::TooLargeAbove(60),
        Fault::Forward,
    ]);
    let service = f.start(&proxy.endpoint(), &["--batch-max-rows", "200"])?;
    f.wait_rows(&f.table, 5_000, &service).await?;
    f.assert_exactly(&f.table, &f.all()).await?;
    let served = proxy.served();
    assert!(
        served.get("FailOddRows").copied().unwrap_or(0) > 0,
        "{served:?}"
    );
    assert!(
        served.get("TooLargeAbove(60)").copied().unwrap_or(0) > 0,
        "{served:?}"
    );
    // A request refused as too large came back in halves.
    let inserts = proxy.inserts();
    assert!(
        inserts.iter().any(|i| i.rows > 60) && inserts.iter().any(|i| i.rows <= 60 && i.rows > 1),
        "{inserts:?}"
    );
    f.assert_no_dead_letters();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_and_restart_lose_nothing() -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    f.produce(events(4, 20_000, 0.0)).await?;
    let endpoint = f.stack.bigquery_endpoint.clone();
    let service = f.start(&endpoint, &[])?;
    f.wait_rows(&f.table, 4_000, &service).await?;
    service.kill()?;
    let written = f.emulator.count(&f.table).await?;
    assert!(
        written < 20_000,
        "killed after everything was written ({written} rows): not mid-stream"
    );
    let service = restart_alone(|| f.start(&endpoint, &[])).await?;
    let view = f.create_dedup_view().await?;
    f.wait_rows(&view, 20_000, &service).await?;
    f.assert_exactly(&view, &f.all()).await?;
    f.assert_no_dead_letters();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_over_the_byte_limit_is_sent() -> anyhow::Result<()> {
    const MAX_BYTES: usize = 200_000;
    const MAX_ROWS: usize = 7;
    let mut f = Fixture::new().await?;
    // Big events whose quotes and backslashes double in size once the
    // payload is a JSON string inside the request, between ordinary ones.
    let mut generator = Generator::new(5, Mix::All, chrono::Utc::now().timestamp_millis());
    let now = chrono::Utc::now().to_rfc3339();
    let payloads: Vec<Vec<u8>> = (0..400)
        .map(|i| {
            if i % 2 == 0 {
                let message = format!("{}#{i}", "\"\\".repeat(3_000 + i * 10));
                serde_json::json!({"@timestamp": now, "info": "big", "message": message})
                    .to_string()
                    .into_bytes()
            } else {
                generator.next_event().payload
            }
        })
        .collect();
    f.produce(payloads).await?;
    let proxy = FaultProxy::start(&f.stack.bigquery_endpoint)?;
    let service = f.start(
        &proxy.endpoint(),
        &[
            "--batch-max-bytes",
            &MAX_BYTES.to_string(),
            "--batch-max-rows",
            &MAX_ROWS.to_string(),
        ],
    )?;
    f.wait_rows(&f.table, 400, &service).await?;
    f.assert_exactly(&f.table, &f.all()).await?;

    let inserts = proxy.inserts();
    let largest = inserts.iter().map(|i| i.bytes).max().unwrap_or(0);
    assert!(largest <= MAX_BYTES, "a {largest}-byte request was sent");
    assert!(inserts.iter().all(|i| i.rows <= MAX_ROWS), "{inserts:?}");
    // The limit binds (big events are ~24 KB, ~48 KB as rows) and requests are packed.
    assert!(largest > MAX_BYTES / 2, "largest request {largest} bytes");
    assert_eq!(
        inserts.iter().map(|i| i.rows).sum::<usize>(),
        400,
        "each row sent once"
    );

    // The big payloads arrived whole.
    let t = f.emulator.sql_name(&f.table);
    let lengths = f
        .emulator
        .query(&format!(
            "SELECT kafka_partition, kafka_offset, LENGTH(JSON_VALUE(payload, '$.message')) FROM {t} WHERE info = 'big'"
        ))
        .await?;
    assert_eq!(lengths.len(), 200);
    for row in lengths {
        let at = (
            i32::try_from(int(&row[0]).context("partition")?)?,
            int(&row[1]).context("offset")?,
        );
        let original: Value = serde_json::from_slice(f.produced.get(&at).context("unknown row")?)?;
        let want = original["message"]
            .as_str()
            .map(|m| m.chars().count() as i64);
        assert_eq!(int(&row[2]), want, "message length of {at:?}");
    }
    f.assert_no_dead_letters();
    Ok(())
}

/// A column dropped while the sink runs: BigQuery refuses every row as
/// invalid. That is the table's fault, not the rows': nothing may be
/// dead-lettered or committed, readiness turns false, and once the schema
/// is restored every row lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_changed_while_running_waits_for_the_fix_instead_of_dead_lettering(
) -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    let proxy = FaultProxy::start(&f.stack.bigquery_endpoint)?;
    let port = e2e::free_port()?;
    let metrics = format!("127.0.0.1:{port}");
    let service = f.start(&proxy.endpoint(), &["--metrics-addr", &metrics])?;
    f.produce(events(8, 1_000, 0.0)).await?;
    f.wait_rows(&f.table, 1_000, &service).await?;

    let documented = f.emulator.schema_fields(&f.table).await?;
    let without_host: Vec<serde_json::Value> = documented
        .as_array()
        .context("schema fields")?
        .iter()
        .filter(|field| field["name"] != "host")
        .cloned()
        .collect();
    f.emulator
        .set_schema(&f.table, serde_json::Value::Array(without_host))
        .await?;
    proxy.set_faults(vec![Fault::RefuseRowsAs("no such field: host.")]);
    f.produce(events(9, 1_000, 0.0)).await?;
    let log = service.log.clone();
    wait_for(TIMEOUT, "the schema problem in the log", || {
        std::fs::read_to_string(&log).is_ok_and(|l| {
            l.contains("table_schema_changed") && l.contains("column `host` is missing")
        })
    })
    .await?;
    wait_for(TIMEOUT, "three writes refused", || {
        proxy.faults_served() >= 3
    })
    .await?;
    assert!(!e2e::ready(port).await?, "ready while every row is refused");
    assert_eq!(f.emulator.count(&f.table).await?, 1_000);
    f.assert_no_dead_letters();

    f.emulator.set_schema(&f.table, documented).await?;
    proxy.clear_faults();
    f.wait_rows(&f.table, 2_000, &service).await?;
    f.assert_exactly(&f.table, &f.all()).await?;
    f.assert_no_dead_letters();
    e2e::wait_for_async(TIMEOUT, "readiness after the fix", || e2e::ready(port)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_denied_turns_readiness_false_until_fixed_and_loses_nothing(
) -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    f.produce(events(7, 2_000, 0.0)).await?;
    let proxy = FaultProxy::start(&f.stack.bigquery_endpoint)?;
    proxy.set_faults(vec![Fault::Status(403)]);
    let port = e2e::free_port()?;
    let metrics = format!("127.0.0.1:{port}");
    let service = f.start(&proxy.endpoint(), &["--metrics-addr", &metrics])?;
    let log = service.log.clone();
    wait_for(TIMEOUT, "the operator message in the log", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("roles/bigquery.dataEditor"))
    })
    .await?;
    // Retried periodically, readiness false, nothing written or committed.
    wait_for(TIMEOUT, "three writes denied", || {
        proxy.faults_served() >= 3
    })
    .await?;
    assert!(
        !e2e::ready(port).await?,
        "ready while BigQuery denies access"
    );
    assert_eq!(f.emulator.count(&f.table).await?, 0);
    let committed = kafka::committed(&f.stack.kafka, &f.group, &f.topic, PARTITIONS)?;
    assert_eq!(
        committed,
        vec![None; PARTITIONS as usize],
        "nothing committed while denied"
    );

    proxy.clear_faults();
    f.wait_rows(&f.table, 2_000, &service).await?;
    f.assert_exactly(&f.table, &f.all()).await?;
    e2e::wait_for_async(TIMEOUT, "readiness after the fix", || e2e::ready(port)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_problems_stop_the_sink_with_one_clear_line() -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    let endpoint = f.stack.bigquery_endpoint.clone();
    // An existing table lacking columns.
    f.emulator
        .create_table(
            &f.table,
            serde_json::json!([
                {"name": "event_time", "type": "TIMESTAMP", "mode": "REQUIRED"},
                {"name": "info", "type": "STRING"},
                {"name": "kafka_offset", "type": "STRING"},
            ]),
        )
        .await?;
    let missing_dataset = unique("nope").replace('-', "_");
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &[],
            &[
                "cannot hold the sink's rows",
                "`payload` is missing",
                "`kafka_offset` is STRING (want INT64)",
                "ALTER TABLE",
            ],
        ),
        (
            &["--dataset", missing_dataset.as_str()],
            &["does not exist", missing_dataset.as_str()],
        ),
        (
            &["--batch-max-bytes", "10485760"],
            &["--batch-max-bytes", "10 MB"],
        ),
    ];
    for (extra, want) in cases {
        let mut service = f.start(&endpoint, extra)?;
        let code = service.wait(Duration::from_secs(60)).await?;
        let log = std::fs::read_to_string(&service.log)?;
        assert_eq!(code, Some(1), "{extra:?}: {log}");
        let line = log
            .lines()
            .find(|l| l.starts_with("error: "))
            .with_context(|| format!("no error line: {log}"))?;
        for needle in want {
            assert!(
                line.contains(needle),
                "{extra:?}: {line:?} lacks {needle:?}"
            );
        }
        assert!(!log.contains("panicked"), "{log}");
    }
    Ok(())
}

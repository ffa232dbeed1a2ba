//! Building blocks of the fault suite (`make faults`, `src/bin/faults.rs`):
//! a [`Pipeline`] (a topic, one of the two services and its sink) that
//! remembers every record it produced and what the sink must do with it, a
//! paced [`Load`], and the [`Tally`] that says what was lost, double-counted
//! or dead-lettered.
//!
//! What counts as "in the sink":
//! - redis-sink: each valid event adds exactly 1 to one `rank:*:total`
//!   member, so the totals' scores are compared member by member with the
//!   model (short = lost, over = double-counted), and every key of the
//!   contract must equal the model (`redis_model`);
//! - bigquery-sink: the distinct (partition, offset) of the de-duplicated
//!   view exactly as docs/bigquery.md defines it; raw duplicates in the table
//!   (the documented at-least-once window) are reported separately.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::bigquery::Emulator;
use crate::generator::{Generated, Truth};
use crate::process::Service;
use crate::redis_model;
use crate::service::ServiceFlags;
use crate::{kafka, poll_until, unique, wait_for_async, Check, Stack};

/// Partitions of every topic the suite creates (as in production).
pub const PARTITIONS: i32 = 3;
/// `--history-size` of redis-sink (its default).
const HISTORY_SIZE: usize = 50;
/// How long a pipeline may take to apply everything after the faults end.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(300);

/// (partition, offset) of a Kafka record.
type Coordinates = (i32, i64);

/// Which service a pipeline runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    /// redis-sink on a user3-like topic.
    Redis,
    /// bigquery-sink on a user2-like topic.
    BigQuery,
}

impl SinkKind {
    /// The binary's name.
    pub fn binary(self) -> &'static str {
        match self {
            Self::Redis => "redis-sink",
            Self::BigQuery => "bigquery-sink",
        }
    }
}

/// A record to produce, and what the sink must do with it.
#[derive(Debug, Clone)]
pub struct Item {
    /// The message value.
    pub payload: Vec<u8>,
    /// True if the sink must apply it, false if it must dead-letter it.
    pub kept: bool,
    /// redis-sink: what applying it does (`None` for bigquery-sink).
    pub truth: Option<Truth>,
}

impl Item {
    /// A generated event as `kind` must treat it.
    pub fn generated(event: Generated, kind: SinkKind) -> Self {
        let kept = match kind {
            SinkKind::Redis => event.valid && event.truth.is_some(),
            SinkKind::BigQuery => event.valid,
        };
        Self {
            payload: event.payload,
            kept,
            truth: event.truth.filter(|_| kept && kind == SinkKind::Redis),
        }
    }
}

/// Where the records of a [`Pipeline`] come from and go to.
pub struct PipelineConfig {
    /// Bootstrap servers (tansu, or a mock cluster).
    pub bootstrap: String,
    /// redis-sink's Redis.
    pub redis_url: String,
    /// bigquery-sink's `--bigquery-endpoint` (the emulator or a proxy).
    pub bigquery_endpoint: String,
    /// Creates the topics through the admin API (false: the caller did,
    /// e.g. on a mock cluster, which has no admin API).
    pub create_topics: bool,
}

impl PipelineConfig {
    /// Everything on the local stack.
    pub fn stack(stack: &Stack) -> Self {
        Self {
            bootstrap: stack.kafka.clone(),
            redis_url: stack.redis_url.clone(),
            bigquery_endpoint: stack.bigquery_endpoint.clone(),
            create_topics: true,
        }
    }
}

/// A topic, the service consuming it and its sink, with everything produced.
pub struct Pipeline {
    /// The service under test.
    pub kind: SinkKind,
    config: PipelineConfig,
    /// The topic.
    pub topic: String,
    group: String,
    /// redis-sink's key prefix (isolates the pipeline's keys).
    prefix: String,
    emulator: Emulator,
    table: String,
    producer: FutureProducer,
    /// Every record produced, by (partition, offset).
    produced: BTreeMap<Coordinates, Item>,
    sent: usize,
    log_dir: PathBuf,
    starts: usize,
}

impl Pipeline {
    /// A pipeline with fresh topics (`<topic>` and `<topic>.dlq`), group,
    /// key prefix and table. `topic` names the topic when the caller created
    /// it (mock cluster).
    pub async fn new(
        stack: &Stack,
        kind: SinkKind,
        config: PipelineConfig,
        topic: Option<String>,
    ) -> anyhow::Result<Self> {
        let topic = topic.unwrap_or_else(|| {
            unique(match kind {
                SinkKind::Redis => "faults-user3",
                SinkKind::BigQuery => "faults-user2",
            })
        });
        if config.create_topics {
            kafka::create_topic(&config.bootstrap, &topic, PARTITIONS).await?;
            kafka::create_topic(&config.bootstrap, &format!("{topic}.dlq"), PARTITIONS).await?;
        }
        Ok(Self {
            kind,
            producer: kafka::producer(&config.bootstrap)?,
            config,
            group: unique(kind.binary()),
            prefix: format!("{topic}:"),
            table: topic.replace('-', "_"),
            emulator: Emulator::new(stack)?,
            produced: BTreeMap::new(),
            sent: 0,
            log_dir: stack.dir.join("logs"),
            starts: 0,
            topic,
        })
    }

    /// Produces from now on in record batches of up to 64 KB instead of one
    /// record per batch (see [`kafka::producer`] for why that is the default).
    pub fn batch_production(&mut self) -> anyhow::Result<()> {
        self.producer = kafka::producer_with(&self.config.bootstrap, false)?;
        Ok(())
    }

    /// Produces from now on as Logstash's kafka output does: batched, with
    /// `compression` (gzip, snappy, lz4, zstd).
    pub fn logstash_production(&mut self, compression: &str) -> anyhow::Result<()> {
        self.producer = kafka::logstash_producer(&self.config.bootstrap, compression)?;
        Ok(())
    }

    /// Instances started from now on join a new consumer group (a renamed
    /// group, a blue/green deployment).
    pub fn rename_group(&mut self) {
        self.group = unique(self.kind.binary());
    }

    /// Starts producing `items` round-robin over the partitions at about
    /// `per_second`; [`Pipeline::finish`] waits for the deliveries.
    pub fn start_load(&mut self, items: Vec<Item>, per_second: usize) -> Load {
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        let first = self.sent;
        self.sent += items.len();
        // Deliveries are awaited in chunks of a tenth of a second's worth.
        let chunk = (per_second / 10).clamp(1, 5_000);
        let delivered = Arc::new(Mutex::new(vec![0; PARTITIONS as usize]));
        let delivered_ends = Arc::clone(&delivered);
        let record = move |out: &mut Vec<(Coordinates, Item)>,
                           result: anyhow::Result<(Coordinates, Item)>| {
            let (coordinates, item) = result?;
            if let Some(end) = lock(&delivered_ends).get_mut(coordinates.0 as usize) {
                *end = (*end).max(coordinates.1 + 1);
            }
            out.push((coordinates, item));
            anyhow::Ok(())
        };
        let task = tokio::spawn(async move {
            let mut out = Vec::with_capacity(items.len());
            let started = Instant::now();
            let mut pending = Vec::new();
            for (i, item) in items.into_iter().enumerate() {
                let partition = ((first + i) % PARTITIONS as usize) as i32;
                let producer = producer.clone();
                let topic = topic.clone();
                pending.push(async move {
                    let record = FutureRecord::<(), _>::to(&topic)
                        .partition(partition)
                        .payload(&item.payload);
                    match producer
                        .send(record, Timeout::After(Duration::from_secs(60)))
                        .await
                    {
                        Ok(delivery) => Ok(((delivery.partition, delivery.offset), item)),
                        Err((err, _)) => Err(anyhow::anyhow!("delivery failed: {err}")),
                    }
                });
                if pending.len() == chunk {
                    for result in futures::future::join_all(std::mem::take(&mut pending)).await {
                        record(&mut out, result)?;
                    }
                    // Paces the load: record i is not sent before i / per_second s.
                    let due = Duration::from_secs_f64((i + 1) as f64 / per_second as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            for result in futures::future::join_all(pending).await {
                record(&mut out, result)?;
            }
            Ok(out)
        });
        Load { task, delivered }
    }

    /// Waits until every record of `load` is delivered and remembers them.
    pub async fn finish(&mut self, load: Load) -> anyhow::Result<()> {
        for (coordinates, item) in load.task.await.context("load task")?? {
            self.produced.insert(coordinates, item);
        }
        Ok(())
    }

    /// Produces `items` as fast as the broker takes them.
    pub async fn produce(&mut self, items: Vec<Item>) -> anyhow::Result<()> {
        let load = self.start_load(items, usize::MAX / 2);
        self.finish(load).await
    }

    /// The service's flags.
    fn flags(&self) -> ServiceFlags {
        let (bootstrap, topic, group) = (&self.config.bootstrap, &self.topic, &self.group);
        match self.kind {
            SinkKind::Redis => ServiceFlags::redis_sink(
                bootstrap,
                topic,
                group,
                &self.config.redis_url,
                &self.prefix,
            ),
            SinkKind::BigQuery => ServiceFlags::bigquery_sink(
                bootstrap,
                topic,
                group,
                &self.config.bigquery_endpoint,
                &self.emulator.project,
                &self.emulator.dataset,
                &self.table,
            ),
        }
        .for_tests()
    }

    /// Starts one more instance of the service.
    pub fn start(&mut self) -> anyhow::Result<Instance> {
        self.starts += 1;
        let metrics_port = crate::free_port()?;
        let name = format!("{}-{}", self.topic, self.starts);
        let service = self
            .flags()
            .metrics_port(metrics_port)
            .start(&self.log_dir, &name)?;
        Ok(Instance {
            service,
            metrics_port,
        })
    }

    /// Records produced so far.
    pub fn produced(&self) -> usize {
        self.produced.len()
    }

    /// Next offset per partition of everything produced so far.
    fn produced_ends(&self) -> Vec<i64> {
        let mut ends = vec![0; PARTITIONS as usize];
        for (partition, offset) in self.produced.keys() {
            if let Some(end) = ends.get_mut(*partition as usize) {
                *end = (*end).max(offset + 1);
            }
        }
        ends
    }

    /// Next offset per partition the sink has durably applied: the offsets
    /// redis-sink stores in Redis, bigquery-sink's committed offsets.
    pub async fn applied(&self) -> anyhow::Result<Vec<i64>> {
        match self.kind {
            SinkKind::Redis => {
                let mut redis = self.redis().await?;
                crate::redis::applied_offsets(&mut redis, &self.prefix, &self.topic, PARTITIONS)
                    .await
            }
            SinkKind::BigQuery => self.committed().await,
        }
    }

    /// The group's committed Kafka offsets (0 where none).
    pub async fn committed(&self) -> anyhow::Result<Vec<i64>> {
        let (bootstrap, group, topic) = (
            self.config.bootstrap.clone(),
            self.group.clone(),
            self.topic.clone(),
        );
        let committed = tokio::task::spawn_blocking(move || {
            kafka::committed(&bootstrap, &group, &topic, PARTITIONS)
        })
        .await??;
        Ok(committed.into_iter().map(|o| o.unwrap_or(0)).collect())
    }

    /// Total records applied so far.
    pub async fn applied_total(&self) -> anyhow::Result<i64> {
        Ok(self.applied().await?.iter().sum())
    }

    /// Waits until the sink has applied more than `than` records in total.
    pub async fn wait_progress(&self, than: i64, instance: &Instance) -> anyhow::Result<i64> {
        let what = format!("progress past {than} records");
        self.poll_applied(Duration::from_millis(50), &what, instance, |applied| {
            let total = applied.iter().sum();
            (total > than).then_some(total).into()
        })
        .await
    }

    /// The recovery time after a fault: from now until the sink has applied
    /// everything produced until now (by `load`, if one is running). Records
    /// the load produces afterwards do not count.
    pub async fn recover(
        &self,
        load: Option<&Load>,
        instance: &Instance,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let target = match load {
            Some(load) => {
                let delivered = lock(&load.delivered).clone();
                let mut ends = self.produced_ends();
                for (end, d) in ends.iter_mut().zip(delivered) {
                    *end = (*end).max(d);
                }
                ends
            }
            None => self.produced_ends(),
        };
        self.wait_applied(&target, instance).await?;
        Ok(started.elapsed())
    }

    /// Waits until the sink has applied every record produced so far.
    pub async fn wait_caught_up(&self, instance: &Instance) -> anyhow::Result<()> {
        self.wait_applied(&self.produced_ends(), instance).await
    }

    /// Waits until the sink has applied each partition up to `want`.
    /// (Every 100 ms: [`Pipeline::recover`] times this wait.)
    async fn wait_applied(&self, want: &[i64], instance: &Instance) -> anyhow::Result<()> {
        let what = format!("every partition applied up to {want:?}");
        self.poll_applied(Duration::from_millis(100), &what, instance, |applied| {
            let done = applied.iter().zip(want).all(|(a, w)| a >= w);
            Check::done_if(done, || format!("applied {applied:?}"))
        })
        .await
    }

    /// Looks at what the sink has applied ([`Pipeline::applied`]) `every`
    /// so often until `check` finds what it waits for, for up to
    /// [`CATCH_UP_TIMEOUT`]; an error shows `instance`'s log.
    async fn poll_applied<T>(
        &self,
        every: Duration,
        what: &str,
        instance: &Instance,
        check: impl Fn(&[i64]) -> Check<T>,
    ) -> anyhow::Result<T> {
        let found = poll_until(CATCH_UP_TIMEOUT, every, what, || async {
            Ok(check(&self.applied().await?))
        })
        .await;
        instance.service.with_log(found)
    }

    async fn redis(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        crate::redis::connect(&self.config.redis_url).await
    }

    /// Compares the sink with what was produced.
    pub async fn tally(&self) -> anyhow::Result<Tally> {
        let mut tally = Tally {
            produced: self.produced.len(),
            expected_in_sink: self.produced.values().filter(|i| i.kept).count(),
            dlq_expected: self.produced.values().filter(|i| !i.kept).count(),
            ..Tally::default()
        };
        match self.kind {
            SinkKind::Redis => self.tally_redis(&mut tally).await?,
            SinkKind::BigQuery => self.tally_bigquery(&mut tally).await?,
        }
        self.tally_dead_letters(&mut tally).await?;
        Ok(tally)
    }

    async fn tally_redis(&self, tally: &mut Tally) -> anyhow::Result<()> {
        let want = redis_model::expected(
            &self.prefix,
            self.produced.values().filter_map(|i| i.truth.as_ref()),
            HISTORY_SIZE,
        );
        let got = redis_model::dump(&mut self.redis().await?, &self.prefix).await?;
        for kind in ["search", "movie"] {
            let key = format!("{}rank:{kind}:total", self.prefix);
            let empty = BTreeMap::new();
            let (want_total, got_total) = (
                want.get(&key).unwrap_or(&empty),
                got.get(&key).unwrap_or(&empty),
            );
            let members: BTreeSet<&String> = want_total.keys().chain(got_total.keys()).collect();
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
    }

    async fn tally_bigquery(&self, tally: &mut Tally) -> anyhow::Result<()> {
        let view = self
            .emulator
            .create_documented_dedup_view(&self.table)
            .await?;
        let raw = self.emulator.coordinates(&self.table, &self.topic).await?;
        let deduplicated = self.emulator.coordinates(&view, &self.topic).await?;
        let distinct: BTreeSet<Coordinates> = deduplicated.iter().copied().collect();
        tally.double_counted = deduplicated.len() - distinct.len();
        tally.raw_duplicates = raw.len() - raw.iter().collect::<BTreeSet<_>>().len();
        for (coordinates, item) in &self.produced {
            match (item.kept, distinct.contains(coordinates)) {
                (true, true) => tally.in_sink += 1,
                (true, false) => tally.lost += 1,
                (false, true) => tally.problems.push(format!(
                    "{coordinates:?} must be dead-lettered but is a row"
                )),
                (false, false) => {}
            }
        }
        let unknown = distinct
            .iter()
            .filter(|c| !self.produced.contains_key(c))
            .count();
        if unknown > 0 {
            tally
                .problems
                .push(format!("{unknown} rows of records never produced"));
        }
        Ok(())
    }

    async fn tally_dead_letters(&self, tally: &mut Tally) -> anyhow::Result<()> {
        let (bootstrap, dlq) = (self.config.bootstrap.clone(), format!("{}.dlq", self.topic));
        let expected = tally.dlq_expected;
        // Reads the expected letters, then listens 3 s more for any beyond
        // them (a valid record dead-lettered also shows as lost).
        let letters = tokio::task::spawn_blocking(move || {
            kafka::read_at_least(
                &bootstrap,
                &dlq,
                expected,
                Duration::from_secs(60),
                Duration::from_secs(3),
            )
        })
        .await??;
        let mut sources = BTreeSet::new();
        for letter in &letters {
            let reason = letter.headers.get("error").map(String::as_str);
            if reason.is_none_or(|r| r.trim().is_empty()) {
                tally.dlq_without_reason += 1;
            }
            if let Some(code) = letter.headers.get("error.code") {
                *tally.dlq_codes.entry(code.clone()).or_default() += 1;
            }
            let source = (
                letter
                    .headers
                    .get("source.partition")
                    .and_then(|p| p.parse::<i32>().ok()),
                letter
                    .headers
                    .get("source.offset")
                    .and_then(|o| o.parse::<i64>().ok()),
            );
            match source {
                (Some(p), Some(o)) => {
                    sources.insert((p, o));
                }
                _ => tally.problems.push(format!(
                    "a dead letter without source.partition/offset: {:?}",
                    letter.headers
                )),
            }
        }
        tally.dlq = sources.len();
        for coordinates in &sources {
            match self.produced.get(coordinates) {
                Some(item) if item.kept => tally
                    .problems
                    .push(format!("{coordinates:?} is valid but was dead-lettered")),
                Some(_) => {}
                None => tally
                    .problems
                    .push(format!("a dead letter for {coordinates:?}, never produced")),
            }
        }
        if tally.dlq != tally.dlq_expected {
            tally.problems.push(format!(
                "{} records dead-lettered, {} expected",
                tally.dlq, tally.dlq_expected
            ));
        }
        Ok(())
    }
}

/// Records being produced in the background.
pub struct Load {
    task: tokio::task::JoinHandle<anyhow::Result<Vec<(Coordinates, Item)>>>,
    /// Next offset per partition of what is delivered so far.
    delivered: Arc<Mutex<Vec<i64>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running instance of a service, with its metrics endpoint.
pub struct Instance {
    /// The process.
    pub service: Service,
    metrics_port: u16,
}

impl Instance {
    /// The sum of a counter over all its labels, from `/metrics`.
    pub async fn counter(&self, name: &str) -> anyhow::Result<f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        let text = reqwest::get(&url).await?.text().await?;
        Ok(text
            .lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Waits until `/metrics` answers (the service has started).
    pub async fn wait_metrics(&self) -> anyhow::Result<()> {
        let answered = wait_for_async(Duration::from_secs(60), "/metrics", || async {
            Ok(self.counter("sink_events_consumed_total").await.is_ok())
        })
        .await;
        self.service.with_log(answered)
    }
}

/// What a scenario left in the sink, compared with what it produced.
#[derive(Debug, Default)]
pub struct Tally {
    /// Records produced.
    pub produced: usize,
    /// Records the sink must apply (the rest must be dead-lettered).
    pub expected_in_sink: usize,
    /// Records the sink holds (Redis: the rankings' total counts).
    pub in_sink: usize,
    /// Records that must be in the sink and are not.
    pub lost: usize,
    /// Records counted more than once (Redis) / repeated in the
    /// de-duplicated view (BigQuery).
    pub double_counted: usize,
    /// BigQuery: repeated rows in the raw table (at-least-once window).
    pub raw_duplicates: usize,
    /// Distinct records dead-lettered.
    pub dlq: usize,
    /// Records that must be dead-lettered.
    pub dlq_expected: usize,
    /// Dead letters without an `error` header.
    pub dlq_without_reason: usize,
    /// Dead letters by `error.code`.
    pub dlq_codes: BTreeMap<String, usize>,
    /// Anything else that does not match the contract.
    pub problems: Vec<String>,
}

impl Tally {
    /// True if nothing was lost, double-counted or dead-lettered wrongly.
    pub fn holds(&self) -> bool {
        self.lost == 0
            && self.double_counted == 0
            && self.dlq_without_reason == 0
            && self.in_sink == self.expected_in_sink
            && self.problems.is_empty()
    }
}

//! A [`Pipeline`]: a topic on a [`Broker`], the service under test and its
//! sink. It produces records round-robin over the partitions and remembers
//! where each one landed and what the sink must do with it; it starts
//! instances, waits until the sink applied what was produced, and compares
//! the sink with it ([`Tally`]). Every end-to-end test of a service and the
//! fault suite build on it; core_loop (in-process consumers) and the
//! benchmark use its [`Broker`].
//!
//! A sink plugs in as one [`SinkSide`] (`crate::redis::RedisSide`,
//! `crate::bigquery::BigQuerySide`); a broker as a [`Broker`] (tansu, the
//! mock cluster).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::BoxFuture;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::broker::Broker;
use crate::generator::{Generated, Mix, Truth};
use crate::metrics::Scrape;
use crate::process::Service;
use crate::service::ServiceFlags;
use crate::{kafka, poll_until, unique, wait_for_async, Check, Stack, PARTITIONS};

/// How long a pipeline may take to apply everything produced.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(300);

/// (partition, offset) of a Kafka record.
pub type Coordinates = (i32, i64);

/// The sink end of a pipeline: which service writes to it, with which
/// flags, and how to read back what it holds.
pub trait SinkSide: Send + Sync {
    /// The binary of the service that writes to this sink.
    fn binary(&self) -> &'static str;

    /// The events the sink's topic carries (user3 only search and
    /// movie_detail, user2 every kind).
    fn mix(&self) -> Mix;

    /// The service's flags for `topic` and `group` on `bootstrap`.
    fn flags(&self, bootstrap: &str, topic: &str, group: &str) -> ServiceFlags;

    /// Whether the sink applies `event` (otherwise it must dead-letter it).
    fn keeps(&self, event: &Generated) -> bool;

    /// The next offset per partition the sink stores beside its data, if it
    /// stores offsets (`None`: what the group committed is what it applied).
    fn stored_offsets<'a>(
        &'a self,
        topic: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Option<Vec<i64>>>>;

    /// Compares what the sink holds with `produced`: fills the tally's
    /// `in_sink`, `lost`, `double_counted`, `raw_duplicates` and `problems`.
    fn tally<'a>(
        &'a self,
        topic: &'a str,
        produced: &'a BTreeMap<Coordinates, Item>,
        tally: &'a mut Tally,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
}

/// A record to produce, and what the sink must do with it.
#[derive(Debug, Clone)]
pub struct Item {
    /// The message value.
    pub payload: Vec<u8>,
    /// True if the sink must apply it, false if it must dead-letter it.
    pub kept: bool,
    /// What applying a kept search / movie_detail event does in Redis.
    pub truth: Option<Truth>,
}

/// A topic, the service consuming it and its sink, with everything produced.
pub struct Pipeline {
    /// Where the topic lives.
    pub broker: Broker,
    sink: Box<dyn SinkSide>,
    /// The topic (its dead letters go to `<topic>.dlq`).
    pub topic: String,
    /// The consumer group instances started from now on join.
    pub group: String,
    producer: FutureProducer,
    /// Every record produced, by (partition, offset).
    produced: BTreeMap<Coordinates, Item>,
    sent: usize,
    log_dir: PathBuf,
    starts: usize,
}

impl Pipeline {
    /// A pipeline on fresh topics (`<topic>` and `<topic>.dlq`) of `broker`
    /// with a fresh group, writing to `sink`.
    pub async fn new(
        stack: &Stack,
        broker: Broker,
        sink: Box<dyn SinkSide>,
    ) -> anyhow::Result<Self> {
        let prefix = match sink.mix() {
            Mix::User3 => "user3",
            Mix::All => "user2",
        };
        let topic = broker.with_logs(broker.topic_with_dlq(prefix).await)?;
        Ok(Self {
            producer: broker.producer()?,
            group: unique(sink.binary()),
            sink,
            broker,
            topic,
            produced: BTreeMap::new(),
            sent: 0,
            log_dir: stack.dir.join("logs"),
            starts: 0,
        })
    }

    /// The dead-letter topic.
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.topic)
    }

    /// Produces from now on in record batches of up to 64 KB instead of one
    /// record per batch (see [`kafka::producer`] for why that is the default
    /// on tansu).
    pub fn batch_production(&mut self) -> anyhow::Result<()> {
        self.producer = kafka::producer_with(self.broker.bootstrap(), false)?;
        Ok(())
    }

    /// Produces from now on as Logstash's kafka output does: batched, with
    /// `compression` (none, gzip, snappy, lz4, zstd).
    pub fn logstash_production(&mut self, compression: &str) -> anyhow::Result<()> {
        self.producer = kafka::logstash_producer(self.broker.bootstrap(), compression)?;
        Ok(())
    }

    /// The binary of the service under test.
    pub fn binary(&self) -> &'static str {
        self.sink.binary()
    }

    /// The events the pipeline's topic carries.
    pub fn mix(&self) -> Mix {
        self.sink.mix()
    }

    /// Instances started from now on join a new consumer group (a renamed
    /// group, a blue/green deployment).
    pub fn rename_group(&mut self) {
        self.group = unique(self.sink.binary());
    }

    /// `event` as the sink must treat it.
    pub fn item(&self, event: Generated) -> Item {
        let kept = self.sink.keeps(&event);
        Item {
            payload: event.payload,
            kept,
            truth: event.truth.filter(|_| kept),
        }
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
        let delivered = load.task.await.context("load task")?;
        for (coordinates, item) in self.broker.with_logs(delivered)? {
            // Two deliveries at one offset would make the tally compare
            // against the wrong record.
            if self.produced.insert(coordinates, item).is_some() {
                anyhow::bail!("two records delivered at {coordinates:?}");
            }
        }
        Ok(())
    }

    /// Produces `items` as fast as the broker takes them.
    pub async fn produce(&mut self, items: Vec<Item>) -> anyhow::Result<()> {
        let load = self.start_load(items, usize::MAX / 2);
        self.finish(load).await
    }

    /// Produces generated events as fast as the broker takes them.
    pub async fn produce_events(&mut self, events: Vec<Generated>) -> anyhow::Result<()> {
        let items = events.into_iter().map(|e| self.item(e)).collect();
        self.produce(items).await
    }

    /// The flags of the next instance (without its metrics port).
    pub fn flags(&self) -> ServiceFlags {
        let flags = self
            .sink
            .flags(self.broker.bootstrap(), &self.topic, &self.group)
            .for_tests();
        match self.broker.options_file() {
            Some(file) => flags.set("--kafka-options-file", file.display().to_string()),
            None => flags,
        }
    }

    /// Starts one more instance of the service.
    pub fn start(&mut self) -> anyhow::Result<Instance> {
        self.start_with(&[])
    }

    /// Starts one more instance with more flags; a flag of the pipeline's
    /// given again in `extra` takes the value given there.
    pub fn start_with(&mut self, extra: &[&str]) -> anyhow::Result<Instance> {
        self.start_logging(extra, "info")
    }

    /// Starts one more instance with more flags, logging what `log_filter`
    /// (RUST_LOG) lets through.
    pub fn start_logging(&mut self, extra: &[&str], log_filter: &str) -> anyhow::Result<Instance> {
        self.starts += 1;
        let metrics_port = crate::free_port()?;
        let name = format!("{}-{}", self.topic, self.starts);
        let service = self
            .flags()
            .metrics_port(metrics_port)
            .extra(extra)
            .log_filter(log_filter)
            .start(&self.log_dir, &name)?;
        Ok(Instance {
            service,
            metrics_port,
        })
    }

    /// Starts the group's only instance just after the last one was killed
    /// (extra flags as in [`Pipeline::start_with`]). tansu 0.6 sometimes
    /// answers that join by leaving every partition with the killed member,
    /// which it never expires (seen in about one run in ten, the kill a
    /// second or two after an assignment): the new instance gets none, and
    /// nothing moves until the 300 s rebalance timeout. Apache Kafka drops
    /// the dead member after the session timeout. Joining again makes tansu
    /// rebalance, so a test checks our guarantee instead of waiting out a
    /// broker bug.
    pub async fn restart_alone(&mut self, extra: &[&str]) -> anyhow::Result<Instance> {
        for _ in 0..3 {
            let instance = self.start_with(extra)?;
            let assignment = poll_until(
                Duration::from_secs(60),
                Duration::from_millis(20),
                "an assignment",
                || std::future::ready(Ok(instance.service.last_assignment().into())),
            )
            .await;
            if !instance.service.with_log(assignment)?.ends_with("[]") {
                return Ok(instance);
            }
            instance.service.kill()?;
        }
        anyhow::bail!("tansu gave the only instance no partitions three times in a row")
    }

    /// Every record produced so far, by its coordinates.
    pub fn records(&self) -> &BTreeMap<Coordinates, Item> {
        &self.produced
    }

    /// Records produced so far.
    pub fn produced(&self) -> usize {
        self.produced.len()
    }

    /// What the kept search / movie_detail events produced so far must do
    /// in Redis.
    pub fn truths(&self) -> impl Iterator<Item = &Truth> {
        self.produced.values().filter_map(|i| i.truth.as_ref())
    }

    /// Next offset per partition of everything produced so far.
    pub fn produced_ends(&self) -> Vec<i64> {
        let mut ends = vec![0; PARTITIONS as usize];
        for (partition, offset) in self.produced.keys() {
            if let Some(end) = ends.get_mut(*partition as usize) {
                *end = (*end).max(offset + 1);
            }
        }
        ends
    }

    /// Next offset per partition the sink has durably applied: the offsets
    /// it stores beside its data, or else the group's committed offsets.
    pub async fn applied(&self) -> anyhow::Result<Vec<i64>> {
        match self.sink.stored_offsets(&self.topic).await? {
            Some(stored) => Ok(stored),
            None => self.committed().await,
        }
    }

    /// The group's committed Kafka offsets (0 where none).
    pub async fn committed(&self) -> anyhow::Result<Vec<i64>> {
        Ok(self
            .committed_by(&self.group)
            .await?
            .into_iter()
            .map(|o| o.unwrap_or(0))
            .collect())
    }

    /// `group`'s committed Kafka offsets (`None` where none).
    pub async fn committed_by(&self, group: &str) -> anyhow::Result<Vec<Option<i64>>> {
        let (bootstrap, group, topic) = (
            self.broker.bootstrap().to_owned(),
            group.to_owned(),
            self.topic.clone(),
        );
        tokio::task::spawn_blocking(move || {
            kafka::committed(&bootstrap, &group, &topic, PARTITIONS)
        })
        .await?
    }

    /// Total records applied so far.
    pub async fn applied_total(&self) -> anyhow::Result<i64> {
        Ok(self.applied().await?.iter().sum())
    }

    /// Waits until the sink has applied more than `than` records in total.
    pub async fn wait_progress(&self, than: i64, instance: &Instance) -> anyhow::Result<i64> {
        let what = format!("progress past {than} records");
        self.poll_applied(
            Duration::from_millis(50),
            &what,
            &instance.service,
            |applied| {
                let total = applied.iter().sum();
                (total > than).then_some(total).into()
            },
        )
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
        self.wait_applied(&target, &instance.service).await?;
        Ok(started.elapsed())
    }

    /// Waits until the sink has applied every record produced so far.
    pub async fn wait_caught_up(&self, instance: &Instance) -> anyhow::Result<()> {
        self.wait_applied(&self.produced_ends(), &instance.service)
            .await
    }

    /// Waits until `group` has committed every record produced so far.
    pub async fn wait_committed_by(&self, group: &str, instance: &Instance) -> anyhow::Result<()> {
        let want: Vec<Option<i64>> = self.produced_ends().into_iter().map(Some).collect();
        let offsets =
            kafka::OffsetReader::new(self.broker.bootstrap(), group, &self.topic, PARTITIONS)?;
        let committed = poll_until(
            CATCH_UP_TIMEOUT,
            Duration::from_millis(50),
            &format!("group {group} to commit {want:?}"),
            || {
                let seen = offsets.committed();
                async {
                    let seen = seen?;
                    Ok(Check::done_if(seen == want, || {
                        format!("committed {seen:?}")
                    }))
                }
            },
        )
        .await;
        instance.service.with_log(committed)
    }

    /// Waits until the sink has applied each partition up to `want`.
    /// (Every 100 ms: [`Pipeline::recover`] times this wait.)
    async fn wait_applied(&self, want: &[i64], service: &Service) -> anyhow::Result<()> {
        let what = format!("every partition applied up to {want:?}");
        self.poll_applied(Duration::from_millis(100), &what, service, |applied| {
            let done = applied.iter().zip(want).all(|(a, w)| a >= w);
            Check::done_if(done, || format!("applied {applied:?}"))
        })
        .await
    }

    /// Looks at what the sink has applied ([`Pipeline::applied`]) `every`
    /// so often until `check` finds what it waits for, for up to
    /// [`CATCH_UP_TIMEOUT`]; an error shows `service`'s log (and a secured
    /// broker's).
    async fn poll_applied<T>(
        &self,
        every: Duration,
        what: &str,
        service: &Service,
        check: impl Fn(&[i64]) -> Check<T>,
    ) -> anyhow::Result<T> {
        let found = poll_until(CATCH_UP_TIMEOUT, every, what, || async {
            Ok(check(&self.applied().await?))
        })
        .await;
        service.with_log(self.broker.with_logs(found))
    }

    /// Compares the sink and the dead-letter topic with what was produced.
    pub async fn tally(&self) -> anyhow::Result<Tally> {
        let mut tally = Tally {
            produced: self.produced.len(),
            expected_in_sink: self.produced.values().filter(|i| i.kept).count(),
            dlq_expected: self.produced.values().filter(|i| !i.kept).count(),
            ..Tally::default()
        };
        self.sink
            .tally(&self.topic, &self.produced, &mut tally)
            .await?;
        self.tally_dead_letters(&mut tally).await?;
        Ok(tally)
    }

    async fn tally_dead_letters(&self, tally: &mut Tally) -> anyhow::Result<()> {
        let (bootstrap, dlq) = (self.broker.bootstrap().to_owned(), self.dlq());
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
    /// The port of its /metrics, /healthz and /readyz.
    pub metrics_port: u16,
}

impl Instance {
    /// Its /metrics now.
    pub async fn metrics(&self) -> anyhow::Result<Scrape> {
        Scrape::from_port(self.metrics_port).await
    }

    /// The sum of a counter or gauge over all its series, from /metrics.
    pub async fn counter(&self, name: &str) -> anyhow::Result<f64> {
        Ok(self.metrics().await?.sum(name))
    }

    /// Whether it answers /readyz with 200.
    pub async fn ready(&self) -> anyhow::Result<bool> {
        crate::ready(self.metrics_port).await
    }

    /// Waits until `/metrics` answers (the service has started).
    pub async fn wait_metrics(&self) -> anyhow::Result<()> {
        let answered = wait_for_async(Duration::from_secs(60), "/metrics", || async {
            Ok(self.metrics().await.is_ok())
        })
        .await;
        self.service.with_log(answered)
    }
}

/// What a pipeline left in the sink, compared with what it produced.
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

    /// Fails with every problem unless the tally holds.
    pub fn assert_holds(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.holds(),
            "the sink does not match what was produced: {self:#?}"
        );
        Ok(())
    }
}

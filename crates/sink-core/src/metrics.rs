//! Prometheus metrics, health flags, and the HTTP endpoint serving them.
//!
//! Metric names are a contract with dashboards and alerts
//! (deploy/grafana): they are constants here and nowhere else.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rdkafka::Statistics;

use crate::lock;

/// Records fetched from Kafka, by topic.
pub const EVENTS_CONSUMED: &str = "sink_events_consumed_total";
/// Batches written, by topic.
pub const BATCHES: &str = "sink_batches_total";
/// Seconds from sealing a batch to its durable write (DLQ included).
pub const BATCH_DURATION: &str = "sink_batch_duration_seconds";
/// Records per written batch.
pub const BATCH_EVENTS: &str = "sink_batch_events";
/// Failed attempts that are retried, by operation and error kind.
pub const RETRIES: &str = "sink_retries_total";
/// Records sent to the dead-letter topic, by topic and error code.
pub const DLQ_EVENTS: &str = "sink_dlq_events_total";
/// Batches a sink found already applied (replays it refused), by topic.
pub const ALREADY_APPLIED: &str = "sink_already_applied_total";
/// Last committed offset, by topic and partition (librdkafka statistics).
pub const COMMITTED_OFFSET: &str = "sink_committed_offset";
/// Consumer lag in records, by topic and partition (librdkafka statistics).
pub const CONSUMER_LAG: &str = "sink_consumer_lag";
/// 1 while consumption is held or paused because the sink is behind.
pub const PAUSED: &str = "sink_paused";
/// Offsets the broker skipped (a later offset than requested), by topic.
pub const OFFSET_GAPS: &str = "sink_offset_gaps_total";
/// Fetched records dropped because they lie below where their partition
/// resumed (a seek's leftovers, or a fetcher that went back), by topic.
pub const STALE_RECORDS: &str = "sink_stale_records_total";
/// 1 while an assigned partition is refused because where it stands lies
/// beyond its log's end (see `--reset-offsets-beyond-log-end`), by topic and
/// partition.
pub const PARTITION_REFUSED: &str = "sink_partition_refused";
/// 1 while the service waits at start for its sink (Redis, BigQuery) to
/// answer; the attempts are counted in [`RETRIES`] as operation `connect`.
pub const STARTING: &str = "sink_starting";
/// Records held in memory waiting for the sink.
pub const BUFFERED_EVENTS: &str = "sink_buffered_events";
/// 1 while a partition has records to read but has not advanced for the
/// stall timeout (see [`crate::stall`]), by topic and partition.
pub const PARTITION_STALLED: &str = "sink_partition_stalled";

/// Liveness and readiness, shared by the loop and the HTTP endpoint.
#[derive(Debug, Default)]
pub struct Health {
    in_group: AtomicBool,
    sink_ok: AtomicBool,
    /// Writes (to the sink or the dead-letter topic) retrying after a
    /// failure: a probe that finds the sink reachable does not make the
    /// service ready while one of them still fails.
    failing: AtomicUsize,
    /// Partitions that stopped advancing (see [`crate::stall`]).
    stalled: AtomicUsize,
    /// Partitions refused because they start beyond their log's end.
    refused: AtomicUsize,
    /// Partitions this consumer owns: /metrics shows per-partition series
    /// only for these (see [`owned_series_only`]).
    owned: std::sync::Mutex<Vec<i32>>,
    /// Liveness: since when work has been pending without anything
    /// completing (`None` while nothing is pending), and how long that may
    /// last.
    stuck_since: std::sync::Mutex<Option<Instant>>,
    liveness_timeout: std::sync::Mutex<Option<Duration>>,
    /// Woken when the sink turns reachable again, so that writes waiting out
    /// a long backoff retry at once instead of up to a minute later.
    sink_back: tokio::sync::Notify,
}

impl Health {
    /// A fresh, not-yet-ready state.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The consumer joined its group (with or without partitions).
    pub fn set_in_group(&self, value: bool) {
        self.in_group.store(value, Ordering::Relaxed);
    }

    /// The last sink call succeeded.
    pub fn set_sink_ok(&self, value: bool) {
        let was = self.sink_ok.swap(value, Ordering::Relaxed);
        if value && !was {
            self.sink_back.notify_waiters();
        }
    }

    /// Resolves the next time the sink turns reachable (a probe or a write
    /// succeeded after a failure).
    pub async fn sink_back(&self) {
        self.sink_back.notified().await;
    }

    /// The last sink call or probe succeeded.
    pub fn sink_ok(&self) -> bool {
        self.sink_ok.load(Ordering::Relaxed)
    }

    /// A write started failing; the guard marks it recovered when dropped
    /// (it succeeded, or was given up at shutdown).
    pub fn failing(self: &Arc<Self>) -> FailingWrite {
        self.failing.fetch_add(1, Ordering::Relaxed);
        FailingWrite(Arc::clone(self))
    }

    /// The partitions this consumer owns now.
    pub fn set_owned(&self, partitions: Vec<i32>) {
        *lock(&self.owned) = partitions;
    }

    fn owned(&self) -> Vec<i32> {
        lock(&self.owned).clone()
    }

    /// Liveness fails once work has been pending this long with nothing
    /// completing (never, until set).
    pub fn set_liveness_timeout(&self, timeout: Duration) {
        *lock(&self.liveness_timeout) = Some(timeout);
    }

    /// Whether records wait to be written (buffered or in flight). The
    /// liveness clock starts when work appears, not at the last completion.
    pub fn set_pending(&self, pending: bool, now: Instant) {
        let mut since = lock(&self.stuck_since);
        match (pending, *since) {
            (true, None) => *since = Some(now),
            (false, Some(_)) => *since = None,
            _ => {}
        }
    }

    /// A batch completed: the work is moving.
    pub fn batch_done(&self, now: Instant) {
        let mut since = lock(&self.stuck_since);
        if since.is_some() {
            *since = Some(now);
        }
    }

    /// Alive unless work has been pending past the liveness timeout with
    /// nothing completing: a loop or a write stuck for good, which a
    /// restart clears.
    pub fn live_at(&self, now: Instant) -> bool {
        let timeout = *lock(&self.liveness_timeout);
        let since = *lock(&self.stuck_since);
        match (timeout, since) {
            (Some(timeout), Some(since)) => now.saturating_duration_since(since) < timeout,
            _ => true,
        }
    }

    /// How many assigned partitions are refused.
    pub fn set_refused(&self, partitions: usize) {
        self.refused.store(partitions, Ordering::Relaxed);
    }

    /// How many assigned partitions are stalled.
    pub fn set_stalled(&self, partitions: usize) {
        self.stalled.store(partitions, Ordering::Relaxed);
    }

    /// Ready to do work: in the group, the sink reachable, no write
    /// failing, and no partition stalled or refused.
    pub fn ready(&self) -> bool {
        self.in_group.load(Ordering::Relaxed)
            && self.sink_ok.load(Ordering::Relaxed)
            && self.failing.load(Ordering::Relaxed) == 0
            && self.stalled.load(Ordering::Relaxed) == 0
            && self.refused.load(Ordering::Relaxed) == 0
    }
}

/// A write retrying after a failure (see [`Health::failing`]).
#[derive(Debug)]
pub struct FailingWrite(Arc<Health>);

impl Drop for FailingWrite {
    fn drop(&mut self) {
        self.0.failing.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The global Prometheus recorder, installed on first use (a process, or a
/// test binary running several consumers, has exactly one).
pub fn install() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: std::sync::Mutex<Option<PrometheusHandle>> = std::sync::Mutex::new(None);
    let mut slot = HANDLE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(handle) = slot.as_ref() {
        return Ok(handle.clone());
    }
    let handle = build()?;
    *slot = Some(handle.clone());
    Ok(handle)
}

fn build() -> anyhow::Result<PrometheusHandle> {
    let latency = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    let sizes = [
        1.0, 10.0, 100.0, 500.0, 1_000.0, 5_000.0, 10_000.0, 50_000.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(BATCH_DURATION.into()), &latency)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_EVENTS.into()), &sizes))
        .context("invalid histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(EVENTS_CONSUMED, "Records fetched from Kafka");
    describe_counter!(BATCHES, "Batches written durably");
    describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "Time from sealing a batch to its durable write"
    );
    describe_histogram!(BATCH_EVENTS, "Records per written batch");
    describe_counter!(RETRIES, "Failed attempts that are retried");
    describe_counter!(DLQ_EVENTS, "Records sent to the dead-letter topic");
    describe_counter!(ALREADY_APPLIED, "Batches the sink had already applied");
    describe_gauge!(COMMITTED_OFFSET, "Last committed offset per partition");
    describe_gauge!(CONSUMER_LAG, "Consumer lag per partition, in records");
    describe_gauge!(
        PAUSED,
        "1 while consumption is held or paused because the sink is behind"
    );
    describe_counter!(OFFSET_GAPS, "Offsets skipped by the broker");
    describe_counter!(
        STALE_RECORDS,
        "Fetched records dropped below where their partition resumed"
    );
    describe_gauge!(BUFFERED_EVENTS, "Records waiting for the sink");
    describe_gauge!(
        PARTITION_STALLED,
        "1 while a partition with records to read has not advanced for the stall timeout"
    );
}

/// Counts a failed attempt of `what` (`write`, `dead_letter`, `connect`)
/// that is retried.
pub fn retry(what: &'static str, kind: &'static str) {
    metrics::counter!(RETRIES, "operation" => what, "kind" => kind).increment(1);
}

/// Publishes per-partition offsets and lag from librdkafka's statistics.
pub(crate) fn record_statistics(stats: &Statistics) {
    for (topic, topic_stats) in &stats.topics {
        for (partition, p) in &topic_stats.partitions {
            // librdkafka lists an internal "-1" partition for unassigned messages.
            if *partition < 0 || p.committed_offset < 0 {
                continue;
            }
            let labels = [
                ("topic", topic.clone()),
                ("partition", partition.to_string()),
            ];
            metrics::gauge!(COMMITTED_OFFSET, &labels).set(p.committed_offset as f64);
            if p.consumer_lag >= 0 {
                metrics::gauge!(CONSUMER_LAG, &labels).set(p.consumer_lag as f64);
            }
        }
    }
}

/// Per-partition metrics: shown only for partitions the consumer owns.
const PER_PARTITION: [&str; 3] = [COMMITTED_OFFSET, CONSUMER_LAG, PARTITION_STALLED];

/// Drops the per-partition series of partitions this consumer no longer
/// owns. The recorder cannot forget a series, and after a rebalance the
/// last lag of a revoked partition would otherwise stay on dashboards
/// forever, beside the new owner's.
fn owned_series_only(rendered: &str, owned: &[i32]) -> String {
    let mut out = String::with_capacity(rendered.len());
    for line in rendered.lines() {
        let per_partition = PER_PARTITION.iter().any(|name| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
        });
        let partition = line
            .split_once("partition=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .and_then(|(p, _)| p.parse::<i32>().ok());
        if per_partition && partition.is_some_and(|p| !owned.contains(&p)) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[derive(Clone)]
struct Endpoint {
    metrics: PrometheusHandle,
    health: Arc<Health>,
}

/// Binds the HTTP endpoint now (so a port conflict fails at start) and serves
/// it in the background.
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    health: Arc<Health>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {addr}: is the port in use?"))?;
    let local = listener.local_addr()?;
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        // Histograms are drained into their buckets on upkeep.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(e): State<Endpoint>| async move {
                owned_series_only(&e.metrics.render(), &e.health.owned())
            }),
        )
        .route(
            "/healthz",
            get(|State(e): State<Endpoint>| async move {
                if e.health.live_at(Instant::now()) {
                    (StatusCode::OK, "ok\n")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "stuck: records wait and nothing was written for --liveness-timeout-secs\n",
                    )
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(e): State<Endpoint>| async move {
                if e.health.ready() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .with_state(Endpoint { metrics, health });
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "metrics endpoint stopped");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_write_keeps_readiness_false_whatever_the_probe_finds() {
        let health = Health::new();
        health.set_in_group(true);
        health.set_sink_ok(true);
        assert!(health.ready());
        let dead_letter = health.failing();
        let write = health.failing();
        // The probe of the sink itself succeeds (the dead-letter topic, or
        // a key of the wrong type, is what fails).
        health.set_sink_ok(true);
        assert!(!health.ready());
        drop(dead_letter);
        assert!(!health.ready(), "one write still fails");
        drop(write);
        assert!(health.ready());
    }

    #[test]
    fn liveness_fails_only_when_pending_work_stops_moving() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(300);
        let h = Health::default();
        h.set_pending(true, t0);
        assert!(h.live_at(t0 + 2 * timeout), "no timeout set: always live");
        h.set_liveness_timeout(timeout);
        assert!(!h.live_at(t0 + timeout), "pending, nothing done");
        h.batch_done(t0 + timeout - Duration::from_secs(1));
        assert!(h.live_at(t0 + timeout), "a batch just completed");
        h.set_pending(true, t0 + timeout);
        assert!(
            !h.live_at(t0 + 2 * timeout),
            "still pending: the clock runs from the last completion"
        );
        h.set_pending(false, t0 + 2 * timeout);
        assert!(h.live_at(t0 + 10 * timeout), "idle is alive");
        h.set_pending(true, t0 + 10 * timeout);
        assert!(
            h.live_at(t0 + 10 * timeout + Duration::from_secs(1)),
            "the clock starts when work appears"
        );
    }

    #[test]
    fn series_of_partitions_no_longer_owned_are_dropped() {
        let rendered = "# TYPE sink_consumer_lag gauge\n\
            sink_consumer_lag{topic=\"user3\",partition=\"0\"} 5\n\
            sink_consumer_lag{topic=\"user3\",partition=\"2\"} 9\n\
            sink_committed_offset{topic=\"user3\",partition=\"2\"} 100\n\
            sink_partition_stalled{topic=\"user3\",partition=\"2\"} 0\n\
            sink_events_consumed_total{topic=\"user3\"} 7\n\
            sink_dlq_events_total{topic=\"user3\",code=\"not_json\"} 1\n";
        assert_eq!(
            owned_series_only(rendered, &[0]),
            "# TYPE sink_consumer_lag gauge\n\
             sink_consumer_lag{topic=\"user3\",partition=\"0\"} 5\n\
             sink_events_consumed_total{topic=\"user3\"} 7\n\
             sink_dlq_events_total{topic=\"user3\",code=\"not_json\"} 1\n"
        );
        assert_eq!(owned_series_only(rendered, &[0, 2]), rendered);
    }
}

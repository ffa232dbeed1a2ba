//! Prometheus metrics: their names, the recorder, and what librdkafka's
//! statistics add.
//!
//! Metric names are a contract with dashboards and alerts
//! (deploy/grafana): they are constants here and nowhere else.

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rdkafka::Statistics;

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
/// resumed after a seek forward (fetched before it), by topic.
pub const STALE_RECORDS: &str = "sink_stale_records_total";
/// 1 while an assigned partition is refused: where it stands lies beyond
/// its log's end (see `--reset-offsets-beyond-log-end`), or its log went
/// back while it was read; by topic and partition.
pub const PARTITION_REFUSED: &str = "sink_partition_refused";
/// 1 while the service waits at start for its sink (Redis, BigQuery) to
/// answer; the attempts are counted in [`RETRIES`] as operation `connect`.
pub const STARTING: &str = "sink_starting";
/// Records held in memory waiting for the sink.
pub const BUFFERED_EVENTS: &str = "sink_buffered_events";
/// 1 while a partition has records to read but has not advanced for the
/// stall timeout (see [`crate::stall`]), by topic and partition.
pub const PARTITION_STALLED: &str = "sink_partition_stalled";
/// bigquery-sink with `--write-api storage`: `AppendRows` streams opened.
/// One per instance while all is well; each failure or age-out of a
/// stream opens another.
pub const APPEND_STREAMS: &str = "sink_bigquery_append_streams_opened_total";

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

/// How a metric is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Set to a value.
    Gauge,
    /// Observations in buckets.
    Histogram,
}

/// One metric the services export: what dashboards and alerts may use.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Its name.
    pub name: &'static str,
    /// How it is recorded.
    pub kind: Kind,
    /// The labels the services set on it.
    pub labels: &'static [&'static str],
    /// Its HELP text.
    pub help: &'static str,
}

const fn metric(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
    }
}

const TOPIC: &[&str] = &["topic"];
const PARTITION: &[&str] = &["topic", "partition"];

/// Every metric the services export, with its labels: deploy/grafana's
/// dashboard and the alerts are checked against this list.
pub const ALL: [Metric; 17] = [
    metric(
        EVENTS_CONSUMED,
        Kind::Counter,
        TOPIC,
        "Records fetched from Kafka",
    ),
    metric(BATCHES, Kind::Counter, TOPIC, "Batches written durably"),
    metric(
        BATCH_DURATION,
        Kind::Histogram,
        &[],
        "Seconds from sealing a batch to its durable write",
    ),
    metric(
        BATCH_EVENTS,
        Kind::Histogram,
        &[],
        "Records per written batch",
    ),
    metric(
        RETRIES,
        Kind::Counter,
        &["operation", "kind"],
        "Failed attempts that are retried",
    ),
    metric(
        DLQ_EVENTS,
        Kind::Counter,
        &["topic", "code"],
        "Records sent to the dead-letter topic",
    ),
    metric(
        ALREADY_APPLIED,
        Kind::Counter,
        TOPIC,
        "Batches the sink had already applied",
    ),
    metric(
        COMMITTED_OFFSET,
        Kind::Gauge,
        PARTITION,
        "Last committed offset per partition",
    ),
    metric(
        CONSUMER_LAG,
        Kind::Gauge,
        PARTITION,
        "Consumer lag per partition, in records",
    ),
    metric(
        PAUSED,
        Kind::Gauge,
        &[],
        "1 while consumption is held or paused because the sink is behind",
    ),
    metric(
        OFFSET_GAPS,
        Kind::Counter,
        TOPIC,
        "Offsets skipped by the broker",
    ),
    metric(
        STALE_RECORDS,
        Kind::Counter,
        TOPIC,
        "Fetched records dropped below where their partition resumed",
    ),
    metric(
        PARTITION_REFUSED,
        Kind::Gauge,
        PARTITION,
        "1 while a partition is refused: its start lies beyond its log's end, or its log went back",
    ),
    metric(
        STARTING,
        Kind::Gauge,
        &[],
        "1 while the service waits at start for its sink to answer",
    ),
    metric(
        BUFFERED_EVENTS,
        Kind::Gauge,
        &[],
        "Records waiting for the sink",
    ),
    metric(
        PARTITION_STALLED,
        Kind::Gauge,
        PARTITION,
        "1 while a partition with records to read has not advanced for the stall timeout",
    ),
    metric(
        APPEND_STREAMS,
        Kind::Counter,
        &[],
        "Storage Write API append streams bigquery-sink opened (one per instance when all is well)",
    ),
];

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    for m in &ALL {
        match m.kind {
            Kind::Counter => describe_counter!(m.name, m.help),
            Kind::Gauge => describe_gauge!(m.name, m.help),
            Kind::Histogram if m.name.ends_with("_seconds") => {
                describe_histogram!(m.name, Unit::Seconds, m.help);
            }
            Kind::Histogram => describe_histogram!(m.name, m.help),
        }
    }
}

/// Counts a failed attempt of `what` (`write`, `dead_letter`, `connect`,
/// `consume`) that is retried.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_listed_once_with_its_help() {
        let mut names: Vec<&str> = ALL.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len(), "a metric listed twice");
        assert!(ALL
            .iter()
            .all(|m| m.name.starts_with("sink_") && !m.help.is_empty()));
        let counters_end_in_total = ALL
            .iter()
            .all(|m| (m.kind == Kind::Counter) == m.name.ends_with("_total"));
        assert!(
            counters_end_in_total,
            "Prometheus naming: counters end in _total"
        );
    }
}

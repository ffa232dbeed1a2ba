//! The HTTP endpoint: /metrics, /healthz and /readyz.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::health::Health;
use crate::metrics::{COMMITTED_OFFSET, CONSUMER_LAG, PARTITION_STALLED};

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

//! Retrying a sink or dead-letter write until it succeeds.
//!
//! Nothing is ever dropped because a dependency is down, so there is no
//! attempt limit: the delay grows exponentially with jitter up to a ceiling
//! that depends on the error, and every failed attempt is logged and counted.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::metrics;
use crate::sink::SinkError;

/// First retry delay.
const MIN_DELAY: Duration = Duration::from_millis(100);

/// Runs `attempt` until it succeeds; readiness is false while it fails.
pub async fn until_ok<T, F, Fut>(what: &'static str, mut attempt: F, health: &crate::Health) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SinkError>>,
{
    let mut backoff = None;
    loop {
        match attempt().await {
            Ok(value) => {
                if backoff.is_some() {
                    tracing::info!(what, "recovered");
                    health.set_sink_ok(true);
                }
                return value;
            }
            Err(err) => {
                let delays = backoff.get_or_insert_with(|| {
                    ExponentialBuilder::default()
                        .with_min_delay(MIN_DELAY)
                        .with_max_delay(err.max_backoff())
                        .with_jitter()
                        .without_max_times()
                        .build()
                });
                let delay = delays.next().unwrap_or(err.max_backoff());
                metrics::retry(what, err.kind());
                health.set_sink_ok(false);
                if matches!(err, SinkError::Unavailable { .. }) {
                    tracing::error!(what, error = %err, retry_in = ?delay, "needs an operator; nothing is committed meanwhile");
                } else {
                    tracing::warn!(what, error = %err, retry_in = ?delay, "failed, retrying");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

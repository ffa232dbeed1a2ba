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
pub async fn until_ok<T, F, Fut>(
    what: &'static str,
    mut attempt: F,
    health: &std::sync::Arc<crate::Health>,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SinkError>>,
{
    let mut backoff = None;
    let mut _failing = None;
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
                _failing.get_or_insert_with(|| health.failing());
                let delays = backoff.get_or_insert_with(|| delays(err.max_backoff()));
                let delay = delays.next().unwrap_or(err.max_backoff());
                metrics::retry(what, err.kind());
                health.set_sink_ok(false);
                if matches!(err, SinkError::Unavailable { .. }) {
                    tracing::error!(what, error = %err, retry_in = ?delay, "needs an operator; nothing is committed meanwhile");
                } else {
                    tracing::warn!(what, error = %err, retry_in = ?delay, "failed, retrying");
                }
                // A probe that finds the sink back cuts the wait short.
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = health.sink_back() => {}
                }
            }
        }
    }
}

/// Retry delays: exponential from [`MIN_DELAY`], with jitter, never above
/// `max`. backon's jitter adds up to 100% on top of the exponential delay,
/// so the exponential part stops at `max / 2`: once there, delays spread
/// over `[max / 2, max)` and replicas that failed together do not retry in
/// step.
fn delays(max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(MIN_DELAY.min(max / 2))
        .with_max_delay(max / 2)
        .with_jitter()
        .without_max_times()
        .build()
        .map(move |delay| delay.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_ceiling_and_never_pass_it() {
        let max = Duration::from_secs(60);
        let all: Vec<Duration> = delays(max).take(200).collect();
        assert_eq!(all.len(), 200, "retries forever");
        assert!(all[0] < Duration::from_millis(200), "{:?}", all[0]);
        assert!(all.iter().all(|d| *d <= max), "{all:?}");
        // Past the growth phase, delays stay jittered within [max/2, max].
        assert!(all[50..].iter().all(|d| *d >= max / 2), "{all:?}");
        let distinct: std::collections::BTreeSet<_> = all[50..].iter().collect();
        assert!(distinct.len() > 100, "jitter spreads delays at the ceiling");
    }
}

//! Shared core of the movie-log sinks.
//!
//! Both services are "consume one topic, write it somewhere, never lose an
//! event". Everything but the "somewhere" lives here:
//!
//! - [`event`]: the Logstash event schema, parsed lazily from message bytes;
//! - [`config`]: flags and env vars common to both services;
//! - [`sink`]: the contract a service implements ([`Sink`]);
//! - [`consumer`]: the consume → batch → write → dead-letter → commit loop
//!   ([`run`]), with its pure parts: [`batch`] (batching), [`offsets`]
//!   (what may be committed), [`flow`] (holding and pausing while the sink
//!   is behind); [`starts`]: where an assigned partition starts, and when
//!   it is refused;
//! - [`stall`]: partitions that stopped advancing, found from statistics;
//! - [`health`]: liveness and readiness; [`http`]: the endpoint serving them
//!   and [`metrics`];
//! - [`dlq`], [`retry`], [`shutdown`], [`telemetry`]: the edges.

pub mod batch;
pub mod config;
pub mod consumer;
pub mod dlq;
pub mod event;
pub mod flow;
pub mod health;
pub mod http;
pub mod metrics;
pub mod offsets;
pub mod retry;
pub mod shutdown;
pub mod sink;
pub mod stall;
pub mod starts;
pub mod telemetry;

pub use config::{parse_args, ConsumerArgs, ServiceDefaults};
pub use consumer::{run, run_connecting};
pub use event::{Event, EventError};
pub use health::Health;
pub use sink::{
    Batch, Entry, PartitionRange, Record, Rejection, Sink, SinkError, Staged, StagedAtAssign,
    WriteOutcome,
};

/// Locks state that holds no invariant a panic elsewhere could break
/// halfway, so a poisoned lock is as good as any.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long the runtime gets to stop its tasks once the service is done.
const RUNTIME_STOP: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a rebalance waits for in-flight batches of revoked partitions:
/// half the session timeout, as Vector does, so a slow drain never gets
/// this member evicted mid-rebalance.
pub fn drain_timeout(session_timeout_ms: u64) -> std::time::Duration {
    std::time::Duration::from_millis(session_timeout_ms / 2)
}

/// The longest a service takes to exit after SIGTERM: a rebalance's drain
/// running when the signal came ends first, then `--shutdown-timeout-secs`
/// bounds writing, committing and leaving the group, then the runtime
/// stops. Grace periods (compose, Kubernetes) must exceed it.
pub fn worst_case_exit(session_timeout_ms: u64, shutdown_timeout_secs: u64) -> std::time::Duration {
    drain_timeout(session_timeout_ms)
        + std::time::Duration::from_secs(shutdown_timeout_secs)
        + RUNTIME_STOP
}

/// Runs a service's entry point on a multi-thread runtime (the consume loop
/// needs one) and turns an error into a one-paragraph message and exit code
/// 1: operators read what is wrong, never a backtrace.
pub fn block_on_main<F>(main: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| {
            let result = runtime.block_on(main);
            // Dropping the runtime would wait for every blocking task, and
            // a consumer close that hangs on a silent broker never ends:
            // `run` already gave up on it within the shutdown timeout.
            runtime.shutdown_timeout(RUNTIME_STOP);
            result
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            telemetry::fatal(&err);
            std::process::ExitCode::FAILURE
        }
    }
}

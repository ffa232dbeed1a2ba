//! Logging setup: JSON for log collectors, pretty for people.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides the default
/// level (`info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // When whatever reads stderr goes away (`| head`, a dead log
        // shipper), a line that cannot be written is dropped. By default the
        // subscriber reports that with eprintln!, which panics on the same
        // broken pipe: the service then panicked on its next log line, and
        // on SIGTERM hung while leaving the consumer group.
        .log_internal_errors(false);
    // A second init (tests) keeps the first subscriber; that is fine.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

//! Logging setup: JSON for log collectors, pretty for people.

use std::fmt;
use std::sync::OnceLock;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// The format [`init`] installed.
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Log targets (and their modules) let through at `warn` and above only,
/// whatever `RUST_LOG` says: at debug they print secrets (yup-oauth2 logs
/// every token request and response: service account assertions, federated
/// subject tokens, access tokens). A filter of its own, not a directive: a
/// more specific `RUST_LOG` directive (`yup_oauth2::authenticator=debug`)
/// would win over one.
const SECRET_LOGGING_TARGETS: &[&str] = &["yup_oauth2"];

/// Whether an event or span of `meta` may be logged at all.
fn may_log(meta: &tracing::Metadata<'_>) -> bool {
    *meta.level() <= Level::WARN
        || !SECRET_LOGGING_TARGETS.iter().any(|target| {
            meta.target()
                .strip_prefix(target)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides the default
/// level (`info`), except for [`SECRET_LOGGING_TARGETS`].
pub fn init(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // When whatever reads stderr goes away (`| head`, a dead log
        // shipper), a line that cannot be written is dropped. By default the
        // subscriber reports that with eprintln!, which panics on the same
        // broken pipe: the service then panicked on its next log line, and
        // on SIGTERM hung while leaving the consumer group.
        .log_internal_errors(false);
    let layer = match format {
        LogFormat::Json => layer.event_format(JsonLine).boxed(),
        LogFormat::Pretty => layer.compact().boxed(),
    };
    // A second init (tests) keeps the first subscriber; that is fine.
    let _ = tracing_subscriber::registry()
        .with(
            layer
                .with_filter(filter)
                .with_filter(tracing_subscriber::filter::filter_fn(may_log)),
        )
        .try_init();
    let _ = FORMAT.set(format);
}

/// Logs the error a service exits with: a JSON line where log collectors
/// expect one, else one plain line (no backtrace). Not eprintln!, which
/// panics when stderr is closed.
pub(crate) fn fatal(err: &anyhow::Error) {
    if FORMAT.get() == Some(&LogFormat::Json) {
        tracing::error!(error = %format!("{err:#}"), "exiting on an error");
    } else {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "error: {err:#}");
    }
}

/// One JSON object per event: `timestamp`, `level` and `severity` (the
/// field Google Cloud Logging reads; without it GKE shows every stderr line
/// as an error), `target`, `message` and the event's fields.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        line.insert("level".into(), metadata.level().as_str().into());
        line.insert("severity".into(), severity(*metadata.level()).into());
        line.insert("target".into(), metadata.target().into());
        event.record(&mut Fields(&mut line));
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Cloud Logging's LogSeverity for a tracing level.
fn severity(level: Level) -> &'static str {
    match level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

/// Collects an event's fields as JSON values.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_severity_cloud_logging_reads() -> anyhow::Result<()> {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(JsonLine)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                partition = 2,
                topic = "user3",
                ok = false,
                "partition \"stalled\""
            );
            tracing::error!(error = %"refused", "exiting");
        });
        let bytes = captured
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("lock"))?
            .clone();
        let text = String::from_utf8(bytes)?;
        let lines = text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<Vec<Value>, _>>()?;
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["severity"], "WARNING");
        assert_eq!(lines[0]["level"], "WARN");
        assert_eq!(lines[0]["message"], "partition \"stalled\"");
        assert_eq!(lines[0]["partition"], 2);
        assert_eq!(lines[0]["topic"], "user3");
        assert_eq!(lines[0]["ok"], false);
        assert!(lines[0]["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
        assert_eq!(lines[1]["severity"], "ERROR");
        assert_eq!(lines[1]["error"], "refused");
        Ok(())
    }
}

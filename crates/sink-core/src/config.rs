//! Command-line and environment configuration shared by both services.
//!
//! Each flag has an environment variable (containers are configured with
//! env vars, people with flags). The services differ only in defaults, which
//! each binary supplies through [`ServiceDefaults`] so `--help` shows them.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::bail;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use rdkafka::ClientConfig;

use crate::batch::BatchLimits;
use crate::telemetry::LogFormat;

/// Per-service defaults, applied to the shared flags before parsing.
#[derive(Debug, Clone, Copy)]
pub struct ServiceDefaults {
    /// Topic consumed.
    pub topic: &'static str,
    /// Consumer group.
    pub group_id: &'static str,
    /// Records per batch.
    pub batch_max_events: usize,
    /// Bytes per batch.
    pub batch_max_bytes: usize,
    /// Linger before a partial batch is written.
    pub batch_linger_ms: u64,
    /// kB of messages fetched ahead ([`ConsumerArgs::prefetch_kbytes`]).
    pub prefetch_kbytes: u32,
}

/// Kafka, batching and operational settings of a consumer service.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Kafka consumer")]
pub struct ConsumerArgs {
    /// Kafka bootstrap servers, comma separated `host:port` list.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", value_name = "HOST:PORT,...")]
    pub bootstrap_servers: String,

    /// Topic to consume.
    #[arg(
        long,
        env = "KAFKA_TOPIC",
        value_name = "TOPIC",
        default_value = "events"
    )]
    pub topic: String,

    /// Consumer group; replicas of one service share it to split partitions.
    #[arg(
        long,
        env = "KAFKA_GROUP_ID",
        value_name = "GROUP",
        default_value = "sink"
    )]
    pub group_id: String,

    /// Dead-letter topic for records that can never be written [default: <topic>.dlq].
    #[arg(long, env = "KAFKA_DLQ_TOPIC", value_name = "TOPIC")]
    pub dlq_topic: Option<String>,

    /// Extra librdkafka property `key=value` (TLS, SASL, tuning); repeatable.
    /// Several may share one value, separated by commas (as in KAFKA_OPTIONS):
    /// a comma starts a new option only when `key=` follows it, so values
    /// such as `debug=fetch,cgrp` stay whole.
    #[arg(
        long = "kafka-option",
        env = "KAFKA_OPTIONS",
        hide_env_values = true,
        value_name = "KEY=VALUE",
        value_parser = KafkaOptionsParser
    )]
    pub kafka_option_lists: Vec<KafkaOptions>,

    /// librdkafka properties file (`key=value` lines, `#` comments, as
    /// kcat's -F): for secrets from a mounted file. Read at start; any
    /// --kafka-option overrides it. A value may hold commas here.
    #[arg(
        long,
        env = "KAFKA_OPTIONS_FILE",
        value_name = "FILE",
        value_parser = KafkaOptionsFileParser
    )]
    pub kafka_options_file: Option<KafkaOptions>,

    /// Consumer group session timeout: how long a dead replica keeps its partitions.
    #[arg(
        long,
        env = "KAFKA_SESSION_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(1_000..=3_600_000)
    )]
    pub session_timeout_ms: u64,

    /// Seal a batch at this many records.
    #[arg(long, env = "BATCH_MAX_EVENTS", value_name = "N", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub batch_max_events: u64,

    /// Seal a batch before it passes this many bytes of message data.
    #[arg(long, env = "BATCH_MAX_BYTES", value_name = "BYTES", default_value_t = 4 << 20,
          value_parser = clap::value_parser!(u64).range(1_024..=1 << 30))]
    pub batch_max_bytes: u64,

    /// Write a partial batch this long after its first record arrived.
    #[arg(long, env = "BATCH_LINGER_MS", value_name = "MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub batch_linger_ms: u64,

    /// Messages fetched ahead of the loop, in kB of (decompressed) message
    /// data, all assigned partitions together: librdkafka's
    /// queued.max.messages.kbytes. Memory against fetch throughput; a fetch
    /// response from each broker (up to 1 MB) can pass it, so below 1024 it
    /// mostly adds round trips.
    #[arg(long, env = "PREFETCH_KBYTES", value_name = "KB", default_value_t = 4_096,
          value_parser = clap::value_parser!(u32).range(1_024..=2_097_151))]
    pub prefetch_kbytes: u32,

    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "METRICS_ADDR",
        value_name = "ADDR",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// Where to resume a partition whose stored offset lies beyond its log's
    /// end (the topic was recreated, an unclean leader election truncated
    /// it, a failover to a mirrored cluster). Without it such a partition
    /// is refused (error log, metric, readiness false) until an operator
    /// decides: `earliest` for a recreated topic (every record is new),
    /// `latest` after a truncation (the records the log still has below
    /// its end were already written).
    #[arg(
        long,
        env = "RESET_OFFSETS_BEYOND_LOG_END",
        value_enum,
        value_name = "WHERE"
    )]
    pub reset_offsets_beyond_log_end: Option<ResetTo>,

    /// A partition with records to read that has not advanced for this long,
    /// while the sink kept up, is reported stalled (error log, metric,
    /// readiness false): a record batch that cannot be read, a broker that
    /// keeps refusing fetches.
    #[arg(long, env = "STALL_TIMEOUT_SECS", value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(10..=86_400))]
    pub stall_timeout_secs: u64,

    /// /healthz fails (so that the orchestrator restarts the service) once
    /// records have waited this long with nothing written: a stuck loop or
    /// write, or a sink down that long.
    #[arg(long, env = "LIVENESS_TIMEOUT_SECS", value_name = "SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(10..=86_400))]
    pub liveness_timeout_secs: u64,

    /// On SIGTERM/SIGINT, time allowed to write and commit what was fetched.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_SECS", value_name = "SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub shutdown_timeout_secs: u64,
}

/// librdkafka properties the service sets itself, and a second name
/// librdkafka reads for one of them: overriding them would break the
/// delivery guarantee or contradict a dedicated flag.
const MANAGED_KAFKA_OPTIONS: &[(&str, &str)] = &[
    ("bootstrap.servers", "use --bootstrap-servers"),
    ("group.id", "use --group-id"),
    (
        "session.timeout.ms",
        "use --session-timeout-ms (KAFKA_SESSION_TIMEOUT_MS)",
    ),
    (
        "queued.max.messages.kbytes",
        "use --prefetch-kbytes (PREFETCH_KBYTES)",
    ),
    (
        "topic.auto.offset.reset",
        "use auto.offset.reset, without the prefix (the service sets auto.offset.reset \
         itself, and librdkafka would take either of the two)",
    ),
    (
        "enable.auto.commit",
        "offsets are committed only after the sink acknowledged the records",
    ),
    (
        "enable.auto.offset.store",
        "offsets are committed only after the sink acknowledged the records",
    ),
];

/// Where `--reset-offsets-beyond-log-end` resumes a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ResetTo {
    /// The log's first offset.
    Earliest,
    /// The log's end.
    Latest,
}

/// The `key=value` pairs of one `--kafka-option` occurrence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaOptions(pub Vec<(String, String)>);

impl ConsumerArgs {
    /// Every option, in order (later ones win): the properties file's,
    /// then each `--kafka-option`'s.
    pub fn kafka_options(&self) -> impl Iterator<Item = &(String, String)> {
        self.kafka_options_file
            .iter()
            .chain(&self.kafka_option_lists)
            .flat_map(|list| &list.0)
    }

    /// The dead-letter topic.
    pub fn dlq_topic(&self) -> String {
        self.dlq_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.topic))
    }

    /// Batching limits.
    pub fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            max_events: usize::try_from(self.batch_max_events).unwrap_or(usize::MAX),
            max_bytes: usize::try_from(self.batch_max_bytes).unwrap_or(usize::MAX),
            linger: Duration::from_millis(self.batch_linger_ms),
        }
    }

    /// How long a partition may stand still with records to read.
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs(self.stall_timeout_secs)
    }

    /// Shutdown deadline.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }

    /// Checks what clap cannot: cross-field rules and reserved options.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.bootstrap_servers.trim().is_empty() {
            bail!("--bootstrap-servers (KAFKA_BOOTSTRAP_SERVERS) is empty: expected host:port[,host:port...]");
        }
        if self.topic.trim().is_empty() || self.group_id.trim().is_empty() {
            bail!("--topic and --group-id must not be empty");
        }
        if self.dlq_topic() == self.topic {
            bail!(
                "--dlq-topic must differ from --topic ({}): dead letters would be consumed again",
                self.topic
            );
        }
        for (key, value) in self.kafka_options() {
            if let Some((_, why)) = MANAGED_KAFKA_OPTIONS.iter().find(|(k, _)| k == key) {
                bail!(
                    "Kafka option {key} cannot be set (--kafka-option, KAFKA_OPTIONS or the \
                     options file): {why}"
                );
            }
            if key == "statistics.interval.ms" {
                self.check_statistics_interval(value)?;
            }
        }
        Ok(())
    }

    /// Stalled partitions are found from librdkafka's statistics: they must
    /// come, and often enough to see a stall within `--stall-timeout-secs`.
    fn check_statistics_interval(&self, value: &str) -> anyhow::Result<()> {
        let most = self.stall_timeout_secs * 1000 / 2;
        match value.trim().parse::<u64>() {
            Ok(ms) if (1..=most).contains(&ms) => Ok(()),
            _ => bail!(
                "--kafka-option statistics.interval.ms={value}: expected 1 to {most} (half of \
                 --stall-timeout-secs): stalled partitions are found from these statistics"
            ),
        }
    }

    /// Settings common to the consumer and the dead-letter producer, with the
    /// user's `--kafka-option`s applied last.
    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        for (key, value) in self.kafka_options() {
            config.set(key, value);
        }
        config
    }

    /// The consumer's librdkafka configuration.
    pub fn consumer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("group.id", &self.group_id)
            .set("session.timeout.ms", self.session_timeout_ms.to_string())
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            // A new group must not skip the backlog.
            .set("auto.offset.reset", "earliest")
            // Incremental rebalancing: a replica joining or leaving (each
            // autoscaling step) moves only the partitions that change owner;
            // the others keep being written. Every member of a group must
            // use the same kind of strategy (see deploy/README.md).
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("statistics.interval.ms", "5000")
            // Measured (docs/benchmarks.md): the default 1 s backoff
            // once the local queue fills leaves the consumer idle most of the
            // time; these keep throughput high within the prefetch below.
            .set("fetch.queue.backoff.ms", "5")
            .set("queued.min.messages", "10000")
            .set(
                "queued.max.messages.kbytes",
                self.prefetch_kbytes.to_string(),
            )
            .set("max.partition.fetch.bytes", "262144")
            .set("fetch.max.bytes", "1048576")
            // tansu (the local broker) holds a fetch for fetch.wait.max.ms
            // even while another partition has data: librdkafka's 500 ms
            // default capped a do-nothing consumer at ~25k events/s there
            // (docs/benchmarks.md). On Kafka it only bounds idle fetches.
            .set("fetch.wait.max.ms", "20");
        for (key, value) in self.kafka_options() {
            config.set(key, value);
        }
        config
    }

    /// The dead-letter producer's librdkafka configuration. Consumer-only
    /// `--kafka-option`s are dropped so librdkafka does not warn about them.
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = self.client_config();
        for key in CONSUMER_ONLY_PREFIXES {
            let keys: Vec<String> = config
                .config_map()
                .keys()
                .filter(|k| k.starts_with(key))
                .map(ToString::to_string)
                .collect();
            for k in keys {
                config.remove(&k);
            }
        }
        // Not idempotent unless the operator asks for it: an idempotent
        // producer delivers nothing until it has a producer id, which
        // librdkafka asks for on a timer once connected (the first letters
        // of a process waited 0.5-1 s for it on the local broker). What it
        // would prevent, a letter written twice or out of order when
        // librdkafka retries a send, the dead-letter contract allows
        // already: letters are at least once, and each names its source
        // partition and offset (docs/reliability.md).
        if !self
            .kafka_options()
            .any(|(key, _)| key == "enable.idempotence")
        {
            config.set("enable.idempotence", "false");
        }
        config
            .set("acks", "all")
            // Surface an unreachable DLQ as an error we retry and report,
            // instead of librdkafka's silent 5-minute default.
            .set("message.timeout.ms", "30000");
        config
    }

    /// The `--kafka-option`s with secrets masked, for logs.
    pub fn redacted_kafka_options(&self) -> String {
        self.kafka_options()
            .map(|(k, v)| {
                if is_secret_key(k) {
                    format!("{k}=***")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

const CONSUMER_ONLY_PREFIXES: &[&str] = &[
    "fetch.",
    "queued.",
    "max.partition.fetch",
    "auto.offset.reset",
    "partition.assignment",
    "group.",
    "heartbeat.",
    "max.poll",
    "isolation.level",
    "check.crcs",
    // Statistics feed the consumer's stall watch; the dead-letter producer
    // would only log them, every interval, at info.
    "statistics.interval.ms",
];

/// Parses `--kafka-option` / KAFKA_OPTIONS. Its own parser, not a function:
/// clap's error for a function quotes the value, and these values hold
/// passwords.
#[derive(Debug, Clone, Copy)]
struct KafkaOptionsParser;

impl clap::builder::TypedValueParser for KafkaOptionsParser {
    type Value = KafkaOptions;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<KafkaOptions, clap::Error> {
        value
            .to_str()
            .ok_or("is not valid UTF-8")
            .and_then(parse_kafka_options)
            .map_err(|why| {
                invalid(
                    cmd,
                    format!("--kafka-option (KAFKA_OPTIONS) {why} (the value is not shown: it may hold a secret)"),
                )
            })
    }
}

/// A clap error that says only `message`: clap's own wording for a bad
/// value quotes it.
fn invalid(cmd: &clap::Command, message: String) -> clap::Error {
    clap::Error::raw(
        clap::error::ErrorKind::ValueValidation,
        format!("{message}\n"),
    )
    .with_cmd(cmd)
}

/// Reads `--kafka-options-file`. Errors name the file and the line, never
/// a line's text: it may hold a secret.
#[derive(Debug, Clone, Copy)]
struct KafkaOptionsFileParser;

impl clap::builder::TypedValueParser for KafkaOptionsFileParser {
    type Value = KafkaOptions;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<KafkaOptions, clap::Error> {
        let path = std::path::Path::new(value);
        let fail = |why: String| {
            invalid(
                cmd,
                format!(
                    "--kafka-options-file (KAFKA_OPTIONS_FILE) {}: {why}",
                    path.display()
                ),
            )
        };
        let text =
            std::fs::read_to_string(path).map_err(|err| fail(format!("cannot read it: {err}")))?;
        parse_properties(&text).map_err(fail)
    }
}

/// `key=value` lines; blank lines and lines starting with `#` or `!` are
/// skipped; a value is taken whole, commas included.
fn parse_properties(text: &str) -> Result<KafkaOptions, String> {
    let mut pairs = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        match line.split_once('=') {
            Some((key, value)) if is_property_name(key.trim()) => {
                pairs.push((key.trim().to_owned(), value.trim().to_owned()));
            }
            _ => {
                return Err(format!(
                    "line {} is not KEY=VALUE with a librdkafka property name \
                     (the line is not shown: it may hold a secret)",
                    number + 1
                ))
            }
        }
    }
    Ok(KafkaOptions(pairs))
}

fn parse_kafka_options(raw: &str) -> Result<KafkaOptions, &'static str> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for piece in raw.split(',') {
        match piece.split_once('=') {
            Some((key, value)) if is_property_name(key.trim()) => {
                pairs.push((key.trim().to_owned(), value.trim().to_owned()));
            }
            // No `key=`: the comma belonged to the previous value.
            _ => match pairs.last_mut() {
                Some((_, value)) => {
                    value.push(',');
                    value.push_str(piece.trim());
                }
                None => {
                    return Err("must start with KEY=VALUE, a librdkafka property such as \
                         security.protocol=SASL_SSL; several are separated by commas")
                }
            },
        }
    }
    Ok(KafkaOptions(pairs))
}

fn is_property_name(key: &str) -> bool {
    !key.is_empty()
        && key.starts_with(|c: char| c.is_ascii_alphabetic())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// librdkafka properties whose values are shown in logs and errors:
/// settings, not credentials. Every other value is masked, whatever its
/// name (librdkafka adds secret-bearing properties over time, and a comma
/// inside a secret value starts an option of an unknown name).
const SHOWN_KAFKA_OPTIONS: &[&str] = &[
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.oauthbearer.method",
    "sasl.oauthbearer.token.endpoint.url",
    "ssl.endpoint.identification.algorithm",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "client.id",
    "client.rack",
    "debug",
    "enable.idempotence",
    "partition.assignment.strategy",
    "statistics.interval.ms",
    "socket.",
    "fetch.",
    "queued.",
    "max.partition.fetch.bytes",
    "message.max.bytes",
    "broker.address.family",
    "reconnect.backoff.",
    "retry.backoff.",
    "topic.metadata.refresh.interval.ms",
    "metadata.max.age.ms",
    "heartbeat.interval.ms",
    "group.instance.id",
    "isolation.level",
    "api.version.request",
];

/// True for librdkafka properties whose values must not be logged: all but
/// [`SHOWN_KAFKA_OPTIONS`] (an entry ending in `.` covers its prefix).
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    !SHOWN_KAFKA_OPTIONS.iter().any(|shown| {
        if shown.ends_with('.') {
            key.starts_with(shown)
        } else {
            key == *shown
        }
    })
}

/// Masks the password of a URL (`redis://user:pass@host` -> `redis://user:***@host`).
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
    if user.len() == userinfo.len() && !userinfo.is_empty() {
        // `redis://token@host`: the lone userinfo is the password.
        return format!("{}***{}", &url[..scheme_end], &rest[at..]);
    }
    format!("{}{user}:***{}", &url[..scheme_end], &rest[at..])
}

/// Parses the process arguments into `T`, after replacing the shared flags'
/// placeholder defaults with this service's, in every subcommand.
pub fn parse_args<T: CommandFactory + FromArgMatches>(defaults: &ServiceDefaults) -> T {
    let command = with_defaults(T::command(), defaults);
    let mut matches: ArgMatches = command.clone().get_matches();
    match T::from_arg_matches_mut(&mut matches) {
        Ok(args) => args,
        Err(err) => err.with_cmd(&command).exit(),
    }
}

/// Same as [`parse_args`] for an explicit argument list (tests).
pub fn try_parse_args_from<T, I, S>(defaults: &ServiceDefaults, args: I) -> Result<T, clap::Error>
where
    T: CommandFactory + FromArgMatches,
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let command = with_defaults(T::command(), defaults);
    let mut matches = command.clone().try_get_matches_from(args)?;
    T::from_arg_matches_mut(&mut matches).map_err(|err| err.with_cmd(&command))
}

fn with_defaults(command: clap::Command, d: &ServiceDefaults) -> clap::Command {
    let defaults: [(&str, String); 6] = [
        ("topic", d.topic.to_owned()),
        ("group_id", d.group_id.to_owned()),
        ("batch_max_events", d.batch_max_events.to_string()),
        ("batch_max_bytes", d.batch_max_bytes.to_string()),
        ("batch_linger_ms", d.batch_linger_ms.to_string()),
        ("prefetch_kbytes", d.prefetch_kbytes.to_string()),
    ];
    let mut command = command;
    for (id, value) in defaults {
        if command.get_arguments().any(|a| a.get_id() == id) {
            command = command.mut_arg(id, |arg| arg.default_value(value));
        }
    }
    let names: Vec<String> = command
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for name in names {
        command = command.mut_subcommand(name, |sub| with_defaults(sub, d));
    }
    command
}

/// Wraps a librdkafka configuration error with the flag that feeds it.
pub(crate) fn kafka_config_context<T>(
    result: Result<T, rdkafka::error::KafkaError>,
    what: &str,
) -> anyhow::Result<T> {
    result.map_err(|err| {
        anyhow::anyhow!(
            "cannot create the Kafka {what}: {}; check --bootstrap-servers and every \
             --kafka-option (KAFKA_OPTIONS)",
            config_error_without_secrets(&err)
        )
    })
}

/// librdkafka's refusal of an option, with its value masked unless it is
/// one of [`SHOWN_KAFKA_OPTIONS`]: rdkafka's own message quotes the value,
/// and librdkafka's description may repeat it.
fn config_error_without_secrets(err: &rdkafka::error::KafkaError) -> String {
    match err {
        rdkafka::error::KafkaError::ClientConfig(_, desc, key, value) => {
            if is_secret_key(key) && !value.is_empty() {
                format!(
                    "librdkafka refused {key}=*** (value not shown): {}",
                    desc.replace(value.as_str(), "***")
                )
            } else {
                format!("librdkafka refused {key}={value}: {desc}")
            }
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// What users of managed Kafka need is built in: TLS, SASL PLAIN and
    /// SCRAM, Kerberos (GSSAPI), OAUTHBEARER with OIDC, zstd batches.
    #[test]
    fn librdkafka_is_built_with_what_managed_kafka_needs() {
        let native = rdkafka::ClientConfig::new().create_native_config();
        let features = native
            .and_then(|config| config.get("builtin.features"))
            .unwrap_or_default();
        for needed in [
            "ssl",
            "sasl_plain",
            "sasl_scram",
            "sasl_gssapi",
            "sasl_oauthbearer",
            "oidc",
            "zstd",
        ] {
            assert!(
                features.split(',').any(|f| f == needed),
                "{needed} not in {features}"
            );
        }
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        consumer: ConsumerArgs,
    }

    const DEFAULTS: ServiceDefaults = ServiceDefaults {
        topic: "user3",
        group_id: "redis-sink",
        batch_max_events: 123,
        batch_max_bytes: 4096,
        batch_linger_ms: 7,
        prefetch_kbytes: 1_077,
    };

    fn parse(args: &[&str]) -> Result<ConsumerArgs, clap::Error> {
        let argv = std::iter::once("svc").chain(args.iter().copied());
        try_parse_args_from::<Cli, _, _>(&DEFAULTS, argv).map(|c| c.consumer)
    }

    #[test]
    fn statistics_must_come_often_enough_to_see_a_stall() {
        let check = |interval: &str| {
            let option = format!("statistics.interval.ms={interval}");
            parse(&["--bootstrap-servers", "k:9092", "--kafka-option", &option])
                .unwrap()
                .validate()
                .map_err(|e| e.to_string())
        };
        assert!(check("1000").is_ok());
        assert!(check("30000").is_ok(), "half the default 60 s timeout");
        for interval in ["0", "30001", "soon"] {
            let refusal = check(interval).unwrap_err();
            assert!(
                refusal.starts_with(&format!(
                    "--kafka-option statistics.interval.ms={interval}: expected 1 to 30000"
                )),
                "{refusal}"
            );
        }
    }

    #[test]
    fn service_defaults_apply() {
        let args = parse(&["--bootstrap-servers", "k:9092"]).unwrap();
        assert_eq!(args.topic, "user3");
        assert_eq!(args.group_id, "redis-sink");
        assert_eq!(args.dlq_topic(), "user3.dlq");
        assert_eq!(args.batch_max_events, 123);
        assert_eq!(args.batch_limits().linger, Duration::from_millis(7));
        assert_eq!(
            args.consumer_config().get("queued.max.messages.kbytes"),
            Some("1077")
        );
        let tuned = parse(&["--bootstrap-servers", "k:9092", "--prefetch-kbytes", "1500"]).unwrap();
        assert_eq!(
            tuned.consumer_config().get("queued.max.messages.kbytes"),
            Some("1500")
        );
    }

    #[test]
    fn repeatable_kafka_options() {
        let args = parse(&[
            "--bootstrap-servers",
            "k:9092",
            "--kafka-option",
            "security.protocol=SASL_SSL",
            "--kafka-option",
            "sasl.password=hunter2",
        ])
        .unwrap();
        assert_eq!(args.kafka_options().count(), 2);
        assert_eq!(
            args.redacted_kafka_options(),
            "security.protocol=SASL_SSL,sasl.password=***"
        );
        let consumer = args.consumer_config();
        assert_eq!(consumer.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
    }

    #[test]
    fn commas_split_options_only_before_a_key() {
        let args = parse(&[
            "--bootstrap-servers",
            "k",
            "--kafka-option",
            "debug=fetch,cgrp,security.protocol=SSL",
            "--kafka-option",
            "client.id=a",
        ])
        .unwrap();
        let pairs: Vec<(String, String)> = args.kafka_options().cloned().collect();
        assert_eq!(
            pairs,
            vec![
                ("debug".into(), "fetch,cgrp".into()),
                ("security.protocol".into(), "SSL".into()),
                ("client.id".into(), "a".into()),
            ]
        );
    }

    #[test]
    fn user_options_override_tuning_defaults() {
        let args = parse(&[
            "--bootstrap-servers",
            "k:9092",
            "--kafka-option",
            "auto.offset.reset=latest,statistics.interval.ms=1000",
        ])
        .unwrap();
        assert_eq!(
            args.consumer_config().get("auto.offset.reset"),
            Some("latest")
        );
        assert_eq!(
            args.producer_config().get("auto.offset.reset"),
            None,
            "consumer-only"
        );
        assert_eq!(
            args.producer_config().get("statistics.interval.ms"),
            None,
            "the producer would log them at info"
        );
    }

    #[test]
    fn wrong_values_name_the_flag() {
        let err = parse(&["--bootstrap-servers", "k", "--batch-max-events", "0"]).unwrap_err();
        assert!(err.to_string().contains("--batch-max-events"), "{err}");
        let err = parse(&["--bootstrap-servers", "k", "--kafka-option", "novalue"]).unwrap_err();
        assert!(err.to_string().contains("KEY=VALUE"), "{err}");
        let err = parse(&["--bootstrap-servers", "k", "--metrics-addr", "nope"]).unwrap_err();
        assert!(err.to_string().contains("--metrics-addr"), "{err}");
    }

    #[test]
    fn managed_options_are_refused() {
        let args = parse(&[
            "--bootstrap-servers",
            "k",
            "--kafka-option",
            "enable.auto.commit=true",
        ])
        .unwrap();
        let err = args.validate().unwrap_err().to_string();
        assert!(err.contains("enable.auto.commit"), "{err}");
        let args = parse(&["--bootstrap-servers", "k", "--dlq-topic", "user3"]).unwrap();
        assert!(args.validate().is_err());
        // A setting with a flag of its own is refused, naming the flag; a
        // second name of one the service sets, naming the first.
        for (option, flag) in [
            (
                "session.timeout.ms=9000",
                "--session-timeout-ms (KAFKA_SESSION_TIMEOUT_MS)",
            ),
            (
                "queued.max.messages.kbytes=1024",
                "--prefetch-kbytes (PREFETCH_KBYTES)",
            ),
            (
                "topic.auto.offset.reset=latest",
                "auto.offset.reset, without the prefix (the service sets auto.offset.reset \
                 itself, and librdkafka would take either of the two)",
            ),
        ] {
            let args = parse(&["--bootstrap-servers", "k", "--kafka-option", option]).unwrap();
            let key = option.split('=').next().unwrap_or_default();
            assert_eq!(
                args.validate().unwrap_err().to_string(),
                format!(
                    "Kafka option {key} cannot be set (--kafka-option, KAFKA_OPTIONS or the \
                     options file): use {flag}"
                )
            );
        }
    }

    #[test]
    fn the_dead_letter_producer_is_idempotent_only_when_asked() {
        let args = parse(&["--bootstrap-servers", "k"]).unwrap();
        assert_eq!(
            args.producer_config().get("enable.idempotence"),
            Some("false")
        );
        let args = parse(&[
            "--bootstrap-servers",
            "k",
            "--kafka-option",
            "enable.idempotence=true",
        ])
        .unwrap();
        assert_eq!(
            args.producer_config().get("enable.idempotence"),
            Some("true")
        );
    }

    #[test]
    fn a_properties_file_gives_options_that_flags_override() {
        let path = std::env::temp_dir().join(format!("kafka-{}.properties", std::process::id()));
        std::fs::write(
            &path,
            "# from a Secret volume\n\nsecurity.protocol = SASL_SSL\nsasl.password=a,b=c\n! old\nclient.id=file\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let args = parse(&[
            "--bootstrap-servers",
            "k",
            "--kafka-options-file",
            file,
            "--kafka-option",
            "client.id=flag",
        ])
        .unwrap();
        let config = args.consumer_config();
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("sasl.password"), Some("a,b=c"), "commas kept");
        assert_eq!(config.get("client.id"), Some("flag"), "the flag wins");

        std::fs::write(&path, "sasl.password=fine\nhunter2\n").unwrap();
        let err = parse(&["--bootstrap-servers", "k", "--kafka-options-file", file])
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && !err.contains("hunter2"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = parse(&["--bootstrap-servers", "k", "--kafka-options-file", file])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot read it") && err.contains(file),
            "{err}"
        );
    }

    #[test]
    fn only_known_settings_show_their_values() {
        for shown in ["security.protocol", "fetch.wait.max.ms", "retry.backoff.ms"] {
            assert!(!is_secret_key(shown), "{shown}");
        }
        // Credentials, names librdkafka may add, a fragment of a value
        // split at a comma: masked.
        for masked in [
            "sasl.password",
            "sasl.username",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "cd",
        ] {
            assert!(is_secret_key(masked), "{masked}");
        }
    }

    #[test]
    fn a_refused_option_is_named_without_its_secret() {
        use rdkafka::error::KafkaError;
        use rdkafka::types::RDKafkaConfRes;
        let refused = |key: &str, value: &str, desc: String| {
            config_error_without_secrets(&KafkaError::ClientConfig(
                RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
                desc,
                key.to_owned(),
                value.to_owned(),
            ))
        };
        let text = refused(
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "hunter2",
            "Invalid value \"hunter2\" for configuration property".into(),
        );
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("sasl.oauthbearer.assertion.private.key.passphrase=***"));
        // A typo in a secret's name hides its value too.
        assert!(!refused("sasl.pasword", "hunter2", "No such property".into()).contains("hunter2"));
        // Settings stay readable.
        assert!(
            refused("security.protocol", "SASL_SSLL", "Invalid value".into())
                .contains("security.protocol=SASL_SSLL")
        );
    }

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact_url("redis://user:pw@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("rediss://:pw@host"), "rediss://:***@host");
        assert_eq!(redact_url("redis://token@host"), "redis://***@host");
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}

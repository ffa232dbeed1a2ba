//! The service's own flags (the Kafka and batching ones are
//! [`sink_core::ConsumerArgs`]), checked into [`Settings`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use sink_core::{ConsumerArgs, ServiceDefaults};

use crate::plan::{RequestLimits, MAX_REQUEST_BYTES, MAX_REQUEST_ROWS};
use crate::table::{Granularity, Layout};

/// Where rows go and how they are sent.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "BigQuery")]
pub struct BigQueryArgs {
    /// Google Cloud project holding the dataset.
    #[arg(long, env = "BIGQUERY_PROJECT", value_name = "PROJECT")]
    pub project: String,

    /// Dataset holding the table. It must exist: the sink does not create datasets.
    #[arg(long, env = "BIGQUERY_DATASET", value_name = "DATASET")]
    pub dataset: String,

    /// Table the rows go to; created at start if missing (see docs/bigquery.md).
    #[arg(
        long,
        env = "BIGQUERY_TABLE",
        value_name = "TABLE",
        default_value = "user_logs"
    )]
    pub table: String,

    /// Fail at start when the table does not exist, instead of creating it.
    #[arg(long, env = "BIGQUERY_NO_CREATE_TABLE")]
    pub no_create_table: bool,

    /// TIMESTAMP column the table is partitioned on, when the sink creates
    /// it: event_time or ingested_at. (An existing table is left as it is;
    /// a different layout is logged at start.)
    #[arg(
        long,
        env = "BIGQUERY_PARTITION_FIELD",
        value_name = "COLUMN",
        default_value = "event_time"
    )]
    pub partition_field: String,

    /// Partition length of the table the sink creates.
    #[arg(long, env = "BIGQUERY_PARTITION_GRANULARITY", value_name = "UNIT",
          value_enum, ignore_case = true, default_value_t = Granularity::Day)]
    pub partition_granularity: Granularity,

    /// BigQuery deletes partitions older than this many days, in the table
    /// the sink creates. Without it: partitions are kept.
    #[arg(long, env = "BIGQUERY_PARTITION_EXPIRATION_DAYS", value_name = "DAYS",
          value_parser = clap::value_parser!(u64).range(1..=36_500))]
    pub partition_expiration_days: Option<u64>,

    /// Queries of the table the sink creates must filter on the partition
    /// column (no accidental full scans).
    #[arg(long, env = "BIGQUERY_REQUIRE_PARTITION_FILTER")]
    pub require_partition_filter: bool,

    /// Clustering columns of the table the sink creates, comma-separated,
    /// at most 4 ("" for none).
    #[arg(
        long,
        env = "BIGQUERY_CLUSTERING_FIELDS",
        value_name = "COLUMNS",
        default_value = "info,user_id"
    )]
    pub clustering_fields: String,

    /// Base URL of a BigQuery-compatible REST API, such as the emulator
    /// (`http://127.0.0.1:9050`; `/bigquery/v2` is appended) or a private
    /// endpoint. An http:// one without --credentials gets a static token;
    /// idle connections are not reused. Without it: Google's endpoint.
    #[arg(long, env = "BIGQUERY_ENDPOINT", value_name = "URL")]
    pub bigquery_endpoint: Option<String>,

    /// How rows are written: `insert-all` (the legacy streaming API,
    /// `tabledata.insertAll`), `storage` (the Storage Write API's
    /// `_default` stream, at least once, half the price per GB) or
    /// `storage-exactly-once` (a PENDING stream per batch, committed once
    /// recorded in Kafka: exactly once per batch, one batch at a time).
    /// docs/bigquery.md compares them.
    #[arg(long, env = "BIGQUERY_WRITE_API", value_name = "API", value_enum,
          default_value_t = WriteApi::InsertAll)]
    pub write_api: WriteApi,

    /// URL of a Storage Write API-compatible gRPC endpoint, such as the
    /// emulator's (`http://127.0.0.1:9060`). Needed with --write-api
    /// storage or storage-exactly-once when --bigquery-endpoint is set.
    /// Without it: Google's (https://bigquerystorage.googleapis.com, TLS).
    #[arg(long, env = "BIGQUERY_GRPC_ENDPOINT", value_name = "URL")]
    pub bigquery_grpc_endpoint: Option<String>,

    /// Credentials file: a service-account key, an authorized-user file, or
    /// an external_account file (Workload Identity Federation). Without it:
    /// gcloud's application default credentials, else the metadata server
    /// (GKE Workload Identity; GCE_METADATA_HOST if set). docs/security.md.
    #[arg(long, env = "GOOGLE_APPLICATION_CREDENTIALS", value_name = "FILE")]
    pub credentials: Option<PathBuf>,

    /// Most rows per insertAll request. A batch of the consume loop
    /// (--batch-max-events) is split into requests of at most this many rows,
    /// each with a JSON body of at most --batch-max-bytes (below 10 MB).
    /// insertAll only: Storage Write API appends are cut at 9.5 MB.
    #[arg(long, env = "BATCH_MAX_ROWS", value_name = "N", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..=MAX_REQUEST_ROWS as u64))]
    pub batch_max_rows: u64,

    /// Batches written at once (their insertAll requests, or their appends,
    /// pipelined on the one stream). Offsets still advance in order per
    /// partition. storage-exactly-once writes one at a time.
    #[arg(long, env = "MAX_IN_FLIGHT", value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    pub max_in_flight: u64,

    /// gzip level of insertAll request bodies: 0 sends them stored
    /// (uncompressed, the least CPU), 1-9 trade CPU for bytes on the wire.
    /// The request limits apply to the JSON before compression.
    #[arg(long, env = "BIGQUERY_GZIP_LEVEL", value_name = "0-9", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=9))]
    pub gzip_level: u32,

    /// Give up on one insertAll call, or on an append whose stream has not
    /// answered anything for this long (then it is retried).
    #[arg(long, env = "BIGQUERY_REQUEST_TIMEOUT_SECS", value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub request_timeout_secs: u64,

    /// storage-exactly-once: least time between two batches' streams, per
    /// instance. BigQuery allows 10,000 CreateWriteStream calls an hour per
    /// project and region: keep instances × 3,600,000 / this below it, and
    /// raise --batch-max-events so that one batch per interval keeps up.
    #[arg(long, env = "BIGQUERY_STREAM_INTERVAL_MS", value_name = "MS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub stream_interval_ms: u64,
}

/// The API rows are written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WriteApi {
    /// `tabledata.insertAll`: JSON rows, best-effort de-duplication by
    /// insertId.
    InsertAll,
    /// The Storage Write API's `_default` stream: protobuf rows on one
    /// long-lived gRPC stream.
    Storage,
    /// A Storage Write API PENDING stream per batch, committed after it is
    /// recorded in Kafka's commit metadata.
    StorageExactlyOnce,
}

impl WriteApi {
    /// Whether rows go through the Storage Write API (gRPC).
    pub fn is_storage(self) -> bool {
        matches!(self, Self::Storage | Self::StorageExactlyOnce)
    }
}

/// Checked settings of the sink.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The table.
    pub target: Target,
    /// Create the table when it is missing.
    pub create_table: bool,
    /// Partitioning and clustering of the table the sink creates.
    pub layout: Layout,
    /// `<base>/bigquery/v2` of a BigQuery-compatible API, if not Google's.
    pub endpoint: Option<String>,
    /// The API rows are written with.
    pub write_api: WriteApi,
    /// The Storage Write API's gRPC endpoint, if not Google's.
    pub grpc_endpoint: Option<String>,
    /// Credentials file, if not application default credentials.
    pub credentials: Option<PathBuf>,
    /// Limits of one insertAll request.
    pub limits: RequestLimits,
    /// Batches written at once.
    pub max_in_flight: usize,
    /// Timeout of one HTTP call.
    pub request_timeout: Duration,
    /// gzip level of request bodies.
    pub gzip_level: u32,
    /// Least time between two PENDING streams' creation.
    pub stream_interval: Duration,
}

impl Settings {
    /// Checks the flags, including the batch byte limit the consume loop
    /// shares with the requests.
    ///
    /// # Errors
    ///
    /// A message naming the flag and what is wrong with it.
    pub fn from_args(args: &BigQueryArgs, consumer: &ConsumerArgs) -> anyhow::Result<Self> {
        let max_bytes = usize::try_from(consumer.batch_max_bytes).unwrap_or(usize::MAX);
        if max_bytes >= MAX_REQUEST_BYTES {
            bail!(
                "--batch-max-bytes (BATCH_MAX_BYTES) is {max_bytes}: BigQuery refuses insertAll requests of \
                 10 MB or more, so it must be below {MAX_REQUEST_BYTES} (default 9000000)"
            );
        }
        let target = Target {
            project: checked_name("--project (BIGQUERY_PROJECT)", &args.project, "-.:")?,
            dataset: checked_name("--dataset (BIGQUERY_DATASET)", &args.dataset, "")?,
            table: checked_name("--table (BIGQUERY_TABLE)", &args.table, "-$ ")?,
        };
        let endpoint = args
            .bigquery_endpoint
            .as_deref()
            .filter(|url| !url.trim().is_empty())
            .map(v2_base_url)
            .transpose()?;
        let grpc_endpoint = args
            .bigquery_grpc_endpoint
            .as_deref()
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(grpc_url)
            .transpose()?;
        if args.write_api.is_storage() && endpoint.is_some() && grpc_endpoint.is_none() {
            bail!(
                "--write-api storage(-exactly-once) with --bigquery-endpoint (BIGQUERY_ENDPOINT) needs \
                 --bigquery-grpc-endpoint (BIGQUERY_GRPC_ENDPOINT): the Storage Write API is \
                 gRPC, on its own port (the emulator's --grpc-port)"
            );
        }
        let layout = Layout {
            partition_column: Layout::partition_column(args.partition_field.trim())
                .map_err(|why| anyhow!("--partition-field (BIGQUERY_PARTITION_FIELD): {why}"))?,
            granularity: args.partition_granularity,
            partition_expiration: args
                .partition_expiration_days
                .map(|days| Duration::from_secs(days * 86_400)),
            require_partition_filter: args.require_partition_filter,
            clustering: Layout::clustering_columns(&args.clustering_fields).map_err(|why| {
                anyhow!("--clustering-fields (BIGQUERY_CLUSTERING_FIELDS): {why}")
            })?,
        };
        Ok(Self {
            target,
            create_table: !args.no_create_table,
            layout,
            endpoint,
            write_api: args.write_api,
            grpc_endpoint,
            credentials: args
                .credentials
                .clone()
                .filter(|p| !p.as_os_str().is_empty()),
            limits: RequestLimits {
                max_rows: usize::try_from(args.batch_max_rows).context("--batch-max-rows")?,
                max_bytes,
            },
            max_in_flight: if args.write_api == WriteApi::StorageExactlyOnce {
                1
            } else {
                usize::try_from(args.max_in_flight).context("--max-in-flight")?
            },
            request_timeout: Duration::from_secs(args.request_timeout_secs),
            gzip_level: args.gzip_level,
            stream_interval: Duration::from_millis(args.stream_interval_ms),
        })
    }
}

/// A project, dataset or table name: letters, digits, underscores and the
/// `extra` characters BigQuery allows in that kind of name. Catching a typo
/// here gives a clearer message than BigQuery's 400.
fn checked_name(flag: &str, value: &str, extra: &str) -> anyhow::Result<String> {
    let value = value.trim();
    if value.is_empty() {
        bail!("{flag} is empty");
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_alphanumeric() || *c == '_' || extra.contains(*c)))
    {
        bail!("{flag} {value:?} contains {bad:?}, which BigQuery does not allow there");
    }
    Ok(value.to_owned())
}

/// `http://host:port` → `http://host:port/bigquery/v2` (also accepted with
/// the suffix already there).
fn v2_base_url(raw: &str) -> anyhow::Result<String> {
    let url = reqwest::Url::parse(raw.trim()).ok().filter(|u| {
        matches!(u.scheme(), "http" | "https") && u.host().is_some() && u.query().is_none()
    });
    let Some(url) = url else {
        bail!(
            "--bigquery-endpoint (BIGQUERY_ENDPOINT) {raw:?} is not an http(s) base URL such as http://127.0.0.1:9050"
        );
    };
    let base = url.as_str().trim_end_matches('/');
    Ok(if base.ends_with("/bigquery/v2") {
        base.to_owned()
    } else {
        format!("{base}/bigquery/v2")
    })
}

/// A gRPC endpoint: an http(s) URL with a host and nothing after it.
fn grpc_url(raw: &str) -> anyhow::Result<String> {
    let url = reqwest::Url::parse(raw).ok().filter(|u| {
        matches!(u.scheme(), "http" | "https")
            && u.host().is_some()
            && u.query().is_none()
            && matches!(u.path(), "" | "/")
    });
    match url {
        Some(url) => Ok(url.as_str().trim_end_matches('/').to_owned()),
        None => bail!(
            "--bigquery-grpc-endpoint (BIGQUERY_GRPC_ENDPOINT) {raw:?} is not an http(s) URL \
             such as http://127.0.0.1:9060"
        ),
    }
}

/// The shared flags' defaults for this service.
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    topic: "user2",
    group_id: "bigquery-sink",
    batch_max_events: 500,
    // Requests must stay below BigQuery's 10 MB (checked at start).
    batch_max_bytes: 9_000_000,
    batch_linger_ms: 1_000,
    // Its input holds cut lines of 900 KiB: with 2 MB ahead it fetched
    // 4-15 % fewer rows/s against an instant endpoint (docs/benchmarks.md).
    prefetch_kbytes: 4_096,
};

/// A table's full name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Project.
    pub project: String,
    /// Dataset.
    pub dataset: String,
    /// Table.
    pub table: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.project, self.dataset, self.table)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;
    use sink_core::config::try_parse_args_from;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        consumer: ConsumerArgs,
        #[command(flatten)]
        bigquery: BigQueryArgs,
    }

    /// Parses the required flags plus `extra`, which may override them.
    fn parse(extra: &[&str]) -> Result<Cli, clap::Error> {
        let required = [
            ("--bootstrap-servers", "k:9092"),
            ("--project", "test-project"),
            ("--dataset", "movielog"),
        ];
        let mut argv = vec!["bigquery-sink"];
        for (flag, value) in required {
            if !extra.contains(&flag) {
                argv.extend([flag, value]);
            }
        }
        argv.extend(extra);
        try_parse_args_from::<Cli, _, _>(&DEFAULTS, argv)
    }

    fn settings(extra: &[&str]) -> anyhow::Result<Settings> {
        let cli = parse(extra)?;
        Settings::from_args(&cli.bigquery, &cli.consumer)
    }

    #[test]
    fn defaults() {
        // BIGQUERY_ENDPOINT may be set by the test stack's environment.
        let cli = parse(&["--bigquery-endpoint", ""]).unwrap();
        assert_eq!(cli.consumer.topic, "user2");
        assert_eq!(cli.consumer.group_id, "bigquery-sink");
        assert_eq!(cli.consumer.batch_linger_ms, 1_000);
        let settings = Settings::from_args(&cli.bigquery, &cli.consumer).unwrap();
        assert_eq!(
            settings.target.to_string(),
            "test-project.movielog.user_logs"
        );
        assert_eq!(
            settings.limits,
            RequestLimits {
                max_rows: 500,
                max_bytes: 9_000_000
            }
        );
        assert_eq!(settings.max_in_flight, 4);
        assert!(settings.create_table);
        assert_eq!(settings.endpoint, None);
    }

    #[test]
    fn endpoint_gets_the_v2_path() {
        for raw in [
            "http://127.0.0.1:9050",
            "http://127.0.0.1:9050/",
            "http://127.0.0.1:9050/bigquery/v2",
        ] {
            let s = settings(&["--bigquery-endpoint", raw]).unwrap();
            assert_eq!(
                s.endpoint.as_deref(),
                Some("http://127.0.0.1:9050/bigquery/v2")
            );
        }
        for bad in [
            "127.0.0.1:9050",
            "not a url",
            "ftp://host",
            "http://h:1/?q=1",
        ] {
            let err = settings(&["--bigquery-endpoint", bad])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--bigquery-endpoint"), "{err}");
        }
    }

    #[test]
    fn byte_limit_stays_below_ten_megabytes() {
        let err = settings(&["--batch-max-bytes", "10000000"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--batch-max-bytes"), "{err}");
        let s = settings(&["--batch-max-bytes", "9999999"]).unwrap();
        assert_eq!(s.limits.max_bytes, 9_999_999);
    }

    #[test]
    fn row_limit_is_bigquerys() {
        assert!(parse(&["--batch-max-rows", "50000"]).is_ok());
        let err = parse(&["--batch-max-rows", "50001"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--batch-max-rows"), "{err}");
        assert!(parse(&["--batch-max-rows", "0"]).is_err());
        assert!(parse(&["--max-in-flight", "0"]).is_err());
    }

    #[test]
    fn names_are_checked() {
        let err = settings(&["--dataset", "movie-log"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--dataset"), "{err}");
        let err = settings(&["--table", "a.b"]).unwrap_err().to_string();
        assert!(err.contains("--table"), "{err}");
        assert!(settings(&["--table", "user_logs-2024"]).is_ok());
        assert!(settings(&["--project", "example.com:my-project"]).is_ok());
    }

    #[test]
    fn exactly_once_writes_one_batch_at_a_time_paced_by_the_stream_interval() {
        let s = settings(&[
            "--write-api",
            "storage-exactly-once",
            "--bigquery-endpoint",
            "",
            "--max-in-flight",
            "8",
        ])
        .unwrap();
        assert_eq!(s.write_api, WriteApi::StorageExactlyOnce);
        assert_eq!(s.max_in_flight, 1, "one batch at a time");
        assert_eq!(s.stream_interval, Duration::from_secs(1));
        let s = settings(&["--bigquery-endpoint", "", "--stream-interval-ms", "1100"]).unwrap();
        assert_eq!(s.stream_interval, Duration::from_millis(1_100));
        assert_eq!(s.max_in_flight, 4, "other APIs keep --max-in-flight");
        let err = settings(&["--stream-interval-ms", "1s"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--stream-interval-ms"), "{err}");
    }

    #[test]
    fn the_storage_api_needs_a_grpc_endpoint_beside_a_rest_one() {
        // The test stack's environment may set both endpoints.
        let s = settings(&["--bigquery-endpoint", "", "--bigquery-grpc-endpoint", ""]).unwrap();
        assert_eq!(s.write_api, WriteApi::InsertAll);
        let s = settings(&[
            "--write-api",
            "storage",
            "--bigquery-endpoint",
            "",
            "--bigquery-grpc-endpoint",
            "",
        ])
        .unwrap();
        assert_eq!((s.write_api, s.grpc_endpoint), (WriteApi::Storage, None));
        let err = settings(&[
            "--write-api",
            "storage",
            "--bigquery-endpoint",
            "http://127.0.0.1:9050",
            "--bigquery-grpc-endpoint",
            "",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--bigquery-grpc-endpoint"), "{err}");
        let s = settings(&[
            "--write-api",
            "storage",
            "--bigquery-endpoint",
            "http://127.0.0.1:9050",
            "--bigquery-grpc-endpoint",
            "http://127.0.0.1:9060/",
        ])
        .unwrap();
        assert_eq!(s.grpc_endpoint.as_deref(), Some("http://127.0.0.1:9060"));
        for bad in ["127.0.0.1:9060", "http://h:1/v1", "grpc://h:1"] {
            let err = settings(&["--bigquery-grpc-endpoint", bad])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--bigquery-grpc-endpoint"), "{bad}: {err}");
        }
        assert!(parse(&["--write-api", "legacy"]).is_err());
    }

    #[test]
    fn table_layout_flags() {
        assert_eq!(settings(&[]).unwrap().layout, Layout::default());
        let s = settings(&[
            "--partition-field",
            "ingested_at",
            "--partition-granularity",
            "hour",
            "--partition-expiration-days",
            "30",
            "--require-partition-filter",
            "--clustering-fields",
            "kafka_partition",
        ])
        .unwrap();
        assert_eq!(
            s.layout,
            Layout {
                partition_column: "ingested_at",
                granularity: Granularity::Hour,
                partition_expiration: Some(Duration::from_secs(30 * 86_400)),
                require_partition_filter: true,
                clustering: vec!["kafka_partition"],
            }
        );
        assert!(settings(&["--clustering-fields", ""])
            .unwrap()
            .layout
            .clustering
            .is_empty());
        for (flags, flag) in [
            (&["--partition-field", "user_id"][..], "--partition-field"),
            (
                &["--clustering-fields", "payload"][..],
                "--clustering-fields",
            ),
        ] {
            let err = settings(flags).unwrap_err().to_string();
            assert!(err.contains(flag), "{err}");
        }
        assert!(parse(&["--partition-granularity", "WEEK"]).is_err());
        assert!(parse(&["--partition-expiration-days", "0"]).is_err());
    }

    #[test]
    fn no_create_table_flag() {
        assert!(!settings(&["--no-create-table"]).unwrap().create_table);
    }
}

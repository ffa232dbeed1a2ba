//! The table: its schema, creating it at start, and refusing to start on a
//! table that cannot hold what the sink writes.
//!
//! An existing table is checked, never altered: a column that is missing,
//! of another type, or REQUIRED where the sink may leave it NULL would make
//! BigQuery refuse rows (or worse, drop fields), so the sink stops at start
//! and lists the differences, with the DDL that fixes the missing columns.

use std::time::Duration;

use anyhow::{anyhow, bail};
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::model::clustering::Clustering;
use gcp_bigquery_client::model::field_type::FieldType;
use gcp_bigquery_client::model::table::Table;
use gcp_bigquery_client::model::table_field_schema::TableFieldSchema;
use gcp_bigquery_client::model::table_schema::TableSchema;
use gcp_bigquery_client::model::time_partitioning::TimePartitioning;
use gcp_bigquery_client::Client;

use crate::config::Target;
use crate::error::{self, describe, status};

/// A column type the sink writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TIMESTAMP.
    Timestamp,
    /// STRING.
    String,
    /// JSON.
    Json,
    /// INT64 (INTEGER is the same type).
    Int64,
}

impl Kind {
    fn field_type(self) -> FieldType {
        match self {
            Kind::Timestamp => FieldType::Timestamp,
            Kind::String => FieldType::String,
            Kind::Json => FieldType::Json,
            Kind::Int64 => FieldType::Int64,
        }
    }

    fn sql(self) -> &'static str {
        match self {
            Kind::Timestamp => "TIMESTAMP",
            Kind::String => "STRING",
            Kind::Json => "JSON",
            Kind::Int64 => "INT64",
        }
    }

    fn accepts(self, existing: &FieldType) -> bool {
        matches!(
            (self, existing),
            (Kind::Timestamp, FieldType::Timestamp)
                | (Kind::String, FieldType::String)
                | (Kind::Json, FieldType::Json)
                | (Kind::Int64, FieldType::Int64 | FieldType::Integer)
        )
    }
}

/// A column the sink writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    /// Name.
    pub name: &'static str,
    /// Type.
    pub kind: Kind,
    /// Always written (REQUIRED); every other column may be NULL.
    pub required: bool,
    /// Description stored with the schema.
    pub description: &'static str,
}

const fn column(name: &'static str, kind: Kind, description: &'static str) -> Column {
    Column {
        name,
        kind,
        required: false,
        description,
    }
}

/// The columns, in table order (docs/bigquery.md lists the same).
pub const COLUMNS: [Column; 11] = [
    Column {
        name: "event_time",
        kind: Kind::Timestamp,
        required: true,
        description:
            "When the event happened: @timestamp, or the Kafka message timestamp when absent",
    },
    column(
        "info",
        Kind::String,
        "Event kind (search, movie_detail, login, ...); NULL unless a string",
    ),
    column(
        "user_id",
        Kind::String,
        "User id (integers as decimal text); NULL when anonymous or of another type",
    ),
    column(
        "keyword",
        Kind::String,
        "Search text as typed; NULL unless a string",
    ),
    column(
        "movie_id",
        Kind::String,
        "Movie id (integers as decimal text); NULL unless a non-empty string or an integer",
    ),
    column(
        "host",
        Kind::String,
        "Machine that logged the event; NULL unless a string",
    ),
    column("payload", Kind::Json, "The whole original event"),
    column(
        "kafka_topic",
        Kind::String,
        "Kafka topic the event was read from",
    ),
    column("kafka_partition", Kind::Int64, "Kafka partition"),
    column(
        "kafka_offset",
        Kind::Int64,
        "Kafka offset: (kafka_topic, kafka_partition, kafka_offset) identifies an event",
    ),
    column(
        "ingested_at",
        Kind::Timestamp,
        "When the sink wrote the row",
    ),
];

/// How long a partition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum Granularity {
    /// HOUR.
    Hour,
    /// DAY.
    Day,
    /// MONTH.
    Month,
    /// YEAR.
    Year,
}

impl Granularity {
    /// BigQuery's name of it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hour => "HOUR",
            Self::Day => "DAY",
            Self::Month => "MONTH",
            Self::Year => "YEAR",
        }
    }
}

/// Partitioning and clustering of the table the sink creates (an existing
/// table's are only compared, see [`layout_differences`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The TIMESTAMP column partitions are cut on.
    pub partition_column: &'static str,
    /// How long a partition is.
    pub granularity: Granularity,
    /// Partitions older than this are deleted by BigQuery.
    pub partition_expiration: Option<Duration>,
    /// Queries must filter on the partition column.
    pub require_partition_filter: bool,
    /// Clustering columns, in order (at most 4).
    pub clustering: Vec<&'static str>,
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            partition_column: "event_time",
            granularity: Granularity::Day,
            partition_expiration: None,
            require_partition_filter: false,
            clustering: vec!["info", "user_id"],
        }
    }
}

/// BigQuery clusters a table on at most this many columns.
pub const MAX_CLUSTERING_COLUMNS: usize = 4;

impl Layout {
    /// The column named `name` if partitions can be cut on it.
    ///
    /// # Errors
    ///
    /// Not a column of the table, or not a TIMESTAMP.
    pub fn partition_column(name: &str) -> Result<&'static str, String> {
        let timestamps = || {
            COLUMNS
                .iter()
                .filter(|c| c.kind == Kind::Timestamp)
                .map(|c| c.name)
        };
        timestamps().find(|c| *c == name).ok_or_else(|| {
            format!(
                "{name:?} is not a TIMESTAMP column of the table (one of: {})",
                timestamps().collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// The clustering columns of a comma-separated list (empty: none).
    ///
    /// # Errors
    ///
    /// More than 4, one repeated, not a column, or a JSON column (BigQuery
    /// does not cluster on JSON).
    pub fn clustering_columns(list: &str) -> Result<Vec<&'static str>, String> {
        let mut columns: Vec<&'static str> = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let column = COLUMNS
                .iter()
                .find(|c| c.name == name)
                .ok_or_else(|| format!("{name:?} is not a column of the table"))?;
            if column.kind == Kind::Json {
                return Err(format!(
                    "{name:?} is a JSON column, which BigQuery cannot cluster on"
                ));
            }
            if columns.contains(&column.name) {
                return Err(format!("{name:?} is listed twice"));
            }
            columns.push(column.name);
        }
        if columns.len() > MAX_CLUSTERING_COLUMNS {
            return Err(format!(
                "{} columns: BigQuery clusters on at most {MAX_CLUSTERING_COLUMNS}",
                columns.len()
            ));
        }
        Ok(columns)
    }
}

/// The table the sink creates when it is missing.
pub fn definition(target: &Target, layout: &Layout) -> Table {
    let fields = COLUMNS
        .iter()
        .map(|c| {
            let mut field = TableFieldSchema::new(c.name, c.kind.field_type());
            field.mode = Some(if c.required { "REQUIRED" } else { "NULLABLE" }.to_owned());
            field.description = Some(c.description.to_owned());
            field
        })
        .collect();
    let table = Table::new(
        &target.project,
        &target.dataset,
        &target.table,
        TableSchema::new(fields),
    )
    .description("Movie-service log events, one row per Kafka record (written by bigquery-sink; see docs/bigquery.md)")
    .time_partitioning(TimePartitioning {
        expiration_ms: layout
            .partition_expiration
            .map(|e| e.as_millis().to_string()),
        field: Some(layout.partition_column.to_owned()),
        // The deprecated place too: older APIs (and the emulator) read
        // only this one.
        require_partition_filter: layout.require_partition_filter.then_some(true),
        r#type: layout.granularity.name().to_owned(),
    })
    .require_partition_filter(layout.require_partition_filter);
    if layout.clustering.is_empty() {
        table
    } else {
        table.clustering(Clustering {
            fields: Some(layout.clustering.iter().map(|c| (*c).to_owned()).collect()),
        })
    }
}

fn mode(field: &TableFieldSchema) -> &str {
    field.mode.as_deref().unwrap_or("NULLABLE")
}

fn type_name(field_type: &FieldType) -> String {
    format!("{field_type:?}").to_ascii_uppercase()
}

/// What keeps an existing table from holding the sink's rows, one entry per
/// problem; empty when it can. Extra NULLABLE columns are fine.
pub fn schema_differences(existing: &TableSchema, target: &Target) -> Vec<String> {
    let fields = existing.fields.as_deref().unwrap_or_default();
    let find = |name: &str| fields.iter().find(|f| f.name.eq_ignore_ascii_case(name));
    let mut problems = Vec::new();
    let mut missing = Vec::new();
    for column in &COLUMNS {
        let Some(field) = find(column.name) else {
            problems.push(format!(
                "column `{}` is missing (want {})",
                column.name,
                column.kind.sql()
            ));
            missing.push(format!("ADD COLUMN {} {}", column.name, column.kind.sql()));
            continue;
        };
        if !column.kind.accepts(&field.r#type) {
            problems.push(format!(
                "column `{}` is {} (want {})",
                column.name,
                type_name(&field.r#type),
                column.kind.sql()
            ));
        }
        match mode(field) {
            "REPEATED" => problems.push(format!(
                "column `{}` is REPEATED (want {})",
                column.name,
                if column.required { "REQUIRED" } else { "NULLABLE" }
            )),
            "REQUIRED" if !column.required => problems.push(format!(
                "column `{}` is REQUIRED but the sink leaves it NULL when the event lacks it (want NULLABLE)",
                column.name
            )),
            _ => {}
        }
    }
    for field in fields {
        let ours = COLUMNS
            .iter()
            .any(|c| c.name.eq_ignore_ascii_case(&field.name));
        if !ours && mode(field) == "REQUIRED" {
            problems.push(format!(
                "column `{}` is REQUIRED but the sink does not write it",
                field.name
            ));
        }
    }
    if !missing.is_empty() {
        problems.push(format!(
            "to add the missing columns: ALTER TABLE `{target}` {}",
            missing.join(", ")
        ));
    }
    problems
}

/// Partitioning and clustering that differ from what the sink would
/// create with `layout`. Not fatal (rows are written all the same), only
/// reported.
pub fn layout_differences(table: &Table, layout: &Layout) -> Vec<String> {
    let mut notes = Vec::new();
    let partitioning = table.time_partitioning.as_ref();
    let partitioned_on = partitioning.map(|p| (p.r#type.as_str(), p.field.as_deref()));
    let (granularity, column) = (layout.granularity.name(), layout.partition_column);
    if partitioned_on != Some((granularity, Some(column))) {
        notes.push(format!(
            "not {granularity}-partitioned on {column} (queries filtering on {column} scan more)"
        ));
    }
    let expiration = partitioning
        .and_then(|p| p.expiration_ms.as_deref())
        .and_then(|ms| ms.parse::<u64>().ok());
    let want_expiration = layout
        .partition_expiration
        .map(|e| u64::try_from(e.as_millis()).unwrap_or(u64::MAX));
    if expiration != want_expiration {
        notes.push(format!(
            "partitions expire after {} ms, not {} (--partition-expiration-days)",
            expiration.map_or("never".to_owned(), |e| e.to_string()),
            want_expiration.map_or("never".to_owned(), |e| e.to_string()),
        ));
    }
    let requires = table.require_partition_filter.unwrap_or(false)
        || partitioning.and_then(|p| p.require_partition_filter) == Some(true);
    if requires != layout.require_partition_filter {
        notes.push(format!(
            "require_partition_filter is {requires}, not {} (--require-partition-filter)",
            layout.require_partition_filter
        ));
    }
    let clustered = table
        .clustering
        .as_ref()
        .and_then(|c| c.fields.as_deref())
        .unwrap_or_default();
    if !clustered
        .iter()
        .map(String::as_str)
        .eq(layout.clustering.iter().copied())
    {
        notes.push(format!(
            "clustered by {clustered:?}, not {:?}",
            layout.clustering
        ));
    }
    notes
}

/// Attempts of a start-up call that fails transiently (BigQuery or the
/// network not reachable yet) before giving up with its error.
const STARTUP_ATTEMPTS: u32 = 5;

/// Runs a start-up call, retrying transient failures a few times.
async fn at_startup<T, F, Fut>(what: &str, mut call: F) -> Result<T, BQError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BQError>>,
{
    let mut delay = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match call().await {
            Err(err) if error::is_transient(&err) && attempt < STARTUP_ATTEMPTS => {
                if let error::Class::Transient(kind) = error::class(&err) {
                    sink_core::metrics::retry("connect", kind);
                }
                tracing::warn!(error = %describe(&err), retry_in = ?delay, "{what} failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// A start-up failure as a one-line message that says what to fix.
fn startup_error(err: &BQError, what: &str, target: &Target) -> anyhow::Error {
    let text = describe(err);
    match error::class(err) {
        error::Class::Transient(_) => anyhow!(
            "cannot reach BigQuery to {what} ({text}) after {STARTUP_ATTEMPTS} attempts: \
             check --bigquery-endpoint, the network and the credentials"
        ),
        error::Class::Operator(kind) => {
            error::operator_message(kind, &text, target).context(format!("cannot {what}"))
        }
        error::Class::TooLarge => anyhow!("cannot {what}: {text}"),
    }
}

/// Makes sure the dataset exists and the table can hold the rows, creating
/// the table when it is missing and `create` allows.
///
/// # Errors
///
/// A missing dataset, a missing table with `create` false, a table whose
/// schema differs (every difference listed), or BigQuery not reachable.
pub async fn ensure(
    client: &Client,
    target: &Target,
    create: bool,
    layout: &Layout,
) -> anyhow::Result<()> {
    let dataset = at_startup("reading the dataset", || {
        client.dataset().get(&target.project, &target.dataset)
    })
    .await;
    match dataset {
        Ok(_) => {}
        Err(err) if status(&err) == Some(404) => bail!(
            "dataset {}.{} does not exist: create it first (for example `bq mk --dataset {}:{}`); \
             the sink does not create datasets, which needs more permissions than writing rows",
            target.project,
            target.dataset,
            target.project,
            target.dataset
        ),
        Err(err) => return Err(startup_error(&err, "read the dataset", target)),
    }

    let table = at_startup("reading the table", || {
        client
            .table()
            .get(&target.project, &target.dataset, &target.table, None)
    })
    .await;
    let table = match table {
        Ok(table) => table,
        Err(err) if status(&err) == Some(404) => {
            if !create {
                bail!("table {target} does not exist and --no-create-table (BIGQUERY_NO_CREATE_TABLE) forbids creating it");
            }
            match at_startup("creating the table", || {
                client.table().create(definition(target, layout))
            })
            .await
            {
                Ok(_) => {
                    tracing::info!(table = %target, "created the table");
                    return Ok(());
                }
                // Another replica created it first: check theirs.
                Err(err) if status(&err) == Some(409) => client
                    .table()
                    .get(&target.project, &target.dataset, &target.table, None)
                    .await
                    .map_err(|err| startup_error(&err, "read the table", target))?,
                Err(err) => return Err(startup_error(&err, "create the table", target)),
            }
        }
        Err(err) => return Err(startup_error(&err, "read the table", target)),
    };
    let problems = schema_differences(&table.schema, target);
    if !problems.is_empty() {
        bail!(
            "table {target} cannot hold the sink's rows: {}; fix the table or point --table at another one",
            problems.join("; ")
        );
    }
    for note in layout_differences(&table, layout) {
        tracing::warn!(table = %target, "the table is {note}");
    }
    tracing::info!(table = %target, "the table's schema holds the sink's rows");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            project: "p".into(),
            dataset: "d".into(),
            table: "t".into(),
        }
    }

    #[test]
    fn the_definition_is_the_documented_schema() {
        let table = definition(&target(), &Layout::default());
        let json = serde_json::to_value(&table).unwrap();
        let fields: Vec<(String, String, String)> = json["schema"]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["name"].as_str().unwrap().to_owned(),
                    f["type"].as_str().unwrap().to_owned(),
                    f["mode"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let want = [
            ("event_time", "TIMESTAMP", "REQUIRED"),
            ("info", "STRING", "NULLABLE"),
            ("user_id", "STRING", "NULLABLE"),
            ("keyword", "STRING", "NULLABLE"),
            ("movie_id", "STRING", "NULLABLE"),
            ("host", "STRING", "NULLABLE"),
            ("payload", "JSON", "NULLABLE"),
            ("kafka_topic", "STRING", "NULLABLE"),
            ("kafka_partition", "INT64", "NULLABLE"),
            ("kafka_offset", "INT64", "NULLABLE"),
            ("ingested_at", "TIMESTAMP", "NULLABLE"),
        ];
        let want: Vec<(String, String, String)> = want
            .iter()
            .map(|(a, b, c)| ((*a).into(), (*b).into(), (*c).into()))
            .collect();
        assert_eq!(fields, want);
        assert_eq!(json["timePartitioning"]["type"], "DAY");
        assert_eq!(json["timePartitioning"]["field"], "event_time");
        assert_eq!(
            json["clustering"]["fields"],
            serde_json::json!(["info", "user_id"])
        );
        assert!(schema_differences(&table.schema, &target()).is_empty());
        assert!(layout_differences(&table, &Layout::default()).is_empty());
        assert_eq!(json["requirePartitionFilter"], false);
        assert!(json["timePartitioning"].get("expirationMs").is_none());
    }

    #[test]
    fn a_configured_layout_is_created_and_compared() {
        let layout = Layout {
            partition_column: Layout::partition_column("ingested_at").unwrap(),
            granularity: Granularity::Hour,
            partition_expiration: Some(Duration::from_secs(3 * 86_400)),
            require_partition_filter: true,
            clustering: Layout::clustering_columns("kafka_topic, kafka_partition,user_id").unwrap(),
        };
        let table = definition(&target(), &layout);
        let json = serde_json::to_value(&table).unwrap();
        assert_eq!(
            json["timePartitioning"],
            serde_json::json!({"type": "HOUR", "field": "ingested_at", "expirationMs": "259200000", "requirePartitionFilter": true})
        );
        assert_eq!(json["requirePartitionFilter"], true);
        assert_eq!(
            json["clustering"]["fields"],
            serde_json::json!(["kafka_topic", "kafka_partition", "user_id"])
        );
        assert!(layout_differences(&table, &layout).is_empty());
        let notes = layout_differences(&table, &Layout::default());
        assert_eq!(notes.len(), 4, "{notes:?}");

        let unclustered = Layout {
            clustering: Layout::clustering_columns("").unwrap(),
            ..Layout::default()
        };
        let json = serde_json::to_value(definition(&target(), &unclustered)).unwrap();
        assert!(json.get("clustering").is_none(), "{json}");
    }

    #[test]
    fn layouts_bigquery_refuses_are_refused_with_the_reason() {
        let err = Layout::partition_column("info").unwrap_err();
        assert!(err.contains("event_time, ingested_at"), "{err}");
        for (list, why) in [
            ("payload", "JSON"),
            ("info,info", "twice"),
            ("nope", "not a column"),
            ("info,user_id,host,keyword,movie_id", "at most 4"),
        ] {
            let err = Layout::clustering_columns(list).unwrap_err();
            assert!(err.contains(why), "{list}: {err}");
        }
    }

    fn schema(fields: &[(&str, FieldType, Option<&str>)]) -> TableSchema {
        TableSchema::new(
            fields
                .iter()
                .map(|(name, t, mode)| {
                    let mut f = TableFieldSchema::new(name, t.clone());
                    f.mode = mode.map(str::to_owned);
                    f
                })
                .collect(),
        )
    }

    #[test]
    fn integer_is_int64_and_nullable_event_time_is_fine() {
        let mut fields: Vec<(&str, FieldType, Option<&str>)> = COLUMNS
            .iter()
            .map(|c| (c.name, c.kind.field_type(), None))
            .collect();
        fields[8].1 = FieldType::Integer;
        fields.push(("extra", FieldType::String, Some("NULLABLE")));
        fields.push(("tags", FieldType::String, Some("REPEATED")));
        assert_eq!(
            schema_differences(&schema(&fields), &target()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn every_difference_is_listed() {
        let fields = [
            ("EVENT_TIME", FieldType::Timestamp, Some("REQUIRED")),
            ("info", FieldType::String, Some("REQUIRED")),
            ("user_id", FieldType::Integer, None),
            ("keyword", FieldType::String, Some("REPEATED")),
            ("movie_id", FieldType::String, None),
            ("host", FieldType::String, None),
            ("kafka_topic", FieldType::String, None),
            ("kafka_partition", FieldType::Int64, None),
            ("kafka_offset", FieldType::Int64, None),
            ("mandatory", FieldType::Bool, Some("REQUIRED")),
        ];
        let problems = schema_differences(&schema(&fields), &target());
        assert_eq!(
            problems,
            [
                "column `info` is REQUIRED but the sink leaves it NULL when the event lacks it (want NULLABLE)",
                "column `user_id` is INTEGER (want STRING)",
                "column `keyword` is REPEATED (want NULLABLE)",
                "column `payload` is missing (want JSON)",
                "column `ingested_at` is missing (want TIMESTAMP)",
                "column `mandatory` is REQUIRED but the sink does not write it",
                "to add the missing columns: ALTER TABLE `p.d.t` ADD COLUMN payload JSON, ADD COLUMN ingested_at TIMESTAMP",
            ]
        );
    }

    #[test]
    fn other_layouts_are_noted() {
        let mut table = definition(&target(), &Layout::default());
        table.time_partitioning = None;
        table.clustering = None;
        assert_eq!(layout_differences(&table, &Layout::default()).len(), 2);
    }
}

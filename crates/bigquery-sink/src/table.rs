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

/// The partitioning column (DAY partitions).
pub const PARTITION_COLUMN: &str = "event_time";

/// The clustering columns, in order.
pub const CLUSTERING_COLUMNS: [&str; 2] = ["info", "user_id"];

/// The table the sink creates when it is missing.
pub fn definition(target: &Target) -> Table {
    let fields = COLUMNS
        .iter()
        .map(|c| {
            let mut field = TableFieldSchema::new(c.name, c.kind.field_type());
            field.mode = Some(if c.required { "REQUIRED" } else { "NULLABLE" }.to_owned());
            field.description = Some(c.description.to_owned());
            field
        })
        .collect();
    Table::new(
        &target.project,
        &target.dataset,
        &target.table,
        TableSchema::new(fields),
    )
    .description("Movie-service log events, one row per Kafka record (written by bigquery-sink; see docs/bigquery.md)")
    .time_partitioning(TimePartitioning::per_day().field(PARTITION_COLUMN))
    .clustering(Clustering {
        fields: Some(CLUSTERING_COLUMNS.iter().map(|c| (*c).to_owned()).collect()),
    })
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

/// Partitioning and clustering that differ from what the sink creates. Not
/// fatal (rows are written all the same), only reported.
pub fn layout_differences(table: &Table) -> Vec<String> {
    let mut notes = Vec::new();
    let partitioned_on = table
        .time_partitioning
        .as_ref()
        .map(|p| (p.r#type.as_str(), p.field.as_deref()));
    if partitioned_on != Some(("DAY", Some(PARTITION_COLUMN))) {
        notes.push(format!(
            "not DAY-partitioned on {PARTITION_COLUMN} (queries filtering on event_time scan more)"
        ));
    }
    let clustered = table
        .clustering
        .as_ref()
        .and_then(|c| c.fields.as_deref())
        .unwrap_or_default();
    if !clustered.iter().map(String::as_str).eq(CLUSTERING_COLUMNS) {
        notes.push(format!(
            "clustered by {clustered:?}, not {CLUSTERING_COLUMNS:?}"
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
pub async fn ensure(client: &Client, target: &Target, create: bool) -> anyhow::Result<()> {
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
                client.table().create(definition(target))
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
    for note in layout_differences(&table) {
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
        let table = definition(&target());
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
        assert!(layout_differences(&table).is_empty());
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
        let mut table = definition(&target());
        table.time_partitioning = None;
        table.clustering = None;
        assert_eq!(layout_differences(&table).len(), 2);
    }
}

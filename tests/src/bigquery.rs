//! bigquery-sink's sink in the harness, and the emulator and fault proxy.
//!
//! - [`BigQuerySide`]: a fresh table, as a pipeline's sink;
//! - [`Emulator`]: queries and tables through the emulator's REST API
//!   (TIMESTAMP values come back as int64 microseconds);
//! - [`FaultProxy`]: a small HTTP/1.1 proxy on loopback between the sink and
//!   the emulator that can answer errors, drop connections, refuse large
//!   requests or fail some rows instead of forwarding, and records the size
//!   of every insertAll request it receives.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use futures::future::BoxFuture;

use crate::generator::{Generated, Mix};
use crate::pipeline::{Coordinates, Item, SinkSide, Tally};
use crate::service::ServiceFlags;
use crate::Stack;

/// The emulator's REST API, for one project and dataset.
#[derive(Debug, Clone)]
pub struct Emulator {
    http: reqwest::Client,
    /// `<endpoint>/bigquery/v2`.
    v2: String,
    /// Project.
    pub project: String,
    /// Dataset.
    pub dataset: String,
}

impl Emulator {
    /// The stack's emulator.
    pub fn new(stack: &Stack) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                // The emulator closes connections after a 500.
                .pool_max_idle_per_host(0)
                .build()?,
            v2: format!(
                "{}/bigquery/v2",
                stack.bigquery_endpoint.trim_end_matches('/')
            ),
            project: stack.bigquery_project.clone(),
            dataset: stack.bigquery_dataset.clone(),
        })
    }

    /// `` `project.dataset.name` `` for SQL.
    pub fn sql_name(&self, name: &str) -> String {
        format!("`{}.{}.{name}`", self.project, self.dataset)
    }

    /// Creates `<table>_dedup`, the de-duplicated view exactly as
    /// docs/bigquery.md gives it, over `table`; returns the view's name.
    pub async fn create_documented_dedup_view(&self, table: &str) -> anyhow::Result<String> {
        let docs = std::fs::read_to_string(crate::workspace_root().join("docs/bigquery.md"))?;
        let sql = docs
            .split("```sql\n")
            .skip(1)
            .filter_map(|block| block.split("```").next())
            .find(|block| block.contains("CREATE OR REPLACE VIEW"))
            .context("docs/bigquery.md has no CREATE OR REPLACE VIEW block")?;
        let view = format!("{table}_dedup");
        let replaced = sql
            .replace("`PROJECT.DATASET.user_logs_dedup`", &self.sql_name(&view))
            .replace("`PROJECT.DATASET.user_logs`", &self.sql_name(table));
        if replaced.contains("PROJECT.DATASET") {
            bail!("unexpected table names in the documented view:\n{sql}");
        }
        self.query(&replaced).await?;
        Ok(view)
    }

    /// Every (partition, offset) in a table or view of `topic`'s rows, with
    /// repeats, sorted; a row of another topic is an error.
    pub async fn coordinates(
        &self,
        relation: &str,
        topic: &str,
    ) -> anyhow::Result<Vec<(i32, i64)>> {
        let rows = self
            .query(&format!(
                "SELECT kafka_topic, kafka_partition, kafka_offset FROM {}",
                self.sql_name(relation)
            ))
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            if row.first().and_then(Value::as_str) != Some(topic) {
                bail!("a row of another topic: {row:?}");
            }
            let partition = row.get(1).and_then(int).context("kafka_partition")?;
            let offset = row.get(2).and_then(int).context("kafka_offset")?;
            out.push((i32::try_from(partition)?, offset));
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Runs a query; each row is its cells (`v`), strings or null.
    pub async fn query(&self, sql: &str) -> anyhow::Result<Vec<Vec<Value>>> {
        let url = format!("{}/projects/{}/queries", self.v2, self.project);
        let body = json!({"query": sql, "useLegacySql": false, "maxResults": 1_000_000, "timeoutMs": 60_000});
        let response = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let reply: Value = response.json().await.context("query response")?;
        if !status.is_success() {
            bail!("query failed with HTTP {status}: {reply}\n{sql}");
        }
        if reply["jobComplete"] != json!(true) {
            bail!("query did not complete: {reply}");
        }
        let rows: Vec<Vec<Value>> = reply["rows"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|row| {
                        row["f"]
                            .as_array()
                            .map(|cells| cells.iter().map(|c| c["v"].clone()).collect())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let total: usize = reply["totalRows"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .unwrap_or(rows.len());
        if total != rows.len() {
            bail!(
                "query returned {} of {total} rows (paged results are not supported here)",
                rows.len()
            );
        }
        Ok(rows)
    }

    /// A query returning one integer cell.
    pub async fn scalar(&self, sql: &str) -> anyhow::Result<i64> {
        let rows = self.query(sql).await?;
        let cell = rows
            .first()
            .and_then(|r| r.first())
            .with_context(|| format!("no result for {sql}"))?;
        int(cell).with_context(|| format!("not an integer: {cell}"))
    }

    /// Rows in a table or view (0 if it does not exist yet).
    pub async fn count(&self, name: &str) -> anyhow::Result<i64> {
        if !self.exists(name).await? {
            return Ok(0);
        }
        self.scalar(&format!("SELECT COUNT(*) FROM {}", self.sql_name(name)))
            .await
    }

    /// Whether a table or view exists.
    pub async fn exists(&self, name: &str) -> anyhow::Result<bool> {
        let url = format!(
            "{}/projects/{}/datasets/{}/tables/{name}",
            self.v2, self.project, self.dataset
        );
        let status = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .status();
        match status.as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => bail!("GET {url}: HTTP {status}"),
        }
    }

    /// Creates a table with `fields` (BigQuery schema JSON).
    pub async fn create_table(&self, name: &str, fields: Value) -> anyhow::Result<()> {
        let url = format!(
            "{}/projects/{}/datasets/{}/tables",
            self.v2, self.project, self.dataset
        );
        let body = json!({
            "tableReference": {"projectId": self.project, "datasetId": self.dataset, "tableId": name},
            "schema": {"fields": fields},
        });
        let response = self.http.post(&url).json(&body).send().await?;
        if !response.status().is_success() {
            bail!(
                "creating table {name}: HTTP {}: {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// The table's resource, as BigQuery's JSON.
    pub async fn table(&self, name: &str) -> anyhow::Result<Value> {
        let url = format!(
            "{}/projects/{}/datasets/{}/tables/{name}",
            self.v2, self.project, self.dataset
        );
        Ok(self
            .http
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// The table's schema fields, as BigQuery's JSON.
    pub async fn schema_fields(&self, name: &str) -> anyhow::Result<Value> {
        Ok(self.table(name).await?["schema"]["fields"].clone())
    }

    /// Replaces the table's schema with `fields` (the rows stay), as an
    /// operator's `ALTER TABLE` would change it.
    pub async fn set_schema(&self, name: &str, fields: Value) -> anyhow::Result<()> {
        let url = format!(
            "{}/projects/{}/datasets/{}/tables/{name}",
            self.v2, self.project, self.dataset
        );
        self.http
            .patch(&url)
            .json(&json!({"schema": {"fields": fields}}))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// The table's schema as (name, type, mode).
    pub async fn schema(&self, name: &str) -> anyhow::Result<Vec<(String, String, String)>> {
        Ok(self
            .schema_fields(name)
            .await?
            .as_array()
            .map(|fields| {
                fields
                    .iter()
                    .map(|f| {
                        let text = |k: &str| f[k].as_str().unwrap_or_default().to_owned();
                        (text("name"), text("type"), text("mode"))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// bigquery-sink's `--write-api`: every bigquery-sink test runs with each
/// (see [`each_write_api!`](crate::each_write_api)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteApi {
    /// `tabledata.insertAll`.
    InsertAll,
    /// The Storage Write API's `_default` stream.
    Storage,
    /// A Storage Write API PENDING stream per batch.
    StorageExactlyOnce,
}

impl WriteApi {
    /// The flag's value.
    pub fn flag(self) -> &'static str {
        match self {
            Self::InsertAll => "insert-all",
            Self::Storage => "storage",
            Self::StorageExactlyOnce => "storage-exactly-once",
        }
    }

    /// Whether rows go through the Storage Write API (gRPC).
    pub fn is_storage(self) -> bool {
        self != Self::InsertAll
    }
}

/// Declares a module `$name` holding one test per write API, each calling
/// `$name(WriteApi)`.
#[macro_export]
macro_rules! each_write_api {
    ($name:ident) => {
        $crate::tests_per_write_api!(
            $name: insert_all = InsertAll, storage = Storage, storage_exactly_once = StorageExactlyOnce
        );
    };
}

/// Declares a module `$name` holding one test per Storage Write API mode,
/// each calling `$name(WriteApi)`: for tests of the Storage Write API's own
/// faults.
#[macro_export]
macro_rules! each_storage_api {
    ($name:ident) => {
        $crate::tests_per_write_api!(
            $name: storage = Storage, storage_exactly_once = StorageExactlyOnce
        );
    };
}

/// What [`each_write_api!`](crate::each_write_api) and
/// [`each_storage_api!`](crate::each_storage_api) expand to: module `$name`,
/// a test `$test` per listed [`WriteApi`] variant.
#[doc(hidden)]
#[macro_export]
macro_rules! tests_per_write_api {
    ($name:ident: $($test:ident = $api:ident),+) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() -> anyhow::Result<()> {
                    super::$name($crate::bigquery::WriteApi::$api).await
                }
            )+
        }
    };
}

/// bigquery-sink's side of a [`Pipeline`](crate::pipeline::Pipeline): a
/// fresh table in the emulator's dataset, written with `write_api` through
/// `endpoint` / `grpc_endpoint` (the emulator, or a proxy in front of it).
/// Cheap to clone: a test keeps a clone to query the table itself.
#[derive(Debug, Clone)]
pub struct BigQuerySide {
    /// The emulator.
    pub emulator: Emulator,
    /// `--write-api`.
    pub write_api: WriteApi,
    /// `--bigquery-endpoint`.
    pub endpoint: String,
    /// `--bigquery-grpc-endpoint`.
    pub grpc_endpoint: String,
    /// `--table`.
    pub table: String,
}

impl BigQuerySide {
    /// A fresh table of the stack's emulator, written to directly with
    /// insertAll.
    pub fn on_stack(stack: &Stack) -> anyhow::Result<Self> {
        Ok(Self {
            emulator: Emulator::new(stack)?,
            write_api: WriteApi::InsertAll,
            endpoint: stack.bigquery_endpoint.clone(),
            grpc_endpoint: stack.bigquery_grpc_endpoint.clone(),
            table: crate::unique("user_logs").replace('-', "_"),
        })
    }

    /// The same table, written with `write_api`.
    pub fn with(self, write_api: WriteApi) -> Self {
        Self { write_api, ..self }
    }

    /// The same table, its Storage Write API reached through `endpoint`.
    pub fn via_grpc(self, grpc_endpoint: String) -> Self {
        Self {
            grpc_endpoint,
            ..self
        }
    }

    /// The same table, written through `endpoint` (a proxy).
    pub fn via(self, endpoint: String) -> Self {
        Self { endpoint, ..self }
    }

    /// Creates the de-duplicated view exactly as docs/bigquery.md gives it;
    /// returns its name.
    pub async fn create_dedup_view(&self) -> anyhow::Result<String> {
        self.emulator
            .create_documented_dedup_view(&self.table)
            .await
    }

    /// Every (partition, offset) in `relation` (the table or a view), with
    /// repeats, sorted.
    pub async fn coordinates(
        &self,
        relation: &str,
        topic: &str,
    ) -> anyhow::Result<Vec<Coordinates>> {
        self.emulator.coordinates(relation, topic).await
    }

    /// Rows in `relation`.
    pub async fn count(&self, relation: &str) -> anyhow::Result<i64> {
        self.emulator.count(relation).await
    }

    /// Waits until `relation` holds at least `rows` rows, for up to
    /// [`ROWS_TIMEOUT`]; an error shows `instance`'s log.
    pub async fn wait_rows(
        &self,
        relation: &str,
        rows: usize,
        instance: &crate::pipeline::Instance,
    ) -> anyhow::Result<()> {
        let want = i64::try_from(rows)?;
        let stored = crate::poll_until(
            ROWS_TIMEOUT,
            Duration::from_millis(200),
            &format!("{rows} rows in {relation}"),
            || async {
                let count = self.count(relation).await?;
                Ok(crate::Check::done_if(count >= want, || {
                    format!("{count} rows")
                }))
            },
        )
        .await;
        instance.service.with_log(stored)
    }

    /// Fails unless `relation` holds exactly one row of `topic` per
    /// coordinates in `expected` and no other, saying which are repeated,
    /// missing or unexpected.
    pub async fn assert_exactly(
        &self,
        relation: &str,
        topic: &str,
        expected: &BTreeSet<Coordinates>,
    ) -> anyhow::Result<()> {
        let got = self.coordinates(relation, topic).await?;
        if got.iter().eq(expected.iter()) {
            return Ok(());
        }
        let mut counts: BTreeMap<Coordinates, usize> = BTreeMap::new();
        for c in &got {
            *counts.entry(*c).or_default() += 1;
        }
        let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(10).collect();
        let missing: Vec<_> = expected
            .iter()
            .filter(|c| !counts.contains_key(c))
            .take(10)
            .collect();
        let unexpected: Vec<_> = counts
            .keys()
            .filter(|c| !expected.contains(c))
            .take(10)
            .collect();
        bail!(
            "{relation}: {} rows for {} records; repeated {repeated:?}, missing {missing:?}, \
             unexpected {unexpected:?}",
            got.len(),
            expected.len()
        )
    }
}

/// `--stream-interval-ms` of the services tests start.
pub const STREAM_INTERVAL_MS: &str = "10";

/// How long [`BigQuerySide::wait_rows`] waits.
pub const ROWS_TIMEOUT: Duration = Duration::from_secs(300);

impl SinkSide for BigQuerySide {
    fn binary(&self) -> &'static str {
        "bigquery-sink"
    }

    fn mix(&self) -> Mix {
        Mix::All
    }

    fn flags(&self, bootstrap: &str, topic: &str, group: &str) -> ServiceFlags {
        ServiceFlags::bigquery_sink(
            bootstrap,
            topic,
            group,
            &self.endpoint,
            &self.emulator.project,
            &self.emulator.dataset,
            &self.table,
        )
        .set("--write-api", self.write_api.flag())
        .set("--bigquery-grpc-endpoint", &self.grpc_endpoint)
        // Google's stream quota is not the emulator's: tests write small
        // batches fast (the pacing itself is unit-tested in pending.rs).
        .set("--stream-interval-ms", STREAM_INTERVAL_MS)
    }

    fn keeps(&self, event: &Generated) -> bool {
        expected_row(&event.payload).is_some()
    }

    fn stored_offsets<'a>(
        &'a self,
        _topic: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Option<Vec<i64>>>> {
        Box::pin(async { Ok(None) })
    }

    /// In the sink: the distinct (partition, offset) of the de-duplicated
    /// view exactly as docs/bigquery.md defines it; raw repeats in the table
    /// (the documented at-least-once window) are counted apart.
    fn tally<'a>(
        &'a self,
        topic: &'a str,
        produced: &'a BTreeMap<Coordinates, Item>,
        tally: &'a mut Tally,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let view = self.create_dedup_view().await?;
            let raw = self.coordinates(&self.table, topic).await?;
            let deduplicated = self.coordinates(&view, topic).await?;
            let distinct: BTreeSet<Coordinates> = deduplicated.iter().copied().collect();
            tally.double_counted = deduplicated.len() - distinct.len();
            tally.raw_duplicates = raw.len() - raw.iter().collect::<BTreeSet<_>>().len();
            for (coordinates, item) in produced {
                match (item.kept, distinct.contains(coordinates)) {
                    (true, true) => tally.in_sink += 1,
                    (true, false) => tally.lost += 1,
                    (false, true) => tally.problems.push(format!(
                        "{coordinates:?} must be dead-lettered but is a row"
                    )),
                    (false, false) => {}
                }
            }
            let unknown = distinct
                .iter()
                .filter(|c| !produced.contains_key(c))
                .count();
            if unknown > 0 {
                tally
                    .problems
                    .push(format!("{unknown} rows of records never produced"));
            }
            Ok(())
        })
    }
}

/// A write API's fault proxy in front of the emulator: what a test that
/// runs with either API faults through.
pub enum WriteProxy {
    /// insertAll's HTTP proxy.
    InsertAll(FaultProxy),
    /// The Storage Write API's gRPC proxy, and which of its APIs.
    Storage(crate::grpc_proxy::GrpcFaultProxy, WriteApi),
}

impl WriteProxy {
    /// A proxy for `api` in front of the stack's emulator, forwarding until
    /// told otherwise.
    pub async fn start(stack: &Stack, api: WriteApi) -> anyhow::Result<Self> {
        Ok(match api {
            WriteApi::InsertAll => Self::InsertAll(FaultProxy::start(&stack.bigquery_endpoint)?),
            api => Self::Storage(
                crate::grpc_proxy::GrpcFaultProxy::start(Some(&stack.bigquery_grpc_endpoint))
                    .await?,
                api,
            ),
        })
    }

    /// `side` written with this proxy's API, through it.
    pub fn route(&self, side: BigQuerySide) -> BigQuerySide {
        match self {
            Self::InsertAll(proxy) => side.with(WriteApi::InsertAll).via(proxy.endpoint()),
            Self::Storage(proxy, api) => side.with(*api).via_grpc(proxy.endpoint()),
        }
    }

    /// Faults served so far, by kind.
    pub fn served(&self) -> BTreeMap<String, usize> {
        match self {
            Self::InsertAll(proxy) => proxy.served(),
            Self::Storage(proxy, _) => proxy.served(),
        }
    }

    /// Faults served so far.
    pub fn faults_served(&self) -> usize {
        self.served().values().sum()
    }

    /// Forwards everything from now on.
    pub fn clear_faults(&self) {
        match self {
            Self::InsertAll(proxy) => proxy.clear_faults(),
            Self::Storage(proxy, _) => proxy.clear_faults(),
        }
    }

    /// The `authorization` of every write (insertAll request, or append
    /// stream of each append) so far.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        match self {
            Self::InsertAll(proxy) => proxy
                .inserts()
                .into_iter()
                .map(|i| i.authorization)
                .collect(),
            Self::Storage(proxy, _) => proxy
                .appends()
                .into_iter()
                .map(|a| a.authorization)
                .collect(),
        }
    }

    /// Refuses every write as BigQuery does when the sink's account lacks
    /// the right to write the table.
    pub fn deny_access(&self) {
        use crate::grpc_proxy::GrpcFault;
        match self {
            Self::InsertAll(proxy) => proxy.set_faults(vec![Fault::Status(403)]),
            Self::Storage(proxy, _) => proxy.set_faults(vec![GrpcFault::EndStream(
                tonic::Code::PermissionDenied,
                "Permission 'TABLES_UPDATE_DATA' denied on resource",
            )]),
        }
    }

    /// Refuses every write as BigQuery does when its schema lacks the
    /// `host` column the rows carry (the emulator ignores unknown fields).
    pub fn refuse_unknown_host_column(&self) {
        use crate::grpc_proxy::GrpcFault;
        match self {
            Self::InsertAll(proxy) => {
                proxy.set_faults(vec![Fault::RefuseRowsAs("no such field: host.")]);
            }
            Self::Storage(proxy, _) => proxy.set_faults(vec![GrpcFault::EndStream(
                tonic::Code::InvalidArgument,
                "Input schema has more fields than BigQuery schema, extra fields: 'host'",
            )]),
        }
    }
}

/// The row bigquery-sink must make of a message, worked out from its JSON with
/// serde_json and chrono alone: `None` if the sink must refuse it (not a
/// JSON object, or a present `@timestamp` that is not RFC 3339), else the
/// typed columns (`event_time` in microseconds when `@timestamp` is given).
pub fn expected_row(payload: &[u8]) -> Option<(Option<i64>, [Option<String>; 5])> {
    let value: Value = serde_json::from_slice(payload).ok()?;
    let object = value.as_object()?;
    let time = match object.get("@timestamp") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            chrono::DateTime::parse_from_rfc3339(s)
                .ok()?
                .timestamp_micros(),
        ),
        Some(_) => return None,
    };
    let text = |k: &str| object.get(k).and_then(Value::as_str).map(str::to_owned);
    let id = |k: &str| match object.get(k) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    };
    Some((
        time,
        [
            text("info"),
            id("user_id"),
            text("keyword"),
            id("movie_id"),
            text("host"),
        ],
    ))
}

/// A query cell as an integer (the REST API sends INT64 as strings).
pub fn int(cell: &Value) -> Option<i64> {
    match cell {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// What the proxy does with one insertAll request. Other requests (table
/// reads at start, readiness checks) are always forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward it.
    Forward,
    /// Answer this status with a BigQuery-style JSON error, forward nothing.
    Status(u16),
    /// Answer this status with a plain-text body (as a load balancer would).
    PlainStatus(u16),
    /// Read the request, then close the connection without an answer.
    Drop,
    /// Forward it (the rows are stored), then close the connection without
    /// passing the answer on: the sink cannot know, and sends them again.
    DropAfterForward,
    /// Answer 413 when the request holds more than this many rows (nothing
    /// stored); forward smaller ones.
    TooLargeAbove(usize),
    /// Forward only the rows at even positions; answer 200 with a
    /// `backendError` for each row at an odd position.
    FailOddRows,
    /// Answer 200 refusing every row as `invalid` with this message, storing
    /// nothing: what BigQuery answers once the table's schema no longer
    /// fits the rows (the emulator ignores unknown fields instead).
    RefuseRowsAs(&'static str),
    /// Answer 200 at once and store nothing: an endpoint that costs the sink
    /// nothing (the benchmark measures the sink's own ceiling with it).
    Accept,
}

/// One insertAll request the proxy received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertSeen {
    /// Body bytes, as JSON (decompressed): what the request limits govern.
    pub bytes: usize,
    /// Rows in the body.
    pub rows: usize,
    /// When the proxy had read the whole request.
    pub at: Instant,
    /// The body itself, once [`FaultProxy::keep_bodies`] asked for it.
    pub body: Option<Arc<[u8]>>,
    /// Its Authorization header.
    pub authorization: Option<String>,
}

#[derive(Debug, Default)]
struct ProxyState {
    /// Applied in turn to successive insertAll requests; empty: forward.
    pattern: Vec<Fault>,
    next: usize,
    /// Faults served, by kind (`Forward` not counted).
    served: BTreeMap<String, usize>,
    inserts: Vec<InsertSeen>,
    keep_bodies: bool,
}

/// An HTTP/1.1 proxy with fault injection, on `127.0.0.1:<free port>`.
/// One request per connection (answers carry `connection: close`).
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Starts a proxy in front of `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> anyhow::Result<Self> {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .with_context(|| format!("upstream {upstream} is not http://ip:port"))?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_state, thread_stop) = (Arc::clone(&state), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if thread_stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = Arc::clone(&thread_state);
                    std::thread::spawn(move || {
                        if let Err(err) = serve(stream, upstream, &state) {
                            eprintln!("fault proxy: {err:#}");
                        }
                    });
                }
            })?;
        Ok(Self { addr, state, stop })
    }

    /// The base URL to give the sink as `--bigquery-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ProxyState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `pattern` in turn to the next insertAll requests, cycling.
    pub fn set_faults(&self, pattern: Vec<Fault>) {
        let mut state = self.state();
        state.pattern = pattern;
        state.next = 0;
    }

    /// Forwards everything from now on.
    pub fn clear_faults(&self) {
        self.set_faults(Vec::new());
    }

    /// Faults served so far, by kind.
    pub fn served(&self) -> BTreeMap<String, usize> {
        self.state().served.clone()
    }

    /// Faults served so far.
    pub fn faults_served(&self) -> usize {
        self.state().served.values().sum()
    }

    /// Every insertAll request received so far.
    pub fn inserts(&self) -> Vec<InsertSeen> {
        self.state().inserts.clone()
    }

    /// The insertAll requests received after the first `seen`.
    pub fn inserts_after(&self, seen: usize) -> Vec<InsertSeen> {
        self.state()
            .inserts
            .get(seen..)
            .unwrap_or_default()
            .to_vec()
    }

    /// Keeps the body of every insertAll request from now on, in
    /// [`InsertSeen::body`] (to find what a request carried, and when).
    pub fn keep_bodies(&self) {
        self.state().keep_bodies = true;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// A request as read from the client.
pub(crate) struct HttpRequest {
    /// Request line and headers, without the final blank line.
    pub(crate) head: Vec<String>,
    pub(crate) body: Vec<u8>,
}

impl HttpRequest {
    /// The value of header `name` (any case), if present.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.head.iter().skip(1).find_map(|line| {
            line.split_once(':')
                .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim())
        })
    }

    pub(crate) fn path(&self) -> &str {
        self.head
            .first()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or_default()
    }

    /// The request as bytes for the upstream, with `connection: close` so
    /// that the answer ends at EOF, and `body` as its body.
    fn to_upstream(&self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + 512);
        for line in &self.head {
            let name = line
                .split(':')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
            if matches!(
                name.as_str(),
                "connection" | "keep-alive" | "content-length"
            ) {
                continue;
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(
            format!(
                "content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(body);
        out
    }
}

pub(crate) fn read_request(stream: &mut TcpStream) -> anyhow::Result<Option<HttpRequest>> {
    let mut buffer = Vec::new();
    let mut chunk = [0_u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head: Vec<String> = String::from_utf8_lossy(&buffer[..head_end])
        .split("\r\n")
        .map(str::to_owned)
        .collect();
    let length: usize = head
        .iter()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.trim().to_owned())
        })
        .map(|v| v.parse())
        .transpose()
        .context("content-length")?
        .unwrap_or(0);
    if head
        .iter()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:"))
    {
        bail!("chunked requests are not supported by the test proxy");
    }
    let mut body = buffer.split_off(head_end + 4);
    while body.len() < length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("client closed the connection mid-body");
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    // The sink gzips its insertAll bodies: hold (and forward) them as JSON,
    // which is what the faults and the size checks are about.
    let gzipped = |l: &String| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("content-encoding")
                && v.trim().eq_ignore_ascii_case("gzip")
        })
    };
    let (head, body) = if head.iter().any(gzipped) {
        let mut json = Vec::with_capacity(body.len());
        flate2::read::GzDecoder::new(body.as_slice())
            .read_to_end(&mut json)
            .context("a gzip body that does not decompress")?;
        let is_content_type = |l: &String| l.to_ascii_lowercase().starts_with("content-type:");
        let mut head: Vec<String> = head
            .into_iter()
            .filter(|l| !gzipped(l) && !is_content_type(l))
            .collect();
        head.push("content-type: application/json".into());
        (head, json)
    } else {
        (head, body)
    };
    Ok(Some(HttpRequest { head, body }))
}

fn forward(upstream: SocketAddr, request: &HttpRequest, body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&upstream, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    stream.write_all(&request.to_upstream(body))?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(response)
}

/// Occurrences of `needle` in `haystack`.
fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> anyhow::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} Injected\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    Ok(())
}

fn google_error(status: u16) -> Vec<u8> {
    let (reason, name) = match status {
        429 => ("rateLimitExceeded", "RESOURCE_EXHAUSTED"),
        413 => ("badRequest", "INVALID_ARGUMENT"),
        401 => ("authError", "UNAUTHENTICATED"),
        403 => ("accessDenied", "PERMISSION_DENIED"),
        s if s >= 500 => ("backendError", "INTERNAL"),
        _ => ("invalid", "INVALID_ARGUMENT"),
    };
    let message = format!("injected by the test proxy (HTTP {status})");
    json!({"error": {"code": status, "message": message, "errors": [{"domain": "global", "reason": reason, "message": message}], "status": name}})
        .to_string()
        .into_bytes()
}

fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    state: &Mutex<ProxyState>,
) -> anyhow::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(120)))?;
    // As HTTP servers do: an answer goes out at once, not after the
    // client's ACK of the previous segment (Nagle's algorithm).
    client.set_nodelay(true)?;
    let Some(request) = read_request(&mut client)? else {
        return Ok(());
    };
    let lock = || state.lock().unwrap_or_else(PoisonError::into_inner);
    let is_insert = request.path().contains("/insertAll");
    let mut rows: Vec<Value> = Vec::new();
    let accept_all = lock().pattern == [Fault::Accept];
    let fault = if is_insert && accept_all {
        // The benchmark's instant endpoint: count rows without parsing, so
        // the proxy takes as little of the machine as it can.
        let rows = count(&request.body, br#""insertId""#);
        let at = Instant::now();
        let mut s = lock();
        let body = s.keep_bodies.then(|| Arc::from(request.body.as_slice()));
        s.inserts.push(InsertSeen {
            bytes: request.body.len(),
            rows,
            at,
            body,
            authorization: request.header("authorization").map(str::to_owned),
        });
        Fault::Accept
    } else if is_insert {
        let body: Value =
            serde_json::from_slice(&request.body).context("insertAll body is not JSON")?;
        rows = body["rows"].as_array().cloned().unwrap_or_default();
        let mut s = lock();
        let body = s.keep_bodies.then(|| Arc::from(request.body.as_slice()));
        s.inserts.push(InsertSeen {
            bytes: request.body.len(),
            rows: rows.len(),
            at: Instant::now(),
            body,
            authorization: request.header("authorization").map(str::to_owned),
        });
        let fault = match s.pattern.len() {
            0 => Fault::Forward,
            n => {
                let fault = s.pattern[s.next % n];
                s.next += 1;
                fault
            }
        };
        let fault = match fault {
            Fault::TooLargeAbove(max) if rows.len() <= max => Fault::Forward,
            other => other,
        };
        if fault != Fault::Forward {
            *s.served.entry(format!("{fault:?}")).or_default() += 1;
        }
        fault
    } else {
        Fault::Forward
    };
    match fault {
        Fault::Forward => client.write_all(&forward(upstream, &request, &request.body)?)?,
        Fault::Status(status) => respond(
            &mut client,
            status,
            "application/json; charset=UTF-8",
            &google_error(status),
        )?,
        Fault::TooLargeAbove(_) => respond(
            &mut client,
            413,
            "application/json; charset=UTF-8",
            &google_error(413),
        )?,
        Fault::PlainStatus(status) => respond(
            &mut client,
            status,
            "text/html",
            b"<html><body>Service Unavailable</body></html>",
        )?,
        Fault::Accept => respond(
            &mut client,
            200,
            "application/json; charset=UTF-8",
            br#"{"kind":"bigquery#tableDataInsertAllResponse"}"#,
        )?,
        Fault::RefuseRowsAs(message) => {
            let errors = (0..rows.len()).map(|i| (i, "invalid", "host", message));
            respond_row_errors(&mut client, errors)?;
        }
        Fault::Drop => {}
        Fault::DropAfterForward => {
            forward(upstream, &request, &request.body)?;
        }
        Fault::FailOddRows => {
            let mut body: Value = serde_json::from_slice(&request.body)?;
            let even: Vec<Value> = rows.iter().step_by(2).cloned().collect();
            body["rows"] = Value::Array(even);
            let upstream_body = serde_json::to_vec(&body)?;
            let answer = forward(upstream, &request, &upstream_body)?;
            let text = String::from_utf8_lossy(&answer);
            if !text.starts_with("HTTP/1.1 200") || !text.contains(r#""insertErrors":[]"#) {
                bail!("upstream did not take the even rows: {text}");
            }
            let errors = (1..rows.len())
                .step_by(2)
                .map(|i| (i, "backendError", "", "injected by the test proxy"));
            respond_row_errors(&mut client, errors)?;
        }
    }
    Ok(())
}

/// Answers 200 with `insertErrors`: (row index, reason, location, message).
fn respond_row_errors<'a>(
    client: &mut TcpStream,
    errors: impl Iterator<Item = (usize, &'a str, &'a str, &'a str)>,
) -> anyhow::Result<()> {
    let errors: Vec<Value> = errors
        .map(|(index, reason, location, message)| {
            json!({"index": index, "errors": [{"reason": reason, "location": location, "message": message}]})
        })
        .collect();
    let reply = json!({"kind": "bigquery#tableDataInsertAllResponse", "insertErrors": errors});
    respond(
        client,
        200,
        "application/json; charset=UTF-8",
        reply.to_string().as_bytes(),
    )
}

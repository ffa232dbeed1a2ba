//! The [`Sink`] over BigQuery: a batch of the consume loop becomes one or
//! more insertAll requests, sent one after the other, or appends to the
//! Storage Write API's `_default` stream ([`crate::append`]), or to a
//! PENDING stream of its own, committed once the loop recorded it
//! ([`crate::pending`]).
//!
//! A write succeeds only when every row of the batch is inserted or refused
//! for good (those go to the dead-letter topic with BigQuery's reason). When
//! it fails part way (a 5xx, a reset, rows BigQuery asks to send again), the
//! rows already inserted are remembered, so the loop's retry of the same
//! batch sends only the others: nothing is lost, and nothing is sent twice
//! without need. (A row is sent twice when a reply is lost after BigQuery
//! stored it; the de-duplicated view in docs/bigquery.md absorbs that.)

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::anyhow;
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::model::table::Table;
use gcp_bigquery_client::model::table_data_insert_all_request::TableDataInsertAllRequestGzipped;
use gcp_bigquery_client::model::table_data_insert_all_response::TableDataInsertAllResponse;
use gcp_bigquery_client::Client;
use sink_core::{Batch, Record, Rejection, Sink, SinkError, StagedAtAssign, WriteOutcome};

use crate::config::Target;
use crate::decode::{self, Columns};
use crate::error::{classify, Failure};
use crate::pending::PendingStreams;
use crate::plan::{self, EncodedRows, RequestLimits};
use crate::table;
use crate::write_api::AppendStream;

/// Dead-letter code of a row BigQuery refused as invalid.
pub const REFUSED: &str = "bigquery_invalid";

/// Dead-letter code of a row too large for any insertAll request.
pub const TOO_LARGE: &str = "row_too_large";

/// How BigQuery says a row does not fit the table it knows: insertAll's
/// and the Storage Write API's words.
const SCHEMA_MISMATCH: [&str; 3] = [
    "no such field",
    "more fields than bigquery schema",
    "field mismatched",
];

/// Settings of the sink.
#[derive(Debug, Clone)]
pub struct SinkSettings {
    /// The table.
    pub target: Target,
    /// Limits of one request.
    pub limits: RequestLimits,
    /// Batches written at once.
    pub max_in_flight: usize,
    /// gzip level of request bodies (0 = stored, uncompressed).
    pub gzip_level: u32,
}

/// Identifies a batch across the loop's retries of it: its topic and, per
/// partition, the offsets it covers.
type BatchKey = (Arc<str>, Vec<(i32, i64, i64)>);

fn batch_key(batch: &Batch<Columns>) -> BatchKey {
    let ranges = batch
        .ranges
        .iter()
        .map(|r| (r.partition, r.first, r.next))
        .collect();
    (Arc::clone(&batch.topic), ranges)
}

/// What is known of a batch's entries between attempts.
#[derive(Debug)]
pub(crate) struct Progress {
    /// Per entry: inserted, or refused for good.
    settled: Vec<bool>,
    /// Entries refused for good, with the reason.
    rejected: Vec<(usize, Rejection)>,
    /// Why rows are waiting to be sent again (this attempt).
    retry_reasons: BTreeSet<String>,
    /// Partitions a staged write of an earlier owner holds, with where
    /// they resume: their entries are not written.
    skipped: Vec<(i32, i64)>,
}

impl Progress {
    fn new(entries: usize) -> Self {
        Self {
            settled: vec![false; entries],
            rejected: Vec::new(),
            retry_reasons: BTreeSet::new(),
            skipped: Vec::new(),
        }
    }

    /// Before an attempt on a new PENDING stream: what earlier attempts
    /// appended to theirs is not visible, so only refused entries stay
    /// settled (and those of skipped partitions).
    fn restart(&mut self, batch: &Batch<Columns>) {
        for (i, entry) in batch.entries.iter().enumerate() {
            self.settled[i] = self
                .skipped
                .iter()
                .any(|(p, _)| *p == entry.record.partition);
        }
        for (i, _) in &self.rejected {
            self.settled[*i] = true;
        }
    }

    pub(crate) fn pending(&self) -> Vec<usize> {
        (0..self.settled.len())
            .filter(|i| !self.settled[*i])
            .collect()
    }

    pub(crate) fn insert(&mut self, entry: usize) {
        self.settled[entry] = true;
    }

    pub(crate) fn reject(&mut self, entry: usize, rejection: Rejection) {
        if !self.settled[entry] {
            self.settled[entry] = true;
            self.rejected.push((entry, rejection));
        }
    }
}

/// One request of a pass: positions (into the pass's pending entries and
/// their encoded rows) of consecutive rows.
type Chunk = Range<usize>;

/// How rows reach the table.
pub enum Writer {
    /// `tabledata.insertAll`.
    InsertAll,
    /// The Storage Write API's `_default` stream (at least once).
    Default(AppendStream),
    /// A PENDING stream per batch (exactly once per batch).
    Pending(Box<PendingStreams>),
}

/// Writes user2 batches into one BigQuery table.
pub struct BigQuerySink {
    client: Client,
    pub(crate) settings: SinkSettings,
    writer: Writer,
    /// Batches whose last write attempt failed part way.
    progress: Mutex<HashMap<BatchKey, Progress>>,
}

impl BigQuerySink {
    /// A sink over a client (see [`crate::client::connect`]) for a table that
    /// exists (see [`crate::table::ensure`]), writing with `writer`.
    pub fn new(client: Client, settings: SinkSettings, writer: Writer) -> Self {
        Self {
            client,
            settings,
            writer,
            progress: Mutex::new(HashMap::new()),
        }
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, HashMap<BatchKey, Progress>> {
        // Progress entries hold no invariant a panic elsewhere could break.
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn insert_all(&self, body: Vec<u8>) -> Result<TableDataInsertAllResponse, BQError> {
        let target = &self.settings.target;
        self.client
            .tabledata()
            .insert_all_gzipped(
                &target.project,
                &target.dataset,
                &target.table,
                TableDataInsertAllRequestGzipped::new(body),
            )
            .await
    }

    /// One pass over the entries not settled yet. Rows to send again stay
    /// unsettled; what the pass settled stays settled whatever it returns.
    async fn send_pending(
        &self,
        batch: &Batch<Columns>,
        progress: &mut Progress,
    ) -> Result<(), SinkError> {
        let ingested_at = decode::timestamp(chrono::Utc::now());
        let pending = progress.pending();
        let mut rows = EncodedRows::default();
        for &i in &pending {
            let entry = &batch.entries[i];
            rows.push(|out| decode::write(out, &entry.record, &entry.item, &ingested_at));
        }
        let sizes = rows.sizes();
        let split = plan::split(&sizes, self.settings.limits);
        for &j in &split.oversized {
            progress.reject(
                pending[j],
                Rejection::new(
                    TOO_LARGE,
                    format!(
                        "the row is {} bytes as JSON, more than one insertAll request may carry \
                         (--batch-max-bytes {})",
                        sizes[j], self.settings.limits.max_bytes
                    ),
                ),
            );
        }
        let mut queue: VecDeque<Chunk> = split.requests.into_iter().collect();

        // A transient failure does not stop the pass while requests still get
        // through: a batch that makes progress on every attempt finishes
        // before its backoff grows long. Once failures outnumber successes by
        // two (BigQuery is down, not flaky), or on an operator error, the
        // pass stops: the loop's backoff takes over.
        let (mut transient, mut failures, mut successes) = (None, 0_usize, 0_usize);
        while let Some(chunk) = queue.pop_front() {
            let entries = &pending[chunk.clone()];
            let count = entries.len();
            tracing::debug!(rows = count, "insertAll");
            let body = rows.gzip_body(chunk.clone(), self.settings.gzip_level);
            match self.insert_all(body).await {
                Ok(response) => {
                    successes += 1;
                    let sorted = plan::sort_errors(&response, count);
                    let unsettled: BTreeSet<usize> = sorted
                        .retry
                        .iter()
                        .copied()
                        .chain(sorted.rejected.iter().map(|(j, _)| *j))
                        .collect();
                    for (j, entry) in entries.iter().enumerate() {
                        if !unsettled.contains(&j) {
                            progress.insert(*entry);
                        }
                    }
                    progress.retry_reasons.extend(sorted.retry_reasons);
                    if !sorted.rejected.is_empty() {
                        // Refused rows stay unsettled (sent again) unless
                        // they are bad on their own.
                        self.refused_for_the_rows_own_sake(&sorted.rejected).await?;
                        for (j, reason) in sorted.rejected {
                            progress.reject(entries[j], Rejection::new(REFUSED, reason));
                        }
                    }
                }
                Err(err) => match classify(&err, &self.settings.target) {
                    Failure::TooLarge(why) if count > 1 => {
                        tracing::warn!(rows = count, error = %why, "BigQuery found the request too large; sending it in halves");
                        let middle = chunk.start + count / 2;
                        queue.push_front(middle..chunk.end);
                        queue.push_front(chunk.start..middle);
                    }
                    Failure::TooLarge(why) => progress.reject(
                        entries[0],
                        Rejection::new(
                            TOO_LARGE,
                            format!("BigQuery refused a request holding only this row: {why}"),
                        ),
                    ),
                    Failure::Sink(err @ SinkError::Transient { .. }) => {
                        failures += 1;
                        if failures > successes + 1 {
                            return Err(err);
                        }
                        transient.get_or_insert(err);
                    }
                    Failure::Sink(err) => return Err(err),
                },
            }
        }
        transient.map_or(Ok(()), Err)
    }
}

impl BigQuerySink {
    /// One attempt at a batch on a PENDING stream of its own: first settles
    /// what the commits of its partitions record (an earlier owner's write
    /// found visible: those partitions are skipped), then appends the rest
    /// to a new stream and finalizes it. Returns the stream's name for the
    /// loop to record and publish (`None` when nothing was left to write);
    /// rows still to send leave it unfinalized, and the next attempt starts
    /// over on a new stream.
    async fn stage(
        &self,
        streams: &PendingStreams,
        batch: &Batch<Columns>,
        progress: &mut Progress,
    ) -> Result<Option<String>, SinkError> {
        for range in &batch.ranges {
            let Some(recorded) = streams.recorded_at(range.partition, range.first) else {
                continue;
            };
            if streams.publish(&recorded.staged.token).await? {
                tracing::info!(
                    partition = range.partition,
                    from = range.first,
                    to = recorded.staged.next,
                    stream = %recorded.staged.token,
                    "the last owner's staged write is visible: its records are not written again"
                );
                progress
                    .skipped
                    .push((range.partition, recorded.staged.next));
            }
            streams.settled(range.partition);
        }
        progress.restart(batch);
        if progress.pending().is_empty() {
            return Ok(None);
        }
        let (name, appends) = streams.create().await?;
        self.append_pending(&appends, batch, progress).await?;
        if !progress.pending().is_empty() {
            return Ok(None);
        }
        streams.finalize(&name).await?;
        Ok(Some(name))
    }

    /// The table's metadata, only `field` of it (a probe, or the schema).
    async fn get_table(&self, field: &str) -> Result<Table, SinkError> {
        let target = &self.settings.target;
        self.client
            .table()
            .get(
                &target.project,
                &target.dataset,
                &target.table,
                Some(vec![field]),
            )
            .await
            .map_err(|err| match classify(&err, target) {
                Failure::Sink(err) => err,
                Failure::TooLarge(why) => SinkError::transient("bad_response", anyhow!(why)),
            })
    }

    /// Rows BigQuery refused as invalid go to the dead-letter topic only
    /// when the table still has the schema the sink writes: rows are built
    /// for that schema, so when it changed (a column dropped or retyped
    /// while running) every row is refused for a reason that is the
    /// table's, not theirs, and the stream must wait for an operator instead
    /// of being dead-lettered. An unknown or mismatched field is always the
    /// table's ([`SCHEMA_MISMATCH`]): the sink writes no field the schema
    /// lacks (BigQuery's streaming path may still say so for minutes after
    /// a column was added back).
    pub(crate) async fn refused_for_the_rows_own_sake(
        &self,
        rejected: &[(usize, String)],
    ) -> Result<(), SinkError> {
        let target = &self.settings.target;
        let table = self.get_table("schema").await?;
        let mut problems = table::schema_differences(&table.schema, target);
        let unknown_field = rejected.iter().find(|(_, reason)| {
            SCHEMA_MISMATCH
                .iter()
                .any(|words| reason.to_ascii_lowercase().contains(words))
        });
        if let (true, Some((_, reason))) = (problems.is_empty(), unknown_field) {
            problems.push(format!(
                "BigQuery does not know a column the table has ({reason}); after a column was \
                 added back, BigQuery's streaming path may take a few minutes to see it"
            ));
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(SinkError::unavailable(
            "table_schema_changed",
            anyhow!(
                "table {target} no longer holds the sink's rows, so BigQuery refused {} of them: \
                 {}. Nothing is dead-lettered or committed until the schema is restored \
                 (docs/bigquery.md has the schema)",
                rejected.len(),
                problems.join("; ")
            ),
        ))
    }
}

impl Sink for BigQuerySink {
    type Item = Columns;

    fn decode(&self, record: &Record) -> Result<Columns, Rejection> {
        decode::decode(record)
    }

    async fn write(&self, batch: &Batch<Columns>) -> Result<WriteOutcome, SinkError> {
        // A batch of dead letters only writes nothing, but with PENDING
        // streams it may still start where an earlier owner's recorded
        // write does, which must be settled before the partition moves on.
        if batch.entries.is_empty() && !matches!(self.writer, Writer::Pending(_)) {
            return Ok(WriteOutcome::default());
        }
        let key = batch_key(batch);
        let mut progress = self
            .progress()
            .remove(&key)
            .filter(|p| p.settled.len() == batch.entries.len())
            .unwrap_or_else(|| Progress::new(batch.entries.len()));
        progress.retry_reasons.clear();
        let mut staged = None;
        let result = match &self.writer {
            Writer::InsertAll => self.send_pending(batch, &mut progress).await,
            Writer::Default(stream) => self.append_pending(stream, batch, &mut progress).await,
            Writer::Pending(streams) => self
                .stage(streams, batch, &mut progress)
                .await
                .map(|name| staged = name),
        };
        let waiting = progress.pending().len();
        let result = match result {
            Ok(()) if waiting == 0 => {
                return Ok(WriteOutcome {
                    rejected: progress.rejected,
                    already_applied: progress.skipped,
                    staged,
                })
            }
            Ok(()) => Err(SinkError::transient(
                "rows_to_retry",
                anyhow!(
                    "BigQuery did not insert {waiting} rows of the batch ({}); sending them again",
                    progress
                        .retry_reasons
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
            Err(err) => Err(err),
        };
        tracing::debug!(
            inserted_or_refused = batch.entries.len() - waiting,
            waiting,
            "write of a batch failed part way; keeping its progress"
        );
        let mut kept = self.progress();
        // At most max_in_flight batches are being retried at once; more
        // entries are batches abandoned on a revoke. Forgetting them (or, at
        // worst, a live one) only re-sends rows, which the view absorbs.
        if kept.len() >= 2 * self.settings.max_in_flight {
            kept.clear();
        }
        kept.insert(key, progress);
        drop(kept);
        result
    }

    async fn check(&self) -> Result<(), SinkError> {
        self.get_table("event_time").await.map(drop)
    }

    async fn publish(&self, token: &str) -> Result<bool, SinkError> {
        match &self.writer {
            Writer::Pending(streams) => streams.publish(token).await,
            _ => Ok(true),
        }
    }

    fn assigned(&self, _topic: &str, partitions: &[i32], staged: &[StagedAtAssign]) {
        if let Writer::Pending(streams) = &self.writer {
            streams.assigned(partitions, staged);
            return;
        }
        for s in staged {
            tracing::warn!(
                partition = s.partition,
                offset = s.first,
                stream = %s.staged.token,
                "the last commit records a staged write of --write-api storage-exactly-once, \
                 which this --write-api does not publish: its records are written again (rows \
                 the stream made visible repeat in the raw table; the view hides them)"
            );
        }
    }

    fn max_in_flight(&self) -> usize {
        self.settings.max_in_flight
    }

    fn dispatched(&self, batch: &Batch<Columns>) {
        if let Writer::Pending(streams) = &self.writer {
            // The batch handed over is the batch being written.
            debug_assert_eq!(self.settings.max_in_flight, 1);
            streams.dispatched(&batch.ranges);
        }
    }

    /// Offsets live in Kafka's commits only: a batch's rows are inserted
    /// while its dead letters are sent.
    fn dead_letters_first(&self) -> bool {
        false
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_new_pending_stream_keeps_only_refusals_and_skipped_partitions_settled() {
        let record = |partition| Record {
            topic: "t".into(),
            partition,
            offset: 0,
            timestamp_ms: None,
            key: None,
            payload: Vec::new(),
            headers: None,
        };
        let columns = || {
            decode::decode(&Record {
                payload: br#"{"@timestamp":"2024-05-01T00:00:00Z"}"#.to_vec(),
                ..record(0)
            })
            .unwrap()
        };
        let batch = Batch {
            topic: "t".into(),
            entries: [0, 1, 1, 2]
                .into_iter()
                .map(|p| sink_core::Entry {
                    record: record(p),
                    item: columns(),
                })
                .collect(),
            ranges: Vec::new(),
        };
        let mut progress = Progress::new(4);
        progress.insert(0);
        progress.insert(3);
        progress.reject(1, Rejection::new(REFUSED, "bad"));
        progress.skipped.push((2, 10));
        progress.restart(&batch);
        // Entry 0 was appended to an abandoned stream: sent again.
        assert_eq!(progress.pending(), vec![0, 2]);
    }

    #[test]
    fn progress_settles_each_entry_once() {
        let mut progress = Progress::new(4);
        progress.insert(1);
        progress.reject(2, Rejection::new(REFUSED, "bad"));
        progress.reject(2, Rejection::new(REFUSED, "again"));
        progress.reject(1, Rejection::new(REFUSED, "already inserted"));
        assert_eq!(progress.pending(), vec![0, 3]);
        assert_eq!(progress.rejected.len(), 1);
        assert_eq!(progress.rejected[0].1.reason, "bad");
    }
}

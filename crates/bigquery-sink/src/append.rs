//! A batch through the Storage Write API's `_default` stream (at least
//! once): the pending rows are encoded once, cut into appends under the
//! request limit, and the appends are sent at once, pipelined on the
//! instance's one stream ([`crate::write_api::AppendStream`]).
//!
//! An append is all or nothing. When the API names bad rows
//! (`row_errors`), those are refused and the rest of that append is sent
//! again at once, but only once the table is checked to still have the
//! sink's schema (see [`BigQuerySink::refused_for_the_rows_own_sake`]), so
//! a schema changed under the sink stops the partition instead of
//! dead-lettering it. An append refused as `INVALID_ARGUMENT` without rows
//! named is about the request or the table, never a reason to refuse rows:
//! the same check, then an error for an operator (Google names bad rows;
//! the emulator does not, and a row it cannot convert stops the partition
//! there). Other failures are classified as insertAll's are.

use std::collections::VecDeque;
use std::ops::Range;

use chrono::Datelike as _;
use gcp_bigquery_client::google::cloud::bigquery::storage::v1::append_rows_response::Response;
use gcp_bigquery_client::google::cloud::bigquery::storage::v1::AppendRowsResponse;
use sink_core::{Batch, Rejection, SinkError};
use tonic::{Code, Status};

use crate::decode::{self, Columns};
use crate::error::{classify_status, Failure};
use crate::plan::{self, RequestLimits};
use crate::proto;
use crate::sink::{BigQuerySink, Progress, REFUSED, TOO_LARGE};
use crate::write_api::AppendStream;

/// Most bytes of rows in one append. The API refuses requests over 10 MB;
/// the rest is room for the stream name and the schema.
pub const MAX_APPEND_BYTES: usize = 9_500_000;

/// What one append's reply says about its rows (positions in the append).
#[derive(Debug)]
pub enum Reply {
    /// Every row is stored.
    Stored,
    /// Nothing is stored: these rows are bad (with the API's message), the
    /// others are to be sent again.
    BadRows(Vec<(usize, String)>),
    /// Nothing is stored, and the API said why for the whole append.
    Failed(Status),
}

/// Sorts an `AppendRows` reply for an append of `rows` rows.
pub fn sort_reply(response: AppendRowsResponse, rows: usize) -> Reply {
    let named: Vec<(usize, String)> = response
        .row_errors
        .iter()
        .filter_map(|e| {
            let index = usize::try_from(e.index).ok().filter(|i| *i < rows)?;
            Some((index, format!("BigQuery refused the row: {}", e.message)))
        })
        .collect();
    match response.response {
        Some(Response::AppendResult(_)) if response.row_errors.is_empty() => Reply::Stored,
        _ if !named.is_empty() => Reply::BadRows(named),
        Some(Response::Error(status)) => {
            Reply::Failed(Status::new(Code::from_i32(status.code), status.message))
        }
        // Row errors naming no row of the append, or no answer at all.
        _ => Reply::Failed(Status::internal(
            "an append reply with neither a result nor an error naming its rows",
        )),
    }
}

/// Why BigQuery cannot store a row, known before sending it: a TIMESTAMP
/// outside 0001-01-01..9999-12-31.
fn unstorable(columns: &Columns) -> Option<String> {
    let year = columns.event_time.year();
    (!(1..=9999).contains(&year)).then(|| {
        format!(
            "BigQuery refused the row: event_time {} is outside BigQuery's TIMESTAMP range \
             (0001-01-01 to 9999-12-31)",
            decode::timestamp(columns.event_time)
        )
    })
}

impl BigQuerySink {
    /// One pass over the entries not settled yet, through `stream`. Rows to
    /// send again stay unsettled; what the pass settled stays settled
    /// whatever it returns.
    pub(crate) async fn append_pending(
        &self,
        stream: &AppendStream,
        batch: &Batch<Columns>,
        progress: &mut Progress,
    ) -> Result<(), SinkError> {
        let ingested_at = proto::micros(chrono::Utc::now());
        let mut pending = Vec::new();
        let mut rows = Vec::new();
        for i in progress.pending() {
            let entry = &batch.entries[i];
            if let Some(reason) = unstorable(&entry.item) {
                progress.reject(i, Rejection::new(REFUSED, reason));
                continue;
            }
            let mut row = Vec::with_capacity(entry.record.payload.len() + 128);
            proto::write(&mut row, &entry.record, &entry.item, ingested_at);
            pending.push(i);
            rows.push(row);
        }
        let sizes: Vec<usize> = rows.iter().map(|r| proto::framed_len(r.len())).collect();
        // plan::split counts a JSON envelope and commas too: a few bytes
        // more than an append carries, never fewer.
        let split = plan::split(
            &sizes,
            RequestLimits {
                max_rows: usize::MAX,
                max_bytes: MAX_APPEND_BYTES,
            },
        );
        for &j in &split.oversized {
            progress.reject(
                pending[j],
                Rejection::new(
                    TOO_LARGE,
                    format!(
                        "the row is {} bytes as protobuf, more than one append may carry ({MAX_APPEND_BYTES})",
                        sizes[j]
                    ),
                ),
            );
        }

        let mut queue: VecDeque<Range<usize>> = split.requests.into_iter().collect();
        let mut schema_checked = false;
        let mut transient = None;
        while !queue.is_empty() && transient.is_none() {
            let round: Vec<Range<usize>> = queue.drain(..).collect();
            let replies = futures::future::join_all(
                round
                    .iter()
                    .map(|chunk| stream.append(rows[chunk.clone()].to_vec())),
            )
            .await;
            let mut bad = Vec::new();
            // Refusals without rows named (reply or stream): the table may
            // have changed; checked once the round is recorded.
            let mut invalid: Option<String> = None;
            // An error that needs an operator, returned once the whole
            // round is recorded (appends after it may have been stored).
            let mut operator = None;
            for (chunk, reply) in round.into_iter().zip(replies) {
                let count = chunk.len();
                // A reply's error is about this append; a stream's is not
                // (several batches share the stream), but either way no
                // row of it was stored and none is refused here.
                let status = match reply.map(|r| sort_reply(r, count)) {
                    Ok(Reply::Stored) => {
                        chunk.for_each(|j| progress.insert(pending[j]));
                        continue;
                    }
                    Ok(Reply::BadRows(named)) => {
                        let mut rest = chunk.clone().collect::<Vec<_>>();
                        for (k, reason) in named {
                            bad.push((chunk.start + k, reason));
                            rest[k] = usize::MAX;
                        }
                        // The others go again, in runs of consecutive rows.
                        queue.extend(runs(rest.into_iter().filter(|j| *j != usize::MAX)));
                        continue;
                    }
                    Ok(Reply::Failed(status)) | Err(status) => status,
                };
                match classify_status(&status, &self.settings.target) {
                    Failure::TooLarge(why) if count > 1 => {
                        tracing::warn!(rows = count, error = %why, "BigQuery found the append too large; sending it in halves");
                        let middle = chunk.start + count / 2;
                        queue.push_back(chunk.start..middle);
                        queue.push_back(middle..chunk.end);
                    }
                    // Rows are cut well under the request limit, so a lone
                    // row found too large says nothing about the row.
                    Failure::TooLarge(why) => {
                        transient.get_or_insert(SinkError::transient(
                            "append_too_large",
                            anyhow::anyhow!(
                                "BigQuery refused an append of one row as too large ({why})"
                            ),
                        ));
                    }
                    Failure::Sink(err @ SinkError::Transient { .. }) => {
                        transient.get_or_insert(err);
                    }
                    Failure::Sink(err) => {
                        if status.code() == Code::InvalidArgument {
                            invalid.get_or_insert_with(|| status.message().to_owned());
                        }
                        operator.get_or_insert(err);
                    }
                }
            }
            if !schema_checked && (!bad.is_empty() || invalid.is_some()) {
                // Refusing rows, or refused without rows named: first make
                // sure the table is still the sink's (its error then says
                // what changed).
                let reasons: Vec<(usize, String)> =
                    bad.iter().cloned().chain(invalid.map(|m| (0, m))).collect();
                self.refused_for_the_rows_own_sake(&reasons).await?;
                schema_checked = true;
            }
            if let Some(err) = operator {
                return Err(err);
            }
            for (j, reason) in bad {
                progress.reject(pending[j], Rejection::new(REFUSED, reason));
            }
        }
        transient.map_or(Ok(()), Err)
    }
}

/// Ascending positions as runs of consecutive ones.
fn runs(positions: impl IntoIterator<Item = usize>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for j in positions {
        match out.last_mut() {
            Some(run) if run.end == j => run.end += 1,
            _ => out.push(j..j + 1),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use chrono::{TimeZone, Utc};
    use gcp_bigquery_client::google::cloud::bigquery::storage::v1::append_rows_response::AppendResult;
    use gcp_bigquery_client::google::cloud::bigquery::storage::v1::RowError;
    use gcp_bigquery_client::google::rpc;

    use super::*;

    fn response(result: Option<Response>, row_errors: &[(i64, &str)]) -> AppendRowsResponse {
        AppendRowsResponse {
            response: result,
            row_errors: row_errors
                .iter()
                .map(|(index, message)| RowError {
                    index: *index,
                    code: 1,
                    message: (*message).to_owned(),
                })
                .collect(),
            ..AppendRowsResponse::default()
        }
    }

    fn error(code: Code, message: &str) -> Option<Response> {
        Some(Response::Error(rpc::Status {
            code: code as i32,
            message: message.to_owned(),
            details: Vec::new(),
        }))
    }

    #[test]
    fn a_result_without_row_errors_stores_every_row() {
        let ok = Some(Response::AppendResult(AppendResult { offset: None }));
        assert!(matches!(sort_reply(response(ok, &[]), 3), Reply::Stored));
    }

    #[test]
    fn named_rows_are_bad_and_the_rest_goes_again() {
        let reply = sort_reply(
            response(
                error(Code::InvalidArgument, "rows are bad"),
                &[
                    (2, "Field event_time: out of range"),
                    (9, "not in this append"),
                ],
            ),
            4,
        );
        let Reply::BadRows(bad) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(
            bad,
            [(
                2,
                "BigQuery refused the row: Field event_time: out of range".to_owned()
            )]
        );
    }

    #[test]
    fn an_error_naming_no_row_fails_the_whole_append() {
        let Reply::Failed(status) = sort_reply(response(error(Code::Unavailable, "later"), &[]), 4)
        else {
            panic!("not failed")
        };
        assert_eq!(
            (status.code(), status.message()),
            (Code::Unavailable, "later")
        );
        let Reply::Failed(status) = sort_reply(response(None, &[(7, "out of the append")]), 4)
        else {
            panic!("not failed")
        };
        assert_eq!(status.code(), Code::Internal);
    }

    #[test]
    fn timestamps_outside_bigquerys_range_are_refused_before_sending() {
        let at = |year, month, day| Columns {
            event_time: Utc
                .with_ymd_and_hms(year, month, day, 0, 0, 0)
                .single()
                .unwrap(),
            info: None,
            user_id: None,
            keyword: None,
            movie_id: None,
            host: None,
        };
        assert!(unstorable(&at(1, 1, 1)).is_none());
        assert!(unstorable(&at(9999, 12, 31)).is_none());
        let reason = unstorable(&at(0, 1, 1)).unwrap();
        assert!(reason.contains("0000-01-01"), "{reason}");
        assert!(unstorable(&at(10_000, 1, 1)).is_some());
    }

    #[test]
    fn runs_group_consecutive_positions() {
        assert_eq!(runs([0, 1, 2, 5, 7, 8]), vec![0..3, 5..6, 7..9]);
        assert_eq!(runs([]), Vec::<Range<usize>>::new());
    }
}

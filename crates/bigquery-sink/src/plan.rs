//! The pure parts of talking to `tabledata.insertAll`: packing rows into
//! requests under the row and byte limits, and sorting a response's per-row
//! errors into "refused for good" and "try again".
//!
//! Sizes are exact, not estimated: a row is serialized once, and a body is
//! the envelope plus its rows and the commas between them, so what is
//! measured is what is sent (a test checks it against the body). The limits
//! apply to the JSON before compression: what BigQuery parses.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::ops::Range;

use flate2::write::GzEncoder;
use flate2::Compression;
use gcp_bigquery_client::model::table_data_insert_all_response::TableDataInsertAllResponse;

use crate::stored_gzip::StoredGzip;

/// BigQuery refuses an insertAll request of 10 MB or more.
pub const MAX_REQUEST_BYTES: usize = 10_000_000;

/// BigQuery's limit on rows per insertAll request.
pub const MAX_REQUEST_ROWS: usize = 50_000;

/// Longest reason kept from BigQuery's messages for one row: it ends up in a
/// dead-letter header.
const MAX_REASON_CHARS: usize = 1_000;

/// How big one request may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Rows per request.
    pub max_rows: usize,
    /// Serialized body bytes per request; below [`MAX_REQUEST_BYTES`].
    pub max_bytes: usize,
}

/// A request body up to its first row. Invalid rows are skipped (and
/// reported per row) instead of failing the whole request.
const BODY_HEAD: &[u8] = br#"{"ignoreUnknownValues":false,"skipInvalidRows":true,"rows":["#;

/// A request body after its last row.
const BODY_TAIL: &[u8] = b"]}";

/// Bytes of a request without rows.
pub fn envelope_size() -> usize {
    BODY_HEAD.len() + BODY_TAIL.len()
}

/// Rows serialized back to back (see [`crate::decode::write`]), so each is
/// serialized once: its size is known before requests are cut, and a
/// request body is the rows' bytes copied between the envelope's.
#[derive(Debug, Default)]
pub struct EncodedRows {
    bytes: Vec<u8>,
    /// Where each row ends in `bytes`.
    ends: Vec<usize>,
}

impl EncodedRows {
    /// Appends one row written by `write`.
    pub fn push(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        write(&mut self.bytes);
        self.ends.push(self.bytes.len());
    }

    /// Bytes of each row, in order.
    pub fn sizes(&self) -> Vec<usize> {
        let mut start = 0;
        self.ends
            .iter()
            .map(|&end| {
                let size = end - start;
                start = end;
                size
            })
            .collect()
    }

    fn row(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    /// The JSON body of an insertAll request holding `rows`, gzip-compressed
    /// at `level` (0 = stored, 9 = smallest). Its uncompressed size is
    /// [`body_size`] of those rows' sizes.
    pub fn gzip_body(&self, rows: Range<usize>, level: u32) -> Vec<u8> {
        if level == 0 {
            let mut gz = StoredGzip::with_capacity(self.body_len(rows.clone()));
            self.write_body(rows, |bytes| gz.write(bytes));
            return gz.finish();
        }
        let mut gz = GzEncoder::new(Vec::new(), Compression::new(level));
        // Writing into a Vec cannot fail.
        self.write_body(rows, |bytes| {
            let _ = gz.write_all(bytes);
        });
        gz.finish().unwrap_or_default()
    }

    /// [`body_size`] of `rows`, from where they start and end.
    fn body_len(&self, rows: Range<usize>) -> usize {
        if rows.is_empty() {
            return envelope_size();
        }
        let start = if rows.start == 0 {
            0
        } else {
            self.ends[rows.start - 1]
        };
        envelope_size() + (self.ends[rows.end - 1] - start) + (rows.len() - 1)
    }

    fn write_body(&self, rows: Range<usize>, mut write: impl FnMut(&[u8])) {
        write(BODY_HEAD);
        for i in rows.clone() {
            if i > rows.start {
                write(b",");
            }
            write(self.row(i));
        }
        write(BODY_TAIL);
    }
}

/// Bytes of a request body holding rows of these sizes.
pub fn body_size(row_sizes: &[usize]) -> usize {
    let rows: usize = row_sizes.iter().fold(0, |sum, s| sum.saturating_add(*s));
    envelope_size()
        .saturating_add(rows)
        .saturating_add(row_sizes.len().saturating_sub(1))
}

/// Rows grouped into requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Consecutive rows per request, in order; each within the limits.
    pub requests: Vec<Range<usize>>,
    /// Rows that exceed the byte limit on their own: never sent.
    pub oversized: Vec<usize>,
}

/// Packs rows, in order, into as few requests as the limits allow: a
/// request is closed when it holds `max_rows` rows or when the next row
/// would take its body past `max_bytes`.
pub fn split(row_sizes: &[usize], limits: RequestLimits) -> Split {
    let max_rows = limits.max_rows.max(1);
    let mut split = Split {
        requests: Vec::new(),
        oversized: Vec::new(),
    };
    let mut start = 0;
    let mut bytes = 0;
    for (i, &size) in row_sizes.iter().enumerate() {
        let alone = body_size(&[size]);
        let grown = bytes + size + 1;
        if start < i && (i - start >= max_rows || grown > limits.max_bytes) {
            split.requests.push(start..i);
            start = i;
        }
        if alone > limits.max_bytes {
            if start < i {
                split.requests.push(start..i);
            }
            split.oversized.push(i);
            start = i + 1;
            continue;
        }
        bytes = if start == i { alone } else { grown };
    }
    if start < row_sizes.len() {
        split.requests.push(start..row_sizes.len());
    }
    split
}

/// What a response says about the rows of its request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RowErrors {
    /// Rows BigQuery refused for good (reason `invalid`), with its message.
    pub rejected: Vec<(usize, String)>,
    /// Rows to send again (any other reason), in order.
    pub retry: Vec<usize>,
    /// The reasons of the rows to send again, for the log.
    pub retry_reasons: BTreeSet<String>,
}

/// Sorts a response's `insertErrors` for a request of `rows` rows. Rows not
/// mentioned were inserted. An error that names no valid row makes every row
/// not refused a row to retry: sending a row twice is allowed, losing one
/// is not.
pub fn sort_errors(response: &TableDataInsertAllResponse, rows: usize) -> RowErrors {
    #[derive(Clone)]
    enum Verdict {
        Inserted,
        Refused(String),
        Retry,
    }
    let mut verdicts = vec![Verdict::Inserted; rows];
    let mut out = RowErrors::default();
    let mut unattributed = false;
    for insert_error in response.insert_errors.iter().flatten() {
        let index = insert_error
            .index
            .and_then(|i| usize::try_from(i).ok())
            .filter(|i| *i < rows);
        let Some(index) = index else {
            unattributed = true;
            out.retry_reasons
                .insert("an error without a row index".into());
            continue;
        };
        let errors = insert_error.errors.as_deref().unwrap_or_default();
        let invalid: Vec<String> = errors
            .iter()
            .filter(|e| e.reason.as_deref() == Some("invalid"))
            .map(|e| match (&e.message, &e.location) {
                (Some(message), Some(location)) if !location.is_empty() => {
                    format!("{message} (location: {location})")
                }
                (Some(message), _) => message.clone(),
                (None, _) => "invalid row".to_owned(),
            })
            .collect();
        if !invalid.is_empty() {
            let reason = format!("BigQuery refused the row: {}", invalid.join("; "));
            verdicts[index] = Verdict::Refused(truncate(reason));
        } else if !matches!(verdicts[index], Verdict::Refused(_)) {
            verdicts[index] = Verdict::Retry;
            let reasons = errors.iter().filter_map(|e| e.reason.clone());
            let before = out.retry_reasons.len();
            out.retry_reasons.extend(reasons);
            if out.retry_reasons.len() == before && errors.is_empty() {
                out.retry_reasons.insert("an error without a reason".into());
            }
        }
    }
    for (index, verdict) in verdicts.into_iter().enumerate() {
        match verdict {
            Verdict::Refused(reason) => out.rejected.push((index, reason)),
            Verdict::Retry => out.retry.push(index),
            Verdict::Inserted if unattributed => out.retry.push(index),
            Verdict::Inserted => {}
        }
    }
    out
}

fn truncate(mut text: String) -> String {
    if let Some((cut, _)) = text.char_indices().nth(MAX_REASON_CHARS) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use gcp_bigquery_client::model::error_proto::ErrorProto;
    use gcp_bigquery_client::model::table_data_insert_all_response_insert_errors::TableDataInsertAllResponseInsertErrors;
    use serde_json::json;

    use super::*;

    fn rows(n: usize) -> EncodedRows {
        let mut rows = EncodedRows::default();
        for i in 0..n {
            rows.push(|out| {
                serde_json::to_writer(
                    out,
                    &json!({"insertId": format!("t:0:{i}"), "json": {"payload": "\"x".repeat(i * 3), "kafka_offset": i, "info": "검색"}}),
                )
                .unwrap();
            });
        }
        rows
    }

    fn gunzip(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(body), &mut out).unwrap();
        out
    }

    #[test]
    fn measured_sizes_are_the_body() {
        for n in [0, 1, 2, 7, 100] {
            let rows = rows(n);
            for level in [0, 1, 9] {
                let body = gunzip(&rows.gzip_body(0..n, level));
                assert_eq!(body_size(&rows.sizes()), body.len(), "{n} rows");
            }
        }
        let rows = rows(3);
        for level in [0, 1] {
            let body: serde_json::Value =
                serde_json::from_slice(&gunzip(&rows.gzip_body(1..3, level))).unwrap();
            assert_eq!(body["skipInvalidRows"], true);
            assert_eq!(body["rows"][0]["insertId"], "t:0:1");
            assert_eq!(body["rows"][1]["json"]["kafka_offset"], 2);
            assert_eq!(body["rows"].as_array().unwrap().len(), 2);
        }
    }

    fn check(sizes: &[usize], limits: RequestLimits) -> Split {
        let split = split(sizes, limits);
        let mut seen: Vec<usize> = split.oversized.clone();
        let mut last_end = 0;
        for range in &split.requests {
            assert!(!range.is_empty());
            assert!(range.start >= last_end, "in order: {split:?}");
            last_end = range.end;
            assert!(
                range.len() <= limits.max_rows,
                "{range:?} has too many rows"
            );
            assert!(
                body_size(&sizes[range.clone()]) <= limits.max_bytes,
                "{range:?} is {} bytes",
                body_size(&sizes[range.clone()])
            );
            seen.extend(range.clone());
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..sizes.len()).collect::<Vec<_>>(), "every row once");
        split
    }

    #[test]
    fn requests_close_at_max_rows() {
        let limits = RequestLimits {
            max_rows: 3,
            max_bytes: 1_000_000,
        };
        let split = check(&[10; 8], limits);
        assert_eq!(split.requests, vec![0..3, 3..6, 6..8]);
    }

    #[test]
    fn requests_close_before_passing_max_bytes() {
        let max_bytes = envelope_size() + 100 + 1 + 100;
        let limits = RequestLimits {
            max_rows: 500,
            max_bytes,
        };
        // Two 100-byte rows and their comma fill a request exactly.
        let split = check(&[100, 100, 100, 1, 100], limits);
        assert_eq!(split.requests, vec![0..2, 2..4, 4..5]);
        assert_eq!(body_size(&[100, 100]), max_bytes);
    }

    #[test]
    fn a_row_too_big_alone_is_never_sent() {
        let limits = RequestLimits {
            max_rows: 500,
            max_bytes: envelope_size() + 50,
        };
        let split = check(&[10, 20, 51, 10, 1_000, 5], limits);
        assert_eq!(split.oversized, vec![2, 4]);
        assert_eq!(split.requests, vec![0..2, 3..4, 5..6]);
    }

    #[test]
    fn splits_stay_within_limits_for_many_shapes() {
        let mut seed = 7_u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) as usize
        };
        for _ in 0..200 {
            let n = next() % 300;
            let sizes: Vec<usize> = (0..n).map(|_| 1 + next() % 5_000).collect();
            let limits = RequestLimits {
                max_rows: 1 + next() % 50,
                max_bytes: envelope_size() + 1 + next() % 20_000,
            };
            check(&sizes, limits);
        }
    }

    fn insert_error(
        index: Option<i32>,
        errors: &[(&str, &str)],
    ) -> TableDataInsertAllResponseInsertErrors {
        TableDataInsertAllResponseInsertErrors {
            index,
            errors: Some(
                errors
                    .iter()
                    .map(|(reason, message)| ErrorProto {
                        reason: Some((*reason).into()),
                        message: Some((*message).into()),
                        location: Some("event_time".into()),
                        debug_info: None,
                    })
                    .collect(),
            ),
        }
    }

    fn response(errors: Vec<TableDataInsertAllResponseInsertErrors>) -> TableDataInsertAllResponse {
        TableDataInsertAllResponse {
            insert_errors: Some(errors),
            kind: None,
        }
    }

    #[test]
    fn no_errors_means_every_row_is_in() {
        let sorted = sort_errors(&TableDataInsertAllResponse::default(), 5);
        assert_eq!(sorted, RowErrors::default());
        assert_eq!(sort_errors(&response(vec![]), 5), RowErrors::default());
    }

    #[test]
    fn invalid_rows_are_refused_with_the_message_and_others_retried() {
        let sorted = sort_errors(
            &response(vec![
                insert_error(Some(1), &[("invalid", "Cannot convert value to timestamp")]),
                insert_error(Some(3), &[("backendError", "try again")]),
                insert_error(Some(4), &[("stopped", "")]),
            ]),
            5,
        );
        assert_eq!(sorted.rejected.len(), 1);
        assert_eq!(sorted.rejected[0].0, 1);
        assert_eq!(
            sorted.rejected[0].1,
            "BigQuery refused the row: Cannot convert value to timestamp (location: event_time)"
        );
        assert_eq!(sorted.retry, vec![3, 4]);
        assert_eq!(
            sorted.retry_reasons.into_iter().collect::<Vec<_>>(),
            ["backendError", "stopped"]
        );
    }

    #[test]
    fn an_error_naming_no_row_retries_every_row_not_refused() {
        let sorted = sort_errors(
            &response(vec![
                insert_error(None, &[("backendError", "")]),
                insert_error(Some(0), &[("invalid", "bad")]),
                insert_error(Some(9), &[("backendError", "")]),
            ]),
            3,
        );
        assert_eq!(sorted.rejected.len(), 1);
        assert_eq!(sorted.retry, vec![1, 2]);
    }

    #[test]
    fn long_reasons_are_truncated() {
        let long = "é".repeat(5_000);
        let sorted = sort_errors(
            &response(vec![insert_error(Some(0), &[("invalid", &long)])]),
            1,
        );
        assert!(sorted.rejected[0].1.chars().count() <= MAX_REASON_CHARS + 1);
    }
}

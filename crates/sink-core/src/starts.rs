//! Where an assigned partition starts, and when it must not start at all.
//!
//! A partition starts where the sink says it stands, else at Kafka's
//! committed offset. A start beyond the log's end means the log is not the
//! one those offsets were read from (a recreated topic, an unclean leader
//! election, a failover to a mirror), and reading on would skip records
//! without a word: such a partition is refused (paused, nothing read or
//! committed) until `--reset-offsets-beyond-log-end` says where to start.
//! A log that goes back while it is read is found by the loop instead (see
//! [`crate::offsets::Skip::WentBack`]).

use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

use crate::sink::{Staged, StagedAtAssign};

/// How long a look-up of committed offsets or of a log's bounds may take
/// during an assignment.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How many times the committed offsets are asked for.
const LOOKUP_ATTEMPTS: u32 = 3;

/// A partition whose start lies beyond its log's end.
#[derive(Debug)]
pub struct BeyondLogEnd {
    /// The partition.
    pub partition: i32,
    /// Where it stands: the sink's stored offset, else Kafka's committed one.
    pub start: i64,
    /// The log's first offset.
    pub log_start: i64,
    /// The log's end (high watermark).
    pub log_end: i64,
}

/// What [`check`] found besides the starts it filled in.
#[derive(Debug, Default)]
pub struct Checked {
    /// Partitions whose start lies beyond their log's end.
    pub beyond: Vec<BeyondLogEnd>,
    /// Partitions with no start the sink knows of (none stored, or its
    /// look-up failed) for which Kafka answered that the group never
    /// committed one (a new group, a new partition). They start where
    /// `auto.offset.reset` says.
    pub never_committed: Vec<i32>,
}

/// Checks where each partition starts against its log. Unknown `starts`
/// are filled with Kafka's committed offsets, so the loop knows where each
/// partition starts and sees a fetcher that goes back; the staged writes
/// those commits record go to `staged`. A look-up that fails is logged and
/// skips the check: the fetch then starts as librdkafka decides, and a
/// start beyond the end shows as the fetcher going back.
pub fn check<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    topic: &str,
    partitions: &[i32],
    starts: &mut [Option<i64>],
    staged: &mut Vec<StagedAtAssign>,
) -> Checked {
    let unknown: Vec<(i32, i64)> = partitions
        .iter()
        .zip(starts.iter())
        .filter(|(_, start)| start.is_none())
        .map(|(p, _)| (*p, 0))
        .collect();
    let mut committed = None;
    // Tried a few times: besides the check, the commits may record staged
    // writes, which a sink must know of before it writes those partitions.
    for attempt in 1..=LOOKUP_ATTEMPTS {
        if unknown.is_empty() {
            break;
        }
        match consumer.committed_offsets(offsets_list(topic, &unknown), LOOKUP_TIMEOUT) {
            Ok(found) => {
                committed = Some(found);
                break;
            }
            Err(err) if attempt < LOOKUP_ATTEMPTS => {
                tracing::warn!(%err, attempt, "cannot read committed offsets; trying again");
            }
            Err(err) => tracing::error!(
                %err,
                "cannot read committed offsets: not checked against the log, and a staged \
                 write they record (storage-exactly-once) is not known: its records may be \
                 written again"
            ),
        }
    }
    let mut checked = Checked::default();
    for (partition, start) in partitions.iter().zip(starts.iter_mut()) {
        if start.is_none() {
            let Some(committed) = &committed else {
                continue;
            };
            let entry = committed.find_partition(topic, *partition);
            *start = match entry.as_ref().map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            };
            if entry
                .as_ref()
                .is_some_and(|e| never_committed(e.offset(), &e.error()))
            {
                checked.never_committed.push(*partition);
            }
            let recorded = entry.and_then(|e| Staged::from_metadata(e.metadata()));
            if let (Some(first), Some(recorded)) = (*start, recorded) {
                staged.push(StagedAtAssign {
                    partition: *partition,
                    first,
                    staged: recorded,
                });
            }
        }
        let Some(start) = *start else { continue };
        match consumer.fetch_watermarks(topic, *partition, LOOKUP_TIMEOUT) {
            Ok((log_start, log_end)) if start > log_end => checked.beyond.push(BeyondLogEnd {
                partition: *partition,
                start,
                log_start,
                log_end,
            }),
            Ok((log_start, _)) if start < log_start => tracing::error!(
                topic,
                partition,
                stored_offset = start,
                log_start,
                "records below the log's start were deleted (retention) before this service \
                 read them: they are lost upstream"
            ),
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(%err, partition, "cannot read the log's bounds to check the start offset")
            }
        }
    }
    checked
}

/// Whether a committed-offset look-up's entry says the group never
/// committed the partition. An entry with an error (an unstable offset
/// under a transaction, say) is not: librdkafka asks again itself.
///
/// The answer can be older than the assignment by the look-ups after it,
/// so a commit landing in between would be missed. None can: the
/// partition's previous owner committed synchronously on revoke before it
/// rejoined, a lost assignment commits nothing (`on_revoke`), and a
/// zombie's late commit carries an older generation, which Kafka refuses.
fn never_committed(offset: Offset, error: &KafkaResult<()>) -> bool {
    offset == Offset::Invalid && error.is_ok()
}

/// Where a partition the group never committed starts, as librdkafka's
/// `auto.offset.reset` says; `None` for `error` (or a value librdkafka
/// would refuse), which only librdkafka's own look-up reports.
///
/// Given explicitly, not left to librdkafka: when it finds no committed
/// offset itself, it waits a fixed 100 ms before asking for the log's
/// bounds (`rd_kafka_offset_reset`, not configurable). A new group's first
/// write came 0.18-0.28 s after the process started, now 0.08-0.16 s
/// (docs/benchmarks.md, "The consume loop").
pub fn never_committed_start(auto_offset_reset: Option<&str>) -> Option<Offset> {
    // librdkafka's default; it reads the value case-blind.
    let value = auto_offset_reset.unwrap_or("largest").to_ascii_lowercase();
    match value.as_str() {
        "smallest" | "earliest" | "beginning" => Some(Offset::Beginning),
        "largest" | "latest" | "end" => Some(Offset::End),
        _ => None,
    }
}

/// `offsets` of `topic` as a list librdkafka takes.
pub fn offsets_list(topic: &str, offsets: &[(i32, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for (partition, offset) in offsets {
        // Only fails for Offset::Invalid, which we never build.
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    tpl
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_clean_invalid_answer_means_never_committed() {
        use rdkafka::error::KafkaError;
        use rdkafka::types::RDKafkaErrorCode;
        assert!(never_committed(Offset::Invalid, &Ok(())));
        assert!(!never_committed(Offset::Offset(0), &Ok(())));
        let unstable = Err(KafkaError::OffsetFetch(
            RDKafkaErrorCode::UnstableOffsetCommit,
        ));
        assert!(!never_committed(Offset::Invalid, &unstable));
    }

    #[test]
    fn a_never_committed_partition_starts_where_auto_offset_reset_says() {
        for (value, start) in [
            (Some("earliest"), Some(Offset::Beginning)),
            (Some("smallest"), Some(Offset::Beginning)),
            (Some("beginning"), Some(Offset::Beginning)),
            (Some("Earliest"), Some(Offset::Beginning)),
            (Some("latest"), Some(Offset::End)),
            (Some("largest"), Some(Offset::End)),
            (Some("end"), Some(Offset::End)),
            (None, Some(Offset::End)),
            (Some("error"), None),
        ] {
            assert_eq!(never_committed_start(value), start, "{value:?}");
        }
    }
}

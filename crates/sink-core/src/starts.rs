//! Where an assigned partition starts, and when it must not start at all.
//!
//! A partition starts where the sink says it stands, else at Kafka's
//! committed offset. Two situations mean the log is not the one those
//! offsets were read from (a recreated topic, an unclean leader election, a
//! failover to a mirror), and reading on would skip records without a word:
//! - the start lies beyond the log's end;
//! - the log went back under the fetcher while it was read (the loop sees
//!   it; see [`crate::offsets::Skip::WentBack`]). This is recorded in the
//!   metadata of the partition's committed offset ([`WENT_BACK`]), so every
//!   later owner refuses the partition too, until the operator resets it.
//!
//! Such a partition is refused: paused, nothing read or committed, until
//! `--reset-offsets-beyond-log-end` says where to start.

use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

/// Metadata of a committed offset whose partition's log went back while it
/// was read. Committed with every offset of that partition until a reset.
pub const WENT_BACK: &str = "sink: refused, the log went back while it was read";

/// How long a look-up of committed offsets or of a log's bounds may take
/// during an assignment.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a partition cannot start where it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Its start lies beyond the log's end.
    BeyondLogEnd,
    /// Its log went back while it was read (recorded at commit).
    LogWentBack,
}

/// A partition that cannot start where it stands.
#[derive(Debug)]
pub struct Unreadable {
    /// The partition.
    pub partition: i32,
    /// Where it stands: the sink's stored offset, else Kafka's committed one.
    pub start: i64,
    /// The log's first offset.
    pub log_start: i64,
    /// The log's end (high watermark).
    pub log_end: i64,
    /// Why it cannot start there.
    pub why: Why,
}

/// The partitions that cannot start where they stand; those in
/// `went_back` went back whatever their commit says (it may not be
/// committed yet). Unknown `starts` are filled with Kafka's committed
/// offsets, so the loop knows where each partition starts and sees a
/// fetcher that goes back. A look-up that fails is logged and skips the
/// check: the fetch then starts as librdkafka decides, and a start beyond
/// the end shows as the fetcher going back.
pub fn unreadable<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    topic: &str,
    partitions: &[i32],
    starts: &mut [Option<i64>],
    went_back: &[i32],
) -> Vec<Unreadable> {
    let all: Vec<(i32, i64)> = partitions.iter().map(|p| (*p, 0)).collect();
    let committed = match consumer.committed_offsets(offsets_list(topic, &all), LOOKUP_TIMEOUT) {
        Ok(committed) => committed,
        Err(err) => {
            tracing::warn!(%err, "cannot read committed offsets to check them against the log");
            TopicPartitionList::new()
        }
    };
    let mut found = Vec::new();
    for (partition, start) in partitions.iter().zip(starts.iter_mut()) {
        let element = committed.find_partition(topic, *partition);
        let went_back = went_back.contains(partition)
            || element.as_ref().is_some_and(|e| e.metadata() == WENT_BACK);
        if start.is_none() {
            *start = match element.map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            };
        }
        let Some(start) = *start else { continue };
        let (log_start, log_end) = match consumer.fetch_watermarks(
            topic,
            *partition,
            LOOKUP_TIMEOUT,
        ) {
            Ok(bounds) => bounds,
            Err(err) => {
                tracing::warn!(%err, partition, "cannot read the log's bounds to check the start offset");
                if went_back {
                    // Refused whatever the bounds; a reset needs them.
                    found.push(Unreadable {
                        partition: *partition,
                        start,
                        log_start: start,
                        log_end: start,
                        why: Why::LogWentBack,
                    });
                }
                continue;
            }
        };
        let why = if went_back {
            Why::LogWentBack
        } else if start > log_end {
            Why::BeyondLogEnd
        } else {
            if start < log_start {
                tracing::error!(
                    topic,
                    partition,
                    stored_offset = start,
                    log_start,
                    "records below the log's start were deleted (retention) before this service \
                     read them: they are lost upstream"
                );
            }
            continue;
        };
        found.push(Unreadable {
            partition: *partition,
            start,
            log_start,
            log_end,
            why,
        });
    }
    found
}

/// `offsets` of `topic` as a list librdkafka takes; partitions in
/// `went_back` carry [`WENT_BACK`] as metadata.
pub fn offsets_list(topic: &str, offsets: &[(i32, i64)]) -> TopicPartitionList {
    marked_offsets_list(topic, offsets, &[])
}

/// [`offsets_list`], with [`WENT_BACK`] on the partitions in `went_back`.
pub fn marked_offsets_list(
    topic: &str,
    offsets: &[(i32, i64)],
    went_back: &[i32],
) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for (partition, offset) in offsets {
        let mut element = tpl.add_partition(topic, *partition);
        // Only fails for Offset::Invalid, which we never build.
        let _ = element.set_offset(Offset::Offset(*offset));
        if went_back.contains(partition) {
            element.set_metadata(WENT_BACK);
        }
    }
    tpl
}

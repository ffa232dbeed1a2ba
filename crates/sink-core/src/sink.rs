//! The contract between the shared consume loop and a service's sink.
//!
//! The loop owns Kafka: fetching, batching, the dead-letter topic, offsets and
//! rebalances. A sink owns one thing: turning records into durable writes. It
//! tells the loop, per record, whether the record can ever be written
//! ([`Sink::decode`]), and per batch, what happened ([`Sink::write`]).
//!
//! A sink that stores its own offsets atomically with its writes (the Redis
//! sink) also answers [`Sink::stored_offsets`] when partitions are assigned and
//! reports [`WriteOutcome::already_applied`] when a batch starts below what it
//! has already applied (a stale consumer, or a replay after a crash).
//!
//! A sink that writes in two steps (BigQuery's PENDING streams: append,
//! then commit) returns its first step as [`WriteOutcome::staged`]; the
//! loop records it in Kafka's commit metadata of the batch's partitions
//! before [`Sink::publish`] makes it visible, and hands what it finds there
//! back to the sink when partitions are assigned ([`Sink::assigned`]), so a
//! staged write whose publication's outcome was lost is found, not written
//! again.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::OwnedHeaders;

/// One Kafka message, detached from the consumer so it can outlive the poll
/// that produced it (a batch may wait for retries while polling goes on).
#[derive(Debug, Clone)]
pub struct Record {
    /// The topic the message came from.
    pub topic: Arc<str>,
    /// Its partition.
    pub partition: i32,
    /// Its offset within the partition.
    pub offset: i64,
    /// The message timestamp (create or log-append time), in ms since the epoch.
    pub timestamp_ms: Option<i64>,
    /// The message key, kept so a dead letter carries it unchanged.
    pub key: Option<Vec<u8>>,
    /// The message value: the raw event bytes.
    pub payload: Vec<u8>,
    /// The message headers, copied as bytes (keys need not be UTF-8), so a
    /// dead letter carries them; `None` when there are none (Logstash sets
    /// none).
    pub headers: Option<OwnedHeaders>,
}

impl Record {
    /// Size used for the batch byte limit: what the sink will have to carry.
    pub fn size(&self) -> usize {
        self.payload.len() + self.key.as_ref().map_or(0, Vec::len)
    }

    /// Frees the payload, key and headers; where the record came from stays.
    pub fn drop_contents(&mut self) {
        self.payload = Vec::new();
        self.key = None;
        self.headers = None;
    }
}

/// A record the sink will never accept, with the reason an operator reads in
/// the dead-letter topic's `error` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Stable, low-cardinality code (a metrics label), e.g. `not_json`.
    pub code: &'static str,
    /// Human-readable reason.
    pub reason: String,
}

impl Rejection {
    /// A rejection with a code and a reason.
    pub fn new(code: &'static str, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// A record the sink accepted at decode time, with what it decoded to.
#[derive(Debug)]
pub struct Entry<T> {
    /// The original record (the dead-letter topic needs its bytes if the sink
    /// rejects it at write time); only its coordinates for a sink that never
    /// does ([`Sink::rejects_at_write`]).
    pub record: Record,
    /// What [`Sink::decode`] made of it.
    pub item: T,
}

/// The offsets of one partition covered by a batch: every record in
/// `first..next` was consumed, whether it decoded or went to the DLQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRange {
    /// The partition.
    pub partition: i32,
    /// Offset of the first record of this partition in the batch.
    pub first: i64,
    /// One past the last record's offset: where the partition resumes.
    pub next: i64,
}

/// What the loop hands to [`Sink::write`].
#[derive(Debug)]
pub struct Batch<T> {
    /// The topic all entries come from.
    pub topic: Arc<str>,
    /// Decoded entries, in the order they were consumed (so in offset order
    /// within each partition).
    pub entries: Vec<Entry<T>>,
    /// One range per partition present in the batch, including partitions
    /// whose records were all rejected at decode time (their offsets still
    /// advance, and a sink that stores offsets must store them).
    pub ranges: Vec<PartitionRange>,
}

/// What a successful [`Sink::write`] reports.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Entries (by index into [`Batch::entries`]) the sink refused for good;
    /// they go to the dead-letter topic. Every other entry is durable.
    pub rejected: Vec<(usize, Rejection)>,
    /// Partitions whose stored offset says this batch must not apply, with
    /// that offset: the sink holds exactly the records below it. Usually it
    /// is ahead of the batch (a replay, a stale consumer); behind it means
    /// the sink lost writes and needs the records in between again. Nothing
    /// of this batch was written for these partitions; the loop resumes each
    /// from the given offset.
    pub already_applied: Vec<(i32, i64)>,
    /// A write done but not visible yet, by the sink's name for it: the
    /// loop records it with the batch's partitions (see [`Staged`]), then
    /// calls [`Sink::publish`] with it. `None` for a write visible at once.
    pub staged: Option<String>,
}

/// A staged write as Kafka's commit metadata of a partition records it:
/// the partition's committed offset is where the write's records start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// Where the partition resumes once the write is visible.
    pub next: i64,
    /// The sink's name for the write ([`WriteOutcome::staged`]).
    pub token: String,
}

/// Marks our metadata among what other tools may leave in a commit.
const STAGED_PREFIX: &str = "staged-write v1 next=";

impl Staged {
    /// The commit metadata that records this write.
    pub fn to_metadata(&self) -> String {
        format!("{STAGED_PREFIX}{} token={}", self.next, self.token)
    }

    /// The staged write a commit's metadata records, if it records one.
    pub fn from_metadata(metadata: &str) -> Option<Self> {
        let rest = metadata.strip_prefix(STAGED_PREFIX)?;
        let (next, token) = rest.split_once(" token=")?;
        Some(Self {
            next: next.parse().ok()?,
            token: token.to_owned(),
        })
        .filter(|s| !s.token.is_empty())
    }
}

/// Newly assigned partition whose last commit records a staged write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedAtAssign {
    /// The partition.
    pub partition: i32,
    /// Its committed offset: where the staged write's records start.
    pub first: i64,
    /// The write.
    pub staged: Staged,
}

/// Why a write failed. Every failure is retried: nothing is dropped because a
/// sink is down; the variant only decides how loudly and how readiness reports.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Expected to pass on its own (timeouts, 5xx, 429, connection resets).
    #[error("{kind}: {source:#}")]
    Transient {
        /// Stable label for metrics and logs, e.g. `http_503`.
        kind: &'static str,
        /// What went wrong.
        source: anyhow::Error,
    },
    /// Needs an operator (permissions, a missing table): readiness turns
    /// false until a retry succeeds.
    #[error("{kind}: {source:#}")]
    Unavailable {
        /// Stable label for metrics and logs, e.g. `forbidden`.
        kind: &'static str,
        /// What went wrong, said so that the operator knows what to fix.
        source: anyhow::Error,
    },
}

impl SinkError {
    /// A transient error.
    pub fn transient(kind: &'static str, source: impl Into<anyhow::Error>) -> Self {
        Self::Transient {
            kind,
            source: source.into(),
        }
    }

    /// An error that needs an operator.
    pub fn unavailable(kind: &'static str, source: impl Into<anyhow::Error>) -> Self {
        Self::Unavailable {
            kind,
            source: source.into(),
        }
    }

    /// The stable label of this error.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Transient { kind, .. } | Self::Unavailable { kind, .. } => kind,
        }
    }

    /// Backoff ceiling for this error: an operator fix takes minutes, so
    /// there is no point in hammering the service meanwhile.
    pub fn max_backoff(&self) -> Duration {
        match self {
            Self::Transient { .. } => Duration::from_secs(60),
            Self::Unavailable { .. } => Duration::from_secs(30),
        }
    }
}

/// A destination for one topic's events. Shared by the loop's tasks (up to
/// [`Sink::max_in_flight`] writes run at once), hence `&self` everywhere.
pub trait Sink: Send + Sync + 'static {
    /// What a record decodes to: everything the sink needs to write it.
    type Item: Send + Sync + 'static;

    /// Checks and converts one record. `Err` sends it to the dead-letter
    /// topic: only for records that no retry could ever make acceptable.
    fn decode(&self, record: &Record) -> Result<Self::Item, Rejection>;

    /// Writes a batch durably. `Ok` means every entry not listed in
    /// [`WriteOutcome::rejected`] (and not in a partition listed in
    /// [`WriteOutcome::already_applied`]) is durable in the sink.
    fn write(
        &self,
        batch: &Batch<Self::Item>,
    ) -> impl Future<Output = Result<WriteOutcome, SinkError>> + Send;

    /// Where newly assigned partitions start, for a sink that stores offsets
    /// with its writes: `None` for a partition means "use Kafka's committed
    /// offset". The default stores nothing.
    fn stored_offsets(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> impl Future<Output = Result<Vec<Option<i64>>, SinkError>> + Send {
        let _ = topic;
        let none = vec![None; partitions.len()];
        async move { Ok(none) }
    }

    /// Moves where partitions stand, for a sink that stores offsets with its
    /// writes: an operator reset partitions whose stored offset lies beyond
    /// the log's end. Each `(partition, from, to)` moves only if the
    /// partition still stands at `from` (a compare-and-set: a late reset must
    /// not move back a partition another owner has written since); an error
    /// when one did not. The default stores nothing.
    fn reset_stored_offsets(
        &self,
        topic: &str,
        resets: &[(i32, i64, i64)],
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        let _ = (topic, resets);
        async { Ok(()) }
    }

    /// Whether a batch's dead letters must be acknowledged before its write
    /// starts. True (the default) for a sink that stores offsets with its
    /// writes ([`Sink::stored_offsets`]): its write moves past the letters,
    /// so a letter still unsent then would be lost if the process stopped
    /// (a crash, a shutdown deadline). Only a sink whose offsets Kafka's
    /// commits alone hold may answer false: its write then runs while the
    /// letters are sent, off the write's path, and the commit still waits
    /// for both. The price: while the dead-letter topic refuses letters,
    /// batches are written but not committed, and written again after a
    /// restart or a rebalance (for bigquery-sink, raw duplicates the
    /// de-duplicated view absorbs).
    fn dead_letters_first(&self) -> bool {
        true
    }

    /// Whether [`Sink::write`] may list entries in
    /// [`WriteOutcome::rejected`]. True by default. A sink whose write never
    /// rejects an entry answers false, and the loop frees each decoded
    /// record's payload, key and headers as soon as it is decoded instead of
    /// holding them until the batch is written (on 600-byte events, most of
    /// what redis-sink held). Such a sink rejecting an entry anyway is a bug
    /// the loop logs as an error: the entry's dead letter carries its topic,
    /// partition, offset and reason, but not its bytes.
    fn rejects_at_write(&self) -> bool {
        true
    }

    /// Makes a staged write ([`WriteOutcome::staged`]) visible: `Ok(true)`
    /// once it is, also when it already was (a retry, or a new owner
    /// finishing what the last one recorded); `Ok(false)` when it never
    /// will be (nothing of it is in the sink, and its records are written
    /// again). Only called for a sink that stages writes.
    fn publish(&self, token: &str) -> impl Future<Output = Result<bool, SinkError>> + Send {
        let _ = token;
        async { Ok(true) }
    }

    /// Called as `partitions` are assigned, with those whose last commit in
    /// Kafka records a staged write (the others record none). A sink that stages
    /// writes must find out, before writing such a partition from that
    /// offset again, whether the write became visible (its last owner may
    /// have stopped before it knew), and if so skip its records
    /// ([`WriteOutcome::already_applied`]): in a batch handed over
    /// ([`Sink::dispatched`]) after this call, not in one handed over before
    /// it, which may still be retrying a write from when the partition was
    /// last held (its outcome is ignored). Synchronous and quick. The
    /// default does nothing.
    fn assigned(&self, topic: &str, partitions: &[i32], staged: &[StagedAtAssign]) {
        let _ = (topic, partitions, staged);
    }

    /// Readiness probe: can the sink take writes right now?
    fn check(&self) -> impl Future<Output = Result<(), SinkError>> + Send {
        async { Ok(()) }
    }

    /// How many batches may be written at once. Offsets still advance in
    /// order per partition. A sink that stores offsets itself and says more
    /// than 1 must apply a partition's batches in the order
    /// [`Sink::dispatched`] reports them: their writes run concurrently and
    /// retry independently.
    fn max_in_flight(&self) -> usize {
        1
    }

    /// Called by the loop for every batch, in offset order, as it hands the
    /// batch to a writer task and before any [`Sink::write`] of it starts.
    /// Synchronous and quick: a sink writing several batches at once notes
    /// the order they must apply in. The default does nothing.
    fn dispatched(&self, batch: &Batch<Self::Item>) {
        let _ = batch;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_write_survives_the_commit_metadata() {
        let staged = Staged {
            next: 1_234,
            token: "projects/p/datasets/d/tables/t/streams/Cg x=1".into(),
        };
        let metadata = staged.to_metadata();
        assert_eq!(Staged::from_metadata(&metadata), Some(staged));
        for other in [
            "",
            "staged-write v1 next=x token=s",
            "staged-write v1 next=5 token=",
            "lag=3",
        ] {
            assert_eq!(Staged::from_metadata(other), None, "{other:?}");
        }
    }
}

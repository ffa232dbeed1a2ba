//! Exactly once per batch on the Storage Write API's PENDING streams.
//!
//! A batch's rows go to a stream of their own, created for it: appended
//! (pipelined, as on `_default`), finalized, and only then made visible,
//! all at once, by committing the stream. The consume loop records the
//! stream's name in Kafka's commit metadata of the batch's partitions
//! before it asks for the commit ([`sink_core::WriteOutcome::staged`]), so
//! whoever owns a partition next finds a stream whose commit's outcome was
//! lost (a crash, a lost reply), commits it (again: committing a committed
//! stream changes nothing) and skips its records instead of writing them
//! twice. A write that fails part way is abandoned with its stream, which
//! nobody commits: its retry starts over on a new one.
//!
//! Streams are created at most once per `--stream-interval-ms`:
//! `CreateWriteStream` is limited per project and region (10,000 an hour),
//! and a batch per stream means fewer, larger batches than insertAll's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::anyhow;
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::google::cloud::bigquery::storage::v1::big_query_write_client::BigQueryWriteClient;
use sink_core::{PartitionRange, SinkError, StagedAtAssign};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::config::Target;
use crate::error::{classify_status, Failure};
use crate::write_api::{self, AppendStream, Commit};

/// The PENDING streams of one sink instance.
pub struct PendingStreams {
    client: BigQueryWriteClient<Channel>,
    auth: Arc<dyn Authenticator>,
    target: Target,
    timeout: Duration,
    /// When the next stream may be created.
    pace: Mutex<Pace>,
    /// Staged writes the commits of assigned partitions record, until the
    /// first batch of the partition finds out what became of them.
    recorded: Mutex<Recorded>,
}

impl PendingStreams {
    /// Streams on `target` through `client`, created at most once per
    /// `interval`; `timeout` bounds each call and each append's reply.
    pub fn new(
        client: BigQueryWriteClient<Channel>,
        auth: Arc<dyn Authenticator>,
        target: Target,
        timeout: Duration,
        interval: Duration,
    ) -> Self {
        Self {
            client,
            auth,
            target,
            timeout,
            pace: Mutex::new(Pace::new(interval)),
            recorded: Mutex::new(Recorded::default()),
        }
    }

    fn recorded(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.recorded.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn error(&self, status: &tonic::Status) -> SinkError {
        match classify_status(status, &self.target) {
            Failure::Sink(err) => err,
            Failure::TooLarge(why) => SinkError::transient("bad_response", anyhow!(why)),
        }
    }

    /// A new stream for one batch, with its connection for appends.
    pub async fn create(&self) -> Result<(String, AppendStream), SinkError> {
        let slot = self
            .pace
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_slot(Instant::now());
        tokio::time::sleep_until(slot).await;
        let name =
            write_api::create_pending(&self.client, self.auth.as_ref(), &self.target, self.timeout)
                .await
                .map_err(|status| self.error(&status))?;
        let appends = AppendStream::start(
            self.client.clone(),
            Arc::clone(&self.auth),
            name.clone(),
            self.timeout,
        );
        Ok((name, appends))
    }

    /// Closes a stream to appends, so that it may be committed.
    pub async fn finalize(&self, name: &str) -> Result<(), SinkError> {
        write_api::finalize(&self.client, self.auth.as_ref(), name, self.timeout)
            .await
            .map_err(|status| self.error(&status))
    }

    /// Commits a finalized stream: `Ok(true)` once its rows are visible
    /// (now or before), `Ok(false)` when they never will be.
    pub async fn publish(&self, name: &str) -> Result<bool, SinkError> {
        let commit = write_api::commit(
            &self.client,
            self.auth.as_ref(),
            &self.target,
            name,
            self.timeout,
        )
        .await
        .map_err(|status| self.error(&status))?;
        match commit {
            Commit::Visible => Ok(true),
            Commit::Gone(why) => {
                tracing::warn!(stream = name, %why, "the stream cannot be committed and was not: its rows are written again");
                Ok(false)
            }
            Commit::Refused(why) => Err(SinkError::unavailable(
                "stream_commit_refused",
                anyhow!("BigQuery refused to commit stream {name}: {why}"),
            )),
        }
    }

    /// Notes what the commits of newly assigned `partitions` record.
    pub fn assigned(&self, partitions: &[i32], staged: &[StagedAtAssign]) {
        self.recorded().assigned(partitions, staged);
    }

    /// A batch was handed to a writer (see [`Recorded`]).
    pub fn dispatched(&self, ranges: &[PartitionRange]) {
        self.recorded().dispatched(ranges);
    }

    /// The staged write recorded for `partition` from offset `first` that
    /// the batch being written is to settle, if any.
    pub fn recorded_at(&self, partition: i32, first: i64) -> Option<StagedAtAssign> {
        self.recorded().at(partition, first)
    }

    /// The batch being written has settled `partition`'s recorded write.
    pub fn settled(&self, partition: i32) {
        self.recorded().settled(partition);
    }
}

/// The staged writes that the commits of assigned partitions record, and
/// the batch that settles each: the first batch of the partition handed to
/// a writer after the assignment. A batch handed over before it (still
/// retrying after its partition was revoked, then assigned again) must not:
/// it would settle the record and be ignored, and the next batch would
/// write the records again. With PENDING streams one batch is written at a
/// time (`--max-in-flight` is 1), so the batch being written is the last
/// one handed over.
#[derive(Debug, Default)]
struct Recorded {
    /// Found at assignment; no batch of the partition handed over since.
    found: HashMap<i32, StagedAtAssign>,
    /// Those the batch being written is to settle.
    claimed: HashMap<i32, StagedAtAssign>,
}

impl Recorded {
    fn assigned(&mut self, partitions: &[i32], staged: &[StagedAtAssign]) {
        for partition in partitions {
            self.found.remove(partition);
            self.claimed.remove(partition);
        }
        for s in staged {
            self.found.insert(s.partition, s.clone());
        }
    }

    fn dispatched(&mut self, ranges: &[PartitionRange]) {
        self.claimed.clear();
        for range in ranges {
            let Some(s) = self.found.remove(&range.partition) else {
                continue;
            };
            if s.first == range.first {
                self.claimed.insert(range.partition, s);
            } else {
                tracing::warn!(
                    partition = range.partition,
                    recorded_from = s.first,
                    first = range.first,
                    stream = %s.staged.token,
                    "a staged write is recorded where the partition does not resume (an \
                     offset reset moved it): it is not published"
                );
            }
        }
    }

    fn at(&self, partition: i32, first: i64) -> Option<StagedAtAssign> {
        self.claimed
            .get(&partition)
            .filter(|s| s.first == first)
            .cloned()
    }

    fn settled(&mut self, partition: i32) {
        self.claimed.remove(&partition);
    }
}

/// Spaces stream creations at least an interval apart (failed ones too:
/// a retry storm would spend the quota all the same).
#[derive(Debug)]
struct Pace {
    interval: Duration,
    last: Option<Instant>,
}

impl Pace {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
        }
    }

    /// Takes the next free slot: now if the last one is an interval old,
    /// else an interval after it.
    fn next_slot(&mut self, now: Instant) -> Instant {
        let slot = self
            .last
            .map_or(now, |last| (last + self.interval).max(now));
        self.last = Some(slot);
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_created_at_most_once_per_interval() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let mut pace = Pace::new(second);
        assert_eq!(pace.next_slot(start), start);
        // Three batches at once: one slot each, a second apart.
        assert_eq!(pace.next_slot(start), start + second);
        assert_eq!(pace.next_slot(start), start + 2 * second);
        // Later than the last slot plus the interval: at once.
        let later = start + 10 * second;
        assert_eq!(pace.next_slot(later), later);
        assert_eq!(pace.next_slot(later + second / 2), later + second);
    }

    fn recorded(partition: i32, first: i64, token: &str) -> StagedAtAssign {
        StagedAtAssign {
            partition,
            first,
            staged: sink_core::Staged {
                next: first + 500,
                token: token.into(),
            },
        }
    }

    fn range(partition: i32, first: i64) -> PartitionRange {
        PartitionRange {
            partition,
            first,
            next: first + 500,
        }
    }

    #[test]
    fn a_recorded_write_is_settled_by_the_first_batch_handed_over_after_the_assignment() {
        let mut r = Recorded::default();
        r.assigned(&[0, 1], &[recorded(0, 100, "s0"), recorded(1, 40, "s1")]);
        r.dispatched(&[range(0, 100)]);
        assert_eq!(r.at(0, 100), Some(recorded(0, 100, "s0")));
        assert_eq!(r.at(1, 40), None, "partition 1 is not in this batch");
        r.settled(0);
        assert_eq!(r.at(0, 100), None);
        r.dispatched(&[range(1, 40)]);
        assert_eq!(r.at(1, 40), Some(recorded(1, 40, "s1")));
    }

    #[test]
    fn a_batch_handed_over_before_its_partition_came_back_leaves_the_record_to_the_next() {
        let mut r = Recorded::default();
        r.assigned(&[0], &[]);
        // Batch 1 of partition 0 fails and keeps retrying; partition 0 moves
        // away, its new owner records a write at 100 and stops; it comes back.
        r.dispatched(&[range(0, 100)]);
        r.assigned(&[0], &[recorded(0, 100, "theirs")]);
        assert_eq!(r.at(0, 100), None, "batch 1 was handed over before");
        r.dispatched(&[range(0, 100)]);
        assert_eq!(r.at(0, 100), Some(recorded(0, 100, "theirs")));
    }

    #[test]
    fn a_record_where_the_partition_does_not_resume_is_forgotten() {
        let mut r = Recorded::default();
        r.assigned(&[0], &[recorded(0, 100, "s0")]);
        r.dispatched(&[range(0, 250)]);
        assert_eq!(r.at(0, 250), None);
        assert_eq!(r.at(0, 100), None);
        r.dispatched(&[range(0, 100)]);
        assert_eq!(r.at(0, 100), None, "forgotten, not kept for later");
    }

    #[test]
    fn no_interval_never_waits() {
        let start = Instant::now();
        let mut pace = Pace::new(Duration::ZERO);
        assert_eq!(pace.next_slot(start), start);
        assert_eq!(pace.next_slot(start), start);
    }
}

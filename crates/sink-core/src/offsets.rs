//! Which offsets may be committed, per assigned partition.
//!
//! Batches complete out of order when several are in flight; a partition's
//! commit position only moves past a batch once every earlier batch holding
//! that partition is done too. State exists only for partitions this consumer
//! owns right now: a completion for a revoked partition finds nothing and is
//! ignored, so nothing is ever committed for a partition we no longer own.
//!
//! Shared between the consume loop, the batch tasks and the rebalance callback
//! behind one mutex; every method is short and does no I/O.

use std::collections::{HashMap, VecDeque};

use crate::sink::PartitionRange;

/// Identifies a dispatched batch.
pub type BatchId = u64;

/// Whether a batch may record its staged write ([`OffsetTracker::stage_ready`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Stage {
    /// Every earlier batch of its partitions is done.
    Ready,
    /// An earlier batch of one of them is still being written.
    Wait,
    /// It no longer holds one of them (revoked; re-assigned partitions
    /// start a new list, without it).
    Lost,
    /// These partitions' fetchers never moved where the sink said they
    /// resume (a seek failed): the batch's records are not the ones that
    /// follow what is done, and it must resume them there.
    Elsewhere(Vec<(i32, i64)>),
}

#[derive(Debug, Default)]
struct PartitionState {
    /// Batches holding this partition, in dispatch (= offset) order.
    in_flight: VecDeque<InFlight>,
    /// Everything below this is durable in the sink (or dead-lettered).
    acked: Option<i64>,
    /// What was last handed to Kafka as committed.
    committed: Option<i64>,
    /// The next offset expected from the fetcher; older ones are stale
    /// leftovers of a seek and are dropped.
    position: Option<i64>,
    /// The highest offset the fetcher delivered since the assignment (or
    /// since a seek went back): the fetcher only moves forward, unless the
    /// log under it was truncated or replaced.
    received: Option<i64>,
    /// The log went back under the fetcher: nothing more of it is taken.
    refused: bool,
    /// A staged write recorded in Kafka at this offset, with the metadata
    /// that records it: a commit of this offset carries it, so that a
    /// revoke's or shutdown's commit does not erase the record.
    recorded: Option<(BatchId, i64, String)>,
    /// Where the sink said the partition resumes (`already_applied`) until
    /// the fetcher is seen to move there: a batch from elsewhere must not
    /// be recorded as starting where everything before it is done.
    seek_pending: Option<i64>,
}

#[derive(Debug)]
struct InFlight {
    batch: BatchId,
    next: i64,
    done: bool,
}

/// Why a fetched record is not processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Its partition is not owned (any more).
    NotOwned,
    /// It lies below where the partition resumed: a leftover from before a
    /// seek forward, or the last record delivered again (a pause racing the
    /// delivery can resume there; a replay of one record, not the log
    /// going back).
    Stale {
        /// The offset expected next.
        expected: i64,
    },
    /// It lies at or below an offset the fetcher already delivered: the
    /// log was truncated or replaced under it, and librdkafka reset the
    /// fetch (auto.offset.reset). The partition is now refused.
    WentBack {
        /// The offset expected next.
        expected: i64,
        /// The highest offset delivered before, if any since the start.
        last: Option<i64>,
    },
    /// Its partition was refused after its log went back.
    Refused,
}

/// Per-partition offsets of the current assignment.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<i32, PartitionState>,
    next_batch: BatchId,
    seeks: Vec<(i32, i64)>,
    revoked: Vec<i32>,
}

impl OffsetTracker {
    /// A partition was assigned; `start` is where fetching begins, if known.
    pub fn assign(&mut self, partition: i32, start: Option<i64>) {
        self.partitions.insert(
            partition,
            PartitionState {
                position: start,
                ..PartitionState::default()
            },
        );
    }

    /// A partition was revoked: its state is gone. (A revoke reads
    /// [`OffsetTracker::acked`] first, to commit it with the record of a
    /// staged write made there.)
    pub fn revoke(&mut self, partition: i32) {
        if self.partitions.remove(&partition).is_some() {
            self.seeks.retain(|(p, _)| *p != partition);
            self.revoked.push(partition);
        }
    }

    /// Everything of `partition` below this is done, if known.
    pub fn acked(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition)?.acked
    }

    /// Batch `batch`'s staged write was recorded in Kafka: each
    /// `(partition, offset, metadata)` committed. Kept until it completes.
    pub fn note_recorded(&mut self, batch: BatchId, records: &[(i32, i64, String)]) {
        for (partition, offset, metadata) in records {
            if let Some(state) = self.partitions.get_mut(partition) {
                state.recorded = Some((batch, *offset, metadata.clone()));
            }
        }
    }

    /// The metadata a commit of `partition` at `offset` must carry: the
    /// record of a staged write made there, if any.
    pub fn metadata_at(&self, partition: i32, offset: i64) -> Option<String> {
        let (_, at, metadata) = self.partitions.get(&partition)?.recorded.as_ref()?;
        (*at == offset).then(|| metadata.clone())
    }

    /// Partitions currently owned.
    pub fn assigned(&self) -> Vec<i32> {
        let mut partitions: Vec<i32> = self.partitions.keys().copied().collect();
        partitions.sort_unstable();
        partitions
    }

    /// Partitions currently owned and read: not refused.
    pub fn reading(&self) -> Vec<i32> {
        let mut partitions: Vec<i32> = self
            .partitions
            .iter()
            .filter(|(_, state)| !state.refused)
            .map(|(partition, _)| *partition)
            .collect();
        partitions.sort_unstable();
        partitions
    }

    /// Whether a fetched message should be processed. If so, the offset
    /// fetching resumed from before this record: a batch range starting
    /// with it begins there, so consecutive ranges of a partition chain
    /// without holes even where offsets skip (transaction markers), and a
    /// sink storing offsets can demand exact continuity.
    pub fn accept(&mut self, partition: i32, offset: i64) -> Result<i64, Skip> {
        let state = self.partitions.get_mut(&partition).ok_or(Skip::NotOwned)?;
        if state.refused {
            return Err(Skip::Refused);
        }
        let last = state.received;
        let resumed_from = match state.position {
            // Below the position but not below the last record delivered: a
            // leftover from before a seek forward, or that record again.
            // Below it (or below the start, before anything came): the
            // fetcher went back.
            Some(position) if offset < position && last.is_some_and(|last| offset >= last) => {
                state.received = Some(offset);
                return Err(Skip::Stale { expected: position });
            }
            Some(position) if offset < position => {
                state.refused = true;
                return Err(Skip::WentBack {
                    expected: position,
                    last,
                });
            }
            Some(position) => position,
            None => offset,
        };
        state.received = Some(offset);
        state.position = Some(offset + 1);
        Ok(resumed_from)
    }

    /// Registers a batch about to be written.
    pub fn begin(&mut self, ranges: &[PartitionRange]) -> BatchId {
        let batch = self.next_batch;
        self.next_batch += 1;
        for range in ranges {
            if let Some(state) = self.partitions.get_mut(&range.partition) {
                state.in_flight.push_back(InFlight {
                    batch,
                    next: range.next,
                    done: false,
                });
            }
        }
        batch
    }

    /// Records that a batch is durable. For partitions in `already_applied`
    /// the sink holds everything below the given offset: fetching must resume
    /// there, which the loop learns from [`OffsetTracker::take_seeks`].
    pub fn complete(&mut self, batch: BatchId, already_applied: &[(i32, i64)]) {
        for (partition, state) in &mut self.partitions {
            let Some(entry) = state.in_flight.iter_mut().find(|e| e.batch == batch) else {
                continue;
            };
            entry.done = true;
            if state.recorded.as_ref().is_some_and(|(b, _, _)| *b == batch) {
                state.recorded = None;
            }
            if let Some((_, applied)) = already_applied.iter().find(|(p, _)| p == partition) {
                entry.next = *applied;
                self.seeks.push((*partition, *applied));
                state.seek_pending = Some(*applied);
            }
            while state.in_flight.front().is_some_and(|e| e.done) {
                if let Some(done) = state.in_flight.pop_front() {
                    state.acked = Some(state.acked.map_or(done.next, |a| a.max(done.next)));
                }
            }
        }
    }

    /// Partitions whose fetch position must move (and whose buffered records
    /// must be dropped), because the sink holds exactly the records below
    /// another offset than we fetched from.
    pub fn take_seeks(&mut self) -> Vec<(i32, i64)> {
        std::mem::take(&mut self.seeks)
    }

    /// The loop is about to seek `partition` to `offset`. A seek back
    /// fetches again what was delivered: not the log going back. Noted
    /// before the seek, whatever it returns: one that times out still
    /// happens.
    pub fn seeking(&mut self, partition: i32, offset: i64) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.received = state.received.map(|last| last.min(offset - 1));
        }
    }

    /// The fetcher of `partition` now starts at `offset` (a seek succeeded).
    pub fn moved_to(&mut self, partition: i32, offset: i64) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.position = Some(offset);
            if state.seek_pending == Some(offset) {
                state.seek_pending = None;
            }
        }
    }

    /// Partitions revoked since the last call: their buffered records are
    /// stale.
    pub fn take_revoked(&mut self) -> Vec<i32> {
        std::mem::take(&mut self.revoked)
    }

    /// Acknowledged offsets not yet committed; marks them committed.
    pub fn take_commits(&mut self) -> Vec<(i32, i64)> {
        let mut commits = Vec::new();
        for (partition, state) in &mut self.partitions {
            if let Some(acked) = state.acked.filter(|a| Some(*a) != state.committed) {
                state.committed = Some(acked);
                commits.push((*partition, acked));
            }
        }
        commits.sort_unstable();
        commits
    }

    /// Whether batch `batch` may record that it wrote `partitions` from
    /// their committed offsets on (a staged write, see
    /// [`crate::sink::Staged`]).
    pub fn stage_ready(&self, batch: BatchId, partitions: &[i32]) -> Stage {
        let mut ready = Stage::Ready;
        let mut elsewhere = Vec::new();
        for partition in partitions {
            let Some(state) = self.partitions.get(partition) else {
                return Stage::Lost;
            };
            let Some(at) = state.in_flight.iter().position(|e| e.batch == batch) else {
                return Stage::Lost;
            };
            if !state.in_flight.iter().take(at).all(|e| e.done) {
                ready = Stage::Wait;
            }
            if let Some(offset) = state.seek_pending {
                elsewhere.push((*partition, offset));
            }
        }
        if elsewhere.is_empty() {
            ready
        } else {
            Stage::Elsewhere(elsewhere)
        }
    }

    /// True while a batch holding any of `partitions` is being written.
    pub fn in_flight(&self, partitions: &[i32]) -> bool {
        partitions.iter().any(|p| {
            self.partitions
                .get(p)
                .is_some_and(|s| s.in_flight.iter().any(|e| !e.done))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(partition: i32, first: i64, next: i64) -> PartitionRange {
        PartitionRange {
            partition,
            first,
            next,
        }
    }

    #[test]
    fn commits_advance_in_order_only() {
        let mut t = OffsetTracker::default();
        t.assign(0, None);
        let b1 = t.begin(&[range(0, 0, 10)]);
        let b2 = t.begin(&[range(0, 10, 20)]);
        t.complete(b2, &[]);
        assert_eq!(t.take_commits(), vec![], "batch 1 is still in flight");
        t.complete(b1, &[]);
        assert_eq!(t.take_commits(), vec![(0, 20)]);
        assert_eq!(t.take_commits(), vec![], "nothing new");
    }

    #[test]
    fn a_batch_stages_only_after_earlier_ones_and_while_it_holds_its_partitions() {
        let mut t = OffsetTracker::default();
        t.assign(0, None);
        t.assign(1, None);
        let b1 = t.begin(&[range(0, 0, 5)]);
        let b2 = t.begin(&[range(1, 0, 3), range(0, 5, 8)]);
        assert_eq!(t.stage_ready(b1, &[0]), Stage::Ready);
        assert_eq!(t.stage_ready(b2, &[0, 1]), Stage::Wait, "b1 holds 0..5");
        t.complete(b1, &[]);
        assert_eq!(t.stage_ready(b2, &[0, 1]), Stage::Ready);
        t.revoke(1);
        assert_eq!(
            t.stage_ready(b2, &[0, 1]),
            Stage::Lost,
            "partition 1 is gone"
        );
        t.assign(1, Some(0));
        assert_eq!(
            t.stage_ready(b2, &[0, 1]),
            Stage::Lost,
            "re-assigned, partition 1 does not hold b2"
        );
    }

    #[test]
    fn a_batch_fetched_after_a_failed_seek_is_not_staged() {
        let mut t = OffsetTracker::default();
        t.assign(0, Some(0));
        let b1 = t.begin(&[range(0, 0, 5)]);
        // The sink holds everything below 9: resume there.
        t.complete(b1, &[(0, 9)]);
        assert_eq!(t.take_seeks(), vec![(0, 9)]);
        // The seek failed; the fetcher went on from 5.
        let b2 = t.begin(&[range(0, 5, 8)]);
        assert_eq!(t.stage_ready(b2, &[0]), Stage::Elsewhere(vec![(0, 9)]));
        t.complete(b2, &[(0, 9)]);
        t.moved_to(0, 9);
        let b3 = t.begin(&[range(0, 9, 12)]);
        assert_eq!(t.stage_ready(b3, &[0]), Stage::Ready);
    }

    #[test]
    fn commits_at_a_recorded_offset_carry_its_record_until_the_batch_completes() {
        let mut t = OffsetTracker::default();
        t.assign(0, Some(0));
        let b1 = t.begin(&[range(0, 0, 5)]);
        t.complete(b1, &[]);
        assert_eq!(t.take_commits(), vec![(0, 5)]);
        let b2 = t.begin(&[range(0, 5, 9)]);
        t.note_recorded(b2, &[(0, 5, "staged".into())]);
        assert_eq!(t.metadata_at(0, 5).as_deref(), Some("staged"));
        assert_eq!(t.metadata_at(0, 9), None);
        // Another batch completing first leaves the record alone.
        let b3 = t.begin(&[range(0, 9, 12)]);
        t.complete(b3, &[]);
        assert_eq!(t.metadata_at(0, 5).as_deref(), Some("staged"));
        t.complete(b2, &[]);
        assert_eq!(t.metadata_at(0, 5), None);
    }

    #[test]
    fn partitions_advance_independently() {
        let mut t = OffsetTracker::default();
        t.assign(0, None);
        t.assign(1, None);
        let b1 = t.begin(&[range(0, 0, 5)]);
        let b2 = t.begin(&[range(1, 0, 3), range(0, 5, 8)]);
        t.complete(b2, &[]);
        assert_eq!(t.take_commits(), vec![(1, 3)]);
        assert!(t.in_flight(&[0]));
        assert!(!t.in_flight(&[1]));
        t.complete(b1, &[]);
        assert_eq!(t.take_commits(), vec![(0, 8)]);
    }

    #[test]
    fn revoked_partitions_are_never_committed() {
        let mut t = OffsetTracker::default();
        t.assign(0, None);
        let b = t.begin(&[range(0, 0, 5)]);
        assert_eq!(t.acked(0), None, "nothing acknowledged yet");
        t.revoke(0);
        t.complete(b, &[]);
        assert_eq!(t.take_commits(), vec![]);
        assert_eq!(t.accept(0, 5), Err(Skip::NotOwned), "not ours any more");
        assert_eq!(t.take_revoked(), vec![0]);
    }

    #[test]
    fn an_acknowledged_offset_is_readable_until_revoked() {
        let mut t = OffsetTracker::default();
        t.assign(2, None);
        let b = t.begin(&[range(2, 0, 5)]);
        t.complete(b, &[]);
        assert_eq!(t.acked(2), Some(5), "what a revoke commits");
        t.revoke(2);
        assert_eq!(t.acked(2), None);
    }

    #[test]
    fn already_applied_moves_position_and_commit() {
        let mut t = OffsetTracker::default();
        t.assign(0, Some(100));
        assert_eq!(t.accept(0, 100), Ok(100));
        let b = t.begin(&[range(0, 100, 150)]);
        t.complete(b, &[(0, 400)]);
        assert_eq!(t.take_seeks(), vec![(0, 400)]);
        assert_eq!(t.take_commits(), vec![(0, 400)]);
        t.moved_to(0, 400);
        assert_eq!(
            t.accept(0, 150),
            Err(Skip::Stale { expected: 400 }),
            "stale: fetched before the seek"
        );
        assert_eq!(t.accept(0, 400), Ok(400));
    }

    #[test]
    fn accept_drops_replayed_offsets() {
        let mut t = OffsetTracker::default();
        t.assign(0, None);
        assert_eq!(t.accept(0, 7), Ok(7), "unknown start: the record itself");
        assert_eq!(
            t.accept(0, 7),
            Err(Skip::Stale { expected: 8 }),
            "the last record again (a pause during a cooperative rebalance)"
        );
        assert_eq!(t.accept(0, 8), Ok(8));
        assert_eq!(
            t.accept(0, 11),
            Ok(9),
            "offsets 9 and 10 do not exist: the range still starts at 9"
        );
        assert_eq!(
            t.accept(1, 0),
            Err(Skip::NotOwned),
            "partition 1 is not assigned"
        );
    }

    #[test]
    fn a_fetcher_that_goes_back_refuses_its_partition() {
        let mut t = OffsetTracker::default();
        t.assign(0, Some(100));
        t.assign(1, Some(50));
        assert_eq!(t.accept(0, 100), Ok(100));
        assert_eq!(t.accept(0, 101), Ok(101));
        assert_eq!(
            t.accept(0, 0),
            Err(Skip::WentBack {
                expected: 102,
                last: Some(101)
            }),
            "reset to the log's start"
        );
        assert_eq!(t.accept(0, 1), Err(Skip::Refused), "nothing more of it");
        assert_eq!(
            t.accept(1, 3),
            Err(Skip::WentBack {
                expected: 50,
                last: None
            }),
            "below its start before anything came"
        );
        assert_eq!(t.reading(), Vec::<i32>::new());
        assert_eq!(
            t.assigned(),
            vec![0, 1],
            "still owned: in-flight batches commit"
        );
    }

    #[test]
    fn a_seek_back_is_not_the_log_going_back() {
        let mut t = OffsetTracker::default();
        t.assign(0, Some(100));
        for offset in 100..150 {
            assert_eq!(t.accept(0, offset), Ok(offset));
        }
        let b = t.begin(&[range(0, 100, 150)]);
        // Another consumer applied only up to 120 (a shorter batch).
        t.complete(b, &[(0, 120)]);
        assert_eq!(t.take_seeks(), vec![(0, 120)]);
        t.seeking(0, 120);
        // The seek timed out (so the position stays), but happened.
        assert_eq!(t.accept(0, 120), Err(Skip::Stale { expected: 150 }));
        t.moved_to(0, 120);
        assert_eq!(t.accept(0, 120), Ok(120));
    }
}

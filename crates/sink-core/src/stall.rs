//! Partitions that stopped advancing although their log holds more records.
//!
//! Some consume errors never reach the loop as a record or an error it
//! could act on: a record batch librdkafka cannot decode, a fetch the broker
//! keeps refusing. The partition just stops, and the loop, waiting for
//! records, sees nothing wrong. This watch compares, at every statistics
//! report, where each assigned partition stands with where its log ends: a
//! partition with records to read whose position has not moved for the
//! stall timeout, while the loop was taking records and librdkafka held
//! none for it, is stalled.
//!
//! Pure: the loop's statistics callback feeds it and acts on what it
//! returns (an error log, a gauge, readiness).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What one statistics report says about an assigned partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// The next offset the application will get.
    pub position: i64,
    /// Where a read stops: the last stable offset (the high watermark
    /// without open transactions).
    pub log_end: i64,
    /// Records librdkafka has fetched and not yet handed to the loop.
    pub queued: i64,
}

/// A partition that started or stopped being stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Stalled at `position`, `log_end - position` records behind, for
    /// `for_` already.
    Stalled {
        /// The partition.
        partition: i32,
        /// Where it stands.
        position: i64,
        /// Where its log ends.
        log_end: i64,
        /// How long it has not moved.
        for_: Duration,
    },
    /// Moving again (or caught up, or revoked).
    Moving {
        /// The partition.
        partition: i32,
    },
}

#[derive(Debug)]
struct Watch {
    position: i64,
    /// Since when it has waited at `position` with records to read while
    /// the loop was taking; `None` while it is not waiting.
    since: Option<Instant>,
    stalled: bool,
}

/// Stall detection over the partitions of one consumer.
#[derive(Debug)]
pub struct StallWatch {
    timeout: Duration,
    partitions: HashMap<i32, Watch>,
}

impl StallWatch {
    /// A partition is stalled after not moving for `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            partitions: HashMap::new(),
        }
    }

    /// Takes one report about `partition`. `taking` is false while the loop
    /// holds or pauses fetching because the sink is behind: a partition not
    /// read on purpose is not stalled, and its clock restarts.
    pub fn observe(
        &mut self,
        partition: i32,
        seen: Observation,
        taking: bool,
        now: Instant,
    ) -> Option<Change> {
        let watch = self.partitions.entry(partition).or_insert(Watch {
            position: seen.position,
            since: None,
            stalled: false,
        });
        let waiting = seen.log_end > seen.position && seen.queued == 0 && taking;
        if seen.position != watch.position || !waiting {
            watch.position = seen.position;
            watch.since = waiting.then_some(now);
            if watch.stalled {
                watch.stalled = false;
                return Some(Change::Moving { partition });
            }
            return None;
        }
        let for_ = now.duration_since(*watch.since.get_or_insert(now));
        if !watch.stalled && for_ >= self.timeout {
            watch.stalled = true;
            return Some(Change::Stalled {
                partition,
                position: seen.position,
                log_end: seen.log_end,
                for_,
            });
        }
        None
    }

    /// `partition` is no longer assigned.
    pub fn forget(&mut self, partition: i32) -> Option<Change> {
        let watch = self.partitions.remove(&partition)?;
        watch.stalled.then_some(Change::Moving { partition })
    }

    /// How many partitions are stalled now.
    pub fn stalled(&self) -> usize {
        self.partitions.values().filter(|w| w.stalled).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn at(position: i64, log_end: i64, queued: i64) -> Observation {
        Observation {
            position,
            log_end,
            queued,
        }
    }

    #[test]
    fn a_partition_behind_its_log_end_that_does_not_move_is_stalled() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(TIMEOUT);
        assert_eq!(w.observe(0, at(100, 500, 0), true, t0), None);
        assert_eq!(
            w.observe(
                0,
                at(100, 500, 0),
                true,
                t0 + TIMEOUT - Duration::from_secs(1)
            ),
            None
        );
        assert_eq!(
            w.observe(0, at(100, 520, 0), true, t0 + TIMEOUT),
            Some(Change::Stalled {
                partition: 0,
                position: 100,
                log_end: 520,
                for_: TIMEOUT
            })
        );
        assert_eq!(w.stalled(), 1);
        assert_eq!(
            w.observe(0, at(100, 520, 0), true, t0 + 2 * TIMEOUT),
            None,
            "said once"
        );
        assert_eq!(
            w.observe(0, at(101, 520, 0), true, t0 + 2 * TIMEOUT),
            Some(Change::Moving { partition: 0 })
        );
        assert_eq!(w.stalled(), 0);
    }

    #[test]
    fn caught_up_held_back_or_queued_is_not_stalled() {
        let t0 = Instant::now();
        let later = t0 + 10 * TIMEOUT;
        for (seen, taking, why) in [
            (at(500, 500, 0), true, "nothing to read"),
            (
                at(100, 500, 0),
                false,
                "the loop holds fetching for the sink",
            ),
            (
                at(100, 500, 20),
                true,
                "librdkafka holds records for the loop",
            ),
        ] {
            let mut w = StallWatch::new(TIMEOUT);
            w.observe(0, seen, taking, t0);
            assert_eq!(w.observe(0, seen, taking, later), None, "{why}");
        }
    }

    #[test]
    fn the_clock_restarts_when_the_loop_takes_again() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(TIMEOUT);
        w.observe(0, at(100, 500, 0), false, t0);
        let resumed = t0 + 10 * TIMEOUT;
        assert_eq!(w.observe(0, at(100, 500, 0), true, resumed), None);
        assert!(matches!(
            w.observe(0, at(100, 500, 0), true, resumed + TIMEOUT),
            Some(Change::Stalled { .. })
        ));
    }

    #[test]
    fn a_revoked_stalled_partition_stops_counting() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(TIMEOUT);
        w.observe(3, at(0, 10, 0), true, t0);
        w.observe(3, at(0, 10, 0), true, t0 + TIMEOUT);
        assert_eq!(w.forget(3), Some(Change::Moving { partition: 3 }));
        assert_eq!(w.stalled(), 0);
        assert_eq!(w.forget(3), None);
    }
}

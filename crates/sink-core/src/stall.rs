//! Partitions that stopped advancing although their log holds more records.
//!
//! Some consume errors never reach the loop as a record or an error it
//! could act on: a record batch librdkafka cannot decode, a fetch the broker
//! keeps refusing. The partition just stops, and the loop, waiting for
//! records, sees nothing wrong. This watch compares, at every statistics
//! report, each assigned partition's fetch position (librdkafka's own: it
//! moves past transaction markers, which never reach the loop; while
//! librdkafka reports none, the last one it did) with where
//! its log ends: a partition whose position has not moved for the stall
//! timeout while the loop was taking records and its log ends further on is
//! stalled. It stays stalled until its position moves or its log ends where
//! it stands; while the loop holds fetching for the sink, the clock stops.
//!
//! Pure: the loop's statistics callback feeds it and acts on what it
//! returns (an error log, a gauge, readiness).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What one statistics report says about an assigned partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// The next offset librdkafka fetches, if it knows it (not while it is
    /// still looking up where to start).
    pub position: Option<i64>,
    /// Where a read stops (the last stable offset), if the report knows:
    /// a broker answering a fetch with an error sends none.
    pub log_end: Option<i64>,
}

/// A partition that started or stopped being stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Stalled at `position` although its log ends at `log_end`, for
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
    /// Moving again, caught up, or revoked.
    Moving {
        /// The partition.
        partition: i32,
    },
}

#[derive(Debug)]
struct Watch {
    position: i64,
    /// The last log end a report gave.
    log_end: Option<i64>,
    /// How long it has stood at `position` with records to read while the
    /// loop was taking, up to the last report.
    waited: Duration,
    last_report: Instant,
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
    /// read on purpose is not waiting, and its clock stops.
    pub fn observe(
        &mut self,
        partition: i32,
        seen: Observation,
        taking: bool,
        now: Instant,
    ) -> Option<Change> {
        // A position not known yet (never, or not now: librdkafka looking
        // up an offset, validating a leader epoch) counts as where it was.
        let known = self.partitions.get(&partition).map(|w| w.position);
        let position = seen.position.or(known)?;
        let watch = self.partitions.entry(partition).or_insert(Watch {
            position,
            log_end: None,
            waited: Duration::ZERO,
            last_report: now,
            stalled: false,
        });
        let since_last = now.saturating_duration_since(watch.last_report);
        watch.last_report = now;
        watch.log_end = seen.log_end.or(watch.log_end);
        let behind = watch.log_end.is_some_and(|end| end > position);
        if position != watch.position || !behind {
            watch.position = position;
            watch.waited = Duration::ZERO;
            if watch.stalled {
                watch.stalled = false;
                return Some(Change::Moving { partition });
            }
            return None;
        }
        if taking {
            watch.waited += since_last;
        }
        if !watch.stalled && watch.waited >= self.timeout {
            watch.stalled = true;
            return Some(Change::Stalled {
                partition,
                position,
                log_end: watch.log_end.unwrap_or(position),
                for_: watch.waited,
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
    const REPORT: Duration = Duration::from_secs(5);

    fn at(position: i64, log_end: i64) -> Observation {
        Observation {
            position: Some(position),
            log_end: Some(log_end),
        }
    }

    /// Reports `seen` every 5 s from `from` for `reports` reports; returns
    /// the changes and when the last report was.
    fn report(
        w: &mut StallWatch,
        seen: Observation,
        taking: bool,
        from: Instant,
        reports: u32,
    ) -> (Vec<Change>, Instant) {
        let changes = (0..reports)
            .filter_map(|i| w.observe(0, seen, taking, from + REPORT * i))
            .collect();
        (changes, from + REPORT * reports.saturating_sub(1))
    }

    #[test]
    fn a_partition_behind_its_log_end_that_does_not_move_is_stalled_once() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(TIMEOUT);
        let (changes, last) = report(&mut w, at(100, 500), true, t0, 12);
        assert_eq!(changes, vec![], "55 s");
        assert_eq!(
            w.observe(0, at(100, 520), true, last + REPORT),
            Some(Change::Stalled {
                partition: 0,
                position: 100,
                log_end: 520,
                for_: TIMEOUT
            })
        );
        assert_eq!(w.stalled(), 1);
        let (changes, last) = report(&mut w, at(100, 520), true, last + 2 * REPORT, 10);
        assert_eq!(changes, vec![], "said once");
        assert_eq!(
            w.observe(0, at(101, 520), true, last + REPORT),
            Some(Change::Moving { partition: 0 })
        );
        assert_eq!(w.stalled(), 0);
    }

    #[test]
    fn caught_up_or_held_back_is_not_stalled() {
        let t0 = Instant::now();
        for (seen, taking, why) in [
            (at(500, 500), true, "nothing to read"),
            (at(100, 500), false, "the loop holds fetching for the sink"),
        ] {
            let mut w = StallWatch::new(TIMEOUT);
            assert_eq!(report(&mut w, seen, taking, t0, 100).0, vec![], "{why}");
        }
    }

    #[test]
    fn holding_stops_the_clock_and_clears_nothing() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(TIMEOUT);
        let (_, last) = report(&mut w, at(100, 500), true, t0, 8);
        let (changes, last) = report(&mut w, at(100, 500), false, last + REPORT, 50);
        assert_eq!(changes, vec![], "35 s waited, then the loop held");
        let (changes, last) = report(&mut w, at(100, 500), true, last + REPORT, 5);
        assert!(
            matches!(changes[..], [Change::Stalled { .. }]),
            "{changes:?}"
        );
        let (changes, _) = report(&mut w, at(100, 500), false, last + REPORT, 5);
        assert_eq!(
            changes,
            vec![],
            "still stalled while the loop holds: no flapping"
        );
        assert_eq!(w.stalled(), 1);
    }

    #[test]
    fn a_report_without_a_log_end_keeps_the_last_one() {
        // A broker answering fetches with an error sends no high watermark.
        let t0 = Instant::now();
        let mut w = StallWatch::new(TIMEOUT);
        w.observe(0, at(100, 500), true, t0);
        let unknown = Observation {
            position: Some(100),
            log_end: None,
        };
        let (changes, _) = report(&mut w, unknown, true, t0 + REPORT, 13);
        assert!(
            matches!(changes[..], [Change::Stalled { log_end: 500, .. }]),
            "{changes:?}"
        );
    }

    #[test]
    fn a_position_librdkafka_no_longer_reports_counts_as_where_it_was() {
        // Stuck looking up an offset or validating a leader epoch: no
        // position in the reports, and no progress either.
        let t0 = Instant::now();
        let mut w = StallWatch::new(TIMEOUT);
        let lost = Observation {
            position: None,
            log_end: Some(500),
        };
        assert_eq!(w.observe(0, lost, true, t0), None, "nothing known yet");
        w.observe(0, at(100, 500), true, t0);
        let (changes, _) = report(&mut w, lost, true, t0 + REPORT, 12);
        assert!(
            matches!(changes[..], [Change::Stalled { position: 100, .. }]),
            "{changes:?}"
        );
    }

    #[test]
    fn a_revoked_stalled_partition_stops_counting() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(TIMEOUT);
        report(&mut w, at(0, 10), true, t0, 13);
        assert_eq!(w.stalled(), 1);
        assert_eq!(w.forget(0), Some(Change::Moving { partition: 0 }));
        assert_eq!(w.stalled(), 0);
        assert_eq!(w.forget(0), None);
    }
}

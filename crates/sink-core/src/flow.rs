//! Flow control while the sink is behind: when the loop stops taking
//! messages, and when it pauses the assignment. Pure: the loop feeds it
//! the clock and how many sealed batches wait, and does what it says.
//!
//! "Behind": every write slot is busy and a second sealed batch is waiting.
//! One waiting batch is enough for the next write to start the moment a
//! slot frees, while the open batch fills; more only hold memory. First the
//! loop just stops taking messages (holds): librdkafka's prefetch queue
//! fills up and fetching stops by itself, bounded by
//! `--prefetch-kbytes`, and nothing is dropped. If the sink stays
//! behind past [`HOLD_BEFORE_PAUSE`] (an outage, not a busy sink), the
//! assignment is paused, so that the loop goes back to polling and serves
//! rebalances while it waits. Pausing drops the prefetched messages and
//! refetches them on resume, a fetch round trip: far too slow to do on
//! every busy moment. It resumes once no sealed batch waits.

use std::time::{Duration, Instant};

/// How long the loop may hold (stop taking messages) while the sink is
/// behind before it pauses the assignment to serve rebalances again.
pub const HOLD_BEFORE_PAUSE: Duration = Duration::from_secs(5);

/// Sealed batches that may wait for a write slot before the loop holds.
pub const MAX_SEALED_WAITING: usize = 1;

/// What the loop should do to the assignment's fetching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetching {
    /// Pause every partition it reads.
    Pause,
    /// Resume them.
    Resume,
}

/// Holding and pausing state.
#[derive(Debug, Default)]
pub struct FlowControl {
    /// Since when the loop holds because the sink is behind.
    held_since: Option<Instant>,
    /// Whether the assignment is paused (as far as librdkafka confirmed).
    paused: bool,
}

impl FlowControl {
    /// Updates holding from the sealed batches waiting at `now`; returns
    /// the change to fetching the loop should make, if any. The loop
    /// reports the outcome with [`FlowControl::fetching_set`].
    pub fn update(&mut self, sealed_waiting: usize, now: Instant) -> Option<Fetching> {
        let behind = sealed_waiting > MAX_SEALED_WAITING
            || (self.held_since.is_some() && sealed_waiting > 0);
        self.held_since = match (behind, self.held_since) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(now),
            (false, _) => None,
        };
        let pause = self
            .held_since
            .is_some_and(|since| now >= since + HOLD_BEFORE_PAUSE);
        match (pause, self.paused) {
            (true, false) => Some(Fetching::Pause),
            // Only once nothing waits: resuming refetches what pausing
            // dropped, not worth it for a moment.
            (false, true) if sealed_waiting == 0 => Some(Fetching::Resume),
            _ => None,
        }
    }

    /// librdkafka paused (or resumed) the assignment as asked.
    pub fn fetching_set(&mut self, fetching: Fetching) {
        self.paused = fetching == Fetching::Pause;
    }

    /// Whether the assignment is paused.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Whether the loop holds: the sink is behind.
    pub fn holding(&self) -> bool {
        self.held_since.is_some()
    }

    /// Whether to take messages now: not while holding, unless paused (then
    /// no messages come, and polling serves rebalances).
    pub fn taking(&self) -> bool {
        self.held_since.is_none() || self.paused
    }

    /// When holding turns into a pause, if the loop holds and is not paused
    /// yet: the loop wakes then even if nothing else happens.
    pub fn pause_at(&self) -> Option<Instant> {
        self.held_since
            .filter(|_| !self.paused)
            .map(|since| since + HOLD_BEFORE_PAUSE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `flow` through `waiting` at each time, doing what it asks.
    fn step(flow: &mut FlowControl, waiting: usize, now: Instant) -> Option<Fetching> {
        let change = flow.update(waiting, now);
        if let Some(fetching) = change {
            flow.fetching_set(fetching);
        }
        change
    }

    #[test]
    fn one_waiting_batch_is_not_behind() {
        let t0 = Instant::now();
        let mut flow = FlowControl::default();
        assert_eq!(step(&mut flow, 1, t0), None);
        assert!(flow.taking() && !flow.holding());
        assert_eq!(flow.pause_at(), None);
    }

    #[test]
    fn a_busy_sink_holds_without_pausing() {
        let t0 = Instant::now();
        let mut flow = FlowControl::default();
        assert_eq!(step(&mut flow, 2, t0), None);
        assert!(flow.holding() && !flow.taking(), "holds at once");
        assert_eq!(flow.pause_at(), Some(t0 + HOLD_BEFORE_PAUSE));
        // Still one waiting: holds until none does.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(step(&mut flow, 1, t1), None);
        assert!(flow.holding());
        let t2 = t0 + Duration::from_secs(3);
        assert_eq!(
            step(&mut flow, 0, t2),
            None,
            "never paused: nothing to resume"
        );
        assert!(flow.taking() && !flow.holding());
    }

    #[test]
    fn an_outage_pauses_after_the_hold_and_resumes_once_nothing_waits() {
        let t0 = Instant::now();
        let mut flow = FlowControl::default();
        step(&mut flow, 2, t0);
        let almost = t0 + HOLD_BEFORE_PAUSE - Duration::from_millis(1);
        assert_eq!(step(&mut flow, 2, almost), None);
        assert_eq!(
            step(&mut flow, 2, t0 + HOLD_BEFORE_PAUSE),
            Some(Fetching::Pause)
        );
        assert!(
            flow.paused() && flow.taking(),
            "paused: polling serves rebalances"
        );
        assert_eq!(flow.pause_at(), None);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(step(&mut flow, 2, later), None, "still paused");
        assert_eq!(step(&mut flow, 1, later), None, "not while a batch waits");
        assert_eq!(step(&mut flow, 0, later), Some(Fetching::Resume));
        assert!(!flow.paused() && flow.taking() && !flow.holding());
    }

    #[test]
    fn a_pause_librdkafka_refused_is_asked_again() {
        let t0 = Instant::now();
        let mut flow = FlowControl::default();
        step(&mut flow, 2, t0);
        let at = t0 + HOLD_BEFORE_PAUSE;
        // The loop could not pause: it does not report it set.
        assert_eq!(flow.update(2, at), Some(Fetching::Pause));
        assert!(!flow.paused() && !flow.taking(), "still holding");
        assert_eq!(flow.update(2, at), Some(Fetching::Pause), "asked again");
    }
}

//! Liveness and readiness: what the loop reports, what /healthz and /readyz
//! answer.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lock;

/// Liveness and readiness, shared by the loop and the HTTP endpoint.
#[derive(Debug, Default)]
pub struct Health {
    in_group: AtomicBool,
    sink_ok: AtomicBool,
    /// Writes (to the sink or the dead-letter topic) retrying after a
    /// failure: a probe that finds the sink reachable does not make the
    /// service ready while one of them still fails.
    failing: AtomicUsize,
    /// Partitions that stopped advancing (see [`crate::stall`]).
    stalled: AtomicUsize,
    /// Partitions refused because they start beyond their log's end.
    refused: AtomicUsize,
    /// Partitions this consumer owns: /metrics shows per-partition series
    /// only for these (see [`crate::http`]).
    owned: Mutex<Vec<i32>>,
    /// Liveness: since when work has been pending without anything
    /// completing (`None` while nothing is pending), and how long that may
    /// last.
    stuck_since: Mutex<Option<Instant>>,
    liveness_timeout: std::sync::Mutex<Option<Duration>>,
    /// Woken when the sink turns reachable again, so that writes waiting out
    /// a long backoff retry at once instead of up to a minute later.
    sink_back: tokio::sync::Notify,
}

impl Health {
    /// A fresh, not-yet-ready state.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The consumer joined its group (with or without partitions).
    pub fn set_in_group(&self, value: bool) {
        self.in_group.store(value, Ordering::Relaxed);
    }

    /// The last sink call succeeded.
    pub fn set_sink_ok(&self, value: bool) {
        let was = self.sink_ok.swap(value, Ordering::Relaxed);
        if value && !was {
            self.sink_back.notify_waiters();
        }
    }

    /// Resolves the next time the sink turns reachable (a probe or a write
    /// succeeded after a failure).
    pub async fn sink_back(&self) {
        self.sink_back.notified().await;
    }

    /// The last sink call or probe succeeded.
    pub fn sink_ok(&self) -> bool {
        self.sink_ok.load(Ordering::Relaxed)
    }

    /// A write started failing; the guard marks it recovered when dropped
    /// (it succeeded, or was given up at shutdown).
    pub fn failing(self: &Arc<Self>) -> FailingWrite {
        self.failing.fetch_add(1, Ordering::Relaxed);
        FailingWrite(Arc::clone(self))
    }

    /// The partitions this consumer owns now.
    pub fn set_owned(&self, partitions: Vec<i32>) {
        *lock(&self.owned) = partitions;
    }

    pub(crate) fn owned(&self) -> Vec<i32> {
        lock(&self.owned).clone()
    }

    /// Liveness fails once work has been pending this long with nothing
    /// completing (never, until set).
    pub fn set_liveness_timeout(&self, timeout: Duration) {
        *lock(&self.liveness_timeout) = Some(timeout);
    }

    /// Whether records wait to be written (buffered or in flight). The
    /// liveness clock starts when work appears, not at the last completion.
    pub fn set_pending(&self, pending: bool, now: Instant) {
        let mut since = lock(&self.stuck_since);
        match (pending, *since) {
            (true, None) => *since = Some(now),
            (false, Some(_)) => *since = None,
            _ => {}
        }
    }

    /// A batch completed: the work is moving.
    pub fn batch_done(&self, now: Instant) {
        let mut since = lock(&self.stuck_since);
        if since.is_some() {
            *since = Some(now);
        }
    }

    /// Alive unless work has been pending past the liveness timeout with
    /// nothing completing: a loop or a write stuck for good, which a
    /// restart clears.
    pub fn live_at(&self, now: Instant) -> bool {
        let timeout = *lock(&self.liveness_timeout);
        let since = *lock(&self.stuck_since);
        match (timeout, since) {
            (Some(timeout), Some(since)) => now.saturating_duration_since(since) < timeout,
            _ => true,
        }
    }

    /// How many assigned partitions are refused.
    pub fn set_refused(&self, partitions: usize) {
        self.refused.store(partitions, Ordering::Relaxed);
    }

    /// How many assigned partitions are stalled.
    pub fn set_stalled(&self, partitions: usize) {
        self.stalled.store(partitions, Ordering::Relaxed);
    }

    /// Ready to do work: in the group, the sink reachable, no write
    /// failing, and no partition stalled or refused.
    pub fn ready(&self) -> bool {
        self.in_group.load(Ordering::Relaxed)
            && self.sink_ok.load(Ordering::Relaxed)
            && self.failing.load(Ordering::Relaxed) == 0
            && self.stalled.load(Ordering::Relaxed) == 0
            && self.refused.load(Ordering::Relaxed) == 0
    }
}

/// A write retrying after a failure (see [`Health::failing`]).
#[derive(Debug)]
pub struct FailingWrite(Arc<Health>);

impl Drop for FailingWrite {
    fn drop(&mut self) {
        self.0.failing.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_write_keeps_readiness_false_whatever_the_probe_finds() {
        let health = Health::new();
        health.set_in_group(true);
        health.set_sink_ok(true);
        assert!(health.ready());
        let dead_letter = health.failing();
        let write = health.failing();
        // The probe of the sink itself succeeds (the dead-letter topic, or
        // a key of the wrong type, is what fails).
        health.set_sink_ok(true);
        assert!(!health.ready());
        drop(dead_letter);
        assert!(!health.ready(), "one write still fails");
        drop(write);
        assert!(health.ready());
    }

    #[test]
    fn liveness_fails_only_when_pending_work_stops_moving() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(300);
        let h = Health::default();
        h.set_pending(true, t0);
        assert!(h.live_at(t0 + 2 * timeout), "no timeout set: always live");
        h.set_liveness_timeout(timeout);
        assert!(!h.live_at(t0 + timeout), "pending, nothing done");
        h.batch_done(t0 + timeout - Duration::from_secs(1));
        assert!(h.live_at(t0 + timeout), "a batch just completed");
        h.set_pending(true, t0 + timeout);
        assert!(
            !h.live_at(t0 + 2 * timeout),
            "still pending: the clock runs from the last completion"
        );
        h.set_pending(false, t0 + 2 * timeout);
        assert!(h.live_at(t0 + 10 * timeout), "idle is alive");
        h.set_pending(true, t0 + 10 * timeout);
        assert!(
            h.live_at(t0 + 10 * timeout + Duration::from_secs(1)),
            "the clock starts when work appears"
        );
    }
}

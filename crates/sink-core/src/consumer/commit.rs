//! Commits: what rebalances and finished batches decided is applied at the
//! end of each turn of the loop (drop revoked records, seek where the sink
//! stands, commit what is acknowledged), and once more at shutdown. Two
//! commits happen in the rebalance callbacks instead ([`super::assignment`]):
//! a revoke commits what its partitions acknowledged before letting go, and
//! an operator's reset commits where refused partitions start again.

use super::*;

impl<S: Sink> Loop<S> {
    /// Drops the buffered records of partitions revoked since the last call.
    pub(super) fn purge_revoked(&mut self) {
        let revoked = self.shared.tracker().take_revoked();
        for partition in revoked {
            self.batcher.purge(partition);
        }
    }

    /// Applies what rebalances and completed batches decided: drops records of
    /// revoked partitions, seeks where the sink stands, commits.
    ///
    /// Only called when every record received so far is in the batcher:
    /// a seek purges its partition there, and the fetcher starts again at
    /// the seek's offset. A record received before the seek but taken
    /// after it would escape the purge and become the first record after
    /// the seek: the records between the seek's offset and it would then
    /// be dropped as stale when fetched again, and never written.
    pub(super) fn after_step(&mut self) {
        self.purge_revoked();
        let (seeks, commits) = {
            let mut tracker = self.shared.tracker();
            let commits = tracker.take_commits();
            (
                tracker.take_seeks(),
                commit_list(&self.topic, &commits, &tracker),
            )
        };
        for (partition, offset) in seeks {
            self.batcher.purge(partition);
            tracing::info!(
                partition,
                offset,
                "the sink already holds records up to this offset; resuming there"
            );
            self.shared.tracker().seeking(partition, offset);
            // Bounded wait: the position may only move once the fetcher did.
            let seek = || {
                self.consumer
                    .seek(&self.topic, partition, Offset::Offset(offset), SEEK_TIMEOUT)
            };
            match blocking(seek) {
                Ok(()) => self.shared.tracker().moved_to(partition, offset),
                Err(err) => tracing::warn!(
                    %err, partition, offset,
                    "seek failed; the sink refuses the records fetched meanwhile and asks again"
                ),
            }
        }
        if commits.count() > 0 {
            if let Err(err) = self.consumer.commit(&commits, CommitMode::Async) {
                tracing::warn!(%err, "cannot send offset commit");
            }
        }
    }

    /// Shutdown: writes what was fetched, within the deadline, and commits it
    /// synchronously. Returns what was left unwritten.
    pub(super) async fn drain(&mut self, timeout: Duration) -> Leftover {
        let deadline = tokio::time::Instant::now() + timeout;
        // A rebalance may have run in the last recv(): purge before sealing.
        self.after_step();
        self.batcher.seal();
        while !self.tasks.is_empty() || self.batcher.has_sealed() {
            self.dispatch();
            tokio::select! {
                joined = self.tasks.join_next() => {
                    if let Some(Err(err)) = joined {
                        tracing::error!(%err, "a batch task failed during shutdown");
                    }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
            self.after_step();
        }
        let unfinished = self.tasks.len();
        self.tasks.abort_all();
        // Until they are gone: one may hold a handle on the consumer (a
        // staged write being recorded), and closing it must be this
        // task's, not theirs. Bounded: an aborted task ends at its next
        // await, or once a blocking commit returns.
        let _ = tokio::time::timeout(EXIT_RESERVE, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        let commits = {
            let mut tracker = self.shared.tracker();
            let commits = tracker.take_commits();
            commit_list(&self.topic, &commits, &tracker)
        };
        if commits.count() > 0 {
            // Async: a synchronous commit would hold this thread for as
            // long as the broker takes to answer, past the deadline.
            // Closing the consumer waits for it, within the deadline.
            if let Err(err) = self.consumer.commit(&commits, CommitMode::Async) {
                tracing::warn!(%err, "final commit failed; the next owner re-reads the last batches");
            }
        }
        Leftover {
            buffered: self.batcher.buffered(),
            batches: unfinished,
        }
    }
}

//! Assignments: where each partition starts, refusing those that cannot
//! start where they stand (see [`crate::starts`]), resets the operator asked
//! for, revokes (drain, then commit), and the stall watch fed by
//! librdkafka's statistics. Runs in librdkafka's callbacks, inside the
//! loop's `recv()`, except the periodic re-check of refused partitions.

use super::*;

impl<S: Sink> ClientContext for LoopContext<S> {
    fn stats(&self, statistics: Statistics) {
        m::record_statistics(&statistics);
        self.watch_stalls(&statistics);
    }
}

impl<S: Sink> ConsumerContext for LoopContext<S> {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let refused = self.on_assign(consumer, &partitions, tpl);
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                // A pause set by the application survives revoke and
                // re-assign in librdkafka; the loop treats a new assignment
                // as unpaused, so make it so (it pauses again if needed).
                // Refused partitions stay paused: nothing of them is read.
                let refused: Vec<(i32, i64)> = refused.iter().map(|p| (*p, 0)).collect();
                assigned
                    .and_then(|()| consumer.resume(tpl))
                    .and_then(|()| consumer.pause(&offsets_list(&self.topic, &refused)))
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.on_revoke(consumer, &partitions);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed; dropping the assignment");
                // Like a lost assignment: nothing of it may be committed.
                let staging = lock(&self.shared.staging);
                let mut tracker = self.shared.tracker();
                let assigned = tracker.assigned();
                for partition in &assigned {
                    tracker.revoke(*partition);
                }
                drop(tracker);
                drop(staging);
                self.forget_stalls(&assigned);
                let refused: Vec<i32> = lock(&self.shared.refused).iter().copied().collect();
                self.forget_refused(&refused);
                self.health.set_owned(Vec::new());
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
        };
        self.shared.rebalances.fetch_add(1, Ordering::Relaxed);
        if let Err(err) = result {
            tracing::error!(%err, "cannot apply the new assignment");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(err) = result {
            // Not fatal: the next commit carries a later offset, and anything
            // uncommitted is re-delivered (the sink copes with replays).
            tracing::warn!(%err, offsets = ?offsets.to_topic_map(), "offset commit failed");
        }
    }
}

impl<S: Sink> LoopContext<S> {
    /// Feeds the stall watch with where each assigned partition stands and
    /// where its log ends, and reports what changed.
    pub(super) fn watch_stalls(&self, statistics: &Statistics) {
        let Some(topic_stats) = statistics.topics.get(&*self.topic) else {
            return;
        };
        let reading = self.shared.tracker().reading();
        let taking = self.shared.taking.load(Ordering::Relaxed);
        let now = Instant::now();
        let mut stalls = lock(&self.shared.stalls);
        for partition in reading {
            let Some(p) = topic_stats.partitions.get(&partition) else {
                continue;
            };
            // librdkafka's fetch position: past transaction markers, which
            // never reach the loop; unknown (negative) while it looks up
            // where to start, whatever state it is stuck in.
            let log_end = [p.ls_offset, p.hi_offset].into_iter().find(|o| *o >= 0);
            let seen = Observation {
                position: (p.next_offset >= 0).then_some(p.next_offset),
                log_end,
            };
            if let Some(change) = stalls.observe(partition, seen, taking, now) {
                self.report_stall(change);
            }
        }
        self.health.set_stalled(stalls.stalled());
    }

    /// Stops watching revoked partitions.
    pub(super) fn forget_stalls(&self, partitions: &[i32]) {
        let mut stalls = lock(&self.shared.stalls);
        for partition in partitions {
            if let Some(change) = stalls.forget(*partition) {
                self.report_stall(change);
            }
        }
        self.health.set_stalled(stalls.stalled());
    }

    pub(super) fn report_stall(&self, change: Change) {
        let (partition, stalled) = match change {
            Change::Stalled {
                partition,
                position,
                log_end,
                for_,
            } => {
                let last_error = lock(&self.shared.last_error).clone();
                tracing::error!(
                    topic = %self.topic,
                    partition,
                    offset = position,
                    log_end,
                    stalled_secs = for_.as_secs(),
                    last_consumer_error = last_error.as_deref().unwrap_or("none"),
                    "partition stopped advancing: the records from this offset cannot be \
                     read (a corrupt or undecodable record batch, a broker refusing fetches); \
                     nothing past it is committed. See the last consumer error and the broker's log"
                );
                (partition, 1.0)
            }
            Change::Moving { partition } => {
                tracing::info!(topic = %self.topic, partition, "partition advancing again");
                (partition, 0.0)
            }
        };
        metrics::gauge!(m::PARTITION_STALLED, "topic" => self.topic.to_string(), "partition" => partition.to_string())
            .set(stalled);
    }

    /// Decides where each assigned partition starts: where the sink says it
    /// stands, else Kafka's committed offset. A start beyond the log's end
    /// is refused (or reset, if the operator said so). Returns the refused
    /// partitions, which the caller keeps paused.
    pub(super) fn on_assign(
        &self,
        consumer: &BaseConsumer<Self>,
        partitions: &[i32],
        tpl: &mut TopicPartitionList,
    ) -> Vec<i32> {
        let closing = self.shared.closing.load(Ordering::Relaxed);
        let stored = if closing || partitions.is_empty() {
            None
        } else {
            let lookup = self.sink.stored_offsets(&self.topic, partitions);
            match block_on(async { tokio::time::timeout(STORED_OFFSETS_TIMEOUT, lookup).await }) {
                Some(Ok(Ok(offsets))) if offsets.len() == partitions.len() => Some(offsets),
                Some(Ok(Ok(_))) => {
                    tracing::error!(
                        "sink returned stored offsets for the wrong number of partitions"
                    );
                    None
                }
                Some(Ok(Err(err))) => {
                    tracing::warn!(error = %err, "cannot read the sink's stored offsets; starting from Kafka's");
                    None
                }
                Some(Err(_)) => {
                    tracing::warn!(
                        "the sink's stored offsets took too long; starting from Kafka's"
                    );
                    None
                }
                None => None,
            }
        };
        let mut starts: Vec<Option<i64>> = stored.unwrap_or_else(|| vec![None; partitions.len()]);
        let mut refused = Vec::new();
        let mut staged = Vec::new();
        let mut never_committed = Vec::new();
        if !closing {
            // Broker round trips: off the runtime's worker, as the drain.
            let checked = blocking(|| {
                starts::check(consumer, &self.topic, partitions, &mut starts, &mut staged)
            });
            never_committed = checked.never_committed;
            let (reset, refuse) = self.reset_or_refuse(consumer, checked.beyond);
            for (partition, offset) in reset {
                if let Some(i) = partitions.iter().position(|p| *p == partition) {
                    starts[i] = Some(offset);
                }
            }
            refused = refuse;
        }
        for s in &staged {
            tracing::info!(
                partition = s.partition,
                offset = s.first,
                next = s.staged.next,
                token = %s.staged.token,
                "the last commit records a staged write: the sink publishes it, if it was not, before writing on"
            );
        }
        if !closing {
            self.sink.assigned(&self.topic, partitions, &staged);
        }
        let mut tracker = self.shared.tracker();
        for (partition, start) in partitions.iter().zip(&starts) {
            if refused.contains(partition) {
                continue;
            }
            let offset = match start {
                Some(offset) => Some(Offset::Offset(*offset)),
                None if never_committed.contains(partition) => self.never_committed_start,
                None => None,
            };
            if let Some(offset) = offset {
                if let Err(err) = tpl.set_partition_offset(&self.topic, *partition, offset) {
                    tracing::error!(%err, partition, "cannot set the start offset");
                }
            }
            tracker.assign(*partition, *start);
        }
        drop(tracker);
        lock(&self.shared.refused).extend(&refused);
        self.publish_refused(&refused, 1.0);
        let owned = self.set_owned();
        self.health.set_in_group(true);
        // Incremental rebalances assign only what changes owner: say what
        // this replica owns too (last, so the line ends with it).
        tracing::info!(
            topic = %self.topic,
            added = ?partitions,
            // Started where auto.offset.reset says: what a new group
            // replays, or skips, comes from here.
            ?never_committed,
            ?owned,
            "partitions assigned"
        );
        refused
    }

    /// Partitions whose start lies beyond the log's end: reset where the
    /// operator said (the sink told first), or refused with an error.
    /// Returns (partition, new start) for the reset ones, and the refused.
    pub(super) fn reset_or_refuse<K: Consumer<Self>>(
        &self,
        consumer: &K,
        beyond: Vec<BeyondLogEnd>,
    ) -> (Vec<(i32, i64)>, Vec<i32>) {
        let Some(reset_to) = self.reset_to else {
            for b in &beyond {
                tracing::error!(
                    topic = %self.topic,
                    partition = b.partition,
                    stored_offset = b.start,
                    log_start = b.log_start,
                    log_end = b.log_end,
                    "partition refused: where it stands (the sink's or Kafka's stored offset) lies \
                     beyond the end of its log, so the log is not the one it was read from (the \
                     topic was recreated, an unclean leader election truncated it, a failover to a \
                     mirror). Nothing of it is read or committed. Restart with \
                     --reset-offsets-beyond-log-end earliest (a recreated topic: every record is \
                     new) or latest (a truncated log: what it holds below its end was written), \
                     then remove the flag"
                );
            }
            return (Vec::new(), beyond.iter().map(|b| b.partition).collect());
        };
        if beyond.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let resets: Vec<(i32, i64, i64)> = beyond
            .iter()
            .map(|b| {
                let to = match reset_to {
                    ResetTo::Earliest => b.log_start,
                    ResetTo::Latest => b.log_end,
                };
                tracing::warn!(
                    topic = %self.topic,
                    partition = b.partition,
                    stored_offset = b.start,
                    reset_to = to,
                    "stored offset beyond the log's end: resetting as --reset-offsets-beyond-log-end says"
                );
                (b.partition, b.start, to)
            })
            .collect();
        let all: Vec<i32> = resets.iter().map(|(p, _, _)| *p).collect();
        let reset = self.sink.reset_stored_offsets(&self.topic, &resets);
        match block_on(async { tokio::time::timeout(STORED_OFFSETS_TIMEOUT, reset).await }) {
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(err))) => {
                tracing::error!(error = %err, partitions = ?all, "cannot reset the sink's stored offsets: refusing those partitions (checked again every 30 s)");
                return (Vec::new(), all);
            }
            Some(Err(_)) | None => {
                tracing::error!(partitions = ?all, "resetting the sink's stored offsets took too long: refusing those partitions (checked again every 30 s)");
                return (Vec::new(), all);
            }
        }
        // Kafka's committed offsets too: a later owner that cannot read the
        // sink's starts from them, and must not find them beyond the end.
        let moved: Vec<(i32, i64)> = resets.iter().map(|(p, _, to)| (*p, *to)).collect();
        if let Err(err) = consumer.commit(&offsets_list(&self.topic, &moved), CommitMode::Sync) {
            tracing::warn!(%err, "cannot commit the reset offsets; the sink holds them");
        }
        (moved, Vec::new())
    }

    /// Sets `sink_partition_refused` of `partitions` and readiness.
    pub(super) fn publish_refused(&self, partitions: &[i32], value: f64) {
        for partition in partitions {
            metrics::gauge!(m::PARTITION_REFUSED, "topic" => self.topic.to_string(), "partition" => partition.to_string())
                .set(value);
        }
        self.health.set_refused(lock(&self.shared.refused).len());
    }

    /// Stops refusing partitions that are no longer ours.
    pub(super) fn forget_refused(&self, partitions: &[i32]) {
        let mut refused = lock(&self.shared.refused);
        let gone: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| refused.remove(p))
            .collect();
        drop(refused);
        self.publish_refused(&gone, 0.0);
    }

    /// /metrics shows per-partition series of the partitions this consumer
    /// owns: those it reads and those it refuses. Returns them.
    pub(super) fn set_owned(&self) -> Vec<i32> {
        let mut owned = self.shared.tracker().assigned();
        owned.extend(lock(&self.shared.refused).iter());
        owned.sort_unstable();
        owned.dedup();
        self.health.set_owned(owned.clone());
        owned
    }

    pub(super) fn on_revoke(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) {
        let lost = consumer.assignment_lost();
        if !lost && !self.shared.closing.load(Ordering::Relaxed) {
            self.drain(partitions);
        }
        let commits = {
            // A staged write being recorded finishes first (writer.rs).
            let _staging = lock(&self.shared.staging);
            let mut tracker = self.shared.tracker();
            let acked: Vec<(i32, i64)> = partitions
                .iter()
                .filter_map(|p| tracker.acked(*p).map(|offset| (*p, offset)))
                .collect();
            // With the record of a staged write still being published.
            let commits = commit_list(&self.topic, &acked, &tracker);
            for partition in partitions {
                tracker.revoke(*partition);
            }
            commits
        };
        // Listed before the refusals are forgotten: they mark what they say.
        self.forget_stalls(partitions);
        self.forget_refused(partitions);
        let owned = self.set_owned();
        // After a lost assignment the partitions already belong to others:
        // a commit now would be refused, and must not win if it were not.
        if !lost && commits.count() > 0 {
            if let Err(err) = consumer.commit(&commits, CommitMode::Sync) {
                tracing::warn!(%err, "commit on revoke failed; the next owner re-reads those records");
            }
        }
        tracing::info!(topic = %self.topic, revoked = ?partitions, lost, ?owned, "partitions revoked");
    }

    /// Waits, up to the drain timeout, for batches holding revoked partitions.
    /// They run on other tasks; this thread is only parked.
    pub(super) fn drain(&self, partitions: &[i32]) {
        let deadline = Instant::now() + self.drain_timeout;
        let mut tracker = self.shared.tracker();
        while tracker.in_flight(partitions) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                tracing::warn!(?partitions, "in-flight batches did not finish before the drain deadline; the next owner re-reads them");
                return;
            };
            tracker = match block_in_place(|| self.shared.batch_done.wait_timeout(tracker, left)) {
                Some(Ok((guard, _))) => guard,
                Some(Err(poisoned)) => poisoned.into_inner().0,
                None => return,
            };
        }
    }
}

impl<S: Sink> Loop<S> {
    /// Tries the reset of partitions refused at assignment again, and
    /// starts those it moved. Only a reset starts a refused partition: one
    /// whose log has meanwhile grown past its stored offset would otherwise
    /// skip the records between the old end and that offset without a
    /// word. Partitions whose log went back while read stay refused until
    /// a restart (the operator reads the error first).
    pub(super) async fn recheck_refused(&mut self) {
        self.refused_checked_at = Instant::now();
        // Those refused at assignment: the tracker holds the ones whose log
        // went back while read.
        let read_before = self.shared.tracker().assigned();
        let refused: Vec<i32> = lock(&self.shared.refused)
            .iter()
            .copied()
            .filter(|p| !read_before.contains(p))
            .collect();
        if refused.is_empty() {
            return;
        }
        let lookup = self.sink.stored_offsets(&self.topic, &refused);
        let mut starts = match tokio::time::timeout(STORED_OFFSETS_TIMEOUT, lookup).await {
            Ok(Ok(starts)) if starts.len() == refused.len() => starts,
            _ => return, // the sink cannot say: still refused, next time
        };
        let consumer: &StreamConsumer<_> = &self.consumer;
        // A refused log is not the one read from: what its commits record
        // means nothing for it.
        let mut staged = Vec::new();
        let checked =
            blocking(|| starts::check(consumer, &self.topic, &refused, &mut starts, &mut staged));
        let (reset, still) = consumer.context().reset_or_refuse(consumer, checked.beyond);
        for partition in refused.iter().filter(|p| !still.contains(p)) {
            if !reset.iter().any(|(p, _)| p == partition) {
                tracing::error!(
                    topic = %self.topic,
                    partition,
                    "a refused partition's log has grown past its stored offset: the records \
                     between the old end and it were never read. Still refused; check what the \
                     log holds before restarting, which starts it at the stored offset"
                );
            }
        }
        let mut started = Vec::new();
        for (partition, offset) in reset {
            let seek = || {
                self.consumer
                    .seek(&self.topic, partition, Offset::Offset(offset), SEEK_TIMEOUT)
            };
            if let Err(err) = blocking(seek) {
                tracing::warn!(%err, partition, offset, "cannot seek a partition just reset; tried again later");
                continue;
            }
            self.shared.tracker().assign(partition, Some(offset));
            started.push((partition, 0));
        }
        if started.is_empty() {
            return;
        }
        let partitions: Vec<i32> = started.iter().map(|(p, _)| *p).collect();
        let context = self.consumer.context();
        context.forget_refused(&partitions);
        context.set_owned();
        let tpl = offsets_list(&self.topic, &started);
        // Paused with the rest while the loop is paused; resumed with it.
        let resumed = if self.flow.paused() {
            Ok(())
        } else {
            self.consumer.resume(&tpl)
        };
        match resumed {
            Ok(()) => {
                tracing::info!(topic = %self.topic, ?partitions, "partitions no longer refused: reading them")
            }
            Err(err) => tracing::warn!(%err, "cannot resume partitions no longer refused"),
        }
    }
}

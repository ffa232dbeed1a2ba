//! A staged write ([`crate::sink::WriteOutcome::staged`]) after its batch's
//! dead letters are accepted: recorded in Kafka's commit metadata of the
//! batch's partitions, then published, each retried until done; and the
//! check that the broker keeps what is recorded.

use super::*;

/// A staged write of a batch ([`crate::sink::WriteOutcome::staged`]), to be
/// recorded in Kafka's commit metadata of `ranges` and then published.
pub(super) struct StagedWrite<'a> {
    pub(super) topic: &'a str,
    pub(super) ranges: &'a [PartitionRange],
    pub(super) token: &'a str,
    pub(super) batch_id: BatchId,
}

impl StagedWrite<'_> {
    /// Records the write, then publishes it. Returns where the partitions
    /// resume when nothing of it became visible (their records are written
    /// again); none when it did.
    ///
    /// The record is a commit of each partition's first offset (what was
    /// committed already) carrying the write's name: a later owner finds it
    /// and publishes the write itself instead of writing the records again
    /// ([`Sink::assigned`]). The commit is made only while this batch still
    /// holds its partitions, under the lock a revoke takes before letting
    /// them go: the commit carries the generation that owns them, so a new
    /// owner, which reads its start after it joined, sees it or it was
    /// refused. A write never recorded is never published: a zombie's write
    /// stays invisible.
    pub(super) async fn finish<S: Sink>(
        &self,
        sink: &S,
        shared: &Shared,
        health: &Arc<Health>,
        consumer: &Weak<StreamConsumer<LoopContext<S>>>,
    ) -> Vec<(i32, i64)> {
        // Nothing of the write is visible: the partitions resume where
        // they were (or where the sink said they do).
        let unwritten = |elsewhere: &[(i32, i64)]| {
            self.ranges
                .iter()
                .map(|r| {
                    elsewhere
                        .iter()
                        .find(|(p, _)| *p == r.partition)
                        .copied()
                        .unwrap_or((r.partition, r.first))
                })
                .collect()
        };
        let partitions: Vec<i32> = self.ranges.iter().map(|r| r.partition).collect();
        let recorded = retry::until_ok(
            "record_staged_write",
            || std::future::ready(self.record(shared, consumer, &partitions)),
            health,
        )
        .await;
        match recorded {
            Stage::Ready => self.check_metadata_kept(shared, consumer),
            Stage::Elsewhere(elsewhere) => {
                tracing::warn!(
                    ?elsewhere,
                    "a staged write holds records fetched where the partition was not to resume \
                     (a seek failed): it is abandoned, never visible, and the partition resumes \
                     where it should"
                );
                return unwritten(&elsewhere);
            }
            // `record` retries while it would be `Wait`: only `Lost` comes here.
            Stage::Lost | Stage::Wait => {
                tracing::info!(
                    ?partitions,
                    "partitions revoked before their staged write was recorded: it is abandoned, \
                     never visible, and their next owner writes those records"
                );
                return unwritten(&[]);
            }
        }
        if retry::until_ok("publish_staged_write", || sink.publish(self.token), health).await {
            Vec::new()
        } else {
            tracing::warn!(
                token = self.token,
                ?partitions,
                "the staged write cannot be published (it is gone): writing its records again"
            );
            unwritten(&[])
        }
    }

    /// One attempt to record: `Ready` once recorded, `Lost` or `Elsewhere`
    /// when it must not be (see [`Stage`]).
    fn record<S: Sink>(
        &self,
        shared: &Shared,
        consumer: &Weak<StreamConsumer<LoopContext<S>>>,
        partitions: &[i32],
    ) -> Result<Stage, SinkError> {
        // Taken before the lock, hence dropped after it: the last handle of
        // a closing consumer closes it, which runs a revoke, which takes
        // the lock.
        let Some(consumer) = consumer.upgrade() else {
            return Ok(Stage::Lost);
        };
        let _staging = lock(&shared.staging);
        match shared.tracker().stage_ready(self.batch_id, partitions) {
            Stage::Ready => {}
            Stage::Wait => {
                return Err(SinkError::transient(
                    "earlier_batch_unfinished",
                    anyhow::anyhow!("an earlier batch of these partitions is still being written"),
                ))
            }
            other => return Ok(other),
        }
        let records = self.records();
        let mut offsets = TopicPartitionList::new();
        for (partition, offset, metadata) in &records {
            let mut entry = offsets.add_partition(self.topic, *partition);
            entry
                .set_offset(Offset::Offset(*offset))
                .map_err(|err| SinkError::transient("record_staged_write", err))?;
            entry.set_metadata(metadata);
        }
        if let Err(err) = blocking(|| consumer.commit(&offsets, CommitMode::Sync)) {
            // Only the answer may be lost: a record that landed must be
            // known, so that a revoke's commit keeps it.
            if read_back(&consumer, self.topic, &records) != Some(true) {
                return Err(SinkError::transient(
                    "record_staged_write",
                    anyhow::anyhow!(
                        "cannot record the staged write in Kafka's commit metadata: {err}"
                    ),
                ));
            }
        }
        shared.tracker().note_recorded(self.batch_id, &records);
        Ok(Stage::Ready)
    }

    /// What recording the write commits: `(partition, offset, metadata)`.
    fn records(&self) -> Vec<(i32, i64, String)> {
        self.ranges
            .iter()
            .map(|r| {
                let staged = Staged {
                    next: r.next,
                    token: self.token.to_owned(),
                };
                (r.partition, r.first, staged.to_metadata())
            })
            .collect()
    }

    /// Reads the first record back once: a broker that does not keep
    /// commit metadata (tansu 0.6.0) loses every record, and what they
    /// protect against silently becomes at least once. Said loudly.
    fn check_metadata_kept<S: Sink>(
        &self,
        shared: &Shared,
        consumer: &Weak<StreamConsumer<LoopContext<S>>>,
    ) {
        if shared.metadata_checked.load(Ordering::Relaxed) {
            return;
        }
        let Some(consumer) = consumer.upgrade() else {
            return;
        };
        match read_back(&consumer, self.topic, &self.records()) {
            Some(true) => {}
            Some(false) => tracing::error!(
                "the broker does not keep commit metadata, where staged writes are recorded: a \
                 batch whose publication's outcome is lost (a crash, a lost reply) cannot be \
                 found, and is written again: at least once, not exactly once. Use a broker \
                 that keeps it (Apache Kafka, Confluent, MSK, Redpanda; not tansu 0.6.0)"
            ),
            // Asked again after the next record.
            None => return,
        }
        shared.metadata_checked.store(true, Ordering::Relaxed);
    }
}

/// Whether Kafka's commits of `records`' partitions carry their metadata;
/// `None` when they cannot be read.
fn read_back<S: Sink>(
    consumer: &StreamConsumer<LoopContext<S>>,
    topic: &str,
    records: &[(i32, i64, String)],
) -> Option<bool> {
    let offsets: Vec<(i32, i64)> = records.iter().map(|(p, o, _)| (*p, *o)).collect();
    let lookup = || consumer.committed_offsets(offsets_list(topic, &offsets), SEEK_TIMEOUT);
    match blocking(lookup) {
        Ok(committed) => Some(records.iter().all(|(partition, offset, metadata)| {
            committed
                .find_partition(topic, *partition)
                .is_some_and(|e| e.offset() == Offset::Offset(*offset) && e.metadata() == metadata)
        })),
        Err(err) => {
            tracing::warn!(%err, "cannot read back the record of a staged write");
            None
        }
    }
}

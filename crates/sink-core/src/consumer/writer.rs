//! The writer side: one task per batch (its dead letters and the sink
//! write, one after the other or side by side as the sink says, then the
//! sink's rejections, then a staged write recorded and published, each
//! retried until done, then the batch acknowledged), and the readiness
//! probe while no write says anything.

use super::*;

/// Probes the sink for readiness while no write says anything about it.
pub(super) async fn probe_sink<S: Sink>(sink: Arc<S>, shared: Arc<Shared>, health: Arc<Health>) {
    // Probe at start; afterwards only in rounds without a write, whose
    // outcome already sets readiness.
    let mut writes_seen = None;
    // While the sink is down, probes run every second but warn every 10 s.
    let mut warned_at: Option<Instant> = None;
    loop {
        let writes = shared.writes.load(Ordering::Relaxed);
        if writes_seen.is_none_or(|seen| seen == writes) {
            match sink.check().await {
                Ok(()) => {
                    health.set_sink_ok(true);
                    warned_at = None;
                }
                Err(err) => {
                    health.set_sink_ok(false);
                    if warned_at.is_none_or(|at| at.elapsed() >= CHECK_INTERVAL) {
                        tracing::warn!(error = %err, "sink is not reachable");
                        warned_at = Some(Instant::now());
                    }
                }
            }
        }
        writes_seen = Some(writes);
        let interval = if health.sink_ok() {
            CHECK_INTERVAL
        } else {
            DOWN_CHECK_INTERVAL
        };
        tokio::time::sleep(interval).await;
    }
}

/// Writes one batch: its dead letters and the sink write (the letters
/// first if the sink says so: [`Sink::dead_letters_first`]), then the
/// sink's own rejections. Retries until each step succeeds, then
/// acknowledges the batch.
pub(super) async fn write_batch<S: Sink>(
    sink: Arc<S>,
    dlq: Arc<DeadLetters>,
    shared: Arc<Shared>,
    health: Arc<Health>,
    consumer: Weak<StreamConsumer<LoopContext<S>>>,
    batch_id: BatchId,
    work: Work<S::Item>,
) {
    let started = Instant::now();
    let letters: Vec<(&Record, &Rejection)> =
        work.dead_letters.iter().map(|(r, why)| (r, why)).collect();
    let send_letters = async {
        if !letters.is_empty() {
            retry::until_ok("dead_letter", || dlq.send(&letters), &health).await;
        }
    };
    let write = retry::until_ok(
        "write",
        || {
            shared.writes.fetch_add(1, Ordering::Relaxed);
            sink.write(&work.batch)
        },
        &health,
    );
    let mut outcome = if sink.dead_letters_first() {
        send_letters.await;
        write.await
    } else {
        tokio::join!(send_letters, write).1
    };
    health.set_sink_ok(true);
    if !outcome.rejected.is_empty() {
        let letters: Vec<(&Record, &Rejection)> = outcome
            .rejected
            .iter()
            .filter_map(|(index, why)| {
                let entry = work.batch.entries.get(*index);
                if entry.is_none() {
                    tracing::error!(index, reason = %why.reason, "the sink rejected an entry that is not in the batch (a sink bug)");
                } else if !sink.rejects_at_write() {
                    tracing::error!(index, reason = %why.reason, "the sink rejected an entry although it says it never does (a sink bug): its payload was freed at decode, so its dead letter carries only where it came from");
                }
                entry.map(|e| (&e.record, why))
            })
            .collect();
        retry::until_ok("dead_letter", || dlq.send(&letters), &health).await;
    }
    // After every dead letter of the batch is accepted: once published, the
    // batch is done for any later owner too.
    if let Some(token) = outcome.staged.take() {
        let ranges: Vec<PartitionRange> = work
            .batch
            .ranges
            .iter()
            .filter(|r| {
                !outcome
                    .already_applied
                    .iter()
                    .any(|(p, _)| *p == r.partition)
            })
            .copied()
            .collect();
        let staged = staged::StagedWrite {
            topic: &work.batch.topic,
            ranges: &ranges,
            token: &token,
            batch_id,
        };
        let unwritten = staged
            .finish(sink.as_ref(), &shared, &health, &consumer)
            .await;
        outcome.already_applied.extend(unwritten);
    }
    // Counted here, not where the loop seeks: a refused batch of a partition
    // this consumer has lost meanwhile (a stale consumer) needs no seek, but
    // is exactly what an operator wants to see counted.
    for (partition, stored) in &outcome.already_applied {
        metrics::counter!(m::ALREADY_APPLIED, "topic" => work.batch.topic.to_string()).increment(1);
        tracing::info!(
            partition,
            stored,
            "the sink already holds this batch's records: not applied again"
        );
    }
    metrics::counter!(m::BATCHES, "topic" => work.batch.topic.to_string()).increment(1);
    metrics::histogram!(m::BATCH_DURATION).record(started.elapsed().as_secs_f64());
    metrics::histogram!(m::BATCH_EVENTS).record(work.len() as f64);
    shared.acknowledge(batch_id, &outcome.already_applied);
    health.batch_done(Instant::now());
}

/// The writer's timing on tokio's paused clock: minutes of outage pass in
/// no time, and every wait is exact.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::batch::BatchLimits;
    use crate::config::{try_parse_args_from, ServiceDefaults};
    use crate::sink::{Batch, SinkError, WriteOutcome};

    /// A sink that is down (writes and probes fail) while `down` is set.
    #[derive(Default)]
    struct Outage {
        down: AtomicBool,
        writes: AtomicUsize,
        probes: AtomicUsize,
    }

    impl Outage {
        fn result(&self) -> Result<(), SinkError> {
            if self.down.load(Ordering::SeqCst) {
                Err(SinkError::unavailable("down", anyhow::anyhow!("down")))
            } else {
                Ok(())
            }
        }
    }

    impl Sink for Outage {
        type Item = ();

        fn decode(&self, _record: &Record) -> Result<(), Rejection> {
            Ok(())
        }

        async fn write(&self, _batch: &Batch<()>) -> Result<WriteOutcome, SinkError> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.result().map(|()| WriteOutcome::default())
        }

        async fn check(&self) -> Result<(), SinkError> {
            self.probes.fetch_add(1, Ordering::SeqCst);
            self.result()
        }
    }

    /// Dead letters to a broker nobody listens on (the batches here have
    /// none, so nothing is ever sent).
    fn dead_letters() -> Arc<DeadLetters> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            consumer: ConsumerArgs,
        }
        let defaults = ServiceDefaults {
            topic: "t",
            group_id: "g",
            batch_max_events: 10,
            batch_max_bytes: 1 << 20,
            batch_linger_ms: 10,
            prefetch_kbytes: 4_096,
        };
        let argv = ["svc", "--bootstrap-servers", "127.0.0.1:9"];
        let args = try_parse_args_from::<Cli, _, _>(&defaults, argv)
            .unwrap()
            .consumer;
        Arc::new(DeadLetters::new(&args).unwrap())
    }

    /// Offsets 0..3 of partition 0 as one sealed batch, begun in the tracker.
    fn one_batch(shared: &Shared) -> (BatchId, Work<()>) {
        let limits = BatchLimits {
            max_events: 10,
            max_bytes: 1 << 20,
            linger: Duration::from_secs(1),
        };
        let mut batcher = Batcher::new("t".into(), limits);
        for offset in 0..3 {
            let record = Record {
                topic: "t".into(),
                partition: 0,
                offset,
                timestamp_ms: None,
                key: None,
                payload: b"{}".to_vec(),
                headers: None,
            };
            batcher.push(record, Ok(()), 0, Instant::now());
        }
        batcher.seal();
        let work = batcher.pop_sealed().unwrap();
        (shared.tracker().begin(&work.batch.ranges), work)
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_backing_off_goes_through_within_a_probe_of_the_sink_coming_back() {
        let sink = Arc::new(Outage::default());
        sink.down.store(true, Ordering::SeqCst);
        let shared = Arc::new(Shared::new(Duration::from_secs(600)));
        shared.tracker().assign(0, Some(0));
        let health = Health::new();
        let probe = tokio::spawn(probe_sink(
            Arc::clone(&sink),
            Arc::clone(&shared),
            Arc::clone(&health),
        ));
        let (batch_id, work) = one_batch(&shared);
        let write = tokio::spawn(write_batch(
            Arc::clone(&sink),
            dead_letters(),
            Arc::clone(&shared),
            Arc::clone(&health),
            Weak::new(),
            batch_id,
            work,
        ));

        // Five minutes down: the write backs off to its ceiling (30 s for an
        // unavailable sink), the probe keeps looking every second, and
        // nothing becomes committable.
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert!(!write.is_finished());
        assert!(!health.sink_ok());
        assert!(shared.tracker().take_commits().is_empty());
        // Every second something looks at the sink: a probe, or in the
        // seconds a write attempt did, nothing more.
        let probes = sink.probes.load(Ordering::SeqCst);
        let writes = sink.writes.load(Ordering::SeqCst);
        assert!(writes < 40, "{writes} writes: they back off");
        assert!(
            (295..=305).contains(&(probes + writes)),
            "{probes} probes and {writes} writes in 300 s down"
        );

        // Back: the next probe wakes the write, long before its backoff ends.
        sink.down.store(false, Ordering::SeqCst);
        let back = tokio::time::Instant::now();
        write.await.unwrap();
        assert!(
            back.elapsed() <= DOWN_CHECK_INTERVAL,
            "written {:?} after the sink came back",
            back.elapsed()
        );
        assert!(health.sink_ok());
        assert_eq!(shared.tracker().take_commits(), vec![(0, 3)]);

        // Up and idle, the probe slows to once every CHECK_INTERVAL (and
        // skips the rounds right after a write, which said enough).
        let probes = sink.probes.load(Ordering::SeqCst);
        tokio::time::sleep(CHECK_INTERVAL * 6).await;
        let idle = sink.probes.load(Ordering::SeqCst) - probes;
        assert!((4..=6).contains(&idle), "{idle} probes in 60 s idle");
        probe.abort();
    }
}

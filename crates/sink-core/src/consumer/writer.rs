//! The writer side: one task per batch (dead letters, the sink, its
//! rejections, retried until done, then the offsets marked done), and the
//! readiness probe while no write says anything.

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

/// Writes one batch: dead letters first (a sink that stores offsets moves
/// past them in the same write), then the sink, then its own rejections.
/// Retries until each step succeeds, then marks the offsets done.
pub(super) async fn write_batch<S: Sink>(
    sink: Arc<S>,
    dlq: Arc<DeadLetters>,
    shared: Arc<Shared>,
    health: Arc<Health>,
    batch_id: BatchId,
    work: Work<S::Item>,
) {
    let started = Instant::now();
    if !work.dead_letters.is_empty() {
        let letters: Vec<(&Record, &Rejection)> =
            work.dead_letters.iter().map(|(r, why)| (r, why)).collect();
        retry::until_ok("dead_letter", || dlq.send(&letters), &health).await;
    }
    let outcome = retry::until_ok(
        "write",
        || {
            shared.writes.fetch_add(1, Ordering::Relaxed);
            sink.write(&work.batch)
        },
        &health,
    )
    .await;
    health.set_sink_ok(true);
    if !outcome.rejected.is_empty() {
        let letters: Vec<(&Record, &Rejection)> = outcome
            .rejected
            .iter()
            .filter_map(|(index, why)| {
                let entry = work.batch.entries.get(*index);
                if entry.is_none() {
                    tracing::error!(index, reason = %why.reason, "the sink rejected an entry that is not in the batch (a sink bug)");
                }
                entry.map(|e| (&e.record, why))
            })
            .collect();
        retry::until_ok("dead_letter", || dlq.send(&letters), &health).await;
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
    shared
        .tracker()
        .complete(batch_id, &outcome.already_applied);
    shared.batch_done.notify_all();
    health.batch_done(Instant::now());
}

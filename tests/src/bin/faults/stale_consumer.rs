//! stale consumer (SIGSTOP/SIGCONT): of two instances under load, one is
//! stopped with SIGSTOP and a third replica joins; once every partition has
//! advanced without the stopped instance, it continues with SIGCONT,
//! unaware that its partitions moved. For redis-sink its Redis is down when
//! it stops, so that it holds batches it has not written yet: late writes
//! for ranges another instance has applied.
//!
//! Must show: nothing lost or counted twice. redis-sink's script must refuse
//! the late writes (the row fails if none happened, as the scenario then
//! did not exercise one); bigquery-sink's late writes are duplicates the
//! view hides.

use std::time::{Duration, Instant};

use e2e::pipeline::Instance;
use e2e::{wait_for_async, Stack};

use crate::common::{catch_up, graceful_stop, load, pipeline, OwnRedis};
use crate::{Outcome, SinkKind};

pub async fn run(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    // redis-sink's instance must hold unwritten batches when it stops, so
    // its Redis is one the scenario can stop. bigquery-sink needs no outage:
    // whatever it applies after SIGCONT is late.
    let mut redis = match kind {
        SinkKind::BigQuery | SinkKind::BigQueryStorage | SinkKind::BigQueryExactlyOnce => None,
        SinkKind::Redis | SinkKind::RedisCluster => Some(OwnRedis::start(stack, kind).await?),
    };
    let mut p = match &redis {
        Some(redis) => redis.pipeline(stack).await?,
        None => pipeline(stack, kind).await?,
    };
    let (items, rate) = load(&p, 8, 30);
    let load = p.start_load(items, rate);
    let mut stale = p.start()?;
    let mut other = p.start()?;
    for instance in [&stale, &other] {
        instance.wait_metrics().await?;
    }
    // Both have partitions once both consume.
    wait_for_async(
        Duration::from_secs(60),
        "both instances to consume",
        || async {
            Ok(stale.counter("sink_events_consumed_total").await? > 0.0
                && other.counter("sink_events_consumed_total").await? > 0.0)
        },
    )
    .await?;
    if let Some(redis) = &mut redis {
        redis.stop().await?;
        wait_for_async(
            Duration::from_secs(60),
            "the instance to hold batches it cannot write",
            || async { Ok(stale.counter("sink_paused").await? > 0.0) },
        )
        .await?;
    }
    stale.service.signal("STOP")?;
    let stopped = Instant::now();
    if let Some(redis) = &mut redis {
        redis.start_again().await?;
    }
    // The stopped instance's partitions stay where they are until they move.
    let at_stop = p.applied().await?;
    // tansu moves a silent member's partitions only when the group
    // rebalances, so a third replica joins (as an autoscaler would add one).
    let mut third = p.start()?;
    // The stale instance's partitions have moved once every partition
    // advances again.
    wait_for_async(
        Duration::from_secs(120),
        "every partition to advance without the stopped instance",
        || async {
            let now = p.applied().await?;
            Ok(now.iter().zip(&at_stop).all(|(n, s)| n > s))
        },
    )
    .await?;
    stale.service.signal("CONT")?;
    let stopped_for = stopped.elapsed();
    let recovery = catch_up(&mut p, load, &other).await?;
    let refused = match &redis {
        Some(_) => Some(late_writes_refused(&stale, [&other, &third]).await?),
        None => None,
    };
    let mut exits = Vec::new();
    for instance in [&mut stale, &mut other, &mut third] {
        exits.push(graceful_stop(instance).await?.0);
    }
    let mut outcome = Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(format!(
            "stopped {:.1} s, until its partitions moved",
            stopped_for.as_secs_f64()
        ))
        .note(format!("exits {exits:?}"));
    if let Some((from_stale, from_others)) = refused {
        outcome = outcome.note(format!(
            "late batches refused: {from_stale} from the stale instance, {from_others} from the others"
        ));
        if (from_stale, from_others) == (0, 0) {
            outcome =
                outcome.problem("no late write was refused: the scenario did not exercise one");
        }
    }
    Ok(outcome)
}

/// redis-sink's late batches its script refused: (from the stale instance,
/// from the others).
async fn late_writes_refused(
    stale: &Instance,
    others: [&Instance; 2],
) -> anyhow::Result<(u64, u64)> {
    // The stale instance's held batches are retried once it runs again; if
    // none is refused in time, the counts say so.
    let _ = wait_for_async(
        Duration::from_secs(30),
        "the stale instance's late writes to be refused",
        || async { Ok(stale.counter("sink_already_applied_total").await? > 0.0) },
    )
    .await;
    let mut from_others = 0;
    for other in others {
        from_others += other.counter("sink_already_applied_total").await? as u64;
    }
    Ok((
        stale.counter("sink_already_applied_total").await? as u64,
        from_others,
    ))
}

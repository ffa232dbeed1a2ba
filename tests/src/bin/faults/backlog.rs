//! 1,000,000 backlog, Redis down: redis-sink's Redis stops while 1,060,000
//! events pile up, long enough for the consumer to hold, fill what it may
//! buffer, and pause fetching; then Redis comes back.
//!
//! Must show: nothing lost or counted twice, and what waiting costs: peak
//! RSS before the outage, with the backlog waiting and after catching up,
//! and the CPU seconds used while Redis was down. redis-sink only: the
//! outage is its backend's (on a cluster, the `{rank}` shard's).
//!
//! On resume a consumer fetches from the next offset it has not taken,
//! which with batched producers is usually inside a record batch, and
//! tansu 0.6.0 then skips the rest of that batch (README, known limits),
//! while a million single-record batches slow tansu to a crawl. So the
//! records the consumer takes before it pauses are single-record batches,
//! and the million that pile up while it is paused come in 64 KB batches
//! as Logstash sends them.

use std::time::{Duration, Instant};

use e2e::Stack;

use crate::common::{events, OwnRedis};
use crate::{Outcome, SinkKind};

pub async fn run(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    const BACKLOG: usize = 1_000_000;
    const BEFORE_PAUSE: usize = 60_000;
    let mut redis = OwnRedis::start(stack, kind).await?;
    let mut p = redis.pipeline(stack).await?;
    let mut all = events(&p, 9, 3_000 + BEFORE_PAUSE + BACKLOG);
    let backlog = all.split_off(3_000 + BEFORE_PAUSE);
    let before_pause = all.split_off(3_000);
    p.produce(all).await?;
    let instance = p.start()?;
    p.wait_caught_up(&instance).await?;
    let rss_before = instance.service.peak_rss()?;
    redis.stop().await?;
    let cpu = instance.service.cpu_seconds()?;
    let outage_started = Instant::now();
    p.produce(before_pause).await?;
    instance
        .service
        .wait_for_log(Duration::from_secs(60), "the consumer to pause", |log| {
            log.contains("fetching paused")
        })
        .await?;
    p.batch_production()?;
    p.produce(backlog).await?;
    let waited = outage_started.elapsed().as_secs_f64();
    let cpu_down = instance.service.cpu_seconds()? - cpu;
    let rss_waiting = instance.service.peak_rss()?;
    redis.start_again().await?;
    let recovery = p.recover(None, &instance).await?;
    let rss_after = instance.service.peak_rss()?;
    let mb = |b: u64| b as f64 / 1e6;
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(format!(
            "peak RSS {:.1} MB before, {:.1} MB with {} waiting, {:.1} MB after catching up",
            mb(rss_before),
            mb(rss_waiting),
            BEFORE_PAUSE + BACKLOG,
            mb(rss_after)
        ))
        .note(format!(
            "CPU {cpu_down:.2} s while Redis was down ({waited:.0} s)"
        )))
}

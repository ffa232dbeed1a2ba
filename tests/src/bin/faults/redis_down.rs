//! Redis down 10 s: redis-sink's own Redis stops under load for 10 s and
//! comes back. A standalone redis-server (with AOF) stops; on a cluster the
//! `{rank}` shard is killed, primary and replica, so that no node serves the
//! counts and the fence while the other shards still take histories.
//!
//! Must show: nothing lost or counted twice, and that the sink waits
//! cheaply meanwhile: the note gives its CPU seconds during the outage and
//! whether it had paused fetching by its end. redis-sink only: the fault is
//! its backend's.

use std::time::Duration;

use e2e::Stack;

use crate::common::{catch_up, load_and_start, outage, OwnRedis};
use crate::{Outcome, SinkKind};

pub async fn run(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let mut redis = OwnRedis::start(stack, kind).await?;
    let mut p = redis.pipeline(stack).await?;
    let (load, instance) = load_and_start(&mut p, 3, 20).await?;
    redis.stop().await?;
    let outage = outage(&instance, Duration::from_secs(10)).await?;
    redis.start_again().await?;
    let recovery = catch_up(&mut p, load, &instance).await?;
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(outage))
}

//! redis-server down 10 s: redis-sink's own redis-server (with AOF) stops
//! under load for 10 s and comes back.
//!
//! Must show: nothing lost or counted twice, and that the sink waits
//! cheaply meanwhile: the note gives its CPU seconds during the outage and
//! whether it had paused fetching by its end. redis-sink only: the fault is
//! its backend's.

use std::time::Duration;

use e2e::process::PrivateRedis;
use e2e::{unique, Stack};

use crate::common::{catch_up, load_and_start, on_redis, outage};
use crate::Outcome;

pub async fn run(stack: &Stack) -> anyhow::Result<Outcome> {
    let mut redis = PrivateRedis::start(stack.dir.join(unique("faults-redis"))).await?;
    let mut p = on_redis(stack, redis.url()).await?;
    let (load, instance) = load_and_start(&mut p, 3, 20).await?;
    redis.stop()?;
    let outage = outage(&instance, Duration::from_secs(10)).await?;
    redis.start_again().await?;
    let recovery = catch_up(&mut p, load, &instance).await?;
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(outage))
}

//! eviction policy set for 5 s: an operator sets an evicting
//! `maxmemory-policy` (volatile-lru) under the running sink, then sets it
//! back to noeviction. On a cluster, on a primary that holds only histories:
//! the sink must watch every primary, not only the one it asks first.
//!
//! Must show: the sink stops writing meanwhile (it retries: the row fails
//! if it kept writing), and nothing is lost or counted twice. redis-sink
//! only: the setting is its backend's.

use std::time::Duration;

use e2e::Stack;

use crate::common::{catch_up, load_and_start, outage, OwnRedis};
use crate::{Outcome, SinkKind};

pub async fn run(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let redis = OwnRedis::start(stack, kind).await?;
    let mut conn = match &redis {
        OwnRedis::Standalone(redis) => redis.connection().await?,
        OwnRedis::Cluster { cluster, .. } => {
            let rank = cluster.primary_of("{rank}").await?;
            cluster
                .node(cluster.primary_other_than(rank).await?)
                .await?
        }
    };
    let mut p = redis.pipeline(stack).await?;
    let (load, instance) = load_and_start(&mut p, 12, 20).await?;
    let policy = |value: &'static str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET").arg("maxmemory-policy").arg(value);
        cmd
    };
    policy("volatile-lru").exec_async(&mut conn).await?;
    let outage = outage(&instance, Duration::from_secs(5)).await?;
    let retries = instance.counter("sink_retries_total").await?;
    policy("noeviction").exec_async(&mut conn).await?;
    let recovery = catch_up(&mut p, load, &instance).await?;
    let mut outcome = Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(outage);
    if retries == 0.0 {
        outcome = outcome.problem("the sink kept writing under volatile-lru");
    }
    Ok(outcome)
}

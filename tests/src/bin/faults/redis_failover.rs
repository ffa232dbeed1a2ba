//! Redis failover to its replica, under load.
//!
//! Standalone: a managed failover. The replica is promoted once it has
//! everything, the old primary becomes its replica, and the address (a TCP
//! front here) moves; connections opened before still reach the old primary,
//! which now answers `READONLY`.
//!
//! Cluster: the primary of the `{rank}` slot is killed (SIGKILL, nothing
//! flushed), its replica takes over after `cluster-node-timeout`, and the
//! node comes back 10 s after the kill as a replica; then the same for a
//! primary that holds only histories. Replication is asynchronous: the
//! promoted replica may miss the last writes (docs/redis-keys.md says what
//! that costs; counts must stay exact).
//!
//! Must show: nothing lost or counted twice across the switches, and for the
//! cluster that the sink saw the fault (the row fails without a retry). The
//! note gives how long each switch took. redis-sink only: the failover is
//! its backend's.

use std::time::{Duration, Instant};

use e2e::process::{fail_over, PrivateRedis};
use e2e::redis_cluster::PrivateCluster;
use e2e::tcp_front::TcpFront;
use e2e::{unique, Stack};

use crate::common::{catch_up, load_and_start, on_redis};
use crate::{Outcome, SinkKind};

pub async fn run(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    match kind {
        SinkKind::RedisCluster => primaries_killed(stack).await,
        _ => managed(stack).await,
    }
}

async fn managed(stack: &Stack) -> anyhow::Result<Outcome> {
    let dir = stack.dir.join(unique("faults-failover"));
    let old = PrivateRedis::start(dir.join("a")).await?;
    let new = PrivateRedis::start(dir.join("b")).await?;
    new.replicate(&old).await?;
    let front = TcpFront::start(old.addr()).await?;
    let mut p = on_redis(stack, format!("redis://{}", front.addr())).await?;
    let (load, instance) = load_and_start(&mut p, 11, 20).await?;
    let started = Instant::now();
    fail_over(&old, &new, &front).await?;
    let switched = started.elapsed();
    let recovery = catch_up(&mut p, load, &instance).await?;
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(format!("failover took {:.1} s", switched.as_secs_f64())))
}

async fn primaries_killed(stack: &Stack) -> anyhow::Result<Outcome> {
    let cluster = PrivateCluster::start(stack.dir.join(unique("faults-failover"))).await?;
    let mut p = on_redis(stack, cluster.url().to_owned()).await?;
    let (load, instance) = load_and_start(&mut p, 13, 40).await?;
    let rank = cluster.primary_of("{rank}").await?;
    let history = cluster.primary_other_than(rank).await?;
    let mut switches = Vec::new();
    for (what, port) in [("{rank}", rank), ("history", history)] {
        let killed = Instant::now();
        cluster.kill(port)?;
        cluster.wait_taken_over(port).await?;
        let took = killed.elapsed();
        // The fault schedule: the node is away 10 s in all.
        tokio::time::sleep(Duration::from_secs(10).saturating_sub(took)).await;
        cluster.start_again(port)?;
        switches.push(format!(
            "{what} primary replaced in {:.1} s",
            took.as_secs_f64()
        ));
    }
    let retries = instance.counter("sink_retries_total").await?;
    let recovery = catch_up(&mut p, load, &instance).await?;
    let mut outcome = Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(switches.join(", "))
        .note(format!("{retries} retried writes"));
    if retries == 0.0 {
        outcome = outcome.problem("the sink retried nothing: the kills did not reach it");
    }
    Ok(outcome)
}

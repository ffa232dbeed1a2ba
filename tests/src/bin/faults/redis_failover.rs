//! Redis failover to its replica: a managed failover under load. The
//! replica is promoted once it has everything, the old primary becomes its
//! replica, and the address (a TCP front here) moves; connections opened
//! before still reach the old primary.
//!
//! Must show: nothing lost or counted twice across the switch, though the
//! connections the sink opened before it now answer `READONLY`. The note
//! gives how long the switch took. redis-sink only: the failover is
//! its backend's.

use std::time::Instant;

use e2e::process::{fail_over, PrivateRedis};
use e2e::tcp_front::TcpFront;
use e2e::{unique, Stack};

use crate::common::{catch_up, load_and_start, on_redis};
use crate::Outcome;

pub async fn run(stack: &Stack) -> anyhow::Result<Outcome> {
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

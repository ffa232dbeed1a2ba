//! scale 1 -> 3 -> 1 under load: two replicas join a running instance,
//! share the partitions with it for a while, and leave again with SIGTERM,
//! as an autoscaler would scale out and in.
//!
//! Must show: nothing lost or counted twice across both rebalances, and each
//! leaver exits 0 within `--shutdown-timeout-secs`.

use std::time::Duration;

use e2e::Stack;

use crate::common::{catch_up, graceful_stop, load_and_start, pipeline, stopped_in_time};
use crate::{Outcome, SinkKind};

pub async fn run(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let mut p = pipeline(stack, kind).await?;
    let (load, first) = load_and_start(&mut p, 2, 20).await?;
    let mut joined = vec![p.start()?, p.start()?];
    // Three replicas share the partitions under load for a while.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut exits = Vec::new();
    for instance in &mut joined {
        exits.push(graceful_stop(instance).await?);
    }
    let recovery = catch_up(&mut p, load, &first).await?;
    let mut outcome = Outcome::new(p.tally().await?).recovered_in(recovery);
    for (code, took) in exits {
        outcome = outcome.note(format!("leaver exit {code:?} in {took:.1} s"));
        if !stopped_in_time(code, took) {
            outcome = outcome.problem(format!(
                "a leaving replica exited {code:?} after {took:.1} s"
            ));
        }
    }
    Ok(outcome)
}

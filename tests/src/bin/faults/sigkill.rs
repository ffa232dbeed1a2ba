//! SIGKILL x5 under load: one instance at a time consumes a minute of load
//! and is killed at a random moment while it applies, five times over, each
//! time replaced by a new one.
//!
//! Must show: nothing lost and nothing counted twice, though every kill
//! leaves applied batches whose offsets were not committed yet.

use std::time::Duration;

use e2e::Stack;
use rand::{Rng, SeedableRng};

use crate::common::{catch_up, load, pipeline};
use crate::{Outcome, SinkKind};

pub async fn run(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let mut p = pipeline(stack, kind).await?;
    // Long enough for 5 rounds of (re)join, which takes up to a session
    // timeout while the group waits for the killed member.
    let (items, rate) = load(&p, 1, 60);
    let load = p.start_load(items, rate);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut instance = p.start()?;
    let mut kills = Vec::new();
    let mut applied = 0;
    for _ in 0..5 {
        // A random moment while this instance is applying.
        p.wait_progress(applied, &instance).await?;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1_500))).await;
        applied = p.applied_total().await?;
        kills.push(applied);
        instance.service.kill()?;
        instance = p.start()?;
    }
    let recovery = catch_up(&mut p, load, &instance).await?;
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(format!("killed at {kills:?} applied")))
}

//! group renamed, both groups running: a deployment under a new consumer
//! group id against the same Redis and key prefix starts while the old one
//! still runs under load; once the new group makes progress, the old one
//! stops with SIGTERM.
//!
//! Must show: nothing counted twice though both groups consume the same
//! records, because redis-sink's fence is the data's (offsets stored beside
//! it per topic), not the group's; the note counts the batches the new
//! group found applied already. redis-sink only: the fence under test is
//! the one it keeps in Redis.

use e2e::Stack;

use crate::common::{catch_up, graceful_stop, load, pipeline};
use crate::{Outcome, SinkKind};

pub async fn run(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let mut p = pipeline(stack, kind).await?;
    let (items, rate) = load(&p, 10, 20);
    let load = p.start_load(items, rate);
    let mut old = p.start()?;
    let applied = p.wait_progress(0, &old).await?;
    p.rename_group();
    let renamed = p.start()?;
    p.wait_progress(applied, &renamed).await?;
    let (code, took) = graceful_stop(&mut old).await?;
    let recovery = catch_up(&mut p, load, &renamed).await?;
    let already = renamed.counter("sink_already_applied_total").await?;
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(format!(
            "old group exit {code:?} in {took:.1} s; batches the new group found applied: {}",
            already as u64
        )))
}

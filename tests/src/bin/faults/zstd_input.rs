//! zstd batches as Logstash sends (mock): zstd-compressed record batches of
//! many records, as Logstash's kafka output sends with
//! `compression_type => zstd`, on the mock cluster (tansu mishandles
//! fetches inside batches), with a SIGKILL mid-stream so that a partition
//! resumes inside a batch.
//!
//! Must show: every record of every batch applied once, the records of a
//! batch the restart resumes in included.

use e2e::Stack;

use crate::common::{catch_up, load, on_mock_cluster};
use crate::{Outcome, SinkKind};

pub async fn run(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let mut p = on_mock_cluster(stack, kind).await?;
    p.logstash_production("zstd")?;
    let (items, rate) = load(&p, 9, 20);
    let load = p.start_load(items, rate);
    let mut instance = p.start()?;
    let applied = p.wait_progress(0, &instance).await?;
    instance.service.kill()?;
    instance = p.start()?;
    p.wait_progress(applied, &instance).await?;
    let recovery = catch_up(&mut p, load, &instance).await?;
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note("SIGKILL once mid-stream"))
}

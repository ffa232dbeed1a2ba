//! SIGTERM under load + restart: the only instance gets SIGTERM once a
//! quarter of the load is applied, then a new instance starts and consumes
//! the rest.
//!
//! Must show: the instance exits 0 within `--shutdown-timeout-secs`, having
//! committed everything it applied, so that the new instance consumes
//! exactly the records that were left ("re-delivered" must be 0), and
//! nothing is lost or counted twice.

use e2e::service::SHUTDOWN_TIMEOUT;
use e2e::Stack;

use crate::common::{catch_up, graceful_stop, load, pipeline, stopped_in_time};
use crate::{Outcome, SinkKind};

pub async fn run(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let mut p = pipeline(stack, kind).await?;
    let (items, rate) = load(&p, 7, 20);
    let mid_load = (items.len() / 4) as i64;
    let load = p.start_load(items, rate);
    let mut first = p.start()?;
    p.wait_progress(mid_load, &first).await?;
    let (code, took) = graceful_stop(&mut first).await?;
    let applied_at_exit: i64 = p.applied_total().await?;
    let committed_at_exit: i64 = p.committed().await?.iter().sum();
    let second = p.start()?;
    let recovery = catch_up(&mut p, load, &second).await?;
    let produced = p.produced() as i64;
    let consumed = second.counter("sink_events_consumed_total").await? as i64;
    let redelivered = consumed - (produced - applied_at_exit);
    let mut outcome = Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(format!("exit {code:?} in {took:.1} s"))
        .note(format!(
            "at exit: applied {applied_at_exit}, Kafka committed {committed_at_exit}"
        ))
        .note(format!("re-delivered after restart: {redelivered}"));
    if !stopped_in_time(code, took) {
        outcome = outcome.problem(format!(
            "SIGTERM: exit {code:?} after {took:.1} s (--shutdown-timeout-secs {})",
            SHUTDOWN_TIMEOUT.as_secs()
        ));
    }
    if redelivered != 0 {
        outcome = outcome.problem(format!(
            "the restarted instance consumed {consumed} records, {} were left: {redelivered} re-delivered",
            produced - applied_at_exit
        ));
    }
    Ok(outcome)
}

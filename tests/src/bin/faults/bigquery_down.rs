//! BigQuery 500/429/drops 10 s: a fault proxy between bigquery-sink and the
//! emulator answers every insertAll for 10 s, in turn, with 500, 429, a
//! dropped connection, or a dropped reply after forwarding the request (the
//! rows are stored, the reply is lost).
//!
//! Must show: nothing lost, nothing repeated in the de-duplicated view (the
//! retries after a lost reply show as raw duplicates only), and the sink's
//! CPU use and pause during the outage. bigquery-sink only: the fault is its
//! backend's.

use std::time::Duration;

use e2e::bigquery::{BigQuerySide, Fault, FaultProxy};
use e2e::broker::Broker;
use e2e::pipeline::Pipeline;
use e2e::Stack;

use crate::common::{catch_up, load_and_start, outage};
use crate::Outcome;

pub async fn run(stack: &Stack) -> anyhow::Result<Outcome> {
    let proxy = FaultProxy::start(&stack.bigquery_endpoint)?;
    let side = BigQuerySide::on_stack(stack)?.via(proxy.endpoint());
    let mut p = Pipeline::new(stack, Broker::tansu(stack), Box::new(side)).await?;
    let (load, instance) = load_and_start(&mut p, 4, 20).await?;
    // DropAfterForward: BigQuery stored the rows but the reply is lost.
    proxy.set_faults(vec![
        Fault::Status(500),
        Fault::Status(429),
        Fault::Drop,
        Fault::DropAfterForward,
    ]);
    let outage = outage(&instance, Duration::from_secs(10)).await?;
    proxy.clear_faults();
    let recovery = catch_up(&mut p, load, &instance).await?;
    let served: Vec<String> = proxy
        .served()
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect();
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(outage)
        .note(format!("faults served: {}", served.join(", "))))
}

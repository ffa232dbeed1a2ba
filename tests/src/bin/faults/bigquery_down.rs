//! BigQuery errors and drops for 10 s: a fault proxy between bigquery-sink
//! and the emulator answers every write for 10 s, in turn, with errors, a
//! dropped connection, or a dropped reply after forwarding the request (the
//! rows are stored, the reply is lost). With insertAll: 500, 429, a
//! dropped connection, a dropped reply. With the Storage Write API: an
//! INTERNAL reply, a throughput quota, a stream ended, a stream ended after
//! forwarding.
//!
//! Must show: nothing lost, nothing repeated in the de-duplicated view (the
//! retries after a lost reply show as raw duplicates only), and the sink's
//! CPU use and pause during the outage. bigquery-sink only: the fault is its
//! backend's.

use std::time::Duration;

use e2e::bigquery::{BigQuerySide, Fault, WriteApi, WriteProxy};
use e2e::grpc_proxy::GrpcFault;
use e2e::pipeline::Pipeline;
use e2e::Stack;
use tonic::Code;

use crate::common::{broker, catch_up, load_and_start, outage};
use crate::{Outcome, SinkKind};

pub async fn run(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let api = match kind {
        SinkKind::BigQueryStorage => WriteApi::Storage,
        SinkKind::BigQueryExactlyOnce => WriteApi::StorageExactlyOnce,
        _ => WriteApi::InsertAll,
    };
    let proxy = WriteProxy::start(stack, api).await?;
    let side = proxy.route(BigQuerySide::on_stack(stack)?);
    let mut p = Pipeline::new(stack, broker(stack, kind)?, Box::new(side)).await?;
    let (load, instance) = load_and_start(&mut p, 4, 20).await?;
    // The last of each: BigQuery stored the rows but the reply is lost.
    match &proxy {
        WriteProxy::InsertAll(proxy) => proxy.set_faults(vec![
            Fault::Status(500),
            Fault::Status(429),
            Fault::Drop,
            Fault::DropAfterForward,
        ]),
        WriteProxy::Storage(proxy, _) => proxy.set_faults(vec![
            GrpcFault::Reply(Code::Internal, "internal error"),
            GrpcFault::Reply(
                Code::ResourceExhausted,
                "Exceeds 'AppendRows throughput' quota (status: INSUFFICIENT_TOKENS)",
            ),
            GrpcFault::EndStream(Code::Unavailable, "connection reset"),
            GrpcFault::EndStreamAfterForward,
        ]),
    }
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

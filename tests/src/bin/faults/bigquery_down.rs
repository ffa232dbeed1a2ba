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

use e2e::bigquery::{BigQuerySide, Fault, FaultProxy, WriteApi};
use e2e::broker::Broker;
use e2e::grpc_proxy::{GrpcFault, GrpcFaultProxy};
use e2e::pipeline::Pipeline;
use e2e::Stack;
use tonic::Code;

use crate::common::{catch_up, load_and_start, outage};
use crate::{Outcome, SinkKind};

/// The proxy of one write API.
enum Proxy {
    InsertAll(FaultProxy),
    Storage(GrpcFaultProxy),
}

pub async fn run(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let side = BigQuerySide::on_stack(stack)?;
    let (proxy, side) = if kind == SinkKind::BigQueryStorage {
        let proxy = GrpcFaultProxy::start(Some(&stack.bigquery_grpc_endpoint)).await?;
        let side = side.with(WriteApi::Storage).via_grpc(proxy.endpoint());
        (Proxy::Storage(proxy), side)
    } else {
        let proxy = FaultProxy::start(&stack.bigquery_endpoint)?;
        let side = side.via(proxy.endpoint());
        (Proxy::InsertAll(proxy), side)
    };
    let mut p = Pipeline::new(stack, Broker::tansu(stack), Box::new(side)).await?;
    let (load, instance) = load_and_start(&mut p, 4, 20).await?;
    // The last of each: BigQuery stored the rows but the reply is lost.
    match &proxy {
        Proxy::InsertAll(proxy) => proxy.set_faults(vec![
            Fault::Status(500),
            Fault::Status(429),
            Fault::Drop,
            Fault::DropAfterForward,
        ]),
        Proxy::Storage(proxy) => proxy.set_faults(vec![
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
    let served = match &proxy {
        Proxy::InsertAll(proxy) => {
            proxy.clear_faults();
            proxy.served()
        }
        Proxy::Storage(proxy) => {
            proxy.clear_faults();
            proxy.served()
        }
    };
    let recovery = catch_up(&mut p, load, &instance).await?;
    let served: Vec<String> = served
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect();
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(outage)
        .note(format!("faults served: {}", served.join(", "))))
}

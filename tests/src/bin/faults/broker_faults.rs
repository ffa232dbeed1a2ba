//! broker faults (mock cluster): on librdkafka's mock cluster (3 brokers,
//! replication 3), under load, every partition's leader moves to another
//! broker; broker 2 goes down for 3 s and comes back; then Fetch and
//! OffsetCommit requests answer errors (not leader, timed out, coordinator
//! not available / not coordinator) and cut connections a few times.
//!
//! Must show: the sink makes progress after each fault, and in the end
//! nothing is lost or counted twice.

use std::time::Duration;

use anyhow::Context;
use e2e::Stack;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::common::{catch_up, load, on_mock_cluster};
use crate::{Outcome, SinkKind};

pub async fn run(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let mut p = on_mock_cluster(stack, kind).await?;
    let topic = p.topic.clone();
    let mock = p.broker.mock().context("a mock cluster")?;
    let (items, rate) = load(&p, 5, 25);
    let load = p.start_load(items, rate);
    let instance = p.start()?;
    let mut applied = p.wait_progress(0, &instance).await?;
    let mut done = Vec::new();

    // Every partition's leader moves to another broker.
    for partition in 0..3 {
        mock.partition_leader(&topic, partition, Some((partition + 1) % 3 + 1))?;
    }
    applied = p.wait_progress(applied, &instance).await?;
    done.push("leaders moved");

    // A broker goes down (connections refused) and comes back.
    mock.broker_down(2)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    mock.broker_up(2)?;
    applied = p.wait_progress(applied, &instance).await?;
    done.push("broker 2 down 3 s");

    // Fetch and OffsetCommit answer errors (and cut the connection) a few times.
    use RDKafkaRespErr::*;
    mock.request_errors(
        RDKafkaApiKey::Fetch,
        &[
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR__TRANSPORT,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        ],
    );
    mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
            RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            RD_KAFKA_RESP_ERR__TRANSPORT,
        ],
    );
    p.wait_progress(applied, &instance).await?;
    done.push("Fetch/OffsetCommit errors");
    let recovery = catch_up(&mut p, load, &instance).await?;
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(done.join(", ")))
}

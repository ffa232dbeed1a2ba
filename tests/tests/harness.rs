//! The harness's own promises, where a test relies on them to see a broken
//! guarantee: a check that could not see a failure would pass forever.

use std::time::{Duration, Instant};

use e2e::broker::Broker;
use e2e::{kafka, Stack};

/// The tallies read a dead-letter topic expecting no letter at all: one
/// that is there must still be seen, however long the reader takes to
/// start fetching, even with no quiet time to listen on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_expecting_nothing_still_sees_what_is_there() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let broker = Broker::tansu(&stack);
    let topic = broker.topic_with_dlq("harness").await?;
    let producer = broker.producer()?;
    kafka::produce(
        &producer,
        &topic,
        [(0, b"one".to_vec()), (2, b"two".to_vec())],
    )
    .await?;
    let started = Instant::now();
    let bootstrap = broker.bootstrap().to_owned();
    let read = tokio::task::spawn_blocking(move || {
        kafka::read_at_least(
            &bootstrap,
            &topic,
            0,
            Duration::from_secs(60),
            Duration::ZERO,
        )
    })
    .await??;
    let mut payloads: Vec<Vec<u8>> = read.into_iter().map(|m| m.payload).collect();
    payloads.sort();
    assert_eq!(
        payloads,
        vec![b"one".to_vec(), b"two".to_vec()],
        "read after {:?}",
        started.elapsed()
    );
    Ok(())
}

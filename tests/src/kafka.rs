//! Kafka helpers for tests: topics, producing, reading back, committed offsets.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// librdkafka security properties per bootstrap address, for brokers that
/// need them ([`crate::broker::Broker::secured`] registers its own), so that
/// every client a test makes reaches any broker the same way.
static SECURITY: Mutex<Vec<(String, Options)>> = Mutex::new(Vec::new());

/// librdkafka properties as key/value pairs.
pub type Options = Vec<(String, String)>;

/// Makes every client of `bootstrap` use `options` (TLS, SASL).
pub fn register_security(bootstrap: &str, options: Options) {
    let mut all = SECURITY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    all.retain(|(b, _)| b != bootstrap);
    all.push((bootstrap.to_owned(), options));
}

/// A client configuration for `bootstrap`, with its security properties.
pub fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    let all = SECURITY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (_, options) in all.iter().filter(|(b, _)| b == bootstrap) {
        for (key, value) in options {
            config.set(key, value);
        }
    }
    config
}

/// Creates a topic (and, if `with_dlq`, its `<topic>.dlq`) with `partitions`.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(bootstrap).create().context("admin client")?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .context("create_topics")?;
    for result in results {
        if let Err((name, code)) = result {
            bail!("cannot create topic {name}: {code}");
        }
    }
    Ok(())
}

/// A producer for tests.
///
/// One message per record batch: tansu 0.6.0 returns nothing when a fetch
/// starts inside a record batch (Kafka returns the batch and the client skips
/// the records before the offset), so a consumer resuming mid-batch, from a
/// committed or Redis-stored offset, would wait forever. Tests restart
/// consumers mid-stream all the time; with single-message batches every
/// offset is a batch boundary.
pub fn producer(bootstrap: &str) -> anyhow::Result<FutureProducer> {
    producer_with(bootstrap, true)
}

/// A producer; `single_message_batches` as explained at [`producer`]
/// (benchmarks, which never resume mid-stream, batch for speed).
pub fn producer_with(
    bootstrap: &str,
    single_message_batches: bool,
) -> anyhow::Result<FutureProducer> {
    let mut config = client_config(bootstrap);
    // Idempotent: a send retried after a lost reply (a slow broker under a
    // loaded CI) must not write the record twice, or the sink would rightly
    // count a record the test believes it sent once.
    config
        .set("linger.ms", "5")
        .set("acks", "all")
        .set("enable.idempotence", "true");
    if single_message_batches {
        config.set("batch.num.messages", "1");
    } else {
        // Record batches the size Logstash's kafka output makes (its
        // batch_size is 16 KB), not librdkafka's 1 MB default.
        config.set("batch.size", "65536");
    }
    config.create().context("producer")
}

/// A producer set as Logstash's kafka output sends: many records per
/// record batch (its `batch_size` is 16 KB), a short linger, and the given
/// `compression_type` (none, gzip, snappy, lz4 or zstd). For brokers that
/// serve record batches correctly (librdkafka's mock cluster); see
/// [`producer`] for tansu.
pub fn logstash_producer(bootstrap: &str, compression: &str) -> anyhow::Result<FutureProducer> {
    client_config(bootstrap)
        .set("batch.size", "16384")
        .set("linger.ms", "5")
        .set("acks", "all")
        .set("compression.type", compression)
        .create()
        .with_context(|| format!("producer with compression.type={compression}"))
}

/// Produces payloads to explicit partitions and waits for every delivery.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    messages: impl IntoIterator<Item = (i32, Vec<u8>)>,
) -> anyhow::Result<()> {
    let mut pending = Vec::new();
    for (partition, payload) in messages {
        let producer = producer.clone();
        let topic = topic.to_owned();
        pending.push(async move {
            producer
                .send(
                    FutureRecord::<(), _>::to(&topic)
                        .partition(partition)
                        .payload(&payload),
                    Timeout::After(Duration::from_secs(30)),
                )
                .await
                .map_err(|(err, _)| anyhow::anyhow!("delivery failed: {err}"))
        });
        if pending.len() >= 5_000 {
            for result in futures_join(std::mem::take(&mut pending)).await {
                result?;
            }
        }
    }
    for result in futures_join(pending).await {
        result?;
    }
    Ok(())
}

use futures::future::join_all as futures_join;

/// A message read back from a topic, with its headers.
#[derive(Debug, Clone)]
pub struct ReadMessage {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Value.
    pub payload: Vec<u8>,
    /// Headers, as strings.
    pub headers: HashMap<String, String>,
}

/// Reads `count` messages from the start of `topic` (any partition), failing
/// after `timeout`.
pub fn read_messages(
    bootstrap: &str,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<ReadMessage>> {
    read_at_least(bootstrap, topic, count, timeout, Duration::ZERO)
}

/// Reads at least `count` messages from the start of `topic` (failing after
/// `timeout`), then goes on until none arrives for `quiet`, to see any
/// beyond `count`. The quiet time counts only once every partition has
/// been fetched to its end at least once: a reader that has not fetched
/// yet has not seen that nothing is there. (tansu 0.6.0's high watermark
/// is not the end of the log when a record batch holds several records,
/// so an end reached is not the end of what may still arrive: hence the
/// quiet time after it.)
pub fn read_at_least(
    bootstrap: &str,
    topic: &str,
    count: usize,
    timeout: Duration,
    quiet: Duration,
) -> anyhow::Result<Vec<ReadMessage>> {
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", crate::unique("reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .context("reader")?;
    // Assigned, not subscribed: fetching starts without a group join.
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("metadata of {topic}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        bail!("{topic} has no partitions");
    }
    let mut assignment = TopicPartitionList::new();
    for partition in &partitions {
        assignment.add_partition_offset(topic, *partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    let mut at_end = std::collections::BTreeSet::new();
    let mut last = std::time::Instant::now();
    loop {
        let now = std::time::Instant::now();
        let fetched_all = at_end.len() == partitions.len();
        if out.len() >= count && fetched_all && now.duration_since(last) >= quiet {
            break;
        }
        if now >= deadline {
            bail!(
                "read {} of {count} messages from {topic} ({} of {} partitions fetched to their end) \
                 before timing out",
                out.len(),
                at_end.len(),
                partitions.len()
            );
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(partition)))
                if at_end.insert(partition) && at_end.len() == partitions.len() =>
            {
                last = std::time::Instant::now();
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(err)) => return Err(err).context("reading"),
            Some(Ok(message)) => {
                last = std::time::Instant::now();
                let headers = message
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(ReadMessage {
                    partition: message.partition(),
                    offset: message.offset(),
                    payload: message.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
        }
    }
    Ok(out)
}

/// The group's committed offset per partition (`None`: nothing committed).
pub fn committed(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<Vec<Option<i64>>> {
    OffsetReader::new(bootstrap, group, topic, partitions)?.committed()
}

/// Reads a group's committed offsets again and again over one client: for
/// polling loops, which must not load the broker (or the poller's runtime)
/// with a new client, connection and coordinator lookup per poll.
pub struct OffsetReader {
    consumer: BaseConsumer,
    topic: String,
    partitions: i32,
}

impl OffsetReader {
    /// A reader for `group`'s offsets of `topic`; it never joins the group.
    pub fn new(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = client_config(bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .context("offset reader")?;
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
            partitions,
        })
    }

    /// The committed offset per partition (`None`: nothing committed).
    pub fn committed(&self) -> anyhow::Result<Vec<Option<i64>>> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.topic, p);
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(10))?;
        Ok((0..self.partitions)
            .map(
                |p| match committed.find_partition(&self.topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                },
            )
            .collect())
    }
}

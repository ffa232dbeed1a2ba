//! The Kafka-protocol broker a test runs against: the stack's tansu, or
//! librdkafka's mock cluster in this process. Both give topics with their
//! dead-letter topic and a producer suited to them; everything above
//! (pipelines, in-process consumers) takes a [`Broker`] and does not care
//! which it is.

use std::rc::Rc;

use anyhow::Context;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer};

use crate::secured_kafka::SecuredKafka;
use crate::{kafka, unique, Stack, PARTITIONS};

/// An in-process mock cluster.
pub type Mock = MockCluster<'static, DefaultProducerContext>;

/// Where a test's topics live.
pub struct Broker {
    bootstrap: String,
    /// Set on the mock cluster; dropping the last handle stops the brokers.
    /// (`Rc`: the mock cluster may not move between threads.)
    mock: Option<Rc<Mock>>,
    /// Set on a SASL_SSL broker; dropping the last handle stops it.
    secured: Option<Rc<SecuredKafka>>,
}

impl Broker {
    /// The stack's tansu.
    ///
    /// tansu 0.6.0 returns nothing when a fetch starts inside a record batch,
    /// so its producer sends one record per batch (see [`kafka::producer`]).
    pub fn tansu(stack: &Stack) -> Self {
        Self {
            bootstrap: stack.kafka.clone(),
            mock: None,
            secured: None,
        }
    }

    /// librdkafka's mock cluster with `brokers` brokers, in this process: it
    /// serves batched and compressed record batches as Kafka does, and can
    /// inject faults ([`Broker::mock`]). It has no admin API and cannot
    /// delete topics.
    pub fn mock_cluster(brokers: i32) -> anyhow::Result<Self> {
        let mock = MockCluster::new(brokers).context("mock cluster")?;
        Ok(Self {
            bootstrap: mock.bootstrap_servers(),
            mock: Some(Rc::new(mock)),
            secured: None,
        })
    }

    /// A broker reached only over SASL_SSL ([`SecuredKafka`]): every client
    /// the harness makes for it, and every service a pipeline starts on it
    /// (`--kafka-options-file`), uses its TLS and SCRAM settings.
    pub fn secured(kafka: SecuredKafka) -> Self {
        kafka::register_security(&kafka.bootstrap, kafka.options.clone());
        Self {
            bootstrap: kafka.bootstrap.clone(),
            mock: None,
            secured: Some(Rc::new(kafka)),
        }
    }

    /// The librdkafka properties file a service needs to reach this broker.
    pub fn options_file(&self) -> Option<&std::path::Path> {
        self.secured.as_deref().map(|k| k.options_file.as_path())
    }

    /// The bootstrap servers.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// `result`, with the secured broker's own logs added to its error
    /// (unchanged on tansu and the mock cluster, whose logs are the stack's
    /// or this process's).
    pub fn with_logs<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        match &self.secured {
            Some(kafka) => kafka.with_logs(result),
            None => result,
        }
    }

    /// The mock cluster, to inject faults (`None` on tansu).
    pub fn mock(&self) -> Option<Rc<Mock>> {
        self.mock.clone()
    }

    /// Creates a fresh topic named after `prefix` and its `<topic>.dlq`,
    /// each with [`PARTITIONS`] partitions (replicated on every mock
    /// broker); returns the topic's name.
    pub async fn topic_with_dlq(&self, prefix: &str) -> anyhow::Result<String> {
        let topic = unique(prefix);
        for name in [topic.clone(), format!("{topic}.dlq")] {
            match &self.mock {
                Some(mock) => {
                    let replicas = mock
                        .bootstrap_servers()
                        .split(',')
                        .count()
                        .try_into()
                        .unwrap_or(1);
                    mock.create_topic(&name, PARTITIONS, replicas)
                        .with_context(|| format!("creating {name} on the mock cluster"))?;
                }
                None => kafka::create_topic(&self.bootstrap, &name, PARTITIONS).await?,
            }
        }
        Ok(topic)
    }

    /// The producer tests use by default, on either broker: one record per
    /// batch, so that a test's input does not change when it moves between
    /// brokers (and tansu can serve every offset). Batched and compressed
    /// input is asked for explicitly (`Pipeline::logstash_production`).
    pub fn producer(&self) -> anyhow::Result<FutureProducer> {
        kafka::producer(&self.bootstrap)
    }
}

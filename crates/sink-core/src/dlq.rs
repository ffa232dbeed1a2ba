//! The dead-letter topic: records that can never be written, with the reason.
//!
//! A dead letter carries the original key and bytes unchanged, plus headers
//! saying why and where from, so an operator can fix and replay it. The loop
//! waits for the broker to acknowledge every dead letter of a batch before
//! any offset moves past it.

use std::time::Duration;

use anyhow::anyhow;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::config::{kafka_config_context, ConsumerArgs};
use crate::sink::{Record, Rejection, SinkError};

/// Producer for one dead-letter topic.
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetters {
    /// Creates the producer (it connects lazily).
    pub fn new(args: &ConsumerArgs) -> anyhow::Result<Self> {
        let producer =
            kafka_config_context(args.producer_config().create(), "dead-letter producer")?;
        Ok(Self {
            producer,
            topic: args.dlq_topic(),
        })
    }

    /// The topic dead letters go to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends every letter and waits until the broker has them all. On error
    /// the caller retries the whole call; a letter may then be duplicated,
    /// never lost.
    pub async fn send(&self, letters: &[(&Record, &Rejection)]) -> Result<(), SinkError> {
        let failed_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let deliveries = letters.iter().map(|(record, rejection)| {
            let partition = record.partition.to_string();
            let offset = record.offset.to_string();
            let headers = OwnedHeaders::new_with_capacity(6)
                .insert(Header {
                    key: "error",
                    value: Some(rejection.reason.as_str()),
                })
                .insert(Header {
                    key: "error.code",
                    value: Some(rejection.code),
                })
                .insert(Header {
                    key: "source.topic",
                    value: Some(&*record.topic),
                })
                .insert(Header {
                    key: "source.partition",
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: "source.offset",
                    value: Some(offset.as_str()),
                })
                .insert(Header {
                    key: "failed.at",
                    value: Some(failed_at.as_str()),
                });
            let mut message = FutureRecord::to(&self.topic)
                .payload(record.payload.as_slice())
                .headers(headers);
            if let Some(key) = &record.key {
                message = message.key(key.as_slice());
            }
            // Timeout::Never: delivery is bounded by message.timeout.ms.
            self.producer.send(message, Timeout::Never)
        });
        let results = futures::future::join_all(deliveries).await;
        for ((_, rejection), result) in letters.iter().zip(&results) {
            match result {
                Ok(_) => metrics::counter!(crate::metrics::DLQ_EVENTS, "topic" => self.topic.clone(), "code" => rejection.code).increment(1),
                Err((err, _)) => {
                    return Err(SinkError::transient(
                        "dlq_delivery",
                        anyhow!("cannot deliver to dead-letter topic {}: {err} (does the topic exist?)", self.topic),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Waits for queued deliveries before the process exits.
    pub fn flush(&self, timeout: Duration) {
        use rdkafka::producer::Producer;
        if let Err(err) = self.producer.flush(timeout) {
            tracing::warn!(%err, "dead-letter producer did not flush");
        }
    }
}

//! The dead-letter topic: records that can never be written, with the reason.
//!
//! A dead letter carries the original key, headers and bytes unchanged, plus
//! headers saying why and where from, so an operator can fix and replay it.
//! The loop waits for the broker to acknowledge every dead letter of a batch
//! before any offset moves past it: a letter the topic refuses blocks its
//! partition, loudly (see [`refusal`]).

use std::time::Duration;

use anyhow::anyhow;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::config::{kafka_config_context, ConsumerArgs};
use crate::sink::{Record, Rejection, SinkError};

/// How much of a payload a dead letter keeps when the whole one is too large.
pub const TRUNCATED_PAYLOAD_BYTES: usize = 10_240;

/// How much of the reason a dead letter keeps when its payload is cut.
const TRUNCATED_REASON_BYTES: usize = 1_024;

/// The longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary.
fn truncate_utf8(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The producer (message.max.bytes) or the broker (the topic's
/// max.message.bytes) refused a message as too large.
fn is_too_large(result: &Result<(), KafkaError>) -> bool {
    matches!(
        result,
        Err(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        ))
    )
}

/// Why a letter could not be delivered, sorted: what only an operator can
/// fix is `Unavailable` (an error log, readiness false), the rest transient.
/// Either way the letter is retried and nothing is committed past it.
fn refusal(topic: &str, record: &Record, err: &KafkaError) -> SinkError {
    let code = match err {
        KafkaError::MessageProduction(code) => Some(*code),
        _ => err.rdkafka_error_code(),
    };
    let at = format!(
        "dead letter for {}/{} offset {}",
        record.topic, record.partition, record.offset
    );
    match code {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => SinkError::unavailable(
            "dlq_too_large",
            anyhow!(
                "{at}: too large for dead-letter topic {topic} even with its payload cut (its key \
                 is {} bytes): raise the topic's max.message.bytes, and message.max.bytes with \
                 --kafka-option if the producer refused it",
                record.key.as_ref().map_or(0, Vec::len)
            ),
        ),
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => SinkError::unavailable(
            "dlq_not_authorized",
            anyhow!("{at}: {err}: grant this service's principal WRITE on topic {topic}"),
        ),
        Some(RDKafkaErrorCode::InvalidRecord) => SinkError::unavailable(
            "dlq_invalid_record",
            anyhow!(
                "{at}: {err}: topic {topic} refuses the record; a compacted topic \
                 (cleanup.policy=compact) refuses records without a key: use cleanup.policy=delete"
            ),
        ),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            SinkError::unavailable(
                "dlq_topic_missing",
                anyhow!("{at}: {err}: create topic {topic} (or set --dlq-topic)"),
            )
        }
        _ => SinkError::transient(
            "dlq_delivery",
            anyhow!("{at}: cannot deliver to dead-letter topic {topic}: {err}"),
        ),
    }
}

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
    ///
    /// A letter larger than the producer or the topic accepts (the original
    /// message was near the size limit, and the headers push it over) would
    /// fail forever and block its partition: it is sent again with the
    /// payload cut to its first [`TRUNCATED_PAYLOAD_BYTES`] bytes (or none,
    /// if that is still too large), the reason cut to 1 KB, and a
    /// `payload.truncated` header holding the original size. The full message stays in the source topic at
    /// `source.partition` / `source.offset` until retention removes it.
    pub async fn send(&self, letters: &[(&Record, &Rejection)]) -> Result<(), SinkError> {
        let failed_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let deliveries = letters.iter().map(|(record, rejection)| {
            self.deliver(record, rejection, &failed_at, record.payload.len())
        });
        let results = futures::future::join_all(deliveries).await;
        for ((record, rejection), result) in letters.iter().zip(results) {
            let mut result = result;
            for keep in [TRUNCATED_PAYLOAD_BYTES, 0] {
                if !is_too_large(&result) || keep >= record.payload.len() {
                    continue;
                }
                tracing::warn!(
                    partition = record.partition,
                    offset = record.offset,
                    bytes = record.payload.len(),
                    kept = keep,
                    "dead letter too large for the topic: sending it with its payload cut"
                );
                result = self.deliver(record, rejection, &failed_at, keep).await;
            }
            if let Err(err) = result {
                return Err(refusal(&self.topic, record, &err));
            }
            metrics::counter!(crate::metrics::DLQ_EVENTS, "topic" => self.topic.clone(), "code" => rejection.code).increment(1);
        }
        Ok(())
    }

    /// Produces one letter with the first `keep` bytes of its payload.
    async fn deliver(
        &self,
        record: &Record,
        rejection: &Rejection,
        failed_at: &str,
        keep: usize,
    ) -> Result<(), KafkaError> {
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        let original_size = record.payload.len().to_string();
        let cut = keep < record.payload.len();
        // A reason may quote the input: cut it with the payload.
        let reason = if cut {
            truncate_utf8(&rejection.reason, TRUNCATED_REASON_BYTES)
        } else {
            &rejection.reason
        };
        // The source's headers first, then ours: a reader taking the last
        // value of a key gets ours. A cut letter drops the source's: they
        // may be what makes it too large.
        let source = record.headers.as_ref().filter(|_| !cut);
        let mut headers = source
            .cloned()
            .unwrap_or_else(|| OwnedHeaders::new_with_capacity(7))
            .insert(Header {
                key: "error",
                value: Some(reason),
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
                value: Some(failed_at),
            });
        let payload = record.payload.get(..keep).unwrap_or(&record.payload);
        if cut {
            headers = headers.insert(Header {
                key: "payload.truncated",
                value: Some(original_size.as_str()),
            });
        }
        let mut message = FutureRecord::to(&self.topic)
            .payload(payload)
            .headers(headers);
        if let Some(key) = &record.key {
            message = message.key(key.as_slice());
        }
        // Timeout::Never: delivery is bounded by message.timeout.ms.
        self.producer
            .send(message, Timeout::Never)
            .await
            .map(|_| ())
            .map_err(|(err, _)| err)
    }

    /// Waits for queued deliveries before the process exits.
    pub fn flush(&self, timeout: Duration) {
        use rdkafka::producer::Producer;
        if let Err(err) = self.producer.flush(timeout) {
            tracing::warn!(%err, "dead-letter producer did not flush");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_utf8("abc", 10), "abc");
        assert_eq!(truncate_utf8("abc", 2), "ab");
        // "검" is 3 bytes: cutting inside it keeps what precedes it.
        assert_eq!(truncate_utf8("a검색", 2), "a");
        assert_eq!(truncate_utf8("a검색", 4), "a검");
        assert_eq!(truncate_utf8("", 0), "");
    }
}

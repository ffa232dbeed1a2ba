//! Intake: records from librdkafka into the batcher, in bursts; stale
//! records dropped, a log that went back refused.

use super::*;

impl<S: Sink> Loop<S> {
    /// Takes the messages librdkafka already holds, without another turn of
    /// the loop: a turn (timers, task set, gauges) cost more than decoding a
    /// record. Stops at [`BURST`] records, when none is ready, at an error,
    /// or when a batch seals, so writes still start and timers still fire
    /// promptly.
    /// What each turn would do between messages is still done where it
    /// matters: a rebalance inside a poll purges before the next record is
    /// added; a seek a finished batch asked for waits at most one burst,
    /// and what was fetched meanwhile is purged by it. The burst's records
    /// all arrived `now` as far as linger goes: a burst lasts milliseconds,
    /// and reading the clock per record showed in profiles.
    pub(super) fn take_ready(&mut self, now: Instant) {
        for _ in 0..BURST {
            if !self.taking() || self.batcher.has_sealed() {
                return;
            }
            let rebalances = self.shared.rebalances.load(Ordering::Relaxed);
            let Some(message) = self.consumer.recv().now_or_never() else {
                return;
            };
            let message = message.map(|m| detach(&self.topic, &m));
            if self.shared.rebalances.load(Ordering::Relaxed) != rebalances {
                self.purge_revoked();
            }
            // Errors come in bursts too (a broker down): one warning per
            // burst, not one per error.
            if !self.take(message, now) {
                return;
            }
        }
    }

    /// Adds a received record to the open batch, or logs the consumer
    /// error; false for an error.
    pub(super) fn take(&mut self, message: KafkaResult<Record>, now: Instant) -> bool {
        match message {
            Ok(record) => {
                self.accept(record, now);
                true
            }
            Err(err) => {
                report_consumer_error(&err);
                *lock(&self.shared.last_error) = Some(err.to_string());
                false
            }
        }
    }

    /// Adds a fetched record to the open batch, unless it is stale.
    pub(super) fn accept(&mut self, record: Record, now: Instant) {
        let accepted = self
            .shared
            .tracker()
            .accept(record.partition, record.offset);
        let resumed_from = match accepted {
            Ok(resumed_from) => resumed_from,
            Err(Skip::NotOwned | Skip::Refused) => return,
            Err(Skip::Stale { expected }) => {
                self.stale.increment(1);
                // Once per run of stale records, not once per record.
                if self.stale_runs.insert(record.partition) {
                    tracing::warn!(
                        partition = record.partition,
                        expected,
                        got = record.offset,
                        "dropping records fetched before a seek, below where this partition resumes"
                    );
                }
                return;
            }
            Err(Skip::WentBack { expected, last }) => {
                self.refuse_went_back(record.partition, record.offset, expected, last);
                return;
            }
        };
        self.stale_runs.remove(&record.partition);
        if record.offset > resumed_from {
            // Kafka only skips offsets for transaction markers or compaction;
            // neither applies to Logstash's topics. Anything else means the
            // broker skipped records: say so loudly.
            self.gaps
                .increment(u64::try_from(record.offset - resumed_from).unwrap_or(0));
            tracing::warn!(
                partition = record.partition,
                expected = resumed_from,
                got = record.offset,
                "offset gap: the broker returned a later offset than requested"
            );
        }
        self.consumed.increment(1);
        let decoded = self.sink.decode(&record);
        self.batcher.push(record, decoded, resumed_from, now);
    }

    /// Refuses a partition whose log went back under the fetcher: what was
    /// read before is still written and committed, nothing after is read.
    pub(super) fn refuse_went_back(
        &mut self,
        partition: i32,
        got: i64,
        expected: i64,
        last: Option<i64>,
    ) {
        let what = if last.is_some() {
            "its fetcher went back below a record this service already read"
        } else {
            "its fetcher started below the offset it was given (not in the log)"
        };
        tracing::error!(
            topic = %self.topic,
            partition,
            offset = got,
            last_read = last,
            resume_offset = expected,
            "partition refused: {what}, so the log was truncated or replaced under it (an unclean \
             leader election, a recreated topic, a failover to a mirror; librdkafka logs its \
             offset reset). Records the new log holds below the resume offset were never read. \
             What was read before is written and committed; nothing more of this partition is \
             read by this replica. Check what the log holds: a restart, or a rebalance assigning it \
             again, resumes it at its stored offset (refused again if that lies \
             beyond the log's end, until --reset-offsets-beyond-log-end says where to start); \
             to read the new log from elsewhere, move the group's committed offset (and, for \
             redis-sink, the fence, docs/redis-keys.md) while the service is stopped"
        );
        if let Err(err) = self
            .consumer
            .pause(&offsets_list(&self.topic, &[(partition, 0)]))
        {
            tracing::warn!(%err, partition, "cannot pause a refused partition; its records are dropped");
        }
        lock(&self.shared.refused).insert(partition);
        let context = self.consumer.context();
        context.publish_refused(&[partition], 1.0);
        context.forget_stalls(&[partition]);
        context.set_owned();
    }
}

/// Copies a message out of librdkafka's buffer (a batch outlives the poll).
pub(super) fn detach(topic: &Arc<str>, message: &BorrowedMessage<'_>) -> Record {
    Record {
        topic: Arc::clone(topic),
        partition: message.partition(),
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        // Copied as bytes: reading keys as strings (Headers::iter) panics
        // on a key that is not UTF-8, which any producer may send.
        headers: message.headers().map(BorrowedHeaders::detach),
    }
}

/// Counts a consumer error (`sink_retries_total`, by kind), then logs it,
/// saying what to fix when it is the client's setup.
fn report_consumer_error(err: &rdkafka::error::KafkaError) {
    let kind = kafka_error_kind(err);
    // Counted before it is logged: whoever reads the log line
    // (an operator, an alert on logs, a test) finds the count.
    crate::metrics::retry("consume", kind);
    if err.rdkafka_error_code() == Some(RDKafkaErrorCode::InconsistentGroupProtocol) {
        tracing::error!(
            %err,
            "this member cannot join its group: the members in it use another kind \
             of partition.assignment.strategy (cooperative-sticky here; eager range or \
             roundrobin there, as versions before cooperative rebalancing). Stop the \
             old members first, or set --kafka-option \
             partition.assignment.strategy=range (deploy/README.md)"
        );
    } else if matches!(kind, "kafka_authentication" | "kafka_tls") {
        tracing::error!(
            %err,
            "Kafka refused this client's TLS or credentials, and nothing is consumed \
             until they are fixed: check security.protocol, sasl.mechanism, \
             sasl.username / sasl.password and the ssl.*.location files in \
             --kafka-options-file (KAFKA_OPTIONS_FILE) or KAFKA_OPTIONS \
             (docs/security.md)"
        );
    } else if kind == "kafka_authorization" {
        tracing::error!(
            %err,
            "Kafka's ACLs refuse this client: its principal needs Read and Describe \
             on the topic, Read on the consumer group, and Write and Describe on the \
             dead-letter topic"
        );
    } else {
        tracing::warn!(%err, "Kafka consumer error");
    }
}

/// The `kind` label of a consumer error librdkafka retries by itself: a
/// handful of values, so that an alert can tell a refused login from a
/// broker that is down.
fn kafka_error_kind(err: &rdkafka::error::KafkaError) -> &'static str {
    use RDKafkaErrorCode as Code;
    match err.rdkafka_error_code() {
        Some(Code::Authentication | Code::SaslAuthenticationFailed) => "kafka_authentication",
        Some(Code::SSL) => "kafka_tls",
        Some(
            Code::TopicAuthorizationFailed
            | Code::GroupAuthorizationFailed
            | Code::ClusterAuthorizationFailed,
        ) => "kafka_authorization",
        Some(Code::AllBrokersDown | Code::BrokerTransportFailure) => "kafka_unreachable",
        _ => "kafka_other",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use tracing_subscriber::layer::{Context, SubscriberExt as _};
    use tracing_subscriber::Layer;

    use super::report_consumer_error;

    /// Renders /metrics at each event logged.
    struct MetricsAtEachEvent {
        handle: PrometheusHandle,
        seen: Arc<Mutex<Vec<String>>>,
    }

    impl<S: tracing::Subscriber> Layer<S> for MetricsAtEachEvent {
        fn on_event(&self, _: &tracing::Event<'_>, _: Context<'_, S>) {
            crate::lock(&self.seen).push(self.handle.render());
        }
    }

    /// Whoever reads a consumer error's log line, then scrapes /metrics,
    /// finds it counted (a test that did so once found 0).
    #[test]
    fn a_consumer_error_is_counted_when_its_line_is_logged() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(MetricsAtEachEvent {
            handle: recorder.handle(),
            seen: Arc::clone(&seen),
        });
        metrics::with_local_recorder(&recorder, || {
            tracing::subscriber::with_default(subscriber, || {
                report_consumer_error(&KafkaError::MessageConsumption(
                    RDKafkaErrorCode::Authentication,
                ));
            });
        });
        let seen = crate::lock(&seen);
        assert_eq!(seen.len(), 1, "one line logged");
        assert!(
            seen[0].contains(
                "sink_retries_total{operation=\"consume\",kind=\"kafka_authentication\"} 1"
            ),
            "{}",
            seen[0]
        );
    }
}

//! The service's own flags (the Kafka and batching ones are
//! [`sink_core::ConsumerArgs`]), checked into [`RedisSettings`].

use crate::decode::DecodeRules;
use crate::keys::Keys;
use crate::plan::Retention;

/// Settings of the Redis sink.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Key names.
    pub keys: Keys,
    /// The consumer group (names an offsets hash of the layout before the
    /// `{rank}` hash tag: see [`crate::legacy`]).
    pub group: String,
    /// Retention of buckets and histories.
    pub retention: Retention,
    /// Decoding limits.
    pub rules: DecodeRules,
    /// Replicas that must hold a batch's histories before its counts and
    /// offsets move; `None` to not wait.
    pub replica_acks: Option<ReplicaAcks>,
}

/// `WAIT replicas timeout_ms` after a batch's histories, before its
/// ranking scripts (see `sink::HistoryWrites`).
#[derive(Debug, Clone, Copy)]
pub struct ReplicaAcks {
    /// Replicas of every primary that must acknowledge.
    pub replicas: u32,
    /// How long to wait for them before the write fails and is retried.
    pub timeout_ms: u64,
}

impl ReplicaAcks {
    /// `WAIT replicas timeout_ms`.
    pub fn command(&self) -> redis::Cmd {
        let mut wait = redis::cmd("WAIT");
        wait.arg(self.replicas).arg(self.timeout_ms);
        wait
    }
}

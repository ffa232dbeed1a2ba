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
}

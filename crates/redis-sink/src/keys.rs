//! The Redis key contract (docs/redis-keys.md): the web service and the
//! `top` / `history` commands read exactly these names.
//!
//! One layout on a standalone Redis and on a Redis Cluster: every key the
//! ranking script touches (the rankings, the offsets fence) carries the
//! hash tag [`RANK_TAG`], so that on a cluster they share one hash slot,
//! stay in one atomic script and can be read in one `ZUNION`; histories
//! carry no tag and spread over the cluster's nodes.

use chrono::{DateTime, Utc};

use crate::decode::Kind;

/// The hash tag of the ranking side: Redis Cluster places a key by the part
/// between its first `{` and the next `}`, so every key holding it lands in
/// one slot.
pub const RANK_TAG: &str = "{rank}";

/// Builds key names under an optional prefix.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (empty by default).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// All-time ranking: ZSET member → count.
    pub fn total(&self, kind: Kind) -> String {
        format!("{}{RANK_TAG}:{}:total", self.prefix, kind.as_str())
    }

    /// Ranking of one UTC hour (`YYYYMMDDHH`): ZSET member → count.
    pub fn hour(&self, kind: Kind, hour: &str) -> String {
        format!("{}{RANK_TAG}:{}:h:{hour}", self.prefix, kind.as_str())
    }

    /// Ranking of one UTC minute (`YYYYMMDDHHMM`): ZSET member → count.
    pub fn minute(&self, kind: Kind, minute: &str) -> String {
        format!("{}{RANK_TAG}:{}:m:{minute}", self.prefix, kind.as_str())
    }

    /// The bucket holding one span of time.
    pub fn bucket(&self, kind: Kind, bucket: Bucket) -> String {
        match bucket {
            Bucket::Hour(hour) => self.hour(kind, &hour_bucket(hour * MS_PER_HOUR)),
            Bucket::Minute(minute) => self.minute(kind, &minute_bucket(minute * MS_PER_MINUTE)),
        }
    }

    /// A user's recent items: ZSET member → event time in ms.
    pub fn history(&self, kind: Kind, user: &str) -> String {
        format!("{}history:{}:{user}", self.prefix, kind.as_str())
    }

    /// HASH of the writers' settings readers must follow:
    /// `bucket_ttl_secs`, the retention of the minute and hour buckets, and
    /// after a change `previous_ttl_secs` and `since_ms`
    /// ([`crate::window::Recorded`]).
    pub fn settings(&self) -> String {
        format!("{}{RANK_TAG}:settings", self.prefix)
    }

    /// HASH partition → next offset to apply, per topic: written by the
    /// same script as the data it covers. Not per consumer group: the
    /// rankings under this prefix are one set of counts whatever group fills
    /// them, so a renamed group (a blue/green deploy) continues where the
    /// old one stopped, and two groups running at once fence each other.
    pub fn offsets(&self, topic: &str) -> String {
        format!("{}{RANK_TAG}:offsets:{topic}", self.prefix)
    }
}

/// Milliseconds in a minute.
pub const MS_PER_MINUTE: i64 = 60_000;
/// Milliseconds in an hour.
pub const MS_PER_HOUR: i64 = 3_600_000;

/// One ranking bucket: a UTC hour or minute, numbered since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bucket {
    /// Hour `n` since the epoch.
    Hour(i64),
    /// Minute `n` since the epoch.
    Minute(i64),
}

impl Bucket {
    /// When the bucket's span ends, ms since the epoch.
    pub fn end_ms(self) -> i64 {
        match self {
            Self::Hour(hour) => (hour + 1) * MS_PER_HOUR,
            Self::Minute(minute) => (minute + 1) * MS_PER_MINUTE,
        }
    }
}

/// The hourly bucket of a time: `YYYYMMDDHH` in UTC.
pub fn hour_bucket(time_ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(time_ms)
        .unwrap_or_default()
        .format("%Y%m%d%H")
        .to_string()
}

/// The minute bucket of a time: `YYYYMMDDHHMM` in UTC.
pub fn minute_bucket(time_ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(time_ms)
        .unwrap_or_default()
        .format("%Y%m%d%H%M")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let keys = Keys::new("");
        assert_eq!(keys.total(Kind::Search), "{rank}:search:total");
        assert_eq!(
            keys.hour(Kind::Movie, "2024050112"),
            "{rank}:movie:h:2024050112"
        );
        assert_eq!(keys.history(Kind::Search, "u1"), "history:search:u1");
        assert_eq!(keys.offsets("user3"), "{rank}:offsets:user3");
        assert_eq!(
            Keys::new("prod:").total(Kind::Movie),
            "prod:{rank}:movie:total"
        );
    }

    #[test]
    fn hour_bucket_is_utc() {
        // 2024-05-01T12:59:59.999Z
        assert_eq!(hour_bucket(1_714_568_399_999), "2024050112");
        assert_eq!(hour_bucket(1_714_568_400_000), "2024050113");
        assert_eq!(minute_bucket(1_714_568_399_999), "202405011259");
        assert_eq!(
            Keys::default().bucket(
                Kind::Search,
                Bucket::Minute(1_714_568_400_000 / MS_PER_MINUTE)
            ),
            "{rank}:search:m:202405011300"
        );
    }
}

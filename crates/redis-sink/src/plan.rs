//! The pure half of a write: one partition's actions in a batch → the keys
//! and arguments of one atomic script call ([`crate::script`]).
//!
//! Pre-aggregated: N events with K distinct (key, member) pairs cost K
//! increments, and each (user, item) is written once with its latest time.
//! Deterministic (sorted maps), so tests compare whole plans.

use std::collections::BTreeMap;

use crate::action::Action;
use crate::keys::{hour_bucket, Keys};

/// Retention settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Hourly buckets expire this long after their last write; events older
    /// than this update no bucket.
    pub bucket_ttl_secs: u64,
    /// Items kept per user history.
    pub history_size: usize,
    /// Histories expire this long after their last write.
    pub history_ttl_secs: u64,
}

/// Where a partition's batch sits in the offset sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetFence {
    /// The offsets hash.
    pub key: String,
    /// The hash field: the partition.
    pub field: String,
    /// The batch's first offset: applied only if Redis is not past it.
    pub first: i64,
    /// Stored when applied.
    pub next: i64,
}

/// Keys and arguments of one script call, in the layout the script reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// KEYS: the offsets hash first, then each history key, then each
    /// ranking key (the script writes idempotent histories first).
    pub keys: Vec<String>,
    /// ARGV: field, first, next, history size, then per data key: op, ttl,
    /// pair count, pairs.
    pub args: Vec<String>,
    /// Redis commands the script will run (for the benchmark's figure).
    pub commands: usize,
}

/// Builds the script call for one partition of a batch.
pub fn build<'a>(
    keys: &Keys,
    retention: Retention,
    fence: OffsetFence,
    actions: impl IntoIterator<Item = &'a Action>,
    now_ms: i64,
) -> Plan {
    let bucket_cutoff_ms = now_ms.saturating_sub(
        i64::try_from(retention.bucket_ttl_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000),
    );
    // key → (ttl, member → count)
    let mut counts: BTreeMap<String, (u64, BTreeMap<&str, u64>)> = BTreeMap::new();
    // key → member → latest time
    let mut histories: BTreeMap<String, BTreeMap<&str, i64>> = BTreeMap::new();
    for action in actions {
        let member = action.member.as_str();
        *counts
            .entry(keys.total(action.kind))
            .or_insert((0, BTreeMap::new()))
            .1
            .entry(member)
            .or_default() += 1;
        if action.time_ms >= bucket_cutoff_ms {
            let key = keys.hour(action.kind, &hour_bucket(action.time_ms));
            *counts
                .entry(key)
                .or_insert((retention.bucket_ttl_secs, BTreeMap::new()))
                .1
                .entry(member)
                .or_default() += 1;
        }
        if let Some(user) = &action.user {
            let latest = histories
                .entry(keys.history(action.kind, user))
                .or_default()
                .entry(member)
                .or_insert(action.time_ms);
            *latest = (*latest).max(action.time_ms);
        }
    }

    let mut plan = Plan {
        keys: vec![fence.key],
        args: vec![
            fence.field,
            fence.first.to_string(),
            fence.next.to_string(),
            retention.history_size.to_string(),
        ],
        commands: 2, // HGET + HSET of the offset
    };
    for (key, members) in histories {
        plan.keys.push(key);
        plan.args.extend([
            "hist".to_owned(),
            retention.history_ttl_secs.to_string(),
            members.len().to_string(),
        ]);
        plan.commands += members.len().div_ceil(crate::script::ZADD_CHUNK) + 2;
        for (member, time) in members {
            plan.args.extend([time.to_string(), member.to_owned()]);
        }
    }
    for (key, (ttl, members)) in counts {
        plan.keys.push(key);
        plan.args.extend([
            "incr".to_owned(),
            ttl.to_string(),
            members.len().to_string(),
        ]);
        plan.commands += members.len() + usize::from(ttl > 0);
        for (member, count) in members {
            plan.args.extend([member.to_owned(), count.to_string()]);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::Kind;

    const RETENTION: Retention = Retention {
        bucket_ttl_secs: 3600,
        history_size: 50,
        history_ttl_secs: 600,
    };
    // 2024-05-01T12:00:00Z
    const NOW: i64 = 1_714_564_800_000;

    fn action(kind: Kind, member: &str, user: Option<&str>, time_ms: i64) -> Action {
        Action {
            kind,
            member: member.into(),
            user: user.map(Into::into),
            time_ms,
        }
    }

    fn fence() -> OffsetFence {
        OffsetFence {
            key: "offsets:g:user3".into(),
            field: "1".into(),
            first: 10,
            next: 15,
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn aggregates_counts_and_latest_history() {
        let actions = [
            action(Kind::Search, "parasite", Some("u1"), NOW - 1000),
            action(Kind::Search, "parasite", Some("u1"), NOW - 5000),
            action(Kind::Search, "parasite", None, NOW - 2000),
            action(Kind::Movie, "m7", Some("u2"), NOW - 10),
            // Older than the bucket TTL: totals and history, no bucket.
            action(Kind::Search, "old", Some("u1"), NOW - 3_600_001),
        ];
        let plan = build(&Keys::default(), RETENTION, fence(), &actions, NOW);
        assert_eq!(
            plan.keys,
            strings(&[
                "offsets:g:user3",
                "history:movie:u2",
                "history:search:u1",
                "rank:movie:h:2024050111",
                "rank:movie:total",
                "rank:search:h:2024050111",
                "rank:search:total",
            ])
        );
        assert_eq!(
            plan.args,
            strings(&[
                "1",
                "10",
                "15",
                "50",
                "hist",
                "600",
                "1",
                "1714564799990",
                "m7",
                "hist",
                "600",
                "2",
                "1714561199999",
                "old",
                "1714564799000",
                "parasite",
                "incr",
                "3600",
                "1",
                "m7",
                "1",
                "incr",
                "0",
                "1",
                "m7",
                "1",
                "incr",
                "3600",
                "1",
                "parasite",
                "3",
                "incr",
                "0",
                "2",
                "old",
                "1",
                "parasite",
                "3",
            ])
        );
    }

    #[test]
    fn an_empty_partition_only_moves_the_offset() {
        let plan = build(&Keys::default(), RETENTION, fence(), &[], NOW);
        assert_eq!(plan.keys, strings(&["offsets:g:user3"]));
        assert_eq!(plan.args, strings(&["1", "10", "15", "50"]));
    }
}

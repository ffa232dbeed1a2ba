//! The pure half of a write: one partition's actions in a batch → the
//! Redis work that applies them.
//!
//! Two parts, sent in this order (see [`crate::script`] for why the split is
//! safe):
//! - [`History`] writes: `ZADD GT`, trim, `PEXPIREAT`, as plain commands. They
//!   are idempotent, so a replay or a stale consumer re-applying them
//!   changes nothing, and they need no fence.
//! - one script call that checks the partition's stored offset, counts the
//!   rankings and stores the next offset, atomically: counting twice is the
//!   one thing that must never happen.
//!
//! Pre-aggregated: N events with K distinct (key, member) pairs cost K
//! increments, and each (user, item) is written once with its latest time.
//! Deterministic (sorted maps), so tests compare whole plans.

use std::collections::BTreeMap;

use crate::decode::{Action, Kind};
use crate::keys::{Bucket, Keys, MS_PER_HOUR, MS_PER_MINUTE};

/// Retention settings: what bounds the memory the rankings and histories
/// take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Minute and hour buckets are kept this long after their span ends:
    /// the longest window a reader can ask for. Events whose bucket would
    /// already be gone update no bucket (the total still counts them).
    pub bucket_ttl_secs: u64,
    /// Members the all-time rankings keep: after each batch, those beyond
    /// the highest `ranked_cap` are removed. 0 keeps every member.
    pub ranked_cap: u64,
    /// Items kept per user history.
    pub history_size: usize,
    /// Histories expire this long after their last write.
    pub history_ttl_secs: u64,
}

/// Where a partition's batch sits in the offset sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetFence {
    /// The offsets hash ([`Keys::offsets`]).
    pub key: String,
    /// The hash field: the partition.
    pub field: String,
    /// The batch's first offset: applied only if Redis is not past it.
    pub first: i64,
    /// Stored when applied.
    pub next: i64,
}

/// One user history's new items: `ZADD key GT time member ...`, then trim to
/// the newest [`Retention::history_size`] and set its expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History<'a> {
    /// `history:{kind}:{user}`.
    pub key: String,
    /// (time, member), each member once with its latest time; at most
    /// `history_size` of them, the newest (older ones would be trimmed
    /// right away).
    pub items: Vec<(i64, &'a str)>,
}

/// Everything one partition's batch writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<'a> {
    /// Idempotent history writes, sent before the script.
    pub histories: Vec<History<'a>>,
    /// The script's KEYS: the offsets hash, then each ranking key.
    pub keys: Vec<String>,
    /// The script's ARGV: field, first, next, then per ranking key: expiry
    /// (unix seconds, 0 = none), member cap (0 = none), pair count, pairs
    /// (`member count`).
    pub args: Vec<String>,
}

/// Builds the writes for one partition of a batch.
pub fn build<'a>(
    keys: &Keys,
    retention: Retention,
    fence: OffsetFence,
    actions: impl IntoIterator<Item = &'a Action>,
    now_ms: i64,
) -> Plan<'a> {
    let bucket_ttl_ms = i64::try_from(retention.bucket_ttl_secs)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    // A bucket already past its retention is not written: it would expire
    // at once, and no window reads it.
    let kept = |bucket: Bucket| bucket.end_ms().saturating_add(bucket_ttl_ms) > now_ms;
    // Keyed by parts, not by key names: a name is formatted once per
    // distinct key, not once per event.
    // (kind, bucket or None for the total) → member → count
    let mut counts: BTreeMap<(Kind, Option<Bucket>), BTreeMap<&str, u64>> = BTreeMap::new();
    // (kind, user, member, time) of every event with a user; one sort
    // groups them, cheaper than a map per history.
    let mut seen: Vec<(Kind, &str, &str, i64)> = Vec::new();
    for action in actions {
        let member = action.member.as_str();
        *counts
            .entry((action.kind, None))
            .or_default()
            .entry(member)
            .or_default() += 1;
        for bucket in [
            Bucket::Hour(action.time_ms.div_euclid(MS_PER_HOUR)),
            Bucket::Minute(action.time_ms.div_euclid(MS_PER_MINUTE)),
        ] {
            if kept(bucket) {
                *counts
                    .entry((action.kind, Some(bucket)))
                    .or_default()
                    .entry(member)
                    .or_default() += 1;
            }
        }
        if let Some(user) = &action.user {
            seen.push((action.kind, user, member, action.time_ms));
        }
    }

    // By history and member, newest first: the first of each (history,
    // member) run holds the member's latest time.
    seen.sort_unstable_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)).then(b.3.cmp(&a.3)));
    seen.dedup_by(|later, first| (later.0, later.1, later.2) == (first.0, first.1, first.2));
    let histories = seen
        .chunk_by(|a, b| (a.0, a.1) == (b.0, b.1))
        .map(|items| {
            let (kind, user) = (items[0].0, items[0].1);
            let mut items: Vec<(i64, &str)> = items.iter().map(|&(_, _, m, t)| (t, m)).collect();
            // Newest first in Redis's order (score, then member), so that
            // keeping a prefix keeps exactly what the trim would keep.
            items.sort_unstable_by(|a, b| b.cmp(a));
            items.truncate(retention.history_size);
            History {
                key: keys.history(kind, user),
                items,
            }
        })
        .collect();
    let mut plan = Plan {
        histories,
        keys: vec![fence.key],
        args: vec![fence.field, fence.first.to_string(), fence.next.to_string()],
    };
    for ((kind, bucket), members) in counts {
        let (key, expire_at, cap) = match bucket {
            None => (keys.total(kind), 0, retention.ranked_cap),
            Some(bucket) => (
                keys.bucket(kind, bucket),
                (bucket.end_ms().saturating_add(bucket_ttl_ms)) / 1000,
                0,
            ),
        };
        plan.keys.push(key);
        plan.args.extend([
            expire_at.to_string(),
            cap.to_string(),
            members.len().to_string(),
        ]);
        for (member, count) in members {
            plan.args.extend([member.to_owned(), count.to_string()]);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETENTION: Retention = Retention {
        bucket_ttl_secs: 3600,
        ranked_cap: 0,
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
            key: "{rank}:offsets:user3".into(),
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
            // Its buckets ended more than the bucket TTL ago: totals and
            // history, no bucket.
            action(Kind::Search, "old", Some("u1"), NOW - 3_600_001),
        ];
        let plan = build(&Keys::default(), RETENTION, fence(), &actions, NOW);
        assert_eq!(
            plan.histories,
            vec![
                History {
                    key: "history:search:u1".into(),
                    items: vec![(NOW - 1000, "parasite"), (NOW - 3_600_001, "old")],
                },
                History {
                    key: "history:movie:u2".into(),
                    items: vec![(NOW - 10, "m7")],
                },
            ]
        );
        assert_eq!(
            plan.keys,
            strings(&[
                "{rank}:offsets:user3",
                "{rank}:search:total",
                "{rank}:search:h:2024050111",
                "{rank}:search:m:202405011159",
                "{rank}:movie:total",
                "{rank}:movie:h:2024050111",
                "{rank}:movie:m:202405011159",
            ])
        );
        // Buckets expire a bucket TTL after their span: 12:00 + 1 h.
        assert_eq!(
            plan.args,
            strings(&[
                "1",
                "10",
                "15", // fence
                "0",
                "0",
                "2",
                "old",
                "1",
                "parasite",
                "3", // search total
                "1714568400",
                "0",
                "1",
                "parasite",
                "3", // search, hour 11
                "1714568400",
                "0",
                "1",
                "parasite",
                "3", // search, 11:59
                "0",
                "0",
                "1",
                "m7",
                "1", // movie total
                "1714568400",
                "0",
                "1",
                "m7",
                "1", // movie, hour 11
                "1714568400",
                "0",
                "1",
                "m7",
                "1", // movie, 11:59
            ])
        );
    }

    #[test]
    fn a_history_carries_only_what_the_trim_would_keep() {
        let retention = Retention {
            history_size: 3,
            ..RETENTION
        };
        // Five items; two share the newest time: Redis ranks ties by
        // member, so "b" outranks "a".
        let actions = [
            action(Kind::Movie, "m1", Some("u"), NOW - 50),
            action(Kind::Movie, "a", Some("u"), NOW),
            action(Kind::Movie, "m2", Some("u"), NOW - 40),
            action(Kind::Movie, "b", Some("u"), NOW),
            action(Kind::Movie, "m3", Some("u"), NOW - 30),
            action(Kind::Movie, "m1", Some("u"), NOW - 20),
        ];
        let plan = build(&Keys::default(), retention, fence(), &actions, NOW);
        assert_eq!(
            plan.histories,
            vec![History {
                key: "history:movie:u".into(),
                items: vec![(NOW, "b"), (NOW, "a"), (NOW - 20, "m1")],
            }]
        );
    }

    #[test]
    fn anonymous_events_rank_but_write_no_history() {
        let actions = [action(Kind::Search, "joker", None, NOW)];
        let plan = build(&Keys::new("p:"), RETENTION, fence(), &actions, NOW);
        assert!(plan.histories.is_empty());
        assert_eq!(
            plan.keys,
            strings(&[
                "{rank}:offsets:user3",
                "p:{rank}:search:total",
                "p:{rank}:search:h:2024050112",
                "p:{rank}:search:m:202405011200"
            ])
        );
    }

    #[test]
    fn a_late_event_counts_in_the_buckets_still_kept() {
        let retention = Retention {
            ranked_cap: 3,
            ..RETENTION
        };
        // 11:00:30: minute 11:00 ended at 11:01, more than an hour ago;
        // hour 11 ends at 12:00 and is kept until 13:00.
        let actions = [action(Kind::Movie, "m1", None, NOW - 3_600_000 + 30_000)];
        let plan = build(&Keys::default(), retention, fence(), &actions, NOW + 60_000);
        assert_eq!(
            plan.keys,
            strings(&[
                "{rank}:offsets:user3",
                "{rank}:movie:total",
                "{rank}:movie:h:2024050111"
            ])
        );
        // The total carries the cap.
        assert_eq!(&plan.args[3..8], strings(&["0", "3", "1", "m1", "1"]));
    }

    #[test]
    fn an_empty_partition_only_moves_the_offset() {
        let plan = build(&Keys::default(), RETENTION, fence(), &[], NOW);
        assert!(plan.histories.is_empty());
        assert_eq!(plan.keys, strings(&["{rank}:offsets:user3"]));
        assert_eq!(plan.args, strings(&["1", "10", "15"]));
    }
}

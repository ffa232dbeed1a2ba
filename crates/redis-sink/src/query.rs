//! Reading the rankings and histories back (the web service's view), with
//! read-only commands only: every read works on a replica and for a Redis
//! user that may only read.

use std::collections::HashMap;

use redis::aio::ConnectionLike;

use crate::decode::Kind;
use crate::keys::Keys;
use crate::window::{Recorded, Window};

/// One ranked member.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Ranked {
    /// Keyword or movie id.
    pub member: String,
    /// Number of events.
    pub count: u64,
}

/// One rising member: counted `count` times in the window, `previous`
/// times in the window before it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Rising {
    /// Keyword or movie id.
    pub member: String,
    /// Events in the window.
    pub count: u64,
    /// Events in the window before.
    pub previous: u64,
    /// How far `count` exceeds what `previous` predicts ([`rising`]).
    pub score: f64,
}

/// One history item.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Seen {
    /// Keyword or movie id.
    pub member: String,
    /// Latest event time, ms since the epoch.
    pub time_ms: i64,
}

/// Damps the rising score of small counts: see [`rising`].
pub const RISING_SMOOTHING: f64 = 10.0;

/// The members of a kind's window at `now_ms` (`back` windows earlier)
/// with their counts, in no particular order: every member (one `ZUNION`
/// of its buckets), or for all time the `all_time_limit` highest (one
/// `ZRANGE` of a ranking that holds up to `--max-ranked-members`). Never a
/// write.
pub async fn counts<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    kind: Kind,
    window: Window,
    back: u32,
    now_ms: i64,
    all_time_limit: usize,
) -> redis::RedisResult<Vec<(String, f64)>> {
    match window.buckets(now_ms, back) {
        None => highest_first(conn, &keys.total(kind), all_time_limit).await,
        Some(buckets) => {
            let sources: Vec<String> = buckets.iter().map(|b| keys.bucket(kind, *b)).collect();
            redis::cmd("ZUNION")
                .arg(sources.len())
                .arg(&sources)
                .arg("WITHSCORES")
                .query_async(conn)
                .await
        }
    }
}

/// The `limit` members with the highest counts, highest first (ties:
/// member descending, as `ZRANGE ... REV` orders them).
pub fn top(mut counts: Vec<(String, f64)>, limit: usize) -> Vec<Ranked> {
    counts.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    counts.truncate(limit);
    counts
        .into_iter()
        .map(|(member, score)| Ranked {
            member,
            count: as_count(score),
        })
        .collect()
}

/// The `limit` members whose count most exceeds the window before's.
///
/// The score is how many standard deviations `count` lies above what the
/// previous window predicts, counts taken as Poisson:
/// `(count − expected) / √(expected + S)`, with `expected = previous ×
/// elapsed_share` (the current window has run only `elapsed_share` of its
/// span, [`Window::elapsed_share`]) and `S` = [`RISING_SMOOTHING`], which
/// keeps a jump from 1 to 3 (score 0.6) below one from 1,000 to 2,000
/// (31.5) and a new member needs about ten events to score 3. Only members
/// above their expectation rise; ties go to the higher count, then the
/// member descending.
pub fn rising(
    current: Vec<(String, f64)>,
    previous: Vec<(String, f64)>,
    elapsed_share: f64,
    limit: usize,
) -> Vec<Rising> {
    let previous: HashMap<String, f64> = previous.into_iter().collect();
    let mut rising: Vec<Rising> = current
        .into_iter()
        .filter_map(|(member, count)| {
            let before = previous.get(&member).copied().unwrap_or(0.0);
            let expected = before * elapsed_share;
            (count > expected).then(|| Rising {
                score: (count - expected) / (expected + RISING_SMOOTHING).sqrt(),
                count: as_count(count),
                previous: as_count(before),
                member,
            })
        })
        .collect();
    rising.sort_unstable_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.count.cmp(&a.count))
            .then_with(|| b.member.cmp(&a.member))
    });
    rising.truncate(limit);
    rising
}

/// What the writers recorded of their bucket retention, if anything: a
/// reader refuses windows by it, whatever its own flag says.
pub async fn recorded_retention<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
) -> redis::RedisResult<Option<Recorded>> {
    let (ttl, previous, since): (Option<u64>, Option<u64>, Option<i64>) = redis::cmd("HMGET")
        .arg(keys.settings())
        .arg(&["bucket_ttl_secs", "previous_ttl_secs", "since_ms"][..])
        .query_async(conn)
        .await?;
    Ok(ttl.map(|ttl_secs| Recorded {
        ttl_secs,
        previous_secs: previous,
        since_ms: since,
    }))
}

/// Records a writer's bucket retention for readers, starting at `now_ms`;
/// returns the record before, if any.
pub async fn record_retention<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    bucket_ttl_secs: u64,
    now_ms: i64,
) -> redis::RedisResult<Option<Recorded>> {
    let script = redis::Script::new(crate::script::RECORD_RETENTION);
    let text = |v: Option<String>| v.unwrap_or_default();
    loop {
        let before = recorded_retention(conn, keys).await?;
        let after = Recorded::changed_to(before, bucket_ttl_secs, now_ms);
        if Some(after) == before {
            return Ok(before);
        }
        let set: i64 = script
            .key(keys.settings())
            .arg(text(before.map(|b| b.ttl_secs.to_string())))
            .arg(text(before.and_then(|b| b.since_ms).map(|s| s.to_string())))
            .arg(after.ttl_secs)
            .arg(text(after.previous_secs.map(|p| p.to_string())))
            .arg(text(after.since_ms.map(|s| s.to_string())))
            .invoke_async(conn)
            .await?;
        if set == 1 {
            return Ok(before);
        }
    }
}

/// A user's recent items, newest first.
pub async fn history<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    kind: Kind,
    user: &str,
    limit: usize,
) -> redis::RedisResult<Vec<Seen>> {
    let rows = highest_first(conn, &keys.history(kind, user), limit).await?;
    Ok(rows
        .into_iter()
        .map(|(member, score)| Seen {
            member,
            time_ms: score as i64,
        })
        .collect())
}

/// The `limit` highest-scored members of a ZSET, highest first (ties:
/// member descending, as `ZRANGE ... REV` orders them).
async fn highest_first<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    limit: usize,
) -> redis::RedisResult<Vec<(String, f64)>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let stop = isize::try_from(limit).unwrap_or(isize::MAX) - 1;
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(stop)
        .arg("REV")
        .arg("WITHSCORES")
        .query_async(conn)
        .await
}

fn as_count(score: f64) -> u64 {
    score.max(0.0).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
        pairs.iter().map(|(m, c)| ((*m).to_owned(), *c)).collect()
    }

    #[test]
    fn top_orders_as_redis_does() {
        let top = top(counts(&[("a", 2.0), ("c", 5.0), ("b", 5.0), ("d", 1.0)]), 3);
        let members: Vec<&str> = top.iter().map(|r| r.member.as_str()).collect();
        assert_eq!(members, ["c", "b", "a"]);
        assert_eq!(top[0].count, 5);
    }

    #[test]
    fn a_big_rise_beats_a_small_one() {
        let current = counts(&[
            ("small", 3.0),
            ("big", 2_000.0),
            ("new", 20.0),
            ("fell", 1.0),
        ]);
        let previous = counts(&[("small", 1.0), ("big", 1_000.0), ("fell", 9.0)]);
        let rising = rising(current, previous, 1.0, 10);
        let order: Vec<(&str, u64, u64)> = rising
            .iter()
            .map(|r| (r.member.as_str(), r.count, r.previous))
            .collect();
        assert_eq!(
            order,
            [("big", 2_000, 1_000), ("new", 20, 0), ("small", 3, 1)]
        );
        assert!((rising[0].score - 1_000.0 / 1_010f64.sqrt()).abs() < 1e-9);
        assert!((rising[2].score - 2.0 / 11f64.sqrt()).abs() < 1e-9);
    }

    #[test]
    fn a_window_just_begun_expects_a_share_of_the_previous() {
        // Half the window has run: 10 before predicts 5 now; 6 rises a little.
        let rising = rising(counts(&[("k", 6.0)]), counts(&[("k", 10.0)]), 0.5, 10);
        assert_eq!(rising.len(), 1);
        assert!((rising[0].score - 1.0 / 15f64.sqrt()).abs() < 1e-9);
        // With the whole window run, the same counts do not rise at all.
        assert!(super::rising(counts(&[("k", 6.0)]), counts(&[("k", 10.0)]), 1.0, 10).is_empty());
    }
}

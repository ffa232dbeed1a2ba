//! Reading the rankings and histories back (the web service's view).

use chrono::{DateTime, Duration, Utc};
use redis::aio::ConnectionLike;

use crate::decode::Kind;
use crate::keys::{hour_bucket, Keys};

/// How long a union of hourly rankings is reused by every reader: a live
/// ranking a few seconds old is fine, recomputing it per page view is not.
pub const TOP_CACHE_SECS: u64 = 5;

/// One ranked member.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Ranked {
    /// Keyword or movie id.
    pub member: String,
    /// Number of events.
    pub count: u64,
}

/// One history item.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Seen {
    /// Keyword or movie id.
    pub member: String,
    /// Latest event time, ms since the epoch.
    pub time_ms: i64,
}

/// The hourly bucket names covering the last `hours` hours up to `now`.
pub fn recent_hours(now: DateTime<Utc>, hours: u32) -> Vec<String> {
    (0..i64::from(hours))
        .map(|h| hour_bucket((now - Duration::hours(h)).timestamp_millis()))
        .collect()
}

/// Top `limit` members of a kind: all time, or over the last `hours` hours
/// (the current hour included).
pub async fn top<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    kind: Kind,
    hours: Option<u32>,
    limit: usize,
    now: DateTime<Utc>,
) -> redis::RedisResult<Vec<Ranked>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let key = match hours {
        None => keys.total(kind),
        Some(hours) => {
            let buckets = recent_hours(now, hours.max(1));
            let cache = keys.top_cache(kind, hours, &buckets[0]);
            let cached: bool = redis::cmd("EXISTS").arg(&cache).query_async(conn).await?;
            if !cached {
                let sources: Vec<String> = buckets.iter().map(|b| keys.hour(kind, b)).collect();
                redis::pipe()
                    .atomic()
                    .cmd("ZUNIONSTORE")
                    .arg(&cache)
                    .arg(sources.len())
                    .arg(&sources)
                    .ignore()
                    .cmd("EXPIRE")
                    .arg(&cache)
                    .arg(TOP_CACHE_SECS)
                    .ignore()
                    .query_async::<()>(conn)
                    .await?;
            }
            cache
        }
    };
    let rows = newest_first(conn, &key, limit).await?;
    Ok(rows
        .into_iter()
        .map(|(member, score)| Ranked {
            member,
            count: score.max(0.0).round() as u64,
        })
        .collect())
}

/// A user's recent items, newest first.
pub async fn history<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    kind: Kind,
    user: &str,
    limit: usize,
) -> redis::RedisResult<Vec<Seen>> {
    let rows = newest_first(conn, &keys.history(kind, user), limit).await?;
    Ok(rows
        .into_iter()
        .map(|(member, score)| Seen {
            member,
            time_ms: score as i64,
        })
        .collect())
}

/// The `limit` highest-scored members of a ZSET, highest first (ties: member
/// descending, as ZRANGE REV orders them).
async fn newest_first<C: ConnectionLike>(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_hours_count_back_from_the_current_hour() {
        let now = DateTime::<Utc>::from_timestamp_millis(1_714_564_800_000).unwrap_or_default(); // 2024-05-01T12:00Z
        assert_eq!(
            recent_hours(now, 3),
            vec!["2024050112", "2024050111", "2024050110"]
        );
    }
}

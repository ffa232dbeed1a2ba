//! Moving a standalone Redis from the layout before the `{rank}` hash tag
//! (`rank:*`, `offsets:{topic}`, `offsets:{group}:{topic}`) to the present
//! one (docs/redis-keys.md, "Upgrading"), once, at start.
//!
//! The move is one script: the rankings are renamed, each old offsets hash
//! is merged into its topic's new fence (the larger offset per partition,
//! as versions before read them), and every old offsets hash is replaced by
//! a string saying where it went. An older redis-sink still running (a
//! rolling upgrade) then fails its first fence read (`WRONGTYPE`) and
//! counts nothing more under the old names: it stops, visibly, instead of
//! counting into keys nobody reads or counting twice. Its partitions move
//! to upgraded replicas, which resume at the moved fence.
//!
//! Only keys of the old contract's shape move (`rank:{search,movie}:total`,
//! `rank:{search,movie}:h:{10 digits}`, offsets hashes of integers): with
//! the default empty prefix other applications' keys share the keyspace.
//!
//! A cluster never held the old layout (redis-sink refused clusters before
//! it): one loaded from an old dump is refused at start rather than started
//! with empty rankings.

use anyhow::Context;
use redis::Script;

use crate::client::RedisConn;
use crate::decode::Kind;
use crate::keys::{hour_bucket, Keys, MS_PER_HOUR, RANK_TAG};

/// KEYS: the old offsets hashes (`n` of them, ARGV[1]), each followed by
/// the new fence of its topic; then pairs (old ranking key, new name).
/// ARGV[2]: what the old offsets keys say once moved.
/// Returns the number of keys moved; 0 when there was nothing to move (an
/// instance beside this one moved them first).
const MOVE_LAYOUT: &str = r"
local n = tonumber(ARGV[1])
local any = false
for i = 1, 2 * n, 2 do
  if redis.call('TYPE', KEYS[i])['ok'] == 'hash' then any = true end
end
if not any then return 0 end
for i = 2 * n + 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 and redis.call('EXISTS', KEYS[i + 1]) == 1 then
    return redis.error_reply('both ' .. KEYS[i] .. ' (the layout before the {rank} hash tag) and ' .. KEYS[i + 1] .. ' exist: counts would merge twice. Keep one (docs/redis-keys.md, Upgrading), then restart')
  end
end
local moved = 0
for i = 1, 2 * n, 2 do
  if redis.call('TYPE', KEYS[i])['ok'] == 'hash' then
    local fields = redis.call('HGETALL', KEYS[i])
    for f = 1, #fields, 2 do
      local have = tonumber(redis.call('HGET', KEYS[i + 1], fields[f]))
      if not have or tonumber(fields[f + 1]) > have then
        redis.call('HSET', KEYS[i + 1], fields[f], fields[f + 1])
      end
    end
    redis.call('SET', KEYS[i], ARGV[2] .. KEYS[i + 1])
    moved = moved + 1
  end
end
for i = 2 * n + 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], KEYS[i + 1])
    moved = moved + 1
  end
end
return moved
";

/// What an old offsets key holds once moved (followed by the new name).
const MOVED: &str = "moved by redis-sink to the {rank} layout (docs/redis-keys.md, Upgrading): \
                     versions before it cannot write here; the fence is now ";

/// Where the old layout's hour buckets may have been created between the
/// scan and the move (an older version still writing): every hour from
/// `from_ms` to `to_ms`.
#[derive(Debug, Clone, Copy)]
pub struct RecentHours {
    /// Oldest event time that still updates a bucket.
    pub from_ms: i64,
    /// Newest event time accepted.
    pub to_ms: i64,
}

/// Moves the old layout under `prefix` to the present one if this Redis
/// holds it (a standalone Redis only). `topic` and `group` name the old
/// offsets hashes looked at first: when neither exists, nothing else is
/// read. Returns the number of keys moved.
pub async fn move_old_layout(
    conn: &mut RedisConn,
    prefix: &str,
    topic: &str,
    group: &str,
    recent: RecentHours,
) -> anyhow::Result<u64> {
    let markers = [
        format!("{prefix}offsets:{topic}"),
        format!("{prefix}offsets:{group}:{topic}"),
        format!("{prefix}rank:search:total"),
        format!("{prefix}rank:movie:total"),
    ];
    let mut types = Vec::with_capacity(markers.len());
    for key in &markers {
        let t: String = redis::cmd("TYPE")
            .arg(key)
            .query_async(conn)
            .await
            .context("TYPE")?;
        types.push(t);
    }
    let old_layout =
        types[..2].iter().any(|t| t == "hash") || types[2..].iter().any(|t| t == "zset");
    if !old_layout {
        return Ok(0);
    }
    if conn.is_cluster() {
        anyhow::bail!(
            "this Redis Cluster holds keys of the layout before the {{rank}} hash tag ({}...): \
             they were copied from a standalone Redis. Start this version against that Redis \
             first (it moves them), or load the moved keys (docs/redis-keys.md, Upgrading)",
            markers
                .iter()
                .zip(&types)
                .find(|(_, t)| *t != "none")
                .map_or("", |(k, _)| k.as_str())
        );
    }
    let keys = Keys::new(prefix);
    let mut fences: Vec<(String, String)> = Vec::new();
    for old in scan(conn, &format!("{}offsets:*", glob_escape(prefix))).await? {
        if is_offsets_hash(conn, &old).await? {
            // A Kafka topic name holds no ':': offsets:{topic} or
            // offsets:{group}:{topic}.
            let topic = old.rsplit(':').next().unwrap_or_default().to_owned();
            let new = keys.offsets(&topic);
            fences.push((old, new));
        }
    }
    let mut rankings = old_rankings(conn, prefix).await?;
    for kind in [Kind::Search, Kind::Movie] {
        rankings.push(format!("{prefix}rank:{}:total", kind.as_str()));
        let mut hour = recent.from_ms.div_euclid(MS_PER_HOUR);
        while hour <= recent.to_ms.div_euclid(MS_PER_HOUR) {
            rankings.push(format!(
                "{prefix}rank:{}:h:{}",
                kind.as_str(),
                hour_bucket(hour * MS_PER_HOUR)
            ));
            hour += 1;
        }
    }
    rankings.sort_unstable();
    rankings.dedup();
    let script = Script::new(MOVE_LAYOUT);
    let mut invocation = script.prepare_invoke();
    for (old, new) in &fences {
        invocation.key(old).key(new);
    }
    for old in &rankings {
        let rest = old.strip_prefix(prefix).unwrap_or(old);
        let rest = rest.strip_prefix("rank:").unwrap_or(rest);
        invocation
            .key(old)
            .key(format!("{prefix}{RANK_TAG}:{rest}"));
    }
    invocation.arg(fences.len()).arg(MOVED);
    let mut moved: u64 = invocation
        .invoke_async(conn)
        .await
        .context("moving the keys of the layout before the {rank} hash tag")?;
    // Old writers are fenced off now: a bucket one created between the
    // scan and the move (an hour outside the window) is final; merge it.
    for old in old_rankings(conn, prefix).await? {
        let new = new_name(prefix, &old);
        let _: () = Script::new(MERGE_LEFTOVER)
            .key(&old)
            .key(&new)
            .invoke_async(conn)
            .await
            .with_context(|| format!("merging {old} into {new}"))?;
        moved += 1;
    }
    if moved > 0 {
        tracing::warn!(
            moved,
            prefix,
            "moved this Redis's rankings and offsets to the {{rank}} layout \
             (docs/redis-keys.md, Upgrading): older redis-sink versions still running stop \
             with WRONGTYPE errors, and their partitions continue here"
        );
    }
    Ok(moved)
}

/// Adds a leftover old ranking into its new key (keeping the new key's
/// expiry, or taking the old one's), then deletes it.
const MERGE_LEFTOVER: &str = r"
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  return
end
local ttl = redis.call('PTTL', KEYS[2])
if ttl < 0 then ttl = redis.call('PTTL', KEYS[1]) end
redis.call('ZUNIONSTORE', KEYS[2], 2, KEYS[2], KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
redis.call('DEL', KEYS[1])
";

/// The present name of the old ranking key `old`.
fn new_name(prefix: &str, old: &str) -> String {
    let rest = old.strip_prefix(prefix).unwrap_or(old);
    let rest = rest.strip_prefix("rank:").unwrap_or(rest);
    format!("{prefix}{RANK_TAG}:{rest}")
}

/// The old layout's ranking keys under `prefix`: only names of the old
/// contract's shape, sorted sets.
async fn old_rankings(conn: &mut RedisConn, prefix: &str) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    for key in scan(conn, &format!("{}rank:*", glob_escape(prefix))).await? {
        let rest = key.strip_prefix(prefix).unwrap_or(&key);
        if is_old_ranking_name(rest) {
            let t: String = redis::cmd("TYPE").arg(&key).query_async(conn).await?;
            if t == "zset" {
                found.push(key);
            }
        }
    }
    Ok(found)
}

/// `rank:{search,movie}:total` or `rank:{search,movie}:h:{YYYYMMDDHH}`.
fn is_old_ranking_name(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("rank:search:")
        .or_else(|| name.strip_prefix("rank:movie:"))
    else {
        return false;
    };
    rest == "total"
        || rest
            .strip_prefix("h:")
            .is_some_and(|hour| hour.len() == 10 && hour.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `key` is a hash of partition numbers to offsets.
async fn is_offsets_hash(conn: &mut RedisConn, key: &str) -> anyhow::Result<bool> {
    let t: String = redis::cmd("TYPE").arg(key).query_async(conn).await?;
    if t != "hash" {
        return Ok(false);
    }
    let fields: Vec<(String, String)> = redis::cmd("HGETALL").arg(key).query_async(conn).await?;
    Ok(fields
        .iter()
        .all(|(k, v)| k.parse::<i32>().is_ok() && v.parse::<i64>().is_ok()))
}

/// Every key matching `pattern` (SCAN: Redis keeps serving meanwhile).
async fn scan(conn: &mut RedisConn, pattern: &str) -> anyhow::Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .context("SCAN")?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// `text` matched literally in a SCAN pattern.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_the_old_contract_move() {
        assert!(is_old_ranking_name("rank:search:total"));
        assert!(is_old_ranking_name("rank:movie:h:2024050112"));
        for other in [
            "rank:search:h:20240501",
            "rank:users:total",
            "rank:movie:h:2024050112x",
            "rank:search:total:2",
        ] {
            assert!(!is_old_ranking_name(other), "{other}");
        }
        assert_eq!(new_name("p:", "p:rank:movie:total"), "p:{rank}:movie:total");
    }

    #[test]
    fn a_prefix_is_matched_literally() {
        assert_eq!(glob_escape("p:"), "p:");
        assert_eq!(glob_escape(r"a*b?[c]\"), r"a\*b\?\[c\]\\");
    }
}

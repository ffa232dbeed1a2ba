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
//! A cluster never held the old layout: redis-sink refused clusters before
//! it.

use anyhow::Context;
use redis::Script;

use crate::client::RedisConn;
use crate::decode::Kind;
use crate::keys::{hour_bucket, Keys, RANK_TAG};

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
    if conn.is_cluster() {
        return Ok(0);
    }
    let own = [
        format!("{prefix}offsets:{topic}"),
        format!("{prefix}offsets:{group}:{topic}"),
    ];
    let mut types = redis::pipe();
    for key in &own {
        types.cmd("TYPE").arg(key);
    }
    let types: Vec<String> = types.query_async(conn).await.context("TYPE")?;
    if !types.iter().any(|t| t == "hash") {
        return Ok(0);
    }
    let keys = Keys::new(prefix);
    let fences: Vec<(String, String)> = scan(conn, &format!("{}offsets:*", glob_escape(prefix)))
        .await?
        .into_iter()
        // A Kafka topic name holds no ':': offsets:{topic} or
        // offsets:{group}:{topic}.
        .filter_map(|old| {
            let topic = old.rsplit(':').next()?.to_owned();
            Some((old, keys.offsets(&topic)))
        })
        .collect();
    let mut rankings: Vec<String> = scan(conn, &format!("{}rank:*", glob_escape(prefix))).await?;
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
    let moved: u64 = invocation
        .invoke_async(conn)
        .await
        .context("moving the keys of the layout before the {rank} hash tag")?;
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

const MS_PER_HOUR: i64 = 3_600_000;

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
    fn a_prefix_is_matched_literally() {
        assert_eq!(glob_escape("p:"), "p:");
        assert_eq!(glob_escape(r"a*b?[c]\"), r"a\*b\?\[c\]\\");
    }
}

//! The one script that counts a partition's batch atomically: the rankings
//! and the partition's next offset change together, or not at all.
//!
//! It first compares the stored offset with the batch's first offset: the
//! batch applies only if it starts exactly where the partition stands.
//! Batch ranges of a partition chain without holes (sink-core makes a range
//! start where fetching resumed), so any other stored value means this
//! batch must not apply:
//! - ahead of it: a replay after a crash, or a stale consumer whose partition
//!   moved; the consumer resumes at the stored offset;
//! - behind it: records between were never applied (Redis lost its last
//!   writes, or a bug); the consumer goes back and applies them.
//!
//! Either way the stored offset is returned; -1 means applied.
//!
//! With nothing stored, what the sink knows decides (`origin`, the last
//! ARGV):
//! - the fence was never seen by this process: it begins with the first
//!   batch sent since the partition was taken (`origin`): applied, -3. A
//!   later batch finding none means Redis lost the fence's first writes
//!   with their counts (a failover to a replica that had not received
//!   them): `origin` is returned, and the consumer goes back there and
//!   counts again;
//! - it was seen (empty `origin`): -2, lost data that only an operator can
//!   judge (a restart without persistence, a deleted key); nothing applies.
//!
//! The user histories are not in the script: the sink writes them as plain
//! commands, and only once Redis has accepted all of them sends the script.
//! That is safe because a history write is idempotent and order-free
//! (`ZADD GT` keeps each item's latest time, the trim keeps the newest
//! `history size` by (time, member), `PEXPIREAT` sets the expiry to the
//! history TTL after the write): a replay or a stale consumer writing them
//! again leaves the same state, and a crash between the two steps only
//! means they are written again. A key of the wrong type fails the
//! histories before anything is counted. It is also what makes the sink
//! fast: inside a script every `redis.call` costs Redis about twice what
//! the same command costs sent directly (measured: docs/benchmarks.md), and
//! histories are most of the commands.

/// KEYS[1] offsets hash; KEYS[2..] ranking keys: all in the
/// [`crate::keys::RANK_TAG`] slot, so the script runs on a cluster too.
/// ARGV: field, first, next, then per ranking key: expiry (unix seconds,
/// 0 = none), member cap (0 = none), n, then n pairs `member count`; last,
/// the origin (empty for none).
///
/// A capped key keeps its `cap` highest members after the batch's
/// increments (`ZREMRANGEBYRANK` drops the lowest; ties go by member, as
/// Redis orders them): trimmed here, in the same atomic step, so a replay
/// can never count twice what a trim left.
///
/// Redis does not roll back a script that fails half way, and counting
/// twice is not harmless: every key's type, and the user's right to every
/// command the script sends (`redis.acl_check_cmd`, Redis >= 7), is checked
/// before the first `ZINCRBY`, so a script that increments anything runs to
/// the end, and a retried refusal counts nothing.
pub const APPLY_BATCH: &str = r"
local stored = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
local first = tonumber(ARGV[2])
local origin = tonumber(ARGV[#ARGV])
if stored == nil then
  if origin == nil or origin > first then
    return -2
  elseif origin < first then
    return origin
  end
elseif stored ~= first then
  return stored
end
local can = redis.acl_check_cmd
if can and not can('HSET', KEYS[1], ARGV[1], ARGV[3]) then
  return redis.error_reply('NOPERM the Redis user may not HSET ' .. KEYS[1] .. ': grant what docs/security.md lists')
end
for k = 2, #KEYS do
  local t = redis.call('TYPE', KEYS[k])['ok']
  if t ~= 'zset' and t ~= 'none' then
    return redis.error_reply('WRONGTYPE key ' .. KEYS[k] .. ' holds a ' .. t .. ', not a sorted set: remove or rename it')
  end
  if can and not (can('ZINCRBY', KEYS[k], '1', 'm') and can('EXPIREAT', KEYS[k], '1')
      and can('ZCARD', KEYS[k]) and can('ZREMRANGEBYRANK', KEYS[k], '0', '0')) then
    return redis.error_reply('NOPERM the Redis user may not ZINCRBY, EXPIREAT, ZCARD and ZREMRANGEBYRANK ' .. KEYS[k] .. ': grant what docs/security.md lists')
  end
end
local a = 4
for k = 2, #KEYS do
  local key, expire_at, cap, n = KEYS[k], tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  for i = 0, n - 1 do
    redis.call('ZINCRBY', key, ARGV[a + 2 * i + 1], ARGV[a + 2 * i])
  end
  if expire_at > 0 then
    redis.call('EXPIREAT', key, expire_at)
  end
  if cap > 0 then
    local excess = redis.call('ZCARD', key) - cap
    if excess > 0 then
      redis.call('ZREMRANGEBYRANK', key, 0, excess - 1)
    end
  end
  a = a + 2 * n
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if stored == nil then
  return -3
end
return -1
";

/// Moves the fence of partitions an operator reset
/// (`--reset-offsets-beyond-log-end`). `KEYS[1]`: the fence; `ARGV`:
/// triples (partition, from, to). A partition moves only if it still stands
/// at `from`, or has no fence yet (its start came from Kafka): a reset
/// arriving late must not move back a partition another owner has written
/// since. Returns the partitions that did not stand at `from`.
pub const RESET_FENCE: &str = r"
local moved_on = {}
for i = 1, #ARGV, 3 do
  local field, from, to = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local stored = tonumber(redis.call('HGET', KEYS[1], field))
  if stored == nil or stored == from then
    redis.call('HSET', KEYS[1], field, to)
  else
    moved_on[#moved_on + 1] = tonumber(field)
  end
end
return moved_on
";

/// Records the writers' bucket retention (`KEYS[1]`: the settings hash) if
/// the record still holds what the writer read (`ARGV[1]` ttl, `ARGV[2]`
/// since, empty for none): two writers starting at once must not both
/// build on the same record. Then sets ttl `ARGV[3]`, previous `ARGV[4]`
/// and since `ARGV[5]` (empty: removed). Returns 1 if set, 0 if the record
/// moved on.
pub const RECORD_RETENTION: &str = r"
local h = redis.call('HMGET', KEYS[1], 'bucket_ttl_secs', 'since_ms')
if (h[1] or '') ~= ARGV[1] or (h[2] or '') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'bucket_ttl_secs', ARGV[3])
local fields = {'previous_ttl_secs', 'since_ms'}
for i = 1, 2 do
  if ARGV[3 + i] == '' then
    redis.call('HDEL', KEYS[1], fields[i])
  else
    redis.call('HSET', KEYS[1], fields[i], ARGV[3 + i])
  end
end
return 1
";

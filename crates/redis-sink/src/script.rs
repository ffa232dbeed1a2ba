//! The one script that applies a partition's batch atomically: the data and
//! the partition's next offset change together, or not at all.
//!
//! It first compares the stored offset with the batch's first offset: the
//! batch applies only if it starts exactly where the partition stands (or
//! nothing is stored yet). Batch ranges of a partition chain without holes
//! (sink-core makes a range start where fetching resumed), so any other
//! stored value means this batch must not apply:
//! - ahead of it: a replay after a crash, or a stale consumer whose partition
//!   moved; the consumer resumes at the stored offset;
//! - behind it: records between were never applied (Redis lost its last
//!   writes, or a bug); the consumer goes back and applies them.
//!
//! Either way the stored offset is returned; -1 means applied.

/// Members per ZADD inside the script: `unpack` is bounded by Lua's C stack.
pub const ZADD_CHUNK: usize = 500;

/// KEYS[1] offsets hash; KEYS[2..] data keys, history keys first (the
/// plan's order; the script is correct in any order, only cheaper in this).
/// ARGV: field, first, next, history size, then per data key:
/// op (`incr` | `hist`), ttl (0 = none), n, then n pairs
/// (`member count` for incr, `score member` for hist).
///
/// Redis does not roll back a script that fails half way (a key of another
/// type than ZSET makes ZADD or ZINCRBY fail): what it wrote stays, and the
/// offset does not move, so the batch is applied again once the key is
/// fixed. That is harmless for history writes, which the script therefore
/// does first without checking types: `ZADD GT` keeps the latest time,
/// trimming to the newest `history size` keeps the same members whatever
/// was re-added, and `EXPIRE` only restarts the TTL. Counting twice is not
/// harmless: before the first `ZINCRBY`, every remaining key's type is
/// checked, so a script that increments anything runs to the end.
pub const APPLY_BATCH: &str = r"
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if stored and tonumber(stored) ~= tonumber(ARGV[2]) then
  return tonumber(stored)
end
local history_size = tonumber(ARGV[4])
-- Applies KEYS[k], whose arguments start at ARGV[a]; returns the next a.
local function apply(k, a)
  local key, op, ttl, n = KEYS[k], ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  if op == 'incr' then
    for i = 0, n - 1 do
      redis.call('ZINCRBY', key, ARGV[a + 2 * i + 1], ARGV[a + 2 * i])
    end
  elseif n == 1 then
    -- Most history keys get one item per batch: no argument table.
    redis.call('ZADD', key, 'GT', ARGV[a], ARGV[a + 1])
    redis.call('ZREMRANGEBYRANK', key, 0, -(history_size + 1))
  else
    local i = 0
    while i < n do
      local m = math.min(n - i, 500)
      local args = {}
      for j = 0, 2 * m - 1 do
        args[j + 1] = ARGV[a + 2 * i + j]
      end
      redis.call('ZADD', key, 'GT', unpack(args))
      i = i + m
    end
    redis.call('ZREMRANGEBYRANK', key, 0, -(history_size + 1))
  end
  if ttl > 0 then
    redis.call('EXPIRE', key, ttl)
  end
  return a + 2 * n
end
-- Histories: idempotent, so a failure among them (WRONGTYPE) is safe to retry.
local k, a = 2, 5
while k <= #KEYS and ARGV[a] == 'hist' do
  a = apply(k, a)
  k = k + 1
end
-- Whatever is left may count: refuse before the first increment if any of
-- it holds something else than a ZSET.
for j = k, #KEYS do
  local t = redis.call('TYPE', KEYS[j])['ok']
  if t ~= 'zset' and t ~= 'none' then
    return redis.error_reply('WRONGTYPE key ' .. KEYS[j] .. ' holds a ' .. t .. ', not a sorted set: remove or rename it')
  end
end
while k <= #KEYS do
  a = apply(k, a)
  k = k + 1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return -1
";

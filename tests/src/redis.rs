//! Reading redis-sink's state in Redis: connections, and the offsets it
//! stores beside the data (docs/redis-keys.md).
//!
//! (Inside this crate `redis::` still names the redis crate: this module is
//! `crate::redis`, in scope only where it is imported.)

use std::collections::BTreeMap;

use redis::aio::MultiplexedConnection;

/// A connection to the Redis at `url`.
pub async fn connect(url: &str) -> anyhow::Result<MultiplexedConnection> {
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?)
}

/// The HASH (partition → next offset to apply) in which redis-sink keeps
/// `topic`'s offsets under `prefix`.
pub fn offsets_key(prefix: &str, topic: &str) -> String {
    redis_sink::keys::Keys::new(prefix).offsets(topic)
}

/// Where versions before the per-topic fence kept `group`'s offsets of
/// `topic` (still written in step with [`offsets_key`]).
pub fn group_offsets_key(prefix: &str, group: &str, topic: &str) -> String {
    redis_sink::keys::Keys::new(prefix).group_offsets(group, topic)
}

/// The next offset per partition `0..partitions` stored in the offsets
/// HASH `key` (0 where none is stored).
pub async fn stored_offsets(
    conn: &mut MultiplexedConnection,
    key: &str,
    partitions: i32,
) -> anyhow::Result<Vec<i64>> {
    let stored: BTreeMap<i32, i64> = redis::cmd("HGETALL").arg(key).query_async(conn).await?;
    Ok((0..partitions)
        .map(|p| stored.get(&p).copied().unwrap_or(0))
        .collect())
}

/// The next offset per partition redis-sink has applied of `topic` under
/// `prefix` (0 where none).
pub async fn applied_offsets(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<Vec<i64>> {
    stored_offsets(conn, &offsets_key(prefix, topic), partitions).await
}

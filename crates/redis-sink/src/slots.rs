//! Which cluster node owns which key: hash slots as Redis computes them, and
//! the slot ranges of the primaries as `CLUSTER SLOTS` lists them.
//!
//! redis-rs routes each command by its key on its own, but one request per
//! command cost the sink 14 times the CPU of a standalone run (perf: its
//! per-request machinery). With this map the sink groups a batch's
//! histories by primary and sends each group as one pipeline, routed by the
//! slot of its first key (see `sink::HistoryWrites`). A map gone stale
//! only puts keys of another node in a group: that node answers MOVED, the
//! write fails for a retry, and the map is read again for it.

use std::sync::{Arc, Mutex, PoisonError};

use redis::aio::ConnectionLike;

/// Hash slots in a Redis Cluster.
const SLOTS: u16 = 16_384;

/// The hash slot of `key`: CRC16 (XMODEM) of its hash tag (the text between
/// the first `{` and the next `}`, when not empty) or of the whole key.
pub fn slot_of(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16_xmodem(tagged) % SLOTS
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The primary serving each slot, as one node saw it.
#[derive(Debug, Default)]
pub struct SlotMap {
    /// (first slot, last slot, the primary's node id), in `CLUSTER SLOTS`
    /// order. The id, not the address: nodes may announce no host.
    ranges: Vec<(u16, u16, String)>,
}

impl SlotMap {
    /// Asks the cluster (`CLUSTER SLOTS`).
    pub async fn load(conn: &mut impl ConnectionLike) -> redis::RedisResult<Self> {
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
        let mut ranges = Vec::with_capacity(slots.len());
        for range in slots {
            // [start, end, [host, port, id, ...], replicas...]
            let redis::Value::Array(mut parts) = range else {
                continue;
            };
            parts.truncate(3);
            let (start, end, primary): (u16, u16, Vec<redis::Value>) =
                redis::from_redis_value(redis::Value::Array(parts))?;
            if let Some(id) = primary.get(2) {
                ranges.push((start, end, redis::from_redis_value(id.clone())?));
            }
        }
        Ok(Self { ranges })
    }

    /// The id of the primary serving `slot`, if the map knows one.
    pub fn node_of(&self, slot: u16) -> Option<&str> {
        self.ranges
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, node)| node.as_str())
    }
}

/// The slot map, loaded when first needed and forgotten when found stale.
#[derive(Debug, Default)]
pub struct SlotCache(Mutex<Option<Arc<SlotMap>>>);

impl SlotCache {
    /// The map, loaded over `conn` unless known.
    pub async fn get(&self, conn: &mut impl ConnectionLike) -> redis::RedisResult<Arc<SlotMap>> {
        if let Some(map) = self.lock().clone() {
            return Ok(map);
        }
        let map = Arc::new(SlotMap::load(conn).await?);
        *self.lock() = Some(Arc::clone(&map));
        Ok(map)
    }

    /// The map is stale (a node answered MOVED or ASK, or failed): the next
    /// [`SlotCache::get`] loads it again.
    pub fn forget(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<SlotMap>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_computed_as_redis_does() {
        // Values from `redis-cli CLUSTER KEYSLOT`.
        assert_eq!(slot_of(b"foo"), 12_182);
        assert_eq!(slot_of(b"history:search:user-7"), 9_044);
        assert_eq!(slot_of(b"{rank}:search:total"), slot_of(b"rank"));
        assert_eq!(slot_of(b"p:{rank}:offsets:user3"), slot_of(b"rank"));
        // An empty tag is no tag: the whole key counts.
        assert_ne!(slot_of(b"a{}b"), slot_of(b""));
        assert_eq!(slot_of(b"a{}b"), crc16_xmodem(b"a{}b") % SLOTS);
    }

    #[test]
    fn a_slot_maps_to_the_range_that_holds_it() {
        let map = SlotMap {
            ranges: vec![
                (0, 5460, "a".into()),
                (5461, 10922, "b".into()),
                (10923, 16383, "c".into()),
            ],
        };
        assert_eq!(map.node_of(0), Some("a"));
        assert_eq!(map.node_of(5461), Some("b"));
        assert_eq!(map.node_of(16383), Some("c"));
        assert_eq!(SlotMap::default().node_of(7), None);
    }
}

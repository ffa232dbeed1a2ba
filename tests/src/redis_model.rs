//! The Redis state the key contract promises for a set of events, computed
//! from the generator's ground truth, and a dump of the real state to
//! compare it with.

use std::collections::BTreeMap;

use anyhow::Context;
use redis_sink::keys::RANK_TAG;

use crate::redis::RedisConn;

use crate::generator::Truth;

/// key → member → score, for every key the contract names.
pub type State = BTreeMap<String, BTreeMap<String, i64>>;

/// The expected state for `events` under key `prefix`, with the default
/// bucket TTL (events are recent) and `history_size`.
pub fn expected<'a>(
    prefix: &str,
    events: impl IntoIterator<Item = &'a Truth>,
    history_size: usize,
) -> State {
    let mut state = State::new();
    let mut histories: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for truth in events {
        let kind = if truth.info == "search" {
            "search"
        } else {
            "movie"
        };
        let time = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(truth.time_ms)
            .unwrap_or_default();
        let (hour, minute) = (time.format("%Y%m%d%H"), time.format("%Y%m%d%H%M"));
        for key in [
            format!("{prefix}{RANK_TAG}:{kind}:total"),
            format!("{prefix}{RANK_TAG}:{kind}:h:{hour}"),
            format!("{prefix}{RANK_TAG}:{kind}:m:{minute}"),
        ] {
            *state
                .entry(key)
                .or_default()
                .entry(truth.member.clone())
                .or_default() += 1;
        }
        if let Some(user) = &truth.user {
            let latest = histories
                .entry(format!("{prefix}history:{kind}:{user}"))
                .or_default()
                .entry(truth.member.clone())
                .or_insert(truth.time_ms);
            *latest = (*latest).max(truth.time_ms);
        }
    }
    for (key, items) in histories {
        // Keep the newest `history_size` by (time, member), as ZREMRANGEBYRANK does.
        let mut sorted: Vec<(i64, String)> = items.into_iter().map(|(m, t)| (t, m)).collect();
        sorted.sort();
        let keep = sorted.split_off(sorted.len().saturating_sub(history_size));
        state.insert(key, keep.into_iter().map(|(t, m)| (m, t)).collect());
    }
    state
}

/// Every ranking (`{rank}:search:*`, `{rank}:movie:*`) and `history:*`
/// key under `prefix`, with members and scores (cache and offset keys are
/// not part of the compared contract).
pub async fn dump(conn: &mut RedisConn, prefix: &str) -> anyhow::Result<State> {
    let mut state = State::new();
    for pattern in [
        format!("{prefix}{RANK_TAG}:search:*"),
        format!("{prefix}{RANK_TAG}:movie:*"),
        format!("{prefix}history:*"),
    ] {
        let keys = crate::redis::scan_keys(conn, &pattern).await?;
        for key in keys {
            let members: Vec<(String, f64)> = redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(conn)
                .await
                .with_context(|| format!("ZRANGE {key}"))?;
            state.insert(
                key,
                members.into_iter().map(|(m, s)| (m, s as i64)).collect(),
            );
        }
    }
    Ok(state)
}

/// Explains the first differences between two states (for assertion messages).
pub fn diff(expected: &State, actual: &State) -> String {
    let mut out = Vec::new();
    for (key, members) in expected {
        match actual.get(key) {
            None => out.push(format!("missing key {key}")),
            Some(got) if got != members => {
                for (m, s) in members {
                    if got.get(m) != Some(s) {
                        out.push(format!("{key} {m}: expected {s}, got {:?}", got.get(m)));
                    }
                }
                for (m, s) in got {
                    if !members.contains_key(m) {
                        out.push(format!("{key} {m}: unexpected score {s}"));
                    }
                }
            }
            Some(_) => {}
        }
    }
    for key in actual.keys() {
        if !expected.contains_key(key) {
            out.push(format!("unexpected key {key}"));
        }
    }
    let total = out.len();
    out.truncate(20);
    format!("{total} differences; first ones:\n{}", out.join("\n"))
}

//! poison input: each kind of poison record three times among 3,000 valid
//! events, on every partition: not JSON, an empty message, invalid UTF-8, a
//! JSON array, wrong field types, a 300 KB keyword, a search without
//! `user_id`, an off-topic `info`.
//!
//! Must show: every record the service cannot take is dead-lettered with a
//! reason, and every valid one (the anonymous search among them) is applied.

use e2e::generator::Truth;
use e2e::pipeline::Item;
use e2e::Stack;

use crate::common::{events, pipeline};
use crate::{Outcome, SinkKind};

pub async fn run(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let mut p = pipeline(stack, kind).await?;
    // Each poison record 3 times, between valid events on every partition.
    let poison = poison_items(kind);
    let mut items = Vec::new();
    let mut valid = events(&p, 6, 3_000).into_iter();
    for _ in 0..3 {
        for (_, item) in &poison {
            items.extend(valid.by_ref().take(100));
            items.push(item.clone());
        }
    }
    items.extend(valid);
    p.produce(items).await?;
    let instance = p.start()?;
    p.wait_caught_up(&instance).await?;
    let kinds: Vec<&str> = poison
        .iter()
        .filter(|(_, item)| !item.kept)
        .map(|(name, _)| *name)
        .collect();
    Ok(Outcome::new(p.tally().await?).note(format!("dead-lettered kinds: {}", kinds.join(", "))))
}

/// Poison records, each with whether `kind`'s service must keep it. The
/// services differ by design: redis-sink takes only a search or
/// movie_detail with fields of the right types and a keyword it may store,
/// while bigquery-sink keeps every JSON object (a wrong type becomes NULL in
/// its column, the payload keeps it).
fn poison_items(kind: SinkKind) -> Vec<(&'static str, Item)> {
    let now = chrono::Utc::now();
    let ts = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let redis = kind.is_redis();
    let item = |payload: Vec<u8>, kept: bool, truth: Option<Truth>| Item {
        payload,
        kept,
        truth,
    };
    vec![
        (
            "not JSON",
            item(b"GET /search?q=x HTTP/1.1".to_vec(), false, None),
        ),
        ("empty message", item(Vec::new(), false, None)),
        (
            "invalid UTF-8",
            item(
                [
                    format!(r#"{{"@timestamp":"{ts}","info":"search","keyword":""#).as_bytes(),
                    &[0xff, 0xfe],
                    br#""}"#,
                ]
                .concat(),
                false,
                None,
            ),
        ),
        (
            "a JSON array",
            item(br#"[{"info":"search"}]"#.to_vec(), false, None),
        ),
        (
            "wrong field types",
            item(
                format!(
                    r#"{{"@timestamp":"{ts}","info":"search","keyword":42,"user_id":{{"id":1}}}}"#
                )
                .into_bytes(),
                !redis,
                None,
            ),
        ),
        (
            "300 KB keyword",
            item(
                format!(
                    r#"{{"@timestamp":"{ts}","info":"search","user_id":"u1","keyword":"{}"}}"#,
                    "k".repeat(300_000)
                )
                .into_bytes(),
                !redis,
                None,
            ),
        ),
        (
            // Anonymous: counts in the rankings, writes no history.
            "missing user_id",
            item(
                format!(r#"{{"@timestamp":"{ts}","info":"search","keyword":"anonymous search"}}"#)
                    .into_bytes(),
                true,
                Some(Truth {
                    info: "search",
                    member: "anonymous search".into(),
                    user: None,
                    time_ms: now.timestamp_millis(),
                }),
            ),
        ),
        (
            "off-topic info",
            item(
                format!(r#"{{"@timestamp":"{ts}","info":"login","user_id":"u2"}}"#).into_bytes(),
                !redis,
                None,
            ),
        ),
    ]
}

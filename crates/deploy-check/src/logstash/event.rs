//! A Logstash event, as Logstash 8 builds, reads, writes and prints one.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};

/// The time Logstash reads events at in these checks.
pub(super) const LOGSTASH_NOW: &str = "2030-01-02T03:04:05.000Z";

/// `[a][b]` or `a` as a path.
fn field_path(reference: &str) -> Result<Vec<String>> {
    if !reference.starts_with('[') {
        ensure!(
            !reference.is_empty() && !reference.contains(['[', ']', '%']),
            "field reference {reference:?} is not modelled"
        );
        return Ok(vec![reference.to_owned()]);
    }
    let inner = reference
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .with_context(|| format!("field reference {reference:?} is not modelled"))?;
    let path: Vec<String> = inner.split("][").map(str::to_owned).collect();
    ensure!(
        path.iter()
            .all(|p| !p.is_empty() && !p.contains(['[', ']', '%'])),
        "field reference {reference:?} is not modelled"
    );
    Ok(path)
}

/// A value as Logstash turns it into text (sprintf, comparisons): a string as
/// is, an integer or bool as its text, a map as JSON, a list joined by commas.
/// Floats are refused: Java writes them differently.
pub(super) fn logstash_text(value: &Value) -> Result<String> {
    Ok(match value {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => bail!("float {n}: Java's text of it is not modelled"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Object(_) => value.to_string(),
        Value::Array(items) => items
            .iter()
            .map(logstash_text)
            .collect::<Result<Vec<_>>>()?
            .join(","),
        Value::Null => bail!("null has no text"),
    })
}

/// A Logstash event: fields, `@metadata` (never shipped by a codec) and
/// `@timestamp` kept as Logstash writes it (UTC, at least milliseconds).
/// `cancelled`: dropped (the drop filter); no later plugin sees it.
#[derive(Debug, Clone, Default)]
pub(super) struct LsEvent {
    pub(super) data: Map<String, Value>,
    pub(super) cancelled: bool,
}

/// Ruby's `to_s` of a parsed JSON value, where it is the JSON text too:
/// a string as is, an integer or a bool as its text. Others (floats, lists,
/// hashes, which Ruby writes its own way) are refused.
pub(super) fn ruby_to_s(value: &Value) -> Result<String> {
    Ok(match value {
        Value::String(s) => s.clone(),
        Value::Number(n) if !n.is_f64() => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => bail!("Ruby's to_s of {other} is not modelled"),
    })
}

/// Logstash's `Timestamp.coerce`, for what it can be given here: an RFC 3339
/// string (normalized to UTC), anything else not a string is no timestamp,
/// and a string that is not RFC 3339 is refused unless it cannot be a date
/// at all (Logstash's ISO 8601 parser accepts more than RFC 3339).
pub(super) fn coerce_timestamp(v: &Value) -> Result<Option<String>> {
    let Value::String(s) = v else {
        return Ok(None);
    };
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        let t = t.with_timezone(&chrono::Utc);
        let format = if t.timestamp_subsec_nanos() % 1_000_000 == 0 {
            chrono::SecondsFormat::Millis
        } else {
            chrono::SecondsFormat::AutoSi
        };
        return Ok(Some(t.to_rfc3339_opts(format, true)));
    }
    ensure!(
        !s.chars().next().is_some_and(|c| c.is_ascii_digit()),
        "@timestamp {s:?}: whether Logstash parses it is not modelled"
    );
    Ok(None)
}

impl LsEvent {
    /// `new Event(map)`: `@timestamp` parsed (now if absent; now, the tag
    /// `_timestampparsefailure` and the original in `_@timestamp` if it does
    /// not parse), `@version` "1" unless given, `@metadata` apart.
    pub(super) fn new(mut fields: Map<String, Value>) -> Result<Self> {
        let metadata = match fields.remove("@metadata") {
            None => Value::Object(Map::new()),
            Some(m @ Value::Object(_)) => m,
            Some(other) => bail!("@metadata {other} is not modelled"),
        };
        let given = fields.remove("@timestamp").filter(|t| !t.is_null());
        let mut event = LsEvent {
            data: fields,
            cancelled: false,
        };
        event.data.insert("@metadata".into(), metadata);
        event
            .data
            .entry("@version")
            .or_insert_with(|| Value::from("1"));
        let parsed = given.as_ref().map(coerce_timestamp).transpose()?.flatten();
        event.data.insert(
            "@timestamp".into(),
            Value::from(parsed.clone().unwrap_or_else(|| LOGSTASH_NOW.into())),
        );
        if let (Some(given), None) = (given, parsed) {
            event.tag("_timestampparsefailure")?;
            event.data.insert("_@timestamp".into(), given);
        }
        Ok(event)
    }

    /// A field; null counts as absent, as in Logstash.
    pub(super) fn get(&self, reference: &str) -> Result<Option<&Value>> {
        let path = field_path(reference)?;
        let mut at = self.data.get(&path[0]);
        for key in &path[1..] {
            at = at.and_then(|v| v.get(key));
        }
        Ok(at.filter(|v| !v.is_null()))
    }

    pub(super) fn set(&mut self, reference: &str, value: Value) -> Result<()> {
        let path = field_path(reference)?;
        ensure!(
            path[0] != "@timestamp",
            "setting @timestamp is not modelled"
        );
        let (last, parents) = path.split_last().context("empty path")?;
        let mut map = &mut self.data;
        for key in parents {
            let next = map
                .entry(key.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            map = next
                .as_object_mut()
                .with_context(|| format!("{reference}: {key} is not an object"))?;
        }
        map.insert(last.clone(), value);
        Ok(())
    }

    pub(super) fn remove(&mut self, reference: &str) -> Result<Option<Value>> {
        let path = field_path(reference)?;
        ensure!(
            path.len() > 1 || !["@timestamp", "@metadata"].contains(&path[0].as_str()),
            "removing {reference} is not modelled"
        );
        let (last, parents) = path.split_last().context("empty path")?;
        let mut map = &mut self.data;
        for key in parents {
            match map.get_mut(key).and_then(Value::as_object_mut) {
                Some(next) => map = next,
                None => return Ok(None),
            }
        }
        Ok(map.remove(last))
    }

    /// `event.tag(t)`: appended to `tags` unless there.
    pub(super) fn tag(&mut self, tag: &str) -> Result<()> {
        match self.data.get_mut("tags") {
            None | Some(Value::Null) => {
                self.data.insert("tags".into(), Value::from(vec![tag]));
            }
            Some(Value::Array(tags)) => {
                if !tags.iter().any(|t| t == tag) {
                    tags.push(tag.into());
                }
            }
            Some(other) => bail!("tags {other} is not modelled"),
        }
        Ok(())
    }

    /// `event.sprintf(template)`: `%{[field]}` replaced by the field's text,
    /// or left as written when the field is absent or null.
    pub(super) fn sprintf(&self, template: &str) -> Result<String> {
        let mut out = String::new();
        let mut rest = template;
        while let Some(open) = rest.find("%{") {
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .with_context(|| format!("unclosed %{{ in {template:?}"))?;
            let reference = &rest[open + 2..close];
            ensure!(
                !reference.starts_with(['+', '{']),
                "sprintf time format %{{{reference}}} is not modelled"
            );
            out.push_str(&rest[..open]);
            match self.get(reference)? {
                Some(value) => out.push_str(&logstash_text(value)?),
                None => out.push_str(&rest[open..=close]),
            }
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// The JSON the `json` codec writes: every field but `@metadata`.
    pub(super) fn to_json(&self) -> String {
        let mut fields = self.data.clone();
        fields.remove("@metadata");
        Value::Object(fields).to_string()
    }
}

/// Logstash's JSON decoding (Jackson) of a whole line: `Ok(None)` when it is
/// not JSON. A JSON value followed by more text is refused: Jackson reads the
/// first value and ignores the rest, which this test does not model.
pub(super) fn logstash_json(text: &str) -> Result<Option<Value>> {
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    match values.next() {
        Some(Ok(value)) => {
            ensure!(
                values.next().is_none(),
                "{text:?}: JSON followed by more text is not modelled"
            );
            Ok(Some(value))
        }
        _ => Ok(None),
    }
}

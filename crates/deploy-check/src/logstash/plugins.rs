//! The plugins' settings as the parser gives them, the filters (mutate, json)
//! and the kafka output.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::event::{coerce_timestamp, logstash_json, ruby_to_s, LsEvent, LOGSTASH_NOW};

/// One setting's value as the parser gives it: `[name, [value]]`.
fn setting_value<'a>(kv: &'a Value, plugin: &str) -> Result<(&'a str, &'a Value)> {
    let kv = kv
        .as_array()
        .with_context(|| format!("{plugin}: a setting is not a list"))?;
    let name = kv
        .first()
        .and_then(Value::as_str)
        .with_context(|| format!("{plugin}: a setting without a name"))?;
    let value = kv
        .get(1)
        .and_then(Value::as_array)
        .and_then(|v| v.first())
        .with_context(|| format!("{plugin}: setting {name} without a value"))?;
    Ok((name, value))
}

/// A plugin's settings; any name not in `allowed` is an error.
pub(super) fn plugin_settings<'a>(
    plugin: &str,
    body: &'a [Value],
    allowed: &[&str],
) -> Result<BTreeMap<&'a str, &'a Value>> {
    let mut out = BTreeMap::new();
    for kv in body {
        let (name, value) = setting_value(kv, plugin)?;
        ensure!(
            allowed.contains(&name),
            "{plugin}: option {name} is not modelled by this test (known: {allowed:?})"
        );
        ensure!(
            out.insert(name, value).is_none(),
            "{plugin}: {name} given twice"
        );
    }
    Ok(out)
}

pub(super) fn setting_text(value: &Value, what: &str) -> Result<String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => bail!("{what}: expected a string, found {other}"),
    }
}

pub(super) fn setting_list(value: &Value, what: &str) -> Result<Vec<String>> {
    value
        .as_array()
        .with_context(|| format!("{what}: expected a list"))?
        .iter()
        .map(|v| setting_text(v, what))
        .collect()
}

/// `{ "k" => "v" ... }` as the parser gives it: `[[k, [v]], ...]`.
pub(super) fn setting_hash(value: &Value, what: &str) -> Result<Vec<(String, String)>> {
    value
        .as_array()
        .with_context(|| format!("{what}: expected a hash"))?
        .iter()
        .map(|kv| {
            let (k, v) = setting_value(kv, what)?;
            Ok((k.to_owned(), setting_text(v, what)?))
        })
        .collect()
}

/// A codec setting: a name, or `[name, [settings]]`.
pub(super) fn setting_codec<'a>(value: &'a Value, what: &str) -> Result<(String, &'a [Value])> {
    match value {
        Value::String(name) => Ok((name.clone(), &[])),
        Value::Array(parts) => {
            let name = parts
                .first()
                .and_then(Value::as_str)
                .with_context(|| format!("{what}: codec without a name"))?;
            let body = parts
                .get(1)
                .and_then(Value::as_array)
                .with_context(|| format!("{what}: codec {name} without settings"))?;
            Ok((name.to_owned(), body))
        }
        other => bail!("{what}: codec {other} is not modelled"),
    }
}

/// A filter's common options on success, those the pipeline uses, in
/// Logstash's order (`Filters::Base#filter_matched`): add_field, then
/// remove_field. Adding to a field that is already there (Logstash makes a
/// list of the two) is not modelled.
fn filter_matched(event: &mut LsEvent, settings: &BTreeMap<&str, &Value>) -> Result<()> {
    if let Some(fields) = settings.get("add_field") {
        for (field, value) in setting_hash(fields, "add_field")? {
            let field = event.sprintf(&field)?;
            ensure!(
                event.get(&field)?.is_none(),
                "add_field to an existing {field} is not modelled"
            );
            let value = event.sprintf(&value)?;
            event.set(&field, value.into())?;
        }
    }
    if let Some(fields) = settings.get("remove_field") {
        for field in setting_list(fields, "remove_field")? {
            event.remove(&event.sprintf(&field)?)?;
        }
    }
    Ok(())
}

/// `mutate`: rename, then the common options.
pub(super) fn mutate(body: &[Value], event: &mut LsEvent) -> Result<()> {
    let settings = plugin_settings("mutate", body, &["id", "rename", "remove_field"])?;
    if let Some(rename) = settings.get("rename") {
        for (from, to) in setting_hash(rename, "mutate rename")? {
            if let Some(value) = event.remove(&event.sprintf(&from)?)? {
                event.set(&event.sprintf(&to)?, value)?;
            }
        }
    }
    filter_matched(event, &settings)
}

/// `drop`: the event goes no further.
pub(super) fn drop_filter(body: &[Value], event: &mut LsEvent) -> Result<()> {
    plugin_settings("drop", body, &["id"])?;
    event.cancelled = true;
    Ok(())
}

/// `json { source => ... }` without a target (logstash-filter-json 3.2): a
/// JSON object is merged into the event, each top-level key set as a field
/// (`tags` too, replacing the event's), its `@timestamp` becoming the event's
/// (one that does not parse: Logstash's time, `_timestampparsefailure`, the
/// original's `to_s` in `_@timestamp`; a Ruby-false one, null or `false`, is
/// as if absent), then the common options; anything else (not JSON, not an
/// object) tags `_jsonparsefailure`, without the common options. Refused: a
/// key `@metadata` (Logstash would replace the event's @metadata with it, or
/// fail half-way) or one Logstash reads as a field reference, and `tags` that
/// are not a list of strings (Logstash renames or refuses them).
pub(super) fn json_filter(body: &[Value], event: &mut LsEvent) -> Result<()> {
    let settings = plugin_settings("json", body, &["id", "source", "add_field"])?;
    let source = setting_text(settings.get("source").context("json: no source")?, "source")?;
    let Some(text) = event.get(&source)?.cloned() else {
        return Ok(());
    };
    let text = text
        .as_str()
        .with_context(|| format!("json: a non-string {source} is not modelled"))?;
    let Some(Value::Object(mut parsed)) = logstash_json(text)? else {
        return event.tag("_jsonparsefailure");
    };
    let given = parsed
        .remove("@timestamp")
        .filter(|t| !t.is_null() && *t != Value::Bool(false));
    for (key, value) in parsed {
        ensure!(
            !key.starts_with('[') && key != "@metadata",
            "json: field name {key:?} is not modelled"
        );
        if key == "tags" {
            ensure!(
                value
                    .as_array()
                    .is_some_and(|tags| tags.iter().all(Value::is_string)),
                "json: tags {value} (not a list of strings) are not modelled"
            );
        }
        event.set(&key, value)?;
    }
    if let Some(given) = given {
        match coerce_timestamp(&given)? {
            Some(t) => {
                event.data.insert("@timestamp".into(), t.into());
            }
            None => {
                event
                    .data
                    .insert("@timestamp".into(), Value::from(LOGSTASH_NOW));
                event.tag("_timestampparsefailure")?;
                event.set("_@timestamp", Value::from(ruby_to_s(&given)?))?;
            }
        }
    }
    filter_matched(event, &settings)
}

/// One message a kafka output sends; `key` is `None` without `message_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KafkaRecord {
    pub(super) output: String,
    pub(super) topic: String,
    pub(super) key: Option<String>,
    pub(super) value: String,
}

const KAFKA_OPTIONS: [&str; 8] = [
    "id",
    "bootstrap_servers",
    "topic_id",
    "codec",
    "message_key",
    "acks",
    "compression_type",
    "max_request_size",
];

/// The Java client's default `max.request.size`, the kafka output's default
/// `max_request_size`: the largest record (with its overhead) it sends.
pub(super) const KAFKA_MAX_REQUEST_SIZE: u64 = 1_048_576;

/// The size the Java client checks against `max_request_size` before it
/// sends a record (`AbstractRecords.estimateSizeInBytesUpperBound`, message
/// format v2): the batch header (61 bytes), a record's largest fixed overhead
/// (21), the key (or 1 byte for none) and the value, each after its length
/// as a zigzag varint, and the count of headers (none: 1 byte).
pub(super) fn kafka_request_size(key: Option<&str>, value: &str) -> u64 {
    fn with_length(len: usize) -> u64 {
        let mut zigzag = (len as u64) << 1;
        let mut bytes = 1;
        while zigzag >= 0x80 {
            zigzag >>= 7;
            bytes += 1;
        }
        bytes + len as u64
    }
    61 + 21 + key.map_or(1, |k| with_length(k.len())) + with_length(value.len()) + 1
}

/// A kafka output's settings. Any other option (a `partitioner`, a
/// `message_headers`...) would change what is sent and is refused;
/// `max_request_size` is modelled (kafka_send).
pub(super) fn kafka_settings(body: &[Value]) -> Result<BTreeMap<&str, &Value>> {
    plugin_settings("kafka", body, &KAFKA_OPTIONS)
}

/// The message one kafka output makes of `event`, and whether it sends it:
/// a record above `max_request_size` is refused by the client
/// (RecordTooLargeException), which the output logs and drops.
pub(super) fn kafka_send(body: &[Value], event: &mut LsEvent) -> Result<(KafkaRecord, bool)> {
    let settings = kafka_settings(body)?;
    let max_request_size = match settings.get("max_request_size") {
        Some(size) => setting_text(size, "max_request_size")?.parse()?,
        None => KAFKA_MAX_REQUEST_SIZE,
    };
    let get = |name: &str| -> Result<String> {
        setting_text(
            settings
                .get(name)
                .with_context(|| format!("kafka: no {name}"))?,
            name,
        )
    };
    let (codec, codec_body) = setting_codec(
        settings
            .get("codec")
            .context("kafka: no codec (plain is not modelled)")?,
        "kafka codec",
    )?;
    let value = match codec.as_str() {
        "json" => {
            ensure!(codec_body.is_empty(), "json codec options are not modelled");
            event.to_json()
        }
        "plain" => {
            let plain = plugin_settings("plain codec", codec_body, &["format"])?;
            let format = plain
                .get("format")
                .context("plain codec without format (event.to_s) is not modelled")?;
            event.sprintf(&setting_text(format, "format")?)?
        }
        other => bail!("kafka codec {other} is not modelled"),
    };
    let key = match settings.get("message_key") {
        Some(key) => Some(event.sprintf(&setting_text(key, "message_key")?)?),
        None => None,
    };
    let sent = kafka_request_size(key.as_deref(), &value) <= max_request_size;
    let record = KafkaRecord {
        output: get("id")?,
        topic: event.sprintf(&get("topic_id")?)?,
        key,
        value,
    };
    Ok((record, sent))
}

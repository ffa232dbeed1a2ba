//! The plugins' settings as the parser gives them, the filters (mutate, json)
//! and the kafka output.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::event::{coerce_timestamp, logstash_json, logstash_text, LsEvent, LOGSTASH_NOW};

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

/// A filter's common options on success (Logstash's order: remove_field, then add_tag).
fn filter_matched(event: &mut LsEvent, settings: &BTreeMap<&str, &Value>) -> Result<()> {
    if let Some(fields) = settings.get("remove_field") {
        for field in setting_list(fields, "remove_field")? {
            event.remove(&event.sprintf(&field)?)?;
        }
    }
    if let Some(tags) = settings.get("add_tag") {
        for tag in setting_list(tags, "add_tag")? {
            let tag = event.sprintf(&tag)?;
            event.tag(&tag)?;
        }
    }
    Ok(())
}

/// `mutate`: rename, then the common options.
pub(super) fn mutate(body: &[Value], event: &mut LsEvent) -> Result<()> {
    let settings = plugin_settings("mutate", body, &["id", "rename", "remove_field", "add_tag"])?;
    if let Some(rename) = settings.get("rename") {
        for (from, to) in setting_hash(rename, "mutate rename")? {
            if let Some(value) = event.remove(&event.sprintf(&from)?)? {
                event.set(&event.sprintf(&to)?, value)?;
            }
        }
    }
    filter_matched(event, &settings)
}

/// `json { source => ... }` without a target (logstash-filter-json): a JSON
/// object is merged into the event, its `@timestamp` becoming the event's
/// (one that does not parse: Logstash's time, `_timestampparsefailure`, the
/// original in `_@timestamp`); anything else tags `_jsonparsefailure`.
pub(super) fn json_filter(body: &[Value], event: &mut LsEvent) -> Result<()> {
    let settings = plugin_settings("json", body, &["id", "source"])?;
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
    let given = parsed.remove("@timestamp").filter(|t| !t.is_null());
    for (key, value) in parsed {
        ensure!(
            !key.starts_with('[') && key != "@metadata",
            "json: field name {key:?} is not modelled"
        );
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
                event.set("_@timestamp", Value::from(logstash_text(&given)?))?;
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

const KAFKA_OPTIONS: [&str; 7] = [
    "id",
    "bootstrap_servers",
    "topic_id",
    "codec",
    "message_key",
    "acks",
    "compression_type",
];

/// A kafka output's settings. Any other option (a `partitioner`, a
/// `message_headers`...) would change what is sent and is refused.
pub(super) fn kafka_settings(body: &[Value]) -> Result<BTreeMap<&str, &Value>> {
    plugin_settings("kafka", body, &KAFKA_OPTIONS)
}

/// The message one kafka output sends for `event`.
pub(super) fn kafka_send(body: &[Value], event: &mut LsEvent) -> Result<KafkaRecord> {
    let settings = kafka_settings(body)?;
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
    Ok(KafkaRecord {
        output: get("id")?,
        topic: event.sprintf(&get("topic_id")?)?,
        key,
        value,
    })
}

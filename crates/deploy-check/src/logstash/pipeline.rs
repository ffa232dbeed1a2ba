//! deploy/logstash/pipeline.conf, loaded and run: what the inputs make of a
//! line, the filters, and the messages the outputs send.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};

use super::condition::condition;
use super::event::{coerce_timestamp, logstash_json, LsEvent};
use super::plugins::{
    json_filter, kafka_send, kafka_settings, mutate, plugin_settings, setting_codec, setting_hash,
    setting_text, KafkaRecord,
};
use crate::validators::check_deploy;

/// What `walk` does with a plugin: its name, its settings, the event.
type RunPlugin<'a> = dyn FnMut(&str, &[Value], &mut LsEvent) -> Result<()> + 'a;

/// Runs a list of plugins and conditionals on `event`.
pub(super) fn walk(items: &[Value], event: &mut LsEvent, plugin: &mut RunPlugin<'_>) -> Result<()> {
    let mut chain_taken: Option<bool> = None;
    for item in items {
        let parts = item.as_array().context("pipeline item is not a list")?;
        let kind = parts
            .first()
            .and_then(Value::as_str)
            .context("pipeline item without a name")?;
        let body = parts
            .get(1)
            .and_then(Value::as_array)
            .context("pipeline item without a body")?;
        match kind {
            "if" | "else if" => {
                ensure!(
                    kind == "if" || chain_taken.is_some(),
                    "`else if` without `if`"
                );
                let (block, cond) = body.split_last().context("empty conditional")?;
                let done = kind == "else if" && chain_taken == Some(true);
                let taken = !done && condition(event, cond)?;
                if taken {
                    let block = block
                        .as_array()
                        .and_then(|b| b.first())
                        .and_then(Value::as_array)
                        .context("conditional without a block")?;
                    walk(block, event, plugin)?;
                }
                chain_taken = Some(done || taken);
            }
            "else" => {
                ensure!(chain_taken.is_some(), "`else` without `if`");
                if chain_taken == Some(false) {
                    walk(body, event, plugin)?;
                }
                chain_taken = None;
            }
            name => {
                chain_taken = None;
                plugin(name, body, event)?;
            }
        }
    }
    Ok(())
}

/// What the input made of one line and where the pipeline sent it.
#[derive(Debug)]
pub(super) struct Outcome {
    pub(super) event: LsEvent,
    pub(super) records: Vec<KafkaRecord>,
}

/// What reaches an input.
pub(super) enum Arrival<'a> {
    /// Filebeat's event (Filebeat 8, filestream, no decoding), as JSON.
    Beats(Map<String, Value>),
    /// One line on the tcp json_lines input.
    JsonLine(&'a str),
}

/// deploy/logstash/pipeline.conf, parsed.
pub(super) struct Pipeline {
    inputs: Vec<Value>,
    filters: Vec<Value>,
    outputs: Vec<Value>,
}

impl Pipeline {
    pub(super) fn load() -> Result<Self> {
        let tree: Value = serde_json::from_str(&check_deploy(&[
            "logstash-json",
            "deploy/logstash/pipeline.conf",
        ])?)?;
        let mut sections = BTreeMap::new();
        for section in tree.as_array().context("pipeline tree is not a list")? {
            let name = section
                .get(0)
                .and_then(Value::as_str)
                .context("section without a name")?;
            let items = section
                .get(1)
                .and_then(Value::as_array)
                .context("section without a body")?;
            ensure!(
                sections.insert(name.to_owned(), items.clone()).is_none(),
                "two {name} sections (not modelled)"
            );
        }
        let mut take = |name: &str| sections.remove(name).unwrap_or_default();
        let pipeline = Pipeline {
            inputs: take("input"),
            filters: take("filter"),
            outputs: take("output"),
        };
        ensure!(
            sections.is_empty(),
            "unknown sections {:?}",
            sections.keys()
        );
        ensure!(!pipeline.inputs.is_empty(), "no input");
        ensure!(!pipeline.outputs.is_empty(), "no output");
        Ok(pipeline)
    }

    /// The input plugin called `name`, checked, with its settings.
    pub(super) fn input(&self, name: &str) -> Result<BTreeMap<&str, &Value>> {
        let mut found = None;
        for item in &self.inputs {
            let parts = item.as_array().context("input item is not a list")?;
            let kind = parts.first().and_then(Value::as_str).unwrap_or_default();
            let body = parts
                .get(1)
                .and_then(Value::as_array)
                .context("input without a body")?;
            let settings = match kind {
                "beats" => plugin_settings("beats", body, &["id", "port", "add_field"])?,
                "tcp" => {
                    let settings = plugin_settings("tcp", body, &["id", "port", "codec"])?;
                    let codec = settings.get("codec").context("tcp: no codec")?;
                    let (codec, _) = setting_codec(codec, "tcp codec")?;
                    ensure!(codec == "json_lines", "tcp: codec {codec} is not modelled");
                    settings
                }
                other => bail!("input {other} is not modelled"),
            };
            if kind == name {
                ensure!(found.is_none(), "two {name} inputs (not modelled)");
                found = Some(settings);
            }
        }
        found.with_context(|| format!("no {name} input"))
    }

    /// The port an input listens on.
    pub(super) fn port(&self, name: &str) -> Result<u16> {
        let input = self.input(name)?;
        Ok(setting_text(input.get("port").context("no port")?, "port")?.parse()?)
    }

    /// The events an input makes of what arrives, after the input's own
    /// decoration (add_field).
    fn receive(&self, arrival: &Arrival) -> Result<Vec<LsEvent>> {
        let (name, mut events) = match arrival {
            Arrival::Beats(shipped) => {
                let mut hash = shipped.clone();
                let message = match hash.remove("message") {
                    Some(Value::String(m)) => m,
                    _ => bail!("a Beats event without a string message is not modelled"),
                };
                // The plain codec (ECS v8) decodes [message] and keeps a copy.
                let mut event = LsEvent::new(Map::from_iter([
                    ("message".to_owned(), Value::from(message.clone())),
                    (
                        "event".to_owned(),
                        serde_json::json!({ "original": message }),
                    ),
                ]))?;
                // Then Beats' own fields are merged in (hashes merged one level),
                // its @timestamp replacing the codec's if it parses.
                if let Some(t) = hash.remove("@timestamp") {
                    if let Some(t) = coerce_timestamp(&t)? {
                        event.data.insert("@timestamp".into(), t.into());
                    }
                }
                for (key, value) in hash {
                    let merged = match (event.data.get(&key), value) {
                        (Some(Value::Object(old)), Value::Object(new)) => {
                            let mut old = old.clone();
                            old.extend(new);
                            Value::Object(old)
                        }
                        (_, value) => value,
                    };
                    event.data.insert(key, merged);
                }
                event.set(
                    "[@metadata][input][beats][host][ip]",
                    Value::from("10.0.0.3"),
                )?;
                ("beats", vec![event])
            }
            Arrival::JsonLine(line) => {
                // json_lines: an object is one event; a line that is not JSON
                // (or JSON but not an object or list) is kept in [message],
                // tagged. Empty lines give no event; lists and null are not
                // modelled.
                let events = if line.trim().is_empty() {
                    Vec::new()
                } else {
                    match logstash_json(line)? {
                        Some(Value::Object(fields)) => vec![LsEvent::new(fields)?],
                        Some(Value::Array(_) | Value::Null) => {
                            bail!("json_lines of {line:?} is not modelled")
                        }
                        Some(_) | None => vec![LsEvent::new(Map::from_iter([
                            ("message".to_owned(), Value::from(*line)),
                            ("tags".to_owned(), Value::from(vec!["_jsonparsefailure"])),
                        ]))?],
                    }
                };
                let mut events = events;
                for event in &mut events {
                    event.set(
                        "[@metadata][input][tcp][source][ip]",
                        Value::from("127.0.0.1"),
                    )?;
                }
                ("tcp", events)
            }
        };
        let input = self.input(name)?;
        if let Some(add) = input.get("add_field") {
            for (field, value) in setting_hash(add, "add_field")? {
                for event in &mut events {
                    ensure!(
                        event.get(&field)?.is_none(),
                        "add_field to an existing {field} is not modelled"
                    );
                    let value = event.sprintf(&value)?;
                    event.set(&field, value.into())?;
                }
            }
        }
        Ok(events)
    }

    /// The kafka outputs' settings, wherever they are in the output section.
    pub(super) fn kafka_outputs(&self) -> Result<Vec<BTreeMap<String, Value>>> {
        fn collect(items: &[Value], out: &mut Vec<BTreeMap<String, Value>>) -> Result<()> {
            for item in items {
                let parts = item.as_array().context("output item is not a list")?;
                let kind = parts.first().and_then(Value::as_str).unwrap_or_default();
                let body = parts
                    .get(1)
                    .and_then(Value::as_array)
                    .context("output without a body")?;
                match kind {
                    "if" | "else if" => {
                        let block = body
                            .last()
                            .and_then(Value::as_array)
                            .and_then(|b| b.first())
                            .and_then(Value::as_array)
                            .context("conditional without a block")?;
                        collect(block, out)?;
                    }
                    "else" => collect(body, out)?,
                    "kafka" => out.push(
                        kafka_settings(body)?
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v.clone()))
                            .collect(),
                    ),
                    other => bail!("output {other} is not modelled"),
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        collect(&self.outputs, &mut out)?;
        Ok(out)
    }

    /// Everything the pipeline does with what arrives: per event, the event
    /// after the filters and the messages the outputs send.
    pub(super) fn run(&self, arrival: &Arrival) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::new();
        for mut event in self.receive(arrival)? {
            walk(
                &self.filters,
                &mut event,
                &mut |name, body, event| match name {
                    "mutate" => mutate(body, event),
                    "json" => json_filter(body, event),
                    other => bail!("filter {other} is not modelled"),
                },
            )?;
            let mut records = Vec::new();
            walk(&self.outputs, &mut event, &mut |name, body, event| {
                ensure!(name == "kafka", "output {name} is not modelled");
                records.push(kafka_send(body, event)?);
                Ok(())
            })?;
            outcomes.push(Outcome { event, records });
        }
        Ok(outcomes)
    }
}

/// The time Filebeat read the line at, in these checks.
pub(super) const FILEBEAT_READ_AT: &str = "2030-01-02T03:04:00.250Z";

/// What Filebeat 8 ships for one line of the action log (filestream input,
/// no parsers, no processors).
pub(super) fn filebeat_event(line: &str) -> Map<String, Value> {
    let event = serde_json::json!({
        "@timestamp": FILEBEAT_READ_AT,
        "@metadata": {"beat": "filebeat", "type": "_doc", "version": "8.14.3"},
        "message": line,
        "host": {"name": "web-03"},
        "agent": {
            "name": "web-03",
            "type": "filebeat",
            "version": "8.14.3",
            "ephemeral_id": "5f0c1d2e-0000-4000-8000-000000000001",
            "id": "9a8b7c6d-0000-4000-8000-000000000002"
        },
        "ecs": {"version": "8.0.0"},
        "log": {"offset": 18_432, "file": {"path": "/var/log/movie-service/actions.json"}},
        "input": {"type": "filestream"}
    });
    match event {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// The Logstash interpreter fails on what it does not model instead of
/// guessing.
pub fn logstash_interpreter_refuses_what_it_does_not_model() -> Result<()> {
    refuses_unmodelled_constructs()?;
    // Jackson would read the object and ignore " x"; not modelled, so refused.
    let pipeline = Pipeline::load()?;
    for arrival in [
        Arrival::Beats(filebeat_event(r#"{"info":"login"} x"#)),
        Arrival::JsonLine(r#"{"info":"login"} x"#),
        Arrival::JsonLine("[]"),
    ] {
        ensure!(
            pipeline.run(&arrival).is_err(),
            "an unmodelled line was not refused"
        );
    }
    Ok(())
}

/// The part of the refusals that needs no pipeline file: conditions, filters,
/// a kafka option and a sprintf form.
fn refuses_unmodelled_constructs() -> Result<()> {
    let event = LsEvent::new(Map::from_iter([("info".to_owned(), Value::from("search"))]))?;
    let refused = [
        r#"[["[info]", "=~", "search"]]"#,
        r#"[["[info]", "==", "[other]"]]"#,
        r#"[["[info]", ">", "a"]]"#,
        // Only == and != with a string are modelled (Ruby's 5 == 5.0 is not).
        r#"[["[info]", "==", 5]]"#,
        r#"[["[info]"], "or", ["[info]", "!=", 5]]"#,
    ];
    for cond in refused {
        let cond: Vec<Value> = serde_json::from_str(cond)?;
        ensure!(
            condition(&event, &cond).is_err(),
            "condition {cond:?} was not refused"
        );
    }
    let mut event = event;
    let unknown_filter: Vec<Value> =
        serde_json::from_str(r#"[["grok", [["match", [[["message", ["%{WORD}"]]]]]]]]"#)?;
    let result = walk(
        &unknown_filter,
        &mut event,
        &mut |name, body, event| match name {
            "mutate" => mutate(body, event),
            "json" => json_filter(body, event),
            other => bail!("filter {other} is not modelled"),
        },
    );
    ensure!(result.is_err(), "an unknown filter was not refused");
    let unknown_option: Vec<Value> =
        serde_json::from_str(r#"[["json", [["source", ["message"]], ["target", ["doc"]]]]]"#)?;
    let result = walk(
        &unknown_option,
        &mut event,
        &mut |name, body, event| match name {
            "json" => json_filter(body, event),
            other => bail!("filter {other} is not modelled"),
        },
    );
    ensure!(result.is_err(), "an unknown json option was not refused");
    let partitioner: Vec<Value> = serde_json::from_str(
        r#"[["topic_id", ["user2"]], ["codec", ["json"]], ["message_key", ["%{[user_id]}"]], ["partitioner", ["round_robin"]]]"#,
    )?;
    ensure!(
        kafka_settings(&partitioner).is_err(),
        "a kafka partitioner was not refused"
    );
    ensure!(
        event.sprintf("%{+YYYY.MM.dd}").is_err(),
        "a sprintf time format was not refused"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn refuses_unmodelled_constructs() -> anyhow::Result<()> {
        super::refuses_unmodelled_constructs()
    }
}

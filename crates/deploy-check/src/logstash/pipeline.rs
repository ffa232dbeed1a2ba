//! deploy/logstash/pipeline.conf, loaded and run: what the inputs make of a
//! line, the filters, and the messages the outputs send.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};

use super::condition::condition;
use super::event::{coerce_timestamp, LsEvent};
use super::plugins::{
    drop_filter, json_filter, kafka_send, kafka_settings, mutate, plugin_settings, setting_codec,
    setting_hash, setting_text, KafkaRecord,
};
use crate::validators::check_deploy;

/// What `walk` does with a plugin: its name, its settings, the event.
type RunPlugin<'a> = dyn FnMut(&str, &[Value], &mut LsEvent) -> Result<()> + 'a;

/// Runs a list of plugins and conditionals on `event`, until it is dropped.
pub(super) fn walk(items: &[Value], event: &mut LsEvent, plugin: &mut RunPlugin<'_>) -> Result<()> {
    let mut chain_taken: Option<bool> = None;
    for item in items {
        if event.cancelled {
            return Ok(());
        }
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

/// What the input made of one line and where the pipeline sent it; `dropped`:
/// the records a kafka output made but did not send (too large).
#[derive(Debug)]
pub(super) struct Outcome {
    pub(super) event: LsEvent,
    pub(super) records: Vec<KafkaRecord>,
    pub(super) dropped: Vec<KafkaRecord>,
}

/// What reaches an input.
pub(super) enum Arrival<'a> {
    /// Filebeat's event (Filebeat 8, filestream, no decoding), as JSON.
    Beats(Map<String, Value>),
    /// One line on the tcp input (its line codec), without its "\n".
    TcpLine(&'a str),
}

/// The filters the pipeline uses.
fn run_filter(name: &str, body: &[Value], event: &mut LsEvent) -> Result<()> {
    match name {
        "mutate" => mutate(body, event),
        "json" => json_filter(body, event),
        "drop" => drop_filter(body, event),
        other => bail!("filter {other} is not modelled"),
    }
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
                    let settings =
                        plugin_settings("tcp", body, &["id", "port", "codec", "add_field"])?;
                    let codec = settings.get("codec").context("tcp: no codec")?;
                    let (codec, codec_body) = setting_codec(codec, "tcp codec")?;
                    // The line codec with its defaults: "\n" ends a line, UTF-8.
                    ensure!(
                        codec == "line" && codec_body.is_empty(),
                        "tcp: codec {codec} {codec_body:?} is not modelled"
                    );
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
                // include_codec_tag (default true).
                event.tag("beats_input_codec_plain_applied")?;
                ("beats", vec![event])
            }
            Arrival::TcpLine(line) => {
                // The line codec (ECS v8): one event per line, even an empty
                // one, the line in [message] and a copy in [event][original].
                // Two lines at once are not modelled; nor is a "\r" (Filebeat
                // strips it before "\n", the line codec keeps it).
                ensure!(
                    !line.contains(['\n', '\r']),
                    "tcp: {line:?} with a line break is not modelled"
                );
                let mut event = LsEvent::new(Map::from_iter([
                    ("message".to_owned(), Value::from(*line)),
                    ("event".to_owned(), serde_json::json!({ "original": line })),
                ]))?;
                event.set(
                    "[@metadata][input][tcp][source][ip]",
                    Value::from("127.0.0.1"),
                )?;
                ("tcp", vec![event])
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
            walk(&self.filters, &mut event, &mut run_filter)?;
            if event.cancelled {
                continue;
            }
            let mut records = Vec::new();
            let mut dropped = Vec::new();
            walk(&self.outputs, &mut event, &mut |name, body, event| {
                ensure!(name == "kafka", "output {name} is not modelled");
                match kafka_send(body, event)? {
                    (record, true) => records.push(record),
                    (record, false) => dropped.push(record),
                }
                Ok(())
            })?;
            outcomes.push(Outcome {
                event,
                records,
                dropped,
            });
        }
        Ok(outcomes)
    }
}

/// The time Filebeat read the line at, in these checks.
pub(super) const FILEBEAT_READ_AT: &str = "2030-01-02T03:04:00.250Z";

/// What Filebeat 8 ships for one line of the action log (filestream input,
/// no parsers, no processors), read at FILEBEAT_READ_AT.
pub(super) fn filebeat_event(line: &str) -> Map<String, Value> {
    filebeat_event_read_at(line, FILEBEAT_READ_AT)
}

/// What Filebeat 8 ships for one line read at `read_at`.
pub(super) fn filebeat_event_read_at(line: &str, read_at: &str) -> Map<String, Value> {
    let event = serde_json::json!({
        "@timestamp": read_at,
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
    let pipeline = Pipeline::load()?;
    let lines = [
        // Jackson would read the object and ignore " x".
        r#"{"info":"login"} x"#,
        // A key "@metadata" written with an escape gets past the pipeline's
        // test on the text; the json filter would replace [@metadata] with it.
        r#"{"\u0040metadata":{"readable":"true"},"info":"search","keyword":"x"}"#,
        // Tags that are not a list of strings (Logstash renames or refuses them).
        r#"{"info":"search","tags":"x"}"#,
        r#"{"info":"search","tags":{"a":1}}"#,
        // Ruby's to_s of the @timestamp it cannot parse, for [_@timestamp].
        r#"{"@timestamp":{"t":1},"info":"login"}"#,
    ];
    for line in lines {
        for arrival in [Arrival::Beats(filebeat_event(line)), Arrival::TcpLine(line)] {
            ensure!(
                pipeline.run(&arrival).is_err(),
                "the unmodelled line {line} was not refused"
            );
        }
    }
    // Two lines at once on the tcp input, or a line ending in "\r".
    for text in ["{}\n{}", "{}\r"] {
        ensure!(
            pipeline.run(&Arrival::TcpLine(text)).is_err(),
            "tcp {text:?} was not refused"
        );
    }
    Ok(())
}

/// The part of the refusals that needs no pipeline file: conditions, filters
/// and their options, the tcp input's codec, a kafka option and a sprintf
/// form.
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
    let filters = [
        (
            "an unknown filter",
            r#"[["grok", [["match", [[["message", ["%{WORD}"]]]]]]]]"#,
        ),
        (
            "a json target",
            r#"[["json", [["source", ["info"]], ["target", ["doc"]]]]]"#,
        ),
        (
            "a json tag_on_failure",
            r#"[["json", [["source", ["info"]], ["tag_on_failure", [["x"]]]]]]"#,
        ),
        (
            "a mutate add_tag",
            r#"[["mutate", [["add_tag", [["x"]]]]]]"#,
        ),
        (
            "a mutate add_field",
            r#"[["mutate", [["add_field", [[["x", ["y"]]]]]]]]"#,
        ),
        (
            "add_field to an existing field",
            r#"[["json", [["source", ["doc"]], ["add_field", [[["info", ["x"]]]]]]]]"#,
        ),
        ("a drop percentage", r#"[["drop", [["percentage", [50]]]]]"#),
    ];
    let mut doc = event.clone();
    doc.set("doc", Value::from(r#"{"a":1}"#))?;
    for (what, filter) in filters {
        let filter: Vec<Value> = serde_json::from_str(filter)?;
        let mut event = doc.clone();
        ensure!(
            walk(&filter, &mut event, &mut run_filter).is_err(),
            "{what} was not refused"
        );
    }
    for codec in [
        r#""json_lines""#,
        r#""json""#,
        r#"["line", [["delimiter", ["\r\n"]]]]"#,
    ] {
        let tcp: Value = serde_json::from_str(&format!(
            r#"["tcp", [["port", [5000]], ["codec", [{codec}]]]]"#
        ))?;
        let pipeline = Pipeline {
            inputs: vec![tcp],
            filters: Vec::new(),
            outputs: Vec::new(),
        };
        ensure!(
            pipeline.input("tcp").is_err(),
            "tcp codec {codec} was not refused"
        );
    }
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

//! deploy/logstash and deploy/filebeat.
//!
//! Logstash itself cannot be installed here, so the pipeline file is parsed
//! (logstash-pipeline-parser) and run by this small interpreter. It implements
//! only what deploy/logstash/pipeline.conf uses, as Logstash 8 (ECS mode v8)
//! behaves, and fails on anything else (another plugin, option, codec,
//! condition or sprintf form), so the check cannot pass on a construct it does
//! not understand:
//!
//! - inputs: beats (id, port, add_field), tcp (id, port, add_field,
//!   codec => line)
//! - filters: mutate (id, rename, remove_field), json (id, source, add_field),
//!   drop (id)
//! - outputs: kafka (id, bootstrap_servers, topic_id, message_key or none, acks,
//!   compression_type, max_request_size, codec => json | plain { format })
//! - conditions: == and != with a string, in, not in, !, a bare field, and/or,
//!   parentheses
//!
//! `event` (a Logstash event), `condition`, `plugins` (settings, filters, the
//! kafka output) and `pipeline` (inputs, the walk, the outputs) are the
//! interpreter; `routing` runs lines through it.

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::report;
use crate::validators::yaml;
use crate::values::{port_of, scalar};

mod condition;
mod event;
mod pipeline;
mod plugins;
mod routing;

pub use pipeline::logstash_interpreter_refuses_what_it_does_not_model;
pub use routing::logstash_pipeline_routes_like_gen_events;

use pipeline::{filebeat_event, Arrival, Pipeline};
use plugins::{kafka_request_size, KAFKA_MAX_REQUEST_SIZE};

/// What a line may grow by on its way to Kafka, beyond Filebeat's cap: the
/// record's overhead, the key, what Logstash adds to an event ("@version",
/// milliseconds in @timestamp), with room to spare.
const FILEBEAT_LINE_HEADROOM: u64 = 64 << 10;

/// A YAML mapping flattened to dotted keys (`queue.type: x` and
/// `queue: {type: x}` mean the same to Logstash and Filebeat); lists are leaves.
fn dotted(value: &Value) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", value, &mut out);
    out
}

/// "8gb", "64mb" -> bytes.
fn logstash_bytes(size: &str) -> Option<u64> {
    let size = size.trim().to_ascii_lowercase();
    let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = match &size[digits.len()..] {
        "b" | "" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        "tb" => 1 << 40,
        _ => return None,
    };
    digits.trim().parse::<u64>().ok().map(|n| n * unit)
}

/// Logstash's settings: a persisted queue, ECS v8, one pipeline (pipeline.conf).
pub fn logstash_settings_persist_the_queue() -> Result<()> {
    let files = yaml(&[
        "deploy/logstash/logstash.yml",
        "deploy/logstash/pipelines.yml",
    ])?;
    let settings = files
        .get("deploy/logstash/logstash.yml")
        .and_then(|docs| docs.first())
        .map(dotted)
        .context("logstash.yml is empty")?;
    let text = |key: &str| settings.get(key).map(scalar).unwrap_or_default();
    let mut problems = Vec::new();
    if text("queue.type") != "persisted" {
        problems.push(format!(
            "queue.type is {:?}, not persisted",
            text("queue.type")
        ));
    }
    match (
        logstash_bytes(&text("queue.max_bytes")),
        logstash_bytes(&text("queue.page_capacity")),
    ) {
        (Some(max), Some(page)) if max >= 4 * page && max >= 1 << 30 => {}
        other => problems.push(format!(
            "queue.max_bytes / queue.page_capacity {other:?}: set both, at least 1gb and 4 pages"
        )),
    }
    // The interpreter in logstash_pipeline_routes_like_gen_events models ECS v8.
    if text("pipeline.ecs_compatibility") != "v8" {
        problems
            .push("pipeline.ecs_compatibility is not v8, which the pipeline test models".into());
    }
    let pipelines = files
        .get("deploy/logstash/pipelines.yml")
        .and_then(|docs| docs.first())
        .and_then(Value::as_array)
        .context("pipelines.yml is not a list")?;
    if pipelines.len() != 1 {
        problems.push(format!(
            "pipelines.yml has {} pipelines, expected 1",
            pipelines.len()
        ));
    }
    for p in pipelines {
        let p = dotted(p);
        let path = p.get("path.config").map(scalar).unwrap_or_default();
        if !path.ends_with("/pipeline.conf") {
            problems.push(format!(
                "pipelines.yml path.config {path:?} is not pipeline.conf"
            ));
        }
        if let Some(queue) = p.get("queue.type") {
            if scalar(queue) != "persisted" {
                problems.push(format!("pipelines.yml overrides queue.type with {queue}"));
            }
        }
    }
    report(problems)
}

/// The smallest max_request_size of the kafka outputs (the client's default
/// where unset).
fn kafka_max_request_size(pipeline: &Pipeline) -> Result<u64> {
    let mut smallest = u64::MAX;
    for out in pipeline.kafka_outputs()? {
        let size = match out.get("max_request_size") {
            None => KAFKA_MAX_REQUEST_SIZE,
            Some(size) => scalar(size)
                .parse()
                .with_context(|| format!("kafka max_request_size {size}"))?,
        };
        smallest = smallest.min(size);
    }
    Ok(smallest)
}

/// Every line Filebeat can ship, through the pipeline, gives records that the
/// kafka outputs' client accepts: the longest readable line (re-encoded with
/// "@version" and milliseconds) and a cut one (sent as it came).
fn largest_lines_fit(
    pipeline: &Pipeline,
    cap: u64,
    max_request: u64,
    problems: &mut Vec<String>,
) -> Result<()> {
    let cap = usize::try_from(cap)?;
    let event = |keyword_len: usize| {
        format!(
            r#"{{"@timestamp":"2024-05-01T12:00:00Z","info":"search","user_id":"u-1024","keyword":"{}"}}"#,
            "k".repeat(keyword_len)
        )
    };
    let padding = event(0).len();
    ensure!(cap > padding, "message_max_bytes {cap} is below one event");
    let longest = event(cap - padding);
    let cut = event(cap)[..cap].to_owned();
    for (what, line) in [("the longest line", longest), ("a cut line", cut)] {
        let outcomes = pipeline.run(&Arrival::Beats(filebeat_event(&line)))?;
        let records: Vec<_> = outcomes.iter().flat_map(|o| &o.records).collect();
        if records.is_empty() {
            problems.push(format!(
                "{what} Filebeat ships ({} bytes) is not sent",
                line.len()
            ));
        }
        for r in outcomes.iter().flat_map(|o| &o.dropped) {
            problems.push(format!(
                "{what} Filebeat ships ({} bytes) gives a {}-byte record in {}, above \
                 max_request_size {max_request}: the kafka output drops it",
                line.len(),
                kafka_request_size(r.key.as_deref(), &r.value),
                r.output
            ));
        }
    }
    Ok(())
}

/// Filebeat ships raw lines (no decoding, no processors) to the beats input's
/// port, each cut short enough to fit a Kafka request with room to spare.
pub fn logstash_gets_raw_lines_from_filebeat() -> Result<()> {
    let files = yaml(&["deploy/filebeat/filebeat.yml"])?;
    let config = files
        .values()
        .next()
        .and_then(|docs| docs.first())
        .map(dotted)
        .context("filebeat.yml is empty")?;
    let pipeline = Pipeline::load()?;
    let beats_port = pipeline.port("beats")?;
    let max_request = kafka_max_request_size(&pipeline)?;
    let mut problems = Vec::new();
    let inputs = config
        .get("filebeat.inputs")
        .and_then(Value::as_array)
        .context("filebeat.yml has no filebeat.inputs")?;
    for input in inputs {
        let input = dotted(input);
        let text = |key: &str| input.get(key).map(scalar).unwrap_or_default();
        if text("type") != "filestream" || text("id").is_empty() {
            problems.push(format!(
                "input {input:?}: not a filestream input with an id"
            ));
        }
        if input
            .get("paths")
            .and_then(Value::as_array)
            .is_none_or(|p| p.is_empty())
        {
            problems.push(format!("input {:?}: no paths", text("id")));
        }
        // A line Filebeat ships must fit one Kafka record: the kafka output
        // drops a record above max_request_size (RecordTooLargeException).
        // Filebeat's own default cap is 10 MiB.
        match input.get("message_max_bytes").map(scalar) {
            Some(cap) => match cap.parse::<u64>() {
                Ok(cap) if cap + FILEBEAT_LINE_HEADROOM <= max_request => {
                    largest_lines_fit(&pipeline, cap, max_request, &mut problems)?;
                }
                _ => problems.push(format!(
                    "input {:?}: message_max_bytes {cap} + {FILEBEAT_LINE_HEADROOM} bytes of \
                     headroom is above the kafka outputs' max_request_size {max_request}",
                    text("id")
                )),
            },
            None => problems.push(format!(
                "input {:?}: no message_max_bytes (Filebeat's default, 10 MiB, is above the \
                 kafka outputs' max_request_size {max_request})",
                text("id")
            )),
        }
        // The pipeline decodes the line: no JSON decoding in Filebeat.
        for (key, value) in &input {
            if key.starts_with("parsers")
                || key.starts_with("json")
                || key.starts_with("processors")
            {
                problems.push(format!(
                    "input {:?}: {key} = {value} (Logstash decodes the line)",
                    text("id")
                ));
            }
        }
    }
    for (key, value) in &config {
        if key.starts_with("processors") {
            problems.push(format!(
                "{key} = {value}: the pipeline removes only Filebeat's default fields"
            ));
        }
        if key.starts_with("output.") && !key.starts_with("output.logstash.") {
            problems.push(format!("{key}: only output.logstash is expected"));
        }
    }
    let hosts = config
        .get("output.logstash.hosts")
        .and_then(Value::as_array)
        .map(|h| h.iter().map(scalar).collect::<Vec<_>>())
        .unwrap_or_default();
    if hosts.is_empty() || hosts.iter().any(|h| port_of(h) != Some(beats_port)) {
        problems.push(format!(
            "output.logstash.hosts {hosts:?}: not the beats input's port {beats_port}"
        ));
    }
    report(problems)
}

//! The pipeline against gen-events' routing and the sinks' reading: every kafka
//! output's settings, and test lines through both inputs, which must send the
//! same messages for the same line.

use std::collections::BTreeSet;

use anyhow::{ensure, Context, Result};
use serde_json::{Map, Value};

use super::event::LOGSTASH_NOW;
use super::pipeline::{
    filebeat_event, filebeat_event_read_at, Arrival, Outcome, Pipeline, FILEBEAT_READ_AT,
};
use super::plugins::{plugin_settings, setting_codec, KafkaRecord};
use crate::compose::{environment, service};
use crate::report;
use crate::values::scalar;
use crate::workspace::root;

/// The lines the Logstash test feeds: the schema's examples, lines whose
/// fields share names with Filebeat's or with the pipeline's flags, lines that
/// carry the json filter's tags or an "@metadata", lines Logstash cannot read,
/// and the generator's events with malformed ones. None is empty: Filebeat
/// ships no empty line (the tcp input's empty line is checked apart).
fn logstash_test_lines() -> Vec<String> {
    let mut lines: Vec<String> = [
        r#"{"@timestamp":"2024-05-01T21:34:56.789+09:00","@version":"1","host":"web-03","message":"GET /search","info":"search","user_id":"u-1024","keyword":"범죄도시 \uac80\uc0c9"}"#,
        r#"{"@timestamp":"2024-05-01T12:35:10.002Z","info":"movie_detail","user_id":1024,"movie_id":12345,"movie_title":"범죄도시","geo":{"country":"KR"}}"#,
        r#"{"@timestamp":"2024-05-01T12:30:00Z","info":"login","user_id":"u-1024","host":"auth-01"}"#,
        r#"{"info":"search","keyword":"matrix","user_id":null}"#,
        r#"{"@timestamp":"2024-05-01T12:00:00.5Z","info":"play","user_id":"u-5","agent":"Mozilla/5.0","log":"player","input":"remote","ecs":1,"event":"x","tags":["beta"]}"#,
        r#"{"@timestamp":"2024-05-01T12:00:01Z","info":"search","keyword":42,"user_id":"u1"}"#,
        r#"{"@timestamp":"2024-05-01T12:00:02Z","info":"movie_detail","movie_id":7,"user_id":{"id":1}}"#,
        r#"{"@timestamp":null,"@version":"2","_@timestamp":"x","info":"login","user_id":"u-2"}"#,
        // Tags and names the pipeline routes on, in the line: no effect.
        r#"{"info":"search","keyword":"x","user_id":"u-7","tags":["unreadable"]}"#,
        r#"{"@timestamp":"2024-05-01T12:00:03Z","info":"search","keyword":"x","user_id":"u-8","tags":["_jsonparsefailure","readable"]}"#,
        r#"{"info":"movie_detail","movie_id":8,"user_id":"u-9","readable":"true","line":"forged","via":"tcp"}"#,
        // The json filter's own tag for a bad @timestamp, in the line: sent as
        // it came (it cannot be told from the filter's).
        r#"{"@timestamp":"2024-05-01T12:00:04Z","info":"search","keyword":"x","user_id":"u-10","tags":["_timestampparsefailure"]}"#,
        // "@metadata" in double quotes: sent as it came, unkeyed.
        r#"{"@metadata":{"readable":"true","line":"forged"},"info":"search","keyword":"x","user_id":"u-11"}"#,
        r#"{"@timestamp":"yesterday","@metadata":{"readable":"true"},"info":"search","keyword":"x","user_id":"u-12"}"#,
        r#"{"info":"search","keyword":"@metadata","user_id":"u-13"}"#,
        r#"GET /search?q="@metadata""#,
        // ... but not without the quotes.
        r#"{"info":"search","keyword":"a@metadata.example","user_id":"u-14"}"#,
        // false is Ruby-false: the json filter takes it as no @timestamp.
        r#"{"@timestamp":false,"info":"search","keyword":"x","user_id":"u-15"}"#,
        "hello",
        "GET /search?q=parasite HTTP/1.1",
        " ",
        "\t",
        r#"[{"info":"search"}]"#,
        "[]",
        "null",
        "42",
        r#""{\"info\":\"search\"}""#,
        r#"{"@timestamp":"yesterday","info":"search","keyword":"x","user_id":"u-9"}"#,
        r#"{"@timestamp":"","info":"search","keyword":"x","user_id":"u-9"}"#,
        r#"{"@timestamp":1714566896000,"info":"login"}"#,
        r#"{"@timestamp":true,"info":"search","keyword":"x","user_id":0}"#,
    ]
    .map(str::to_owned)
    .to_vec();
    let mut generator =
        e2e::generator::Generator::new(11, e2e::generator::Mix::All, 1_714_566_896_000)
            .bad_fraction(0.25);
    for _ in 0..400 {
        let line = String::from_utf8_lossy(&generator.next_event().payload).into_owned();
        // Filebeat ships no empty lines.
        if !line.is_empty() {
            lines.push(line);
        }
    }
    lines
}

/// What the pipeline is meant to do with a line (pipeline.conf's header):
/// `Unreadable` (not a JSON object, or an @timestamp Logstash cannot parse)
/// and `AsItCame` (readable, but with "@metadata" in double quotes or the
/// json filter's `_timestampparsefailure` among its own tags) go to user2
/// unchanged; `Event` is sent as the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    Event,
    AsItCame,
    Unreadable,
}

fn expected(line: &str) -> Expected {
    let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line) else {
        return Expected::Unreadable;
    };
    let bad_time = match fields.get("@timestamp") {
        None | Some(Value::Null | Value::Bool(false)) => false,
        Some(Value::String(t)) => chrono::DateTime::parse_from_rfc3339(t).is_err(),
        Some(_) => true,
    };
    let own_tag = fields
        .get("tags")
        .and_then(Value::as_array)
        .is_some_and(|tags| tags.iter().any(|t| t == "_timestampparsefailure"));
    if bad_time {
        Expected::Unreadable
    } else if own_tag || line.contains(r#""@metadata""#) {
        Expected::AsItCame
    } else {
        Expected::Event
    }
}

/// The sinks' reading of a message (sink_core::event): time and fields, or
/// the error code that dead-letters it.
fn sink_view(payload: &str, kafka_ms: i64) -> std::result::Result<String, String> {
    let event = sink_core::event::Event::parse(payload.as_bytes(), Some(kafka_ms))
        .map_err(|e| e.code().to_owned())?;
    let show = |r: std::result::Result<
        Option<std::borrow::Cow<'_, str>>,
        sink_core::event::EventError,
    >| match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => format!("error {}", e.code()),
    };
    Ok(format!(
        "time {} info {} user_id {} keyword {} movie_id {} host {}",
        event.time().to_rfc3339(),
        show(event.info()),
        show(event.user_id()),
        show(event.keyword()),
        show(event.movie_id()),
        show(event.host()),
    ))
}

fn millis(rfc3339: &str) -> Result<i64> {
    Ok(chrono::DateTime::parse_from_rfc3339(rfc3339)?.timestamp_millis())
}

/// Checks one line through one input against gen-events' routing and the sinks.
fn check_logstash_line(
    pipeline: &Pipeline,
    via: &str,
    line: &str,
    problems: &mut Vec<String>,
) -> Result<()> {
    let arrival = match via {
        "beats" => Arrival::Beats(filebeat_event(line)),
        _ => Arrival::TcpLine(line),
    };
    let outcomes = pipeline
        .run(&arrival)
        .with_context(|| format!("{via} {line:?}"))?;
    let [Outcome {
        event,
        records,
        dropped,
    }] = outcomes.as_slice()
    else {
        problems.push(format!(
            "{via} {line:?}: {} events, expected 1",
            outcomes.len()
        ));
        return Ok(());
    };
    let mut say = |what: String| problems.push(format!("{via} {line:?}: {what}"));
    for r in dropped {
        say(format!(
            "{} dropped the {}-byte record",
            r.output,
            r.value.len()
        ));
    }
    // Routing and keys: as gen-events sends (and the Java client partitions by
    // the key, or spreads messages without one).
    let route = e2e::generator::logstash_route(line.as_bytes());
    let topics: BTreeSet<&str> = records.iter().map(|r| r.topic.as_str()).collect();
    let mut expected_topics = BTreeSet::from(["user2"]);
    if route.user3 {
        expected_topics.insert("user3");
    }
    if topics != expected_topics || records.len() != expected_topics.len() {
        say(format!(
            "sent to {:?}, gen-events sends to {expected_topics:?}",
            records.iter().map(|r| &r.topic).collect::<Vec<_>>()
        ));
    }
    for r in records {
        if r.key != route.key {
            say(format!(
                "{} key {:?}, gen-events' key {:?}",
                r.topic, r.key, route.key
            ));
        }
        // A reference Logstash left as written: one key shared by all such events.
        if r.key.as_deref().is_some_and(|k| k.contains("%{")) {
            say(format!("{} keyed by {:?}", r.topic, r.key));
        }
    }
    let readable = event.get("[@metadata][readable]")?.is_some();
    let expected = expected(line);
    if readable != (expected == Expected::Event) {
        say(format!(
            "[@metadata][readable] is {readable}, expected {expected:?}"
        ));
    }
    if expected != Expected::Event {
        // The line as it came to user2 only; one Logstash cannot read is
        // dead-lettered by the sinks with a reason.
        for r in records {
            if r.value != line {
                say(format!(
                    "{} got {:?}, not the line as it came",
                    r.topic, r.value
                ));
            }
            if let (Expected::Unreadable, Ok(view)) = (expected, sink_view(&r.value, 0)) {
                say(format!(
                    "the sinks accept it ({view}); they must dead-letter it"
                ));
            }
        }
        return Ok(());
    }
    let Ok(Value::Object(mut line_fields)) = serde_json::from_str::<Value>(line) else {
        return Ok(());
    };
    // Readable: the event's own fields reach Kafka, nothing of Filebeat's or
    // the inputs', and its own @timestamp or the read time.
    let own_time = line_fields
        .get("@timestamp")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let read_time = if via == "beats" {
        FILEBEAT_READ_AT
    } else {
        LOGSTASH_NOW
    };
    // An @timestamp of false is as if absent to the json filter.
    if line_fields.get("@timestamp") == Some(&Value::Bool(false)) {
        line_fields.remove("@timestamp");
    }
    let line_as_read = Value::Object(line_fields.clone()).to_string();
    for r in records {
        let Ok(Value::Object(sent)) = serde_json::from_str::<Value>(&r.value) else {
            say(format!("{} got {:?}, not a JSON object", r.topic, r.value));
            continue;
        };
        let mut expected_keys: BTreeSet<&str> = line_fields.keys().map(String::as_str).collect();
        expected_keys.extend(["@timestamp", "@version"]);
        let sent_keys: BTreeSet<&str> = sent.keys().map(String::as_str).collect();
        if sent_keys != expected_keys {
            say(format!(
                "{} fields {sent_keys:?}, expected the line's: {expected_keys:?}",
                r.topic
            ));
        }
        for (field, value) in &line_fields {
            if field != "@timestamp" && sent.get(field) != Some(value) {
                say(format!(
                    "{} {field} = {:?}, the line has {value}",
                    r.topic,
                    sent.get(field)
                ));
            }
        }
        let sent_time = sent
            .get("@timestamp")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let time = own_time.as_deref().unwrap_or(read_time);
        if millis(sent_time).ok() != millis(time).ok() || millis(sent_time).is_err() {
            say(format!(
                "{} @timestamp {sent_time:?}, expected the instant {time}",
                r.topic
            ));
        }
        // The sinks read the same event from the message as from the line
        // (a line without @timestamp: the time Logstash gave it).
        let kafka_ms = millis(read_time)?;
        if sink_view(&r.value, kafka_ms) != sink_view(&line_as_read, kafka_ms) {
            say(format!(
                "{}: the sinks read {:?}, from the line {:?}",
                r.topic,
                sink_view(&r.value, kafka_ms),
                sink_view(&line_as_read, kafka_ms)
            ));
        }
    }
    Ok(())
}

/// The repository paths pipeline.conf names exist (a moved test or doc
/// leaves a stale pointer otherwise).
fn named_paths_exist(problems: &mut Vec<String>) -> Result<()> {
    let file = "deploy/logstash/pipeline.conf";
    let text = std::fs::read_to_string(root().join(file))?;
    for word in text.split(|c: char| c.is_whitespace() || "(),;`\"'".contains(c)) {
        let path = word.trim_end_matches(['.', ':']);
        let in_repo = ["crates/", "tests/", "docs/", "deploy/", "scripts/"]
            .iter()
            .any(|dir| path.starts_with(dir));
        if in_repo && !root().join(path).exists() {
            problems.push(format!("{file} names {path}, which does not exist"));
        }
    }
    Ok(())
}

/// The messages the pipeline sends for what arrives.
fn records(pipeline: &Pipeline, arrival: &Arrival) -> Result<Vec<KafkaRecord>> {
    Ok(pipeline
        .run(arrival)?
        .into_iter()
        .flat_map(|o| o.records)
        .collect())
}

/// The tcp input sends what the beats input sends for the same line, read at
/// the same time: `nc localhost 5000 < file` gives what Filebeat would.
fn check_inputs_agree(pipeline: &Pipeline, line: &str, problems: &mut Vec<String>) -> Result<()> {
    let beats = records(
        pipeline,
        &Arrival::Beats(filebeat_event_read_at(line, LOGSTASH_NOW)),
    )
    .with_context(|| format!("beats {line:?}"))?;
    let tcp =
        records(pipeline, &Arrival::TcpLine(line)).with_context(|| format!("tcp {line:?}"))?;
    if beats != tcp {
        problems.push(format!(
            "{line:?}: the inputs differ: beats sends {beats:?}, tcp {tcp:?}"
        ));
    }
    Ok(())
}

/// deploy/logstash/pipeline.conf, run by the interpreter, routes and keys every
/// test line as gen-events does, the sinks read what it sends as the line,
/// and both inputs send the same for the same line.
pub fn logstash_pipeline_routes_like_gen_events() -> Result<()> {
    let pipeline = Pipeline::load()?;
    let compose_bootstrap = environment(service("redis-sink")?)?
        .get("KAFKA_BOOTSTRAP_SERVERS")
        .cloned()
        .unwrap_or_default();
    let mut problems = Vec::new();
    named_paths_exist(&mut problems)?;

    // Every kafka output: its own id (Logstash refuses to start on a repeated
    // one), the compose brokers by default, keyed by user_id or not keyed, the
    // event as JSON or the unreadable line as it came, acks from all replicas.
    let outputs = pipeline.kafka_outputs()?;
    ensure!(!outputs.is_empty(), "no kafka output");
    let mut ids = BTreeSet::new();
    for out in &outputs {
        let text = |name: &str| out.get(name).map(scalar).unwrap_or_default();
        let id = text("id");
        if !ids.insert(id.clone()) {
            problems.push(format!("kafka output id {id:?} is used twice"));
        }
        // `${KAFKA_BOOTSTRAP_SERVERS:default}`: the default is the compose cluster.
        let bootstrap = text("bootstrap_servers");
        let default = bootstrap
            .strip_prefix("${KAFKA_BOOTSTRAP_SERVERS:")
            .and_then(|b| b.strip_suffix('}'));
        if default != Some(compose_bootstrap.as_str()) {
            problems.push(format!("kafka output {id}: bootstrap_servers {bootstrap} is not ${{KAFKA_BOOTSTRAP_SERVERS:<the compose brokers>}}"));
        }
        if out.contains_key("message_key") && text("message_key") != "%{[user_id]}" {
            problems.push(format!(
                "kafka output {id}: keyed by {}, not %{{[user_id]}}",
                text("message_key")
            ));
        }
        if text("acks") != "all" {
            problems.push(format!("kafka output {id}: acks is not all"));
        }
        let codec = out
            .get("codec")
            .map(|c| setting_codec(c, "codec"))
            .transpose()?;
        let codec_ok = match &codec {
            Some((name, body)) if name == "json" => body.is_empty(),
            Some((name, body)) if name == "plain" => {
                let format = plugin_settings("plain codec", body, &["format"])?;
                format.get("format").map(|f| scalar(f)) == Some("%{[@metadata][line]}".into())
            }
            _ => false,
        };
        if !codec_ok {
            problems.push(format!(
                "kafka output {id}: codec is neither json nor the unreadable line as it came"
            ));
        }
    }

    // Both inputs: the beats input at Filebeat's port, the tcp one.
    ensure!(
        pipeline.port("beats")? == 5044,
        "the beats input is not on 5044"
    );
    pipeline.input("tcp")?;

    // Routing by info, as gen-events routes.
    for info in [
        Some("search"),
        Some("movie_detail"),
        Some("login"),
        Some("logout"),
        Some("Search"),
        Some(""),
        None,
    ] {
        let mut event = Map::new();
        event.insert("user_id".into(), "u-1".into());
        if let Some(info) = info {
            event.insert("info".into(), info.into());
        }
        let line = Value::Object(event).to_string();
        for via in ["tcp", "beats"] {
            check_logstash_line(&pipeline, via, &line, &mut problems)?;
        }
    }

    // Keyed by user_id when the event has one, without a key when it has none:
    // absent, null, "" and false (none a user for the sinks) give no key; the
    // string "false" (a user, though Logstash calls it false), 0 and the rest
    // are the key. Through both inputs, to user2 only and to user3 too, and
    // for a line Logstash cannot read.
    let user_ids = [
        (None, None),
        (Some(Value::Null), None),
        (Some(Value::from("")), None),
        (Some(Value::from(false)), None),
        (Some(Value::from("false")), Some("false")),
        (Some(Value::from("0")), Some("0")),
        (Some(Value::from(0)), Some("0")),
        (Some(Value::from("u-1")), Some("u-1")),
        (Some(Value::from(1024)), Some("1024")),
        (Some(Value::from(true)), Some("true")),
        (Some(serde_json::json!({"id": 1})), Some(r#"{"id":1}"#)),
    ];
    for (user_id, expected) in user_ids {
        for (info, time) in [
            ("search", "2024-05-01T12:00:00Z"),
            ("login", "2024-05-01T12:00:00Z"),
            ("search", "yesterday"),
        ] {
            let mut event = Map::new();
            event.insert("@timestamp".into(), time.into());
            event.insert("info".into(), info.into());
            if let Some(user_id) = &user_id {
                event.insert("user_id".into(), user_id.clone());
            }
            let line = Value::Object(event).to_string();
            let expected = expected.map(str::to_owned);
            if e2e::generator::logstash_route(line.as_bytes()).key != expected {
                problems.push(format!("gen-events: {line}: key is not {expected:?}"));
            }
            for via in ["tcp", "beats"] {
                let arrival = match via {
                    "beats" => Arrival::Beats(filebeat_event(&line)),
                    _ => Arrival::TcpLine(&line),
                };
                for outcome in pipeline.run(&arrival)? {
                    for r in outcome.records.iter().filter(|r| r.key != expected) {
                        problems.push(format!(
                            "{via} {line}: {} ({}) key {:?}, expected {expected:?}",
                            r.topic, r.output, r.key
                        ));
                    }
                }
                check_logstash_line(&pipeline, via, &line, &mut problems)?;
            }
        }
    }

    // Every test line as Filebeat ships it and on the tcp input, each checked,
    // and the two inputs' messages compared.
    for line in logstash_test_lines() {
        check_logstash_line(&pipeline, "beats", &line, &mut problems)?;
        check_logstash_line(&pipeline, "tcp", &line, &mut problems)?;
        check_inputs_agree(&pipeline, &line, &mut problems)?;
    }
    // An empty line, which Filebeat does not ship: the tcp input sends nothing.
    let empty = pipeline.run(&Arrival::TcpLine(""))?;
    if !empty.is_empty() {
        problems.push(format!(
            "tcp \"\": an empty line gives {empty:?}; Filebeat ships none"
        ));
    }
    problems.dedup();
    const SHOWN: usize = 30;
    if problems.len() > SHOWN {
        let more = problems.len() - SHOWN;
        problems.truncate(SHOWN);
        problems.push(format!("... and {more} more"));
    }
    report(problems)
}

//! The pipeline against gen-events' routing and the sinks' reading: every kafka
//! output's settings, and test lines through both inputs.

use std::collections::BTreeSet;

use anyhow::{ensure, Context, Result};
use serde_json::{Map, Value};

use super::event::LOGSTASH_NOW;
use super::pipeline::{filebeat_event, Arrival, Outcome, Pipeline, FILEBEAT_READ_AT};
use super::plugins::{plugin_settings, setting_codec};
use crate::compose::{environment, service};
use crate::report;
use crate::values::scalar;

/// The lines the Logstash test feeds: the schema's examples, lines whose
/// fields share names with Filebeat's, lines Logstash cannot read, and the
/// generator's events with malformed ones.
fn logstash_test_lines() -> Vec<String> {
    let mut lines: Vec<String> = [
        r#"{"@timestamp":"2024-05-01T21:34:56.789+09:00","@version":"1","host":"web-03","message":"GET /search","info":"search","user_id":"u-1024","keyword":"범죄도시 \uac80\uc0c9"}"#,
        r#"{"@timestamp":"2024-05-01T12:35:10.002Z","info":"movie_detail","user_id":1024,"movie_id":12345,"movie_title":"범죄도시","geo":{"country":"KR"}}"#,
        r#"{"@timestamp":"2024-05-01T12:30:00Z","info":"login","user_id":"u-1024","host":"auth-01"}"#,
        r#"{"info":"search","keyword":"matrix","user_id":null}"#,
        r#"{"@timestamp":"2024-05-01T12:00:00.5Z","info":"play","user_id":"u-5","agent":"Mozilla/5.0","log":"player","input":"remote","ecs":1,"tags":["beta"]}"#,
        r#"{"@timestamp":"2024-05-01T12:00:01Z","info":"search","keyword":42,"user_id":"u1"}"#,
        r#"{"@timestamp":"2024-05-01T12:00:02Z","info":"movie_detail","movie_id":7,"user_id":{"id":1}}"#,
        "hello",
        "GET /search?q=parasite HTTP/1.1",
        r#"[{"info":"search"}]"#,
        "null",
        "42",
        r#"{"@timestamp":"yesterday","info":"search","keyword":"x","user_id":"u-9"}"#,
        r#"{"@timestamp":1714566896000,"info":"login"}"#,
    ]
    .map(str::to_owned)
    .to_vec();
    let mut generator =
        e2e::generator::Generator::new(11, e2e::generator::Mix::All, 1_714_566_896_000)
            .bad_fraction(0.25);
    for _ in 0..400 {
        let line = String::from_utf8_lossy(&generator.next_event().payload).into_owned();
        // Filebeat ships no empty lines.
        if !line.trim().is_empty() {
            lines.push(line);
        }
    }
    lines
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
        _ => Arrival::JsonLine(line),
    };
    let outcomes = pipeline
        .run(&arrival)
        .with_context(|| format!("{via} {line:?}"))?;
    let [Outcome { event, records }] = outcomes.as_slice() else {
        problems.push(format!(
            "{via} {line:?}: {} events, expected 1",
            outcomes.len()
        ));
        return Ok(());
    };
    let mut say = |what: String| problems.push(format!("{via} {line:?}: {what}"));
    // Routing and keys: as gen-events sends (and the Java client partitions by
    // the key, or spreads messages without one).
    let route = e2e::generator::logstash_route(line.as_bytes());
    let topics: BTreeSet<&str> = records.iter().map(|r| r.topic.as_str()).collect();
    let mut expected = BTreeSet::from(["user2"]);
    if route.user3 {
        expected.insert("user3");
    }
    if topics != expected || records.len() != expected.len() {
        say(format!(
            "sent to {:?}, gen-events sends to {expected:?}",
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
    let tags = event.tags();
    let unreadable = tags.iter().any(|t| t == "unreadable");
    let line_json = match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(fields)) => Some(fields),
        _ => None,
    };
    let tcp_bad_time = via == "tcp" && tags.iter().any(|t| t == "_timestampparsefailure");
    if line_json.is_none() || (via == "beats" && tags.iter().any(|t| t.ends_with("parsefailure"))) {
        // Unreadable: tagged, not dropped; the line as it came to user2 only,
        // where the sinks dead-letter it with a reason.
        if !unreadable || !tags.iter().any(|t| t.ends_with("parsefailure")) {
            say(format!(
                "not tagged unreadable and *parsefailure: tags {tags:?}"
            ));
        }
        for r in records {
            if r.value != line {
                say(format!(
                    "{} got {:?}, not the line as it came",
                    r.topic, r.value
                ));
            }
            if let Ok(view) = sink_view(&r.value, 0) {
                say(format!(
                    "the sinks accept it ({view}); they must dead-letter it"
                ));
            }
        }
        return Ok(());
    }
    if unreadable {
        say(format!("tagged unreadable but readable: tags {tags:?}"));
    }
    let Some(line_fields) = line_json else {
        return Ok(());
    };
    // Readable: the event's own fields reach Kafka, nothing of Filebeat's.
    let own_time = line_fields
        .get("@timestamp")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let read_time = if via == "beats" {
        FILEBEAT_READ_AT
    } else {
        LOGSTASH_NOW
    };
    for r in records {
        let Ok(Value::Object(sent)) = serde_json::from_str::<Value>(&r.value) else {
            say(format!("{} got {:?}, not a JSON object", r.topic, r.value));
            continue;
        };
        let mut expected_keys: BTreeSet<&str> = line_fields.keys().map(String::as_str).collect();
        expected_keys.extend(["@timestamp", "@version"]);
        if tcp_bad_time {
            expected_keys.extend(["_@timestamp", "tags"]);
        }
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
        let time = match (&own_time, tcp_bad_time) {
            (Some(own), false) => own.as_str(),
            _ => read_time,
        };
        if millis(sent_time).ok() != millis(time).ok() || millis(sent_time).is_err() {
            say(format!(
                "{} @timestamp {sent_time:?}, expected the instant {time}",
                r.topic
            ));
        }
        // The sinks read the same event from the message as from the line
        // (a line without @timestamp: the time Logstash gave it).
        let kafka_ms = millis(read_time)?;
        if !tcp_bad_time && sink_view(&r.value, kafka_ms) != sink_view(line, kafka_ms) {
            say(format!(
                "{}: the sinks read {:?}, from the line {:?}",
                r.topic,
                sink_view(&r.value, kafka_ms),
                sink_view(line, kafka_ms)
            ));
        }
    }
    Ok(())
}

/// deploy/logstash/pipeline.conf, run by the interpreter, routes and keys every
/// test line as gen-events does, and the sinks read what it sends as the line.
pub fn logstash_pipeline_routes_like_gen_events() -> Result<()> {
    let pipeline = Pipeline::load()?;
    let compose_bootstrap = environment(service("redis-sink")?)?
        .get("KAFKA_BOOTSTRAP_SERVERS")
        .cloned()
        .unwrap_or_default();
    let mut problems = Vec::new();

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

    // Both inputs: the beats input at Filebeat's port, the tcp json_lines one.
    ensure!(
        pipeline.port("beats")? == 5044,
        "the beats input is not on 5044"
    );
    pipeline.input("tcp")?;

    // Routing by info, as gen-events routes (json_lines events).
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
        check_logstash_line(
            &pipeline,
            "tcp",
            &Value::Object(event).to_string(),
            &mut problems,
        )?;
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
                    _ => Arrival::JsonLine(&line),
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

    // Every test line as Filebeat ships it, and as a json_lines line where the
    // codec's handling is modelled (not a list or null).
    for line in logstash_test_lines() {
        check_logstash_line(&pipeline, "beats", &line, &mut problems)?;
        let list_or_null = matches!(
            serde_json::from_str::<Value>(&line),
            Ok(Value::Array(_) | Value::Null)
        );
        if !list_or_null {
            check_logstash_line(&pipeline, "tcp", &line, &mut problems)?;
        }
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

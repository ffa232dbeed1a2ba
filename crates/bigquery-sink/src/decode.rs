//! The pure half of a write: one consumed record → one insertAll row.
//!
//! Every log is kept. Only a message that is not a JSON object, or whose
//! `@timestamp` is present but unusable, is refused at decode time (it goes
//! to the dead-letter topic). A typed column takes its field when the type
//! fits (integer ids become their decimal text) and is NULL otherwise;
//! `payload` always holds the whole original text, so fields Logstash adds
//! later are never lost.

use std::borrow::Cow;
use std::fmt;
use std::fmt::Write as _;

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use sink_core::{Event, EventError, Record, Rejection};

use crate::json_text;

/// The fields [`Event::parse`] knows, in the order of [`Columns`].
const KNOWN_FIELDS: [&str; 6] = [
    "@timestamp",
    "info",
    "user_id",
    "keyword",
    "movie_id",
    "host",
];

/// What a record decodes to: the typed columns. The payload, topic,
/// partition and offset stay in the record, so a batch does not hold the
/// message bytes twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    /// When the event happened (`@timestamp`, or the Kafka timestamp).
    pub event_time: DateTime<Utc>,
    /// `info`, NULL unless a string.
    pub info: Option<String>,
    /// `user_id`, NULL unless a non-empty string or an integer.
    pub user_id: Option<String>,
    /// `keyword`, NULL unless a string.
    pub keyword: Option<String>,
    /// `movie_id`, NULL unless a non-empty string or an integer.
    pub movie_id: Option<String>,
    /// `host`, NULL unless a string.
    pub host: Option<String>,
}

impl Columns {
    fn of(event: &Event<'_>) -> Self {
        // A field of the wrong type is NULL in its column, not a lost event.
        let column = |value: Result<Option<Cow<'_, str>>, EventError>| {
            value.ok().flatten().map(Cow::into_owned)
        };
        Self {
            event_time: event.time(),
            info: column(event.info()),
            user_id: column(event.user_id()),
            keyword: column(event.keyword()),
            movie_id: column(event.movie_id()),
            host: column(event.host()),
        }
    }
}

/// Checks one record and extracts its typed columns.
///
/// # Errors
///
/// A [`Rejection`] carrying the [`EventError`]'s code and message when the
/// record is not a JSON object or has no usable time.
pub fn decode(record: &Record) -> Result<Columns, Rejection> {
    decode_payload(&record.payload, record.timestamp_ms)
        .map_err(|err| Rejection::new(err.code(), err.to_string()))
}

fn decode_payload(payload: &[u8], kafka_timestamp_ms: Option<i64>) -> Result<Columns, EventError> {
    match Event::parse(payload, kafka_timestamp_ms) {
        Ok(event) => Ok(Columns::of(&event)),
        // The shared parser refuses a known field given twice, so that no
        // sink picks one copy over the other. Here no copy is picked either:
        // that column is NULL, and `payload` keeps both. Only a doubled
        // `@timestamp` leaves the event without a time.
        Err(EventError::DuplicateField { field }) if field != "@timestamp" => {
            let unambiguous =
                without_repeated_fields(payload).ok_or(EventError::DuplicateField { field })?;
            Event::parse(unambiguous.as_bytes(), kafka_timestamp_ms).map(|e| Columns::of(&e))
        }
        Err(err) => Err(err),
    }
}

/// A JSON object holding the known fields of `payload` that appear exactly
/// once, as they were written. `None` if `payload` is not a JSON object.
fn without_repeated_fields(payload: &[u8]) -> Option<String> {
    let fields: KnownFields<'_> = serde_json::from_slice(payload).ok()?;
    let mut out = String::from("{");
    for (index, name) in KNOWN_FIELDS.iter().enumerate() {
        let mut values = fields.0.iter().filter(|(i, _)| *i == index);
        if let (Some((_, value)), None) = (values.next(), values.next()) {
            if out.len() > 1 {
                out.push(',');
            }
            // The names need no escaping; the value is a verbatim JSON slice.
            let _ = write!(out, "\"{name}\":{}", value.get());
        }
    }
    out.push('}');
    Some(out)
}

/// Every occurrence of a known field: (index in [`KNOWN_FIELDS`], raw value).
struct KnownFields<'a>(Vec<(usize, &'a RawValue)>);

impl<'de> Deserialize<'de> for KnownFields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Occurrences;
        impl<'de> Visitor<'de> for Occurrences {
            type Value = KnownFields<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut found = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    match KNOWN_FIELDS.iter().position(|k| *k == key) {
                        Some(index) => found.push((index, map.next_value::<&'de RawValue>()?)),
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(KnownFields(found))
            }
        }
        deserializer.deserialize_map(Occurrences)
    }
}

/// The row's `insertId`, which BigQuery uses to drop retried duplicates on
/// a best-effort basis: the record's Kafka coordinates.
pub fn insert_id(record: &Record) -> String {
    format!("{}:{}:{}", record.topic, record.partition, record.offset)
}

/// A TIMESTAMP value as BigQuery's streaming API reads it, truncated to
/// BigQuery's microsecond precision: `2024-05-01T12:34:56.789000Z`.
pub fn timestamp(time: DateTime<Utc>) -> String {
    let mut out = Vec::with_capacity(27);
    push_timestamp(&mut out, time);
    // Only ASCII digits and separators were written: nothing is replaced.
    String::from_utf8_lossy(&out).into_owned()
}

/// Appends [`timestamp`]'s text, the digits by hand: each row's
/// `event_time` through `format!` was 3 % of the sink's profile.
fn push_timestamp(out: &mut Vec<u8>, time: DateTime<Utc>) {
    let Ok(year @ 0..=9999) = u32::try_from(time.year()) else {
        // Years outside 0..=9999 are left for BigQuery to refuse (they
        // cannot come from an RFC 3339 `@timestamp`).
        let text = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            time.year(),
            time.month(),
            time.day(),
            time.hour(),
            time.minute(),
            time.second(),
            time.nanosecond() % 1_000_000_000 / 1_000
        );
        out.extend_from_slice(text.as_bytes());
        return;
    };
    let digits = |out: &mut Vec<u8>, value: u32, width: u32| {
        for place in (0..width).rev() {
            // One decimal digit: below 10.
            out.push(b'0' + (value / 10_u32.pow(place) % 10) as u8);
        }
    };
    digits(out, year, 4);
    for (separator, value) in [
        (b'-', time.month()),
        (b'-', time.day()),
        (b'T', time.hour()),
        (b':', time.minute()),
        (b':', time.second()),
    ] {
        out.push(separator);
        digits(out, value, 2);
    }
    out.push(b'.');
    // A leap second's nanoseconds run past 1e9; BigQuery has none.
    digits(out, time.nanosecond() % 1_000_000_000 / 1_000, 6);
    out.push(b'Z');
}

/// Appends the insertAll row of one decoded record to `out`, as the JSON
/// of one element of the request's `rows`:
/// `{"insertId":…,"json":{"event_time":…,…}}`. `ingested_at` is the
/// write's time, formatted by [`timestamp`] once per write. NULL columns
/// are left out of the row (BigQuery stores NULL), which keeps requests
/// small.
///
/// Written by hand ([`crate::json_text`]) straight from borrowed fields:
/// building a `serde_json::Value` per row (what the client's `insert_all`
/// takes) and serializing it twice was about 40 % of the sink's CPU in a
/// profile, and serde's escaping of the payload the largest item after
/// that (docs/benchmarks.md).
pub fn write(out: &mut Vec<u8>, record: &Record, columns: &Columns, ingested_at: &str) {
    // A JSON column is written as a string holding the JSON text. Decoding
    // checked the bytes are UTF-8, so this borrows them unchanged (and
    // `from_utf8` checks faster than the lossy conversion would).
    let payload = match std::str::from_utf8(&record.payload) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(&record.payload),
    };
    out.extend_from_slice(b"{\"insertId\":");
    json_text::push_str(out, &insert_id(record));
    out.extend_from_slice(b",\"json\":{\"event_time\":\"");
    push_timestamp(out, columns.event_time);
    out.push(b'"');
    for (name, value) in [
        (&b",\"info\":"[..], &columns.info),
        (b",\"user_id\":", &columns.user_id),
        (b",\"keyword\":", &columns.keyword),
        (b",\"movie_id\":", &columns.movie_id),
        (b",\"host\":", &columns.host),
    ] {
        if let Some(value) = value {
            out.extend_from_slice(name);
            json_text::push_str(out, value);
        }
    }
    out.extend_from_slice(b",\"payload\":");
    json_text::push_str(out, &payload);
    out.extend_from_slice(b",\"kafka_topic\":");
    json_text::push_str(out, &record.topic);
    out.extend_from_slice(b",\"kafka_partition\":");
    json_text::push_int(out, record.partition);
    out.extend_from_slice(b",\"kafka_offset\":");
    json_text::push_int(out, record.offset);
    out.extend_from_slice(b",\"ingested_at\":");
    json_text::push_str(out, ingested_at);
    out.extend_from_slice(b"}}");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use chrono::TimeZone;
    use serde_json::{json, Value};

    use super::*;

    const KAFKA_MS: i64 = 1_714_566_896_000;

    fn record(payload: &str) -> Record {
        Record {
            topic: Arc::from("user2"),
            partition: 2,
            offset: 41,
            timestamp_ms: Some(KAFKA_MS),
            key: None,
            payload: payload.as_bytes().to_vec(),
            headers: None,
        }
    }

    /// The row `write` appends, parsed back.
    fn written(record: &Record, columns: &Columns, ingested_at: &str) -> Value {
        let mut out = Vec::new();
        write(&mut out, record, columns, ingested_at);
        serde_json::from_slice(&out).unwrap()
    }

    fn row_of(payload: &str) -> Value {
        let record = record(payload);
        let columns = decode(&record).unwrap();
        written(&record, &columns, "2024-05-01T00:00:00.000000Z")["json"].take()
    }

    #[test]
    fn a_full_event_fills_every_column() {
        let payload = r#"{"@timestamp":"2024-05-01T21:34:56.789+09:00","info":"search","user_id":"u-1","keyword":"범죄도시","host":"web-03","message":"GET /search"}"#;
        let record = record(payload);
        let row = written(
            &record,
            &decode(&record).unwrap(),
            "2024-05-02T00:00:00.000000Z",
        );
        assert_eq!(row["insertId"], "user2:2:41");
        assert_eq!(
            row["json"],
            json!({
                "event_time": "2024-05-01T12:34:56.789000Z",
                "info": "search",
                "user_id": "u-1",
                "keyword": "범죄도시",
                "host": "web-03",
                "payload": payload,
                "kafka_topic": "user2",
                "kafka_partition": 2,
                "kafka_offset": 41,
                "ingested_at": "2024-05-02T00:00:00.000000Z",
            })
        );
    }

    #[test]
    fn integer_ids_become_strings() {
        let row = row_of(r#"{"info":"movie_detail","user_id":1024,"movie_id":12345}"#);
        assert_eq!(row["user_id"], "1024");
        assert_eq!(row["movie_id"], "12345");
    }

    #[test]
    fn fields_of_the_wrong_type_are_null_and_kept_in_the_payload() {
        let payload = r#"{"info":3,"user_id":1.5,"keyword":["x"],"movie_id":"","host":{"n":1}}"#;
        let row = row_of(payload);
        for column in ["info", "user_id", "keyword", "movie_id", "host"] {
            assert!(row.get(column).is_none(), "{column} should be NULL: {row}");
        }
        assert_eq!(row["payload"], payload);
    }

    #[test]
    fn absent_timestamp_takes_the_kafka_timestamp() {
        let row = row_of(r#"{"info":"login"}"#);
        assert_eq!(row["event_time"], "2024-05-01T12:34:56.000000Z");
    }

    #[test]
    fn timestamps_are_truncated_to_microseconds() {
        let time = Utc.with_ymd_and_hms(2024, 5, 1, 12, 34, 56).unwrap()
            + chrono::Duration::nanoseconds(123_456_789);
        assert_eq!(timestamp(time), "2024-05-01T12:34:56.123456Z");
        // Year 0 parses as RFC 3339; BigQuery refuses it, which sends the
        // event to the dead-letter topic with BigQuery's reason.
        let year0 = DateTime::parse_from_rfc3339("0000-01-01T00:00:00Z").unwrap();
        assert_eq!(timestamp(year0.to_utc()), "0000-01-01T00:00:00.000000Z");
        // A Kafka timestamp can reach past year 9999 (no `@timestamp`).
        let far = DateTime::from_timestamp_millis(253_402_300_800_123).unwrap();
        assert_eq!(timestamp(far), "10000-01-01T00:00:00.123000Z");
    }

    #[test]
    fn the_payload_is_the_original_text_byte_for_byte() {
        let payload = "{ \"info\" : \"search\", \"keyword\":\"\\uac80\\uc0c9\", \"n\": 1.50 }\n";
        assert_eq!(row_of(payload)["payload"], payload);
    }

    #[test]
    fn not_an_object_is_rejected_with_the_event_error() {
        for (payload, code) in [
            ("GET /search", "not_json"),
            ("[1,2]", "not_an_object"),
            ("", "empty"),
            (r#"{"@timestamp":"yesterday"}"#, "bad_timestamp"),
            (r#"{"@timestamp":1714566896}"#, "wrong_type"),
        ] {
            let rejection = decode(&record(payload)).unwrap_err();
            assert_eq!(rejection.code, code, "{payload}");
            assert!(!rejection.reason.is_empty());
        }
        let invalid_utf8 = Record {
            payload: vec![b'{', 0xff, b'}'],
            ..record("")
        };
        assert_eq!(decode(&invalid_utf8).unwrap_err().code, "invalid_utf8");
    }

    #[test]
    fn a_repeated_field_is_null_and_the_rest_is_kept() {
        let payload = r#"{"@timestamp":"2024-05-01T00:00:00Z","keyword":"a","info":"search","keyword":"b","user_id":7}"#;
        let row = row_of(payload);
        assert!(row.get("keyword").is_none(), "{row}");
        assert_eq!(row["info"], "search");
        assert_eq!(row["user_id"], "7");
        assert_eq!(row["event_time"], "2024-05-01T00:00:00.000000Z");
        assert_eq!(row["payload"], payload);
    }

    #[test]
    fn a_repeated_timestamp_is_rejected() {
        let rejection = decode(&record(
            r#"{"@timestamp":"2024-05-01T00:00:00Z","@timestamp":"2024-05-02T00:00:00Z"}"#,
        ))
        .unwrap_err();
        assert_eq!(rejection.code, "duplicate_field");
    }

    #[test]
    fn a_repeated_field_does_not_hide_a_bad_timestamp() {
        let rejection =
            decode(&record(r#"{"@timestamp":"nope","info":"a","info":"b"}"#)).unwrap_err();
        assert_eq!(rejection.code, "bad_timestamp");
    }
}

/// For any bytes: decode never panics, and yields columns or a reason.
/// For any record and columns: the row is byte for byte what serde_json
/// writes for the row's fields.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde::Serialize;

    use super::*;

    /// The row as serde would write it: the reference for [`write`].
    #[derive(Serialize)]
    struct Reference<'a> {
        #[serde(rename = "insertId")]
        insert_id: String,
        json: ReferenceJson<'a>,
    }

    #[derive(Serialize)]
    struct ReferenceJson<'a> {
        event_time: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        info: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        user_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        keyword: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        movie_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        host: Option<&'a str>,
        payload: &'a str,
        kafka_topic: &'a str,
        kafka_partition: i32,
        kafka_offset: i64,
        ingested_at: &'a str,
    }

    proptest! {
        #[test]
        fn a_row_is_what_serde_json_writes(
            texts in proptest::collection::vec(proptest::option::of(any::<String>()), 5),
            payload in any::<String>(),
            topic in any::<String>(),
            partition in any::<i32>(),
            offset in any::<i64>(),
            event_ms in -62_135_596_800_000_i64..=253_402_300_799_999,
            ingested_at in any::<String>(),
        ) {
            let record = Record {
                topic: topic.as_str().into(),
                partition,
                offset,
                timestamp_ms: None,
                key: None,
                payload: payload.clone().into_bytes(),
                headers: None,
            };
            let columns = Columns {
                event_time: DateTime::from_timestamp_millis(event_ms).unwrap_or_default(),
                info: texts[0].clone(),
                user_id: texts[1].clone(),
                keyword: texts[2].clone(),
                movie_id: texts[3].clone(),
                host: texts[4].clone(),
            };
            let reference = Reference {
                insert_id: insert_id(&record),
                json: ReferenceJson {
                    event_time: timestamp(columns.event_time),
                    info: columns.info.as_deref(),
                    user_id: columns.user_id.as_deref(),
                    keyword: columns.keyword.as_deref(),
                    movie_id: columns.movie_id.as_deref(),
                    host: columns.host.as_deref(),
                    payload: &payload,
                    kafka_topic: &topic,
                    kafka_partition: partition,
                    kafka_offset: offset,
                    ingested_at: &ingested_at,
                },
            };
            let mut row = Vec::new();
            write(&mut row, &record, &columns, &ingested_at);
            prop_assert_eq!(
                String::from_utf8(row).unwrap_or_default(),
                serde_json::to_string(&reference).unwrap_or_default()
            );
        }

        #[test]
        fn any_bytes_decode_to_columns_or_a_reason(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            timestamp_ms in proptest::option::of(any::<i64>()),
        ) {
            let record = Record {
                topic: "user2".into(),
                partition: 0,
                offset: 0,
                timestamp_ms,
                key: None,
                payload: bytes,
                headers: None,
            };
            if let Err(why) = decode(&record) {
                prop_assert!(!why.code.is_empty() && !why.reason.is_empty());
            }
        }
    }
}

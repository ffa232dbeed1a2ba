//! The log event: one JSON object per Kafka message, produced by Logstash.
//!
//! # Schema
//!
//! | field        | type                                  | absent / `null`                     |
//! |--------------|---------------------------------------|-------------------------------------|
//! | `@timestamp` | RFC 3339 string                       | the Kafka message timestamp is used |
//! | `info`       | string (`search`, `movie_detail`, ...) | `None`                              |
//! | `user_id`    | non-empty string or JSON integer      | `None` (anonymous user)             |
//! | `keyword`    | string (may be empty)                 | `None`                              |
//! | `movie_id`   | non-empty string or JSON integer      | `None`                              |
//! | `host`       | string                                | `None`                              |
//!
//! Any other field (`message`, `@version`, `movie_title`, nested objects, ...)
//! is ignored here but stays in [`Event::payload`]. `docs/event-schema.md`
//! describes the schema and which sink needs what.
//!
//! # Why parsing is lazy per field
//!
//! The two sinks disagree on what a usable event is. The BigQuery sink keeps
//! every event and merely leaves a typed column NULL when its field has the
//! wrong type; the Redis sink needs `info`, `keyword` and `movie_id` to be
//! right. If [`Event::parse`] validated every field, one malformed `movie_id`
//! would cost BigQuery a row it could have stored. So `parse` rejects only
//! what no sink can use (bytes that are not one JSON object, a known field
//! given twice, or no usable time), and each accessor validates its own
//! field when asked, returning an [`EventError`] the caller can use as a
//! dead-letter reason or turn into NULL.
//!
//! Parsing borrows from the message: the known fields are kept as
//! [`RawValue`] slices of the original text, and strings without escapes are
//! handed out as [`Cow::Borrowed`]. Only escaped strings and integer ids
//! allocate.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest quoted value, in characters, that an error message may carry.
/// Error messages end up in dead-letter headers and logs, so a 300 KB value
/// must not produce a 300 KB reason.
const MAX_QUOTED_CHARS: usize = 64;

/// Longest serde_json message kept in [`EventError::NotJson`]. serde_json's
/// syntax messages are short, but nothing promises that.
const MAX_JSON_MESSAGE_CHARS: usize = 200;

const EXPECTED_STRING: &str = "a string";
const EXPECTED_ID: &str = "a non-empty string or an integer";

/// Why a message, or one field of it, cannot be used.
///
/// The `Display` text is written for an operator reading a dead-letter
/// reason; [`EventError::code`] is the stable label for metrics.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EventError {
    /// The message bytes are not UTF-8, so they cannot be JSON.
    #[error("message is not valid UTF-8 (first invalid byte at offset {valid_up_to})")]
    InvalidUtf8 {
        /// Length of the longest valid UTF-8 prefix.
        valid_up_to: usize,
    },

    /// The message has no bytes, or only whitespace.
    #[error("message is empty or contains only whitespace")]
    Empty,

    /// The message is not a single well-formed JSON value (syntax error,
    /// truncated message, trailing data after the object, ...).
    #[error("message is not valid JSON: {0}")]
    NotJson(String),

    /// The message is valid JSON but not an object.
    #[error("message must be a JSON object, found {found}")]
    NotAnObject {
        /// JSON type found: `array`, `string`, `number`, `bool` or `null`.
        found: &'static str,
    },

    /// `@timestamp` is a string but not an RFC 3339 timestamp.
    #[error("`@timestamp` \"{value}\" is not a valid RFC 3339 timestamp: {reason}")]
    BadTimestamp {
        /// The offending value, escaped and truncated to 64 characters.
        value: String,
        /// Why it was rejected.
        reason: String,
    },

    /// `@timestamp` is absent or null and the Kafka message has no timestamp
    /// either, so the event has no time.
    #[error("`@timestamp` is absent or null and the Kafka message has no timestamp")]
    MissingTimestamp,

    /// `@timestamp` is absent or null and the Kafka message timestamp, used
    /// instead, is outside the range of representable dates.
    #[error(
        "`@timestamp` is absent or null and the Kafka message timestamp ({ms} ms) is out of range"
    )]
    KafkaTimestampOutOfRange {
        /// The Kafka message timestamp, in milliseconds since the Unix epoch.
        ms: i64,
    },

    /// A known field has a JSON type its accessor does not accept.
    #[error("field `{field}` must be {expected}, found {found}")]
    WrongType {
        /// Name of the field.
        field: &'static str,
        /// What the field must be.
        expected: &'static str,
        /// JSON type found (`number`, `float`, `bool`, `object`, ...).
        found: &'static str,
    },

    /// An id field is an empty string, which would silently merge every such
    /// event under one key.
    #[error("field `{field}` must not be an empty string")]
    EmptyField {
        /// Name of the field.
        field: &'static str,
    },

    /// A known field appears more than once in the object. Rejected because
    /// "last one wins" would let the two sinks see different values, and
    /// BigQuery's copy of the payload still holds both.
    #[error("field `{field}` appears more than once")]
    DuplicateField {
        /// Name of the field.
        field: String,
    },

    /// A string field contains an escape that does not decode to Unicode
    /// (a lone surrogate such as `"\ud800"`).
    #[error("field `{field}` is not a valid string: {reason}")]
    InvalidString {
        /// Name of the field.
        field: &'static str,
        /// Why decoding failed.
        reason: String,
    },
}

impl EventError {
    /// The field the error is about, if it is about one field.
    pub fn field(&self) -> Option<&str> {
        match self {
            EventError::BadTimestamp { .. }
            | EventError::MissingTimestamp
            | EventError::KafkaTimestampOutOfRange { .. } => Some("@timestamp"),
            EventError::WrongType { field, .. }
            | EventError::EmptyField { field }
            | EventError::InvalidString { field, .. } => Some(field),
            EventError::DuplicateField { field } => Some(field),
            EventError::InvalidUtf8 { .. }
            | EventError::Empty
            | EventError::NotJson(_)
            | EventError::NotAnObject { .. } => None,
        }
    }

    /// Stable snake_case code for metrics labels; never changes once
    /// released, unlike the message.
    pub fn code(&self) -> &'static str {
        match self {
            EventError::InvalidUtf8 { .. } => "invalid_utf8",
            EventError::Empty => "empty",
            EventError::NotJson(_) => "not_json",
            EventError::NotAnObject { .. } => "not_an_object",
            EventError::BadTimestamp { .. } => "bad_timestamp",
            EventError::MissingTimestamp => "missing_timestamp",
            EventError::KafkaTimestampOutOfRange { .. } => "kafka_timestamp_out_of_range",
            EventError::WrongType { .. } => "wrong_type",
            EventError::EmptyField { .. } => "empty_field",
            EventError::DuplicateField { .. } => "duplicate_field",
            EventError::InvalidString { .. } => "invalid_string",
        }
    }
}

/// The known fields, as unparsed slices of the message. Everything else is
/// skipped without allocating.
#[derive(Deserialize)]
struct RawFields<'a> {
    #[serde(rename = "@timestamp", borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow)]
    info: Option<&'a RawValue>,
    #[serde(borrow)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow)]
    keyword: Option<&'a RawValue>,
    #[serde(borrow)]
    movie_id: Option<&'a RawValue>,
    #[serde(borrow)]
    host: Option<&'a RawValue>,
}

/// A JSON string that borrows from the input unless it contains escapes
/// (`Cow<str>` alone always allocates).
#[derive(Deserialize)]
#[serde(transparent)]
struct JsonStr<'a>(#[serde(borrow)] Cow<'a, str>);

/// One log event, borrowing from the Kafka message bytes.
///
/// Only the JSON shape and the event time are validated by [`Event::parse`];
/// each field accessor validates its own field.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    payload: &'a str,
    time: DateTime<Utc>,
    info: Option<&'a RawValue>,
    user_id: Option<&'a RawValue>,
    keyword: Option<&'a RawValue>,
    movie_id: Option<&'a RawValue>,
    host: Option<&'a RawValue>,
}

impl<'a> Event<'a> {
    /// Parses one Kafka message.
    ///
    /// `kafka_timestamp_ms` is the Kafka message timestamp (milliseconds since
    /// the Unix epoch), used as the event time when `@timestamp` is absent or
    /// null.
    ///
    /// # Errors
    ///
    /// Only what no sink could use: not UTF-8, empty, not JSON, not an
    /// object, a known field given twice, or no valid time. Other fields are
    /// checked by their accessors.
    pub fn parse(
        payload: &'a [u8],
        kafka_timestamp_ms: Option<i64>,
    ) -> Result<Event<'a>, EventError> {
        if payload.trim_ascii().is_empty() {
            return Err(EventError::Empty);
        }
        // Checked before serde_json so that a Latin-1 or binary message is
        // reported as an encoding problem, not as a confusing syntax error.
        let text = std::str::from_utf8(payload).map_err(|e| EventError::InvalidUtf8 {
            valid_up_to: e.valid_up_to(),
        })?;

        // A derived struct also accepts a JSON array (as a tuple of fields),
        // so the object check cannot be left to serde.
        let first = text.trim_start_matches([' ', '\t', '\n', '\r']);
        if !first.starts_with('{') {
            return Err(match serde_json::from_str::<IgnoredAny>(text) {
                Ok(_) => EventError::NotAnObject {
                    found: json_type(first),
                },
                Err(e) => not_json(&e),
            });
        }

        let raw: RawFields<'a> =
            serde_json::from_str(text).map_err(|e| match duplicate_field(&e) {
                Some(field) => EventError::DuplicateField { field },
                None => not_json(&e),
            })?;

        Ok(Event {
            payload: text,
            time: event_time(present(raw.timestamp), kafka_timestamp_ms)?,
            info: present(raw.info),
            user_id: present(raw.user_id),
            keyword: present(raw.keyword),
            movie_id: present(raw.movie_id),
            host: present(raw.host),
        })
    }

    /// When the event happened, in UTC: `@timestamp` with its full precision,
    /// or the Kafka timestamp when `@timestamp` is absent or null.
    pub fn time(&self) -> DateTime<Utc> {
        self.time
    }

    /// The whole original JSON text, unknown fields included.
    pub fn payload(&self) -> &'a str {
        self.payload
    }

    /// `info`, the kind of event (`search`, `movie_detail`, `login`, ...).
    /// Must be a string; absent or null gives `None`.
    ///
    /// # Errors
    ///
    /// [`EventError::WrongType`] if it is not a string,
    /// [`EventError::InvalidString`] if an escape does not decode.
    pub fn info(&self) -> Result<Option<Cow<'a, str>>, EventError> {
        self.info.map(|raw| string_field("info", raw)).transpose()
    }

    /// `user_id`: a non-empty string, or a JSON integer returned as its
    /// decimal text. Absent or null gives `None`, an anonymous user.
    ///
    /// # Errors
    ///
    /// [`EventError::EmptyField`] for `""`, [`EventError::WrongType`] for a
    /// float, bool, object, array or an integer outside `i64`/`u64`,
    /// [`EventError::InvalidString`] if an escape does not decode.
    pub fn user_id(&self) -> Result<Option<Cow<'a, str>>, EventError> {
        self.user_id.map(|raw| id_field("user_id", raw)).transpose()
    }

    /// `keyword`, the search text. Must be a string, possibly empty; absent or
    /// null gives `None`. Not normalized: that is the consumer's policy.
    ///
    /// # Errors
    ///
    /// [`EventError::WrongType`] if it is not a string,
    /// [`EventError::InvalidString`] if an escape does not decode.
    pub fn keyword(&self) -> Result<Option<Cow<'a, str>>, EventError> {
        self.keyword
            .map(|raw| string_field("keyword", raw))
            .transpose()
    }

    /// `movie_id`: a non-empty string, or a JSON integer returned as its
    /// decimal text. Absent or null gives `None`.
    ///
    /// # Errors
    ///
    /// As for [`Event::user_id`].
    pub fn movie_id(&self) -> Result<Option<Cow<'a, str>>, EventError> {
        self.movie_id
            .map(|raw| id_field("movie_id", raw))
            .transpose()
    }

    /// `host`, the machine that emitted the log line. Must be a string;
    /// absent or null gives `None`.
    ///
    /// # Errors
    ///
    /// [`EventError::WrongType`] if it is not a string,
    /// [`EventError::InvalidString`] if an escape does not decode.
    pub fn host(&self) -> Result<Option<Cow<'a, str>>, EventError> {
        self.host.map(|raw| string_field("host", raw)).transpose()
    }
}

/// serde_json already maps `null` to `None` for an `Option`, but a `null`
/// slice reaching an accessor would turn "absent" into "wrong type", so this
/// does not depend on that.
fn present(raw: Option<&RawValue>) -> Option<&RawValue> {
    raw.filter(|r| r.get() != "null")
}

fn event_time(
    raw: Option<&RawValue>,
    kafka_timestamp_ms: Option<i64>,
) -> Result<DateTime<Utc>, EventError> {
    let Some(raw) = raw else {
        let ms = kafka_timestamp_ms.ok_or(EventError::MissingTimestamp)?;
        return DateTime::from_timestamp_millis(ms)
            .ok_or(EventError::KafkaTimestampOutOfRange { ms });
    };
    let text = string_field("@timestamp", raw)?;
    DateTime::parse_from_rfc3339(&text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| EventError::BadTimestamp {
            value: quote(&text),
            reason: e.to_string(),
        })
}

fn string_field<'a>(field: &'static str, raw: &'a RawValue) -> Result<Cow<'a, str>, EventError> {
    let text = raw.get();
    if !text.starts_with('"') {
        return Err(EventError::WrongType {
            field,
            expected: EXPECTED_STRING,
            found: json_type(text),
        });
    }
    // The slice is a well-formed JSON string, so the only possible failure is
    // an escape serde_json skipped over but cannot decode (a lone surrogate).
    serde_json::from_str::<JsonStr<'a>>(text)
        .map(|s| s.0)
        .map_err(|e| EventError::InvalidString {
            field,
            reason: message_without_position(&e),
        })
}

fn id_field<'a>(field: &'static str, raw: &'a RawValue) -> Result<Cow<'a, str>, EventError> {
    let text = raw.get();
    let wrong_type = |found| EventError::WrongType {
        field,
        expected: EXPECTED_ID,
        found,
    };
    match text.as_bytes().first() {
        Some(b'"') => {
            let s = string_field(field, raw)?;
            if s.is_empty() {
                Err(EventError::EmptyField { field })
            } else {
                Ok(s)
            }
        }
        Some(b'-' | b'0'..=b'9') => {
            // Decided on the text, not via f64: an id like 2^53 + 1 must not be
            // rounded, and 1.0 is not an id even though it is integral.
            if text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) {
                return Err(wrong_type("float"));
            }
            // Round-tripping through the integer canonicalizes `-0` to `0`.
            text.parse::<i64>()
                .map(|n| n.to_string())
                .or_else(|_| text.parse::<u64>().map(|n| n.to_string()))
                .map(Cow::Owned)
                .map_err(|_| wrong_type("integer out of the 64-bit range"))
        }
        _ => Err(wrong_type(json_type(text))),
    }
}

/// The JSON type of a value, from its first byte. Only meaningful on text
/// serde_json has already accepted as a value.
fn json_type(text: &str) -> &'static str {
    match text.as_bytes().first() {
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b'"') => "string",
        Some(b't' | b'f') => "bool",
        Some(b'n') => "null",
        _ => "number",
    }
}

fn not_json(e: &serde_json::Error) -> EventError {
    EventError::NotJson(truncate_chars(&e.to_string(), MAX_JSON_MESSAGE_CHARS))
}

/// The field named by serde's derive "duplicate field" error. serde offers no
/// structured way to get it, so this reads serde's message, which has kept
/// this wording since 1.0 (a unit test pins it).
fn duplicate_field(e: &serde_json::Error) -> Option<String> {
    if !e.is_data() {
        return None;
    }
    let message = e.to_string();
    let rest = message.strip_prefix("duplicate field `")?;
    let end = rest.find('`')?;
    rest.get(..end).map(str::to_owned)
}

/// serde_json positions are relative to the field's own slice, not to the
/// message, so they would only mislead an operator.
fn message_without_position(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let message = match message.rfind(" at line ") {
        Some(at) => message.get(..at).unwrap_or(&message),
        None => &message,
    };
    truncate_chars(message, MAX_JSON_MESSAGE_CHARS)
}

/// Escapes control characters and quotes (so a value cannot forge log lines)
/// and truncates, so the result is bounded whatever the input.
fn quote(value: &str) -> String {
    let mut escaped = value.escape_debug();
    let mut out: String = escaped.by_ref().take(MAX_QUOTED_CHARS).collect();
    if escaped.next().is_some() {
        out.push('…');
    }
    out
}

fn truncate_chars(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((end, _)) => format!("{}…", s.get(..end).unwrap_or(s)),
        None => s.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const KAFKA_MS: i64 = 1_714_566_896_000; // 2024-05-01T12:34:56Z

    fn parse(json: &str) -> Result<Event<'_>, EventError> {
        Event::parse(json.as_bytes(), Some(KAFKA_MS))
    }

    fn parse_err(json: &str) -> EventError {
        parse(json).unwrap_err()
    }

    fn utc(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn s(v: Option<Cow<'_, str>>) -> Option<String> {
        v.map(Cow::into_owned)
    }

    // ---------------------------------------------------------------- valid

    #[test]
    fn full_logstash_event() {
        let json = r#"{
            "@timestamp": "2024-05-01T12:34:56.789Z",
            "@version": "1",
            "host": "web-03",
            "message": "GET /search?q=matrix 200",
            "info": "search",
            "user_id": "u-42",
            "keyword": "matrix",
            "movie_title": "The Matrix",
            "geo": {"country": "KR", "city": {"name": "Seoul", "lat": 37.56}},
            "tags": ["beats_input", {"x": null}]
        }"#;
        let ev = parse(json).unwrap();
        assert_eq!(ev.time(), utc("2024-05-01T12:34:56.789Z"));
        assert_eq!(ev.time().timestamp_subsec_millis(), 789);
        assert_eq!(ev.payload(), json);
        assert_eq!(s(ev.info().unwrap()).as_deref(), Some("search"));
        assert_eq!(s(ev.user_id().unwrap()).as_deref(), Some("u-42"));
        assert_eq!(s(ev.keyword().unwrap()).as_deref(), Some("matrix"));
        assert_eq!(ev.movie_id().unwrap(), None);
        assert_eq!(s(ev.host().unwrap()).as_deref(), Some("web-03"));
    }

    #[test]
    fn movie_detail_with_integer_ids() {
        let ev = parse(r#"{"@timestamp":"2024-05-01T00:00:00Z","info":"movie_detail","user_id":7,"movie_id":12345}"#)
            .unwrap();
        assert_eq!(ev.user_id().unwrap(), Some(Cow::Owned("7".to_owned())));
        assert_eq!(ev.movie_id().unwrap(), Some(Cow::Owned("12345".to_owned())));
    }

    #[test]
    fn integer_ids_extremes() {
        let json = format!(r#"{{"user_id":{},"movie_id":{}}}"#, u64::MAX, i64::MIN);
        let ev = parse(&json).unwrap();
        assert_eq!(s(ev.user_id().unwrap()), Some(u64::MAX.to_string()));
        assert_eq!(s(ev.movie_id().unwrap()), Some(i64::MIN.to_string()));

        let ev = parse(r#"{"user_id":-5,"movie_id":0}"#).unwrap();
        assert_eq!(s(ev.user_id().unwrap()).as_deref(), Some("-5"));
        assert_eq!(s(ev.movie_id().unwrap()).as_deref(), Some("0"));

        // Above 2^53: must not go through f64.
        let ev = parse(r#"{"movie_id":9007199254740993}"#).unwrap();
        assert_eq!(
            s(ev.movie_id().unwrap()).as_deref(),
            Some("9007199254740993")
        );

        let ev = parse(r#"{"movie_id":-0}"#).unwrap();
        assert_eq!(s(ev.movie_id().unwrap()).as_deref(), Some("0"));
    }

    #[test]
    fn anonymous_user() {
        let absent = parse(r#"{"info":"search","keyword":"x"}"#).unwrap();
        assert_eq!(absent.user_id().unwrap(), None);
        let null = parse(r#"{"info":"search","keyword":"x","user_id":null}"#).unwrap();
        assert_eq!(null.user_id().unwrap(), None);
    }

    #[test]
    fn null_is_absent_for_every_field() {
        let ev =
            parse(r#"{"info":null,"user_id":null,"keyword":null,"movie_id":null,"host":null}"#)
                .unwrap();
        assert_eq!(ev.info().unwrap(), None);
        assert_eq!(ev.user_id().unwrap(), None);
        assert_eq!(ev.keyword().unwrap(), None);
        assert_eq!(ev.movie_id().unwrap(), None);
        assert_eq!(ev.host().unwrap(), None);
        let null = RawValue::from_string("null".into()).unwrap();
        assert!(present(Some(&*null)).is_none());
    }

    #[test]
    fn minimal_object_uses_kafka_time() {
        let ev = parse("{}").unwrap();
        assert_eq!(ev.time(), Utc.timestamp_millis_opt(KAFKA_MS).unwrap());
        assert_eq!(ev.info().unwrap(), None);
        assert_eq!(ev.host().unwrap(), None);
    }

    #[test]
    fn surrounding_whitespace_is_fine() {
        let ev = parse(" \r\n\t{\"info\":\"login\"}\n").unwrap();
        assert_eq!(s(ev.info().unwrap()).as_deref(), Some("login"));
    }

    #[test]
    fn timestamp_offset_is_converted_to_utc() {
        let ev = parse(r#"{"@timestamp":"2024-05-01T21:34:56.789+09:00"}"#).unwrap();
        assert_eq!(
            ev.time(),
            Utc.with_ymd_and_hms(2024, 5, 1, 12, 34, 56).unwrap()
                + chrono::Duration::milliseconds(789)
        );
    }

    #[test]
    fn timestamp_keeps_sub_millisecond_precision() {
        let ev = parse(r#"{"@timestamp":"2024-05-01T12:34:56.123456789Z"}"#).unwrap();
        assert_eq!(ev.time().timestamp_subsec_nanos(), 123_456_789);
    }

    #[test]
    fn timestamp_wins_over_kafka_timestamp() {
        let ev = Event::parse(br#"{"@timestamp":"2020-01-01T00:00:00Z"}"#, Some(KAFKA_MS)).unwrap();
        assert_eq!(ev.time(), utc("2020-01-01T00:00:00Z"));
        let ev = Event::parse(br#"{"@timestamp":"2020-01-01T00:00:00Z"}"#, None).unwrap();
        assert_eq!(ev.time(), utc("2020-01-01T00:00:00Z"));
    }

    #[test]
    fn absent_or_null_timestamp_uses_kafka_timestamp() {
        let absent = Event::parse(br#"{"info":"login"}"#, Some(KAFKA_MS + 7)).unwrap();
        assert_eq!(absent.time().timestamp_millis(), KAFKA_MS + 7);
        let null = Event::parse(br#"{"@timestamp":null}"#, Some(KAFKA_MS)).unwrap();
        assert_eq!(null.time().timestamp_millis(), KAFKA_MS);
    }

    #[test]
    fn korean_keyword_with_escapes_is_decoded() {
        let ev = parse(r#"{"info":"search","keyword":"\uac80\uc0c9 \"\ud83c\udfac\""}"#).unwrap();
        let kw = ev.keyword().unwrap().unwrap();
        assert_eq!(kw, "검색 \"🎬\"");
        assert!(matches!(kw, Cow::Owned(_)));
    }

    #[test]
    fn plain_strings_are_borrowed() {
        let ev = parse(r#"{"info":"search","keyword":"범죄도시","user_id":"u-1","host":"web"}"#)
            .unwrap();
        for value in [ev.info(), ev.keyword(), ev.user_id(), ev.host()] {
            assert!(matches!(value.unwrap(), Some(Cow::Borrowed(_))));
        }
        assert_eq!(ev.keyword().unwrap().unwrap(), "범죄도시");
    }

    #[test]
    fn field_values_outlive_the_event() {
        let json = String::from(r#"{"keyword":"matrix"}"#);
        let keyword = {
            let ev = parse(&json).unwrap();
            ev.keyword().unwrap()
        };
        assert_eq!(keyword.as_deref(), Some("matrix"));
    }

    #[test]
    fn empty_keyword_is_allowed() {
        let ev = parse(r#"{"info":"search","keyword":""}"#).unwrap();
        assert_eq!(s(ev.keyword().unwrap()).as_deref(), Some(""));
    }

    #[test]
    fn one_bad_field_does_not_spoil_the_others() {
        let ev = parse(r#"{"info":"movie_detail","movie_id":1.5,"user_id":"u-1","keyword":[1]}"#)
            .unwrap();
        assert!(ev.movie_id().is_err());
        assert!(ev.keyword().is_err());
        assert_eq!(s(ev.info().unwrap()).as_deref(), Some("movie_detail"));
        assert_eq!(s(ev.user_id().unwrap()).as_deref(), Some("u-1"));
    }

    #[test]
    fn duplicate_unknown_fields_are_ignored() {
        let ev = parse(r#"{"message":"a","message":"b","info":"login"}"#).unwrap();
        assert_eq!(s(ev.info().unwrap()).as_deref(), Some("login"));
    }

    // -------------------------------------------------------------- invalid

    #[test]
    fn not_json() {
        let err = parse_err("hello world");
        assert!(
            matches!(&err, EventError::NotJson(m) if m.contains("line 1 column")),
            "{err}"
        );
        assert_eq!(err.code(), "not_json");
        assert_eq!(err.field(), None);
    }

    #[test]
    fn truncated_object_is_not_json() {
        assert!(matches!(
            parse_err(r#"{"info":"search","keyword":"#),
            EventError::NotJson(_)
        ));
        assert!(matches!(parse_err("[1,"), EventError::NotJson(_)));
    }

    #[test]
    fn empty_message() {
        assert_eq!(
            Event::parse(b"", Some(KAFKA_MS)).unwrap_err(),
            EventError::Empty
        );
        assert_eq!(EventError::Empty.code(), "empty");
    }

    #[test]
    fn whitespace_only_message() {
        assert_eq!(parse_err(" \n\t\r "), EventError::Empty);
    }

    #[test]
    fn invalid_utf8() {
        let bytes = b"{\"keyword\":\"caf\xe9\"}";
        let err = Event::parse(bytes, Some(KAFKA_MS)).unwrap_err();
        assert_eq!(err, EventError::InvalidUtf8 { valid_up_to: 15 });
        assert_eq!(err.code(), "invalid_utf8");
        assert!(err.to_string().contains("UTF-8"));
    }

    #[test]
    fn json_array() {
        assert_eq!(
            parse_err(r#"[{"info":"search"}]"#),
            EventError::NotAnObject { found: "array" }
        );
        // Would deserialize into the derived struct as a tuple.
        assert_eq!(
            parse_err("[null,null,null,null,null,null]"),
            EventError::NotAnObject { found: "array" }
        );
    }

    #[test]
    fn json_string() {
        let err = parse_err(r#""{\"info\":\"search\"}""#);
        assert_eq!(err, EventError::NotAnObject { found: "string" });
        assert_eq!(err.code(), "not_an_object");
    }

    #[test]
    fn json_null() {
        assert_eq!(parse_err("null"), EventError::NotAnObject { found: "null" });
    }

    #[test]
    fn json_number_and_bool() {
        assert_eq!(
            parse_err(" -12.5 "),
            EventError::NotAnObject { found: "number" }
        );
        assert_eq!(parse_err("true"), EventError::NotAnObject { found: "bool" });
    }

    #[test]
    fn bad_timestamp_string() {
        let err = parse_err(r#"{"@timestamp":"yesterday"}"#);
        assert!(
            matches!(&err, EventError::BadTimestamp { value, .. } if value == "yesterday"),
            "{err}"
        );
        assert_eq!(err.code(), "bad_timestamp");
        assert_eq!(err.field(), Some("@timestamp"));

        // Date only, no offset, and an empty string are not RFC 3339 either.
        for ts in ["2024-05-01", "2024-05-01T12:34:56", ""] {
            let json = format!(r#"{{"@timestamp":"{ts}"}}"#);
            assert!(
                matches!(parse_err(&json), EventError::BadTimestamp { .. }),
                "{ts}"
            );
        }
    }

    #[test]
    fn timestamp_as_number() {
        let err = parse_err(r#"{"@timestamp":1714566896000}"#);
        assert_eq!(
            err,
            EventError::WrongType {
                field: "@timestamp",
                expected: EXPECTED_STRING,
                found: "number"
            }
        );
        assert_eq!(err.field(), Some("@timestamp"));
    }

    #[test]
    fn missing_timestamp_without_kafka_timestamp() {
        let err = Event::parse(br#"{"info":"login"}"#, None).unwrap_err();
        assert_eq!(err, EventError::MissingTimestamp);
        assert_eq!(err.code(), "missing_timestamp");
        let err = Event::parse(br#"{"@timestamp":null}"#, None).unwrap_err();
        assert_eq!(err, EventError::MissingTimestamp);
    }

    #[test]
    fn kafka_timestamp_out_of_range() {
        let err = Event::parse(b"{}", Some(i64::MAX)).unwrap_err();
        assert_eq!(err, EventError::KafkaTimestampOutOfRange { ms: i64::MAX });
        assert_eq!(err.field(), Some("@timestamp"));
    }

    #[test]
    fn user_id_empty_string() {
        let err = parse(r#"{"user_id":""}"#).unwrap().user_id().unwrap_err();
        assert_eq!(err, EventError::EmptyField { field: "user_id" });
        assert_eq!(err.code(), "empty_field");
        assert_eq!(err.field(), Some("user_id"));
    }

    fn user_id_type_error(value: &str) -> EventError {
        let json = format!(r#"{{"user_id":{value}}}"#);
        parse(&json).unwrap().user_id().unwrap_err()
    }

    fn id_wrong_type(field: &'static str, found: &'static str) -> EventError {
        EventError::WrongType {
            field,
            expected: EXPECTED_ID,
            found,
        }
    }

    #[test]
    fn user_id_float() {
        assert_eq!(
            user_id_type_error("12.5"),
            id_wrong_type("user_id", "float")
        );
        assert_eq!(
            user_id_type_error("12.0"),
            id_wrong_type("user_id", "float")
        );
        assert_eq!(user_id_type_error("1e3"), id_wrong_type("user_id", "float"));
    }

    #[test]
    fn user_id_bool() {
        let err = user_id_type_error("true");
        assert_eq!(err, id_wrong_type("user_id", "bool"));
        assert_eq!(err.code(), "wrong_type");
        assert_eq!(err.field(), Some("user_id"));
    }

    #[test]
    fn user_id_object_and_array() {
        assert_eq!(
            user_id_type_error(r#"{"id":1}"#),
            id_wrong_type("user_id", "object")
        );
        assert_eq!(user_id_type_error("[1]"), id_wrong_type("user_id", "array"));
    }

    #[test]
    fn user_id_integer_out_of_range() {
        assert_eq!(
            user_id_type_error("18446744073709551616"),
            id_wrong_type("user_id", "integer out of the 64-bit range")
        );
    }

    #[test]
    fn movie_id_empty_string() {
        let err = parse(r#"{"info":"movie_detail","movie_id":""}"#)
            .unwrap()
            .movie_id()
            .unwrap_err();
        assert_eq!(err, EventError::EmptyField { field: "movie_id" });
    }

    #[test]
    fn info_as_number() {
        let err = parse(r#"{"info":3}"#).unwrap().info().unwrap_err();
        assert_eq!(
            err,
            EventError::WrongType {
                field: "info",
                expected: EXPECTED_STRING,
                found: "number"
            }
        );
        assert_eq!(
            err.to_string(),
            "field `info` must be a string, found number"
        );
    }

    #[test]
    fn keyword_as_array() {
        let err = parse(r#"{"keyword":["matrix"]}"#)
            .unwrap()
            .keyword()
            .unwrap_err();
        assert_eq!(
            err,
            EventError::WrongType {
                field: "keyword",
                expected: EXPECTED_STRING,
                found: "array"
            }
        );
    }

    #[test]
    fn host_as_object() {
        let err = parse(r#"{"host":{"name":"web-03"}}"#)
            .unwrap()
            .host()
            .unwrap_err();
        assert_eq!(err.field(), Some("host"));
        assert!(matches!(
            err,
            EventError::WrongType {
                found: "object",
                ..
            }
        ));
    }

    #[test]
    fn trailing_garbage_after_object() {
        let err = parse_err(r#"{"info":"login"} x"#);
        assert!(
            matches!(&err, EventError::NotJson(m) if m.contains("trailing")),
            "{err}"
        );
        assert!(matches!(
            parse_err(r#"{"info":"login"}{"info":"login"}"#),
            EventError::NotJson(_)
        ));
    }

    #[test]
    fn duplicate_known_field() {
        let err = parse_err(r#"{"info":"search","keyword":"a","keyword":"b"}"#);
        assert_eq!(
            err,
            EventError::DuplicateField {
                field: "keyword".to_owned()
            }
        );
        assert_eq!(err.field(), Some("keyword"));
        assert_eq!(err.code(), "duplicate_field");

        // A null first occurrence still counts: which one would win is the
        // ambiguity being rejected.
        let err = parse_err(r#"{"@timestamp":null,"@timestamp":"2024-05-01T00:00:00Z"}"#);
        assert_eq!(
            err,
            EventError::DuplicateField {
                field: "@timestamp".to_owned()
            }
        );
    }

    #[test]
    fn lone_surrogate_in_string_field() {
        // serde_json does not decode escapes while building the RawValue, so
        // the event stays usable for the sinks that do not need this field.
        let ev = parse(r#"{"info":"search","keyword":"\ud800"}"#).unwrap();
        assert_eq!(s(ev.info().unwrap()).as_deref(), Some("search"));
        let err = ev.keyword().unwrap_err();
        assert!(
            matches!(
                err,
                EventError::InvalidString {
                    field: "keyword",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.to_string().contains(" at line "), "{err}");
    }

    #[test]
    fn error_messages_for_huge_values_are_bounded() {
        let huge = "9".repeat(300_000);
        let errors = [
            parse_err(&format!(r#"{{"@timestamp":"{huge}"}}"#)),
            parse_err(&format!(r#"{{"@timestamp":"{}"}}"#, "\\n".repeat(100_000))),
            parse_err(&format!(r#"{{"keyword":"{huge}"#)),
            parse_err(&format!(r#"{{"keyword":"{huge}"}} {huge}"#)),
            parse(&format!(r#"{{"keyword":[{huge}]}}"#))
                .unwrap()
                .keyword()
                .unwrap_err(),
            parse(&format!(r#"{{"user_id":{huge}}}"#))
                .unwrap()
                .user_id()
                .unwrap_err(),
            parse(&format!(r#"{{"user_id":{huge}.5}}"#))
                .unwrap()
                .user_id()
                .unwrap_err(),
            Event::parse(&vec![b'{'; 300_000], None).unwrap_err(),
        ];
        for err in errors {
            let message = err.to_string();
            assert!(
                message.chars().count() < 300,
                "{} chars: {}",
                message.len(),
                message
            );
        }
    }

    #[test]
    fn timestamp_value_is_escaped_in_message() {
        let err = parse_err(r#"{"@timestamp":"a\nb\"c"}"#);
        assert!(err.to_string().contains(r#""a\nb\"c""#), "{err}");
    }

    #[test]
    fn codes_are_stable_snake_case() {
        let all = [
            EventError::InvalidUtf8 { valid_up_to: 0 },
            EventError::Empty,
            EventError::NotJson(String::new()),
            EventError::NotAnObject { found: "array" },
            EventError::BadTimestamp {
                value: String::new(),
                reason: String::new(),
            },
            EventError::MissingTimestamp,
            EventError::KafkaTimestampOutOfRange { ms: 0 },
            id_wrong_type("user_id", "bool"),
            EventError::EmptyField { field: "user_id" },
            EventError::DuplicateField {
                field: "info".into(),
            },
            EventError::InvalidString {
                field: "info",
                reason: String::new(),
            },
        ];
        let codes: Vec<_> = all.iter().map(EventError::code).collect();
        assert_eq!(
            codes,
            [
                "invalid_utf8",
                "empty",
                "not_json",
                "not_an_object",
                "bad_timestamp",
                "missing_timestamp",
                "kafka_timestamp_out_of_range",
                "wrong_type",
                "empty_field",
                "duplicate_field",
                "invalid_string"
            ]
        );
    }
}

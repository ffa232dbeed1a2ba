//! What one user3 event does: a search or a movie view, decoded and
//! normalized, or the reason it can never be applied (→ dead-letter topic).

use std::borrow::Cow;

use sink_core::{Event, Record, Rejection};
use unicode_normalization::{is_nfkc_quick, IsNormalized, UnicodeNormalization};

/// The two rankings (and histories) this service keeps.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `info` = `search`: member is the normalized keyword.
    Search,
    /// `info` = `movie_detail`: member is the movie id.
    Movie,
}

impl Kind {
    /// What a member of this kind is, for table headers.
    pub fn member_label(self) -> &'static str {
        match self {
            Self::Search => "keyword",
            Self::Movie => "movie",
        }
    }

    /// The word used in key names.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Search => "search",
            Self::Movie => "movie",
        }
    }
}

/// A decoded user3 event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// Which ranking it counts in.
    pub kind: Kind,
    /// The normalized keyword or the movie id.
    pub member: String,
    /// The user, or `None` for an anonymous visitor (ranked, no history).
    pub user: Option<String>,
    /// Event time, whole milliseconds since the epoch.
    pub time_ms: i64,
}

/// Decoding limits: what input from the internet may make of Redis.
#[derive(Debug, Clone, Copy)]
pub struct DecodeRules {
    /// Longest keyword kept, in characters after normalization.
    pub max_keyword_chars: usize,
    /// Longest user id or movie id kept, in characters: each becomes a key
    /// or a member of an all-time ranking.
    pub max_id_chars: usize,
    /// How far an event's time may lie ahead of its Kafka timestamp, in
    /// ms: a history is ordered by time, so a time far ahead would pin an
    /// item at its top for good.
    pub max_future_skew_ms: i64,
}

/// Raw keywords longer than this many characters per character kept are
/// refused before normalization: NFKC's work grows with its input, and
/// whitespace runs are all that shrink a keyword much.
const RAW_KEYWORD_CHARS_PER_KEPT: usize = 16;

/// Decodes one record. Every `Err` sends it to the dead-letter topic for
/// good: replaying it could not make it valid, except a time ahead of the
/// clock, which is judged once, when the record is read.
pub fn decode(record: &Record, rules: DecodeRules) -> Result<Action, Rejection> {
    let event = Event::parse(&record.payload, record.timestamp_ms).map_err(reject)?;
    let (kind, member) = match event.info().map_err(reject)?.as_deref() {
        Some("search") => {
            let raw = event
                .keyword()
                .map_err(reject)?
                .ok_or_else(|| Rejection::new("missing_field", "search event without a keyword"))?;
            (
                Kind::Search,
                normalize_keyword(&raw, rules.max_keyword_chars)?,
            )
        }
        Some("movie_detail") => {
            let id = event.movie_id().map_err(reject)?.ok_or_else(|| {
                Rejection::new("missing_field", "movie_detail event without a movie_id")
            })?;
            (
                Kind::Movie,
                checked_id("movie_id", id.into_owned(), rules.max_id_chars)?,
            )
        }
        Some(other) => {
            return Err(Rejection::new(
                "off_topic",
                format!(
                    "info is {:?}: only search and movie_detail events belong on this topic",
                    truncate(other, 64)
                ),
            ))
        }
        None => return Err(Rejection::new("missing_field", "event without info")),
    };
    let user = event
        .user_id()
        .map_err(reject)?
        .map(|u| checked_id("user_id", u.into_owned(), rules.max_id_chars))
        .transpose()?;
    let time_ms = event.time().timestamp_millis();
    check_not_ahead(time_ms, record.timestamp_ms, rules.max_future_skew_ms)?;
    Ok(Action {
        kind,
        member,
        user,
        time_ms,
    })
}

/// Refuses an event time more than `max_skew_ms` ahead of both the
/// record's Kafka timestamp and this service's clock. Against the Kafka
/// timestamp first, without reading the clock (nearly every event passes
/// there); against the clock as well, so that a Logstash or broker clock
/// running behind the web servers does not refuse every live event, and a
/// record without a Kafka timestamp is still checked.
fn check_not_ahead(time_ms: i64, kafka_ms: Option<i64>, max_skew_ms: i64) -> Result<(), Rejection> {
    if kafka_ms.is_some_and(|k| time_ms <= k.saturating_add(max_skew_ms)) {
        return Ok(());
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    let reference = kafka_ms.map_or(now_ms, |k| k.max(now_ms));
    if time_ms <= reference.saturating_add(max_skew_ms) {
        return Ok(());
    }
    Err(Rejection::new(
        "time_in_future",
        format!(
            "@timestamp is {} s ahead of the record's Kafka timestamp and of this service's \
             clock, more than --max-future-skew-secs {}: the sender's clock is wrong",
            time_ms.saturating_sub(reference) / 1000,
            max_skew_ms / 1000
        ),
    ))
}

/// An id that may become a key or a ranking member: no control characters,
/// not longer than `max_chars` characters.
fn checked_id(field: &str, id: String, max_chars: usize) -> Result<String, Rejection> {
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return Err(Rejection::new(
            "id_control_character",
            format!("{field} holds the control character {c:?}"),
        ));
    }
    let chars = id.chars().count();
    if chars > max_chars {
        return Err(Rejection::new(
            "id_too_long",
            format!(
                "{field} has {chars} characters, more than --max-id-chars {max_chars}: {}…",
                truncate(&id, 40)
            ),
        ));
    }
    Ok(id)
}

fn reject(err: sink_core::EventError) -> Rejection {
    Rejection::new(err.code(), err.to_string())
}

/// Keywords that differ only in case, width or spacing rank together:
/// Unicode NFKC (full-width `ｉｐｈｏｎｅ` → `iphone`), trimmed, runs of
/// whitespace collapsed to one space, lowercased.
pub fn normalize_keyword(raw: &str, max_chars: usize) -> Result<String, Rejection> {
    let raw_limit = max_chars.saturating_mul(RAW_KEYWORD_CHARS_PER_KEPT);
    // Bytes first: no character count for the keywords that cannot be over.
    if raw.len() > raw_limit {
        let raw_chars = raw.chars().count();
        if raw_chars > raw_limit {
            return Err(Rejection::new(
                "keyword_too_long",
                format!(
                    "keyword has {raw_chars} characters before normalization, more than \
                     {RAW_KEYWORD_CHARS_PER_KEPT} times --max-keyword-chars {max_chars}: {}…",
                    truncate(raw, 40)
                ),
            ));
        }
    }
    // Most keywords are NFKC already: the quick check spares them a copy.
    let nfkc: Cow<'_, str> = match is_nfkc_quick(raw.chars()) {
        IsNormalized::Yes => Cow::Borrowed(raw),
        IsNormalized::No | IsNormalized::Maybe => Cow::Owned(raw.nfkc().collect()),
    };
    let mut out = String::with_capacity(nfkc.len());
    for word in nfkc.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    if let Some(c) = out.chars().find(|c| c.is_control()) {
        return Err(Rejection::new(
            "keyword_control_character",
            format!("keyword holds the control character {c:?}"),
        ));
    }
    if out.is_empty() {
        return Err(Rejection::new(
            "empty_keyword",
            "keyword is empty after normalization",
        ));
    }
    let chars = out.chars().count();
    if chars > max_chars {
        return Err(Rejection::new(
            "keyword_too_long",
            format!("keyword has {chars} characters after normalization, more than --max-keyword-chars {max_chars}: {}…", truncate(&out, 40)),
        ));
    }
    Ok(out)
}

fn truncate(s: &str, chars: usize) -> &str {
    s.char_indices().nth(chars).map_or(s, |(i, _)| &s[..i])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const RULES: DecodeRules = DecodeRules {
        max_keyword_chars: 200,
        max_id_chars: 128,
        max_future_skew_ms: 600_000,
    };

    fn record(json: &str) -> Record {
        Record {
            topic: "user3".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: Some(1_700_000_000_000),
            key: None,
            payload: json.as_bytes().to_vec(),
            headers: None,
        }
    }

    #[test]
    fn keywords_differing_in_case_width_and_spacing_collide() {
        for raw in [
            "iPhone 15",
            "  IPHONE   15 ",
            "ｉＰｈｏｎｅ　１５",
            "iphone\t15\n",
        ] {
            assert_eq!(normalize_keyword(raw, 200).unwrap(), "iphone 15", "{raw:?}");
        }
        assert_eq!(normalize_keyword("  기생충  ", 200).unwrap(), "기생충");
        // Compatibility jamo and half-width katakana are folded by NFKC too.
        assert_eq!(normalize_keyword("ｶﾀｶﾅ", 200).unwrap(), "カタカナ");
    }

    #[test]
    fn empty_and_overlong_keywords_are_rejected() {
        assert_eq!(
            normalize_keyword(" \u{3000}\t", 200).unwrap_err().code,
            "empty_keyword"
        );
        assert!(normalize_keyword(&"가".repeat(200), 200).is_ok());
        let err = normalize_keyword(&"가".repeat(201), 200).unwrap_err();
        assert_eq!(err.code, "keyword_too_long");
        assert!(err.reason.len() < 300);
    }

    #[test]
    fn decodes_search_and_movie_detail() {
        let search = decode(
            &record(r#"{"@timestamp":"2023-11-14T22:13:19.123456Z","info":"search","user_id":42,"keyword":" Parasite "}"#),
            RULES,
        )
        .unwrap();
        assert_eq!(
            search,
            Action {
                kind: Kind::Search,
                member: "parasite".into(),
                user: Some("42".into()),
                time_ms: 1_699_999_999_123
            }
        );
        let movie = decode(
            &record(r#"{"info":"movie_detail","movie_id":"tt01"}"#),
            RULES,
        )
        .unwrap();
        assert_eq!(movie.kind, Kind::Movie);
        assert_eq!(movie.member, "tt01");
        assert_eq!(movie.user, None, "anonymous");
        assert_eq!(
            movie.time_ms, 1_700_000_000_000,
            "Kafka timestamp when @timestamp is absent"
        );
    }

    #[test]
    fn hostile_ids_and_times_are_refused() {
        let long = "m".repeat(129);
        let cases = [
            (
                format!(r#"{{"info":"movie_detail","movie_id":"{long}"}}"#),
                "id_too_long",
            ),
            (
                format!(r#"{{"info":"search","keyword":"x","user_id":"{long}"}}"#),
                "id_too_long",
            ),
            (
                r#"{"info":"search","keyword":"x","user_id":"u\r\nx"}"#.to_owned(),
                "id_control_character",
            ),
            (
                r#"{"info":"movie_detail","movie_id":"tt\u0000"}"#.to_owned(),
                "id_control_character",
            ),
            // Ahead of the Kafka timestamp (2023) and of the clock.
            (
                r#"{"@timestamp":"2100-01-01T00:00:00Z","info":"search","keyword":"x"}"#.to_owned(),
                "time_in_future",
            ),
            (
                r#"{"info":"search","keyword":"a\u001b[2Jb"}"#.to_owned(),
                "keyword_control_character",
            ),
            (
                format!(
                    r#"{{"info":"search","keyword":"{}x"}}"#,
                    " ".repeat(200 * 16)
                ),
                "keyword_too_long",
            ),
        ];
        for (json, code) in cases {
            assert_eq!(
                decode(&record(&json), RULES).unwrap_err().code,
                code,
                "{json}"
            );
        }
        // At the limits: kept.
        let ok = [
            format!(
                r#"{{"info":"movie_detail","movie_id":"{}","user_id":"한국어"}}"#,
                "m".repeat(128)
            ),
            r#"{"@timestamp":"2023-11-14T22:23:20Z","info":"search","keyword":"x"}"#.to_owned(),
            // Far ahead of its Kafka timestamp, not of the clock: the
            // producer's clock was behind.
            format!(
                r#"{{"@timestamp":"{}","info":"search","keyword":"x"}}"#,
                chrono::Utc::now().to_rfc3339()
            ),
            format!(
                r#"{{"info":"search","keyword":"{}x"}}"#,
                " ".repeat(200 * 16 - 1)
            ),
        ];
        for json in ok {
            assert!(decode(&record(&json), RULES).is_ok(), "{json}");
        }
    }

    #[test]
    fn rejections_say_why() {
        let cases = [
            (r#"{"info":"login","user_id":"u"}"#, "off_topic"),
            (r#"{"info":"search","user_id":"u"}"#, "missing_field"),
            (r#"{"info":"search","keyword":"   "}"#, "empty_keyword"),
            (r#"{"info":"movie_detail","movie_id":""}"#, "empty_field"),
            (r#"{"info":"movie_detail"}"#, "missing_field"),
            (
                r#"{"info":"search","keyword":"x","user_id":true}"#,
                "wrong_type",
            ),
            (r#"{"user_id":"u"}"#, "missing_field"),
            (r#"[1,2]"#, "not_an_object"),
            ("not json", "not_json"),
        ];
        for (json, code) in cases {
            assert_eq!(
                decode(&record(json), RULES).unwrap_err().code,
                code,
                "{json}"
            );
        }
    }
}

/// For any input: decode never panics, and yields either an action Redis
/// may hold (bounded, no control characters) or a reason.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    const RULES: DecodeRules = DecodeRules {
        max_keyword_chars: 20,
        max_id_chars: 16,
        max_future_skew_ms: 600_000,
    };

    fn record(payload: Vec<u8>, timestamp_ms: Option<i64>) -> Record {
        Record {
            topic: "user3".into(),
            partition: 0,
            offset: 0,
            timestamp_ms,
            key: None,
            payload,
            headers: None,
        }
    }

    fn holds(action: &Action) -> Result<(), TestCaseError> {
        let limit = match action.kind {
            Kind::Search => RULES.max_keyword_chars,
            Kind::Movie => RULES.max_id_chars,
        };
        prop_assert!(!action.member.is_empty());
        prop_assert!(action.member.chars().count() <= limit);
        prop_assert!(!action.member.chars().any(char::is_control));
        if let Some(user) = &action.user {
            prop_assert!(user.chars().count() <= RULES.max_id_chars);
            prop_assert!(!user.chars().any(char::is_control));
        }
        Ok(())
    }

    /// A JSON object with the fields decode reads, each any string, number
    /// or absent.
    fn event() -> impl Strategy<Value = Vec<u8>> {
        let text = prop_oneof![
            any::<String>().prop_map(serde_json::Value::from),
            "[ a-zA-Z\u{3000}ｉ기\t\r\n\u{1b}]{0,30}".prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
        ];
        (
            prop_oneof![Just("search"), Just("movie_detail"), Just("login")],
            proptest::option::of(text.clone()),
            proptest::option::of(text.clone()),
            proptest::option::of(text),
            // Event times from two hours back to 20 minutes ahead.
            proptest::option::of(-7_200_000i64..1_200_000),
        )
            .prop_map(|(info, keyword, movie_id, user_id, time)| {
                let mut event = serde_json::json!({ "info": info });
                for (field, value) in [
                    ("keyword", keyword),
                    ("movie_id", movie_id),
                    ("user_id", user_id),
                ] {
                    if let Some(value) = value {
                        event[field] = value;
                    }
                }
                let now_ms = chrono::Utc::now().timestamp_millis();
                if let Some(ms) =
                    time.and_then(|ahead| chrono::DateTime::from_timestamp_millis(now_ms + ahead))
                {
                    event["@timestamp"] = ms.to_rfc3339().into();
                }
                event.to_string().into_bytes()
            })
    }

    proptest! {
        #[test]
        fn any_bytes_decode_to_an_action_or_a_reason(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            timestamp_ms in proptest::option::of(any::<i64>()),
        ) {
            match decode(&record(bytes, timestamp_ms), RULES) {
                Ok(action) => holds(&action)?,
                Err(why) => prop_assert!(!why.code.is_empty() && !why.reason.is_empty()),
            }
        }

        #[test]
        fn any_event_decodes_to_an_action_or_a_reason(
            payload in event(),
            kafka_now in any::<bool>(),
        ) {
            let timestamp_ms = kafka_now.then(|| chrono::Utc::now().timestamp_millis());
            match decode(&record(payload, timestamp_ms), RULES) {
                Ok(action) => holds(&action)?,
                Err(why) => prop_assert!(!why.code.is_empty() && !why.reason.is_empty()),
            }
        }

        #[test]
        fn normalizing_twice_changes_nothing(raw in any::<String>()) {
            if let Ok(once) = normalize_keyword(&raw, 200) {
                prop_assert_eq!(normalize_keyword(&once, 200).ok(), Some(once));
            }
        }
    }
}

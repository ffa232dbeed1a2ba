//! Realistic movie-service log events, reproducible from a seed.
//!
//! Shaped like what Logstash ships: `@timestamp`, `info`, `user_id`, `host`,
//! `message`, and per kind `keyword` / `movie_id`. Popularity is skewed
//! (a few keywords and movies dominate, as in real traffic); keywords come in
//! Korean and English and are written with random case, full-width and
//! spacing variants, so normalization matters. A share of lines is
//! malformed. Every generated event carries the ground truth of what it
//! means, so tests build their expected state without using the code under
//! test.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Canonical (already normalized) keywords, most popular first.
pub const KEYWORDS: &[&str] = &[
    "기생충",
    "parasite",
    "오징어 게임",
    "squid game",
    "어벤져스",
    "avengers endgame",
    "범죄도시",
    "the batman",
    "인터스텔라",
    "interstellar",
    "타이타닉",
    "titanic",
    "부산행",
    "train to busan",
    "올드보이",
    "oldboy",
    "헤어질 결심",
    "decision to leave",
    "미나리",
    "minari",
    "아이언맨",
    "iron man 3",
    "조커",
    "joker",
    "라라랜드",
    "la la land",
    "극한직업",
    "extreme job",
    "명량",
    "the admiral",
    "해리 포터",
    "harry potter",
    "반지의 제왕",
    "lord of the rings",
    "스파이더맨",
    "spider-man",
    "겨울왕국",
    "frozen 2",
    "토이 스토리",
    "toy story",
];

/// How far before `now` a generator's event times go unless
/// [`Generator::spread`] says otherwise: two hours.
pub const DEFAULT_SPREAD_MS: i64 = 7_200_000;

/// How much earlier than its place in the stream an event's time may be
/// ([`Generator::in_time_order`]).
pub const ARRIVAL_JITTER_MS: i64 = 1_000;

/// Event kinds besides search / movie_detail, as they appear on user2.
pub const OTHER_KINDS: &[&str] = &["login", "logout", "play", "pause", "rate", "signup"];

/// What a valid search / movie_detail event must do in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truth {
    /// `search` or `movie_detail`.
    pub info: &'static str,
    /// Canonical keyword or movie id.
    pub member: String,
    /// User, `None` when anonymous.
    pub user: Option<String>,
    /// Event time in ms.
    pub time_ms: i64,
}

/// One generated event.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The `info` written (or `"malformed"`).
    pub info: &'static str,
    /// The bytes Logstash would send.
    pub payload: Vec<u8>,
    /// Ground truth for search / movie_detail events that are valid.
    pub truth: Option<Truth>,
    /// False for malformed lines (a sink must dead-letter them).
    pub valid: bool,
}

/// Which kinds to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// Only search and movie_detail (what Logstash routes to user3).
    User3,
    /// Every kind (what user2 receives).
    All,
}

/// The generator.
#[derive(Debug)]
pub struct Generator {
    rng: StdRng,
    mix: Mix,
    bad_fraction: f64,
    users: u32,
    movies: u32,
    now_ms: i64,
    /// Event times are spread over this long before `now_ms`.
    spread_ms: i64,
    /// Set by [`Generator::in_time_order`]: how many events the spread
    /// holds, in time order.
    in_order: Option<u64>,
    seq: u64,
    /// Set by [`Generator::production`].
    production: Option<Production>,
}

/// What [`Generator::production`] changes.
#[derive(Debug)]
struct Production {
    /// Cumulative Zipf weights over the distinct keywords.
    keywords: Vec<f64>,
    /// Cumulative Zipf weights over the movies.
    movies: Vec<f64>,
}

/// Cumulative weights of a Zipf distribution (exponent 1) over `n` ranks.
fn zipf(n: usize) -> Vec<f64> {
    (1..=n)
        .scan(0.0, |sum, rank| {
            *sum += 1.0 / rank as f64;
            Some(*sum)
        })
        .collect()
}

impl Generator {
    /// A generator with the given seed; times are spread over the two hours
    /// before `now_ms`.
    pub fn new(seed: u64, mix: Mix, now_ms: i64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            mix,
            bad_fraction: 0.0,
            users: 2_000,
            movies: 500,
            now_ms,
            spread_ms: DEFAULT_SPREAD_MS,
            in_order: None,
            seq: 0,
            production: None,
        }
    }

    /// Traffic shaped like a real service's, as the benchmark's production
    /// input: 20,000 users; keywords (50,000 distinct, the canonical list
    /// first) and movies (10,000) drawn by Zipf popularity, so the top
    /// terms dominate over a long tail; the fields a web server's JSON log
    /// carries besides ours (client, request, status, user agent: about
    /// 600 bytes an event); malformed lines only as Logstash routes them
    /// (user3 gets readable objects with a wrong field; user2 everything,
    /// 1 in 20 of its malformed lines a 900 KiB line Filebeat cut).
    pub fn production(mut self) -> Self {
        self.users = 20_000;
        self.movies = 10_000;
        self.production = Some(Production {
            keywords: zipf(50_000),
            movies: zipf(self.movies as usize),
        });
        self
    }

    /// Share of malformed lines, 0.0..=1.0.
    pub fn bad_fraction(mut self, fraction: f64) -> Self {
        self.bad_fraction = fraction.clamp(0.0, 1.0);
        self
    }

    /// Event times spread over `ms` before `now_ms` instead of two hours
    /// (what a stream that arrives as it happens looks like: one minute
    /// for 300,000 events at 5,000 a second).
    pub fn spread(mut self, ms: i64) -> Self {
        self.spread_ms = ms.max(1);
        self
    }

    /// Event times in the order the events come, as Logstash ships a live
    /// stream (or a backlog of one): `events` of them rise evenly over the
    /// spread to `now_ms`, each up to [`ARRIVAL_JITTER_MS`] earlier than its
    /// place (several web servers' lines meet in Logstash); events past the
    /// `events`th stay at `now_ms`. Without it, times are drawn at random
    /// over the whole spread: every batch then touches every minute of it,
    /// which no stream does.
    pub fn in_time_order(mut self, events: usize) -> Self {
        self.in_order = Some((events as u64).max(1));
        self
    }

    /// Number of distinct users.
    pub fn users(mut self, users: u32) -> Self {
        self.users = users.max(1);
        self
    }

    /// A rank drawn from cumulative weights `cumulative`.
    fn draw(rng: &mut StdRng, cumulative: &[f64]) -> usize {
        let total = cumulative.last().copied().unwrap_or(0.0);
        let at = rng.random::<f64>() * total;
        cumulative
            .partition_point(|w| *w < at)
            .min(cumulative.len().saturating_sub(1))
    }

    /// A canonical keyword: Zipf over 50,000 in production, else skewed
    /// over the canonical list.
    fn keyword(&mut self) -> String {
        match &self.production {
            Some(production) => match Self::draw(&mut self.rng, &production.keywords) {
                rank if rank < KEYWORDS.len() => KEYWORDS[rank].to_owned(),
                rank => format!("keyword {rank}"),
            },
            None => KEYWORDS[self.skewed(KEYWORDS.len())].to_owned(),
        }
    }

    /// A movie id, from 1.
    fn movie(&mut self) -> u64 {
        let rank = match &self.production {
            Some(production) => Self::draw(&mut self.rng, &production.movies),
            None => self.skewed(self.movies as usize),
        };
        rank as u64 + 1
    }

    /// Skewed pick in `0..n`: index ~ n * u^3 puts most mass on low indexes.
    fn skewed(&mut self, n: usize) -> usize {
        let u: f64 = self.rng.random();
        ((u * u * u) * n as f64) as usize % n.max(1)
    }

    /// The next event.
    pub fn next_event(&mut self) -> Generated {
        self.seq += 1;
        if self.bad_fraction > 0.0 && self.rng.random_bool(self.bad_fraction) {
            return self.malformed();
        }
        let roll: f64 = self.rng.random();
        let info: &'static str = match self.mix {
            Mix::User3 if roll < 0.55 => "search",
            Mix::User3 => "movie_detail",
            Mix::All if roll < 0.3 => "search",
            Mix::All if roll < 0.55 => "movie_detail",
            Mix::All => OTHER_KINDS[self.rng.random_range(0..OTHER_KINDS.len())],
        };
        let time_ms = match self.in_order {
            Some(events) => {
                let elapsed = i128::from(self.seq.min(events)) * i128::from(self.spread_ms)
                    / i128::from(events);
                let place =
                    self.now_ms - self.spread_ms + i64::try_from(elapsed).unwrap_or(self.spread_ms);
                place
                    - self
                        .rng
                        .random_range(0..ARRIVAL_JITTER_MS.min(self.spread_ms))
            }
            None => self.now_ms - self.rng.random_range(0..self.spread_ms),
        };
        let timestamp = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(time_ms)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        // 10% anonymous; user ids as strings or integers, as Logstash passes them through.
        let user_n = self.rng.random_range(0..self.users);
        let anonymous = self.rng.random_bool(0.1);
        let (user_json, user) = if anonymous {
            (serde_json::Value::Null, None)
        } else if user_n % 3 == 0 {
            (
                json!(u64::from(user_n) + 100_000),
                Some((u64::from(user_n) + 100_000).to_string()),
            )
        } else {
            (
                json!(format!("user{user_n}")),
                Some(format!("user{user_n}")),
            )
        };
        let host = format!("web-{}", self.rng.random_range(1..4));
        let mut event = json!({
            "@timestamp": timestamp,
            "@version": "1",
            "host": host,
            "info": info,
            "message": format!("{info} request #{}", self.seq),
            "user_id": user_json,
        });
        let truth = match info {
            "search" => {
                let canonical = self.keyword();
                event["keyword"] = json!(self.variant(&canonical));
                Some(Truth {
                    info,
                    member: canonical,
                    user,
                    time_ms,
                })
            }
            "movie_detail" => {
                let id = self.movie();
                // Integer and string ids mean the same movie.
                event["movie_id"] = if self.rng.random_bool(0.5) {
                    json!(id)
                } else {
                    json!(id.to_string())
                };
                event["movie_title"] = json!(format!("Movie {id}"));
                Some(Truth {
                    info,
                    member: id.to_string(),
                    user,
                    time_ms,
                })
            }
            _ => {
                event["session_ms"] = json!(self.rng.random_range(0..3_600_000));
                None
            }
        };
        if self.production.is_some() {
            self.web_server_fields(&mut event);
        }
        Generated {
            info,
            payload: event.to_string().into_bytes(),
            truth,
            valid: true,
        }
    }

    /// What a web server's JSON access log carries besides our fields.
    fn web_server_fields(&mut self, event: &mut serde_json::Value) {
        let ip = format!(
            "10.{}.{}.{}",
            self.rng.random_range(0..256),
            self.rng.random_range(0..256),
            self.rng.random_range(1..255)
        );
        let path = match event["info"].as_str() {
            Some("search") => "/search",
            Some("movie_detail") => "/movies/detail",
            _ => "/api/session",
        };
        event["clientip"] = json!(ip);
        event["request"] = json!(format!("GET {path}?ref=home&page=1 HTTP/1.1"));
        event["status"] = json!(200);
        event["bytes"] = json!(self.rng.random_range(500..40_000));
        event["referrer"] = json!("https://movies.example.com/");
        event["agent"] = json!(
            "Mozilla/5.0 (Linux; Android 14; SM-S918N) AppleWebKit/537.36 (KHTML, like Gecko) \
             Chrome/124.0.0.0 Mobile Safari/537.36"
        );
        event["response_ms"] = json!(self.rng.random_range(1..800));
    }

    /// A keyword as a user might type it: case, width and spacing vary.
    fn variant(&mut self, canonical: &str) -> String {
        let mut out: String = match self.rng.random_range(0..4) {
            0 => canonical.to_owned(),
            1 => canonical.to_uppercase(),
            2 => canonical.chars().map(full_width).collect(),
            _ => canonical.split(' ').collect::<Vec<_>>().join("   "),
        };
        if self.rng.random_bool(0.3) {
            out = format!("  {out}\t");
        }
        out
    }

    fn malformed(&mut self) -> Generated {
        if self.production.is_none() {
            return self.any_malformed();
        }
        // In production only what Logstash routes to the topic arrives
        // there: user3 gets readable objects only (no cut lines, no
        // unparsable ones).
        if self.mix == Mix::All && self.rng.random_bool(0.05) {
            return Generated {
                info: "malformed",
                payload: cut_line(FILEBEAT_MAX_LINE),
                truth: None,
                valid: false,
            };
        }
        loop {
            let line = self.any_malformed();
            if self.mix == Mix::All || logstash_route(&line.payload).user3 {
                return line;
            }
        }
    }

    fn any_malformed(&mut self) -> Generated {
        let payload: Vec<u8> = match self.rng.random_range(0..8) {
            0 => b"GET /search?q=parasite HTTP/1.1".to_vec(),
            1 => Vec::new(),
            2 => vec![b'{', 0xff, 0xfe, b'}'],
            3 => b"[\"search\", \"parasite\"]".to_vec(),
            4 => br#"{"info":"search","keyword":42,"user_id":"u1"}"#.to_vec(),
            5 => br#"{"info":"search","keyword":"x","@timestamp":"yesterday"}"#.to_vec(),
            6 => br#"{"info":"movie_detail","movie_id":"","user_id":"u2"}"#.to_vec(),
            _ => br#"{"info":"search","keyword":"parasite","user_id":{"id":1}}"#.to_vec(),
        };
        Generated {
            info: "malformed",
            payload,
            truth: None,
            valid: false,
        }
    }
}

/// Where deploy/logstash/pipeline.conf sends one log line of a web server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogstashRoute {
    /// The Kafka message key: the event's `user_id` as Logstash's
    /// `%{[user_id]}` renders it, or `None` (no key) for an event without one.
    pub key: Option<String>,
    /// Also to user3: a JSON object Logstash could read whose `info` is
    /// `search` or `movie_detail`. Every line goes to user2.
    pub user3: bool,
}

/// How the pipeline routes and keys `line` (what Filebeat ships, one line of
/// the web servers' JSON log): `gen-events --route logstash` sends what it
/// generates this way, and crates/deploy-check checks this function against
/// the pipeline file run on the same lines.
///
/// A line that is not a JSON object, or whose `@timestamp` is not a string
/// Logstash can parse (here: RFC 3339, the schema's format; null and `false`
/// count as absent), is unreadable: Logstash sends it unchanged to user2
/// only, keyed by its `user_id` if the JSON had one. So is a JSON object whose
/// own `tags` hold `_timestampparsefailure` (the tag Logstash gives a bad
/// `@timestamp`). A line with `"@metadata"` (in double quotes) anywhere is
/// sent unchanged to user2 only, without a key (the pipeline does not decode
/// it). Anything else goes to user2, and also to user3 for `search` /
/// `movie_detail`.
///
/// Keyed or not is the pipeline's `if [user_id] or [user_id] == "false"`:
/// no key when `user_id` is absent, null, `""` or `false` (Logstash's
/// truthiness, which also calls the string `"false"` false, hence the
/// second test); any other value, `0` included, is the key.
pub fn logstash_route(line: &[u8]) -> LogstashRoute {
    let text = String::from_utf8_lossy(line);
    let not_decoded = LogstashRoute {
        key: None,
        user3: false,
    };
    if text.contains(r#""@metadata""#) {
        return not_decoded;
    }
    let Ok(serde_json::Value::Object(event)) = serde_json::from_str(&text) else {
        return not_decoded;
    };
    let readable_time = match event.get("@timestamp") {
        None | Some(serde_json::Value::Null | serde_json::Value::Bool(false)) => true,
        Some(serde_json::Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s).is_ok(),
        Some(_) => false,
    };
    let tagged_bad_time = event
        .get("tags")
        .and_then(serde_json::Value::as_array)
        .is_some_and(|tags| tags.iter().any(|t| t == "_timestampparsefailure"));
    let info = event.get("info").and_then(serde_json::Value::as_str);
    LogstashRoute {
        key: logstash_key(event.get("user_id")),
        user3: readable_time && !tagged_bad_time && matches!(info, Some("search" | "movie_detail")),
    }
}

/// The key of an event whose `user_id` is `value`: none for absent, null,
/// `""` and `false`, else the field as Logstash's `%{[user_id]}` renders it:
/// a string as is, a number or bool as its text, an object as JSON, a list
/// joined by commas. (Floats are rendered by Java's `Double.toString`, which
/// differs from this for some values; the generator writes none.)
fn logstash_key(value: Option<&serde_json::Value>) -> Option<String> {
    use serde_json::Value;
    match value? {
        Value::Null | Value::Bool(false) => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => Some(
            items
                .iter()
                .map(|item| match item {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
        ),
        other => Some(other.to_string()),
    }
}

/// Kafka's `Utils.murmur2`, the hash of the Java client's default
/// partitioner (Logstash's kafka output uses it for keyed messages).
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if let Some(&first) = tail.first() {
        h ^= u32::from(first);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java client's default partitioner picks for a keyed
/// message: `toPositive(murmur2(key)) % partitions` (librdkafka's
/// `murmur2_random` partitioner does the same).
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// Kafka's default `batch.size`, also the default `batch_size` of Logstash's
/// kafka output: how many bytes of messages without a key the Java client
/// sends to one partition before it moves to another.
pub const STICKY_BATCH_BYTES: usize = 16_384;

/// The partitions the Java client of Logstash's kafka output (Kafka 3.x, no
/// `partitioner` set) picks for the messages of one topic, as
/// `gen-events --route logstash` sends them.
///
/// A keyed message goes to [`java_partition`] of its key. A message without a
/// key goes to the topic's current "sticky" partition, which changes once
/// [`STICKY_BATCH_BYTES`] of such messages have gone to it (KIP-794's uniform
/// sticky partitioning: a batch at a time to one partition, the same bytes to
/// every partition in the long run). The Java client picks the next partition
/// at random, weighted towards brokers with less queued; this takes the next
/// one in turn, which is reproducible and spreads the same runs of about a
/// batch evenly, and no consumer can tell the two orders apart (nothing about
/// a message without a key says where it belongs).
#[derive(Debug, Clone)]
pub struct JavaPartitioner {
    partitions: i32,
    sticky: i32,
    sticky_bytes: usize,
}

impl JavaPartitioner {
    /// For a topic of `partitions` partitions; unkeyed messages start at 0.
    pub fn new(partitions: i32) -> Self {
        Self {
            partitions: partitions.max(1),
            sticky: 0,
            sticky_bytes: 0,
        }
    }

    /// The partition of a message with `key` (or none) and `bytes` of payload.
    pub fn partition(&mut self, key: Option<&[u8]>, bytes: usize) -> i32 {
        if let Some(key) = key {
            return java_partition(key, self.partitions);
        }
        if self.sticky_bytes >= STICKY_BATCH_BYTES {
            self.sticky = (self.sticky + 1) % self.partitions;
            self.sticky_bytes = 0;
        }
        self.sticky_bytes += bytes;
        self.sticky
    }
}

/// Where Filebeat cuts a line (`message_max_bytes` in
/// deploy/filebeat/filebeat.yml), so that it fits one Kafka record.
const FILEBEAT_MAX_LINE: usize = 921_600;

/// A JSON line of `bytes` cut in the middle, as Filebeat cuts a line
/// longer than its limit: not JSON any more.
fn cut_line(bytes: usize) -> Vec<u8> {
    let mut line = br#"{"info":"search","keyword":""#.to_vec();
    line.resize(bytes, b'k');
    line
}

fn full_width(c: char) -> char {
    match c {
        ' ' => '\u{3000}',
        '!'..='~' => char::from_u32(c as u32 + 0xFEE0).unwrap_or(c),
        _ => c,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn production_traffic_has_a_head_and_a_long_tail() {
        let mut g = Generator::new(7, Mix::User3, 0).production();
        let mut keywords: std::collections::HashMap<String, usize> = Default::default();
        let mut bytes = 0;
        let n = 100_000;
        for _ in 0..n {
            let event = g.next_event();
            bytes += event.payload.len();
            if let Some(truth) = event.truth.filter(|t| t.info == "search") {
                *keywords.entry(truth.member).or_default() += 1;
            }
        }
        let searches: usize = keywords.values().sum();
        let top = keywords.get(KEYWORDS[0]).copied().unwrap_or(0);
        // Zipf over 50,000: the top term about 9 %, thousands of terms seen.
        assert!(
            (0.06..0.12).contains(&(top as f64 / searches as f64)),
            "{top} of {searches}"
        );
        assert!(keywords.len() > 10_000, "{} distinct", keywords.len());
        assert!(
            (450..750).contains(&(bytes / n)),
            "{} bytes an event",
            bytes / n
        );
    }

    #[test]
    fn times_in_order_rise_through_the_spread_as_a_stream_does() {
        let now = 1_700_000_000_000;
        let (events, spread) = (30_000, 60_000);
        let mut g = Generator::new(7, Mix::User3, now)
            .production()
            .bad_fraction(0.02)
            .spread(spread)
            .in_time_order(events);
        let times: Vec<i64> = (0..events)
            .filter_map(|_| g.next_event().truth.map(|t| t.time_ms))
            .collect();
        assert!(
            (events * 95 / 100..events * 99 / 100).contains(&times.len()),
            "{} valid of {events}",
            times.len()
        );
        let earliest = now - spread - ARRIVAL_JITTER_MS;
        assert!(times.iter().all(|t| (earliest..=now).contains(t)));
        // An event is never more than the jitter older than any event
        // before it: a 5,000-event stretch spans seconds, not the spread.
        let mut latest = earliest;
        for time in &times {
            assert!(
                *time > latest - 2 * ARRIVAL_JITTER_MS,
                "{time} after {latest}"
            );
            latest = latest.max(*time);
        }
        // 5,000 valid events are about 5,100 of the 30,000 over 60 s: about
        // 10 s of times, and the jitter (shuffled, they would span 60 s).
        for chunk in times.chunks(5_000) {
            let span = chunk.iter().max().unwrap() - chunk.iter().min().unwrap();
            assert!(span <= 10_600 + ARRIVAL_JITTER_MS, "{span} ms");
        }
        assert!(times.first() < Some(&(now - spread + 1_000)));
        assert!(times.last() > Some(&(now - 2_000)));
    }

    #[test]
    fn same_seed_same_events() {
        let a: Vec<Vec<u8>> = {
            let mut g = Generator::new(7, Mix::All, 1_700_000_000_000).bad_fraction(0.1);
            (0..100).map(|_| g.next_event().payload).collect()
        };
        let b: Vec<Vec<u8>> = {
            let mut g = Generator::new(7, Mix::All, 1_700_000_000_000).bad_fraction(0.1);
            (0..100).map(|_| g.next_event().payload).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn user3_mix_has_only_search_and_movie_detail() {
        let mut g = Generator::new(1, Mix::User3, 1_700_000_000_000);
        for _ in 0..1000 {
            let e = g.next_event();
            assert!(matches!(e.info, "search" | "movie_detail"));
            assert!(e.truth.is_some());
        }
    }

    #[test]
    fn murmur2_matches_kafkas_own_test_vectors() {
        // org.apache.kafka.common.utils.UtilsTest#testMurmur2.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, hash) in cases {
            assert_eq!(murmur2(key), hash, "{}", String::from_utf8_lossy(key));
        }
        // Negative hashes are masked, not negated.
        assert_eq!(
            java_partition(b"21", 3),
            (-973_932_308_i32 & 0x7fff_ffff) % 3
        );
    }

    #[test]
    fn logstash_route_keys_by_user_and_reads_only_json_objects() {
        let route = |line: &str| {
            let r = logstash_route(line.as_bytes());
            (r.key, r.user3)
        };
        let key = |k: &str| Some(k.to_owned());
        assert_eq!(
            route(r#"{"info":"search","user_id":"u-1"}"#),
            (key("u-1"), true)
        );
        assert_eq!(
            route(r#"{"info":"movie_detail","user_id":1024}"#),
            (key("1024"), true)
        );
        assert_eq!(
            route(r#"{"info":"login","user_id":"u-1"}"#),
            (key("u-1"), false)
        );
        assert_eq!(
            route(r#"{"info":"search","user_id":{"id":1}}"#),
            (key(r#"{"id":1}"#), true)
        );
        assert_eq!(
            route(r#"{"info":"search","user_id":"u","@timestamp":"yesterday"}"#),
            (key("u"), false)
        );
        // Logstash's truthiness: 0 and "0" are true; the string "false" is a
        // user (the pipeline tests it apart); absent, null, "" and false are not.
        for (user_id, expected) in [
            ("0", key("0")),
            (r#""0""#, key("0")),
            (r#""false""#, key("false")),
            ("true", key("true")),
            ("null", None),
            (r#""""#, None),
            ("false", None),
        ] {
            let line = format!(r#"{{"info":"search","user_id":{user_id}}}"#);
            assert_eq!(route(&line), (expected, true), "{line}");
        }
        assert_eq!(route(r#"{"info":"search"}"#), (None, true));
        assert_eq!(route("GET /search"), (None, false));
        assert_eq!(route(r#"["search"]"#), (None, false));
        // Logstash's json filter takes an @timestamp of false as absent.
        assert_eq!(
            route(r#"{"info":"search","user_id":"u","@timestamp":false}"#),
            (key("u"), true)
        );
        // Its tag for a bad @timestamp, in the line's own tags: as if bad.
        assert_eq!(
            route(r#"{"info":"search","user_id":"u","tags":["_timestampparsefailure"]}"#),
            (key("u"), false)
        );
        // "@metadata": not decoded, so neither keyed nor routed by its fields.
        assert_eq!(
            route(r#"{"info":"search","user_id":"u","@metadata":{}}"#),
            (None, false)
        );
    }

    #[test]
    fn generated_events_are_keyed_by_their_user() {
        let mut g = Generator::new(3, Mix::All, 1_700_000_000_000);
        for _ in 0..500 {
            let e = g.next_event();
            let route = logstash_route(&e.payload);
            if let Some(truth) = &e.truth {
                assert_eq!(route.key, truth.user);
                assert!(route.user3);
            }
        }
    }

    #[test]
    fn unkeyed_messages_stick_to_a_partition_for_a_batch_then_move_on() {
        let mut p = JavaPartitioner::new(3);
        let unkeyed: Vec<i32> = (0..200).map(|_| p.partition(None, 1_000)).collect();
        // 17 messages of 1000 bytes reach 16384, so the 18th goes to the next.
        assert!(unkeyed[..17].iter().all(|&n| n == 0));
        assert!(unkeyed[17..34].iter().all(|&n| n == 1));
        assert!(unkeyed[34..51].iter().all(|&n| n == 2));
        assert_eq!(unkeyed[51], 0);
        // Keyed messages neither move nor count towards the sticky partition.
        assert_eq!(
            p.partition(Some(b"21"), 1_000_000),
            java_partition(b"21", 3)
        );
        assert_eq!(p.partition(None, 1), unkeyed[199]);
    }

    /// Messages per partition of user2 and user3 (3 partitions each) when
    /// gen-events routes `count` events of its defaults (seed 1, every kind,
    /// 2000 users, no malformed lines) like Logstash: `(keyed, unkeyed)`.
    fn default_spread(count: usize) -> [([u64; 3], [u64; 3]); 2] {
        let mut g = Generator::new(1, Mix::All, 1_700_000_000_000);
        let mut partitioners = [JavaPartitioner::new(3), JavaPartitioner::new(3)];
        let mut counts = [([0u64; 3], [0u64; 3]); 2];
        for _ in 0..count {
            let e = g.next_event();
            let route = logstash_route(&e.payload);
            let topics: &[usize] = if route.user3 { &[0, 1] } else { &[0] };
            for &topic in topics {
                let key = route.key.as_deref().map(str::as_bytes);
                let partition = partitioners[topic].partition(key, e.payload.len()) as usize;
                let (keyed, unkeyed) = &mut counts[topic];
                match key {
                    Some(_) => keyed[partition] += 1,
                    None => unkeyed[partition] += 1,
                }
            }
        }
        counts
    }

    #[test]
    fn default_output_spreads_over_the_partitions() {
        for (topic, (keyed, unkeyed)) in ["user2", "user3"].into_iter().zip(default_spread(100_000))
        {
            let all: Vec<u64> = keyed.iter().zip(unkeyed).map(|(k, u)| k + u).collect();
            let total: u64 = all.iter().sum();
            println!("{topic}: {all:?} of {total} (keyed {keyed:?}, unkeyed {unkeyed:?})");
            // Unkeyed messages (10% of events) spread almost exactly; the keyed
            // ones as murmur2 spreads the 2000 users.
            let unkeyed_total: u64 = unkeyed.iter().sum();
            for n in unkeyed {
                assert!(
                    n.abs_diff(unkeyed_total / 3) < unkeyed_total / 30,
                    "{topic} {unkeyed:?}"
                );
            }
            for n in &all {
                assert!(n.abs_diff(total / 3) < total / 20, "{topic} {all:?}");
            }
        }
    }

    #[test]
    fn full_width_keywords_are_really_full_width() {
        assert_eq!(
            "iphone 15".chars().map(full_width).collect::<String>(),
            "ｉｐｈｏｎｅ\u{3000}１５"
        );
    }
}

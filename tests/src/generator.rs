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
    seq: u64,
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
            seq: 0,
        }
    }

    /// Share of malformed lines, 0.0..=1.0.
    pub fn bad_fraction(mut self, fraction: f64) -> Self {
        self.bad_fraction = fraction.clamp(0.0, 1.0);
        self
    }

    /// Number of distinct users.
    pub fn users(mut self, users: u32) -> Self {
        self.users = users.max(1);
        self
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
        let time_ms = self.now_ms - self.rng.random_range(0..7_200_000);
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
                let canonical = KEYWORDS[self.skewed(KEYWORDS.len())];
                event["keyword"] = json!(self.variant(canonical));
                Some(Truth {
                    info,
                    member: canonical.to_owned(),
                    user,
                    time_ms,
                })
            }
            "movie_detail" => {
                let id = self.skewed(self.movies as usize) as u64 + 1;
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
        Generated {
            info,
            payload: event.to_string().into_bytes(),
            truth,
            valid: true,
        }
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
    fn full_width_keywords_are_really_full_width() {
        assert_eq!(
            "iphone 15".chars().map(full_width).collect::<String>(),
            "ｉｐｈｏｎｅ\u{3000}１５"
        );
    }
}

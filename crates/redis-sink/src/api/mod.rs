//! The read API (`redis-sink serve`): rankings, rising terms and user
//! histories as HTTP/JSON, a live page at `/`, and its OpenAPI document at
//! `/openapi.json`.
//!
//! Reads only (see [`crate::query`]): it runs against a replica, with a
//! Redis user that may only read. Rankings are read at most once per key
//! and `--cache-ms` ([`cache`]), so its cost to Redis does not grow with
//! page views; histories are one `ZRANGE` per request (one user's page
//! views are few).

pub mod cache;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::client::RedisConn;
use crate::decode::Kind;
use crate::keys::Keys;
use crate::query::{self, Ranked, Rising, Seen};
use crate::window::{Recorded, Window, WindowError};
use cache::Cache;

/// The most members one request may ask for (and what the cache keeps).
pub const MAX_LIMIT: usize = 100;

/// How often the API re-reads the writers' recorded retention.
const RETENTION_REFRESH: Duration = Duration::from_secs(10);

/// Ranking reads one API process runs at once.
const CONCURRENT_READS: usize = 4;
/// History reads (one `ZRANGE` each, uncached) one API process runs at once.
const CONCURRENT_HISTORY_READS: usize = 32;

/// How long one Redis read may take before the request fails (and the
/// last good value is served, marked stale).
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The API's paths, as in [`OPENAPI`].
const TOP: &str = "/api/v1/top/{kind}";
const RISING: &str = "/api/v1/rising/{kind}";
const HISTORY: &str = "/api/v1/history/{kind}/{user}";
const PATHS: [&str; 7] = [
    "/",
    "/openapi.json",
    "/healthz",
    "/readyz",
    TOP,
    RISING,
    HISTORY,
];

/// The live page.
const PAGE: &str = include_str!("page.html");
/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What the API serves from.
pub struct Api {
    conn: RedisConn,
    keys: Keys,
    /// `--bucket-ttl-secs`: used only while no writer has recorded one.
    bucket_ttl_secs: u64,
    /// What the writers recorded, re-read every [`RETENTION_REFRESH`].
    recorded: std::sync::Mutex<Option<Recorded>>,
    cache_max_age: HeaderValue,
    top: Cache<(Kind, Window), Snapshot<Ranked>>,
    rising: Cache<(Kind, Window), Snapshot<Rising>>,
    reads: tokio::sync::Semaphore,
    history_reads: tokio::sync::Semaphore,
    /// Redis has answered since the start (see `ready`).
    answered: AtomicBool,
}

impl Api {
    /// Reads `conn` under `keys`; windows may reach back as far as the
    /// writers recorded (see [`Self::refresh_retention`]), `bucket_ttl_secs`
    /// while none has; rankings are reused for `cache`.
    pub fn new(conn: RedisConn, keys: Keys, bucket_ttl_secs: u64, cache: Duration) -> Self {
        let max_age = format!("public, max-age={}", cache.as_secs());
        Self {
            conn,
            keys,
            bucket_ttl_secs,
            recorded: std::sync::Mutex::new(None),
            cache_max_age: HeaderValue::from_str(&max_age)
                .unwrap_or(HeaderValue::from_static("no-cache")),
            top: Cache::new(cache),
            rising: Cache::new(cache),
            reads: tokio::sync::Semaphore::new(CONCURRENT_READS),
            history_reads: tokio::sync::Semaphore::new(CONCURRENT_HISTORY_READS),
            answered: AtomicBool::new(false),
        }
    }

    /// Reads what the writers recorded of their bucket retention (the
    /// router re-reads it every [`RETENTION_REFRESH`]).
    pub async fn refresh_retention(&self) -> Result<(), String> {
        let recorded = self
            .read(query::recorded_retention(
                &mut self.conn.clone(),
                &self.keys,
            ))
            .await?;
        if recorded.is_none() {
            tracing::warn!(
                bucket_ttl_secs = self.bucket_ttl_secs,
                "no redis-sink has recorded its --bucket-ttl-secs under this prefix yet: windows are refused by this one's"
            );
        }
        *self.recorded.lock().unwrap_or_else(|p| p.into_inner()) = recorded;
        Ok(())
    }

    /// The longest window readable at `now_ms`.
    fn kept_secs(&self, now_ms: i64) -> u64 {
        let recorded = *self.recorded.lock().unwrap_or_else(|p| p.into_inner());
        recorded.map_or(self.bucket_ttl_secs, |r| r.kept_secs(now_ms))
    }

    /// The routes; re-reads the writers' retention in the background.
    pub fn router(self) -> Router {
        let api = Arc::new(self);
        let weak = Arc::downgrade(&api);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RETENTION_REFRESH);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(api) = weak.upgrade() else { return };
                // A failure keeps the last record (and is logged by `read`).
                let _ = api.refresh_retention().await;
            }
        });
        Router::new()
            .route(PATHS[0], get(page))
            .route(PATHS[1], get(openapi))
            .route(PATHS[2], get(|| async { "ok\n" }))
            .route(PATHS[3], get(ready))
            .route(TOP, get(top))
            .route(RISING, get(rising))
            .route(HISTORY, get(history))
            .fallback(|| async {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no such path: see /openapi.json",
                )
            })
            .method_not_allowed_fallback(|| async {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "this API only answers GET",
                )
            })
            .with_state(api)
    }
}

/// A ranking as read at `as_of_ms`, its [`MAX_LIMIT`] first members.
#[derive(Debug)]
pub struct Snapshot<T> {
    as_of_ms: i64,
    from_ms: Option<i64>,
    members: Vec<T>,
}

/// The query of a ranking.
#[derive(Debug, Deserialize)]
struct RankingQuery {
    window: Option<String>,
    limit: Option<usize>,
}

/// A ranking's reply.
#[derive(Debug, Serialize)]
struct RankingReply<'a, T> {
    kind: Kind,
    window: Window,
    /// Start of the window (RFC 3339), null for all time.
    from: Option<String>,
    /// When Redis was read (RFC 3339): the window's end.
    as_of: String,
    /// True when Redis failed since and this is the last good read.
    stale: bool,
    members: &'a [T],
}

/// An error as JSON: `{"error": {"reason": ..., "message": ...}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }

    fn unavailable(message: String) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "redis_unavailable",
            message,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "reason": self.reason, "message": self.message }
        });
        (self.status, Json(body)).into_response()
    }
}

impl From<WindowError> for ApiError {
    fn from(err: WindowError) -> Self {
        let reason = match err {
            WindowError::Unreadable(_) => "bad_window",
            WindowError::TooLong { .. } => "window_too_long",
        };
        Self::new(StatusCode::BAD_REQUEST, reason, err.to_string())
    }
}

impl From<PathRejection> for ApiError {
    fn from(err: PathRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_path", err.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(err: QueryRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_query", err.body_text())
    }
}

fn kind(text: &str) -> Result<Kind, ApiError> {
    match text {
        "search" => Ok(Kind::Search),
        "movie" => Ok(Kind::Movie),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_kind",
            format!("no ranking {text:?}: the kinds are search and movie"),
        )),
    }
}

fn limit(asked: Option<usize>, default: usize) -> Result<usize, ApiError> {
    let limit = asked.unwrap_or(default);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_limit",
            format!("limit {limit} is out of range: ask for 1 to {MAX_LIMIT}"),
        ));
    }
    Ok(limit)
}

/// Parses and checks `?window=` (default 1h) for a read that reaches back
/// `times` windows.
fn window(asked: Option<&str>, times: u32, kept_secs: u64) -> Result<Window, ApiError> {
    let window: Window = asked.unwrap_or("1h").parse()?;
    Ok(window.check(times, kept_secs)?)
}

/// The kind, window and limit a ranking request asks for, checked; the
/// window reaches back `times` windows.
fn ranking_request(
    api: &Api,
    kind_name: Result<Path<String>, PathRejection>,
    asked: Result<Query<RankingQuery>, QueryRejection>,
    times: u32,
) -> Result<(Kind, Window, usize), ApiError> {
    let (Path(kind_name), Query(asked)) = (kind_name?, asked?);
    Ok((
        kind(&kind_name)?,
        window(asked.window.as_deref(), times, api.kept_secs(now_ms()))?,
        limit(asked.limit, 10)?,
    ))
}

async fn top(
    State(api): State<Arc<Api>>,
    kind_name: Result<Path<String>, PathRejection>,
    asked: Result<Query<RankingQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (kind, window, limit) = ranking_request(&api, kind_name, asked, 1)?;
    let cached = api
        .top
        .get(&(kind, window), || async {
            let now_ms = now_ms();
            let counts = api
                .read(query::counts(
                    &mut api.conn.clone(),
                    &api.keys,
                    kind,
                    window,
                    0,
                    now_ms,
                    MAX_LIMIT,
                ))
                .await?;
            Ok(Snapshot {
                as_of_ms: now_ms,
                from_ms: window.start_ms(now_ms),
                members: query::top(counts, MAX_LIMIT),
            })
        })
        .await
        .map_err(ApiError::unavailable)?;
    Ok(ranking_reply(&api, kind, window, limit, &cached))
}

async fn rising(
    State(api): State<Arc<Api>>,
    kind_name: Result<Path<String>, PathRejection>,
    asked: Result<Query<RankingQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (kind, window, limit) = ranking_request(&api, kind_name, asked, 2)?;
    if window == Window::AllTime {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_window",
            "rising terms compare a window with the one before it: give a window such as 15m or 1h, not all",
        ));
    }
    let cached = api
        .rising
        .get(&(kind, window), || async {
            let now_ms = now_ms();
            let mut conn = api.conn.clone();
            let current = api
                .read(query::counts(
                    &mut conn, &api.keys, kind, window, 0, now_ms, MAX_LIMIT,
                ))
                .await?;
            let previous = api
                .read(query::counts(
                    &mut conn, &api.keys, kind, window, 1, now_ms, MAX_LIMIT,
                ))
                .await?;
            Ok(Snapshot {
                as_of_ms: now_ms,
                from_ms: window.start_ms(now_ms),
                members: query::rising(current, previous, window.elapsed_share(now_ms), MAX_LIMIT),
            })
        })
        .await
        .map_err(ApiError::unavailable)?;
    Ok(ranking_reply(&api, kind, window, limit, &cached))
}

fn ranking_reply<T: Serialize>(
    api: &Api,
    kind: Kind,
    window: Window,
    limit: usize,
    cached: &cache::Cached<Snapshot<T>>,
) -> Response {
    let snapshot = &cached.value;
    let reply = RankingReply {
        kind,
        window,
        from: snapshot.from_ms.map(rfc3339),
        as_of: rfc3339(snapshot.as_of_ms),
        stale: cached.stale,
        members: &snapshot.members[..limit.min(snapshot.members.len())],
    };
    let mut response = Json(reply).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, api.cache_max_age.clone());
    response
}

/// The query of a history.
#[derive(Debug, Deserialize)]
struct HistoryQuery {
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
struct HistoryReply {
    kind: Kind,
    user: String,
    items: Vec<Seen>,
}

async fn history(
    State(api): State<Arc<Api>>,
    path: Result<Path<(String, String)>, PathRejection>,
    asked: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<HistoryReply>, ApiError> {
    let (Path((kind_name, user)), Query(asked)) = (path?, asked?);
    let kind = kind(&kind_name)?;
    let limit = limit(asked.limit, 50)?;
    let items = api
        .read_history(query::history(
            &mut api.conn.clone(),
            &api.keys,
            kind,
            &user,
            limit,
        ))
        .await
        .map_err(ApiError::unavailable)?;
    Ok(Json(HistoryReply { kind, user, items }))
}

/// Ready once Redis has answered since the start: afterwards a Redis outage
/// leaves the API serving its last reads (marked stale), which an unready
/// pod behind a Service could not.
async fn ready(State(api): State<Arc<Api>>) -> Result<&'static str, ApiError> {
    if api.answered.load(Ordering::Relaxed) {
        return Ok("ready\n");
    }
    api.read(async {
        redis::cmd("PING")
            .query_async::<()>(&mut api.conn.clone())
            .await
    })
    .await
    .map_err(ApiError::unavailable)?;
    Ok("ready\n")
}

async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE)
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

impl Api {
    /// One Redis read, bounded by [`READ_TIMEOUT`] and at most
    /// [`CONCURRENT_READS`] at a time (requests cycling through windows
    /// must not turn into a `ZUNION` each), its error as text (logged once
    /// per read, not per request).
    async fn read<T>(
        &self,
        reading: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        self.read_within(&self.reads, reading).await
    }

    /// A history read: as [`Self::read`], with permits of its own, so that
    /// a flood of them cannot hold back the rankings' refreshes.
    async fn read_history<T>(
        &self,
        reading: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        self.read_within(&self.history_reads, reading).await
    }

    /// Waiting for a permit counts in [`READ_TIMEOUT`]: a request never
    /// waits longer for Redis, and a ranking falls back to its last good
    /// read.
    async fn read_within<T>(
        &self,
        permits: &tokio::sync::Semaphore,
        reading: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        let bounded = async {
            let _permit = permits.acquire().await;
            reading.await
        };
        let error = match tokio::time::timeout(READ_TIMEOUT, bounded).await {
            Ok(Ok(value)) => {
                self.answered.store(true, Ordering::Relaxed);
                return Ok(value);
            }
            Ok(Err(err)) => format!("cannot read Redis: {err}"),
            Err(_) => format!("Redis did not answer within {READ_TIMEOUT:?}"),
        };
        tracing::warn!(error = %error, "read failed");
        Err(error)
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_every_path_served() {
        let document: serde_json::Value = serde_json::from_str(OPENAPI).unwrap_or_default();
        let mut documented: Vec<&str> = document["paths"]
            .as_object()
            .map(|paths| paths.keys().map(String::as_str).collect())
            .unwrap_or_default();
        documented.sort_unstable();
        let mut served = PATHS.to_vec();
        served.sort_unstable();
        assert_eq!(documented, served);
    }

    #[test]
    fn errors_say_why_as_json() {
        let too_long = window(Some("2d"), 2, 172_800).err();
        assert!(matches!(
            too_long,
            Some(ApiError {
                reason: "window_too_long",
                ..
            })
        ));
        assert!(matches!(
            limit(Some(101), 10),
            Err(ApiError {
                reason: "bad_limit",
                ..
            })
        ));
        assert!(matches!(
            kind("films"),
            Err(ApiError {
                reason: "unknown_kind",
                ..
            })
        ));
    }
}

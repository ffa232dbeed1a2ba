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
use crate::window::{Window, WindowError};
use cache::Cache;

/// The most members one request may ask for (and what the cache keeps).
pub const MAX_LIMIT: usize = 100;

/// Redis reads one API process runs at once.
const CONCURRENT_READS: usize = 4;

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
    bucket_ttl_secs: u64,
    cache_max_age: HeaderValue,
    top: Cache<(Kind, Window), Snapshot<Ranked>>,
    rising: Cache<(Kind, Window), Snapshot<Rising>>,
    reads: tokio::sync::Semaphore,
    /// Redis has answered since the start (see `ready`).
    answered: AtomicBool,
}

impl Api {
    /// Reads `conn` under `keys`; windows may reach back `bucket_ttl_secs`
    /// (the writer's `--bucket-ttl-secs`); rankings are reused for `cache`.
    pub fn new(conn: RedisConn, keys: Keys, bucket_ttl_secs: u64, cache: Duration) -> Self {
        let max_age = format!("public, max-age={}", cache.as_secs());
        Self {
            conn,
            keys,
            bucket_ttl_secs,
            cache_max_age: HeaderValue::from_str(&max_age)
                .unwrap_or(HeaderValue::from_static("no-cache")),
            top: Cache::new(cache),
            rising: Cache::new(cache),
            reads: tokio::sync::Semaphore::new(CONCURRENT_READS),
            answered: AtomicBool::new(false),
        }
    }

    /// The routes.
    pub fn router(self) -> Router {
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
            .with_state(Arc::new(self))
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
fn window(asked: Option<&str>, times: u32, bucket_ttl_secs: u64) -> Result<Window, ApiError> {
    let window: Window = asked.unwrap_or("1h").parse()?;
    Ok(window.check(times, bucket_ttl_secs)?)
}

async fn top(
    State(api): State<Arc<Api>>,
    kind_name: Result<Path<String>, PathRejection>,
    asked: Result<Query<RankingQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (Path(kind_name), Query(asked)) = (kind_name?, asked?);
    let kind = kind(&kind_name)?;
    let window = window(asked.window.as_deref(), 1, api.bucket_ttl_secs)?;
    let limit = limit(asked.limit, 10)?;
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
    let (Path(kind_name), Query(asked)) = (kind_name?, asked?);
    let kind = kind(&kind_name)?;
    let window = window(asked.window.as_deref(), 2, api.bucket_ttl_secs)?;
    if window == Window::AllTime {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_window",
            "rising terms compare a window with the one before it: give a window such as 15m or 1h, not all",
        ));
    }
    let limit = limit(asked.limit, 10)?;
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
        .read(query::history(
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
        let _permit = self.reads.acquire().await.map_err(|e| e.to_string())?;
        let error = match tokio::time::timeout(READ_TIMEOUT, reading).await {
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

//! Sorting Redis errors: what passes on its own (retried with backoff), what
//! needs an operator (readiness false until fixed). Nothing here drops data:
//! every class is retried.

use redis::{ErrorKind, RedisError};
use sink_core::SinkError;

/// Sorts Redis errors: anything about reaching the server is transient;
/// errors an operator must fix (memory, a read-only replica, a key of the
/// wrong type, auth) make the sink unavailable until fixed.
pub fn classify(err: RedisError) -> SinkError {
    // A failed pipeline carries its commands' errors; redis-rs reports a
    // code for it only when the first is one it knows (OOM is not).
    let code = err.code().map(str::to_owned).or_else(|| {
        err.clone()
            .into_server_errors()
            .and_then(|errors| errors.first().map(|(_, e)| e.code().to_owned()))
    });
    let kind = match (err.kind(), code.as_deref()) {
        (ErrorKind::AuthenticationFailed, _) | (_, Some("NOAUTH" | "WRONGPASS" | "NOPERM")) => {
            "redis_auth"
        }
        (_, Some("OOM")) => "redis_oom",
        (_, Some("READONLY")) => "redis_read_only",
        // A failover in progress: gone once the new primary is reached.
        (_, Some("LOADING")) => return SinkError::transient("redis_loading", err),
        (_, Some("MASTERDOWN")) => return SinkError::transient("redis_master_down", err),
        (_, Some("WRONGTYPE")) => "redis_wrong_type",
        (_, Some("MISCONF")) => "redis_misconf",
        _ => return SinkError::transient("redis_unreachable", err),
    };
    SinkError::unavailable(kind, err)
}

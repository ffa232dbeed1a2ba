//! Sorting BigQuery client errors: what passes on its own (retried with
//! backoff), what needs an operator (readiness false until fixed), and a
//! request too large (split and sent again).
//!
//! Nothing here drops data: every class is retried by someone. The class
//! only decides how, how loudly, and what the operator is told.

use std::error::Error as _;

use anyhow::anyhow;
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::yup_oauth2;
use sink_core::SinkError;

use crate::config::Target;

/// What to do about a failed call.
#[derive(Debug)]
pub enum Failure {
    /// BigQuery found the request too large: send its halves instead.
    TooLarge(String),
    /// Retry the write later (how, the error says).
    Sink(SinkError),
}

/// The class of an error, before messages are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The request body or row count is over BigQuery's limit.
    TooLarge,
    /// Expected to pass on its own; the label is for metrics.
    Transient(&'static str),
    /// Needs an operator; the label is for metrics.
    Operator(&'static str),
}

/// The HTTP status of a BigQuery error response, when the client decoded one.
pub fn status(err: &BQError) -> Option<i64> {
    match err {
        BQError::ResponseError { error } => Some(error.error.code),
        BQError::RequestError(e) => e.status().map(|s| i64::from(s.as_u16())),
        _ => None,
    }
}

/// Classifies an error.
pub fn class(err: &BQError) -> Class {
    match err {
        BQError::ResponseError { error } => {
            let e = &error.error;
            let reasons = || e.errors.iter().filter_map(|m| m.get("reason"));
            let message = e.message.to_ascii_lowercase();
            match e.code {
                413 => Class::TooLarge,
                400 if message.contains("request payload size exceeds")
                    || message.contains("too large")
                    || message.contains("too many rows") =>
                {
                    Class::TooLarge
                }
                400 => Class::Operator("bad_request"),
                401 => Class::Operator("unauthenticated"),
                // BigQuery reports quota and rate limits as 403 too.
                403 if reasons().any(|r| r == "rateLimitExceeded" || r == "quotaExceeded") => {
                    Class::Transient("rate_limited")
                }
                403 => Class::Operator("permission_denied"),
                404 => Class::Operator("not_found"),
                code => http_class(code),
            }
        }
        BQError::RequestError(e) => match e.status() {
            Some(s) if s.as_u16() == 413 => Class::TooLarge,
            Some(s) if !matches!(s.as_u16(), 408 | 429 | 500..=599) => {
                Class::Operator(match s.as_u16() {
                    401 => "unauthenticated",
                    403 => "permission_denied",
                    404 => "not_found",
                    _ => "http_error",
                })
            }
            Some(s) => http_class(i64::from(s.as_u16())),
            None if e.is_timeout() => Class::Transient("timeout"),
            None if e.is_connect() => Class::Transient("connect"),
            // An error status with a body that is not BigQuery's JSON (a
            // proxy's page), or a body cut short.
            None if e.is_decode() => Class::Transient("bad_response"),
            None => Class::Transient("connection"),
        },
        BQError::YupAuthError(
            yup_oauth2::Error::HttpError(_)
            | yup_oauth2::Error::HttpClientError(_)
            | yup_oauth2::Error::LowLevelError(_),
        ) => Class::Transient("token_unreachable"),
        BQError::YupAuthError(_)
        | BQError::AuthError(_)
        | BQError::NoToken
        | BQError::InvalidServiceAccountKey(_)
        | BQError::InvalidServiceAccountAuthenticator(_)
        | BQError::InvalidApplicationDefaultCredentialsAuthenticator(_)
        | BQError::InvalidAuthorizedUserAuthenticator(_)
        | BQError::InvalidInstalledFlowAuthenticator(_) => Class::Operator("credentials"),
        BQError::SerializationError(_) => Class::Operator("serialization"),
        _ => Class::Transient("bigquery_client"),
    }
}

fn http_class(code: i64) -> Class {
    match code {
        408 => Class::Transient("http_408"),
        429 => Class::Transient("http_429"),
        500 => Class::Transient("http_500"),
        502 => Class::Transient("http_502"),
        503 => Class::Transient("http_503"),
        504 => Class::Transient("http_504"),
        501 | 505..=599 => Class::Transient("http_5xx"),
        _ => Class::Operator("http_error"),
    }
}

/// Classifies a Storage Write API status, as [`class`] does HTTP errors:
/// the same labels for the same causes. `INVALID_ARGUMENT` is not here: it
/// names rows or the schema, and the append path sorts it out.
pub fn grpc_class(status: &tonic::Status) -> Class {
    use tonic::Code;
    let message = status.message().to_ascii_lowercase();
    match status.code() {
        // Only the request size: a throughput quota also "Exceeds" (and
        // must be waited out, not split).
        Code::ResourceExhausted
            if message.contains("size cap")
                || message.contains("too large")
                || message.contains("request size") =>
        {
            Class::TooLarge
        }
        Code::ResourceExhausted => Class::Transient("rate_limited"),
        // Google's words for an append over 10 MB ("AppendRows request too
        // large: N limit 10485760"), often as the stream's status.
        Code::InvalidArgument if message.contains("request too large") => Class::TooLarge,
        Code::Unauthenticated => Class::Operator("unauthenticated"),
        Code::PermissionDenied => Class::Operator("permission_denied"),
        Code::NotFound => Class::Operator("not_found"),
        Code::InvalidArgument => Class::Operator("bad_request"),
        Code::FailedPrecondition => Class::Operator("failed_precondition"),
        // Not a Storage Write API (a REST port given as the gRPC endpoint).
        Code::Unimplemented => Class::Operator("unimplemented"),
        Code::DeadlineExceeded => Class::Transient("timeout"),
        Code::Unavailable => Class::Transient("unavailable"),
        Code::Aborted => Class::Transient("aborted"),
        Code::Internal => Class::Transient("internal"),
        Code::Cancelled => Class::Transient("cancelled"),
        _ => Class::Transient("grpc_error"),
    }
}

/// [`classify`] for a Storage Write API status.
pub fn classify_status(status: &tonic::Status, target: &Target) -> Failure {
    failure(
        grpc_class(status),
        describe_status(status),
        "Storage Write API",
        target,
    )
}

/// A Storage Write API status as one line: `gRPC NotFound: <message>`.
pub fn describe_status(status: &tonic::Status) -> String {
    format!("gRPC {:?}: {}", status.code(), status.message())
}

/// True when retrying the same call soon may succeed.
pub fn is_transient(err: &BQError) -> bool {
    matches!(class(err), Class::Transient(_))
}

/// The error as one line: `HTTP 403: <BigQuery's message>`, or the
/// transport error with its causes.
pub fn describe(err: &BQError) -> String {
    match err {
        BQError::ResponseError { error } => {
            format!("HTTP {}: {}", error.error.code, error.error.message)
        }
        BQError::RequestError(e) => {
            let mut text = if e.is_decode() {
                format!("an answer that is not BigQuery's JSON, such as a proxy's error page: {e}")
            } else {
                e.to_string()
            };
            let mut source = e.source();
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                if !text.contains(&cause_text) {
                    text.push_str(": ");
                    text.push_str(&cause_text);
                }
                source = cause.source();
            }
            text
        }
        other => other.to_string(),
    }
}

/// Turns an error of a call on `target` into what the write does next, with
/// a message that tells an operator what to fix.
pub fn classify(err: &BQError, target: &Target) -> Failure {
    failure(class(err), describe(err), "BigQuery", target)
}

/// What a call of `api` on `target` that failed as `class` (`what`
/// describes the error) leads to.
fn failure(class: Class, what: String, api: &str, target: &Target) -> Failure {
    match class {
        Class::TooLarge => Failure::TooLarge(what),
        Class::Transient(kind) => Failure::Sink(SinkError::transient(
            kind,
            anyhow!("{api} call on {target} failed ({what})"),
        )),
        Class::Operator(kind) => Failure::Sink(SinkError::unavailable(
            kind,
            operator_message(kind, &what, target),
        )),
    }
}

/// What an operator reads when the sink cannot go on by itself.
pub fn operator_message(kind: &str, what: &str, target: &Target) -> anyhow::Error {
    match kind {
        "unauthenticated" | "credentials" => anyhow!(
            "BigQuery did not accept the credentials ({what}); check GOOGLE_APPLICATION_CREDENTIALS \
             (--credentials) or the application default credentials"
        ),
        "permission_denied" => anyhow!(
            "BigQuery denied access to table {target} ({what}); the service account needs \
             roles/bigquery.dataEditor on dataset {}.{}",
            target.project,
            target.dataset
        ),
        "not_found" => anyhow!(
            "table {target} or its dataset was not found ({what}); it was deleted or renamed while \
             the sink was running: recreate it (restarting the sink creates the table)"
        ),
        _ => anyhow!("BigQuery refused a call on table {target} ({what})"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use gcp_bigquery_client::error::{NestedResponseError, ResponseError};

    use super::*;

    fn response(code: i64, message: &str, reason: &str) -> BQError {
        BQError::ResponseError {
            error: ResponseError {
                error: NestedResponseError {
                    code,
                    errors: vec![HashMap::from([("reason".to_owned(), reason.to_owned())])],
                    message: message.to_owned(),
                    status: String::new(),
                },
            },
        }
    }

    fn target() -> Target {
        Target {
            project: "p".into(),
            dataset: "d".into(),
            table: "t".into(),
        }
    }

    #[test]
    fn statuses_are_sorted() {
        let cases = [
            (429, "", "rateLimitExceeded", Class::Transient("http_429")),
            (500, "", "internalError", Class::Transient("http_500")),
            (503, "", "backendError", Class::Transient("http_503")),
            (599, "", "", Class::Transient("http_5xx")),
            (408, "", "", Class::Transient("http_408")),
            (
                403,
                "Exceeded rate limits",
                "rateLimitExceeded",
                Class::Transient("rate_limited"),
            ),
            (
                403,
                "Quota exceeded",
                "quotaExceeded",
                Class::Transient("rate_limited"),
            ),
            (
                403,
                "Access Denied",
                "accessDenied",
                Class::Operator("permission_denied"),
            ),
            (
                401,
                "Invalid Credentials",
                "authError",
                Class::Operator("unauthenticated"),
            ),
            (
                404,
                "Not found: Table p:d.t",
                "notFound",
                Class::Operator("not_found"),
            ),
            (
                400,
                "Invalid project",
                "invalid",
                Class::Operator("bad_request"),
            ),
            (413, "", "", Class::TooLarge),
            (
                400,
                "Request payload size exceeds the limit: 10485760 bytes.",
                "badRequest",
                Class::TooLarge,
            ),
            (
                400,
                "too many rows present in the request, limit: 50000",
                "invalid",
                Class::TooLarge,
            ),
        ];
        for (code, message, reason, want) in cases {
            assert_eq!(
                class(&response(code, message, reason)),
                want,
                "{code} {message}"
            );
        }
    }

    #[test]
    fn operators_are_told_what_to_fix() {
        let Failure::Sink(err) =
            classify(&response(403, "Access Denied", "accessDenied"), &target())
        else {
            panic!("not a sink error");
        };
        assert!(matches!(err, SinkError::Unavailable { .. }));
        let text = err.to_string();
        assert!(text.contains("roles/bigquery.dataEditor"), "{text}");
        assert!(text.contains("HTTP 403: Access Denied"), "{text}");

        let Failure::Sink(err) = classify(&response(404, "Not found", "notFound"), &target())
        else {
            panic!("not a sink error");
        };
        assert!(err.to_string().contains("p.d.t"), "{err}");

        let Failure::Sink(err) = classify(&response(503, "later", "backendError"), &target())
        else {
            panic!("not a sink error");
        };
        assert!(matches!(
            err,
            SinkError::Transient {
                kind: "http_503",
                ..
            }
        ));
    }

    #[tokio::test]
    async fn transport_errors_are_transient() {
        // Nothing listens on port 1 of loopback: connection refused.
        let client = reqwest::Client::new();
        let err = client.get("http://127.0.0.1:1/").send().await.unwrap_err();
        let err = BQError::RequestError(err);
        assert_eq!(class(&err), Class::Transient("connect"));
        assert!(is_transient(&err));
        assert!(describe(&err).contains("127.0.0.1:1"), "{}", describe(&err));
    }

    #[test]
    fn grpc_statuses_are_sorted_as_http_ones() {
        use tonic::{Code, Status};
        let class = |code, message: &str| grpc_class(&Status::new(code, message));
        assert_eq!(
            class(Code::Unavailable, "down"),
            Class::Transient("unavailable")
        );
        assert_eq!(class(Code::Internal, ""), Class::Transient("internal"));
        assert_eq!(class(Code::Aborted, ""), Class::Transient("aborted"));
        assert_eq!(
            class(Code::DeadlineExceeded, ""),
            Class::Transient("timeout")
        );
        assert_eq!(
            class(Code::ResourceExhausted, "quota"),
            Class::Transient("rate_limited")
        );
        assert_eq!(
            class(
                Code::ResourceExhausted,
                "Exceeds 'AppendRows throughput' quota, user_id: x (status: INSUFFICIENT_TOKENS)"
            ),
            Class::Transient("rate_limited")
        );
        assert_eq!(
            class(
                Code::ResourceExhausted,
                "AppendRowsRequest exceeds the 10485760-byte size cap"
            ),
            Class::TooLarge
        );
        assert_eq!(
            class(
                Code::InvalidArgument,
                "AppendRows request too large: 10485800 limit 10485760"
            ),
            Class::TooLarge
        );
        assert_eq!(
            class(Code::InvalidArgument, "Input schema has more fields"),
            Class::Operator("bad_request")
        );
        assert_eq!(
            class(Code::PermissionDenied, ""),
            Class::Operator("permission_denied")
        );
        assert_eq!(
            class(Code::Unauthenticated, ""),
            Class::Operator("unauthenticated")
        );
        assert_eq!(class(Code::NotFound, ""), Class::Operator("not_found"));
        let Failure::Sink(err) = classify_status(&Status::permission_denied("no"), &target())
        else {
            panic!("not too large")
        };
        assert!(
            err.to_string().contains("roles/bigquery.dataEditor"),
            "{err}"
        );
    }

    #[test]
    fn credential_problems_need_an_operator() {
        assert_eq!(class(&BQError::NoToken), Class::Operator("credentials"));
    }
}

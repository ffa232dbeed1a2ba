//! Sorting Redis errors: what passes on its own (retried with backoff), what
//! needs an operator (readiness false until fixed). Nothing here drops data:
//! every class is retried.

use redis::{ErrorKind, RedisError};
use sink_core::SinkError;

/// Sorts Redis errors: anything about reaching the server is transient;
/// errors an operator must fix (memory, a read-only replica, a key of the
/// wrong type, auth) make the sink unavailable until fixed.
pub fn classify(err: RedisError) -> SinkError {
    // A certificate refused on a reconnect (the server's rotated to another
    // CA, ours expired: the files are read at start): the operator must act.
    if let Some(why) = tls_refusal(&err) {
        return SinkError::unavailable("redis_tls", anyhow::anyhow!("{why} (then restart)"));
    }
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
        // Cluster events that pass by themselves: a failover under way, a
        // slot moving (redis-rs follows the redirects a few times first).
        (_, Some("CLUSTERDOWN")) => return SinkError::transient("redis_cluster_down", err),
        (_, Some("TRYAGAIN")) => return SinkError::transient("redis_try_again", err),
        (_, Some("MOVED" | "ASK")) => return SinkError::transient("redis_moved", err),
        // Keys of one command in different slots: a bug, no retry helps.
        (_, Some("CROSSSLOT")) => "redis_cross_slot",
        (_, Some("MISCONF")) => "redis_misconf",
        _ => return SinkError::transient("redis_unreachable", err),
    };
    SinkError::unavailable(kind, err)
}

/// Error kinds after which a cluster connection is opened anew (the
/// connection may be the one stuck).
pub const CLUSTER_STUCK: &[&str] = &["redis_unreachable", "redis_cluster_down", "redis_moved"];

/// Of the errors of one write's concurrent requests (one per primary), the
/// one to report: one that needs an operator before any transient one, then
/// one after which the connections are opened anew, so that neither hides
/// behind, say, a slot being moved on another primary. `Ok` if none failed.
pub fn to_report(
    results: impl IntoIterator<Item = Result<(), SinkError>>,
) -> Result<(), SinkError> {
    let rank = |err: &SinkError| match err {
        SinkError::Unavailable { .. } => 0,
        _ if CLUSTER_STUCK.contains(&err.kind()) => 1,
        _ => 2,
    };
    match results.into_iter().filter_map(Result::err).min_by_key(rank) {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// What to fix when `err` is a TLS handshake that no retry can mend: the
/// server's certificate is not trusted, or the server refused ours (or
/// asked for one we lack). Other TLS failures are left to the retries.
pub fn tls_refusal(err: &RedisError) -> Option<String> {
    use rustls::AlertDescription as Alert;
    // redis-rs keeps the io::Error from the handshake behind an Arc; the
    // io::Error holds rustls's own error.
    let source = std::error::Error::source(err)?;
    let inner = source.downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>()?;
    let io = inner.downcast_ref::<std::io::Error>()?;
    match io.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(why) => Some(format!(
            "Redis's TLS certificate is not trusted ({why:?}): give the CA that signs it with \
             --redis-ca-file (REDIS_CA_FILE), and check that the URL's host is a name the \
             certificate holds in its subjectAltName"
        )),
        rustls::Error::AlertReceived(alert @ Alert::CertificateRequired) => Some(format!(
            "Redis asks for a client certificate ({alert:?}): give one its CA trusts with \
             --redis-cert-file (REDIS_CERT_FILE) and --redis-key-file (REDIS_KEY_FILE)"
        )),
        // What a TLS 1.2 server (OpenSSL) answers a missing client
        // certificate with, and what it answers no common version or cipher.
        rustls::Error::AlertReceived(alert @ Alert::HandshakeFailure) => Some(format!(
            "Redis refused the TLS handshake ({alert:?}): if it asks for client certificates \
             (tls-auth-clients), give one its CA trusts with --redis-cert-file (REDIS_CERT_FILE) \
             and --redis-key-file (REDIS_KEY_FILE); else its tls-protocols / tls-ciphers allow \
             nothing this client speaks (TLS 1.2 or 1.3)"
        )),
        rustls::Error::AlertReceived(alert @ Alert::ProtocolVersion) => Some(format!(
            "Redis speaks no TLS version this client does ({alert:?}): allow TLS 1.2 or 1.3 \
             in its tls-protocols"
        )),
        rustls::Error::PeerIncompatible(why) => Some(format!(
            "Redis speaks no TLS version or cipher this client does ({why:?}): allow TLS 1.2 \
             or 1.3 in its tls-protocols"
        )),
        rustls::Error::AlertReceived(
            alert @ (Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::UnsupportedCertificate),
        ) => Some(format!(
            "Redis refused this client's certificate ({alert:?}): give one signed by a CA it \
             trusts (tls-ca-cert-file), unexpired, with --redis-cert-file (REDIS_CERT_FILE) and \
             --redis-key-file (REDIS_KEY_FILE)"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error chain redis-rs builds from a failed handshake, as seen
    /// in the end-to-end test: this breaks if redis-rs stops wrapping it so
    /// (or pins another rustls), instead of TLS refusals turning into
    /// endless "not reachable" retries unnoticed.
    fn handshake_error(tls: rustls::Error) -> RedisError {
        RedisError::from(std::io::Error::new(std::io::ErrorKind::InvalidData, tls))
    }

    #[test]
    fn refused_certificates_name_the_flag_to_fix_and_stop_the_sink() {
        let untrusted = handshake_error(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert!(tls_refusal(&untrusted).is_some_and(|why| why.contains("--redis-ca-file")));
        let required = handshake_error(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired,
        ));
        assert!(tls_refusal(&required).is_some_and(|why| why.contains("--redis-cert-file")));
        // TLS 1.2: a missing client certificate is a plain handshake failure.
        let tls12 = handshake_error(rustls::Error::AlertReceived(
            rustls::AlertDescription::HandshakeFailure,
        ));
        assert!(tls_refusal(&tls12).is_some_and(|why| why.contains("--redis-cert-file")));
        let sorted = classify(required);
        assert_eq!(sorted.kind(), "redis_tls");
        assert!(matches!(sorted, SinkError::Unavailable { .. }));
    }

    #[test]
    fn of_several_errors_the_one_needing_an_operator_or_a_reconnect_is_reported() {
        let moving = || {
            Err(SinkError::transient(
                "redis_slot_moving",
                anyhow::anyhow!("ASK"),
            ))
        };
        let stuck = || {
            Err(SinkError::transient(
                "redis_unreachable",
                anyhow::anyhow!("timeout"),
            ))
        };
        let oom = || Err(SinkError::unavailable("redis_oom", anyhow::anyhow!("OOM")));
        let kind = |r: Result<(), SinkError>| r.map_err(|e| e.kind());
        assert_eq!(kind(to_report([Ok(()), Ok(())])), Ok(()));
        assert_eq!(
            kind(to_report([moving(), stuck()])),
            Err("redis_unreachable")
        );
        assert_eq!(
            kind(to_report([stuck(), moving()])),
            Err("redis_unreachable")
        );
        assert_eq!(
            kind(to_report([moving(), stuck(), oom()])),
            Err("redis_oom")
        );
        assert_eq!(
            kind(to_report([Ok(()), moving()])),
            Err("redis_slot_moving")
        );
    }

    #[test]
    fn other_tls_failures_are_retried() {
        let other = handshake_error(rustls::Error::AlertReceived(
            rustls::AlertDescription::InternalError,
        ));
        assert!(tls_refusal(&other).is_none());
        assert_eq!(classify(other).kind(), "redis_unreachable");
    }
}

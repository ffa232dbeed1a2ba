//! Google's token endpoints, played on loopback: the OAuth token endpoint a
//! service-account key names (`token_uri`), the Security Token Service and
//! the IAM Credentials impersonation endpoint an `external_account` file
//! names (Workload Identity Federation), and the metadata server
//! (GCE_METADATA_HOST); and an OIDC identity provider's token endpoint, as
//! librdkafka's OAUTHBEARER/OIDC asks it (`/oidc`). Each answers with a token
//! of its own and records what it was sent, so a test can tell which path
//! gave the token.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::json;

use crate::bigquery::read_request;

/// The token each endpoint hands out.
pub const SERVICE_ACCOUNT_TOKEN: &str = "token-from-a-service-account-key";
/// The federated token the Security Token Service returns.
pub const STS_TOKEN: &str = "token-from-sts";
/// The service account's token the impersonation endpoint returns.
pub const IMPERSONATED_TOKEN: &str = "token-from-impersonation";
/// The metadata server's token.
pub const METADATA_TOKEN: &str = "token-from-the-metadata-server";
/// The identity provider's token: a JWT (unsigned), whose `exp` and `sub`
/// librdkafka reads.
pub const OIDC_TOKEN: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJtb3ZpZWxvZy1zaW5rIiwiaWF0IjoxNzAwMDAwMDAwLCJleHAiOjQxMDI0NDQ4MDB9.c2ln";

/// One request received: method and path, the headers, the body.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `POST /sts`.
    pub line: String,
    /// `name: value` lines.
    pub headers: Vec<String>,
    /// The body as text.
    pub body: String,
}

/// The fake endpoints on `127.0.0.1:<free port>`; stops when dropped.
pub struct FakeGoogle {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeGoogle {
    /// Starts serving.
    pub fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        std::thread::Builder::new()
            .name("fake-google".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    // A request the fake cannot read fails the token fetch,
                    // which the test sees.
                    let _ = answer(stream, &record);
                    if Arc::strong_count(&record) == 1 {
                        return;
                    }
                }
            })?;
        Ok(Self { addr, seen })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`, as GCE_METADATA_HOST takes it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The requests whose line starts with `prefix` (`POST /sts`).
    pub fn seen_at(&self, prefix: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.line.starts_with(prefix))
            .collect()
    }

    /// Writes an `external_account` file whose subject token is the file
    /// `subject_token_file` (as a projected Kubernetes service-account token
    /// or an OIDC token is), exchanged at this fake's STS and then
    /// impersonated into a service account.
    pub fn write_external_account(
        &self,
        path: &Path,
        subject_token_file: &Path,
    ) -> anyhow::Result<()> {
        let url = self.url();
        let file = json!({
            "type": "external_account",
            "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/pool/providers/provider",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": format!("{url}/sts"),
            "service_account_impersonation_url": format!("{url}/impersonate/sink@p.iam.gserviceaccount.com:generateAccessToken"),
            "credential_source": {"file": subject_token_file.display().to_string()},
        });
        std::fs::write(path, serde_json::to_vec_pretty(&file)?)?;
        Ok(())
    }
}

impl Drop for FakeGoogle {
    fn drop(&mut self) {
        // Wake the accept loop so that it sees it is alone and returns.
        let _ = TcpStream::connect(self.addr);
    }
}

fn answer(mut stream: TcpStream, seen: &Mutex<Vec<Seen>>) -> anyhow::Result<()> {
    let Some(request) = read_request(&mut stream)? else {
        return Ok(());
    };
    let line = request.head.first().cloned().unwrap_or_default();
    let path = request.path().to_owned();
    seen.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Seen {
            line: line.clone(),
            headers: request.head.iter().skip(1).cloned().collect(),
            body: String::from_utf8_lossy(&request.body).into_owned(),
        });
    let (status, body) = if path.starts_with("/oidc") {
        (
            200,
            json!({"access_token": OIDC_TOKEN, "token_type": "Bearer", "expires_in": 3600}),
        )
    } else if path.starts_with("/token") {
        (
            200,
            json!({"access_token": SERVICE_ACCOUNT_TOKEN, "token_type": "Bearer", "expires_in": 3600}),
        )
    } else if path.starts_with("/sts") {
        (
            200,
            json!({
                "access_token": STS_TOKEN,
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                "token_type": "Bearer",
                "expires_in": 3600,
            }),
        )
    } else if path.starts_with("/impersonate/") {
        (
            200,
            json!({"accessToken": IMPERSONATED_TOKEN, "expireTime": "2099-01-01T00:00:00Z"}),
        )
    } else if path.starts_with("/computeMetadata/v1/instance/service-accounts/default/token")
        && request.header("metadata-flavor") == Some("Google")
    {
        (
            200,
            json!({"access_token": METADATA_TOKEN, "token_type": "Bearer", "expires_in": 3600}),
        )
    } else {
        (404, json!({"error": "not_found", "path": path}))
    };
    let body = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

//! Building the BigQuery client: credentials, endpoint, HTTP settings.
//!
//! - Google's endpoint: a service-account key file (or an authorized-user
//!   file) named by GOOGLE_APPLICATION_CREDENTIALS, or application default
//!   credentials, through the client crate's builders.
//! - `--bigquery-endpoint`: a BigQuery-compatible REST API such as the
//!   emulator, with a static token. Idle connections are not reused there:
//!   the emulator closes a connection after answering 500, and the next
//!   request on it would fail with a reset.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::client_builder::ClientBuilder;
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::Client;

use crate::config::Settings;

/// Connecting a socket to BigQuery: past this, the attempt is retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The token sent to a `--bigquery-endpoint` (the emulator checks none).
const STATIC_TOKEN: &str = "bigquery-sink-static-token";

/// Hands out a fixed bearer token.
#[derive(Clone)]
struct StaticToken;

impl Authenticator for StaticToken {
    // `Authenticator` is an `async_trait`; this is its desugared signature.
    fn access_token<'life0, 'async_trait>(
        &'life0 self,
    ) -> Pin<Box<dyn Future<Output = Result<String, BQError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async { Ok(STATIC_TOKEN.to_owned()) })
    }
}

/// The client for `settings`. Loads credentials but sends nothing yet.
///
/// # Errors
///
/// An unreadable or unsupported credentials file.
pub async fn connect(settings: &Settings) -> anyhow::Result<Client> {
    let mut http = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(settings.request_timeout)
        .user_agent(concat!("bigquery-sink/", env!("CARGO_PKG_VERSION")));
    if settings.endpoint.is_some() {
        http = http.pool_max_idle_per_host(0);
    }
    let http = http.build().context("cannot build the HTTP client")?;
    let mut builder = ClientBuilder::new();
    builder.with_client(http);

    if let Some(endpoint) = &settings.endpoint {
        builder.with_v2_base_url(endpoint.clone());
        if settings.credentials.is_some() {
            tracing::info!(
                "--bigquery-endpoint is set: sending a static token, not the credentials file"
            );
        }
        return builder
            .build_from_authenticator(Arc::new(StaticToken))
            .await
            .context("cannot build the BigQuery client");
    }
    match &settings.credentials {
        Some(path) => from_file(&builder, path).await,
        None => builder
            .build_from_application_default_credentials()
            .await
            .context(
                "no application default credentials: set GOOGLE_APPLICATION_CREDENTIALS (--credentials) \
                 to a service-account key file, or run where the metadata server answers",
            ),
    }
}

async fn from_file(builder: &ClientBuilder, path: &Path) -> anyhow::Result<Client> {
    let shown = path.display();
    let text = tokio::fs::read_to_string(path).await.with_context(|| {
        format!("cannot read the credentials file {shown} (GOOGLE_APPLICATION_CREDENTIALS)")
    })?;
    #[derive(serde::Deserialize)]
    struct Kind {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    let kind = serde_json::from_str::<Kind>(&text)
        .with_context(|| format!("the credentials file {shown} is not a JSON key file"))?
        .kind
        .unwrap_or_default();
    let Some(path_text) = path.to_str() else {
        bail!("the credentials file path {shown} is not valid UTF-8");
    };
    let client = match kind.as_str() {
        "service_account" => builder.build_from_service_account_key_file(path_text).await,
        "authorized_user" => builder.build_from_authorized_user_authenticator(path).await,
        other => bail!(
            "the credentials file {shown} holds {other:?} credentials; use a service-account key file \
             (\"type\": \"service_account\") or an authorized-user file"
        ),
    };
    client.with_context(|| format!("cannot load the credentials in {shown}"))
}

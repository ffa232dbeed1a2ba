//! Building the BigQuery client: credentials ([`crate::credentials`]),
//! endpoint, HTTP settings.
//!
//! `--bigquery-endpoint`: a BigQuery-compatible REST API such as the
//! emulator. Idle connections are not reused there: the emulator closes a
//! connection after answering 500, and the next request on it would fail
//! with a reset.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::client_builder::ClientBuilder;
use gcp_bigquery_client::Client;

use crate::config::Settings;
use crate::credentials;

/// Connecting a socket to BigQuery: past this, the attempt is retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The REST client for `settings`, and its token source (which the Storage
/// Write API's calls use too). Loads credentials but sends nothing yet.
///
/// # Errors
///
/// An unreadable or unsupported credentials file.
pub async fn connect(settings: &Settings) -> anyhow::Result<(Client, Arc<dyn Authenticator>)> {
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
    }
    let auth = credentials::authenticator(
        settings.credentials.as_deref(),
        settings.endpoint.as_deref(),
        &credentials::AdcPlaces::from_env(),
        settings.request_timeout,
    )
    .await?;
    let client = builder
        .build_from_authenticator(Arc::clone(&auth))
        .await
        .context("cannot build the BigQuery client")?;
    Ok((client, auth))
}

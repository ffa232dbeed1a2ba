//! Google credentials: where bigquery-sink gets its OAuth tokens.
//!
//! In the order Google's client libraries look (Application Default
//! Credentials):
//!
//! 1. `--credentials` / GOOGLE_APPLICATION_CREDENTIALS: a JSON file whose
//!    `type` says what it is: a service-account key (`service_account`), a
//!    `gcloud auth application-default login` user (`authorized_user`), or
//!    Workload Identity Federation (`external_account`: a token from AWS
//!    IMDSv2 is not supported, a file or URL source is: Kubernetes, Azure,
//!    GitHub and other OIDC issuers);
//! 2. gcloud's own file (`$CLOUDSDK_CONFIG` or
//!    `~/.config/gcloud/application_default_credentials.json`), of the same
//!    kinds;
//! 3. the metadata server of the VM or GKE node (GKE Workload Identity), at
//!    GCE_METADATA_HOST when set (as Google's libraries honour it).
//!
//! yup-oauth2 fetches, caches and refreshes every kind of token. A
//! `--bigquery-endpoint` gets the credentials file if one is given; without
//! one, an `https://` endpoint (a private endpoint) gets what Application
//! Default Credentials find, and an `http://` one (the emulator, which
//! checks none) a static token: no real token is sent in clear unless a
//! file was named for it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::yup_oauth2::authenticator::{
    ApplicationDefaultCredentialsTypes, Authenticator as YupAuthenticator,
};
use gcp_bigquery_client::yup_oauth2::{
    self, ApplicationDefaultCredentialsAuthenticator, ApplicationDefaultCredentialsFlowOpts,
    AuthorizedUserAuthenticator, DefaultHyperClientBuilder, ExternalAccountAuthenticator,
    HyperClientBuilder, ServiceAccountAuthenticator,
};

/// The OAuth scope of BigQuery.
const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";

/// The token sent to a `--bigquery-endpoint` without credentials.
const STATIC_TOKEN: &str = "bigquery-sink-static-token";

/// The token source for `credentials` (a file) or, without one, what
/// Application Default Credentials find in `adc`; a static token for a
/// plaintext `endpoint` without a file. Reads files, sends nothing yet: a
/// token is fetched at the first request, and refreshed before it expires.
/// Token requests give up after `timeout`.
pub async fn authenticator(
    credentials: Option<&Path>,
    endpoint: Option<&str>,
    adc: &AdcPlaces,
    timeout: Duration,
) -> anyhow::Result<Arc<dyn Authenticator>> {
    let plaintext = endpoint.is_some_and(|url| url.starts_with("http://"));
    if let Some(path) = credentials {
        if plaintext {
            tracing::warn!(
                credentials = %path.display(),
                "--bigquery-endpoint is plain http://: the credentials' tokens are sent in clear"
            );
        }
        let what = "--credentials (GOOGLE_APPLICATION_CREDENTIALS)";
        return from_file(path, what, timeout).await;
    }
    if plaintext {
        tracing::info!("--bigquery-endpoint is plain http:// and no --credentials: a static token");
        return Ok(Arc::new(StaticToken));
    }
    if let Some(path) = adc.gcloud_file.as_deref().filter(|p| p.is_file()) {
        tracing::info!(file = %path.display(), "using gcloud's application default credentials");
        return from_file(path, "gcloud's application default credentials", timeout).await;
    }
    tracing::info!("no credentials file: tokens from the metadata server");
    metadata_server(adc.metadata_host.as_deref(), timeout).await
}

/// What yup-oauth2 cannot do with an `external_account` file, said at
/// start: it would refuse to parse AWS and executable sources, and send a
/// whole JSON file as the subject token.
fn unsupported_source(text: &str) -> Option<&'static str> {
    let file: serde_json::Value = serde_json::from_str(text).ok()?;
    let source = &file["credential_source"];
    if source.get("environment_id").is_some() {
        Some(
            "its credential_source reads AWS's metadata (environment_id aws1), which is not \
             supported: on EKS, use the web identity token file (AWS_WEB_IDENTITY_TOKEN_FILE) \
             as a file source",
        )
    } else if source.get("executable").is_some() {
        Some("its credential_source runs an executable, which is not supported: use a file or URL source")
    } else if source.get("file").is_some() && source["format"]["type"] == "json" {
        Some(
            "its file credential_source has format json, which is not supported: use a file \
             holding only the token (format text)",
        )
    } else {
        None
    }
}

/// Where Application Default Credentials look after the credentials file,
/// read from the environment once ([`AdcPlaces::from_env`]).
#[derive(Debug, Clone, Default)]
pub struct AdcPlaces {
    /// gcloud's `application_default_credentials.json`.
    pub gcloud_file: Option<PathBuf>,
    /// GCE_METADATA_HOST: the metadata server's `host:port`, when not the
    /// usual one.
    pub metadata_host: Option<String>,
}

impl AdcPlaces {
    /// gcloud's file in `$CLOUDSDK_CONFIG` or `~/.config/gcloud`, and
    /// GCE_METADATA_HOST.
    pub fn from_env() -> Self {
        let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let gcloud_dir = non_empty("CLOUDSDK_CONFIG")
            .map(PathBuf::from)
            .or_else(|| non_empty("HOME").map(|home| PathBuf::from(home).join(".config/gcloud")));
        Self {
            gcloud_file: gcloud_dir.map(|dir| dir.join("application_default_credentials.json")),
            metadata_host: non_empty("GCE_METADATA_HOST").and_then(|host| host.into_string().ok()),
        }
    }
}

/// A credentials file, by its `type`.
async fn from_file(
    path: &Path,
    what: &str,
    timeout: Duration,
) -> anyhow::Result<Arc<dyn Authenticator>> {
    let shown = path.display();
    let text = tokio::fs::read_to_string(path)
        .await
        .with_context(|| format!("cannot read {what} {shown}"))?;
    #[derive(serde::Deserialize)]
    struct Kind {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    let kind = serde_json::from_str::<Kind>(&text)
        .with_context(|| format!("{what} {shown} is not a JSON credentials file"))?
        .kind
        .unwrap_or_default();
    let cannot_load = || format!("cannot load the credentials in {shown} ({kind})");
    let token = match kind.as_str() {
        "service_account" => {
            let key = yup_oauth2::parse_service_account_key(&text).with_context(cannot_load)?;
            let builder = ServiceAccountAuthenticator::builder(key).with_timeout(timeout);
            YupToken(builder.build().await.with_context(cannot_load)?)
        }
        "authorized_user" => {
            let secret = yup_oauth2::read_authorized_user_secret(path)
                .await
                .with_context(cannot_load)?;
            let builder = AuthorizedUserAuthenticator::builder(secret).with_timeout(timeout);
            YupToken(builder.build().await.with_context(cannot_load)?)
        }
        "external_account" => {
            if let Some(why) = unsupported_source(&text) {
                bail!("{}: {why}", cannot_load());
            }
            let secret = serde_json::from_str(&text).with_context(cannot_load)?;
            let builder = ExternalAccountAuthenticator::builder(secret).with_timeout(timeout);
            YupToken(builder.build().await.with_context(cannot_load)?)
        }
        other => bail!(
            "{what} {shown} holds {other:?} credentials; use a service-account key \
             (\"type\": \"service_account\"), an authorized-user file (gcloud auth \
             application-default login) or an external_account file (Workload Identity \
             Federation)"
        ),
    };
    Ok(Arc::new(token))
}

/// The metadata server's token of the VM's (or the GKE workload's) service
/// account.
async fn metadata_server(
    host: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Arc<dyn Authenticator>> {
    let metadata_url = host.map(|host| {
        format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/token")
    });
    let opts = ApplicationDefaultCredentialsFlowOpts { metadata_url };
    match ApplicationDefaultCredentialsAuthenticator::builder(opts).await {
        ApplicationDefaultCredentialsTypes::InstanceMetadata(builder) => Ok(Arc::new(YupToken(
            builder
                .with_timeout(timeout)
                .build()
                .await
                .context("cannot set up the metadata server's credentials")?,
        ))),
        // yup takes this branch whenever the variable is set, even empty
        // (an empty --credentials is read as unset).
        ApplicationDefaultCredentialsTypes::ServiceAccount(_) => bail!(
            "GOOGLE_APPLICATION_CREDENTIALS is set but empty: unset it to use the metadata \
             server, or point it at a credentials file"
        ),
    }
}

/// The connector yup-oauth2's default builder makes (HTTPS or HTTP).
type YupConnector = <DefaultHyperClientBuilder as HyperClientBuilder>::Connector;

/// A yup-oauth2 authenticator as the client crate's [`Authenticator`]:
/// yup caches the token and refreshes it a minute before it expires.
#[derive(Clone)]
struct YupToken(YupAuthenticator<YupConnector>);

impl Authenticator for YupToken {
    // `Authenticator` is an `async_trait`; this is its desugared signature.
    fn access_token<'life0, 'async_trait>(
        &'life0 self,
    ) -> Pin<Box<dyn Future<Output = Result<String, BQError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let token = self.0.token(&[SCOPE]).await?;
            token.token().map(str::to_owned).ok_or(BQError::NoToken)
        })
    }
}

/// Hands out a fixed bearer token.
#[derive(Clone)]
struct StaticToken;

impl Authenticator for StaticToken {
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

//! Where bigquery-sink's OAuth tokens come from, for each kind of Google
//! credentials, against Google's token endpoints played on loopback
//! ([`FakeGoogle`]). Workload Identity Federation is tested end to end in
//! `bigquery_sink.rs`; an authorized-user file (gcloud's) refreshes at a
//! fixed Google address, so only its loading is tested here.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use bigquery_sink::credentials::{authenticator, AdcPlaces};
use e2e::fake_google::{FakeGoogle, METADATA_TOKEN, SERVICE_ACCOUNT_TOKEN};
use e2e::{unique, Stack};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(10);

fn dir() -> anyhow::Result<PathBuf> {
    let dir = Stack::get()?.dir.join(unique("credentials"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A service-account key file whose `token_uri` is `google`'s; its RSA key
/// made by openssl (ring, which rcgen uses, cannot make RSA keys; stack.sh
/// installs stunnel4, which brings openssl).
fn service_account_key(google: &FakeGoogle) -> anyhow::Result<PathBuf> {
    let dir = dir()?;
    let pem = dir.join("key.pem");
    let made = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&pem)
        .output()?;
    anyhow::ensure!(
        made.status.success(),
        "openssl genpkey: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let key = json!({
        "type": "service_account",
        "project_id": "p",
        "private_key_id": "1",
        "private_key": std::fs::read_to_string(&pem)?,
        "client_email": "sink@p.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": format!("{}/token", google.url()),
    });
    let path = dir.join("key.json");
    std::fs::write(&path, key.to_string())?;
    Ok(path)
}

#[tokio::test]
async fn a_service_account_key_gets_its_token_from_its_token_uri() -> anyhow::Result<()> {
    let google = FakeGoogle::start()?;
    let key = service_account_key(&google)?;
    let auth = authenticator(Some(&key), None, &AdcPlaces::default(), TIMEOUT).await?;
    assert_eq!(auth.access_token().await?, SERVICE_ACCOUNT_TOKEN);
    // A second call is served from yup's cache.
    assert_eq!(auth.access_token().await?, SERVICE_ACCOUNT_TOKEN);
    let grants = google.seen_at("POST /token");
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert!(
        grants[0].body.contains("grant-type%3Ajwt-bearer"),
        "{grants:?}"
    );
    Ok(())
}

/// Without a credentials file, and no gcloud file either: the metadata
/// server (at GCE_METADATA_HOST), for Google's endpoint and for a private
/// `https://` endpoint alike; a plaintext `http://` endpoint (the emulator)
/// gets a static token and the metadata server is not asked.
#[tokio::test]
async fn without_a_file_the_metadata_server_gives_the_token() -> anyhow::Result<()> {
    let google = FakeGoogle::start()?;
    let adc = AdcPlaces {
        gcloud_file: Some(dir()?.join("application_default_credentials.json")),
        metadata_host: Some(google.host()),
    };
    // yup-oauth2 takes the metadata server only while this is unset.
    if std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").is_some() {
        std::env::remove_var("GOOGLE_APPLICATION_CREDENTIALS");
    }
    for endpoint in [None, Some("https://bigquery.private.example")] {
        let auth = authenticator(None, endpoint, &adc, TIMEOUT).await?;
        assert_eq!(auth.access_token().await?, METADATA_TOKEN, "{endpoint:?}");
    }
    let path = "GET /computeMetadata/v1/instance/service-accounts/default/token";
    assert_eq!(google.seen_at(path).len(), 2, "{:?}", google.seen());

    let auth = authenticator(None, Some("http://127.0.0.1:9050"), &adc, TIMEOUT).await?;
    assert_ne!(auth.access_token().await?, METADATA_TOKEN);
    assert_eq!(
        google.seen_at(path).len(),
        2,
        "the emulator got no real token"
    );
    Ok(())
}

/// What `authenticator` makes of the credentials file holding `file`: Ok,
/// or the error's text.
async fn load(file: serde_json::Value) -> anyhow::Result<Result<(), String>> {
    let path = dir()?.join("credentials.json");
    std::fs::write(&path, file.to_string())?;
    Ok(
        authenticator(Some(&path), None, &AdcPlaces::default(), TIMEOUT)
            .await
            .map(drop)
            .map_err(|e| format!("{e:#}")),
    )
}

#[tokio::test]
async fn an_authorized_user_file_loads_and_unknown_kinds_are_named() -> anyhow::Result<()> {
    let user = json!({"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r"});
    assert_eq!(load(user).await?, Ok(()));

    let federation = |source: serde_json::Value| {
        json!({
            "type": "external_account",
            "audience": "a",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": "https://sts.googleapis.com/v1/token",
            "credential_source": source,
        })
    };
    for (file, says) in [
        (
            json!({"type": "impersonated_service_account"}),
            "impersonated_service_account",
        ),
        (
            federation(
                json!({"file": "/var/run/token.json", "format": {"type": "json", "subject_token_field_name": "t"}}),
            ),
            "format json",
        ),
        (
            federation(json!({"environment_id": "aws1", "region_url": "http://169.254.169.254/x"})),
            "aws1",
        ),
    ] {
        let refused = load(file).await?;
        assert!(
            refused.as_ref().is_err_and(|err| err.contains(says)),
            "{refused:?}"
        );
    }
    Ok(())
}

//! How to reach Redis: the URL, plus the password and TLS material that can
//! come from mounted files (a Kubernetes Secret volume) instead of the URL,
//! so that no secret has to sit in an environment variable.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use redis::cluster::ClusterClient;
use redis::{ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates};
use sink_core::config::redact_url;

/// The flags that say where Redis is and how to prove who we are; shared by
/// `run`, `top` and `history`.
#[derive(Clone, Args)]
#[command(next_help_heading = "Redis")]
pub struct RedisAccess {
    /// Redis URL: redis://[user[:password]@]host:port[/db], or rediss:// for TLS. For a Redis Cluster (detected by itself), one or more of its nodes, comma-separated.
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// File holding the Redis password (e.g. a mounted Secret); replaces any password in the URL. A trailing newline is ignored.
    #[arg(long, env = "REDIS_PASSWORD_FILE", value_name = "PATH")]
    pub redis_password_file: Option<PathBuf>,
    /// PEM file of the CA certificate(s) that sign the server's certificate, trusted instead of the public roots (rediss:// only).
    #[arg(long, env = "REDIS_CA_FILE", value_name = "PATH")]
    pub redis_ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS (rediss:// only); needs --redis-key-file.
    #[arg(long, env = "REDIS_CERT_FILE", value_name = "PATH")]
    pub redis_cert_file: Option<PathBuf>,
    /// PEM private key of --redis-cert-file.
    #[arg(long, env = "REDIS_KEY_FILE", value_name = "PATH")]
    pub redis_key_file: Option<PathBuf>,
}

/// The URL's password masked: these settings may end up in a log.
impl std::fmt::Debug for RedisAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisAccess")
            .field(
                "redis_url",
                &self.urls().map(redact_url).collect::<Vec<_>>(),
            )
            .field("redis_password_file", &self.redis_password_file)
            .field("redis_ca_file", &self.redis_ca_file)
            .field("redis_cert_file", &self.redis_cert_file)
            .field("redis_key_file", &self.redis_key_file)
            .finish()
    }
}

impl RedisAccess {
    /// Access by URL alone (tests, tools).
    pub fn url(url: impl Into<String>) -> Self {
        Self {
            redis_url: url.into(),
            redis_password_file: None,
            redis_ca_file: None,
            redis_cert_file: None,
            redis_key_file: None,
        }
    }

    /// The URLs in `--redis-url`: one, or a cluster's seed nodes.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.redis_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
    }

    /// The client of the first URL, with the files read. Every error names
    /// the flag to fix and never holds a file's contents.
    pub fn client(&self) -> anyhow::Result<redis::Client> {
        self.clients()?
            .into_iter()
            .next()
            .context("--redis-url (REDIS_URL) is empty: give the URL of Redis")
    }

    /// A client per URL, with the files read.
    pub fn clients(&self) -> anyhow::Result<Vec<redis::Client>> {
        let tls = self.tls()?;
        let clients = self
            .infos()?
            .into_iter()
            .map(|info| match &tls {
                None => redis::Client::open(info).context("--redis-url (REDIS_URL)"),
                Some(tls) => redis::Client::build_with_tls(info, tls.clone()).context(
                    "cannot use the Redis TLS files (--redis-ca-file, --redis-cert-file, --redis-key-file)",
                ),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(
            !clients.is_empty(),
            "--redis-url (REDIS_URL) is empty: give the URL of Redis"
        );
        Ok(clients)
    }

    /// A cluster client seeded with every URL, with the files read.
    pub fn cluster_client(&self) -> anyhow::Result<ClusterClient> {
        // A few quick retries inside redis-rs (redirects after a slot
        // moved, a refreshed slot map after a failover), then the error
        // reaches sink-core, which retries it with backoff where it shows
        // (`sink_retries_total`, readiness): redis-rs's defaults (16 tries,
        // waits growing to 655 s) hid a failing write for minutes. The
        // overall bound also ends a request stuck in redis-rs 1.8's
        // connection, which after a failover under load stops answering
        // for good (see `client::Reopen`).
        self.cluster_client_with(5, Duration::from_secs(5), Duration::from_secs(10))
    }

    /// The cluster client for the sink's history pipelines (one per
    /// primary, holding keys of many slots): redis-rs retries nothing. On a
    /// redirect it would send the whole pipeline again to the new node,
    /// after `ASKING` for the first command only, and while a slot moves
    /// that writes a key that is still on the old node onto the new one,
    /// which blocks the move (MIGRATE: BUSYKEY). The sink retries such a
    /// write itself instead. Each pipeline may end in `WAIT` (up to
    /// [`MAX_WAIT_MS`], after those of the batches before it on the node's
    /// connection), hence the longer bounds.
    pub fn pipeline_cluster_client(&self) -> anyhow::Result<ClusterClient> {
        self.cluster_client_with(0, Duration::from_secs(20), Duration::from_secs(25))
    }

    /// The cluster client of the read API (`serve`): as
    /// [`Self::cluster_client`] with shorter timeouts, reading from the replicas of each slot's
    /// primary when `from_replicas` (redis-rs sends `READONLY` to them and
    /// routes read-only commands there, to the primary while none is up).
    pub fn reader_cluster_client(&self, from_replicas: bool) -> anyhow::Result<ClusterClient> {
        // Shorter than the sink's bounds: a reader answers within 2 s or
        // falls back to its last read, and a replica that stops answering
        // must fail a read in time for the next one to be tried.
        self.cluster_client_built(
            2,
            Duration::from_secs(1),
            Duration::from_secs(2),
            from_replicas,
        )
    }

    fn cluster_client_with(
        &self,
        retries: u32,
        response_timeout: Duration,
        overall_timeout: Duration,
    ) -> anyhow::Result<ClusterClient> {
        self.cluster_client_built(retries, response_timeout, overall_timeout, false)
    }

    fn cluster_client_built(
        &self,
        retries: u32,
        response_timeout: Duration,
        overall_timeout: Duration,
        from_replicas: bool,
    ) -> anyhow::Result<ClusterClient> {
        let mut builder = ClusterClient::builder(self.infos()?)
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(response_timeout)
            .overall_response_timeout(Some(overall_timeout))
            .retries(retries)
            .min_retry_wait(50)
            .max_retry_wait(1_000);
        if let Some(tls) = self.tls()? {
            builder = builder.certs(tls);
        }
        if from_replicas {
            builder =
                builder.read_routing_strategy(redis::cluster_read_routing::RandomReplicaStrategy);
        }
        builder.build().context(
            "--redis-url (REDIS_URL): the cluster's seed nodes must share the scheme \
             (redis:// or rediss://), user and password",
        )
    }

    /// Each URL's connection info, with the password file applied.
    fn infos(&self) -> anyhow::Result<Vec<ConnectionInfo>> {
        use_ring_for_tls();
        let password = self
            .redis_password_file
            .as_deref()
            .map(read_password)
            .transpose()?;
        self.urls()
            .map(|url| {
                let mut info = url.into_connection_info().with_context(|| {
                    format!(
                        "--redis-url (REDIS_URL) {} is not a valid redis:// or rediss:// URL",
                        redact_url(url)
                    )
                })?;
                if let Some(password) = &password {
                    let settings = info.redis_settings().clone().set_password(password.clone());
                    info = info.set_redis_settings(settings);
                }
                let wants_tls = [
                    &self.redis_ca_file,
                    &self.redis_cert_file,
                    &self.redis_key_file,
                ]
                .iter()
                .any(|file| file.is_some());
                if wants_tls && !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
                    bail!(
                        "--redis-ca-file, --redis-cert-file and --redis-key-file are for TLS: \
                         make --redis-url (REDIS_URL) a rediss:// URL, or leave them unset"
                    );
                }
                Ok(info)
            })
            .collect()
    }

    /// The TLS material from the files, if any is given.
    fn tls(&self) -> anyhow::Result<Option<TlsCertificates>> {
        let client_tls = match (&self.redis_cert_file, &self.redis_key_file) {
            (Some(cert), Some(key)) => Some(ClientTlsConfig {
                client_cert: read_pem(cert, "--redis-cert-file (REDIS_CERT_FILE)", "CERTIFICATE")?,
                client_key: read_pem(key, "--redis-key-file (REDIS_KEY_FILE)", "PRIVATE KEY")?,
            }),
            (None, None) => None,
            _ => bail!(
                "mutual TLS needs both --redis-cert-file (REDIS_CERT_FILE) and \
                 --redis-key-file (REDIS_KEY_FILE): set both, or neither"
            ),
        };
        let root_cert = self
            .redis_ca_file
            .as_deref()
            .map(|ca| read_pem(ca, "--redis-ca-file (REDIS_CA_FILE)", "CERTIFICATE"))
            .transpose()?;
        Ok(
            (client_tls.is_some() || root_cert.is_some()).then_some(TlsCertificates {
                client_tls,
                root_cert,
            }),
        )
    }
}

/// The longest `--redis-wait-timeout-ms`: three batches' `WAIT`s queued on
/// one node's connection stay within [`RedisAccess::pipeline_cluster_client`]'s
/// response timeout.
pub const MAX_WAIT_MS: u64 = 5_000;

/// Makes ring the process's TLS crypto provider unless one is set. redis-rs
/// builds its TLS config with rustls's process default, which rustls picks
/// by itself only when exactly one provider is compiled in: a build of
/// redis-sink alone once had none and panicked at the first rediss://
/// connection, and a dependency enabling aws-lc-rs beside ring would do the
/// same.
fn use_ring_for_tls() {
    // An error means a provider is already installed: that one is used.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The password in `path`, without the line end most tools write after it.
fn read_password(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read --redis-password-file (REDIS_PASSWORD_FILE) {}",
            path.display()
        )
    })?;
    let password = text
        .strip_suffix('\n')
        .map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
    if password.is_empty() {
        bail!(
            "--redis-password-file (REDIS_PASSWORD_FILE) {} is empty: put the password in it, \
             or leave the flag unset",
            path.display()
        );
    }
    Ok(password.to_owned())
}

/// The bytes of the PEM file `path`, checked to hold a `-----BEGIN <label`
/// block (`PRIVATE KEY` also matches `RSA PRIVATE KEY`, `EC PRIVATE KEY`).
fn read_pem(path: &Path, flag: &str, label: &str) -> anyhow::Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))?;
    let holds_label = String::from_utf8_lossy(&bytes)
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.contains(label));
    if !holds_label {
        bail!(
            "{flag} {} holds no PEM {label} block (-----BEGIN ...{label}-----): \
             give the PEM file, not DER or a key store",
            path.display()
        );
    }
    Ok(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("redis-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn password_of(client: &redis::Client) -> Option<String> {
        client
            .get_connection_info()
            .redis_settings()
            .password()
            .map(str::to_owned)
    }

    #[test]
    fn the_password_file_replaces_the_urls_password_without_its_line_end() {
        for (name, text) in [
            ("unix", "s3cret\n"),
            ("dos", "s3cret\r\n"),
            ("bare", "s3cret"),
        ] {
            let mut access = RedisAccess::url("redis://app:old@127.0.0.1:6379");
            access.redis_password_file = Some(file(name, text));
            let client = access.client().unwrap();
            assert_eq!(password_of(&client).as_deref(), Some("s3cret"), "{name}");
            assert_eq!(
                client.get_connection_info().redis_settings().username(),
                Some("app")
            );
        }
    }

    #[test]
    fn an_empty_or_missing_password_file_is_refused_by_name() {
        let mut access = RedisAccess::url("redis://127.0.0.1:6379");
        access.redis_password_file = Some(file("empty", "\n"));
        let err = format!("{:#}", access.client().unwrap_err());
        assert!(
            err.contains("REDIS_PASSWORD_FILE") && err.contains("is empty"),
            "{err}"
        );
        access.redis_password_file = Some(PathBuf::from("/nonexistent/redis-password"));
        let err = format!("{:#}", access.client().unwrap_err());
        assert!(err.contains("cannot read --redis-password-file"), "{err}");
    }

    #[test]
    fn tls_files_need_a_rediss_url_and_a_key_beside_a_certificate() {
        let mut access = RedisAccess::url("redis://127.0.0.1:6379");
        access.redis_ca_file = Some(file("ca.pem", "-----BEGIN CERTIFICATE-----\n"));
        let err = format!("{:#}", access.client().unwrap_err());
        assert!(err.contains("rediss://"), "{err}");

        let mut access = RedisAccess::url("rediss://127.0.0.1:6379");
        access.redis_cert_file = Some(file("cert.pem", "-----BEGIN CERTIFICATE-----\n"));
        let err = format!("{:#}", access.client().unwrap_err());
        assert!(err.contains("needs both"), "{err}");
    }

    /// Without a crypto provider chosen, a build of redis-sink alone
    /// panicked here (`cargo test -p redis-sink` showed it; a workspace
    /// build got one through bigquery-sink's dependencies).
    #[tokio::test]
    async fn a_rediss_connection_to_a_server_that_hangs_up_is_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                drop(conn);
            }
        });
        let client = RedisAccess::url(format!("rediss://127.0.0.1:{port}"))
            .client()
            .unwrap();
        assert!(client.get_multiplexed_async_connection().await.is_err());
    }

    #[test]
    fn debug_output_masks_the_urls_password() {
        let shown = format!("{:?}", RedisAccess::url("rediss://app:Sekr1t@redis:6380"));
        assert!(
            !shown.contains("Sekr1t") && shown.contains("app:***@redis"),
            "{shown}"
        );
    }

    #[test]
    fn a_file_without_its_pem_block_is_named_and_its_contents_not_shown() {
        let mut access = RedisAccess::url("rediss://127.0.0.1:6379");
        access.redis_cert_file = Some(file("cert2.pem", "-----BEGIN CERTIFICATE-----\n"));
        access.redis_key_file = Some(file("key.der", "Sekr1t-key-bytes"));
        let err = format!("{:#}", access.client().unwrap_err());
        assert!(
            err.contains("--redis-key-file") && err.contains("PRIVATE KEY"),
            "{err}"
        );
        assert!(!err.contains("Sekr1t"), "{err}");
    }
}

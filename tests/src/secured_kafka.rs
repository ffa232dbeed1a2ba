//! A Kafka-protocol broker reached as managed Kafka is: over TLS (a server
//! certificate from a private CA, a client certificate required) with SASL
//! SCRAM-SHA-512 credentials (`security.protocol=SASL_SSL`).
//!
//! tansu 0.6.0 checks SCRAM credentials (`--authentication`) but serves no
//! TLS (its `--cert`/`--key` are not wired to the listener), and librdkafka's
//! mock cluster has neither. So tansu keeps a plaintext port on loopback,
//! advertises a second port in its metadata, and stunnel terminates TLS on
//! that second port, verifying client certificates against the test's CA.
//! Clients only ever see the TLS port: librdkafka's TLS (server verified
//! against the test's CA, client certificate required by stunnel) and SCRAM
//! (tansu checks the password) are what a test exercises.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::tls::TestPki;

/// The SCRAM user the test's clients log in as.
pub const USER: &str = "movielog-sink";

/// The SCRAM mechanism of a [`SecuredKafka`]'s user. One per broker: tansu
/// 0.6.0 refused SCRAM-SHA-256 logins ("unsupported mechanism", naming
/// SCRAM-SHA-256 as supported) once SCRAM-SHA-512 clients had logged in.
#[derive(Debug, Clone, Copy)]
pub enum Scram {
    /// SCRAM-SHA-256.
    Sha256,
    /// SCRAM-SHA-512.
    Sha512,
}

impl Scram {
    /// librdkafka's `sasl.mechanism`.
    fn mechanism(self) -> &'static str {
        match self {
            Self::Sha256 => "SCRAM-SHA-256",
            Self::Sha512 => "SCRAM-SHA-512",
        }
    }

    /// `tansu user create --mechanism`.
    fn tansu_name(self) -> &'static str {
        match self {
            Self::Sha256 => "scram256",
            Self::Sha512 => "scram512",
        }
    }
}

/// A SASL_SSL broker of a test's own; dropping it stops its processes.
pub struct SecuredKafka {
    /// `127.0.0.1:<TLS port>`.
    pub bootstrap: String,
    /// The librdkafka properties that reach it (a `--kafka-options-file`).
    pub options_file: PathBuf,
    /// The same as key/value pairs, for the test's own clients.
    pub options: Vec<(String, String)>,
    /// Where tansu and stunnel write their logs.
    dir: PathBuf,
    tansu: RefCell<Running>,
    stunnel: RefCell<Running>,
}

impl SecuredKafka {
    /// Starts tansu (SQLite storage in `dir`) with user [`USER`] /
    /// `password` on `scram`, and stunnel in front of it with `pki`.
    pub async fn start(
        dir: &Path,
        pki: &TestPki,
        scram: Scram,
        password: &str,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let [setup_port, plain, tls] = crate::free_ports()?;
        // tansu refuses every request but SASL once --authentication is on,
        // its user admin included: the user is made before, on the same
        // storage, by a broker without it, on a port of its own (the broker
        // the tests use never restarts on a port just freed).
        let setup = Running(tansu(
            dir,
            setup_port,
            setup_port,
            false,
            "tansu-setup.log",
        )?);
        with_log_tails(dir, wait_for_port(setup_port).await)?;
        let created = Command::new("tansu")
            .args(["user", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{setup_port}"))
            .args(["--mechanism", scram.tansu_name(), USER, password])
            .output()
            .context("tansu user create")?;
        drop(setup);
        if !created.status.success() {
            return with_log_tails(
                dir,
                Err(anyhow::anyhow!(
                    "tansu user create failed: {}",
                    String::from_utf8_lossy(&created.stderr)
                )),
            );
        }
        let tansu = Running(tansu(dir, plain, tls, true, "tansu.log")?);
        let stunnel = Running(stunnel(dir, pki, tls, plain)?);
        let kafka = Self {
            bootstrap: format!("127.0.0.1:{tls}"),
            options_file: dir.join("kafka.properties"),
            options: [
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanism", scram.mechanism()),
                ("sasl.username", USER),
                ("sasl.password", password),
                ("ssl.ca.location", &pki.ca.display().to_string()),
                (
                    "ssl.certificate.location",
                    &pki.client_cert.display().to_string(),
                ),
                ("ssl.key.location", &pki.client_key.display().to_string()),
            ]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
            dir: dir.to_owned(),
            tansu: RefCell::new(tansu),
            stunnel: RefCell::new(stunnel),
        };
        kafka.with_logs(wait_for_port(plain).await)?;
        kafka.with_logs(wait_for_port(tls).await)?;
        write_properties(&kafka.options_file, &kafka.options)?;
        Ok(kafka)
    }

    /// `result`, its error followed by whether tansu and stunnel still run
    /// and what they logged (a panic or storage error in tansu, a handshake
    /// stunnel refused).
    pub fn with_logs<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        result.map_err(|err| {
            let (tansu, stunnel) = (
                self.tansu.borrow_mut().state(),
                self.stunnel.borrow_mut().state(),
            );
            anyhow::anyhow!(
                "tansu {tansu}, stunnel {stunnel}: {err:#}{}",
                log_tails(&self.dir)
            )
        })
    }
}

/// A child process, killed when dropped (also when a start fails half-way).
struct Running(Child);

impl Running {
    /// "running", or how it exited.
    fn state(&mut self) -> String {
        match self.0.try_wait() {
            Ok(None) => "running".to_owned(),
            Ok(Some(status)) => format!("exited ({status})"),
            Err(err) => format!("unknown ({err})"),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `result`, its error followed by the tails of the logs in `dir`.
fn with_log_tails<T>(dir: &Path, result: anyhow::Result<T>) -> anyhow::Result<T> {
    result.map_err(|err| anyhow::anyhow!("{err:#}{}", log_tails(dir)))
}

/// The last lines of the setup broker's, tansu's and stunnel's logs in
/// `dir`.
fn log_tails(dir: &Path) -> String {
    let tail = |name: &str, keep: &dyn Fn(&str) -> bool| {
        format!(
            "\n{name}, last lines:\n{}",
            crate::process::tail(&dir.join(name), 20, keep)
        )
    };
    // stunnel's errors and warnings (LOG3, LOG4; its notices are a line per
    // connection), without the readiness probe's: wait_for_port connects
    // and closes without a handshake.
    let stunnel = tail("stunnel.log", &|l| {
        (l.contains(" LOG3[") || l.contains(" LOG4["))
            && !(l.contains("SSL_accept") && l.contains("unexpected eof"))
    });
    let all = |_: &str| true;
    format!(
        "{}{}{stunnel}",
        tail("tansu-setup.log", &all),
        tail("tansu.log", &all)
    )
}

/// Writes to `out` the properties file `base` with `changes` made.
pub fn properties_with(base: &Path, out: &Path, changes: &[(&str, &str)]) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(base)?;
    for (key, _) in changes {
        anyhow::ensure!(
            text.lines()
                .any(|line| line.starts_with(&format!("{key}="))),
            "{} sets no {key} to change",
            base.display()
        );
    }
    let options: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| {
            let value = changes
                .iter()
                .find(|(k, _)| *k == key)
                .map_or(value, |(_, v)| *v);
            (key.to_owned(), value.to_owned())
        })
        .collect();
    write_properties(out, &options)
}

/// Writes `options` as a librdkafka properties file (`key=value` lines).
pub fn write_properties(path: &Path, options: &[(String, String)]) -> anyhow::Result<()> {
    let text: String = options.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// tansu listening on `listen`, advertising `advertise`, storing in `dir`,
/// logging to `log` there.
fn tansu(
    dir: &Path,
    listen: u16,
    advertise: u16,
    authentication: bool,
    log: &str,
) -> anyhow::Result<Child> {
    let mut command = Command::new("tansu");
    command
        .current_dir(dir)
        .args(["broker", "--listener-url"])
        .arg(format!("tcp://127.0.0.1:{listen}"))
        .arg("--advertised-listener-url")
        .arg(format!("tcp://127.0.0.1:{advertise}"))
        // Relative to the working directory (sqlite:///abs/path does not work).
        .args(["--storage-engine", "sqlite://tansu.db"]);
    if authentication {
        command.arg("--authentication");
    }
    // Its banner (listener, storage, "ready") and, whatever the test's own
    // RUST_LOG, its warnings (a refused produce) and errors; a refused
    // login it logs only at debug.
    let log = log_file(dir, log)?;
    command
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start tansu (scripts/stack.sh up installs it)")
}

/// stunnel accepting TLS on `accept` (mutual TLS against `pki`'s CA) and
/// forwarding to `connect`.
fn stunnel(dir: &Path, pki: &TestPki, accept: u16, connect: u16) -> anyhow::Result<Child> {
    let conf = dir.join("stunnel.conf");
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{accept}\n\
             connect = 127.0.0.1:{connect}\ncert = {}\nkey = {}\nCAfile = {}\nverify = 2\n",
            pki.server_cert.display(),
            pki.server_key.display(),
            pki.ca.display()
        ),
    )?;
    Command::new("stunnel4")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(dir, "stunnel.log")?)
        .spawn()
        .context("cannot start stunnel4 (scripts/stack.sh up installs it)")
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::File::create(dir.join(name))?)
}

async fn wait_for_port(port: u16) -> anyhow::Result<()> {
    crate::wait_for_async(
        Duration::from_secs(20),
        &format!("a listener on port {port}"),
        || async move {
            Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok())
        },
    )
    .await
}

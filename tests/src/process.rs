//! Running the service binaries as real processes (kill -9, SIGTERM, scale).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use redis::aio::MultiplexedConnection;
use redis_sink::access::RedisAccess;

use crate::tls::TestPki;

/// The path of a workspace binary built next to the test executable.
/// `make test` builds them first (`cargo build --workspace --bins`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    // A test runs from target/<profile>/deps/, a binary (bench) from
    // target/<profile>/: the services sit in target/<profile>/.
    let dir = exe.parent().context("executable has no parent dir")?;
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let path = dir.join(name);
    if !path.exists() {
        bail!("{} not found: build the binaries first with `cargo build --workspace --bins` (make test does)", path.display());
    }
    Ok(path)
}

/// CPU seconds (user + system) a process used so far, from
/// `/proc/<pid>/stat`; `pid` may be `self`.
pub fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start past ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 after ')',
    // in clock ticks (100 per second here).
    Ok((ticks(11) + ticks(12)) / 100.0)
}

/// A running service process; killed when dropped.
pub struct Service {
    child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Service {
    /// Starts `binary` with `args`, logging what `log_filter` (RUST_LOG)
    /// lets through to `<log_dir>/<name>.log`.
    pub fn start(
        binary: &str,
        args: &[String],
        log_filter: &str,
        log_dir: &std::path::Path,
        name: &str,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Self::spawn(
            binary,
            args,
            log_filter,
            file.try_clone()?.into(),
            file.into(),
        )?;
        Ok(Self { child, log })
    }

    /// Starts `binary` with its log (stderr) on a pipe returned to the
    /// caller, who may close it to play a log reader that went away.
    pub fn start_logging_to_pipe(
        binary: &str,
        args: &[String],
    ) -> anyhow::Result<(Self, std::process::ChildStderr)> {
        let mut child = Self::spawn(binary, args, "info", Stdio::null(), Stdio::piped())?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let log = PathBuf::from("(stderr is a pipe held by the test)");
        Ok((Self { child, log }, stderr))
    }

    fn spawn(
        binary: &str,
        args: &[String],
        log_filter: &str,
        stdout: Stdio,
        stderr: Stdio,
    ) -> anyhow::Result<Child> {
        let mut command = Command::new(self::binary(binary)?);
        // Settings and credentials of the developer's own reach no test
        // service: a test that wants one passes its flag.
        for name in [
            "KAFKA_OPTIONS",
            "KAFKA_OPTIONS_FILE",
            "REDIS_PASSWORD_FILE",
            "REDIS_CA_FILE",
            "REDIS_CERT_FILE",
            "REDIS_KEY_FILE",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "GCE_METADATA_HOST",
        ] {
            command.env_remove(name);
        }
        command
            .args(args)
            .env("RUST_LOG", log_filter)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {binary}"))
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in /proc/PID/status")?;
        Ok(kb * 1024)
    }

    /// CPU seconds used so far (user + system).
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(&self.child.id().to_string())
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().context("kill")?;
        self.child.wait().context("wait")?;
        Ok(())
    }

    /// Sends a signal by name (TERM, STOP, CONT) with kill(1).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} failed");
        }
        Ok(())
    }

    /// Waits for exit, up to `timeout`; returns the exit code.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let child = &mut self.child;
        let exited = crate::poll_until(
            timeout,
            Duration::from_millis(20),
            "the process to exit",
            || {
                let status = child.try_wait().map_err(anyhow::Error::from);
                std::future::ready(status.map(|s| s.map(|s| s.code()).into()))
            },
        )
        .await;
        self.with_log(exited)
    }

    /// Waits up to `timeout` until its log satisfies `holds` (`what` names
    /// that in the error, which ends with the log's last lines); returns
    /// the log.
    pub async fn wait_for_log(
        &self,
        timeout: Duration,
        what: &str,
        holds: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let read = || std::fs::read_to_string(&self.log).unwrap_or_default();
        let found = crate::wait_for(timeout, what, || holds(&read())).await;
        self.with_log(found)?;
        Ok(read())
    }

    /// `result`, an error of which is followed by where the log is and its
    /// last lines.
    pub fn with_log<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        result.map_err(|err| {
            anyhow::anyhow!("{err:#}; log {}:\n{}", self.log.display(), self.log_tail())
        })
    }

    /// The last "partitions assigned" line of its log, if any: it ends with
    /// the partitions the instance owns after it (`owned=[..]`).
    pub fn last_assignment(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        text.lines()
            .rev()
            .find(|l| l.contains("partitions assigned"))
            .map(|l| l.trim_end().to_owned())
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 30, &|_| true)
    }
}

/// The last `count` lines of the file at `path` that `keep` keeps, for
/// failure messages (what went wrong reading it, if it could not be read).
pub fn tail(path: &Path, count: usize, keep: &dyn Fn(&str) -> bool) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().filter(|l| keep(l)).collect();
            lines[lines.len().saturating_sub(count)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A redis-server of a test's own (append-only file on), for tests that
/// restart Redis without disturbing the shared stack's other users.
pub struct PrivateRedis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    append_only: bool,
    /// Set for a server reached only over mutual TLS with a password.
    secured: Option<Secured>,
}

/// What a secured [`PrivateRedis`] asks of its clients.
struct Secured {
    pki: TestPki,
    /// A file holding [`SECURED_USER`]'s password, as a mounted Secret does.
    password_file: PathBuf,
    /// `tls-protocols`.
    protocols: &'static str,
}

/// The ACL user a secured [`PrivateRedis`] knows (its `default` user is off,
/// as on a managed Redis with ACLs).
pub const SECURED_USER: &str = "movielog-sink";

impl PrivateRedis {
    /// Starts redis-server on a free loopback port with its data in `dir`.
    pub async fn start(dir: PathBuf) -> anyhow::Result<Self> {
        Self::start_with(dir, true).await
    }

    /// The same without the append-only file: nothing survives a restart
    /// (for benchmarks that compare with and without it).
    pub async fn start_without_aof(dir: PathBuf) -> anyhow::Result<Self> {
        Self::start_with(dir, false).await
    }

    /// One that speaks only TLS, asks every client for a certificate
    /// signed by `pki`'s CA (mutual TLS), and knows one ACL user,
    /// [`SECURED_USER`] with `password` (as a managed Redis with in-transit
    /// encryption and ACLs does).
    /// `protocols` is its `tls-protocols` ("TLSv1.2 TLSv1.3", "TLSv1.2").
    pub async fn start_secured(
        dir: PathBuf,
        pki: TestPki,
        password: &str,
        protocols: &'static str,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let password_file = dir.join("password");
        std::fs::write(&password_file, format!("{password}\n"))?;
        let secured = Secured {
            pki,
            password_file,
            protocols,
        };
        let mut redis = Self::unstarted(dir, false, Some(secured))?;
        redis.spawn().await?;
        Ok(redis)
    }

    async fn start_with(dir: PathBuf, append_only: bool) -> anyhow::Result<Self> {
        let mut redis = Self::unstarted(dir, append_only, None)?;
        redis.spawn().await?;
        Ok(redis)
    }

    fn unstarted(
        dir: PathBuf,
        append_only: bool,
        secured: Option<Secured>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            child: None,
            port: crate::free_port()?,
            dir,
            append_only,
            secured,
        })
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://<SECURED_USER>@127.0.0.1:PORT`
    /// for a secured one (the password comes from a file).
    pub fn url(&self) -> String {
        match self.secured {
            None => format!("redis://127.0.0.1:{}", self.port),
            Some(_) => format!("rediss://{SECURED_USER}@127.0.0.1:{}", self.port),
        }
    }

    /// Everything a client needs to reach it: the URL and, for a secured
    /// one, the password file, the CA and the client certificate.
    pub fn access(&self) -> RedisAccess {
        let mut access = RedisAccess::url(self.url());
        if let Some(Secured {
            pki, password_file, ..
        }) = &self.secured
        {
            access.redis_password_file = Some(password_file.clone());
            access.redis_ca_file = Some(pki.ca.clone());
            access.redis_cert_file = Some(pki.client_cert.clone());
            access.redis_key_file = Some(pki.client_key.clone());
        }
        access
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A connection to it.
    pub async fn connection(&self) -> anyhow::Result<MultiplexedConnection> {
        crate::redis::connect_to_node(&self.access()).await
    }

    /// Makes this server a replica of `primary` and waits until it is in
    /// sync.
    pub async fn replicate(&self, primary: &PrivateRedis) -> anyhow::Result<()> {
        let mut conn = self.connection().await?;
        let port = primary.port.to_string();
        redis::cmd("REPLICAOF")
            .arg(&["127.0.0.1", port.as_str()][..])
            .exec_async(&mut conn)
            .await?;
        crate::redis::wait_for_replication(&conn, "master_link_status:up", Duration::from_secs(60))
            .await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new("redis-server");
        let port = self.port.to_string();
        match &self.secured {
            None => command.args(["--port", &port]),
            Some(Secured {
                pki,
                password_file,
                protocols,
            }) => command
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "yes",
                    "--tls-protocols",
                    protocols,
                ])
                .arg("--tls-cert-file")
                .arg(&pki.server_cert)
                .arg("--tls-key-file")
                .arg(&pki.server_key)
                .arg("--tls-ca-cert-file")
                .arg(&pki.ca)
                .args(["--user", "default", "off"])
                .args(["--user", SECURED_USER, "on", "~*", "&*", "+@all"])
                .arg(format!(
                    ">{}",
                    std::fs::read_to_string(password_file)?.trim_end()
                )),
        };
        let child = command
            .args([
                "--bind",
                "127.0.0.1",
                "--appendonly",
                if self.append_only { "yes" } else { "no" },
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "cannot start redis-server (is it installed? scripts/stack.sh up installs it)",
            )?;
        self.child = Some(child);
        let access = self.access();
        crate::wait_for_async(
            Duration::from_secs(20),
            "redis-server to answer PING",
            || {
                let access = access.clone();
                async move {
                    let Ok(mut conn) = crate::redis::connect_to_node(&access).await else {
                        return Ok(false);
                    };
                    Ok(redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .is_ok())
                }
            },
        )
        .await
    }

    /// Stops the server gracefully (it flushes its append-only file).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()?;
            anyhow::ensure!(status.success(), "kill -TERM redis-server failed");
            child.wait()?;
        }
        Ok(())
    }

    /// Starts a stopped server again on the same port and data.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "redis-server is already running");
        self.spawn().await
    }

    /// Stops the server gracefully and starts it again on the same port and
    /// data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.spawn().await
    }
}

/// A managed failover of `primary` to `replica` (its replica), as
/// ElastiCache or Memorystore do it: writes paused on the primary until the
/// replica has everything, the replica promoted, the address (`front`)
/// moved to it, the old primary made its replica, writes let through (they
/// now meet a replica: `READONLY`).
pub async fn fail_over(
    primary: &PrivateRedis,
    replica: &PrivateRedis,
    front: &crate::tcp_front::TcpFront,
) -> anyhow::Result<()> {
    let mut to_primary = primary.connection().await?;
    let mut to_replica = replica.connection().await?;
    redis::cmd("CLIENT")
        .arg(&["PAUSE", "30000", "WRITE"][..])
        .exec_async(&mut to_primary)
        .await?;
    let written = replication_offset(&mut to_primary).await?;
    crate::wait_for_async(Duration::from_secs(60), "the replica to catch up", || {
        let mut to_replica = to_replica.clone();
        async move { Ok(replication_offset(&mut to_replica).await? >= written) }
    })
    .await?;
    redis::cmd("REPLICAOF")
        .arg(&["NO", "ONE"][..])
        .exec_async(&mut to_replica)
        .await?;
    front.switch(replica.addr());
    primary.replicate(replica).await?;
    redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .exec_async(&mut to_primary)
        .await?;
    Ok(())
}

/// `master_repl_offset` from INFO replication: how far a server has
/// written (a primary) or received (a replica) the replication stream.
async fn replication_offset(conn: &mut MultiplexedConnection) -> anyhow::Result<i64> {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(conn)
        .await?;
    info.lines()
        .find_map(|l| l.strip_prefix("master_repl_offset:"))
        .context("INFO replication has no master_repl_offset")?
        .trim()
        .parse()
        .context("master_repl_offset")
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

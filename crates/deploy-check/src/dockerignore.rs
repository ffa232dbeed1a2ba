//! deploy/Dockerfile's build context: deploy/Dockerfile.dockerignore matched
//! as Docker matches it, against what the build reads.

use std::collections::BTreeSet;

use anyhow::{ensure, Context, Result};

use crate::docker::{copy_sources, dockerfile_instructions};
use crate::report;
use crate::workspace::{files_under, root, workspace_members};

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

/// The .dockerignore matcher decides as Docker does (made-up patterns).
pub fn dockerignore_matches_like_docker() -> Result<()> {
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
        let got = docker_ignores(&patterns, path);
        ensure!(
            got == ignored,
            "{path}: ignored is {got}, expected {ignored}"
        );
    }
    ensure!(may_include_under(&patterns, "crates"), "crates");
    ensure!(may_include_under(&patterns, "crates/a"), "crates/a");
    ensure!(!may_include_under(&patterns, "docs"), "docs");
    Ok(())
}

/// deploy/Dockerfile's build context is exactly what the build reads, and
/// every COPY finds its source in it.
pub fn dockerfile_context_is_only_what_the_build_reads() -> Result<()> {
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

#[cfg(test)]
mod tests {
    #[test]
    fn matches_like_docker() -> anyhow::Result<()> {
        super::dockerignore_matches_like_docker()
    }
}

//! `make demo` end to end, short: its own stack, both services, the
//! generator; the figures it prints must be non-empty and add up.

use std::process::Command;

use anyhow::Context;
use e2e::{unique, workspace_root};

/// The number after `label` on the line that starts with it.
fn number_after(output: &str, label: &str) -> anyhow::Result<u64> {
    let line = output
        .lines()
        .find(|l| l.starts_with(label))
        .with_context(|| format!("no line starting with {label:?} in:\n{output}"))?;
    line[label.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .context("no number")?
        .parse()
        .with_context(|| format!("in {line:?}"))
}

#[test]
fn make_demo_shows_rankings_and_consistent_counts() -> anyhow::Result<()> {
    let root = workspace_root();
    let stack_dir = std::env::temp_dir().join(unique("demo-stack"));
    let output = Command::new(root.join("scripts/demo.sh"))
        .env("DEMO_SECONDS", "6")
        .env("DEMO_PROFILE", "debug")
        .env("STACK_DIR", &stack_dir)
        .env(
            "XDG_CACHE_HOME",
            std::env::var("XDG_CACHE_HOME").unwrap_or_else(|_| {
                format!("{}/.cache", std::env::var("HOME").unwrap_or_default())
            }),
        )
        .output()
        .context("scripts/demo.sh")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The last screen, after the final clear.
    let last = stdout.rsplit("\u{1b}[2J").next().unwrap_or_default();

    let generated = number_after(last, "Events generated:")?;
    let rows = number_after(last, "BigQuery rows in")?;
    let dlq_user2 = last
        .lines()
        .find(|l| l.starts_with("Dead letters:"))
        .and_then(|l| l.rsplit(' ').next())
        .context("dead letters line")?
        .parse::<u64>()?;
    assert!(generated > 0 && rows > 0, "{last}");
    assert_eq!(
        rows + dlq_user2,
        generated,
        "every generated event is a row or a dead letter:\n{last}"
    );
    let consumed_user2 = number_after(last, "bigquery-sink  user2:")?;
    assert_eq!(consumed_user2, generated, "{last}");

    // Both rankings list something, and the history of a user is shown.
    let searches = last
        .split("Top 10 searches")
        .nth(1)
        .context("no search ranking")?;
    assert!(
        searches.lines().nth(2).is_some_and(|l| l.starts_with("1 ")),
        "{last}"
    );
    let movies = last
        .split("Top 10 movies")
        .nth(1)
        .context("no movie ranking")?;
    assert!(
        movies.lines().nth(2).is_some_and(|l| l.starts_with("1 ")),
        "{last}"
    );
    assert!(last.contains("Recent searches of user"), "{last}");
    // The read API served the rankings while the demo ran (the script checks).
    assert!(
        last.contains("Live page (served while the demo runs"),
        "{last}"
    );
    assert!(
        !stack_dir.join("tansu.pid").exists(),
        "the demo stops the stack it started"
    );
    Ok(())
}

//! deploy/grafana/dashboard.json against the services' metric table.

use std::collections::BTreeSet;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::promql::{identifiers, used_labels};
use crate::report;
use crate::values::{at, str_at};
use crate::workspace::root;

/// The metric names ([`sink_core::metrics::ALL`]) and which are histograms.
fn metric_names() -> (BTreeSet<String>, BTreeSet<String>) {
    let names = sink_core::metrics::ALL
        .iter()
        .map(|m| m.name.to_owned())
        .collect();
    let histograms = sink_core::metrics::ALL
        .iter()
        .filter(|m| m.kind == sink_core::metrics::Kind::Histogram)
        .map(|m| m.name.to_owned())
        .collect();
    (names, histograms)
}

/// The labels a metric carries, as the services set them.
fn metric_labels(name: &str) -> Option<&'static [&'static str]> {
    sink_core::metrics::ALL
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.labels)
}

/// The labels Prometheus adds when scraping.
const SCRAPE_LABELS: [&str; 5] = ["job", "instance", "namespace", "pod", "container"];

/// deploy/grafana/dashboard.json uses only the services' metrics
/// (`sink_core::metrics::ALL`) and their labels, and has the panels of the design.
pub fn dashboard_uses_only_the_services_metric_names() -> Result<()> {
    let path = root().join("deploy/grafana/dashboard.json");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?,
    )?;
    let (names, histograms) = metric_names();
    let series = |id: &str| -> Option<String> {
        if names.contains(id) && !histograms.contains(id) {
            return Some(id.to_owned());
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|s| {
            id.strip_suffix(s)
                .filter(|b| histograms.contains(*b))
                .map(str::to_owned)
        })
    };
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    let mut ids = BTreeSet::new();
    let mut exprs: Vec<(String, String, String)> = Vec::new(); // panel, expr, legend
    let panels = dashboard
        .get("panels")
        .and_then(Value::as_array)
        .context("no panels")?;
    for panel in panels.iter().chain(
        panels
            .iter()
            .filter_map(|p| p.get("panels").and_then(Value::as_array))
            .flatten(),
    ) {
        let title = str_at(panel, &["title"]).unwrap_or("?").to_owned();
        let id = panel
            .get("id")
            .and_then(Value::as_u64)
            .context("panel without id")?;
        if !ids.insert(id) {
            problems.push(format!("panel {title}: duplicate id {id}"));
        }
        if panel.get("gridPos").is_none() {
            problems.push(format!("panel {title}: no gridPos"));
        }
        if panel["type"] == "row" {
            continue;
        }
        if str_at(panel, &["datasource", "uid"]) != Some("${datasource}") {
            problems.push(format!(
                "panel {title}: datasource is not the ${{datasource}} variable"
            ));
        }
        let targets = panel
            .get("targets")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("panel {title}: no targets"));
        }
        let ref_ids: BTreeSet<&str> = targets
            .iter()
            .filter_map(|t| str_at(t, &["refId"]))
            .collect();
        if ref_ids.len() != targets.len() {
            problems.push(format!("panel {title}: refIds missing or repeated"));
        }
        for t in &targets {
            let expr = str_at(t, &["expr"]).unwrap_or_default().to_owned();
            exprs.push((
                title.clone(),
                expr,
                str_at(t, &["legendFormat"]).unwrap_or_default().to_owned(),
            ));
        }
    }
    for var in at(&dashboard, &["templating", "list"])
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(q) = str_at(var, &["definition"])
            .or_else(|| str_at(var, &["query", "query"]))
            .or_else(|| str_at(var, &["query"]))
        {
            if var["type"] == "query" {
                exprs.push((
                    format!("variable {}", var["name"]),
                    q.to_owned(),
                    String::new(),
                ));
            }
        }
    }
    ensure!(
        at(&dashboard, &["templating", "list"])
            .and_then(Value::as_array)
            .is_some_and(|l| l
                .iter()
                .any(|v| v["name"] == "datasource" && v["type"] == "datasource")),
        "no `datasource` variable"
    );
    for (title, expr, legend) in &exprs {
        if expr.trim().is_empty() {
            problems.push(format!("{title}: empty expression"));
            continue;
        }
        let mut labels: BTreeSet<String> = SCRAPE_LABELS.iter().map(|s| s.to_string()).collect();
        for (_, id) in identifiers(expr) {
            if !id.starts_with("sink_") {
                continue;
            }
            match series(&id) {
                Some(base) => {
                    labels.extend(
                        metric_labels(&base)
                            .unwrap_or_default()
                            .iter()
                            .map(|s| s.to_string()),
                    );
                    if id.ends_with("_bucket") {
                        labels.insert("le".into());
                    }
                    used.insert(base);
                }
                None => problems.push(format!(
                    "{title}: `{id}` is not a metric of the services (sink_core::metrics::ALL: {names:?})"
                )),
            }
        }
        let (grouping, matchers) = used_labels(expr);
        for label in grouping.iter().chain(&matchers) {
            if !labels.contains(label) {
                problems.push(format!(
                    "{title}: label `{label}` is not one the metrics in `{expr}` carry"
                ));
            }
        }
        for part in legend.split("{{").skip(1) {
            let label = part.split("}}").next().unwrap_or_default().trim();
            if !grouping.contains(label) {
                problems.push(format!("{title}: legend uses {{{{{label}}}}} which `{expr}` does not keep (by {grouping:?})"));
            }
        }
    }
    // The panels the design asks for.
    for (what, needle) in [
        ("throughput", "rate(sink_events_consumed_total"),
        ("lag per partition", "sink_consumer_lag"),
        (
            "batch latency",
            "histogram_quantile(0.99, sum by (job, le) (rate(sink_batch_duration_seconds_bucket",
        ),
        ("sink retries", "sink_retries_total"),
        ("DLQ rate", "rate(sink_dlq_events_total"),
    ] {
        if !exprs.iter().any(|(_, e, _)| e.contains(needle)) {
            problems.push(format!("no {what} panel (an expression with `{needle}`)"));
        }
    }
    if !exprs
        .iter()
        .any(|(_, e, _)| e.contains("sink_consumer_lag") && used_labels(e).0.contains("partition"))
    {
        problems.push("consumer lag is not shown per partition".into());
    }
    report(problems)
}

//! deploy/prometheus/prometheus.yml: a scrape job per sink.

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::compose::{environment, service};
use crate::help::Cli;
use crate::validators::yaml;
use crate::values::{at, port_of};

/// deploy/prometheus/prometheus.yml scrapes each sink's compose service on its
/// metrics port.
pub fn prometheus_scrapes_the_compose_sinks() -> Result<()> {
    let docs = yaml(&["deploy/prometheus/prometheus.yml"])?;
    let config = docs
        .values()
        .flatten()
        .next()
        .context("empty prometheus.yml")?;
    let jobs = config
        .get("scrape_configs")
        .and_then(Value::as_array)
        .context("no scrape_configs")?;
    for sink in ["redis-sink", "bigquery-sink"] {
        let env = environment(service(sink)?)?;
        let port =
            port_of(&Cli::of(sink)?.setting(&env, "METRICS_ADDR")?).context("no metrics port")?;
        let job = jobs
            .iter()
            .find(|j| j["job_name"] == sink)
            .with_context(|| format!("no scrape job {sink}"))?;
        let sd = at(job, &["dns_sd_configs"])
            .and_then(|s| s.get(0))
            .context("no dns_sd_configs")?;
        ensure!(
            sd["names"].get(0) == Some(&Value::String(sink.into()))
                && sd["port"].as_u64() == Some(u64::from(port)),
            "scrape job {sink} does not resolve the service on port {port}: {sd}"
        );
    }
    Ok(())
}

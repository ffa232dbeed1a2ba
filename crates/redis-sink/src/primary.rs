//! The connection to the Redis primary, followed through failovers.
//!
//! Managed Redis (ElastiCache, Memorystore, Azure, Sentinel behind a DNS
//! name) fails over by promoting a replica and moving the address to it. A
//! connection opened before keeps talking to the old primary, now a replica
//! answering `READONLY`, or to a node answering `LOADING` / `MASTERDOWN`.
//! redis-rs's [`ConnectionManager`] only reconnects on I/O errors, so
//! without this every retry would go to the same replica forever.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sink_core::SinkError;

/// Error kinds (see `sink::classify`) that mean the server behind the
/// connection is not a writable primary (any more, or yet): the next
/// attempt goes over a new connection, which resolves the address again.
pub const NOT_PRIMARY: &[&str] = &["redis_read_only", "redis_loading", "redis_master_down"];

/// A connection to whatever the URL leads to now.
pub struct Primary {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// The connection in use and its generation (bumped on each reconnect).
    current: Mutex<(u64, ConnectionManager)>,
    /// One reconnect at a time: batches in flight fail together.
    reconnecting: tokio::sync::Mutex<()>,
    reconnects: AtomicU64,
}

/// A connection handed out by [`Primary::get`], with its generation.
#[derive(Clone)]
pub struct Conn {
    generation: u64,
    /// The connection itself (cheap to clone: a handle).
    pub inner: ConnectionManager,
}

impl Primary {
    /// Wraps an open connection made from `client` with `config`.
    pub fn new(
        client: redis::Client,
        config: ConnectionManagerConfig,
        conn: ConnectionManager,
    ) -> Self {
        Self {
            client,
            config,
            current: Mutex::new((0, conn)),
            reconnecting: tokio::sync::Mutex::new(()),
            reconnects: AtomicU64::new(0),
        }
    }

    /// The connection to use now.
    pub fn get(&self) -> Conn {
        let current = self.lock();
        Conn {
            generation: current.0,
            inner: current.1.clone(),
        }
    }

    /// Passes `result` through; when its error says the server `used` talks
    /// to is not a writable primary, first replaces that connection (once,
    /// however many writes failed on it), so the retry reaches the new one.
    pub async fn follow<T>(
        &self,
        used: &Conn,
        result: Result<T, SinkError>,
    ) -> Result<T, SinkError> {
        if let Err(err) = &result {
            if NOT_PRIMARY.contains(&err.kind()) {
                self.reconnect(used.generation, err.kind()).await;
            }
        }
        result
    }

    async fn reconnect(&self, failed: u64, why: &str) {
        let _one_at_a_time = self.reconnecting.lock().await;
        if self.lock().0 != failed {
            return; // another write already replaced it
        }
        match ConnectionManager::new_with_config(self.client.clone(), self.config.clone()).await {
            Ok(conn) => {
                let mut current = self.lock();
                *current = (failed + 1, conn);
                let reconnects = self.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    reply = why,
                    reconnects,
                    "Redis answered as a server that is not the writable primary (a failover?): \
                     reconnected, the next attempt goes wherever the address leads now"
                );
            }
            // The retry fails again and comes back here.
            Err(err) => tracing::warn!(%err, "cannot reconnect to Redis after a failover reply"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, ConnectionManager)> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

//! A loopback TCP front whose target can be switched, as a managed service's
//! DNS name moves to a new primary after a failover: connections opened
//! before the switch stay with the old target, new ones reach the new one.
//! It can also cut every open connection at once, as a load balancer or a
//! network partition does.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};

/// Forwards every connection to the current target until dropped.
pub struct TcpFront {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpFront {
    /// Listens on a free loopback port, forwarding to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let target = Arc::new(Mutex::new(target));
        let current = Arc::clone(&target);
        let connections = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let to = *current
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let connection = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                open.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(connection);
            }
        });
        Ok(Self {
            addr,
            target,
            connections,
            task,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// New connections go to `target` from now on.
    pub fn switch(&self, target: SocketAddr) {
        *self
            .target
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = target;
    }
}

impl TcpFront {
    /// Connections open now.
    pub fn live(&self) -> usize {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|c| !c.is_finished())
            .count()
    }

    /// Closes every connection open now, both ways; new ones are accepted.
    /// Returns how many were open.
    pub fn cut(&self) -> usize {
        let open: Vec<_> = std::mem::take(
            &mut *self
                .connections
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let live = open.iter().filter(|c| !c.is_finished()).count();
        for connection in open {
            connection.abort();
        }
        live
    }
}

impl Drop for TcpFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

//! redis-sink: search and movie_detail events (topic user3) → live rankings
//! and per-user history in Redis, applied exactly once.
//!
//! - [`access`]: where Redis is and the password / TLS files to reach it;
//! - [`config`]: the service's flags, checked into settings;
//! - [`client`]: the connection to the primary or the cluster, checked at
//!   start and followed through failovers;
//! - [`legacy`]: moving the layout before the `{rank}` hash tag, once;
//! - [`decode`]: decode and normalize one event (pure);
//! - [`plan`]: one partition's batch → history writes and one script call,
//!   pre-aggregated (pure);
//! - [`script`]: the Lua script applying counts and offset atomically;
//! - [`error`]: sorting Redis errors into transient and needs-an-operator;
//! - [`slots`]: which cluster node owns which key, for one pipeline per node;
//! - [`sink`]: the [`sink_core::Sink`] tying them together;
//! - [`window`]: which buckets a reader's window reads (pure);
//! - [`query`]: reading rankings, rising terms and histories back, with
//!   read-only commands;
//! - [`api`]: the read API and live page (`redis-sink serve`);
//! - [`keys`]: the key contract (docs/redis-keys.md).

pub mod access;
pub mod api;
pub mod client;
pub mod config;
pub mod decode;
pub mod error;
pub mod keys;
pub mod legacy;
pub mod plan;
pub mod query;
pub mod script;
pub mod sink;
pub mod slots;
pub mod window;

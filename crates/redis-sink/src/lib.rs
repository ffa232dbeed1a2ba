//! redis-sink: search and movie_detail events (topic user3) → live rankings
//! and per-user history in Redis, applied exactly once.
//!
//! - [`action`]: decode and normalize one event (pure);
//! - [`plan`]: one partition's batch → one script call, pre-aggregated (pure);
//! - [`script`]: the Lua script applying data and offset atomically;
//! - [`sink`]: the [`sink_core::Sink`] over a Redis connection;
//! - [`primary`]: that connection, followed through failovers;
//! - [`query`]: reading rankings and histories back;
//! - [`keys`]: the key contract (docs/redis-keys.md).

pub mod action;
pub mod keys;
pub mod plan;
pub mod primary;
pub mod query;
pub mod script;
pub mod sink;

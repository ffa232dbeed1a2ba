//! bigquery-sink: every movie-service log event (topic user2) → one row of a
//! BigQuery table, through batched streaming inserts (`tabledata.insertAll`)
//! or the Storage Write API's `_default` stream, at least once, or its
//! PENDING streams, exactly once per batch; rows BigQuery refuses to the
//! dead-letter topic.
//!
//! - [`config`]: the service's flags, checked into settings;
//! - [`client`]: endpoint and HTTP settings of the client;
//! - [`credentials`]: where OAuth tokens come from (key files, Workload
//!   Identity Federation, the metadata server);
//! - [`decode`]: decode one record and build its row (pure);
//! - [`json_text`]: the row's JSON text, escaped by hand (pure);
//! - [`proto`]: the Storage Write API's row descriptor and encoding (pure);
//! - [`write_api`]: the Storage Write API's channel, tokens and the one
//!   long-lived append stream of an instance;
//! - [`append`]: a batch through that stream;
//! - [`pending`]: a batch through a PENDING stream of its own, committed
//!   once the consume loop recorded it in Kafka;
//! - [`plan`]: pack a batch's rows into insertAll requests under the row
//!   and byte limits, and sort a response's per-row errors (pure);
//! - [`stored_gzip`]: a request body in an uncompressed gzip frame (pure);
//! - [`table`]: the table's schema, creating it, checking an existing one;
//! - [`error`]: sorting errors into retry, operator needed, or split;
//! - [`sink`]: the [`sink_core::Sink`] tying them together.
//!
//! `docs/bigquery.md` describes the table, the guarantee and the
//! de-duplicated view.

pub mod append;
pub mod client;
pub mod config;
pub mod credentials;
pub mod decode;
pub mod error;
pub mod json_text;
pub mod pending;
pub mod plan;
pub mod proto;
pub mod sink;
pub mod stored_gzip;
pub mod table;
pub mod write_api;

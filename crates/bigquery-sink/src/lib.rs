//! bigquery-sink: every movie-service log event (topic user2) → one row of a
//! BigQuery table, through batched streaming inserts (`tabledata.insertAll`),
//! at least once, rows BigQuery refuses to the dead-letter topic.
//!
//! - [`row`]: decode one record and build its row (pure);
//! - [`request`]: pack rows into insertAll requests under the row and byte
//!   limits, and sort a response's per-row errors (pure);
//! - [`table`]: the table's schema, creating it, checking an existing one;
//! - [`client`]: credentials, endpoint and HTTP settings of the client;
//! - [`sink`]: the [`sink_core::Sink`] over BigQuery;
//! - [`error`]: sorting errors into retry, operator needed, or split;
//! - [`config`]: the service's flags.
//!
//! `docs/bigquery.md` describes the table, the guarantee and the
//! de-duplicated view.

pub mod client;
pub mod config;
pub mod error;
pub mod request;
pub mod row;
pub mod sink;
pub mod table;

//! `bigquery-sink`: consumes topic user2 into a BigQuery table.

use std::process::ExitCode;

use bigquery_sink::config::{BigQueryArgs, Settings, WriteApi, DEFAULTS};
use bigquery_sink::pending::PendingStreams;
use bigquery_sink::sink::{BigQuerySink, SinkSettings, Writer};
use bigquery_sink::write_api::{self, AppendStream};
use bigquery_sink::{client, table};
use clap::Parser;
use sink_core::ConsumerArgs;

/// Every movie-service log event (topic user2) into a BigQuery table, at least
/// once; rows BigQuery refuses go to the dead-letter topic with its reason.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    consumer: ConsumerArgs,
    #[command(flatten)]
    bigquery: BigQueryArgs,
}

/// jemalloc, as redis-sink: the loop allocates each batch on one thread and
/// a writer frees it on another; with glibc's per-thread arenas that memory
/// stayed stranded (peak RSS up to 67.6 MB against 60.1-63.6 MB with
/// jemalloc's one arena, and more CPU). It also serves librdkafka's
/// `malloc` (the workspace builds it unprefixed): its decompressed record
/// batches kept a 22-26 MB glibc arena, and in jemalloc's arena the peak is
/// 3-6 MB lower on average (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli: Cli = sink_core::parse_args(&DEFAULTS);
    sink_core::telemetry::init(cli.consumer.log_format);
    sink_core::block_on_main(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    cli.consumer.validate()?;
    let settings = Settings::from_args(&cli.bigquery, &cli.consumer)?;
    if cli.consumer.batch_max_events < cli.bigquery.batch_max_rows {
        tracing::warn!(
            batch_max_rows = cli.bigquery.batch_max_rows,
            batch_max_events = cli.consumer.batch_max_events,
            "requests hold at most --batch-max-events rows (a batch of the consume loop); raise it too for bigger requests"
        );
    }
    if settings.write_api == WriteApi::StorageExactlyOnce {
        // One batch per stream, one stream per interval at most.
        let interval_ms = settings.stream_interval.as_millis().max(1);
        let ceiling = u128::from(cli.consumer.batch_max_events) * 1_000 / interval_ms;
        if ceiling < 5_000 {
            tracing::warn!(
                rows_per_second = ceiling,
                batch_max_events = cli.consumer.batch_max_events,
                stream_interval_ms = interval_ms,
                "storage-exactly-once writes one batch per --stream-interval-ms at most: this \
                 instance cannot write more rows per second than this; raise --batch-max-events \
                 (15000 fits the default --batch-max-bytes; docs/bigquery.md)"
            );
        }
    }
    tracing::info!(
        table = %settings.target,
        endpoint = settings.endpoint.as_deref().unwrap_or("Google"),
        write_api = ?settings.write_api,
        max_rows = settings.limits.max_rows,
        max_bytes = settings.limits.max_bytes,
        max_in_flight = settings.max_in_flight,
        "starting the BigQuery sink"
    );
    if settings.create_table
        && settings.layout.granularity == table::Granularity::Hour
        && settings
            .layout
            .partition_expiration
            .is_none_or(|e| e.as_secs() > 10_000 * 3_600)
    {
        tracing::warn!(
            "if the sink creates the table: HOUR partitions kept longer than 416 days pass \
             BigQuery's 10,000 partitions per table; set --partition-expiration-days, or \
             partition by DAY"
        );
    }
    let connect = async {
        let (client, auth) = client::connect(&settings).await?;
        table::ensure(
            &client,
            &settings.target,
            settings.create_table,
            &settings.layout,
        )
        .await?;
        let grpc = || write_api::channel(settings.grpc_endpoint.as_deref()).map(write_api::client);
        let writer = match settings.write_api {
            WriteApi::InsertAll => Writer::InsertAll,
            WriteApi::Storage => Writer::Default(AppendStream::start(
                grpc()?,
                auth,
                write_api::default_stream_name(&settings.target),
                settings.request_timeout,
            )),
            WriteApi::StorageExactlyOnce => Writer::Pending(Box::new(PendingStreams::new(
                grpc()?,
                auth,
                settings.target.clone(),
                settings.request_timeout,
                settings.stream_interval,
            ))),
        };
        Ok(BigQuerySink::new(
            client,
            SinkSettings {
                target: settings.target,
                limits: settings.limits,
                max_in_flight: settings.max_in_flight,
                gzip_level: settings.gzip_level,
            },
            writer,
        ))
    };
    sink_core::run_connecting(&cli.consumer, connect, sink_core::shutdown::signal()).await
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    extern "C" {
        fn malloc(size: usize) -> *mut std::ffi::c_void;
    }

    /// What the C code (librdkafka) calls `malloc` is jemalloc's, not glibc's:
    /// fails if tikv-jemallocator is built prefixed. (That the binary also
    /// exports it to the shared libraries: `nm -D` lists `T malloc`.)
    #[test]
    fn c_code_allocates_from_jemalloc() {
        let c_malloc = malloc as unsafe extern "C" fn(usize) -> *mut std::ffi::c_void;
        let jemalloc =
            tikv_jemalloc_sys::malloc as unsafe extern "C" fn(usize) -> *mut std::ffi::c_void;
        assert!(
            std::ptr::fn_addr_eq(c_malloc, jemalloc),
            "malloc is not jemalloc's: build tikv-jemallocator with unprefixed_malloc_on_supported_platforms"
        );
    }
}

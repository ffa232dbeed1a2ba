//! `bigquery-sink`: consumes topic user2 into a BigQuery table.

use std::process::ExitCode;

use bigquery_sink::config::{BigQueryArgs, Settings, WriteApi, DEFAULTS};
use bigquery_sink::sink::{BigQuerySink, SinkSettings};
use bigquery_sink::write_api::{self, DefaultStream};
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
        let stream = match settings.write_api {
            WriteApi::InsertAll => None,
            WriteApi::Storage => Some(DefaultStream::start(
                write_api::client(write_api::channel(settings.grpc_endpoint.as_deref())?),
                auth,
                &settings.target,
                settings.request_timeout,
            )),
        };
        Ok(BigQuerySink::new(
            client,
            SinkSettings {
                target: settings.target,
                limits: settings.limits,
                max_in_flight: settings.max_in_flight,
                gzip_level: settings.gzip_level,
            },
            stream,
        ))
    };
    sink_core::run_connecting(&cli.consumer, connect, sink_core::shutdown::signal()).await
}

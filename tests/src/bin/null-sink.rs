//! null-sink: the shared consume loop with a sink that does nothing.
//!
//! The benchmark's baseline: what the consumer itself costs (fetch, copy,
//! batch, commit), so the services' figures can be read against it.

use std::process::ExitCode;

use clap::Parser;
use sink_core::{
    Batch, ConsumerArgs, Record, Rejection, ServiceDefaults, Sink, SinkError, WriteOutcome,
};

/// The consume loop with a do-nothing sink (benchmark baseline).
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    consumer: ConsumerArgs,
}

struct NullSink;

impl Sink for NullSink {
    type Item = ();

    fn decode(&self, _record: &Record) -> Result<(), Rejection> {
        Ok(())
    }

    async fn write(&self, _batch: &Batch<()>) -> Result<WriteOutcome, SinkError> {
        Ok(WriteOutcome::default())
    }
}

fn main() -> ExitCode {
    let defaults = ServiceDefaults {
        topic: "user3",
        group_id: "null-sink",
        batch_max_events: 5_000,
        batch_max_bytes: 4 << 20,
        batch_linger_ms: 100,
        // The loop's own ceiling: as much prefetch as any service uses.
        prefetch_kbytes: 4_096,
    };
    let cli: Cli = sink_core::parse_args(&defaults);
    sink_core::telemetry::init(cli.consumer.log_format);
    sink_core::block_on_main(async move {
        sink_core::run(&cli.consumer, NullSink, sink_core::shutdown::signal()).await
    })
}

//! bigquery-sink end to end: real broker, the BigQuery emulator, the real
//! binary, and (where a test says so) a fault proxy between the sink and the
//! emulator. Every test uses its own topic and table, and compares what is
//! in the table with what it produced, record by record.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context;
use e2e::bigquery::{expected_row, int, BigQuerySide, Fault, FaultProxy, WriteApi, WriteProxy};
use e2e::broker::Broker;
use e2e::generator::{Generator, Mix};
use e2e::grpc_proxy::{CallFault, GrpcFault, GrpcFaultProxy};
use e2e::pipeline::{Coordinates, Instance, Item, Pipeline};
use e2e::{
    each_storage_api, each_write_api, kafka, unique, wait_for, wait_for_async, Stack, PARTITIONS,
};
use serde_json::Value;
use tonic::Code;

/// How long a test waits for dead letters, log lines, faults and readiness.
const TIMEOUT: Duration = Duration::from_secs(240);

/// `error.code` of the lines the sink refuses before BigQuery sees them.
const DECODE_CODES: [&str; 5] = [
    "not_json",
    "empty",
    "invalid_utf8",
    "not_an_object",
    "bad_timestamp",
];

/// A pipeline on `broker` into a fresh table of the emulator, written with
/// `api`; and the table's side, to query it.
async fn into_table(
    stack: &Stack,
    broker: Broker,
    api: WriteApi,
) -> anyhow::Result<(Pipeline, BigQuerySide)> {
    let bq = BigQuerySide::on_stack(stack)?.with(api);
    let p = Pipeline::new(stack, broker, Box::new(bq.clone())).await?;
    Ok((p, bq))
}

/// A pipeline on tansu into a fresh table, written to directly with `api`.
async fn on_tansu(api: WriteApi) -> anyhow::Result<(Pipeline, BigQuerySide)> {
    let stack = Stack::get()?;
    into_table(&stack, Broker::tansu(&stack), api).await
}

/// A pipeline on tansu into a fresh table, written with insertAll through
/// a fault proxy in front of the emulator (forwarding until told otherwise).
async fn through_proxy() -> anyhow::Result<(Pipeline, BigQuerySide, FaultProxy)> {
    match through_write_proxy(WriteApi::InsertAll).await? {
        (p, bq, WriteProxy::InsertAll(proxy)) => Ok((p, bq, proxy)),
        _ => anyhow::bail!("not insertAll's proxy"),
    }
}

/// A pipeline on tansu into a fresh table, written with `api` through its
/// fault proxy in front of the emulator (forwarding until told otherwise).
async fn through_write_proxy(
    api: WriteApi,
) -> anyhow::Result<(Pipeline, BigQuerySide, WriteProxy)> {
    let stack = Stack::get()?;
    let proxy = WriteProxy::start(&stack, api).await?;
    let bq = proxy.route(BigQuerySide::on_stack(&stack)?);
    let p = Pipeline::new(&stack, Broker::tansu(&stack), Box::new(bq.clone())).await?;
    Ok((p, bq, proxy))
}

/// A pipeline on tansu into a fresh table, written with the Storage Write
/// API (`api`) through a gRPC fault proxy in front of the emulator
/// (forwarding until told otherwise).
async fn through_grpc_proxy(
    api: WriteApi,
) -> anyhow::Result<(Pipeline, BigQuerySide, GrpcFaultProxy)> {
    match through_write_proxy(api).await? {
        (p, bq, WriteProxy::Storage(proxy, _)) => Ok((p, bq, proxy)),
        _ => anyhow::bail!("not the Storage Write API's proxy"),
    }
}

/// A pipeline on the mock cluster (tansu 0.6.0 forgets the commit metadata
/// this mode records its streams in) into a fresh table, written with
/// `--write-api storage-exactly-once` through a gRPC fault proxy in front of
/// the emulator.
async fn exactly_once_through_grpc_proxy(
) -> anyhow::Result<(Pipeline, BigQuerySide, GrpcFaultProxy)> {
    let stack = Stack::get()?;
    let proxy = GrpcFaultProxy::start(Some(&stack.bigquery_grpc_endpoint)).await?;
    let bq = BigQuerySide::on_stack(&stack)?
        .with(WriteApi::StorageExactlyOnce)
        .via_grpc(proxy.endpoint());
    let p = Pipeline::new(&stack, Broker::mock_cluster(3)?, Box::new(bq.clone())).await?;
    Ok((p, bq, proxy))
}

/// Events of every kind, timed over the two hours before now.
fn generator(seed: u64) -> Generator {
    Generator::new(seed, Mix::All, chrono::Utc::now().timestamp_millis())
}

/// `payload` as the sink must treat it: kept if it makes a row.
fn item(payload: Vec<u8>) -> Item {
    Item {
        kept: expected_row(&payload).is_some(),
        payload,
        truth: None,
    }
}

/// `n` events of every kind, a `bad_fraction` of them malformed lines.
fn events(seed: u64, n: usize, bad_fraction: f64) -> Vec<Item> {
    let mut generator = generator(seed).bad_fraction(bad_fraction);
    (0..n)
        .map(|_| item(generator.next_event().payload))
        .collect()
}

/// Coordinates of the records produced that `which` picks.
fn coordinates_of(p: &Pipeline, which: impl Fn(&Item) -> bool) -> BTreeSet<Coordinates> {
    p.records()
        .iter()
        .filter(|(_, item)| which(item))
        .map(|(at, _)| *at)
        .collect()
}

/// Waits until `relation` holds a row for each record the sink must keep,
/// then checks that it holds exactly those, once each.
async fn wait_landed(
    p: &Pipeline,
    bq: &BigQuerySide,
    relation: &str,
    instance: &Instance,
) -> anyhow::Result<()> {
    let kept = coordinates_of(p, |item| item.kept);
    bq.wait_rows(relation, kept.len(), instance).await?;
    bq.assert_exactly(relation, &p.topic, &kept).await
}

/// Checks the rows of the table where `filter` holds against the events
/// produced at their coordinates: the payload round-trips, `JSON_VALUE`
/// reads a field outside the schema, and the typed columns (and
/// `event_time`, where the payload gives it) are what `expected_row` says. Returns how many rows it checked.
async fn check_rows(p: &Pipeline, bq: &BigQuerySide, filter: &str) -> anyhow::Result<usize> {
    let rows = bq
        .emulator
        .query(&format!(
            "SELECT kafka_partition, kafka_offset, TO_JSON_STRING(payload), \
             JSON_VALUE(payload, '$.message'), event_time, info, user_id, keyword, movie_id, host \
             FROM {} WHERE {filter}",
            bq.emulator.sql_name(&bq.table)
        ))
        .await?;
    for row in &rows {
        let at = (
            i32::try_from(int(&row[0]).context("partition")?)?,
            int(&row[1]).context("offset")?,
        );
        let payload = &p
            .records()
            .get(&at)
            .context("a row nobody produced")?
            .payload;
        let original: Value = serde_json::from_slice(payload)?;
        let stored: Value = serde_json::from_str(row[2].as_str().context("payload")?)?;
        assert_eq!(stored, original, "payload of {at:?}");
        assert_eq!(
            row[3].as_str(),
            original["message"].as_str(),
            "JSON_VALUE of {at:?}"
        );
        let (time, columns) = expected_row(payload).context("a valid event")?;
        // Without `@timestamp` the sink takes the record's Kafka timestamp.
        if time.is_some() {
            assert_eq!(int(&row[4]), time, "event_time of {at:?}");
        }
        let got: Vec<Option<String>> = row[5..10]
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect();
        assert_eq!(got, columns.to_vec(), "typed columns of {at:?}");
    }
    Ok(rows.len())
}

/// Reads a dead letter for each record the sink must not keep, then
/// listens 3 s for more: each carries its source topic and coordinates and
/// the original bytes, with a reason, and comes once. Returns each one's
/// `error.code` and `error` by its coordinates.
fn dead_letters(p: &Pipeline) -> anyhow::Result<BTreeMap<Coordinates, (String, String)>> {
    let refused = coordinates_of(p, |item| !item.kept);
    let letters = kafka::read_at_least(
        p.broker.bootstrap(),
        &p.dlq(),
        refused.len(),
        TIMEOUT,
        Duration::from_secs(3),
    )?;
    let mut lettered = BTreeMap::new();
    for letter in letters {
        let header = |k: &str| letter.headers.get(k).cloned().unwrap_or_default();
        assert_eq!(header("source.topic"), p.topic);
        let at: Coordinates = (
            header("source.partition").parse()?,
            header("source.offset").parse()?,
        );
        let (code, reason) = (header("error.code"), header("error"));
        assert!(
            refused.contains(&at),
            "{at:?} should not be a dead letter: {code} {reason}"
        );
        assert_eq!(
            p.records().get(&at).map(|item| &item.payload),
            Some(&letter.payload),
            "dead letter {at:?} carries the original bytes"
        );
        assert!(!reason.is_empty(), "{at:?}: {code} without a reason");
        assert!(
            lettered.insert(at, (code, reason)).is_none(),
            "{at:?} dead-lettered twice"
        );
    }
    assert_eq!(
        lettered.len(),
        refused.len(),
        "each refused record in the DLQ"
    );
    Ok(lettered)
}

/// Waits until `instance` has logged what `logged` looks for and the proxy
/// has refused three writes (retried periodically): the sink must not be
/// ready then.
async fn wait_refused(
    instance: &Instance,
    faults_served: impl Fn() -> usize,
    what: &str,
    logged: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let log = &instance.service.log;
    let seen = wait_for(TIMEOUT, what, || {
        std::fs::read_to_string(log).is_ok_and(|l| logged(&l))
    })
    .await;
    instance.service.with_log(seen)?;
    wait_for(TIMEOUT, "three writes refused", || faults_served() >= 3).await?;
    assert!(
        !instance.ready().await?,
        "ready while every write is refused"
    );
    Ok(())
}

/// Once the cause of the refusals is fixed: every record lands once,
/// nothing was dead-lettered, and the sink is ready again.
async fn recovers(p: &Pipeline, bq: &BigQuerySide, instance: &Instance) -> anyhow::Result<()> {
    wait_landed(p, bq, &bq.table, instance).await?;
    dead_letters(p)?;
    wait_for_async(TIMEOUT, "readiness after the fix", || instance.ready()).await
}

each_write_api!(twenty_thousand_events_of_every_kind_land_once_with_their_payload);
async fn twenty_thousand_events_of_every_kind_land_once_with_their_payload(
    api: WriteApi,
) -> anyhow::Result<()> {
    let (mut p, bq) = on_tansu(api).await?;
    p.produce(events(1, 20_000, 0.0)).await?;
    let instance = p.start()?;
    wait_landed(&p, &bq, &bq.table, &instance).await?;

    // The table was created with the documented schema.
    let schema: Vec<String> = bq
        .emulator
        .schema(&bq.table)
        .await?
        .into_iter()
        .map(|(name, kind, mode)| format!("{name} {kind} {mode}"))
        .collect();
    assert_eq!(
        schema,
        [
            "event_time TIMESTAMP REQUIRED",
            "info STRING NULLABLE",
            "user_id STRING NULLABLE",
            "keyword STRING NULLABLE",
            "movie_id STRING NULLABLE",
            "host STRING NULLABLE",
            "payload JSON NULLABLE",
            "kafka_topic STRING NULLABLE",
            "kafka_partition INT64 NULLABLE",
            "kafka_offset INT64 NULLABLE",
            "ingested_at TIMESTAMP NULLABLE",
        ]
    );

    // A field outside the schema is queryable in every row: `message` is
    // unique per event.
    let t = bq.emulator.sql_name(&bq.table);
    let messages = bq
        .emulator
        .scalar(&format!(
            "SELECT COUNT(DISTINCT JSON_VALUE(payload, '$.message')) FROM {t}"
        ))
        .await?;
    assert_eq!(messages, 20_000);

    // Kinds as generated.
    let mut want_kinds: BTreeMap<String, i64> = BTreeMap::new();
    for item in p.records().values() {
        let value: Value = serde_json::from_slice(&item.payload)?;
        *want_kinds
            .entry(value["info"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let got_kinds: BTreeMap<String, i64> = bq
        .emulator
        .query(&format!("SELECT info, COUNT(*) FROM {t} GROUP BY info"))
        .await?
        .iter()
        .map(|row| {
            (
                row[0].as_str().unwrap_or_default().to_owned(),
                int(&row[1]).unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(got_kinds, want_kinds);

    // Row by row for a sample.
    assert_eq!(check_rows(&p, &bq, "kafka_offset < 100").await?, 300);
    dead_letters(&p)?;

    // Every batch of the instance went through one append stream; with
    // exactly-once, each through its own.
    let metrics = instance.metrics().await?;
    let streams = metrics.sum(sink_core::metrics::APPEND_STREAMS);
    let batches = metrics.sum(sink_core::metrics::BATCHES);
    let want = match api {
        WriteApi::InsertAll => 0.0,
        WriteApi::Storage => 1.0,
        WriteApi::StorageExactlyOnce => batches,
    };
    assert_eq!(streams, want, "append streams opened");
    assert!(batches > 10.0);
    if api == WriteApi::StorageExactlyOnce {
        // tansu 0.6.0 forgets commit metadata: the sink says what that costs.
        let log = std::fs::read_to_string(&instance.service.log)?;
        assert!(
            log.contains("the broker does not keep commit metadata"),
            "{log}"
        );
    }
    Ok(())
}

each_write_api!(rows_bigquery_refuses_go_to_the_dlq_with_its_reason_and_the_rest_lands);
async fn rows_bigquery_refuses_go_to_the_dlq_with_its_reason_and_the_rest_lands(
    api: WriteApi,
) -> anyhow::Result<()> {
    const YEAR_ZERO: &[u8] = br#"{"@timestamp":"0000"#;
    let (mut p, bq) = on_tansu(api).await?;
    // Malformed lines of every kind, and events BigQuery refuses: year 0 is
    // valid RFC 3339, but not a BigQuery TIMESTAMP.
    let mut items = events(2, 3_000, 0.1);
    for i in 0..30 {
        let year0 = format!(
            r#"{{"@timestamp":"0000-01-01T00:00:00Z","info":"login","user_id":"u{i}","message":"year 0 #{i}"}}"#
        );
        let payload = year0.into_bytes();
        assert!(payload.starts_with(YEAR_ZERO) && expected_row(&payload).is_some());
        items.insert(
            i * 100,
            Item {
                payload,
                kept: false,
                truth: None,
            },
        );
    }
    p.produce(items).await?;
    let refused_by_bigquery = coordinates_of(&p, |item| item.payload.starts_with(YEAR_ZERO));
    let refused_at_decode = coordinates_of(&p, |item| expected_row(&item.payload).is_none());
    let kept = coordinates_of(&p, |item| item.kept);
    assert!(
        refused_at_decode.len() > 50 && kept.len() > 2_700,
        "{} refused, {} kept",
        refused_at_decode.len(),
        kept.len()
    );

    let instance = p.start()?;
    wait_landed(&p, &bq, &bq.table, &instance).await?;
    for (at, (code, reason)) in dead_letters(&p)? {
        if refused_by_bigquery.contains(&at) {
            assert_eq!(code, "bigquery_invalid", "{at:?}: {reason}");
            assert!(
                reason.starts_with("BigQuery refused the row: ") && reason.contains("0000-01-01"),
                "{reason}"
            );
        } else {
            assert!(refused_at_decode.contains(&at), "{at:?}: {code} {reason}");
            assert!(DECODE_CODES.contains(&code.as_str()), "{at:?}: {code}");
        }
    }
    Ok(())
}

/// What Logstash sends with each `compression_type`: many records per
/// record batch, compressed, on a broker that serves them as Kafka does
/// (tansu needs one record per batch). Records inside a batch carry their
/// offsets as deltas from the batch's, so a slip there would file events
/// under the wrong coordinates, skip them or repeat them: every valid event
/// lands once, at its coordinates and with its own payload, and every
/// malformed line is dead-lettered once.
async fn compressed_batches_land_exactly_once(
    compression: &str,
    api: WriteApi,
) -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let (mut p, bq) = into_table(&stack, Broker::mock_cluster(3)?, api).await?;
    p.logstash_production(compression)?;
    p.produce(events(10, 5_000, 0.02)).await?;
    let kept = coordinates_of(&p, |item| item.kept);
    let refused = p.records().len() - kept.len();
    assert!(
        refused > 50 && kept.len() > 4_800,
        "{refused} refused, {} kept",
        kept.len()
    );

    let instance = p.start()?;
    wait_landed(&p, &bq, &bq.table, &instance).await?;
    assert_eq!(check_rows(&p, &bq, "TRUE").await?, kept.len());
    for (at, (code, reason)) in dead_letters(&p)? {
        assert!(
            DECODE_CODES.contains(&code.as_str()),
            "{at:?}: {code} {reason}"
        );
    }
    Ok(())
}

each_write_api!(gzip_batches_land_exactly_once);
async fn gzip_batches_land_exactly_once(api: WriteApi) -> anyhow::Result<()> {
    compressed_batches_land_exactly_once("gzip", api).await
}

each_write_api!(snappy_batches_land_exactly_once);
async fn snappy_batches_land_exactly_once(api: WriteApi) -> anyhow::Result<()> {
    compressed_batches_land_exactly_once("snappy", api).await
}

each_write_api!(lz4_batches_land_exactly_once);
async fn lz4_batches_land_exactly_once(api: WriteApi) -> anyhow::Result<()> {
    compressed_batches_land_exactly_once("lz4", api).await
}

each_write_api!(zstd_batches_land_exactly_once);
async fn zstd_batches_land_exactly_once(api: WriteApi) -> anyhow::Result<()> {
    compressed_batches_land_exactly_once("zstd", api).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_dropped_connections_lose_nothing() -> anyhow::Result<()> {
    let (mut p, bq, proxy) = through_proxy().await?;
    p.produce(events(3, 10_000, 0.0)).await?;
    proxy.set_faults(vec![
        Fault::Status(500),
        Fault::Forward,
        Fault::Status(429),
        Fault::Drop,
        Fault::Forward,
        Fault::DropAfterForward,
        Fault::PlainStatus(503),
        Fault::Status(502),
        Fault::Forward,
    ]);
    let instance = p.start_with(&["--batch-max-rows", "100"])?;
    wait_for(TIMEOUT, "40 faults served", || proxy.faults_served() >= 40).await?;
    proxy.clear_faults();
    let served = proxy.served();
    assert_eq!(
        served.len(),
        6,
        "every kind of fault was served: {served:?}"
    );

    let view = bq.create_dedup_view().await?;
    wait_landed(&p, &bq, &view, &instance).await?;
    // Forwarded-then-dropped requests were stored and sent again.
    assert!(bq.count(&bq.table).await? >= 10_000);
    dead_letters(&p)?;
    Ok(())
}

/// The Storage Write API's connection cut under the sink, five times while
/// it writes: appends in flight fail, the stream is opened again on a new
/// connection, and every row lands (repeats only where a cut lost the reply
/// to a stored append, which the de-duplicated view absorbs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_append_streams_are_opened_again_and_lose_nothing() -> anyhow::Result<()> {
    const CUTS: usize = 5;
    let stack = Stack::get()?;
    let emulator = stack
        .bigquery_grpc_endpoint
        .trim_start_matches("http://")
        .parse()?;
    let front = e2e::tcp_front::TcpFront::start(emulator).await?;
    let bq = BigQuerySide::on_stack(&stack)?
        .with(WriteApi::Storage)
        .via_grpc(format!("http://{}", front.addr()));
    let mut p = Pipeline::new(&stack, Broker::tansu(&stack), Box::new(bq.clone())).await?;
    p.produce(events(12, 20_000, 0.0)).await?;
    let instance = p.start_with(&["--batch-max-events", "100"])?;
    let mut cut = 0;
    for k in 1..=CUTS {
        let rows = i64::try_from(k * 2_000)?;
        wait_for_async(TIMEOUT, "rows to arrive", || async {
            Ok(bq.count(&bq.table).await? >= rows)
        })
        .await?;
        // The sink opens its next connection at its next append.
        wait_for(TIMEOUT, "an open connection", || front.live() > 0).await?;
        cut += front.cut();
    }
    assert!(cut >= CUTS, "{cut} connections cut");

    let view = bq.create_dedup_view().await?;
    wait_landed(&p, &bq, &view, &instance).await?;
    let metrics = instance.metrics().await?;
    let streams = metrics.sum(sink_core::metrics::APPEND_STREAMS);
    assert!(
        streams > CUTS as f64,
        "{streams} append streams for {CUTS} cuts"
    );
    dead_letters(&p)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_rows_bigquery_did_not_take_are_sent_again() -> anyhow::Result<()> {
    let (mut p, bq, proxy) = through_proxy().await?;
    p.produce(events(6, 5_000, 0.0)).await?;
    // Rows refused with `backendError`, and requests refused as too large
    // (nothing stored): no row may end up twice in the table itself.
    proxy.set_faults(vec![
        Fault::FailOddRows,
        Fault::TooLargeAbove(60),
        Fault::Forward,
    ]);
    let instance = p.start_with(&["--batch-max-rows", "200"])?;
    wait_landed(&p, &bq, &bq.table, &instance).await?;
    let served = proxy.served();
    assert!(
        served.get("FailOddRows").copied().unwrap_or(0) > 0,
        "{served:?}"
    );
    assert!(
        served.get("TooLargeAbove(60)").copied().unwrap_or(0) > 0,
        "{served:?}"
    );
    // A request refused as too large came back in halves.
    let inserts = proxy.inserts();
    assert!(
        inserts.iter().any(|i| i.rows > 60) && inserts.iter().any(|i| i.rows <= 60 && i.rows > 1),
        "{inserts:?}"
    );
    dead_letters(&p)?;
    Ok(())
}

each_write_api!(sigkill_mid_stream_and_restart_lose_nothing);
/// Killed while writing, then restarted: every row lands, in the
/// de-duplicated view; with exactly-once, in the table itself (on the mock
/// cluster: tansu 0.6.0 forgets commit metadata).
async fn sigkill_mid_stream_and_restart_lose_nothing(api: WriteApi) -> anyhow::Result<()> {
    let (mut p, bq) = if api == WriteApi::StorageExactlyOnce {
        into_table(&Stack::get()?, Broker::mock_cluster(3)?, api).await?
    } else {
        on_tansu(api).await?
    };
    p.produce(events(4, 20_000, 0.0)).await?;
    let instance = p.start()?;
    bq.wait_rows(&bq.table, 4_000, &instance).await?;
    instance.service.kill()?;
    let written = bq.count(&bq.table).await?;
    assert!(
        written < 20_000,
        "killed after everything was written ({written} rows): not mid-stream"
    );
    let instance = p.restart_alone(&[]).await?;
    let relation = if api == WriteApi::StorageExactlyOnce {
        bq.table.clone()
    } else {
        bq.create_dedup_view().await?
    };
    wait_landed(&p, &bq, &relation, &instance).await?;
    dead_letters(&p)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_over_the_byte_limit_is_sent() -> anyhow::Result<()> {
    const MAX_BYTES: usize = 200_000;
    const MAX_ROWS: usize = 7;
    let (mut p, bq, proxy) = through_proxy().await?;
    // Big events whose quotes and backslashes double in size once the
    // payload is a JSON string inside the request, between ordinary ones.
    let mut generator = generator(5);
    let now = chrono::Utc::now().to_rfc3339();
    let items = (0..400)
        .map(|i| {
            item(if i % 2 == 0 {
                let message = format!("{}#{i}", "\"\\".repeat(3_000 + i * 10));
                serde_json::json!({"@timestamp": now, "info": "big", "message": message})
                    .to_string()
                    .into_bytes()
            } else {
                generator.next_event().payload
            })
        })
        .collect();
    p.produce(items).await?;
    let instance = p.start_with(&[
        "--batch-max-bytes",
        &MAX_BYTES.to_string(),
        "--batch-max-rows",
        &MAX_ROWS.to_string(),
    ])?;
    wait_landed(&p, &bq, &bq.table, &instance).await?;

    let inserts = proxy.inserts();
    let largest = inserts.iter().map(|i| i.bytes).max().unwrap_or(0);
    assert!(largest <= MAX_BYTES, "a {largest}-byte request was sent");
    assert!(inserts.iter().all(|i| i.rows <= MAX_ROWS), "{inserts:?}");
    // The limit binds (big events are ~24 KB, ~48 KB as rows) and requests are packed.
    assert!(largest > MAX_BYTES / 2, "largest request {largest} bytes");
    assert_eq!(
        inserts.iter().map(|i| i.rows).sum::<usize>(),
        400,
        "each row sent once"
    );

    // The big payloads arrived whole.
    assert_eq!(check_rows(&p, &bq, "info = 'big'").await?, 200);
    dead_letters(&p)?;
    Ok(())
}

/// The table the sink creates has the partitioning and clustering its
/// flags ask for, and the rows land in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_is_created_with_the_layout_asked_for() -> anyhow::Result<()> {
    let (mut p, bq) = on_tansu(WriteApi::InsertAll).await?;
    p.produce(events(13, 500, 0.0)).await?;
    let instance = p.start_with(&[
        "--partition-field",
        "ingested_at",
        "--partition-granularity",
        "HOUR",
        "--partition-expiration-days",
        "7",
        "--require-partition-filter",
        "--clustering-fields",
        "kafka_partition,info",
    ])?;
    wait_landed(&p, &bq, &bq.table, &instance).await?;
    let table = bq.emulator.table(&bq.table).await?;
    assert_eq!(
        table["timePartitioning"],
        serde_json::json!({
            "type": "HOUR",
            "field": "ingested_at",
            "expirationMs": "604800000",
            "requirePartitionFilter": true
        }),
        "{table}"
    );
    assert_eq!(
        table["clustering"]["fields"],
        serde_json::json!(["kafka_partition", "info"]),
        "{table}"
    );
    Ok(())
}

each_write_api!(start_up_problems_stop_the_sink_with_one_clear_line);
async fn start_up_problems_stop_the_sink_with_one_clear_line(api: WriteApi) -> anyhow::Result<()> {
    let (mut p, bq) = on_tansu(api).await?;
    // An existing table lacking columns.
    bq.emulator
        .create_table(
            &bq.table,
            serde_json::json!([
                {"name": "event_time", "type": "TIMESTAMP", "mode": "REQUIRED"},
                {"name": "info", "type": "STRING"},
                {"name": "kafka_offset", "type": "STRING"},
            ]),
        )
        .await?;
    let missing_dataset = unique("nope").replace('-', "_");
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &[],
            &[
                "cannot hold the sink's rows",
                "`payload` is missing",
                "`kafka_offset` is STRING (want INT64)",
                "ALTER TABLE",
            ],
        ),
        (
            &["--dataset", missing_dataset.as_str()],
            &["does not exist", missing_dataset.as_str()],
        ),
        (
            &["--batch-max-bytes", "10485760"],
            &["--batch-max-bytes", "10 MB"],
        ),
    ];
    for (extra, want) in cases {
        let mut instance = p.start_with(extra)?;
        let code = instance.service.wait(Duration::from_secs(60)).await?;
        let log = std::fs::read_to_string(&instance.service.log)?;
        assert_eq!(code, Some(1), "{extra:?}: {log}");
        let line = log
            .lines()
            .find(|l| l.starts_with("error: "))
            .with_context(|| format!("no error line: {log}"))?;
        for needle in want {
            assert!(
                line.contains(needle),
                "{extra:?}: {line:?} lacks {needle:?}"
            );
        }
        assert!(!log.contains("panicked"), "{log}");
    }
    Ok(())
}

each_storage_api!(storage_errors_and_ended_streams_lose_nothing);
/// The Storage Write API's failures: error replies, streams ended before
/// or after the rows were stored, a throughput quota. Every row lands (the
/// view exact; with exactly-once, the table itself), none dead-lettered.
async fn storage_errors_and_ended_streams_lose_nothing(api: WriteApi) -> anyhow::Result<()> {
    let (mut p, bq, proxy) = through_grpc_proxy(api).await?;
    p.produce(events(3, 10_000, 0.0)).await?;
    proxy.set_faults(vec![
        GrpcFault::Reply(Code::Unavailable, "backend unavailable"),
        GrpcFault::Forward,
        GrpcFault::Reply(Code::Internal, "internal error"),
        GrpcFault::EndStream(Code::Unavailable, "connection reset"),
        GrpcFault::Forward,
        GrpcFault::EndStreamAfterForward,
        GrpcFault::Reply(
            Code::ResourceExhausted,
            "Exceeds 'AppendRows throughput' quota, user_id: x (status: INSUFFICIENT_TOKENS)",
        ),
        GrpcFault::Reply(Code::Aborted, "aborted"),
        GrpcFault::Forward,
    ]);
    let instance = p.start_with(&["--batch-max-events", "100"])?;
    wait_for(TIMEOUT, "40 faults served", || proxy.faults_served() >= 40).await?;
    proxy.clear_faults();
    let served = proxy.served();
    assert_eq!(
        served.len(),
        6,
        "every kind of fault was served: {served:?}"
    );

    if api == WriteApi::StorageExactlyOnce {
        // Appends stored before their stream ended were abandoned with it.
        wait_landed(&p, &bq, &bq.table, &instance).await?;
    } else {
        let view = bq.create_dedup_view().await?;
        wait_landed(&p, &bq, &view, &instance).await?;
        // Appends stored before their stream ended were sent again.
        assert!(bq.count(&bq.table).await? > 10_000);
    }
    assert!(dead_letters(&p)?.is_empty());
    assert!(proxy.streams() > 1, "ended streams were opened again");
    Ok(())
}

each_storage_api!(storage_appends_found_too_large_are_halved);
/// An append the API finds too large (nothing stored) is sent in halves;
/// no row lands twice in the table itself.
async fn storage_appends_found_too_large_are_halved(api: WriteApi) -> anyhow::Result<()> {
    let (mut p, bq, proxy) = through_grpc_proxy(api).await?;
    p.produce(events(6, 5_000, 0.0)).await?;
    // Every append over 60 rows is refused: only halves get through.
    proxy.set_faults(vec![GrpcFault::TooLargeAbove(60)]);
    let instance = p.start_with(&["--batch-max-events", "200"])?;
    wait_landed(&p, &bq, &bq.table, &instance).await?;
    assert!(
        proxy
            .served()
            .get("TooLargeAbove(60)")
            .copied()
            .unwrap_or(0)
            > 0
    );
    let log = std::fs::read_to_string(&instance.service.log)?;
    assert!(log.contains("sending it in halves"), "{log}");
    assert!(dead_letters(&p)?.is_empty());
    Ok(())
}

each_storage_api!(storage_rows_named_bad_go_to_the_dlq_and_the_rest_lands_once);
/// Rows the Storage Write API names as bad (`row_errors`; nothing of that
/// append stored) go to the DLQ with its message; the rest of the append
/// is sent again and lands once.
async fn storage_rows_named_bad_go_to_the_dlq_and_the_rest_lands_once(
    api: WriteApi,
) -> anyhow::Result<()> {
    let (mut p, bq, proxy) = through_grpc_proxy(api).await?;
    p.produce(events(14, 3_000, 0.0)).await?;
    proxy.set_faults(vec![
        GrpcFault::RefuseFirstRow,
        GrpcFault::Forward,
        GrpcFault::Forward,
    ]);
    let instance = p.start_with(&["--batch-max-events", "100"])?;
    wait_for(TIMEOUT, "10 rows refused", || proxy.faults_served() >= 10).await?;
    proxy.clear_faults();
    let refused = proxy.faults_served();

    // Every record is a row or a dead letter, never both, never twice.
    let mut lettered = BTreeSet::new();
    let letters = kafka::read_at_least(
        p.broker.bootstrap(),
        &p.dlq(),
        refused,
        TIMEOUT,
        Duration::from_secs(3),
    )?;
    for letter in &letters {
        let header = |k: &str| letter.headers.get(k).cloned().unwrap_or_default();
        assert_eq!(header("error.code"), "bigquery_invalid");
        assert_eq!(
            header("error"),
            "BigQuery refused the row: Field event_time: refused by the fault proxy"
        );
        let at: Coordinates = (
            header("source.partition").parse()?,
            header("source.offset").parse()?,
        );
        assert!(lettered.insert(at), "{at:?} dead-lettered twice");
    }
    assert_eq!(lettered.len(), refused, "one dead letter per refused row");
    let rows: BTreeSet<Coordinates> = coordinates_of(&p, |_| true)
        .difference(&lettered)
        .copied()
        .collect();
    bq.wait_rows(&bq.table, rows.len(), &instance).await?;
    bq.assert_exactly(&bq.table, &p.topic, &rows).await
}

each_storage_api!(storage_a_throughput_quota_is_waited_out_not_split);
/// A throughput quota (`RESOURCE_EXHAUSTED`, "Exceeds ... quota") is waited
/// out: appends are sent again whole, never split or dead-lettered.
async fn storage_a_throughput_quota_is_waited_out_not_split(api: WriteApi) -> anyhow::Result<()> {
    let (mut p, bq, proxy) = through_grpc_proxy(api).await?;
    p.produce(events(15, 1_000, 0.0)).await?;
    proxy.set_faults(vec![GrpcFault::Reply(
        Code::ResourceExhausted,
        "Exceeds 'AppendRows throughput' quota, user_id: x (status: INSUFFICIENT_TOKENS)",
    )]);
    let instance = p.start_with(&["--batch-max-events", "100"])?;
    // Exactly-once writes one batch at a time: its refusals come one after
    // the other, each after a longer backoff.
    let refusals = if api == WriteApi::StorageExactlyOnce {
        6
    } else {
        20
    };
    wait_for(TIMEOUT, "appends refused", || {
        proxy.faults_served() >= refusals
    })
    .await?;
    proxy.clear_faults();
    wait_landed(&p, &bq, &bq.table, &instance).await?;
    assert!(dead_letters(&p)?.is_empty());
    let log = std::fs::read_to_string(&instance.service.log)?;
    assert!(
        !log.contains("sending it in halves"),
        "appends were split: {log}"
    );
    Ok(())
}

each_storage_api!(storage_appends_refused_without_rows_named_dead_letter_nothing);
/// An append refused as `INVALID_ARGUMENT` without rows named is about the
/// request or the table, not its rows (Google names bad rows): nothing is
/// dead-lettered or committed, readiness turns false, and every row lands
/// once the refusals stop.
async fn storage_appends_refused_without_rows_named_dead_letter_nothing(
    api: WriteApi,
) -> anyhow::Result<()> {
    let (mut p, bq, proxy) = through_grpc_proxy(api).await?;
    p.produce(events(16, 1_000, 0.0)).await?;
    proxy.set_faults(vec![GrpcFault::Reply(
        Code::InvalidArgument,
        "Invalid proto schema: the descriptor has an unsupported field",
    )]);
    let instance = p.start()?;
    wait_refused(
        &instance,
        || proxy.faults_served(),
        "the refusal in the log",
        |l| l.contains("bad_request") && l.contains("Invalid proto schema"),
    )
    .await?;
    assert_eq!(bq.count(&bq.table).await?, 0);
    assert_eq!(
        p.committed_by(&p.group).await?,
        vec![None; PARTITIONS as usize],
        "nothing committed while refused"
    );
    proxy.clear_faults();
    recovers(&p, &bq, &instance).await
}

each_storage_api!(storage_no_append_over_the_request_limit_is_sent);
/// Big rows through the Storage Write API: no append passes the API's
/// 10 MB request limit, each row is sent once, and the payloads arrive
/// whole.
async fn storage_no_append_over_the_request_limit_is_sent(api: WriteApi) -> anyhow::Result<()> {
    const LIMIT: usize = 10 * 1024 * 1024;
    let (mut p, bq, proxy) = through_grpc_proxy(api).await?;
    let now = chrono::Utc::now().to_rfc3339();
    let items = (0..600)
        .map(|i| {
            let message = format!("{}#{i}", "x\"\\".repeat(10_000 + i * 10));
            item(
                serde_json::json!({"@timestamp": now, "info": "big", "message": message})
                    .to_string()
                    .into_bytes(),
            )
        })
        .collect();
    p.produce(items).await?;
    let instance = p.start()?;
    wait_landed(&p, &bq, &bq.table, &instance).await?;
    let appends = proxy.appends();
    let largest = appends.iter().map(|a| a.bytes).max().unwrap_or(0);
    assert!(largest < LIMIT, "a {largest}-byte append was sent");
    // The limit binds: batches of up to 9 MB of messages fill appends.
    assert!(largest > LIMIT / 2, "largest append {largest} bytes");
    assert_eq!(
        appends.iter().map(|a| a.rows).sum::<usize>(),
        600,
        "each row sent once"
    );
    assert_eq!(check_rows(&p, &bq, "info = 'big'").await?, 600);
    Ok(())
}

/// Exactly-once: the sink dies while a batch's stream is being committed,
/// before it knows whether the commit happened: the commit took effect and
/// its reply was lost, or it never reached BigQuery. The stream was
/// recorded in Kafka's commit metadata first, so the next instance commits
/// it (again: a no-op if it was) and skips its records instead of writing
/// them twice: the table itself holds every row once. On the mock cluster:
/// tansu 0.6.0 forgets commit metadata.
async fn a_batch_whose_commit_outcome_is_lost_is_not_written_again(
    fault: CallFault,
) -> anyhow::Result<()> {
    let (mut p, bq, proxy) = exactly_once_through_grpc_proxy().await?;
    p.produce(events(21, 3_000, 0.0)).await?;
    proxy.set_call_fault("BatchCommitWriteStreams", fault);
    let commits = || {
        proxy
            .calls()
            .get("BatchCommitWriteStreams")
            .copied()
            .unwrap_or(0)
    };
    let instance = p.start_with(&["--batch-max-events", "1000"])?;
    wait_for(TIMEOUT, "a stream's commit", || commits() >= 1).await?;
    if fault == CallFault::HangAfterForward {
        wait_for_async(TIMEOUT, "the committed stream's rows", || async {
            Ok(bq.count(&bq.table).await? > 0)
        })
        .await?;
    }
    instance.service.kill()?;
    if fault != CallFault::HangAfterForward {
        assert_eq!(bq.count(&bq.table).await?, 0, "no commit went through");
    }
    proxy.clear_call_faults();

    let instance = p.restart_alone(&["--batch-max-events", "1000"]).await?;
    wait_landed(&p, &bq, &bq.table, &instance).await?;
    let log = std::fs::read_to_string(&instance.service.log)?;
    assert!(
        log.contains("the last owner's staged write is visible"),
        "{log}"
    );
    assert!(!log.contains("does not keep commit metadata"), "{log}");
    dead_letters(&p)?;
    Ok(())
}

/// Exactly-once: the sink is stopped (SIGTERM) while a batch's commit hangs
/// after taking effect, once earlier batches were committed. Its shutdown
/// gives up on the batch and commits its partitions where they stand, which
/// must keep the batch's record: the next instance then finds the batch
/// committed and does not write it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_a_commit_hangs_keeps_the_record_of_its_batch() -> anyhow::Result<()> {
    let (mut p, bq, proxy) = exactly_once_through_grpc_proxy().await?;
    p.produce(events(22, 6_000, 0.0)).await?;
    let mut instance = p.start_with(&["--batch-max-events", "300"])?;
    wait_for_async(TIMEOUT, "a committed batch", || async {
        Ok(bq.count(&bq.table).await? > 0)
    })
    .await?;
    proxy.set_call_fault("BatchCommitWriteStreams", CallFault::HangAfterForward);
    wait_for(TIMEOUT, "a commit hanging", || proxy.faults_served() >= 1).await?;
    instance.service.signal("TERM")?;
    instance.service.wait(TIMEOUT).await?;
    proxy.clear_call_faults();

    let instance = p.restart_alone(&["--batch-max-events", "300"]).await?;
    wait_landed(&p, &bq, &bq.table, &instance).await?;
    dead_letters(&p)?;
    Ok(())
}

/// Exactly-once: BigQuery answers a stream's commit with an error of the
/// whole call (here `FAILED_PRECONDITION`, as for a stream it no longer
/// keeps) rather than one in `stream_errors`. The sink asks the stream
/// itself: not committed, so its records are written again on a new stream
/// (a warning says so) instead of the commit being retried for ever as an
/// operator's error. Every record lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_commit_is_refused_as_a_whole_is_written_again_once() -> anyhow::Result<()> {
    let (mut p, bq, proxy) = exactly_once_through_grpc_proxy().await?;
    p.produce(events(23, 3_000, 0.0)).await?;
    proxy.set_call_fault(
        "BatchCommitWriteStreams",
        CallFault::Fail(
            Code::FailedPrecondition,
            "the fault proxy: the stream expired",
        ),
    );
    let instance = p.start_with(&["--batch-max-events", "1000"])?;
    instance
        .service
        .wait_for_log(Duration::from_secs(60), "a stream written again", |log| {
            log.contains("the stream cannot be committed and was not")
        })
        .await?;
    proxy.clear_call_faults();
    wait_landed(&p, &bq, &bq.table, &instance).await?;
    dead_letters(&p)?;
    Ok(())
}

mod a_batch_whose_commit_outcome_is_lost_is_not_written_again {
    use super::*;

    /// The commit took effect; its reply never came.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reply_lost() -> anyhow::Result<()> {
        super::a_batch_whose_commit_outcome_is_lost_is_not_written_again(
            CallFault::HangAfterForward,
        )
        .await
    }

    /// The commit never reached BigQuery.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commit_failed() -> anyhow::Result<()> {
        super::a_batch_whose_commit_outcome_is_lost_is_not_written_again(CallFault::Fail(
            Code::Unavailable,
            "the fault proxy failed the commit",
        ))
        .await
    }
}

each_write_api!(a_schema_changed_while_running_waits_for_the_fix_instead_of_dead_lettering);
/// A column dropped while the sink runs: BigQuery refuses every write (as
/// invalid rows with insertAll; by ending the stream with the Storage Write
/// API). That is the table's fault, not the rows': nothing may be
/// dead-lettered or committed, readiness turns false. After the column is
/// back, BigQuery's write path may still have the old schema for a while:
/// the table looks right, the refusals go on, and they are still the
/// table's. Once they stop, every row lands once.
async fn a_schema_changed_while_running_waits_for_the_fix_instead_of_dead_lettering(
    api: WriteApi,
) -> anyhow::Result<()> {
    let (mut p, bq, proxy) = through_write_proxy(api).await?;
    let instance = p.start()?;
    p.produce(events(8, 1_000, 0.0)).await?;
    bq.wait_rows(&bq.table, 1_000, &instance).await?;

    let documented = bq.emulator.schema_fields(&bq.table).await?;
    let without_host: Vec<Value> = documented
        .as_array()
        .context("schema fields")?
        .iter()
        .filter(|field| field["name"] != "host")
        .cloned()
        .collect();
    bq.emulator
        .set_schema(&bq.table, Value::Array(without_host))
        .await?;
    proxy.refuse_unknown_host_column();
    p.produce(events(9, 1_000, 0.0)).await?;
    wait_refused(
        &instance,
        || proxy.faults_served(),
        "the schema problem in the log",
        |l| l.contains("table_schema_changed") && l.contains("column `host` is missing"),
    )
    .await?;
    assert_eq!(bq.count(&bq.table).await?, 1_000);
    dead_letters(&p)?;

    bq.emulator.set_schema(&bq.table, documented).await?;
    let before = proxy.faults_served();
    wait_for(TIMEOUT, "three more refusals", || {
        proxy.faults_served() >= before + 3
    })
    .await?;
    assert_eq!(bq.count(&bq.table).await?, 1_000);
    dead_letters(&p)?;
    proxy.clear_faults();
    recovers(&p, &bq, &instance).await
}

each_write_api!(permission_denied_turns_readiness_false_until_fixed_and_loses_nothing);
/// BigQuery denies the sink's account the right to write: readiness false
/// with the operator's message, nothing stored or committed; every row
/// lands once access is granted.
async fn permission_denied_turns_readiness_false_until_fixed_and_loses_nothing(
    api: WriteApi,
) -> anyhow::Result<()> {
    let (mut p, bq, proxy) = through_write_proxy(api).await?;
    p.produce(events(7, 2_000, 0.0)).await?;
    proxy.deny_access();
    let instance = p.start()?;
    wait_refused(
        &instance,
        || proxy.faults_served(),
        "the operator message in the log",
        |l| l.contains("roles/bigquery.dataEditor"),
    )
    .await?;
    assert_eq!(bq.count(&bq.table).await?, 0);
    assert_eq!(
        p.committed_by(&p.group).await?,
        vec![None; PARTITIONS as usize],
        "nothing committed while denied"
    );
    proxy.clear_faults();
    recovers(&p, &bq, &instance).await
}

each_write_api!(workload_identity_federation_tokens_reach_every_write);
/// Workload Identity Federation: an `external_account` file whose subject
/// token is a mounted file (a projected Kubernetes service-account token,
/// an OIDC token). The sink exchanges it at the Security Token Service,
/// impersonates the service account with the result, and every write
/// (insertAll request, append stream) carries that last token; the rows
/// land exactly.
async fn workload_identity_federation_tokens_reach_every_write(
    api: WriteApi,
) -> anyhow::Result<()> {
    use e2e::fake_google::{FakeGoogle, IMPERSONATED_TOKEN, STS_TOKEN};

    let (mut p, bq, proxy) = through_write_proxy(api).await?;
    let google = FakeGoogle::start()?;
    let dir = Stack::get()?.dir.join(unique("wif"));
    std::fs::create_dir_all(&dir)?;
    let subject = dir.join("token");
    std::fs::write(&subject, "subject-jwt-from-kubernetes")?;
    let credentials = dir.join("external-account.json");
    google.write_external_account(&credentials, &subject)?;
    p.produce(events(21, 300, 0.0)).await?;
    let instance = p.start_with(&["--credentials", &credentials.display().to_string()])?;
    wait_landed(&p, &bq, &bq.table, &instance).await?;

    let authorizations = proxy.authorizations();
    assert!(!authorizations.is_empty());
    let bearer = format!("Bearer {IMPERSONATED_TOKEN}");
    for authorization in &authorizations {
        assert_eq!(authorization.as_deref(), Some(bearer.as_str()));
    }
    let exchanges = google.seen_at("POST /sts");
    assert!(
        exchanges
            .first()
            .is_some_and(|s| s.body.contains("subject_token=subject-jwt-from-kubernetes")),
        "{exchanges:?}"
    );
    let impersonations = google.seen_at("POST /impersonate/");
    let sts_bearer = format!("authorization: bearer {}", STS_TOKEN.to_ascii_lowercase());
    assert!(
        impersonations.first().is_some_and(|s| s
            .headers
            .iter()
            .any(|h| h.to_ascii_lowercase() == sts_bearer)),
        "{impersonations:?}"
    );
    Ok(())
}

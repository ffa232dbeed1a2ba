//! The read side end to end: windows exact to the minute, the capped
//! all-time ranking, reads on a replica with a read-only user, the read
//! API and its live page in a real browser. The rankings are written by the
//! real redis-sink from records on the real broker.

use std::collections::BTreeMap;
use std::time::Duration;

use e2e::generator::Truth;
use e2e::on_both;
use e2e::pipeline::{Item, Pipeline};
use e2e::process::PrivateRedis;
use e2e::read_api::{members, ReadApi};
use e2e::redis::{caught_up, command_calls, on_stack, pipeline, RedisSide, Topology};
use e2e::{unique, Stack};
use redis_sink::decode::Kind;
use redis_sink::keys::{Keys, MS_PER_HOUR, MS_PER_MINUTE};
use redis_sink::window::Window;

/// A search event at `time_ms` as Logstash sends it, and what it counts.
fn search_at(keyword: &str, user: Option<&str>, time_ms: i64) -> Item {
    event_at("search", "keyword", keyword, user, time_ms)
}

/// A movie_detail event at `time_ms`.
fn movie_at(movie: &str, user: Option<&str>, time_ms: i64) -> Item {
    event_at("movie_detail", "movie_id", movie, user, time_ms)
}

fn event_at(
    info: &'static str,
    field: &str,
    member: &str,
    user: Option<&str>,
    time_ms: i64,
) -> Item {
    let timestamp = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(time_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut event = serde_json::json!({ "@timestamp": timestamp, "info": info, field: member });
    if let Some(user) = user {
        event["user_id"] = user.into();
    }
    Item {
        payload: event.to_string().into_bytes(),
        kept: true,
        truth: Some(Truth {
            info,
            member: member.to_owned(),
            user: user.map(str::to_owned),
            time_ms,
        }),
    }
}

/// Member → count over the events of `kind` whose minute lies in the
/// window of `minutes` ending at `now_ms` (the current minute included).
fn counted(p: &Pipeline, kind: Kind, minutes: i64, now_ms: i64) -> BTreeMap<String, u64> {
    let current = now_ms.div_euclid(MS_PER_MINUTE);
    let info = if kind == Kind::Search {
        "search"
    } else {
        "movie_detail"
    };
    let mut counts = BTreeMap::new();
    for truth in p.truths().filter(|t| t.info == info) {
        let minute = truth.time_ms.div_euclid(MS_PER_MINUTE);
        if (current - minutes + 1..=current).contains(&minute) {
            *counts.entry(truth.member.clone()).or_default() += 1;
        }
    }
    counts
}

on_both!(windows_count_exactly_the_minutes_they_cover);
/// Events on every minute from one hour before a clock hour to two after
/// it, some on a minute's first and last millisecond; every window from 1
/// minute to 3 hours, read at moments around minute and hour edges, counts
/// exactly the events of the minutes it covers.
async fn windows_count_exactly_the_minutes_they_cover(topology: Topology) -> anyhow::Result<()> {
    let (mut p, redis, _) = on_stack(topology).await?;
    let now = chrono::Utc::now().timestamp_millis();
    // A clock hour 3 to 4 hours ago: everything stays inside the retention.
    let hour = (now - 3 * MS_PER_HOUR).div_euclid(MS_PER_HOUR) * MS_PER_HOUR;
    let mut items = Vec::new();
    for minute in -60..120_i64 {
        let start = hour + minute * MS_PER_MINUTE;
        let keyword = format!("k{}", minute.rem_euclid(4));
        // 1 to 3 events a minute: its first ms, its last, one between.
        for (n, offset) in [0, MS_PER_MINUTE - 1, 12_345].into_iter().enumerate() {
            if n as i64 <= minute.rem_euclid(3) {
                items.push(search_at(&keyword, Some("u1"), start + offset));
            }
        }
        if minute.rem_euclid(7) == 0 {
            items.push(movie_at(
                &format!("m{}", minute.rem_euclid(2)),
                None,
                start + 30_000,
            ));
        }
    }
    p.produce(items).await?;
    let instance = p.start()?;
    caught_up(&p, &instance).await?;
    redis.assert_matches(p.truths()).await?;

    let keys = Keys::new(&redis.prefix);
    let mut conn = redis.connect().await?;
    let moments = [
        hour,                                    // an hour's first ms
        hour - 1,                                // the last ms before it
        hour + 30 * MS_PER_MINUTE + 30_000,      // mid-minute, mid-hour
        hour + MS_PER_HOUR + 59 * MS_PER_MINUTE, // the last minute of an hour
        hour + 2 * MS_PER_HOUR - 1,
    ];
    for now_ms in moments {
        for minutes in [1_u32, 2, 59, 60, 61, 90, 119, 120, 121, 180] {
            for kind in [Kind::Search, Kind::Movie] {
                let window = Window::Last { minutes };
                let got: BTreeMap<String, u64> =
                    redis_sink::query::counts(&mut conn, &keys, kind, window, 0, now_ms, 0)
                        .await?
                        .into_iter()
                        .map(|(m, c)| (m, c as u64))
                        .collect();
                let want = counted(&p, kind, i64::from(minutes), now_ms);
                assert_eq!(got, want, "{kind:?} over {window} at {now_ms}");
            }
        }
    }
    Ok(())
}

/// The all-time ranking keeps its highest `--max-ranked-members`: members
/// below are removed in the same script that counts, so the ones kept
/// count exactly; a newcomer counted past the lowest kept takes its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_member_cap_keeps_the_highest_counts() -> anyhow::Result<()> {
    let (mut p, redis, _) = on_stack(Topology::Standalone).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut items = Vec::new();
    // h0..h9 searched 20..29 times, 30 keywords once each, interleaved.
    for i in 0..30_i64 {
        for h in 0..10_i64 {
            if i < 20 + h {
                items.push(search_at(&format!("h{h}"), None, now - i));
            }
        }
        // Named to sort before the h's: were a batch ever cut short, a
        // tie at 1 drops these first (ties go by member).
        items.push(search_at(&format!("a-once{i:02}"), None, now - i));
    }
    p.produce(items).await?;
    let cap = ["--max-ranked-members", "10"];
    let instance = p.start_with(&cap)?;
    caught_up(&p, &instance).await?;
    let total = Keys::new(&redis.prefix).total(Kind::Search);
    let ranked = |redis: RedisSide, total: String| async move {
        let mut conn = redis.connect().await?;
        let got: BTreeMap<String, i64> = redis::cmd("ZRANGE")
            .arg(&total)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        anyhow::Ok(got)
    };
    let want: BTreeMap<String, i64> = (0..10).map(|h| (format!("h{h}"), 20 + h)).collect();
    assert_eq!(ranked(redis.clone(), total.clone()).await?, want);
    drop(instance);

    // 90 searches of a newcomer, 30 a partition: it passes h0 (20) with
    // its first partition's batch and takes h0's place.
    p.produce(
        (0..90)
            .map(|i| search_at("newcomer", None, now + i))
            .collect(),
    )
    .await?;
    let instance = p.start_with(&cap)?;
    caught_up(&p, &instance).await?;
    let mut want = want;
    want.remove("h0");
    want.insert("newcomer".into(), 90);
    assert_eq!(ranked(redis.clone(), total).await?, want);
    Ok(())
}

/// Every read the API and `top` make works on a replica, for a Redis user
/// that may only read: no read writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_work_on_a_read_only_replica_for_a_read_only_user() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let dir = stack.dir.join(unique("read-replica"));
    let primary = PrivateRedis::start(dir.join("primary")).await?;
    let replica = PrivateRedis::start(dir.join("replica")).await?;
    replica.replicate(&primary).await?;
    let (mut p, redis, _) =
        pipeline(&stack, e2e::broker::Broker::tansu(&stack), &primary.url()).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut items = Vec::new();
    for (i, keyword) in ["기생충", "parasite", "오징어 게임", "기생충"]
        .iter()
        .enumerate()
    {
        items.push(search_at(keyword, Some("u7"), now - 1_000 * i as i64));
    }
    items.push(movie_at("m42", Some("u7"), now));
    p.produce(items).await?;
    let instance = p.start()?;
    caught_up(&p, &instance).await?;

    // A user that may read and nothing else, on the replica only (ACLs are
    // not replicated).
    let mut admin = replica.connection().await?;
    redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "reader",
                "on",
                ">reader-pw",
                "~*",
                "resetchannels",
                "-@all",
                "+@read",
                "+ping",
                "+info",
            ][..],
        )
        .exec_async(&mut admin)
        .await?;
    // Everything is on the replica before it is read there.
    let model = redis.expected(p.truths());
    e2e::wait_for_async(
        Duration::from_secs(30),
        "the replica to hold the model",
        || {
            let replica = RedisSide {
                access: redis_sink::access::RedisAccess::url(replica.url()),
                prefix: redis.prefix.clone(),
            };
            let model = model.clone();
            async move { Ok(replica.dump().await? == model) }
        },
    )
    .await?;
    let password = dir.join("reader-password");
    std::fs::write(&password, "reader-pw\n")?;
    let mut access = redis_sink::access::RedisAccess::url(format!(
        "redis://reader@127.0.0.1:{}",
        replica.addr().port()
    ));
    access.redis_password_file = Some(password);

    // The user really may not write.
    let mut reader = e2e::redis::connect_with(&access).await?;
    let refused = redis::cmd("SET")
        .arg("x")
        .arg(1)
        .query_async::<()>(&mut reader)
        .await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("no permissions")),
        "{refused:?}"
    );

    let api = ReadApi::start(&access, &redis.prefix, &[], &stack.dir.join("logs")).await?;
    let top = api.ok("/api/v1/top/search?window=15m").await?;
    assert_eq!(
        members(&top),
        // Ties go by member, descending (UTF-8 order: Hangul after Latin).
        [
            ("기생충".to_owned(), 2),
            ("오징어 게임".to_owned(), 1),
            ("parasite".to_owned(), 1)
        ]
    );
    let all = api.ok("/api/v1/top/movie?window=all").await?;
    assert_eq!(members(&all), [("m42".to_owned(), 1)]);
    let rising = api.ok("/api/v1/rising/search?window=5m").await?;
    assert_eq!(rising["members"][0]["member"], "기생충");
    let history = api.ok("/api/v1/history/search/u7").await?;
    let items: Vec<&str> = history["items"]
        .as_array()
        .map(|items| items.iter().filter_map(|i| i["member"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(items, ["기생충", "parasite", "오징어 게임"]);
    Ok(())
}

/// The API: rankings equal Redis's, errors say why as JSON, a window
/// longer than the writers' retention is refused, and a thousand requests
/// inside the cache period cost Redis no read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_rankings_refuses_what_it_cannot_and_spares_redis() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let dir = stack.dir.join(unique("read-api"));
    let server = PrivateRedis::start(dir.join("redis")).await?;
    let (mut p, redis, _) =
        pipeline(&stack, e2e::broker::Broker::tansu(&stack), &server.url()).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut items = Vec::new();
    for i in 0..200_i64 {
        items.push(search_at(
            &format!("kw{}", i % 13),
            Some(&format!("u{}", i % 5)),
            now - i * 1_000,
        ));
        items.push(movie_at(&format!("m{}", i % 7), None, now - i * 20_000));
    }
    p.produce(items).await?;
    // The writers' retention, recorded in Redis, is what the API refuses
    // windows by: its own --bucket-ttl-secs (the default, 48 h) is ignored.
    let instance = p.start_with(&["--bucket-ttl-secs", "7200"])?;
    caught_up(&p, &instance).await?;

    let api = ReadApi::start(
        &redis.access,
        &redis.prefix,
        &["--cache-ms", "60000"],
        &stack.dir.join("logs"),
    )
    .await?;
    for (kind, window, minutes) in [
        (Kind::Search, "5m", 5),
        (Kind::Movie, "1h", 60),
        (Kind::Movie, "2h", 120),
    ] {
        let reply = api
            .ok(&format!(
                "/api/v1/top/{}?window={window}&limit=100",
                kind.as_str()
            ))
            .await?;
        let as_of =
            chrono::DateTime::parse_from_rfc3339(reply["as_of"].as_str().unwrap_or_default())?
                .timestamp_millis();
        let mut want: Vec<(String, u64)> = counted(&p, kind, minutes, as_of).into_iter().collect();
        want.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
        assert_eq!(members(&reply), want, "{kind:?} over {window}");
        assert_eq!(reply["window"], window);
    }

    for (path, status, reason) in [
        ("/api/v1/top/search?window=3h", 400, "window_too_long"),
        ("/api/v1/rising/search?window=61m", 400, "window_too_long"),
        ("/api/v1/rising/search?window=all", 400, "bad_window"),
        ("/api/v1/top/search?window=soon", 400, "bad_window"),
        ("/api/v1/top/search?limit=0", 400, "bad_limit"),
        ("/api/v1/top/search?limit=many", 400, "bad_query"),
        ("/api/v1/top/films", 404, "unknown_kind"),
        ("/api/v2/top", 404, "not_found"),
        ("/api/v1/history/search/%FF", 400, "bad_path"),
    ] {
        let (got, body) = api.get(path).await?;
        assert_eq!(
            (got, body["error"]["reason"].as_str()),
            (status, Some(reason)),
            "{path}: {body}"
        );
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let (_, too_long) = api.get("/api/v1/top/search?window=3h").await?;
    assert_eq!(
        too_long["error"]["message"],
        "window 3h reaches back 3h, further than the 2h the rankings keep (redis-sink \
         --bucket-ttl-secs): ask for a shorter window, or keep buckets longer"
    );
    let openapi = api.ok("/openapi.json").await?;
    assert!(openapi["paths"]["/api/v1/top/{kind}"].is_object());

    // Within the cache period, a thousand requests cost no read at all.
    let conn = server.connection().await?;
    let zunions = || {
        let mut conn = conn.clone();
        async move { command_calls(&mut conn, "zunion").await }
    };
    let before = zunions().await?;
    let requests = (0..1_000).map(|_| api.ok("/api/v1/top/search?window=5m&limit=3"));
    for reply in futures::future::join_all(requests).await {
        reply?;
    }
    assert_eq!(
        zunions().await? - before,
        0,
        "reads within the cache period"
    );
    Ok(())
}

/// The live page in headless Chromium shows the rankings the API serves,
/// Korean keywords included, and a screenshot of it is kept in the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_what_the_api_serves() -> anyhow::Result<()> {
    let (mut p, redis, _) = on_stack(Topology::Standalone).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut items = Vec::new();
    let keywords = [
        "기생충",
        "오징어 게임",
        "parasite",
        "더 글로리",
        "<b>bold</b>",
        "joker",
    ];
    for (i, keyword) in keywords.iter().enumerate() {
        for n in 0..(keywords.len() - i) as i64 {
            // Before: once each; in the last minutes: more, to rise.
            items.push(search_at(keyword, Some("u1"), now - 20 * MS_PER_MINUTE - n));
            items.push(search_at(keyword, Some("u1"), now - n * 1_000));
            items.push(search_at(keyword, Some("u1"), now - n * 2_000));
        }
        items.push(movie_at(
            &format!("movie-{i}"),
            None,
            now - (i as i64) * 1_000,
        ));
    }
    p.produce(items).await?;
    let instance = p.start()?;
    caught_up(&p, &instance).await?;
    let stack = Stack::get()?;
    let logs = stack.dir.join("logs");
    // One read for the page and the test alike.
    let api = ReadApi::start(
        &redis.access,
        &redis.prefix,
        &["--cache-ms", "60000"],
        &logs,
    )
    .await?;

    let url = format!("{}/?window=15m", api.base);
    let dom = e2e::read_api::render(&url, Duration::from_secs(5), None).await?;
    for (list, path) in [
        ("top-search", "/api/v1/top/search?window=15m"),
        ("top-movie", "/api/v1/top/movie?window=15m"),
        ("rising-search", "/api/v1/rising/search?window=15m"),
        ("rising-movie", "/api/v1/rising/movie?window=15m"),
    ] {
        let served = members(&api.ok(path).await?);
        assert!(!served.is_empty(), "{path} is empty");
        assert_eq!(e2e::read_api::rendered_list(&dom, list)?, served, "#{list}");
    }
    let screenshot = logs.join(format!("{}.png", unique("live-page")));
    e2e::read_api::render(&url, Duration::from_secs(5), Some(&screenshot)).await?;
    assert!(
        std::fs::metadata(&screenshot)?.len() > 10_000,
        "{}",
        screenshot.display()
    );
    Ok(())
}

/// A Redis user refused a command the counting script sends after its
/// first increment (here `EXPIREAT`) counts nothing, however often the
/// batch is retried: the script checks every right before it increments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_command_counts_nothing_however_often_retried() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let server = PrivateRedis::start(stack.dir.join(unique("redis-noperm"))).await?;
    let mut admin = server.connection().await?;
    redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "sink",
                "on",
                ">sink-pw",
                "~*",
                "&*",
                "+@all",
                "-expireat",
            ][..],
        )
        .exec_async(&mut admin)
        .await?;
    let url = format!("redis://sink:sink-pw@127.0.0.1:{}", server.addr().port());
    let (mut p, redis, _) = pipeline(&stack, e2e::broker::Broker::tansu(&stack), &url).await?;
    let now = chrono::Utc::now().timestamp_millis();
    p.produce(
        (0..30)
            .map(|i| search_at("parasite", None, now - i))
            .collect(),
    )
    .await?;
    let instance = p.start()?;
    instance.wait_metrics().await?;
    e2e::wait_for_async(Duration::from_secs(60), "three refused writes", || async {
        Ok(instance.counter("sink_retries_total").await? >= 3.0)
    })
    .await?;
    let total = Keys::new(&redis.prefix).total(Kind::Search);
    let count: Option<f64> = redis::cmd("ZSCORE")
        .arg(&total)
        .arg("parasite")
        .query_async(&mut admin)
        .await?;
    assert_eq!(count, None, "counted by refused scripts");
    Ok(())
}

/// On a Redis Cluster, `serve --read-from-replicas` reads the rankings from
/// a replica of the `{rank}` slot's primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_api_reads_from_replicas() -> anyhow::Result<()> {
    let (mut p, redis, _) = on_stack(Topology::Cluster).await?;
    let now = chrono::Utc::now().timestamp_millis();
    p.produce(
        (0..30)
            .map(|i| search_at("parasite", None, now - i))
            .collect(),
    )
    .await?;
    let instance = p.start()?;
    caught_up(&p, &instance).await?;

    // The replicas of the node serving `{rank}`, from CLUSTER NODES:
    // `<id> <host:port@bus> <flags> <primary id> ... <slots>`.
    let mut conn = redis.connect().await?;
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg("{rank}")
        .query_async(&mut conn)
        .await?;
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut conn)
        .await?;
    let fields: Vec<Vec<&str>> = nodes.lines().map(|l| l.split(' ').collect()).collect();
    let serves = |node: &&Vec<&str>| {
        node.iter().skip(8).any(|range| {
            let (from, to) = range.split_once('-').unwrap_or((range, range));
            (from.parse().unwrap_or(u16::MAX)..=to.parse().unwrap_or(0)).contains(&slot)
        })
    };
    let primary = fields
        .iter()
        .find(|n| n[2].contains("master") && serves(n))
        .map(|n| n[0])
        .ok_or_else(|| anyhow::anyhow!("no primary serves slot {slot}:\n{nodes}"))?;
    let replicas: Vec<String> = fields
        .iter()
        .filter(|n| n[2].contains("slave") && n[3] == primary)
        .map(|n| format!("redis://{}", n[1].split('@').next().unwrap_or_default()))
        .collect();
    anyhow::ensure!(!replicas.is_empty(), "no replica of {primary}:\n{nodes}");
    let zunions = || async {
        let mut calls = 0;
        for url in &replicas {
            let access = redis_sink::access::RedisAccess::url(url);
            calls +=
                command_calls(&mut e2e::redis::connect_to_node(&access).await?, "zunion").await?;
        }
        anyhow::Ok(calls)
    };

    let stack = Stack::get()?;
    let api = ReadApi::start(
        &redis.access,
        &redis.prefix,
        &["--read-from-replicas"],
        &stack.dir.join("logs"),
    )
    .await?;
    let before = zunions().await?;
    // The replica may lag the primary by a moment: read until it has all.
    e2e::wait_for_async(
        Duration::from_secs(30),
        "the count through a replica",
        || async {
            let top = api.ok("/api/v1/top/search?window=5m").await?;
            Ok(members(&top) == [("parasite".to_owned(), 30)])
        },
    )
    .await?;
    assert!(
        zunions().await? > before,
        "no ZUNION reached a replica of {primary}"
    );
    Ok(())
}

/// An API started before any redis-sink goes by its own
/// `--bucket-ttl-secs`, then by what the writers record once one starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_follows_a_retention_recorded_after_it_started() -> anyhow::Result<()> {
    let (mut p, redis, _) = on_stack(Topology::Standalone).await?;
    let stack = Stack::get()?;
    let api = ReadApi::start(&redis.access, &redis.prefix, &[], &stack.dir.join("logs")).await?;
    let status = || async { anyhow::Ok(api.get("/api/v1/top/search?window=3h").await?.0) };
    assert_eq!(status().await?, 200, "3h within the default 48 h");
    p.produce(vec![search_at(
        "parasite",
        None,
        chrono::Utc::now().timestamp_millis(),
    )])
    .await?;
    let instance = p.start_with(&["--bucket-ttl-secs", "7200"])?;
    caught_up(&p, &instance).await?;
    e2e::wait_for_async(
        Duration::from_secs(30),
        "3h refused by the writers' 2 h",
        || async { Ok(status().await? == 400) },
    )
    .await
}

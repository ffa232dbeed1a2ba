//! No secret is ever printed: not by `--help`, not in the errors for bad
//! values, not in a running service's logs, not on /metrics. Every env var
//! and flag that can hold one is given [`SECRET`], and every output of both
//! binaries is searched for it.

use std::process::Command;

use e2e::bigquery::BigQuerySide;
use e2e::broker::Broker;
use e2e::generator::{Generator, Mix};
use e2e::pipeline::{Instance, Pipeline};
use e2e::redis::RedisSide;
use e2e::service::SHUTDOWN_TIMEOUT;
use e2e::{unique, Stack};

/// What every secret-bearing setting holds in these tests.
const SECRET: &str = "Sekr1t-never-printed";

/// How long one of these commands may take: each either prints and exits
/// or fails at start.
const COMMAND_TIMEOUT_SECS: &str = "30";

/// Runs `binary` with `args` and `env` (and none of the caller's service
/// settings), for up to [`COMMAND_TIMEOUT_SECS`]; whether it succeeded, and
/// its stdout and stderr together.
fn run(binary: &str, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<(bool, String)> {
    let mut command = Command::new("timeout");
    command
        .arg(COMMAND_TIMEOUT_SECS)
        .arg(e2e::process::binary(binary)?);
    for name in [
        "KAFKA_BOOTSTRAP_SERVERS",
        "KAFKA_OPTIONS",
        "KAFKA_OPTIONS_FILE",
        "REDIS_URL",
        "REDIS_PASSWORD_FILE",
        "REDIS_CA_FILE",
        "REDIS_CERT_FILE",
        "REDIS_KEY_FILE",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "BIGQUERY_ENDPOINT",
    ] {
        command.env_remove(name);
    }
    let output = command
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()?;
    anyhow::ensure!(
        output.status.code() != Some(124),
        "{binary} {args:?} was still running after {COMMAND_TIMEOUT_SECS} s"
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), text))
}

/// Environment variables given to a command.
type Env<'a> = Vec<(&'a str, String)>;

/// librdkafka properties that hold secrets, as one KAFKA_OPTIONS value.
fn secret_kafka_options() -> String {
    format!(
        "sasl.password={SECRET},ssl.key.password={SECRET},sasl.oauthbearer.client.secret={SECRET},\
         sasl.oauthbearer.assertion.private.key.passphrase={SECRET}"
    )
}

/// `redis://<userinfo>@<the stack's Redis>`.
fn redis_url_as(stack: &Stack, userinfo: &str) -> String {
    stack
        .redis_url
        .replacen("redis://", &format!("redis://{userinfo}@"), 1)
}

/// `redis://<user>:SECRET@<the stack's Redis>`.
fn redis_url_with_secret(stack: &Stack, user: &str) -> String {
    redis_url_as(stack, &format!("{user}:{SECRET}"))
}

#[test]
fn help_shows_no_secret() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let env = [
        ("KAFKA_OPTIONS", secret_kafka_options()),
        ("REDIS_URL", redis_url_with_secret(&stack, "someone")),
    ];
    for (binary, args) in [
        ("redis-sink", &["--help"][..]),
        ("redis-sink", &["run", "--help"]),
        ("redis-sink", &["top", "--help"]),
        ("redis-sink", &["history", "--help"]),
        ("bigquery-sink", &["--help"]),
    ] {
        let (ok, text) = run(binary, args, &env)?;
        assert!(ok, "{binary} {args:?}: {text}");
        assert!(
            text.contains("REDIS_URL") || text.contains("KAFKA_OPTIONS"),
            "{binary} {args:?} names the env vars: {text}"
        );
        assert!(
            !text.contains(SECRET),
            "{binary} {args:?} printed a secret:\n{text}"
        );
    }
    Ok(())
}

#[test]
fn errors_for_bad_values_show_no_secret() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let bootstrap = ("KAFKA_BOOTSTRAP_SERVERS", stack.kafka.clone());
    // A key file whose key is not a key: loading it fails.
    let key_file = stack.dir.join(format!("{}.json", unique("secret-key")));
    std::fs::write(
        &key_file,
        serde_json::json!({
            "type": "service_account",
            "client_email": "sink@example.iam.gserviceaccount.com",
            "private_key": format!("-----BEGIN PRIVATE KEY-----\n{SECRET}\n-----END PRIVATE KEY-----\n"),
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string(),
    )?;
    // A user Redis does not know: it refuses the password. (Not `default`:
    // without requirepass it takes any password.)
    let refused_redis = redis_url_with_secret(&stack, &unique("nobody"));
    // Services that get as far as consuming read a topic of their own, and
    // serve /metrics on a free port (a busy 9090 must not be why they fail).
    let topic = unique("secrets");
    let own = [
        "--topic",
        &topic,
        "--group-id",
        &topic,
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let bad_redis_url = format!("redis://:{SECRET}@127.0.0.1:notaport");
    // A mounted password (refused: the user is unknown), and a key file
    // that is no PEM key.
    let password_file = stack.dir.join(format!("{}.txt", unique("secret-password")));
    std::fs::write(&password_file, format!("{SECRET}\n"))?;
    let user_without_password = redis_url_as(&stack, &unique("nobody"));
    let not_a_key = password_file.display().to_string();
    let bigquery = [
        &[
            "--project",
            "p",
            "--dataset",
            "d",
            "--table",
            "t",
            "--bootstrap-servers",
            &stack.kafka,
        ][..],
        &own,
    ]
    .concat();
    // (binary, args, env, what the error must name)
    let cases: Vec<(&str, Vec<&str>, Env, &str)> = vec![
        (
            "redis-sink",
            own.to_vec(),
            vec![bootstrap.clone(), ("KAFKA_OPTIONS", SECRET.to_owned())],
            "KAFKA_OPTIONS",
        ),
        (
            "redis-sink",
            vec!["--kafka-option", SECRET],
            vec![bootstrap.clone()],
            "--kafka-option",
        ),
        (
            "redis-sink",
            [&own[..], &["--redis-url", &bad_redis_url]].concat(),
            vec![bootstrap.clone()],
            "--redis-url",
        ),
        (
            "redis-sink",
            own.to_vec(),
            vec![bootstrap.clone(), ("REDIS_URL", bad_redis_url.clone())],
            "REDIS_URL",
        ),
        (
            "redis-sink",
            vec!["top", "--kind", "search", "--redis-url", &bad_redis_url],
            vec![],
            "--redis-url",
        ),
        (
            "redis-sink",
            own.to_vec(),
            vec![bootstrap.clone(), ("REDIS_URL", refused_redis.clone())],
            "Redis",
        ),
        (
            "redis-sink",
            vec!["history", "--kind", "search", "--user", "u"],
            vec![("REDIS_URL", refused_redis.clone())],
            "Redis",
        ),
        (
            "redis-sink",
            own.to_vec(),
            vec![
                bootstrap.clone(),
                ("REDIS_URL", user_without_password.clone()),
                ("REDIS_PASSWORD_FILE", password_file.display().to_string()),
            ],
            "Redis",
        ),
        (
            "redis-sink",
            vec![
                "top",
                "--kind",
                "search",
                "--redis-url",
                "rediss://127.0.0.1:1",
                "--redis-cert-file",
                &not_a_key,
                "--redis-key-file",
                &not_a_key,
            ],
            vec![],
            "--redis-cert-file",
        ),
        (
            "bigquery-sink",
            bigquery.to_vec(),
            vec![("KAFKA_OPTIONS", SECRET.to_owned())],
            "KAFKA_OPTIONS",
        ),
        (
            "bigquery-sink",
            bigquery.to_vec(),
            vec![(
                "GOOGLE_APPLICATION_CREDENTIALS",
                key_file.display().to_string(),
            )],
            "cannot load the credentials",
        ),
        // librdkafka refuses a setting it does not know (a typo), whose own
        // message quotes the value, and an incomplete OIDC setup beside a
        // client secret.
        (
            "redis-sink",
            own.to_vec(),
            vec![
                bootstrap.clone(),
                ("REDIS_URL", stack.redis_url.clone()),
                (
                    "KAFKA_OPTIONS",
                    format!(
                        "{},security.protocol=SASL_SSL,sasl.mechanism=OAUTHBEARER,\
                         sasl.oauthbearer.method=oidc,sasl.oauthbearer.client.id=sink",
                        secret_kafka_options()
                    ),
                ),
            ],
            "sasl.oauthbearer.token.endpoint.url",
        ),
        (
            "redis-sink",
            own.to_vec(),
            vec![
                bootstrap.clone(),
                ("REDIS_URL", stack.redis_url.clone()),
                ("KAFKA_OPTIONS", format!("sasl.pasword={SECRET}")),
            ],
            "librdkafka refused sasl.pasword",
        ),
    ];
    for (binary, args, env, names) in cases {
        let (ok, text) = run(binary, &args, &env)?;
        assert!(!ok, "{binary} {args:?} {env:?} must fail: {text}");
        assert!(
            text.contains(names),
            "{binary} {args:?}: the error names {names}:\n{text}"
        );
        assert!(
            !text.contains(SECRET),
            "{binary} {args:?} {env:?} printed a secret:\n{text}"
        );
    }
    std::fs::remove_file(&key_file)?;
    std::fs::remove_file(&password_file)?;
    Ok(())
}

/// Stops `instance` with SIGTERM and returns its whole log.
async fn stop_and_read_log(mut instance: Instance) -> anyhow::Result<String> {
    instance.service.signal("TERM")?;
    instance.service.wait(SHUTDOWN_TIMEOUT * 2).await?;
    Ok(std::fs::read_to_string(&instance.service.log)?)
}

fn assert_no_secret(what: &str, text: &str) {
    assert!(!text.contains(SECRET), "{what} holds a secret:\n{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn running_services_log_and_export_no_secret() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let kafka_option = format!("sasl.password={SECRET}");
    let events = |mix| {
        let mut generator =
            Generator::new(11, mix, chrono::Utc::now().timestamp_millis()).bad_fraction(0.2);
        (0..200).map(|_| generator.next_event()).collect::<Vec<_>>()
    };

    // redis-sink, through a Redis user whose password is the secret.
    let user = unique("sink-user");
    let redis = RedisSide::on_stack(&stack).await?;
    redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                &user,
                "on",
                &format!(">{SECRET}"),
                "~*",
                "&*",
                "+@all",
            ][..],
        )
        .exec_async(&mut redis.connect().await?)
        .await?;
    let mut p = Pipeline::new(&stack, Broker::tansu(&stack), Box::new(redis.clone())).await?;
    p.produce_events(events(Mix::User3)).await?;
    let url = redis_url_with_secret(&stack, &user);
    let instance = p.start_with(&[
        "--redis-url",
        &url,
        "--kafka-option",
        &kafka_option,
        "--log-format",
        "json",
    ])?;
    p.wait_caught_up(&instance).await?;
    assert_no_secret("redis-sink's /metrics", instance.metrics().await?.text());
    let log = stop_and_read_log(instance).await?;
    assert_no_secret("redis-sink's log", &log);
    assert!(
        log.contains("sasl.password=***"),
        "the options are logged, masked:\n{log}"
    );
    p.tally().await?.assert_holds()?;
    redis::cmd("ACL")
        .arg(&["DELUSER", &user][..])
        .exec_async(&mut redis.connect().await?)
        .await?;

    // bigquery-sink, its secret from a properties file (a comma in it).
    let properties = stack.dir.join(format!("{}.properties", unique("kafka")));
    std::fs::write(
        &properties,
        format!("# mounted\nsasl.password={SECRET},x=y\n"),
    )?;
    let properties_arg = properties.display().to_string();
    let mut p = Pipeline::new(
        &stack,
        Broker::tansu(&stack),
        Box::new(BigQuerySide::on_stack(&stack)?),
    )
    .await?;
    p.produce_events(events(Mix::All)).await?;
    let instance = p.start_with(&[
        "--kafka-options-file",
        &properties_arg,
        "--log-format",
        "json",
    ])?;
    p.wait_committed_by(&p.group.clone(), &instance).await?;
    assert_no_secret("bigquery-sink's /metrics", instance.metrics().await?.text());
    let log = stop_and_read_log(instance).await?;
    assert_no_secret("bigquery-sink's log", &log);
    assert!(
        log.contains("sasl.password=***"),
        "the options are logged, masked:\n{log}"
    );
    std::fs::remove_file(&properties)?;
    p.tally().await?.assert_holds()
}

/// At debug level, the token libraries log every request and response:
/// the subject token of Workload Identity Federation, the tokens STS and
/// impersonation return. None of it may reach the log, whatever RUST_LOG
/// asks for.
#[tokio::test(flavor = "multi_thread")]
async fn debug_logs_show_no_token() -> anyhow::Result<()> {
    use e2e::fake_google::{FakeGoogle, IMPERSONATED_TOKEN, STS_TOKEN};

    let stack = Stack::get()?;
    let google = FakeGoogle::start()?;
    let dir = stack.dir.join(unique("debug-tokens"));
    std::fs::create_dir_all(&dir)?;
    let subject = dir.join("token");
    std::fs::write(&subject, SECRET)?;
    let credentials = dir.join("external-account.json");
    google.write_external_account(&credentials, &subject)?;
    let mut p = Pipeline::new(
        &stack,
        Broker::tansu(&stack),
        Box::new(BigQuerySide::on_stack(&stack)?),
    )
    .await?;
    let mut generator = Generator::new(12, Mix::All, chrono::Utc::now().timestamp_millis());
    p.produce_events((0..50).map(|_| generator.next_event()).collect())
        .await?;
    // Each a new process (yup's token cache is per process) in a new group
    // (so it consumes, and fetches a token); more specific directives win
    // over less specific ones in RUST_LOG, so each shape is tried.
    for filter in [
        "debug,yup_oauth2=trace",
        "yup_oauth2::authenticator=debug,yup_oauth2::external_account=trace",
        "yup_oauth2[message]=trace",
    ] {
        p.rename_group();
        let exchanges = google.seen_at("POST /sts").len();
        let instance = p.start_logging(
            &["--credentials", &credentials.display().to_string()],
            filter,
        )?;
        p.wait_committed_by(&p.group.clone(), &instance).await?;
        assert!(
            google.seen_at("POST /sts").len() > exchanges,
            "{filter}: the token came from the federation"
        );
        let log = stop_and_read_log(instance).await?;
        for token in [SECRET, STS_TOKEN, IMPERSONATED_TOKEN] {
            assert!(
                !log.contains(token),
                "RUST_LOG={filter}: the log holds {token}"
            );
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// OAUTHBEARER with OIDC is not only built in but works: librdkafka fetches
/// its token from the identity provider's endpoint over HTTP (the system's
/// libcurl) with the client's id and secret, and neither the secret nor the
/// token reaches the log. (The stack's tansu speaks no OAUTHBEARER, so the
/// login itself goes no further.)
#[tokio::test(flavor = "multi_thread")]
async fn an_oidc_token_is_fetched_and_not_logged() -> anyhow::Result<()> {
    use e2e::fake_google::{FakeGoogle, OIDC_TOKEN};

    let stack = Stack::get()?;
    let google = FakeGoogle::start()?;
    let properties = stack.dir.join(format!("{}.properties", unique("oidc")));
    std::fs::write(
        &properties,
        format!(
            "security.protocol=SASL_PLAINTEXT\nsasl.mechanism=OAUTHBEARER\n\
             sasl.oauthbearer.method=oidc\nsasl.oauthbearer.client.id=movielog-sink\n\
             sasl.oauthbearer.client.secret={SECRET}\n\
             sasl.oauthbearer.token.endpoint.url={}/oidc\n",
            google.url()
        ),
    )?;
    let mut p = Pipeline::new(
        &stack,
        Broker::tansu(&stack),
        Box::new(RedisSide::on_stack(&stack).await?),
    )
    .await?;
    let instance = p.start_logging(
        &["--kafka-options-file", &properties.display().to_string()],
        "debug",
    )?;
    let fetched = e2e::wait_for_async(
        std::time::Duration::from_secs(30),
        "a token request at the identity provider",
        || std::future::ready(Ok(!google.seen_at("POST /oidc").is_empty())),
    )
    .await;
    let log = stop_and_read_log(instance).await?;
    fetched.map_err(|err| anyhow::anyhow!("{err:#}; log:\n{log}"))?;
    let request = &google.seen_at("POST /oidc")[0];
    assert!(
        request.body.contains("grant_type=client_credentials"),
        "{request:?}"
    );
    assert!(
        request
            .headers
            .iter()
            .any(|h| h.to_ascii_lowercase().starts_with("authorization: basic ")),
        "the client's id and secret as HTTP basic auth: {request:?}"
    );
    for secret in [SECRET, OIDC_TOKEN] {
        assert!(!log.contains(secret), "the log holds {secret}");
    }
    std::fs::remove_file(&properties)?;
    Ok(())
}

//! The services' command lines, built in one place: the test fixtures, the
//! fault suite and the benchmark start redis-sink, bigquery-sink and the
//! do-nothing sink with [`ServiceFlags`].

use std::path::Path;
use std::time::Duration;

use redis_sink::access::RedisAccess;

use crate::process::Service;

/// `--session-timeout-ms` of every service the tests start: a killed
/// instance's partitions move within seconds.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// `--shutdown-timeout-secs` of every service the tests start.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The command line of one service: the consumer flags every service
/// takes, its sink's flags, and any given later (a flag given again
/// replaces the earlier value).
#[derive(Debug, Clone)]
pub struct ServiceFlags {
    binary: &'static str,
    /// (flag, value), one value a flag.
    flags: Vec<(String, String)>,
    /// `--batch-linger-ms` the tests give this sink ([`Self::for_tests`]).
    test_linger_ms: Option<u64>,
    /// Appended as they are, after the flags they override were removed.
    extra: Vec<String>,
    /// RUST_LOG.
    log_filter: String,
}

impl ServiceFlags {
    /// The consumer flags of `binary`: the broker, the topic (its dead
    /// letters go to the default `<topic>.dlq`), the group, and /metrics on
    /// a free loopback port.
    pub fn consumer(binary: &'static str, bootstrap: &str, topic: &str, group: &str) -> Self {
        let flags = [
            ("--bootstrap-servers", bootstrap),
            ("--topic", topic),
            ("--group-id", group),
            ("--metrics-addr", "127.0.0.1:0"),
        ];
        Self {
            binary,
            flags: flags
                .iter()
                .map(|(flag, value)| ((*flag).to_owned(), (*value).to_owned()))
                .collect(),
            test_linger_ms: None,
            extra: Vec::new(),
            log_filter: "info".to_owned(),
        }
    }

    /// The do-nothing sink (the consumer's own ceiling).
    pub fn null_sink(bootstrap: &str, topic: &str, group: &str) -> Self {
        Self::consumer("null-sink", bootstrap, topic, group)
    }

    /// redis-sink writing to the Redis `access` leads to, under
    /// `key_prefix`.
    pub fn redis_sink(
        bootstrap: &str,
        topic: &str,
        group: &str,
        access: &RedisAccess,
        key_prefix: &str,
    ) -> Self {
        let mut flags = Self::consumer("redis-sink", bootstrap, topic, group);
        for (flag, value) in crate::redis::access_flags(access) {
            flags = flags.set(flag, value);
        }
        flags = flags.set("--key-prefix", key_prefix);
        flags.test_linger_ms = Some(50);
        flags
    }

    /// bigquery-sink writing to `project.dataset.table` through `endpoint`
    /// (the emulator, or a proxy in front of it).
    pub fn bigquery_sink(
        bootstrap: &str,
        topic: &str,
        group: &str,
        endpoint: &str,
        project: &str,
        dataset: &str,
        table: &str,
    ) -> Self {
        let mut flags = Self::consumer("bigquery-sink", bootstrap, topic, group)
            .set("--bigquery-endpoint", endpoint)
            .set("--project", project)
            .set("--dataset", dataset)
            .set("--table", table);
        flags.test_linger_ms = Some(200);
        flags
    }

    /// The tests' settings: [`SESSION_TIMEOUT`], [`SHUTDOWN_TIMEOUT`] and
    /// the sink's batch linger (redis-sink 50 ms, bigquery-sink 200 ms).
    pub fn for_tests(self) -> Self {
        let linger = self.test_linger_ms;
        let flags = self
            .set(
                "--session-timeout-ms",
                SESSION_TIMEOUT.as_millis().to_string(),
            )
            .set(
                "--shutdown-timeout-secs",
                SHUTDOWN_TIMEOUT.as_secs().to_string(),
            );
        match linger {
            Some(ms) => flags.set("--batch-linger-ms", ms.to_string()),
            None => flags,
        }
    }

    /// Sets `flag` to `value`, replacing an earlier value.
    pub fn set(mut self, flag: &str, value: impl Into<String>) -> Self {
        let value = value.into();
        match self.flags.iter_mut().find(|(f, _)| f == flag) {
            Some((_, old)) => *old = value,
            None => self.flags.push((flag.to_owned(), value)),
        }
        self
    }

    /// /metrics on this loopback port.
    pub fn metrics_port(self, port: u16) -> Self {
        self.set("--metrics-addr", format!("127.0.0.1:{port}"))
    }

    /// Dead letters to `topic` instead of `<topic>.dlq`.
    pub fn dlq_topic(self, topic: &str) -> Self {
        self.set("--dlq-topic", topic)
    }

    /// More command-line words, appended as given (repeatable flags such as
    /// `--kafka-option` may stand several times); a flag of these that was
    /// already set takes the value given here.
    pub fn extra(mut self, extra: &[&str]) -> Self {
        self.extra.extend(extra.iter().map(|s| (*s).to_owned()));
        self
    }

    /// The binary's name.
    pub fn binary(&self) -> &'static str {
        self.binary
    }

    /// The arguments.
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, value) in &self.flags {
            if !self.extra.contains(flag) {
                args.extend([flag.clone(), value.clone()]);
            }
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Logs what `filter` (RUST_LOG) lets through instead of `info`.
    pub fn log_filter(mut self, filter: &str) -> Self {
        filter.clone_into(&mut self.log_filter);
        self
    }

    /// Starts the service, logging to `<log_dir>/<name>.log`.
    pub fn start(&self, log_dir: &Path, name: &str) -> anyhow::Result<Service> {
        Service::start(self.binary, &self.args(), &self.log_filter, log_dir, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_given_again_takes_the_new_value() {
        let args =
            ServiceFlags::redis_sink("b:9092", "t", "g", &RedisAccess::url("redis://r"), "t:")
                .for_tests()
                .metrics_port(9999)
                .extra(&["--metrics-addr", "127.0.0.1:1", "--kafka-option", "a=b"])
                .args();
        assert_eq!(
            args,
            [
                "--bootstrap-servers",
                "b:9092",
                "--topic",
                "t",
                "--group-id",
                "g",
                "--redis-url",
                "redis://r",
                "--key-prefix",
                "t:",
                "--session-timeout-ms",
                "6000",
                "--shutdown-timeout-secs",
                "10",
                "--batch-linger-ms",
                "50",
                "--metrics-addr",
                "127.0.0.1:1",
                "--kafka-option",
                "a=b",
            ]
        );
    }
}

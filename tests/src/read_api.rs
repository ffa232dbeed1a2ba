//! The read API (`redis-sink serve`) as tests and the benchmark run it: the
//! real binary on a free loopback port, over the keys of a [`RedisSide`],
//! and a headless Chromium to load its page.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use redis_sink::access::RedisAccess;

use crate::process::Service;
use crate::redis::access_flags;

/// A running `redis-sink serve`.
pub struct ReadApi {
    /// The process (stopped when dropped).
    pub service: Service,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    client: reqwest::Client,
}

impl ReadApi {
    /// Serves the keys under `prefix` of the Redis `access` leads to, with
    /// `extra` flags (`--cache-ms`, `--bucket-ttl-secs`), once ready.
    pub async fn start(
        access: &RedisAccess,
        prefix: &str,
        extra: &[&str],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let port = crate::free_port()?;
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--key-prefix".into(),
            prefix.into(),
        ];
        for (flag, value) in access_flags(access) {
            args.extend([flag.to_owned(), value]);
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let service = Service::start(
            "redis-sink",
            &args,
            "info",
            log_dir,
            &crate::unique("read-api"),
        )?;
        let api = Self {
            service,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        let ready =
            crate::wait_for_async(Duration::from_secs(30), "the read API to be ready", || {
                crate::ready(port)
            })
            .await;
        api.service.with_log(ready)?;
        Ok(api)
    }

    /// GET `path`: the status and the body as JSON.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = response.status().as_u16();
        let body = response
            .json()
            .await
            .with_context(|| format!("GET {path}: not JSON"))?;
        Ok((status, body))
    }

    /// GET `path`, which must answer 200: its JSON.
    pub async fn ok(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.get(path).await?;
        anyhow::ensure!(status == 200, "GET {path}: {status} {body}");
        Ok(body)
    }
}

/// `(member, count)` of a ranking reply's members, in order.
pub fn members(reply: &serde_json::Value) -> Vec<(String, u64)> {
    reply["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .map(|m| {
                    (
                        m["member"].as_str().unwrap_or_default().to_owned(),
                        m["count"].as_u64().unwrap_or(u64::MAX),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Debian's Chromium (scripts/chromium.sh installs it).
pub fn chromium() -> anyhow::Result<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("no Chromium: run scripts/chromium.sh (make test does)")
}

/// Loads `url` in headless Chromium, lets its scripts run for `budget` of
/// virtual time, and returns the rendered DOM; with `screenshot`, also
/// saves the page as a PNG there.
pub async fn render(
    url: &str,
    budget: Duration,
    screenshot: Option<&Path>,
) -> anyhow::Result<String> {
    let profile = std::env::temp_dir().join(crate::unique("chromium-profile"));
    let mut command = tokio::process::Command::new(chromium()?);
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1200,760",
        "--lang=ko-KR",
        &format!("--user-data-dir={}", profile.display()),
        &format!("--virtual-time-budget={}", budget.as_millis()),
    ]);
    match screenshot {
        Some(path) => command.arg(format!("--screenshot={}", path.display())),
        None => command.arg("--dump-dom"),
    };
    let output = tokio::time::timeout(Duration::from_secs(90), command.arg(url).output())
        .await
        .context("Chromium did not finish within 90 s")??;
    let _ = std::fs::remove_dir_all(&profile);
    anyhow::ensure!(
        output.status.success(),
        "Chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// `(member, count)` of the `<li data-member data-count>` items of the list
/// `id` in a rendered page, in order.
pub fn rendered_list(dom: &str, id: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .with_context(|| format!("no #{id} in the page"))?;
    let list = &dom[start..];
    let list = &list[..list.find("</ol>").context("unclosed list")?];
    let attribute = |item: &str, name: &str| -> Option<String> {
        let from = item.find(&format!("{name}=\""))? + name.len() + 2;
        let value = &item[from..];
        Some(unescape(&value[..value.find('"')?]))
    };
    Ok(list
        .split("<li ")
        .skip(1)
        .filter_map(|item| {
            let member = attribute(item, "data-member")?;
            let count = attribute(item, "data-count")?.parse().ok()?;
            Some((member, count))
        })
        .collect())
}

/// The entities Chromium writes in attribute values.
fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

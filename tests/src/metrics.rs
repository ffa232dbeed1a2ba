//! Reading a service's /metrics (Prometheus text format), one way for every
//! test.

/// One scrape of /metrics.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    text: String,
}

/// One sample: its labels as written between the braces (empty for none)
/// and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    /// `a="1",b="2"`.
    pub labels: &'a str,
    /// The value.
    pub value: f64,
}

impl Sample<'_> {
    /// Whether the sample has `label="value"`.
    pub fn has(&self, label: &str, value: &str) -> bool {
        self.labels
            .split(',')
            .any(|pair| pair == format!("{label}=\"{value}\""))
    }
}

impl Scrape {
    /// /metrics of the service listening on `port` (an error while nothing
    /// listens there).
    pub async fn from_port(port: u16) -> anyhow::Result<Self> {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(Self { text })
    }

    /// /metrics on `port`, or an empty scrape while nothing listens there
    /// (for polls that start before the service does).
    pub async fn or_empty(port: u16) -> Self {
        Self::from_port(port).await.unwrap_or_default()
    }

    /// The whole scrape, as served.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Every sample of the metric `name`.
    pub fn samples(&self, name: &str) -> Vec<Sample<'_>> {
        self.text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let rest = line.strip_prefix(name)?;
                let (labels, value) = match rest.strip_prefix('{') {
                    Some(rest) => rest.split_once("} ")?,
                    None => ("", rest.strip_prefix(' ')?),
                };
                Some(Sample {
                    labels,
                    value: value.trim().parse().ok()?,
                })
            })
            .collect()
    }

    /// The samples of `name` that have every `label="value"` of `labels`.
    pub fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<Sample<'_>> {
        self.samples(name)
            .into_iter()
            .filter(|s| labels.iter().all(|(l, v)| s.has(l, v)))
            .collect()
    }

    /// The sum of `name` over the samples that have `labels` (0 if none).
    pub fn sum_of(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).iter().map(|s| s.value).sum()
    }

    /// The sum of `name` over all its samples (0 if none).
    pub fn sum(&self, name: &str) -> f64 {
        self.sum_of(name, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_by_name_and_labels() {
        let scrape = Scrape {
            text: "# HELP x_total a\nx_total{topic=\"t\",partition=\"0\"} 2\n\
                   x_total{topic=\"t\",partition=\"1\"} 3\nx_total_more 9\nx 4\n"
                .to_owned(),
        };
        assert_eq!(scrape.sum("x_total"), 5.0);
        assert_eq!(scrape.sum_of("x_total", &[("partition", "1")]), 3.0);
        assert_eq!(scrape.sum("x"), 4.0);
        assert_eq!(scrape.sum("absent"), 0.0);
    }
}

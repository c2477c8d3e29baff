//! Scraping the metrics endpoint (`[proxy] metrics`) over real HTTP, and reading the
//! samples with a Prometheus text-format parser (`prometheus-parse`).

use std::net::SocketAddr;

use prometheus_parse::{Sample, Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{connect, within};

/// Sends `request` raw and returns the status line, headers and body.
pub async fn http(addr: SocketAddr, request: &[u8]) -> (String, String, String) {
    let mut stream = connect(addr).await;
    stream.write_all(request).await.expect("send the request");
    let mut reply = Vec::new();
    within(
        "the metrics endpoint answers",
        stream.read_to_end(&mut reply),
    )
    .await
    .expect("read the reply");
    let reply = String::from_utf8(reply).expect("the reply is UTF-8");
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {reply:?}"));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_owned(), body.to_owned())
}

/// `GET /metrics`, checked to be a 200 in the text format, parsed.
pub async fn scrape(addr: SocketAddr) -> Scrape {
    let (status, headers, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
    assert!(
        headers.contains("Content-Type: text/plain; version=0.0.4"),
        "content type of the text format: {headers}"
    );
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    Scrape::parse(lines).expect("the body parses as the Prometheus text format")
}

/// The one sample of `metric` whose labels are exactly `labels`.
pub fn sample<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> &'a Sample {
    let matching: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| {
            s.metric == metric
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "one sample {metric}{labels:?}, found {matching:?}"
    );
    matching[0]
}

pub fn counter(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    assert!(
        metric.ends_with("_total"),
        "counter {metric} ends in _total"
    );
    match sample(scrape, metric, labels).value {
        Value::Counter(v) => v,
        ref other => panic!("{metric}{labels:?} is {other:?}, not a counter"),
    }
}

pub fn gauge(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, metric, labels).value {
        Value::Gauge(v) => v,
        ref other => panic!("{metric}{labels:?} is {other:?}, not a gauge"),
    }
}

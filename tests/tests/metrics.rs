//! The Prometheus endpoint (`[proxy] metrics`), scraped over real HTTP on each data path
//! and parsed with a Prometheus text-format parser (`prometheus-parse`):
//! - after traffic: per-route connection, closure (every reason, zero included; an
//!   unreachable backend counted as `connect_failed`) and byte counters, `_total`
//!   suffixes on counters, the active gauge of a live connection labelled with its data
//!   path, the ebpf counters, and both histograms (cumulative buckets, `+Inf` = `_count`,
//!   `_sum`), and the per-target families (up, active, failures by kind, connect time);
//! - the HTTP side: the 0.0.4 content type, 404 for any other path or method, 431 for an
//!   oversized request, and a silent client that does not hold up a scrape.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use prometheus_parse::{Sample, Scrape, Value};
use smartproxy::config::DataPathMode;
use smartproxy::lifecycle::Reason;
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` raw and returns the status line, headers and body.
async fn http(addr: SocketAddr, request: &[u8]) -> (String, String, String) {
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

async fn scrape(addr: SocketAddr) -> Scrape {
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
fn sample<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> &'a Sample {
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

fn counter(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    assert!(
        metric.ends_with("_total"),
        "counter {metric} ends in _total"
    );
    match sample(scrape, metric, labels).value {
        Value::Counter(v) => v,
        ref other => panic!("{metric}{labels:?} is {other:?}, not a counter"),
    }
}

fn gauge(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, metric, labels).value {
        Value::Gauge(v) => v,
        ref other => panic!("{metric}{labels:?} is {other:?}, not a gauge"),
    }
}

/// Checks a histogram's shape and returns its `_count`.
fn histogram(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let Value::Histogram(buckets) = &sample(scrape, metric, labels).value else {
        panic!("{metric}{labels:?} is not a histogram");
    };
    assert!(buckets.len() > 2, "{metric}: several buckets: {buckets:?}");
    for pair in buckets.windows(2) {
        assert!(
            pair[0].less_than < pair[1].less_than && pair[0].count <= pair[1].count,
            "{metric}: buckets ascend and are cumulative: {buckets:?}"
        );
    }
    let last = buckets.last().expect("a bucket");
    assert!(last.less_than.is_infinite(), "{metric}: a +Inf bucket");
    let count = untyped(scrape, &format!("{metric}_count"), labels);
    let sum = untyped(scrape, &format!("{metric}_sum"), labels);
    assert_eq!(last.count, count, "{metric}: +Inf bucket = _count");
    assert!(sum >= 0.0, "{metric}_sum is {sum}");
    count
}

/// `_sum` and `_count` of a histogram (the parser types only the buckets).
fn untyped(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, metric, labels).value {
        Value::Untyped(v) | Value::Counter(v) | Value::Gauge(v) => v,
        ref other => panic!("{metric} is {other:?}"),
    }
}

#[tokio::test]
async fn metrics_endpoint_reports_traffic_on_each_data_path() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(echo).await;
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let mut proxy = TestProxy::start(
            mode,
            &format!(
                "metrics = \"127.0.0.1:0\"\n\n{}{}",
                plain_route("web", backend.addr, ""),
                // Its own listen address: two plain routes cannot share one.
                plain_route("dead", dead, "").replace("127.0.0.1:0", "127.0.0.2:0")
            ),
        )
        .await;
        let metrics = proxy.proxy.metrics_addr().expect("a metrics address");

        // One finished connection with known bytes each way. The FIN goes after the echo,
        // once the bytes move: a socket that closed before the splice cannot be spliced.
        let message = pattern(10_000, 7);
        let mut client = connect(proxy.addr("web")).await;
        client.write_all(&message).await.expect("client writes");
        let mut echoed = vec![0u8; message.len()];
        within("the echo", client.read_exact(&mut echoed))
            .await
            .expect("client reads the echo");
        client.shutdown().await.expect("client FIN");
        within("the backend's FIN", client.read_to_end(&mut Vec::new()))
            .await
            .expect("client reads EOF");
        proxy.expect_closed(Reason::Normal).await;
        drop(client);
        // One backend that refuses.
        let _refused = connect(proxy.addr("dead")).await;
        proxy.expect_closed(Reason::ConnectFailed).await;
        // One live connection.
        let mut live = connect(proxy.addr("web")).await;
        live.write_all(b"ping").await.expect("live writes");
        let mut pong = [0u8; 4];
        within("the live echo", live.read_exact(&mut pong))
            .await
            .expect("live reads");

        let s = scrape(metrics).await;
        let path = match mode {
            DataPathMode::Ebpf => "ebpf",
            _ => "userspace",
        };
        assert_eq!(
            gauge(
                &s,
                "smartproxy_connections_active",
                &[("route", "web"), ("data_path", path)]
            ),
            1.0
        );
        assert_eq!(
            gauge(&s, "smartproxy_connections_half_open", &[("route", "web")]),
            0.0
        );
        assert_eq!(
            counter(&s, "smartproxy_connections_total", &[("route", "web")]),
            2.0
        );
        assert_eq!(
            counter(&s, "smartproxy_connections_total", &[("route", "dead")]),
            1.0
        );
        assert_eq!(
            counter(&s, "smartproxy_connections_accepted_total", &[]),
            3.0
        );
        let closed = |route: &str, reason: &Reason| {
            counter(
                &s,
                "smartproxy_connections_closed_total",
                &[("route", route), ("reason", reason.as_str())],
            )
        };
        let web: BTreeMap<&str, f64> = Reason::ALL
            .iter()
            .map(|r| (r.as_str(), closed("web", r)))
            .collect();
        let expected: BTreeMap<&str, f64> = Reason::ALL
            .iter()
            .map(|r| (r.as_str(), f64::from(u8::from(*r == Reason::Normal))))
            .collect();
        assert_eq!(web, expected, "closures of route web, every reason");
        assert_eq!(closed("dead", &Reason::ConnectFailed), 1.0);
        assert_eq!(closed("", &Reason::NoRoute), 0.0, "unrouted closures");
        let bytes = |direction: &str| {
            counter(
                &s,
                "smartproxy_bytes_total",
                &[("route", "web"), ("direction", direction)],
            )
        };
        let sent = (message.len() + 4) as f64;
        assert_eq!(bytes("client_to_backend"), sent);
        assert_eq!(bytes("backend_to_client"), sent);
        let kernel = counter(
            &s,
            "smartproxy_kernel_bytes_total",
            &[("direction", "client_to_backend")],
        );
        if mode == DataPathMode::Userspace {
            assert_eq!(kernel, 0.0, "no kernel bytes on the userspace path");
        }
        assert!(kernel <= sent);
        let entries = gauge(&s, "smartproxy_ebpf_sockhash_entries", &[]);
        match mode {
            DataPathMode::Ebpf => assert_eq!(entries, 2.0, "the live connection's two sockets"),
            _ => assert_eq!(entries, 0.0),
        }
        for name in [
            "smartproxy_ebpf_events_total",
            "smartproxy_ebpf_events_lost_total",
            "smartproxy_ebpf_splice_failures_total",
            "smartproxy_inactivity_resets_total",
        ] {
            counter(&s, name, &[]);
        }
        assert_eq!(
            counter(&s, "smartproxy_ebpf_splice_failures_total", &[]),
            0.0
        );
        assert_eq!(
            histogram(
                &s,
                "smartproxy_connection_duration_seconds",
                &[("route", "web")]
            ),
            1.0
        );
        assert_eq!(
            histogram(
                &s,
                "smartproxy_connection_duration_seconds",
                &[("route", "dead")]
            ),
            1.0
        );
        assert_eq!(
            histogram(
                &s,
                "smartproxy_backend_connect_seconds",
                &[("route", "web")]
            ),
            2.0
        );
        assert_eq!(
            histogram(
                &s,
                "smartproxy_backend_connect_seconds",
                &[("route", "dead")]
            ),
            0.0
        );
        // Per target: the refused one is still up (one failure of the default three in a
        // row), its failure counted by kind.
        let web_target = backend.addr.to_string();
        let dead_target = dead.to_string();
        let web = [("route", "web"), ("target", web_target.as_str())];
        let dead_labels = [("route", "dead"), ("target", dead_target.as_str())];
        assert_eq!(gauge(&s, "smartproxy_target_up", &web), 1.0);
        assert_eq!(gauge(&s, "smartproxy_target_up", &dead_labels), 1.0);
        assert_eq!(gauge(&s, "smartproxy_target_connections_active", &web), 1.0);
        for (kind, expected) in [("refused", 1.0), ("timeout", 0.0), ("other", 0.0)] {
            let [route, target] = dead_labels;
            assert_eq!(
                counter(
                    &s,
                    "smartproxy_target_connect_failures_total",
                    &[route, target, ("kind", kind)]
                ),
                expected,
                "{kind} connects to the dead target"
            );
        }
        assert_eq!(
            counter(
                &s,
                "smartproxy_target_connect_warnings_suppressed_total",
                &dead_labels
            ),
            0.0
        );
        assert_eq!(
            histogram(&s, "smartproxy_target_connect_seconds", &web),
            2.0
        );
        for family in ["smartproxy_connections_active", "smartproxy_bytes_total"] {
            assert!(s.docs.contains_key(family), "HELP for {family}");
        }

        drop(live);
        proxy.expect_closed(Reason::Normal).await;
        proxy.stop().await;
        backend.join().await;
    })
    .await;
}

#[tokio::test]
async fn metrics_endpoint_answers_404_431_and_ignores_a_silent_client() {
    init_tracing();
    let backend = Backend::spawn(echo).await;
    let proxy = TestProxy::start(
        DataPathMode::Userspace,
        &format!(
            "metrics = \"127.0.0.1:0\"\n\n{}",
            plain_route("web", backend.addr, "")
        ),
    )
    .await;
    let metrics = proxy.proxy.metrics_addr().expect("a metrics address");

    // Connected, says nothing: must not hold up the scrapes below.
    let _silent = TcpStream::connect(metrics).await.expect("connect");
    for request in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"GET /metrics/x HTTP/1.1\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    ] {
        let (status, _, _) = http(metrics, request).await;
        assert_eq!(
            status,
            "HTTP/1.1 404 Not Found",
            "{}",
            String::from_utf8_lossy(request)
        );
    }
    // Exactly the limit and no end of headers: the server reads it all, so its close is
    // a FIN, not an RST that could eat the answer.
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    huge.resize(smartproxy::metrics::MAX_REQUEST, b'x');
    let (status, _, _) = http(metrics, &huge).await;
    assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
    let (status, _, _) = http(metrics, b"garbage\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    let s = scrape(metrics).await;
    assert_eq!(
        counter(&s, "smartproxy_connections_total", &[("route", "web")]),
        0.0
    );

    proxy.stop().await;
    backend.join().await;
}

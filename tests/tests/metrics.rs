//! The Prometheus endpoint (`[proxy] metrics`), scraped over real HTTP on each data path
//! and parsed with a Prometheus text-format parser (`prometheus-parse`):
//! - after traffic: per-route connection, closure (every reason, zero included; an
//!   unreachable backend counted as `connect_failed`) and byte counters, `_total`
//!   suffixes on counters, the active gauge of a live connection labelled with its data
//!   path, the ebpf counters, and both histograms (cumulative buckets, `+Inf` = `_count`,
//!   `_sum`), and the per-target families (up, active, failures by kind, connect time);
//! - bytes by data path: the `ebpf` and `userspace` series of `smartproxy_bytes_total`
//!   add up to the bytes the test moved, the kernel's share is non-zero on the eBPF path
//!   (the connections are past their splice) and zero on the userspace one;
//! - `smartproxy_build_info`, every refusal counter (at zero here; each limit's in
//!   `limits.rs`) and the standard `process_*` metrics with plausible values;
//! - the HTTP side: the 0.0.4 content type, 404 for any other path or method, 431 for an
//!   oversized request, and a silent client that does not hold up a scrape.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_parse::{Scrape, Value};
use smartproxy::config::DataPathMode;
use smartproxy::limits::Refusal;
use smartproxy::vocab::Reason;
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// The `process_*` metrics of two scrapes, `s` then `later`: the figures of this process
/// (the proxy runs in the test's process), in the units Prometheus' collector uses.
fn process_metrics_are_plausible(s: &Scrape, later: &Scrape) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    let started = gauge(s, "process_start_time_seconds", &[]);
    assert!(
        started <= now + 1.0 && started > now - 3600.0,
        "started at {started}, now {now}"
    );
    let cpu = counter(s, "process_cpu_seconds_total", &[]);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    // Seconds, not clock ticks: no more CPU time than every core over the run.
    assert!(
        cpu >= 0.0 && cpu <= (now - started + 1.0) * cores,
        "{cpu} CPU seconds since {started}"
    );
    assert!(counter(later, "process_cpu_seconds_total", &[]) >= cpu);
    let resident = gauge(s, "process_resident_memory_bytes", &[]);
    assert!(
        (1_048_576.0..64.0 * 1_073_741_824.0).contains(&resident),
        "{resident} bytes resident"
    );
    let open = gauge(s, "process_open_fds", &[]);
    assert!(open > 0.0 && open <= gauge(s, "process_max_fds", &[]));
}

#[tokio::test]
async fn metrics_endpoint_reports_traffic_on_each_data_path() {
    for_each_data_path(|mode| async move {
        let backend = Backend::greeted(echo).await;
        let dead = free_port();
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

        // One finished connection with known bytes each way, past its splice (the
        // greeting's round trip) so that on the eBPF path the kernel moves the message.
        let front = Frontend::Plain(mode);
        let message = pattern(10_000, 7);
        let mut client = proxy.established(&front, "web").await;
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
        let mut live = proxy.established(&front, "web").await;
        live.write_all(b"ping").await.expect("live writes");
        let mut pong = [0u8; 4];
        within("the live echo", live.read_exact(&mut pong))
            .await
            .expect("live reads");

        let s = scrape(metrics).await;
        let path = booked_path(mode).to_string();
        let path = path.as_str();
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
        let bytes = |route: &str, direction: &str, data_path: &str| {
            counter(
                &s,
                "smartproxy_bytes_total",
                &[
                    ("route", route),
                    ("direction", direction),
                    ("data_path", data_path),
                ],
            )
        };
        // Two greetings, the message and the live connection's ping, each way.
        let sent = (2 * GREETING.len() + message.len() + 4) as f64;
        for direction in ["client_to_backend", "backend_to_client"] {
            let kernel = bytes("web", direction, "ebpf");
            let userspace = bytes("web", direction, "userspace");
            assert_eq!(
                kernel + userspace,
                sent,
                "{direction}: each byte moved counted once, on one data path"
            );
            if splices(mode) {
                assert!(kernel > 0.0, "{direction}: spliced, yet no kernel byte");
            } else {
                assert_eq!(kernel, 0.0, "{direction}: kernel bytes on the userspace path");
            }
            for data_path in ["ebpf", "userspace"] {
                assert_eq!(bytes("dead", direction, data_path), 0.0);
            }
        }
        assert!(
            !s.samples
                .iter()
                .any(|x| x.metric == "smartproxy_kernel_bytes_total"),
            "the kernel's bytes are a data_path of smartproxy_bytes_total, not a family of their own"
        );
        for refusal in Refusal::ALL {
            assert_eq!(
                counter(
                    &s,
                    "smartproxy_connections_refused_total",
                    &[("limit", refusal.as_str())]
                ),
                0.0,
                "{refusal}"
            );
        }
        assert_eq!(
            gauge(
                &s,
                "smartproxy_build_info",
                &[("version", smartproxy::VERSION)]
            ),
            1.0
        );
        process_metrics_are_plausible(&s, &scrape(metrics).await);
        let entries = gauge(&s, "smartproxy_ebpf_sockhash_entries", &[]);
        if splices(mode) {
            assert_eq!(entries, 2.0, "the live connection's two sockets");
        } else {
            assert_eq!(entries, 0.0);
        }
        // On auto each of the two established connections moved into the kernel once
        // (and the harness's knobs allow no move back); the fixed paths move nothing.
        let moves_to_kernel = if mode == DataPathMode::Auto { 2.0 } else { 0.0 };
        for (to, moves) in [("ebpf", moves_to_kernel), ("userspace", 0.0)] {
            assert_eq!(
                counter(&s, "smartproxy_data_path_moves_total", &[("to", to)]),
                moves,
                "moves to {to}"
            );
        }
        for name in [
            "smartproxy_ebpf_events_total",
            "smartproxy_ebpf_events_lost_total",
            "smartproxy_ebpf_splice_failures_total",
            "smartproxy_ebpf_map_full_total",
            "smartproxy_inactivity_resets_total",
        ] {
            counter(&s, name, &[]);
        }
        assert_eq!(
            counter(&s, "smartproxy_ebpf_splice_failures_total", &[]),
            0.0
        );
        assert_eq!(counter(&s, "smartproxy_ebpf_map_full_total", &[]), 0.0);
        let map_size = gauge(&s, "smartproxy_ebpf_max_connections", &[]);
        if splices(mode) {
            // proxy.max_connections, as ebpf_max_connections is not set.
            assert_eq!(map_size, 100_000.0);
        } else {
            assert_eq!(map_size, 0.0);
        }
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

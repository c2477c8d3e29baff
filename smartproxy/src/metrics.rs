//! The Prometheus endpoint: `GET /metrics` on `[proxy] metrics`, the stats snapshot in
//! the text exposition format 0.0.4.
//!
//! The HTTP side is a minimal HTTP/1.1 responder: one request per connection, headers
//! bounded to [`MAX_REQUEST`] bytes and [`REQUEST_TIMEOUT`], at most [`MAX_SCRAPERS`]
//! scrapes at once (more are closed at accept). So a slow, flooding or garbage-sending
//! client costs a few small tasks and never touches the connections the proxy carries.
//!
//! The encoder is written here rather than taken from `prometheus-client`: every figure
//! already lives in [`Snapshot`] (live ones are counted from the connection table when
//! it is taken), and that crate would want them registered as its own metric objects.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::debug;

use crate::config::MAX_SCRAPERS;
use crate::health::TargetSnapshot;
use crate::histogram::HistogramSnapshot;
use crate::listener::{accept_until, accept_warnings};
use crate::shared::Shared;
use crate::stats::Snapshot;

/// The most bytes of request line and headers read from a scraper.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time a scraper has to send its request and take the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The content type of the text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug)]
pub(crate) struct MetricsServer {
    listener: std::net::TcpListener,
}

impl MetricsServer {
    /// Needs no runtime (see `listener::bind_std`).
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<MetricsServer> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(MetricsServer { listener })
    }

    /// An endpoint a predecessor handed over (`upgrade`).
    pub(crate) fn from_std(listener: std::net::TcpListener) -> io::Result<MetricsServer> {
        listener.set_nonblocking(true)?;
        Ok(MetricsServer { listener })
    }

    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.listener)
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub(crate) async fn serve(self, shared: Arc<Shared>) {
        let listener = match TcpListener::from_std(self.listener) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint unusable");
                return;
            }
        };
        let scrapers = Arc::new(Semaphore::new(MAX_SCRAPERS));
        accept_until(
            "metrics",
            &accept_warnings(),
            || listener.accept(),
            // Until exit, not at shutdown: the drain is when an operator watches.
            shared.services_end(),
            |stream, peer| {
                let Ok(permit) = Arc::clone(&scrapers).try_acquire_owned() else {
                    debug!(%peer, "metrics: too many scrapers at once; closing");
                    return;
                };
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    match tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &shared)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => debug!(%peer, error = %e, "metrics: scrape failed"),
                        Err(_) => debug!(%peer, "metrics: scraper too slow; closing"),
                    }
                    drop(permit);
                });
            },
        )
        .await;
    }
}

/// Reads one request and answers it; the connection closes after the answer.
async fn answer(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(end) = find(&request, b"\r\n\r\n") {
            break Some(end);
        }
        if request.len() >= MAX_REQUEST {
            break None;
        }
        let mut chunk = [0u8; 1024];
        let want = chunk.len().min(MAX_REQUEST - request.len());
        let n = stream.read(&mut chunk[..want]).await?;
        if n == 0 {
            // The client went away before finishing its request.
            return Ok(());
        }
        request.extend_from_slice(&chunk[..n]);
    };
    let response = match head_end {
        None => response("431 Request Header Fields Too Large", "request too large\n"),
        Some(end) => match request_target(&request[..end]) {
            Some(("GET", "/metrics")) => response("200 OK", &render(&shared.snapshot())),
            Some(_) => response("404 Not Found", "not found; try GET /metrics\n"),
            None => response("400 Bad Request", "bad request\n"),
        },
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Method and path (query string dropped) of an HTTP/1.x request head.
fn request_target(head: &[u8]) -> Option<(&str, &str)> {
    let head = std::str::from_utf8(head).ok()?;
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    Some((method, path))
}

fn response(status: &str, body: &str) -> String {
    let content_type = if status.starts_with("200") {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

// === the text format ===

/// The snapshot in the Prometheus text exposition format 0.0.4.
///
/// Connections that have no route yet (or never got one) carry `route=""`, which
/// Prometheus reads as no `route` label; summing a family over its labels gives the
/// proxy's total.
pub fn render(s: &Snapshot) -> String {
    let mut out = Encoder::default();

    out.family(
        "smartproxy_uptime_seconds",
        "gauge",
        "Seconds since the proxy started.",
    );
    out.sample("smartproxy_uptime_seconds", &[], s.uptime_secs);
    out.family(
        "smartproxy_data_path_info",
        "gauge",
        "The proxy's data path (ebpf when the kernel path loaded), as a label.",
    );
    out.sample(
        "smartproxy_data_path_info",
        &[("data_path", s.data_path.as_str())],
        1,
    );

    out.family(
        "smartproxy_connections_active",
        "gauge",
        "Live connections, by route and data path (none: still routing or connecting).",
    );
    for r in &s.routes {
        let pending = r.active.saturating_sub(r.ebpf + r.userspace);
        for (data_path, count) in [
            ("ebpf", r.ebpf),
            ("userspace", r.userspace),
            ("none", pending),
        ] {
            out.sample(
                "smartproxy_connections_active",
                &[("route", &r.name), ("data_path", data_path)],
                count,
            );
        }
    }
    out.sample(
        "smartproxy_connections_active",
        &[("route", ""), ("data_path", "none")],
        s.unrouted.active,
    );

    out.family(
        "smartproxy_connections_half_open",
        "gauge",
        "Live connections with one direction closed, by route.",
    );
    for r in &s.routes {
        out.sample(
            "smartproxy_connections_half_open",
            &[("route", &r.name)],
            r.half_open,
        );
    }

    out.family(
        "smartproxy_connections_parked",
        "gauge",
        "Idle connections parked without a task of their own.",
    );
    out.sample("smartproxy_connections_parked", &[], s.connections.parked);

    out.family(
        "smartproxy_connections_accepted_total",
        "counter",
        "Connections accepted, routed or not.",
    );
    out.sample(
        "smartproxy_connections_accepted_total",
        &[],
        s.connections.total,
    );

    out.family(
        "smartproxy_connections_total",
        "counter",
        "Connections routed, by route.",
    );
    for r in &s.routes {
        out.sample(
            "smartproxy_connections_total",
            &[("route", &r.name)],
            r.total,
        );
    }

    out.family(
        "smartproxy_connections_closed_total",
        "counter",
        "Connections closed, by route and closure reason.",
    );
    let unrouted = ("", &s.unrouted.closed);
    for (route, closed) in s
        .routes
        .iter()
        .map(|r| (r.name.as_str(), &r.closed))
        .chain([unrouted])
    {
        for (reason, count) in closed {
            out.sample(
                "smartproxy_connections_closed_total",
                &[("route", route), ("reason", reason)],
                *count,
            );
        }
    }

    out.family(
        "smartproxy_connections_refused_total",
        "counter",
        "Connections refused, by the limit that refused them (each is also closed, reason max_connections or denied).",
    );
    for (limit, count) in &s.refused {
        out.sample(
            "smartproxy_connections_refused_total",
            &[("limit", limit)],
            *count,
        );
    }

    out.family(
        "smartproxy_bytes_total",
        "counter",
        "Bytes delivered, by route, direction and the data path that moved them.",
    );
    for r in &s.routes {
        for (direction, bytes, kernel) in [
            (
                "client_to_backend",
                r.bytes_client_to_backend,
                r.bytes_kernel_client_to_backend,
            ),
            (
                "backend_to_client",
                r.bytes_backend_to_client,
                r.bytes_kernel_backend_to_client,
            ),
        ] {
            // The kernel's part and the rest: each byte in exactly one series.
            for (data_path, count) in [
                ("ebpf", kernel),
                ("userspace", bytes.saturating_sub(kernel)),
            ] {
                out.sample(
                    "smartproxy_bytes_total",
                    &[
                        ("route", &r.name),
                        ("direction", direction),
                        ("data_path", data_path),
                    ],
                    count,
                );
            }
        }
    }

    let ebpf = [
        (
            "smartproxy_ebpf_sockhash_entries",
            "gauge",
            "Sockets in the BPF sockhash.",
            s.ebpf.sockhash_entries,
        ),
        (
            "smartproxy_ebpf_events_total",
            "counter",
            "Socket events received from the kernel ring buffer.",
            s.ebpf.events,
        ),
        (
            "smartproxy_ebpf_events_lost_total",
            "counter",
            "Socket events the kernel could not queue (ring buffer full).",
            s.ebpf.events_lost,
        ),
        (
            "smartproxy_ebpf_splice_failures_total",
            "counter",
            "Connections the kernel data path could not take.",
            s.ebpf.splice_failures,
        ),
        (
            "smartproxy_ebpf_map_full_total",
            "counter",
            "Connections the kernel data path could not take because its maps were full \
             (part of smartproxy_ebpf_splice_failures_total).",
            s.ebpf.map_full,
        ),
        (
            "smartproxy_ebpf_max_connections",
            "gauge",
            "Connections the kernel maps hold (proxy.ebpf_max_connections).",
            s.ebpf.max_connections,
        ),
        (
            "smartproxy_inactivity_resets_total",
            "counter",
            "Inactivity timeouts counted and re-armed (timeout_behavior = \"reset\").",
            s.lifecycle.inactivity_resets,
        ),
    ];
    for (name, kind, help, value) in ebpf {
        out.family(name, kind, help);
        out.sample(name, &[], value);
    }
    out.family(
        "smartproxy_data_path_moves_total",
        "counter",
        "Connections data_path = \"auto\" moved, by the path they moved to.",
    );
    for (to, count) in [
        ("ebpf", s.ebpf.moves_to_kernel),
        ("userspace", s.ebpf.moves_to_relay),
    ] {
        out.sample("smartproxy_data_path_moves_total", &[("to", to)], count);
    }
    out.family(
        "smartproxy_build_info",
        "gauge",
        "The proxy's version, as a label; always 1.",
    );
    out.sample("smartproxy_build_info", &[("version", crate::VERSION)], 1);
    // Prometheus' standard process metrics: their names, types and help texts,
    // unprefixed. One that /proc would not give is left out.
    let p = &s.process;
    let process = [
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            Some(p.open_fds.to_string()),
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            Some(p.max_fds.to_string()),
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            p.resident_memory_bytes.map(|v| v.to_string()),
        ),
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            p.cpu_seconds.map(|v| v.to_string()),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            p.start_time_seconds.map(|v| v.to_string()),
        ),
    ];
    for (name, kind, help, value) in process {
        if let Some(value) = value {
            out.family(name, kind, help);
            out.sample(name, &[], value);
        }
    }

    out.family(
        "smartproxy_connection_duration_seconds",
        "histogram",
        "Lifetime of closed connections, by route.",
    );
    for r in &s.routes {
        out.histogram(
            "smartproxy_connection_duration_seconds",
            &[("route", &r.name)],
            &r.connection_duration_seconds,
        );
    }
    out.family(
        "smartproxy_backend_connect_seconds",
        "histogram",
        "Time to connect a backend, by route.",
    );
    for r in &s.routes {
        out.histogram(
            "smartproxy_backend_connect_seconds",
            &[("route", &r.name)],
            &r.backend_connect_seconds,
        );
    }
    render_targets(&mut out, &s.targets);
    out.text
}

fn target_labels(t: &TargetSnapshot) -> [(&str, &str); 2] {
    [("route", &t.route), ("target", &t.target)]
}

/// The per-target families, labelled `route` and `target` (as configured).
fn render_targets(out: &mut Encoder, targets: &[TargetSnapshot]) {
    let name = "smartproxy_target_up";
    out.family(
        name,
        "gauge",
        "Whether the target is up (1) or skipped by health (0), by route and target.",
    );
    for t in targets {
        out.sample(name, &target_labels(t), u64::from(t.up));
    }
    let name = "smartproxy_target_connections_active";
    out.family(
        name,
        "gauge",
        "Live connections to the target, by route and target.",
    );
    for t in targets {
        out.sample(name, &target_labels(t), t.active);
    }
    let name = "smartproxy_target_connect_failures_total";
    out.family(
        name,
        "counter",
        "Failed connects to the target, by route, target and kind (refused, timeout, other).",
    );
    for t in targets {
        for (kind, count) in &t.connect_failures {
            let [route, target] = target_labels(t);
            out.sample(name, &[route, target, ("kind", kind)], count);
        }
    }
    let name = "smartproxy_target_connect_warnings_suppressed_total";
    out.family(
        name,
        "counter",
        "Connect-failure log lines held back (at most one per target every 10 s), by route and target.",
    );
    for t in targets {
        out.sample(name, &target_labels(t), t.suppressed_warnings);
    }
    let name = "smartproxy_target_connect_seconds";
    out.family(
        name,
        "histogram",
        "Time to connect the target, by route and target.",
    );
    for t in targets {
        out.histogram(name, &target_labels(t), &t.connect_seconds);
    }
}

/// Appends families and samples to a text document.
#[derive(Default)]
struct Encoder {
    text: String,
}

impl Encoder {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape(help, false));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape(value, true));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        let buckets = h.buckets.iter().map(|b| (b.le.to_string(), b.count));
        for (le, count) in buckets.chain([("+Inf".to_owned(), h.count)]) {
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, count);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum_secs);
        self.sample(&format!("{name}_count"), labels, h.count);
    }
}

/// Escapes a label value (`\`, `"`, newline) or a HELP text (`\`, newline).
fn escape(text: &str, quote: bool) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            '"' if quote => escaped.push_str("\\\""),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_target_takes_get_and_path_and_drops_the_query() {
        assert_eq!(
            request_target(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(request_target(b"POST / HTTP/1.0"), Some(("POST", "/")));
        assert_eq!(request_target(b"GET /metrics"), None);
        assert_eq!(request_target(b"\xff\xfe"), None);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd", true), "a\\\"b\\\\c\\nd");
        assert_eq!(escape("a\"b", false), "a\"b");
    }
}

//! What `smartproxy stats` and `smartproxy connections` print: the stats screen (with
//! per-second rates and the busiest routes when a previous snapshot is at hand) and the
//! connection list, sorted and filtered.

use std::fmt::Write as _;
use std::time::Duration;

use crate::health::{FailureKind, TargetSnapshot};
use crate::stats::{ConnectionRow, RouteSnapshot, Snapshot};

/// How many routes the rates section lists.
pub const TOP_ROUTES: usize = 5;

/// The stats screen. With `previous` (a snapshot taken `elapsed` earlier), it adds
/// connections/s, bytes/s, and the [`TOP_ROUTES`] routes by bytes/s.
pub fn render_stats(s: &Snapshot, previous: Option<(&Snapshot, Duration)>) -> String {
    let mut out = String::new();
    let c = &s.connections;
    let _ = writeln!(
        out,
        "data path   {}    uptime {}s",
        s.data_path, s.uptime_secs
    );
    let _ = writeln!(
        out,
        "connections active {}  half-open {}  parked {}  total {}",
        c.active, c.half_open, c.parked, c.total
    );
    let _ = writeln!(
        out,
        "  ebpf      active {}  half-open {}",
        c.ebpf, c.half_open_ebpf
    );
    let _ = writeln!(
        out,
        "  userspace active {}  half-open {}",
        c.userspace, c.half_open_userspace
    );
    let _ = writeln!(
        out,
        "bytes       client->backend {}  backend->client {}",
        s.bytes.client_to_backend, s.bytes.backend_to_client
    );
    if let Some((before, elapsed)) = previous {
        let secs = elapsed.as_secs_f64().max(0.001);
        let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
        let _ = writeln!(
            out,
            "rates       {:.1} conn/s  client->backend {:.0} B/s  backend->client {:.0} B/s",
            rate(c.total, before.connections.total),
            rate(s.bytes.client_to_backend, before.bytes.client_to_backend),
            rate(s.bytes.backend_to_client, before.bytes.backend_to_client),
        );
        let _ = writeln!(
            out,
            "top routes by bytes/s\n  {:<20} {:>8} {:>10} {:>18} {:>18}",
            "route", "active", "conn/s", "client->backend/s", "backend->client/s"
        );
        for (route, rates) in top_routes(s, before, secs) {
            let _ = writeln!(
                out,
                "  {:<20} {:>8} {:>10.1} {:>18.0} {:>18.0}",
                route.name, route.active, rates[0], rates[1], rates[2]
            );
        }
    }
    let e = &s.ebpf;
    let _ = writeln!(
        out,
        "ebpf        sockhash entries {}  events {}  events lost {}",
        e.sockhash_entries, e.events, e.events_lost
    );
    let _ = writeln!(
        out,
        "  maps      for {} connections  full {}  splice failures {}",
        e.max_connections, e.map_full, e.splice_failures
    );
    let _ = writeln!(
        out,
        "  auto      moves into the kernel {}  out to the relay {}",
        e.moves_to_kernel, e.moves_to_relay
    );
    if let Some(m) = e.map_entries {
        let _ = writeln!(
            out,
            "  entries   SOCKETS {}  TARGETS {}  FLOWS {}  CONTROL {}",
            m.sockets, m.targets, m.flows, m.control
        );
    }
    let _ = writeln!(
        out,
        "process     open fds {}  fd limit {}",
        s.process.open_fds, s.process.max_fds
    );
    let _ = writeln!(out, "closed");
    for (reason, count) in &s.closed {
        let _ = writeln!(out, "  {reason:<20} {count}");
    }
    let _ = writeln!(
        out,
        "{:<20} {:>8} {:>10} {:>16} {:>16}",
        "route", "active", "total", "client->backend", "backend->client"
    );
    for r in &s.routes {
        let _ = writeln!(
            out,
            "{:<20} {:>8} {:>10} {:>16} {:>16}",
            r.name, r.active, r.total, r.bytes_client_to_backend, r.bytes_backend_to_client
        );
    }
    render_targets(&mut out, &s.targets);
    out
}

/// One line per target: its health, live connections and failed connects by kind.
fn render_targets(out: &mut String, targets: &[TargetSnapshot]) {
    let _ = writeln!(
        out,
        "{:<20} {:<24} {:<5} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "target of route", "target", "state", "active", "refused", "timeout", "other", "suppressed"
    );
    for t in targets {
        let _ = writeln!(
            out,
            "{:<20} {:<24} {:<5} {:>8} {:>8} {:>8} {:>8} {:>10}",
            t.route,
            t.target,
            if t.up { "up" } else { "down" },
            t.active,
            t.failures(FailureKind::Refused),
            t.failures(FailureKind::Timeout),
            t.failures(FailureKind::Other),
            t.suppressed_warnings,
        );
    }
}

/// The busiest routes since `before`: `[conn/s, client->backend B/s, backend->client
/// B/s]`, by bytes/s both ways, at most [`TOP_ROUTES`]. A route missing from `before`
/// counts from zero.
fn top_routes<'a>(
    now: &'a Snapshot,
    before: &Snapshot,
    secs: f64,
) -> Vec<(&'a RouteSnapshot, [f64; 3])> {
    let mut rates: Vec<(&RouteSnapshot, [f64; 3])> = now
        .routes
        .iter()
        .map(|route| {
            let then = before.routes.iter().find(|r| r.name == route.name);
            let delta =
                |now: u64, then: Option<u64>| now.saturating_sub(then.unwrap_or(0)) as f64 / secs;
            let rates = [
                delta(route.total, then.map(|t| t.total)),
                delta(
                    route.bytes_client_to_backend,
                    then.map(|t| t.bytes_client_to_backend),
                ),
                delta(
                    route.bytes_backend_to_client,
                    then.map(|t| t.bytes_backend_to_client),
                ),
            ];
            (route, rates)
        })
        .collect();
    rates.sort_by(|a, b| (b.1[1] + b.1[2]).total_cmp(&(a.1[1] + a.1[2])));
    rates.truncate(TOP_ROUTES);
    rates
}

/// `smartproxy connections --sort`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    /// Connection id, ascending (oldest accepted first).
    #[default]
    Id,
    /// Bytes both ways, most first.
    Bytes,
    /// Time since accept, oldest first.
    Age,
    /// Time without a byte either way, longest first.
    Idle,
}

/// Keeps the rows of `route` (all when `None`) and sorts them.
pub fn select_connections(
    mut rows: Vec<ConnectionRow>,
    sort: SortBy,
    route: Option<&str>,
) -> Vec<ConnectionRow> {
    if let Some(route) = route {
        rows.retain(|row| row.route.as_deref() == Some(route));
    }
    match sort {
        SortBy::Id => rows.sort_by_key(|row| row.id),
        SortBy::Bytes => rows.sort_by_key(|row| {
            std::cmp::Reverse(row.bytes_client_to_backend + row.bytes_backend_to_client)
        }),
        SortBy::Age => rows.sort_by(|a, b| b.age_secs.total_cmp(&a.age_secs)),
        SortBy::Idle => rows.sort_by(|a, b| b.idle_secs.total_cmp(&a.idle_secs)),
    }
    rows
}

/// The connection table, one row per connection.
pub fn render_connections(rows: &[ConnectionRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>8} {:<16} {:<22} {:<22} {:<9} {:>9} {:>9} {:>5} {:>14} {:>14}",
        "id", "route", "client", "backend", "path", "age_s", "idle_s", "half", "c->b", "b->c"
    );
    for row in rows {
        let _ = writeln!(
            out,
            "{:>8} {:<16} {:<22} {:<22} {:<9} {:>9.1} {:>9.1} {:>5} {:>14} {:>14}",
            row.id,
            row.route.as_deref().unwrap_or("-"),
            row.client,
            row.backend.as_deref().unwrap_or("-"),
            row.data_path.map_or("-", |p| p.as_str()),
            row.age_secs,
            row.idle_secs,
            if row.half_open { "yes" } else { "no" },
            row.bytes_client_to_backend,
            row.bytes_backend_to_client,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u64, route: &str, bytes: u64, age: f64, idle: f64) -> ConnectionRow {
        ConnectionRow {
            id,
            route: Some(route.to_owned()),
            client: "127.0.0.1:1".to_owned(),
            backend: None,
            target: None,
            data_path: None,
            age_secs: age,
            idle_secs: idle,
            half_open: false,
            bytes_client_to_backend: bytes,
            bytes_backend_to_client: bytes,
        }
    }

    fn ids(rows: &[ConnectionRow]) -> Vec<u64> {
        rows.iter().map(|r| r.id).collect()
    }

    #[test]
    fn connections_sort_descending_and_filter_by_route() {
        let rows = vec![
            row(2, "a", 10, 5.0, 1.0),
            row(1, "b", 30, 9.0, 0.5),
            row(3, "a", 20, 1.0, 3.0),
        ];
        for (sort, route, expected) in [
            (SortBy::Id, None, &[1, 2, 3][..]),
            (SortBy::Bytes, None, &[1, 3, 2]),
            (SortBy::Age, None, &[1, 2, 3]),
            (SortBy::Idle, None, &[3, 2, 1]),
            (SortBy::Bytes, Some("a"), &[3, 2]),
        ] {
            assert_eq!(
                ids(&select_connections(rows.clone(), sort, route)),
                expected,
                "{sort:?} {route:?}"
            );
        }
        assert!(select_connections(rows, SortBy::Id, Some("zzz")).is_empty());
    }
}

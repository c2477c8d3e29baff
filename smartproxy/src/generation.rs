//! A configuration generation: one validated config and the routing built from it. The
//! proxy accepts under its current generation; a reload builds the next one beside it
//! and swaps it in. Every connection keeps the generation it was accepted under until it
//! ends, so a reload never changes a running connection.

use std::sync::Arc;

use crate::config::{Config, DataPathMode, LoadOptions, ProxyConfig};
use crate::health::{Registry, TargetHealth};
use crate::route::RouteTable;
use crate::stats::Stats;
use crate::tls::TlsRoutes;
use crate::vocab::DataPathKind;

/// One configuration as the proxy serves it.
#[derive(Debug)]
pub struct Generation {
    pub config: Config,
    pub routes: RouteTable,
    /// Certificates and TLS configs of the terminating routes, read when the generation
    /// was built: a reload re-reads them.
    pub tls: TlsRoutes,
    /// Per route, in config order: its counters slot in [`Stats`].
    slots: Vec<usize>,
    /// Per route, in config order: the health of each target, in config order.
    health: Vec<Vec<Arc<TargetHealth>>>,
}

/// Why a new configuration cannot replace the running one without a restart.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotReloadable {
    #[error(
        "proxy.{key}: changed, but only a restart applies it (the running value stays in force)"
    )]
    ProxyKey { key: &'static str },
    #[error("route[{index}].data_path: \"ebpf\", but this proxy did not load the eBPF data path; only a restart can load it")]
    EbpfNotLoaded { index: usize },
    #[error(
        "proxy.ebpf_max_connections (proxy.max_connections when not set): the kernel maps \
         hold {running} connections and cannot be resized; {next} needs a restart (the \
         running values stay in force)"
    )]
    EbpfMapSize { running: u32, next: u32 },
}

impl Generation {
    /// `tls` is what [`TlsRoutes::load`] read for `config`.
    pub fn new(config: Config, tls: TlsRoutes, stats: &Stats, health: &Registry) -> Generation {
        let routes = RouteTable::new(&config);
        let slots: Vec<usize> = config
            .routes
            .iter()
            .map(|route| stats.route_slot(&route.name))
            .collect();
        let health = health.generation(
            config
                .routes
                .iter()
                .zip(&slots)
                .map(|(route, slot)| (*slot, &route.targets[..], route.health)),
        );
        Generation {
            config,
            routes,
            tls,
            slots,
            health,
        }
    }

    /// The counters slot of the route at `index`.
    pub fn slot(&self, index: usize) -> usize {
        self.slots[index]
    }

    /// The health of the targets of the route at `index`, in config order.
    pub fn health(&self, index: usize) -> &[Arc<TargetHealth>] {
        &self.health[index]
    }

    /// Where a connection of the route at `index` puts its bytes.
    pub fn data_path(&self, index: usize, kernel_loaded: bool) -> Placement {
        self.config.placement(index, kernel_loaded)
    }
}

impl Config {
    /// Where a connection of the route at `index` puts its bytes.
    pub fn placement(&self, index: usize, kernel_loaded: bool) -> Placement {
        let route = &self.routes[index];
        let mode = route.data_path.unwrap_or(self.proxy.data_path);
        let terminates = route.tls.is_some_and(|tls| tls.terminates());
        // Without an `auto_splice_rate`, `auto` splices at once.
        match select_data_path(mode, kernel_loaded, terminates) {
            Placement::Adaptive if !self.proxy.auto.adaptive() => Placement::Kernel,
            placement => placement,
        }
    }

    /// What the kernel data path is loaded with. Where every route splices each connection
    /// at once, sockets arm their sock_ops callbacks at the handshake, which takes no
    /// system call; otherwise a splice arms its own two, and sockets that never splice run
    /// no callback after their handshake (`docs/kernel-notes.md#state-events`). Decided at
    /// start (a successor always arms at splice): a reload that changes the routes keeps
    /// it.
    pub fn kernel_options(&self) -> LoadOptions {
        let every_connection_splices =
            (0..self.routes.len()).all(|index| self.placement(index, true) == Placement::Kernel);
        LoadOptions {
            max_queued_bytes: self.proxy.max_queued_bytes,
            ring_buffer_bytes: self.proxy.ebpf_ring_buffer_bytes,
            // Validated at load to be at most `max_connections`.
            max_connections: self.proxy.ebpf_max_connections,
            arm_at_splice: !every_connection_splices,
        }
    }
}

/// Where a connection puts its bytes, decided once when its relay starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The userspace relay, for good.
    Relay,
    /// The kernel, spliced at once (`data_path = "ebpf"`).
    Kernel,
    /// The relay first, then wherever its traffic is cheaper (`datapath::adaptive`).
    Adaptive,
}

impl Placement {
    pub fn uses_kernel(self) -> bool {
        self != Placement::Relay
    }

    /// The path a proxy whose default this is reports (`stats`): the kernel one whenever
    /// it is loaded for connections.
    pub fn kind(self) -> DataPathKind {
        match self {
            Placement::Relay => DataPathKind::Userspace,
            Placement::Kernel | Placement::Adaptive => DataPathKind::Ebpf,
        }
    }
}

/// The one data-path rule: the kernel path when the mode allows it (`auto` adaptively,
/// `ebpf` at once), the kernel loaded, and the proxy need not see the plaintext (a
/// TLS-terminating route does); the relay otherwise.
pub fn select_data_path(mode: DataPathMode, kernel_loaded: bool, terminates: bool) -> Placement {
    match mode {
        _ if !kernel_loaded || terminates => Placement::Relay,
        DataPathMode::Auto => Placement::Adaptive,
        DataPathMode::Ebpf => Placement::Kernel,
        DataPathMode::Userspace => Placement::Relay,
    }
}

/// Checks that `next` may replace `running` in a live proxy: routes and lifecycle values
/// may change freely (they apply to new connections), but what was set up once at start
/// (the kernel data path, the control socket, the metrics listener) may not.
pub fn check_reloadable(
    running: &Config,
    next: &Config,
    kernel_loaded: bool,
) -> Result<(), NotReloadable> {
    restart_only_change(&running.proxy, &next.proxy)
        .map_or(Ok(()), |key| Err(NotReloadable::ProxyKey { key }))?;
    let map_size = [&running.proxy, &next.proxy].map(|proxy| proxy.ebpf_max_connections);
    if kernel_loaded && map_size[0] != map_size[1] {
        return Err(NotReloadable::EbpfMapSize {
            running: map_size[0],
            next: map_size[1],
        });
    }
    if !kernel_loaded {
        if let Some(index) = next
            .routes
            .iter()
            .position(|route| route.data_path == Some(DataPathMode::Ebpf))
        {
            return Err(NotReloadable::EbpfNotLoaded { index });
        }
    }
    Ok(())
}

/// The first `[proxy]` key that differs and only takes effect at start.
fn restart_only_change(running: &ProxyConfig, next: &ProxyConfig) -> Option<&'static str> {
    // Destructured so that a new key cannot be forgotten here: it must be listed as
    // restart-only or as applied live.
    let ProxyConfig {
        data_path,
        control_socket,
        max_connections: _,
        max_connections_explicit: _,
        metrics,
        max_queued_bytes,
        per_ip,
        ipv6_prefix_per_ip,
        user,
        ebpf_ring_buffer_bytes,
        // Restart-only while the kernel maps it sizes exist: see `check_reloadable`.
        ebpf_max_connections: _,
        ebpf_pin_root,
        // Taken by each new connection (`connection.rs` `relay`).
        auto: _,
        // Read by each sweep for quiet connections (`park::run`).
        park_idle_after: _,
    } = running;
    [
        ("data_path", *data_path == next.data_path),
        ("control_socket", *control_socket == next.control_socket),
        ("metrics", *metrics == next.metrics),
        (
            "max_queued_bytes",
            *max_queued_bytes == next.max_queued_bytes,
        ),
        (
            "max_connections_per_ip",
            per_ip.max_connections == next.per_ip.max_connections,
        ),
        (
            "connection_rate_per_ip",
            per_ip.rate_per_minute == next.per_ip.rate_per_minute,
        ),
        (
            "ipv6_prefix_per_ip",
            *ipv6_prefix_per_ip == next.ipv6_prefix_per_ip,
        ),
        ("user", *user == next.user),
        (
            "ebpf_ring_buffer_bytes",
            *ebpf_ring_buffer_bytes == next.ebpf_ring_buffer_bytes,
        ),
        ("ebpf_pin_root", *ebpf_pin_root == next.ebpf_pin_root),
    ]
    .into_iter()
    .find(|(_, same)| !same)
    .map(|(key, _)| key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(proxy: &str, route: &str) -> Config {
        let text = format!(
            "[proxy]\n{proxy}\n[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\ntargets = [\"127.0.0.1:2\"]\n{route}\n"
        );
        match Config::from_str(&text, Path::new("test.toml")) {
            Ok(config) => config,
            Err(e) => panic!("test config does not load: {e}"),
        }
    }

    #[test]
    fn sockets_arm_at_their_handshake_only_where_every_connection_splices_at_once() {
        let arms_at_splice =
            |proxy: &str, route: &str| config(proxy, route).kernel_options().arm_at_splice;
        assert!(arms_at_splice("data_path = \"auto\"", ""));
        assert!(!arms_at_splice("data_path = \"ebpf\"", ""));
        assert!(arms_at_splice(
            "data_path = \"ebpf\"",
            "data_path = \"userspace\""
        ));
        assert!(arms_at_splice(
            "data_path = \"userspace\"",
            "data_path = \"auto\""
        ));
        let two_routes = |first: &str, second: &str| {
            let second_route = format!(
                "{first}\n[[route]]\nname = \"b\"\nlisten = \"127.0.0.1:3\"\ntargets = [\"127.0.0.1:2\"]\n{second}"
            );
            arms_at_splice("", &second_route)
        };
        assert!(!two_routes("data_path = \"ebpf\"", "data_path = \"ebpf\""));
        assert!(two_routes(
            "data_path = \"ebpf\"",
            "data_path = \"userspace\""
        ));
        assert!(two_routes("data_path = \"ebpf\"", "data_path = \"auto\""));
        // Without a splice rate `auto` splices every connection at once.
        assert!(!arms_at_splice(
            "data_path = \"auto\"\nauto_splice_rate = 0",
            ""
        ));
    }

    #[test]
    fn routes_and_live_keys_may_change() {
        let running = config("max_connections = 10\nebpf_max_connections = 10", "");
        let next = config(
            "max_connections = 20\nebpf_max_connections = 10",
            "inactivity_timeout = \"5s\"",
        );
        assert_eq!(check_reloadable(&running, &next, true), Ok(()));
    }

    #[test]
    fn start_only_keys_need_a_restart() {
        let running = config("data_path = \"auto\"", "");
        let next = config("data_path = \"userspace\"", "");
        assert_eq!(
            check_reloadable(&running, &next, true),
            Err(NotReloadable::ProxyKey { key: "data_path" })
        );
        let next = config("control_socket = \"/tmp/other.sock\"", "");
        assert_eq!(
            check_reloadable(&running, &next, true),
            Err(NotReloadable::ProxyKey {
                key: "control_socket"
            })
        );
    }

    #[test]
    fn the_kernel_map_size_needs_a_restart_once_the_maps_exist() {
        let running = config("max_connections = 10", "");
        let size = |running: u32, next: u32| Err(NotReloadable::EbpfMapSize { running, next });
        // Unset, ebpf_max_connections follows max_connections, which then sizes the maps.
        let next = config("max_connections = 20", "");
        assert_eq!(check_reloadable(&running, &next, true), size(10, 20));
        assert_eq!(check_reloadable(&running, &next, false), Ok(()));
        let next = config("max_connections = 20\nebpf_max_connections = 10", "");
        assert_eq!(check_reloadable(&running, &next, true), Ok(()));
        let next = config("max_connections = 10\nebpf_max_connections = 5", "");
        assert_eq!(check_reloadable(&running, &next, true), size(10, 5));
    }

    #[test]
    fn an_ebpf_route_needs_the_kernel_path_loaded() {
        let running = config("data_path = \"auto\"", "");
        let next = config("data_path = \"auto\"", "data_path = \"ebpf\"");
        assert_eq!(
            check_reloadable(&running, &next, false),
            Err(NotReloadable::EbpfNotLoaded { index: 0 })
        );
        assert_eq!(check_reloadable(&running, &next, true), Ok(()));
    }

    #[test]
    fn a_route_keeps_its_counters_slot_across_generations() {
        let stats = Stats::new(DataPathKind::Userspace);
        let health = Registry::default();
        let build = |config: Config| match TlsRoutes::load(&config) {
            Ok(tls) => Generation::new(config, tls, &stats, &health),
            Err(e) => panic!("no TLS here, nothing to fail: {e}"),
        };
        let first = build(config("", ""));
        let second = build(config("", "inactivity_timeout = \"5s\""));
        assert_eq!(first.slot(0), second.slot(0));
    }
}

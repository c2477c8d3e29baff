//! Typed configuration: the TOML file of docs/architecture.md#configuration, parsed and
//! validated at load.
//!
//! Loading is two steps, as in rathole. Serde first reads `Raw*` structs: every table is
//! `deny_unknown_fields`, every optional key an `Option`, and `serde_path_to_error`
//! remembers where a type error happened. [`validate`] then applies defaults and the
//! `[lifecycle]` inheritance and checks the rules that span keys and routes. Every
//! [`ConfigError`] names the file, the key path (`route[1].targets[0]`) and why.
//!
//! Inheritance: a `[[route]]` may set any `[lifecycle]` key directly (flat, next to
//! `listen`); a key it does not set has the `[lifecycle]` value, and a key `[lifecycle]`
//! does not set has its default (`LifecycleConfig::default`). [`RouteConfig::lifecycle`] holds
//! the result, so nothing downstream needs to look at `[lifecycle]` again.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limits::{AccessList, Cidr, PerIpConfig, RouteLimitsConfig};
use crate::privileges::User;
use crate::proxy_protocol::{Accept as AcceptProxyProtocol, Inbound, Version as ProxyProtocol};
use crate::sni::is_dns_name;

/// A whole, validated configuration file.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub proxy: ProxyConfig,
    /// `[lifecycle]` with defaults filled in; each route carries its own effective copy.
    pub lifecycle: LifecycleConfig,
    /// In file order; at least one.
    pub routes: Vec<RouteConfig>,
    /// The file this was read from ([`Config::from_file`]): what a reload reads again.
    pub source: Option<PathBuf>,
}

/// `[proxy]`: process-wide settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyConfig {
    pub data_path: DataPathMode,
    pub control_socket: PathBuf,
    /// Greater than zero: the file's value, or the default when it sets none.
    pub max_connections: usize,
    /// Whether the file sets `max_connections`. When it does not, the proxy takes no more
    /// than its file descriptor limit carries (`fdlimit`); when it does, it keeps the
    /// value and warns if the limit falls short.
    pub max_connections_explicit: bool,
    /// Address of the Prometheus text endpoint (`/metrics`), if any.
    pub metrics: Option<SocketAddr>,
    /// eBPF data path: per direction, the most bytes on their way to a peer before the
    /// sender is paused (its TCP window closes). At least [`MIN_QUEUED_BYTES`].
    pub max_queued_bytes: u64,
    /// Per-client-IP limits over all routes together.
    pub per_ip: PerIpConfig,
    /// The IPv6 prefix length that per-IP limits (here and on routes) count as one client.
    pub ipv6_prefix_per_ip: u8,
    /// The user to run as once the listeners, the control socket and eBPF are set up;
    /// looked up at load, so that `check` catches a user this system does not have.
    pub user: Option<User>,
    /// eBPF data path: size of the event ring buffer (FIN/RST/close events), a power of
    /// two and a multiple of the page size.
    pub ebpf_ring_buffer_bytes: u32,
    /// eBPF data path: how many connections the kernel maps hold (two entries each).
    /// Between 1 and `max_connections` as written in the file (its value, unless the
    /// file sets this key), and at most [`MAX_EBPF_CONNECTIONS`]. A connection beyond it
    /// uses the userspace copy.
    pub ebpf_max_connections: u32,
    /// eBPF data path: the bpffs mount under which the maps are pinned
    /// (`<root>/smartproxy/<instance>`), so that `smartproxy upgrade` hands them to the
    /// successor. An absolute path; mounted at start if it is not a bpffs yet.
    pub ebpf_pin_root: PathBuf,
    /// `data_path = "auto"`: when a connection moves between the relay and the kernel.
    pub auto: AutoConfig,
    /// How long a connection moves no byte (through the kernel either) before it is
    /// parked without a task (`park`; longer for one that keeps waking soon after);
    /// `None` (`"0s"` in the file): never. At least [`MIN_PARK_IDLE_AFTER`].
    pub park_idle_after: Option<Duration>,
}

/// Parking and taking up cost about 24 system calls: a connection quiet for a second
/// pays them at most once a second (docs/performance.md#idle-connections).
pub const DEFAULT_PARK_IDLE_AFTER: Duration = Duration::from_secs(1);
/// Shorter, and a connection that pauses between messages would park between them.
pub const MIN_PARK_IDLE_AFTER: Duration = Duration::from_millis(100);

/// The knobs of the adaptive data path (`datapath::adaptive`), `[proxy] auto_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoConfig {
    /// Bytes per second at or above which a connection on the relay goes into the kernel:
    /// in each direction, or in either with `splice_one_way` or from pass mode. 0: no
    /// adaptive path, `auto` splices every connection at once as `ebpf` does.
    pub splice_rate: u64,
    /// Whether one direction at `splice_rate` is enough, which splices one-way streams too.
    pub splice_one_way: bool,
    /// Bytes per second, both directions together, below which a connection the kernel
    /// redirects goes back to the relay (pass mode). Lower than `splice_rate`: the gap is
    /// the hysteresis.
    pub leave_rate: u64,
    /// Over how long each rate is measured: the policy's reaction time.
    pub window: Duration,
    /// Moves a connection may make; then it stays where it is.
    pub max_moves: u32,
}

/// Measured with `cargo xtask bench` on the 2-core machine (docs/performance.md): since
/// spliced sockets stopped waking the proxy, request/response with 16 KiB messages over
/// 32 connections (about 32 MiB/s each way per connection) is about a fifth faster in the
/// kernel than on the relay, and 64 B messages (under 1 MiB/s) and churn are not. 16
/// MiB/s splices the former and keeps the latter, and a slow reader at 10 MiB/s, on the
/// relay.
pub const DEFAULT_AUTO_SPLICE_RATE: u64 = 16 * 1024 * 1024;
/// One-way streams stay on the relay: on the same machine (docs/performance.md, "One-way
/// streams on the relay") one stream was faster there than in the kernel in 15 of 16
/// readings (up and down) of eight full runs of the bench, for about the same CPU of the
/// whole machine per GiB, while request/response with 16 KiB messages and larger, which
/// moves bytes both ways, was faster in the kernel.
pub const DEFAULT_AUTO_SPLICE_ONE_WAY: bool = false;
pub const DEFAULT_AUTO_LEAVE_RATE: u64 = 8 * 1024 * 1024;
pub const DEFAULT_AUTO_WINDOW: Duration = Duration::from_millis(200);
pub const DEFAULT_AUTO_MAX_MOVES: u32 = 8;
/// `auto_window` bounds: shorter windows measure single reads, longer ones react late.
pub const AUTO_WINDOWS: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(10);

impl AutoConfig {
    /// Whether `auto` moves connections ([`AutoConfig::splice_rate`] is set).
    pub fn adaptive(&self) -> bool {
        self.splice_rate > 0
    }
}

impl Default for AutoConfig {
    fn default() -> Self {
        AutoConfig {
            splice_rate: DEFAULT_AUTO_SPLICE_RATE,
            splice_one_way: DEFAULT_AUTO_SPLICE_ONE_WAY,
            leave_rate: DEFAULT_AUTO_LEAVE_RATE,
            window: DEFAULT_AUTO_WINDOW,
            max_moves: DEFAULT_AUTO_MAX_MOVES,
        }
    }
}

/// The largest `ebpf_max_connections`: the maps' sizes (two entries a connection) are
/// 32-bit numbers. The kernel's own limits are lower, and say so when the maps are created.
pub const MAX_EBPF_CONNECTIONS: u32 = u32::MAX / 2;

/// Metrics scrapes answered at once; a connection beyond that is closed at accept.
pub const MAX_SCRAPERS: usize = 16;

/// The default of `proxy.max_queued_bytes`. Measured with `cargo xtask bench` on loopback:
/// at 4 MiB fast readers hit the cap all the time (5-12 % of their bytes went through the
/// kernel); at 16 MiB 63-96 % did, and a slow reader still holds at most about twice the cap.
pub const DEFAULT_MAX_QUEUED_BYTES: u64 = 16 * 1024 * 1024;

/// What the kernel data path (`datapath::kernel::Kernel::load`) is loaded with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Size of the `EVENTS` ring buffer in bytes: a power of two, at least one page. Each event
    /// takes 32 bytes (24 + header); when it is full, events are counted as lost.
    pub ring_buffer_bytes: u32,
    /// How many spliced connections `FLOWS`, `CONTROL`, `TARGETS` and `SOCKETS` hold (two
    /// entries each); a splice beyond it fails with `SpliceError::map_full`. At most
    /// `u32::MAX / 2`.
    pub max_connections: u32,
    /// Per direction, the most bytes that may be on their way to the peer (redirected or
    /// forwarded, not yet acknowledged by the peer) before the verdict passes instead of
    /// redirecting, so that the sender's window closes.
    pub max_queued_bytes: u64,
    /// Whether a socket's sock_ops callbacks are turned on when it is spliced, where the
    /// kernel allows it (6.12 on): sockets that never splice then run no BPF program per
    /// ACK or state change. `false` turns them on for every socket at its handshake, which
    /// is what happens on older kernels either way.
    pub arm_at_splice: bool,
}

/// The one rule for the size of the `EVENTS` ring buffer: the kernel takes a power of two
/// that is a multiple of the page size. `proxy.ebpf_ring_buffer_bytes` is validated with it
/// at config load, and `Kernel::load` refuses other sizes with it.
pub fn ring_buffer_bytes_valid(bytes: u32) -> bool {
    let bytes = bytes as usize;
    bytes.is_power_of_two() && bytes.is_multiple_of(crate::process::page_size())
}

/// The kernel path's options when no config is at hand (the eBPF probe, tests): the
/// defaults of `proxy.max_queued_bytes` and `proxy.ebpf_ring_buffer_bytes`, and maps as
/// large as the eBPF object declares them.
impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            ring_buffer_bytes: smartproxy_common::DEFAULT_RING_BUFFER_BYTES,
            max_connections: smartproxy_common::DEFAULT_MAX_SOCKETS / 2,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            arm_at_splice: true,
        }
    }
}

/// The smallest `max_queued_bytes`: below it nearly every byte would take the slow path.
pub const MIN_QUEUED_BYTES: u64 = 64 * 1024;
/// The largest `max_queued_bytes`: each spliced socket's send buffer is sized above it.
pub const MAX_QUEUED_BYTES: u64 = 256 * 1024 * 1024;

impl Default for ProxyConfig {
    fn default() -> Self {
        let max_connections = 100_000;
        Self {
            data_path: DataPathMode::Auto,
            control_socket: PathBuf::from("/run/smartproxy/control.sock"),
            max_connections: max_connections as usize,
            max_connections_explicit: false,
            metrics: None,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            per_ip: PerIpConfig::default(),
            ipv6_prefix_per_ip: crate::limits::DEFAULT_IPV6_PREFIX,
            user: None,
            ebpf_ring_buffer_bytes: smartproxy_common::DEFAULT_RING_BUFFER_BYTES,
            // The maps hold every connection `max_connections` admits.
            ebpf_max_connections: max_connections,
            ebpf_pin_root: PathBuf::from(crate::datapath::kernel::DEFAULT_PIN_ROOT),
            auto: AutoConfig::default(),
            park_idle_after: Some(DEFAULT_PARK_IDLE_AFTER),
        }
    }
}

/// How bytes move once a connection is routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPathMode {
    /// eBPF when it loads, userspace otherwise (the log says why).
    Auto,
    /// eBPF or a startup error.
    Ebpf,
    /// tokio copy.
    Userspace,
}

impl fmt::Display for DataPathMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Ebpf => "ebpf",
            Self::Userspace => "userspace",
        })
    }
}

/// Connection lifecycle settings (docs/architecture.md#connection-lifecycle). Serialized
/// only to move a connection to a successor process (`upgrade`): the file's syntax is
/// parsed elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LifecycleConfig {
    /// Greater than zero.
    pub connect_timeout: Duration,
    /// Time for the routing bytes (ClientHello) to arrive, and for a TLS handshake the
    /// proxy terminates. Greater than zero.
    pub handshake_timeout: Duration,
    /// Greater than zero (even with `timeout_behavior = "ignore"`).
    pub inactivity_timeout: Duration,
    pub timeout_behavior: TimeoutBehavior,
    pub allow_half_open: bool,
    /// Greater than zero.
    pub parity_check_timeout: Duration,
    /// Greater than zero.
    pub parity_inactivity: Duration,
    /// May be zero: destroy at once after a graceful close.
    pub grace_period: Duration,
    /// Idle time before TCP keepalive probes start, on both sockets. `None` when the
    /// file says `tcp_keepalive = "0s"`: keepalive off.
    pub tcp_keepalive: Option<Duration>,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            inactivity_timeout: Duration::from_secs(60 * 60),
            timeout_behavior: TimeoutBehavior::Reset,
            allow_half_open: true,
            parity_check_timeout: Duration::from_secs(30 * 60),
            parity_inactivity: Duration::from_secs(10 * 60),
            grace_period: Duration::from_secs(5),
            tcp_keepalive: Some(Duration::from_secs(60)),
        }
    }
}

/// What an expired `inactivity_timeout` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutBehavior {
    /// Close gracefully, reason `inactivity_timeout`.
    Close,
    /// Count it and re-arm the timer; never close.
    Reset,
    /// No timer.
    Ignore,
}

impl fmt::Display for TimeoutBehavior {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Close => "close",
            Self::Reset => "reset",
            Self::Ignore => "ignore",
        })
    }
}

/// What a TLS route does with TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Route on the ClientHello, forward the TLS bytes untouched.
    Passthrough,
    /// Terminate TLS (`cert`/`key`), plain TCP to the backend.
    Terminate,
    /// Terminate TLS (`cert`/`key`), TLS again to the backend.
    Reencrypt,
}

impl TlsMode {
    /// Whether the proxy runs a TLS server for this route (and so needs `cert`/`key` and
    /// the userspace data path).
    pub fn terminates(self) -> bool {
        matches!(self, Self::Terminate | Self::Reencrypt)
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Passthrough => "passthrough",
            Self::Terminate => "terminate",
            Self::Reencrypt => "reencrypt",
        })
    }
}

/// One `[[route]]`, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteConfig {
    /// Non-empty, unique in the file.
    pub name: String,
    pub listen: SocketAddr,
    /// Empty: the default route of its listen address (or the only route there).
    pub sni: Vec<SniPattern>,
    /// `None`: plain TCP.
    pub tls: Option<TlsMode>,
    /// At least one.
    pub targets: Vec<Target>,
    /// Set (both, PEM files that load, the key matching the certificate) exactly when
    /// `tls` terminates. A relative path in the file is resolved against the directory
    /// of the config file.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// ALPN protocols offered to clients, most preferred first; empty: no ALPN. Only set
    /// when `tls` terminates.
    pub alpn: Vec<String>,
    /// How the proxy speaks TLS to the backend: set exactly when `tls = "reencrypt"`.
    pub backend_tls: Option<BackendTls>,
    /// Per-route override of `[proxy] data_path`; never `Ebpf` when `tls` terminates.
    pub data_path: Option<DataPathMode>,
    /// A PROXY protocol header to send the backend before any client byte.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// `accept_proxy_protocol` with `proxy_protocol_trusted`: the header a load balancer
    /// sends first. The same on every route of one listen address.
    pub accept_proxy_protocol: Option<Inbound>,
    /// `[lifecycle]` with this route's overrides applied; shared by the route's
    /// connections (`Lifecycle`).
    pub lifecycle: Arc<LifecycleConfig>,
    /// `max_connections`, the per-IP limits and `allow`/`deny` of this route.
    pub limits: RouteLimitsConfig,
    /// The `health` table: passive health and optional active checks of its targets.
    pub health: HealthConfig,
}

/// TLS toward the backend of a `tls = "reencrypt"` route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendTls {
    pub verify: BackendVerify,
    /// `backend_sni`: the name sent as SNI and verified. `None`: the client's SNI, else the
    /// target's host name.
    pub server_name: Option<String>,
}

/// How a reencrypt route checks its backend's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendVerify {
    /// Against the system's root certificates (no `backend_ca`).
    SystemRoots,
    /// Against the CA certificates of `backend_ca` (a readable PEM file with at least one).
    Ca(PathBuf),
    /// Not at all: `backend_verify = false`.
    Off,
}

/// A backend address as written: an IP address or a DNS name, and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// An IPv4 address, an IPv6 address (without brackets) or a lowercase DNS name.
    pub host: String,
    /// Not zero.
    pub port: u16,
}

impl Target {
    /// The socket address when `host` is an IP address; `None` for a DNS name, which the
    /// caller resolves (`Display` gives a string `tokio::net::lookup_host` accepts).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let ip: IpAddr = self.host.parse().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }

    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let expected = "expected \"host:port\" (IPv6 in brackets: \"[::1]:443\")";
        let (host, port) = if let Some(bracketed) = text.strip_prefix('[') {
            let (ip, port) = bracketed
                .split_once("]:")
                .ok_or_else(|| format!("{text:?}: {expected}"))?;
            ip.parse::<Ipv6Addr>()
                .map_err(|_| format!("{text:?}: {ip:?} is not an IPv6 address"))?;
            (ip.to_owned(), port)
        } else {
            let (host, port) = text
                .rsplit_once(':')
                .ok_or_else(|| format!("{text:?}: {expected}"))?;
            if host.contains(':') {
                return Err(format!("{text:?}: {expected}"));
            }
            if host.parse::<IpAddr>().is_err() && !is_dns_name(host) {
                return Err(format!(
                    "{text:?}: {host:?} is neither an IP address nor a DNS name"
                ));
            }
            (host.to_ascii_lowercase(), port)
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{text:?}: {port:?} is not a port (1 to 65535)"))?;
        Ok(Self { host, port })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One entry of a route's `sni` list.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SniPattern {
    /// A whole name, lowercase.
    Exact(String),
    /// `*.suffix`: the suffix, lowercase. Matches one extra leftmost label, like a TLS
    /// certificate wildcard.
    Wildcard(String),
}

impl SniPattern {
    /// Whether a ClientHello's server name selects this pattern: the one SNI matcher
    /// (routing calls it too). ASCII case-insensitive. `*.example.org` matches
    /// `a.example.org`, but neither `example.org`, `a.b.example.org` nor `.example.org`
    /// (an empty leftmost label). Strict: a trailing dot is not ignored here, since a
    /// name never carries one by the time it is matched (`sni::parse_client_hello` strips
    /// it, as RFC 6066 has SNI names without it).
    pub fn matches(&self, server_name: &str) -> bool {
        match self {
            Self::Exact(exact) => server_name.eq_ignore_ascii_case(exact),
            Self::Wildcard(suffix) => server_name.split_once('.').is_some_and(|(label, rest)| {
                !label.is_empty() && label != "*" && rest.eq_ignore_ascii_case(suffix)
            }),
        }
    }

    fn parse(text: &str) -> Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        let (pattern, name) = match lower.strip_prefix("*.") {
            Some(suffix) => (Self::Wildcard(suffix.to_owned()), suffix),
            None => (Self::Exact(lower.clone()), lower.as_str()),
        };
        if name.contains('*') {
            return Err(format!(
                "{text:?}: a wildcard may only be the whole leftmost label (\"*.example.org\")"
            ));
        }
        if name.parse::<IpAddr>().is_ok() {
            return Err(format!(
                "{text:?}: SNI carries DNS names, never IP addresses"
            ));
        }
        if !is_dns_name(name) {
            return Err(format!(
                "{text:?} is not a DNS name (letters, digits, '-', '_'; labels of 1 to 63; no trailing dot)"
            ));
        }
        Ok(pattern)
    }
}

impl fmt::Display for SniPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// A configuration that cannot be used: which file, which key, and why.
///
/// `Display` is `<file>: <key>: <why>` (`<file>: <why>` when the file itself cannot be
/// read), the message `smartproxy check` and `run` print before exiting 2.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}{}", .file.display(), key_prefix(.key), .reason)]
pub struct ConfigError {
    file: PathBuf,
    key: String,
    reason: String,
}

/// `key: `, or nothing for an error about the whole file.
fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    }
}

impl ConfigError {
    /// The file as given to [`Config::from_file`] (or the `origin` of [`Config::from_str`]).
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Dotted key path (`lifecycle.grace_period`, `route[1].targets[0]`); for a TOML
    /// syntax error `line N, column M`; empty when the file cannot be read.
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `path`, the key and the reason, for an unreadable file, bad
    /// TOML, an unknown key, a wrong type or value, or a broken cross-key rule (including
    /// `cert`/`key` files that cannot be read).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: String::new(),
            reason: format!("cannot read: {e}"),
        })?;
        let mut config = Self::from_str(&text, path)?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses and validates configuration text. `origin` names the file in error messages,
    /// and relative `cert`/`key` paths are resolved against its directory.
    ///
    /// # Errors
    ///
    /// As [`Config::from_file`], except for reading the file.
    pub fn from_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let in_file = |Invalid { key, reason }| ConfigError {
            file: origin.to_owned(),
            key,
            reason,
        };
        let raw = parse(text).map_err(in_file)?;
        let base_dir = origin.parent().unwrap_or(Path::new(""));
        validate(raw, base_dir).map_err(in_file)
    }
}

// === raw tables, as serde reads them ===

/// Declares the `[lifecycle]` keys once, and generates from that list both the
/// `[lifecycle]` table and the `[[route]]` table, which repeats every lifecycle key next
/// to its own. Serde cannot do this with `#[serde(flatten)]`, which disables
/// `deny_unknown_fields`.
macro_rules! tables_with_lifecycle_keys {
    (
        lifecycle { $($lkey:ident: $lty:ty,)* }
        route { $($(#[$rattr:meta])* $rkey:ident: $rty:ty,)* }
    ) => {
        /// `[lifecycle]`, or the lifecycle keys of one `[[route]]`: only what the file sets.
        #[derive(Clone, Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawLifecycle {
            $($lkey: Option<$lty>,)*
        }

        impl RawLifecycle {
            /// `base` with every key set here replaced.
            fn apply_to(&self, mut base: LifecycleConfig) -> LifecycleConfig {
                $(if let Some(value) = self.$lkey {
                    base.$lkey = value.into();
                })*
                base
            }
        }

        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawRoute {
            $($(#[$rattr])* $rkey: $rty,)*
            $($lkey: Option<$lty>,)*
        }

        impl RawRoute {
            fn lifecycle_overrides(&self) -> RawLifecycle {
                RawLifecycle { $($lkey: self.$lkey,)* }
            }
        }
    };
}

tables_with_lifecycle_keys! {
    lifecycle {
        connect_timeout: HumanDuration,
        handshake_timeout: HumanDuration,
        inactivity_timeout: HumanDuration,
        timeout_behavior: TimeoutBehavior,
        allow_half_open: bool,
        parity_check_timeout: HumanDuration,
        parity_inactivity: HumanDuration,
        grace_period: HumanDuration,
        tcp_keepalive: HumanDuration,
    }
    route {
        name: String,
        listen: SocketAddr,
        sni: Option<Vec<String>>,
        tls: Option<TlsMode>,
        targets: Vec<String>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        alpn: Option<Vec<String>>,
        backend_ca: Option<PathBuf>,
        backend_sni: Option<String>,
        backend_verify: Option<bool>,
        data_path: Option<DataPathMode>,
        proxy_protocol: Option<ProxyProtocol>,
        accept_proxy_protocol: Option<AcceptProxyProtocol>,
        proxy_protocol_trusted: Option<Vec<String>>,
        max_connections: Option<usize>,
        max_connections_per_ip: Option<usize>,
        connection_rate_per_ip: Option<u32>,
        allow: Option<Vec<String>>,
        deny: Option<Vec<String>>,
        health: Option<RawHealth>,
    }
}

impl RawLifecycle {
    /// The keys set here that must be greater than zero; `grace_period` may be zero and
    /// `tcp_keepalive = "0s"` turns keepalive off.
    fn check_positive(&self, table: &str) -> Result<(), Invalid> {
        let must_be_positive = [
            ("connect_timeout", self.connect_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("inactivity_timeout", self.inactivity_timeout),
            ("parity_check_timeout", self.parity_check_timeout),
            ("parity_inactivity", self.parity_inactivity),
        ];
        for (key, value) in must_be_positive {
            if value.is_some_and(|HumanDuration(d)| d.is_zero()) {
                return Err(Invalid::new(
                    format!("{table}.{key}"),
                    "must be greater than 0",
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    lifecycle: RawLifecycle,
    /// Checked non-empty by `validate`, for a clearer message than serde's.
    #[serde(default)]
    route: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    data_path: Option<DataPathMode>,
    control_socket: Option<PathBuf>,
    max_connections: Option<usize>,
    metrics: Option<SocketAddr>,
    max_queued_bytes: Option<u64>,
    max_connections_per_ip: Option<usize>,
    connection_rate_per_ip: Option<u32>,
    ipv6_prefix_per_ip: Option<u8>,
    user: Option<String>,
    ebpf_ring_buffer_bytes: Option<u32>,
    ebpf_max_connections: Option<u32>,
    ebpf_pin_root: Option<PathBuf>,
    auto_splice_rate: Option<u64>,
    auto_splice_one_way: Option<bool>,
    auto_leave_rate: Option<u64>,
    auto_window: Option<HumanDuration>,
    auto_max_moves: Option<u32>,
    park_idle_after: Option<HumanDuration>,
}

/// A duration written as a humantime string (`"500ms"`, `"5s"`, `"30m"`, `"24h"`).
///
/// A newtype over `humantime::parse_duration` rather than `humantime_serde`, so that
/// the message says "invalid duration" and why instead of serde's generic "invalid
/// value ... expected a duration".
#[derive(Clone, Copy, Debug, PartialEq)]
struct HumanDuration(Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"500ms\", \"5s\", \"30m\" or \"24h\"")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<HumanDuration, E> {
                humantime::parse_duration(text)
                    .map(HumanDuration)
                    .map_err(|e| E::custom(format!("invalid duration {text:?}: {e}")))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

impl From<HumanDuration> for Duration {
    fn from(HumanDuration(d): HumanDuration) -> Self {
        d
    }
}

/// For `tcp_keepalive` and `park_idle_after`: zero means off.
impl From<HumanDuration> for Option<Duration> {
    fn from(HumanDuration(d): HumanDuration) -> Self {
        (!d.is_zero()).then_some(d)
    }
}

/// An error before the file name is attached.
struct Invalid {
    key: String,
    reason: String,
}

impl Invalid {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// TOML text to raw tables; the error names the key path serde was in.
fn parse(text: &str) -> Result<RawConfig, Invalid> {
    let deserializer = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.inner();
        // toml's messages may span lines ("invalid table header\nexpected `.`, `]`").
        let mut message = inner.message().trim_end().replace('\n', "; ");
        if message == "invalid socket address syntax" {
            message.push_str(" (expected \"ip:port\", IPv6 as \"[::1]:443\")");
        }
        let line = inner.span().map(|span| {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            (line, column)
        });
        let at_line = |what: &str| line.map_or(String::new(), |(l, _)| format!(" ({what}{l})"));
        let field = |prefix: &str| {
            let (field, rest) = message.strip_prefix(prefix)?.split_once('`')?;
            Some((field.to_owned(), rest))
        };
        let join = |table: &str, field: &str| {
            if table == "." {
                field.to_owned()
            } else {
                format!("{table}.{field}")
            }
        };
        if let Some((name, rest)) = field("unknown field `") {
            // serde_path_to_error's path already ends with the unknown key. An empty key
            // (`"" = 1`) would vanish from it, so it is written as TOML writes it.
            let expected = rest.strip_prefix(", expected ").unwrap_or("none");
            let key = if name.is_empty() {
                let table = path.strip_suffix('.').filter(|t| !t.is_empty());
                join(table.unwrap_or("."), "\"\"")
            } else if path.ends_with(&name) {
                path.clone()
            } else {
                join(&path, &name)
            };
            Invalid::new(
                key,
                format!("unknown key (expected {expected}){}", at_line("line ")),
            )
        } else if let Some((name, _)) = field("missing field `") {
            // Reported at the table that lacks it; the span is the table's.
            Invalid::new(
                join(&path, &name),
                format!("required, but missing{}", at_line("table at line ")),
            )
        } else if path == "." {
            // No key: a TOML syntax error.
            let key = match line {
                Some((line, column)) => format!("line {line}, column {column}"),
                None => "(document)".to_owned(),
            };
            Invalid::new(key, message)
        } else {
            Invalid::new(path, format!("{message}{}", at_line("line ")))
        }
    })
}

// === validation ===

/// `[proxy] park_idle_after`: `"0s"` turns parking off; otherwise at least
/// [`MIN_PARK_IDLE_AFTER`].
fn park_idle_after(raw: HumanDuration) -> Result<Option<Duration>, Invalid> {
    let Some(after) = Option::<Duration>::from(raw) else {
        return Ok(None);
    };
    if after < MIN_PARK_IDLE_AFTER {
        return Err(Invalid::new(
            "proxy.park_idle_after",
            format!("must be \"0s\" (never park) or at least {MIN_PARK_IDLE_AFTER:?}"),
        ));
    }
    Ok(Some(after))
}

/// `[proxy] auto_*`: with the adaptive path on, a leave rate below the splice rate (no
/// flapping); a window in
/// [`AUTO_WINDOWS`], at least one move.
fn auto_config(raw: &RawProxy, defaults: AutoConfig) -> Result<AutoConfig, Invalid> {
    let auto = AutoConfig {
        splice_rate: raw.auto_splice_rate.unwrap_or(defaults.splice_rate),
        splice_one_way: raw.auto_splice_one_way.unwrap_or(defaults.splice_one_way),
        leave_rate: raw.auto_leave_rate.unwrap_or(defaults.leave_rate),
        window: raw.auto_window.map_or(defaults.window, Duration::from),
        max_moves: raw.auto_max_moves.unwrap_or(defaults.max_moves),
    };
    if auto.adaptive() && auto.leave_rate >= auto.splice_rate {
        return Err(Invalid::new(
            "proxy.auto_leave_rate",
            format!(
                "must be lower than proxy.auto_splice_rate ({}): the gap keeps a connection from moving back and forth",
                auto.splice_rate
            ),
        ));
    }
    if !AUTO_WINDOWS.contains(&auto.window) {
        return Err(Invalid::new(
            "proxy.auto_window",
            format!(
                "must be from {:?} to {:?}",
                AUTO_WINDOWS.start(),
                AUTO_WINDOWS.end()
            ),
        ));
    }
    if auto.max_moves == 0 {
        return Err(Invalid::new(
            "proxy.auto_max_moves",
            "must be greater than 0 (data_path = \"userspace\" keeps connections on the relay)",
        ));
    }
    Ok(auto)
}

/// Applies defaults and inheritance, and checks every rule that the types alone do not.
fn validate(raw: RawConfig, base_dir: &Path) -> Result<Config, Invalid> {
    let defaults = ProxyConfig::default();
    let auto = auto_config(&raw.proxy, defaults.auto)?;
    let proxy = ProxyConfig {
        data_path: raw.proxy.data_path.unwrap_or(defaults.data_path),
        control_socket: raw.proxy.control_socket.unwrap_or(defaults.control_socket),
        max_connections: raw
            .proxy
            .max_connections
            .unwrap_or(defaults.max_connections),
        max_connections_explicit: raw.proxy.max_connections.is_some(),
        metrics: raw.proxy.metrics,
        max_queued_bytes: raw
            .proxy
            .max_queued_bytes
            .unwrap_or(defaults.max_queued_bytes),
        per_ip: per_ip_limits(
            raw.proxy.max_connections_per_ip,
            raw.proxy.connection_rate_per_ip,
            "proxy",
        )?,
        ipv6_prefix_per_ip: raw
            .proxy
            .ipv6_prefix_per_ip
            .unwrap_or(defaults.ipv6_prefix_per_ip),
        user: match raw.proxy.user {
            Some(name) if name.trim().is_empty() => {
                return Err(Invalid::new("proxy.user", "must not be empty"));
            }
            Some(name) => Some(crate::privileges::lookup(&name).map_err(|_| {
                Invalid::new(
                    "proxy.user",
                    format!("no user named {name:?} on this system"),
                )
            })?),
            None => None,
        },
        ebpf_ring_buffer_bytes: raw
            .proxy
            .ebpf_ring_buffer_bytes
            .unwrap_or(defaults.ebpf_ring_buffer_bytes),
        ebpf_max_connections: ebpf_max_connections(
            raw.proxy.ebpf_max_connections,
            raw.proxy.max_connections,
            defaults.max_connections,
        )?,
        ebpf_pin_root: raw.proxy.ebpf_pin_root.unwrap_or(defaults.ebpf_pin_root),
        auto,
        park_idle_after: raw
            .proxy
            .park_idle_after
            .map_or(Ok(defaults.park_idle_after), park_idle_after)?,
    };
    if !proxy.ebpf_pin_root.is_absolute() {
        return Err(Invalid::new(
            "proxy.ebpf_pin_root",
            "must be an absolute path (a bpffs mount point, such as /sys/fs/bpf)",
        ));
    }
    if !ring_buffer_bytes_valid(proxy.ebpf_ring_buffer_bytes) {
        let page = crate::process::page_size();
        return Err(Invalid::new(
            "proxy.ebpf_ring_buffer_bytes",
            format!("must be a power of two and a multiple of the page size ({page})"),
        ));
    }
    if !(MIN_QUEUED_BYTES..=MAX_QUEUED_BYTES).contains(&proxy.max_queued_bytes) {
        return Err(Invalid::new(
            "proxy.max_queued_bytes",
            format!("must be at least {MIN_QUEUED_BYTES} (64 KiB) and at most {MAX_QUEUED_BYTES} (256 MiB)"),
        ));
    }
    if !crate::limits::IPV6_PREFIXES.contains(&proxy.ipv6_prefix_per_ip) {
        let (low, high) = crate::limits::IPV6_PREFIXES.into_inner();
        return Err(Invalid::new(
            "proxy.ipv6_prefix_per_ip",
            format!("must be a prefix length from {low} to {high}"),
        ));
    }
    if proxy.control_socket.as_os_str().is_empty() {
        return Err(Invalid::new("proxy.control_socket", "must not be empty"));
    }
    if proxy.max_connections == 0 {
        return Err(Invalid::new(
            "proxy.max_connections",
            "must be greater than 0",
        ));
    }

    raw.lifecycle.check_positive("lifecycle")?;
    let lifecycle = raw.lifecycle.apply_to(LifecycleConfig::default());

    if raw.route.is_empty() {
        return Err(Invalid::new(
            "route",
            "at least one [[route]] table is required",
        ));
    }
    let routes = raw
        .route
        .into_iter()
        .enumerate()
        .map(|(i, route)| validate_route(route, &format!("route[{i}]"), lifecycle, base_dir))
        .collect::<Result<Vec<_>, _>>()?;
    check_route_set(&routes)?;
    Ok(Config {
        proxy,
        lifecycle,
        routes,
        source: None,
    })
}

/// `proxy.ebpf_max_connections`: as set, or `max_connections` (both as written in the
/// file), within `1..=max_connections` and [`MAX_EBPF_CONNECTIONS`]. The file's values,
/// not a limit derived at start: the maps cannot be resized, so a reload compares them.
fn ebpf_max_connections(
    set: Option<u32>,
    max_connections: Option<usize>,
    default_max_connections: usize,
) -> Result<u32, Invalid> {
    let max_connections = max_connections.unwrap_or(default_max_connections);
    let bound = u32::try_from(max_connections)
        .unwrap_or(u32::MAX)
        .min(MAX_EBPF_CONNECTIONS);
    match set {
        None => Ok(bound),
        Some(n) if (1..=bound).contains(&n) => Ok(n),
        Some(_) => Err(Invalid::new(
            "proxy.ebpf_max_connections",
            format!(
                "must be between 1 and {bound} (at most proxy.max_connections, \
                 {max_connections}, and at most {MAX_EBPF_CONNECTIONS})"
            ),
        )),
    }
}

/// The rules about one route alone.
fn validate_route(
    raw: RawRoute,
    at: &str,
    lifecycle: LifecycleConfig,
    base_dir: &Path,
) -> Result<RouteConfig, Invalid> {
    let overrides = raw.lifecycle_overrides();
    overrides.check_positive(at)?;

    if raw.name.trim().is_empty() {
        return Err(Invalid::new(format!("{at}.name"), "must not be empty"));
    }
    if raw.targets.is_empty() {
        return Err(Invalid::new(
            format!("{at}.targets"),
            "at least one target is required",
        ));
    }
    let targets = raw
        .targets
        .iter()
        .enumerate()
        .map(|(j, t)| {
            Target::parse(t).map_err(|why| Invalid::new(format!("{at}.targets[{j}]"), why))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let sni = match &raw.sni {
        None => Vec::new(),
        Some(_) if raw.tls.is_none() => {
            return Err(Invalid::new(
                format!("{at}.sni"),
                "needs `tls` (passthrough, terminate or reencrypt): SNI is read from the TLS ClientHello",
            ));
        }
        Some(names) if names.is_empty() => {
            return Err(Invalid::new(
                format!("{at}.sni"),
                "is empty; leave `sni` out to make this the default route of its listen address",
            ));
        }
        Some(names) => names
            .iter()
            .enumerate()
            .map(|(j, n)| {
                SniPattern::parse(n).map_err(|why| Invalid::new(format!("{at}.sni[{j}]"), why))
            })
            .collect::<Result<Vec<_>, _>>()?,
    };

    let terminates = raw.tls.is_some_and(TlsMode::terminates);
    let tls_keys = validate_tls_keys(&raw, at, base_dir)?;

    if terminates && raw.data_path == Some(DataPathMode::Ebpf) {
        return Err(Invalid::new(
            format!("{at}.data_path"),
            "\"ebpf\" cannot carry a TLS-terminated route: the proxy must see the plaintext, so terminate/reencrypt routes always use the userspace path",
        ));
    }

    let accept_proxy_protocol =
        inbound_proxy_protocol(raw.accept_proxy_protocol, raw.proxy_protocol_trusted, at)?;
    Ok(RouteConfig {
        name: raw.name,
        listen: raw.listen,
        sni,
        tls: raw.tls,
        targets,
        cert: tls_keys.cert,
        key: tls_keys.key,
        alpn: tls_keys.alpn,
        backend_tls: tls_keys.backend_tls,
        data_path: raw.data_path,
        proxy_protocol: raw.proxy_protocol,
        accept_proxy_protocol,
        lifecycle: Arc::new(overrides.apply_to(lifecycle)),
        health: validate_health(raw.health, &format!("{at}.health"))?,
        limits: RouteLimitsConfig {
            max_connections: positive(raw.max_connections, &format!("{at}.max_connections"))?,
            per_ip: per_ip_limits(raw.max_connections_per_ip, raw.connection_rate_per_ip, at)?,
            access: AccessList {
                allow: cidrs(raw.allow, &format!("{at}.allow"))?,
                deny: cidrs(raw.deny, &format!("{at}.deny"))?,
            },
        },
    })
}

// === backend health ===

/// A route's health settings (its `health` table), defaults included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    /// Connect failures in a row that take a target down.
    pub fails: u32,
    /// The first back-off of a target taken down by failed connects.
    pub backoff: Duration,
    /// What the doubling back-off stops at.
    pub backoff_max: Duration,
    /// Active checks; `None`: passive health only.
    pub check: Option<CheckConfig>,
}

/// `check_interval` and the keys that go with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            fails: 3,
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            check: None,
        }
    }
}

impl CheckConfig {
    /// The check defaults for `check_interval = interval`: HAProxy's rise 2, fall 3.
    pub fn with_interval(interval: Duration) -> CheckConfig {
        CheckConfig {
            interval,
            timeout: Duration::from_secs(1).min(interval),
            rise: 2,
            fall: 3,
        }
    }
}

/// A route's `health` table; the defaults are [`HealthConfig::default`] and
/// [`CheckConfig::with_interval`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    fails: Option<u32>,
    backoff: Option<HumanDuration>,
    backoff_max: Option<HumanDuration>,
    check_interval: Option<HumanDuration>,
    check_timeout: Option<HumanDuration>,
    rise: Option<u32>,
    fall: Option<u32>,
}

fn validate_health(raw: Option<RawHealth>, at: &str) -> Result<HealthConfig, Invalid> {
    let raw = raw.unwrap_or_default();
    let defaults = HealthConfig::default();
    let key = |name: &str| format!("{at}.{name}");
    let positive_count = |value: Option<u32>, name: &str| match value {
        Some(0) => Err(Invalid::new(key(name), "must be greater than 0")),
        other => Ok(other),
    };
    let positive_duration = |value: Option<HumanDuration>, name: &str| match value {
        Some(HumanDuration(d)) if d.is_zero() => {
            Err(Invalid::new(key(name), "must be greater than 0"))
        }
        other => Ok(other.map(Duration::from)),
    };
    let backoff = positive_duration(raw.backoff, "backoff")?.unwrap_or(defaults.backoff);
    let backoff_max = positive_duration(raw.backoff_max, "backoff_max")?
        .unwrap_or(defaults.backoff_max.max(backoff));
    if backoff_max < backoff {
        return Err(Invalid::new(
            key("backoff_max"),
            "must not be less than `backoff`",
        ));
    }
    let check = match positive_duration(raw.check_interval, "check_interval")? {
        Some(interval) => {
            let defaults = CheckConfig::with_interval(interval);
            Some(CheckConfig {
                interval,
                timeout: positive_duration(raw.check_timeout, "check_timeout")?
                    .unwrap_or(defaults.timeout),
                rise: positive_count(raw.rise, "rise")?.unwrap_or(defaults.rise),
                fall: positive_count(raw.fall, "fall")?.unwrap_or(defaults.fall),
            })
        }
        None => {
            let set = [
                ("check_timeout", raw.check_timeout.is_some()),
                ("rise", raw.rise.is_some()),
                ("fall", raw.fall.is_some()),
            ];
            if let Some((name, _)) = set.iter().find(|(_, set)| *set) {
                return Err(Invalid::new(
                    key(name),
                    "only applies to active checks: set `check_interval` too",
                ));
            }
            None
        }
    };
    Ok(HealthConfig {
        fails: positive_count(raw.fails, "fails")?.unwrap_or(defaults.fails),
        backoff,
        backoff_max,
        check,
    })
}

/// `accept_proxy_protocol` and `proxy_protocol_trusted`: both or neither.
fn inbound_proxy_protocol(
    accept: Option<AcceptProxyProtocol>,
    trusted: Option<Vec<String>>,
    at: &str,
) -> Result<Option<Inbound>, Invalid> {
    let key = format!("{at}.proxy_protocol_trusted");
    match (accept, trusted) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(Invalid::new(
            key,
            "only used with accept_proxy_protocol, which this route does not set",
        )),
        (Some(_), None) => Err(Invalid::new(
            key,
            "required with accept_proxy_protocol: the load balancers (CIDR blocks) whose header is believed; anyone else is refused",
        )),
        (Some(_), Some(list)) if list.is_empty() => Err(Invalid::new(
            key,
            "is empty: no peer could connect; list the load balancers' addresses (CIDR blocks)",
        )),
        (Some(accept), Some(list)) => Ok(Some(Inbound {
            accept,
            trusted: cidrs(Some(list), &key)?,
        })),
    }
}

/// An optional limit, which when set must be greater than zero (leave it out for none).
fn positive<T: Default + PartialEq>(value: Option<T>, key: &str) -> Result<Option<T>, Invalid> {
    match value {
        Some(v) if v == T::default() => Err(Invalid::new(
            key,
            "must be greater than 0 (leave the key out for no limit)",
        )),
        other => Ok(other),
    }
}

fn per_ip_limits(
    max_connections: Option<usize>,
    rate: Option<u32>,
    table: &str,
) -> Result<PerIpConfig, Invalid> {
    Ok(PerIpConfig {
        max_connections: positive(max_connections, &format!("{table}.max_connections_per_ip"))?,
        rate_per_minute: positive(rate, &format!("{table}.connection_rate_per_ip"))?,
    })
}

/// `allow` / `deny`: CIDR blocks or addresses.
fn cidrs(list: Option<Vec<String>>, key: &str) -> Result<Vec<Cidr>, Invalid> {
    list.unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(j, text)| Cidr::parse(text).map_err(|why| Invalid::new(format!("{key}[{j}]"), why)))
        .collect()
}

/// The TLS keys of one route, validated.
struct TlsKeys {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    alpn: Vec<String>,
    backend_tls: Option<BackendTls>,
}

/// `cert`, `key`, `alpn` and the `backend_*` keys: each only where its `tls` mode uses it.
/// The PEM files are parsed now, and the key checked against the certificate, so that
/// `check` catches what `run` would trip on.
fn validate_tls_keys(raw: &RawRoute, at: &str, base_dir: &Path) -> Result<TlsKeys, Invalid> {
    let this_route = match raw.tls {
        Some(mode) => format!("this route has tls = \"{mode}\""),
        None => "this route is plain TCP".to_owned(),
    };
    let terminating = [
        ("cert", raw.cert.is_some()),
        ("key", raw.key.is_some()),
        ("alpn", raw.alpn.is_some()),
    ];
    let reencrypting = [
        ("backend_ca", raw.backend_ca.is_some()),
        ("backend_sni", raw.backend_sni.is_some()),
        ("backend_verify", raw.backend_verify.is_some()),
    ];
    let (terminates, reencrypts) = match raw.tls {
        Some(TlsMode::Terminate) => (true, false),
        Some(TlsMode::Reencrypt) => (true, true),
        Some(TlsMode::Passthrough) | None => (false, false),
    };
    for (keys, allowed, used_with) in [
        (
            &terminating,
            terminates,
            "tls = \"terminate\" or \"reencrypt\"",
        ),
        (&reencrypting, reencrypts, "tls = \"reencrypt\""),
    ] {
        if let Some((name, _)) = keys.iter().find(|(_, set)| *set && !allowed) {
            return Err(Invalid::new(
                format!("{at}.{name}"),
                format!("only used with {used_with}; {this_route}"),
            ));
        }
    }
    if !terminates {
        return Ok(TlsKeys {
            cert: None,
            key: None,
            alpn: Vec::new(),
            backend_tls: None,
        });
    }

    let mode = raw.tls.map_or(String::new(), |t| t.to_string());
    let required = || format!("required with tls = \"{mode}\" (`cert` and `key` both)");
    let cert = readable_file(
        raw.cert.as_deref(),
        &format!("{at}.cert"),
        base_dir,
        required,
    )?;
    let key = readable_file(raw.key.as_deref(), &format!("{at}.key"), base_dir, required)?;
    let chain = crate::tls_files::load_certificates(&cert)
        .map_err(|e| Invalid::new(format!("{at}.cert"), e.to_string()))?;
    crate::tls_files::load_certified_key(chain, &cert, &key)
        .map_err(|e| Invalid::new(format!("{at}.key"), e.to_string()))?;

    let alpn = match &raw.alpn {
        None => Vec::new(),
        Some(list) if list.is_empty() => {
            return Err(Invalid::new(
                format!("{at}.alpn"),
                "is empty; leave `alpn` out to offer no ALPN",
            ));
        }
        Some(list) => {
            for (j, protocol) in list.iter().enumerate() {
                if protocol.is_empty() || protocol.len() > 255 {
                    return Err(Invalid::new(
                        format!("{at}.alpn[{j}]"),
                        format!("{protocol:?}: an ALPN protocol name is 1 to 255 bytes"),
                    ));
                }
                if list[..j].contains(protocol) {
                    return Err(Invalid::new(
                        format!("{at}.alpn[{j}]"),
                        format!("{protocol:?} is listed twice"),
                    ));
                }
            }
            list.clone()
        }
    };

    let backend_tls = if reencrypts {
        let verify = match (&raw.backend_ca, raw.backend_verify) {
            (Some(_), Some(false)) => {
                return Err(Invalid::new(
                    format!("{at}.backend_ca"),
                    "set together with backend_verify = false; verify against it, or not at all",
                ));
            }
            (Some(ca), _) => {
                let path =
                    readable_file(Some(ca), &format!("{at}.backend_ca"), base_dir, String::new)?;
                crate::tls_files::load_roots(&path)
                    .map_err(|e| Invalid::new(format!("{at}.backend_ca"), e.to_string()))?;
                BackendVerify::Ca(path)
            }
            (None, Some(false)) => BackendVerify::Off,
            (None, Some(true) | None) => BackendVerify::SystemRoots,
        };
        let server_name = match &raw.backend_sni {
            Some(name) if name.parse::<IpAddr>().is_err() && !is_dns_name(name) => {
                return Err(Invalid::new(
                    format!("{at}.backend_sni"),
                    format!("{name:?} is neither a DNS name nor an IP address"),
                ));
            }
            Some(name) => Some(name.to_ascii_lowercase()),
            None => None,
        };
        Some(BackendTls {
            verify,
            server_name,
        })
    } else {
        None
    };
    Ok(TlsKeys {
        cert: Some(cert),
        key: Some(key),
        alpn,
        backend_tls,
    })
}

/// A file a TLS key names: required (else `required()` says why), resolved against
/// `base_dir`, and a file that opens for reading now.
fn readable_file(
    path: Option<&Path>,
    key: &str,
    base_dir: &Path,
    required: impl FnOnce() -> String,
) -> Result<PathBuf, Invalid> {
    let path = path.ok_or_else(|| Invalid::new(key, required()))?;
    let path = base_dir.join(path);
    let unreadable =
        |why: String| Invalid::new(key, format!("cannot read {}: {why}", path.display()));
    let file = std::fs::File::open(&path).map_err(|e| unreadable(e.to_string()))?;
    let metadata = file.metadata().map_err(|e| unreadable(e.to_string()))?;
    if !metadata.is_file() {
        return Err(unreadable("not a regular file".to_owned()));
    }
    Ok(path)
}

/// The PROXY header a load balancer sends comes before routing, so every route of one
/// listen address (`group`, in file order) must expect the same one from the same peers.
fn check_inbound_agrees(
    routes: &[RouteConfig],
    group: &[usize],
    listen: SocketAddr,
) -> Result<(), Invalid> {
    let first = &routes[group[0]];
    let shown = |inbound: &Option<Inbound>, field: fn(&Inbound) -> String| {
        inbound.as_ref().map_or_else(|| "unset".to_owned(), field)
    };
    for &i in &group[1..] {
        let route = &routes[i];
        let (a, b) = (&route.accept_proxy_protocol, &first.accept_proxy_protocol);
        let accept = |inbound: &Inbound| format!("\"{}\"", inbound.accept);
        let trusted = |inbound: &Inbound| {
            let list: Vec<String> = inbound.trusted.iter().map(|c| format!("\"{c}\"")).collect();
            format!("[{}]", list.join(", "))
        };
        let differs = if a.as_ref().map(|x| x.accept) != b.as_ref().map(|x| x.accept) {
            Some(("accept_proxy_protocol", shown(a, accept), shown(b, accept)))
        } else if a != b {
            Some((
                "proxy_protocol_trusted",
                shown(a, trusted),
                shown(b, trusted),
            ))
        } else {
            None
        };
        if let Some((key, here, there)) = differs {
            return Err(Invalid::new(
                format!("route[{i}].{key}"),
                format!(
                    "is {here} on route {:?} but {there} on route {:?}, which shares {listen}: the PROXY header comes before routing, so every route on one listen address must agree",
                    route.name, first.name
                ),
            ));
        }
    }
    Ok(())
}

/// The rules across routes: unique names, and how routes may share a listen address.
fn check_route_set(routes: &[RouteConfig]) -> Result<(), Invalid> {
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, route) in routes.iter().enumerate() {
        if let Some(first) = names.insert(&route.name, i) {
            return Err(Invalid::new(
                format!("route[{i}].name"),
                format!("{:?} is already the name of route[{first}]", route.name),
            ));
        }
    }

    // Routes sharing a listen address are told apart by SNI: all TLS, one default at most,
    // every name claimed once.
    let mut by_listen: HashMap<SocketAddr, Vec<usize>> = HashMap::new();
    for (i, route) in routes.iter().enumerate() {
        by_listen.entry(route.listen).or_default().push(i);
    }
    for (i, route) in routes.iter().enumerate() {
        let group = &by_listen[&route.listen];
        let others: Vec<&str> = group
            .iter()
            .filter(|&&j| j != i)
            .map(|&j| routes[j].name.as_str())
            .collect();
        if !others.is_empty() && route.tls.is_none() {
            return Err(Invalid::new(
                format!("route[{i}].listen"),
                format!(
                    "{} is shared with route {:?}; routes can share a listen address only if all of them set `tls` (they are told apart by SNI)",
                    route.listen, others[0]
                ),
            ));
        }
    }
    let mut listens: Vec<&SocketAddr> = by_listen.keys().collect();
    listens.sort();
    for listen in listens {
        let group = &by_listen[listen];
        check_inbound_agrees(routes, group, *listen)?;
        let mut default: Option<usize> = None;
        let mut claimed: HashMap<&SniPattern, usize> = HashMap::new();
        for &i in group {
            let route = &routes[i];
            if route.sni.is_empty() {
                if let Some(first) = default.replace(i) {
                    return Err(Invalid::new(
                        format!("route[{i}].sni"),
                        format!(
                            "missing, but route {:?} is already the default (no `sni`) on {listen}; one route per listen address may leave `sni` out",
                            routes[first].name
                        ),
                    ));
                }
            }
            let mut own = HashSet::new();
            for (j, pattern) in route.sni.iter().enumerate() {
                if !own.insert(pattern) {
                    return Err(Invalid::new(
                        format!("route[{i}].sni[{j}]"),
                        format!("\"{pattern}\" is listed twice"),
                    ));
                }
                if let Some(&first) = claimed.get(pattern) {
                    return Err(Invalid::new(
                        format!("route[{i}].sni[{j}]"),
                        format!(
                            "\"{pattern}\" is already claimed by route {:?} on {listen}",
                            routes[first].name
                        ),
                    ));
                }
                claimed.insert(pattern, i);
            }
        }
    }

    // Linux refuses two listening sockets on one port when one address is the wildcard of
    // the other's family (even with SO_REUSEADDR); say so now rather than at bind time.
    // Port 0 (tests: "any free port") gets a different port per listen address.
    for (i, route) in routes.iter().enumerate() {
        for (j, earlier) in routes[..i].iter().enumerate() {
            let (a, b) = (route.listen, earlier.listen);
            if a != b
                && a.port() == b.port()
                && a.port() != 0
                && a.is_ipv4() == b.is_ipv4()
                && (a.ip().is_unspecified() || b.ip().is_unspecified())
            {
                return Err(Invalid::new(
                    format!("route[{i}].listen"),
                    format!(
                        "{a} overlaps {b} of route[{j}] ({:?}): one of them is the wildcard address, so both cannot be bound; use the same listen address to share the port",
                        earlier.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Covers: defaults, `[lifecycle]` inheritance and per-route overrides, durations and
    //! `tcp_keepalive = "0s"`, SNI pattern matching and parsing, target parsing, and the
    //! key paths in error messages. The file-per-rule tests are in `tests/config_files.rs`.

    use super::*;

    const ROUTE: &str =
        "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:8080\"\ntargets = [\"127.0.0.1:9000\"]\n";

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_str(text, Path::new("test.toml"))
    }

    fn load_ok(text: &str) -> Config {
        load(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn load_err(text: &str) -> String {
        match load(text) {
            Ok(config) => panic!("expected an error, loaded {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_health_table_takes_defaults_for_what_it_leaves_out() {
        assert_eq!(load_ok(ROUTE).routes[0].health, HealthConfig::default());
        let health = load_ok(&format!(
            "{ROUTE}health = {{ backoff = \"2m\", check_interval = \"200ms\", fall = 5 }}\n"
        ))
        .routes[0]
            .health;
        assert_eq!(health.fails, HealthConfig::default().fails);
        assert_eq!(
            health.backoff_max,
            Duration::from_secs(120),
            "the cap is raised to a longer backoff"
        );
        assert_eq!(
            health.check,
            Some(CheckConfig {
                fall: 5,
                ..CheckConfig::with_interval(Duration::from_millis(200))
            })
        );
        assert_eq!(
            health.check.map(|c| c.timeout),
            Some(Duration::from_millis(200)),
            "the check timeout is at most the interval"
        );
    }

    #[test]
    fn auto_knobs_load_and_keep_their_hysteresis() {
        let auto = load_ok(&format!(
            "[proxy]\nauto_splice_rate = 1000000\nauto_splice_one_way = true\nauto_leave_rate = 1000\nauto_window = \"50ms\"\nauto_max_moves = 3\n{ROUTE}"
        ))
        .proxy
        .auto;
        assert_eq!(
            auto,
            AutoConfig {
                splice_rate: 1_000_000,
                splice_one_way: true,
                leave_rate: 1000,
                window: Duration::from_millis(50),
                max_moves: 3,
            }
        );
        for (line, key) in [
            (
                "auto_splice_rate = 1000\nauto_leave_rate = 1000",
                "proxy.auto_leave_rate",
            ),
            ("auto_window = \"1ms\"", "proxy.auto_window"),
            ("auto_window = \"1m\"", "proxy.auto_window"),
            ("auto_max_moves = 0", "proxy.auto_max_moves"),
            ("auto_splice_one_way = 1", "auto_splice_one_way"),
        ] {
            let error = load_err(&format!("[proxy]\n{line}\n{ROUTE}"));
            assert!(error.contains(key), "{line}: {error}");
        }
    }

    #[test]
    fn park_idle_after_is_a_delay_or_off() {
        let park = |line: &str| {
            load_ok(&format!("[proxy]\n{line}\n{ROUTE}"))
                .proxy
                .park_idle_after
        };
        assert_eq!(park(""), Some(DEFAULT_PARK_IDLE_AFTER));
        assert_eq!(park("park_idle_after = \"0s\""), None);
        assert_eq!(
            park("park_idle_after = \"30s\""),
            Some(Duration::from_secs(30))
        );
        let error = load_err(&format!("[proxy]\npark_idle_after = \"10ms\"\n{ROUTE}"));
        assert!(error.contains("proxy.park_idle_after"), "{error}");
    }

    #[test]
    fn absent_tables_take_the_design_example_values() {
        let config = load_ok(ROUTE);
        assert_eq!(config.proxy, ProxyConfig::default());
        assert_eq!(
            config.proxy.control_socket,
            Path::new("/run/smartproxy/control.sock")
        );
        assert_eq!(config.proxy.max_connections, 100_000);
        assert!(!config.proxy.max_connections_explicit);
        let set = load_ok(&format!("[proxy]\nmax_connections = 100000\n{ROUTE}"));
        assert_eq!(set.proxy.max_connections, 100_000);
        assert!(
            set.proxy.max_connections_explicit,
            "the default value, but set"
        );
        assert_eq!(config.lifecycle, LifecycleConfig::default());
        assert_eq!(
            config.lifecycle.inactivity_timeout,
            Duration::from_secs(3600)
        );
        assert_eq!(config.lifecycle.timeout_behavior, TimeoutBehavior::Reset);
        assert_eq!(*config.routes[0].lifecycle, LifecycleConfig::default());
    }

    #[test]
    fn ebpf_max_connections_defaults_to_max_connections_and_may_not_exceed_it() {
        assert_eq!(load_ok(ROUTE).proxy.ebpf_max_connections, 100_000);
        let config = load_ok(&format!("[proxy]\nmax_connections = 500\n{ROUTE}"));
        assert_eq!(config.proxy.ebpf_max_connections, 500);
        let config = load_ok(&format!(
            "[proxy]\nmax_connections = 500\nebpf_max_connections = 2\n{ROUTE}"
        ));
        assert_eq!(config.proxy.ebpf_max_connections, 2);
        let config = load_ok(&format!("[proxy]\nmax_connections = 5000000000\n{ROUTE}"));
        assert_eq!(config.proxy.ebpf_max_connections, MAX_EBPF_CONNECTIONS);
        for bad in ["ebpf_max_connections = 0", "ebpf_max_connections = 501"] {
            let e = load_err(&format!("[proxy]\nmax_connections = 500\n{bad}\n{ROUTE}"));
            assert!(
                e.starts_with("test.toml: proxy.ebpf_max_connections: must be between 1 and 500"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn route_inherits_lifecycle_keys_it_does_not_set() {
        let config = load_ok(&format!(
            "[lifecycle]\ninactivity_timeout = \"2h\"\ngrace_period = \"1s\"\n\n{ROUTE}inactivity_timeout = \"5m\"\ntimeout_behavior = \"close\"\n\n\
             [[route]]\nname = \"plain\"\nlisten = \"127.0.0.1:8081\"\ntargets = [\"127.0.0.1:9001\"]\n"
        ));
        assert_eq!(
            config.lifecycle.inactivity_timeout,
            Duration::from_secs(7200)
        );
        let [overriding, inheriting] = &config.routes[..] else {
            panic!("two routes")
        };
        assert_eq!(
            *overriding.lifecycle,
            LifecycleConfig {
                inactivity_timeout: Duration::from_secs(300),
                timeout_behavior: TimeoutBehavior::Close,
                grace_period: Duration::from_secs(1),
                ..LifecycleConfig::default()
            }
        );
        assert_eq!(*inheriting.lifecycle, config.lifecycle);
    }

    #[test]
    fn tcp_keepalive_zero_turns_it_off() {
        let config = load_ok(&format!("[lifecycle]\ntcp_keepalive = \"0s\"\n{ROUTE}"));
        assert_eq!(config.lifecycle.tcp_keepalive, None);
        let config = load_ok(&format!("{ROUTE}tcp_keepalive = \"2m 30s\"\n"));
        assert_eq!(
            config.routes[0].lifecycle.tcp_keepalive,
            Some(Duration::from_secs(150))
        );
    }

    #[test]
    fn grace_period_may_be_zero_but_timeouts_may_not() {
        let config = load_ok(&format!("[lifecycle]\ngrace_period = \"0s\"\n{ROUTE}"));
        assert_eq!(config.lifecycle.grace_period, Duration::ZERO);
        assert_eq!(
            load_err(&format!("{ROUTE}connect_timeout = \"0ms\"\n")),
            "test.toml: route[0].connect_timeout: must be greater than 0"
        );
    }

    #[test]
    fn ipv6_prefix_per_ip_defaults_to_64_and_is_a_prefix_length() {
        assert_eq!(load_ok(ROUTE).proxy.ipv6_prefix_per_ip, 64);
        for prefix in [1, 56, 128] {
            let config = load_ok(&format!("[proxy]\nipv6_prefix_per_ip = {prefix}\n{ROUTE}"));
            assert_eq!(config.proxy.ipv6_prefix_per_ip, prefix);
        }
        for prefix in [0, 129, 255] {
            assert_eq!(
                load_err(&format!("[proxy]\nipv6_prefix_per_ip = {prefix}\n{ROUTE}")),
                "test.toml: proxy.ipv6_prefix_per_ip: must be a prefix length from 1 to 128",
                "{prefix}"
            );
        }
        let e = load_err(&format!("[proxy]\nipv6_prefix_per_ip = 256\n{ROUTE}"));
        assert!(
            e.starts_with("test.toml: proxy.ipv6_prefix_per_ip: "),
            "{e}"
        );
    }

    /// Found by the `config` fuzz target: an empty key left the message without one.
    #[test]
    fn unknown_empty_key_is_named_quoted() {
        for (toml, key) in [
            ("\"\" = 1\n", "\"\""),
            ("[\"\"]\n", "\"\""),
            ("[proxy]\n\"\" = 1\n", "proxy.\"\""),
            ("[[route]]\n\"\" = 1\n", "route[0].\"\""),
        ] {
            let e = load_err(&format!("{toml}{ROUTE}"));
            assert!(
                e.starts_with(&format!("test.toml: {key}: unknown key (expected")),
                "{toml:?}: {e}"
            );
        }
    }

    #[test]
    fn errors_name_file_key_path_and_reason() {
        let e = load_err(&format!("[lifecycle]\ngrace_period = \"soon\"\n{ROUTE}"));
        assert!(
            e.starts_with("test.toml: lifecycle.grace_period: invalid duration \"soon\""),
            "{e}"
        );
        assert!(e.ends_with("(line 2)"), "{e}");
        let e = load_err(&format!("{ROUTE}bogus = 1\n"));
        assert!(
            e.starts_with("test.toml: route[0].bogus: unknown key (expected"),
            "{e}"
        );
        let e =
            load_err("[[route]]\nname = \"r\"\nlisten = \"localhost:80\"\ntargets = [\"a:1\"]\n");
        assert!(
            e.starts_with("test.toml: route[0].listen: invalid socket address"),
            "{e}"
        );
        let e = load_err("[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\n");
        assert_eq!(
            e,
            "test.toml: route[0].targets: required, but missing (table at line 1)"
        );
        let e = load_err(&format!(
            "{ROUTE}[[route]]\nname=\"s\"\nlisten=\"127.0.0.1:2\"\ntargets=[\"x:1\", \"y:0\"]\n"
        ));
        assert!(
            e.starts_with("test.toml: route[1].targets[1]: \"y:0\""),
            "{e}"
        );
        let e = load_err("[proxy\n");
        assert!(e.starts_with("test.toml: line 1, column"), "{e}");
        let e = Config::from_file(Path::new("/nonexistent/smartproxy.toml")).unwrap_err();
        assert_eq!(e.key(), "");
        assert!(
            e.to_string()
                .starts_with("/nonexistent/smartproxy.toml: cannot read: "),
            "{e}"
        );
    }

    #[test]
    fn sni_patterns_match_like_certificate_names() {
        let exact = SniPattern::parse("Example.COM").unwrap();
        assert_eq!(exact, SniPattern::Exact("example.com".into()));
        assert!(exact.matches("example.com"));
        assert!(exact.matches("EXAMPLE.com"));
        assert!(!exact.matches("example.com."));
        assert!(!exact.matches("a.example.com"));
        assert!(!exact.matches("example.co"));

        let wildcard = SniPattern::parse("*.Example.org").unwrap();
        assert_eq!(wildcard, SniPattern::Wildcard("example.org".into()));
        assert_eq!(wildcard.to_string(), "*.example.org");
        assert!(wildcard.matches("a.example.org"));
        assert!(wildcard.matches("WWW.EXAMPLE.ORG"));
        assert!(!wildcard.matches("example.org"));
        assert!(!wildcard.matches("a.b.example.org"));
        assert!(!wildcard.matches(".example.org"));
        assert!(!wildcard.matches("aexample.org"));
        assert!(!wildcard.matches(""));
    }

    #[test]
    fn sni_patterns_reject_misplaced_wildcards_and_ip_addresses() {
        for bad in [
            "*",
            "*.",
            "a.*.org",
            "*a.example.org",
            "**.example.org",
            "10.0.0.1",
            "a..b",
            "",
            "x.example.",
        ] {
            assert!(SniPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn targets_parse_ip_and_dns_hosts() {
        let t = Target::parse("[::1]:443").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 443));
        assert_eq!(t.to_string(), "[::1]:443");
        assert_eq!(t.socket_addr(), Some("[::1]:443".parse().unwrap()));
        let t = Target::parse("Backend.Internal:8080").unwrap();
        assert_eq!(t.to_string(), "backend.internal:8080");
        assert_eq!(t.socket_addr(), None);
        assert_eq!(
            Target::parse("10.0.0.5:443").unwrap().socket_addr(),
            Some("10.0.0.5:443".parse().unwrap())
        );
        for bad in [
            "::1:443",
            "host",
            "host:",
            "host:0",
            "host:65536",
            "[::1]443",
            "[nope]:1",
            "a b:1",
            ":80",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?}");
        }
    }
}

//! Admission limits: the proxy's connection cap, allow/deny CIDR lists, connection caps
//! per route and per client IP, and a per-IP connection rate, checked when a connection
//! is accepted and routed.
//!
//! A check that refuses a connection says which limit did ([`Refusal`]); one that admits
//! it returns an [`Admission`] guard, which the connection holds until it closes:
//! dropping it gives the slot back. The per-IP tables keep an entry only while the
//! address has a live connection or its rate bucket is not yet full again (a connection
//! within the last minute), so their memory is bounded by the live connections plus the
//! addresses seen in the last minute. An IPv6 client counts as its `ipv6_prefix_per_ip`
//! block ([`client_key`]).
//!
//! No sockets and no clock reads here: `now` comes in as an argument.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::vocab::Reason;

/// `[proxy] ipv6_prefix_per_ip` when unset: one IPv6 client (a home, a VM) is commonly
/// given a whole /64, and could otherwise take a fresh address for every connection.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;
/// The values `ipv6_prefix_per_ip` may take.
pub const IPV6_PREFIXES: RangeInclusive<u8> = 1..=128;

/// The limit that refused a connection: the `limit` label of
/// `smartproxy_connections_refused_total` and the keys of `refused` in stats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// `[proxy] max_connections`.
    MaxConnections,
    /// `[proxy] max_connections_per_ip`.
    MaxConnectionsPerIp,
    /// `[proxy] connection_rate_per_ip`.
    ConnectionRatePerIp,
    /// A route's `allow` / `deny`.
    AccessList,
    /// A route's `max_connections`.
    RouteMaxConnections,
    /// A route's `max_connections_per_ip`.
    RouteMaxConnectionsPerIp,
    /// A route's `connection_rate_per_ip`.
    RouteConnectionRatePerIp,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::MaxConnections,
        Refusal::MaxConnectionsPerIp,
        Refusal::ConnectionRatePerIp,
        Refusal::AccessList,
        Refusal::RouteMaxConnections,
        Refusal::RouteMaxConnectionsPerIp,
        Refusal::RouteConnectionRatePerIp,
    ];

    /// The label value and stats key.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerIp => "max_connections_per_ip",
            Refusal::ConnectionRatePerIp => "connection_rate_per_ip",
            Refusal::AccessList => "access_list",
            Refusal::RouteMaxConnections => "route_max_connections",
            Refusal::RouteMaxConnectionsPerIp => "route_max_connections_per_ip",
            Refusal::RouteConnectionRatePerIp => "route_connection_rate_per_ip",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The closure reason: `denied` for the access list, `max_connections` for every cap
    /// and rate.
    pub fn reason(self) -> Reason {
        match self {
            Refusal::AccessList => Reason::Denied,
            Refusal::MaxConnections
            | Refusal::MaxConnectionsPerIp
            | Refusal::ConnectionRatePerIp
            | Refusal::RouteMaxConnections
            | Refusal::RouteMaxConnectionsPerIp
            | Refusal::RouteConnectionRatePerIp => Reason::MaxConnections,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An address block, `10.0.0.0/8` or `2001:db8::/32`; a bare address is a /32 or /128.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The network address: host bits are zero (checked at parse).
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ip/prefix` or a bare `ip`. Host bits must be zero, so that a typo such as
    /// `10.0.0.1/8` is an error rather than a silently wider rule.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (text, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IP address (expected \"10.0.0.0/8\", \"2001:db8::/32\" or an address)"))?;
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0 to {bits}"))?,
        };
        let cidr = Cidr {
            network: ip,
            prefix,
        };
        if mask(ip, prefix) != ip {
            return Err(format!(
                "{text:?}: host bits are set; the network is {}/{prefix}",
                mask(ip, prefix)
            ));
        }
        Ok(cidr)
    }

    /// Whether `ip` is in this block. An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, as
    /// a dual-stack listener reports IPv4 clients) counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix) == self.network
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The key `ip` counts under in a per-IP table: an IPv4 address (IPv4-mapped included)
/// as itself, an IPv6 one as its `ipv6_prefix` block.
fn client_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match canonical(ip) {
        v4 @ IpAddr::V4(_) => v4,
        v6 @ IpAddr::V6(_) => mask(v6, ipv6_prefix),
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let kept = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & kept))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let kept = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & kept))
        }
    }
}

/// A route's `allow` and `deny` lists: deny wins; a non-empty allow list admits only
/// its blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessList {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
}

impl AccessList {
    pub fn permits(&self, ip: IpAddr) -> bool {
        !self.deny.iter().any(|c| c.contains(ip))
            && (self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip)))
    }
}

/// Per-client-IP limits of one scope (the whole proxy, or one route). `None`: no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerIpConfig {
    /// Live connections from one address.
    pub max_connections: Option<usize>,
    /// New connections from one address per minute (a token bucket of that size that
    /// refills continuously, so bursts up to the limit are allowed).
    pub rate_per_minute: Option<u32>,
}

/// A route's limits as configured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteLimitsConfig {
    /// Live connections on this route.
    pub max_connections: Option<usize>,
    pub per_ip: PerIpConfig,
    pub access: AccessList,
}

/// Live state of every limit of a running proxy.
#[derive(Debug)]
pub struct Limits {
    proxy: Arc<IpTable>,
    /// `[proxy] ipv6_prefix_per_ip`, for every per-IP table.
    ipv6_prefix: u8,
    /// By route counters slot ([`crate::stats::Stats::route_slot`]), so that a route
    /// keeps its live counts across reloads.
    routes: RwLock<Vec<Option<RouteLimits>>>,
}

#[derive(Clone, Debug)]
struct RouteLimits {
    access: AccessList,
    max_connections: Option<usize>,
    active: Arc<AtomicUsize>,
    per_ip: Arc<IpTable>,
}

impl Limits {
    /// The proxy-wide limits, and `routes` in slots 0, 1, ...
    pub fn new<'a>(
        proxy: PerIpConfig,
        ipv6_prefix: u8,
        routes: impl IntoIterator<Item = &'a RouteLimitsConfig>,
    ) -> Limits {
        let limits = Limits {
            proxy: Arc::new(IpTable::new(proxy, Scope::Proxy, ipv6_prefix)),
            ipv6_prefix,
            routes: RwLock::default(),
        };
        for (slot, config) in routes.into_iter().enumerate() {
            limits.configure_route(slot, config);
        }
        limits
    }

    /// Applies a route's configured limits (at start, and on reload). Its live counts
    /// carry over: connections admitted before still count against the new cap, and its
    /// per-IP table is kept unless the per-IP limits changed.
    pub fn configure_route(&self, slot: usize, config: &RouteLimitsConfig) {
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        if routes.len() <= slot {
            routes.resize(slot + 1, None);
        }
        let previous = routes[slot].take();
        routes[slot] = Some(RouteLimits {
            access: config.access.clone(),
            max_connections: config.max_connections,
            active: previous
                .as_ref()
                .map_or_else(Arc::default, |p| Arc::clone(&p.active)),
            per_ip: match previous {
                Some(p) if p.per_ip.config == config.per_ip => p.per_ip,
                _ => Arc::new(IpTable::new(config.per_ip, Scope::Route, self.ipv6_prefix)),
            },
        });
    }

    /// The limits at accept: the proxy's connection cap (`live` connections, this one
    /// included, against `max_connections`), then its per-IP limits.
    pub fn admit_client(
        &self,
        live: usize,
        max_connections: usize,
        ip: IpAddr,
        now: Instant,
    ) -> Result<Admission, Refusal> {
        if live > max_connections {
            return Err(Refusal::MaxConnections);
        }
        IpTable::admit(&self.proxy, ip, now)
    }

    /// The route's access list and limits, once the connection is routed.
    pub fn admit_route(
        &self,
        route: usize,
        ip: IpAddr,
        now: Instant,
    ) -> Result<Admissions, Refusal> {
        let mut admissions = Admissions::default();
        let Some(limits) = self.route_limits(route) else {
            return Ok(admissions);
        };
        if !limits.access.permits(ip) {
            return Err(Refusal::AccessList);
        }
        if let Some(max) = limits.max_connections {
            let taken = limits
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                });
            if taken.is_err() {
                return Err(Refusal::RouteMaxConnections);
            }
            admissions.push(Admission(Slot::Route(Arc::clone(&limits.active))));
        }
        admissions.push(IpTable::admit(&limits.per_ip, ip, now)?);
        Ok(admissions)
    }

    /// A copy of the route's limits (their counters shared), so that no lock is held
    /// while a per-IP table's is taken.
    fn route_limits(&self, route: usize) -> Option<RouteLimits> {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(route)
            .cloned()
            .flatten()
    }

    /// The slots of a connection another process admitted (a predecessor, or a successor
    /// whose upgrade failed and gave it back): unchecked, it counts against the caps of
    /// its route and client here as it did there, and takes no rate token.
    pub fn hold(&self, route: usize, ip: IpAddr, now: Instant) -> Admissions {
        let mut admissions = Admissions::default();
        admissions.push(IpTable::hold(&self.proxy, ip, now));
        if let Some(limits) = self.route_limits(route) {
            if limits.max_connections.is_some() {
                limits.active.fetch_add(1, Ordering::AcqRel);
                admissions.push(Admission(Slot::Route(Arc::clone(&limits.active))));
            }
            admissions.push(IpTable::hold(&limits.per_ip, ip, now));
        }
        admissions
    }

    /// Addresses tracked by the proxy-wide table and every route's.
    #[cfg(test)]
    fn tracked_ips(&self) -> usize {
        let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
        self.proxy.len()
            + routes
                .iter()
                .flatten()
                .map(|r| r.per_ip.len())
                .sum::<usize>()
    }
}

/// The slots a connection holds; dropping it gives them back.
#[derive(Debug, Default)]
pub struct Admissions(Vec<Admission>);

impl Admissions {
    pub fn push(&mut self, admission: Admission) {
        if !matches!(admission.0, Slot::None) {
            self.0.push(admission);
        }
    }

    pub fn extend(&mut self, other: Admissions) {
        self.0.extend(other.0);
    }
}

/// One slot a connection holds in a limit.
#[derive(Debug)]
pub struct Admission(Slot);

#[derive(Debug)]
enum Slot {
    /// No limit applied.
    None,
    Route(Arc<AtomicUsize>),
    Ip(Arc<IpTable>, IpAddr),
}

impl Drop for Admission {
    fn drop(&mut self) {
        match &self.0 {
            Slot::None => {}
            Slot::Route(active) => {
                active.fetch_sub(1, Ordering::AcqRel);
            }
            Slot::Ip(table, ip) => table.release(*ip),
        }
    }
}

/// Per-address live counts and rate buckets of one scope.
#[derive(Debug)]
struct IpTable {
    config: PerIpConfig,
    scope: Scope,
    ipv6_prefix: u8,
    state: Mutex<IpState>,
}

/// Whose per-IP limits a table keeps: it names the [`Refusal`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    Proxy,
    Route,
}

#[derive(Debug, Default)]
struct IpState {
    entries: HashMap<IpAddr, IpEntry>,
    /// Entries left after the last sweep: the next sweep comes when the table doubled.
    swept_len: usize,
}

#[derive(Debug)]
struct IpEntry {
    live: usize,
    /// Rate bucket: tokens left as of `refreshed`.
    tokens: f64,
    refreshed: Instant,
}

/// The rate window: `rate_per_minute` tokens refill over it.
const RATE_WINDOW: Duration = Duration::from_secs(60);

impl IpTable {
    fn new(config: PerIpConfig, scope: Scope, ipv6_prefix: u8) -> IpTable {
        IpTable {
            config,
            scope,
            ipv6_prefix,
            state: Mutex::default(),
        }
    }

    fn admit(table: &Arc<IpTable>, ip: IpAddr, now: Instant) -> Result<Admission, Refusal> {
        let config = table.config;
        if config.max_connections.is_none() && config.rate_per_minute.is_none() {
            return Ok(Admission(Slot::None));
        }
        let (cap, rate) = match table.scope {
            Scope::Proxy => (Refusal::MaxConnectionsPerIp, Refusal::ConnectionRatePerIp),
            Scope::Route => (
                Refusal::RouteMaxConnectionsPerIp,
                Refusal::RouteConnectionRatePerIp,
            ),
        };
        let ip = client_key(ip, table.ipv6_prefix);
        let capacity = table.bucket_capacity();
        let mut state = table.lock();
        let entry = state.entry(ip, capacity, now);
        if config.max_connections.is_some_and(|max| entry.live >= max) {
            return Err(cap);
        }
        if config.rate_per_minute.is_some() {
            entry.refill(capacity, now);
            if entry.tokens < 1.0 {
                return Err(rate);
            }
            entry.tokens -= 1.0;
        }
        entry.live += 1;
        Ok(Admission(Slot::Ip(Arc::clone(table), ip)))
    }

    /// A live connection from `ip`, unchecked ([`Limits::hold`]); only a cap needs it.
    fn hold(table: &Arc<IpTable>, ip: IpAddr, now: Instant) -> Admission {
        let config = table.config;
        if config.max_connections.is_none() {
            return Admission(Slot::None);
        }
        let ip = client_key(ip, table.ipv6_prefix);
        let capacity = table.bucket_capacity();
        table.lock().entry(ip, capacity, now).live += 1;
        Admission(Slot::Ip(Arc::clone(table), ip))
    }

    /// Tokens a full rate bucket holds: the rate per minute, 0 without one.
    fn bucket_capacity(&self) -> f64 {
        f64::from(self.config.rate_per_minute.unwrap_or(0))
    }

    fn release(&self, ip: IpAddr) {
        let mut state = self.lock();
        let capacity = self.bucket_capacity();
        if let Some(entry) = state.entries.get_mut(&ip) {
            entry.live = entry.live.saturating_sub(1);
            // Without a rate limit nothing is remembered of an address with no connection.
            if entry.live == 0 && capacity == 0.0 {
                state.entries.remove(&ip);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IpState> {
        // A panic while holding the lock leaves counts that are still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl IpState {
    /// The entry of `ip`, made with a full bucket if new; the table is swept first when it
    /// doubled since the last sweep.
    fn entry(&mut self, ip: IpAddr, capacity: f64, now: Instant) -> &mut IpEntry {
        if self.entries.len() >= 2 * self.swept_len.max(64) {
            self.sweep(capacity, now);
        }
        self.entries.entry(ip).or_insert(IpEntry {
            live: 0,
            tokens: capacity,
            refreshed: now,
        })
    }

    /// Drops the entries of addresses with no live connection and a full bucket.
    fn sweep(&mut self, capacity: f64, now: Instant) {
        self.entries.retain(|_, entry| {
            entry.refill(capacity, now);
            entry.live > 0 || entry.tokens < capacity
        });
        self.swept_len = self.entries.len();
    }
}

impl IpEntry {
    fn refill(&mut self, capacity: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refreshed);
        let refill = capacity * elapsed.as_secs_f64() / RATE_WINDOW.as_secs_f64();
        self.tokens = (self.tokens + refill).min(capacity);
        self.refreshed = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_ip(max_connections: Option<usize>, rate_per_minute: Option<u32>) -> PerIpConfig {
        PerIpConfig {
            max_connections,
            rate_per_minute,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an IP address")
    }

    #[test]
    fn cidr_parses_and_matches() {
        let block = Cidr::parse("10.1.0.0/16").expect("valid");
        assert!(block.contains(ip("10.1.2.3")));
        assert!(!block.contains(ip("10.2.0.1")));
        assert!(block.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped");
        assert!(!block.contains(ip("::1")));
        let host = Cidr::parse("127.0.0.2").expect("valid");
        assert_eq!(host.to_string(), "127.0.0.2/32");
        assert!(host.contains(ip("127.0.0.2")) && !host.contains(ip("127.0.0.3")));
        let all = Cidr::parse("0.0.0.0/0").expect("valid");
        assert!(all.contains(ip("192.0.2.1")) && !all.contains(ip("2001:db8::1")));
        let v6 = Cidr::parse("2001:db8::/32").expect("valid");
        assert!(v6.contains(ip("2001:db8:1::1")) && !v6.contains(ip("2001:db9::1")));
        assert!(Cidr::parse("::/0").expect("valid").contains(ip("::1")));
    }

    #[test]
    fn cidr_rejects_bad_text() {
        for (text, why) in [
            ("10.0.0.0/33", "prefix length must be 0 to 32"),
            ("10.0.0.1/8", "host bits are set; the network is 10.0.0.0/8"),
            ("example.com/8", "is not an IP address"),
            ("10.0.0.0/", "prefix length"),
            ("::/129", "0 to 128"),
        ] {
            let error = Cidr::parse(text).expect_err(text);
            assert!(error.contains(why), "{text}: {error}");
        }
    }

    #[test]
    fn deny_wins_and_allow_means_only() {
        let cidr = |t| Cidr::parse(t).expect("valid");
        let open = AccessList::default();
        assert!(open.permits(ip("192.0.2.1")));
        let list = AccessList {
            allow: vec![cidr("127.0.0.0/8")],
            deny: vec![cidr("127.0.0.3")],
        };
        assert!(list.permits(ip("127.0.0.2")));
        assert!(!list.permits(ip("127.0.0.3")), "deny wins");
        assert!(!list.permits(ip("192.0.2.1")), "not in allow");
        let deny_only = AccessList {
            allow: vec![],
            deny: vec![cidr("127.0.0.3")],
        };
        assert!(deny_only.permits(ip("192.0.2.1")));
    }

    fn route(config: RouteLimitsConfig) -> Limits {
        Limits::new(PerIpConfig::default(), DEFAULT_IPV6_PREFIX, [&config])
    }

    #[test]
    fn a_reconfigured_route_keeps_its_live_count() {
        let now = Instant::now();
        let limits = route(RouteLimitsConfig {
            max_connections: Some(2),
            ..RouteLimitsConfig::default()
        });
        let _a = limits.admit_route(0, ip("127.0.0.2"), now).expect("first");
        let _b = limits.admit_route(0, ip("127.0.0.2"), now).expect("second");
        limits.configure_route(
            0,
            &RouteLimitsConfig {
                max_connections: Some(3),
                ..RouteLimitsConfig::default()
            },
        );
        let _c = limits
            .admit_route(0, ip("127.0.0.2"), now)
            .expect("third, under the new cap");
        assert_eq!(
            limits.admit_route(0, ip("127.0.0.2"), now).err(),
            Some(Refusal::RouteMaxConnections),
            "the two admitted before the reload still count"
        );
    }

    #[test]
    fn a_held_connection_counts_against_every_cap_unchecked_and_takes_no_token() {
        let limits = Limits::new(
            per_ip(Some(1), Some(1)),
            DEFAULT_IPV6_PREFIX,
            [&RouteLimitsConfig {
                max_connections: Some(1),
                per_ip: per_ip(Some(1), None),
                ..RouteLimitsConfig::default()
            }],
        );
        let now = Instant::now();
        let client = ip("127.0.0.2");
        let held = limits.hold(0, client, now);
        let over = limits.hold(0, client, now);
        assert_eq!(
            limits.admit_client(1, 10, client, now).err(),
            Some(Refusal::MaxConnectionsPerIp)
        );
        assert_eq!(
            limits.admit_route(0, ip("127.0.0.3"), now).err(),
            Some(Refusal::RouteMaxConnections)
        );
        drop(over);
        assert_eq!(
            limits.admit_client(1, 10, client, now).err(),
            Some(Refusal::MaxConnectionsPerIp),
            "one is still held"
        );
        drop(held);
        let admitted = limits
            .admit_client(1, 10, client, now)
            .expect("the token the held ones did not take");
        let route = limits
            .admit_route(0, client, now)
            .expect("the route's slot is free again");
        drop((admitted, route));
        assert_eq!(
            limits.tracked_ips(),
            1,
            "the rate bucket alone is remembered"
        );
    }

    #[test]
    fn route_cap_refuses_the_next_and_frees_on_drop() {
        let limits = route(RouteLimitsConfig {
            max_connections: Some(2),
            ..RouteLimitsConfig::default()
        });
        let now = Instant::now();
        let a = limits.admit_route(0, ip("127.0.0.2"), now).expect("first");
        let _b = limits.admit_route(0, ip("127.0.0.3"), now).expect("second");
        assert_eq!(
            limits.admit_route(0, ip("127.0.0.4"), now).err(),
            Some(Refusal::RouteMaxConnections)
        );
        drop(a);
        limits
            .admit_route(0, ip("127.0.0.4"), now)
            .expect("a slot is free");
    }

    #[test]
    fn per_ip_cap_counts_each_address() {
        let limits = Limits::new(per_ip(Some(1), None), DEFAULT_IPV6_PREFIX, []);
        let now = Instant::now();
        let a = limits
            .admit_client(1, usize::MAX, ip("127.0.0.2"), now)
            .expect("first");
        let _b = limits
            .admit_client(1, usize::MAX, ip("127.0.0.3"), now)
            .expect("other address");
        assert_eq!(
            limits
                .admit_client(1, usize::MAX, ip("127.0.0.2"), now)
                .err(),
            Some(Refusal::MaxConnectionsPerIp)
        );
        drop(a);
        assert_eq!(limits.tracked_ips(), 1, "nothing kept for an idle address");
        limits
            .admit_client(1, usize::MAX, ip("127.0.0.2"), now)
            .expect("freed on close");
    }

    #[test]
    fn rate_refills_over_a_minute_and_idle_entries_are_evicted() {
        let limits = Limits::new(per_ip(None, Some(3)), DEFAULT_IPV6_PREFIX, []);
        let start = Instant::now();
        for _ in 0..3 {
            drop(
                limits
                    .admit_client(1, usize::MAX, ip("127.0.0.2"), start)
                    .expect("burst"),
            );
        }
        assert_eq!(
            limits
                .admit_client(1, usize::MAX, ip("127.0.0.2"), start)
                .err(),
            Some(Refusal::ConnectionRatePerIp)
        );
        // One token per 20 s.
        let later = start + Duration::from_secs(21);
        drop(
            limits
                .admit_client(1, usize::MAX, ip("127.0.0.2"), later)
                .expect("refilled"),
        );
        assert!(limits
            .admit_client(1, usize::MAX, ip("127.0.0.2"), later)
            .is_err());

        // Many addresses, then a minute of quiet: the next sweep forgets them.
        for i in 0..200u32 {
            let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            drop(
                limits
                    .admit_client(1, usize::MAX, addr, start)
                    .expect("fresh address"),
            );
        }
        assert!(limits.tracked_ips() > 128);
        let quiet = start + Duration::from_secs(120);
        for i in 0..200u32 {
            let addr = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i));
            drop(
                limits
                    .admit_client(1, usize::MAX, addr, quiet)
                    .expect("fresh address"),
            );
        }
        assert!(
            limits.tracked_ips() <= 200 + 1,
            "old entries evicted, {} left",
            limits.tracked_ips()
        );
    }

    #[test]
    fn live_connections_are_never_evicted() {
        let limits = Limits::new(per_ip(Some(1), Some(1000)), DEFAULT_IPV6_PREFIX, []);
        let start = Instant::now();
        let held = limits
            .admit_client(1, usize::MAX, ip("127.0.0.2"), start)
            .expect("first");
        let later = start + Duration::from_secs(3600);
        for i in 0..300u32 {
            let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            drop(
                limits
                    .admit_client(1, usize::MAX, addr, later)
                    .expect("fresh address"),
            );
        }
        assert!(limits
            .admit_client(1, usize::MAX, ip("127.0.0.2"), later)
            .is_err());
        drop(held);
        assert!(limits
            .admit_client(1, usize::MAX, ip("127.0.0.2"), later)
            .is_ok());
    }

    #[test]
    fn denied_before_counted() {
        let limits = route(RouteLimitsConfig {
            max_connections: Some(1),
            access: AccessList {
                allow: vec![],
                deny: vec![Cidr::parse("127.0.0.3").expect("valid")],
            },
            ..RouteLimitsConfig::default()
        });
        let now = Instant::now();
        assert_eq!(
            limits.admit_route(0, ip("127.0.0.3"), now).err(),
            Some(Refusal::AccessList)
        );
        limits
            .admit_route(0, ip("127.0.0.2"), now)
            .expect("the denied one took no slot");
    }

    #[test]
    fn the_proxy_cap_comes_first_and_each_refusal_names_its_limit() {
        let limits = Limits::new(
            per_ip(Some(1), Some(1)),
            DEFAULT_IPV6_PREFIX,
            [&RouteLimitsConfig {
                per_ip: per_ip(Some(1), Some(2)),
                ..RouteLimitsConfig::default()
            }],
        );
        let now = Instant::now();
        assert_eq!(
            limits.admit_client(3, 2, ip("127.0.0.2"), now).err(),
            Some(Refusal::MaxConnections),
            "over the proxy's cap, before any per-IP table"
        );
        let held = limits
            .admit_client(2, 2, ip("127.0.0.2"), now)
            .expect("at the cap, a first connection");
        assert_eq!(
            limits.admit_client(2, 2, ip("127.0.0.2"), now).err(),
            Some(Refusal::MaxConnectionsPerIp)
        );
        drop(held);
        assert_eq!(
            limits.admit_client(2, 2, ip("127.0.0.2"), now).err(),
            Some(Refusal::ConnectionRatePerIp),
            "the one token went to the first"
        );
        let route = limits.admit_route(0, ip("127.0.0.3"), now).expect("first");
        assert_eq!(
            limits.admit_route(0, ip("127.0.0.3"), now).err(),
            Some(Refusal::RouteMaxConnectionsPerIp)
        );
        drop(route);
        drop(
            limits
                .admit_route(0, ip("127.0.0.3"), now)
                .expect("second token"),
        );
        assert_eq!(
            limits.admit_route(0, ip("127.0.0.3"), now).err(),
            Some(Refusal::RouteConnectionRatePerIp)
        );
    }

    #[test]
    fn refusals_keep_the_two_closure_reasons() {
        for refusal in Refusal::ALL {
            let expected = match refusal {
                Refusal::AccessList => Reason::Denied,
                _ => Reason::MaxConnections,
            };
            assert_eq!(refusal.reason(), expected, "{refusal}");
            assert_eq!(Refusal::ALL[refusal.index()], refusal);
        }
    }

    // IPv6 is tested here only, not end to end: loopback has ::1 alone (::1/128), and a
    // second address in its /64 would have to be added to the host's interface.
    #[test]
    fn an_ipv6_client_counts_as_its_prefix() {
        let per_ip = per_ip(Some(1), None);
        let now = Instant::now();
        let limits = Limits::new(per_ip, DEFAULT_IPV6_PREFIX, []);
        let held = limits
            .admit_client(1, usize::MAX, ip("2001:db8:1:2::1"), now)
            .expect("first");
        assert_eq!(
            limits
                .admit_client(1, usize::MAX, ip("2001:db8:1:2:ffff::9"), now)
                .err(),
            Some(Refusal::MaxConnectionsPerIp),
            "another address of the same /64"
        );
        drop(
            limits
                .admit_client(1, usize::MAX, ip("2001:db8:1:3::1"), now)
                .expect("the next /64"),
        );
        drop(held);
        assert_eq!(limits.tracked_ips(), 0, "released under its /64 key");
        drop(
            limits
                .admit_client(1, usize::MAX, ip("2001:db8:1:2::2"), now)
                .expect("freed on close"),
        );

        // /128 counts each address; IPv4 (mapped or not) never takes the prefix.
        let exact = Limits::new(per_ip, 128, []);
        let _a = exact
            .admit_client(1, usize::MAX, ip("2001:db8::1"), now)
            .expect("first");
        let _b = exact
            .admit_client(1, usize::MAX, ip("2001:db8::2"), now)
            .expect("another address");
        let wide = Limits::new(per_ip, 1, []);
        let _c = wide
            .admit_client(1, usize::MAX, ip("10.0.0.1"), now)
            .expect("IPv4");
        let _d = wide
            .admit_client(1, usize::MAX, ip("::ffff:10.0.0.2"), now)
            .expect("another IPv4 address, mapped");
        assert_eq!(
            wide.admit_client(1, usize::MAX, ip("::ffff:10.0.0.1"), now)
                .err(),
            Some(Refusal::MaxConnectionsPerIp),
            "a mapped address is its IPv4 address"
        );

        // Route tables take the proxy's prefix too.
        let routed = Limits::new(
            PerIpConfig::default(),
            DEFAULT_IPV6_PREFIX,
            [&RouteLimitsConfig {
                per_ip,
                ..RouteLimitsConfig::default()
            }],
        );
        let _e = routed
            .admit_route(0, ip("2001:db8::1"), now)
            .expect("first");
        assert_eq!(
            routed.admit_route(0, ip("2001:db8::2"), now).err(),
            Some(Refusal::RouteMaxConnectionsPerIp)
        );
    }
}

//! Routing: which route a connection on a listen address belongs to (by port, or by TLS
//! SNI on a shared address), and which target of that route to connect to next.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::{Config, RouteConfig, SniPattern};
use crate::proxy_protocol::Inbound;

/// The routes that share one listen address.
#[derive(Debug)]
pub enum ListenerRoutes {
    /// A plain TCP (or TLS without SNI routing) route owns the address alone.
    Single(usize),
    /// Routes told apart by the ClientHello's server name.
    Sni {
        /// `(pattern, route)`, the exact names first: they win over wildcards.
        patterns: Vec<(SniPattern, usize)>,
        default: Option<usize>,
    },
}

impl ListenerRoutes {
    /// Whether a ClientHello must be read before the route is known.
    pub fn needs_client_hello(&self) -> bool {
        matches!(self, ListenerRoutes::Sni { .. })
    }

    /// The route for a ClientHello that names `server_name` (or none). Exact names win
    /// over wildcards; no match falls back to the default route.
    pub fn select(&self, server_name: Option<&str>) -> Option<usize> {
        match self {
            ListenerRoutes::Single(route) => Some(*route),
            ListenerRoutes::Sni { patterns, default } => match server_name {
                Some(name) => patterns
                    .iter()
                    .find(|(pattern, _)| pattern.matches(name))
                    .map(|(_, route)| *route)
                    .or(*default),
                None => *default,
            },
        }
    }
}

/// Every listen address with its routes, built once from a validated config.
#[derive(Debug)]
pub struct RouteTable {
    pub listeners: BTreeMap<SocketAddr, ListenerRoutes>,
    /// The listen addresses that require a PROXY header from a load balancer (every
    /// route there agrees: validated at load).
    pub inbound: BTreeMap<SocketAddr, Inbound>,
    cursors: Vec<AtomicUsize>,
}

impl RouteTable {
    pub fn new(config: &Config) -> RouteTable {
        let mut by_addr: BTreeMap<SocketAddr, Vec<usize>> = BTreeMap::new();
        for (index, route) in config.routes.iter().enumerate() {
            by_addr.entry(route.listen).or_default().push(index);
        }
        let listeners = by_addr
            .into_iter()
            .map(|(addr, routes)| (addr, Self::listener_routes(&config.routes, &routes)))
            .collect();
        let inbound = config
            .routes
            .iter()
            .filter_map(|route| Some((route.listen, route.accept_proxy_protocol.clone()?)))
            .collect();
        RouteTable {
            listeners,
            inbound,
            cursors: config.routes.iter().map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    fn listener_routes(all: &[RouteConfig], indexes: &[usize]) -> ListenerRoutes {
        if let [only] = indexes {
            if all[*only].sni.is_empty() {
                return ListenerRoutes::Single(*only);
            }
        }
        let mut patterns: Vec<(SniPattern, usize)> = Vec::new();
        let mut default = None;
        for &index in indexes {
            if all[index].sni.is_empty() {
                default = Some(index);
            }
            patterns.extend(
                all[index]
                    .sni
                    .iter()
                    .map(|pattern| (pattern.clone(), index)),
            );
        }
        // Stable: among exact names (and among wildcards) the configured order stays.
        patterns.sort_by_key(|(pattern, _)| matches!(pattern, SniPattern::Wildcard(_)));
        ListenerRoutes::Sni { patterns, default }
    }

    /// The indexes of the route's `len` targets in the order to try them: round-robin
    /// start, then the rest.
    pub fn targets_in_order(
        &self,
        route: usize,
        len: usize,
    ) -> impl Iterator<Item = usize> + Clone {
        let start = self.cursors[route].fetch_add(1, Ordering::Relaxed);
        (0..len).map(move |offset| (start + offset) % len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sni(
        exact: &[(&str, usize)],
        wildcards: &[(&str, usize)],
        default: Option<usize>,
    ) -> ListenerRoutes {
        let patterns = exact
            .iter()
            .map(|(n, r)| (SniPattern::Exact(n.to_string()), *r))
            .chain(
                wildcards
                    .iter()
                    .map(|(n, r)| (SniPattern::Wildcard(n.to_string()), *r)),
            )
            .collect();
        ListenerRoutes::Sni { patterns, default }
    }

    #[test]
    fn exact_name_wins_over_wildcard() {
        let routes = sni(&[("a.example.org", 1)], &[("example.org", 2)], None);
        assert_eq!(routes.select(Some("a.example.org")), Some(1));
        assert_eq!(routes.select(Some("B.Example.ORG")), Some(2));
    }

    #[test]
    fn wildcard_covers_one_label_only() {
        let routes = sni(&[], &[("example.org", 2)], Some(0));
        assert_eq!(routes.select(Some("example.org")), Some(0));
        assert_eq!(routes.select(Some("a.b.example.org")), Some(0));
        // The stricter rule of the one matcher: no empty leftmost label.
        assert_eq!(routes.select(Some(".example.org")), Some(0));
    }

    #[test]
    fn no_match_and_no_default_is_no_route() {
        let routes = sni(&[("a.test", 1)], &[], None);
        assert_eq!(routes.select(Some("b.test")), None);
        assert_eq!(routes.select(None), None);
    }

    #[test]
    fn hello_without_sni_takes_the_default() {
        let routes = sni(&[("a.test", 1)], &[], Some(3));
        assert_eq!(routes.select(None), Some(3));
    }
}

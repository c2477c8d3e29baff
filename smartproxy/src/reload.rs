//! A reload: re-reads the configuration file, refuses what cannot change live, binds
//! the new listen addresses, and swaps the configuration new connections are accepted
//! under. Says what changed, by route name.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::warn;

use crate::backend::{listener_keepalive, start_checks};
use crate::config::{Config, ConfigError};
use crate::generation::{check_reloadable, Generation, NotReloadable};
use crate::limits::Limits;
use crate::listener::{accept_again, bind_std, open_listener};
use crate::shared::{Shared, Stop};
use crate::tls::TlsRoutes;
use crate::tls_files::TlsError;

/// Why a reload was refused; the running configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the configuration was not read from a file, so there is nothing to re-read")]
    NoSource,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{file}: {source}")]
    NotReloadable {
        file: PathBuf,
        #[source]
        source: NotReloadable,
    },
    #[error("{file}: {source}")]
    Tls {
        file: PathBuf,
        #[source]
        source: TlsError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the proxy is shutting down")]
    ShuttingDown,
}

/// What a reload changed, by route name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl std::fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |names: &[String]| {
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        };
        write!(
            f,
            "routes added: {}; removed: {}; changed: {}",
            list(&self.added),
            list(&self.removed),
            list(&self.changed)
        )
    }
}

impl Shared {
    /// Re-reads the configuration file and applies it to new connections. On any error
    /// the running configuration stays in force, untouched.
    pub(crate) async fn reload(self: &Arc<Self>) -> Result<ReloadSummary, ReloadError> {
        let _one_at_a_time = self.reloading.lock().await;
        // A listener it opened would close at once, and a restart-only key could not
        // apply either: nothing would change but the book.
        if *self.stop.borrow() >= Stop::Drain {
            return Err(ReloadError::ShuttingDown);
        }
        let running = self.generation();
        let file = running.config.source.clone().ok_or(ReloadError::NoSource)?;
        let next = Config::from_file(&file)?;
        check_reloadable(&running.config, &next, self.kernel.is_some()).map_err(|source| {
            ReloadError::NotReloadable {
                file: file.clone(),
                source,
            }
        })?;
        let summary = summarize(&running.config, &next);
        let max_connections_changed = (
            next.proxy.max_connections,
            next.proxy.max_connections_explicit,
        ) != (
            running.config.proxy.max_connections,
            running.config.proxy.max_connections_explicit,
        );
        // Certificates are read again: a reload is how new ones take effect.
        let tls = TlsRoutes::load(&next).map_err(|source| ReloadError::Tls {
            file: file.clone(),
            source,
        })?;
        let mut listeners = self.lock_listeners();
        let (kept, added): (BTreeSet<SocketAddr>, BTreeSet<SocketAddr>) = next
            .routes
            .iter()
            .map(|route| route.listen)
            .partition(|addr| listeners.contains_key(addr));
        // Bind every new address before anything changes: one that fails refuses the
        // whole reload.
        let mut bound = Vec::with_capacity(added.len());
        for addr in added {
            bound.push((
                addr,
                bind_std(addr, listener_keepalive(&next, addr))
                    .map_err(|source| ReloadError::Bind { addr, source })?,
            ));
        }
        // Only now, when nothing can fail any more: new route names get counters here.
        let next = Arc::new(Generation::new(next, tls, &self.stats, &self.health));
        configure_limits(&self.limits, &next);
        start_checks(self, &next);
        // Accept loops whose address is gone stop when they see this generation.
        self.generation.send_replace(next);
        for (addr, listener) in bound {
            // Through the one place a listener opens, so that an upgrade hands it over
            // too.
            if let Err(e) = open_listener(self, &mut listeners, addr, listener) {
                warn!(listen = %addr, error = %e, "new listener unusable");
            }
        }
        for addr in kept {
            if let Err(e) = accept_again(self, &mut listeners, addr) {
                warn!(listen = %addr, error = %e, "cannot accept again on every runtime");
            }
        }
        // It applies live: a new value the descriptor limit falls short of is said, as
        // at start.
        if max_connections_changed {
            let next = self.generation();
            crate::fdlimit::assess(
                &next.config.proxy,
                crate::fdlimit::reserved(&next.config),
                self.fd_limit,
            )
            .log();
        }
        Ok(summary)
    }
}

/// Applies the route limits of `generation`, by the routes' counters slots.
pub(crate) fn configure_limits(limits: &Limits, generation: &Generation) {
    for (index, route) in generation.config.routes.iter().enumerate() {
        limits.configure_route(generation.slot(index), &route.limits);
    }
}

/// Route names added, removed and changed from `running` to `next`.
fn summarize(running: &Config, next: &Config) -> ReloadSummary {
    let find = |config: &Config, name: &str| config.routes.iter().position(|r| r.name == name);
    let mut summary = ReloadSummary::default();
    for route in &next.routes {
        match find(running, &route.name) {
            None => summary.added.push(route.name.clone()),
            Some(index) if running.routes[index] != *route => {
                summary.changed.push(route.name.clone())
            }
            Some(_) => {}
        }
    }
    for route in &running.routes {
        if find(next, &route.name).is_none() {
            summary.removed.push(route.name.clone());
        }
    }
    summary
}

//! smartproxy: an L4 proxy for long-lived TCP and TLS connections.
//!
//! The control plane (this crate) accepts, routes and keeps the book; the bytes move
//! either through the kernel (`datapath::kernel`) or through a tokio copy; one relay
//! (`datapath::relay`) drives both and feeds the same `lifecycle` state machine.

pub mod backend;
pub mod config;
pub mod conn_error;
pub mod connection;
pub mod control;
pub mod datapath;
pub mod fdlimit;
pub mod generation;
pub mod health;
pub mod histogram;
pub mod lifecycle;
pub mod limits;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod nudge;
pub mod park;
pub mod privileges;
pub mod process;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod resolve;
pub mod route;
pub mod routing;
pub mod shared;
pub mod sni;
pub mod stats;
pub mod table;
pub mod throttle;
pub mod tls;
pub mod tls_files;
pub mod upgrade;
pub mod view;
pub mod vocab;
pub(crate) mod workers;

pub use proxy::{Prepared, Proxy, StartError};
pub use reload::{ReloadError, ReloadSummary};
pub use shared::Closed;

/// This build's version, as `smartproxy_build_info` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// An error and its sources, on one line: `outer: cause: root cause`.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

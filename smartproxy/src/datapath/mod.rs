//! Data paths: how the bytes of a routed connection move. On the userspace path the
//! [`Relay`] (`relay`) copies them with tokio; on the kernel path (`kernel`) the eBPF
//! verdict redirects them through the sockhash and the same relay only forwards what the
//! kernel passes up. Both report the same lifecycle events. On `data_path = "auto"`
//! (`adaptive`) a connection moves between the two as its traffic changes.

pub mod adaptive;
pub mod clock;
pub mod kernel;
pub mod meter;
pub mod peer;
pub mod relay;

pub use meter::Meter;
pub use peer::Peer;
pub use relay::{Relay, Report};

/// Whether the kernel data path can load here; `Err` says why not. Loads the programs
/// and releases them again.
pub fn probe_ebpf() -> Result<(), String> {
    kernel::Kernel::load(crate::config::LoadOptions::default())
        .map(drop)
        .map_err(|e| crate::error_chain(&e))
}

//! What the end-to-end tests (`tests/`, an in-process proxy) and the binary's tests
//! (`smartproxy/tests/`, a `smartproxy run` child) share: one bound for every wait, one
//! rule for skipping where eBPF cannot load, the `[proxy]` lines of each data path, one
//! payload generator, one family of mock backends.

mod addr;
mod backend;
mod data_path;
mod payload;
mod skip;
mod wait;

pub use addr::{free_port, refused_addrs};
pub use backend::{
    background_backend, echo, echo_backend, tagged_backend, try_echo, Backend, GREETING,
};
pub use data_path::{data_path_lines, AUTO_SPLICE_AT_FIRST_READ};
pub use payload::{pattern, sha256};
pub use skip::ebpf_or_skip;
pub use wait::{wait_for, wait_until, within, POLL, WAIT};

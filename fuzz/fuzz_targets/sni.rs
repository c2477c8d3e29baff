//! The ClientHello reader on arbitrary bytes, whole and as the proxy feeds it: besides
//! never panicking, its first verdict does not depend on the TCP segmentation
//! (`segmented.rs`).
//!
//! Seeds: `fuzz/corpus/sni/` (ClientHellos written by rustls, some split into many records).

#![no_main]

mod segmented;

use libfuzzer_sys::fuzz_target;
use smartproxy::sni::{parse_client_hello, Peek};

fuzz_target!(|data: &[u8]| {
    segmented::check(data, &Ok(Peek::Incomplete), parse_client_hello);
});

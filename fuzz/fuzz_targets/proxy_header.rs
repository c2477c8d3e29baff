//! The reader of the PROXY protocol header a load balancer sends (`accept_proxy_protocol`)
//! on arbitrary bytes: it never panics; a complete header is no longer than the input and
//! than `MAX_HEADER`; its first verdict does not depend on the TCP segmentation
//! (`segmented.rs`); and an address accepting one version only gives the verdict of one
//! accepting any, or refuses the other version.
//!
//! Seeds: `fuzz/corpus/proxy_header/` (v1 and v2 headers, some followed by client bytes).

#![no_main]

mod segmented;

use libfuzzer_sys::fuzz_target;
use smartproxy::proxy_protocol::{read_header, Accept, HeaderError, Peeked, MAX_HEADER};

fuzz_target!(|data: &[u8]| {
    let any = read_header(data, Accept::Any);
    if let Ok(Peeked::Complete(received)) = &any {
        assert!(
            received.len <= data.len() && received.len <= MAX_HEADER,
            "a {}-byte header in {} bytes",
            received.len,
            data.len()
        );
    }
    for accept in [Accept::V1, Accept::V2] {
        let one = read_header(data, accept);
        assert!(
            one == any || matches!(one, Err(HeaderError::Version { .. })),
            "accept {accept}: {one:?}, but accept any: {any:?}"
        );
    }
    segmented::check(data, &Ok(Peeked::Incomplete), |bytes| {
        read_header(bytes, Accept::Any)
    });
});

//! A stream through a parked splice wakes nothing in the proxy: while the verdict
//! redirects, the parking lot watches the sockets for a FIN or an error only, since the
//! verdict's data-ready callback wakes a socket's readers after every skb it redirected
//! (`smartproxy/src/park/epoll.rs`). A test binary of its own: the count of the lot's
//! wake-ups (`smartproxy::park::test_hooks`) is process-wide.

use smartproxy::config::DataPathMode;
use smartproxy::park::test_hooks;
use smartproxy_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_through_a_parked_splice_wakes_nothing() {
    if !ebpf_loads("a stream through a parked splice") {
        return;
    }
    init_tracing();
    let backend = Backend::greeted(echo).await;
    let front = Frontend::Plain(DataPathMode::Ebpf);
    let (proxy, client) = Spliced::start(&front, PARK_SOON, backend).await;
    proxy.wait_parked(1).await;
    let woken_before = test_hooks::ready_wakes();

    // 4 MiB each way: under `max_queued_bytes` (16 MiB), so the verdict redirects every
    // skb and passes none up.
    let mut client = echo_stream(client.into_tcp(), &pattern(4 << 20, 3)).await;
    assert_eq!(
        test_hooks::ready_wakes() - woken_before,
        0,
        "the parking lot woke while the kernel moved a parked splice's bytes"
    );
    assert_eq!(proxy.stats().connections.parked, 1, "taken up meanwhile");

    proxy.client_closes(&mut client).await;
}

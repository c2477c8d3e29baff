//! eBPF only: the kernel maps sized by `proxy.ebpf_max_connections`. A connection beyond
//! them still works, on the userspace copy with every byte intact; it is booked on the
//! userspace path and counted in `ebpf.map_full` (and `ebpf.splice_failures`). The ones
//! within them are spliced, and a slot freed by a close is used again.

use smartproxy::config::DataPathMode;
use smartproxy::datapath::kernel::MapEntries;
use smartproxy::vocab::DataPathKind;
use smartproxy::vocab::Reason;
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connects and moves one tick both ways: the proxy has tried to splice it by then.
async fn round_trip(proxy: &TestProxy, index: usize) -> TcpStream {
    let mut client = connect(proxy.addr("small")).await;
    client.write_all(&tick(index)).await.expect("client writes");
    read_tick(&mut client, index).await;
    client
}

/// The data path each live connection is booked on, oldest first.
fn data_paths(proxy: &TestProxy) -> Vec<Option<DataPathKind>> {
    proxy
        .proxy
        .connection_rows()
        .iter()
        .map(|row| row.data_path)
        .collect()
}

/// `n` per map: two sockets for each of `n / 2` spliced connections.
fn entries(n: u64) -> Option<MapEntries> {
    Some(MapEntries {
        sockets: n,
        targets: n,
        flows: n,
        control: n,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_beyond_the_maps_uses_userspace_and_is_counted() {
    init_tracing();
    if !ebpf_loads("this test (the maps are part of the eBPF data path)") {
        return;
    }
    let backend = Backend::spawn(echo).await;
    let config = format!(
        "ebpf_max_connections = 2\n\n{}",
        plain_route("small", backend.addr, "")
    );
    let mut proxy = TestProxy::start(DataPathMode::Ebpf, &config).await;
    assert_eq!(proxy.stats().ebpf.max_connections, 2);

    let first = round_trip(&proxy, 0).await;
    let second = round_trip(&proxy, 1).await;
    let ebpf = Some(DataPathKind::Ebpf);
    assert_eq!(data_paths(&proxy), [ebpf, ebpf], "within the maps: spliced");
    assert_eq!(proxy.proxy.map_entries(), entries(4));
    assert_eq!(proxy.stats().ebpf.map_full, 0);

    let mut third = round_trip(&proxy, 2).await;
    let userspace = Some(DataPathKind::Userspace);
    assert_eq!(
        data_paths(&proxy),
        [ebpf, ebpf, userspace],
        "beyond the maps: booked on the userspace path"
    );
    let stats = proxy.stats();
    assert_eq!(stats.ebpf.map_full, 1, "{:?}", stats.ebpf);
    assert_eq!(stats.ebpf.splice_failures, 1, "{:?}", stats.ebpf);
    assert_eq!(
        proxy.proxy.map_entries(),
        entries(4),
        "the refused splice left nothing behind"
    );

    // Every byte of a transfer through the userspace copy comes back intact.
    let sent = pattern(4 << 20, 3);
    let (mut read, mut write) = third.split();
    let (written, echoed) = tokio::join!(write_chunked(&mut write, &sent), async {
        let mut echoed = vec![0u8; sent.len()];
        within("the echo of 4 MiB", read.read_exact(&mut echoed))
            .await
            .map(|_| echoed)
    });
    written.expect("client writes 4 MiB");
    assert!(
        echoed.expect("client reads the echo") == sent,
        "the echo differs"
    );

    // A closed spliced connection frees its entries for the next one.
    close_normally(&mut proxy, first).await;
    let fourth = round_trip(&proxy, 3).await;
    assert_eq!(
        data_paths(&proxy),
        [ebpf, userspace, ebpf],
        "a freed slot is used again"
    );
    assert_eq!(proxy.stats().ebpf.map_full, 1);

    for stream in [second, third, fourth] {
        close_normally(&mut proxy, stream).await;
    }
    assert_eq!(proxy.stats().closed(Reason::Normal), 4);
    proxy.wait_idle().await;
    backend.join().await;
    proxy.stop().await;
}

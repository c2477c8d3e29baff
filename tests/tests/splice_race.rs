//! A backend that answers and closes at once, while the proxy splices: its FIN lands
//! between the two `SOCKETS` inserts (a pause there, in test builds, makes that happen on
//! every run). The kernel then refuses the backend socket, with the client socket already
//! in `SOCKETS`. The connection must still deliver every byte and end normally: booked on
//! the userspace path, the verdict passing every byte to the relay, never a reset.
//!
//! On auto the splice comes at the relay's first read (the client's `early `), still
//! before the backend answers: the same race in the middle of a connection.
//!
//! Its own test binary: the pause is process-wide.

use std::time::Duration;

use smartproxy::datapath::kernel::test_hooks;
use smartproxy::vocab::DataPathKind;
use smartproxy::vocab::Reason;
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PAUSE: Duration = Duration::from_millis(300);
/// Well inside `PAUSE`, after the proxy connected and began to splice: the client's
/// request first, then the backend's answer and FIN.
const CLIENT_DELAY: Duration = Duration::from_millis(30);
const BACKEND_DELAY: Duration = Duration::from_millis(100);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fin_between_the_sockets_inserts_keeps_every_byte_and_ends_normally() {
    test_hooks::set_pause_between_sockets_inserts(PAUSE);
    for_each_data_path(|mode| async move {
        let answer = pattern(3000, 7);
        // On a thread of its own: the pause blocks a worker of this test's runtime, and on
        // auto, where the splice comes in the middle of the runtime's work, a backend on
        // this runtime was seen held back until the pause ended, too late for the race.
        let (report, mut request) = tokio::sync::mpsc::unbounded_channel();
        let backend = background_backend({
            let answer = answer.clone();
            move |mut stream| {
                let (answer, report) = (answer.clone(), report.clone());
                async move {
                    tokio::time::sleep(BACKEND_DELAY).await;
                    stream.write_all(&answer).await.expect("backend answers");
                    stream.shutdown().await.expect("backend FIN");
                    // The client's bytes sent during the splice, and after the backend's FIN.
                    let mut request = Vec::new();
                    let read = stream.read_to_end(&mut request).await.map(|_| request);
                    let _ = report.send(read.map_err(|e| e.to_string()));
                }
            }
        });
        let mut proxy = TestProxy::start(mode, &plain_route("race", backend, "")).await;
        let mut client = connect(proxy.addr("race")).await;
        // Inside the pause: the client socket is in SOCKETS, the backend's not yet.
        tokio::time::sleep(CLIENT_DELAY).await;
        client.write_all(b"early ").await.expect("client writes");
        let mut received = Vec::new();
        within(
            "the answer and the backend's FIN",
            client.read_to_end(&mut received),
        )
        .await
        .expect("the client reads the answer, then EOF (no reset)");
        assert_eq!(received, answer, "the answer arrives whole");

        // Half-open now: the connection is still listed, on the path that moves its bytes.
        let rows = proxy.proxy.connection_rows();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].data_path, Some(DataPathKind::Userspace), "{rows:?}");
        if splices(mode) {
            let stats = proxy.stats();
            assert_eq!(
                stats.ebpf.splice_failures, 1,
                "the pause made the backend's FIN land between the inserts: {:?}",
                stats.ebpf
            );
            assert_eq!(stats.connections.userspace, 1, "{:?}", stats.connections);
            assert_eq!(
                stats.ebpf.sockhash_entries, 1,
                "the client socket stays in SOCKETS until the connection closes"
            );
            assert_eq!(
                (stats.ebpf.moves_to_kernel, stats.ebpf.moves_to_relay),
                (0, 0),
                "moves: a failed splice is none"
            );
        }

        client.write_all(b"late").await.expect("client writes");
        client.shutdown().await.expect("client FIN");
        proxy.expect_closed(Reason::Normal).await;
        let request = within("the backend's report", request.recv())
            .await
            .expect("the backend reports")
            .expect("backend reads");
        assert_eq!(request, b"early late", "client->backend");
        let stats = proxy.stats();
        assert_eq!(
            stats.closed.get("connect_failed"),
            Some(&0),
            "{:?}",
            stats.closed
        );
        assert_eq!(stats.ebpf.sockhash_entries, 0, "{:?}", stats.ebpf);
        proxy.stop().await;
    })
    .await;
}

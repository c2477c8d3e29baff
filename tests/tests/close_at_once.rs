//! A backend that answers and closes at once (HTTP/1.0, a short status reply, a polite
//! refusal), on each data path: 2,000 connections, 32 at a time, 64 bytes each way, the
//! backend's FIN right behind its answer. Every client gets the whole answer, then EOF,
//! never a reset; every connection closes `normal`, none `connect_failed`. Two backends:
//! - one that answers the client's request;
//! - one that speaks first: its answer and FIN leave as soon as it accepts, while the
//!   proxy may still be splicing the pair.
//!
//! On the kernel path a FIN that arrives during the splice makes the kernel refuse to
//! insert that socket; a splice that fails half-way must still end the connection
//! normally. The speaking-first backend makes the kernel refuse the backend's socket in
//! about 40 % of its connections; the half-way failure (client bytes redirected before
//! the refusal) stays rare, about one connection in 10,000.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use smartproxy::vocab::{Direction, Reason};
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECTIONS: usize = 2_000;
const CONCURRENCY: usize = 32;
const MESSAGE: usize = 64;

/// The backend's answer to `request`: the request's bytes, reversed.
fn answer(request: &[u8]) -> Vec<u8> {
    request.iter().rev().copied().collect()
}

/// What the speaking-first backend sends.
const BANNER: &[u8; MESSAGE] = &[b'b'; MESSAGE];

/// One connection; `Err` says what the client got instead of `expected` and EOF.
async fn ask(addr: SocketAddr, request: &[u8], expected: &[u8]) -> Result<(), String> {
    let mut client = connect(addr).await;
    client
        .write_all(request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    match within("the answer and EOF", client.read_to_end(&mut got)).await {
        Ok(_) if got == expected => Ok(()),
        Ok(_) => Err(format!("{} bytes, not the answer, then EOF", got.len())),
        Err(e) => Err(format!("{e} after {} bytes", got.len())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_answers_and_closes_at_once_never_gets_the_client_reset() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(|mut stream| async move {
            let mut request = [0u8; MESSAGE];
            stream
                .read_exact(&mut request)
                .await
                .expect("backend reads");
            stream
                .write_all(&answer(&request))
                .await
                .expect("backend answers");
            // Dropped here: the FIN goes right behind the answer.
        })
        .await;
        churn(mode, backend, |seed| {
            let request = pattern(MESSAGE, seed);
            let expected = answer(&request);
            (request, expected)
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_speaks_first_and_closes_at_once_never_gets_the_client_reset() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(|mut stream| async move {
            stream.write_all(BANNER).await.expect("backend answers");
            stream.shutdown().await.expect("backend FIN");
            // The client's bytes are read, not left unread: closing on them would reset.
            let mut request = Vec::new();
            stream
                .read_to_end(&mut request)
                .await
                .expect("backend reads to the client's FIN");
            assert_eq!(request.len(), MESSAGE, "bytes at the backend");
        })
        .await;
        churn(mode, backend, |seed| {
            (pattern(MESSAGE, seed), BANNER.to_vec())
        })
        .await;
    })
    .await;
}

/// Runs the connections against `backend`: `exchange` gives each one's request and the
/// answer its client must get.
async fn churn(
    mode: smartproxy::config::DataPathMode,
    backend: Backend,
    exchange: fn(u64) -> (Vec<u8>, Vec<u8>),
) {
    {
        let proxy = TestProxy::start(mode, &plain_route("once", backend.addr, "")).await;
        let addr = proxy.addr("once");
        let failures = Arc::new(Mutex::new(Vec::new()));
        let workers: Vec<_> = (0..CONCURRENCY)
            .map(|worker| {
                let failures = Arc::clone(&failures);
                tokio::spawn(async move {
                    for seed in (worker..CONNECTIONS).step_by(CONCURRENCY) {
                        let (request, expected) = exchange(seed as u64);
                        if let Err(what) = ask(addr, &request, &expected).await {
                            let mut failures = failures.lock().expect("failure list");
                            failures.push(format!("connection {seed}: {what}"));
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            within("a worker ends", worker).await.expect("worker");
        }
        proxy.wait_idle().await;
        let stats = proxy.stats();
        eprintln!(
            "{mode}: {} of {CONNECTIONS} splices failed",
            stats.ebpf.splice_failures
        );
        let failures = std::mem::take(&mut *failures.lock().expect("failure list"));
        assert!(
            failures.is_empty(),
            "{} of {CONNECTIONS} clients did not get the answer and EOF:\n{}",
            failures.len(),
            failures.join("\n")
        );
        assert_eq!(
            stats.closed(Reason::ConnectFailed),
            0,
            "connections closed connect_failed"
        );
        assert_eq!(
            stats.closed(Reason::Normal),
            CONNECTIONS as u64,
            "connections closed normal: {:?}",
            stats.closed
        );
        // The kernel took part: the answers it moved.
        proxy.assert_kernel_moved([0, 0], Direction::BackendToClient);
        backend.join().await;
        proxy.stop().await;
    }
}

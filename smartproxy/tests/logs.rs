//! `smartproxy run --log-format json`: every line of output is a JSON object, and one
//! connection that closes logs one info line with its id, route, client, backend, bytes
//! each way, duration, data path and reason, and for a connection whose setup failed,
//! the cause. Without the flag the log is text.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Instant;

use serde_json::Value;

mod support;
use support::*;

/// The JSON lines of the log so far; panics on a line that is not JSON.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect()
}

/// The one `closed` line of the log, once it is there.
fn closed_line(proxy: &ProxyProcess) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines = json_lines(&proxy.log());
        let closed: Vec<Value> = lines
            .into_iter()
            .filter(|l| l.get("message") == Some(&Value::from("closed")))
            .collect();
        if !closed.is_empty() {
            assert_eq!(closed.len(), 1, "one closed line: {closed:#?}");
            break closed.into_iter().next().expect("one line");
        }
        assert!(Instant::now() < deadline, "no closed line after {WAIT:?}");
        std::thread::sleep(POLL);
    }
}

#[test]
fn json_log_has_one_closed_line_with_every_field() {
    let backend = echo_backend();
    let mut proxy = ProxyProcess::start_configured("logged", backend, "", USERSPACE, |command| {
        command.args(["--log-format", "json"]);
    });
    let mut client = TcpStream::connect(proxy.listen).expect("connect through the proxy");
    client.set_read_timeout(Some(WAIT)).expect("read timeout");
    let client_addr = client.local_addr().expect("client address").to_string();
    client.write_all(b"hello").expect("send");
    let mut echoed = [0u8; 5];
    client.read_exact(&mut echoed).expect("the echo");
    client.shutdown(Shutdown::Write).expect("FIN");
    client
        .read_to_end(&mut Vec::new())
        .expect("the backend's FIN");

    let closed = closed_line(&proxy);
    assert_eq!(
        closed.get("level"),
        Some(&Value::from("INFO")),
        "{closed:#}"
    );
    assert!(closed.get("id").is_some_and(Value::is_u64), "{closed:#}");
    assert_eq!(
        closed.get("route"),
        Some(&Value::from("logged")),
        "{closed:#}"
    );
    assert_eq!(
        closed.get("client"),
        Some(&Value::from(client_addr)),
        "{closed:#}"
    );
    assert_eq!(
        closed.get("backend"),
        Some(&Value::from(backend.to_string())),
        "{closed:#}"
    );
    assert_eq!(
        closed.get("client_to_backend"),
        Some(&Value::from(5)),
        "{closed:#}"
    );
    assert_eq!(
        closed.get("backend_to_client"),
        Some(&Value::from(5)),
        "{closed:#}"
    );
    assert!(
        closed.get("duration_ms").is_some_and(Value::is_u64),
        "{closed:#}"
    );
    assert_eq!(
        closed.get("data_path"),
        Some(&Value::from("userspace")),
        "{closed:#}"
    );
    assert_eq!(
        closed.get("reason"),
        Some(&Value::from("normal")),
        "{closed:#}"
    );
    assert_eq!(
        closed.get("cause"),
        None,
        "no cause for a normal close: {closed:#}"
    );

    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.wait_exit(WAIT).code(), Some(0));
    json_lines(&proxy.log());
}

#[test]
fn closed_line_says_why_the_backend_connect_failed() {
    // An address nothing listens on: the connect is refused.
    let backend = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port");
    let mut proxy = ProxyProcess::start_configured("refused", backend, "", USERSPACE, |command| {
        command.args(["--log-format", "json"]);
    });
    let client = TcpStream::connect(proxy.listen).expect("connect through the proxy");
    let closed = closed_line(&proxy);
    drop(client);
    assert_eq!(
        closed.get("reason"),
        Some(&Value::from("connect_failed")),
        "{closed:#}"
    );
    let cause = closed.get("cause").and_then(Value::as_str).unwrap_or("");
    assert!(
        cause.starts_with("backend connect: Connection refused"),
        "{closed:#}"
    );
    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.wait_exit(WAIT).code(), Some(0));
}

#[test]
fn default_log_is_human_readable_text() {
    let backend = echo_backend();
    let mut proxy = ProxyProcess::start("plain-log", backend, "");
    let client = TcpStream::connect(proxy.listen).expect("connect through the proxy");
    drop(client);
    let deadline = Instant::now() + WAIT;
    let line = loop {
        if let Some(line) = proxy.log().lines().find(|l| l.contains("closed")) {
            break line.to_owned();
        }
        assert!(Instant::now() < deadline, "no closed line after {WAIT:?}");
        std::thread::sleep(POLL);
    };
    assert!(
        serde_json::from_str::<Value>(&line).is_err(),
        "not JSON: {line}"
    );
    assert!(
        line.contains("INFO") && line.contains("route=plain-log"),
        "{line}"
    );
    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.wait_exit(WAIT).code(), Some(0));
}

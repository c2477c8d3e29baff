//! Reload: a new configuration applies to new connections; connections already open keep
//! running under the configuration they started with; a bad configuration changes
//! nothing. Each case holds a live connection across the reload, on both data paths.

use smartproxy::config::DataPathMode;
use smartproxy::ReloadError;
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A backend that says which it is (one byte) on every connection, then echoes.
async fn tagged_backend(tag: u8) -> Backend {
    Backend::spawn_with(tag, |mut stream, tag| async move {
        stream.write_all(&[tag]).await.expect("send the tag");
        echo(stream).await;
    })
    .await
}

/// A route on its own loopback address (port 0), so that routes never share a listener.
fn route_on(name: &str, ip: &str, target: std::net::SocketAddr) -> String {
    format!("[[route]]\nname = \"{name}\"\nlisten = \"{ip}:0\"\ntargets = [\"{target}\"]\n")
}

/// Connects and returns the stream and the tag of the backend it reached.
async fn connect_tagged(addr: std::net::SocketAddr) -> (TcpStream, u8) {
    let mut stream = connect(addr).await;
    let mut tag = [0u8];
    within("the backend's tag", stream.read_exact(&mut tag))
        .await
        .expect("read the backend's tag");
    (stream, tag[0])
}

/// Checks that `stream` still carries bytes both ways (echoed), with a distinct message.
async fn round_trip(stream: &mut TcpStream, seed: u64) {
    let message = pattern(64 * 1024, seed);
    stream.write_all(&message).await.expect("send");
    let mut echoed = vec![0u8; message.len()];
    within("the echo", stream.read_exact(&mut echoed))
        .await
        .expect("read the echo");
    assert!(echoed == message, "echo differs from what was sent");
}

#[tokio::test]
async fn a_changed_route_applies_to_new_connections_only() {
    for_each_data_path(|mode| async move {
        let (a, b) = (tagged_backend(b'A').await, tagged_backend(b'B').await);
        let mut proxy = TestProxy::start(mode, &plain_route("web", a.addr, "")).await;
        let addr = proxy.addr("web");
        let (mut old, tag) = connect_tagged(addr).await;
        assert_eq!(tag, b'A');

        proxy.rewrite_config(&plain_route("web", b.addr, ""));
        let summary = proxy.proxy.reload().await.expect("the reload is accepted");
        assert_eq!(summary.changed, ["web"]);
        assert!(summary.added.is_empty() && summary.removed.is_empty());

        assert_eq!(proxy.addr("web"), addr, "the listener is kept");
        let (new, tag) = connect_tagged(addr).await;
        assert_eq!(tag, b'B', "a new connection follows the new targets");
        round_trip(&mut old, 1).await;
        close_normally(&mut proxy, old).await;
        close_normally(&mut proxy, new).await;
        proxy.wait_idle().await;
        let stats = proxy.stats();
        let web = stats.routes.iter().find(|r| r.name == "web");
        assert_eq!(
            web.map(|r| r.total),
            Some(2),
            "one route, counted across the reload"
        );
        proxy.stop().await;
        a.join().await;
        b.join().await;
    })
    .await;
}

#[tokio::test]
async fn an_added_route_gets_its_listener_and_a_removed_one_stops_accepting() {
    for_each_data_path(|mode| async move {
        let (a, b) = (tagged_backend(b'A').await, tagged_backend(b'B').await);
        let mut proxy = TestProxy::start(
            mode,
            &(route_on("web", "127.0.0.1", a.addr) + &route_on("old", "127.0.0.2", a.addr)),
        )
        .await;
        let old_addr = proxy.addr("old");
        let (mut on_old, _) = connect_tagged(old_addr).await;

        proxy.rewrite_config(
            &(route_on("web", "127.0.0.1", a.addr) + &route_on("new", "127.0.0.3", b.addr)),
        );
        let summary = proxy.proxy.reload().await.expect("the reload is accepted");
        assert_eq!(summary.added, ["new"]);
        assert_eq!(summary.removed, ["old"]);
        assert!(summary.changed.is_empty());

        let (new, tag) = connect_tagged(proxy.addr("new")).await;
        assert_eq!(tag, b'B');
        // The removed route's listener closes; its connection runs on.
        wait_refused(old_addr).await;
        assert!(proxy.proxy.route_addr("old").is_none());
        round_trip(&mut on_old, 2).await;
        close_normally(&mut proxy, on_old).await;
        close_normally(&mut proxy, new).await;
        proxy.wait_idle().await;
        let stats = proxy.stats();
        let old = stats.routes.iter().find(|r| r.name == "old");
        assert_eq!(
            old.map(|r| (r.total, r.bytes_client_to_backend)),
            Some((1, 64 * 1024)),
            "the removed route keeps its counts"
        );
        proxy.stop().await;
        a.join().await;
        b.join().await;
    })
    .await;
}

#[tokio::test]
async fn a_removed_address_can_come_back() {
    let a = tagged_backend(b'A').await;
    let mut proxy = TestProxy::start(
        DataPathMode::Userspace,
        &(route_on("web", "127.0.0.1", a.addr) + &route_on("extra", "127.0.0.4", a.addr)),
    )
    .await;
    proxy.rewrite_config(&route_on("web", "127.0.0.1", a.addr));
    proxy.proxy.reload().await.expect("removing a route");
    proxy.rewrite_config(
        &(route_on("web", "127.0.0.1", a.addr) + &route_on("extra", "127.0.0.4", a.addr)),
    );
    // Right after the removal: whether or not the old listener closed yet, the route
    // serves again.
    proxy.proxy.reload().await.expect("adding it back");
    let (stream, tag) = connect_tagged(proxy.addr("extra")).await;
    assert_eq!(tag, b'A');
    close_normally(&mut proxy, stream).await;
    proxy.stop().await;
    a.join().await;
}

#[tokio::test]
async fn a_bad_configuration_is_refused_and_the_running_one_stays() {
    for_each_data_path(|mode| async move {
        let (a, b) = (tagged_backend(b'A').await, tagged_backend(b'B').await);
        let mut proxy = TestProxy::start(mode, &plain_route("web", a.addr, "")).await;
        let addr = proxy.addr("web");
        let (mut live, _) = connect_tagged(addr).await;

        // A typo: refused, naming the file and the key.
        proxy.rewrite_config(&plain_route("web", b.addr, "inactivity_timout = \"5s\""));
        let error = proxy
            .proxy
            .reload()
            .await
            .expect_err("a bad config is refused");
        assert!(matches!(error, ReloadError::Config(_)), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains("smartproxy.toml") && message.contains("inactivity_timout"),
            "the error names the file and the key: {message}"
        );

        // A valid file that changes what only a restart can: refused too.
        let other = if mode == DataPathMode::Userspace {
            DataPathMode::Auto
        } else {
            DataPathMode::Userspace
        };
        proxy.write_raw_config(&format!(
            "[proxy]\n{}\ncontrol_socket = {:?}\n\n{}",
            data_path_lines(other),
            proxy.control_socket().display().to_string(),
            plain_route("web", b.addr, "")
        ));
        let error = proxy
            .proxy
            .reload()
            .await
            .expect_err("a restart-only change is refused");
        assert!(
            error.to_string().contains("proxy.data_path"),
            "the error names the key: {error}"
        );

        // A new listen address that is taken: refused, and the new route leaves no trace.
        let taken = std::net::TcpListener::bind("127.0.0.5:0").expect("hold an address");
        let taken_addr = taken.local_addr().expect("its address");
        proxy.rewrite_config(
            &(plain_route("web", b.addr, "")
                + &format!(
                    "[[route]]\nname = \"taken\"\nlisten = \"{taken_addr}\"\ntargets = [\"{}\"]\n",
                    b.addr
                )),
        );
        let error = proxy
            .proxy
            .reload()
            .await
            .expect_err("a taken address is refused");
        assert!(matches!(error, ReloadError::Bind { .. }), "{error:?}");
        assert!(
            proxy.stats().routes.iter().all(|r| r.name != "taken"),
            "a refused reload adds no route to the stats"
        );

        // Nothing changed: the old targets serve new connections, the live one runs on.
        let (new, tag) = connect_tagged(addr).await;
        assert_eq!(tag, b'A');
        round_trip(&mut live, 3).await;
        close_normally(&mut proxy, live).await;
        close_normally(&mut proxy, new).await;
        proxy.stop().await;
        a.join().await;
        b.join().await;
    })
    .await;
}

/// Polls new connects to `addr` until one is refused, bounded by [`WAIT`].
async fn wait_refused(addr: std::net::SocketAddr) {
    within("the removed listener closes", async {
        loop {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
                // Its handshake done, the connection was reset as the listener closed (or
                // by a loop that accepted it under the new configuration), before the
                // connect returned: not refused yet.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("connect to {addr} failed, but not refused: {e}"),
                Ok(stream) => drop(stream),
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
}

//! Before the route is known: the inbound PROXY protocol header from a trusted load
//! balancer (`accept_proxy_protocol`), then the route, from the ClientHello's server
//! name on an SNI listener.

use std::io;
use std::os::fd::AsFd;

use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tracing::debug;
use tracing::field::display;

use crate::conn_error::{ConnError, Step};
use crate::proxy_protocol::{read_header, Inbound, Peeked as HeaderPeek, MAX_HEADER};
use crate::route::ListenerRoutes;
use crate::sni::{parse_client_hello, Peek, MAX_CLIENT_HELLO};
use crate::table::{Carried, ConnRecord};
use crate::vocab::{Reason, Side};

/// Picks the route: at once for a plain listener, from the ClientHello for SNI ones.
/// `read`: the client's bytes already read (after a PROXY header); the routing bytes
/// returned start with them.
pub(crate) async fn route(
    routes: &ListenerRoutes,
    client: &TcpStream,
    read: Vec<u8>,
    deadline: Instant,
) -> Result<(usize, Vec<u8>), ConnError> {
    if !routes.needs_client_hello() {
        let route = routes.select(None).ok_or(ConnError::NoRoute)?;
        return Ok((route, read));
    }
    let mut hello = read;
    loop {
        match parse_client_hello(&hello) {
            Ok(Peek::Complete(parsed)) => {
                let route = routes.select(parsed.server_name.as_deref());
                debug!(server_name = ?parsed.server_name, ?route, "client hello");
                return route.map(|r| (r, hello)).ok_or(ConnError::NoRoute);
            }
            Ok(Peek::Incomplete) => {}
            Err(e) => return Err(malformed(Step::ClientHello, e.to_string())),
        }
        // The parser refuses a ClientHello that says it is longer; this bounds what an
        // endless run of records that never completes one can make us hold.
        if hello.len() > MAX_CLIENT_HELLO {
            return Err(malformed(
                Step::ClientHello,
                format!("incomplete after {} bytes", hello.len()),
            ));
        }
        timeout_at(deadline, client.readable())
            .await
            .map_err(|_| timeout(Step::ClientHello))?
            .map_err(|e| client_failed(Step::ClientHello, e))?;
        hello.reserve(4096);
        match client.try_read_buf(&mut hello) {
            Ok(0) => return Err(malformed(Step::ClientHello, "closed inside it".to_owned())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(client_failed(Step::ClientHello, e)),
        }
    }
}

// === inbound PROXY protocol (`accept_proxy_protocol`) ===

/// Refuses a peer outside `proxy_protocol_trusted` (with or without a header), reads the
/// header and records the client it names. Returns the client's own bytes read with it:
/// they go on as routing bytes do (the start of a ClientHello, or the backend's first
/// bytes). A LOCAL command (the load balancer's health check) names no client: the
/// connection counts as the load balancer's own.
///
/// Past the header, every byte already queued is taken too. Read up to the header's end
/// only, the socket could keep a half-read skb, which the kernel data path's verdict gets
/// whole once the socket is spliced: the header's bytes would reach the backend.
pub(crate) async fn receive_proxy_header(
    client: &TcpStream,
    inbound: &Inbound,
    record: &ConnRecord,
    deadline: Instant,
) -> Result<Vec<u8>, ConnError> {
    if !inbound.trusts(record.peer.ip()) {
        debug!("peer not in proxy_protocol_trusted: refused");
        return Err(ConnError::Refused(Reason::Denied));
    }
    // `read_header` decides within MAX_HEADER bytes.
    let mut buf = vec![0; MAX_HEADER];
    let mut seen = 0;
    let received = loop {
        match read_header(&buf[..seen], inbound.accept) {
            Ok(HeaderPeek::Complete(received)) => break received,
            Ok(HeaderPeek::Incomplete) => {}
            Err(e) => return Err(malformed(Step::ProxyHeader, e.to_string())),
        }
        timeout_at(deadline, client.readable())
            .await
            .map_err(|_| timeout(Step::ProxyHeader))?
            .map_err(|e| client_failed(Step::ProxyHeader, e))?;
        match client.try_read(&mut buf[seen..]) {
            Ok(0) => {
                return Err(malformed(
                    Step::ProxyHeader,
                    format!("closed inside it, after {seen} bytes"),
                ))
            }
            Ok(n) => seen += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(client_failed(Step::ProxyHeader, e)),
        }
    };
    buf.truncate(seen);
    let mut rest = buf.split_off(received.len);
    // SIOCINQ counts up to the end of the last queued skb.
    let queued = crate::datapath::kernel::bytes_to_read(client.as_fd())
        .and_then(|queued| usize::try_from(queued).map_err(io::Error::other))
        .map_err(|e| client_failed(Step::ProxyHeader, e))?;
    let mut taken = rest.len();
    rest.resize(taken + queued, 0);
    while taken < rest.len() {
        client
            .readable()
            .await
            .map_err(|e| client_failed(Step::ProxyHeader, e))?;
        match client.try_read(&mut rest[taken..]) {
            Ok(0) => rest.truncate(taken),
            Ok(n) => taken += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(client_failed(Step::ProxyHeader, e)),
        }
    }
    if let Some((client, destination)) = received.addresses {
        let _ = record.carried.set(Box::new(Carried {
            client,
            destination,
        }));
    }
    tracing::Span::current().record("client", display(record.client()));
    debug!(
        header_bytes = received.len,
        client_bytes = rest.len(),
        "PROXY protocol header"
    );
    Ok(rest)
}

fn client_failed(step: Step, source: io::Error) -> ConnError {
    ConnError::io(Side::Client, step, source)
}

fn timeout(step: Step) -> ConnError {
    ConnError::Timeout {
        side: Side::Client,
        step,
    }
}

fn malformed(step: Step, why: String) -> ConnError {
    ConnError::Malformed {
        side: Side::Client,
        step,
        why,
    }
}

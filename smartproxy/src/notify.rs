//! systemd readiness notification (`sd_notify`): one datagram to `$NOTIFY_SOCKET`, a
//! filesystem path or, with a leading `@`, an abstract socket name.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (`READY=1`, `STOPPING=1`, ...) to the service manager. `Ok(false)`
/// when no service manager asked for it (`NOTIFY_SOCKET` unset).
///
/// # Errors
///
/// The socket named by `NOTIFY_SOCKET` cannot be reached.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let addr = match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(&socket)?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

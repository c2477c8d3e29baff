//! The control socket: a Unix socket (mode 0600) that answers `stats`, `connections`,
//! `reload` and `upgrade [BINARY]` with one JSON document each, for the commands of the
//! same names, and `stats-watch`, for each frame of `stats --watch`: `stats` without the
//! kernel maps' entry counts.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::error_chain;
use crate::listener::{accept_until, accept_warnings};
use crate::shared::Shared;

/// The longest request line accepted: a word, and for `upgrade` a binary's path.
const MAX_REQUEST: usize = 4096 + 16;

#[derive(Debug)]
pub(crate) struct ControlServer {
    listener: std::os::unix::net::UnixListener,
}

impl ControlServer {
    /// Binds `path`, replacing a stale socket file left by a proxy that died, but never
    /// one a running proxy still answers on.
    /// Needs no runtime (see `listener::bind_std`).
    pub(crate) fn bind(path: &Path) -> io::Result<ControlServer> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another smartproxy answers on this control socket",
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = std::os::unix::net::UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(ControlServer { listener })
    }

    /// A control socket a predecessor handed over (`upgrade`); the path stays bound.
    pub(crate) fn from_std(listener: std::os::unix::net::UnixListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(ControlServer { listener })
    }

    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.listener)
    }

    pub(crate) async fn serve(self, shared: Arc<Shared>) {
        let listener = match UnixListener::from_std(self.listener) {
            Ok(listener) => listener,
            Err(e) => {
                warn!(error = %e, "control socket unusable");
                return;
            }
        };
        accept_until(
            "control",
            &accept_warnings(),
            || listener.accept(),
            // Until exit, not at shutdown: the drain is when an operator watches.
            shared.services_end(),
            |stream, _| {
                tokio::spawn(answer(stream, Arc::clone(&shared)));
            },
        )
        .await;
    }
}

async fn answer(stream: UnixStream, shared: Arc<Shared>) {
    // Besides the socket's mode: whoever asks for an upgrade makes this process start a
    // binary with its privileges, so only its own user (or root) may.
    let owner = stream.peer_cred().map(|cred| {
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        cred.uid() == me || cred.uid() == 0
    });
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    if let Err(e) = reader.read_line(&mut line).await {
        debug!(error = %e, "control request unreadable");
        return;
    }
    let body = match line.trim() {
        // The one-shot request counts the kernel maps' entries, a syscall each: off the
        // runtime's threads. `stats --watch` asks every second and gets no count.
        "stats" => {
            let counting = Arc::clone(&shared);
            match tokio::task::spawn_blocking(move || counting.snapshot_counting_maps()).await {
                Ok(snapshot) => serde_json::to_vec(&snapshot),
                Err(e) => {
                    warn!(error = %e, "counting the kernel map entries did not finish");
                    serde_json::to_vec(&shared.snapshot())
                }
            }
        }
        "stats-watch" => serde_json::to_vec(&shared.snapshot()),
        "connections" => serde_json::to_vec(&shared.connection_rows()),
        "reload" => {
            let reply = match shared.reload().await {
                Ok(summary) => {
                    info!(%summary, "configuration reloaded (control socket)");
                    ReloadReply {
                        ok: true,
                        message: summary.to_string(),
                    }
                }
                Err(e) => {
                    let message = error_chain(&e);
                    warn!(error = %message, "reload refused (control socket); the running configuration stays in force");
                    ReloadReply { ok: false, message }
                }
            };
            serde_json::to_vec(&reply)
        }
        "upgrade" => serde_json::to_vec(&upgrade(&shared, None, owner).await),
        other => match other.strip_prefix("upgrade ") {
            Some(binary) => serde_json::to_vec(&upgrade(&shared, Some(binary.into()), owner).await),
            None => Ok(format!("{{\"error\":\"unknown request {other:?}\"}}").into_bytes()),
        },
    };
    match body {
        Ok(body) => {
            if let Err(e) = write.write_all(&body).await {
                debug!(error = %e, "control reply not delivered");
            }
        }
        Err(e) => warn!(error = %e, "control reply not serializable"),
    }
}

/// `upgrade [BINARY]` from a client whose credentials say `owner`.
async fn upgrade(
    shared: &Arc<Shared>,
    binary: Option<std::path::PathBuf>,
    owner: io::Result<bool>,
) -> UpgradeReply {
    let refused = |message: String| UpgradeReply {
        ok: false,
        message,
        upgraded: None,
    };
    match owner {
        Ok(true) => {}
        Ok(false) => {
            warn!("upgrade refused: asked by another user than the proxy's");
            return refused("only the proxy's own user or root may upgrade it".into());
        }
        Err(e) => return refused(format!("cannot tell who asks: {e}")),
    }
    match crate::upgrade::upgrade(shared, binary).await {
        Ok(upgraded) => {
            info!(
                new_pid = upgraded.new_pid,
                moved = upgraded.moved,
                staying = upgraded.staying,
                elapsed_ms = upgraded.elapsed_ms,
                "upgraded (control socket)"
            );
            UpgradeReply {
                ok: true,
                message: format!(
                    "pid {} handed over to pid {}: {} connections moved, {} draining here",
                    upgraded.old_pid, upgraded.new_pid, upgraded.moved, upgraded.staying
                ),
                upgraded: Some(upgraded),
            }
        }
        Err(e) => {
            let message = error_chain(&e);
            warn!(error = %message, "upgrade failed (control socket); this proxy keeps running everything");
            refused(message)
        }
    }
}

/// The reply to `upgrade`: what moved, or why nothing did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpgradeReply {
    pub ok: bool,
    pub message: String,
    /// Its fields at the top level (`new_pid`, `moved`, ...), present on success.
    #[serde(flatten)]
    pub upgraded: Option<crate::upgrade::Upgraded>,
}

/// The reply to `reload`: what changed, or why nothing did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReply {
    pub ok: bool,
    pub message: String,
}

/// Why a control request failed, naming the socket.
#[derive(Debug, thiserror::Error)]
#[error("control socket {path}: {source}")]
pub struct ControlError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Sends one request (`stats`, `stats-watch`, `connections` or `reload`) and returns the
/// JSON reply.
pub fn query(path: &Path, request: &str) -> Result<Vec<u8>, ControlError> {
    query_within(path, request, None)
}

/// [`query`], failing if a read waits longer than `within` (`None`: no limit).
pub fn query_within(
    path: &Path,
    request: &str,
    within: Option<std::time::Duration>,
) -> Result<Vec<u8>, ControlError> {
    let fail = |source| ControlError {
        path: path.to_owned(),
        source,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(fail)?;
    stream.set_read_timeout(within).map_err(fail)?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(fail)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).map_err(fail)?;
    Ok(reply)
}

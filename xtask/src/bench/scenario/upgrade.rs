//! Upgrade (issue 15): `smartproxy upgrade --control PATH --json` hands every listener and
//! connection to a freshly started successor process. With --upgrade-conns live connections
//! (all idle echo connections but --upgrade-streams downloads that clients read at full
//! speed) and a client that connects, echoes and closes in a loop, the bench runs the upgrade
//! and reports:
//! - the handoff time: `elapsed_ms` of the command's JSON, and the command's wall time;
//! - the longest gap between consecutive reads of any streaming client, from [`WARMUP`] after
//!   the streams started until [`AFTER`] past the command's exit;
//! - connections lost: every idle connection must complete an echo round trip after the
//!   upgrade, every stream must still be delivering; one that fails (EOF, RST) is lost;
//! - connects that failed (refused, reset, other) while the loop ran around the upgrade.
//!
//! The command's contract: exit 0 and one JSON object
//! `{"ok":true,"old_pid":1,"new_pid":2,"moved":10000,"staying":0,"elapsed_ms":123.4}`, or exit
//! 1 and `{"ok":false,"message":"..."}`. Anything else fails the run with
//! "smartproxy upgrade failed: ...": no numbers are reported for an upgrade that did not
//! happen.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::{
    churn::{self, Failures},
    connect, echo_round_trip, open_echo_connections, Closer, Env, Failure,
};
use crate::bench::{
    metric::{Measurement, Metric},
    wire::{self, Got, ReadWaits, Request, CHUNK},
};

/// Streams read this long before the gaps count (connect, slow start).
const WARMUP: Duration = Duration::from_secs(1);
/// Streams and the connect loop go on this long after the command exits.
const AFTER: Duration = Duration::from_secs(2);
/// The longest the upgrade command may take before it is killed and the run fails.
const COMMAND_LIMIT: Duration = Duration::from_secs(120);
/// What a stream asks the backend for: more than any run reads.
const STREAM_BYTES: u64 = 1 << 50;

const WARMING: u8 = 0;
const MEASURING: u8 = 1;
const STOPPING: u8 = 2;

/// What one streaming client saw.
struct StreamResult {
    longest_gap: Duration,
    /// The stream ended (EOF, error) before it was stopped.
    lost: Option<anyhow::Error>,
}

/// What the connect loop saw.
struct LoopResult {
    ok: usize,
    failures: Failures,
    first_error: Option<anyhow::Error>,
}

/// The command's JSON on success.
struct Outcome {
    new_pid: u32,
    moved: Option<f64>,
    elapsed_ms: Option<f64>,
    wall: Duration,
}

pub fn run(env: &Env<'_>) -> Result<Measurement> {
    let (Some(binary), Some(control)) = (env.smartproxy, env.control) else {
        bail!("upgrade: only smartproxy targets (with a control socket) can be upgraded");
    };
    let p = env.params;
    let streams = p.upgrade_streams.min(p.upgrade_conns);
    let idle_count = p.upgrade_conns - streams;
    let mut waits = ReadWaits::default();
    let mut idle = open_echo_connections(env, idle_count, "upgrade: idle", &mut waits, |_| {})?;

    let phase = Arc::new(AtomicU8::new(WARMING));
    let streamers = (0..streams)
        .map(|i| {
            let (addr, phase) = (env.addr, Arc::clone(&phase));
            thread::Builder::new()
                .name(format!("bench-upgrade-stream-{i}"))
                .spawn(move || stream(addr, &phase))
                .context("upgrade: failed to spawn a streaming client")
        })
        .collect::<Result<Vec<_>>>();
    let connector = {
        let (addr, size, phase) = (env.addr, p.message, Arc::clone(&phase));
        thread::Builder::new()
            .name("bench-upgrade-connect".into())
            .spawn(move || connect_loop(addr, size, &phase))
            .context("upgrade: failed to spawn the connect loop")
    };
    // Whatever happens below, the threads are stopped and joined.
    let outcome = match (&streamers, &connector) {
        (Ok(_), Ok(_)) => {
            thread::sleep(WARMUP);
            phase.store(MEASURING, Ordering::Relaxed);
            let outcome = upgrade(binary, control);
            if outcome.is_ok() {
                thread::sleep(AFTER);
            }
            outcome
        }
        _ => Err(anyhow!("upgrade: a client thread did not start")),
    };
    phase.store(STOPPING, Ordering::Relaxed);
    let stream_results = join_all(streamers?)?;
    let loop_result = connector?
        .join()
        .map_err(|_| anyhow!("upgrade: the connect loop panicked"))?;
    let outcome = outcome?;
    if let Some(pid) = Some(outcome.new_pid).filter(|&p| p > 0) {
        env.successor.set(Some(pid));
    }

    // Every idle connection must still echo.
    let mut lost = 0usize;
    let mut first_loss = None;
    for (i, conn) in idle.iter_mut().enumerate() {
        if let Err(e) = echo_round_trip(conn, p.message, &mut waits) {
            lost += 1;
            first_loss.get_or_insert_with(|| format!("idle connection {}: {e:#}", i + 1));
        }
    }
    let mut longest_gap = Duration::ZERO;
    for (i, r) in stream_results.into_iter().enumerate() {
        longest_gap = longest_gap.max(r.longest_gap);
        if let Some(e) = r.lost {
            lost += 1;
            first_loss.get_or_insert_with(|| format!("stream {}: {e:#}", i + 1));
        }
    }
    if let Some(first) = first_loss {
        eprintln!("bench: upgrade: {lost} connection(s) lost, the first: {first}");
    }
    if let Some(e) = &loop_result.first_error {
        eprintln!(
            "bench: upgrade: {} connect(s) failed around the upgrade ({} succeeded), the \
             first: {e:#}",
            loop_result.failures.total(),
            loop_result.ok
        );
    }
    let mut m = Measurement::default();
    match outcome.elapsed_ms {
        Some(ms) => m.set(Metric::HandoffMs, ms),
        None => m.set_unavailable(Metric::HandoffMs),
    }
    m.set(Metric::HandoffWallMs, outcome.wall.as_secs_f64() * 1e3);
    match outcome.moved {
        Some(moved) => m.set(Metric::UpgradeMoved, moved),
        None => m.set_unavailable(Metric::UpgradeMoved),
    }
    m.set(Metric::UpgradeLongestGap, longest_gap.as_secs_f64() * 1e3);
    m.set(Metric::UpgradeLost, lost as f64);
    m.set(
        Metric::UpgradeFailedConnects,
        loop_result.failures.total() as f64,
    );
    m.set(Metric::UpgradeRefused, loop_result.failures.refused as f64);
    drop(idle);
    Ok(m)
}

/// Runs the upgrade command and reads its JSON; any failure reads "smartproxy upgrade
/// failed: ...".
fn upgrade(binary: &Path, control: &Path) -> Result<Outcome> {
    let started = Instant::now();
    let mut child = Command::new(binary)
        .arg("upgrade")
        .arg("--control")
        .arg(control)
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("smartproxy upgrade failed: cannot run {}", binary.display()))?;
    // Bounded by COMMAND_LIMIT.
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() < COMMAND_LIMIT => {
                thread::sleep(Duration::from_millis(5));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("smartproxy upgrade failed: no exit within {COMMAND_LIMIT:?}; killed it");
            }
            Err(e) => bail!("smartproxy upgrade failed: cannot wait for the command: {e}"),
        }
    }
    let wall = started.elapsed();
    let output = child
        .wait_with_output()
        .context("smartproxy upgrade failed: cannot read its output")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let json = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .filter(serde_json::Value::is_object);
    let said = |json: Option<&serde_json::Value>| {
        json.and_then(|j| j.get("message"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| {
                let text = format!("{} {}", stdout.trim(), stderr.trim());
                if text.trim().is_empty() {
                    "(no output)".to_owned()
                } else {
                    text.trim().to_owned()
                }
            })
    };
    let ok = json
        .as_ref()
        .and_then(|j| j.get("ok"))
        .and_then(serde_json::Value::as_bool);
    if !output.status.success() || ok != Some(true) {
        bail!(
            "smartproxy upgrade failed: {} ({})",
            said(json.as_ref()),
            output.status
        );
    }
    let json = json.ok_or_else(|| anyhow!("smartproxy upgrade failed: no JSON object"))?;
    let number = |key: &str| json.get(key).and_then(serde_json::Value::as_f64);
    let new_pid = json
        .get("new_pid")
        .and_then(serde_json::Value::as_u64)
        .and_then(|p| u32::try_from(p).ok())
        .ok_or_else(|| anyhow!("smartproxy upgrade failed: the JSON has no new_pid: {json}"))?;
    Ok(Outcome {
        new_pid,
        moved: number("moved"),
        elapsed_ms: number("elapsed_ms"),
        wall,
    })
}

/// A client that reads a never-ending download as fast as it can until told to stop,
/// timing the gaps between reads once measuring starts.
fn stream(addr: SocketAddr, phase: &AtomicU8) -> StreamResult {
    let mut result = StreamResult {
        longest_gap: Duration::ZERO,
        lost: None,
    };
    let mut conn = match start_stream(addr) {
        Ok(conn) => conn,
        Err(e) => {
            result.lost = Some(e);
            return result;
        }
    };
    let mut buf = vec![0; CHUNK];
    let mut waits = ReadWaits::default();
    let mut last: Option<Instant> = None;
    // Bounded by the phase: the scenario always sets STOPPING.
    loop {
        let state = phase.load(Ordering::Relaxed);
        let now = Instant::now();
        if state == STOPPING {
            if let Some(last) = last {
                result.longest_gap = result.longest_gap.max(now - last);
            }
            return result;
        }
        if state == MEASURING && last.is_none() {
            last = Some(now);
        }
        // A short deadline so the phase is seen while the stream stalls.
        match wire::read_timed(&mut conn, &mut buf, &mut waits, now + wire::READ_POLL) {
            Ok(Got::Data(_)) => {
                let now = Instant::now();
                if let Some(prev) = last.as_mut() {
                    result.longest_gap = result.longest_gap.max(now - *prev);
                    *prev = now;
                }
            }
            Ok(Got::Deadline) => {}
            Ok(Got::Eof) => {
                result.lost = Some(anyhow!("EOF"));
                return result;
            }
            Err(e) => {
                result.lost = Some(anyhow::Error::new(e).context("read failed"));
                return result;
            }
        }
    }
}

fn start_stream(addr: SocketAddr) -> Result<TcpStream> {
    let mut conn = connect(addr)?;
    conn.write_all(&Request::Download(STREAM_BYTES).encode())
        .context("sending the download header failed")?;
    Ok(conn)
}

/// Connect, echo, close, again, until told to stop.
fn connect_loop(addr: SocketAddr, size: u64, phase: &AtomicU8) -> LoopResult {
    let mut result = LoopResult {
        ok: 0,
        failures: Failures::default(),
        first_error: None,
    };
    let mut waits = ReadWaits::default();
    // Bounded by the phase: the scenario always sets STOPPING.
    while phase.load(Ordering::Relaxed) != STOPPING {
        match churn::one(addr, size, Closer::Client, &mut waits) {
            Ok(()) => result.ok += 1,
            Err(e) => {
                result.failures.count(Failure::of(&e));
                result.first_error.get_or_insert(e);
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
    result
}

fn join_all(handles: Vec<JoinHandle<StreamResult>>) -> Result<Vec<StreamResult>> {
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow!("upgrade: a streaming client panicked"))
        })
        .collect()
}

//! `cargo xtask test [--runner CMD] [-- ARGS]`: `cargo test --workspace ARGS`, exit code passed on.
//!
//! The eBPF tests need root (or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON). CI runs as root; a
//! developer can pass `--runner "sudo -E"` to run the test binaries privileged. They skip
//! loudly when unprivileged unless `SMARTPROXY_REQUIRE_EBPF=1` is set (inherited from the
//! environment).
//!
//! The TLS tests run `openssl s_client` and `curl` as real clients: they are installed with
//! apt-get first if they do not run (and the output says so).
//!
//! With `CI` set (not to "", "0" or "false": a clean clone, built once) the build is not
//! incremental (`CARGO_INCREMENTAL=0` unless set otherwise): incremental caches would add
//! about a gigabyte to the 2.6 GB a build of the suite from nothing takes under `target/`.
//! Elsewhere they stay, as switching them off or on rebuilds the workspace's crates. Less
//! free space than a build takes is said before it starts, not found out as a failed link
//! halfway through.

use std::{
    ffi::{CString, OsString},
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result};
use clap::Parser;

use crate::{run::workspace_root, toolchain};

#[derive(Debug, Parser)]
pub struct Options {
    /// Command that runs each test binary, e.g. "sudo -E" (sets cargo's target runner).
    #[arg(long)]
    runner: Option<String>,
    /// Extra arguments for `cargo test`, e.g. `-- --nocapture`.
    #[arg(last = true)]
    args: Vec<OsString>,
}

pub fn run(opts: Options) -> Result<ExitCode> {
    let Options { runner, args } = opts;
    toolchain::ensure()?;
    for (binary, version_args) in [("openssl", &["version"][..]), ("curl", &["--version"][..])] {
        crate::packages::ensure("test", binary, version_args, binary)?;
    }
    warn_if_short_of_disk();
    let cargo = crate::run::cargo();
    let mut cmd = Command::new(cargo);
    let ci = std::env::var("CI").is_ok_and(|ci| !matches!(ci.as_str(), "" | "0" | "false"));
    if ci && std::env::var_os("CARGO_INCREMENTAL").is_none() {
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd.current_dir(workspace_root())
        // Every failing test binary is reported, not only the first.
        .args(["test", "--workspace", "--no-fail-fast"]);
    if let Some(runner) = runner {
        // Applies to every target cargo runs tests for; a TOML string, which `{:?}` quotes.
        cmd.arg("--config")
            .arg(format!("target.'cfg(all())'.runner = {runner:?}"));
    }
    cmd.args(&args);
    let status = cmd
        .status()
        .with_context(|| format!("failed to run {cmd:?}"))?;
    if status.success() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("xtask: {cmd:?} failed: {status}");
    // A signal-killed cargo has no code; report plain failure then.
    let code = status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .unwrap_or(1);
    Ok(ExitCode::from(code))
}

/// What a build of the suite from nothing takes under `target/`, with some room (measured:
/// 2.6 GB with Cargo.toml's dev profile without incremental caches, 3.5 GB with them).
const SUITE_BUILD_BYTES: u64 = 4 << 30;

/// Says so when the file system of `target/` has less free than a build from nothing
/// takes. Only a warning: a `target/` that holds most of the build needs far less.
fn warn_if_short_of_disk() {
    // Relative to where cargo runs (an absolute one replaces the root when joined).
    let target = workspace_root().join(
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from),
    );
    // Before the first build there is no target/ yet: its parent's file system counts.
    let existing = target.ancestors().find(|dir| dir.exists());
    let Some(free) = existing.and_then(free_bytes) else {
        return;
    };
    if free < SUITE_BUILD_BYTES {
        eprintln!(
            "xtask: warning: {:.1} GiB free for {}; building the suite from nothing takes up to \
             {} GiB there (CARGO_INCREMENTAL=0 saves about 1)",
            free as f64 / f64::from(1u32 << 30),
            target.display(),
            SUITE_BUILD_BYTES >> 30
        );
    }
}

/// Bytes an unprivileged user may still write on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let path = CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `path` is a NUL-terminated string and `stat` is valid for one statvfs.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

//! `cargo xtask test [--runner CMD] [-- ARGS]`: `cargo test --workspace ARGS`, exit code passed on.
//!
//! The eBPF tests need root (or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON). CI runs as root; a
//! developer can pass `--runner "sudo -E"` to run the test binaries privileged. They skip
//! loudly when unprivileged unless `SMARTPROXY_REQUIRE_EBPF=1` is set (inherited from the
//! environment).
//!
//! The TLS tests run `openssl s_client` and `curl` as real clients: they are installed with
//! apt-get first if they do not run (and the output says so).

use std::{
    ffi::OsString,
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
    let cargo = crate::run::cargo();
    let mut cmd = Command::new(cargo);
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

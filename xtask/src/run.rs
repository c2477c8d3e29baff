//! `cargo xtask run [--config PATH] [-- ARGS]`: build smartproxy and run it in the foreground.
//!
//! It builds the release profile: `run` is how one tries the proxy as it would be deployed
//! (the userspace copy path and the control plane are several times slower in debug, which
//! skews anything one looks at), and the eBPF object is built in release either way.

use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{anyhow, Context as _, Result};
use clap::Parser;

use crate::toolchain;

#[derive(Debug, Parser)]
pub struct Options {
    /// Configuration file, relative to the workspace root unless absolute.
    #[arg(long, default_value = "examples/smartproxy.toml")]
    config: PathBuf,
    /// Extra arguments for `smartproxy run`.
    #[arg(last = true)]
    args: Vec<OsString>,
}

pub fn run(opts: Options) -> Result<ExitCode> {
    let Options { config, args } = opts;
    let root = workspace_root();
    let binary = build_release_binary(root)?;
    let config = root.join(config);
    let mut cmd = Command::new(&binary);
    cmd.current_dir(root)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .args(&args);
    println!("xtask: exec {cmd:?}");
    // exec replaces this process, so signals (SIGINT, SIGTERM) reach the proxy directly.
    let err = cmd.exec();
    Err(err).with_context(|| format!("failed to exec {cmd:?}"))
}

/// The cargo that runs xtask (`$CARGO`), or `cargo` from the PATH.
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// `cargo build --release` of the `smartproxy` binary (after [`toolchain::ensure`]);
/// returns its path.
/// `--proxy-bin PATH` (relative to the workspace root), checked to be a file.
pub fn given_binary(root: &Path, path: &Path) -> Result<PathBuf> {
    let path = root.join(path);
    anyhow::ensure!(
        path.is_file(),
        "--proxy-bin {} is not a file",
        path.display()
    );
    Ok(path)
}

pub fn build_release_binary(root: &Path) -> Result<PathBuf> {
    toolchain::ensure()?;
    let cargo = cargo();
    toolchain::status(Command::new(&cargo).current_dir(root).args([
        "build",
        "--release",
        "--package",
        "smartproxy",
        "--bin",
        "smartproxy",
    ]))?;
    Ok(target_dir(&cargo, root)?.join("release").join("smartproxy"))
}

/// The workspace root: xtask lives in `<root>/xtask`.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest dir is <workspace>/xtask, so it has a parent")
}

/// Where cargo puts build output (honours `CARGO_TARGET_DIR` and config), per `cargo metadata`.
pub fn target_dir(cargo: &OsString, root: &Path) -> Result<PathBuf> {
    let json = toolchain::output(Command::new(cargo).current_dir(root).args([
        "metadata",
        "--format-version",
        "1",
        "--no-deps",
    ]))?;
    let meta: serde_json::Value =
        serde_json::from_str(&json).context("`cargo metadata` printed invalid JSON")?;
    meta.get("target_directory")
        .and_then(|t| t.as_str())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("`cargo metadata` output has no target_directory"))
}

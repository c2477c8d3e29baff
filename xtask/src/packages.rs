//! Installs a Debian package when the command that needs it does not run, and says so.

use std::process::Command;

use anyhow::{anyhow, bail, Context as _, Result};

/// Makes sure `binary` runs (`binary version_args` succeeds), installing `package` with
/// apt-get if it does not. `who` prefixes every line printed (`bench`, `test`). Returns
/// the first line the check printed (the version).
pub fn ensure(who: &str, binary: &str, version_args: &[&str], package: &str) -> Result<String> {
    let version = || {
        Command::new(binary)
            .args(version_args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
    };
    if let Some(v) = version() {
        println!("xtask: {who}: {v}");
        return Ok(v);
    }
    println!("xtask: {who}: {binary} is not installed");
    install(who, package)?;
    let v = version().ok_or_else(|| {
        anyhow!("{binary} still does not run after `apt-get install -y {package}`")
    })?;
    println!("xtask: {who}: installed {v}");
    Ok(v)
}

/// `apt-get install -y package`, saying so first.
pub fn install(who: &str, package: &str) -> Result<()> {
    println!("xtask: {who}: installing {package} (apt-get install -y {package})");
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", package])
        .env("DEBIAN_FRONTEND", "noninteractive");
    let status = install
        .status()
        .with_context(|| format!("failed to run {install:?}"))?;
    if !status.success() {
        bail!("{install:?} failed: {status} (try `apt-get update` first)");
    }
    Ok(())
}

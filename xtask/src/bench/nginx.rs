//! nginx as a peer: installed with apt-get if missing (and saying so), with its stream module.
//! Debian builds the stream module as a loadable module (`libnginx-mod-stream`); a config
//! given with `-c` skips the distribution's `modules-enabled`, so the bench loads it itself.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// Where Debian puts nginx's loadable modules.
const MODULE_DIR: &str = "/usr/lib/nginx/modules";
const STREAM_MODULE: &str = "ngx_stream_module.so";

/// How to run nginx with `stream {}`.
#[derive(Debug, Clone)]
pub struct Nginx {
    /// The stream module to `load_module`, if nginx is not built with it.
    pub load_module: Option<PathBuf>,
}

/// `nginx -V` (it prints to stderr), or None if nginx does not run.
fn configure_output() -> Option<String> {
    let out = Command::new("nginx").arg("-V").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Makes sure nginx runs and has the stream module, installing `nginx-light` and then
/// `libnginx-mod-stream` as needed. Only ever run by the bench in the foreground.
pub fn ensure() -> Result<Nginx> {
    let text = match configure_output() {
        Some(text) => text,
        None => {
            println!("xtask: bench: nginx is not installed");
            crate::packages::install("bench", "nginx-light")?;
            configure_output().context("nginx still does not run after installing nginx-light")?
        }
    };
    let version = text.lines().next().unwrap_or("nginx").trim().to_owned();
    let module = Path::new(MODULE_DIR).join(STREAM_MODULE);
    let built_in = text.split_whitespace().any(|flag| flag == "--with-stream");
    let load_module = if built_in {
        None
    } else {
        if !module.exists() {
            println!("xtask: bench: {version} has no stream module");
            crate::packages::install("bench", "libnginx-mod-stream")?;
        }
        if !module.exists() {
            bail!(
                "{} is missing after installing libnginx-mod-stream",
                module.display()
            );
        }
        Some(module)
    };
    println!(
        "xtask: bench: {version}, stream module {}",
        load_module
            .as_deref()
            .map_or_else(|| "built in".to_owned(), |m| m.display().to_string())
    );
    Ok(Nginx { load_module })
}

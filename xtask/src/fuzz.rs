//! `cargo xtask fuzz [--time SECS] [--target NAME]`: run the cargo-fuzz targets in `fuzz/`.
//!
//! Each target runs for SECS under libFuzzer with AddressSanitizer, debug assertions and
//! overflow checks, one after another in one process each (the machine is shared), with RSS
//! and single-allocation limits so that unbounded allocation counts as a crash. Any crash,
//! leak, timeout or limit breach fails the command; libFuzzer leaves the input in
//! `fuzz/artifacts/<target>/`.
//!
//! New inputs go to `fuzz/target/corpus/<target>/` (not committed); the committed seeds
//! (`fuzz/corpus/<target>/`, and for the config loader the config test files and the
//! example) are read only.
//!
//! The fuzz crate links the `smartproxy` library, whose build script builds the eBPF
//! programs; fuzzing never loads them, so the build sets `AYA_BUILD_SKIP=1` and embeds
//! the empty object instead (and needs no bpf-linker).

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::Parser;

use crate::{run::workspace_root, toolchain};

/// Every target in `fuzz/fuzz_targets/`, with its committed seed directories (relative to
/// the workspace root) and libFuzzer arguments of its own.
const TARGETS: &[Target] = &[
    Target {
        name: "sni",
        seeds: &["fuzz/corpus/sni"],
        // Past MAX_CLIENT_HELLO (16 KiB), so the size cap is exercised too.
        args: &["-max_len=20000"],
    },
    Target {
        name: "proxy_header",
        seeds: &["fuzz/corpus/proxy_header"],
        // Past MAX_HEADER (4 KiB), so the size cap is exercised too.
        args: &["-max_len=5000"],
    },
    Target {
        name: "config",
        seeds: &[
            "fuzz/corpus/config",
            "tests/config/valid",
            "tests/config/invalid",
            "examples",
        ],
        args: &[],
    },
];

/// RSS of the fuzzing process; far above what parsing a 20 KB input may need.
const RSS_LIMIT_MB: u32 = 1024;
/// Largest single allocation: the readers never need more than a few times their input.
const MALLOC_LIMIT_MB: u32 = 64;
/// One input taking longer than this is a hang.
const INPUT_TIMEOUT_SECS: u32 = 10;

struct Target {
    name: &'static str,
    seeds: &'static [&'static str],
    args: &'static [&'static str],
}

#[derive(Debug, Parser)]
pub struct Options {
    /// Seconds to run each target.
    #[arg(long, default_value_t = 60)]
    time: u64,
    /// Run only this target (sni, proxy_header, config); all of them by default.
    #[arg(long)]
    target: Option<String>,
}

pub fn run(opts: Options) -> Result<ExitCode> {
    let Options { time, target } = opts;
    let targets: Vec<&Target> = match &target {
        Some(name) => match TARGETS.iter().find(|t| t.name == name) {
            Some(t) => vec![t],
            None => bail!(
                "no fuzz target {name:?}; the targets are {}",
                TARGETS
                    .iter()
                    .map(|t| t.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        None => TARGETS.iter().collect(),
    };
    let root = workspace_root();
    toolchain::ensure_nightly()?;
    ensure_cargo_fuzz()?;
    for t in &targets {
        toolchain::status(cargo_fuzz(root).args(["build", t.name]))?;
    }
    for t in &targets {
        let corpus = root.join("fuzz/target/corpus").join(t.name);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("failed to create {}", corpus.display()))?;
        println!("xtask: fuzzing {} for {time} s", t.name);
        let mut cmd = cargo_fuzz(root);
        cmd.args(["run", t.name])
            .arg(&corpus)
            .args(t.seeds.iter().map(|s| root.join(s)))
            .arg("--")
            .arg(format!("-max_total_time={time}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
            .args(t.args);
        toolchain::status(&mut cmd).with_context(|| {
            format!(
                "fuzz target {name} failed; the input is in {artifacts}/ \
                 (replay: cargo +nightly fuzz run {name} {artifacts}/<file>)",
                name = t.name,
                artifacts = artifacts(root, t.name).display()
            )
        })?;
    }
    println!(
        "xtask: fuzzing passed: {} for {time} s each",
        targets
            .iter()
            .map(|t| t.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

/// `cargo +nightly fuzz` in the workspace root, without building the eBPF programs.
fn cargo_fuzz(root: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root)
        .args(["run", toolchain::NIGHTLY, "cargo", "fuzz"])
        .env("AYA_BUILD_SKIP", "1");
    cmd
}

fn artifacts(root: &Path, target: &str) -> PathBuf {
    root.join("fuzz/artifacts").join(target)
}

/// Installs cargo-fuzz (with the cargo that runs xtask) when `cargo fuzz` does not run.
fn ensure_cargo_fuzz() -> Result<()> {
    let runs = cargo_fuzz(workspace_root())
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if runs {
        println!("xtask: cargo-fuzz: already installed");
        return Ok(());
    }
    println!("xtask: cargo-fuzz: not installed; installing (cargo install cargo-fuzz --locked, about a minute)");
    toolchain::status(Command::new(crate::run::cargo()).args(["install", "cargo-fuzz", "--locked"]))
}

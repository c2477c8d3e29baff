//! Developer tasks for smartproxy, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! Every command that builds the proxy first makes sure the machine can build the eBPF
//! programs (see [`toolchain::ensure`]); `smartproxy/build.rs` then builds them as part of an
//! ordinary cargo build. `fuzz` needs only nightly and cargo-fuzz, and skips the eBPF build.

mod bench;
mod dist;
mod fuzz;
mod packages;
mod run;
mod soak;
mod test;
mod toolchain;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "smartproxy developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build smartproxy (release) and run it in the foreground.
    Run(run::Options),
    /// Run the workspace's tests (the eBPF ones need root).
    Test(test::Options),
    /// Release binary and Debian package; installs, tries and purges it (needs root, dpkg).
    Dist(dist::Options),
    /// Benchmark direct vs smartproxy (ebpf, userspace) [vs HAProxy] on loopback (needs root).
    Bench(bench::Options),
    /// Run the cargo-fuzz targets (ClientHello reader, config loader) for a while each.
    Fuzz(fuzz::Options),
    /// Mixed traffic through the proxy for a long time; fails on a lost byte or a leak (needs root).
    Soak(soak::Options),
}

fn main() -> anyhow::Result<ExitCode> {
    let Cli { command } = Cli::parse();
    match command {
        Command::Run(opts) => run::run(opts),
        Command::Test(opts) => test::run(opts),
        Command::Dist(opts) => dist::run(opts),
        Command::Bench(opts) => bench::run(opts),
        Command::Fuzz(opts) => fuzz::run(opts),
        Command::Soak(opts) => soak::run(opts),
    }
}

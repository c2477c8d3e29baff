//! Builds the eBPF programs in `../smartproxy-ebpf` and leaves the object at
//! `$OUT_DIR/smartproxy-ebpf`, which `src/datapath/kernel/mod.rs` embeds with
//! `include_bytes_aligned!`.
//!
//! aya-build (as in aya-template) runs `rustup run nightly cargo build -Z build-std=core
//! --target bpfel-unknown-none` for the eBPF crate, with its own target dir under `OUT_DIR`.
//! That needs the nightly `rust-src` component and a `bpf-linker` built against the nightly's
//! LLVM; `cargo xtask test` / `cargo xtask run` install both (xtask/src/toolchain.rs).
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build and embeds an empty object instead, so the crate
//! still compiles on a machine without that toolchain; `datapath::kernel::Kernel::load` then fails with
//! `EbpfError::NotBuilt`, and `data_path = "auto"` says so in the log.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

const EBPF_PACKAGE: &str = "smartproxy-ebpf";
const AYA_BUILD_SKIP: &str = "AYA_BUILD_SKIP";

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let root = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", manifest_dir.display()))?;
    let ebpf_dir = root.join(EBPF_PACKAGE);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);

    // aya-build watches the eBPF crate's directory; the shared types live next to it.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("smartproxy-common").display()
    );
    println!("cargo:rerun-if-env-changed={AYA_BUILD_SKIP}");

    if env::var(AYA_BUILD_SKIP).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        println!("cargo:warning={AYA_BUILD_SKIP} is set: embedding an empty eBPF object, the eBPF data path will not load");
        return write_stub(&out_dir.join(EBPF_PACKAGE));
    }

    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", ebpf_dir.display()))?;
    // aya-build runs `cargo build --package smartproxy-ebpf` in the current directory. The eBPF
    // crate is its own workspace, outside the root one (so host builds never compile it for
    // x86), so cargo has to start from its directory to find it.
    env::set_current_dir(&ebpf_dir)
        .with_context(|| format!("failed to enter {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed; `cargo xtask test` installs what they need \
         (nightly rust-src, bpf-linker), and AYA_BUILD_SKIP=1 builds without them",
    )
}

fn write_stub(path: &Path) -> anyhow::Result<()> {
    fs::write(path, []).with_context(|| format!("failed to write {}", path.display()))
}

//! Makes sure the machine can build the eBPF crate, installing what it lacks and saying so.
//!
//! The eBPF crate is built by nightly (`-Z build-std=core` for `bpfel-unknown-none`), which
//! needs the nightly `rust-src` component, and linked by `bpf-linker`, which must be built
//! against the same LLVM major as that nightly (docs/kernel-notes.md#toolchain). A plain `cargo
//! install bpf-linker` finds the distribution's LLVM instead, so we point `LLVM_PREFIX` at a
//! folder whose `lib/` links to the nightly's own `libLLVM`. bpf-linker bakes that folder in as
//! its rpath, so the folder lives in `$CARGO_HOME`, next to the installed binary.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};

/// The bpf-linker release known to link aya-ebpf 0.2.1 programs built by nightly 1.97 (LLVM 22).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Toolchain that builds the eBPF crate (aya-build runs `rustup run nightly cargo ...`) and
/// the fuzz targets (sanitizers need nightly).
pub const NIGHTLY: &str = "nightly";

/// Installs whatever is missing: make (jemalloc's build runs it), the nightly `rust-src`
/// component and a bpf-linker matching the nightly's LLVM. Prints one line per check.
pub fn ensure() -> Result<()> {
    crate::packages::ensure("toolchain", "make", &["--version"], "make")?;
    ensure_rust_src()?;
    let llvm = NightlyLlvm::detect()?;
    ensure_bpf_linker(&llvm)
}

/// Installs the nightly toolchain (minimal profile) when rustup has none.
pub fn ensure_nightly() -> Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if installed
        .lines()
        .any(|l| l.starts_with(&format!("{NIGHTLY}-")))
    {
        println!("xtask: {NIGHTLY} toolchain: already installed");
        return Ok(());
    }
    println!("xtask: {NIGHTLY} toolchain: installing (rustup toolchain install {NIGHTLY} --profile minimal)");
    status(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))
}

fn ensure_rust_src() -> Result<()> {
    ensure_nightly()?;
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        println!("xtask: rust-src for {NIGHTLY}: already installed");
        return Ok(());
    }
    println!("xtask: rust-src for {NIGHTLY}: installing (rustup component add rust-src)");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// The nightly rustc's LLVM, as `rustc -vV` reports it and as its sysroot ships it.
struct NightlyLlvm {
    /// e.g. 22, from "LLVM version: 22.1.4".
    major: u32,
    /// e.g. `<sysroot>/lib/libLLVM.so.22.1-rust-1.97.0-nightly`.
    library: PathBuf,
}

impl NightlyLlvm {
    fn detect() -> Result<Self> {
        let version = output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "-vV"]))?;
        let llvm = version
            .lines()
            .find_map(|l| l.strip_prefix("LLVM version:"))
            .map(str::trim)
            .ok_or_else(|| anyhow!("`rustc -vV` of {NIGHTLY} has no \"LLVM version:\" line"))?;
        let major = llvm
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok())
            .ok_or_else(|| anyhow!("cannot parse LLVM version {llvm:?} of {NIGHTLY}"))?;

        let sysroot =
            output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))?;
        let lib_dir = Path::new(sysroot.trim()).join("lib");
        let prefix = format!("libLLVM.so.{major}.");
        let mut candidates = fs::read_dir(&lib_dir)
            .with_context(|| format!("failed to list {}", lib_dir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.contains("-rust-"))
            })
            .collect::<Vec<_>>();
        candidates.sort();
        let library = candidates.pop().ok_or_else(|| {
            anyhow!(
                "no {prefix}*-rust-* in {}: this nightly does not ship a shared libLLVM",
                lib_dir.display()
            )
        })?;
        Ok(Self { major, library })
    }

    fn feature(&self) -> String {
        format!("llvm-{}", self.major)
    }
}

fn ensure_bpf_linker(llvm: &NightlyLlvm) -> Result<()> {
    let feature = llvm.feature();
    let prefix = llvm_prefix(llvm)?;
    let runs = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let recorded = installed_bpf_linker()?;
    let wanted = InstalledBpfLinker {
        version: BPF_LINKER_VERSION.to_owned(),
        features: vec![feature.clone()],
    };
    if runs && recorded.as_ref() == Some(&wanted) {
        println!(
            "xtask: bpf-linker {BPF_LINKER_VERSION} ({feature}): already installed, links {}",
            llvm.library.display()
        );
        return Ok(());
    }
    let why = match (&recorded, runs) {
        (None, false) => "not installed".to_owned(),
        (None, true) => "found one not installed by cargo; its LLVM is unknown".to_owned(),
        (Some(r), true) => format!("installed {} with {:?}", r.version, r.features),
        (Some(r), false) => format!("installed {} with {:?} does not run", r.version, r.features),
    };
    println!(
        "xtask: bpf-linker {BPF_LINKER_VERSION} ({feature}): {why}; installing against {} \
         (LLVM_PREFIX={}; cargo install takes about a minute)",
        llvm.library.display(),
        prefix.display()
    );
    let cargo = crate::run::cargo();
    status(
        Command::new(cargo)
            .args(["install", "bpf-linker", "--locked", "--force", "--version"])
            .arg(BPF_LINKER_VERSION)
            .args(["--no-default-features", "--features", &feature])
            .env("LLVM_PREFIX", &prefix),
    )?;
    let version = output(Command::new("bpf-linker").arg("--version"))?;
    println!("xtask: installed {}", version.trim());
    Ok(())
}

/// Creates (or refreshes) `$CARGO_HOME/smartproxy-llvm-prefix/lib` holding `libLLVM.so` and
/// the versioned soname, both symlinks to the nightly's libLLVM. bpf-linker links against it
/// and keeps it as rpath; a nightly update changes the soname, the old bpf-linker then fails to
/// start, and the next `ensure` reinstalls it.
fn llvm_prefix(llvm: &NightlyLlvm) -> Result<PathBuf> {
    let prefix = cargo_home()?.join("smartproxy-llvm-prefix");
    let lib = prefix.join("lib");
    let soname = llvm
        .library
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", llvm.library.display()))?;
    let names = [Path::new("libLLVM.so"), Path::new(soname)];
    let current = |name: &Path| fs::read_link(lib.join(name)).is_ok_and(|t| t == llvm.library);
    let entries = fs::read_dir(&lib).map(|d| d.count()).unwrap_or(0);
    if entries == names.len() && names.iter().all(|n| current(n)) {
        return Ok(prefix);
    }
    // Stale links (an older nightly) go, so a bpf-linker built against them stops starting.
    if lib.exists() {
        fs::remove_dir_all(&lib).with_context(|| format!("failed to remove {}", lib.display()))?;
    }
    fs::create_dir_all(&lib).with_context(|| format!("failed to create {}", lib.display()))?;
    for name in names {
        let link = lib.join(name);
        symlink(&llvm.library, &link).with_context(|| {
            format!(
                "failed to link {} -> {}",
                link.display(),
                llvm.library.display()
            )
        })?;
    }
    Ok(prefix)
}

fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(home.into());
    }
    let home = env::var_os("HOME").ok_or_else(|| anyhow!("neither CARGO_HOME nor HOME is set"))?;
    Ok(Path::new(&home).join(".cargo"))
}

/// What cargo recorded about its bpf-linker install (`$CARGO_HOME/.crates2.json`).
#[derive(Debug, PartialEq, Eq)]
struct InstalledBpfLinker {
    version: String,
    features: Vec<String>,
}

fn installed_bpf_linker() -> Result<Option<InstalledBpfLinker>> {
    let path = cargo_home()?.join(".crates2.json");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", path.display())),
    };
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("failed to parse {}", path.display()))?;
    let Some(installs) = json.get("installs").and_then(|i| i.as_object()) else {
        return Ok(None);
    };
    // Keys look like "bpf-linker 0.13.0 (registry+https://...)".
    for (key, info) in installs {
        let mut words = key.split(' ');
        if words.next() != Some("bpf-linker") {
            continue;
        }
        let version = words.next().unwrap_or_default().to_owned();
        let no_default = info.get("no_default_features").and_then(|v| v.as_bool()) == Some(true);
        let mut features = info
            .get("features")
            .and_then(|f| f.as_array())
            .map(|f| {
                f.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_else(Vec::new);
        if !no_default {
            features.push("default".to_owned());
        }
        return Ok(Some(InstalledBpfLinker { version, features }));
    }
    Ok(None)
}

/// Runs `cmd`, inheriting stdio; fails naming the command if it cannot start or fails.
pub fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("failed to run {cmd:?}"))?;
    ensure!(st.success(), "{cmd:?} failed: {st}");
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails naming the command (and showing its stderr).
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{cmd:?} printed non-UTF-8"))
}

//! `cargo xtask dist [--no-install-test]`: the release binary (eBPF object embedded by
//! `smartproxy/build.rs`) and a Debian package built by cargo-deb, then a test that
//! installs that package on this machine and removes it again (needs root and dpkg).
//!
//! The package's contents are listed in `[package.metadata.deb]` of
//! `smartproxy/Cargo.toml`; the man pages and completions come from the binary itself
//! (`smartproxy generate`), so the CLI is defined once, in `smartproxy/src/main.rs`.
//!
//! The install test is not part of `cargo xtask test`: a release build and cargo-deb do
//! not fit CI's time budget. It refuses to run where a `smartproxy` package is already
//! installed, since it ends by purging the package.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use clap::Parser;

use crate::{
    run::{build_release_binary, cargo, workspace_root},
    toolchain::{output, status},
};

#[derive(Debug, Parser)]
pub struct Options {
    /// Build the package only; skip installing and removing it on this machine.
    #[arg(long)]
    no_install_test: bool,
}

/// The package, as `[package.metadata.deb]` names it (the crate's name).
const PACKAGE: &str = "smartproxy";
/// Paths the package installs that the test uses.
const BINARY: &str = "/usr/bin/smartproxy";
const CONFIG: &str = "/etc/smartproxy/smartproxy.toml";
/// The shells whose completions the package carries, and where each one looks.
const SHELLS: [&str; 3] = ["bash", "zsh", "fish"];
/// How long the installed proxy may take to listen, and a transfer to finish.
const DEADLINE: Duration = Duration::from_secs(20);
/// Bytes sent through the proxy per connection (echoed back and compared).
const TRANSFER_BYTES: usize = 4 << 20;

pub fn run(opts: Options) -> Result<ExitCode> {
    let root = workspace_root();
    let binary = build_release_binary(root)?;
    generate(&binary)?;
    let deb = build_package(root)?;
    println!("xtask: dist: package {}", deb.display());
    if opts.no_install_test {
        println!("xtask: dist: --no-install-test: not installed");
    } else {
        install_test(&deb)?;
        println!("xtask: dist: install test passed");
    }
    Ok(ExitCode::SUCCESS)
}

/// Man pages and completions into `<binary's dir>/dist/`, where the cargo-deb assets
/// (`target/release/dist/...`) find them.
fn generate(binary: &Path) -> Result<()> {
    let dir = binary
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", binary.display()))?
        .join("dist");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    let (man, completions) = (dir.join("man"), dir.join("completions"));
    for d in [&man, &completions] {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    status(Command::new(binary).args(["generate", "man"]).arg(&man))?;
    // Debian keeps man pages gzipped; -n leaves out the time stamp (reproducible).
    for page in fs::read_dir(&man)? {
        status(Command::new("gzip").arg("-9n").arg(page?.path()))?;
    }
    for shell in SHELLS {
        output(
            Command::new(binary)
                .args(["generate", "completions", shell])
                .arg(&completions),
        )?;
    }
    println!(
        "xtask: dist: generated man pages and {} completions in {}",
        SHELLS.join(", "),
        dir.display()
    );
    Ok(())
}

/// Installs cargo-deb when `cargo deb` does not run (and says so), then packages the
/// binary built before; returns the `.deb` it wrote.
fn build_package(root: &Path) -> Result<PathBuf> {
    let cargo = cargo();
    let version = || {
        output(Command::new(&cargo).args(["deb", "--version"]))
            .ok()
            .map(|v| v.trim().to_owned())
    };
    match version() {
        Some(v) => println!("xtask: dist: {v}"),
        None => {
            println!("xtask: dist: cargo-deb is not installed; installing it (cargo install cargo-deb --locked)");
            status(Command::new(&cargo).args(["install", "cargo-deb", "--locked"]))?;
            let v = version().ok_or_else(|| anyhow!("`cargo deb` still does not run"))?;
            println!("xtask: dist: installed {v}");
        }
    }
    // The release profile keeps debug info (for backtraces and perf); it goes into the
    // -dbgsym.ddeb package, so the binary installed on servers is stripped.
    let printed = output(Command::new(&cargo).current_dir(root).args([
        "deb",
        "--no-build",
        "--dbgsym",
        "--package",
        PACKAGE,
    ]))?;
    // cargo-deb prints the path of the package it wrote, last.
    printed
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("`cargo deb` printed no .deb path: {printed:?}"))
}

fn install_test(deb: &Path) -> Result<()> {
    // "want ok state"; nothing at all when dpkg has never heard of the package. Any
    // state but not-installed (installed, config-files, half-configured...) is someone's.
    let query = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .output()
        .context("failed to run dpkg-query")?;
    let known = String::from_utf8_lossy(&query.stdout).into_owned();
    let state = known.split_whitespace().last().unwrap_or("not-installed");
    ensure!(
        state == "not-installed",
        "a {PACKAGE} package is here already ({known}); the install test would purge it \
         (purge it first, or pass --no-install-test)"
    );
    println!("xtask: dist: install test: dpkg -i {}", deb.display());
    status(Command::new("dpkg").arg("-i").arg(deb))?;
    // Purge whatever happens, then report the test's own error first.
    let tested = exercise_installed();
    let removed = purge_and_check(tested.as_ref().ok());
    tested?;
    removed
}

/// Everything between install and removal; returns `dpkg -L` (taken before removal).
fn exercise_installed() -> Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = output(Command::new("dpkg").args(["-L", PACKAGE]))?
        .lines()
        .map(PathBuf::from)
        .collect();
    let unit = files
        .iter()
        .find(|p| p.ends_with("systemd/system/smartproxy.service"))
        .cloned()
        .ok_or_else(|| anyhow!("the package installs no smartproxy.service"))?;
    let want = [
        BINARY,
        CONFIG,
        "/usr/share/man/man1/smartproxy.1.gz",
        "/usr/share/man/man1/smartproxy-run.1.gz",
        "/usr/share/bash-completion/completions/smartproxy",
        "/usr/share/zsh/vendor-completions/_smartproxy",
        "/usr/share/fish/vendor_completions.d/smartproxy.fish",
    ];
    for path in want {
        ensure!(
            files.iter().any(|f| f == Path::new(path)),
            "the package does not install {path}"
        );
    }
    let conffiles = output(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", PACKAGE]))?;
    ensure!(
        conffiles.contains(CONFIG),
        "{CONFIG} is not a conffile: {conffiles:?}"
    );
    println!(
        "xtask: dist: install test: {} paths installed, unit {}, {CONFIG} a conffile",
        files.len(),
        unit.display()
    );

    print_run(Command::new(BINARY).args(["check", "--config", CONFIG]))?;
    // Checks the unit's syntax and that the binaries its Exec lines name exist.
    print_run(Command::new("systemd-analyze").arg("verify").arg(&unit))?;

    let unit_text =
        fs::read_to_string(&unit).with_context(|| format!("cannot read {}", unit.display()))?;
    let exec_reload = exec_reload(&unit_text)?;
    serve_and_reload(&exec_reload)?;
    Ok(files)
}

/// The `ExecReload=` command of `unit`, split into words. The unit's line uses no quotes
/// nor variables, and this parser refuses any rather than misread them.
fn exec_reload(unit: &str) -> Result<Vec<String>> {
    let line = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("ExecReload="))
        .ok_or_else(|| anyhow!("the unit has no ExecReload="))?;
    ensure!(
        !line.contains(['"', '\'', '$', '%', '\\']),
        "ExecReload={line}: quotes, variables and specifiers are not parsed here"
    );
    let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    ensure!(!words.is_empty(), "ExecReload= is empty");
    Ok(words)
}

/// Runs the installed proxy on a loopback config written over the installed one (as an
/// operator would edit it), proxies a connection, and runs the unit's `ExecReload=` for
/// an accepted, a refused and an unreadable config, proxying again after each.
fn serve_and_reload(exec_reload: &[String]) -> Result<()> {
    let dir = TempDir::new()?;
    let backend = EchoBackend::start()?;
    let listen = free_port()?;
    let control = dir.0.join("control.sock");
    // SMARTPROXY_REQUIRE_EBPF=1 (as for the tests) requires the kernel path.
    let data_path = match std::env::var("SMARTPROXY_REQUIRE_EBPF").as_deref() {
        Ok("1") => "ebpf",
        _ => "auto",
    };
    let config = |extra_proxy: &str, extra_route: &str| {
        format!(
            "[proxy]\ndata_path = \"{data_path}\"\ncontrol_socket = \"{}\"\n{extra_proxy}\n\
             [lifecycle]\ngrace_period = \"1s\"\n\n\
             [[route]]\nname = \"echo\"\nlisten = \"{listen}\"\ntargets = [\"{}\"]\n{extra_route}\n",
            control.display(),
            backend.addr
        )
    };
    write(CONFIG, &config("", ""))?;
    let mut proxy = Proxy::start(&dir.0)?;
    proxy.wait_listening(listen)?;

    let path = transfer(listen, Some(&control))?;
    println!("xtask: dist: install test: {TRANSFER_BYTES} bytes echoed through {listen}, data path {path}");

    let mut reload = |expect: i32, what: &str| -> Result<()> {
        let out = Command::new(&exec_reload[0])
            .args(&exec_reload[1..])
            .output()
            .with_context(|| format!("failed to run ExecReload= {exec_reload:?}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "xtask: dist: install test: ExecReload ({what}): exit {:?}: {}",
            out.status.code(),
            text.trim()
        );
        ensure!(
            out.status.code() == Some(expect),
            "ExecReload= ({what}) exited {}, expected {expect}",
            out.status
        );
        proxy.still_running()?;
        transfer(listen, None)?;
        Ok(())
    };
    write(CONFIG, &config("", "connect_timeout = \"3s\""))?;
    reload(0, "a changed route")?;
    // A restart-only key: the proxy refuses, and the running configuration stays.
    write(CONFIG, &config("max_queued_bytes = 1048576", ""))?;
    reload(1, "refused: max_queued_bytes changed")?;
    write(CONFIG, "[proxy\n")?;
    reload(2, "a file that does not load")?;
    write(CONFIG, &config("", ""))?;
    reload(0, "the first config again")?;
    proxy.stop()
}

/// `dpkg -P`, then no file of `files` (the package's `dpkg -L`) may remain.
fn purge_and_check(files: Option<&Vec<PathBuf>>) -> Result<()> {
    println!("xtask: dist: install test: dpkg -P {PACKAGE}");
    status(Command::new("dpkg").args(["-P", PACKAGE]))?;
    let Some(files) = files else {
        return Ok(());
    };
    // Directories shared with other packages (/usr/bin) stay; the package's own go.
    let own_dirs = ["/etc/smartproxy", "/usr/share/doc/smartproxy"];
    let left: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.symlink_metadata().is_ok())
        .filter(|p| !p.is_dir() || own_dirs.iter().any(|d| p == &Path::new(d)))
        .collect();
    ensure!(left.is_empty(), "left behind after dpkg -P: {left:?}");
    let mask = Path::new("/etc/systemd/system/smartproxy.service");
    ensure!(
        mask.symlink_metadata().is_err(),
        "{} left behind after dpkg -P",
        mask.display()
    );
    println!(
        "xtask: dist: install test: purged; none of the {} installed paths is left",
        files.len()
    );
    Ok(())
}

/// Runs `cmd`, prints what it printed, fails unless it exits 0.
fn print_run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to run {cmd:?}"))?;
    println!(
        "xtask: dist: install test: {cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{cmd:?} failed: {}", out.status);
    Ok(())
}

fn write(path: &str, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {path}"))
}

/// A directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("smartproxy-dist-{}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The installed binary, running `run --config CONFIG`; its output goes to a log file.
struct Proxy {
    child: Child,
    log: PathBuf,
}

impl Proxy {
    fn start(dir: &Path) -> Result<Self> {
        let log = dir.join("proxy.log");
        let file = fs::File::create(&log)?;
        let child = Command::new(BINARY)
            .args(["run", "--config", CONFIG])
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {BINARY}"))?;
        Ok(Self { child, log })
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn still_running(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("the proxy exited ({st}):\n{}", self.log());
        }
        Ok(())
    }

    fn wait_listening(&mut self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + DEADLINE;
        while !self.log().contains("smartproxy: ready") {
            self.still_running()?;
            ensure!(
                Instant::now() < deadline,
                "the proxy did not become ready on {addr}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// SIGTERM, and it must exit 0 within the deadline.
    fn stop(mut self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill with a child's pid and a signal number.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(st) = self.child.try_wait()? {
                ensure!(
                    st.success(),
                    "the proxy exited {st} on SIGTERM:\n{}",
                    self.log()
                );
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "the proxy ignored SIGTERM");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Only when `stop` did not reap it (a failed test): do not leave it running.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loopback backend that echoes every byte of every connection.
struct EchoBackend {
    addr: SocketAddr,
}

impl EchoBackend {
    fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                thread::spawn(move || {
                    let mut conn = conn;
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) if conn.write_all(&buf[..n]).is_err() => break,
                            Ok(_) => {}
                        }
                    }
                    let _ = conn.shutdown(Shutdown::Write);
                });
            }
        });
        Ok(Self { addr })
    }
}

fn free_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Sends [`TRANSFER_BYTES`] through the proxy at `listen`, half-closes, and checks that
/// exactly those bytes come back. With `control`, asks the proxy which data path the
/// connection took while it is open (`smartproxy connections --json`) and returns it.
fn transfer(listen: SocketAddr, control: Option<&Path>) -> Result<String> {
    let mut client = TcpStream::connect_timeout(&listen, DEADLINE)?;
    client.set_read_timeout(Some(DEADLINE))?;
    let sent: Vec<u8> = (0..TRANSFER_BYTES)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    // A first round trip: the connection is routed and (ebpf) spliced once it answers.
    client.write_all(&sent[..1])?;
    let mut first = [0u8; 1];
    client.read_exact(&mut first)?;
    ensure!(first[0] == sent[0], "the first byte came back changed");
    let path = match control {
        Some(control) => {
            let json = output(
                Command::new(BINARY)
                    .args(["connections", "--json", "--control"])
                    .arg(control),
            )?;
            let rows: serde_json::Value = serde_json::from_str(&json)?;
            rows.get(0)
                .and_then(|r| r.get("data_path"))
                .and_then(|p| p.as_str())
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("`connections --json` shows no data path: {json}"))?
        }
        None => String::new(),
    };
    let mut writer = client.try_clone()?;
    let rest = sent[1..].to_vec();
    let sender = thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&rest)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut received = Vec::with_capacity(TRANSFER_BYTES);
    received.extend_from_slice(&first);
    client
        .read_to_end(&mut received)
        .context("reading the echo")?;
    sender
        .join()
        .map_err(|_| anyhow!("the sending thread panicked"))??;
    ensure!(
        received == sent,
        "the echo differs: {} bytes back of {}, first difference at {:?}",
        received.len(),
        sent.len(),
        received.iter().zip(&sent).position(|(a, b)| a != b)
    );
    Ok(path)
}

//! The one rule for a test whose eBPF part cannot run here.

/// The environment variable that turns a skip into a failure (CI machines that can load
/// eBPF set it, so that a broken load cannot pass as a skip).
const REQUIRE: &str = "SMARTPROXY_REQUIRE_EBPF";

/// Runs `load` (the probe `smartproxy::datapath::probe_ebpf`, or a load of the kernel
/// part itself) and returns what it loaded. Where it fails, prints a loud skip line naming
/// `what` is skipped and returns `None`, or panics instead with
/// `SMARTPROXY_REQUIRE_EBPF=1`. The kernel part spawns its ring-buffer reader on a tokio
/// runtime: a caller outside one gets a runtime for the probe alone.
pub fn ebpf_or_skip<T>(what: &str, load: impl FnOnce() -> Result<T, String>) -> Option<T> {
    let loaded = match tokio::runtime::Handle::try_current() {
        Ok(_) => load(),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(async { load() }),
    };
    match loaded {
        Ok(loaded) => Some(loaded),
        Err(why) => {
            if std::env::var(REQUIRE).as_deref() == Ok("1") {
                panic!("{REQUIRE}=1 but the eBPF data path cannot load: {why}");
            }
            eprintln!("SKIPPING {what}: the eBPF data path cannot load: {why}");
            None
        }
    }
}

//! The maps pinned in bpffs, so that they outlive the process: a successor started by
//! `smartproxy upgrade` opens them ([`Pins::Reuse`]) and the kernel keeps redirecting the
//! sockets spliced by its predecessor the whole time.
//!
//! Layout: `<bpffs root>/smartproxy/<instance>/layout-<LAYOUT_VERSION>/<MAP>`, where
//! `<instance>` is a hash of the control socket path ([`pin_dir`]) and
//! [`LAYOUT_VERSION`] the version of the shared structs (`smartproxy-common`). aya opens a
//! pinned map without comparing it with the object's definition, so before a reuse every
//! map is checked here against what this binary expects ([`expected_maps`]).

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::maps::{Map, MapData, MapInfo, MapType};
use smartproxy_common::{
    Control, Flow, LAYOUT_VERSION, MAP_CONTROL, MAP_EVENTS, MAP_EVENTS_LOST, MAP_FLOWS,
    MAP_SOCKETS, MAP_TARGETS,
};

use super::error::EbpfError;

/// `statfs` `f_type` of a bpffs mount (`include/uapi/linux/magic.h`).
pub const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// Where bpffs is mounted by convention, the default of `proxy.ebpf_pin_root`.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf";

/// Whether and how [`Kernel::load_pinned`](super::Kernel::load_pinned) pins the maps. The
/// path is the instance's directory ([`pin_dir`]), inside a bpffs mount ([`ensure_bpffs`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pins {
    /// A normal start: whatever an earlier process of this instance left there (a SIGKILL
    /// skips the removal at stop) is removed, then new maps are created and pinned.
    Fresh(PathBuf),
    /// A successor: the maps pinned there by the running predecessor are checked and
    /// reused, and this process's programs are loaded against them.
    Reuse(PathBuf),
}

impl Pins {
    /// The instance's pin directory.
    pub fn dir(&self) -> &Path {
        match self {
            Pins::Fresh(dir) | Pins::Reuse(dir) => dir,
        }
    }
}

/// The pin directory of the proxy whose control socket is `control_socket`:
/// `<bpffs_root>/smartproxy/<16 hex digits>`. The control socket path is unique per running
/// proxy, and the hash keeps the name short whatever the path. The path is made absolute
/// against the current directory (no symlinks resolved, nothing read), so a successor,
/// which inherits the directory, finds the same pins; it must use its predecessor's
/// control socket path, not a new one from a changed config.
///
/// The hash is FNV-1a, written out here: a successor may be a binary built by another
/// compiler, and std's hasher promises no stable output across versions.
pub fn pin_dir(bpffs_root: &Path, control_socket: &Path) -> PathBuf {
    let absolute =
        std::path::absolute(control_socket).unwrap_or_else(|_| control_socket.to_path_buf());
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in absolute.as_os_str().as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    bpffs_root.join("smartproxy").join(format!("{hash:016x}"))
}

/// Makes sure `root` is a bpffs mount: if it is not (or does not exist), creates the
/// directory and mounts a bpffs instance there that others may traverse but not list
/// (`mode=0711`): a successor running as `[proxy] user` opens its pins, which are its
/// own, through it (`privileges::drop_to` gives them to that user). Mounting
/// needs CAP_SYS_ADMIN: call it at start, before the privileges are dropped.
pub fn ensure_bpffs(root: &Path) -> Result<(), EbpfError> {
    if is_bpffs(root)? {
        return Ok(());
    }
    let bpffs_error = |step, source| EbpfError::Bpffs {
        step,
        path: root.to_path_buf(),
        source,
    };
    fs::create_dir_all(root).map_err(|e| bpffs_error("create", e))?;
    let target = CString::new(root.as_os_str().as_bytes())
        .map_err(|e| bpffs_error("mount (path has a NUL byte)", io::Error::other(e)))?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=0711".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(bpffs_error("mount bpffs on", io::Error::last_os_error()));
    }
    if !is_bpffs(root)? {
        return Err(bpffs_error(
            "check the mount of",
            io::Error::other("still not a bpffs after mount(2) succeeded"),
        ));
    }
    tracing::info!(path = %root.display(), "mounted bpffs");
    Ok(())
}

/// Whether `path` lies on a bpffs; `false` if it does not exist.
pub fn is_bpffs(path: &Path) -> Result<bool, EbpfError> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|e| EbpfError::Bpffs {
        step: "statfs",
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: a NUL-terminated path and a buffer of the struct's size for the kernel to fill.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::NotFound {
            return Ok(false);
        }
        return Err(EbpfError::Bpffs {
            step: "statfs",
            path: path.to_path_buf(),
            source: err,
        });
    }
    // SAFETY: statfs succeeded and filled the struct.
    let stat = unsafe { stat.assume_init() };
    // f_type's integer type differs between architectures; the magic fits in 32 bits.
    Ok(stat.f_type as u32 == BPF_FS_MAGIC)
}

/// The directory the maps are pinned in: one per layout version, so that a binary of
/// another version finds no pins of its own instead of maps it would misread.
pub(super) fn layout_dir(dir: &Path) -> PathBuf {
    dir.join(format!("layout-{LAYOUT_VERSION}"))
}

/// One map as this binary creates it: what a pinned map must match to be reused.
#[derive(Clone, Copy, Debug)]
pub(super) struct ExpectedMap {
    pub(super) name: &'static str,
    kind: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

/// Every map of the object, with the sizes `Kernel::load` gives them. Checked against
/// the loaded maps on every load, pinned or not, so that this table cannot drift from
/// `smartproxy-ebpf/src/main.rs` unnoticed.
pub(super) fn expected_maps(ring_buffer_bytes: u32, max_sockets: u32) -> [ExpectedMap; 6] {
    let size = |bytes: usize| bytes as u32;
    let socket_map = |name| ExpectedMap {
        name,
        kind: MapType::SockHash,
        key_size: size(size_of::<u64>()),
        // aya-ebpf's SockHash declares a u32 value (the fd userspace inserts).
        value_size: size(size_of::<u32>()),
        max_entries: max_sockets,
        flags: 0,
    };
    [
        socket_map(MAP_TARGETS),
        socket_map(MAP_SOCKETS),
        ExpectedMap {
            name: MAP_FLOWS,
            kind: MapType::Hash,
            key_size: size(size_of::<u64>()),
            value_size: size(size_of::<Flow>()),
            max_entries: max_sockets,
            flags: 0,
        },
        ExpectedMap {
            name: MAP_CONTROL,
            kind: MapType::Hash,
            key_size: size(size_of::<u64>()),
            value_size: size(size_of::<Control>()),
            max_entries: max_sockets,
            flags: 0,
        },
        ExpectedMap {
            name: MAP_EVENTS,
            kind: MapType::RingBuf,
            key_size: 0,
            value_size: 0,
            max_entries: ring_buffer_bytes,
            flags: 0,
        },
        ExpectedMap {
            name: MAP_EVENTS_LOST,
            kind: MapType::PerCpuArray,
            key_size: size(size_of::<u32>()),
            value_size: size(size_of::<u64>()),
            max_entries: 1,
            flags: 0,
        },
    ]
}

impl ExpectedMap {
    /// Compares a map's kernel info with this expectation; `path` is where it was found.
    pub(super) fn check(&self, info: &MapInfo, path: &Path) -> Result<(), EbpfError> {
        let mismatch = |what: &'static str, found: String, expected: String| {
            Err(EbpfError::PinnedMapMismatch {
                map: self.name,
                path: path.to_path_buf(),
                what,
                found,
                expected,
            })
        };
        match info.map_type() {
            Ok(kind) if kind == self.kind => {}
            Ok(kind) => return mismatch("type", format!("{kind:?}"), format!("{:?}", self.kind)),
            Err(e) => return mismatch("type", e.to_string(), format!("{:?}", self.kind)),
        }
        let fields = [
            ("key size", info.key_size(), self.key_size),
            ("value size", info.value_size(), self.value_size),
            ("max_entries", info.max_entries(), self.max_entries),
            ("flags", info.map_flags(), self.flags),
        ];
        for (what, found, expected) in fields {
            if found != expected {
                return mismatch(what, found.to_string(), expected.to_string());
            }
        }
        Ok(())
    }
}

/// Before a reuse: opens each pin, checks it, and returns the maps' kernel ids, so that
/// the load can be checked to have used exactly these maps.
pub(super) fn check_pins(dir: &Path, expected: &[ExpectedMap]) -> Result<Vec<u32>, EbpfError> {
    let layout = layout_dir(dir);
    if !layout.is_dir() {
        let others = other_layouts(dir);
        return Err(EbpfError::PinsMissing {
            path: layout,
            found: if others.is_empty() {
                "nothing".to_owned()
            } else {
                others.join(", ")
            },
        });
    }
    expected
        .iter()
        .map(|map| {
            let path = layout.join(map.name);
            let data = MapData::from_pin(&path).map_err(|source| EbpfError::Pin {
                map: map.name,
                step: "open",
                path: path.clone(),
                source: Box::new(source),
            })?;
            let info = data.info().map_err(|source| EbpfError::Pin {
                map: map.name,
                step: "read the info of",
                path: path.clone(),
                source: Box::new(source),
            })?;
            map.check(&info, &path)?;
            Ok(info.id())
        })
        .collect()
}

/// The `layout-*` entries of an instance directory (a predecessor of another version).
fn other_layouts(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("layout-"))
        .collect();
    names.sort();
    names
}

/// Before a fresh start: removes whatever is in the instance directory, and creates it
/// (and its layout directory) anew.
pub(super) fn clear(dir: &Path) -> Result<(), EbpfError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => tracing::warn!(
            path = %dir.display(),
            "removed stale eBPF map pins (left by a proxy that did not stop normally)"
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(EbpfError::PinDir {
                step: "remove the stale pins in",
                path: dir.to_path_buf(),
                source,
            })
        }
    }
    let layout = layout_dir(dir);
    fs::create_dir_all(&layout).map_err(|source| EbpfError::PinDir {
        step: "create",
        path: layout,
        source,
    })
}

/// At a normal stop: removes the instance directory, and the `smartproxy` directory above
/// it once no other instance uses it. The maps live on as long as a program or an fd
/// (a successor's) still holds them.
pub(super) fn remove(dir: &Path) {
    match fs::remove_dir_all(dir) {
        Ok(()) => tracing::debug!(path = %dir.display(), "removed the eBPF map pins"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %dir.display(), error = %e, "removing the eBPF map pins failed")
        }
    }
    if let Some(parent) = dir.parent() {
        // Fails (ENOTEMPTY) while another instance has pins there: nothing to do then.
        let _ = fs::remove_dir(parent);
    }
}

/// The map data behind the map types this object uses.
pub(super) fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::SockHash(data) | Map::HashMap(data) | Map::RingBuf(data) | Map::PerCpuArray(data) => {
            Some(data)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_dirs_are_per_control_socket_and_short() {
        let root = Path::new("/sys/fs/bpf");
        let a = pin_dir(root, Path::new("/run/smartproxy/control.sock"));
        let b = pin_dir(root, Path::new("/run/smartproxy/other.sock"));
        assert_ne!(a, b);
        assert_eq!(a, pin_dir(root, Path::new("/run/smartproxy/control.sock")));
        assert!(a.starts_with("/sys/fs/bpf/smartproxy"));
        let name = a.file_name().unwrap().to_str().unwrap();
        assert_eq!(name.len(), 16, "{name}");
        assert!(name.bytes().all(|b| b.is_ascii_hexdigit()), "{name}");
        // Relative paths are taken against the current directory, as the successor
        // inherits it.
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            pin_dir(root, Path::new("control.sock")),
            pin_dir(root, &cwd.join("control.sock"))
        );
    }
}

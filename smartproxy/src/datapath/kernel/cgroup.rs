//! The cgroup v2 the sock_ops program is attached to, found from `/proc/self/mountinfo`
//! and `/proc/self/cgroup`.

use std::{fs, io, path::PathBuf};

use super::error::EbpfError;

/// The cgroup v2 the sock_ops program is attached to: this process's own.
///
/// The mount point comes from `/proc/self/mountinfo` (type `cgroup2`), the path from the
/// `0::` line of `/proc/self/cgroup`. If the process sits in the root cgroup, it first
/// creates `<mount>/smartproxy` and moves itself there: attached to the root, the program
/// would run for every TCP socket of the host (measured there: `docs/kernel-notes.md#state-events`), and each of
/// them would pay for a state-change callback and a map lookup. Sockets keep the cgroup they
/// were created in (accepted sockets: their listener's), so sockets and listeners created
/// before that move are not covered; create them after the first `Kernel::load`, or call
/// this function first.
pub fn proxy_cgroup() -> Result<PathBuf, EbpfError> {
    let mountinfo = read_proc("/proc/self/mountinfo")?;
    let mount = cgroup2_mount(&mountinfo).ok_or_else(|| EbpfError::Cgroup {
        step: "find a cgroup2 mount in",
        path: "/proc/self/mountinfo".into(),
        source: io::Error::new(io::ErrorKind::NotFound, "no cgroup2 file system is mounted"),
    })?;
    let cgroups = read_proc("/proc/self/cgroup")?;
    let own = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| EbpfError::Cgroup {
            step: "find the \"0::\" line in",
            path: "/proc/self/cgroup".into(),
            source: io::Error::new(io::ErrorKind::NotFound, "process has no cgroup v2"),
        })?;
    let own = own.trim().trim_start_matches('/');
    if !own.is_empty() {
        return Ok(mount.join(own));
    }
    let dir = mount.join("smartproxy");
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(EbpfError::Cgroup {
                step: "create",
                path: dir,
                source,
            })
        }
    }
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string()).map_err(|source| EbpfError::Cgroup {
        step: "move this process into",
        path: procs,
        source,
    })?;
    tracing::info!(cgroup = %dir.display(), "moved out of the root cgroup so sock_ops only sees the proxy's sockets");
    Ok(dir)
}

fn read_proc(path: &str) -> Result<String, EbpfError> {
    fs::read_to_string(path).map_err(|source| EbpfError::Cgroup {
        step: "read",
        path: path.into(),
        source,
    })
}

/// Mount point of the first cgroup2 file system in a mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (fields, fs_fields) = line.split_once(" - ")?;
        if fs_fields.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mount_point = fields.split(' ').nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_among_v1_mounts() {
        let mountinfo = "\
25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
36 25 0:31 / /sys/fs/cgroup/uni\\040fied rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/uni fied"))
        );
        assert_eq!(
            cgroup2_mount("26 25 0:24 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }
}

//! The binary an upgrade starts: it runs with the proxy's privileges, so only a file that
//! nobody but root or the proxy's own user can change is accepted, and what was started is
//! logged by its SHA-256.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Why a binary is not started.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path} is not executable")]
    NotExecutable { path: PathBuf },
    #[error(
        "{path} is owned by uid {owner}: only root's or the proxy's own (uid {proxy}) binaries are started"
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        proxy: u32,
    },
    #[error("{path} is writable by its group or by others (mode {mode:o}): refused")]
    Writable { path: PathBuf, mode: u32 },
}

/// A binary that passed the checks, open: the successor is started from this very file,
/// not from whatever the path names by then.
#[derive(Debug)]
pub struct CheckedBinary {
    pub path: PathBuf,
    pub file: File,
    pub sha256: String,
}

/// Opens `path` and checks that it is a regular executable file that only root or
/// `proxy_uid` can write (its directory is the operator's to protect), then hashes it.
pub fn check(path: &Path, proxy_uid: u32) -> Result<CheckedBinary, BinaryError> {
    let unreadable = |source| BinaryError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    let path = path.to_owned();
    if !meta.is_file() {
        return Err(BinaryError::NotAFile { path });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o111 == 0 {
        return Err(BinaryError::NotExecutable { path });
    }
    if meta.uid() != 0 && meta.uid() != proxy_uid {
        return Err(BinaryError::Owner {
            path,
            owner: meta.uid(),
            proxy: proxy_uid,
        });
    }
    if mode & 0o022 != 0 {
        return Err(BinaryError::Writable { path, mode });
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let read = file
            .read(&mut buf)
            .map_err(|source| BinaryError::Unreadable {
                path: path.clone(),
                source,
            })?;
        if read == 0 {
            break;
        }
        hasher.update(&buf[..read]);
    }
    let sha256 = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(CheckedBinary { path, file, sha256 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file_with_mode(dir: &Path, mode: u32) -> PathBuf {
        let path = dir.join(format!("bin-{mode:o}"));
        std::fs::write(&path, b"abc").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn only_unwritable_executables_of_root_or_the_proxy_user_pass() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        let good = check(&file_with_mode(dir.path(), 0o755), me).expect("0755 passes");
        assert_eq!(
            good.sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "the SHA-256 of \"abc\""
        );
        assert!(matches!(
            check(&file_with_mode(dir.path(), 0o775), me),
            Err(BinaryError::Writable { mode: 0o775, .. })
        ));
        assert!(matches!(
            check(&file_with_mode(dir.path(), 0o757), me),
            Err(BinaryError::Writable { .. })
        ));
        assert!(matches!(
            check(&file_with_mode(dir.path(), 0o644), me),
            Err(BinaryError::NotExecutable { .. })
        ));
        assert!(matches!(
            check(dir.path(), me),
            Err(BinaryError::NotAFile { .. })
        ));
        assert!(matches!(
            check(&dir.path().join("missing"), me),
            Err(BinaryError::Unreadable { .. })
        ));
        let other = file_with_mode(dir.path(), 0o700);
        std::os::unix::fs::chown(&other, Some(4242), None).unwrap();
        let err = check(&other, me).expect_err("owned by another user");
        assert!(
            matches!(err, BinaryError::Owner { owner: 4242, .. }),
            "{err}"
        );
    }
}

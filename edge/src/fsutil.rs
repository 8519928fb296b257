//! Durable whole-file replacement, written once for every state file Hearth keeps (agent
//! state, journals, the hub's outbox, keys, certificates, password files).
//!
//! [`write_atomic`] writes a temporary file beside the target, fsyncs it, renames it over the
//! target and fsyncs the directory: after a crash the file is either the old one or the new
//! one, never half of either. The mode is set on the temporary file before any byte is
//! written, so a secret is never readable by others, not even for an instant.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// Mode for files only the owner may read (keys, tokens, passwords, device state).
pub const PRIVATE: u32 = 0o600;
/// Mode for files others may read (certificates, public keys, models).
pub const SHARED: u32 = 0o644;

/// Replaces `path` with `bytes` atomically and durably, with permission bits `mode` (Unix;
/// ignored elsewhere). The error names the file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path(path);
    let named = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("cannot {what} {}: {e}", path.display()))
    };
    let result = (|| {
        let mut o = OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, mode);
        let mut f = o.open(&tmp).map_err(|e| named("write", e))?;
        // `mode` applies only when the file is created: a stale temporary keeps its own.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            f.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| named("restrict", e))?;
        }
        #[cfg(not(unix))]
        let _ = mode;
        f.write_all(bytes).map_err(|e| named("write", e))?;
        f.sync_all().map_err(|e| named("sync", e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| named("replace", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // The rename is durable once the directory entry is: best effort (not every file
    // system lets a directory be opened for sync).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// `.<name>.tmp<pid>` in the target's directory: same file system (so the rename is atomic),
/// hidden, and distinct per process.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let dir = path.parent().unwrap_or(Path::new(""));
    dir.join(format!(".{name}.tmp{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        std::fs::write(&p, b"old").unwrap();
        write_atomic(&p, b"new", PRIVATE).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the target remains");
    }

    #[cfg(unix)]
    #[test]
    fn sets_the_mode_even_over_a_stale_temporary() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key.pem");
        // A temporary left world-readable by a crash must not pass its mode on.
        let stale = temp_path(&p);
        std::fs::write(&stale, b"x").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_atomic(&p, b"secret", PRIVATE).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        write_atomic(&p, b"cert", SHARED).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }

    #[test]
    fn error_names_the_file_and_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        // The target is a non-empty directory: the rename fails.
        let p = d.path().join("taken");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("x"), b"x").unwrap();
        let e = write_atomic(&p, b"new", SHARED).unwrap_err();
        assert!(e.to_string().contains("taken"), "{e}");
        assert!(!temp_path(&p).exists(), "the temporary is removed");
    }
}

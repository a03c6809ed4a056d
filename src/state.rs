//! The program-owned state directory: atomic, crash-safe writes of the files tollgate itself
//! manages — the certificate inventory (`certs.json`), the master key file with the secrets
//! sealed under it (`master-key.json`), the device key and the sealed partition passwords —
//! and the lock that serialises read-modify-write cycles across processes.
//!
//! Every write goes temp file → fsync → rename → fsync(dir), so a crash at any instant leaves
//! either the old or the new file, never a torn one. Files holding secrets are created 0600.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Errors reading or writing the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// Who may read a state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// World-readable (certificates, inventories without secrets): 0644.
    Public,
    /// Secrets or anything derived from them: 0600.
    Secret,
}

/// A handle on the state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (and creates, 0700) the state directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StateError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|source| StateError::Io { path: root.clone(), source })?;
        set_mode(&root, 0o700)?;
        Ok(Self { root })
    }

    /// The state directory at `root` as it is, for reading only: nothing is created
    /// (`run --check`). A file it does not hold reads as absent.
    pub fn existing(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of a file inside the state directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Reads a file, `None` when it does not exist yet.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.path(name);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Takes the state directory's exclusive lock, so concurrent CLI calls cannot interleave
    /// their read-modify-write cycles. Released when the guard drops.
    pub fn lock(&self) -> Result<StateLock, StateError> {
        let path = self.path(".lock");
        let io_err = |source| StateError::Io { path: path.clone(), source };
        let file =
            OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(&path).map_err(io_err)?;
        file.lock().map_err(io_err)?;
        Ok(StateLock { _file: file })
    }

    /// Replaces a file atomically: write a temp file, fsync, rename over, fsync the directory.
    pub fn write_atomic(&self, name: &str, bytes: &[u8], mode: Mode) -> Result<(), StateError> {
        write_atomic(&self.path(name), bytes, mode)
    }
}

/// Holds the state directory's lock (see `StateDir::lock`).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Replaces `path` atomically with `bytes` (temp → fsync → rename → fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: Mode) -> Result<(), StateError> {
    let io_err = |source| StateError::Io { path: path.to_path_buf(), source };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| StateError::Corrupt { path: path.to_path_buf(), reason: "not a file name".into() })?;
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let perm = match mode {
        Mode::Public => 0o644,
        Mode::Secret => 0o600,
    };
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(perm).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), StateError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|source| StateError::Io { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path().join("state")).unwrap();
        assert_eq!(state.read("a.json").unwrap(), None);
        state.write_atomic("a.json", b"one", Mode::Secret).unwrap();
        state.write_atomic("a.json", b"two", Mode::Secret).unwrap();
        assert_eq!(state.read("a.json").unwrap().unwrap(), b"two");
        let mode = fs::metadata(state.path("a.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = fs::read_dir(state.root()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
    }
}

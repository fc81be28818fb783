//! Crash-safe file writes: write to a temporary sibling, fsync, rename, fsync the directory (and,
//! for caches checked when read, the same without the fsyncs).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Writes `bytes` to `path` atomically: readers see the old file or the new one, never a mix,
/// and the new content is on disk when this returns. `mode` sets Unix permissions (0o600 for keys).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    replace(path, mode, true, |_, file| file.write_all(bytes))
}

/// Replaces `path` with the file that `write` makes at the temporary path it is given (created
/// beforehand with `mode`), by a rename: a reader sees the old file or the whole new one, after a
/// crash of the process too. Nothing is fsync'd, so after a power loss the file may be old or
/// torn: this is for caches that are checked when read back (a client's held model and residual).
pub fn replace_unsynced(path: &Path, mode: u32, write: impl FnOnce(&Path) -> io::Result<()>) -> io::Result<()> {
    replace(path, mode, false, |tmp, _| write(tmp))
}

/// Replaces `path` by a temporary sibling, created with `mode`, that `write` fills (through the
/// open file or by its path), then renamed over it; `durable` fsyncs the file before the rename
/// and the directory after. The temporary file is removed if anything fails.
fn replace(
    path: &Path,
    mode: u32,
    durable: bool,
    write: impl FnOnce(&Path, &mut File) -> io::Result<()>,
) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let file_name =
        path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}{TEMPORARY}{}", file_name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut file = open_with_mode(&tmp, mode)?;
        write(&tmp, &mut file)?;
        if durable {
            file.sync_all()?;
        }
        drop(file);
        fs::rename(&tmp, path)?;
        if durable {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// What names a temporary sibling of [`replace`]: `.NAME.tmp-PID`.
const TEMPORARY: &str = ".tmp-";

/// Removes the temporary files in `dir` that writes a crash cut short left behind, for a
/// directory only this process writes to (call it before it writes there); returns how many.
pub fn remove_temporaries(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.contains(TEMPORARY) {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!("could not remove {}: {e}", entry.path().display()),
            }
        }
    }
    removed
}

/// Removes `path`; one that does not exist is no error.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Appends one line to `path` and fsyncs it.
pub fn append_line(path: &Path, line: &str) -> io::Result<()> {
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(line.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

/// Fsyncs a directory so that a rename inside it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn open_with_mode(path: &Path, mode: u32) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let file = options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_atomic(&path, b"first", 0o600).unwrap();
        write_atomic(&path, b"second", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }
}

/// Why a state directory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "{dir} is in use by process {pid} ({what}); stop that process first, or use another --state-dir",
        dir = dir.display(),
        pid = pid.map_or_else(|| "?".to_string(), |p| p.to_string())
    )]
    Held {
        /// The state directory.
        dir: std::path::PathBuf,
        /// The holder's pid, as it wrote it in the lock file.
        pid: Option<u32>,
        /// What holds it, e.g. `fl-coordinator serve`.
        what: String,
    },
    /// The lock file could not be created or locked.
    #[error("{}: cannot lock: {source}", path.display())]
    Io {
        /// The lock file.
        path: std::path::PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// An exclusive lock on a state directory, held until dropped (for the life of the process that
/// serves from it): a second coordinator or client on the same directory is refused at once.
/// The lock file holds the holder's pid and what it is, for the refusal message.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Name of the lock file in the directory.
    pub const FILE: &'static str = "process.lock";

    /// Takes the lock on `dir` (created if missing) for `what` (e.g. `fl-client run`), or fails
    /// at once with [`LockError::Held`] naming the holder.
    pub fn acquire(dir: &Path, what: &str) -> Result<DirLock, LockError> {
        let path = dir.join(Self::FILE);
        let io_error = |source| LockError::Io { path: path.clone(), source };
        fs::create_dir_all(dir).map_err(io_error)?;
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let text = fs::read_to_string(&path).unwrap_or_default();
                let mut words = text.split_whitespace();
                let pid = words.next().and_then(|p| p.parse().ok());
                let holder: Vec<&str> = words.collect();
                let what = if holder.is_empty() { "another process".to_string() } else { holder.join(" ") };
                return Err(LockError::Held { dir: dir.to_owned(), pid, what });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_error(e)),
        }
        file.set_len(0).map_err(io_error)?;
        file.write_all(format!("{} {what}\n", std::process::id()).as_bytes()).map_err(io_error)?;
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), "fl-client run").unwrap();
        // flock locks belong to the open file description: a second open in this process conflicts too.
        let err = DirLock::acquire(dir.path(), "fl-client run").unwrap_err().to_string();
        assert!(err.contains(&format!("process {} (fl-client run)", std::process::id())), "{err}");
        drop(first);
        DirLock::acquire(dir.path(), "fl-client run").expect("free again once dropped");
    }
}

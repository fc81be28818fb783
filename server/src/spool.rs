//! Where uploads are spooled while they arrive: files in `STATE/spool/`, written with tokio's
//! async file I/O. [`Spool`] is a trait so that tests can inject a writer that fails as a full
//! disk does (through `ServeConfig::spool`), without root and without filling a real disk.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use tokio::io::AsyncWrite;

/// The writer of one spooled upload.
pub type SpoolFile = Pin<Box<dyn AsyncWrite + Send>>;

/// A future that opens a spool file.
pub type SpoolOpen = Pin<Box<dyn Future<Output = std::io::Result<SpoolFile>> + Send>>;

/// Creates the files that uploads are spooled to.
pub trait Spool: Send + Sync + std::fmt::Debug {
    /// Creates (or truncates) the spool file at `path`; its directory exists.
    fn create(&self, path: PathBuf) -> SpoolOpen;
}

/// Spools to files, with tokio's async file I/O.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileSpool;

impl Spool for FileSpool {
    fn create(&self, path: PathBuf) -> SpoolOpen {
        Box::pin(async move {
            let file = tokio::fs::File::create(path).await?;
            Ok(Box::pin(file) as SpoolFile)
        })
    }
}

/// Removes a spool file when dropped, whatever the outcome of its upload, on a blocking thread
/// when a runtime is there.
#[derive(Debug)]
pub(crate) struct RemoveOnDrop(pub(crate) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let path = std::mem::take(&mut self.0);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || remove_quietly(&path));
            }
            Err(_) => remove_quietly(&path),
        }
    }
}

fn remove_quietly(path: &std::path::Path) {
    if let Err(e) = fl_common::files::remove_if_exists(path) {
        tracing::warn!("could not remove {}: {e}", path.display());
    }
}

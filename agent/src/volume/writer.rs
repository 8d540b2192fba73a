//! Restore targets. A raw target is written to `<path>.vmbackup-partial` (sparse: zero
//! ranges are never written, so they stay holes), fsynced, and renamed into place only
//! when complete; dropped without [`RawWriter::finish`] it removes the partial file. A
//! failed restore therefore never leaves a half-written volume that looks complete.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{Error, ErrorKind, Result};

/// A raw volume being restored.
#[derive(Debug)]
pub struct RawWriter {
    file: File,
    partial: PathBuf,
    path: PathBuf,
    size: u64,
    done: bool,
}

impl RawWriter {
    /// Starts restoring a `size`-byte raw volume to `path`, which must not exist.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        if path.exists() {
            return Err(Error::new(ErrorKind::InvalidArgument, path, None, "the restore target already exists"));
        }
        let mut partial = path.as_os_str().to_owned();
        partial.push(".vmbackup-partial");
        let partial = PathBuf::from(partial);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(|e| Error::io(&partial, None, "creating the restore target", e))?;
        file.set_len(size).map_err(|e| Error::io(&partial, None, "sizing the restore target", e))?;
        Ok(Self { file, partial, path: path.to_path_buf(), size, done: false })
    }

    /// Writes guest bytes at `offset`; callable from many threads.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                &self.partial,
                Some(offset),
                format!("write of {len} bytes past the end ({})", self.size),
            ));
        }
        self.file.write_all_at(data, offset).map_err(|e| Error::io(&self.partial, Some(offset), "writing", e))
    }

    /// Flushes, and moves the complete volume into place.
    pub fn finish(mut self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.partial, None, "fsync", e))?;
        std::fs::rename(&self.partial, &self.path)
            .map_err(|e| Error::io(&self.path, None, "renaming into place", e))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(dir, None, "fsync of the directory", e))?;
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for RawWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

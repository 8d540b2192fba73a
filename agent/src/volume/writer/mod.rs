//! Restore targets: raw (sparse) and qcow2 v3. A new target is written to
//! `<path>.vmbackup-partial`, fsynced, and renamed into place (then the directory fsynced)
//! only when complete; a writer dropped without [`VolumeWriter::finish`] removes its partial
//! file. A failed restore therefore never leaves a half-written volume that looks complete.
//!
//! Data goes through a second descriptor opened with `O_DIRECT` whenever a write is
//! aligned (4 KiB in memory, offset and length): a restore streams the whole volume once,
//! and pushing it through the page cache would evict what the host's running VMs have
//! cached and make the final fsync wait for every byte at once. Unaligned writes (a
//! volume's ragged tail) and filesystems without `O_DIRECT` use the page cache.
//!
//! A *revert* replaces an existing volume: a regular file is written beside it the same way
//! and renamed over it (keeping its mode and owner), so until the very end the original is
//! untouched; a block device is written in place, zero ranges included. Either way the
//! target is refused while a running VM holds it ([`super::lock`]).

pub mod partials;
pub mod qcow2;
pub mod raw;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::lock::{Access, check_not_in_use};
use super::{Error, ErrorKind, Result, VolumeFormat};

/// A volume being restored. Writes may come from many threads at once, each covering a
/// distinct range.
pub trait VolumeWriter: Send + Sync + std::fmt::Debug {
    /// Writes guest bytes at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes `[offset, offset + len)` read as zeros. New targets already do, so this only
    /// writes when restoring in place over a block device.
    fn zero(&self, offset: u64, len: u64) -> Result<()>;
    /// Flushes and moves the complete volume into place.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Whether the target may exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A new file; an existing path is refused.
    Create,
    /// Replace an existing volume that no running VM holds.
    Revert,
}

/// Starts restoring a `size`-byte volume of `format` to `path`.
pub fn create(path: &Path, format: VolumeFormat, size: u64, mode: Mode) -> Result<Box<dyn VolumeWriter>> {
    let target = Target::open(path, mode, format)?;
    Ok(match format {
        VolumeFormat::Raw => Box::new(raw::RawWriter::new(target, size)?),
        VolumeFormat::Qcow2 => Box::new(qcow2::Qcow2Writer::new(target, size)?),
    })
}

/// The file a writer fills, and how it becomes the volume.
#[derive(Debug)]
pub struct Target {
    /// Open for writing.
    pub file: File,
    /// The same file opened with `O_DIRECT`, where the filesystem allows it.
    direct: Option<File>,
    /// The file being written (the partial file, or the device itself).
    pub written: PathBuf,
    /// Where the volume ends up.
    pub path: PathBuf,
    /// Written in place (a block device): nothing to rename, nothing to remove.
    pub in_place: bool,
    done: bool,
}

impl Target {
    fn open(path: &Path, mode: Mode, format: VolumeFormat) -> Result<Self> {
        let existing = std::fs::metadata(path).ok();
        match (mode, &existing) {
            (Mode::Create, Some(_)) => {
                return Err(Error::new(ErrorKind::InvalidArgument, path, None, "the restore target already exists"));
            }
            (Mode::Revert, None) => {
                return Err(Error::new(ErrorKind::InvalidArgument, path, None, "the volume to revert does not exist"));
            }
            _ => {}
        }
        if let Some(meta) = &existing {
            let f = File::open(path).map_err(|e| Error::io(path, None, "opening the volume to revert", e))?;
            check_not_in_use(path, &f, Access::Write)?;
            if meta.file_type().is_block_device() {
                if format != VolumeFormat::Raw {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        path,
                        None,
                        "a block device can only be restored as raw",
                    ));
                }
                let file = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| Error::io(path, None, "opening the device", e))?;
                return Ok(Self {
                    direct: open_direct(path),
                    file,
                    written: path.to_path_buf(),
                    path: path.to_path_buf(),
                    in_place: true,
                    done: false,
                });
            }
            if !meta.is_file() {
                return Err(Error::new(ErrorKind::InvalidArgument, path, None, "not a regular file or block device"));
            }
        }
        let mut partial = path.as_os_str().to_owned();
        partial.push(partials::SUFFIX);
        let partial = PathBuf::from(partial);
        partials::begin(&partial).map_err(|e| Error::io(&partial, None, "recording the partial file", e))?;
        // Never through a symlink planted where the partial file goes: it could lead out of
        // the volume roots the target was checked against.
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create(true)
            .truncate(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&partial)
            .map_err(|e| {
                partials::end(&partial);
                Error::io(&partial, None, "creating the restore target", e)
            })?;
        if let Some(meta) = &existing {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(|e| Error::io(&partial, None, "copying the volume's mode", e))?;
            // Keeping the owner needs privilege; an unprivileged agent keeps its own.
            let _ = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()));
        }
        Ok(Self {
            direct: open_direct(&partial),
            file,
            written: partial,
            path: path.to_path_buf(),
            in_place: false,
            done: false,
        })
    }

    /// Writes volume data at `offset`: straight to the disk when the write is aligned and
    /// the filesystem allows it, through the page cache otherwise.
    pub fn write_data(&self, data: &[u8], offset: u64) -> Result<()> {
        let aligned = data.as_ptr().addr().is_multiple_of(DIRECT_ALIGN)
            && data.len().is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(DIRECT_ALIGN as u64);
        if aligned && let Some(direct) = &self.direct {
            match direct.write_all_at(data, offset) {
                Ok(()) => return Ok(()),
                // A device with larger logical blocks refuses the alignment: use the cache.
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {}
                Err(e) => return Err(self.io(Some(offset), "writing", e)),
            }
        }
        self.file.write_all_at(data, offset).map_err(|e| self.io(Some(offset), "writing", e))
    }

    /// An error about the file being written.
    pub fn io(&self, offset: Option<u64>, what: &str, e: std::io::Error) -> Error {
        Error::io(&self.written, offset, what, e)
    }

    /// fsync, then rename into place and fsync the directory.
    pub fn commit(mut self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.written, None, "fsync", e))?;
        if !self.in_place {
            std::fs::rename(&self.written, &self.path)
                .map_err(|e| Error::io(&self.path, None, "renaming into place", e))?;
            partials::end(&self.written);
            if let Some(dir) = self.path.parent() {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| Error::io(dir, None, "fsync of the directory", e))?;
            }
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if !self.done && !self.in_place {
            let _ = std::fs::remove_file(&self.written);
            partials::end(&self.written);
        }
    }
}

/// Alignment of memory, offset and length for a write through the `O_DIRECT` descriptor.
pub const DIRECT_ALIGN: usize = 4096;

/// `path` opened again for direct writes; `None` where the filesystem refuses `O_DIRECT`.
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().write(true).custom_flags(nix::fcntl::OFlag::O_DIRECT.bits()).open(path).ok()
}

/// Checks that `[offset, offset + len)` lies within `size`.
pub(crate) fn check_range(target: &Target, size: u64, offset: u64, len: u64) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            &target.written,
            Some(offset),
            format!("write of {len} bytes past the end ({size})"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_where_the_partial_file_goes_is_not_followed() {
        let d = tempfile::tempdir().expect("tempdir");
        let (target, elsewhere) = (d.path().join("t.raw"), d.path().join("elsewhere"));
        std::os::unix::fs::symlink(&elsewhere, d.path().join("t.raw.vmbackup-partial")).expect("symlink");
        assert!(create(&target, VolumeFormat::Raw, 4096, Mode::Create).is_err());
        assert!(!elsewhere.exists(), "the restore followed the symlink");
    }
}

//! Raw volumes: regular files (holes found with SEEK_DATA/SEEK_HOLE) and block devices
//! (size by seeking to the end; no hole information, so all data).

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Whence, lseek};

use super::{Error, ErrorKind, Extent, ExtentKind, Result, VolumeFormat, VolumeSource, push_extent};

/// A raw file or block device.
#[derive(Debug)]
pub struct RawVolume {
    file: File,
    path: PathBuf,
    size: u64,
    sparse: bool,
}

impl RawVolume {
    /// Opens read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, None, "opening", e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, None, "stat", e))?;
        let (size, sparse) = if meta.file_type().is_block_device() {
            let end =
                lseek(&file, 0, Whence::SeekEnd).map_err(|e| Error::io(path, None, "seeking to the end", e.into()))?;
            (u64::try_from(end).unwrap_or(0), false)
        } else {
            (meta.len(), true)
        };
        Ok(Self { file, path: path.to_path_buf(), size, sparse })
    }

    /// Next data offset at or after `from` (None: only a hole remains).
    fn seek(&self, from: u64, whence: Whence) -> Result<Option<u64>> {
        let off = i64::try_from(from)
            .map_err(|_| Error::new(ErrorKind::InvalidArgument, &self.path, Some(from), "offset too large"))?;
        match lseek(&self.file, off, whence) {
            Ok(o) => Ok(u64::try_from(o).ok()),
            Err(nix::errno::Errno::ENXIO) => Ok(None),
            Err(e) => Err(Error::io(&self.path, Some(from), "SEEK_DATA/SEEK_HOLE", e.into())),
        }
    }
}

impl VolumeSource for RawVolume {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> VolumeFormat {
        VolumeFormat::Raw
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        if !self.sparse {
            push_extent(&mut out, Extent { offset, len: end.saturating_sub(offset), kind: ExtentKind::Data });
            return Ok(out);
        }
        let mut pos = offset;
        while pos < end {
            let data = self.seek(pos, Whence::SeekData)?.unwrap_or(end).min(end);
            push_extent(&mut out, Extent { offset: pos, len: data - pos, kind: ExtentKind::Unallocated });
            if data >= end {
                break;
            }
            let hole = self.seek(data, Whence::SeekHole)?.unwrap_or(end).min(end);
            push_extent(&mut out, Extent { offset: data, len: hole - data, kind: ExtentKind::Data });
            pos = hole;
        }
        Ok(out)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                &self.path,
                Some(offset),
                format!("read of {len} bytes past the end ({})", self.size),
            ));
        }
        self.file.read_exact_at(buf, offset).map_err(|e| Error::io(&self.path, Some(offset), "reading", e))
    }

    fn files(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }
}

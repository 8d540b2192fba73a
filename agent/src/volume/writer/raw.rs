//! The raw restore writer: data at its guest offset; zero ranges are never written so they
//! stay holes (or, over a block device, are discarded with a punched hole, which reads
//! back as zeros).

use std::os::unix::fs::FileExt;

use nix::fcntl::{FallocateFlags, fallocate};

use super::{Target, VolumeWriter, check_range};
use crate::volume::Result;

/// A raw volume being restored.
#[derive(Debug)]
pub struct RawWriter {
    target: Target,
    size: u64,
}

impl RawWriter {
    /// A writer for a `size`-byte raw volume into `target`.
    pub fn new(target: Target, size: u64) -> Result<Self> {
        if !target.in_place {
            target.file.set_len(size).map_err(|e| target.io(None, "sizing the restore target", e))?;
        }
        Ok(Self { target, size })
    }
}

impl VolumeWriter for RawWriter {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(&self.target, self.size, offset, u64::try_from(data.len()).unwrap_or(u64::MAX))?;
        self.target.write_data(data, offset)
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        check_range(&self.target, self.size, offset, len)?;
        if !self.target.in_place || len == 0 {
            return Ok(());
        }
        let (o, l) = (i64::try_from(offset).unwrap_or(i64::MAX), i64::try_from(len).unwrap_or(i64::MAX));
        match fallocate(
            &self.target.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        ) {
            Ok(()) => Ok(()),
            // Devices that cannot discard get real zeros.
            Err(_) => {
                let zeros = vec![0u8; 1 << 20];
                let mut at = offset;
                while at < offset + len {
                    let n = usize::try_from((offset + len - at).min(1 << 20)).unwrap_or(1 << 20);
                    self.target
                        .file
                        .write_all_at(&zeros[..n], at)
                        .map_err(|e| self.target.io(Some(at), "writing zeros", e))?;
                    at += u64::try_from(n).unwrap_or(0);
                }
                Ok(())
            }
        }
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.target.commit()
    }
}

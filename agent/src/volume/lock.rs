//! Is a running VM using this volume? QEMU takes open-file-description (OFD) locks on the
//! images it opens: a shared lock on byte `100 + n` for each permission `n` it holds and on
//! byte `200 + n` for each permission it refuses to share (0 consistent read, 1 write,
//! 2 write unchanged, 3 resize, 4 graph modification). A writer therefore holds byte 101.
//! Asking the kernel whether an exclusive lock *could* be taken (F_OFD_GETLK) tells us
//! without taking one, so QEMU is never disturbed.

use std::fs::File;
use std::path::Path;

use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;

use super::{Error, ErrorKind, Result};

/// First byte QEMU locks for the permissions it holds.
const PERM_BASE: i64 = 100;
/// Byte QEMU locks while it holds the write permission.
const WRITE_BYTE: i64 = PERM_BASE + 1;
/// One past the last byte QEMU's locking uses.
const LOCK_END: i64 = 300;

/// What the caller is about to do with the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read it (a backup): refused while another process may write it.
    Read,
    /// Overwrite it (a revert): refused while any QEMU has it open.
    Write,
}

/// The pid of a process holding a conflicting lock on `[start, start + len)`, if any.
fn holder(path: &Path, file: &File, start: i64, len: i64) -> Result<Option<i32>> {
    let mut fl = libc::flock {
        l_type: i16::try_from(libc::F_WRLCK).unwrap_or(1),
        l_whence: i16::try_from(libc::SEEK_SET).unwrap_or(0),
        l_start: start,
        l_len: len,
        l_pid: 0,
    };
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl))
        .map_err(|e| Error::io(path, None, "asking for QEMU's image locks (F_OFD_GETLK)", std::io::Error::from(e)))?;
    Ok((fl.l_type != i16::try_from(libc::F_UNLCK).unwrap_or(2)).then_some(fl.l_pid))
}

/// Refuses `path` (open as `file`) when a running VM holds it in a way that conflicts with
/// `access`.
pub fn check_not_in_use(path: &Path, file: &File, access: Access) -> Result<()> {
    let (start, len) = match access {
        Access::Read => (WRITE_BYTE, 1),
        Access::Write => (PERM_BASE, LOCK_END - PERM_BASE),
    };
    match holder(path, file, start, len)? {
        None => Ok(()),
        Some(pid) => {
            let who = if pid > 0 { format!(" (process {pid})") } else { String::new() };
            Err(Error::new(
                ErrorKind::InUse,
                path,
                None,
                format!("volume in use by a running VM{who}: back it up through the live path, or stop the VM"),
            ))
        }
    }
}

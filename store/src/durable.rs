//! Durable file writes: temp file + fsync + rename + fsync of the parent directory.
//!
//! A reader (or a restart after a crash at any instant) sees either the previous content or
//! the new content of the file, never a mix, and a renamed file survives power loss.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Writes `data` to `path` atomically and durably.
///
/// The temp file lives in the same directory (same filesystem, so the rename is atomic) and
/// is removed if anything fails before the rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir =
        path.parent().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent directory"))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", uuid::Uuid::new_v4().simple()));
    let guard = TempGuard(Some(&tmp));
    {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    guard.disarm();
    sync_dir(dir)
}

/// fsyncs a directory so that entries created, renamed or removed in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes the temp file on drop unless disarmed (error paths leave nothing behind).
struct TempGuard<'a>(Option<&'a Path>);

impl TempGuard<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.json");
        write_atomic(&p, b"one").expect("first write");
        write_atomic(&p, b"two").expect("second write");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).expect("list").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.json")]);
    }

    #[test]
    fn write_atomic_into_missing_directory_fails_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("missing").join("x.json");
        let err = write_atomic(&p, b"one").expect_err("must fail");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}

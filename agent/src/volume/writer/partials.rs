//! The ledger of partial restore files: while a `<target>.vmbackup-partial` is written, a
//! marker naming it lies in the agent's `run/partials` directory. A writer that finishes or
//! is dropped removes its marker with its file; a process killed mid-restore cannot, so the
//! next start removes every partial file the markers name ([`track`]) and no half-written
//! target stays beside a VM's volumes.
//!
//! The ledger is process-wide (one agent, one data directory): [`track`] sets it once at
//! start-up; before that (unit tests, tools) writers keep no markers.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static LEDGER: OnceLock<PathBuf> = OnceLock::new();

/// Suffix every partial file carries; a marker naming anything else is not acted on.
pub const SUFFIX: &str = ".vmbackup-partial";

/// Removes the partial files an earlier process left (as its markers name them), then keeps
/// markers in `dir` from now on. Returns the files removed.
pub fn track(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let mut removed = Vec::new();
    for marker in std::fs::read_dir(dir)?.flatten() {
        let named = std::fs::read(marker.path()).map(|b| PathBuf::from(std::ffi::OsStr::from_bytes(&b)));
        if let Ok(partial) = named
            && partial.as_os_str().as_bytes().ends_with(SUFFIX.as_bytes())
            && std::fs::symlink_metadata(&partial).is_ok_and(|m| m.is_file())
            && std::fs::remove_file(&partial).is_ok()
        {
            removed.push(partial);
        }
        let _ = std::fs::remove_file(marker.path());
    }
    let _ = LEDGER.set(dir.to_path_buf());
    Ok(removed)
}

fn marker(partial: &Path) -> Option<PathBuf> {
    let dir = LEDGER.get()?;
    let name = vmbackup_proto::Digest::of(partial.as_os_str().as_bytes()).to_hex();
    Some(dir.join(name))
}

/// Records `partial` before it is created (written and fsynced, so it outlives the file).
pub(super) fn begin(partial: &Path) -> std::io::Result<()> {
    let Some(m) = marker(partial) else { return Ok(()) };
    let mut f = std::fs::File::create(&m)?;
    f.write_all(partial.as_os_str().as_bytes())?;
    f.sync_all()
}

/// Forgets `partial` (renamed into place, or removed).
pub(super) fn end(partial: &Path) {
    if let Some(m) = marker(partial) {
        let _ = std::fs::remove_file(m);
    }
}

//! Volume roots: the only places where the agent (running as root) reads volumes for a
//! backup and writes restores. A session holder must not be able to make it read
//! `/etc/shadow` as a "raw volume" or restore onto `/etc/<name>`.
//!
//! A path is resolved before it is judged: the longest part of it that exists is
//! canonicalized (symlinks and `..` resolved), the missing rest is appended as it is (a `..`
//! in it, or a dangling symlink on the way, is refused). It must then lie strictly beneath
//! a root that is itself resolved the same way:
//!
//! | root | what is accepted beneath it |
//! |---|---|
//! | `roots` (directories) | volumes that are regular files or block devices (or do not exist yet), and new files |
//! | `device_roots` | existing block devices only (so `/dev` admits `/dev/vg/lv`, not `/dev/shm/x`) |
//!
//! A root's last component may end in `*`: `/zstack_ps*` stands for every directory of `/`
//! whose name starts with `zstack_ps`, each resolved on its own (mounts come and go, so
//! roots are resolved at each check, never cached). Callers check before anything is opened
//! and then use the resolved path where they create files. A backup also judges every file
//! a volume's image names (qcow2 backing chain, external data file) once the image is open
//! and before any guest data is read.

use std::ffi::OsString;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

/// What the agent is about to do at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read it, write over it, or record it for later (a volume's install path).
    Volume,
    /// Create a new file there (a restore target, a snapshot overlay).
    Create,
}

/// The configured roots, as written (absolute; a `*` may end the last component).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeRoots {
    dirs: Vec<PathBuf>,
    devices: Vec<PathBuf>,
}

impl VolumeRoots {
    /// Roots from the configuration; each must be absolute, with `*` only at the end.
    pub fn new(dirs: &[PathBuf], devices: &[PathBuf]) -> Result<Self, String> {
        for r in dirs.iter().chain(devices) {
            check_root(r)?;
        }
        Ok(Self { dirs: dirs.to_vec(), devices: devices.to_vec() })
    }

    /// Judges `path` for `access`: its resolved form, or why it is refused (a sentence that
    /// names the path and the roots).
    pub fn check(&self, path: &Path, access: Access) -> Result<PathBuf, String> {
        let shown = format!("{:?}", path.display().to_string());
        let resolved = resolve(path).map_err(|why| format!("{shown} {why}"))?;
        let via = if resolved == path { String::new() } else { format!(" (it resolves to {})", resolved.display()) };
        let meta = std::fs::metadata(&resolved).ok();
        let is_block = meta.as_ref().is_some_and(|m| m.file_type().is_block_device());
        let mut refusal = None;
        for root in expand(&self.devices) {
            if beneath(&resolved, &root) {
                match (access, &meta) {
                    (Access::Volume, None) => return Ok(resolved),
                    (Access::Volume, Some(_)) if is_block => return Ok(resolved),
                    _ => refusal.get_or_insert(format!(
                        "{shown}{via} is under the device root {}, where only existing block devices are accepted",
                        root.display()
                    )),
                };
            }
        }
        for root in expand(&self.dirs) {
            if beneath(&resolved, &root) {
                // Whether a new file may replace what is there is the creator's call.
                match &meta {
                    Some(m) if access == Access::Volume && !m.is_file() && !is_block => {
                        refusal.get_or_insert(format!("{shown}{via} is not a regular file or a block device"));
                    }
                    _ => return Ok(resolved),
                }
            }
        }
        Err(refusal.unwrap_or_else(|| format!("{shown}{via} is not under a volume root ({})", self.describe())))
    }

    /// The roots for a message: `/a, /b*, block devices under /dev`.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        parts.extend(self.devices.iter().map(|d| format!("block devices under {}", d.display())));
        if parts.is_empty() { "none configured".to_string() } else { parts.join(", ") }
    }
}

fn check_root(r: &Path) -> Result<(), String> {
    let text = r.to_string_lossy();
    if !r.is_absolute() {
        return Err(format!("volume root {text:?} is not an absolute path"));
    }
    if r.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("volume root {text:?} contains .."));
    }
    let body = text.strip_suffix('*').unwrap_or(&text);
    if body.contains('*') || body == "/" {
        return Err(format!("volume root {text:?}: a * may only end its last component, below /"));
    }
    Ok(())
}

/// Strictly beneath: the root itself is a directory, never a volume.
fn beneath(path: &Path, root: &Path) -> bool {
    path != root && path.starts_with(root)
}

/// The existing roots, resolved; a root ending in `*` stands for each matching directory.
fn expand(roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for r in roots {
        let text = r.to_string_lossy();
        let Some(prefix) = text.strip_suffix('*') else {
            out.extend(std::fs::canonicalize(r).ok());
            continue;
        };
        let (parent, name) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let parent = if parent.is_empty() { Path::new("/") } else { Path::new(parent) };
        let Ok(entries) = std::fs::read_dir(parent) else { continue };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(name) {
                out.extend(std::fs::canonicalize(e.path()).ok().filter(|p| p.is_dir()));
            }
        }
    }
    out
}

/// The path with its existing part canonicalized and the missing rest appended.
fn resolve(path: &Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err("is not an absolute path".into());
    }
    let mut existing = path.to_path_buf();
    let mut missing: Vec<OsString> = Vec::new();
    loop {
        match std::fs::symlink_metadata(&existing) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(name), Some(parent)) = (existing.file_name(), existing.parent()) else {
                    return Err("has a .. after a directory that does not exist".into());
                };
                missing.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            Err(e) => return Err(format!("cannot be resolved: {e}")),
        }
    }
    // It exists (maybe as a symlink): canonicalizing fails for a dangling or looping one,
    // which a create would otherwise follow out of the root.
    let mut resolved =
        std::fs::canonicalize(&existing).map_err(|e| format!("cannot be resolved at {}: {e}", existing.display()))?;
    for name in missing.iter().rev() {
        resolved.push(name);
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn roots(dir: &Path) -> VolumeRoots {
        VolumeRoots::new(&[dir.join("images"), dir.join("ps*")], &[dir.join("dev")]).expect("roots")
    }

    #[test]
    fn paths_under_roots_pass_and_others_are_named() {
        let d = tempfile::tempdir().expect("tempdir");
        let d = &std::fs::canonicalize(d.path()).expect("canonical");
        for sub in ["images", "ps_1", "ps2", "dev/shm", "other"] {
            std::fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        std::fs::write(d.join("images/a.raw"), b"x").expect("file");
        std::fs::write(d.join("dev/shm/x"), b"x").expect("file");
        let r = roots(d);
        assert_eq!(r.check(&d.join("images/a.raw"), Access::Volume), Ok(d.join("images/a.raw")));
        assert!(r.check(&d.join("ps_1/new.qcow2"), Access::Create).is_ok());
        assert!(r.check(&d.join("ps2/x/y.raw"), Access::Volume).is_ok());
        let e = r.check(&d.join("other/a.raw"), Access::Create).expect_err("outside");
        assert!(e.contains("other/a.raw") && e.contains("not under a volume root"), "{e}");
        let e = r.check(&d.join("dev/shm/x"), Access::Volume).expect_err("not a device");
        assert!(e.contains("only existing block devices"), "{e}");
        assert!(r.check(&d.join("dev/new"), Access::Create).is_err());
        assert!(r.check(&d.join("images"), Access::Volume).is_err(), "a root itself is no volume");
        assert!(r.check(Path::new("rel/a.raw"), Access::Volume).is_err());
    }

    #[test]
    fn symlinks_and_dotdot_are_resolved_before_the_check() {
        let d = tempfile::tempdir().expect("tempdir");
        let d = &std::fs::canonicalize(d.path()).expect("canonical");
        std::fs::create_dir_all(d.join("images")).expect("mkdir");
        std::fs::create_dir_all(d.join("other")).expect("mkdir");
        std::fs::write(d.join("other/secret"), b"x").expect("file");
        symlink(d.join("other"), d.join("images/out")).expect("symlink");
        symlink(d.join("other/nothing"), d.join("images/dangling")).expect("symlink");
        let r = roots(d);
        let e = r.check(&d.join("images/out/secret"), Access::Volume).expect_err("through a symlink");
        assert!(e.contains("resolves to") && e.contains("other/secret"), "{e}");
        assert!(r.check(&d.join("images/out/new.raw"), Access::Create).is_err());
        assert!(r.check(&d.join("images/../other/secret"), Access::Volume).is_err());
        assert!(r.check(&d.join("images/missing/../../other/x"), Access::Create).is_err());
        let e = r.check(&d.join("images/dangling"), Access::Create).expect_err("dangling");
        assert!(e.contains("cannot be resolved"), "{e}");
    }

    #[test]
    fn roots_must_be_absolute_with_a_trailing_star_only() {
        for bad in ["rel", "/a/../b", "/a*/b", "/*"] {
            assert!(VolumeRoots::new(&[PathBuf::from(bad)], &[]).is_err(), "{bad}");
        }
        assert!(VolumeRoots::new(&[PathBuf::from("/zstack_ps*")], &[PathBuf::from("/dev")]).is_ok());
    }
}

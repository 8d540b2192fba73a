//! The volume lock set: which operation holds which volume. Taken for the whole of an
//! operation, released when its [`VolumeLease`] drops (on every path, panics included).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{AgentError, ErrorKind, Result};

/// Volumes held by running operations, each with the name of its holder.
#[derive(Debug, Clone, Default)]
pub struct VolumeLocks {
    held: Arc<Mutex<HashMap<String, String>>>,
}

/// Volumes one operation holds; released on drop.
#[derive(Debug)]
pub struct VolumeLease {
    held: Arc<Mutex<HashMap<String, String>>>,
    volumes: Vec<String>,
}

impl VolumeLocks {
    /// Takes every volume of `volumes` for `holder` (e.g. `CreateVmBackup job <uuid>`), or
    /// none: a volume another operation holds is refused with an error naming that holder.
    pub fn acquire<'a>(&self, volumes: impl IntoIterator<Item = &'a str>, holder: &str) -> Result<VolumeLease> {
        let mut held = self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut wanted: Vec<String> = volumes.into_iter().map(str::to_string).collect();
        wanted.sort_unstable();
        wanted.dedup();
        if let Some((v, by)) = wanted.iter().find_map(|v| held.get(v).map(|by| (v, by))) {
            return Err(AgentError::new(
                ErrorKind::FailedPrecondition,
                format!("volume {v} is in use by {by}; retry once it ends"),
            ));
        }
        for v in &wanted {
            held.insert(v.clone(), holder.to_string());
        }
        Ok(VolumeLease { held: self.held.clone(), volumes: wanted })
    }

    /// Who holds `volume`, if anyone.
    pub fn holder(&self, volume: &str) -> Option<String> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(volume).cloned()
    }
}

impl Drop for VolumeLease {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for v in &self.volumes {
            held.remove(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_leases_are_refused_naming_the_holder_and_released_on_drop() {
        let locks = VolumeLocks::default();
        let first = locks.acquire(["a", "b"], "CreateVmBackup job j1").expect("free");
        let e = locks.acquire(["c", "b"], "snapshot group g").expect_err("b is held");
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(e.to_string().contains("volume b is in use by CreateVmBackup job j1"), "{e}");
        assert_eq!(locks.holder("c"), None, "a refused lease takes nothing");
        drop(first);
        let again = locks.acquire(["b", "c"], "snapshot group g").expect("released");
        assert_eq!(locks.holder("c").as_deref(), Some("snapshot group g"));
        drop(again);
        assert_eq!(locks.holder("b"), None);
    }
}

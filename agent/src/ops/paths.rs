//! Volume paths against the volume roots ([`crate::roots`]), checked by every operation
//! before it opens, creates or records anything at them: install paths when a VM is
//! registered and again when a backup, revert or snapshot uses them (a reload that narrows
//! the roots stops later uses of paths recorded earlier), new restore targets and snapshot
//! overlays before they are created. Resolving a path may touch a slow mount, so it runs on
//! the blocking pool.

use std::path::PathBuf;

use super::Ops;
use crate::error::{AgentError, Result, blocking};
use crate::roots::Access;

/// One path to check: what to call it in an error, the path, and what will be done there.
pub(crate) type PathUse = (String, PathBuf, Access);

impl Ops {
    /// The resolved form of each path, in order; the first that lies outside the roots is an
    /// INVALID_ARGUMENT on `field` naming it (`label: "<path>" is not under a volume root`).
    pub(crate) async fn check_paths(&self, field: &'static str, uses: Vec<PathUse>) -> Result<Vec<PathBuf>> {
        let roots = self.live.roots();
        blocking(move || {
            uses.iter()
                .map(|(label, path, access)| {
                    roots.check(path, *access).map_err(|why| AgentError::invalid(field, format!("{label}: {why}")))
                })
                .collect()
        })
        .await
    }

    /// Checks every install path of `volumes` (to read or write over) on `field`.
    pub(crate) async fn check_install_paths<'a>(
        &self,
        field: &'static str,
        volumes: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<()> {
        let uses = volumes
            .into_iter()
            .map(|(uuid, path)| (format!("installPath of volume {uuid}"), PathBuf::from(path), Access::Volume))
            .collect();
        self.check_paths(field, uses).await.map(drop)
    }
}

//! The store's access checks around each call: who the caller is, whether it may use a
//! session, see an index or download chunks, and the audit line of administrative calls.
//! The rules themselves are in [`crate::access`].

use std::collections::HashSet;

use tonic::{Request, Status};
use vmbackup_proto::Digest;

use super::StoreService;
use crate::access::{Principal, Role};

impl StoreService {
    /// PERMISSION_DENIED unless `p` opened session `id` (or is an admin). An unknown
    /// session is left to the call, which answers NOT_FOUND.
    #[allow(clippy::result_large_err)]
    pub(super) fn own_session(&self, p: &Principal, id: &str) -> Result<(), Status> {
        match self.store.sessions().owner(id) {
            Some(o) if o.principal != p.name && !p.has(Role::Admin) => {
                tracing::warn!(target: "audit", principal = %p.name, session = %id, owner = %o.principal, "denied: another principal's session");
                Err(Status::permission_denied(format!("session {id} belongs to another principal")))
            }
            _ => Ok(()),
        }
    }

    /// The caller, who must have `role` to do `action`.
    pub(super) async fn admit<T>(&self, r: &Request<T>, role: Role, action: &str) -> Result<Principal, Status> {
        let p = self.access.authenticate(r).await?;
        p.require(role, action)?;
        Ok(p)
    }

    /// The caller, who must be a writer or a reader (or an admin) to do `action`.
    pub(super) async fn admit_any<T>(&self, r: &Request<T>, action: &str) -> Result<Principal, Status> {
        let p = self.access.authenticate(r).await?;
        if !p.has(Role::Writer) && !p.has(Role::Reader) {
            p.require(Role::Reader, action)?;
        }
        Ok(p)
    }

    /// NOT_FOUND unless index `name` belongs to a group `p` sees (admins see every index).
    pub(super) async fn visible_index(&self, p: &Principal, name: &str) -> Result<(), Status> {
        if p.has(Role::Admin) {
            return Ok(());
        }
        let owner = name.to_string();
        match self.run(move |s| s.index_namespace(&owner)).await? {
            Some(ns) if p.sees(&ns) => Ok(()),
            _ => {
                tracing::warn!(target: "audit", principal = %p.name, index = %name, "denied: index outside the namespace");
                Err(Status::not_found(format!("index {name} is not in namespace {}", p.home())))
            }
        }
    }

    /// A reader (not admin) downloads only for an index of its namespace, and only the
    /// chunks that index names.
    pub(super) async fn check_download(&self, p: &Principal, index: &str, ds: &[Digest]) -> Result<(), Status> {
        if index.is_empty() {
            return Err(Status::invalid_argument("index_name: required: name the index the chunks are read for"));
        }
        self.visible_index(p, index).await?;
        let name = index.to_string();
        let named: HashSet<Digest> = self
            .run(move |s| {
                let bytes = s.get_index(&name)?;
                Ok(s.decode_index(&name, &bytes)?.referenced().copied().collect())
            })
            .await?;
        if let Some((i, d)) = ds.iter().enumerate().find(|(_, d)| !named.contains(d)) {
            tracing::warn!(target: "audit", principal = %p.name, index, chunk = %d, "denied: chunk not in the index");
            return Err(Status::permission_denied(format!("digests[{i}]: chunk {d} is not named by index {index}")));
        }
        Ok(())
    }
}

/// One audit line for an administrative call, with its principal and outcome.
pub(super) fn audit<T>(p: &Principal, action: &str, target: &str, res: &Result<T, Status>) {
    match res {
        Ok(_) => tracing::info!(target: "audit", principal = %p.name, action, target, "done"),
        Err(e) => tracing::warn!(target: "audit", principal = %p.name, action, target, error = %e.message(), "failed"),
    }
}

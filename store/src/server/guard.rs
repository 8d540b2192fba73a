//! The store's access checks around each call: who the caller is, whether it may use a
//! session, see an index or download chunks, and the audit line of administrative calls.
//! The rules themselves are in [`crate::access`].
//!
//! A restore asks to download a few chunks at a time, each time naming its index. What an
//! index grants (its group's namespace and the chunks it names) is found once — by listing
//! the groups and decoding the index — and kept in a small cache ([`Grants`]). Index names
//! are written once and a committed group's namespace never changes, so an entry stays true
//! until its group is deleted; every delete empties the cache.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tonic::{Request, Status};
use vmbackup_proto::Digest;

use super::StoreService;
use crate::access::{Principal, Role};

/// Indexes whose grants are cached (each holds its sorted digests: 4 MiB per 128k chunks).
const CACHED_GRANTS: usize = 8;

/// What reading through one committed index allows.
#[derive(Debug)]
pub(super) struct Grant {
    namespace: String,
    /// The chunks the index names, sorted.
    digests: Vec<Digest>,
}

/// The most recently used grants, by index name.
#[derive(Debug, Default)]
pub(super) struct Grants(Mutex<VecDeque<(String, Arc<Grant>)>>);

impl Grants {
    fn get(&self, index: &str) -> Option<Arc<Grant>> {
        let mut q = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = q.iter().position(|(n, _)| n == index)?;
        let entry = q.remove(at)?;
        let grant = entry.1.clone();
        q.push_front(entry);
        Some(grant)
    }

    fn put(&self, index: &str, grant: Arc<Grant>) {
        let mut q = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        q.retain(|(n, _)| n != index);
        q.push_front((index.to_string(), grant));
        q.truncate(CACHED_GRANTS);
    }

    /// Forgets every grant (a group was deleted).
    pub(super) fn clear(&self) {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }
}

impl StoreService {
    /// PERMISSION_DENIED unless `p` opened session `id` (or is an admin). An unknown
    /// session is left to the call, which answers NOT_FOUND.
    pub(super) async fn own_session(&self, p: &Principal, id: &str) -> Result<(), Status> {
        let session = id.to_string();
        // Over a shared bucket a session unknown here is looked up there (I/O).
        let owner = self.run(move |s| s.sessions().owner(&session)).await?;
        match owner {
            Some(o) if o.principal != p.name && !p.has(Role::Admin) => {
                tracing::warn!(target: "audit", principal = %p.name, session = %id, owner = %o.principal, "denied: another principal's session");
                Err(Status::permission_denied(format!(
                    "session {} belongs to another principal",
                    crate::error::shorten(id)
                )))
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

    /// What index `name` grants, if a committed group names it.
    async fn grant(&self, name: &str) -> Result<Option<Arc<Grant>>, Status> {
        if let Some(g) = self.grants.get(name) {
            return Ok(Some(g));
        }
        let index = name.to_string();
        let found = self
            .run(move |s| {
                let Some(namespace) = s.index_namespace(&index)? else { return Ok(None) };
                let bytes = s.get_index(&index)?;
                let mut digests: Vec<Digest> = s.decode_index(&index, &bytes)?.referenced().copied().collect();
                digests.sort_unstable();
                digests.dedup();
                Ok(Some(Arc::new(Grant { namespace, digests })))
            })
            .await?;
        if let Some(g) = &found {
            self.grants.put(name, g.clone());
        }
        Ok(found)
    }

    /// What index `name` grants `p`, or NOT_FOUND unless it belongs to a group `p` sees.
    /// Admins see every index (None: no grant needed).
    pub(super) async fn visible_index(&self, p: &Principal, name: &str) -> Result<Option<Arc<Grant>>, Status> {
        if p.has(Role::Admin) {
            return Ok(None);
        }
        match self.grant(name).await? {
            Some(g) if p.sees(&g.namespace) => Ok(Some(g)),
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
        let Some(grant) = self.visible_index(p, index).await? else { return Ok(()) };
        if let Some((i, d)) = ds.iter().enumerate().find(|(_, d)| grant.digests.binary_search(d).is_err()) {
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

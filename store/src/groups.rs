//! Groups in the chunk store: commit (manifest last), read, list, delete, retention locks,
//! and which namespace an index belongs to.
//!
//! A group is its manifest (`groups/<uuid>.json`, the agent's record) and its meta
//! (`group-meta/<uuid>.json`, the store's: namespace and retention lock, see
//! [`crate::group_meta`]). Commit writes the meta, then the manifest; delete removes the
//! manifest first, then the indexes, then the meta. A retention lock refuses delete for
//! every caller until it expires, and is only ever extended.

use std::collections::HashSet;

use vmbackup_proto::manifest::GroupManifest;

use crate::backend::ObjectKind;
use crate::chunk_store::{ChunkStore, StoredGroup};
use crate::error::{ErrorKind, Result, StoreError};
use crate::group_meta::{GroupMeta, unix_now};

fn group_name(uuid: &str) -> Result<String> {
    if uuid.len() == 32 && uuid.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(format!("{}.json", uuid.to_ascii_lowercase()))
    } else {
        Err(StoreError::new(
            ErrorKind::InvalidArgument,
            format!("groupUuid {} is not 32 hex digits", crate::error::shorten(uuid)),
        ))
    }
}

impl ChunkStore {
    /// Commits a group into the session's namespace: visible only if every index and chunk
    /// it names is present (in the per-namespace dedup scope: uploaded by that namespace).
    /// `retain_until` (unix seconds) locks it against deletion; the store's default lock
    /// applies when it is longer. Committing the same manifest again from the same
    /// namespace is a no-op; anything else under a committed group uuid is a conflict.
    pub fn commit_group(&self, session: &str, manifest_bytes: &[u8], retain_until: u64) -> Result<GroupManifest> {
        let owner = self.sessions().touch(session)?;
        let manifest = GroupManifest::decode(manifest_bytes)
            .map_err(|e| StoreError::new(ErrorKind::InvalidArgument, e.to_string()))?;
        let name = format!("{}.json", manifest.group_uuid);
        match self.backend.get_object(ObjectKind::Manifest, &name) {
            Ok(existing) if existing == manifest_bytes && self.group_meta(&name)?.namespace == owner.namespace => {
                return Ok(manifest);
            }
            Ok(_) => {
                return Err(StoreError::new(
                    ErrorKind::Conflict,
                    format!("group {} is already committed", manifest.group_uuid),
                ));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if manifest.chunk_size != self.identity().chunk_size {
            return Err(StoreError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "manifest chunk size {} differs from the store's {}",
                    manifest.chunk_size,
                    self.identity().chunk_size
                ),
            ));
        }
        let chunks = self.check_group_contents(session, &manifest, &owner.namespace)?;
        let default_lock = self.default_retention().map_or(0, |d| unix_now().saturating_add(d.as_secs()));
        let meta = GroupMeta { namespace: owner.namespace.clone(), retain_until: retain_until.max(default_lock) };
        let meta_json = serde_json::to_vec(&meta).map_err(|e| StoreError::new(ErrorKind::Io, e.to_string()))?;
        self.backend.put_object(ObjectKind::GroupMeta, &name, &meta_json)?;
        if !self.backend.create_object(ObjectKind::Manifest, &name, manifest_bytes)? {
            // Another commit of this group won the race (another server, or a retry).
            let existing = self.backend.get_object(ObjectKind::Manifest, &name)?;
            if existing != manifest_bytes {
                return Err(StoreError::new(
                    ErrorKind::Conflict,
                    format!("group {} is already committed", manifest.group_uuid),
                ));
            }
        }
        tracing::info!(
            target: "audit",
            principal = %owner.principal,
            namespace = %owner.namespace,
            group = %manifest.group_uuid,
            volumes = manifest.volumes.len(),
            chunks,
            retain_until = meta.retain_until,
            "group committed"
        );
        Ok(manifest)
    }

    /// Checks every index the manifest names (present, digest, size) and every chunk those
    /// name, except those `session` confirmed on this server (GC keeps them while it lives:
    /// see [`crate::sessions`]); returns how many distinct chunks.
    fn check_group_contents(&self, session: &str, manifest: &GroupManifest, namespace: &str) -> Result<usize> {
        let mut checked = HashSet::new();
        let confirmed = self.sessions().confirmed(session)?.unwrap_or_default();
        for v in &manifest.volumes {
            let bytes = self.backend.get_object(ObjectKind::Index, &v.index_name).map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    StoreError::new(
                        ErrorKind::InvalidArgument,
                        format!("index {} of volume backup {} was never uploaded", v.index_name, v.volume_backup_uuid),
                    )
                } else {
                    e
                }
            })?;
            let digest = vmbackup_proto::index::index_digest(&bytes).to_hex();
            if digest != v.index_digest {
                return Err(StoreError::new(
                    ErrorKind::InvalidArgument,
                    format!("index {} has digest {digest}, the manifest says {}", v.index_name, v.index_digest),
                ));
            }
            let ix = self.decode_index(&v.index_name, &bytes)?;
            if ix.virtual_size != v.virtual_size {
                return Err(StoreError::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "index {} covers {} bytes, the manifest says {}",
                        v.index_name, ix.virtual_size, v.virtual_size
                    ),
                ));
            }
            let todo: Vec<_> =
                ix.referenced().filter(|d| checked.insert(**d) && !confirmed.contains(*d)).copied().collect();
            crate::chunk_store::bump(&self.counters().commit_lookups, u64::try_from(todo.len()).unwrap_or(u64::MAX));
            for (d, here) in todo.iter().zip(self.backend.has_chunks(&todo)?) {
                if !here || !self.visible_to(namespace, d)? {
                    return Err(StoreError::new(
                        ErrorKind::InvalidArgument,
                        format!("chunk {d} of volume backup {} is not in the store", v.volume_backup_uuid),
                    ));
                }
            }
        }
        Ok(checked.len())
    }

    /// The meta of the group whose manifest is `name` (default when there is none).
    fn group_meta(&self, name: &str) -> Result<GroupMeta> {
        match self.backend.get_object(ObjectKind::GroupMeta, name) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::new(ErrorKind::Corrupt, format!("group meta {name}: {e}"))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(GroupMeta::default()),
            Err(e) => Err(e),
        }
    }

    /// A committed group.
    pub fn get_group(&self, uuid: &str) -> Result<StoredGroup> {
        let name = group_name(uuid)?;
        let bytes = self.backend.get_object(ObjectKind::Manifest, &name).map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                StoreError::new(ErrorKind::NotFound, format!("group {uuid} not found"))
            } else {
                e
            }
        })?;
        let manifest = GroupManifest::decode(&bytes)
            .map_err(|e| StoreError::new(ErrorKind::Corrupt, format!("manifest of group {uuid}: {e}")))?;
        let damaged = self.group_state.is_damaged(&manifest.group_uuid)?;
        let meta = self.group_meta(&name)?;
        Ok(StoredGroup { manifest, bytes, damaged, meta })
    }

    /// How many committed groups `sees` lets a caller see: for a caller who sees every
    /// namespace a LIST of the manifests alone; otherwise each group's meta is read too
    /// (never the manifests). Status calls this before every backup, so it stays cheap.
    pub fn count_groups(&self, all: bool, sees: &dyn Fn(&str) -> bool) -> Result<usize> {
        let manifests = self.backend.list_objects(ObjectKind::Manifest)?;
        if all {
            return Ok(manifests.len());
        }
        let mut n = 0;
        for o in &manifests {
            if sees(&self.group_meta(&o.name)?.namespace) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every committed group, oldest first. A manifest that cannot be read is reported in
    /// the log and skipped, so one damaged file does not hide every other group.
    pub fn list_groups(&self) -> Result<Vec<StoredGroup>> {
        let damaged = self.group_state.damaged()?;
        let mut out = Vec::new();
        for o in self.backend.list_objects(ObjectKind::Manifest)? {
            let Some(uuid) = o.name.strip_suffix(".json") else { continue };
            let bytes = match self.backend.get_object(ObjectKind::Manifest, &o.name) {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let decoded = GroupManifest::decode(&bytes).map_err(|e| e.to_string());
            match decoded.and_then(|m| self.group_meta(&o.name).map(|meta| (m, meta)).map_err(|e| e.to_string())) {
                Ok((manifest, meta)) => {
                    let is_damaged = damaged.contains(uuid);
                    out.push(StoredGroup { manifest, bytes, damaged: is_damaged, meta });
                }
                Err(e) => tracing::error!(manifest = %o.name, error = %e, "unreadable group skipped"),
            }
        }
        out.sort_by(|a, b| {
            a.manifest.created.cmp(&b.manifest.created).then(a.manifest.group_uuid.cmp(&b.manifest.group_uuid))
        });
        Ok(out)
    }

    /// Deletes a group: its manifest, then its indexes, then its meta. Chunks are left to
    /// GC. A group under a retention lock is refused, whoever asks.
    pub fn delete_group(&self, uuid: &str) -> Result<()> {
        let group = self.get_group(uuid)?;
        let now = unix_now();
        if group.meta.locked_at(now) {
            return Err(StoreError::new(
                ErrorKind::Conflict,
                format!(
                    "group {uuid} is retention-locked until {} (unix seconds; {} s from now)",
                    group.meta.retain_until,
                    group.meta.retain_until - now
                ),
            ));
        }
        let name = group_name(uuid)?;
        self.backend.delete_object(ObjectKind::Manifest, &name)?;
        for v in &group.manifest.volumes {
            self.backend.delete_object(ObjectKind::Index, &v.index_name)?;
        }
        self.backend.delete_object(ObjectKind::GroupMeta, &name)?;
        tracing::info!(group = %uuid, namespace = %group.meta.namespace, "group deleted");
        Ok(())
    }

    /// Extends a group's retention lock to `retain_until` (unix seconds). Shortening is
    /// refused; the same value again is a no-op.
    pub fn set_retention(&self, uuid: &str, retain_until: u64) -> Result<StoredGroup> {
        let _one_at_a_time = self.meta_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut group = self.get_group(uuid)?;
        if retain_until < group.meta.retain_until {
            return Err(StoreError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "retain_until {retain_until} is earlier than group {uuid}'s lock {}; a lock is only ever extended",
                    group.meta.retain_until
                ),
            ));
        }
        if retain_until != group.meta.retain_until {
            group.meta.retain_until = retain_until;
            let json = serde_json::to_vec(&group.meta).map_err(|e| StoreError::new(ErrorKind::Io, e.to_string()))?;
            self.backend.put_object(ObjectKind::GroupMeta, &group_name(uuid)?, &json)?;
        }
        Ok(group)
    }

    /// The namespace of the committed group that names index `name`, if any.
    pub fn index_namespace(&self, name: &str) -> Result<Option<String>> {
        Self::check_index_name(name)?;
        Ok(self
            .list_groups()?
            .into_iter()
            .find(|g| g.manifest.volumes.iter().any(|v| v.index_name == name))
            .map(|g| g.meta.namespace))
    }
}

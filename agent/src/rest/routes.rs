//! The seeds' URLs: which API a method and path name, and how its request is spelled
//! (a `params` body, an action body such as `{"syncVmBackup": {}}`, or only the URL).
//!
//! [`Route::request`] turns URL, query string and body into the JSON of the API's proto
//! request (camelCase names), which the proto's own deserializer then checks field by
//! field: an unknown or mistyped field is refused there with its name.

use serde_json::{Map, Value};

use crate::error::{AgentError, Result};

/// The APIs reachable over REST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// POST volumes/{rootVolumeUuid}/vm-backups
    CreateVmBackup,
    /// DELETE vm-backups/{groupUuid}
    DeleteVmBackup,
    /// PUT vm-backups/imageStore/{imageStoreUuid}/actions `syncVmBackup`
    SyncVmBackup,
    /// PUT vm-backups/{groupUuid}/actions `recoverVmBackupFromImageStoreBackupStorage`
    RecoverVmBackup,
    /// PUT vm-backups/{groupUuid}/actions `restoreVmBackup`
    RestoreVmBackup,
    /// GET volume-backups[/{uuid}]
    QueryVolumeBackup,
    /// PUT vm-backups/backup-storage/{backupStorageUuid}/actions `pruneVmBackup`
    PruneVmBackup,
    /// POST volume-snapshots/group
    CreateVolumeSnapshotGroup,
    /// DELETE volume-snapshots/group/{uuid}
    DeleteVolumeSnapshotGroup,
    /// PUT volume-snapshots/group/{uuid}/actions `updateVolumeSnapshotGroup`
    UpdateVolumeSnapshotGroup,
    /// GET volume-snapshots/group[/{uuid}]
    QueryVolumeSnapshotGroup,
    /// POST backup-storage/image-store
    AddImageStoreBackupStorage,
    /// POST backup-storage/ceph
    AddCephBackupStorage,
    /// DELETE backup-storage/{uuid}
    DeleteBackupStorage,
    /// GET backup-storage[/{uuid}]
    QueryBackupStorage,
    /// PUT backup-storage/{uuid}/actions `reconnectBackupStorage`
    ReconnectBackupStorage,
    /// POST vm-backups/{groupUuid}/exports
    ExportVmBackup,
    /// GET vm-backup-exports
    QueryVmBackupExport,
    /// DELETE vm-backup-exports/{uuid}
    StopVmBackupExport,
    /// GET api-jobs/{uuid}: the state of an asynchronous call.
    ApiJob,
}

impl Api {
    /// Whether the call answers at once (a query) rather than through an API job.
    pub fn is_query(self) -> bool {
        matches!(
            self,
            Api::QueryVolumeBackup
                | Api::QueryVolumeSnapshotGroup
                | Api::QueryBackupStorage
                | Api::QueryVmBackupExport
                | Api::ApiJob
        )
    }

    /// Whether the query takes ZStack's conditions (`q=`, `limit`, `sort`, ...).
    pub fn takes_conditions(self) -> bool {
        self.is_query() && !matches!(self, Api::QueryVmBackupExport | Api::ApiJob)
    }
}

/// Where the API's parameters are in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// `{"params": {...}}`
    Params,
    /// `{"<action>": {...}}`; the action names the API.
    Action,
    /// Only `systemTags`/`userTags` (and, for deletes, `deleteMode`) may be in a body.
    None,
}

/// A matched URL.
#[derive(Debug, Clone)]
pub struct Route {
    /// The API.
    pub api: Api,
    body: Body,
    /// Path parameters by their request field name.
    path: Vec<(&'static str, String)>,
}

/// The route of `method` and the path under `zstack/v1/`, or None.
pub fn route(method: &str, segments: &[&str]) -> Option<Route> {
    use Api::*;
    let one = |name: &'static str, v: &str| vec![(name, v.to_string())];
    let (api, body, path) = match (method, segments) {
        ("POST", ["volumes", root, "vm-backups"]) => (CreateVmBackup, Body::Params, one("rootVolumeUuid", root)),
        ("DELETE", ["vm-backups", group]) => (DeleteVmBackup, Body::None, one("groupUuid", group)),
        ("PUT", ["vm-backups", "imageStore", uuid, "actions"]) => {
            (SyncVmBackup, Body::Action, one("imageStoreUuid", uuid))
        }
        ("PUT", ["vm-backups", "backup-storage", uuid, "actions"]) => {
            (PruneVmBackup, Body::Action, one("backupStorageUuid", uuid))
        }
        // Recover or restore: the action in the body decides.
        ("PUT", ["vm-backups", group, "actions"]) => (RecoverVmBackup, Body::Action, one("groupUuid", group)),
        ("GET", ["volume-backups"]) => (QueryVolumeBackup, Body::None, vec![]),
        ("GET", ["volume-backups", uuid]) => (QueryVolumeBackup, Body::None, one("uuid", uuid)),
        ("POST", ["volume-snapshots", "group"]) => (CreateVolumeSnapshotGroup, Body::Params, vec![]),
        ("DELETE", ["volume-snapshots", "group", uuid]) => (DeleteVolumeSnapshotGroup, Body::None, one("uuid", uuid)),
        ("PUT", ["volume-snapshots", "group", uuid, "actions"]) => {
            (UpdateVolumeSnapshotGroup, Body::Action, one("uuid", uuid))
        }
        ("GET", ["volume-snapshots", "group"]) => (QueryVolumeSnapshotGroup, Body::None, vec![]),
        ("GET", ["volume-snapshots", "group", uuid]) => (QueryVolumeSnapshotGroup, Body::None, one("uuid", uuid)),
        ("POST", ["backup-storage", "image-store"]) => (AddImageStoreBackupStorage, Body::Params, vec![]),
        ("POST", ["backup-storage", "ceph"]) => (AddCephBackupStorage, Body::Params, vec![]),
        ("DELETE", ["backup-storage", uuid]) => (DeleteBackupStorage, Body::None, one("uuid", uuid)),
        ("GET", ["backup-storage"]) => (QueryBackupStorage, Body::None, vec![]),
        ("GET", ["backup-storage", uuid]) => (QueryBackupStorage, Body::None, one("uuid", uuid)),
        ("PUT", ["backup-storage", uuid, "actions"]) => (ReconnectBackupStorage, Body::Action, one("uuid", uuid)),
        ("POST", ["vm-backups", group, "exports"]) => (ExportVmBackup, Body::Params, one("groupUuid", group)),
        ("GET", ["vm-backup-exports"]) => (QueryVmBackupExport, Body::None, vec![]),
        ("DELETE", ["vm-backup-exports", uuid]) => (StopVmBackupExport, Body::None, one("uuid", uuid)),
        ("GET", ["api-jobs", uuid]) => (ApiJob, Body::None, one("uuid", uuid)),
        _ => return None,
    };
    Some(Route { api, body, path })
}

/// The action names a PUT body may carry, per API; matched without regard to case (the
/// seeds spell `recovervmbackupfromimagestorebackupstorage` in one place).
fn actions(api: Api) -> &'static [(&'static str, Api)] {
    match api {
        Api::SyncVmBackup => &[("syncVmBackup", Api::SyncVmBackup)],
        Api::RecoverVmBackup | Api::RestoreVmBackup => &[
            ("recoverVmBackupFromImageStoreBackupStorage", Api::RecoverVmBackup),
            ("restoreVmBackup", Api::RestoreVmBackup),
        ],
        Api::UpdateVolumeSnapshotGroup => &[("updateVolumeSnapshotGroup", Api::UpdateVolumeSnapshotGroup)],
        Api::PruneVmBackup => &[("pruneVmBackup", Api::PruneVmBackup)],
        Api::ReconnectBackupStorage => &[("reconnectBackupStorage", Api::ReconnectBackupStorage)],
        _ => &[],
    }
}

/// Query-string parameters a DELETE takes (each becomes a request field).
const DELETE_QUERY: &[&str] = &["deleteMode", "backupStorageUuids"];

impl Route {
    /// The path parameter `name`.
    pub fn path_param(&self, name: &str) -> Option<&str> {
        self.path.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// The JSON of the proto request: body parameters, path parameters, the tags, and for
    /// deletes the query string. The route's API may change (recover or restore).
    pub fn request(&mut self, query: &[(String, String)], body: &[u8]) -> Result<Value> {
        let mut envelope = parse_body(body)?;
        let mut fields = Map::new();
        for (tags, field) in [("systemTags", "systemTags"), ("userTags", "userTags")] {
            if let Some(v) = envelope.remove(tags) {
                if !v.is_array() && !v.is_null() {
                    return Err(AgentError::invalid(field, "must be a list of strings"));
                }
                fields.insert(tags.to_string(), v);
            }
        }
        match self.body {
            Body::Params => {
                let params = envelope.remove("params").unwrap_or(Value::Object(Map::new()));
                take_object("params", params, &mut fields)?;
            }
            Body::Action => {
                let allowed = actions(self.api);
                let key = envelope.keys().find(|k| allowed.iter().any(|(a, _)| a.eq_ignore_ascii_case(k))).cloned();
                let Some(key) = key else {
                    let names: Vec<_> = allowed.iter().map(|(a, _)| *a).collect();
                    return Err(AgentError::invalid(
                        "body",
                        format!("expected an action object: one of {}", names.join(", ")),
                    ));
                };
                self.api = allowed.iter().find(|(a, _)| a.eq_ignore_ascii_case(&key)).map_or(self.api, |(_, api)| *api);
                let action = envelope.remove(&key).unwrap_or(Value::Null);
                take_object(&key, action, &mut fields)?;
            }
            Body::None => {
                if let Some(mode) = envelope.remove("deleteMode") {
                    fields.insert("deleteMode".into(), mode);
                }
            }
        }
        if let Some(extra) = envelope.keys().next().cloned() {
            return Err(AgentError::invalid("body", format!("unknown field {extra:?} in the request body")));
        }
        if !self.api.is_query() {
            delete_query(self.api, query, &mut fields)?;
        }
        for (name, value) in &self.path {
            if fields.contains_key(*name) {
                return Err(AgentError::invalid(name, format!("{name} is given in the URL; leave it out of the body")));
            }
            fields.insert(name.to_string(), Value::String(value.clone()));
        }
        Ok(Value::Object(fields))
    }
}

fn parse_body(body: &[u8]) -> Result<Map<String, Value>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(AgentError::invalid("body", "the request body must be a JSON object")),
        Err(e) => Err(AgentError::invalid("body", format!("the request body is not JSON: {e}"))),
    }
}

fn take_object(what: &str, v: Value, into: &mut Map<String, Value>) -> Result<()> {
    match v {
        Value::Object(m) => {
            into.extend(m);
            Ok(())
        }
        Value::Null => Ok(()),
        _ => Err(AgentError::invalid("body", format!("{what} must be a JSON object"))),
    }
}

/// A DELETE's query string: `deleteMode`, and `backupStorageUuids` as a comma list or
/// repeated. Other APIs take nothing from the query string.
fn delete_query(api: Api, query: &[(String, String)], fields: &mut Map<String, Value>) -> Result<()> {
    for (k, v) in query {
        let takes = match api {
            Api::DeleteVmBackup => DELETE_QUERY.contains(&k.as_str()),
            Api::DeleteBackupStorage | Api::DeleteVolumeSnapshotGroup => k == "deleteMode",
            _ => false,
        };
        if !takes {
            return Err(AgentError::invalid("query", format!("unknown query parameter {k:?}")));
        }
        if k == "backupStorageUuids" {
            let list = fields.entry(k.clone()).or_insert_with(|| Value::Array(vec![]));
            if let Value::Array(items) = list {
                items.extend(v.split(',').filter(|s| !s.is_empty()).map(|s| Value::String(s.to_string())));
            }
        } else {
            fields.insert(k.clone(), Value::String(v.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn create_merges_params_tags_and_the_url() {
        let mut r = route("POST", &["volumes", "aa", "vm-backups"]).expect("route");
        let body = br#"{"params":{"backupStorageUuid":"fc","name":"backup-1"},"systemTags":[],"userTags":["x"]}"#;
        let v = r.request(&[], body).expect("request");
        assert_eq!(v["rootVolumeUuid"], "aa");
        assert_eq!(v["name"], "backup-1");
        assert_eq!(v["userTags"][0], "x");
    }

    #[test]
    fn actions_pick_the_api_in_any_case() {
        let mut r = route("PUT", &["vm-backups", "g", "actions"]).expect("route");
        let v = r
            .request(&[], br#"{"recovervmbackupfromimagestorebackupstorage":{"srcBackupStorageUuid":"a","dstBackupStorageUuid":"b"}}"#)
            .expect("request");
        assert_eq!(r.api, Api::RecoverVmBackup);
        assert_eq!(v["groupUuid"], "g");
        let mut r = route("PUT", &["vm-backups", "g", "actions"]).expect("route");
        r.request(&[], br#"{"restoreVmBackup":{"backupStorageUuid":"b"}}"#).expect("request");
        assert_eq!(r.api, Api::RestoreVmBackup);
        let mut r = route("PUT", &["vm-backups", "g", "actions"]).expect("route");
        let e = r.request(&[], br#"{"deleteEverything":{}}"#).expect_err("unknown action");
        assert!(e.to_string().contains("restoreVmBackup"), "{e}");
    }

    #[test]
    fn deletes_take_their_query_string() {
        let mut r = route("DELETE", &["vm-backups", "g"]).expect("route");
        let v = r
            .request(
                &q(&[("backupStorageUuids", "a,b"), ("deleteMode", "Permissive"), ("backupStorageUuids", "c")]),
                b"",
            )
            .expect("request");
        assert_eq!(v["backupStorageUuids"], serde_json::json!(["a", "b", "c"]));
        assert_eq!(v["deleteMode"], "Permissive");
        let mut r = route("DELETE", &["backup-storage", "u"]).expect("route");
        assert!(r.request(&q(&[("force", "1")]), b"").is_err());
    }

    #[test]
    fn bad_envelopes_name_what_is_wrong() {
        let mut r = route("POST", &["volume-snapshots", "group"]).expect("route");
        assert!(r.request(&[], b"[1]").expect_err("array").to_string().contains("JSON object"));
        assert!(r.request(&[], b"{").expect_err("not json").to_string().contains("not JSON"));
        let e = r.request(&[], br#"{"params":{},"extra":1}"#).expect_err("extra");
        assert!(e.to_string().contains("extra"), "{e}");
        let mut r = route("POST", &["volumes", "aa", "vm-backups"]).expect("route");
        let e = r.request(&[], br#"{"params":{"rootVolumeUuid":"bb"}}"#).expect_err("twice");
        assert!(e.to_string().contains("URL"), "{e}");
        assert!(route("GET", &["vm-backups"]).is_none());
    }
}

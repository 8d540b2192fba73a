//! What a Ceph cluster says about itself and a pool, from monitor commands: the facts a
//! Ceph backup storage's inventory shows (fsid, monitors in quorum, pool capacities and
//! replication). The JSON parsing is pure, so it is tested on the monitors' real output
//! shapes without a cluster.

use serde::Deserialize;

use super::RadosBackend;
use crate::error::{ErrorKind, Result, StoreError};

/// A monitor of the cluster's monmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorFact {
    /// Monitor name (`a`, `node1`, …).
    pub name: String,
    /// Its addresses as `ip:port` (v2 and v1).
    pub addrs: Vec<String>,
    /// Whether it is in the quorum now.
    pub in_quorum: bool,
}

/// The cluster and pool as the monitors report them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterReport {
    /// The cluster's fsid.
    pub fsid: String,
    /// Raw bytes of every OSD.
    pub total_bytes: u64,
    /// Raw bytes free.
    pub available_bytes: u64,
    /// The monmap, with quorum membership.
    pub monitors: Vec<MonitorFact>,
    /// Bytes the pool uses on the OSDs (with its replicas).
    pub pool_used_bytes: u64,
    /// Bytes the pool can still take (`max_avail`: free space divided by replication).
    pub pool_available_bytes: u64,
    /// The pool's replica count (`size`).
    pub pool_replicated_size: u32,
}

#[derive(Deserialize)]
struct QuorumStatus {
    quorum_names: Vec<String>,
    monmap: MonMap,
}

#[derive(Deserialize)]
struct MonMap {
    mons: Vec<MonEntry>,
}

#[derive(Deserialize)]
struct MonEntry {
    name: String,
    #[serde(default)]
    public_addrs: Option<AddrVec>,
    #[serde(default)]
    addr: Option<String>,
}

#[derive(Deserialize)]
struct AddrVec {
    addrvec: Vec<Addr>,
}

#[derive(Deserialize)]
struct Addr {
    addr: String,
}

#[derive(Deserialize)]
struct Df {
    pools: Vec<DfPool>,
}

#[derive(Deserialize)]
struct DfPool {
    name: String,
    stats: DfPoolStats,
}

#[derive(Deserialize)]
struct DfPoolStats {
    #[serde(default)]
    bytes_used: u64,
    #[serde(default)]
    max_avail: u64,
}

#[derive(Deserialize)]
struct PoolSize {
    size: u32,
}

fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8], command: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        StoreError::new(ErrorKind::Io, format!("the monitors' answer to {command} is not what Ceph 16+ sends: {e}"))
    })
}

/// The monmap and quorum of `quorum_status` output.
pub fn parse_quorum(bytes: &[u8]) -> Result<Vec<MonitorFact>> {
    let q: QuorumStatus = parse(bytes, "quorum_status")?;
    Ok(q.monmap
        .mons
        .into_iter()
        .map(|m| {
            let mut addrs: Vec<String> = m
                .public_addrs
                .map(|v| v.addrvec.into_iter().map(|a| strip_nonce(&a.addr)).collect())
                .unwrap_or_default();
            if let Some(a) = m.addr {
                let a = strip_nonce(&a);
                if !addrs.contains(&a) {
                    addrs.push(a);
                }
            }
            let in_quorum = q.quorum_names.contains(&m.name);
            MonitorFact { name: m.name, addrs, in_quorum }
        })
        .collect())
}

fn strip_nonce(addr: &str) -> String {
    addr.split('/').next().unwrap_or(addr).to_string()
}

/// (bytes used, bytes available) of `pool` in `df` output.
pub fn parse_pool_df(bytes: &[u8], pool: &str) -> Result<(u64, u64)> {
    let df: Df = parse(bytes, "df")?;
    df.pools
        .into_iter()
        .find(|p| p.name == pool)
        .map(|p| (p.stats.bytes_used, p.stats.max_avail))
        .ok_or_else(|| StoreError::new(ErrorKind::NotFound, format!("Ceph pool {pool:?} is not in the cluster's df")))
}

/// The replica count of `osd pool get <pool> size` output.
pub fn parse_pool_size(bytes: &[u8]) -> Result<u32> {
    Ok(parse::<PoolSize>(bytes, "osd pool get size")?.size)
}

impl RadosBackend {
    /// Asks the monitors about the cluster and this store's pool.
    pub fn report(&self) -> Result<ClusterReport> {
        let fail = |e| self.fail(e);
        let fsid = self.cluster.fsid().map_err(fail)?;
        let (total_bytes, available_bytes) = self.cluster.capacity().map_err(fail)?;
        let quorum = self.cluster.mon_command(r#"{"prefix":"quorum_status","format":"json"}"#).map_err(fail)?;
        let df = self.cluster.mon_command(r#"{"prefix":"df","format":"json"}"#).map_err(fail)?;
        let pool = serde_json::to_string(&self.pool).unwrap_or_default();
        let size = self
            .cluster
            .mon_command(&format!(r#"{{"prefix":"osd pool get","pool":{pool},"var":"size","format":"json"}}"#))
            .map_err(fail)?;
        let (pool_used_bytes, pool_available_bytes) = parse_pool_df(&df, &self.pool)?;
        Ok(ClusterReport {
            fsid,
            total_bytes,
            available_bytes,
            monitors: parse_quorum(&quorum)?,
            pool_used_bytes,
            pool_available_bytes,
            pool_replicated_size: parse_pool_size(&size)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_status_of_ceph_16() {
        let out = br#"{"election_epoch":3,"quorum":[0],"quorum_names":["a"],"quorum_leader_name":"a",
            "monmap":{"epoch":1,"fsid":"f","mons":[
              {"rank":0,"name":"a","public_addrs":{"addrvec":[{"type":"v2","addr":"127.0.0.1:40001","nonce":0},
                {"type":"v1","addr":"127.0.0.1:40002","nonce":0}]},"addr":"127.0.0.1:40002/0","public_addr":"127.0.0.1:40002/0"},
              {"rank":1,"name":"b","public_addrs":{"addrvec":[{"type":"v1","addr":"10.0.0.2:6789","nonce":0}]},"addr":"10.0.0.2:6789/0"}]}}"#;
        let mons = parse_quorum(out).expect("parse");
        assert_eq!(mons.len(), 2);
        assert_eq!(mons[0].addrs, vec!["127.0.0.1:40001", "127.0.0.1:40002"]);
        assert!(mons[0].in_quorum);
        assert_eq!(mons[1].addrs, vec!["10.0.0.2:6789"]);
        assert!(!mons[1].in_quorum);
    }

    #[test]
    fn pool_df_and_size() {
        let df = br#"{"stats":{"total_bytes":10},"pools":[{"name":"other","id":1,"stats":{"bytes_used":1,"max_avail":2}},
            {"name":"backups","id":2,"stats":{"stored":5,"objects":3,"kb_used":1,"bytes_used":12288,"percent_used":0.1,"max_avail":999}}]}"#;
        assert_eq!(parse_pool_df(df, "backups").expect("df"), (12288, 999));
        let missing = parse_pool_df(df, "nope").expect_err("missing pool");
        assert!(missing.to_string().contains("\"nope\""), "{missing}");
        assert_eq!(parse_pool_size(br#"{"pool":"backups","pool_id":2,"size":3}"#).expect("size"), 3);
        let bad = parse_pool_size(b"{}").expect_err("no size");
        assert!(bad.to_string().contains("osd pool get size"), "{bad}");
    }
}

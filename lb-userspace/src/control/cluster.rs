//! A node's part in a cluster: its status, kept in etcd under a lease (so a node that dies
//! disappears after the lease's TTL), and the cluster's view built from every node's status —
//! what `lb status --cluster` and the dashboard show, with the nodes that disagree flagged.
//!
//! Nodes agree when each VIP's Maglev table digest (slot → backend address:port, the same on
//! every node that sees the same backends, whatever ids each gave them) is the same on all of
//! them. A node whose digest differs from the majority's, or that lacks a VIP the others have,
//! would send some flows to other backends than its peers after an ECMP rehash.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use etcd_client::{GetOptions, PutOptions};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::Control;
use crate::sources::cluster::Shared;

/// A node's status record is small; anything far larger under the nodes' prefix is not one.
const MAX_STATUS: usize = 1 << 20;
/// At most this many backends that are not active are listed per VIP (the count is exact).
const MAX_LISTED: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub version: String,
    pub started_unix: u64,
    pub updated_unix: u64,
    /// This node's registry generation: a local count of the changes it applied.
    pub generation: u64,
    /// The cluster store's etcd revision this node has applied.
    pub store_revision: i64,
    pub vips: Vec<VipStatus>,
    /// `[bgp]`: what bird was told to announce and its sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<crate::model::bgp::BgpStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: String,
    pub address: String,
    pub port: u16,
    pub table_digest: Option<String>,
    pub backends: usize,
    /// Backends taking new flows.
    pub active: usize,
    /// The others, as `address:port state` (at most 32).
    pub not_active: Vec<String>,
}

/// Where a node parts from the majority.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Disagreement {
    pub node: String,
    pub vip: String,
    /// This node's table digest (`None`: it has no table for the VIP, or lacks the VIP).
    pub digest: Option<String>,
    /// The digest most nodes have; `None` when no digest has a majority.
    pub majority: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClusterView {
    pub cluster: String,
    /// The node that answered.
    pub node: String,
    pub nodes: Vec<NodeStatus>,
    pub agree: bool,
    pub disagreements: Vec<Disagreement>,
    /// Records under the nodes' prefix that are not a node's status.
    pub rejected: Vec<String>,
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// This node's status now.
pub fn status_of(c: &Control, node: &str, started_unix: u64) -> Result<NodeStatus> {
    let vips = c
        .balancer
        .list()?
        .into_iter()
        .map(|v| {
            let active = v
                .backends
                .iter()
                .filter(|b| b.state == crate::model::BackendMode::Active)
                .count();
            let not_active = v
                .backends
                .iter()
                .filter(|b| b.state != crate::model::BackendMode::Active)
                .take(MAX_LISTED)
                .map(|b| {
                    let state = serde_json::to_value(b.state)
                        .ok()
                        .and_then(|s| s.as_str().map(str::to_string))
                        .unwrap_or_default();
                    format!("{} {state}", std::net::SocketAddr::new(b.address, b.port))
                })
                .collect();
            VipStatus {
                name: v.name,
                address: v.address.to_string(),
                port: v.port,
                table_digest: v.table_digest,
                backends: v.backends.len(),
                active,
                not_active,
            }
        })
        .collect();
    Ok(NodeStatus {
        node: node.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_unix,
        updated_unix: unix(crate::clock::wall()),
        generation: c.registry.generation,
        store_revision: c.store.revision(),
        vips,
        bgp: c.bgp_status.as_ref().map(|r| r.borrow().clone()),
    })
}

/// Every VIP's majority digest, and each node that parts from it.
pub fn disagreements(nodes: &[NodeStatus]) -> Vec<Disagreement> {
    let mut by_vip: BTreeMap<&str, Vec<(&str, Option<&str>)>> = BTreeMap::new();
    for n in nodes {
        for v in &n.vips {
            by_vip
                .entry(&v.name)
                .or_default()
                .push((&n.node, v.table_digest.as_deref()));
        }
    }
    let mut out = Vec::new();
    for (vip, mut seen) in by_vip {
        // A node without the VIP counts as a node without its table.
        for n in nodes {
            if !seen.iter().any(|(name, _)| *name == n.node) {
                seen.push((&n.node, None));
            }
        }
        let mut counts: BTreeMap<Option<&str>, usize> = BTreeMap::new();
        for (_, d) in &seen {
            *counts.entry(*d).or_default() += 1;
        }
        let top = counts.values().copied().max().unwrap_or(0);
        let leaders: Vec<Option<&str>> = counts
            .iter()
            .filter(|(_, c)| **c == top)
            .map(|(d, _)| *d)
            .collect();
        let majority = match leaders.as_slice() {
            [one] => *one,
            _ => None,
        };
        let unique = leaders.len() == 1;
        for (node, d) in seen {
            if !unique || d != majority || d.is_none() {
                out.push(Disagreement {
                    node: node.to_string(),
                    vip: vip.to_string(),
                    digest: d.map(str::to_string),
                    majority: majority.map(str::to_string),
                });
            }
        }
    }
    out.sort_by(|a, b| (&a.vip, &a.node).cmp(&(&b.vip, &b.node)));
    out
}

/// One node's status record as read from etcd (another process wrote it): bounded, and it must
/// name the node its key names.
fn parse_status(name: &str, value: &[u8]) -> Result<NodeStatus> {
    anyhow::ensure!(value.len() <= MAX_STATUS, "longer than {MAX_STATUS} bytes");
    let s = serde_json::from_slice::<NodeStatus>(value).context("not a node's status")?;
    anyhow::ensure!(s.node == name, "it names node {:?}", s.node);
    Ok(s)
}

/// The cluster as etcd has it now.
pub async fn view(shared: &Shared) -> Result<ClusterView> {
    let mut client = shared.client().await?;
    let prefix = shared.keys.nodes.clone();
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
    )
    .await
    .map_err(|_| anyhow!("reading the nodes' status from etcd: timed out"))?
    .context("reading the nodes' status from etcd")?;
    let mut nodes = Vec::new();
    let mut rejected = Vec::new();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let name = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
        let parsed = parse_status(&name, kv.value());
        match parsed {
            Ok(s) => nodes.push(s),
            Err(e) => rejected.push(format!(
                "{:?}: {e:#}",
                name.chars().take(100).collect::<String>()
            )),
        }
    }
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    let disagreements = disagreements(&nodes);
    Ok(ClusterView {
        cluster: shared.spec.name.clone(),
        node: shared.spec.node.clone(),
        agree: disagreements.is_empty() && !nodes.is_empty(),
        nodes,
        disagreements,
        rejected,
    })
}

/// Keeps this node's status in etcd until `stop` turns true, then revokes its lease (the status
/// goes at once, not a TTL later). Refreshed every third of the TTL, so a node is only gone from
/// the view when it missed three refreshes.
pub async fn publish(
    shared: Arc<Shared>,
    control: Arc<Mutex<Control>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let ttl = shared.spec.status_ttl;
    let period = (ttl / 3).max(Duration::from_secs(1));
    let key = shared.keys.node(&shared.spec.node);
    let started = unix(crate::clock::wall());
    let mut lease: Option<(
        i64,
        etcd_client::LeaseKeeper,
        etcd_client::LeaseKeepAliveStream,
    )> = None;
    let mut failing = false;
    loop {
        let r = async {
            let c = control.clone();
            let node = shared.spec.node.clone();
            let status =
                tokio::task::spawn_blocking(move || status_of(&super::lock(&c), &node, started))
                    .await
                    .map_err(|e| anyhow!("status task: {e}"))??;
            let mut client = shared.client().await?;
            let bound = Duration::from_secs(5);
            // The lease is kept alive each round; one that lapsed (etcd away longer than the
            // TTL) is granted again.
            let alive = match lease.as_mut() {
                Some((_, keeper, stream)) => tokio::time::timeout(bound, async {
                    keeper.keep_alive().await?;
                    stream.message().await
                })
                .await
                .map_err(|_| anyhow!("lease keep-alive: timed out"))?
                .context("lease keep-alive")?
                .is_some_and(|r| r.ttl() > 0),
                None => false,
            };
            if !alive {
                let secs = ttl.as_secs() as i64;
                let granted = tokio::time::timeout(bound, client.lease_grant(secs, None))
                    .await
                    .map_err(|_| anyhow!("lease grant: timed out"))??;
                let (keeper, stream) =
                    tokio::time::timeout(bound, client.lease_keep_alive(granted.id()))
                        .await
                        .map_err(|_| anyhow!("lease keep-alive: timed out"))??;
                lease = Some((granted.id(), keeper, stream));
            }
            let id = lease.as_ref().map(|l| l.0).unwrap_or_default();
            let value = serde_json::to_vec(&status)?;
            tokio::time::timeout(
                bound,
                client.put(key.as_str(), value, Some(PutOptions::new().with_lease(id))),
            )
            .await
            .map_err(|_| anyhow!("put: timed out"))??;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        match r {
            Ok(()) if failing => {
                info!("cluster: status published again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    warn!("cluster: publishing this node's status: {e:#}");
                }
                failing = true;
                lease = None;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    if let Some((id, _, _)) = lease {
        if let Ok(mut client) = shared.client().await {
            let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(id)).await;
        }
    }
}

/// The cluster's ACME store in etcd: `<prefix>clusters/<cluster>/acme/<key>`. A lock is a key
/// created only if absent (a transaction on its create revision), attached to a lease this node
/// keeps alive: if the node dies, etcd deletes the key when the lease ends.
pub struct AcmeShared {
    shared: Arc<Shared>,
    root: String,
}

/// A lock's lease: its time to live, kept alive every third of it.
const LOCK_TTL: i64 = 10;

impl AcmeShared {
    pub fn new(shared: Arc<Shared>) -> AcmeShared {
        let root = format!("{}acme/", shared.keys.nodes.trim_end_matches("nodes/"));
        AcmeShared { shared, root }
    }

    /// Where the cluster's ACME keys are.
    pub fn root(&self) -> &str {
        &self.root
    }
}

async fn bounded<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .map_err(|_| anyhow!("{what}: timed out"))?
        .with_context(|| what.to_string())
}

fn txn_puts(root: &str, pairs: Vec<(String, Vec<u8>)>, lease: Option<i64>) -> etcd_client::Txn {
    let ops: Vec<etcd_client::TxnOp> = pairs
        .into_iter()
        .map(|(k, v)| {
            etcd_client::TxnOp::put(
                format!("{root}{k}"),
                v,
                lease.map(|l| PutOptions::new().with_lease(l)),
            )
        })
        .collect();
    etcd_client::Txn::new().and_then(ops)
}

impl crate::proxy::acme::Shared for AcmeShared {
    fn read(
        &self,
        keys: Vec<String>,
    ) -> crate::proxy::acme::SharedFuture<'_, Vec<Option<Vec<u8>>>> {
        Box::pin(async move {
            let mut c = self.shared.client().await?;
            let gets: Vec<etcd_client::TxnOp> = keys
                .iter()
                .map(|k| etcd_client::TxnOp::get(format!("{}{k}", self.root), None))
                .collect();
            let r = bounded("ACME: GET", c.txn(etcd_client::Txn::new().and_then(gets))).await?;
            let mut out = Vec::with_capacity(keys.len());
            for op in r.op_responses() {
                let etcd_client::TxnOpResponse::Get(g) = op else {
                    bail!("ACME: etcd answered a GET with something else");
                };
                out.push(g.kvs().first().map(|kv| kv.value().to_vec()));
            }
            if out.len() != keys.len() {
                bail!("ACME: etcd answered {} of {} GETs", out.len(), keys.len());
            }
            Ok(out)
        })
    }

    fn write(&self, pairs: Vec<(String, Vec<u8>)>) -> crate::proxy::acme::SharedFuture<'_, ()> {
        Box::pin(async move {
            let mut c = self.shared.client().await?;
            bounded("ACME: TXN", c.txn(txn_puts(&self.root, pairs, None))).await?;
            Ok(())
        })
    }

    fn try_lock(
        &self,
        key: String,
    ) -> crate::proxy::acme::SharedFuture<'_, Option<Box<dyn crate::proxy::acme::Held>>> {
        Box::pin(async move {
            let mut c = self.shared.client().await?;
            let lease = bounded("ACME: LEASE GRANT", c.lease_grant(LOCK_TTL, None))
                .await?
                .id();
            let full = format!("{}{key}", self.root);
            let txn = etcd_client::Txn::new()
                .when([etcd_client::Compare::create_revision(
                    full.as_str(),
                    etcd_client::CompareOp::Equal,
                    0,
                )])
                .and_then([etcd_client::TxnOp::put(
                    full.as_str(),
                    self.shared.spec.node.as_str(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            let won = bounded("ACME: lock TXN", c.txn(txn)).await?.succeeded();
            if !won {
                let _ = bounded("ACME: LEASE REVOKE", c.lease_revoke(lease)).await;
                return Ok(None);
            }
            let (mut keeper, mut stream) =
                bounded("ACME: LEASE KEEPALIVE", c.lease_keep_alive(lease)).await?;
            let alive = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs((LOCK_TTL / 3) as u64)).await;
                    if keeper.keep_alive().await.is_err() {
                        warn!("ACME: the lock's lease could not be kept alive");
                    }
                    let _ = stream.message().await;
                }
            });
            info!(lock = %key, "ACME: lock taken");
            Ok(Some(Box::new(Lock {
                client: c,
                lease,
                root: self.root.clone(),
                alive,
            }) as Box<dyn crate::proxy::acme::Held>))
        })
    }
}

struct Lock {
    client: etcd_client::Client,
    lease: i64,
    root: String,
    alive: tokio::task::JoinHandle<()>,
}

impl Drop for Lock {
    /// A holder that is dropped without releasing (its task aborted: the node going down)
    /// stops keeping the lease alive, and etcd lets go of the lock when it ends.
    fn drop(&mut self) {
        self.alive.abort();
    }
}

impl crate::proxy::acme::Held for Lock {
    fn write(&self, pairs: Vec<(String, Vec<u8>)>) -> crate::proxy::acme::SharedFuture<'_, ()> {
        Box::pin(async move {
            let mut c = self.client.clone();
            bounded(
                "ACME: TXN",
                c.txn(txn_puts(&self.root, pairs, Some(self.lease))),
            )
            .await?;
            Ok(())
        })
    }

    fn release(self: Box<Self>) -> crate::proxy::acme::SharedFuture<'static, ()> {
        Box::pin(async move {
            let mut c = self.client.clone();
            // Revoking deletes the lock and every key under its lease (the challenges).
            bounded("ACME: LEASE REVOKE", c.lease_revoke(self.lease)).await?;
            Ok(())
        })
    }
}

/// Answers the challenges other nodes' orders share, as long as the agent runs: a GET of the
/// challenges, then a watch from its revision; starts over with a GET when the watch fails (and
/// forgets what went from etcd meanwhile).
pub async fn follow_challenges(shared: Arc<Shared>, store: Arc<crate::proxy::acme::Store>) {
    use crate::proxy::acme::SharedChallenge;
    let root = AcmeShared::new(shared.clone()).root;
    // The keys answered now, to forget those that went while the watch was down.
    let mut known: std::collections::BTreeSet<String> = Default::default();
    let mut delay = Duration::from_millis(200);
    loop {
        let r = async {
            let mut c = shared.client().await?;
            let resp = bounded(
                "ACME challenges: GET",
                c.get(root.as_str(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            let before = std::mem::take(&mut known);
            for kv in resp.kvs() {
                answer(
                    &store,
                    &mut known,
                    &String::from_utf8_lossy(kv.key()),
                    kv.value(),
                );
            }
            for gone in before.difference(&known) {
                if let Some(ch) = SharedChallenge::parse(gone) {
                    store.unshare_challenge(&ch);
                }
            }
            let opts = etcd_client::WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            let mut stream =
                bounded("ACME challenges: WATCH", c.watch(root.as_str(), Some(opts))).await?;
            delay = Duration::from_millis(200);
            while let Some(resp) = stream.message().await.context("watch")? {
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let Some(ch) = SharedChallenge::parse(&key) else {
                        continue;
                    };
                    match ev.event_type() {
                        etcd_client::EventType::Put => answer(&store, &mut known, &key, kv.value()),
                        etcd_client::EventType::Delete => {
                            store.unshare_challenge(&ch);
                            known.remove(&key);
                        }
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        if let Err(e) = r {
            warn!("ACME challenges: {e:#} (again in {delay:?})");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Installs one shared challenge's answer (checked: it comes from etcd).
fn answer(
    store: &crate::proxy::acme::Store,
    known: &mut std::collections::BTreeSet<String>,
    key: &str,
    value: &[u8],
) {
    let Some(ch) = crate::proxy::acme::SharedChallenge::parse(key) else {
        return;
    };
    match store.share_challenge(&ch, value) {
        Ok(()) => {
            known.insert(key.to_string());
        }
        Err(e) => warn!(key, "ACME: a shared challenge not used: {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, vips: &[(&str, Option<&str>)]) -> NodeStatus {
        NodeStatus {
            node: name.into(),
            version: "0".into(),
            started_unix: 0,
            updated_unix: 0,
            generation: 0,
            store_revision: 0,
            bgp: None,
            vips: vips
                .iter()
                .map(|(v, d)| VipStatus {
                    name: v.to_string(),
                    address: "10.0.0.100".into(),
                    port: 80,
                    table_digest: d.map(str::to_string),
                    backends: 1,
                    active: 1,
                    not_active: vec![],
                })
                .collect(),
        }
    }

    #[test]
    fn the_node_that_parts_from_the_majority_is_flagged() {
        let same = [("web", Some("aa")), ("dns", Some("bb"))];
        let ok = [node("a", &same), node("b", &same), node("c", &same)];
        assert!(disagreements(&ok).is_empty());
        let odd = [
            node("a", &same),
            node("b", &[("web", Some("cc")), ("dns", Some("bb"))]),
            node("c", &same),
        ];
        let d = disagreements(&odd);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!((d[0].node.as_str(), d[0].vip.as_str()), ("b", "web"));
        assert_eq!(d[0].majority.as_deref(), Some("aa"));
        // A node without a VIP the others have is flagged for it.
        let lacking = [node("a", &same), node("b", &[("dns", Some("bb"))])];
        let d = disagreements(&lacking);
        assert_eq!(d.len(), 2, "two nodes, no majority for web: {d:?}");
        assert!(d.iter().all(|x| x.vip == "web" && x.majority.is_none()));
        // No table yet is never agreement.
        let none = [node("a", &[("web", None)]), node("b", &[("web", None)])];
        assert_eq!(disagreements(&none).len(), 2);
    }

    #[test]
    fn a_status_record_is_refused_unless_it_is_bounded_and_names_its_key() {
        let good = serde_json::to_vec(&node("a", &[("web", Some("aa"))])).unwrap();
        assert_eq!(parse_status("a", &good).unwrap().node, "a");
        let e = parse_status("b", &good).unwrap_err();
        assert!(format!("{e:#}").contains("names node \"a\""), "{e:#}");
        let e = parse_status("a", b"{\"node\": 1}").unwrap_err();
        assert!(format!("{e:#}").contains("not a node's status"), "{e:#}");
        let mut big = good.clone();
        big.resize(MAX_STATUS + 1, b' ');
        let e = parse_status("a", &big).unwrap_err();
        assert!(format!("{e:#}").contains("longer than"), "{e:#}");
    }
}

//! The API store of a `[cluster]`: every node's API writes to one etcd prefix, and every node
//! (the writer too) follows it with a watch. etcd is the engine; lb only lays out keys.
//!
//! # Key layout
//!
//! ```text
//! <prefix>clusters/<cluster>/store/instances/<service>/<address:port>  →  {"service", "instance", "expires_unix"}
//! <prefix>clusters/<cluster>/store/overrides/<service>/<address:port>  →  {"service", "key", "kind"}
//! <prefix>clusters/<cluster>/nodes/<node>                              →  the node's status, under its lease
//! ```
//!
//! # Consistency
//!
//! A change is the difference between the store before and after it, written as puts and
//! deletes of single keys in one transaction, so two nodes changing different instances at once
//! both win. The writer applies its change as soon as etcd has acknowledged it; the watch then
//! brings the same keys back to every node with the revision they are at, and a node never goes
//! back to a revision older than one it has applied. An instance's TTL is an expiry time in its
//! value: every node hides it once past, and the first to notice deletes it.
//!
//! # etcd unreachable
//!
//! Writes fail (the API answers `503`) and change nothing. Every node keeps forwarding on the
//! last state it had; a node that starts meanwhile uses its local copy of the store (written on
//! every change it sees). The watch starts over with backoff and converges once etcd answers.

use std::{collections::BTreeMap, sync::Mutex, time::Instant};

use anyhow::{anyhow, Context as _, Result};
use etcd_client::{Client, Txn, TxnOp, WatchOptions};
use tokio::sync::mpsc;
use tracing::info;

use super::{
    etcd::{bounded, connect, get_all, Entries},
    kv::{check_registration, Backoff},
    store::{Data, OverrideEntry, Registered},
    Event, Rank,
};
use crate::model::{instance::InstanceKey, ClusterSpec};

/// etcd refuses a transaction of more than 128 operations (its `--max-txn-ops` default).
const TXN_OPS: usize = 100;
/// A store record is a registration; anything much larger is not one of lb's.
const MAX_VALUE: usize = 64 * 1024;
const DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(20);
const MAX_DELAY: std::time::Duration = std::time::Duration::from_millis(200);

/// Where a cluster's keys are.
#[derive(Clone, Debug)]
pub struct Keys {
    pub store: String,
    pub nodes: String,
}

impl Keys {
    pub fn of(spec: &ClusterSpec) -> Keys {
        let root = format!("{}clusters/{}/", spec.etcd.prefix, spec.name);
        Keys {
            store: format!("{root}store/"),
            nodes: format!("{root}nodes/"),
        }
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}{node}", self.nodes)
    }
}

/// One connection to the cluster's etcd, shared by the store, the watch and the status
/// publisher. The client reconnects by itself; a client that never connected is made again.
pub struct Shared {
    pub spec: ClusterSpec,
    pub keys: Keys,
    client: Mutex<Option<Client>>,
}

impl Shared {
    pub fn new(spec: ClusterSpec) -> Shared {
        Shared {
            keys: Keys::of(&spec),
            spec,
            client: Mutex::new(None),
        }
    }

    pub async fn client(&self) -> Result<Client> {
        if let Some(c) = self
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(c);
        }
        let c = connect(&self.spec.etcd).await?;
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }

    /// Writes what changed from `old` to `new`; the revision etcd is at after it.
    pub async fn write(&self, old: &Data, new: &Data) -> Result<Option<i64>> {
        let (before, after) = (
            encode(&self.keys.store, old)?,
            encode(&self.keys.store, new)?,
        );
        let mut ops: Vec<TxnOp> = Vec::new();
        for (k, v) in &after {
            if before.get(k) != Some(v) {
                ops.push(TxnOp::put(k.as_str(), v.as_slice(), None));
            }
        }
        for k in before.keys().filter(|k| !after.contains_key(*k)) {
            ops.push(TxnOp::delete(k.as_str(), None));
        }
        if ops.is_empty() {
            return Ok(None);
        }
        let mut client = self.client().await?;
        let mut revision = None;
        for chunk in ops.chunks(TXN_OPS) {
            let txn = Txn::new().and_then(chunk.to_vec());
            let resp = bounded("the cluster store's TXN", client.txn(txn)).await?;
            revision = resp.header().map(|h| h.revision());
        }
        Ok(revision)
    }

    /// The store as etcd has it now, with its revision.
    pub async fn read(&self) -> Result<(i64, Data, Vec<String>)> {
        let mut client = self.client().await?;
        let (revision, entries) = get_all(&mut client, &self.keys.store).await?;
        let (data, rejected) = decode(&self.keys.store, &entries);
        Ok((revision, data, rejected))
    }
}

fn key_text(k: &InstanceKey) -> String {
    std::net::SocketAddr::new(k.address, k.port).to_string()
}

fn instance_key(root: &str, service: &str, k: &InstanceKey) -> String {
    format!("{root}instances/{service}/{}", key_text(k))
}

fn override_key(root: &str, service: &str, k: &InstanceKey) -> String {
    format!("{root}overrides/{service}/{}", key_text(k))
}

/// The store as etcd keys and values.
fn encode(root: &str, d: &Data) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for r in &d.instances {
        let k = instance_key(root, &r.service, &r.instance.key());
        out.insert(k, serde_json::to_vec(r)?);
    }
    for o in &d.overrides {
        out.insert(
            override_key(root, &o.service, &o.key),
            serde_json::to_vec(o)?,
        );
    }
    Ok(out)
}

/// The store from etcd's keys. Each record is checked as an API registration is, and must sit
/// under the key its content names (a record copied to the wrong key is refused, not moved);
/// what is refused is said, and the rest counts.
pub fn decode(root: &str, entries: &Entries) -> (Data, Vec<String>) {
    let mut data = Data::default();
    let mut rejected = Vec::new();
    for (k, v) in entries {
        let key = String::from_utf8_lossy(k);
        let Some(rest) = key.strip_prefix(root) else {
            continue;
        };
        let r = if v.len() > MAX_VALUE {
            Err(anyhow!("longer than {MAX_VALUE} bytes"))
        } else if rest.starts_with("instances/") {
            serde_json::from_slice::<Registered>(v)
                .context("not a registration")
                .and_then(|r| {
                    check_registration(&r.service, &r.instance)?;
                    let want = instance_key(root, &r.service, &r.instance.key());
                    anyhow::ensure!(want == key, "its content belongs under {want:?}");
                    data.instances.push(r);
                    Ok(())
                })
        } else if rest.starts_with("overrides/") {
            serde_json::from_slice::<OverrideEntry>(v)
                .context("not an override")
                .and_then(|o| {
                    let want = override_key(root, &o.service, &o.key);
                    anyhow::ensure!(want == key, "its content belongs under {want:?}");
                    data.overrides.push(o);
                    Ok(())
                })
        } else {
            Err(anyhow!("not a key of the store"))
        };
        if let Err(e) = r {
            rejected.push(format!(
                "key {:?}: {e:#}",
                key.chars().take(200).collect::<String>()
            ));
        }
    }
    (data, rejected)
}

/// Follows the store until the control loop goes away: each burst of changes is sent whole,
/// with its revision, as the `api` source's content.
pub async fn watch(shared: std::sync::Arc<Shared>, events: mpsc::Sender<Event>) {
    let mut backoff = Backoff::new();
    loop {
        match session(&shared, &events, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                let ev = Event::Error {
                    provider: "api".into(),
                    rank: Rank::API,
                    error: format!("cluster store: {e:#} (retrying in {delay:?})"),
                };
                if events.send(ev).await.is_err() {
                    return;
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn send(
    events: &mpsc::Sender<Event>,
    root: &str,
    revision: i64,
    e: &Entries,
    at: Instant,
) -> bool {
    let (data, rejected) = decode(root, e);
    for r in &rejected {
        tracing::warn!("cluster store: rejected {r}");
    }
    let ev = Event::ClusterStore {
        data: Box::new(data),
        revision,
        rejected,
        at,
    };
    events.send(ev).await.is_ok()
}

async fn session(
    shared: &Shared,
    events: &mpsc::Sender<Event>,
    backoff: &mut Backoff,
) -> Result<()> {
    let mut client = shared.client().await?;
    let root = shared.keys.store.clone();
    let at = crate::clock::now();
    let (mut revision, mut entries) = get_all(&mut client, &root).await?;
    info!(revision, keys = entries.len(), "cluster store: connected");
    if !send(events, &root, revision, &entries, at).await {
        return Ok(());
    }
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = bounded("WATCH", client.watch(root.as_str(), Some(opts))).await?;
    let next = |r: Result<Option<etcd_client::WatchResponse>, etcd_client::Error>| {
        r.context("watch")?
            .ok_or_else(|| anyhow!("the watch stream closed"))
    };
    loop {
        let resp = next(stream.message().await)?;
        if resp.created() {
            backoff.reset();
        }
        let mut changed = fold(&mut entries, &mut revision, &resp)?;
        if !changed {
            continue;
        }
        let at = crate::clock::now();
        let deadline = crate::clock::timer_now() + MAX_DELAY;
        while changed {
            let quiet = (crate::clock::timer_now() + DEBOUNCE).min(deadline);
            match tokio::time::timeout_at(quiet, stream.message()).await {
                Ok(r) => {
                    fold(&mut entries, &mut revision, &next(r)?)?;
                }
                Err(_) => changed = false,
            }
        }
        if !send(events, &root, revision, &entries, at).await {
            return Ok(());
        }
    }
}

fn fold(
    entries: &mut Entries,
    revision: &mut i64,
    resp: &etcd_client::WatchResponse,
) -> Result<bool> {
    let changed = super::etcd::apply(entries, resp)?;
    if let Some(h) = resp.header() {
        *revision = (*revision).max(h.revision());
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::instance::Instance;

    fn inst(a: &str, port: u16) -> Instance {
        Instance {
            address: a.parse().unwrap(),
            port,
            weight: 1,
            zone: None,
            metadata: Default::default(),
        }
    }

    #[test]
    fn records_round_trip_and_misplaced_ones_are_refused() {
        let root = "lb/clusters/c/store/";
        let mut d = Data::default();
        d.instances.push(Registered {
            service: "web".into(),
            instance: inst("10.0.0.1", 80),
            expires_unix: Some(5),
        });
        d.instances.push(Registered {
            service: "web".into(),
            instance: inst("fd00::1", 80),
            expires_unix: None,
        });
        d.overrides.push(OverrideEntry {
            service: "web".into(),
            key: inst("10.0.0.9", 80).key(),
            kind: super::super::store::Override::Drained,
        });
        let enc = encode(root, &d).unwrap();
        assert!(enc.contains_key("lb/clusters/c/store/instances/web/[fd00::1]:80"));
        let mut entries: Entries = enc
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
            .collect();
        let (back, rejected) = decode(root, &entries);
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(encode(root, &back).unwrap(), enc);
        // A record under another instance's key, a heavy weight, junk: each refused by name.
        let v = enc["lb/clusters/c/store/instances/web/10.0.0.1:80"].clone();
        entries.insert(b"lb/clusters/c/store/instances/web/10.0.0.2:80".to_vec(), v);
        let mut heavy = inst("10.0.0.3", 80);
        heavy.weight = 5000;
        let heavy = serde_json::to_vec(&Registered {
            service: "web".into(),
            instance: heavy,
            expires_unix: None,
        })
        .unwrap();
        entries.insert(
            b"lb/clusters/c/store/instances/web/10.0.0.3:80".to_vec(),
            heavy,
        );
        entries.insert(b"lb/clusters/c/store/whatever".to_vec(), b"{}".to_vec());
        let (back, rejected) = decode(root, &entries);
        assert_eq!(rejected.len(), 3, "{rejected:?}");
        assert_eq!(back.instances.len(), 2);
        assert!(rejected[0].contains("belongs under"), "{rejected:?}");
    }
}

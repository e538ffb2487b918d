//! The `etcd` provider: service instances registered in etcd, alive while their lease is.
//!
//! # Key layout
//!
//! ```text
//! <prefix>services/<service>/<address:port>  →  instance JSON, attached to a lease
//! ```
//!
//! e.g. (prefix `lb/`, the default):
//!
//! ```text
//! etcdctl lease grant 10                      # → lease 694d7a5c1e2f0a0b granted with TTL(10s)
//! etcdctl put --lease=694d7a5c1e2f0a0b lb/services/web/10.0.0.11:80 '{"address":"10.0.0.11","port":80}'
//! etcdctl lease keep-alive 694d7a5c1e2f0a0b
//! ```
//!
//! The value and the rules a key must follow are described in [`super::kv`]. Liveness is the
//! lease: when its holder stops keeping it alive, etcd deletes the key. `lb register --ttl`
//! grants a lease and attaches the key (re-running it grants a new one and moves the key to it);
//! `lb register --ttl … --keep-alive` keeps the lease alive until it is stopped. A key without a
//! lease stays until deleted.
//!
//! # Watching
//!
//! One GET of the prefix gives the state and its revision; a watch on the prefix starts at the next
//! revision, so nothing between the two is missed. Each burst of watch events (debounced 20 ms, at
//! most 200 ms) is applied to the provider's copy of the prefix and sent as a complete snapshot.
//!
//! # Failures
//!
//! Invalid entries are rejected one by one (the others count). When the watch fails (etcd down,
//! the connection lost, the revision compacted), the provider reports an error, sends no snapshot
//! — the registry keeps the last good one — and starts over with a GET (retrying with backoff,
//! 200 ms doubling to 5 s), which sends a fresh snapshot once etcd answers.

use std::{collections::BTreeMap, time::Duration, time::Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions, WatchResponse,
};
use tokio::{sync::mpsc, time::timeout};
use tracing::info;

use super::{
    kv::{self, Backoff, KeyError},
    Event, Rank,
};
use crate::{
    model::instance::{Instance, InstanceKey, Services},
    model::EtcdSpec,
};

/// The provider's name in the registry, the API and the logs.
pub const NAME: &str = "etcd";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const DEBOUNCE: Duration = Duration::from_millis(20);
const MAX_DELAY: Duration = Duration::from_millis(200);

/// A client for `spec`: its user when one is set, TLS when a CA is (files read at every
/// connect, so a renewed client certificate is picked up at the next reconnection).
pub(crate) async fn connect(spec: &EtcdSpec) -> Result<Client> {
    if spec.endpoints.is_empty() {
        bail!("etcd endpoints: empty");
    }
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        // HTTP/2 pings: a silently dead connection fails the watch instead of hanging it.
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        // A member cut off from the quorum refuses, rather than serving stale data.
        .with_require_leader(true);
    if let Some(a) = &spec.auth {
        opts = opts.with_user(a.username.clone(), a.password.clone());
    }
    if let Some(t) = &spec.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("etcd TLS: reading {}", p.display()))
        };
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca)?));
        if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
            tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &t.server_name {
            tls = tls.domain_name(name.clone());
        }
        opts = opts.with_tls(tls);
    }
    timeout(
        CONNECT_TIMEOUT,
        Client::connect(spec.endpoints.clone(), Some(opts)),
    )
    .await
    .map_err(|_| anyhow!("connecting to etcd: timed out"))?
    .context("connecting to etcd")
}

/// Bounds a request: a balanced channel with no reachable endpoint waits rather than failing.
pub(crate) async fn bounded<T, E: std::error::Error + Send + Sync + 'static>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T> {
    timeout(IO_TIMEOUT, f)
        .await
        .map_err(|_| anyhow!("{what}: timed out"))?
        .with_context(|| what.to_string())
}

pub(crate) type Entries = BTreeMap<Vec<u8>, Vec<u8>>;

/// Every entry whose key starts with `key`, and the revision they are at.
pub(crate) async fn get_all(client: &mut Client, key: &str) -> Result<(i64, Entries)> {
    let resp = bounded(
        "GET",
        client.get(key, Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = resp
        .header()
        .map(|h| h.revision())
        .ok_or_else(|| anyhow!("GET: the answer has no header"))?;
    let entries = resp
        .kvs()
        .iter()
        .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
        .collect();
    Ok((revision, entries))
}

fn snapshot(prefix: &str, entries: &Entries) -> (Services, Vec<KeyError>) {
    kv::snapshot(
        prefix,
        entries.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
    )
}

/// One read of the prefix, for the agent's first apply.
pub async fn read_once(spec: &EtcdSpec) -> Result<(Services, Vec<KeyError>)> {
    let mut client = connect(spec).await?;
    let (_, entries) = get_all(&mut client, &kv::services_prefix(&spec.prefix)).await?;
    Ok(snapshot(&spec.prefix, &entries))
}

/// Folds a watch response into the copy of the prefix; false when it carried no change.
pub(crate) fn apply(entries: &mut Entries, resp: &WatchResponse) -> Result<bool> {
    if resp.canceled() {
        if resp.compact_revision() > 0 {
            bail!(
                "the watch fell behind a compaction (revision {})",
                resp.compact_revision()
            );
        }
        bail!("the watch was canceled: {}", resp.cancel_reason());
    }
    let mut changed = false;
    for ev in resp.events() {
        let Some(kv) = ev.kv() else { continue };
        match ev.event_type() {
            EventType::Put => {
                entries.insert(kv.key().to_vec(), kv.value().to_vec());
            }
            EventType::Delete => {
                entries.remove(kv.key());
            }
        }
        changed = true;
    }
    Ok(changed)
}

/// One connection's life: GET, watch from the next revision, snapshot each burst of events.
/// Ok: the control loop is gone. Err: etcd failed (the caller reports and retries).
async fn session(
    spec: &EtcdSpec,
    layout: &kv::Layout,
    events: &mpsc::Sender<Event>,
    backoff: &mut Backoff,
) -> Result<()> {
    let mut client = connect(spec).await?;
    let at = crate::clock::now();
    let key = layout.key_prefix();
    let (revision, mut entries) = get_all(&mut client, &key).await?;
    info!(
        provider = layout.provider(NAME),
        revision,
        keys = entries.len(),
        "connected"
    );
    if !report(events, layout, &entries, at).await {
        return Ok(());
    }
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = bounded("WATCH", client.watch(key.as_str(), Some(opts))).await?;
    loop {
        let resp = stream
            .message()
            .await
            .context("watch")?
            .ok_or_else(|| anyhow!("the watch stream closed"))?;
        if resp.created() {
            backoff.reset();
        }
        if !apply(&mut entries, &resp)? {
            continue;
        }
        let at = crate::clock::now();
        // Debounce: a burst of changes costs one snapshot.
        let deadline = crate::clock::timer_now() + MAX_DELAY;
        loop {
            let quiet = (crate::clock::timer_now() + DEBOUNCE).min(deadline);
            match tokio::time::timeout_at(quiet, stream.message()).await {
                Ok(r) => {
                    let resp = r
                        .context("watch")?
                        .ok_or_else(|| anyhow!("the watch stream closed"))?;
                    apply(&mut entries, &resp)?;
                }
                Err(_) => break,
            }
        }
        if !report(events, layout, &entries, at).await {
            return Ok(());
        }
    }
}

async fn report(
    events: &mpsc::Sender<Event>,
    layout: &kv::Layout,
    entries: &Entries,
    at: Instant,
) -> bool {
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = entries
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    kv::report_range(events, NAME, Rank::ETCD, layout, &pairs, at).await
}

/// Runs the provider until the control loop goes away: lb's instances, and with `traefik_root`
/// a Traefik configuration beside them (its own session, reported as `etcd:traefik`).
pub async fn run(spec: EtcdSpec, events: mpsc::Sender<Event>) -> Result<()> {
    if let Some(root) = spec.traefik_root.clone() {
        let file_dirs = spec.traefik_file_dirs.clone();
        let (spec, events) = (spec.clone(), events.clone());
        tokio::spawn(async move {
            let layout = kv::Layout::Traefik {
                root,
                file_dirs,
                kept: Default::default(),
            };
            run_range(spec, layout, events).await
        });
    }
    let layout = kv::Layout::Lb {
        prefix: spec.prefix.clone(),
    };
    run_range(spec, layout, events).await
}

async fn run_range(spec: EtcdSpec, layout: kv::Layout, events: mpsc::Sender<Event>) -> Result<()> {
    let mut backoff = Backoff::new();
    loop {
        match session(&spec, &layout, &events, &mut backoff).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                let delay = backoff.next_delay();
                let ev = Event::Error {
                    provider: layout.provider(NAME),
                    rank: Rank::ETCD,
                    error: format!("{e:#} (retrying in {delay:?})"),
                };
                if events.send(ev).await.is_err() {
                    return Ok(());
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Writes an instance under its key. With `ttl`, the key is attached to a new lease of that TTL
/// (etcd rounds it up to its minimum, about 2 s), whose id is returned: keep it alive with
/// [`keep_alive`], or the instance disappears when it expires.
pub async fn register(
    spec: &EtcdSpec,
    service: &str,
    instance: &Instance,
    ttl: Option<Duration>,
) -> Result<Option<i64>> {
    kv::check_registration(service, instance)?;
    let key = kv::instance_key(&spec.prefix, service, instance.key());
    let value = kv::encode(instance)?;
    let mut client = connect(spec).await?;
    let lease = match ttl {
        Some(ttl) => {
            let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
            Some(
                bounded("LEASE GRANT", client.lease_grant(secs, None))
                    .await?
                    .id(),
            )
        }
        None => None,
    };
    let opts = lease.map(|id| PutOptions::new().with_lease(id));
    bounded(&format!("PUT {key}"), client.put(key.as_str(), value, opts)).await?;
    Ok(lease)
}

/// Refreshes a lease once. False: it is gone (expired or revoked) and must be registered again.
pub async fn keep_alive(spec: &EtcdSpec, lease: i64) -> Result<bool> {
    let mut client = connect(spec).await?;
    // The client sends the first keep-alive itself and fails when the lease does not exist.
    match timeout(IO_TIMEOUT, client.lease_keep_alive(lease)).await {
        Err(_) => bail!("LEASE KEEPALIVE: timed out"),
        Ok(Ok(_)) => Ok(true),
        Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => Ok(false),
        Ok(Err(e)) => Err(e).context("LEASE KEEPALIVE"),
    }
}

/// Deletes an instance's key. Returns whether there was one.
pub async fn deregister(spec: &EtcdSpec, service: &str, key: InstanceKey) -> Result<bool> {
    let key = kv::instance_key(&spec.prefix, service, key);
    let mut client = connect(spec).await?;
    let resp = bounded(&format!("DELETE {key}"), client.delete(key.as_str(), None)).await?;
    Ok(resp.deleted() > 0)
}

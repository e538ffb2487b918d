//! The `api` provider: changes made through the admin API, persisted under the state directory so
//! they survive a restart. One JSON file, replaced atomically (write a temporary file, fsync,
//! rename): a crash leaves the old or the new store, never half of one.
//!
//! Besides instances registered through the API (optionally with a TTL: an instance that stops
//! re-registering expires), the store holds operator overrides on instances that other providers
//! report: `removed` masks an instance from every source, `drained` keeps its flows but sends it
//! no new ones. Registering the instance again through the API clears its override.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use super::cluster::Shared;

use crate::model::instance::{Instance, InstanceKey, Services};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Override {
    Removed,
    Drained,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Registered {
    pub(super) service: String,
    pub(super) instance: Instance,
    /// Unix seconds; absent: never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) expires_unix: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OverrideEntry {
    pub(super) service: String,
    pub(super) key: InstanceKey,
    pub(super) kind: Override,
}

/// The store's content: what the file holds, or what the cluster's keys say.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Data {
    #[serde(default)]
    pub(super) instances: Vec<Registered>,
    #[serde(default)]
    pub(super) overrides: Vec<OverrideEntry>,
}

/// Where the store's content is kept.
enum Backend {
    /// One JSON file: the node is alone.
    File(PathBuf),
    /// The cluster's etcd prefix, and a local copy of it for a start while etcd is away.
    Cluster { shared: Arc<Shared>, copy: PathBuf },
}

pub struct Store {
    backend: Backend,
    data: Data,
    /// Cluster: the etcd revision of `data` (a watch's older news is not applied over it).
    revision: i64,
}

/// A change that could not be stored because the cluster's etcd did not take it: nothing
/// changed, and trying again later is the remedy (the API says `503`).
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the cluster store did not take the change: {}", self.0)
    }
}

impl std::error::Error for Unavailable {}

/// The store's content at one moment, to go back to when what followed could not be applied.
pub struct Checkpoint(Data);

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Store {
    /// Opens (or starts) the store at `path`. An unreadable store is an error, not an empty one:
    /// starting empty would silently drop every change an operator made.
    pub fn open(path: &Path) -> Result<Store> {
        Ok(Store {
            data: Self::read_file(path)?,
            backend: Backend::File(path.to_path_buf()),
            revision: 0,
        })
    }

    fn read_file(path: &Path) -> Result<Data> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: the API store is corrupt; move it aside to start empty",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Data::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The cluster's store, as etcd has it; when etcd does not answer, the local copy this node
    /// kept of it (the watch brings the rest once etcd is back).
    pub async fn open_cluster(shared: Arc<Shared>, copy: &Path) -> Result<Store> {
        const FIRST_READ: Duration = Duration::from_secs(3);
        let read = tokio::time::timeout(FIRST_READ, shared.read())
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after {FIRST_READ:?}")));
        let (data, revision) = match read {
            Ok((revision, data, rejected)) => {
                for r in rejected {
                    tracing::warn!("cluster store: rejected {r}");
                }
                if let Err(e) = Self::persist(copy, &data) {
                    tracing::warn!("cluster store: keeping a local copy: {e:#}");
                }
                (data, revision)
            }
            Err(e) => {
                let data = Self::read_file(copy)?;
                tracing::warn!(
                    copy = %copy.display(),
                    instances = data.instances.len(),
                    "cluster store: etcd did not answer ({e:#}); starting on the local copy"
                );
                (data, 0)
            }
        };
        Ok(Store {
            backend: Backend::Cluster {
                shared,
                copy: copy.to_path_buf(),
            },
            data,
            revision,
        })
    }

    /// The watch's news: the cluster's store at `revision`. False when it is older than what
    /// this node has applied, or the same.
    pub fn adopt(&mut self, data: Data, revision: i64) -> bool {
        let Backend::Cluster { copy, .. } = &self.backend else {
            return false;
        };
        if revision < self.revision || (revision == self.revision && data == self.data) {
            return false;
        }
        if let Err(e) = Self::persist(copy, &data) {
            tracing::warn!("cluster store: keeping a local copy: {e:#}");
        }
        self.revision = revision;
        let changed = data != self.data;
        self.data = data;
        changed
    }

    /// The etcd revision in force (0: not in a cluster, or not heard from etcd yet).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Makes `next` the store's content: stored first (on disk, or in the cluster's etcd), and
    /// only then in force, so a write that fails leaves both as they were.
    fn replace(&mut self, next: Data) -> Result<()> {
        match &self.backend {
            Backend::File(path) => Self::persist(path, &next)?,
            Backend::Cluster { shared, copy } => {
                let handle = tokio::runtime::Handle::try_current()
                    .map_err(|e| Unavailable(format!("no runtime to reach etcd: {e}")))?;
                let written = handle
                    .block_on(shared.write(&self.data, &next))
                    .map_err(|e| Unavailable(format!("{e:#}")))?;
                if let Some(r) = written {
                    self.revision = self.revision.max(r);
                }
                if let Err(e) = Self::persist(copy, &next) {
                    tracing::warn!("cluster store: keeping a local copy: {e:#}");
                }
            }
        }
        self.data = next;
        Ok(())
    }

    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint(self.data.clone())
    }

    /// Goes back to `c` (on disk too).
    pub fn restore(&mut self, c: Checkpoint) -> Result<()> {
        self.replace(c.0)
    }

    fn persist(path: &Path, data: &Data) -> Result<()> {
        use std::io::Write as _;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = path.with_extension("json.tmp");
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(data)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
        Ok(())
    }

    /// Adds or updates an instance (and clears any override on it). `ttl`: it expires unless
    /// registered again within that time. A TTL whose expiry time does not fit is refused (the
    /// API bounds TTLs before; this keeps the store safe for any caller).
    pub fn register(
        &mut self,
        service: &str,
        instance: Instance,
        ttl: Option<Duration>,
        now: SystemTime,
    ) -> Result<bool> {
        let key = instance.key();
        let expires_unix = match ttl {
            None => None,
            Some(t) => Some(
                unix(now)
                    .checked_add(t.as_secs().max(1))
                    .filter(|e| *e < i64::MAX as u64)
                    .ok_or_else(|| anyhow::anyhow!("ttl_secs: {} is too large", t.as_secs()))?,
            ),
        };
        let mut next = self.data.clone();
        next.overrides
            .retain(|o| !(o.service == service && o.key == key));
        let entry = Registered {
            service: service.into(),
            instance,
            expires_unix,
        };
        let created = match next
            .instances
            .iter_mut()
            .find(|r| r.service == service && r.instance.key() == key)
        {
            Some(r) => {
                *r = entry;
                false
            }
            None => {
                next.instances.push(entry);
                true
            }
        };
        self.replace(next)?;
        Ok(created)
    }

    /// Removes an API-registered instance; with `mask`, also hides it from every other provider.
    pub fn remove(&mut self, service: &str, key: InstanceKey, mask: bool) -> Result<()> {
        let mut next = self.data.clone();
        next.instances
            .retain(|r| !(r.service == service && r.instance.key() == key));
        set_override(&mut next, service, key, mask.then_some(Override::Removed));
        self.replace(next)
    }

    pub fn drain(&mut self, service: &str, key: InstanceKey) -> Result<()> {
        let mut next = self.data.clone();
        set_override(&mut next, service, key, Some(Override::Drained));
        self.replace(next)
    }

    pub fn override_of(&self, service: &str, key: &InstanceKey) -> Option<Override> {
        self.data
            .overrides
            .iter()
            .find(|o| o.service == service && o.key == *key)
            .map(|o| o.kind)
    }

    pub fn has(&self, service: &str, key: &InstanceKey) -> bool {
        self.data
            .instances
            .iter()
            .any(|r| r.service == service && r.instance.key() == *key)
    }

    /// Drops expired registrations; returns whether any went.
    pub fn expire(&mut self, now: SystemTime) -> Result<bool> {
        let t = unix(now);
        if self
            .data
            .instances
            .iter()
            .all(|r| r.expires_unix.is_none_or(|e| e > t))
        {
            return Ok(false);
        }
        let mut next = self.data.clone();
        next.instances
            .retain(|r| r.expires_unix.is_none_or(|e| e > t));
        self.replace(next)?;
        Ok(true)
    }

    /// The registered, unexpired instances.
    pub fn snapshot(&self, now: SystemTime) -> Services {
        let t = unix(now);
        let mut out = Services::new();
        for r in self
            .data
            .instances
            .iter()
            .filter(|r| r.expires_unix.is_none_or(|e| e > t))
        {
            out.entry(r.service.clone())
                .or_default()
                .insert(r.instance.key(), r.instance.clone());
        }
        out
    }
}

fn set_override(data: &mut Data, service: &str, key: InstanceKey, kind: Option<Override>) {
    data.overrides
        .retain(|o| !(o.service == service && o.key == key));
    if let Some(kind) = kind {
        data.overrides.push(OverrideEntry {
            service: service.into(),
            key,
            kind,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(a: &str) -> Instance {
        Instance {
            address: a.parse().unwrap(),
            port: 80,
            weight: 1,
            zone: None,
            metadata: Default::default(),
        }
    }

    #[test]
    fn survives_reopen_and_expires_by_ttl() {
        let dir = std::env::temp_dir().join(format!("lb-store-test-{}", std::process::id()));
        let path = dir.join("api-store.json");
        let _ = std::fs::remove_dir_all(&dir);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut s = Store::open(&path).unwrap();
        assert!(s.register("web", inst("10.0.0.1"), None, t0).unwrap());
        assert!(s
            .register("web", inst("10.0.0.2"), Some(Duration::from_secs(10)), t0)
            .unwrap());
        s.drain("web", inst("10.0.0.9").key()).unwrap();
        let s = Store::open(&path).unwrap();
        assert_eq!(s.snapshot(t0)["web"].len(), 2);
        assert_eq!(
            s.override_of("web", &inst("10.0.0.9").key()),
            Some(Override::Drained)
        );
        let mut s = s;
        assert!(s.expire(t0 + Duration::from_secs(11)).unwrap());
        assert_eq!(s.snapshot(t0 + Duration::from_secs(11))["web"].len(), 1);
        // Registering again clears an override.
        s.register("web", inst("10.0.0.9"), None, t0).unwrap();
        assert_eq!(s.override_of("web", &inst("10.0.0.9").key()), None);
        std::fs::write(&path, "{ not json").unwrap();
        assert!(
            Store::open(&path).is_err(),
            "a corrupt store is refused, not emptied"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_ttl_that_overflows_is_refused_and_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("lb-store-ttl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = Store::open(&dir.join("api-store.json")).unwrap();
        let now = crate::clock::wall();
        s.register("web", inst("10.0.0.1"), None, now).unwrap();
        let r = s.register(
            "web",
            inst("10.0.0.2"),
            Some(Duration::from_secs(u64::MAX)),
            now,
        );
        assert!(r.is_err(), "refused, not wrapped around");
        assert_eq!(s.snapshot(now)["web"].len(), 1, "nothing half-applied");
        assert!(!s.has("web", &inst("10.0.0.2").key()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

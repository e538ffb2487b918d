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

use crate::model::instance::{Instance, InstanceKey, Services};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Override {
    Removed,
    Drained,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Registered {
    service: String,
    instance: Instance,
    /// Unix seconds; absent: never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_unix: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct OverrideEntry {
    service: String,
    key: InstanceKey,
    kind: Override,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Data {
    #[serde(default)]
    instances: Vec<Registered>,
    #[serde(default)]
    overrides: Vec<OverrideEntry>,
}

pub struct Store {
    path: PathBuf,
    data: Data,
}

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
        let data = match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: the API store is corrupt; move it aside to start empty",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Data::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Store {
            path: path.to_path_buf(),
            data,
        })
    }

    /// Makes `next` the store's content: written to disk first, and only then in force, so a
    /// write that fails leaves both the file and the memory as they were.
    fn replace(&mut self, next: Data) -> Result<()> {
        Self::persist(&self.path, &next)?;
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

//! What the key-value providers (Redis, etcd) share: the key layout, the parsing and validation of
//! what is stored under it, reporting, and the reconnect backoff.
//!
//! Layout, the same in both stores:
//!
//! ```text
//! <prefix>services/<service>/<address:port>  →  {"address":"10.0.0.11","port":80,"weight":1,"zone":"a","metadata":{"mac":"02:00:00:00:00:11"}}
//! ```
//!
//! `<prefix>` is the provider's `prefix` (default `lb/`), `<service>` is `[A-Za-z0-9_.-]`,
//! `<address:port>` is the instance's socket address written canonically (`10.0.0.11:80`,
//! `[fd00::11]:80`). The value is the instance as JSON: `address` is required, `port` defaults to
//! 0, `weight` to 1 (at most 1000), `zone` and `metadata` are optional; unknown fields are refused.
//!
//! A key that breaks a rule — a name of another shape, a value that is not such JSON, an
//! `address`/`port` in the value other than the key's — is rejected with an error naming the key;
//! every other instance still counts.

use std::{fmt, net::SocketAddr, time::Duration, time::Instant};

use anyhow::{bail, Result};
use tokio::sync::mpsc;
use tracing::debug;

use super::Event;
use crate::{
    model::instance::{Instance, InstanceKey, Services},
    model::valid_name,
};

/// `<prefix>services/`: everything the providers read is under it.
pub fn services_prefix(prefix: &str) -> String {
    format!("{prefix}services/")
}

/// `<prefix>services/<service>/<address:port>`.
pub fn instance_key(prefix: &str, service: &str, key: InstanceKey) -> String {
    format!("{prefix}services/{service}/{key}")
}

/// The stored value of an instance.
pub fn encode(instance: &Instance) -> Result<String> {
    Ok(serde_json::to_string(instance)?)
}

/// What `lb register` refuses to write (the providers would reject it).
pub fn check_registration(service: &str, instance: &Instance) -> Result<()> {
    if !valid_name(service) {
        bail!("{service:?}: service names are [A-Za-z0-9_.-], at most 128 characters");
    }
    if instance.weight > 1000 {
        bail!("weight {} is above 1000", instance.weight);
    }
    Ok(())
}

/// A rejected key: which, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key {:?}: {}", self.key, self.reason)
    }
}

/// Parses one stored entry into its service and instance.
pub fn parse_entry(prefix: &str, key: &[u8], value: &[u8]) -> Result<(String, Instance), KeyError> {
    let name = String::from_utf8_lossy(key).into_owned();
    let fail = |reason: String| KeyError {
        key: name.clone(),
        reason,
    };
    let want = services_prefix(prefix);
    let Some(rest) = name.strip_prefix(&want) else {
        return Err(fail(format!("not under {want:?}")));
    };
    if std::str::from_utf8(key).is_err() {
        return Err(fail("the key is not UTF-8".into()));
    }
    let Some((service, addr)) = rest.split_once('/') else {
        return Err(fail(format!("expected {want}<service>/<address:port>")));
    };
    if !valid_name(service) {
        return Err(fail(format!(
            "service {service:?}: service names are [A-Za-z0-9_.-], at most 128 characters"
        )));
    }
    let Ok(sock) = addr.parse::<SocketAddr>() else {
        return Err(fail(format!(
            "{addr:?} is not <address:port> (10.0.0.11:80, [fd00::11]:80)"
        )));
    };
    let instance: Instance = serde_json::from_slice(value)
        .map_err(|e| fail(format!("value is not an instance: {e}")))?;
    let named = InstanceKey {
        address: sock.ip(),
        port: sock.port(),
    };
    if instance.key() != named {
        return Err(fail(format!(
            "the key names {named} but the value is {}",
            instance.key()
        )));
    }
    if addr != named.to_string() {
        return Err(fail(format!(
            "{addr:?} is not written canonically: use {named}"
        )));
    }
    if instance.weight > 1000 {
        return Err(fail(format!("weight {} is above 1000", instance.weight)));
    }
    Ok((service.to_string(), instance))
}

/// A complete snapshot of the valid entries, and the rejected ones.
pub fn snapshot<'a>(
    prefix: &str,
    entries: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> (Services, Vec<KeyError>) {
    let mut services = Services::new();
    let mut errors = Vec::new();
    for (k, v) in entries {
        match parse_entry(prefix, k, v) {
            Ok((service, instance)) => {
                services
                    .entry(service)
                    .or_default()
                    .insert(instance.key(), instance);
            }
            Err(e) => errors.push(e),
        }
    }
    (services, errors)
}

/// Sends a snapshot, then one error per rejected key. False: the control loop is gone.
pub async fn report(
    events: &mpsc::Sender<Event>,
    provider: &str,
    rank: u8,
    services: Services,
    errors: Vec<KeyError>,
    at: Instant,
) -> bool {
    let snapshot = Event::Snapshot {
        provider: provider.to_string(),
        rank,
        services,
        at,
    };
    if events.send(snapshot).await.is_err() {
        return false;
    }
    for e in errors {
        // The control loop logs every error event (as a warning); this is for tracing providers.
        debug!(provider, "rejected: {e}");
        let ev = Event::Error {
            provider: provider.to_string(),
            rank,
            error: format!("rejected {e}"),
        };
        if events.send(ev).await.is_err() {
            return false;
        }
    }
    true
}

/// What a watched key range holds: lb's instances, or a Traefik dynamic configuration in
/// Traefik's KV layout (`<root>/http/routers/<name>/rule`, …), which the same providers read so a
/// Traefik user's store works as it is. Its records may name files (certificates, CAs, users
/// files) only inside `file_dirs` (the provider's `traefik_file_dirs`; none by default): whoever
/// can write a key must not be able to have the root agent read any file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    Lb {
        prefix: String,
    },
    Traefik {
        root: String,
        file_dirs: Vec<std::path::PathBuf>,
        /// The last good version of each item, across reads and reconnections.
        kept: KeptItems,
    },
}

/// A range's [`super::traefik::keep::Kept`], shared by the provider's sessions (a layout is
/// cloned into each). Layouts compare by what they read; this compares by identity.
#[derive(Clone, Default)]
pub struct KeptItems(std::sync::Arc<std::sync::Mutex<super::traefik::keep::Kept>>);

impl PartialEq for KeptItems {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for KeptItems {}

impl std::fmt::Debug for KeptItems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeptItems")
    }
}

impl Layout {
    /// The keys it covers start with this.
    pub fn key_prefix(&self) -> String {
        match self {
            Layout::Lb { prefix } => services_prefix(prefix),
            Layout::Traefik { root, .. } => format!("{}/", root.trim_end_matches('/')),
        }
    }

    /// The provider's name for this range (`redis`, `redis:traefik`).
    pub fn provider(&self, base: &str) -> String {
        match self {
            Layout::Lb { .. } => base.to_string(),
            Layout::Traefik { .. } => format!("{base}:traefik"),
        }
    }
}

/// Sends what a complete read of a range means: for lb's layout a snapshot and the rejected
/// keys; for Traefik's, its routing and its servers, or — when the configuration does not
/// translate — one error naming the key, the last good routing staying. False: the control loop
/// is gone.
pub async fn report_range(
    events: &mpsc::Sender<Event>,
    base: &str,
    rank: u8,
    layout: &Layout,
    entries: &[(Vec<u8>, Vec<u8>)],
    at: Instant,
) -> bool {
    let provider = layout.provider(base);
    match layout {
        Layout::Lb { prefix } => {
            let (services, errors) = snapshot(
                prefix,
                entries.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
            );
            report(events, &provider, rank, services, errors, at).await
        }
        Layout::Traefik {
            root,
            file_dirs,
            kept,
        } => {
            let pairs: Vec<(String, String)> = entries
                .iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(k).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .collect();
            // Translating resolves server host names: blocking work, off the runtime's threads.
            let root_owned = root.clone();
            let files = super::traefik::Files::Within(file_dirs.clone());
            let kept = kept.clone();
            let kind = base.to_string();
            let translated = tokio::task::spawn_blocking(move || {
                let doc = super::traefik::from_kv(
                    &root_owned,
                    pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                );
                let mut kept = kept.0.lock().unwrap_or_else(|p| p.into_inner());
                kept.translate(doc, &files, &kind)
            })
            .await
            .unwrap_or_else(|e| {
                Err(super::traefik::TraefikError {
                    path: String::new(),
                    reason: format!("translation failed: {e}"),
                    item: None,
                })
            });
            let key_of = |path: &str| {
                format!(
                    "{}/{}",
                    root.trim_end_matches('/'),
                    path.replace('[', "/").replace(']', "").replace('.', "/")
                )
            };
            match translated {
                Ok(o) => {
                    let t = o.translated;
                    let broken = o
                        .broken
                        .iter()
                        .map(|b| format!("key {:?}: {b}", key_of(&b.error.path)))
                        .collect();
                    let routing = Event::Routing {
                        provider: provider.clone(),
                        rank,
                        routing: Box::new(t.dynamic),
                        unsupported: t.unsupported,
                        broken,
                    };
                    if events.send(routing).await.is_err() {
                        return false;
                    }
                    report(events, &provider, rank, t.services, Vec::new(), at).await
                }
                Err(e) => {
                    let key = key_of(&e.path);
                    let ev = Event::Error {
                        provider,
                        rank,
                        error: format!("key {key:?}: {}", e.reason),
                    };
                    events.send(ev).await.is_ok()
                }
            }
        }
    }
}

/// Reconnect delays: 200 ms, doubling, at most 5 s; back to 200 ms once a session works.
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const MIN: Duration = Duration::from_millis(200);
    pub const MAX: Duration = Duration::from_secs(5);

    pub fn new() -> Self {
        Backoff { next: Self::MIN }
    }

    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(Self::MAX);
        d
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(key: &str, value: &str) -> Result<(String, Instance), KeyError> {
        parse_entry("lb/", key.as_bytes(), value.as_bytes())
    }

    #[test]
    fn valid_entries_parse() {
        let (svc, i) = parse(
            "lb/services/web/10.0.0.11:80",
            r#"{"address":"10.0.0.11","port":80,"weight":3,"zone":"a"}"#,
        )
        .expect("valid");
        assert_eq!(
            (svc.as_str(), i.weight, i.zone.as_deref()),
            ("web", 3, Some("a"))
        );
        let (_, i) = parse(
            "lb/services/db/[fd00::11]:5432",
            r#"{"address":"fd00::11","port":5432}"#,
        )
        .expect("v6");
        assert_eq!(i.weight, 1);
        let i = Instance {
            address: "10.0.0.1".parse().unwrap(),
            port: 8080,
            weight: 2,
            zone: None,
            metadata: [("mac".to_string(), "02:00:00:00:00:01".to_string())].into(),
        };
        let key = instance_key("lb/", "web", i.key());
        assert_eq!(key, "lb/services/web/10.0.0.1:8080");
        let (_, back) = parse(&key, &encode(&i).unwrap()).expect("round trip");
        assert_eq!(back, i);
    }

    #[test]
    fn invalid_entries_name_the_key() {
        for (key, value, why) in [
            (
                "lb/services/web/10.0.0.11:80",
                "{not json",
                "not an instance",
            ),
            (
                "lb/services/web/10.0.0.11:80",
                r#"{"address":"10.0.0.12","port":80}"#,
                "names 10.0.0.11:80 but the value is 10.0.0.12:80",
            ),
            (
                "lb/services/web/10.0.0.11:80",
                r#"{"address":"10.0.0.11","port":80,"wieght":1}"#,
                "unknown field",
            ),
            ("lb/services/web", r#"{"address":"10.0.0.11"}"#, "expected"),
            (
                "lb/services/w b/10.0.0.11:0",
                r#"{"address":"10.0.0.11"}"#,
                "service",
            ),
            (
                "lb/services/web/10.0.0.11",
                r#"{"address":"10.0.0.11"}"#,
                "address:port",
            ),
            (
                "lb/services/web/[fd00:0::11]:80",
                r#"{"address":"fd00::11","port":80}"#,
                "canonically",
            ),
            (
                "lb/services/web/10.0.0.11:80",
                r#"{"address":"10.0.0.11","port":80,"weight":1001}"#,
                "above 1000",
            ),
        ] {
            let e = parse(key, value).expect_err(key);
            assert_eq!(e.key, key);
            assert!(e.reason.contains(why), "{key}: {e}");
            assert!(e.to_string().contains(key), "{e}");
        }
    }

    #[test]
    fn a_bad_entry_loses_nothing_else() {
        let entries: Vec<(&[u8], &[u8])> = vec![
            (
                b"lb/services/web/10.0.0.1:80",
                br#"{"address":"10.0.0.1","port":80}"#,
            ),
            (b"lb/services/web/10.0.0.2:80", b"garbage"),
            (
                b"lb/services/web/10.0.0.3:80",
                br#"{"address":"10.0.0.3","port":80}"#,
            ),
        ];
        let (s, e) = snapshot("lb/", entries);
        assert_eq!(s["web"].len(), 2);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].key, "lb/services/web/10.0.0.2:80");
    }

    #[test]
    fn backoff_is_bounded() {
        let mut b = Backoff::new();
        let d: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(d, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), Backoff::MIN);
    }
}

//! Host names of Traefik servers (`http://api.internal:8080`), resolved when a configuration is
//! translated and again when their answers expire: a provider translates its configuration anew
//! at the earliest expiry ([`Lookups::refresh_at`]), so a changed record is a new set of
//! upstreams, through the same path as an edited file.
//!
//! The DNS server is the system's (`/etc/resolv.conf`, with `/etc/hosts`) or the one
//! `[providers.dns] resolver` names; TTLs are honoured, but never below `min_ttl` (a TTL of 0
//! does not make a loop), or replaced by a fixed `refresh`.
//!
//! Translation is synchronous (it runs off the runtime, in `spawn_blocking`, or in
//! `lb check-config`), so each lookup runs on a thread of its own with a runtime of its own: it
//! may be called from anywhere, a runtime's worker included, and takes nothing from the
//! runtime's threads beyond the wait.

use std::{
    net::IpAddr,
    sync::OnceLock,
    time::{Duration, Instant},
};

use crate::model::sources::DnsSpec;

static SPEC: OnceLock<DnsSpec> = OnceLock::new();

/// Sets how names are resolved, once, before any provider starts (the agent does, from
/// lb.toml). Without it: the system's resolver and a floor of one second.
pub fn configure(spec: &DnsSpec) {
    let _ = SPEC.set(spec.clone());
}

fn spec() -> DnsSpec {
    SPEC.get().cloned().unwrap_or_default()
}

/// A name's addresses and until when they hold.
#[derive(Debug, Clone)]
pub struct Answer {
    pub addresses: Vec<IpAddr>,
    pub until: Instant,
}

/// How long a name's last answer still serves when the DNS server fails to answer: a short
/// outage of the resolver does not take a working service down.
const STALE_FOR: Duration = Duration::from_secs(300);

/// How many names' last outcomes are kept (names come from configuration: this only bounds
/// what a key-value store full of names could grow).
const REMEMBERED: usize = 4096;

/// The last outcome of each name: a good answer (served stale for [`STALE_FOR`] when the server
/// fails), or a failure (answered again, at once, until it is to be retried: a translation
/// does not wait on a failing name each time it runs).
#[derive(Default)]
struct Memory {
    good: std::collections::HashMap<String, (Answer, Instant)>,
    failed: std::collections::HashMap<String, (String, Instant)>,
}

static MEMORY: std::sync::Mutex<Option<Memory>> = std::sync::Mutex::new(None);

fn remember<T>(f: impl FnOnce(&mut Memory) -> T) -> T {
    let mut m = MEMORY.lock().unwrap_or_else(|p| p.into_inner());
    f(m.get_or_insert_with(Memory::default))
}

/// A lookup of `host` (not an address literal): its answer, or why there is none.
pub fn lookup(host: &str) -> Result<Answer, String> {
    let now = crate::clock::now();
    if let Some(why) = remember(|m| {
        m.failed
            .get(host)
            .filter(|(_, retry)| *retry > now)
            .map(|(w, _)| w.clone())
    }) {
        return Err(why);
    }
    let spec = spec();
    let name = host.to_string();
    let asked = std::thread::Builder::new()
        .name("lb-dns".into())
        .spawn(move || -> Result<Answer, Failure> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Failure::transient(format!("DNS: {e}")))?;
            rt.block_on(ask(&spec, &name))
        })
        .map_err(|e| Failure::transient(format!("DNS: {e}")))
        .and_then(|t| {
            t.join()
                .map_err(|_| Failure::transient("DNS: the lookup failed".into()))
        })
        .and_then(|r| r)
        .and_then(|a| match a.addresses.is_empty() {
            true => Err(Failure {
                why: format!("{host:?} has no address"),
                authoritative: true,
            }),
            false => Ok(a),
        });
    let done = crate::clock::now();
    remember(|m| {
        if m.good.len() >= REMEMBERED || m.failed.len() >= REMEMBERED {
            m.good.clear();
            m.failed.clear();
        }
        match asked {
            Ok(a) => {
                m.failed.remove(host);
                m.good.insert(host.to_string(), (a.clone(), done));
                Ok(a)
            }
            Err(Failure { why, authoritative }) => {
                m.failed.insert(host.to_string(), (why.clone(), retry_at()));
                match m.good.get(host) {
                    // The server did not answer: the last answer, while it is recent, asked
                    // again at the next retry. An answer that the name has no address is
                    // believed at once.
                    Some((a, got)) if !authoritative && done.duration_since(*got) < STALE_FOR => {
                        tracing::warn!("{why}; its last answer serves until DNS answers again");
                        Ok(Answer {
                            addresses: a.addresses.clone(),
                            until: retry_at(),
                        })
                    }
                    _ => Err(why),
                }
            }
        }
    })
}

/// Why a lookup gave no address: `authoritative` when the DNS said so (no such name, no
/// records), rather than failing to answer.
struct Failure {
    why: String,
    authoritative: bool,
}

impl Failure {
    fn transient(why: String) -> Failure {
        Failure {
            why,
            authoritative: false,
        }
    }
}

async fn ask(spec: &DnsSpec, host: &str) -> Result<Answer, Failure> {
    use hickory_resolver::{
        config::{NameServerConfig, ResolverConfig, ResolverOpts},
        net::runtime::TokioRuntimeProvider,
        Resolver,
    };
    let builder = match spec.resolver {
        Some(addr) => {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut ns.connections {
                c.port = addr.port();
            }
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
            .with_options(ResolverOpts::default())
        }
        None => Resolver::builder(TokioRuntimeProvider::default())
            .map_err(|e| Failure::transient(format!("DNS: the system's configuration: {e}")))?,
    };
    let resolver = builder
        .build()
        .map_err(|e| Failure::transient(format!("DNS: {e}")))?;
    // As written: the system's search domains and ndots apply to a short name, as they do for
    // Traefik (a trailing dot makes it absolute).
    let found = tokio::time::timeout(Duration::from_secs(5), resolver.lookup_ip(host))
        .await
        .map_err(|_| Failure::transient(format!("{host:?}: no DNS answer within 5 s")))?
        .map_err(|e| Failure {
            authoritative: e.is_no_records_found(),
            why: format!("{host:?}: {e}"),
        })?;
    let now = crate::clock::now();
    let until = match spec.refresh {
        Some(every) => now + every,
        None => found.valid_until().max(now + spec.min_ttl),
    };
    Ok(Answer {
        addresses: found.iter().collect(),
        until,
    })
}

/// The answers one translation used: when the earliest of them runs out, the configuration is
/// translated again.
#[derive(Debug, Default, Clone)]
pub struct Lookups {
    earliest: Option<Instant>,
}

impl Lookups {
    pub fn used(&mut self, until: Instant) {
        self.earliest = Some(self.earliest.map_or(until, |e| e.min(until)));
    }

    /// When to translate again (`None`: no name was looked up).
    pub fn refresh_at(&self) -> Option<Instant> {
        self.earliest
    }
}

/// What a failed lookup still tells: when to try again.
pub fn retry_at() -> Instant {
    let spec = spec();
    crate::clock::now()
        + spec
            .refresh
            .unwrap_or(spec.min_ttl)
            .max(Duration::from_secs(1))
}

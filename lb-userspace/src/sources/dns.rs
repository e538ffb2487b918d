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

/// A lookup of `host` (not an address literal): its answer, or why there is none.
pub fn lookup(host: &str) -> Result<Answer, String> {
    let spec = spec();
    let name = host.to_string();
    let asked = std::thread::Builder::new()
        .name("lb-dns".into())
        .spawn(move || -> Result<Answer, String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("DNS: {e}"))?;
            rt.block_on(ask(&spec, &name))
        })
        .map_err(|e| format!("DNS: {e}"))?
        .join()
        .map_err(|_| "DNS: the lookup failed".to_string())?;
    let answer = asked?;
    if answer.addresses.is_empty() {
        return Err(format!("{host:?} has no address"));
    }
    Ok(answer)
}

async fn ask(spec: &DnsSpec, host: &str) -> Result<Answer, String> {
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
            .map_err(|e| format!("DNS: the system's configuration: {e}"))?,
    };
    let resolver = builder.build().map_err(|e| format!("DNS: {e}"))?;
    // A name is absolute: no search domains make it another one.
    let fqdn = match host.ends_with('.') {
        true => host.to_string(),
        false => format!("{host}."),
    };
    let found = tokio::time::timeout(Duration::from_secs(5), resolver.lookup_ip(fqdn))
        .await
        .map_err(|_| format!("{host:?}: no DNS answer within 5 s"))?
        .map_err(|e| format!("{host:?}: {e}"))?;
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

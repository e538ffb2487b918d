//! The control loop: registry + operator overrides + health → desired backends per VIP → the
//! balancer's minimal map updates.
//!
//! Provider events are coalesced: the loop takes the first event, then everything that arrives
//! within [`COALESCE`], and applies once. Providers send complete snapshots, so a storm of 1,000
//! updates a second costs a few applies, never a queue that grows. The time from the oldest event
//! of a batch to the maps being written is measured and logged (`change_to_map_us`).

pub mod cluster;
pub mod health;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    l4::{Balancer, Desired},
    model::instance::{Instance, InstanceKey, Services},
    model::{BackendMode, Mac, Mode, VipSpec},
    registry::Registry,
    sources::{store::Override, store::Store, Event, Rank},
};

/// How long the loop keeps collecting events after the first one before applying.
pub const COALESCE: Duration = Duration::from_millis(10);

#[derive(Clone, Debug, Default, Serialize)]
pub struct ApplyStats {
    pub applies: u64,
    pub events: u64,
    pub map_writes: u64,
    pub last_change_to_map_us: u64,
    pub max_change_to_map_us: u64,
    pub generation: u64,
    /// Why the last config file reload was rejected (cleared by a good one).
    pub last_config_error: Option<String>,
    /// Why the last apply (or an API change) failed, the previous state staying in force;
    /// cleared by the next apply that succeeds.
    pub last_apply_error: Option<String>,
}

/// Locks the control state. A panic while it was held cannot have left it half-changed where it
/// matters (the store and the registry are replaced whole, and the next apply rewrites the maps
/// from them), so a poisoned lock is taken over and said in the log rather than turning every
/// later API call, `/metrics` scrape and provider change into an error.
pub fn lock(c: &Mutex<Control>) -> MutexGuard<'_, Control> {
    c.lock().unwrap_or_else(|poisoned| {
        tracing::error!("the control state's lock was poisoned by a panic; carrying on");
        c.clear_poison();
        poisoned.into_inner()
    })
}

/// A panic's message, for the log (never for a client).
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

pub struct Control {
    pub balancer: Balancer,
    pub registry: Registry,
    pub store: Store,
    pub vips: Vec<VipSpec>,
    down: BTreeSet<(String, InstanceKey)>,
    pub stats: ApplyStats,
    adopted: bool,
    /// What the L7 proxy is fed: its routing and the instances of its services, published
    /// whole on a watch whenever a part of it changed.
    pub l7: Option<L7Feed>,
    /// Change-to-apply latency for `/metrics`.
    pub obs: ControlObs,
    /// `[bgp]`: the VIP addresses to announce, for the announcer (`None`: no `[bgp]`).
    pub announce: Option<tokio::sync::watch::Sender<crate::model::bgp::Announce>>,
    /// What the announcer last said of bird (for the node's status).
    pub bgp_status: Option<tokio::sync::watch::Receiver<crate::model::bgp::BgpStatus>>,
    /// The interfaces the program must be attached to for this node to be announced.
    pub interfaces: Vec<String>,
    /// `lb leave`: announce nothing from now on.
    pub leaving: bool,
}

/// The config file's inline backends, as the `config` provider's snapshot.
fn config_services(vips: &[VipSpec]) -> Services {
    let mut out = Services::new();
    for v in vips {
        let svc = out.entry(v.service.clone()).or_default();
        for b in &v.backends {
            let mut metadata = BTreeMap::new();
            if let Some(mac) = b.mac {
                metadata.insert("mac".to_string(), mac.to_string());
            }
            let i = Instance {
                address: b.address,
                port: b.port,
                weight: b.weight,
                zone: None,
                metadata,
            };
            svc.insert(i.key(), i);
        }
    }
    out
}

impl Control {
    pub fn new(balancer: Balancer, store: Store, vips: Vec<VipSpec>) -> Control {
        let mut registry = Registry::default();
        let now = crate::clock::wall();
        registry.update("config", Rank::CONFIG, config_services(&vips), now);
        registry.update("api", Rank::API, store.snapshot(now), now);
        Control {
            balancer,
            registry,
            store,
            vips,
            down: BTreeSet::new(),
            stats: ApplyStats::default(),
            adopted: false,
            l7: None,
            obs: Default::default(),
            announce: None,
            bgp_status: None,
            interfaces: Vec::new(),
            leaving: false,
        }
    }

    pub fn vip(&self, name: &str) -> Option<&VipSpec> {
        self.vips.iter().find(|v| v.name == name)
    }

    /// Folds one event into the registry / health state.
    pub fn handle(&mut self, ev: Event) {
        self.stats.events += 1;
        match ev {
            Event::Snapshot {
                provider,
                rank,
                services,
                ..
            } => {
                self.registry
                    .update(&provider, rank, services, crate::clock::wall());
            }
            Event::Error {
                provider,
                rank,
                error,
            } => {
                warn!(provider, "provider error: {error}");
                self.registry.fail(&provider, rank, error);
            }
            Event::Health { vip, key, up, .. } => {
                if up {
                    self.down.remove(&(vip, key));
                } else {
                    self.down.insert((vip, key));
                }
            }
            Event::StoreChanged { .. } => self.refresh_store(),
            Event::ClusterStore {
                data,
                revision,
                rejected,
                ..
            } => {
                if self.store.adopt(*data, revision) {
                    info!(revision, "cluster store changed");
                }
                // Refreshed either way: it clears an error the watch reported before.
                self.refresh_store();
                for r in rejected {
                    self.registry
                        .fail("api", Rank::API, format!("cluster store: rejected {r}"));
                }
            }
            Event::Neighbour { address, mac, .. } => {
                if self.balancer.learn_neighbour(address, mac) {
                    info!(backend = %address, %mac, "neighbour resolved");
                }
            }
            Event::Routing {
                provider,
                rank,
                routing,
                unsupported,
                broken,
            } => {
                let routers = routing.routers.len();
                for u in &unsupported {
                    warn!(provider, "routing: {u}");
                }
                for b in &broken {
                    warn!(provider, "routing: broken: {b}");
                }
                // What the proxy cannot build from it, it reports itself (`Proxy::problems`).
                if let Some(f) = &mut self.l7 {
                    f.dynamic.insert(provider.clone(), *routing);
                }
                self.registry
                    .routing(&provider, rank, routers, unsupported, broken);
            }
        }
    }

    /// New inline backends from a reloaded config file (the `config` provider's snapshot).
    pub fn set_config_backends(&mut self, vips: &[VipSpec]) {
        self.registry.update(
            "config",
            Rank::CONFIG,
            config_services(vips),
            crate::clock::wall(),
        );
    }

    /// Re-reads the API store into the registry (after an API change or an expiry).
    pub fn refresh_store(&mut self) {
        let now = crate::clock::wall();
        self.registry
            .update("api", Rank::API, self.store.snapshot(now), now);
    }

    /// Instances of a service, after operator removals.
    pub fn instances(&self, service: &str) -> Vec<Instance> {
        let merged = self.registry.merged();
        merged
            .get(service)
            .map(|m| {
                m.values()
                    .filter(|i| {
                        self.store.override_of(service, &i.key()) != Some(Override::Removed)
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What every VIP's backends should be now.
    pub fn desired(&self) -> BTreeMap<String, Vec<Desired>> {
        let merged = self.registry.merged();
        let mut out = BTreeMap::new();
        for v in &self.vips {
            let list = merged
                .get(&v.service)
                .map(|m| {
                    m.values()
                        .filter_map(|i| {
                            let key = i.key();
                            let state = match self.store.override_of(&v.service, &key) {
                                Some(Override::Removed) => return None,
                                Some(Override::Drained) => BackendMode::Draining,
                                None if self.down.contains(&(v.name.clone(), key)) => {
                                    BackendMode::Down
                                }
                                None => BackendMode::Active,
                            };
                            let mac = i.metadata.get("mac").and_then(|m| m.parse::<Mac>().ok());
                            Some(Desired {
                                key,
                                weight: i.weight,
                                mac,
                                state,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.insert(v.name.clone(), list);
        }
        out
    }

    /// The proxy's services: registry instances minus operator removals and drains.
    pub fn proxy_services(&self, names: &[String]) -> Services {
        let mut out = Services::new();
        for name in names {
            let list = self
                .instances(name)
                .into_iter()
                .filter(|i| self.store.override_of(name, &i.key()) != Some(Override::Drained))
                .map(|i| (i.key(), i))
                .collect();
            out.insert(name.clone(), list);
        }
        out
    }

    /// Applies the desired state; `since` is when the oldest change in this batch happened. A
    /// failure is kept in [`ApplyStats::last_apply_error`] (shown by `/api/v1/status`) until an
    /// apply succeeds.
    pub fn apply(&mut self, since: Instant) -> Result<usize> {
        match self.apply_inner(since) {
            Ok(n) => {
                self.stats.last_apply_error = None;
                Ok(n)
            }
            Err(e) => {
                self.stats.last_apply_error = Some(format!("{e:#}"));
                Err(e)
            }
        }
    }

    /// lb.toml's routing, after a reload; published with the next [`Control::publish_l7`].
    pub fn set_l7_config(&mut self, base: crate::proxy::L7Config) {
        if let Some(f) = &mut self.l7 {
            f.base = Arc::new(base);
        }
    }

    /// Publishes the proxy's desired state if any part of it changed; the generation in force
    /// once the proxy has it ([`crate::proxy::Proxy::installed`]).
    pub fn publish_l7(&mut self) -> u64 {
        let Some(f) = &self.l7 else { return 0 };
        let names = crate::proxy::wanted_services(&f.base, f.dynamic.values());
        let services = self.proxy_services(&names);
        let Some(f) = &mut self.l7 else { return 0 };
        let last = f.tx.borrow().clone();
        let next = crate::proxy::L7State {
            generation: last.generation + 1,
            base: f.base.clone(),
            dynamic: f.dynamic.clone(),
            services,
        };
        if next.same(&last) {
            return last.generation;
        }
        let generation = next.generation;
        f.tx.send_replace(Arc::new(next));
        generation
    }

    /// What should be announced now: each VIP address with a backend taking new flows in
    /// `desired` (one VIP with backends is enough for its address), while the program is
    /// attached on every interface and the node is not leaving.
    pub fn announce_set(
        &self,
        desired: &BTreeMap<String, Vec<Desired>>,
    ) -> crate::model::bgp::Announce {
        if self.leaving || !self.balancer.serving(&self.interfaces) {
            return Default::default();
        }
        self.vips
            .iter()
            .filter(|v| {
                desired.get(&v.name).is_some_and(|d| {
                    d.iter()
                        .any(|b| b.state == BackendMode::Active && b.weight > 0)
                })
            })
            .map(|v| v.address)
            .collect()
    }

    /// Tells the announcer what to announce, when that changed.
    pub fn announce(&mut self) {
        if self.announce.is_none() {
            return;
        }
        let set = self.announce_set(&self.desired());
        if let Some(tx) = &self.announce {
            tx.send_if_modified(|cur| {
                let changed = *cur != set;
                *cur = set;
                changed
            });
        }
    }

    fn apply_inner(&mut self, since: Instant) -> Result<usize> {
        self.publish_l7();
        let mut writes = 0;
        for (vip, desired) in self.desired() {
            writes += self.balancer.apply(&vip, &desired)?;
        }
        // After the maps have it: a VIP is announced once its table is written.
        self.announce();
        if !self.adopted {
            self.balancer.finish_adoption()?;
            self.adopted = true;
        }
        let us = since.elapsed().as_micros() as u64;
        self.stats.applies += 1;
        self.stats.map_writes += writes as u64;
        self.stats.generation = self.registry.generation;
        if writes > 0 {
            self.stats.last_change_to_map_us = us;
            self.stats.max_change_to_map_us = self.stats.max_change_to_map_us.max(us);
            self.obs.change_to_apply.observe(us as f64 / 1e6);
            info!(change_to_map_us = us, map_writes = writes, "applied");
        }
        Ok(writes)
    }

    /// Where to probe each backend of `vip`: the health port, else the backend's, else the VIP's.
    pub fn health_targets(&self, vip: &str) -> Vec<(InstanceKey, SocketAddr)> {
        let Some(v) = self.vip(vip) else {
            return Vec::new();
        };
        let hport = v.health.as_ref().map(|h| h.port).unwrap_or(0);
        self.instances(&v.service)
            .into_iter()
            .map(|i| {
                let port = if hport != 0 {
                    hport
                } else if i.port != 0 && v.mode == Mode::Nat {
                    i.port
                } else {
                    v.port
                };
                (i.key(), SocketAddr::new(i.address, port))
            })
            .collect()
    }
}

/// Runs the loop until the event channel closes.
pub async fn run(control: Arc<Mutex<Control>>, mut rx: mpsc::Receiver<Event>) {
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    loop {
        let mut batch = Vec::new();
        let since;
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => { since = crate::clock::now(); batch.push(ev); }
                None => return,
            },
            _ = expiry.tick() => {
                since = crate::clock::now();
                let c = control.clone();
                let expired = tokio::task::spawn_blocking(move || {
                    let mut c = lock(&c);
                    // A program detached or a link deleted since: withdrawn within a second.
                    c.announce();
                    c.store.expire(crate::clock::wall())
                }).await;
                match expired {
                    Ok(Ok(true)) => batch.push(Event::StoreChanged { at: since }),
                    Ok(Err(e)) => warn!("API store: {e:#}"),
                    Ok(Ok(false)) => {}
                    Err(e) => warn!("API store expiry task: {e}"),
                }
                if batch.is_empty() { continue; }
            }
        }
        let deadline = crate::clock::timer_now() + COALESCE;
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            batch.push(ev);
        }
        let oldest = batch
            .iter()
            .filter_map(|e| match e {
                Event::Snapshot { at, .. }
                | Event::Health { at, .. }
                | Event::StoreChanged { at }
                | Event::ClusterStore { at, .. }
                | Event::Neighbour { at, .. } => Some(*at),
                Event::Error { .. } | Event::Routing { .. } => None,
            })
            .min()
            .unwrap_or(since);
        let c = control.clone();
        let r = tokio::task::spawn_blocking(move || -> Result<usize> {
            let mut c = lock(&c);
            // A panic (a bug: every input was validated by its provider) stays in this batch:
            // the loop, and the lock, live on for the next one.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                for ev in batch {
                    c.handle(ev);
                }
                c.apply(oldest)
            }))
            .unwrap_or_else(|p| {
                let what = panic_text(&p);
                c.stats.last_apply_error = Some(format!("control loop panicked: {what}"));
                Err(anyhow::anyhow!("control loop panicked: {what}"))
            })
        })
        .await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!("apply failed: {e:#}"),
            Err(e) => warn!("apply task: {e}"),
        }
    }
}

/// The proxy's side of control: lb.toml's routing, each provider's, and the sender of the
/// whole ([`crate::proxy::L7State`]) that the proxy follows.
pub struct L7Feed {
    tx: tokio::sync::watch::Sender<Arc<crate::proxy::L7State>>,
    base: Arc<crate::proxy::L7Config>,
    dynamic: BTreeMap<String, crate::model::l7::Dynamic>,
}

impl L7Feed {
    /// A feed starting from lb.toml's routing, and the receiver for [`crate::proxy::Proxy::follow`].
    pub fn new(
        base: crate::proxy::L7Config,
    ) -> (
        L7Feed,
        tokio::sync::watch::Receiver<Arc<crate::proxy::L7State>>,
    ) {
        let base = Arc::new(base);
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(crate::proxy::L7State {
            generation: 0,
            base: base.clone(),
            dynamic: BTreeMap::new(),
            services: Services::new(),
        }));
        (
            L7Feed {
                tx,
                base,
                dynamic: BTreeMap::new(),
            },
            rx,
        )
    }
}

/// Change-to-apply latency: 100 µs to 10 s.
const APPLY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// What the control loop records as it applies (registered by [`crate::observe::metrics::Metrics::new`]).
#[derive(Clone)]
pub struct ControlObs {
    /// From the oldest change of a batch to the maps being written.
    pub change_to_apply: prometheus::Histogram,
}

impl Default for ControlObs {
    fn default() -> Self {
        let opts = prometheus::HistogramOpts::new(
            "lb_config_change_to_apply_seconds",
            "Time from a change (provider event, API call, health verdict) to its map writes",
        )
        .buckets(APPLY_BUCKETS.to_vec());
        ControlObs {
            // Static options, checked by the tests: never something input can cause.
            change_to_apply: prometheus::Histogram::with_opts(opts)
                .expect("static metric definition"),
        }
    }
}

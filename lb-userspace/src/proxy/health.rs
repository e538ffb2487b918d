//! Active checks of HTTP services' upstreams (Traefik's `loadBalancer.healthCheck`, lb.toml's
//! `[http_service.health]`).
//!
//! One task per (service, upstream) sends the configured request through the service's own
//! client, so a check speaks the TLS, client certificate and server name real requests do, and
//! an upstream that only fails under TLS is found. Its verdict is one flag the service's pools
//! read on every pick ([`super::balance::Pool::with_checks`]); it lives here, not in a pool, so a
//! table rebuild (a registry change, another router) neither resets a down upstream to up nor
//! restarts its checks. Only the upstream's answers count: no client request is involved, so
//! nothing a client does can take an upstream out.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use hyper::{header, Method, Request};
use prometheus::IntGauge;
use tracing::{info, warn};

use super::{client::UpstreamClient, obs};
use crate::model::l7::ActiveCheck;

/// The running checks, by service.
#[derive(Default)]
pub struct Checks {
    running: Mutex<HashMap<String, Running>>,
}

struct Running {
    spec: ActiveCheck,
    /// Whether the client speaks TLS (its checks go as `https://`).
    tls: bool,
    targets: HashMap<SocketAddr, Target>,
}

struct Target {
    down: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Checks {
    /// Makes `service`'s checks those of `spec` on `addrs` and returns each upstream's flag. A
    /// new upstream starts up (as in Traefik: a new agent must not refuse traffic until the
    /// first round is in); one checked before keeps its verdict, even when the check changes.
    pub fn sync(
        &self,
        service: &str,
        spec: &ActiveCheck,
        client: &UpstreamClient,
        addrs: &[SocketAddr],
        metrics: &obs::Http,
    ) -> HashMap<SocketAddr, Arc<AtomicBool>> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!(
                service,
                "active health checks need the agent's runtime; the service is checked passively only"
            );
            return HashMap::new();
        };
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let r = running
            .entry(service.to_string())
            .or_insert_with(|| Running {
                spec: spec.clone(),
                tls: client.tls,
                targets: HashMap::new(),
            });
        let changed = r.spec != *spec || r.tls != client.tls;
        r.spec = spec.clone();
        r.tls = client.tls;
        let wanted: HashSet<SocketAddr> = addrs.iter().copied().collect();
        r.targets.retain(|a, _| {
            let keep = wanted.contains(a);
            if !keep {
                metrics.forget_server(service, *a);
            }
            keep
        });
        let mut flags = HashMap::new();
        for &addr in &wanted {
            let old = if changed {
                r.targets.remove(&addr)
            } else {
                None
            };
            if let Some(t) = r.targets.get(&addr) {
                flags.insert(addr, t.down.clone());
                continue;
            }
            let down = old.as_ref().map(|t| t.down.clone()).unwrap_or_default();
            drop(old);
            let probe = Probe {
                service: service.to_string(),
                addr,
                spec: spec.clone(),
                client: client.clone(),
                down: down.clone(),
                gauge: metrics.server_up(service, addr),
            };
            let task = runtime.spawn(probe.run()).abort_handle();
            r.targets.insert(
                addr,
                Target {
                    down: down.clone(),
                    task,
                },
            );
            flags.insert(addr, down);
        }
        flags
    }

    /// Stops the checks of every service not in `keep` (it went away, or lost its check).
    pub fn keep_only(&self, keep: &HashSet<String>, metrics: &obs::Http) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.retain(|name, r| {
            let k = keep.contains(name);
            if !k {
                for a in r.targets.keys() {
                    metrics.forget_server(name, *a);
                }
            }
            k
        });
    }

    /// Each checked upstream and whether it is up, by service (for status).
    pub fn verdicts(&self) -> Vec<(String, SocketAddr, bool)> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = running
            .iter()
            .flat_map(|(s, r)| {
                r.targets
                    .iter()
                    .map(|(a, t)| (s.clone(), *a, !t.down.load(Ordering::Acquire)))
            })
            .collect();
        out.sort();
        out
    }
}

struct Probe {
    service: String,
    addr: SocketAddr,
    spec: ActiveCheck,
    client: UpstreamClient,
    down: Arc<AtomicBool>,
    gauge: IntGauge,
}

impl Probe {
    async fn run(self) {
        let (mut oks, mut fails) = (0u32, 0u32);
        loop {
            let result = self.once().await;
            let down = self.down.load(Ordering::Acquire);
            match &result {
                Ok(()) => {
                    (oks, fails) = (oks.saturating_add(1), 0);
                    if down && oks >= self.spec.rise {
                        self.down.store(false, Ordering::Release);
                        info!(service = self.service, upstream = %self.addr, "active check: up");
                    }
                }
                Err(why) => {
                    (oks, fails) = (0, fails.saturating_add(1));
                    if !down && fails >= self.spec.fall {
                        self.down.store(true, Ordering::Release);
                        warn!(service = self.service, upstream = %self.addr, "active check: down ({why})");
                    }
                }
            }
            let down = self.down.load(Ordering::Acquire);
            self.gauge.set(i64::from(!down));
            tokio::time::sleep(if down {
                self.spec.unhealthy_interval
            } else {
                self.spec.interval
            })
            .await;
        }
    }

    /// One check: the request, its answer's status within the timeout.
    async fn once(&self) -> Result<(), String> {
        let target = SocketAddr::new(self.addr.ip(), self.spec.port.unwrap_or(self.addr.port()));
        let scheme = if self.client.tls { "https" } else { "http" };
        let uri = format!("{scheme}://{target}{}", self.spec.path);
        let method = Method::from_bytes(self.spec.method.as_bytes())
            .map_err(|_| format!("method {:?}", self.spec.method))?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::USER_AGENT, "lb-health");
        if let Some(h) = &self.spec.hostname {
            req = req.header(header::HOST, h.as_str());
        }
        for (k, v) in &self.spec.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(super::middleware::full(bytes::Bytes::new()))
            .map_err(|e| format!("request: {e}"))?;
        let resp = tokio::time::timeout(self.spec.timeout, self.client.request(req))
            .await
            .map_err(|_| format!("no answer within {:?}", self.spec.timeout))?
            .map_err(|e| format!("{e}"))?;
        let code = resp.status().as_u16();
        let good = match self.spec.status {
            Some(want) => code == want,
            None => (200..400).contains(&code),
        };
        if good {
            Ok(())
        } else {
            Err(format!("status {code}"))
        }
    }
}

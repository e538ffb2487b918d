//! The L7 reverse proxy (first step): entry points serving HTTP/1.1 and h2c, routers matched by
//! compiled rules, services whose upstreams are the registry's instances, balanced by smooth
//! weighted round robin over pooled keep-alive connections.
//!
//! A request's life, top to bottom in [`Proxy::handle`]: accept → route (first matching router of
//! the entry point, by priority) → pick an upstream of the router's service → forward (hop-by-hop
//! headers dropped, `X-Forwarded-*` added) → answer. The routing table is an immutable value
//! swapped atomically ([`ArcSwap`]): a request in flight finishes on the table it started with.

pub mod rule;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
    Request, Response, StatusCode, Uri,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::registry::Services;
use rule::{RequestView, Rule};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// A router as configured.
#[derive(Debug, Clone)]
pub struct RouterSpec {
    pub name: String,
    /// Entry points it serves; empty: all.
    pub entrypoints: Vec<String>,
    pub rule: Rule,
    pub rule_text: String,
    pub priority: Option<i64>,
    pub service: String,
}

/// Equal when configured the same (the compiled rule follows from its text).
impl PartialEq for RouterSpec {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.name,
            &self.entrypoints,
            &self.rule_text,
            self.priority,
            &self.service,
        ) == (
            &o.name,
            &o.entrypoints,
            &o.rule_text,
            o.priority,
            &o.service,
        )
    }
}

impl Eq for RouterSpec {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryPointSpec {
    pub name: String,
    pub address: SocketAddr,
}

/// Smooth weighted round robin (nginx's): each pick adds every upstream's weight to its current
/// value and takes the largest, which then loses the total. Equal weights degrade to plain round
/// robin; unequal ones interleave instead of bursting.
pub struct Pool {
    upstreams: Vec<(SocketAddr, i64)>,
    current: Mutex<Vec<i64>>,
}

impl Pool {
    pub fn new(upstreams: Vec<(SocketAddr, u32)>) -> Pool {
        let upstreams: Vec<(SocketAddr, i64)> = upstreams
            .into_iter()
            .filter(|(_, w)| *w > 0)
            .map(|(a, w)| (a, w as i64))
            .collect();
        let n = upstreams.len();
        Pool {
            upstreams,
            current: Mutex::new(vec![0; n]),
        }
    }

    pub fn pick(&self) -> Option<SocketAddr> {
        let total: i64 = self.upstreams.iter().map(|u| u.1).sum();
        let mut cur = self.current.lock().ok()?;
        let mut best: Option<usize> = None;
        for (i, (_, w)) in self.upstreams.iter().enumerate() {
            cur[i] += w;
            if best.is_none_or(|b| cur[i] > cur[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        cur[b] -= total;
        Some(self.upstreams[b].0)
    }

    pub fn len(&self) -> usize {
        self.upstreams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }
}

struct Route {
    spec: RouterSpec,
    priority: i64,
}

/// Routes per entry point (highest priority first) and a pool per service.
pub struct Table {
    routes: HashMap<String, Vec<Arc<Route>>>,
    pools: HashMap<String, Arc<Pool>>,
}

impl Table {
    fn build(entrypoints: &[EntryPointSpec], routers: &[RouterSpec], services: &Services) -> Table {
        let mut routes: HashMap<String, Vec<Arc<Route>>> = HashMap::new();
        for r in routers {
            let route = Arc::new(Route {
                spec: r.clone(),
                priority: r.priority.unwrap_or(r.rule.default_priority),
            });
            for ep in entrypoints {
                if r.entrypoints.is_empty() || r.entrypoints.contains(&ep.name) {
                    routes
                        .entry(ep.name.clone())
                        .or_default()
                        .push(route.clone());
                }
            }
        }
        for list in routes.values_mut() {
            // Higher priority first; ties by name, so the order never depends on config order.
            list.sort_by(|a, b| {
                b.priority
                    .cmp(&a.priority)
                    .then_with(|| a.spec.name.cmp(&b.spec.name))
            });
        }
        let mut pools = HashMap::new();
        for r in routers {
            let instances: Vec<(SocketAddr, u32)> = services
                .get(&r.service)
                .map(|m| {
                    m.values()
                        .map(|i| (SocketAddr::new(i.address, i.port), i.weight))
                        .collect()
                })
                .unwrap_or_default();
            pools
                .entry(r.service.clone())
                .or_insert_with(|| Arc::new(Pool::new(instances)));
        }
        Table { routes, pools }
    }
}

pub struct Proxy {
    entrypoints: Vec<EntryPointSpec>,
    routers: Vec<RouterSpec>,
    table: ArcSwap<Table>,
    client: Client<HttpConnector, Incoming>,
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection and never cross a proxy.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

fn strip_hop_by_hop(h: &mut hyper::HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| {
            v.split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

fn text(code: StatusCode, msg: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(format!("{msg}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut r = Response::new(body);
    *r.status_mut() = code;
    r
}

impl Proxy {
    pub fn new(
        entrypoints: Vec<EntryPointSpec>,
        routers: Vec<RouterSpec>,
        services: &Services,
    ) -> Proxy {
        let table = Table::build(&entrypoints, &routers, services);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(64)
            .build(connector);
        Proxy {
            entrypoints,
            routers,
            table: ArcSwap::from_pointee(table),
            client,
        }
    }

    /// New upstreams from the registry: a new table, swapped in whole.
    pub fn update_services(&self, services: &Services) {
        self.table.store(Arc::new(Table::build(
            &self.entrypoints,
            &self.routers,
            services,
        )));
    }

    /// The registry services the routers send to.
    pub fn service_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.routers.iter().map(|r| r.service.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn entrypoints(&self) -> &[EntryPointSpec] {
        &self.entrypoints
    }

    /// Serves one entry point on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, entrypoint: String, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(entrypoint, "accept: {e}");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (proxy, ep) = (self.clone(), entrypoint.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let (proxy, ep) = (proxy.clone(), ep.clone());
                    async move { Ok::<_, Infallible>(proxy.handle(&ep, peer.ip(), req).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                    debug!("connection from {peer}: {e}");
                }
            });
        }
    }

    /// One request, phase by phase.
    pub async fn handle(
        &self,
        entrypoint: &str,
        client_ip: IpAddr,
        mut req: Request<Incoming>,
    ) -> Response<Body> {
        // Route.
        let table = self.table.load_full();
        let host = req
            .uri()
            .host()
            .map(str::to_string)
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(|h| h.rsplit_once(':').map_or(h, |(a, _)| a).to_string())
            })
            .unwrap_or_default()
            .to_ascii_lowercase();
        let view = RequestView {
            host: &host,
            path: req.uri().path(),
            method: req.method().as_str(),
            query: req.uri().query(),
            headers: req.headers(),
            client_ip,
        };
        let Some(route) = table
            .routes
            .get(entrypoint)
            .and_then(|rs| rs.iter().find(|r| r.spec.rule.matches(&view)))
        else {
            return text(StatusCode::NOT_FOUND, "no router matches");
        };
        // Pick an upstream.
        let Some(upstream) = table.pools.get(&route.spec.service).and_then(|p| p.pick()) else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no upstream for this service",
            );
        };
        // Forward.
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let uri: Uri = match format!("http://{upstream}{path}").parse() {
            Ok(u) => u,
            Err(_) => return text(StatusCode::BAD_REQUEST, "bad request target"),
        };
        let original_host = req.headers().get(header::HOST).cloned();
        *req.uri_mut() = uri;
        *req.version_mut() = hyper::Version::HTTP_11;
        let h = req.headers_mut();
        strip_hop_by_hop(h);
        let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {client_ip}"),
            None => client_ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            h.insert("x-forwarded-for", v);
        }
        h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        if let Some(host) = original_host {
            h.insert("x-forwarded-host", host.clone());
            h.insert(header::HOST, host);
        }
        match self.client.request(req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.boxed())
            }
            Err(e) => {
                warn!(router = route.spec.name, %upstream, "upstream: {e}");
                text(StatusCode::BAD_GATEWAY, "upstream unreachable")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_weighted_round_robin_interleaves_by_weight() {
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let c: SocketAddr = "10.0.0.3:80".parse().unwrap();
        let p = Pool::new(vec![(a, 5), (b, 1), (c, 1)]);
        let seq: Vec<SocketAddr> = (0..7).map(|_| p.pick().unwrap()).collect();
        // nginx's documented sequence for 5:1:1.
        assert_eq!(seq, vec![a, a, b, a, c, a, a]);
        let eq = Pool::new(vec![(a, 1), (b, 1), (c, 1)]);
        let seq: Vec<SocketAddr> = (0..6).map(|_| eq.pick().unwrap()).collect();
        assert_eq!(seq, vec![a, b, c, a, b, c]);
        assert!(
            Pool::new(vec![(a, 0)]).pick().is_none(),
            "weight 0 gets nothing"
        );
    }
}

//! Admin HTTP API: VIPs and their backends, services and instances, provider status, verdict
//! counters, the flow table, routers; `/metrics` for Prometheus; the dashboard.
//!
//! Every route but `/healthz` and the dashboard's static files needs `Authorization: Bearer
//! <token>`; the listener is loopback unless configured otherwise. The dashboard's page holds no
//! data: its script asks the token (kept in the tab's sessionStorage, never in a cookie) and
//! reads the same JSON routes with it, so without the token there is nothing to see. Changes go to the persisted API store and are applied before the
//! call returns, so a `204` means the maps already say so. The API never touches maps itself.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{Path, Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
    Json, Router,
};
use serde::Deserialize;
use serde_json::json;

use crate::{
    control::health,
    control::Control,
    model::instance::{Instance, InstanceKey},
    model::{valid_name, Mac},
};

/// Bounds on admin connections, as a client connection of an entry point is bounded: its
/// head, each request, its life, and how many there are at once.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// More are closed at once: an operator's tools need a handful, a flood must not hold the
    /// agent's descriptors.
    pub max_connections: usize,
    /// A request's head must arrive within this; an idle keep-alive connection closes after it.
    pub header_timeout: Duration,
    /// A whole request, body and answer, must be done within this (else `408`).
    pub request_timeout: Duration,
    /// No admin connection lives longer (HTTP/2 has no idle timer of hyper's own).
    pub lifetime: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_connections: 128,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            lifetime: Duration::from_secs(300),
        }
    }
}

/// Serves the admin API on `listener` until `shutdown`, then lets requests in progress finish
/// (for at most the request timeout).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ApiLimits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(16)
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(limits.header_timeout)
        .keep_alive_timeout(limits.header_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("admin API accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "admin API: {} connections open; closed", limits.max_connections);
            continue;
        };
        // Until its first request, no timer of hyper's runs (the protocol is still being
        // sniffed): the connection has the head timeout to ask something.
        let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let svc = {
            let (app, asked) = (app.clone(), asked.clone());
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                asked.store(true, std::sync::atomic::Ordering::Relaxed);
                let mut app = app.clone();
                async move {
                    use tower_service::Service as _;
                    let answered =
                        tokio::time::timeout(limits.request_timeout, app.call(req)).await;
                    Ok::<_, std::convert::Infallible>(match answered {
                        Ok(Ok(r)) => r,
                        Ok(Err(never)) => match never {},
                        Err(_) => {
                            (StatusCode::REQUEST_TIMEOUT, "request took too long\n").into_response()
                        }
                    })
                }
            })
        };
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _slot = slot;
            let mut conn = std::pin::pin!(tokio::time::timeout(limits.lifetime, conn));
            let first = tokio::time::sleep(limits.header_timeout);
            let lived = tokio::select! {
                r = &mut conn => r,
                () = first => match asked.load(std::sync::atomic::Ordering::Relaxed) {
                    true => conn.await,
                    false => {
                        tracing::debug!(%peer, "admin API connection: no request in time; closed");
                        return;
                    }
                },
            };
            if lived.is_err() {
                tracing::debug!(%peer, "admin API connection: past its lifetime; closed");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(limits.request_timeout, graceful.shutdown()).await;
}

#[derive(Clone)]
pub struct ApiState {
    /// The L7 proxy, for its routing in force and what it could not use.
    pub proxy: Option<Arc<crate::proxy::Proxy>>,
    pub control: Arc<Mutex<Control>>,
    pub health: health::Table,
    pub token: Arc<str>,
    pub metrics: Arc<crate::observe::metrics::Metrics>,
    /// `[cluster]`: the etcd the nodes share (their status is read from it).
    pub cluster: Option<Arc<crate::sources::cluster::Shared>>,
    /// `[bgp]`: bird, and the agent's stop once `lb leave` has drained.
    pub bgp: Option<Leave>,
}

/// What `POST /api/v1/leave` needs: bird's settings, and the switch that stops the agent.
#[derive(Clone)]
pub struct Leave {
    pub spec: Arc<crate::model::bgp::BgpSpec>,
    pub stop: Arc<tokio::sync::watch::Sender<bool>>,
}

pub fn router(state: ApiState) -> Router {
    let authed = Router::new()
        .route("/api/v1/vips", get(list_vips))
        .route("/api/v1/vips/{vip}/backends", post(add_backend))
        .route(
            "/api/v1/vips/{vip}/backends/{backend}",
            delete(remove_backend),
        )
        .route(
            "/api/v1/vips/{vip}/backends/{backend}/drain",
            post(drain_backend),
        )
        .route("/api/v1/services", get(list_services))
        .route("/api/v1/services/{service}/instances", post(register))
        .route(
            "/api/v1/services/{service}/instances/{instance}",
            delete(deregister),
        )
        .route("/api/v1/status", get(status))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/flows/clear", post(clear_flows))
        .route("/api/v1/routers", get(list_routers))
        .route("/api/v1/cluster", get(cluster_view))
        .route("/api/v1/leave", post(leave))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/dashboard",
            get(|| async { axum::response::Redirect::permanent("/dashboard/") }),
        )
        .route("/dashboard/", get(|| dashboard_file("index.html")))
        .route("/dashboard/app.js", get(|| dashboard_file("app.js")))
        .route("/dashboard/style.css", get(|| dashboard_file("style.css")))
        .merge(authed)
        .layer(middleware::from_fn(catch_panics))
        .with_state(state)
}

/// The last resort behind validation: a handler that panics on its async thread answers 500
/// without the panic's text (which could tell a client about internals), and the log says it.
async fn catch_panics(req: Request, next: Next) -> Response {
    use futures_util::FutureExt as _;
    match std::panic::AssertUnwindSafe(next.run(req))
        .catch_unwind()
        .await
    {
        Ok(r) => r,
        Err(panic) => {
            let what = crate::control::panic_text(&panic);
            tracing::error!("admin API: a handler panicked: {what}");
            internal().into_response()
        }
    }
}

/// Compares SHA-256 digests, byte by byte without stopping at the first difference: the time
/// tells neither where a guess goes wrong nor how long the token is.
fn token_matches(given: &[u8], want: &[u8]) -> bool {
    let (g, w) = (
        ring::digest::digest(&ring::digest::SHA256, given),
        ring::digest::digest(&ring::digest::SHA256, want),
    );
    g.as_ref()
        .iter()
        .zip(w.as_ref())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// Whether `given` (the header's value) carries the configured token. A configured token that
/// breaks [`crate::sources::config::check_token`] (possible only for a caller that skipped the config's
/// checks) lets nothing in: an empty token must never match an empty `Bearer `.
fn authorized(given: Option<&str>, want: &str) -> bool {
    if crate::sources::config::check_token(want).is_err() {
        return false;
    }
    given.is_some_and(|t| !t.is_empty() && token_matches(t.as_bytes(), want.as_bytes()))
}

async fn require_token(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        t if authorized(t, &s.token) => next.run(req).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({"error": "missing or wrong bearer token"})),
        )
            .into_response(),
    }
}

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        // The cluster's etcd did not take a change: nothing changed, and a retry may work.
        let code = if e
            .downcast_ref::<crate::sources::store::Unavailable>()
            .is_some()
        {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiError(code, format!("{e:#}"))
    }
}

/// What a client is told when a handler failed in a way nobody planned for (a panic): no
/// detail, which could reveal internals; the log has it.
fn internal() -> ApiError {
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error (logged by the agent)".into(),
    )
}

fn not_found(what: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, what)
}

fn bad_request(what: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, what)
}

/// Runs a control operation off the async workers (map updates are blocking syscalls). A panic
/// in it is caught while the lock is still held, so the lock is never poisoned and the API,
/// `/metrics` and the control loop carry on; the client gets a 500 without the panic's text.
async fn with_control<T: Send + 'static>(
    s: &ApiState,
    f: impl FnOnce(&mut Control) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let c = s.control.clone();
    let (r, waiting) = tokio::task::spawn_blocking(move || {
        let mut guard = crate::control::lock(&c);
        let before = guard.balancer.unresolved();
        let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut guard))) {
            Ok(r) => r,
            Err(panic) => {
                let what = crate::control::panic_text(&panic);
                tracing::error!("admin API: a handler panicked: {what}");
                guard.stats.last_apply_error = Some(format!("admin API handler panicked: {what}"));
                Err(internal())
            }
        };
        let new: BTreeSet<IpAddr> = guard
            .balancer
            .unresolved()
            .difference(&before)
            .copied()
            .collect();
        let watch = (!new.is_empty())
            .then(|| guard.balancer.neighbour_watch())
            .flatten();
        (r, watch.map(|w| (new, w)))
    })
    .await
    .map_err(|e| {
        tracing::error!("admin API: control task: {e}");
        internal()
    })?;
    // A backend this call added that needs a MAC: the answer waits (without the lock) for the
    // neighbour task, so that when it comes the backend takes traffic, as far as its neighbour
    // answers within a second.
    if let Some((new, mut watch)) = waiting {
        let resolved = watch.wait_for(|left| new.iter().all(|a| !left.contains(a)));
        let _ = tokio::time::timeout(NEIGHBOUR_WAIT, resolved).await;
    }
    r
}

/// How long a change waits for the MACs of the backends it added.
const NEIGHBOUR_WAIT: Duration = Duration::from_secs(1);

/// After a store change: re-read it into the registry and apply now. When the apply fails, the
/// store goes back to `before` and that is applied again, so the last good state stays in force
/// (not one half-applied) and the caller hears why.
fn commit(
    c: &mut Control,
    before: crate::sources::store::Checkpoint,
    started: Instant,
) -> Result<(), ApiError> {
    c.refresh_store();
    let Err(e) = c.apply(started) else {
        return Ok(());
    };
    tracing::warn!("admin API change not applied, the previous state stays: {e:#}");
    let restored = c.store.restore(before);
    c.refresh_store();
    if let Err(again) = c.apply(started) {
        tracing::warn!("re-applying the previous state: {again:#}");
    }
    restored?;
    Err(ApiError(
        StatusCode::CONFLICT,
        format!("not applied, the previous state stays: {e:#}"),
    ))
}

/// A backend in a path: `10.0.0.1`, `10.0.0.1:8080`, `fd00::1` or `[fd00::1]:8080`.
fn parse_backend(s: &str) -> Result<(IpAddr, Option<u16>), ApiError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    s.parse::<SocketAddr>()
        .map(|sa| (sa.ip(), Some(sa.port())))
        .map_err(|_| bad_request(format!("{s:?} is not an address or address:port")))
}

/// The one instance of `service` at `addr` (and `port`, when given).
fn find_instance(
    c: &Control,
    service: &str,
    addr: IpAddr,
    port: Option<u16>,
) -> Result<InstanceKey, ApiError> {
    let found: Vec<InstanceKey> = c
        .instances(service)
        .iter()
        .map(Instance::key)
        .filter(|k| k.address == addr && port.is_none_or(|p| p == k.port))
        .collect();
    match found.as_slice() {
        [k] => Ok(*k),
        [] => Err(not_found(format!(
            "service {service:?} has no instance {addr}"
        ))),
        _ => Err(bad_request(format!(
            "{addr} has several ports in {service:?}: say which (address:port)"
        ))),
    }
}

fn service_of(c: &Control, vip: &str) -> Result<String, ApiError> {
    c.vip(vip)
        .map(|v| v.service.clone())
        .ok_or_else(|| not_found(format!("no VIP named {vip:?}")))
}

/// Body of a registration (VIP backend or service instance).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub address: IpAddr,
    #[serde(default)]
    pub port: u16,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// DSR: the backend's MAC (stored as metadata `mac`).
    #[serde(default)]
    pub mac: Option<Mac>,
    /// Expire unless registered again within this many seconds.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

fn one() -> u32 {
    1
}

/// The longest TTL a registration may ask: a year. Beyond that a TTL is a typo (or an attempt
/// to overflow the expiry time), and "never expires" is said by leaving `ttl_secs` out.
pub const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

/// Bounds on the free-form parts of a registration: they are stored, persisted and shown, so a
/// client must not be able to make them arbitrarily large.
const MAX_ZONE_LEN: usize = 128;
const MAX_METADATA: usize = 64;
const MAX_METADATA_LEN: usize = 1024;

impl Registration {
    /// Every number is checked here, at the edge, so nothing later computes with a value out of
    /// range; each refusal names its field.
    fn into_instance(self) -> Result<(Instance, Option<Duration>), ApiError> {
        if self.weight > 1000 {
            return Err(bad_request(format!(
                "weight: {} is out of range 0..=1000",
                self.weight
            )));
        }
        if let Some(t) = self.ttl_secs {
            if !(1..=MAX_TTL_SECS).contains(&t) {
                return Err(bad_request(format!(
                    "ttl_secs: {t} is out of range 1..={MAX_TTL_SECS} (leave it out for no expiry)"
                )));
            }
        }
        if self.zone.as_ref().is_some_and(|z| z.len() > MAX_ZONE_LEN) {
            return Err(bad_request(format!(
                "zone: longer than {MAX_ZONE_LEN} bytes"
            )));
        }
        if self.metadata.len() > MAX_METADATA {
            return Err(bad_request(format!(
                "metadata: more than {MAX_METADATA} entries"
            )));
        }
        if let Some((k, _)) = self
            .metadata
            .iter()
            .find(|(k, v)| k.len() > MAX_METADATA_LEN || v.len() > MAX_METADATA_LEN)
        {
            return Err(bad_request(format!(
                "metadata.{}: key or value longer than {MAX_METADATA_LEN} bytes",
                k.chars().take(64).collect::<String>()
            )));
        }
        let mut metadata = self.metadata;
        if let Some(mac) = self.mac {
            metadata.insert("mac".into(), mac.to_string());
        }
        let ttl = self.ttl_secs.map(Duration::from_secs);
        Ok((
            Instance {
                address: self.address,
                port: self.port,
                weight: self.weight,
                zone: self.zone,
                metadata,
            },
            ttl,
        ))
    }
}

type JsonBody<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

/// A registration body through the checks `register_into` makes (axum's `Json` is
/// `serde_json::from_slice`), for the fuzzer: whatever it accepts is in range.
pub fn check_registration_body(data: &[u8]) {
    let Ok(reg) = serde_json::from_slice::<Registration>(data) else {
        return;
    };
    if let Ok((instance, ttl)) = reg.into_instance() {
        assert!(instance.weight <= 1000, "weight {}", instance.weight);
        assert!(
            ttl.is_none_or(|t| t.as_secs() <= MAX_TTL_SECS),
            "ttl {ttl:?}"
        );
    }
}

async fn list_vips(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let vips = with_control(&s, |c| Ok(c.balancer.list()?)).await?;
    Ok(Json(json!({ "vips": vips })))
}

async fn register_into(
    s: &ApiState,
    service: String,
    body: JsonBody<Registration>,
) -> Result<Response, ApiError> {
    let Json(reg) = body.map_err(|e| bad_request(e.body_text()))?;
    let (instance, ttl) = reg.into_instance()?;
    let started = crate::clock::now();
    let created = with_control(s, move |c| {
        let before = c.store.checkpoint();
        let created = c
            .store
            .register(&service, instance, ttl, crate::clock::wall())?;
        commit(c, before, started)?;
        Ok(created)
    })
    .await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(json!({ "created": created }))).into_response())
}

async fn add_backend(
    State(s): State<ApiState>,
    Path(vip): Path<String>,
    body: JsonBody<Registration>,
) -> Result<Response, ApiError> {
    let service = with_control(&s, move |c| service_of(c, &vip)).await?;
    register_into(&s, service, body).await
}

async fn register(
    State(s): State<ApiState>,
    Path(service): Path<String>,
    body: JsonBody<Registration>,
) -> Result<Response, ApiError> {
    if !valid_name(&service) {
        return Err(bad_request(format!(
            "{service:?}: service names are [A-Za-z0-9_.-]"
        )));
    }
    register_into(&s, service, body).await
}

/// Removes an instance: an API registration is deleted; an instance another provider reports is
/// masked (persisted) until it is registered again through the API.
async fn remove_from(
    s: &ApiState,
    service: Option<String>,
    vip: Option<String>,
    backend: String,
) -> Result<StatusCode, ApiError> {
    let (addr, port) = parse_backend(&backend)?;
    let started = crate::clock::now();
    with_control(s, move |c| {
        let service = match (service, vip) {
            (Some(svc), _) => svc,
            (None, Some(v)) => service_of(c, &v)?,
            (None, None) => return Err(bad_request("no service".into())),
        };
        let key = find_instance(c, &service, addr, port)?;
        let elsewhere = provided_by_others(c, &service, &key);
        let before = c.store.checkpoint();
        c.store.remove(&service, key, elsewhere)?;
        commit(c, before, started)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Whether a provider other than the API store reports this instance (then removing it through
/// the API must mask it, or it would come straight back).
fn provided_by_others(c: &Control, service: &str, key: &InstanceKey) -> bool {
    c.registry
        .merged_without("api")
        .get(service)
        .is_some_and(|m| m.contains_key(key))
}

async fn remove_backend(
    State(s): State<ApiState>,
    Path((vip, backend)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    remove_from(&s, None, Some(vip), backend).await
}

async fn deregister(
    State(s): State<ApiState>,
    Path((service, instance)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    remove_from(&s, Some(service), None, instance).await
}

async fn drain_backend(
    State(s): State<ApiState>,
    Path((vip, backend)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (addr, port) = parse_backend(&backend)?;
    let started = crate::clock::now();
    with_control(&s, move |c| {
        let service = service_of(c, &vip)?;
        let key = find_instance(c, &service, addr, port)?;
        let before = c.store.checkpoint();
        c.store.drain(&service, key)?;
        commit(c, before, started)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_services(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let health = s
        .health
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let services = with_control(&s, move |c| {
        let merged = c.registry.merged();
        let mut out = serde_json::Map::new();
        for (name, instances) in merged {
            let list: Vec<serde_json::Value> = instances
                .values()
                .map(|i| {
                    let key = i.key();
                    let health: BTreeMap<String, bool> = health
                        .iter()
                        .filter(|((_, k), _)| *k == key)
                        .map(|((v, _), h)| (v.clone(), h.up))
                        .collect();
                    json!({
                        "instance": i,
                        "override": c.store.override_of(&name, &key),
                        "health_up": health,
                    })
                })
                .collect();
            out.insert(name, json!(list));
        }
        Ok(out)
    })
    .await?;
    Ok(Json(json!({ "services": services })))
}

async fn status(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let (mut providers, apply, bgp) = with_control(&s, |c| {
        let bgp = c.bgp_status.as_ref().map(|r| r.borrow().clone());
        Ok((c.registry.status(), c.stats.clone(), bgp))
    })
    .await?;
    // What a provider's routing could not be built into, as the proxy found it.
    if let Some(p) = &s.proxy {
        for (provider, problems) in p.problems() {
            if let Some(st) = providers.get_mut(&provider) {
                st.unsupported.extend(problems);
            }
        }
    }
    Ok(Json(
        json!({ "providers": providers, "apply": apply, "bgp": bgp }),
    ))
}

async fn stats(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let (reasons, flows) = with_control(&s, |c| {
        let dp = c.balancer.dataplane();
        Ok((dp.reason_counters()?, dp.flow_count()))
    })
    .await?;
    let verdicts: serde_json::Map<String, serde_json::Value> = reasons
        .into_iter()
        .map(|(r, n)| (r.name().to_string(), json!(n)))
        .collect();
    Ok(Json(
        json!({ "verdicts": verdicts, "tracked_flows": flows }),
    ))
}

/// `/metrics`: the Prometheus text format, L4 read from the maps at this moment.
async fn metrics(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let health = s.health.clone();
    let proxy = s.proxy.clone();
    let snap = with_control(&s, move |c| {
        Ok(crate::observe::metrics::Snapshot::take(
            c,
            &health,
            proxy.as_deref(),
        )?)
    })
    .await?;
    let text = s.metrics.render(&snap)?;
    Ok((
        [(header::CONTENT_TYPE, crate::observe::metrics::CONTENT_TYPE)],
        text,
    )
        .into_response())
}

/// The proxy's routing as in force (lb.toml and providers merged): entry points, routers with
/// their middlewares and request counts, TCP routers, middlewares.
/// How long bird has to tell the neighbours once the routes are gone.
const WITHDRAW_WITHIN: Duration = Duration::from_secs(10);
/// After bird exports nothing: the router has the withdrawal within a round trip; this leaves it
/// time to install the new next hops before the node stops taking the flows that still arrive.
const SETTLE: Duration = Duration::from_secs(1);

/// `lb leave`: withdraw every VIP, wait until bird exports nothing to any neighbour, then keep
/// forwarding for the drain time and stop the agent. The answer comes once the withdrawal is
/// done; the agent exits a drain time later.
async fn leave(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let Some(bgp) = s.bgp.clone() else {
        return Err(not_found(
            "no [bgp]: nothing is announced; stop the agent with SIGTERM".into(),
        ));
    };
    let started = crate::clock::now();
    with_control(&s, |c| {
        c.leaving = true;
        c.announce();
        Ok(())
    })
    .await?;
    loop {
        let spec = bgp.spec.clone();
        let done = tokio::task::spawn_blocking(move || crate::bgp::withdrawn(&spec))
            .await
            .map_err(|_| internal())?;
        match done {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) if started.elapsed() > WITHDRAW_WITHIN => {
                return Err(ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("bird did not withdraw (the node stays out; retry): {e:#}"),
                ))
            }
            Err(_) => {}
        }
        if started.elapsed() > WITHDRAW_WITHIN {
            return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "bird still exports routes (the node stays out; retry)".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let withdrawn_ms = started.elapsed().as_millis() as u64;
    tokio::time::sleep(SETTLE).await;
    let drain = bgp.spec.drain;
    tracing::info!(
        withdrawn_ms,
        drain_secs = drain.as_secs(),
        "leaving: withdrawn, draining"
    );
    let stop = bgp.stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(drain).await;
        tracing::info!("leaving: drained, stopping");
        let _ = stop.send(true);
    });
    Ok(Json(json!({
        "withdrawn_ms": withdrawn_ms,
        "settle_ms": SETTLE.as_millis() as u64,
        "drain_secs": drain.as_secs(),
    })))
}

/// Every node's status as the cluster's etcd has it, and where they disagree.
async fn cluster_view(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let Some(shared) = s.cluster.clone() else {
        return Err(not_found(
            "this node is not in a cluster (lb.toml has no [cluster])".into(),
        ));
    };
    let view = crate::control::cluster::view(&shared)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")))?;
    Ok(Json(view))
}

async fn list_routers(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let Some(proxy) = s.proxy.clone() else {
        return Ok(Json(
            json!({ "entrypoints": [], "routers": [], "tcp_routers": [], "middlewares": [], "checks": [] }),
        ));
    };
    let conf = proxy.routing();
    let totals = proxy.obs().router_totals();
    let entrypoints: Vec<serde_json::Value> = conf
        .entrypoints
        .iter()
        .map(|e| json!({ "name": e.name, "address": e.address, "tls": e.tls }))
        .collect();
    let mut routers: Vec<serde_json::Value> = conf
        .routers
        .iter()
        .map(|r| {
            let t = totals.get(&r.name).copied().unwrap_or_default();
            json!({
                "name": r.name,
                "rule": r.rule_text,
                "service": r.service,
                "entrypoints": r.entrypoints,
                "middlewares": r.middlewares,
                "priority": r.priority,
                "requests": {
                    "1xx": t[0], "2xx": t[1], "3xx": t[2], "4xx": t[3], "5xx": t[4],
                    "total": t.iter().sum::<u64>(),
                },
            })
        })
        .collect();
    routers.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let tcp_routers: Vec<serde_json::Value> = conf
        .tcp_routers
        .iter()
        .map(|r| {
            let tls = match r.tls {
                crate::model::l7::TlsMode::Plain => "plain",
                crate::model::l7::TlsMode::Passthrough => "passthrough",
                crate::model::l7::TlsMode::Terminate => "terminate",
            };
            json!({
                "name": r.name, "rule": r.rule_text, "service": r.service,
                "entrypoints": r.entrypoints, "tls": tls, "priority": r.priority,
            })
        })
        .collect();
    let mut middlewares: Vec<&String> = conf.middlewares.keys().collect();
    middlewares.sort();
    let checks: Vec<serde_json::Value> = proxy
        .active_checks()
        .into_iter()
        .map(|(service, server, up)| json!({ "service": service, "server": server, "up": up }))
        .collect();
    Ok(Json(json!({
        "entrypoints": entrypoints,
        "routers": routers,
        "tcp_routers": tcp_routers,
        "middlewares": middlewares,
        "checks": checks,
    })))
}

/// A dashboard file, embedded in the binary. The files hold no data (the script fetches it
/// with the token); the headers keep them from being framed, cached or given inline code.
async fn dashboard_file(name: &str) -> Response {
    let (body, kind) = match name {
        "index.html" => (
            include_str!("dashboard/index.html"),
            "text/html; charset=utf-8",
        ),
        "app.js" => (
            include_str!("dashboard/app.js"),
            "text/javascript; charset=utf-8",
        ),
        _ => (
            include_str!("dashboard/style.css"),
            "text/css; charset=utf-8",
        ),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                 img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn clear_flows(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let n = with_control(&s, |c| Ok(c.balancer.clear_flows()?)).await?;
    Ok(Json(json!({ "cleared": n })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compare() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abd", b"abc"));
        assert!(!token_matches(b"ab", b"abc"));
        assert!(!token_matches(b"", b"abc"));
    }

    #[test]
    fn empty_or_short_tokens_never_authorize() {
        let good = "0123456789abcdef0123";
        assert!(authorized(Some(good), good));
        assert!(!authorized(Some(""), good));
        assert!(!authorized(None, good));
        assert!(
            !authorized(Some(""), ""),
            "an empty configured token opens nothing"
        );
        assert!(!authorized(Some("short"), "short"));
    }

    #[test]
    fn backend_paths() {
        assert_eq!(parse_backend("10.0.0.1").ok().map(|x| x.1), Some(None));
        assert_eq!(
            parse_backend("10.0.0.1:80").ok().map(|x| x.1),
            Some(Some(80))
        );
        assert_eq!(
            parse_backend("[fd00::1]:80").ok().map(|x| x.1),
            Some(Some(80))
        );
        assert!(parse_backend("fd00::1").is_ok());
        assert!(parse_backend("nope").is_err());
    }
}

//! One request's path through the proxy, as named phases (Pingora's `ProxyHttp`): each is one
//! function, and [`Proxy::respond`] and [`Proxy::forward`] only call them in order.
//!
//! 1. **refuse** ([`refuse`]): header bytes over the bound, CONNECT, `*` targets.
//! 2. **normalise** ([`normalise::request`]): one host (in `Host`) and one path, the ones the
//!    router, the middlewares and the upstream all see.
//! 3. **ACME**: an HTTP-01 challenge is answered before any router.
//! 4. **route** ([`route`]): the entry point's first matching router.
//! 5. **request filters** ([`request_filters`]): the router's middlewares in order; one may
//!    answer instead of the upstream.
//! 6. **upstream request** ([`Outgoing::new`]): hop-by-hop headers dropped, the forwarding
//!    trail added, the body watched or kept for a replay; a mirror copy leaves here.
//! 7. **pick upstream** ([`pick_upstream`]): the sticky one first, then one this request has
//!    not failed on.
//! 8. **connect** ([`Proxy::attempt`]): one try within the connection cap and the request
//!    timeout, its outcome recorded against the upstream unless the client caused it; then
//!    **retry** ([`retry_allowed`]) or give up.
//! 9. **upstream response** ([`upstream_response`]): a tunnel for an upgrade, hop-by-hop
//!    headers dropped, the sticky cookie set, the connection's slot held to the body's end.
//! 10. **response filters** ([`response_filters`]): the middlewares that ran, in reverse.
//! 11. **log**: [`Proxy::handle`] hands the answer to [`obs`] (metrics, access log).

use std::{
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    body::Incoming,
    header::{self, HeaderValue},
    Request, Response, StatusCode, Uri,
};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use super::{
    balance::{self, Pool, Upstream},
    client::UpstreamClient,
    client_fault, conn, failure, limits,
    middleware::{self, Ctx, Flow, Middleware},
    new_request_id, normalise, obs,
    rule::RequestView,
    strip_hop_by_hop, text, Body, BoxError, Proxy, Route, ServiceSpec, Svc, Table, FORWARDED,
    MAX_HEADER_BYTES, MAX_MIRRORING, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PORT,
    X_FORWARDED_PROTO, X_REAL_IP, X_REQUEST_ID,
};

impl Proxy {
    /// One request: observed (metrics, access log) around [`Proxy::respond`].
    pub async fn handle(
        &self,
        entrypoint: &str,
        client_ip: IpAddr,
        scheme: &'static str,
        trusted: bool,
        mut req: Request<Body>,
    ) -> Response<Body> {
        let mut trace = self.obs.start(entrypoint, client_ip, &mut req);
        let resp = self
            .respond(entrypoint, client_ip, scheme, trusted, req, &mut trace)
            .await;
        self.obs.finish(entrypoint, trace, resp)
    }

    /// Phases 1–5 and 10; the upstream's part is [`Proxy::forward`].
    async fn respond(
        &self,
        entrypoint: &str,
        client_ip: IpAddr,
        scheme: &'static str,
        trusted: bool,
        mut req: Request<Body>,
        trace: &mut obs::Trace,
    ) -> Response<Body> {
        if let Some(answer) = refuse(&req) {
            return answer;
        }
        let host = match normalise::request(&mut req, trusted) {
            Ok(host) => host,
            Err(normalise::Refused(why)) => return client_fault(StatusCode::BAD_REQUEST, why),
        };
        if let Some(answer) = self.acme.http01_response(scheme, &req) {
            return answer;
        }
        let table = self.table.load_full();
        let Some(route) = route(&table, entrypoint, scheme, &host, &req, client_ip) else {
            return text(StatusCode::NOT_FOUND, "no router matches");
        };
        trace.route = route.obs.get(entrypoint).cloned();
        if scheme == "https" {
            // Traefik's SNI check: the handshake was made under the options of the host the
            // client named there; a request for a host whose router asks other options (client
            // certificates, say) would otherwise get past them by its Host header alone.
            // And the options are still what they were when the connection was made: a
            // tightened policy (a CA taken out) applies to connections open before it too.
            let used = req.extensions().get::<conn::TlsOptionsUsed>();
            let same = match (used, table.tls_named(route.tls_options.clone())) {
                (Some(conn::TlsOptionsUsed(name, then)), Ok((_, now))) => {
                    **name == *route.tls_options
                        && match (then, now) {
                            (None, None) => true,
                            (Some(a), Some(b)) => Arc::ptr_eq(a, &b) || *a == b,
                            _ => false,
                        }
                }
                _ => false,
            };
            if !same {
                return client_fault(
                    StatusCode::MISDIRECTED_REQUEST,
                    "this host's TLS options are not the connection's: connect again, with its name",
                );
            }
        }
        let mut ctx = Ctx::new(client_ip, scheme, host, crate::clock::now());
        if route.fetches {
            ctx.fetch = Some(table.clone() as Arc<dyn middleware::Fetch>);
        }
        let (ran, mut resp) = match request_filters(&route.chain, &mut ctx, &mut req).await {
            Some(answered) => answered,
            None => (
                route.chain.len(),
                self.forward(route, &table, &mut ctx, trusted, req, trace)
                    .await,
            ),
        };
        response_filters(&route.chain[..ran], &mut ctx, &mut resp).await;
        resp
    }

    /// Phases 6–9: the request made ready for an upstream, then tried on one after another
    /// while [`retry_allowed`] says so and the retry budget lasts.
    async fn forward(
        &self,
        route: &Route,
        table: &Table,
        ctx: &mut Ctx,
        trusted: bool,
        req: Request<Body>,
        trace: &mut obs::Trace,
    ) -> Response<Body> {
        let Some(svc) = table.service(&route.spec.service) else {
            return failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "no upstream for this service",
            );
        };
        let (pool, spec) = (&svc.pool, &svc.spec);
        let mut out = Outgoing::new(req, spec, ctx, trusted);
        if let Some(m) = spec.mirror.as_ref().filter(|_| !out.upgrade) {
            // Each target draws on its own, as Traefik's mirrors do.
            let chosen: Vec<&str> = m
                .targets
                .iter()
                .filter(|t| crate::clock::random::<f64>() * 100.0 < t.percent)
                .map(|t| t.service.as_str())
                .collect();
            if !chosen.is_empty() {
                if m.body && out.replay.is_none() {
                    match read_small(&out.parts.headers, &mut out.body, m.max_body_bytes).await {
                        Ok(b) => out.replay = b,
                        // The body was read and broke: there is nothing whole to send anywhere.
                        Err(()) => return text(StatusCode::BAD_REQUEST, "incomplete request body"),
                    }
                }
                let body = if m.body {
                    out.replay.clone()
                } else {
                    Some(Bytes::new())
                };
                if let Some(b) = body {
                    for shadow in chosen.into_iter().filter_map(|s| table.service(s)) {
                        self.mirror(shadow, &out.parts, b.clone(), m.body);
                    }
                }
            }
        }
        let attempts = ctx.retry.map_or(spec.retries + 1, |p| p.attempts) as usize;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let began = crate::clock::now();
        pool.budget.deposit();
        loop {
            if let Some(p) = ctx.retry {
                let wait = p.backoff(tried.len() as u32 + 1);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            let sticky = out.sticky.filter(|_| tried.is_empty());
            let picked = pick_upstream(pool, sticky, &tried, crate::clock::now(), &mut || {
                crate::clock::random::<u64>()
            });
            let Some(upstream) = picked else {
                return failure(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no upstream for this service",
                );
            };
            let Some(uri) = upstream_uri(&svc.client, &upstream, &out.parts.uri) else {
                return text(StatusCode::BAD_REQUEST, "bad request target");
            };
            // One connection's worth of the upstream, held to the answer's end; beyond the
            // cap the request waits in line as long as a connect may take. Not the upstream's
            // failure, nor the client's: lb is at the limit it was given.
            let until = crate::clock::timer_now() + spec.connect_timeout;
            let Some(slot) = Upstream::slot(&upstream, spec.max_connections, until).await else {
                warn!(
                    router = route.spec.name,
                    upstream = %upstream.addr,
                    cap = spec.max_connections,
                    "upstream at its connection cap"
                );
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream at its connection limit",
                );
            };
            // No attempt can follow this one: the head moves instead of being copied.
            let last = !out.replayable() || tried.len() + 1 >= attempts;
            let mut request = out.upstream_request(uri, last);
            if out.te_trailers && svc.client.http2 {
                request
                    .headers_mut()
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
            if let Some(hosts) = &spec.upstream_host {
                let host = match hosts.get(&upstream.addr) {
                    Some(h) => HeaderValue::from_str(h).ok(),
                    None => upstream
                        .authority
                        .as_ref()
                        .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
                };
                if let Some(h) = host {
                    request.headers_mut().insert(header::HOST, h);
                }
            }
            let (error, fault) = match self.attempt(svc, &upstream, &out, request, trace).await {
                Attempt::Answered { resp, pending } => {
                    // A status the router's retry names: sent again, as a failed attempt is,
                    // when the request can be and time and the budget allow.
                    if let Some(p) = ctx
                        .retry
                        .filter(|p| p.retries_status(resp.status().as_u16()))
                    {
                        let again = retry_allowed(
                            out.replayable(),
                            false,
                            out.idempotent || p.non_idempotent,
                            tried.len(),
                            attempts,
                        ) && p.timeout.is_none_or(|t| began.elapsed() < t);
                        if again && pool.budget.withdraw() {
                            if let Some(latency) = pending {
                                upstream.record(
                                    resp.status().as_u16() < 500,
                                    latency,
                                    &spec.passive,
                                    crate::clock::now(),
                                );
                            }
                            drop((resp, slot));
                            tried.push(upstream.addr);
                            trace.retried();
                            continue;
                        }
                    }
                    let outcome = pending.map(|latency| Outcome {
                        upstream: upstream.clone(),
                        latency,
                        passive: spec.passive,
                    });
                    return upstream_response(resp, slot, &upstream, spec, &mut out, outcome);
                }
                Attempt::Failed { error, fault } => (error, fault),
            };
            match fault {
                Some(ClientBodyFault::Broken) => {
                    debug!(router = route.spec.name, "request body broke: {error:?}");
                    return client_fault(StatusCode::BAD_REQUEST, "incomplete request body");
                }
                Some(ClientBodyFault::Stalled) => {
                    debug!(
                        router = route.spec.name,
                        "request body stalled past the timeout"
                    );
                    return client_fault(StatusCode::REQUEST_TIMEOUT, "request body too slow");
                }
                None => {}
            }
            tried.push(upstream.addr);
            let never_connected = error.as_ref().is_some_and(|e| e.is_connect());
            trace.upstream_failed(never_connected, error.is_none());
            match &error {
                Some(e) => {
                    warn!(router = route.spec.name, upstream = %upstream.addr, "upstream: {e}")
                }
                None => {
                    warn!(router = route.spec.name, upstream = %upstream.addr, "upstream: timed out")
                }
            }
            let policy = ctx.retry;
            let again = retry_allowed(
                out.replayable(),
                never_connected,
                out.idempotent || policy.is_some_and(|p| p.non_idempotent),
                tried.len(),
                attempts,
            ) && policy
                .is_none_or(|p| p.network_errors && p.timeout.is_none_or(|t| began.elapsed() < t));
            if again && pool.budget.withdraw() {
                trace.retried();
                continue;
            }
            return match error {
                None => failure(StatusCode::GATEWAY_TIMEOUT, "upstream timed out"),
                Some(_) => failure(StatusCode::BAD_GATEWAY, "upstream unreachable"),
            };
        }
    }

    /// Phase 8: one try on `upstream`, within the service's request timeout. Its outcome counts
    /// for the upstream's passive health unless the client's body broke or stalled.
    async fn attempt(
        &self,
        svc: &Svc,
        upstream: &Arc<Upstream>,
        out: &Outgoing,
        request: Request<Body>,
        trace: &mut obs::Trace,
    ) -> Attempt {
        let spec = &svc.spec;
        let started = crate::clock::now();
        let in_flight = Upstream::start(upstream);
        let sent = svc.client.request(request);
        let result = match spec.request_timeout {
            Some(t) => tokio::time::timeout(t, sent).await.ok(),
            None => Some(sent.await),
        };
        drop(in_flight);
        trace.attempt(upstream.addr, started.elapsed());
        let fault = out.client_fault(result.is_none());
        let answered = |ok: bool| {
            // An upstream that answered a body the client broke is not to blame.
            if fault.is_none() {
                upstream.record(ok, started.elapsed(), &spec.passive, crate::clock::now());
            }
        };
        match result {
            // A good head is not yet a good answer: an upstream that dies mid-body has failed,
            // so the body's end decides (its latency is the head's, as the balancer wants).
            Some(Ok(resp)) if resp.status().as_u16() < 500 && fault.is_none() => {
                Attempt::Answered {
                    resp,
                    pending: Some(started.elapsed()),
                }
            }
            Some(Ok(resp)) => {
                answered(resp.status().as_u16() < 500);
                Attempt::Answered {
                    resp,
                    pending: None,
                }
            }
            Some(Err(e)) => {
                answered(false);
                Attempt::Failed {
                    error: Some(e),
                    fault,
                }
            }
            None => {
                answered(false);
                Attempt::Failed { error: None, fault }
            }
        }
    }

    /// Sends a copy to one of the shadow service's upstreams and forgets it; without `with_body`
    /// the copy says it has none.
    fn mirror(
        &self,
        shadow: &Svc,
        parts: &hyper::http::request::Parts,
        body: Bytes,
        with_body: bool,
    ) {
        let Some(upstream) = shadow
            .pool
            .pick(crate::clock::now(), &mut || crate::clock::random::<u64>())
        else {
            return;
        };
        let Some(uri) = upstream_uri(&shadow.client, &upstream, &parts.uri) else {
            return;
        };
        // A copy never waits for, nor takes the last of, an upstream's connections.
        let Some(slot) = Upstream::try_slot(&upstream, shadow.spec.max_connections) else {
            return;
        };
        if self.mirroring.fetch_add(1, Ordering::Relaxed) >= MAX_MIRRORING {
            self.mirroring.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let mut copy = Request::from_parts(parts.clone(), middleware::full(body));
        if !with_body {
            // Said plainly, as Go's client (so Traefik) says it: the copy has no body.
            let h = copy.headers_mut();
            let had = h.remove(header::CONTENT_LENGTH).is_some()
                | h.remove(header::TRANSFER_ENCODING).is_some();
            if had {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            }
        }
        *copy.uri_mut() = uri;
        *copy.version_mut() = hyper::Version::HTTP_11;
        let (client, count) = (shadow.client.clone(), self.mirroring.clone());
        tokio::spawn(async move {
            let sent = tokio::time::timeout(std::time::Duration::from_secs(30), async {
                if let Ok(resp) = client.request(copy).await {
                    // Read to the end so the connection goes back to the pool.
                    let _ = resp.into_body().collect().await;
                }
            });
            let _ = sent.await;
            drop(slot);
            count.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// How long a middleware's own request (an error page) may take, connect to last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A middleware's own GET to a service of this table: an upstream picked as for a request,
/// within its connection cap (never waiting for a connection), hop-by-hop headers gone, read
/// whole within [`FETCH_TIMEOUT`]. Not retried, not counted in the upstream's health.
impl middleware::Fetch for Table {
    fn get<'a>(
        &'a self,
        service: &'a str,
        path_and_query: &'a str,
        headers: hyper::HeaderMap,
        max: usize,
    ) -> middleware::BoxFuture<'a, Option<(hyper::http::response::Parts, Bytes)>> {
        Box::pin(async move {
            let svc = self.service(service)?;
            let upstream = svc
                .pool
                .pick(crate::clock::now(), &mut || crate::clock::random::<u64>())?;
            let _slot = Upstream::try_slot(&upstream, svc.spec.max_connections)?;
            let target: Uri = path_and_query.parse().ok()?;
            let uri = upstream_uri(&svc.client, &upstream, &target)?;
            let mut req = Request::get(uri)
                .body(middleware::full(Bytes::new()))
                .ok()?;
            *req.headers_mut() = headers;
            strip_hop_by_hop(req.headers_mut());
            let whole = async {
                let resp = svc.client.request(req).await.ok()?;
                let (parts, body) = resp.into_parts();
                let body = body.map_err(|e| Box::new(e) as BoxError).boxed();
                let bytes = middleware::read_body(body, max).await.ok()?;
                Some((parts, bytes))
            };
            tokio::time::timeout(FETCH_TIMEOUT, whole).await.ok()?
        })
    }
}

/// Phase 1: what is answered before anything else looks at the request. Headers beyond the
/// bound are refused however the connection buffered them. Targets that are not a resource are
/// answered here, never forwarded half-understood: `OPTIONS *` asks about lb itself (200 with
/// no body, as Go's net/http, so Traefik, answers it), and lb tunnels nothing, so CONNECT is
/// not implemented (nginx says 405, Envoy 404).
fn refuse(req: &Request<Body>) -> Option<Response<Body>> {
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Some(text(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request headers too large",
        ));
    }
    if req.method() == hyper::Method::CONNECT {
        return Some(client_fault(
            StatusCode::NOT_IMPLEMENTED,
            "CONNECT is not supported",
        ));
    }
    if req.uri().path() == "*" {
        if req.method() != hyper::Method::OPTIONS {
            return Some(client_fault(
                StatusCode::BAD_REQUEST,
                "* is a target for OPTIONS only",
            ));
        }
        return Some(Response::new(middleware::full(Bytes::new())));
    }
    None
}

/// Phase 4: the entry point's first router (by priority) whose rule matches the normalised
/// request (and, where the entry point takes TLS and plain HTTP, that serves this kind).
fn route<'t>(
    table: &'t Table,
    entrypoint: &str,
    scheme: &str,
    host: &str,
    req: &Request<Body>,
    client_ip: IpAddr,
) -> Option<&'t Route> {
    let view = RequestView {
        host,
        path: req.uri().path(),
        method: req.method().as_str(),
        query: req.uri().query(),
        headers: req.headers(),
        client_ip,
    };
    // A router that asked for TLS never answers a plain request; a plain one answers TLS only
    // where the entry point decides for its routers (lb.toml's, or Traefik's with http.tls).
    let dual = table.dual.contains(entrypoint);
    let tls = scheme == "https";
    let kind = |r: &Route| match r.spec.tls {
        None => true,
        Some(true) => tls,
        Some(false) => !(dual && tls),
    };
    table
        .routes
        .get(entrypoint)
        .and_then(|rs| rs.iter().find(|r| kind(r) && r.spec.rule.matches(&view)))
        .map(|r| r.as_ref())
}

/// Phase 5: the middlewares in order. `Some((i, answer))` when the `i`-th answered instead of
/// the upstream: the `i` before it still see that answer on its way back.
async fn request_filters(
    chain: &[Arc<dyn Middleware>],
    ctx: &mut Ctx,
    req: &mut Request<Body>,
) -> Option<(usize, Response<Body>)> {
    for (i, m) in chain.iter().enumerate() {
        let early = match m.request(ctx, req) {
            Flow::Next => None,
            Flow::Answer(r) => Some(r),
            Flow::Wait(f) => f.await,
        };
        if let Some(r) = early {
            return Some((i, r));
        }
    }
    None
}

/// Phase 10: the middlewares that saw the request see the answer, last first.
/// `ctx` is `&mut` only to be `Send` across the awaits (`Ctx` holds `dyn Send` guards).
async fn response_filters(chain: &[Arc<dyn Middleware>], ctx: &mut Ctx, resp: &mut Response<Body>) {
    for m in chain.iter().rev() {
        if let Some(f) = m.response(&*ctx, resp) {
            f.await;
        }
    }
}

/// Phase 7: the upstream for this attempt. A sticky key (first attempt only) names one while it
/// is in the pool and not ejected; otherwise the balancer picks, preferring one this request has
/// not failed on, and falls back to any it picks. Time and randomness come in.
fn pick_upstream(
    pool: &Pool,
    sticky: Option<u64>,
    tried: &[SocketAddr],
    now: Instant,
    rand: &mut impl FnMut() -> u64,
) -> Option<Arc<Upstream>> {
    sticky
        .and_then(|k| pool.by_key(k, now))
        .or_else(|| {
            (0..4)
                .filter_map(|_| pool.pick(now, rand))
                .find(|u| !tried.contains(&u.addr))
        })
        .or_else(|| pool.pick(now, rand))
}

/// Whether a failed attempt is tried again (the retry budget has the last word): only a request
/// that can be sent again whole, only if it never reached the upstream or repeating it is
/// harmless, and only within the attempts allowed.
fn retry_allowed(
    replayable: bool,
    never_connected: bool,
    idempotent: bool,
    tried: usize,
    attempts: usize,
) -> bool {
    replayable && (never_connected || idempotent) && tried < attempts
}

/// The request as it goes to upstreams (phase 6), kept across attempts.
struct Outgoing {
    parts: hyper::http::request::Parts,
    /// The client's body, until an attempt streams it.
    body: Option<Body>,
    /// What can be sent again: nothing, or what a middleware or the mirror buffered.
    replay: Option<Bytes>,
    /// How the streamed body went (none when there is no body).
    watch: Option<Arc<BodyWatch>>,
    /// The request asks for a protocol upgrade it may have (never `h2c`).
    upgrade: bool,
    /// The client's side of that upgrade, taken by the tunnel.
    client_upgrade: Option<conn::ClientUpgrade>,
    /// The sticky cookie's key, when the service has one and the client sent it.
    sticky: Option<u64>,
    idempotent: bool,
    /// The client said `TE: trailers` (gRPC does): an HTTP/2 upstream gets it again, the one
    /// `TE` that crosses HTTP/2 (every other is hop-by-hop and goes).
    te_trailers: bool,
}

impl Outgoing {
    fn new(mut req: Request<Body>, spec: &ServiceSpec, ctx: &Ctx, trusted: bool) -> Outgoing {
        // An `Upgrade` (WebSocket, …) keeps its Connection/Upgrade headers and becomes a tunnel.
        // Never `h2c`: a tunnel to an upstream speaking HTTP/2 would carry requests that no
        // router or middleware sees (h2c smuggling); such a request goes on as a plain one.
        let upgrade = req
            .headers()
            .get(header::UPGRADE)
            .cloned()
            .filter(|_| req.version() == hyper::Version::HTTP_11)
            .filter(|u| {
                !u.to_str()
                    .unwrap_or("")
                    .split(',')
                    .any(|p| p.trim().eq_ignore_ascii_case("h2c"))
            });
        let client_upgrade = upgrade
            .as_ref()
            .and_then(|_| req.extensions_mut().remove::<conn::ClientUpgrade>());
        let sticky = spec
            .sticky_cookie
            .as_deref()
            .and_then(|name| cookie(req.headers(), name));
        let te_trailers = req.headers().get_all(header::TE).iter().any(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
        prepare_headers(
            &mut req,
            ctx.client_ip,
            ctx.scheme,
            trusted,
            upgrade.as_ref(),
        );
        let (parts, body) = req.into_parts();
        // From the body itself: its framing headers are hop-by-hop and already gone.
        let bodiless = hyper::body::Body::is_end_stream(&body);
        let replay = match (&ctx.replay, bodiless) {
            (Some(b), _) => Some(b.clone()),
            (None, true) => Some(Bytes::new()),
            (None, false) => None,
        };
        // A body streamed from the client is watched: if it breaks or stalls, the failure is the
        // client's, and must not eject the upstream or feed the breaker.
        let (body, watch) = if bodiless {
            (body, None)
        } else {
            let (b, w) = ClientBody::new(body);
            (b.boxed(), Some(w))
        };
        let idempotent = matches!(
            parts.method,
            hyper::Method::GET
                | hyper::Method::HEAD
                | hyper::Method::OPTIONS
                | hyper::Method::PUT
                | hyper::Method::DELETE
                | hyper::Method::TRACE
        );
        Outgoing {
            parts,
            body: Some(body),
            replay,
            watch,
            upgrade: upgrade.is_some(),
            client_upgrade,
            sticky,
            idempotent,
            te_trailers,
        }
    }

    /// Whether another attempt could send this request again whole (a tunnel never).
    fn replayable(&self) -> bool {
        self.replay.is_some() && !self.upgrade
    }

    /// One attempt's request to `uri`: the replay if there is one, else the streamed body (the
    /// first attempt takes it). On the `last` attempt the head moves instead of being copied.
    fn upstream_request(&mut self, uri: Uri, last: bool) -> Request<Body> {
        let body = match (&self.replay, self.body.take()) {
            (Some(b), _) => middleware::full(b.clone()),
            (None, Some(b)) => b,
            (None, None) => middleware::full(Bytes::new()),
        };
        let head = if last {
            std::mem::replace(&mut self.parts, Request::new(()).into_parts().0)
        } else {
            self.parts.clone()
        };
        let mut request = Request::from_parts(head, body);
        *request.uri_mut() = uri;
        *request.version_mut() = hyper::Version::HTTP_11;
        request
    }

    /// Whose fault a failed attempt was: only a body this attempt streamed can be the client's
    /// (a replayed one is whole in memory).
    fn client_fault(&self, timed_out: bool) -> Option<ClientBodyFault> {
        self.watch
            .as_ref()
            .filter(|_| self.replay.is_none())
            .and_then(|w| w.fault(timed_out))
    }
}

/// What one attempt came to.
enum Attempt {
    /// Headers came. With `pending`, the outcome is the body's: recorded when it ends.
    Answered {
        resp: Response<Incoming>,
        pending: Option<Duration>,
    },
    /// No answer: `error` is `None` when the request timeout ran out; `fault` says whether the
    /// client's body was to blame.
    Failed {
        error: Option<hyper_util::client::legacy::Error>,
        fault: Option<ClientBodyFault>,
    },
}

/// Phase 9: the upstream's answer made the client's. A `101` to an upgrade becomes a tunnel that
/// holds the connection's slot; any other answer loses its hop-by-hop headers, gets the sticky
/// cookie when it names another upstream than the client sent, and holds the slot to its end.
fn upstream_response(
    mut resp: Response<Incoming>,
    slot: balance::Slot,
    upstream: &Upstream,
    spec: &ServiceSpec,
    out: &mut Outgoing,
    mut outcome: Option<Outcome>,
) -> Response<Body> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // The upgrade was answered: that is the upstream's whole part.
        if let Some(o) = outcome.take() {
            o.record(true);
        }
        if let Some(client_side) = out.client_upgrade.take() {
            let upstream_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                tunnel(client_side, upstream_side).await;
                drop(slot);
            });
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, middleware::full(Bytes::new()));
        }
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(name) = &spec.sticky_cookie {
        let key = balance::sticky_key(upstream.addr);
        if out.sticky != Some(key) {
            if let Ok(v) = HeaderValue::from_str(&format!(
                "{name}={key:016x}; Path=/; HttpOnly; SameSite=Lax"
            )) {
                parts.headers.append(header::SET_COOKIE, v);
            }
        }
    }
    Response::from_parts(
        parts,
        Holding {
            body,
            _slot: slot,
            outcome,
        }
        .boxed(),
    )
}

/// The passive-health record an answer owes its upstream until its body ends.
struct Outcome {
    upstream: Arc<Upstream>,
    latency: Duration,
    passive: crate::model::l7::Passive,
}

impl Outcome {
    fn record(self, ok: bool) {
        self.upstream
            .record(ok, self.latency, &self.passive, crate::clock::now());
    }
}

/// How the client's part of a failed attempt went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientBodyFault {
    /// The body ended in an error: bad chunked framing, a reset stream, a client gone.
    Broken,
    /// Time ran out while lb was waiting for the client's next bytes.
    Stalled,
}

/// An upstream's answer, holding its connection's slot until hyper is done with it.
struct Holding {
    body: Incoming,
    _slot: balance::Slot,
    /// Recorded as a success when the body ends, a failure when the upstream breaks it; a
    /// client that goes away first leaves it unrecorded (that says nothing of the upstream).
    outcome: Option<Outcome>,
}

impl Drop for Holding {
    fn drop(&mut self) {
        // An empty body (HEAD, 204, 304) may never be polled.
        if hyper::body::Body::is_end_stream(&self.body) {
            if let Some(o) = self.outcome.take() {
                o.record(true);
            }
        }
    }
}

impl hyper::body::Body for Holding {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        let ended = match &polled {
            std::task::Poll::Ready(Some(Err(_))) => Some(false),
            std::task::Poll::Ready(None) => Some(true),
            std::task::Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => Some(true),
            _ => None,
        };
        if let Some(ok) = ended {
            if let Some(o) = this.outcome.take() {
                o.record(ok);
            }
        }
        polled.map_err(|e| Box::new(e) as BoxError)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// What became of a request body on its way to the upstream, as the attempt's outcome needs it.
#[derive(Default)]
struct BodyWatch {
    broken: std::sync::atomic::AtomicBool,
    /// Cut for coming too slowly (the entry point's body limits).
    too_slow: std::sync::atomic::AtomicBool,
    /// The last read found no bytes from the client yet (not: the upstream was not reading).
    waiting: std::sync::atomic::AtomicBool,
    ended: std::sync::atomic::AtomicBool,
}

impl BodyWatch {
    /// Whose fault a failed or timed-out attempt was: `Some` when it was the client's.
    fn fault(&self, timed_out: bool) -> Option<ClientBodyFault> {
        if self.too_slow.load(Ordering::Acquire) {
            return Some(ClientBodyFault::Stalled);
        }
        if self.broken.load(Ordering::Acquire) {
            return Some(ClientBodyFault::Broken);
        }
        let stalled = timed_out
            && !self.ended.load(Ordering::Acquire)
            && self.waiting.load(Ordering::Acquire);
        stalled.then_some(ClientBodyFault::Stalled)
    }
}

/// The client's request body, reporting to a [`BodyWatch`] as hyper's client reads it.
struct ClientBody {
    body: Body,
    watch: Arc<BodyWatch>,
}

impl ClientBody {
    fn new(body: Body) -> (ClientBody, Arc<BodyWatch>) {
        let watch = Arc::new(BodyWatch::default());
        (
            ClientBody {
                body,
                watch: watch.clone(),
            },
            watch,
        )
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        let w = &this.watch;
        w.waiting.store(r.is_pending(), Ordering::Release);
        match &r {
            Poll::Ready(Some(Err(e))) if limits::is_too_slow(&**e) => {
                w.too_slow.store(true, Ordering::Release)
            }
            Poll::Ready(Some(Err(_))) => w.broken.store(true, Ordering::Release),
            Poll::Ready(None) => w.ended.store(true, Ordering::Release),
            _ => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The request's target on an upstream: its address, the client's scheme, the path and query.
/// Assembled from parts (the upstream's authority is parsed once, when it is first seen); a
/// target that is not a path (`*`) goes through the parser as text.
fn upstream_uri(client: &UpstreamClient, upstream: &Upstream, target: &Uri) -> Option<Uri> {
    use hyper::http::uri::{PathAndQuery, Scheme};
    let pq = match target.path_and_query() {
        None => PathAndQuery::from_static("/"),
        Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
        Some(pq) => return upstream_uri_text(client, upstream.addr, pq.as_str()),
    };
    let Some(authority) = upstream.authority.clone() else {
        return upstream_uri_text(client, upstream.addr, pq.as_str());
    };
    let mut parts = hyper::http::uri::Parts::default();
    parts.scheme = Some(if client.tls {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    });
    parts.authority = Some(authority);
    parts.path_and_query = Some(pq);
    Uri::from_parts(parts).ok()
}

fn upstream_uri_text(client: &UpstreamClient, addr: SocketAddr, pq: &str) -> Option<Uri> {
    let scheme = if client.tls { "https" } else { "http" };
    format!("{scheme}://{addr}{pq}").parse().ok()
}

/// Reads a body of at most `max` bytes whole (for a mirror); `None` (and the body left as it
/// was) when it is larger or of unknown length; `Err` when reading it failed (it is gone).
async fn read_small(
    headers: &hyper::HeaderMap,
    body: &mut Option<Body>,
    max: usize,
) -> Result<Option<Bytes>, ()> {
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if len.is_none_or(|n| n > max) {
        return Ok(None);
    }
    let Some(b) = body.take() else {
        return Ok(None);
    };
    match middleware::read_body(b, max).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) => {
            debug!("request body: {e:?}");
            Err(())
        }
    }
}

/// The value of cookie `name`, parsed as a sticky key.
fn cookie(h: &hyper::HeaderMap, name: &str) -> Option<u64> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| u64::from_str_radix(v, 16).ok())
}

/// Appends `v` as an RFC 7239 (RFC 9110 §5.6.4) quoted-string, `"` and `\` escaped, so a value
/// can never close the string and start an element of its own (`a.test";for=1.2.3.4`).
fn push_quoted(out: &mut String, v: &str) {
    out.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Headers for the upstream: hop-by-hop ones removed (an upgrade keeps its own), the forwarding
/// trail (`X-Forwarded-For/-Proto/-Host`) added, `Host` kept, a request id if there is none.
/// Every request passes here: names are constants and each value is built in one buffer that
/// becomes the header without another copy.
fn prepare_headers(
    req: &mut Request<Body>,
    client_ip: IpAddr,
    scheme: &'static str,
    trusted: bool,
    upgrade: Option<&HeaderValue>,
) {
    use std::fmt::Write as _;
    // HTTP/2 carries the host in the URI (`:authority`), not in a Host header.
    let original_host = req.headers().get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let h = req.headers_mut();
    strip_hop_by_hop(h);
    // Room for what is added below in one step: the map otherwise grows (and rehashes) as the
    // headers go in. A map too large to reserve in is left as it was.
    let _ = h.try_reserve(8);
    if !trusted {
        for name in [
            X_FORWARDED_FOR,
            X_FORWARDED_PROTO,
            X_FORWARDED_HOST,
            X_FORWARDED_PORT,
            X_REAL_IP,
            FORWARDED,
        ] {
            h.remove(name);
        }
    }
    // RFC 7239: quoted IPv6, the host as the client asked for it.
    let mut fwd = String::with_capacity(96);
    if let Some(prev) = h.get(FORWARDED).and_then(|v| v.to_str().ok()) {
        fwd.push_str(prev);
        fwd.push_str(", ");
    }
    // Writing to a String cannot fail.
    let _ = match client_ip {
        IpAddr::V4(a) => write!(fwd, "for={a};proto={scheme}"),
        IpAddr::V6(a) => write!(fwd, "for=\"[{a}]\";proto={scheme}"),
    };
    if let Some(v) = original_host.as_ref().and_then(|v| v.to_str().ok()) {
        fwd.push_str(";host=");
        push_quoted(&mut fwd, v);
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(fwd)) {
        h.insert(FORWARDED, v);
    }
    if let Some(u) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, u.clone());
    }
    let mut xff = String::with_capacity(48);
    if let Some(prev) = h.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        xff.push_str(prev);
        xff.push_str(", ");
    }
    let _ = write!(xff, "{client_ip}");
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(xff)) {
        h.insert(X_FORWARDED_FOR, v);
    }
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    if let Some(host) = original_host {
        h.insert(X_FORWARDED_HOST, host.clone());
        h.insert(header::HOST, host);
    }
    if !h.contains_key(X_REQUEST_ID) {
        h.insert(X_REQUEST_ID, new_request_id());
    }
}

/// Joins an upgraded client connection to the upgraded upstream connection, bytes both ways,
/// until either side closes.
async fn tunnel(client: conn::ClientUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (Some(mut c), Ok(u)) = (client.get().await, upstream.await) else {
        debug!("upgrade failed on one side");
        return;
    };
    let mut u = TokioIo::new(u);
    if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
        debug!("tunnel closed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::client::ClientKey;

    fn request(headers: &[(&str, &str)]) -> Request<Body> {
        let mut b = Request::get("/a/b?c=d");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(middleware::full(Bytes::new())).expect("request")
    }

    fn value<'a>(r: &'a Request<Body>, name: &str) -> Option<&'a str> {
        r.headers().get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn forwarding_headers_read_as_before() {
        let mut r = request(&[
            ("host", "example.test:8080"),
            ("connection", "keep-alive, x-drop"),
            ("x-drop", "1"),
            ("te", "trailers"),
            ("forwarded", "for=6.6.6.6"),
            ("x-forwarded-for", "6.6.6.6"),
        ]);
        prepare_headers(
            &mut r,
            "192.0.2.7".parse().expect("ip"),
            "http",
            false,
            None,
        );
        assert_eq!(
            value(&r, "forwarded"),
            Some("for=192.0.2.7;proto=http;host=\"example.test:8080\"")
        );
        assert_eq!(value(&r, "x-forwarded-for"), Some("192.0.2.7"));
        assert_eq!(value(&r, "x-forwarded-proto"), Some("http"));
        assert_eq!(value(&r, "x-forwarded-host"), Some("example.test:8080"));
        for gone in ["connection", "x-drop", "te"] {
            assert!(r.headers().get(gone).is_none(), "{gone} is hop-by-hop");
        }
        let id = value(&r, "x-request-id").expect("an id");
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );

        // A trusted proxy's trail is extended; IPv6 is quoted in Forwarded.
        let mut r = request(&[
            ("forwarded", "for=6.6.6.6"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-request-id", "abc"),
        ]);
        prepare_headers(
            &mut r,
            "2001:db8::1".parse().expect("ip"),
            "https",
            true,
            None,
        );
        assert_eq!(
            value(&r, "forwarded"),
            Some("for=6.6.6.6, for=\"[2001:db8::1]\";proto=https")
        );
        assert_eq!(value(&r, "x-forwarded-for"), Some("6.6.6.6, 2001:db8::1"));
        assert_eq!(value(&r, "x-request-id"), Some("abc"));
    }

    /// Whatever the host says, `Forwarded` keeps one element, lb's: the host is a quoted-string
    /// that cannot be closed from inside.
    #[test]
    fn forwarded_host_is_a_quoted_string() {
        for (host, want) in [
            (
                r#"a.test";for=1.2.3.4;by="x"#,
                r#""a.test\";for=1.2.3.4;by=\"x""#,
            ),
            (r#"a\"#, r#""a\\""#),
            ("a.test:8080", r#""a.test:8080""#),
        ] {
            let mut r = request(&[("host", host)]);
            prepare_headers(
                &mut r,
                "192.0.2.7".parse().expect("ip"),
                "http",
                false,
                None,
            );
            assert_eq!(
                value(&r, "forwarded"),
                Some(format!("for=192.0.2.7;proto=http;host={want}").as_str()),
                "{host}"
            );
        }
    }

    #[test]
    fn upstream_uri_from_parts_equals_the_parsed_text() {
        let client = UpstreamClient::new(&ClientKey::default()).expect("client");
        for addr in ["127.0.0.1:8080", "[::1]:443"] {
            let up = Upstream::new(addr.parse().expect("addr"));
            for target in ["/", "/a/b?c=d&e", "http://h.test/x?y", "*"] {
                let t: Uri = target.parse().expect("target");
                let fast = upstream_uri(&client, &up, &t);
                let pq = t.path_and_query().map_or("/", |p| p.as_str());
                let text = upstream_uri_text(&client, up.addr, pq);
                assert_eq!(fast, text, "{addr} {target}");
            }
        }
    }

    fn pool(n: u8) -> Pool {
        let members = (1..=n)
            .map(|i| {
                (
                    Arc::new(Upstream::new(SocketAddr::from(([10, 0, 0, i], 80)))),
                    1,
                )
            })
            .collect();
        Pool::new(crate::model::l7::Algorithm::WeightedRoundRobin, members)
    }

    /// A retry goes to an upstream this request has not failed on, while there is one; when all
    /// have failed it still gets one (answering beats refusing).
    #[test]
    fn pick_upstream_avoids_the_ones_tried() {
        let (p, now) = (pool(3), crate::clock::now());
        let mut rand = || 7u64;
        let a: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:80".parse().expect("addr");
        for _ in 0..6 {
            let u = pick_upstream(&p, None, &[a, b], now, &mut rand).expect("one");
            assert_eq!(u.addr, "10.0.0.3:80".parse::<SocketAddr>().expect("addr"));
        }
        let all = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"].map(|s| s.parse().expect("addr"));
        assert!(pick_upstream(&p, None, &all, now, &mut rand).is_some());
        assert!(pick_upstream(&pool(0), None, &[], now, &mut rand).is_none());
    }

    /// A sticky key names its upstream however the balancer would have picked; a key no member
    /// has falls back to the balancer.
    #[test]
    fn pick_upstream_honours_a_sticky_key() {
        let (p, now) = (pool(3), crate::clock::now());
        let mut rand = || 7u64;
        let c: SocketAddr = "10.0.0.3:80".parse().expect("addr");
        for _ in 0..4 {
            let u = pick_upstream(&p, Some(balance::sticky_key(c)), &[], now, &mut rand);
            assert_eq!(u.map(|u| u.addr), Some(c));
        }
        assert!(pick_upstream(&p, Some(1), &[], now, &mut rand).is_some());
    }

    /// The retry rule, case by case: a body that cannot be sent again is never retried; one that
    /// can is retried when the upstream never saw it or the method is idempotent, within the
    /// attempts.
    #[test]
    fn retry_allowed_case_by_case() {
        //       replayable, never_connected, idempotent, tried, attempts, want
        let cases = [
            (false, true, true, 1, 3, false),
            (true, false, false, 1, 3, false),
            (true, true, false, 1, 3, true),
            (true, false, true, 1, 3, true),
            (true, true, true, 3, 3, false),
            (true, true, true, 2, 3, true),
        ];
        for (replayable, never, idem, tried, attempts, want) in cases {
            assert_eq!(
                retry_allowed(replayable, never, idem, tried, attempts),
                want,
                "{replayable} {never} {idem} {tried}/{attempts}"
            );
        }
    }

    #[test]
    fn refuse_answers_what_is_not_a_resource() {
        let status = |m: &str, target: &str| {
            let r = Request::builder()
                .method(m)
                .uri(target)
                .body(middleware::full(Bytes::new()))
                .expect("request");
            refuse(&r).map(|a| a.status().as_u16())
        };
        assert_eq!(status("GET", "/a"), None);
        assert_eq!(status("OPTIONS", "*"), Some(200));
        assert_eq!(status("GET", "*"), Some(400));
        assert_eq!(status("CONNECT", "h.test:443"), Some(501));
        let big = request(&[("x-big", &"a".repeat(MAX_HEADER_BYTES))]);
        assert_eq!(refuse(&big).map(|a| a.status().as_u16()), Some(431));
    }
}

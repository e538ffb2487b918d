//! Requests written to walk around a router's rule or to hurt an upstream, sent as raw bytes (and
//! raw HTTP/2 frames through hyper's low-level client) to a real proxy with real upstreams on
//! loopback. Each test asserts what the upstreams received, not only the status the client got:
//! a host or path read one way by the router and another by the upstream, a forged forwarding
//! trail, client mistakes counted against an upstream, identity headers a client had removed.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb_userspace::{
    model::l7::{RouterSpec, ServiceSpec},
    proxy::middleware::Middleware,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

mod common;
use common::*;

/// What one upstream received: per request, its name, `METHOD path?query`, `name: value`
/// lines, and whether its body arrived whole (`~body: whole` or `~body: cut short`).
type Log = Arc<Mutex<Vec<String>>>;

/// An upstream that logs each request it gets and answers `<name>` and the same text.
async fn recording(name: &'static str) -> (SocketAddr, Log) {
    let log: Log = Default::default();
    let seen = log.clone();
    let addr = serve(move |req: Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            let mut out = format!(
                "{name}\n{} {}\n",
                req.method(),
                req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("")
            );
            for (k, v) in req.headers() {
                out.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
            }
            let whole = req.into_body().collect().await.is_ok();
            if let Ok(mut l) = seen.lock() {
                l.push(format!(
                    "{out}~body: {}\n",
                    if whole { "whole" } else { "cut short" }
                ));
            }
            let mut r = Response::new(Full::new(Bytes::from(out)));
            if !whole {
                *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
            }
            r
        }
    })
    .await;
    (addr, log)
}

/// The value of `name` in a logged request.
fn field<'a>(logged: &'a str, name: &str) -> Option<&'a str> {
    logged
        .lines()
        .skip(2)
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

fn taken(log: &Log) -> Vec<String> {
    log.lock()
        .map(|mut l| std::mem::take(&mut *l))
        .unwrap_or_default()
}

/// Sends raw bytes, returns what comes back until the proxy closes or 2 s pass.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn mws(list: &[(&str, &str)]) -> HashMap<String, Arc<dyn Middleware>> {
    list.iter().map(|(n, t)| (n.to_string(), mw(t))).collect()
}

fn routed(name: &str, rule: &str, service: &str, chain: &[&str]) -> RouterSpec {
    let mut r = router(name, rule, service, None);
    r.middlewares = chain.iter().map(|s| s.to_string()).collect();
    r
}

/// `alice:s3cret`, as a Basic credential.
const ALICE: &str = "Authorization: Basic YWxpY2U6czNjcmV0\r\n";

fn staff() -> String {
    let hash = bcrypt::hash("s3cret", 4).expect("hash");
    format!(
        r#"basic_auth = {{ users = ["alice:{hash}"], realm = "staff", header_field = "X-User" }}"#
    )
}

/// One HTTP/2 request on a fresh h2c connection: hyper's client puts the URI's authority in
/// `:authority` and sends the headers given as they are.
async fn h2(addr: SocketAddr, uri: &str, headers: &[(&str, &str)]) -> Result<u16, String> {
    let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut b = Request::get(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let code = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(code)
}

/// Hole 1: the host routed on is the host forwarded. An absolute-form target's authority replaces
/// `Host` (RFC 9112 §3.2.2); userinfo, two `Host`s and HTTP/2's `:authority` disagreeing with
/// `host` (RFC 9113 §8.3.1) are refused; nothing reaches the basic_auth-protected router's
/// upstream unauthenticated, and every request an upstream got carries its router's host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_routed_on_is_the_host_forwarded() {
    let (public, public_log) = recording("public").await;
    let (admin, admin_log) = recording("admin").await;
    let routers = vec![
        routed("open", "Host(`public.test`)", "pub", &[]),
        routed("admin", "Host(`admin.test`)", "adm", &["staff"]),
    ];
    let (_p, addr) = start_full(
        routers,
        &services(&[("pub", &[(public, 1)]), ("adm", &[(admin, 1)])]),
        HashMap::new(),
        mws(&[("staff", &staff())]),
    )
    .await;

    // The target says public.test: that is where it goes, and what the upstream is told.
    let out = raw(
        addr,
        b"GET http://public.test/x HTTP/1.1\r\nHost: admin.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&out), 200, "{out}");
    let got = taken(&public_log);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(field(&got[0], "host"), Some("public.test"), "{}", got[0]);
    assert_eq!(field(&got[0], "x-forwarded-host"), Some("public.test"));
    assert!(
        got[0].contains("GET /x\n"),
        "origin form upstream: {}",
        got[0]
    );

    // The target says admin.test: the admin router, so its auth.
    let out = raw(
        addr,
        b"GET http://admin.test/x HTTP/1.1\r\nHost: public.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&out), 401, "{out}");
    let out = raw(
        addr,
        format!("GET http://admin.test/x HTTP/1.1\r\nHost: public.test\r\n{ALICE}Connection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status(&out), 200, "{out}");
    let got = taken(&admin_log);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(field(&got[0], "host"), Some("admin.test"), "{}", got[0]);
    assert_eq!(field(&got[0], "x-user"), Some("alice"));

    // No single reading: refused.
    for attempt in [
        &b"GET http://admin.test@public.test/x HTTP/1.1\r\nHost: public.test\r\nConnection: close\r\n\r\n"[..],
        b"GET http://public.test@admin.test/x HTTP/1.1\r\nHost: admin.test\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: public.test\r\nHost: admin.test\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: admin.test\r\nHost: public.test\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: admin.test@public.test\r\nConnection: close\r\n\r\n",
    ] {
        let out = raw(addr, attempt).await;
        assert_eq!(status(&out), 400, "{:?} → {out}", String::from_utf8_lossy(attempt));
    }

    // HTTP/2: `:authority` and `host` must agree.
    let r = h2(addr, "http://public.test/x", &[("host", "admin.test")]).await;
    assert!(r.as_ref().map_or(true, |c| *c == 400), "{r:?}");
    let r = h2(addr, "http://admin.test/x", &[("host", "public.test")]).await;
    assert!(r.as_ref().map_or(true, |c| *c == 400), "{r:?}");
    assert_eq!(h2(addr, "http://public.test/x", &[]).await, Ok(200));
    assert_eq!(h2(addr, "http://admin.test/x", &[]).await, Ok(401));

    let public_got = taken(&public_log);
    assert_eq!(
        public_got.len(),
        1,
        "only the agreeing h2 request: {public_got:?}"
    );
    for r in &public_got {
        assert_eq!(field(r, "host"), Some("public.test"), "{r}");
    }
    assert!(
        taken(&admin_log).is_empty(),
        "the admin upstream saw no one else"
    );
}

/// Hole 2: the path routed on is the path forwarded. Escaped unreserved characters, dot
/// segments and doubled slashes all reach the `PathPrefix(`/admin`)` router (and its auth); an
/// escape an upstream could decode into another path is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_variants_cannot_walk_around_a_path_prefix() {
    let (public, public_log) = recording("public").await;
    let (admin, admin_log) = recording("admin").await;
    let routers = vec![
        routed("open", "PathPrefix(`/`)", "pub", &[]),
        routed("admin", "PathPrefix(`/admin`)", "adm", &["staff"]),
    ];
    let (_p, addr) = start_full(
        routers,
        &services(&[("pub", &[(public, 1)]), ("adm", &[(admin, 1)])]),
        HashMap::new(),
        mws(&[("staff", &staff())]),
    )
    .await;
    let variants = [
        "/%61dmin/x",
        "/%61%64%6D%69%6E/x",
        "/./admin/x",
        "//admin/x",
        "/x/../admin/x",
        "/x/%2e%2e/admin/x",
        "/admin/./y/../x",
        "/admin//x",
    ];
    for v in variants {
        let out = raw(
            addr,
            format!("GET {v} HTTP/1.1\r\nHost: t.test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status(&out), 401, "{v} → {out}");
        let out = raw(
            addr,
            format!("GET {v}?q=1 HTTP/1.1\r\nHost: t.test\r\n{ALICE}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(status(&out), 200, "{v} → {out}");
    }
    let got = taken(&admin_log);
    assert_eq!(got.len(), variants.len(), "{got:?}");
    for r in &got {
        assert!(
            r.contains("\nGET /admin/x?q=1\n"),
            "the normalised path: {r}"
        );
    }
    assert!(
        taken(&public_log).is_empty(),
        "no variant reached the open router"
    );

    for bad in [
        "/public/..%2fadmin/x",
        "/admin%2fx",
        "/%2e%2e%5cadmin",
        "/admin%00",
        "/%252e%252e/admin",
        "/a%zz",
        "/admin\\x",
    ] {
        let out = raw(
            addr,
            format!("GET {bad} HTTP/1.1\r\nHost: t.test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status(&out), 400, "{bad} → {out}");
    }
    assert!(taken(&public_log).is_empty() && taken(&admin_log).is_empty());
    // HTTP/2 takes the same path.
    assert_eq!(h2(addr, "http://t.test/x/../admin/x", &[]).await, Ok(401));
    assert_eq!(h2(addr, "http://t.test/%61dmin/x", &[]).await, Ok(401));
    assert!(taken(&public_log).is_empty());
}

/// Hole 3: a client cannot write its own element into `Forwarded` through the host, nor send
/// `X-Forwarded-Prefix/-Uri/-Server` as if lb had set them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_cannot_be_forged() {
    let (up, log) = recording("up").await;
    let routers = vec![
        routed("strip", "PathPrefix(`/api`)", "s", &["strip"]),
        routed("all", "PathPrefix(`/`)", "s", &[]),
    ];
    let (_p, addr) = start_full(
        routers,
        &services(&[("s", &[(up, 1)])]),
        HashMap::new(),
        mws(&[("strip", r#"strip_prefix = { prefixes = ["/api"] }"#)]),
    )
    .await;
    for host in [
        "a.test\";for=1.2.3.4;by=\"x",
        "a.test\",for=1.2.3.4",
        "a.test;for=1.2.3.4",
        "a.test, for=1.2.3.4",
        "a.test\\",
    ] {
        let out = raw(
            addr,
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        let got = taken(&log);
        // Refused (it is not a host), or forwarded with exactly lb's one element.
        for r in &got {
            let fwd = field(r, "forwarded").unwrap_or("");
            assert!(
                !fwd.contains("1.2.3.4") && fwd.matches("for=").count() == 1,
                "{host:?}: {fwd}"
            );
        }
        assert!(status(&out) == 400 || got.len() == 1, "{host:?} → {out}");
    }
    let out = raw(
        addr,
        b"GET /api/x HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-Prefix: /evil\r\nX-Forwarded-Uri: /evil\r\nX-Forwarded-Server: evil\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&out), 200, "{out}");
    let out = raw(
        addr,
        b"GET /x HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-Prefix: /evil\r\nX-Forwarded-Uri: /evil\r\nX-Forwarded-Server: evil\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&out), 200, "{out}");
    let got = taken(&log);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        field(&got[0], "x-forwarded-prefix"),
        Some("/api"),
        "lb's own: {}",
        got[0]
    );
    assert_eq!(field(&got[1], "x-forwarded-prefix"), None, "{}", got[1]);
    for r in &got {
        assert_eq!(field(r, "x-forwarded-uri"), None, "{r}");
        assert_eq!(field(r, "x-forwarded-server"), None, "{r}");
    }
}

/// A service of two upstreams behind a circuit breaker that opens on any network error, and a
/// client pinned (sticky cookie) to one of them: the proxy, the cookie, the pinned upstream's
/// name and both logs.
async fn pinned_client(
    request_timeout: Option<Duration>,
) -> (
    Arc<lb_userspace::proxy::Proxy>,
    SocketAddr,
    String,
    String,
    Log,
    Log,
) {
    let (a, a_log) = recording("a").await;
    let (b, b_log) = recording("b").await;
    let specs = HashMap::from([(
        "s".to_string(),
        ServiceSpec {
            sticky_cookie: Some("lb_s".into()),
            request_timeout,
            ..Default::default()
        },
    )]);
    // A Host rule: it matches whatever the target (`*` or an authority), as a catch-all
    // site's router does.
    let (p, addr) = start_full(
        vec![routed("all", "Host(`t`)", "s", &["breaker"])],
        &services(&[("s", &[(a, 1), (b, 1)])]),
        specs,
        mws(&[(
            "breaker",
            r#"circuit_breaker = { expression = "NetworkErrorRatio() > 0.1", check_period_ms = 0 }"#,
        )]),
    )
    .await;
    let first = raw(
        addr,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&first), 200, "{first}");
    let cookie = first
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("a sticky cookie")
        .to_string();
    let pinned = first
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|body| body.lines().next())
        .unwrap_or("")
        .to_string();
    assert!(pinned == "a" || pinned == "b", "{first}");
    taken(&a_log);
    taken(&b_log);
    let (mine, other) = if pinned == "a" {
        (a_log, b_log)
    } else {
        (b_log, a_log)
    };
    (p, addr, cookie, pinned, mine, other)
}

/// The pinned client's next ordinary request reaches its upstream (never ejected: no new
/// cookie) through a closed breaker. Returns what both upstreams got besides.
async fn still_pinned(
    addr: SocketAddr,
    cookie: &str,
    pinned: &str,
    mine: &Log,
    other: &Log,
) -> Vec<String> {
    let after = raw(
        addr,
        format!("GET /after HTTP/1.1\r\nHost: t\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(status(&after), 200, "the breaker stayed closed: {after}");
    assert!(
        !after.contains("set-cookie"),
        "still pinned to the same upstream, which was never ejected: {after}"
    );
    let mut got = taken(mine);
    let before = got.len();
    got.retain(|r| !r.contains("\nGET /after\n"));
    assert_eq!(got.len() + 1, before, "{pinned} served it: {got:?}");
    got.extend(taken(other));
    got
}

/// Hole 4, bodies: a request body that breaks while it streams (bad chunked framing) is the
/// client's fault: a `400`, and five of them (the ejection threshold is 3) neither eject the
/// pinned upstream nor open the breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_bodies_never_count_against_an_upstream() {
    let (_p, addr, cookie, pinned, mine, other) = pinned_client(None).await;
    let mut answers = Vec::new();
    for _ in 0..5 {
        // The head is good and routed; the body breaks while it streams.
        answers.push(raw(
            addr,
            format!("POST / HTTP/1.1\r\nHost: t\r\nCookie: {cookie}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
                .as_bytes(),
        )
        .await);
    }
    // Heads may reach the upstream (lb streams bodies), never a whole request.
    for r in still_pinned(addr, &cookie, &pinned, &mine, &other).await {
        assert!(
            r.contains("\nPOST /\n") && r.ends_with("~body: cut short\n"),
            "{r}"
        );
    }
    for out in answers {
        assert_eq!(status(&out), 400, "the client's error: {out}");
    }
}

/// Hole 4, slow bodies: a client that stops sending its body makes the request time out, but
/// lb was waiting on the client, not the upstream: a `408`, not a `504` against the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_time_out_against_the_client() {
    let (_p, addr, cookie, pinned, mine, other) =
        pinned_client(Some(Duration::from_millis(300))).await;
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!(
                "POST / HTTP/1.1\r\nHost: t\r\nCookie: {cookie}\r\nContent-Length: 10\r\n\r\nabc"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        let mut out = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut out))
            .await
            .expect("an answer within the timeout")
            .unwrap_or(0);
        let out = String::from_utf8_lossy(&out[..n]).into_owned();
        assert_eq!(status(&out), 408, "{out}");
    }
    for r in still_pinned(addr, &cookie, &pinned, &mine, &other).await {
        assert!(r.ends_with("~body: cut short\n"), "{r}");
    }
}

/// Hole 4, targets: `OPTIONS *` is answered by lb (200) and `CONNECT` refused (501), never
/// forwarded half-understood; neither counts against the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_star_and_connect_are_answered_not_forwarded() {
    let (_p, addr, cookie, pinned, mine, other) = pinned_client(None).await;
    let mut options = Vec::new();
    for _ in 0..5 {
        options.push(raw(
            addr,
            format!("OPTIONS * HTTP/1.1\r\nHost: t\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await);
    }
    let mut connect = Vec::new();
    for _ in 0..5 {
        connect.push(raw(
            addr,
            format!("CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await);
    }
    let got = still_pinned(addr, &cookie, &pinned, &mine, &other).await;
    assert!(got.is_empty(), "nothing was forwarded: {got:?}");
    for out in options {
        assert_eq!(status(&out), 200, "{out}");
        assert!(
            out.to_ascii_lowercase().contains("content-length: 0"),
            "{out}"
        );
    }
    for out in connect {
        assert_eq!(status(&out), 501, "{out}");
    }
    let r = raw(
        addr,
        b"GET * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 400, "{r}");
    // HTTP/2 has its own `OPTIONS *` (`:path` = `*`).
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::options("http://t/")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let (mut parts, body) = req.into_parts();
    parts.uri = "*".parse().expect("asterisk");
    let resp = send.send_request(Request::from_parts(parts, body)).await;
    assert!(
        resp.as_ref().map_or(true, |r| r.status() == 200),
        "{resp:?}"
    );
    assert!(taken(&mine).is_empty() && taken(&other).is_empty());
}

/// Item 10: headers the client names in `Connection` go before the middlewares run, so a client
/// cannot have lb strip the identity header an auth middleware adds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_remove_identity_headers() {
    let (up, log) = recording("up").await;
    let auth = serve(|_req: Request<hyper::body::Incoming>| async move {
        let mut r = Response::new(Full::new(Bytes::new()));
        r.headers_mut()
            .insert("x-auth-user", "alice".parse().expect("value"));
        r
    })
    .await;
    let routers = vec![
        routed("basic", "PathPrefix(`/basic`)", "s", &["staff"]),
        routed("sso", "PathPrefix(`/sso`)", "s", &["sso"]),
    ];
    let (_p, addr) = start_full(
        routers,
        &services(&[("s", &[(up, 1)])]),
        HashMap::new(),
        mws(&[
            ("staff", &staff()),
            (
                "sso",
                &format!(
                    r#"forward_auth = {{ address = "http://{auth}/verify", auth_response_headers = ["X-Auth-User"] }}"#
                ),
            ),
        ]),
    )
    .await;
    let out = raw(
        addr,
        format!("GET /basic HTTP/1.1\r\nHost: t\r\n{ALICE}X-User: mallory\r\nConnection: close, X-User\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status(&out), 200, "{out}");
    let out = raw(
        addr,
        b"GET /sso HTTP/1.1\r\nHost: t\r\nX-Auth-User: mallory\r\nConnection: X-Auth-User\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&out), 200, "{out}");
    let got = taken(&log);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(field(&got[0], "x-user"), Some("alice"), "{}", got[0]);
    assert_eq!(field(&got[1], "x-auth-user"), Some("alice"), "{}", got[1]);
    for r in &got {
        assert!(
            !r.contains("mallory") && field(r, "connection").is_none(),
            "{r}"
        );
    }
}

/// Request smuggling (part B): framing two parsers could read two ways — Content-Length beside
/// Transfer-Encoding (CL.TE, TE.CL), Content-Lengths that disagree or are not a number, codings
/// that do not end in chunked or hide it (`xchunked`, a space before the colon, a tab, a second
/// header), bad chunk sizes, obsolete line folding — each followed in the same bytes by a request
/// for `/smuggled`. lb re-frames everything it forwards, so the upstream can only see what lb
/// answered for: as many requests as lb's 200s, none with both lengths or another coding; the
/// framings RFC 9112 says a server MUST refuse get a 400 and reach no upstream at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggled_requests_reach_no_upstream() {
    let (app, log) = recording("app").await;
    let svcs = services(&[("app", &[(app, 1)])]);
    let (_proxy, addr) = start(vec![router("app", "Host(`a.test`)", "app", None)], &svcs).await;
    let next = "GET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let head = "POST /front HTTP/1.1\r\nHost: a.test\r\n";
    // (name, headers and body after the request line and Host, refused by RFC 9112)
    let probes: &[(&str, &str, bool)] = &[
        (
            "CL.TE",
            "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
            false,
        ),
        (
            "TE.CL",
            "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
            false,
        ),
        (
            "two Content-Lengths",
            "Content-Length: 0\r\nContent-Length: 44\r\n\r\n",
            true,
        ),
        ("Content-Length +0", "Content-Length: +0\r\n\r\n", true),
        ("Content-Length -1", "Content-Length: -1\r\n\r\n", true),
        ("Content-Length 0x0", "Content-Length: 0x0\r\n\r\n", true),
        ("Content-Length list", "Content-Length: 0, 44\r\n\r\n", true),
        (
            "coding not ending in chunked",
            "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
            true,
        ),
        (
            "xchunked",
            "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            true,
        ),
        (
            "space before the colon",
            "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            true,
        ),
        (
            "second coding header",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
            true,
        ),
        (
            "chunk size overflow",
            "Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\nA\r\n0\r\n\r\n",
            true,
        ),
        (
            "chunk size not hex",
            "Transfer-Encoding: chunked\r\n\r\nzz\r\nA\r\n0\r\n\r\n",
            true,
        ),
        (
            "obs-fold",
            "X-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
            true,
        ),
        // RFC 9112 §2.2 lets a recipient read a lone LF as the end of a line (hyper does); what
        // the upstream gets is lb's own CRLF framing, so it cannot read the request otherwise.
        (
            "bare LF in a header",
            "X-A: a\nContent-Length: 0\r\n\r\n",
            false,
        ),
    ];
    let mut wrong = Vec::new();
    for (name, rest, refused) in probes {
        taken(&log);
        let answer = raw(addr, format!("{head}{rest}{next}").as_bytes()).await;
        let codes: Vec<u16> = answer
            .split("HTTP/1.1 ")
            .skip(1)
            .filter_map(|a| a.get(..3).and_then(|c| c.parse().ok()))
            .collect();
        let got = taken(&log);
        let ok = codes.iter().filter(|c| **c == 200).count();
        if got.len() != ok {
            wrong.push(format!(
                "{name}: lb answered {codes:?}, the upstream got {got:#?}"
            ));
        }
        for r in &got {
            let (cl, te) = (field(r, "content-length"), field(r, "transfer-encoding"));
            if (cl.is_some() && te.is_some()) || te.is_some_and(|t| t != "chunked") {
                wrong.push(format!(
                    "{name}: the upstream got both or another framing:\n{r}"
                ));
            }
        }
        if *refused && (codes.first() != Some(&400) || !got.is_empty()) {
            wrong.push(format!("{name}: must be a 400 reaching nothing; lb answered {codes:?}, the upstream got {} requests", got.len()));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

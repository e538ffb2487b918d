//! Each middleware's behaviour through a real proxy, with real upstreams on loopback: rewrites
//! and redirects, headers and CORS, API keys, ForwardAuth against a real auth server,
//! buffering limits, retries, the circuit breaker, compression (decoded again and compared),
//! mirroring, TLS to upstreams with mutual authentication, and refused smuggling attempts.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use lb_userspace::{
    model::l7::{Mirror, MirrorTarget, ServiceSpec, UpstreamTls},
    proxy::middleware::Middleware,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

mod common;
use common::*;

/// An upstream that answers with what it received: `METHOD /path?query`, then `name: value`
/// lines, then an empty line and the body.
async fn echo() -> SocketAddr {
    serve(|req: Request<hyper::body::Incoming>| async move {
        let mut out = format!(
            "{} {}\n",
            req.method(),
            req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("")
        );
        for (k, v) in req.headers() {
            out.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
        }
        out.push('\n');
        let body = req.into_body().collect().await.expect("body").to_bytes();
        out.push_str(&String::from_utf8_lossy(&body));
        Response::new(Full::new(Bytes::from(out)))
    })
    .await
}

/// The value of header `name` in an [`echo`] answer.
fn echoed<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    body.split("\n\n")
        .next()?
        .lines()
        .skip(1)
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

fn mws(list: &[(&str, &str)]) -> HashMap<String, Arc<dyn Middleware>> {
    list.iter().map(|(n, t)| (n.to_string(), mw(t))).collect()
}

fn routed(
    name: &str,
    rule: &str,
    service: &str,
    chain: &[&str],
) -> lb_userspace::model::l7::RouterSpec {
    let mut r = router(name, rule, service, None);
    r.middlewares = chain.iter().map(|s| s.to_string()).collect();
    r
}

async fn send(
    c: &C,
    method: &str,
    url: String,
    headers: &[(&str, &str)],
    body: &'static [u8],
) -> Response<Bytes> {
    let mut b = Request::builder()
        .method(method)
        .uri(url)
        .header("host", "t.test");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = c
        .request(
            b.body(Full::new(Bytes::from_static(body)))
                .expect("request"),
        )
        .await
        .expect("response");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    Response::from_parts(parts, bytes)
}

fn header<'a>(r: &'a Response<Bytes>, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

fn text(r: &Response<Bytes>) -> String {
    String::from_utf8_lossy(r.body()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_and_redirects() {
    let up = echo().await;
    let chains = mws(&[
        (
            "re",
            r#"replace_path_regex = { regex = "^/old/(.*)", replacement = "/new/$1" }"#,
        ),
        (
            "tenant",
            r#"strip_prefix_regex = { regex = ["^/t/[a-z]+"] }"#,
        ),
        ("health", r#"replace_path = { path = "/healthz" }"#),
        (
            "moved",
            r#"redirect_regex = { regex = "^http://old\\.test(:[0-9]+)?/(.*)", replacement = "https://new.test/${2}", permanent = false }"#,
        ),
        (
            "https",
            r#"redirect_scheme = { scheme = "https", permanent = true, port = 8443 }"#,
        ),
    ]);
    let routers = vec![
        routed("re", "PathPrefix(`/old`)", "s", &["re"]),
        routed("tenant", "PathPrefix(`/t/`)", "s", &["tenant"]),
        routed("health", "PathPrefix(`/ping`)", "s", &["health"]),
        routed("moved", "Host(`old.test`)", "s", &["moved"]),
        routed("https", "PathPrefix(`/login`)", "s", &["https"]),
    ];
    let (_p, addr) = start_full(
        routers,
        &services(&[("s", &[(up, 1)])]),
        HashMap::new(),
        chains,
    )
    .await;
    let c = client();

    let r = send(&c, "GET", format!("http://{addr}/old/a/b?x=1"), &[], b"").await;
    let body = text(&r);
    assert!(body.starts_with("GET /new/a/b?x=1\n"), "{body}");
    assert_eq!(echoed(&body, "x-replaced-path"), Some("/old/a/b"));

    let r = send(&c, "GET", format!("http://{addr}/t/acme/orders"), &[], b"").await;
    let body = text(&r);
    assert!(body.starts_with("GET /orders\n"), "{body}");
    assert_eq!(echoed(&body, "x-forwarded-prefix"), Some("/t/acme"));

    let r = send(&c, "GET", format!("http://{addr}/ping/deep?q=2"), &[], b"").await;
    assert!(text(&r).starts_with("GET /healthz?q=2\n"), "{}", text(&r));

    // RedirectRegex: 302 for GET, 307 for POST (the method must survive), groups substituted.
    for (method, code) in [("GET", 302), ("POST", 307)] {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}/docs/page?v=3"))
            .header("host", "old.test:8080")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let resp = c.request(req).await.expect("resp");
        assert_eq!(resp.status().as_u16(), code, "{method}");
        assert_eq!(
            resp.headers().get("location").and_then(|v| v.to_str().ok()),
            Some("https://new.test/docs/page?v=3")
        );
    }

    let req = Request::get(format!("http://{addr}/login?next=/"))
        .header("host", "shop.test")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = c.request(req).await.expect("resp");
    assert_eq!(resp.status(), 301);
    assert_eq!(
        resp.headers().get("location").and_then(|v| v.to_str().ok()),
        Some("https://shop.test:8443/login?next=/")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_cors() {
    let up = echo().await;
    let chains = mws(&[(
        "h",
        r#"headers = { request_add = { "x-trace" = "lb" }, request_remove = ["x-debug"], response_add = { "x-served-by" = "lb" }, response_remove = ["content-type"], cors = { allow_origins = ["https://app.test"], allow_methods = ["GET", "PUT"], allow_headers = ["Content-Type"], expose_headers = ["X-Total"], allow_credentials = true, max_age_secs = 600 } }"#,
    )]);
    let (_p, addr) = start_full(
        vec![routed("r", "PathPrefix(`/`)", "s", &["h"])],
        &services(&[("s", &[(up, 1)])]),
        HashMap::new(),
        chains,
    )
    .await;
    let c = client();

    let r = send(
        &c,
        "GET",
        format!("http://{addr}/x"),
        &[
            ("x-trace", "client"),
            ("x-debug", "1"),
            ("origin", "https://app.test"),
        ],
        b"",
    )
    .await;
    let body = text(&r);
    let traces: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("x-trace: "))
        .collect();
    assert_eq!(
        traces,
        vec!["x-trace: client", "x-trace: lb"],
        "add appends"
    );
    assert_eq!(echoed(&body, "x-debug"), None, "removed");
    assert_eq!(header(&r, "x-served-by"), Some("lb"));
    assert_eq!(header(&r, "content-type"), None);
    assert_eq!(
        header(&r, "access-control-allow-origin"),
        Some("https://app.test")
    );
    assert_eq!(header(&r, "access-control-allow-credentials"), Some("true"));
    assert_eq!(header(&r, "access-control-expose-headers"), Some("X-Total"));
    assert_eq!(header(&r, "vary"), Some("Origin"));

    // A preflight is answered by lb, never reaching the upstream.
    let r = send(
        &c,
        "OPTIONS",
        format!("http://{addr}/x"),
        &[
            ("origin", "https://app.test"),
            ("access-control-request-method", "PUT"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.status(), 204);
    assert!(r.body().is_empty());
    assert_eq!(
        header(&r, "access-control-allow-origin"),
        Some("https://app.test")
    );
    assert_eq!(header(&r, "access-control-allow-methods"), Some("GET, PUT"));
    assert_eq!(
        header(&r, "access-control-allow-headers"),
        Some("Content-Type")
    );
    assert_eq!(header(&r, "access-control-max-age"), Some("600"));

    // Another origin: no CORS headers, so the browser refuses.
    for method in ["OPTIONS", "GET"] {
        let r = send(
            &c,
            method,
            format!("http://{addr}/x"),
            &[
                ("origin", "https://evil.test"),
                ("access-control-request-method", "PUT"),
            ],
            b"",
        )
        .await;
        assert_eq!(header(&r, "access-control-allow-origin"), None, "{method}");
        assert_eq!(
            header(&r, "vary"),
            Some("Origin"),
            "{method}: caches keep origins apart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_forward_auth() {
    let up = echo().await;
    // The auth service: a bearer token "good" is alice; anything else goes to the login page.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let auth = serve(move |req: Request<hyper::body::Incoming>| {
        let log = log.clone();
        async move {
            let h = |k: &str| {
                req.headers()
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string()
            };
            log.lock().unwrap().push(format!(
                "{} {} {} {}",
                req.method(),
                h("x-forwarded-method"),
                h("x-forwarded-uri"),
                h("x-forwarded-host")
            ));
            if h("authorization") == "Bearer good" {
                let mut r = Response::new(Full::new(Bytes::new()));
                r.headers_mut().insert("x-user", "alice".parse().unwrap());
                r.headers_mut().insert("x-internal", "no".parse().unwrap());
                r
            } else {
                let mut r = Response::new(Full::new(Bytes::from("go log in")));
                *r.status_mut() = hyper::StatusCode::FOUND;
                r.headers_mut()
                    .insert("location", "/login".parse().unwrap());
                r
            }
        }
    })
    .await;
    let dead = dead();
    // sha256("password")
    let digest = "sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";
    let chains = mws(&[
        (
            "key",
            &format!(r#"api_key = {{ keys = ["{digest}"], query = "api_key" }}"#),
        ),
        (
            "sso",
            &format!(
                r#"forward_auth = {{ address = "http://{auth}/verify", auth_response_headers = ["X-User"] }}"#
            ),
        ),
        (
            "sso-down",
            &format!(r#"forward_auth = {{ address = "http://{dead}/verify", timeout_ms = 2000 }}"#),
        ),
    ]);
    let routers = vec![
        routed("keys", "PathPrefix(`/keyed`)", "s", &["key"]),
        routed("sso", "PathPrefix(`/private`)", "s", &["sso"]),
        routed("down", "PathPrefix(`/down`)", "s", &["sso-down"]),
    ];
    let (_p, addr) = start_full(
        routers,
        &services(&[("s", &[(up, 1)])]),
        HashMap::new(),
        chains,
    )
    .await;
    let c = client();

    let r = send(
        &c,
        "GET",
        format!("http://{addr}/keyed"),
        &[("x-api-key", "password")],
        b"",
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        echoed(&text(&r), "x-api-key"),
        None,
        "the key is not forwarded"
    );
    let r = send(
        &c,
        "GET",
        format!("http://{addr}/keyed?a=1&api_key=password&b=2"),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(text(&r).starts_with("GET /keyed?a=1&b=2\n"), "{}", text(&r));
    for bad in [vec![("x-api-key", "passwore")], vec![]] {
        let r = send(&c, "GET", format!("http://{addr}/keyed"), &bad, b"").await;
        assert_eq!(r.status(), 401);
    }

    let r = send(
        &c,
        "DELETE",
        format!("http://{addr}/private/doc?id=7"),
        &[("authorization", "Bearer good")],
        b"",
    )
    .await;
    assert_eq!(r.status(), 200);
    let body = text(&r);
    assert!(body.starts_with("DELETE /private/doc?id=7\n"), "{body}");
    assert_eq!(
        echoed(&body, "x-user"),
        Some("alice"),
        "copied from the auth answer"
    );
    assert_eq!(
        echoed(&body, "x-internal"),
        None,
        "only the configured headers"
    );
    let r = send(
        &c,
        "GET",
        format!("http://{addr}/private/doc"),
        &[("authorization", "Bearer bad")],
        b"",
    )
    .await;
    assert_eq!(
        r.status(),
        302,
        "the auth service's refusal, as it wrote it"
    );
    assert_eq!(header(&r, "location"), Some("/login"));
    assert_eq!(text(&r), "go log in");
    assert_eq!(
        seen.lock().unwrap().first().map(String::as_str),
        Some("GET DELETE /private/doc?id=7 t.test"),
        "the auth service is asked with GET and told the original method, URI and host"
    );
    let r = send(&c, "GET", format!("http://{addr}/down"), &[], b"").await;
    assert_eq!(r.status(), 502, "auth service unreachable");
}

/// A server that reads a request head, counts it, and closes without answering.
async fn hangs_up(count: Arc<AtomicU64>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffering_limits_and_retries() {
    let up = echo().await;
    let big =
        serve(|_req| async move { Response::new(Full::new(Bytes::from(vec![b'x'; 1000]))) }).await;
    let hung = Arc::new(AtomicU64::new(0));
    let hangs = hangs_up(hung.clone()).await;
    let dead = dead();
    let chains = mws(&[
        ("buf", "buffering = { max_request_body_bytes = 1000 }"),
        ("buf-resp", "buffering = { max_response_body_bytes = 100 }"),
        (
            "retry",
            "retry = { attempts = 3, initial_interval_ms = 10 }",
        ),
    ]);
    let routers = vec![
        routed("buf", "PathPrefix(`/buf`)", "s", &["buf"]),
        routed("big", "PathPrefix(`/big`)", "big", &["buf-resp"]),
        routed("flaky", "PathPrefix(`/flaky`)", "flaky", &["retry", "buf"]),
        routed("hang", "PathPrefix(`/hang`)", "hang", &["retry"]),
    ];
    let svcs = services(&[
        ("s", &[(up, 1)]),
        ("big", &[(big, 1)]),
        ("flaky", &[(dead, 1), (up, 1)]),
        ("hang", &[(hangs, 1)]),
    ]);
    // Passive ejection off for "flaky", so the dead upstream keeps being picked.
    let specs = HashMap::from([(
        "flaky".to_string(),
        ServiceSpec {
            passive: lb_userspace::model::l7::Passive {
                failures: 1000,
                backoff: Duration::from_secs(1),
            },
            ..Default::default()
        },
    )]);
    let (_p, addr) = start_full(routers, &svcs, specs, chains).await;
    let c = client();

    static SMALL: [u8; 500] = [b'a'; 500];
    static LARGE: [u8; 2000] = [b'b'; 2000];
    let r = send(&c, "POST", format!("http://{addr}/buf"), &[], &SMALL).await;
    assert_eq!(r.status(), 200);
    let body = text(&r);
    assert_eq!(echoed(&body, "content-length"), Some("500"));
    assert!(body.ends_with(&"a".repeat(500)));
    let r = send(&c, "POST", format!("http://{addr}/buf"), &[], &LARGE).await;
    assert_eq!(r.status(), 413);
    let r = send(&c, "GET", format!("http://{addr}/big"), &[], b"").await;
    assert_eq!(r.status(), 500, "response over its limit");
    let r = send(&c, "HEAD", format!("http://{addr}/big"), &[], b"").await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "content-length")),
        (200, Some("1000")),
        "a HEAD answer has no body to buffer: its length stays the real one"
    );

    // Half the picks hit a refused port; the retry (with the buffered body) always lands.
    for i in 0..10 {
        let r = send(&c, "POST", format!("http://{addr}/flaky/{i}"), &[], &SMALL).await;
        assert_eq!(r.status(), 200, "attempt {i}: {}", text(&r));
        assert!(text(&r).ends_with(&"a".repeat(500)));
    }

    // An upstream that takes the request and hangs up: an idempotent GET is tried 3 times, a
    // POST (it may have had effects) only once.
    let r = send(&c, "GET", format!("http://{addr}/hang"), &[], b"").await;
    assert_eq!(r.status(), 502);
    assert_eq!(hung.swap(0, Ordering::SeqCst), 3);
    let r = send(&c, "POST", format!("http://{addr}/hang"), &[], b"").await;
    assert_eq!(r.status(), 502);
    assert_eq!(hung.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_opens_and_recovers() {
    let hits = Arc::new(AtomicU64::new(0));
    let healthy = Arc::new(AtomicBool::new(false));
    let (h, ok) = (hits.clone(), healthy.clone());
    let up = serve(move |_req| {
        let (h, ok) = (h.clone(), ok.clone());
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            let mut r = Response::new(Full::new(Bytes::from("x")));
            if !ok.load(Ordering::SeqCst) {
                *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        }
    })
    .await;
    let dead = dead();
    let chains = mws(&[
        (
            "cb",
            r#"circuit_breaker = { expression = "ResponseCodeRatio(500, 600, 0, 600) > 0.5", check_period_ms = 0, fallback_duration_ms = 300, recovery_duration_ms = 200 }"#,
        ),
        (
            "cb-net",
            r#"circuit_breaker = { expression = "NetworkErrorRatio() > 0.5", check_period_ms = 0, fallback_duration_ms = 60000, response_code = 429 }"#,
        ),
    ]);
    let routers = vec![
        routed("app", "PathPrefix(`/app`)", "s", &["cb"]),
        routed("net", "PathPrefix(`/net`)", "dead", &["cb-net"]),
    ];
    let (_p, addr) = start_full(
        routers,
        &services(&[("s", &[(up, 1)]), ("dead", &[(dead, 1)])]),
        HashMap::new(),
        chains,
    )
    .await;
    let c = client();
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(get(&c, addr, "t", "/app", &[]).await.0);
    }
    assert_eq!(
        codes,
        vec![500, 503, 503, 503, 503],
        "open after the first 500"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the open breaker spares the upstream"
    );
    healthy.store(true, Ordering::SeqCst);
    // Past the fallback (300 ms) and the recovery ramp (200 ms): closed again.
    tokio::time::sleep(Duration::from_millis(650)).await;
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(get(&c, addr, "t", "/app", &[]).await.0);
    }
    assert_eq!(codes, vec![200; 5]);

    assert_eq!(get(&c, addr, "t", "/net", &[]).await.0, 502);
    assert_eq!(
        get(&c, addr, "t", "/net", &[]).await.0,
        429,
        "network errors open it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_by_accept_encoding() {
    let text_body: String = (0..200)
        .map(|i| format!("line {i} of a compressible page\n"))
        .collect();
    let page = Bytes::from(text_body.clone());
    let up = serve(move |req: Request<hyper::body::Incoming>| {
        let page = page.clone();
        async move {
            let mut r = match req.uri().path() {
                "/small" => Response::new(Full::new(Bytes::from("tiny"))),
                _ => Response::new(Full::new(page)),
            };
            r.headers_mut()
                .insert("content-type", "text/plain".parse().unwrap());
            r.headers_mut().insert("etag", "\"v1\"".parse().unwrap());
            if req.uri().path() == "/encoded" {
                r.headers_mut()
                    .insert("content-encoding", "br".parse().unwrap());
            }
            r
        }
    })
    .await;
    let chains = mws(&[("z", "compress = {}")]);
    let (_p, addr) = start_full(
        vec![routed("r", "PathPrefix(`/`)", "s", &["z"])],
        &services(&[("s", &[(up, 1)])]),
        HashMap::new(),
        chains,
    )
    .await;
    let c = client();
    async fn decode(enc: &str, data: &[u8]) -> Vec<u8> {
        use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZstdDecoder};
        let mut out = Vec::new();
        match enc {
            "gzip" => GzipDecoder::new(data).read_to_end(&mut out).await,
            "br" => BrotliDecoder::new(data).read_to_end(&mut out).await,
            "zstd" => ZstdDecoder::new(data).read_to_end(&mut out).await,
            other => panic!("unexpected encoding {other}"),
        }
        .expect("decode");
        out
    }
    for (accept, want) in [
        ("gzip", "gzip"),
        ("gzip, deflate, br", "br"),
        ("br;q=0.5, zstd", "zstd"),
        ("gzip;q=1, br;q=0.1", "gzip"),
    ] {
        let r = send(
            &c,
            "GET",
            format!("http://{addr}/page"),
            &[("accept-encoding", accept)],
            b"",
        )
        .await;
        assert_eq!(header(&r, "content-encoding"), Some(want), "{accept}");
        assert_eq!(header(&r, "vary"), Some("Accept-Encoding"));
        assert_eq!(header(&r, "etag"), Some("W/\"v1\""));
        assert!(
            r.body().len() < text_body.len() / 3,
            "{want}: {} bytes",
            r.body().len()
        );
        assert_eq!(decode(want, r.body()).await, text_body.as_bytes(), "{want}");
    }
    for (path, accept, why) in [
        ("/page", "identity", "no encoding accepted"),
        ("/small", "gzip", "below the minimum size"),
        ("/encoded", "gzip", "already encoded"),
    ] {
        let r = send(
            &c,
            "GET",
            format!("http://{addr}{path}"),
            &[("accept-encoding", accept)],
            b"",
        )
        .await;
        assert_ne!(header(&r, "content-encoding"), Some("gzip"), "{why}");
    }
    let r = send(
        &c,
        "HEAD",
        format!("http://{addr}/page"),
        &[("accept-encoding", "gzip")],
        b"",
    )
    .await;
    assert_eq!(header(&r, "content-encoding"), None, "HEAD");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_sends_copies_and_drops_their_answers() {
    let main = echo().await;
    let copies = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = copies.clone();
    let shadow = serve(move |req: Request<hyper::body::Incoming>| {
        let log = log.clone();
        async move {
            let line = format!("{} {}", req.method(), req.uri().path());
            let body = req.into_body().collect().await.expect("body").to_bytes();
            log.lock()
                .unwrap()
                .push(format!("{line} {}", String::from_utf8_lossy(&body)));
            let mut r = Response::new(Full::new(Bytes::from("shadow")));
            *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            r
        }
    })
    .await;
    let specs = HashMap::from([(
        "s".to_string(),
        ServiceSpec {
            mirror: Some(Mirror {
                targets: vec![MirrorTarget {
                    service: "shadow".into(),
                    percent: 100.0,
                }],
                max_body_bytes: 1024,
                body: true,
            }),
            ..Default::default()
        },
    )]);
    let (_p, addr) = start_full(
        vec![router("r", "PathPrefix(`/`)", "s", None)],
        &services(&[("s", &[(main, 1)]), ("shadow", &[(shadow, 1)])]),
        specs,
        HashMap::new(),
    )
    .await;
    let c = client();
    for i in 0..20 {
        let r = send(&c, "GET", format!("http://{addr}/g/{i}"), &[], b"").await;
        assert_eq!(r.status(), 200, "the shadow's 500 never reaches the client");
    }
    for i in 0..5 {
        let r = send(&c, "POST", format!("http://{addr}/p/{i}"), &[], b"hello").await;
        assert_eq!(r.status(), 200);
        assert!(
            text(&r).ends_with("\n\nhello"),
            "the main upstream got the body too"
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while copies.lock().unwrap().len() < 25 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut got = copies.lock().unwrap().clone();
    got.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("GET /g/{i} ")).collect();
    want.extend((0..5).map(|i| format!("POST /p/{i} hello")));
    want.sort();
    assert_eq!(got, want);
}

/// Traefik's mirroring with several mirrors, each drawing its own share, and `mirrorBody:
/// false` (routing/services: mirroring): both 100 % mirrors get every request, the 0 % one none,
/// and the copies carry no body while the main upstream gets it whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_mirrors_draw_their_shares_and_may_go_without_the_body() {
    let main = echo().await;
    let mut shadows = Vec::new();
    let mut logs = Vec::new();
    for _ in 0..3 {
        let copies = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let log = copies.clone();
        shadows.push(
            serve(move |req: Request<hyper::body::Incoming>| {
                let log = log.clone();
                async move {
                    let line = format!(
                        "{} {} len={}",
                        req.method(),
                        req.uri().path(),
                        req.headers()
                            .get("content-length")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                    );
                    let body = req.into_body().collect().await.expect("body").to_bytes();
                    log.lock()
                        .unwrap()
                        .push(format!("{line} {:?}", String::from_utf8_lossy(&body)));
                    Response::new(Full::new(Bytes::from("shadow")))
                }
            })
            .await,
        );
        logs.push(copies);
    }
    let target = |service: &str, percent: f64| MirrorTarget {
        service: service.into(),
        percent,
    };
    let specs = HashMap::from([(
        "s".to_string(),
        ServiceSpec {
            mirror: Some(Mirror {
                targets: vec![
                    target("one", 100.0),
                    target("two", 100.0),
                    target("never", 0.0),
                ],
                max_body_bytes: 1024,
                body: false,
            }),
            ..Default::default()
        },
    )]);
    let (_p, addr) = start_full(
        vec![router("r", "PathPrefix(`/`)", "s", None)],
        &services(&[
            ("s", &[(main, 1)]),
            ("one", &[(shadows[0], 1)]),
            ("two", &[(shadows[1], 1)]),
            ("never", &[(shadows[2], 1)]),
        ]),
        specs,
        HashMap::new(),
    )
    .await;
    let c = client();
    for i in 0..10 {
        let r = send(&c, "POST", format!("http://{addr}/p/{i}"), &[], b"hello").await;
        assert_eq!(r.status(), 200);
        assert!(
            text(&r).ends_with("\n\nhello"),
            "the main upstream got the body"
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while logs[..2].iter().any(|l| l.lock().unwrap().len() < 10)
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A moment more for a copy the 0 % mirror should never get.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for l in &logs[..2] {
        let mut got = l.lock().unwrap().clone();
        got.sort();
        let mut want: Vec<String> = (0..10).map(|i| format!("POST /p/{i} len=0 \"\"")).collect();
        want.sort();
        assert_eq!(got, want);
    }
    assert!(
        logs[2].lock().unwrap().is_empty(),
        "the 0 % mirror got copies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_is_verified_and_mutual() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let dir = std::env::temp_dir().join(format!("lb-mw-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        (cert, key)
    };
    let (mesh_ca, mesh_key) = ca("mesh-ca");
    let _ = ca("other-ca");
    let leaf = |names: &[&str], file: &str| {
        let key = KeyPair::generate().unwrap();
        let p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        let cert = p.signed_by(&key, &mesh_ca, &mesh_key).unwrap();
        std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    };
    leaf(&["up.internal"], "up");
    leaf(&["lb.internal"], "lb");

    // The upstream: TLS that requires a client certificate from the mesh CA, and says whose.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(mesh_ca.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("up.crt"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("up.key")).unwrap();
    let mut server = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let peer = tls.get_ref().1.peer_certificates().map_or(0, |c| c.len());
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                        format!("secure, client certs: {peer}"),
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });

    let tls = |ca: &str, client: bool, name: &str| UpstreamTls {
        ca_file: Some(dir.join(format!("{ca}.crt"))),
        cert_file: client.then(|| dir.join("lb.crt")),
        key_file: client.then(|| dir.join("lb.key")),
        server_name: Some(name.into()),
    };
    let cases = [
        ("mesh", tls("mesh-ca", true, "up.internal")),
        ("nocert", tls("mesh-ca", false, "up.internal")),
        ("wrongca", tls("other-ca", true, "up.internal")),
        ("wrongname", tls("mesh-ca", true, "other.internal")),
    ];
    let specs: HashMap<String, ServiceSpec> = cases
        .iter()
        .map(|(n, t)| {
            (
                n.to_string(),
                ServiceSpec {
                    tls: Some(t.clone()),
                    ..Default::default()
                },
            )
        })
        .collect();
    let routers = cases
        .iter()
        .map(|(n, _)| router(n, &format!("PathPrefix(`/{n}`)"), n, None))
        .collect();
    let one = [(up, 1)];
    let list: Vec<(&str, &[(SocketAddr, u32)])> =
        cases.iter().map(|(n, _)| (*n, &one[..])).collect();
    let (_p, addr) = start_full(routers, &services(&list), specs, HashMap::new()).await;
    let c = client();
    let (code, body) = get(&c, addr, "t", "/mesh", &[]).await;
    assert_eq!((code, body.as_str()), (200, "secure, client certs: 1"));
    for refused in ["/nocert", "/wrongca", "/wrongname"] {
        assert_eq!(get(&c, addr, "t", refused, &[]).await.0, 502, "{refused}");
    }

    // An upstream that accepts and never answers the handshake: the connect timeout covers the
    // handshake too, so the attempt fails in time (as never connected) instead of hanging.
    let stall = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalled = stall.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = stall.accept().await {
            held.push(s);
        }
    });
    let specs = HashMap::from([(
        "stall".to_string(),
        ServiceSpec {
            tls: Some(tls("mesh-ca", true, "up.internal")),
            connect_timeout: Duration::from_millis(300),
            ..Default::default()
        },
    )]);
    let (_p, addr) = start_with(
        vec![router("s", "PathPrefix(`/`)", "stall", None)],
        &services(&[("stall", &[(stalled, 1)])]),
        specs,
    )
    .await;
    let started = std::time::Instant::now();
    assert_eq!(get(&c, addr, "t", "/", &[]).await.0, 502);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// Sends raw bytes and returns what comes back until the proxy closes or 2 s pass.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_are_refused() {
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    // Counts the requests that arrived whole; a body cut short is refused.
    let up = serve(move |req: Request<hyper::body::Incoming>| {
        let h = h.clone();
        async move {
            let Ok(body) = req.into_body().collect().await else {
                let mut r = Response::new(Full::new(Bytes::from("cut short")));
                *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
                return r;
            };
            h.fetch_add(1, Ordering::SeqCst);
            Response::new(Full::new(Bytes::from(format!(
                "ok:{}",
                String::from_utf8_lossy(&body.to_bytes())
            ))))
        }
    })
    .await;
    let (_p, addr) = start(
        vec![router("r", "PathPrefix(`/`)", "s", None)],
        &services(&[("s", &[(up, 1)])]),
    )
    .await;
    // CL.TE: hyper frames by Transfer-Encoding, drops Content-Length and closes the connection
    // after answering (RFC 9112 §6.1), so what follows the chunked body never becomes a
    // request, and the upstream gets one message framed one way.
    let out = raw(
        addr,
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await;
    assert!(
        out.starts_with("HTTP/1.1 400")
            || (out.matches("HTTP/1.1 ").count() == 1 && out.contains("connection: close")),
        "{out:?}"
    );
    let after_cl_te = hits.swap(0, Ordering::SeqCst);
    assert!(
        after_cl_te <= 1,
        "the smuggled request never ran: {after_cl_te}"
    );
    let attempts: [&[u8]; 4] = [
        // Two different lengths.
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        // A chunk size that is not hex.
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        // A transfer coding other than chunked last: the length is unknowable.
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        // Whitespace before the colon (RFC 9112 §5.1 requires a 400).
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length : 5\r\n\r\nhello",
    ];
    for a in attempts {
        let out = raw(addr, a).await;
        // Refused by the parser (400, or the connection closed), or — a bad chunk found while
        // the body streams — the client's error: 400, and the upstream's copy cut short too.
        assert!(
            out.is_empty() || out.starts_with("HTTP/1.1 400"),
            "{:?} → {out:?}",
            String::from_utf8_lossy(a)
        );
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "no upstream got a whole request"
    );
    let ok = raw(
        addr,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.ends_with("ok:"),
        "{ok}"
    );
    // A well-formed chunked body streams through whole.
    let ok = raw(
        addr,
        b"POST / HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.ends_with("ok:hello world"),
        "{ok}"
    );
}

/// `Upgrade: h2c` never becomes a tunnel: the upstream would then take HTTP/2 requests that no
/// router or middleware sees. The request goes on as a plain one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrades_are_not_tunneled() {
    let heads = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = heads.clone();
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = l.local_addr().expect("addr");
    // An upstream that would switch to h2c whenever asked.
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                let answer: &[u8] = if head.contains("upgrade: h2c") {
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain"
                };
                seen.lock().unwrap().push(head);
                let _ = s.write_all(answer).await;
            });
        }
    });
    let (_p, addr) = start(
        vec![router("r", "PathPrefix(`/`)", "s", None)],
        &services(&[("s", &[(up, 1)])]),
    )
    .await;
    let out = raw(
        addr,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("plain"),
        "{out:?}"
    );
    let heads = heads.lock().unwrap();
    assert_eq!(heads.len(), 1);
    assert!(!heads[0].contains("upgrade"), "{}", heads[0]);
}

/// `content_type` (Traefik's `contentType`, middlewares/http/contenttype): an answer without a
/// `Content-Type` gets the type Go's sniffing gives its first bytes; one with a type, or with a
/// `Content-Encoding`, keeps what it had; a router without the middleware adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_type_is_sniffed_only_where_asked_and_missing() {
    let up = serve(|req: Request<hyper::body::Incoming>| async move {
        let path = req.uri().path().to_string();
        let body: &'static [u8] = match path.as_str() {
            "/png" | "/sniffless/png" => b"\x89PNG\x0D\x0A\x1A\x0A\x00\x00\x00\x0dIHDR",
            "/empty" => b"",
            _ => b"  <html><body>hello</body></html>",
        };
        let mut r = Response::new(Full::new(Bytes::from_static(body)));
        if path == "/typed" {
            r.headers_mut()
                .insert("content-type", "application/x-custom".parse().unwrap());
        }
        if path == "/encoded" {
            r.headers_mut()
                .insert("content-encoding", "gzip".parse().unwrap());
        }
        if path == "/nosniff" {
            r.headers_mut()
                .insert("x-content-type-options", "nosniff".parse().unwrap());
        }
        r
    })
    .await;
    let chains = mws(&[("sniff", "content_type = {}")]);
    let (_p, addr) = start_full(
        vec![
            routed("plain", "PathPrefix(`/sniffless`)", "s", &[]),
            routed("r", "PathPrefix(`/`)", "s", &["sniff"]),
        ],
        &services(&[("s", &[(up, 1)])]),
        HashMap::new(),
        chains,
    )
    .await;
    let c = client();
    for (path, want) in [
        ("/page", Some("text/html; charset=utf-8")),
        ("/png", Some("image/png")),
        ("/typed", Some("application/x-custom")),
        ("/encoded", None),
        ("/nosniff", None),
        ("/empty", None),
        ("/sniffless/png", None),
    ] {
        let resp = c
            .request(
                Request::get(format!("http://{addr}{path}"))
                    .header("host", "x.test")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .expect("response");
        let got = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(got.as_deref(), want, "{path}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        if path == "/page" {
            assert_eq!(
                &body[..],
                b"  <html><body>hello</body></html>",
                "the body is whole"
            );
        }
    }
}

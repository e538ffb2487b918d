//! The proxy with real upstream servers on loopback and a real hyper client: routing, priorities,
//! balancing, error answers, forwarded headers, h2c, and table swaps under load.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use lb_userspace::{
    model::instance::Services,
    model::l7::{Algorithm, EntryPointSpec, Passive, RouterSpec, ServiceSpec},
    proxy::{middleware::Middleware, Proxy},
};
use tokio::net::TcpListener;

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_rule_and_priority_and_answers_errors() {
    let (a, b, api2) = (
        upstream("a").await,
        upstream("b").await,
        upstream("api2").await,
    );
    let dead = dead(); // closed again: connections are refused
    let svcs = services(&[
        ("site", &[(a, 1)]),
        ("api", &[(b, 1)]),
        ("api2", &[(api2, 1)]),
        ("dead", &[(dead, 1)]),
        ("empty", &[]),
    ]);
    let routers = vec![
        router("site", "Host(`example.com`)", "site", None),
        router(
            "api",
            "Host(`example.com`) && PathPrefix(`/api`)",
            "api",
            None,
        ),
        router(
            "api2",
            "Host(`example.com`) && PathPrefix(`/api/v2`)",
            "api2",
            None,
        ),
        router("low", "PathPrefix(`/forced`)", "api2", Some(1)),
        router("dead", "Host(`dead.test`)", "dead", None),
        router("empty", "Host(`empty.test`)", "empty", None),
    ];
    let (_p, addr) = start(routers, &svcs).await;
    let c = client();
    assert!(
        get(&c, addr, "example.com", "/", &[])
            .await
            .1
            .starts_with("a /"),
        "Host"
    );
    assert!(
        get(&c, addr, "example.com", "/api/x", &[])
            .await
            .1
            .starts_with("b /api/x"),
        "longer rule wins"
    );
    assert!(
        get(&c, addr, "example.com", "/api/v2/x", &[])
            .await
            .1
            .starts_with("api2 "),
        "longest rule wins"
    );
    // An explicit low priority loses to the Host rule although it matches too.
    assert!(
        get(&c, addr, "example.com", "/forced", &[])
            .await
            .1
            .starts_with("a "),
        "priority"
    );
    assert_eq!(get(&c, addr, "other.test", "/", &[]).await.0, 404);
    assert_eq!(get(&c, addr, "empty.test", "/", &[]).await.0, 503);
    assert_eq!(get(&c, addr, "dead.test", "/", &[]).await.0, 502);
    // Forwarded headers; the Host is kept; a header named in Connection does not cross the proxy.
    let (_, body) = get(
        &c,
        addr,
        "example.com",
        "/",
        &[("connection", "x-secret"), ("x-secret", "1")],
    )
    .await;
    assert!(
        body.contains("xff=127.0.0.1")
            && body.contains("host=example.com")
            && body.contains("secret=-"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balances_by_weight_and_speaks_h2c() {
    let (x, y, z) = (
        upstream("x").await,
        upstream("y").await,
        upstream("z").await,
    );
    let svcs = services(&[("eq", &[(x, 1), (y, 1), (z, 1)]), ("w", &[(x, 1), (y, 2)])]);
    let (_p, addr) = start(
        vec![
            router("eq", "PathPrefix(`/eq`)", "eq", None),
            router("w", "PathPrefix(`/w`)", "w", None),
        ],
        &svcs,
    )
    .await;
    let c = client();
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..300 {
        let (_, body) = get(&c, addr, "t", "/eq", &[]).await;
        *count
            .entry(body.split(' ').next().unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(
        count.values().copied().collect::<Vec<_>>(),
        vec![100, 100, 100],
        "{count:?}"
    );
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..300 {
        let (_, body) = get(&c, addr, "t", "/w", &[]).await;
        *count
            .entry(body.split(' ').next().unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!((count["x"], count["y"]), (100, 200), "weights 1:2");
    // HTTP/2 with prior knowledge (h2c) on the same entry point.
    let h2: C = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::get(format!("http://{addr}/eq"))
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = h2.request(req).await.expect("h2c response");
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body = String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes())
        .into_owned();
    assert!(
        body.contains(&format!("host={addr} ")),
        "HTTP/2's :authority reaches the upstream as Host: {body}"
    );
}

/// Upstream changes swap the whole table while 10,000 requests run on 8 connections: none fails,
/// and the new upstream takes traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_swaps_under_load_lose_no_request() {
    let (x, y) = (upstream("x").await, upstream("y").await);
    let (proxy, addr) = start(
        vec![router("all", "PathPrefix(`/`)", "s", None)],
        &services(&[("s", &[(x, 1)])]),
    )
    .await;
    let (done, failed, seen_y) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (done, failed, seen_y) = (done.clone(), failed.clone(), seen_y.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..1250 {
                let req = Request::get(format!("http://{addr}/"))
                    .body(Full::new(Bytes::new()))
                    .expect("req");
                match c.request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let body = r
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if body.starts_with(b"y") {
                            seen_y.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let swapper = {
        let (proxy, stop) = (proxy.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let ups: &[(SocketAddr, u32)] = if n.is_multiple_of(2) {
                    &[(x, 1), (y, 1)]
                } else {
                    &[(y, 1)]
                };
                proxy.update_services(&services(&[("s", ups)]));
                n += 1;
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            n
        })
    };
    for w in workers {
        w.await.expect("worker");
    }
    stop.store(true, Ordering::SeqCst);
    let swaps = swapper.await.expect("swapper");
    let (done, failed) = (done.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    println!("proxy: {done} requests during {swaps} table swaps, {failed} failed, {} to the new upstream", seen_y.load(Ordering::SeqCst));
    assert_eq!(done, 10_000);
    assert_eq!(failed, 0);
    assert!(swaps > 10 && seen_y.load(Ordering::SeqCst) > 0);
}

/// An upstream whose answers are 500 while `failing` is set.
async fn flaky(name: &'static str, failing: Arc<AtomicBool>) -> SocketAddr {
    serve(move |_req| {
        let fail = failing.load(Ordering::SeqCst);
        async move {
            let mut r = Response::new(Full::new(Bytes::from(name)));
            if fail {
                *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_health_ejects_a_failing_upstream_and_lets_it_back() {
    let failing = Arc::new(AtomicBool::new(true));
    let (bad, good) = (flaky("bad", failing.clone()).await, upstream("good").await);
    let spec = ServiceSpec {
        algorithm: Algorithm::WeightedRoundRobin,
        passive: Passive {
            failures: 3,
            backoff: std::time::Duration::from_millis(400),
        },
        ..Default::default()
    };
    let (_p, addr) = start_with(
        vec![router("all", "PathPrefix(`/`)", "s", None)],
        &services(&[("s", &[(bad, 1), (good, 1)])]),
        HashMap::from([("s".to_string(), spec)]),
    )
    .await;
    let c = client();
    let mut errors = 0;
    for _ in 0..6 {
        if get(&c, addr, "t", "/", &[]).await.0 == 500 {
            errors += 1;
        }
    }
    assert_eq!(
        errors, 3,
        "round robin sends every other request to the failing one until it is ejected"
    );
    for _ in 0..20 {
        let (code, body) = get(&c, addr, "t", "/", &[]).await;
        assert_eq!(
            (code, body.starts_with("good")),
            (200, true),
            "ejected: only the healthy upstream answers"
        );
    }
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut back = 0;
    for _ in 0..10 {
        if get(&c, addr, "t", "/", &[]).await.1 == "bad" {
            back += 1;
        }
    }
    assert_eq!(back, 5, "after the back-off it takes its share again");
}

/// An upstream whose `/health` answers 503 while `sick` is set (its other paths stay 200),
/// and which counts the checks it got with lb's user agent, Host and header.
async fn checked(name: &'static str, sick: Arc<AtomicBool>, checks: Arc<AtomicU64>) -> SocketAddr {
    serve(move |req: Request<hyper::body::Incoming>| {
        let (sick, checks) = (sick.load(Ordering::SeqCst), checks.clone());
        async move {
            let h = |k: &str| {
                req.headers()
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            if req.uri().path() == "/health" {
                if h("user-agent").as_deref() == Some("lb-health")
                    && h("host").as_deref() == Some("health.test")
                    && h("x-check").as_deref() == Some("1")
                    && req.method() == hyper::Method::HEAD
                {
                    checks.fetch_add(1, Ordering::SeqCst);
                }
                let mut r = Response::new(Full::new(Bytes::new()));
                if sick {
                    *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                }
                return r;
            }
            Response::new(Full::new(Bytes::from(name)))
        }
    })
    .await
}

/// Who answers `n` requests to the catch-all router's host.
async fn answers(c: &C, addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    answers_for(c, addr, "t", n).await
}

/// Polls until `n` requests are all answered as `want` says, for at most 5 s.
async fn until_answers(c: &C, addr: SocketAddr, want: &[(&str, usize)]) -> std::time::Duration {
    let t = std::time::Instant::now();
    let want: BTreeMap<String, usize> = want.iter().map(|(k, n)| (k.to_string(), *n)).collect();
    let n = want.values().sum();
    loop {
        let got = answers(c, addr, n).await;
        if got == want {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "after 5 s: {got:?}, expected {want:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `loadBalancer.healthCheck` / `[http_service] health`: an upstream failing its check leaves
/// the pool although its other paths answer (real requests succeeding do not bring it back),
/// every upstream down is a 503, and a passing check brings it back. The check's own request
/// (method, Host, header) is what was configured, and `lb_http_server_up` says the verdicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_take_an_upstream_out_and_bring_it_back() {
    let (sick_a, sick_b) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (checks_a, checks_b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let a = checked("a", sick_a.clone(), checks_a.clone()).await;
    let b = checked("b", sick_b.clone(), checks_b.clone()).await;
    let ms = std::time::Duration::from_millis;
    let spec = ServiceSpec {
        health: Some(lb_userspace::model::l7::ActiveCheck {
            interval: ms(100),
            unhealthy_interval: ms(100),
            timeout: ms(100),
            path: "/health".into(),
            method: "HEAD".into(),
            hostname: Some("health.test".into()),
            headers: vec![("x-check".into(), "1".into())],
            ..Default::default()
        }),
        ..Default::default()
    };
    let (p, addr) = start_with(
        vec![router("all", "PathPrefix(`/`)", "s", None)],
        &services(&[("s", &[(a, 1), (b, 1)])]),
        HashMap::from([("s".to_string(), spec)]),
    )
    .await;
    let c = client();
    until_answers(&c, addr, &[("200 a", 10), ("200 b", 10)]).await;
    sick_a.store(true, Ordering::SeqCst);
    let out = until_answers(&c, addr, &[("200 b", 20)]).await;
    eprintln!("a failing its check was out of the pool after {out:?}");
    // Its requests would succeed, and still it stays out: only the check brings it back.
    assert_eq!(
        answers(&c, addr, 40).await,
        BTreeMap::from([("200 b".to_string(), 40)])
    );
    sick_b.store(true, Ordering::SeqCst);
    // Every upstream down: no one to send to.
    until_answers(&c, addr, &[("503", 4)]).await;
    let registry = prometheus::Registry::new();
    for col in p.obs().collectors() {
        registry.register(col).expect("register");
    }
    let text = {
        let mut buf = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut buf,
        )
        .expect("encode");
        String::from_utf8(buf).expect("utf-8")
    };
    let mut all_down = vec![("s".to_string(), a, false), ("s".to_string(), b, false)];
    all_down.sort();
    assert_eq!(p.active_checks(), all_down, "as /api/v1/routers lists them");
    for u in [a, b] {
        assert!(
            text.contains(&format!(
                "lb_http_server_up{{server=\"{u}\",service=\"s\"}} 0"
            )),
            "{text}"
        );
    }
    sick_a.store(false, Ordering::SeqCst);
    let back = until_answers(&c, addr, &[("200 a", 20)]).await;
    eprintln!("a passing its check again was back after {back:?}");
    sick_b.store(false, Ordering::SeqCst);
    until_answers(&c, addr, &[("200 a", 10), ("200 b", 10)]).await;
    assert!(
        checks_a.load(Ordering::SeqCst) >= 5 && checks_b.load(Ordering::SeqCst) >= 5,
        "the checks went as configured (HEAD, Host, header): {checks_a:?} {checks_b:?}"
    );
    // An upstream gone from the registry: its checks stop and its series goes.
    p.update_services(&services(&[("s", &[(b, 1)])]));
    let before = checks_a.load(Ordering::SeqCst);
    tokio::time::sleep(ms(400)).await;
    assert!(
        checks_a.load(Ordering::SeqCst) <= before + 1,
        "no more checks of a"
    );
    let mut buf = Vec::new();
    prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &registry.gather(),
        &mut buf,
    )
    .expect("encode");
    let text = String::from_utf8(buf).expect("utf-8");
    assert!(!text.contains(&format!("server=\"{a}\"")), "{text}");
    assert!(
        text.contains(&format!(
            "lb_http_server_up{{server=\"{b}\",service=\"s\"}} 1"
        )),
        "{text}"
    );
}

/// Who answers `n` requests to `host`: `200 <body>`, or the status alone.
async fn answers_for(c: &C, addr: SocketAddr, host: &str, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let (code, body) = get(c, addr, host, "/", &[]).await;
        let key = if code == 200 {
            format!("200 {body}")
        } else {
            code.to_string()
        };
        *seen.entry(key).or_default() += 1;
    }
    seen
}

/// Traefik's `weighted` and `failover` services (lb.toml's `weighted`/`failover`): requests
/// shared 3:1 between two services in the exact smooth-WRR order, a weighted service passing
/// over the one whose upstreams are all down, and a failover going to its fallback while its
/// main service's checks fail and back when they pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_and_failover_services_follow_weights_and_checks() {
    use lb_userspace::model::l7::{ActiveCheck, Composite};
    let sick = Arc::new(AtomicBool::new(false));
    let a = checked("a", sick.clone(), Arc::default()).await;
    let b = upstream("b").await;
    let ms = std::time::Duration::from_millis;
    let check = ActiveCheck {
        interval: ms(100),
        unhealthy_interval: ms(100),
        timeout: ms(100),
        path: "/health".into(),
        ..Default::default()
    };
    let specs = HashMap::from([
        (
            "v1".to_string(),
            ServiceSpec {
                health: Some(check),
                ..Default::default()
            },
        ),
        (
            "w".to_string(),
            ServiceSpec {
                composite: Some(Composite::Weighted(vec![
                    ("v1".into(), 3),
                    ("v2".into(), 1),
                ])),
                ..Default::default()
            },
        ),
        (
            "f".to_string(),
            ServiceSpec {
                composite: Some(Composite::Failover {
                    main: "v1".into(),
                    fallback: "v2".into(),
                }),
                ..Default::default()
            },
        ),
        // Composites of composites: all of `w`, by weight, through one more level.
        (
            "outer".to_string(),
            ServiceSpec {
                composite: Some(Composite::Weighted(vec![("w".into(), 1)])),
                ..Default::default()
            },
        ),
    ]);
    let (p, addr) = start_with(
        vec![
            router("w", "Host(`w.test`)", "w", None),
            router("f", "Host(`f.test`)", "f", None),
            router("outer", "Host(`outer.test`)", "outer", None),
        ],
        &services(&[("v1", &[(a, 1)]), ("v2", &[(b, 1)])]),
        specs,
    )
    .await;
    assert!(
        p.service_names().contains(&"v2".to_string()),
        "a composite's services are asked of the registry: {:?}",
        p.service_names()
    );
    let c = client();
    let mut order = Vec::new();
    for _ in 0..8 {
        let (code, body) = get(&c, addr, "w.test", "/", &[]).await;
        assert_eq!(code, 200);
        order.push(body.split(' ').next().unwrap_or("").to_string());
    }
    assert_eq!(
        order,
        ["a", "a", "b", "a", "a", "a", "b", "a"],
        "smooth WRR, 3:1"
    );
    let outer = answers_for(&c, addr, "outer.test", 8).await;
    assert_eq!(outer.get("200 a"), Some(&6), "{outer:?}");
    let f = answers_for(&c, addr, "f.test", 10).await;
    assert_eq!(
        f,
        BTreeMap::from([("200 a".to_string(), 10)]),
        "failover: all to main"
    );
    sick.store(true, Ordering::SeqCst);
    let t = std::time::Instant::now();
    loop {
        let f = answers_for(&c, addr, "f.test", 10).await;
        if f.keys().all(|k| k.starts_with("200 b")) {
            break;
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "{f:?}");
        tokio::time::sleep(ms(20)).await;
    }
    eprintln!(
        "failover to the fallback {:?} after main's check failed",
        t.elapsed()
    );
    let w = answers_for(&c, addr, "w.test", 12).await;
    assert!(
        w.keys().all(|k| k.starts_with("200 b")),
        "weighted passes over a service with no upstream up: {w:?}"
    );
    sick.store(false, Ordering::SeqCst);
    let t = std::time::Instant::now();
    loop {
        let f = answers_for(&c, addr, "f.test", 10).await;
        if f == BTreeMap::from([("200 a".to_string(), 10)]) {
            break;
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "{f:?}");
        tokio::time::sleep(ms(20)).await;
    }
    eprintln!("back to main {:?} after its check passed", t.elapsed());
}

/// `passHostHeader: false` (lb.toml's `pass_host_header = false`): the upstream gets the name
/// its server URL had, or its address, as `Host`; the client's goes on in `X-Forwarded-Host`.
/// By default the client's `Host` is passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_host_header_false_sends_the_upstreams_own_host() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let specs = HashMap::from([
        (
            "named".to_string(),
            ServiceSpec {
                upstream_host: Some(BTreeMap::from([(a, "app.internal:8080".to_string())])),
                ..Default::default()
            },
        ),
        (
            "addressed".to_string(),
            ServiceSpec {
                upstream_host: Some(BTreeMap::new()),
                ..Default::default()
            },
        ),
    ]);
    let (_p, addr) = start_with(
        vec![
            router("named", "Host(`n.test`)", "named", None),
            router("addressed", "Host(`a.test`)", "addressed", None),
            router("passed", "Host(`p.test`)", "passed", None),
        ],
        &services(&[
            ("named", &[(a, 1)]),
            ("addressed", &[(b, 1)]),
            ("passed", &[(b, 1)]),
        ]),
        specs,
    )
    .await;
    let c = client();
    let (_, body) = get(&c, addr, "n.test", "/", &[]).await;
    assert!(body.contains("host=app.internal:8080"), "{body}");
    let (_, body) = get(&c, addr, "a.test", "/", &[]).await;
    assert!(body.contains(&format!("host={b}")), "{body}");
    let (_, body) = get(&c, addr, "p.test", "/", &[]).await;
    assert!(body.contains("host=p.test"), "{body}");
}

/// A slow upstream gets fewer requests under least-requests and P2C than its fast peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_requests_and_p2c_steer_around_a_slow_upstream() {
    for algorithm in [Algorithm::LeastRequests, Algorithm::P2c] {
        let (slow, f1, f2) = (
            slow(50).await,
            upstream("fast1").await,
            upstream("fast2").await,
        );
        let spec = ServiceSpec {
            algorithm,
            passive: Passive::default(),
            ..Default::default()
        };
        let (_p, addr) = start_with(
            vec![router("all", "PathPrefix(`/`)", "s", None)],
            &services(&[("s", &[(slow, 1), (f1, 1), (f2, 1)])]),
            HashMap::from([("s".to_string(), spec)]),
        )
        .await;
        let slow_count = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let slow_count = slow_count.clone();
            tasks.push(tokio::spawn(async move {
                let c = client();
                for _ in 0..50 {
                    if get(&c, addr, "t", "/", &[]).await.1 == "slow" {
                        slow_count.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("client");
        }
        let n = slow_count.load(Ordering::SeqCst);
        println!("proxy: {algorithm:?}: the slow upstream got {n} of 400 requests");
        assert!(
            n < 400 / 6,
            "{algorithm:?}: slow upstream got {n} of 400 (a fair share would be 133)"
        );
    }
}

/// A real WebSocket session (tokio-tungstenite on both ends) through the proxy's Upgrade tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_proxy() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ws_addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() || m.is_binary() {
                        let _ = ws.send(m).await;
                    }
                }
            });
        }
    });
    let (_p, addr) = start(
        vec![router("ws", "PathPrefix(`/ws`)", "ws", None)],
        &services(&[("ws", &[(ws_addr, 1)])]),
    )
    .await;
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
        .await
        .expect("handshake through the proxy");
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        ws.send(Message::text(format!("hello {i}")))
            .await
            .expect("send");
        let back = ws.next().await.expect("frame").expect("ok");
        assert_eq!(back, Message::text(format!("hello {i}")));
    }
    ws.close(None).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middlewares_in_a_chain() {
    let up = upstream("u").await;
    let hash = bcrypt::hash("s3cret", 4).expect("hash");
    let mws: HashMap<String, Arc<dyn Middleware>> = HashMap::from([
        (
            "local".to_string(),
            mw(r#"ip_allow_list = { source_range = ["127.0.0.0/8"] }"#),
        ),
        (
            "tenants".to_string(),
            mw(r#"ip_allow_list = { source_range = ["10.0.0.0/8"] }"#),
        ),
        (
            "strip".to_string(),
            mw(r#"strip_prefix = { prefixes = ["/api"] }"#),
        ),
        ("v1".to_string(), mw(r#"add_prefix = { prefix = "/v1" }"#)),
        (
            "hdrs".to_string(),
            mw(
                r#"headers = { request_set = { "x-secret" = "from-lb" }, response_set = { "x-frame-options" = "DENY" } }"#,
            ),
        ),
        (
            "auth".to_string(),
            mw(&format!(
                r#"basic_auth = {{ users = ["alice:{hash}"], realm = "test" }}"#
            )),
        ),
        (
            "https".to_string(),
            mw(r#"redirect_scheme = { scheme = "https", permanent = true }"#),
        ),
        (
            "limit".to_string(),
            mw(r#"rate_limit = { average = 0.5, burst = 2.0 }"#),
        ),
    ]);
    let mut api = router("api", "PathPrefix(`/api`)", "s", None);
    api.middlewares = ["local", "auth", "strip", "v1", "hdrs"]
        .map(String::from)
        .to_vec();
    let mut closed = router("closed", "PathPrefix(`/closed`)", "s", None);
    closed.middlewares = vec!["tenants".into()];
    let mut secure = router("secure", "PathPrefix(`/login`)", "s", None);
    secure.middlewares = vec!["https".into()];
    let mut limited = router("limited", "PathPrefix(`/limited`)", "s", None);
    limited.middlewares = vec!["limit".into()];
    let (_p, addr) = start_full(
        vec![api, closed, secure, limited],
        &services(&[("s", &[(up, 1)])]),
        HashMap::new(),
        mws,
    )
    .await;
    let c = client();

    // BasicAuth: no credentials, wrong ones, right ones (and the password never reaches upstream).
    let (code, _) = get(&c, addr, "t", "/api/users", &[]).await;
    assert_eq!(code, 401);
    use base64::Engine as _;
    let bad = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:nope")
    );
    assert_eq!(
        get(&c, addr, "t", "/api/users", &[("authorization", &bad)])
            .await
            .0,
        401
    );
    let good = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
    );
    let req = Request::get(format!("http://{addr}/api/users?x=1"))
        .header("host", "t")
        .header("authorization", &good)
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = c.request(req).await.expect("resp");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("x-frame-options").map(|v| v.as_bytes()),
        Some(&b"DENY"[..]),
        "response header set"
    );
    let body = String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes())
        .into_owned();
    // StripPrefix then AddPrefix: /api/users → /users → /v1/users; Headers set X-Secret.
    assert!(
        body.starts_with("u /v1/users ") && body.contains("secret=from-lb"),
        "{body}"
    );

    assert_eq!(
        get(&c, addr, "t", "/closed", &[]).await.0,
        403,
        "IP allow list"
    );
    let req = Request::get(format!("http://{addr}/login?next=/"))
        .header("host", "shop.test")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = c.request(req).await.expect("resp");
    assert_eq!(resp.status(), 301);
    assert_eq!(
        resp.headers().get("location").map(|v| v.as_bytes()),
        Some(&b"https://shop.test/login?next=/"[..])
    );
    let codes: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(get(&c, addr, "t", "/limited", &[]).await.0);
        }
        v
    };
    assert_eq!(codes, vec![200, 200, 429, 429], "burst 2, then limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_limit_refuses_the_excess() {
    let slow = slow(300).await;
    let mws: HashMap<String, Arc<dyn Middleware>> =
        HashMap::from([("one".to_string(), mw("in_flight_req = { amount = 1 }"))]);
    let mut r = router("r", "PathPrefix(`/`)", "s", None);
    r.middlewares = vec!["one".into()];
    let (_p, addr) = start_full(
        vec![r],
        &services(&[("s", &[(slow, 1)])]),
        HashMap::new(),
        mws,
    )
    .await;
    let first = tokio::spawn(async move { get(&client(), addr, "t", "/", &[]).await.0 });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(
        get(&client(), addr, "t", "/", &[]).await.0,
        429,
        "second while the first is in flight"
    );
    assert_eq!(first.await.expect("first"), 200);
    assert_eq!(
        get(&client(), addr, "t", "/", &[]).await.0,
        200,
        "the slot is free again"
    );
}

/// `inFlightReq` per source (Traefik's default, and its `sourceCriterion.requestHeaderName`):
/// one tenant's request in flight does not count against another's, while a second of its own
/// gets a 429; the per-source counts go when the requests end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_limit_per_source_counts_each_source_alone() {
    let slow = slow(300).await;
    let mws: HashMap<String, Arc<dyn Middleware>> = HashMap::from([
        (
            "tenant".to_string(),
            mw("in_flight_req = { amount = 1, per = \"header\", source_header = \"x-tenant\" }"),
        ),
        (
            "ip".to_string(),
            mw("in_flight_req = { amount = 1, per = \"client_ip\" }"),
        ),
    ]);
    let mut by_tenant = router("t", "Host(`t.test`)", "s", None);
    by_tenant.middlewares = vec!["tenant".into()];
    let mut by_ip = router("i", "Host(`i.test`)", "s", None);
    by_ip.middlewares = vec!["ip".into()];
    let (_p, addr) = start_full(
        vec![by_tenant, by_ip],
        &services(&[("s", &[(slow, 1)])]),
        HashMap::new(),
        mws,
    )
    .await;
    let first = tokio::spawn(async move {
        get(&client(), addr, "t.test", "/", &[("x-tenant", "a")])
            .await
            .0
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let other = tokio::spawn(async move {
        get(&client(), addr, "t.test", "/", &[("x-tenant", "b")])
            .await
            .0
    });
    assert_eq!(
        get(&client(), addr, "t.test", "/", &[("x-tenant", "a")])
            .await
            .0,
        429,
        "a second of a's while its first is in flight"
    );
    assert_eq!(
        other.await.expect("b"),
        200,
        "another tenant is not held back"
    );
    assert_eq!(first.await.expect("first"), 200);
    assert_eq!(
        get(&client(), addr, "t.test", "/", &[("x-tenant", "a")])
            .await
            .0,
        200,
        "a's place is free again"
    );
    let first = tokio::spawn(async move { get(&client(), addr, "i.test", "/", &[]).await.0 });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(
        get(&client(), addr, "i.test", "/", &[]).await.0,
        429,
        "the same address, a second in flight"
    );
    assert_eq!(first.await.expect("first"), 200);
    assert_eq!(
        get(&client(), addr, "i.test", "/", &[]).await.0,
        200,
        "free again"
    );
}

/// Retry's `status`, `disableRetryOnNetworkError` and `timeout` (Traefik's reference:
/// routing/http/middlewares/retry): a 500 from one upstream is sent again to the other, so every
/// request gets the good answer; without `status` the 500s come through; a refused connection
/// is not tried again when network errors are excluded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_status_and_without_network_errors() {
    let failing = Arc::new(AtomicBool::new(true));
    let (bad, good) = (flaky("bad", failing.clone()).await, upstream("good").await);
    let mws: HashMap<String, Arc<dyn Middleware>> = HashMap::from([
        (
            "on5xx".to_string(),
            mw("retry = { attempts = 2, status = [\"500-599\"], timeout_ms = 5000 }"),
        ),
        ("plain".to_string(), mw("retry = { attempts = 2 }")),
        (
            "nonet".to_string(),
            mw("retry = { attempts = 2, disable_retry_on_network_error = true }"),
        ),
    ]);
    let mut on5xx = router("s", "Host(`s.test`)", "s", None);
    on5xx.middlewares = vec!["on5xx".into()];
    let mut plain = router("p", "Host(`p.test`)", "s", None);
    plain.middlewares = vec!["plain".into()];
    let mut nonet = router("n", "Host(`n.test`)", "d", None);
    nonet.middlewares = vec!["nonet".into()];
    let mut net = router("net", "Host(`net.test`)", "d", None);
    net.middlewares = vec!["plain".into()];
    let dead = dead();
    let passive = ServiceSpec {
        // Ejection would hide what the retries do.
        passive: Passive {
            failures: 1_000_000,
            backoff: std::time::Duration::from_secs(1),
        },
        ..Default::default()
    };
    let (_p, addr) = start_full(
        vec![on5xx, plain, nonet, net],
        &services(&[
            ("s", &[(bad, 1), (good, 1)]),
            ("d", &[(dead, 1), (good, 1)]),
        ]),
        HashMap::from([
            ("s".to_string(), passive.clone()),
            ("d".to_string(), passive),
        ]),
        mws,
    )
    .await;
    let c = client();
    let tally = |host: &'static str| {
        let c = c.clone();
        async move {
            let mut codes = BTreeMap::new();
            for _ in 0..10 {
                *codes
                    .entry(get(&c, addr, host, "/", &[]).await.0)
                    .or_insert(0) += 1;
            }
            codes
        }
    };
    assert_eq!(
        tally("s.test").await,
        BTreeMap::from([(200, 10)]),
        "500s sent again"
    );
    assert_eq!(
        tally("p.test").await,
        BTreeMap::from([(200, 5), (500, 5)]),
        "an answer is an answer"
    );
    assert_eq!(
        tally("net.test").await,
        BTreeMap::from([(200, 10)]),
        "refused: tried again"
    );
    assert_eq!(
        tally("n.test").await,
        BTreeMap::from([(200, 5), (502, 5)]),
        "network errors excluded: not tried again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_timeouts_sticky_sessions_and_request_ids() {
    let live = upstream("live").await;
    let dead = dead();
    let slow = slow(400).await;
    let (a, b, c) = (
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    );
    let no_passive = Passive {
        failures: 1000,
        backoff: std::time::Duration::from_secs(1),
    };
    let specs = HashMap::from([
        (
            "retry".to_string(),
            ServiceSpec {
                retries: 1,
                passive: no_passive,
                ..Default::default()
            },
        ),
        (
            "noretry".to_string(),
            ServiceSpec {
                passive: no_passive,
                ..Default::default()
            },
        ),
        (
            "timed".to_string(),
            ServiceSpec {
                request_timeout: Some(std::time::Duration::from_millis(100)),
                ..Default::default()
            },
        ),
        (
            "sticky".to_string(),
            ServiceSpec {
                sticky_cookie: Some("lb_s".into()),
                ..Default::default()
            },
        ),
    ]);
    let routers = vec![
        router("retry", "PathPrefix(`/retry`)", "retry", None),
        router("noretry", "PathPrefix(`/noretry`)", "noretry", None),
        router("timed", "PathPrefix(`/timed`)", "timed", None),
        router("sticky", "PathPrefix(`/sticky`)", "sticky", None),
    ];
    let svcs = services(&[
        ("retry", &[(dead, 1), (live, 1)]),
        ("noretry", &[(dead, 1), (live, 1)]),
        ("timed", &[(slow, 1)]),
        ("sticky", &[(a, 1), (b, 1), (c, 1)]),
    ]);
    let (_p, addr) = start_with(routers, &svcs, specs).await;
    let cl = client();
    // Round robin sends every first attempt to the dead upstream (the retry takes the live one's
    // turn): the first 10 are all saved by a retry, from the budget's reserve of 10 …
    for i in 0..10 {
        assert_eq!(
            get(&cl, addr, "t", "/retry", &[]).await.0,
            200,
            "request {i} was not retried"
        );
    }
    // … then the budget (0.2 a request) runs dry and failures come through: retries cannot
    // multiply the load on a failing service. (Without a budget all 30 would be saved; without
    // retries, 15 would fail.)
    let mut failed_after = 0;
    for _ in 0..30 {
        if get(&cl, addr, "t", "/retry", &[]).await.0 == 502 {
            failed_after += 1;
        }
    }
    assert!(
        (5..15).contains(&failed_after),
        "{failed_after} of 30 failed once the budget's reserve was spent"
    );
    let mut failed = 0;
    for _ in 0..20 {
        if get(&cl, addr, "t", "/noretry", &[]).await.0 == 502 {
            failed += 1;
        }
    }
    assert_eq!(
        failed, 10,
        "without retries, round robin sends half to the dead upstream"
    );
    assert_eq!(get(&cl, addr, "t", "/timed", &[]).await.0, 504);
    // Sticky: the first answer sets the cookie; with it, every request lands on the same upstream.
    let req = Request::get(format!("http://{addr}/sticky"))
        .header("host", "t")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = cl.request(req).await.expect("resp");
    let set = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("set-cookie")
        .to_string();
    let first =
        String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes())
            .split(' ')
            .next()
            .unwrap_or("")
            .to_string();
    let cookie = set.split(';').next().unwrap_or("").to_string();
    for _ in 0..20 {
        let (_, body) = get(&cl, addr, "t", "/sticky", &[("cookie", &cookie)]).await;
        assert!(body.starts_with(&first), "sticky to {first}, got {body}");
    }
    // Every forwarded request carries a request id (generated when the client sent none).
    let (_, body) = get(&cl, addr, "t", "/sticky", &[]).await;
    let rid = body.split("rid=").nth(1).unwrap_or("-").trim().to_string();
    assert_eq!(rid.len(), 32, "{body}");
    let (_, body) = get(&cl, addr, "t", "/sticky", &[("x-request-id", "abc-123")]).await;
    assert!(
        body.ends_with("rid=abc-123"),
        "a client's id is kept: {body}"
    );
}

async fn start_trusting(routers: Vec<RouterSpec>, svcs: &Services, trusted: &[&str]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let ep = EntryPointSpec {
        name: "web".into(),
        address: addr,
        tls: false,
        client_ca_file: None,
        trusted_ips: trusted.iter().map(|t| t.parse().expect("cidr")).collect(),
        limits: Default::default(),
        also_plain: false,
        as_default: false,
        proxy_protocol: None,
    };
    let proxy = Arc::new(Proxy::new(
        vec![ep],
        routers,
        HashMap::new(),
        HashMap::new(),
        svcs,
    ));
    tokio::spawn(proxy.serve("web".into(), l, None));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_believed_only_from_trusted_proxies_and_headers_are_bounded() {
    let up = upstream("u").await;
    let svcs = services(&[("s", &[(up, 1)])]);
    let untrusting =
        start_trusting(vec![router("r", "PathPrefix(`/`)", "s", None)], &svcs, &[]).await;
    let trusting = start_trusting(
        vec![router("r", "PathPrefix(`/`)", "s", None)],
        &svcs,
        &["127.0.0.0/8"],
    )
    .await;
    let c = client();
    let spoof = [("x-forwarded-for", "6.6.6.6")];
    let (_, body) = get(&c, untrusting, "t", "/", &spoof).await;
    assert!(
        body.contains("xff=127.0.0.1 "),
        "an untrusted client's X-Forwarded-For is replaced: {body}"
    );
    let (_, body) = get(&c, trusting, "t", "/", &spoof).await;
    assert!(
        body.contains("xff=6.6.6.6, 127.0.0.1 "),
        "a trusted proxy's is extended: {body}"
    );
    // 100 KiB of headers: refused (431) rather than buffered.
    let big = "x".repeat(100 * 1024);
    let req = Request::get(format!("http://{untrusting}/"))
        .header("host", "t")
        .header("x-big", big.as_str())
        .body(Full::new(Bytes::new()))
        .expect("req");
    let r = c
        .request(req)
        .await
        .expect("an answer, not a dropped connection");
    assert_eq!(r.status(), 431);
}

/// An upstream that counts the connections it accepts.
async fn counting(conns: Arc<AtomicU64>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            conns.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_upstream_connections_close_after_the_idle_timeout() {
    let (short, long) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (a, b) = (counting(short.clone()).await, counting(long.clone()).await);
    let specs = HashMap::from([
        (
            "short".to_string(),
            ServiceSpec {
                idle_timeout: std::time::Duration::from_millis(300),
                ..Default::default()
            },
        ),
        ("long".to_string(), ServiceSpec::default()),
    ]);
    let (_p, addr) = start_with(
        vec![
            router("s", "PathPrefix(`/s`)", "short", None),
            router("l", "PathPrefix(`/l`)", "long", None),
        ],
        &services(&[("short", &[(a, 1)]), ("long", &[(b, 1)])]),
        specs,
    )
    .await;
    let c = client();
    for path in ["/s", "/l"] {
        assert_eq!(get(&c, addr, "t", path, &[]).await.0, 200);
    }
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    for path in ["/s", "/l"] {
        assert_eq!(get(&c, addr, "t", path, &[]).await.0, 200);
    }
    assert_eq!(
        (short.load(Ordering::SeqCst), long.load(Ordering::SeqCst)),
        (2, 1),
        "the idle connection was closed and a new one made; the other was reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_entry_point_drains_requests_in_progress() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let slow = slow(400).await;
    let (proxy, l) = bound(
        vec![router("r", "PathPrefix(`/`)", "s", None)],
        &services(&[("s", &[(slow, 1)])]),
        HashMap::new(),
        HashMap::new(),
    )
    .await;
    let addr = l.local_addr().expect("addr");
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(
        proxy
            .clone()
            .serve_until("web".into(), l, None, stop.clone()),
    );
    // An idle keep-alive connection (one request answered, the connection kept).
    let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    idle.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // A request in progress when the entry point stops.
    let in_flight = tokio::spawn(async move { get(&client(), addr, "t", "/", &[]).await.0 });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    stop.cancel();
    let drain = serving.await.expect("serving");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "new connections are refused once it stopped"
    );
    let started = std::time::Instant::now();
    assert!(
        drain.finish(std::time::Duration::from_secs(5)).await,
        "drained in time"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(
        in_flight.await.expect("request"),
        200,
        "the request in progress finished"
    );
    let closed = tokio::time::timeout(std::time::Duration::from_secs(1), idle.read(&mut buf))
        .await
        .expect("the idle connection is closed, not left hanging");
    assert_eq!(closed.expect("read"), 0);
}

/// Reads `n` whole responses (each with a Content-Length) off a raw connection: their heads
/// and bodies.
async fn read_responses(s: &mut tokio::net::TcpStream, n: usize) -> Vec<(String, String)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        let parsed = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .and_then(|end| {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                (buf.len() >= end + 4 + len).then(|| (head, end + 4, len))
            });
        if let Some((head, at, len)) = parsed {
            out.push((
                head,
                String::from_utf8_lossy(&buf[at..at + len]).to_string(),
            ));
            buf.drain(..at + len);
            continue;
        }
        let mut chunk = [0u8; 4096];
        let k = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(k > 0, "closed after {} responses", out.len());
        buf.extend_from_slice(&chunk[..k]);
    }
    assert!(buf.is_empty(), "nothing more than the answers");
    out
}

/// An idle keep-alive connection holds only its socket between requests (hyper's buffers are
/// freed); what the client sees must not change: the next request, pipelined ones, a body that
/// comes in two parts, and a WebSocket upgrade all work on the connection after it went idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_serves_what_comes_next() {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::Message;
    // Reads the whole body before answering (else the request body is dropped unread and
    // hyper, as ever, closes a connection it cannot drain).
    let up = serve(|req: Request<hyper::body::Incoming>| async move {
        let path = req.uri().path().to_string();
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        let body = String::from_utf8_lossy(&body.unwrap_or_default()).to_string();
        Response::new(Full::new(Bytes::from(format!("a {path} {body}"))))
    })
    .await;
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ws_addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() {
                        let _ = ws.send(m).await;
                    }
                }
            });
        }
    });
    let (p, addr) = start(
        vec![
            router("ws", "PathPrefix(`/ws`)", "ws", None),
            router("a", "PathPrefix(`/`)", "a", None),
        ],
        &services(&[("a", &[(up, 1)]), ("ws", &[(ws_addr, 1)])]),
    )
    .await;
    let obs = p.obs().entrypoint("web");
    // Every pause is long enough for the connection to park: the gauge shows it did.
    let parks = std::sync::atomic::AtomicU32::new(0);
    let pause = || async {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(obs.idle(), 1, "the idle connection is parked");
        parks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let r = read_responses(&mut s, 1).await;
    assert!(r[0].0.starts_with("HTTP/1.1 200"), "{r:?}");
    assert!(r[0].1.starts_with("a /one"), "{r:?}");
    pause().await;
    // Two requests in one write, after the connection went idle.
    s.write_all(b"GET /two HTTP/1.1\r\nHost: t\r\n\r\nGET /three HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let r = read_responses(&mut s, 2).await;
    assert!(r[0].1.starts_with("a /two"), "{r:?}");
    assert!(r[1].1.starts_with("a /three"), "{r:?}");
    for (head, _) in &r {
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "kept alive: {head}"
        );
    }
    pause().await;
    // A head, then (later) its body, then the next request's head in two parts.
    s.write_all(b"POST /four HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhe")
        .await
        .expect("write");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(obs.idle(), 0, "not parked in the middle of a body");
    s.write_all(b"llo").await.expect("write");
    let r = read_responses(&mut s, 1).await;
    assert_eq!(r[0].1, "a /four hello", "{r:?}");
    pause().await;
    s.write_all(b"GET /fi").await.expect("write");
    // Half a head: hyper holds it (and its buffers) until the rest comes.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(obs.idle(), 0, "not parked in the middle of a head");
    s.write_all(b"ve HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let r = read_responses(&mut s, 1).await;
    assert!(r[0].1.starts_with("a /five"), "{r:?}");
    pause().await;
    // The idle connection becomes a WebSocket.
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), s)
        .await
        .expect("upgrade on a connection that was idle");
    assert_eq!(resp.status(), 101);
    for i in 0..5 {
        ws.send(Message::text(format!("hello {i}")))
            .await
            .expect("send");
        let back = ws.next().await.expect("frame").expect("ok");
        assert_eq!(back, Message::text(format!("hello {i}")));
    }
    ws.close(None).await.expect("close");
    assert_eq!(obs.idle(), 0, "an upgraded connection is not idle");
    assert_eq!(parks.into_inner(), 4);
}

/// A request body answered before it was read (no route: 404) is drained by hyper; once the
/// next request is answered, the connection parks again. (A body that had not arrived by the
/// answer makes hyper close the connection, as it always has.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_parks_again_after_an_unread_body() {
    use tokio::io::AsyncWriteExt;
    let up = upstream("a").await;
    let (p, addr) = start(
        vec![router("a", "PathPrefix(`/a`)", "a", None)],
        &services(&[("a", &[(up, 1)])]),
    )
    .await;
    let obs = p.obs().entrypoint("web");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST /nowhere HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .expect("write");
    let r = read_responses(&mut s, 1).await;
    assert!(r[0].0.starts_with("HTTP/1.1 404"), "{r:?}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(obs.idle(), 0, "its body was not read: not idle yet");
    s.write_all(b"GET /a/x HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let r = read_responses(&mut s, 1).await;
    assert!(r[0].1.starts_with("a /a/x"), "{r:?}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(obs.idle(), 1, "parked after the next request");
}

/// `Connection: close` is still honoured: the answer says so and the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_closes_after_the_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream("a").await;
    let (_p, addr) = start(
        vec![router("a", "PathPrefix(`/`)", "a", None)],
        &services(&[("a", &[(up, 1)])]),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    read_responses(&mut s, 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    s.write_all(b"GET /y HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let r = read_responses(&mut s, 1).await;
    assert!(
        r[0].0.to_ascii_lowercase().contains("connection: close"),
        "{r:?}"
    );
    let mut rest = Vec::new();
    let n = tokio::time::timeout(std::time::Duration::from_secs(2), s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("read");
    assert_eq!(n, 0, "nothing after the answer");
}

/// An answer's chunks reach the client as the upstream sends them (a stream of events, a long
/// poll): the upstream sends its second chunk only once the client has the first, so a proxy
/// that held the answer back would never finish. This is Traefik's `flushInterval: -1`, which
/// lb does whatever interval a file gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_passed_on_chunk_by_chunk() {
    use hyper::body::Frame;
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let go = go_rx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let mut go = go.clone();
                    async move {
                        let (tx, rx) = tokio::sync::mpsc::channel::<
                            Result<Frame<Bytes>, std::convert::Infallible>,
                        >(2);
                        tokio::spawn(async move {
                            let _ = tx.send(Ok(Frame::data(Bytes::from("first\n")))).await;
                            let _ = go.wait_for(|g| *g).await;
                            let _ = tx.send(Ok(Frame::data(Bytes::from("second\n")))).await;
                        });
                        let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
                        Ok::<_, std::convert::Infallible>(Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let svcs = services(&[("events", &[(up, 1)])]);
    let (_p, addr) = start(vec![router("e", "PathPrefix(`/`)", "events", None)], &svcs).await;
    let c = client();
    let req = Request::get(format!("http://{addr}/events"))
        .header("host", "t")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.expect("headers");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), body.frame())
        .await
        .expect("the first chunk arrives before the upstream sends the second")
        .expect("a frame")
        .expect("data");
    assert_eq!(first.into_data().ok().as_deref(), Some(&b"first\n"[..]));
    go_tx.send(true).unwrap();
    let rest = tokio::time::timeout(std::time::Duration::from_secs(10), body.collect())
        .await
        .expect("the rest")
        .expect("body")
        .to_bytes();
    assert_eq!(&rest[..], b"second\n");
}

/// An mpsc receiver as a stream (no tokio-stream here).
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

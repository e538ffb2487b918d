//! The admin API as a client meets it: a control plane (maps loaded, nothing attached), the
//! proxy, a watched file provider and the control loop, the API served on loopback.
//!
//! Holds two holes shut: a registration with numbers out of range is a 400 naming the field and
//! breaks nothing (every route and `/metrics` still answer, later changes still apply, a file
//! change still reaches the proxy); and no empty or short token opens the API, over HTTP/1.1 or
//! HTTP/2.
//!
//! Needs root and BPF (the maps are real), like the packet fixtures; each test pins under its own
//! root, removed at the end.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use lb_userspace::{
    api::{self, ApiState},
    control::{self, Control},
    l4::dataplane::{self, Dataplane},
    l4::Balancer,
    model::{FileProviderSpec, Limits},
    proxy::Proxy,
    sources::{self, store::Store},
};
use tokio::sync::mpsc;

static NEXT: AtomicU32 = AtomicU32::new(0);

const TOKEN: &str = "api-test-token-0123456789";

/// A running control plane; everything it made is removed on drop.
struct Agent {
    api: SocketAddr,
    pin_root: PathBuf,
    dir: PathBuf,
    proxy: Arc<Proxy>,
    events: mpsc::Sender<sources::Event>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = dataplane::detach(&self.pin_root, "t");
        let _ = std::fs::remove_dir_all(&self.pin_root);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start(token: &str) -> Agent {
    start_with(token, api::ApiLimits::default()).await
}

async fn start_with(token: &str, api_limits: api::ApiLimits) -> Agent {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let pin_root = PathBuf::from(format!(
        "/sys/fs/bpf/lb-test-api-{}-{n}",
        std::process::id()
    ));
    let dir = std::env::temp_dir().join(format!("lb-test-api-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("dynamic")).expect("dir");
    let limits = Limits {
        max_vips: 4,
        max_backends: 64,
        ring_size: 1021,
        max_flows: 4096,
        udp_timeout_secs: 30,
        ipip_source_v4: "172.16.0.0".parse().expect("static"),
        ipip_source_v6: "fd00:ffff::".parse().expect("static"),
    };
    let dp = Dataplane::open(&pin_root, "t", &limits, false).expect("load program (root?)");
    let balancer = Balancer::new(dp, &[]).expect("balancer");
    let store = Store::open(&dir.join("api-store.json")).expect("store");
    let mut c = Control::new(balancer, store, Vec::new());
    c.apply(Instant::now()).expect("first apply");
    let proxy = Arc::new(Proxy::new(
        vec![],
        vec![],
        Default::default(),
        Default::default(),
        &Default::default(),
    ));
    let (feed, l7) = control::L7Feed::new(lb_userspace::proxy::L7Config {
        entrypoints: vec![],
        routers: vec![],
        specs: Default::default(),
        middlewares: Default::default(),
        tcp_routers: vec![],
        tls_options: Default::default(),
        tls_default_broken: None,
    });
    c.l7 = Some(feed);
    let metrics = Arc::new(
        lb_userspace::observe::metrics::Metrics::new(proxy.obs().clone(), &c.obs).expect("metrics"),
    );
    let control = Arc::new(Mutex::new(c));
    let (events, rx) = mpsc::channel(1024);
    let events_tx = events.clone();
    let mut tasks = vec![
        tokio::spawn(control::run(control.clone(), rx)),
        tokio::spawn(proxy.clone().follow(l7)),
    ];
    let spec = FileProviderSpec {
        path: dir.join("dynamic"),
        debounce: Duration::from_millis(50),
    };
    tasks.push(tokio::spawn(async move {
        let _ = sources::file::run(spec, events).await;
    }));
    let app = api::router(ApiState {
        proxy: Some(proxy.clone()),
        control: control.clone(),
        health: Default::default(),
        token: token.into(),
        metrics,
        cluster: None,
        bgp: None,
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api = l.local_addr().expect("addr");
    tasks.push(tokio::spawn(async move {
        api::serve(l, app, api_limits, std::future::pending()).await;
    }));
    Agent {
        api,
        pin_root,
        dir,
        proxy,
        events: events_tx,
        tasks,
    }
}

type C = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn h1() -> C {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2() -> C {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

async fn call(
    c: &C,
    api: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{api}{path}"));
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    let req = b
        .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .expect("the API answers in time")
        .expect("response");
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// Every route answers as it should on an empty control plane.
async fn every_route_answers(c: &C, api: SocketAddr) {
    let auth = bearer();
    let a = Some(auth.as_str());
    for (method, path, want) in [
        ("GET", "/healthz", 200),
        ("GET", "/api/v1/vips", 200),
        ("GET", "/api/v1/services", 200),
        ("GET", "/api/v1/status", 200),
        ("GET", "/api/v1/stats", 200),
        ("GET", "/api/v1/routers", 200),
        ("GET", "/metrics", 200),
        ("POST", "/api/v1/flows/clear", 200),
        ("DELETE", "/api/v1/services/site/instances/10.9.9.9", 404),
        ("POST", "/api/v1/vips/none/backends/10.9.9.9/drain", 404),
        ("DELETE", "/api/v1/vips/none/backends/10.9.9.9", 404),
        ("GET", "/dashboard/", 200),
    ] {
        let (code, body) = call(c, api, method, path, a, None).await;
        assert_eq!(code, want, "{method} {path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_numbers_are_refused_and_break_nothing() {
    let agent = start(TOKEN).await;
    let c = h1();
    let auth = bearer();
    let a = Some(auth.as_str());
    every_route_answers(&c, agent.api).await;
    for (body, field) in [
        (
            r#"{"address":"127.0.0.1","port":9,"ttl_secs":18446744073709551615}"#,
            "ttl_secs",
        ),
        (
            r#"{"address":"127.0.0.1","port":9,"ttl_secs":18446744073709551616}"#,
            "ttl_secs",
        ),
        (
            r#"{"address":"127.0.0.1","port":9,"ttl_secs":-1}"#,
            "ttl_secs",
        ),
        (
            r#"{"address":"127.0.0.1","port":9,"ttl_secs":1e300}"#,
            "ttl_secs",
        ),
        (
            r#"{"address":"127.0.0.1","port":9,"ttl_secs":0}"#,
            "ttl_secs",
        ),
        (r#"{"address":"127.0.0.1","port":70000}"#, "port"),
        (r#"{"address":"127.0.0.1","port":-1}"#, "port"),
        (r#"{"address":"127.0.0.1","weight":4294967296}"#, "weight"),
        (r#"{"address":"127.0.0.1","weight":1001}"#, "weight"),
        (r#"{"address":"127.0.0.300"}"#, "address"),
        (r#"{"address":"127.0.0.1","mac":"zz"}"#, "mac"),
    ] {
        for path in [
            "/api/v1/services/site/instances",
            "/api/v1/services/other/instances",
        ] {
            let (code, answer) = call(&c, agent.api, "POST", path, a, Some(body)).await;
            assert_eq!(code, 400, "{body}: {answer}");
            assert!(
                answer.contains(field),
                "{body}: the answer names {field}: {answer}"
            );
            assert!(
                !answer.contains("panick") && !answer.contains("overflow"),
                "no panic text reaches a client: {answer}"
            );
        }
    }
    // Nothing was half-applied, and nothing was reported as failing.
    let (_, services) = call(&c, agent.api, "GET", "/api/v1/services", a, None).await;
    assert!(!services.contains("127.0.0.1"), "{services}");
    every_route_answers(&c, agent.api).await;
    let (_, status) = call(&c, agent.api, "GET", "/api/v1/status", a, None).await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    assert!(status["apply"]["last_apply_error"].is_null(), "{status}");

    // Later changes still apply: through the API, with the largest TTL allowed...
    let ok = format!(
        r#"{{"address":"127.0.0.1","port":9,"ttl_secs":{}}}"#,
        365 * 24 * 3600
    );
    let (code, answer) = call(
        &c,
        agent.api,
        "POST",
        "/api/v1/services/site/instances",
        a,
        Some(&ok),
    )
    .await;
    assert_eq!(code, 201, "{answer}");
    let (_, services) = call(&c, agent.api, "GET", "/api/v1/services", a, None).await;
    assert!(services.contains("127.0.0.1"), "{services}");
    // ...and from the file provider, all the way to the proxy.
    let file = agent.dir.join("dynamic").join("routes.yml");
    std::fs::write(
        &file,
        "http:\n  routers:\n    fromfile:\n      rule: \"Host(`file.test`)\"\n      service: site\n",
    )
    .expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, routers) = call(&c, agent.api, "GET", "/api/v1/routers", a, None).await;
        assert_eq!(code, 200, "{routers}");
        if routers.contains("fromfile") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the file's router never reached the proxy: {routers}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let proxy = agent.proxy.clone();
    assert!(proxy.routing().routers.iter().any(|r| r.name == "fromfile"));
    every_route_answers(&c, agent.api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_short_tokens_open_nothing() {
    // A token the config would refuse, given to the API anyway: nothing passes with it.
    for configured in ["", "short"] {
        let agent = start(configured).await;
        for c in [h1(), h2()] {
            for given in [
                "Bearer ".to_string(),
                format!("Bearer {configured}"),
                "Bearer  ".to_string(),
            ] {
                for path in ["/api/v1/vips", "/metrics"] {
                    let (code, body) = call(&c, agent.api, "GET", path, Some(&given), None).await;
                    assert_eq!(code, 401, "token {configured:?}, {given:?}, {path}: {body}");
                }
            }
        }
    }
    // A good token: it passes over both protocols, an empty or a near miss does not.
    let agent = start(TOKEN).await;
    for c in [h1(), h2()] {
        let (code, _) = call(&c, agent.api, "GET", "/api/v1/vips", Some(&bearer()), None).await;
        assert_eq!(code, 200);
        for given in [
            "Bearer ".to_string(),
            format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]),
            format!("Bearer {TOKEN}x"),
            TOKEN.to_string(),
        ] {
            let (code, _) = call(&c, agent.api, "GET", "/api/v1/vips", Some(&given), None).await;
            assert_eq!(code, 401, "{given:?}");
        }
        let (code, _) = call(&c, agent.api, "GET", "/api/v1/vips", None, None).await;
        assert_eq!(code, 401);
    }
}

/// Hole 7, the admin API: a connection that sends half a head is closed at the header timeout,
/// one that sends a body too slowly gets a `408` at the request timeout, and beyond the
/// connection cap new connections are closed at once; once the stalled ones are gone the API
/// answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_surplus_admin_connections_are_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limits = api::ApiLimits {
        max_connections: 4,
        header_timeout: Duration::from_millis(800),
        request_timeout: Duration::from_millis(1500),
        lifetime: Duration::from_secs(60),
    };
    let agent = start_with(TOKEN, limits).await;
    let addr = agent.api;
    /// Reads until the peer closes (true) or `within` passes (false); what it sent.
    async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> (bool, String) {
        let mut out = Vec::new();
        let r = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
        (r.is_ok(), String::from_utf8_lossy(&out).into_owned())
    }

    // Half a head: closed after the header timeout, not before.
    let started = Instant::now();
    let mut half = tokio::net::TcpStream::connect(addr).await.expect("connect");
    half.write_all(b"GET /api/v1/vips HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let (closed, _) = closed_within(&mut half, Duration::from_secs(5)).await;
    assert!(closed, "a half head is not held forever");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // A body that never comes: a 408 at the request timeout.
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /api/v1/services/web/instances HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        bearer()
    );
    slow.write_all(head.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("answered within the request timeout")
        .unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    drop(slow);

    // Four idle connections fill the cap; the fifth and sixth are closed at once.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..2 {
        let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (closed, got) = closed_within(&mut extra, Duration::from_millis(500)).await;
        assert!(closed && got.is_empty(), "beyond the cap: closed, {got:?}");
    }
    // The held ones time out (they never sent a head), and the API answers again.
    for mut h in held {
        let (closed, _) = closed_within(&mut h, Duration::from_secs(5)).await;
        assert!(closed, "an idle connection is closed at the header timeout");
    }
    let (code, body) = call(&h1(), addr, "GET", "/api/v1/vips", Some(&bearer()), None).await;
    assert_eq!(code, 200, "{body}");
}

/// One change, one routing-table build, and L4-only changes none: a router added through the
/// file provider and an instance registered for the service it routes to build the proxy's
/// table once each; a health verdict, and an instance of a service no router sends to
/// (registered, then deregistered), build it zero times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_change_builds_the_routing_table_once_and_l4_changes_never() {
    let agent = start(TOKEN).await;
    let c = h1();
    let a = Some(bearer());
    let a = a.as_deref();
    // Builds settle once nothing has happened for 500 ms.
    let settled = || async {
        let mut last = agent.proxy.builds();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = agent.proxy.builds();
            if now == last {
                return now;
            }
            last = now;
        }
    };
    let start = settled().await;

    // A router from the file provider: one build.
    std::fs::write(
        agent.dir.join("dynamic").join("routes.yml"),
        "http:\n  routers:\n    fromfile:\n      rule: \"Host(`file.test`)\"\n      service: site\n",
    )
    .expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent
        .proxy
        .routing()
        .routers
        .iter()
        .any(|r| r.name == "fromfile")
    {
        assert!(Instant::now() < deadline, "the file's router never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after_router = settled().await;
    assert_eq!(after_router, start + 1, "a router added: one build");

    // An instance of the routed service: one build.
    let body = r#"{"address":"127.0.0.1","port":9}"#;
    let (code, answer) = call(
        &c,
        agent.api,
        "POST",
        "/api/v1/services/site/instances",
        a,
        Some(body),
    )
    .await;
    assert_eq!(code, 201, "{answer}");
    let after_site = settled().await;
    assert_eq!(
        after_site,
        after_router + 1,
        "an instance of a routed service: one build"
    );

    // A health verdict: L4 only.
    let key = lb_userspace::model::instance::InstanceKey {
        address: "127.0.0.2".parse().expect("address"),
        port: 0,
    };
    for up in [false, true, false] {
        agent
            .events
            .send(sources::Event::Health {
                vip: "web".into(),
                key,
                up,
                at: Instant::now(),
            })
            .await
            .expect("control loop");
    }
    // An instance of a service no router sends to, registered and deregistered: L4 only.
    let (code, answer) = call(
        &c,
        agent.api,
        "POST",
        "/api/v1/services/other/instances",
        a,
        Some(body),
    )
    .await;
    assert_eq!(code, 201, "{answer}");
    let (code, answer) = call(
        &c,
        agent.api,
        "DELETE",
        "/api/v1/services/other/instances/127.0.0.1:9",
        a,
        None,
    )
    .await;
    assert_eq!(code, 204, "{answer}");
    let (_, stats) = call(&c, agent.api, "GET", "/api/v1/status", a, None).await;
    let applies: serde_json::Value = serde_json::from_str(&stats).expect("json");
    assert!(
        applies["apply"]["applies"].as_u64().unwrap_or(0) >= 3,
        "{stats}"
    );
    assert_eq!(settled().await, after_site, "L4-only changes: no build");
}

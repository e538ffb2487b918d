//! The RateLimit middleware with its buckets in a real redis-server: the same table of cases the
//! in-memory limiter passes (`BUCKET_CASES`), and what a request gets while Redis is down — let
//! through with `on_error = "open"`, `503` with `"closed"` — until it is back.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::time::{Duration, Instant};

use bytes::Bytes;
use lb_tests::daemons::{start_redis, TempDir};
use lb_userspace::{
    model::middleware::{RateLimitConfig, RateLimitFailure, RateLimitRedis},
    proxy::middleware::{
        full,
        limit::{RateLimit, BUCKET_CASES, STORE_ERRORS},
        Ctx, Flow, Middleware,
    },
};

fn limiter(
    port: u16,
    name: &str,
    average: f64,
    burst: f64,
    on_error: RateLimitFailure,
) -> RateLimit {
    RateLimitConfig {
        average,
        burst,
        source_header: None,
        redis: Some(RateLimitRedis {
            url: format!("redis://127.0.0.1:{port}/0"),
            prefix: "lb/ratelimit-test/".into(),
            on_error,
            timeout_ms: 500,
        }),
        ip_strategy: None,
    }
    .build_named(name)
    .expect("rate limit")
}

/// What the middleware does with one request: `None` lets it through, else the answer's status.
async fn decide(rl: &RateLimit) -> Option<u16> {
    let mut ctx = Ctx::new(
        "192.0.2.1".parse().expect("static"),
        "http",
        "t".into(),
        Instant::now(),
    );
    let mut req = hyper::Request::new(full(Bytes::new()));
    let status = match rl.request(&mut ctx, &mut req) {
        Flow::Next => None,
        Flow::Answer(r) => Some(r.status().as_u16()),
        Flow::Wait(f) => f.await.map(|r| r.status().as_u16()),
    };
    status
}

#[tokio::test]
async fn redis_buckets_keep_the_contract() {
    let dir = TempDir::new("ratelimit");
    let redis = start_redis(&dir.0);
    // An instant well past any key's life: the test's own clock, in µs.
    let base_us = 1_000_000_000_000u64;
    for (i, case) in BUCKET_CASES.iter().enumerate() {
        let rl = limiter(
            redis.port,
            &format!("case{i}"),
            case.average,
            case.burst,
            RateLimitFailure::Closed,
        );
        for (step, &(key, ms, want)) in case.steps.iter().enumerate() {
            let got = rl
                .allow_at(key, Instant::now(), base_us + ms * 1000)
                .await
                .unwrap_or_else(|e| panic!("{}: step {step}: {e}", case.what));
            assert_eq!(got, want, "{}: step {step}", case.what);
        }
    }
    // Another node's limiter (a second client, a second connection) shares the buckets.
    let (a, b) = (
        limiter(redis.port, "shared", 1.0, 2.0, RateLimitFailure::Closed),
        limiter(redis.port, "shared", 1.0, 2.0, RateLimitFailure::Closed),
    );
    let now = base_us * 2;
    assert_eq!(a.allow_at(9, Instant::now(), now).await, Ok(true));
    assert_eq!(b.allow_at(9, Instant::now(), now).await, Ok(true));
    assert_eq!(a.allow_at(9, Instant::now(), now).await, Ok(false));
    assert_eq!(b.allow_at(9, Instant::now(), now).await, Ok(false));
}

#[tokio::test]
async fn a_redis_outage_gets_what_each_router_chose() {
    let dir = TempDir::new("ratelimit-outage");
    let mut redis = start_redis(&dir.0);
    let open = limiter(redis.port, "open", 1000.0, 1000.0, RateLimitFailure::Open);
    let closed = limiter(
        redis.port,
        "closed",
        1000.0,
        1000.0,
        RateLimitFailure::Closed,
    );
    // Redis's clock decides in production: these go through it.
    assert_eq!(decide(&open).await, None);
    assert_eq!(decide(&closed).await, None);
    let count = |name: &str, outcome: &str| STORE_ERRORS.with_label_values(&[name, outcome]).get();
    redis.kill();
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(decide(&open).await, None, "fail open: let through");
        assert_eq!(decide(&closed).await, Some(503), "fail closed: 503");
    }
    // Each decision waits at most the timeout (500 ms), the failed connection at once.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(count("open", "allowed"), 5);
    assert_eq!(count("closed", "refused"), 5);
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while decide(&closed).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "not back 10 s after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(decide(&open).await, None);
    let refused = count("closed", "refused");
    assert_eq!(decide(&closed).await, None);
    assert_eq!(
        count("closed", "refused"),
        refused,
        "back: decided by Redis again"
    );
}

/// A keep-alive HTTP/1.1 upstream on loopback answering every GET `200 ok`, on threads.
fn upstream() -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = conn.try_clone().expect("clone");
                let mut r = BufReader::new(conn);
                loop {
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    if w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Three agents (L7 only) share one Redis-backed limit of 50 a second: hammered through all
/// three at once for 10 s, the cluster admits 50 a second (plus the burst) within 10 %, not 150.
/// Then Redis goes away: the router that chose `open` lets requests through, the `closed` one
/// answers 503, on every node.
#[test]
fn three_nodes_share_one_limit() {
    use lb_tests::daemons::free_port;
    const RATE: f64 = 50.0;
    const BURST: f64 = 5.0;
    let dir = TempDir::new("ratelimit-cluster");
    let mut redis = start_redis(&dir.0);
    let up = upstream();
    let services = dir.0.join("services.toml");
    std::fs::write(
        &services,
        format!(
            "[[service]]\nname = \"app\"\n[[service.instance]]\naddress = \"{}\"\nport = {}\n",
            up.ip(),
            up.port()
        ),
    )
    .expect("services");
    let bin = std::env::var_os("LB_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lb")
        });
    let mut agents = Vec::new();
    let mut entries = Vec::new();
    for n in 0..3 {
        let (api, web) = (free_port(), free_port());
        let pins = format!("/sys/fs/bpf/lbt-rl{n}-{}", std::process::id());
        let redis_url = format!("redis://127.0.0.1:{}/0", redis.port);
        let config = format!(
            "[agent]\ninstance = \"rl{n}\"\npin_root = \"{pins}\"\nstate_dir = \"{}\"\n\n\
             [api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"rate-limit-test-token-0123\"\n\n\
             [[entrypoint]]\nname = \"web\"\naddress = \"127.0.0.1:{web}\"\n\n\
             [[middleware]]\nname = \"shared\"\nrate_limit = {{ average = {RATE}, burst = {BURST}, redis = {{ url = \"{redis_url}\", on_error = \"closed\" }} }}\n\n\
             [[middleware]]\nname = \"lenient\"\nrate_limit = {{ average = {RATE}, burst = {BURST}, redis = {{ url = \"{redis_url}\", on_error = \"open\" }} }}\n\n\
             [[router]]\nname = \"limited\"\nrule = \"PathPrefix(`/`)\"\nservice = \"app\"\nmiddlewares = [\"shared\"]\n\n\
             [[router]]\nname = \"open\"\nrule = \"PathPrefix(`/open`)\"\nservice = \"app\"\nmiddlewares = [\"lenient\"]\n\n\
             [[providers.file]]\npath = \"{}\"\n",
            dir.0.join(format!("state{n}")).display(),
            services.display()
        );
        let path = dir.0.join(format!("lb{n}.toml"));
        std::fs::write(&path, config).expect("config");
        let child = std::process::Command::new(&bin)
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("lb run");
        agents.push((Agent(child), pins));
        entries.push(format!("http://127.0.0.1:{web}"));
    }
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .build();
    let status = |url: &str| match agent.get(url).call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(_) => 0,
    };
    for e in &entries {
        let deadline = Instant::now() + Duration::from_secs(20);
        while status(&format!("{e}/open/up")) != 200 {
            assert!(Instant::now() < deadline, "{e}: the proxy did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // The buckets full again after the readiness requests.
    std::thread::sleep(Duration::from_millis((BURST / RATE * 1000.0) as u64 + 200));
    let started = Instant::now();
    let run = Duration::from_secs(10);
    let workers: Vec<_> = entries
        .iter()
        .map(|e| {
            let (e, agent) = (e.clone(), agent.clone());
            std::thread::spawn(move || {
                let (mut ok, mut limited, mut other) = (0u64, 0u64, 0u64);
                while started.elapsed() < run {
                    match agent.get(&format!("{e}/x")).call() {
                        Ok(r) if r.status() == 200 => ok += 1,
                        Err(ureq::Error::Status(429, _)) => limited += 1,
                        _ => other += 1,
                    }
                }
                (ok, limited, other)
            })
        })
        .collect();
    let (mut ok, mut limited, mut other) = (0, 0, 0);
    for w in workers {
        let (a, b, c) = w.join().expect("client");
        ok += a;
        limited += b;
        other += c;
    }
    let took = started.elapsed().as_secs_f64();
    let expected = BURST + RATE * took;
    let error = (ok as f64 - expected).abs() / expected;
    println!(
        "rate limit: 3 nodes, {RATE}/s burst {BURST}, {took:.1} s: {ok} admitted (expected \
         {expected:.0}, {:.1} % off), {limited} refused 429, {other} other",
        error * 100.0
    );
    assert_eq!(other, 0, "answers other than 200 and 429");
    assert!(
        limited > ok,
        "the load was past the limit: {limited} refused"
    );
    assert!(error <= 0.10, "{ok} admitted, {expected:.0} expected");

    redis.kill();
    for e in &entries {
        assert_eq!(status(&format!("{e}/open/x")), 200, "{e}: on_error = open");
        assert_eq!(status(&format!("{e}/x")), 503, "{e}: on_error = closed");
    }
    for (a, pins) in agents {
        drop(a);
        let _ = std::fs::remove_dir_all(pins);
    }
}

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

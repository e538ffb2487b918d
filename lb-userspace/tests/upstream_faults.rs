//! Upstreams that misbehave — a black hole, one that resets, one that refuses, one too slow, one
//! that dies mid-answer — each in a service beside a healthy upstream, while a service of healthy
//! upstreams takes steady load beside them all. The documented behaviour holds for each (retries
//! save idempotent requests, passive health ejects the culprit after two failures, a body cut
//! short counts against its upstream, the circuit breaker opens on a service that only times
//! out), and the healthy service's clients see nothing of it.
#![allow(clippy::disallowed_methods)] // tests drive real time and real sockets

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use lb_userspace::model::l7::{Passive, ServiceSpec};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

mod common;
use common::*;

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Reads the request and never answers.
    BlackHole,
    /// Reads the request and resets the connection.
    Reset,
    /// Answers after 3 s (past the request timeout).
    Slow,
    /// Sends a head promising 1,000 bytes, 100 of them, and closes.
    Dying,
}

/// A raw upstream with `fault`, and how many requests reached it.
async fn faulty(fault: Fault) -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let seen = Arc::new(AtomicU64::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                match fault {
                    Fault::BlackHole => tokio::time::sleep(Duration::from_secs(60)).await,
                    Fault::Reset => {
                        // SO_LINGER 0: closing sends RST, not FIN.
                        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    }
                    Fault::Slow => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
                            .await;
                    }
                    Fault::Dying => {
                        let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec();
                        r.extend_from_slice(&[b'x'; 100]);
                        let _ = s.write_all(&r).await;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// A GET whose body is read to its end: the status and body, or what broke.
async fn fetch(c: &C, proxy: SocketAddr, host: &str) -> Result<(u16, String), String> {
    let req = Request::get(format!("http://{proxy}/"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = c.request(req).await.map_err(|e| format!("{e}"))?;
    let code = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_upstreams_are_contained() {
    let spec = ServiceSpec {
        retries: 1,
        request_timeout: Some(Duration::from_secs(1)),
        connect_timeout: Duration::from_secs(1),
        passive: Passive {
            failures: 2,
            backoff: Duration::from_secs(60),
        },
        ..Default::default()
    };
    let mut specs = HashMap::new();
    let mut routers = Vec::new();
    let mut members: Vec<(String, Vec<(SocketAddr, u32)>)> = Vec::new();
    let mut reached = HashMap::new();
    let goods: [&'static str; 5] = [
        "good-blackhole",
        "good-reset",
        "good-slow",
        "good-dying",
        "good-refused",
    ];
    for (i, (name, fault)) in [
        ("blackhole", Some(Fault::BlackHole)),
        ("reset", Some(Fault::Reset)),
        ("slow", Some(Fault::Slow)),
        ("dying", Some(Fault::Dying)),
        ("refused", None),
    ]
    .into_iter()
    .enumerate()
    {
        let bad = match fault {
            Some(f) => {
                let (addr, seen) = faulty(f).await;
                reached.insert(name, seen);
                addr
            }
            None => dead(),
        };
        let good = upstream(goods[i]).await;
        members.push((name.into(), vec![(bad, 1), (good, 1)]));
        specs.insert(name.to_string(), spec.clone());
        routers.push(router(name, &format!("Host(`{name}.test`)"), name, None));
    }
    // A service that only times out, behind a circuit breaker.
    let (hole, hole_seen) = faulty(Fault::BlackHole).await;
    members.push(("hole".into(), vec![(hole, 1)]));
    specs.insert(
        "hole".into(),
        ServiceSpec {
            retries: 0,
            ..spec.clone()
        },
    );
    let mut breaker = router("hole", "Host(`hole.test`)", "hole", None);
    breaker.middlewares = vec!["breaker".into()];
    routers.push(breaker);
    let mws = HashMap::from([(
        "breaker".to_string(),
        mw(
            r#"circuit_breaker = { expression = "NetworkErrorRatio() > 0.5", check_period_ms = 100, fallback_duration_ms = 30000, recovery_duration_ms = 1000 }"#,
        ),
    )]);
    let (o1, o2) = (upstream("other1").await, upstream("other2").await);
    members.push(("other".into(), vec![(o1, 1), (o2, 1)]));
    routers.push(router("other", "Host(`other.test`)", "other", None));
    let list: Vec<(&str, &[(SocketAddr, u32)])> = members
        .iter()
        .map(|(n, m)| (n.as_str(), m.as_slice()))
        .collect();
    let (_proxy, addr) = start_full(routers, &services(&list), specs, mws).await;

    // Steady load on the healthy service throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut bad, mut slowest) = (0u64, Vec::new(), Duration::ZERO);
            while !stop.load(Ordering::SeqCst) {
                let t0 = Instant::now();
                match fetch(&c, addr, "other.test").await {
                    Ok((200, b)) if b.starts_with("other") => ok += 1,
                    other => bad.push(other),
                }
                slowest = slowest.max(t0.elapsed());
            }
            (ok, bad, slowest)
        }));
    }
    // Eight GETs in a row to each faulty service, the services side by side.
    let mut runs = Vec::new();
    for name in ["blackhole", "reset", "slow", "dying", "refused"] {
        runs.push(tokio::spawn(async move {
            let c = client();
            let mut got = Vec::new();
            for _ in 0..8 {
                got.push(fetch(&c, addr, &format!("{name}.test")).await);
            }
            (name, got)
        }));
    }
    let breaker = tokio::spawn(async move {
        let c = client();
        // One timeout makes the network error ratio 1: the breaker opens at its next check.
        let got = vec![fetch(&c, addr, "hole.test").await];
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        let open = fetch(&c, addr, "hole.test").await;
        (got, open, t0.elapsed())
    });
    let mut results = HashMap::new();
    for r in runs {
        let (name, got) = r.await.expect("client");
        results.insert(name, got);
    }
    let (timed_out, open, open_took) = breaker.await.expect("client");
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut slowest) = (0, Duration::ZERO);
    for l in load {
        let (n, bad, s) = l.await.expect("load");
        assert!(bad.is_empty(), "the healthy service's clients saw {bad:?}");
        ok += n;
        slowest = slowest.max(s);
    }
    println!(
        "faults: the healthy service answered {ok} requests, all 200, the slowest in {} ms",
        slowest.as_millis()
    );
    assert!(ok > 0);
    // Nothing of the faulty ones' timeouts (1 s) reached the others' clients.
    assert!(
        slowest < Duration::from_millis(900),
        "a healthy service's request took {slowest:?}"
    );

    for (i, name) in ["blackhole", "reset", "slow", "refused"]
        .into_iter()
        .enumerate()
    {
        let got = &results[name];
        let good = if name == "refused" {
            goods[4]
        } else {
            goods[i]
        };
        // Idempotent and bodiless: every failed attempt was retried on the healthy one.
        for r in got {
            assert!(
                matches!(r, Ok((200, b)) if b.starts_with(good)),
                "{name}: {got:?}"
            );
        }
        if let Some(seen) = reached.get(name) {
            let n = seen.load(Ordering::SeqCst);
            println!("faults: {name}: 8 of 8 answered 200; the faulty upstream got {n}");
            assert!(
                (1..=2).contains(&n),
                "{name}: the faulty upstream got {n} requests (ejected after 2 failures)"
            );
        }
    }
    // A body cut short cannot be retried: the client sees it broken, at most twice, and then
    // the upstream is out.
    let dying = &results["dying"];
    let broken = dying.iter().filter(|r| r.is_err()).count();
    let n = reached["dying"].load(Ordering::SeqCst);
    println!("faults: dying: {broken} of 8 answers cut short; the faulty upstream got {n}");
    assert!((1..=2).contains(&broken), "dying: {dying:?}");
    assert_eq!(n as usize, broken, "dying: {dying:?}");
    for r in dying.iter().filter(|r| r.is_ok()) {
        assert!(
            matches!(r, Ok((200, b)) if b.starts_with(goods[3])),
            "dying: {dying:?}"
        );
    }
    assert!(
        timed_out.iter().all(|r| matches!(r, Ok((504, _)))),
        "{timed_out:?}"
    );
    assert!(matches!(open, Ok((503, _))), "breaker: {open:?}");
    assert!(
        open_took < Duration::from_millis(500),
        "the open breaker answered after {open_took:?}"
    );
    assert_eq!(
        hole_seen.load(Ordering::SeqCst),
        1,
        "the open breaker sent one on"
    );
}

//! Clients that hold lb's resources without doing anything useful, against a real proxy with
//! real upstreams on loopback (holes 7 and 8 of the reliability issue). Each test uses an entry
//! point with short bounds and asserts what was let go: connections closed, streams reset,
//! upstream responses dropped, and how many upstream connections were ever open at once.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::{body::Frame, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb_userspace::model::l7::{ConnLimits, ServiceSpec};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

mod common;
use common::*;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Streamed = http_body_util::combinators::BoxBody<Bytes, BoxError>;

fn quick() -> ConnLimits {
    ConnLimits {
        header_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(1),
        body_min_rate: 100,
        write_timeout: Duration::from_secs(1),
        h2_keepalive: None,
        ..ConnLimits::default()
    }
}

async fn proxy_to(upstream: SocketAddr, spec: ServiceSpec, limits: ConnLimits) -> SocketAddr {
    let svcs = services(&[("web", &[(upstream, 1)])]);
    let specs = HashMap::from([("web".to_string(), spec)]);
    let (_p, addr) = start_limited(
        vec![router("r", "PathPrefix(`/`)", "web", None)],
        &svcs,
        specs,
        limits,
    )
    .await;
    addr
}

/// An upstream serving HTTP/1.1 with its own accept loop, so it can count: TCP connections open
/// at once (the peak) and requests in flight at once (the peak). Each request waits `delay`,
/// reads its body, and answers its length.
#[derive(Default)]
struct Counts {
    open: AtomicUsize,
    open_peak: AtomicUsize,
    busy: AtomicUsize,
    busy_peak: AtomicUsize,
    requests: AtomicUsize,
}

fn peak(now: &AtomicUsize, peak: &AtomicUsize) {
    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
    peak.fetch_max(n, Ordering::SeqCst);
}

async fn counting(delay: Duration) -> (SocketAddr, Arc<Counts>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                peak(&c.open, &c.open_peak);
                let svc = {
                    let c = c.clone();
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let c = c.clone();
                        async move {
                            peak(&c.busy, &c.busy_peak);
                            c.requests.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            let n = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().len())
                                .unwrap_or(0);
                            c.busy.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                                "{n}"
                            )))))
                        }
                    })
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
                c.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

/// An upstream that answers 64 MiB in 64 KiB chunks, as fast as it is read; `gone` turns true
/// when lb drops the answer before its end.
async fn endless() -> (SocketAddr, Arc<AtomicBool>) {
    let gone = Arc::new(AtomicBool::new(false));
    let g = gone.clone();
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let g = g.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let g = g.clone();
                        async move {
                            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
                            tokio::spawn(async move {
                                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                                for _ in 0..1024 {
                                    if tx.send(chunk.clone()).await.is_err() {
                                        g.store(true, Ordering::SeqCst);
                                        return;
                                    }
                                }
                            });
                            let body = body_of(rx);
                            Ok::<_, Infallible>(Response::new(body))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, gone)
}

fn tokio_stream_from(
    rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Bytes> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
}

/// A body whose frames are what `rx` receives.
fn body_of(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Streamed {
    use futures_util::StreamExt as _;
    BodyExt::boxed(StreamBody::new(
        tokio_stream_from(rx).map(|b| Ok::<_, BoxError>(Frame::data(b))),
    ))
}

/// An h2c connection to `addr`, driven on its own task; the task ends when the connection does.
async fn h2c(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Streamed>,
    tokio::task::JoinHandle<()>,
) {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .expect("h2 handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

fn get(path: &str) -> Request<Streamed> {
    Request::get(format!("http://t{path}"))
        .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
        .expect("request")
}

async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Hole 7, idle: HTTP/2 connections with nothing in flight are closed at the idle timeout
/// (those that never asked anything at the header timeout), and so are HTTP/1 and silent TCP
/// connections; a stream in flight keeps its connection open past the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_of_every_kind_are_closed() {
    let (up, _) = counting(Duration::from_millis(2500)).await;
    let fast = upstream("fast").await;
    let svcs = services(&[("web", &[(fast, 1)]), ("slow", &[(up, 1)])]);
    let (_p, addr) = start_limited(
        vec![
            router("slow", "PathPrefix(`/slow`)", "slow", Some(1000)),
            router("r", "PathPrefix(`/`)", "web", None),
        ],
        &svcs,
        HashMap::new(),
        quick(),
    )
    .await;

    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (mut send, task) = h2c(addr).await;
        if i % 2 == 0 {
            let resp = send.send_request(get("/")).await.expect("answer");
            assert_eq!(resp.status(), 200);
            let _ = resp.into_body().collect().await;
        }
        // The handle stays alive (a dropped SendRequest would close the connection itself).
        tasks.push((send, task));
    }
    // A stream that takes 2.5 s on a connection whose idle timeout is 1 s.
    let (mut busy_send, busy_task) = h2c(addr).await;
    let busy = tokio::spawn(async move {
        let resp = busy_send.send_request(get("/slow")).await.expect("answer");
        let code = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        (code, busy_send)
    });
    // HTTP/1.1 keep-alive after one answer, and a TCP connection that never says anything.
    let mut h1 = TcpStream::connect(addr).await.expect("connect");
    h1.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut silent = TcpStream::connect(addr).await.expect("connect");

    wait_for("40 h2c connections closed", Duration::from_secs(6), || {
        tasks.iter().all(|(_, t)| t.is_finished())
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    for s in [&mut h1, &mut silent] {
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(4), s.read_to_end(&mut out)).await;
        assert!(r.is_ok(), "closed by lb");
    }
    let (code, _send) = busy.await.expect("task");
    assert_eq!(code, 200, "a stream in flight is not idle");
    assert!(started.elapsed() >= Duration::from_millis(2400));
    wait_for(
        "the busy connection, once idle",
        Duration::from_secs(4),
        || busy_task.is_finished(),
    )
    .await;
}

/// Hole 7, bodies: a request body trickled below the entry point's minimum rate is cut with a
/// `408` (HTTP/1.1 and HTTP/2) well before it would end; a body at a modest rate is not; and
/// what reached the upstream never arrived whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_below_the_minimum_rate_are_cut() {
    let (up, counts) = counting(Duration::ZERO).await;
    let addr = proxy_to(up, ServiceSpec::default(), quick()).await;

    // HTTP/1.1: 1,000 bytes announced, one every 200 ms (5 B/s; the minimum is 100 B/s).
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
        .await
        .expect("write");
    // Read the answer while trickling.
    let read = async {
        let (mut got, mut buf) = (Vec::new(), vec![0u8; 4096]);
        loop {
            tokio::select! {
                n = s.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        if got.windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                },
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    let _ = s.write_all(b"x").await;
                }
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    let answer = tokio::time::timeout(Duration::from_secs(8), read)
        .await
        .expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "cut after {took:?}");

    // HTTP/2: the same trickle on a stream.
    let (mut send, _task) = h2c(addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        for _ in 0..1000 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if tx.send(Bytes::from_static(b"x")).await.is_err() {
                return;
            }
        }
    });
    let body = body_of(rx);
    let req = Request::post("http://t/")
        .header("content-length", "1000")
        .body(body)
        .expect("request");
    let started = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(8), send.send_request(req))
        .await
        .expect("an answer")
        .expect("answer");
    assert_eq!(resp.status(), 408);
    assert!(started.elapsed() < Duration::from_secs(4));

    // 100 bytes every 100 ms (1,000 B/s) for 2 s: never cut, arrives whole.
    let (mut send, _task) = h2c(addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = tx.send(Bytes::from(vec![b'y'; 100])).await;
        }
    });
    let body = body_of(rx);
    let resp = send
        .send_request(Request::post("http://t/").body(body).expect("request"))
        .await
        .expect("answer");
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&got[..], b"2000", "the upstream got the whole body");
    assert!(counts.requests.load(Ordering::SeqCst) >= 1);
}

/// Hole 7, answers nobody reads: an HTTP/1.1 client that stops reading loses its connection at
/// the write timeout, an HTTP/2 stream whose window stays shut is reset (its connection goes
/// on serving), and in both cases the upstream's answer is dropped rather than held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_the_client_does_not_take_are_dropped() {
    let (up, gone) = endless().await;
    let addr = proxy_to(up, ServiceSpec::default(), quick()).await;

    // HTTP/1.1 with a small receive buffer, never read.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut s = sock.connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    wait_for(
        "the upstream's answer dropped (HTTP/1.1)",
        Duration::from_secs(10),
        || gone.load(Ordering::SeqCst),
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "the connection was closed");
    assert!(out.len() < 64 * 1024 * 1024, "not all of it was sent");
    gone.store(false, Ordering::SeqCst);

    // HTTP/2: take the head, never the body (hyper's client opens the window only as the body
    // is read, 2 MiB per stream at first).
    let (mut send, task) = h2c(addr).await;
    let resp = send.send_request(get("/")).await.expect("answer");
    assert_eq!(resp.status(), 200);
    wait_for(
        "the upstream's answer dropped (HTTP/2)",
        Duration::from_secs(10),
        || gone.load(Ordering::SeqCst),
    )
    .await;
    let read = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("the stream ended");
    assert!(read.is_err(), "the stream was reset, not finished");
    assert!(!task.is_finished(), "the connection lives on");
    let resp = send.send_request(get("/")).await;
    assert!(
        resp.is_ok(),
        "the connection still serves: {:?}",
        resp.err()
    );
}

/// Hole 8: every request holds one upstream connection, and a service's cap bounds them per
/// upstream. 5 HTTP/2 clients × 20 streams on a cap of 4: the upstream never sees more than 4
/// requests at once, and everything is answered (the rest waited in line). With a short wait,
/// those beyond the cap get a `503` quickly, and that does not eject the upstream. And one
/// client connection holds at most `h2_max_streams` upstream requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_capped() {
    let (up, counts) = counting(Duration::from_millis(200)).await;
    let spec = ServiceSpec {
        max_connections: 4,
        connect_timeout: Duration::from_secs(20),
        ..ServiceSpec::default()
    };
    let addr = proxy_to(up, spec, ConnLimits::default()).await;
    let mut all = Vec::new();
    for _ in 0..5 {
        let (send, _task) = h2c(addr).await;
        for _ in 0..20 {
            let mut send = send.clone();
            all.push(tokio::spawn(async move {
                let resp = send.send_request(get("/")).await.expect("answer");
                resp.status().as_u16()
            }));
        }
    }
    for t in all {
        assert_eq!(t.await.expect("task"), 200);
    }
    assert_eq!(counts.requests.load(Ordering::SeqCst), 100);
    let busy = counts.busy_peak.load(Ordering::SeqCst);
    let open = counts.open_peak.load(Ordering::SeqCst);
    println!("upstream peak: {busy} requests, {open} connections at once");
    assert!(busy <= 4, "{busy} requests at once on a cap of 4");
    assert!(open <= 8, "{open} connections at once on a cap of 4");

    // A short line: beyond the cap, a quick 503.
    let (up, counts) = counting(Duration::from_millis(1000)).await;
    let spec = ServiceSpec {
        max_connections: 4,
        connect_timeout: Duration::from_millis(200),
        ..ServiceSpec::default()
    };
    let addr = proxy_to(up, spec, ConnLimits::default()).await;
    let (send, _task) = h2c(addr).await;
    let started = Instant::now();
    let mut all = Vec::new();
    for _ in 0..12 {
        let mut send = send.clone();
        all.push(tokio::spawn(async move {
            let resp = send.send_request(get("/")).await.expect("answer");
            (resp.status().as_u16(), Instant::now())
        }));
    }
    let mut codes = Vec::new();
    for t in all {
        let (code, at) = t.await.expect("task");
        if code == 503 {
            assert!(
                at - started < Duration::from_millis(900),
                "a 503 waits only its line"
            );
        }
        codes.push(code);
    }
    assert_eq!(codes.iter().filter(|&&c| c == 200).count(), 4, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 503).count(), 8, "{codes:?}");
    assert!(counts.busy_peak.load(Ordering::SeqCst) <= 4);
    // Not ejected: the next requests are served.
    let mut send = send.clone();
    for _ in 0..4 {
        let resp = send.send_request(get("/")).await.expect("answer");
        assert_eq!(resp.status(), 200);
    }

    // One client connection, 50 streams at once, h2_max_streams 8: at most 8 upstream requests.
    let (up, counts) = counting(Duration::from_millis(200)).await;
    let limits = ConnLimits {
        h2_max_streams: 8,
        ..ConnLimits::default()
    };
    let addr = proxy_to(up, ServiceSpec::default(), limits).await;
    let (mut send, _task) = h2c(addr).await;
    // One answer first: by then the client has lb's SETTINGS, and keeps to its stream limit
    // (streams opened before it knew would be refused, as HTTP/2 says).
    let resp = send.send_request(get("/")).await.expect("answer");
    assert_eq!(resp.status(), 200);
    let mut all = Vec::new();
    for _ in 0..50 {
        let mut send = send.clone();
        all.push(tokio::spawn(async move {
            let resp = send.send_request(get("/")).await.expect("answer");
            resp.status().as_u16()
        }));
    }
    for t in all {
        assert_eq!(t.await.expect("task"), 200);
    }
    let busy = counts.busy_peak.load(Ordering::SeqCst);
    assert!(busy <= 8, "{busy} upstream requests from one connection");
}

/// One keep-alive request on `s`: the first bytes of the answer.
async fn ask(s: &mut TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// An entry point's connection cap: with 8 open, a ninth waits in the kernel's backlog, unserved
/// and costing lb nothing; when one of the 8 closes, the ninth is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_point_connections_are_capped() {
    let up = upstream("up").await;
    let limits = ConnLimits {
        max_connections: 8,
        ..ConnLimits::default()
    };
    let addr = proxy_to(up, ServiceSpec::default(), limits).await;
    let mut open = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        assert!(ask(&mut s).await.starts_with("HTTP/1.1 200"));
        open.push(s);
    }
    let mut ninth = TcpStream::connect(addr)
        .await
        .expect("the backlog takes it");
    let waiting = tokio::time::timeout(Duration::from_millis(700), ask(&mut ninth)).await;
    assert!(
        waiting.is_err(),
        "the ninth was served past the cap: {waiting:?}"
    );
    drop(open.pop());
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(3), ninth.read(&mut buf))
        .await
        .expect("served once one closed")
        .expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
}

//! HTTP/2 abuse on an h2c entry point, as raw frames: rapid reset, a CONTINUATION flood, SETTINGS
//! and PING floods (never reading the acknowledgements), and an HPACK bomb. For each: how much
//! reached the upstream, the process's RSS during the attack (within the idle baseline + 32 MiB),
//! and its descriptors after the client left (back within ± 5 of the baseline in 2 s). Its own
//! test binary, one test: the RSS and descriptor counts are the process's, and nothing else may
//! run beside it.
#![allow(clippy::disallowed_methods)] // tests drive real time

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

mod common;
use common::*;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

/// An attack's frames, made as they are sent.
type Frames = Box<dyn Iterator<Item = Vec<u8>> + Send>;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `GET /` for `a.test`, in HPACK: the static table's `:method GET`, `:scheme http`, `:path /`,
/// and `:authority` as a literal without indexing.
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84, 0x01, 6];
    b.extend_from_slice(b"a.test");
    b
}

/// The highest RSS seen while `running` holds, sampled every 20 ms.
fn watch_rss(running: Arc<AtomicBool>) -> (Arc<AtomicU64>, std::thread::JoinHandle<()>) {
    let peak = Arc::new(AtomicU64::new(rss_kib()));
    let p = peak.clone();
    let h = std::thread::spawn(move || {
        while running.load(Ordering::Relaxed) {
            p.fetch_max(rss_kib(), Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    (peak, h)
}

/// What an attack came to: bytes the client got written before the server stopped taking them,
/// whether the server closed the connection, and the RSS peak.
struct Outcome {
    written: usize,
    closed_by_server: bool,
    peak_kib: u64,
}

/// Connects, sends the preface and an empty SETTINGS, then `frames` one after another for at
/// most `for_at_most`, reading (and dropping) what the server sends when `read` is set.
async fn attack(
    addr: SocketAddr,
    frames: impl Iterator<Item = Vec<u8>> + Send + 'static,
    read: bool,
    for_at_most: Duration,
) -> Outcome {
    let running = Arc::new(AtomicBool::new(true));
    let (peak, sampler) = watch_rss(running.clone());
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let closed = Arc::new(AtomicBool::new(false));
    let reader = {
        let closed = closed.clone();
        tokio::spawn(async move {
            if !read {
                return;
            }
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        closed.store(true, Ordering::Relaxed);
                        return;
                    }
                    Ok(_) => {}
                }
            }
        })
    };
    let mut written = 0;
    let started = Instant::now();
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let mut frames = frames;
    loop {
        if started.elapsed() > for_at_most {
            break;
        }
        // Batches of frames per write: the attack at the speed the socket takes it.
        for f in frames.by_ref().take(64) {
            out.extend(f);
        }
        if out.is_empty() {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(2), wr.write_all(&out)).await {
            Ok(Ok(())) => written += out.len(),
            // The server stopped reading (its window, or it is gone): that is its defence.
            Ok(Err(_)) | Err(_) => break,
        }
        out.clear();
    }
    if read {
        // The server's last word (GOAWAY, then close) within a second.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while !closed.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
    drop(wr);
    reader.abort();
    running.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    Outcome {
        written,
        closed_by_server: closed.load(Ordering::Relaxed),
        peak_kib: peak.load(Ordering::Relaxed),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_floods_are_bounded() {
    let (app, hits) = counting_upstream().await;
    let svcs = services(&[("app", &[(app, 1)])]);
    let (_proxy, addr) = start_with(
        vec![router("app", "Host(`a.test`)", "app", None)],
        &svcs,
        HashMap::new(),
    )
    .await;
    // Warm: allocations a first request makes are part of the baseline, not of an attack.
    let c = client();
    for _ in 0..20 {
        assert_eq!(get(&c, addr, "a.test", "/", &[]).await.0, 200);
    }
    drop(c);
    // Not an attack: ten requests as the attacks' frames make them reach the upstream, so an
    // attack's zero below is the server's doing, not a malformed frame. (Their pooled upstream
    // connections are part of the baseline.)
    let plain =
        (0..10u32).map(|i| frame(HEADERS, END_HEADERS | END_STREAM, 1 + 2 * i, &get_block()));
    let before = hits.load(Ordering::Relaxed);
    attack(addr, plain, true, Duration::from_secs(1)).await;
    let through = hits.load(Ordering::Relaxed) - before;
    assert_eq!(through, 10, "ten plain requests through raw frames");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (base_rss, base_fds) = (rss_kib(), fds());
    let limit_kib = base_rss + 32 * 1024;
    let mut report = Vec::new();
    let mut wrong = Vec::new();

    let attacks: Vec<(&str, Frames, bool)> = vec![
        // Rapid reset (CVE-2023-44487): a request opened and cancelled at once, 100,000 times.
        (
            "rapid reset",
            Box::new((0..100_000u32).flat_map(|i| {
                let id = 1 + 2 * i;
                [
                    frame(HEADERS, END_HEADERS | END_STREAM, id, &get_block()),
                    frame(RST_STREAM, 0, id, &8u32.to_be_bytes()),
                ]
            })),
            true,
        ),
        // CONTINUATION flood: one header block that never ends, 16 KiB at a time.
        (
            "CONTINUATION flood",
            Box::new(
                std::iter::once(frame(HEADERS, 0, 1, &get_block())).chain(
                    std::iter::repeat_with(|| {
                        // A literal header `x: aaaa…` (not indexed), 16 KiB of it.
                        let mut b = vec![0x00, 0x01, b'x', 0x7f];
                        let mut n = 16 * 1024 - 127;
                        while n >= 128 {
                            b.push(0x80 | (n & 0x7f) as u8);
                            n >>= 7;
                        }
                        b.push(n as u8);
                        b.extend(std::iter::repeat_n(b'a', 16 * 1024));
                        frame(CONTINUATION, 0, 1, &b)
                    })
                    .take(10_000),
                ),
            ),
            true,
        ),
        // SETTINGS flood, never reading the ACKs the server owes.
        (
            "SETTINGS flood",
            Box::new((0..200_000).map(|_| frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]))),
            false,
        ),
        // PING flood, never reading the PONGs.
        (
            "PING flood",
            Box::new((0..200_000u64).map(|i| frame(PING, 0, 0, &i.to_be_bytes()))),
            false,
        ),
        // HPACK bomb: one 4 KiB header in the dynamic table, then requests naming it 1,000
        // times each (4 MiB of headers from 1 KiB on the wire).
        (
            "HPACK bomb",
            Box::new((0..2_000u32).map(|i| {
                let id = 1 + 2 * i;
                let mut b = get_block();
                if i == 0 {
                    // Literal with incremental indexing, new name `x`, a 4,000-byte value.
                    b.extend([0x40, 0x01, b'x', 0x7f]);
                    let mut n = 4000 - 127;
                    while n >= 128 {
                        b.push(0x80 | (n & 0x7f) as u8);
                        n >>= 7;
                    }
                    b.push(n as u8);
                    b.extend(std::iter::repeat_n(b'b', 4000));
                }
                // Index 62: the newest dynamic entry.
                b.extend(std::iter::repeat_n(0xbe, 1000));
                frame(HEADERS, END_HEADERS | END_STREAM, id, &b)
            })),
            true,
        ),
    ];
    for (name, frames, read) in attacks {
        let before = hits.load(Ordering::Relaxed);
        let o = attack(addr, frames, read, Duration::from_secs(5)).await;
        let reached = hits.load(Ordering::Relaxed) - before;
        // The client has left: its connection's descriptor must go within twice the 1 s the
        // server's close takes.
        let deadline = Instant::now() + Duration::from_secs(2);
        while fds() > base_fds + 5 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let fds_after = fds();
        report.push(format!(
            "{name}: {} KiB written, closed by the server: {}, {reached} requests reached the upstream, RSS peak {} KiB over {base_rss} KiB, fds {fds_after} (baseline {base_fds})",
            o.written / 1024,
            o.closed_by_server,
            o.peak_kib.saturating_sub(base_rss),
        ));
        if o.peak_kib > limit_kib {
            wrong.push(format!(
                "{name}: RSS peaked at {} KiB, limit {limit_kib}",
                o.peak_kib
            ));
        }
        if fds_after.abs_diff(base_fds) > 5 {
            wrong.push(format!(
                "{name}: {fds_after} descriptors, baseline {base_fds}"
            ));
        }
        let bound = match name {
            "rapid reset" => 1_000,
            "HPACK bomb" => 10,
            _ => 0,
        };
        if reached > bound {
            wrong.push(format!(
                "{name}: {reached} requests reached the upstream, at most {bound}"
            ));
        }
    }
    for line in &report {
        eprintln!("{line}");
    }
    // The proxy still serves.
    let c = client();
    assert_eq!(get(&c, addr, "a.test", "/", &[]).await.0, 200);
    assert!(
        wrong.is_empty(),
        "{}\n\n{}",
        wrong.join("\n"),
        report.join("\n")
    );
}

/// An upstream that counts the requests it gets.
async fn counting_upstream() -> (SocketAddr, Arc<AtomicU64>) {
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    let addr = serve(move |_req: hyper::Request<hyper::body::Incoming>| {
        h.fetch_add(1, Ordering::Relaxed);
        async { hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok"))) }
    })
    .await;
    (addr, hits)
}

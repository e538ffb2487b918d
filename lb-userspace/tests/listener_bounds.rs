//! Slow and oversized clients on the listeners the HTTP tests do not reach: a TLS entry point
//! (silent connections, a ClientHello trickled a byte at a time, a head trickled inside TLS, a
//! head past the bound) and an entry point of TCP routers (silent, and a trickled ClientHello).
//! Each is cut at its bound however the client paces itself, nothing reaches an upstream, and
//! afterwards the process's descriptors are back at the baseline (± 5) within twice the bound and
//! its RSS within the baseline + 32 MiB. Its own binary: it reads its process's RSS and fds.
#![allow(clippy::disallowed_methods)] // tests drive real time and real sockets

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use lb_userspace::{
    model::instance::{Instance, Services},
    model::l7::{CertSpec, ConnLimits, EntryPointSpec, TcpRouterSpec, TlsMode},
    model::rule::TcpRule,
    proxy::{
        tls::{server_config, Certs},
        Proxy,
    },
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

mod common;
use common::{fds, rss_kib};

/// Reads until the peer closes; how long that took, or `None` if it answered bytes instead
/// (TLS alerts aside: a handshake cut short may send one).
async fn closed_after<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t0.elapsed()),
            // A TLS alert record (21) before the close is a close.
            Ok(Ok(_)) if buf[0] == 21 => continue,
            Ok(Ok(_)) => return None,
            Err(_) => return None,
        }
    }
}

/// The ClientHello a rustls client sends for `sni`.
fn hello(sni: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let mut c = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(sni.to_string()).expect("name"),
    )
    .expect("client");
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).expect("hello");
    }
    out
}

/// Sends `bytes` one at a time, `gap` apart, until the peer closes or they run out.
async fn trickle(s: &mut TcpStream, bytes: &[u8], gap: Duration) {
    for b in bytes {
        if s.write_all(&[*b]).await.is_err() {
            return;
        }
        tokio::time::sleep(gap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_oversized_clients_on_tls_and_tcp_router_listeners() {
    let dir = std::env::temp_dir().join(format!("lb-bounds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["a.test".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    std::fs::write(dir.join("a.crt"), cert.pem()).expect("write");
    std::fs::write(dir.join("a.key"), key.serialize_pem()).expect("write");
    let certs = Certs::load(&[CertSpec {
        cert_file: dir.join("a.crt"),
        key_file: dir.join("a.key"),
        default: true,
    }])
    .expect("certificates");
    let tls = server_config(Arc::new(certs), None).expect("tls config");

    // Counts every request and every connection that reaches an upstream.
    let reached = Arc::new(AtomicU64::new(0));
    let up = {
        let reached = reached.clone();
        common::serve(move |_req| {
            reached.fetch_add(1, Ordering::SeqCst);
            async { Response::new(Full::new(Bytes::from("up"))) }
        })
        .await
    };
    let raw = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let raw_addr = raw.local_addr().expect("addr");
    {
        let reached = reached.clone();
        tokio::spawn(async move {
            while let Ok((_s, _)) = raw.accept().await {
                reached.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let mut svcs = Services::new();
    for (name, addr) in [("web", up), ("raw", raw_addr)] {
        let i = Instance {
            address: addr.ip(),
            port: addr.port(),
            weight: 1,
            zone: None,
            metadata: BTreeMap::new(),
        };
        svcs.insert(name.into(), BTreeMap::from([(i.key(), i)]));
    }
    let limits = ConnLimits {
        header_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        ..ConnLimits::default()
    };
    let (tls_l, tcp_l) = (
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
    );
    let (tls_addr, tcp_addr) = (
        tls_l.local_addr().expect("addr"),
        tcp_l.local_addr().expect("addr"),
    );
    let ep = |name: &str, address, tls| EntryPointSpec {
        name: name.into(),
        address,
        tls,
        client_ca_file: None,
        trusted_ips: vec![],
        limits,
        also_plain: false,
        as_default: false,
        proxy_protocol: None,
    };
    let mut http = common::router("all", "PathPrefix(`/`)", "web", None);
    http.entrypoints = vec!["tls".into()];
    let proxy = Arc::new(Proxy::new(
        vec![ep("tls", tls_addr, true), ep("tcp", tcp_addr, false)],
        vec![http],
        Default::default(),
        Default::default(),
        &svcs,
    ));
    proxy.set_tcp_routers(vec![TcpRouterSpec {
        name: "sni".into(),
        entrypoints: vec!["tcp".into()],
        rule: TcpRule::parse("HostSNI(`a.test`)", true).expect("rule"),
        rule_text: "HostSNI(`a.test`)".into(),
        priority: None,
        service: "raw".into(),
        tls: TlsMode::Passthrough,
        tls_options: None,
        guards: Default::default(),
    }]);
    tokio::spawn(proxy.clone().serve(
        "tls".into(),
        tls_l,
        Some(Arc::new(arc_swap::ArcSwap::new(tls))),
    ));
    tokio::spawn(proxy.clone().serve("tcp".into(), tcp_l, None));

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert.der().to_vec()))
        .expect("root");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    ));
    let tls_get = |head: Vec<u8>| {
        let connector = connector.clone();
        async move {
            let s = TcpStream::connect(tls_addr).await.expect("connect");
            let mut s = connector
                .connect(ServerName::try_from("a.test").expect("name"), s)
                .await
                .expect("handshake");
            s.write_all(&head).await.expect("write");
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    // Warm: one good request each way, so what is lazily set up is in the baseline.
    let ok = tls_get(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n".to_vec()).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let before = reached.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (fds0, rss0) = (fds(), rss_kib());

    let started = Instant::now();
    let hello = hello("a.test");
    let mut tasks: Vec<tokio::task::JoinHandle<(&'static str, Option<Duration>)>> = Vec::new();
    for i in 0..40 {
        // Silent on both listeners.
        let addr = if i % 2 == 0 { tls_addr } else { tcp_addr };
        let what = if i % 2 == 0 {
            "tls silent"
        } else {
            "tcp silent"
        };
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            (what, closed_after(&mut s, Duration::from_secs(15)).await)
        }));
    }
    for i in 0..10 {
        // A ClientHello a byte every 100 ms: it would take a minute.
        let addr = if i % 2 == 0 { tls_addr } else { tcp_addr };
        let what = if i % 2 == 0 {
            "tls trickled hello"
        } else {
            "tcp trickled hello"
        };
        let hello = hello.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let t0 = Instant::now();
            trickle(&mut s, &hello, Duration::from_millis(100)).await;
            let _ = closed_after(&mut s, Duration::from_secs(15)).await;
            (what, Some(t0.elapsed()))
        }));
    }
    for _ in 0..5 {
        // Inside TLS, a head a byte every 100 ms.
        let connector = connector.clone();
        tasks.push(tokio::spawn(async move {
            let s = TcpStream::connect(tls_addr).await.expect("connect");
            let mut s = connector
                .connect(ServerName::try_from("a.test").expect("name"), s)
                .await
                .expect("handshake");
            let t0 = Instant::now();
            let head = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
            for b in head {
                if s.write_all(&[*b]).await.is_err() || s.flush().await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
            let answered = String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200");
            ("tls trickled head", (!answered).then(|| t0.elapsed()))
        }));
    }
    // Past the bound inside TLS: 431, nothing forwarded.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let answer = tls_get(big.into_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.80}");

    let mut slowest: BTreeMap<&str, Duration> = BTreeMap::new();
    for t in tasks {
        let (what, took) = t.await.expect("client");
        let took = took.unwrap_or_else(|| panic!("{what}: not closed (or answered)"));
        let e = slowest.entry(what).or_default();
        *e = (*e).max(took);
        // TLS: the handshake and the head have the header timeout (1 s); TCP routers read a
        // ClientHello for 5 s. A trickle never buys more.
        let bound = if what.starts_with("tls") { 1.0 } else { 5.0 };
        assert!(
            took.as_secs_f64() < bound * 2.0 + 0.5,
            "{what}: closed after {took:?} (bound {bound} s)"
        );
    }
    let cut = started.elapsed();
    assert_eq!(
        reached.load(Ordering::SeqCst),
        before,
        "nothing of it reached an upstream"
    );
    // Descriptors back within twice the longest bound (5 s) of the start.
    let deadline = started + Duration::from_secs(10);
    while fds() > fds0 + 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (fds1, rss1) = (fds(), rss_kib());
    println!(
        "bounds: 55 slow clients and one oversized head on a TLS and a TCP-router listener, all \
         cut within {} ms ({slowest:?}); fds {fds0} → {fds1}, RSS {rss0} → {rss1} KiB",
        cut.as_millis()
    );
    assert!(fds1 <= fds0 + 5, "fds {fds0} → {fds1}");
    assert!(rss1 <= rss0 + 32 * 1024, "RSS {rss0} → {rss1} KiB");
    // Unharmed.
    let ok = tls_get(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n".to_vec()).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let _ = std::fs::remove_dir_all(&dir);
}

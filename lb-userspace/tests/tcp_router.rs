//! TCP routers with real sockets on loopback: TLS passthrough by SNI (the client verifies the
//! *upstream's* certificate), termination with lb's certificate and plaintext upstreams,
//! wildcards and priorities, plain TCP (server-first protocols included), TCP and HTTP routers
//! sharing an entry point, failover on connect errors, malformed ClientHellos, and a reload.
//!
//! Every upstream answers each line it receives with `<name>: <line>` and, when the client's side
//! closes, `<name>: eof` before closing its own: so a test sees who answered, that bytes arrived
//! as plaintext, and that half-closes travel both ways.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb_userspace::{
    model::instance::{Instance, Services},
    model::{
        l7::{CertSpec, EntryPointSpec, RouterSpec, TcpRouterSpec, TlsMode},
        rule::{Rule, TcpRule},
    },
    proxy::{
        tls::{server_config, Certs},
        L7Config, Proxy,
    },
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

const WAIT: Duration = Duration::from_secs(10);

/// Every name the tests' clients ask for: each upstream's certificate covers all of them, so
/// clients verify for real and tell upstreams apart by the certificate they got.
const NAMES: &[&str] = &[
    "a.test",
    "b.test",
    "x.w.test",
    "y.w.test",
    "a.b.w.test",
    "w.test",
    "db.test",
    "other.test",
    "r.test",
    "127.0.0.1",
];

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: PathBuf,
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ca(tag: &str) -> Ca {
    let dir = std::env::temp_dir().join(format!("lb-tcp-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Ca {
        cert: p.self_signed(&key).unwrap(),
        key,
        dir,
    }
}

impl Ca {
    /// A leaf for `names`: its DER and key.
    fn leaf(&self, names: &[&str]) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.der().clone(), key)
    }

    /// lb's own certificate for `names`, as files, loaded as the entry point's TLS config.
    fn lb_config(
        &self,
        names: &[&str],
    ) -> (
        CertificateDer<'static>,
        Arc<lb_userspace::proxy::tls::TlsBase>,
    ) {
        let key = KeyPair::generate().unwrap();
        let p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(self.dir.join("lb.crt"), cert.pem()).unwrap();
        std::fs::write(self.dir.join("lb.key"), key.serialize_pem()).unwrap();
        let certs = Certs::load(&[CertSpec {
            cert_file: self.dir.join("lb.crt"),
            key_file: self.dir.join("lb.key"),
            default: true,
        }])
        .unwrap();
        (
            cert.der().clone(),
            server_config(Arc::new(certs), None).unwrap(),
        )
    }

    fn client(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

/// Answers lines as `<name>: <line>`, then `<name>: eof` when the peer stops sending.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(name: &str, s: S) {
    let (r, mut w) = tokio::io::split(s);
    let mut lines = tokio::io::BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if w.write_all(format!("{name}: {line}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = w.write_all(format!("{name}: eof\n").as_bytes()).await;
    let _ = w.shutdown().await;
}

struct Upstream {
    addr: SocketAddr,
    /// Connections accepted.
    accepted: Arc<AtomicUsize>,
    /// The certificate it presents (TLS upstreams).
    cert: Option<CertificateDer<'static>>,
}

/// A plain TCP upstream; `greeting`: it speaks first (as SMTP does).
async fn plain_upstream(name: &'static str, greeting: Option<&'static str>) -> Upstream {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Some(g) = greeting {
                    let _ = s.write_all(g.as_bytes()).await;
                }
                answer(name, s).await
            });
        }
    });
    Upstream {
        addr,
        accepted,
        cert: None,
    }
}

/// A TLS upstream with its own certificate (from `ca`, for every test name).
async fn tls_upstream(name: &'static str, ca: &Ca) -> Upstream {
    let (der, key) = ca.leaf(NAMES);
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![der.clone()],
        PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(s) = acceptor.accept(s).await {
                    answer(name, s).await;
                }
            });
        }
    });
    Upstream {
        addr,
        accepted,
        cert: Some(der),
    }
}

/// An HTTP upstream answering `http <name>`.
async fn http_upstream(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "http {name}"
                    )))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// An address where nothing listens.
fn dead() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn services(list: &[(&str, &[SocketAddr])]) -> Services {
    let mut s = Services::new();
    for (name, addrs) in list {
        let m = addrs
            .iter()
            .map(|a| {
                let i = Instance {
                    address: a.ip(),
                    port: a.port(),
                    weight: 1,
                    zone: None,
                    metadata: BTreeMap::new(),
                };
                (i.key(), i)
            })
            .collect();
        s.insert(name.to_string(), m);
    }
    s
}

fn tcp(
    name: &str,
    rule: &str,
    service: &str,
    tls: TlsMode,
    priority: Option<i64>,
) -> TcpRouterSpec {
    TcpRouterSpec {
        name: name.into(),
        entrypoints: vec![],
        rule: TcpRule::parse(rule, tls != TlsMode::Plain).expect("rule"),
        rule_text: rule.into(),
        priority,
        service: service.into(),
        tls,
        tls_options: None,
        guards: Default::default(),
    }
}

fn http(name: &str, rule: &str, service: &str) -> RouterSpec {
    RouterSpec {
        name: name.into(),
        entrypoints: vec![],
        rule: Rule::parse(rule).expect("rule"),
        rule_text: rule.into(),
        priority: None,
        service: service.into(),
        middlewares: vec![],
        tls: None,
        tls_options: None,
    }
}

/// A proxy with one entry point ("ep") on loopback, TLS with `tls`.
async fn start(
    tls: Option<Arc<lb_userspace::proxy::tls::TlsBase>>,
    routers: Vec<RouterSpec>,
    tcp_routers: Vec<TcpRouterSpec>,
    svcs: &Services,
) -> (Arc<Proxy>, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let ep = EntryPointSpec {
        name: "ep".into(),
        address: addr,
        tls: tls.is_some(),
        client_ca_file: None,
        trusted_ips: vec![],
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
    proxy.set_tcp_routers(tcp_routers);
    tokio::spawn(proxy.clone().serve(
        "ep".into(),
        l,
        tls.map(|t| Arc::new(arc_swap::ArcSwap::new(t))),
    ));
    (proxy, addr)
}

async fn read_line<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut b)).await {
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
            Ok(Ok(0)) if out.is_empty() => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(0)) => break,
            Ok(Ok(_)) if b[0] == b'\n' => break,
            Ok(Ok(_)) => out.push(b[0]),
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Sends a line, reads the answer, closes the sending side, reads the `eof` answer and the end.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, line: &str) -> (String, String) {
    s.write_all(format!("{line}\n").as_bytes()).await.unwrap();
    let answer = read_line(s).await.expect("answer");
    s.shutdown().await.unwrap();
    let eof = read_line(s).await.expect("eof answer");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "nothing after eof");
    (answer, eof)
}

/// A verified TLS connection through the proxy with `sni`.
async fn tls_connect(
    ca: &Ca,
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio::time::timeout(WAIT, ca.client(alpn).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Expects the proxy to close the connection without answering.
async fn closed<S: AsyncRead + Unpin>(s: &mut S) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("got {n} bytes instead of a close"),
        Err(_) => panic!("not closed in time"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_by_sni_reaches_each_upstream_with_its_own_certificate() {
    let ca = ca("pass");
    let (a, b) = (tls_upstream("a", &ca).await, tls_upstream("b", &ca).await);
    let svcs = services(&[("a", &[a.addr]), ("b", &[b.addr])]);
    let (_p, addr) = start(
        None,
        vec![],
        vec![
            tcp("to-a", "HostSNI(`a.test`)", "a", TlsMode::Passthrough, None),
            tcp("to-b", "HostSNI(`b.test`)", "b", TlsMode::Passthrough, None),
        ],
        &svcs,
    )
    .await;
    for (sni, up, name) in [
        ("a.test", &a, "a"),
        ("b.test", &b, "b"),
        ("a.test", &a, "a"),
    ] {
        let mut s = tls_connect(&ca, addr, sni, &[]).await.expect("handshake");
        // The handshake verified against the CA; the certificate is the upstream's own.
        assert_eq!(
            s.get_ref().1.peer_certificates().unwrap()[0],
            *up.cert.as_ref().unwrap(),
            "{sni}"
        );
        let (answer, eof) = exchange(&mut s, "hello").await;
        assert_eq!(answer, format!("{name}: hello"));
        assert_eq!(eof, format!("{name}: eof"), "half-close went through");
    }
    assert_eq!(
        (
            a.accepted.load(Ordering::SeqCst),
            b.accepted.load(Ordering::SeqCst)
        ),
        (2, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn termination_presents_lbs_certificate_and_sends_plaintext() {
    let ca = ca("term");
    let (lb_der, config) = ca.lb_config(&["t.test", "*.w.test"]);
    let up = plain_upstream("plain", None).await;
    let svcs = services(&[("p", &[up.addr])]);
    let (_p, addr) = start(
        Some(config),
        vec![],
        vec![tcp(
            "term",
            "HostSNI(`t.test`, `*.w.test`)",
            "p",
            TlsMode::Terminate,
            None,
        )],
        &svcs,
    )
    .await;
    for sni in ["t.test", "x.w.test"] {
        // A client offering h2 gets no ALPN answer: what runs inside is not HTTP.
        let mut s = tls_connect(&ca, addr, sni, &[b"h2"])
            .await
            .expect("handshake");
        assert_eq!(s.get_ref().1.peer_certificates().unwrap()[0], lb_der);
        assert_eq!(s.get_ref().1.alpn_protocol(), None);
        // The upstream reads lines: only plaintext could be answered line by line.
        let (answer, eof) = exchange(&mut s, "in the clear").await;
        assert_eq!(answer, "plain: in the clear");
        assert_eq!(eof, "plain: eof");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_and_priorities_choose_the_router() {
    let ca = ca("wild");
    let (wild, exact, any) = (
        tls_upstream("wild", &ca).await,
        tls_upstream("exact", &ca).await,
        tls_upstream("any", &ca).await,
    );
    let svcs = services(&[
        ("wild", &[wild.addr]),
        ("exact", &[exact.addr]),
        ("any", &[any.addr]),
    ]);
    let who = |addr: SocketAddr, sni: &'static str| {
        let ca = &ca;
        async move {
            let mut s = tls_connect(ca, addr, sni, &[]).await.expect(sni);
            let (answer, _) = exchange(&mut s, "hi").await;
            answer.split(':').next().unwrap_or("").to_string()
        }
    };
    let routers = |wild_priority: i64| {
        vec![
            tcp(
                "wild",
                "HostSNI(`*.w.test`)",
                "wild",
                TlsMode::Passthrough,
                Some(wild_priority),
            ),
            tcp(
                "exact",
                "HostSNI(`x.w.test`)",
                "exact",
                TlsMode::Passthrough,
                Some(100),
            ),
            // Default priority: its length, the shortest rule.
            tcp("any", "HostSNI(`*`)", "any", TlsMode::Passthrough, None),
        ]
    };
    let (_p, addr) = start(None, vec![], routers(50), &svcs).await;
    assert_eq!(who(addr, "x.w.test").await, "exact", "higher priority");
    assert_eq!(who(addr, "y.w.test").await, "wild");
    assert_eq!(
        who(addr, "a.b.w.test").await,
        "any",
        "a wildcard covers one label"
    );
    assert_eq!(who(addr, "w.test").await, "any");
    assert_eq!(who(addr, "127.0.0.1").await, "any", "no SNI: only `*`");
    let (_p, addr) = start(None, vec![], routers(200), &svcs).await;
    assert_eq!(who(addr, "x.w.test").await, "wild", "priority decides");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_all_plain_tcp_relays_and_lets_servers_speak_first() {
    let echo = plain_upstream("echo", None).await;
    let smtp = plain_upstream("smtp", Some("220 ready\n")).await;
    let svcs = services(&[("echo", &[echo.addr]), ("smtp", &[smtp.addr])]);
    let (_p, addr) = start(
        None,
        vec![],
        vec![tcp("all", "HostSNI(`*`)", "echo", TlsMode::Plain, None)],
        &svcs,
    )
    .await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (answer, eof) = exchange(&mut s, "plain bytes").await;
    assert_eq!(
        (answer.as_str(), eof.as_str()),
        ("echo: plain bytes", "echo: eof")
    );

    // Nothing to decide from the client's bytes: the server's greeting arrives at once.
    let (_p, addr) = start(
        None,
        vec![],
        vec![tcp("smtp", "HostSNI(`*`)", "smtp", TlsMode::Plain, None)],
        &svcs,
    )
    .await;
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut s).await.unwrap(), "220 ready");
    assert!(started.elapsed() < Duration::from_secs(2));
    let (answer, _) = exchange(&mut s, "EHLO x").await;
    assert_eq!(answer, "smtp: EHLO x");

    // A ClientIP condition that excludes this client: closed, the upstream never contacted.
    let before = echo.accepted.load(Ordering::SeqCst);
    let (_p, addr) = start(
        None,
        vec![],
        vec![tcp(
            "office",
            "HostSNI(`*`) && ClientIP(`192.0.2.0/24`)",
            "echo",
            TlsMode::Plain,
            None,
        )],
        &svcs,
    )
    .await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    closed(&mut s).await;
    assert_eq!(echo.accepted.load(Ordering::SeqCst), before);
}

async fn https_get(
    ca: &Ca,
    addr: SocketAddr,
    sni: &str,
) -> Result<(u16, String), Box<dyn std::error::Error>> {
    let s = tls_connect(ca, addr, sni, &[b"http/1.1"]).await?;
    http_get(s).await
}

async fn http_get<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    s: S,
) -> Result<(u16, String), Box<dyn std::error::Error>> {
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get("/")
                .header("host", "web.test")
                .body(Full::new(Bytes::new()))?,
        )
        .await?;
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_http_routers_share_an_entry_point() {
    let ca = ca("mixed");
    let (lb_der, config) = ca.lb_config(&["web.test", "other.test"]);
    let db = tls_upstream("db", &ca).await;
    let web = http_upstream("web").await;
    let svcs = services(&[("db", &[db.addr]), ("web", &[web])]);
    let tcp_routers = vec![tcp(
        "db",
        "HostSNI(`db.test`)",
        "db",
        TlsMode::Passthrough,
        None,
    )];
    let http_routers = vec![http("web", "PathPrefix(`/`)", "web")];
    let (_p, addr) = start(
        Some(config.clone()),
        http_routers.clone(),
        tcp_routers.clone(),
        &svcs,
    )
    .await;
    // The TCP router's name: passed through to the database's own certificate.
    let mut s = tls_connect(&ca, addr, "db.test", &[]).await.expect("db");
    assert_eq!(
        s.get_ref().1.peer_certificates().unwrap()[0],
        *db.cert.as_ref().unwrap()
    );
    assert_eq!(exchange(&mut s, "select 1").await.0, "db: select 1");
    // Any other name: lb terminates with its certificate and the HTTP routers answer.
    let s = tls_connect(&ca, addr, "web.test", &[b"http/1.1"])
        .await
        .expect("https");
    assert_eq!(s.get_ref().1.peer_certificates().unwrap()[0], lb_der);
    assert_eq!(
        http_get(s).await.expect("https request"),
        (200, "http web".into())
    );
    assert_eq!(
        https_get(&ca, addr, "other.test").await.expect("other"),
        (200, "http web".into())
    );

    // Plain HTTP on a plain entry point with a TLS router: the bytes read are replayed to HTTP.
    let (_p, plain) = start(None, http_routers, tcp_routers.clone(), &svcs).await;
    let s = TcpStream::connect(plain).await.unwrap();
    assert_eq!(
        http_get(s).await.expect("http request"),
        (200, "http web".into())
    );

    // Without HTTP routers, a name no TCP router takes is closed before any handshake.
    let (_p, only_tcp) = start(Some(config), vec![], tcp_routers, &svcs).await;
    assert!(tls_connect(&ca, only_tcp, "other.test", &[]).await.is_err());
    let mut s = TcpStream::connect(only_tcp).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    closed(&mut s).await;
    // An ACME TLS-ALPN-01 validation for the TCP router's name is lb's business (its TLS path
    // answers it when a challenge is pending), never the upstream's.
    let _ = tls_connect(&ca, only_tcp, "db.test", &[b"acme-tls/1"]).await;
    assert_eq!(db.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_failure_falls_over_to_another_upstream() {
    let live = plain_upstream("live", None).await;
    let svcs = services(&[("s", &[dead(), live.addr]), ("gone", &[dead()])]);
    let (_p, addr) = start(
        None,
        vec![],
        vec![tcp("all", "HostSNI(`*`)", "s", TlsMode::Plain, None)],
        &svcs,
    )
    .await;
    // Round robin would send every other connection to the dead one: all reach the live one.
    for i in 0..8 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            exchange(&mut s, &format!("n{i}")).await.0,
            format!("live: n{i}")
        );
    }
    assert_eq!(live.accepted.load(Ordering::SeqCst), 8);
    // No upstream reachable at all: the client is closed.
    let (_p, addr) = start(
        None,
        vec![],
        vec![tcp("all", "HostSNI(`*`)", "gone", TlsMode::Plain, None)],
        &svcs,
    )
    .await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    closed(&mut s).await;
}

/// The ClientHello a rustls client sends for `sni`.
fn hello_bytes(sni: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let mut c = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(sni.to_string()).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_truncated_hellos_are_closed() {
    let ca = ca("bad");
    let up = tls_upstream("up", &ca).await;
    let svcs = services(&[("up", &[up.addr])]);
    let (_p, addr) = start(
        None,
        vec![],
        vec![tcp("all", "HostSNI(`*`)", "up", TlsMode::Passthrough, None)],
        &svcs,
    )
    .await;
    let good = hello_bytes("a.test");
    let mut bad_length = good.clone();
    // The handshake message's length, one less: the body is cut inside.
    let len = u32::from_be_bytes([0, good[6], good[7], good[8]]) - 1;
    bad_length[6..9].copy_from_slice(&len.to_be_bytes()[1..]);
    let mut oversized = Vec::new();
    for _ in 0..5 {
        // Records that keep promising more handshake bytes, past the 16 KiB bound.
        oversized.extend([22, 3, 1, 0x10, 0]);
        oversized.extend(vec![0u8; 0x1000]);
    }
    oversized[5..9].copy_from_slice(&[1, 0, 0x3f, 0x00]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not a ClientHello", vec![22, 3, 1, 0, 5, 2, 0, 0, 1, 0]),
        ("bad record version", vec![22, 7, 7, 0, 1, 0]),
        ("a length that lies", bad_length),
        ("larger than the bound", oversized),
        (
            "plain bytes where only TLS routes",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ),
    ];
    for (what, bytes) in cases {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(&bytes).await;
        let started = Instant::now();
        closed(&mut s).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: at once"
        );
    }
    // Truncated, then the client closes its side: closed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&good[..good.len() / 2]).await.unwrap();
    s.shutdown().await.unwrap();
    closed(&mut s).await;
    // Truncated, then silence: closed when the 5 s inspection time is up.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&good[..good.len() - 1]).await.unwrap();
    let started = Instant::now();
    closed(&mut s).await;
    let t = started.elapsed();
    assert!(
        t >= Duration::from_millis(4500) && t < Duration::from_secs(9),
        "{t:?}"
    );
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        0,
        "no upstream saw any of it"
    );
    // The proxy is unharmed: a good hello goes through.
    let tcp_stream = TcpStream::connect(addr).await.unwrap();
    let mut s = ca
        .client(&[])
        .connect(ServerName::try_from("a.test").unwrap(), tcp_stream)
        .await
        .expect("handshake");
    assert_eq!(exchange(&mut s, "ok").await.0, "up: ok");
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_a_tcp_routers_service() {
    let (one, two) = (
        plain_upstream("one", None).await,
        plain_upstream("two", None).await,
    );
    let svcs = services(&[("one", &[one.addr]), ("two", &[two.addr])]);
    let (proxy, addr) = start(
        None,
        vec![],
        vec![tcp("r", "HostSNI(`*`)", "one", TlsMode::Plain, None)],
        &svcs,
    )
    .await;
    let mut before = TcpStream::connect(addr).await.unwrap();
    before.write_all(b"first\n").await.unwrap();
    assert_eq!(read_line(&mut before).await.unwrap(), "one: first");
    assert!(proxy.service_names().contains(&"one".to_string()));

    proxy.reconfigure(L7Config {
        entrypoints: vec![EntryPointSpec {
            name: "ep".into(),
            address: addr,
            tls: false,
            client_ca_file: None,
            trusted_ips: vec![],
            limits: Default::default(),
            also_plain: false,
            as_default: false,
            proxy_protocol: None,
        }],
        routers: vec![],
        specs: HashMap::new(),
        middlewares: HashMap::new(),
        tcp_routers: vec![tcp("r", "HostSNI(`*`)", "two", TlsMode::Plain, None)],
        tls_options: Default::default(),
        tls_default_broken: None,
    });
    assert_eq!(proxy.service_names(), vec!["two".to_string()]);
    let mut after = TcpStream::connect(addr).await.unwrap();
    assert_eq!(exchange(&mut after, "second").await.0, "two: second");
    // The connection made before the reload stays with its upstream.
    assert_eq!(exchange(&mut before, "still").await.0, "one: still");
}

/// A stopped entry point's drain waits for HTTP requests in progress, not for TCP relays: they
/// have no request to finish, and may stay open for hours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tcp_relay_does_not_hold_the_drain() {
    let echo = plain_upstream("echo", None).await;
    let svcs = services(&[("echo", &[echo.addr])]);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let ep = EntryPointSpec {
        name: "ep".into(),
        address: addr,
        tls: false,
        client_ca_file: None,
        trusted_ips: vec![],
        limits: Default::default(),
        also_plain: false,
        as_default: false,
        proxy_protocol: None,
    };
    let proxy = Arc::new(Proxy::new(
        vec![ep],
        vec![],
        HashMap::new(),
        HashMap::new(),
        &svcs,
    ));
    proxy.set_tcp_routers(vec![tcp(
        "all",
        "HostSNI(`*`)",
        "echo",
        TlsMode::Plain,
        None,
    )]);
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(proxy.serve_until("ep".into(), l, None, stop.clone()));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"first\n").await.unwrap();
    assert_eq!(read_line(&mut s).await.expect("answer"), "echo: first");
    stop.cancel();
    let drain = serving.await.expect("serve_until");
    let started = std::time::Instant::now();
    assert!(
        drain.finish(std::time::Duration::from_secs(5)).await,
        "drain finished"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    // The relay itself goes on.
    s.write_all(b"second\n").await.unwrap();
    assert_eq!(read_line(&mut s).await.expect("answer"), "echo: second");
}

/// Traefik's TCP middlewares, honoured (its reference: routing/tcp/middlewares): an `ipAllowList`
/// that leaves this client out closes its connection before any upstream is contacted, one
/// that includes it serves it; `inFlightConn` holds one client address to N connections at
/// once, refusing the next until one closes, across a reload of the routers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_allow_lists_and_in_flight_limits_are_honoured() {
    let echo = plain_upstream("echo", None).await;
    let svcs = services(&[("echo", &[echo.addr])]);
    let guarded = |allow: &[&str], in_flight: Option<u32>| {
        let mut r = tcp("guarded", "HostSNI(`*`)", "echo", TlsMode::Plain, None);
        r.guards.allow = vec![allow.iter().map(|a| a.parse().expect("cidr")).collect()];
        r.guards.in_flight_per_ip = in_flight;
        r
    };
    // Out of the list: closed, the upstream never contacted.
    let before = echo.accepted.load(Ordering::SeqCst);
    let (_p, addr) = start(None, vec![], vec![guarded(&["192.0.2.0/24"], None)], &svcs).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    closed(&mut s).await;
    assert_eq!(echo.accepted.load(Ordering::SeqCst), before);
    // In it: served.
    let (p, addr) = start(
        None,
        vec![],
        vec![guarded(&["192.0.2.0/24", "127.0.0.0/8"], Some(2))],
        &svcs,
    )
    .await;
    let mut a = TcpStream::connect(addr).await.unwrap();
    assert_eq!(exchange_open(&mut a, "one").await, "echo: one");
    let mut b = TcpStream::connect(addr).await.unwrap();
    assert_eq!(exchange_open(&mut b, "two").await, "echo: two");
    // A third from the same address: closed while two are open, even after a reload.
    p.set_tcp_routers(vec![guarded(&["127.0.0.0/8"], Some(2))]);
    let mut c = TcpStream::connect(addr).await.unwrap();
    closed(&mut c).await;
    drop(a);
    // The count follows the closed connection down (its task ends when the relay does).
    let t = Instant::now();
    loop {
        let mut d = TcpStream::connect(addr).await.unwrap();
        d.write_all(b"three\n").await.unwrap();
        if let Ok(Ok(line)) = tokio::time::timeout(Duration::from_secs(1), read_line(&mut d)).await
        {
            assert_eq!(line, "echo: three");
            break;
        }
        assert!(t.elapsed() < WAIT, "a freed place never came back");
    }
    drop(b);
}

/// Sends one line and reads the answer, leaving the connection open.
async fn exchange_open(s: &mut TcpStream, line: &str) -> String {
    s.write_all(format!("{line}\n").as_bytes()).await.unwrap();
    tokio::time::timeout(WAIT, read_line(s))
        .await
        .expect("answer in time")
        .expect("answer")
}

//! TLS entry points with real handshakes: HTTP/2 over TLS through ALPN, SNI choosing the
//! certificate, the default certificate, and mTLS refusing a client without a certificate.
//! Certificates are made by rcgen for the test (a CA, two servers, a client).
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb_userspace::{
    model::instance::{Instance, Services},
    model::{
        l7::{CertSpec, EntryPointSpec, RouterSpec},
        rule::Rule,
    },
    proxy::{
        tls::{server_config, Certs},
        Proxy,
    },
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

struct Pki {
    dir: PathBuf,
    ca_der: CertificateDer<'static>,
    a_der: CertificateDer<'static>,
    b_der: CertificateDer<'static>,
    client: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    /// A new certificate and key for `names`, signed by the test CA, written to `crt` and `key`
    /// the way careful tools do it (a temporary file renamed over the old one).
    fn issue_to(&self, names: &[&str], crt: &Path, key: &Path) -> CertificateDer<'static> {
        let k = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&k, &self.ca, &self.ca_key)
            .unwrap();
        for (path, text) in [(key, k.serialize_pem()), (crt, cert.pem())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        cert.der().clone()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pki(tag: &str) -> Pki {
    let dir = std::env::temp_dir().join(format!("lb-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A name of its own: with rcgen's default one the leaves' issuer equals their subject, which
    // OpenSSL (curl) takes for self-signed.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "lb test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |names: &[&str], file: &str| {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        (cert, key)
    };
    let (a, _) = leaf(&["a.test"], "a");
    let (b, _) = leaf(&["*.b.test"], "b");
    let (c, ckey) = leaf(&["client"], "client");
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    Pki {
        ca_der: ca.der().clone(),
        a_der: a.der().clone(),
        b_der: b.der().clone(),
        client: (
            vec![c.der().clone()],
            PrivateKeyDer::try_from(ckey.serialize_der()).unwrap(),
        ),
        dir,
        ca,
        ca_key,
    }
}

async fn upstream() -> SocketAddr {
    upstream_tagged("").await
}

/// An upstream whose answers start with `tag`, so a test sees which service answered.
async fn upstream_tagged(tag: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let proto = req
                            .headers()
                            .get("x-forwarded-proto")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_string();
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                            "{tag}ok proto={proto}"
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

async fn tls_proxy(p: &Pki, mtls: bool) -> SocketAddr {
    let up = upstream().await;
    let mut services = Services::new();
    let i = Instance {
        address: up.ip(),
        port: up.port(),
        weight: 1,
        zone: None,
        metadata: BTreeMap::new(),
    };
    services.insert("s".into(), BTreeMap::from([(i.key(), i)]));
    let certs = Certs::load(&[
        CertSpec {
            cert_file: p.dir.join("a.crt"),
            key_file: p.dir.join("a.key"),
            default: false,
        },
        CertSpec {
            cert_file: p.dir.join("b.crt"),
            key_file: p.dir.join("b.key"),
            default: true,
        },
    ])
    .expect("certificates");
    let ca = p.dir.join("ca.crt");
    let config = server_config(Arc::new(certs), mtls.then_some(ca.as_path())).expect("tls config");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let router = RouterSpec {
        name: "all".into(),
        entrypoints: vec![],
        rule: Rule::parse("PathPrefix(`/`)").unwrap(),
        rule_text: "PathPrefix(`/`)".into(),
        priority: None,
        service: "s".into(),
        middlewares: vec![],
        tls: None,
        tls_options: None,
    };
    let ep = EntryPointSpec {
        name: "websecure".into(),
        address: addr,
        tls: true,
        client_ca_file: None,
        trusted_ips: vec![],
        limits: Default::default(),
        also_plain: false,
        as_default: false,
        proxy_protocol: None,
    };
    let proxy = Arc::new(Proxy::new(
        vec![ep],
        vec![router],
        Default::default(),
        Default::default(),
        &services,
    ));
    tokio::spawn(proxy.serve(
        "websecure".into(),
        l,
        Some(Arc::new(arc_swap::ArcSwap::new(config))),
    ));
    addr
}

/// A TLS connection as a client with `sni`, offering `alpn`, optionally with a client cert.
async fn connect(
    p: &Pki,
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
    client_cert: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(p.ca_der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = if client_cert {
        builder
            .with_client_auth_cert(p.client.0.clone(), p.client.1.clone_key())
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
}

async fn h2_get(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
) -> Result<(u16, String), hyper::Error> {
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get("https://a.test/")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await?;
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_tls_with_alpn_and_sni() {
    let p = pki("sni");
    let addr = tls_proxy(&p, false).await;
    // ALPN h2, SNI a.test: a's certificate, an HTTP/2 exchange, X-Forwarded-Proto https.
    let s = connect(&p, addr, "a.test", &[b"h2", b"http/1.1"], false)
        .await
        .expect("handshake");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(s.get_ref().1.peer_certificates().unwrap()[0], p.a_der);
    assert_eq!(
        h2_get(s).await.expect("h2 request"),
        (200, "ok proto=https".into())
    );
    // A wildcard certificate serves its subdomains.
    let s = connect(&p, addr, "x.b.test", &[b"http/1.1"], false)
        .await
        .expect("handshake");
    assert_eq!(s.get_ref().1.peer_certificates().unwrap()[0], p.b_der);
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    // An unknown name gets the default certificate (b), which the client then rejects for the
    // name: the handshake fails on the client's side, as it must.
    assert!(connect(&p, addr, "unknown.test", &[b"h2"], false)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_a_client_without_a_certificate() {
    let p = pki("mtls");
    let addr = tls_proxy(&p, true).await;
    // Without a client certificate: the handshake (TLS 1.2) or the first exchange (TLS 1.3,
    // where the server's verdict arrives after the client's Finished) fails.
    let refused = match connect(&p, addr, "a.test", &[b"h2"], false).await {
        Err(_) => true,
        Ok(s) => h2_get(s).await.is_err(),
    };
    assert!(refused, "a client without a certificate got an answer");
    let s = connect(&p, addr, "a.test", &[b"h2"], true)
        .await
        .expect("handshake with a client certificate");
    assert_eq!(h2_get(s).await.expect("request").0, 200);
}

#[test]
fn sni_choice_and_the_default_certificate() {
    let p = pki("default");
    let load = |default_b: bool| {
        Certs::load(&[
            CertSpec {
                cert_file: p.dir.join("a.crt"),
                key_file: p.dir.join("a.key"),
                default: !default_b,
            },
            CertSpec {
                cert_file: p.dir.join("b.crt"),
                key_file: p.dir.join("b.key"),
                default: default_b,
            },
        ])
        .expect("certificates")
    };
    let certs = load(true);
    let leaf = |n: Option<&str>| certs.for_name(n).map(|k| k.cert[0].clone());
    assert_eq!(leaf(Some("a.test")), Some(p.a_der.clone()));
    assert_eq!(leaf(Some("deep.b.test")), Some(p.b_der.clone()), "wildcard");
    assert_eq!(
        leaf(Some("unknown.test")),
        Some(p.b_der.clone()),
        "unknown name: the default"
    );
    assert_eq!(leaf(None), Some(p.b_der.clone()), "no SNI: the default");
    assert_eq!(
        load(false)
            .for_name(Some("unknown.test"))
            .map(|k| k.cert[0].clone()),
        Some(p.a_der.clone())
    );
    // A key that does not belong to the certificate is refused at load time.
    let bad = Certs::load(&[CertSpec {
        cert_file: p.dir.join("a.crt"),
        key_file: p.dir.join("b.key"),
        default: false,
    }]);
    assert!(bad.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_ca_issues_certificates_that_survive_a_restart() {
    use lb_userspace::proxy::tls::DevCa;
    let p = pki("devca");
    let state = p.dir.join("state");
    let certs = Certs::load(&[CertSpec {
        cert_file: p.dir.join("a.crt"),
        key_file: p.dir.join("a.key"),
        default: false,
    }])
    .expect("certs")
    .with_dev_ca(DevCa::open(&state).expect("dev CA"));
    // A configured certificate still wins for its name.
    assert_eq!(
        certs.for_name(Some("a.test")).map(|k| k.cert[0].clone()),
        Some(p.a_der.clone())
    );
    // Any other name gets a certificate from the dev CA that a client trusting dev-ca.crt accepts.
    let trust = |name: &str, certs: &Certs| {
        let key = certs.for_name(Some(name)).expect("issued");
        let ca_pem = std::fs::read(state.join("dev-ca.crt")).expect("dev-ca.crt");
        let ca = rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem)
            .next()
            .expect("pem")
            .expect("der");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).expect("root");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        use rustls::client::danger::ServerCertVerifier as _;
        verifier
            .verify_server_cert(
                &key.cert[0],
                &key.cert[1..],
                &ServerName::try_from(name.to_string()).expect("name"),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .map(|_| ())
    };
    trust("dev.example", &certs)
        .expect("a certificate for dev.example, trusted through dev-ca.crt");
    // A restarted agent reuses the CA: new certificates chain to the same dev-ca.crt.
    let again = Certs::load(&[])
        .expect("certs")
        .with_dev_ca(DevCa::open(&state).expect("dev CA again"));
    trust("other.example", &again).expect("still trusted after a restart");
}

/// The `[[certificate]]` files of a running TLS entry point are replaced: new handshakes get the
/// new certificate within a bounded time, with the listener and lb.toml untouched. Garbage, or a
/// certificate whose key has not arrived yet, is refused and the previous certificate stays.
/// Driven as the agent drives it: `CertFilesWatch` → `Listeners::reload_certificates`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_reload_into_a_running_entry_point() {
    use lb_userspace::{agent::Listeners, proxy::tls::CertFilesWatch};
    let p = pki("reload");
    let live = p.dir.join("live");
    std::fs::create_dir_all(&live).unwrap();
    let (crt, key) = (live.join("site.crt"), live.join("site.key"));
    let v1 = p.issue_to(&["a.test"], &crt, &key);
    let text = format!(
        r#"
[agent]
state_dir = "{}"

[[entrypoint]]
name = "websecure"
address = "127.0.0.1:0"
tls = true

[[router]]
name = "all"
rule = "PathPrefix(`/`)"
service = "s"

[[certificate]]
cert_file = "{}"
key_file = "{}"
"#,
        p.dir.join("state").display(),
        crt.display(),
        key.display()
    );
    let cfg = lb_userspace::sources::config::parse(Path::new("reload.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}"));
    let up = upstream().await;
    let mut services = Services::new();
    let i = Instance {
        address: up.ip(),
        port: up.port(),
        weight: 1,
        zone: None,
        metadata: BTreeMap::new(),
    };
    services.insert("s".into(), BTreeMap::from([(i.key(), i)]));
    let proxy = Arc::new(Proxy::new(
        cfg.entrypoints.clone(),
        cfg.routers.clone(),
        cfg.http_services.clone(),
        Default::default(),
        &services,
    ));
    let mut listeners = Listeners::default();
    listeners.reconcile(&proxy, &cfg).await.expect("listeners");
    let addr = listeners.local_addr("websecure").unwrap();
    // The agent's loop, reporting each reload's outcome.
    let (tx, mut outcomes) = tokio::sync::mpsc::unbounded_channel();
    let mut watch = CertFilesWatch::new(&cfg.certificates);
    let follower = tokio::spawn(async move {
        loop {
            watch.changed().await;
            let _ = tx.send(
                listeners
                    .reload_certificates(&proxy, &cfg)
                    .map_err(|e| e.to_string()),
            );
        }
    });
    let served = || async {
        let s = connect(&p, addr, "a.test", &[b"http/1.1"], false)
            .await
            .expect("handshake");
        s.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    let wait_for = |want: CertificateDer<'static>, what: &'static str| {
        let served = &served;
        async move {
            let start = Instant::now();
            while served().await != want {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "{what}: not served"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(served().await, v1);

    // Replaced by rename (key, then certificate).
    let v2 = p.issue_to(&["a.test"], &crt, &key);
    wait_for(v2.clone(), "the replaced certificate").await;
    let reloaded = tokio::time::timeout(Duration::from_secs(10), outcomes.recv())
        .await
        .expect("the reload's outcome")
        .unwrap();
    assert!(reloaded.is_ok(), "{reloaded:?}");

    // Garbage written in place: refused, the previous certificate stays.
    std::fs::write(&crt, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), outcomes.recv())
        .await
        .expect("a reload attempt")
        .unwrap();
    assert!(refused.is_err(), "garbage accepted");
    assert_eq!(served().await, v2, "garbage replaced the certificate");

    // Half a pair: a new certificate whose key has not arrived does not load either …
    let k3 = KeyPair::generate().unwrap();
    let c3 = CertificateParams::new(vec!["a.test".to_string()])
        .unwrap()
        .signed_by(&k3, &p.ca, &p.ca_key)
        .unwrap();
    std::fs::write(&crt, c3.pem()).unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), outcomes.recv())
        .await
        .expect("a reload attempt")
        .unwrap();
    assert!(refused.unwrap_err().contains("does not match"));
    assert_eq!(served().await, v2);
    // … and the pair is served once the key follows.
    std::fs::write(&key, k3.serialize_pem()).unwrap();
    wait_for(c3.der().clone(), "the completed pair").await;
    follower.abort();
}

/// curl, an independent client, proves the wire format: HTTP/2 over TLS by ALPN with the
/// certificate verified for the name, TLS 1.2 refused below, and HTTP/1.1 when asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_speaks_http2_and_tls_as_negotiated() {
    let p = pki("curl");
    let addr = tls_proxy(&p, false).await;
    let ca = p.dir.join("ca.crt");
    let curl = |args: Vec<String>| async move {
        tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args)
            .output()
            .await
            .expect("curl runs (apt install curl)")
    };
    let resolve = format!("a.test:{}:127.0.0.1", addr.port());
    let url = format!("https://a.test:{}/x", addr.port());
    let out = curl(vec![
        "--http2".into(),
        "--cacert".into(),
        ca.display().to_string(),
        "--resolve".into(),
        resolve.clone(),
        "-w".into(),
        "\n%{http_version} %{ssl_verify_result}".into(),
        url.clone(),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text, "ok proto=https\n2 0", "HTTP/2, certificate verified");
    let out = curl(vec![
        "--http1.1".into(),
        "--cacert".into(),
        ca.display().to_string(),
        "--resolve".into(),
        resolve.clone(),
        "-w".into(),
        "\n%{http_version}".into(),
        url.clone(),
    ])
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok proto=https\n1.1");
    let out = curl(vec![
        "--tls-max".into(),
        "1.1".into(),
        "--cacert".into(),
        ca.display().to_string(),
        "--resolve".into(),
        resolve,
        url,
    ])
    .await;
    assert!(!out.status.success(), "TLS 1.1 is refused");
}

/// One HTTP/1.1 GET on `stream` (plain or TLS) for `a.test`, the connection closed after:
/// status and body.
async fn h1_get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: S,
    path: &str,
) -> (u16, String) {
    request(stream, "a.test", path).await
}

/// Traefik's entry points take TLS and plain HTTP on one port, and its routers serve one kind
/// (`tls` or not). On such an entry point (a Traefik install configuration's) lb tells the two
/// apart by the first byte, and a plain router never answers a TLS request, nor the other way:
/// otherwise a router without the TLS router's middlewares (its authentication, say) could
/// answer what the TLS router guards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_port_serves_tls_and_plain_routers_each_their_own_kind() {
    let p = pki("dual");
    let (secure, plain) = (
        upstream_tagged("secure ").await,
        upstream_tagged("plain ").await,
    );
    let mut services = Services::new();
    for (name, up) in [("s", secure), ("p", plain)] {
        let i = Instance {
            address: up.ip(),
            port: up.port(),
            weight: 1,
            zone: None,
            metadata: BTreeMap::new(),
        };
        services.insert(name.into(), BTreeMap::from([(i.key(), i)]));
    }
    let certs = Certs::load(&[CertSpec {
        cert_file: p.dir.join("a.crt"),
        key_file: p.dir.join("a.key"),
        default: true,
    }])
    .expect("certificates");
    let config = server_config(Arc::new(certs), None).expect("tls config");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let router = |name: &str, rule: &str, service: &str, tls: Option<bool>| RouterSpec {
        name: name.into(),
        entrypoints: vec![],
        rule: Rule::parse(rule).unwrap(),
        rule_text: rule.into(),
        priority: None,
        service: service.into(),
        middlewares: vec![],
        tls,
        tls_options: None,
    };
    let ep = EntryPointSpec {
        name: "web".into(),
        address: addr,
        tls: true,
        client_ca_file: None,
        trusted_ips: vec![],
        limits: Default::default(),
        also_plain: true,
        as_default: false,
        proxy_protocol: None,
    };
    let proxy = Arc::new(Proxy::new(
        vec![ep],
        vec![
            router("secure", "PathPrefix(`/`)", "s", Some(true)),
            router("plain", "PathPrefix(`/`)", "p", Some(false)),
            // lb.toml's kind: either.
            RouterSpec {
                priority: Some(1000),
                ..router("either", "Path(`/either`)", "p", None)
            },
        ],
        Default::default(),
        Default::default(),
        &services,
    ));
    tokio::spawn(proxy.serve(
        "web".into(),
        l,
        Some(Arc::new(arc_swap::ArcSwap::new(config))),
    ));
    let tls = connect(&p, addr, "a.test", &[b"http/1.1"], false)
        .await
        .expect("a TLS handshake on the shared port");
    assert_eq!(
        h1_get(tls, "/").await,
        (200, "secure ok proto=https".into())
    );
    let s = connect(&p, addr, "a.test", &[b"h2"], false).await.unwrap();
    assert_eq!(
        h2_get(s).await.expect("h2 over TLS"),
        (200, "secure ok proto=https".into())
    );
    let tcp = TcpStream::connect(addr).await.unwrap();
    assert_eq!(h1_get(tcp, "/").await, (200, "plain ok proto=http".into()));
    for tls in [false, true] {
        let got = if tls {
            h1_get(
                connect(&p, addr, "a.test", &[], false).await.unwrap(),
                "/either",
            )
            .await
        } else {
            h1_get(TcpStream::connect(addr).await.unwrap(), "/either").await
        };
        let proto = if tls { "https" } else { "http" };
        assert_eq!(got, (200, format!("plain ok proto={proto}")), "tls {tls}");
    }
}

/// `passTLSClientCert` with `pem` (Traefik's middlewares/http/passtlsclientcert): behind an mTLS
/// entry point the upstream gets the client's certificate in `X-Forwarded-Tls-Client-Cert`
/// (base64 DER, URL-escaped), never what the client itself sent in that header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_certificate_is_passed_on_and_never_forged() {
    use lb_userspace::model::middleware::{MiddlewareConfig, PassTlsClientCertConfig};
    let p = pki("passcert");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let h = |k: &str| {
                            req.headers()
                                .get(k)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_string()
                        };
                        let got = format!(
                            "{}|{}",
                            h("x-forwarded-tls-client-cert"),
                            h("x-forwarded-tls-client-cert-info")
                        );
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(got))))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let mut services = Services::new();
    let i = Instance {
        address: up.ip(),
        port: up.port(),
        weight: 1,
        zone: None,
        metadata: BTreeMap::new(),
    };
    services.insert("s".into(), BTreeMap::from([(i.key(), i)]));
    let certs = Certs::load(&[CertSpec {
        cert_file: p.dir.join("a.crt"),
        key_file: p.dir.join("a.key"),
        default: true,
    }])
    .expect("certificates");
    let ca = p.dir.join("ca.crt");
    let config = server_config(Arc::new(certs), Some(ca.as_path())).expect("tls config");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    use lb_userspace::model::middleware::{CertInfoConfig, DnFields};
    let cn = DnFields {
        common_name: true,
        country: true,
        ..Default::default()
    };
    let mw = MiddlewareConfig::PassTlsClientCert(PassTlsClientCertConfig {
        pem: true,
        info: Some(CertInfoConfig {
            not_before: true,
            sans: true,
            subject: Some(cn.clone()),
            issuer: Some(cn),
            ..Default::default()
        }),
    })
    .build()
    .unwrap();
    let proxy = Arc::new(Proxy::new(
        vec![EntryPointSpec {
            name: "websecure".into(),
            address: addr,
            tls: true,
            client_ca_file: Some(ca.clone()),
            trusted_ips: vec![],
            limits: Default::default(),
            also_plain: false,
            as_default: false,
            proxy_protocol: None,
        }],
        vec![RouterSpec {
            name: "all".into(),
            entrypoints: vec![],
            rule: Rule::parse("PathPrefix(`/`)").unwrap(),
            rule_text: "PathPrefix(`/`)".into(),
            priority: None,
            service: "s".into(),
            middlewares: vec!["pass".into()],
            tls: None,
            tls_options: None,
        }],
        Default::default(),
        std::collections::HashMap::from([("pass".to_string(), mw)]),
        &services,
    ));
    tokio::spawn(proxy.serve(
        "websecure".into(),
        l,
        Some(Arc::new(arc_swap::ArcSwap::new(config))),
    ));
    use base64::Engine as _;
    // Traefik 3's forms (middlewares/http/passtlsclientcert): the certificate's base64 as it is,
    // the fields query-escaped.
    let pem = base64::engine::general_purpose::STANDARD.encode(p.client.0[0].as_ref());
    let nb = {
        use x509_parser::prelude::FromDer as _;
        let (_, c) = x509_parser::prelude::X509Certificate::from_der(p.client.0[0].as_ref())
            .expect("the test's certificate");
        c.validity().not_before.timestamp()
    };
    let info = format!(
        "Subject%3D%22CN%3Drcgen+self+signed+cert%22%3BIssuer%3D%22CN%3Dlb+test+CA%22%3BNB%3D%22{nb}%22%3BSAN%3D%22client%22"
    );
    let want = format!("{pem}|{info}");
    let s = connect(&p, addr, "a.test", &[b"http/1.1"], true)
        .await
        .expect("handshake with a client certificate");
    assert_eq!(h1_get(s, "/").await, (200, want.clone()));
    // A forged header is replaced by the certificate the client showed.
    let mut s = connect(&p, addr, "a.test", &[b"http/1.1"], true)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-Tls-Client-Cert: forged\r\nX-Forwarded-Tls-Client-Cert-Info: Subject%3D%22CN%3Dadmin%22\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.ends_with(&want), "{text}");
}

/// A TLS client: `sni`, `alpn`, a client certificate or not, TLS 1.2 only or both versions,
/// and whether it checks the server's certificate (a client that does not sees what the server
/// refused, not its own refusal of the certificate).
async fn dial(
    p: &Pki,
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
    client_cert: Option<&(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    tls12_only: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(p.ca_der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match tls12_only {
        true => &[&rustls::version::TLS12],
        false => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await?;
    // TLS 1.3 reports a refused client certificate after the handshake: one read shows it.
    use tokio::io::AsyncWriteExt as _;
    s.flush().await?;
    Ok(s)
}

/// One HTTP/1.1 GET of `/` for `host` on `stream`: status and body, 0 when no answer came.
async fn get_host<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: S,
    host: &str,
) -> (u16, String) {
    request(stream, host, "/").await
}

/// One HTTP/1.1 GET, the connection closed after: status and body (0 when no answer came,
/// the write refused included: a handshake the server refused shows there in TLS 1.3).
async fn request<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    host: &str,
    path: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// Traefik's `tls.options` applied per router (routing-configuration/http/tls/tls-options.md):
/// the client's SNI chooses the options of the routers whose `Host` names it, the rest get
/// `default`; a router answers only connections made under its own options (421 otherwise,
/// Traefik's SNI check), so a Host header cannot lead past a client-certificate requirement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_options_are_chosen_by_sni_and_each_router_holds_to_its_own() {
    let p = pki("options");
    let up = upstream_tagged("site ").await;
    let text = format!(
        r#"
http:
  routers:
    guarded:
      rule: "Host(`a.test`)"
      service: s
      tls:
        options: mtls
    modern:
      rule: "Host(`new.b.test`)"
      service: s
      tls:
        options: modern
    given:
      rule: "Host(`given.b.test`)"
      service: s
      tls:
        options: given
    anycert:
      rule: "Host(`any.b.test`)"
      service: s
      tls:
        options: anycert
    legacy:
      rule: "Host(`old.b.test`)"
      service: s
      tls:
        options: legacy
    plain:
      rule: "Host(`www.b.test`)"
      service: s
      tls: {{}}
  services:
    s:
      loadBalancer:
        servers:
          - url: "http://{up}"
tls:
  options:
    mtls:
      clientAuth:
        caFiles: ["{ca}"]
        clientAuthType: RequireAndVerifyClientCert
    modern:
      minVersion: VersionTLS13
    given:
      clientAuth:
        caFiles: ["{ca}"]
        clientAuthType: VerifyClientCertIfGiven
    anycert:
      clientAuth:
        clientAuthType: RequireAnyClientCert
    legacy:
      maxVersion: VersionTLS12
      cipherSuites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_RSA_WITH_AES_128_CBC_SHA]
      curvePreferences: [CurveP384]
      alpnProtocols: [http/1.1]
    default:
      sniStrict: true
"#,
        ca = p.dir.join("ca.crt").display()
    );
    let doc =
        lb_userspace::sources::file::parse_any(Path::new("options.yml"), &text).expect("valid");
    let said = doc.unsupported.join("\n");
    assert!(
        said.contains("TLS_RSA_WITH_AES_128_CBC_SHA: not offered"),
        "a suite lb lacks is said, the rest applies: {said}"
    );
    let certs = Certs::load(&[
        CertSpec {
            cert_file: p.dir.join("a.crt"),
            key_file: p.dir.join("a.key"),
            default: false,
        },
        CertSpec {
            cert_file: p.dir.join("b.crt"),
            key_file: p.dir.join("b.key"),
            default: true,
        },
    ])
    .expect("certificates");
    let config = server_config(Arc::new(certs), None).expect("tls config");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let ep = EntryPointSpec {
        name: "websecure".into(),
        address: addr,
        tls: true,
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
        Default::default(),
        Default::default(),
        &Services::new(),
    ));
    let problems = proxy.set_dynamic("file", doc.routing);
    assert!(problems.is_empty(), "{problems:?}");
    proxy.update_services(&doc.services);
    tokio::spawn(proxy.clone().serve(
        "websecure".into(),
        l,
        Some(Arc::new(arc_swap::ArcSwap::new(config))),
    ));
    let h1: &[&[u8]] = &[b"http/1.1"];

    // clientAuth: without a certificate nothing is answered; with one, the router answers.
    let without = match dial(&p, addr, "a.test", h1, None, false).await {
        Ok(s) => get_host(s, "a.test").await.0,
        Err(_) => 0,
    };
    assert_eq!(without, 0, "no answer without a client certificate");
    let s = dial(&p, addr, "a.test", h1, Some(&p.client), false)
        .await
        .expect("handshake with a client certificate");
    assert_eq!(
        get_host(s, "a.test").await,
        (200, "site ok proto=https".into())
    );
    // A connection made under default (SNI www.b.test) cannot reach the guarded router by its
    // Host header, nor one made under other options.
    for sni in ["www.b.test", "new.b.test"] {
        let s = dial(&p, addr, sni, h1, None, false).await.expect(sni);
        assert_eq!(get_host(s, "a.test").await.0, 421, "{sni}");
    }
    let s = dial(&p, addr, "www.b.test", h1, None, false).await.unwrap();
    assert_eq!(get_host(s, "www.b.test").await.0, 200);

    // VerifyClientCertIfGiven: none is fine, one of the CA's is fine, another CA's is refused.
    // RequireAnyClientCert: one is required, whoever signed it.
    let stranger = {
        let k = KeyPair::generate().unwrap();
        let c = CertificateParams::new(vec!["stranger".to_string()])
            .unwrap()
            .self_signed(&k)
            .unwrap();
        (
            vec![c.der().clone()],
            PrivateKeyDer::try_from(k.serialize_der()).unwrap(),
        )
    };
    for (sni, cert, want) in [
        ("given.b.test", None, 200),
        ("given.b.test", Some(&p.client), 200),
        ("given.b.test", Some(&stranger), 0),
        ("any.b.test", None, 0),
        ("any.b.test", Some(&stranger), 200),
    ] {
        let got = match dial(&p, addr, sni, h1, cert, false).await {
            Ok(s) => get_host(s, sni).await.0,
            Err(_) => 0,
        };
        assert_eq!(got, want, "{sni} with {:?}", cert.map(|c| c.0.len()));
    }

    // minVersion VersionTLS13: a TLS 1.2 client gets no handshake, a 1.3 one gets 1.3.
    assert!(dial(&p, addr, "new.b.test", h1, None, true).await.is_err());
    let s = dial(&p, addr, "new.b.test", h1, None, false).await.unwrap();
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(get_host(s, "new.b.test").await.0, 200);

    // maxVersion, cipherSuites, curvePreferences and alpnProtocols, as negotiated.
    let s = dial(&p, addr, "old.b.test", &[b"h2", b"http/1.1"], None, false)
        .await
        .expect("legacy handshake");
    {
        let c = s.get_ref().1;
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
        assert_eq!(
            format!("{:?}", c.negotiated_cipher_suite().map(|s| s.suite())),
            "Some(TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)"
        );
        assert_eq!(
            c.negotiated_key_exchange_group().map(|g| g.name()),
            Some(rustls::NamedGroup::secp384r1)
        );
        assert_eq!(
            c.alpn_protocol(),
            Some(&b"http/1.1"[..]),
            "h2 is not offered"
        );
    }
    assert_eq!(get_host(s, "old.b.test").await.0, 200);

    // sniStrict on default: a name lb has no certificate for gets no default certificate.
    // The client here accepts any certificate, so the refusal seen is the server's.
    let any = {
        #[derive(Debug)]
        struct Any(Arc<rustls::crypto::CryptoProvider>);
        impl rustls::client::danger::ServerCertVerifier for Any {
            fn verify_server_cert(
                &self,
                _: &CertificateDer<'_>,
                _: &[CertificateDer<'_>],
                _: &ServerName<'_>,
                _: &[u8],
                _: rustls::pki_types::UnixTime,
            ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                m: &[u8],
                c: &CertificateDer<'_>,
                d: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                rustls::crypto::verify_tls12_signature(
                    m,
                    c,
                    d,
                    &self.0.signature_verification_algorithms,
                )
            }
            fn verify_tls13_signature(
                &self,
                m: &[u8],
                c: &CertificateDer<'_>,
                d: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                rustls::crypto::verify_tls13_signature(
                    m,
                    c,
                    d,
                    &self.0.signature_verification_algorithms,
                )
            }
            fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
                self.0.signature_verification_algorithms.supported_schemes()
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let c = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Any(provider)))
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(c))
    };
    for (sni, served) in [("www.b.test", true), ("nothing.test", false)] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let got = any
            .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
            .await;
        assert_eq!(got.is_ok(), served, "{sni}: {:?}", got.err());
    }

    // Options that change apply to connections made before: their next request is sent back
    // to connect again (421), a new connection is served.
    let s = dial(&p, addr, "new.b.test", h1, None, false).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let ask = || {
        Request::get("/")
            .header("host", "new.b.test")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let first = send.send_request(ask()).await.unwrap();
    assert_eq!(first.status().as_u16(), 200);
    let _ = first.into_body().collect().await;
    let changed = text.replace(
        "      minVersion: VersionTLS13\n",
        "      minVersion: VersionTLS13\n      curvePreferences: [X25519]\n",
    );
    assert_ne!(changed, text);
    let doc =
        lb_userspace::sources::file::parse_any(Path::new("options.yml"), &changed).expect("valid");
    assert!(proxy.set_dynamic("file", doc.routing).is_empty());
    let again = send.send_request(ask()).await.unwrap();
    assert_eq!(again.status().as_u16(), 421, "made under the old options");
    let s = dial(&p, addr, "new.b.test", h1, None, false).await.unwrap();
    assert_eq!(get_host(s, "new.b.test").await.0, 200);

    // Broken default options (another provider's, its CA file unreadable): no handshake falls
    // back to lb's own policy in their place.
    let broken = "tls:\n  options:\n    default:\n      clientAuth:\n        caFiles: [\"/nonexistent/ca.pem\"]\n";
    let doc = lb_userspace::sources::file::parse_any(Path::new("broken.yml"), broken)
        .expect("the document reads; its options are broken");
    proxy.set_dynamic("zz", doc.routing);
    assert!(dial(&p, addr, "www.b.test", h1, None, false).await.is_err());
    let s = dial(&p, addr, "new.b.test", h1, None, false).await.unwrap();
    assert_eq!(
        get_host(s, "new.b.test").await.0,
        200,
        "its own options still serve"
    );
}

//! ACME against a real CA: Debian's `pebble` (the ACME test server), with
//! `pebble-challtestsrv` as its DNS server so the test names resolve to 127.0.0.1, and pebble's
//! validation ports pointed at the proxy's entry points. The proxy is wired as the agent wires
//! it (config parsed from TOML, `Listeners`, the `Acme` client filling the proxy's store), so
//! pebble really validates through it: HTTP-01 on the plain entry point, TLS-ALPN-01 on the TLS
//! one. The issued certificates are then checked from a client's side: a handshake chained to
//! pebble's root (fetched from its management API) and a request through the proxy.
//!
//! Everything listens on 127.0.0.1; pebble and the DNS server are killed and the temporary
//! directory removed by Drop guards, whatever the outcome. Every wait is bounded.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb_tests::daemons::{free_port, TempDir};
use lb_userspace::{
    agent::Listeners,
    model::instance::{Instance, Services},
    proxy::{
        acme::{Acme, Store},
        Proxy,
    },
    sources::config::{self, Config},
};
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

const BOUND: Duration = Duration::from_secs(90);

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn require(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} is missing: `apt-get install pebble` (.ci/run installs it)"
    );
}

async fn wait_tcp(port: u16, what: &str, child: &mut Proc) {
    let start = Instant::now();
    loop {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("{what} exited: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what} not listening on {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// pebble's own HTTPS certificate (for 127.0.0.1), signed by a CA the ACME client is given as
/// `ca_file`.
struct PebblePki {
    ca_file: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    ca_der: CertificateDer<'static>,
}

fn pebble_pki(dir: &Path) -> PebblePki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA for pebble's listener");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let p = PebblePki {
        ca_file: dir.join("pebble-ca.pem"),
        cert: dir.join("pebble.crt"),
        key: dir.join("pebble.key"),
        ca_der: ca.der().clone(),
    };
    std::fs::write(&p.ca_file, ca.pem()).unwrap();
    std::fs::write(&p.cert, leaf.pem()).unwrap();
    std::fs::write(&p.key, key.serialize_pem()).unwrap();
    p
}

/// pebble and its DNS server, validating on the given ports of 127.0.0.1.
struct Pebble {
    mgmt_port: u16,
    /// pebble-challtestsrv's management API (plain HTTP): where the names resolve.
    dns_mgmt: u16,
    ca_der: CertificateDer<'static>,
    // Dropped (killed) in this order.
    _pebble: Proc,
    _dns: Proc,
}

/// Where pebble will listen, chosen before the proxy's config is written.
struct PebbleSetup {
    pki: PebblePki,
    acme_port: u16,
    mgmt_port: u16,
}

fn pebble_setup(dir: &Path) -> PebbleSetup {
    require("pebble");
    require("pebble-challtestsrv");
    PebbleSetup {
        pki: pebble_pki(dir),
        acme_port: free_port(),
        mgmt_port: free_port(),
    }
}

async fn start_pebble(
    dir: &Path,
    setup: &PebbleSetup,
    http_port: u16,
    tls_port: u16,
    validity: Option<u64>,
    answer_ip: &str,
) -> Pebble {
    let PebbleSetup {
        pki,
        acme_port,
        mgmt_port,
    } = setup;
    let (acme_port, mgmt_port) = (*acme_port, *mgmt_port);
    let (dns_port, dns_mgmt) = (free_port(), free_port());
    let dns_log = std::fs::File::create(dir.join("challtestsrv.log")).unwrap();
    let mut dns = Proc(
        Command::new("pebble-challtestsrv")
            .args([
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &format!("127.0.0.1:{dns_mgmt}"),
                "-defaultIPv4",
                answer_ip,
                "-defaultIPv6",
                "",
            ])
            .stdin(Stdio::null())
            .stdout(dns_log.try_clone().unwrap())
            .stderr(dns_log)
            .spawn()
            .expect("pebble-challtestsrv"),
    );
    wait_tcp(dns_port, "pebble-challtestsrv", &mut dns).await;
    let mut conf = serde_json::json!({
        "pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": pki.cert,
            "privateKey": pki.key,
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false
        }
    });
    if let Some(secs) = validity {
        conf["pebble"]["certificateValidityPeriod"] = secs.into();
    }
    let conf_path = dir.join("pebble.json");
    std::fs::write(&conf_path, conf.to_string()).unwrap();
    let log = std::fs::File::create(dir.join("pebble.log")).unwrap();
    let mut pebble = Proc(
        Command::new("pebble")
            .arg("-config")
            .arg(&conf_path)
            .args([
                "-dnsserver",
                &format!("127.0.0.1:{dns_port}"),
                "-strict=false",
            ])
            // No random sleeps before validating, every order validated afresh (no reused
            // authorizations: a renewal goes through the challenge again), no nonce rejections.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_AUTHZREUSE", "0")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("pebble"),
    );
    wait_tcp(acme_port, "pebble", &mut pebble).await;
    wait_tcp(mgmt_port, "pebble (management)", &mut pebble).await;
    Pebble {
        mgmt_port,
        dns_mgmt,
        ca_der: pki.ca_der.clone(),
        _pebble: pebble,
        _dns: dns,
    }
}

/// An upstream answering every request with "hello from upstream".
async fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                        "hello from upstream",
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// The agent's L7 side for `cfg`: the proxy (its one service pointing at `up`) and its
/// listeners.
async fn proxy_for(cfg: &Config, up: SocketAddr) -> (Arc<Proxy>, Listeners) {
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
    listeners.reconcile(&proxy, cfg).await.expect("listeners");
    (proxy, listeners)
}

fn config(state: &Path, acme: &str) -> Config {
    let text = format!(
        r#"
[agent]
state_dir = "{}"

[[entrypoint]]
name = "web"
address = "127.0.0.1:0"

[[entrypoint]]
name = "websecure"
address = "127.0.0.1:0"
tls = true

[[router]]
name = "all"
rule = "PathPrefix(`/`)"
service = "s"

{acme}
"#,
        state.display()
    );
    config::parse(Path::new("acme-test.toml"), &text).unwrap_or_else(|e| panic!("{e}"))
}

fn acme_section(p: &PebbleSetup, challenge: &str, domains: &[&str]) -> String {
    format!(
        "[acme]\ndirectory = \"https://127.0.0.1:{}/dir\"\nemail = \"ops@example.test\"\nchallenge = \"{challenge}\"\ndomains = {domains:?}\nca_file = \"{}\"\n",
        p.acme_port,
        p.pki.ca_file.display()
    )
}

fn lo(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A TLS client to `addr` with `sni`, trusting `roots`.
async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
}

/// GET `path` with `Host: host` over an established stream (HTTP/1.1).
async fn get<S>(stream: S, host: &str, path: &str) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get(path)
                .header("host", host)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .expect("response");
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// pebble's root and intermediate, from its management API.
async fn pebble_chain(p: &Pebble) -> (CertificateDer<'static>, CertificateDer<'static>) {
    let fetch = |path: &'static str| async move {
        let s = tls_connect(
            lo(p.mgmt_port),
            "127.0.0.1",
            std::slice::from_ref(&p.ca_der),
        )
        .await
        .expect("pebble management TLS");
        let (code, pem) = get(s, "127.0.0.1", path).await;
        assert_eq!(code, 200, "{path}: {pem}");
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM certificate")
    };
    (fetch("/roots/0").await, fetch("/intermediates/0").await)
}

/// Waits until every name has a certificate in `store`; fails early on a failed attempt.
async fn wait_issued(store: &Store, names: &[&str], stats: &lb_userspace::proxy::acme::Stats) {
    let start = Instant::now();
    while !names.iter().all(|n| store.certificate(n).is_some()) {
        assert_eq!(
            stats.failures.load(Ordering::Relaxed),
            0,
            "an ACME attempt failed (see the log above)"
        );
        assert!(start.elapsed() < BOUND, "no certificates after {BOUND:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A handshake for `name` chained to pebble's root, with pebble's intermediate sent along, and a
/// request through the proxy; returns the leaf certificate.
async fn check_served(
    addr: SocketAddr,
    name: &str,
    root: &CertificateDer<'static>,
    intermediate: &CertificateDer<'static>,
) -> CertificateDer<'static> {
    let s = tls_connect(addr, name, std::slice::from_ref(root))
        .await
        .unwrap_or_else(|e| panic!("{name}: handshake with pebble's root trusted: {e}"));
    let chain = s.get_ref().1.peer_certificates().unwrap().to_vec();
    assert!(
        chain[1..].contains(intermediate),
        "{name}: pebble's intermediate not in the served chain"
    );
    assert_eq!(
        get(s, name, "/").await,
        (200, "hello from upstream".to_string())
    );
    chain[0].clone()
}

fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("lb_userspace=debug")
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_issues_through_the_proxy_and_a_restart_reuses_the_certificates() {
    init_log();
    let tmp = TempDir::new("http01");
    let state = tmp.0.join("state");
    let up = upstream().await;
    let names = ["a.example.test", "b.example.test"];
    // pebble's ports go into the proxy's config, the proxy's ports into pebble's.
    let setup = pebble_setup(&tmp.0);
    let cfg = config(&state, &acme_section(&setup, "http-01", &names));
    let (proxy, listeners) = proxy_for(&cfg, up).await;
    let web = listeners.local_addr("web").unwrap().port();
    let websecure = listeners.local_addr("websecure").unwrap().port();
    let pebble = start_pebble(&tmp.0, &setup, web, websecure, None, "127.0.0.1").await;

    let mut client = Acme::new(
        cfg.acme.clone().unwrap(),
        &cfg.state_dir,
        proxy.acme_store(),
    );
    assert_eq!(client.load_stored(), 0, "nothing stored yet");
    let (stats, dir) = (client.stats(), client.dir().to_path_buf());
    let task = tokio::spawn(client.run());
    wait_issued(&proxy.acme_store(), &names, &stats).await;
    assert_eq!(stats.orders.load(Ordering::Relaxed), 2);

    let (root, intermediate) = pebble_chain(&pebble).await;
    let mut leaves = Vec::new();
    for n in names {
        leaves.push(check_served(lo(websecure), n, &root, &intermediate).await);
    }
    assert_ne!(leaves[0], leaves[1], "one certificate per name");
    // The plain entry point still routes everything else, challenge path included.
    let s = TcpStream::connect(("127.0.0.1", web)).await.unwrap();
    assert_eq!(
        get(s, "a.example.test", "/.well-known/acme-challenge/nope").await,
        (200, "hello from upstream".to_string())
    );
    // Stored: keys private, written whole (no temporary file left).
    use std::os::unix::fs::PermissionsExt as _;
    for f in ["account.json", "a.example.test.key", "b.example.test.key"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".tmp")));

    // A restart (a new client, a new store): the stored certificates serve at once, unchanged,
    // and nothing is ordered.
    task.abort();
    let _ = task.await;
    let store = Arc::new(Store::default());
    let mut again = Acme::new(cfg.acme.clone().unwrap(), &cfg.state_dir, store.clone());
    assert_eq!(again.load_stored(), 2);
    for (n, leaf) in names.iter().zip(&leaves) {
        assert_eq!(&store.certificate(n).expect("loaded").cert[0], leaf);
    }
    let stats = again.stats();
    let task = tokio::spawn(again.run());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        stats.orders.load(Ordering::Relaxed),
        0,
        "a stored certificate was ordered again"
    );
    assert_eq!(stats.failures.load(Ordering::Relaxed), 0);
    task.abort();
    // pebble restarts and forgets everything, the stored account included (and has a new
    // root). A garbage stored certificate is ordered again — the client creates a new account on
    // the way — validated through the proxy (so this client fills the proxy's store) and
    // replaced; the good one is kept.
    drop(pebble);
    let pebble = start_pebble(&tmp.0, &setup, web, websecure, None, "127.0.0.1").await;
    let old_account = std::fs::read(dir.join("account.json")).unwrap();
    std::fs::write(dir.join("b.example.test.crt"), "garbage").unwrap();
    let store = proxy.acme_store();
    store.clear();
    let mut third = Acme::new(cfg.acme.clone().unwrap(), &cfg.state_dir, store.clone());
    assert_eq!(third.load_stored(), 1);
    let stats = third.stats();
    let task = tokio::spawn(third.run());
    wait_issued(&store, &names, &stats).await;
    assert_eq!(stats.orders.load(Ordering::Relaxed), 1);
    assert_eq!(
        &store.certificate("a.example.test").unwrap().cert[0],
        &leaves[0]
    );
    assert_ne!(
        &store.certificate("b.example.test").unwrap().cert[0],
        &leaves[1]
    );
    assert_ne!(
        std::fs::read(dir.join("account.json")).unwrap(),
        old_account
    );
    let (root, intermediate) = pebble_chain(&pebble).await;
    check_served(lo(websecure), "b.example.test", &root, &intermediate).await;
    task.abort();
}

/// A Traefik setup's usual ACME (https/acme.md): a resolver in the install configuration, and
/// routers that name it (`tls.certResolver`) with no domains — their `Host` rules give the
/// names. Each is ordered and served; a router added later gets its certificate too, and a
/// router naming another resolver gets none from this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_naming_the_resolver_get_certificates_for_their_hosts() {
    init_log();
    let tmp = TempDir::new("routers");
    let up = upstream().await;
    let setup = pebble_setup(&tmp.0);
    let install = format!(
        "entryPoints:\n  web:\n    address: \"127.0.0.1:0\"\n  websecure:\n    address: \"127.0.0.1:0\"\n    \
         http:\n      tls: {{}}\n\
         certificatesResolvers:\n  le:\n    acme:\n      email: ops@example.test\n      \
         caServer: https://127.0.0.1:{}/dir\n      caCertificates: [{}]\n      \
         httpChallenge:\n        entryPoint: web\n",
        setup.acme_port,
        setup.pki.ca_file.display()
    );
    let mut cfg = config::parse(
        Path::new("lb.toml"),
        &format!(
            "[agent]\nstate_dir = \"{}\"\n",
            tmp.0.join("state").display()
        ),
    )
    .unwrap();
    lb_userspace::sources::traefik::install::apply(&mut cfg, &tmp.0.join("traefik.yml"), &install)
        .unwrap_or_else(|e| panic!("{e}"));
    let dynamic = |routers: &str| {
        let text = format!(
            "http:\n  routers:\n{routers}  services:\n    app:\n      loadBalancer:\n        servers:\n          - url: http://{up}\n"
        );
        lb_userspace::sources::file::parse_any(Path::new("dynamic.yml"), &text)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let router = |name: &str, host: &str, resolver: &str| {
        format!(
            "    {name}:\n      rule: Host(`{host}`) && PathPrefix(`/`)\n      service: app\n      \
             tls:\n        certResolver: {resolver}\n"
        )
    };
    let first = dynamic(&format!(
        "{}{}",
        router("a", "a.example.test", "le"),
        router("other", "c.example.test", "someone-else")
    ));
    assert_eq!(first.routing.acme.len(), 2, "{:?}", first.routing.acme);
    let (proxy, listeners) = proxy_for(&cfg, up).await;
    proxy.set_dynamic("file", first.routing.clone());
    proxy.update_services(&first.services);
    let web = listeners.local_addr("web").unwrap().port();
    let websecure = listeners.local_addr("websecure").unwrap().port();
    let pebble = start_pebble(&tmp.0, &setup, web, websecure, None, "127.0.0.1").await;
    let (wishes, rx) = tokio::sync::watch::channel(first.routing.acme.clone());
    let client = Acme::new(
        cfg.acme.clone().unwrap(),
        &cfg.state_dir,
        proxy.acme_store(),
    )
    .with_names(rx);
    let stats = client.stats();
    let task = tokio::spawn(client.run());
    wait_issued(&proxy.acme_store(), &["a.example.test"], &stats).await;
    let (root, intermediate) = pebble_chain(&pebble).await;
    check_served(lo(websecure), "a.example.test", &root, &intermediate).await;
    // A router added later (the provider's files changed).
    let second = dynamic(&format!(
        "{}{}{}",
        router("a", "a.example.test", "le"),
        router("b", "b.example.test", "le"),
        router("other", "c.example.test", "someone-else")
    ));
    proxy.set_dynamic("file", second.routing.clone());
    proxy.update_services(&second.services);
    wishes.send(second.routing.acme.clone()).unwrap();
    wait_issued(&proxy.acme_store(), &["b.example.test"], &stats).await;
    check_served(lo(websecure), "b.example.test", &root, &intermediate).await;
    assert_eq!(stats.orders.load(Ordering::Relaxed), 2, "a and b, not c");
    assert!(proxy.acme_store().certificate("c.example.test").is_none());
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_issues_and_renews_inside_the_window() {
    init_log();
    let tmp = TempDir::new("alpn");
    let state = tmp.0.join("state");
    let up = upstream().await;
    let names = ["c.example.test"];
    let setup = pebble_setup(&tmp.0);
    let cfg = config(&state, &acme_section(&setup, "tls-alpn-01", &names));
    let (proxy, listeners) = proxy_for(&cfg, up).await;
    let web = listeners.local_addr("web").unwrap().port();
    let websecure = listeners.local_addr("websecure").unwrap().port();
    // 30-second certificates: renewal is due halfway (renew_before_days = 30 is longer than the
    // whole life, so the half-life cap applies).
    let pebble = start_pebble(&tmp.0, &setup, web, websecure, Some(30), "127.0.0.1").await;
    assert_eq!(
        cfg.acme.as_ref().unwrap().renew_before,
        Duration::from_secs(30 * 86_400)
    );

    let client = Acme::new(
        cfg.acme.clone().unwrap(),
        &cfg.state_dir,
        proxy.acme_store(),
    );
    let stats = client.stats();
    let task = tokio::spawn(client.run());
    let store = proxy.acme_store();
    wait_issued(&store, &names, &stats).await;
    let (root, intermediate) = pebble_chain(&pebble).await;
    let first = check_served(lo(websecure), names[0], &root, &intermediate).await;
    assert_eq!(stats.orders.load(Ordering::Relaxed), 1);
    // A client offering acme-tls/1 without a pending challenge gets no handshake at all.
    {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        config.alpn_protocols = vec![b"acme-tls/1".to_vec()];
        let tcp = TcpStream::connect(("127.0.0.1", websecure)).await.unwrap();
        let r = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(names[0]).unwrap(), tcp)
            .await;
        assert!(r.is_err());
    }

    // Renewal: within the bound, a new certificate is ordered (validated again through the
    // proxy) and served, without touching the listeners.
    let start = Instant::now();
    loop {
        let now = store.certificate(names[0]).unwrap().cert[0].clone();
        if now != first {
            break;
        }
        assert_eq!(stats.failures.load(Ordering::Relaxed), 0, "renewal failed");
        assert!(start.elapsed() < Duration::from_secs(60), "no renewal");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_secs(5),
        "renewed too early"
    );
    assert_eq!(stats.orders.load(Ordering::Relaxed), 2);
    let renewed = check_served(lo(websecure), names[0], &root, &intermediate).await;
    assert_ne!(renewed, first);
    task.abort();
}

/// One node of an ACME cluster, in this process: its proxy on `ip` (the same ports on every
/// node, as behind a router), its share of the cluster's etcd, and its tasks.
struct Node {
    ip: [u8; 4],
    proxy: Arc<Proxy>,
    listeners: Option<Listeners>,
    cfg: Config,
    shared: Arc<lb_userspace::sources::cluster::Shared>,
    follow: tokio::task::JoinHandle<()>,
    acme: Option<(
        tokio::task::JoinHandle<()>,
        Arc<lb_userspace::proxy::acme::Stats>,
    )>,
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    async fn start(
        dir: &Path,
        name: &str,
        ip: [u8; 4],
        (web, websecure): (u16, u16),
        etcd: u16,
        acme: &str,
        up: SocketAddr,
    ) -> Node {
        let at = std::net::Ipv4Addr::from(ip);
        let text = format!(
            r#"
[agent]
state_dir = "{state}"

[[entrypoint]]
name = "web"
address = "{at}:{web}"

[[entrypoint]]
name = "websecure"
address = "{at}:{websecure}"
tls = true

[[router]]
name = "all"
rule = "PathPrefix(`/`)"
service = "s"

[cluster]
name = "acme"
node = "{name}"

[cluster.etcd]
endpoints = ["http://127.0.0.1:{etcd}"]
prefix = "lbtest/"

{acme}
"#,
            state = dir.join(name).display()
        );
        let cfg =
            config::parse(Path::new("acme-cluster.toml"), &text).unwrap_or_else(|e| panic!("{e}"));
        let (proxy, listeners) = proxy_for(&cfg, up).await;
        let shared = Arc::new(lb_userspace::sources::cluster::Shared::new(
            cfg.cluster.clone().expect("[cluster]"),
        ));
        let follow = tokio::spawn(lb_userspace::control::cluster::follow_challenges(
            shared.clone(),
            proxy.acme_store(),
        ));
        Node {
            ip,
            proxy,
            listeners: Some(listeners),
            cfg,
            shared,
            follow,
            acme: None,
        }
    }

    /// Starts the node's ACME client on the cluster's store.
    fn start_acme(&mut self) {
        let mut client = Acme::new(
            self.cfg.acme.clone().unwrap(),
            &self.cfg.state_dir,
            self.proxy.acme_store(),
        )
        .with_shared(Arc::new(lb_userspace::control::cluster::AcmeShared::new(
            self.shared.clone(),
        )));
        assert_eq!(client.load_stored(), 0, "nothing stored on this node yet");
        let stats = client.stats();
        self.acme = Some((tokio::spawn(client.run()), stats));
    }

    fn stats(&self) -> Arc<lb_userspace::proxy::acme::Stats> {
        self.acme.as_ref().expect("ACME started").1.clone()
    }

    fn websecure(&self) -> SocketAddr {
        let port = self
            .listeners
            .as_ref()
            .unwrap()
            .local_addr("websecure")
            .unwrap()
            .port();
        SocketAddr::from((self.ip, port))
    }

    /// The node dies: no more orders, no lease kept alive, no more answers.
    fn kill(&mut self) {
        if let Some((task, _)) = self.acme.take() {
            task.abort();
        }
        self.follow.abort();
        self.listeners = None;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Points `names` at `ip` in pebble's DNS server.
fn resolve_to(p: &Pebble, names: &[&str], ip: [u8; 4]) {
    let at = std::net::Ipv4Addr::from(ip).to_string();
    for n in names {
        ureq::post(&format!("http://127.0.0.1:{}/add-a", p.dns_mgmt))
            .timeout(Duration::from_secs(5))
            .send_json(serde_json::json!({"host": n, "addresses": [at]}))
            .unwrap_or_else(|e| panic!("challtestsrv add-a {n}: {e}"));
    }
}

/// The cluster's ACME keys in etcd: key → (value, lease).
async fn acme_keys(node: &Node) -> BTreeMap<String, (Vec<u8>, i64)> {
    let mut c = node.shared.client().await.expect("etcd");
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        c.get(
            "lbtest/clusters/acme/acme/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        ),
    )
    .await
    .expect("etcd GET in time")
    .expect("etcd GET");
    r.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                (kv.value().to_vec(), kv.lease()),
            )
        })
        .collect()
}

/// Two nodes share one ACME account and one certificate per name in etcd: the first node orders
/// each name once, while the CA's validation reaches the *other* node (pebble's DNS points
/// there), which answers the challenge it saw in etcd; the second node then serves the stored
/// certificates without ordering. At renewal, the node that holds a name's lock is killed
/// mid-order (its challenge shared, its lease not revoked): the survivor takes the lock once
/// the lease ends and renews.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_orders_each_name_once_and_a_dead_writer_is_taken_over() {
    init_log();
    let tmp = TempDir::new("acme-cluster");
    std::fs::create_dir_all(tmp.0.join("etcd")).unwrap();
    let etcd = lb_tests::daemons::start_etcd(&tmp.0.join("etcd"));
    let up = upstream().await;
    let names = ["a.example.test", "b.example.test"];
    let setup = pebble_setup(&tmp.0);
    let acme = acme_section(&setup, "http-01", &names);
    let ports = (free_port(), free_port());
    let (ip_a, ip_b) = ([127, 0, 0, 2], [127, 0, 0, 3]);
    let mut a = Node::start(&tmp.0, "node-a", ip_a, ports, etcd.port, &acme, up).await;
    let mut b = Node::start(&tmp.0, "node-b", ip_b, ports, etcd.port, &acme, up).await;
    // Certificates last 60 s: renewed 30 s in.
    let pebble = start_pebble(&tmp.0, &setup, ports.0, ports.1, Some(60), "127.0.0.3").await;

    // Node a orders; pebble validates at node b, which has no client of its own yet.
    a.start_acme();
    let started = Instant::now();
    wait_issued(&a.proxy.acme_store(), &names, &a.stats()).await;
    println!("node a: both names issued in {:?}", started.elapsed());
    assert_eq!(
        a.stats().orders.load(Ordering::Relaxed),
        2,
        "one order per name"
    );
    let (root, intermediate) = pebble_chain(&pebble).await;
    let keys = acme_keys(&a).await;
    assert_eq!(
        keys.keys().filter(|k| k.ends_with("/account.json")).count(),
        1,
        "one account for the cluster: {:?}",
        keys.keys()
    );
    assert!(
        !keys
            .keys()
            .any(|k| k.contains("/challenges/") || k.contains("/locks/")),
        "challenges and locks end with the order: {:?}",
        keys.keys()
    );

    // Node b takes what is stored: nothing ordered, the same certificates served.
    b.start_acme();
    wait_issued(&b.proxy.acme_store(), &names, &b.stats()).await;
    assert_eq!(b.stats().orders.load(Ordering::Relaxed), 0);
    assert_eq!(b.stats().adopted.load(Ordering::Relaxed), 2);
    let mut first = Vec::new();
    for n in names {
        let leaf = check_served(a.websecure(), n, &root, &intermediate).await;
        assert_eq!(
            check_served(b.websecure(), n, &root, &intermediate).await,
            leaf,
            "{n}"
        );
        first.push(leaf);
    }

    // Renewal: catch the holder of a.example.test's lock with its challenge shared under the
    // same lease, and kill it there.
    let lock_suffix = "/locks/a.example.test";
    let watch_from = Instant::now();
    let (holder, lease) = loop {
        assert!(
            watch_from.elapsed() < BOUND,
            "no renewal of {} under way within {BOUND:?}",
            names[0]
        );
        let keys = acme_keys(&a).await;
        let lock = keys.iter().find(|(k, _)| k.ends_with(lock_suffix));
        if let Some((_, (node, lease))) = lock {
            if keys
                .iter()
                .any(|(k, (_, l))| k.contains("/challenges/http01/") && l == lease)
            {
                break (String::from_utf8_lossy(node).into_owned(), *lease);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (dead, survivor) = match holder.as_str() {
        "node-a" => (&mut a, &mut b),
        "node-b" => (&mut b, &mut a),
        other => panic!("the lock names {other}"),
    };
    let orders_before = survivor.stats().orders.load(Ordering::Relaxed);
    dead.kill();
    let killed = Instant::now();
    resolve_to(&pebble, &names, survivor.ip);
    println!(
        "killed {holder} mid-renewal of {} (lease {lease:x}), {:?} after the watch began",
        names[0],
        watch_from.elapsed()
    );

    // The lock is free when the dead node's lease ends (10 s), with its challenge.
    let freed = loop {
        let keys = acme_keys(survivor).await;
        if !keys.values().any(|(_, l)| *l == lease) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "the dead node's lease lives on"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("the dead node's lock and challenge went after {freed:?}");
    assert!(
        freed >= Duration::from_secs(5),
        "the lock went in {freed:?}: it was released, not expired"
    );

    // The survivor renews both names and serves them (the dead node's order never finished).
    let store = survivor.proxy.acme_store();
    loop {
        let renewed = names
            .iter()
            .zip(&first)
            .all(|(n, leaf)| store.certificate(n).is_some_and(|k| &k.cert[0] != leaf));
        if renewed {
            break;
        }
        assert_eq!(
            survivor.stats().failures.load(Ordering::Relaxed),
            0,
            "an ACME attempt failed"
        );
        assert!(
            killed.elapsed() < BOUND,
            "the survivor did not renew within {BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "the survivor renewed both names {:?} after the kill",
        killed.elapsed()
    );
    assert!(survivor.stats().orders.load(Ordering::Relaxed) > orders_before);
    for (n, leaf) in names.iter().zip(&first) {
        let now = check_served(survivor.websecure(), n, &root, &intermediate).await;
        assert_ne!(&now, leaf, "{n}");
    }
    let keys = acme_keys(survivor).await;
    assert!(
        !keys.keys().any(|k| k.contains("/locks/a.example.test")),
        "{:?}",
        keys.keys()
    );
}

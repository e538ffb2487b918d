//! testssl.sh against a TLS entry point of the proxy: no finding at MEDIUM or above. What
//! testssl.sh could not test here (Debian's OpenSSL lacks some old protocols and ciphers to try)
//! is printed, not failed.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb_userspace::{
    model::{
        instance::{Instance, Services},
        l7::{CertSpec, EntryPointSpec, RouterSpec},
        middleware::MiddlewareConfig,
        rule::Rule,
    },
    proxy::{
        tls::{server_config, Certs},
        Proxy,
    },
};
use tokio::net::TcpListener;

fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("lb-tls-scan-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

async fn upstream() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_: Request<hyper::body::Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testssl_finds_nothing_at_medium_or_above() {
    let dir = temp_dir();
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "lb tls scan CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    std::fs::write(dir.join("ca.crt"), ca.pem()).expect("write");
    // A certificate as a public CA would issue it: 90 days, a CRL to check it against.
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["scan.test".to_string()]).expect("params");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(90);
    params.crl_distribution_points = vec![rcgen::CrlDistributionPoint {
        uris: vec!["http://ca.scan.test/crl".into()],
    }];
    let leaf = params.signed_by(&key, &ca, &ca_key).expect("leaf");
    std::fs::write(dir.join("scan.crt"), leaf.pem()).expect("write");
    std::fs::write(dir.join("scan.key"), key.serialize_pem()).expect("write");

    let up = upstream().await;
    let i = Instance {
        address: up.ip(),
        port: up.port(),
        weight: 1,
        zone: None,
        metadata: BTreeMap::new(),
    };
    let mut services = Services::new();
    services.insert("s".into(), BTreeMap::from([(i.key(), i)]));
    let certs = Certs::load(&[CertSpec {
        cert_file: dir.join("scan.crt"),
        key_file: dir.join("scan.key"),
        default: true,
    }])
    .expect("certificates");
    let config = server_config(Arc::new(certs), None).expect("tls config");
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let router = RouterSpec {
        name: "all".into(),
        entrypoints: vec![],
        rule: Rule::parse("PathPrefix(`/`)").expect("rule"),
        rule_text: "PathPrefix(`/`)".into(),
        priority: None,
        service: "s".into(),
        middlewares: vec!["secure".into()],
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
    // Security headers are the operator's to set (lb, as Traefik, adds none of its own): set as
    // the README shows.
    let headers: MiddlewareConfig = serde_json::from_value(serde_json::json!({
        "headers": { "response_set": {
            "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'none'",
            "Referrer-Policy": "no-referrer",
        }}
    }))
    .expect("headers middleware");
    let mws = HashMap::from([("secure".to_string(), headers.build().expect("build"))]);
    let proxy = Arc::new(Proxy::new(
        vec![ep],
        vec![router],
        Default::default(),
        mws,
        &services,
    ));
    tokio::spawn(proxy.serve(
        "websecure".into(),
        l,
        Some(Arc::new(arc_swap::ArcSwap::new(config))),
    ));

    let json = dir.join("testssl.json");
    // The name the certificate is for, at the entry point's address; our CA trusted.
    let target = format!("https://scan.test:{}", addr.port());
    let ca_file = dir.join("ca.crt");
    let json_arg = json.clone();
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new("testssl")
            .args([
                "--quiet",
                "--color",
                "0",
                "--warnings",
                "off",
                "--ip",
                "127.0.0.1",
            ])
            .arg("--add-ca")
            .arg(&ca_file)
            .arg("--jsonfile")
            .arg(&json_arg)
            .arg(&target)
            .output()
    });
    let out = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("testssl.sh within 10 minutes")
        .expect("join")
        .expect("run testssl.sh (xtask installs it)");
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!(
            "no {}: {e}\n{}{}",
            json.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let findings: Vec<serde_json::Value> = serde_json::from_str(&text).expect("testssl JSON");
    let field = |f: &serde_json::Value, k: &str| f[k].as_str().unwrap_or("").to_string();
    let mut by_severity: BTreeMap<String, usize> = BTreeMap::new();
    let mut bad = Vec::new();
    let mut not_tested = Vec::new();
    for f in &findings {
        let severity = field(f, "severity");
        *by_severity.entry(severity.clone()).or_default() += 1;
        let line = format!("{} [{severity}]: {}", field(f, "id"), field(f, "finding"));
        match severity.as_str() {
            "MEDIUM" | "HIGH" | "CRITICAL" => bad.push(line),
            "WARN" => not_tested.push(line),
            _ if field(f, "finding").contains("not tested") => not_tested.push(line),
            _ => {}
        }
    }
    eprintln!(
        "testssl.sh: {} findings by severity {by_severity:?}",
        findings.len()
    );
    for l in &not_tested {
        eprintln!("testssl.sh could not test: {l}");
    }
    assert!(
        findings.len() > 20,
        "testssl.sh found too little to judge: {text}"
    );
    assert!(
        bad.is_empty(),
        "findings at MEDIUM or above:\n{}",
        bad.join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

//! Traefik servers named by host name follow their DNS records: a file provider's service whose
//! server is `http://svc.lb.test:PORT` is sent to the address pebble-challtestsrv's DNS server
//! gives, and to the new one after the record changes (re-read on the answer's TTL, here the
//! `min_ttl` floor: challtestsrv answers with TTL 0), with no file touched. A name that stops
//! resolving leaves its service and router out (404, said) until it resolves again.
//!
//! Everything listens on loopback (127.0.0.2 and 127.0.0.3 are the two upstreams); the DNS
//! server is killed and the directory removed by guards, whatever the outcome; every wait is
//! bounded.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    convert::Infallible,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb_tests::daemons::free_port;
use lb_userspace::{
    model::{
        instance::Services,
        sources::{DnsSpec, FileProviderSpec},
    },
    sources::Event,
};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An upstream on `ip:port` answering its `tag`.
async fn upstream(addr: SocketAddr, tag: &'static str) {
    let l = tokio::net::TcpListener::bind(addr).await.expect("bind");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |_: Request<hyper::body::Incoming>| async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(tag))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}

fn point(mgmt: u16, name: &str, ip: Option<&str>) {
    let base = format!("http://127.0.0.1:{mgmt}");
    ureq::post(&format!("{base}/clear-a"))
        .timeout(Duration::from_secs(5))
        .send_json(serde_json::json!({ "host": name }))
        .expect("challtestsrv clear-a");
    if let Some(ip) = ip {
        ureq::post(&format!("{base}/add-a"))
            .timeout(Duration::from_secs(5))
            .send_json(serde_json::json!({ "host": name, "addresses": [ip] }))
            .expect("challtestsrv add-a");
    }
}

async fn answer(addr: SocketAddr) -> String {
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return "no proxy".into();
    };
    let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
    else {
        return "no handshake".into();
    };
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "app.lb.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    match send.send_request(req).await {
        Ok(r) => {
            let code = r.status().as_u16();
            let body = r.into_body().collect().await.map(|b| b.to_bytes());
            format!(
                "{code} {}",
                String::from_utf8_lossy(&body.unwrap_or_default())
            )
        }
        Err(e) => format!("error {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_named_by_host_follow_their_dns_records() {
    let found = Command::new("sh")
        .args(["-c", "command -v pebble-challtestsrv"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "pebble-challtestsrv is missing (.ci/run installs pebble)"
    );
    let dir = Dir(std::env::temp_dir().join(format!("lb-dns-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let (dns_port, mgmt) = (free_port(), free_port());
    let _dns = Proc(
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
                &format!("127.0.0.1:{mgmt}"),
                "-defaultIPv4",
                "",
                "-defaultIPv6",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv"),
    );
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", mgmt)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "challtestsrv not up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let name = "svc.lb.test.";
    let port = free_port();
    upstream(SocketAddr::from(([127, 0, 0, 2], port)), "first").await;
    upstream(SocketAddr::from(([127, 0, 0, 3], port)), "second").await;
    point(mgmt, name, Some("127.0.0.2"));

    lb_userspace::sources::dns::configure(&DnsSpec {
        resolver: Some(SocketAddr::from(([127, 0, 0, 1], dns_port))),
        refresh: None,
        min_ttl: Duration::from_millis(500),
    });
    std::fs::write(
        dir.0.join("dynamic.yml"),
        format!(
            "http:\n  routers:\n    app:\n      rule: \"Host(`app.lb.test`)\"\n      service: app\n  services:\n    app:\n      loadBalancer:\n        servers:\n          - url: \"http://svc.lb.test:{port}\"\n"
        ),
    )
    .unwrap();

    // The file provider feeds a proxy, as the control loop does.
    let proxy = std::sync::Arc::new(lb_userspace::proxy::Proxy::new(
        vec![lb_userspace::model::l7::EntryPointSpec {
            name: "web".into(),
            address: "127.0.0.1:0".parse().unwrap(),
            tls: false,
            client_ca_file: None,
            trusted_ips: vec![],
            limits: Default::default(),
            also_plain: false,
            as_default: false,
            proxy_protocol: None,
        }],
        vec![],
        Default::default(),
        Default::default(),
        &Services::new(),
    ));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(proxy.clone().serve("web".into(), l, None));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(64);
    let spec = FileProviderSpec {
        path: dir.0.clone(),
        debounce: Duration::from_millis(50),
    };
    let provider = tokio::spawn(lb_userspace::sources::file::run(spec, tx));
    let feed = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut reads = 0u32;
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Routing { routing, .. } => {
                        proxy.set_dynamic("file", *routing);
                    }
                    Event::Snapshot { services, .. } => {
                        proxy.update_services(&services);
                        reads += 1;
                    }
                    _ => {}
                }
            }
            reads
        })
    };

    // Each answer within a bound: the record's first address, then, after it changes, the new
    // one; a removed record leaves the service (and so its router) out, as a name that never
    // resolved does; a record that comes back is followed again.
    let until = |want: &'static str| async move {
        let start = Instant::now();
        loop {
            let got = answer(addr).await;
            if got == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "still {got:?}, not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    until("200 first").await;
    point(mgmt, name, Some("127.0.0.3"));
    let moved = until("200 second").await;
    eprintln!("the changed record was followed in {moved:?}");
    point(mgmt, name, None);
    let start = Instant::now();
    loop {
        let got = answer(addr).await;
        if got.starts_with("404") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "still {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    point(mgmt, name, Some("127.0.0.2"));
    until("200 first").await;
    provider.abort();
    let _ = provider.await;
    let reads = feed.await.unwrap_or_default();
    assert!(
        (3..200).contains(&reads),
        "re-read on the TTL floor, not in a loop: {reads} reads"
    );
}

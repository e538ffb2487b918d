//! Three real agents that share one etcd (`[cluster]`): a change through one node's API reaches
//! the others (the time is measured and printed), their Maglev tables agree, a node whose table
//! differs is flagged, and etcd can go away for 30 s without any node losing its state.
//!
//! The agents run in the root namespace without interfaces (the maps are real, nothing is
//! attached): what is under test is the shared state, not the packet path (tests/tests/l4.rs
//! and the fleet topology test carry packets). Each has its own instance, pin root, state
//! directory and API port, and is stopped and detached on drop, also on failure.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{
    daemons::{free_port, start_etcd, TempDir},
    lab::lb_bin,
};
use serde_json::Value;

const TOKEN: &str = "cluster-test-token-0123456789";
const WAIT: Duration = Duration::from_secs(15);

struct Node {
    name: String,
    dir: PathBuf,
    api: u16,
    config: PathBuf,
    child: Option<Child>,
    runs: u32,
}

impl Node {
    fn new(root: &std::path::Path, cluster: &str, name: &str, etcd: u16, extra: &str) -> Node {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("node dir");
        let api = free_port();
        let config = dir.join("lb.toml");
        let text = format!(
            "[agent]\ninstance = \"cl{name}\"\npin_root = \"/sys/fs/bpf/lbcl-{pid}\"\n\
             state_dir = \"{state}\"\n\n[dataplane]\nmax_vips = 4\nmax_backends = 64\n\n\
             [api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{TOKEN}\"\n\n\
             [cluster]\nname = \"{cluster}\"\nnode = \"{name}\"\nstatus_ttl_secs = 6\n\n\
             [cluster.etcd]\nendpoints = [\"http://127.0.0.1:{etcd}\"]\nprefix = \"lbtest/\"\n\n\
             [[vip]]\nname = \"web\"\naddress = \"10.200.0.100\"\nport = 80\nprotocol = \"tcp\"\nmode = \"nat\"\n{extra}",
            pid = std::process::id(),
            state = dir.join("state").display(),
        );
        std::fs::write(&config, text).expect("config");
        Node {
            name: name.into(),
            dir,
            api,
            config,
            child: None,
            runs: 0,
        }
    }

    fn start(&mut self) {
        assert!(self.child.is_none());
        self.runs += 1;
        let log =
            std::fs::File::create(self.dir.join(format!("agent-{}.log", self.runs))).expect("log");
        let child = Command::new(lb_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("lb run");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.get("/healthz").is_err() {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("{}: agent exited ({st}): {}", self.name, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{}: API not up: {}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("agent-{}.log", self.runs)))
            .unwrap_or_default()
    }

    fn signal(&mut self, sig: nix::sys::signal::Signal) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let url = format!("http://127.0.0.1:{}{path}", self.api);
        let req = ureq::request(method, &url)
            .set("Authorization", &format!("Bearer {TOKEN}"))
            .timeout(Duration::from_secs(10));
        let r = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{}: {method} {path}: {e}", self.name),
        };
        let code = resp.status();
        let text = resp.into_string().unwrap_or_default();
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn get(&self, path: &str) -> Result<Value, String> {
        let url = format!("http://127.0.0.1:{}{path}", self.api);
        let r = ureq::get(&url)
            .set("Authorization", &format!("Bearer {TOKEN}"))
            .timeout(Duration::from_secs(5))
            .call()
            .map_err(|e| e.to_string())?;
        let text = r.into_string().map_err(|e| e.to_string())?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// The VIP's backends (address:port, state) and its table digest.
    fn web(&self) -> (Vec<String>, Option<String>) {
        let v = self.get("/api/v1/vips").expect("vips");
        let web = v["vips"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == "web"))
            .cloned()
            .unwrap_or(Value::Null);
        let mut backends: Vec<String> = web["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                format!(
                    "{}:{} {}",
                    b["address"].as_str().unwrap_or(""),
                    b["port"],
                    b["state"].as_str().unwrap_or("")
                )
            })
            .collect();
        backends.sort();
        (backends, web["table_digest"].as_str().map(str::to_string))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = Command::new(lb_bin())
            .args(["detach", "--config"])
            .arg(&self.config)
            .output();
        // The nodes share one pin root: the last to go (it is empty then) removes it.
        let _ = std::fs::remove_dir(format!("/sys/fs/bpf/lbcl-{}", std::process::id()));
    }
}

/// Waits until `f` holds, for at most `within`; how long it took.
fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    t0.elapsed()
}

fn add(node: &Node, backend: &str) -> u16 {
    let (ip, port) = backend.split_once(':').expect("addr:port");
    let body = format!("{{\"address\":\"{ip}\",\"port\":{port}}}");
    node.request("POST", "/api/v1/vips/web/backends", Some(&body))
        .0
}

fn cluster(node: &Node) -> Value {
    node.get("/api/v1/cluster").unwrap_or(Value::Null)
}

#[test]
fn nodes_share_the_store_agree_and_outlive_etcd() {
    let dir = TempDir::new("cluster");
    let mut etcd = start_etcd(&dir.0);
    let name = format!("t{}", std::process::id());
    let mut a = Node::new(&dir.0, &name, "a", etcd.port, "");
    let mut b = Node::new(&dir.0, &name, "b", etcd.port, "");
    // c's lb.toml has a backend of its own: its table cannot match the others'.
    let extra = "\n[[vip.backend]]\naddress = \"10.200.1.99\"\nport = 8080\n";
    let mut c = Node::new(&dir.0, &name, "c", etcd.port, extra);
    for n in [&mut a, &mut b, &mut c] {
        n.start();
    }

    // A change through a's API reaches b: measured from a's answer to b's maps.
    let mut times = Vec::new();
    for (i, backend) in ["10.200.1.1:8080", "10.200.1.2:8080", "10.200.1.3:8080"]
        .iter()
        .enumerate()
    {
        let writer = if i == 1 { &b } else { &a };
        assert_eq!(add(writer, backend), 201, "{}", writer.log());
        let want = format!("{backend} active");
        let other = if i == 1 { &a } else { &b };
        times.push(until("the change reaches the other node", WAIT, || {
            other.web().0.contains(&want)
        }));
    }
    println!("API change on one node → the other node's maps: {times:?}");
    until("a and b have the same table", WAIT, || {
        let (x, y) = (a.web(), b.web());
        x.0.len() == 3 && x == y && x.1.is_some()
    });

    // Every node is in the view; c, whose table differs, is the one flagged.
    until("the view shows three nodes with c flagged", WAIT, || {
        let v = cluster(&a);
        let nodes = v["nodes"].as_array().map(Vec::len).unwrap_or(0);
        let flagged: Vec<&str> = v["disagreements"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["node"].as_str())
            .collect();
        nodes == 3 && flagged == ["c"] && v["agree"] == false
    });
    let out = Command::new(lb_bin())
        .args(["status", "--cluster", "--config"])
        .arg(&a.config)
        .output()
        .expect("lb status --cluster");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "disagreement is exit 2: {text}");
    assert!(
        text.contains("TABLES DISAGREE") && text.contains(" ! c "),
        "{text}"
    );
    // c leaves gracefully: gone from the view at once (its lease is revoked), the rest agree.
    c.signal(nix::sys::signal::Signal::SIGTERM);
    let gone = until("c leaves the view", Duration::from_secs(3), || {
        let v = cluster(&a);
        v["nodes"].as_array().map(Vec::len) == Some(2) && v["agree"] == true
    });
    println!("a stopped node left the view after {gone:?}");

    // Drain and remove through b; a follows.
    let (code, _) = b.request(
        "POST",
        "/api/v1/vips/web/backends/10.200.1.2:8080/drain",
        None,
    );
    assert_eq!(code, 204);
    until("the drain reaches a", WAIT, || {
        a.web().0.contains(&"10.200.1.2:8080 draining".to_string())
    });
    let (code, _) = a.request("DELETE", "/api/v1/vips/web/backends/10.200.1.3:8080", None);
    assert_eq!(code, 204);
    until("the removal reaches b", WAIT, || b.web().0.len() == 2);

    // etcd away for 30 s: writes are refused and change nothing, every node keeps its state,
    // a node restarted meanwhile starts on its local copy.
    let before = a.web();
    etcd.kill();
    let (code, body) = a.request(
        "POST",
        "/api/v1/vips/web/backends",
        Some("{\"address\":\"10.200.1.7\",\"port\":8080}"),
    );
    assert_eq!(code, 503, "{body}");
    assert_eq!(a.web(), before, "a refused change changes nothing");
    b.signal(nix::sys::signal::Signal::SIGTERM);
    b.start();
    assert_eq!(b.web(), before, "b restarted on its copy: {}", b.log());
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        assert_eq!(a.web(), before);
        assert_eq!(b.web(), before);
        std::thread::sleep(Duration::from_secs(1));
    }
    etcd.restart();
    assert_eq!(add(&a, "10.200.1.7:8080"), 201, "{}", a.log());
    let back = until(
        "b converges once etcd is back",
        Duration::from_secs(20),
        || b.web().0.contains(&"10.200.1.7:8080 active".to_string()),
    );
    println!("after etcd came back, a's change reached b in {back:?}");
    until("a and b agree again", Duration::from_secs(20), || {
        let v = cluster(&b);
        v["nodes"].as_array().map(Vec::len) == Some(2) && v["agree"] == true
    });

    // A node that dies (SIGKILL) leaves the view when its lease ends.
    a.signal(nix::sys::signal::Signal::SIGKILL);
    let lapsed = until("a's status lapses", Duration::from_secs(15), || {
        cluster(&b)["nodes"].as_array().map(Vec::len) == Some(1)
    });
    println!("a killed node left the view after {lapsed:?} (TTL 6 s)");
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A CA, a certificate signed by it for `names` with `usage`, and its key, as PEM files.
fn issue(
    dir: &std::path::Path,
    ca: &(rcgen::Certificate, rcgen::KeyPair),
    name: &str,
    names: &[&str],
    usage: rcgen::ExtendedKeyUsagePurpose,
) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    p.extended_key_usages = vec![usage];
    let cert = p.signed_by(&key, &ca.0, &ca.1).expect("sign");
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).expect("cert");
    std::fs::write(&k, key.serialize_pem()).expect("key");
    (c, k)
}

/// The cluster store through etcd with TLS, a client certificate (`--client-cert-auth`) and an
/// etcd user restricted to lb's prefix: a registration written by one node's store is read by
/// another's; a wrong password, or no client certificate, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_store_speaks_tls_and_etcd_users() {
    use lb_userspace::{
        model::{instance::Instance, ClusterSpec, EtcdAuth, EtcdSpec, EtcdTls},
        sources::{cluster::Shared, store::Store},
    };
    let dir = TempDir::new("cluster-tls");
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = (ca_params.self_signed(&ca_key).expect("ca"), ca_key);
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, ca.0.pem()).expect("ca");
    let (srv_cert, srv_key) = issue(
        &dir.0,
        &ca,
        "etcd",
        &["127.0.0.1", "localhost"],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (cli_cert, cli_key) = issue(
        &dir.0,
        &ca,
        "lb-node",
        &[],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
    let (port, peer) = (free_port(), free_port());
    let client_url = format!("https://127.0.0.1:{port}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let s = |p: &PathBuf| p.display().to_string();
    let _etcd = lb_tests::daemons::Server::start(
        "/usr/bin/etcd",
        vec![
            "--name".into(),
            "lbtls".into(),
            "--data-dir".into(),
            s(&dir.0.join("data")),
            "--listen-client-urls".into(),
            client_url.clone(),
            "--advertise-client-urls".into(),
            client_url.clone(),
            "--listen-peer-urls".into(),
            peer_url.clone(),
            "--initial-advertise-peer-urls".into(),
            peer_url.clone(),
            "--initial-cluster".into(),
            format!("lbtls={peer_url}"),
            "--cert-file".into(),
            s(&srv_cert),
            "--key-file".into(),
            s(&srv_key),
            "--trusted-ca-file".into(),
            s(&ca_file),
            "--client-cert-auth".into(),
        ],
        dir.0.join("etcd.log"),
        port,
        port_open,
    );
    let tls = EtcdTls {
        ca: ca_file.clone(),
        cert: Some(cli_cert),
        key: Some(cli_key),
        server_name: None,
    };
    let spec = |auth: Option<EtcdAuth>, tls: Option<EtcdTls>, node: &str| ClusterSpec {
        name: "tls".into(),
        node: node.into(),
        status_ttl: Duration::from_secs(6),
        etcd: EtcdSpec {
            endpoints: vec![client_url.clone()],
            prefix: "lbtest/".into(),
            traefik_root: None,
            traefik_file_dirs: Vec::new(),
            auth,
            tls,
        },
    };
    // Users: root (etcd needs one to enable auth) and lb, which may only touch lbtest/.
    let admin = Shared::new(spec(None, Some(tls.clone()), "admin"));
    let mut c = tokio::time::timeout(WAIT, admin.client())
        .await
        .expect("in time")
        .expect("TLS with a client certificate connects");
    c.user_add("root", "root-pw", None).await.expect("root");
    c.user_grant_role("root", "root").await.expect("root role");
    c.role_add("lb").await.expect("role");
    c.role_grant_permission(
        "lb",
        etcd_client::Permission::read_write("lbtest/").with_prefix(),
    )
    .await
    .expect("grant");
    c.user_add("lb", "lb-pw", None).await.expect("user");
    c.user_grant_role("lb", "lb").await.expect("user role");
    c.auth_enable().await.expect("auth enable");

    let user = |pw: &str| {
        Some(EtcdAuth {
            username: "lb".into(),
            password: pw.into(),
        })
    };
    let a = std::sync::Arc::new(Shared::new(spec(user("lb-pw"), Some(tls.clone()), "a")));
    let copy = dir.0.join("a-copy.json");
    let mut store = Store::open_cluster(a.clone(), &copy).await.expect("open");
    assert!(store.revision() > 0, "read from etcd, not from the copy");
    let inst: Instance =
        serde_json::from_str(r#"{"address":"10.200.1.1","port":8080}"#).expect("instance");
    let store = tokio::task::spawn_blocking(move || {
        store
            .register("web", inst, None, std::time::SystemTime::now())
            .expect("written through TLS as user lb");
        store
    })
    .await
    .expect("task");
    let b = std::sync::Arc::new(Shared::new(spec(user("lb-pw"), Some(tls.clone()), "b")));
    let (rev, _, rejected) = b.read().await.expect("b reads");
    assert!(rev >= store.revision() && rejected.is_empty());
    let seen = Store::open_cluster(b, &dir.0.join("b-copy.json"))
        .await
        .expect("open")
        .snapshot(std::time::SystemTime::now());
    assert_eq!(seen["web"].len(), 1, "b sees a's registration");

    let wrong = Shared::new(spec(user("nope"), Some(tls.clone()), "c"));
    let e = tokio::time::timeout(WAIT, wrong.read())
        .await
        .expect("in time");
    let e = e.expect_err("a wrong password is refused");
    assert!(format!("{e:#}").contains("authentication failed"), "{e:#}");
    let no_cert = Shared::new(spec(
        user("lb-pw"),
        Some(EtcdTls {
            cert: None,
            key: None,
            ..tls.clone()
        }),
        "d",
    ));
    let e = tokio::time::timeout(WAIT, no_cert.read())
        .await
        .expect("in time");
    let e = e.expect_err("no client certificate is refused");
    println!("without a client certificate: {e:#}");
}

//! The Redis and etcd providers against real servers (`redis-server`, `/usr/bin/etcd`), each test
//! starting its own on free ports with its own temporary directory, and killing it at the end —
//! also on failure (the guards' Drop). Tests run in parallel.
//!
//! Each test drives the provider's `run` with a channel and asserts on the snapshots and errors it
//! sends; every wait is bounded.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::daemons::{start_etcd, start_redis, TempDir};
use lb_userspace::{
    model::instance::{Instance, InstanceKey},
    model::{EtcdSpec, RedisSpec},
    sources::{etcd, redis, Event, Rank},
};
use tokio::{sync::mpsc, task::JoinHandle};

const WAIT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------ providers and events

fn redis_spec(port: u16, resync: Duration) -> RedisSpec {
    RedisSpec {
        url: format!("redis://127.0.0.1:{port}"),
        prefix: "lb/".into(),
        resync,
        traefik_root: None,
        traefik_file_dirs: Vec::new(),
    }
}

fn etcd_spec(port: u16) -> EtcdSpec {
    EtcdSpec {
        endpoints: vec![format!("http://127.0.0.1:{port}")],
        prefix: "lb/".into(),
        traefik_root: None,
        traefik_file_dirs: Vec::new(),
        auth: None,
        tls: None,
    }
}

/// A running provider; aborted on drop.
struct Provider {
    rx: mpsc::Receiver<Event>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn run_redis(spec: RedisSpec) -> Provider {
    let (tx, rx) = mpsc::channel(1024);
    Provider {
        rx,
        task: tokio::spawn(redis::run(spec, tx)),
    }
}

fn run_etcd(spec: EtcdSpec) -> Provider {
    let (tx, rx) = mpsc::channel(1024);
    Provider {
        rx,
        task: tokio::spawn(etcd::run(spec, tx)),
    }
}

fn inst(addr: &str) -> Instance {
    let a: SocketAddr = addr.parse().expect("address");
    Instance {
        address: a.ip(),
        port: a.port(),
        weight: 1,
        zone: None,
        metadata: Default::default(),
    }
}

fn key(addr: &str) -> InstanceKey {
    inst(addr).key()
}

/// A snapshot's instances as `service/address:port`.
fn members(ev: &Event) -> Option<BTreeSet<String>> {
    match ev {
        Event::Snapshot { services, .. } => Some(
            services
                .iter()
                .flat_map(|(s, m)| m.keys().map(move |k| format!("{s}/{k}")))
                .collect(),
        ),
        _ => None,
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn describe(ev: &Event) -> String {
    match ev {
        Event::Snapshot { .. } => format!("snapshot {:?}", members(ev).unwrap_or_default()),
        Event::Error { error, .. } => format!("error {error:?}"),
        other => format!("{other:?}"),
    }
}

impl Provider {
    /// The first event that satisfies `pred`, within [`WAIT`]; the events passed over are
    /// handed to `seen`.
    async fn wait_for(
        &mut self,
        what: &str,
        mut seen: impl FnMut(&Event),
        pred: impl Fn(&Event) -> bool,
    ) -> Event {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut log = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) if pred(&ev) => return ev,
                Ok(Some(ev)) => {
                    log.push(describe(&ev));
                    seen(&ev);
                }
                Ok(None) => panic!("{what}: the provider stopped; seen: {log:#?}"),
                Err(_) => panic!("{what}: not within {WAIT:?}; seen: {log:#?}"),
            }
        }
    }

    /// Waits for a snapshot holding exactly `want`.
    async fn snapshot(&mut self, want: &[&str]) -> Event {
        let want = set(want);
        self.wait_for(
            &format!("a snapshot of {want:?}"),
            |_| {},
            |e| members(e).as_ref() == Some(&want),
        )
        .await
    }

    /// Waits for a read that rejected each of `bad` (an error naming the key, after a snapshot
    /// holding exactly `valid`); every snapshot on the way must hold all of `valid`.
    async fn rejected(&mut self, valid: &[&str], bad: &[&str]) {
        let valid = set(valid);
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut round: Option<(BTreeSet<String>, Vec<String>)> = None;
        let mut log = Vec::new();
        loop {
            if let Some((members, errors)) = &round {
                let named = |k: &str| errors.iter().any(|e| e.contains(&format!("{k:?}")));
                if members == &valid && bad.iter().all(|k| named(k)) {
                    return;
                }
            }
            let ev =
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(ev)) => ev,
                    other => panic!(
                    "rejections of {bad:?} with {valid:?} kept: {} within {WAIT:?}; seen: {log:#?}",
                    if other.is_ok() { "provider stopped" } else { "not" }
                ),
                };
            log.push(describe(&ev));
            match (&ev, members(&ev)) {
                (_, Some(m)) => {
                    assert!(
                        m.is_superset(&valid),
                        "a snapshot lost valid instances: {m:?}"
                    );
                    round = Some((m, Vec::new()));
                }
                (Event::Error { error, .. }, None) => {
                    if let Some((_, errors)) = &mut round {
                        errors.push(error.clone());
                    }
                }
                _ => {}
            }
        }
    }

    /// Events until none arrives for `quiet` (bounded by [`WAIT`]).
    async fn drain(&mut self, quiet: Duration) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut out = Vec::new();
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout(quiet, self.rx.recv()).await {
                Ok(Some(ev)) => out.push(ev),
                _ => break,
            }
        }
        out
    }
}

fn check_provider(ev: &Event, name: &str, rank: u8) {
    match ev {
        Event::Snapshot {
            provider, rank: r, ..
        }
        | Event::Error {
            provider, rank: r, ..
        } => assert_eq!((provider.as_str(), *r), (name, rank)),
        other => panic!("unexpected {other:?}"),
    }
}

/// Raw writes, for data `register` refuses to produce.
async fn redis_raw(port: u16, args: &[&str]) {
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("client");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let mut cmd = ::redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async::<()>(&mut con)
        .await
        .expect("redis command");
}

async fn etcd_put_raw(port: u16, key: &str, value: &str) {
    let mut c = etcd_client::Client::connect([format!("http://127.0.0.1:{port}")], None)
        .await
        .expect("etcd client");
    c.put(key, value, None).await.expect("etcd put");
}

// ------------------------------------------------------------------ Redis

/// Resync far away: what these tests see comes from keyspace notifications.
const NO_RESYNC: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_register_appears() {
    let dir = TempDir::new("redis");
    let srv = start_redis(&dir.0);
    let spec = redis_spec(srv.port, NO_RESYNC);
    let mut p = run_redis(spec.clone());
    let first = p.snapshot(&[]).await;
    check_provider(&first, redis::NAME, Rank::REDIS);
    let mut w = inst("10.0.0.1:80");
    w.weight = 7;
    w.zone = Some("a".into());
    redis::register(&spec, "web", &w, None)
        .await
        .expect("register");
    redis::register(&spec, "db", &inst("[fd00::5]:5432"), None)
        .await
        .expect("register v6");
    let ev = p.snapshot(&["web/10.0.0.1:80", "db/[fd00::5]:5432"]).await;
    let Event::Snapshot { services, .. } = ev else {
        unreachable!()
    };
    assert_eq!(services["web"][&w.key()], w, "all fields come through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_ttl_expiry_removes() {
    let dir = TempDir::new("redis");
    let srv = start_redis(&dir.0);
    let spec = redis_spec(srv.port, NO_RESYNC);
    let mut p = run_redis(spec.clone());
    p.snapshot(&[]).await;
    redis::register(&spec, "web", &inst("10.0.0.1:80"), None)
        .await
        .expect("register");
    redis::register(
        &spec,
        "web",
        &inst("10.0.0.2:80"),
        Some(Duration::from_secs(1)),
    )
    .await
    .expect("register with ttl");
    p.snapshot(&["web/10.0.0.1:80", "web/10.0.0.2:80"]).await;
    let t = Instant::now();
    p.snapshot(&["web/10.0.0.1:80"]).await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "expired after {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_deregister_removes() {
    let dir = TempDir::new("redis");
    let srv = start_redis(&dir.0);
    let spec = redis_spec(srv.port, NO_RESYNC);
    let mut p = run_redis(spec.clone());
    p.snapshot(&[]).await;
    for a in ["10.0.0.1:80", "10.0.0.2:80"] {
        redis::register(&spec, "web", &inst(a), None)
            .await
            .expect("register");
    }
    p.snapshot(&["web/10.0.0.1:80", "web/10.0.0.2:80"]).await;
    assert!(redis::deregister(&spec, "web", key("10.0.0.1:80"))
        .await
        .expect("deregister"));
    p.snapshot(&["web/10.0.0.2:80"]).await;
    assert!(!redis::deregister(&spec, "web", key("10.0.0.1:80"))
        .await
        .expect("deregister again"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_keeps_state_then_recovers() {
    let dir = TempDir::new("redis");
    let mut srv = start_redis(&dir.0);
    let spec = redis_spec(srv.port, NO_RESYNC);
    let mut p = run_redis(spec.clone());
    p.snapshot(&[]).await;
    redis::register(&spec, "web", &inst("10.0.0.1:80"), None)
        .await
        .expect("register");
    p.snapshot(&["web/10.0.0.1:80"]).await;

    srv.kill();
    let mut snapshots = 0;
    let err = p
        .wait_for(
            "an error once Redis is gone",
            |e| snapshots += usize::from(members(e).is_some()),
            |e| matches!(e, Event::Error { .. }),
        )
        .await;
    check_provider(&err, redis::NAME, Rank::REDIS);
    // It keeps retrying (more errors), and never sends a snapshot while Redis is down.
    let down = p.drain(Duration::from_secs(3)).await;
    snapshots += down.iter().filter(|e| members(e).is_some()).count();
    assert_eq!(snapshots, 0, "no snapshot while down: {down:?}");
    assert!(
        down.iter().any(|e| matches!(e, Event::Error { .. })),
        "retries report errors: {down:?}"
    );

    // Back, empty (no persistence): what registers again is picked up.
    srv.restart();
    redis::register(&spec, "web", &inst("10.0.0.1:80"), None)
        .await
        .expect("register after restart");
    redis::register(&spec, "web", &inst("10.0.0.3:80"), None)
        .await
        .expect("register after restart");
    p.snapshot(&["web/10.0.0.1:80", "web/10.0.0.3:80"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_invalid_data_is_rejected_and_nothing_else_lost() {
    let dir = TempDir::new("redis");
    let srv = start_redis(&dir.0);
    let spec = redis_spec(srv.port, NO_RESYNC);
    let mut p = run_redis(spec.clone());
    p.snapshot(&[]).await;
    redis::register(&spec, "web", &inst("10.0.0.1:80"), None)
        .await
        .expect("register");
    p.snapshot(&["web/10.0.0.1:80"]).await;
    let bad_json = "lb/services/web/10.0.0.2:80";
    let mismatch = "lb/services/web/10.0.0.3:80";
    let not_a_string = "lb/services/web/10.0.0.4:80";
    let bad_shape = "lb/services/web/not-an-address";
    redis_raw(srv.port, &["SET", bad_json, "{\"address\": "]).await;
    redis_raw(
        srv.port,
        &["SET", mismatch, r#"{"address":"10.0.0.9","port":80}"#],
    )
    .await;
    redis_raw(srv.port, &["HSET", not_a_string, "address", "10.0.0.4"]).await;
    redis_raw(srv.port, &["SET", bad_shape, r#"{"address":"10.0.0.6"}"#]).await;
    // Outside the layout, ignored: another prefix.
    redis_raw(srv.port, &["SET", "other/services/web/10.0.0.5:80", "x"]).await;
    p.rejected(
        &["web/10.0.0.1:80"],
        &[bad_json, mismatch, not_a_string, bad_shape],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_resync_sees_changes_without_notifications() {
    let dir = TempDir::new("redis");
    let srv = start_redis(&dir.0);
    let spec = redis_spec(srv.port, Duration::from_secs(1));
    let mut p = run_redis(spec.clone());
    p.snapshot(&[]).await;
    // As on a server where CONFIG is not allowed: no notifications.
    redis_raw(srv.port, &["CONFIG", "SET", "notify-keyspace-events", ""]).await;
    redis::register(&spec, "web", &inst("10.0.0.1:80"), None)
        .await
        .expect("register");
    p.snapshot(&["web/10.0.0.1:80"]).await;
}

/// A child process killed on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lb(args: &[&str]) -> Command {
    let mut c = Command::new(lb_tests::lab::lb_bin());
    c.args(args).stdin(Stdio::null()).env("RUST_LOG", "warn");
    c
}

fn lb_ok(args: &[&str]) -> String {
    let out = lb(args).output().expect("running lb");
    assert!(
        out.status.success(),
        "lb {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `lb register --ttl 2 --keep-alive` keeps the instance past its TTL and deregisters it on
/// SIGTERM; `lb register` once and `lb deregister` through the same config.
async fn lb_register_through_config(config: &Path, p: &mut Provider) {
    let cfg = config.to_str().expect("utf-8 path");
    p.snapshot(&[]).await;
    let child = lb(&[
        "register",
        "-c",
        cfg,
        "--service",
        "web",
        "--addr",
        "10.0.0.7:80",
        "--ttl",
        "2",
        "--keep-alive",
    ])
    .stdout(Stdio::null())
    .spawn()
    .expect("lb register --keep-alive");
    let mut child = ChildGuard(child);
    p.snapshot(&["web/10.0.0.7:80"]).await;
    // Three TTLs later it is still there: no snapshot ever drops it.
    let later = Instant::now() + Duration::from_secs(6);
    while Instant::now() < later {
        if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), p.rx.recv()).await {
            if let Some(m) = members(&ev) {
                assert!(
                    m.contains("web/10.0.0.7:80"),
                    "dropped while kept alive: {m:?}"
                );
            }
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    p.snapshot(&[]).await;
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = child.0.try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "lb register did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");

    let out = lb_ok(&[
        "register",
        "-c",
        cfg,
        "--service",
        "db",
        "--addr",
        "[fd00::8]:5432",
    ]);
    assert!(out.contains("registered [fd00::8]:5432 in db"), "{out}");
    p.snapshot(&["db/[fd00::8]:5432"]).await;
    let out = lb_ok(&[
        "deregister",
        "-c",
        cfg,
        "--service",
        "db",
        "--addr",
        "[fd00::8]:5432",
    ]);
    assert!(out.contains("deregistered"), "{out}");
    p.snapshot(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lb_register_command() {
    let dir = TempDir::new("redis");
    let srv = start_redis(&dir.0);
    let config = dir.0.join("lb.toml");
    std::fs::write(
        &config,
        format!(
            "[providers.redis]\nurl = \"redis://127.0.0.1:{}\"\n",
            srv.port
        ),
    )
    .expect("config");
    let mut p = run_redis(redis_spec(srv.port, NO_RESYNC));
    lb_register_through_config(&config, &mut p).await;
}

// ------------------------------------------------------------------ etcd

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_register_appears() {
    let dir = TempDir::new("etcd");
    let srv = start_etcd(&dir.0);
    let spec = etcd_spec(srv.port);
    let mut p = run_etcd(spec.clone());
    let first = p.snapshot(&[]).await;
    check_provider(&first, etcd::NAME, Rank::ETCD);
    let mut w = inst("10.0.0.1:80");
    w.weight = 7;
    w.metadata.insert("mac".into(), "02:00:00:00:00:01".into());
    etcd::register(&spec, "web", &w, None)
        .await
        .expect("register");
    etcd::register(&spec, "db", &inst("[fd00::5]:5432"), None)
        .await
        .expect("register v6");
    let ev = p.snapshot(&["web/10.0.0.1:80", "db/[fd00::5]:5432"]).await;
    let Event::Snapshot { services, .. } = ev else {
        unreachable!()
    };
    assert_eq!(services["web"][&w.key()], w, "all fields come through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lease_expiry_removes() {
    let dir = TempDir::new("etcd");
    let srv = start_etcd(&dir.0);
    let spec = etcd_spec(srv.port);
    let mut p = run_etcd(spec.clone());
    p.snapshot(&[]).await;
    etcd::register(&spec, "web", &inst("10.0.0.1:80"), None)
        .await
        .expect("register");
    let lease = etcd::register(
        &spec,
        "web",
        &inst("10.0.0.2:80"),
        Some(Duration::from_secs(1)),
    )
    .await
    .expect("register with ttl");
    assert!(lease.is_some(), "a TTL makes a lease");
    p.snapshot(&["web/10.0.0.1:80", "web/10.0.0.2:80"]).await;
    let t = Instant::now();
    p.snapshot(&["web/10.0.0.1:80"]).await;
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "expired after {:?}",
        t.elapsed()
    );
    let lease = lease.unwrap_or_default();
    assert!(
        !etcd::keep_alive(&spec, lease).await.expect("keep-alive"),
        "an expired lease cannot be kept alive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_deregister_removes() {
    let dir = TempDir::new("etcd");
    let srv = start_etcd(&dir.0);
    let spec = etcd_spec(srv.port);
    let mut p = run_etcd(spec.clone());
    p.snapshot(&[]).await;
    for a in ["10.0.0.1:80", "10.0.0.2:80"] {
        etcd::register(&spec, "web", &inst(a), None)
            .await
            .expect("register");
    }
    p.snapshot(&["web/10.0.0.1:80", "web/10.0.0.2:80"]).await;
    assert!(etcd::deregister(&spec, "web", key("10.0.0.1:80"))
        .await
        .expect("deregister"));
    p.snapshot(&["web/10.0.0.2:80"]).await;
    assert!(!etcd::deregister(&spec, "web", key("10.0.0.1:80"))
        .await
        .expect("deregister again"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keeps_state_then_recovers() {
    let dir = TempDir::new("etcd");
    let mut srv = start_etcd(&dir.0);
    let spec = etcd_spec(srv.port);
    let mut p = run_etcd(spec.clone());
    p.snapshot(&[]).await;
    etcd::register(&spec, "web", &inst("10.0.0.1:80"), None)
        .await
        .expect("register");
    p.snapshot(&["web/10.0.0.1:80"]).await;

    srv.kill();
    let mut snapshots = 0;
    let err = p
        .wait_for(
            "an error once etcd is gone",
            |e| snapshots += usize::from(members(e).is_some()),
            |e| matches!(e, Event::Error { .. }),
        )
        .await;
    check_provider(&err, etcd::NAME, Rank::ETCD);
    let down = p.drain(Duration::from_secs(3)).await;
    snapshots += down.iter().filter(|e| members(e).is_some()).count();
    assert_eq!(snapshots, 0, "no snapshot while down: {down:?}");

    // Back with its data directory: the state returns by itself, and the watch works again.
    srv.restart();
    p.snapshot(&["web/10.0.0.1:80"]).await;
    etcd::register(&spec, "web", &inst("10.0.0.3:80"), None)
        .await
        .expect("register after restart");
    p.snapshot(&["web/10.0.0.1:80", "web/10.0.0.3:80"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_invalid_data_is_rejected_and_nothing_else_lost() {
    let dir = TempDir::new("etcd");
    let srv = start_etcd(&dir.0);
    let spec = etcd_spec(srv.port);
    let mut p = run_etcd(spec.clone());
    p.snapshot(&[]).await;
    etcd::register(&spec, "web", &inst("10.0.0.1:80"), None)
        .await
        .expect("register");
    p.snapshot(&["web/10.0.0.1:80"]).await;
    let bad_json = "lb/services/web/10.0.0.2:80";
    let mismatch = "lb/services/web/10.0.0.3:80";
    let bad_shape = "lb/services/web";
    etcd_put_raw(srv.port, bad_json, "{\"address\": ").await;
    etcd_put_raw(srv.port, mismatch, r#"{"address":"10.0.0.9","port":80}"#).await;
    etcd_put_raw(srv.port, bad_shape, r#"{"address":"10.0.0.6"}"#).await;
    etcd_put_raw(srv.port, "other/services/web/10.0.0.5:80", "x").await;
    p.rejected(&["web/10.0.0.1:80"], &[bad_json, mismatch, bad_shape])
        .await;
    // A provider started now sees the same from its first read.
    let mut q = run_etcd(spec);
    q.rejected(&["web/10.0.0.1:80"], &[bad_json, mismatch, bad_shape])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lb_register_command() {
    let dir = TempDir::new("etcd");
    let srv = start_etcd(&dir.0);
    let config = dir.0.join("lb.toml");
    // Both configured: etcd wins.
    std::fs::write(
        &config,
        format!(
            "[providers.etcd]\nendpoints = [\"http://127.0.0.1:{}\"]\n\
             [providers.redis]\nurl = \"redis://127.0.0.1:1\"\n",
            srv.port
        ),
    )
    .expect("config");
    let mut p = run_etcd(etcd_spec(srv.port));
    lb_register_through_config(&config, &mut p).await;
}

// ------------------------------------------------------------------ Traefik's KV layout

/// Keys as Traefik's KV provider documents them.
const TRAEFIK_KEYS: [(&str, &str); 8] = [
    (
        "traefik/http/routers/api/rule",
        "Host(`api.test`) && PathPrefix(`/v1`)",
    ),
    ("traefik/http/routers/api/service", "api"),
    ("traefik/http/routers/api/middlewares/0", "strip@redis"),
    ("traefik/http/routers/api/entryPoints/0", "web"),
    (
        "traefik/http/middlewares/strip/stripPrefix/prefixes/0",
        "/v1",
    ),
    (
        "traefik/http/services/api/loadBalancer/servers/0/url",
        "http://10.0.0.1:8080",
    ),
    (
        "traefik/http/services/api/loadBalancer/healthCheck/path",
        "/health",
    ),
    ("lb/unrelated", "x"),
];

/// Drives one store through the same story: a Traefik configuration is read and translated, a
/// server added later arrives, a broken rule is refused by key while its router goes on with
/// its last good rule.
async fn traefik_story(
    p: &mut Provider,
    provider: &str,
    mut put: impl FnMut(
        &'static str,
        &'static str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) {
    for (k, v) in TRAEFIK_KEYS {
        put(k, v).await;
    }
    let ev = p
        .wait_for("routing", |_| {}, |e| {
            // Keys are written one by one: wait for the routing of all of them.
            matches!(e, Event::Routing { provider: n, routing, .. }
                if n == provider
                    && routing.middlewares.len() == 1
                    && routing.routers.first().is_some_and(|r| !r.middlewares.is_empty() && !r.entrypoints.is_empty()))
        })
        .await;
    let Event::Routing {
        routing,
        unsupported,
        ..
    } = ev
    else {
        unreachable!()
    };
    let r = &routing.routers[0];
    assert_eq!(
        (
            r.name.as_str(),
            r.service.as_str(),
            &r.middlewares,
            &r.entrypoints
        ),
        (
            "api",
            "api",
            // `strip@redis` is the document's own in Redis; in etcd it names the Redis
            // provider's `strip` (Traefik's provider namespaces), resolved when parts merge.
            &vec![match provider.starts_with("redis") {
                true => "strip".to_string(),
                false => "strip@redis".to_string(),
            }],
            &vec!["web".to_string()]
        )
    );
    assert_eq!(routing.middlewares.len(), 1);
    // The healthCheck is an active check now, read from its keys like the rest.
    assert!(unsupported.is_empty(), "{unsupported:?}");
    assert_eq!(
        routing.services["api"]
            .health
            .as_ref()
            .map(|h| h.path.as_str()),
        Some("/health")
    );
    p.wait_for(
        "servers",
        |_| {},
        |e| {
            matches!(e, Event::Snapshot { provider: n, .. } if n == provider)
                && members(e) == Some(set(&["api/10.0.0.1:8080"]))
        },
    )
    .await;
    put(
        "traefik/http/services/api/loadBalancer/servers/1/url",
        "http://10.0.0.2:8080",
    )
    .await;
    p.wait_for(
        "a second server",
        |_| {},
        |e| members(e) == Some(set(&["api/10.0.0.1:8080", "api/10.0.0.2:8080"])),
    )
    .await;
    put("traefik/http/routers/api/rule", "Host(`api.test`").await;
    let ev = p
        .wait_for(
            "the broken rule",
            |_| {},
            |e| matches!(e, Event::Routing { provider: n, broken, .. } if n == provider && !broken.is_empty()),
        )
        .await;
    let Event::Routing {
        routing, broken, ..
    } = ev
    else {
        unreachable!()
    };
    assert_eq!(broken.len(), 1, "{broken:?}");
    assert!(
        broken[0].contains("traefik/http/routers/api/rule")
            && broken[0].contains("column")
            && broken[0].contains("keeping its last good version"),
        "{broken:?}"
    );
    // The router goes on with its last good rule; the rest of the configuration still counts.
    assert_eq!(routing.routers.len(), 1);
    assert_eq!(
        routing.routers[0].rule_text,
        "Host(`api.test`) && PathPrefix(`/v1`)"
    );
    assert_eq!(routing.middlewares.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reads_traefiks_kv_layout() {
    let dir = TempDir::new("redis");
    let srv = start_redis(&dir.0);
    let mut spec = redis_spec(srv.port, NO_RESYNC);
    spec.traefik_root = Some("traefik".into());
    let mut p = run_redis(spec);
    let port = srv.port;
    traefik_story(&mut p, "redis:traefik", move |k, v| {
        Box::pin(async move { redis_raw(port, &["SET", k, v]).await })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_reads_traefiks_kv_layout() {
    let dir = TempDir::new("etcd");
    let srv = start_etcd(&dir.0);
    let mut spec = etcd_spec(srv.port);
    spec.traefik_root = Some("traefik".into());
    let mut p = run_etcd(spec);
    let port = srv.port;
    traefik_story(&mut p, "etcd:traefik", move |k, v| {
        Box::pin(async move { etcd_put_raw(port, k, v).await })
    })
    .await;
}

/// A record in the store names files for lb to read as root: only those inside the directories
/// the operator allowed are read; the others are refused, by key, and nothing else is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_kv_file_paths_are_confined() {
    let dir = TempDir::new("redis");
    let srv = start_redis(&dir.0);
    let certs = dir.0.join("certs");
    std::fs::create_dir_all(&certs).expect("dir");
    for f in ["site.crt", "site.key"] {
        std::fs::write(certs.join(f), "x").expect("write");
    }
    // A symlink inside the allowed directory, to a file outside it: refused too.
    std::os::unix::fs::symlink("/etc/passwd", certs.join("link.crt")).expect("symlink");
    let mut spec = redis_spec(srv.port, NO_RESYNC);
    spec.traefik_root = Some("traefik".into());
    spec.traefik_file_dirs = vec![certs.clone()];
    let mut p = run_redis(spec);
    let port = srv.port;
    let inside = |f: &str| certs.join(f).display().to_string();
    let pairs: Vec<(String, String)> = [
        (
            "traefik/http/routers/api/rule",
            "Host(`api.test`)".to_string(),
        ),
        ("traefik/http/routers/api/service", "api".into()),
        (
            "traefik/http/services/api/loadBalancer/servers/0/url",
            "http://10.0.0.1:8080".into(),
        ),
        ("traefik/tls/certificates/0/certFile", "/etc/passwd".into()),
        ("traefik/tls/certificates/0/keyFile", "/etc/shadow".into()),
        (
            "traefik/tls/certificates/1/certFile",
            format!("{}/../../../../etc/passwd", certs.display()),
        ),
        ("traefik/tls/certificates/1/keyFile", inside("site.key")),
        ("traefik/tls/certificates/2/certFile", inside("link.crt")),
        ("traefik/tls/certificates/2/keyFile", inside("site.key")),
        ("traefik/tls/certificates/3/certFile", inside("site.crt")),
        ("traefik/tls/certificates/3/keyFile", inside("site.key")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in &pairs {
        redis_raw(port, &["SET", k, v]).await;
    }
    let ev = p
        .wait_for(
            "routing",
            |_| {},
            |e| {
                matches!(e, Event::Routing { provider, routing, .. }
                if provider == "redis:traefik" && !routing.routers.is_empty()
                    && !routing.certificates.is_empty())
            },
        )
        .await;
    let Event::Routing {
        routing,
        unsupported,
        ..
    } = ev
    else {
        unreachable!()
    };
    let read: Vec<_> = routing.certificates.iter().map(|c| &c.cert_file).collect();
    assert_eq!(
        read,
        vec![&certs.canonicalize().expect("real").join("site.crt")],
        "only the file inside the allowed directory is read"
    );
    assert_eq!(routing.routers.len(), 1, "the rest still counts");
    for i in 0..3 {
        assert!(
            unsupported
                .iter()
                .any(|u| u.contains(&format!("tls.certificates[{i}].certFile"))
                    && u.contains("refused")),
            "certificate {i}: {unsupported:?}"
        );
    }
}

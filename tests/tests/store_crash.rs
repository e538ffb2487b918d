//! The agent killed (SIGKILL) while the admin API writes its store, again and again: every time
//! the next agent starts on the store it left, and every registration the API acknowledged is
//! there. The store is written whole beside the old one, synced, then renamed over it.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    collections::BTreeSet,
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

const TOKEN: &str = "store-crash-token-0123456789";

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lb_bin() -> PathBuf {
    std::env::var_os("LB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lb"))
}

fn start(config: &std::path::Path, api: &str) -> Agent {
    let child = Command::new(lb_bin())
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("lb run");
    let agent = Agent(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while ureq::get(&format!("http://{api}/healthz")).call().is_err() {
        assert!(Instant::now() < deadline, "the agent's API did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    agent
}

#[test]
fn a_store_write_killed_midway_loses_nothing_acknowledged() {
    let dir = std::env::temp_dir().join(format!("lb-store-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/lbt-storecrash-{}", std::process::id()));
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let api = format!("127.0.0.1:{port}");
    let config = dir.join("lb.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ninstance = \"storecrash\"\npin_root = \"{}\"\nstate_dir = \"{}\"\n\n[api]\nlisten = \"{api}\"\ntoken = \"{TOKEN}\"\n",
            pin_root.display(),
            dir.join("state").display()
        ),
    )
    .expect("config");

    let acked: Arc<Mutex<BTreeSet<String>>> = Default::default();
    let mut next = 0u32;
    for round in 0..12u64 {
        let agent = start(&config, &api);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (stop, acked, api) = (stop.clone(), acked.clone(), api.clone());
            let first = next;
            std::thread::spawn(move || {
                let mut n = first;
                while !stop.load(Ordering::SeqCst) {
                    let addr = format!("10.7.{}.{}", n / 250, 1 + n % 250);
                    let r = ureq::post(&format!("http://{api}/api/v1/services/s/instances"))
                        .set("Authorization", &format!("Bearer {TOKEN}"))
                        .timeout(Duration::from_secs(2))
                        .send_json(serde_json::json!({ "address": addr, "port": 80 }));
                    if r.is_ok() {
                        acked.lock().expect("acked").insert(format!("{addr}:80"));
                    }
                    n += 1;
                }
                n
            })
        };
        // Somewhere in the middle of the writes, a different moment each round.
        std::thread::sleep(Duration::from_millis(40 + (round * 37) % 200));
        let mut agent = agent;
        let _ = agent.0.kill();
        let _ = agent.0.wait();
        stop.store(true, Ordering::SeqCst);
        next = writer.join().expect("writer");
    }

    // The last store, read by a fresh agent: every acknowledged registration is there.
    let _agent = start(&config, &api);
    let listed: serde_json::Value = ureq::get(&format!("http://{api}/api/v1/services"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .call()
        .expect("list")
        .into_json()
        .expect("json");
    let mut present = BTreeSet::new();
    for entry in listed["services"]["s"].as_array().into_iter().flatten() {
        let i = &entry["instance"];
        present.insert(format!(
            "{}:{}",
            i["address"].as_str().unwrap_or(""),
            i["port"]
        ));
    }
    let acked = acked.lock().expect("acked").clone();
    let lost: Vec<&String> = acked.difference(&present).collect();
    println!(
        "store crash: 12 kills, {} registrations acknowledged, {} present, {} lost",
        acked.len(),
        present.len(),
        lost.len()
    );
    assert!(acked.len() > 12, "too few writes to judge: {}", acked.len());
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
    drop(_agent);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&pin_root);
}

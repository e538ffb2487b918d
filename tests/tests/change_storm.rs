//! A change storm through the real control loop onto real (test-pinned) maps: 1,000 provider
//! snapshots in a second are coalesced into a few applies, the last one wins, and the time from a
//! change to the maps is measured. Needs root and BPF.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lb_userspace::{
    control::{self, Control},
    l4::dataplane::{self, Dataplane},
    l4::Balancer,
    model::instance::{Instance, Services},
    model::{Limits, Mode, Protocol, VipSpec},
    sources::{store::Store, Event},
};

struct Cleanup(PathBuf, PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = dataplane::detach(&self.0, "storm");
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn snapshot(i: u32) -> Services {
    // Each snapshot: 8 backends (NAT, so no MAC resolution), the weight of the first one moving.
    let mut m = BTreeMap::new();
    for b in 0..8u8 {
        let inst = Instance {
            address: format!("10.9.0.{}", b + 1).parse().expect("static"),
            port: 8080,
            weight: if b == 0 { 1 + i % 50 } else { 1 },
            zone: None,
            metadata: BTreeMap::new(),
        };
        m.insert(inst.key(), inst);
    }
    let mut s = Services::new();
    s.insert("storm".into(), m);
    s
}

#[test]
fn a_thousand_updates_in_a_second_are_coalesced() {
    let tag = format!("{}", std::process::id());
    let pins = PathBuf::from(format!("/sys/fs/bpf/lb-test-storm-{tag}"));
    let state = std::env::temp_dir().join(format!("lb-storm-{tag}"));
    let _cleanup = Cleanup(pins.clone(), state.clone());
    let limits = Limits {
        max_vips: 4,
        max_backends: 64,
        ring_size: 65537,
        max_flows: 4096,
        udp_timeout_secs: 30,
        ipip_source_v4: "172.16.0.0".parse().expect("static"),
        ipip_source_v6: "fd00:ffff::".parse().expect("static"),
    };
    let vip = VipSpec {
        name: "storm".into(),
        address: "10.9.9.9".parse().expect("static"),
        port: 80,
        protocol: Protocol::Tcp,
        mode: Mode::Nat,
        service: "storm".into(),
        backends: vec![],
        health: None,
    };
    let dp = Dataplane::open(&pins, "storm", &limits, false).expect("load program");
    let balancer = Balancer::new(dp, std::slice::from_ref(&vip)).expect("balancer");
    let store = Store::open(&state.join("store.json")).expect("store");
    let control = Arc::new(Mutex::new(Control::new(balancer, store, vec![vip])));

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let n = 1000u32;
    let started = Instant::now();
    rt.block_on(async {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let loop_task = tokio::spawn(control::run(control.clone(), rx));
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        for i in 0..n {
            tick.tick().await;
            let ev = Event::Snapshot {
                provider: "storm".into(),
                rank: 2,
                services: snapshot(i),
                at: Instant::now(),
            };
            tx.send(ev).await.expect("loop alive");
        }
        // Let the last batch land (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let events = control.lock().expect("lock").stats.events;
            if events >= n as u64 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        loop_task.abort();
    });
    let elapsed = started.elapsed();
    let c = control.lock().expect("lock");
    println!(
        "storm: {} events in {elapsed:?} → {} applies, {} map writes; change→map last {} µs, max {} µs",
        c.stats.events, c.stats.applies, c.stats.map_writes, c.stats.last_change_to_map_us, c.stats.max_change_to_map_us
    );
    assert_eq!(c.stats.events, n as u64, "every event was taken");
    assert!(
        c.stats.applies < n as u64 / 5,
        "{} applies for {n} events: not coalesced",
        c.stats.applies
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "the storm took {elapsed:?} to drain"
    );
    // The last snapshot won.
    let views = c.balancer.list().expect("list");
    let first = views[0]
        .backends
        .iter()
        .find(|b| b.address.to_string() == "10.9.0.1")
        .expect("backend");
    assert_eq!(first.weight, 1 + (n - 1) % 50);
    assert_eq!(views[0].backends.len(), 8);
}

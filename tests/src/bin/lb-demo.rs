//! `cargo xtask demo` (and `cargo xtask run` with no arguments): a client, the balancer and three
//! HTTP backends in namespaces, the real agent attached in DSR mode. Interactive by default (prints
//! a curl line and live per-backend counters until Ctrl-C); `--check` sends requests, asserts every
//! backend answered and that the counters saw them, and tears down — `cargo xtask test` runs it so
//! the demo cannot rot.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{ensure, Result};
use lb_tests::{
    lab::{Lab, Mode},
    server::http,
};

fn main() -> Result<()> {
    let check = std::env::args().any(|a| a == "--check");
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        let s = stop.clone();
        // SAFETY: the handler only stores to an atomic.
        unsafe { signal_flag(sig, s) }?;
    }
    let mut lab = Lab::new(
        "lbdemo",
        &std::process::id().to_string(),
        Mode::Dsr,
        3,
        false,
    )?;
    lab.start_servers()?;
    lab.start_agent(&[1, 1, 1])?;
    lab.assert_native()?;
    let vip = lab.vip();
    println!(
        "lb demo: VIP {vip} (DSR) → backends 10.0.0.11, 10.0.0.12, 10.0.0.13, each an HTTP server"
    );
    println!(
        "  from the client namespace:  ip netns exec {} curl -s http://{vip}/",
        lab.client.name
    );
    println!("  the admin API (lb namespace): nsenter --net=/run/netns/{} curl -s -H 'Authorization: Bearer {}' http://{}/api/v1/vips", lab.lb.name, lb_tests::lab::TOKEN, lb_tests::lab::API);

    if check {
        let answers = lab.client.run(move || {
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            for _ in 0..60 {
                if let Ok((200, body)) = http(vip, "GET", "/", None, None) {
                    *seen.entry(body.trim().to_string()).or_insert(0) += 1;
                }
            }
            seen
        })?;
        println!("demo --check: {answers:?}");
        ensure!(
            answers.len() == 3,
            "not every backend answered: {answers:?}"
        );
        ensure!(
            answers.values().sum::<usize>() == 60,
            "some requests failed: {answers:?}"
        );
        let flows: u64 = lab.backend_new_flows()?.iter().map(|(_, n)| n).sum();
        ensure!(
            flows == 60,
            "the program counted {flows} new flows for 60 requests"
        );
        println!("demo --check: ok — 60 requests over 3 backends, counters agree");
        return Ok(());
    }

    println!("\nper-backend counters (Ctrl-C to tear down):");
    while !stop.load(Ordering::SeqCst) {
        let state = lab.vip_state()?;
        let line: Vec<String> = state["backends"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|b| {
                format!(
                    "{} {} pkts / {} conns",
                    b["address"].as_str().unwrap_or("?"),
                    b["counters"]["packets"],
                    b["counters"]["new_flows"]
                )
            })
            .collect();
        println!("  {}", line.join("  |  "));
        for _ in 0..20 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("tearing down");
    Ok(())
}

static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

extern "C" fn on_signal(_: libc::c_int) {
    if let Some(f) = FLAG.get() {
        f.store(true, Ordering::SeqCst);
    }
}

/// # Safety
/// Installs a process-wide signal handler that only touches an atomic.
unsafe fn signal_flag(sig: nix::sys::signal::Signal, flag: Arc<AtomicBool>) -> Result<()> {
    let _ = FLAG.set(flag);
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_signal),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    unsafe { nix::sys::signal::sigaction(sig, &action) }?;
    Ok(())
}

//! The reload soak: configuration changes of every kind — the file and the admin API, L4 and L7 —
//! one after another while wrk drives the proxy and TCP connections cross the XDP tier, long-lived
//! ones echoing throughout and new ones opened all the time. Each change is waited for until it is
//! in effect where traffic sees it. Nothing may fail: no request, no flow. 100 changes here;
//! `cargo xtask soak --changes 1000` is the long mode (LB_SOAK_CHANGES). Needs root.
#![allow(clippy::disallowed_methods)] // real time, real processes

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use lb_tests::{
    lab::{lb_bin, Lab, Mode},
    server::{http, who, Conn},
};

/// The proxy's entry point, on the balancer's own address (the program passes what is not for
/// a VIP to the host).
const L7: &str = "10.0.0.2:8000";

/// Waits until `f` holds, at most 10 s: a change not in effect by then fails the test.
fn wait_until(what: &str, f: &mut dyn FnMut() -> Result<bool>) -> Result<()> {
    let t0 = Instant::now();
    loop {
        if f()? {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("{what}: not in effect after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// lb.toml's L7 part at generation `gen`: the catch-all router (wrk's) carries a header with the
/// generation, and a router of the generation's own answers `/v<gen>`.
fn l7_config(gen: u32, services: &std::path::Path) -> String {
    format!(
        "\n[[entrypoint]]\nname = \"web\"\naddress = \"0.0.0.0:8000\"\n\n\
         [[middleware]]\nname = \"gen\"\n[middleware.headers]\nresponse_set = {{ \"X-Gen\" = \"{gen}\" }}\n\n\
         [[router]]\nname = \"all\"\nrule = \"PathPrefix(`/`)\"\nservice = \"app\"\nmiddlewares = [\"gen\"]\n\n\
         [[router]]\nname = \"v{gen}\"\nrule = \"Path(`/v{gen}`)\"\nservice = \"app\"\n\n\
         [[providers.file]]\npath = \"{}\"\ndebounce_ms = 50\n",
        services.display()
    )
}

/// wrk's summary: requests, and everything that is not a 2xx answer.
fn wrk_failures(out: &str) -> Result<(u64, u64)> {
    let requests = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .with_context(|| format!("no request count in wrk's output:\n{out}"))?;
    let mut failed = 0;
    for l in out.lines().map(str::trim) {
        if let Some(n) = l.strip_prefix("Non-2xx or 3xx responses:") {
            failed += n.trim().parse::<u64>()?;
        }
        if let Some(rest) = l.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in rest.split(',') {
                failed += part
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    Ok((requests, failed))
}

#[test]
fn reloads_under_load_lose_no_request_and_no_flow() -> Result<()> {
    let changes: u32 = std::env::var("LB_SOAK_CHANGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let mut lab = Lab::new("lbt", "soak", Mode::Dsr, 3, false)?;
    lab.start_servers()?;
    let addrs: Vec<_> = (0..3).map(|i| lab.backend_addr(i, false)).collect();
    let b = |i: usize| addrs[i];
    // The proxy's service: two upstreams from a watched file; the third comes and goes by API.
    let services = lab.out_dir.join("services.toml");
    std::fs::write(
        &services,
        format!(
            "[[service]]\nname = \"app\"\n[[service.instance]]\naddress = \"{}\"\nport = 80\n\
             [[service.instance]]\naddress = \"{}\"\nport = 80\n",
            b(0),
            b(1)
        ),
    )?;
    let mut weights = [1u32, 1, 1];
    let mut gen = 0u32;
    lab.start_agent_with(&weights, &l7_config(gen, &services), &lb_bin())?;
    lab.assert_native()?;
    let l7: SocketAddr = L7.parse()?;
    let get = |lab: &Lab, path: &str| -> Result<(u16, String)> {
        let path = path.to_string();
        lab.client.run(move || http(l7, "GET", &path, None, None))?
    };
    wait_until("the proxy", &mut || {
        Ok(get(&lab, "/").is_ok_and(|r| r.0 == 200))
    })?;

    let stop = Arc::new(AtomicBool::new(false));
    let (flows, broken) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let vip = lab.vip();
    let tcp = {
        let (stop, flows, broken) = (stop.clone(), flows.clone(), broken.clone());
        lab.client.spawn(move || -> Result<()> {
            let mut long: Vec<Conn> = (0..20).map(|_| Conn::open(vip)).collect::<Result<_>>()?;
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for (i, c) in long.iter_mut().enumerate() {
                    if c.echo(&format!("{n}-{i}")).is_err() {
                        broken.fetch_add(1, Ordering::SeqCst);
                    }
                }
                for _ in 0..5 {
                    if who(vip).is_err() {
                        broken.fetch_add(1, Ordering::SeqCst);
                    }
                    flows.fetch_add(1, Ordering::SeqCst);
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        })
    };
    // wrk until told to stop (SIGINT: it prints its summary); far longer than the soak needs.
    let wrk = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.client.name))
        .args(["wrk", "-t1", "-c16", "-d3600s", "--timeout", "10s"])
        .arg(format!("http://{L7}/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting wrk (cargo xtask installs it)")?;
    let wrk_pid = nix::unistd::Pid::from_raw(wrk.id() as i32);
    let soak = (|| -> Result<[u32; 4]> {
        std::thread::sleep(Duration::from_millis(500));
        let mut kinds = [0u32; 4];
        let mut registered = false;
        for i in 1..=changes {
            let kind = (i % 4) as usize;
            kinds[kind] += 1;
            let k = kinds[kind];
            match kind {
                // lb.toml, L4: the first backend's weight.
                0 => {
                    weights[0] = 1 + k % 3;
                    lab.update_config(&lab.config_text(&weights, &l7_config(gen, &services)))?;
                    let (addr, w) = (b(0).to_string(), weights[0]);
                    wait_until(&format!("change {i}: file weight {w}"), &mut || {
                        let v = lab.vip_state()?;
                        Ok(v["backends"].as_array().is_some_and(|bs| {
                            bs.iter().any(|x| {
                                x["address"].as_str() == Some(&addr)
                                    && x["weight"].as_u64() == Some(w.into())
                            })
                        }))
                    })?;
                }
                // lb.toml, L7: a new generation of routers and middleware.
                1 => {
                    gen = i;
                    lab.update_config(&lab.config_text(&weights, &l7_config(gen, &services)))?;
                    let path = format!("/v{gen}");
                    wait_until(&format!("change {i}: router v{gen}"), &mut || {
                        Ok(get(&lab, &path).is_ok_and(|r| r.0 == 200))
                    })?;
                }
                // The API, L4: a weight, a drain, an undrain.
                2 => {
                    let (which, body, state, weight) = match k % 3 {
                        0 => (1, Some(1 + k % 4), "active", 1 + k % 4),
                        1 => (2, None, "draining", 1),
                        _ => (2, Some(1), "active", 1),
                    };
                    let addr = b(which).to_string();
                    let (code, text) = match body {
                        Some(w) => lab.api(
                            "POST",
                            "/api/v1/vips/web/backends",
                            Some(&format!(r#"{{"address":"{addr}","port":0,"weight":{w}}}"#)),
                        )?,
                        None => lab.api(
                            "POST",
                            &format!("/api/v1/vips/web/backends/{addr}/drain"),
                            None,
                        )?,
                    };
                    ensure!(matches!(code, 200 | 201 | 204), "change {i}: {code} {text}");
                    wait_until(&format!("change {i}: {addr} {state}"), &mut || {
                        let v = lab.vip_state()?;
                        Ok(v["backends"].as_array().is_some_and(|bs| {
                            bs.iter().any(|x| {
                                x["address"].as_str() == Some(&addr)
                                    && x["state"].as_str() == Some(state)
                                    && x["weight"].as_u64() == Some(weight.into())
                            })
                        }))
                    })?;
                }
                // The API, L7: the third upstream registered, then deregistered.
                _ => {
                    let addr = b(2).to_string();
                    let (code, text) = if registered {
                        lab.api(
                            "DELETE",
                            &format!("/api/v1/services/app/instances/{addr}:80"),
                            None,
                        )?
                    } else {
                        lab.api(
                            "POST",
                            "/api/v1/services/app/instances",
                            Some(&format!(r#"{{"address":"{addr}","port":80}}"#)),
                        )?
                    };
                    ensure!(matches!(code, 200 | 201 | 204), "change {i}: {code} {text}");
                    registered = !registered;
                    // Registered: the proxy sends to it soon; deregistered: 30 answers in a row
                    // come from the other two.
                    let mut others = 0;
                    wait_until(
                        &format!("change {i}: upstream b2 in {registered}"),
                        &mut || {
                            let from_b2 = get(&lab, "/")?.1.contains("b2");
                            others = if from_b2 { 0 } else { others + 1 };
                            Ok(if registered { from_b2 } else { others >= 30 })
                        },
                    )?;
                }
            }
        }
        Ok(kinds)
    })();
    std::thread::sleep(Duration::from_millis(500));
    let _ = nix::sys::signal::kill(wrk_pid, nix::sys::signal::Signal::SIGINT);
    stop.store(true, Ordering::SeqCst);
    let out = wrk.wait_with_output()?;
    tcp.join()
        .map_err(|_| anyhow::anyhow!("tcp client panicked"))???;
    let kinds = soak?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (requests, failed) = wrk_failures(&text)?;
    let (flows, broken) = (flows.load(Ordering::SeqCst), broken.load(Ordering::SeqCst));
    println!(
        "soak: {changes} changes (file L4 {}, file L7 {}, API L4 {}, API L7 {}); wrk {requests} \
         requests, {failed} failed; {flows} new TCP flows and 20 long ones through the VIP, {broken} \
         broken",
        kinds[0], kinds[1], kinds[2], kinds[3]
    );
    ensure!(requests > 0, "wrk made no request:\n{text}");
    ensure!(
        failed == 0,
        "{failed} of {requests} requests failed:\n{text}"
    );
    ensure!(broken == 0, "{broken} TCP exchanges through the VIP failed");
    Ok(())
}

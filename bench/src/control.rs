//! Control plane: Maglev table build time (criterion's samples, read from its output), and how
//! long an admin API change takes to reach the maps and the first new flow — the real agent in the
//! end-to-end tests' namespace lab, a client opening connections all along.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use lb_tests::{
    lab::{Lab, Mode},
    server::who,
};

use crate::report::{col, Table};

pub struct Opts {
    pub rounds: usize,
    /// `<target>/criterion`, where `cargo bench --bench maglev` left its results.
    pub criterion: Option<PathBuf>,
    pub lb_bin: PathBuf,
}

pub fn run(o: &Opts) -> Result<Vec<Table>> {
    let mut out = Vec::new();
    match &o.criterion {
        Some(dir) => out.push(maglev(dir)?),
        None => eprintln!("lb-bench: no criterion directory given, Maglev build times skipped"),
    }
    out.push(api_to_flow(o)?);
    Ok(out)
}

/// Criterion's per-sample times (each sample's total over its iteration count).
fn maglev(dir: &Path) -> Result<Table> {
    let mut t = Table::new(
        "maglev",
        "Maglev table build (M = 65,537)",
        vec![col("build", "ms", 3)],
    );
    for n in [10, 100, 1000] {
        let path = dir.join(format!("maglev_build/{n}/new/sample.json"));
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (run `cargo bench -p lb-userspace --bench maglev`)",
                path.display()
            )
        })?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let iters = v["iters"].as_array().context("sample.json: iters")?;
        let times = v["times"].as_array().context("sample.json: times")?;
        let row = format!("{n} backends");
        for (i, tm) in iters.iter().zip(times) {
            let (i, tm) = (i.as_f64().unwrap_or(0.0), tm.as_f64().unwrap_or(0.0));
            if i > 0.0 {
                t.add(&row, "build", tm / i / 1e6);
            }
        }
    }
    t.note(
        "criterion (`cargo bench -p lb-userspace --bench maglev`): the median and range of its \
         samples, each the mean of many builds. Weights 1, identities as the agent names backends.",
    );
    Ok(t)
}

fn api_to_flow(o: &Opts) -> Result<Table> {
    let mut lab = Lab::new("lbb", "cp", Mode::Dsr, 2, false)?;
    lab.start_servers()?;
    lab.start_agent_with(&[1], "", &o.lb_bin)?;
    lab.assert_native()?;
    let vip = lab.vip();
    let new_backend = lab.backend_addr(1, false);
    let mut t = Table::new(
        "control",
        "Control plane: API change → map → first new flow",
        vec![col("time", "ms", 3)],
    );
    const CALL: &str = "POST a backend → call returns (maps written)";
    const AGENT: &str = "agent's own change → map (apply)";
    const FLOW: &str = "POST sent → first new connection answered by it";
    for r in [CALL, AGENT, FLOW] {
        t.row(r);
    }
    let body = format!(r#"{{"address": "{new_backend}", "port": 0, "weight": 1}}"#);
    let path = format!("/api/v1/vips/web/backends/{new_backend}");
    for _ in 0..o.rounds {
        let (code, _) = lab.api("DELETE", &path, None)?;
        if code != 204 && code != 404 {
            bail!("DELETE {path}: {code}");
        }
        // A steady stream of new connections, each remembering which backend took it and when.
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let (s, v) = (stop.clone(), seen.clone());
        let client = lab.client.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
                if let Ok(name) = who(vip) {
                    if let Ok(mut list) = v.lock() {
                        list.push((Instant::now(), name));
                    }
                }
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        let (code, resp) = lab.api("POST", "/api/v1/vips/web/backends", Some(&body))?;
        let call = t0.elapsed();
        if code != 201 && code != 200 {
            stop.store(true, Ordering::SeqCst);
            let _ = client.join();
            bail!("POST backend: {code} {resp}");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let first = loop {
            let hit = seen
                .lock()
                .map_err(|_| anyhow!("lock"))?
                .iter()
                .find(|(at, name)| *at >= t0 && name == "b1")
                .map(|(at, _)| *at - t0);
            if let Some(d) = hit {
                break Some(d);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        stop.store(true, Ordering::SeqCst);
        let _ = client.join();
        let early = seen
            .lock()
            .map_err(|_| anyhow!("lock"))?
            .iter()
            .filter(|(at, name)| *at < t0 && name == "b1")
            .count();
        if early > 0 {
            bail!("{early} connections reached the new backend before it was added");
        }
        let first = first.context("no new connection reached the added backend within 10 s")?;
        let (code, status) = lab.api("GET", "/api/v1/status", None)?;
        if code == 200 {
            let v: serde_json::Value = serde_json::from_str(&status)?;
            if let Some(us) = v["apply"]["last_change_to_map_us"].as_u64() {
                t.add(AGENT, "time", us as f64 / 1000.0);
            }
        }
        t.add(CALL, "time", call.as_secs_f64() * 1000.0);
        t.add(FLOW, "time", first.as_secs_f64() * 1000.0);
    }
    t.note(format!(
        "The real agent (release build) in namespaces (DSR, 1 backend, then a second one added through \
         the admin API, removed again between rounds), {} rounds. A client opens new connections in a \
         loop all along; the last row is when the first of them answered from the added backend \
         (Maglev gives it about half the new flows).",
        o.rounds
    ));
    Ok(t)
}

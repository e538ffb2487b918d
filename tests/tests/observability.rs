//! End to end for observability: a running agent in namespaces, real traffic, the real admin API.
//! - `/metrics` after N datagrams through a DSR VIP and M requests through the proxy says N and
//!   M exactly, and parses whole with a Prometheus text-format parser; the access log has a line
//!   per request with its fields; SIGHUP reopens it; `lb status` shows the VIPs and backends.
//! - The dashboard in headless Chromium (Debian's `chromium` through `chromedriver`): the login
//!   page and no data without the token; with it, the test config's VIPs and backends, and a
//!   backend drained through the API shown as draining. Screenshots under the test output.
//!
//! Run one at a time (`--test-threads=1`).

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use lb_tests::{
    lab::{lb_bin, Lab, Mode, API, TOKEN, VIP4},
    server::{http, who, UdpSink},
};

const UDP_PORT: u16 = 5353;

/// Every sample of `name` with `labels`, summed (one sample when the labels pick one series).
fn metric(parsed: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let found: Vec<f64> = parsed
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            _ => f64::NAN,
        })
        .collect();
    ensure!(!found.is_empty(), "no sample {name}{labels:?}");
    Ok(found.iter().sum())
}

fn scrape(lab: &Lab) -> Result<(prometheus_parse::Scrape, String)> {
    let (code, text) = lab.api("GET", "/metrics", None)?;
    ensure!(code == 200, "/metrics: {code} {text}");
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .context("parsing /metrics")?;
    ensure!(
        parsed.samples.len() > 50,
        "only {} samples",
        parsed.samples.len()
    );
    Ok((parsed, text))
}

/// The file's lines once it has at least `n` (bounded).
fn lines_of(path: &Path, n: usize) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let got: Vec<String> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        if got.len() >= n || t0.elapsed() > Duration::from_secs(10) {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn metrics_count_datagrams_and_requests_exactly_and_requests_are_logged() -> Result<()> {
    const N: u64 = 400;
    const M: usize = 40;
    let mut lab = Lab::new("lbt", "obs", Mode::Local, 3, false)?;
    lab.start_servers()?;
    let vip_ip = VIP4.parse().expect("static");
    let sinks: Vec<UdpSink> = lab
        .backends
        .iter()
        .map(|b| UdpSink::start(b, SocketAddr::new(vip_ip, UDP_PORT)))
        .collect::<Result<_>>()?;
    let log = lab.out_dir.join("access.log");
    let mut extra = format!(
        "\n[[vip]]\nname = \"dns\"\naddress = \"{VIP4}\"\nport = {UDP_PORT}\nprotocol = \"udp\"\nmode = \"dsr\"\n"
    );
    for i in 0..3 {
        extra += &format!(
            "\n[[vip.backend]]\naddress = \"{}\"\n",
            lab.backend_addr(i, false)
        );
    }
    extra += &format!(
        "\n[[entrypoint]]\nname = \"web\"\naddress = \"0.0.0.0:80\"\n\n\
         [[router]]\nname = \"app\"\nrule = \"PathPrefix(`/app`)\"\nservice = \"web\"\n\n\
         [[router]]\nname = \"dead\"\nrule = \"Path(`/dead`)\"\nservice = \"dead\"\n\n\
         [access_log]\npath = \"{}\"\nformat = \"json\"\n",
        log.display()
    );
    lab.start_agent_with(&[1, 1, 1], &extra, &lb_bin())?;
    lab.assert_native()?;
    // An upstream that refuses connections: a backend's address on a port nothing listens on.
    let dead = SocketAddr::new(lab.backend_addr(0, false), 81);
    let (code, body) = lab.api(
        "POST",
        "/api/v1/services/dead/instances",
        Some(&format!("{{\"address\": \"{}\", \"port\": 81}}", dead.ip())),
    )?;
    ensure!(code == 201, "registering the dead upstream: {code} {body}");

    // The token guards /metrics like the rest of the API.
    let (code, _) = lab
        .lb
        .run(|| http(API.parse().expect("static"), "GET", "/metrics", None, None))??;
    ensure!(code == 401, "/metrics without a token: {code}");

    // N datagrams over four flows through the DSR VIP.
    let target = SocketAddr::new(vip_ip, UDP_PORT);
    lab.client.run(move || -> Result<()> {
        let socks: Vec<std::net::UdpSocket> = (0..4)
            .map(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
            .collect::<Result<_, _>>()?;
        for seq in 0..N {
            socks[(seq % 4) as usize].send_to(&seq.to_be_bytes(), target)?;
            if seq % 50 == 49 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    })??;
    let t0 = Instant::now();
    let received = loop {
        let n: usize = sinks.iter().map(|s| s.seen().len()).sum();
        if n as u64 >= N || t0.elapsed() > Duration::from_secs(5) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    ensure!(
        received as u64 == N,
        "backends received {received} of {N} datagrams"
    );

    // M requests through the proxy (a local VIP), one unrouted, one to the dead upstream.
    let vip = lab.vip();
    let (codes, upstreams) = lab.client.run(move || {
        let mut codes: BTreeMap<u16, usize> = BTreeMap::new();
        let mut bodies = Vec::new();
        for i in 0..M {
            let r =
                http(vip, "GET", &format!("/app/{i}"), None, None).unwrap_or((0, String::new()));
            *codes.entry(r.0).or_default() += 1;
            bodies.push(r.1);
        }
        for path in ["/nothing-here", "/dead"] {
            let r = http(vip, "GET", path, None, None).unwrap_or((0, String::new()));
            *codes.entry(r.0).or_default() += 1;
        }
        (codes, bodies)
    })?;
    ensure!(
        codes.get(&200) == Some(&M) && codes.get(&404) == Some(&1) && codes.get(&502) == Some(&1),
        "answers: {codes:?}"
    );
    ensure!(upstreams.iter().all(|b| b.starts_with("hello from b")));

    let (p, text) = scrape(&lab)?;
    std::fs::write(lab.out_dir.join("metrics.txt"), &text)?;
    let dns = [("vip", "dns")];
    ensure!(
        metric(&p, "lb_vip_packets_total", &dns)? == N as f64,
        "VIP packets ≠ {N}"
    );
    ensure!(
        metric(&p, "lb_backend_packets_total", &dns)? == N as f64,
        "backend packets ≠ {N}"
    );
    let bytes = metric(&p, "lb_vip_bytes_total", &dns)?;
    // 8-byte payload: Ethernet + IPv4 + UDP headers + 8 bytes, the same for every frame.
    ensure!(
        bytes == (N * 50) as f64,
        "VIP bytes {bytes} ≠ {N} × 50-byte frames"
    );
    ensure!(
        metric(&p, "lb_vip_new_flows_total", &dns)? == 4.0,
        "four flows"
    );
    ensure!(
        metric(
            &p,
            "lb_xdp_verdicts_total",
            &[("reason", "tx_dsr"), ("action", "tx")]
        )? == N as f64,
        "tx_dsr verdicts ≠ {N}"
    );
    ensure!(metric(&p, "lb_conntrack_entries", &[])? >= 4.0);
    ensure!(metric(&p, "lb_maglev_rebuilds_total", &dns)? >= 1.0);
    let req = |router: &str, class: &str| {
        metric(
            &p,
            "lb_http_requests_total",
            &[
                ("router", router),
                ("code_class", class),
                ("entrypoint", "web"),
            ],
        )
    };
    ensure!(req("app", "2xx")? == M as f64, "app 2xx ≠ {M}");
    ensure!(req("", "4xx")? == 1.0 && req("dead", "5xx")? == 1.0);
    ensure!(
        metric(&p, "lb_http_request_duration_seconds", &[("router", "app")])? == M as f64,
        "histogram count ≠ {M}"
    );
    ensure!(
        metric(
            &p,
            "lb_http_upstream_connect_errors_total",
            &[("service", "dead")]
        )? == 1.0
    );
    ensure!(metric(&p, "lb_config_generation", &[])? >= 1.0);
    ensure!(
        metric(
            &p,
            "lb_provider_last_success_timestamp_seconds",
            &[("provider", "config")]
        )? > 1e9
    );
    ensure!(
        metric(
            &p,
            "lb_backend_state",
            &[("vip", "web"), ("state", "active")]
        )? == 3.0,
        "three active backends"
    );
    println!(
        "obs: /metrics has {} samples; {N} datagrams and {M} requests counted exactly",
        p.samples.len()
    );

    // One access log line per request.
    let got = lines_of(&log, M + 2);
    ensure!(
        got.len() == M + 2,
        "{} access log lines for {} requests",
        got.len(),
        M + 2
    );
    let entries: Vec<serde_json::Value> = got
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()?;
    let ok = &entries[0];
    ensure!(
        ok["status"] == 200
            && ok["router"] == "app"
            && ok["service"] == "web"
            && ok["client"] == "10.0.0.1"
            && ok["uri"] == "/app/0"
            && ok["bytes"] == "hello from b0\n".len() as u64
            && ok["upstream"]
                .as_str()
                .is_some_and(|u| u.starts_with("10.0.0.1") && u.ends_with(":80"))
            && ok["request_id"].as_str().is_some_and(|r| r.len() == 32)
            && ok["duration_ms"].as_f64().is_some_and(|d| d > 0.0),
        "proxied: {ok}"
    );
    let nf = &entries[M];
    ensure!(
        nf["status"] == 404 && nf["router"].is_null() && nf["uri"] == "/nothing-here",
        "404: {nf}"
    );
    let failed = &entries[M + 1];
    ensure!(
        failed["status"] == 502
            && failed["router"] == "dead"
            && failed["upstream"] == dead.to_string()
            && failed["attempts"] == 1,
        "upstream failure: {failed}"
    );

    // Rotation: rename, SIGHUP, the next line goes to a new file.
    let rotated = lab.out_dir.join("access.log.1");
    std::fs::rename(&log, &rotated)?;
    let pid = lab.agent_pid().ok_or_else(|| anyhow!("no agent"))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    let t0 = Instant::now();
    loop {
        let r = lab
            .client
            .run(move || http(vip, "GET", "/app/after-hup", None, None))??;
        ensure!(r.0 == 200);
        if lines_of(&log, 0)
            .iter()
            .any(|l| l.contains("/app/after-hup"))
        {
            break;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(10),
            "no new access log after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(lines_of(&rotated, 0).len() >= M + 2);

    // `lb status` from the config: VIPs, backends with their state, routers, providers.
    let out = lab.lb.exec(&format!(
        "{} status --config {} --interval 0.3",
        lb_bin().display(),
        lab.out_dir.join("lb.toml").display()
    ))?;
    println!("{out}");
    for want in [
        "dns",
        "10.0.0.100:80/tcp",
        "10.0.0.11",
        "10.0.0.13",
        "active",
        "ROUTERS",
        "app",
        "PROVIDERS",
        "config",
    ] {
        ensure!(out.contains(want), "lb status lacks {want:?}:\n{out}");
    }
    Ok(())
}

/// chromedriver in a namespace, killed with the test.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn find_tool(names: &[&str]) -> Result<String> {
    for n in names {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {n}"))
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(n.to_string());
        }
    }
    bail!("none of {names:?} is installed (apt-get install chromium chromium-driver; see .ci/run)")
}

#[test]
fn dashboard_in_headless_chromium() -> Result<()> {
    let chromium = find_tool(&["chromium", "chromium-browser"])?;
    let chromedriver = find_tool(&["chromedriver"])?;
    let mut lab = Lab::new("lbt", "dash", Mode::Dsr, 3, false)?;
    lab.start_servers()?;
    // Besides the DSR VIP, the proxy on the balancer's own address, with a router and a
    // middleware, so the page has every section filled.
    let proxy = "\n[[entrypoint]]\nname = \"web\"\naddress = \"0.0.0.0:8080\"\n\n\
                 [[middleware]]\nname = \"sec-headers\"\nheaders = { response_set = { \"X-Frame-Options\" = \"DENY\" } }\n\n\
                 [[router]]\nname = \"site\"\nrule = \"PathPrefix(`/`)\"\nservice = \"site\"\nmiddlewares = [\"sec-headers\"]\n";
    lab.start_agent_with(&[1, 1, 2], proxy, &lb_bin())?;
    for i in [0, 2] {
        let body = format!(
            "{{\"address\": \"{}\", \"port\": 80}}",
            lab.backend_addr(i, false)
        );
        let (code, answer) = lab.api("POST", "/api/v1/services/site/instances", Some(&body))?;
        ensure!(code == 201, "registering site: {code} {answer}");
    }
    // Traffic while the page is open, so it has rates to show.
    let stop = Arc::new(AtomicBool::new(false));
    let vip = lab.vip();
    let site: SocketAddr = ([10, 0, 0, 2], 8080).into();
    let traffic = {
        let stop = stop.clone();
        lab.client.spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) && n < 20_000 {
                let _ = who(vip);
                if n.is_multiple_of(2) {
                    let _ = http(site, "GET", "/", None, None);
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let log = std::fs::File::create(lab.out_dir.join("chromedriver.log"))?;
    let port = 9515u16;
    let _driver = Driver(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.lb.name))
            .arg(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting chromedriver")?,
    );
    let driver_addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let t0 = Instant::now();
    while lab
        .lb
        .run(move || TcpStream::connect_timeout(&driver_addr, Duration::from_millis(200)))?
        .is_err()
    {
        ensure!(
            t0.elapsed() < Duration::from_secs(15),
            "chromedriver did not listen"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let shots = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&shots)?;
    let out_dir = lab.out_dir.clone();
    let drained = lab.backend_addr(1, false).to_string();
    // The browser runs in the balancer's namespace, where the admin API listens on loopback;
    // the drain happens through the API from the test, between two browser steps.
    let lab_ref = &lab;
    let result = std::thread::scope(|scope| -> Result<()> {
        let (to_test, from_browser) = std::sync::mpsc::channel::<&'static str>();
        let (to_browser, from_test) = std::sync::mpsc::channel::<()>();
        let lb_ns = format!("/run/netns/{}", lab_ref.lb.name);
        let (chromium, shots, out_dir, for_browser) = (
            chromium.clone(),
            shots.clone(),
            out_dir.clone(),
            drained.clone(),
        );
        let browser = scope.spawn(move || -> Result<()> {
            lb_tests::netns::enter(&lb_ns)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(browse(
                &chromium,
                port,
                &shots,
                &out_dir,
                &for_browser,
                &to_test,
                &from_test,
            ))
        });
        // The browser says when it wants the backend drained.
        match from_browser.recv_timeout(Duration::from_secs(120)) {
            Ok("drain") => {
                let (code, body) = lab_ref.api(
                    "POST",
                    &format!("/api/v1/vips/web/backends/{drained}/drain"),
                    None,
                )?;
                ensure!(code == 204, "drain: {code} {body}");
                let _ = to_browser.send(());
            }
            Ok(other) => bail!("unexpected message {other}"),
            Err(_) => {}
        }
        browser
            .join()
            .map_err(|_| anyhow!("browser thread panicked"))?
    });
    stop.store(true, Ordering::SeqCst);
    let _ = traffic.join();
    result
}

async fn browse(
    chromium: &str,
    port: u16,
    shots: &Path,
    out_dir: &Path,
    drained: &str,
    to_test: &std::sync::mpsc::Sender<&'static str>,
    from_test: &std::sync::mpsc::Receiver<()>,
) -> Result<()> {
    use fantoccini::ClientBuilder;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": format!("/usr/bin/{chromium}"),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1440,1100", "--hide-scrollbars"],
        }),
    );
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .context("WebDriver session (chromium + chromedriver)")?;
    let r = steps(&c, shots, out_dir, drained, to_test, from_test).await;
    let _ = c.close().await;
    r
}

/// Runs `js` in the page and returns what it returns.
async fn js(c: &fantoccini::Client, script: &str) -> Result<serde_json::Value> {
    c.execute(script, vec![])
        .await
        .with_context(|| format!("script {script}"))
}

/// Polls `check` (a script returning a boolean) until it is true, at most `limit`.
async fn until(c: &fantoccini::Client, what: &str, check: &str, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        if js(c, check).await?.as_bool() == Some(true) {
            return Ok(());
        }
        if t0.elapsed() > limit {
            let text = js(c, "return document.body.innerText").await?;
            bail!(
                "{what}: not within {limit:?}; the page says:\n{}",
                text.as_str().unwrap_or("")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn save(c: &fantoccini::Client, shots: &Path, out_dir: &Path, name: &str) -> Result<()> {
    let png = c.screenshot().await?;
    ensure!(png.starts_with(b"\x89PNG"), "not a PNG");
    std::fs::write(shots.join(name), &png)?;
    std::fs::write(out_dir.join(name), &png)?;
    println!("dashboard: screenshot {}", shots.join(name).display());
    Ok(())
}

async fn steps(
    c: &fantoccini::Client,
    shots: &Path,
    out_dir: &Path,
    drained: &str,
    to_test: &std::sync::mpsc::Sender<&'static str>,
    from_test: &std::sync::mpsc::Receiver<()>,
) -> Result<()> {
    use fantoccini::Locator;
    let url = format!("http://{API}/dashboard/");
    c.goto(&url).await?;
    // Without the token: the login form, and nothing of the agent's state.
    until(
        c,
        "login form",
        "return !document.getElementById('login').hidden",
        Duration::from_secs(10),
    )
    .await?;
    let leaked = js(
        c,
        "return [document.documentElement.outerHTML.includes('10.0.0.1'), \
                 document.getElementById('app').hidden, \
                 document.querySelectorAll('[data-vip],[data-backend]').length]",
    )
    .await?;
    ensure!(
        leaked == serde_json::json!([false, true, 0]),
        "without a token the page shows data: {leaked}"
    );
    // The API itself refuses the page's requests without the token.
    let status = c
        .execute_async(
            "const done = arguments[arguments.length - 1]; \
             fetch('/api/v1/vips').then(r => done(r.status), e => done(String(e)))",
            vec![],
        )
        .await?;
    ensure!(
        status == 401,
        "GET /api/v1/vips without a token from the page: {status}"
    );
    save(c, shots, out_dir, "dashboard-login.png").await?;

    // A wrong token is refused.
    let input = c.find(Locator::Id("token")).await?;
    input.send_keys("not-the-token").await?;
    c.find(Locator::Id("login-submit")).await?.click().await?;
    until(
        c,
        "refusal",
        "return document.getElementById('login-error').textContent.includes('refused')",
        Duration::from_secs(10),
    )
    .await?;
    ensure!(js(c, "return document.getElementById('app').hidden").await? == true);

    // The right one: the test config's VIP and its three backends.
    let input = c.find(Locator::Id("token")).await?;
    input.clear().await?;
    input.send_keys(TOKEN).await?;
    c.find(Locator::Id("login-submit")).await?.click().await?;
    until(
        c,
        "the VIP",
        "return !!document.querySelector('[data-vip=\"web\"]')",
        Duration::from_secs(10),
    )
    .await?;
    for b in ["10.0.0.11", "10.0.0.12", "10.0.0.13"] {
        let row = c
            .find(Locator::Css(&format!("tr[data-backend=\"{b}\"]")))
            .await?;
        let text = row.text().await?;
        ensure!(
            text.contains("ACTIVE") || text.contains("active"),
            "{b}: {text}"
        );
    }
    let stored = js(
        c,
        "return [sessionStorage.getItem('lb-admin-token') !== null, document.cookie]",
    )
    .await?;
    ensure!(
        stored == serde_json::json!([true, ""]),
        "token storage: {stored}"
    );
    // Rates need two polls.
    until(
        c,
        "packet rates",
        "return [...document.querySelectorAll('.rates b')].some(b => /^[0-9]/.test(b.textContent))",
        Duration::from_secs(10),
    )
    .await?;

    // Drain one backend through the API; the page shows it.
    to_test.send("drain")?;
    from_test
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| anyhow!("the test did not drain"))?;
    let sel = format!("tr[data-backend=\"{drained}\"]");
    until(
        c,
        "the drained backend",
        &format!("const r = document.querySelector('{sel}'); return !!r && r.dataset.state === 'draining' && r.innerText.toLowerCase().includes('draining')"),
        Duration::from_secs(10),
    )
    .await?;
    let others = js(
        c,
        "return [...document.querySelectorAll('tr[data-backend]')].map(r => r.dataset.state)",
    )
    .await?;
    ensure!(
        others == serde_json::json!(["active", "draining", "active"]),
        "states: {others}"
    );
    let text = js(c, "return document.getElementById('tiles').innerText").await?;
    ensure!(
        text.as_str().is_some_and(|t| t.contains("1 draining")),
        "tiles: {text}"
    );
    let router = c
        .find(Locator::Css("tr[data-router=\"site\"]"))
        .await?
        .text()
        .await?;
    ensure!(
        router.contains("sec-headers") && router.contains("PathPrefix"),
        "router row: {router}"
    );
    until(
        c,
        "request rates",
        "return /^[0-9]/.test(document.querySelector('tr[data-router=\"site\"] td:nth-child(5)').textContent)",
        Duration::from_secs(10),
    )
    .await?;
    save(c, shots, out_dir, "dashboard.png").await?;

    // Signing out leaves nothing on the page.
    c.find(Locator::Id("logout")).await?.click().await?;
    until(c, "signed out", "return !document.getElementById('login').hidden && document.querySelectorAll('[data-vip]').length === 0 && sessionStorage.getItem('lb-admin-token') === null", Duration::from_secs(5)).await?;
    println!("dashboard: login without data, VIP and backends shown, {drained} shown draining, sign-out clears");
    Ok(())
}

/// With `[agent] debug = true`, the XDP program's aya-log messages reach the agent's log: a SYN
/// to a VIP without backends is dropped, and the drop is logged. Without debug, nothing is.
#[test]
fn kernel_log_messages_are_forwarded_in_debug() -> Result<()> {
    let mut lab = Lab::new("lbt", "klog", Mode::Dsr, 1, false)?;
    lab.start_servers()?;
    lab.debug = true;
    let void = format!(
        "\n[[vip]]\nname = \"void\"\naddress = \"{VIP4}\"\nport = 9999\nprotocol = \"tcp\"\nmode = \"dsr\"\n"
    );
    lab.start_agent_with(&[1], &void, &lb_bin())?;
    let target = SocketAddr::new(VIP4.parse().expect("static"), 9999);
    let log = lab.out_dir.join("agent-1.log");
    let t0 = Instant::now();
    loop {
        // Each attempt's SYN is dropped (no backend): the connect times out.
        let _ = lab
            .client
            .run(move || TcpStream::connect_timeout(&target, Duration::from_millis(200)))?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("dropped a packet: reason 12") {
            break;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(15),
            "no kernel-side message in {}:\n{text}",
            log.display()
        );
    }
    // The same drops without debug: counted, not logged.
    lab.stop_agent()?;
    lab.debug = false;
    lab.start_agent_with(&[1], &void, &lb_bin())?;
    let drops = |lab: &Lab| -> Result<u64> {
        let (_, stats) = lab.api("GET", "/api/v1/stats", None)?;
        let v: serde_json::Value = serde_json::from_str(&stats)?;
        Ok(v["verdicts"]["drop_no_backend"].as_u64().unwrap_or(0))
    };
    let before = drops(&lab)?;
    for _ in 0..3 {
        let _ = lab
            .client
            .run(move || TcpStream::connect_timeout(&target, Duration::from_millis(200)))?;
    }
    ensure!(drops(&lab)? > before, "the SYNs were not dropped");
    std::thread::sleep(Duration::from_millis(300));
    let quiet = std::fs::read_to_string(lab.out_dir.join("agent-2.log"))?;
    ensure!(
        !quiet.contains("dropped a packet"),
        "kernel messages without debug:\n{quiet}"
    );
    Ok(())
}

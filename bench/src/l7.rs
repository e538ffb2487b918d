//! L7: wrk (HTTP/1.1) and h2load (HTTP/2, prior knowledge) against lb's proxy, nginx and HAProxy,
//! each with one route to a keep-alive pool of 4 upstreams served by one fast backend (nginx
//! answering a fixed body). Everything runs in one namespace (`lbb-l7`) on its own loopback; the
//! proxies are pinned to the "work" CPU, load generators and the backend to the "load" CPU.
//! Proxy CPU comes from the scheduler's run time of the proxy's process tree over the run; RSS from
//! /proc; the idle test holds 10,000 keep-alive connections (one request each) open.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use lb_tests::netns::Netns;

use crate::{
    report::{col, quantile, Table},
    sys::{self, Cpus, Proc},
};

pub struct Opts {
    pub rounds: usize,
    pub secs: u32,
    pub idle_conns: usize,
    pub cpus: Cpus,
    pub lb_bin: PathBuf,
    /// Another commit's `lb`, run as one more contender: (its name, the binary).
    pub baseline: Option<(String, PathBuf)>,
    pub out: PathBuf,
}

const NS: &str = "lbb-l7";
const UPSTREAM_PORTS: [u16; 4] = [18081, 18082, 18083, 18084];
const CONNS: u32 = 50;
const H2_STREAMS: u32 = 10;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Lb,
    /// [`Opts::baseline`]'s binary, with the same lb.toml as [`Kind::Lb`] on its own ports.
    LbBaseline,
    Nginx,
    Haproxy,
}

struct Proxy {
    kind: Kind,
    name: String,
    /// lb's pin root, removed with the proxy.
    pins: Option<PathBuf>,
    /// HTTP/1.1 port and HTTP/2 (prior knowledge) port.
    h1: u16,
    h2: u16,
    proc: Proc,
    log: PathBuf,
}

pub fn run(o: &Opts) -> Result<Vec<Table>> {
    for tool in ["wrk", "h2load", "nginx", "haproxy"] {
        if sys::run(&["sh", "-c", &format!("command -v {tool}")]).is_err() {
            bail!("{tool} is missing (cargo xtask bench installs it)");
        }
    }
    let nofile = sys::raise_nofile()?;
    if (o.idle_conns as u64) + 1000 > nofile {
        bail!(
            "{} idle connections need more than the open-files limit of {nofile}",
            o.idle_conns
        );
    }
    let _ = std::fs::remove_dir_all(&o.out);
    std::fs::create_dir_all(o.out.join("tmp"))?;
    let ns = Netns::new(NS)?;
    let load = o.cpus.load.to_string();
    let work = o.cpus.work.to_string();

    let be_conf = o.out.join("backend-nginx.conf");
    std::fs::write(&be_conf, backend_nginx(&o.out))?;
    let be_log = o.out.join("backend.log");
    let be_conf_s = be_conf.display().to_string();
    let mut backend = Proc::spawn(
        "backend nginx",
        Some(NS),
        Some(&load),
        &["nginx", "-c", &be_conf_s],
        &be_log,
    )?;
    for p in UPSTREAM_PORTS {
        if let Err(e) = sys::wait_listening(NS, ([127, 0, 0, 1], p).into(), Duration::from_secs(10))
        {
            backend.check_alive(&be_log)?;
            return Err(e);
        }
    }

    let mut generation = 0;
    let mut proxies = Vec::new();
    let mut kinds = vec![Kind::Lb, Kind::Nginx, Kind::Haproxy];
    if o.baseline.is_some() {
        kinds.insert(1, Kind::LbBaseline);
    }
    for kind in kinds {
        generation += 1;
        let mut p = start(kind, o, &work, nofile, generation)?;
        ready(&ns, &mut p)?;
        proxies.push(p);
    }

    let mut t = Table::new(
        "l7",
        "L7 proxy: requests/s, latency, CPU and memory",
        vec![
            col("req/s", "", 0),
            col("p50", "ms", 3),
            col("p99", "ms", 3),
            col("proxy CPU", "% of a core", 0),
            col("CPU/req", "µs", 1),
            col("RSS", "MiB", 1),
        ],
    );
    let mut idle = Table::new(
        "l7_idle",
        &format!(
            "L7 proxy: memory with {} idle keep-alive connections",
            o.idle_conns
        ),
        vec![
            col("RSS before", "MiB", 1),
            col("RSS with idle", "MiB", 1),
            col("per connection", "KiB", 2),
        ],
    );
    for proto in ["HTTP/1.1 (wrk)", "HTTP/2 (h2load)"] {
        for p in &proxies {
            t.row(&format!("{} · {proto}", p.name));
        }
    }
    // Short warm-up so first-request costs (pools, page faults) are not timed.
    for p in &proxies {
        wrk(&load, p.h1, 1)?;
    }
    for round in 0..o.rounds {
        let n = proxies.len();
        for k in 0..n {
            let p = &mut proxies[(k + round) % n];
            p.proc.check_alive(&p.log)?;
            let r = measure(p, &load, o.secs, true, &o.out)?;
            record(&mut t, &format!("{} · HTTP/1.1 (wrk)", p.name), &r);
            let r = measure(p, &load, o.secs, false, &o.out)?;
            record(&mut t, &format!("{} · HTTP/2 (h2load)", p.name), &r);
        }
    }
    // Idle connections last, each proxy freshly started (and answering one request first): load
    // runs leave buffers in the proxies' pools that idle connections would otherwise reuse.
    for round in 0..o.rounds {
        let n = proxies.len();
        for k in 0..n {
            let i = (k + round) % n;
            let kind = proxies[i].kind;
            proxies[i].proc.stop();
            generation += 1;
            proxies[i] = start(kind, o, &work, nofile, generation)?;
            let p = &mut proxies[i];
            ready(&ns, p)?;
            let (before, with) = idle_rss(&ns, p, o.idle_conns)?;
            idle.add(&p.name, "RSS before", before as f64 / 1024.0);
            idle.add(&p.name, "RSS with idle", with as f64 / 1024.0);
            idle.add(
                &p.name,
                "per connection",
                (with as f64 - before as f64) / o.idle_conns as f64,
            );
            p.proc.check_alive(&p.log)?;
        }
    }
    t.note(format!(
        "{} rounds × {} s per tool and proxy, interleaved. wrk -t1 -c{CONNS}; h2load -t1 -c{CONNS} \
         -m{H2_STREAMS} (h2c prior knowledge). Proxy pinned to CPU {}, one worker/thread \
         (lb: a tokio runtime on that one CPU; nginx: one process, no master; HAProxy nbthread 1); \
         load generator and backend on CPU {}. One route, 4 keep-alive upstreams (127.0.0.1:18081–18084) \
         on one backend nginx, round robin, X-Forwarded-For added. CPU: scheduler run time of \
         the proxy's processes ÷ wall time; RSS after the run.",
        o.rounds, o.secs, o.cpus.work, o.cpus.load
    ));
    if let Some((name, _)) = &o.baseline {
        t.note(format!(
            "`lb {name}`: that commit's `lb` binary with the same lb.toml (its own ports, pins \
             and API port), in the same interleaved rounds."
        ));
    }
    idle.note(format!(
        "{} connections opened to each freshly started proxy's HTTP/1.1 port, one request each, \
         then held idle; RSS of the proxy's processes before opening and 0.5 s after the last one.",
        o.idle_conns
    ));
    drop(proxies);
    drop(ns);
    Ok(vec![t, idle])
}

struct RunResult {
    rps: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    requests: f64,
    cpu_ns: u64,
    wall: Duration,
    rss_kib: u64,
}

fn record(t: &mut Table, row: &str, r: &RunResult) {
    t.add(row, "req/s", r.rps);
    if let Some(v) = r.p50_ms {
        t.add(row, "p50", v);
    }
    if let Some(v) = r.p99_ms {
        t.add(row, "p99", v);
    }
    t.add(
        row,
        "proxy CPU",
        100.0 * r.cpu_ns as f64 / r.wall.as_nanos() as f64,
    );
    if r.requests > 0.0 {
        t.add(row, "CPU/req", r.cpu_ns as f64 / 1000.0 / r.requests);
    }
    t.add(row, "RSS", r.rss_kib as f64 / 1024.0);
}

fn measure(p: &Proxy, load: &str, secs: u32, h1: bool, out: &Path) -> Result<RunResult> {
    let pid = p.proc.pid();
    let cpu0 = sys::tree_cpu_ns(pid);
    let t0 = Instant::now();
    let (rps, requests, p50, p99) = if h1 {
        wrk(load, p.h1, secs)?
    } else {
        h2load(
            load,
            p.h2,
            secs,
            &out.join(format!("h2load-{}.log", p.name)),
        )?
    };
    let wall = t0.elapsed();
    let cpu_ns = sys::tree_cpu_ns(pid).saturating_sub(cpu0);
    Ok(RunResult {
        rps,
        p50_ms: p50,
        p99_ms: p99,
        requests,
        cpu_ns,
        wall,
        rss_kib: sys::tree_rss_kib(pid),
    })
}

fn in_ns(cpu: &str, argv: &[&str]) -> Result<String> {
    let mut full = vec![
        "nsenter".to_string(),
        format!("--net=/run/netns/{NS}"),
        "taskset".into(),
        "-c".into(),
        cpu.into(),
    ];
    full.extend(argv.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = full.iter().map(String::as_str).collect();
    sys::run(&refs)
}

/// `wrk`: (requests/s, requests, p50 ms, p99 ms). Fails on errors or non-2xx answers.
fn wrk(cpu: &str, port: u16, secs: u32) -> Result<(f64, f64, Option<f64>, Option<f64>)> {
    let url = format!("http://127.0.0.1:{port}/");
    let c = CONNS.to_string();
    let d = format!("{secs}s");
    let out = in_ns(
        cpu,
        &[
            "wrk",
            "-t1",
            "-c",
            &c,
            "-d",
            &d,
            "--latency",
            "--timeout",
            "5s",
            &url,
        ],
    )?;
    let mut rps = None;
    let mut requests = 0.0f64;
    let (mut p50, mut p99) = (None, None);
    let mut socket_errors = 0u64;
    for line in out.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = l.strip_prefix("50%") {
            p50 = duration_ms(v.trim());
        } else if let Some(v) = l.strip_prefix("99%") {
            p99 = duration_ms(v.trim());
        } else if l.contains("requests in") {
            requests = l
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0);
        } else if let Some(n) = l.strip_prefix("Non-2xx or 3xx responses:") {
            if n.trim().parse::<u64>().unwrap_or(1) > 0 {
                bail!("wrk against port {port}: {l}");
            }
        } else if let Some(list) = l.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            socket_errors = list
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        }
    }
    let rps = rps.with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))?;
    // A few read errors when wrk closes its connections at the end are normal; more is a fault.
    if socket_errors as f64 > 0.001 * requests.max(1000.0) {
        bail!("wrk against port {port}: {socket_errors} socket errors in {requests} requests");
    }
    Ok((rps, requests, p50, p99))
}

/// "635.91us", "1.20ms", "2.00s" → milliseconds.
fn duration_ms(s: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * mult)
}

/// `h2load` with a per-request log: (requests/s, requests, p50 ms, p99 ms).
fn h2load(
    cpu: &str,
    port: u16,
    secs: u32,
    log: &Path,
) -> Result<(f64, f64, Option<f64>, Option<f64>)> {
    let url = format!("http://127.0.0.1:{port}/");
    let c = CONNS.to_string();
    let m = H2_STREAMS.to_string();
    let d = secs.to_string();
    let log_s = log.display().to_string();
    let _ = std::fs::remove_file(log);
    let out = in_ns(
        cpu,
        &[
            "h2load",
            "-t1",
            "-c",
            &c,
            "-m",
            &m,
            "-D",
            &d,
            "--log-file",
            &log_s,
            &url,
        ],
    )?;
    let mut rps = None;
    let mut ok = 0.0;
    for line in out.lines() {
        let l = line.trim();
        if l.starts_with("finished in") {
            rps = l
                .split(',')
                .find(|p| p.contains("req/s"))
                .and_then(|p| p.split_whitespace().next())
                .and_then(|n| n.parse().ok());
        } else if let Some(rest) = l.strip_prefix("requests:") {
            let field = |name: &str| -> u64 {
                rest.split(',')
                    .find(|p| p.trim().ends_with(name))
                    .and_then(|p| p.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            ok = field("succeeded") as f64;
            let failed = field("failed") + field("errored") + field("timeout");
            if failed > 0 {
                bail!("h2load against port {port}: {l}");
            }
        }
    }
    let rps = rps.with_context(|| format!("no req/s in h2load's output:\n{out}"))?;
    if ok == 0.0 {
        bail!("h2load against port {port}: no request succeeded:\n{out}");
    }
    // Log lines: start time, status, duration in microseconds (tab-separated).
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut lat: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok())
        .map(|us| us / 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    Ok((rps, ok, quantile(&lat, 0.50), quantile(&lat, 0.99)))
}

/// One HTTP/1.1 request on a fresh connection: (status, the open connection).
fn get(addr: SocketAddr) -> Result<(u16, TcpStream)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    request(&mut s)
}

fn request(s: &mut TcpStream) -> Result<(u16, TcpStream)> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {status:?}"))?;
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok((code, s.try_clone()?))
}

/// Closes with RST, leaving no TIME_WAIT behind (10,000 of them per round add up).
fn close_abortive(s: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a properly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}

/// RSS before and with `n` idle keep-alive connections (each served one request), in KiB.
fn idle_rss(ns: &Netns, p: &Proxy, n: usize) -> Result<(u64, u64)> {
    let pid = p.proc.pid();
    let before = sys::tree_rss_kib(pid);
    let addr: SocketAddr = ([127, 0, 0, 1], p.h1).into();
    let name = p.name.clone();
    let conns = ns.run(move || -> Result<Vec<TcpStream>> {
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            let (code, s) =
                get(addr).with_context(|| format!("{name}: idle connection {i} of {n}"))?;
            if code != 200 {
                bail!("{name}: idle connection {i} got {code}");
            }
            v.push(s);
        }
        Ok(v)
    })??;
    std::thread::sleep(Duration::from_millis(500));
    let with = sys::tree_rss_kib(pid);
    for c in conns {
        close_abortive(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    Ok((before, with))
}

fn start(kind: Kind, o: &Opts, cpu: &str, nofile: u64, generation: u32) -> Result<Proxy> {
    match kind {
        Kind::Lb => start_lb(o, cpu, generation, None),
        Kind::LbBaseline => start_lb(o, cpu, generation, o.baseline.as_ref()),
        Kind::Nginx => start_nginx(o, cpu, nofile),
        Kind::Haproxy => start_haproxy(o, cpu, nofile),
    }
}

/// Waits for both ports, then requires a 200 to `GET /` before anything is timed.
fn ready(ns: &Netns, p: &mut Proxy) -> Result<()> {
    for port in [p.h1, p.h2] {
        if let Err(e) =
            sys::wait_listening(NS, ([127, 0, 0, 1], port).into(), Duration::from_secs(20))
        {
            p.proc.check_alive(&p.log)?;
            return Err(e);
        }
    }
    let port = p.h1;
    let (code, _) = ns.run(move || get(([127, 0, 0, 1], port).into()))??;
    if code != 200 {
        bail!("{} answered {code} to GET /", p.name);
    }
    Ok(())
}

fn backend_nginx(dir: &Path) -> String {
    let d = dir.display();
    let listens: String = UPSTREAM_PORTS
        .iter()
        .map(|p| format!("        listen 127.0.0.1:{p} reuseport;\n"))
        .collect();
    format!(
        "worker_processes 1;\nmaster_process off;\ndaemon off;\npid {d}/backend.pid;\nerror_log {d}/backend-error.log warn;\n\
         worker_rlimit_nofile 8192;\nevents {{ worker_connections 8192; }}\n\
         http {{\n    access_log off;\n    keepalive_requests 10000000;\n    keepalive_timeout 300s;\n\
         {temps}\n    server {{\n{listens}        location / {{ return 200 \"hello from the backend\\n\"; }}\n    }}\n}}\n",
        temps = temp_paths(dir, "backend"),
    )
}

/// nginx's temp directories, inside the run's own directory (the parent must exist; nginx makes
/// the last level).
fn temp_paths(dir: &Path, who: &str) -> String {
    let d = dir.join("tmp").join(who);
    let _ = std::fs::create_dir_all(&d);
    let d = d.display();
    ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|k| format!("    {k}_temp_path {d}/{k};\n"))
        .collect()
}

fn start_nginx(o: &Opts, cpu: &str, nofile: u64) -> Result<Proxy> {
    let (h1, h2) = (18180, 18190);
    let d = o.out.display();
    let servers: String = UPSTREAM_PORTS
        .iter()
        .map(|p| format!("        server 127.0.0.1:{p};\n"))
        .collect();
    let location = "location / {\n            proxy_pass http://be;\n            proxy_http_version 1.1;\n            \
                    proxy_set_header Connection \"\";\n            proxy_set_header Host $host;\n            \
                    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n            \
                    proxy_set_header X-Forwarded-Proto $scheme;\n            proxy_set_header X-Forwarded-Host $host;\n        }";
    let conf = format!(
        "worker_processes 1;\nmaster_process off;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         worker_rlimit_nofile {nofile};\nevents {{ worker_connections {conns}; }}\n\
         http {{\n    access_log off;\n    keepalive_requests 10000000;\n    keepalive_timeout 300s;\n{temps}\
         \n    upstream be {{\n{servers}        keepalive 64;\n        keepalive_requests 10000000;\n    }}\n\
         \n    server {{\n        listen 127.0.0.1:{h1};\n        {location}\n    }}\n\
         \n    server {{\n        listen 127.0.0.1:{h2} http2;\n        {location}\n    }}\n}}\n",
        temps = temp_paths(&o.out, "nginx"),
        conns = nofile.saturating_sub(100),
    );
    let path = o.out.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let log = o.out.join("nginx.log");
    let p = path.display().to_string();
    let proc = Proc::spawn("nginx", Some(NS), Some(cpu), &["nginx", "-c", &p], &log)?;
    Ok(Proxy {
        kind: Kind::Nginx,
        pins: None,
        name: "nginx".into(),
        h1,
        h2,
        proc,
        log,
    })
}

fn start_haproxy(o: &Opts, cpu: &str, nofile: u64) -> Result<Proxy> {
    let (h1, h2) = (18280, 18290);
    let servers: String = UPSTREAM_PORTS
        .iter()
        .enumerate()
        .map(|(i, p)| format!("    server s{i} 127.0.0.1:{p}\n"))
        .collect();
    let conf = format!(
        "global\n    nbthread 1\n    maxconn {maxconn}\n    no strict-limits\n\n\
         defaults\n    mode http\n    timeout connect 5s\n    timeout client 300s\n    timeout server 300s\n    \
         timeout http-keep-alive 300s\n    option forwardfor\n\n\
         frontend fe\n    bind 127.0.0.1:{h1}\n    bind 127.0.0.1:{h2} proto h2\n    default_backend be\n\n\
         backend be\n    balance roundrobin\n    http-reuse always\n{servers}",
        // HAProxy reserves two descriptors per connection and, unless told `no strict-limits`,
        // refuses to start below that; with pooled upstreams only the client side grows.
        maxconn = nofile.saturating_sub(2000),
    );
    let path = o.out.join("haproxy.cfg");
    std::fs::write(&path, conf)?;
    let log = o.out.join("haproxy.log");
    let p = path.display().to_string();
    let proc = Proc::spawn(
        "haproxy",
        Some(NS),
        Some(cpu),
        &["haproxy", "-db", "-f", &p],
        &log,
    )?;
    Ok(Proxy {
        kind: Kind::Haproxy,
        pins: None,
        name: "HAProxy".into(),
        h1,
        h2,
        proc,
        log,
    })
}

/// This tree's `lb`, or with `baseline` another commit's on ports, pins, instance, state and
/// API port of its own.
fn start_lb(
    o: &Opts,
    cpu: &str,
    generation: u32,
    baseline: Option<&(String, PathBuf)>,
) -> Result<Proxy> {
    let (h1, h2, api, tag) = match baseline {
        None => (18080, 18090, 19090, "lb"),
        Some(_) => (18380, 18390, 19091, "lbbase"),
    };
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/lbb-l7-{}-{generation}",
        std::process::id()
    ));
    let backends: String = UPSTREAM_PORTS
        .iter()
        .map(|p| format!("\n[[vip.backend]]\naddress = \"127.0.0.1\"\nport = {p}\nweight = 1\n"))
        .collect();
    let conf = format!(
        "[agent]\ninstance = \"lbb-{tag}\"\npin_root = \"{pins}\"\nstate_dir = \"{state}\"\n\n\
         [api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"bench-token-0123456789\"\n\n\
         [[vip]]\nname = \"web\"\naddress = \"127.0.0.1\"\nport = {h1}\nprotocol = \"tcp\"\nmode = \"local\"\n{backends}\n\
         [[entrypoint]]\nname = \"web\"\naddress = \"127.0.0.1:{h1}\"\n\n\
         [[entrypoint]]\nname = \"web2\"\naddress = \"127.0.0.1:{h2}\"\n\n\
         [[router]]\nname = \"all\"\nrule = \"PathPrefix(`/`)\"\nservice = \"web\"\n",
        pins = pins.display(),
        state = o.out.join(format!("{tag}-state")).display(),
    );
    // A directory of its own, as /etc/lb would be: lb watches its config file's directory, and
    // the logs written next to it during a run (h2load's, one line per request) would wake
    // lb's watcher on its CPU for every write.
    let dir = o.out.join(format!("{tag}-conf"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("lb.toml");
    std::fs::write(&path, conf)?;
    let log = o.out.join(format!("{tag}.log"));
    let bin = baseline.map_or(&o.lb_bin, |(_, b)| b).display().to_string();
    let p = path.display().to_string();
    // No per-request logging in any of the three.
    let proc = Proc::spawn(
        "lb",
        Some(NS),
        Some(cpu),
        &["env", "RUST_LOG=warn", &bin, "run", "--config", &p],
        &log,
    )?;
    Ok(Proxy {
        kind: if baseline.is_some() {
            Kind::LbBaseline
        } else {
            Kind::Lb
        },
        pins: Some(pins),
        name: baseline.map_or_else(|| "lb".to_string(), |(n, _)| format!("lb {n}")),
        h1,
        h2,
        proc,
        log,
    })
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.proc.stop();
        if let Some(p) = self.pins.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

//! End to end for the L7 tier: a `local` VIP's packets pass the XDP program to this host, where
//! the proxy routes them to the registry's instances. Run one at a time (`--test-threads=1`).

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use lb_tests::{
    lab::{lb_bin, Lab, Mode},
    server::http,
};

#[test]
fn local_vip_reaches_the_proxy_through_xdp() -> Result<()> {
    let mut lab = Lab::new("lbt", "l7", Mode::Local, 3, false)?;
    lab.start_servers()?;
    let proxy = "\n[[entrypoint]]\nname = \"web\"\naddress = \"0.0.0.0:80\"\n\n\
                 [[router]]\nname = \"all\"\nrule = \"PathPrefix(`/`)\"\nservice = \"web\"\n\n\
                 [[router]]\nname = \"none\"\nrule = \"Path(`/nowhere`)\"\nservice = \"empty\"\n";
    lab.start_agent_with(&[1, 1, 1], proxy, &lb_bin())?;
    lab.assert_native()?;
    let vip = lab.vip();
    let (answers, failed, unrouted) = lab.client.run(move || {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut failed = 0;
        for _ in 0..90 {
            match http(vip, "GET", "/hello", None, None) {
                Ok((200, body)) => *seen.entry(body.trim().to_string()).or_insert(0) += 1,
                _ => failed += 1,
            }
        }
        let unrouted = http(vip, "GET", "/nowhere", None, None)
            .map(|r| r.0)
            .unwrap_or(0);
        (seen, failed, unrouted)
    })?;
    println!("l7: {answers:?}, {failed} failed");
    ensure!(
        failed == 0,
        "{failed} requests through the local VIP failed"
    );
    // Smooth round robin over three equal upstreams: exactly a third each.
    ensure!(
        answers.len() == 3 && answers.values().all(|n| *n == 30),
        "{answers:?}"
    );
    ensure!(
        unrouted == 503,
        "a router whose service has no instances answers 503, got {unrouted}"
    );
    let (code, stats) = lab.api("GET", "/api/v1/stats", None)?;
    ensure!(code == 200, "stats: {code}");
    let v: serde_json::Value = serde_json::from_str(&stats)?;
    let local = v["verdicts"]["pass_local"].as_u64().unwrap_or(0);
    ensure!(
        local >= 91,
        "the program passed only {local} packets as local for 91 requests"
    );
    Ok(())
}

/// A config reload during 10,000 requests: a router and a middleware added, an entry point opened
/// then closed, an invalid file rejected in between. No request fails; every change takes effect.
#[test]
fn config_reloads_under_load_lose_no_request() -> Result<()> {
    use std::{
        net::SocketAddr,
        sync::{
            atomic::{AtomicU64, Ordering},
            Arc,
        },
        time::{Duration, Instant},
    };
    let mut lab = Lab::new("lbt", "reload", Mode::Local, 3, false)?;
    lab.start_servers()?;
    let base = "\n[[entrypoint]]\nname = \"web\"\naddress = \"0.0.0.0:80\"\n\n\
                [[router]]\nname = \"all\"\nrule = \"PathPrefix(`/`)\"\nservice = \"web\"\n";
    lab.start_agent_with(&[1, 1, 1], base, &lb_bin())?;
    let vip = lab.vip();
    let alt: SocketAddr = SocketAddr::new(vip.ip(), 8081);
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (done, failed) = (done.clone(), failed.clone());
        workers.push(lab.client.spawn(move || {
            for _ in 0..2500 {
                match http(vip, "GET", "/", None, None) {
                    Ok((200, _)) => {}
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let get = |addr: SocketAddr, path: &'static str| {
        lab.client.run(move || {
            http(addr, "GET", path, None, None)
                .map(|r| r.0)
                .unwrap_or(0)
        })
    };
    let wait_until = |what: &str, f: &dyn Fn() -> bool| -> Result<()> {
        let t0 = Instant::now();
        while !f() {
            ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "{what}: not in effect after 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    };
    let progress = |n: u64| {
        let t0 = Instant::now();
        while done.load(Ordering::SeqCst) < n && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    ensure!(get(vip, "/admin")? == 200);
    progress(1000);
    // 1. A router for /admin behind an allow list the client is not in, and a second entry point.
    let step1 = format!(
        "{base}\n[[middleware]]\nname = \"office\"\nip_allow_list = {{ source_range = [\"192.0.2.0/24\"] }}\n\n\
         [[router]]\nname = \"admin\"\nrule = \"PathPrefix(`/admin`)\"\nservice = \"web\"\nmiddlewares = [\"office\"]\n\n\
         [[entrypoint]]\nname = \"alt\"\naddress = \"0.0.0.0:8081\"\n"
    );
    lab.update_config(&lab.config_text(&[1, 1, 1], &step1))?;
    wait_until("the admin router", &|| {
        get(vip, "/admin").is_ok_and(|c| c == 403)
    })?;
    wait_until("the new entry point", &|| {
        get(alt, "/").is_ok_and(|c| c == 200)
    })?;
    progress(4000);
    // 2. An invalid file: rejected, the last good config stays.
    lab.update_config(&lab.config_text(
        &[1, 1, 1],
        &step1.replace("PathPrefix(`/admin`)", "PathPrefx(`/admin`)"),
    ))?;
    std::thread::sleep(Duration::from_millis(600));
    ensure!(
        get(vip, "/admin")? == 403,
        "a rejected file changed the routing"
    );
    let (_, status) = lab.api("GET", "/api/v1/status", None)?;
    ensure!(
        status.contains("unknown matcher"),
        "status does not show the rejected file: {status}"
    );
    progress(7000);
    // 3. Back to the base: the router and the entry point go.
    lab.update_config(&lab.config_text(&[1, 1, 1], base))?;
    wait_until("the admin router's removal", &|| {
        get(vip, "/admin").is_ok_and(|c| c == 200)
    })?;
    wait_until("the entry point's removal", &|| {
        get(alt, "/").is_ok_and(|c| c == 0)
    })?;
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    let (n, f) = (done.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    println!("reload: {n} requests across 3 reloads (one rejected), {f} failed");
    ensure!(n == 10_000 && f == 0, "{f} of {n} requests failed");
    Ok(())
}

/// A Traefik dynamic configuration in a watched directory, as a Traefik user has it: its router
/// and the middleware from another file of the directory serve through the running agent, what
/// lb does not support shows in the provider's status, a broken router (a new one, and an edit
/// of the serving one) is reported by file and line while the serving one keeps its last good
/// version, and removing the files takes the router away.
#[test]
fn traefik_dynamic_configuration_routes_through_the_agent() -> Result<()> {
    use std::time::{Duration, Instant};
    let mut lab = Lab::new("lbt", "trf", Mode::Local, 2, false)?;
    lab.start_servers()?;
    let dir = lab.out_dir.join("dynamic");
    std::fs::create_dir_all(&dir)?;
    let router = |rule: &str| {
        format!(
            "http:\n  routers:\n    from-traefik:\n      rule: \"{rule}\"\n      \
             service: web\n      middlewares:\n        - strip-t@file\n      observability:\n        \
             accessLogs: false\n"
        )
    };
    std::fs::write(dir.join("dynamic.yml"), router("PathPrefix(`/t/`)"))?;
    // The middleware in another file: the directory is one configuration.
    std::fs::write(
        dir.join("middlewares.yml"),
        "http:\n  middlewares:\n    strip-t:\n      stripPrefix:\n        prefixes:\n          - /t\n",
    )?;
    let extra = format!(
        "\n[[entrypoint]]\nname = \"web\"\naddress = \"0.0.0.0:80\"\n\n\
         [[router]]\nname = \"only-root\"\nrule = \"Path(`/`)\"\nservice = \"web\"\n\n\
         [[providers.file]]\npath = \"{}\"\ndebounce_ms = 50\n",
        dir.display()
    );
    lab.start_agent_with(&[1, 1], &extra, &lb_bin())?;
    let vip = lab.vip();
    let get = |path: &'static str| {
        lab.client
            .run(move || http(vip, "GET", path, None, None).map(|r| r.0).unwrap_or(0))
    };
    let wait_until = |what: &str, f: &dyn Fn() -> Result<bool>| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f()? {
            ensure!(Instant::now() < deadline, "{what}: not within 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    };
    wait_until("the Traefik router", &|| Ok(get("/t/hello")? == 200))?;
    ensure!(get("/elsewhere")? == 404, "only the two routers route");
    let (_, status) = lab.api("GET", "/api/v1/status", None)?;
    ensure!(
        status.contains("from-traefik.observability: not supported"),
        "the unsupported key is not reported: {status}"
    );

    // A new router without a rule, and the serving router's rule broken.
    std::fs::write(
        dir.join("more.yml"),
        "http:\n  routers:\n    no-rule:\n      service: web\n",
    )?;
    std::fs::write(dir.join("dynamic.yml"), router("PathPrefix(`/t/`"))?;
    let broken = || -> Result<String> {
        let (_, status) = lab.api("GET", "/api/v1/status", None)?;
        Ok(status)
    };
    wait_until("both broken routers reported", &|| {
        let s = broken()?;
        Ok(
            s.contains("more.yml:3: http.routers.no-rule: rule is required; left out")
                && s.contains("dynamic.yml:4: http.routers.from-traefik.rule")
                && s.contains("keeping its last good version"),
        )
    })?;
    ensure!(
        get("/t/hello")? == 200,
        "the serving router keeps its last good version"
    );
    for f in ["dynamic.yml", "middlewares.yml", "more.yml"] {
        std::fs::remove_file(dir.join(f))?;
    }
    wait_until("the router's removal", &|| Ok(get("/t/hello")? == 404))?;
    ensure!(get("/")? == 200, "lb.toml's router stays");
    Ok(())
}

/// `lb run --traefik traefik.yml` with no lb.toml: a Traefik install configuration and its
/// directory of dynamic files run as written. Port 80 redirects to 443 (its
/// `http.redirections`); 443 takes TLS and plain HTTP as Traefik's entry points do, and its
/// `tls` router answers only TLS; a third entry point serves a plain router. The agent runs in
/// a mount namespace of its own (fresh bpffs, /var/lib and /run), since lb's defaults name the
/// host's paths. `lb check-config --traefik` says the same file is fine, and fails on one that
/// asks for what lb cannot honour.
#[test]
fn a_traefik_install_configuration_runs_without_lb_toml() -> Result<()> {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let ns = lb_tests::netns::Netns::new("lbt-trs")?;
    let _up = lb_tests::server::Server::start(&ns, "app", 8081)?;
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("output/traefik-static");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("dynamic"))?;
    // A CA and app.test's certificate, which the dynamic file names (tls.certificates).
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "lb traefik test CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec!["app.test".to_string()])?
        .signed_by(&key, &ca, &ca_key)?;
    std::fs::write(dir.join("ca.crt"), ca.pem())?;
    std::fs::write(dir.join("app.crt"), leaf.pem())?;
    std::fs::write(dir.join("app.key"), key.serialize_pem())?;
    // Traefik's documentation's shape (install-configuration/entrypoints.md, providers/file.md).
    let install = "entryPoints:\n  web:\n    address: \":80\"\n    http:\n      redirections:\n        \
                   entryPoint:\n          to: websecure\n          scheme: https\n  websecure:\n    \
                   address: \":443\"\n  other:\n    address: \":8000\"\n  behind:\n    address: \":8001\"\n    \
                   proxyProtocol:\n      trustedIPs: [127.0.0.1]\n\
                   providers:\n  file:\n    directory: dynamic\napi:\n  dashboard: true\n";
    std::fs::write(dir.join("traefik.yml"), install)?;
    std::fs::write(
        dir.join("dynamic/app.yml"),
        format!(
            "http:\n  routers:\n    app:\n      rule: Host(`app.test`)\n      service: app\n      \
             entryPoints: [websecure]\n      tls: {{}}\n    open:\n      rule: PathPrefix(`/`)\n      \
             service: app\n      entryPoints: [other]\n    guarded:\n      rule: PathPrefix(`/`)\n      \
             service: app\n      entryPoints: [behind]\n      middlewares: [only-doc]\n  \
             middlewares:\n    only-doc:\n      ipAllowList:\n        sourceRange: [192.0.2.7]\n  services:\n    app:\n      loadBalancer:\n        \
             servers:\n          - url: http://127.0.0.1:8081\n\
             tls:\n  certificates:\n    - certFile: {0}/app.crt\n      keyFile: {0}/app.key\n",
            dir.display()
        ),
    )?;
    let check = Command::new(lb_bin())
        .args(["check-config", "--traefik"])
        .arg(dir.join("traefik.yml"))
        .output()?;
    let said = String::from_utf8_lossy(&check.stdout).into_owned();
    ensure!(
        check.status.success(),
        "check-config: {said}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    ensure!(said.contains("4 entry points, 1 file providers"), "{said}");

    let log = std::fs::File::create(dir.join("agent.log"))?;
    let script = format!(
        "mount -t bpf bpf /sys/fs/bpf && mount -t tmpfs tmpfs /var/lib && mount -t tmpfs tmpfs /run && \
         exec {} run --traefik {}",
        lb_bin().display(),
        dir.join("traefik.yml").display()
    );
    let mut agent = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .args([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ])
        .env("RUST_LOG", "info")
        .env("LB_API_TOKEN", lb_tests::lab::TOKEN)
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()?;
    struct Stop<'a>(&'a mut std::process::Child);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let agent = Stop(&mut agent);
    let curl = |args: &str| -> Result<String> {
        ns.exec(&format!(
            "curl -s -o /dev/null --max-time 5 --cacert {}/ca.crt --resolve app.test:443:127.0.0.1 \
             --resolve app.test:80:127.0.0.1 -w '%{{http_code}} %{{redirect_url}}' {args}",
            dir.display()
        ))
        .or_else(|_| Ok("000".into()))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while curl("https://app.test/")? != "200 " {
        ensure!(
            Instant::now() < deadline,
            "the TLS router does not answer within 20 s: {}",
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let redirect = curl("http://app.test/some/path?q=1")?;
    ensure!(
        redirect == "301 https://app.test/some/path?q=1",
        "port 80 redirects to websecure: {redirect}"
    );
    let plain = curl("http://app.test:443/")?;
    ensure!(
        plain.starts_with("404"),
        "a plain request on 443 is not the TLS router's: {plain}"
    );
    let other = curl("http://127.0.0.1:8000/")?;
    ensure!(
        other.starts_with("200"),
        "the plain router of `other`: {other}"
    );
    // `behind` believes PROXY headers from 127.0.0.1 only: the header's client is the one the
    // allow list sees; from 127.0.0.2 the header is not believed (the request is malformed).
    let proxied = |from: &'static str| -> Result<u16> {
        let line = format!(
            "PROXY TCP4 {from} 127.0.0.1 40000 8001\r\nGET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
        );
        ns.run(move || -> Result<u16> {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect("127.0.0.1:8001")?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(line.as_bytes())?;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            Ok(out
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0))
        })?
    };
    ensure!(
        proxied("192.0.2.7")? == 200,
        "the allowed client, through the PROXY header"
    );
    ensure!(
        proxied("192.0.2.8")? == 403,
        "another client, through the PROXY header"
    );
    ensure!(
        curl("http://127.0.0.1:8001/")?.starts_with("403"),
        "no header: the balancer itself is not allowed"
    );
    let untrusted = ns.exec(
        "curl -s -o /dev/null -w '%{http_code}' --max-time 5 --interface 127.0.0.2 --haproxy-protocol http://127.0.0.1:8001/ || true",
    )?;
    ensure!(
        untrusted == "400",
        "a PROXY header from a source not trusted: {untrusted}"
    );
    drop(agent);

    // What lb cannot honour leaves its entry point out, and check-config fails on it.
    std::fs::write(
        dir.join("mw.yml"),
        "entryPoints:\n  web:\n    address: \":80\"\n    http:\n      middlewares: [auth@file]\n",
    )?;
    let check = Command::new(lb_bin())
        .args(["check-config", "--traefik"])
        .arg(dir.join("mw.yml"))
        .output()?;
    let said = String::from_utf8_lossy(&check.stdout).into_owned();
    ensure!(
        !check.status.success(),
        "check-config passes an entry point's middlewares: {said}"
    );
    ensure!(
        said.contains("error: ")
            && said.contains("entryPoints.web: left out: entryPoints.web.http.middlewares"),
        "{said}"
    );
    Ok(())
}

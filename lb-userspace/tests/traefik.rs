//! Traefik's dynamic configuration, written as Traefik's documentation writes it (YAML and TOML),
//! read by lb's file provider and served by lb's proxy against real upstreams: routers, a
//! middleware chain, services with their servers, and every unsupported key reported by path.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes (curl)

use std::{collections::HashMap, path::Path, sync::Arc};

use lb_userspace::{
    model::instance::Services,
    proxy::Proxy,
    sources::file::{parse_any, FileSource},
};

mod common;
use common::*;

fn yaml(a: u16, b: u16, c: u16, hash: &str) -> String {
    format!(
        r#"
http:
  routers:
    api:
      rule: "Host(`api.test`) && PathPrefix(`/api`)"
      entryPoints:
        - web
      service: api
      middlewares:
        - secured@file
    site:
      rule: "Host(`www.test`)"
      priority: 10
      service: site
      tls: {{}}
    legacy:
      rule: "Host(`old.test`)"
      service: site
      middlewares:
        - to-new
  middlewares:
    secured:
      chain:
        middlewares:
          - auth
          - strip-api
          - hdrs
    auth:
      basicAuth:
        users:
          - "alice:{hash}"
    strip-api:
      stripPrefix:
        prefixes:
          - "/api"
    hdrs:
      headers:
        customRequestHeaders:
          X-Script-Name: "lb"
          X-Debug: ""
        frameDeny: true
    to-new:
      redirectRegex:
        regex: "^http://old\\.test/(.*)"
        replacement: "http://www.test/${{1}}"
        permanent: true
    limit:
      rateLimit:
        average: 120
        period: 1m
        burst: 50
  services:
    api:
      loadBalancer:
        servers:
          - url: "http://127.0.0.1:{a}/"
          - url: "http://127.0.0.1:{b}/"
        healthCheck:
          path: /health
          interval: 10s
    site:
      loadBalancer:
        servers:
          - url: "http://127.0.0.1:{c}"
        sticky:
          cookie:
            name: site_affinity
    both:
      weighted:
        services:
          - name: api
            weight: 3
          - name: site
            weight: 1
tls:
  options:
    default:
      minVersion: VersionTLS12
"#
    )
}

fn toml_text(a: u16, b: u16, c: u16, hash: &str) -> String {
    format!(
        r#"
[http.routers.api]
  rule = "Host(`api.test`) && PathPrefix(`/api`)"
  entryPoints = ["web"]
  service = "api"
  middlewares = ["secured@file"]

[http.routers.site]
  rule = "Host(`www.test`)"
  priority = 10
  service = "site"
  [http.routers.site.tls]

[http.routers.legacy]
  rule = "Host(`old.test`)"
  service = "site"
  middlewares = ["to-new"]

[http.middlewares.secured.chain]
  middlewares = ["auth", "strip-api", "hdrs"]

[http.middlewares.auth.basicAuth]
  users = ["alice:{hash}"]

[http.middlewares.strip-api.stripPrefix]
  prefixes = ["/api"]

[http.middlewares.hdrs.headers]
  frameDeny = true
  [http.middlewares.hdrs.headers.customRequestHeaders]
    X-Script-Name = "lb"
    X-Debug = ""

[http.middlewares.to-new.redirectRegex]
  regex = "^http://old\\.test/(.*)"
  replacement = "http://www.test/${{1}}"
  permanent = true

[http.middlewares.limit.rateLimit]
  average = 120
  period = "1m"
  burst = 50

[http.services.api.loadBalancer]
  [[http.services.api.loadBalancer.servers]]
    url = "http://127.0.0.1:{a}/"
  [[http.services.api.loadBalancer.servers]]
    url = "http://127.0.0.1:{b}/"
  [http.services.api.loadBalancer.healthCheck]
    path = "/health"
    interval = "10s"

[http.services.site.loadBalancer]
  [[http.services.site.loadBalancer.servers]]
    url = "http://127.0.0.1:{c}"
  [http.services.site.loadBalancer.sticky.cookie]
    name = "site_affinity"

[http.services.both.weighted]
  [[http.services.both.weighted.services]]
    name = "api"
    weight = 3
  [[http.services.both.weighted.services]]
    name = "site"
    weight = 1

[tls.options.default]
  minVersion = "VersionTLS12"
"#
    )
}

/// The unsupported key paths, without the file name in front.
fn unsupported(list: &[String]) -> Vec<String> {
    let mut v: Vec<String> = list
        .iter()
        .map(|u| u.split_once(": ").map_or(u.clone(), |(_, r)| r.to_string()))
        .map(|u| u.split(": ").next().unwrap_or("").to_string())
        .collect();
    v.sort();
    v
}

async fn serve_traefik(file: &str, text: &str) -> (Arc<Proxy>, std::net::SocketAddr, Services) {
    let doc = parse_any(Path::new(file), text).expect("a valid Traefik configuration");
    let (proxy, l) = bound(vec![], &Services::new(), HashMap::new(), HashMap::new()).await;
    let addr = l.local_addr().expect("addr");
    let problems = proxy.set_dynamic("file", doc.routing);
    assert!(problems.is_empty(), "{problems:?}");
    proxy.update_services(&doc.services);
    tokio::spawn(proxy.clone().serve("web".into(), l, None));
    (proxy, addr, doc.services)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_yaml_and_toml_route_the_same() {
    let (a, b, c) = (
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    );
    let hash = bcrypt::hash("s3cret", 4).expect("hash");
    use base64::Engine as _;
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
    );
    let mut reports = Vec::new();
    for (file, text) in [
        ("dynamic.yml", yaml(a.port(), b.port(), c.port(), &hash)),
        (
            "dynamic.toml",
            toml_text(a.port(), b.port(), c.port(), &hash),
        ),
    ] {
        let doc = parse_any(Path::new(file), &text).expect(file);
        reports.push(unsupported(&doc.unsupported));
        let (_p, addr, services) = serve_traefik(file, &text).await;
        assert_eq!(services["api"].len(), 2, "{file}");
        let cl = client();
        // The chain: BasicAuth, then StripPrefix, then Headers; both servers take turns.
        assert_eq!(
            get(&cl, addr, "api.test", "/api/users", &[]).await.0,
            401,
            "{file}"
        );
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (code, body) = get(
                &cl,
                addr,
                "api.test",
                "/api/users",
                &[("authorization", &auth), ("x-debug", "1")],
            )
            .await;
            assert_eq!(code, 200, "{file}: {body}");
            assert!(body.contains(" /users "), "{file}: stripped: {body}");
            seen.push(body.split(' ').next().unwrap_or("").to_string());
        }
        seen.sort();
        assert_eq!(seen, vec!["a", "a", "b", "b"], "{file}");
        // `site` is a TLS router (`tls`): it never answers plain HTTP, as in Traefik.
        let (code, body) = get(&cl, addr, "www.test", "/", &[]).await;
        assert_eq!((code, body.split(' ').next()), (404, Some("no")), "{file}");
        let req = hyper::Request::get(format!("http://{addr}/page?x=1"))
            .header("host", "old.test")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("req");
        let resp = cl.request(req).await.expect("resp");
        assert_eq!(resp.status(), 301, "{file}");
        assert_eq!(
            resp.headers().get("location").and_then(|v| v.to_str().ok()),
            Some("http://www.test/page?x=1"),
            "{file}"
        );
        assert_eq!(
            get(&cl, addr, "nowhere.test", "/", &[]).await.0,
            404,
            "{file}"
        );
    }
    assert_eq!(reports[0], reports[1], "YAML and TOML report the same");
    assert!(
        reports[0].is_empty(),
        "nothing unsupported (minVersion TLS 1.2 is what lb does: honoured, not reported; the \
         healthCheck runs, against upstreams that answer it; `weighted` is served): {:?}",
        reports[0]
    );
}

#[test]
fn bad_values_name_the_key_and_the_line() {
    let text = yaml(
        1,
        2,
        3,
        "$2y$04$abcdefghijklmnopqrstuu5JvDPBbA2yQYTHX3Y6JQhM6l1pDq6Sy",
    )
    .replace("Host(`www.test`)", "Hots(`www.test`)");
    // The broken router is left out alone, at its line; the rest of the file applies.
    let doc = parse_any(Path::new("dynamic.yml"), &text).expect("the rest applies");
    let e = &doc.broken[0];
    assert_eq!(doc.broken.len(), 1, "{:?}", doc.broken);
    assert!(
        e.reason.starts_with("http.routers.site.rule: column 1") && e.reason.ends_with("left out"),
        "{e}"
    );
    assert!(!doc.routing.routers.iter().any(|r| r.name == "site"));
    assert!(!doc.routing.routers.is_empty(), "the other routers stay");
    let line = text
        .lines()
        .position(|l| l.contains("Hots("))
        .expect("line")
        + 1;
    assert_eq!(e.line, line, "{e}");

    let text = toml_text(1, 2, 3, "$2y$04$x").replace("http://127.0.0.1:3", "ftp://127.0.0.1:3");
    let doc = parse_any(Path::new("dynamic.toml"), &text).expect("the rest applies");
    assert!(
        doc.broken.iter().any(|e| e
            .reason
            .contains("http.services.site.loadBalancer.servers[0].url")),
        "{:?}",
        doc.broken
    );
    assert!(
        !doc.routing.routers.iter().any(|r| r.service == "site"),
        "its routers go with it"
    );
    // An allow list that could check another address than the one meant (an ipStrategy key
    // lb does not know) is refused outright.
    let text = yaml(1, 2, 3, "$2y$04$x").replace(
        "    limit:\n",
        "    office:\n      ipAllowList:\n        sourceRange: [\"10.0.0.0/8\"]\n        ipStrategy:\n          depth: 1\n          fromTheLeft: true\n    limit:\n",
    );
    let doc = parse_any(Path::new("dynamic.yml"), &text).expect("the rest applies");
    assert!(
        doc.broken.iter().any(|e| e
            .reason
            .starts_with("http.middlewares.office.ipAllowList.ipStrategy.fromTheLeft")),
        "{:?}",
        doc.broken
    );
    let plain = yaml(1, 2, 3, "secret");
    let doc = parse_any(Path::new("d.yml"), &plain).expect("parses");
    let (_, problems) = lb_userspace::proxy::dynamic::Built::new(doc.routing, None);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("auth") && p.contains("plain text"))
            && problems.iter().any(|p| p.contains("router api: left out")),
        "a plain-text password leaves the middleware and its router out: {problems:?}"
    );
}

#[test]
fn a_directory_mixes_traefik_and_lb_files() {
    let dir = std::env::temp_dir().join(format!("lb-traefik-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _c = Cleanup(dir.clone());
    std::fs::write(
        dir.join("traefik.yml"),
        "http:\n  services:\n    api:\n      loadBalancer:\n        servers:\n          - url: http://10.0.0.1:8080\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("lb.toml"),
        "[[service]]\nname = \"api\"\n[[service.instance]]\naddress = \"10.0.0.2\"\nport = 8080\n",
    )
    .expect("write");
    let mut src = FileSource::new(&dir);
    let (services, routing, errors) = src.reload_all();
    assert!(errors.is_empty(), "{errors:?}");
    let members: Vec<String> = services["api"].keys().map(|k| k.to_string()).collect();
    assert_eq!(members, vec!["10.0.0.1:8080", "10.0.0.2:8080"]);
    assert!(routing.dynamic.services.contains_key("api"));
}

/// Security options lb cannot honour (client CA files it cannot read, middleware settings it
/// lacks), each on a router of its own; one with options lb applies (TLS 1.3 only); and one
/// router that needs none of them, so the document is read and served, minus the routers it
/// would weaken.
const GUARDED: &str = r#"
http:
  routers:
    open:
      rule: "Host(`open.test`)"
      service: site
    mtls:
      rule: "Host(`mtls.test`)"
      service: site
      tls:
        options: strict@file
    cafiles:
      rule: "Host(`cafiles.test`)"
      service: site
      tls:
        options: cas
    modern:
      rule: "Host(`modern.test`)"
      service: site
      tls:
        options: tls13
    sso:
      rule: "Host(`sso.test`)"
      service: site
      middlewares: [sso]
    hosts:
      rule: "Host(`hosts.test`)"
      service: site
      middlewares: [onlyhosts]
  middlewares:
    sso:
      forwardAuth:
        address: "http://127.0.0.1:9/verify"
        authResponseHeadersRegex: "^X-Auth-"
    onlyhosts:
      headers:
        allowedHosts: ["hosts.test"]
  services:
    site:
      loadBalancer:
        servers:
          - url: "http://127.0.0.1:{port}"
tcp:
  routers:
    db:
      rule: "HostSNI(`*`)"
      entryPoints: [postgres]
      service: db
      middlewares: [office]
    odddb:
      rule: "HostSNI(`*`)"
      entryPoints: [postgres]
      service: db
      middlewares: [odd]
    tlsdb:
      rule: "HostSNI(`db.test`)"
      service: db
      tls:
        options: strict
    passdb:
      rule: "HostSNI(`pass.test`)"
      service: db
      tls:
        passthrough: true
        options: strict
  middlewares:
    office:
      ipAllowList:
        sourceRange: ["10.0.0.0/8"]
    odd:
      ipAllowList:
        sourceRange: ["10.0.0.0/8"]
        ipStrategy:
          depth: 1
  services:
    db:
      loadBalancer:
        servers:
          - address: "127.0.0.1:5432"
tls:
  options:
    strict:
      clientAuth:
        caFiles: ["/etc/lb/clients-ca.pem"]
        clientAuthType: RequireAndVerifyClientCert
    cas:
      clientAuth:
        caFiles: ["/etc/lb/clients-ca.pem"]
    tls13:
      minVersion: VersionTLS13
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_options_lb_cannot_honour_leave_their_routers_out() {
    let site = upstream("site").await;
    let text = GUARDED.replace("{port}", &site.port().to_string());
    let doc = parse_any(Path::new("guarded.yml"), &text).expect("the rest is valid");
    let (built, problems) = lb_userspace::proxy::dynamic::Built::new(doc.routing, None);
    let mut routers: Vec<&str> = built
        .dynamic
        .routers
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    routers.sort();
    assert_eq!(
        routers,
        vec!["modern", "open"],
        "{:?} / {problems:?}",
        doc.unsupported
    );
    let tcp: Vec<&str> = built
        .dynamic
        .tcp_routers
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        tcp,
        vec!["db", "passdb"],
        "passthrough terminates no TLS: options do not apply; an ipAllowList is honoured"
    );
    assert_eq!(
        built.dynamic.tcp_routers[0].guards.allow,
        vec![vec!["10.0.0.0/8".parse::<ipnet::IpNet>().expect("cidr")]]
    );
    // Each router left out is reported with what it needed.
    let broken: Vec<String> = doc.broken.iter().map(|b| b.to_string()).collect();
    let said = format!("{:?} {problems:?} {broken:?}", doc.unsupported);
    for (router, why) in [
        ("http.routers.mtls", "clients-ca.pem"),
        ("http.routers.cafiles", "clients-ca.pem"),
        (
            "tcp.middlewares.odd.ipAllowList.ipStrategy",
            "not supported",
        ),
        ("tcp.routers.odddb: left out", "odd"),
        ("tcp.routers.tlsdb", "clients-ca.pem"),
        ("http.middlewares.sso", "authResponseHeadersRegex"),
        ("http.middlewares.onlyhosts", "allowedHosts"),
        ("http.routers.sso: left out", "sso"),
        ("http.routers.hosts: left out", "onlyhosts"),
    ] {
        assert!(
            said.contains(router) && said.contains(why),
            "{router} ({why}) is reported: {said}"
        );
    }
    // Served: the client without a certificate reaches nothing behind the mTLS router.
    let (proxy, l) = bound(vec![], &Services::new(), HashMap::new(), HashMap::new()).await;
    let addr = l.local_addr().expect("addr");
    let doc = parse_any(Path::new("guarded.yml"), &text).expect("valid");
    proxy.set_dynamic("file", doc.routing);
    proxy.update_services(&doc.services);
    tokio::spawn(proxy.clone().serve("web".into(), l, None));
    let cl = client();
    assert_eq!(get(&cl, addr, "open.test", "/", &[]).await.0, 200);
    for host in [
        "mtls.test",
        "cafiles.test",
        "modern.test",
        "sso.test",
        "hosts.test",
    ] {
        assert_eq!(get(&cl, addr, host, "/", &[]).await.0, 404, "{host}");
    }
}

#[test]
fn broken_default_tls_options_leave_every_router_out() {
    let text = "http:\n  routers:\n    a:\n      rule: \"Host(`a.test`)\"\n      service: s\n      tls: {}\n    b:\n      rule: \"Host(`b.test`)\"\n      service: s\n  services:\n    s:\n      loadBalancer:\n        servers:\n          - url: \"http://127.0.0.1:1\"\ntls:\n  options:\n    default:\n      clientAuth:\n        caFiles: [\"/etc/lb/ca.pem\"]\n        clientAuthType: VerifyClientCertIfGiven\n";
    let doc = parse_any(Path::new("default.yml"), text).expect("valid");
    assert!(
        doc.routing.routers.is_empty(),
        "the default options (their CA file does not read) guard every router an entry point may serve over TLS: {:?}",
        doc.routing
            .routers
            .iter()
            .map(|r| &r.name)
            .collect::<Vec<_>>()
    );
    let broken: Vec<String> = doc.broken.iter().map(|b| b.to_string()).collect();
    let said = format!("{}\n{}", doc.unsupported.join("\n"), broken.join("\n"));
    assert!(
        said.contains("/etc/lb/ca.pem") && said.contains("http.routers.a"),
        "{said}"
    );
}

/// `loadBalancer.healthCheck` and `passiveHealthCheck` as Traefik's reference writes them
/// (docs/content/reference/routing-configuration/http/load-balancing/service.md, "Health
/// Check" and "Passive Health Check", v3.7), in YAML and TOML, translate to the same checks;
/// what lb cannot check as asked leaves the service (and its routers) out, by key.
#[test]
fn health_checks_translate_the_same_from_yaml_and_toml() {
    let yaml = r#"
http:
  routers:
    app:
      rule: "Host(`app.test`)"
      service: app
  services:
    app:
      loadBalancer:
        servers:
          - url: "http://127.0.0.1:8081"
        healthCheck:
          path: /health?full=1
          method: head
          interval: 10s
          unhealthyInterval: 2s
          timeout: 3s
          hostname: app.internal
          port: 9000
          status: 204
          followRedirects: true
          headers:
            X-Check: lb
        passiveHealthCheck:
          failureWindow: 30s
          maxFailedAttempts: 5
"#;
    let toml = r#"
[http.routers.app]
rule = "Host(`app.test`)"
service = "app"

[http.services.app.loadBalancer]
[[http.services.app.loadBalancer.servers]]
url = "http://127.0.0.1:8081"
[http.services.app.loadBalancer.healthCheck]
path = "/health?full=1"
method = "head"
interval = "10s"
unhealthyInterval = "2s"
timeout = "3s"
hostname = "app.internal"
port = 9000
status = 204
followRedirects = true
[http.services.app.loadBalancer.healthCheck.headers]
X-Check = "lb"
[http.services.app.loadBalancer.passiveHealthCheck]
failureWindow = "30s"
maxFailedAttempts = 5
"#;
    let s = std::time::Duration::from_secs;
    let want = lb_userspace::model::l7::ActiveCheck {
        interval: s(10),
        unhealthy_interval: s(2),
        timeout: s(3),
        path: "/health?full=1".into(),
        method: "HEAD".into(),
        hostname: Some("app.internal".into()),
        port: Some(9000),
        status: Some(204),
        headers: vec![("X-Check".into(), "lb".into())],
        rise: 1,
        fall: 1,
    };
    for (file, text) in [("d.yml", yaml), ("d.toml", toml)] {
        let doc = parse_any(Path::new(file), text).expect("parses");
        assert!(doc.broken.is_empty(), "{file}: {:?}", doc.broken);
        assert!(doc.unsupported.is_empty(), "{file}: {:?}", doc.unsupported);
        let spec = &doc.routing.services["app"];
        assert_eq!(spec.health.as_ref(), Some(&want), "{file}");
        assert_eq!(
            (spec.passive.failures, spec.passive.backoff),
            (5, s(30)),
            "{file}"
        );
        assert_eq!(doc.routing.routers.len(), 1);
    }
    // Traefik's defaults (interval 30s, timeout 5s, GET /), when only the path is said.
    let doc = parse_any(
        Path::new("d.yml"),
        &yaml.replace(
            "          method: head\n          interval: 10s\n          unhealthyInterval: 2s\n          timeout: 3s\n          hostname: app.internal\n          port: 9000\n          status: 204\n          followRedirects: true\n          headers:\n            X-Check: lb\n",
            "",
        ),
    )
    .expect("parses");
    let h = doc.routing.services["app"].health.clone().expect("checked");
    assert_eq!(
        (
            h.interval,
            h.unhealthy_interval,
            h.timeout,
            h.method.as_str(),
            h.status
        ),
        (s(30), s(30), s(5), "GET", None)
    );
    // What lb cannot check as asked: the service is left out with its router, by key.
    for (from, to, says) in [
        ("method: head", "mode: grpc", "healthCheck.mode"),
        ("path: /health?full=1", "path: health", "healthCheck: path"),
        ("method: head", "scheme: https", "healthCheck.scheme"),
        ("timeout: 3s", "timeout: 1m", "healthCheck: timeout"),
        (
            "maxFailedAttempts: 5",
            "maxFailedAttempts: 0",
            "maxFailedAttempts",
        ),
    ] {
        let doc = parse_any(Path::new("d.yml"), &yaml.replace(from, to)).expect("parses");
        assert!(
            doc.broken.iter().any(|e| e.reason.contains(says)),
            "{to}: {:?}",
            doc.broken
        );
        assert!(doc.routing.routers.is_empty(), "{to}: its router goes too");
    }
}

/// `weighted` and `failover` services as Traefik's reference writes them
/// (docs/content/reference/routing-configuration/http/load-balancing/service.md, "Weighted
/// Round Robin" and "Failover", v3.7), in YAML and TOML: translated to the same composites, the
/// services they name asked of the registry; one naming a service that is missing, broken or in
/// a loop is left out with its routers, by key.
#[test]
fn weighted_and_failover_services_translate_the_same_from_yaml_and_toml() {
    use lb_userspace::model::l7::Composite;
    let yaml = r#"
http:
  routers:
    canary:
      rule: "Host(`app.test`)"
      service: canary
    ha:
      rule: "Host(`ha.test`)"
      service: ha@file
  services:
    canary:
      weighted:
        services:
          - name: v1
            weight: 3
          - name: v2@file
            weight: 1
        healthCheck: {}
    ha:
      failover:
        service: v1
        fallback: canary
        healthCheck: {}
    v1:
      loadBalancer:
        servers:
          - url: "http://127.0.0.1:8081"
        healthCheck:
          path: /health
    v2:
      loadBalancer:
        servers:
          - url: "http://127.0.0.1:8082"
"#;
    let toml = r#"
[http.routers.canary]
rule = "Host(`app.test`)"
service = "canary"
[http.routers.ha]
rule = "Host(`ha.test`)"
service = "ha@file"

[http.services.canary.weighted]
healthCheck = {}
[[http.services.canary.weighted.services]]
name = "v1"
weight = 3
[[http.services.canary.weighted.services]]
name = "v2@file"
weight = 1

[http.services.ha.failover]
service = "v1"
fallback = "canary"
healthCheck = {}

[http.services.v1.loadBalancer]
[[http.services.v1.loadBalancer.servers]]
url = "http://127.0.0.1:8081"
[http.services.v1.loadBalancer.healthCheck]
path = "/health"

[http.services.v2.loadBalancer]
[[http.services.v2.loadBalancer.servers]]
url = "http://127.0.0.1:8082"
"#;
    for (file, text) in [("d.yml", yaml), ("d.toml", toml)] {
        let doc = parse_any(Path::new(file), text).expect("parses");
        assert!(doc.broken.is_empty(), "{file}: {:?}", doc.broken);
        assert!(doc.unsupported.is_empty(), "{file}: {:?}", doc.unsupported);
        let s = &doc.routing.services;
        assert_eq!(
            s["canary"].composite,
            Some(Composite::Weighted(vec![
                ("v1".into(), 3),
                ("v2".into(), 1)
            ])),
            "{file}"
        );
        assert_eq!(
            s["ha"].composite,
            Some(Composite::Failover {
                main: "v1".into(),
                fallback: "canary".into()
            }),
            "{file}"
        );
        assert_eq!(doc.routing.routers.len(), 2, "{file}");
        assert!(doc.services.contains_key("v1") && doc.services.contains_key("v2"));
    }
    for (from, to, says, router) in [
        ("name: v2@file", "name: v3", "no service \"v3\"", "canary"),
        (
            "fallback: canary",
            "fallback: gone",
            "no service \"gone\"",
            "ha",
        ),
        (
            "          - url: \"http://127.0.0.1:8082\"",
            "          - url: \"ftp://127.0.0.1:8082\"",
            "its service \"v2\" is not usable",
            "canary",
        ),
        (
            "            weight: 3",
            "            weight: -3",
            "weight",
            "canary",
        ),
    ] {
        let doc = parse_any(Path::new("d.yml"), &yaml.replace(from, to)).expect("parses");
        assert!(
            doc.broken.iter().any(|e| e.reason.contains(says)),
            "{to}: {:?}",
            doc.broken
        );
        assert!(
            !doc.routing.routers.iter().any(|r| r.name == router),
            "{to}: the router on the broken composite goes"
        );
    }
    // Two composites naming each other: both broken, as a loop.
    let looped = yaml.replace("name: v2@file", "name: ha");
    let doc = parse_any(Path::new("d.yml"), &looped).expect("parses");
    assert!(
        doc.broken
            .iter()
            .any(|e| e.reason.contains("part of a loop")),
        "{:?}",
        doc.broken
    );
    assert!(doc.routing.routers.is_empty(), "{:?}", doc.routing.routers);
}

/// `passHostHeader: false` (Traefik's reference: routing/services, "Pass Host Header"): each
/// server gets its URL's host and port as written; `true`, the default, passes the client's.
#[test]
fn pass_host_header_false_keeps_each_servers_url_host() {
    let yaml = r#"
http:
  routers:
    app:
      rule: "Host(`app.test`)"
      service: app
  services:
    app:
      loadBalancer:
        passHostHeader: false
        servers:
          - url: "http://localhost:8081/"
          - url: "http://127.0.0.1:8082"
"#;
    let doc = parse_any(Path::new("d.yml"), yaml).expect("parses");
    assert!(doc.unsupported.is_empty(), "{:?}", doc.unsupported);
    let hosts = doc.routing.services["app"]
        .upstream_host
        .clone()
        .expect("not the client's Host");
    let mut values: Vec<&str> = hosts.values().map(String::as_str).collect();
    values.sort();
    assert_eq!(values, ["127.0.0.1:8082", "localhost:8081"]);
    let doc = parse_any(
        Path::new("d.yml"),
        &yaml.replace("passHostHeader: false", "passHostHeader: true"),
    )
    .expect("parses");
    assert_eq!(doc.routing.services["app"].upstream_host, None);
}

/// Retry as Traefik's reference writes it (routing/http/middlewares/retry, v3.7): every option
/// read, `maxRequestBodyBytes` reported (lb replays only what a buffering middleware holds).
#[test]
fn retry_options_translate_from_yaml_and_toml() {
    let yaml = r#"
http:
  middlewares:
    test-retry:
      retry:
        attempts: 4
        initialInterval: 100ms
        timeout: 60s
        maxRequestBodyBytes: 1024
        status:
          - "400"
          - "500-599"
        disableRetryOnNetworkError: true
        retryNonIdempotentMethod: true
"#;
    let toml = r#"
[http.middlewares.test-retry.retry]
attempts = 4
initialInterval = "100ms"
timeout = "60s"
maxRequestBodyBytes = 1024
status = ["400", "500-599"]
disableRetryOnNetworkError = true
retryNonIdempotentMethod = true
"#;
    for (file, text) in [("d.yml", yaml), ("d.toml", toml)] {
        let doc = parse_any(Path::new(file), text).expect("parses");
        let Some((_, lb_userspace::model::middleware::MiddlewareConfig::Retry(r))) =
            doc.routing.middlewares.first()
        else {
            panic!("{file}: {:?}", doc.routing.middlewares)
        };
        assert_eq!(
            (
                r.attempts,
                r.initial_interval_ms,
                r.timeout_ms,
                r.status.clone(),
                r.disable_retry_on_network_error,
                r.retry_non_idempotent_method
            ),
            (
                4,
                100,
                60_000,
                vec!["400".to_string(), "500-599".to_string()],
                true,
                true
            ),
            "{file}"
        );
        assert_eq!(
            unsupported(&doc.unsupported),
            ["http.middlewares.test-retry.retry.maxRequestBodyBytes"],
            "{file}"
        );
    }
}

/// Server schemes and HTTP/2 (routing/services: servers' `url`, serversTransport
/// `disableHTTP2`): `h2c://` is HTTP/2 without TLS; `https://` and `http://` stay HTTP/1.1
/// (lb does not offer h2 by ALPN to https servers: HTTP/2 would carry the upstream's address
/// as `:authority`); an h2c service cannot take a TLS transport.
#[test]
fn server_schemes_choose_http2_as_traefik_does() {
    let text = r#"
http:
  serversTransports:
    h1only:
      disableHTTP2: true
  services:
    grpc:
      loadBalancer:
        servers:
          - url: "h2c://127.0.0.1:50051"
    tls:
      loadBalancer:
        servers:
          - url: "https://127.0.0.1:8443"
    tls-h1:
      loadBalancer:
        serversTransport: h1only
        servers:
          - url: "https://127.0.0.1:8444"
    plain:
      loadBalancer:
        servers:
          - url: "http://127.0.0.1:8080"
    odd:
      loadBalancer:
        serversTransport: h1only
        servers:
          - url: "h2c://127.0.0.1:50052"
"#;
    let doc = parse_any(Path::new("schemes.yml"), text).expect("the rest applies");
    let s = &doc.routing.services;
    let h2 = |n: &str| (s[n].http2, s[n].tls.is_some());
    assert_eq!(h2("grpc"), (true, false));
    assert_eq!(h2("tls"), (false, true));
    assert_eq!(h2("tls-h1"), (false, true));
    assert_eq!(h2("plain"), (false, false));
    assert!(!s.contains_key("odd"));
    assert!(
        doc.broken.iter().any(|e| e
            .reason
            .contains("http.services.odd.loadBalancer.serversTransport")
            && e.reason.contains("h2c servers are spoken to without TLS")),
        "{:?}",
        doc.broken
    );
}

/// Several mirrors and `mirrorBody` (routing/services: mirroring), and `responseForwarding.
/// flushInterval` (routing/services: response forwarding), which lb honours by passing each
/// chunk on as it comes.
#[test]
fn mirrors_mirror_body_and_flush_interval_are_read() {
    let text = r#"
http:
  services:
    app:
      loadBalancer:
        responseForwarding:
          flushInterval: 100ms
        servers:
          - url: "http://127.0.0.1:8080"
    streaming:
      loadBalancer:
        responseForwarding:
          flushInterval: -1
        servers:
          - url: "http://127.0.0.1:8081"
    one:
      loadBalancer:
        servers:
          - url: "http://127.0.0.1:8082"
    two:
      loadBalancer:
        servers:
          - url: "http://127.0.0.1:8083"
    shadowed:
      mirroring:
        service: app
        mirrorBody: false
        maxBodySize: 2048
        mirrors:
          - name: one
            percent: 10
          - name: two@file
            percent: 50
"#;
    let doc = parse_any(Path::new("mirrors.yml"), text).expect("valid");
    assert!(doc.broken.is_empty(), "{:?}", doc.broken);
    assert!(
        !doc.unsupported
            .iter()
            .any(|u| u.contains("responseForwarding") || u.contains("mirror")),
        "{:?}",
        doc.unsupported
    );
    let m = doc.routing.services["shadowed"]
        .mirror
        .clone()
        .expect("a mirror");
    assert_eq!(
        m.targets
            .iter()
            .map(|t| (t.service.as_str(), t.percent))
            .collect::<Vec<_>>(),
        [("one", 10.0), ("two", 50.0)]
    );
    assert!(!m.body);
    assert_eq!(m.max_body_bytes, 2048);
}

/// `ipAllowList.ipStrategy` and `rateLimit.sourceCriterion` as Traefik documents them
/// (middlewares/http/ipallowlist, ratelimit): behind a trusted proxy the allow list checks the
/// client its `depth` names; from a client the entry point does not trust, `X-Forwarded-For`
/// is dropped before any middleware, so no header can make it someone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_strategies_check_the_client_a_trusted_proxy_names() {
    use lb_userspace::model::l7::EntryPointSpec;
    let up = upstream("app").await;
    let text = format!(
        r#"
http:
  routers:
    guarded:
      rule: "PathPrefix(`/`)"
      service: app
      middlewares: [office]
    limited:
      rule: "PathPrefix(`/limited`)"
      service: app
      middlewares: [per-client]
  middlewares:
    office:
      ipAllowList:
        sourceRange: ["192.0.2.0/24"]
        ipStrategy:
          depth: 1
    per-client:
      rateLimit:
        average: 1
        burst: 1
        period: 1m
        sourceCriterion:
          ipStrategy:
            excludedIPs: ["198.51.100.0/24"]
  services:
    app:
      loadBalancer:
        servers:
          - url: "http://{up}"
"#
    );
    let doc = parse_any(Path::new("strategies.yml"), &text).expect("valid");
    assert!(doc.broken.is_empty(), "{:?}", doc.broken);
    assert!(
        !doc.unsupported.iter().any(|u| u.contains("ipStrategy")),
        "{:?}",
        doc.unsupported
    );
    let mut addrs = Vec::new();
    for trusted in [true, false] {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = EntryPointSpec {
            name: "web".into(),
            address: l.local_addr().unwrap(),
            tls: false,
            client_ca_file: None,
            trusted_ips: if trusted {
                vec!["127.0.0.0/8".parse().unwrap()]
            } else {
                vec![]
            },
            limits: Default::default(),
            also_plain: false,
            as_default: false,
            proxy_protocol: None,
        };
        let proxy = Arc::new(Proxy::new(
            vec![ep],
            vec![],
            HashMap::new(),
            HashMap::new(),
            &Services::new(),
        ));
        proxy.set_dynamic("file", doc.routing.clone());
        proxy.update_services(&doc.services);
        addrs.push(l.local_addr().unwrap());
        tokio::spawn(proxy.serve("web".into(), l, None));
    }
    let (trusted, untrusted) = (addrs[0], addrs[1]);
    let cl = client();
    let code = |addr, xff: &'static str| {
        let cl = cl.clone();
        async move {
            let h: Vec<(&str, &str)> = if xff.is_empty() {
                vec![]
            } else {
                vec![("x-forwarded-for", xff)]
            };
            get(&cl, addr, "app.test", "/", &h).await.0
        }
    };
    assert_eq!(code(trusted, "203.0.113.9, 192.0.2.7").await, 200);
    assert_eq!(code(trusted, "192.0.2.7, 203.0.113.9").await, 403);
    assert_eq!(
        code(trusted, "").await,
        403,
        "no header: no client at depth 1"
    );
    assert_eq!(code(untrusted, "203.0.113.9, 192.0.2.7").await, 403);
    // The rate limit counts the rightmost address that is not one of the excluded proxies.
    let limited = |xff: &'static str| {
        let cl = cl.clone();
        async move {
            get(
                &cl,
                trusted,
                "app.test",
                "/limited",
                &[("x-forwarded-for", xff)],
            )
            .await
            .0
        }
    };
    assert_eq!(limited("192.0.2.10, 198.51.100.1").await, 200);
    assert_eq!(
        limited("192.0.2.10, 198.51.100.2").await,
        429,
        "the same client through another excluded proxy"
    );
    assert_eq!(
        limited("192.0.2.11, 198.51.100.1").await,
        200,
        "another client"
    );
}

/// A router's `tls.certResolver` (routing/routers "certResolver", https/acme "domain
/// definition"): its `tls.domains` when it has them, else the hosts of its rule; a name no CA
/// can issue (a wildcard, an address) is reported and not asked for.
#[test]
fn routers_ask_their_resolver_for_their_names() {
    let text = r#"
http:
  routers:
    by-rule:
      rule: "Host(`a.test`) || Host(`www.a.test`)"
      service: app
      tls:
        certResolver: le
    by-domains:
      rule: "HostRegexp(`.+`)"
      service: app
      tls:
        certResolver: le
        domains:
          - main: b.test
            sans: ["*.b.test", "c.test"]
    no-resolver:
      rule: "Host(`d.test`)"
      service: app
      tls: {}
  services:
    app:
      loadBalancer:
        servers:
          - url: "http://127.0.0.1:8080"
"#;
    let doc = parse_any(Path::new("acme.yml"), text).expect("valid");
    let mut got: Vec<(String, Vec<String>)> = doc
        .routing
        .acme
        .iter()
        .map(|w| (w.resolver.clone(), w.names.clone()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (
                "le".to_string(),
                vec!["a.test".to_string(), "www.a.test".into()]
            ),
            (
                "le".to_string(),
                vec!["b.test".to_string(), "c.test".into()]
            ),
        ]
    );
    assert!(
        doc.unsupported
            .iter()
            .any(|u| u.contains("\"*.b.test\" is not ordered: wildcards")),
        "{:?}",
        doc.unsupported
    );
}

/// The `errors` middleware (middlewares/http/errorpages): an answer in the status ranges is
/// replaced by the error service's page for `query` (`{status}`, `{url}`), the status kept;
/// other answers pass untouched; when the page cannot be had, the status's reason is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_pages_replace_the_answers_in_their_ranges() {
    use bytes::Bytes;
    use http_body_util::Full;
    let app = serve(|req: hyper::Request<hyper::body::Incoming>| async move {
        let code = match req.uri().path() {
            "/broken" => 503,
            "/missing" => 404,
            "/teapot" => 418,
            _ => 200,
        };
        let mut r = hyper::Response::new(Full::new(Bytes::from("from the app")));
        *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
        r
    })
    .await;
    let pages = serve(|req: hyper::Request<hyper::body::Incoming>| async move {
        let host = req
            .headers()
            .get("host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        let mut r = hyper::Response::new(Full::new(Bytes::from(format!(
            "page {} for {host}",
            req.uri()
        ))));
        r.headers_mut()
            .insert("content-type", "text/html".parse().unwrap());
        r
    })
    .await;
    let text = |pages_url: &str| {
        format!(
            r#"
http:
  routers:
    app:
      rule: "PathPrefix(`/`)"
      service: app
      middlewares: [pages]
  middlewares:
    pages:
      errors:
        status: ["500-599", "404"]
        service: error-pages@file
        query: "/{{status}}.html?from={{url}}"
  services:
    app:
      loadBalancer:
        servers:
          - url: "http://{app}"
    error-pages:
      loadBalancer:
        servers:
          - url: "{pages_url}"
"#
        )
    };
    let doc = parse_any(Path::new("errors.yml"), &text(&format!("http://{pages}"))).expect("valid");
    assert!(
        doc.broken.is_empty() && doc.unsupported.is_empty(),
        "{:?} {:?}",
        doc.broken,
        doc.unsupported
    );
    let (proxy, l) = bound(vec![], &Services::new(), HashMap::new(), HashMap::new()).await;
    let addr = l.local_addr().expect("addr");
    proxy.set_dynamic("file", doc.routing);
    proxy.update_services(&doc.services);
    tokio::spawn(proxy.clone().serve("web".into(), l, None));
    let cl = client();
    let (code, body) = get(&cl, addr, "shop.test", "/broken?x=1", &[]).await;
    assert_eq!(
        (code, body.as_str()),
        (503, "page /503.html?from=%2Fbroken%3Fx%3D1 for shop.test")
    );
    let (code, body) = get(&cl, addr, "shop.test", "/missing", &[]).await;
    assert_eq!(
        (code, body.as_str()),
        (404, "page /404.html?from=%2Fmissing for shop.test")
    );
    for path in ["/fine", "/teapot"] {
        let (code, body) = get(&cl, addr, "shop.test", path, &[]).await;
        assert_eq!(body, "from the app", "{path} ({code}) is not in the ranges");
    }
    // The error service unreachable: the status and its reason.
    let doc = parse_any(Path::new("errors.yml"), &text("http://127.0.0.1:9")).expect("valid");
    proxy.set_dynamic("file", doc.routing);
    proxy.update_services(&doc.services);
    let (code, body) = get(&cl, addr, "shop.test", "/broken", &[]).await;
    assert_eq!((code, body.as_str()), (503, "Service Unavailable\n"));
}

/// `digestAuth` (middlewares/http/digestauth) with an htdigest users file, spoken to by curl:
/// the right password passes (and the upstream never sees the credentials), a wrong one and
/// none are asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_auth_lets_curl_in_with_the_right_password_only() {
    use md5::{Digest as _, Md5};
    let up = serve(|req: hyper::Request<hyper::body::Incoming>| async move {
        let h = |k: &str| {
            req.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(format!(
            "auth={} user={}",
            h("authorization"),
            h("x-user")
        ))))
    })
    .await;
    let dir = std::env::temp_dir().join(format!("lb-digest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ha1: String = Md5::digest(b"alice:staff:s3cret")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(
        dir.join("users.htdigest"),
        format!("alice:staff:{ha1}\nbob:elsewhere:{ha1}\n"),
    )
    .unwrap();
    let text = format!(
        r#"
http:
  routers:
    app:
      rule: "PathPrefix(`/`)"
      service: app
      middlewares: [staff]
  middlewares:
    staff:
      digestAuth:
        usersFile: {}
        realm: staff
        headerField: X-User
  services:
    app:
      loadBalancer:
        servers:
          - url: "http://{up}"
"#,
        dir.join("users.htdigest").display()
    );
    let doc = parse_any(Path::new("digest.yml"), &text).expect("valid");
    assert!(doc.broken.is_empty(), "{:?}", doc.broken);
    let (proxy, l) = bound(vec![], &Services::new(), HashMap::new(), HashMap::new()).await;
    let addr = l.local_addr().expect("addr");
    proxy.set_dynamic("file", doc.routing);
    proxy.update_services(&doc.services);
    tokio::spawn(proxy.clone().serve("web".into(), l, None));
    let curl = |user: Option<&'static str>| {
        let url = format!("http://{addr}/private?x=1");
        async move {
            let mut c = tokio::process::Command::new("curl");
            c.args(["-s", "-w", "\n%{http_code}", "--max-time", "5"]);
            if let Some(u) = user {
                c.args(["--digest", "-u", u]);
            }
            let out = c.arg(&url).output().await.expect("curl");
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let ok = curl(Some("alice:s3cret")).await;
    assert!(ok.ends_with("\n200"), "{ok}");
    assert!(
        ok.starts_with("auth=- user=alice\n"),
        "the upstream gets the user, never the credentials: {ok}"
    );
    assert!(curl(Some("alice:guess")).await.ends_with("\n401"));
    assert!(
        curl(Some("bob:s3cret")).await.ends_with("\n401"),
        "another realm's user"
    );
    assert!(curl(None).await.ends_with("\n401"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `name@provider` (Traefik's routing/providers "Provider Namespace"): a router of the file
/// provider uses a middleware of the Redis one by its qualified name, and is refused without
/// it; one naming a middleware that provider lacks, or a provider lb does not run, is left out
/// and said (never served without it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middlewares_of_another_provider_are_used_by_their_qualified_name() {
    let site = upstream("site").await;
    let file = format!(
        r#"
http:
  routers:
    guarded:
      rule: "Host(`guarded.test`)"
      service: site
      middlewares: ["auth@redis"]
    own:
      rule: "Host(`own.test`)"
      service: site
      middlewares: ["tag@file"]
    missing:
      rule: "Host(`missing.test`)"
      service: site
      middlewares: ["nothere@redis"]
    nowhere:
      rule: "Host(`nowhere.test`)"
      service: site
      middlewares: ["auth@etcd"]
  middlewares:
    tag:
      headers:
        customResponseHeaders:
          X-Tag: own
  services:
    site:
      loadBalancer:
        servers:
          - url: "http://{site}"
"#
    );
    // test:test (htpasswd's default hash): what the Redis provider's document defines.
    let kv = r#"
http:
  middlewares:
    auth:
      basicAuth:
        users: ["test:$apr1$H6uskkkW$IgXLP6ewTrSuBkTrqE8wj/"]
"#;
    let (proxy, l) = bound(vec![], &Services::new(), HashMap::new(), HashMap::new()).await;
    let addr = l.local_addr().expect("addr");
    let f = parse_any(Path::new("dynamic.yml"), &file).expect("valid");
    let r = parse_any(Path::new("redis.yml"), kv).expect("valid");
    proxy.set_dynamic("redis:traefik", r.routing);
    proxy.set_dynamic("file:/etc/traefik", f.routing);
    proxy.update_services(&f.services);
    tokio::spawn(proxy.clone().serve("web".into(), l, None));
    let said: String = proxy
        .problems()
        .into_values()
        .flatten()
        .collect::<Vec<_>>()
        .join("\n");
    for (router, why) in [
        ("missing", "[\"nothere@redis:traefik\"] are not defined"),
        ("nowhere", "names provider \"etcd\", which lb does not run"),
    ] {
        assert!(
            said.contains(&format!("router {router}: left out")) && said.contains(why),
            "{router}: {said}"
        );
    }
    assert!(
        said.contains("file:/etc/traefik"),
        "said of its provider: {said}"
    );
    let cl = client();
    assert_eq!(get(&cl, addr, "guarded.test", "/", &[]).await.0, 401);
    let (code, body) = get(
        &cl,
        addr,
        "guarded.test",
        "/",
        &[("authorization", "Basic dGVzdDp0ZXN0")],
    )
    .await;
    assert_eq!(code, 200);
    assert!(body.starts_with("site /"), "{body}");
    assert_eq!(get(&cl, addr, "own.test", "/", &[]).await.0, 200);
    for host in ["missing.test", "nowhere.test"] {
        assert_eq!(get(&cl, addr, host, "/", &[]).await.0, 404, "{host}");
    }
}

/// A key lb does not know under `clientAuth` (a typo of `caFiles`, say) breaks the options, and
/// its routers are left out: they are never served without the client authentication the
/// key may have meant (routing-configuration/http/tls/tls-options.md, "clientAuth").
#[test]
fn an_unknown_client_auth_key_breaks_its_options() {
    let text = "http:\n  routers:\n    a:\n      rule: \"Host(`a.test`)\"\n      service: s\n      tls:\n        options: mtls\n  services:\n    s:\n      loadBalancer:\n        servers:\n          - url: \"http://127.0.0.1:1\"\ntls:\n  options:\n    mtls:\n      clientAuth:\n        caFile: /etc/lb/ca.pem\n        clientAuthType: RequireAndVerifyClientCert\n";
    let doc = parse_any(Path::new("typo.yml"), text).expect("valid");
    assert!(doc.routing.routers.is_empty());
    let broken: Vec<String> = doc.broken.iter().map(|b| b.to_string()).collect();
    let said = format!("{}\n{}", doc.unsupported.join("\n"), broken.join("\n"));
    assert!(
        said.contains("tls.options.mtls.clientAuth") && said.contains("caFile"),
        "{said}"
    );
}

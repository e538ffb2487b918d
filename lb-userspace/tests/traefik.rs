//! Traefik's dynamic configuration, written as Traefik's documentation writes it (YAML and TOML),
//! read by lb's file provider and served by lb's proxy against real upstreams: routers, a
//! middleware chain, services with their servers, and every unsupported key reported by path.

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
        let (code, body) = get(&cl, addr, "www.test", "/", &[]).await;
        assert_eq!((code, body.split(' ').next()), (200, Some("c")), "{file}");
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
    assert_eq!(
        reports[0],
        vec![
            "http.services.api.loadBalancer.healthCheck",
            "http.services.both.weighted",
        ],
        "each unsupported key, by path (minVersion TLS 1.2 is what lb does: honoured, not reported)"
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
    let e = parse_any(Path::new("dynamic.yml"), &text).expect_err("a bad rule");
    assert!(
        e.reason.starts_with("http.routers.site.rule: column 1"),
        "{e}"
    );
    let line = text
        .lines()
        .position(|l| l.contains("Hots("))
        .expect("line")
        + 1;
    assert_eq!(e.line, line, "{e}");

    let text = toml_text(1, 2, 3, "$2y$04$x").replace("http://127.0.0.1:3", "ftp://127.0.0.1:3");
    let e = parse_any(Path::new("dynamic.toml"), &text).expect_err("a bad URL");
    assert!(
        e.reason
            .contains("http.services.site.loadBalancer.servers[0].url"),
        "{e}"
    );
    // An allow list that would check another address than the one meant is refused outright.
    let text = yaml(1, 2, 3, "$2y$04$x").replace(
        "    limit:\n",
        "    office:\n      ipAllowList:\n        sourceRange: [\"10.0.0.0/8\"]\n        ipStrategy:\n          depth: 1\n    limit:\n",
    );
    let e = parse_any(Path::new("dynamic.yml"), &text).expect_err("ipStrategy");
    assert!(
        e.reason
            .starts_with("http.middlewares.office.ipAllowList.ipStrategy"),
        "{e}"
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

/// Security options lb cannot honour, each on a router of its own; and one router that needs
/// none of them, so the document is read and served, minus the routers it would weaken.
const GUARDED: &str = r#"
http:
  routers:
    open:
      rule: "Host(`open.test`)"
      service: site
      tls: {}
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
      service: db
      middlewares: [office]
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
        vec!["open"],
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
        vec!["passdb"],
        "passthrough terminates no TLS: options do not apply"
    );
    // Each router left out is reported with what it needed.
    let said = format!("{:?} {problems:?}", doc.unsupported);
    for (router, why) in [
        ("http.routers.mtls", "RequireAndVerifyClientCert"),
        ("http.routers.cafiles", "RequireAndVerifyClientCert"),
        ("http.routers.modern", "VersionTLS13"),
        ("tcp.routers.db", "office"),
        ("tcp.routers.tlsdb", "RequireAndVerifyClientCert"),
        ("http.middlewares.sso", "authResponseHeadersRegex"),
        ("http.middlewares.onlyhosts", "allowedHosts"),
        ("router sso: left out", "sso"),
        ("router hosts: left out", "onlyhosts"),
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
fn default_tls_options_lb_cannot_honour_leave_every_tls_router_out() {
    let text = "http:\n  routers:\n    a:\n      rule: \"Host(`a.test`)\"\n      service: s\n      tls: {}\n    b:\n      rule: \"Host(`b.test`)\"\n      service: s\n  services:\n    s:\n      loadBalancer:\n        servers:\n          - url: \"http://127.0.0.1:1\"\ntls:\n  options:\n    default:\n      clientAuth:\n        caFiles: [\"/etc/lb/ca.pem\"]\n        clientAuthType: VerifyClientCertIfGiven\n";
    let doc = parse_any(Path::new("default.yml"), text).expect("valid");
    assert!(
        doc.routing.routers.is_empty(),
        "lb serves any router on its TLS entry points, so the default options guard them all: {:?}",
        doc.routing
            .routers
            .iter()
            .map(|r| &r.name)
            .collect::<Vec<_>>()
    );
    let said = doc.unsupported.join("\n");
    assert!(
        said.contains("VerifyClientCertIfGiven") && said.contains("http.routers.a"),
        "{said}"
    );
}

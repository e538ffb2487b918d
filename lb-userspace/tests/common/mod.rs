//! Helpers shared by the proxy test files: upstream servers on loopback, registry snapshots,
//! routers, a proxy on an ephemeral port, and a client.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use lb_userspace::{
    model::instance::{Instance, Services},
    model::{
        l7::{EntryPointSpec, RouterSpec, ServiceSpec},
        middleware::MiddlewareConfig,
        rule::Rule,
    },
    proxy::{middleware::Middleware, Proxy},
};
use tokio::net::TcpListener;

/// Serves HTTP/1.1 and h2c on a loopback port with `handler`, for as long as the test runs.
pub async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// An upstream that answers `<name> <path> xff=… host=… secret=… rid=…` (the headers it got).
pub async fn upstream(name: &'static str) -> SocketAddr {
    serve(move |req: Request<hyper::body::Incoming>| async move {
        let h = |k: &str| {
            req.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        let body = format!(
            "{name} {} xff={} host={} secret={} rid={}",
            req.uri().path(),
            h("x-forwarded-for"),
            h("host"),
            h("x-secret"),
            h("x-request-id")
        );
        Response::new(Full::new(Bytes::from(body)))
    })
    .await
}

/// An upstream that answers "slow" after `ms` milliseconds.
pub async fn slow(ms: u64) -> SocketAddr {
    serve(move |_req| async move {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        Response::new(Full::new(Bytes::from("slow")))
    })
    .await
}

/// An address where nothing listens: connections are refused.
pub fn dead() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

pub fn services(list: &[(&str, &[(SocketAddr, u32)])]) -> Services {
    let mut s = Services::new();
    for (name, ups) in list {
        let m = ups
            .iter()
            .map(|(a, w)| {
                let i = Instance {
                    address: a.ip(),
                    port: a.port(),
                    weight: *w,
                    zone: None,
                    metadata: BTreeMap::new(),
                };
                (i.key(), i)
            })
            .collect();
        s.insert(name.to_string(), m);
    }
    s
}

pub fn router(name: &str, rule: &str, service: &str, priority: Option<i64>) -> RouterSpec {
    RouterSpec {
        name: name.into(),
        entrypoints: vec![],
        rule: Rule::parse(rule).expect("rule"),
        rule_text: rule.into(),
        priority,
        service: service.into(),
        middlewares: vec![],
        tls: None,
        tls_options: None,
    }
}

pub async fn start(routers: Vec<RouterSpec>, svcs: &Services) -> (Arc<Proxy>, SocketAddr) {
    start_with(routers, svcs, HashMap::new()).await
}

pub async fn start_with(
    routers: Vec<RouterSpec>,
    svcs: &Services,
    specs: HashMap<String, ServiceSpec>,
) -> (Arc<Proxy>, SocketAddr) {
    start_full(routers, svcs, specs, HashMap::new()).await
}

/// A listener on a free loopback port, and a proxy whose one plain entry point `web` is it
/// (not serving yet).
pub async fn bound(
    routers: Vec<RouterSpec>,
    svcs: &Services,
    specs: HashMap<String, ServiceSpec>,
    mws: HashMap<String, Arc<dyn Middleware>>,
) -> (Arc<Proxy>, TcpListener) {
    bound_limited(routers, svcs, specs, mws, Default::default()).await
}

/// [`bound`], with the entry point's connection bounds given.
pub async fn bound_limited(
    routers: Vec<RouterSpec>,
    svcs: &Services,
    specs: HashMap<String, ServiceSpec>,
    mws: HashMap<String, Arc<dyn Middleware>>,
    limits: lb_userspace::model::l7::ConnLimits,
) -> (Arc<Proxy>, TcpListener) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ep = EntryPointSpec {
        name: "web".into(),
        address: l.local_addr().expect("addr"),
        tls: false,
        client_ca_file: None,
        trusted_ips: vec![],
        limits,
        also_plain: false,
        as_default: false,
        proxy_protocol: None,
    };
    (Arc::new(Proxy::new(vec![ep], routers, specs, mws, svcs)), l)
}

pub async fn start_full(
    routers: Vec<RouterSpec>,
    svcs: &Services,
    specs: HashMap<String, ServiceSpec>,
    mws: HashMap<String, Arc<dyn Middleware>>,
) -> (Arc<Proxy>, SocketAddr) {
    let (proxy, l) = bound(routers, svcs, specs, mws).await;
    let addr = l.local_addr().expect("addr");
    tokio::spawn(proxy.clone().serve("web".into(), l, None));
    (proxy, addr)
}

/// [`start_full`] with no middlewares and the entry point's connection bounds given.
pub async fn start_limited(
    routers: Vec<RouterSpec>,
    svcs: &Services,
    specs: HashMap<String, ServiceSpec>,
    limits: lb_userspace::model::l7::ConnLimits,
) -> (Arc<Proxy>, SocketAddr) {
    let (proxy, l) = bound_limited(routers, svcs, specs, HashMap::new(), limits).await;
    let addr = l.local_addr().expect("addr");
    tokio::spawn(proxy.clone().serve("web".into(), l, None));
    (proxy, addr)
}

pub type C = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub async fn get(
    c: &C,
    proxy: SocketAddr,
    host: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> (u16, String) {
    let mut b = Request::get(format!("http://{proxy}{path}")).header("host", host);
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    let resp = c
        .request(b.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("response");
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

pub fn client() -> C {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A middleware from its configuration, written as in lb.toml.
pub fn mw(toml_text: &str) -> Arc<dyn Middleware> {
    toml::from_str::<MiddlewareConfig>(toml_text)
        .expect("middleware config")
        .build()
        .expect("middleware")
}

/// A `tracing` writer into a shared buffer: what the code under test logged.
#[derive(Clone, Default)]
pub struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        self.0
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// This process's resident memory, KiB (the tests that bound it run in binaries of their own).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// This process's open descriptors.
pub fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

//! The proxy's metrics and access log with real upstreams on loopback and a real client: exact
//! request counts in a parsed `/metrics` exposition, access log fields for a proxied request, a
//! 404 and an upstream failure, the common format with a status filter, and reopening (rotation).
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb_userspace::{
    control::ControlObs,
    observe::access_log::{AccessLog, AccessLogSpec, Format},
    observe::metrics::{Metrics, Snapshot},
};

mod common;
use common::*;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lb-obs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// The file's lines once it has at least `n` (bounded wait: the writer is a thread).
async fn lines(path: &Path, n: usize) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let got: Vec<String> = text.lines().map(str::to_string).collect();
        if got.len() >= n || t0.elapsed() > Duration::from_secs(5) {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn empty_snapshot() -> Snapshot {
    Snapshot {
        vips: vec![],
        reasons: vec![],
        tracked_flows: 0,
        flow_capacity: 0,
        rebuilds: Default::default(),
        providers: Default::default(),
        apply: Default::default(),
        health: vec![],
        acme_certificates: vec![],
    }
}

fn sample(parsed: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
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
    assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
    found[0]
}

fn json_spec(path: &Path) -> AccessLogSpec {
    AccessLogSpec {
        path: Some(path.to_path_buf()),
        format: Format::Json,
        buffer: 1024,
        status: vec![],
        sample: 1.0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_requests_exactly_and_logs_each_with_its_fields() {
    const M: usize = 25;
    let app = upstream("app").await;
    let dead = dead();
    let svcs = services(&[("app", &[(app, 1)]), ("dead", &[(dead, 1)])]);
    let routers = vec![
        router("app", "Host(`app.test`)", "app", None),
        router("dead", "Host(`dead.test`)", "dead", None),
    ];
    let (proxy, addr) = start(routers, &svcs).await;
    let dir = temp_dir("json");
    let log_path = dir.join("access.log");
    proxy
        .obs()
        .set_access_log(Some(AccessLog::start(json_spec(&log_path)).expect("log")));
    let metrics = Metrics::new(proxy.obs().clone(), &ControlObs::default()).expect("metrics");
    let c = client();
    let mut upstream_ids = Vec::new();
    for i in 0..M {
        let (code, body) = get(&c, addr, "app.test", &format!("/item/{i}?q=1"), &[]).await;
        assert_eq!(code, 200, "{body}");
        upstream_ids.push(body.split("rid=").nth(1).unwrap_or("").trim().to_string());
    }
    assert_eq!(get(&c, addr, "nobody.test", "/x", &[]).await.0, 404);
    assert_eq!(
        get(&c, addr, "dead.test", "/y", &[("x-request-id", "my-id-1")])
            .await
            .0,
        502
    );

    // The exposition, parsed whole.
    let text = metrics.render(&empty_snapshot()).expect("render");
    let parsed =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parse");
    let req = |router: &str, class: &str| {
        sample(
            &parsed,
            "lb_http_requests_total",
            &[
                ("router", router),
                ("code_class", class),
                ("entrypoint", "web"),
            ],
        )
    };
    assert_eq!(req("app", "2xx"), M as f64, "{text}");
    assert_eq!(req("", "4xx"), 1.0);
    assert_eq!(req("dead", "5xx"), 1.0);
    assert_eq!(
        sample(
            &parsed,
            "lb_http_request_duration_seconds",
            &[("router", "app")]
        ),
        M as f64,
        "histogram count"
    );
    assert_eq!(
        sample(
            &parsed,
            "lb_http_upstream_connect_errors_total",
            &[("service", "dead")]
        ),
        1.0
    );
    assert!(
        sample(
            &parsed,
            "lb_http_connections_total",
            &[("entrypoint", "web")]
        ) >= 1.0
    );

    // One line per request, in order.
    let got = lines(&log_path, M + 2).await;
    assert_eq!(got.len(), M + 2, "{got:#?}");
    let entries: Vec<serde_json::Value> = got
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    for (i, e) in entries[..M].iter().enumerate() {
        assert_eq!(e["status"], 200, "{e}");
        assert_eq!(e["router"], "app");
        assert_eq!(e["service"], "app");
        assert_eq!(e["upstream"], app.to_string());
        assert_eq!(e["attempts"], 1);
        assert_eq!(e["method"], "GET");
        assert_eq!(e["uri"], format!("/item/{i}?q=1"));
        assert_eq!(e["host"], "app.test");
        assert_eq!(e["entrypoint"], "web");
        assert_eq!(e["client"], "127.0.0.1");
        assert_eq!(e["completed"], true);
        // The upstream answers "app /item/N xff=… host=… secret=… rid=…": its length.
        let body_len = format!(
            "app /item/{i} xff=127.0.0.1 host=app.test secret=- rid={}",
            upstream_ids[i]
        )
        .len();
        assert_eq!(e["bytes"], body_len as u64, "{e}");
        // The id the upstream saw is the one logged.
        assert_eq!(e["request_id"], upstream_ids[i].as_str());
        assert_eq!(upstream_ids[i].len(), 32);
        let (d, ttfb, up) = (
            e["duration_ms"].as_f64().unwrap_or(-1.0),
            e["ttfb_ms"].as_f64().unwrap_or(-1.0),
            e["upstream_ms"].as_f64().unwrap_or(-1.0),
        );
        assert!(up > 0.0 && ttfb >= up && d >= ttfb, "timings {e}");
        assert!(e["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
    let not_found = &entries[M];
    assert_eq!(not_found["status"], 404);
    assert!(not_found["router"].is_null() && not_found["upstream"].is_null());
    assert_eq!(not_found["attempts"], 0);
    assert_eq!(not_found["bytes"], "no router matches\n".len() as u64);
    let failed = &entries[M + 1];
    assert_eq!(failed["status"], 502);
    assert_eq!(failed["router"], "dead");
    assert_eq!(failed["upstream"], dead.to_string());
    assert_eq!(failed["attempts"], 1);
    assert_eq!(failed["request_id"], "my-id-1", "a client's id is kept");

    // Rotation: the file is renamed, reopen() is what SIGHUP calls; new lines go to a new file.
    let rotated = dir.join("access.log.1");
    std::fs::rename(&log_path, &rotated).expect("rename");
    proxy.obs().access_log().expect("log").reopen();
    assert_eq!(get(&c, addr, "app.test", "/after", &[]).await.0, 200);
    let fresh = lines(&log_path, 1).await;
    assert_eq!(fresh.len(), 1, "new file: {fresh:?}");
    assert!(fresh[0].contains("\"/after\""), "{}", fresh[0]);
    assert_eq!(
        lines(&rotated, M + 2).await.len(),
        M + 2,
        "the old file is left as it was"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn common_format_with_a_status_filter() {
    let app = upstream("app").await;
    let dead = dead();
    let svcs = services(&[("app", &[(app, 1)]), ("dead", &[(dead, 1)])]);
    let routers = vec![
        router("app", "Host(`app.test`)", "app", None),
        router("dead", "Host(`dead.test`)", "dead", None),
    ];
    let (proxy, addr) = start_with(routers, &svcs, HashMap::new()).await;
    let dir = temp_dir("common");
    let path = dir.join("access.log");
    let mut spec = json_spec(&path);
    spec.format = Format::Common;
    spec.status = vec![
        "5xx".parse().expect("filter"),
        "404".parse().expect("filter"),
    ];
    proxy
        .obs()
        .set_access_log(Some(AccessLog::start(spec).expect("log")));
    let c = client();
    for _ in 0..5 {
        assert_eq!(get(&c, addr, "app.test", "/ok", &[]).await.0, 200);
    }
    assert_eq!(
        get(
            &c,
            addr,
            "dead.test",
            "/down",
            &[("user-agent", "probe \"1\"")]
        )
        .await
        .0,
        502
    );
    assert_eq!(get(&c, addr, "none.test", "/missing", &[]).await.0, 404);
    let got = lines(&path, 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got_after = lines(&path, 2).await;
    assert_eq!(got, got_after);
    assert_eq!(got.len(), 2, "only 5xx and 404 are logged: {got:#?}");
    let l = &got[0];
    assert!(l.starts_with("127.0.0.1 - - ["), "{l}");
    assert!(l.contains("] \"GET /down HTTP/1.1\" 502 "), "{l}");
    assert!(l.contains("\"probe \\\"1\\\"\""), "quotes escaped: {l}");
    assert!(l.contains(&format!("\"dead\" \"{dead}\"")), "{l}");
    assert!(l.ends_with("ms"), "{l}");
    assert!(
        got[1].contains("\"GET /missing HTTP/1.1\" 404 ") && got[1].contains("\"-\" \"-\""),
        "{}",
        got[1]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Requests with credentials everywhere a client puts them — `Authorization`, a cookie, an API
/// key in its header and in the query (under a name that looks secret and one that does not), a
/// token in the Referer's query, an access token in the query of a request no router takes — and
/// neither the access log nor the log (every level) holds any of them afterwards; the rest of the
/// query is still there.
#[tokio::test]
async fn credentials_never_reach_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // The test's runtime is this thread: the proxy's tasks log here too.
    let _guard = tracing::subscriber::set_default(subscriber);
    let app = upstream("app").await;
    let svcs = services(&[("app", &[(app, 1)])]);
    // sha256("k3y-S3CRET-zz")
    let digest = "sha256:8c557cf484c41f37a341f60617f975f8b0456dd2357343e1cf4ee1d62e28a25d";
    // The second key is read from a parameter whose name looks like nothing secret.
    let mws: HashMap<_, _> = [
        (
            "key".to_string(),
            mw(&format!(
                r#"api_key = {{ keys = ["{digest}"], query = "api_key" }}"#
            )),
        ),
        (
            "plain".to_string(),
            mw(&format!(
                r#"api_key = {{ keys = ["{digest}"], query = "k" }}"#
            )),
        ),
    ]
    .into();
    let mut keyed = router("keyed", "Host(`app.test`)", "app", None);
    keyed.middlewares = vec!["key".into()];
    let mut plain = router("plain", "Host(`plain.test`)", "app", None);
    plain.middlewares = vec!["plain".into()];
    let (proxy, addr) = start_full(vec![keyed, plain], &svcs, HashMap::new(), mws).await;
    let dir = temp_dir("secrets");
    let log_path = dir.join("access.log");
    proxy
        .obs()
        .set_access_log(Some(AccessLog::start(json_spec(&log_path)).expect("log")));
    let c = client();
    let with = [
        ("authorization", "Bearer BEARER-S3CRET"),
        ("cookie", "session=COOKIE-S3CRET; theme=dark"),
        ("referer", "https://r.test/page?token=REF-S3CRET&x=1"),
    ];
    let key_path = "/a?b=1&api_key=k3y-S3CRET-zz&c=2";
    assert_eq!(get(&c, addr, "app.test", key_path, &with).await.0, 200);
    let header = [("x-api-key", "k3y-S3CRET-zz")];
    assert_eq!(get(&c, addr, "app.test", "/h", &header).await.0, 200);
    let wrong = "/a?api_key=WRONG-S3CRET";
    assert_eq!(get(&c, addr, "app.test", wrong, &with).await.0, 401);
    let nobody = "/x?access_token=TOK-S3CRET";
    assert_eq!(get(&c, addr, "nobody.test", nobody, &with).await.0, 404);
    let plain_path = "/p?k=k3y-S3CRET-zz&b=1";
    assert_eq!(get(&c, addr, "plain.test", plain_path, &[]).await.0, 200);

    let logged = lines(&log_path, 5).await;
    assert_eq!(logged.len(), 5, "{logged:#?}");
    let log = captured.text();
    for (what, text) in [("access log", logged.join("\n")), ("log", log)] {
        // Every secret above has this in it.
        assert!(
            !text.contains("S3CRET"),
            "{what} holds a credential:\n{text}"
        );
    }
    assert!(
        logged[0].contains("/a?b=1&api_key=REDACTED&c=2"),
        "{}",
        logged[0]
    );
    assert!(logged[0].contains("token=REDACTED&x=1"), "{}", logged[0]);
    assert!(logged[4].contains("/p?k=REDACTED&b=1"), "{}", logged[4]);
    let _ = std::fs::remove_dir_all(&dir);
}

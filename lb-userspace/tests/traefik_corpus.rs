//! A corpus of Traefik-format dynamic configurations written for lb's tests (not copied from
//! Traefik), each case in YAML and TOML under `tests/traefik_corpus/<case>/`, its Traefik
//! documentation section cited at the top of each file. Each form is run through
//! `lb check-config` as a user would run it: the exit status and the messages named in the
//! case's `expect.txt` must come out, and both forms must say the same (file names and lines
//! aside).
#![allow(clippy::disallowed_methods)] // tests run the real binary

use std::path::{Path, PathBuf};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/traefik_corpus")
}

/// `lb check-config` over one directory of Traefik files: its exit status and what it printed.
fn check(dir: &Path, scratch: &Path) -> (i32, String) {
    let cfg = scratch.join("lb.toml");
    std::fs::write(
        &cfg,
        format!("[[providers.file]]\npath = \"{}\"\n", dir.display()),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .expect("lb check-config");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// The findings as both forms should say them: the file's path and line taken out.
fn findings(text: &str, dir: &Path) -> Vec<String> {
    let (dir, provider) = (
        format!("{}/", dir.display()),
        format!("{}: ", dir.display()),
    );
    let mut v: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("error:") || l.starts_with("warning:"))
        .map(|l| {
            // What the proxy says is said of the provider (its directory), not of a file.
            let l = l.replace(&provider, "").replace(&dir, "");
            let mut out = String::new();
            let mut rest = l.as_str();
            // `dynamic.yml:12: ` / `dynamic.toml: ` → ``
            while let Some(i) = rest.find("dynamic.") {
                out.push_str(&rest[..i]);
                let after = &rest[i..];
                let end = after.find(": ").map_or(after.len(), |e| e + 2);
                rest = &after[end..];
            }
            out.push_str(rest);
            out
        })
        .collect();
    v.sort();
    v
}

#[test]
fn every_case_says_what_it_expects_in_yaml_and_toml_alike() {
    let scratch = std::env::temp_dir().join(format!("lb-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(corpus())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "{cases:?}");
    for case in &cases {
        let expect = std::fs::read_to_string(case.join("expect.txt")).unwrap();
        let mut lines = expect.lines();
        let status: i32 = lines
            .next()
            .and_then(|l| l.strip_prefix("exit "))
            .and_then(|c| c.parse().ok())
            .expect("expect.txt starts with `exit N`");
        let wanted: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
        let mut said = Vec::new();
        for form in ["yaml", "toml"] {
            let dir = case.join(form);
            let (code, text) = check(&dir, &scratch);
            assert_eq!(code, status, "{}: {text}", dir.display());
            for w in &wanted {
                assert!(text.contains(w), "{}: {w:?} not in:\n{text}", dir.display());
            }
            said.push(findings(&text, &dir));
        }
        assert_eq!(said[0], said[1], "{}: YAML and TOML differ", case.display());
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

mod common;

/// Each case with a `routes.txt` is also served, in both forms, and answers as it says there:
/// `host | path | status [| body prefix [| header: value]…]`, one request per line. The
/// servers' loopback addresses of the files are an upstream of the test's, which answers
/// `corpus <path> …`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_with_routes_is_routed_as_it_says_in_yaml_and_toml_alike() {
    use lb_userspace::{model::instance::Services, sources::file::parse_any};
    let up = common::upstream("corpus").await;
    let loopback = regex::Regex::new(r"127\.0\.0\.1:\d+").unwrap();
    let mut routed = 0;
    let mut cases: Vec<PathBuf> = std::fs::read_dir(corpus())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("routes.txt").exists())
        .collect();
    cases.sort();
    assert!(cases.len() >= 9, "{cases:?}");
    for case in &cases {
        let routes = std::fs::read_to_string(case.join("routes.txt")).unwrap();
        for (form, file) in [("yaml", "dynamic.yml"), ("toml", "dynamic.toml")] {
            let path = case.join(form).join(file);
            let text = std::fs::read_to_string(&path).unwrap();
            let text = loopback.replace_all(&text, up.to_string().as_str());
            let doc = parse_any(&path, &text).expect("the case reads");
            let (proxy, l) = common::bound(
                vec![],
                &Services::new(),
                Default::default(),
                Default::default(),
            )
            .await;
            let addr = l.local_addr().unwrap();
            proxy.set_dynamic("file", doc.routing);
            proxy.update_services(&doc.services);
            tokio::spawn(proxy.clone().serve("web".into(), l, None));
            let c = common::client();
            for line in routes.lines().filter(|l| !l.trim().is_empty()) {
                let parts: Vec<&str> = line.split('|').map(str::trim).collect();
                let (host, target, status) = (parts[0], parts[1], parts[2]);
                let headers: Vec<(&str, &str)> = parts
                    .iter()
                    .skip(4)
                    .filter_map(|h| h.split_once(':'))
                    .map(|(k, v)| (k.trim(), v.trim()))
                    .collect();
                let (code, body) = common::get(&c, addr, host, target, &headers).await;
                let at = format!("{} {form}: {line}", case.display());
                assert_eq!(code.to_string(), status, "{at}: {body}");
                if let Some(prefix) = parts.get(3).filter(|p| !p.is_empty()) {
                    assert!(body.starts_with(prefix), "{at}: {body}");
                }
                routed += 1;
            }
        }
    }
    assert!(routed >= 20, "{routed}");
}

//! The parsers' fuzz entry points: bytes from outside in, and no input may panic. Each also
//! checks a property its parser promises (an error names a line or a column that exists, a
//! stored record reads back as itself, a prefix of a ClientHello is never malformed). The
//! cargo-fuzz targets in `fuzz/` call them under libFuzzer (`cargo xtask fuzz --parsers`); `tests/fuzz_corpus.rs`
//! replays the checked-in corpora through them in every test run, with no sanitizer build.

use std::path::Path;

use crate::{
    model::rule::{Rule, TcpRule},
    proxy::tcp::client_hello::{self, Parsed},
    sources::{config, file, kv, traefik},
};

/// A parser's entry point: any bytes, no answer, no panic.
pub type Entry = fn(&[u8]);

/// Every entry point by name: the fuzz targets' and the corpus folders' names.
pub const TARGETS: &[(&str, Entry)] = &[
    ("config", lb_toml),
    ("provider_yaml", provider_yaml),
    ("provider_toml", provider_toml),
    ("rule", rule),
    ("kv_record", kv_record),
    ("traefik_kv", traefik_kv),
    ("client_hello", client_hello),
    ("api_registration", api_registration),
];

/// lb.toml. A refusal names a line of the text (or none, 0).
pub fn lb_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = config::parse(Path::new("fuzz/lb.toml"), text) {
        let lines = text.lines().count() + 1;
        assert!(e.line <= lines, "line {} of {lines}: {e}", e.line);
    }
}

/// A watched file as YAML: a Traefik dynamic configuration or lb's services document.
pub fn provider_yaml(data: &[u8]) {
    provider_file(data, "fuzz/dynamic.yml");
}

/// The same as TOML.
pub fn provider_toml(data: &[u8]) {
    provider_file(data, "fuzz/dynamic.toml");
}

fn provider_file(data: &[u8], name: &str) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = file::parse_any(Path::new(name), text) {
        // YAML also ends a line at a lone CR (TOML does not: there it is an error), and editors
        // show it so; found by the fuzzer, whose input counted more YAML lines than `\n`s.
        let lines = if name.ends_with(".yml") {
            yaml_lines(text)
        } else {
            text.lines().count()
        } + 1;
        assert!(e.line <= lines, "line {} of {lines}: {e}", e.line);
    }
}

/// Lines as YAML counts them: LF, CRLF and a lone CR each end one (a last line without an end
/// counts too).
fn yaml_lines(text: &str) -> usize {
    let b = text.as_bytes();
    let lone_cr = b
        .iter()
        .enumerate()
        .filter(|&(i, &c)| c == b'\r' && b.get(i + 1) != Some(&b'\n'))
        .count();
    let ends = b.iter().filter(|&&c| c == b'\n').count() + lone_cr;
    ends + usize::from(!b.is_empty() && !matches!(b.last(), Some(b'\n' | b'\r')))
}

/// The router rule language, HTTP and TCP. A refusal points inside the rule.
pub fn rule(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let errors = [
        Rule::parse(text).err(),
        TcpRule::parse(text, false).err(),
        TcpRule::parse(text, true).err(),
    ];
    for e in errors.into_iter().flatten() {
        // 1-based, at most one past the end (where a rule stops too soon).
        assert!(
            (1..=text.len() + 1).contains(&e.column),
            "column {} of {}: {e}",
            e.column,
            text.len()
        );
    }
}

/// A Redis or etcd record of lb's layout: key, a NUL, value. One that is accepted is stored back
/// as it was read.
pub fn kv_record(data: &[u8]) {
    let (key, value) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    for prefix in ["lb/", ""] {
        if let Ok((service, instance)) = kv::parse_entry(prefix, key, value) {
            let stored = kv::encode(&instance).expect("an instance encodes");
            let again = kv::parse_entry(prefix, key, stored.as_bytes());
            assert_eq!(again, Ok((service, instance)), "a stored record reads back");
        }
    }
}

/// Traefik's KV layout: `key=value` lines under `traefik/`, made into a document and translated.
pub fn traefik_kv(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let pairs = text.lines().filter_map(|l| l.split_once('='));
    let doc = traefik::from_kv("traefik/", pairs);
    let _ = traefik::translate(&doc);
}

/// The TLS ClientHello sniffer of TCP routers, fed as bytes arrive: a prefix of what parses as a
/// hello is never malformed, and never plain bytes.
pub fn client_hello(data: &[u8]) {
    if let Parsed::Hello(_) = client_hello::parse(data) {
        for cut in [data.len() / 2, data.len().saturating_sub(1)] {
            if cut == 0 {
                continue;
            }
            match client_hello::parse(&data[..cut]) {
                Parsed::Malformed(why) => panic!("a prefix ({cut} bytes) is malformed: {why}"),
                Parsed::NotTls => panic!("a prefix ({cut} bytes) is not TLS"),
                Parsed::NeedMore | Parsed::Hello(_) => {}
            }
        }
    }
}

/// An admin API registration body, through the same checks as the API's.
pub fn api_registration(data: &[u8]) {
    crate::api::check_registration_body(data);
}

//! A provider directory read as one configuration, the way Traefik's file provider reads it
//! (`provider.Merge` with `ResourceStrategySkipDuplicates`): every file's routers, services,
//! middlewares, transports, TLS options and stores go into one document, so a chain, a
//! `serversTransport` or a mirroring's main service may live in another file than what names
//! it. The first definition of a name wins, in the order the files are given (lb gives them
//! sorted by path, as Traefik reads a directory); a different later one is reported and skipped.
//! Certificates add up. Which file each item came from is kept, so an error points into it.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// The sections whose entries are named items (`http.routers.<name>`), by top-level key.
const NAMED: [(&str, &[&str]); 4] = [
    (
        "http",
        &["routers", "services", "middlewares", "serverstransports"],
    ),
    (
        "tcp",
        &["routers", "services", "middlewares", "serverstransports"],
    ),
    ("udp", &["routers", "services"]),
    ("tls", &["options", "stores"]),
];

fn is_top(key: &str) -> bool {
    NAMED.iter().any(|(t, _)| *t == key)
}

pub(super) fn is_named(top: &str, section: &str) -> bool {
    NAMED.iter().any(|(t, s)| *t == top && s.contains(&section))
}

/// The shape a document must have for its items to be read one by one: `(key path, why)` when
/// it has not. Keys are compared as Traefik does, ignoring case.
pub fn check(doc: &Value) -> Result<(), (String, String)> {
    let Some(m) = doc.as_object() else {
        return Err((String::new(), "expected a table at the top".into()));
    };
    for (k, v) in m {
        let top = k.to_ascii_lowercase();
        if !is_top(&top) {
            continue;
        }
        let inner = match v {
            Value::Null => continue,
            Value::Object(o) => o,
            _ => return Err((k.clone(), "expected a table".into())),
        };
        for (sk, sv) in inner {
            let section = sk.to_ascii_lowercase();
            let fits = if is_named(&top, &section) {
                matches!(sv, Value::Null | Value::Object(_))
            } else if top == "tls" && section == "certificates" {
                matches!(sv, Value::Null | Value::Array(_))
            } else {
                true
            };
            if !fits {
                let want = if section == "certificates" {
                    "a list"
                } else {
                    "a table of named entries"
                };
                return Err((format!("{k}.{sk}"), format!("expected {want}")));
            }
        }
    }
    Ok(())
}

/// Several documents as one.
#[derive(Debug, Default)]
pub struct Merged {
    pub doc: Value,
    /// Item key (`http.routers.api`, `tls.certificates[2]`) → the index of its document.
    pub origin: HashMap<String, usize>,
    /// Later definitions of a name that were skipped: the item, the index of the document that
    /// had the skipped one, and what is said about it.
    pub skipped: Vec<(String, usize, String)>,
}

/// Merges `docs` (each [`check`]ed) in order; `names[i]` says where the i-th came from. Top and
/// section keys come out in lowercase, item names as written.
pub fn merge(docs: &[&Value], names: &[String]) -> Merged {
    let mut root = Map::new();
    let mut origin: HashMap<String, usize> = HashMap::new();
    let mut skipped = Vec::new();
    let name = |i: usize| names.get(i).map_or("?", String::as_str);
    for (i, doc) in docs.iter().enumerate() {
        let Some(m) = doc.as_object() else {
            continue;
        };
        for (k, v) in m {
            let top = k.to_ascii_lowercase();
            if !is_top(&top) {
                // Not Traefik's: translated (and so reported) from the first file that has it.
                root.entry(k.clone()).or_insert_with(|| v.clone());
                continue;
            }
            let Value::Object(inner) = v else {
                continue;
            };
            let Value::Object(dst) = root
                .entry(top.clone())
                .or_insert_with(|| Value::Object(Map::new()))
            else {
                continue;
            };
            for (sk, sv) in inner {
                let section = sk.to_ascii_lowercase();
                if is_named(&top, &section) {
                    let Value::Object(items) = sv else {
                        continue;
                    };
                    let Value::Object(d) = dst
                        .entry(section.clone())
                        .or_insert_with(|| Value::Object(Map::new()))
                    else {
                        continue;
                    };
                    for (item, body) in items {
                        let key = format!("{top}.{section}.{item}");
                        match d.get(item) {
                            None => {
                                d.insert(item.clone(), body.clone());
                                origin.insert(key, i);
                            }
                            Some(first) if first == body => {}
                            Some(_) => {
                                let first = origin.get(&key).map_or("?", |&j| name(j));
                                let said = format!(
                                    "{key}: defined in {first} already; the one in {} is skipped",
                                    name(i)
                                );
                                skipped.push((key, i, said));
                            }
                        }
                    }
                } else if top == "tls" && section == "certificates" {
                    let Value::Array(list) = sv else {
                        continue;
                    };
                    let Value::Array(d) = dst
                        .entry(section.clone())
                        .or_insert_with(|| Value::Array(Vec::new()))
                    else {
                        continue;
                    };
                    for c in list {
                        if !d.contains(c) {
                            origin.insert(format!("tls.certificates[{}]", d.len()), i);
                            d.push(c.clone());
                        }
                    }
                } else {
                    dst.entry(sk.clone()).or_insert_with(|| sv.clone());
                }
            }
        }
    }
    Merged {
        doc: Value::Object(root),
        origin,
        skipped,
    }
}

/// The item a key path is in (`http.routers.api.rule` → `http.routers.api`), given the items
/// there are: the longest that the path starts with, whole keys only.
pub fn item_of<'a>(path: &str, items: impl IntoIterator<Item = &'a String>) -> Option<&'a String> {
    let lower = path.to_ascii_lowercase();
    items
        .into_iter()
        .filter(|item| {
            let item_lower = item.to_ascii_lowercase();
            lower.starts_with(&item_lower)
                && matches!(lower.as_bytes().get(item.len()), None | Some(b'.' | b'['))
        })
        .max_by_key(|item| item.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_directory_is_one_configuration_and_the_first_definition_wins() {
        let a = json!({"http": {"routers": {"r": {"rule": "Path(`/`)", "service": "s"}},
                                 "middlewares": {"m": {"addPrefix": {"prefix": "/a"}}}},
                        "tls": {"certificates": [{"certFile": "a.crt", "keyFile": "a.key"}]}});
        let b = json!({"HTTP": {"Routers": {"r": {"rule": "Path(`/b`)", "service": "s"},
                                             "r2": {"rule": "Path(`/c`)", "service": "s"}},
                                 "services": {"s": {"loadBalancer": {}}},
                                 "middlewares": {"m": {"addPrefix": {"prefix": "/a"}}}},
                        "tls": {"certificates": [{"certFile": "a.crt", "keyFile": "a.key"},
                                                 {"certFile": "b.crt", "keyFile": "b.key"}]}});
        let names = ["a.yml".to_string(), "b.yml".to_string()];
        let m = merge(&[&a, &b], &names);
        assert_eq!(m.doc["http"]["routers"]["r"]["rule"], "Path(`/`)");
        assert_eq!(m.doc["http"]["routers"]["r2"]["rule"], "Path(`/c`)");
        assert!(m.doc["http"]["services"]["s"].is_object());
        assert_eq!(
            m.doc["tls"]["certificates"].as_array().map(Vec::len),
            Some(2)
        );
        assert_eq!(
            m.skipped,
            [(
                "http.routers.r".to_string(),
                1,
                "http.routers.r: defined in a.yml already; the one in b.yml is skipped".to_string()
            )]
        );
        assert_eq!(m.origin["http.routers.r"], 0);
        assert_eq!(m.origin["http.routers.r2"], 1);
        assert_eq!(
            m.origin["http.middlewares.m"], 0,
            "an identical copy is no clash"
        );
        assert_eq!(m.origin["tls.certificates[1]"], 1);
    }

    #[test]
    fn the_shape_is_checked_before_items_are_read() {
        assert!(check(&json!({"http": {"routers": {}}, "tls": {"certificates": []}})).is_ok());
        assert!(check(&json!({"http": {"services": null}})).is_ok());
        assert_eq!(
            check(&json!({"http": {"routers": 5}})).unwrap_err().0,
            "http.routers"
        );
        assert_eq!(check(&json!({"tcp": []})).unwrap_err().0, "tcp");
        assert_eq!(
            check(&json!({"tls": {"certificates": {}}})).unwrap_err().0,
            "tls.certificates"
        );
    }

    #[test]
    fn a_path_finds_its_item() {
        let items = [
            "http.routers.a".to_string(),
            "http.routers.a.b".to_string(),
            "tls.certificates[1]".to_string(),
        ];
        assert_eq!(
            item_of("http.routers.a.rule", &items).map(String::as_str),
            Some("http.routers.a")
        );
        assert_eq!(
            item_of("http.routers.a.b.rule", &items).map(String::as_str),
            Some("http.routers.a.b")
        );
        assert_eq!(item_of("http.routers.ab", &items), None);
        assert_eq!(
            item_of("tls.certificates[1].certFile", &items).map(String::as_str),
            Some("tls.certificates[1]")
        );
    }
}

//! "The last good config stays live", item by item. A Traefik configuration is many routers,
//! services and middlewares that change one at a time, so rejecting the whole document for one
//! broken router (as lb.toml is rejected) would take down every other router on the next edit.
//! Here a broken item keeps its last good version if it had one (that version is translated in
//! its place), or is left out if it never had one, together with what names it. Everything
//! else applies. Each broken item is reported with what lb did about it.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use super::{translate_in, Cx, Files, TraefikError, Translated};

/// An item lb could not use this time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub error: TraefikError,
    /// Its last good version serves in its place; otherwise it is left out.
    pub kept: bool,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.kept {
            "keeping its last good version"
        } else {
            "left out"
        };
        write!(f, "{}; {what}", self.error)
    }
}

/// A translation and the items it could not use.
#[derive(Debug, Default)]
pub struct Outcome {
    pub translated: Translated,
    pub broken: Vec<Broken>,
}

/// The last good version of every item of one provider's configuration.
#[derive(Debug, Default)]
pub struct Kept {
    good: HashMap<String, Value>,
}

impl Kept {
    /// Translates `doc` item by item (see the module's notes). Items that translate become the
    /// new last good versions; an item the document no longer has is forgotten (deleting it is
    /// how it is taken back). Only a document of the wrong shape is an error as a whole.
    pub fn translate(
        &mut self,
        mut doc: Value,
        files: &Files,
        provider: &str,
    ) -> Result<Outcome, TraefikError> {
        let cx = Cx::new(files).of(provider);
        let present = items(&doc);
        let mut gone: HashSet<String> = HashSet::new();
        let mut replaced: HashSet<String> = HashSet::new();
        let mut broken: Vec<Broken> = Vec::new();
        let mut t = translate_in(&doc, &cx, &gone)?;
        // Each pass replaces or removes every item that failed, and an item is replaced once at
        // most: at most two passes per item.
        for _ in 0..=2 * present.len() {
            if t.errors.is_empty() {
                break;
            }
            for e in std::mem::take(&mut t.errors) {
                let Some(item) = e.item.clone() else {
                    continue;
                };
                let good = self
                    .good
                    .get(&item)
                    .filter(|g| !replaced.contains(&item) && get(&doc, &item) != Some(*g))
                    .cloned();
                let earlier = broken
                    .iter()
                    .position(|b| b.error.item.as_deref() == Some(item.as_str()));
                match good {
                    Some(g) => {
                        set(&mut doc, &item, g);
                        replaced.insert(item);
                        broken.push(Broken {
                            error: e,
                            kept: true,
                        });
                    }
                    None => {
                        remove(&mut doc, &item);
                        gone.insert(item);
                        match earlier {
                            // Its last good version failed too: what is said is the first
                            // error (the user's edit), and that it is left out.
                            Some(i) => broken[i].kept = false,
                            None => broken.push(Broken {
                                error: e,
                                kept: false,
                            }),
                        }
                    }
                }
            }
            t = translate_in(&doc, &cx, &gone)?;
        }
        broken.extend(
            std::mem::take(&mut t.errors)
                .into_iter()
                .map(|error| Broken { error, kept: false }),
        );
        self.good.retain(|k, _| present.contains(k));
        for key in &present {
            if gone.contains(key) || replaced.contains(key) {
                continue;
            }
            if let Some(v) = get(&doc, key) {
                self.good.insert(key.clone(), v.clone());
            }
        }
        t.refresh_at = cx.refresh_at();
        Ok(Outcome {
            translated: t,
            broken,
        })
    }
}

/// A key of `m`, ignoring ASCII case (Traefik's keys are case-insensitive).
fn key_of<'a>(m: &'a Map<String, Value>, want: &str) -> Option<&'a String> {
    m.keys().find(|k| k.eq_ignore_ascii_case(want))
}

/// Every item of a document: `<top>.<section>.<name>` for named entries,
/// `tls.certificates[<i>]` for certificates.
pub fn items(doc: &Value) -> HashSet<String> {
    let mut out = HashSet::new();
    let Some(root) = doc.as_object() else {
        return out;
    };
    for (k, v) in root {
        let top = k.to_ascii_lowercase();
        let Some(inner) = v.as_object() else {
            continue;
        };
        for (sk, sv) in inner {
            let section = sk.to_ascii_lowercase();
            match sv {
                Value::Object(entries) if super::merge::is_named(&top, &section) => {
                    out.extend(entries.keys().map(|n| format!("{top}.{section}.{n}")));
                }
                Value::Array(list) if top == "tls" && section == "certificates" => {
                    out.extend(
                        (0..list.len())
                            .filter(|i| !list[*i].is_null())
                            .map(|i| format!("tls.certificates[{i}]")),
                    );
                }
                _ => {}
            }
        }
    }
    out
}

/// Where an item lives: (top, section, name) or a certificate's index.
enum At<'a> {
    Named(&'a str, &'a str, &'a str),
    Cert(usize),
}

fn at(item: &str) -> Option<At<'_>> {
    if let Some(i) = item
        .strip_prefix("tls.certificates[")
        .and_then(|r| r.strip_suffix(']'))
    {
        return i.parse().ok().map(At::Cert);
    }
    let (top, rest) = item.split_once('.')?;
    let (section, name) = rest.split_once('.')?;
    Some(At::Named(top, section, name))
}

fn section<'a>(doc: &'a Value, top: &str, section: &str) -> Option<&'a Value> {
    let root = doc.as_object()?;
    let t = root.get(key_of(root, top)?)?.as_object()?;
    t.get(key_of(t, section)?)
}

fn section_mut<'a>(doc: &'a mut Value, top: &str, sec: &str) -> Option<&'a mut Value> {
    let root = doc.as_object_mut()?;
    let tk = key_of(root, top)?.clone();
    let t = root.get_mut(&tk)?.as_object_mut()?;
    let sk = key_of(t, sec)?.clone();
    t.get_mut(&sk)
}

fn get<'a>(doc: &'a Value, item: &str) -> Option<&'a Value> {
    match at(item)? {
        At::Named(t, s, n) => section(doc, t, s)?.as_object()?.get(n),
        At::Cert(i) => section(doc, "tls", "certificates")?.as_array()?.get(i),
    }
}

fn set(doc: &mut Value, item: &str, v: Value) {
    match at(item) {
        Some(At::Named(t, s, n)) => {
            if let Some(Value::Object(m)) = section_mut(doc, t, s) {
                m.insert(n.to_string(), v);
            }
        }
        Some(At::Cert(i)) => {
            if let Some(slot) = section_mut(doc, "tls", "certificates")
                .and_then(Value::as_array_mut)
                .and_then(|a| a.get_mut(i))
            {
                *slot = v;
            }
        }
        None => {}
    }
}

/// Takes an item out. A certificate becomes null, so the others keep their indexes (the
/// translation skips nulls).
fn remove(doc: &mut Value, item: &str) {
    match at(item) {
        Some(At::Named(t, s, n)) => {
            if let Some(Value::Object(m)) = section_mut(doc, t, s) {
                m.remove(n);
            }
        }
        Some(At::Cert(_)) => set(doc, item, Value::Null),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn router(rule: &str, service: &str, mws: &[&str]) -> Value {
        json!({"rule": rule, "service": service, "middlewares": mws})
    }

    fn names(t: &Translated) -> Vec<String> {
        let mut v: Vec<String> = t.dynamic.routers.iter().map(|r| r.name.clone()).collect();
        v.sort();
        v
    }

    #[test]
    fn one_broken_router_leaves_the_rest_and_keeps_its_last_good_version() {
        let mut kept = Kept::default();
        let doc = |a: Value| {
            json!({"http": {
                "routers": {"a": a, "b": router("Path(`/b`)", "s", &[])},
                "services": {"s": {"loadBalancer": {"servers": [{"url": "http://127.0.0.1:8080"}]}}},
            }})
        };
        // Broken from the start: left out, b serves.
        let o = kept
            .translate(doc(json!({"service": "s"})), &Files::Any, "file")
            .unwrap();
        assert_eq!(names(&o.translated), ["b"]);
        assert_eq!(o.broken.len(), 1);
        assert_eq!(o.broken[0].error.item.as_deref(), Some("http.routers.a"));
        assert!(!o.broken[0].kept);
        assert!(o.broken[0]
            .to_string()
            .contains("rule is required; left out"));
        // Fixed: both serve.
        let o = kept
            .translate(doc(router("Path(`/a`)", "s", &[])), &Files::Any, "file")
            .unwrap();
        assert_eq!(names(&o.translated), ["a", "b"]);
        assert!(o.broken.is_empty());
        // Broken again: its last good version serves and says so.
        let o = kept
            .translate(doc(router("Path(`/a`", "s", &[])), &Files::Any, "file")
            .unwrap();
        assert_eq!(names(&o.translated), ["a", "b"]);
        let a = o.translated.dynamic.routers.iter().find(|r| r.name == "a");
        assert_eq!(a.map(|r| r.rule_text.as_str()), Some("Path(`/a`)"));
        assert_eq!(o.broken.len(), 1);
        assert!(o.broken[0].kept, "{}", o.broken[0]);
        assert_eq!(o.broken[0].error.path, "http.routers.a.rule");
        // Deleted: forgotten, so a broken one of that name later is left out.
        let o = kept
            .translate(
                json!({"http": {"routers": {"b": router("Path(`/b`)", "s", &[])},
                                "services": {"s": {"loadBalancer": {}}}}}),
                &Files::Any,
                "file",
            )
            .unwrap();
        assert_eq!(names(&o.translated), ["b"]);
        let o = kept
            .translate(doc(json!({"service": "s"})), &Files::Any, "file")
            .unwrap();
        assert_eq!(names(&o.translated), ["b"]);
        assert!(!o.broken[0].kept);
    }

    #[test]
    fn what_names_a_broken_item_is_left_out_with_it() {
        let mut kept = Kept::default();
        let doc = json!({"http": {
            "routers": {
                "uses-m": router("Path(`/m`)", "s", &["m"]),
                "uses-chain": router("Path(`/c`)", "s", &["c"]),
                "uses-t": router("Path(`/t`)", "t", &[]),
                "uses-w": router("Path(`/w`)", "w", &[]),
                "fine": router("Path(`/`)", "s", &[]),
            },
            "middlewares": {
                "m": {"addPrefix": {}},
                "c": {"chain": {"middlewares": ["m"]}},
            },
            "services": {
                "s": {"loadBalancer": {"servers": [{"url": "http://127.0.0.1:8080"}]}},
                "t": {"loadBalancer": {"serversTransport": "gone",
                                       "servers": [{"url": "https://127.0.0.1:8443"}]}},
                "w": {"highestRandomWeight": {"services": [{"name": "s", "weight": 1}]}},
            },
            "serversTransports": {"gone": {"insecureSkipVerify": true}},
        }});
        let o = kept.translate(doc, &Files::Any, "file").unwrap();
        assert_eq!(names(&o.translated), ["fine"]);
        let broken: Vec<&str> = o
            .broken
            .iter()
            .filter_map(|b| b.error.item.as_deref())
            .collect();
        assert!(broken.contains(&"http.middlewares.m"), "{broken:?}");
        assert!(
            broken.contains(&"http.serverstransports.gone"),
            "{broken:?}"
        );
        assert!(broken.contains(&"http.services.t"), "{broken:?}");
        let said = o.translated.unsupported.join("\n");
        for r in ["uses-m", "uses-chain", "uses-t", "uses-w"] {
            assert!(
                said.contains(&format!("http.routers.{r}: left out")),
                "{r}: {said}"
            );
        }
    }

    #[test]
    fn certificates_keep_their_places_when_one_is_left_out() {
        let mut kept = Kept::default();
        let doc = json!({"tls": {"certificates": [
            {"certFile": "/nonexistent/a.crt"},
            {"certFile": "/etc/b.crt", "keyFile": "/etc/b.key"},
        ]}});
        let o = kept.translate(doc, &Files::Any, "file").unwrap();
        assert_eq!(o.translated.dynamic.certificates.len(), 1);
        assert_eq!(
            o.broken[0].error.item.as_deref(),
            Some("tls.certificates[0]")
        );
    }
}

//! The `file` provider: services from TOML or YAML files, watched.
//!
//! The watch is on the directory (a file path watches its parent), because editors and deploy tools
//! replace files by renaming over them, which a watch on the file's inode would miss. Events are
//! debounced, then every matching file is re-read. Each file keeps its last good content: a
//! half-written or invalid file is rejected with file, line and reason, and changes nothing — not
//! even its own earlier contribution — until it parses again; a deleted file's instances go. An
//! empty file counts as one being rewritten (its last good content stays).
//!
//! A file whose top level has `http`, `tcp`, `udp` or `tls` is a Traefik dynamic configuration
//! (see [`super::traefik`]): its services' servers become instances, and its routers,
//! middlewares and certificates go to the proxy.
//!
//! lb's own format (TOML; YAML has the same shape, `services`/`instances` also accepted):
//! ```toml
//! [[service]]
//! name = "web"
//! [[service.instance]]
//! address = "10.0.0.11"
//! port = 80          # optional, default 0
//! weight = 1         # optional
//! zone = "a"         # optional
//! metadata = { mac = "02:00:00:00:00:11" }
//! ```

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{anyhow, Context as _, Result};
use notify::{RecursiveMode, Watcher as _};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Event, Rank};
use crate::{
    model::instance::{Instance, Services},
    model::{valid_name, FileProviderSpec},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(default, alias = "services")]
    service: Vec<ServiceDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceDoc {
    name: String,
    #[serde(default, alias = "instances")]
    instance: Vec<Instance>,
}

/// A rejected file: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub file: PathBuf,
    pub line: usize,
    pub reason: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.reason)
        } else {
            write!(f, "{}: {}", self.file.display(), self.reason)
        }
    }
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

fn is_services_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("toml" | "yaml" | "yml")
    )
}

/// What one file says.
#[derive(Debug, Default)]
pub struct Doc {
    pub services: Services,
    pub routing: crate::model::l7::Dynamic,
    pub unsupported: Vec<String>,
}

/// Parses one file: a Traefik dynamic configuration, or lb's services document.
pub fn parse_any(path: &Path, text: &str) -> Result<Doc, FileError> {
    let generic: Option<serde_json::Value> = if is_yaml(path) {
        serde_saphyr::from_str(text).ok()
    } else {
        toml::from_str(text).ok()
    };
    match generic {
        Some(doc) if super::traefik::is_traefik(&doc) => {
            let t = super::traefik::translate(&doc).map_err(|e| FileError {
                file: path.into(),
                line: super::traefik::line_of(text, &e.path),
                reason: e.to_string(),
            })?;
            Ok(Doc {
                services: t.services,
                routing: t.dynamic,
                unsupported: t
                    .unsupported
                    .into_iter()
                    .map(|u| format!("{}: {u}", path.display()))
                    .collect(),
            })
        }
        _ => Ok(Doc {
            services: parse(path, text)?,
            ..Doc::default()
        }),
    }
}

/// Parses one services document.
pub fn parse(path: &Path, text: &str) -> Result<Services, FileError> {
    let fail = |line: usize, reason: String| FileError {
        file: path.into(),
        line,
        reason,
    };
    let doc: Document = if is_yaml(path) {
        serde_saphyr::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line() as usize).unwrap_or(0);
            let msg = e.to_string();
            fail(
                line,
                msg.lines().next().unwrap_or("invalid YAML").to_string(),
            )
        })?
    } else {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| {
                    text[..s.start.min(text.len())]
                        .bytes()
                        .filter(|b| *b == b'\n')
                        .count()
                        + 1
                })
                .unwrap_or(0);
            fail(line, e.message().to_string())
        })?
    };
    let mut out = Services::new();
    for (i, s) in doc.service.iter().enumerate() {
        if !valid_name(&s.name) {
            return Err(fail(
                0,
                format!(
                    "service[{i}].name: {:?} must be non-empty [A-Za-z0-9_.-]",
                    s.name
                ),
            ));
        }
        let instances = out.entry(s.name.clone()).or_default();
        for (j, inst) in s.instance.iter().enumerate() {
            if inst.weight > 1000 {
                return Err(fail(
                    0,
                    format!(
                        "service[{i}].instance[{j}].weight: {} is above 1000",
                        inst.weight
                    ),
                ));
            }
            if instances.insert(inst.key(), inst.clone()).is_some() {
                return Err(fail(
                    0,
                    format!(
                        "service[{i}].instance[{j}]: duplicate instance {}",
                        inst.key()
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// The files a path stands for: itself, or the services files in it (sorted).
fn files_of(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_services_file(p))
            .collect();
        v.sort();
        Ok(v)
    } else if path.exists() {
        Ok(vec![path.to_path_buf()])
    } else {
        Ok(Vec::new())
    }
}

/// Per-file last good snapshots of one watched path.
pub struct FileSource {
    path: PathBuf,
    good: BTreeMap<PathBuf, Doc>,
}

impl FileSource {
    pub fn new(path: &Path) -> Self {
        FileSource {
            path: path.to_path_buf(),
            good: BTreeMap::new(),
        }
    }

    /// Re-reads every file: returns the merged snapshot and the files rejected this time.
    pub fn reload(&mut self) -> (Services, Vec<FileError>) {
        let (services, _, errors) = self.reload_all();
        (services, errors)
    }

    /// [`FileSource::reload`], with the files' routing (and what of it is unsupported) too.
    pub fn reload_all(&mut self) -> (Services, Routing, Vec<FileError>) {
        let mut errors = Vec::new();
        let files = match files_of(&self.path) {
            Ok(f) => f,
            Err(e) => {
                errors.push(FileError {
                    file: self.path.clone(),
                    line: 0,
                    reason: format!("{e:#}"),
                });
                return (self.merged(), self.routing(), errors);
            }
        };
        self.good.retain(|p, _| files.contains(p));
        for f in files {
            match std::fs::read_to_string(&f) {
                // A zero-length file is almost always one being rewritten (truncate, then write):
                // keep its last good content. Delete the file, or write `service = []`, to empty it.
                Ok(text) if text.trim().is_empty() && self.good.contains_key(&f) => {
                    errors.push(FileError {
                        file: f,
                        line: 0,
                        reason: "empty: keeping its last good content".into(),
                    })
                }
                Ok(text) => match parse_any(&f, &text) {
                    Ok(s) => {
                        self.good.insert(f, s);
                    }
                    Err(e) => errors.push(e),
                },
                Err(e) => errors.push(FileError {
                    file: f,
                    line: 0,
                    reason: e.to_string(),
                }),
            }
        }
        (self.merged(), self.routing(), errors)
    }

    /// Every file's routing together (files in name order; a name defined twice: the first).
    fn routing(&self) -> Routing {
        let mut out = Routing::default();
        for doc in self.good.values() {
            let r = &doc.routing;
            for x in &r.routers {
                if !out.dynamic.routers.iter().any(|o| o.name == x.name) {
                    out.dynamic.routers.push(x.clone());
                }
            }
            for x in &r.tcp_routers {
                if !out.dynamic.tcp_routers.iter().any(|o| o.name == x.name) {
                    out.dynamic.tcp_routers.push(x.clone());
                }
            }
            for (n, x) in &r.services {
                out.dynamic
                    .services
                    .entry(n.clone())
                    .or_insert_with(|| x.clone());
            }
            for (n, x) in &r.middlewares {
                if !out.dynamic.middlewares.iter().any(|(o, _)| o == n) {
                    out.dynamic.middlewares.push((n.clone(), x.clone()));
                }
            }
            out.dynamic
                .certificates
                .extend(r.certificates.iter().cloned());
            out.unsupported.extend(doc.unsupported.iter().cloned());
        }
        out
    }

    fn merged(&self) -> Services {
        let mut out = Services::new();
        for s in self.good.values().map(|d| &d.services) {
            for (name, inst) in s {
                out.entry(name.clone())
                    .or_default()
                    .extend(inst.iter().map(|(k, i)| (*k, i.clone())));
            }
        }
        out
    }
}

/// The routing of every file of a source.
#[derive(Debug, Default)]
pub struct Routing {
    pub dynamic: crate::model::l7::Dynamic,
    pub unsupported: Vec<String>,
}

/// Runs the provider: initial load, then a reload after each debounced burst of changes.
pub async fn run(spec: FileProviderSpec, events: mpsc::Sender<Event>) -> Result<()> {
    let name = format!("file:{}", spec.path.display());
    let mut source = FileSource::new(&spec.path);
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Our own reads raise open/close (access) events: reacting to them would reload forever.
        if let Ok(ev) = res {
            if !matches!(ev.kind, notify::EventKind::Access(_)) {
                let _ = tx.send(crate::clock::now());
            }
        }
    })
    .context("creating the file watcher")?;
    let watch_dir = if spec.path.is_dir() {
        spec.path.clone()
    } else {
        spec.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    };
    watcher
        .watch(&watch_dir, RecursiveMode::NonRecursive)
        .map_err(|e| anyhow!("watching {}: {e}", watch_dir.display()))?;
    info!(provider = name, dir = %watch_dir.display(), "watching");
    let mut first = Some(crate::clock::now());
    loop {
        let at = match first.take() {
            Some(at) => at,
            None => match rx.recv().await {
                Some(at) => at,
                None => return Ok(()),
            },
        };
        // Debounce: wait until the directory has been quiet for `debounce`.
        loop {
            match tokio::time::timeout(spec.debounce, rx.recv()).await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(_) => break,
            }
        }
        // Reading files and resolving Traefik servers' host names block: off the runtime.
        let (back, (services, routing, errors)) = tokio::task::spawn_blocking(move || {
            let r = source.reload_all();
            (source, r)
        })
        .await
        .map_err(|e| anyhow!("file provider: {e}"))?;
        source = back;
        events
            .send(Event::Routing {
                provider: name.clone(),
                rank: Rank::FILE,
                routing: routing.dynamic,
                unsupported: routing.unsupported,
            })
            .await
            .map_err(|_| anyhow!("control loop gone"))?;
        events
            .send(Event::Snapshot {
                provider: name.clone(),
                rank: Rank::FILE,
                services,
                at,
            })
            .await
            .map_err(|_| anyhow!("control loop gone"))?;
        for e in errors {
            warn!(provider = name, "rejected: {e}");
            let _ = events
                .send(Event::Error {
                    provider: name.clone(),
                    rank: Rank::FILE,
                    error: e.to_string(),
                })
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_and_yaml_parse_to_the_same_services() {
        let t = parse(
            Path::new("a.toml"),
            "[[service]]\nname = \"web\"\n[[service.instance]]\naddress = \"10.0.0.1\"\nport = 80\nweight = 2\n",
        )
        .expect("toml");
        let y = parse(
            Path::new("a.yaml"),
            "services:\n  - name: web\n    instances:\n      - address: 10.0.0.1\n        port: 80\n        weight: 2\n",
        )
        .expect("yaml");
        assert_eq!(t, y);
        assert_eq!(t["web"].values().next().map(|i| i.weight), Some(2));
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = parse(
            Path::new("s.toml"),
            "[[service]]\nname = \"web\"\n[[service.instance]]\naddress = \"10.0.0.x\"\n",
        )
        .expect_err("bad address");
        assert_eq!((e.line, e.file.as_path()), (4, Path::new("s.toml")), "{e}");
        let e = parse(Path::new("s.yaml"), "services:\n  - name: web\n    instances:\n      - address: 10.0.0.1\n        weigth: 2\n")
            .expect_err("unknown field");
        assert_eq!(e.line, 5, "{e}");
        assert!(e.reason.contains("weigth"), "{e}");
    }
}

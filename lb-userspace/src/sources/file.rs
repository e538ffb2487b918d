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
//! middlewares and certificates go to the proxy. As in Traefik, the Traefik files of a directory
//! (subdirectories included) are one configuration ([`super::traefik::merge`]), translated item
//! by item: a broken router keeps its last good version or is left out alone
//! ([`super::traefik::keep`]), and the message names the file and line it came from.
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

/// One file, read: lb's services, or a Traefik configuration not translated yet (a provider's
/// Traefik files are translated together).
#[derive(Debug, Default)]
pub struct Parsed {
    /// lb's services document's instances (none for a Traefik file).
    pub services: Services,
    /// A Traefik dynamic configuration, its shape checked.
    pub traefik: Option<serde_json::Value>,
    /// The text, for the lines of the errors found when translating.
    text: String,
}

/// What one file says on its own.
#[derive(Debug, Default)]
pub struct Doc {
    pub services: Services,
    pub routing: crate::model::l7::Dynamic,
    pub unsupported: Vec<String>,
    /// Items left out (a file alone has no last good versions), at their lines.
    pub broken: Vec<FileError>,
}

/// Parses and translates one file alone, as a provider whose path is that file does.
pub fn parse_any(path: &Path, text: &str) -> Result<Doc, FileError> {
    let mut src = FileSource::new(path);
    src.good.insert(path.to_path_buf(), parse_file(path, text)?);
    let mut errors = Vec::new();
    let (mut services, routing, broken) = src.translate(&mut errors);
    if let Some(e) = errors.pop() {
        return Err(e);
    }
    for (name, inst) in src.good.values().flat_map(|d| d.services.iter()) {
        services
            .entry(name.clone())
            .or_default()
            .extend(inst.clone());
    }
    Ok(Doc {
        services,
        routing: routing.dynamic,
        unsupported: routing.unsupported,
        broken,
    })
}

/// Line (1-based) and message of a TOML or YAML syntax error.
pub(crate) fn syntax_error(path: &Path, text: &str) -> Option<(usize, String)> {
    if is_yaml(path) {
        let e = serde_saphyr::from_str::<serde_json::Value>(text).err()?;
        let line = e.location().map(|l| l.line() as usize).unwrap_or(0);
        let msg = e.to_string();
        Some((
            line,
            msg.lines().next().unwrap_or("invalid YAML").to_string(),
        ))
    } else {
        let e = toml::from_str::<toml::Table>(text).err()?;
        Some((toml_line(text, &e), e.message().to_string()))
    }
}

fn toml_line(text: &str, e: &toml::de::Error) -> usize {
    e.span()
        .map(|s| {
            text[..s.start.min(text.len())]
                .bytes()
                .filter(|b| *b == b'\n')
                .count()
                + 1
        })
        .unwrap_or(0)
}

/// Parses one file: a Traefik dynamic configuration (checked for its shape, translated with the
/// provider's other files), or lb's services document. A syntax error is reported as itself,
/// at its line, whatever the file was meant to be.
pub fn parse_file(path: &Path, text: &str) -> Result<Parsed, FileError> {
    let fail = |line: usize, reason: String| FileError {
        file: path.into(),
        line,
        reason,
    };
    // A new empty file (or only comments, in YAML) says nothing yet.
    if text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#')
    }) {
        return Ok(Parsed::default());
    }
    let generic: Result<serde_json::Value, ()> = if is_yaml(path) {
        serde_saphyr::from_str(text).map_err(|_| ())
    } else {
        toml::from_str(text).map_err(|_| ())
    };
    let Ok(doc) = generic else {
        let (line, reason) = syntax_error(path, text).unwrap_or((0, "unreadable".into()));
        return Err(fail(line, reason));
    };
    if super::traefik::is_traefik(&doc) {
        super::traefik::merge::check(&doc).map_err(|(key, why)| {
            fail(super::traefik::line_of(text, &key), format!("{key}: {why}"))
        })?;
        return Ok(Parsed {
            traefik: Some(doc),
            text: text.to_string(),
            ..Parsed::default()
        });
    }
    Ok(Parsed {
        services: parse(path, text)?,
        ..Parsed::default()
    })
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
        toml::from_str(text).map_err(|e| fail(toml_line(text, &e), e.message().to_string()))?
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

/// How deep subdirectories are followed (Traefik follows them all; a bound keeps a symlink
/// loop from hanging the reload).
const MAX_DEPTH: usize = 8;

/// The files a path stands for: itself, or the services files in it and in its subdirectories,
/// sorted by path (the order Traefik merges a directory in: the first definition wins).
fn files_of(path: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            // Editors' and deploy tools' hidden files (`.x.yml.swp`, `..data`) are not config.
            if p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
            {
                continue;
            }
            if p.is_dir() && depth < MAX_DEPTH {
                walk(&p, depth + 1, out)?;
            } else if p.is_file() && is_services_file(&p) {
                out.push(p);
            }
        }
        Ok(())
    }
    if path.is_dir() {
        let mut v = Vec::new();
        walk(path, 0, &mut v)?;
        v.sort();
        Ok(v)
    } else if path.exists() {
        Ok(vec![path.to_path_buf()])
    } else {
        Ok(Vec::new())
    }
}

/// Per-file last good snapshots of one watched path, and the last good version of each item of
/// its Traefik configuration.
pub struct FileSource {
    path: PathBuf,
    good: BTreeMap<PathBuf, Parsed>,
    kept: super::traefik::keep::Kept,
}

impl FileSource {
    pub fn new(path: &Path) -> Self {
        FileSource {
            path: path.to_path_buf(),
            good: BTreeMap::new(),
            kept: Default::default(),
        }
    }

    /// Re-reads every file: returns the merged snapshot and the files rejected this time.
    pub fn reload(&mut self) -> (Services, Vec<FileError>) {
        let (services, _, errors) = self.reload_all();
        (services, errors)
    }

    /// [`FileSource::reload`], with the files' routing (and what of it is unsupported or broken)
    /// too.
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
                Vec::new()
            }
        };
        if errors.is_empty() {
            self.good.retain(|p, _| files.contains(p));
        }
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
                Ok(text) => match parse_file(&f, &text) {
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
        let (mut services, mut routing, broken) = self.translate(&mut errors);
        routing.broken = broken.iter().map(ToString::to_string).collect();
        for s in self.good.values().map(|d| &d.services) {
            for (name, inst) in s {
                services
                    .entry(name.clone())
                    .or_default()
                    .extend(inst.iter().map(|(k, i)| (*k, i.clone())));
            }
        }
        (services, routing, errors)
    }

    /// The Traefik files' configuration, merged and translated item by item, and its broken
    /// items at their files and lines; a document lb cannot read at all is one of `errors`.
    fn translate(&mut self, errors: &mut Vec<FileError>) -> (Services, Routing, Vec<FileError>) {
        let traefik: Vec<(&PathBuf, &Parsed)> = self
            .good
            .iter()
            .filter(|(_, d)| d.traefik.is_some())
            .collect();
        if traefik.is_empty() {
            return (Services::new(), Routing::default(), Vec::new());
        }
        let docs: Vec<&serde_json::Value> = traefik
            .iter()
            .filter_map(|(_, d)| d.traefik.as_ref())
            .collect();
        let names: Vec<String> = traefik
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        let merged = super::traefik::merge::merge(&docs, &names);
        // Where a key path is: the file that defines its item, and the line in it.
        let locate = |key: &str| -> (PathBuf, usize) {
            let i = super::traefik::merge::item_of(key, merged.origin.keys())
                .and_then(|item| merged.origin.get(item))
                .copied()
                .unwrap_or(0);
            match traefik.get(i) {
                Some((p, d)) => ((*p).clone(), super::traefik::line_of(&d.text, key)),
                None => (self.path.clone(), 0),
            }
        };
        let mut routing = Routing::default();
        // A skipped duplicate is said where it is, not where the one that counts is.
        for (key, i, said) in &merged.skipped {
            let (file, text) = traefik.get(*i).map_or((self.path.clone(), ""), |(p, d)| {
                ((*p).clone(), d.text.as_str())
            });
            let line = super::traefik::line_of(text, key);
            routing.unsupported.push(at((file, line), said));
        }
        let outcome =
            match self
                .kept
                .translate(merged.doc.clone(), &super::traefik::Files::Any, "file")
            {
                Ok(o) => o,
                Err(e) => {
                    let (file, line) = locate(&e.path);
                    errors.push(FileError {
                        file,
                        line,
                        reason: e.to_string(),
                    });
                    return (Services::new(), routing, Vec::new());
                }
            };
        let mut broken = Vec::new();
        for b in &outcome.broken {
            let (file, line) = locate(&b.error.path);
            broken.push(FileError {
                file,
                line,
                reason: b.to_string(),
            });
        }
        let t = outcome.translated;
        for u in t.unsupported {
            let key = u.split(':').next().unwrap_or_default().to_string();
            routing.unsupported.push(at(locate(&key), &u));
        }
        routing.dynamic = t.dynamic;
        routing.refresh_at = t.refresh_at;
        (t.services, routing, broken)
    }
}

/// `file:line: message`.
fn at((file, line): (PathBuf, usize), message: &str) -> String {
    FileError {
        file,
        line,
        reason: message.to_string(),
    }
    .to_string()
}

/// The routing of every file of a source.
#[derive(Debug, Default)]
pub struct Routing {
    pub dynamic: crate::model::l7::Dynamic,
    pub unsupported: Vec<String>,
    /// Items lb could not use, each kept at its last good version or left out, as said.
    pub broken: Vec<String>,
    /// When the earliest DNS answer of its servers' names runs out: read again then.
    pub refresh_at: Option<std::time::Instant>,
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
    // A directory is read with its subdirectories, so it is watched with them.
    let mode = if spec.path.is_dir() {
        RecursiveMode::Recursive
    } else {
        RecursiveMode::NonRecursive
    };
    watcher
        .watch(&watch_dir, mode)
        .map_err(|e| anyhow!("watching {}: {e}", watch_dir.display()))?;
    info!(provider = name, dir = %watch_dir.display(), "watching");
    let mut first = Some(crate::clock::now());
    // When a DNS answer the last read used runs out: the files are read again then, as if
    // they had changed, so a changed record is followed.
    let mut refresh: Option<std::time::Instant> = None;
    loop {
        let (at, changed) = match first.take() {
            Some(at) => (at, true),
            None => {
                let due = async {
                    match refresh {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    got = rx.recv() => match got {
                        Some(at) => (at, true),
                        None => return Ok(()),
                    },
                    () = due => (crate::clock::now(), false),
                }
            }
        };
        // Debounce: wait until the directory has been quiet for `debounce`.
        if changed {
            loop {
                match tokio::time::timeout(spec.debounce, rx.recv()).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return Ok(()),
                    Err(_) => break,
                }
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
        // From the end of this read, and never sooner than a second after it: a read that
        // took longer than the TTLs does not start the next one at once.
        let earliest = crate::clock::now() + std::time::Duration::from_secs(1);
        refresh = routing.refresh_at.map(|t| t.max(earliest));
        events
            .send(Event::Routing {
                provider: name.clone(),
                rank: Rank::FILE,
                routing: Box::new(routing.dynamic),
                unsupported: routing.unsupported,
                broken: routing.broken,
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

    /// A directory of Traefik files is one configuration: a middleware, a transport or a main
    /// service may be in another file; a file that does not parse is reported at its line with
    /// the parser's own message; a broken router is reported at its file and line and left out
    /// alone; an empty section is accepted.
    #[test]
    fn a_traefik_directory_is_merged_and_its_errors_point_into_its_files() {
        let dir = std::env::temp_dir().join(format!("lb-file-merge-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        write(
            "a.yml",
            "http:\n  routers:\n    r1:\n      rule: Path(`/`)\n      service: s\n      middlewares: [m@file]\n",
        );
        write(
            "sub/b.toml",
            "[http.middlewares.m.addPrefix]\nprefix = \"/x\"\n\n[http.services.s.loadBalancer]\nserversTransport = \"t\"\n\
             [[http.services.s.loadBalancer.servers]]\nurl = \"https://127.0.0.1:8443\"\n",
        );
        write(
            "c.yml",
            "http:\n  serversTransports:\n    t:\n      serverName: x.test\n",
        );
        write("d.yml", "http:\n  routers:\n    bad:\n      service: s\n");
        write("e.yml", "http:\n  services:\n    # nothing yet\n");
        write("f.yml", "http:\n  routers:\n    x: [\n");
        write(
            "g.yml",
            "http:\n  routers:\n    r1:\n      rule: Path(`/other`)\n      service: s\n",
        );
        let mut src = FileSource::new(&dir);
        let (services, routing, errors) = src.reload_all();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].file.ends_with("f.yml"), "{}", errors[0]);
        assert!(errors[0].line >= 3, "{}", errors[0]);
        assert!(!errors[0].reason.contains("unknown field"), "{}", errors[0]);
        let r: Vec<&str> = routing
            .dynamic
            .routers
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(r, ["r1"]);
        assert_eq!(
            routing.dynamic.routers[0].rule_text, "Path(`/`)",
            "a.yml's, the first"
        );
        assert_eq!(routing.dynamic.routers[0].middlewares, ["m"]);
        assert!(routing.dynamic.services["s"]
            .tls
            .as_ref()
            .is_some_and(|t| t.server_name.as_deref() == Some("x.test")));
        assert_eq!(services["s"].len(), 1);
        assert_eq!(routing.broken.len(), 1, "{:?}", routing.broken);
        let d = dir.join("d.yml").display().to_string();
        assert_eq!(
            routing.broken[0],
            format!("{d}:3: http.routers.bad: rule is required; left out")
        );
        let g = dir.join("g.yml").display().to_string();
        assert!(
            routing
                .unsupported
                .iter()
                .any(|u| u.starts_with(&format!("{g}:3: http.routers.r1: defined in"))),
            "{:?}",
            routing.unsupported
        );
        let _ = std::fs::remove_dir_all(&dir);
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

//! The agent's modules import one another only as ARCHITECTURE.md allows, and never in a
//! circle. Every `crate::`, `super::` and `self::` path counts — `use` trees, inline paths in
//! types and expressions, and paths inside macro invocations — read with syn from the sources
//! themselves, so the rule cannot drift from the code.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// A module's path from the crate root: `src/proxy/conn.rs` is `["proxy", "conn"]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file");
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_string());
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Paths a file names, each resolved to the crate root.
struct Paths {
    /// The module being read: the file's, plus the inline `mod x { … }` blocks around the path.
    here: Vec<String>,
    found: BTreeSet<Vec<String>>,
}

impl Paths {
    /// `segs` as written (`crate`, `super`, `self` first, or not a crate path at all).
    fn add(&mut self, segs: &[String]) {
        let Some(first) = segs.first() else { return };
        let mut abs: Vec<String> = match first.as_str() {
            "crate" => Vec::new(),
            "super" | "self" => self.here.clone(),
            _ => return,
        };
        let mut rest = segs;
        if first == "crate" {
            rest = &segs[1..];
        }
        for s in rest {
            match s.as_str() {
                "super" => {
                    abs.pop();
                }
                "self" => {}
                _ => abs.push(s.clone()),
            }
        }
        if !abs.is_empty() {
            self.found.insert(abs);
        }
    }

    fn tree(&mut self, prefix: &mut Vec<String>, t: &syn::UseTree) {
        match t {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                let p = prefix.clone();
                self.add(&p);
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                let p = prefix.clone();
                self.add(&p);
                prefix.pop();
            }
            syn::UseTree::Glob(_) => {
                let p = prefix.clone();
                self.add(&p);
            }
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.tree(prefix, t);
                }
            }
        }
    }

    /// `crate :: a :: b` sequences inside a macro's tokens (format strings aside).
    fn tokens(&mut self, ts: proc_macro2::TokenStream) {
        let toks: Vec<proc_macro2::TokenTree> = ts.into_iter().collect();
        let mut i = 0;
        while i < toks.len() {
            if let proc_macro2::TokenTree::Group(g) = &toks[i] {
                self.tokens(g.stream());
                i += 1;
                continue;
            }
            let start = matches!(&toks[i], proc_macro2::TokenTree::Ident(id)
                if id == "crate" || id == "super");
            if !start {
                i += 1;
                continue;
            }
            let mut segs = vec![toks[i].to_string()];
            let mut j = i + 1;
            while j + 2 < toks.len() + 1 {
                let colons = matches!((&toks.get(j), &toks.get(j + 1)),
                    (Some(proc_macro2::TokenTree::Punct(a)), Some(proc_macro2::TokenTree::Punct(b)))
                    if a.as_char() == ':' && b.as_char() == ':');
                match (colons, toks.get(j + 2)) {
                    (true, Some(proc_macro2::TokenTree::Ident(id))) => {
                        segs.push(id.to_string());
                        j += 3;
                    }
                    _ => break,
                }
            }
            self.add(&segs);
            i = j.max(i + 1);
        }
    }
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        self.here.push(m.ident.to_string());
        syn::visit::visit_item_mod(self, m);
        self.here.pop();
    }
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.tree(&mut Vec::new(), &u.tree);
    }
    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.add(&segs);
        syn::visit::visit_path(self, p);
    }
    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.tokens(m.tokens.clone());
        syn::visit::visit_macro(self, m);
    }
}

/// The unit a module belongs to: the longest of its ancestors (itself included) the table has a
/// row for (`l4/plan` for `src/l4/plan/tests.rs`), else its top-level module (a folder or a file
/// under src/). A folder's rows for its own parts hold the layers inside it too.
fn unit(module: &[String], rows: &BTreeSet<String>) -> String {
    (2..=module.len())
        .rev()
        .map(|n| module[..n].join("/"))
        .find(|u| rows.contains(u))
        .or_else(|| module.first().cloned())
        .unwrap_or_else(|| "lib".into())
}

/// What each unit may import, from ARCHITECTURE.md's table: rows whose first cell names a
/// unit in backticks (`model/` or `main.rs`) and whose last cell lists the units it may use.
fn allowed(architecture: &str) -> BTreeMap<String, BTreeSet<String>> {
    let name = |cell: &str| -> Option<String> {
        let c = cell.trim().trim_matches('`');
        let c = c.trim_end_matches('/').trim_end_matches(".rs");
        (!c.is_empty()
            && c.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '/'))
        .then(|| c.to_string())
    };
    let mut out = BTreeMap::new();
    let mut in_table = false;
    for line in architecture.lines() {
        if line.starts_with("## ") {
            in_table = line.contains("Layers");
            continue;
        }
        if !in_table || !line.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').collect();
        if cells.len() < 3 || !cells[0].trim().starts_with('`') {
            continue;
        }
        let Some(unit) = name(cells[0]) else { continue };
        let uses = cells[cells.len() - 1]
            .split(',')
            .filter_map(|c| {
                let c = c.trim();
                c.starts_with('`').then(|| name(c)).flatten()
            })
            .collect();
        out.insert(unit, uses);
    }
    out
}

/// Unit → units it names, over every file of the crate (lib.rs and main.rs are their own);
/// `rows` are the units the table names.
fn edges(src: &Path, rows: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let module = module_of(src, &f);
        let from = match f.file_name().and_then(|n| n.to_str()) {
            Some("main.rs") => "main".to_string(),
            Some("lib.rs") => "lib".to_string(),
            _ => unit(&module, rows),
        };
        let mut v = Paths {
            here: module.clone(),
            found: BTreeSet::new(),
        };
        v.visit_file(&ast);
        let to = out.entry(from.clone()).or_default();
        for p in v.found {
            let u = unit(&p, rows);
            if u != from {
                to.insert(u);
            }
        }
    }
    out
}

/// A circle of units, if there is one.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The sources checked: this crate's, or another tree's (`LB_LAYERS_SRC=/old/lb-userspace/src`,
/// to see what the check says of an older commit).
fn src_dir() -> PathBuf {
    std::env::var_os("LB_LAYERS_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate_dir().join("src"))
}

fn layer_table() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(crate_dir().join("../ARCHITECTURE.md"))
        .expect("ARCHITECTURE.md at the repository's root");
    allowed(&doc)
}

#[test]
fn no_module_imports_in_a_circle() {
    let rows = layer_table().into_keys().collect();
    let e = edges(&src_dir(), &rows);
    if let Some(c) = cycle(&e) {
        panic!("import cycle: {}", c.join(" → "));
    }
}

#[test]
fn every_module_imports_only_what_architecture_md_allows() {
    let rules = layer_table();
    assert!(rules.len() >= 5, "the layer table was not found: {rules:?}");
    let rows = rules.keys().cloned().collect();
    let mut wrong = Vec::new();
    for (from, to) in edges(&src_dir(), &rows) {
        let Some(may) = rules.get(&from) else {
            wrong.push(format!("{from}: not in ARCHITECTURE.md's layer table"));
            continue;
        };
        for t in to {
            if !may.contains(&t) {
                wrong.push(format!("{from} imports {t}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The checker itself: a circle through an inline path and a macro is found, and `super::`
/// resolves against the file's own module.
#[test]
fn the_checker_sees_inline_and_macro_paths() {
    let dir = std::env::temp_dir().join(format!("lb-layers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("b")).expect("dir");
    std::fs::write(dir.join("a.rs"), "fn f() -> crate::b::T { todo!() }").expect("write");
    std::fs::write(dir.join("b/mod.rs"), "pub struct T;").expect("write");
    std::fs::write(
        dir.join("b/c.rs"),
        "fn g() { tracing::info!(\"{}\", crate::a::X); let _ = super::T; }",
    )
    .expect("write");
    let e = edges(&dir, &BTreeSet::new());
    assert_eq!(e["a"], BTreeSet::from(["b".to_string()]));
    assert_eq!(e["b"], BTreeSet::from(["a".to_string()]));
    assert!(cycle(&e).is_some());
    // With a row for `b/c`, it is a unit of its own: `super::T` is an import of `b`.
    let e = edges(&dir, &BTreeSet::from(["b/c".to_string()]));
    assert_eq!(e["b/c"], BTreeSet::from(["a".to_string(), "b".to_string()]));
    assert!(e["b"].is_empty(), "b/mod.rs imports nothing");
    // `super::` inside an inline module is its parent: here, the file's own module.
    std::fs::write(dir.join("b/c.rs"), "mod tests { use super::T; }").expect("write");
    let e = edges(&dir, &BTreeSet::from(["b/c".to_string()]));
    assert!(e["b/c"].is_empty(), "{e:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

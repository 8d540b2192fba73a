//! The agent's architecture, checked: the modules under `src/` import each other in one
//! direction only, as `src/lib.rs` documents, so the core never reaches up into an API edge
//! and no import cycle creeps back in. It reads the sources: `crate::<module>` paths (also
//! inside `use crate::{a, b}`) outside comments count as imports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Layers from the bottom up; a module may import modules of its own layer or below. The
/// bottom layer holds the parts (formats of volumes, the catalog, storage clients, QEMU).
const LAYERS: &[&[&str]] = &[
    &[
        "model",
        "volume",
        "guestfs",
        "config",
        "catalog",
        "error",
        "validate",
        "tags",
        "throttle",
        "tool",
        "qemu",
        "storage",
        "metrics",
        "live",
        "roots",
        "retention",
        "keys",
    ],
    &["jobs"],
    &["backup", "export"],
    &["ops"],
    &["api"],
    &["rest"],
    &["daemon"],
];

fn strip_comments(src: &str) -> String {
    src.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// `crate::x` and `crate::{x, y::z}` in `src`.
fn imports(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let src = strip_comments(src);
    let mut rest = src.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            walk(&p, files);
        } else if p.extension().is_some_and(|x| x == "rs") {
            files.push(p);
        }
    }
}

/// Top-level module -> the top-level modules it imports.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("component").as_os_str().to_string_lossy().to_string();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "bin" {
            continue;
        }
        let text = std::fs::read_to_string(&f).expect("read source");
        let deps = g.entry(module.clone()).or_default();
        deps.extend(imports(&text).into_iter().filter(|d| *d != module));
    }
    g
}

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("module {module} is in no layer: add it to LAYERS and to src/lib.rs's doc"))
}

#[test]
fn imports_point_down_the_layers() {
    let g = graph();
    let mut wrong = Vec::new();
    for (module, deps) in &g {
        for d in deps.iter().filter(|d| g.contains_key(*d)) {
            if layer_of(d) > layer_of(module) {
                wrong.push(format!("{module} imports {d}, a layer above it"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn no_import_cycle_among_the_modules() {
    let g = graph();
    // Depth-first search for a back edge, reporting the cycle it closes.
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in g.get(m).into_iter().flatten().filter(|d| g.contains_key(*d)) {
            if let Some(c) = visit(d, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(cycle) = visit(m, &g, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_scanner_sees_grouped_and_plain_imports_and_skips_comments() {
    let got = imports("use crate::{jobs::Job, ops};\nlet x = crate::api::status(); // crate::daemon\n");
    assert_eq!(got.into_iter().collect::<Vec<_>>(), ["api", "jobs", "ops"]);
}

//! No new file-level import circles in src/ (issue 18, "seams").
//!
//! Reads every `src/**/*.rs` (not `src/main.rs`: the binary is its own crate,
//! nothing in the library can import it), resolves the paths each file names
//! into the crate (`use crate::..`, `use super::..`, `use self::..`, a child
//! module's name, a name a `use` brought in, and the same paths written in
//! expressions and types, e.g. `crate::lb::table::route(..)`) to the file that
//! defines what they name, and finds the circles: sets of files that import each
//! other in a loop (strongly connected components of more than one file).
//!
//! The rules of the resolver:
//! * a module `a::b` is `src/a/b.rs` or `src/a/b/mod.rs`; a path may name an
//!   item inside a file or an inline module, so it resolves to the longest
//!   prefix that is a module, then to that module's file;
//! * a name a module got by `use` (re-exported or not) is followed to where
//!   that `use` points, so `super::Thing` in a child lands in the file that
//!   defines `Thing`, not in the parent that only hands it on;
//! * a module's file is the face of its submodules: it declares them
//!   (`mod child;`), re-exports them and drives them, so its arrows into its
//!   own submodules (`src/lb/mod.rs` -> `src/lb/proxy.rs`, `src/lib.rs` ->
//!   anything) are not counted; the submodules' arrows up to it are;
//! * items under `#[cfg(test)]` (the `mod tests` blocks, test-only methods)
//!   are skipped: the circles that count are those of the shipped code;
//! * comments, strings and char literals are skipped (a path in a doc comment
//!   is no import).
//!
//! Run alone: `cargo test --test integration circles`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The circles src/ has today (issue 18), each as its set of files. They are
/// tolerated while they are taken apart: a circle found must be one of these
/// or a part of one. A new circle, or one with a file that is not in its entry,
/// fails `no_new_import_circles`. THIS LIST MUST ONLY SHRINK, TO EMPTY: when a
/// circle is broken, `import_circle_allow_list_is_tight` fails and prints the
/// list to put here instead.
const ALLOWED_CIRCLES: &[&[&str]] = &[];

#[test]
fn no_new_import_circles() {
    let circles = circles(&read_src());
    let allowed = allowed();
    let bad: Vec<&BTreeSet<String>> = circles
        .iter()
        .filter(|c| !allowed.iter().any(|a| c.is_subset(a)))
        .collect();
    assert!(
        bad.is_empty(),
        "new (or grown) file-level import circles in src/; break them (move the shared \
         items down into a file both sides import) rather than adding them to \
         ALLOWED_CIRCLES:\n{}\nthe imports that tie them:\n{}",
        describe(&bad),
        ties(&read_src(), &bad),
    );
}

#[test]
fn import_circle_allow_list_is_tight() {
    let circles = circles(&read_src());
    let allowed = allowed();
    if circles.iter().any(|c| !allowed.iter().any(|a| c.is_subset(a))) {
        return; // a new or grown circle: no_new_import_circles says which
    }
    let tight: Vec<BTreeSet<String>> = allowed
        .iter()
        .flat_map(|a| circles.iter().filter(|c| c.is_subset(a)).cloned())
        .collect();
    assert!(
        tight == allowed,
        "ALLOWED_CIRCLES in tests/integration/circles.rs tolerates more than src/ has \
         (a circle was broken: well done). Shrink it to:\n{}",
        describe(&tight.iter().collect::<Vec<_>>()),
    );
}

#[test]
fn cycle_finder_on_a_synthetic_graph() {
    // a -> b -> c -> a is one circle; d <-> e another; f -> a and c -> g are
    // arrows into and out of a circle, not part of one; h imports itself (no
    // circle of files); i is alone.
    let mut graph = Graph::new();
    for (from, to) in [
        ("a", "b"),
        ("b", "c"),
        ("c", "a"),
        ("d", "e"),
        ("e", "d"),
        ("f", "a"),
        ("c", "g"),
        ("h", "h"),
        ("e", "g"),
    ] {
        graph.entry(from.into()).or_default().insert(to.into());
    }
    graph.entry("i".into()).or_default();
    let found = strongly_connected(&graph);
    let want: Vec<BTreeSet<String>> = vec![set(&["a", "b", "c"]), set(&["d", "e"])];
    assert_eq!(found, want);

    // Two circles joined by one more arrow each way are one circle.
    graph.get_mut("a").unwrap().insert("d".into());
    graph.get_mut("d").unwrap().insert("c".into());
    assert_eq!(strongly_connected(&graph), vec![set(&["a", "b", "c", "d", "e"])]);
}

#[test]
fn resolver_on_synthetic_sources() {
    let files: BTreeMap<String, String> = [
        ("src/lib.rs", "pub mod a;\npub mod c;\npub mod d;\nmod e;"),
        // The parent declares and re-exports b: its face, no arrow (b's
        // arrow up to it stays, and is no circle).
        (
            "src/a/mod.rs",
            "pub mod b;\npub use b::Thing;\n/// [`crate::c::Other`] in a doc comment\npub fn f() {}",
        ),
        // super::Thing lands in b itself (re-export followed), super::f in a.
        (
            "src/a/b.rs",
            "pub struct Thing;\nfn g() { let _ = \"crate::d::x\"; super::f(); }\n\
             #[cfg(test)]\nmod tests { use crate::d::Y; }\n\
             #[cfg(test)]\nfn only_in_tests() { crate::e::z(); }\nuse super::Thing as T;",
        ),
        // A grouped use, an alias used in an expression, a glob.
        (
            "src/c.rs",
            "use crate::{a::{self, Thing}, d::*};\npub struct Other;\n\
             fn h() { a::f(); let _c = 'x'; let _l: &'static str = r#\"crate::e\"#; }",
        ),
        (
            "src/d.rs",
            "pub mod inner { pub fn y() { super::super::c::Other; } }\n\
             fn k<'a>(_: &'a str) { self::inner::y(); }",
        ),
        ("src/e.rs", "pub fn z() {}"),
    ]
    .into_iter()
    .map(|(p, s)| (p.to_string(), s.to_string()))
    .collect();
    let graph = import_graph(&files);
    let arrows: BTreeSet<(&str, &str)> = graph
        .iter()
        .flat_map(|(f, ts)| ts.iter().map(move |t| (f.as_str(), t.as_str())))
        .collect();
    let want: BTreeSet<(&str, &str)> = [
        ("src/a/b.rs", "src/a/mod.rs"),
        ("src/c.rs", "src/a/b.rs"),
        ("src/c.rs", "src/a/mod.rs"),
        ("src/c.rs", "src/d.rs"),
        ("src/d.rs", "src/c.rs"),
    ]
    .into_iter()
    .collect();
    assert_eq!(arrows, want);
    assert_eq!(strongly_connected(&graph), vec![set(&["src/c.rs", "src/d.rs"])]);
}

// --- the graph ---------------------------------------------------------------

type Graph = BTreeMap<String, BTreeSet<String>>;
type ModPath = Vec<String>;

fn set(files: &[&str]) -> BTreeSet<String> {
    files.iter().map(|f| f.to_string()).collect()
}

fn allowed() -> Vec<BTreeSet<String>> {
    ALLOWED_CIRCLES.iter().map(|c| set(c)).collect()
}

fn describe(circles: &[&BTreeSet<String>]) -> String {
    circles
        .iter()
        .map(|c| {
            let files: Vec<String> = c.iter().map(|f| format!("{f:?}")).collect();
            format!("    &[{}],\n", files.join(", "))
        })
        .collect()
}

/// The arrows inside each circle, `from -> to`, one a line.
fn ties(files: &BTreeMap<String, String>, circles: &[&BTreeSet<String>]) -> String {
    let graph = import_graph(files);
    let mut out = String::new();
    for c in circles {
        for from in c.iter() {
            for to in graph[from].intersection(c) {
                out += &format!("    {from} -> {to}\n");
            }
        }
        out += "\n";
    }
    out
}

/// src/**/*.rs but src/main.rs, by path relative to the crate (`src/a/b.rs`).
fn read_src() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("reading src/") {
            let path = entry.expect("reading src/").path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).unwrap().to_string_lossy();
                let rel = rel.replace('\\', "/");
                if rel != "src/main.rs" {
                    let text = std::fs::read_to_string(&path).expect("reading a source file");
                    out.insert(rel, text);
                }
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = BTreeMap::new();
    walk(&root.join("src"), root, &mut out);
    out
}

fn circles(files: &BTreeMap<String, String>) -> Vec<BTreeSet<String>> {
    strongly_connected(&import_graph(files))
}

/// The module path of a file: `src/lib.rs` is the crate root `[]`,
/// `src/a/mod.rs` and `src/a.rs` are `[a]`, `src/a/b.rs` is `[a, b]`.
fn module_of(file: &str) -> ModPath {
    let rel = file.strip_prefix("src/").unwrap_or(file);
    let rel = rel.strip_suffix(".rs").unwrap_or(rel);
    let mut parts: ModPath = rel.split('/').map(String::from).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// One file's crate-relative paths, as written, each with the module (file or
/// inline) it is written in.
#[derive(Default)]
struct Parsed {
    /// (module, path as written); a glob `use a::*` gives the path `a`.
    refs: Vec<(ModPath, ModPath)>,
    /// (module, name) -> the path a `use` binds that name to, as written.
    aliases: Vec<((ModPath, String), ModPath)>,
    /// Every module declared here (`mod x;` and `mod x { .. }`), full path.
    modules: Vec<ModPath>,
}

/// file -> the files it imports from (never itself).
fn import_graph(files: &BTreeMap<String, String>) -> Graph {
    let mut file_of: BTreeMap<ModPath, String> = BTreeMap::new();
    let mut modules: BTreeSet<ModPath> = BTreeSet::new();
    let mut aliases: BTreeMap<(ModPath, String), ModPath> = BTreeMap::new();
    let mut parsed = BTreeMap::new();
    for (file, text) in files {
        let module = module_of(file);
        file_of.insert(module.clone(), file.clone());
        modules.insert(module.clone());
        let p = parse(&lex(text), &module);
        modules.extend(p.modules.iter().cloned());
        aliases.extend(p.aliases.iter().cloned());
        parsed.insert(file.clone(), p);
    }
    let r = Resolver {
        file_of,
        modules,
        aliases,
    };
    let mut graph = Graph::new();
    for (file, p) in &parsed {
        let to = graph.entry(file.clone()).or_default();
        let own = module_of(file);
        for (scope, path) in &p.refs {
            if let Some(target) = r.absolute(scope, path, 0).and_then(|a| r.file(&a, 0))
                && &target != file
                && !module_of(&target).starts_with(&own)
            {
                to.insert(target);
            }
        }
    }
    graph
}

struct Resolver {
    file_of: BTreeMap<ModPath, String>,
    modules: BTreeSet<ModPath>,
    aliases: BTreeMap<(ModPath, String), ModPath>,
}

impl Resolver {
    /// The absolute path (from the crate root) that `path`, written in
    /// module `scope`, names; None when it leaves the crate (std, other crates,
    /// locals).
    fn absolute(&self, scope: &ModPath, path: &[String], depth: usize) -> Option<ModPath> {
        let first = path.first()?;
        if depth > 16 {
            return None;
        }
        match first.as_str() {
            "crate" | "$crate" => Some(path[1..].to_vec()),
            "self" => Some([scope.as_slice(), &path[1..]].concat()),
            "super" => {
                let mut base = scope.clone();
                let mut k = 0;
                while path.get(k).is_some_and(|s| s == "super") {
                    base.pop()?;
                    k += 1;
                }
                Some([base.as_slice(), &path[k..]].concat())
            }
            name => {
                let child = [scope.as_slice(), &[name.to_string()][..]].concat();
                if self.modules.contains(&child) {
                    return Some([scope.as_slice(), path].concat());
                }
                let alias = self.aliases.get(&(scope.clone(), name.to_string()))?;
                let base = self.absolute(scope, alias, depth + 1)?;
                Some([base.as_slice(), &path[1..]].concat())
            }
        }
    }

    /// The file that defines what the absolute path names: the longest
    /// prefix that is a module; when the next segment is a name that module
    /// got by `use`, where that `use` points; else the module's file.
    fn file(&self, path: &[String], depth: usize) -> Option<String> {
        let k = (0..=path.len()).rev().find(|&k| self.modules.contains(&path[..k]))?;
        let module = path[..k].to_vec();
        if let Some(name) = path.get(k)
            && let Some(alias) = self.aliases.get(&(module.clone(), name.clone()))
            && depth < 16
            && let Some(base) = self.absolute(&module, alias, 0)
            && let Some(file) = self.file(&[base.as_slice(), &path[k + 1..]].concat(), depth + 1)
        {
            return Some(file);
        }
        (0..=module.len())
            .rev()
            .find_map(|k| self.file_of.get(&module[..k]).cloned())
    }
}

// --- lexing and parsing --------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    Sep,
    Punct(char),
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Identifiers, `::` and punctuation; comments, strings, chars, numbers and
/// lifetimes' quotes dropped.
fn lex(src: &str) -> Vec<Tok> {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let skip_string = |mut i: usize| {
        // i is just after the opening quote
        while i < c.len() {
            match c[i] {
                '\\' => i += 2,
                '"' => return i + 1,
                _ => i += 1,
            }
        }
        i
    };
    // i at a quote opening a char literal: the index after it
    let skip_char = |i: usize| {
        if at(i + 1) == '\\' {
            let mut j = i + 3;
            while j < c.len() && c[j] != '\'' {
                j += 1;
            }
            j + 1
        } else {
            i + 3
        }
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if ch == '"' {
            i = skip_string(i + 1);
        } else if ch == '\'' {
            if at(i + 1) == '\\' || at(i + 2) == '\'' {
                i = skip_char(i);
            } else {
                i += 1; // a lifetime: its name lexes as an identifier
            }
        } else if ch.is_ascii_digit() {
            while i < c.len() && is_ident(c[i]) {
                i += 1;
            }
        } else if is_ident(ch) {
            let start = i;
            while i < c.len() && is_ident(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let raw = matches!(word.as_str(), "r" | "br" | "cr");
            if raw && (at(i) == '"' || (at(i) == '#' && !is_ident(at(i + 1)))) {
                let mut hashes = 0;
                while at(i) == '#' {
                    hashes += 1;
                    i += 1;
                }
                i += 1; // the opening quote
                while i < c.len() {
                    if c[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                        i += 1 + hashes;
                        break;
                    }
                    i += 1;
                }
            } else if word == "r" && at(i) == '#' {
                // a raw identifier, r#type
                let s = i + 1;
                i = s;
                while i < c.len() && is_ident(c[i]) {
                    i += 1;
                }
                out.push(Tok::Ident(c[s..i].iter().collect()));
            } else if matches!(word.as_str(), "b" | "c") && at(i) == '"' {
                i = skip_string(i + 1);
            } else if word == "b" && at(i) == '\'' {
                i = skip_char(i);
            } else {
                out.push(Tok::Ident(word));
            }
        } else if ch == ':' && at(i + 1) == ':' {
            out.push(Tok::Sep);
            i += 2;
        } else {
            out.push(Tok::Punct(ch));
            i += 1;
        }
    }
    out
}

fn ident(t: Option<&Tok>) -> Option<&str> {
    match t {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

fn punct(t: Option<&Tok>, p: char) -> bool {
    t == Some(&Tok::Punct(p))
}

fn parse(toks: &[Tok], file_module: &ModPath) -> Parsed {
    let mut out = Parsed::default();
    // inline modules open here: (their path, the brace depth outside them)
    let mut stack: Vec<(ModPath, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    while i < toks.len() {
        let scope = stack.last().map_or_else(|| file_module.clone(), |(m, _)| m.clone());
        match &toks[i] {
            Tok::Punct('#') => {
                let (end, cfg_test) = attribute(toks, i);
                i = if cfg_test { skip_item(toks, end) } else { end };
            }
            Tok::Ident(w) if w == "use" => {
                let mut leaves = Vec::new();
                i += 1;
                // `use` trees until `;` (a use list may hold several? no: one tree)
                i = use_tree(toks, i, Vec::new(), &mut leaves);
                while i < toks.len() && !punct(toks.get(i), ';') {
                    i += 1;
                }
                for (path, binding) in leaves {
                    if let Some(name) = binding {
                        out.aliases.push(((scope.clone(), name), path.clone()));
                    }
                    out.refs.push((scope.clone(), path));
                }
            }
            Tok::Ident(w) if w == "mod" => match (ident(toks.get(i + 1)), toks.get(i + 2)) {
                (Some(name), Some(Tok::Punct(p @ (';' | '{')))) => {
                    let module = [scope.as_slice(), &[name.to_string()][..]].concat();
                    out.modules.push(module.clone());
                    if *p == '{' {
                        stack.push((module, depth));
                        depth += 1;
                    }
                    i += 3;
                }
                _ => i += 1,
            },
            Tok::Punct('{') => {
                depth += 1;
                i += 1;
            }
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if stack.last().is_some_and(|(_, d)| *d == depth) {
                    stack.pop();
                }
                i += 1;
            }
            Tok::Ident(first) if toks.get(i + 1) == Some(&Tok::Sep) => {
                let mut path = vec![first.clone()];
                i += 1;
                while toks.get(i) == Some(&Tok::Sep) {
                    match ident(toks.get(i + 1)) {
                        Some(s) => {
                            path.push(s.to_string());
                            i += 2;
                        }
                        None => break, // `Vec::<T>`, `a::{..}` in a macro
                    }
                }
                out.refs.push((scope, path));
            }
            _ => i += 1,
        }
    }
    out
}

/// The attribute starting at `toks[i]` (`#`): the index after it, and
/// whether it is `#[cfg(test)]`.
fn attribute(toks: &[Tok], mut i: usize) -> (usize, bool) {
    i += 1;
    if punct(toks.get(i), '!') {
        i += 1;
    }
    if !punct(toks.get(i), '[') {
        return (i, false);
    }
    let start = i + 1;
    let mut depth = 0;
    while i < toks.len() {
        match toks[i] {
            Tok::Punct('[') => depth += 1,
            Tok::Punct(']') => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            _ => {}
        }
        i += 1;
    }
    let inner = &toks[start..i.min(toks.len())];
    let cfg_test = [
        Tok::Ident("cfg".into()),
        Tok::Punct('('),
        Tok::Ident("test".into()),
        Tok::Punct(')'),
    ];
    (i + 1, inner == cfg_test)
}

/// Skips the item (or field, statement, match arm) starting at `toks[i]`:
/// up to its `;`, or its `{ .. }` block, or a `,` when it is not an item
/// (a field), or just before the `}` that closes what holds it.
fn skip_item(toks: &[Tok], mut i: usize) -> usize {
    const ITEMS: &[&str] = &[
        "fn",
        "struct",
        "enum",
        "impl",
        "mod",
        "use",
        "trait",
        "const",
        "static",
        "type",
        "union",
        "macro_rules",
    ];
    let is_item = toks[i..]
        .iter()
        .take(8)
        .any(|t| matches!(t, Tok::Ident(w) if ITEMS.contains(&w.as_str())));
    let mut depth = 0usize;
    while i < toks.len() {
        match toks[i] {
            Tok::Punct('#') if depth == 0 => {
                i = attribute(toks, i).0;
                continue;
            }
            Tok::Punct('(' | '[') => depth += 1,
            Tok::Punct(')' | ']') => depth = depth.saturating_sub(1),
            Tok::Punct(';') if depth == 0 => return i + 1,
            Tok::Punct(',') if depth == 0 && !is_item => return i + 1,
            Tok::Punct('}') if depth == 0 => return i,
            Tok::Punct('{') if depth == 0 => {
                let mut braces = 0;
                while i < toks.len() {
                    match toks[i] {
                        Tok::Punct('{') => braces += 1,
                        Tok::Punct('}') => {
                            braces -= 1;
                            if braces == 0 {
                                return i + 1;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// One `use` tree at `toks[i]` under `prefix`: pushes each leaf's path and the
/// name it binds (None for `_` and globs; a glob's path is its prefix).
/// Returns the index after the tree.
fn use_tree(toks: &[Tok], mut i: usize, prefix: ModPath, out: &mut Vec<(ModPath, Option<String>)>) -> usize {
    let mut path = prefix;
    if toks.get(i) == Some(&Tok::Sep) {
        // `::name`: an extern crate, never this one
        path.push("::".into());
        i += 1;
    }
    loop {
        match toks.get(i) {
            Some(Tok::Ident(s)) => {
                path.push(s.clone());
                i += 1;
                if toks.get(i) == Some(&Tok::Sep) {
                    i += 1;
                    continue;
                }
                if path.last().is_some_and(|s| s == "self") {
                    path.pop();
                }
                let mut binding = path.last().cloned();
                if ident(toks.get(i)) == Some("as") {
                    binding = ident(toks.get(i + 1)).filter(|n| *n != "_").map(String::from);
                    i += 2;
                }
                out.push((path, binding));
                return i;
            }
            Some(Tok::Punct('*')) => {
                out.push((path, None));
                return i + 1;
            }
            Some(Tok::Punct('{')) => {
                i += 1;
                while i < toks.len() && !punct(toks.get(i), '}') {
                    i = use_tree(toks, i, path.clone(), out);
                    if punct(toks.get(i), ',') {
                        i += 1;
                    }
                }
                return i + 1;
            }
            _ => return i + 1,
        }
    }
}

// --- strongly connected components (Tarjan) ------------------------------------

/// The strongly connected components of more than one node, each sorted,
/// in the order of their smallest node.
fn strongly_connected(graph: &Graph) -> Vec<BTreeSet<String>> {
    struct State<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<BTreeSet<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = BTreeSet::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on_stack.remove(w);
                component.insert(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found.sort();
    s.found
}

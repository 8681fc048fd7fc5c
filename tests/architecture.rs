//! The runtime's rooms stay in one direction (ARCHITECTURE.md): no two
//! rooms of `src/` use each other, directly or round a longer loop, and no
//! two modules inside one room do either. Read from the source text: every
//! `crate::a::b` and `super::x` path outside `#[cfg(test)]` code is an edge.
//! A new cycle fails here, with the loop it makes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`auth::jwt`) -> the file that holds it.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path
                .strip_prefix(src)
                .expect("under src/")
                .with_extension("");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            // The crate root re-exports everything; a `tests.rs` is test code.
            if parts == ["lib"] || parts.last().is_some_and(|p| p == "tests") {
                continue;
            }
            found.insert(parts.join("::"), path);
        }
    }
    found
}

/// The text of a file without comments and without its test module.
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests"))
        {
            break;
        }
        let line = line.split("//").next().unwrap_or("");
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Every path that starts at `crate` or `super`, as its segments, with
/// `a::{b, c::d}` groups expanded (one level deep, as rustfmt writes them).
fn paths(code: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for root in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(root) {
            let start = from + at;
            from = start + root.len();
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                continue;
            }
            let mut prefix = Vec::new();
            let mut i = from;
            loop {
                let word_end = code[i..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map_or(code.len(), |n| i + n);
                if word_end > i {
                    prefix.push(code[i..word_end].to_owned());
                }
                if code[word_end..].starts_with("::{") {
                    let close = code[word_end..]
                        .find('}')
                        .map_or(code.len(), |n| word_end + n);
                    for item in code[word_end + 3..close].split(',') {
                        let mut full = prefix.clone();
                        full.extend(
                            item.split("::")
                                .map(|s| s.trim().trim_start_matches('{').to_owned())
                                .filter(|s| !s.is_empty() && s != "self"),
                        );
                        out.push((root.trim_end_matches(':').to_owned(), full));
                    }
                    break;
                }
                if code[word_end..].starts_with("::") && word_end > i {
                    i = word_end + 2;
                    continue;
                }
                out.push((root.trim_end_matches(':').to_owned(), prefix));
                break;
            }
        }
    }
    out
}

/// The module a path names: its longest prefix that is a module.
fn resolve(modules: &BTreeMap<String, PathBuf>, segments: &[String]) -> Option<String> {
    (1..=segments.len())
        .rev()
        .map(|n| segments[..n].join("::"))
        .find(|m| modules.contains_key(m))
}

/// Module -> the modules its code uses.
fn edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules(src);
    let mut graph = BTreeMap::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).expect("a readable source file");
        let own: Vec<String> = module.split("::").map(str::to_owned).collect();
        let is_mod_rs = file.file_name().is_some_and(|f| f == "mod.rs");
        // `super` of `a/b.rs` is `a`; of `a/mod.rs` it is the crate root.
        let parent: Vec<String> = if is_mod_rs {
            own[..own.len().saturating_sub(1)].to_vec()
        } else {
            own[..own.len() - 1].to_vec()
        };
        let mut uses = BTreeSet::new();
        for (root, segments) in paths(&code(&text)) {
            let full: Vec<String> = if root == "crate" {
                segments
            } else {
                parent.iter().cloned().chain(segments).collect()
            };
            if let Some(target) = resolve(&modules, &full)
                && &target != module
            {
                uses.insert(target);
            }
        }
        graph.insert(module.clone(), uses);
    }
    graph
}

/// A loop in `graph`, if there is one, as the modules round it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_owned(), Mark::Open);
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next).copied().unwrap_or(Mark::Done) {
                Mark::Open => {
                    let from = stack.iter().position(|n| n == next).unwrap_or(0);
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(next, graph, marks, stack) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks: BTreeMap<String, Mark> = graph.keys().map(|k| (k.clone(), Mark::New)).collect();
    for node in graph.keys() {
        if marks[node] == Mark::New
            && let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new())
        {
            return Some(cycle);
        }
    }
    None
}

/// The rooms: top-level modules, each with what is inside it.
fn rooms(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let room = |m: &str| m.split("::").next().unwrap_or(m).to_owned();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in graph {
        let entry = out.entry(room(from)).or_default();
        entry.extend(tos.iter().map(|t| room(t)).filter(|t| *t != room(from)));
    }
    out
}

/// Within each room, its modules one level down (a parent's own use of its
/// children, and the children's of their parent, are how a room is built).
fn inside(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeMap<String, BTreeSet<String>>> {
    let mut by_parent: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (from, tos) in graph {
        let Some((parent, _)) = from.rsplit_once("::") else {
            continue;
        };
        let siblings = tos
            .iter()
            .filter(|t| t.rsplit_once("::").is_some_and(|(p, _)| p == parent))
            .cloned()
            .collect();
        by_parent
            .entry(parent.to_owned())
            .or_default()
            .insert(from.clone(), siblings);
    }
    by_parent.into_values().collect()
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_two_rooms_use_each_other() {
    let graph = edges(&src());
    assert!(
        graph.len() > 20,
        "the runtime's modules were found: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&rooms(&graph)) {
        panic!(
            "an import cycle between rooms: {}\n(a room may use rooms below it, never one above: \
             move what both need into the lower one, see ARCHITECTURE.md)",
            cycle.join(" -> ")
        );
    }
    for room in inside(&graph) {
        if let Some(cycle) = find_cycle(&room) {
            panic!("an import cycle inside a room: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn every_room_is_in_the_architecture_page() {
    let page =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md"))
            .expect("ARCHITECTURE.md");
    // The first cell of each table row names one room or several.
    let named: Vec<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("| "))
        .filter_map(|l| l.split(" |").next())
        .collect();
    for room in rooms(&edges(&src())).keys() {
        assert!(
            named.iter().any(|cell| cell.contains(&format!("`{room}`"))),
            "ARCHITECTURE.md's table of rooms does not name `{room}`"
        );
    }
}

#[test]
fn the_checker_finds_a_cycle_it_is_shown() {
    let dir = std::env::temp_dir().join(format!("bff-arch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("b")).unwrap();
    std::fs::write(dir.join("lib.rs"), "mod a;\nmod b;\n").unwrap();
    std::fs::write(dir.join("a.rs"), "use crate::b::{x::Thing, Other};\n").unwrap();
    std::fs::write(dir.join("b/mod.rs"), "mod x;\nmod y;\n").unwrap();
    std::fs::write(
        dir.join("b/x.rs"),
        "use super::y::Y; // crate::a in a comment\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("b/y.rs"),
        "pub struct Y;\n#[cfg(test)]\nmod tests { use crate::a::Z; }\n",
    )
    .unwrap();
    let graph = edges(&dir);
    assert_eq!(
        graph["a"],
        BTreeSet::from(["b".to_owned(), "b::x".to_owned()])
    );
    assert_eq!(graph["b::x"], BTreeSet::from(["b::y".to_owned()]));
    assert!(
        graph["b::y"].is_empty(),
        "test code and comments are not uses"
    );
    assert_eq!(find_cycle(&rooms(&graph)), None);
    assert_eq!(inside(&graph).iter().find_map(find_cycle), None);

    std::fs::write(dir.join("b/y.rs"), "pub struct Y(crate::a::Z);\n").unwrap();
    let graph = edges(&dir);
    let cycle = find_cycle(&rooms(&graph)).expect("a -> b -> a");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 3);

    std::fs::write(dir.join("b/y.rs"), "pub struct Y(super::x::X);\n").unwrap();
    let graph = edges(&dir);
    assert!(
        inside(&graph).iter().find_map(find_cycle).is_some(),
        "x -> y -> x"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

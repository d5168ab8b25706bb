//! The modules of the datapath and of the agent import each other without
//! circles: each imports only what lies below it, so that they can be read
//! (and changed) in order. For lb-ebpf that order is the pipeline's: the
//! per-packet state and the maps at the bottom, parse, the lookups and the
//! translations above them, the pipeline on top.
//!
//! A module is a file or folder directly under `src/`; its imports are the
//! first segments of its `use crate::...` paths and of `crate::...`
//! expressions, outside `#[cfg(test)]` code.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The first path segments named by the body of a `use crate::` (what follows
/// `crate::`, up to the `;`).
fn used_modules(body: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let body = body.trim_start();
    if !body.starts_with('{') {
        return BTreeSet::from([ident(body)]);
    }
    let mut out = BTreeSet::new();
    let (mut depth, mut want) = (0, false);
    let chars: Vec<char> = body.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '{' => {
                depth += 1;
                want = depth == 1;
            }
            '}' => depth -= 1,
            ',' if depth == 1 => want = true,
            c if want && (c.is_ascii_alphabetic() || c == '_') => {
                let name = ident(&body[body.char_indices().nth(i).map_or(0, |(b, _)| b)..]);
                i += name.len();
                out.insert(name);
                want = false;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The module graph of a crate's `src/` (main.rs and lib.rs, the roots, left
/// out).
fn graph(src: &Path) -> Graph {
    let mut g = Graph::new();
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if matches!(module.as_str(), "main" | "lib" | "bin") {
            continue;
        }
        let text = fs::read_to_string(&f).unwrap();
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or_default()
            .lines()
            .map(|l| l.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        let deps = g.entry(module.clone()).or_default();
        let mut rest = code.as_str();
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let is_use = rest[..at].trim_end().ends_with("use");
            let names = if is_use {
                used_modules(&after[..after.find(';').unwrap_or(after.len())])
            } else {
                used_modules(after)
            };
            deps.extend(names.into_iter().filter(|n| *n != module && n != "self"));
            rest = after;
        }
    }
    g
}

/// The import circles of `g`, each as the modules along it.
fn circles(g: &Graph) -> Vec<Vec<String>> {
    fn visit(
        g: &Graph,
        m: &str,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
        out: &mut Vec<Vec<String>>,
    ) {
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for d in g
            .get(m)
            .into_iter()
            .flatten()
            .filter(|d| g.contains_key(*d))
        {
            match state.get(d) {
                Some(1) => {
                    let from = stack.iter().position(|s| s == d).unwrap();
                    let mut c = stack[from..].to_vec();
                    c.push(d.clone());
                    out.push(c);
                }
                Some(_) => {}
                None => visit(g, d, state, stack, out),
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
    }
    let (mut state, mut out) = (BTreeMap::new(), Vec::new());
    for m in g.keys() {
        if !state.contains_key(m) {
            visit(g, m, &mut state, &mut Vec::new(), &mut out);
        }
    }
    out
}

fn assert_no_circles(krate: &str, must_see: &[(&str, &str)]) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(krate)
        .join("src");
    let g = graph(&src);
    // The reading works: imports known to exist are found.
    for (from, to) in must_see {
        assert!(
            g.get(*from).is_some_and(|d| d.contains(*to)),
            "{krate}: {from} should import {to}: {g:?}"
        );
    }
    let c = circles(&g);
    assert!(c.is_empty(), "{krate} has import circles: {c:?}\n{g:?}");
}

#[test]
fn the_datapath_modules_stand_in_pipeline_order() {
    assert_no_circles(
        "lb-ebpf",
        &[
            ("datapath", "parse"),
            ("maps", "scratch"),
            ("packet", "maps"),
            ("conntrack", "scratch"),
        ],
    );
}

#[test]
fn the_agent_modules_import_without_circles() {
    assert_no_circles(
        "lb-agent",
        &[
            ("agent", "sync"),
            ("model", "cluster"),
            ("source", "model"),
            ("sync", "reconcile"),
            ("reconcile", "bpf"),
        ],
    );
}

#[test]
fn a_circle_is_found() {
    let g: Graph = [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]
        .into_iter()
        .map(|(m, d)| (m.to_string(), BTreeSet::from([d.to_string()])))
        .collect();
    assert_eq!(circles(&g), vec![vec!["a", "b", "c", "a"]]);
    assert_eq!(
        used_modules("{ maps::{A, B}, parse::{self, X}, scratch::Scratch }"),
        BTreeSet::from(["maps".into(), "parse".into(), "scratch".into()])
    );
}

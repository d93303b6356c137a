//! The layers of `src/` (see `src/lib.rs`): no module reaches a folder it may not import, so the
//! planner stays a pure function that never reaches anything that talks to the API server.
//! Reads the sources; no build of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Folder → the folders of this crate it may import (besides itself).
const ALLOWED: &[(&str, &[&str])] = &[
    ("api", &[]),
    ("facts", &["api", "istio", "gateway"]),
    ("istio", &["api"]),
    ("gateway", &["api"]),
    ("planner", &["api", "facts", "istio", "gateway"]),
    ("cache", &["api", "facts", "istio", "gateway"]),
    ("runtime", &["api"]),
    (
        "controller",
        &[
            "api", "facts", "istio", "gateway", "planner", "cache", "runtime",
        ],
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir)
        .expect("read src")
        .filter_map(Result::ok)
    {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level folders of this crate that a source names as `crate::<folder>`.
fn imports(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.push(name);
        }
        // `use crate::{a, b}`: each item of the group.
        if after.starts_with('{')
            && let Some(end) = after.find('}')
        {
            for item in after[1..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        }
        rest = after;
    }
    out
}

#[test]
fn no_folder_of_src_imports_one_above_it() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for (folder, may) in &allowed {
        let mut files = Vec::new();
        rust_files(&src.join(folder), &mut files);
        assert!(!files.is_empty(), "src/{folder} has no sources");
        for f in files {
            let text = std::fs::read_to_string(&f).expect("read source");
            for name in imports(&text) {
                // `crate::facts_of!` is a macro exported at the crate root; `crate::Error` too.
                if name == *folder || !allowed.contains_key(name.as_str()) {
                    continue;
                }
                checked += 1;
                if !may.contains(&name.as_str()) {
                    wrong.push(format!(
                        "{} imports crate::{name}",
                        f.strip_prefix(&src).unwrap_or(&f).display()
                    ));
                }
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} imports found: is the scan broken?"
    );
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "imports across the layers of src/lib.rs:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_folder_of_src_is_in_the_table() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let listed: Vec<&str> = ALLOWED.iter().map(|(f, _)| *f).collect();
    for e in std::fs::read_dir(&src)
        .expect("read src")
        .filter_map(Result::ok)
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_dir() && name != "bin" {
            assert!(
                listed.contains(&name.as_str()),
                "src/{name} has no line in the layer table"
            );
        }
    }
}

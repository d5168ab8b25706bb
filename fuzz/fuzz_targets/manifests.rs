//! The manifest reader: arbitrary bytes as the files of a manifest directory
//! (YAML with several documents, JSON, Lists, Services, EndpointSlices,
//! Nodes), read by `load_dir` as the agent reads `--manifests`.
//!
//! It must never panic, and:
//! - reading the same directory twice gives the same result (files are parsed
//!   on several threads);
//! - every problem names a file of the directory and a line inside it
//!   (`path:line`), or the file alone when it cannot be read at all;
//! - the Services it loaded, written back as JSON and read again, load again
//!   as they were, without problems.
#![no_main]

use std::{
    fs,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use lb_agent::source::manifests::load_dir;
use libfuzzer_sys::fuzz_target;

/// Names the files get, in turn: YAML and JSON, and one the reader skips.
const NAMES: [&str; 4] = ["a.yaml", "b.json", "c.yml", "d.txt"];
/// Between two files in the input.
const SEPARATOR: &[u8] = b"\n%%file%%\n";

/// A directory of this process's own (in memory where there is /dev/shm),
/// removed at exit.
fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("lb-fuzz-manifests-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("creating the manifest directory");
        extern "C" fn remove() {
            if let Some(d) = DIR.get() {
                let _ = fs::remove_dir_all(d);
            }
        }
        // SAFETY: registers a plain function run at exit.
        unsafe { libc::atexit(remove) };
        dir
    })
}

fn clear(dir: &Path) {
    for e in fs::read_dir(dir)
        .expect("reading the manifest directory")
        .flatten()
    {
        fs::remove_file(e.path()).expect("removing a manifest");
    }
}

fn split<'a>(mut data: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    while let Some(at) = data.windows(sep.len()).position(|w| w == sep) {
        parts.push(&data[..at]);
        data = &data[at + sep.len()..];
    }
    parts.push(data);
    parts
}

fuzz_target!(|data: &[u8]| {
    let dir = dir();
    clear(dir);
    let mut texts = Vec::new();
    for (i, part) in split(data, SEPARATOR)
        .into_iter()
        .take(NAMES.len())
        .enumerate()
    {
        let path = dir.join(NAMES[i]);
        fs::write(&path, part).expect("writing a manifest");
        texts.push((path, part));
    }

    let loaded = load_dir(dir);
    assert_eq!(load_dir(dir), loaded, "a second reading differs");

    for p in &loaded.problems {
        let location = p.location.as_deref().expect("a problem has a location");
        let (path, line) = match location.rsplit_once(':') {
            Some((path, line)) if line.parse::<usize>().is_ok() => {
                (path, Some(line.parse::<usize>().unwrap()))
            }
            _ => (location, None),
        };
        let Some((_, text)) = texts.iter().find(|(f, _)| f.to_str() == Some(path)) else {
            panic!("problem {p:?} names no file of the directory");
        };
        assert!(path.ends_with(".yaml") || path.ends_with(".json") || path.ends_with(".yml"));
        match line {
            Some(line) => {
                // YAML counts a lone CR as a line break too (and so do
                // the problems' lines; editors do not: left as it is).
                let breaks = text
                    .iter()
                    .enumerate()
                    .filter(|(i, b)| {
                        **b == b'\n' || (**b == b'\r' && text.get(i + 1) != Some(&b'\n'))
                    })
                    .count();
                let lines = breaks + 1;
                assert!(
                    (1..=lines + 1).contains(&line),
                    "problem {p:?}: line {line} outside the file's {lines} lines"
                );
            }
            // Only a file that is no text has no line.
            None => assert!(
                std::str::from_utf8(text).is_err(),
                "problem {p:?} has no line"
            ),
        }
    }

    // What was loaded loads again as it was.
    if !loaded.services.is_empty() {
        clear(dir);
        let list = serde_json::json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": loaded.services,
        });
        fs::write(dir.join("again.json"), serde_json::to_vec(&list).unwrap()).unwrap();
        let again = load_dir(dir);
        assert!(
            again.problems.is_empty(),
            "reading back: {:?}",
            again.problems
        );
        assert_eq!(
            again.services, loaded.services,
            "the Services read back differ"
        );
    }
});

//! Manifest mode: cluster state from a directory of Kubernetes manifests.
//!
//! Every regular file in the directory whose name ends in `.yaml`, `.yml` or
//! `.json` is read, in name order (subdirectories, hidden files and editor
//! leftovers such as `.foo.swp`, `foo~` and `#foo#` are ignored). A YAML file may
//! hold several documents separated by `---`; a document (or a JSON file) is one
//! object or a `kind: List` (or `ServiceList`, `EndpointSliceList`) with `items`.
//! The objects are v1 Services, discovery.k8s.io/v1 EndpointSlices and v1 Nodes
//! exactly as the API serves them: Services must carry their `clusterIP` (there
//! is no allocator here) and NodePort / LoadBalancer Services their
//! `nodePort`s. Of the Nodes, lb reads what it reads from the API server's
//! except the addresses (which `--node-ip` or the uplinks give in this mode)
//! and eligibility (no load balancer health-checks a manifest directory): the
//! zone of the Node named like this node (`--node-name`), and every Node's
//! `spec.podCIDRs`, which make the cluster CIDRs unless `--cluster-cidr` gives
//! them.
//!
//! Whatever cannot be used is skipped and reported as a [`Problem`] located at
//! `path:line`; the rest of the file and the other files still load.
//!
//! [`watch`] sends the whole directory as one [`SourceEvent::Resync`] (after
//! `NodeZone` and `ClusterCidrs` from the Nodes) at start and again after every
//! change that alters what was loaded.

use std::{
    collections::HashMap,
    fs,
    hash::{DefaultHasher, Hasher},
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    core::v1::{Node, Service, ServicePort},
    discovery::v1::EndpointSlice,
};
use notify::{
    EventKind, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode},
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};

use crate::{
    cluster::{ObjectKey, Problem, ProblemKind},
    model::{Prefix, SERVICE_NAME_LABEL, Slice},
    source::{SourceEvent, node},
};

/// After a change, wait until the directory has been quiet this long...
const QUIET: Duration = Duration::from_millis(100);
/// ...but no longer than this after the first change of a burst.
const MAX_DEBOUNCE: Duration = Duration::from_millis(400);
/// While the directory is missing, look for it again this often.
const MISSING_DIR_RETRY: Duration = Duration::from_secs(1);

/// What one reading of a manifest directory found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Loaded {
    pub services: Vec<Service>,
    /// In the model's compact form, converted as each is decoded.
    pub slices: Vec<Slice>,
    pub nodes: Vec<NodeManifest>,
    /// Everything that was skipped, with its `path:line`.
    pub problems: Vec<Problem>,
}

/// What lb reads of a Node manifest (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeManifest {
    pub name: String,
    pub zone: Option<String>,
    pub pod_cidrs: Vec<Prefix>,
}

impl Loaded {
    /// A 128-bit digest of everything read (objects and problems): equal digests
    /// mean nothing changed, without keeping a second copy to compare against.
    pub fn digest(&self) -> u128 {
        /// Feeds serialized bytes into two differently seeded hashers.
        struct Sink(DefaultHasher, DefaultHasher);
        impl io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.write(b);
                self.1.write(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut sink = Sink(DefaultHasher::new(), DefaultHasher::new());
        sink.1.write_u64(0x9e37_79b9_7f4a_7c15);
        // Serializing to a hasher cannot fail (no I/O, string-keyed maps only).
        let _ = serde_json::to_writer(&mut sink, &self.services);
        let _ = serde_json::to_writer(&mut sink, &self.slices);
        let _ = serde_json::to_writer(&mut sink, &self.nodes);
        for p in &self.problems {
            let _ = write!(sink, "{p:?}");
        }
        (u128::from(sink.0.finish()) << 64) | u128::from(sink.1.finish())
    }

    /// What the source sends for this reading: the zone of the Node named
    /// `node_name` (none without its manifest), the Nodes' pod CIDRs, and then
    /// the `Resync`. The node's facts come first so that the sync the `Resync`
    /// makes due already has them: a restarted agent whose first sync ran
    /// before its zone arrived would widen every topology-narrowed Service for
    /// a moment.
    pub fn into_events(self, node_name: &str) -> Vec<SourceEvent> {
        let zone = self
            .nodes
            .iter()
            .find(|n| n.name == node_name)
            .and_then(|n| n.zone.clone());
        let mut cidrs: Vec<Prefix> = self
            .nodes
            .iter()
            .flat_map(|n| n.pod_cidrs.iter().copied())
            .collect();
        cidrs.sort();
        cidrs.dedup();
        vec![
            SourceEvent::NodeZone(zone),
            SourceEvent::ClusterCidrs(cidrs),
            SourceEvent::Resync {
                services: self.services,
                slices: self.slices,
                problems: self.problems,
            },
        ]
    }
}

/// Reads every manifest file of `dir` (see the module documentation). Never
/// fails: a directory that cannot be read gives a single problem.
pub fn load_dir(dir: &Path) -> Loaded {
    let mut loader = Loader::default();
    match manifest_files(dir) {
        Ok(files) => for_each_parsed(&files, |file| loader.load_parsed(file)),
        Err(e) => loader.problems.push(Problem {
            kind: ProblemKind::Parse,
            object: None,
            location: Some(dir.display().to_string()),
            message: format!("cannot read manifest directory {}: {e}", dir.display()),
        }),
    }
    Loaded {
        services: loader.services,
        slices: loader.slices,
        nodes: loader.nodes,
        problems: loader.problems,
    }
}

/// Whether a file name is one [`load_dir`] reads: `.yaml`, `.yml` or `.json`,
/// and not hidden or an editor's backup or lock file.
pub fn is_manifest_name(name: &str) -> bool {
    if name.starts_with('.') || name.starts_with('#') || name.ends_with('~') {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    [".yaml", ".yml", ".json"]
        .iter()
        .any(|ext| lower.len() > ext.len() && lower.ends_with(ext))
}

/// The manifest files of `dir`, sorted by name (symbolic links are followed).
fn manifest_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            log::debug!("ignoring {:?} in {}: not UTF-8", name, dir.display());
            continue;
        };
        if !is_manifest_name(name) {
            continue;
        }
        let path = entry.path();
        // A file removed since the listing is simply not there this time.
        if fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// One YAML document of a file: its text, the file line that text starts on
/// (parser positions are relative to it), and its first meaningful line.
///
/// (Positions are offset rather than kept by padding each document with the
/// empty lines before it: padding makes parsing a file quadratic in its length.)
struct Chunk<'a> {
    text: &'a str,
    first_line: usize,
    /// 1-based line of the document's first meaningful line.
    line: usize,
}

/// Splits a YAML stream at its `---` (document start) and `...` (document end)
/// marker lines.
///
/// serde_yaml_ng's multi-document iterator gives neither the line where each
/// document starts nor anything after the first syntax error (it yields that
/// error forever), so the stream is split here and each document parsed alone.
/// A marker is only recognised at the start of a line, where YAML only allows it
/// as a marker (even inside a block scalar).
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start = 0; // byte offset of the current document
    let mut start_line = 1; // its first line
    let mut offset = 0;
    let mut push = |from: usize, to: usize, first_line: usize| {
        let body = &text[from..to];
        let line = body
            .lines()
            .position(|l| {
                let t = l.trim();
                !t.is_empty() && !t.starts_with('#') && t != "---"
            })
            .map_or(first_line, |i| first_line + i);
        chunks.push(Chunk {
            text: body,
            first_line,
            line,
        });
    };
    for (line_no, l) in (1..).zip(text.split_inclusive('\n')) {
        let bare = l.trim_end_matches(['\n', '\r']);
        let is_marker = |m: &str| {
            bare.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        };
        if is_marker("---") {
            if offset > start {
                push(start, offset, start_line);
            }
            start = offset;
            start_line = line_no;
        } else if is_marker("...") {
            push(start, offset + l.len(), start_line);
            start = offset + l.len();
            start_line = line_no + 1;
        }
        offset += l.len();
    }
    if offset > start {
        push(start, offset, start_line);
    }
    chunks
}

/// A manifest file read and parsed into JSON values document by document: the
/// costly part of loading, which depends on nothing else and so runs on several
/// threads ([`for_each_parsed`]); what the values mean is then settled in file
/// order ([`Loader::load_parsed`]), where duplicates are decided.
struct ParsedFile {
    path: PathBuf,
    text: io::Result<String>,
    format: Format,
    docs: Vec<ParsedDoc>,
}

struct ParsedDoc {
    /// The document's bytes in the file's text (after a byte-order mark).
    range: std::ops::Range<usize>,
    first_line: usize,
    line: usize,
    /// The decoded document, or the parse error and its file line.
    doc: Result<Decoded, (String, usize)>,
}

/// A document (or an item of a List) decoded on the parsing thread. Decoding
/// there, not where the files are collected, means each JSON value is freed by
/// the thread that allocated it: glibc serializes frees of another thread's
/// memory, and at 10,000 Services decoding on the collecting thread made it the
/// bottleneck of the whole read (three times the decoding's own cost).
enum Decoded {
    /// An empty document (only comments, or nothing between two `---`).
    Empty,
    NotAnObject,
    MissingKind(Option<ObjectKey>),
    List {
        kind: String,
        /// `None`: `items` is not a list.
        items: Option<Vec<Decoded>>,
    },
    Service(Option<ObjectKey>, Result<Box<Service>, (String, usize)>),
    Slice(Option<ObjectKey>, Result<Box<Slice>, (String, usize)>),
    Node(Option<ObjectKey>, Result<Box<Node>, (String, usize)>),
    Unsupported {
        key: Option<ObjectKey>,
        api_version: String,
        kind: String,
    },
}

impl Decoded {
    /// One parsed document: empty (null), or an object.
    fn document(source: &Source<'_>, value: Value) -> Self {
        if value.is_null() {
            Self::Empty
        } else {
            Self::of(source, value)
        }
    }

    /// One object: a document, or an item of a List (`source.text` is `None`
    /// then).
    fn of(source: &Source<'_>, value: Value) -> Self {
        let Some(map) = value.as_object() else {
            return Self::NotAnObject;
        };
        let key = key_of(&value);
        let kind = map.get("kind").and_then(Value::as_str).unwrap_or_default();
        let api_version = map
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if kind.is_empty() || api_version.is_empty() {
            return Self::MissingKind(key);
        }
        if kind.ends_with("List") && map.contains_key("items") {
            let (kind, api_version) = (kind.to_string(), api_version.to_string());
            return Self::list(source, value, &kind, &api_version);
        }
        match (api_version, kind) {
            ("v1", "Service") => Self::Service(key, source.decode(value).map(Box::new)),
            ("discovery.k8s.io/v1", "EndpointSlice") => Self::Slice(
                key,
                source
                    .decode::<EndpointSlice>(value)
                    .map(|s| Box::new(Slice::from(&s))),
            ),
            ("v1", "Node") => Self::Node(key, source.decode(value).map(Box::new)),
            _ => Self::Unsupported {
                key,
                api_version: api_version.to_string(),
                kind: kind.to_string(),
            },
        }
    }

    /// `kind: List` (as `kubectl get -o yaml` writes it) or a typed list such as
    /// `ServiceList` (as the API serves it, whose items carry no kind).
    fn list(source: &Source<'_>, mut value: Value, kind: &str, api_version: &str) -> Self {
        let items = match value["items"].take() {
            Value::Array(items) => items,
            Value::Null => Vec::new(),
            _ => {
                return Self::List {
                    kind: kind.to_string(),
                    items: None,
                };
            }
        };
        let item_kind = kind.strip_suffix("List").unwrap_or_default();
        let item_source = Source {
            text: None,
            ..*source
        };
        let items = items
            .into_iter()
            .map(|mut item| {
                if let Value::Object(map) = &mut item
                    && !item_kind.is_empty()
                {
                    map.entry("kind").or_insert_with(|| Value::from(item_kind));
                    map.entry("apiVersion")
                        .or_insert_with(|| Value::from(api_version));
                }
                Self::of(&item_source, item)
            })
            .collect();
        Self::List {
            kind: kind.to_string(),
            items: Some(items),
        }
    }
}

fn parse_file(path: &Path) -> ParsedFile {
    let is_json = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let format = if is_json { Format::Json } else { Format::Yaml };
    let text = fs::read_to_string(path);
    let mut docs = Vec::new();
    if let Ok(full) = &text {
        let text = full.strip_prefix('\u{feff}').unwrap_or(full);
        if is_json {
            if !text.trim().is_empty() {
                let line = text
                    .lines()
                    .position(|l| !l.trim().is_empty())
                    .map_or(1, |i| i + 1);
                let value = serde_json::from_str::<Value>(text)
                    .map_err(|e| (format!("invalid JSON: {e}"), e.line().max(1)));
                let source = Source {
                    path,
                    format,
                    text: Some(text),
                    first_line: 1,
                    line,
                };
                docs.push(ParsedDoc {
                    range: 0..text.len(),
                    first_line: 1,
                    line,
                    doc: value.map(|v| Decoded::document(&source, v)),
                });
            }
        } else {
            for chunk in split_documents(text) {
                // Straight into a JSON value (one pass): what the API would serve,
                // and what kind detection and typed decoding read. YAML that has
                // no JSON form (non-string keys, say) is no Kubernetes object.
                let value = serde_yaml_ng::from_str::<Value>(chunk.text).map_err(|e| {
                    let line = e
                        .location()
                        .map_or(chunk.line, |l| l.line() + chunk.first_line - 1);
                    (format!("invalid YAML: {e}"), line)
                });
                let start = chunk.text.as_ptr() as usize - text.as_ptr() as usize;
                let source = Source {
                    path,
                    format,
                    text: Some(chunk.text),
                    first_line: chunk.first_line,
                    line: chunk.line,
                };
                docs.push(ParsedDoc {
                    range: start..start + chunk.text.len(),
                    first_line: chunk.first_line,
                    line: chunk.line,
                    doc: value.map(|v| Decoded::document(&source, v)),
                });
            }
        }
    }
    ParsedFile {
        path: path.to_path_buf(),
        text,
        format,
        docs,
    }
}

/// Parses `files` on up to four threads and hands the results to `take` in the
/// order of `files`. Each thread works ahead by at most one file, so memory
/// stays at a few files' worth of parsed values.
fn for_each_parsed(files: &[PathBuf], mut take: impl FnMut(ParsedFile)) {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(files.len());
    if workers <= 1 {
        for path in files {
            take(parse_file(path));
        }
        return;
    }
    std::thread::scope(|scope| {
        let results: Vec<_> = (0..workers)
            .map(|w| {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                scope.spawn(move || {
                    for path in files.iter().skip(w).step_by(workers) {
                        if tx.send(parse_file(path)).is_err() {
                            return;
                        }
                    }
                });
                rx
            })
            .collect();
        // File i was parsed by worker i % workers, which parses its files in order.
        for i in 0..files.len() {
            match results[i % workers].recv() {
                Ok(file) => take(file),
                // The worker panicked; the scope re-raises the panic.
                Err(_) => break,
            }
        }
    });
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Yaml,
    Json,
}

/// Where a document came from.
struct Source<'a> {
    path: &'a Path,
    format: Format,
    /// The document's text, when the object is the whole document; `None` for
    /// the items of a List.
    text: Option<&'a str>,
    /// The file line `text` starts on (parser positions are relative to it).
    first_line: usize,
    /// The document's first line.
    line: usize,
}

impl Source<'_> {
    fn location(&self, line: usize) -> String {
        format!("{}:{}", self.path.display(), line)
    }

    /// Decodes a typed object from the already parsed value. On error the text is
    /// parsed again, typed, to name the line of the offending field (the common
    /// path parses each document once).
    fn decode<T: DeserializeOwned>(&self, value: Value) -> Result<T, (String, usize)> {
        serde_json::from_value(value).map_err(|e| {
            let offset = self.first_line - 1;
            match (self.text, self.format) {
                (Some(text), Format::Yaml) => match serde_yaml_ng::from_str::<T>(text) {
                    Err(e) => {
                        let line = e.location().map_or(self.line, |l| l.line() + offset);
                        (e.to_string(), line)
                    }
                    Ok(_) => (e.to_string(), self.line),
                },
                (Some(text), Format::Json) => match serde_json::from_str::<T>(text) {
                    Err(e) => (e.to_string(), e.line().max(1) + offset),
                    Ok(_) => (e.to_string(), self.line),
                },
                (None, _) => (e.to_string(), self.line),
            }
        })
    }
}

#[derive(Default)]
struct Loader {
    services: Vec<Service>,
    slices: Vec<Slice>,
    nodes: Vec<NodeManifest>,
    problems: Vec<Problem>,
    /// Where each object (by kind and key) was first seen.
    seen: HashMap<(&'static str, ObjectKey), String>,
}

impl Loader {
    fn problem(
        &mut self,
        kind: ProblemKind,
        object: Option<ObjectKey>,
        location: String,
        message: String,
    ) {
        self.problems.push(Problem {
            kind,
            object,
            location: Some(location),
            message,
        });
    }

    /// Takes in the documents of one parsed file, in order.
    fn load_parsed(&mut self, file: ParsedFile) {
        let ParsedFile {
            path,
            text,
            format,
            docs,
        } = file;
        let text = match &text {
            Ok(text) => text.strip_prefix('\u{feff}').unwrap_or(text),
            Err(e) => {
                let message = format!("cannot read {}: {e}", path.display());
                let location = path.display().to_string();
                self.problem(ProblemKind::Parse, None, location, message);
                return;
            }
        };
        for doc in docs {
            let source = Source {
                path: &path,
                format,
                text: Some(&text[doc.range]),
                first_line: doc.first_line,
                line: doc.line,
            };
            match doc.doc {
                Ok(decoded) => self.load_decoded(&source, decoded),
                Err((message, line)) => {
                    let location = source.location(line);
                    self.problem(ProblemKind::Parse, None, location, message);
                }
            }
        }
    }

    /// One decoded document, or one item of a List.
    fn load_decoded(&mut self, source: &Source<'_>, decoded: Decoded) {
        let location = source.location(source.line);
        match decoded {
            Decoded::Empty => {}
            Decoded::NotAnObject => {
                let message =
                    "not a Kubernetes object (expected a mapping with apiVersion and kind)"
                        .to_string();
                self.problem(ProblemKind::Parse, None, location, message);
            }
            Decoded::MissingKind(key) => {
                let message = "not a Kubernetes object: apiVersion or kind is missing".to_string();
                self.problem(ProblemKind::Parse, key, location, message);
            }
            Decoded::List { kind, items: None } => {
                let message = format!("{kind}: items is not a list");
                self.problem(ProblemKind::Parse, None, location, message);
            }
            Decoded::List {
                items: Some(items), ..
            } => {
                let item_source = Source {
                    text: None,
                    ..*source
                };
                for item in items {
                    self.load_decoded(&item_source, item);
                }
            }
            Decoded::Service(_, Ok(svc)) => self.add_service(source, *svc),
            Decoded::Service(key, Err((e, line))) => {
                let message = format!("Service does not decode: {e}");
                self.problem(ProblemKind::Parse, key, source.location(line), message);
            }
            Decoded::Slice(_, Ok(slice)) => self.add_slice(source, *slice),
            Decoded::Slice(key, Err((e, line))) => {
                let message = format!("EndpointSlice does not decode: {e}");
                self.problem(ProblemKind::Parse, key, source.location(line), message);
            }
            Decoded::Node(_, Ok(node)) => self.add_node(source, &node),
            Decoded::Node(key, Err((e, line))) => {
                let message = format!("Node does not decode: {e}");
                self.problem(ProblemKind::Parse, key, source.location(line), message);
            }
            Decoded::Unsupported {
                key,
                api_version,
                kind,
            } => {
                let message = format!(
                    "{api_version} {kind} is not read (only v1 Service, discovery.k8s.io/v1 EndpointSlice and v1 Node); skipped"
                );
                self.problem(ProblemKind::UnsupportedKind, key, location, message);
            }
        }
    }

    /// Records `key` as seen at `location`; false (with a problem) if it was seen
    /// before: the first file by name keeps it.
    fn claim(&mut self, what: &'static str, key: &ObjectKey, location: &str) -> bool {
        if let Some(first) = self.seen.get(&(what, key.clone())) {
            let message =
                format!("duplicate {what} {key} (first defined at {first}); this one is skipped");
            self.problem(
                ProblemKind::Parse,
                Some(key.clone()),
                location.to_string(),
                message,
            );
            return false;
        }
        self.seen.insert((what, key.clone()), location.to_string());
        true
    }

    fn add_service(&mut self, source: &Source<'_>, mut svc: Service) {
        let location = source.location(source.line);
        if svc.metadata.name.as_deref().unwrap_or_default().is_empty() {
            let message = "Service has no metadata.name".to_string();
            self.problem(ProblemKind::Parse, None, location, message);
            return;
        }
        svc.metadata
            .namespace
            .get_or_insert_with(|| "default".to_string());
        let key = ObjectKey::of(&svc.metadata);
        if !self.claim("Service", &key, &location) {
            return;
        }
        let problems = check_service(&svc, source.path);
        if problems.is_empty() {
            self.services.push(svc);
        } else {
            for (kind, message) in problems {
                self.problem(kind, Some(key.clone()), location.clone(), message);
            }
        }
    }

    fn add_slice(&mut self, source: &Source<'_>, slice: Slice) {
        let location = source.location(source.line);
        if slice.key.name.is_empty() {
            let message = "EndpointSlice has no metadata.name".to_string();
            self.problem(ProblemKind::Parse, None, location, message);
            return;
        }
        // (The key's namespace is already "default" when the slice has none.)
        let key = slice.key.clone();
        if !self.claim("EndpointSlice", &key, &location) {
            return;
        }
        if slice.service.as_ref().is_some_and(|s| !s.name.is_empty()) {
            self.slices.push(slice);
        } else {
            let message = format!(
                "EndpointSlice has no {SERVICE_NAME_LABEL} label, so it belongs to no Service; skipped"
            );
            self.problem(ProblemKind::Parse, Some(key), location, message);
        }
    }

    fn add_node(&mut self, source: &Source<'_>, n: &Node) {
        let location = source.location(source.line);
        let name = n.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            let message = "Node has no metadata.name".to_string();
            self.problem(ProblemKind::Parse, None, location, message);
            return;
        }
        // (Nodes have no namespace; the key's is only for the problem report.)
        let key = ObjectKey::new("", name.clone());
        if !self.claim("Node", &key, &location) {
            return;
        }
        let (pod_cidrs, bad) = node::pod_cidrs(n);
        for c in bad {
            let message = format!("pod CIDR {c:?} does not parse; left out of the cluster CIDRs");
            self.problem(
                ProblemKind::BadAddress,
                Some(key.clone()),
                location.clone(),
                message,
            );
        }
        self.nodes.push(NodeManifest {
            name,
            zone: node::node_zone(n),
            pod_cidrs,
        });
    }
}

/// The key of a raw object, when it has a name.
fn key_of(value: &Value) -> Option<ObjectKey> {
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    let namespace = meta
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    Some(ObjectKey::new(namespace, name))
}

/// What makes a Service unusable in manifest mode.
fn check_service(svc: &Service, path: &Path) -> Vec<(ProblemKind, String)> {
    let mut problems = Vec::new();
    let spec = svc.spec.clone().unwrap_or_default();
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let cluster_ip = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty());
    let has_cluster_ips = spec
        .cluster_ips
        .as_ref()
        .is_some_and(|ips| ips.iter().any(|ip| !ip.is_empty()));
    if type_ != "ExternalName" && cluster_ip.is_none() && !has_cluster_ips {
        problems.push((
            ProblemKind::MissingClusterIp,
            format!(
                "Service in {} has no spec.clusterIP or spec.clusterIPs; manifest mode has no address \
                 allocator, so set one (or clusterIP: None for a headless Service)",
                path.display()
            ),
        ));
    }
    let wants_node_ports = match type_ {
        "NodePort" => true,
        "LoadBalancer" => spec.allocate_load_balancer_node_ports != Some(false),
        _ => false,
    };
    for port in spec.ports.iter().flatten() {
        let name = port_name(port);
        if !(1..=65535).contains(&port.port) {
            problems.push((
                ProblemKind::BadPort,
                format!("port {name}: port {} is outside 1..=65535", port.port),
            ));
        }
        match port.node_port {
            Some(np) if !(1..=65535).contains(&np) => {
                problems.push((ProblemKind::BadPort, format!("port {name}: nodePort {np} is outside 1..=65535")));
            }
            None if wants_node_ports => problems.push((
                ProblemKind::MissingNodePort,
                format!("port {name}: a {type_} Service needs a nodePort here (manifest mode allocates none)"),
            )),
            _ => {}
        }
        if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(tp)) =
            port.target_port
            && !(1..=65535).contains(&tp)
        {
            problems.push((
                ProblemKind::BadPort,
                format!("port {name}: targetPort {tp} is outside 1..=65535"),
            ));
        }
    }
    problems
}

fn port_name(port: &ServicePort) -> String {
    match port.name.as_deref() {
        Some(name) if !name.is_empty() => format!("{name:?}"),
        _ => port.port.to_string(),
    }
}

/// Sends the directory as a [`SourceEvent::Resync`] now and after every change,
/// until `tx` is closed.
///
/// Changes (files created, written, deleted, renamed) are debounced (100 ms of
/// quiet, 400 ms at most), the directory is then read again whole, and a Resync
/// is sent if anything (objects or problems) differs from the last one sent. One
/// reading and one send at a time: changes during them lead to one more reading.
/// If the directory disappears, the last state is kept (with a warning) until it
/// is back.
pub async fn watch(dir: PathBuf, node_name: String, tx: mpsc::Sender<SourceEvent>) -> Result<()> {
    match tokio::fs::metadata(&dir).await {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("manifest directory {}: not a directory", dir.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("manifest directory {} does not exist", dir.display())
        }
        Err(e) => return Err(e).with_context(|| format!("manifest directory {}", dir.display())),
    }

    let changed = Arc::new(Notify::new());
    let mut watcher = {
        let changed = changed.clone();
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(event) => {
                if is_change(&event.kind) {
                    changed.notify_one();
                }
            }
            Err(e) => {
                log::warn!("watching manifests: {e}");
                changed.notify_one();
            }
        })
        .context("creating the manifest directory watcher")?
    };
    // Watch first, then read: a change in between is not missed.
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching manifest directory {}", dir.display()))?;

    let Some(first) = load(&dir).await? else {
        bail!("manifest directory {} disappeared", dir.display());
    };
    log_problems(&first);
    // Only a digest of what was sent is kept: a copy of every object would
    // double the agent's memory at tens of thousands of Services.
    let mut last = first.digest();
    for event in first.into_events(&node_name) {
        if tx.send(event).await.is_err() {
            return Ok(());
        }
    }

    let mut watching = true;
    loop {
        tokio::select! {
            () = tx.closed() => return Ok(()),
            () = changed.notified() => debounce(&changed).await,
            () = tokio::time::sleep(MISSING_DIR_RETRY), if !watching => {}
        }
        if !watching {
            if !tokio::fs::metadata(&dir).await.is_ok_and(|m| m.is_dir()) {
                continue;
            }
            if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
                log::debug!(
                    "manifest directory {} is back but not watchable yet: {e}",
                    dir.display()
                );
                continue;
            }
            log::info!("manifest directory {} is back", dir.display());
            watching = true;
        }
        let Some(loaded) = load(&dir).await? else {
            log::warn!(
                "manifest directory {} disappeared; keeping the last state until it is back",
                dir.display()
            );
            let _ = watcher.unwatch(&dir);
            watching = false;
            continue;
        };
        let digest = loaded.digest();
        if digest == last {
            log::debug!(
                "manifest directory {} changed, but not what it holds",
                dir.display()
            );
            continue;
        }
        last = digest;
        log_problems(&loaded);
        for event in loaded.into_events(&node_name) {
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Reads the directory on a blocking thread; `None` if it is no longer there.
async fn load(dir: &Path) -> Result<Option<Loaded>> {
    let dir = dir.to_path_buf();
    let t0 = Instant::now();
    let loaded = tokio::task::spawn_blocking(move || dir.is_dir().then(|| load_dir(&dir)))
        .await
        .context("reading manifests")?;
    if let Some(l) = &loaded {
        log::debug!(
            "read {} Services and {} EndpointSlices in {:?}",
            l.services.len(),
            l.slices.len(),
            t0.elapsed()
        );
    }
    Ok(loaded)
}

/// Waits until no change has been reported for [`QUIET`], or [`MAX_DEBOUNCE`].
async fn debounce(changed: &Notify) {
    let deadline = Instant::now() + MAX_DEBOUNCE;
    loop {
        let until = (Instant::now() + QUIET).min(deadline);
        if tokio::time::timeout_at(until, changed.notified())
            .await
            .is_err()
            || Instant::now() >= deadline
        {
            return;
        }
    }
}

/// Events that may change what the directory holds. Opening and reading files
/// (which this source does itself) are not.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

fn log_problems(loaded: &Loaded) {
    for p in &loaded.problems {
        log::warn!("manifests: {p}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_names() {
        for name in ["a.yaml", "b.yml", "c.json", "D.YAML", "svc.v1.yaml"] {
            assert!(is_manifest_name(name), "{name}");
        }
        for name in [
            ".a.yaml",
            ".a.yaml.swp",
            "a.yaml~",
            "#a.yaml#",
            "a.txt",
            "yaml",
            ".yaml",
            "a.yaml.bak",
        ] {
            assert!(!is_manifest_name(name), "{name}");
        }
    }

    #[test]
    fn documents_split_at_markers_with_lines() {
        let text = "# leading comment\na: 1\n---\nb: 2\n--- \n\n  # c\nc: 3\n...\nd: 4\n---\n";
        let chunks = split_documents(text);
        let lines: Vec<usize> = chunks.iter().map(|c| c.line).collect();
        assert_eq!(lines, [2, 4, 8, 10, 11]);
        let starts: Vec<usize> = chunks.iter().map(|c| c.first_line).collect();
        assert_eq!(starts, [1, 3, 5, 10, 11]);
        assert!(chunks[1].text.starts_with("---\nb: 2"));
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(chunks[2].text).unwrap();
        assert_eq!(v["c"], serde_yaml_ng::Value::from(3));
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(chunks[3].text).unwrap();
        assert_eq!(v["d"], serde_yaml_ng::Value::from(4));
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(chunks[4].text).unwrap();
        assert!(v.is_null());
    }

    #[test]
    fn marker_like_text_is_not_a_marker() {
        let text = "a: |\n  ---\n  x\nb: ----\n---x: 1\n";
        assert_eq!(split_documents(text).len(), 1);
    }

    #[test]
    fn reading_is_not_a_change() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            notify::event::AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Create(
            notify::event::CreateKind::File
        )));
        assert!(is_change(&EventKind::Remove(
            notify::event::RemoveKind::Any
        )));
    }
    #[test]
    fn digests_tell_contents_apart_not_readings() {
        let dir = std::env::temp_dir().join(format!("lb-digest-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let svc = |ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: a, namespace: x}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: 80}}]\n"
            )
        };
        fs::write(dir.join("a.yaml"), svc("10.96.0.1")).unwrap();
        let first = load_dir(&dir).digest();
        // The same objects written differently: same digest.
        fs::write(
            dir.join("a.yaml"),
            format!("# a comment\n{}", svc("10.96.0.1")),
        )
        .unwrap();
        assert_eq!(load_dir(&dir).digest(), first);
        // One field changed, or a problem appeared: another digest.
        fs::write(dir.join("a.yaml"), svc("10.96.0.2")).unwrap();
        assert_ne!(load_dir(&dir).digest(), first);
        fs::write(dir.join("a.yaml"), svc("10.96.0.1")).unwrap();
        fs::write(dir.join("b.yaml"), "a: [").unwrap();
        assert_ne!(load_dir(&dir).digest(), first);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_parsed_in_parallel_are_taken_in_order() {
        let dir = std::env::temp_dir().join(format!("lb-order-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut files = Vec::new();
        for i in 0..9 {
            let path = dir.join(format!("f{i}.yaml"));
            let svc = |n: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {n}}}\n");
            fs::write(
                &path,
                format!("{}---\n{}", svc(&format!("n{i}")), svc(&format!("m{i}"))),
            )
            .unwrap();
            files.push(path);
        }
        let mut seen = Vec::new();
        for_each_parsed(&files, |f| {
            let names: Vec<String> = f
                .docs
                .into_iter()
                .map(|d| match d.doc {
                    Ok(Decoded::Service(_, Ok(svc))) => svc.metadata.name.unwrap(),
                    _ => panic!("not a decoded Service"),
                })
                .collect();
            seen.push((f.path, names));
        });
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(seen.len(), 9);
        for (i, (path, names)) in seen.into_iter().enumerate() {
            assert_eq!(path, files[i]);
            assert_eq!(names, [format!("n{i}"), format!("m{i}")]);
        }
    }
}

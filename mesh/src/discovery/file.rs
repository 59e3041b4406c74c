//! The file source: Kubernetes and Istio objects from a YAML file or a directory of them, as a
//! cluster would serve them, reloaded when the files change.
//!
//! It reads every `*.yaml`/`*.yml` file of the directory (sorted, not recursive, dot-files
//! skipped, so a mounted ConfigMap works), translates the whole set and publishes it. Changes are
//! found by polling names, sizes, modification and change times and link targets: portable
//! enough, and cheap for the few files a local run or a test has. A broken file or object never
//! takes the state down: its last good version stays, the problem is logged with file, document
//! and field, and counted.
//!
//! What counts as broken, and why it is kept rather than dropped:
//!
//! - **Unreadable files.** A file the directory lists but that cannot be read (a dangling
//!   symbolic link, a link loop, permission denied, an I/O error, not UTF-8, not a regular file)
//!   keeps its last good contents: a `cluster.yaml` swapped for a broken link must not empty the
//!   mesh. Only a file whose directory entry is gone is deleted, objects and all. A directory
//!   (or configured file) that cannot be listed keeps the whole previous state.
//! - **Unknown fields.** People write these files, so they are parsed strictly, as
//!   `kubectl apply --validate=strict` does: a field the kind's schema does not have (`podIp:`,
//!   `serviceAcountName:`, `metadata.lables:`) rejects the object, naming kind, namespace/name and
//!   the field path, with a "did you mean" for near misses. Rejected rather than warned: warned,
//!   the pod would apply without its IP (out of the mesh, traffic to it in plaintext) or as
//!   `sa/default` (someone else's identity and policies). Rejected, an edited object keeps its
//!   last good version, so a typo never un-meshes a running pod; a new object with a typo is not
//!   applied, and says so (log, `mesh_config_rejected_total`). The Kubernetes source is lenient
//!   here: the API server has validated its objects already, and may serve fields newer than
//!   this build's schema.
//! - **Near-miss kinds.** A document of a kind nobody here reads is skipped (somebody else's),
//!   but one whose kind or apiVersion is a near miss of one we read (`AuthorisationPolicy`,
//!   `Virtualservice`, an AuthorizationPolicy under `networking.istio.io`) is also a warning with
//!   a "did you mean", in `mesh_config_warnings{code="UnknownKind"}` and the state's warnings.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{ConfigMetrics, ReloadResult, StoreWriter, WarningLog};
use crate::model::ConfigWarning;
use crate::model::translate::{
    Kind, KindSuggestion, Object, ObjectKey, SourceObject, TranslateConfig, TranslateError,
    Translator, suggest_kind,
};

#[cfg(test)]
mod tests;

/// How often the files are checked for changes unless configured otherwise.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// A floor for the poll interval, so a zero from configuration cannot spin a core.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Where the files are and how to read them.
#[derive(Debug, Clone)]
pub struct FileSourceConfig {
    /// A YAML file, or a directory whose `*.yaml`/`*.yml` files are read.
    pub path: PathBuf,
    pub poll_interval: Duration,
    pub translate: TranslateConfig,
}

impl FileSourceConfig {
    /// Defaults for everything but the path.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            translate: TranslateConfig::default(),
        }
    }
}

/// Where in a file a document is: `document` counts from 1 as a person would; `item` is the
/// index inside a `kind: List` document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub document: usize,
    pub item: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.item {
            None => write!(f, "document {}", self.document),
            Some(item) => write!(f, "document {}, items[{item}]", self.document),
        }
    }
}

/// What went wrong with the configuration files. Each names the file and, where it can, the
/// document, object and field.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("config path {}: {source} (does it exist, and may this process read it?)", path.display())]
    Scan { path: PathBuf, source: io::Error },
    /// A file the directory lists that cannot be read; its last good contents stay.
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: {location}: invalid YAML: {source}", path.display())]
    Yaml {
        path: PathBuf,
        location: Location,
        source: serde_yaml::Error,
    },
    /// A document that cannot be filed under a kind and name, so it has no "last good version"
    /// of its own; the file's last good contents stay instead.
    #[error("{}: {location}: {why}", path.display())]
    Document {
        path: PathBuf,
        location: Location,
        kind: Option<String>,
        why: String,
    },
    /// An object rejected by its schema or by the translation.
    #[error("{}: {location}: {source}", path.display())]
    Object {
        path: PathBuf,
        location: Location,
        source: Box<TranslateError>,
    },
}

impl FileSourceError {
    /// The `kind` label this error is counted under.
    fn kind_label(&self) -> &str {
        match self {
            FileSourceError::Object { source, .. } => source.object().kind.label(),
            FileSourceError::Document {
                kind: Some(kind), ..
            } => kind,
            _ => "unknown",
        }
    }
}

/// What one load did, for the caller's logs and for tests.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Files read.
    pub files: usize,
    /// The store version this load published.
    pub version: u64,
    /// Objects in force after the load, all kinds together.
    pub objects: usize,
    /// Everything rejected in this load; the last good versions of those objects or files stay.
    pub rejected: Vec<FileSourceError>,
    /// Documents of kinds this source does not read.
    pub ignored: usize,
    /// Warnings in force after the load (also in the published state): near-miss kinds of this
    /// source's documents and the translation's (routes to undefined subsets).
    pub warnings: Vec<ConfigWarning>,
}

/// The file source. Build it, optionally [`load_once`](Self::load_once) to have the first state
/// before serving, then spawn [`run`](Self::run).
#[derive(Debug)]
pub struct FileSource {
    config: FileSourceConfig,
    translator: Translator,
    metrics: ConfigMetrics,
    warning_log: WarningLog,
    /// Parsed contents of each file as last read without a file-level error.
    last_good_files: BTreeMap<PathBuf, Vec<(Location, SourceObject)>>,
    /// What the files looked like at the last load (or why they could not be listed), so
    /// polling reloads only on change and logs a persistent failure once.
    seen: Option<Result<Fingerprint, String>>,
}

impl FileSource {
    pub fn new(config: FileSourceConfig, registry: &mut Registry) -> Self {
        let translator = Translator::new(config.translate.clone());
        Self {
            config,
            translator,
            metrics: ConfigMetrics::new(registry),
            warning_log: WarningLog::default(),
            last_good_files: BTreeMap::new(),
            seen: None,
        }
    }

    /// Reads and translates everything now and publishes the result. Errors only when nothing
    /// could be read (the path is missing or unreadable); the previous state then stays.
    pub async fn load_once(&mut self, store: &StoreWriter) -> Result<LoadReport, FileSourceError> {
        let path = self.config.path.clone();
        let snapshot = match tokio::task::spawn_blocking(move || read_all(&path)).await {
            Ok(result) => result,
            Err(join) => Err(FileSourceError::Scan {
                path: self.config.path.clone(),
                source: io::Error::other(join.to_string()),
            }),
        };
        let snapshot = match snapshot {
            Ok(snapshot) => snapshot,
            Err(error) => {
                warn!("{error}; keeping the previous configuration");
                self.metrics.reload(ReloadResult::Failure);
                self.seen = Some(Err(error.to_string()));
                return Err(error);
            }
        };
        Ok(self.apply(snapshot, store))
    }

    /// A load of files given as `(path, contents)` instead of read from disk: the same parse,
    /// last-good bookkeeping and translation. For the fuzz targets ([`crate::fuzzing`]).
    pub(crate) fn apply_texts(
        &mut self,
        files: Vec<(PathBuf, String)>,
        store: &StoreWriter,
    ) -> LoadReport {
        let snapshot = Snapshot {
            fingerprint: Fingerprint(Vec::new()),
            files: files
                .into_iter()
                .map(|(path, text)| (path, Ok(text)))
                .collect(),
        };
        self.apply(snapshot, store)
    }

    fn apply(&mut self, snapshot: Snapshot, store: &StoreWriter) -> LoadReport {
        let mut report = LoadReport {
            files: snapshot.files.len(),
            ..LoadReport::default()
        };
        let mut objects = Vec::new();
        let mut origins: HashMap<ObjectKey, (PathBuf, Location)> = HashMap::new();
        let present: BTreeSet<PathBuf> = snapshot.files.iter().map(|(p, _)| p.clone()).collect();
        let mut file_warnings = Vec::new();

        for (path, content) in snapshot.files {
            let parsed = match content {
                Ok(text) => parse_file(&path, &text),
                Err(source) => ParsedFile::failed(FileSourceError::Read {
                    path: path.clone(),
                    source,
                }),
            };
            for ignored in &parsed.ignored {
                self.metrics.ignored(&ignored.kind);
                report.ignored += 1;
                match &ignored.suggestion {
                    // Logged by the warning log, once.
                    Some(suggestion) => file_warnings.push(ignored.warning(&path, suggestion)),
                    None => warn!(
                        file = %path.display(),
                        location = %ignored.location,
                        kind = ignored.kind,
                        "kind not read by this proxy; skipped"
                    ),
                }
            }
            let documents = if parsed.errors.is_empty() {
                self.last_good_files
                    .insert(path.clone(), parsed.objects.clone());
                parsed.objects
            } else {
                // The file's last good contents stay. With none (a first load), the documents
                // that did parse apply: better than starting without all of them.
                let kept = self.last_good_files.get(&path).cloned();
                for error in parsed.errors {
                    match (&kept, &error) {
                        (Some(_), _) => warn!("{error}; keeping this file's last good contents"),
                        (None, FileSourceError::Read { .. }) => {
                            warn!("{error}; nothing of this file was loaded before")
                        }
                        (None, _) => warn!("{error}; applying the file's other documents"),
                    }
                    self.metrics.rejected(error.kind_label());
                    report.rejected.push(error);
                }
                kept.unwrap_or(parsed.objects)
            };
            for (location, object) in documents {
                let key = match &object {
                    Ok(object) => object.key(),
                    Err(error) => error.object().clone(),
                };
                origins.insert(key, (path.clone(), location));
                objects.push(object);
            }
        }
        self.last_good_files
            .retain(|path, _| present.contains(path));

        let translation = self.translator.translate(objects);
        for rejection in translation.rejections {
            let key = rejection.error.object();
            let (path, location) = origins.get(key).cloned().unwrap_or_else(|| {
                (
                    self.config.path.clone(),
                    Location {
                        document: 0,
                        item: None,
                    },
                )
            });
            let error = FileSourceError::Object {
                path,
                location,
                source: Box::new(rejection.error),
            };
            if rejection.kept_last_good {
                warn!("{error}; keeping its last good version");
            } else {
                warn!("{error}");
            }
            self.metrics.rejected(error.kind_label());
            report.rejected.push(error);
        }
        self.metrics.set_in_force(&translation.in_force);
        report.objects = translation.in_force.values().sum();
        self.metrics.reload(if report.rejected.is_empty() {
            ReloadResult::Success
        } else {
            ReloadResult::Partial
        });
        let mut state = translation.state;
        state.warnings.extend(file_warnings);
        state.warnings.sort();
        self.warning_log.report(&self.metrics, &state.warnings);
        report.warnings = state.warnings.clone();
        report.version = store.apply(state);
        self.seen = Some(Ok(snapshot.fingerprint));
        info!(
            path = %self.config.path.display(),
            files = report.files,
            objects = report.objects,
            rejected = report.rejected.len(),
            ignored = report.ignored,
            warnings = report.warnings.len(),
            version = report.version,
            "configuration loaded"
        );
        report
    }

    /// Loads (unless [`load_once`](Self::load_once) already did), then polls for changes and
    /// reloads until `shutdown`.
    pub async fn run(mut self, store: StoreWriter, shutdown: CancellationToken) {
        if self.seen.is_none() {
            // Failures are logged and counted inside; polling retries.
            let _ = self.load_once(&store).await;
        }
        let mut ticker = tokio::time::interval(self.config.poll_interval.max(MIN_POLL_INTERVAL));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let path = self.config.path.clone();
            let now = match tokio::task::spawn_blocking(move || {
                list_files(&path)
                    .map(|files| fingerprint(&files))
                    .map_err(|e| e.to_string())
            })
            .await
            {
                Ok(now) => now,
                Err(join) => {
                    warn!(error = %join, "checking the configuration files failed");
                    continue;
                }
            };
            if self.seen.as_ref() != Some(&now) {
                let _ = self.load_once(&store).await;
            }
        }
    }
}

/// Per file: name, modification time, size, change time (permissions, owner) and link target,
/// as far as they can be read: what polling compares. The change time and the link target make
/// an unreadable file that becomes readable (fixed permissions, a re-pointed link) a change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint(Vec<FileStamp>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    modified: Option<SystemTime>,
    len: Option<u64>,
    changed: Option<(i64, i64)>,
    link: Option<PathBuf>,
}

struct Snapshot {
    fingerprint: Fingerprint,
    files: Vec<(PathBuf, io::Result<String>)>,
}

/// The files to read: the path itself if it is a file, else the directory's YAML files.
///
/// A directory entry that exists but cannot be followed (a dangling link, a loop, a target this
/// process may not look at) is listed, so that reading it fails and its last good contents stay;
/// only entries that are gone, or are directories, are not.
fn list_files(path: &Path) -> Result<Vec<PathBuf>, FileSourceError> {
    let scan_error = |source| FileSourceError::Scan {
        path: path.to_owned(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(scan_error)?;
    if !metadata.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(scan_error)? {
        let entry = entry.map_err(scan_error)?;
        let file = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_yaml = file
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml");
        if !is_yaml || name.starts_with('.') {
            continue;
        }
        // Follows symlinks, as a ConfigMap mount is made of them.
        let listed = match std::fs::metadata(&file) {
            Ok(metadata) => !metadata.is_dir(),
            // Unreadable if the entry itself is still there; gone (deleted since the listing)
            // if not.
            Err(_) => std::fs::symlink_metadata(&file).is_ok(),
        };
        if listed {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    Fingerprint(
        files
            .iter()
            .map(|file| {
                let metadata = std::fs::metadata(file).ok();
                FileStamp {
                    path: file.clone(),
                    modified: metadata.as_ref().and_then(|m| m.modified().ok()),
                    len: metadata.as_ref().map(|m| m.len()),
                    changed: metadata.as_ref().map(|m| (m.ctime(), m.ctime_nsec())),
                    link: std::fs::read_link(file).ok(),
                }
            })
            .collect(),
    )
}

/// Takes the fingerprint before reading, so a write racing the read shows up as a change at the
/// next poll.
fn read_all(path: &Path) -> Result<Snapshot, FileSourceError> {
    let files = list_files(path)?;
    let fingerprint = fingerprint(&files);
    let files = files
        .into_iter()
        .map(|file| {
            let content = read_file(&file);
            (file, content)
        })
        .collect();
    Ok(Snapshot { fingerprint, files })
}

/// One file's text, or why it cannot be had, in words that say what to check.
fn read_file(file: &Path) -> io::Result<String> {
    let read = std::fs::metadata(file).and_then(|metadata| {
        if metadata.is_file() {
            std::fs::read_to_string(file)
        } else {
            // A FIFO would block the read for ever; a directory (swapped in since the
            // listing) has no text.
            Err(io::Error::other("not a regular file"))
        }
    });
    read.map_err(|error| {
        let mut why = match error.kind() {
            io::ErrorKind::InvalidData => format!("{error}: YAML files must be UTF-8"),
            io::ErrorKind::PermissionDenied => {
                format!("{error}: may this process read it (and every directory on the way)?")
            }
            _ => error.to_string(),
        };
        if let Ok(target) = std::fs::read_link(file) {
            why = format!("a symbolic link to {}: {why}", target.display());
        }
        io::Error::new(error.kind(), why)
    })
}

/// One file's documents.
#[derive(Debug, Default)]
struct ParsedFile {
    objects: Vec<(Location, SourceObject)>,
    ignored: Vec<Ignored>,
    /// Problems that cannot be pinned to one object: the whole file falls back to its last good
    /// contents.
    errors: Vec<FileSourceError>,
}

/// A document of a kind this proxy does not read.
#[derive(Debug)]
struct Ignored {
    location: Location,
    api_version: String,
    kind: String,
    /// `namespace/name` or `name`, as written, for the warning.
    name: Option<String>,
    /// Set when the type is a near miss of one this proxy reads.
    suggestion: Option<KindSuggestion>,
}

impl Ignored {
    fn warning(&self, path: &Path, suggestion: &KindSuggestion) -> ConfigWarning {
        let mut object = format!("{}: {}", path.display(), self.location);
        if let Some(name) = &self.name {
            object.push_str(&format!(" ({} {name})", self.kind));
        }
        let field = if self.kind == suggestion.kind.as_str() {
            "apiVersion"
        } else {
            "kind"
        };
        ConfigWarning {
            code: "UnknownKind".to_owned(),
            kind: self.kind.clone(),
            object,
            field: field.to_owned(),
            message: format!(
                "apiVersion: {}, kind: {} is not a type this proxy reads; did you mean {suggestion}? The document is skipped",
                self.api_version, self.kind
            ),
        }
    }
}

impl ParsedFile {
    fn failed(error: FileSourceError) -> Self {
        Self {
            errors: vec![error],
            ..Self::default()
        }
    }
}

/// The part of every document that says what it is.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    metadata: Option<HeaderMetadata>,
    /// Only read for `kind: List`; other kinds may use the name for anything.
    #[serde(default)]
    items: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct HeaderMetadata {
    name: Option<String>,
    namespace: Option<String>,
}

fn parse_file(path: &Path, text: &str) -> ParsedFile {
    let mut parsed = ParsedFile::default();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let location = Location {
            document: index + 1,
            item: None,
        };
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(value) => value,
            Err(source) => {
                // The parser cannot resynchronise after a syntax error.
                parsed.errors.push(FileSourceError::Yaml {
                    path: path.to_owned(),
                    location,
                    source,
                });
                break;
            }
        };
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        // JSON is what the API server serves and what the object types are built for; the
        // conversion also turns YAML's numeric map keys into strings, as the API server does.
        match serde_json::to_value(&value) {
            Ok(json) => parse_document(path, location, json, &mut parsed),
            Err(e) => parsed.errors.push(FileSourceError::Document {
                path: path.to_owned(),
                location,
                kind: None,
                why: format!("not representable as a Kubernetes object: {e}"),
            }),
        }
    }
    parsed
}

fn parse_document(
    path: &Path,
    location: Location,
    value: serde_json::Value,
    parsed: &mut ParsedFile,
) {
    let document_error = |kind: Option<&str>, why: String| FileSourceError::Document {
        path: path.to_owned(),
        location,
        kind: kind.map(str::to_owned),
        why,
    };
    let header = match Header::deserialize(&value) {
        Ok(header) => header,
        Err(e) => {
            parsed.errors.push(document_error(
                None,
                format!("not a Kubernetes object: {e}"),
            ));
            return;
        }
    };
    let (Some(api_version), Some(kind)) = (header.api_version.as_deref(), header.kind.as_deref())
    else {
        parsed.errors.push(document_error(
            header.kind.as_deref(),
            "not a Kubernetes object: apiVersion and kind are required".to_owned(),
        ));
        return;
    };
    if api_version == "v1" && kind == "List" && location.item.is_none() {
        let items = match header.items {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Array(items)) => items,
            Some(_) => {
                parsed.errors.push(document_error(
                    Some(kind),
                    "items: a List's items must be a sequence".to_owned(),
                ));
                return;
            }
        };
        for (i, item) in items.into_iter().enumerate() {
            let location = Location {
                item: Some(i),
                ..location
            };
            parse_document(path, location, item, parsed);
        }
        return;
    }
    let metadata = header.metadata.unwrap_or_default();
    let Some(known) = Kind::from_type(api_version, kind) else {
        let name = metadata
            .name
            .as_deref()
            .map(|name| match &metadata.namespace {
                Some(namespace) => format!("{namespace}/{name}"),
                None => name.to_owned(),
            });
        parsed.ignored.push(Ignored {
            location,
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
            name,
            suggestion: suggest_kind(api_version, kind),
        });
        return;
    };
    let Some(name) = metadata.name.as_deref().filter(|n| !n.is_empty()) else {
        parsed.errors.push(document_error(
            Some(kind),
            format!("{kind} without metadata.name"),
        ));
        return;
    };
    let key = ObjectKey::new(known, metadata.namespace.as_deref(), name);
    parsed
        .objects
        .push((location, Object::from_value_strict(&key, value)));
}

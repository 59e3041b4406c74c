//! Discovery: the sources that feed Kubernetes and Istio objects into the translation, and the
//! snapshot store through which everything else reads the resulting state.
//!
//! A source owns the store's only writer; readers hold [`Store`] handles. There are two: the
//! file source ([`file`]) and the Kubernetes API watchers ([`kube`](self::kube)); both hand
//! whole object sets to the same translation and share the config metrics. [`start`] starts
//! the one a proxy's configuration chose ([`CONFIG_SOURCE`]).

use std::collections::{BTreeMap, BTreeSet};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::model::ConfigWarning;
use crate::model::translate::Kind;

pub mod file;
pub mod kube;
pub mod store;

pub use store::{Store, StoreWriter};

use crate::ops::{ConfigError, Env};

/// The variable choosing where the objects come from: `file` (a YAML file or directory) or
/// `kubernetes` (the API server).
pub const CONFIG_SOURCE: &str = "CONFIG_SOURCE";

/// Where the objects come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    File,
    Kubernetes,
}

impl SourceKind {
    /// Reads [`CONFIG_SOURCE`]; unset, it is `file` when `path_var` (the file source's path) is
    /// set and `kubernetes` otherwise, so local runs keep working and a pod needs nothing.
    pub fn from_env(env: &dyn Env, path_var: &'static str) -> Result<Self, ConfigError> {
        match env.get(CONFIG_SOURCE)?.as_deref() {
            None if env.get(path_var)?.is_some() => Ok(SourceKind::File),
            None => Ok(SourceKind::Kubernetes),
            Some("file") => Ok(SourceKind::File),
            Some("kubernetes") => Ok(SourceKind::Kubernetes),
            Some(other) => Err(ConfigError::Invalid {
                var: CONFIG_SOURCE,
                value: other.to_owned(),
                why: format!("expected `file` (objects from {path_var}) or `kubernetes`"),
            }),
        }
    }
}

/// A configured source, ready to [`start`].
#[derive(Debug, Clone)]
pub enum SourceSpec {
    File(file::FileSourceConfig),
    Kubernetes(self::kube::KubeSourceConfig),
}

/// Why a source could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Kube(#[from] self::kube::KubeSourceError),
}

/// Starts the source and returns once it runs; it stops at `stop`.
///
/// The file source's first load is awaited, so a local run has its pods before this returns
/// (a failed load is logged and retried as the files change). The Kubernetes source only needs
/// a client here; its first state follows the initial lists, and until then the store is not
/// synced (readiness says so).
pub async fn start(
    spec: SourceSpec,
    writer: StoreWriter,
    registry: &mut Registry,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), SourceError> {
    match spec {
        SourceSpec::File(config) => {
            let mut source = file::FileSource::new(config, registry);
            if let Err(e) = source.load_once(&writer).await {
                tracing::warn!(error = %e, "first configuration load failed; retrying as files change");
            }
            tokio::spawn(source.run(writer, stop));
        }
        SourceSpec::Kubernetes(config) => {
            let client = self::kube::default_client().await?;
            let source = self::kube::KubeSource::new(config, client, registry);
            tokio::spawn(source.run(writer, stop));
        }
    }
    Ok(())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WarningLabels {
    kind: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

/// How a reload went, the `result` label of `mesh_config_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// Every object applied.
    Success,
    /// A new state applied, but some objects were rejected (their last good versions stay).
    Partial,
    /// Nothing could be read; the previous state stays.
    Failure,
}

impl ReloadResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Success => "success",
            ReloadResult::Partial => "partial",
            ReloadResult::Failure => "failure",
        }
    }
}

/// Metrics of a configuration source, so a rejected document is visible on a dashboard and
/// not only in a log line.
#[derive(Clone, Debug)]
pub struct ConfigMetrics {
    rejected: Family<KindLabels, Counter>,
    ignored: Family<KindLabels, Counter>,
    objects: Family<KindLabels, Gauge>,
    reloads: Family<ReloadLabels, Counter>,
    warnings: Family<WarningLabels, Gauge>,
}

impl ConfigMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let rejected = Family::<KindLabels, Counter>::default();
        registry.register(
            "mesh_config_rejected",
            "Configuration objects rejected (invalid), by kind; the last good version stays in force",
            rejected.clone(),
        );
        let ignored = Family::<KindLabels, Counter>::default();
        registry.register(
            "mesh_config_ignored",
            "Configuration documents of a kind this proxy does not read, by kind; skipped",
            ignored.clone(),
        );
        let objects = Family::<KindLabels, Gauge>::default();
        registry.register(
            "mesh_config_objects",
            "Configuration objects in force, by kind",
            objects.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "mesh_config_reloads",
            "Configuration reloads, by result (success, partial, failure)",
            reloads.clone(),
        );
        let warnings = Family::<WarningLabels, Gauge>::default();
        registry.register(
            "mesh_config_warnings",
            "Configuration that applies but probably not as meant (IST0101: a route to a subset no DestinationRule defines; UnknownKind: a document whose kind is a near miss of one read), by kind and code; in the config dump's state.warnings",
            warnings.clone(),
        );
        Self {
            rejected,
            ignored,
            objects,
            reloads,
            warnings,
        }
    }

    /// Counts a rejected object; `kind` is the document's kind, or `unknown` when even that
    /// could not be read.
    pub fn rejected(&self, kind: &str) {
        self.rejected
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Counts a document of a kind nobody here reads.
    pub fn ignored(&self, kind: &str) {
        self.ignored
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Sets the objects-in-force gauges from a translation's counts.
    pub fn set_in_force(&self, counts: &BTreeMap<Kind, usize>) {
        for (kind, count) in counts {
            self.objects
                .get_or_create(&KindLabels {
                    kind: kind.label().to_owned(),
                })
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    /// Sets `mesh_config_warnings` to the warnings in force now (gauges of warnings gone drop
    /// out).
    pub fn set_warnings(&self, warnings: &[ConfigWarning]) {
        self.warnings.clear();
        for warning in warnings {
            self.warnings
                .get_or_create(&WarningLabels {
                    kind: warning.kind.clone(),
                    code: warning.code.clone(),
                })
                .inc();
        }
    }

    pub fn reload(&self, result: ReloadResult) {
        self.reloads
            .get_or_create(&ReloadLabels {
                result: result.as_str(),
            })
            .inc();
    }
}

/// Reports a source's configuration warnings: the gauges on every load, a log line only when a
/// warning appears (and one when it clears), since the same state is translated again on every
/// change of anything else.
#[derive(Debug, Default)]
pub(crate) struct WarningLog {
    logged: BTreeSet<ConfigWarning>,
}

impl WarningLog {
    pub(crate) fn report(&mut self, metrics: &ConfigMetrics, warnings: &[ConfigWarning]) {
        metrics.set_warnings(warnings);
        let now: BTreeSet<ConfigWarning> = warnings.iter().cloned().collect();
        for warning in now.difference(&self.logged) {
            tracing::warn!(code = %warning.code, "{warning}");
        }
        for warning in self.logged.difference(&now) {
            tracing::info!(code = %warning.code, object = %warning.object, field = %warning.field, "configuration warning cleared");
        }
        self.logged = now;
    }
}

//! The Kubernetes source: one watcher per kind on the API server, feeding the same
//! [`Translator`] as the file source.
//!
//! Every kind is watched cluster-wide as untyped JSON (`DynamicObject`), trimmed to the fields
//! the translation reads, and parsed by [`Object::from_value`], so a bad object is rejected with
//! the same message, metric and last-good-version rule as a bad document in a file. Changes are
//! gathered for [`KubeSourceConfig::batch_delay`] and the complete current set is translated and
//! published; nothing is published before every watched kind has been listed once, so
//! [`Store::has_synced`](super::Store::has_synced) (readiness) means "the whole picture".
//!
//! Failures never drop state: a watch error or an API outage keeps the last published state
//! while the watcher retries with kube's default back-off (0.8 s doubling to 30 s, jittered); a
//! relist (after `410 Gone`) replaces a kind's objects only once the list is complete. A custom
//! resource whose CRD is not installed (404 on every version we read) is logged once and is an
//! empty set, looked for again every [`KubeSourceConfig::absent_recheck`]. A 403 names the verb
//! and resource the service account lacks.
//!
//! **Which pods.** Both proxies watch every pod in the cluster, not only their node's: ztunnel
//! needs a remote endpoint's identity (the certificate it must present), whether it is enrolled
//! (HBONE or plain TCP), its named ports and, for a pod IP dialled directly, which workload it
//! is; Istio's ztunnel likewise receives every workload from istiod. An EndpointSlice names the
//! pod (`targetRef`) but not its service account, so the pods themselves are needed. Memory stays
//! bounded by what is kept: a pod is cut down to name, namespace, labels, the controller owner
//! reference, creation time, node, service account, host networking, container port names,
//! phase and IPs ([`trim`]), about 1 KiB; every other kind loses annotations, managed fields,
//! finalizers and status. Updates that change nothing the translation reads (most pod status
//! updates) are dropped before they reach it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use ::kube::api::{Api, ApiResource, DynamicObject};
use ::kube::runtime::utils::Backoff;
use ::kube::runtime::watcher::{self, DefaultBackoff, Event};
use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{ConfigMetrics, ReloadResult, StoreWriter, WarningLog};
use crate::model::translate::{Kind, Object, ObjectKey, SourceObject, TranslateConfig, Translator};

#[cfg(test)]
pub(crate) mod fake_api;
#[cfg(test)]
mod tests;

/// How long changes are gathered before the set is translated again.
pub const DEFAULT_BATCH_DELAY: Duration = Duration::from_millis(100);
/// How often a kind whose CRD is not installed is looked for again.
pub const DEFAULT_ABSENT_RECHECK: Duration = Duration::from_secs(60);
/// Objects per list page, as client-go.
const PAGE_SIZE: u32 = 500;
/// Bound on updates in flight between the watchers and the translation; a full channel makes
/// the watchers wait, so a burst cannot grow memory without bound.
const UPDATE_QUEUE: usize = 1024;

/// The kinds ztunnel reads: workloads, services, endpoints and L4 policy.
pub const ZTUNNEL_KINDS: [Kind; 6] = [
    Kind::Namespace,
    Kind::Pod,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::AuthorizationPolicy,
    Kind::PeerAuthentication,
];

/// What to watch and how.
#[derive(Debug, Clone)]
pub struct KubeSourceConfig {
    pub translate: TranslateConfig,
    /// The kinds to watch; each must have listed once before the first state is published.
    pub kinds: Vec<Kind>,
    /// Kinds watched in one namespace only (the ingress gateway's Secrets); the rest are
    /// watched cluster-wide.
    pub namespaced: BTreeMap<Kind, String>,
    pub batch_delay: Duration,
    pub absent_recheck: Duration,
}

impl KubeSourceConfig {
    /// What ztunnel reads ([`ZTUNNEL_KINDS`]).
    pub fn ztunnel(translate: TranslateConfig) -> Self {
        Self::with_kinds(translate, ZTUNNEL_KINDS.to_vec())
    }

    /// What a waypoint reads ([`Kind::WAYPOINT`]: ztunnel's kinds plus VirtualService,
    /// DestinationRule, Gateway and the other L7 kinds; no Secrets).
    pub fn waypoint(translate: TranslateConfig) -> Self {
        Self::with_kinds(translate, Kind::WAYPOINT.to_vec())
    }

    /// What an ingress gateway reads: a waypoint's kinds, Istio `Gateway`s, and the Secrets
    /// of its own `namespace` only (its servers' certificates).
    pub fn ingress(translate: TranslateConfig, namespace: &str) -> Self {
        let mut config = Self::with_kinds(translate, Kind::ALL.to_vec());
        config.namespaced.insert(Kind::Secret, namespace.to_owned());
        config
    }

    pub fn with_kinds(translate: TranslateConfig, kinds: Vec<Kind>) -> Self {
        Self {
            translate,
            kinds,
            namespaced: BTreeMap::new(),
            batch_delay: DEFAULT_BATCH_DELAY,
            absent_recheck: DEFAULT_ABSENT_RECHECK,
        }
    }
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error(
        "no Kubernetes API configuration: {0} (in a pod: is the service account token mounted \
         (automountServiceAccountToken)? outside a cluster: is KUBECONFIG set?)"
    )]
    Config(#[source] ::kube::config::InferConfigError),
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] ::kube::Error),
}

/// A client from the pod's service account, or `KUBECONFIG` / `~/.kube/config` outside a
/// cluster (what `kube::Client::try_default` does), without the client's own retries.
///
/// kube retries 429/503/504 inside the client up to 15 times with a back-off that grows to
/// minutes, where nobody sees it. Without that layer a failure reaches the caller at once: the
/// watchers log it, count it and back off (at most 30 s, so an API server that comes back is
/// noticed soon), and the CA answers a certificate request within its deadline.
pub async fn default_client() -> Result<::kube::Client, KubeSourceError> {
    let mut config = ::kube::Config::infer()
        .await
        .map_err(KubeSourceError::Config)?;
    config.default_retry = false;
    ::kube::Client::try_from(config).map_err(KubeSourceError::Client)
}

/// Where a kind is served: `group/version` candidates in order of preference, and the plural.
#[derive(Debug, Clone)]
struct Resource {
    kind: Kind,
    /// `(group, version)`, the newest first; the next is tried when one is not served (404).
    versions: Vec<(String, String)>,
    /// `Some`: watched in this namespace only.
    namespace: Option<String>,
    plural: String,
}

impl Resource {
    fn of(kind: Kind) -> Self {
        let versions = kind
            .api_versions()
            .iter()
            .map(|api_version| match api_version.rsplit_once('/') {
                Some((group, version)) => (group.to_owned(), version.to_owned()),
                None => (String::new(), (*api_version).to_owned()),
            })
            .collect();
        Self {
            kind,
            versions,
            namespace: None,
            plural: plural(kind.as_str()).to_ascii_lowercase(),
        }
    }

    fn group(&self) -> &str {
        self.versions
            .first()
            .map_or("", |(group, _)| group.as_str())
    }

    /// `virtualservices.networking.istio.io`, `pods`: the resource as RBAC and CRDs name it.
    fn qualified(&self) -> String {
        if self.group().is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group())
        }
    }

    /// Served through a CRD (Istio's kinds, the Gateway API), which may not be installed.
    fn is_custom(&self) -> bool {
        !matches!(self.group(), "" | "discovery.k8s.io")
    }

    fn api_resource(&self, index: usize) -> ApiResource {
        let (group, version) = &self.versions[index.min(self.versions.len() - 1)];
        ApiResource {
            group: group.clone(),
            version: version.clone(),
            api_version: if group.is_empty() {
                version.clone()
            } else {
                format!("{group}/{version}")
            },
            kind: self.kind.as_str().to_owned(),
            plural: self.plural.clone(),
        }
    }
}

/// English plural of a kind as Kubernetes forms resource names: `AuthorizationPolicy` ->
/// `AuthorizationPolicies`, `Gateway` -> `Gateways`.
fn plural(kind: &str) -> String {
    match kind.strip_suffix('y') {
        Some(stem) if !stem.ends_with(['a', 'e', 'o', 'u']) => format!("{stem}ies"),
        _ => format!("{kind}s"),
    }
}

/// What a watcher tells the translation task.
#[derive(Debug)]
enum Update {
    /// A (re)list started: objects until [`Update::Listed`] form the kind's complete new set.
    Relisting(Kind),
    Listed(ObjectKey, SourceObject),
    ListDone(Kind),
    Applied(ObjectKey, SourceObject),
    Deleted(ObjectKey),
    /// The kind is not served (CRD not installed): an empty set.
    Absent(Kind),
}

#[derive(Debug, Default)]
struct KindState {
    objects: BTreeMap<ObjectKey, SourceObject>,
    /// The set being relisted; replaces `objects` when the list is complete.
    relist: Option<BTreeMap<ObjectKey, SourceObject>>,
    synced: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchErrorLabels {
    kind: String,
    /// `not_found`, `forbidden`, `gone`, `api`, `connection`
    reason: &'static str,
}

/// Watch failures, by kind and reason, so an RBAC gap or an API outage shows on a dashboard.
#[derive(Clone, Debug)]
struct WatchMetrics {
    errors: Family<WatchErrorLabels, Counter>,
}

impl WatchMetrics {
    fn new(registry: &mut Registry) -> Self {
        let errors = Family::<WatchErrorLabels, Counter>::default();
        registry.register(
            "mesh_config_watch_errors",
            "Errors listing or watching the Kubernetes API, by kind and reason; the last good state stays",
            errors.clone(),
        );
        Self { errors }
    }
}

/// The Kubernetes source. Build it, then spawn [`run`](Self::run).
pub struct KubeSource {
    config: KubeSourceConfig,
    client: ::kube::Client,
    translator: Translator,
    metrics: ConfigMetrics,
    warnings: WarningLog,
    watch_metrics: WatchMetrics,
}

impl fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeSource")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    pub fn new(config: KubeSourceConfig, client: ::kube::Client, registry: &mut Registry) -> Self {
        let translator = Translator::new(config.translate.clone());
        Self {
            config,
            client,
            translator,
            metrics: ConfigMetrics::new(registry),
            warnings: WarningLog::default(),
            watch_metrics: WatchMetrics::new(registry),
        }
    }

    /// Watches until `shutdown`, publishing to `store` once every kind has listed and after
    /// every batch of changes from then on.
    pub async fn run(mut self, store: StoreWriter, shutdown: CancellationToken) {
        let (tx, mut rx) = mpsc::channel(UPDATE_QUEUE);
        let mut watchers = JoinSet::new();
        let mut kinds: BTreeMap<Kind, KindState> = BTreeMap::new();
        for kind in self.config.kinds.iter().copied() {
            if kinds.insert(kind, KindState::default()).is_some() {
                continue;
            }
            let mut resource = Resource::of(kind);
            resource.namespace = self.config.namespaced.get(&kind).cloned();
            watchers.spawn(watch_kind(
                self.client.clone(),
                resource,
                self.config.absent_recheck,
                self.watch_metrics.clone(),
                tx.clone(),
                shutdown.clone(),
            ));
        }
        drop(tx);
        info!(kinds = ?kinds.keys().collect::<Vec<_>>(), "watching the Kubernetes API");

        let mut published = false;
        let mut due: Option<Instant> = None;
        let mut reported: BTreeMap<ObjectKey, String> = BTreeMap::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                update = rx.recv() => {
                    let Some(update) = update else { break };
                    let mut changed = apply(&mut kinds, update);
                    // Take whatever else is queued before deciding: a relist arrives as a burst.
                    while let Ok(update) = rx.try_recv() {
                        changed |= apply(&mut kinds, update);
                    }
                    let synced = kinds.values().all(|k| k.synced);
                    if !published && synced {
                        let total: usize = kinds.values().map(|k| k.objects.len()).sum();
                        info!(objects = total, "initial list of every kind complete");
                        self.publish(&kinds, &store, &mut reported);
                        published = true;
                    } else if published && changed && due.is_none() {
                        due = Some(Instant::now() + self.config.batch_delay);
                    }
                }
                _ = sleep_until(due), if due.is_some() => {
                    due = None;
                    self.publish(&kinds, &store, &mut reported);
                }
            }
        }
        watchers.shutdown().await;
    }

    fn publish(
        &mut self,
        kinds: &BTreeMap<Kind, KindState>,
        store: &StoreWriter,
        reported: &mut BTreeMap<ObjectKey, String>,
    ) {
        let objects = kinds
            .values()
            .flat_map(|k| k.objects.values().cloned())
            .collect::<Vec<_>>();
        let translation = self.translator.translate(objects);
        // A bad object stays bad on every translation until it changes: report it once.
        let mut now = BTreeMap::new();
        for rejection in &translation.rejections {
            let key = rejection.error.object().clone();
            let message = rejection.error.to_string();
            if reported.get(&key) != Some(&message) {
                if rejection.kept_last_good {
                    warn!("{message}; keeping its last good version");
                } else {
                    warn!("{message}");
                }
                self.metrics.rejected(key.kind.label());
            }
            now.insert(key, message);
        }
        for key in reported.keys() {
            if !now.contains_key(key) {
                info!(object = %key, "no longer rejected");
            }
        }
        *reported = now;
        self.metrics.set_in_force(&translation.in_force);
        self.warnings
            .report(&self.metrics, &translation.state.warnings);
        self.metrics.reload(if translation.rejections.is_empty() {
            ReloadResult::Success
        } else {
            ReloadResult::Partial
        });
        let objects: usize = translation.in_force.values().sum();
        let rejected = translation.rejections.len();
        let version = store.apply(translation.state);
        debug!(
            objects,
            rejected, version, "configuration from the Kubernetes API applied"
        );
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// Applies one update to the object sets; true when the set in force changed.
fn apply(kinds: &mut BTreeMap<Kind, KindState>, update: Update) -> bool {
    match update {
        Update::Relisting(kind) => {
            if let Some(state) = kinds.get_mut(&kind) {
                state.relist = Some(BTreeMap::new());
            }
            false
        }
        Update::Listed(key, object) => {
            let Some(state) = kinds.get_mut(&key.kind) else {
                return false;
            };
            state.relist.get_or_insert_default().insert(key, object);
            false
        }
        Update::ListDone(kind) => {
            let Some(state) = kinds.get_mut(&kind) else {
                return false;
            };
            let listed = state.relist.take().unwrap_or_default();
            let changed = listed != state.objects;
            state.objects = listed;
            state.synced = true;
            changed
        }
        Update::Applied(key, object) => {
            let Some(state) = kinds.get_mut(&key.kind) else {
                return false;
            };
            if state.objects.get(&key) == Some(&object) {
                return false;
            }
            state.objects.insert(key, object);
            true
        }
        Update::Deleted(key) => kinds
            .get_mut(&key.kind)
            .is_some_and(|state| state.objects.remove(&key).is_some()),
        Update::Absent(kind) => {
            let Some(state) = kinds.get_mut(&kind) else {
                return false;
            };
            state.relist = None;
            let changed = !state.objects.is_empty();
            state.objects.clear();
            state.synced = true;
            changed
        }
    }
}

/// Why a list or watch failed, for logs and the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    NotFound,
    Forbidden { verb: &'static str, message: String },
    Gone,
    Api { code: u16, message: String },
    Connection(String),
}

impl Failure {
    fn classify(error: &watcher::Error) -> Self {
        let (verb, client_error) = match error {
            watcher::Error::InitialListFailed(e) => ("list", Some(e)),
            watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
                ("watch", Some(e))
            }
            watcher::Error::WatchError(status) => {
                return match status.code {
                    410 => Failure::Gone,
                    403 => Failure::Forbidden {
                        verb: "watch",
                        message: status.message.clone(),
                    },
                    404 => Failure::NotFound,
                    code => Failure::Api {
                        code,
                        message: status.message.clone(),
                    },
                };
            }
            watcher::Error::NoResourceVersion => ("list", None),
        };
        match client_error {
            Some(::kube::Error::Api(status)) => match status.code {
                404 => Failure::NotFound,
                403 => Failure::Forbidden {
                    verb,
                    message: status.message.clone(),
                },
                410 => Failure::Gone,
                code => Failure::Api {
                    code,
                    message: status.message.clone(),
                },
            },
            Some(other) => Failure::Connection(other.to_string()),
            None => Failure::Api {
                code: 0,
                message: error.to_string(),
            },
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Failure::NotFound => "not_found",
            Failure::Forbidden { .. } => "forbidden",
            Failure::Gone => "gone",
            Failure::Api { .. } => "api",
            Failure::Connection(_) => "connection",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NotFound => f.write_str("not found (404)"),
            Failure::Forbidden { verb, message } => write!(f, "forbidden to {verb}: {message}"),
            Failure::Gone => f.write_str("resource version expired (410 Gone); relisting"),
            Failure::Api { code, message } => write!(f, "API server answered {code}: {message}"),
            Failure::Connection(message) => write!(f, "{message}"),
        }
    }
}

/// How a [`Streak`] names its watch in log lines.
#[derive(Debug, Clone)]
pub(crate) struct WatchSubject {
    /// As logged: `pods`, `virtualservices.networking.istio.io`.
    pub(crate) resource: String,
    pub(crate) plural: String,
    pub(crate) group: String,
    /// Who lacks a permission ("this service account").
    pub(crate) account: &'static str,
    /// The verbs to grant on a 403.
    pub(crate) verbs: &'static str,
    /// What an operator loses while the watch fails.
    pub(crate) consequence: &'static str,
}

/// Logs a failure the first time it happens in a streak (and when it changes), not on every
/// retry, and says when the streak ends.
#[derive(Debug)]
pub(crate) struct Streak {
    subject: WatchSubject,
    last: Option<Failure>,
}

impl Streak {
    pub(crate) fn new(subject: WatchSubject) -> Self {
        Self {
            subject,
            last: None,
        }
    }

    /// Records one watcher event.
    pub(crate) fn record<K>(&mut self, event: &Result<Event<K>, watcher::Error>) {
        match event {
            Ok(_) => self.succeeded(),
            Err(error) => self.failed(&Failure::classify(error)),
        }
    }

    pub(crate) fn failed(&mut self, failure: &Failure) {
        let subject = &self.subject;
        let resource = subject.resource.as_str();
        if self.last.as_ref() == Some(failure) {
            debug!(resource, %failure, "still failing; retrying");
            return;
        }
        match failure {
            Failure::Forbidden { verb, message } => warn!(
                resource,
                "RBAC: {} may not {verb} {resource} cluster-wide: grant the verbs {} on \
                 resource {:?} in API group {:?} to its ClusterRole; {} ({message})",
                subject.account,
                subject.verbs,
                subject.plural,
                subject.group,
                subject.consequence,
            ),
            Failure::Gone => debug!(resource, "watch expired (410 Gone); relisting"),
            other => warn!(
                resource,
                failure = %other,
                "listing/watching {resource} failed; retrying with back-off; {}",
                subject.consequence
            ),
        }
        self.last = Some(failure.clone());
    }

    pub(crate) fn succeeded(&mut self) {
        if let Some(last) = self.last.take()
            && last != Failure::Gone
        {
            info!(resource = self.subject.resource, "watch recovered");
        }
    }

    /// Forgets the streak without logging (the resource turned out not to be served).
    fn reset(&mut self) {
        self.last = None;
    }
}

/// Lists and watches one kind until `shutdown`, sending what it sees.
async fn watch_kind(
    client: ::kube::Client,
    resource: Resource,
    absent_recheck: Duration,
    metrics: WatchMetrics,
    tx: mpsc::Sender<Update>,
    shutdown: CancellationToken,
) {
    let kind = resource.kind;
    let config = watcher::Config::default()
        .page_size(PAGE_SIZE)
        .any_semantic();
    let mut backoff = DefaultBackoff::default();
    let mut streak = Streak::new(WatchSubject {
        resource: resource.qualified(),
        plural: resource.plural.clone(),
        group: resource.group().to_owned(),
        account: "this service account",
        verbs: "get, list and watch",
        consequence: "the last good state stays until then",
    });
    let mut version = 0;
    // Logged once: the CRD being absent is a fact, not an error to repeat every minute.
    let mut absent_reported = false;
    'versions: loop {
        let api_resource = resource.api_resource(version);
        let api: Api<DynamicObject> = match &resource.namespace {
            Some(namespace) => Api::namespaced_with(client.clone(), namespace, &api_resource),
            None => Api::all_with(client.clone(), &api_resource),
        };
        let mut events = watcher::watcher(api, config.clone()).boxed();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = events.next() => next,
            };
            let Some(next) = next else {
                continue 'versions;
            };
            let event = match next {
                Ok(event) => event,
                Err(error) => {
                    let failure = Failure::classify(&error);
                    metrics
                        .errors
                        .get_or_create(&WatchErrorLabels {
                            kind: kind.label().to_owned(),
                            reason: failure.reason(),
                        })
                        .inc();
                    // 404: this version is not served, or the CRD is not (or no longer)
                    // installed. Retrying the same request would fail forever.
                    if failure == Failure::NotFound {
                        if version + 1 < resource.versions.len() {
                            debug!(
                                resource = resource.qualified(),
                                api_version = api_resource.api_version,
                                "version not served; trying the next"
                            );
                            version += 1;
                            continue 'versions;
                        }
                        if !absent_reported {
                            let what = if resource.is_custom() {
                                "CRD"
                            } else {
                                "resource"
                            };
                            warn!(
                                "{what} {} not installed: {} are not read (looked for {}; \
                                 checked again every {}s)",
                                resource.qualified(),
                                plural(kind.as_str()),
                                resource
                                    .versions
                                    .iter()
                                    .map(|(g, v)| format!("{g}/{v}"))
                                    .collect::<Vec<_>>()
                                    .join(", "),
                                absent_recheck.as_secs()
                            );
                            absent_reported = true;
                        }
                        streak.reset();
                        if tx.send(Update::Absent(kind)).await.is_err() {
                            return;
                        }
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(absent_recheck) => {}
                        }
                        version = 0;
                        continue 'versions;
                    }
                    streak.failed(&failure);
                    if failure == Failure::Gone {
                        // The watcher relists at once; that is not a failure to back off from.
                        continue;
                    }
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            };
            streak.succeeded();
            backoff.reset();
            let update = match event {
                Event::Init => Update::Relisting(kind),
                Event::InitApply(object) => {
                    let (key, object) = source_object(&resource, &api_resource, object);
                    Update::Listed(key, object)
                }
                Event::InitDone => {
                    if absent_reported {
                        info!(resource = resource.qualified(), "now installed; reading it");
                        absent_reported = false;
                    }
                    Update::ListDone(kind)
                }
                Event::Apply(object) => {
                    let (key, object) = source_object(&resource, &api_resource, object);
                    Update::Applied(key, object)
                }
                Event::Delete(object) => {
                    let (key, _) = source_object(&resource, &api_resource, object);
                    Update::Deleted(key)
                }
            };
            if tx.send(update).await.is_err() {
                return;
            }
        }
    }
}

/// Turns what the API server sent into the translation's input: the key, and the trimmed
/// object parsed (or the reason it cannot be).
fn source_object(
    resource: &Resource,
    api_resource: &ApiResource,
    object: DynamicObject,
) -> (ObjectKey, SourceObject) {
    let kind = resource.kind;
    let key = ObjectKey::new(
        kind,
        object.metadata.namespace.as_deref(),
        object.metadata.name.as_deref().unwrap_or_default(),
    );
    let mut value = match object.data {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    // List items of built-in kinds carry no apiVersion/kind; the request says what they are.
    value.insert(
        "apiVersion".to_owned(),
        Value::String(api_resource.api_version.clone()),
    );
    value.insert("kind".to_owned(), Value::String(kind.as_str().to_owned()));
    value.insert(
        "metadata".to_owned(),
        trimmed_metadata(kind, &object.metadata),
    );
    let mut value = Value::Object(value);
    trim(kind, &mut value);
    let parsed = Object::from_value(&key, value);
    (key, parsed)
}

/// The metadata the translation reads: name, namespace, labels, creation time (route
/// precedence) and, for pods, the controller owner (the workload name in metrics).
fn trimmed_metadata(
    kind: Kind,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Value {
    let mut out = Map::new();
    let mut put = |field: &str, value: Option<Value>| {
        if let Some(value) = value {
            out.insert(field.to_owned(), value);
        }
    };
    put("name", meta.name.clone().map(Value::String));
    put("namespace", meta.namespace.clone().map(Value::String));
    put(
        "labels",
        meta.labels
            .as_ref()
            .and_then(|labels| serde_json::to_value(labels).ok()),
    );
    put(
        "creationTimestamp",
        meta.creation_timestamp
            .as_ref()
            .and_then(|t| serde_json::to_value(t).ok()),
    );
    if kind == Kind::Pod {
        let owners = meta.owner_references.as_deref().unwrap_or_default();
        let owner = owners
            .iter()
            .find(|o| o.controller == Some(true))
            .or_else(|| owners.first());
        put(
            "ownerReferences",
            owner.and_then(|o| serde_json::to_value([o]).ok()),
        );
    }
    Value::Object(out)
}

/// Cuts an object down to what the translation reads (see the module docs); metadata is
/// already trimmed by [`source_object`].
fn trim(kind: Kind, value: &mut Value) {
    let Some(object) = value.as_object_mut() else {
        return;
    };
    match kind {
        Kind::Pod => {
            if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
                spec.retain(|field, _| {
                    matches!(
                        field.as_str(),
                        "nodeName"
                            | "serviceAccountName"
                            | "serviceAccount"
                            | "hostNetwork"
                            | "containers"
                    )
                });
                if let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) {
                    for container in containers.iter_mut().filter_map(Value::as_object_mut) {
                        container.retain(|field, _| field == "name" || field == "ports");
                    }
                }
            }
            if let Some(status) = object.get_mut("status").and_then(Value::as_object_mut) {
                status.retain(|field, _| matches!(field.as_str(), "phase" | "podIP" | "podIPs"));
            }
        }
        Kind::Namespace => {
            object.remove("spec");
            object.remove("status");
        }
        _ => {
            object.remove("status");
        }
    }
}

/// The resources a proxy watching `kinds` needs RBAC for, `(API group, resource)`: what the
/// manifests' ClusterRole must grant `get`, `list` and `watch` on.
pub fn required_resources(kinds: &[Kind]) -> BTreeSet<(String, String)> {
    kinds
        .iter()
        .map(|kind| {
            let resource = Resource::of(*kind);
            (resource.group().to_owned(), resource.plural.clone())
        })
        .collect()
}

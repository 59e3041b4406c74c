//! The CA's root certificate in every namespace, as istiod publishes `istio-ca-root-cert`: a
//! ConfigMap (default `mesh-ca-root-cert`, key `root-cert.pem`) that ztunnel and the waypoints
//! mount to trust the CA and each other.
//!
//! A small controller on kube-rs' runtime: reflectors of the Namespaces and of the ConfigMaps
//! with that name (field-selected, so one made by hand or stripped of its label is seen too)
//! trigger a reconcile of a namespace when it appears or changes and when its ConfigMap is
//! added, edited or deleted. A reconcile compares the cached ConfigMap with the desired one
//! (the root PEM under `root-cert.pem`, the label `app.kubernetes.io/managed-by: mesh-ca`) and,
//! when it is missing or differs, writes it with server-side apply (field manager `mesh-ca`,
//! forced): one idempotent request whether it creates, restores or re-labels, harmless when
//! several CA replicas do it at once, and other keys someone added are left alone. Namespaces
//! being deleted are skipped (the API server refuses new objects in them anyway).
//!
//! Failures never stop it: the watches back off with kube's default (0.8 s doubling to 30 s,
//! jittered) and a failed write is retried for that namespace with its own back-off; every
//! failure is logged with the namespace and what to check, a 403 with the verb to grant.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::kube::api::{Api, Patch, PatchParams};
use ::kube::runtime::controller::{self, Action};
use ::kube::runtime::reflector::{self, ObjectRef, Store};
use ::kube::runtime::{WatchStreamExt, watcher};
use futures::{StreamExt, future, stream};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::discovery::kube::{Streak, WatchSubject};

/// The ConfigMap's default name: what the manifests mount (`CA_ROOT_CERT` points into it).
pub const DEFAULT_ROOT_CONFIGMAP: &str = "mesh-ca-root-cert";
/// The key holding the root PEM (Istio's `istio-ca-root-cert` uses the same).
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
/// The label telling the CA's ConfigMaps apart.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "mesh-ca";
/// The server-side apply field manager.
pub const FIELD_MANAGER: &str = "mesh-ca";
/// What the publisher asks of the API, `(API group, resource, verbs)`, cluster-wide: what the
/// CA's ClusterRole must grant for it. Server-side apply is a `patch`, authorized as `create`
/// too when the ConfigMap does not exist yet.
pub const REQUIRED_PERMISSIONS: [(&str, &str, &[&str]); 2] = [
    ("", "namespaces", &["list", "watch"]),
    ("", "configmaps", &["list", "watch", "create", "patch"]),
];

/// How the publisher behaves; [`RootPublisherConfig::new`] has the defaults.
#[derive(Clone)]
pub struct RootPublisherConfig {
    /// The ConfigMap's name in every namespace.
    pub name: String,
    /// The PEM clients trust: the root of the CA's chain
    /// ([`CertificateAuthority::root_pem`](super::CertificateAuthority::root_pem)).
    pub root_pem: String,
    /// First retry of a failed write to a namespace; doubles up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How long a reconcile waits for the first list of the ConfigMaps before writing without
    /// knowing whether one is there (an extra request, never a wrong result).
    pub cache_wait: Duration,
    /// Namespaces written at once (startup in a large cluster).
    pub concurrency: u16,
}

impl fmt::Debug for RootPublisherConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootPublisherConfig")
            .field("name", &self.name)
            .field("root_pem_bytes", &self.root_pem.len())
            .field("retry_min", &self.retry_min)
            .field("retry_max", &self.retry_max)
            .field("cache_wait", &self.cache_wait)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl RootPublisherConfig {
    pub fn new(name: impl Into<String>, root_pem: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            root_pem: root_pem.into(),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            cache_wait: Duration::from_secs(10),
            concurrency: 8,
        }
    }
}

/// A ConfigMap name must be a DNS subdomain (RFC 1123): lowercase letters, digits, `-` and
/// `.`, starting and ending with a letter or digit, at most 253 characters.
pub fn check_configmap_name(name: &str) -> Result<(), String> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let ends_ok = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if name.len() <= 253
        && valid_chars
        && ends_ok(name.bytes().next())
        && ends_ok(name.bytes().last())
    {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid ConfigMap name (lowercase letters, digits, '-' and '.', \
             starting and ending with a letter or digit, at most 253 characters)"
        ))
    }
}

/// Why the root could not be written to a namespace.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "ConfigMap {namespace}/{name}: forbidden: the CA's service account may not {verb} \
         configmaps; grant it (ClusterRole rule: verbs [{verb}] on configmaps, API group \"\") \
         ({message})"
    )]
    Forbidden {
        namespace: String,
        name: String,
        verb: String,
        message: String,
    },
    #[error("ConfigMap {namespace}/{name}: the API server answered {code}: {message}")]
    Api {
        namespace: String,
        name: String,
        code: u16,
        message: String,
    },
    #[error("ConfigMap {namespace}/{name}: {source} (is the API server reachable from the CA?)")]
    Connection {
        namespace: String,
        name: String,
        #[source]
        source: ::kube::Error,
    },
}

impl PublishError {
    fn new(namespace: &str, name: &str, error: ::kube::Error) -> Self {
        let (namespace, name) = (namespace.to_owned(), name.to_owned());
        match error {
            ::kube::Error::Api(status) if status.code == 403 => Self::Forbidden {
                namespace,
                name,
                verb: forbidden_verb(&status.message),
                message: status.message,
            },
            ::kube::Error::Api(status) => Self::Api {
                namespace,
                name,
                code: status.code,
                message: status.message,
            },
            source => Self::Connection {
                namespace,
                name,
                source,
            },
        }
    }
}

/// The verb a 403 names (`... cannot patch resource "configmaps" ...`); an apply may need
/// either.
fn forbidden_verb(message: &str) -> String {
    message
        .split_once("cannot ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .filter(|verb| matches!(*verb, "create" | "patch"))
        .map_or_else(|| "create and patch".to_owned(), str::to_owned)
}

/// The publisher. Build it, then spawn [`run`](Self::run).
pub struct RootPublisher {
    client: ::kube::Client,
    config: RootPublisherConfig,
}

impl fmt::Debug for RootPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootPublisher")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What every reconcile shares.
struct Context {
    client: ::kube::Client,
    config: RootPublisherConfig,
    configmaps: Store<ConfigMap>,
    /// Consecutive failed writes per namespace, for the retry back-off.
    failures: Mutex<HashMap<String, u32>>,
}

/// Why a write is made, for the log.
#[derive(Debug, Clone, Copy)]
enum Write {
    Missing,
    Changed,
    Unknown,
}

impl RootPublisher {
    pub fn new(client: ::kube::Client, config: RootPublisherConfig) -> Self {
        Self { client, config }
    }

    /// Keeps the ConfigMap in every namespace until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let (namespaces, namespace_writer) = reflector::store::<Namespace>();
        let (configmaps, configmap_writer) = reflector::store::<ConfigMap>();
        let name = self.config.name.clone();
        let config = watcher::Config::default().any_semantic();

        let mut namespace_health = Streak::new(watch_subject(
            "namespaces",
            "no namespace gets the root until it is listed",
        ));
        let namespace_triggers =
            watcher(Api::<Namespace>::all(self.client.clone()), config.clone())
                .default_backoff()
                .modify(|ns| {
                    // Only the name and whether it is being deleted are read.
                    ns.metadata.annotations = None;
                    ns.metadata.labels = None;
                    ns.metadata.managed_fields = None;
                    ns.spec = None;
                })
                .reflect(namespace_writer)
                .inspect(move |event| namespace_health.record(event))
                .applied_objects()
                .filter_map(|ns| {
                    future::ready(
                        ns.ok()
                            .map(|ns| Ok::<_, Infallible>(ObjectRef::from_obj(&ns))),
                    )
                });

        let mut configmap_health = Streak::new(watch_subject(
            "configmaps",
            "deleted or edited root ConfigMaps are not restored until then",
        ));
        let configmap_triggers = watcher(
            Api::<ConfigMap>::all(self.client.clone()),
            config.fields(&format!("metadata.name={name}")),
        )
        .default_backoff()
        .modify(|cm| {
            cm.metadata.annotations = None;
            cm.metadata.managed_fields = None;
        })
        .reflect(configmap_writer)
        .inspect(move |event| configmap_health.record(event))
        .touched_objects()
        .filter_map(|cm| {
            future::ready(
                cm.ok()
                    .and_then(|cm| cm.metadata.namespace)
                    .map(|namespace| Ok::<_, Infallible>(ObjectRef::new(&namespace))),
            )
        });

        let concurrency = self.config.concurrency;
        let context = Arc::new(Context {
            client: self.client,
            config: self.config,
            configmaps,
            failures: Mutex::new(HashMap::new()),
        });
        info!(
            configmap = name,
            key = ROOT_CERT_KEY,
            "publishing the CA root to every namespace"
        );
        controller::applier(
            |ns, ctx| Box::pin(reconcile(ns, ctx)),
            error_policy,
            context,
            namespaces,
            stream::select(namespace_triggers, configmap_triggers),
            controller::Config::default().concurrency(concurrency),
        )
        .take_until(shutdown.cancelled_owned())
        .for_each(|result| {
            match result {
                Ok(_) => {}
                // Logged by `error_policy`, with the retry.
                Err(controller::Error::ReconcilerFailed(..)) => {}
                // A ConfigMap in a namespace that is gone (or not listed yet).
                Err(controller::Error::ObjectNotFound(object)) => {
                    debug!(%object, "namespace not (or no longer) known; nothing to publish");
                }
                Err(other) => warn!(error = %other, "root publisher"),
            }
            future::ready(())
        })
        .await;
        debug!("root publisher stopped");
    }
}

impl Context {
    fn desired(&self, namespace: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.config.name.clone()),
                namespace: Some(namespace.to_owned()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_owned(),
                    MANAGED_BY.to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                ROOT_CERT_KEY.to_owned(),
                self.config.root_pem.clone(),
            )])),
            ..ConfigMap::default()
        }
    }

    /// Holds the root and the label: the fields the CA owns (other keys are someone else's).
    fn up_to_date(&self, cm: &ConfigMap) -> bool {
        let data = cm.data.as_ref().and_then(|d| d.get(ROOT_CERT_KEY));
        let label = cm
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY_LABEL));
        data == Some(&self.config.root_pem) && label.map(String::as_str) == Some(MANAGED_BY)
    }

    /// The ConfigMap in `namespace` as last seen, `None` when the ConfigMaps have not been
    /// listed (yet).
    async fn observed(&self, namespace: &str) -> Option<Option<Arc<ConfigMap>>> {
        let listed =
            tokio::time::timeout(self.config.cache_wait, self.configmaps.wait_until_ready())
                .await
                .is_ok_and(|ready| ready.is_ok());
        listed.then(|| {
            self.configmaps
                .get(&ObjectRef::new(&self.config.name).within(namespace))
        })
    }

    /// Forgets `namespace`'s failures; returns how many there were.
    fn succeeded(&self, namespace: &str) -> u32 {
        match self.failures.lock() {
            Ok(mut failures) => failures.remove(namespace).unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// The next retry for `namespace`: `retry_min` doubling per failure up to `retry_max`,
    /// then between half and all of it, so namespaces failing together spread their retries.
    fn retry_delay(&self, namespace: &str) -> Duration {
        let failures = match self.failures.lock() {
            Ok(mut failures) => {
                let count = failures.entry(namespace.to_owned()).or_insert(0);
                *count = count.saturating_add(1);
                *count
            }
            Err(_) => 1,
        };
        let exponential = self
            .config
            .retry_min
            .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(20)));
        let capped = exponential.min(self.config.retry_max);
        Duration::try_from_secs_f64(capped.as_secs_f64() * (0.5 + fastrand::f64() / 2.0))
            .unwrap_or(capped)
    }
}

/// Being deleted: the API server refuses new objects in it.
fn terminating(ns: &Namespace) -> bool {
    ns.metadata.deletion_timestamp.is_some()
        || ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating")
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, PublishError> {
    let Some(namespace) = ns.metadata.name.as_deref() else {
        return Ok(Action::await_change());
    };
    let name = ctx.config.name.as_str();
    if terminating(&ns) {
        debug!(
            namespace,
            "namespace is being deleted; not publishing the CA root"
        );
        ctx.succeeded(namespace);
        return Ok(Action::await_change());
    }
    let why = match ctx.observed(namespace).await {
        Some(Some(cm)) if ctx.up_to_date(&cm) => {
            ctx.succeeded(namespace);
            return Ok(Action::await_change());
        }
        Some(Some(_)) => Write::Changed,
        Some(None) => Write::Missing,
        None => Write::Unknown,
    };
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api
        .patch(name, &params, &Patch::Apply(ctx.desired(namespace)))
        .await
    {
        Ok(_) => {
            let failed = ctx.succeeded(namespace);
            match why {
                Write::Missing => info!(namespace, configmap = name, "published the CA root"),
                Write::Changed => info!(
                    namespace,
                    configmap = name,
                    "restored the CA root ConfigMap (its root or label had been changed)"
                ),
                // After failures were logged, their end is logged too.
                Write::Unknown if failed > 0 => info!(
                    namespace,
                    configmap = name,
                    failed,
                    "published the CA root after {failed} failed attempt(s)"
                ),
                Write::Unknown => debug!(namespace, configmap = name, "applied the CA root"),
            }
            Ok(Action::await_change())
        }
        // Deleted since it was seen: nothing to publish to.
        Err(::kube::Error::Api(status))
            if status.code == 404
                || (status.code == 403 && status.message.contains("being terminated")) =>
        {
            debug!(namespace, reason = %status.message, "namespace gone or being deleted; not publishing");
            ctx.succeeded(namespace);
            Ok(Action::await_change())
        }
        Err(error) => Err(PublishError::new(namespace, name, error)),
    }
}

fn error_policy(ns: Arc<Namespace>, error: &PublishError, ctx: Arc<Context>) -> Action {
    let namespace = ns.metadata.name.as_deref().unwrap_or_default();
    let delay = ctx.retry_delay(namespace);
    // Whole milliseconds: "retrying in 1.234s", not nanoseconds.
    let shown = Duration::from_millis(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
    warn!(
        namespace,
        "publishing the CA root failed: {error}; retrying in {shown:?}"
    );
    Action::requeue(delay)
}

/// The log identity of one of the publisher's watches (core API group).
fn watch_subject(plural: &str, consequence: &'static str) -> WatchSubject {
    WatchSubject {
        resource: plural.to_owned(),
        plural: plural.to_owned(),
        group: String::new(),
        account: "the CA's service account",
        verbs: "list and watch",
        consequence,
    }
}

#[cfg(test)]
mod tests;

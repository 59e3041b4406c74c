//! The CA in a cluster: who is asking (the Kubernetes TokenReview API) and what they may have
//! (Istio's rules for ambient mode), plus the CA's key kept in a Secret.
//!
//! **Authentication.** The caller's bearer token is sent to the API server in a TokenReview
//! with the audiences configured here (Istio's CA accepts `istio-ca`, the audience of the
//! projected token its ztunnel and sidecars mount); the answer names the service account
//! (`system:serviceaccount:<ns>:<sa>`) and, for a token bound to a pod, the pod
//! (`authentication.kubernetes.io/pod-name`, `pod-uid` in `status.user.extra`) and, since
//! Kubernetes 1.30 (ServiceAccountTokenPodNodeInfo, KEP-4193), its node (`node-name`).
//!
//! **Authorization**, as istiod's `NodeAuthorizer`:
//! - anyone may obtain its own identity `spiffe://<td>/ns/<ns>/sa/<sa>` (a waypoint, a sidecar);
//! - a ztunnel (a service account listed as trusted, Istio's `CA_TRUSTED_NODE_ACCOUNTS`,
//!   default `istio-system/ztunnel`) may obtain identity `ns/N/sa/X` only while a pod of
//!   service account X in namespace N is assigned to the ztunnel's own node. The node is the
//!   token's `node-name`, or else the `spec.nodeName` of the ztunnel pod the token is bound to
//!   (looked up by `pod-name`, its UID checked against `pod-uid`, as istiod does). Pods that
//!   have terminated (Succeeded, Failed) do not count: they need no certificate any more;
//! - anything else is refused, and every refusal is logged with who asked for what and why.
//!
//! The API server is asked on every request (certificates are requested once per identity per
//! node every ~12 h, so this is cheap) with a deadline; when it cannot be reached the answer is
//! a refusal with the reason, never a grant.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ::kube::Api;
use ::kube::api::{ListParams, PostParams};
use futures::future::BoxFuture;
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::authority::{CaError, CaKeySource, generate_root};
use super::server::{AuthError, Authenticator, Caller};
use crate::identity::Identity;

/// The audience Istio's CA requires of the tokens it reviews (`istio-ca`).
pub const ISTIO_CA_AUDIENCE: &str = "istio-ca";
/// Istio's default trusted node account (`CA_TRUSTED_NODE_ACCOUNTS`).
pub const DEFAULT_ZTUNNEL_ACCOUNT: &str = "istio-system/ztunnel";
/// How long one decision may wait for the API server.
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(10);
/// `status.user.extra` keys the API server sets for a token bound to a pod.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// `namespace/name` of a service account (or of the CA's Secret).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for NamespacedName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(Self {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!(
                "{s:?} is not <namespace>/<name>, e.g. {DEFAULT_ZTUNNEL_ACCOUNT}"
            )),
        }
    }
}

/// How the authenticator decides.
#[derive(Debug, Clone)]
pub struct KubeAuthConfig {
    /// The CA's trust domain: identities of other trust domains are never granted.
    pub trust_domain: String,
    /// Audiences the token must be valid for (any of them).
    pub audiences: Vec<String>,
    /// Node proxies that may obtain the identities of pods on their node.
    pub ztunnel_accounts: Vec<NamespacedName>,
    pub api_timeout: Duration,
}

impl KubeAuthConfig {
    /// Istio's defaults: audience `istio-ca`, trusted node account `istio-system/ztunnel`.
    pub fn new(trust_domain: impl Into<String>) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            audiences: vec![ISTIO_CA_AUDIENCE.to_owned()],
            ztunnel_accounts: vec![NamespacedName {
                namespace: "istio-system".to_owned(),
                name: "ztunnel".to_owned(),
            }],
            api_timeout: DEFAULT_API_TIMEOUT,
        }
    }
}

/// Authenticates callers with TokenReview and authorizes them as istiod does for ambient.
pub struct KubeAuthenticator {
    client: ::kube::Client,
    config: KubeAuthConfig,
}

impl fmt::Debug for KubeAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeAuthenticator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Who the API server says the caller is.
#[derive(Debug, Clone)]
struct Reviewed {
    account: NamespacedName,
    extra: BTreeMap<String, Vec<String>>,
}

impl Reviewed {
    fn extra(&self, key: &str) -> Option<&str> {
        self.extra
            .get(key)
            .and_then(|values| values.first())
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

impl fmt::Display for Reviewed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "service account {}", self.account)?;
        if let Some(pod) = self.extra(EXTRA_POD_NAME) {
            write!(f, " (pod {}/{pod}", self.account.namespace)?;
            if let Some(node) = self.extra(EXTRA_NODE_NAME) {
                write!(f, " on node {node}")?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// A refusal, with the caller when known (for the log).
struct Refusal {
    caller: Option<Reviewed>,
    error: AuthError,
}

impl Refusal {
    fn unauthenticated(why: impl Into<String>) -> Self {
        Self {
            caller: None,
            error: AuthError::Unauthenticated(why.into()),
        }
    }

    fn denied(caller: &Reviewed, why: impl Into<String>) -> Self {
        Self {
            caller: Some(caller.clone()),
            error: AuthError::PermissionDenied(why.into()),
        }
    }
}

impl KubeAuthenticator {
    pub fn new(client: ::kube::Client, config: KubeAuthConfig) -> Self {
        Self { client, config }
    }

    async fn decide(&self, caller: &Caller, requested: &Identity) -> Result<Reviewed, Refusal> {
        let token = caller
            .bearer_token
            .as_deref()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Refusal::unauthenticated(
                    "no bearer token: send the pod's projected service account token (audience \
                 istio-ca) in `authorization: Bearer`",
                )
            })?;
        let reviewed = self.review(token).await?;
        let own = Identity::new(
            &self.config.trust_domain,
            &reviewed.account.namespace,
            &reviewed.account.name,
        )
        .map_err(|e| Refusal::denied(&reviewed, format!("no valid identity: {e}")))?;
        if requested == &own {
            return Ok(reviewed);
        }
        if !self.config.ztunnel_accounts.contains(&reviewed.account) {
            return Err(Refusal::denied(
                &reviewed,
                format!(
                    "{} may only obtain its own identity {own}, not {requested} (only the \
                     trusted node proxies {} may ask on a pod's behalf)",
                    reviewed.account,
                    self.trusted_list()
                ),
            ));
        }
        if requested.trust_domain() != self.config.trust_domain {
            return Err(Refusal::denied(
                &reviewed,
                format!(
                    "{requested} is not in this CA's trust domain {:?}",
                    self.config.trust_domain
                ),
            ));
        }
        let node = self.caller_node(&reviewed).await?;
        self.check_pod_on_node(&reviewed, requested, &node).await?;
        Ok(reviewed)
    }

    fn trusted_list(&self) -> String {
        self.config
            .ztunnel_accounts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }

    async fn review(&self, token: &str) -> Result<Reviewed, Refusal> {
        let request = TokenReview {
            metadata: ObjectMeta::default(),
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: (!self.config.audiences.is_empty())
                    .then(|| self.config.audiences.clone()),
            },
            status: None,
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &request)
            .await
            .map_err(|e| {
                Refusal::unauthenticated(format!(
                    "cannot verify the token: TokenReview failed: {}",
                    api_error_hint(&e, "create", "tokenreviews.authentication.k8s.io")
                ))
            })?;
        let status = answer.status.unwrap_or_else(TokenReviewStatus::default);
        if status.authenticated != Some(true) {
            return Err(Refusal::unauthenticated(format!(
                "the API server rejected the token: {}",
                status
                    .error
                    .as_deref()
                    .filter(|e| !e.is_empty())
                    .unwrap_or("not authenticated")
            )));
        }
        // An API server that ignores audiences would confirm none; the token could then be
        // one minted for another service.
        let confirmed = status.audiences.unwrap_or_default();
        if !self.config.audiences.is_empty()
            && !confirmed.iter().any(|a| self.config.audiences.contains(a))
        {
            return Err(Refusal::unauthenticated(format!(
                "the API server did not confirm the token is for audience {:?} (confirmed: \
                 {confirmed:?})",
                self.config.audiences
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let account = username
            .strip_prefix(SERVICE_ACCOUNT_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
            .map(|(namespace, name)| NamespacedName {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
            .ok_or_else(|| {
                Refusal::unauthenticated(format!(
                    "{username:?} is not a service account: only workloads' service account \
                     tokens are accepted"
                ))
            })?;
        Ok(Reviewed {
            account,
            extra: user.extra.unwrap_or_default(),
        })
    }

    /// The node of the ztunnel pod the token is bound to.
    async fn caller_node(&self, reviewed: &Reviewed) -> Result<String, Refusal> {
        if let Some(node) = reviewed.extra(EXTRA_NODE_NAME) {
            return Ok(node.to_owned());
        }
        let Some(pod_name) = reviewed.extra(EXTRA_POD_NAME) else {
            return Err(Refusal::denied(
                reviewed,
                "the token is not bound to a pod (no authentication.kubernetes.io/pod-name), so \
                 its node is unknown: give ztunnel a projected service account token",
            ));
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &reviewed.account.namespace);
        let pod = pods
            .get_opt(pod_name)
            .await
            .map_err(|e| {
                Refusal::denied(
                    reviewed,
                    format!(
                        "cannot look up the caller's pod {}/{pod_name}: {}",
                        reviewed.account.namespace,
                        api_error_hint(&e, "get", "pods")
                    ),
                )
            })?
            .ok_or_else(|| {
                Refusal::denied(
                    reviewed,
                    format!(
                        "the caller's pod {}/{pod_name} does not exist",
                        reviewed.account.namespace
                    ),
                )
            })?;
        if let Some(uid) = reviewed.extra(EXTRA_POD_UID)
            && pod.metadata.uid.as_deref() != Some(uid)
        {
            // A pod re-created under the same name: the client retries with a fresh token.
            return Err(Refusal::denied(
                reviewed,
                format!(
                    "pod {}/{pod_name} has UID {:?}, the token names {uid:?}",
                    reviewed.account.namespace, pod.metadata.uid
                ),
            ));
        }
        let spec = pod.spec.unwrap_or_default();
        if spec.service_account_name.as_deref() != Some(reviewed.account.name.as_str()) {
            return Err(Refusal::denied(
                reviewed,
                format!(
                    "pod {}/{pod_name} runs as service account {:?}, not {}",
                    reviewed.account.namespace, spec.service_account_name, reviewed.account.name
                ),
            ));
        }
        spec.node_name.filter(|n| !n.is_empty()).ok_or_else(|| {
            Refusal::denied(
                reviewed,
                format!(
                    "the caller's pod {}/{pod_name} is not scheduled on a node",
                    reviewed.account.namespace
                ),
            )
        })
    }

    /// A pod of `requested`'s service account is assigned to `node` and has not terminated.
    async fn check_pod_on_node(
        &self,
        reviewed: &Reviewed,
        requested: &Identity,
        node: &str,
    ) -> Result<(), Refusal> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), requested.namespace());
        let selector = format!(
            "spec.nodeName={node},spec.serviceAccountName={},status.phase!=Succeeded,\
             status.phase!=Failed",
            requested.service_account()
        );
        let list = pods
            .list(&ListParams::default().fields(&selector).limit(10))
            .await
            .map_err(|e| {
                Refusal::denied(
                    reviewed,
                    format!(
                        "cannot list the pods of node {node}: {}",
                        api_error_hint(&e, "list", "pods")
                    ),
                )
            })?;
        let running = list.items.iter().any(|pod| {
            let spec = pod.spec.as_ref();
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            spec.and_then(|s| s.node_name.as_deref()) == Some(node)
                && spec.and_then(|s| s.service_account_name.as_deref())
                    == Some(requested.service_account())
                && !matches!(phase, Some("Succeeded" | "Failed"))
        });
        if running {
            Ok(())
        } else {
            Err(Refusal::denied(
                reviewed,
                format!(
                    "no pod with service account {} in namespace {} runs on node {node}, the \
                     caller's node",
                    requested.service_account(),
                    requested.namespace()
                ),
            ))
        }
    }
}

impl Authenticator for KubeAuthenticator {
    fn authorize<'a>(
        &'a self,
        caller: &'a Caller,
        requested: &'a Identity,
    ) -> BoxFuture<'a, Result<(), AuthError>> {
        Box::pin(async move {
            let decision =
                match tokio::time::timeout(self.config.api_timeout, self.decide(caller, requested))
                    .await
                {
                    Ok(decision) => decision,
                    Err(_) => Err(Refusal::unauthenticated(format!(
                        "the Kubernetes API did not answer within {:?}: is it reachable from the \
                         CA?",
                        self.config.api_timeout
                    ))),
                };
            match decision {
                Ok(reviewed) => {
                    tracing::debug!(caller = %reviewed, %requested, remote = ?caller.remote_addr, "CA: authorized");
                    Ok(())
                }
                Err(refusal) => {
                    let who = refusal.caller.as_ref().map_or_else(
                        || "an unauthenticated caller".to_owned(),
                        ToString::to_string,
                    );
                    tracing::warn!(
                        caller = who,
                        %requested,
                        remote = ?caller.remote_addr,
                        reason = %refusal.error,
                        "CA: {who} asked for {requested}: refused"
                    );
                    Err(refusal.error)
                }
            }
        })
    }
}

/// An API error with what to check; a 403 names the verb and resource to grant.
fn api_error_hint(error: &::kube::Error, verb: &str, resource: &str) -> String {
    match error {
        ::kube::Error::Api(status) if status.code == 403 => format!(
            "forbidden: the CA's service account may not {verb} {resource}; grant it \
             (ClusterRole rule: verbs [{verb}] on {resource}) ({})",
            status.message
        ),
        ::kube::Error::Api(status) => {
            format!(
                "the API server answered {}: {}",
                status.code, status.message
            )
        }
        other => format!("{other} (is the API server reachable?)"),
    }
}

/// Why the CA key could not come from its Secret.
#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("CA Secret {secret}: {why}")]
    Api { secret: String, why: String },
    #[error(
        "CA Secret {secret}: key {key:?} is missing (expected ca-cert.pem and ca-key.pem, as Istio's istio-ca-secret and cacerts)"
    )]
    MissingKey { secret: String, key: &'static str },
    #[error("CA Secret {secret}: writing {path}: {source}")]
    Write {
        secret: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Generate(#[from] CaError),
}

/// Keys of the CA Secret, as Istio names them (`istio-ca-secret` for its self-signed root,
/// `cacerts` for a plugged-in one).
pub const SECRET_CERT: &str = "ca-cert.pem";
pub const SECRET_KEY: &str = "ca-key.pem";
pub const SECRET_CHAIN: &str = "cert-chain.pem";
pub const SECRET_ROOT: &str = "root-cert.pem";
/// The Secret type Istio gives its self-signed root.
const SECRET_TYPE: &str = "istio.io/ca-root";

/// Loads the CA's signing certificate and key from the Secret `namespace/name`, creating it
/// with a new root on first start, so every CA replica and restart signs with the same root.
///
/// The authority loads keys from files, so the Secret's contents are written to `dir`
/// (the key with mode 0600; an `emptyDir` in a pod) and the returned source points there. A
/// Secret the user made (Istio's `cacerts`: `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`,
/// `root-cert.pem`) is used as is; an intermediate needs `cert-chain.pem` or `root-cert.pem`.
/// Two replicas starting together cannot both create it: the loser reads the winner's.
pub async fn ca_key_from_secret(
    client: ::kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    dir: &Path,
) -> Result<CaKeySource, CaSecretError> {
    let secret_name = format!("{namespace}/{name}");
    let api_error = |e: ::kube::Error, verb: &str| CaSecretError::Api {
        secret: secret_name.clone(),
        why: api_error_hint(&e, verb, "secrets"),
    };
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let secret = match secrets
        .get_opt(name)
        .await
        .map_err(|e| api_error(e, "get"))?
    {
        Some(secret) => {
            tracing::info!(secret = secret_name, "CA key from the existing Secret");
            secret
        }
        None => {
            let (cert, key) = generate_root(trust_domain)?;
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    ..ObjectMeta::default()
                },
                type_: Some(SECRET_TYPE.to_owned()),
                data: Some(BTreeMap::from([
                    (SECRET_CERT.to_owned(), ByteString(cert.into_bytes())),
                    (SECRET_KEY.to_owned(), ByteString(key.into_bytes())),
                ])),
                ..Secret::default()
            };
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(created) => {
                    tracing::info!(
                        secret = secret_name,
                        trust_domain,
                        "generated a new CA root and stored it in the Secret"
                    );
                    created
                }
                Err(::kube::Error::Api(status)) if status.code == 409 => {
                    tracing::info!(
                        secret = secret_name,
                        "another replica created the CA Secret first; using it"
                    );
                    secrets.get(name).await.map_err(|e| api_error(e, "get"))?
                }
                Err(e) => return Err(api_error(e, "create")),
            }
        }
    };
    let data = secret.data.unwrap_or_default();
    let value = |key: &'static str| data.get(key).map(|v| v.0.as_slice());
    let cert = value(SECRET_CERT).ok_or_else(|| CaSecretError::MissingKey {
        secret: secret_name.clone(),
        key: SECRET_CERT,
    })?;
    let key = value(SECRET_KEY).ok_or_else(|| CaSecretError::MissingKey {
        secret: secret_name.clone(),
        key: SECRET_KEY,
    })?;
    let chain = value(SECRET_CHAIN).or_else(|| value(SECRET_ROOT).filter(|root| *root != cert));
    let write = |file: &str, contents: &[u8], private: bool| {
        let path = dir.join(file);
        write_file(&path, contents, private)
            .map(|()| path.clone())
            .map_err(|source| CaSecretError::Write {
                secret: secret_name.clone(),
                path,
                source,
            })
    };
    std::fs::create_dir_all(dir).map_err(|source| CaSecretError::Write {
        secret: secret_name.clone(),
        path: dir.to_owned(),
        source,
    })?;
    let cert = write(SECRET_CERT, cert, false)?;
    let key = write(SECRET_KEY, key, true)?;
    let chain = chain
        .map(|chain| write(SECRET_CHAIN, chain, false))
        .transpose()?;
    Ok(CaKeySource::Files { cert, key, chain })
}

fn write_file(path: &Path, contents: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    if private {
        // `mode` applies only to a new file; one left by an earlier start keeps its mode.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::SocketAddr;

    use serde_json::json;

    use super::*;
    use crate::discovery::kube::fake_api::{FakeApi, TokenUser};

    const ZTUNNEL_A: &str = "ztunnel-a-token";
    const ZTUNNEL_B_BY_POD: &str = "ztunnel-b-token";
    const WAYPOINT: &str = "waypoint-token";
    const WRONG_AUDIENCE: &str = "kube-api-token";

    fn token(username: &str, extra: &[(&str, &str)], audience: &str) -> TokenUser {
        TokenUser {
            username: username.to_owned(),
            audiences: vec![audience.to_owned()],
            extra: extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()]))
                .collect(),
        }
    }

    fn pod(
        namespace: &str,
        name: &str,
        uid: &str,
        sa: &str,
        node: &str,
        phase: &str,
    ) -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
            "spec": {"nodeName": node, "serviceAccountName": sa,
                     "containers": [{"name": "main", "image": "app"}]},
            "status": {"phase": phase},
        })
    }

    /// A cluster with ztunnels on node-a (a token with node-name) and node-b (an older-style
    /// bound token naming only its pod), a waypoint, and workloads on both nodes.
    async fn cluster() -> FakeApi {
        let api = FakeApi::start().await;
        api.apply(
            "",
            "pods",
            pod(
                "istio-system",
                "ztunnel-a",
                "uid-za",
                "ztunnel",
                "node-a",
                "Running",
            ),
        );
        api.apply(
            "",
            "pods",
            pod(
                "istio-system",
                "ztunnel-b",
                "uid-zb",
                "ztunnel",
                "node-b",
                "Running",
            ),
        );
        api.apply(
            "",
            "pods",
            pod("demo", "web-1", "uid-w1", "web", "node-a", "Running"),
        );
        api.apply(
            "",
            "pods",
            pod("demo", "db-1", "uid-d1", "db", "node-b", "Running"),
        );
        api.apply(
            "",
            "pods",
            pod("demo", "job-1", "uid-j1", "batch", "node-a", "Succeeded"),
        );
        api.add_token(
            ZTUNNEL_A,
            token(
                "system:serviceaccount:istio-system:ztunnel",
                &[
                    (EXTRA_POD_NAME, "ztunnel-a"),
                    (EXTRA_POD_UID, "uid-za"),
                    (EXTRA_NODE_NAME, "node-a"),
                ],
                ISTIO_CA_AUDIENCE,
            ),
        );
        api.add_token(
            ZTUNNEL_B_BY_POD,
            token(
                "system:serviceaccount:istio-system:ztunnel",
                &[(EXTRA_POD_NAME, "ztunnel-b"), (EXTRA_POD_UID, "uid-zb")],
                ISTIO_CA_AUDIENCE,
            ),
        );
        api.add_token(
            WAYPOINT,
            token(
                "system:serviceaccount:demo:waypoint",
                &[(EXTRA_POD_NAME, "waypoint-1"), (EXTRA_NODE_NAME, "node-a")],
                ISTIO_CA_AUDIENCE,
            ),
        );
        api.add_token(
            WRONG_AUDIENCE,
            token(
                "system:serviceaccount:demo:web",
                &[],
                "https://kubernetes.default.svc",
            ),
        );
        api
    }

    fn authenticator(client: ::kube::Client) -> KubeAuthenticator {
        KubeAuthenticator::new(client, KubeAuthConfig::new("cluster.local"))
    }

    fn identity(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).unwrap()
    }

    async fn ask(
        auth: &KubeAuthenticator,
        token: Option<&str>,
        requested: &Identity,
    ) -> Result<(), AuthError> {
        let caller = Caller {
            bearer_token: token.map(str::to_owned),
            remote_addr: Some("10.0.0.9:40000".parse().unwrap()),
            impersonated: Some(requested.clone()),
        };
        auth.authorize(&caller, requested).await
    }

    #[tokio::test]
    async fn tokenreview_decides_who_is_asking() {
        let api = cluster().await;
        let auth = authenticator(api.client());
        // A waypoint gets its own identity.
        ask(&auth, Some(WAYPOINT), &identity("demo", "waypoint"))
            .await
            .unwrap();
        // No token, an unknown token, a token for another audience: not authenticated.
        for (token, why) in [
            (None, "no bearer token"),
            (Some("forged"), "rejected the token: invalid bearer token"),
            (Some(WRONG_AUDIENCE), "rejected the token"),
        ] {
            match ask(&auth, token, &identity("demo", "web")).await {
                Err(AuthError::Unauthenticated(m)) => assert!(m.contains(why), "{m}"),
                other => panic!("{token:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_waypoint_may_not_obtain_another_identity() {
        let api = cluster().await;
        let auth = authenticator(api.client());
        match ask(&auth, Some(WAYPOINT), &identity("demo", "web")).await {
            Err(AuthError::PermissionDenied(m)) => {
                assert!(
                    m.contains("demo/waypoint may only obtain its own identity"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_ztunnel_gets_only_identities_of_pods_on_its_node() {
        let api = cluster().await;
        let auth = authenticator(api.client());
        // web-1 runs on node-a: granted to node-a's ztunnel.
        ask(&auth, Some(ZTUNNEL_A), &identity("demo", "web"))
            .await
            .unwrap();
        // db-1 runs on node-b: refused to node-a's ztunnel.
        match ask(&auth, Some(ZTUNNEL_A), &identity("demo", "db")).await {
            Err(AuthError::PermissionDenied(m)) => assert!(
                m.contains("no pod with service account db in namespace demo runs on node node-a"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        // The pod lookup asked only for that node and service account, live pods only.
        assert!(api.requests().iter().any(|r| r.contains(
            "fieldSelector=spec.nodeName=node-a,spec.serviceAccountName=db,status.phase!=Succeeded,status.phase!=Failed"
        )), "{:#?}", api.requests());
        // A finished Job's pod needs no certificate.
        assert!(matches!(
            ask(&auth, Some(ZTUNNEL_A), &identity("demo", "batch")).await,
            Err(AuthError::PermissionDenied(_))
        ));
        // Another trust domain is never granted.
        let foreign = Identity::new("other.domain", "demo", "web").unwrap();
        assert!(matches!(
            ask(&auth, Some(ZTUNNEL_A), &foreign).await,
            Err(AuthError::PermissionDenied(_))
        ));
        // A token without node-name: the node comes from the ztunnel's own pod.
        ask(&auth, Some(ZTUNNEL_B_BY_POD), &identity("demo", "db"))
            .await
            .unwrap();
        assert!(matches!(
            ask(&auth, Some(ZTUNNEL_B_BY_POD), &identity("demo", "web")).await,
            Err(AuthError::PermissionDenied(_))
        ));
        // Its pod re-created under the same name: the old token's UID no longer matches.
        api.apply(
            "",
            "pods",
            pod(
                "istio-system",
                "ztunnel-b",
                "uid-new",
                "ztunnel",
                "node-b",
                "Running",
            ),
        );
        match ask(&auth, Some(ZTUNNEL_B_BY_POD), &identity("demo", "db")).await {
            Err(AuthError::PermissionDenied(m)) => assert!(m.contains("has UID"), "{m}"),
            other => panic!("{other:?}"),
        }
        // An untrusted account with a node-bound token gets nothing but its own identity.
        let auth = KubeAuthenticator::new(
            api.client(),
            KubeAuthConfig {
                ztunnel_accounts: vec!["kube-system/ztunnel".parse().unwrap()],
                ..KubeAuthConfig::new("cluster.local")
            },
        );
        assert!(matches!(
            ask(&auth, Some(ZTUNNEL_A), &identity("demo", "web")).await,
            Err(AuthError::PermissionDenied(_))
        ));
    }

    #[tokio::test]
    async fn an_unreachable_or_failing_api_refuses_never_grants() {
        // Nothing listens: connection refused.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let client = |addr: SocketAddr| {
            let mut config = ::kube::Config::new(format!("http://{addr}").parse().unwrap());
            config.default_retry = false;
            ::kube::Client::try_from(config).unwrap()
        };
        let auth = authenticator(client(closed));
        match ask(&auth, Some(ZTUNNEL_A), &identity("demo", "web")).await {
            Err(AuthError::Unauthenticated(m)) => {
                assert!(
                    m.contains("cannot verify the token: TokenReview failed"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Accepts and never answers: the deadline refuses.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                held.push(stream);
            }
        });
        let auth = KubeAuthenticator::new(
            client(silent_addr),
            KubeAuthConfig {
                api_timeout: Duration::from_millis(300),
                ..KubeAuthConfig::new("cluster.local")
            },
        );
        match ask(&auth, Some(ZTUNNEL_A), &identity("demo", "web")).await {
            Err(AuthError::Unauthenticated(m)) => {
                assert!(m.contains("did not answer within"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        // The API answers, but may not be asked: the permission to grant is named.
        let api = cluster().await;
        api.fail("authentication.k8s.io", "tokenreviews", "create", 403, 1);
        let auth = authenticator(api.client());
        match ask(&auth, Some(ZTUNNEL_A), &identity("demo", "web")).await {
            Err(AuthError::Unauthenticated(m)) => assert!(
                m.contains("may not create tokenreviews.authentication.k8s.io"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        // The pod list failing during a ztunnel's request: refused too.
        api.fail("", "pods", "list", 500, 1);
        match ask(&auth, Some(ZTUNNEL_A), &identity("demo", "web")).await {
            Err(AuthError::PermissionDenied(m)) => {
                assert!(m.contains("cannot list the pods"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn the_ca_key_lives_in_a_secret_created_once() {
        let api = FakeApi::start().await;
        let dir = tempfile::tempdir().unwrap();
        let first = ca_key_from_secret(
            api.client(),
            "istio-system",
            "istio-ca-secret",
            "cluster.local",
            dir.path(),
        )
        .await
        .unwrap();
        let created = api
            .object("", "secrets", "istio-system", "istio-ca-secret")
            .unwrap();
        assert_eq!(created["type"], "istio.io/ca-root");
        let authority = crate::ca::CertificateAuthority::load(&first, "cluster.local").unwrap();
        let key = dir.path().join(SECRET_KEY);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // A restart (or another replica) signs with the same root.
        let other = tempfile::tempdir().unwrap();
        let again = ca_key_from_secret(
            api.client(),
            "istio-system",
            "istio-ca-secret",
            "cluster.local",
            other.path(),
        )
        .await
        .unwrap();
        let again = crate::ca::CertificateAuthority::load(&again, "cluster.local").unwrap();
        assert_eq!(authority.root_pem(), again.root_pem());

        // Losing the race to create it: the winner's root is used.
        api.fail("", "secrets", "get", 404, 1);
        let third = tempfile::tempdir().unwrap();
        let raced = ca_key_from_secret(
            api.client(),
            "istio-system",
            "istio-ca-secret",
            "cluster.local",
            third.path(),
        )
        .await
        .unwrap();
        let raced = crate::ca::CertificateAuthority::load(&raced, "cluster.local").unwrap();
        assert_eq!(authority.root_pem(), raced.root_pem());

        // A Secret without the key is reported, naming what is missing.
        api.apply(
            "",
            "secrets",
            json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "cacerts", "namespace": "istio-system"},
            "data": {"ca-cert.pem": "AAAA"}}),
        );
        let e = ca_key_from_secret(
            api.client(),
            "istio-system",
            "cacerts",
            "cluster.local",
            third.path(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"ca-key.pem\" is missing"), "{e}");
    }

    #[test]
    fn service_account_refs_parse() {
        let sa: NamespacedName = DEFAULT_ZTUNNEL_ACCOUNT.parse().unwrap();
        assert_eq!(sa.to_string(), "istio-system/ztunnel");
        for bad in ["ztunnel", "/ztunnel", "istio-system/", "a/b/c"] {
            assert!(bad.parse::<NamespacedName>().is_err(), "{bad}");
        }
    }
}

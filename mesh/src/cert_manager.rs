//! Workload certificates on demand: one cache entry per identity, one background task per entry.
//!
//! The first request for an identity starts its task and every concurrent requester waits on the
//! same fetch. The task renews at half-life (with jitter, so a node's certificates do not all
//! renew in the same second), retries with jittered exponential backoff while the CA is down,
//! and keeps serving the previous certificate until it expires, never after.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::ca::{CertificateSigner, SignError};
use crate::identity::Identity;
use crate::tls::{TlsError, WorkloadCertificate};

#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("no certificate for {identity}: {reason}")]
    Unavailable { identity: Identity, reason: String },
    #[error("certificate for {identity} expired at {expired_at} and renewal is failing: {reason}")]
    Expired {
        identity: Identity,
        expired_at: String,
        reason: String,
    },
}

/// Renewal and retry timing.
#[derive(Debug, Clone)]
pub struct CertManagerConfig {
    /// Lifetime asked of the CA.
    pub ttl: Duration,
    /// First retry delay after a failed fetch; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for CertManagerConfig {
    fn default() -> Self {
        Self {
            ttl: crate::ca::authority::DEFAULT_WORKLOAD_TTL,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabels {
    identity: String,
    /// success or failure
    result: &'static str,
}

#[derive(Clone, Debug)]
struct CertMetrics {
    expiry: Family<IdentityLabels, Gauge>,
    fetches: Family<FetchLabels, Counter>,
}

impl CertMetrics {
    fn new(registry: &mut Registry) -> Self {
        let expiry = Family::<IdentityLabels, Gauge>::default();
        registry.register(
            "mesh_workload_cert_expiry_timestamp_seconds",
            "When the certificate currently held for an identity expires (Unix seconds)",
            expiry.clone(),
        );
        let fetches = Family::<FetchLabels, Counter>::default();
        registry.register(
            "mesh_workload_cert_fetches",
            "Certificate fetches from the CA, by identity and result",
            fetches.clone(),
        );
        Self { expiry, fetches }
    }
}

#[derive(Clone, Default)]
struct CertState {
    cert: Option<Arc<WorkloadCertificate>>,
    last_error: Option<String>,
    /// When `last_error` happened.
    last_error_at: Option<SystemTime>,
    /// When the task fetches again: the retry after a failure, or the renewal.
    next_attempt: Option<SystemTime>,
    /// At least one fetch attempt finished.
    attempted: bool,
}

struct Entry {
    state: watch::Receiver<CertState>,
    task: tokio::task::AbortHandle,
}

struct Inner {
    signer: Arc<dyn CertificateSigner>,
    config: CertManagerConfig,
    entries: Mutex<HashMap<Identity, Entry>>,
    metrics: CertMetrics,
}

/// The per-identity certificate cache. Cheap to clone.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// What `/config_dump` and the operator view show of a certificate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertSummary {
    pub identity: Identity,
    /// available, pending, expired or failed
    pub state: &'static str,
    pub serial: Option<String>,
    pub not_before: Option<u64>,
    pub not_after: Option<u64>,
    /// Why the last fetch failed (cleared by a success).
    pub last_error: Option<String>,
    /// When it failed (Unix seconds).
    pub last_error_at: Option<u64>,
    /// When the next fetch starts (Unix seconds): the retry after a failure, or the renewal.
    pub next_attempt: Option<u64>,
}

impl CertSummary {
    /// Why this certificate keeps a proxy from being ready (its identity, what is wrong, the CA's
    /// error and when the next attempt is), or `None` when it is available.
    pub fn not_ready(&self, now: SystemTime) -> Option<String> {
        let what = match self.state {
            "available" => return None,
            "pending" => "is pending",
            "expired" => "has expired",
            _ => "could not be fetched",
        };
        let mut why = format!("certificate for {} {what}", self.identity);
        match &self.last_error {
            Some(error) => why.push_str(&format!(": {error}")),
            None if self.state == "pending" => {
                why.push_str(": the first request to the CA has not finished")
            }
            None => {}
        }
        if let Some(next) = self.next_attempt {
            let left = next.saturating_sub(unix_secs(now));
            why.push_str(&format!("; next attempt in {left}s"));
        }
        Some(why)
    }
}

impl CertManager {
    pub fn new(
        signer: Arc<dyn CertificateSigner>,
        config: CertManagerConfig,
        registry: &mut Registry,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                signer,
                config,
                entries: Mutex::new(HashMap::new()),
                metrics: CertMetrics::new(registry),
            }),
        }
    }

    /// The current, unexpired certificate for `identity`, fetching it on first use.
    pub async fn fetch_certificate(
        &self,
        identity: &Identity,
    ) -> Result<Arc<WorkloadCertificate>, CertError> {
        let mut rx = self.subscribe(identity);
        let state = rx
            .wait_for(|s| s.attempted)
            .await
            .map(|s| s.clone())
            .unwrap_or_default();
        match (state.cert, state.last_error) {
            (Some(cert), _) if !cert.is_expired(SystemTime::now()) => Ok(cert),
            (Some(cert), reason) => Err(CertError::Expired {
                identity: identity.clone(),
                expired_at: humantime(cert.info().not_after),
                reason: reason.unwrap_or_else(|| "renewal has not succeeded yet".into()),
            }),
            (None, reason) => Err(CertError::Unavailable {
                identity: identity.clone(),
                reason: reason.unwrap_or_else(|| "certificate manager stopped".into()),
            }),
        }
    }

    /// Starts fetching `identity` ahead of need, without waiting.
    pub fn prefetch(&self, identity: &Identity) {
        drop(self.subscribe(identity));
    }

    /// Stops renewing `identity` and drops its certificate (its last workload left the node).
    pub fn forget(&self, identity: &Identity) {
        let removed = self.lock().remove(identity);
        if let Some(entry) = removed {
            entry.task.abort();
            self.inner.metrics.expiry.remove(&IdentityLabels {
                identity: identity.to_string(),
            });
        }
    }

    /// Every identity held, with its state, sorted by identity.
    pub fn summaries(&self) -> Vec<CertSummary> {
        let now = SystemTime::now();
        let mut out: Vec<CertSummary> = self
            .lock()
            .iter()
            .map(|(identity, entry)| {
                let s = entry.state.borrow();
                let info = s.cert.as_ref().map(|c| c.info().clone());
                let state = match (&s.cert, s.attempted) {
                    (Some(c), _) if c.is_expired(now) => "expired",
                    (Some(_), _) => "available",
                    (None, false) => "pending",
                    (None, true) => "failed",
                };
                CertSummary {
                    identity: identity.clone(),
                    state,
                    serial: info.as_ref().map(|i| i.serial.clone()),
                    not_before: info.as_ref().map(|i| unix_secs(i.not_before)),
                    not_after: info.as_ref().map(|i| unix_secs(i.not_after)),
                    last_error: s.last_error.clone(),
                    last_error_at: s.last_error_at.map(unix_secs),
                    next_attempt: s.next_attempt.map(unix_secs),
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        // A panic while holding this lock cannot leave the map half-updated (single inserts and
        // removes), so a poisoned lock is still usable.
        self.inner
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn subscribe(&self, identity: &Identity) -> watch::Receiver<CertState> {
        let mut entries = self.lock();
        if let Some(entry) = entries.get(identity) {
            return entry.state.clone();
        }
        let (tx, rx) = watch::channel(CertState::default());
        let task = tokio::spawn(refresh_loop(
            Arc::downgrade(&self.inner),
            identity.clone(),
            tx,
        ))
        .abort_handle();
        entries.insert(
            identity.clone(),
            Entry {
                state: rx.clone(),
                task,
            },
        );
        rx
    }
}

async fn refresh_loop(
    inner: std::sync::Weak<Inner>,
    identity: Identity,
    tx: watch::Sender<CertState>,
) {
    let mut backoff = None;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let label = FetchLabels {
            identity: identity.to_string(),
            result: "success",
        };
        let wait = match fetch_once(&strong, &identity).await {
            Ok(cert) => {
                backoff = None;
                strong.metrics.fetches.get_or_create(&label).inc();
                let info = cert.info();
                let not_after_secs = info
                    .not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                strong
                    .metrics
                    .expiry
                    .get_or_create(&IdentityLabels {
                        identity: identity.to_string(),
                    })
                    .set(not_after_secs as i64);
                let wait = renew_delay(info.not_after, SystemTime::now());
                tracing::info!(
                    %identity,
                    serial = %info.serial,
                    expires = %humantime(info.not_after),
                    renew_in = ?wait,
                    "certificate fetched"
                );
                tx.send_replace(CertState {
                    cert: Some(cert),
                    last_error: None,
                    last_error_at: None,
                    next_attempt: Some(SystemTime::now() + wait),
                    attempted: true,
                });
                wait
            }
            Err(error) => {
                strong
                    .metrics
                    .fetches
                    .get_or_create(&FetchLabels {
                        result: "failure",
                        ..label
                    })
                    .inc();
                let cfg = &strong.config;
                let base = backoff.map_or(cfg.initial_backoff, |b: Duration| {
                    (b * 2).min(cfg.max_backoff)
                });
                backoff = Some(base);
                // Full range jitter around the base: [base/2, base*3/2).
                let wait = base / 2 + base.mul_f64(fastrand::f64());
                tracing::warn!(%identity, %error, retry_in = ?wait, "certificate fetch failed");
                let now = SystemTime::now();
                tx.send_modify(|s| {
                    s.last_error = Some(error);
                    s.last_error_at = Some(now);
                    s.next_attempt = Some(now + wait);
                    s.attempted = true;
                });
                wait
            }
        };
        drop(strong);
        tokio::time::sleep(wait).await;
    }
}

async fn fetch_once(
    inner: &Inner,
    identity: &Identity,
) -> Result<Arc<WorkloadCertificate>, String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("generating a key: {e}"))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        identity
            .to_string()
            .try_into()
            .map_err(|e| format!("identity as URI SAN: {e}"))?,
    )];
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| format!("building the CSR: {e}"))?;
    let chain = inner
        .signer
        .sign(identity, csr, inner.config.ttl)
        .await
        .map_err(|e: SignError| e.to_string())?;
    let cert = WorkloadCertificate::new(identity.clone(), key.serialize_der(), &chain)
        .map_err(|e: TlsError| format!("CA returned an unusable chain: {e}"))?;
    Ok(Arc::new(cert))
}

/// Time until renewal: half of the validity left when the certificate arrived, with 5% of it as
/// jitter either way. Measured from arrival rather than notBefore because CAs backdate notBefore
/// (ours by a minute), which would make short-lived certificates renew at once.
fn renew_delay(not_after: SystemTime, now: SystemTime) -> Duration {
    let remaining = not_after.duration_since(now).unwrap_or_default();
    let jittered = remaining.mul_f64(0.45 + 0.1 * fastrand::f64());
    jittered.max(MIN_RENEW_DELAY)
}

/// Floor on the renewal delay, so a CA handing out nearly expired certificates cannot make the
/// loop spin.
const MIN_RENEW_DELAY: Duration = Duration::from_millis(500);

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn humantime(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs}"))
}

/// A source of client certificates for HBONE, by identity.
pub trait CertificateSource: Send + Sync + 'static {
    fn certificate<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<Arc<WorkloadCertificate>, CertError>>;
}

impl CertificateSource for CertManager {
    fn certificate<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<Arc<WorkloadCertificate>, CertError>> {
        Box::pin(self.fetch_certificate(identity))
    }
}

#[cfg(test)]
mod tests;

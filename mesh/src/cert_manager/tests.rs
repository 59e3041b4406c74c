use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::*;
use crate::ca::{CaKeySource, CertificateAuthority};

/// A signer backed by a real CA, which can be made slow or unavailable.
struct FakeCa {
    ca: CertificateAuthority,
    calls: AtomicUsize,
    down: AtomicBool,
    delay: Duration,
    _dir: tempfile::TempDir,
}

impl FakeCa {
    fn new(delay: Duration) -> Arc<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            CertificateAuthority::load(&CaKeySource::Directory(dir.path().into()), "cluster.local")
                .unwrap();
        Arc::new(Self {
            ca,
            calls: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            delay,
            _dir: dir,
        })
    }
}

impl CertificateSigner for FakeCa {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr_pem: String,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, SignError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            if self.down.load(Ordering::SeqCst) {
                return Err(SignError::Unreachable {
                    address: "fake".into(),
                    message: "down for the test".into(),
                });
            }
            let csr = self.ca.validate_csr(&csr_pem).expect("valid CSR");
            assert_eq!(&csr.identity, identity);
            Ok(self.ca.sign(&csr, Some(ttl)).expect("sign"))
        })
    }
}

fn manager(ca: &Arc<FakeCa>, ttl: Duration) -> (CertManager, Registry) {
    let mut registry = Registry::default();
    let m = CertManager::new(
        ca.clone(),
        CertManagerConfig {
            ttl,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(400),
        },
        &mut registry,
    );
    (m, registry)
}

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "demo", sa).unwrap()
}

#[tokio::test]
async fn concurrent_requesters_share_one_fetch() {
    let ca = FakeCa::new(Duration::from_millis(200));
    let (m, _) = manager(&ca, Duration::from_secs(3600));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let m = m.clone();
        tasks.push(tokio::spawn(async move {
            m.fetch_certificate(&id("web"))
                .await
                .unwrap()
                .info()
                .serial
                .clone()
        }));
    }
    let mut serials = Vec::new();
    for t in tasks {
        serials.push(t.await.unwrap());
    }
    assert_eq!(
        ca.calls.load(Ordering::SeqCst),
        1,
        "one CA call for 50 requesters"
    );
    assert!(
        serials.windows(2).all(|w| w[0] == w[1]),
        "everyone got the same certificate"
    );
    // A second identity is a separate fetch.
    m.fetch_certificate(&id("api")).await.unwrap();
    assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn rotates_at_half_life() {
    let ca = FakeCa::new(Duration::ZERO);
    let (m, _) = manager(&ca, Duration::from_secs(4));
    let first = m.fetch_certificate(&id("web")).await.unwrap();
    let started = std::time::Instant::now();
    let first_serial = first.info().serial.clone();
    let rotated = loop {
        let c = m.fetch_certificate(&id("web")).await.unwrap();
        if c.info().serial != first_serial {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "no rotation before expiry"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Half of the 3-4 s left at arrival (notAfter has whole seconds), 5% jitter either way,
    // plus scheduling slack on a loaded machine.
    assert!(
        rotated >= Duration::from_millis(1200) && rotated <= Duration::from_millis(3000),
        "rotated after {rotated:?}, expected about 2 s"
    );
    assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn retries_with_backoff_while_ca_is_down() {
    let ca = FakeCa::new(Duration::ZERO);
    ca.down.store(true, Ordering::SeqCst);
    let (m, registry) = manager(&ca, Duration::from_secs(3600));
    let err = m
        .fetch_certificate(&id("web"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("down for the test"),
        "error carries the cause: {err}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let attempts = ca.calls.load(Ordering::SeqCst);
    // 50 ms doubling to a 400 ms cap, each jittered by +-50%: far fewer than the 30 attempts a
    // fixed 50 ms retry would make in 1.5 s, and more than one.
    assert!((3..=12).contains(&attempts), "{attempts} attempts in 1.5 s");
    ca.down.store(false, Ordering::SeqCst);
    let recovered = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if m.fetch_certificate(&id("web")).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(recovered.is_ok(), "recovers once the CA is back");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"mesh_workload_cert_fetches_total{identity="spiffe://cluster.local/ns/demo/sa/web",result="failure"}"#),
        "{text}"
    );
}

#[tokio::test]
async fn expired_certificate_is_never_presented() {
    let ca = FakeCa::new(Duration::ZERO);
    let (m, registry) = manager(&ca, Duration::from_secs(3));
    let cert = m.fetch_certificate(&id("web")).await.unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let not_after = cert
        .info()
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        text.contains(&format!(
            r#"mesh_workload_cert_expiry_timestamp_seconds{{identity="spiffe://cluster.local/ns/demo/sa/web"}} {not_after}"#
        )),
        "expiry exported: {text}"
    );
    ca.down.store(true, Ordering::SeqCst);
    // Until expiry the old certificate is served although renewal fails.
    let almost = cert.info().not_after - Duration::from_millis(400);
    while SystemTime::now() < almost {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        m.fetch_certificate(&id("web")).await.is_ok(),
        "still valid, still served"
    );
    let deadline = cert.info().not_after + Duration::from_millis(200);
    while SystemTime::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = m.fetch_certificate(&id("web")).await.unwrap_err();
    assert!(matches!(err, CertError::Expired { .. }), "{err}");
    assert_eq!(m.summaries()[0].state, "expired");
}

#[tokio::test]
async fn forget_stops_renewal_and_drops_metrics() {
    let ca = FakeCa::new(Duration::ZERO);
    let (m, registry) = manager(&ca, Duration::from_secs(3600));
    m.fetch_certificate(&id("web")).await.unwrap();
    assert_eq!(m.summaries().len(), 1);
    m.forget(&id("web"));
    assert!(m.summaries().is_empty());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(!text.contains("expiry_timestamp_seconds{"), "{text}");
}

//! The CA over its real gRPC/TLS transport, the certificate manager against it, and HBONE
//! running on managed certificates while they rotate.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh::ca::{
    AllowAny, CaClientConfig, CertificateSigner, GrpcCaClient, SignError, StaticTokens, TokenSource,
};
use mesh::cert_manager::{CertManager, CertManagerConfig};
use mesh::hbone::server::ManagedCertificate;
use mesh::hbone::{
    ClientConfig, ConnectRequest, HboneAuthority, HboneClient, HboneServer, ServerConfig,
};
use mesh_tests::*;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn client(ca: &RunningCa, token: Option<&str>, impersonate: bool) -> GrpcCaClient {
    GrpcCaClient::new(CaClientConfig {
        token: token.map_or(TokenSource::None, |t| TokenSource::Static(t.into())),
        impersonate,
        ..ca.client_config()
    })
    .unwrap()
}

fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

#[tokio::test]
async fn grpc_ca_issues_a_usable_chain() {
    init_tracing();
    let pki = TestPki::new(TRUST_DOMAIN);
    let ca = start_ca(&pki, Arc::new(AllowAny), any_port()).await;
    let mut registry = Registry::default();
    let manager = CertManager::new(
        Arc::new(client(&ca, None, true)),
        CertManagerConfig::default(),
        &mut registry,
    );
    let identity = pki.id("demo", "web");
    let cert = manager
        .fetch_certificate(&identity)
        .await
        .expect("certificate");
    assert_eq!(cert.identity(), &identity);
    assert_eq!(cert.info().identities, vec![identity.clone()]);
    let lifetime = cert
        .info()
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        lifetime > Duration::from_secs(23 * 3600) && lifetime <= Duration::from_secs(24 * 3600),
        "24 h default lifetime, got {lifetime:?}"
    );
    assert!(encode(&ca.metrics).contains(r#"mesh_ca_csr_requests_total{result="granted"} 1"#));
}

#[tokio::test]
async fn forbidden_identity_is_refused() {
    init_tracing();
    let pki = TestPki::new(TRUST_DOMAIN);
    let web = pki.id("demo", "web");
    let db = pki.id("demo", "db");
    let auth = StaticTokens::new().allow("web-token", web.clone());
    let ca = start_ca(&pki, Arc::new(auth), any_port()).await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let hour = Duration::from_secs(3600);

    // The token's own identity is granted.
    let ok = client(&ca, Some("web-token"), false)
        .sign(&web, csr_for(&web, &key), hour)
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    // Another identity with the same token is refused.
    let denied = client(&ca, Some("web-token"), false)
        .sign(&db, csr_for(&db, &key), hour)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &denied,
            SignError::Refused {
                code: tonic::Code::PermissionDenied,
                ..
            }
        ),
        "{denied}"
    );
    assert!(
        denied.to_string().contains("db"),
        "names the identity: {denied}"
    );
    // No token, or an unknown one: unauthenticated.
    for token in [None, Some("stolen")] {
        let err = client(&ca, token, false)
            .sign(&web, csr_for(&web, &key), hour)
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                SignError::Refused {
                    code: tonic::Code::Unauthenticated,
                    ..
                }
            ),
            "{err}"
        );
    }
    // Impersonating one identity while the CSR asks for another is invalid.
    let mismatched = client(&ca, Some("web-token"), true)
        .sign(&web, csr_for(&db, &key), hour)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &mismatched,
            SignError::Refused {
                code: tonic::Code::InvalidArgument,
                ..
            }
        ),
        "{mismatched}"
    );
    // A lifetime beyond the maximum is refused.
    let too_long = client(&ca, Some("web-token"), false)
        .sign(
            &web,
            csr_for(&web, &key),
            Duration::from_secs(365 * 24 * 3600),
        )
        .await
        .unwrap_err();
    assert!(
        too_long.to_string().contains("exceeds the maximum"),
        "{too_long}"
    );
    let text = encode(&ca.metrics);
    assert!(
        text.contains(r#"mesh_ca_csr_requests_total{result="denied"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"mesh_ca_csr_requests_total{result="invalid"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn malformed_csr_is_invalid_argument() {
    let pki = TestPki::new(TRUST_DOMAIN);
    let ca = start_ca(&pki, Arc::new(AllowAny), any_port()).await;
    let web = pki.id("demo", "web");
    let err = client(&ca, None, false)
        .sign(
            &web,
            "-----BEGIN CERTIFICATE REQUEST-----\nzz\n-----END CERTIFICATE REQUEST-----".into(),
            Duration::from_secs(60),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            SignError::Refused {
                code: tonic::Code::InvalidArgument,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn manager_recovers_when_ca_starts_late() {
    init_tracing();
    let pki = TestPki::new(TRUST_DOMAIN);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = CaClientConfig {
        address: port.to_string(),
        root_cert_pem: pki.root_pem().to_owned(),
        server_name: Some("localhost".into()),
        token: TokenSource::None,
        impersonate: false,
        timeout: Duration::from_secs(2),
    };
    let mut registry = Registry::default();
    let manager = CertManager::new(
        Arc::new(GrpcCaClient::new(config).unwrap()),
        CertManagerConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            ..CertManagerConfig::default()
        },
        &mut registry,
    );
    let web = pki.id("demo", "web");
    let err = manager.fetch_certificate(&web).await.unwrap_err();
    assert!(err.to_string().contains("unreachable"), "{err}");
    let _ca = start_ca(&pki, Arc::new(AllowAny), port).await;
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(c) = manager.fetch_certificate(&web).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("certificate once the CA is up");
    assert_eq!(got.identity(), &web);
}

/// A CA that accepts the TCP connection and never answers (no TLS ServerHello, no gRPC reply):
/// each request fails by its deadline with an error naming the address and what to check, the
/// channel does not stay stuck behind the first attempt, and the certificate manager reports
/// the failure and its next attempt instead of staying `pending`.
#[tokio::test]
async fn a_ca_that_accepts_and_never_answers_fails_within_the_deadline() {
    init_tracing();
    let pki = TestPki::new(TRUST_DOMAIN);
    let silent = start_silent_server().await;
    let deadline = Duration::from_millis(500);
    let signer = GrpcCaClient::new(CaClientConfig {
        address: silent.addr.to_string(),
        root_cert_pem: pki.root_pem().to_owned(),
        server_name: Some("localhost".into()),
        token: TokenSource::None,
        impersonate: true,
        timeout: deadline,
    })
    .unwrap();
    let web = pki.id("demo", "web");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    for attempt in 1..=3 {
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            signer.sign(&web, csr_for(&web, &key), Duration::from_secs(3600)),
        )
        .await
        .unwrap_or_else(|_| panic!("attempt {attempt}: the request never ended"))
        .unwrap_err();
        // The first waits out the deadline; the next may end at once with the channel's report
        // of the abandoned handshake, never later than the deadline.
        let took = started.elapsed();
        assert!(
            took < deadline + Duration::from_secs(2) && (attempt > 1 || took >= deadline),
            "attempt {attempt}: ended after {took:?}, deadline {deadline:?}"
        );
        assert!(matches!(&err, SignError::Timeout { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains(&silent.addr.to_string())
                && text.contains("did not answer within")
                && text.contains("is the CA healthy"),
            "names the CA and what to check: {text}"
        );
    }
    assert!(silent.accepted.load(std::sync::atomic::Ordering::Relaxed) >= 1);

    let mut registry = Registry::default();
    let manager = CertManager::new(
        Arc::new(signer),
        CertManagerConfig {
            initial_backoff: Duration::from_secs(20),
            ..CertManagerConfig::default()
        },
        &mut registry,
    );
    let err = tokio::time::timeout(Duration::from_secs(10), manager.fetch_certificate(&web))
        .await
        .expect("the first fetch ends by the CA deadline")
        .unwrap_err();
    assert!(err.to_string().contains("did not answer within"), "{err}");
    let [summary] = &manager.summaries()[..] else {
        panic!("one identity: {:?}", manager.summaries());
    };
    assert_eq!(summary.identity, web);
    assert_eq!(summary.state, "failed", "{summary:?}");
    assert!(
        summary
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains(&silent.addr.to_string())),
        "{summary:?}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        summary.last_error_at.is_some_and(|t| t <= now),
        "{summary:?}"
    );
    assert!(
        summary
            .next_attempt
            .is_some_and(|t| t + 1 >= now + 10 && t <= now + 31),
        "the retry is 10-30 s away (backoff 20 s +-50%): {summary:?}"
    );
    let why = summary.not_ready(std::time::SystemTime::now()).unwrap();
    assert!(
        why.contains(&web.to_string())
            && why.contains("did not answer within")
            && why.contains("next attempt in"),
        "{why}"
    );
    assert!(
        encode(&registry).contains(&format!(
            r#"mesh_workload_cert_fetches_total{{identity="{web}",result="failure"}} 1"#
        )),
        "{}",
        encode(&registry)
    );
}

/// Both ends on certificates that live 3 s: a tunnel carries data across several rotations
/// (and past the expiry of the certificates it was opened with), and new tunnels keep working.
#[tokio::test]
async fn rotation_under_traffic_keeps_tunnels_working() {
    init_tracing();
    let pki = TestPki::new(TRUST_DOMAIN);
    let ca = start_ca(&pki, Arc::new(AllowAny), any_port()).await;
    let mut registry = Registry::default();
    let manager = CertManager::new(
        Arc::new(client(&ca, None, true)),
        CertManagerConfig {
            ttl: Duration::from_secs(3),
            ..CertManagerConfig::default()
        },
        &mut registry,
    );
    let client_id = pki.id("client-ns", "client");
    let server_id = pki.id("server-ns", "server");
    let server = HboneServer::bind(
        any_port(),
        ServerConfig::default(),
        Arc::new(ManagedCertificate {
            manager: manager.clone(),
            identity: server_id.clone(),
        }),
    )
    .await
    .unwrap();
    let hbone = server.local_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(server.run(stop.clone(), forward));
    let _stop = stop.drop_guard();
    let hbone_client = HboneClient::new(ClientConfig::default(), Arc::new(manager.clone()));
    let echo = start_echo().await;
    let request = || ConnectRequest {
        source: client_id.clone(),
        destination: server_id.clone(),
        hbone_addr: hbone,
        authority: HboneAuthority(echo),
        headers: http::HeaderMap::new(),
    };

    let first_serial = manager
        .fetch_certificate(&server_id)
        .await
        .unwrap()
        .info()
        .serial
        .clone();
    let mut long_lived = hbone_client.connect(request()).await.unwrap();
    let started = std::time::Instant::now();
    let mut round = 0u32;
    let mut serials = std::collections::HashSet::new();
    while started.elapsed() < Duration::from_secs(7) {
        let msg = format!("round {round}");
        long_lived.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        long_lived.read_exact(&mut buf).await.unwrap();
        assert_eq!(
            buf,
            msg.as_bytes(),
            "long-lived tunnel intact in round {round}"
        );
        // A fresh tunnel (and, once the idle pool is gone, a fresh handshake) each round.
        let mut fresh = hbone_client
            .connect(request())
            .await
            .expect("new tunnel after rotation");
        fresh.write_all(b"new").await.unwrap();
        let mut b = [0u8; 3];
        fresh.read_exact(&mut b).await.unwrap();
        serials.insert(
            manager
                .fetch_certificate(&server_id)
                .await
                .unwrap()
                .info()
                .serial
                .clone(),
        );
        round += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    serials.insert(first_serial);
    assert!(
        serials.len() >= 3,
        "the server certificate rotated at least twice during the test ({} serials)",
        serials.len()
    );
    // A brand-new connection after the original certificates expired.
    let fresh_client = HboneClient::new(ClientConfig::default(), Arc::new(manager.clone()));
    let mut t = fresh_client
        .connect(request())
        .await
        .expect("handshake with rotated certs");
    t.write_all(b"after").await.unwrap();
    let mut b = [0u8; 5];
    t.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"after");
}

/// Reads every certificate file given with pyca/cryptography, which enforces DER strictly
/// (since 48 it refuses an encoded DEFAULT value, such as `cA FALSE`, with `EncodedDefault`):
/// the certificate, its fields and the value of every extension.
const PYCA_CHECK: &str = r#"
import sys
from cryptography import x509
for path in sys.argv[1:]:
    try:
        cert = x509.load_der_x509_certificate(open(path, "rb").read())
        cert.subject, cert.issuer, cert.serial_number, cert.public_key()
        cert.signature_hash_algorithm
        getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after
        for ext in cert.extensions:
            ext.value
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        print(f"ok {path}: ca={bc.value.ca} critical={bc.critical} extensions={len(cert.extensions)}")
    except Exception as e:
        print(f"FAIL {path}: {type(e).__name__}: {e}")
        sys.exit(1)
"#;

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// The chain the CA at `addr` presents in its TLS handshake (leaf first).
async fn served_chain(addr: SocketAddr, root_pem: &str) -> Vec<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in mesh::tls::parse_pem_certs(root_pem, "root").unwrap() {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(mesh::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("the CA's serving certificate verifies against its root");
    tls.get_ref()
        .1
        .peer_certificates()
        .unwrap()
        .iter()
        .map(|c| c.to_vec())
        .collect()
}

/// A CA signing with an intermediate (plugged in as `ca-cert.pem` + `cert-chain.pem`).
fn intermediate_ca(dir: &std::path::Path) -> mesh::ca::CertificateAuthority {
    let (root_pem, root_key_pem) = mesh::ca::authority::generate_root(TRUST_DOMAIN).unwrap();
    let root_key = rcgen::KeyPair::from_pem(&root_key_pem).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "intermediate");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let inter = params.signed_by(&key, &issuer).unwrap();
    let (cert, key_path, chain) = (
        dir.join("ca-cert.pem"),
        dir.join("ca-key.pem"),
        dir.join("cert-chain.pem"),
    );
    std::fs::write(&cert, inter.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::write(&chain, format!("{}{root_pem}", inter.pem())).unwrap();
    mesh::ca::CertificateAuthority::from_files(&cert, &key_path, Some(&chain), TRUST_DOMAIN)
        .unwrap()
}

#[tokio::test]
async fn issued_certificates_parse_with_pyca_cryptography() {
    init_tracing();
    let has_pyca = std::process::Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_pyca {
        let why = "python3 with pyca/cryptography not found (pip install cryptography; \
                   scripts/test.sh installs it)";
        assert!(!ci(), "{why} (CI=true: this check must run)");
        println!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut save = |name: &str, der: &[u8]| {
        let path = dir.path().join(format!("{name}.der"));
        std::fs::write(&path, der).unwrap();
        files.push(path);
    };
    // A root CA and a plugged-in intermediate, each serving over gRPC/TLS and issuing a
    // workload certificate: every certificate as a client receives it.
    let root_pki = TestPki::new(TRUST_DOMAIN);
    let inter_dir = tempfile::tempdir().unwrap();
    let inter = Arc::new(intermediate_ca(inter_dir.path()));
    let mut registry = Registry::default();
    let inter_server = mesh::ca::CaServer::bind(
        any_port(),
        mesh::ca::CaService::new(
            inter.clone(),
            Arc::new(AllowAny),
            mesh::ca::CaMetrics::new(&mut registry),
        ),
        &mesh::ca::CaServingNames::default(),
    )
    .await
    .unwrap();
    let inter_addr = inter_server.local_addr();
    tokio::spawn(inter_server.run(std::future::pending()));
    let root_ca = start_ca(&root_pki, Arc::new(AllowAny), any_port()).await;
    let identity = root_pki.id("demo", "web");
    for (name, addr, root_pem) in [
        ("root-ca", root_ca.addr, root_pki.root_pem().to_owned()),
        ("intermediate-ca", inter_addr, inter.root_pem().to_owned()),
    ] {
        for (i, der) in served_chain(addr, &root_pem).await.iter().enumerate() {
            save(&format!("{name}-serving-{i}"), der);
        }
        let signer = GrpcCaClient::new(CaClientConfig {
            address: addr.to_string(),
            root_cert_pem: root_pem.clone(),
            ..root_ca.client_config()
        })
        .unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let chain = signer
            .sign(
                &identity,
                csr_for(&identity, &key),
                Duration::from_secs(3600),
            )
            .await
            .unwrap();
        for (i, pem) in chain.iter().enumerate() {
            let der = mesh::tls::parse_pem_certs(pem, "issued").unwrap();
            save(&format!("{name}-workload-chain-{i}"), &der[0]);
        }
    }
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(PYCA_CHECK)
        .args(&files)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pyca/cryptography refused: {stdout}");
    // Leaf, intermediate and root of the intermediate CA's workload chain; leaf and root of
    // the root CA's; each CA's serving certificate (with the intermediate above it).
    assert_eq!(stdout.matches("ok ").count(), files.len(), "{stdout}");
    assert!(files.len() >= 8, "{files:?}");
}

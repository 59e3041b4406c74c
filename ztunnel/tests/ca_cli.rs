//! `ztunnel ca` as a user runs it: starts, issues a certificate over gRPC/TLS, stops cleanly on
//! SIGTERM, and refuses an unsafe configuration.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh::ca::{CaClientConfig, CertificateSigner, GrpcCaClient, TokenSource};
use mesh::identity::Identity;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn csr(identity: &Identity) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        identity.to_string().try_into().unwrap(),
    )];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn serves_certificates_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "# token identity\nsecret spiffe://cluster.local/ns/demo/sa/web\n",
    )
    .unwrap();
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_ztunnel"))
            .args(["ca", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--ca-dir")
            .arg(dir.path().join("ca"))
            .arg("--tokens-file")
            .arg(&tokens)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "CA did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let root = std::fs::read_to_string(dir.path().join("ca/root-cert.pem")).unwrap();
    let client = |token: &str| {
        Arc::new(
            GrpcCaClient::new(CaClientConfig {
                address: format!("localhost:{port}"),
                root_cert_pem: root.clone(),
                server_name: None,
                token: TokenSource::Static(token.into()),
                impersonate: true,
                timeout: Duration::from_secs(5),
            })
            .unwrap(),
        )
    };
    let web: Identity = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
    let chain = client("secret")
        .sign(&web, csr(&web), Duration::from_secs(3600))
        .await
        .expect("granted");
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], root);
    let other: Identity = "spiffe://cluster.local/ns/demo/sa/db".parse().unwrap();
    assert!(
        client("secret")
            .sign(&other, csr(&other), Duration::from_secs(3600))
            .await
            .is_err(),
        "identity not in the tokens file is refused"
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "CA did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "clean exit on SIGTERM: {exit:?}");
}

#[test]
fn refuses_remote_listen_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args(["ca", "--listen", "0.0.0.0:0"])
        .arg("--ca-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--tokens-file"), "{stderr}");
}

#[test]
fn bad_plugged_in_key_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("ca-cert.pem");
    let key = dir.path().join("ca-key.pem");
    std::fs::write(&cert, "junk").unwrap();
    std::fs::write(&key, "junk").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args(["ca", "--listen", "127.0.0.1:0"])
        .arg("--ca-cert")
        .arg(&cert)
        .arg("--ca-key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ca-cert.pem"), "names the file: {stderr}");
}

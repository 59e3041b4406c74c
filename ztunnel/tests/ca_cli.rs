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

/// `ztunnel ca` started by `sh` after `ulimit <ulimit_args>`, logging to `dir/ca.log`.
fn start_ca_limited(dir: &std::path::Path, port: u16, ulimit_args: &str) -> Child {
    let log = std::fs::File::create(dir.join("ca.log")).unwrap();
    Child(
        Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit {ulimit_args} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_ztunnel"))
            .args(["ca", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--ca-dir")
            .arg(dir.join("ca"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    )
}

async fn wait_listening(port: u16) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "CA did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (soft, hard) "Max open files" of process `pid`.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut numbers = line.split_whitespace().filter_map(|w| w.parse().ok());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

/// User + system CPU time of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime 13th.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|f| f.parse().unwrap())
        .collect();
    // Clock ticks are 1/100 s on Linux (USER_HZ).
    Duration::from_millis((fields[0] + fields[1]) * 10)
}

#[tokio::test]
async fn raises_the_open_file_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = start_ca_limited(dir.path(), port, "-S -n 256");
    wait_listening(port).await;
    let (soft, hard) = open_file_limits(child.0.id());
    assert_eq!(soft, hard, "the soft limit is raised to the hard one");
    assert!(hard >= 256);
    let log = std::fs::read_to_string(dir.path().join("ca.log")).unwrap();
    if hard > 256 {
        assert!(
            log.contains("open-file limit (RLIMIT_NOFILE) raised to the hard limit")
                && log.contains("before=256")
                && log.contains(&format!("now={hard}")),
            "{log}"
        );
    }
}

/// Out of file descriptors, accept fails with EMFILE while the connection stays in the backlog:
/// the CA must back off (not retry at once for ever, pinning a CPU) and recover once
/// descriptors are free.
#[tokio::test]
async fn out_of_file_descriptors_the_accept_loop_backs_off_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Soft and hard: the CA cannot raise it.
    let child = start_ca_limited(dir.path(), port, "-n 64");
    wait_listening(port).await;
    let pid = child.0.id();
    assert_eq!(open_file_limits(pid), (64, 64));
    // More idle connections than it has descriptors (the TLS handshake waits 10 s for them).
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    let log_path = dir.path().join("ca.log");
    let started = Instant::now();
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap();
        if log.contains("accept failed") {
            assert!(
                log.contains("listener=\"ca\"") || log.contains("listener=ca"),
                "{log}"
            );
            assert!(log.contains("Too many open files"), "{log}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "no accept error logged: {log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While the backlog holds connections it cannot accept, it uses (almost) no CPU.
    let window = Duration::from_secs(2);
    let before = cpu_time(pid);
    tokio::time::sleep(window).await;
    let used = cpu_time(pid) - before;
    assert!(
        used < Duration::from_millis(250),
        "{used:?} of CPU in {window:?} while out of file descriptors: the accept loop spins"
    );
    drop(idle);
    // Descriptors free again: it serves.
    let root = std::fs::read_to_string(dir.path().join("ca/root-cert.pem")).unwrap();
    let client = GrpcCaClient::new(CaClientConfig {
        address: format!("localhost:{port}"),
        root_cert_pem: root,
        server_name: None,
        token: TokenSource::None,
        impersonate: false,
        timeout: Duration::from_secs(5),
    })
    .unwrap();
    let web: Identity = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client
            .sign(&web, csr(&web), Duration::from_secs(3600))
            .await
        {
            Ok(chain) => {
                assert_eq!(chain.len(), 2);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "not serving again: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

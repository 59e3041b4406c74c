//! The README's main command: the demo runs real ztunnels on the example YAML and reports what
//! it claims; editing the YAML changes the result.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn run_demo(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-demo"))
        .args(args)
        .output()
        .expect("run mesh-demo");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo")
}

/// The count printed for `who`, e.g. `  echo-v1       31 (52%)` or `  >= 3 s  ####  31 (52%)`:
/// the number before the percentage.
fn count(stdout: &str, who: &str) -> u64 {
    stdout
        .lines()
        .find(|l| l.trim_start().starts_with(who) && l.ends_with("%)"))
        .and_then(|l| l.split_whitespace().rev().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The example YAML moved to other loopback addresses (so runs can go in parallel), with
/// `edit` applied to the traffic rules and `extra` files added.
fn edited_examples(
    octet: u8,
    edit: impl Fn(String) -> String,
    extra: &[&str],
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let moved = |text: String| {
        text.replace("127.0.50.", &format!("127.0.{octet}."))
            .replace("10.96.50.", &format!("10.96.{octet}."))
    };
    let cluster = std::fs::read_to_string(examples().join("cluster.yaml")).unwrap();
    std::fs::write(dir.path().join("cluster.yaml"), moved(cluster)).unwrap();
    let ingress = std::fs::read_to_string(examples().join("ingress.yaml")).unwrap();
    std::fs::write(dir.path().join("ingress.yaml"), moved(ingress)).unwrap();
    let traffic = std::fs::read_to_string(examples().join("traffic.yaml")).unwrap();
    std::fs::write(dir.path().join("traffic.yaml"), edit(traffic)).unwrap();
    for name in extra {
        std::fs::copy(
            examples().join(format!("{name}.off")),
            dir.path().join(name),
        )
        .unwrap();
    }
    dir
}

/// The demo's traffic enters through the HTTPS ingress gateway and goes on through the
/// waypoint (`istio.io/ingress-use-waypoint` on the namespace).
#[test]
fn demo_runs_the_canary_with_the_delay_through_the_ingress_and_the_waypoint() {
    let (ok, stdout, stderr) = run_demo(&["--requests", "60", "--concurrency", "30"]);
    assert!(ok, "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("60 answered 200, 0 answered otherwise, 0 failed"),
        "{stdout}"
    );
    let (v1, v2) = (count(&stdout, "echo-v1"), count(&stdout, "echo-v2"));
    assert_eq!(v1 + v2, 60, "{stdout}");
    // 90/10: v2 gets about 6 of 60; v1 the rest.
    assert!(v1 > 40, "the canary split is 90/10: {stdout}");
    // Half the requests carry the injected 3 s delay, the others do not.
    let delayed = count(&stdout, ">= 3 s");
    assert!((10..=50).contains(&delayed), "{stdout}");
    // The command a user can run while it is up.
    assert!(
        stdout.contains("curl --resolve echo.example.com:8443:127.0.50.3 --cacert /")
            && stdout.contains("ingress-ca.crt https://echo.example.com:8443/"),
        "{stdout}"
    );
    assert!(
        stdout.contains("sending 60 requests to https://echo.example.com:8443/"),
        "{stdout}"
    );
    // The gateway answered them all, and each hop verified the identity of the one before,
    // over mutual TLS: the waypoint saw the gateway's.
    assert!(
        stdout.contains(
            "ingress saw  an outside client -> echo.demo.svc.cluster.local  HTTPS  HTTP 200"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "waypoint saw spiffe://cluster.local/ns/istio-ingress/sa/istio-ingress -> echo-v1  \
             mutual TLS"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "node-b saw  spiffe://cluster.local/ns/demo/sa/waypoint -> echo-v1  mutual TLS"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("waypoint  spiffe://cluster.local/ns/demo/sa/waypoint"),
        "{stdout}"
    );
}

#[test]
fn editing_the_yaml_changes_the_result() {
    // A blue-green switch: everything to v2, no delay.
    let dir = edited_examples(
        51,
        |t| {
            t.replace("weight: 90", "weight: 0")
                .replace("weight: 10", "weight: 100")
                .replace("value: 50", "value: 0")
        },
        &[],
    );
    let (ok, stdout, stderr) =
        run_demo(&["--requests", "40", "--config", dir.path().to_str().unwrap()]);
    assert!(ok, "demo failed:\n{stdout}\n{stderr}");
    assert_eq!(count(&stdout, "echo-v2"), 40, "{stdout}");
    assert_eq!(count(&stdout, "echo-v1"), 0, "{stdout}");
    assert_eq!(count(&stdout, ">= 3 s"), 0, "{stdout}");
}

#[test]
fn an_l7_deny_policy_makes_the_waypoint_answer_403() {
    let dir = edited_examples(
        52,
        |t| t.replace("value: 50", "value: 0"),
        &["deny-clients.yaml"],
    );
    let (ok, stdout, stderr) =
        run_demo(&["--requests", "20", "--config", dir.path().to_str().unwrap()]);
    assert!(ok, "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("0 answered 200, 20 answered otherwise, 0 failed"),
        "{stdout}"
    );
    assert_eq!(count(&stdout, "HTTP 403 from the waypoint"), 20, "{stdout}");
}

#[test]
fn from_pod_sends_from_the_mesh_pod_through_ztunnel() {
    let dir = edited_examples(53, |t| t.replace("value: 50", "value: 0"), &[]);
    let (ok, stdout, stderr) = run_demo(&[
        "--requests",
        "20",
        "--from-pod",
        "--config",
        dir.path().to_str().unwrap(),
    ]);
    assert!(ok, "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("sending 20 requests to http://echo.demo.svc.cluster.local/"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "waypoint saw spiffe://cluster.local/ns/demo/sa/sleep -> echo-v1  mutual TLS"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("ingress saw"), "{stdout}");
    assert_eq!(count(&stdout, "echo-v1") + count(&stdout, "echo-v2"), 20);
}

/// With `--serve` the demo stays up, and the printed command (`curl --resolve HOST:PORT:IP
/// --cacert FILE URL`) reaches the echo service through the gateway: done here with rustls,
/// from exactly the printed arguments. Ctrl-C (SIGINT) ends it cleanly.
#[test]
fn serve_keeps_the_gateway_up_for_the_printed_curl_command() {
    use std::io::{BufRead, Read, Write};
    let dir = edited_examples(54, |t| t.replace("value: 50", "value: 0"), &[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-demo"))
        .args(["--requests", "5", "--serve", "--config"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run mesh-demo");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    // Stopped by its PID whatever happens below.
    struct Stop(nix::unistd::Pid);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGKILL);
        }
    }
    let _stop = Stop(pid);
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let mut curl = None;
    loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "the demo ended before serving:\n{seen}"
        );
        seen.push_str(&line);
        if line.trim_start().starts_with("try it") {
            curl = Some(line.clone());
        }
        if line.starts_with("Up until Ctrl-C") {
            break;
        }
    }
    let curl = curl.unwrap_or_else(|| panic!("no curl command printed:\n{seen}"));
    let words: Vec<&str> = curl.split_whitespace().collect();
    let after = |flag: &str| {
        let i = words.iter().position(|w| *w == flag).unwrap();
        words[i + 1]
    };
    // HOST:PORT:IP
    let resolve: Vec<&str> = after("--resolve").split(':').collect();
    let (host, port, ip) = (resolve[0], resolve[1], resolve[2]);
    let ca = std::fs::read(after("--cacert")).unwrap();
    let url = words.iter().find(|w| w.starts_with("https://")).unwrap();
    assert_eq!(*url, format!("https://{host}:{port}/"));

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca) {
        let cert: rustls_pki_types::CertificateDer<'static> = cert.unwrap();
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(host.to_owned()).unwrap();
    let mut tls = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tcp = std::net::TcpStream::connect(format!("{ip}:{port}")).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).to_ascii_lowercase();
    assert!(response.starts_with("http/1.1 200"), "{response}");
    assert!(response.contains("hello from echo-v"), "{response}");

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{status}: {stderr}");
}

#[test]
fn demo_rejects_bad_arguments() {
    let (ok, _, stderr) = run_demo(&["--requests", "zero"]);
    assert!(!ok);
    assert!(
        stderr.contains("--requests must be a positive number"),
        "{stderr}"
    );
}

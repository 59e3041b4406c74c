//! The README's main command: the demo runs real ztunnels on the example YAML and reports what
//! it claims; editing the YAML changes the result.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

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

/// The count printed for `backend`, e.g. `  echo-v1       31 (52%)`.
fn count(stdout: &str, backend: &str) -> u64 {
    stdout
        .lines()
        .find(|l| l.trim_start().starts_with(backend) && l.contains('%'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn demo_spreads_requests_over_both_versions_with_mtls_identities() {
    let (ok, stdout, stderr) = run_demo(&["--requests", "60"]);
    assert!(ok, "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("60 answered, 0 refused by policy, 0 failed"),
        "{stdout}"
    );
    let (v1, v2) = (count(&stdout, "echo-v1"), count(&stdout, "echo-v2"));
    assert_eq!(v1 + v2, 60, "{stdout}");
    assert!(
        v1 > 0 && v2 > 0,
        "both endpoints of the service serve: {stdout}"
    );
    for backend in ["echo-v1", "echo-v2"] {
        assert!(
            stdout.contains(&format!(
                "{backend} <- spiffe://cluster.local/ns/demo/sa/sleep  mutual TLS 1.3 (HBONE)"
            )),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains("node-a  spiffe://cluster.local/ns/demo/sa/sleep"),
        "{stdout}"
    );
}

#[test]
fn editing_the_yaml_changes_the_result() {
    // The example YAML with a DENY policy for echo-v2 added (on other loopback addresses, so it
    // can run beside the test above).
    let dir = tempfile::tempdir().unwrap();
    let cluster = std::fs::read_to_string(examples().join("cluster.yaml"))
        .unwrap()
        .replace("127.0.50.", "127.0.51.")
        .replace("10.96.50.", "10.96.51.");
    std::fs::write(dir.path().join("cluster.yaml"), cluster).unwrap();
    std::fs::copy(
        examples().join("deny-v2.yaml.off"),
        dir.path().join("deny-v2.yaml"),
    )
    .unwrap();
    let (ok, stdout, stderr) =
        run_demo(&["--requests", "40", "--config", dir.path().to_str().unwrap()]);
    assert!(ok, "demo failed:\n{stdout}\n{stderr}");
    let v1 = count(&stdout, "echo-v1");
    assert_eq!(count(&stdout, "echo-v2"), 0, "{stdout}");
    assert!(v1 > 0 && v1 < 40, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{v1} answered, {} refused by policy, 0 failed",
            40 - v1
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("echo-v2 refused spiffe://cluster.local/ns/demo/sa/sleep by policy"),
        "{stdout}"
    );
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

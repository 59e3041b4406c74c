//! The README's main command: the demo runs to completion and reports what it claims.

#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn demo_reports_mtls_identities_and_both_versions() {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-demo"))
        .args(["--requests", "40"])
        .output()
        .expect("run mesh-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("Requests: 40 in"), "{stdout}");
    assert!(stdout.contains(", 0 failed"), "{stdout}");
    assert!(stdout.contains("echo-v1:    20 (50%)"), "{stdout}");
    assert!(stdout.contains("echo-v2:    20 (50%)"), "{stdout}");
    assert!(
        stdout.contains("echo-v1  <- spiffe://cluster.local/ns/demo/sa/sleep (20 tunnels)"),
        "{stdout}"
    );
    assert!(stdout.contains("mutual TLS TLSv1_3 TLS13_AES"), "{stdout}");
    assert!(stdout.contains("2 pooled, carrying 40 tunnels"), "{stdout}");
}

#[test]
fn demo_rejects_bad_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-demo"))
        .args(["--requests", "zero"])
        .output()
        .expect("run mesh-demo");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--requests must be a positive number"));
}

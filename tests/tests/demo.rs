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

#[test]
fn demo_runs_the_canary_with_the_delay_through_the_waypoint() {
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
    // Each hop verified the identity of the one before, over mutual TLS.
    assert!(
        stdout.contains(
            "waypoint saw spiffe://cluster.local/ns/demo/sa/sleep -> echo-v1  mutual TLS"
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
        &["deny-sleep.yaml"],
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
fn demo_rejects_bad_arguments() {
    let (ok, _, stderr) = run_demo(&["--requests", "zero"]);
    assert!(!ok);
    assert!(
        stderr.contains("--requests must be a positive number"),
        "{stderr}"
    );
}

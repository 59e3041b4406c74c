//! Capture mode `proc` in real network namespaces (needs root): a pod's namespace is found by
//! its IP among the namespaces of running processes, as on a node, and the capture rules are
//! installed in it, again idempotently after a "restart".
//!
//! The pod namespace is created with `ip netns add`, given a process (`sleep`, standing for the
//! pod's sandbox), and then unnamed, so only `/proc` can lead to it. Every namespace and
//! process is removed at the end, also when the test fails.
//!
//! Without root the tests print why and pass, except under `CI=true`, where they fail.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh::model::Workload;
use mesh::model::translate::{Kind, Object, ObjectKey, TranslateConfig, Translator};
use ztunnel::capture::{NetNs, nft, original_destination};
use ztunnel::netns_pods::ProcNetnsFactory;
use ztunnel::pods::NetworkFactory;

const WAIT: Duration = Duration::from_secs(5);

/// Whether the test can run; without root it skips locally but fails under `CI=true`.
fn needs_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but not running as root: the proc capture tests need root (network \
         namespaces) and must not be skipped in CI"
    );
    println!("skipped: needs root (network namespaces)");
    false
}

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A pod's network namespace held by a process, as a pod sandbox holds it. Drop kills the
/// process (freeing the namespace) and removes the name if it is still there.
struct Pod {
    name: String,
    resident: Child,
    address: Ipv4Addr,
}

impl Pod {
    fn start(address: Ipv4Addr) -> Self {
        let name = format!("proccap-{}", std::process::id());
        ip(&["netns", "add", &name]);
        // Until the resident runs, Drop must still remove the name.
        let cleanup = NameGuard(name.clone());
        let ns = |args: &[&str]| ip(&[&["-n", &name], args].concat());
        ns(&["link", "set", "lo", "up"]);
        // The kernel may lack the dummy driver; a veth with both ends inside serves as well.
        ns(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ]);
        ns(&["addr", "add", &format!("{address}/32"), "dev", "eth0"]);
        ns(&["link", "set", "eth0", "up"]);
        ns(&["link", "set", "eth1", "up"]);
        // Somewhere to send outbound connections, so the output hook sees them.
        ns(&["route", "add", "default", "dev", "eth0"]);
        let resident = Command::new("ip")
            .args(["netns", "exec", &name, "sleep", "60"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::mem::forget(cleanup);
        let pod = Self {
            name,
            resident,
            address,
        };
        let expected = NetNs::from_name(&pod.name).unwrap().id().unwrap();
        let deadline = Instant::now() + WAIT;
        while NetNs::from_pid(pod.resident.id()).and_then(|n| n.id()).ok() != Some(expected) {
            assert!(
                Instant::now() < deadline,
                "the resident never entered the netns"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        pod
    }

    /// Removes the `/var/run/netns` name: the namespace lives on through its process only.
    fn unname(&self) {
        ip(&["netns", "del", &self.name]);
    }

    fn netns(&self) -> NetNs {
        NetNs::from_pid(self.resident.id()).unwrap()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.resident.kill();
        let _ = self.resident.wait();
        drop(NameGuard(self.name.clone()));
    }
}

struct NameGuard(String);

impl Drop for NameGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

/// The workload the translation makes of a running pod with this IP.
fn workload(name: &str, ip: IpAddr) -> Workload {
    let key = ObjectKey::new(Kind::Pod, Some("demo"), name);
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"nodeName": "node-a", "containers": [{"name": "main"}]},
        "status": {"phase": "Running", "podIP": ip.to_string()},
    });
    let state = Translator::new(TranslateConfig::default())
        .translate([Object::from_value(&key, pod)])
        .state;
    state.workloads[&format!("demo/{name}")].as_ref().clone()
}

/// An address no concurrent run uses: derived from our pid, in 10.251.0.0/16.
fn unique_address() -> Ipv4Addr {
    let pid = std::process::id();
    Ipv4Addr::new(10, 251, (pid % 250) as u8, (pid / 250 % 250) as u8 + 1)
}

/// Connects from inside the pod to a non-local address and returns the original
/// destination the 15001 listener (opened through the pod's network) reads.
async fn redirected_destination(
    pod: &Pod,
    network: &std::sync::Arc<dyn ztunnel::pods::PodNetwork>,
) -> SocketAddr {
    let listener = network
        .bind(SocketAddr::from(([0, 0, 0, 0], 15001)))
        .unwrap();
    let target: SocketAddr = "192.0.2.10:8080".parse().unwrap();
    let netns = pod.netns();
    let client = std::thread::spawn(move || {
        netns
            .run(move || {
                let mut stream = std::net::TcpStream::connect_timeout(&target, WAIT)?;
                stream.write_all(b"x")?;
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte)
            })
            .unwrap()
    });
    let (mut accepted, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("redirected to 15001")
        .unwrap();
    let destination = original_destination(&accepted).unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut accepted, b"y")
        .await
        .unwrap();
    client.join().unwrap().unwrap();
    destination
}

#[tokio::test]
async fn a_pod_is_found_by_its_ip_in_proc_and_captured_idempotently() {
    if !needs_root() {
        return;
    }
    let address = unique_address();
    let pod = Pod::start(address);
    pod.unname();
    let web = workload("web", IpAddr::V4(pod.address));

    // A ztunnel that starts after the pod: the first sync captures it.
    let factory = ProcNetnsFactory::new();
    let network = factory.network_for(&web).expect("pod found and captured");
    assert!(network.captures());
    assert!(nft::is_installed(&pod.netns()).unwrap());
    // Listeners made through it live in the pod: only there is the pod's IP local.
    network
        .bind(SocketAddr::new(IpAddr::V4(address), 15008))
        .expect("HBONE listener on the pod IP, inside the pod");
    assert_eq!(
        redirected_destination(&pod, &network).await,
        "192.0.2.10:8080".parse().unwrap()
    );
    drop(network);

    // A restarted ztunnel captures the same pod again: the table is replaced, not doubled,
    // and traffic is redirected as before.
    let restarted = ProcNetnsFactory::new();
    let again = restarted.network_for(&web).expect("re-captured");
    assert!(nft::is_installed(&pod.netns()).unwrap());
    assert_eq!(
        redirected_destination(&pod, &again).await,
        "192.0.2.10:8080".parse().unwrap()
    );
    // Found through the index the first lookup built, and still right.
    let third = restarted.network_for(&web).expect("found again");
    third.teardown();
    assert!(
        !nft::is_installed(&pod.netns()).unwrap(),
        "teardown removes the table"
    );
}

#[tokio::test]
async fn pods_that_cannot_be_captured_are_explained() {
    if !needs_root() {
        return;
    }
    let factory = ProcNetnsFactory::new();
    // TEST-NET-1 is on no interface: not (yet) on this node.
    let nowhere = workload("nowhere", "192.0.2.1".parse().unwrap());
    let error = factory.network_for(&nowhere).unwrap_err();
    assert!(
        error.contains("no network namespace on this node carries pod demo/nowhere's IP 192.0.2.1")
            && error.contains("hostPID"),
        "{error}"
    );
    // An address of ztunnel's own namespace: a host-network pod, never captured.
    let host = workload("host", IpAddr::V4(Ipv4Addr::LOCALHOST));
    let error = factory.network_for(&host).unwrap_err();
    assert!(error.contains("ztunnel's own network namespace"), "{error}");
    // Still refused once the index is warm.
    assert!(factory.network_for(&host).is_err());
}

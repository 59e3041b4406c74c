//! In-pod capture in real network namespaces (needs root): a `pod` namespace joined by a veth to
//! a `peer` namespace, the capture table installed in `pod` over netlink, and listeners opened in
//! `pod` through `NetNs`. Every listener answers with its name and the original destination it
//! read, so each assertion says which socket a connection really reached.
//!
//! Without root the tests print why and pass, except under `CI=true`, where they fail.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::capture::{self, CaptureConfig, Error, NetNs, find_netns_by_ip, nft};

const APP_PORT: u16 = 8080;
const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 250, 1, 1);
const PEER_V4: Ipv4Addr = Ipv4Addr::new(10, 250, 1, 2);
/// A second address of `peer`, standing for the node that sends kubelet probes.
const PROBE_V4: Ipv4Addr = Ipv4Addr::new(10, 250, 1, 3);
const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x250, 1, 0, 0, 0, 0, 1);
const PEER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x250, 1, 0, 0, 0, 0, 2);
const PROBE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x250, 1, 0, 0, 0, 0, 3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the test can run; without root it skips locally but fails under `CI=true`.
fn needs_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but not running as root: the capture tests need root (network namespaces) \
         and must not be skipped in CI"
    );
    println!("skipped: needs root (network namespaces)");
    false
}

fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run `ip {}`: {error}", args.join(" ")));
    assert!(
        output.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A named network namespace, deleted on drop (also when the test fails).
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn create(role: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "capture-{}-{}-{role}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    /// Runs `ip -n <this netns> args...`.
    fn ip(&self, args: &[&str]) {
        ip(&[&["-n", &self.name], args].concat());
    }

    fn open(&self) -> NetNs {
        NetNs::from_name(&self.name).expect("open test netns")
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// `pod` (10.250.1.1, fd00:250:1::1) and `peer` (.2 and .3, ::2 and ::3) joined by a veth.
/// Addresses repeat across tests: each test has namespaces of its own.
///
/// For about a second after the veth comes up, the kernel drops the first IPv6 packets from
/// `pod` to `peer` (seen as `Ip6InNoRoutes` in `peer`), so such a connection completes on
/// TCP's SYN retry after 1 s, well inside [`IO_TIMEOUT`]. Waiting for it up front would cost
/// every test that second instead of only the one that meets it.
struct Topology {
    pod: TestNetns,
    peer: TestNetns,
}

impl Topology {
    fn new() -> Self {
        let pod = TestNetns::create("pod");
        let peer = TestNetns::create("peer");
        pod.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &peer.name,
        ]);
        for (netns, addresses) in [
            (&pod, vec![format!("{POD_V4}/24"), format!("{POD_V6}/64")]),
            (
                &peer,
                vec![
                    format!("{PEER_V4}/24"),
                    format!("{PROBE_V4}/24"),
                    format!("{PEER_V6}/64"),
                    format!("{PROBE_V6}/64"),
                ],
            ),
        ] {
            for address in &addresses {
                // nodad: IPv6 addresses are usable at once instead of after duplicate detection.
                netns.ip(&["addr", "add", address, "dev", "eth0", "nodad"]);
            }
            netns.ip(&["link", "set", "eth0", "up"]);
        }
        Self { pod, peer }
    }
}

/// Serves `listener` (opened in some netns): each connection gets one line, the server's name
/// and the original destination it reads (or `-` when there is none), then EOF.
fn serve(listener: std::net::TcpListener, name: &'static str) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let destination = capture::original_destination(&stream)
                .map_or_else(|_| "-".to_owned(), |address| address.to_string());
            let _ = stream
                .write_all(format!("{name} {destination}\n").as_bytes())
                .await;
            let _ = stream.shutdown().await;
        }
    });
}

/// Opens `port` on `[::]` (IPv4 and IPv6) in `netns` and serves it under `name`.
fn listen(netns: &NetNs, port: u16, name: &'static str) {
    let listener = netns
        .tcp_listener(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))
        .expect("listener in netns");
    serve(listener, name);
}

/// Connects with `socket` (created in some netns) and returns the line the server sent.
async fn exchange(socket: Socket, to: SocketAddr) -> io::Result<String> {
    socket.set_nonblocking(true)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    let mut stream = tokio::time::timeout(IO_TIMEOUT, socket.connect(to))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect to {to}")))??;
    let mut line = String::new();
    tokio::time::timeout(IO_TIMEOUT, stream.read_to_string(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("read from {to}")))??;
    Ok(line.trim_end().to_owned())
}

/// An ordinary (unmarked) connection from inside `netns`, optionally from a given source.
async fn connect(netns: &NetNs, to: impl Into<SocketAddr>, from: Option<IpAddr>) -> String {
    let to = to.into();
    let socket = netns
        .run(|| Socket::new(Domain::for_address(to), Type::STREAM, None))
        .expect("enter netns")
        .expect("socket");
    if let Some(from) = from {
        socket
            .bind(&SocketAddr::new(from, 0).into())
            .expect("bind source");
    }
    exchange(socket, to)
        .await
        .unwrap_or_else(|error| panic!("connect to {to} from {}: {error}", netns.description()))
}

/// `peer` runs the real server on 8080; `pod` runs its app on 8080 and ztunnel's three
/// listeners, opened from the host through `NetNs`.
fn start_servers(pod: &NetNs, peer: &NetNs) {
    listen(peer, APP_PORT, "peer");
    listen(pod, APP_PORT, "app");
    listen(pod, 15001, "outbound");
    listen(pod, 15006, "inbound");
    listen(pod, 15008, "hbone");
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[tokio::test]
async fn outbound_tcp_is_redirected_to_15001_with_its_original_destination() {
    if !needs_root() {
        return;
    }
    let topology = Topology::new();
    let (pod, peer) = (topology.pod.open(), topology.peer.open());
    start_servers(&pod, &peer);
    // Without the rules the connection reaches the peer, so what follows is the rules' doing.
    assert_eq!(connect(&pod, v4(PEER_V4, APP_PORT), None).await, "peer -");

    nft::install(&pod, &CaptureConfig::default()).expect("install");

    assert_eq!(
        connect(&pod, v4(PEER_V4, APP_PORT), None).await,
        format!("outbound {PEER_V4}:{APP_PORT}")
    );
    assert_eq!(
        connect(&pod, v6(PEER_V6, APP_PORT), None).await,
        format!("outbound [{PEER_V6}]:{APP_PORT}")
    );
    // Loopback and the pod's own address stay inside the pod.
    for local in [
        v4(Ipv4Addr::LOCALHOST, APP_PORT),
        v6(Ipv6Addr::LOCALHOST, APP_PORT),
        v4(POD_V4, APP_PORT),
    ] {
        assert!(
            connect(&pod, local, None).await.starts_with("app "),
            "{local} should reach the app directly"
        );
    }
}

#[tokio::test]
async fn marked_sockets_bypass_capture() {
    if !needs_root() {
        return;
    }
    let topology = Topology::new();
    let (pod, peer) = (topology.pod.open(), topology.peer.open());
    start_servers(&pod, &peer);
    let config = CaptureConfig::default();
    nft::install(&pod, &config).expect("install");

    for to in [v4(PEER_V4, APP_PORT), v6(PEER_V6, APP_PORT)] {
        let socket = pod
            .outbound_socket(Domain::for_address(to), config.mark)
            .expect("marked socket");
        let line = exchange(socket, to).await.expect("marked connection");
        assert!(line.starts_with("peer "), "marked {to} reached {line:?}");
    }
    // Bits outside the mask are ignored, a different mark is captured.
    let socket = pod
        .outbound_socket(Domain::IPV4, config.mark | 0x1000)
        .expect("marked socket");
    let line = exchange(socket, v4(PEER_V4, APP_PORT))
        .await
        .expect("connect");
    assert!(line.starts_with("peer "), "{line:?}");
    let socket = pod
        .outbound_socket(Domain::IPV4, config.mark + 1)
        .expect("marked socket");
    let line = exchange(socket, v4(PEER_V4, APP_PORT))
        .await
        .expect("connect");
    assert_eq!(line, format!("outbound {PEER_V4}:{APP_PORT}"));
}

#[tokio::test]
async fn inbound_tcp_is_redirected_to_15006_except_hbone() {
    if !needs_root() {
        return;
    }
    let topology = Topology::new();
    let (pod, peer) = (topology.pod.open(), topology.peer.open());
    start_servers(&pod, &peer);
    nft::install(&pod, &CaptureConfig::default()).expect("install");

    assert_eq!(
        connect(&peer, v4(POD_V4, APP_PORT), None).await,
        format!("inbound {POD_V4}:{APP_PORT}")
    );
    assert_eq!(
        connect(&peer, v6(POD_V6, APP_PORT), None).await,
        format!("inbound [{POD_V6}]:{APP_PORT}")
    );
    assert!(
        connect(&peer, v4(POD_V4, 15008), None)
            .await
            .starts_with("hbone ")
    );
    assert!(
        connect(&peer, v6(POD_V6, 15008), None)
            .await
            .starts_with("hbone ")
    );
}

#[tokio::test]
async fn probes_from_configured_sources_reach_the_app_port() {
    if !needs_root() {
        return;
    }
    let topology = Topology::new();
    let (pod, peer) = (topology.pod.open(), topology.peer.open());
    start_servers(&pod, &peer);
    let config = CaptureConfig {
        probe_sources: vec![PROBE_V4.into(), PROBE_V6.into()],
        ..CaptureConfig::default()
    };
    nft::install(&pod, &config).expect("install");

    let probe = connect(&peer, v4(POD_V4, APP_PORT), Some(PROBE_V4.into())).await;
    assert!(probe.starts_with("app "), "{probe:?}");
    let probe = connect(&peer, v6(POD_V6, APP_PORT), Some(PROBE_V6.into())).await;
    assert!(probe.starts_with("app "), "{probe:?}");
    // The same peer from another address is captured.
    let other = connect(&peer, v4(POD_V4, APP_PORT), Some(PEER_V4.into())).await;
    assert_eq!(other, format!("inbound {POD_V4}:{APP_PORT}"));
}

#[tokio::test]
async fn remove_restores_direct_connectivity_and_install_is_idempotent() {
    if !needs_root() {
        return;
    }
    let topology = Topology::new();
    let (pod, peer) = (topology.pod.open(), topology.peer.open());
    start_servers(&pod, &peer);
    let config = CaptureConfig {
        redirect_dns: true,
        ..CaptureConfig::default()
    };

    assert!(!nft::is_installed(&pod).expect("query"));
    nft::remove(&pod).expect("removing an absent table succeeds");
    nft::install(&pod, &config).expect("install");
    nft::install(&pod, &config).expect("install again replaces");
    assert!(nft::is_installed(&pod).expect("query"));
    // Still one working ruleset after the replace.
    assert!(
        connect(&pod, v4(PEER_V4, APP_PORT), None)
            .await
            .starts_with("outbound ")
    );

    nft::remove(&pod).expect("remove");
    assert!(!nft::is_installed(&pod).expect("query"));
    assert!(
        connect(&pod, v4(PEER_V4, APP_PORT), None)
            .await
            .starts_with("peer ")
    );
    assert!(
        connect(&peer, v4(POD_V4, APP_PORT), None)
            .await
            .starts_with("app ")
    );
    nft::remove(&pod).expect("removing twice succeeds");
}

#[tokio::test]
async fn a_vanished_netns_fails_cleanly() {
    if !needs_root() {
        return;
    }
    // Deleted before we open it: the error names it.
    let gone = TestNetns::create("gone");
    let name = gone.name.clone();
    drop(gone);
    let error = NetNs::from_name(&name).expect_err("deleted netns");
    assert!(matches!(error, Error::Open { .. }), "{error:?}");
    assert!(error.to_string().contains(&name), "{error}");

    // The process whose namespace we wanted has exited.
    let mut child = Command::new("true").spawn().expect("spawn");
    let pid = child.id();
    child.wait().expect("wait");
    let error = NetNs::from_pid(pid).expect_err("exited process");
    assert!(
        error.to_string().contains(&format!("/proc/{pid}/ns/net")),
        "{error}"
    );

    // A stale /var/run/netns entry (a plain file) is not mistaken for a namespace.
    let stale = tempfile::NamedTempFile::new().expect("temp file");
    let error = NetNs::open(stale.path(), "stale entry").expect_err("plain file");
    assert!(matches!(error, Error::NotANamespace { .. }), "{error:?}");

    // Another kind of namespace is refused when entered, before anything is installed.
    let uts = NetNs::open("/proc/self/ns/uts", "uts namespace").expect("nsfs file");
    let error = nft::install(&uts, &CaptureConfig::default()).expect_err("not a netns");
    assert!(matches!(error, Error::Enter { .. }), "{error:?}");
    assert!(
        error.to_string().contains("not a network namespace"),
        "{error}"
    );

    // A handle pins its namespace: deleting the name midway leaves a namespace we can still
    // finish with, and clean.
    let netns = TestNetns::create("pinned");
    let pinned = netns.open();
    drop(netns);
    nft::install(&pinned, &CaptureConfig::default()).expect("install into pinned netns");
    assert!(nft::is_installed(&pinned).expect("query"));
    nft::remove(&pinned).expect("remove");
    assert!(!nft::is_installed(&pinned).expect("query"));
}

/// A process living in a namespace, killed on drop, as a pod's sandbox process.
struct Resident(Child);

impl Drop for Resident {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn find_netns_by_ip_finds_the_pod() {
    if !needs_root() {
        return;
    }
    // An address no other test (or concurrent run) uses: derived from our pid, outside
    // 10.250.1.0/24.
    let pid = std::process::id();
    let unique_v4 = Ipv4Addr::new(
        10,
        250,
        100 + (pid % 150) as u8,
        (pid / 150 % 250) as u8 + 1,
    );
    let unique_v6 = Ipv6Addr::new(0xfd00, 0x250, 0xff, 0, 0, 0, (pid >> 16) as u16, pid as u16);
    let pod = TestNetns::create("pod");
    // The kernel may lack the dummy driver; a veth with both ends in the pod serves as well.
    pod.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    pod.ip(&["addr", "add", &format!("{unique_v4}/32"), "dev", "eth0"]);
    pod.ip(&[
        "addr",
        "add",
        &format!("{unique_v6}/128"),
        "dev",
        "eth0",
        "nodad",
    ]);
    pod.ip(&["link", "set", "eth0", "up"]);
    let expected = pod.open().id().expect("id");

    // Only namespaces with a process in them are found, as on a node.
    assert!(find_netns_by_ip(unique_v4.into()).expect("scan").is_none());
    let resident = Resident(
        Command::new("ip")
            .args(["netns", "exec", &pod.name, "sleep", "60"])
            .spawn()
            .expect("spawn resident"),
    );
    let deadline = Instant::now() + IO_TIMEOUT;
    while NetNs::from_pid(resident.0.id()).and_then(|n| n.id()).ok() != Some(expected) {
        assert!(
            Instant::now() < deadline,
            "resident never entered the netns"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    for ip in [IpAddr::from(unique_v4), IpAddr::from(unique_v6)] {
        let found = find_netns_by_ip(ip)
            .expect("scan")
            .unwrap_or_else(|| panic!("{ip} not found"));
        assert_eq!(found.id().expect("id"), expected, "{ip} found in {found:?}");
    }
    // TEST-NET-1 is on no interface.
    let nowhere = Ipv4Addr::new(192, 0, 2, 1);
    assert!(find_netns_by_ip(nowhere.into()).expect("scan").is_none());
}

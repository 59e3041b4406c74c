//! The virtual cluster: nodes and pods as Linux network namespaces, with the real `ztunnel`
//! binary running once per node, as a DaemonSet pod would, configured by environment variables,
//! reading the file source and capturing pods in their own namespaces (`CAPTURE_MODE=netns:`).
//!
//! [`Cluster::builder`] describes nodes, namespaces, pods and services fluently; `build` creates
//! the namespaces, writes the YAML a cluster would serve, starts an in-process CA and one ztunnel
//! per node, and waits until every node is ready and has captured its enrolled pods. The
//! [`Cluster`] then lets a test run unmodified clients and servers inside pods, change the YAML
//! live (waiting until every node applied it), read each node's admin ports, signal its ztunnel
//! and capture frames on the wire between nodes. Everything is removed on drop, also when the
//! test fails; a failing test prints the ztunnels' logs.
//!
//! Topology of one run (`S` is a per-run octet, `i` the node's index, `k` the pod's):
//!
//! ```text
//! underlay netns   br0 <- n0 .. nN (veth)                       no addresses: a switch
//! node netns       uplink 10.S.0.(i+1)/24      (peer n<i> in the underlay)
//!                  br0    10.S.(i+1).1/24      the pods' gateway, and the kubelet probe source
//!                  ip_forward=1, a route to every other node's pod CIDR via its uplink
//! pod netns        eth0   10.S.(i+1).(k+2)/24  (peer p<k> on the node's br0), default route
//! service VIPs     10.96.S.(j+1)               never on any interface: capture redirects them
//! ```
//!
//! Isolation between runs (tests in parallel, several test binaries) comes from the namespaces:
//! every namespace name carries the run id (`vcluster-<pid>-<counter>-`), and every link lives
//! only inside the run's own namespaces, never in the host's, so link names cannot collide and
//! vanish with their namespace. The ztunnels run in the host namespace (as Istio's runs in the
//! node's) and open their pod sockets inside the pods' namespaces; their own ports are on
//! 127.0.0.1. No address of a run is routed from the host, and traffic only flows between the
//! run's namespaces and loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::future::Future;
use std::io::{self, Read as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use ztunnel::capture::NetNs;

use crate::{RunningCa, TRUST_DOMAIN, TestPki, start_ca};

pub mod http;
mod waypoint;
pub use waypoint::Waypoint;

/// The label that enrols a namespace (`=ambient`) or opts a pod out (`=none`).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// ztunnel's inbound HBONE port in every captured pod.
pub const HBONE_PORT: u16 = 15008;
/// How long a client waits for its connection to be accepted.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole exchange (and each admin request) may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a node's ztunnel may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long every node may take to apply a configuration change.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(15);
/// The interval of every bounded wait's polling.
const POLL: Duration = Duration::from_millis(25);

/// Every namespace a run creates starts with this, then `<pid>-<counter>-`.
const NETNS_PREFIX: &str = "vcluster-";
/// A namespace object whose label counts configuration writes, so the harness can tell when a
/// node has loaded a given write (see [`Cluster::update`]).
const GENERATION_NAMESPACE: &str = "vcluster-generation";
const GENERATION_LABEL: &str = "mesh-tests/generation";
/// The file source reads files in name order: the generation file comes first and is written
/// last, so a load that sees a generation reads every other file after that write.
const GENERATION_FILE: &str = "00-generation.yaml";
const CLUSTER_FILE: &str = "10-cluster.yaml";
/// Documents added with [`ClusterBuilder::yaml`] / [`Cluster::apply`] go to `50-<name>.yaml`.
const EXTRA_FILE_PREFIX: &str = "50-";
/// How many lines of each node's log a failing test prints.
const LOG_TAIL_LINES: usize = 200;
/// `ETH_P_ALL`: an `AF_PACKET` socket with this protocol sees every frame.
const ETH_P_ALL: u16 = 0x0003;

/// Whether a test that needs root can run: without root it prints why and returns `false`
/// (the test then passes), except under `CI=true`, where it panics so coverage never silently
/// disappears.
pub fn needs_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but not running as root: the virtual-cluster tests need root (network \
         namespaces) and must not be skipped in CI"
    );
    println!("skipped: needs root (network namespaces)");
    false
}

/// A string no other test or run sends, to look for on the wire.
pub fn unique_marker() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "vcluster-marker-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Deterministic bytes for transfers that are compared end to end.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    crate::PatternSource::new(seed).fill(&mut data);
    data
}

/// Polls `check` until it returns `Ok`, for at most `limit`; on timeout returns its last `Err`
/// (which should say what was still missing).
pub async fn eventually<T, E, F, Fut>(limit: Duration, mut check: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Finds the `ztunnel` binary built with the same profile as the running test: next to the test
/// executable (`target/<profile>/deps/<test>` -> `target/<profile>/ztunnel`), or `ZTUNNEL_BIN`.
pub fn ztunnel_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("ztunnel", "ZTUNNEL_BIN")
}

/// The `waypoint` binary, found as [`ztunnel_binary`] finds ztunnel's (or `WAYPOINT_BIN`).
pub fn waypoint_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("waypoint", "WAYPOINT_BIN")
}

fn workspace_binary(name: &str, env_var: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("{env_var}={} is not a file", path.display());
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(3)
        .map(|dir| dir.join(name))
        .collect();
    if let Some(found) = candidates.iter().find(|c| c.is_file()) {
        warn_if_stale(found);
        return Ok(found.clone());
    }
    let profile = exe
        .ancestors()
        .nth(2)
        .and_then(|p| p.file_name())
        .map_or_else(|| "debug".to_owned(), |p| p.to_string_lossy().into_owned());
    let build = match profile.as_str() {
        "debug" => format!("cargo build -p {name}"),
        "release" => format!("cargo build -p {name} --release"),
        other => format!("cargo build -p {name} --profile {other}"),
    };
    bail!(
        "the {name} binary is not next to the test executable {} (looked for {}); build it with \
         the profile the tests use: `{build}` (set {env_var} to use another binary)",
        exe.display(),
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Warns (once) when the binary is older than the ztunnel library the tests were built with:
/// `cargo nextest run -p mesh-tests` rebuilds the library but not the binary, so a change in
/// ztunnel would otherwise be tested against the old binary. (`--workspace` builds both.)
fn warn_if_stale(binary: &Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let Some(binary_time) = modified(binary) else {
            return;
        };
        let Some(deps) = binary.parent().map(|d| d.join("deps")) else {
            return;
        };
        let newest_library = std::fs::read_dir(deps)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("libztunnel-") && name.ends_with(".rlib")
            })
            .filter_map(|e| modified(&e.path()))
            .max();
        if newest_library.is_some_and(|library| library > binary_time) {
            eprintln!(
                "warning: {} is older than the ztunnel library these tests were built with; \
                 rebuild it (`cargo build -p ztunnel` with the tests' profile) to test the \
                 current code",
                binary.display()
            );
        }
    });
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are replaced whole; a panic elsewhere cannot leave them half-written.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `ip <args>`; the error names the command and carries its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => anyhow!(
                "the `ip` command is missing: install iproute2 (e.g. `apt-get install iproute2`)"
            ),
            _ => anyhow!("cannot run `ip {}`: {e}", args.join(" ")),
        })?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes namespaces left by runs whose process is gone (a test killed before its guards
/// ran). Only names of this harness's shape, `vcluster-<pid>-...`, with a dead `<pid>`.
fn remove_stale_namespaces() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(NETNS_PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = ip(&["netns", "del", &name]);
            }
        }
    });
}

/// One run's identity: unique among concurrent runs on the machine.
#[derive(Debug, Clone, Copy)]
struct RunId {
    pid: u32,
    counter: u32,
}

impl RunId {
    fn next() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        Self {
            pid: std::process::id(),
            counter: COUNTER.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The prefix of every namespace of this run.
    fn prefix(self) -> String {
        format!("{NETNS_PREFIX}{}-{}-", self.pid, self.counter)
    }

    /// The second octet of the run's addresses, `10.S.x.y`, in 100..=227 (never 96, the VIPs').
    /// Namespaces already keep runs apart; distinct subnets keep their logs and captures apart.
    fn subnet(self) -> u8 {
        let spread = self.pid.wrapping_mul(31).wrapping_add(self.counter) % 128;
        100 + spread as u8
    }
}

/// A named network namespace (as `ip netns add` makes), deleted on drop. The helpers run
/// ordinary, unmarked sockets inside it, as an application in that pod or node would.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// What servers started here call themselves (the pod's or node's name).
    label: String,
}

impl Netns {
    /// Creates the namespace, with loopback up.
    fn create(name: String, label: &str) -> anyhow::Result<Self> {
        ip(&["netns", "add", &name])?;
        let netns = Self {
            name,
            label: label.to_owned(),
        };
        netns.ip("link set lo up")?;
        Ok(netns)
    }

    /// The name under `/var/run/netns`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <this> <command>`, e.g. `netns.ip("route add default via 10.1.1.1")`
    /// (arguments are split on whitespace).
    pub fn ip(&self, command: &str) -> anyhow::Result<()> {
        let args: Vec<&str> = ["-n", self.name.as_str()]
            .into_iter()
            .chain(command.split_whitespace())
            .collect();
        ip(&args)
    }

    /// A handle on the namespace, as ztunnel opens it.
    pub fn open(&self) -> io::Result<NetNs> {
        NetNs::from_name(&self.name).map_err(io::Error::other)
    }

    /// Runs `f` on a thread inside this namespace (the caller's thread never moves).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        self.open()?.run(f).map_err(io::Error::other)
    }

    /// Writes a sysctl of this namespace, e.g. `net/ipv4/ip_forward` (a `/proc/sys/net` file
    /// reflects the namespace of the thread that opens it).
    fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = format!("/proc/sys/{key}");
        let read_back = self.run(|| {
            std::fs::write(&path, value)?;
            std::fs::read_to_string(&path)
        })??;
        if read_back.trim() != value {
            bail!(
                "{path} in {} reads {:?} after writing {value:?}",
                self.name,
                read_back.trim()
            );
        }
        Ok(())
    }

    /// A plain TCP client: a `std::net::TcpStream` connected on a thread inside this namespace,
    /// then handed to tokio. No mark, no proxy settings: what an unmodified application does.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        connect_in(&self.name, addr).await
    }

    /// Connects to `addr`, sends `data`, half-closes and reads until the server closes; bounded
    /// by [`IO_TIMEOUT`]. Against an echo server a working path returns `data`.
    pub async fn exchange(&self, addr: SocketAddr, data: &[u8]) -> io::Result<Vec<u8>> {
        let stream = self.connect(addr).await?;
        tokio::time::timeout(IO_TIMEOUT, send_and_receive(stream, data))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("exchange with {addr} timed out"),
                )
            })?
    }

    /// Serves `port` on `0.0.0.0` inside this namespace, calling `handler` for every connection
    /// (with the peer address the application sees). Stops accepting when the returned server
    /// is dropped.
    pub async fn serve<F, Fut>(&self, port: u16, handler: F) -> io::Result<AppServer>
    where
        F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = self.run(move || {
            let listener = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
            listener.set_nonblocking(true)?;
            Ok::<_, io::Error>(listener)
        })??;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (accepted, stopped) = (peers.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = stopped.cancelled() => return,
                    result = listener.accept() => match result {
                        Ok(accepted) => accepted,
                        Err(_) => {
                            // E.g. out of file descriptors: back off instead of spinning.
                            tokio::time::sleep(POLL).await;
                            continue;
                        }
                    },
                };
                lock(&accepted).push(peer);
                let _ = stream.set_nodelay(true);
                tokio::spawn(handler(stream, peer));
            }
        });
        Ok(AppServer { port, peers, stop })
    }

    /// An echo server: writes back what it reads, half-closes after the client's EOF.
    pub async fn serve_echo(&self, port: u16) -> io::Result<AppServer> {
        self.serve(port, |mut stream, _| async move {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
        .await
    }

    /// An identity server: answers every connection with `<name> <peer ip:port>\n` (who
    /// answered, and the source address the application saw), then closes after the client's
    /// EOF.
    pub async fn serve_identity(&self, port: u16) -> io::Result<AppServer> {
        let name = self.label.clone();
        self.serve(port, move |mut stream, peer| {
            let line = format!("{name} {peer}\n");
            async move {
                let _ = stream.write_all(line.as_bytes()).await;
                let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
                let _ = stream.shutdown().await;
            }
        })
        .await
    }

    /// Starts capturing every frame on every interface of this namespace.
    pub fn capture(&self) -> io::Result<PacketCapture> {
        PacketCapture::start(self)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also destroys its links (and their veth peers elsewhere).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A plain TCP client from inside the named network namespace (see [`Netns::connect`]).
pub async fn connect_in(netns: &str, addr: SocketAddr) -> io::Result<TcpStream> {
    let netns = NetNs::from_name(netns).map_err(io::Error::other)?;
    let stream = tokio::task::spawn_blocking(move || {
        netns
            .run(|| std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))
            .map_err(io::Error::other)?
    })
    .await
    .map_err(io::Error::other)??;
    stream.set_nodelay(true)?;
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}

/// Sends `data`, half-closes, and reads to EOF (both at once, so neither side's buffers can
/// fill up). A write error is reported even if some bytes came back.
pub async fn send_and_receive(stream: TcpStream, data: &[u8]) -> io::Result<Vec<u8>> {
    let (mut r, mut w) = stream.into_split();
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let read = async {
        let mut received = Vec::new();
        r.read_to_end(&mut received).await.map(|_| received)
    };
    let (written, received) = tokio::join!(write, read);
    written?;
    received
}

/// A server started by [`Netns::serve`]; stops accepting when dropped.
#[derive(Debug)]
pub struct AppServer {
    port: u16,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: CancellationToken,
}

impl AppServer {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The peer address of every connection accepted so far, as the application saw it.
    pub fn peers(&self) -> Vec<SocketAddr> {
        lock(&self.peers).clone()
    }
}

impl Drop for AppServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Frames captured with an `AF_PACKET` socket while it runs; [`PacketCapture::finish`] returns
/// them. Frames already queued to the socket when `finish` is called are included, so anything
/// that crossed the wire before (an echo that came back, say) is in the result.
#[derive(Debug)]
pub struct PacketCapture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<io::Result<Vec<Vec<u8>>>>>,
}

impl PacketCapture {
    fn start(netns: &Netns) -> io::Result<Self> {
        let protocol = Protocol::from(i32::from(ETH_P_ALL.to_be()));
        let socket = netns.run(|| Socket::new(Domain::PACKET, Type::RAW, Some(protocol)))??;
        // Best effort: the kernel caps it at rmem_max; the reader keeps up with test traffic.
        let _ = socket.set_recv_buffer_size(8 << 20);
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vcluster-capture".into())
            .spawn(move || {
                let mut socket = socket;
                let mut frames = Vec::new();
                // Large enough for a GSO frame (64 KiB of payload plus headers).
                let mut buf = vec![0u8; 128 * 1024];
                let mut stopping = false;
                loop {
                    if !stopping && stopped.load(Ordering::Acquire) {
                        // From here on, read only what is already queued, then return.
                        stopping = true;
                        socket.set_nonblocking(true)?;
                    }
                    match socket.read(&mut buf) {
                        Ok(n) => frames.push(buf[..n].to_vec()),
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) =>
                        {
                            if stopping {
                                return Ok(frames);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops capturing and returns what was seen.
    pub fn finish(mut self) -> io::Result<Captured> {
        self.stop.store(true, Ordering::Release);
        let thread = self
            .thread
            .take()
            .ok_or_else(|| io::Error::other("capture already finished"))?;
        let frames = thread
            .join()
            .map_err(|_| io::Error::other("capture thread panicked"))??;
        Ok(Captured { frames })
    }
}

impl Drop for PacketCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Captured Ethernet frames.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    pub frames: Vec<Vec<u8>>,
}

impl Captured {
    /// Whether any frame contains `needle`.
    pub fn contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty()
            && self
                .frames
                .iter()
                .any(|f| f.windows(needle.len()).any(|w| w == needle))
    }

    /// (source port, destination port) of every IPv4 TCP frame that contains `needle`: which
    /// connection carried it in clear.
    pub fn tcp_ports_carrying(&self, needle: &[u8]) -> Vec<(u16, u16)> {
        self.frames
            .iter()
            .filter(|f| !needle.is_empty() && f.windows(needle.len()).any(|w| w == needle))
            .filter_map(|f| tcp_ports(f))
            .collect()
    }

    /// How many IPv4 TCP frames go to `port`.
    pub fn tcp_frames_to_port(&self, port: u16) -> usize {
        self.frames
            .iter()
            .filter(|f| tcp_ports(f).is_some_and(|(_, dst)| dst == port))
            .count()
    }

    /// How many IPv4 TCP frames have `port` at either end.
    pub fn tcp_frames_with_port(&self, port: u16) -> usize {
        self.frames
            .iter()
            .filter(|f| tcp_ports(f).is_some_and(|(src, dst)| src == port || dst == port))
            .count()
    }
}

/// (source port, destination port) of an Ethernet/IPv4/TCP frame.
fn tcp_ports(frame: &[u8]) -> Option<(u16, u16)> {
    const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
    const IPPROTO_TCP: u8 = 6;
    if frame.get(12..14)? != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(14..)?;
    let header_len = usize::from(ip.first()? & 0x0f) * 4;
    if *ip.get(9)? != IPPROTO_TCP {
        return None;
    }
    let tcp = ip.get(header_len..header_len + 4)?;
    Some((
        u16::from_be_bytes([tcp[0], tcp[1]]),
        u16::from_be_bytes([tcp[2], tcp[3]]),
    ))
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A node's `/metrics`, parsed.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    text: String,
    samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the text format; lines that are not samples (comments, malformed) are skipped.
    pub fn parse(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            samples: text.lines().filter_map(parse_sample).collect(),
        }
    }

    /// The raw text, for failure messages.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The samples named `name` that carry every one of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|have| have == v))
        })
    }

    /// The sum of the samples named `name` that carry every one of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }
}

/// `name{k="v",...} value [timestamp]` or `name value`.
fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after_brace) = rest.strip_prefix('{') {
        let mut chars = after_brace.char_indices();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                other => key.push(other),
            }
        }
        rest = &after_brace[end?..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// A minimal HTTP/1.1 GET on loopback: (status, body), bounded by [`IO_TIMEOUT`].
pub async fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    http_get_on(TcpStream::connect(addr), addr, path).await
}

/// [`http_get`] over a connection `connect` makes (e.g. from inside a namespace).
pub async fn http_get_on(
    connect: impl Future<Output = io::Result<TcpStream>>,
    addr: SocketAddr,
    path: &str,
) -> io::Result<(u16, String)> {
    let request = async {
        let mut stream = connect.await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(IO_TIMEOUT, request)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("GET {addr}{path}")))??;
    let malformed = || io::Error::other(format!("malformed response to GET {addr}{path}"));
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .ok_or_else(malformed)?;
    Ok((status, body))
}

/// A running `ztunnel run`, killed (by its pid) on drop unless it already exited.
#[derive(Debug)]
struct ZtunnelProcess {
    child: Mutex<Child>,
    pid: u32,
    admin_addr: SocketAddr,
    metrics_addr: SocketAddr,
    readiness_addr: SocketAddr,
    log: PathBuf,
}

impl ZtunnelProcess {
    /// The exit status, once it exited (reaped here, so its pid is never signalled after).
    fn exit_status(&self) -> Option<ExitStatus> {
        lock(&self.child).try_wait().ok().flatten()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }
}

impl Drop for ZtunnelProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// Three free ports on 127.0.0.1 (held together so they differ, then released for ztunnel).
fn free_local_ports() -> io::Result<[u16; 3]> {
    let listeners = [
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?,
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?,
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?,
    ];
    Ok([
        listeners[0].local_addr()?.port(),
        listeners[1].local_addr()?.port(),
        listeners[2].local_addr()?.port(),
    ])
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A node: its namespace (bridge for its pods, uplink to the underlay) and its ztunnel.
#[derive(Debug)]
pub struct Node {
    name: String,
    bridge_ip: Ipv4Addr,
    underlay_ip: Ipv4Addr,
    ztunnel: ZtunnelProcess,
    netns: Netns,
}

impl Node {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's address on its pods' bridge: their gateway, and where kubelet probes come
    /// from (ztunnel is given it as a probe source).
    pub fn bridge_ip(&self) -> Ipv4Addr {
        self.bridge_ip
    }

    /// The node's address on the underlay between nodes.
    pub fn underlay_ip(&self) -> Ipv4Addr {
        self.underlay_ip
    }

    /// The node's namespace, e.g. to connect from it as the kubelet does.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn pid(&self) -> u32 {
        self.ztunnel.pid
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.ztunnel.admin_addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.ztunnel.metrics_addr
    }

    pub fn readiness_addr(&self) -> SocketAddr {
        self.ztunnel.readiness_addr
    }

    /// `GET /healthz/ready`: (status, body).
    pub async fn readiness(&self) -> io::Result<(u16, String)> {
        http_get(self.ztunnel.readiness_addr, "/healthz/ready").await
    }

    /// `GET /metrics`, parsed.
    ///
    /// # Panics
    /// When the node does not answer 200 (the node's log is in the message).
    pub async fn metrics(&self) -> Metrics {
        match http_get(self.ztunnel.metrics_addr, "/metrics").await {
            Ok((200, text)) => Metrics::parse(&text),
            other => panic!(
                "GET /metrics of node {}: {other:?}\n{}",
                self.name,
                tail(&self.logs(), LOG_TAIL_LINES)
            ),
        }
    }

    /// `GET /config_dump` of the admin port, as JSON.
    pub async fn try_config_dump(&self) -> Result<Value, String> {
        match http_get(self.ztunnel.admin_addr, "/config_dump").await {
            Ok((200, body)) => serde_json::from_str(&body).map_err(|e| format!("{e}: {body}")),
            other => Err(format!("GET /config_dump: {other:?}")),
        }
    }

    /// `GET /config_dump`.
    ///
    /// # Panics
    /// When the node does not answer with JSON.
    pub async fn config_dump(&self) -> Value {
        self.try_config_dump()
            .await
            .unwrap_or_else(|e| panic!("node {}: {e}", self.name))
    }

    /// Sends SIGTERM to the node's ztunnel (a no-op once it exited).
    pub fn sigterm(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    /// Kills the node's ztunnel with SIGKILL, as a crash or an OOM kill would (a no-op once it
    /// exited).
    pub fn sigkill(&self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let mut child = lock(&self.ztunnel.child);
        // Not reaped while we hold the lock: the pid cannot have been reused.
        if let Ok(None) = child.try_wait() {
            let pid = i32::try_from(self.ztunnel.pid).expect("pid fits in pid_t");
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
                .unwrap_or_else(|e| panic!("{signal} to ztunnel of node {}: {e}", self.name));
        }
    }

    /// The exit status, once the ztunnel exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.ztunnel.exit_status()
    }

    /// Waits at most `limit` for the ztunnel to exit.
    pub async fn wait_exit(&self, limit: Duration) -> Option<ExitStatus> {
        eventually(limit, || async { self.exit_status().ok_or(()) })
            .await
            .ok()
    }

    /// The ztunnel's output so far (stdout and stderr).
    pub fn logs(&self) -> String {
        self.ztunnel.log_text()
    }

    fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// Whether this node has loaded configuration `generation` and serves exactly the pods that
    /// configuration enrols on it; `Err` says what is still different.
    async fn applied(&self, generation: u64) -> Result<(), String> {
        let dump = self.try_config_dump().await?;
        let state = &dump["state"];
        let loaded = state["namespaces"][GENERATION_NAMESPACE][GENERATION_LABEL]
            .as_str()
            .and_then(|g| g.parse::<u64>().ok());
        if loaded < Some(generation) {
            return Err(format!(
                "node {} has loaded configuration generation {loaded:?}, waiting for {generation}",
                self.name
            ));
        }
        let wanted: BTreeSet<&str> = state["workloads"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, w)| w["node"] == self.name.as_str() && w["enrolled"] == true)
            .map(|(uid, _)| uid.as_str())
            .collect();
        let served: BTreeSet<&str> = dump["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if wanted != served {
            return Err(format!(
                "node {} serves pods {served:?}, its configuration enrols {wanted:?}",
                self.name
            ));
        }
        Ok(())
    }
}

/// A pod: its namespace (the network namespace is `<run prefix>pod-<name>`) and addresses.
#[derive(Debug)]
pub struct Pod {
    name: String,
    namespace: String,
    node: String,
    service_account: String,
    ip: Ipv4Addr,
    netns: Netns,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// `spiffe://cluster.local/ns/<namespace>/sa/<service account>`.
    pub fn identity(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    /// `cluster.local/ns/<namespace>/sa/<service account>`, as AuthorizationPolicy writes it.
    pub fn principal(&self) -> String {
        format!(
            "{TRUST_DOMAIN}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    pub fn ip(&self) -> IpAddr {
        self.ip.into()
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip.into(), port)
    }

    /// The pod's network namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// See [`Netns::run`].
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        self.netns.run(f)
    }

    /// See [`Netns::connect`].
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        self.netns.connect(addr).await
    }

    /// See [`Netns::exchange`].
    pub async fn exchange(&self, addr: SocketAddr, data: &[u8]) -> io::Result<Vec<u8>> {
        self.netns.exchange(addr, data).await
    }

    /// See [`Netns::serve`].
    pub async fn serve<F, Fut>(&self, port: u16, handler: F) -> io::Result<AppServer>
    where
        F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.netns.serve(port, handler).await
    }

    /// See [`Netns::serve_echo`].
    pub async fn serve_echo(&self, port: u16) -> io::Result<AppServer> {
        self.netns.serve_echo(port).await
    }

    /// See [`Netns::serve_identity`].
    pub async fn serve_identity(&self, port: u16) -> io::Result<AppServer> {
        self.netns.serve_identity(port).await
    }
}

#[derive(Debug, Clone)]
struct NamespaceSpec {
    name: String,
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct PodSpec {
    name: String,
    namespace: String,
    node: String,
    service_account: String,
    labels: BTreeMap<String, String>,
    /// Assigned by `build`.
    ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone)]
struct ServiceSpec {
    namespace: String,
    name: String,
    /// (port, targetPort).
    ports: Vec<(u16, u16)>,
    /// The port-name prefix that declares the protocol (`tcp`, `http`, `grpc`).
    protocol: &'static str,
    labels: BTreeMap<String, String>,
    /// Assigned by `build`.
    vip: Option<Ipv4Addr>,
}

/// What the harness writes as YAML; changed through [`Cluster::update`].
#[derive(Debug, Clone)]
struct Model {
    namespaces: Vec<NamespaceSpec>,
    pods: Vec<PodSpec>,
    services: Vec<ServiceSpec>,
    /// Extra documents by name (`50-<name>.yaml`).
    files: BTreeMap<String, String>,
    waypoints: Vec<waypoint::WaypointSpec>,
    generation: u64,
}

impl Model {
    fn namespace_mut(&mut self, name: &str) -> &mut NamespaceSpec {
        self.namespaces
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no namespace {name:?} in the cluster"))
    }

    fn service_mut(&mut self, namespace: &str, name: &str) -> &mut ServiceSpec {
        self.services
            .iter_mut()
            .find(|s| s.namespace == namespace && s.name == name)
            .unwrap_or_else(|| panic!("no service {namespace}/{name} in the cluster"))
    }

    fn pod_mut(&mut self, name: &str) -> &mut PodSpec {
        self.pods
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name:?} in the cluster"))
    }

    /// Namespaces, pods, services and their EndpointSlices, in the shape a cluster serves.
    fn cluster_yaml(&self) -> String {
        let mut documents: Vec<Value> = Vec::new();
        for namespace in &self.namespaces {
            documents.push(json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": namespace.name, "labels": namespace.labels},
            }));
        }
        for pod in &self.pods {
            let ip = pod.ip.map(|ip| ip.to_string()).unwrap_or_default();
            documents.push(json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels},
                "spec": {
                    "nodeName": pod.node,
                    "serviceAccountName": pod.service_account,
                    "containers": [{"name": "app", "image": "app"}],
                },
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
            }));
        }
        for service in &self.services {
            let port_name = |port: u16| format!("{}-{port}", service.protocol);
            documents.push(json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": service.name, "namespace": service.namespace, "labels": service.labels},
                "spec": {
                    "clusterIP": service.vip.map(|ip| ip.to_string()),
                    "selector": {"app": service.name},
                    "ports": service.ports.iter().map(|(port, target)| json!({
                        "name": port_name(*port), "port": port, "targetPort": target,
                        "protocol": "TCP",
                    })).collect::<Vec<_>>(),
                },
            }));
            let endpoints: Vec<Value> = self
                .pods
                .iter()
                .filter(|p| {
                    p.namespace == service.namespace && p.labels.get("app") == Some(&service.name)
                })
                .map(|p| {
                    json!({
                        "addresses": [p.ip.map(|ip| ip.to_string())],
                        "conditions": {"ready": true},
                        "nodeName": p.node,
                        "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace},
                    })
                })
                .collect();
            documents.push(json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{}-vcluster", service.name),
                    "namespace": service.namespace,
                    "labels": {"kubernetes.io/service-name": service.name},
                },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": service.ports.iter().map(|(port, target)| json!({
                    "name": port_name(*port), "port": target, "protocol": "TCP",
                })).collect::<Vec<_>>(),
            }));
        }
        for waypoint in self.waypoints.iter().filter(|w| w.ingress_labels.is_none()) {
            documents.push(waypoint::gateway_document(waypoint));
        }
        // JSON documents are YAML; one per `---`.
        documents
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    fn generation_yaml(&self) -> String {
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": GENERATION_NAMESPACE,
                "labels": {GENERATION_LABEL: self.generation.to_string()},
            },
        })
        .to_string()
    }

    /// Writes every file, the generation file last (see [`GENERATION_FILE`]); files of removed
    /// extra documents are deleted first. Each file is replaced by a rename, so a node never
    /// reads half of one.
    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(extra) = name
                .strip_prefix(EXTRA_FILE_PREFIX)
                .and_then(|n| n.strip_suffix(".yaml"))
                && !self.files.contains_key(extra)
            {
                std::fs::remove_file(entry.path())?;
            }
        }
        for (name, yaml) in &self.files {
            write_atomically(dir, &format!("{EXTRA_FILE_PREFIX}{name}.yaml"), yaml)?;
        }
        write_atomically(dir, CLUSTER_FILE, &self.cluster_yaml())?;
        write_atomically(dir, GENERATION_FILE, &self.generation_yaml())
    }
}

/// Writes `dir/name` through a dot-file (which the file source skips) and a rename.
fn write_atomically(dir: &Path, name: &str, content: &str) -> anyhow::Result<()> {
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, content)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, dir.join(name))
        .with_context(|| format!("renaming {} into place", temporary.display()))
}

/// What was added last, so `.ambient()`, `.label(..)` and `.service_account(..)` know what they
/// refer to.
#[derive(Debug, Clone, Copy)]
enum Last {
    Namespace(usize),
    Pod(usize),
    Service(usize),
}

/// Describes a cluster; see [`Cluster::builder`].
#[derive(Debug)]
pub struct ClusterBuilder {
    nodes: Vec<String>,
    namespaces: Vec<NamespaceSpec>,
    pods: Vec<PodSpec>,
    services: Vec<ServiceSpec>,
    files: BTreeMap<String, String>,
    waypoints: Vec<waypoint::WaypointSpec>,
    drain_deadline: Duration,
    log_filter: String,
    ztunnel_env: Vec<(String, EnvValue)>,
    last: Option<Last>,
}

/// The value of an extra ztunnel environment variable (see [`ClusterBuilder::ztunnel_env`]).
#[derive(Debug, Clone)]
enum EnvValue {
    Literal(String),
    /// `<pod ip>:<port>`, known once `build` assigned the addresses.
    PodAddr {
        pod: String,
        port: u16,
    },
}

fn assert_dns_label(kind: &str, name: &str) {
    assert!(
        !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.starts_with('-')
            && !name.ends_with('-'),
        "{kind} name {name:?} is not a DNS label (lowercase letters, digits, '-')"
    );
}

impl ClusterBuilder {
    /// Adds a node (a namespace with a bridge for its pods, and a ztunnel).
    #[track_caller]
    pub fn node(mut self, name: &str) -> Self {
        assert_dns_label("node", name);
        assert!(!self.nodes.iter().any(|n| n == name), "node {name} twice");
        assert!(self.nodes.len() < 100, "at most 100 nodes");
        self.nodes.push(name.to_owned());
        self
    }

    /// Adds a Kubernetes namespace; [`Self::ambient`] and [`Self::namespace_label`] then refer
    /// to it.
    #[track_caller]
    pub fn namespace(mut self, name: &str) -> Self {
        assert_dns_label("namespace", name);
        assert_ne!(name, GENERATION_NAMESPACE, "reserved for the harness");
        assert!(
            !self.namespaces.iter().any(|n| n.name == name),
            "namespace {name} twice"
        );
        self.namespaces.push(NamespaceSpec {
            name: name.to_owned(),
            labels: BTreeMap::new(),
        });
        self.last = Some(Last::Namespace(self.namespaces.len() - 1));
        self
    }

    /// Labels the last namespace `istio.io/dataplane-mode=ambient`.
    #[track_caller]
    pub fn ambient(self) -> Self {
        self.namespace_label(DATAPLANE_MODE, "ambient")
    }

    /// Labels the last namespace added.
    #[track_caller]
    pub fn namespace_label(mut self, key: &str, value: &str) -> Self {
        let Some(Last::Namespace(i)) = self.last else {
            panic!("namespace_label({key:?}) / ambient() must follow .namespace(..)");
        };
        self.namespaces[i]
            .labels
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// Adds a pod on `node` in `namespace`, with label `app=<name>` and service account
    /// `<name>` (so each pod has its own identity) unless changed with [`Self::label`] and
    /// [`Self::service_account`]. Pod names are unique in the cluster: ztunnel finds a pod's
    /// network namespace by its name alone.
    #[track_caller]
    pub fn pod(mut self, node: &str, namespace: &str, name: &str) -> Self {
        assert_dns_label("pod", name);
        assert!(
            self.nodes.iter().any(|n| n == node),
            "pod {name}: no node {node} (add nodes first)"
        );
        assert!(
            self.namespaces.iter().any(|n| n.name == namespace),
            "pod {name}: no namespace {namespace} (add namespaces first)"
        );
        assert!(
            !self.pods.iter().any(|p| p.name == name),
            "pod {name} twice: pod names must be unique across namespaces, because ztunnel's \
             netns capture mode finds a pod's namespace by its name alone"
        );
        assert!(
            self.pods.iter().filter(|p| p.node == node).count() < 250,
            "at most 250 pods per node"
        );
        self.pods.push(PodSpec {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            node: node.to_owned(),
            service_account: name.to_owned(),
            labels: BTreeMap::from([("app".to_owned(), name.to_owned())]),
            ip: None,
        });
        self.last = Some(Last::Pod(self.pods.len() - 1));
        self
    }

    /// Labels the last pod added (e.g. `istio.io/dataplane-mode=none`, or `app=<service>` to
    /// put it behind a service).
    #[track_caller]
    pub fn label(mut self, key: &str, value: &str) -> Self {
        let Some(Last::Pod(i)) = self.last else {
            panic!("label({key:?}) must follow .pod(..)");
        };
        self.pods[i].labels.insert(key.to_owned(), value.to_owned());
        // An ingress gateway's labels are also its GATEWAY_LABELS.
        let (namespace, name) = (&self.pods[i].namespace, &self.pods[i].name);
        if let Some(labels) = self
            .waypoints
            .iter_mut()
            .find(|w| w.namespace == *namespace && w.name == *name)
            .and_then(|w| w.ingress_labels.as_mut())
        {
            labels.insert(key.to_owned(), value.to_owned());
        }
        self
    }

    /// Sets the service account of the last pod added.
    #[track_caller]
    pub fn service_account(mut self, name: &str) -> Self {
        let Some(Last::Pod(i)) = self.last else {
            panic!("service_account({name:?}) must follow .pod(..)");
        };
        self.pods[i].service_account = name.to_owned();
        self
    }

    /// A service `name` in `namespace` selecting pods labelled `app=<name>`, with a VIP from
    /// the run's range, forwarding `port` to `target_port`. Call again to add ports.
    #[track_caller]
    pub fn service(self, namespace: &str, name: &str, port: u16, target_port: u16) -> Self {
        self.service_with_protocol(namespace, name, port, target_port, "tcp")
    }

    /// Like [`Self::service`], with its ports declared HTTP (`http-<port>`), so a waypoint
    /// parses them.
    #[track_caller]
    pub fn http_service(self, namespace: &str, name: &str, port: u16, target_port: u16) -> Self {
        self.service_with_protocol(namespace, name, port, target_port, "http")
    }

    /// Like [`Self::service`], with ports named `<protocol>-<port>` (`tcp`, `http`, `grpc`...).
    #[track_caller]
    pub fn service_with_protocol(
        mut self,
        namespace: &str,
        name: &str,
        port: u16,
        target_port: u16,
        protocol: &'static str,
    ) -> Self {
        assert_dns_label("service", name);
        assert!(
            self.namespaces.iter().any(|n| n.name == namespace),
            "service {name}: no namespace {namespace}"
        );
        match self
            .services
            .iter_mut()
            .find(|s| s.namespace == namespace && s.name == name)
        {
            Some(service) => service.ports.push((port, target_port)),
            None => {
                assert!(self.services.len() < 250, "at most 250 services");
                self.services.push(ServiceSpec {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    ports: vec![(port, target_port)],
                    protocol,
                    labels: BTreeMap::new(),
                    vip: None,
                });
            }
        }
        let index = self
            .services
            .iter()
            .position(|s| s.namespace == namespace && s.name == name);
        self.last = index.map(Last::Service);
        self
    }

    /// Labels the last service added (e.g. `istio.io/use-waypoint=waypoint`).
    #[track_caller]
    pub fn service_label(mut self, key: &str, value: &str) -> Self {
        let Some(Last::Service(i)) = self.last else {
            panic!("service_label({key:?}) must follow .service(..)");
        };
        self.services[i]
            .labels
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// A waypoint `name` in `namespace`, running on `node`: a Gateway (class `istio-waypoint`),
    /// a pod `name` (not captured: labelled as Istio labels waypoint pods) with service account
    /// `name`, and its Service on port 15008. The real `waypoint` binary runs inside the pod's
    /// network namespace. Label services or namespaces `istio.io/use-waypoint=<name>` to use it.
    #[track_caller]
    pub fn waypoint(mut self, node: &str, namespace: &str, name: &str) -> Self {
        self = self
            .pod(node, namespace, name)
            .label(waypoint::MANAGED_LABEL, waypoint::MANAGED_VALUE)
            .label(waypoint::GATEWAY_NAME_LABEL, name)
            .service(namespace, name, HBONE_PORT, HBONE_PORT);
        self.waypoints.push(waypoint::WaypointSpec {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ingress_labels: None,
        });
        self
    }

    /// An ingress gateway `name` in `namespace` on `node`, as `helm install istio-ingress
    /// istio/gateway` makes one: a pod `name` (service account `name`) labelled `istio=ingress`
    /// and `app=<name>`, running the real `waypoint gateway` inside its network namespace and
    /// listening on the pod's IP. Put it in a namespace that is not ambient (as Istio's
    /// `istio-ingress`), so ztunnel does not capture it. Istio `Gateway`s with `selector:
    /// {istio: ingress}` apply to it; reach it from a pod with [`Cluster::ingress`]'s IP.
    #[track_caller]
    pub fn ingress_gateway(mut self, node: &str, namespace: &str, name: &str) -> Self {
        self = self.pod(node, namespace, name).label("istio", "ingress");
        let labels = self
            .pods
            .last()
            .map(|p| p.labels.clone())
            .unwrap_or_default();
        self.waypoints.push(waypoint::WaypointSpec {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ingress_labels: Some(labels),
        });
        self
    }

    /// Extra YAML documents (policies, ...) present from the start, under `name` (see
    /// [`Cluster::apply`]).
    #[track_caller]
    pub fn yaml(mut self, name: &str, yaml: &str) -> Self {
        assert_dns_label("document", name);
        self.files.insert(name.to_owned(), yaml.to_owned());
        self
    }

    /// ztunnel's `DRAIN_DEADLINE_SECONDS` (default 10 s).
    pub fn drain_deadline(mut self, deadline: Duration) -> Self {
        self.drain_deadline = deadline;
        self
    }

    /// ztunnel's `RUST_LOG` (default `info`).
    pub fn log_filter(mut self, filter: &str) -> Self {
        filter.clone_into(&mut self.log_filter);
        self
    }

    /// An environment variable for every node's ztunnel (e.g. `DNS_CAPTURE=false`), set after
    /// the harness's own, so it may override them.
    pub fn ztunnel_env(mut self, key: &str, value: &str) -> Self {
        self.ztunnel_env
            .push((key.to_owned(), EnvValue::Literal(value.to_owned())));
        self
    }

    /// Sets `key` to `<ip of pod>:<port>` for every node's ztunnel, e.g. `DNS_UPSTREAMS` to a
    /// DNS server the test runs in that pod.
    #[track_caller]
    pub fn ztunnel_env_pod_addr(mut self, key: &str, pod: &str, port: u16) -> Self {
        assert!(
            self.pods.iter().any(|p| p.name == pod),
            "ztunnel_env_pod_addr({key:?}): no pod {pod} (add pods first)"
        );
        self.ztunnel_env.push((
            key.to_owned(),
            EnvValue::PodAddr {
                pod: pod.to_owned(),
                port,
            },
        ));
        self
    }

    /// Creates the namespaces and links, writes the configuration, starts the CA and every
    /// node's ztunnel, and waits until each is ready and serves its enrolled pods.
    pub async fn build(self) -> anyhow::Result<Cluster> {
        if self.nodes.is_empty() {
            bail!("a cluster needs at least one node");
        }
        let binary = ztunnel_binary()?;
        remove_stale_namespaces();
        let run = RunId::next();
        let subnet = run.subnet();

        let mut model = Model {
            namespaces: self.namespaces,
            pods: self.pods,
            services: self.services,
            files: self.files,
            waypoints: self.waypoints,
            generation: 1,
        };
        for (i, node) in self.nodes.iter().enumerate() {
            let node_octet = i as u8 + 1;
            for (k, pod) in model
                .pods
                .iter_mut()
                .filter(|p| &p.node == node)
                .enumerate()
            {
                pod.ip = Some(Ipv4Addr::new(10, subnet, node_octet, k as u8 + 2));
            }
        }
        for (j, service) in model.services.iter_mut().enumerate() {
            service.vip = Some(Ipv4Addr::new(10, 96, subnet, j as u8 + 1));
        }

        let dir = tempfile::Builder::new()
            .prefix(&run.prefix())
            .tempdir()
            .context("creating the run's directory")?;
        let config_dir = dir.path().join("mesh");
        std::fs::create_dir(&config_dir)?;
        model.write(&config_dir)?;

        let topology = {
            let (nodes, pods) = (self.nodes.clone(), model.pods.clone());
            tokio::task::spawn_blocking(move || Topology::create(run, &nodes, &pods))
                .await
                .context("creating the namespaces")??
        };

        let pki = TestPki::new(TRUST_DOMAIN);
        let ca = start_ca(
            &pki,
            Arc::new(mesh::ca::AllowAny),
            (Ipv4Addr::LOCALHOST, 0).into(),
        )
        .await;
        let root = dir.path().join("root.pem");
        std::fs::write(&root, pki.root_pem())?;

        let extra_env = self
            .ztunnel_env
            .into_iter()
            .map(|(key, value)| {
                let value = match value {
                    EnvValue::Literal(value) => value,
                    EnvValue::PodAddr { pod, port } => model
                        .pods
                        .iter()
                        .find(|p| p.name == pod)
                        .and_then(|p| p.ip)
                        .map(|ip| SocketAddr::from((ip, port)).to_string())
                        .ok_or_else(|| anyhow!("{key}: pod {pod} has no address"))?,
                };
                Ok((key, value))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let launch = Launch {
            binary,
            run,
            dir: dir.path().to_owned(),
            config_dir: config_dir.clone(),
            ca_addr: ca.addr,
            root,
            drain_deadline: self.drain_deadline,
            log_filter: self.log_filter,
            extra_env,
        };
        let Topology {
            underlay,
            nodes: node_nets,
            pods: pod_nets,
        } = topology;
        let started = futures::future::join_all(
            node_nets
                .iter()
                .map(|net| launch.start(&net.name, net.bridge_ip)),
        )
        .await;
        // Every node's result is collected first, so the processes that did start are killed
        // (on drop) whichever failed.
        let mut nodes = Vec::new();
        let mut failures = Vec::new();
        for (net, started) in node_nets.into_iter().zip(started) {
            match started {
                Ok(ztunnel) => nodes.push(Node {
                    name: net.name,
                    bridge_ip: net.bridge_ip,
                    underlay_ip: net.underlay_ip,
                    ztunnel,
                    netns: net.netns,
                }),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        if !failures.is_empty() {
            bail!("{}", failures.join("\n\n"));
        }
        let pods = model
            .pods
            .iter()
            .zip(pod_nets)
            .map(|(spec, netns)| Pod {
                name: spec.name.clone(),
                namespace: spec.namespace.clone(),
                node: spec.node.clone(),
                service_account: spec.service_account.clone(),
                ip: spec.ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
                netns,
            })
            .collect();
        let mut cluster = Cluster {
            run,
            config_dir,
            nodes,
            pods,
            waypoints: Vec::new(),
            model: Mutex::new(model),
            underlay,
            ca,
            pki,
            dir,
        };
        let specs = lock(&cluster.model).waypoints.clone();
        for spec in specs {
            let started = waypoint::Waypoint::start(&cluster, &launch, &spec).await?;
            cluster.waypoints.push(started);
        }
        cluster.wait_applied(1).await.map_err(|e| {
            anyhow!(
                "the nodes did not load the configuration or capture their pods: {e}\n{}",
                cluster.logs()
            )
        })?;
        Ok(cluster)
    }
}

/// A node's namespace before its ztunnel starts.
#[derive(Debug)]
struct NodeNet {
    name: String,
    bridge_ip: Ipv4Addr,
    underlay_ip: Ipv4Addr,
    netns: Netns,
}

/// Every namespace and link of a run (see the module docs for the picture).
#[derive(Debug)]
struct Topology {
    underlay: Netns,
    nodes: Vec<NodeNet>,
    /// In the order of the pods given.
    pods: Vec<Netns>,
}

impl Topology {
    fn create(run: RunId, node_names: &[String], pods: &[PodSpec]) -> anyhow::Result<Self> {
        let prefix = run.prefix();
        let subnet = run.subnet();
        // Each guard is owned as soon as its namespace exists, so an error midway removes
        // everything created so far.
        let underlay = Netns::create(format!("{prefix}underlay"), "underlay")?;
        underlay.ip("link add br0 type bridge")?;
        underlay.ip("link set br0 up")?;
        let mut nodes = Vec::new();
        for (i, name) in node_names.iter().enumerate() {
            let netns = Netns::create(format!("{prefix}node-{name}"), name)?;
            let underlay_ip = Ipv4Addr::new(10, subnet, 0, i as u8 + 1);
            let bridge_ip = Ipv4Addr::new(10, subnet, i as u8 + 1, 1);
            let underlay_name = underlay.name();
            netns.ip(&format!(
                "link add uplink type veth peer name n{i} netns {underlay_name}"
            ))?;
            underlay.ip(&format!("link set n{i} master br0 up"))?;
            netns.ip(&format!("addr add {underlay_ip}/24 dev uplink"))?;
            netns.ip("link set uplink up")?;
            netns.ip("link add br0 type bridge")?;
            netns.ip(&format!("addr add {bridge_ip}/24 dev br0"))?;
            netns.ip("link set br0 up")?;
            netns.sysctl("net/ipv4/ip_forward", "1")?;
            nodes.push(NodeNet {
                name: name.clone(),
                bridge_ip,
                underlay_ip,
                netns,
            });
        }
        for node in &nodes {
            for other in nodes.iter().filter(|o| o.name != node.name) {
                let [_, _, octet, _] = other.bridge_ip.octets();
                let via = other.underlay_ip;
                node.netns
                    .ip(&format!("route add 10.{subnet}.{octet}.0/24 via {via}"))?;
            }
        }
        let mut pod_nets = Vec::new();
        for (k, pod) in pods.iter().enumerate() {
            let node = nodes
                .iter()
                .find(|n| n.name == pod.node)
                .ok_or_else(|| anyhow!("pod {}: no node {}", pod.name, pod.node))?;
            let ip = pod
                .ip
                .ok_or_else(|| anyhow!("pod {} has no IP", pod.name))?;
            let netns = Netns::create(format!("{prefix}pod-{}", pod.name), &pod.name)?;
            let node_name = node.netns.name();
            netns.ip(&format!(
                "link add eth0 type veth peer name p{k} netns {node_name}"
            ))?;
            node.netns.ip(&format!("link set p{k} master br0 up"))?;
            netns.ip(&format!("addr add {ip}/24 dev eth0"))?;
            netns.ip("link set eth0 up")?;
            // The default route also covers the service VIPs, which only capture makes real.
            netns.ip(&format!("route add default via {}", node.bridge_ip))?;
            pod_nets.push(netns);
        }
        Ok(Self {
            underlay,
            nodes,
            pods: pod_nets,
        })
    }
}

/// How every node's ztunnel (and every waypoint) is started.
#[derive(Debug)]
struct Launch {
    binary: PathBuf,
    run: RunId,
    dir: PathBuf,
    config_dir: PathBuf,
    ca_addr: SocketAddr,
    root: PathBuf,
    drain_deadline: Duration,
    log_filter: String,
    /// Set last on every ztunnel ([`ClusterBuilder::ztunnel_env`]).
    extra_env: Vec<(String, String)>,
}

impl Launch {
    /// Starts `ztunnel run` for `node` and waits until it is ready. A port taken between
    /// choosing it and ztunnel binding it is retried with new ports.
    async fn start(&self, node: &str, bridge_ip: Ipv4Addr) -> anyhow::Result<ZtunnelProcess> {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let process = self.spawn(node, bridge_ip)?;
            match wait_ready(&process).await {
                Ok(()) => return Ok(process),
                Err(e) => {
                    let log = process.log_text();
                    if attempt < ATTEMPTS
                        && process.exit_status().is_some()
                        && log.contains("Address already in use")
                    {
                        continue;
                    }
                    bail!(
                        "ztunnel of node {node} did not become ready: {e}\n--- log ({}):\n{}",
                        process.log.display(),
                        tail(&log, LOG_TAIL_LINES)
                    );
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    fn spawn(&self, node: &str, bridge_ip: Ipv4Addr) -> anyhow::Result<ZtunnelProcess> {
        use ztunnel::config as env;
        let [admin, metrics, readiness] = free_local_ports()?;
        let addr = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let log = self.dir.join(format!("ztunnel-{node}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(&self.binary)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", &self.log_filter)
            .envs(std::env::var_os(env::WORKER_THREADS).map(|v| (env::WORKER_THREADS, v)))
            .env(env::NODE_NAME, node)
            .env(env::CONFIG_PATH, &self.config_dir)
            .env(env::CA_ADDRESS, self.ca_addr.to_string())
            .env(env::CA_ROOT_CERT, &self.root)
            .env(env::CA_SERVER_NAME, "localhost")
            .env(
                env::CAPTURE_MODE,
                format!("netns:{}pod-", self.run.prefix()),
            )
            .env(env::CAPTURE_PROBE_SOURCES, bridge_ip.to_string())
            // Never the host's resolvers: forwarded DNS stays inside the run (nothing listens
            // on the node's port 53, so such queries get SERVFAIL). Tests that need an
            // upstream set their own (`ztunnel_env_pod_addr`).
            .env(
                env::DNS_UPSTREAMS,
                SocketAddr::from((bridge_ip, 53)).to_string(),
            )
            .env(env::ADMIN_ADDR, addr(admin).to_string())
            .env(env::METRICS_ADDR, addr(metrics).to_string())
            .env(env::READINESS_ADDR, addr(readiness).to_string())
            .env(env::SOCKS5_ADDR, "off")
            .env(
                env::DRAIN_DEADLINE,
                self.drain_deadline.as_secs().to_string(),
            )
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        Ok(ZtunnelProcess {
            pid: child.id(),
            child: Mutex::new(child),
            admin_addr: addr(admin),
            metrics_addr: addr(metrics),
            readiness_addr: addr(readiness),
            log,
        })
    }
}

/// Waits (bounded) for `/healthz/ready` to answer 200; fails at once if the process exits.
async fn wait_ready(process: &ZtunnelProcess) -> Result<(), String> {
    eventually(READY_TIMEOUT, || async {
        if let Some(status) = process.exit_status() {
            return Err(format!("exited with {status}"));
        }
        match http_get(process.readiness_addr, "/healthz/ready").await {
            Ok((200, _)) => Ok(()),
            Ok((status, body)) => Err(format!("readiness {status}: {}", body.trim())),
            Err(e) => Err(format!("readiness: {e}")),
        }
    })
    .await
}

/// A running virtual cluster; see the module docs. Dropping it kills the ztunnels and removes
/// every namespace; when the test is failing, the ztunnels' logs are printed first.
pub struct Cluster {
    run: RunId,
    config_dir: PathBuf,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    waypoints: Vec<waypoint::Waypoint>,
    model: Mutex<Model>,
    underlay: Netns,
    ca: RunningCa,
    pki: TestPki,
    dir: tempfile::TempDir,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            nodes: Vec::new(),
            namespaces: Vec::new(),
            pods: Vec::new(),
            services: Vec::new(),
            files: BTreeMap::new(),
            waypoints: Vec::new(),
            drain_deadline: Duration::from_secs(10),
            log_filter: "info".to_owned(),
            ztunnel_env: Vec::new(),
            last: None,
        }
    }

    /// The prefix of every namespace of this run.
    pub fn run_prefix(&self) -> String {
        self.run.prefix()
    }

    /// The run's directory: `mesh/` (the YAML), `root.pem`, `ztunnel-<node>.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The YAML directory every ztunnel reads (`MESH_CONFIG_PATH`).
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// # Panics
    /// When there is no such node.
    #[track_caller]
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name:?}"))
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// # Panics
    /// When there is no such pod.
    #[track_caller]
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name:?}"))
    }

    /// The VIP of a service.
    ///
    /// # Panics
    /// When there is no such service.
    #[track_caller]
    pub fn vip(&self, namespace: &str, service: &str) -> IpAddr {
        lock(&self.model)
            .services
            .iter()
            .find(|s| s.namespace == namespace && s.name == service)
            .and_then(|s| s.vip)
            .map(IpAddr::from)
            .unwrap_or_else(|| panic!("no service {namespace}/{service}"))
    }

    /// `VIP:port` of a service.
    #[track_caller]
    pub fn service_addr(&self, namespace: &str, service: &str, port: u16) -> SocketAddr {
        SocketAddr::new(self.vip(namespace, service), port)
    }

    /// The in-process CA's gRPC address (for further processes of the mesh, e.g. waypoints).
    pub fn ca_addr(&self) -> SocketAddr {
        self.ca.addr
    }

    /// The cluster's PKI: certificates it issues are trusted by every node, as if a workload's
    /// key had been obtained by someone else (for tests of what a hostile workload can do).
    pub fn pki(&self) -> &TestPki {
        &self.pki
    }

    /// The CA's root certificate (PEM file), as every ztunnel is given it.
    pub fn root_cert_path(&self) -> PathBuf {
        self.dir.path().join("root.pem")
    }

    /// The namespace that switches frames between nodes: every byte between nodes crosses it.
    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// Starts capturing every frame between nodes.
    pub fn capture_between_nodes(&self) -> io::Result<PacketCapture> {
        self.underlay.capture()
    }

    /// Sets (`Some`) or removes (`None`) a namespace label, and waits until every running node
    /// applied it.
    pub async fn set_namespace_label(&self, namespace: &str, key: &str, value: Option<&str>) {
        self.update(|model| {
            let labels = &mut model.namespace_mut(namespace).labels;
            match value {
                Some(v) => labels.insert(key.to_owned(), v.to_owned()),
                None => labels.remove(key),
            };
        })
        .await;
    }

    /// Sets (`Some`) or removes (`None`) a service label (e.g. `istio.io/use-waypoint`), and
    /// waits until every node applied it.
    pub async fn set_service_label(
        &self,
        namespace: &str,
        service: &str,
        key: &str,
        value: Option<&str>,
    ) {
        self.update(|model| {
            let labels = &mut model.service_mut(namespace, service).labels;
            match value {
                Some(v) => labels.insert(key.to_owned(), v.to_owned()),
                None => labels.remove(key),
            };
        })
        .await;
    }

    /// The ingress gateway `name` (see [`ClusterBuilder::ingress_gateway`]).
    ///
    /// # Panics
    /// When there is no such gateway.
    #[track_caller]
    pub fn ingress(&self, name: &str) -> &Waypoint {
        self.waypoint(name)
    }

    /// # Panics
    /// When there is no such waypoint.
    #[track_caller]
    pub fn waypoint(&self, name: &str) -> &Waypoint {
        self.waypoints
            .iter()
            .find(|w| w.name() == name)
            .unwrap_or_else(|| panic!("no waypoint {name:?}"))
    }

    /// Enrols (`true`) or un-enrols a namespace, and waits until every node applied it.
    pub async fn set_ambient(&self, namespace: &str, ambient: bool) {
        self.set_namespace_label(namespace, DATAPLANE_MODE, ambient.then_some("ambient"))
            .await;
    }

    /// Sets (`Some`) or removes (`None`) a pod label, and waits until every node applied it.
    pub async fn set_pod_label(&self, pod: &str, key: &str, value: Option<&str>) {
        self.update(|model| {
            let labels = &mut model.pod_mut(pod).labels;
            match value {
                Some(v) => labels.insert(key.to_owned(), v.to_owned()),
                None => labels.remove(key),
            };
        })
        .await;
    }

    /// Adds or replaces YAML documents (policies, ...) under `name`, and waits until every
    /// node applied them.
    pub async fn apply(&self, name: &str, yaml: &str) {
        assert_dns_label("document", name);
        self.update(|model| {
            model.files.insert(name.to_owned(), yaml.to_owned());
        })
        .await;
    }

    /// Removes the documents added under `name`, and waits until every node applied it.
    pub async fn remove(&self, name: &str) {
        self.update(|model| {
            assert!(
                model.files.remove(name).is_some(),
                "no documents named {name:?}"
            );
        })
        .await;
    }

    /// Changes the configuration, writes it, and waits until every running node has loaded it
    /// and serves exactly the pods it enrols there.
    ///
    /// # Panics
    /// When writing fails or a node does not apply the change within [`SYNC_TIMEOUT`] (with the
    /// nodes' logs).
    async fn update(&self, change: impl FnOnce(&mut Model)) {
        let generation = {
            let mut model = lock(&self.model);
            change(&mut model);
            model.generation += 1;
            model
                .write(&self.config_dir)
                .unwrap_or_else(|e| panic!("writing the configuration: {e:#}"));
            model.generation
        };
        if let Err(e) = self.wait_applied(generation).await {
            panic!(
                "configuration generation {generation} not applied in {SYNC_TIMEOUT:?}: {e}\n{}",
                self.logs()
            );
        }
    }

    async fn wait_applied(&self, generation: u64) -> Result<(), String> {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            eventually(SYNC_TIMEOUT, || node.applied(generation)).await?;
        }
        for waypoint in self.waypoints.iter().filter(|w| w.is_running()) {
            eventually(SYNC_TIMEOUT, || waypoint.applied(generation)).await?;
        }
        Ok(())
    }

    /// The tail of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let _ = writeln!(
                out,
                "--- ztunnel of node {} ({}):\n{}",
                node.name,
                node.ztunnel.log.display(),
                tail(&node.logs(), LOG_TAIL_LINES)
            );
        }
        for waypoint in &self.waypoints {
            let _ = writeln!(
                out,
                "--- waypoint {}:\n{}",
                waypoint.name(),
                tail(&waypoint.logs(), LOG_TAIL_LINES)
            );
        }
        out
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("run", &self.run)
            .field("dir", &self.dir.path())
            .field("nodes", &self.nodes)
            .field("pods", &self.pods)
            .field("ca", &self.ca.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        // The processes go before the namespaces they hold sockets in; the namespaces (and
        // every link in them) are removed as the fields drop.
        self.waypoints.clear();
        for node in &mut self.nodes {
            let child = node
                .ztunnel
                .child
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner);
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_samples() {
        let metrics = Metrics::parse(
            "# TYPE x counter\n\
             istio_tcp_connections_opened_total{reporter=\"destination\",source_principal=\"spiffe://cluster.local/ns/a/sa/b\",q=\"a\\\"b,c\"} 3\n\
             plain 1.5\n\
             broken{x=\"1\" 2\n",
        );
        assert_eq!(
            metrics.sum(
                "istio_tcp_connections_opened_total",
                &[
                    ("reporter", "destination"),
                    ("source_principal", "spiffe://cluster.local/ns/a/sa/b"),
                    ("q", "a\"b,c"),
                ]
            ),
            3.0
        );
        assert_eq!(metrics.sum("plain", &[]), 1.5);
        assert_eq!(metrics.sum("broken", &[]), 0.0);
        assert_eq!(
            metrics.sum(
                "istio_tcp_connections_opened_total",
                &[("reporter", "source")]
            ),
            0.0
        );
    }

    #[test]
    fn finds_tcp_ports_in_frames() {
        let mut frame = vec![0u8; 14 + 20 + 20];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x45;
        frame[14 + 9] = 6;
        frame[34..36].copy_from_slice(&40000u16.to_be_bytes());
        frame[36..38].copy_from_slice(&15008u16.to_be_bytes());
        let captured = Captured {
            frames: vec![frame, vec![0u8; 10]],
        };
        assert_eq!(captured.tcp_frames_to_port(15008), 1);
        assert_eq!(captured.tcp_frames_with_port(40000), 1);
        assert_eq!(captured.tcp_frames_to_port(40000), 0);
        assert!(!captured.contains(b""));
    }
}

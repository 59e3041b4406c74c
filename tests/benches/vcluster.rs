//! The mesh against the direct path in the virtual cluster: client pod -> ztunnel node A ->
//! HBONE -> ztunnel node B -> server pod, next to the same kind of pods in a namespace outside
//! the mesh on the same two nodes, measured in one run. Prints bulk throughput of one TCP
//! stream, the round trip of 1 KiB request/response on one connection (p50, p99), and new
//! connections per second each carrying 1 KiB, with ratios to the direct path, and a "relay
//! only" column: the same client captured by ztunnel but sent as plain TCP to a server outside
//! the mesh (one extra socket hop through ztunnel, no TLS or HTTP/2). Then the ztunnels'
//! memory: RSS idle, with 1,000 and 10,000 idle tunnels open (each carried one byte each way
//! and stays open), and after they closed, with the memory each idle tunnel costs a proxy.
//!
//! Run as root: `cargo bench -p mesh-tests --bench vcluster` (`BENCH_BULK_MIB`,
//! `BENCH_RTT_SAMPLES`, `BENCH_CONN_SECONDS`, `BENCH_CONN_CONCURRENCY`, `BENCH_IDLE_TUNNELS`
//! (comma-separated wave sizes, default `1000,10000`), `BENCH_POOL_REAP_SECONDS` (wait for
//! idle HBONE connections to close, default 65) change the load; `BENCH_ONLY_MEMORY=1` stops
//! after the memory figures;
//! `BENCH_ZTUNNEL_<NAME>=<value>` sets `<NAME>` for both ztunnels, e.g.
//! `BENCH_ZTUNNEL_RUST_LOG=info,access=off`). It prints figures and never fails on a timing;
//! without root it says so and exits.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_tests::load::in_pod;
use mesh_tests::load::{self, MESSAGE as MSG};
use mesh_tests::vcluster::{Cluster, needs_root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel::capture::NetNs;

const SINK_PORT: u16 = 9000;
const ECHO_PORT: u16 = 9001;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !needs_root() {
        return;
    }
    if let Ok(port) = std::env::var(IDLE_ECHO_ENV) {
        idle_echo_child(port.parse().unwrap());
        return;
    }
    // The client pod's end of each idle tunnel is a socket of this process: use the hard limit.
    let _ = mesh::accept::raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Gbit/s of one stream sending `bytes` to the sink at `addr`.
async fn bulk(addr: SocketAddr, bytes: u64) -> f64 {
    load::bulk(connect(addr).await, bytes).await
}

/// p50 and p99 round trip of 1 KiB on one connection, in microseconds.
async fn rtt(addr: SocketAddr, samples: usize) -> (f64, f64) {
    load::round_trips(connect(addr).await, samples / 10, samples).await
}

/// New connections per second, each sending 1 KiB and reading the 1 KiB echo, from
/// `concurrency` loops for `seconds`.
async fn connection_rate(addr: SocketAddr, seconds: u64, concurrency: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..concurrency {
        loops.push(tokio::task::spawn_local(async move {
            let out = vec![3u8; MSG];
            let mut back = vec![0u8; MSG];
            let mut done = 0u64;
            while Instant::now() < deadline {
                let mut s = connect(addr).await;
                s.write_all(&out).await.unwrap();
                s.read_exact(&mut back).await.unwrap();
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for l in loops {
        total += l.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// Set (to a port) in the child process that serves the server pod's end of the idle tunnels.
const IDLE_ECHO_ENV: &str = "VCLUSTER_BENCH_IDLE_ECHO_PORT";
const IDLE_ECHO_PORT: u16 = 9002;

/// The child's work: an echo server on `port` in the namespace it was started in (by `ip netns
/// exec`), until its standard input closes (the bench ended, however it ended). A process of
/// its own, so the 10,000 server-side sockets of a wave do not count against this process'
/// open-file limit.
fn idle_echo_child(port: u16) {
    let _ = mesh::accept::raise_open_file_limit();
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .unwrap();
        println!("ready");
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                // One byte back per byte read, with a buffer as small as the load.
                let mut byte = [0u8; 1];
                while let Ok(1) = s.read(&mut byte).await {
                    if s.write_all(&byte).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Starts [`idle_echo_child`] in the namespace `netns` and waits until it listens.
fn spawn_idle_echo(netns: &str) -> std::process::Child {
    use std::io::BufRead;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(std::env::current_exe().unwrap())
        .env(IDLE_ECHO_ENV, IDLE_ECHO_PORT.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        "ready",
        "the idle-wave echo server did not start"
    );
    child
}

/// RSS of ztunnel A and B in KiB: (all of it, its anonymous part). The rest is file-backed,
/// mostly the binary's code pages, which the kernel can drop and read again.
fn rss_kib(pids: [u32; 2]) -> [(u64, u64); 2] {
    pids.map(|pid| {
        let kib = |field| load::status_kib(pid, field).unwrap_or(0);
        (kib("VmRSS"), kib("RssAnon"))
    })
}

/// The ztunnels' RSS once they have been quiet long enough for their parked workers to hand
/// freed memory back (`mesh::alloc::COLLECT_INTERVAL` is 2 s): the lowest of a few readings.
async fn settled_rss(pids: [u32; 2]) -> [(u64, u64); 2] {
    let mut low = [(u64::MAX, u64::MAX); 2];
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(750)).await;
        let now = rss_kib(pids);
        for (low, now) in low.iter_mut().zip(now) {
            *low = (low.0.min(now.0), low.1.min(now.1));
        }
    }
    low
}

/// Memory of the two ztunnels around waves of idle tunnels.
/// RSS of ztunnel A and B, KiB: (all, anonymous).
type Rss = [(u64, u64); 2];

struct Memory {
    idle: Rss,
    /// (tunnels held open, RSS with them open).
    waves: Vec<(usize, Rss)>,
    after: Rss,
    /// Once the pooled HBONE connections the waves opened were idle for longer than the
    /// pool's idle timeout (60 s) and closed.
    after_reaped: Rss,
}

/// Opens connections to the echo server at `addr` until `held` has `target`, each carrying one
/// byte each way (so its tunnel is up end to end) and then left idle.
async fn open_idle(held: &mut Vec<TcpStream>, target: usize, addr: SocketAddr) {
    while held.len() < target {
        let batch = (target - held.len()).min(64);
        let mut opening = tokio::task::JoinSet::new();
        for _ in 0..batch {
            opening.spawn(async move {
                let mut s = connect(addr).await;
                s.write_all(b"?").await.unwrap();
                let mut back = [0u8; 1];
                s.read_exact(&mut back).await.unwrap();
                s
            });
        }
        while let Some(s) = opening.join_next().await {
            held.push(s.unwrap());
        }
    }
}

async fn idle_waves(client: NetNs, echo: SocketAddr, waves: Vec<usize>, pids: [u32; 2]) -> Memory {
    in_pod(client, move || async move {
        // One tunnel first: certificates fetched, the HBONE pool warm.
        open_idle(&mut Vec::new(), 1, echo).await;
        let idle = settled_rss(pids).await;
        for (node, pid) in ["A", "B"].iter().zip(pids) {
            let kib = |f| load::status_kib(pid, f).unwrap_or(0);
            let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Threads:").map(|t| t.trim().to_owned()))
                })
                .unwrap_or_default();
            println!(
                "ztunnel {node} idle: RssAnon {} KiB, RssFile {} KiB, {threads} threads",
                kib("RssAnon"),
                kib("RssFile"),
            );
        }
        let mut held = Vec::new();
        let mut measured = Vec::new();
        for target in waves {
            open_idle(&mut held, target, echo).await;
            measured.push((held.len(), settled_rss(pids).await));
        }
        drop(held);
        let after = settled_rss(pids).await;
        let reap = env("BENCH_POOL_REAP_SECONDS", 65);
        tokio::time::sleep(Duration::from_secs(reap)).await;
        Memory {
            idle,
            waves: measured,
            after,
            after_reaped: settled_rss(pids).await,
        }
    })
    .await
}

struct Figures {
    bulk_gbps: f64,
    p50_us: f64,
    p99_us: f64,
    conns_per_s: f64,
    /// CPU seconds both ztunnels used in each phase (bulk, round trips, connections), and what
    /// the phase moved (MiB, round trips, connections).
    cpu: [(f64, f64); 3],
}

/// CPU seconds ztunnel A and B have used so far.
fn ztunnel_cpu(pids: [u32; 2]) -> f64 {
    pids.map(load::cpu_seconds).iter().sum()
}

async fn measure(
    client: NetNs,
    server: SocketAddr,
    bulk_bytes: u64,
    ztunnels: [u32; 2],
) -> Figures {
    let samples = env("BENCH_RTT_SAMPLES", 20_000) as usize;
    let seconds = env("BENCH_CONN_SECONDS", 3);
    let concurrency = env("BENCH_CONN_CONCURRENCY", 8);
    let sink = SocketAddr::new(server.ip(), SINK_PORT);
    let echo = SocketAddr::new(server.ip(), ECHO_PORT);
    in_pod(client, move || async move {
        // Warm up the path (certificates, pooled HBONE connection) before measuring.
        let _ = bulk(sink, 16 << 20).await;
        let mut runs = Vec::new();
        let cpu_start = ztunnel_cpu(ztunnels);
        for _ in 0..3 {
            runs.push(bulk(sink, bulk_bytes).await);
        }
        let cpu_bulk = ztunnel_cpu(ztunnels) - cpu_start;
        runs.sort_by(f64::total_cmp);
        let cpu_start = ztunnel_cpu(ztunnels);
        let (p50, p99) = rtt(echo, samples).await;
        let cpu_rtt = ztunnel_cpu(ztunnels) - cpu_start;
        let local = tokio::task::LocalSet::new();
        let start = Instant::now();
        let cpu_start = ztunnel_cpu(ztunnels);
        let conns = local
            .run_until(connection_rate(echo, seconds, concurrency))
            .await;
        let cpu_conns = ztunnel_cpu(ztunnels) - cpu_start;
        Figures {
            bulk_gbps: runs[1],
            p50_us: p50,
            p99_us: p99,
            conns_per_s: conns,
            cpu: [
                (cpu_bulk, (3 * bulk_bytes) as f64 / f64::from(1 << 20)),
                // Warm-up round trips (a tenth) are inside the timed CPU too.
                (cpu_rtt, samples as f64 * 1.1),
                (cpu_conns, conns * start.elapsed().as_secs_f64()),
            ],
        }
    })
    .await
}

async fn run() {
    let bulk_bytes = env("BENCH_BULK_MIB", 512) << 20;
    let mut builder = Cluster::builder();
    for (key, value) in std::env::vars() {
        if let Some(name) = key.strip_prefix("BENCH_ZTUNNEL_") {
            builder = if name == "RUST_LOG" {
                builder.log_filter(&value)
            } else {
                builder.ztunnel_env(name, &value)
            };
        }
    }
    let cluster = builder
        .node("a")
        .node("b")
        .namespace("mesh")
        .ambient()
        .namespace("plain")
        .pod("a", "mesh", "client")
        .pod("b", "mesh", "server")
        .pod("a", "plain", "client-direct")
        .pod("b", "plain", "server-direct")
        .build()
        .await
        .expect("virtual cluster");
    let ztunnels = [cluster.node("a").pid(), cluster.node("b").pid()];
    for server in ["server", "server-direct"] {
        let pod = cluster.pod(server);
        pod.serve(SINK_PORT, |s, _| load::sink(s))
            .await
            .map(std::mem::forget)
            .unwrap();
        pod.serve_echo(ECHO_PORT)
            .await
            .map(std::mem::forget)
            .unwrap();
    }
    let waves: Vec<usize> = std::env::var("BENCH_IDLE_TUNNELS")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let mut echo_child = spawn_idle_echo(cluster.pod("server").netns().name());
    let memory = idle_waves(
        cluster.pod("client").netns().open().unwrap(),
        SocketAddr::new(cluster.pod("server").ip(), IDLE_ECHO_PORT),
        waves,
        ztunnels,
    )
    .await;
    let _ = echo_child.kill();
    let _ = echo_child.wait();
    if std::env::var("BENCH_ONLY_MEMORY").is_ok_and(|v| v == "1") {
        print_memory(&memory);
        return;
    }
    let direct = measure(
        cluster.pod("client-direct").netns().open().unwrap(),
        SocketAddr::new(cluster.pod("server-direct").ip(), 0),
        bulk_bytes,
        ztunnels,
    )
    .await;
    let mesh = measure(
        cluster.pod("client").netns().open().unwrap(),
        SocketAddr::new(cluster.pod("server").ip(), 0),
        bulk_bytes,
        ztunnels,
    )
    .await;
    // Captured on the client side but sent as plain TCP (the server is outside the mesh): the
    // cost of one extra socket hop through ztunnel without HBONE, to tell the kernel's share
    // of the mesh's overhead from TLS and HTTP/2's.
    let relay = measure(
        cluster.pod("client").netns().open().unwrap(),
        SocketAddr::new(cluster.pod("server-direct").ip(), 0),
        bulk_bytes,
        ztunnels,
    )
    .await;

    println!();
    println!(
        "Virtual cluster, pod on node A -> pod on node B ({} MiB bulk, median of 3)",
        bulk_bytes >> 20
    );
    println!(
        "{:<34}{:>10}{:>10}{:>8}{:>14}",
        "", "direct", "mesh", "ratio", "relay only"
    );
    let row = |name: &str, d: f64, m: f64, r: f64, precision: usize| {
        println!(
            "{name:<34}{d:>10.precision$}{m:>10.precision$}{:>8.2}{r:>14.precision$}",
            m / d
        );
    };
    row(
        "bulk, one stream (Gbit/s)",
        direct.bulk_gbps,
        mesh.bulk_gbps,
        relay.bulk_gbps,
        2,
    );
    row(
        "new connections/s (1 KiB each)",
        direct.conns_per_s,
        mesh.conns_per_s,
        relay.conns_per_s,
        0,
    );
    row(
        "1 KiB round trip p50 (us)",
        direct.p50_us,
        mesh.p50_us,
        relay.p50_us,
        1,
    );
    row(
        "1 KiB round trip p99 (us)",
        direct.p99_us,
        mesh.p99_us,
        relay.p99_us,
        1,
    );
    let per_unit = |f: &Figures, i: usize| f.cpu[i].0 * 1e6 / f.cpu[i].1;
    println!(
        "ztunnel CPU (A + B, us; /proc ticks of 10 ms): per MiB of bulk {:.0} (relay only {:.0}), \
         per round trip {:.1} ({:.1}), per connection {:.0} ({:.0})",
        per_unit(&mesh, 0),
        per_unit(&relay, 0),
        per_unit(&mesh, 1),
        per_unit(&relay, 1),
        per_unit(&mesh, 2),
        per_unit(&relay, 2),
    );
    println!(
        "ztunnel CPU per 10k request/response (A + B): {:.2} s (relay only {:.2} s); \
         p99 / p50: {:.2} (direct {:.2})",
        per_unit(&mesh, 1) * 1e4 / 1e6,
        per_unit(&relay, 1) * 1e4 / 1e6,
        mesh.p99_us / mesh.p50_us,
        direct.p99_us / direct.p50_us,
    );
    println!(
        "added p50 round trip: {:.1} us (target: at most 30); bulk ratio target >= 0.45, \
         connection rate ratio target >= 0.40",
        mesh.p50_us - direct.p50_us
    );
    print_memory(&memory);
}

fn print_memory(memory: &Memory) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!();
    println!(
        "ztunnel memory (RSS MiB, its anonymous part in brackets; the rest is the binary's \
         code pages), client pod on node A -> server pod on node B"
    );
    println!("{:<34}{:>14}{:>14}", "", "A", "B");
    let row = |name: String, rss: Rss| {
        let cell = |(all, anon): (u64, u64)| format!("{:.1} ({:.1})", mib(all), mib(anon));
        println!("{name:<34}{:>14}{:>14}", cell(rss[0]), cell(rss[1]));
    };
    row("idle (one tunnel warmed the path)".into(), memory.idle);
    for (n, rss) in &memory.waves {
        row(format!("{n} idle tunnels open"), *rss);
    }
    row("after they closed".into(), memory.after);
    row(
        "and their HBONE connections reaped".into(),
        memory.after_reaped,
    );
    for (n, rss) in &memory.waves {
        let per = |i: usize| (rss[i].0 as f64 - memory.idle[i].0 as f64) / *n as f64;
        println!(
            "{:<34}{:>14.1}{:>14.1}",
            format!("KiB per idle tunnel ({n} open)"),
            per(0),
            per(1)
        );
    }
    println!(
        "targets: at most 4 KiB per idle tunnel per proxy, idle at most 12 MiB per ztunnel, \
         after closing within 10 % of idle"
    );
}

//! The mesh against the direct path in the virtual cluster: client pod -> ztunnel node A ->
//! HBONE -> ztunnel node B -> server pod, next to the same kind of pods in a namespace outside
//! the mesh on the same two nodes, measured in one run. Prints bulk throughput of one TCP
//! stream, the round trip of 1 KiB request/response on one connection (p50, p99), and new
//! connections per second each carrying 1 KiB, with ratios to the direct path, and a "relay
//! only" column: the same client captured by ztunnel but sent as plain TCP to a server outside
//! the mesh (one extra socket hop through ztunnel, no TLS or HTTP/2).
//!
//! Run as root: `cargo bench -p mesh-tests --bench vcluster` (`BENCH_BULK_MIB`,
//! `BENCH_RTT_SAMPLES`, `BENCH_CONN_SECONDS`, `BENCH_CONN_CONCURRENCY` change the load;
//! `BENCH_ZTUNNEL_<NAME>=<value>` sets `<NAME>` for both ztunnels, e.g.
//! `BENCH_ZTUNNEL_RUST_LOG=info,access=off`). It prints figures and never fails on a timing;
//! without root it says so and exits.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

/// Runs `load` on a thread inside `netns` with its own single-threaded runtime, so every socket
/// the load opens is the pod's, as an unmodified application's would be.
async fn in_pod<T, F, Fut>(netns: NetNs, load: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    tokio::task::spawn_blocking(move || {
        netns
            .run(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(load())
            })
            .unwrap()
    })
    .await
    .unwrap()
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
        "added p50 round trip: {:.1} us (target: at most 30); bulk ratio target >= 0.45, \
         connection rate ratio target >= 0.40",
        mesh.p50_us - direct.p50_us
    );
}

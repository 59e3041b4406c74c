//! HBONE benchmark: one tunnel's bulk throughput and the round trip of 1 KiB messages on a
//! pooled tunnel, next to plain TCP on loopback measured in the same run, plus a sweep of HTTP/2
//! stream windows that backs the default in `mesh::hbone::H2Settings`.
//!
//! Run: `cargo bench -p mesh-tests --bench hbone` (set `BENCH_BULK_MIB` to change the bulk size).
//! It prints figures; it never fails on a timing.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh::hbone::{
    ClientConfig, ConnectRequest, H2Settings, HboneAuthority, HboneClient, ServerConfig,
};
use mesh_tests::load::{bulk, round_trips, sink};
use mesh_tests::*;
use tokio::net::{TcpListener, TcpStream};

const RTT_WARMUP: usize = 2_000;
const RTT_SAMPLES: usize = 20_000;

/// A server whose every connection is a [`sink`].
async fn start_sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(sink(s));
        }
    });
    addr
}

/// Median of three bulk runs on fresh tunnels from `h`, after a warm-up.
async fn bulk_median(h: &Hbone, sink: SocketAddr, bytes: u64) -> f64 {
    let _ = bulk(h.client.connect((h.request)(sink)).await.unwrap(), 32 << 20).await;
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(bulk(h.client.connect((h.request)(sink)).await.unwrap(), bytes).await);
    }
    runs.sort_by(f64::total_cmp);
    runs[1]
}

struct Hbone {
    client: HboneClient,
    request: Box<dyn Fn(SocketAddr) -> ConnectRequest>,
    _stop: tokio_util::sync::DropGuard,
}

async fn hbone(h2: H2Settings) -> Hbone {
    let pki = TestPki::new(TRUST_DOMAIN);
    let client_id = pki.id("bench", "client");
    let server_id = pki.id("bench", "server");
    let (hbone_addr, _seen, stop) = start_forwarding_hbone(
        pki.cert(&server_id),
        ServerConfig {
            h2,
            ..ServerConfig::default()
        },
    )
    .await;
    let client = HboneClient::new(
        ClientConfig {
            h2,
            ..ClientConfig::default()
        },
        Arc::new(StaticCerts::default().with(pki.cert(&client_id))),
    );
    let request = Box::new(move |target| ConnectRequest {
        source: client_id.clone(),
        destination: server_id.clone(),
        hbone_addr,
        authority: HboneAuthority(target),
        headers: http::HeaderMap::new(),
    });
    Hbone {
        client,
        request,
        _stop: stop.drop_guard(),
    }
}

async fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s
}

fn main() {
    // BENCH_THREADS=1 runs everything on one thread, to tell scheduling cost from work.
    let threads = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .unwrap()
    };
    runtime.block_on(run());
}

async fn run() {
    let mib: u64 = std::env::var("BENCH_BULK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let bytes = mib * 1024 * 1024;
    let sink = start_sink().await;
    let echo = start_echo().await;
    let h = hbone(H2Settings::default()).await;

    let mut tcp_runs = Vec::new();
    for _ in 0..3 {
        tcp_runs.push(bulk(tcp(sink).await, bytes).await);
    }
    tcp_runs.sort_by(f64::total_cmp);
    let tcp_bulk = tcp_runs[1];
    // Also warms the pool, so the round trips below run on an established, pooled connection.
    let hbone_bulk = bulk_median(&h, sink, bytes).await;
    let (tcp_p50, tcp_p99) = round_trips(tcp(echo).await, RTT_WARMUP, RTT_SAMPLES).await;
    let (h_p50, h_p99) = round_trips(
        h.client.connect((h.request)(echo)).await.unwrap(),
        RTT_WARMUP,
        RTT_SAMPLES,
    )
    .await;

    println!();
    println!(
        "HBONE vs plain TCP on loopback ({mib} MiB bulk, median of 3; {RTT_SAMPLES} x 1 KiB round trips)"
    );
    println!(
        "{:<28}{:>14}{:>14}{:>10}",
        "", "plain TCP", "HBONE", "ratio"
    );
    println!(
        "{:<28}{:>14.2}{:>14.2}{:>10.2}",
        "bulk, one stream (Gbit/s)",
        tcp_bulk,
        hbone_bulk,
        hbone_bulk / tcp_bulk
    );
    println!(
        "{:<28}{:>14.1}{:>14.1}{:>10.2}",
        "1 KiB round trip p50 (us)",
        tcp_p50,
        h_p50,
        h_p50 / tcp_p50
    );
    println!(
        "{:<28}{:>14.1}{:>14.1}{:>10.2}",
        "1 KiB round trip p99 (us)",
        tcp_p99,
        h_p99,
        h_p99 / tcp_p99
    );
    println!("added p50 round trip: {:.1} us", h_p50 - tcp_p50);

    println!();
    println!(
        "HTTP/2 stream window sweep (one tunnel, {} MiB, median of 3)",
        mib / 2
    );
    println!("{:<24}{:>14}", "stream window", "Gbit/s");
    for window in [64 * 1024, 256 * 1024, 1 << 20, 4 << 20, 16 << 20] {
        let settings = H2Settings {
            stream_window: window,
            connection_window: (window * 4).max(16 << 20),
            ..H2Settings::default()
        };
        let g = bulk_median(&hbone(settings).await, sink, bytes / 2).await;
        let marker = if settings.stream_window == H2Settings::default().stream_window {
            "  (default)"
        } else {
            ""
        };
        println!(
            "{:<24}{:>14.2}{marker}",
            format!("{} KiB", window / 1024),
            g
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    println!();
    println!(
        "HTTP/2 max frame size sweep (default window, one tunnel, {} MiB, median of 3)",
        mib / 2
    );
    println!("{:<24}{:>14}", "max frame size", "Gbit/s");
    for frame in [16 * 1024, 64 * 1024, 256 * 1024, 1 << 20] {
        let settings = H2Settings {
            max_frame_size: frame,
            ..H2Settings::default()
        };
        let g = bulk_median(&hbone(settings).await, sink, bytes / 2).await;
        let marker = if frame == H2Settings::default().max_frame_size {
            "  (default)"
        } else {
            ""
        };
        println!("{:<24}{:>14.2}{marker}", format!("{} KiB", frame / 1024), g);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

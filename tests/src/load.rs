//! Load generators the benchmarks share: running a load inside a pod, a byte sink, one stream's
//! bulk rate, and 1 KiB round trips. They panic on I/O errors (a benchmark whose path breaks
//! has no figure to print).

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use ztunnel::capture::NetNs;

/// Runs `load` on a thread inside `netns` with its own single-threaded runtime, so every socket
/// the load opens is the pod's, as an unmodified application's would be.
pub async fn in_pod<T, F, Fut>(netns: NetNs, load: F) -> T
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

/// Size of the messages of [`round_trips`].
pub const MESSAGE: usize = 1024;

/// Serves one connection as a sink: reads to EOF, then answers with the byte count (8 bytes,
/// big-endian) and closes.
pub async fn sink<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
    }
    let _ = s.write_all(&total.to_be_bytes()).await;
    let _ = s.shutdown().await;
}

/// Sends `bytes` to a [`sink`] and waits for its count; returns Gbit/s.
pub async fn bulk<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, bytes: u64) -> f64 {
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).await.unwrap();
        left -= n as u64;
    }
    s.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await.unwrap();
    assert_eq!(u64::from_be_bytes(count), bytes, "sink received every byte");
    bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// `warmup + samples` round trips of [`MESSAGE`] bytes against an echo server on one stream;
/// returns (p50, p99) of the measured ones in microseconds.
pub async fn round_trips<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    warmup: usize,
    samples: usize,
) -> (f64, f64) {
    let out = vec![7u8; MESSAGE];
    let mut back = vec![0u8; MESSAGE];
    let mut times = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let t = Instant::now();
        s.write_all(&out).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        if i >= warmup {
            times.push(t.elapsed());
        }
    }
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    (pct(0.50).as_secs_f64() * 1e6, pct(0.99).as_secs_f64() * 1e6)
}

/// utime + stime of a process, in seconds (`/proc` counts in USER_HZ = 100 ticks a second).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command (which may hold spaces) in parentheses: state is field 3,
    // utime 14 and stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// The machine's (busy, total) CPU ticks from the first line of `/proc/stat`.
pub fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// A `/proc/<pid>/status` figure in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

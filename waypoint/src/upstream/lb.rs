//! Load-balancer picks over a cluster's endpoints, as pure functions: round robin, random,
//! least request (power of two choices) and consistent hashing on a ring; plus extracting the
//! hash key from a request.
//!
//! Verified against Envoy's load balancer overview and Istio's `LoadBalancerSettings`:
//! - LEAST_REQUEST (Istio's default) with equal weights is Envoy's P2C: pick two random
//!   available hosts and take the one with fewer active requests (`choice_count` 2). We draw two
//!   *distinct* hosts, so with two endpoints the busier one never gets a new request until it
//!   has drained to the other's level, as Envoy describes.
//! - Consistent hashing is a ring hash, Istio's default algorithm ("Defaults to RingHash"): each
//!   host owns points hashed from `"<addr>_<i>"` and a key maps to the first point at or after
//!   its hash. Envoy spreads a ring of at least 1024 points over the hosts, so the points of
//!   every host change with the host count; we give each host a fixed 160 points instead, so
//!   adding or removing one of N hosts moves exactly the keys of that host, about 1/N (Istio's
//!   documentation promises affinity breaks for `1/backends`). Ejected hosts are skipped by
//!   walking the ring forward, so again only their keys move.
//! - Without a hash key (header, cookie or query parameter absent, no source address) Envoy
//!   picks a random host.
//! - `httpCookie` with a `ttl`: when the cookie is missing the proxy generates a value, hashes
//!   on it and answers `Set-Cookie: name="value"; Max-Age=<ttl s>; Path=<path>; HttpOnly`
//!   (Envoy's `makeSetCookieValue`; a zero ttl makes a session cookie, no `Max-Age`). Quotes
//!   around a cookie value are stripped before hashing, so the generated cookie hashes the same
//!   when the client sends it back.
//!
//! Hashes are FNV-1a with a murmur3 finaliser: stable across builds and platforms, so every
//! waypoint replica maps a key to the same endpoint.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::HeaderMap;
use http::header::COOKIE;
use mesh::model::HashKey;

/// Ring points per host: enough for an even spread (each host's share varies by about 8%), and
/// independent of the host count so the ring of the others does not change.
const POINTS_PER_HOST: usize = 160;

/// The index of the `k`-th available endpoint (0-based) among `n`.
fn kth_available(n: usize, k: usize, available: &impl Fn(usize) -> bool) -> Option<usize> {
    (0..n).filter(|&i| available(i)).nth(k)
}

fn count_available(n: usize, available: &impl Fn(usize) -> bool) -> usize {
    (0..n).filter(|&i| available(i)).count()
}

/// Round robin over the available endpoints; `counter` is the cluster's pick count.
pub(super) fn round_robin(
    n: usize,
    counter: usize,
    available: impl Fn(usize) -> bool,
) -> Option<usize> {
    let healthy = count_available(n, &available);
    if healthy == 0 {
        return None;
    }
    kth_available(n, counter % healthy, &available)
}

/// A uniformly random available endpoint; `random(n)` returns a number in `0..n`.
pub(super) fn random(
    n: usize,
    available: impl Fn(usize) -> bool,
    mut random: impl FnMut(usize) -> usize,
) -> Option<usize> {
    let healthy = count_available(n, &available);
    if healthy == 0 {
        return None;
    }
    kth_available(n, random(healthy).min(healthy - 1), &available)
}

/// Envoy's P2C: two distinct random available endpoints, the one with fewer `active` requests
/// wins (the first drawn on a tie).
pub(super) fn least_request(
    n: usize,
    available: impl Fn(usize) -> bool,
    active: impl Fn(usize) -> u32,
    mut random: impl FnMut(usize) -> usize,
) -> Option<usize> {
    let healthy = count_available(n, &available);
    match healthy {
        0 => None,
        1 => kth_available(n, 0, &available),
        _ => {
            let first = random(healthy).min(healthy - 1);
            let mut second = random(healthy - 1).min(healthy - 2);
            if second >= first {
                second += 1;
            }
            let a = kth_available(n, first, &available)?;
            let b = kth_available(n, second, &available)?;
            Some(if active(b) < active(a) { b } else { a })
        }
    }
}

/// A hash ring over a cluster's endpoints (by address, so it only depends on the set).
#[derive(Debug, Clone)]
pub(super) struct Ring {
    /// (point, endpoint index), sorted by point.
    points: Vec<(u64, usize)>,
}

impl Ring {
    pub(super) fn new(endpoints: &[SocketAddr]) -> Self {
        let per_host = POINTS_PER_HOST;
        let mut points = Vec::with_capacity(per_host * endpoints.len());
        for (index, addr) in endpoints.iter().enumerate() {
            let prefix = format!("{addr}_");
            for i in 0..per_host {
                let mut hasher = Fnv::new();
                hasher.write(prefix.as_bytes());
                hasher.write(i.to_string().as_bytes());
                points.push((hasher.finish(), index));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// The endpoint owning `hash`, skipping unavailable ones clockwise.
    pub(super) fn pick(&self, hash: u64, available: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|(point, _)| *point < hash);
        (0..self.points.len())
            .map(|step| self.points[(start + step) % self.points.len()].1)
            .find(|&index| available(index))
    }
}

/// What a consistent-hash policy made of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum HashOutcome {
    /// Hash on this.
    Key(u64),
    /// The key is absent: pick at random.
    Missing,
    /// The cookie was absent and `ttl` set: hash on a generated value and send it back.
    Generated { hash: u64, set_cookie: String },
}

/// The request attributes a hash key may read.
#[derive(Debug, Clone, Copy)]
pub(super) struct HashSource<'a> {
    pub(super) source_ip: Option<IpAddr>,
    pub(super) headers: &'a HeaderMap,
    pub(super) query: Option<&'a str>,
}

/// Applies `key` to a request; `generate` makes a fresh cookie value when one is needed.
pub(super) fn hash_request(
    key: &HashKey,
    source: &HashSource<'_>,
    generate: impl FnOnce() -> String,
) -> HashOutcome {
    match key {
        HashKey::Header(name) => {
            let mut values = source.headers.get_all(name.as_str()).iter().peekable();
            if values.peek().is_none() {
                return HashOutcome::Missing;
            }
            let mut hasher = Fnv::new();
            for (i, value) in values.enumerate() {
                if i > 0 {
                    hasher.write(b",");
                }
                hasher.write(value.as_bytes());
            }
            HashOutcome::Key(hasher.finish())
        }
        HashKey::Cookie { name, path, ttl } => match cookie_value(source.headers, name) {
            Some(value) => HashOutcome::Key(hash_bytes(value.as_bytes())),
            None => match ttl {
                Some(ttl) => {
                    let value = generate();
                    HashOutcome::Generated {
                        hash: hash_bytes(value.as_bytes()),
                        set_cookie: set_cookie_value(name, &value, path.as_deref(), *ttl),
                    }
                }
                None => HashOutcome::Missing,
            },
        },
        HashKey::SourceIp => match source.source_ip {
            Some(IpAddr::V4(ip)) => HashOutcome::Key(hash_bytes(&ip.octets())),
            Some(IpAddr::V6(ip)) => HashOutcome::Key(hash_bytes(&ip.octets())),
            None => HashOutcome::Missing,
        },
        HashKey::QueryParameter(name) => source
            .query
            .and_then(|query| query_value(query, name))
            .map_or(HashOutcome::Missing, |value| {
                HashOutcome::Key(hash_bytes(value.as_bytes()))
            }),
    }
}

/// The value of cookie `name` in the `cookie` headers, quotes stripped.
fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| key.trim() == name)
        .map(|(_, value)| {
            let value = value.trim();
            value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value)
        })
}

/// The first value of query parameter `name` (raw, not percent-decoded).
fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Envoy's `makeSetCookieValue` with `HttpOnly`.
fn set_cookie_value(name: &str, value: &str, path: Option<&str>, ttl: Duration) -> String {
    let mut cookie = format!("{name}=\"{value}\"");
    let max_age = ttl.as_secs();
    if max_age != 0 {
        cookie.push_str(&format!("; Max-Age={max_age}"));
    }
    if let Some(path) = path.filter(|p| !p.is_empty()) {
        cookie.push_str("; Path=");
        cookie.push_str(path);
    }
    cookie.push_str("; HttpOnly");
    cookie
}

/// FNV-1a, finished with murmur3's `fmix64` so nearby inputs spread over the ring.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        let mut k = self.0;
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        k ^= k >> 33;
        k
    }
}

pub(super) fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut hasher = Fnv::new();
    hasher.write(bytes);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
            .collect()
    }

    #[test]
    fn round_robin_cycles_over_available_only() {
        let available = |i: usize| i != 1;
        let picks: Vec<_> = (0..6)
            .map(|c| round_robin(4, c, available).unwrap_or(99))
            .collect();
        assert_eq!(picks, [0, 2, 3, 0, 2, 3]);
        assert_eq!(round_robin(3, 0, |_| false), None);
    }

    #[test]
    fn random_picks_only_available() {
        let mut draws = [0usize, 1, 2, 5].into_iter();
        for _ in 0..4 {
            let pick = random(3, |i| i != 0, |n| draws.next().unwrap_or(0) % n);
            assert!(matches!(pick, Some(1 | 2)));
        }
        assert_eq!(random(3, |_| false, |_| 0), None);
    }

    #[test]
    fn least_request_prefers_fewer_active_and_draws_distinct_hosts() {
        let active = [5u32, 0, 3];
        // Draws (first, second-before-shift): every pair must choose the less busy of the two.
        for first in 0..3 {
            for second in 0..2 {
                let mut draws = [first, second].into_iter();
                let pick = least_request(3, |_| true, |i| active[i], |_| draws.next().unwrap_or(0));
                let b = if second >= first { second + 1 } else { second };
                let expected = if active[b] < active[first] { b } else { first };
                assert_eq!(pick, Some(expected), "draws {first},{second}");
            }
        }
        // With two endpoints both are always compared: the idle one wins every time.
        for _ in 0..100 {
            let pick = least_request(2, |_| true, |i| [7, 0][i], |n| fastrand::usize(..n));
            assert_eq!(pick, Some(1));
        }
        assert_eq!(least_request(3, |i| i == 2, |_| 0, |_| 0), Some(2));
        assert_eq!(least_request(3, |_| false, |_| 0, |_| 0), None);
    }

    #[test]
    fn ring_is_stable_and_moves_about_one_nth_when_a_host_leaves() {
        let all = addrs(5);
        let ring = Ring::new(&all);
        let again = Ring::new(&all);
        let keys: Vec<u64> = (0..10_000u32)
            .map(|k| hash_bytes(&k.to_be_bytes()))
            .collect();
        let before: Vec<SocketAddr> = keys
            .iter()
            .map(|&k| all[ring.pick(k, |_| true).unwrap_or(0)])
            .collect();
        for &k in &keys {
            assert_eq!(ring.pick(k, |_| true), again.pick(k, |_| true));
        }
        // Spread: every host gets a fair share (1/5 = 2000, loose bounds).
        for addr in &all {
            let share = before.iter().filter(|a| *a == addr).count();
            assert!((1000..3000).contains(&share), "{addr}: {share}");
        }
        // Remove the third host: only its keys move.
        let fewer: Vec<SocketAddr> = all.iter().copied().filter(|a| *a != all[2]).collect();
        let ring = Ring::new(&fewer);
        let mut moved = 0;
        for (k, old) in keys.iter().zip(&before) {
            let new = fewer[ring.pick(*k, |_| true).unwrap_or(0)];
            if new != *old {
                assert_eq!(*old, all[2], "a key of a remaining host moved");
                moved += 1;
            }
        }
        assert!((1000..3000).contains(&moved), "moved {moved}");
    }

    #[test]
    fn ring_skips_unavailable_hosts_keeping_other_keys() {
        let all = addrs(3);
        let ring = Ring::new(&all);
        for k in 0..1000u32 {
            let hash = hash_bytes(&k.to_be_bytes());
            let normal = ring.pick(hash, |_| true);
            let skipping = ring.pick(hash, |i| i != 0);
            if normal == Some(0) {
                assert!(matches!(skipping, Some(1 | 2)));
            } else {
                assert_eq!(normal, skipping);
            }
        }
        assert_eq!(ring.pick(1, |_| false), None);
    }

    #[test]
    fn hash_keys_from_request_attributes() {
        let mut headers = HeaderMap::new();
        headers.insert("x-user", "alice".parse().expect("value"));
        headers.append(
            COOKIE,
            "a=1; session=\"abc\"".parse().expect("cookie header"),
        );
        let source = HashSource {
            source_ip: Some(IpAddr::from([10, 1, 2, 3])),
            headers: &headers,
            query: Some("x=1&user=bob&user=eve"),
        };
        let never = || unreachable!("no cookie to generate");
        assert_eq!(
            hash_request(&HashKey::Header("x-user".into()), &source, never),
            HashOutcome::Key(hash_bytes(b"alice"))
        );
        assert_eq!(
            hash_request(&HashKey::Header("x-none".into()), &source, never),
            HashOutcome::Missing
        );
        let cookie = HashKey::Cookie {
            name: "session".into(),
            path: None,
            ttl: None,
        };
        assert_eq!(
            hash_request(&cookie, &source, never),
            HashOutcome::Key(hash_bytes(b"abc"))
        );
        assert_eq!(
            hash_request(&HashKey::SourceIp, &source, never),
            HashOutcome::Key(hash_bytes(&[10, 1, 2, 3]))
        );
        assert_eq!(
            hash_request(&HashKey::QueryParameter("user".into()), &source, never),
            HashOutcome::Key(hash_bytes(b"bob"))
        );
        assert_eq!(
            hash_request(&HashKey::QueryParameter("zzz".into()), &source, never),
            HashOutcome::Missing
        );
    }

    #[test]
    fn missing_cookie_with_ttl_is_generated() {
        let headers = HeaderMap::new();
        let source = HashSource {
            source_ip: None,
            headers: &headers,
            query: None,
        };
        let key = HashKey::Cookie {
            name: "affinity".into(),
            path: Some("/app".into()),
            ttl: Some(Duration::from_secs(60)),
        };
        assert_eq!(
            hash_request(&key, &source, || "0123abcd".into()),
            HashOutcome::Generated {
                hash: hash_bytes(b"0123abcd"),
                set_cookie: "affinity=\"0123abcd\"; Max-Age=60; Path=/app; HttpOnly".into(),
            }
        );
        let session = HashKey::Cookie {
            name: "affinity".into(),
            path: None,
            ttl: Some(Duration::ZERO),
        };
        match hash_request(&session, &source, || "v".into()) {
            HashOutcome::Generated { set_cookie, .. } => {
                assert_eq!(set_cookie, "affinity=\"v\"; HttpOnly");
            }
            other => panic!("expected a generated cookie, got {other:?}"),
        }
        // Sending the generated cookie back hashes to the same point.
        let mut back = HeaderMap::new();
        back.insert(COOKIE, "affinity=\"0123abcd\"".parse().expect("cookie"));
        let source = HashSource {
            source_ip: None,
            headers: &back,
            query: None,
        };
        assert_eq!(
            hash_request(&key, &source, || unreachable!()),
            HashOutcome::Key(hash_bytes(b"0123abcd"))
        );
    }
}

//! The cache of upstream answers, one per pod, keyed by question, kept for the answer's TTL.
//!
//! What is kept and for how long follows RFC 2308 and what stub caches do: a positive answer
//! for the smallest TTL of its records; NXDOMAIN and NODATA for the SOA's negative TTL
//! (`min(SOA TTL, SOA minimum)`) when the upstream sent one, else not at all; SERVFAIL,
//! REFUSED and truncated answers never. TTLs are capped so a misconfigured upstream cannot pin
//! an answer for days, and an answer served from the cache carries the TTLs it has left.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{RData, Record};

/// The longest a positive answer is kept, whatever its TTL.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// The longest a negative answer (NXDOMAIN, NODATA) is kept, so a name created upstream shows
/// up within minutes.
pub const MAX_NEGATIVE_TTL: Duration = Duration::from_secs(300);
/// Entries per pod; when full, expired entries go first, then those closest to expiry.
pub const DEFAULT_CAPACITY: usize = 1024;

/// Where the cache reads the time; tests move it by hand.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    fn now(&self) -> Instant;
}

/// The monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// What distinguishes two questions for caching. The DNSSEC bits are part of it: an answer
/// to a query with `DO` carries signatures, one with `CD` may be unvalidated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    name: String,
    record_type: u16,
    class: u16,
    dnssec_ok: bool,
    checking_disabled: bool,
}

impl CacheKey {
    /// The key of `request`'s (first) question.
    pub fn of(request: &Message, query: &Query) -> Self {
        Self {
            name: query.name().to_ascii().to_ascii_lowercase(),
            record_type: query.query_type().into(),
            class: query.query_class().into(),
            dnssec_ok: request
                .extensions()
                .as_ref()
                .is_some_and(|edns| edns.flags().dnssec_ok),
            checking_disabled: request.checking_disabled(),
        }
    }
}

#[derive(Debug)]
struct Entry {
    response: Message,
    stored: Instant,
    expires: Instant,
}

/// Upstream answers by question, each until its TTL runs out.
#[derive(Debug)]
pub struct Cache {
    entries: HashMap<CacheKey, Entry>,
    capacity: usize,
    clock: Arc<dyn Clock>,
}

impl Cache {
    pub fn new(capacity: usize, clock: Arc<dyn Clock>) -> Self {
        Self {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            clock,
        }
    }

    /// The cached answer for `key` with its TTLs reduced by the time it spent here, or `None`
    /// (an expired entry is removed). The caller fills in the client's id and question.
    pub fn get(&mut self, key: &CacheKey) -> Option<Message> {
        let now = self.clock.now();
        let entry = self.entries.get(key)?;
        if now >= entry.expires {
            self.entries.remove(key);
            return None;
        }
        let elapsed = u32::try_from(now.duration_since(entry.stored).as_secs()).unwrap_or(u32::MAX);
        let mut response = entry.response.clone();
        let count_down = |records: &mut Vec<Record>| {
            for record in records {
                let left = record.ttl().saturating_sub(elapsed);
                record.set_ttl(left);
            }
        };
        count_down(response.answers_mut());
        count_down(response.name_servers_mut());
        count_down(response.additionals_mut());
        Some(response)
    }

    /// Keeps `response` for `key` if it may be cached (see the module docs); returns for how
    /// long.
    pub fn insert(&mut self, key: CacheKey, response: &Message) -> Option<Duration> {
        let ttl = cache_ttl(response)?;
        let now = self.clock.now();
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.retain(|_, entry| entry.expires > now);
            if self.entries.len() >= self.capacity {
                let soonest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, entry)| entry.expires)
                    .map(|(key, _)| key.clone());
                if let Some(soonest) = soonest {
                    self.entries.remove(&soonest);
                }
            }
        }
        self.entries.insert(
            key,
            Entry {
                response: response.clone(),
                stored: now,
                expires: now + ttl,
            },
        );
        Some(ttl)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// How long `response` may be cached, or `None` when it may not.
pub fn cache_ttl(response: &Message) -> Option<Duration> {
    if response.truncated() {
        return None;
    }
    let seconds = match response.response_code() {
        ResponseCode::NoError if !response.answers().is_empty() => {
            let positive = response
                .answers()
                .iter()
                .chain(response.name_servers())
                .map(Record::ttl)
                .min()?;
            Duration::from_secs(u64::from(positive)).min(MAX_TTL)
        }
        // NODATA (no error, no answer) and NXDOMAIN: the SOA in the authority section says.
        ResponseCode::NoError | ResponseCode::NXDomain => {
            let negative =
                response
                    .name_servers()
                    .iter()
                    .find_map(|record| match record.data() {
                        RData::SOA(soa) => Some(record.ttl().min(soa.minimum())),
                        _ => None,
                    })?;
            Duration::from_secs(u64::from(negative)).min(MAX_NEGATIVE_TTL)
        }
        _ => return None,
    };
    (!seconds.is_zero()).then_some(seconds)
}

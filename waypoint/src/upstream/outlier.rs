//! Outlier detection for one endpoint of one cluster: consecutive-error counters, ejection and
//! return, as Envoy runs it for an Istio `outlierDetection` (a pure state machine; the caller
//! passes the clock).
//!
//! Verified against Envoy's outlier detection overview and `OutlierDetection` proto, and Istio's
//! `destination_rule.proto`:
//! - Without `splitExternalLocalOriginErrors` (Istio's default) locally originated errors
//!   (connect failure, connect timeout, reset) land in the same buckets as the responses: they
//!   count as 5xx errors and as gateway errors.
//! - `consecutive_5xx` counts every status >= 500; `consecutive_gateway_failure` counts 502, 503
//!   and 504 (and local errors). A 5xx that is not a gateway error resets the gateway counter;
//!   any response below 500 resets both.
//! - Reaching a threshold resets that counter and asks for an ejection; the ejection happens only
//!   while `100 * ejected / hosts < max_ejection_percent` (Envoy's `ejectHost`). With no host
//!   ejected yet the left side is 0, so at least one host can always be ejected when the percent
//!   is above 0.
//! - A host stays ejected for `base_ejection_time * multiplier`, the multiplier counting its
//!   ejections; Envoy caps the time at `max_ejection_time` (300 s by default; Istio raises it to
//!   `base_ejection_time` when that is larger). While a host is healthy the multiplier drops by
//!   one per `interval`.
//!
//! Where we differ: Envoy un-ejects at its `interval` sweep, so an ejection lasts up to one
//! interval longer than computed; here the return is checked lazily at every pick (and snapshot)
//! and happens as soon as the time is up. There is no sweep task.

use std::time::{Duration, Instant};

use mesh::model::OutlierDetection;

/// Envoy's default `max_ejection_time`.
const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// What a request to an endpoint ended with, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Response headers arrived with this status.
    Status(u16),
    /// Connect failure or timeout, or the connection/stream reset before response headers.
    LocalFailure,
}

/// The outlier state of one endpoint in one cluster.
#[derive(Debug, Clone, Default)]
pub(super) struct OutlierState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// When the current ejection ends.
    ejected_until: Option<Instant>,
    /// Envoy's ejection-time multiplier: +1 per ejection, -1 per healthy `interval`.
    multiplier: u32,
    /// Ejections since the endpoint joined the cluster (for the admin view).
    total_ejections: u64,
    /// Start of the current healthy stretch, from which the multiplier decays.
    decay_anchor: Option<Instant>,
}

impl OutlierState {
    /// Whether the endpoint is ejected at `now`; ends an ejection whose time is up and decays the
    /// multiplier of a healthy endpoint.
    pub(super) fn refresh(&mut self, now: Instant, config: &OutlierDetection) -> bool {
        if let Some(until) = self.ejected_until {
            if now < until {
                return true;
            }
            self.ejected_until = None;
            self.consecutive_5xx = 0;
            self.consecutive_gateway = 0;
            self.decay_anchor = Some(until);
        }
        if self.multiplier > 0
            && let Some(anchor) = self.decay_anchor
            && !config.interval.is_zero()
        {
            let intervals = now.saturating_duration_since(anchor).as_nanos()
                / config.interval.as_nanos().max(1);
            let steps = u32::try_from(intervals)
                .unwrap_or(u32::MAX)
                .min(self.multiplier);
            self.multiplier -= steps;
            self.decay_anchor = Some(anchor + config.interval * steps);
        }
        false
    }

    /// Whether the endpoint was ejected at the last [`Self::refresh`] (or later [`Self::eject`]).
    pub(super) fn is_ejected(&self) -> bool {
        self.ejected_until.is_some()
    }

    /// Counts `outcome`; `true` when a threshold was reached and the endpoint should be ejected
    /// (the caller checks `max_ejection_percent` and calls [`Self::eject`]). Outcomes of requests
    /// that finish while the endpoint is ejected are ignored.
    pub(super) fn record(&mut self, outcome: Outcome, config: &OutlierDetection) -> bool {
        if self.is_ejected() {
            return false;
        }
        let (is_5xx, is_gateway) = match outcome {
            Outcome::Status(status) => (status >= 500, matches!(status, 502..=504)),
            Outcome::LocalFailure => (true, true),
        };
        if !is_5xx {
            self.consecutive_5xx = 0;
            self.consecutive_gateway = 0;
            return false;
        }
        self.consecutive_5xx = self.consecutive_5xx.saturating_add(1);
        if is_gateway {
            self.consecutive_gateway = self.consecutive_gateway.saturating_add(1);
        } else {
            self.consecutive_gateway = 0;
        }
        let mut eject = false;
        if config.consecutive_gateway_errors > 0
            && self.consecutive_gateway >= config.consecutive_gateway_errors
        {
            self.consecutive_gateway = 0;
            eject = true;
        }
        if config.consecutive_5xx_errors > 0
            && self.consecutive_5xx >= config.consecutive_5xx_errors
        {
            self.consecutive_5xx = 0;
            eject = true;
        }
        eject
    }

    /// Ejects the endpoint at `now`; returns how long for.
    pub(super) fn eject(&mut self, now: Instant, config: &OutlierDetection) -> Duration {
        self.multiplier = self.multiplier.saturating_add(1);
        self.total_ejections += 1;
        let max = DEFAULT_MAX_EJECTION_TIME.max(config.base_ejection_time);
        let duration = config
            .base_ejection_time
            .saturating_mul(self.multiplier)
            .min(max);
        self.ejected_until = Some(now + duration);
        self.decay_anchor = None;
        duration
    }

    /// Time left in the current ejection.
    pub(super) fn ejection_left(&self, now: Instant) -> Option<Duration> {
        self.ejected_until
            .map(|until| until.saturating_duration_since(now))
    }

    pub(super) fn consecutive_5xx(&self) -> u32 {
        self.consecutive_5xx
    }

    pub(super) fn consecutive_gateway(&self) -> u32 {
        self.consecutive_gateway
    }

    pub(super) fn total_ejections(&self) -> u64 {
        self.total_ejections
    }
}

/// Envoy's `ejectHost` guard: another host may be ejected while the ejected share is below
/// `max_percent` (so the first ejection is always allowed when `max_percent > 0`).
pub(super) fn may_eject(ejected: usize, hosts: usize, max_percent: u32) -> bool {
    hosts > 0 && (ejected as u128) * 100 < u128::from(max_percent) * (hosts as u128)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(c5xx: u32, gateway: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx_errors: c5xx,
            consecutive_gateway_errors: gateway,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
        }
    }

    #[test]
    fn consecutive_5xx_threshold_and_reset_on_success() {
        let c = config(3, 0);
        let mut s = OutlierState::default();
        assert!(!s.record(Outcome::Status(500), &c));
        assert!(!s.record(Outcome::Status(503), &c));
        assert!(!s.record(Outcome::Status(200), &c), "a success resets");
        assert!(!s.record(Outcome::Status(500), &c));
        assert!(!s.record(Outcome::LocalFailure, &c));
        assert!(s.record(Outcome::Status(501), &c), "third in a row");
        assert_eq!(
            s.consecutive_5xx(),
            0,
            "the counter restarts after a trigger"
        );
        assert!(!s.record(Outcome::Status(404), &c), "4xx is a success here");
    }

    #[test]
    fn gateway_errors_only_count_502_503_504_and_local_failures() {
        let c = config(0, 2);
        let mut s = OutlierState::default();
        assert!(!s.record(Outcome::Status(502), &c));
        assert!(
            !s.record(Outcome::Status(500), &c),
            "500 resets the gateway counter"
        );
        assert!(!s.record(Outcome::Status(504), &c));
        assert!(s.record(Outcome::LocalFailure, &c));
        // Disabled detectors never trigger.
        let off = config(0, 0);
        let mut s = OutlierState::default();
        for _ in 0..100 {
            assert!(!s.record(Outcome::Status(503), &off));
        }
    }

    #[test]
    fn ejection_time_grows_with_each_ejection_and_decays_per_interval() {
        let c = config(1, 0);
        let t0 = Instant::now();
        let mut s = OutlierState::default();
        assert_eq!(s.eject(t0, &c), Duration::from_secs(30));
        assert!(s.refresh(t0 + Duration::from_secs(29), &c));
        assert!(!s.refresh(t0 + Duration::from_secs(30), &c), "back on time");
        let t1 = t0 + Duration::from_secs(31);
        assert_eq!(
            s.eject(t1, &c),
            Duration::from_secs(60),
            "second ejection: 2x"
        );
        let back = t1 + Duration::from_secs(60);
        assert!(!s.refresh(back, &c));
        // Healthy for 2 intervals: the multiplier drops from 2 to 0.
        assert!(!s.refresh(back + Duration::from_secs(20), &c));
        assert_eq!(
            s.eject(back + Duration::from_secs(20), &c),
            Duration::from_secs(30)
        );
        assert_eq!(s.total_ejections(), 3);
    }

    #[test]
    fn ejection_time_is_capped_at_envoys_max() {
        let c = OutlierDetection {
            base_ejection_time: Duration::from_secs(200),
            ..config(1, 0)
        };
        let t = Instant::now();
        let mut s = OutlierState::default();
        assert_eq!(s.eject(t, &c), Duration::from_secs(200));
        assert!(!s.refresh(t + Duration::from_secs(200), &c));
        assert_eq!(
            s.eject(t + Duration::from_secs(200), &c),
            Duration::from_secs(300)
        );
        let long = OutlierDetection {
            base_ejection_time: Duration::from_secs(600),
            ..config(1, 0)
        };
        let mut s = OutlierState::default();
        assert_eq!(s.eject(t, &long), Duration::from_secs(600));
    }

    #[test]
    fn max_ejection_percent_always_allows_the_first() {
        // (already ejected, hosts, max percent, allowed)
        let table = [
            (0, 2, 10, true),
            (1, 2, 10, false),
            (0, 1, 10, true),
            (0, 1, 0, false),
            (1, 10, 20, true),
            (2, 10, 20, false),
            (3, 4, 100, true),
            (4, 4, 100, false),
            (0, 0, 100, false),
        ];
        for (ejected, hosts, max, allowed) in table {
            assert_eq!(
                may_eject(ejected, hosts, max),
                allowed,
                "{ejected} of {hosts} at {max}%"
            );
        }
    }
}

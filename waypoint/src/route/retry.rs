//! Retry decisions with Envoy's `retry_on` semantics, and its back-off between attempts.
//!
//! The caller classifies each failed attempt as an [`AttemptOutcome`] and asks
//! [`is_retriable`]; it counts attempts against `RetryPolicy::attempts` and waits
//! [`retry_backoff`] before the next one. The route timeout covers all attempts.

use std::time::Duration;

use mesh::model::{RetryCondition, RetryOn, RetryPolicy};

use super::grpc::code;

/// Envoy's default base back-off interval.
pub const BASE_BACKOFF: Duration = Duration::from_millis(25);
/// Envoy's default cap: ten times the base.
pub const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// How one attempt to the upstream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Response headers arrived. `grpc_status` is the `grpc-status` found in the response
    /// headers (a trailers-only gRPC response), as Envoy reads it for the gRPC conditions;
    /// trailers after a body do not make a request retriable.
    Response {
        status: u16,
        grpc_status: Option<u32>,
    },
    /// No connection to the upstream (refused, connect timeout, HBONE tunnel refused).
    ConnectFailure,
    /// The upstream reset or closed the stream/connection before response headers.
    Reset,
    /// HTTP/2 `REFUSED_STREAM`: the upstream did not process the request.
    RefusedStream,
    /// `perTryTimeout` elapsed before response headers.
    PerTryTimeout,
}

/// Whether `outcome` is worth another attempt under `retry_on`, as Envoy's router decides:
/// - `5xx`: any 5xx response, and every failure without a response (connect failure, reset,
///   refused stream, per-try timeout);
/// - `gateway-error`: 502, 503, 504, and every failure without a response;
/// - `reset`: every failure without a response (connect failure included), no response;
/// - `connect-failure`: connect failures only; `refused-stream`: `REFUSED_STREAM` only;
/// - `retriable-4xx`: 409; `retriable-status-codes`: the listed codes;
/// - `cancelled`, `deadline-exceeded`, `resource-exhausted`, `unavailable`, `internal`: that
///   `grpc-status` in the response headers.
pub fn is_retriable(retry_on: &RetryOn, outcome: &AttemptOutcome) -> bool {
    retry_on
        .conditions
        .iter()
        .any(|c| condition_holds(*c, &retry_on.status_codes, outcome))
}

fn condition_holds(
    condition: RetryCondition,
    status_codes: &[u16],
    outcome: &AttemptOutcome,
) -> bool {
    use RetryCondition as C;
    let (status, grpc_status) = match *outcome {
        AttemptOutcome::Response {
            status,
            grpc_status,
        } => (status, grpc_status),
        // Envoy counts a failure without a response as a 5xx (it becomes a 503/504).
        no_response => {
            return match condition {
                C::FiveXx | C::GatewayError | C::Reset => true,
                C::ConnectFailure => no_response == AttemptOutcome::ConnectFailure,
                C::RefusedStream => no_response == AttemptOutcome::RefusedStream,
                _ => false,
            };
        }
    };
    match condition {
        C::FiveXx => (500..600).contains(&status),
        C::GatewayError => matches!(status, 502..=504),
        C::Retriable4xx => status == 409,
        C::RetriableStatusCodes => status_codes.contains(&status),
        C::Reset | C::ConnectFailure | C::RefusedStream => false,
        C::GrpcCancelled => grpc_status == Some(code::CANCELLED),
        C::GrpcDeadlineExceeded => grpc_status == Some(code::DEADLINE_EXCEEDED),
        C::GrpcResourceExhausted => grpc_status == Some(code::RESOURCE_EXHAUSTED),
        C::GrpcUnavailable => grpc_status == Some(code::UNAVAILABLE),
        C::GrpcInternal => grpc_status == Some(code::INTERNAL),
    }
}

/// The wait before retry number `retry` (1 for the first retry): Envoy's fully jittered
/// exponential back-off, uniform in `[0, min((2^retry - 1) * base, 10 * base))`; with the
/// default base of 25 ms 0-24 ms, 0-74 ms, 0-174 ms, then 0-249 ms. `base`: the route's
/// [`RetryPolicy::backoff`](mesh::model::RetryPolicy::backoff).
pub fn retry_backoff(retry: u32, base: Option<Duration>, rng: &mut fastrand::Rng) -> Duration {
    let (base, max) = match base {
        Some(base) => (base, base.saturating_mul(10)),
        None => (BASE_BACKOFF, MAX_BACKOFF),
    };
    let base = (base.as_millis() as u64).max(1);
    let max = (max.as_millis() as u64).max(1);
    let multiplier = 1u64
        .checked_shl(retry.clamp(1, 63))
        .map_or(u64::MAX, |m| m - 1);
    let ceiling = multiplier.saturating_mul(base).min(max);
    Duration::from_millis(rng.u64(0..ceiling))
}

/// Istio's retry policy for routes that set none (see [`RetryPolicy::istio_default`]).
pub fn default_retry_policy() -> RetryPolicy {
    RetryPolicy::istio_default()
}

//! Failure accrual (circuit breaking) for one balanced endpoint, as linkerd2-proxy
//! does it: responses that fail in a row (or, with the unified policy, a success rate
//! that falls below its threshold) eject the endpoint for a backoff that grows with
//! each trip; once it has passed, exactly one request probes the endpoint, and its
//! answer either lets the endpoint back in or ejects it for the next, longer step.
//!
//! Pure: the balancer (`balance.rs`) keeps one [`Breaker`] per endpoint, feeds it
//! the time and each response's outcome, and reads whether the endpoint may be picked.

use std::time::Duration;

use crate::config::Backoff;

/// What the policy says (`FailureAccrual`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Accrual {
    /// Failures in a row that eject the endpoint; 0: never on that ground.
    pub max_failures: u32,
    pub success_rate: Option<SuccessRate>,
    /// How long an ejection lasts before the probe, by trip.
    pub backoff: Backoff,
}

/// The unified policy's success-rate condition.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SuccessRate {
    /// The endpoint is ejected when its success rate falls below this (0 to 1).
    pub threshold: f64,
    /// How quickly old outcomes stop counting (the decay of the moving average).
    pub decay: Duration,
    /// Outcomes seen since the endpoint was (re)admitted before the rate counts.
    pub min_requests: u32,
}

/// One endpoint's breaker.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Breaker {
    /// Taking requests.
    Closed {
        failures: u32,
        /// The moving success rate (1 = every request succeeded) and when it was last
        /// updated, in milliseconds.
        rate: f64,
        rate_at_ms: u64,
        /// Outcomes since admitted.
        seen: u32,
    },
    /// Ejected until `until_ms`; then the next pick is the probe.
    Open { until_ms: u64, trips: u32 },
    /// The probe is in flight: nothing else is sent.
    Probing { trips: u32 },
}

impl Default for Breaker {
    fn default() -> Breaker {
        Breaker::closed(0)
    }
}

impl Breaker {
    fn closed(now_ms: u64) -> Breaker {
        Breaker::Closed {
            failures: 0,
            rate: 1.0,
            rate_at_ms: now_ms,
            seen: 0,
        }
    }

    /// The endpoint may be picked now.
    pub fn ready(&self, now_ms: u64) -> bool {
        match self {
            Breaker::Closed { .. } => true,
            Breaker::Open { until_ms, .. } => now_ms >= *until_ms,
            Breaker::Probing { .. } => false,
        }
    }

    /// The endpoint was picked: after an ejection, that request is the probe.
    pub fn picked(&mut self, now_ms: u64) {
        if let Breaker::Open { until_ms, trips } = *self {
            if now_ms >= until_ms {
                *self = Breaker::Probing { trips };
            }
        }
    }

    /// A response ended, `failed` or not; `jitter` in [0, 1). Returns the end of a
    /// new ejection, if this outcome ejected the endpoint.
    pub fn answered(
        &mut self,
        failed: bool,
        now_ms: u64,
        policy: &Accrual,
        jitter: f64,
    ) -> Option<u64> {
        let eject = |trips: u32| now_ms + policy.backoff.jittered(trips, jitter).as_millis() as u64;
        match *self {
            Breaker::Closed {
                failures,
                rate,
                rate_at_ms,
                seen,
            } => {
                let failures = if failed { failures + 1 } else { 0 };
                let seen = seen.saturating_add(1);
                let rate = match &policy.success_rate {
                    Some(sr) => decayed(rate, rate_at_ms, now_ms, sr.decay, !failed),
                    None => rate,
                };
                let too_many = policy.max_failures > 0 && failures >= policy.max_failures;
                let too_low = policy.success_rate.is_some_and(|sr| {
                    sr.threshold > 0.0 && seen >= sr.min_requests && rate < sr.threshold
                });
                if too_many || too_low {
                    let until_ms = eject(1);
                    *self = Breaker::Open { until_ms, trips: 1 };
                    return Some(until_ms);
                }
                *self = Breaker::Closed {
                    failures,
                    rate,
                    rate_at_ms: now_ms,
                    seen,
                };
                None
            }
            // Answers to requests sent before the ejection do not count.
            Breaker::Open { .. } => None,
            Breaker::Probing { trips } if failed => {
                let until_ms = eject(trips + 1);
                *self = Breaker::Open {
                    until_ms,
                    trips: trips + 1,
                };
                Some(until_ms)
            }
            Breaker::Probing { .. } => {
                *self = Breaker::closed(now_ms);
                None
            }
        }
    }

    /// The endpoint is out of rotation (ejected or being probed).
    pub fn tripped(&self) -> bool {
        !matches!(self, Breaker::Closed { .. })
    }
}

/// The moving success rate after one more outcome: the old rate weighs
/// `exp(-elapsed / decay)`, as an exponentially weighted average over time.
fn decayed(rate: f64, at_ms: u64, now_ms: u64, decay: Duration, success: bool) -> f64 {
    let elapsed = now_ms.saturating_sub(at_ms) as f64;
    let decay_ms = (decay.as_millis() as f64).max(1.0);
    // Each outcome weighs at least a little, so a burst within one millisecond moves
    // the rate too.
    let keep = (-elapsed / decay_ms)
        .exp()
        .min(1.0 - 1.0 / decay_ms.max(10.0));
    let sample = if success { 1.0 } else { 0.0 };
    rate * keep + sample * (1.0 - keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_failures: u32) -> Accrual {
        Accrual {
            max_failures,
            success_rate: None,
            backoff: Backoff {
                min: Duration::from_secs(1),
                max: Duration::from_secs(8),
                jitter: 0.0,
            },
        }
    }

    /// (failed, at ms) fed in order, then what the breaker says.
    #[test]
    fn consecutive_failures_eject_then_one_probe_decides() {
        let p = policy(3);
        let mut b = Breaker::default();
        // Two failures, a success: the count starts over.
        for (failed, now) in [(true, 0), (true, 1), (false, 2), (true, 3), (true, 4)] {
            assert_eq!(b.answered(failed, now, &p, 0.0), None, "at {now}");
        }
        // The third in a row ejects for the first step.
        assert_eq!(b.answered(true, 5, &p, 0.0), Some(1005));
        assert!(!b.ready(1004) && b.ready(1005));
        // Answers of requests sent earlier are ignored while ejected.
        assert_eq!(b.answered(false, 6, &p, 0.0), None);
        assert!(b.tripped());
        // The probe: picked once, then nothing else until it answers.
        b.picked(1005);
        assert!(!b.ready(1006));
        // It fails: ejected again, for twice as long.
        assert_eq!(b.answered(true, 1010, &p, 0.0), Some(3010));
        b.picked(3010);
        assert_eq!(b.answered(true, 3011, &p, 0.0), Some(7011));
        b.picked(7011);
        // A successful probe lets the endpoint back in, its count cleared.
        assert_eq!(b.answered(false, 7012, &p, 0.0), None);
        assert!(b.ready(7012) && !b.tripped());
        assert_eq!(b.answered(true, 7013, &p, 0.0), None);
        assert_eq!(b.answered(true, 7014, &p, 0.0), None);
        // And a new trip starts from the first step again.
        assert_eq!(b.answered(true, 7015, &p, 0.0), Some(8015));
    }

    #[test]
    fn zero_failures_never_trips() {
        let p = policy(0);
        let mut b = Breaker::default();
        for now in 0..1000 {
            assert_eq!(b.answered(true, now, &p, 0.0), None);
        }
        assert!(b.ready(1000));
    }

    #[test]
    fn a_low_success_rate_ejects_once_enough_requests_were_seen() {
        let p = Accrual {
            max_failures: 0,
            success_rate: Some(SuccessRate {
                threshold: 0.8,
                decay: Duration::from_secs(10),
                min_requests: 20,
            }),
            ..policy(0)
        };
        let mut b = Breaker::default();
        // Every other request fails: 50 % success, but not before 20 were seen.
        let mut ejected = None;
        for i in 0..1000u64 {
            if let Some(until) = b.answered(i % 2 == 0, i * 100, &p, 0.0) {
                ejected = Some(i);
                assert_eq!(until, i * 100 + 1000);
                break;
            }
        }
        let at = ejected.expect("a 50 % success rate ejects");
        assert!(at >= 19, "ejected after {at} requests");
        // A healthy endpoint with the odd failure stays in.
        let mut b = Breaker::default();
        for i in 0..1000u64 {
            assert_eq!(b.answered(i % 10 == 0, i * 100, &p, 0.0), None, "at {i}");
        }
    }
}

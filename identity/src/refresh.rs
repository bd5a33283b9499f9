//! When to renew: the pure schedule (70 % of the remaining lifetime, clamped),
//! jittered exponential backoff after failures, and the loop that drives them.
//!
//! Wall-clock time is derived from tokio's clock ([`WallClock`]) so the whole
//! schedule can be exercised with a paused tokio clock.

use std::future::Future;
use std::time::{Duration, SystemTime};

/// The share of the remaining lifetime after which a certificate is renewed.
const REFRESH_SHARE: f64 = 0.7;

/// The validity window of a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// How often to renew and how to back off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Never renew sooner than this after a success (`LINKERD2_PROXY_IDENTITY_MIN_REFRESH`).
    pub min_refresh: Duration,
    /// Never wait longer than this after a success (`LINKERD2_PROXY_IDENTITY_MAX_REFRESH`).
    pub max_refresh: Duration,
    /// First retry delay after a failure.
    pub backoff_min: Duration,
    /// Upper bound of the retry delay.
    pub backoff_max: Duration,
}

/// Time until the next renewal after a successful one: 70 % of the remaining
/// lifetime, clamped to `[min, max]`.
///
/// The remaining lifetime is counted from `not_before` when the certificate is
/// not valid yet (a clock behind the issuer's), so such a certificate is not
/// renewed in a tight loop.
pub fn next_refresh(
    now: SystemTime,
    not_before: SystemTime,
    not_after: SystemTime,
    min: Duration,
    max: Duration,
) -> Duration {
    let from = now.max(not_before);
    let remaining = not_after.duration_since(from).unwrap_or(Duration::ZERO);
    remaining.mul_f64(REFRESH_SHARE).clamp(min, max.max(min))
}

/// Delay before retrying a failed renewal: the backoff delay, but never later
/// than the current certificate's expiry so a recovered issuer is used in time.
pub fn retry_delay(backoff: Duration, now: SystemTime, not_after: Option<SystemTime>) -> Duration {
    match not_after.and_then(|na| na.duration_since(now).ok()) {
        Some(remaining) if !remaining.is_zero() => backoff.min(remaining),
        _ => backoff,
    }
}

/// Jittered exponential backoff: each delay doubles up to `max`, and the
/// returned value is drawn from `[d/2, d]` so replicas of a workload spread out.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    jitter: fn() -> f64,
}

impl Backoff {
    /// A backoff starting at `min` and capped at `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self::with_jitter(min, max, random_unit)
    }

    /// A backoff with a custom jitter source returning values in `[0, 1)`.
    pub fn with_jitter(min: Duration, max: Duration, jitter: fn() -> f64) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            current: min,
            jitter,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let j = (self.jitter)().clamp(0.0, 1.0);
        d.mul_f64(0.5 + 0.5 * j)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

fn random_unit() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// Wall-clock time advanced by tokio's clock, anchored once at creation.
///
/// Certificates are wall-clock objects, but deriving "now" from tokio's
/// monotonic clock lets tests pause and advance time deterministically.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    system: SystemTime,
    instant: tokio::time::Instant,
}

impl WallClock {
    /// Anchors to the current system time.
    pub fn new() -> Self {
        Self::at(SystemTime::now())
    }

    /// Anchors to a chosen wall-clock time (tests).
    pub fn at(system: SystemTime) -> Self {
        Self {
            system,
            instant: tokio::time::Instant::now(),
        }
    }

    /// The current wall-clock time.
    pub fn now(&self) -> SystemTime {
        self.system + self.instant.elapsed()
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `attempt` forever: again at [`next_refresh`] after a success, and at
/// [`retry_delay`] with backoff after a failure. The last good validity is kept
/// across failures; publishing credentials is the attempt's job.
pub async fn drive<F, Fut>(schedule: Schedule, clock: WallClock, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Validity>>,
{
    let mut current: Option<Validity> = None;
    let mut backoff = Backoff::new(schedule.backoff_min, schedule.backoff_max);
    loop {
        let delay = match attempt().await {
            Ok(v) => {
                backoff.reset();
                current = Some(v);
                next_refresh(
                    clock.now(),
                    v.not_before,
                    v.not_after,
                    schedule.min_refresh,
                    schedule.max_refresh,
                )
            }
            Err(error) => {
                let delay = retry_delay(
                    backoff.next_delay(),
                    clock.now(),
                    current.map(|v| v.not_after),
                );
                match current {
                    Some(v) if v.not_after > clock.now() => tracing::warn!(
                        error = format!("{error:#}"),
                        retry_in = ?delay,
                        "certificate renewal failed; keeping the current certificate"
                    ),
                    Some(_) => tracing::error!(
                        error = format!("{error:#}"),
                        retry_in = ?delay,
                        "certificate renewal failed and the current certificate has expired"
                    ),
                    None => tracing::warn!(
                        error = format!("{error:#}"),
                        retry_in = ?delay,
                        "could not obtain a certificate"
                    ),
                }
                delay
            }
        };
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + S(1_800_000_000)
    }

    #[test]
    fn refresh_at_seventy_percent_of_remaining() {
        let now = t0();
        let d = next_refresh(now, now, now + S(100), S(1), S(1000));
        assert_eq!(d, S(70));
        // Half-way through a 24h certificate: 70 % of the 12h left.
        let d = next_refresh(now + S(43_200), now, now + S(86_400), S(10), S(86_400));
        assert_eq!(d, S(30_240));
    }

    #[test]
    fn refresh_is_clamped() {
        let now = t0();
        assert_eq!(next_refresh(now, now, now + S(5), S(10), S(100)), S(10));
        assert_eq!(
            next_refresh(now, now, now + S(10_000), S(10), S(100)),
            S(100)
        );
        // Already expired: as soon as allowed.
        assert_eq!(
            next_refresh(now + S(50), now, now + S(5), S(10), S(100)),
            S(10)
        );
        // Not valid yet (clock behind): lifetime counted from not_before.
        assert_eq!(
            next_refresh(now, now + S(10), now + S(110), S(1), S(1000)),
            S(70)
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::with_jitter(S(1), S(8), || 0.999_999_999);
        let delays: Vec<u64> = (0..6).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, [0, 1, 3, 7, 7, 7]); // just under 1, 2, 4, 8, 8, 8
        let mut b = Backoff::with_jitter(S(1), S(8), || 0.0);
        let delays: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(delays, [Duration::from_millis(500), S(1), S(2), S(4), S(4)]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(500));
        let mut b = Backoff::new(S(1), S(8));
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(500) && d <= S(8));
        }
    }

    #[test]
    fn retry_never_later_than_expiry() {
        let now = t0();
        assert_eq!(retry_delay(S(30), now, Some(now + S(5))), S(5));
        assert_eq!(retry_delay(S(3), now, Some(now + S(5))), S(3));
        assert_eq!(retry_delay(S(30), now, None), S(30));
        // After expiry the backoff alone decides.
        assert_eq!(retry_delay(S(30), now + S(6), Some(now + S(5))), S(30));
    }

    /// Records the (paused) tokio time of every attempt and replays scripted outcomes.
    async fn run_script(schedule: Schedule, script: Vec<Result<u64, ()>>) -> Vec<Duration> {
        let start = tokio::time::Instant::now();
        let clock = WallClock::at(t0());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let n = script.len();
        let script = Arc::new(Mutex::new(script.into_iter()));
        let task = tokio::spawn(drive(schedule, clock, move || {
            let tx = tx.clone();
            let script = script.clone();
            async move {
                let _ = tx.send(start.elapsed());
                let now = clock.now();
                let next = script.lock().unwrap().next();
                match next {
                    Some(Ok(lifetime)) => Ok(Validity {
                        not_before: now,
                        not_after: now + S(lifetime),
                    }),
                    Some(Err(())) => Err(anyhow::anyhow!("scripted failure")),
                    None => std::future::pending().await,
                }
            }
        }));
        // One more call than scripted: the schedule after the last outcome.
        let mut calls = Vec::new();
        while calls.len() <= n {
            calls.push(rx.recv().await.unwrap());
        }
        task.abort();
        calls
    }

    fn schedule() -> Schedule {
        Schedule {
            min_refresh: S(10),
            max_refresh: S(86_400),
            backoff_min: S(1),
            backoff_max: S(60),
        }
    }

    fn secs(v: &[Duration]) -> Vec<u64> {
        v.iter().map(|d| d.as_millis() as u64 / 1000).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn renews_at_seventy_percent_with_paused_clock() {
        let calls = run_script(schedule(), vec![Ok(1000), Ok(1000), Ok(100)]).await;
        // 0, then +700, then +700, then +70.
        assert_eq!(secs(&calls), [0, 700, 1400, 1470]);
    }

    #[tokio::test(start_paused = true)]
    async fn backs_off_before_first_certificate() {
        let mut s = schedule();
        s.backoff_min = S(2);
        s.backoff_max = S(8);
        let calls = run_script(s, vec![Err(()), Err(()), Err(()), Err(()), Ok(1000)]).await;
        let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
        // Jittered into [d/2, d] for d = 2, 4, 8, 8; then the 70 % refresh.
        for (gap, d) in gaps.iter().zip([2u64, 4, 8, 8]) {
            assert!(
                *gap >= S(d) / 2 && *gap <= S(d),
                "{gap:?} outside [{d}/2, {d}]s"
            );
        }
        assert_eq!(gaps[4], S(700));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_before_expiry_and_keeps_going_after_it() {
        let mut s = schedule();
        s.min_refresh = S(1);
        s.backoff_min = S(20);
        s.backoff_max = S(20);
        // Certificate of 30s: renewal at 21s fails; the next retry is capped at
        // the 9s left; after expiry, retries continue at the backoff pace.
        let calls = run_script(s, vec![Ok(30), Err(()), Err(()), Err(()), Ok(100)]).await;
        assert_eq!(calls[1], S(21));
        assert_eq!(calls[2], S(30), "the retry is due by expiry at the latest");
        let after_expiry = calls[3] - calls[2];
        assert!(after_expiry >= S(10) && after_expiry <= S(20));
        // Recovery resumes the normal schedule.
        assert_eq!(calls[5] - calls[4], S(70));
    }
}

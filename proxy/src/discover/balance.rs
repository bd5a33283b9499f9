//! Balancing over a destination's endpoints: power of two choices over peak-EWMA
//! latency, as Linkerd balances, with weights honoured, failed endpoints backed off,
//! and a bounded queue that fails fast when no endpoint is ready.
//!
//! Why our own and not `tower::balance`: tower's balancer is a `Service` that needs
//! `&mut self` to pick, so sharing it between the requests of many connections would
//! put a channel and a task (`tower::buffer`) in front of every request, the hop the
//! HTTP client was rewritten to avoid (`benches/RESULTS.md`, stop 19). Here a pick is
//! a few atomic loads on a snapshot of the endpoint set, taken by the request's own
//! task; the choice itself is a pure function ([`choose`]), tested in a table.
//!
//! - **Load** ([`Ewma`]): Linkerd's peak-EWMA. A response slower than the estimate
//!   raises it at once; a faster one lowers it as an exponentially weighted average
//!   over the decay time; between samples it decays towards zero, so an endpoint
//!   that was avoided is tried again. A member's load is its estimate times its
//!   requests in flight plus one. Latency is measured from the request's dispatch on
//!   a ready connection to its first response byte, so a connection's set-up never
//!   counts as its endpoint's slowness.
//! - **Choice**: two candidates drawn with probability proportional to their weight
//!   (Linkerd ignores weights); then each wins with a probability inversely
//!   proportional to the square of its load (the lighter of two loads `a` and `b`
//!   wins with probability `b² / (a² + b²)`). Linkerd's strict comparison always sends the pair's
//!   request to the lighter one, which makes the endpoint whose estimate is lowest
//!   by a hair take two thirds of a three-endpoint Service whenever requests come
//!   one at a time (latencies this close are noise), and the others a sixth each.
//!   The weighted comparison keeps the preference in proportion: an endpoint three
//!   times slower loses nine pairs in ten, one a hundred times slower all but one in
//!   ten thousand, equal ones share evenly,
//!   and with equal loads each endpoint's share follows its weight.
//! - **Readiness**: an endpoint whose connection failed (refused, timed out) is
//!   backed off, exponentially with jitter, and gets nothing until its backoff ends.
//! - **Queue**: with no ready endpoint a pick waits, at most
//!   `LINKERD2_PROXY_OUTBOUND_*_QUEUE_FAILFAST_TIMEOUT`, with at most `…_CAPACITY`
//!   waiters; once a balancer has had no ready endpoint for that long it fails
//!   picks at once ("fail-fast") until one is ready again, as Linkerd's queue does.
//! - **Updates** replace the endpoint set whole; an endpoint that stays keeps its
//!   load and backoff. A removed endpoint gets no new requests; requests already on
//!   it hold it and finish.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

pub use crate::config::{Backoff, Queue};

use super::{Endpoint, Labels};

/// How a balancer backs off and estimates load. How long a pick may wait is the
/// caller's [`Queue`]: HTTP requests and TCP connections to one destination share
/// its balancer, each held to its own queue settings.
#[derive(Clone, Debug)]
pub struct BalanceSettings {
    pub backoff: Backoff,
    /// The latency an endpoint is assumed to have before it has answered.
    pub default_rtt: Duration,
    /// How fast a latency estimate forgets.
    pub decay: Duration,
}

/// The names a balancer's metrics carry: its parent (the Service) and its backend,
/// as Linkerd's `parent_*` and `backend_*` labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BalancerName {
    pub parent: Labels,
    pub backend: Labels,
}

impl BalancerName {
    /// A parent and backend of Linkerd's default kind, both called `name`.
    pub fn default_kind(name: &str, port: u16) -> BalancerName {
        let labels = |prefix: &str| {
            Labels::new([
                (format!("{prefix}_group"), String::new()),
                (format!("{prefix}_kind"), "default".to_string()),
                (format!("{prefix}_namespace"), String::new()),
                (format!("{prefix}_name"), name.to_string()),
                (format!("{prefix}_port"), port.to_string()),
                (format!("{prefix}_section_name"), String::new()),
            ])
        };
        BalancerName {
            parent: labels("parent"),
            backend: labels("backend"),
        }
    }
}

/// Every live balancer, for the metrics that describe them.
#[derive(Default)]
pub struct BalancerRegistry {
    live: Mutex<Vec<std::sync::Weak<Balancer>>>,
}

impl BalancerRegistry {
    pub fn register(&self, balancer: &Arc<Balancer>) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|b| b.strong_count() > 0);
        live.push(Arc::downgrade(balancer));
    }

    /// The balancers still in use.
    pub fn live(&self) -> Vec<Arc<Balancer>> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|b| b.strong_count() > 0);
        live.iter().filter_map(|b| b.upgrade()).collect()
    }
}

/// One endpoint in a balancer, with its load and backoff.
pub struct Member {
    pub endpoint: Arc<Endpoint>,
    ewma: Mutex<Ewma>,
    pending: AtomicU32,
    failures: AtomicU32,
    /// Milliseconds after the balancer's epoch until which it is backed off.
    backoff_until_ms: AtomicU64,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("endpoint", &self.endpoint.addr)
            .finish_non_exhaustive()
    }
}

/// A destination's endpoints and how to choose among them.
pub struct Balancer {
    pub name: BalancerName,
    members: ArcSwap<Vec<Arc<Member>>>,
    changed: Notify,
    waiting: AtomicUsize,
    /// Milliseconds after the epoch (plus one) since when no endpoint was ready;
    /// zero while one is.
    unready_since_ms: AtomicU64,
    settings: BalanceSettings,
    /// Tokio's clock, so that tests with paused time see backoffs and the gate.
    epoch: tokio::time::Instant,
    /// Whatever feeds the balancer (a discovery stream), stopped when it goes.
    feed: Mutex<Option<tokio::task::AbortHandle>>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("name", &self.name)
            .field("members", &self.members.load().len())
            .finish_non_exhaustive()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(feed) = self.feed.get_mut().ok().and_then(|f| f.take()) {
            feed.abort();
        }
    }
}

/// Why no endpoint was picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PickError {
    /// No endpoint became ready within the fail-fast timeout.
    FailFast,
    /// The queue was full.
    LoadShed,
}

impl Balancer {
    pub fn new(name: BalancerName, settings: BalanceSettings) -> Arc<Balancer> {
        Arc::new(Balancer {
            name,
            members: ArcSwap::from_pointee(Vec::new()),
            changed: Notify::new(),
            waiting: AtomicUsize::new(0),
            unready_since_ms: AtomicU64::new(1),
            settings,
            epoch: tokio::time::Instant::now(),
            feed: Mutex::new(None),
        })
    }

    /// Ties the balancer to the task that feeds it: the task stops when the last
    /// user of the balancer drops it.
    pub fn fed_by(&self, task: tokio::task::AbortHandle) {
        *self.feed.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Replaces the endpoint set; members that stay (same endpoint) keep their
    /// state, and waiting picks look again.
    pub fn update<E: Into<Arc<Endpoint>>>(&self, endpoints: impl IntoIterator<Item = E>) {
        let current = self.members.load();
        // Not collected in place: a list of endpoints is larger than one of members,
        // and the members would keep its allocation.
        let mut members: Vec<Arc<Member>> = Vec::with_capacity(current.len());
        members.extend(endpoints.into_iter().map(|endpoint| {
            let endpoint: Arc<Endpoint> = endpoint.into();
            current
                .iter()
                .find(|m| m.endpoint == endpoint)
                .cloned()
                .unwrap_or_else(|| Arc::new(Member::new(endpoint, &self.settings)))
        }));
        members.shrink_to_fit();
        self.members.store(Arc::new(members));
        self.refresh_readiness();
        self.changed.notify_waiters();
    }

    /// The endpoints now, for metrics and tests.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.members
            .load()
            .iter()
            .map(|m| m.endpoint.clone())
            .collect()
    }

    /// How many endpoints are ready and how many are backed off.
    pub fn readiness(&self) -> (usize, usize) {
        let now = self.now_ms();
        let members = self.members.load();
        let ready = members.iter().filter(|m| m.ready(now)).count();
        (ready, members.len() - ready)
    }

    fn refresh_readiness(&self) {
        let (ready, _) = self.readiness();
        if ready > 0 {
            self.unready_since_ms.store(0, Ordering::Relaxed);
        } else {
            let _ = self.unready_since_ms.compare_exchange(
                0,
                self.now_ms() + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Picks an endpoint now, if one is ready.
    pub fn try_pick(&self) -> Option<Picked> {
        let now_ms = self.now_ms();
        let members = self.members.load();
        let now = Instant::now();
        // Few endpoints are the usual case: their loads fit on the stack.
        let mut candidates: smallvec_like::Candidates = Default::default();
        for (index, member) in members.iter().enumerate() {
            if member.ready(now_ms) {
                candidates.push(index, member.weight(), member.load(now, &self.settings));
            }
        }
        let draws = (fastrand::u64(..), fastrand::u64(..), fastrand::f64());
        let chosen = choose(candidates.as_slice(), draws)?;
        let member = members[candidates.index(chosen)].clone();
        self.unready_since_ms.store(0, Ordering::Relaxed);
        Some(Picked::new(member, self.settings.decay))
    }

    /// Picks an endpoint, waiting for one to become ready within the queue's
    /// fail-fast timeout. Requests and connections waiting on one balancer are
    /// counted together, each against its own queue's capacity.
    pub async fn pick(&self, queue: Queue) -> Result<Picked, PickError> {
        if let Some(picked) = self.try_pick() {
            return Ok(picked);
        }
        self.refresh_readiness();
        let since = self.unready_since_ms.load(Ordering::Relaxed);
        let failfast_ms = queue.failfast.as_millis() as u64;
        if since != 0 && self.now_ms() + 1 >= since + failfast_ms {
            return Err(PickError::FailFast);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= queue.capacity {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(PickError::LoadShed);
        }
        let deadline = tokio::time::Instant::now() + queue.failfast;
        let picked = loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(picked) = self.try_pick() {
                break Ok(picked);
            }
            let wake = self
                .next_backoff_end()
                .map_or(deadline, |at| at.min(deadline));
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(wake) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                break self.try_pick().ok_or(PickError::FailFast);
            }
        };
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        picked
    }

    /// When the first backed-off member becomes ready again.
    fn next_backoff_end(&self) -> Option<tokio::time::Instant> {
        let now_ms = self.now_ms();
        let until = self
            .members
            .load()
            .iter()
            .map(|m| m.backoff_until_ms.load(Ordering::Relaxed))
            .filter(|until| *until > now_ms)
            .min()?;
        Some(tokio::time::Instant::now() + Duration::from_millis(until - now_ms))
    }

    /// Backs `member` off after its connection failed, and lets waiting picks look
    /// again (another member may do).
    pub fn failed(&self, member: &Member) {
        let failures = member.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let delay = self.settings.backoff.jittered(failures, fastrand::f64());
        let until = self.now_ms() + delay.as_millis().max(1) as u64;
        member.backoff_until_ms.store(until, Ordering::Relaxed);
        self.refresh_readiness();
        self.changed.notify_waiters();
    }
}

impl Member {
    fn new(endpoint: Arc<Endpoint>, settings: &BalanceSettings) -> Member {
        Member {
            endpoint,
            ewma: Mutex::new(Ewma::new(settings.default_rtt, Instant::now())),
            pending: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            backoff_until_ms: AtomicU64::new(0),
        }
    }

    fn ready(&self, now_ms: u64) -> bool {
        self.backoff_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    fn weight(&self) -> u32 {
        self.endpoint.weight
    }

    fn load(&self, now: Instant, settings: &BalanceSettings) -> f64 {
        let estimate = self
            .ewma
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .estimate(now, settings.decay);
        let pending = self.pending.load(Ordering::Relaxed);
        estimate * f64::from(pending + 1)
    }

    /// A connection to the member worked: its backoff is over.
    pub fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    fn observe(&self, rtt: Duration, decay: Duration) {
        self.ewma
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(rtt, Instant::now(), decay);
    }
}

/// A chosen member, counted as in flight until dropped.
pub struct Picked {
    pub member: Arc<Member>,
    decay: Duration,
}

impl Picked {
    fn new(member: Arc<Member>, decay: Duration) -> Picked {
        member.pending.fetch_add(1, Ordering::Relaxed);
        Picked { member, decay }
    }

    /// Records the request's latency to its response.
    pub fn observe(&self, rtt: Duration) {
        self.member.observe(rtt, self.decay);
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.member.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A peak-EWMA latency estimate, in nanoseconds.
#[derive(Clone, Copy, Debug)]
pub struct Ewma {
    nanos: f64,
    at: Instant,
}

impl Ewma {
    pub fn new(seed: Duration, now: Instant) -> Ewma {
        // Linkerd floors the seed at 1 ms.
        let seed = seed.max(Duration::from_millis(1));
        Ewma {
            nanos: seed.as_nanos() as f64,
            at: now,
        }
    }

    /// The estimate at `now`, decayed towards zero since the last sample.
    pub fn estimate(&self, now: Instant, decay: Duration) -> f64 {
        self.nanos * decay_factor(now.saturating_duration_since(self.at), decay)
    }

    /// Takes a sample: a peak replaces the estimate, anything else is averaged in.
    pub fn observe(&mut self, rtt: Duration, now: Instant, decay: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let current = self.estimate(now, decay);
        self.nanos = if rtt > current {
            rtt
        } else {
            let keep = decay_factor(now.saturating_duration_since(self.at), decay);
            current * keep + rtt * (1.0 - keep)
        };
        self.at = now;
    }
}

fn decay_factor(elapsed: Duration, decay: Duration) -> f64 {
    let decay = decay.as_nanos().max(1) as f64;
    (-(elapsed.as_nanos() as f64) / decay).exp()
}

/// Power of two choices over `candidates` (`(weight, load)` of each ready member):
/// two distinct draws weighted by weight (`r1`, `r2` are random), then the first
/// wins when `r3` (random, in [0, 1)) falls below its share of the pair,
/// `b² / (a² + b²)` for loads `a` (first) and `b`. `None` when there is no candidate.
pub fn choose(candidates: &[(u32, f64)], (r1, r2, r3): (u64, u64, f64)) -> Option<usize> {
    match candidates.len() {
        0 => None,
        1 => Some(0),
        _ => {
            // A weight of zero takes no traffic while others can; if all are zero,
            // they share it evenly.
            let all_zero = candidates.iter().all(|(w, _)| *w == 0);
            let weight = |w: u32| if all_zero { 1 } else { u64::from(w) };
            let total: u64 = candidates.iter().map(|(w, _)| weight(*w)).sum();
            let first = weighted(candidates, total, r1, None, weight)?;
            let rest = total - weight(candidates[first].0);
            let Some(second) = weighted(candidates, rest, r2, Some(first), weight) else {
                return Some(first);
            };
            let (a, b) = (candidates[first].1.max(0.0), candidates[second].1.max(0.0));
            let (a2, b2) = (a * a, b * b);
            let first_share = if a2 + b2 > 0.0 { b2 / (a2 + b2) } else { 0.5 };
            Some(if r3 < first_share { first } else { second })
        }
    }
}

/// A draw proportional to weight over `candidates`, skipping `except`.
fn weighted(
    candidates: &[(u32, f64)],
    total: u64,
    random: u64,
    except: Option<usize>,
    weight: impl Fn(u32) -> u64,
) -> Option<usize> {
    if total == 0 {
        return None;
    }
    let mut point = random % total;
    for (i, (w, _)) in candidates.iter().enumerate() {
        if Some(i) == except {
            continue;
        }
        let w = weight(*w);
        if point < w {
            return Some(i);
        }
        point -= w;
    }
    None
}

/// Ready members' weights and loads, with where each came from, without a heap
/// allocation for the usual handful of endpoints.
mod smallvec_like {
    const INLINE: usize = 16;

    #[derive(Default)]
    pub struct Candidates {
        inline: [(u32, f64); INLINE],
        indexes: [usize; INLINE],
        len: usize,
        spilled: Vec<(u32, f64)>,
        spilled_indexes: Vec<usize>,
    }

    impl Candidates {
        pub fn push(&mut self, index: usize, weight: u32, load: f64) {
            if self.len < INLINE && self.spilled.is_empty() {
                self.inline[self.len] = (weight, load);
                self.indexes[self.len] = index;
                self.len += 1;
                return;
            }
            if self.spilled.is_empty() {
                self.spilled.extend_from_slice(&self.inline[..self.len]);
                self.spilled_indexes
                    .extend_from_slice(&self.indexes[..self.len]);
            }
            self.spilled.push((weight, load));
            self.spilled_indexes.push(index);
        }

        pub fn as_slice(&self) -> &[(u32, f64)] {
            if self.spilled.is_empty() {
                &self.inline[..self.len]
            } else {
                &self.spilled
            }
        }

        pub fn index(&self, position: usize) -> usize {
            if self.spilled.is_empty() {
                self.indexes[position]
            } else {
                self.spilled_indexes[position]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(port: u16) -> Endpoint {
        Endpoint::unmeshed(std::net::SocketAddr::from(([10, 0, 0, 1], port)))
    }

    const QUEUE: Queue = Queue {
        capacity: 2,
        failfast: Duration::from_millis(200),
    };

    fn settings() -> BalanceSettings {
        BalanceSettings {
            backoff: Backoff {
                min: Duration::from_millis(100),
                max: Duration::from_secs(60),
                jitter: 0.0,
            },
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
        }
    }

    /// The choice, row by row: draws land where their weights say, and the lower
    /// load per weight wins unless it is within a tenth.
    #[test]
    fn power_of_two_choices() {
        type Row<'a> = (&'a str, &'a [(u32, f64)], (u64, u64, f64), Option<usize>);
        let rows: [Row; 10] = [
            ("nothing ready", &[], (0, 0, 0.0), None),
            ("one ready", &[(1, 50.0)], (7, 9, 0.9), Some(0)),
            // First 50, second 10: the first's share of the pair is 100/2600.
            (
                "the heavier first wins its share",
                &[(1, 50.0), (1, 10.0)],
                (0, 0, 0.03),
                Some(0),
            ),
            (
                "and loses the rest",
                &[(1, 50.0), (1, 10.0)],
                (0, 0, 0.2),
                Some(1),
            ),
            (
                "the lighter first wins most",
                &[(1, 10.0), (1, 50.0)],
                (0, 0, 0.8),
                Some(0),
            ),
            (
                "equal loads split evenly",
                &[(1, 10.0), (1, 10.0)],
                (0, 0, 0.49),
                Some(0),
            ),
            (
                "the first draw follows r1",
                &[(1, 10.0), (1, 10.0), (1, 10.0)],
                (2, 0, 0.0),
                Some(2),
            ),
            (
                "the second skips the first",
                &[(1, 10.0), (1, 1.0), (1, 10.0)],
                (0, 0, 0.95),
                Some(1),
            ),
            (
                "zero weight is never drawn",
                &[(0, 1.0), (1, 50.0), (1, 50.0)],
                (0, 0, 0.0),
                Some(1),
            ),
            (
                "idle endpoints split evenly",
                &[(1, 0.0), (1, 0.0)],
                (0, 0, 0.6),
                Some(1),
            ),
        ];
        for (what, candidates, draws, expected) in rows {
            assert_eq!(choose(candidates, draws), expected, "{what}");
        }
    }

    /// Over many picks: equal endpoints share evenly; one a hundred times slower
    /// gets almost nothing.
    #[test]
    fn shares_follow_load() {
        let share = |loads: [f64; 3]| {
            let candidates: Vec<(u32, f64)> = loads.iter().map(|l| (1, *l)).collect();
            let mut counts = [0usize; 3];
            let mut rng = fastrand::Rng::with_seed(7);
            for _ in 0..30_000 {
                let draws = (rng.u64(..), rng.u64(..), rng.f64());
                counts[choose(&candidates, draws).unwrap()] += 1;
            }
            counts.map(|c| c as f64 / 30_000.0)
        };
        let even = share([1.0, 1.0, 1.0]);
        assert!(even.iter().all(|s| (0.3..0.37).contains(s)), "{even:?}");
        let slow = share([1.0, 1.0, 100.0]);
        assert!(slow[2] < 0.01, "{slow:?}");
        let slower = share([1.0, 1.0, 3.0]);
        assert!(slower[2] < 0.1, "{slower:?}");
    }

    #[test]
    fn draws_follow_weights() {
        let candidates = [(1, 10.0), (3, 10.0)];
        let mut counts = [0usize; 2];
        for r in 0..4000u64 {
            // Equal loads, and the first always taken: the choice follows r1 alone.
            counts[choose(&candidates, (r, r / 7, 0.0)).unwrap()] += 1;
        }
        assert_eq!(counts, [1000, 3000]);
    }

    #[test]
    fn peaks_count_at_once_and_the_rest_is_averaged_in() {
        let decay = Duration::from_secs(10);
        let start = Instant::now();
        let mut ewma = Ewma::new(Duration::from_millis(30), start);
        assert!((ewma.estimate(start, decay) - 30e6).abs() < 1.0);
        ewma.observe(Duration::from_millis(100), start, decay);
        assert!((ewma.estimate(start, decay) - 100e6).abs() < 1.0);
        // A quick answer a whole decay time later counts for most of the estimate.
        let later = start + decay;
        ewma.observe(Duration::from_millis(1), later, decay);
        let expected = 100e6 * (-1f64).exp() * (-1f64).exp() + 1e6 * (1.0 - (-1f64).exp());
        assert!((ewma.estimate(later, decay) - expected).abs() < 1e3);
        // Unused, the estimate fades.
        assert!(ewma.estimate(later + decay * 10, decay) < 1e3);
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let backoff = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: 0.5,
        };
        let delays: Vec<u128> = (1..=6).map(|n| backoff.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.jittered(1, 0.5), Duration::from_millis(125));
    }

    #[tokio::test]
    async fn a_failed_endpoint_is_skipped_until_its_backoff_ends() {
        let balancer = Balancer::new(BalancerName::default(), settings());
        balancer.update(vec![endpoint(1), endpoint(2)]);
        let first = balancer.try_pick().unwrap().member.clone();
        balancer.failed(&first);
        for _ in 0..50 {
            let picked = balancer.try_pick().unwrap();
            assert_ne!(picked.member.endpoint.addr, first.endpoint.addr);
        }
        assert_eq!(balancer.readiness(), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn with_nothing_ready_picks_wait_then_fail_fast_and_shed() {
        let balancer = Balancer::new(BalancerName::default(), settings());
        // Empty: a pick waits the fail-fast timeout, then fails.
        assert_eq!(balancer.pick(QUEUE).await.err(), Some(PickError::FailFast));
        // The gate is shut now: picks fail at once.
        assert_eq!(balancer.pick(QUEUE).await.err(), Some(PickError::FailFast));
        // An endpoint arriving while a pick waits is taken.
        let fresh = Balancer::new(BalancerName::default(), settings());
        let waiting = {
            let fresh = fresh.clone();
            tokio::spawn(async move { fresh.pick(QUEUE).await.map(|p| p.member.endpoint.addr) })
        };
        tokio::task::yield_now().await;
        fresh.update(vec![endpoint(3)]);
        assert_eq!(waiting.await.unwrap(), Ok(endpoint(3).addr));
        // Beyond the queue's capacity a pick is shed.
        let empty = Balancer::new(BalancerName::default(), settings());
        let queued: Vec<_> = (0..2)
            .map(|_| {
                let empty = empty.clone();
                tokio::spawn(async move { empty.pick(QUEUE).await.err() })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(empty.pick(QUEUE).await.err(), Some(PickError::LoadShed));
        for waiter in queued {
            assert_eq!(waiter.await.unwrap(), Some(PickError::FailFast));
        }
    }

    #[test]
    fn updates_keep_the_state_of_endpoints_that_stay() {
        let balancer = Balancer::new(BalancerName::default(), settings());
        balancer.update(vec![endpoint(1), endpoint(2)]);
        let one = balancer
            .members
            .load()
            .iter()
            .find(|m| m.endpoint.addr.port() == 1)
            .cloned()
            .unwrap();
        balancer.failed(&one);
        balancer.update(vec![endpoint(1), endpoint(3)]);
        let members = balancer.members.load();
        let kept = members
            .iter()
            .find(|m| m.endpoint.addr.port() == 1)
            .unwrap();
        assert!(Arc::ptr_eq(kept, &one), "endpoint 1 keeps its state");
        assert_eq!(balancer.readiness(), (1, 1));
        assert_eq!(
            balancer
                .endpoints()
                .iter()
                .map(|e| e.addr.port())
                .collect::<Vec<_>>(),
            [1, 3]
        );
    }
}

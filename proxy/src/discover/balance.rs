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
//! - **Failure accrual** (when the policy sets it): each member's [`Breaker`] counts
//!   the outcomes of the responses it gave; once it trips, the member is ejected like
//!   a backed-off one, then one request probes it back in (`accrual.rs`).
//! - **Updates** replace the endpoint set whole; an endpoint that stays keeps its
//!   load and backoff. A removed endpoint gets no new requests; requests already on
//!   it hold it and finish.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

pub use crate::config::{Backoff, Queue};

use super::accrual::{Accrual, Breaker};
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
    /// Milliseconds after the balancer's epoch until which it is backed off (or
    /// ejected; `u64::MAX` while its probe is in flight).
    backoff_until_ms: AtomicU64,
    /// Failure accrual's state, looked at only once it has tripped.
    breaker: Mutex<Breaker>,
    tripped: AtomicBool,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("endpoint", &self.endpoint.addr)
            .finish_non_exhaustive()
    }
}

/// A balancer's members, with the running sums of their weights for drawing.
struct Members {
    list: Vec<Arc<Member>>,
    ends: Vec<u64>,
}

impl Members {
    fn new(mut list: Vec<Arc<Member>>) -> Members {
        list.shrink_to_fit();
        let ends = running_sums(list.iter().map(|m| m.weight()));
        Members { list, ends }
    }
}

/// A destination's endpoints and how to choose among them.
pub struct Balancer {
    pub name: BalancerName,
    members: ArcSwap<Members>,
    /// Milliseconds after the epoch from which every member is ready (the latest
    /// backoff's end): from then on a pick need not look at every member.
    all_ready_from_ms: AtomicU64,
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
    /// The policy's failure accrual, if any.
    accrual: Mutex<Option<Accrual>>,
    accrual_on: AtomicBool,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("name", &self.name)
            .field("members", &self.members.load().list.len())
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
            members: ArcSwap::from_pointee(Members::new(Vec::new())),
            all_ready_from_ms: AtomicU64::new(0),
            changed: Notify::new(),
            waiting: AtomicUsize::new(0),
            unready_since_ms: AtomicU64::new(1),
            settings,
            epoch: tokio::time::Instant::now(),
            feed: Mutex::new(None),
            accrual: Mutex::new(None),
            accrual_on: AtomicBool::new(false),
        })
    }

    /// Sets (or clears) failure accrual, as the latest policy says.
    pub fn set_accrual(&self, accrual: Option<Accrual>) {
        let mut current = self.accrual.lock().unwrap_or_else(|p| p.into_inner());
        if *current != accrual {
            self.accrual_on.store(accrual.is_some(), Ordering::Relaxed);
            *current = accrual;
        }
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
        let mut members: Vec<Arc<Member>> = Vec::with_capacity(current.list.len());
        members.extend(endpoints.into_iter().map(|endpoint| {
            let endpoint: Arc<Endpoint> = endpoint.into();
            current
                .list
                .iter()
                .find(|m| m.endpoint == endpoint)
                .cloned()
                .unwrap_or_else(|| Arc::new(Member::new(endpoint, &self.settings)))
        }));
        self.members.store(Arc::new(Members::new(members)));
        self.refresh_readiness();
        self.changed.notify_waiters();
    }

    /// The members now.
    pub fn members(&self) -> Vec<Arc<Member>> {
        self.members.load().list.clone()
    }

    /// The endpoints now, for metrics and tests.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.members
            .load()
            .list
            .iter()
            .map(|m| m.endpoint.clone())
            .collect()
    }

    /// How many endpoints are ready and how many are backed off.
    pub fn readiness(&self) -> (usize, usize) {
        let now = self.now_ms();
        let members = self.members.load();
        let ready = members.list.iter().filter(|m| m.ready(now)).count();
        (ready, members.list.len() - ready)
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
    pub fn try_pick(self: &Arc<Self>) -> Option<Picked> {
        // One clock read for both: tokio's (paused in tests) for backoff, as std's for
        // the latency estimates.
        let clock = tokio::time::Instant::now();
        let now_ms = clock.saturating_duration_since(self.epoch).as_millis() as u64;
        let now = clock.into_std();
        let members = self.members.load();
        let (r1, r2, r3) = (fastrand::u64(..), fastrand::u64(..), fastrand::f64());
        let member = if now_ms >= self.all_ready_from_ms.load(Ordering::Relaxed) {
            // Every member is ready: a draw from the table kept with them, and only
            // the pair's loads read, so a pick costs the same for a Service of three
            // endpoints and of three hundred.
            let load = |index: usize| members.list[index].load(now, &self.settings);
            let chosen = pair_choice(draw_pair(&members.ends, r1, r2)?, load, r3)?;
            members.list[chosen].clone()
        } else {
            // Some are backed off: the ready ones, gathered.
            let mut candidates: smallvec_like::Candidates = Default::default();
            for (index, member) in members.list.iter().enumerate() {
                if member.ready(now_ms) {
                    candidates.push(index, member.weight());
                }
            }
            let load = |position: usize| {
                members.list[candidates.index(position)].load(now, &self.settings)
            };
            let chosen = choose(candidates.as_slice(), load, (r1, r2, r3))?;
            members.list[candidates.index(chosen)].clone()
        };
        self.unready_since_ms.store(0, Ordering::Relaxed);
        let accrual = self.accrual_on.load(Ordering::Relaxed).then(|| {
            if member.tripped.load(Ordering::Relaxed) {
                self.probe(&member, now_ms);
            }
            self.clone()
        });
        Some(Picked::new(member, self.settings.decay, accrual))
    }

    /// `member` was picked while tripped: once its ejection is over, that request is
    /// its probe, and nothing else goes to it until the probe is answered.
    fn probe(&self, member: &Member, now_ms: u64) {
        let mut breaker = member.breaker.lock().unwrap_or_else(|p| p.into_inner());
        breaker.picked(now_ms);
        if let Breaker::Probing { .. } = *breaker {
            member.backoff_until_ms.store(u64::MAX, Ordering::Relaxed);
            self.all_ready_from_ms.store(u64::MAX, Ordering::Relaxed);
        }
    }

    /// A response from `member` ended, `failed` or not: failure accrual's input.
    fn accrue(&self, member: &Member, failed: bool) {
        let Some(policy) = *self.accrual.lock().unwrap_or_else(|p| p.into_inner()) else {
            return;
        };
        let now_ms = self.now_ms();
        let mut breaker = member.breaker.lock().unwrap_or_else(|p| p.into_inner());
        let was_tripped = breaker.tripped();
        let ejected = breaker.answered(failed, now_ms, &policy, fastrand::f64());
        let tripped = breaker.tripped();
        drop(breaker);
        member.tripped.store(tripped, Ordering::Relaxed);
        match ejected {
            Some(until) => {
                member.backoff_until_ms.store(until, Ordering::Relaxed);
                self.all_ready_from_ms.fetch_max(until, Ordering::Relaxed);
                self.refresh_readiness();
                self.changed.notify_waiters();
            }
            None if was_tripped && !tripped => {
                // The probe succeeded: the member is back, and picks may take the
                // fast path again once every backoff is over.
                member.backoff_until_ms.store(0, Ordering::Relaxed);
                let latest = self
                    .members
                    .load()
                    .list
                    .iter()
                    .map(|m| m.backoff_until_ms.load(Ordering::Relaxed))
                    .max()
                    .unwrap_or(0);
                self.all_ready_from_ms.store(latest, Ordering::Relaxed);
                self.refresh_readiness();
                self.changed.notify_waiters();
            }
            None => {}
        }
    }

    /// Picks an endpoint, waiting for one to become ready within the queue's
    /// fail-fast timeout. Requests and connections waiting on one balancer are
    /// counted together, each against its own queue's capacity.
    pub async fn pick(self: &Arc<Self>, queue: Queue) -> Result<Picked, PickError> {
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

    /// Whether a pick now would be queued rather than failed at once: false once no
    /// endpoint has been ready for the fail-fast timeout (a route's distribution
    /// then skips the backend).
    pub fn available(&self, queue: Queue) -> bool {
        let since = self.unready_since_ms.load(Ordering::Relaxed);
        since == 0 || self.now_ms() + 1 < since + queue.failfast.as_millis() as u64
    }

    /// When the first backed-off member becomes ready again.
    fn next_backoff_end(&self) -> Option<tokio::time::Instant> {
        let now_ms = self.now_ms();
        let until = self
            .members
            .load()
            .list
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
        self.all_ready_from_ms.fetch_max(until, Ordering::Relaxed);
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
            breaker: Mutex::new(Breaker::default()),
            tripped: AtomicBool::new(false),
        }
    }

    fn ready(&self, now_ms: u64) -> bool {
        self.backoff_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// Ejected by failure accrual now (for metrics and tests).
    pub fn ejected(&self) -> bool {
        self.tripped.load(Ordering::Relaxed)
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

    fn observe(&self, rtt: Duration, now: Instant, decay: Duration) {
        self.ewma
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(rtt, now, decay);
    }
}

/// A chosen member, counted as in flight until dropped.
pub struct Picked {
    pub member: Arc<Member>,
    decay: Duration,
    /// With failure accrual: the balancer told the outcome, once.
    accrual: Option<Arc<Balancer>>,
}

impl Picked {
    fn new(member: Arc<Member>, decay: Duration, accrual: Option<Arc<Balancer>>) -> Picked {
        member.pending.fetch_add(1, Ordering::Relaxed);
        Picked {
            member,
            decay,
            accrual,
        }
    }

    /// For a connection rather than a request: failure accrual judges responses.
    pub fn without_accrual(mut self) -> Picked {
        self.accrual = None;
        self
    }

    /// The response ended, `failed` or not (failure accrual counts it).
    pub fn outcome(&mut self, failed: bool) {
        if let Some(balancer) = self.accrual.take() {
            balancer.accrue(&self.member, failed);
        }
    }

    /// Records the latency of a request sent at `sent`, answered now.
    pub fn answered(&self, sent: Instant) {
        let now = Instant::now();
        self.member
            .observe(now.saturating_duration_since(sent), now, self.decay);
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        // A request that never got a response (its connection failed, the client
        // went away) counts as a failure, as in linkerd2-proxy; a probe must end.
        self.outcome(true);
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
        let keep = decay_factor(now.saturating_duration_since(self.at), decay);
        let current = self.nanos * keep;
        self.nanos = if rtt > current {
            rtt
        } else {
            current * keep + rtt * (1.0 - keep)
        };
        self.at = now;
    }
}

/// `e^(-elapsed/decay)`. Between one request and the next the exponent is tiny
/// (milliseconds against seconds), where the series' first three terms are within
/// 2e-7 of it and cost a fraction of `exp`; this runs three times per request.
fn decay_factor(elapsed: Duration, decay: Duration) -> f64 {
    let x = elapsed.as_nanos() as f64 / decay.as_nanos().max(1) as f64;
    if x < 0.01 {
        1.0 - x + x * x / 2.0
    } else {
        (-x).exp()
    }
}

/// Running sums of `weights` (`ends[i]`: the total of members `0..=i`), the table
/// a weighted draw searches. A weight of zero takes no traffic while others can; if
/// all are zero, they share it evenly.
pub fn running_sums(weights: impl Iterator<Item = u32> + Clone) -> Vec<u64> {
    let all_zero = weights.clone().all(|w| w == 0);
    let mut total = 0u64;
    weights
        .map(|w| {
            total += if all_zero { 1 } else { u64::from(w) };
            total
        })
        .collect()
}

/// Two distinct members drawn by weight from running sums `ends`: the first at
/// `r1`, the second among the others at `r2` (both random). `None` without weight;
/// no second when only one member has weight. A binary search each: the cost does
/// not grow with the number of endpoints.
pub fn draw_pair(ends: &[u64], r1: u64, r2: u64) -> Option<(usize, Option<usize>)> {
    let total = *ends.last()?;
    if total == 0 {
        return None;
    }
    let at = |point: u64| ends.partition_point(|end| *end <= point);
    let first = at(r1 % total);
    let start = if first == 0 { 0 } else { ends[first - 1] };
    let weight = ends[first] - start;
    let rest = total - weight;
    if rest == 0 {
        return Some((first, None));
    }
    // The points of the others, with the first's range left out.
    let mut point = r2 % rest;
    if point >= start {
        point += weight;
    }
    Some((first, Some(at(point))))
}

/// Whether the first of a pair with loads `a` and `b` is taken: when `r3` (random,
/// in [0, 1)) falls below its share, `b² / (a² + b²)`.
pub fn first_wins(a: f64, b: f64, r3: f64) -> bool {
    let (a, b) = (a.max(0.0), b.max(0.0));
    let (a2, b2) = (a * a, b * b);
    let first_share = if a2 + b2 > 0.0 { b2 / (a2 + b2) } else { 0.5 };
    r3 < first_share
}

/// Power of two choices over the ready members (`weights` of each, and `load` of
/// the one at a position, read for the drawn pair only): [`draw_pair`], then
/// [`first_wins`]. `None` when there is no candidate.
pub fn choose(
    weights: &[u32],
    load: impl Fn(usize) -> f64,
    (r1, r2, r3): (u64, u64, f64),
) -> Option<usize> {
    let ends = running_sums(weights.iter().copied());
    pair_choice(draw_pair(&ends, r1, r2)?, load, r3)
}

fn pair_choice(
    (first, second): (usize, Option<usize>),
    load: impl Fn(usize) -> f64,
    r3: f64,
) -> Option<usize> {
    Some(match second {
        None => first,
        Some(second) if first_wins(load(first), load(second), r3) => first,
        Some(second) => second,
    })
}

/// Ready members' weights, with where each came from, without a heap allocation
/// for the usual handful of endpoints.
mod smallvec_like {
    const INLINE: usize = 16;

    #[derive(Default)]
    pub struct Candidates {
        inline: [u32; INLINE],
        indexes: [usize; INLINE],
        len: usize,
        spilled: Vec<u32>,
        spilled_indexes: Vec<usize>,
    }

    impl Candidates {
        pub fn push(&mut self, index: usize, weight: u32) {
            if self.len < INLINE && self.spilled.is_empty() {
                self.inline[self.len] = weight;
                self.indexes[self.len] = index;
                self.len += 1;
                return;
            }
            if self.spilled.is_empty() {
                self.spilled.extend_from_slice(&self.inline[..self.len]);
                self.spilled_indexes
                    .extend_from_slice(&self.indexes[..self.len]);
            }
            self.spilled.push(weight);
            self.spilled_indexes.push(index);
        }

        pub fn as_slice(&self) -> &[u32] {
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

    /// [`choose`] over `(weight, load)` pairs.
    fn choose_from(candidates: &[(u32, f64)], draws: (u64, u64, f64)) -> Option<usize> {
        let weights: Vec<u32> = candidates.iter().map(|(w, _)| *w).collect();
        choose(&weights, |i| candidates[i].1, draws)
    }

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
            assert_eq!(choose_from(candidates, draws), expected, "{what}");
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
                counts[choose_from(&candidates, draws).unwrap()] += 1;
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
    fn pairs_are_drawn_by_weight_from_running_sums() {
        assert_eq!(running_sums([2, 0, 3].into_iter()), [2, 2, 5]);
        assert_eq!(running_sums([0, 0].into_iter()), [1, 2], "all zero: even");
        type Row = (
            &'static str,
            &'static [u64],
            (u64, u64),
            Option<(usize, Option<usize>)>,
        );
        let rows: [Row; 7] = [
            ("nobody", &[], (0, 0), None),
            ("no weight", &[0, 0], (3, 4), None),
            ("one member", &[5], (3, 9), Some((0, None))),
            (
                "the only one with weight",
                &[0, 0, 5],
                (1, 7),
                Some((2, None)),
            ),
            (
                "first at 0, second past it",
                &[2, 2, 5],
                (0, 0),
                Some((0, Some(2))),
            ),
            (
                "first last, second before it",
                &[2, 2, 5],
                (4, 1),
                Some((2, Some(0))),
            ),
            (
                "draws wrap around the total",
                &[2, 2, 5],
                (5, 3),
                Some((0, Some(2))),
            ),
        ];
        for (what, ends, (r1, r2), expected) in rows {
            assert_eq!(draw_pair(ends, r1, r2), expected, "{what}");
        }
        // The second is never the first, and zero weights are never drawn.
        for r in 0..1000u64 {
            let (first, second) = draw_pair(&[1, 1, 4, 6], r, r * 7919).unwrap();
            assert_ne!(Some(first), second);
            assert_ne!(first, 1);
            assert_ne!(second, Some(1));
        }
    }

    #[test]
    fn only_the_drawn_pair_is_weighed() {
        let weights = [1u32; 300];
        let read = std::cell::Cell::new(0);
        let load = |_: usize| {
            read.set(read.get() + 1);
            1.0
        };
        assert!(choose(&weights, load, (17, 123, 0.3)).is_some());
        assert_eq!(read.get(), 2);
        read.set(0);
        assert_eq!(choose(&weights[..1], load, (17, 123, 0.3)), Some(0));
        assert_eq!(read.get(), 0, "one candidate needs no load");
    }

    #[test]
    fn draws_follow_weights() {
        let candidates = [(1, 10.0), (3, 10.0)];
        let mut counts = [0usize; 2];
        for r in 0..4000u64 {
            // Equal loads, and the first always taken: the choice follows r1 alone.
            counts[choose_from(&candidates, (r, r / 7, 0.0)).unwrap()] += 1;
        }
        assert_eq!(counts, [1000, 3000]);
    }

    #[test]
    fn decay_is_exponential_at_every_scale() {
        let decay = Duration::from_secs(10);
        for nanos in [
            0u64,
            1,
            1_000,
            99_000_000,
            100_000_000,
            101_000_000,
            5_000_000_000,
            100_000_000_000,
        ] {
            let exact = (-(nanos as f64) / 1e10).exp();
            let got = decay_factor(Duration::from_nanos(nanos), decay);
            assert!(
                (got - exact).abs() < 2e-7,
                "{nanos} ns: {got} against {exact}"
            );
        }
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
            .members()
            .iter()
            .find(|m| m.endpoint.addr.port() == 1)
            .cloned()
            .unwrap();
        balancer.failed(&one);
        balancer.update(vec![endpoint(1), endpoint(3)]);
        let members = balancer.members();
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

//! A request on an outbound destination with routes (`OutboundPolicies.Watch`, or the
//! discovery file's): the route rule it takes, its filters, its backend, retries and
//! timeouts, executed from the decisions of `route_decide.rs`.
//!
//! In order, as linkerd2-proxy layers them: the rule is selected once; the request
//! timeout starts; each attempt runs the rule's filters, draws a backend among the
//! available ones, runs the backend's filters and sends the request with its per-try
//! and response timeouts; an attempt whose outcome the rule retries is dropped and,
//! after the backoff, a fresh copy of the request goes out, as long as retries are
//! left and the body was kept whole. The last attempt's response goes to the client,
//! with the route's response header changes; its body carries what records the
//! route's and the backend's series when it ends, and the timeouts still running.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Context;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Frame;
use hyper::header::{HeaderValue, CONTENT_TYPE, LOCATION};
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use tokio::time::Sleep;

use super::body::{self, Recorded, RecvBody, ResponseBody};
use super::errors::{self, ErrorKind, GRPC_STATUS, L5D_PROXY_ERROR};
use super::metrics::Outcome;
use super::route_decide::{self, Attempted, RequestPolicy, Synthetic};
use super::{authority_of, is_upgrade, Answer, RoutedConn, ServerConn};
use crate::discover::outbound_routes::{
    self, Failure, Retry, RetryOn, RouteBackend, Rule, Selected, Timeouts,
};
use crate::discover::route_match::PathRule;
use crate::metrics::routes::{BackendSeries, Ended, RetryEnd, RouteError, RouteSeries};

/// What a routed response's body records when it ends, and the route's timeouts
/// still running while it streams.
pub struct RouteEnd {
    route: Arc<RouteSeries>,
    /// The backend the last attempt went to, that long after the request started.
    backend: Option<(Arc<BackendSeries>, Duration)>,
    started: Instant,
    retry: RetryEnd,
    /// Only a rule with timeouts has them: apart, so that a response without any
    /// carries one pointer for them.
    timers: Option<Box<Timers>>,
}

/// The route's timeouts that run on a response's body.
struct Timers {
    deadline: Option<(Pin<Box<Sleep>>, RouteError)>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
}

impl RouteEnd {
    /// The end of a request that took `route` (and went to `backend` at the instant
    /// given), without timeouts running on its response.
    fn new(
        route: Arc<RouteSeries>,
        backend: Option<(Arc<BackendSeries>, Instant)>,
        started: Instant,
        retry: RetryEnd,
    ) -> RouteEnd {
        RouteEnd {
            route,
            backend: backend
                .map(|(series, sent)| (series, sent.saturating_duration_since(started))),
            started,
            retry,
            timers: None,
        }
    }

    pub(super) fn on_frame(&mut self, _frame: &Frame<Bytes>) {
        if let Some((idle, sleep)) = self.timers.as_mut().and_then(|t| t.idle.as_mut()) {
            sleep.as_mut().reset(tokio::time::Instant::now() + *idle);
        }
    }

    /// The timeout that has passed, if one has (and wakes the body when one will).
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<RouteError> {
        let timers = self.timers.as_mut()?;
        if let Some((sleep, error)) = &mut timers.deadline {
            if sleep.as_mut().poll(cx).is_ready() {
                return Some(*error);
            }
        }
        if let Some((_, sleep)) = &mut timers.idle {
            if sleep.as_mut().poll(cx).is_ready() {
                return Some(RouteError::IdleTimeout);
            }
        }
        None
    }

    pub(super) fn finish(self, status: Option<u16>, grpc: Option<u32>, error: Option<RouteError>) {
        let ended = Ended {
            status,
            grpc,
            error,
        };
        let elapsed = self.started.elapsed();
        if let Some((backend, sent_after)) = &self.backend {
            backend.ended(ended, elapsed.saturating_sub(*sent_after));
        }
        self.route.ended(ended, elapsed);
        self.route.retries_ended(self.retry);
    }
}

/// The head of a request, kept to send it again.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    fn request(&self, body: RecvBody) -> Request<RecvBody> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// How the attempts ended. Matched as soon as it is made and never held, so its
/// answer is not boxed.
#[allow(clippy::large_enum_variant)]
enum Last {
    Answered {
        answer: Answer,
        backend: Arc<BackendSeries>,
        sent: Instant,
        /// The route backend's slot: its filters change the response's headers.
        slot: usize,
    },
    Made(Synthetic, Option<(Arc<BackendSeries>, Instant)>),
    Failed(ErrorKind, Option<(Arc<BackendSeries>, Instant)>),
}

/// How a routed request goes out, decided before anything is sent.
pub(super) enum Plan {
    /// The proxy answers at once: no route takes the request, a filter made the
    /// answer, or no backend of the rule can take it. (Boxed: the other plans are
    /// the common ones, and small.)
    Respond(Box<Response<ResponseBody>>),
    /// One attempt, sent the way an unrouted request is (`handle` sends it): the rule
    /// neither retries nor times out, so it needs nothing around its attempt.
    Once(Once),
    /// Attempts under the rule's retry or timeouts: [`attempts`].
    Attempts(Attempts),
}

/// A request sent once, to the backend of `slot`.
pub(super) struct Once {
    pub(super) slot: usize,
    selected: Selected,
    backend: Arc<BackendSeries>,
    /// Found while the rule is at hand: a response without filters to run is
    /// finished without going back to the rule.
    route: Arc<RouteSeries>,
    response_filters: bool,
}

/// A request that its rule retries or times out.
pub(super) struct Attempts {
    selected: Selected,
    /// What the request's `l5d-*` headers changed of the rule's retry and timeouts.
    overridden: Option<RequestPolicy>,
}

/// The route rule `request` takes and how it is to be sent; a rule that sends it
/// once has run its filters on it and drawn its backend.
pub(super) fn plan(
    conn: &ServerConn,
    routed: &RoutedConn,
    request: &mut Request<RecvBody>,
    grpc_request: bool,
    start: Instant,
    authority_label: Option<&str>,
) -> Plan {
    let routing = &routed.routing;
    let table = &*routing.table;
    // Read (and checked as text) only when some route's hosts may care.
    let authority = table.names_hosts().then(|| authority_of(request)).flatten();
    let selected = outbound_routes::select(
        table,
        request.method(),
        request.uri(),
        request.headers(),
        authority,
    );
    let Some(selected) = selected else {
        // As in linkerd2-proxy: no route's series counts it.
        let series = conn.unrouted_series(authority_label);
        series.request();
        series.response(Outcome::Error(ErrorKind::NoRoute), start.elapsed());
        let kind = ErrorKind::NoRoute;
        let informational = conn.informational(kind);
        return Plan::Respond(Box::new(errors::respond(kind, grpc_request, informational)));
    };
    let rule = &table.routes[selected.route].rules[selected.rule];
    let overridden = if rule.allow_l5d_request_headers {
        let (retry, timeouts) = (rule.retry.as_ref(), &rule.timeouts);
        route_decide::l5d_overrides(retry, timeouts, table.grpc, request.headers_mut())
    } else {
        None
    };
    let (retry, timeouts) = policy_of(rule, overridden.as_ref());
    // Whether it is an upgrade matters only to a rule that retries.
    let upgrade = retry.is_some() && is_upgrade(request);
    if !route_decide::sends_once(retry, timeouts, upgrade) {
        return Plan::Attempts(Attempts {
            selected,
            overridden,
        });
    }
    match choose(routed, rule, request) {
        Ok(chosen) => {
            let backend = routed.slots[chosen.slot].series.clone();
            backend.request();
            Plan::Once(Once {
                slot: chosen.slot,
                selected,
                backend,
                route: routing.series[selected.route].clone(),
                response_filters: !rule.filters.is_empty() || !chosen.filters.is_empty(),
            })
        }
        Err(unsent) => {
            let ending = Ending::new(conn, routed, selected, grpc_request, start);
            let response = ending.respond(unsent.into(), RetryEnd::Done, timeouts, None);
            Plan::Respond(Box::new(response))
        }
    }
}

/// Finishes the backend's response to a request sent once, in place: the route's
/// response filters, and what records the route's series as its body ends.
pub(super) fn answered_once(
    conn: &ServerConn,
    routed: &RoutedConn,
    once: Once,
    response: &mut Response<ResponseBody>,
    grpc_request: bool,
    start: Instant,
) {
    // A single attempt is dispatched as the request starts: the backend's time is
    // the request's, read from one clock.
    let sent = start;
    if !once.response_filters {
        let backend = Some((once.backend, sent));
        let end = RouteEnd::new(once.route, backend, start, RetryEnd::Done);
        response.body_mut().route(end);
        return;
    }
    let ending = Ending::new(conn, routed, once.selected, grpc_request, start);
    let no_timeouts = Timeouts::default();
    let answered = (once.backend, sent, once.slot);
    ending.answered(response, answered, RetryEnd::Done, &no_timeouts, None);
}

/// The proxy's response to a request sent once that failed with `kind`.
pub(super) fn failed_once(
    conn: &ServerConn,
    routed: &RoutedConn,
    once: Once,
    kind: ErrorKind,
    grpc_request: bool,
    start: Instant,
) -> Response<ResponseBody> {
    let ending = Ending::new(conn, routed, once.selected, grpc_request, start);
    ending.failed(kind, Some((once.backend, start)), RetryEnd::Done)
}

/// A request that its rule retries or times out: its attempts, under the request
/// timeout.
pub(super) async fn handle_attempts(
    conn: &Arc<ServerConn>,
    routed: &Arc<RoutedConn>,
    request: Request<RecvBody>,
    planned: Attempts,
    grpc_request: bool,
    start: Instant,
    authority_label: Option<&str>,
) -> Response<ResponseBody> {
    let rule = rule_of(routed, planned.selected);
    let (retry, timeouts) = policy_of(rule, planned.overridden.as_ref());
    let ending = Ending::new(conn, routed, planned.selected, grpc_request, start);
    let deadline = timeouts
        .request
        .map(|timeout| tokio::time::Instant::now() + timeout);
    let mut retry_end = RetryEnd::Done;
    let policy = Policy {
        rule,
        retry,
        timeouts,
    };
    let attempts = attempts(
        conn,
        routed,
        &policy,
        ending.series,
        request,
        start,
        authority_label,
        &mut retry_end,
    );
    let last = match deadline {
        Some(deadline) => match tokio::time::timeout_at(deadline, attempts).await {
            Ok(last) => last,
            Err(_) => Last::Failed(ErrorKind::RequestTimeout, None),
        },
        None => attempts.await,
    };
    ending.respond(last, retry_end, timeouts, deadline)
}

fn rule_of(routed: &RoutedConn, selected: Selected) -> &Rule {
    &routed.routing.table.routes[selected.route].rules[selected.rule]
}

/// The retry and timeouts a request has: its rule's, or what its `l5d-*` headers
/// made of them.
fn policy_of<'a>(
    rule: &'a Rule,
    overridden: Option<&'a RequestPolicy>,
) -> (Option<&'a Retry>, &'a Timeouts) {
    match overridden {
        Some(policy) => (policy.retry.as_ref(), &policy.timeouts),
        None => (rule.retry.as_ref(), &rule.timeouts),
    }
}

/// What a routed request's response is made with once its attempts are over.
struct Ending<'a> {
    conn: &'a ServerConn,
    rule: &'a Rule,
    series: &'a Arc<RouteSeries>,
    grpc_request: bool,
    start: Instant,
}

impl<'a> Ending<'a> {
    fn new(
        conn: &'a ServerConn,
        routed: &'a RoutedConn,
        selected: Selected,
        grpc_request: bool,
        start: Instant,
    ) -> Ending<'a> {
        Ending {
            conn,
            rule: rule_of(routed, selected),
            series: &routed.routing.series[selected.route],
            grpc_request,
            start,
        }
    }

    /// The response to the client after `last`: the answer, with the response
    /// filters, and a body that records the route's series and enforces the
    /// timeouts still running; or the proxy's own response, recorded now.
    fn respond(
        &self,
        last: Last,
        retry_end: RetryEnd,
        timeouts: &Timeouts,
        deadline: Option<tokio::time::Instant>,
    ) -> Response<ResponseBody> {
        match last {
            Last::Answered {
                answer,
                backend,
                sent,
                slot,
            } => {
                let mut response = answer.into_response(self.start);
                let answered = (backend, sent, slot);
                self.answered(&mut response, answered, retry_end, timeouts, deadline);
                response
            }
            Last::Made(synthetic, backend) => {
                let response = synthesize(synthetic, self.grpc_request, self.conn);
                let status = response.status().as_u16();
                let grpc = body::grpc_status(response.headers());
                self.route_end(backend, retry_end)
                    .finish(Some(status), grpc, None);
                response
            }
            Last::Failed(kind, backend) => self.failed(kind, backend, retry_end),
        }
    }

    fn route_end(
        &self,
        backend: Option<(Arc<BackendSeries>, Instant)>,
        retry_end: RetryEnd,
    ) -> RouteEnd {
        RouteEnd::new(self.series.clone(), backend, self.start, retry_end)
    }

    /// Finishes the backend's answer (from the backend of `slot`, sent at `sent`) in
    /// place.
    fn answered(
        &self,
        response: &mut Response<ResponseBody>,
        (backend, sent, slot): (Arc<BackendSeries>, Instant, usize),
        retry_end: RetryEnd,
        timeouts: &Timeouts,
        deadline: Option<tokio::time::Instant>,
    ) {
        // Backend filters first, then the rule's, as linkerd2-proxy applies them.
        if let Some(chosen) = self.rule.backends.backends().find(|b| b.slot == slot) {
            route_decide::response_filters(&chosen.filters, response.headers_mut());
        }
        route_decide::response_filters(&self.rule.filters, response.headers_mut());
        let response_deadline = timeouts
            .response
            .map(|timeout| tokio::time::Instant::from_std(sent) + timeout);
        let timer = match (deadline, response_deadline) {
            (Some(request), Some(response)) if response < request => {
                Some((response, RouteError::ResponseStreamTimeout))
            }
            (Some(request), _) => Some((request, RouteError::RequestTimeout)),
            (None, Some(response)) => Some((response, RouteError::ResponseStreamTimeout)),
            (None, None) => None,
        };
        let mut end = self.route_end(Some((backend, sent)), retry_end);
        let deadline = timer.map(|(at, error)| (Box::pin(tokio::time::sleep_until(at)), error));
        let idle = timeouts.idle.map(|idle| {
            let sleep = Box::pin(tokio::time::sleep(idle));
            (idle, sleep)
        });
        if deadline.is_some() || idle.is_some() {
            end.timers = Some(Box::new(Timers { deadline, idle }));
        }
        response.body_mut().route(end);
    }

    /// The proxy's own response to a request it failed.
    fn failed(
        &self,
        kind: ErrorKind,
        backend: Option<(Arc<BackendSeries>, Instant)>,
        retry_end: RetryEnd,
    ) -> Response<ResponseBody> {
        let (status, error) = ended_by(kind);
        self.route_end(backend, retry_end)
            .finish(status, None, error);
        let informational = self.conn.informational(kind);
        errors::respond(kind, self.grpc_request, informational)
    }
}

/// What applies to a request: its rule, and the retry and timeouts the rule (or the
/// request's `l5d-*` headers, where the rule allows them) give it.
struct Policy<'a> {
    rule: &'a Rule,
    retry: Option<&'a Retry>,
    timeouts: &'a Timeouts,
}

/// An attempt's way out: the rule's filters run on the request, a backend drawn among
/// the available ones, that backend's filters run. The backend's slot, or how the
/// request ends without going out (a filter's answer, or no backend to take it).
fn choose<'r>(
    routed: &RoutedConn,
    rule: &'r Rule,
    request: &mut Request<RecvBody>,
) -> Result<&'r RouteBackend, Unsent> {
    // What filters read of the request is found only for a rule that has some.
    if !rule.filters.is_empty() {
        request_filters(rule, &rule.filters, request).map_err(Unsent::Made)?;
    }
    let mut draw = || fastrand::u32(..);
    let chosen = route_decide::choose_backend(
        &rule.backends,
        |b| routed.slots[b.slot].target.available(routed.queue),
        &mut draw,
    );
    let Some(chosen) = chosen else {
        return Err(Unsent::NoBackend);
    };
    if !chosen.filters.is_empty() {
        request_filters(rule, &chosen.filters, request).map_err(Unsent::Made)?;
    }
    Ok(chosen)
}

/// Runs `filters` (`rule`'s, or its chosen backend's) on `request`.
fn request_filters(
    rule: &Rule,
    filters: &[outbound_routes::Filter],
    request: &mut Request<RecvBody>,
) -> Result<(), Synthetic> {
    let uri = request.uri().clone();
    let host = authority_of(request).map(str::to_string);
    let prefix = matched_prefix(rule, &uri);
    let mut draw = || fastrand::u32(..);
    let headers = request.headers_mut();
    route_decide::request_filters(filters, headers, &uri, host.as_deref(), prefix, &mut draw)
}

/// Why an attempt did not go out.
enum Unsent {
    /// A filter answered.
    Made(Synthetic),
    /// No backend of the rule can take it.
    NoBackend,
}

impl From<Unsent> for Last {
    fn from(unsent: Unsent) -> Last {
        match unsent {
            Unsent::Made(synthetic) => Last::Made(synthetic, None),
            Unsent::NoBackend => Last::Failed(ErrorKind::LoadShed, None),
        }
    }
}

/// Sends the request as many times as the rule allows and its outcomes ask for.
#[allow(clippy::too_many_arguments)]
async fn attempts(
    conn: &Arc<ServerConn>,
    routed: &Arc<RoutedConn>,
    policy: &Policy<'_>,
    series: &RouteSeries,
    request: Request<RecvBody>,
    start: Instant,
    authority_label: Option<&str>,
    retry_end: &mut RetryEnd,
) -> Last {
    let rule = policy.rule;
    let retry = policy.retry.filter(|_| !is_upgrade(&request));
    if retry.is_some() {
        series.retry_policy();
    }
    let (parts, body) = request.into_parts();
    // A copy of the head and body is kept only when the rule retries.
    let (body, recording, head) = match retry {
        Some(retry) => {
            let (body, recording) = Recorded::wrap(body, retry.max_request_bytes as usize);
            let head = recording.as_ref().map(|_| Head {
                method: parts.method.clone(),
                uri: parts.uri.clone(),
                version: parts.version,
                headers: parts.headers.clone(),
            });
            (body, recording, head)
        }
        None => (body, None, None),
    };
    let mut first = Some(Request::from_parts(parts, body));
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let mut request = match first.take() {
            Some(request) => request,
            None => {
                let (Some(head), Some(body)) = (&head, recording.as_ref().and_then(|r| r.replay()))
                else {
                    unreachable!("a retry is sent only with a replayable body");
                };
                head.request(body)
            }
        };
        let retries_left = retry.is_some_and(|r| attempt <= r.max_retries);
        let slot = match choose(routed, rule, &mut request) {
            Ok(chosen) => chosen.slot,
            Err(unsent) => return unsent.into(),
        };
        let backend = routed.slots[slot].series.clone();
        backend.request();
        let sent = Instant::now();
        // The per-try timeout bounds every attempt but the last, as in linkerd2-proxy;
        // the response timeout bounds each attempt's wait for headers.
        let per_try = retry.and_then(|r| r.timeout).filter(|_| retries_left);
        let headers_timeout = match (per_try, policy.timeouts.response) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let target = &routed.slots[slot].target;
        // Boxed, so that the attempts, and the route's future around them, do not
        // each carry (and move) an attempt's whole state.
        let send = Box::pin(conn.attempt(target, request, authority_label, start));
        let result = match headers_timeout {
            Some(timeout) => tokio::time::timeout(timeout, send)
                .await
                .unwrap_or(Err(ErrorKind::ResponseTimeout)),
            None => send.await,
        };
        let mut result = result;
        let mut peeked = None;
        if let (Ok(answer), Some(RetryOn::GrpcCodes(_))) = (&mut result, retry.map(|r| &r.on)) {
            // A gRPC status in trailers that come at once (a call that failed before
            // or right after its one message) decides too, as in linkerd2-proxy.
            let headers_status = body::grpc_status(answer.response.headers());
            if retries_left && headers_status.is_none() {
                let body = std::mem::replace(answer.response.body_mut(), RecvBody::empty());
                let (body, status) = body.peek_grpc_status(2).await;
                *answer.response.body_mut() = body;
                peeked = status;
            }
        }
        let attempted = match &result {
            Ok(answer) => Attempted::Response {
                status: answer.response.status().as_u16(),
                grpc: body::grpc_status(answer.response.headers()).or(peeked),
            },
            Err(kind) => Attempted::Error(*kind),
        };
        let wants_retry = retry.is_some_and(|r| route_decide::retryable(&r.on, attempted));
        let replayable = recording.as_ref().is_some_and(|r| r.replayable());
        if wants_retry && retries_left && replayable {
            // This attempt's outcome is recorded now; its response is dropped.
            let (status, grpc, error) = match (&result, attempted) {
                (Ok(_), Attempted::Response { status, grpc }) => (Some(status), grpc, None),
                (_, Attempted::Error(kind)) => {
                    let (status, error) = ended_by(kind);
                    (status, None, error)
                }
                _ => (None, None, None),
            };
            if let Ok(answer) = result {
                answer.series.response(
                    Outcome::Status {
                        status: status.unwrap_or(0),
                        grpc,
                    },
                    start.elapsed(),
                );
                if let Some(mut picked) = answer.picked {
                    picked.outcome(route_decide::is_failure(status, grpc, false));
                }
            }
            backend.ended(
                Ended {
                    status,
                    grpc,
                    error,
                },
                sent.elapsed(),
            );
            series.retried();
            let backoff = retry.and_then(|r| r.backoff.as_ref());
            tokio::time::sleep(route_decide::retry_delay(backoff, attempt, fastrand::f64())).await;
            continue;
        }
        *retry_end = match (wants_retry, attempt > 1) {
            (true, _) if !retries_left => RetryEnd::LimitExceeded,
            (true, _) => RetryEnd::Done,
            (false, true) => RetryEnd::Succeeded,
            (false, false) => RetryEnd::Done,
        };
        return match result {
            Ok(answer) => Last::Answered {
                answer,
                backend,
                sent,
                slot,
            },
            Err(kind) => Last::Failed(kind, Some((backend, sent))),
        };
    }
}

/// The length of the path prefix the rule matched the request by, if it matched by
/// prefix (a redirect may replace it).
fn matched_prefix(rule: &Rule, uri: &Uri) -> Option<usize> {
    rule.matches
        .iter()
        .filter_map(|m| match &m.path {
            PathRule::Prefix(prefix)
                if crate::discover::route_match::prefix_matches(prefix.as_ref(), uri.path()) =>
            {
                Some(prefix.trim_end_matches('/').len())
            }
            _ => None,
        })
        .max()
}

/// The status and `error` label of a request the proxy failed.
fn ended_by(kind: ErrorKind) -> (Option<u16>, Option<RouteError>) {
    let error = match kind {
        ErrorKind::FailFast => RouteError::FailFast,
        ErrorKind::LoadShed => RouteError::LoadShed,
        ErrorKind::RequestTimeout => RouteError::RequestTimeout,
        ErrorKind::ResponseTimeout => RouteError::ResponseHeadersTimeout,
        // Connection failures reach the client as the proxy's 502, recorded as such.
        kind => return (kind.status().map(|s| s.as_u16()), None),
    };
    (None, Some(error))
}

/// The response a filter made.
fn synthesize(
    synthetic: Synthetic,
    grpc_request: bool,
    conn: &ServerConn,
) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::empty());
    let (status, grpc_status, message) = match synthetic {
        Synthetic::Error(kind) => {
            return errors::respond(kind, grpc_request, conn.informational(kind));
        }
        Synthetic::Injected {
            failure: Failure::Http(status),
            message,
        } => (status, grpc_request.then_some(9), message),
        Synthetic::Injected {
            failure: Failure::Grpc(code),
            message,
        } => (200, Some(code), message),
        Synthetic::Redirect { status, location } => {
            if let Ok(location) = HeaderValue::try_from(location) {
                response.headers_mut().insert(LOCATION, location);
            }
            (status, grpc_request.then_some(5), "redirected".to_string())
        }
    };
    let message = HeaderValue::try_from(message).unwrap_or(HeaderValue::from_static("injected"));
    match grpc_status {
        Some(code) => {
            *response.status_mut() = StatusCode::OK;
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert(GRPC_STATUS, HeaderValue::from(code));
            headers.insert(errors::GRPC_MESSAGE, message.clone());
        }
        None => {
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        }
    }
    response.headers_mut().insert(L5D_PROXY_ERROR, message);
    response
}

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
use super::route_decide::{self, Attempted, Synthetic};
use super::{authority_of, is_upgrade, Answer, RoutedConn, ServerConn};
use crate::discover::outbound_routes::{self, Failure, Retry, RetryOn, Rule, Timeouts};
use crate::discover::route_match::PathRule;
use crate::metrics::routes::{BackendSeries, Ended, RetryEnd, RouteError, RouteSeries};

/// What a routed response's body records when it ends, and the route's timeouts
/// still running while it streams.
pub struct RouteEnd {
    route: Arc<RouteSeries>,
    backend: Option<(Arc<BackendSeries>, Instant)>,
    started: Instant,
    retry: RetryEnd,
    deadline: Option<(Pin<Box<Sleep>>, RouteError)>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
}

impl RouteEnd {
    pub(super) fn on_frame(&mut self, _frame: &Frame<Bytes>) {
        if let Some((idle, sleep)) = &mut self.idle {
            sleep.as_mut().reset(tokio::time::Instant::now() + *idle);
        }
    }

    /// The timeout that has passed, if one has (and wakes the body when one will).
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<RouteError> {
        if let Some((sleep, error)) = &mut self.deadline {
            if sleep.as_mut().poll(cx).is_ready() {
                return Some(*error);
            }
        }
        if let Some((_, sleep)) = &mut self.idle {
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
        if let Some((backend, sent)) = &self.backend {
            backend.ended(ended, sent.elapsed());
        }
        self.route.ended(ended, self.started.elapsed());
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

pub(super) async fn handle(
    conn: &Arc<ServerConn>,
    routed: &Arc<RoutedConn>,
    request: Request<RecvBody>,
    start: Instant,
    authority_label: Option<&str>,
) -> Response<ResponseBody> {
    let grpc_request = errors::is_grpc(&request);
    let routing = &routed.routing;
    let table = &*routing.table;
    let selected = outbound_routes::select(
        table,
        request.method(),
        request.uri(),
        request.headers(),
        authority_of(&request),
    );
    let Some(selected) = selected else {
        // As in linkerd2-proxy: no route's series counts it.
        let series = conn.unrouted_series(authority_label);
        series.request();
        series.response(Outcome::Error(ErrorKind::NoRoute), start.elapsed());
        let kind = ErrorKind::NoRoute;
        return errors::respond(kind, grpc_request, conn.informational(kind));
    };
    let rule = &table.routes[selected.route].rules[selected.rule];
    let series = routing.series[selected.route].clone();
    let mut request = request;
    let overridden = if rule.allow_l5d_request_headers {
        let (retry, timeouts) = (rule.retry.as_ref(), &rule.timeouts);
        route_decide::l5d_overrides(retry, timeouts, table.grpc, request.headers_mut())
    } else {
        None
    };
    let (retry, timeouts) = match &overridden {
        Some(policy) => (policy.retry.as_ref(), &policy.timeouts),
        None => (rule.retry.as_ref(), &rule.timeouts),
    };
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
        &series,
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
    let route_end = |backend| RouteEnd {
        route: series.clone(),
        backend,
        started: start,
        retry: retry_end,
        deadline: None,
        idle: None,
    };
    match last {
        Last::Answered {
            answer,
            backend,
            sent,
            slot,
        } => {
            let mut response = answer.into_response(start);
            // Backend filters first, then the rule's, as linkerd2-proxy applies them.
            if let Some(chosen) = rule.backends.backends().find(|b| b.slot == slot) {
                route_decide::response_filters(&chosen.filters, response.headers_mut());
            }
            route_decide::response_filters(&rule.filters, response.headers_mut());
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
            let mut end = route_end(Some((backend, sent)));
            end.deadline = timer.map(|(at, error)| (Box::pin(tokio::time::sleep_until(at)), error));
            end.idle = timeouts.idle.map(|idle| {
                let sleep = Box::pin(tokio::time::sleep(idle));
                (idle, sleep)
            });
            let (parts, body) = response.into_parts();
            Response::from_parts(parts, body.routed(end))
        }
        Last::Made(synthetic, backend) => {
            let response = synthesize(synthetic, grpc_request, conn);
            let status = response.status().as_u16();
            let grpc = body::grpc_status(response.headers());
            route_end(backend).finish(Some(status), grpc, None);
            response
        }
        Last::Failed(kind, backend) => {
            let (status, error) = ended_by(kind);
            route_end(backend).finish(status, None, error);
            errors::respond(kind, grpc_request, conn.informational(kind))
        }
    }
}

/// What applies to a request: its rule, and the retry and timeouts the rule (or the
/// request's `l5d-*` headers, where the rule allows them) give it.
struct Policy<'a> {
    rule: &'a Rule,
    retry: Option<&'a Retry>,
    timeouts: &'a Timeouts,
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
    let routing = &routed.routing;
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
        let mut draw = || fastrand::u32(..);
        // What filters read of the request is found only for a rule that has some.
        let filter = |filters: &[outbound_routes::Filter], request: &mut Request<RecvBody>| {
            if filters.is_empty() {
                return Ok(());
            }
            let uri = request.uri().clone();
            let host = authority_of(request).map(str::to_string);
            let prefix = matched_prefix(rule, &uri);
            let mut draw = || fastrand::u32(..);
            let headers = request.headers_mut();
            route_decide::request_filters(
                filters,
                headers,
                &uri,
                host.as_deref(),
                prefix,
                &mut draw,
            )
        };
        if let Err(synthetic) = filter(&rule.filters, &mut request) {
            return Last::Made(synthetic, None);
        }
        let queue = conn.proxy.queue;
        let chosen = route_decide::choose_backend(
            &rule.backends,
            |b| routed.targets[b.slot].available(queue),
            &mut draw,
        );
        let Some(chosen) = chosen else {
            return Last::Failed(ErrorKind::LoadShed, None);
        };
        if let Err(synthetic) = filter(&chosen.filters, &mut request) {
            return Last::Made(synthetic, None);
        }
        let backend = routing.backends[chosen.slot].series.clone();
        backend.request();
        let sent = Instant::now();
        // The per-try timeout bounds every attempt but the last, as in linkerd2-proxy;
        // the response timeout bounds each attempt's wait for headers.
        let per_try = retry.and_then(|r| r.timeout).filter(|_| retries_left);
        let headers_timeout = match (per_try, policy.timeouts.response) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let target = &routed.targets[chosen.slot];
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
                slot: chosen.slot,
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

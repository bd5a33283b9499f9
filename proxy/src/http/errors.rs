//! Failures of the proxy itself, turned into responses the client can act on.
//!
//! Only the proxy's own failures become made-up responses: a 502/503/504 with an
//! `l5d-proxy-error` header naming the cause, or, for gRPC, a trailers-only response
//! with a gRPC status, because gRPC clients read the status, not the HTTP code.
//! Responses from the upstream, including its errors, are passed through untouched.

use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use super::body::ResponseBody;

pub const L5D_PROXY_ERROR: HeaderName = HeaderName::from_static("l5d-proxy-error");
/// `close`: the proxy that made the response asks the next proxy to close the
/// client's connection after it.
pub const L5D_PROXY_CONNECTION: HeaderName = HeaderName::from_static("l5d-proxy-connection");
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// Why the proxy could not produce the upstream's response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    ConnectRefused,
    ConnectTimeout,
    /// Any other failure to connect (unreachable, no route, …).
    Connect,
    /// Mesh TLS to the peer failed, or the peer is not who discovery said.
    Tls,
    /// The upstream connection is closing and took no new request.
    Unavailable,
    /// The upstream failed (reset, closed) before a response arrived.
    Upstream,
    /// The response started, then its stream failed.
    Stream,
    /// No endpoint of the destination was ready within the fail-fast timeout.
    FailFast,
    /// The destination's queue was full.
    LoadShed,
    /// The control plane could not be asked where the request goes.
    Discovery,
    /// Inbound: the port's policy does not authorize the client on the request's route.
    Forbidden,
    /// Inbound: no route of the port's policy takes the request.
    NoRoute,
    /// Inbound: the port's policy could not be read.
    InvalidPolicy,
    /// Outbound: the route's request timeout passed before the response's headers.
    RequestTimeout,
    /// Outbound: an attempt's response timeout (or its per-try timeout) passed
    /// before the response's headers.
    ResponseTimeout,
    /// Outbound: the route's rule cannot be applied (a filter this proxy does not
    /// know, a redirect it cannot make), as linkerd2-proxy's "unexpected error".
    InvalidRoute,
    /// Outbound: the route's backend has no usable description.
    NoBackend,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 17] = [
        Self::ConnectRefused,
        Self::ConnectTimeout,
        Self::Connect,
        Self::Tls,
        Self::Unavailable,
        Self::Upstream,
        Self::Stream,
        Self::FailFast,
        Self::LoadShed,
        Self::Discovery,
        Self::Forbidden,
        Self::NoRoute,
        Self::InvalidPolicy,
        Self::RequestTimeout,
        Self::ResponseTimeout,
        Self::InvalidRoute,
        Self::NoBackend,
    ];

    pub fn index(self) -> usize {
        Self::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }

    /// The `error` label of `response_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConnectRefused => "connect_refused",
            Self::ConnectTimeout => "connect_timeout",
            Self::Connect => "connect_error",
            Self::Tls => "tls",
            Self::Unavailable => "unavailable",
            Self::Upstream => "upstream",
            Self::Stream => "stream",
            Self::FailFast => "fail_fast",
            Self::LoadShed => "load_shed",
            Self::Discovery => "discovery",
            Self::Forbidden => "forbidden",
            Self::NoRoute => "no_route",
            Self::InvalidPolicy => "invalid_policy",
            Self::RequestTimeout => "request_timeout",
            Self::ResponseTimeout => "response_timeout",
            Self::InvalidRoute => "invalid_route",
            Self::NoBackend => "no_backend",
        }
    }

    /// The text of `l5d-proxy-error` and `grpc-message`.
    fn message(self) -> &'static str {
        match self {
            Self::ConnectRefused => "connection refused by the destination",
            Self::ConnectTimeout => "connecting to the destination timed out",
            Self::Connect => "cannot connect to the destination",
            Self::Tls => "mesh TLS to the destination failed",
            Self::Unavailable => "the destination is unavailable",
            Self::Upstream => "the destination closed or reset the connection",
            Self::Stream => "the response stream failed",
            Self::FailFast => "no endpoint of the destination is ready (fail-fast)",
            Self::LoadShed => "the destination's queue is full",
            Self::Discovery => "the control plane is unavailable",
            Self::Forbidden => "unauthorized request on route",
            Self::NoRoute => "no route found for request",
            Self::InvalidPolicy => "invalid server configuration",
            Self::RequestTimeout => "timed out waiting for response headers: request timeout",
            Self::ResponseTimeout => "timed out waiting for response headers: response timeout",
            Self::InvalidRoute => "unexpected error",
            Self::NoBackend => "the route's backend has no dispatcher",
        }
    }

    /// The connection to the endpoint could not be made: the request was not sent,
    /// and another endpoint may take it.
    pub fn is_dial(self) -> bool {
        matches!(
            self,
            Self::ConnectRefused | Self::ConnectTimeout | Self::Connect | Self::Tls
        )
    }

    /// The status the client gets; `None` when the response had already started.
    pub fn status(self) -> Option<StatusCode> {
        match self {
            Self::ConnectTimeout | Self::RequestTimeout | Self::ResponseTimeout => {
                Some(StatusCode::GATEWAY_TIMEOUT)
            }
            Self::Unavailable | Self::FailFast | Self::LoadShed | Self::Discovery => {
                Some(StatusCode::SERVICE_UNAVAILABLE)
            }
            Self::Stream => None,
            Self::Forbidden => Some(StatusCode::FORBIDDEN),
            Self::NoRoute => Some(StatusCode::NOT_FOUND),
            Self::InvalidPolicy | Self::InvalidRoute => Some(StatusCode::INTERNAL_SERVER_ERROR),
            _ => Some(StatusCode::BAD_GATEWAY),
        }
    }
}

impl From<crate::discover::inbound_policy::RequestRefusal> for ErrorKind {
    fn from(refusal: crate::discover::inbound_policy::RequestRefusal) -> ErrorKind {
        use crate::discover::inbound_policy::RequestRefusal;
        match refusal {
            RequestRefusal::Forbidden => ErrorKind::Forbidden,
            RequestRefusal::NoRoute => ErrorKind::NoRoute,
            RequestRefusal::InvalidPolicy => ErrorKind::InvalidPolicy,
        }
    }
}

impl ErrorKind {
    /// The gRPC status: UNAVAILABLE (the call never reached the server, so clients
    /// may retry it) unless the policy refused the call.
    fn grpc_status(self) -> &'static str {
        match self {
            Self::Forbidden => "7",
            Self::NoRoute => "5",
            Self::InvalidPolicy | Self::InvalidRoute => "13",
            Self::RequestTimeout | Self::ResponseTimeout => "4",
            _ => "14",
        }
    }
}

/// Which of the proxy's informational headers an error response carries, as
/// linkerd2-proxy decides: the outbound side tells the application why
/// (`l5d-proxy-error`); the inbound side tells only a meshed client's proxy, and
/// asks it to close the application's connection after a failure that may be the
/// connection's (`l5d-proxy-connection: close`), which that proxy strips.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Informational {
    None,
    Error,
    ErrorAndClose,
}

impl Informational {
    pub fn for_response(outbound: bool, meshed_client: bool, kind: ErrorKind) -> Informational {
        match (outbound, meshed_client) {
            (true, _) => Informational::Error,
            (false, false) => Informational::None,
            (false, true) if kind.closes_connection() => Informational::ErrorAndClose,
            (false, true) => Informational::Error,
        }
    }
}

impl ErrorKind {
    /// Failures after which linkerd2-proxy asks for the client's connection to be
    /// closed (its 500, 502, 503, 504); not the policy's refusals.
    fn closes_connection(self) -> bool {
        !matches!(
            self,
            Self::Forbidden
                | Self::NoRoute
                | Self::Stream
                | Self::RequestTimeout
                | Self::ResponseTimeout
        )
    }
}

/// Removes a peer proxy's informational headers from a response it relayed, before
/// the application sees them (as linkerd2-proxy's outbound does); whether the peer
/// asked for the client's connection to be closed.
pub fn strip_peer_headers(headers: &mut hyper::HeaderMap) -> bool {
    // Almost every response has neither: a look at its few names is cheaper than two
    // hashed lookups.
    if !headers
        .keys()
        .any(|name| name.as_str().starts_with("l5d-proxy-"))
    {
        return false;
    }
    headers.remove(L5D_PROXY_ERROR);
    let close = headers
        .get_all(L5D_PROXY_CONNECTION)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    headers.remove(L5D_PROXY_CONNECTION);
    close
}

/// The response for a request the proxy failed.
pub fn respond(
    kind: ErrorKind,
    grpc: bool,
    informational: Informational,
) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::empty());
    let message = HeaderValue::from_static(kind.message());
    if !grpc {
        *response.status_mut() = kind.status().unwrap_or(StatusCode::BAD_GATEWAY);
    }
    let headers = response.headers_mut();
    if grpc {
        // Trailers-only: the status travels in the only HEADERS frame.
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(GRPC_STATUS, HeaderValue::from_static(kind.grpc_status()));
        headers.insert(GRPC_MESSAGE, message.clone());
    }
    if informational != Informational::None {
        headers.insert(L5D_PROXY_ERROR, message);
    }
    if informational == Informational::ErrorAndClose {
        headers.insert(L5D_PROXY_CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Is this a gRPC request (`content-type: application/grpc`, `+proto`, …)?
pub fn is_grpc<B>(request: &hyper::Request<B>) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn informational_headers_as_linkerd_sends_them() {
        type Row = (bool, bool, ErrorKind, Informational);
        let rows: [Row; 6] = [
            (true, false, ErrorKind::FailFast, Informational::Error),
            (true, true, ErrorKind::ConnectRefused, Informational::Error),
            (false, false, ErrorKind::ConnectRefused, Informational::None),
            (
                false,
                true,
                ErrorKind::ConnectRefused,
                Informational::ErrorAndClose,
            ),
            (
                false,
                true,
                ErrorKind::ConnectTimeout,
                Informational::ErrorAndClose,
            ),
            (false, true, ErrorKind::Forbidden, Informational::Error),
        ];
        for (outbound, meshed, kind, expected) in rows {
            assert_eq!(
                Informational::for_response(outbound, meshed, kind),
                expected,
                "{outbound} {meshed} {kind:?}"
            );
        }
        let response = respond(
            ErrorKind::ConnectRefused,
            false,
            Informational::ErrorAndClose,
        );
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()[L5D_PROXY_CONNECTION], "close");
        assert!(response.headers().contains_key(L5D_PROXY_ERROR));
        let response = respond(ErrorKind::ConnectRefused, false, Informational::None);
        assert!(!response.headers().contains_key(L5D_PROXY_ERROR));
        let grpc = respond(ErrorKind::Forbidden, true, Informational::Error);
        assert_eq!(grpc.headers()[GRPC_STATUS], "7");
    }

    #[test]
    fn a_peers_headers_are_stripped() {
        let mut headers = hyper::HeaderMap::new();
        headers.insert(
            L5D_PROXY_ERROR,
            HeaderValue::from_static("client error (Connect)"),
        );
        headers.insert(L5D_PROXY_CONNECTION, HeaderValue::from_static("close"));
        headers.insert("x-app", HeaderValue::from_static("kept"));
        assert!(strip_peer_headers(&mut headers));
        assert_eq!(headers.len(), 1);
        let mut headers = hyper::HeaderMap::new();
        headers.insert(L5D_PROXY_ERROR, HeaderValue::from_static("x"));
        assert!(!strip_peer_headers(&mut headers));
        assert!(headers.is_empty());
    }
}

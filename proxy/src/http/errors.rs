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
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

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
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 13] = [
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
            Self::ConnectTimeout => Some(StatusCode::GATEWAY_TIMEOUT),
            Self::Unavailable | Self::FailFast | Self::LoadShed | Self::Discovery => {
                Some(StatusCode::SERVICE_UNAVAILABLE)
            }
            Self::Stream => None,
            Self::Forbidden => Some(StatusCode::FORBIDDEN),
            Self::NoRoute => Some(StatusCode::NOT_FOUND),
            Self::InvalidPolicy => Some(StatusCode::INTERNAL_SERVER_ERROR),
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
            Self::InvalidPolicy => "13",
            _ => "14",
        }
    }
}

/// The response for a request the proxy failed.
pub fn respond(kind: ErrorKind, grpc: bool) -> Response<ResponseBody> {
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
    headers.insert(L5D_PROXY_ERROR, message);
    response
}

/// Is this a gRPC request (`content-type: application/grpc`, `+proto`, …)?
pub fn is_grpc<B>(request: &hyper::Request<B>) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

//! The HTTP servers: hyper's HTTP/1 server, and `h2` driven directly for HTTP/2,
//! each serving one accepted connection and handing every request to
//! `super::handle`.
//!
//! HTTP/1 is hyper serving the client's detected connection one request at a time,
//! with upgrades.
//!
//! HTTP/2 is the `h2` crate, each stream served on a task of its own. Why not
//! hyper's HTTP/2 server: per stream it wraps the request's future in a
//! state machine of its own, boxes it to spawn it (its executor takes one enum sized
//! for the whole connection), and removes each forbidden header with a lookup of
//! its own. Profiled at 50 connections, that was about a tenth of the server-side
//! proxy's instructions per request. Here the stream's task is the request's own
//! future, then the pump of its response body (`h2_streams::send_body`, which the
//! client shares).
//!
//! What hyper's server did that a proxy still needs is kept: its window sizes and
//! limits, the forbidden headers removed from responses, `content-length` for a
//! response body of known length, a request abandoned when the client resets its
//! stream before the response, and a response body's failure passed on as a reset
//! with the same reason.

use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use hyper::body::Body;
use hyper::header::{HeaderValue, CONTENT_LENGTH};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::body::{BoxError, RecvBody};
use super::h2_streams::{keepalive, send_body, strip_connection_headers, H2Body};
use super::{Role, ServerConn};
use crate::net::batched_writes::batched;

/// Serves HTTP/1 on `io` until the client closes the connection, or until it has no
/// request in flight once the proxy drains. Header-name case is recorded on each request and written
/// back the same way on its response (and upstream by the client side), since
/// applications exist that depend on it; no read timeout on headers, because a
/// keep-alive client may sit idle as long as it likes.
pub async fn serve_h1<I>(io: I, connection: Arc<ServerConn>) -> hyper::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let proxy = connection.proxy.clone();
    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
        let connection = connection.clone();
        async move {
            let request = request.map(RecvBody::Http1);
            Ok::<_, Infallible>(super::handle(connection, request).await)
        }
    });
    let serving = http1::Builder::new()
        .preserve_header_case(true)
        .title_case_headers(false)
        .keep_alive(true)
        // The application's response goes out as it was sent: no added `Date`.
        .auto_date_header(false)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(serving);
    let mut drain = proxy.drain.watch();
    tokio::select! {
        biased;
        served = serving.as_mut() => return served,
        // As linkerd2-proxy drains: an idle connection closes now, a busy one once
        // its response is out (with `connection: close`).
        () = drain.started() => serving.as_mut().graceful_shutdown(),
    }
    serving.await
}

/// hyper's defaults for its HTTP/2 server, kept so that switching to `h2` changed
/// nothing on the wire.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
const MAX_CONCURRENT_STREAMS: u32 = 200;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Serves HTTP/2 on `io` until the client closes the connection, or until the
/// streams open when the proxy began to drain have ended.
pub async fn serve_h2<I>(io: I, connection: Arc<ServerConn>) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, flusher) = batched(io);
    let mut h2 = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .handshake::<_, Bytes>(io)
        .await?;
    // Only clients across the network get PINGs: on the outbound side the client is
    // the local app, whose end a FIN reports, and which may stall for a while.
    let ping_pong = match connection.role {
        Role::Inbound { .. } => h2.ping_pong(),
        Role::Outbound => None,
    };
    let keepalive = keepalive(&connection.proxy.config, ping_pong, None);
    tokio::pin!(keepalive);
    let mut drain = connection.proxy.drain.watch();
    let mut draining = false;
    loop {
        let accepted = tokio::select! {
            // The connection first: a PONG waiting in the socket counts before an
            // expired timeout does.
            biased;
            accepted = flusher.drive(|cx| h2.poll_accept(cx)) => accepted,
            () = &mut keepalive => {
                let timed_out = io::Error::new(io::ErrorKind::TimedOut, "the client stopped answering PINGs");
                return Err(timed_out.into());
            }
            () = drain.started(), if !draining => {
                // GOAWAY: the client opens no new stream here, the open ones end,
                // and then the connection closes (as linkerd2-proxy drains).
                h2.graceful_shutdown();
                draining = true;
                continue;
            }
        };
        match accepted {
            Some(Ok((request, respond))) => {
                // Boxed: the stream's future is large (a whole request through the
                // client side), and tokio moves a task's future several times as it
                // spawns it; a box is moved instead, and the future built in place.
                let stream = Box::pin(serve_stream(connection.clone(), request, respond));
                tokio::spawn(stream);
            }
            Some(Err(error)) => return Err(error.into()),
            // Closed, and every stream on it ended.
            None => return Ok(()),
        }
    }
}

/// Serves one stream: the request, then its response's body.
async fn serve_stream(
    connection: Arc<ServerConn>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (head, stream) = request.into_parts();
    let body = H2Body::new(stream, &head.headers, None);
    let connect = head.method == Method::CONNECT;
    let request = Request::from_parts(head, RecvBody::Http2(body));
    let response = tokio::select! {
        biased;
        response = super::handle(connection, request) => response,
        // A client that resets its stream gives the request up: dropping its
        // future resets it upstream too.
        reset = poll_fn(|cx| respond.poll_reset(cx)) => {
            debug!(reason = ?reset.ok(), "the client reset the stream before its response");
            return;
        }
    };
    let (mut head, body) = response.into_parts();
    strip_connection_headers(&mut head.headers);
    let end_of_stream = body.is_end_stream();
    if connect && head.status.is_success() {
        // The stream is a tunnel now: its length is not a body's.
        head.headers.remove(CONTENT_LENGTH);
    } else if !end_of_stream {
        if let Some(length) = body.size_hint().exact() {
            head.headers
                .entry(CONTENT_LENGTH)
                .or_insert_with(|| HeaderValue::from(length));
        }
    }
    let stream = match respond.send_response(Response::from_parts(head, ()), end_of_stream) {
        Ok(stream) => stream,
        Err(error) => {
            debug!(%error, "cannot send the response");
            respond.send_reset(Reason::INTERNAL_ERROR);
            return;
        }
    };
    if !end_of_stream {
        send_body(body, stream, None).await;
    }
}

//! The server side: hyper serving the client's detected connection, one request at a
//! time (HTTP/1, with upgrades) or multiplexed (HTTP/2).

use std::sync::Arc;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Connection;

/// Serves HTTP/1 on `io`. Header-name case is recorded on each request and written
/// back the same way on its response (and upstream by the client side), since
/// applications exist that depend on it; no read timeout on headers, because a
/// keep-alive client may sit idle as long as it likes.
pub async fn serve_h1<I>(io: I, connection: Arc<Connection>) -> hyper::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| super::handle(connection.clone(), request));
    http1::Builder::new()
        .preserve_header_case(true)
        .title_case_headers(false)
        .keep_alive(true)
        // The application's response goes out as it was sent: no added `Date`.
        .auto_date_header(false)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
}

/// Serves HTTP/2 on `io`, each stream on its own task.
pub async fn serve_h2<I>(io: I, connection: Arc<Connection>) -> hyper::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Only clients across the network get PINGs: on the outbound side the client is
    // the local app, whose end a FIN reports, and which may stall for a while.
    let http = &connection.ctx.config.http;
    let keepalive = match connection.side {
        super::Side::Inbound { .. } => http.keepalive(),
        super::Side::Outbound { .. } => None,
    };
    let keepalive_timeout = http.keepalive_timeout;
    let service = service_fn(move |request| super::handle(connection.clone(), request));
    http2::Builder::new(super::BoxingExecutor)
        .timer(TokioTimer::new())
        .keep_alive_interval(keepalive)
        .keep_alive_timeout(keepalive_timeout)
        .auto_date_header(false)
        .serve_connection(TokioIo::new(io), service)
        .await
}

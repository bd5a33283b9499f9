//! The HTTP/1 server: hyper serving the client's detected connection one request
//! at a time, with upgrades.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::body::RecvBody;
use super::Connection;

/// Serves HTTP/1 on `io` until the client closes the connection, or until it has no
/// request in flight once the proxy drains. Header-name case is recorded on each request and written
/// back the same way on its response (and upstream by the client side), since
/// applications exist that depend on it; no read timeout on headers, because a
/// keep-alive client may sit idle as long as it likes.
pub async fn serve<I>(io: I, connection: Arc<Connection>) -> hyper::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = connection.ctx.clone();
    let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
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
    let mut drain = ctx.drain.watch();
    tokio::select! {
        biased;
        served = serving.as_mut() => return served,
        // As linkerd2-proxy drains: an idle connection closes now, a busy one once
        // its response is out (with `connection: close`).
        () = drain.started() => serving.as_mut().graceful_shutdown(),
    }
    serving.await
}

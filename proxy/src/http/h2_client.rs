//! The HTTP/2 client: each request opens its `h2` stream from its own task.
//!
//! Why not hyper's HTTP/2 client: it hands every request to the connection's task
//! through a channel, spawns a task per request to await the response, and sends the
//! response back through a oneshot. Profiled at 50 connections, that machinery was
//! about a seventh of the client-side proxy's instructions per request. With `h2`
//! driven directly, the request's task opens the stream and awaits the response; the
//! connection's task only moves frames. A request body, when there is one, is
//! streamed by a task of its own, within the stream's flow-control window, as hyper
//! does.
//!
//! What hyper did on the way that a proxy still needs is here too: the headers
//! HTTP/2 forbids are removed (`strip_connection_headers`), a body of known length
//! gets its `content-length`, and the response body returns its flow-control
//! capacity as it is read.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{
    HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TE, TRANSFER_ENCODING, UPGRADE,
};
use hyper::{HeaderMap, Method, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tracing::debug;

use crate::config::HttpConfig;

/// hyper's defaults for its HTTP/2 client, kept so that switching to `h2` changed
/// nothing on the wire: per-stream and connection receive windows, the largest
/// header list accepted, what may wait in the send buffer, and the streams opened
/// before the server's SETTINGS say how many it takes.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// One HTTP/2 connection to an endpoint, shared by the requests to it.
pub struct Connection {
    sender: SendRequest<Bytes>,
    pub opened: Instant,
    /// Set when the connection's task ends, or when the connection refused a new
    /// stream (the peer sent GOAWAY): no new request goes on it.
    closed: Arc<AtomicBool>,
    /// Requests whose response has not ended. The connection is PINGed only while
    /// there are some, as hyper did: servers may refuse PINGs on an idle connection
    /// (gRPC's answer is a GOAWAY, "too_many_pings").
    in_flight: Arc<AtomicUsize>,
}

/// A handle to open one stream on a [`Connection`].
pub struct Sender {
    inner: SendRequest<Bytes>,
    in_flight: Arc<AtomicUsize>,
}

impl Connection {
    /// Performs the HTTP/2 handshake on `io` and spawns the task that drives the
    /// connection (and PINGs the peer when `config` says so).
    pub async fn handshake<T>(
        io: T,
        config: &HttpConfig,
        target: SocketAddr,
    ) -> Result<Connection, h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let on_close = closed.clone();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let keepalive = keepalive(config, connection.ping_pong(), Some(in_flight.clone()));
        tokio::spawn(async move {
            tokio::select! {
                // The connection first: a PONG waiting in the socket counts before
                // an expired timeout does.
                biased;
                ended = &mut connection => if let Err(error) = ended {
                    debug!(%target, %error, "HTTP/2 connection failed");
                },
                () = keepalive => {
                    debug!(%target, "the peer stopped answering PINGs; closing the connection");
                }
            }
            on_close.store(true, Ordering::Release);
            // Dropping the connection fails the streams still on it.
        });
        Ok(Connection {
            sender,
            opened: Instant::now(),
            closed,
            in_flight,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// A handle to open a stream with, or `None` when the connection takes no new
    /// streams (it ended, or the peer is closing it); it is then marked closed.
    pub fn sender(&self) -> Option<Sender> {
        if self.is_closed() {
            return None;
        }
        // A fresh clone has no stream of its own pending, so readiness only reports
        // the connection's state and never waits.
        let mut sender = self.sender.clone();
        let waker = std::task::Waker::noop();
        match sender.poll_ready(&mut Context::from_waker(waker)) {
            Poll::Ready(Ok(())) => Some(Sender {
                inner: sender,
                in_flight: self.in_flight.clone(),
            }),
            _ => {
                self.closed.store(true, Ordering::Release);
                None
            }
        }
    }
}

impl Sender {
    /// Opens a stream for `request` and returns the response to come. A body is
    /// streamed by a task of its own.
    pub fn send(mut self, request: Request<Incoming>) -> Result<PendingResponse, h2::Error> {
        let (mut head, body) = request.into_parts();
        strip_connection_headers(&mut head.headers);
        if let Some(length) = body.size_hint().exact() {
            if (length != 0 || has_payload_semantics(&head.method))
                && !head.headers.contains_key(CONTENT_LENGTH)
            {
                head.headers
                    .insert(CONTENT_LENGTH, HeaderValue::from(length));
            }
        }
        let end_of_stream = body.is_end_stream();
        let (response, stream) = self
            .inner
            .send_request(Request::from_parts(head, ()), end_of_stream)?;
        let cancel = (!end_of_stream).then(|| {
            let (cancel, canceled) = oneshot::channel();
            // The body's task counts as in flight too: an upload that outlives
            // its response still needs its connection watched.
            let in_flight = InFlight::new(self.in_flight.clone());
            tokio::spawn(send_body(body, stream, canceled, in_flight));
            cancel
        });
        Ok(PendingResponse {
            response,
            outstanding: Some(Outstanding {
                _in_flight: InFlight::new(self.in_flight),
                cancel,
            }),
        })
    }
}

/// Counts in its connection's `in_flight` until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request until its response ends: counted in flight, and able to stop its
/// body's task.
struct Outstanding {
    _in_flight: InFlight,
    /// Tells the request body's task to reset the stream. Dropped unused when the
    /// response ends, since the body may go on streaming after it (the server
    /// answered early, or resets the stream itself when it wants no more).
    cancel: Option<oneshot::Sender<()>>,
}

impl Outstanding {
    fn cancel(&mut self) {
        if let Some(cancel) = self.cancel.take() {
            let _ = cancel.send(());
        }
    }
}

/// The response to a request sent with [`Sender::send`]. Dropped before the response
/// came (the client gave up), it resets the stream, even while the request body
/// waits for flow-control capacity; so does its body, dropped before its end.
pub struct PendingResponse {
    response: ResponseFuture,
    outstanding: Option<Outstanding>,
}

impl Future for PendingResponse {
    type Output = Result<Response<ResponseStream>, h2::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let response = ready!(Pin::new(&mut this.response).poll(cx))?;
        Poll::Ready(Ok(response_stream(response, this.outstanding.take())))
    }
}

impl Drop for PendingResponse {
    fn drop(&mut self) {
        if let Some(outstanding) = &mut self.outstanding {
            outstanding.cancel();
        }
    }
}

/// Methods whose requests carry a body by definition: they get `content-length: 0`
/// for an empty one, as hyper sends them.
fn has_payload_semantics(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}

/// Removes the connection-specific headers HTTP/2 forbids (RFC 9113, 8.2.2), which
/// an HTTP/1 request may carry; `te` stays when it is `trailers`. One pass over the
/// names finds whether there is anything to do, so the usual request costs no lookup.
fn strip_connection_headers(headers: &mut HeaderMap) {
    let forbidden = headers.keys().any(|name| {
        name == CONNECTION
            || name == TRANSFER_ENCODING
            || name == UPGRADE
            || name == TE
            || name == KEEP_ALIVE
            || name == PROXY_CONNECTION
    });
    if !forbidden {
        return;
    }
    if let Some(connection) = headers.remove(CONNECTION) {
        // The names `Connection` lists are connection-specific too.
        for name in connection.to_str().unwrap_or_default().split(',') {
            headers.remove(name.trim());
        }
    }
    for name in [TRANSFER_ENCODING, UPGRADE, KEEP_ALIVE, PROXY_CONNECTION] {
        headers.remove(name);
    }
    if headers.get(TE).is_some_and(|te| te != "trailers") {
        headers.remove(TE);
    }
}

/// Streams a request body into its HTTP/2 stream: data within the flow-control
/// window, then trailers or the end of the stream. Stops when the peer resets the
/// stream (it answered without needing the rest); resets it when the body fails or
/// the request is `canceled` before its response has ended.
async fn send_body(
    mut body: Incoming,
    mut stream: SendStream<Bytes>,
    canceled: oneshot::Receiver<()>,
    _in_flight: InFlight,
) {
    let mut canceled = Some(canceled);
    if let Err(reason) = pump(&mut body, &mut stream, &mut canceled).await {
        stream.send_reset(reason);
    }
}

/// Whether the request was canceled (see [`PendingResponse`]). Once the response
/// has ended, the signal can no longer arrive and is not polled again.
fn poll_canceled(canceled: &mut Option<oneshot::Receiver<()>>, cx: &mut Context<'_>) -> bool {
    let Some(receiver) = canceled else {
        return false;
    };
    match Pin::new(receiver).poll(cx) {
        Poll::Ready(Ok(())) => true,
        Poll::Ready(Err(_)) => {
            *canceled = None;
            false
        }
        Poll::Pending => false,
    }
}

/// What ends a request body's stream early.
enum Stop {
    /// The peer reset the stream: nothing more to send.
    Reset,
    Canceled,
}

async fn pump(
    body: &mut Incoming,
    stream: &mut SendStream<Bytes>,
    canceled: &mut Option<oneshot::Receiver<()>>,
) -> Result<(), Reason> {
    loop {
        let frame = poll_fn(|cx| {
            if poll_canceled(canceled, cx) {
                return Poll::Ready(Err(Stop::Canceled));
            }
            if let Poll::Ready(reset) = stream.poll_reset(cx) {
                debug!(reason = ?reset.ok(), "the peer reset the stream; the request body stops");
                return Poll::Ready(Err(Stop::Reset));
            }
            Pin::new(&mut *body).poll_frame(cx).map(Ok)
        })
        .await;
        let frame = match frame {
            Err(Stop::Reset) => return Ok(()),
            Err(Stop::Canceled) => return Err(Reason::CANCEL),
            Ok(None) => return end(stream),
            Ok(Some(Err(error))) => {
                debug!(%error, "the request body failed");
                return Err(reset_reason(&error));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return stream.send_trailers(trailers).map_err(|_| Reason::CANCEL);
                }
                continue;
            }
        };
        let last = body.is_end_stream();
        if data.is_empty() && !last {
            continue;
        }
        loop {
            let available = stream.capacity();
            if available == 0 && !data.is_empty() {
                stream.reserve_capacity(data.len());
                let granted = poll_fn(|cx| {
                    if poll_canceled(canceled, cx) {
                        return Poll::Ready(Err(Stop::Canceled));
                    }
                    stream.poll_capacity(cx).map(Ok)
                })
                .await;
                match granted {
                    Ok(Some(Ok(_))) => continue,
                    Err(_) => return Err(Reason::CANCEL),
                    // The stream closed or was reset meanwhile.
                    Ok(_) => return Ok(()),
                }
            }
            let chunk = data.split_to(available.min(data.len()));
            let end_of_stream = last && data.is_empty();
            stream
                .send_data(chunk, end_of_stream)
                .map_err(|_| Reason::CANCEL)?;
            if end_of_stream {
                return Ok(());
            }
            if data.is_empty() {
                break;
            }
        }
    }
}

/// The reason to reset the upstream stream with when the request body failed: the
/// client's own, when it reset its HTTP/2 stream, as hyper passed it on.
fn reset_reason(error: &hyper::Error) -> Reason {
    let mut source = std::error::Error::source(error);
    while let Some(error) = source {
        if let Some(reason) = error
            .downcast_ref::<h2::Error>()
            .and_then(h2::Error::reason)
        {
            return reason;
        }
        source = error.source();
    }
    Reason::INTERNAL_ERROR
}

fn end(stream: &mut SendStream<Bytes>) -> Result<(), Reason> {
    stream.reserve_capacity(0);
    stream
        .send_data(Bytes::new(), true)
        .map_err(|_| Reason::CANCEL)
}

/// A response body read from an `h2` stream.
pub struct ResponseStream {
    stream: RecvStream,
    data_done: bool,
    /// What `content-length` announced and has not arrived yet.
    remaining: Option<u64>,
    outstanding: Option<Outstanding>,
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        if let Some(outstanding) = &mut self.outstanding {
            if !self.stream.is_end_stream() {
                outstanding.cancel();
            }
        }
    }
}

/// Turns a response from `h2` into one whose body hyper's server can send on.
fn response_stream(
    response: Response<RecvStream>,
    outstanding: Option<Outstanding>,
) -> Response<ResponseStream> {
    let length = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    response.map(|stream| {
        // A stream that ended with its headers is an empty body, length known.
        let remaining = length.or_else(|| stream.is_end_stream().then_some(0));
        ResponseStream {
            stream,
            data_done: false,
            remaining,
            outstanding,
        }
    })
}

impl Body for ResponseStream {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The window is the bound on what waits in the proxy: the
                    // capacity returns as soon as the bytes are handed on.
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    if let Some(remaining) = &mut this.remaining {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.data_done = true,
            }
        }
        match ready!(this.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

/// Resolves when the peer fails to answer a PING in time (never while it answers,
/// nor when keepalive is off or the connection has ended: its own task sees that).
/// Owns copies of the settings, so it can run on the connection's task. Used by
/// the pooled HTTP/2 connections here, which ping only while `in_flight` counts
/// requests, and by the carriers (`tunnel`), which ping idle or not.
pub fn keepalive(
    http: &HttpConfig,
    ping_pong: Option<h2::PingPong>,
    in_flight: Option<Arc<AtomicUsize>>,
) -> impl Future<Output = ()> + Send + 'static {
    let (interval, timeout) = (http.keepalive(), http.keepalive_timeout);
    async move {
        let (Some(interval), Some(mut ping_pong)) = (interval, ping_pong) else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(interval).await;
            if in_flight
                .as_ref()
                .is_some_and(|n| n.load(Ordering::Relaxed) == 0)
            {
                continue;
            }
            match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
                Ok(Ok(_pong)) => {}
                Ok(Err(_closed)) => return std::future::pending().await,
                Err(_elapsed) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_specific_headers_are_removed_and_the_rest_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-hop"));
        headers.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert(PROXY_CONNECTION, HeaderValue::from_static("close"));
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(TE, HeaderValue::from_static("gzip"));
        headers.insert("x-app", HeaderValue::from_static("kept"));
        strip_connection_headers(&mut headers);
        let names: Vec<_> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-app"]);

        let mut headers = HeaderMap::new();
        headers.insert(TE, HeaderValue::from_static("trailers"));
        headers.insert("x-app", HeaderValue::from_static("kept"));
        strip_connection_headers(&mut headers);
        assert_eq!(headers.len(), 2, "te: trailers is allowed in HTTP/2");
    }
}

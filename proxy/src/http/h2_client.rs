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
//! HTTP/2 forbids are removed, a body of known length gets its `content-length`, and
//! the response body returns its flow-control capacity as it is read (the last two
//! in `h2_streams`, which the server shares).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use hyper::body::Body;
use hyper::header::{HeaderValue, CONTENT_LENGTH};
use hyper::{Method, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tracing::debug;

use super::body::RecvBody;
use super::h2_streams::{keepalive, send_body, strip_connection_headers, H2Body};
use crate::config::HttpConfig;
use crate::net::batched_writes::batched;

/// hyper's defaults for its HTTP/2 client, kept so that switching to `h2` changed
/// nothing on the wire: per-stream and connection receive windows, the largest
/// header list accepted, what may wait in the send buffer, and the streams opened
/// before the server's SETTINGS say how many it takes.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// One HTTP/2 connection to an endpoint, shared by the requests to it.
pub struct H2Connection {
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

/// A handle to open one stream on an [`H2Connection`].
pub struct Sender {
    inner: SendRequest<Bytes>,
    in_flight: Arc<AtomicUsize>,
}

impl H2Connection {
    /// Performs the HTTP/2 handshake on `io` and spawns the task that drives the
    /// connection (and PINGs the peer when `config` says so).
    pub async fn handshake<T>(
        io: T,
        config: &HttpConfig,
        target: SocketAddr,
    ) -> Result<H2Connection, h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (io, flusher) = batched(io);
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
                ended = flusher.drive(|cx| Pin::new(&mut connection).poll(cx)) => if let Err(error) = ended {
                    debug!(%target, %error, "HTTP/2 connection failed");
                },
                () = keepalive => {
                    debug!(%target, "the peer stopped answering PINGs; closing the connection");
                }
            }
            on_close.store(true, Ordering::Release);
            // Dropping the connection fails the streams still on it.
        });
        Ok(H2Connection {
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
    pub fn send(mut self, request: Request<RecvBody>) -> Result<PendingResponse, h2::Error> {
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
            tokio::spawn(async move {
                let _in_flight = in_flight;
                send_body(body, stream, Some(canceled)).await;
            });
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
pub(super) struct Outstanding {
    _in_flight: InFlight,
    /// Tells the request body's task to reset the stream. Dropped unused when the
    /// response ends, since the body may go on streaming after it (the server
    /// answered early, or resets the stream itself when it wants no more).
    cancel: Option<oneshot::Sender<()>>,
}

impl Outstanding {
    pub(super) fn cancel(&mut self) {
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
    type Output = Result<Response<H2Body>, h2::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let response = ready!(Pin::new(&mut this.response).poll(cx))?;
        let (head, stream) = response.into_parts();
        let body = H2Body::new(stream, &head.headers, this.outstanding.take());
        Poll::Ready(Ok(Response::from_parts(head, body)))
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

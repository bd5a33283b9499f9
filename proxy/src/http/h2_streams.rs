//! What the HTTP/2 client (`h2_client`) and server (`h2_server`) share, both driving
//! `h2` directly: a body read from a stream ([`H2Body`]), a body written into one
//! ([`send_body`]), the headers HTTP/2 forbids, and keepalive PINGs.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{HeaderName, CONNECTION, CONTENT_LENGTH, TE, TRANSFER_ENCODING, UPGRADE};
use hyper::HeaderMap;
use tokio::sync::oneshot;
use tracing::debug;

use super::body::BoxError;
use super::h2_client::Outstanding;
use crate::config::HttpConfig;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// A body read from an `h2` stream: a request's on the server, a response's on the
/// client. It returns flow-control capacity as it is read, and knows its length
/// from `content-length` (`h2` itself holds the peer to it).
pub struct H2Body {
    stream: RecvStream,
    data_done: bool,
    /// What `content-length` announced and has not arrived yet.
    remaining: Option<u64>,
    /// Client side: the request this is the response to, canceled (reset upstream)
    /// when the body is dropped before its end.
    outstanding: Option<Outstanding>,
}

impl H2Body {
    pub(super) fn new(
        stream: RecvStream,
        headers: &HeaderMap,
        outstanding: Option<Outstanding>,
    ) -> H2Body {
        let length = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        // A stream that ended with its headers is an empty body, length known.
        let remaining = length.or_else(|| stream.is_end_stream().then_some(0));
        H2Body {
            stream,
            data_done: false,
            remaining,
            outstanding,
        }
    }
}

impl Drop for H2Body {
    fn drop(&mut self) {
        if let Some(outstanding) = &mut self.outstanding {
            if !self.stream.is_end_stream() {
                outstanding.cancel();
            }
        }
    }
}

impl Body for H2Body {
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

/// Removes the connection-specific headers HTTP/2 forbids (RFC 9113, 8.2.2), which
/// an HTTP/1 message may carry; `te` stays when it is `trailers`. One pass over the
/// names finds whether there is anything to do, so the usual message costs no lookup.
pub fn strip_connection_headers(headers: &mut HeaderMap) {
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

/// Streams `body` into its HTTP/2 stream: data within the flow-control window, then
/// trailers or the end of the stream. Stops when the peer resets the stream (it
/// needs no more); resets it when the body fails, or when `canceled` fires (client
/// side: the request was abandoned before its response ended).
pub async fn send_body<B>(
    mut body: B,
    mut stream: SendStream<Bytes>,
    mut canceled: Option<oneshot::Receiver<()>>,
) where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    if let Err(reason) = pump(&mut body, &mut stream, &mut canceled).await {
        stream.send_reset(reason);
    }
}

/// Whether the request was canceled. Once the response has ended, the signal can no
/// longer arrive and is not polled again.
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

/// What ends a body's stream early.
enum Stop {
    /// The peer reset the stream: nothing more to send.
    Reset,
    Canceled,
}

async fn pump<B>(
    body: &mut B,
    stream: &mut SendStream<Bytes>,
    canceled: &mut Option<oneshot::Receiver<()>>,
) -> Result<(), Reason>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    loop {
        let frame = poll_fn(|cx| {
            if poll_canceled(canceled, cx) {
                return Poll::Ready(Err(Stop::Canceled));
            }
            if let Poll::Ready(reset) = stream.poll_reset(cx) {
                debug!(reason = ?reset.ok(), "the peer reset the stream; its body stops");
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
                debug!(%error, "the body failed");
                return Err(reset_reason(&*error));
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
        if last {
            // The rest of the body is in hand: `h2` sends it as the window opens,
            // and nothing more is read meanwhile, so handing it over whole holds no
            // more than is held already, and saves asking for capacity (the usual
            // small body is one such chunk). Once this task's handle is gone, an
            // abandoned request is still reset: `h2` resets a stream it still
            // has to send on when the last handle to it is dropped.
            return stream.send_data(data, true).map_err(|_| Reason::CANCEL);
        }
        loop {
            let available = stream.capacity();
            if available == 0 {
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
            stream.send_data(chunk, false).map_err(|_| Reason::CANCEL)?;
            if data.is_empty() {
                break;
            }
        }
    }
}

/// The reason to reset a stream with when the body sent on it failed: the one the
/// failure carries (the other side's peer reset its own stream with it), as hyper
/// passes it on; otherwise INTERNAL_ERROR.
fn reset_reason(error: &(dyn std::error::Error + 'static)) -> Reason {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(reason) = error
            .downcast_ref::<h2::Error>()
            .and_then(h2::Error::reason)
        {
            return reason;
        }
        next = error.source();
    }
    Reason::INTERNAL_ERROR
}

fn end(stream: &mut SendStream<Bytes>) -> Result<(), Reason> {
    stream.reserve_capacity(0);
    stream
        .send_data(Bytes::new(), true)
        .map_err(|_| Reason::CANCEL)
}

/// Resolves when the peer fails to answer a PING in time (never while it answers,
/// nor when keepalive is off or the connection has ended: its own task sees that).
/// Owns copies of the settings, so it can run on the connection's task. Pooled
/// client connections ping only while `in_flight` counts requests; servers and the
/// carriers (`tunnel`) pass `None` and ping idle or not.
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
    use hyper::header::HeaderValue;

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

    /// A reset reason is found on the error itself or anywhere in its chain.
    #[test]
    fn reset_reason_is_the_one_the_error_carries() {
        let direct: BoxError = Box::new(h2::Error::from(Reason::REFUSED_STREAM));
        assert_eq!(reset_reason(&*direct), Reason::REFUSED_STREAM);
        #[derive(Debug)]
        struct Wrapped(h2::Error);
        impl std::fmt::Display for Wrapped {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl std::error::Error for Wrapped {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let wrapped = Wrapped(h2::Error::from(Reason::CANCEL));
        assert_eq!(reset_reason(&wrapped), Reason::CANCEL);
        let other = std::io::Error::other("no reason");
        assert_eq!(reset_reason(&other), Reason::INTERNAL_ERROR);
    }
}

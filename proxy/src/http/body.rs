//! The response body the proxy hands its client: the upstream's body streamed frame
//! by frame (never buffered), or an empty body for a response the proxy made up.
//!
//! It is also where a response ends, so it records the response's metrics (status,
//! gRPC status from headers or trailers, latency) and returns a pooled HTTP/1
//! connection once the body has been read to its end. Latency is Linkerd's
//! time to first byte: until the first DATA frame, or the end of a body without one,
//! so a long download or a server stream reads as the server's reaction time, not as
//! the stream's length.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::HeaderMap;

use super::client::Checkin;
use super::errors::ErrorKind;
use super::h2_streams::H2Body;
use super::metrics::{Outcome, SeriesHandle};
use super::route_decide;
use super::routed::RouteEnd;
use crate::discover::balance::Picked;
use crate::metrics::routes::RouteError;

/// A body error, whichever side it came from. A body sent on an HTTP/2 stream that
/// fails resets the stream with the `h2` reason found inside it, if any.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body the proxy receives and passes on: a request's from its client, a
/// response's from the destination; read by hyper on HTTP/1, from an `h2` stream
/// on HTTP/2.
pub enum RecvBody {
    Http1(Incoming),
    Http2(H2Body),
    /// A request body sent on while a copy is kept, so that a retry can send it again.
    Recorded(Box<Recorded>),
    /// A retry's copy of the request body.
    Replayed(Replayed),
    /// A response body whose first frames were read ahead (to find a gRPC status in
    /// trailers that follow at once), then the rest.
    Peeked(Box<Peeked>),
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RecvBody::Http1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            RecvBody::Http2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            RecvBody::Recorded(body) => body.poll_frame(cx),
            RecvBody::Replayed(body) => Poll::Ready(body.next().map(Ok)),
            RecvBody::Peeked(body) => match body.frames.pop_front() {
                Some(frame) => Poll::Ready(Some(frame)),
                None => match body.rest.as_mut() {
                    Some(rest) => Pin::new(rest).poll_frame(cx),
                    None => Poll::Ready(None),
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RecvBody::Http1(body) => body.is_end_stream(),
            RecvBody::Http2(body) => body.is_end_stream(),
            RecvBody::Recorded(body) => body.inner.is_end_stream(),
            RecvBody::Replayed(body) => body.chunks.is_empty() && body.trailers.is_none(),
            RecvBody::Peeked(body) => {
                body.frames.is_empty() && body.rest.as_ref().is_none_or(|r| r.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RecvBody::Http1(body) => body.size_hint(),
            RecvBody::Http2(body) => body.size_hint(),
            RecvBody::Recorded(body) => body.inner.size_hint(),
            RecvBody::Replayed(body) => {
                SizeHint::with_exact(body.chunks.iter().map(|c| c.len() as u64).sum())
            }
            RecvBody::Peeked(_) => SizeHint::default(),
        }
    }
}

/// A body's first frames, read ahead, and the rest of it (none once it ended).
pub struct Peeked {
    frames: std::collections::VecDeque<Result<Frame<Bytes>, BoxError>>,
    rest: Option<RecvBody>,
}

impl RecvBody {
    /// Reads up to `frames` frames ahead, stopping at trailers; returns the body as it
    /// was (the frames read first) and the trailers' gRPC status, if trailers came.
    pub async fn peek_grpc_status(mut self, frames: usize) -> (RecvBody, Option<u32>) {
        let mut read = std::collections::VecDeque::new();
        let mut status = None;
        let mut ended = false;
        for _ in 0..frames {
            if self.is_end_stream() {
                break;
            }
            let frame = std::future::poll_fn(|cx| Pin::new(&mut self).poll_frame(cx)).await;
            match frame {
                Some(Ok(frame)) => {
                    let trailers = frame.trailers_ref().map(grpc_status);
                    read.push_back(Ok(frame));
                    if let Some(found) = trailers {
                        status = found;
                        break;
                    }
                }
                Some(Err(error)) => {
                    read.push_back(Err(error));
                    break;
                }
                None => {
                    ended = true;
                    break;
                }
            }
        }
        let body = RecvBody::Peeked(Box::new(Peeked {
            frames: read,
            rest: (!ended).then_some(self),
        }));
        (body, status)
    }
}

/// A request body's copy, kept up to a limit while the body is sent.
#[derive(Debug, Default)]
struct Copy {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: usize,
    limit: usize,
    /// The body outgrew the limit: the copy was dropped, the body went on.
    overflowed: bool,
    complete: bool,
}

/// The sending side of a recorded body.
pub struct Recorded {
    inner: RecvBody,
    copy: Arc<Mutex<Copy>>,
}

/// What a retry needs of the first attempt's body.
#[derive(Clone)]
pub struct Recording(Arc<Mutex<Copy>>);

impl Recorded {
    /// Wraps `inner` to keep a copy of up to `limit` bytes; no recording when its
    /// declared length is already over the limit (it is then never copied at all).
    pub fn wrap(inner: RecvBody, limit: usize) -> (RecvBody, Option<Recording>) {
        if inner.size_hint().lower() > limit as u64 {
            return (inner, None);
        }
        let copy = Arc::new(Mutex::new(Copy {
            limit,
            complete: inner.is_end_stream(),
            ..Copy::default()
        }));
        let recording = Recording(copy.clone());
        (
            RecvBody::Recorded(Box::new(Recorded { inner, copy })),
            Some(recording),
        )
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let mut copy = self.copy.lock().unwrap_or_else(|p| p.into_inner());
        match &polled {
            Poll::Ready(Some(Ok(frame))) if !copy.overflowed => {
                if let Some(data) = frame.data_ref() {
                    copy.len += data.len();
                    if copy.len > copy.limit {
                        copy.overflowed = true;
                        copy.chunks = Vec::new();
                    } else if !data.is_empty() {
                        copy.chunks.push(data.clone());
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    copy.trailers = Some(trailers.clone());
                }
            }
            Poll::Ready(None) => copy.complete = true,
            _ => {}
        }
        // A sender may stop at the last frame of a body of known length without
        // polling for its end.
        if !copy.complete && self.inner.is_end_stream() {
            copy.complete = true;
        }
        polled
    }
}

impl Recording {
    /// Whether [`Recording::replay`] would give the body.
    pub fn replayable(&self) -> bool {
        let copy = self.0.lock().unwrap_or_else(|p| p.into_inner());
        copy.complete && !copy.overflowed
    }

    /// The body again, for a retry: only once the first attempt sent all of it and
    /// it stayed within the limit.
    pub fn replay(&self) -> Option<RecvBody> {
        let copy = self.0.lock().unwrap_or_else(|p| p.into_inner());
        (copy.complete && !copy.overflowed).then(|| {
            RecvBody::Replayed(Replayed {
                chunks: copy.chunks.iter().cloned().collect(),
                trailers: copy.trailers.clone(),
            })
        })
    }
}

impl RecvBody {
    /// A body with nothing in it.
    pub fn empty() -> RecvBody {
        RecvBody::Replayed(Replayed {
            chunks: Default::default(),
            trailers: None,
        })
    }
}

/// A retry's body: the copy's chunks, then its trailers.
pub struct Replayed {
    chunks: std::collections::VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Replayed {
    fn next(&mut self) -> Option<Frame<Bytes>> {
        match self.chunks.pop_front() {
            Some(chunk) => Some(Frame::data(chunk)),
            None => self.trailers.take().map(Frame::trailers),
        }
    }
}

pub struct ResponseBody {
    inner: Option<RecvBody>,
    recorder: Option<Recorder>,
    checkin: Option<Checkin>,
    /// The balanced endpoint the request went to, in flight until the body ends.
    picked: Option<Picked>,
    /// A routed request's series and timeouts. In place, not boxed: every routed
    /// response has one, and it is small (its timeouts are boxed apart).
    route: Option<RouteEnd>,
}

/// Records one response in its series when the response ends.
pub struct Recorder {
    pub series: SeriesHandle,
    pub start: Instant,
    /// Request headers received → first body bytes, once they came.
    pub first_byte: Option<Duration>,
    pub status: u16,
    /// The gRPC status, once seen (headers of a trailers-only response, or trailers).
    pub grpc: Option<u32>,
}

impl Recorder {
    fn on_frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(trailers) = frame.trailers_ref() {
            self.grpc = grpc_status(trailers).or(self.grpc);
        } else if self.first_byte.is_none() && frame.data_ref().is_some_and(|d| !d.is_empty()) {
            self.first_byte = Some(self.start.elapsed());
        }
    }

    fn finish(self, error: bool) {
        let outcome = if error {
            Outcome::Error(ErrorKind::Stream)
        } else {
            Outcome::Status {
                status: self.status,
                grpc: self.grpc,
            }
        };
        let latency = self.first_byte.unwrap_or_else(|| self.start.elapsed());
        self.series.response(outcome, latency);
    }
}

pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get(super::errors::GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

impl ResponseBody {
    pub fn empty() -> ResponseBody {
        ResponseBody {
            inner: None,
            recorder: None,
            checkin: None,
            picked: None,
            route: None,
        }
    }

    /// Records the response in its route's series too, and enforces the route's
    /// timeouts on the body.
    pub fn route(&mut self, route: RouteEnd) {
        self.route = Some(route);
    }

    /// The status recorded so far (for a response the proxy made up: none).
    fn statuses(&self) -> (Option<u16>, Option<u32>) {
        self.recorder
            .as_ref()
            .map_or((None, None), |r| (Some(r.status), r.grpc))
    }

    pub fn new(
        inner: RecvBody,
        recorder: Recorder,
        checkin: Option<Checkin>,
        picked: Option<Picked>,
    ) -> ResponseBody {
        ResponseBody {
            inner: Some(inner),
            recorder: Some(recorder),
            checkin,
            picked,
            route: None,
        }
    }

    /// The response ended: with its stream's `error`, if any.
    fn end(&mut self, error: Option<RouteError>) {
        let (status, grpc) = self.statuses();
        if let Some(route) = self.route.take() {
            route.finish(status, grpc, error);
        }
        if let Some(recorder) = self.recorder.take() {
            recorder.finish(error.is_some());
        }
        if let Some(checkin) = self.checkin.take() {
            if error.is_none() {
                checkin.release();
            }
        }
        if let Some(mut picked) = self.picked.take() {
            picked.outcome(route_decide::is_failure(status, grpc, error.is_some()));
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(recorder) = &mut this.recorder {
                    recorder.on_frame(frame);
                }
                if let Some(route) = &mut this.route {
                    route.on_frame(frame);
                }
            }
            Poll::Ready(Some(Err(_))) => this.end(Some(RouteError::Io)),
            Poll::Ready(None) => this.end(None),
            Poll::Pending => {
                if let Some(expired) = this.route.as_mut().and_then(|r| r.poll_expired(cx)) {
                    // The route's timeout cuts the response short: the stream is
                    // reset (HTTP/2) or the connection closed (HTTP/1).
                    this.inner = None;
                    this.end(Some(expired));
                    return Poll::Ready(Some(Err(expired.as_str().into())));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for ResponseBody {
    /// A body the server never polled (empty, HEAD) ends here; so does one the client
    /// abandoned, whose connection cannot be reused.
    fn drop(&mut self) {
        let complete = self.is_end_stream();
        if !complete {
            self.checkin = None;
        }
        if !complete {
            // The client went away before the end: the route records it, as Linkerd
            // does, with `error="UNKNOWN"`.
            if let Some(route) = self.route.take() {
                let (status, grpc) = self.statuses();
                route.finish(status, grpc, Some(RouteError::Unknown));
            }
        }
        self.end(None);
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::http::metrics::{scrape, test_series};
    use crate::mesh::tls::{NoTlsReason, TlsStatus};
    use crate::metrics::Direction;

    /// Records one response through `frames`, moving its start back by `before` before
    /// the frames and by `after` once they are in, and returns the latency sum (ms).
    fn recorded_latency_ms(frames: &[Frame<Bytes>], before: u64, after: u64) -> f64 {
        let tls = TlsStatus::NoIdentity(NoTlsReason::Loopback);
        let (metrics, series) = test_series(Direction::Outbound, None, tls);
        let back = |secs| {
            Instant::now()
                .checked_sub(Duration::from_secs(secs))
                .unwrap()
        };
        let mut recorder = Recorder {
            series,
            start: back(before),
            first_byte: None,
            status: 200,
            grpc: None,
        };
        for frame in frames {
            recorder.on_frame(frame);
        }
        recorder.start = back(after);
        recorder.finish(false);
        let text = scrape(&metrics);
        text.lines()
            .find(|l| l.starts_with("response_latency_ms_sum"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no latency sum in {text}"))
    }

    /// A stream that lasts a minute after its first bytes reads as its first bytes.
    #[test]
    fn latency_is_time_to_first_byte() {
        let frames = [
            Frame::data(Bytes::new()),
            Frame::data(Bytes::from_static(b"first")),
            Frame::data(Bytes::from_static(b"later")),
            Frame::trailers(HeaderMap::new()),
        ];
        let ms = recorded_latency_ms(&frames, 5, 60);
        assert!((5_000.0..30_000.0).contains(&ms), "{ms} ms");
    }

    /// Without body bytes, the end of the stream is the first byte.
    #[test]
    fn latency_without_data_is_until_the_end() {
        let frames = [Frame::data(Bytes::new()), Frame::trailers(HeaderMap::new())];
        let ms = recorded_latency_ms(&frames, 5, 60);
        assert!(ms >= 60_000.0, "{ms} ms");
    }
}

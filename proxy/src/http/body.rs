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
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::HeaderMap;

use super::client::Checkin;
use super::errors::ErrorKind;
use super::h2_streams::H2Body;
use super::metrics::{Outcome, SeriesHandle};
use crate::discover::balance::Picked;

/// A body error, whichever side it came from. A body sent on an HTTP/2 stream that
/// fails resets the stream with the `h2` reason found inside it, if any.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body the proxy receives and passes on: a request's from its client, a
/// response's from the destination; read by hyper on HTTP/1, from an `h2` stream
/// on HTTP/2.
pub enum RecvBody {
    Http1(Incoming),
    Http2(H2Body),
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RecvBody::Http1(body) => body.is_end_stream(),
            RecvBody::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RecvBody::Http1(body) => body.size_hint(),
            RecvBody::Http2(body) => body.size_hint(),
        }
    }
}

pub struct ResponseBody {
    inner: Option<RecvBody>,
    recorder: Option<Recorder>,
    checkin: Option<Checkin>,
    /// The balanced endpoint the request went to, in flight until the body ends.
    picked: Option<Picked>,
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
        }
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
        }
    }

    fn end(&mut self, error: bool) {
        if let Some(recorder) = self.recorder.take() {
            recorder.finish(error);
        }
        if let Some(checkin) = self.checkin.take() {
            if !error {
                checkin.release();
            }
        }
        self.picked = None;
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
            }
            Poll::Ready(Some(Err(_))) => this.end(true),
            Poll::Ready(None) => this.end(false),
            Poll::Pending => {}
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
        self.end(false);
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

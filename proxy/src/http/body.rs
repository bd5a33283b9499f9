//! The response body the proxy hands its client: the upstream's body streamed frame
//! by frame (never buffered), or an empty body for a response the proxy made up.
//!
//! It is also where a response ends, so it records the response's metrics (status,
//! gRPC status from headers or trailers, latency) and returns a pooled HTTP/1
//! connection once the body has been read to its end.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::HeaderMap;

use super::client::Checkin;
use super::errors::ErrorKind;
use super::metrics::{Outcome, SeriesHandle};

pub struct ResponseBody {
    inner: Option<Incoming>,
    recorder: Option<Recorder>,
    checkin: Option<Checkin>,
}

/// Records one response in its series when the response ends.
pub struct Recorder {
    pub series: SeriesHandle,
    pub start: Instant,
    pub status: u16,
    /// The gRPC status, once seen (headers of a trailers-only response, or trailers).
    pub grpc: Option<u32>,
}

impl Recorder {
    fn finish(self, error: bool) {
        let outcome = if error {
            Outcome::Error(ErrorKind::Stream)
        } else {
            Outcome::Status {
                status: self.status,
                grpc: self.grpc,
            }
        };
        self.series.response(outcome, self.start.elapsed());
    }
}

pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

impl ResponseBody {
    pub fn empty() -> ResponseBody {
        ResponseBody {
            inner: None,
            recorder: None,
            checkin: None,
        }
    }

    pub fn new(inner: Incoming, recorder: Recorder, checkin: Option<Checkin>) -> ResponseBody {
        ResponseBody {
            inner: Some(inner),
            recorder: Some(recorder),
            checkin,
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
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(recorder)) = (frame.trailers_ref(), &mut this.recorder)
                {
                    recorder.grpc = grpc_status(trailers).or(recorder.grpc);
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

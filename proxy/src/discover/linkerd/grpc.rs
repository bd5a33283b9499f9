//! Server-streaming gRPC calls to the control plane, read one message at a time.
//!
//! Calls go through tonic's `Channel` (HTTP/2, reconnection, the mesh connector)
//! and messages through prost; this module only frames them: gRPC's five-byte
//! prefix (a compression flag, a big-endian length) before each message, the
//! status in the trailers or, for a call that fails at once, in the headers.
//!
//! Why not tonic's `Streaming`: it keeps its receive buffer for the life of a
//! stream, grown to about twice the largest message it has read. A proxy holds up
//! to three streams for every Service it talks to, as long as the Service is used,
//! and those buffers were the largest part of what discovery cost. Here bytes are
//! held only while a message is incomplete ([`Framer`]).

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use tonic::codegen::http;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tower::ServiceExt;

/// The largest message accepted (tonic's default too).
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// Calls `path` with `request` and returns the response's messages. Fails with the
/// call's status when the server refuses it outright.
pub async fn call<Req, Resp>(
    channel: &Channel,
    path: &'static str,
    request: &Req,
) -> Result<Messages<Resp>, Status>
where
    Req: prost::Message,
    Resp: prost::Message + Default,
{
    let response = channel
        .clone()
        .oneshot(encode_request(path, request))
        .await
        .map_err(|e| Status::unavailable(format!("the control plane: {e}")))?;
    let (parts, body) = response.into_parts();
    if let Some(status) = refused(parts.status, &parts.headers) {
        return Err(status);
    }
    Ok(Messages {
        body,
        framer: Framer::default(),
        ended: false,
        message: PhantomData,
    })
}

fn encode_request<Req: prost::Message>(
    path: &'static str,
    request: &Req,
) -> http::Request<tonic::body::Body> {
    let len = request.encoded_len();
    let mut body = BytesMut::with_capacity(PREFIX + len);
    body.put_u8(0);
    body.put_u32(len as u32);
    request
        .encode(&mut body)
        .expect("the buffer was sized for the message");
    let mut http_request = http::Request::new(tonic::body::Body::new(http_body_util::Full::new(
        body.freeze(),
    )));
    *http_request.method_mut() = http::Method::POST;
    *http_request.uri_mut() = http::Uri::from_static(path);
    let headers = http_request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    http_request
}

/// The status of a call the server answered with an error instead of a stream:
/// an error `grpc-status` in the headers (a trailers-only response), or an HTTP
/// status other than 200 without one, read as gRPC's HTTP mapping says.
pub fn refused(status: http::StatusCode, headers: &http::HeaderMap) -> Option<Status> {
    if let Some(grpc) = Status::from_header_map(headers) {
        return (grpc.code() != Code::Ok).then_some(grpc);
    }
    if status == http::StatusCode::OK {
        return None;
    }
    let code = match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    };
    Some(Status::new(code, format!("HTTP status {status}")))
}

/// A call's response messages.
pub struct Messages<T> {
    body: tonic::body::Body,
    framer: Framer,
    ended: bool,
    message: PhantomData<fn() -> T>,
}

impl<T: prost::Message + Default> Messages<T> {
    /// The next message; `None` when the call ended with `OK`, the call's status
    /// when it ended otherwise.
    pub async fn message(&mut self) -> Result<Option<T>, Status> {
        loop {
            if let Some(bytes) = self.framer.next_message()? {
                return T::decode(bytes)
                    .map(Some)
                    .map_err(|e| Status::internal(format!("a message that does not decode: {e}")));
            }
            if self.ended {
                return Ok(None);
            }
            let frame = match self.body.frame().await {
                Some(frame) => frame?,
                None => {
                    return Err(Status::unknown("the stream ended without a status"));
                }
            };
            match frame.into_data() {
                Ok(data) => self.framer.push(&data),
                Err(frame) => {
                    let trailers = frame.into_trailers().unwrap_or_default();
                    let status = Status::from_header_map(&trailers).unwrap_or_else(|| {
                        Status::unknown("the stream's trailers carry no status")
                    });
                    if status.code() != Code::Ok {
                        return Err(status);
                    }
                    if self.framer.holds_bytes() {
                        return Err(Status::internal("the stream ended inside a message"));
                    }
                    self.ended = true;
                }
            }
        }
    }
}

const PREFIX: usize = 5;

/// Cuts gRPC messages out of a byte stream. Holds no memory between messages.
#[derive(Debug, Default)]
pub struct Framer {
    pending: BytesMut,
}

impl Framer {
    pub fn push(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
    }

    /// Whether part of a message is waiting for the rest.
    pub fn holds_bytes(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The next whole message's bytes, if they have all arrived.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, Status> {
        if self.pending.len() < PREFIX {
            return Ok(None);
        }
        if self.pending[0] != 0 {
            return Err(Status::internal(
                "a compressed message, but no compression was offered",
            ));
        }
        let len = u32::from_be_bytes([
            self.pending[1],
            self.pending[2],
            self.pending[3],
            self.pending[4],
        ]) as usize;
        if len > MAX_MESSAGE {
            return Err(Status::resource_exhausted(format!(
                "a message of {len} bytes, over the limit of {MAX_MESSAGE}"
            )));
        }
        if self.pending.len() < PREFIX + len {
            self.pending.reserve(PREFIX + len - self.pending.len());
            return Ok(None);
        }
        let mut message = self.pending.split_to(PREFIX + len);
        if self.pending.is_empty() {
            // Let the allocation go with the message.
            self.pending = BytesMut::new();
        }
        message.advance(PREFIX);
        Ok(Some(message.freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(messages: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            out.push(0);
            out.extend_from_slice(&(m.len() as u32).to_be_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    #[test]
    fn messages_come_out_whole_however_the_bytes_arrive() {
        let wire = framed(&[b"first", b"", b"third message"]);
        for chunk in [1, 2, 5, 6, 7, wire.len()] {
            let mut framer = Framer::default();
            let mut out: Vec<Bytes> = Vec::new();
            for piece in wire.chunks(chunk) {
                framer.push(piece);
                while let Some(m) = framer.next_message().unwrap() {
                    out.push(m);
                }
            }
            assert_eq!(out, [&b"first"[..], b"", b"third message"], "chunk {chunk}");
            assert!(!framer.holds_bytes());
            assert_eq!(
                framer.pending.capacity(),
                0,
                "nothing kept between messages"
            );
        }
    }

    #[test]
    fn bad_prefixes_are_errors() {
        let mut compressed = Framer::default();
        compressed.push(&[1, 0, 0, 0, 1, 7]);
        assert_eq!(
            compressed.next_message().unwrap_err().code(),
            Code::Internal
        );
        let mut huge = Framer::default();
        huge.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            huge.next_message().unwrap_err().code(),
            Code::ResourceExhausted
        );
        let mut partial = Framer::default();
        partial.push(&[0, 0, 0, 0, 9, 1, 2]);
        assert_eq!(partial.next_message().unwrap(), None);
        assert!(partial.holds_bytes());
    }

    #[test]
    fn refusals_as_grpc_maps_them() {
        let none = http::HeaderMap::new();
        let mut not_found = http::HeaderMap::new();
        not_found.insert("grpc-status", http::HeaderValue::from_static("5"));
        let mut ok = http::HeaderMap::new();
        ok.insert("grpc-status", http::HeaderValue::from_static("0"));
        let code = |status: u16, headers: &http::HeaderMap| {
            refused(http::StatusCode::from_u16(status).unwrap(), headers).map(|s| s.code())
        };
        assert_eq!(code(200, &none), None);
        assert_eq!(code(200, &ok), None);
        assert_eq!(code(200, &not_found), Some(Code::NotFound));
        assert_eq!(code(503, &none), Some(Code::Unavailable));
        assert_eq!(code(404, &none), Some(Code::Unimplemented));
        assert_eq!(code(500, &none), Some(Code::Unknown));
    }

    #[test]
    fn requests_are_framed_grpc_posts() {
        let request = linkerd2_proxy_api::destination::GetDestination {
            scheme: "k8s".into(),
            path: "web.ns.svc.cluster.local:80".into(),
            context_token: String::new(),
        };
        let http_request =
            encode_request("/io.linkerd.proxy.destination.Destination/Get", &request);
        assert_eq!(http_request.method(), http::Method::POST);
        assert_eq!(
            http_request.uri().path(),
            "/io.linkerd.proxy.destination.Destination/Get"
        );
        assert_eq!(http_request.headers()["content-type"], "application/grpc");
        assert_eq!(http_request.headers()["te"], "trailers");
        let body = futures_executor(http_request.into_body());
        let mut framer = Framer::default();
        framer.push(&body);
        let message = framer.next_message().unwrap().unwrap();
        assert_eq!(
            <linkerd2_proxy_api::destination::GetDestination as prost::Message>::decode(message)
                .unwrap(),
            request
        );
    }

    fn futures_executor(body: tonic::body::Body) -> Bytes {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async { body.collect().await.unwrap().to_bytes() })
    }
}

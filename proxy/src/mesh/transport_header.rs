//! Linkerd's transport header: how a client proxy tells a server proxy which local port
//! (and optionally which name and session protocol) an opaque connection is for, when it
//! connects to the server proxy's inbound port directly.
//!
//! Wire format, after a TLS handshake that negotiated ALPN `transport.l5d.io/v1`:
//! the preface `transport.l5d.io/v1\r\n\r\n`, a big-endian u32 length, then a protobuf
//! `Header { int32 port = 1; string name = 2; SessionProtocol session_protocol = 3; }`.
//! Encoding uses `prost`; parsing is bounded and fuzzed.

use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The ALPN protocol that announces a transport header.
pub const ALPN: &[u8] = crate::mesh::tls::TRANSPORT_HEADER_ALPN;

const PREFACE: &[u8] = b"transport.l5d.io/v1\r\n\r\n";

/// The most header bytes the server will hold (as Linkerd): a larger claimed length is
/// refused before anything is buffered.
pub const MAX_HEADER_LEN: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionProtocol {
    Http1,
    Http2,
}

/// What a transport header says about the connection that follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportHeader {
    pub port: u16,
    /// A name for gateway forwarding; Tandem has no gateway yet and refuses named headers.
    pub name: Option<String>,
    pub protocol: Option<SessionProtocol>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// The bytes do not start with the transport header preface.
    BadPreface,
    TooLong(usize),
    /// The protobuf did not decode, or named an impossible port.
    Invalid(String),
    /// The stream ended before the header was complete.
    Truncated,
    Timeout,
    Io(String),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::BadPreface => f.write_str("not a transport header"),
            HeaderError::TooLong(len) => write!(
                f,
                "transport header of {len} bytes exceeds {MAX_HEADER_LEN}"
            ),
            HeaderError::Invalid(why) => write!(f, "invalid transport header: {why}"),
            HeaderError::Truncated => f.write_str("stream ended inside the transport header"),
            HeaderError::Timeout => f.write_str("timed out reading the transport header"),
            HeaderError::Io(e) => write!(f, "cannot read the transport header: {e}"),
        }
    }
}

/// The protobuf messages, declared with prost's derive (the schema is three fields).
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Header {
        #[prost(int32, tag = "1")]
        pub port: i32,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(message, optional, tag = "3")]
        pub session_protocol: Option<SessionProtocol>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionProtocol {
        #[prost(oneof = "Kind", tags = "1, 2")]
        pub kind: Option<Kind>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Http1(Empty),
        #[prost(message, tag = "2")]
        Http2(Empty),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}
}

impl TransportHeader {
    /// The header as written on the wire, preface included.
    pub fn encode(&self) -> Vec<u8> {
        let message = proto::Header {
            port: i32::from(self.port),
            name: self.name.clone().unwrap_or_default(),
            session_protocol: self.protocol.map(|p| proto::SessionProtocol {
                kind: Some(match p {
                    SessionProtocol::Http1 => proto::Kind::Http1(proto::Empty {}),
                    SessionProtocol::Http2 => proto::Kind::Http2(proto::Empty {}),
                }),
            }),
        };
        let body = message.encode_to_vec();
        let mut out = Vec::with_capacity(PREFACE.len() + 4 + body.len());
        out.extend_from_slice(PREFACE);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Parses a header from the start of `buf`. Returns the header and how many bytes it
    /// took, or `Ok(None)` when more bytes are needed.
    pub fn decode(buf: &[u8]) -> Result<Option<(TransportHeader, usize)>, HeaderError> {
        let preface_len = PREFACE.len().min(buf.len());
        if buf[..preface_len] != PREFACE[..preface_len] {
            return Err(HeaderError::BadPreface);
        }
        let Some(len_bytes) = buf.get(PREFACE.len()..PREFACE.len() + 4) else {
            return Ok(None);
        };
        let len =
            u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
        if len > MAX_HEADER_LEN {
            return Err(HeaderError::TooLong(len));
        }
        let start = PREFACE.len() + 4;
        let Some(body) = buf.get(start..start + len) else {
            return Ok(None);
        };
        let message =
            proto::Header::decode(body).map_err(|e| HeaderError::Invalid(e.to_string()))?;
        let port = u16::try_from(message.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| HeaderError::Invalid(format!("port {} out of range", message.port)))?;
        let protocol = message
            .session_protocol
            .and_then(|p| p.kind)
            .map(|kind| match kind {
                proto::Kind::Http1(_) => SessionProtocol::Http1,
                proto::Kind::Http2(_) => SessionProtocol::Http2,
            });
        let name = Some(message.name).filter(|n| !n.is_empty());
        Ok(Some((
            TransportHeader {
                port,
                name,
                protocol,
            },
            start + len,
        )))
    }

    /// Reads a header from `io` within `timeout`. Returns it with any bytes read past it,
    /// which belong to the stream that follows and must be forwarded.
    pub async fn read<I: AsyncRead + Unpin>(
        io: &mut I,
        timeout: Duration,
    ) -> Result<(TransportHeader, Vec<u8>), HeaderError> {
        let mut buf = Vec::with_capacity(256);
        let reading = async {
            loop {
                if let Some((header, used)) = TransportHeader::decode(&buf)? {
                    return Ok((header, buf[used..].to_vec()));
                }
                if buf.len() == buf.capacity() {
                    buf.reserve(buf.capacity());
                }
                let n = io
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| HeaderError::Io(e.to_string()))?;
                if n == 0 {
                    return Err(HeaderError::Truncated);
                }
            }
        };
        tokio::time::timeout(timeout, reading)
            .await
            .unwrap_or(Err(HeaderError::Timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(port: u16, name: Option<&str>, protocol: Option<SessionProtocol>) -> TransportHeader {
        TransportHeader {
            port,
            name: name.map(str::to_string),
            protocol,
        }
    }

    #[test]
    fn round_trips() {
        for h in [
            header(8080, None, None),
            header(
                1,
                Some("web.ns.svc.cluster.local"),
                Some(SessionProtocol::Http1),
            ),
            header(65535, None, Some(SessionProtocol::Http2)),
        ] {
            let bytes = h.encode();
            assert_eq!(
                TransportHeader::decode(&bytes),
                Ok(Some((h.clone(), bytes.len())))
            );
        }
    }

    #[test]
    fn wire_bytes_match_the_protobuf_schema() {
        // port 4143 (field 1, varint) and an HTTP/2 session protocol (field 3 → field 2, empty).
        let bytes = header(4143, None, Some(SessionProtocol::Http2)).encode();
        let body = &bytes[PREFACE.len() + 4..];
        assert_eq!(body, [0x08, 0xaf, 0x20, 0x1a, 0x02, 0x12, 0x00]);
        assert_eq!(bytes[PREFACE.len()..PREFACE.len() + 4], [0, 0, 0, 7]);
    }

    #[test]
    fn needs_more_until_complete() {
        let bytes = header(9000, Some("x"), None).encode();
        for end in 0..bytes.len() {
            assert_eq!(TransportHeader::decode(&bytes[..end]), Ok(None), "at {end}");
        }
    }

    #[test]
    fn refuses_bad_input() {
        assert_eq!(
            TransportHeader::decode(b"GET / HTTP/1.1"),
            Err(HeaderError::BadPreface)
        );
        let mut huge = PREFACE.to_vec();
        huge.extend_from_slice(&(MAX_HEADER_LEN as u32 + 1).to_be_bytes());
        assert_eq!(
            TransportHeader::decode(&huge),
            Err(HeaderError::TooLong(MAX_HEADER_LEN + 1))
        );
        let mut zero_port = PREFACE.to_vec();
        zero_port.extend_from_slice(&[0, 0, 0, 0]);
        assert!(matches!(
            TransportHeader::decode(&zero_port),
            Err(HeaderError::Invalid(_))
        ));
        let mut garbage = PREFACE.to_vec();
        garbage.extend_from_slice(&[0, 0, 0, 2, 0xff, 0xff]);
        assert!(matches!(
            TransportHeader::decode(&garbage),
            Err(HeaderError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn read_returns_the_bytes_after_the_header() {
        let mut bytes = header(7000, None, None).encode();
        bytes.extend_from_slice(b"payload");
        let mut io = &bytes[..];
        let (h, rest) = TransportHeader::read(&mut io, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(h.port, 7000);
        assert_eq!(rest, b"payload");
        let mut short = &bytes[..10];
        assert_eq!(
            TransportHeader::read(&mut short, Duration::from_secs(1)).await,
            Err(HeaderError::Truncated)
        );
    }
}

//! The steps every proxied connection takes, whichever direction it came from:
//! find where it was going, detect its protocol, connect, forward.
//!
//! `inbound.rs` and `outbound.rs` call these in the same order; only the decisions
//! that differ by direction (loops, TLS labels, later mTLS) live there.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::debug;

use crate::config::DirectionConfig;
use crate::detect::{self, Outcome, Protocol};
use crate::metrics::{ConnError, DetectResult, DirectionMetrics, Peer, TlsStatus};
use crate::tcp::{self, Side};
use crate::transport::{self, ConnectError};

/// What one direction of the proxy needs to handle a connection.
pub struct Context {
    pub config: DirectionConfig,
    pub metrics: std::sync::Arc<DirectionMetrics>,
}

/// The accepted socket and where it was going.
pub struct Accepted {
    pub stream: TcpStream,
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
    /// The listener's address: an original destination equal to it was never redirected.
    pub local: SocketAddr,
}

/// Reads the original destination of a freshly accepted socket.
pub fn accept(ctx: &Context, stream: TcpStream, client: SocketAddr) -> Option<Accepted> {
    if let Err(error) = transport::set_options(&stream, ctx.config.accept_keepalive) {
        debug!(%client, %error, "cannot set socket options");
    }
    let addrs = stream
        .local_addr()
        .and_then(|local| Ok((local, transport::original_dst(&stream)?)));
    match addrs {
        Ok((local, orig_dst)) => Some(Accepted {
            stream,
            client: transport::unmap(client),
            orig_dst,
            local: transport::unmap(local),
        }),
        Err(error) => {
            tracing::warn!(%client, %error, "no original destination; closing the connection");
            ctx.metrics.error(ConnError::OrigDst);
            None
        }
    }
}

/// Sniffs the client's first bytes unless the port is opaque. Returns the protocol
/// (`Unknown` on timeout or skip) and the bytes to replay upstream.
pub async fn detect(ctx: &Context, conn: &mut Accepted) -> Option<(Protocol, Vec<u8>)> {
    if ctx.config.opaque_ports.contains(conn.orig_dst.port()) {
        ctx.metrics.detected(DetectResult::Skipped);
        return Some((Protocol::Unknown, Vec::new()));
    }
    match detect::detect(&mut conn.stream, ctx.config.detect_timeout).await {
        Ok((outcome, prefix)) => {
            let result = match &outcome {
                Outcome::Detected(Protocol::Http1) => DetectResult::Http1,
                Outcome::Detected(Protocol::Http2) => DetectResult::Http2,
                Outcome::Detected(Protocol::Tls { .. }) => DetectResult::Tls,
                Outcome::Detected(Protocol::Unknown) => DetectResult::Unknown,
                Outcome::Timeout => DetectResult::Timeout,
            };
            ctx.metrics.detected(result);
            debug!(client = %conn.client, orig_dst = %conn.orig_dst, ?outcome, "detected");
            match outcome {
                Outcome::Detected(protocol) => Some((protocol, prefix)),
                Outcome::Timeout => Some((Protocol::Unknown, prefix)),
            }
        }
        Err(error) => {
            debug!(client = %conn.client, %error, "client failed during detection");
            ctx.metrics.error(ConnError::Detect);
            None
        }
    }
}

/// Connects to `target` and forwards the client's stream to it, counting both sides
/// in the transport metrics and every failure in the error counter.
pub async fn forward(
    ctx: &Context,
    conn: Accepted,
    prefix: Vec<u8>,
    target: SocketAddr,
    src_tls: TlsStatus,
    dst_tls: TlsStatus,
) {
    let transport = &ctx.metrics.transport;
    let mut src = transport.open(Peer::Src, conn.orig_dst, src_tls);
    src.series().add_read(prefix.len());
    let server = match transport::connect(
        target,
        ctx.config.connect_timeout,
        ctx.config.connect_keepalive,
    )
    .await
    {
        Ok(server) => server,
        Err(error) => {
            debug!(client = %conn.client, %target, %error, "cannot connect");
            let (counted, errno) = match &error {
                ConnectError::Refused => (ConnError::ConnectRefused, "ECONNREFUSED"),
                ConnectError::TimedOut => (ConnError::ConnectTimeout, "ETIMEDOUT"),
                ConnectError::Other(e) => (ConnError::ConnectError, transport::errno_label(e)),
            };
            ctx.metrics.error(counted);
            src.set_errno(errno);
            // The client learns of the failure as a reset, as it would without a proxy.
            transport::reset_on_close(&conn.stream);
            return;
        }
    };
    let mut dst = transport.open(Peer::Dst, target, dst_tls);
    let result = tcp::forward(
        Side {
            stream: conn.stream,
            series: src.series(),
        },
        &prefix,
        Side {
            stream: server,
            series: dst.series(),
        },
    )
    .await;
    if let Err(failure) = result {
        debug!(client = %conn.client, %target, error = %failure.error, "forwarding failed");
        ctx.metrics.error(ConnError::Io);
        let errno = transport::errno_label(&failure.error);
        if failure.client_failed {
            src.set_errno(errno)
        } else {
            dst.set_errno(errno)
        }
    }
}

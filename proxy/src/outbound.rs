//! Outbound: the application's connections to the world, redirected to us by the
//! pod's OUTPUT rules.
//!
//! accept → original destination → refuse loops → detect → connect → forward.

use tracing::debug;

use crate::conn::{self, Context};
use crate::metrics::{ConnError, NoTlsReason, TlsStatus};

pub async fn handle(ctx: &Context, stream: tokio::net::TcpStream, client: std::net::SocketAddr) {
    let Some(mut conn) = conn::accept(ctx, stream, client) else {
        return;
    };
    // A connection straight to the outbound listener, or to loopback (never redirected
    // to us by the rules), would make the proxy connect to itself.
    if conn.orig_dst == conn.local || conn.orig_dst.ip().is_loopback() {
        debug!(client = %conn.client, orig_dst = %conn.orig_dst, "refusing a connection that would loop");
        ctx.metrics.error(ConnError::Loop);
        return;
    }
    let Some((_protocol, prefix)) = conn::detect(ctx, &mut conn).await else {
        return;
    };
    let target = conn.orig_dst;
    // Discovery (the mTLS issue) decides whether the target is meshed; until then
    // every destination is unmeshed.
    let src_tls = TlsStatus::NoIdentity(NoTlsReason::Loopback);
    let dst_tls = TlsStatus::NoIdentity(NoTlsReason::NotProvidedByServiceDiscovery);
    conn::forward(ctx, conn, prefix, target, src_tls, dst_tls).await;
}

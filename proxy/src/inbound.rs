//! Inbound: connections from the world to the application, redirected to us by the
//! pod's PREROUTING rules.
//!
//! accept → original destination → refuse direct connections → detect → connect to
//! the original destination (the pod's own address and the app's port) → forward.

use tracing::debug;

use crate::conn::{self, Context};
use crate::detect::Protocol;
use crate::metrics::{ConnError, NoTlsReason, TlsStatus};

pub async fn handle(ctx: &Context, stream: tokio::net::TcpStream, client: std::net::SocketAddr) {
    let Some(mut conn) = conn::accept(ctx, stream, client) else {
        return;
    };
    // A connection that dialled the inbound port itself was not redirected. With mTLS it
    // becomes Linkerd's "direct" (transport header) path; until then forwarding it
    // would connect the proxy to itself.
    if conn.orig_dst == conn.local {
        debug!(client = %conn.client, "refusing a direct connection to the inbound port");
        ctx.metrics.error(ConnError::Loop);
        return;
    }
    let Some((protocol, prefix)) = conn::detect(ctx, &mut conn).await else {
        return;
    };
    let src_tls = match protocol {
        // The application's own TLS: passed through untouched.
        Protocol::Tls { .. } => TlsStatus::Opaque,
        _ => TlsStatus::NoIdentity(NoTlsReason::NoTlsFromRemote),
    };
    let target = conn.orig_dst;
    conn::forward(
        ctx,
        conn,
        prefix,
        target,
        src_tls,
        TlsStatus::NoIdentity(NoTlsReason::Loopback),
    )
    .await;
}

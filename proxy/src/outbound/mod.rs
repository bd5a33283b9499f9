//! Outbound: the application's connections to the world, redirected to us by the
//! pod's OUTPUT rules.
//!
//! accept → original destination → refuse loops → discover → detect (unless opaque) →
//! connect → originate mTLS when the destination is meshed → forward. Detected HTTP
//! is served request by request instead (`http/`), over pooled connections; meshed
//! opaque connections ride a pooled carrier to the peer proxy (`tunnel.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::debug;

use crate::conn::{self, Context, MeshAlpn};
use crate::detect::Protocol;
use crate::http::{self, client::EndpointKey};
use crate::metrics::{ConnError, NoTlsReason, TlsStatus};
use crate::transport_header::TransportHeader;
use crate::tunnel::{self, Upstream};

pub async fn handle(ctx: &Arc<Context>, stream: tokio::net::TcpStream, client: SocketAddr) {
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
    let endpoint = ctx.discovery.resolve(conn.orig_dst).await_endpoint().await;
    let opaque = ctx.config.opaque_ports.contains(conn.orig_dst.port())
        || endpoint.as_ref().is_some_and(|e| e.opaque);
    let (protocol, prefix, already_read) = if opaque {
        ctx.metrics.detected(crate::metrics::DetectResult::Skipped);
        (Protocol::Unknown, Vec::new(), 0)
    } else {
        let Some((protocol, prefix)) = conn::detect(ctx, &mut conn.stream, conn.client).await
        else {
            return;
        };
        let len = prefix.len();
        (protocol, prefix, len)
    };
    let src_tls = TlsStatus::NoIdentity(NoTlsReason::Loopback);
    let client = conn::client(
        ctx,
        conn.stream,
        conn.client,
        conn.orig_dst,
        src_tls,
        already_read,
    );

    let peer_identity = endpoint.as_ref().and_then(|e| e.identity.clone());
    let peer_identity = peer_identity.filter(|_| ctx.identity.is_some());
    let peer_sni = endpoint
        .as_ref()
        .and_then(|e| e.server_name.clone())
        .or_else(|| peer_identity.clone());
    if matches!(protocol, Protocol::Http1 | Protocol::Http2) {
        let h2_upgrade = peer_identity.is_some() && endpoint.as_ref().is_some_and(|e| e.http2);
        let route = http::Route {
            endpoint: EndpointKey {
                target: conn.orig_dst,
                identity: peer_identity.clone(),
                server_name: peer_sni.clone(),
                // Recorded even when requests go on over HTTP/2: an Upgrade or
                // CONNECT stays HTTP/1 to the peer, and which request is one is
                // known only after its head was parsed.
                http1_case: protocol == Protocol::Http1,
            },
            side: http::Side::Outbound { h2_upgrade },
            tls: match &peer_identity {
                Some(identity) => TlsStatus::Established(Some(identity.clone())),
                None => TlsStatus::NoIdentity(NoTlsReason::NotProvidedByServiceDiscovery),
            },
        };
        return http::serve(ctx, client, prefix, protocol, route).await;
    }
    let (Some(identity), Some(sni)) = (peer_identity, peer_sni) else {
        let Some((client, server)) = conn::connect(ctx, client, conn.orig_dst).await else {
            return;
        };
        let tls = TlsStatus::NoIdentity(NoTlsReason::NotProvidedByServiceDiscovery);
        return conn::relay(ctx, client, &prefix, server, conn.orig_dst, tls).await;
    };
    // Meshed. Opaque traffic goes to the peer proxy's inbound port: on a stream of a
    // pooled carrier when the peer is Tandem, else with a transport header naming the
    // real port. Everything else goes to the original destination, where the peer's
    // rules hand it to its proxy.
    if let Some(endpoint) = endpoint.as_ref().filter(|_| opaque) {
        let peer = SocketAddr::new(conn.orig_dst.ip(), endpoint.inbound_port);
        let tls = TlsStatus::Established(Some(identity.clone()));
        return match tunnel::open(ctx, peer, &identity, &sni, conn.orig_dst.port()).await {
            Ok(Upstream::Stream(stream)) => conn::relay(ctx, client, &[], stream, peer, tls).await,
            Ok(Upstream::Classic(server)) => {
                let header = TransportHeader {
                    port: conn.orig_dst.port(),
                    name: None,
                    protocol: None,
                };
                conn::relay(ctx, client, &header.encode(), *server, peer, tls).await
            }
            Err((error, errno)) => {
                debug!(client = %client.addr, "refusing the client: no mesh connection to its destination");
                client.refuse(ctx, error, errno)
            }
        };
    }
    let target = conn.orig_dst;
    let Some((client, server)) = conn::connect(ctx, client, target).await else {
        return;
    };
    let Some((client, tls)) =
        conn::originate_tls(ctx, client, server, &identity, &sni, MeshAlpn::None).await
    else {
        return;
    };
    conn::relay(
        ctx,
        client,
        &prefix,
        tls,
        target,
        TlsStatus::Established(Some(identity)),
    )
    .await;
}

//! Opaque connections between proxies: Linkerd's transport header, which names the
//! real port of a connection sent to the peer proxy's inbound port
//! ([`transport_header`]), and Tandem's carriers, which carry such connections as
//! streams of one pooled mTLS connection per peer proxy ([`carrier`]).

pub mod carrier;
pub mod transport_header;

//! Opaque connections between proxies beyond Linkerd's transport header
//! (`mesh::transport_header`): Tandem's carriers, which carry such connections as
//! streams of one pooled mTLS connection per peer proxy ([`carrier`]).

pub mod carrier;

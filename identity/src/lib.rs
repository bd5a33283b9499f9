//! Tandem's identity: trust anchor and issuer tooling, the issuer service that
//! implements Linkerd's `io.linkerd.proxy.identity.Identity/Certify`, and the
//! proxy-side client that keeps a short-lived mTLS certificate fresh.
//!
//! The binary `tandem-identity` wraps [`ca`], [`check`] and [`service`]; the proxy
//! starts an [`IdentityConfig`]: the issuer client ([`client`]), a SPIFFE Workload
//! API client ([`spiffe`]) or certificate files ([`files`]).

pub mod auth;
pub mod ca;
pub mod check;
pub mod client;
pub mod duration;
pub mod files;
pub mod issuer;
pub mod metrics;
pub mod pem;
pub mod refresh;
pub mod service;
pub mod source;
pub mod spiffe;
pub mod tls;
pub mod tmpfs;
pub mod token_review;

pub use client::{spawn, ClientConfig, Credentials};
pub use metrics::IdentityMetrics;
pub use source::IdentityConfig;

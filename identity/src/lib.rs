//! Tandem's identity: the proxy-side certificate sources that keep a short-lived
//! mTLS certificate fresh, and (with the `issuer` feature) the trust anchor and
//! issuer tooling and the issuer service that implements Linkerd's
//! `io.linkerd.proxy.identity.Identity/Certify`.
//!
//! The proxy builds this crate without the `issuer` feature, so it compiles only
//! what a proxy runs: an [`IdentityConfig`] picks the issuer client ([`client`]), a
//! SPIFFE Workload API client ([`spiffe`]) or certificate files ([`files`]). The
//! binary `tandem-identity` wraps [`ca`], [`check`] and [`service`].
//!
//! [`env`] is the environment reader both programs share.

pub mod client;
pub mod env;
pub mod files;
pub mod metrics;
pub mod pem;
pub mod refresh;
pub mod source;
pub mod spiffe;
pub mod tls;
pub mod tmpfs;

#[cfg(feature = "issuer")]
pub mod auth;
#[cfg(feature = "issuer")]
pub mod ca;
#[cfg(feature = "issuer")]
pub mod check;
#[cfg(feature = "issuer")]
pub mod issuer;
#[cfg(feature = "issuer")]
pub mod service;
#[cfg(feature = "issuer")]
pub mod token_review;

pub use client::{spawn, ClientConfig, Credentials};
pub use metrics::IdentityMetrics;
pub use source::IdentityConfig;

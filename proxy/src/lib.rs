//! Tandem's proxy. The modules, in the order one connection meets them:
//!
//! - [`app`] binds the listeners and accepts the connection;
//! - [`inbound`] / [`outbound`] decide what to do with it ([`inbound::plan`],
//!   [`outbound::plan`]: pure functions, tested in tables) and carry that out with
//!   the steps below;
//! - [`net`]: original destination, detection, forwarding bytes, the connection
//!   error type; [`mesh`]: mTLS between proxies; [`opaque`]: the transport header
//!   and carriers; [`http`]: HTTP served request by request; [`discover`]: what the
//!   proxy knows about destinations;
//! - [`metrics`] counts it, and the admin server in [`ops`] serves the counts.
//!
//! [`config`] reads the environment; [`k8s`] holds the Kubernetes helpers that ship
//! in the same binary. `docs/ARCHITECTURE.md` explains the parts and the choices
//! behind them.

pub mod app;
pub mod config;
pub mod discover;
pub mod http;
pub mod inbound;
pub mod k8s;
pub mod mesh;
pub mod metrics;
pub mod net;
pub mod opaque;
pub mod ops;
pub mod outbound;

#[cfg(test)]
mod build_info;

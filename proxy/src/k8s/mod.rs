//! The Kubernetes helpers that ship in the proxy binary but stay outside the data
//! path: `tandem-proxy inject` ([`inject`]) and `tandem-proxy await`
//! ([`await_ready`]).

pub mod await_ready;
pub mod inject;

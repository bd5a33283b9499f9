//! Tandem's proxy. One connection's path, in the order it happens:
//!
//! - [`app`] accepts it on the inbound or outbound listener;
//! - [`inbound`] / [`outbound`] make the direction's decisions, calling the shared
//!   steps in [`conn`]: original destination ([`transport`]), protocol detection
//!   ([`detect`]), connect, and forwarding ([`tcp`]);
//! - [`metrics`] counts it, and [`admin`] serves the counts.
//!
//! `docs/ARCHITECTURE.md` explains the parts and the choices behind them.

pub mod admin;
pub mod app;
pub mod await_ready;
pub mod batched_writes;
pub mod config;
pub mod conn;
pub mod cores;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod inject;
pub mod log;
pub mod metrics;
pub mod outbound;
pub mod tcp;
pub mod tls;
pub mod transport;
pub mod transport_header;
pub mod tunnel;

//! The connection steps that know nothing of direction or mesh: accepting with the
//! original destination and connecting ([`socket`]), protocol detection ([`detect`]),
//! replaying what detection read ([`replay`]), forwarding a byte stream
//! ([`forward`]), gathering HTTP/2 writes ([`batched_writes`]), and the one error
//! type a connection's steps return ([`error`]).

pub mod batched_writes;
pub mod detect;
pub mod error;
pub mod forward;
pub mod replay;
pub mod socket;

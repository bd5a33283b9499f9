//! Running the proxy rather than proxying: the admin server ([`admin`]), the drain
//! signal connections watch ([`drain`]), worker-thread sizing ([`cores`]), logging
//! ([`log`]) and giving freed memory back ([`memory`]).

pub mod admin;
pub mod cores;
pub mod drain;
pub mod log;
pub mod memory;

//! What every component needs of the host's network: this host's own
//! addresses and name ([`host`]), the appliance's own listeners and whether
//! an address reaches one ([`listeners`]), and the per-source connection
//! slots that keep one client from taking every connection ([`sources`]),
//! and batched UDP receive and send (`recvmmsg`/`sendmmsg`, [`udp_batch`]).
//!
//! Leaves: nothing here knows a component.

pub mod host;
pub mod listeners;
pub mod sources;
pub mod udp_batch;

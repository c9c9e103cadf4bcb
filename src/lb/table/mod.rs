//! The routing table: which backend an HTTP request or a TCP port goes to. Made
//! from the watcher's view of Consul, never changed once published, and swapped
//! whole.
//!
//! ```text
//!  ServiceSpec per (service, datacenter) ──TableState──▶ RoutingTable ──ArcSwap──▶ proxy
//!    (passing instances + parsed tags)   (delta │ build)  route(host, path) ─▶ Destination
//!  Carryover (outlives every table) ───────┘         tcp_ports()       ─▶ listeners
//!                                                         Backend::pick()   ─▶ instance
//! ```
//!
//! The table's maps are persistent (`imbl`): [`TableState`] (in `delta.rs`) makes
//! the next table from the last one by a delta, the changed services' claims
//! out and in, so a change costs what it touches and the new table shares every
//! other entry with the old one. [`RoutingTable::build`] is the full build from
//! nothing, used for the first table, when the TCP listener ports move, for the
//! watcher's periodic re-sync, and as the reference the delta is checked against.
//!
//! `route` looks up, in order: the Host (exact names, then Fabio host+path prefixes,
//! then `svc.service.<dc>.<domain>` falling back to the local service), the path
//! prefixes (`haproxy_route`, host-less Fabio prefixes, longest wins), the landing
//! hosts, and otherwise gives up. Names are lower-cased at build time, so a request
//! costs a few hash lookups on slices of its Host and path; only a Host with
//! upper-case letters is copied.
//!
//! Conflicts (two services claiming one host, path or port) go to the service whose
//! name sorts first, and are reported as warnings, so the outcome never depends on
//! the order Consul answered in.
//!
//! What Consul says is checked here against the [`BackendPolicy`](crate::lb::policy::BackendPolicy) (names, own
//! listeners, backend networks, TCP ports): a refused service, instance or port
//! never enters the table, so nothing that reads the table can connect to it.
//!
//! What must outlive a rebuild (ejections, check verdicts, in-flight counts) lives in
//! [`InstanceState`], shared by address through the [`Carryover`]. The
//! round-robin position is per backend, and a service whose spec is unchanged
//! keeps its backend from table to table: only a changed service restarts its
//! sequence, which skews its weighted split for the few requests around the swap.
//!
//! The files, from what is made first to what reads it:
//!
//! ```text
//!  spec.rs       ServiceSpec, InstanceSpec, TableConfig: what the table is made from
//!  carryover.rs  Carryover, InstanceState: what outlives every table (by address, by route)
//!  backend.rs    Backend, BackendInstance: a service's instances and the pick
//!  prefixes.rs   PrefixMap, HostRoutes: path prefixes, longest segment match
//!  claims.rs     Part, Claim, Key, SpecKey, Claimants: what a spec claims, who wins
//!  routing.rs    RoutingTable, Destination: the table and its lookups (route, tcp_ports)
//!  compile.rs    compile(spec) ─▶ Part; RoutingTable::build, the full build
//!  delta.rs      TableState: the next table from the last one by a delta
//! ```

mod backend;
mod carryover;
mod claims;
mod compile;
mod delta;
mod prefixes;
mod routing;
mod spec;
#[cfg(test)]
mod tests;

pub use backend::{Backend, BackendInstance};
pub use carryover::{Carryover, CheckResult, InstanceState, MAX_RETIRED_ROUTES};
pub use delta::{Applied, RouteDifferences, TableState};
pub use routing::{Destination, RoutingTable, other_datacenter_name};
pub use spec::{InstanceSpec, ServiceSpec, TableConfig};

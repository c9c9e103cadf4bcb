//! Wayfinder's integration tests, one binary (see harness.rs for the real
//! components they run against).

mod harness;

mod dns_consul; // *.consul forwarded to a real Consul agent: freshness, failover, truncation

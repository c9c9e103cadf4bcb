//! The register component (issue 19, being built): the host's containers
//! enter and leave Consul by themselves from their `SERVICE_*` environment
//! and labels, as registrator did for PanteraS.
//!
//! Landed so far: [`conventions`], which turns what a container says about
//! itself into one service definition per port, with every value checked
//! (container env and labels are untrusted input). The Docker event loop,
//! the reconciliation with Consul and the component itself come next.

pub mod conventions;

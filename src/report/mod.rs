//! How a component shows itself to people and scrapers: one Prometheus text
//! writer ([`prometheus`]), one latency histogram ([`histogram`]) and one set
//! of HTML helpers ([`html`]) that every component and the supervisor use.
//!
//! ```text
//!  component counters (atomics, owned by each component)
//!      ──Component::metrics(&mut prometheus::Writer)──▶ /metrics
//!      ──Component::page(&mut html::PageParts)────────▶ the status page
//! ```
//!
//! A leaf: nothing here knows any component.

pub mod histogram;
pub mod html;
pub mod prometheus;
pub mod throttle;
pub mod timeline;

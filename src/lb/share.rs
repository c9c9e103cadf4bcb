//! Who holds an instance's maxconn slots: in-flight requests per client
//! source, so one client address (and so one h2 connection, whose streams
//! all come from one address) cannot take more than its share of an instance.
//!
//! ```text
//!  proxy::try_reserve ──Holders::try_take(source, cap)──▶ slot counted for the source
//!                                  └─ at cap: the instance is skipped for this client
//!  the request's response body done (or dropped) ──Holders::give_back(source)
//! ```
//!
//! A source is what [`crate::net::sources::source_of`] says (an IPv4 address,
//! an IPv6 /64), as for the connection caps. An entry exists only while its
//! count is above 0, so the map is bounded by the instance's in-flight requests
//! (at most its maxconn). One short lock per reservation and per release; it is
//! skipped entirely when the share is not smaller than maxconn.

use std::collections::HashMap;
use std::net::IpAddr;

use parking_lot::Mutex;

/// In-flight requests per client source on one instance.
#[derive(Debug, Default)]
pub struct Holders {
    counts: Mutex<HashMap<IpAddr, u32>>,
}

/// The most slots of one instance one client source may hold: `percent` of
/// `maxconn`, at least 1. `None` when that is not below `maxconn` (the share
/// would limit nothing, and nothing is counted).
pub fn share_cap(maxconn: usize, percent: u8) -> Option<usize> {
    let cap = (maxconn.saturating_mul(usize::from(percent)) / 100).max(1);
    (cap < maxconn).then_some(cap)
}

impl Holders {
    /// Counts one more slot for `source`, unless it already holds `cap`.
    pub fn try_take(&self, source: IpAddr, cap: usize) -> bool {
        let mut counts = self.counts.lock();
        let count = counts.entry(source).or_insert(0);
        if *count as usize >= cap {
            return false;
        }
        *count += 1;
        true
    }

    /// Gives back one slot of `source`.
    pub fn give_back(&self, source: IpAddr) {
        let mut counts = self.counts.lock();
        if let Some(count) = counts.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&source);
            }
        }
    }

    /// Slots `source` holds now.
    pub fn held_by(&self, source: IpAddr) -> usize {
        self.counts.lock().get(&source).map_or(0, |c| *c as usize)
    }

    /// Sources holding a slot now.
    pub fn sources(&self) -> usize {
        self.counts.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_a_share_of_maxconn_and_off_when_it_limits_nothing() {
        assert_eq!(share_cap(128, 50), Some(64));
        assert_eq!(share_cap(10, 25), Some(2));
        assert_eq!(share_cap(3, 10), Some(1), "at least one slot");
        assert_eq!(share_cap(1, 50), None, "one slot: the share cannot be below it");
        assert_eq!(share_cap(128, 100), None);
    }

    #[test]
    fn a_source_holds_at_most_its_cap_and_entries_go_with_their_last_slot() {
        let h = Holders::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(h.try_take(a, 2) && h.try_take(a, 2));
        assert!(!h.try_take(a, 2), "over the cap");
        assert!(h.try_take(b, 2), "another source is not affected");
        assert_eq!((h.held_by(a), h.sources()), (2, 2));
        h.give_back(a);
        assert!(h.try_take(a, 2), "a slot given back can be taken again");
        for _ in 0..2 {
            h.give_back(a);
        }
        h.give_back(b);
        assert_eq!(h.sources(), 0, "no entry outlives its slots");
        h.give_back(a);
        assert_eq!(h.sources(), 0, "an extra give-back creates nothing");
    }
}

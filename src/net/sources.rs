//! Connections per client source: one map of counts, one slot per open
//! connection, given back when the slot drops. Used by every listener that
//! caps a single client (the lb's HTTP, HTTPS and `haproxy_tcp` listeners,
//! the dns's TCP listener).
//!
//! A source is an IPv4 address (also when IPv4-mapped in IPv6) or an IPv6
//! /64: one host or one site typically holds a whole /64, and could
//! otherwise pick a fresh address per connection. An entry exists only while
//! its count is above 0, so the map is bounded by the open connections. One
//! lock per accept and per close, never per request.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use parking_lot::Mutex;

/// Open connections per source.
#[derive(Debug, Default)]
pub struct Sources {
    counts: Mutex<HashMap<IpAddr, u32>>,
}

/// One open connection's place in [`Sources`]; dropping it gives it back.
#[derive(Debug)]
pub struct SourceSlot {
    sources: Arc<Sources>,
    key: IpAddr,
}

impl Sources {
    /// A slot for a connection from `ip`, unless its source already holds `limit`.
    pub fn take(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<SourceSlot> {
        let key = source_of(ip);
        let mut counts = self.counts.lock();
        let count = counts.entry(key).or_insert(0);
        if *count as usize >= limit {
            if *count == 0 {
                counts.remove(&key);
            }
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            sources: self.clone(),
            key,
        })
    }

    /// Sources with a connection open now.
    pub fn len(&self) -> usize {
        self.counts.lock().len()
    }

    /// True when no source has a connection open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut counts = self.sources.counts.lock();
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// What counts as one source: an IPv4 address (also when v4-mapped), an IPv6 /64.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_64() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(source_of(v4), v4);
        assert_eq!(source_of("::ffff:10.1.2.3".parse().unwrap()), v4);
        let a = source_of("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = source_of("2001:db8:1:2:bbbb::2".parse().unwrap());
        assert_eq!(a, b);
        assert_eq!(a, "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_ne!(a, source_of("2001:db8:1:3::1".parse().unwrap()));
    }

    #[test]
    fn a_source_holds_at_most_its_limit_and_gives_slots_back() {
        let sources = Arc::new(Sources::default());
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::ffff".parse().unwrap();
        let first = sources.take(a, 2).expect("first");
        let second = sources.take(same_64, 2).expect("the /64 is one source");
        assert!(sources.take(a, 2).is_none(), "over the limit");
        assert!(sources.take("192.0.2.1".parse().unwrap(), 0).is_none());
        assert_eq!(sources.len(), 1, "a refused source leaves no entry");
        drop((first, second));
        assert!(sources.is_empty(), "entries go with their last slot");
        assert_eq!(
            source_of("::ffff:192.0.2.7".parse().unwrap()),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
    }
}

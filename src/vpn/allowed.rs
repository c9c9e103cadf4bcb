//! The device-wide cryptokey routing table: which peer owns an address.
//!
//! One table for all peers together, longest prefix first. It answers both
//! questions of the packet path with the same lookup: "to which peer does this
//! TUN packet go?" (destination) and "may this peer send from that source?" (the
//! owner of the inner source must be the sending peer, so no peer can speak for
//! another whose prefix is more specific: boringtun's per-peer check allows that).
//!
//! Storage is one hash map per prefix length in use, probed from the longest: a
//! lookup is one hash probe per distinct prefix length (usually one, /32).

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// Longest-prefix table from networks to `T`.
#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: Vec<(u8, HashMap<u32, T>)>,
    v6: Vec<(u8, HashMap<u128, T>)>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        Self {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

fn mask4(bits: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        bits & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask6(bits: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        bits & (u128::MAX << (128 - u32::from(len)))
    }
}

impl<T> AllowedIps<T> {
    /// Maps `net` to `value`, replacing an earlier owner of exactly `net`.
    pub fn insert(&mut self, net: IpNet, value: T) {
        match net {
            IpNet::V4(n) => {
                let len = n.prefix_len();
                let key = mask4(u32::from(n.addr()), len);
                let at = match self.v4.iter().position(|(l, _)| *l == len) {
                    Some(at) => at,
                    None => {
                        self.v4.push((len, HashMap::new()));
                        // Longest prefixes are probed first.
                        self.v4.sort_by_key(|e| std::cmp::Reverse(e.0));
                        self.v4.iter().position(|(l, _)| *l == len).expect("just added")
                    }
                };
                self.v4[at].1.insert(key, value);
            }
            IpNet::V6(n) => {
                let len = n.prefix_len();
                let key = mask6(u128::from(n.addr()), len);
                let at = match self.v6.iter().position(|(l, _)| *l == len) {
                    Some(at) => at,
                    None => {
                        self.v6.push((len, HashMap::new()));
                        self.v6.sort_by_key(|e| std::cmp::Reverse(e.0));
                        self.v6.iter().position(|(l, _)| *l == len).expect("just added")
                    }
                };
                self.v6[at].1.insert(key, value);
            }
        }
    }

    /// The owner of the longest prefix containing `ip`.
    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Option<&T> {
        match ip {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                self.v4.iter().find_map(|(len, map)| map.get(&mask4(bits, *len)))
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                self.v6.iter().find_map(|(len, map)| map.get(&mask6(bits, *len)))
            }
        }
    }

    /// Number of networks.
    pub fn len(&self) -> usize {
        self.v4.iter().map(|(_, m)| m.len()).sum::<usize>() + self.v6.iter().map(|(_, m)| m.len()).sum::<usize>()
    }

    /// True when no network is mapped.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_across_peers() {
        let mut t = AllowedIps::default();
        t.insert("10.0.0.0/24".parse().unwrap(), "a");
        t.insert("10.0.0.5/32".parse().unwrap(), "b");
        t.insert("0.0.0.0/0".parse().unwrap(), "default");
        t.insert("fd00::/64".parse().unwrap(), "v6");
        assert_eq!(t.lookup(ip("10.0.0.5")), Some(&"b"), "b's /32 beats a's /24");
        assert_eq!(t.lookup(ip("10.0.0.6")), Some(&"a"));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&"default"));
        assert_eq!(t.lookup(ip("fd00::1")), Some(&"v6"));
        assert_eq!(t.lookup(ip("fd01::1")), None);
        assert_eq!(t.len(), 4);
        // Host bits in the inserted network do not matter.
        t.insert("10.0.0.77/24".parse().unwrap(), "a2");
        assert_eq!(t.lookup(ip("10.0.0.6")), Some(&"a2"));
    }
}

//! A bounded "seen" set for ephemeral messages, keyed by sender, session, count and a hash
//! of the payload.
//!
//! Ephemeral messages are flooded to every peer of a document, so in a mesh the same
//! message can arrive by several paths; forwarding it again would loop. The set keeps the
//! newest `cap` keys (insertion order), so memory stays bounded however chatty peers are.
//!
//! The payload's hash is part of the key because sender, session and count are only what a
//! message claims: a peer that sent another peer's sender and session with the counts it
//! will use next would otherwise make every relay drop that peer's real messages as
//! duplicates. The same message arriving by two paths has the same payload.

use std::collections::{HashSet, VecDeque};

use crate::id::PeerId;

type Key = (String, String, u64, [u8; 16]);

pub(super) struct Dedup {
    cap: usize,
    seen: HashSet<Key>,
    order: VecDeque<Key>,
}

impl Dedup {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            seen: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// True when the key is new (and remembers it).
    pub fn insert(&mut self, sender: &PeerId, session: &str, count: u64, data: &[u8]) -> bool {
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&blake3::hash(data).as_bytes()[..16]);
        let key = (sender.0.clone(), session.to_string(), count, digest);
        if self.seen.contains(&key) {
            return false;
        }
        if self.order.len() >= self.cap {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(key.clone());
        self.order.push_back(key);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_dropped_and_memory_is_bounded() {
        let mut d = Dedup::new(2);
        let p = PeerId::new("a");
        assert!(d.insert(&p, "s", 1, b"x"));
        assert!(!d.insert(&p, "s", 1, b"x"));
        assert!(d.insert(&p, "s", 2, b"x"));
        assert!(d.insert(&p, "t", 1, b"x"));
        assert_eq!(d.seen.len(), 2);
        // the oldest key was forgotten
        assert!(d.insert(&p, "s", 1, b"x"));
    }

    #[test]
    fn a_forged_count_does_not_hide_the_real_message() {
        let mut d = Dedup::new(16);
        let victim = PeerId::new("victim");
        // Another peer claims the victim's sender, session and next count first.
        assert!(d.insert(&victim, "s", 7, b"forged"));
        // The victim's real message with that count still goes through, once.
        assert!(d.insert(&victim, "s", 7, b"cursor at 12"));
        assert!(!d.insert(&victim, "s", 7, b"cursor at 12"));
    }
}

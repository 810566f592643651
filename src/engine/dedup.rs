//! A bounded "seen" set for ephemeral messages, keyed by sender, session and count.
//!
//! Ephemeral messages are flooded to every peer of a document, so in a mesh the same
//! message can arrive by several paths; forwarding it again would loop. The set keeps the
//! newest `cap` keys (insertion order), so memory stays bounded however chatty peers are.

use std::collections::{HashSet, VecDeque};

use crate::id::PeerId;

pub(super) struct Dedup {
    cap: usize,
    seen: HashSet<(String, String, u64)>,
    order: VecDeque<(String, String, u64)>,
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
    pub fn insert(&mut self, sender: &PeerId, session: &str, count: u64) -> bool {
        let key = (sender.0.clone(), session.to_string(), count);
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
        assert!(d.insert(&p, "s", 1));
        assert!(!d.insert(&p, "s", 1));
        assert!(d.insert(&p, "s", 2));
        assert!(d.insert(&p, "t", 1));
        assert_eq!(d.seen.len(), 2);
        // the oldest key was forgotten
        assert!(d.insert(&p, "s", 1));
    }
}

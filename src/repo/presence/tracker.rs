//! The presence state machine, without I/O: `(now, event) -> messages to send`.
//!
//! Everything time-dependent (when to heartbeat, when a peer has gone silent for too long,
//! when to answer a newcomer) lives here, driven by a `now` the caller passes in, so it is
//! unit-tested by stepping a number instead of sleeping. The tokio task in the parent module
//! only feeds it events and sleeps until [`Tracker::next_deadline`].
//!
//! Rules:
//! - Our state is published at once when it changes: as an `update` of one key when exactly
//!   one key changed, as a `snapshot` otherwise. Setting the same state again sends nothing.
//! - Every `heartbeat` period we send our whole state again (a `snapshot`): ephemeral
//!   messages are fire-and-forget, so a peer that missed one, or joined after it, catches up
//!   within one period. A snapshot sent for another reason restarts the period; an `update`
//!   does not (a cursor moving all the time must not hold back the state that heals losses).
//! - A peer is known once it sent us a state (`snapshot` or `update`); a `heartbeat` from an
//!   unknown peer tells us nothing of its state and adds nothing.
//! - Hearing from a peer we did not know (any presence message), or a new network link for
//!   the document, schedules one `snapshot` after `announce_delay` so the newcomer learns our
//!   state without waiting for a heartbeat; several newcomers in that window share it.
//! - A peer silent for `ttl` expires; a `goodbye` removes it at once.
//! - At most `max_peers` peers are tracked: sender ids are whatever the network says, and a
//!   misbehaving client inventing new ones must not grow our memory without bound. Messages
//!   from further newcomers are dropped (and not answered) until some peer goes.
//! - [`Tracker::leave`] returns our `goodbye`; a tracker that left sends and tracks nothing.

use std::collections::BTreeMap;

use crate::engine::Millis;
use crate::id::PeerId;

use super::wire::{StateMap, Wire};

/// Timings of a tracker, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub heartbeat_ms: u64,
    pub ttl_ms: u64,
    pub announce_delay_ms: u64,
    pub max_peers: usize,
}

/// What we know of one remote peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerEntry {
    pub state: StateMap,
    /// When we last heard from it (any presence message).
    pub last_seen: Millis,
    /// When its state last changed.
    pub last_active: Millis,
    /// Bumped on every state change (lets a caller re-decode only what changed).
    pub version: u64,
}

/// Why a peer left the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// It said goodbye.
    Left,
    /// Silent for longer than the TTL.
    Expired,
}

/// The outcome of one call: messages to broadcast (in order) and what happened to the set.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Step {
    pub send: Vec<Wire>,
    /// Peers added or whose state changed.
    pub changed: Vec<PeerId>,
    pub gone: Vec<(PeerId, Gone)>,
}

impl Step {
    /// Whether the peer set or a peer's state changed.
    pub fn set_changed(&self) -> bool {
        !self.changed.is_empty() || !self.gone.is_empty()
    }
}

/// Our presence on one document and what we know of the other peers'.
#[derive(Debug)]
pub struct Tracker {
    me: PeerId,
    timing: Timing,
    local: StateMap,
    peers: BTreeMap<PeerId, PeerEntry>,
    next_heartbeat: Millis,
    announce_at: Option<Millis>,
    left: bool,
}

impl Tracker {
    /// Start with `initial` as our state; the returned step publishes it.
    pub fn start(me: PeerId, timing: Timing, now: Millis, initial: StateMap) -> (Self, Step) {
        let mut t = Tracker {
            me,
            timing,
            local: initial,
            peers: BTreeMap::new(),
            next_heartbeat: now,
            announce_at: None,
            left: false,
        };
        let step = Step {
            send: vec![t.snapshot(now)],
            ..Step::default()
        };
        (t, step)
    }

    pub fn local(&self) -> &StateMap {
        &self.local
    }

    pub fn peers(&self) -> &BTreeMap<PeerId, PeerEntry> {
        &self.peers
    }

    /// Replace our state; publishes what changed.
    pub fn set_local(&mut self, now: Millis, state: StateMap) -> Step {
        if self.left || state == self.local {
            return Step::default();
        }
        let removed = self.local.keys().any(|k| !state.contains_key(k));
        let mut changed = state
            .iter()
            .filter(|(k, v)| self.local.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()));
        let single = match (removed, changed.next(), changed.next()) {
            (false, Some(one), None) => Some(one),
            _ => None,
        };
        self.local = state;
        let msg = match single {
            Some((channel, value)) => Wire::Update { channel, value },
            None => self.snapshot(now),
        };
        Step {
            send: vec![msg],
            ..Step::default()
        }
    }

    /// A presence message from `from`.
    pub fn receive(&mut self, now: Millis, from: &PeerId, msg: Wire) -> Step {
        let mut step = Step::default();
        if self.left || *from == self.me {
            return step;
        }
        let known = self.peers.contains_key(from);
        if !known && self.peers.len() >= self.timing.max_peers {
            return step;
        }
        if !known && msg != Wire::Goodbye {
            self.schedule_announce(now);
        }
        match msg {
            Wire::Heartbeat => {
                if let Some(p) = self.peers.get_mut(from) {
                    p.last_seen = now;
                }
            }
            Wire::Goodbye => {
                if self.peers.remove(from).is_some() {
                    step.gone.push((from.clone(), Gone::Left));
                }
            }
            Wire::Snapshot(state) => self.merge(now, from, &mut step, |s| {
                if *s == state {
                    false
                } else {
                    *s = state;
                    true
                }
            }),
            Wire::Update { channel, value } => self.merge(now, from, &mut step, |s| {
                if s.get(&channel) == Some(&value) {
                    false
                } else {
                    s.insert(channel, value);
                    true
                }
            }),
        }
        step
    }

    /// The network gained a link for this document: tell whoever is behind it who we are.
    pub fn link_up(&mut self, now: Millis) {
        if !self.left {
            self.schedule_announce(now);
        }
    }

    /// Do what is due at `now`: announcement, heartbeat, expiry.
    pub fn tick(&mut self, now: Millis) -> Step {
        let mut step = Step::default();
        if self.left {
            return step;
        }
        let announce_due = self.announce_at.is_some_and(|at| at <= now);
        if announce_due || self.next_heartbeat <= now {
            step.send.push(self.snapshot(now));
        }
        let ttl = self.timing.ttl_ms;
        let expired: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.last_seen.plus(ttl) <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.peers.remove(&id);
            step.gone.push((id, Gone::Expired));
        }
        step
    }

    /// When [`Tracker::tick`] next has something to do (`None` after leaving).
    pub fn next_deadline(&self) -> Option<Millis> {
        if self.left {
            return None;
        }
        let expiry = self
            .peers
            .values()
            .map(|p| p.last_seen.plus(self.timing.ttl_ms))
            .min();
        [Some(self.next_heartbeat), self.announce_at, expiry]
            .into_iter()
            .flatten()
            .min()
    }

    /// Leave: our goodbye, and every peer forgotten.
    pub fn leave(&mut self) -> Step {
        if self.left {
            return Step::default();
        }
        self.left = true;
        self.announce_at = None;
        let gone = std::mem::take(&mut self.peers)
            .into_keys()
            .map(|id| (id, Gone::Left))
            .collect();
        Step {
            send: vec![Wire::Goodbye],
            changed: Vec::new(),
            gone,
        }
    }

    pub fn has_left(&self) -> bool {
        self.left
    }

    /// Our whole state as a message; restarts the heartbeat period and covers any pending
    /// announcement.
    fn snapshot(&mut self, now: Millis) -> Wire {
        self.next_heartbeat = now.plus(self.timing.heartbeat_ms);
        self.announce_at = None;
        Wire::Snapshot(self.local.clone())
    }

    fn schedule_announce(&mut self, now: Millis) {
        if self.announce_at.is_none() {
            self.announce_at = Some(now.plus(self.timing.announce_delay_ms));
        }
    }

    /// Apply `f` to `from`'s state (a new peer starts empty); records a change if `f` says so.
    fn merge(
        &mut self,
        now: Millis,
        from: &PeerId,
        step: &mut Step,
        f: impl FnOnce(&mut StateMap) -> bool,
    ) {
        let mut is_new = false;
        let entry = self.peers.entry(from.clone()).or_insert_with(|| {
            is_new = true;
            PeerEntry {
                state: StateMap::new(),
                last_seen: now,
                last_active: now,
                version: 0,
            }
        });
        entry.last_seen = now;
        if f(&mut entry.state) || is_new {
            entry.last_active = now;
            entry.version += 1;
            step.changed.push(from.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciborium::Value;

    const T: Timing = Timing {
        heartbeat_ms: 1_000,
        ttl_ms: 3_000,
        announce_delay_ms: 100,
        max_peers: 3,
    };

    fn state(kv: &[(&str, i64)]) -> StateMap {
        kv.iter()
            .map(|(k, v)| (k.to_string(), Value::Integer((*v).into())))
            .collect()
    }

    fn me() -> PeerId {
        PeerId::new("me")
    }

    fn bob() -> PeerId {
        PeerId::new("bob")
    }

    fn start() -> Tracker {
        let (t, step) = Tracker::start(me(), T, Millis(0), state(&[("cursor", 0), ("color", 1)]));
        assert_eq!(
            step.send,
            vec![Wire::Snapshot(state(&[("cursor", 0), ("color", 1)]))]
        );
        t
    }

    #[test]
    fn heartbeats_resend_the_state_each_period_and_a_snapshot_restarts_it() {
        let mut t = start();
        assert_eq!(t.next_deadline(), Some(Millis(1_000)));
        assert!(t.tick(Millis(999)).send.is_empty());
        let s = t.tick(Millis(1_000));
        assert_eq!(s.send, vec![Wire::Snapshot(t.local().clone())]);
        assert_eq!(t.next_deadline(), Some(Millis(2_000)));
        // A snapshot at 1,500 (two keys changed) pushes the next heartbeat to 2,500.
        t.set_local(Millis(1_500), state(&[("cursor", 4), ("color", 2)]));
        assert!(t.tick(Millis(2_000)).send.is_empty());
        assert_eq!(t.next_deadline(), Some(Millis(2_500)));
        assert_eq!(t.tick(Millis(2_500)).send.len(), 1);
        // Updates (one key) do not: the heartbeat at 3,500 carries the whole new state.
        for (i, now) in [2_600u64, 3_000, 3_400].into_iter().enumerate() {
            let s = t.set_local(
                Millis(now),
                state(&[("cursor", 10 + i as i64), ("color", 2)]),
            );
            assert!(matches!(&s.send[..], [Wire::Update { .. }]));
        }
        assert_eq!(t.next_deadline(), Some(Millis(3_500)));
        assert_eq!(
            t.tick(Millis(3_500)).send,
            vec![Wire::Snapshot(state(&[("cursor", 12), ("color", 2)]))]
        );
    }

    #[test]
    fn one_changed_key_is_an_update_more_is_a_snapshot_nothing_is_silence() {
        let mut t = start();
        let s = t.set_local(Millis(10), state(&[("cursor", 5), ("color", 1)]));
        assert_eq!(
            s.send,
            vec![Wire::Update {
                channel: "cursor".into(),
                value: Value::Integer(5.into())
            }]
        );
        let s = t.set_local(Millis(20), state(&[("cursor", 5), ("color", 1)]));
        assert!(s.send.is_empty(), "same state again sends nothing");
        let s = t.set_local(Millis(30), state(&[("cursor", 6), ("color", 2)]));
        assert_eq!(
            s.send,
            vec![Wire::Snapshot(state(&[("cursor", 6), ("color", 2)]))]
        );
        // A removed key needs the whole state (an update cannot remove).
        let s = t.set_local(Millis(40), state(&[("cursor", 6)]));
        assert_eq!(s.send, vec![Wire::Snapshot(state(&[("cursor", 6)]))]);
        // A new key alone is an update.
        let s = t.set_local(Millis(50), state(&[("cursor", 6), ("user", 9)]));
        assert!(matches!(&s.send[..], [Wire::Update { channel, .. }] if channel == "user"));
    }

    #[test]
    fn peers_appear_update_and_are_answered_once() {
        let mut t = start();
        let s = t.receive(Millis(100), &bob(), Wire::Snapshot(state(&[("cursor", 1)])));
        assert_eq!(s.changed, vec![bob()]);
        assert!(s.send.is_empty(), "the answer waits for the announce delay");
        assert_eq!(t.next_deadline(), Some(Millis(200)));
        let s = t.tick(Millis(200));
        assert_eq!(s.send, vec![Wire::Snapshot(t.local().clone())]);
        // Known now: no second announcement.
        t.receive(Millis(300), &bob(), Wire::Heartbeat);
        assert_eq!(t.next_deadline(), Some(Millis(1_200)));

        let s = t.receive(
            Millis(400),
            &bob(),
            Wire::Update {
                channel: "cursor".into(),
                value: Value::Integer(2.into()),
            },
        );
        assert_eq!(s.changed, vec![bob()]);
        let p = &t.peers()[&bob()];
        assert_eq!(p.state, state(&[("cursor", 2)]));
        assert_eq!(
            (p.last_seen, p.last_active, p.version),
            (Millis(400), Millis(400), 2)
        );

        // The same state again (a heartbeat snapshot): seen, not active, no change.
        let s = t.receive(Millis(900), &bob(), Wire::Snapshot(state(&[("cursor", 2)])));
        assert!(!s.set_changed());
        let p = &t.peers()[&bob()];
        assert_eq!(
            (p.last_seen, p.last_active, p.version),
            (Millis(900), Millis(400), 2)
        );

        // A snapshot replaces the state (keys it lacks are gone).
        t.receive(Millis(950), &bob(), Wire::Snapshot(state(&[("color", 3)])));
        assert_eq!(t.peers()[&bob()].state, state(&[("color", 3)]));
    }

    #[test]
    fn an_update_from_a_stranger_starts_its_state() {
        let mut t = start();
        let s = t.receive(
            Millis(5),
            &bob(),
            Wire::Update {
                channel: "cursor".into(),
                value: Value::Integer(8.into()),
            },
        );
        assert_eq!(s.changed, vec![bob()]);
        assert_eq!(t.peers()[&bob()].state, state(&[("cursor", 8)]));
    }

    #[test]
    fn a_heartbeat_from_a_stranger_adds_nothing_but_we_announce_ourselves() {
        let mut t = start();
        let s = t.receive(Millis(10), &bob(), Wire::Heartbeat);
        assert!(!s.set_changed());
        assert!(t.peers().is_empty());
        assert_eq!(t.next_deadline(), Some(Millis(110)));
        assert_eq!(t.tick(Millis(110)).send.len(), 1);
    }

    #[test]
    fn silent_peers_expire_after_the_ttl_and_heard_ones_stay() {
        let mut t = start();
        let carol = PeerId::new("carol");
        t.receive(Millis(0), &bob(), Wire::Snapshot(state(&[("c", 1)])));
        t.receive(Millis(500), &carol, Wire::Snapshot(state(&[("c", 2)])));
        // bob keeps heartbeating, carol goes silent at 500.
        t.receive(Millis(2_500), &bob(), Wire::Heartbeat);
        assert!(t.tick(Millis(3_499)).gone.is_empty());
        assert_eq!(t.next_deadline(), Some(Millis(3_500)));
        let s = t.tick(Millis(3_500));
        assert_eq!(s.gone, vec![(carol.clone(), Gone::Expired)]);
        assert!(t.peers().contains_key(&bob()));
        let s = t.tick(Millis(5_500));
        assert_eq!(s.gone, vec![(bob(), Gone::Expired)]);
        assert!(t.peers().is_empty());
        // A peer that comes back after expiring is a newcomer again.
        let s = t.receive(Millis(6_000), &carol, Wire::Snapshot(state(&[("c", 2)])));
        assert_eq!(s.changed, vec![carol]);
    }

    #[test]
    fn goodbye_removes_at_once_and_leaving_stops_everything() {
        let mut t = start();
        t.receive(Millis(0), &bob(), Wire::Snapshot(state(&[("c", 1)])));
        let s = t.receive(Millis(10), &bob(), Wire::Goodbye);
        assert_eq!(s.gone, vec![(bob(), Gone::Left)]);
        assert!(t.peers().is_empty());
        // A goodbye from a stranger changes nothing, and is not answered.
        t.tick(Millis(100)); // the answer owed to bob's arrival
        assert!(!t.receive(Millis(120), &bob(), Wire::Goodbye).set_changed());
        assert_eq!(t.next_deadline(), Some(Millis(1_100)));

        t.receive(Millis(130), &bob(), Wire::Snapshot(state(&[("c", 1)])));
        let s = t.leave();
        assert_eq!(s.send, vec![Wire::Goodbye]);
        assert_eq!(s.gone, vec![(bob(), Gone::Left)]);
        assert!(t.has_left());
        assert_eq!(t.next_deadline(), None);
        assert!(t.tick(Millis(10_000)).send.is_empty());
        assert!(t
            .set_local(Millis(10_001), state(&[("c", 9)]))
            .send
            .is_empty());
        assert!(!t
            .receive(Millis(10_002), &bob(), Wire::Snapshot(state(&[])))
            .set_changed());
        assert!(t.leave().send.is_empty(), "goodbye is said once");
    }

    #[test]
    fn our_own_messages_echoed_back_are_ignored() {
        let mut t = start();
        let s = t.receive(Millis(10), &me(), Wire::Snapshot(state(&[("c", 1)])));
        assert!(!s.set_changed());
        assert!(t.peers().is_empty());
        assert_eq!(
            t.next_deadline(),
            Some(Millis(1_000)),
            "no announcement either"
        );
    }

    #[test]
    fn a_new_link_schedules_one_announcement_shared_by_newcomers() {
        let mut t = start();
        t.link_up(Millis(50));
        t.receive(Millis(80), &bob(), Wire::Snapshot(state(&[])));
        assert_eq!(t.next_deadline(), Some(Millis(150)));
        assert_eq!(t.tick(Millis(150)).send.len(), 1);
        assert_eq!(t.next_deadline(), Some(Millis(1_150)));
    }

    #[test]
    fn newcomers_beyond_the_cap_are_dropped_until_a_peer_goes() {
        let mut t = start();
        let p = |i: u32| PeerId::new(format!("p{i}"));
        for i in 0..3 {
            t.receive(Millis(0), &p(i), Wire::Snapshot(state(&[("c", 1)])));
        }
        t.tick(Millis(100));
        let s = t.receive(Millis(200), &p(3), Wire::Snapshot(state(&[("c", 1)])));
        assert!(!s.set_changed());
        assert_eq!(t.peers().len(), 3);
        assert_eq!(
            t.next_deadline(),
            Some(Millis(1_100)),
            "no answer to the dropped one"
        );
        // Known peers still update.
        let s = t.receive(Millis(300), &p(0), Wire::Snapshot(state(&[("c", 2)])));
        assert_eq!(s.changed, vec![p(0)]);
        t.receive(Millis(400), &p(1), Wire::Goodbye);
        let s = t.receive(Millis(500), &p(3), Wire::Snapshot(state(&[("c", 1)])));
        assert_eq!(s.changed, vec![p(3)]);
    }
}

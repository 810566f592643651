//! Typed presence: who else has this note open, and where they are in it.
//!
//! Each peer publishes a small state per document (a user name, a color, a cursor...), any
//! `T: Serialize + DeserializeOwned` that serializes to a map. It travels in automerge-repo
//! `ephemeral` messages ([`DocHandle::broadcast`]), never in the document: presence is about
//! now, and the note's history should not grow with every cursor move.
//!
//! ```no_run
//! # async fn demo(note: sheafdb::DocHandle) -> Result<(), Box<dyn std::error::Error>> {
//! #[derive(Clone, serde::Serialize, serde::Deserialize)]
//! struct Me { user: String, color: String, cursor: Option<String> }
//!
//! let me = Me { user: "ada".into(), color: "#e11d48".into(), cursor: None };
//! let presence = note.presence(me)?;                 // published at once, then heartbeats
//! presence.modify(|s| s.cursor = Some("…".into()))?; // publishes the change
//! let mut view = presence.watch();                   // the current peer set, as it changes
//! while view.changed().await.is_ok() {
//!     for (peer, p) in &view.borrow().peers { println!("{peer}: {}", p.state.user); }
//! }
//! presence.leave().await?;                           // peers forget us now (also on drop)
//! # Ok(()) }
//! ```
//!
//! # On the wire, and JS
//!
//! The payloads are those of automerge-repo's JS `Presence` class (`@automerge/automerge-repo`
//! 2.x), so a JS app using `new Presence({ handle }).start({ initialState, heartbeatMs })`
//! and a sheaf peer see each other; an app that hand-rolls presence can produce and consume
//! the same plain CBOR maps with `handle.broadcast({...})` and the `ephemeral-message` event:
//!
//! ```text
//! { "__presence": { "type": "snapshot", "state": { "user": "ada", "cursor": 7 } } }
//! { "__presence": { "type": "update", "channel": "cursor", "value": 8 } }
//! { "__presence": { "type": "heartbeat" } }
//! { "__presence": { "type": "goodbye" } }
//! ```
//!
//! Each top-level key of the state is a "channel": an `update` replaces one channel, a
//! `snapshot` the whole state. Peers are identified by the ephemeral message's `senderId`,
//! as in JS (sessions are not told apart): one presence per repo and note, since a second
//! [`Presence`] on the same note in the same repo speaks with the same peer id.
//! See [`wire`] for the decoding rules: it is total and lenient; payloads without the
//! `__presence` key are other apps' ephemeral messages and are left alone (every subscriber
//! of [`DocHandle::ephemeral`] still gets every payload, presence or not), and malformed
//! presence payloads are dropped with a `debug` log. A peer whose state does not decode as `T`
//! is left out of the typed view (logged at `debug`) until a later state does; mark fields
//! `#[serde(default)]` to accept peers that publish only some of them.
//!
//! Differences from the JS class, on purpose: our heartbeat re-sends the whole state (a
//! `snapshot`), so a peer that missed a message, or joined after it, catches up within one
//! period whatever happened on the way; a received snapshot replaces the peer's state where
//! JS merges it; expiry is checked at each peer's exact deadline rather than on an interval.
//! JS's own heartbeats are bare `heartbeat`s, which refresh a peer we know and, from a peer we
//! do not, make us announce our state. Mind the JS default heartbeat of 15 s: give JS peers a
//! `heartbeatMs` below our [`PresenceConfig::ttl`], and our TTL above their heartbeat.
//!
//! # Time
//!
//! The rules (heartbeats, expiry, answering newcomers) are in [`tracker`], a state machine
//! driven by a `now` it is given; a tokio task per [`Presence`] feeds it messages and sleeps
//! until its next deadline.

pub mod tracker;
pub mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::engine::Millis;
use crate::id::{DocumentId, PeerId};

use super::DocHandle;
use tracker::{Step, Timing, Tracker};
use wire::{Decoded, StateMap};

/// Timings and bounds of a [`Presence`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceConfig {
    /// How often our state is re-sent when it does not change.
    pub heartbeat: Duration,
    /// How long a peer may stay silent before it is forgotten. Keep it a few heartbeats
    /// long (ours and the other peers'), so one or two lost messages do not drop a peer.
    pub ttl: Duration,
    /// How long to wait before answering a newcomer with our state (its own connection to
    /// the document may still be settling); newcomers within this window share one answer.
    pub announce_delay: Duration,
    /// At most this many other peers are tracked per note; messages from further newcomers
    /// are dropped until one goes (a bound on what invented sender ids can cost).
    pub max_peers: usize,
}

impl Default for PresenceConfig {
    /// 5 s heartbeats, 20 s TTL (four heartbeats, and above the 15 s JS default heartbeat),
    /// 500 ms announce delay (as JS), 1,000 peers.
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
            ttl: Duration::from_secs(20),
            announce_delay: Duration::from_millis(500),
            max_peers: 1_000,
        }
    }
}

impl PresenceConfig {
    /// Heartbeat `every`, TTL three times that, announce delay at most a tenth of it.
    pub fn heartbeat(every: Duration) -> Self {
        Self {
            heartbeat: every,
            ttl: every * 3,
            announce_delay: (every / 10).min(Duration::from_millis(500)),
            ..Self::default()
        }
    }

    fn timing(&self) -> Result<Timing, PresenceError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let t = Timing {
            heartbeat_ms: ms(self.heartbeat),
            ttl_ms: ms(self.ttl),
            announce_delay_ms: ms(self.announce_delay),
            max_peers: self.max_peers,
        };
        if t.heartbeat_ms == 0 {
            return Err(PresenceError::Config("the heartbeat must be at least 1 ms"));
        }
        if t.ttl_ms <= t.heartbeat_ms {
            return Err(PresenceError::Config(
                "the TTL must be longer than the heartbeat, or peers flicker out between beats",
            ));
        }
        Ok(t)
    }
}

/// Errors of [`Presence`].
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("a presence state must serialize to a map with text keys (a JS object), not {0}")]
    NotAMap(&'static str),
    #[error("the presence state could not be serialized: {0}")]
    Encode(String),
    #[error("invalid presence config: {0}")]
    Config(&'static str),
    #[error("presence needs a tokio runtime")]
    NoRuntime,
    #[error("presence has stopped (it left, or the repo shut down)")]
    Closed,
}

/// What we know of one other peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerPresence<T> {
    pub state: T,
    /// When we last heard from it (any presence message, heartbeats included).
    pub last_seen: std::time::Instant,
    /// When its state last changed.
    pub last_active: std::time::Instant,
}

/// The current presence on one note: ours and every other live peer's.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSet<T> {
    /// Our peer id (never a key of `peers`).
    pub me: PeerId,
    /// Our own state, as last set.
    pub local: T,
    /// The other peers whose state decodes as `T`, by peer id.
    pub peers: BTreeMap<PeerId, PeerPresence<T>>,
}

/// Our presence on one note: publishes our state and tracks the other peers'. Dropping it
/// (or [`Presence::leave`]) says goodbye. It keeps its repo running while it lives.
pub struct Presence<T> {
    me: PeerId,
    doc: DocumentId,
    view: Arc<watch::Sender<PeerSet<T>>>,
    cmds: mpsc::UnboundedSender<Cmd>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl<T> std::fmt::Debug for Presence<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence")
            .field("me", &self.me)
            .field("doc", &self.doc)
            .finish()
    }
}

enum Cmd {
    Set(StateMap),
    Leave(oneshot::Sender<Result<(), PresenceError>>),
}

impl DocHandle {
    /// Start publishing `initial` as our presence on this note, with default timings.
    /// Needs a tokio runtime.
    pub fn presence<T>(&self, initial: T) -> Result<Presence<T>, PresenceError>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        self.presence_with(initial, PresenceConfig::default())
    }

    /// [`DocHandle::presence`] with chosen timings.
    pub fn presence_with<T>(
        &self,
        initial: T,
        config: PresenceConfig,
    ) -> Result<Presence<T>, PresenceError>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let timing = config.timing()?;
        tokio::runtime::Handle::try_current().map_err(|_| PresenceError::NoRuntime)?;
        let state = encode_state(&initial)?;
        let me = self.repo().peer_id().clone();
        let start = Instant::now();
        let (tracker, first) = Tracker::start(me.clone(), timing, Millis(0), state);
        let view = Arc::new(watch::Sender::new(PeerSet {
            me: me.clone(),
            local: initial,
            peers: BTreeMap::new(),
        }));
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let task = Task {
            handle: self.clone(),
            tracker,
            view: view.clone(),
            versions: HashMap::new(),
            start,
            // Subscribed before the task runs, so nothing sent meanwhile is missed.
            ephemeral: self.ephemeral(),
            links: self.sync_status(),
        };
        let task = tokio::spawn(task.run(cmd_rx, first));
        Ok(Presence {
            me,
            doc: self.id(),
            view,
            cmds,
            task: Some(task),
        })
    }
}

impl<T> Presence<T>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    pub fn peer_id(&self) -> &PeerId {
        &self.me
    }

    /// Replace our state and publish it now (only the changed key, when one key changed;
    /// nothing when nothing changed).
    pub fn set(&self, state: T) -> Result<(), PresenceError> {
        self.modify(|s| *s = state)
    }

    /// Change our state in place and publish it now.
    pub fn modify(&self, f: impl FnOnce(&mut T)) -> Result<(), PresenceError> {
        let mut result = Ok(());
        // Under the watch's lock: concurrent calls publish in the order the view shows.
        self.view.send_if_modified(|set| {
            let mut next = set.local.clone();
            f(&mut next);
            let sent = encode_state(&next).and_then(|map| {
                self.cmds
                    .send(Cmd::Set(map))
                    .map_err(|_| PresenceError::Closed)
            });
            match sent {
                Ok(()) => {
                    set.local = next;
                    true
                }
                Err(e) => {
                    result = Err(e);
                    false
                }
            }
        });
        result
    }

    /// Our state as last set.
    pub fn local(&self) -> T {
        self.view.borrow().local.clone()
    }

    /// The other live peers now.
    pub fn peers(&self) -> BTreeMap<PeerId, PeerPresence<T>> {
        self.view.borrow().peers.clone()
    }

    /// The peer set as it changes: notified when a peer appears, changes its state or goes
    /// (by goodbye or expiry), and when our own state is set. Heartbeats that change nothing
    /// only refresh `last_seen` in place, without a notification. Ends (`changed()` errs)
    /// once this presence has left and been dropped.
    pub fn watch(&self) -> watch::Receiver<PeerSet<T>> {
        self.view.subscribe()
    }

    /// Say goodbye (peers forget us at once) and stop. Resolves once the goodbye is handed
    /// to the network layer.
    pub async fn leave(mut self) -> Result<(), PresenceError> {
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Leave(reply))
            .map_err(|_| PresenceError::Closed)?;
        let r = rx.await.map_err(|_| PresenceError::Closed)?;
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        r
    }
}

/// Our state as a wire map.
fn encode_state<T: Serialize>(state: &T) -> Result<StateMap, PresenceError> {
    let value =
        ciborium::Value::serialized(state).map_err(|e| PresenceError::Encode(e.to_string()))?;
    match value {
        ciborium::Value::Map(entries) => {
            if entries
                .iter()
                .any(|(k, _)| !matches!(k, ciborium::Value::Text(_)))
            {
                return Err(PresenceError::NotAMap("a map with non-text keys"));
            }
            Ok(wire::state_from_entries(entries))
        }
        ciborium::Value::Array(_) => Err(PresenceError::NotAMap("a sequence")),
        ciborium::Value::Null => Err(PresenceError::NotAMap("null")),
        _ => Err(PresenceError::NotAMap("a scalar")),
    }
}

/// The tokio side: feeds the tracker and carries out its steps. Thin on purpose.
struct Task<T> {
    handle: DocHandle,
    tracker: Tracker,
    view: Arc<watch::Sender<PeerSet<T>>>,
    /// The tracker's state version last decoded into the view, per peer.
    versions: HashMap<PeerId, u64>,
    start: Instant,
    ephemeral: broadcast::Receiver<(PeerId, Vec<u8>)>,
    links: watch::Receiver<HashMap<PeerId, crate::engine::PeerSyncStatus>>,
}

impl<T> Task<T>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>, first: Step) {
        let doc = self.handle.id();
        if !self.apply(first) {
            return;
        }
        let mut linked: HashSet<PeerId> = self.links.borrow_and_update().keys().cloned().collect();
        let mut links_open = true;
        loop {
            let deadline = self
                .tracker
                .next_deadline()
                .map(|Millis(ms)| self.start + Duration::from_millis(ms));
            let step = tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Set(state)) => self.tracker.set_local(self.now(), state),
                    Some(Cmd::Leave(reply)) => {
                        let step = self.tracker.leave();
                        let ok = self.apply(step);
                        let _ = reply.send(if ok { Ok(()) } else { Err(PresenceError::Closed) });
                        return;
                    }
                    None => {
                        // The `Presence` was dropped: leave.
                        let step = self.tracker.leave();
                        self.apply(step);
                        return;
                    }
                },
                msg = self.ephemeral.recv() => match msg {
                    Ok((from, bytes)) => match wire::decode(&bytes) {
                        Decoded::Presence(msg) => self.tracker.receive(self.now(), &from, msg),
                        Decoded::NotPresence => continue,
                        Decoded::Malformed(why) => {
                            tracing::debug!(%doc, peer = %from, why, "ignoring a malformed presence message");
                            continue;
                        }
                    },
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        // Heartbeats carry whole states: the next round heals this.
                        tracing::debug!(%doc, missed = n, "presence fell behind on ephemeral messages");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                r = self.links.changed(), if links_open => {
                    if r.is_err() {
                        links_open = false;
                        continue;
                    }
                    let now: HashSet<PeerId> =
                        self.links.borrow_and_update().keys().cloned().collect();
                    if now.iter().any(|p| !linked.contains(p)) {
                        self.tracker.link_up(self.now());
                    }
                    linked = now;
                    continue;
                }
                _ = sleep_until(deadline) => self.tracker.tick(self.now()),
            };
            if !self.apply(step) {
                return;
            }
        }
    }

    fn now(&self) -> Millis {
        Millis(u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Send the step's messages and refresh the view. False once the repo is gone.
    fn apply(&mut self, step: Step) -> bool {
        let doc = self.handle.id();
        for (peer, why) in &step.gone {
            tracing::debug!(%doc, %peer, ?why, "presence: peer gone");
        }
        self.refresh_view();
        for msg in &step.send {
            if self.handle.broadcast(wire::encode(msg)).is_err() {
                return false;
            }
        }
        true
    }

    /// Bring the typed view in line with the tracker: decode peers whose state changed,
    /// drop the gone, refresh `last_seen` in place. Notifies watchers only when the set or a
    /// state changed.
    fn refresh_view(&mut self) {
        let start = self.start.into_std();
        let at = |Millis(ms)| start + Duration::from_millis(ms);
        let peers = self.tracker.peers();
        let versions = &mut self.versions;
        let doc = self.handle.id();
        self.view.send_if_modified(|set| {
            let mut notify = false;
            let before = set.peers.len();
            set.peers.retain(|id, _| peers.contains_key(id));
            versions.retain(|id, _| peers.contains_key(id));
            notify |= set.peers.len() != before;
            for (id, entry) in peers {
                if versions.get(id) == Some(&entry.version) {
                    if let Some(p) = set.peers.get_mut(id) {
                        p.last_seen = at(entry.last_seen);
                    }
                    continue;
                }
                versions.insert(id.clone(), entry.version);
                match wire::state_to_value(&entry.state).deserialized::<T>() {
                    Ok(state) => {
                        set.peers.insert(
                            id.clone(),
                            PeerPresence {
                                state,
                                last_seen: at(entry.last_seen),
                                last_active: at(entry.last_active),
                            },
                        );
                        notify = true;
                    }
                    Err(e) => {
                        tracing::debug!(%doc, peer = %id, error = %e, "a peer's presence state does not decode; left out");
                        notify |= set.peers.remove(id).is_some();
                    }
                }
            }
            notify
        });
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Serialize, serde::Deserialize)]
    struct Me {
        user: String,
        cursor: Option<u32>,
    }

    #[test]
    fn states_must_be_maps_with_text_keys() {
        let map = encode_state(&Me {
            user: "ada".into(),
            cursor: None,
        })
        .unwrap();
        assert_eq!(map["user"], ciborium::Value::Text("ada".into()));
        assert_eq!(
            map["cursor"],
            ciborium::Value::Null,
            "None is sent, as null"
        );
        let numbered: BTreeMap<u32, String> = [(1, "x".to_string())].into();
        assert!(matches!(
            encode_state(&numbered),
            Err(PresenceError::NotAMap(_))
        ));
        assert!(matches!(encode_state(&3), Err(PresenceError::NotAMap(_))));
        assert!(matches!(
            encode_state(&vec![1]),
            Err(PresenceError::NotAMap(_))
        ));
        assert!(matches!(
            encode_state(&Option::<Me>::None),
            Err(PresenceError::NotAMap(_))
        ));
    }

    #[test]
    fn configs_are_checked() {
        let c = PresenceConfig::heartbeat(Duration::from_secs(2));
        assert_eq!(c.ttl, Duration::from_secs(6));
        assert_eq!(c.announce_delay, Duration::from_millis(200));
        let t = c.timing().unwrap();
        assert_eq!(
            (t.heartbeat_ms, t.ttl_ms, t.max_peers),
            (2_000, 6_000, 1_000)
        );
        assert!(PresenceConfig::default().timing().is_ok());
        let zero = PresenceConfig::heartbeat(Duration::ZERO);
        assert!(matches!(zero.timing(), Err(PresenceError::Config(_))));
        let short = PresenceConfig {
            ttl: Duration::from_secs(1),
            ..c
        };
        assert!(matches!(short.timing(), Err(PresenceError::Config(_))));
    }
}

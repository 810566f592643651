//! One status per note, as an editor shows it: saving, saved, offline, syncing, synced,
//! declined or read-only.
//!
//! The facts live in separate watches, each with its own writer: the note's save state (the
//! handle on an edit, the driver on a durable write), its per-peer sync status (the engine),
//! the repo's connected peers (the sockets) and whether the repo syncs over a network at all
//! (set once it dials or serves). [`NoteStatusWatch`] reads them together and derives one
//! value, so no task runs per subscriber and nothing has to be kept in step: the status is
//! recomputed from the facts whenever one of them moves.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::{DocChannels, RepoError, SaveState};
use crate::engine::PeerSyncStatus;
use crate::id::PeerId;

/// Where a note stands, most urgent first: what an editor shows next to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoteStatus {
    /// A change (local, or received from a peer) is not on disk yet.
    Saving,
    /// On disk, and this repo syncs with no one: it has neither dialed a peer nor served
    /// one ([`super::Repo::connect`], [`super::Repo::hub`]).
    Saved,
    /// On disk, but no peer is connected: edits stay here and flow when one is back.
    Offline,
    /// On disk; a connected peer has not got everything yet, or has sent something not
    /// yet taken in.
    Syncing,
    /// On disk, and every peer syncing this note has the same heads.
    Synced,
    /// On disk, but the connected peers were offered the note and declined it (a relay
    /// whose token for this repo does not cover it): edits stay here until access changes
    /// and the repo connects again. Something for an app to tell its user, since waiting
    /// will not help. Shown when no peer is syncing the note; one that has it and one that
    /// declines it show `Declined` too: the note is not where this repo sends it.
    Declined,
    /// On disk; this repo has everything the connected peers have, but they will not take
    /// its own edits: they are read-only for it (a relay whose token for this repo does not
    /// allow writing). Edits stay here; like `Declined`, waiting will not help. Shown when
    /// no peer is syncing the note and none declines it.
    ReadOnly,
}

/// The facts a status is derived from.
struct Facts<'a> {
    save: SaveState,
    sync: &'a HashMap<PeerId, PeerSyncStatus>,
    peers_connected: bool,
    networked: bool,
    announces: bool,
}

impl Facts<'_> {
    fn status(&self) -> NoteStatus {
        if self.save == SaveState::Unsaved {
            return NoteStatus::Saving;
        }
        if !self.sync.is_empty() {
            let any = |want| self.sync.values().any(|s| *s == want);
            return if any(PeerSyncStatus::Syncing) {
                NoteStatus::Syncing
            } else if any(PeerSyncStatus::Declined) {
                NoteStatus::Declined
            } else if any(PeerSyncStatus::ReadOnly) {
                NoteStatus::ReadOnly
            } else {
                NoteStatus::Synced
            };
        }
        match (self.peers_connected, self.networked) {
            // A peer announces every note to a new connection: this one's first round is
            // on its way.
            (true, _) if self.announces => NoteStatus::Syncing,
            // A relay syncs a note only with peers that ask for it; none does.
            (true, _) => NoteStatus::Saved,
            (false, true) => NoteStatus::Offline,
            (false, false) => NoteStatus::Saved,
        }
    }
}

/// A note's [`NoteStatus`], kept current (from [`super::DocHandle::status`]).
pub struct NoteStatusWatch {
    save: watch::Receiver<SaveState>,
    sync: watch::Receiver<HashMap<PeerId, PeerSyncStatus>>,
    peers: watch::Receiver<Vec<PeerId>>,
    networked: watch::Receiver<bool>,
    announces: bool,
    last: NoteStatus,
    /// Keeps the note's channels registered while this watch lasts, even with no handle
    /// left (the driver drops them on eviction only when no one holds them).
    _channels: Arc<DocChannels>,
}

impl NoteStatusWatch {
    pub(super) fn new(
        channels: Arc<DocChannels>,
        peers: watch::Receiver<Vec<PeerId>>,
        networked: watch::Receiver<bool>,
        announces: bool,
    ) -> Self {
        let mut w = Self {
            save: channels.save.subscribe(),
            sync: channels.sync.subscribe(),
            peers,
            networked,
            announces,
            last: NoteStatus::Saved,
            _channels: channels,
        };
        w.last = w.mark_seen();
        w
    }

    /// The status now.
    pub fn get(&self) -> NoteStatus {
        Facts {
            save: *self.save.borrow(),
            sync: &self.sync.borrow(),
            peers_connected: !self.peers.borrow().is_empty(),
            networked: *self.networked.borrow(),
            announces: self.announces,
        }
        .status()
    }

    /// The status now, counting every fact as seen by [`NoteStatusWatch::changed`].
    fn mark_seen(&mut self) -> NoteStatus {
        self.save.borrow_and_update();
        self.sync.borrow_and_update();
        self.peers.borrow_and_update();
        self.networked.borrow_and_update();
        self.get()
    }

    /// Wait until the status differs from the last one this watch returned (or had when it
    /// was made), and return it. Intermediate states that came and went while no one
    /// waited are skipped, as with any watch. Fails once the repo is gone.
    pub async fn changed(&mut self) -> Result<NoteStatus, RepoError> {
        loop {
            let moved = tokio::select! {
                r = self.save.changed() => r,
                r = self.sync.changed() => r,
                r = self.peers.changed() => r,
                r = self.networked.changed() => r,
            };
            moved.map_err(|_| RepoError::Closed)?;
            let now = self.mark_seen();
            if now != self.last {
                self.last = now;
                return Ok(now);
            }
        }
    }

    /// Wait until the status satisfies `f` (at once if it does now), and return it.
    pub async fn wait_for(
        &mut self,
        mut f: impl FnMut(NoteStatus) -> bool,
    ) -> Result<NoteStatus, RepoError> {
        let now = self.mark_seen();
        self.last = now;
        if f(now) {
            return Ok(now);
        }
        loop {
            let now = self.changed().await?;
            if f(now) {
                return Ok(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(
        save: SaveState,
        sync: &[PeerSyncStatus],
        peers_connected: bool,
        networked: bool,
        announces: bool,
    ) -> NoteStatus {
        let sync = sync
            .iter()
            .map(|s| (PeerId::random(), *s))
            .collect::<HashMap<_, _>>();
        Facts {
            save,
            sync: &sync,
            peers_connected,
            networked,
            announces,
        }
        .status()
    }

    #[test]
    fn each_fact_leads_to_the_status_an_editor_expects() {
        use NoteStatus::*;
        use PeerSyncStatus::{Declined as N, ReadOnly as R, Synced as S, Syncing as Y};
        use SaveState::{Saved as D, Unsaved as U};
        // Not on disk comes first, whatever the network does.
        assert_eq!(status(U, &[S], true, true, true), Saving);
        assert_eq!(status(U, &[], false, false, true), Saving);
        // A local-only repo.
        assert_eq!(status(D, &[], false, false, true), Saved);
        // Networked, nobody there.
        assert_eq!(status(D, &[], false, true, true), Offline);
        // Peers syncing this note.
        assert_eq!(status(D, &[S, S], true, true, true), Synced);
        assert_eq!(status(D, &[S, Y], true, true, true), Syncing);
        // A peer that declines the note: nothing will change by waiting.
        assert_eq!(status(D, &[N], true, true, true), Declined);
        assert_eq!(status(D, &[S, N], true, true, true), Declined);
        assert_eq!(status(D, &[Y, N], true, true, true), Syncing);
        assert_eq!(status(U, &[N], true, true, true), Saving);
        // A peer that has all but our edits and will not take them (read-only for us).
        assert_eq!(status(D, &[R], true, true, true), ReadOnly);
        assert_eq!(status(D, &[S, R], true, true, true), ReadOnly);
        assert_eq!(status(D, &[Y, R], true, true, true), Syncing);
        assert_eq!(status(D, &[N, R], true, true, true), Declined);
        assert_eq!(status(U, &[R], true, true, true), Saving);
        // Connected, first round not reported yet: a peer announces, a relay waits to be
        // asked.
        assert_eq!(status(D, &[], true, true, true), Syncing);
        assert_eq!(status(D, &[], true, true, false), Saved);
    }
}

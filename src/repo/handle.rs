//! [`DocHandle`]: what an app holds to read, change and watch one note.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use automerge::transaction::{CommitOptions, Transaction};
use automerge::{Automerge, AutomergeError, ChangeHash, ObjId, ObjType, Patch, ReadDoc};
use tokio::sync::{broadcast, oneshot, watch};

use crate::engine::{Input, PeerSyncStatus, SharedDoc};
use crate::id::{AutomergeUrl, DocumentId, PeerId, StorageId};

use super::driver::Cmd;
use super::text::{TextError, TextIndex, TextPatch};
use super::{DocChannels, Repo, RepoError};

/// Whether a note's latest change is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveState {
    Unsaved,
    Saved,
}

/// A cheap, cloneable handle on one note. Safe to use from many tasks.
///
/// A handle may be a *view*: the note as of fixed heads ([`DocHandle::view`], or
/// [`super::Repo::find`] of a URL with heads, as automerge-repo's `handle.view(heads)`). It
/// reads that version, names it in its URL, and cannot change it; its status, sync and
/// save state are the note's.
#[derive(Clone)]
pub struct DocHandle {
    repo: Repo,
    id: DocumentId,
    doc: SharedDoc,
    channels: Arc<DocChannels>,
    view: Option<Arc<View>>,
}

/// The note as of `heads` (built once: a view never moves).
struct View {
    heads: Vec<ChangeHash>,
    doc: Automerge,
}

impl std::fmt::Debug for DocHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocHandle").field("id", &self.id).finish()
    }
}

impl DocHandle {
    pub(super) fn new(repo: Repo, id: DocumentId, doc: SharedDoc) -> Self {
        let channels = repo.inner.channels(&id);
        channels.heads.send_replace(doc.lock().get_heads());
        Self {
            repo,
            id,
            doc,
            channels,
            view: None,
        }
    }

    pub fn id(&self) -> DocumentId {
        self.id
    }

    /// The note as of `heads` (an earlier version, or the current one), as a read-only
    /// handle whose URL names the heads. [`RepoError::UnknownHeads`] if the note lacks one of
    /// them here (see [`super::Repo::find`], which waits for them).
    pub fn view(&self, heads: &[ChangeHash]) -> Result<DocHandle, RepoError> {
        let fork = {
            let doc = self.doc.lock();
            let missing: Vec<ChangeHash> = heads
                .iter()
                .filter(|h| doc.get_change_meta_by_hash(h).is_none())
                .copied()
                .collect();
            if !missing.is_empty() {
                return Err(RepoError::UnknownHeads {
                    id: self.id,
                    missing,
                });
            }
            doc.fork_at(heads).map_err(RepoError::Change)?
        };
        let mut heads = heads.to_vec();
        heads.sort();
        heads.dedup();
        Ok(DocHandle {
            view: Some(Arc::new(View { heads, doc: fork })),
            ..self.clone()
        })
    }

    /// The heads this handle is fixed at, if it is a view ([`DocHandle::view`]).
    pub fn fixed_heads(&self) -> Option<&[ChangeHash]> {
        self.view.as_ref().map(|v| v.heads.as_slice())
    }

    /// The repo this handle belongs to.
    pub(crate) fn repo(&self) -> &Repo {
        &self.repo
    }

    /// The note's URL; a view's names its heads (`automerge:<id>#<head>|...`).
    pub fn url(&self) -> AutomergeUrl {
        AutomergeUrl {
            id: self.id,
            heads: self.fixed_heads().map(<[ChangeHash]>::to_vec),
        }
    }

    /// Read the note (a view: as of its heads). Holds only this note's lock.
    pub fn with_doc<R>(&self, f: impl FnOnce(&Automerge) -> R) -> R {
        match &self.view {
            Some(v) => f(&v.doc),
            None => f(&self.doc.lock()),
        }
    }

    /// Change the note in one Automerge transaction. If `f` fails the transaction is rolled
    /// back. Returns what `f` returned. A change that breaks an invariant of the note's kind
    /// (see [`crate::schema`]) that held before it is rolled back too:
    /// [`RepoError::Invariant`]. The change is stamped with the wall clock (seconds, as JS
    /// Automerge does); [`DocHandle::change_with`] also sets a message.
    pub fn change<R>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, AutomergeError>,
    ) -> Result<R, RepoError> {
        self.change_with(CommitOptions::default(), f)
    }

    /// [`DocHandle::change`] with commit options: a message
    /// (`CommitOptions::default().with_message("fix typo")`, shown in
    /// [`DocHandle::history`]) and/or a time; without a time the change is stamped with the
    /// wall clock. A transaction that makes no operation commits nothing, message included.
    pub fn change_with<R>(
        &self,
        options: CommitOptions,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, AutomergeError>,
    ) -> Result<R, RepoError> {
        if self.view.is_some() {
            return Err(RepoError::FixedHeads(self.id));
        }
        let (out, changed) = {
            let mut doc = self.doc.lock();
            // With a subscriber to `changes()`, log this change's patches (see
            // `engine::DocCell`): cheaper than the diff the subscriber would need otherwise.
            let log = doc.patch_log();
            let before = log.as_ref().map(|_| doc.get_heads());
            let mut tx = match log {
                Some(log) => doc
                    .transaction_log_patches(log)
                    .expect("a fresh patch log belongs to no other document"),
                None => doc.transaction(),
            };
            let schema = &self.repo.inner.schema;
            let guard = (!schema.is_empty()).then(|| schema.guard(&tx));
            let out = match f(&mut tx) {
                Ok(r) => r,
                Err(e) => {
                    tx.rollback();
                    return Err(RepoError::Change(e));
                }
            };
            if let Some(Err(rejected)) = guard.map(|g| g.verdict(schema, &tx)) {
                tx.rollback();
                return Err(rejected.into());
            }
            // Stamp changes with the wall clock in seconds, as JS Automerge does, for history.
            let options = match options.time {
                Some(_) => options,
                None => options.with_time(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64),
                ),
            };
            let (hash, log) = tx.commit_with(options);
            if let (Some(_), Some(before)) = (hash, before) {
                doc.record(before, log);
            }
            // Published under the note's lock, so that the watch never goes back to older
            // heads when several tasks (or the engine) change the note at once. With no
            // receiver the wake-up is skipped (a fast typist pays it per keystroke):
            // `heads_watch` brings the value up to date, under the same lock, before it
            // subscribes.
            if hash.is_some() && self.channels.heads.receiver_count() > 0 {
                self.channels.heads.send_replace(doc.get_heads());
            }
            if hash.is_some() {
                // Under the note's lock too: the driver decides `Saved` under it, from the
                // note's heads, so it never overwrites this with the previous chunk's
                // `Saved`. Already `Unsaved` while earlier edits are on their way: no one
                // to wake.
                self.channels.save.send_if_modified(|s| {
                    let was = *s;
                    *s = SaveState::Unsaved;
                    was != SaveState::Unsaved
                });
            }
            (out, hash.is_some())
        };
        if changed {
            // No peer has this change yet: until the engine reports again, "Synced" would
            // be stale (an app would show a checkmark for an edit that only exists here).
            self.channels.sync.send_if_modified(|m| {
                let mut any = false;
                for s in m.values_mut() {
                    if *s == PeerSyncStatus::Synced {
                        *s = PeerSyncStatus::Syncing;
                        any = true;
                    }
                }
                any
            });
            if !self
                .channels
                .local_pending
                .swap(true, std::sync::atomic::Ordering::AcqRel)
            {
                self.repo
                    .inner
                    .send(Cmd::Input(Input::LocalChange { doc: self.id }))?;
            }
        }
        Ok(out)
    }

    pub fn heads(&self) -> Vec<ChangeHash> {
        match &self.view {
            Some(v) => v.heads.clone(),
            None => self.doc.lock().get_heads(),
        }
    }

    /// The whole note as JSON (maps, lists, text as strings, counters as numbers).
    pub fn to_json(&self) -> serde_json::Value {
        self.with_doc(|d| {
            serde_json::to_value(automerge::AutoSerde::from(d)).unwrap_or(serde_json::Value::Null)
        })
    }

    /// The note as Automerge bytes (`save()`), importable anywhere (a view: its history up
    /// to its heads).
    pub fn export(&self) -> Vec<u8> {
        self.with_doc(|d| d.save())
    }

    /// Wait until every change made to this note so far is durable on disk.
    pub async fn saved(&self) -> Result<(), RepoError> {
        let (reply, rx) = oneshot::channel();
        self.repo
            .inner
            .send(Cmd::WaitSaved { id: self.id, reply })?;
        rx.await.map_err(|_| self.repo.inner.closed())?
    }

    /// Fold the note's stored chunks into one snapshot now (the store also does this on its
    /// own when incremental chunks outgrow the snapshot). Editors are not held up while the
    /// snapshot is made (see `repo::compaction`).
    pub async fn compact(&self) -> Result<(), RepoError> {
        let (reply, rx) = oneshot::channel();
        let (store, id, doc) = (self.repo.inner.store.clone(), self.id, self.doc.clone());
        // The snapshot of a long note takes a while: keep it off the async worker.
        tokio::task::spawn_blocking(move || {
            super::compaction::compact(&store, id, &doc, move |r| {
                let _ = reply.send(r);
            })
        })
        .await
        .map_err(|_| RepoError::Closed)?;
        rx.await.map_err(|_| self.repo.inner.closed())??;
        Ok(())
    }

    /// `Saved` / `Unsaved`, as a watch an editor can show.
    pub fn save_state(&self) -> watch::Receiver<SaveState> {
        self.channels.save.subscribe()
    }

    /// The note's status as an editor shows it (saving, saved, offline, syncing, synced),
    /// derived from [`DocHandle::save_state`], [`DocHandle::sync_status`] and the repo's
    /// connections.
    pub fn status(&self) -> super::NoteStatusWatch {
        let inner = &self.repo.inner;
        super::NoteStatusWatch::new(
            self.channels.clone(),
            inner.peers.subscribe(),
            inner.networked.subscribe(),
            inner.announces,
        )
    }

    /// Per-peer sync status (`Syncing` / `Synced`; offline peers are absent).
    pub fn sync_status(&self) -> watch::Receiver<HashMap<PeerId, PeerSyncStatus>> {
        self.channels.sync.subscribe()
    }

    /// Changes (local and remote) as they happen, with patches since the last seen heads.
    /// While a subscription lasts, every change to the note logs its patches as it is made
    /// (`engine::DocCell`), so an event costs about what its patches are, not a diff of the
    /// note; `RepoStats::change_events_diffed` counts the events that had to diff.
    pub fn changes(&self) -> Changes {
        if let Some(v) = &self.view {
            // A view never changes: a subscription that ends at once, on a cell of its own.
            return Changes {
                rx: watch::channel(v.heads.clone()).1,
                last: v.heads.clone(),
                doc: crate::engine::shared(Automerge::new()),
                stats: self.repo.inner.stats.clone(),
                texts: TextCache::default(),
            };
        }
        let rx = self.heads_watch();
        let last = {
            let mut doc = self.doc.lock();
            doc.subscribe();
            doc.get_heads()
        };
        Changes {
            rx,
            last,
            doc: self.doc.clone(),
            stats: self.repo.inner.stats.clone(),
            texts: TextCache::default(),
        }
    }

    /// The note's heads, updated after every local change and every applied batch of remote
    /// changes. Cheaper still than [`DocHandle::changes`], which has every change log its
    /// patches while it lasts (and diffs the note, a walk of the whole note under its lock,
    /// when it missed some), nothing is computed. For apps that re-read what they show, sync
    /// indicators, and `get_changes_meta(&old_heads)` to see who changed what.
    pub fn heads_watch(&self) -> watch::Receiver<Vec<ChangeHash>> {
        if let Some(v) = &self.view {
            return watch::channel(v.heads.clone()).1;
        }
        // Edits made while no one watched did not publish (see `change_with`): catch up
        // first, under the note's lock, so that no edit slips between the two.
        let doc = self.doc.lock();
        self.channels.heads.send_if_modified(|h| {
            let now = doc.get_heads();
            let moved = *h != now;
            *h = now;
            moved
        });
        self.channels.heads.subscribe()
    }

    /// The heads the storages this repo subscribes to hold of this note, as last heard (see
    /// [`super::Repo::subscribe_remote_heads`]): "saved on your laptop" for an editor.
    pub fn remote_heads(&self) -> watch::Receiver<HashMap<StorageId, super::RemoteHeads>> {
        self.channels.remote.subscribe()
    }

    /// Send an ephemeral payload (CBOR bytes: presence, cursors) to the note's peers.
    pub fn broadcast(&self, data: Vec<u8>) -> Result<(), RepoError> {
        self.repo
            .inner
            .send(Cmd::Input(Input::Broadcast { doc: self.id, data }))
    }

    /// Repairs this peer makes to this note after merges break an invariant.
    pub fn repairs(&self) -> super::Repairs {
        super::Repairs::new(self.repo.inner.repairs.subscribe(), Some(self.id))
    }

    /// Ephemeral payloads from peers: (sender, CBOR bytes).
    pub fn ephemeral(&self) -> broadcast::Receiver<(PeerId, Vec<u8>)> {
        self.channels.ephemeral.subscribe()
    }
}

/// One notification of [`Changes`].
#[derive(Clone)]
pub struct ChangeEvent {
    pub heads: Vec<ChangeHash>,
    /// The heads the patches start from: those of the previous event (or those when
    /// `changes()` was called).
    pub before: Vec<ChangeHash>,
    /// What changed since the previous event (or since `changes()` was called), with text
    /// offsets in the document's unit (code points); see [`ChangeEvent::text_patches`].
    pub patches: Vec<Patch>,
    doc: SharedDoc,
    texts: TextCache,
    stats: Arc<super::RepoStats>,
}

/// Texts as a subscription's events left them, per text object, so that
/// [`ChangeEvent::text_patches`] need not read the text at `before` from the note (a walk
/// of the whole text at those heads: 20-35 ms on the automerge-paper note). At most two
/// versions per object (an event's start and end), and only of objects asked about.
type TextCache = Arc<parking_lot::Mutex<HashMap<ObjId, Vec<(Vec<ChangeHash>, String)>>>>;

impl std::fmt::Debug for ChangeEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeEvent")
            .field("heads", &self.heads)
            .field("before", &self.before)
            .field("patches", &self.patches)
            .finish()
    }
}

impl ChangeEvent {
    /// The patches of text object `obj`, offsets in `unit` (UTF-16 for JS editors), to apply
    /// in order to the text as it was at [`ChangeEvent::before`] (see
    /// [`text::text_patches`](super::text::text_patches)). That text is the one the
    /// subscription's previous event left (kept per text object asked about); only the first
    /// event, or one whose start was not kept, reads it from the note (a walk of the text
    /// under the note's lock, counted in `RepoStats::text_reads`).
    pub fn text_patches(&self, obj: &ObjId, unit: TextIndex) -> Result<Vec<TextPatch>, TextError> {
        let cached = self.texts.lock().get(obj).and_then(|versions| {
            versions
                .iter()
                .find(|(h, _)| *h == self.before)
                .map(|(_, t)| t.clone())
        });
        let (before, encoding) = {
            let doc = self.doc.lock();
            match doc.object_type(obj) {
                Ok(ObjType::Text) => {}
                Ok(_) => return Err(TextError::NotText),
                Err(e) => return Err(e.into()),
            }
            let before = match cached {
                Some(t) => t,
                // A text made after `before` reads as empty there.
                None => {
                    self.stats.text_reads.fetch_add(1, Ordering::Relaxed);
                    doc.text_at(obj, &self.before)?
                }
            };
            (before, doc.text_encoding())
        };
        let (patches, after) =
            super::text::text_patches_and_after(&before, &self.patches, obj, encoding, unit)?;
        // Keep this event's start and end: the next event starts where this one ends, and
        // the app may ask this one again (another unit).
        let mut texts = self.texts.lock();
        let versions = texts.entry(obj.clone()).or_default();
        versions.retain(|(h, _)| *h == self.before || *h == self.heads);
        for (heads, text) in [(&self.before, before), (&self.heads, after)] {
            if !versions.iter().any(|(h, _)| h == heads) {
                versions.push((heads.clone(), text));
            }
        }
        Ok(patches)
    }
}

/// A subscription to a note's changes. Missed intermediate states are folded into one
/// event: patches always lead from the last heads this subscriber saw to the newest.
pub struct Changes {
    rx: watch::Receiver<Vec<ChangeHash>>,
    last: Vec<ChangeHash>,
    doc: SharedDoc,
    stats: Arc<super::RepoStats>,
    texts: TextCache,
}

impl Drop for Changes {
    fn drop(&mut self) {
        self.doc.lock().unsubscribe();
    }
}

impl Changes {
    /// The next change; `None` when the repo is gone.
    pub async fn next(&mut self) -> Option<ChangeEvent> {
        loop {
            self.rx.changed().await.ok()?;
            let heads = self.rx.borrow_and_update().clone();
            if heads == self.last {
                continue;
            }
            let (patches, diffed) = self.doc.lock().patches_between(&self.last, &heads);
            self.stats.change_events.fetch_add(1, Ordering::Relaxed);
            if diffed {
                self.stats
                    .change_events_diffed
                    .fetch_add(1, Ordering::Relaxed);
            }
            let before = std::mem::replace(&mut self.last, heads.clone());
            return Some(ChangeEvent {
                heads,
                before,
                patches,
                doc: self.doc.clone(),
                texts: self.texts.clone(),
                stats: self.stats.clone(),
            });
        }
    }
}

//! The driver thread: drains the command channel into engine batches and carries out the
//! effects (sockets, store, handle notifications).

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use automerge::Automerge;
use tokio::sync::{mpsc, oneshot};

use crate::engine::{
    ApplyJob, CostClock, Effect, Engine, EngineConfig, Event, Input, Loaded, Millis, SharedDoc,
};
use crate::id::DocumentId;
use crate::net::{ConnId, Direction, Outgoing};
use crate::store::{Store, WriteOp};

use super::{Inner, RepoError, SaveState};

/// Most commands taken into one batch (bounds the latency of a batch under a flood).
const MAX_BATCH: usize = 8192;

/// How long a batch of nothing but local edits waits for more (see `Driver::run`), at least.
const LOCAL_DEBOUNCE: Duration = Duration::from_millis(5);

/// ... and at most: a burst's edits reach the store within this.
const LOCAL_DEBOUNCE_MAX: Duration = Duration::from_millis(50);

/// The debounce is this many times what the last batch of local edits cost to step.
///
/// Stepping local edits is mostly encoding them for storage, which automerge 0.12 does by
/// rebuilding each change from the op set while holding the note's lock: on the
/// automerge-paper note about 0.3 ms per call plus 3-5 µs per change, time in which the
/// editor waits. A fixed 5 ms debounce made a fast editor on that note wait about 15% of
/// the time; sizing the wait by the cost keeps that near 1/`DEBOUNCE_PER_COST` while a
/// small note keeps the 5 ms floor. Measured on the replay bench (interleaved with raw
/// Automerge): store/raw 0.75-0.77 with 5 ms, 0.81 with 50 ms, chunks 2,100 -> 290.
const DEBOUNCE_PER_COST: u32 = 20;

/// The debounce after a batch of local edits that took `cost` to step.
fn local_debounce(cost: Duration) -> Duration {
    cost.saturating_mul(DEBOUNCE_PER_COST)
        .clamp(LOCAL_DEBOUNCE, LOCAL_DEBOUNCE_MAX)
}

fn is_local_change(c: &Cmd) -> bool {
    matches!(c, Cmd::Input(Input::LocalChange { .. }))
}

/// What may wait out a debounce: more local edits, and the store's acknowledgements (the
/// writer finishing a batch must not cut an editor's burst into one chunk per fsync).
fn can_wait(c: &Cmd) -> bool {
    matches!(
        c,
        Cmd::Input(Input::LocalChange { .. } | Input::Persisted { .. })
    )
}

/// Take what is already waiting, up to `MAX_BATCH` commands.
fn drain(rx: &Receiver<Cmd>, cmds: &mut Vec<Cmd>) {
    while cmds.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(c) => cmds.push(c),
            Err(_) => break,
        }
    }
}

type DocReply = oneshot::Sender<Result<SharedDoc, RepoError>>;
type SavedReply = oneshot::Sender<Result<(), RepoError>>;

pub(crate) enum Cmd {
    Input(Input),
    Connect {
        conn: ConnId,
        direction: Direction,
        access: Option<crate::auth::Access>,
        tx: mpsc::Sender<Outgoing>,
    },
    Create {
        id: DocumentId,
        doc: Automerge,
        reply: DocReply,
    },
    Find {
        id: DocumentId,
        reply: DocReply,
    },
    /// A `find` of this document timed out (its reply channel is closed).
    CancelFind {
        id: DocumentId,
    },
    WaitSaved {
        id: DocumentId,
        reply: oneshot::Sender<Result<(), RepoError>>,
    },
    Flush {
        reply: oneshot::Sender<Result<(), RepoError>>,
    },
    Loaded {
        reply: oneshot::Sender<usize>,
    },
    Stop {
        reply: std::sync::mpsc::SyncSender<()>,
    },
    Shutdown,
}

pub(super) fn spawn(
    inner: Weak<Inner>,
    mut config: EngineConfig,
    rx: Receiver<Cmd>,
    stopped: tokio::sync::watch::Sender<Option<super::EngineStop>>,
) -> std::thread::JoinHandle<()> {
    let (store, tx) = {
        let i = inner.upgrade().expect("spawned from a live repo");
        (i.store.clone(), i.tx.clone())
    };
    let (loader, loader_thread) = spawn_loader(store.clone(), tx.clone());
    let (applier, applier_thread) = spawn_applier(tx.clone());
    std::thread::Builder::new()
        .name("sheaf-driver".into())
        .spawn(move || {
            // `Millis(0)` is now: the engine stamps its own changes (repairs) with wall-clock
            // time derived from this, without reading a clock.
            let start = Instant::now();
            config.clock_offset_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            if config.cost_clock.is_none() {
                config.cost_clock = Some(CostClock::monotonic());
            }
            let mut d = Driver {
                engine: Engine::new(config),
                inner,
                tx,
                store,
                loader: Some(loader),
                applier: Some(applier),
                threads: vec![loader_thread, applier_thread],
                start,
                conns: HashMap::new(),
                finds: HashMap::new(),
                emitted: HashMap::new(),
                emitted_heads: HashMap::new(),
                durable: HashMap::new(),
                save_waiters: HashMap::new(),
                save_dirty: HashSet::new(),
                compacting: Arc::new(parking_lot::Mutex::new(HashSet::new())),
                carry: Vec::new(),
                local_step_cost: Duration::ZERO,
                stop: None,
            };
            #[cfg(panic = "abort")]
            tracing::warn!(
                "built with panic = \"abort\": a change forged by a peer that makes Automerge \
                 panic aborts this process instead of being rejected (see engine::admit); \
                 build with panic = \"unwind\" to serve untrusted peers"
            );
            // A panic here is a bug in sheaf, and it leaves the engine in an unknown state:
            // stop (dropping every connection and reply, so callers see an error instead of
            // waiting forever) and say so, rather than limp on. What the store acknowledged
            // is durable; nothing else was ever reported saved.
            let outcome = catch_unwind(AssertUnwindSafe(|| d.run(rx)));
            let stop = match outcome {
                Ok(()) => d.stop.take().unwrap_or(super::EngineStop::Shutdown),
                Err(payload) => {
                    let why = crate::engine::admit::panic_message(payload.as_ref());
                    tracing::error!(panic = %why, "the sync engine panicked; it has stopped");
                    super::EngineStop::Panicked(why)
                }
            };
            // Said before the replies below are dropped, so their callers get the reason.
            stopped.send_replace(Some(stop));
            // (`run` joins these as it ends; after a panic they end once `d` is gone.)
            let threads = std::mem::take(&mut d.threads);
            drop(d);
            for t in threads {
                let _ = t.join();
            }
        })
        .expect("spawn the driver thread")
}

/// Loads run off the driver thread: a big document takes a while to load.
fn spawn_loader(
    store: Store,
    tx: Sender<Cmd>,
) -> (Sender<DocumentId>, std::thread::JoinHandle<()>) {
    let (ltx, lrx) = std::sync::mpsc::channel::<DocumentId>();
    let handle = std::thread::Builder::new()
        .name("sheaf-loader".into())
        .spawn(move || {
            while let Ok(doc) = lrx.recv() {
                let loaded = match store.load(&doc) {
                    Ok(Some(l)) => {
                        for c in &l.corrupt {
                            tracing::warn!(%doc, key = ?c.key, reason = ?c.reason, "corrupt chunk quarantined");
                        }
                        Some(Loaded { doc: l.doc, sync_states: l.sync_states })
                    }
                    Ok(None) => None,
                    Err(e) => {
                        tracing::error!(%doc, error = %e, "loading failed; treating the document as absent");
                        None
                    }
                };
                if tx.send(Cmd::Input(Input::Loaded { doc, loaded })).is_err() {
                    break;
                }
            }
        })
        .expect("spawn the loader thread");
    (ltx, handle)
}

/// Offloaded applies (see `engine::offload`) run here, one at a time: the engine hands out
/// at most one job per document, and a second core is all the relay's machine may have.
fn spawn_applier(tx: Sender<Cmd>) -> (Sender<Box<ApplyJob>>, std::thread::JoinHandle<()>) {
    let (atx, arx) = std::sync::mpsc::channel::<Box<ApplyJob>>();
    let handle = std::thread::Builder::new()
        .name("sheaf-applier".into())
        .spawn(move || {
            while let Ok(job) = arx.recv() {
                if tx.send(Cmd::Input(job.run())).is_err() {
                    break;
                }
            }
        })
        .expect("spawn the applier thread");
    (atx, handle)
}

/// At most this many compactions under way when a load asks for one.
const MAX_COMPACTIONS_AFTER_LOAD: usize = 2;

struct Driver {
    engine: Engine,
    inner: Weak<Inner>,
    tx: Sender<Cmd>,
    store: Store,
    loader: Option<Sender<DocumentId>>,
    applier: Option<Sender<Box<ApplyJob>>>,
    /// The loader and compaction threads: joined at shutdown, so the store (and sled's
    /// lock on the directory) is released when `Repo` is gone.
    threads: Vec<std::thread::JoinHandle<()>>,
    start: Instant,
    conns: HashMap<ConnId, mpsc::Sender<Outgoing>>,
    finds: HashMap<DocumentId, Vec<DocReply>>,
    /// Last chunk sequence emitted / acknowledged durable, per document.
    emitted: HashMap<DocumentId, u64>,
    /// The note's heads once the last emitted chunk is written.
    emitted_heads: HashMap<DocumentId, Vec<automerge::ChangeHash>>,
    durable: HashMap<DocumentId, u64>,
    save_waiters: HashMap<DocumentId, Vec<(u64, SavedReply)>>,
    /// Documents whose emitted or durable sequence moved since the last publish.
    save_dirty: HashSet<DocumentId>,
    compacting: Arc<parking_lot::Mutex<HashSet<DocumentId>>>,
    /// Inputs produced while carrying out effects, for the next batch.
    carry: Vec<Input>,
    /// What the last batch of nothing but local edits took to step (see `local_debounce`).
    local_step_cost: Duration,
    /// Why `run` stopped, when not asked to.
    stop: Option<super::EngineStop>,
}

impl Driver {
    fn now(&self) -> Millis {
        Millis(self.start.elapsed().as_millis() as u64)
    }

    fn run(&mut self, rx: Receiver<Cmd>) {
        let mut stop: Option<std::sync::mpsc::SyncSender<()>> = None;
        let mut running = true;
        while running {
            let now = self.now();
            let wait = match self.engine.next_deadline() {
                _ if !self.carry.is_empty() => 0,
                Some(t) => t.0.saturating_sub(now.0).clamp(1, 60_000),
                None => 60_000,
            };
            let mut cmds = Vec::new();
            match rx.recv_timeout(Duration::from_millis(wait)) {
                Ok(c) => cmds.push(c),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            drain(&rx, &mut cmds);
            let local_only =
                self.carry.is_empty() && !cmds.is_empty() && cmds.iter().all(is_local_change);
            if local_only {
                // Only local edits: an editor typing in a burst. Give the burst a moment so
                // that one step persists many edits (every one is still persisted; `saved()`,
                // a frame or any other command that someone waits on ends the wait at once).
                let until = Instant::now() + local_debounce(self.local_step_cost);
                while let Some(left) = until.checked_duration_since(Instant::now()) {
                    match rx.recv_timeout(left) {
                        Ok(c) => {
                            let wait_on = can_wait(&c)
                                && !matches!(&c, Cmd::Input(Input::Persisted { doc, .. })
                                    if self.save_waiters.contains_key(doc));
                            cmds.push(c);
                            if !wait_on {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
                drain(&rx, &mut cmds);
            }
            let mut inputs = std::mem::take(&mut self.carry);
            let mut after = Vec::new();
            let mut creates = Vec::new();
            let mut just_loaded = Vec::new();
            for c in cmds {
                match c {
                    Cmd::Input(i) => {
                        if let Input::LocalChange { doc } = &i {
                            if let Some(inner) = self.inner.upgrade() {
                                if let Some(ch) = inner.channels.lock().get(doc) {
                                    ch.local_pending.store(false, Ordering::Release);
                                }
                            }
                        }
                        if let Input::Persisted { doc, seq, ok: true } = &i {
                            self.durable.insert(*doc, *seq);
                            self.save_dirty.insert(*doc);
                            self.maybe_compact(*doc, false);
                        }
                        if let Input::Persisted { ok: false, .. } = &i {
                            if let Some(why) = self.store.failure() {
                                // Nothing can be saved, so nothing can be sent (peers only get
                                // what is durable): stop, as for a panic, so that it shows.
                                tracing::error!(error = %why, "storage failed; the sync engine stops");
                                self.stop = Some(super::EngineStop::StorageFailed(why));
                                running = false;
                            }
                        }
                        if let Input::Loaded {
                            doc,
                            loaded: Some(_),
                        } = &i
                        {
                            just_loaded.push(*doc);
                        }
                        if let Input::ConnClosed { conn } = &i {
                            // The socket is gone: drop our sender too, or its queue (a few KiB
                            // each) outlives the connection, one per connection ever served.
                            self.conns.remove(conn);
                        }
                        inputs.push(i)
                    }
                    Cmd::Connect {
                        conn,
                        direction,
                        access,
                        tx,
                    } => {
                        self.conns.insert(conn, tx);
                        inputs.push(Input::ConnOpened {
                            conn,
                            direction,
                            access,
                        });
                    }
                    Cmd::Create { id, doc, reply } => {
                        creates.push((id, reply));
                        inputs.push(Input::Create {
                            doc: id,
                            automerge: doc,
                        });
                    }
                    Cmd::Find { id, reply } => {
                        self.finds.entry(id).or_default().push(reply);
                        inputs.push(Input::Find { doc: id });
                    }
                    Cmd::CancelFind { id } => {
                        // Other finds of the same document may still be waiting.
                        if let Some(waiting) = self.finds.get_mut(&id) {
                            waiting.retain(|r| !r.is_closed());
                            if waiting.is_empty() {
                                self.finds.remove(&id);
                                inputs.push(Input::CancelFind { doc: id });
                            }
                        }
                    }
                    Cmd::Stop { reply } => {
                        stop = Some(reply);
                        running = false;
                    }
                    Cmd::Shutdown => running = false,
                    other => after.push(other),
                }
            }
            let now = self.now();
            if self.engine.next_deadline().is_some_and(|t| t <= now) {
                inputs.push(Input::Tick);
            }
            let n_inputs = inputs.len() as u64;
            let started = Instant::now();
            let effects = self.engine.handle_batch(now, inputs);
            if local_only {
                self.local_step_cost = started.elapsed();
            }
            if let Some(inner) = self.inner.upgrade() {
                let st = &inner.stats;
                st.batches.fetch_add(1, Ordering::Relaxed);
                st.inputs.fetch_add(n_inputs, Ordering::Relaxed);
                st.engine_nanos
                    .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                st.loaded_docs
                    .store(self.engine.loaded_count() as u64, Ordering::Relaxed);
            }
            for e in effects {
                self.effect(e);
            }
            for (id, reply) in creates {
                let _ = reply.send(self.engine.document(&id).ok_or(RepoError::Closed));
            }
            for c in after {
                self.after_batch(c);
            }
            for doc in just_loaded {
                self.maybe_compact(doc, true);
            }
            self.publish_save_states();
        }
        // Shutting down: close sockets, write everything out, fail what still waits.
        for (_, tx) in self.conns.drain() {
            let _ = tx.try_send(Outgoing::Close("shutting down".into()));
        }
        self.loader = None;
        self.applier = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Err(e) = self.store.flush_blocking() {
            tracing::error!(error = %e, "flush at shutdown failed");
        }
        for (_, ws) in self.finds.drain() {
            for w in ws {
                let _ = w.send(Err(RepoError::Closed));
            }
        }
        if let Some(s) = stop {
            let _ = s.send(());
        }
    }

    fn after_batch(&mut self, c: Cmd) {
        match c {
            Cmd::WaitSaved { id, reply } => {
                let target = self.emitted.get(&id).copied().unwrap_or(0);
                if self.durable.get(&id).copied().unwrap_or(0) >= target {
                    let _ = reply.send(Ok(()));
                } else {
                    self.save_waiters
                        .entry(id)
                        .or_default()
                        .push((target, reply));
                }
            }
            Cmd::Flush { reply } => {
                // Everything emitted so far is queued in the store before this empty write.
                self.store.write(Vec::new(), move |r| {
                    let _ = reply.send(r.map_err(RepoError::from));
                });
            }
            Cmd::Loaded { reply } => {
                let _ = reply.send(self.engine.loaded_count());
            }
            _ => {}
        }
    }

    fn effect(&mut self, e: Effect) {
        match e {
            Effect::Send { conn, msg } => {
                let Some(tx) = self.conns.get(&conn) else {
                    return;
                };
                match tx.try_send(Outgoing::Send(msg)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(?conn, "peer is not reading fast enough; disconnecting it");
                        self.conns.remove(&conn);
                        self.carry.push(Input::ConnClosed { conn });
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        self.conns.remove(&conn);
                    }
                }
            }
            Effect::Close { conn, reason } => {
                if let Some(tx) = self.conns.remove(&conn) {
                    let _ = tx.try_send(Outgoing::Close(reason));
                }
            }
            Effect::Apply(job) => {
                if let Some(Err(std::sync::mpsc::SendError(job))) =
                    self.applier.as_ref().map(|a| a.send(job))
                {
                    self.carry.push(job.run());
                }
            }
            Effect::Load { doc } => {
                if self.loader.as_ref().is_none_or(|l| l.send(doc).is_err()) {
                    self.carry.push(Input::Loaded { doc, loaded: None });
                }
            }
            Effect::Persist {
                doc,
                seq,
                chunk,
                snapshot,
                heads,
            } => {
                self.emitted.insert(doc, seq);
                self.emitted_heads.insert(doc, heads);
                self.save_dirty.insert(doc);
                let op = if snapshot {
                    WriteOp::Compact {
                        doc,
                        snapshot: chunk,
                    }
                } else {
                    WriteOp::AppendChunk { doc, bytes: chunk }
                };
                let tx = self.tx.clone();
                self.store.write(vec![op], move |r| {
                    if let Err(e) = &r {
                        tracing::error!(%doc, error = %e, "persisting a chunk failed");
                    }
                    let _ = tx.send(Cmd::Input(Input::Persisted {
                        doc,
                        seq,
                        ok: r.is_ok(),
                    }));
                });
            }
            Effect::SaveSyncState {
                doc,
                storage_id,
                state,
            } => {
                self.store.write(
                    vec![WriteOp::PutSyncState {
                        doc,
                        storage_id,
                        bytes: state,
                    }],
                    |r| {
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "persisting sync state failed");
                        }
                    },
                );
            }
            Effect::Event(ev) => self.event(ev),
        }
    }

    fn event(&mut self, ev: Event) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        match ev {
            Event::PeerConnected { .. } | Event::PeerDisconnected { .. } => {
                let peers = self
                    .engine
                    .connected_peers()
                    .map(|(_, p)| p.clone())
                    .collect();
                inner.peers.send_replace(peers);
            }
            Event::DocReady { doc } => {
                if let Some(ws) = self.finds.remove(&doc) {
                    let shared = self.engine.document(&doc);
                    for w in ws {
                        let _ = w.send(shared.clone().ok_or(RepoError::NotFound(doc)));
                    }
                }
            }
            Event::DocUnavailable { doc } => {
                if let Some(ws) = self.finds.remove(&doc) {
                    for w in ws {
                        let _ = w.send(Err(RepoError::NotFound(doc)));
                    }
                }
            }
            Event::DocChanged { doc, heads, .. } => {
                if let Some(ch) = inner.channels.lock().get(&doc) {
                    // The note may have moved on since the event (a handle's edit): publish
                    // its heads as they are now, under its lock, as handles do, so that the
                    // watch never goes back to older heads (a subscriber would get an event
                    // undoing what it already saw, then one redoing it).
                    let shared = self.engine.document(&doc);
                    let guard = shared.as_ref().map(|d| d.lock());
                    let heads = guard.as_ref().map_or(heads, |d| d.get_heads());
                    ch.heads.send_if_modified(|h| {
                        if *h != heads {
                            *h = heads;
                            true
                        } else {
                            false
                        }
                    });
                }
            }
            Event::SyncStatus { doc, peer, status } => {
                // Kept even before a handle exists: a `find` that resolves after the first
                // sync round must still see that it is synced (eviction drops the entry).
                inner.channels(&doc).sync.send_modify(|m| {
                    if status == crate::engine::PeerSyncStatus::Offline {
                        m.remove(&peer);
                    } else {
                        m.insert(peer, status);
                    }
                });
            }
            Event::RemoteHeads {
                doc,
                storage,
                heads,
                timestamp,
            } => {
                let ms = if timestamp.is_finite() && timestamp > 0.0 {
                    timestamp as u64
                } else {
                    0
                };
                let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
                inner.channels(&doc).remote.send_modify(|m| {
                    m.insert(storage, super::RemoteHeads { heads, at });
                });
            }
            Event::Ephemeral { doc, sender, data } => {
                if let Some(ch) = inner.channels.lock().get(&doc) {
                    let _ = ch.ephemeral.send((sender, data));
                }
            }
            Event::PeerError { conn, error } => {
                tracing::warn!(?conn, %error, "peer error");
            }
            Event::ChangesRefused { conn, error } => {
                tracing::warn!(?conn, %error, "refused a peer's changes; the connection stays open");
                inner
                    .stats
                    .changes_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Event::AccessDenied { conn, doc, reason } => {
                tracing::debug!(?conn, %doc, ?reason, "document refused to peer");
                let counter = match reason {
                    crate::engine::Denied::NotCovered => &inner.stats.docs_denied,
                    crate::engine::Denied::DocLimit => &inner.stats.doc_limit_hits,
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Event::Repair(r) => {
                match &r.outcome {
                    Ok(change) => {
                        tracing::info!(doc = %r.doc, invariant = %r.invariant, violation = %r.violation, %change, "repaired an invariant a merge broke")
                    }
                    Err(e) => {
                        tracing::warn!(doc = %r.doc, invariant = %r.invariant, violation = %r.violation, error = %e, "could not repair an invariant a merge broke")
                    }
                }
                let _ = inner.repairs.send(r);
            }
            Event::Evicted { doc } => {
                let mut chans = inner.channels.lock();
                if chans.get(&doc).is_some_and(|c| Arc::strong_count(c) == 1) {
                    chans.remove(&doc);
                }
                self.emitted.remove(&doc);
                self.emitted_heads.remove(&doc);
                self.durable.remove(&doc);
            }
        }
    }

    /// Publish each document's save state, then resolve `saved()` waiters (in that order,
    /// so a task woken by `saved()` already sees `Saved`).
    fn publish_save_states(&mut self) {
        if self.save_dirty.is_empty() {
            return;
        }
        let dirty = std::mem::take(&mut self.save_dirty);
        if let Some(inner) = self.inner.upgrade() {
            let chans = inner.channels.lock();
            for id in &dirty {
                let Some(seq) = self.emitted.get(id) else {
                    continue;
                };
                if let Some(ch) = chans.get(id) {
                    let durable = self.durable.get(id).copied().unwrap_or(0);
                    // Decided and published under the note's lock, where a handle marks an
                    // edit `Unsaved`: an edit made since the last chunk (its `LocalChange`
                    // not handled yet) keeps it `Unsaved`.
                    let written = durable >= *seq;
                    let shared = written.then(|| self.engine.document(id)).flatten();
                    let doc = shared.as_ref().map(|d| d.lock());
                    let edited_since = match (&doc, self.emitted_heads.get(id)) {
                        (Some(doc), Some(heads)) => doc.get_heads() != *heads,
                        _ => false,
                    };
                    let state = if written && !edited_since {
                        SaveState::Saved
                    } else {
                        SaveState::Unsaved
                    };
                    ch.save.send_if_modified(|s| {
                        if *s != state {
                            *s = state;
                            true
                        } else {
                            false
                        }
                    });
                }
            }
        }
        for id in &dirty {
            let Some(ws) = self.save_waiters.get_mut(id) else {
                continue;
            };
            let durable = self.durable.get(id).copied().unwrap_or(0);
            let (done, wait): (Vec<_>, Vec<_>) = ws.drain(..).partition(|(t, _)| *t <= durable);
            *ws = wait;
            for (_, w) in done {
                let _ = w.send(Ok(()));
            }
            if ws.is_empty() {
                self.save_waiters.remove(id);
            }
        }
    }

    /// Fold a document's chunks into one snapshot when the store says it is time, on a
    /// thread of its own (see [`super::compaction`]). A note `just_loaded` has a lower bar
    /// ([`Store::worth_compacting_after_load`](crate::store::Store::worth_compacting_after_load)).
    fn maybe_compact(&mut self, doc: DocumentId, just_loaded: bool) {
        let due = if just_loaded {
            self.store.worth_compacting_after_load(&doc)
        } else {
            self.store.needs_compaction(&doc)
        };
        if !due {
            return;
        }
        let Some(shared) = self.engine.document(&doc) else {
            return;
        };
        {
            let mut compacting = self.compacting.lock();
            // Loads come in bursts (a relay serving many notes at once); each compaction holds
            // a clone of its note. A note skipped here is compacted at a later load or write.
            if just_loaded && compacting.len() >= MAX_COMPACTIONS_AFTER_LOAD {
                return;
            }
            if !compacting.insert(doc) {
                return;
            }
        }
        let store = self.store.clone();
        let compacting = self.compacting.clone();
        self.threads.retain(|t| !t.is_finished());
        self.threads.push(std::thread::spawn(move || {
            super::compaction::compact(&store, doc, &shared, move |r| {
                if let Err(e) = r {
                    tracing::warn!(%doc, error = %e, "compaction failed");
                }
                compacting.lock().remove(&doc);
            });
        }));
    }
}

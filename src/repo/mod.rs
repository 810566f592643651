//! The runtime: owns the store, the engine thread and the sockets, and hands out
//! [`DocHandle`]s.
//!
//! One thread (the *driver*, `driver.rs`) owns the sans-IO
//! [`Engine`](crate::engine::Engine). Everything else talks to it through one channel: handles report local changes, sockets deliver frames, the store's
//! group-commit writer reports durability. The driver drains the whole channel into one
//! `handle_batch` call, so a busy document is applied once per batch (see the engine docs),
//! then carries out the effects: frames go to each socket's bounded queue, chunks to the
//! store, events to the handles' watch channels.
//!
//! Handles share the document with the engine behind a per-document lock: reading or
//! changing one note never waits for another, nor for the network.

mod compaction;
mod driver;
mod error;
mod handle;
pub mod history;
pub mod presence;
mod repairs;
mod status;
pub mod text;

pub use error::RepoError;
pub use handle::{ChangeEvent, Changes, DocHandle, SaveState};
pub use history::{ChangeInfo, HistoryError};
pub use presence::{PeerPresence, PeerSet, Presence, PresenceConfig, PresenceError};
pub use repairs::Repairs;
pub use status::{NoteStatus, NoteStatusWatch};
pub use text::{TextError, TextIndex, TextMark, TextPatch};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use automerge::Automerge;
use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::{EngineConfig, Input};
use crate::id::{AutomergeUrl, DocumentId, PeerId, StorageId};
use crate::net::client::{spawn_reconnecting, Backoff, ClientConfig, ConnectionState, TokenSource};
use crate::net::shutdown::{shutdown_channel, Shutdown, ShutdownTrigger};
use crate::net::{ConnId, ConnInfo, Hub, Outgoing};
use crate::protocol::Message;
use crate::schema::{RepairEvent, Schema};
use crate::store::{Store, StoreConfig, WriteOp};

use driver::Cmd;

/// The embedded default data directory of the binaries.
pub const DEFAULT_DATA_DIR: &str = "./sheaf-data";

/// How a [`Repo`] behaves.
#[derive(Debug, Clone)]
pub struct RepoConfig {
    pub store: StoreConfig,
    /// Relays never announce documents; peers do.
    pub relay: bool,
    pub peer_id: Option<PeerId>,
    /// How long [`Repo::find`] waits for a peer to have the document.
    pub find_timeout: Duration,
    /// Outgoing frames queued per socket before a slow peer is disconnected.
    pub send_queue: usize,
    /// Tune the engine (hold, grace and eviction times).
    pub engine: Option<EngineConfig>,
    /// Invariants per kind of note (see [`crate::schema`]): local changes that break one are
    /// rejected, merges that break one are repaired. If empty, the schema of `engine` (if
    /// any) is used.
    pub schema: Schema,
}

impl Default for RepoConfig {
    fn default() -> Self {
        Self {
            store: StoreConfig::default(),
            relay: false,
            peer_id: None,
            find_timeout: Duration::from_secs(30),
            send_queue: 1024,
            engine: None,
            schema: Schema::default(),
        }
    }
}

impl RepoConfig {
    pub fn relay() -> Self {
        Self {
            relay: true,
            ..Self::default()
        }
    }
}

/// Per-document channels the driver publishes to.
pub(crate) struct DocChannels {
    pub heads: watch::Sender<Vec<automerge::ChangeHash>>,
    pub save: watch::Sender<SaveState>,
    pub sync: watch::Sender<HashMap<PeerId, crate::engine::PeerSyncStatus>>,
    /// What the storages the repo subscribes to hold of this note.
    pub remote: watch::Sender<HashMap<StorageId, RemoteHeads>>,
    pub ephemeral: tokio::sync::broadcast::Sender<(PeerId, Vec<u8>)>,
    /// A `LocalChange` for this document is queued for the driver: later edits need not
    /// send another (the driver persists up to the heads it finds), which spares a wake-up
    /// of the driver per keystroke.
    pub local_pending: std::sync::atomic::AtomicBool,
}

impl DocChannels {
    fn new() -> Self {
        Self {
            heads: watch::channel(Vec::new()).0,
            save: watch::channel(SaveState::Saved).0,
            sync: watch::channel(HashMap::new()).0,
            remote: watch::channel(HashMap::new()).0,
            ephemeral: tokio::sync::broadcast::channel(256).0,
            local_pending: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// `handle` viewed as of `heads` ([`DocHandle::view`]) once the note has them all: a URL
/// with heads may name changes still on their way from a peer. Waits until `deadline`, then
/// [`RepoError::UnknownHeads`].
async fn view_when_there(
    handle: DocHandle,
    heads: &[automerge::ChangeHash],
    deadline: tokio::time::Instant,
) -> Result<DocHandle, RepoError> {
    let mut moved = handle.heads_watch();
    loop {
        match handle.view(heads) {
            Err(RepoError::UnknownHeads { .. }) => {}
            other => return other,
        }
        match tokio::time::timeout_at(deadline, moved.changed()).await {
            Ok(Ok(())) => {}
            // The deadline passed or the repo closed: say which heads are missing.
            _ => return handle.view(heads),
        }
    }
}

/// The heads another device's storage holds of a note, and when they were seen there (see
/// [`Repo::subscribe_remote_heads`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteHeads {
    pub heads: Vec<automerge::ChangeHash>,
    /// When that storage's peer sent them (to us or to the peer that reported them).
    pub at: std::time::SystemTime,
}

/// Counters of the runtime (for `/metrics`).
#[derive(Debug, Default)]
pub struct RepoStats {
    /// Engine batches handled.
    pub batches: AtomicU64,
    /// Inputs handled (frames, local changes, storage answers...).
    pub inputs: AtomicU64,
    /// Time spent in the engine (applying, generating messages), in nanoseconds.
    pub engine_nanos: AtomicU64,
    /// Documents held in memory after the last batch.
    pub loaded_docs: AtomicU64,
    /// Requests, syncs and ephemeral messages refused because the peer's token does not
    /// cover the document.
    pub docs_denied: AtomicU64,
    /// ... refused because the connection already syncs its maximum of documents.
    pub doc_limit_hits: AtomicU64,
    /// Batches of remote changes refused (they fail the checks of `engine::admit`) on a
    /// connection that stays open (`engine::Event::ChangesRefused`: a forgery by another
    /// peer, passed on by a relay before it checked it).
    pub changes_refused: AtomicU64,
    /// Events delivered by [`DocHandle::changes`] subscriptions.
    pub change_events: AtomicU64,
    /// ... of which had to diff the note for their patches, because a change between the
    /// subscriber's last heads and the new ones logged none (a repair, a reload, a
    /// subscriber far behind). The others took the patches logged when the changes were
    /// made (`engine::DocCell`).
    pub change_events_diffed: AtomicU64,
    /// `ChangeEvent::text_patches` calls that read the text at the event's start from the
    /// note (the subscription had not seen that version of the text yet).
    pub text_reads: AtomicU64,
}

/// Why a repo's engine stopped (see [`Repo::engine_stopped`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineStop {
    /// [`Repo::shutdown`], or the last `Repo` clone dropped.
    Shutdown,
    /// A panic in the engine thread: a bug in sheaf. Nothing acknowledged as saved is lost
    /// (the store is written by its own thread), but the repo does nothing more: its
    /// connections are closed and every call fails with [`RepoError::EngineFailed`]. Restart
    /// it (a relay exits with an error so that its supervisor does).
    Panicked(String),
    /// The store can no longer write (see [`crate::store::Store::failure`]: a full disk, an
    /// I/O error): nothing could be saved, or sent, since peers only get what is durable.
    /// Stopped like a panic; calls fail with [`crate::store::StoreError::Poisoned`].
    StorageFailed(String),
}

impl std::fmt::Display for EngineStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineStop::Shutdown => f.write_str("shut down"),
            EngineStop::Panicked(why) => write!(f, "panicked: {why}"),
            EngineStop::StorageFailed(why) => write!(f, "stopped: storage failed: {why}"),
        }
    }
}

pub(crate) struct Inner {
    pub(crate) stats: Arc<RepoStats>,
    /// Set by the driver thread as it ends.
    stopped: watch::Receiver<Option<EngineStop>>,
    pub(crate) tx: std::sync::mpsc::Sender<Cmd>,
    pub(crate) store: Store,
    pub(crate) peer_id: PeerId,
    pub(crate) storage_id: StorageId,
    config: RepoConfig,
    next_conn: AtomicU64,
    pub(crate) channels: parking_lot::Mutex<HashMap<DocumentId, Arc<DocChannels>>>,
    pub(crate) peers: watch::Sender<Vec<PeerId>>,
    /// Whether this repo syncs over a network: set once a transport takes its hub (it
    /// dialed a peer or serves). A networked repo with no peer connected is offline.
    pub(crate) networked: watch::Sender<bool>,
    /// Its engine announces notes to new connections (a peer's does, a relay's does not).
    pub(crate) announces: bool,
    /// The invariants local changes are checked against (the engine's too).
    pub(crate) schema: Schema,
    pub(crate) repairs: tokio::sync::broadcast::Sender<RepairEvent>,
    driver: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    shutdown: ShutdownTrigger,
    shutdown_rx: Shutdown,
}

impl Inner {
    pub(crate) fn send(&self, cmd: Cmd) -> Result<(), RepoError> {
        self.tx.send(cmd).map_err(|_| self.closed())
    }

    /// The error for a call the engine will never answer.
    pub(crate) fn closed(&self) -> RepoError {
        match &*self.stopped.borrow() {
            Some(EngineStop::Panicked(why)) => RepoError::EngineFailed(why.clone()),
            Some(EngineStop::StorageFailed(why)) => {
                RepoError::Store(crate::store::StoreError::Poisoned(why.clone()))
            }
            _ => RepoError::Closed,
        }
    }

    pub(crate) fn channels(&self, id: &DocumentId) -> Arc<DocChannels> {
        self.channels
            .lock()
            .entry(*id)
            .or_insert_with(|| Arc::new(DocChannels::new()))
            .clone()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.trigger();
        let _ = self.tx.send(Cmd::Shutdown);
        if let Some(h) = self.driver.lock().take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

/// A local-first document repository: a store on disk, an engine, and peers.
#[derive(Clone)]
pub struct Repo {
    pub(crate) inner: Arc<Inner>,
}

impl Repo {
    /// Open (or create) a repository in `path` with default settings.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, RepoError> {
        Self::open_with(path, RepoConfig::default())
    }

    pub fn open_with(path: impl AsRef<Path>, config: RepoConfig) -> Result<Self, RepoError> {
        let path = path.as_ref();
        std::fs::create_dir_all(path).map_err(|source| RepoError::Io {
            path: path.into(),
            source,
        })?;
        let store = Store::open(path, config.store.clone())?;
        let storage_id = storage_id(path)?;
        Ok(Self::start(store, storage_id, config))
    }

    /// A repository on a temporary store (tests, ephemeral peers).
    pub fn temporary(config: RepoConfig) -> Result<Self, RepoError> {
        let store = Store::open_temporary()?;
        Ok(Self::start(store, StorageId::random(), config))
    }

    fn start(store: Store, storage_id: StorageId, config: RepoConfig) -> Self {
        let peer_id = config.peer_id.clone().unwrap_or_else(PeerId::random);
        let mut engine_config = match &config.engine {
            Some(e) => EngineConfig {
                peer_id: peer_id.clone(),
                storage_id: Some(storage_id.clone()),
                ..e.clone()
            },
            None if config.relay => EngineConfig::relay(peer_id.clone(), Some(storage_id.clone())),
            None => EngineConfig::peer(peer_id.clone(), Some(storage_id.clone())),
        };
        if !config.schema.is_empty() {
            engine_config.schema = config.schema.clone();
        }
        let schema = engine_config.schema.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let (trigger, shutdown_rx) = shutdown_channel();
        let (stop_tx, stopped) = watch::channel(None);
        let inner = Arc::new(Inner {
            stats: Arc::new(RepoStats::default()),
            stopped,
            tx,
            store,
            peer_id,
            storage_id,
            config,
            next_conn: AtomicU64::new(1),
            channels: parking_lot::Mutex::new(HashMap::new()),
            peers: watch::channel(Vec::new()).0,
            networked: watch::channel(false).0,
            announces: engine_config.announce,
            schema,
            repairs: tokio::sync::broadcast::channel(repairs::REPAIRS_BUFFER).0,
            driver: parking_lot::Mutex::new(None),
            shutdown: trigger,
            shutdown_rx,
        });
        let handle = driver::spawn(Arc::downgrade(&inner), engine_config, rx, stop_tx);
        *inner.driver.lock() = Some(handle);
        Self { inner }
    }

    pub fn peer_id(&self) -> &PeerId {
        &self.inner.peer_id
    }

    pub fn storage_id(&self) -> &StorageId {
        &self.inner.storage_id
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// A new, empty note (with one empty change, so peers can tell it exists).
    pub async fn create(&self) -> Result<DocHandle, RepoError> {
        let mut doc = Automerge::new();
        doc.empty_commit(Default::default());
        self.create_from(doc).await
    }

    /// Import a document from Automerge bytes (`save()` output or concatenated changes)
    /// as a new note with a fresh id.
    pub async fn import(&self, bytes: &[u8]) -> Result<DocHandle, RepoError> {
        // Checked as remote changes are: garbage and forgeries get an error, not a panic
        // or a note that does not reload.
        let doc = crate::engine::admit::load(bytes).map_err(RepoError::Import)?;
        self.create_from(doc).await
    }

    async fn create_from(&self, doc: Automerge) -> Result<DocHandle, RepoError> {
        let id = DocumentId::random();
        let (reply, rx) = oneshot::channel();
        self.inner.send(Cmd::Create { id, doc, reply })?;
        let shared = rx.await.map_err(|_| self.inner.closed())??;
        Ok(DocHandle::new(self.clone(), id, shared))
    }

    /// Find a note by id or URL: from memory, from disk, or from peers. Waits for a peer to
    /// connect if none is (up to the configured find timeout). A URL with heads
    /// (`automerge:<id>#<head>|...`, as JS `handle.url` of a view) gives a read-only view of
    /// that version ([`DocHandle::view`]), once the note has those heads here (within the
    /// same timeout; else [`RepoError::UnknownHeads`]).
    pub async fn find(&self, id: impl Into<AutomergeUrl>) -> Result<DocHandle, RepoError> {
        let url = id.into();
        let id = url.id;
        let (reply, rx) = oneshot::channel();
        self.inner.send(Cmd::Find { id, reply })?;
        let after = self.inner.config.find_timeout;
        let deadline = tokio::time::Instant::now() + after;
        // Bound first, so the reply channel is dropped before a timeout is reported.
        let answer = tokio::time::timeout(after, rx).await;
        match answer {
            Ok(Ok(Ok(shared))) => {
                let handle = DocHandle::new(self.clone(), id, shared);
                match url.heads {
                    Some(heads) => view_when_there(handle, &heads, deadline).await,
                    None => Ok(handle),
                }
            }
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(self.inner.closed()),
            Err(_) => {
                // Let the runtime forget it (the reply channel is dropped by now), or a
                // document nobody has would stay in memory, asked for, forever.
                let _ = self.inner.send(Cmd::CancelFind { id });
                Err(RepoError::FindTimeout { id, after })
            }
        }
    }

    /// Ids of every stored note, without loading any.
    pub fn list(&self) -> Result<Vec<DocumentId>, RepoError> {
        Ok(self.inner.store.list_documents()?)
    }

    /// Whether this device stores note `id` (one index lookup; nothing is loaded).
    pub fn contains(&self, id: &DocumentId) -> Result<bool, RepoError> {
        Ok(self.inner.store.contains(id)?)
    }

    /// Delete a note from this device (peers keep their copies).
    pub async fn delete(&self, id: DocumentId) -> Result<(), RepoError> {
        self.inner.send(Cmd::Input(Input::Forget { doc: id }))?;
        self.inner
            .store
            .write_durable(vec![WriteOp::DeleteDoc { doc: id }])
            .await?;
        Ok(())
    }

    /// Hear which heads other devices hold of this repo's notes: for each storage id given
    /// (another repo's [`Repo::storage_id`], a JS repo's `storageId()`), the heads it holds of
    /// every note open here, as its device syncs them with a peer of ours, directly or
    /// through a relay (automerge-repo's remote-heads gossip; `sheaf-relay` and JS sync
    /// servers with `enableRemoteHeadsGossiping` pass them on). Read them from
    /// [`DocHandle::remote_heads`]. The subscription is sent to every peer, now and when it
    /// connects.
    pub fn subscribe_remote_heads(
        &self,
        storages: impl IntoIterator<Item = StorageId>,
    ) -> Result<(), RepoError> {
        self.inner.send(Cmd::Input(Input::SubscribeRemoteHeads {
            add: storages.into_iter().collect(),
            remove: Vec::new(),
        }))
    }

    /// Stop hearing about these storages (see [`Repo::subscribe_remote_heads`]).
    pub fn unsubscribe_remote_heads(
        &self,
        storages: impl IntoIterator<Item = StorageId>,
    ) -> Result<(), RepoError> {
        self.inner.send(Cmd::Input(Input::SubscribeRemoteHeads {
            add: Vec::new(),
            remove: storages.into_iter().collect(),
        }))
    }

    /// Wait until every change made so far is durable on disk.
    pub async fn flush(&self) -> Result<(), RepoError> {
        let (reply, rx) = oneshot::channel();
        self.inner.send(Cmd::Flush { reply })?;
        rx.await.map_err(|_| self.inner.closed())?
    }

    /// Peers currently connected (handshake done).
    pub fn peers(&self) -> watch::Receiver<Vec<PeerId>> {
        self.inner.peers.subscribe()
    }

    /// Dial a relay or any automerge-repo server and keep the connection up (reconnecting
    /// with backoff). Edits made offline flow when it comes back. Needs a tokio runtime.
    pub fn connect(&self, url: &str) -> Result<watch::Receiver<ConnectionState>, RepoError> {
        self.connect_with(url, ConnectOptions::default())
    }

    /// [`Repo::connect`] with options, e.g. a capability token for a relay with auth on:
    /// `repo.connect_with(url, ConnectOptions::token(t))`.
    pub fn connect_with(
        &self,
        url: &str,
        options: ConnectOptions,
    ) -> Result<watch::Receiver<ConnectionState>, RepoError> {
        tokio::runtime::Handle::try_current().map_err(|_| RepoError::NoRuntime)?;
        let (state_tx, state_rx) = watch::channel(ConnectionState::Connecting);
        spawn_reconnecting(
            url.to_string(),
            self.hub(),
            ClientConfig {
                token: options.token,
                ..ClientConfig::default()
            },
            options.backoff,
            state_tx,
            self.inner.shutdown_rx.clone(),
        );
        Ok(state_rx)
    }

    /// Like [`Repo::connect`], but the connection can be ended on its own: the returned
    /// [`Connection`] closes the socket (1001) and stops reconnecting when
    /// [`Connection::disconnect`] is called or when it is dropped. Edits made meanwhile stay
    /// local until the next `connect`.
    pub fn connection(&self, url: &str) -> Result<Connection, RepoError> {
        tokio::runtime::Handle::try_current().map_err(|_| RepoError::NoRuntime)?;
        let (state_tx, state_rx) = watch::channel(ConnectionState::Connecting);
        // This connection's own signal fires on disconnect/drop or when the repo shuts down.
        let (trigger, conn_shutdown) = shutdown_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let mut repo_shutdown = self.inner.shutdown_rx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = repo_shutdown.recv() => {}
                _ = stopped => {}
            }
            trigger.trigger();
        });
        let task = spawn_reconnecting(
            url.to_string(),
            self.hub(),
            ClientConfig::default(),
            Backoff::default(),
            state_tx,
            conn_shutdown,
        );
        Ok(Connection {
            state: state_rx,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The repo as the socket layer sees it (to serve connections with [`crate::relay::run`]).
    pub fn hub(&self) -> Arc<dyn Hub> {
        self.inner
            .networked
            .send_if_modified(|n| !std::mem::replace(n, true));
        Arc::new(RepoHub {
            inner: Arc::downgrade(&self.inner),
            queue: self.inner.config.send_queue,
        })
    }

    /// Resolves when the engine has stopped, and says why: after [`Repo::shutdown`], or at
    /// once if a bug made it panic (see [`EngineStop::Panicked`]). A server selects on this
    /// beside its shutdown signal, so that a dead engine is not left behind live sockets.
    pub async fn engine_stopped(&self) -> EngineStop {
        let mut rx = self.inner.stopped.clone();
        let stop = match rx.wait_for(Option::is_some).await {
            Ok(stop) => stop.clone().unwrap_or(EngineStop::Shutdown),
            // The driver thread is gone without a word: it cannot have been a shutdown.
            Err(_) => EngineStop::Panicked("the engine thread ended".into()),
        };
        stop
    }

    /// Why the engine stopped, if it has.
    pub fn engine_stop(&self) -> Option<EngineStop> {
        self.inner.stopped.borrow().clone()
    }

    /// Stop the engine after writing everything out. Pending finds fail with `Closed`.
    pub fn shutdown(&self) -> Result<(), RepoError> {
        self.inner.shutdown.trigger();
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        if self.inner.send(Cmd::Stop { reply }).is_ok() {
            let _ = rx.recv();
        }
        self.inner.store.flush_blocking()?;
        Ok(())
    }

    /// Repairs this peer makes after merges break an invariant, for every note (see
    /// [`crate::schema`]).
    pub fn repairs(&self) -> Repairs {
        Repairs::new(self.inner.repairs.subscribe(), None)
    }

    /// The invariants this repo enforces.
    pub fn schema(&self) -> &Schema {
        &self.inner.schema
    }

    /// Runtime counters, updated after every engine batch.
    pub fn stats(&self) -> Arc<RepoStats> {
        self.inner.stats.clone()
    }

    /// Number of documents the engine holds in memory.
    pub async fn loaded_documents(&self) -> usize {
        let (reply, rx) = oneshot::channel();
        if self.inner.send(Cmd::Loaded { reply }).is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }
}

/// One connection opened with [`Repo::connection`]; ends it when dropped.
#[derive(Debug)]
pub struct Connection {
    state: watch::Receiver<ConnectionState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Connection {
    /// The connection's state as it changes.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// Close the socket and stop reconnecting; resolves once the connection task ended
    /// (the socket's close handshake is bounded by its close timeout).
    pub async fn disconnect(mut self) {
        drop(self.stop.take());
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// How [`Repo::connect_with`] dials.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Asked for a token before each (re)connect.
    pub token: Option<TokenSource>,
    pub backoff: Backoff,
}

impl ConnectOptions {
    /// Always present this token.
    pub fn token(token: impl Into<String>) -> Self {
        Self {
            token: Some(TokenSource::fixed(token)),
            ..Self::default()
        }
    }

    /// Ask `f` for a token before each (re)connect (refresh expiring tokens there).
    pub fn token_fn(f: impl Fn() -> Option<String> + Send + Sync + 'static) -> Self {
        Self {
            token: Some(TokenSource::from_fn(f)),
            ..Self::default()
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        drop(self.stop.take());
    }
}

/// The [`Hub`] side of a repo. Holds the repo weakly so sockets don't keep it alive.
struct RepoHub {
    inner: std::sync::Weak<Inner>,
    queue: usize,
}

impl Hub for RepoHub {
    fn health(&self) -> Result<(), String> {
        let Some(inner) = self.inner.upgrade() else {
            return Err("the repo is closed".into());
        };
        if let Some(why) = inner.store.failure() {
            return Err(format!("storage failed: {why}"));
        }
        let stop = inner.stopped.borrow().clone();
        match stop {
            None => Ok(()),
            Some(stop) => Err(format!("the sync engine {stop}")),
        }
    }

    fn connect(&self, info: ConnInfo) -> (ConnId, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(self.queue.max(1));
        let Some(inner) = self.inner.upgrade() else {
            return (ConnId(0), rx);
        };
        let conn = ConnId(inner.next_conn.fetch_add(1, Ordering::Relaxed));
        let _ = inner.send(Cmd::Connect {
            conn,
            direction: info.direction,
            access: info.access,
            tx,
        });
        (conn, rx)
    }

    fn receive(&self, conn: ConnId, msg: Message) {
        if let Some(inner) = self.inner.upgrade() {
            let _ = inner.send(Cmd::Input(Input::Received { conn, msg }));
        }
    }

    fn disconnect(&self, conn: ConnId) {
        if let Some(inner) = self.inner.upgrade() {
            let _ = inner.send(Cmd::Input(Input::ConnClosed { conn }));
        }
    }
}

/// The storage id of a data directory, made once and kept in `<dir>/storage-id`.
fn storage_id(dir: &Path) -> Result<StorageId, RepoError> {
    let path: PathBuf = dir.join("storage-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(StorageId::new(s.trim())),
        _ => {
            let id = StorageId::random();
            let tmp = dir.join("storage-id.tmp");
            let io = |source| RepoError::Io {
                path: path.clone(),
                source,
            };
            std::fs::write(&tmp, id.as_str()).map_err(io)?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(id)
        }
    }
}

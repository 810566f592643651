//! Persistence: every note is an Automerge document stored in sled as checksummed chunks.
//!
//! # Why it looks like this
//!
//! - **Chunks, not whole documents.** An edit appends its change bytes as an incremental chunk;
//!   rewriting a whole document per keystroke would cost O(document). When the incrementals
//!   outgrow the snapshot ([`Store::needs_compaction`]) the runtime writes a
//!   [`WriteOp::Compact`]: one atomic batch that inserts `doc.save()` and removes the chunks it
//!   covers. Loading stored changes costs several times loading a snapshot, so a note that was
//!   just loaded has a lower bar ([`Store::worth_compacting_after_load`]). Layout in `keys`.
//! - **Checksums.** sled 0.34 has open corruption reports after unclean shutdown and no repair
//!   tool, so every value is `[blake3][payload]` (`checksum`) and every payload is checked to be
//!   Automerge before it is applied (`validate`). A bad chunk is named, quarantined and skipped
//!   (`load`): one bad chunk costs the edits in it, not the note.
//! - **Durable means fsynced.** sled's `flush()` is `sync_file_range`, which survives a process
//!   crash but not power loss, and sled never fsyncs its blob files. A single writer thread
//!   group-commits (`writer`): per batch, shared by every waiting writer, one record appended
//!   to our own commit log and one fdatasync of it (`commit_log`: a quarter of what sled's
//!   flush plus an fdatasync cost), the keys applied to sled, and only then the callbacks. Now
//!   and then a checkpoint makes sled itself durable (flush, fdatasync, fsyncs of new blob
//!   files: `durability`) and the log starts over; at open the log's records since the last
//!   checkpoint are applied again.
//! - **Cheap open and list.** A separate `docs` tree holds one key per document, so
//!   [`Store::list_documents`] reads ids only; sizes for the compaction policy are learned
//!   lazily (`sizes`), nothing is scanned at open.
//!
//! # Trees
//!
//! - `data`: chunks and sync states of every document, keyed by document id first.
//! - `docs`: the document index (`[id: 16] -> []`).
//! - `quarantine`: chunks that failed verification, under their original key, bytes untouched.

mod checksum;
mod commit_log;
mod config;
mod durability;
mod error;
mod keys;
mod load;
mod plan;
mod sizes;
mod stats;
mod validate;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

pub use config::StoreConfig;
pub use error::{CorruptChunk, CorruptReason, StoreError};
pub use keys::ChunkKind;
pub use load::LoadedDoc;
pub use plan::WriteOp;
pub use stats::StoreStats;

use crate::id::DocumentId;
use commit_log::{CommitLog, Recovered};

use durability::Durability;

// For the fuzz harness (`crate::fuzzing`), which writes raw keys and values.
pub(crate) use checksum::seal as raw_seal;
pub(crate) use keys::chunk_key as raw_chunk_key;
use sizes::SizeTable;
use stats::Counters;
/// Whether a payload passes the verification every stored chunk gets at load time.
pub(crate) use validate::validate as validate_chunk;
use writer::{Request, Writer};

/// The document store. Cheap to clone; all clones share one database and one writer thread.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    data: sled::Tree,
    docs: sled::Tree,
    quarantine: sled::Tree,
    sizes: Arc<SizeTable>,
    counters: Arc<Counters>,
    config: StoreConfig,
    tx: Mutex<Option<Sender<Request>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Why the writer stopped writing, once it has (see [`Store::failure`]).
    failure: Arc<std::sync::OnceLock<String>>,
}

/// How long [`Store::open`] retries a directory whose lock is held.
pub const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(1_000);

impl Store {
    /// Opens (or creates) the store in directory `path`.
    ///
    /// Fails with [`StoreError::Locked`] if another process, or another `Store` in this
    /// process, has it open. Reopening right after the last clone of a `Store` was dropped
    /// works: sled's background IO threads may hold the database file (and so its lock) a
    /// moment longer, so a lock held is retried for up to [`LOCK_RETRY`] before it is
    /// reported.
    pub fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<Store, StoreError> {
        let path = path.as_ref();
        let give_up = std::time::Instant::now() + LOCK_RETRY;
        let db = loop {
            let opened = sled::Config::new()
                .path(path)
                .cache_capacity(config.cache_capacity_bytes)
                .flush_every_ms(config.sled_flush_every_ms)
                .idgen_persist_interval(writer::IDGEN_PERSIST_INTERVAL)
                .open()
                .map_err(|e| map_open_error(path, e));
            match opened {
                Err(StoreError::Locked { .. }) if std::time::Instant::now() < give_up => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let counters = Arc::new(Counters::default());
        let durability = Durability::open(path, &counters)?;
        let log = CommitLog::open(path, config.commit_log_bytes)?;
        Self::start(db, Some((durability, log)), config, counters)
    }

    /// A store in a temporary directory that sled deletes on drop; not fsynced. For tests.
    pub fn open_temporary() -> Result<Store, StoreError> {
        let config = StoreConfig::default();
        let db = sled::Config::new()
            .temporary(true)
            .cache_capacity(config.cache_capacity_bytes)
            .open()?;
        Self::start(db, None, config, Arc::new(Counters::default()))
    }

    /// `durable`: how batches are made durable, and what the commit log holds to replay
    /// (`None` for a temporary store).
    fn start(
        db: sled::Db,
        durable: Option<(Durability, (CommitLog, Recovered))>,
        config: StoreConfig,
        counters: Arc<Counters>,
    ) -> Result<Store, StoreError> {
        let data = db.open_tree("data")?;
        let docs = db.open_tree("docs")?;
        let quarantine = db.open_tree("quarantine")?;
        let sizes = Arc::new(SizeTable::default());
        let failure = Arc::new(std::sync::OnceLock::new());
        let (tx, rx) = mpsc::channel();
        let (durability, log, recovered) = match durable {
            None => (None, None, None),
            Some((durability, (log, recovered))) => (Some(durability), Some(log), Some(recovered)),
        };
        let mut writer = Writer {
            db,
            data: data.clone(),
            docs: docs.clone(),
            durability,
            log,
            sizes: sizes.clone(),
            counters: counters.clone(),
            config: config.clone(),
            failure: failure.clone(),
        };
        if let Some(recovered) = recovered {
            // Batches acknowledged before a crash: into sled, and durable there, before anything
            // reads the store or writes a new record.
            writer.replay(recovered)?;
        }
        if config.commit_log_bytes == 0 {
            writer.log = None;
        }
        let handle = std::thread::Builder::new()
            .name("sheaf-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::io("spawning the writer thread", e))?;
        Ok(Store {
            inner: Arc::new(Inner {
                data,
                docs,
                quarantine,
                sizes,
                counters,
                config,
                tx: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(handle)),
                failure,
            }),
        })
    }

    /// Why this store can no longer write, once that has happened: a failed flush or fsync,
    /// or an I/O error inside sled (a full disk, a file over its size limit), after which
    /// nothing written could be promised durable. Every later write fails with
    /// [`StoreError::Poisoned`]; reopening the store is the way back.
    pub fn failure(&self) -> Option<String> {
        self.inner.failure.get().cloned()
    }

    /// Ids of every stored document, read from the index (no document is loaded).
    pub fn list_documents(&self) -> Result<Vec<DocumentId>, StoreError> {
        let mut ids = Vec::new();
        for key in self.inner.docs.iter().keys() {
            let key = key?;
            match DocumentId::try_from_slice(&key) {
                Ok(id) => ids.push(id),
                Err(_) => {
                    tracing::warn!(key = %keys::hex(&key), "docs index holds a malformed id; skipped")
                }
            }
        }
        Ok(ids)
    }

    pub fn contains(&self, id: &DocumentId) -> Result<bool, StoreError> {
        Ok(self.inner.docs.contains_key(id.as_bytes())?)
    }

    /// Loads a document, verifying every chunk. `Ok(None)` if the store has nothing for `id`.
    /// Corrupt chunks are quarantined and reported in [`LoadedDoc::corrupt`].
    pub fn load(&self, id: &DocumentId) -> Result<Option<LoadedDoc>, StoreError> {
        let i = &self.inner;
        let Some(loaded) = load::load(&i.data, &i.docs, &i.quarantine, id)? else {
            return Ok(None);
        };
        Counters::add(&i.counters.corrupt_chunks, loaded.doc.corrupt.len() as u64);
        i.sizes.set(*id, loaded.sizes);
        Ok(Some(loaded.doc))
    }

    /// Enqueues `ops`. `on_durable` runs on the writer thread once the batch holding them is
    /// durable (fsynced), or failed. Ops are applied in submission order.
    pub fn write(
        &self,
        ops: Vec<WriteOp>,
        on_durable: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) {
        let req = Request {
            ops,
            done: Box::new(on_durable),
        };
        let tx = self.inner.tx.lock().clone();
        let Some(tx) = tx else {
            return (req.done)(Err(StoreError::Closed));
        };
        if let Err(mpsc::SendError(req)) = tx.send(req) {
            (req.done)(Err(StoreError::Closed));
        }
    }

    /// [`write`](Self::write), awaiting durability.
    pub async fn write_durable(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.write(ops, move |r| {
            let _ = tx.send(r);
        });
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Blocks until everything enqueued before this call is durable. Do not call it from a
    /// `write` callback (it would wait for the thread it runs on).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.write(Vec::new(), move |r| {
            let _ = tx.send(r);
        });
        rx.recv().map_err(|_| StoreError::Closed)?
    }

    /// The compaction policy: incremental bytes since the last snapshot exceed
    /// [`StoreConfig::compaction_factor`] times the snapshot's size (and at least
    /// [`StoreConfig::compaction_min_bytes`]), or there are more than
    /// [`StoreConfig::compaction_max_chunks`] incremental chunks. `false` for a document this
    /// process has neither loaded nor created.
    pub fn needs_compaction(&self, id: &DocumentId) -> bool {
        self.inner
            .sizes
            .get(id)
            .is_some_and(|s| s.needs_compaction(&self.inner.config))
    }

    /// [`needs_compaction`](Self::needs_compaction), with the lower bar for a note that was
    /// just loaded: its incremental bytes exceed its snapshot's and
    /// [`StoreConfig::compaction_on_load_min_bytes`].
    pub fn worth_compacting_after_load(&self, id: &DocumentId) -> bool {
        self.inner
            .sizes
            .get(id)
            .is_some_and(|s| s.worth_compacting_after_load(&self.inner.config))
    }

    pub fn stats(&self) -> StoreStats {
        self.inner.counters.snapshot()
    }

    /// A sled tree by number (0 `data`, 1 `docs`, else `quarantine`), for the fuzz harness to
    /// write what a corrupt or foreign database could hold.
    pub(crate) fn raw_tree(&self, n: u8) -> &sled::Tree {
        match n {
            0 => &self.inner.data,
            1 => &self.inner.docs,
            _ => &self.inner.quarantine,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued and exit; joining it means
        // sled's lock is released when the last Store clone is gone.
        self.tx.lock().take();
        if let Some(h) = self.writer.lock().take() {
            if h.thread().id() == std::thread::current().id() {
                return; // dropped from a write callback: the thread exits by itself
            }
            if h.join().is_err() {
                tracing::error!("the store writer thread panicked");
            }
        }
    }
}

fn map_open_error(path: &Path, e: sled::Error) -> StoreError {
    match &e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            StoreError::Locked {
                path: PathBuf::from(path),
                detail: io.to_string(),
            }
        }
        _ => StoreError::Sled(e),
    }
}

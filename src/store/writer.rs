//! The single writer thread: group commit.
//!
//! Every `write` becomes a request on a channel. The writer blocks for one request, then takes
//! every other request already waiting (up to `max_batch_ops` / `max_batch_bytes`), turns all
//! their ops into one set of key changes (`plan`), appends that to the commit log and syncs it
//! (one `pwrite`, one `fdatasync`: see `commit_log`), applies the keys to sled's trees, and
//! only then runs the callbacks. Concurrent writers therefore share one fsync: the more of them
//! there are, the bigger the batches. When the log is full or off, or a value is big enough for
//! sled to put in a blob file, the batch takes a checkpoint instead: applied atomically (one
//! sled batch, or one transaction when the `docs` index changes too), then `Db::flush()` and
//! [`Durability::sync`] (fdatasync of sled's file, fsync of new blob files).
//!
//! A failed write, flush or fsync poisons the writer: after a failed fsync the kernel may have dropped
//! the dirty pages, so no later write could honestly be called durable. So does any error from
//! sled while writing (a full disk, a file over its size limit): sled 0.34 has then reserved
//! log space it will never fill, and its next `flush()` waits for it forever (seen with a
//! file-size limit: the writer hung in `flush`, and every `saved()`, the repo's shutdown and
//! the relay's SIGTERM with it). Every later request fails with [`StoreError::Poisoned`],
//! [`super::Store::failure`] says why (a repo stops its engine on it), and the database is
//! kept open to the end of the process, since dropping a sled tree flushes it too.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use sled::transaction::{TransactionError, Transactional};

use super::commit_log::{self, CommitLog, Recovered};
use super::config::StoreConfig;
use super::durability::Durability;
use super::keys::chunk_range;
use super::plan::{Committed, Plan, WriteOp};
use super::sizes::SizeTable;
use super::stats::Counters;
use super::StoreError;
use crate::id::DocumentId;

/// sled's `idgen_persist_interval`, set explicitly at open (see `Writer::next_seq`).
pub(crate) const IDGEN_PERSIST_INTERVAL: u64 = 1_000_000;

/// Values above this size are not logged (see `Writer::log_first`); sled writes items over
/// about 128 KiB (a quarter of its 512 KiB segments) to blob files.
const LOG_MAX_VALUE: usize = 64 * 1024;

pub(crate) type Callback = Box<dyn FnOnce(Result<(), StoreError>) + Send + 'static>;

pub(crate) struct Request {
    pub ops: Vec<WriteOp>,
    pub done: Callback,
}

/// Whether `e` leaves sled unable to write: an I/O error, corruption or a bug it reports,
/// from reading or writing. A refused operation (`Unsupported`, `CollectionNotFound`) does not.
fn wedges_sled(e: &StoreError) -> bool {
    match e {
        StoreError::Sled(e) => !matches!(
            e,
            sled::Error::Unsupported(_) | sled::Error::CollectionNotFound(_)
        ),
        StoreError::BatchFailed(e) => wedges_sled(e),
        StoreError::Io { .. } | StoreError::Poisoned(_) => true,
        StoreError::Locked { .. } | StoreError::Closed | StoreError::CommitLog { .. } => false,
    }
}

pub(crate) struct Writer {
    pub db: sled::Db,
    pub data: sled::Tree,
    pub docs: sled::Tree,
    pub durability: Option<Durability>,
    /// Where batches are made durable; `None` for a temporary store or with the log turned off
    /// (then every batch takes a checkpoint: sled's flush and an `fdatasync`).
    pub log: Option<CommitLog>,
    pub sizes: Arc<SizeTable>,
    pub counters: Arc<Counters>,
    pub config: StoreConfig,
    /// Why the writer is poisoned, once it is (shared with [`super::Store::failure`]).
    pub failure: Arc<std::sync::OnceLock<String>>,
}

impl Committed for Writer {
    fn doc_exists(&self, doc: &DocumentId) -> Result<bool, StoreError> {
        Ok(self.docs.contains_key(doc.as_bytes())?)
    }

    fn doc_keys(&self, doc: &DocumentId, chunks_only: bool) -> Result<Vec<Vec<u8>>, StoreError> {
        let iter = if chunks_only {
            let (start, end) = chunk_range(doc);
            self.data.range(start..end)
        } else {
            self.data.scan_prefix(doc.as_bytes())
        };
        iter.keys()
            .map(|k| k.map(|k| k.to_vec()).map_err(StoreError::from))
            .collect()
    }

    /// sled's id generator persists its counter once per [`IDGEN_PERSIST_INTERVAL`] ids, and
    /// after a crash resumes at the last persisted counter plus twice that. But it leaves the
    /// new counter in its IO buffer: only a later flush of sled makes it durable. Batches made
    /// durable by the commit log never flush sled, so a crash would lose the counter and the
    /// next process would hand out the same ids again, and its chunks would overwrite stored
    /// ones. So the id that makes sled persist its counter (the first of each interval, the
    /// first after a restart among them) is followed by a flush and an fdatasync of sled,
    /// before any chunk numbered from the new range is written.
    fn next_seq(&self) -> Result<u64, StoreError> {
        let id = self.db.generate_id()?;
        if id % IDGEN_PERSIST_INTERVAL == 0 {
            self.db.flush()?;
            if let Some(d) = &self.durability {
                d.sync_db()?;
            }
        }
        Ok(id)
    }
}

impl Writer {
    /// No write from now on (see the module docs); the first reason given is kept.
    fn poison(&self, why: String) {
        if self.failure.set(why).is_ok() {
            // Each sled tree flushes when its last handle is dropped, and a flush of a wedged
            // log waits forever: closing the store would hang the process. Keep the database
            // alive to the end of the process instead (its lock too: a poisoned store is
            // reopened by a new process).
            std::mem::forget(self.db.clone());
        }
    }

    pub fn run(mut self, rx: Receiver<Request>) {
        while let Ok(first) = rx.recv() {
            let mut ops = first.ops.len();
            let mut bytes: usize = first.ops.iter().map(WriteOp::payload_len).sum();
            let mut group = vec![first];
            while ops < self.config.max_batch_ops && bytes < self.config.max_batch_bytes {
                match rx.try_recv() {
                    Ok(r) => {
                        ops += r.ops.len();
                        bytes += r.ops.iter().map(WriteOp::payload_len).sum::<usize>();
                        group.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(group);
        }
        // A clean close leaves the log empty, so the next open has nothing to replay. Not after
        // a failure: a flush of a wedged sled never returns.
        let logged = self.log.as_ref().is_some_and(|l| !l.is_empty());
        if logged && self.failure.get().is_none() {
            match self.checkpoint(&mut std::time::Instant::now()) {
                Ok(()) => {
                    if let Some(Err(e)) = self.log.as_mut().map(CommitLog::shrink) {
                        tracing::warn!(error = %e, "could not truncate the commit log at close");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "checkpoint at close failed; the next open replays the commit log")
                }
            }
        }
        tracing::debug!("store writer: channel closed, exiting");
    }

    fn commit_group(&mut self, group: Vec<Request>) {
        let mut lap = std::time::Instant::now();
        let requests = group.len() as u64;
        let mut callbacks = Vec::with_capacity(group.len());
        let mut plan = Plan::default();
        let mut build_err = None;
        for req in group {
            callbacks.push(req.done);
            if build_err.is_some() || self.failure.get().is_some() {
                continue;
            }
            for op in req.ops {
                if let Err(e) = plan.add(op, &*self, &self.config) {
                    build_err = Some(e);
                    break;
                }
            }
        }
        plan.finish();

        let result = if let Some(p) = self.failure.get() {
            Err(StoreError::Poisoned(p.clone()))
        } else if let Some(e) = build_err {
            Err(StoreError::BatchFailed(Arc::new(e)))
        } else {
            self.commit(&plan, &mut lap)
        };
        if let Err(e) = &result {
            // sled after an error in its write path is wedged: a write that reserved space in
            // its log and failed (a full disk, a file over the size limit) leaves a hole that
            // its next `flush()` waits on forever. Nothing can be written any more.
            if wedges_sled(e) {
                self.poison(e.to_string());
            }
        }

        match &result {
            Ok(()) => {
                for (doc, effect) in plan.sizes.drain() {
                    self.sizes.apply(doc, effect);
                }
                let c = &self.counters;
                Counters::add(&c.batches, 1);
                Counters::add(&c.requests, requests);
                Counters::add(&c.ops_written, plan.ops);
                Counters::add(&c.chunks_written, plan.chunks);
                Counters::add(&c.bytes_written, plan.bytes);
            }
            Err(e) => tracing::error!(error = %e, requests, "store write batch failed"),
        }
        let shared = result.err().map(Arc::new);
        for cb in callbacks {
            let r = match &shared {
                None => Ok(()),
                Some(e) => Err(match &**e {
                    StoreError::Poisoned(p) => StoreError::Poisoned(p.clone()),
                    _ => StoreError::BatchFailed(e.clone()),
                }),
            };
            if catch_unwind(AssertUnwindSafe(|| cb(r))).is_err() {
                tracing::error!("a store write callback panicked; the writer carries on");
            }
        }
    }

    /// With the commit log the record comes first and the key changes after it, one by one:
    /// sled's `apply_batch` makes a batch atomic in its own log by writing out its IO buffer
    /// twice (a seal before and after, each a `pwrite` and a `sync_file_range` on a sled IO
    /// thread, which wakes all of them), and the log's replay already makes the batch atomic
    /// after a crash. Without the log (or for a batch that takes a checkpoint) the batch is
    /// applied atomically and sled is made durable. An error that leaves sled or the log in an
    /// unknown state poisons the writer (`commit_group`, `wedges_sled`).
    fn commit(&mut self, plan: &Plan, lap: &mut std::time::Instant) -> Result<(), StoreError> {
        if self.log_first(plan, lap)? {
            return Ok(());
        }
        apply_writes(&self.data, &self.docs, &plan.data, &plan.docs)?;
        Counters::lap(&self.counters.apply_nanos, lap);
        self.checkpoint(lap)
    }

    /// At open: what the commit log held since its last checkpoint, applied to sled and made
    /// durable there, so that the log can start over.
    pub fn replay(&mut self, recovered: Recovered) -> Result<(), StoreError> {
        if recovered.records == 0 {
            return Ok(());
        }
        let w = &recovered.writes;
        apply_writes(&self.data, &self.docs, &w.data, &w.docs)?;
        self.checkpoint(&mut std::time::Instant::now())?;
        Counters::add(&self.counters.replayed_records, recovered.records);
        tracing::info!(
            records = recovered.records,
            "replayed the commit log after an unclean shutdown"
        );
        Ok(())
    }

    /// The batch as one commit log record, then applied to sled; `Ok(false)` when it takes a
    /// checkpoint instead (no log, a value sled would put in a blob file, or no room left).
    fn log_first(&mut self, plan: &Plan, lap: &mut std::time::Instant) -> Result<bool, StoreError> {
        let Some(log) = &mut self.log else {
            return Ok(false);
        };
        if plan.data.is_empty() && plan.docs.is_empty() {
            // Every earlier batch was durable before its callbacks ran.
            return Ok(true);
        }
        // A value big enough to become a sled blob file takes a checkpoint, which syncs that
        // file at once: logged, it would wait for the next checkpoint, and after a power loss
        // sled's own log could point at a blob that never reached the disk.
        let big = plan
            .data
            .values()
            .any(|v| v.as_ref().is_some_and(|v| v.len() > LOG_MAX_VALUE));
        if big || !log.append(&commit_log::encode(&plan.data, &plan.docs))? {
            return Ok(false);
        }
        Counters::add(&self.counters.fsyncs, 1);
        Counters::add(&self.counters.log_records, 1);
        Counters::lap(&self.counters.sync_nanos, lap);
        if let Err(e) = apply_in_order(&self.data, &self.docs, &plan.data, &plan.docs) {
            // The log holds a batch sled did not take: no later write may be acknowledged
            // before a reopen replays it, whatever the error.
            self.poison(e.to_string());
            return Err(e);
        }
        Counters::lap(&self.counters.apply_nanos, lap);
        // Blob files sled wrote on its own since the last batch (node rewrites).
        if let Some(d) = &mut self.durability {
            d.sync_blobs(&self.counters)?;
        }
        Ok(true)
    }

    /// Makes everything applied to sled so far durable in sled itself (flush, `fdatasync`,
    /// blob fsyncs), then starts a new generation of the commit log.
    fn checkpoint(&mut self, lap: &mut std::time::Instant) -> Result<(), StoreError> {
        self.db.flush()?;
        Counters::lap(&self.counters.flush_nanos, lap);
        if let Some(d) = &mut self.durability {
            d.sync(&self.counters)?;
        }
        if let Some(log) = &mut self.log {
            log.restart()?;
            Counters::add(&self.counters.checkpoints, 1);
        }
        Counters::lap(&self.counters.sync_nanos, lap);
        Ok(())
    }
}

/// Applies a logged batch's key changes one by one, in an order that never shows a reader
/// less than before: values put before keys removed (a compaction's snapshot is there before
/// the chunks it covers go), a note listed after its chunks are in and unlisted before they
/// are removed.
fn apply_in_order(
    data_tree: &sled::Tree,
    docs_tree: &sled::Tree,
    data_writes: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    docs_writes: &BTreeMap<[u8; 16], bool>,
) -> Result<(), StoreError> {
    for (k, v) in data_writes {
        if let Some(v) = v {
            data_tree.insert(k.as_slice(), v.as_slice())?;
        }
    }
    for (k, listed) in docs_writes {
        if *listed {
            docs_tree.insert(&k[..], &[][..])?;
        }
    }
    for (k, listed) in docs_writes {
        if !*listed {
            docs_tree.remove(&k[..])?;
        }
    }
    for (k, v) in data_writes {
        if v.is_none() {
            data_tree.remove(k.as_slice())?;
        }
    }
    Ok(())
}

/// Applies a batch's key changes to the trees: atomically (sled applies a batch to one tree
/// atomically; a transaction when the `docs` index changes too).
fn apply_writes(
    data_tree: &sled::Tree,
    docs_tree: &sled::Tree,
    data_writes: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    docs_writes: &BTreeMap<[u8; 16], bool>,
) -> Result<(), StoreError> {
    if data_writes.is_empty() && docs_writes.is_empty() {
        return Ok(());
    }
    let mut data = sled::Batch::default();
    for (k, v) in data_writes {
        match v {
            Some(v) => data.insert(k.as_slice(), v.as_slice()),
            None => data.remove(k.as_slice()),
        }
    }
    if docs_writes.is_empty() {
        // The common case, appends to listed notes: one tree, to which sled applies a batch
        // atomically. A transaction would cost a read per key written.
        data_tree.apply_batch(data)?;
        return Ok(());
    }
    let mut docs = sled::Batch::default();
    for (k, listed) in docs_writes {
        if *listed {
            docs.insert(&k[..], &[][..]);
        } else {
            docs.remove(&k[..]);
        }
    }
    (data_tree, docs_tree)
        .transaction(|(d, x)| {
            d.apply_batch(&data)?;
            x.apply_batch(&docs)?;
            Ok(())
        })
        .map_err(|e: TransactionError<()>| match e {
            TransactionError::Storage(e) => StoreError::Sled(e),
            TransactionError::Abort(()) => {
                StoreError::Sled(sled::Error::Unsupported("transaction aborted".into()))
            }
        })
}

//! The single writer thread: group commit.
//!
//! Every `write` becomes a request on a channel. The writer blocks for one request, then takes
//! every other request already waiting (up to `max_batch_ops` / `max_batch_bytes`), applies
//! all their ops atomically (one sled batch, or one transaction when the `docs` index changes
//! too), calls `Db::flush()`, then [`Durability::sync`] (fdatasync of the log, fsync of new
//! blob files), and only then runs the callbacks. Concurrent writers therefore share one
//! flush and one fsync: the more of them there are, the bigger the batches.
//!
//! A failed flush or fsync poisons the writer: after a failed fsync the kernel may have dropped
//! the dirty pages, so no later write could honestly be called durable. So does any error from
//! sled while writing (a full disk, a file over its size limit): sled 0.34 has then reserved
//! log space it will never fill, and its next `flush()` waits for it forever (seen with a
//! file-size limit: the writer hung in `flush`, and every `saved()`, the repo's shutdown and
//! the relay's SIGTERM with it). Every later request fails with [`StoreError::Poisoned`],
//! [`super::Store::failure`] says why (a repo stops its engine on it), and the database is
//! kept open to the end of the process, since dropping a sled tree flushes it too.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use sled::transaction::{TransactionError, Transactional};

use super::config::StoreConfig;
use super::durability::Durability;
use super::keys::chunk_range;
use super::plan::{Committed, Plan, WriteOp};
use super::sizes::SizeTable;
use super::stats::Counters;
use super::StoreError;
use crate::id::DocumentId;

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
        StoreError::Locked { .. } | StoreError::Closed => false,
    }
}

pub(crate) struct Writer {
    pub db: sled::Db,
    pub data: sled::Tree,
    pub docs: sled::Tree,
    pub durability: Option<Durability>,
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

    fn next_seq(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
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

    fn commit(&mut self, plan: &Plan, lap: &mut std::time::Instant) -> Result<(), StoreError> {
        if !plan.data.is_empty() || !plan.docs.is_empty() {
            let mut data = sled::Batch::default();
            for (k, v) in &plan.data {
                match v {
                    Some(v) => data.insert(k.as_slice(), v.as_slice()),
                    None => data.remove(k.as_slice()),
                }
            }
            let mut docs = sled::Batch::default();
            for (k, listed) in &plan.docs {
                if *listed {
                    docs.insert(&k[..], &[][..]);
                } else {
                    docs.remove(&k[..]);
                }
            }
            if plan.docs.is_empty() {
                // The common case, appends to listed notes: one tree, to which sled applies a
                // batch atomically. A transaction would cost a read per key written.
                self.data.apply_batch(data)?;
            } else {
                (&self.data, &self.docs)
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
                    })?;
            }
        }
        Counters::lap(&self.counters.apply_nanos, lap);
        // From here on a failure leaves the log in an unknown state: poison.
        let synced = self.db.flush().map_err(StoreError::from).and_then(|_| {
            Counters::lap(&self.counters.flush_nanos, lap);
            let r = match &mut self.durability {
                Some(d) => d.sync(&self.counters),
                None => Ok(()),
            };
            Counters::lap(&self.counters.sync_nanos, lap);
            r
        });
        if let Err(e) = &synced {
            self.poison(e.to_string());
        }
        synced
    }
}

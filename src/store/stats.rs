//! Counters the writer and loader bump, read by [`Store::stats`](super::Store::stats).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A snapshot of the store's counters since open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// `fdatasync` calls that made batches durable: one per committed batch, on the commit log
    /// or, at a checkpoint, on sled's database file.
    pub fsyncs: u64,
    /// Batches made durable by a commit log record (the others took a checkpoint).
    pub log_records: u64,
    /// Checkpoints: sled flushed and synced, and the commit log started over.
    pub checkpoints: u64,
    /// Commit log records replayed into sled when the store was opened (batches acknowledged
    /// before a crash that sled itself had not made durable).
    pub replayed_records: u64,
    /// `fsync` calls on sled blob files and the `blobs/` directory (see `durability`).
    pub blob_fsyncs: u64,
    /// Batches committed (each: one sled transaction and one fsync).
    pub batches: u64,
    /// Write requests (calls to `write`) made durable.
    pub requests: u64,
    /// `WriteOp`s applied.
    pub ops_written: u64,
    /// Chunks stored after coalescing appends.
    pub chunks_written: u64,
    /// Payload bytes written (chunks, snapshots, sync states).
    pub bytes_written: u64,
    /// Chunks found corrupt and quarantined by `load`.
    pub corrupt_chunks: u64,
    /// Time the writer spent in each phase of its batches, in nanoseconds: building the plan
    /// and applying it to sled; sled's `flush()` (checkpoints only); the commit log's write and
    /// `fdatasync`, or at a checkpoint sled's `fdatasync` plus blob fsyncs.
    pub apply_nanos: u64,
    pub flush_nanos: u64,
    pub sync_nanos: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub fsyncs: AtomicU64,
    pub log_records: AtomicU64,
    pub checkpoints: AtomicU64,
    pub replayed_records: AtomicU64,
    pub blob_fsyncs: AtomicU64,
    pub batches: AtomicU64,
    pub requests: AtomicU64,
    pub ops_written: AtomicU64,
    pub chunks_written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub corrupt_chunks: AtomicU64,
    pub apply_nanos: AtomicU64,
    pub flush_nanos: AtomicU64,
    pub sync_nanos: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// Add the time since `since` to `c`, and restart `since`.
    pub fn lap(c: &AtomicU64, since: &mut std::time::Instant) {
        let now = std::time::Instant::now();
        c.fetch_add(now.duration_since(*since).as_nanos() as u64, Relaxed);
        *since = now;
    }

    pub fn snapshot(&self) -> StoreStats {
        StoreStats {
            fsyncs: self.fsyncs.load(Relaxed),
            log_records: self.log_records.load(Relaxed),
            checkpoints: self.checkpoints.load(Relaxed),
            replayed_records: self.replayed_records.load(Relaxed),
            blob_fsyncs: self.blob_fsyncs.load(Relaxed),
            batches: self.batches.load(Relaxed),
            requests: self.requests.load(Relaxed),
            ops_written: self.ops_written.load(Relaxed),
            chunks_written: self.chunks_written.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            corrupt_chunks: self.corrupt_chunks.load(Relaxed),
            apply_nanos: self.apply_nanos.load(Relaxed),
            flush_nanos: self.flush_nanos.load(Relaxed),
            sync_nanos: self.sync_nanos.load(Relaxed),
        }
    }
}

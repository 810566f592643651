//! Tuning knobs for the store.

/// Configuration for [`Store::open`](super::Store::open).
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// sled's page cache. sled 0.34 does not strictly bound memory by it (sled #1309), so the
    /// default is deliberately low: 64 MiB.
    pub cache_capacity_bytes: u64,
    /// Group commit: the writer drains every waiting request, up to this many ops per batch.
    pub max_batch_ops: usize,
    /// Group commit: ... and up to this many payload bytes per batch.
    pub max_batch_bytes: usize,
    /// Consecutive appends to one document in a batch are stored as one chunk, up to this size.
    pub max_coalesced_chunk_bytes: usize,
    /// Compaction policy: compact once incremental bytes exceed `compaction_factor` times the
    /// snapshot's size, but never below this many bytes. A snapshot is compressed and change
    /// chunks are not (typing makes ~50-100x more incremental bytes than snapshot bytes), and
    /// each compaction re-encodes the whole note (41 ms for the automerge-paper note), so a
    /// factor of 1 would compact a busy long note every few hundred keystrokes.
    pub compaction_min_bytes: u64,
    /// Compaction policy: see `compaction_min_bytes`.
    pub compaction_factor: u64,
    /// Compaction policy: ... or once there are more than this many incremental chunks.
    pub compaction_max_chunks: u64,
    /// Compaction on load: a note just loaded is compacted at once when its incremental bytes
    /// exceed both its snapshot's and this floor. Applying stored changes costs several times
    /// loading the same note from a snapshot (the automerge-paper note from 260 chunks of
    /// 348 KB: 1.0-1.1 s, from its 129 KB snapshot: 0.22-0.30 s), so a note that is
    /// evicted and reloaded, as on a relay, would pay that every time; a compaction right
    /// after the load is a clone and a save of a note that is in memory anyway.
    pub compaction_on_load_min_bytes: u64,
    /// Bytes of records the commit log holds between checkpoints (see `store::commit_log`);
    /// the file grows to this plus 4 KiB while the store is open (a clean close truncates
    /// it), and a checkpoint (a sled flush and fsyncs) comes once per this many bytes logged:
    /// 2 MiB, some 10,000 keystrokes. 0 turns the log off: every batch then flushes and syncs
    /// sled itself, 4-5x slower per batch. A log left by an earlier run is replayed either way.
    pub commit_log_bytes: u64,
    /// sled's own background flush of its log, every this many milliseconds (`None`: only when
    /// an IO buffer fills, and at checkpoints). Durability does not depend on it; it bounds
    /// what sled loses in a crash, and so what the commit log replays at the next open.
    pub sled_flush_every_ms: Option<u64>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            cache_capacity_bytes: 64 * 1024 * 1024,
            max_batch_ops: 4096,
            max_batch_bytes: 16 * 1024 * 1024,
            max_coalesced_chunk_bytes: 1024 * 1024,
            compaction_min_bytes: 1024 * 1024,
            compaction_factor: 8,
            compaction_max_chunks: 2_000,
            compaction_on_load_min_bytes: 64 * 1024,
            commit_log_bytes: 2 * 1024 * 1024,
            sled_flush_every_ms: Some(500),
        }
    }
}

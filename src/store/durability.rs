//! Making a committed batch survive power loss, not just a process crash.
//!
//! What sled 0.34.7 does on `flush()` (read in `pagecache/iobuf.rs`, `blob_io.rs`,
//! `config.rs`):
//!
//! - The log lives in one file, `<dir>/db`. `flush()` writes the dirty IO buffers with `pwrite`
//!   and then calls `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` on the written range
//!   (`fsync` only where that returns `ENOSYS`, or on non-Linux). `sync_file_range` pushes the
//!   data pages but neither the file's metadata (its size, when the log grew) nor the disk's
//!   write cache: it protects against a process crash, not against power loss. For temporary
//!   databases sled skips even that.
//! - A log item larger than `segment_size / 4 - 20` bytes (about 128 KiB with the default
//!   512 KiB segments; that is a serialized tree node, so one big value or a node of many
//!   values) is written to its own file `<dir>/blobs/<lsn>` by `write_blob`: `create_new`,
//!   `write_all`, and **no fsync at all**, neither of the file nor of the `blobs/` directory.
//!   The log then only holds the blob's lsn. After power loss the log can point at a blob that
//!   is missing or short (sled reports that as corruption on read).
//! - Snapshots (`snap.*`) are written with `sync_all` by sled itself; segment-level fsyncs
//!   happen on its own schedule, not on our `flush()`.
//! - The lock is an `flock` (fs2 `try_lock_exclusive`) on `<dir>/db`. flock belongs to the open
//!   file description, so opening a second handle to `db` here and closing it does not release
//!   sled's lock (an `fcntl` lock would have been released; this matters).
//!
//! So after every `flush()` the writer calls [`Durability::sync`]: `fdatasync` of `<dir>/db`
//! (data and size), then `fsync` of every blob file not synced before, and of the `blobs/`
//! directory when a new blob appeared, so the directory entry survives too. At open the store
//! directory itself, `blobs/` and any existing blob file are synced once (a previous process may
//! have been killed before it synced them). Only then are callbacks told the batch is durable.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::stats::Counters;
use super::StoreError;

pub(crate) struct Durability {
    db_file: File,
    blobs_dir: PathBuf,
    synced_blobs: HashSet<OsString>,
}

impl Durability {
    /// Opens the handles and syncs what a previous process may have left unsynced.
    pub fn open(dir: &Path, counters: &Counters) -> Result<Self, StoreError> {
        let db_file = File::options()
            .read(true)
            .write(true)
            .open(dir.join("db"))
            .map_err(|e| StoreError::io("opening the database file for fsync", e))?;
        db_file
            .sync_data()
            .map_err(|e| StoreError::io("syncing the database file", e))?;
        sync_dir(dir).map_err(|e| StoreError::io("syncing the store directory", e))?;
        let mut this = Self {
            db_file,
            blobs_dir: dir.join("blobs"),
            synced_blobs: HashSet::new(),
        };
        this.sync_blobs(counters)?;
        Ok(this)
    }

    /// `fdatasync` of sled's database file only (see `Writer::next_seq`).
    pub fn sync_db(&self) -> Result<(), StoreError> {
        self.db_file
            .sync_data()
            .map_err(|e| StoreError::io("fdatasync of the database file", e))
    }

    /// Call after `Db::flush()`: makes everything flushed so far durable.
    pub fn sync(&mut self, counters: &Counters) -> Result<(), StoreError> {
        self.db_file
            .sync_data()
            .map_err(|e| StoreError::io("fdatasync of the database file", e))?;
        Counters::add(&counters.fsyncs, 1);
        self.sync_blobs(counters)
    }

    /// fsync of blob files not synced before (and of `blobs/` when one appeared).
    pub fn sync_blobs(&mut self, counters: &Counters) -> Result<(), StoreError> {
        let entries = match std::fs::read_dir(&self.blobs_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::io("listing sled's blobs directory", e)),
        };
        let mut present = HashSet::new();
        let mut new_blob = false;
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("listing sled's blobs directory", e))?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => {
                        f.sync_all()
                            .map_err(|e| StoreError::io("fsync of a sled blob file", e))?;
                        Counters::add(&counters.blob_fsyncs, 1);
                        new_blob = true;
                    }
                    // sled garbage-collected it between read_dir and open
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(StoreError::io("opening a sled blob file", e)),
                }
            }
            present.insert(name);
        }
        if new_blob {
            sync_dir(&self.blobs_dir)
                .map_err(|e| StoreError::io("fsync of sled's blobs directory", e))?;
            Counters::add(&counters.blob_fsyncs, 1);
        }
        // forget removed blobs so the set stays as small as the directory
        self.synced_blobs = present;
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

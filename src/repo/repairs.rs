//! [`Repairs`]: the repairs this peer made after merges, as a stream (see [`crate::schema`]).

use tokio::sync::broadcast;

use crate::id::DocumentId;
use crate::schema::RepairEvent;

/// How many repair events wait for a slow subscriber before the oldest are dropped.
pub(crate) const REPAIRS_BUFFER: usize = 1024;

/// A subscription to repair events, from [`crate::Repo::repairs`] (every note) or
/// [`crate::DocHandle::repairs`] (one note). Only repairs made after it was taken are seen.
pub struct Repairs {
    rx: broadcast::Receiver<RepairEvent>,
    doc: Option<DocumentId>,
    missed: u64,
}

impl Repairs {
    pub(crate) fn new(rx: broadcast::Receiver<RepairEvent>, doc: Option<DocumentId>) -> Self {
        Self { rx, doc, missed: 0 }
    }

    /// The next repair; `None` when the repo is gone.
    pub async fn next(&mut self) -> Option<RepairEvent> {
        loop {
            match self.rx.recv().await {
                Ok(e) if self.doc.is_none_or(|d| d == e.doc) => return Some(e),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => self.missed += n,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// A repair already waiting, without waiting for one.
    pub fn try_next(&mut self) -> Option<RepairEvent> {
        loop {
            match self.rx.try_recv() {
                Ok(e) if self.doc.is_none_or(|d| d == e.doc) => return Some(e),
                Ok(_) => {}
                Err(broadcast::error::TryRecvError::Lagged(n)) => self.missed += n,
                Err(_) => return None,
            }
        }
    }

    /// Events dropped because this subscriber fell more than 1024 behind (of every note,
    /// not only the one watched).
    pub fn missed(&self) -> u64 {
        self.missed
    }
}

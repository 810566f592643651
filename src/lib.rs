//! sheaf: a local-first document store.
//!
//! Every note is an Automerge document persisted in sled on the device; edits are saved
//! locally first and exchanged with peers or a relay over the automerge-repo WebSocket
//! protocol when a network is there.
//!
//! # Layout
//!
//! - [`auth`]: capability tokens (blake3-keyed MACs) and the per-connection [`auth::Access`].
//! - [`id`]: document ids, `automerge:` URLs, peer and storage ids.
//! - [`protocol`]: the wire messages and their CBOR codec (a total decoder).
//! - [`store`]: persistence in sled: checksummed chunks, group commit through a commit log,
//!   compaction.
//! - [`engine`]: the sans-IO sync engine: `handle(now, inputs) -> effects`.
//! - [`net`]: the seam between sockets and the engine ([`net::Hub`]); the WebSocket dialer
//!   with reconnect and backoff ([`net::client`]).
//! - [`relay`]: the WebSocket server: `run(listener, hub, config, shutdown)`, the per-socket
//!   loop (limits, keepalive, close codes), `/health` and Prometheus `/metrics`.
//! - [`repo`]: the runtime: [`Repo`] (store + engine thread + sockets) and [`DocHandle`];
//!   one status per note for an editor to show ([`NoteStatus`]: saving, saved, offline,
//!   syncing, synced, declined; `repo/status.rs`); editor helpers: rich text at code-point or
//!   UTF-16 offsets ([`repo::text`]), history ([`repo::history`]) and typed presence over
//!   ephemeral messages, JS-compatible ([`repo::presence`]: the wire envelope, the sans-IO
//!   tracker, the tokio task). The `sheaf` binary is the command line over it.
//! - [`schema`]: invariants per kind of note (a check and a deterministic repair); the
//!   built-ins [`schema::UniqueList`] and [`schema::RequiredField`]. Local changes that break
//!   one are rejected ([`DocHandle::change`]); merges that break one are repaired by the
//!   engine (`src/schema/mod.rs`, `builtin.rs`, `tests.rs`).
//! - [`sim`]: the deterministic network simulator (tests, fuzzing).
//! - `traces`: loaders for the editing traces in `shared/traces` and document builders
//!   (tests and benchmarks; hidden from the docs).
//! - [`error`]: the crate's top-level error.
//! - `fuzzing` (hidden): bodies of the cargo-fuzz targets in `fuzz/`, shared with
//!   `tests/fuzz_regressions.rs`.

pub mod auth;
pub mod engine;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod id;
pub mod net;
pub mod protocol;
pub mod relay;
pub mod repo;
pub mod schema;
pub mod sim;
pub mod store;
#[doc(hidden)]
pub mod traces;

pub use error::Error;
pub use id::{AutomergeUrl, DocumentId, PeerId, StorageId};
pub use net::client::ConnectionState;
pub use repo::{
    ConnectOptions, DocHandle, EngineStop, NoteStatus, NoteStatusWatch, RemoteHeads, Repo,
    RepoConfig, RepoError,
};

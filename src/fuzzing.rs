//! Bodies of the cargo-fuzz targets in `fuzz/`, kept in the library so that
//! `tests/fuzz_regressions.rs` replays every committed crash and seed through the very same
//! code (the targets are one-liners calling these).
//!
//! Each function takes raw fuzz bytes, reads them through [`arbitrary::Unstructured`] (any
//! bytes are a valid input; missing bytes read as zeros) and panics only on a real bug:
//!
//! - [`converge`]: a schedule of [`sim::Action`]s on 2-5 peers, then heal and settle; every
//!   replica must have identical heads and content.
//! - [`converge_invariants`]: the same, with every peer enforcing [`fuzz_schema`] (the random
//!   edits break it all the time); every replica must also keep the invariants, and every
//!   repair must have succeeded.
//! - [`wire_decode`]: [`protocol::decode`] never panics, what decodes re-encodes to bytes
//!   that decode to the same message, and a relay engine takes it from a peer (with another
//!   peer subscribed to the storages it names) without panicking.
//! - [`sync_message`]: bytes as an incoming `sync`/`request` for a document the engine holds,
//!   on a ready connection: a typed error and a close, or a merge; never a panic; what the
//!   engine persisted reloads to the engine's heads and passes the store's verification.
//! - [`forged_changes`]: honest changes altered and encoded again (checksums right), sent
//!   to the same harness: whatever is admitted leaves a note that saves and reloads.
//! - [`store_load`]: arbitrary chunks written through [`Store`] and raw keys and values put
//!   straight into its sled trees: loading never panics, and a load after the quarantine is
//!   clean and gives the same document.
//! - [`presence`]: the bytes as a peer's ephemeral payload: presence decoding is total, what
//!   decodes as presence re-encodes to the same message, and a presence tracker fed it from
//!   several senders keeps its bounds (cap, never itself, expiry).
//!
//! - [`http_auth`]: the bytes as a request head (the relay's routing and its token), or as a
//!   token payload sent with a wrong MAC or signed with the ring's key: parsing is total,
//!   nothing forged verifies, and what verifies is current and mints back to itself.
//!
//! Byte layouts are simple (a flag byte, then lengths as two big-endian bytes) so that seed
//! corpora can be written from real messages and chunks: see [`seeds`].

use arbitrary::{Arbitrary, Unstructured};
use automerge::sync::{ChunkList, Message as SyncMessage, MessageVersion};
use automerge::{Automerge, ReadDoc};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::engine::{Effect, Engine, EngineConfig, Event, Input, Millis};
use crate::id::{DocumentId, PeerId, StorageId};
use crate::net::{ConnId, Direction};
use crate::protocol::{self, Message, PeerMetadata, PROTOCOL_VERSION};
use crate::schema::{FieldDefault, RequiredField, Schema, UniqueList};
use crate::sim::{self, Action, Sim, SimConfig, Topology};
use crate::store::{ChunkKind, Store, WriteOp};

/// At most this many actions per `converge` input (keeps one execution well under a second).
pub const MAX_ACTIONS: usize = 400;

/// Reads a length (two big-endian bytes) and then up to that many bytes.
fn chunk<'a>(u: &mut Unstructured<'a>) -> &'a [u8] {
    let len = match u.bytes(2) {
        Ok(b) => usize::from(u16::from_be_bytes([b[0], b[1]])),
        Err(_) => return &[],
    };
    let len = len.min(u.len());
    u.bytes(len).unwrap_or(&[])
}

fn byte(u: &mut Unstructured<'_>) -> u8 {
    u8::arbitrary(u).unwrap_or(0)
}

// ---- converge --------------------------------------------------------------------------------

/// Layout: `[peers][topology|docs][max delay][seed: 8]` then [`Action`]s (derived `Arbitrary`).
pub fn converge(data: &[u8]) {
    converge_with(data, None);
}

/// [`converge`] with every peer enforcing [`fuzz_schema`]: replicas must also keep its
/// invariants, and every repair must succeed. Same input layout (the same seeds serve).
pub fn converge_invariants(data: &[u8]) {
    converge_with(data, Some(fuzz_schema()));
}

/// What [`converge_invariants`] enforces on the simulator's documents (a list, a text, root
/// keys `k0..k3` that random edits put and delete): the list holds no value twice; the text
/// and `k0` exist.
pub fn fuzz_schema() -> Schema {
    Schema::new()
        .classify_with(|_| Some("sim".to_string()))
        .invariant("sim", UniqueList::new("list"))
        .invariant(
            "sim",
            RequiredField::new("text", FieldDefault::Text(String::new())),
        )
        .invariant(
            "sim",
            RequiredField::new("k0", FieldDefault::Scalar(automerge::ScalarValue::Int(0))),
        )
}

fn converge_with(data: &[u8], schema: Option<Schema>) {
    let mut u = Unstructured::new(data);
    let peers = 2 + usize::from(byte(&mut u) % 4);
    let b = byte(&mut u);
    let topology = if b & 1 == 0 {
        Topology::Star
    } else {
        Topology::Mesh
    };
    let docs = 1 + usize::from((b >> 1) & 1);
    let max_delay_ms = u64::from(byte(&mut u) % 51);
    let seed = u64::arbitrary(&mut u).unwrap_or(0);
    let config = SimConfig {
        peers,
        docs,
        topology,
        max_delay_ms,
        steps: 0,
        faults: true,
    };
    let checked = schema.is_some();
    let mut sim = Sim::with_schema(seed, config.clone(), schema.unwrap_or_default());
    let mut actions = Vec::new();
    while !u.is_empty() && actions.len() < MAX_ACTIONS {
        let Ok(a) = Action::arbitrary(&mut u) else {
            break;
        };
        sim.apply(&a);
        actions.push(a);
    }
    let result = sim
        .heal_and_settle()
        .and_then(|_| sim.check_converged())
        .and_then(|_| {
            if checked {
                sim.check_invariants()
            } else {
                Ok(())
            }
        })
        .and_then(|_| {
            let failed = sim
                .nodes
                .iter()
                .flat_map(|n| &n.repairs)
                .find(|r| !r.repaired());
            failed.map_or(Ok(()), |r| Err(format!("a repair failed: {r:?}")))
        });
    if let Err(e) = result {
        let keep = if sim.verbose { usize::MAX } else { 80 };
        let tail: Vec<&String> = sim.trace.iter().rev().take(keep).collect();
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
        panic!("did not converge: {e}\nconfig: {config:?}, seed {seed}\nactions: {actions:?}");
    }
}

// ---- wire_decode -----------------------------------------------------------------------------

/// Layout: the bytes are one frame.
pub fn wire_decode(data: &[u8]) {
    let Ok(msg) = protocol::decode(data) else {
        return;
    };
    let bytes = protocol::encode(&msg);
    let again = protocol::decode(&bytes)
        .unwrap_or_else(|e| panic!("re-encoding of {msg:?} does not decode: {e}"));
    // `Debug` equality too, so a NaN timestamp (never `==` itself) still has to round-trip.
    if again != msg && format!("{again:?}") != format!("{msg:?}") {
        panic!("round trip changed the message:\n  {msg:?}\n  {again:?}");
    }
    assert_eq!(
        protocol::encode(&again),
        bytes,
        "encoding is not stable for {msg:?}"
    );
    relay_takes(msg);
}

/// A relay engine takes `msg` from a joined peer, while a second peer subscribes to every
/// storage id it names and holds its document open (so that gossip is passed on), without
/// panicking, and goes quiet.
fn relay_takes(msg: Message) {
    let mut engine = Engine::new(EngineConfig::relay(
        PeerId::new("fuzz-relay"),
        Some(StorageId::new("fuzz-relay-storage")),
    ));
    let mut inputs = Vec::new();
    for n in 1..=2u64 {
        inputs.push(Input::ConnOpened {
            conn: ConnId(n),
            direction: Direction::Incoming,
            access: None,
        });
        inputs.push(Input::Received {
            conn: ConnId(n),
            msg: Message::Join {
                sender_id: PeerId::new(format!("fuzz-peer-{n}")),
                peer_metadata: PeerMetadata {
                    storage_id: Some(StorageId::new(format!("fuzz-peer-{n}-storage"))),
                    is_ephemeral: false,
                    accepts_unchecked: false,
                },
                supported_protocol_versions: vec![PROTOCOL_VERSION.to_string()],
            },
        });
    }
    let mut watch = vec![StorageId::new("fuzz-peer-1-storage")];
    match &msg {
        Message::RemoteHeadsChanged { new_heads, .. } => watch.extend(new_heads.keys().cloned()),
        Message::RemoteSubscriptionChange { add, .. } => watch.extend(add.iter().cloned()),
        _ => {}
    }
    let watcher = |msg| Input::Received {
        conn: ConnId(2),
        msg,
    };
    inputs.push(watcher(Message::RemoteSubscriptionChange {
        sender_id: PeerId::new("fuzz-peer-2"),
        target_id: PeerId::new("fuzz-relay"),
        add: watch,
        remove: Vec::new(),
    }));
    if let Some(doc) = msg.document_id() {
        let mut state = automerge::sync::State::new();
        let empty = automerge::sync::SyncDoc::generate_sync_message(&Automerge::new(), &mut state);
        inputs.push(watcher(Message::Request {
            sender_id: PeerId::new("fuzz-peer-2"),
            target_id: PeerId::new("fuzz-relay"),
            document_id: doc,
            data: empty.map(|m| m.encode()).unwrap_or_default(),
        }));
    }
    inputs.push(Input::Received {
        conn: ConnId(1),
        msg,
    });
    let mut now = Millis(0);
    for _ in 0..1_000 {
        if inputs.is_empty() {
            return;
        }
        now = now.plus(1);
        for e in engine.handle_batch(now, std::mem::take(&mut inputs)) {
            match e {
                Effect::Load { doc } => inputs.push(Input::Loaded { doc, loaded: None }),
                Effect::Persist { doc, seq, .. } => {
                    inputs.push(Input::Persisted { doc, seq, ok: true })
                }
                Effect::Apply(job) => inputs.push(job.run()),
                _ => {}
            }
        }
    }
    panic!("the relay did not go quiet within 1000 rounds");
}

// ---- sync_message ----------------------------------------------------------------------------

/// The document the `sync_message` engine holds: [`sim::seed_document`] from a fixed seed
/// plus `edits` fixed-actor edits, so heads are the same on every run.
pub fn sync_base_document(edits: u8) -> Automerge {
    let mut rng = StdRng::seed_from_u64(0x5eaf);
    let mut doc = sim::seed_document(&mut rng);
    doc.set_actor(automerge::ActorId::from(b"sheaf-fuzz-local".to_vec()));
    for _ in 0..edits {
        sim::random_edit(&mut doc, &mut rng);
    }
    doc
}

/// The id of the `sync_message` document.
pub const SYNC_DOC: DocumentId = DocumentId::from_bytes(*b"sheaf-fuzz-doc-1");

/// Layout: `[flags]` then the payload. Flags: bit 0 = `request` instead of `sync`; bit 1 =
/// the payload is change bytes to wrap in a well-formed sync message carrying our heads
/// (else the payload is the whole `data` field); bits 2-3 = local edits before it arrives;
/// bit 4 = a second message follows (`[len: 2][bytes]` first, then the rest).
pub fn sync_message(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let flags = byte(&mut u);
    let edits = (flags >> 2) & 3;
    let mut payloads = Vec::new();
    if flags & 16 != 0 {
        payloads.push(chunk(&mut u).to_vec());
    }
    payloads.push(u.take_rest().to_vec());

    let mut h = SyncHarness::new(edits);
    for p in payloads {
        let data = if flags & 2 != 0 {
            h.changes_message(ChunkList::from(p))
        } else {
            p
        };
        let msg = if flags & 1 != 0 {
            Message::Request {
                sender_id: h.remote.clone(),
                target_id: h.local.clone(),
                document_id: SYNC_DOC,
                data,
            }
        } else {
            h.sync(data)
        };
        h.run(vec![Input::Received { conn: h.conn, msg }]);
    }
    h.check();
}

/// An engine holding [`SYNC_DOC`] with one ready incoming connection; every `Persist` is
/// written to an in-memory disk and acknowledged.
struct SyncHarness {
    engine: Engine,
    conn: ConnId,
    local: PeerId,
    remote: PeerId,
    disk: Vec<Vec<u8>>,
    errors: Vec<ConnId>,
    closed: Vec<ConnId>,
    now: Millis,
}

impl SyncHarness {
    fn new(edits: u8) -> Self {
        let local = PeerId::new("fuzz-local");
        let remote = PeerId::new("fuzz-remote");
        let engine = Engine::new(EngineConfig::peer(
            local.clone(),
            Some(StorageId::new("fuzz-local-storage")),
        ));
        let mut h = Self {
            engine,
            conn: ConnId(1),
            local,
            remote,
            disk: Vec::new(),
            errors: Vec::new(),
            closed: Vec::new(),
            now: Millis(0),
        };
        h.run(vec![
            Input::Create {
                doc: SYNC_DOC,
                automerge: sync_base_document(edits),
            },
            Input::ConnOpened {
                conn: h.conn,
                direction: Direction::Incoming,
                access: None,
            },
            Input::Received {
                conn: h.conn,
                msg: Message::Join {
                    sender_id: h.remote.clone(),
                    peer_metadata: PeerMetadata {
                        storage_id: Some(StorageId::new("fuzz-remote-storage")),
                        is_ephemeral: false,
                        accepts_unchecked: false,
                    },
                    supported_protocol_versions: vec![PROTOCOL_VERSION.to_string()],
                },
            },
        ]);
        assert!(
            h.errors.is_empty() && h.closed.is_empty(),
            "handshake failed"
        );
        h
    }

    /// An encoded sync message carrying `changes` and our heads.
    fn changes_message(&self, changes: ChunkList) -> Vec<u8> {
        let heads = self
            .engine
            .document(&SYNC_DOC)
            .map(|d| d.lock().get_heads());
        SyncMessage {
            heads: heads.unwrap_or_default(),
            need: Vec::new(),
            have: Vec::new(),
            changes,
            flags: None,
            version: MessageVersion::V1,
        }
        .encode()
    }

    /// A `sync` message from the remote peer carrying `data`.
    fn sync(&self, data: Vec<u8>) -> Message {
        Message::Sync {
            sender_id: self.remote.clone(),
            target_id: self.local.clone(),
            document_id: SYNC_DOC,
            data,
        }
    }

    /// Handle `inputs`, then answer effects until the engine is quiet.
    fn run(&mut self, mut inputs: Vec<Input>) {
        for _ in 0..1_000 {
            if inputs.is_empty() {
                return;
            }
            self.now = self.now.plus(1);
            let effects = self
                .engine
                .handle_batch(self.now, std::mem::take(&mut inputs));
            for e in effects {
                match e {
                    Effect::Persist {
                        doc, seq, chunk, ..
                    } => {
                        assert_eq!(doc, SYNC_DOC, "persisted a document nobody mentioned");
                        self.disk.push(chunk);
                        inputs.push(Input::Persisted { doc, seq, ok: true });
                    }
                    Effect::Apply(job) => inputs.push(job.run()),
                    Effect::Close { conn, .. } => self.closed.push(conn),
                    Effect::Event(Event::PeerError { conn, .. }) => self.errors.push(conn),
                    Effect::Load { doc } => panic!("engine asked to load {doc}, which it holds"),
                    Effect::Send { .. } | Effect::SaveSyncState { .. } | Effect::Event(_) => {}
                }
            }
        }
        panic!("engine did not go quiet within 1000 rounds");
    }

    fn check(&self) {
        for c in &self.errors {
            assert!(
                self.closed.contains(c),
                "a peer error on {c:?} without closing it"
            );
        }
        let doc = self
            .engine
            .document(&SYNC_DOC)
            .expect("the document stays ready");
        let heads = doc.lock().get_heads();
        let mut reloaded = Automerge::new();
        for (i, c) in self.disk.iter().enumerate() {
            crate::store::validate_chunk(c)
                .unwrap_or_else(|e| panic!("persisted chunk {i} would be quarantined: {e}"));
            reloaded
                .load_incremental(c)
                .unwrap_or_else(|e| panic!("persisted chunk {i} does not load: {e}"));
        }
        assert_eq!(
            reloaded.get_heads(),
            heads,
            "the stored chunks do not reload to the engine's heads"
        );
        assert!(
            reloaded.get_missing_deps(&[]).is_empty(),
            "the stored chunks leave changes waiting for dependencies"
        );
    }
}

// ---- forged_changes ----------------------------------------------------------------------------

/// Honest changes by two remote peers on top of [`sync_base_document`]: the material that
/// [`forged_changes`] alters. The first peer's four build on each other; the second's two
/// are concurrent with them.
pub fn honest_remote_changes() -> Vec<automerge::Change> {
    use automerge::transaction::Transactable;
    let base = sync_base_document(0);
    let mut rng = StdRng::seed_from_u64(0xf0e6);
    let mut out = Vec::new();
    for (actor, n) in [([7u8; 16], 4), ([6u8; 16], 2)] {
        let mut peer = base.fork().with_actor(automerge::ActorId::from(actor));
        for _ in 0..n {
            sim::random_edit(&mut peer, &mut rng);
            let mut tx = peer.transaction();
            let list = tx
                .put_object(automerge::ROOT, "fuzz-list", automerge::ObjType::List)
                .expect("a list");
            tx.insert(&list, 0, 1).expect("an insert");
            tx.commit();
        }
        out.extend(peer.get_changes(&base.get_heads()));
    }
    out
}

/// Layout: `[take][split]` then alterations `[change][what][a][b]` until the bytes run out.
/// Takes the first `take % 6 + 1` of [`honest_remote_changes`], alters their decoded forms
/// (seq, actor, start op, dependencies, an op's object, key, predecessors, insert flag or
/// action; an op duplicated or dropped) and encodes them again, so checksums are right; sends
/// them in one sync message (or two, split at `split`) to the [`sync_message`] harness.
/// Whatever the engine admits must leave a note that saves, reloads to the same heads and
/// persisted chunks that reload to them (Automerge 0.12 alone panics on many of these, or
/// keeps a note whose save does not load: see `engine::admit`).
pub fn forged_changes(data: &[u8]) {
    use automerge::legacy::{ElementId, Key, ObjectId, OpId, OpType};
    let mut u = Unstructured::new(data);
    let honest = honest_remote_changes();
    let take = usize::from(byte(&mut u)) % honest.len() + 1;
    let split = usize::from(byte(&mut u)) % (take + 1);
    let mut forged: Vec<automerge::ExpandedChange> =
        honest[..take].iter().map(|c| c.decode()).collect();
    let base = sync_base_document(0);
    let known: Vec<automerge::ChangeHash> = base
        .get_changes_meta(&[])
        .iter()
        .map(|m| m.hash)
        .chain(honest.iter().map(|c| c.hash()))
        .collect();
    let actors = [
        automerge::ActorId::from(b"sheaf-fuzz-local".to_vec()),
        automerge::ActorId::from([7u8; 16]),
        automerge::ActorId::from([6u8; 16]),
        automerge::ActorId::from([5u8; 16]),
    ];
    while let Ok(b) = u.bytes(4) {
        let e = &mut forged[usize::from(b[0]) % take];
        let (a, v) = (b[2], u64::from(b[3]));
        let actor = actors[usize::from(a) % actors.len()].clone();
        let n_ops = e.operations.len();
        match b[1] % 12 {
            0 => e.seq = v % 6,
            1 => e.actor_id = actor,
            2 => e.start_op = std::num::NonZeroU64::new(v + 1).expect("non-zero"),
            3 => e.deps.clear(),
            4 => e.deps.push(known[usize::from(a) % known.len()]),
            5 => {
                let keep = usize::from(a) % (e.deps.len() + 1);
                e.deps.truncate(keep);
            }
            w if n_ops > 0 => {
                let i = usize::from(a) % n_ops;
                let id = OpId(v, actor);
                let op = &mut e.operations[i];
                match w {
                    6 => {
                        op.obj = if v == 0 {
                            ObjectId::Root
                        } else {
                            ObjectId::Id(id)
                        }
                    }
                    7 => {
                        op.key = match v % 3 {
                            0 => Key::Seq(ElementId::Head),
                            1 => Key::Seq(ElementId::Id(id)),
                            _ => Key::Map("k".into()),
                        }
                    }
                    8 => {
                        let mut pred: Vec<OpId> = op.pred.iter().cloned().collect();
                        if v % 2 == 0 {
                            pred.clear();
                        } else {
                            pred.push(id);
                        }
                        op.pred = pred.into();
                    }
                    9 => op.insert = !op.insert,
                    10 => {
                        op.action = match v % 5 {
                            0 => OpType::Delete,
                            1 => OpType::Increment(3),
                            2 => OpType::Make(automerge::ObjType::Map),
                            3 => OpType::Make(automerge::ObjType::Text),
                            _ => OpType::Put("z".into()),
                        }
                    }
                    _ => {
                        if v % 2 == 0 {
                            let op = op.clone();
                            e.operations.insert(i, op);
                        } else {
                            e.operations.remove(i);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let bytes: Vec<Vec<u8>> = forged
        .into_iter()
        .map(|mut e| {
            e.hash = None;
            automerge::Change::from(e).raw_bytes().to_vec()
        })
        .collect();
    let mut h = SyncHarness::new(0);
    let parts = if split == 0 || split == take {
        vec![bytes]
    } else {
        vec![bytes[..split].to_vec(), bytes[split..].to_vec()]
    };
    for part in parts {
        let msg = h.sync(h.changes_message(ChunkList::from(part)));
        h.run(vec![Input::Received { conn: h.conn, msg }]);
    }
    h.check();
    let doc = h
        .engine
        .document(&SYNC_DOC)
        .expect("the document stays ready");
    let doc = doc.lock();
    let reloaded = Automerge::load(&doc.save()).expect("the note's save loads");
    assert_eq!(
        reloaded.get_heads(),
        doc.get_heads(),
        "the note's save reloads to its heads"
    );
}

/// For fuzz targets: Automerge panics that sheaf catches (see `engine::admit`) pass silently
/// instead of reaching libfuzzer-sys's hook, which aborts on every panic, caught or not.
/// A panic that escapes still fails the run: libfuzzer-sys aborts when its target unwinds.
pub fn let_caught_automerge_panics_pass() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = std::panic::take_hook();
        std::panic::set_hook(Box::new(|info| {
            let in_automerge = info
                .location()
                .is_some_and(|l| l.file().contains("automerge-0."));
            if !in_automerge {
                eprintln!("{info}");
            }
        }));
    });
}

// ---- store_load ------------------------------------------------------------------------------

/// Documents the `store_load` ops refer to (`doc byte % 3`).
pub const STORE_DOCS: [DocumentId; 3] = [
    DocumentId::from_bytes([1; 16]),
    DocumentId::from_bytes([2; 16]),
    DocumentId::from_bytes([3; 16]),
];

/// Store ops, for [`store_load`] seeds.
#[derive(Debug, Clone)]
pub enum StoreOp<'a> {
    Append(u8, &'a [u8]),
    Compact(u8, &'a [u8]),
    SyncState(u8, &'a [u8]),
    Delete(u8),
    /// Raw insert into tree `0` data, `1` docs, `2` quarantine.
    Raw(u8, &'a [u8], &'a [u8]),
    /// A chunk with a well-formed key and a correct checksum over `payload`, put straight into
    /// the data tree (kind byte: 0 snapshot, else incremental), listed in the docs index.
    Sealed {
        doc: u8,
        kind: u8,
        seq: u8,
        payload: &'a [u8],
    },
    Load(u8),
}

impl StoreOp<'_> {
    /// The bytes [`store_load`] reads this op from.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let put = |out: &mut Vec<u8>, b: &[u8]| {
            let len = u16::try_from(b.len()).expect("seed chunks are < 64 KiB");
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(b);
        };
        match self {
            StoreOp::Append(d, b) => {
                out.extend([0, *d]);
                put(out, b);
            }
            StoreOp::Compact(d, b) => {
                out.extend([1, *d]);
                put(out, b);
            }
            StoreOp::SyncState(d, b) => {
                out.extend([2, *d]);
                put(out, b);
            }
            StoreOp::Delete(d) => out.extend([3, *d]),
            StoreOp::Raw(t, k, v) => {
                out.extend([4, *t]);
                put(out, k);
                put(out, v);
            }
            StoreOp::Sealed {
                doc,
                kind,
                seq,
                payload,
            } => {
                out.extend([5, *doc, *kind, *seq]);
                put(out, payload);
            }
            StoreOp::Load(d) => out.extend([6, *d]),
        }
    }
}

fn read_store_op<'a>(u: &mut Unstructured<'a>) -> StoreOp<'a> {
    match byte(u) % 7 {
        0 => StoreOp::Append(byte(u), chunk(u)),
        1 => StoreOp::Compact(byte(u), chunk(u)),
        2 => StoreOp::SyncState(byte(u), chunk(u)),
        3 => StoreOp::Delete(byte(u)),
        4 => {
            let t = byte(u);
            let k = chunk(u);
            StoreOp::Raw(t, k, chunk(u))
        }
        5 => StoreOp::Sealed {
            doc: byte(u),
            kind: byte(u),
            seq: byte(u),
            payload: chunk(u),
        },
        _ => StoreOp::Load(byte(u)),
    }
}

/// Layout: a sequence of [`StoreOp`]s (see [`StoreOp::encode`]).
pub fn store_load(data: &[u8]) {
    let store = Store::open_temporary().expect("a temporary store opens");
    let mut u = Unstructured::new(data);
    let doc = |d: u8| STORE_DOCS[usize::from(d % 3)];
    let mut ops = 0;
    while !u.is_empty() && ops < 64 {
        ops += 1;
        match read_store_op(&mut u) {
            StoreOp::Append(d, b) => store.write(
                vec![WriteOp::AppendChunk {
                    doc: doc(d),
                    bytes: b.to_vec(),
                }],
                |_| {},
            ),
            StoreOp::Compact(d, b) => store.write(
                vec![WriteOp::Compact {
                    doc: doc(d),
                    snapshot: b.to_vec(),
                }],
                |_| {},
            ),
            StoreOp::SyncState(d, b) => store.write(
                vec![WriteOp::PutSyncState {
                    doc: doc(d),
                    storage_id: StorageId::new(format!("s{}", d >> 2)),
                    bytes: b.to_vec(),
                }],
                |_| {},
            ),
            StoreOp::Delete(d) => store.write(vec![WriteOp::DeleteDoc { doc: doc(d) }], |_| {}),
            StoreOp::Raw(t, k, v) => {
                let _ = store.flush_blocking();
                let _ = store.raw_tree(t % 3).insert(k, v);
            }
            StoreOp::Sealed {
                doc: d,
                kind,
                seq,
                payload,
            } => {
                let _ = store.flush_blocking();
                let kind = if kind == 0 {
                    ChunkKind::Snapshot
                } else {
                    ChunkKind::Incremental
                };
                let key = crate::store::raw_chunk_key(&doc(d), kind, u64::from(seq));
                let _ = store
                    .raw_tree(0)
                    .insert(key, crate::store::raw_seal(payload));
                let _ = store.raw_tree(1).insert(doc(d).as_bytes(), &[]);
            }
            StoreOp::Load(d) => {
                let _ = store.flush_blocking();
                let _ = store.load(&doc(d));
            }
        }
    }
    let _ = store.flush_blocking();
    let mut ids: Vec<DocumentId> = store.list_documents().unwrap_or_default();
    ids.extend(STORE_DOCS);
    for id in ids {
        let Ok(Some(first)) = store.load(&id) else {
            continue;
        };
        // Whatever was bad is in quarantine now: a second load is clean and the same.
        let second = store
            .load(&id)
            .unwrap_or_else(|e| panic!("{id}: second load failed: {e}"));
        let Some(second) = second else {
            // Only a document that is not in the index and whose every chunk was corrupt
            // (raw keys) may be gone once they are quarantined.
            assert!(
                first.chunks == 0 && !first.corrupt.is_empty(),
                "{id}: vanished after the first load"
            );
            continue;
        };
        assert!(
            second.corrupt.is_empty(),
            "{id}: second load still finds corrupt chunks: {:?} (first: {:?})",
            second.corrupt,
            first.corrupt
        );
        assert_eq!(
            second.doc.get_heads(),
            first.doc.get_heads(),
            "{id}: heads changed between loads"
        );
    }
}

// ---- http_auth -------------------------------------------------------------------------------

/// "now" for [`http_auth`], in unix seconds.
pub const AUTH_NOW: u64 = 1_800_000_000;

/// The key ring [`http_auth`] verifies against (its seeds are minted with it).
pub fn auth_ring() -> crate::auth::Keyring {
    let mut ring = crate::auth::Keyring::new();
    ring.insert("fuzz", crate::auth::Key::from_bytes([7; 32]));
    ring
}

/// Layout: the first byte picks what the rest is.
/// - 0: a request head, as the relay reads it before routing; a token in it (query or
///   `Authorization: Bearer`) is verified and must be refused (it cannot carry our MAC).
/// - 1: a token payload, sent with a MAC that is not its own (what a forger sends): refused.
/// - otherwise: a token payload signed with the ring's key (what only the ring's owner can
///   make): the claims parser past the MAC. What verifies is current, and mints to a token
///   that verifies to the same claims.
pub fn http_auth(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let ring = auth_ring();
    let token = |mac: &[u8]| {
        format!(
            "{}.{}",
            bs58::encode(rest).into_string(),
            bs58::encode(mac).into_string()
        )
    };
    match mode {
        0 => {
            if let Ok(head) = crate::relay::http::parse_head(rest) {
                if let Some(t) = head.token {
                    assert!(
                        ring.verify_at(&t, AUTH_NOW).is_err(),
                        "a token in arbitrary bytes verified: {t}"
                    );
                }
            }
        }
        1 => {
            let forged = token(&[0u8; 32]);
            assert!(ring.verify_at(&forged, AUTH_NOW).is_err(), "{forged}");
        }
        _ => {
            let key = ring.get("fuzz").expect("the fuzz key");
            let signed = token(key.mac(rest).as_bytes());
            if let Ok(claims) = ring.verify_at(&signed, AUTH_NOW) {
                assert!(claims.exp > AUTH_NOW, "expired claims verified: {claims:?}");
                assert!(claims.nbf.is_none_or(|nbf| nbf <= AUTH_NOW), "{claims:?}");
                let again = ring
                    .mint(&claims)
                    .unwrap_or_else(|e| panic!("verified claims do not mint ({e}): {claims:?}"));
                assert_eq!(ring.verify_at(&again, AUTH_NOW), Ok(claims));
            }
        }
    }
}

/// Building seed corpora from real frames, chunks and editing traces.
pub mod seeds {
    use super::*;

    /// `http_auth` input: `mode` then the head or payload.
    pub fn http_auth(mode: u8, rest: &[u8]) -> Vec<u8> {
        let mut v = vec![mode];
        v.extend_from_slice(rest);
        v
    }

    /// `sync_message` input: flags then payload.
    pub fn sync_message(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![flags & !16];
        v.extend_from_slice(payload);
        v
    }

    /// `store_load` input from ops.
    pub fn store_load(ops: &[StoreOp<'_>]) -> Vec<u8> {
        let mut v = Vec::new();
        for op in ops {
            op.encode(&mut v);
        }
        v
    }
}

// ---- presence --------------------------------------------------------------------------------

/// A typical app presence state, to decode snapshots into as an app would.
#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct FuzzPresence {
    #[serde(default)]
    user: String,
    #[serde(default)]
    cursor: Option<u32>,
    #[serde(default)]
    color: Option<String>,
}

/// Layout: the bytes are one ephemeral payload.
pub fn presence(data: &[u8]) {
    use crate::repo::presence::tracker::{Timing, Tracker};
    use crate::repo::presence::wire::{self, Decoded, Wire};

    let Decoded::Presence(msg) = wire::decode(data) else {
        return;
    };
    let again = wire::decode(&wire::encode(&msg));
    let want = Decoded::Presence(msg.clone());
    // `Debug` equality too: a NaN float is never `==` itself.
    if again != want && format!("{again:?}") != format!("{want:?}") {
        panic!("presence round trip changed the message:\n  {want:?}\n  {again:?}");
    }
    if let Wire::Snapshot(state) = &msg {
        let _ = wire::state_to_value(state).deserialized::<FuzzPresence>();
    }
    let timing = Timing {
        heartbeat_ms: 10,
        ttl_ms: 30,
        announce_delay_ms: 1,
        max_peers: 2,
    };
    let me = PeerId::new("me");
    let (mut t, _) = Tracker::start(me.clone(), timing, Millis(0), Default::default());
    for (i, from) in ["a", "b", "c", "me", "a"].into_iter().enumerate() {
        t.receive(Millis(i as u64), &PeerId::new(from), msg.clone());
        assert!(t.peers().len() <= 2, "the peer cap was exceeded");
        assert!(!t.peers().contains_key(&me), "tracking ourselves");
    }
    t.tick(Millis(100));
    assert!(t.peers().is_empty(), "silent peers outlived the TTL");
}

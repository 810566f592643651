//! A deterministic network simulator for the sans-IO engine.
//!
//! N peers, each an [`Engine`] with an in-memory durable store, joined by simulated
//! connections (star through relays, or a mesh). A seeded scheduler picks what happens next:
//! a batch of inputs handled by a peer, messages delivered after random delays, local edits
//! (map keys, lists, text, counters, nested maps), group commits completing, connections
//! dropped with their in-flight messages lost, partitions and heals, peers crashing (memory
//! and unacknowledged writes lost, acknowledged chunks kept) and restarting. Then
//! [`Sim::heal_and_settle`] reconnects everything and runs to quiescence so a test can assert
//! that every replica converged. Same seed, same run: a failing seed replays exactly.
//! [`Sim::with_schema`] gives the peers a [`Schema`] (invariants repaired after merges);
//! [`Sim::check_invariants`] then checks every replica keeps them.
//!
//! Frames cross the simulated wire through the real codec ([`protocol::encode`] then
//! [`protocol::decode`]), so the codec is exercised by every run.

mod edits;

pub use edits::{random_edit, seed_document};

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use automerge::{ActorId, Automerge, ChangeHash, ReadDoc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::engine::{Effect, Engine, EngineConfig, Event, Input, Loaded, Millis, SharedDoc};
use crate::id::{DocumentId, PeerId, StorageId};
use crate::net::{ConnId, Direction};
use crate::protocol::{self, Message};
use crate::schema::{RepairEvent, Schema};

/// One thing that can happen in the simulation. [`Sim::step`] picks one at random; a fuzzer
/// (or a test) can drive [`Sim::apply`] with a schedule of its own. Node, link and count
/// fields are taken modulo what exists when the action is applied.
#[derive(Debug, Clone, PartialEq, Eq, arbitrary::Arbitrary)]
pub enum Action {
    /// The node handles every queued input as one batch.
    RunNode(u8),
    /// Frames due on a link are delivered (queued as inputs of the receiving ends).
    Deliver(u16),
    /// A local edit on a (non-relay) peer; `seed` picks the document and the edit.
    Edit { node: u8, seed: u64 },
    /// The node's group commit completes: its pending writes are acknowledged.
    Commit(u8),
    /// Virtual time advances by `ms` (at least 1) and the node gets a tick.
    Tick { node: u8, ms: u16 },
    /// A link goes down, losing its in-flight frames.
    Drop(u16),
    /// Two nodes cannot reach each other (their links drop) until `Heal`.
    Partition(u8, u8),
    /// Partitions end; dropped links reconnect.
    Heal,
    /// The node crashes; `keep` (modulo pending + 1) of its unacknowledged writes survive.
    Crash { node: u8, keep: u16 },
    /// Every crashed node restarts; dropped links reconnect.
    Restart,
    /// Dropped links reconnect (unless partitioned or an end is down).
    Reconnect,
}

/// Shape of the simulated network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Every peer connects to one relay (which never announces).
    Star,
    /// Every pair of peers is connected directly.
    Mesh,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub peers: usize,
    pub docs: usize,
    pub topology: Topology,
    /// Maximum message delay in ms.
    pub max_delay_ms: u64,
    /// Number of random steps before healing.
    pub steps: usize,
    /// Enable faults: drops, partitions, crashes.
    pub faults: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            peers: 3,
            docs: 2,
            topology: Topology::Star,
            max_delay_ms: 20,
            steps: 300,
            faults: true,
        }
    }
}

/// Durable state of one node: what survives a crash.
#[derive(Default, Clone)]
pub struct Disk {
    pub chunks: BTreeMap<DocumentId, Vec<Vec<u8>>>,
    pub sync_states: BTreeMap<(DocumentId, StorageId), Vec<u8>>,
    /// Every head a chunk on disk was written for: its changes must all be on disk.
    pub claimed: BTreeMap<DocumentId, BTreeSet<ChangeHash>>,
}

impl Disk {
    /// Write one chunk of `doc`, written by the engine as covering `heads`.
    fn write(&mut self, doc: DocumentId, chunk: Vec<u8>, heads: Vec<ChangeHash>) {
        self.chunks.entry(doc).or_default().push(chunk);
        self.claimed.entry(doc).or_default().extend(heads);
    }

    fn load(&self, doc: &DocumentId) -> Option<Loaded> {
        let chunks = self.chunks.get(doc)?;
        let mut am = Automerge::new();
        for c in chunks {
            // A chunk written by the engine always loads; if not, that is a bug to surface.
            am.load_incremental(c).expect("stored chunk must load");
        }
        // What the engine said a chunk covers must be on disk: losing it would lose changes
        // reported as saved (or advertised to peers as the relay's).
        for h in self.claimed.get(doc).into_iter().flatten() {
            assert!(
                am.get_change_by_hash(h).is_some(),
                "stored chunks of {doc} lack change {h}, which a written chunk claimed"
            );
        }
        let sync_states = self
            .sync_states
            .iter()
            .filter(|((d, _), _)| d == doc)
            .map(|((_, s), v)| (s.clone(), v.clone()))
            .collect();
        Some(Loaded {
            doc: am,
            sync_states,
        })
    }
}

/// One simulated node.
pub struct Node {
    pub name: String,
    pub relay: bool,
    peer_id: PeerId,
    storage_id: StorageId,
    pub engine: Option<Engine>,
    pub disk: Disk,
    /// Writes waiting for the group commit: (doc, seq, chunk, the heads it covers).
    pending_writes: Vec<(DocumentId, u64, Vec<u8>, Vec<ChangeHash>)>,
    inputs: Vec<Input>,
    /// Documents the app on this node holds handles to.
    pub handles: BTreeMap<DocumentId, SharedDoc>,
    /// Documents the app wants (found or created), re-found after a restart.
    pub wanted: BTreeSet<DocumentId>,
    pub unavailable: BTreeSet<DocumentId>,
    /// Repairs this node's engine made after merges broke an invariant, in order.
    pub repairs: Vec<RepairEvent>,
    /// The invariants this node enforces (relays: none).
    schema: Schema,
    index: u8,
    /// How many times this node was (re)started; part of its actor id.
    incarnation: u32,
}

impl Node {
    /// The actor this incarnation of the node edits as.
    fn actor(&self) -> ActorId {
        let mut bytes = vec![0x5e, self.index];
        bytes.extend_from_slice(&self.incarnation.to_be_bytes());
        ActorId::from(bytes)
    }

    fn new_engine(&self) -> Engine {
        let mut cfg = if self.relay {
            EngineConfig::relay(self.peer_id.clone(), Some(self.storage_id.clone()))
        } else {
            EngineConfig::peer(self.peer_id.clone(), Some(self.storage_id.clone()))
        };
        cfg.schema = self.schema.clone();
        // Every apply seems to take `SIM_APPLY_MS`, so engines pace their applies (see
        // `ApplyPacing`) and forward what they hold meanwhile: both paths run in every
        // simulation, deterministically (the clock is a counter, not the wall).
        let t = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        cfg.cost_clock = Some(crate::engine::CostClock(std::sync::Arc::new(move || {
            t.fetch_add(SIM_APPLY_MS * 1000, std::sync::atomic::Ordering::Relaxed)
        })));
        // Peers too apply off their thread here (relays do by default), so that the
        // simulations also run an offloaded result meeting an edit made meanwhile.
        cfg.offload_applies = true;
        // Repairs are made as this incarnation's actor, like its edits: deterministic, and
        // never a sequence number a lost write of an earlier incarnation already used.
        cfg.repair_actor = Some(self.actor());
        Engine::new(cfg)
    }
}

/// What every apply seems to cost in the simulator: enough for pacing (which then holds
/// the next apply for twice this).
const SIM_APPLY_MS: u64 = 25;

/// A simulated connection between `client` (dialer) and `server`.
struct Link {
    client: usize,
    server: usize,
    client_conn: ConnId,
    server_conn: ConnId,
    /// Frames in flight towards the server / the client: (deliver at, bytes).
    to_server: VecDeque<(Millis, Vec<u8>)>,
    to_client: VecDeque<(Millis, Vec<u8>)>,
    up: bool,
}

pub struct Sim {
    pub rng: StdRng,
    pub now: Millis,
    pub config: SimConfig,
    pub nodes: Vec<Node>,
    links: Vec<Link>,
    next_conn: u64,
    /// Pairs of nodes that cannot reach each other.
    partitions: BTreeSet<(usize, usize)>,
    pub docs: Vec<DocumentId>,
    /// Human-readable trace of what happened (printed when a seed fails).
    pub trace: Vec<String>,
    /// Messages and bytes that crossed the wire.
    pub messages_sent: u64,
    pub bytes_sent: u64,
    /// Record every message in the trace.
    pub verbose: bool,
}

impl Sim {
    pub fn new(seed: u64, config: SimConfig) -> Self {
        Self::with_schema(seed, config, Schema::default())
    }

    /// Like [`Sim::new`], with every peer (not the relay, which like a real one knows no app
    /// schema) enforcing `schema`.
    pub fn with_schema(seed: u64, config: SimConfig, schema: Schema) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut nodes = Vec::new();
        let relays = usize::from(config.topology == Topology::Star);
        for i in 0..config.peers + relays {
            let relay = config.topology == Topology::Star && i == config.peers;
            let name = if relay {
                "relay".to_string()
            } else {
                format!("p{i}")
            };
            nodes.push(Node {
                peer_id: PeerId::new(format!("{name}-{:x}", rng.gen::<u32>())),
                storage_id: StorageId::from_rng(&mut rng),
                name,
                relay,
                engine: None,
                disk: Disk::default(),
                pending_writes: Vec::new(),
                inputs: Vec::new(),
                handles: BTreeMap::new(),
                wanted: BTreeSet::new(),
                unavailable: BTreeSet::new(),
                repairs: Vec::new(),
                schema: if relay {
                    Schema::default()
                } else {
                    schema.clone()
                },
                index: i as u8,
                incarnation: 0,
            });
        }
        for n in nodes.iter_mut() {
            n.engine = Some(n.new_engine());
        }
        let mut sim = Self {
            rng,
            now: Millis(0),
            config,
            nodes,
            links: Vec::new(),
            next_conn: 1,
            partitions: BTreeSet::new(),
            docs: Vec::new(),
            trace: Vec::new(),
            messages_sent: 0,
            bytes_sent: 0,
            verbose: std::env::var_os("SHEAF_SIM_VERBOSE").is_some(),
        };
        // Wire up the topology.
        let peers = sim.config.peers;
        match sim.config.topology {
            Topology::Star => {
                for p in 0..peers {
                    sim.connect(p, peers);
                }
            }
            Topology::Mesh => {
                for a in 0..peers {
                    for b in (a + 1)..peers {
                        sim.connect(a, b);
                    }
                }
            }
        }
        // Peer 0 creates the documents; the others look for them.
        for _ in 0..sim.config.docs {
            let id = DocumentId::from_rng(&mut sim.rng);
            let doc = seed_document(&mut sim.rng);
            sim.docs.push(id);
            sim.create(0, id, doc);
        }
        // The creations are durable before anything else happens (an app awaits `saved()`).
        sim.run_node(0);
        sim.commit(0);
        let docs = sim.docs.clone();
        for p in 1..peers {
            for d in &docs {
                sim.find(p, *d);
            }
        }
        sim
    }

    fn log(&mut self, s: String) {
        self.trace.push(format!("[{}ms] {s}", self.now.0));
    }

    /// Make `node` create a document.
    pub fn create(&mut self, node: usize, id: DocumentId, doc: Automerge) {
        self.nodes[node].wanted.insert(id);
        self.nodes[node].inputs.push(Input::Create {
            doc: id,
            automerge: doc,
        });
        self.log(format!("{} creates {id}", self.nodes[node].name));
    }

    /// Make `node`'s app look for a document.
    pub fn find(&mut self, node: usize, id: DocumentId) {
        self.nodes[node].wanted.insert(id);
        self.nodes[node].inputs.push(Input::Find { doc: id });
    }

    fn connect(&mut self, client: usize, server: usize) {
        let client_conn = ConnId(self.next_conn);
        let server_conn = ConnId(self.next_conn + 1);
        self.next_conn += 2;
        self.nodes[client].inputs.push(Input::ConnOpened {
            conn: client_conn,
            direction: Direction::Outgoing,
            access: None,
        });
        self.nodes[server].inputs.push(Input::ConnOpened {
            conn: server_conn,
            direction: Direction::Incoming,
            access: None,
        });
        self.links.push(Link {
            client,
            server,
            client_conn,
            server_conn,
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            up: true,
        });
    }

    fn partitioned(&self, a: usize, b: usize) -> bool {
        self.partitions.contains(&(a.min(b), a.max(b)))
    }

    /// Take a link down: both ends are told, in-flight frames are lost.
    fn drop_link(&mut self, i: usize) {
        let l = &mut self.links[i];
        if !l.up {
            return;
        }
        l.up = false;
        l.to_client.clear();
        l.to_server.clear();
        let (c, s, cc, sc) = (l.client, l.server, l.client_conn, l.server_conn);
        if self.nodes[c].engine.is_some() {
            self.nodes[c].inputs.push(Input::ConnClosed { conn: cc });
        }
        if self.nodes[s].engine.is_some() {
            self.nodes[s].inputs.push(Input::ConnClosed { conn: sc });
        }
        let msg = format!(
            "link {} - {} dropped",
            self.nodes[c].name, self.nodes[s].name
        );
        self.log(msg);
    }

    /// Dialers reconnect their dropped links (unless partitioned or crashed).
    fn reconnect_dropped(&mut self) {
        let dropped: Vec<(usize, usize)> = self
            .links
            .iter()
            .filter(|l| !l.up)
            .map(|l| (l.client, l.server))
            .collect();
        self.links.retain(|l| l.up);
        for (c, s) in dropped {
            if self.partitioned(c, s)
                || self.nodes[c].engine.is_none()
                || self.nodes[s].engine.is_none()
            {
                // Keep a down placeholder so we retry later.
                let cc = ConnId(self.next_conn);
                self.next_conn += 2;
                self.links.push(Link {
                    client: c,
                    server: s,
                    client_conn: cc,
                    server_conn: ConnId(cc.0 + 1),
                    to_server: VecDeque::new(),
                    to_client: VecDeque::new(),
                    up: false,
                });
            } else {
                self.connect(c, s);
            }
        }
    }

    /// Crash `node`: memory and links are lost; of its unacknowledged writes, the first
    /// `keep % (pending + 1)` reached the disk.
    fn crash(&mut self, node: usize, keep: usize) {
        if self.nodes[node].engine.is_none() {
            return;
        }
        for i in 0..self.links.len() {
            let l = &self.links[i];
            if l.client == node || l.server == node {
                self.drop_link(i);
            }
        }
        let n = &mut self.nodes[node];
        n.engine = None;
        n.inputs.clear();
        n.handles.clear();
        // Group commit is atomic per batch and ordered: a prefix of pending writes may
        // have reached the disk before the crash; nothing acknowledged is lost.
        let keep = keep % (n.pending_writes.len() + 1);
        for (doc, _, chunk, heads) in n.pending_writes.drain(..).take(keep) {
            n.disk.write(doc, chunk, heads);
        }
        let name = n.name.clone();
        self.log(format!(
            "{name} crashed (kept {keep} unacknowledged writes)"
        ));
    }

    fn restart(&mut self, node: usize) {
        if self.nodes[node].engine.is_some() {
            return;
        }
        self.nodes[node].incarnation += 1;
        let engine = self.nodes[node].new_engine();
        let n = &mut self.nodes[node];
        n.engine = Some(engine);
        let wanted: Vec<DocumentId> = n.wanted.iter().copied().collect();
        for d in wanted {
            n.inputs.push(Input::Find { doc: d });
        }
        let name = n.name.clone();
        self.log(format!("{name} restarted"));
    }

    /// Let `node` handle every queued input as one batch.
    fn run_node(&mut self, node: usize) -> usize {
        let inputs = std::mem::take(&mut self.nodes[node].inputs);
        let Some(engine) = self.nodes[node].engine.as_mut() else {
            return 0;
        };
        let effects = engine.handle_batch(self.now, inputs);
        let n = effects.len();
        for e in effects {
            self.apply_effect(node, e);
        }
        n
    }

    fn apply_effect(&mut self, node: usize, e: Effect) {
        match e {
            Effect::Send { conn, msg } => self.send(node, conn, &msg),
            Effect::Close { conn, .. } => {
                if let Some(i) = self.link_of(node, conn) {
                    self.drop_link(i);
                }
            }
            // Run at once; its result is handled with whatever else reaches the node
            // first (edits, messages), as it would be on a worker thread.
            Effect::Apply(job) => self.nodes[node].inputs.push(job.run()),
            Effect::Load { doc } => {
                let loaded = self.nodes[node].disk.load(&doc);
                self.nodes[node].inputs.push(Input::Loaded { doc, loaded });
            }
            Effect::Persist {
                doc,
                seq,
                chunk,
                heads,
                ..
            } => {
                self.nodes[node]
                    .pending_writes
                    .push((doc, seq, chunk, heads));
            }
            Effect::SaveSyncState {
                doc,
                storage_id,
                state,
            } => {
                self.nodes[node]
                    .disk
                    .sync_states
                    .insert((doc, storage_id), state);
            }
            Effect::Event(ev) => self.event(node, ev),
        }
    }

    fn event(&mut self, node: usize, ev: Event) {
        match ev {
            Event::DocReady { doc } => {
                let n = &mut self.nodes[node];
                n.unavailable.remove(&doc);
                if n.wanted.contains(&doc) {
                    if let Some(h) = n.engine.as_ref().and_then(|e| e.document(&doc)) {
                        n.handles.insert(doc, h);
                    }
                }
            }
            Event::DocUnavailable { doc } => {
                self.nodes[node].unavailable.insert(doc);
                let msg = format!("{}: {doc} unavailable", self.nodes[node].name);
                self.log(msg);
            }
            Event::Evicted { doc } => {
                let msg = format!("{}: {doc} evicted", self.nodes[node].name);
                self.log(msg);
            }
            Event::PeerError { error, .. } => {
                let msg = format!("{}: peer error {error}", self.nodes[node].name);
                self.log(msg);
            }
            Event::Repair(r) => {
                let msg = format!(
                    "{}: repair of {} `{}` ({}): {:?}",
                    self.nodes[node].name, r.doc, r.invariant, r.violation, r.outcome
                );
                self.log(msg);
                self.nodes[node].repairs.push(r);
            }
            _ => {}
        }
    }

    fn link_of(&self, node: usize, conn: ConnId) -> Option<usize> {
        self.links.iter().position(|l| {
            (l.client == node && l.client_conn == conn)
                || (l.server == node && l.server_conn == conn)
        })
    }

    fn send(&mut self, node: usize, conn: ConnId, msg: &Message) {
        let Some(i) = self.link_of(node, conn) else {
            return;
        };
        if !self.links[i].up {
            return;
        }
        let bytes = through_wire(msg);
        if self.verbose {
            let line = format!(
                "{} -> {:?}: {} {:?}",
                self.nodes[node].name,
                conn,
                msg.type_name(),
                msg.document_id()
            );
            self.log(line);
        }
        self.messages_sent += 1;
        self.bytes_sent += bytes.len() as u64;
        let delay = self.rng.gen_range(0..=self.config.max_delay_ms);
        let l = &mut self.links[i];
        // In-order stream: a frame never overtakes the one before it.
        let queue = if l.client == node {
            &mut l.to_server
        } else {
            &mut l.to_client
        };
        let at = queue.back().map_or(self.now.plus(delay), |(t, _)| {
            (*t).max(self.now.plus(delay))
        });
        queue.push_back((at, bytes));
    }

    /// Deliver frames due on link `i`.
    fn deliver(&mut self, i: usize, all: bool) -> usize {
        let now = self.now;
        let l = &mut self.links[i];
        if !l.up {
            return 0;
        }
        let mut delivered = Vec::new();
        for (to_server, q) in [(true, &mut l.to_server), (false, &mut l.to_client)] {
            while let Some((t, _)) = q.front() {
                if !all && *t > now {
                    break;
                }
                let (_, bytes) = q.pop_front().expect("front exists");
                delivered.push((to_server, bytes));
            }
        }
        let (c, s, cc, sc) = (l.client, l.server, l.client_conn, l.server_conn);
        let n = delivered.len();
        for (to_server, bytes) in delivered {
            let (node, conn) = if to_server { (s, sc) } else { (c, cc) };
            let msg = from_wire(&bytes);
            self.nodes[node].inputs.push(Input::Received { conn, msg });
        }
        n
    }

    /// Complete the group commit on `node`: acknowledge its pending writes.
    fn commit(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        if n.engine.is_none() {
            return;
        }
        for (doc, seq, chunk, heads) in n.pending_writes.drain(..) {
            n.disk.write(doc, chunk, heads);
            n.inputs.push(Input::Persisted { doc, seq, ok: true });
        }
    }

    /// One random step: pick a random [`Action`] and [`apply`](Self::apply) it.
    pub fn step(&mut self) {
        if let Some(action) = self.random_action() {
            self.apply(&action);
        }
    }

    /// What the seeded scheduler does next (`None`: nothing this step, e.g. a fault roll
    /// with faults off, or no links to deliver on).
    pub fn random_action(&mut self) -> Option<Action> {
        let roll = self.rng.gen_range(0..100u32);
        let nodes = self.nodes.len();
        let links = self.links.len();
        let node = |rng: &mut StdRng| rng.gen_range(0..nodes) as u8;
        Some(match roll {
            0..=29 => Action::RunNode(node(&mut self.rng)),
            30..=54 if links == 0 => return None,
            30..=54 => Action::Deliver(self.rng.gen_range(0..links) as u16),
            55..=74 => Action::Edit {
                node: self.rng.gen_range(0..self.config.peers) as u8,
                seed: self.rng.gen(),
            },
            75..=84 => Action::Commit(node(&mut self.rng)),
            85..=91 => Action::Tick {
                ms: self.rng.gen_range(1..=self.config.max_delay_ms.max(1)) as u16,
                node: node(&mut self.rng),
            },
            _ if !self.config.faults => return None,
            92..=94 if links == 0 => return None,
            92..=94 => Action::Drop(self.rng.gen_range(0..links) as u16),
            95 => Action::Partition(node(&mut self.rng), node(&mut self.rng)),
            96 => Action::Heal,
            97 => {
                let n = node(&mut self.rng);
                let pending = self.nodes[usize::from(n)].pending_writes.len();
                Action::Crash {
                    node: n,
                    keep: self.rng.gen_range(0..=pending) as u16,
                }
            }
            98 => Action::Restart,
            _ => Action::Reconnect,
        })
    }

    /// Carry out one action. Indices are taken modulo what exists (nodes, links, pending
    /// writes), so any action is valid in any state: a fuzzer can drive the simulator with
    /// arbitrary schedules.
    pub fn apply(&mut self, action: &Action) {
        let nodes = self.nodes.len();
        let node = |n: u8| usize::from(n) % nodes;
        match *action {
            Action::RunNode(n) => {
                self.run_node(node(n));
            }
            Action::Deliver(i) => {
                if !self.links.is_empty() {
                    let i = usize::from(i) % self.links.len();
                    self.deliver(i, false);
                }
            }
            Action::Edit { node: n, seed } => {
                let n = usize::from(n) % self.config.peers;
                self.local_edit(n, seed);
            }
            Action::Commit(n) => self.commit(node(n)),
            Action::Tick { node: n, ms } => {
                self.now = self.now.plus(u64::from(ms.max(1)));
                self.nodes[node(n)].inputs.push(Input::Tick);
            }
            Action::Drop(i) => {
                if !self.links.is_empty() {
                    let i = usize::from(i) % self.links.len();
                    self.drop_link(i);
                }
            }
            Action::Partition(a, b) => {
                let (a, b) = (node(a), node(b));
                if a != b {
                    self.partitions.insert((a.min(b), a.max(b)));
                    for i in 0..self.links.len() {
                        let l = &self.links[i];
                        if (l.client == a && l.server == b) || (l.client == b && l.server == a) {
                            self.drop_link(i);
                        }
                    }
                    let msg = format!("partition {} | {}", self.nodes[a].name, self.nodes[b].name);
                    self.log(msg);
                }
            }
            Action::Heal => {
                self.partitions.clear();
                self.reconnect_dropped();
                self.log("heal partitions".into());
            }
            Action::Crash { node: n, keep } => self.crash(node(n), usize::from(keep)),
            Action::Restart => {
                for node in 0..nodes {
                    self.restart(node);
                }
                self.reconnect_dropped();
            }
            Action::Reconnect => self.reconnect_dropped(),
        }
    }

    /// A random local edit through a handle the app on `node` holds; `seed` picks the
    /// document and the edit. Each incarnation of a node edits as its own actor (as an app
    /// that loads a document gets a fresh actor), fixed so that runs replay exactly.
    pub fn local_edit(&mut self, node: usize, seed: u64) {
        let n = &self.nodes[node];
        if n.handles.is_empty() || n.engine.is_none() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let k = rng.gen_range(0..n.handles.len());
        let (id, h) = n
            .handles
            .iter()
            .nth(k)
            .map(|(i, h)| (*i, h.clone()))
            .expect("k < len");
        let actor = n.actor();
        let desc = {
            let mut doc = h.lock();
            doc.set_actor(actor);
            random_edit(&mut doc, &mut rng)
        };
        self.nodes[node].inputs.push(Input::LocalChange { doc: id });
        let msg = format!("{} edits {id}: {desc}", self.nodes[node].name);
        self.log(msg);
    }

    /// A local edit of `doc` on `node` made by `f` in one transaction (committed at time 0,
    /// as this incarnation's actor, like [`Sim::local_edit`]). Does nothing if the node is
    /// down or holds no handle for the document; returns whether the edit was made.
    pub fn edit_with(
        &mut self,
        node: usize,
        doc: DocumentId,
        f: impl FnOnce(
            &mut automerge::transaction::Transaction<'_>,
        ) -> Result<(), automerge::AutomergeError>,
    ) -> bool {
        let n = &self.nodes[node];
        let Some(h) = n.handles.get(&doc).filter(|_| n.engine.is_some()).cloned() else {
            return false;
        };
        let actor = n.actor();
        {
            let mut d = h.lock();
            d.set_actor(actor);
            let mut tx = d.transaction();
            if f(&mut tx).is_err() {
                tx.rollback();
                return false;
            }
            tx.commit_with(automerge::transaction::CommitOptions::default().with_time(0));
        }
        self.nodes[node].inputs.push(Input::LocalChange { doc });
        let msg = format!("{} edits {doc} (scripted)", self.nodes[node].name);
        self.log(msg);
        true
    }

    /// Every peer's copy of every document keeps the invariants its schema registers.
    pub fn check_invariants(&self) -> Result<(), String> {
        for n in self.nodes.iter().filter(|n| !n.relay) {
            for (d, h) in &n.handles {
                let broken = n.schema.violations_of(&mut h.lock());
                if let Some(r) = broken.first() {
                    return Err(format!(
                        "{}: {d} breaks `{}`: {}",
                        n.name, r.invariant, r.violation
                    ));
                }
            }
        }
        Ok(())
    }

    /// Run `config.steps` random steps.
    pub fn run(&mut self) {
        for _ in 0..self.config.steps {
            self.step();
        }
    }

    /// `rounds` rounds of: every node handles its inputs, group commits complete, every frame
    /// in flight is delivered, time advances by `max_delay_ms`. Unlike
    /// [`Sim::heal_and_settle`], partitions and dropped links stay as they are.
    pub fn pump(&mut self, rounds: usize) {
        for _ in 0..rounds {
            for node in 0..self.nodes.len() {
                self.commit(node);
                self.run_node(node);
            }
            for i in 0..self.links.len() {
                self.deliver(i, true);
            }
            self.now = self.now.plus(self.config.max_delay_ms.max(1));
            for node in 0..self.nodes.len() {
                if self.nodes[node].engine.is_some() {
                    self.nodes[node].inputs.push(Input::Tick);
                }
            }
        }
    }

    /// Heal every fault, restart crashed nodes, reconnect, and run to quiescence.
    pub fn heal_and_settle(&mut self) -> Result<(), String> {
        self.partitions.clear();
        for node in 0..self.nodes.len() {
            self.restart(node);
        }
        self.reconnect_dropped();
        for round in 0..20_000 {
            let mut busy = 0;
            for node in 0..self.nodes.len() {
                self.commit(node);
                if !self.nodes[node].inputs.is_empty() {
                    busy += 1;
                    self.run_node(node);
                }
            }
            for i in 0..self.links.len() {
                busy += self.deliver(i, true);
            }
            if busy == 0 {
                let pending = self
                    .nodes
                    .iter()
                    .any(|n| !n.pending_writes.is_empty() || !n.inputs.is_empty());
                if pending {
                    continue;
                }
                // Quiet: let held messages go (max_hold) and request grace periods pass.
                let wait = self
                    .nodes
                    .iter()
                    .filter_map(|n| n.engine.as_ref())
                    .map(|e| e.config().max_hold_ms.max(e.config().request_grace_ms))
                    .max()
                    .unwrap_or(0);
                let before = self.messages_sent;
                self.now = self.now.plus(wait + 1);
                for node in 0..self.nodes.len() {
                    if self.nodes[node].engine.is_some() {
                        self.nodes[node].inputs.push(Input::Tick);
                        self.run_node(node);
                    }
                }
                // Quiet only if the tick sent nothing and started nothing: a paced apply
                // that it let go writes a chunk first and sends after.
                if self.messages_sent == before
                    && self
                        .nodes
                        .iter()
                        .all(|n| n.inputs.is_empty() && n.pending_writes.is_empty())
                {
                    return Ok(());
                }
            }
            if round == 19_999 {
                return Err("did not settle within 20000 rounds".into());
            }
        }
        Ok(())
    }

    /// Every peer's copy of every document: identical heads and identical content.
    pub fn check_converged(&self) -> Result<(), String> {
        for d in &self.docs {
            let mut reference: Option<(String, Vec<automerge::ChangeHash>, serde_json::Value)> =
                None;
            for n in self.nodes.iter().filter(|n| !n.relay) {
                let Some(h) = n.handles.get(d) else {
                    return Err(format!(
                        "{} has no handle for {d} (unavailable: {}, engine phase: {:?})",
                        n.name,
                        n.unavailable.contains(d),
                        n.engine.as_ref().and_then(|e| e.phase(d))
                    ));
                };
                let doc = h.lock();
                let heads = doc.get_heads();
                let json = serde_json::to_value(automerge::AutoSerde::from(&**doc))
                    .map_err(|e| e.to_string())?;
                match &reference {
                    None => reference = Some((n.name.clone(), heads, json)),
                    Some((name, rh, rj)) => {
                        if *rh != heads {
                            return Err(format!("{d}: heads differ between {name} and {}", n.name));
                        }
                        if *rj != json {
                            return Err(format!(
                                "{d}: content differs between {name} and {}: {rj} vs {json}",
                                n.name
                            ));
                        }
                    }
                }
            }
            // The relay stored everything too.
            for n in self.nodes.iter().filter(|n| n.relay) {
                if let Some(l) = n.disk.load(d) {
                    let rh = reference.as_ref().map(|r| r.1.clone()).unwrap_or_default();
                    if l.doc.get_heads() != rh {
                        return Err(format!("{d}: relay's stored copy is behind"));
                    }
                } else {
                    return Err(format!("{d}: relay stored nothing"));
                }
            }
        }
        Ok(())
    }

    /// The text of `doc` on `node`, if it has one under the key `text`.
    pub fn text(&self, node: usize, doc: &DocumentId) -> Option<String> {
        let h = self.nodes[node].handles.get(doc)?;
        let d = h.lock();
        let (_, obj) = d.get(automerge::ROOT, "text").ok()??;
        d.text(&obj).ok()
    }
}

fn through_wire(msg: &Message) -> Vec<u8> {
    protocol::encode(msg)
}

fn from_wire(bytes: &[u8]) -> Message {
    protocol::decode(bytes).expect("frames we encoded must decode")
}

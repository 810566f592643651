//! Helpers shared by integration tests and benchmarks (`benches/` include this file with
//! `#[path]`): opening the gzipped editing traces in `shared/traces`, an in-memory network of
//! engines, and (last) driving real processes: the `sheaf-relay` binary and the Node scripts
//! in `tests/js/`. Every wait is bounded.
#![allow(dead_code)]

use std::fs::File;
use std::io::Read;

use sheafdb::traces::{self, ConcurrentTrace, SequentialTrace};

/// The path of a trace file, relative to the crate root (`../shared/traces/<name>`).
pub fn trace_path(name: &str) -> String {
    format!("{}/../shared/traces/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Open a gzipped trace for reading (decompressed).
pub fn open_trace(name: &str) -> impl Read {
    let path = trace_path(name);
    let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    flate2::read::GzDecoder::new(file)
}

pub fn sequential(name: &str) -> SequentialTrace {
    traces::parse_sequential(open_trace(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub fn concurrent(name: &str) -> ConcurrentTrace {
    traces::parse_concurrent(open_trace(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

// ---- an in-memory network of engines ------------------------------------------------------

use std::collections::{HashMap, VecDeque};

use automerge::Automerge;
use sheafdb::engine::{Effect, Engine, EngineConfig, Event, Input, Loaded, Millis};
use sheafdb::net::{ConnId, Direction};
use sheafdb::protocol::{self, Message};
use sheafdb::{DocumentId, PeerId, StorageId};

/// One engine with an in-memory store that answers `Load` and `Persist` at once (on the
/// node's next batch).
pub struct Node {
    pub engine: Engine,
    pub inputs: Vec<Input>,
    /// Stored chunks per document, in the order they were persisted.
    pub chunks: HashMap<DocumentId, Vec<Vec<u8>>>,
    /// Documents handed to the engine as they are when it asks to load them (taken, so
    /// the answer costs nothing); checked before `chunks`.
    pub preloaded: HashMap<DocumentId, Automerge>,
    pub sync_states: HashMap<(DocumentId, StorageId), Vec<u8>>,
    /// Every event the engine emitted.
    pub events: Vec<Event>,
    /// Every effect other than `Send` (for assertions), in order.
    pub log: Vec<String>,
    /// When false, `Persist` effects wait in `unacked` until the test acknowledges them.
    pub auto_persist: bool,
    pub unacked: Vec<(DocumentId, u64)>,
    pub persist_count: usize,
    /// When true, `Apply` jobs wait in `jobs` until the test runs them (`run_jobs`).
    pub hold_jobs: bool,
    pub jobs: Vec<sheafdb::engine::ApplyJob>,
}

struct Link {
    a: usize,
    b: usize,
    a_conn: ConnId,
    b_conn: ConnId,
    to_a: VecDeque<Vec<u8>>,
    to_b: VecDeque<Vec<u8>>,
    up: bool,
}

/// Engines joined by in-order links; frames cross through `protocol::encode/decode`.
#[derive(Default)]
pub struct Net {
    pub nodes: Vec<Node>,
    links: Vec<Link>,
    pub now: Millis,
    next_conn: u64,
    /// Frames and bytes that crossed any link (counted when sent).
    pub messages: u64,
    pub bytes: u64,
    /// Print every frame sent (set `SHEAF_NET_VERBOSE`).
    pub verbose: bool,
    /// When set, every frame sent is recorded in `sent` as (sender node, type, doc, bytes).
    pub record: bool,
    pub sent: Vec<(usize, &'static str, Option<DocumentId>, usize)>,
    /// With `record`, every sync message sent, decoded, with its sender node.
    pub sent_sync: Vec<(usize, automerge::sync::Message)>,
}

pub fn peer_config(name: &str) -> EngineConfig {
    EngineConfig::peer(
        PeerId::new(name),
        Some(StorageId::new(format!("{name}-storage"))),
    )
}

pub fn relay_config(name: &str) -> EngineConfig {
    EngineConfig::relay(
        PeerId::new(name),
        Some(StorageId::new(format!("{name}-storage"))),
    )
}

impl Net {
    pub fn new() -> Self {
        Self {
            next_conn: 1,
            verbose: std::env::var_os("SHEAF_NET_VERBOSE").is_some(),
            ..Default::default()
        }
    }

    pub fn add(&mut self, config: EngineConfig) -> usize {
        self.nodes.push(Node {
            engine: Engine::new(config),
            inputs: Vec::new(),
            chunks: HashMap::new(),
            preloaded: HashMap::new(),
            sync_states: HashMap::new(),
            events: Vec::new(),
            log: Vec::new(),
            auto_persist: true,
            unacked: Vec::new(),
            hold_jobs: false,
            jobs: Vec::new(),
            persist_count: 0,
        });
        self.nodes.len() - 1
    }

    /// Open a connection: `client` dials `server`. Returns (client's conn, server's conn).
    pub fn connect(&mut self, client: usize, server: usize) -> (ConnId, ConnId) {
        let a_conn = ConnId(self.next_conn);
        let b_conn = ConnId(self.next_conn + 1);
        self.next_conn += 2;
        self.nodes[client].inputs.push(Input::ConnOpened {
            conn: a_conn,
            direction: Direction::Outgoing,
            access: None,
        });
        self.nodes[server].inputs.push(Input::ConnOpened {
            conn: b_conn,
            direction: Direction::Incoming,
            access: None,
        });
        self.links.push(Link {
            a: client,
            b: server,
            a_conn,
            b_conn,
            to_a: VecDeque::new(),
            to_b: VecDeque::new(),
            up: true,
        });
        (a_conn, b_conn)
    }

    pub fn push(&mut self, node: usize, input: Input) {
        self.nodes[node].inputs.push(input);
    }

    /// Handle the node's queued inputs as one batch; false if it had none.
    pub fn run_node(&mut self, node: usize) -> bool {
        if self.nodes[node].inputs.is_empty() {
            return false;
        }
        let inputs = std::mem::take(&mut self.nodes[node].inputs);
        let effects = self.nodes[node].engine.handle_batch(self.now, inputs);
        self.apply_effects(node, effects);
        true
    }

    pub fn apply_effects(&mut self, node: usize, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Send { conn, msg } => self.send(node, conn, &msg),
                Effect::Close { conn, reason } => {
                    self.nodes[node]
                        .log
                        .push(format!("close {conn:?}: {reason}"));
                    if let Some(i) = self.link_of(node, conn) {
                        self.links[i].up = false;
                        let l = &self.links[i];
                        let (other, oc) = if l.a == node {
                            (l.b, l.b_conn)
                        } else {
                            (l.a, l.a_conn)
                        };
                        self.nodes[other]
                            .inputs
                            .push(Input::ConnClosed { conn: oc });
                    }
                }
                Effect::Apply(job) => {
                    let n = &mut self.nodes[node];
                    n.log.push(format!("apply {}", job.doc()));
                    if n.hold_jobs {
                        n.jobs.push(*job);
                    } else {
                        n.inputs.push(job.run());
                    }
                }
                Effect::Load { doc } => {
                    let n = &mut self.nodes[node];
                    n.log.push(format!("load {doc}"));
                    let am = n.preloaded.remove(&doc).or_else(|| {
                        n.chunks.get(&doc).map(|cs| {
                            let mut am = Automerge::new();
                            for c in cs {
                                am.load_incremental(c).expect("stored chunk loads");
                            }
                            am
                        })
                    });
                    let loaded = am.map(|doc_am| Loaded {
                        doc: doc_am,
                        sync_states: n
                            .sync_states
                            .iter()
                            .filter(|((d, _), _)| *d == doc)
                            .map(|((_, s), v)| (s.clone(), v.clone()))
                            .collect(),
                    });
                    n.inputs.push(Input::Loaded { doc, loaded });
                }
                Effect::Persist {
                    doc, seq, chunk, ..
                } => {
                    let n = &mut self.nodes[node];
                    n.persist_count += 1;
                    n.log.push(format!("persist {doc} seq {seq}"));
                    n.chunks.entry(doc).or_default().push(chunk);
                    if n.auto_persist {
                        n.inputs.push(Input::Persisted { doc, seq, ok: true });
                    } else {
                        n.unacked.push((doc, seq));
                    }
                }
                Effect::SaveSyncState {
                    doc,
                    storage_id,
                    state,
                } => {
                    self.nodes[node]
                        .sync_states
                        .insert((doc, storage_id), state);
                }
                Effect::Event(ev) => self.nodes[node].events.push(ev),
            }
        }
    }

    /// Acknowledge every write the node holds back (with `auto_persist` off).
    pub fn ack_persists(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        for (doc, seq) in n.unacked.drain(..) {
            n.inputs.push(Input::Persisted { doc, seq, ok: true });
        }
    }

    fn link_of(&self, node: usize, conn: ConnId) -> Option<usize> {
        self.links
            .iter()
            .position(|l| (l.a == node && l.a_conn == conn) || (l.b == node && l.b_conn == conn))
    }

    fn send(&mut self, node: usize, conn: ConnId, msg: &Message) {
        let Some(i) = self.link_of(node, conn) else {
            return;
        };
        let l = &mut self.links[i];
        if !l.up {
            return;
        }
        let bytes = protocol::encode(msg);
        if self.verbose {
            let summary = match msg {
                Message::Sync { data, .. } | Message::Request { data, .. } => {
                    match automerge::sync::Message::decode(data) {
                        Ok(m) => format!(
                            "heads {} need {} have {} changes {}",
                            m.heads.len(),
                            m.need.len(),
                            m.have.len(),
                            m.changes.len()
                        ),
                        Err(e) => format!("undecodable: {e}"),
                    }
                }
                _ => String::new(),
            };
            eprintln!(
                "[{}] node {node} {conn:?} -> {} {summary}",
                self.now.0,
                msg.type_name()
            );
        }
        self.messages += 1;
        self.bytes += bytes.len() as u64;
        if self.record {
            self.sent
                .push((node, msg.type_name(), msg.document_id(), bytes.len()));
            if let Message::Sync { data, .. } | Message::Request { data, .. } = msg {
                if let Ok(m) = automerge::sync::Message::decode(data) {
                    self.sent_sync.push((node, m));
                }
            }
        }
        if l.a == node {
            l.to_b.push_back(bytes);
        } else {
            l.to_a.push_back(bytes);
        }
    }

    /// Move every frame in flight into its receiver's inputs; returns how many.
    pub fn deliver_all(&mut self) -> usize {
        let mut n = 0;
        for i in 0..self.links.len() {
            let l = &mut self.links[i];
            if !l.up {
                continue;
            }
            let (a, b, ac, bc) = (l.a, l.b, l.a_conn, l.b_conn);
            let to_a: Vec<Vec<u8>> = l.to_a.drain(..).collect();
            let to_b: Vec<Vec<u8>> = l.to_b.drain(..).collect();
            n += to_a.len() + to_b.len();
            for f in to_a {
                let msg = protocol::decode(&f).expect("frames we encoded decode");
                self.nodes[a].inputs.push(Input::Received { conn: ac, msg });
            }
            for f in to_b {
                let msg = protocol::decode(&f).expect("frames we encoded decode");
                self.nodes[b].inputs.push(Input::Received { conn: bc, msg });
            }
        }
        n
    }

    /// Frames waiting on the link from `from` towards the other end of `conn` (`from`'s conn).
    pub fn in_flight(&self, from: usize, conn: ConnId) -> Vec<Message> {
        let Some(i) = self.link_of(from, conn) else {
            return Vec::new();
        };
        let l = &self.links[i];
        let q = if l.a == from { &l.to_b } else { &l.to_a };
        q.iter()
            .map(|f| protocol::decode(f).expect("decodes"))
            .collect()
    }

    /// Run every node and deliver every frame until nothing moves. Returns the rounds taken.
    pub fn settle(&mut self) -> usize {
        for round in 0..100_000 {
            let mut busy = false;
            for node in 0..self.nodes.len() {
                busy |= self.run_node(node);
            }
            busy |= self.deliver_all() > 0;
            if !busy {
                return round;
            }
        }
        panic!("network did not settle");
    }

    /// Advance virtual time and tick every node.
    /// Run the node's held `Apply` jobs; their results reach it with its next batch.
    pub fn run_jobs(&mut self, node: usize) -> usize {
        let jobs = std::mem::take(&mut self.nodes[node].jobs);
        let n = jobs.len();
        for job in jobs {
            let input = job.run();
            self.nodes[node].inputs.push(input);
        }
        n
    }

    pub fn advance(&mut self, ms: u64) {
        self.now = self.now.plus(ms);
        for n in &mut self.nodes {
            n.inputs.push(Input::Tick);
        }
    }

    pub fn heads(&self, node: usize, doc: &DocumentId) -> Option<Vec<automerge::ChangeHash>> {
        self.nodes[node]
            .engine
            .document(doc)
            .map(|d| d.lock().get_heads())
    }
}

/// A map of every message type sent in a frame list, for assertions.
pub fn type_names(msgs: &[Message]) -> Vec<&'static str> {
    msgs.iter().map(|m| m.type_name()).collect()
}

// ---- real processes: sheaf-relay and the Node scripts ---------------------------------------

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

/// Upper bound for one wait in these tests.
pub const WAIT: Duration = Duration::from_secs(15);

/// A running `sheaf-relay` binary (killed with SIGKILL on drop).
pub struct RelayProc {
    pub child: Child,
    pub addr: std::net::SocketAddr,
    pub data_dir: PathBuf,
}

impl RelayProc {
    /// Start the binary on `127.0.0.1:port` (0 = any free port: the binary prints the port it
    /// chose) with `data_dir` and extra flags, and wait until it listens.
    pub async fn start(data_dir: &Path, port: u16, extra: &[&str]) -> RelayProc {
        Self::spawn(
            Command::new(env!("CARGO_BIN_EXE_sheaf-relay")),
            data_dir,
            port,
            extra,
        )
        .await
    }

    /// [`RelayProc::start`] with `RUST_LOG` set to `level` (else `warn`).
    pub async fn start_with_log(data_dir: &Path, level: &str) -> RelayProc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sheaf-relay"));
        cmd.env("RUST_LOG", level);
        Self::spawn(cmd, data_dir, 0, &[]).await
    }

    /// [`RelayProc::start`] under `ulimit -f blocks` with SIGXFSZ ignored: a write past the
    /// limit fails with EFBIG, as one on a full disk fails with ENOSPC. (`sh` counts blocks
    /// of 512 bytes, bash of 1024.)
    pub async fn start_with_file_limit(data_dir: &Path, blocks: u64) -> RelayProc {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"trap '' XFSZ; ulimit -f "$1"; shift; exec "$@""#)
            .arg("sh")
            .arg(blocks.to_string())
            .arg(env!("CARGO_BIN_EXE_sheaf-relay"));
        Self::spawn(cmd, data_dir, 0, &[]).await
    }

    async fn spawn(mut cmd: Command, data_dir: &Path, port: u16, extra: &[&str]) -> RelayProc {
        if !cmd.as_std().get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "warn");
        }
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // A port just released by a killed relay can take a moment to be free again.
        let deadline = Instant::now() + WAIT;
        loop {
            let mut child = cmd.spawn().expect("spawn sheaf-relay");
            let stdout = child.stdout.take().unwrap();
            let mut lines = BufReader::new(stdout).lines();
            let first = timeout(WAIT, lines.next_line()).await;
            match first {
                Ok(Ok(Some(line))) if line.starts_with("sheaf-relay listening on ws://") => {
                    let addr = line
                        .trim_start_matches("sheaf-relay listening on ws://")
                        .trim()
                        .parse()
                        .expect("relay prints its address");
                    // Keep draining stdout so the relay never blocks on a full pipe.
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    return RelayProc {
                        child,
                        addr,
                        data_dir: data_dir.to_path_buf(),
                    };
                }
                other => {
                    let _ = child.kill().await;
                    let status = child.wait().await;
                    assert!(
                        Instant::now() < deadline,
                        "sheaf-relay did not start: {other:?}, {status:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill9(mut self) {
        self.child.kill().await.expect("kill -9 sheaf-relay");
    }

    /// SIGTERM (graceful: closes sockets, flushes storage) and wait for a clean exit.
    pub async fn terminate(mut self) {
        let pid = self.child.id().expect("relay pid");
        let st = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(st.success());
        let status = timeout(WAIT, self.child.wait())
            .await
            .expect("relay exits after SIGTERM")
            .unwrap();
        assert!(
            status.success(),
            "relay exit status after SIGTERM: {status}"
        );
    }
}

/// The Node project directory, checked: `node` must be on PATH and `tests/js/node_modules`
/// installed. Fails the test (never skips) with what to do otherwise.
pub fn js_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    let node = std::process::Command::new("node").arg("--version").output();
    match node {
        Ok(o) if o.status.success() => {}
        other => panic!(
            "`node` is needed for the JS interop tests but was not found or failed ({other:?}). \
             Install Node.js 20+ (e.g. `apt-get install -y nodejs npm`), then run \
             `npm ci --prefix tests/js`."
        ),
    }
    let marker = dir.join("node_modules/@automerge/automerge-repo/package.json");
    assert!(
        marker.exists(),
        "tests/js/node_modules is missing ({} not found): run `npm ci --prefix tests/js` \
         first (CI does this before `cargo test`).",
        marker.display()
    );
    dir
}

/// A Node script from `tests/js/` speaking JSON lines (see `client.mjs`).
pub struct JsProc {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<Value>,
    /// Events and answers read while waiting for something else.
    backlog: Vec<Value>,
    next_id: u64,
}

impl JsProc {
    pub async fn spawn(script: &str, args: &[&str]) -> JsProc {
        Self::spawn_env(script, args, &[]).await
    }

    /// [`JsProc::spawn`] with extra environment variables.
    pub async fn spawn_env(script: &str, args: &[&str], env: &[(&str, &str)]) -> JsProc {
        let dir = js_dir();
        let mut child = Command::new("node")
            .arg(script)
            .args(args)
            .envs(env.iter().copied())
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn node {script}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let name = script.to_string();
        let n = name.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        let _ = tx.send(v);
                    }
                    Err(_) => eprintln!("[{n}] {line}"),
                }
            }
        });
        JsProc {
            name,
            stdin: child.stdin.take(),
            child,
            lines: rx,
            backlog: Vec::new(),
            next_id: 1,
        }
    }

    /// The process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The next line matching `pred` (from the backlog first), within `within`.
    pub async fn expect(&mut self, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(v)) if pred(&v) => return v,
                Ok(Some(v)) => self.backlog.push(v),
                Ok(None) => panic!(
                    "{} exited while we waited; status {:?}; seen {:?}",
                    self.name,
                    self.child.try_wait(),
                    self.backlog
                ),
                Err(_) => panic!(
                    "{}: nothing matching within {within:?}; seen {:?}",
                    self.name, self.backlog
                ),
            }
        }
    }

    /// Remove and return a line already read that matches `pred` (never waits).
    pub fn take(&mut self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        while let Ok(v) = self.lines.try_recv() {
            self.backlog.push(v);
        }
        let i = self.backlog.iter().position(pred)?;
        Some(self.backlog.remove(i))
    }

    /// Send one command and wait for its answer; panics on `ok: false`.
    pub async fn call(&mut self, mut cmd: Value) -> Value {
        let v = self.try_call(&mut cmd).await;
        assert_eq!(v["ok"], json!(true), "{} answered {v} to {cmd}", self.name);
        v
    }

    /// Send one command and return its answer, successful or not.
    pub async fn try_call(&mut self, cmd: &mut Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = json!(id);
        let mut line = serde_json::to_string(&cmd).unwrap();
        line.push('\n');
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(line.as_bytes()).await.unwrap();
        stdin.flush().await.unwrap();
        self.expect(WAIT + Duration::from_secs(5), |v| v["id"] == json!(id))
            .await
    }

    /// Close stdin and wait for the script to exit (bounded); returns its exit code.
    pub async fn finish(mut self) -> Option<i32> {
        drop(self.stdin.take());
        match timeout(WAIT, self.child.wait()).await {
            Ok(Ok(st)) => st.code(),
            _ => {
                let _ = self.child.kill().await;
                None
            }
        }
    }

    /// Wait for the script to exit by itself (bounded); returns its exit code and every
    /// JSON line it printed.
    pub async fn wait_output(mut self, within: Duration) -> (Option<i32>, Vec<Value>) {
        let status = match timeout(within, self.child.wait()).await {
            Ok(Ok(st)) => st.code(),
            _ => {
                let _ = self.child.kill().await;
                None
            }
        };
        let mut all = std::mem::take(&mut self.backlog);
        // The reader task ends with the pipe; give it a moment to hand over the last lines.
        while let Ok(Some(v)) = timeout(Duration::from_secs(2), self.lines.recv()).await {
            all.push(v);
        }
        (status, all)
    }
}

/// `method path` over plain HTTP to `addr` (the relay's `/health`, `/metrics`): the status
/// code, the head and the body.
pub async fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    use tokio::io::AsyncReadExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    timeout(WAIT, tcp.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a full response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// A relay `Repo` (temporary store) served by `sheafdb::relay::run` on 127.0.0.1:0: its
/// `ws://` URL, the repo, and a sender that stops the server when dropped or sent.
pub async fn in_process_relay() -> (String, sheafdb::Repo, tokio::sync::oneshot::Sender<()>) {
    let relay = sheafdb::Repo::temporary(sheafdb::RepoConfig::relay()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let (stop, _task) = serve(&relay, listener);
    (url, relay, stop)
}

/// Serve `repo` over WebSockets on `listener` (`relay::run`) until the returned sender fires
/// or is dropped; the task ends once the server has closed its sockets.
pub fn serve(
    repo: &sheafdb::Repo,
    listener: tokio::net::TcpListener,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let hub = repo.hub();
    let task = tokio::spawn(async move {
        let _ = sheafdb::relay::run(listener, hub, Default::default(), async {
            let _ = stopped.await;
        })
        .await;
    });
    (stop, task)
}

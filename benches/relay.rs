//! Relay and network benchmarks: real WebSockets over loopback (a plain `main`).
//!
//! `cargo bench --bench relay` runs every scenario; `cargo bench --bench relay -- fanout`
//! (or `fetch`, `long`, `rss`; several may be given) runs the ones whose name contains an
//! argument; `SHEAF_BENCH_K=64` (or `4,16`) overrides the client counts of fanout and long,
//! `SHEAF_BENCH_NOTES` the note count of rss, and `SHEAF_BENCH_RELAY_ARGS` adds flags to the
//! `sheaf-relay` command line (e.g. `--cache-mib 8`).
//! `SHEAF_BENCH_QUICK=1` shortens everything (a prefix of the trace, fewer clients,
//! shorter runs) so the whole bench finishes in well under a minute. Every loop is bounded in
//! count and time; servers bind 127.0.0.1. Each scenario prints its figures and, where there
//! is one, the baseline measured in the same run, the ratio, the target and PASS/MISS.
//!
//! 1. **fetch**: the automerge-paper note (T2: 1,000 edits per change; T1: one change per
//!    edit) stored in an in-process relay (`relay::run` over a `Repo` on a temporary data
//!    directory, as `sheaf-relay` does); a fresh client `Repo` connects and `find`s it. Time
//!    until the client has every head, and WebSocket payload bytes both ways (the relay's
//!    `Metrics`), vs the bare automerge sync loop (empty side speaks first). Also once
//!    against a restarted relay that must load the note from disk ("cold").
//! 2. **fanout**: K clients on one note through a `sheaf-relay` child process, each putting
//!    a counter under its own key 10 times a second. Edit-to-peer latency (p50/p99/max),
//!    delivered/expected (every edit must reach the K-1 others) and relay CPU.
//! 3. **long**: K clients typing one character at a random place, 10 keystrokes/s each, into
//!    the text of the T2 note (~260k text ops, where one remote apply costs ~25 ms). Same
//!    figures. Meanwhile (once per K) two more clients edit a small note through the same
//!    relay, 10 times a second each (row 3b): what the hot note costs the relay's other
//!    notes. Then K JS automerge-repo clients (`tests/js/typist.mjs`, one Node process
//!    each) doing the same, if `node` and `tests/js/node_modules` are there (else SKIP).
//! 4. **rss**: 10,000 small notes, each created and uploaded by a short-lived client, then
//!    fetched once by another (connect, find, disconnect); the relay's RSS and loaded
//!    documents every 1,000 notes must stay flat (eviction).
//!
//! Latency is measured inside this process: a typist records when it makes edit `seq`; a
//! receiving client wakes on `DocHandle::changes()`, lists the new changes with
//! `get_changes_meta` (actor and seq, from the change graph, cheap) and takes now - sent.
//! A change seen implies every earlier change of its author (causal order), and each
//! (receiver, change) is counted once. All clients share this process and its tokio runtime
//! (2 workers on the reference machine), so client CPU competes with the relay's: the
//! process's own CPU is printed next to the relay's, and next to both what a keystroke's
//! `change()` took (p50/p99/max): the input lag a user feels, mostly a wait for the note's
//! lock while the client's engine applies remote changes.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::sync::{Message as SyncMessage, State as SyncState, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ChangeHash, ReadDoc, ROOT};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sheafdb::engine::PeerSyncStatus;
use sheafdb::net::client::ConnectionState;
use sheafdb::relay::{Metrics, ServerConfig};
use sheafdb::{traces, DocHandle, DocumentId, Repo, RepoConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use common::RelayProc;

/// Upper bound for any single wait (connect, find, upload).
const WAIT: Duration = Duration::from_secs(60);

struct Row {
    name: String,
    measured: String,
    baseline: String,
    ratio: String,
    target: String,
    verdict: &'static str,
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

/// A latency row: `scored` carries the target and whether it was met; unscored rows are info.
fn latency_row(name: String, r: &TypingResult, scored: Option<(&str, bool)>) -> Row {
    Row {
        name,
        measured: r.summary(),
        baseline: format!("{}; {} sent", r.cpu, r.sent),
        ratio: String::new(),
        target: scored.map_or("(info)", |(t, _)| t).into(),
        verdict: scored.map_or("", |(_, pass)| verdict(pass)),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let quick = std::env::var_os("SHEAF_BENCH_QUICK").is_some();
    // `cargo bench` passes `--bench`; every other argument selects scenarios by substring.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut rows = Vec::new();
    let started = Instant::now();

    let trace =
        (want("fetch") || want("long")).then(|| common::sequential("automerge-paper.json.gz"));
    if want("fetch") {
        let trace = trace.as_ref().unwrap();
        rt.block_on(fetch(trace, quick, &mut rows));
    }
    if want("fanout") {
        let ks = ks_or(if quick {
            &[4, 16, 64]
        } else {
            &[4, 16, 64, 256]
        });
        let secs = if quick { 2 } else { 10 };
        for k in ks {
            rt.block_on(fanout(k, Duration::from_secs(secs), &mut rows));
        }
    }
    if want("long") {
        let trace = trace.as_ref().unwrap();
        let ks = ks_or(if quick { &[4] } else { &[2, 4, 16] });
        let secs = if quick { 2 } else { 10 };
        // K=4 through `changes()` as well (full runs only), then JS clients.
        let changes_ks: &[usize] = if quick { &[] } else { &[4] };
        let js_ks: &[usize] = if quick { &[4] } else { &[2, 4] };
        rt.block_on(long_note(
            trace,
            [&ks[..], changes_ks, js_ks],
            Duration::from_secs(secs),
            &mut rows,
        ));
    }
    if want("rss") {
        let notes = match std::env::var("SHEAF_BENCH_NOTES") {
            Ok(n) => n.parse().expect("SHEAF_BENCH_NOTES: a count"),
            Err(_) if quick => 1_000,
            Err(_) => 10_000,
        };
        rt.block_on(relay_rss(notes, &mut rows));
    }
    drop(rt);

    let w = |f: fn(&Row) -> usize, min: usize| rows.iter().map(f).max().unwrap_or(0).max(min);
    let (w0, w1, w2) = (
        w(|r| r.name.len(), 8),
        w(|r| r.measured.len(), 8),
        w(|r| r.baseline.len(), 8),
    );
    println!();
    println!(
        "| {:w0$} | {:w1$} | {:w2$} | {:>6} | {:>12} | {:4} |",
        "scenario", "measured", "baseline", "ratio", "target", ""
    );
    println!(
        "|{}|{}|{}|{}|{}|{}|",
        "-".repeat(w0 + 2),
        "-".repeat(w1 + 2),
        "-".repeat(w2 + 2),
        "-".repeat(8),
        "-".repeat(14),
        "-".repeat(6)
    );
    for r in &rows {
        println!(
            "| {:w0$} | {:w1$} | {:w2$} | {:>6} | {:>12} | {:4} |",
            r.name, r.measured, r.baseline, r.ratio, r.target, r.verdict
        );
    }
    println!(
        "\n(total {:.1?}{}; the reference machine has 2 cores and clients share this process)",
        started.elapsed(),
        if quick { ", SHEAF_BENCH_QUICK" } else { "" }
    );
}

/// The client counts to run: `SHEAF_BENCH_K` (e.g. `64` or `4,16`) or the defaults.
fn ks_or(default: &[usize]) -> Vec<usize> {
    match std::env::var("SHEAF_BENCH_K") {
        Ok(v) => v
            .split(',')
            .map(|k| {
                k.trim()
                    .parse()
                    .expect("SHEAF_BENCH_K: comma-separated counts")
            })
            .collect(),
        Err(_) => default.to_vec(),
    }
}

// ---- /proc readings -------------------------------------------------------------------------

/// User + system CPU time of a process (`"self"` or a pid) from `/proc/<pid>/stat`.
fn proc_cpu(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ: 100 on every Linux configuration /proc reports in.
    Some(Duration::from_millis(ticks * 10))
}

/// Resident set size of a process, in KiB (`VmRSS` in `/proc/<pid>/status`).
fn proc_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU used by the relay and by this process (all clients) over a window.
struct CpuWindow {
    relay_pid: String,
    relay0: Duration,
    self0: Duration,
    wall0: Instant,
}

impl CpuWindow {
    fn start(relay_pid: u32) -> Self {
        let relay_pid = relay_pid.to_string();
        Self {
            relay0: proc_cpu(&relay_pid).unwrap_or_default(),
            self0: proc_cpu("self").unwrap_or_default(),
            relay_pid,
            wall0: Instant::now(),
        }
    }

    /// "relay X% / clients Y% of one core" over the window so far.
    fn report(&self) -> String {
        let wall = self.wall0.elapsed().as_secs_f64();
        let relay = proc_cpu(&self.relay_pid).unwrap_or_default() - self.relay0;
        let me = proc_cpu("self").unwrap_or_default() - self.self0;
        format!(
            "relay CPU {:.0}%, clients {:.0}%",
            relay.as_secs_f64() / wall * 100.0,
            me.as_secs_f64() / wall * 100.0
        )
    }
}

/// One value of the relay's `/metrics` (`name value` line), read over HTTP.
async fn scrape(addr: SocketAddr, name: &str) -> Option<f64> {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .ok()
        .flatten()
}

// ---- clients ---------------------------------------------------------------------------------

/// A light client: a repo on a temporary store, connected to `url`, handshake done.
async fn client(url: &str) -> Repo {
    let repo = Repo::temporary(RepoConfig {
        find_timeout: WAIT,
        ..RepoConfig::default()
    })
    .expect("temporary repo");
    let mut state = repo.connect(url).expect("connect");
    let mut peers = repo.peers();
    tokio::time::timeout(WAIT, async {
        state
            .wait_for(|s| matches!(s, ConnectionState::Connected))
            .await
            .expect("connection state");
        peers.wait_for(|p| !p.is_empty()).await.expect("peers");
    })
    .await
    .expect("client connects to the relay");
    repo
}

/// Wait (at most `within`) until `handle` reports a peer as synced: the relay has every
/// change we made. False if it never does. That happens to about 1 in 200 notes created and
/// changed at once on a busy machine although the relay has every change (the status map
/// stays empty): callers go on and let the fetches that follow check the relay's copy.
async fn wait_synced(handle: &DocHandle, within: Duration) -> bool {
    let mut st = handle.sync_status();
    let synced = st.wait_for(|m| m.values().any(|s| *s == PeerSyncStatus::Synced));
    let done = matches!(tokio::time::timeout(within, synced).await, Ok(Ok(_)));
    done
}

/// [`wait_synced`] for an upload the bench then relies on (a warning if it never reports).
async fn upload(handle: &DocHandle) {
    if !wait_synced(handle, Duration::from_secs(10)).await {
        eprintln!(
            "warning: {} never reported synced with the relay",
            handle.id()
        );
    }
}

/// Drop repos off the runtime's worker threads (dropping one joins its engine thread).
async fn drop_repos(repos: Vec<Repo>) {
    let _ = tokio::task::spawn_blocking(move || drop(repos)).await;
}

// ---- 1. fresh-peer fetch --------------------------------------------------------------------

/// The bare automerge sync loop, empty side first: (time, bytes, messages).
fn bare_sync(doc: &Automerge) -> (Duration, usize, usize) {
    let mut full = doc.clone();
    let mut empty = Automerge::new();
    let (mut s_full, mut s_empty) = (SyncState::new(), SyncState::new());
    let (mut bytes, mut msgs) = (0, 0);
    let t = Instant::now();
    for _ in 0..100 {
        let mut moved = false;
        if let Some(m) = empty.generate_sync_message(&mut s_empty) {
            let b = m.encode();
            (bytes, msgs) = (bytes + b.len(), msgs + 1);
            full.receive_sync_message(&mut s_full, SyncMessage::decode(&b).unwrap())
                .unwrap();
            moved = true;
        }
        if let Some(m) = full.generate_sync_message(&mut s_full) {
            let b = m.encode();
            (bytes, msgs) = (bytes + b.len(), msgs + 1);
            empty
                .receive_sync_message(&mut s_empty, SyncMessage::decode(&b).unwrap())
                .unwrap();
            moved = true;
        }
        if !moved {
            break;
        }
    }
    let took = t.elapsed();
    assert_eq!(empty.get_heads(), doc.get_heads(), "bare loop converged");
    (took, bytes, msgs)
}

/// `relay::run` over a relay `Repo` on `dir`, as the `sheaf-relay` binary serves it.
struct InProcRelay {
    url: String,
    repo: Repo,
    metrics: Arc<Metrics>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcRelay {
    async fn start(dir: &Path) -> Self {
        let repo = Repo::open_with(dir, RepoConfig::relay()).expect("relay repo");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let metrics = Arc::new(Metrics::new());
        let config = ServerConfig {
            metrics: metrics.clone(),
            ..ServerConfig::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let hub = repo.hub();
        let task = tokio::spawn(async move {
            let _ = sheafdb::relay::run(listener, hub, config, async {
                let _ = stopped.await;
            })
            .await;
        });
        Self {
            url,
            repo,
            metrics,
            stop,
            task,
        }
    }

    /// WebSocket payload bytes and frames, both directions, so far.
    fn wire(&self) -> (u64, u64) {
        let m = &self.metrics;
        (
            m.bytes_in.load(Ordering::Relaxed) + m.bytes_out.load(Ordering::Relaxed),
            m.frames_in.load(Ordering::Relaxed) + m.frames_out.load(Ordering::Relaxed),
        )
    }

    /// Stop serving, write everything out and release the data directory.
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        let repo = self.repo;
        tokio::task::spawn_blocking(move || repo.shutdown().expect("relay shuts down"))
            .await
            .unwrap();
    }
}

/// One fresh client fetches `id` from the relay: (time to all heads, wire bytes, frames).
async fn fetch_once(
    relay: &InProcRelay,
    id: DocumentId,
    heads: &[ChangeHash],
) -> (Duration, u64, u64) {
    let repo = client(&relay.url).await;
    let (b0, f0) = relay.wire();
    let t = Instant::now();
    let handle = repo.find(id).await.expect("fresh client finds the note");
    // `find` answers once the note is there; it normally already has every head.
    let deadline = Instant::now() + WAIT;
    while handle.heads() != heads {
        assert!(
            Instant::now() < deadline,
            "fresh client never got every head"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = t.elapsed();
    // Bytes: wait for the trailing acknowledgements (no frame for 300 ms, bounded).
    let mut last = relay.wire();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = relay.wire();
        if now == last {
            break;
        }
        last = now;
    }
    drop(handle);
    drop_repos(vec![repo]).await;
    (took, last.0 - b0, last.1 - f0)
}

async fn fetch(trace: &traces::SequentialTrace, quick: bool, rows: &mut Vec<Row>) {
    let n = if quick { 40_000 } else { trace.txns.len() };
    eprintln!("fetch: automerge-paper, {n} of {} txns", trace.txns.len());
    for (label, per_change, reps) in [
        ("T2", 1_000, if quick { 3 } else { 5 }),
        ("T1", 1, if quick { 1 } else { 3 }),
    ] {
        let t = Instant::now();
        let doc = traces::build_doc_prefix(trace, per_change, n).expect("trace builds");
        eprintln!("  built {label} in {:.2?}", t.elapsed());
        let heads = doc.get_heads();

        let dir = tempfile::tempdir().unwrap();
        let relay = InProcRelay::start(dir.path()).await;
        let id = {
            let h = relay.repo.import(&doc.save()).await.expect("relay imports");
            h.saved().await.expect("stored");
            h.id()
        };
        let (mut ours, mut bare) = (Vec::new(), Vec::new());
        let (mut wire, mut frames, mut bare_bytes, mut bare_msgs) = (0, 0, 0, 0);
        for _ in 0..reps {
            let (t, b, f) = fetch_once(&relay, id, &heads).await;
            ours.push(t);
            (wire, frames) = (b, f);
            let (t, b, m) = bare_sync(&doc);
            bare.push(t);
            (bare_bytes, bare_msgs) = (b, m);
        }
        // Cold: a restarted relay loads the note from disk for this fetch.
        relay.stop().await;
        let relay = InProcRelay::start(dir.path()).await;
        let (cold, _, _) = fetch_once(&relay, id, &heads).await;
        relay.stop().await;

        // Best of N for both: on a shared machine the slow runs measure the neighbours.
        let ours = *ours.iter().min().unwrap();
        let bare = *bare.iter().min().unwrap();
        let r = ours.as_secs_f64() / bare.as_secs_f64();
        rows.push(Row {
            name: format!("1. fetch {label}: time (best of {reps})"),
            measured: ms(ours),
            baseline: format!("{} bare loop", ms(bare)),
            ratio: format!("{r:.2}"),
            target: "<= 1.2".into(),
            verdict: verdict(r <= 1.2),
        });
        rows.push(Row {
            name: format!("1. fetch {label}: wire bytes"),
            measured: format!("{wire} B, {frames} frames"),
            baseline: format!("{bare_bytes} B, {bare_msgs} msgs"),
            ratio: format!("{:.3}", wire as f64 / bare_bytes as f64),
            target: "(info)".into(),
            verdict: "",
        });
        rows.push(Row {
            name: format!("1. fetch {label}: cold relay (loads from disk)"),
            measured: ms(cold),
            baseline: format!("{} bare loop", ms(bare)),
            ratio: format!("{:.2}", cold.as_secs_f64() / bare.as_secs_f64()),
            target: "(info)".into(),
            verdict: "",
        });
    }
}

// ---- 2 and 3. typing clients ------------------------------------------------------------------

/// One keystroke: `edit(tx, client, seq)`.
type Edit = Arc<dyn Fn(&mut automerge::transaction::Transaction<'_>, usize, u64) + Send + Sync>;

/// Shared by the typists and observers of one run.
struct RunCtx {
    /// Each client's actor, to tell whose a change is.
    actors: HashMap<ActorId, usize>,
    /// When each client made each of its edits: `sent[client][seq - 1]`.
    sent: Vec<Mutex<Vec<Instant>>>,
    /// Edit-to-peer latencies (µs) and deliveries seen by every receiving client.
    lat_us: Mutex<Vec<u64>>,
    delivered: AtomicU64,
    /// How long each keystroke's `change()` took (µs): mostly a wait for the note's lock,
    /// which the client's engine holds while it applies remote changes (input lag).
    change_us: Mutex<Vec<u64>>,
}

/// What one typing run measured.
struct TypingResult {
    sent: u64,
    expected: u64,
    delivered: u64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    cpu: String,
    drain: Duration,
}

impl TypingResult {
    fn all_delivered(&self) -> bool {
        self.delivered == self.expected
    }

    fn summary(&self) -> String {
        format!(
            "p50 {} p99 {} max {}; {}/{} delivered",
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.delivered,
            self.expected
        )
    }
}

/// How a receiving client learns that its note changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Observe {
    /// `DocHandle::heads_watch()`: nothing computed per event (the default).
    Heads,
    /// `DocHandle::changes()`, as an app wanting patches does: every event diffs the note
    /// (under its lock, on the runtime's worker thread).
    Changes,
}

/// Wake on every change of `handle` and account for the edits of the other clients
/// (`actors` maps each client's actor to its index) until `stop` flips.
async fn observe(
    me: usize,
    handle: DocHandle,
    mode: Observe,
    ctx: Arc<RunCtx>,
    mut stop: watch::Receiver<bool>,
) {
    let mut heads_rx = handle.heads_watch();
    let mut changes = (mode == Observe::Changes).then(|| handle.changes());
    let mut last = handle.heads();
    loop {
        let woke = async {
            match changes.as_mut() {
                Some(c) => c.next().await.is_some(),
                None => heads_rx.changed().await.is_ok(),
            }
        };
        tokio::select! {
            alive = woke => if !alive { break },
            _ = stop.wait_for(|s| *s) => break,
        }
        // The changes since what we last accounted for, read with the heads they lead to, so
        // nothing is counted twice however events fold. The note's lock may be held by the
        // engine applying a batch: wait for it off the runtime's workers.
        let (new, heads, now) = tokio::task::block_in_place(|| {
            handle.with_doc(|d| {
                let new: Vec<(usize, u64)> = d
                    .get_changes_meta(&last)
                    .iter()
                    .filter_map(|m| Some((*ctx.actors.get(&*m.actor)?, m.seq)))
                    .filter(|(i, _)| *i != me)
                    .collect();
                (new, d.get_heads(), Instant::now())
            })
        });
        last = heads;
        let mut lat = Vec::with_capacity(new.len());
        for (i, seq) in new {
            let at = ctx.sent[i].lock().get(seq as usize - 1).copied();
            let at = at.expect("a change is seen only after its author recorded it");
            lat.push(now.duration_since(at).as_micros() as u64);
        }
        ctx.delivered.fetch_add(lat.len() as u64, Ordering::Relaxed);
        ctx.lat_us.lock().extend(lat);
    }
}

/// Run `handles.len()` clients making `edit(tx, client, seq)` at `rate_hz` each for
/// `duration`, then wait up to `drain` for every edit to reach every other client.
async fn typing_run(
    handles: &[DocHandle],
    relay_pid: u32,
    mode: Observe,
    rate_hz: f64,
    duration: Duration,
    drain: Duration,
    edit: Edit,
) -> TypingResult {
    let k = handles.len();
    let ctx = Arc::new(RunCtx {
        actors: handles
            .iter()
            .enumerate()
            .map(|(i, h)| (h.with_doc(|d| d.get_actor().clone()), i))
            .collect(),
        sent: (0..k).map(|_| Mutex::new(Vec::new())).collect(),
        lat_us: Mutex::new(Vec::new()),
        delivered: AtomicU64::new(0),
        change_us: Mutex::new(Vec::new()),
    });
    assert_eq!(ctx.actors.len(), k, "every client has its own actor");
    let (stop_tx, stop_rx) = watch::channel(false);

    let observers: Vec<_> = handles
        .iter()
        .enumerate()
        .map(|(i, h)| tokio::spawn(observe(i, h.clone(), mode, ctx.clone(), stop_rx.clone())))
        .collect();

    let cpu = CpuWindow::start(relay_pid);
    let period = Duration::from_secs_f64(1.0 / rate_hz);
    let start = tokio::time::Instant::now();
    let end = start + duration;
    let typists: Vec<_> = handles
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let (h, ctx, edit) = (h.clone(), ctx.clone(), edit.clone());
            // Spread the clients' ticks over one period.
            let first = start + period.mul_f64(i as f64 / k as f64);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(first, period);
                // A late tick is typed late, not made up for: `sent` shows the rate achieved.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut seq = 0u64;
                loop {
                    tick.tick().await;
                    if tokio::time::Instant::now() >= end {
                        break;
                    }
                    seq += 1;
                    // The keystroke's time, recorded before the change exists (so no receiver
                    // can see it earlier): a wait for the note's lock, held while the engine
                    // applies remote changes, counts as latency, as a user would feel it.
                    let typed = Instant::now();
                    ctx.sent[i].lock().push(typed);
                    tokio::task::block_in_place(|| {
                        h.change(|tx| {
                            edit(tx, i, seq);
                            Ok(())
                        })
                        .expect("local edit")
                    });
                    ctx.change_us
                        .lock()
                        .push(typed.elapsed().as_micros() as u64);
                }
            })
        })
        .collect();
    for t in typists {
        t.await.expect("typist");
    }
    let total: u64 = ctx.sent.iter().map(|s| s.lock().len() as u64).sum();
    let expected = total * (k as u64 - 1);
    let stopped = Instant::now();
    while ctx.delivered.load(Ordering::Relaxed) < expected && stopped.elapsed() < drain {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = stopped.elapsed();
    let cpu = cpu.report();
    let _ = stop_tx.send(true);
    for o in observers {
        let _ = tokio::time::timeout(Duration::from_secs(10), o).await;
    }
    let lat = std::mem::take(&mut *ctx.lat_us.lock());
    let delivered = ctx.delivered.load(Ordering::Relaxed);
    // Input lag: what a keystroke's `change()` took, shown with the CPU figures.
    let mut change_us = std::mem::take(&mut *ctx.change_us.lock());
    change_us.sort_unstable();
    let cpu = match change_us.last() {
        Some(max) => format!(
            "{cpu}; change() p50/p99/max {:.1}/{:.1}/{:.1} ms",
            change_us[change_us.len() / 2] as f64 / 1e3,
            change_us[change_us.len() * 99 / 100] as f64 / 1e3,
            *max as f64 / 1e3
        ),
        None => cpu,
    };
    latency_result(lat, total, expected, delivered, cpu, drained)
}

/// A `sheaf-relay` child process on a fresh data directory, with room for many clients
/// from 127.0.0.1, plus any flags in `SHEAF_BENCH_RELAY_ARGS` (e.g. `--cache-mib 8`).
async fn relay_proc(dir: &Path) -> RelayProc {
    let extra = std::env::var("SHEAF_BENCH_RELAY_ARGS").unwrap_or_default();
    let mut args = vec!["--max-connections-per-ip", "4096"];
    args.extend(extra.split_whitespace());
    RelayProc::start(dir, 0, &args).await
}

/// `k` clients connected to `url`, each with a handle on `id` (all found in parallel).
async fn clients_on(url: &str, id: DocumentId, k: usize) -> (Vec<Repo>, Vec<DocHandle>) {
    let tasks: Vec<_> = (0..k)
        .map(|_| {
            let url = url.to_string();
            tokio::spawn(async move {
                let repo = client(&url).await;
                let h = repo.find(id).await.expect("client finds the note");
                (repo, h)
            })
        })
        .collect();
    let mut repos = Vec::with_capacity(k);
    let mut handles = Vec::with_capacity(k);
    for t in tasks {
        let (r, h) = t.await.expect("client setup");
        repos.push(r);
        handles.push(h);
    }
    (repos, handles)
}

/// Two clients on a new small note at `url`, on a runtime and thread of their own: once
/// they are set up (`set_up`), they type at 10 edits/s each from `go` for `duration`.
fn spawn_bystanders(
    url: String,
    relay_pid: u32,
    duration: Duration,
    drain: Duration,
    go: tokio::sync::oneshot::Receiver<()>,
) -> (
    tokio::sync::oneshot::Receiver<()>,
    std::thread::JoinHandle<TypingResult>,
) {
    let (set_up_tx, set_up) = tokio::sync::oneshot::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let id = new_small_note(&url).await;
            let (repos, handles) = clients_on(&url, id, 2).await;
            let _ = set_up_tx.send(());
            let _ = go.await;
            let r = typing_run(
                &handles,
                relay_pid,
                Observe::Heads,
                10.0,
                duration,
                drain,
                counter_edit(),
            )
            .await;
            drop(handles);
            drop_repos(repos).await;
            r
        })
    });
    (set_up, thread)
}

/// A new empty note, uploaded to the relay at `url` by a client that then leaves (so only
/// the typists that find it receive edits).
async fn new_small_note(url: &str) -> DocumentId {
    let creator = client(url).await;
    let note = creator.create().await.expect("create");
    upload(&note).await;
    let id = note.id();
    drop(note);
    drop_repos(vec![creator]).await;
    id
}

/// Client `i` puts its edit number under its own key.
fn counter_edit() -> Edit {
    Arc::new(
        |tx: &mut automerge::transaction::Transaction<'_>, i: usize, seq: u64| {
            tx.put(ROOT, format!("c{i}"), seq as i64).expect("put");
        },
    )
}

/// 2. K clients on one small note, each putting a counter under its own key.
async fn fanout(k: usize, duration: Duration, rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_proc(dir.path()).await;
    let url = relay.url();
    let setup = Instant::now();
    let id = new_small_note(&url).await;
    let (repos, handles) = clients_on(&url, id, k).await;
    eprintln!("fanout K={k}: {k} clients ready in {:.1?}", setup.elapsed());

    let edit = counter_edit();
    let drain = Duration::from_secs(if duration.as_secs() < 5 { 5 } else { 10 });
    let pid = relay.child.id().unwrap();
    let r = typing_run(&handles, pid, Observe::Heads, 10.0, duration, drain, edit).await;
    let pass = k != 64 || (r.all_delivered() && r.p99 < Duration::from_millis(200));
    rows.push(latency_row(
        format!("2. fanout K={k}, {}s, 10 edits/s each", duration.as_secs()),
        &r,
        (k == 64).then_some(("p99 < 200 ms", pass)),
    ));
    eprintln!(
        "fanout K={k}: {}; {}; drained in {:.1?}",
        r.summary(),
        r.cpu,
        r.drain
    );
    drop(handles);
    drop_repos(repos).await;
    relay.kill9().await;
}

/// 3. K clients typing into the text of the T2 note (then JS clients, if available).
async fn long_note(
    trace: &traces::SequentialTrace,
    [ks, changes_ks, js_ks]: [&[usize]; 3],
    duration: Duration,
    rows: &mut Vec<Row>,
) {
    let t = Instant::now();
    let doc = traces::build_doc_prefix(trace, 1_000, trace.txns.len()).expect("T2 builds");
    let saved = doc.save();
    eprintln!("long: built T2 in {:.2?}", t.elapsed());
    drop(doc);
    // Every K observing with the heads watch, then through `changes()` (what the patches an
    // app asks for cost on this note).
    let runs = (ks.iter().map(|&k| (k, Observe::Heads)))
        .chain(changes_ks.iter().map(|&k| (k, Observe::Changes)));
    for (k, mode) in runs {
        let dir = tempfile::tempdir().unwrap();
        let relay = relay_proc(dir.path()).await;
        let url = relay.url();
        let uploader = client(&url).await;
        let note = uploader.import(&saved).await.expect("import");
        upload(&note).await;
        let id = note.id();
        drop(note);
        drop_repos(vec![uploader]).await;
        let setup = Instant::now();
        let (repos, handles) = clients_on(&url, id, k).await;
        eprintln!("long K={k}: {k} clients ready in {:.1?}", setup.elapsed());
        let text = handles[0].with_doc(|d| traces::text_obj(d).expect("the note has a text"));
        let rngs: Arc<Vec<Mutex<StdRng>>> = Arc::new(
            (0..k)
                .map(|i| Mutex::new(StdRng::seed_from_u64(i as u64)))
                .collect(),
        );
        let edit = Arc::new(
            move |tx: &mut automerge::transaction::Transaction<'_>, i: usize, _seq: u64| {
                let len = tx.length(&text);
                let pos = rngs[i].lock().gen_range(0..=len);
                tx.splice_text(&text, pos, 0, "x").expect("insert");
            },
        );
        let drain = Duration::from_secs(20);
        let pid = relay.child.id().unwrap();
        // Beside the long note, two other clients edit a small one through the same relay
        // (once per K): what the long note costs the relay's other notes. They run on a
        // runtime of their own, so that the long note's clients (whose handles block a
        // worker while their engine applies) do not delay them here.
        let bystanders = (mode == Observe::Heads).then(|| {
            let (go, ready) = tokio::sync::oneshot::channel::<()>();
            (
                go,
                spawn_bystanders(url.clone(), pid, duration, drain, ready),
            )
        });
        let bystanders = match bystanders {
            Some((go, (set_up, thread))) => {
                set_up.await.expect("bystanders set up");
                let _ = go.send(());
                Some(thread)
            }
            None => None,
        };
        let r = typing_run(&handles, pid, mode, 10.0, duration, drain, edit).await;
        if let Some(thread) = bystanders {
            let s = tokio::task::spawn_blocking(move || thread.join())
                .await
                .expect("join")
                .expect("bystanders");
            eprintln!("long K={k}: a small note beside it: {}", s.summary());
            rows.push(latency_row(
                format!("3b. a small note beside long K={k}, 2 clients, 10 edits/s each"),
                &s,
                None,
            ));
        }
        let pass = r.all_delivered() && r.p99 < Duration::from_millis(300);
        let scored = k == 4 && mode == Observe::Heads;
        rows.push(latency_row(
            format!(
                "3. long note K={k} sheaf{}, {}s, 10 keys/s each",
                if mode == Observe::Changes {
                    " via changes()"
                } else {
                    ""
                },
                duration.as_secs()
            ),
            &r,
            scored.then_some(("p99 < 300 ms", pass)),
        ));
        eprintln!(
            "long K={k} {mode:?}: {}; {}; drained in {:.1?}",
            r.summary(),
            r.cpu,
            r.drain
        );
        drop(handles);
        drop_repos(repos).await;
        relay.kill9().await;
    }

    // The same typing with JS automerge-repo clients, one Node process each.
    for &k in js_ks {
        let name = format!(
            "3. long note K={k} JS, {}s, 10 keys/s each",
            duration.as_secs()
        );
        if let Err(why) = js_available() {
            eprintln!("long JS: SKIP: {why}");
            rows.push(Row {
                name,
                measured: format!("SKIP: {why}"),
                baseline: String::new(),
                ratio: String::new(),
                target: String::new(),
                verdict: "SKIP",
            });
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let relay = relay_proc(dir.path()).await;
        let url = relay.url();
        let uploader = client(&url).await;
        let note = uploader.import(&saved).await.expect("import");
        upload(&note).await;
        let id = note.id();
        drop(note);
        drop_repos(vec![uploader]).await;
        let pid = relay.child.id().unwrap();
        let r = js_typing_run(&url, id, k, pid, duration).await;
        let pass = r.all_delivered() && r.p99 < Duration::from_millis(500);
        eprintln!("long K={k} JS: {}; {}", r.summary(), r.cpu);
        rows.push(latency_row(
            name,
            &r,
            (k == 4).then_some(("p99 < 500 ms", pass)),
        ));
        relay.kill9().await;
    }
}

/// Whether the JS clients can run: `node` on PATH and `tests/js/node_modules` installed.
fn js_available() -> Result<(), String> {
    match std::process::Command::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => return Err("`node` not found on PATH".into()),
    }
    let marker = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/js/node_modules/@automerge/automerge-repo/package.json");
    if !marker.exists() {
        return Err("tests/js/node_modules missing (npm ci --prefix tests/js)".into());
    }
    Ok(())
}

/// K `tests/js/typist.mjs` processes type into note `id` through the relay at `url`; their
/// latencies are computed in Node (wall clock, shared by the processes).
async fn js_typing_run(
    url: &str,
    id: DocumentId,
    k: usize,
    relay_pid: u32,
    duration: Duration,
) -> TypingResult {
    use futures::future::join_all;
    use serde_json::json;
    let mut procs = Vec::with_capacity(k);
    for i in 0..k {
        procs.push(common::JsProc::spawn("typist.mjs", &[url, &i.to_string()]).await);
    }
    let doc_url = id.url().to_string();
    join_all(
        procs
            .iter_mut()
            .map(|p| p.call(json!({"cmd": "find", "url": doc_url}))),
    )
    .await;
    let pids: Vec<String> = procs
        .iter()
        .filter_map(|p| p.pid())
        .map(|p| p.to_string())
        .collect();
    let node_cpu = || -> Duration { pids.iter().filter_map(|p| proc_cpu(p)).sum() };
    let (relay0, node0, wall0) = (
        proc_cpu(&relay_pid.to_string()).unwrap_or_default(),
        node_cpu(),
        Instant::now(),
    );
    let ms = duration.as_millis() as u64;
    let sent: Vec<u64> = join_all(
        procs
            .iter_mut()
            .enumerate()
            .map(|(i, p)| p.call(json!({"cmd": "type", "ms": ms, "hz": 10, "seed": i + 1}))),
    )
    .await
    .iter()
    .map(|v| v["sent"].as_u64().expect("sent count"))
    .collect();
    let total: u64 = sent.iter().sum();
    // Bounded by JsProc's wait for an answer (20 s).
    let drained = join_all(
        procs
            .iter_mut()
            .zip(&sent)
            .map(|(p, s)| p.call(json!({"cmd": "drain", "expect": total - s, "ms": 15_000}))),
    )
    .await;
    let wall = wall0.elapsed().as_secs_f64();
    let relay = proc_cpu(&relay_pid.to_string()).unwrap_or_default() - relay0;
    let node = node_cpu() - node0;
    let cpu = format!(
        "relay CPU {:.0}%, node {:.0}%",
        relay.as_secs_f64() / wall * 100.0,
        node.as_secs_f64() / wall * 100.0
    );
    for p in procs {
        p.finish().await;
    }
    let mut delivered = 0;
    let mut lat: Vec<u64> = Vec::new();
    for d in &drained {
        delivered += d["received"].as_u64().unwrap_or(0);
        for l in d["lat"].as_array().into_iter().flatten() {
            lat.push((l.as_f64().unwrap_or(0.0).max(0.0) * 1e3) as u64);
        }
    }
    latency_result(
        lat,
        total,
        total * (k as u64 - 1),
        delivered,
        cpu,
        Duration::ZERO,
    )
}

/// Percentiles and counts of one run (latencies in µs, any order).
fn latency_result(
    mut lat: Vec<u64>,
    sent: u64,
    expected: u64,
    delivered: u64,
    cpu: String,
    drain: Duration,
) -> TypingResult {
    lat.sort_unstable();
    if !lat.is_empty() {
        // The whole distribution, for the log: where the time goes shows in its shape.
        let deciles: Vec<String> = (1..=10)
            .map(|d| format!("{:.0}", lat[(lat.len() * d / 10).max(1) - 1] as f64 / 1e3))
            .collect();
        eprintln!("  latency deciles (ms): {}", deciles.join(" "));
    }
    let pct = |p: f64| {
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len().max(1)) - 1;
        Duration::from_micros(lat.get(i).copied().unwrap_or(0))
    };
    TypingResult {
        sent,
        expected,
        delivered,
        p50: pct(0.50),
        p99: pct(0.99),
        max: Duration::from_micros(lat.last().copied().unwrap_or(0)),
        cpu,
        drain,
    }
}

// ---- 4. relay RSS -----------------------------------------------------------------------------

/// 4. Many small notes, each uploaded by one short-lived client and fetched by another.
async fn relay_rss(notes: usize, rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_proc(dir.path()).await;
    let (url, addr, pid) = (relay.url(), relay.addr, relay.child.id().unwrap());
    // Ten samples after the first: every 1,000 notes of 10,000.
    let step = (notes / 10).max(1);
    // Short-lived clients run this many at a time.
    const PARALLEL: usize = 8;
    let rss = |n: usize| {
        let kib = proc_rss_kib(pid).unwrap_or(0);
        (n, kib)
    };
    let mut samples = vec![(rss(0), scrape(addr, "sheaf_documents_loaded").await)];
    let t = Instant::now();
    let cpu = CpuWindow::start(pid);
    let tally = Arc::new(NoteTally::default());
    let mut done = 0;
    while done < notes {
        let batch = step.min(notes - done);
        let next = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..PARALLEL)
            .map(|w| {
                let (url, next, tally) = (url.clone(), next.clone(), tally.clone());
                tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < batch as u64 {
                        one_note(&url, w, &tally).await;
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.expect("rss worker");
        }
        done += batch;
        samples.push((rss(done), scrape(addr, "sheaf_documents_loaded").await));
        eprintln!(
            "rss: {done} notes, relay RSS {} KiB, loaded {:?}, {:.1?}",
            samples.last().unwrap().0 .1,
            samples.last().unwrap().1,
            t.elapsed()
        );
    }
    let line: Vec<String> = samples
        .iter()
        .map(|((n, kib), loaded)| {
            format!(
                "{n}:{:.0}MB/{}",
                *kib as f64 / 1024.0,
                loaded.map_or("?".into(), |l| format!("{l:.0}"))
            )
        })
        .collect();
    eprintln!("rss samples (notes: RSS/loaded docs): {}", line.join(" "));
    // Flat: from 20% of the run on (2,000 notes of 10,000: past the loaded-document cap of
    // 1,000) RSS grows less than 25% however many more notes pass through.
    let warm_at = notes / 5;
    let warm = samples.iter().find(|s| s.0 .0 >= warm_at).unwrap().0 .1;
    let last = samples.last().unwrap().0 .1;
    let growth = last as f64 / warm.max(1) as f64;
    let (stuck, failed) = (
        tally.status_stuck.load(Ordering::Relaxed),
        tally.fetch_failed.load(Ordering::Relaxed),
    );
    let scored = notes >= 5_000;
    rows.push(Row {
        name: format!("4. relay RSS, {notes} notes up+down"),
        measured: format!(
            "{:.0} MB, {:.0} MB at {warm_at}, {:.0} MB at {notes}; {failed} fetches failed",
            samples[0].0 .1 as f64 / 1024.0,
            warm as f64 / 1024.0,
            last as f64 / 1024.0,
        ),
        baseline: format!(
            "loaded docs at end {}; {}; {stuck} status stuck; {:.0?}",
            samples
                .last()
                .unwrap()
                .1
                .map_or("?".into(), |l| format!("{l:.0}")),
            cpu.report(),
            t.elapsed()
        ),
        ratio: format!("{growth:.2}"),
        target: if scored {
            "end/2k <= 1.25".into()
        } else {
            "(info)".into()
        },
        verdict: if scored {
            verdict(growth <= 1.25 && failed == 0)
        } else {
            ""
        },
    });
    relay.kill9().await;
}

/// What went wrong with the notes of the RSS scenario (counted, not fatal).
#[derive(Default)]
struct NoteTally {
    /// The uploader's sync status never said synced (within 2 s).
    status_stuck: AtomicU64,
    /// The fetcher did not get the note, or not all of it.
    fetch_failed: AtomicU64,
}

/// One small note: created and uploaded by a short-lived client, then fetched once by
/// another (connect, find, disconnect).
async fn one_note(url: &str, worker: usize, tally: &NoteTally) {
    let up = client(url).await;
    let note = up.create().await.expect("create");
    note.change(|tx| {
        let text = tx.put_object(ROOT, traces::TEXT_KEY, automerge::ObjType::Text)?;
        tx.splice_text(&text, 0, 0, &format!("a small note from worker {worker}"))
    })
    .expect("edit");
    if !wait_synced(&note, Duration::from_secs(2)).await {
        tally.status_stuck.fetch_add(1, Ordering::Relaxed);
    }
    let (id, heads) = (note.id(), note.heads());
    drop(note);
    drop_repos(vec![up]).await;
    let down = client(url).await;
    let complete = match down.find(id).await {
        Ok(got) => {
            let deadline = Instant::now() + Duration::from_secs(10);
            while got.heads() != heads && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            got.heads() == heads
        }
        Err(_) => false,
    };
    if !complete {
        tally.fetch_failed.fetch_add(1, Ordering::Relaxed);
    }
    drop_repos(vec![down]).await;
}

//! Engine benchmarks against bare automerge, measured in the same run (a plain `main`).
//!
//! `cargo bench --bench engine` (set `SHEAF_BENCH_QUICK=1` for a short run on a prefix of
//! the trace and fewer peers). Scenarios:
//!
//! - **a. fresh-peer sync** of the automerge-paper note (T1: one change per edit; T2: 1,000
//!   edits per change): a fresh peer engine `find`s the note held by a relay engine, frames
//!   through `protocol::encode/decode`, storage answered at once in memory; vs the bare
//!   automerge sync loop with the empty side speaking first. Time and bytes ratios.
//! - **b. absorbing K concurrent edits** (K peers each send a one-character insert to the
//!   holder of the T2 note in one batch): holder's one `handle_batch`, then until all K
//!   peers converged; vs one `load_incremental` of all K changes, and vs K one-by-one calls.
//!   Also once (K = 16) on T1, whose 260k-change history the per-message bookkeeping must
//!   not walk.
//! - **c. steady state**: 1,000 synced notes between two engines, one edit on one note:
//!   frames and bytes exchanged.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use automerge::sync::{Message as SyncMessage, State as SyncState, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{Automerge, ReadDoc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sheafdb::engine::Input;
use sheafdb::traces;
use sheafdb::DocumentId;

use common::{peer_config, relay_config, Net};

struct Row {
    name: String,
    engine: String,
    baseline: String,
    ratio: String,
    target: &'static str,
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}", a / b)
}

fn main() {
    let quick = std::env::var_os("SHEAF_BENCH_QUICK").is_some();
    let trace = common::sequential("automerge-paper.json.gz");
    let n = if quick { 40_000 } else { trace.txns.len() };
    eprintln!(
        "automerge-paper: {} of {} txns{}",
        n,
        trace.txns.len(),
        if quick { " (SHEAF_BENCH_QUICK)" } else { "" }
    );
    let mut rows = Vec::new();

    let t = Instant::now();
    let t2 = traces::build_doc_prefix(&trace, 1_000, n).expect("T2 builds");
    eprintln!("built T2 in {:.2?}", t.elapsed());
    if !quick {
        assert_eq!(traces::text(&t2), trace.end_content);
    }
    {
        let t = Instant::now();
        let t1 = traces::build_doc_prefix(&trace, 1, n).expect("T1 builds");
        eprintln!("built T1 in {:.2?}", t.elapsed());
        fresh_peer_sync("T1", &t1, &mut rows);
        // The same edits on the note of one change per edit: a long history, which the
        // per-message bookkeeping must not walk.
        absorb_concurrent("T1", 16, &t1, &mut rows);
    }
    fresh_peer_sync("T2", &t2, &mut rows);

    let ks: &[usize] = if quick { &[4, 16] } else { &[4, 16, 64] };
    for &k in ks {
        absorb_concurrent("T2", k, &t2, &mut rows);
    }
    steady_state(if quick { 200 } else { 1_000 }, &mut rows);

    let w = rows
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(10)
        .max(10);
    println!();
    println!(
        "| {:w$} | {:>22} | {:>22} | {:>6} | {:>8} |",
        "scenario", "engine", "baseline", "ratio", "target"
    );
    println!(
        "|{}|{}|{}|{}|{}|",
        "-".repeat(w + 2),
        "-".repeat(24),
        "-".repeat(24),
        "-".repeat(8),
        "-".repeat(10)
    );
    for r in &rows {
        println!(
            "| {:w$} | {:>22} | {:>22} | {:>6} | {:>8} |",
            r.name, r.engine, r.baseline, r.ratio, r.target
        );
    }
}

/// a. A fresh peer syncs the whole note from a relay engine, vs the bare sync loop.
fn fresh_peer_sync(label: &str, doc: &Automerge, rows: &mut Vec<Row>) {
    // Bare automerge: the empty side speaks first; every message is encoded and decoded.
    let mut full = doc.clone();
    let mut empty = Automerge::new();
    let (mut s_full, mut s_empty) = (SyncState::new(), SyncState::new());
    let (mut bare_bytes, mut bare_msgs) = (0usize, 0usize);
    let t = Instant::now();
    loop {
        let mut moved = false;
        if let Some(m) = empty.generate_sync_message(&mut s_empty) {
            let b = m.encode();
            bare_bytes += b.len();
            bare_msgs += 1;
            full.receive_sync_message(&mut s_full, SyncMessage::decode(&b).unwrap())
                .unwrap();
            moved = true;
        }
        if let Some(m) = full.generate_sync_message(&mut s_full) {
            let b = m.encode();
            bare_bytes += b.len();
            bare_msgs += 1;
            empty
                .receive_sync_message(&mut s_empty, SyncMessage::decode(&b).unwrap())
                .unwrap();
            moved = true;
        }
        if !moved {
            break;
        }
    }
    let bare = t.elapsed();
    assert_eq!(empty.get_heads(), doc.get_heads());
    drop((full, empty));

    // The engines: a relay holding the note (answered from storage) and a fresh peer.
    let id = DocumentId::random();
    let mut net = Net::new();
    let relay = net.add(relay_config("relay"));
    let peer = net.add(peer_config("fresh"));
    net.nodes[relay].preloaded.insert(id, doc.clone());
    net.connect(peer, relay);
    net.settle();
    let (m0, b0) = (net.messages, net.bytes);
    let t = Instant::now();
    net.push(peer, Input::Find { doc: id });
    net.settle();
    let engine = t.elapsed();
    assert_eq!(
        net.heads(peer, &id),
        Some(doc.get_heads()),
        "fresh peer synced"
    );
    let (msgs, bytes) = (net.messages - m0, net.bytes - b0);
    // How much of that is the fresh peer writing its first snapshot (`save()`).
    let got = net.nodes[peer].engine.document(&id).unwrap();
    let t = Instant::now();
    let snapshot = got.lock().save();
    let save = t.elapsed();
    drop(snapshot);

    rows.push(Row {
        name: format!("a. fresh-peer sync {label}: time"),
        engine: format!("{} (save {})", ms(engine), ms(save)),
        baseline: ms(bare),
        ratio: ratio(engine.as_secs_f64(), bare.as_secs_f64()),
        target: "<= 1.1",
    });
    rows.push(Row {
        name: format!("a. fresh-peer sync {label}: bytes"),
        engine: format!("{bytes} B, {msgs} msgs"),
        baseline: format!("{bare_bytes} B, {bare_msgs} msgs"),
        ratio: ratio(bytes as f64, bare_bytes as f64),
        target: "<= 1.05",
    });
}

/// b. K peers each send a one-character insert to the holder of `doc` (named `label`) at once.
fn absorb_concurrent(label: &str, k: usize, doc: &Automerge, rows: &mut Vec<Row>) {
    let id = DocumentId::random();
    let mut net = Net::new();
    let holder = net.add(relay_config("holder"));
    net.nodes[holder].preloaded.insert(id, doc.clone());
    let peers: Vec<usize> = (0..k)
        .map(|i| {
            let p = net.add(peer_config(&format!("p{i}")));
            net.nodes[p].preloaded.insert(id, doc.clone());
            net.push(p, Input::Find { doc: id });
            net.connect(p, holder);
            p
        })
        .collect();
    net.settle();
    for &p in &peers {
        assert_eq!(
            net.heads(p, &id),
            Some(doc.get_heads()),
            "peers synced first"
        );
    }
    // Each peer types one character somewhere.
    let mut rng = StdRng::seed_from_u64(k as u64);
    let mut changes = Vec::new();
    for (i, &p) in peers.iter().enumerate() {
        let shared = net.nodes[p].engine.document(&id).unwrap();
        let mut d = shared.lock();
        let text = traces::text_obj(&d).unwrap();
        let len = d.length(&text);
        let pos = rng.gen_range(0..=len);
        // The copies were cloned from one document: each peer is its own author.
        d.set_actor(automerge::ActorId::from(vec![i as u8 + 1; 16]));
        let mut tx = d.transaction();
        tx.splice_text(
            &text,
            pos,
            0,
            &((b'a' + (i % 26) as u8) as char).to_string(),
        )
        .unwrap();
        tx.commit();
        changes.push(d.get_last_local_change().unwrap());
        drop(d);
        net.push(p, Input::LocalChange { doc: id });
        // The change is persisted before it is sent (the Persisted answer comes next).
        while net.run_node(p) {}
    }
    net.deliver_all();
    assert_eq!(net.nodes[holder].inputs.len(), k, "one message per peer");
    let t = Instant::now();
    net.run_node(holder);
    let holder_time = t.elapsed();
    let persists = net.nodes[holder].persist_count;
    let all = Instant::now();
    net.settle();
    let converge = all.elapsed() + holder_time;
    let heads = net.heads(holder, &id).unwrap();
    for l in net.nodes[holder]
        .log
        .iter()
        .filter(|l| l.starts_with("close"))
    {
        eprintln!("holder: {l}");
    }
    assert_eq!(heads.len(), k, "holder has every peer's change");
    for &p in &peers {
        assert_eq!(net.heads(p, &id).as_ref(), Some(&heads), "peer converged");
    }
    drop(net);

    // Bare automerge on copies of the note.
    let mut one = doc.clone();
    let mut concat = Vec::new();
    for c in &changes {
        concat.extend_from_slice(c.raw_bytes());
    }
    let t = Instant::now();
    one.load_incremental(&concat).unwrap();
    let coalesced = t.elapsed();
    assert_eq!(one.get_heads(), heads);
    drop(one);
    let mut each = doc.clone();
    let t = Instant::now();
    for c in &changes {
        each.load_incremental(c.raw_bytes()).unwrap();
    }
    let by_one = t.elapsed();
    assert_eq!(each.get_heads(), heads);

    rows.push(Row {
        name: format!("b. {label} K={k}: holder applies all (1 batch)"),
        engine: format!("{} ({persists} persist)", ms(holder_time)),
        baseline: format!("{} (1 load_incr.)", ms(coalesced)),
        ratio: ratio(holder_time.as_secs_f64(), coalesced.as_secs_f64()),
        target: "<= 1.5",
    });
    rows.push(Row {
        name: format!("b. {label} K={k}: vs one-by-one apply"),
        engine: ms(holder_time),
        baseline: format!("{} ({k} calls)", ms(by_one)),
        ratio: ratio(holder_time.as_secs_f64(), by_one.as_secs_f64()),
        target: "",
    });
    rows.push(Row {
        name: format!("b. {label} K={k}: all {k} peers converged"),
        engine: ms(converge),
        baseline: format!("{} ({k}+1 applies)", ms(coalesced * (k as u32 + 1))),
        ratio: ratio(
            converge.as_secs_f64(),
            coalesced.as_secs_f64() * (k as f64 + 1.0),
        ),
        target: "",
    });
}

/// c. Many synced notes; one edit on one note.
fn steady_state(notes: usize, rows: &mut Vec<Row>) {
    let mut net = Net::new();
    let a = net.add(peer_config("a"));
    let b = net.add(relay_config("b"));
    net.connect(a, b);
    net.settle();
    let ids: Vec<DocumentId> = (0..notes).map(|_| DocumentId::random()).collect();
    for (i, id) in ids.iter().enumerate() {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        let text = tx
            .put_object(automerge::ROOT, traces::TEXT_KEY, automerge::ObjType::Text)
            .unwrap();
        tx.splice_text(&text, 0, 0, &format!("note {i}: some text"))
            .unwrap();
        tx.commit();
        net.push(
            a,
            Input::Create {
                doc: *id,
                automerge: doc,
            },
        );
    }
    let t = Instant::now();
    net.settle();
    let initial = t.elapsed();
    for id in &ids {
        assert_eq!(net.heads(a, id), net.heads(b, id), "synced");
    }
    let (m0, b0) = (net.messages, net.bytes);
    net.record = true;
    let edited = ids[notes / 2];
    {
        let shared = net.nodes[a].engine.document(&edited).unwrap();
        let mut d = shared.lock();
        let text = traces::text_obj(&d).unwrap();
        let mut tx = d.transaction();
        tx.splice_text(&text, 0, 0, "!").unwrap();
        tx.commit();
    }
    let t = Instant::now();
    net.push(a, Input::LocalChange { doc: edited });
    net.settle();
    let edit = t.elapsed();
    assert_eq!(net.heads(a, &edited), net.heads(b, &edited));
    let (msgs, bytes) = (net.messages - m0, net.bytes - b0);
    let other_docs = net.sent.iter().filter(|s| s.2 != Some(edited)).count();
    assert_eq!(other_docs, 0, "only the edited note's delta travels");
    let shape: Vec<String> = net
        .sent
        .iter()
        .map(|(n, ty, _, len)| format!("{}:{ty} {len}B", if *n == a { "a" } else { "b" }))
        .collect();
    eprintln!("c. frames for one edit: {}", shape.join(", "));
    rows.push(Row {
        name: format!("c. {notes} notes: one edit on one note"),
        engine: format!("{bytes} B, {msgs} msgs, {}", ms(edit)),
        baseline: format!("initial sync {}", ms(initial)),
        ratio: "-".into(),
        target: "1 doc",
    });
}

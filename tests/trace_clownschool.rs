//! Replay the concurrent `clownschool` trace (three agents) with one engine peer per agent,
//! syncing through a relay engine in memory, and check every replica ends at `endContent`
//! with identical heads.
//!
//! # How a txn is applied on exactly the merge of its parents
//!
//! Each agent has an *editor* document (a scratch `Automerge` with the agent's actor) that
//! is always exactly at the agent's current view: the closure of the txns it has seen.
//! Before txn `i` the editor absorbs the ancestors of `i` it has not seen yet, taking those
//! changes from the agent's **engine** document (where they arrived through the relay), so
//! afterwards the editor holds exactly the merge of `i`'s parents; the test asserts that its
//! heads are the parents' change hashes. This is what `fork_at(parents' heads)` would give,
//! maintained incrementally: `fork_at` rebuilds the document from its history (O(history) per
//! call, 23k calls), and in this trace every agent's next txn descends from its previous one,
//! so the view only ever moves forward. The patches are applied on the editor as one
//! change, which then enters the agent's engine document as a local change
//! (`Input::LocalChange`) and flows through the relay.
//!
//! Local changes are handed to the engine lazily: an agent's pending changes are applied to
//! its engine document (in one `apply_changes` call) only when another agent's next txn
//! needs them, and then the network runs until it is quiet. A real editor would push every
//! keystroke, but every remote apply into a text costs O(text) in automerge 0.12
//! (NOTES section 2).
//!
//! # How much of the trace
//!
//! A release build (what CI runs) replays the whole trace (23,136 txns, 2,020 flushes,
//! 3,855 absorbs) and checks that every replica ends at `endContent`; it takes about 100 s
//! of CPU: each flush costs several apply and sync-message passes over a text of up to ~23k
//! ops, in four engines. A debug build replays the first 1,000 txns, checking at every txn
//! that the editor is exactly at the merge of its parents and at the end that all replicas
//! and the relay's stored copy converged. `SHEAF_TRACE_TXNS=N` picks another length.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, Change, ChangeHash, ObjType, ReadDoc, ROOT};
use sheafdb::engine::Input;
use sheafdb::traces::{self, TEXT_KEY};
use sheafdb::DocumentId;

use common::{concurrent, peer_config, relay_config, Net};

struct Editor {
    doc: Automerge,
    seen: Vec<bool>,
    /// Txns made here and not yet in the agent's engine document.
    pending: Vec<usize>,
    /// The editor's heads at the last flush.
    flushed_heads: Vec<ChangeHash>,
}

#[test]
fn clownschool_replays_through_a_relay() {
    let trace = concurrent("clownschool.json.gz");
    let n_txns = std::env::var("SHEAF_TRACE_TXNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) {
            1_000
        } else {
            usize::MAX
        })
        .min(trace.txns.len());
    let full = n_txns == trace.txns.len();
    let mut t_sync = std::time::Duration::ZERO;
    let started = Instant::now();

    let mut net = Net::new();
    let relay = net.add(relay_config("relay"));
    let peers: Vec<usize> = (0..trace.num_agents)
        .map(|a| net.add(peer_config(&format!("agent{a}"))))
        .collect();
    for &p in &peers {
        net.connect(p, relay);
    }
    net.settle();

    // The empty document of the trace: one change creating the text object.
    let doc_id = DocumentId::random();
    let mut root = Automerge::new().with_actor(ActorId::from(vec![0xee; 16]));
    let mut tx = root.transaction();
    tx.put_object(ROOT, TEXT_KEY, ObjType::Text).unwrap();
    tx.commit();
    let root_heads = root.get_heads();
    let root_bytes = root.save();
    net.push(
        peers[0],
        Input::Create {
            doc: doc_id,
            automerge: root,
        },
    );
    net.settle();
    for &p in &peers[1..] {
        net.push(p, Input::Find { doc: doc_id });
    }
    net.settle();

    let mut editors: Vec<Editor> = (0..trace.num_agents)
        .map(|a| {
            let mut doc = Automerge::load(&root_bytes).unwrap();
            doc.set_actor(ActorId::from(vec![a as u8 + 1; 16]));
            Editor {
                doc,
                seen: vec![false; n_txns],
                pending: Vec::new(),
                flushed_heads: root_heads.clone(),
            }
        })
        .collect();
    let text_obj = traces::text_obj(&editors[0].doc).expect("text object");
    let mut hash_of: Vec<Option<ChangeHash>> = vec![None; n_txns];
    let mut flushed = vec![false; n_txns];
    // Every change an agent made, by hash, recorded when it is handed to the engine.
    let mut made: HashMap<ChangeHash, Change> = HashMap::new();
    let (mut flushes, mut absorbs) = (0usize, 0usize);

    for i in 0..n_txns {
        let txn = &trace.txns[i];
        let a = txn.agent;
        // The ancestors of txn i this agent has not seen, oldest first.
        let mut missing = Vec::new();
        let mut stack: Vec<usize> = txn.parents.clone();
        let mut visited = HashSet::new();
        while let Some(p) = stack.pop() {
            if editors[a].seen[p] || !visited.insert(p) {
                continue;
            }
            missing.push(p);
            stack.extend(trace.txns[p].parents.iter().copied());
        }
        missing.sort_unstable();
        if !missing.is_empty() {
            // Hand the authors' pending changes to their engines and let the relay carry them.
            let mut authors: Vec<usize> = missing
                .iter()
                .filter(|m| !flushed[**m])
                .map(|m| trace.txns[*m].agent)
                .collect();
            authors.sort_unstable();
            authors.dedup();
            if !authors.is_empty() {
                for b in authors {
                    flush(
                        &mut net,
                        peers[b],
                        doc_id,
                        &mut editors[b],
                        &mut flushed,
                        &hash_of,
                        &mut made,
                    );
                }
                flushes += 1;
                let t = Instant::now();
                net.settle();
                t_sync += t.elapsed();
            }
            // Absorb them once the relay has delivered them to the agent's engine document.
            // (The bytes come from `made`, keyed by content hash, so they are the very
            // changes the relay carried: asking the engine's document for them would cost
            // one pass over its ops per change in automerge 0.12.)
            let shared = net.nodes[peers[a]]
                .engine
                .document(&doc_id)
                .expect("agent's document is ready");
            let changes: Vec<Change> = {
                let d = shared.lock();
                missing
                    .iter()
                    .map(|m| {
                        let h = hash_of[*m].expect("parents come first");
                        assert!(
                            d.get_missing_deps(&[h]).is_empty(),
                            "txn {i}: agent {a}'s peer lacks parent txn {m} after sync"
                        );
                        made[&h].clone()
                    })
                    .collect()
            };
            editors[a].doc.apply_changes(changes).unwrap();
            for m in &missing {
                editors[a].seen[*m] = true;
            }
            absorbs += 1;
        }
        // The editor is now exactly the merge of the parents.
        let mut expected: Vec<ChangeHash> = if txn.parents.is_empty() {
            root_heads.clone()
        } else {
            txn.parents.iter().map(|p| hash_of[*p].unwrap()).collect()
        };
        expected.sort();
        let mut heads = editors[a].doc.get_heads();
        heads.sort();
        assert_eq!(
            heads, expected,
            "txn {i}: agent {a}'s view is not the merge of its parents"
        );

        let e = &mut editors[a];
        let mut tx = e.doc.transaction();
        traces::apply_patches(&mut tx, &text_obj, &txn.patches)
            .unwrap_or_else(|err| panic!("txn {i}: {err}"));
        let hash = tx.commit().0.expect("every txn edits");
        hash_of[i] = Some(hash);
        e.seen[i] = true;
        e.pending.push(i);
    }
    for (b, &p) in peers.iter().enumerate() {
        flush(
            &mut net,
            p,
            doc_id,
            &mut editors[b],
            &mut flushed,
            &hash_of,
            &mut made,
        );
    }
    let t = Instant::now();
    net.settle();
    t_sync += t.elapsed();

    let relay_heads = net.heads(relay, &doc_id).expect("relay has the document");
    let reference = net.heads(peers[0], &doc_id).unwrap();
    assert_eq!(relay_heads, reference);
    let mut texts = Vec::new();
    for &p in &peers {
        assert_eq!(net.heads(p, &doc_id).unwrap(), reference, "heads differ");
        let doc = net.nodes[p].engine.document(&doc_id).unwrap();
        texts.push(traces::text(&doc.lock()));
    }
    assert!(texts.windows(2).all(|w| w[0] == w[1]), "texts differ");
    // The relay stored everything it has.
    let stored = &net.nodes[relay].chunks[&doc_id];
    let mut reloaded = Automerge::new();
    for c in stored {
        reloaded.load_incremental(c).unwrap();
    }
    assert_eq!(reloaded.get_heads(), relay_heads);
    if full {
        assert_eq!(texts[0], trace.end_content);
    }
    eprintln!(
        "clownschool: {n_txns} txns by {} agents, {flushes} flushes, {absorbs} absorbs, {} frames, {} bytes, {:.2?} ({:.2?} in the engines)",
        trace.num_agents,
        net.messages,
        net.bytes,
        started.elapsed(),
        t_sync
    );
}

/// Apply an agent's pending changes to its engine document in one call and tell the engine.
fn flush(
    net: &mut Net,
    node: usize,
    doc: DocumentId,
    editor: &mut Editor,
    flushed: &mut [bool],
    hash_of: &[Option<ChangeHash>],
    made: &mut HashMap<ChangeHash, Change>,
) {
    if editor.pending.is_empty() {
        return;
    }
    let pending = std::mem::take(&mut editor.pending);
    let mine: HashSet<ChangeHash> = pending.iter().map(|i| hash_of[*i].unwrap()).collect();
    // One pass over the editor's ops for every change since the last flush (this includes
    // changes absorbed from others, which the engine's document already has).
    let changes: Vec<Change> = editor
        .doc
        .get_changes(&editor.flushed_heads)
        .into_iter()
        .filter(|c| mine.contains(&c.hash()))
        .collect();
    assert_eq!(changes.len(), pending.len());
    editor.flushed_heads = editor.doc.get_heads();
    for i in &pending {
        flushed[*i] = true;
    }
    for c in &changes {
        made.insert(c.hash(), c.clone());
    }
    let shared = net.nodes[node].engine.document(&doc).expect("ready");
    shared.lock().apply_changes(changes).unwrap();
    net.push(node, Input::LocalChange { doc });
}

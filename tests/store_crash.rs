//! kill -9 for real: every acknowledged edit survives, and the store reopens, cycle after cycle.
//!
//! The parent test re-executes this test binary with `--exact crash_child` and
//! `SHEAF_CRASH_DIR` set. The child opens the store, edits a few documents as fast as it can
//! (each change written with `write()`, a `Compact` now and then) and prints `ACK <doc> <n>`
//! once edit `n` is durable. The parent SIGKILLs it at a random moment, reopens the store and
//! checks that every acknowledged edit is there. State accumulates over the cycles.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::{transaction::Transactable, AutoCommit, ReadDoc, ROOT};
use rand::Rng;
use sheafdb::store::{Store, StoreConfig, WriteOp};
use sheafdb::DocumentId;

const ENV: &str = "SHEAF_CRASH_DIR";
const DOCS: u8 = 3;
const CYCLES: usize = 24;

fn doc_id(i: u8) -> DocumentId {
    DocumentId::from_bytes([i + 1; 16])
}

/// Edit numbers present in a document (keys `k<n>`).
fn edit_numbers(doc: &impl ReadDoc) -> Vec<u64> {
    doc.keys(ROOT)
        .filter_map(|k| k.strip_prefix('k').and_then(|n| n.parse().ok()))
        .collect()
}

/// This test binary again, running only the child test `name`, with `env` naming `dir`; its
/// stdout piped.
fn spawn_child(name: &str, env: &str, dir: &std::path::Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(env, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(ENV) else {
        return; // not the child
    };
    let store = Store::open(&dir, StoreConfig::default()).expect("child: open");
    let mut docs: Vec<(AutoCommit, u64)> = (0..DOCS)
        .map(|i| match store.load(&doc_id(i)).expect("child: load") {
            Some(l) => {
                assert!(
                    l.corrupt.is_empty(),
                    "child saw corruption: {:?}",
                    l.corrupt
                );
                let next = edit_numbers(&l.doc).into_iter().max().map_or(0, |n| n + 1);
                let mut d = AutoCommit::load(&l.doc.save()).unwrap();
                d.update_diff_cursor();
                let _ = d.save_incremental(); // everything loaded is already stored
                (d, next)
            }
            None => (AutoCommit::new(), 0),
        })
        .collect();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut rng = rand::thread_rng();
    loop {
        let i = rng.gen_range(0..DOCS);
        let (d, next) = &mut docs[usize::from(i)];
        let n = *next;
        *next += 1;
        d.put(ROOT, format!("k{n}"), n as i64).unwrap();
        let mut ops = vec![WriteOp::AppendChunk {
            doc: doc_id(i),
            bytes: d.save_incremental(),
        }];
        if rng.gen_ratio(1, 15) {
            ops.push(WriteOp::Compact {
                doc: doc_id(i),
                snapshot: d.save(),
            });
        }
        while in_flight.load(Ordering::Acquire) > 32 {
            std::thread::sleep(Duration::from_micros(200));
        }
        in_flight.fetch_add(1, Ordering::AcqRel);
        let in_flight = in_flight.clone();
        store.write(ops, move |r| {
            r.expect("child: write failed");
            let mut out = std::io::stdout().lock();
            writeln!(out, "ACK {i} {n}").unwrap();
            out.flush().unwrap();
            in_flight.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

#[test]
fn kill_9_loses_no_acknowledged_edit() {
    if std::env::var(ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::thread_rng();
    let mut acked: Vec<Vec<u64>> = vec![Vec::new(); usize::from(DOCS)];
    let started = Instant::now();
    let mut total_acks = 0;
    let mut replayed = 0;
    for cycle in 0..CYCLES {
        let mut child = spawn_child("crash_child", ENV, dir.path());
        let stdout = child.stdout.take().unwrap();
        let (ack_tx, ack_rx) = std::sync::mpsc::channel::<(u8, u64)>();
        let reader = std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut p = match l.strip_prefix("ACK ") {
                    Some(rest) => rest.split(' '),
                    None => continue,
                };
                let parsed = (|| {
                    Some((
                        p.next()?.parse::<u8>().ok()?,
                        p.next()?.parse::<u64>().ok()?,
                    ))
                })();
                if let Some(a) = parsed {
                    let _ = ack_tx.send(a);
                }
            }
        });
        // Kill at a random moment once the child is writing (a loaded machine may take a
        // while to start it), so every cycle tests something.
        let mut acks = Vec::new();
        if let Ok(first) = ack_rx.recv_timeout(Duration::from_secs(20)) {
            acks.push(first);
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..270)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "cycle {cycle}: child exited by itself: {status}"
        );
        reader.join().unwrap();
        acks.extend(ack_rx.try_iter());
        total_acks += acks.len();
        for (i, n) in acks {
            acked[usize::from(i)].push(n);
        }

        let store = Store::open(dir.path(), StoreConfig::default())
            .unwrap_or_else(|e| panic!("cycle {cycle}: reopen failed: {e}"));
        replayed += store.stats().replayed_records;
        for i in 0..DOCS {
            let want = &acked[usize::from(i)];
            let Some(l) = store.load(&doc_id(i)).unwrap() else {
                assert!(want.is_empty(), "cycle {cycle}: doc {i} missing");
                continue;
            };
            assert!(l.corrupt.is_empty(), "cycle {cycle}: {:?}", l.corrupt);
            let have = edit_numbers(&l.doc);
            for n in want {
                assert!(
                    have.contains(n),
                    "cycle {cycle}: acknowledged edit {n} of doc {i} lost"
                );
            }
        }
    }
    eprintln!(
        "{CYCLES} kill -9 cycles, {total_acks} acknowledged edits verified, {replayed} commit log records replayed, {:?}",
        started.elapsed()
    );
    assert!(
        total_acks > CYCLES,
        "children acknowledged too little to test anything"
    );
    // sled writes its own log every 500 ms and the kills come sooner: the reopens must have
    // needed the commit log, or this test did not test it.
    assert!(replayed > 0, "no reopen replayed the commit log");
}

const LOG_ENV: &str = "SHEAF_LOG_CHILD_DIR";
const LOG_EDITS: u64 = 40;

/// The child of the next test: acknowledged writes that sled itself never wrote out (its own
/// background flush is off), continuing the note a previous child left; then it waits to be
/// killed.
#[test]
fn log_child() {
    let Ok(dir) = std::env::var(LOG_ENV) else {
        return;
    };
    let config = StoreConfig {
        sled_flush_every_ms: None,
        ..StoreConfig::default()
    };
    let store = Store::open(&dir, config).expect("child: open");
    let (mut d, from) = match store.load(&doc_id(0)).expect("child: load") {
        Some(l) => {
            let next = edit_numbers(&l.doc).into_iter().max().map_or(0, |n| n + 1);
            let mut d = AutoCommit::load(&l.doc.save()).unwrap();
            let _ = d.save_incremental(); // everything loaded is already stored
            (d, next)
        }
        None => (AutoCommit::new(), 0),
    };
    for n in from..from + LOG_EDITS {
        d.put(ROOT, format!("k{n}"), n as i64).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let op = WriteOp::AppendChunk {
            doc: doc_id(0),
            bytes: d.save_incremental(),
        };
        store.write(vec![op], move |r| tx.send(r).unwrap());
        rx.recv().unwrap().expect("child: write failed");
    }
    println!("DONE");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

/// Three children in turn, each killed after its writes were acknowledged: every reopen finds
/// every edit so far, from records only the commit log had. (Three, because a second process
/// numbering its chunks as the first did would overwrite them: sled's id generator persists
/// its counter lazily, see `Writer::next_seq`.)
#[test]
fn acknowledged_batches_only_in_the_commit_log_survive_kill_9() {
    if std::env::var(LOG_ENV).is_ok() || std::env::var(ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for round in 1..=3u64 {
        let mut child = spawn_child("log_child", LOG_ENV, dir.path());
        let done = BufReader::new(child.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .any(|l| l.ends_with("DONE")); // libtest may print "test log_child ... " first
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(done, "round {round}: the child did not finish its writes");

        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        // One record per acknowledged write, none of which sled had on disk.
        assert_eq!(store.stats().replayed_records, LOG_EDITS, "round {round}");
        let l = store.load(&doc_id(0)).unwrap().expect("the note is listed");
        assert!(l.corrupt.is_empty(), "{:?}", l.corrupt);
        let mut have = edit_numbers(&l.doc);
        have.sort();
        assert_eq!(
            have,
            (0..round * LOG_EDITS).collect::<Vec<_>>(),
            "round {round}"
        );
        // Replayed once: the checkpoint after the replay leaves nothing for the next open.
        drop(store);
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        assert_eq!(store.stats().replayed_records, 0);
        assert_eq!(
            edit_numbers(&store.load(&doc_id(0)).unwrap().unwrap().doc).len() as u64,
            round * LOG_EDITS
        );
    }
}

//! Rebuilds the fuzz seed corpora (`fuzz/corpus-seed/<target>/`) from the JS frames in
//! `tests/fixtures/js-frames`, real Automerge sync exchanges and a prefix of the
//! automerge-paper editing trace (`../shared/traces`). Run by hand:
//! `cargo run --release --example fuzz_seeds`.

use std::path::{Path, PathBuf};

use sheafdb::fuzzing;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.file_name().is_none_or(|n| n != "README.md"))
        .collect();
    v.sort();
    v
}

fn main() {
    write_seed_corpora();
    println!("seed corpora written under fuzz/corpus-seed/");
}

use automerge::sync::{self, SyncDoc};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, ReadDoc, ROOT};
use rand::{rngs::StdRng, Rng, SeedableRng};
use sheafdb::fuzzing::{seeds, StoreOp};
use sheafdb::protocol::{self, Message};

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = root().join("fuzz/corpus-seed").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

/// The first `n` patches of the automerge-paper trace: `(pos, deleted, inserted)`.
fn trace_prefix(n: usize) -> Vec<(usize, isize, String)> {
    let path = root().join("../shared/traces/automerge-paper.json.gz");
    let f = std::fs::File::open(&path).expect("shared traces beside the worktree");
    let json: serde_json::Value = serde_json::from_reader(flate2::read::GzDecoder::new(f)).unwrap();
    json["txns"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["patches"].as_array().unwrap().clone())
        .take(n)
        .map(|p| {
            (
                p[0].as_u64().unwrap() as usize,
                p[1].as_i64().unwrap() as isize,
                p[2].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A remote fork of the fuzz document with `trace` typed into its text and a few edits.
fn remote_fork(local: &Automerge, trace: &[(usize, isize, String)], seed: u64) -> Automerge {
    let mut remote = local
        .fork()
        .with_actor(ActorId::from(b"sheaf-fuzz-remote".to_vec()));
    let (_, text) = remote.get(ROOT, "text").unwrap().unwrap();
    for (pos, del, ins) in trace {
        let mut tx = remote.transaction();
        let len = tx.length(&text);
        let _ = tx.splice_text(&text, (*pos).min(len), *del, ins);
        tx.commit_with(CommitOptions::default().with_time(0));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..rng.gen_range(1..4) {
        sheafdb::sim::random_edit(&mut remote, &mut rng);
    }
    remote
}

/// A real sync exchange local <-> remote; the messages the remote sent, in order.
fn exchange(local: &Automerge, remote: &Automerge) -> Vec<Vec<u8>> {
    let (mut local, mut remote) = (local.fork(), remote.fork());
    let (mut ls, mut rs) = (sync::State::new(), sync::State::new());
    let mut out = Vec::new();
    for _ in 0..6 {
        if let Some(m) = local.generate_sync_message(&mut ls) {
            remote.receive_sync_message(&mut rs, m).unwrap();
        }
        if let Some(m) = remote.generate_sync_message(&mut rs) {
            out.push(m.clone().encode());
            local.receive_sync_message(&mut ls, m).unwrap();
        }
    }
    out
}

fn write_seed_corpora() {
    let _ = std::fs::remove_dir_all(root().join("fuzz/corpus-seed"));
    // wire_decode: the JS frames as captured, and sheaf's own encodings of them.
    let frames = files(&root().join("tests/fixtures/js-frames"));
    let mut js_sync = Vec::new();
    for f in frames
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "cbor"))
    {
        let bytes = std::fs::read(f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        write("wire_decode", &format!("js-{name}"), &bytes);
        let msg = protocol::decode(&bytes).unwrap();
        write(
            "wire_decode",
            &format!("sheaf-{name}"),
            &protocol::encode(&msg),
        );
        if let Message::Sync { data, .. } | Message::Request { data, .. } = msg {
            js_sync.push((name, data));
        }
    }
    // sync_message: JS sync payloads (another document: changes that do not apply,
    // heads we lack), real exchanges with a remote fork that typed a trace prefix, and
    // raw change bytes for the wrapped mode.
    for (name, data) in js_sync.iter().take(4) {
        write(
            "sync_message",
            &format!("js-{name}"),
            &seeds::sync_message(0, data),
        );
    }
    let trace = trace_prefix(40);
    for edits in 0..3u8 {
        let local = fuzzing::sync_base_document(edits);
        let remote = remote_fork(&local, &trace[..10 * (edits as usize + 1)], edits as u64);
        let flags = edits << 2;
        for (i, m) in exchange(&local, &remote).iter().enumerate().take(3) {
            write(
                "sync_message",
                &format!("exchange-e{edits}-{i}"),
                &seeds::sync_message(flags, m),
            );
        }
        let changes = remote.save_after(&local.get_heads());
        write(
            "sync_message",
            &format!("changes-e{edits}"),
            &seeds::sync_message(flags | 2, &changes),
        );
        // As a request from an empty peer: the first message a fresh doc sends.
        let empty = Automerge::new();
        let m = empty
            .generate_sync_message(&mut sync::State::new())
            .unwrap()
            .encode();
        write(
            "sync_message",
            &format!("request-e{edits}"),
            &seeds::sync_message(flags | 1, &m),
        );
    }
    // store_load: a snapshot, trace changes as incremental chunks, a sync state, a
    // compaction, a raw sealed chunk, garbage keys, loads in between.
    let local = fuzzing::sync_base_document(1);
    let remote = remote_fork(&local, &trace[..20], 7);
    let snapshot = local.save();
    let changes = remote.save_after(&local.get_heads());
    let mut state = sync::State::new();
    let r2 = remote.fork();
    let _ = r2.generate_sync_message(&mut state);
    state.shared_heads = remote.get_heads();
    let state = state.encode();
    let full = remote.save();
    write(
        "store_load",
        "append-load",
        &seeds::store_load(&[
            StoreOp::Append(0, &snapshot),
            StoreOp::Append(0, &changes),
            StoreOp::SyncState(0, &state),
            StoreOp::Load(0),
        ]),
    );
    write(
        "store_load",
        "compact-then-append",
        &seeds::store_load(&[
            StoreOp::Append(1, &snapshot),
            StoreOp::Compact(1, &full),
            StoreOp::Append(1, &changes),
            StoreOp::Delete(2),
            StoreOp::Load(1),
        ]),
    );
    let mut key = vec![2u8; 16];
    key.push(2);
    key.extend_from_slice(&7u64.to_be_bytes());
    write(
        "store_load",
        "raw-and-sealed",
        &seeds::store_load(&[
            StoreOp::Sealed {
                doc: 2,
                kind: 0,
                seq: 1,
                payload: &snapshot,
            },
            StoreOp::Sealed {
                doc: 2,
                kind: 1,
                seq: 2,
                payload: &changes,
            },
            StoreOp::Raw(0, &key, b"not a checksum"),
            StoreOp::Raw(1, b"short", b""),
            StoreOp::Sealed {
                doc: 2,
                kind: 1,
                seq: 3,
                payload: &changes[..changes.len() / 2],
            },
        ]),
    );
    // presence: each message as sheaf sends it, the shapes a JS app sends by hand (extra
    // keys, `undefined`, a float cursor), another app's message and a malformed one.
    {
        use ciborium::Value;
        use sheafdb::repo::presence::wire::{self, Wire};
        let t = |s: &str| Value::Text(s.into());
        let cbor = |v: Value| {
            let mut out = Vec::new();
            ciborium::into_writer(&v, &mut out).unwrap();
            out
        };
        let env = |inner: Vec<(Value, Value)>| {
            cbor(Value::Map(vec![(t("__presence"), Value::Map(inner))]))
        };
        let state = [
            ("user".to_string(), t("ada")),
            ("color".to_string(), t("#e11d48")),
            ("cursor".to_string(), Value::Integer(7.into())),
        ]
        .into();
        let messages = [
            ("snapshot", Wire::Snapshot(state)),
            (
                "update",
                Wire::Update {
                    channel: "cursor".into(),
                    value: Value::Integer(8.into()),
                },
            ),
            ("heartbeat", Wire::Heartbeat),
            ("goodbye", Wire::Goodbye),
        ];
        for (name, msg) in messages {
            write("presence", &format!("sheaf-{name}"), &wire::encode(&msg));
        }
        let by_hand = [
            (
                // cbor-x writes `undefined` (0xf7) for a missing value; the only 0xf6 (null)
                // of this all-ASCII encoding becomes that.
                "js-update-undefined",
                env(vec![
                    (t("type"), t("update")),
                    (t("channel"), t("cursor")),
                    (t("value"), Value::Null),
                    (t("extra"), Value::Bool(true)),
                ])
                .into_iter()
                .map(|b| if b == 0xf6 { 0xf7 } else { b })
                .collect(),
            ),
            (
                "js-snapshot-float",
                env(vec![
                    (t("type"), t("snapshot")),
                    (
                        t("state"),
                        Value::Map(vec![(t("cursor"), Value::Float(2.5)), (t("user"), t("é"))]),
                    ),
                ]),
            ),
            ("malformed", env(vec![(t("type"), t("dance"))])),
            ("chat", cbor(Value::Map(vec![(t("chat"), t("hi"))]))),
        ];
        for (name, bytes) in by_hand {
            write("presence", name, &bytes);
        }
    }
    // http_auth: request heads carrying tokens that must not verify (another key's MAC,
    // expired), and token payloads (current, expired, not yet valid, a list of documents).
    {
        use sheafdb::auth::{Claims, DocScope, Key, Keyring};
        let ring = fuzzing::auth_ring();
        let now = fuzzing::AUTH_NOW;
        let claims = |docs: DocScope, write: bool, exp: u64, nbf: Option<u64>| Claims {
            kid: "fuzz".into(),
            sub: "user-1".into(),
            docs,
            write,
            exp,
            nbf,
        };
        let docs =
            DocScope::Docs([sheafdb::DocumentId::random(), sheafdb::DocumentId::random()].into());
        let payloads = [
            ("all-write", claims(DocScope::All, true, now + 3600, None)),
            ("docs-read", claims(docs, false, now + 60, Some(now - 60))),
            ("expired", claims(DocScope::All, true, now - 1, None)),
            (
                "not-yet",
                claims(DocScope::All, false, now + 7200, Some(now + 3600)),
            ),
        ];
        for (name, c) in &payloads {
            let token = ring.mint(c).unwrap();
            let payload = bs58::decode(token.split_once('.').unwrap().0)
                .into_vec()
                .unwrap();
            write(
                "http_auth",
                &format!("forged-{name}"),
                &seeds::http_auth(1, &payload),
            );
            write(
                "http_auth",
                &format!("signed-{name}"),
                &seeds::http_auth(2, &payload),
            );
        }
        let mut other = Keyring::new();
        other.insert("fuzz", Key::from_bytes([8; 32]));
        let wrong_key = other.mint(&payloads[0].1).unwrap();
        let expired = ring.mint(&payloads[2].1).unwrap();
        let heads = [
            ("query", format!("GET /?token={wrong_key} HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")),
            ("bearer", format!("GET /sync HTTP/1.1\r\nHost: relay\r\nUpgrade: keep-alive, WebSocket\r\nAuthorization: Bearer {expired}\r\n\r\n")),
            ("metrics", "GET /metrics?x=1#frag HTTP/1.1\r\nHost: relay\r\n\r\n".to_string()),
        ];
        for (name, head) in heads {
            write(
                "http_auth",
                &format!("head-{name}"),
                &seeds::http_auth(0, head.as_bytes()),
            );
        }
    }
    // converge: any bytes are a schedule; a few lengths from a fixed RNG.
    let mut rng = StdRng::seed_from_u64(42);
    for (i, len) in [48usize, 200, 600, 1200].iter().enumerate() {
        let mut b = vec![0u8; *len];
        rng.fill(&mut b[..]);
        b[0] = i as u8; // 2..5 peers
        b[1] = i as u8; // star, mesh; one or two docs
        write("converge", &format!("random-{i}"), &b);
        // Same layout: the same schedules, with invariants enforced.
        write("converge_invariants", &format!("random-{i}"), &b);
    }
}

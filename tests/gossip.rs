//! Remote-heads gossip at the relay's engine (see `engine::gossip`): a connection subscribed
//! to a storage id hears that storage's heads for the documents it has open, from sync
//! messages and from other hubs, and nothing else.

mod common;

use std::collections::BTreeMap;

use automerge::sync::{Message as SyncMessage, State, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{Automerge, ChangeHash, ROOT};
use sheafdb::engine::{Effect, Engine, Input, Millis};
use sheafdb::id::{decode_head, encode_head};
use sheafdb::net::{ConnId, Direction};
use sheafdb::protocol::{HeadsAt, Message, PeerMetadata};
use sheafdb::{DocumentId, PeerId, StorageId};

use common::relay_config;

const A: ConnId = ConnId(1);
const B: ConnId = ConnId(2);
const C: ConnId = ConnId(3);
const D: ConnId = ConnId(4);

/// A relay engine whose effects are answered at once (nothing stored, every write durable),
/// keeping every message it sends.
struct Relay {
    engine: Engine,
    now: Millis,
    /// How far the clock moves per batch.
    step_ms: u64,
    sent: Vec<(ConnId, Message)>,
}

impl Relay {
    fn new() -> Self {
        let mut config = relay_config("relay");
        config.clock_offset_ms = 1_700_000_000_000;
        Self {
            engine: Engine::new(config),
            now: Millis(0),
            step_ms: 10,
            sent: Vec::new(),
        }
    }

    fn run(&mut self, inputs: Vec<Input>) {
        let mut queue = inputs;
        for _ in 0..1000 {
            if queue.is_empty() {
                return;
            }
            self.now = self.now.plus(self.step_ms);
            let effects = self
                .engine
                .handle_batch(self.now, std::mem::take(&mut queue));
            for e in effects {
                match e {
                    Effect::Send { conn, msg } => self.sent.push((conn, msg)),
                    Effect::Load { doc } => queue.push(Input::Loaded { doc, loaded: None }),
                    Effect::Persist { doc, seq, .. } => {
                        queue.push(Input::Persisted { doc, seq, ok: true })
                    }
                    Effect::Apply(job) => queue.push(job.run()),
                    _ => {}
                }
            }
        }
        panic!("the relay never went quiet");
    }

    /// A connection that joined as `peer` with `storage`.
    fn join(&mut self, conn: ConnId, peer: &str, storage: &str) {
        self.run(vec![
            Input::ConnOpened {
                conn,
                direction: Direction::Incoming,
                access: None,
            },
            Input::Received {
                conn,
                msg: Message::Join {
                    sender_id: PeerId::new(peer),
                    peer_metadata: PeerMetadata {
                        storage_id: Some(StorageId::new(storage)),
                        is_ephemeral: false,
                        accepts_unchecked: false,
                    },
                    supported_protocol_versions: vec!["1".into()],
                },
            },
        ]);
    }

    fn receive(&mut self, conn: ConnId, msg: Message) {
        self.run(vec![Input::Received { conn, msg }]);
    }

    fn subscribe(&mut self, conn: ConnId, add: &[&str], remove: &[&str]) {
        let ids = |s: &[&str]| s.iter().map(|s| StorageId::new(*s)).collect();
        self.receive(
            conn,
            Message::RemoteSubscriptionChange {
                sender_id: PeerId::new("any"),
                target_id: PeerId::new("relay"),
                add: ids(add),
                remove: ids(remove),
            },
        );
    }

    /// Sync `doc` (held by the peer on `conn` in `am`, with its sync state) until neither side
    /// has anything to say.
    fn sync(&mut self, conn: ConnId, id: DocumentId, am: &mut Automerge, state: &mut State) {
        for _ in 0..20 {
            let ours = am.generate_sync_message(state);
            let before = self.sent.len();
            if let Some(m) = ours {
                self.receive(
                    conn,
                    Message::Sync {
                        sender_id: PeerId::new("peer"),
                        target_id: PeerId::new("relay"),
                        document_id: id,
                        data: m.encode(),
                    },
                );
            }
            let replies: Vec<Vec<u8>> = self.sent[before..]
                .iter()
                .filter_map(|(c, m)| match m {
                    Message::Sync { data, .. } if *c == conn => Some(data.clone()),
                    _ => None,
                })
                .collect();
            if replies.is_empty() && am.generate_sync_message(state).is_none() {
                return;
            }
            for r in replies {
                am.receive_sync_message(state, SyncMessage::decode(&r).unwrap())
                    .unwrap();
            }
        }
    }

    /// Open `doc` on `conn` without having it (a request, as a peer that looks for it).
    fn open(&mut self, conn: ConnId, id: DocumentId) {
        let mut state = State::new();
        let m = Automerge::new().generate_sync_message(&mut state).unwrap();
        self.receive(
            conn,
            Message::Request {
                sender_id: PeerId::new("peer"),
                target_id: PeerId::new("relay"),
                document_id: id,
                data: m.encode(),
            },
        );
    }

    /// Every remote-heads report sent to `conn` since `from`: (doc, storage, heads, time).
    fn reports(
        &self,
        conn: ConnId,
        from: usize,
    ) -> Vec<(DocumentId, String, Vec<ChangeHash>, f64)> {
        let mut out = Vec::new();
        for (c, m) in &self.sent[from..] {
            if let (
                true,
                Message::RemoteHeadsChanged {
                    document_id,
                    new_heads,
                    ..
                },
            ) = (*c == conn, m)
            {
                for (s, at) in new_heads {
                    let heads = at.heads.iter().map(|h| decode_head(h).unwrap()).collect();
                    out.push((*document_id, s.as_str().to_string(), heads, at.timestamp));
                }
            }
        }
        out
    }
}

fn edit(am: &mut Automerge, key: &str, v: i64) {
    let mut tx = am.transaction();
    tx.put(ROOT, key, v).unwrap();
    tx.commit();
}

#[test]
fn a_subscriber_hears_a_storages_heads_for_the_documents_it_has_open() {
    let mut relay = Relay::new();
    relay.join(A, "laptop", "laptop-storage");
    relay.join(B, "phone", "phone-storage");
    relay.join(C, "tablet", "tablet-storage");
    let id = DocumentId::random();
    let other = DocumentId::random();

    // The phone has the note open and subscribes to the laptop's storage; the tablet
    // subscribes too but has only another note open.
    relay.open(B, id);
    relay.open(C, other);
    relay.subscribe(B, &["laptop-storage"], &[]);
    relay.subscribe(C, &["laptop-storage"], &[]);

    let mut laptop = Automerge::new();
    edit(&mut laptop, "a", 1);
    let mut state = State::new();
    let mark = relay.sent.len();
    relay.sync(A, id, &mut laptop, &mut state);
    let heard = relay.reports(B, mark);
    assert!(!heard.is_empty(), "the phone heard nothing");
    let last = heard.last().unwrap();
    assert_eq!(
        (last.0, last.1.as_str(), &last.2),
        (id, "laptop-storage", &laptop.get_heads())
    );
    assert!(
        last.3 >= 1_700_000_000_000.0,
        "a wall-clock time: {}",
        last.3
    );
    assert!(
        relay.reports(C, mark).is_empty(),
        "the tablet lacks the note"
    );
    assert!(relay.reports(A, mark).is_empty(), "nobody hears itself");

    // New heads on the laptop: the phone hears them; the same heads again say nothing.
    edit(&mut laptop, "a", 2);
    let mark = relay.sent.len();
    relay.sync(A, id, &mut laptop, &mut state);
    let heard = relay.reports(B, mark);
    assert_eq!(heard.last().map(|h| &h.2), Some(&laptop.get_heads()));
    assert_eq!(heard.len(), 1, "one report per change of heads: {heard:?}");

    // A subscriber that opens the note hears what is known at once...
    let mark = relay.sent.len();
    relay.open(C, id);
    let heard = relay.reports(C, mark);
    assert_eq!(heard.len(), 1, "{heard:?}");
    assert_eq!(heard[0].2, laptop.get_heads());
    // ... and so does one that subscribes with the note open (once, however it asks): the
    // phone has nothing of it, the laptop its heads.
    relay.join(D, "watch", "watch-storage");
    relay.open(D, id);
    let mark = relay.sent.len();
    relay.subscribe(D, &["phone-storage", "laptop-storage"], &[]);
    relay.subscribe(D, &["laptop-storage"], &["phone-storage"]);
    let mut heard: Vec<(String, Vec<ChangeHash>)> = relay
        .reports(D, mark)
        .into_iter()
        .map(|r| (r.1, r.2))
        .collect();
    heard.sort();
    let want = vec![
        ("laptop-storage".to_string(), laptop.get_heads()),
        ("phone-storage".to_string(), vec![]),
    ];
    assert_eq!(heard, want);

    // Unsubscribed, the phone hears no more.
    relay.subscribe(B, &[], &["laptop-storage"]);
    edit(&mut laptop, "a", 3);
    let mark = relay.sent.len();
    relay.sync(A, id, &mut laptop, &mut state);
    assert!(relay.reports(B, mark).is_empty());
    assert_eq!(relay.reports(C, mark).len(), 1);

    // Its connection gone, the tablet's subscription goes with it (nothing sent to it).
    relay.run(vec![Input::ConnClosed { conn: C }]);
    edit(&mut laptop, "a", 4);
    let mark = relay.sent.len();
    relay.sync(A, id, &mut laptop, &mut state);
    assert!(relay.sent[mark..].iter().all(|(c, _)| *c != C));
}

#[test]
fn reports_from_another_hub_are_passed_on_when_newer_and_never_back() {
    let mut relay = Relay::new();
    relay.join(A, "hub", "hub-storage");
    relay.join(B, "phone", "phone-storage");
    let id = DocumentId::random();
    relay.open(A, id);
    relay.open(B, id);
    relay.subscribe(B, &["desk-storage"], &[]);
    relay.subscribe(A, &["desk-storage"], &[]);

    let mut desk = Automerge::new();
    edit(&mut desk, "k", 1);
    let report =
        |heads: &[ChangeHash], timestamp: f64, storage: &str| Message::RemoteHeadsChanged {
            sender_id: PeerId::new("hub"),
            target_id: PeerId::new("relay"),
            document_id: id,
            new_heads: BTreeMap::from([(
                StorageId::new(storage),
                HeadsAt {
                    heads: heads.iter().map(encode_head).collect(),
                    timestamp,
                },
            )]),
        };
    let mark = relay.sent.len();
    relay.receive(A, report(&desk.get_heads(), 5_000.0, "desk-storage"));
    let heard = relay.reports(B, mark);
    assert_eq!(
        heard,
        vec![(id, "desk-storage".into(), desk.get_heads(), 5_000.0)]
    );
    assert!(
        relay.reports(A, mark).is_empty(),
        "not sent back to the hub"
    );

    // Older news, or the same again, is dropped; a storage nobody subscribes to is not kept
    // or sent; heads that are not change hashes are refused.
    let mark = relay.sent.len();
    relay.receive(A, report(&[], 4_000.0, "desk-storage"));
    relay.receive(A, report(&desk.get_heads(), 5_000.0, "desk-storage"));
    relay.receive(A, report(&desk.get_heads(), 9_000.0, "attic-storage"));
    let mut garbage = report(&[], 9_000.0, "desk-storage");
    if let Message::RemoteHeadsChanged { new_heads, .. } = &mut garbage {
        for at in new_heads.values_mut() {
            at.heads = vec!["not a hash".into()];
        }
    }
    relay.receive(A, garbage);
    assert!(
        relay.reports(B, mark).is_empty(),
        "{:?}",
        relay.reports(B, mark)
    );
    relay.subscribe(B, &["attic-storage"], &[]);
    assert!(
        relay.reports(B, mark).is_empty(),
        "the attic's report was not kept"
    );

    // Newer news is passed on, even with the same heads (its time is news), and so are other
    // heads as of the same time (the later message wins).
    relay.receive(A, report(&desk.get_heads(), 6_000.0, "desk-storage"));
    assert_eq!(relay.reports(B, mark).len(), 1);
    edit(&mut desk, "k", 2);
    relay.receive(A, report(&desk.get_heads(), 6_000.0, "desk-storage"));
    let heard = relay.reports(B, mark);
    assert_eq!(heard.len(), 2);
    assert_eq!(heard[1].2, desk.get_heads());
}

/// Heads that move twice within a millisecond are reported with increasing times: a
/// receiver drops a report no newer than what it has (JS does), and would keep the older.
#[test]
fn heads_seen_twice_in_one_millisecond_are_reported_in_order() {
    let mut relay = Relay::new();
    relay.step_ms = 0;
    relay.join(A, "laptop", "laptop-storage");
    relay.join(B, "phone", "phone-storage");
    let id = DocumentId::random();
    relay.open(B, id);
    relay.subscribe(B, &["laptop-storage"], &[]);
    let mut laptop = Automerge::new();
    let mut state = State::new();
    let mark = relay.sent.len();
    for v in 1..4 {
        edit(&mut laptop, "a", v);
        relay.sync(A, id, &mut laptop, &mut state);
    }
    let heard = relay.reports(B, mark);
    assert_eq!(heard.last().map(|h| &h.2), Some(&laptop.get_heads()));
    assert!(
        heard.windows(2).all(|w| w[0].3 < w[1].3),
        "times must increase: {:?}",
        heard.iter().map(|h| h.3).collect::<Vec<_>>()
    );
}

// ---- through Repos and a relay ----------------------------------------------------------

/// Wait until `h`'s remote heads for `storage` are `heads` (bounded).
async fn wait_remote(h: &sheafdb::DocHandle, storage: &StorageId, heads: &[ChangeHash]) {
    let mut w = h.remote_heads();
    let reached = tokio::time::timeout(common::WAIT, async {
        loop {
            if w.borrow_and_update()
                .get(storage)
                .map(|r| r.heads.as_slice())
                == Some(heads)
            {
                return;
            }
            w.changed().await.expect("the repo is open");
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "{storage:?}'s heads never reached the handle: {:?} instead of {heads:?}",
        h.remote_heads().borrow().get(storage)
    );
}

/// Wait until `h` has `heads` and says it is synced (bounded).
async fn timeout_synced(h: &sheafdb::DocHandle, heads: &[ChangeHash]) {
    let mut status = h.status();
    tokio::time::timeout(common::WAIT, async {
        loop {
            if h.heads() == heads && status.get() == sheafdb::NoteStatus::Synced {
                return;
            }
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(50), status.changed()).await;
        }
    })
    .await
    .expect("the phone syncs the note");
}

fn client() -> sheafdb::Repo {
    sheafdb::Repo::temporary(sheafdb::RepoConfig {
        find_timeout: common::WAIT,
        ..sheafdb::RepoConfig::default()
    })
    .unwrap()
}

/// Two sheaf repos that never meet, on one relay: the phone subscribes to the laptop's
/// storage and its handle shows what the laptop holds of the note, as the laptop edits; the
/// relay's own heads are heard the same way; an unsubscribed storage is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repo_hears_what_another_device_holds_through_a_relay() {
    let (url, relay, _stop) = common::in_process_relay().await;
    let laptop = client();
    let phone = client();
    laptop.connect(&url).unwrap();
    phone.connect(&url).unwrap();
    phone
        .subscribe_remote_heads([laptop.storage_id().clone()])
        .unwrap();

    let note = laptop.create().await.unwrap();
    note.change(|tx| tx.put(ROOT, "n", 1_i64)).unwrap();
    let seen = tokio::time::timeout(common::WAIT, phone.find(note.id()))
        .await
        .unwrap()
        .unwrap();
    wait_remote(&seen, laptop.storage_id(), &note.heads()).await;

    for n in 2..5_i64 {
        note.change(|tx| tx.put(ROOT, "n", n)).unwrap();
        wait_remote(&seen, laptop.storage_id(), &note.heads()).await;
    }
    // The relay's own storage (a direct peer of the phone) has the laptop's last edit too:
    // subscribed to only now, with nothing moving, what the phone knows is reported at once.
    wait_remote(&seen, laptop.storage_id(), &note.heads()).await;
    timeout_synced(&seen, &note.heads()).await;
    phone
        .subscribe_remote_heads([relay.storage_id().clone()])
        .unwrap();
    wait_remote(&seen, relay.storage_id(), &note.heads()).await;

    // Unsubscribed: the laptop's next edits are not heard (the relay's still are).
    phone
        .unsubscribe_remote_heads([laptop.storage_id().clone()])
        .unwrap();
    let before = seen
        .remote_heads()
        .borrow()
        .get(laptop.storage_id())
        .cloned();
    note.change(|tx| tx.put(ROOT, "n", 9_i64)).unwrap();
    wait_remote(&seen, relay.storage_id(), &note.heads()).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        seen.remote_heads()
            .borrow()
            .get(laptop.storage_id())
            .cloned(),
        before
    );
    let at = before.expect("heard before").at;
    let age = std::time::SystemTime::now().duration_since(at).unwrap();
    assert!(
        age < std::time::Duration::from_secs(60),
        "a wall-clock time: {at:?}"
    );
}

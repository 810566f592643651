//! Two editors on one note, each showing the other's presence and applying patches.
//!
//! ```sh
//! cargo run --release --example collab_editor
//! ```
//!
//! alice and bob each have their own `Repo`, connected to a relay running in this process.
//! Each editor keeps its *view* of the text, a `String` changed only by applying the patches
//! from `handle.changes()` (as a UI would patch its buffer), and publishes its presence
//! (`DocHandle::presence`): user, color and cursor. The cursor travels as an Automerge cursor
//! string (the same format as JS `getCursor`), so it stays on its character while the other
//! editor types in front of it; each side resolves it against its own copy of the note.
//!
//! They type concurrently, then the example waits until both views converge and prints what
//! each one shows (`|` is the editor's own cursor, `[name]` the other's); bob then types in
//! front of alice's cursor, which moves with its character on both screens without alice
//! publishing anything. It asserts that both views equal the document text and that each
//! sees the other's cursor where it is, and ends with bob leaving. Fails if that takes more
//! than 10 s.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use automerge::{Cursor, ObjId, PatchAction, ReadDoc, TextEncoding, ROOT};
use serde::{Deserialize, Serialize};
use sheafdb::repo::{PresenceConfig, TextIndex};
use sheafdb::{DocHandle, PeerId, Repo, RepoConfig};
use tokio::time::{sleep, timeout, Instant};

/// What each editor publishes about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Who {
    user: String,
    color: String,
    /// An Automerge cursor string, resolved by each reader against its own copy.
    cursor: Option<String>,
}

struct Editor {
    name: &'static str,
    repo: Repo,
    handle: DocHandle,
    text: ObjId,
    /// The text as this editor shows it: built only from patches.
    view: Arc<Mutex<String>>,
    presence: sheafdb::repo::Presence<Who>,
}

impl Editor {
    fn open(
        name: &'static str,
        color: &str,
        repo: Repo,
        handle: DocHandle,
    ) -> anyhow::Result<Self> {
        let text = handle
            .with_doc(|d| d.get(ROOT, "text").map(|v| v.map(|(_, id)| id)))?
            .ok_or_else(|| anyhow::anyhow!("the note has no text"))?;
        // Start the view at some heads and subscribe from the same heads (retry if a change
        // landed in between), so no patch is missed or applied twice.
        let (view, mut changes) = loop {
            let (heads, s) = handle.with_doc(|d| d.text(&text).map(|s| (d.get_heads(), s)))?;
            let changes = handle.changes();
            if handle.heads() == heads {
                break (Arc::new(Mutex::new(s)), changes);
            }
        };
        let (v, t, h) = (view.clone(), text.clone(), handle.clone());
        tokio::spawn(async move {
            while let Some(ev) = changes.next().await {
                let encoding = h.with_doc(|d| d.text_encoding());
                let mut s = v.lock().unwrap();
                for p in ev.patches.iter().filter(|p| p.obj == t) {
                    match &p.action {
                        PatchAction::SpliceText { index, value, .. } => {
                            let at = byte_offset(&s, *index, encoding);
                            s.insert_str(at, &value.make_string());
                        }
                        PatchAction::DeleteSeq { index, length } => {
                            let from = byte_offset(&s, *index, encoding);
                            let to = from + byte_offset(&s[from..], *length, encoding);
                            s.replace_range(from..to, "");
                        }
                        _ => {}
                    }
                }
            }
        });
        let me = Who {
            user: name.into(),
            color: color.into(),
            cursor: None,
        };
        let config = PresenceConfig {
            heartbeat: Duration::from_millis(500),
            ttl: Duration::from_secs(2),
            announce_delay: Duration::from_millis(50),
            ..PresenceConfig::default()
        };
        let presence = handle.presence_with(me, config)?;
        Ok(Editor {
            name,
            repo,
            handle,
            text,
            view,
            presence,
        })
    }

    /// Type `s` at `at` (code points) and put our cursor right after it.
    fn type_at(&self, at: usize, s: &str) -> anyhow::Result<()> {
        self.handle
            .splice_text(&self.text, at, 0, s, TextIndex::CodePoints)?;
        self.move_cursor(at + s.chars().count())
    }

    /// Type `s` right before the first `anchor` in our copy (where a user would click,
    /// whatever the other editor's edits have done to the offsets meanwhile).
    fn type_before(&self, anchor: &str, s: &str) -> anyhow::Result<()> {
        let text = self.handle.text(&self.text)?;
        let b = text
            .find(anchor)
            .ok_or_else(|| anyhow::anyhow!("{anchor:?} not in {text:?}"))?;
        self.type_at(text[..b].chars().count(), s)
    }

    /// Type `s` at the end of the text.
    fn type_at_end(&self, s: &str) -> anyhow::Result<()> {
        let len = self.handle.text(&self.text)?.chars().count();
        self.type_at(len, s)
    }

    fn move_cursor(&self, at: usize) -> anyhow::Result<()> {
        let c = self.handle.cursor(&self.text, at, TextIndex::CodePoints)?;
        self.presence.modify(|w| w.cursor = Some(c.to_string()))?;
        Ok(())
    }

    /// Where a cursor string points in our copy of the note.
    fn resolve(&self, cursor: &Option<String>) -> Option<usize> {
        let c = Cursor::try_from(cursor.as_deref()?).ok()?;
        self.handle
            .cursor_position(&self.text, &c, TextIndex::CodePoints)
            .ok()
    }

    fn view(&self) -> String {
        self.view.lock().unwrap().clone()
    }

    /// The other peers this editor sees: (user, color, cursor position here).
    fn others(&self) -> Vec<(String, String, Option<usize>)> {
        self.presence
            .peers()
            .values()
            .map(|p| {
                let s = &p.state;
                (s.user.clone(), s.color.clone(), self.resolve(&s.cursor))
            })
            .collect()
    }

    /// The view with `|` at our cursor and `[name]` at each other peer's.
    fn render(&self) -> String {
        let view = self.view();
        let mut marks: Vec<(usize, String)> = self
            .others()
            .into_iter()
            .filter_map(|(user, _, at)| Some((at?, format!("[{user}]"))))
            .collect();
        if let Some(at) = self.resolve(&self.presence.local().cursor) {
            marks.push((at, "|".into()));
        }
        marks.sort();
        let mut out = view.clone();
        for (at, m) in marks.iter().rev() {
            let b = byte_offset(&view, *at, TextEncoding::UnicodeCodePoint);
            out.insert_str(b, m);
        }
        let who: Vec<String> = self
            .others()
            .into_iter()
            .map(|(user, color, at)| match at {
                Some(at) => format!("{user} ({color}) at {at}"),
                None => format!("{user} ({color}), no cursor"),
            })
            .collect();
        let who = if who.is_empty() {
            "nobody else".to_string()
        } else {
            who.join(", ")
        };
        format!("{:>5} sees: {out:?}   with {who}", self.name)
    }
}

/// The byte offset of text index `index` (in the note's `encoding`) in `s`, clamped to its end.
fn byte_offset(s: &str, index: usize, encoding: TextEncoding) -> usize {
    let mut units = 0;
    for (b, ch) in s.char_indices() {
        if units >= index {
            return b;
        }
        units += match encoding {
            TextEncoding::Utf8CodeUnit => ch.len_utf8(),
            TextEncoding::Utf16CodeUnit => ch.len_utf16(),
            // Code points (this build's default); graphemes are not used by this example.
            _ => 1,
        };
    }
    s.len()
}

/// Poll `cond` every 20 ms until it holds (the caller bounds the whole run).
async fn until(mut cond: impl FnMut() -> bool) {
    while !cond() {
        sleep(Duration::from_millis(20)).await;
    }
}

async fn run() -> anyhow::Result<()> {
    // The relay: a Repo served on 127.0.0.1 by `sheafdb::relay::run`.
    let relay = Repo::temporary(RepoConfig::relay())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let hub = relay.hub();
    let server = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        let _ = sheafdb::relay::run(listener, hub, Default::default(), shutdown).await;
    });
    println!("relay on {url}");

    let alice_repo = Repo::temporary(RepoConfig::default())?;
    let bob_repo = Repo::temporary(RepoConfig::default())?;
    alice_repo.connect(&url)?;
    bob_repo.connect(&url)?;

    let note = alice_repo.create().await?;
    note.change(|tx| {
        use automerge::transaction::Transactable;
        let t = tx.put_object(ROOT, "text", automerge::ObjType::Text)?;
        tx.splice_text(&t, 0, 0, "Hello world")
    })?;
    let bob_note = bob_repo.find(note.id()).await?;
    // find returns once bob has the note, which may be before alice's text reached him.
    until(|| bob_note.heads() == note.heads()).await;
    println!("note {}", note.url());

    let alice = Editor::open("alice", "crimson", alice_repo, note)?;
    let bob = Editor::open("bob", "teal", bob_repo, bob_note)?;
    let (alice_id, bob_id) = (alice.repo.peer_id().clone(), bob.repo.peer_id().clone());
    let sees = |e: &Editor, id: &PeerId| e.presence.peers().contains_key(id);
    until(|| sees(&alice, &bob_id) && sees(&bob, &alice_id)).await;
    println!("-- both open, each sees the other");
    println!("{}\n{}", alice.render(), bob.render());

    // alice parks her cursor before "world"; bob puts his at the end.
    alice.move_cursor(6)?;
    bob.move_cursor(11)?;
    until(|| {
        alice.others().iter().any(|o| o.2 == Some(11))
            && bob.others().iter().any(|o| o.2 == Some(6))
    })
    .await;
    println!("-- cursors placed");
    println!("{}\n{}", alice.render(), bob.render());

    // Concurrent typing: neither waits for the other's edits.
    alice.type_before(" world", ",")?; // "Hello, world"
    bob.type_at_end("!")?; // "Hello world!"
    bob.type_at(0, "Oh, ")?; // "Oh, Hello world!"
    alice.type_before("world", "wide ")?; // "Hello, wide world"

    let expected = "Oh, Hello, wide world!";
    until(|| {
        let (a, b) = (alice.view(), bob.view());
        // Both views converged, and each resolves the other's latest cursor: alice's sits
        // after "wide " (index 16 once bob's "Oh, " arrived), bob's after "Oh, " (4).
        a == expected
            && b == expected
            && alice.others().iter().any(|o| o.2 == Some(4))
            && bob.others().iter().any(|o| o.2 == Some(16))
    })
    .await;
    println!("-- after concurrent typing");
    println!("{}\n{}", alice.render(), bob.render());

    // bob types in front of alice's cursor; alice publishes nothing, yet both editors now
    // show her cursor 6 further on, still before "world".
    let alice_cursor = alice.presence.local().cursor;
    bob.type_at(0, "Well! ")?;
    let expected = "Well! Oh, Hello, wide world!";
    until(|| {
        alice.view() == expected
            && bob.view() == expected
            && bob.others().iter().any(|o| o.2 == Some(22))
    })
    .await;
    assert_eq!(alice.presence.local().cursor, alice_cursor);
    assert_eq!(alice.resolve(&alice_cursor), Some(22));
    println!("-- bob typed in front of alice's cursor");
    println!("{}\n{}", alice.render(), bob.render());

    for e in [&alice, &bob] {
        let doc_text = e.handle.text(&e.text)?;
        assert_eq!(
            e.view(),
            doc_text,
            "{}'s view equals the note's text",
            e.name
        );
        assert_eq!(doc_text, expected);
        // Our own cursor, resolved here, agrees with where the other editor shows it.
        let own = e.resolve(&e.presence.local().cursor);
        let other = if e.name == "alice" { &bob } else { &alice };
        assert_eq!(other.others()[0].2, own, "{}'s cursor", e.name);
    }

    let Editor { presence, .. } = bob;
    presence.leave().await?;
    until(|| alice.presence.peers().is_empty()).await;
    println!("-- bob left");
    println!("{}", alice.render());

    alice.presence.leave().await?;
    let _ = stop.send(());
    server.await?;
    println!("ok: both views equal the note's text");
    Ok(())
}

/// The whole example, failing if it takes more than 10 s.
async fn run_bounded() -> anyhow::Result<()> {
    let started = Instant::now();
    timeout(Duration::from_secs(10), run())
        .await
        .map_err(|_| anyhow::anyhow!("the example did not finish within 10 s"))??;
    println!("({} ms)", started.elapsed().as_millis());
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    run_bounded().await
}

/// `cargo test` runs the example (Cargo.toml: `test = true`), asserts and all.
#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs() {
        super::run_bounded().await.unwrap();
    }
}

//! Rich text helpers: UTF-16 offsets with emoji, cursors and marks through concurrent edits
//! and merges, and `update_text` making small changes.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use automerge::marks::ExpandMark;
use automerge::transaction::Transactable;
use automerge::{Automerge, ObjId, ObjType, PatchAction, ReadDoc, ScalarValue, ROOT};
use sheafdb::repo::text::{self, TextError, TextIndex, TextPatch};
use sheafdb::{DocHandle, Repo, RepoConfig};

async fn note_with_text(s: &str) -> (Repo, DocHandle, ObjId) {
    let repo = Repo::temporary(RepoConfig::default()).unwrap();
    let h = repo.create().await.unwrap();
    let t = h
        .change(|tx| {
            let t = tx.put_object(ROOT, "text", ObjType::Text)?;
            tx.splice_text(&t, 0, 0, s)?;
            Ok(t)
        })
        .unwrap();
    (repo, h, t)
}

/// Two docs sharing `s`, edited independently then merged both ways.
fn two_docs(s: &str) -> (Automerge, Automerge, ObjId) {
    let mut a = Automerge::new();
    let t = a
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            let t = tx.put_object(ROOT, "text", ObjType::Text)?;
            tx.splice_text(&t, 0, 0, s)?;
            Ok(t)
        })
        .unwrap()
        .result;
    let b = a.fork();
    (a, b, t)
}

fn edit(doc: &mut Automerge, f: impl FnOnce(&mut automerge::transaction::Transaction<'_>)) {
    let mut tx = doc.transaction();
    f(&mut tx);
    tx.commit();
}

#[tokio::test]
async fn utf16_offsets_with_emoji_splice_and_reject_split_pairs() {
    let (_repo, h, t) = note_with_text("hi 😀 there").await;
    // "hi " = 3 units, 😀 = 2 UTF-16 units, so " there" starts at 5 (UTF-16) / 4 (code points)
    h.splice_text(&t, 5, 0, "!", TextIndex::Utf16).unwrap();
    assert_eq!(h.text(&t).unwrap(), "hi 😀! there");
    h.splice_text(&t, 4, 0, "?", TextIndex::CodePoints).unwrap();
    assert_eq!(h.text(&t).unwrap(), "hi 😀?! there");
    // delete the emoji by its UTF-16 length
    h.splice_text(&t, 3, 2, "🎉", TextIndex::Utf16).unwrap();
    assert_eq!(h.text(&t).unwrap(), "hi 🎉?! there");

    // a second emoji further on: "hi 🎉?! there 👋", 👋 at UTF-16 14..16
    h.splice_text(&t, 13, 0, " 👋", TextIndex::Utf16).unwrap();
    assert_eq!(h.text(&t).unwrap(), "hi 🎉?! there 👋");

    let heads = h.heads();
    // inside the first pair, and inside the second one (after another pair: the check
    // counts what comes before, not just the first emoji)
    for bad in [4, 15] {
        for delete in [0, 1] {
            match h.splice_text(&t, bad, delete, "x", TextIndex::Utf16) {
                Err(TextError::SplitsSurrogatePair { offset }) => assert_eq!(offset, bad),
                other => panic!("expected a surrogate-pair error at {bad}, got {other:?}"),
            }
        }
    }
    // a deletion ending inside the pair is rejected too
    assert!(matches!(
        h.splice_text(&t, 0, 4, "", TextIndex::Utf16),
        Err(TextError::SplitsSurrogatePair { offset: 4 })
    ));
    assert!(matches!(
        h.splice_text(&t, 99, 0, "x", TextIndex::Utf16),
        Err(TextError::OutOfRange { offset: 99, .. })
    ));
    assert!(matches!(
        h.splice_text(&ROOT, 0, 0, "x", TextIndex::Utf16),
        Err(TextError::NotText)
    ));
    assert_eq!(h.heads(), heads, "failed splices change nothing");

    // marks and cursors speak UTF-16 too
    h.mark(&t, 3..5, "bold", true, ExpandMark::None, TextIndex::Utf16)
        .unwrap();
    let m = h.marks(&t, TextIndex::Utf16).unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].name.as_str(), m[0].range.clone()), ("bold", 3..5));
    assert_eq!(h.marks(&t, TextIndex::CodePoints).unwrap()[0].range, 3..4);
    let c = h.cursor(&t, 5, TextIndex::Utf16).unwrap();
    assert_eq!(h.cursor_position(&t, &c, TextIndex::CodePoints).unwrap(), 4);
    h.splice_text(&t, 0, 0, "👋", TextIndex::CodePoints)
        .unwrap();
    assert_eq!(h.cursor_position(&t, &c, TextIndex::Utf16).unwrap(), 7);
    assert_eq!(h.cursor_position(&t, &c, TextIndex::CodePoints).unwrap(), 5);
}

#[test]
fn cursors_follow_their_character_through_concurrent_edits() {
    let (mut a, mut b, t) = two_docs("the quick fox");
    // cursors on "q" (4) and "f" (10), made on a, and one at the end
    let cq = text::cursor(&a, &t, 4, TextIndex::Utf16).unwrap();
    let cf = text::cursor(&a, &t, 10, TextIndex::Utf16).unwrap();
    let end = text::cursor(&a, &t, 13, TextIndex::Utf16).unwrap();
    edit(&mut a, |tx| {
        text::splice(tx, &t, 0, 0, "🦊 ", TextIndex::Utf16).unwrap();
    });
    edit(&mut b, |tx| {
        text::splice(tx, &t, 10, 0, "brown ", TextIndex::CodePoints).unwrap();
        text::splice(tx, &t, 4, 0, "very ", TextIndex::CodePoints).unwrap();
    });
    a.merge(&mut b).unwrap();
    b.merge(&mut a).unwrap();
    for d in [&a, &b] {
        let s = d.text(&t).unwrap();
        assert_eq!(s, "🦊 the very quick brown fox");
        for unit in [TextIndex::Utf16, TextIndex::CodePoints] {
            let q = text::cursor_position(d, &t, &cq, unit).unwrap();
            let f = text::cursor_position(d, &t, &cf, unit).unwrap();
            let e = text::cursor_position(d, &t, &end, unit).unwrap();
            let at = |i| {
                let c = text::convert_offset(&s, i, unit, TextIndex::CodePoints).unwrap();
                s.chars().nth(c)
            };
            assert_eq!(at(q), Some('q'));
            assert_eq!(at(f), Some('f'));
            assert_eq!(e, text::text_len(&s, unit));
        }
    }
    // a deleted character's cursor moves to the next survivor
    edit(&mut b, |tx| {
        let i = "🦊 the very ".chars().count();
        text::splice(tx, &t, i, 6, "", TextIndex::CodePoints).unwrap();
    });
    let s = b.text(&t).unwrap();
    assert_eq!(s, "🦊 the very brown fox");
    let q = text::cursor_position(&b, &t, &cq, TextIndex::CodePoints).unwrap();
    assert_eq!(s.chars().nth(q), Some('b'));
}

#[test]
fn marks_survive_a_merge_and_grow_with_expand() {
    // (Concurrent inserts right at a mark's edge are ordered by actor id, so the edit on b
    // stays clear of the edges to keep the test deterministic.)
    let (mut a, mut b, t) = two_docs("hello big world");
    edit(&mut a, |tx| {
        text::mark(
            tx,
            &t,
            0..5,
            "bold",
            true,
            ExpandMark::None,
            TextIndex::Utf16,
        )
        .unwrap();
        text::mark(
            tx,
            &t,
            10..15,
            "link",
            "https://example.org",
            ExpandMark::None,
            TextIndex::Utf16,
        )
        .unwrap();
    });
    edit(&mut b, |tx| {
        text::splice(tx, &t, 6, 0, "😀 ", TextIndex::Utf16).unwrap();
        text::mark(
            tx,
            &t,
            6..8,
            "comment",
            "c1",
            ExpandMark::None,
            TextIndex::Utf16,
        )
        .unwrap();
    });
    a.merge(&mut b).unwrap();
    b.merge(&mut a).unwrap();
    for d in [&a, &b] {
        assert_eq!(d.text(&t).unwrap(), "hello 😀 big world");
        let mut m = text::marks(d, &t, TextIndex::Utf16).unwrap();
        m.sort_by(|x, y| x.name.cmp(&y.name));
        let got: Vec<_> = m
            .iter()
            .map(|m| (m.name.as_str(), m.range.clone()))
            .collect();
        assert_eq!(
            got,
            vec![("bold", 0..5), ("comment", 6..8), ("link", 13..18)]
        );
        assert_eq!(m[0].value, ScalarValue::Boolean(true));
        assert_eq!(m[2].value, ScalarValue::Str("https://example.org".into()));
        let mut cp = text::marks(d, &t, TextIndex::CodePoints).unwrap();
        cp.sort_by(|x, y| x.name.cmp(&y.name));
        let got: Vec<_> = cp.iter().map(|m| m.range.clone()).collect();
        assert_eq!(got, vec![0..5, 6..7, 12..17]);
    }
    // typing at the end of a mark that expands After extends it; unmark removes part
    edit(&mut a, |tx| {
        text::mark(
            tx,
            &t,
            0..5,
            "italic",
            true,
            ExpandMark::After,
            TextIndex::Utf16,
        )
        .unwrap();
        text::splice(tx, &t, 5, 0, "!", TextIndex::Utf16).unwrap();
        text::unmark(tx, &t, 0..2, "bold", ExpandMark::None, TextIndex::Utf16).unwrap();
    });
    assert_eq!(a.text(&t).unwrap(), "hello! 😀 big world");
    let m = text::marks(&a, &t, TextIndex::Utf16).unwrap();
    let range = |name: &str| -> Vec<_> {
        m.iter()
            .filter(|m| m.name == name)
            .map(|m| m.range.clone())
            .collect()
    };
    assert_eq!(range("italic"), vec![0..6]);
    assert_eq!(range("bold"), vec![2..5]);
}

#[tokio::test]
async fn update_text_makes_a_small_change_and_merges_with_concurrent_edits() {
    let long: String = (0..2000).map(|i| format!("line {i}\n")).collect();
    let (_repo, h, t) = note_with_text(&long).await;
    let before = h.heads();
    let edited = long.replacen("line 1000", "line 1O00", 1);
    h.update_text(&t, &edited).unwrap();
    assert_eq!(h.text(&t).unwrap(), edited);
    let changes = h.with_doc(|d| d.get_changes(&before));
    assert_eq!(changes.len(), 1);
    assert!(
        changes[0].len() <= 4,
        "a one-character edit took {} ops",
        changes[0].len()
    );
    // same text again: no change at all
    let heads = h.heads();
    h.update_text(&t, &edited).unwrap();
    assert_eq!(h.heads(), heads);
    assert!(matches!(h.update_text(&ROOT, "x"), Err(TextError::NotText)));

    // a whole-file rewrite (what an editor saving a file does) keeps concurrent edits
    let (mut a, mut b, t) = two_docs("alpha\nbeta\ngamma\n");
    edit(&mut a, |tx| {
        tx.update_text(&t, "alpha\nBETA\ngamma\n").unwrap()
    });
    edit(&mut b, |tx| {
        tx.update_text(&t, "alpha\nbeta\ngamma\ndelta\n").unwrap()
    });
    a.merge(&mut b).unwrap();
    assert_eq!(a.text(&t).unwrap(), "alpha\nBETA\ngamma\ndelta\n");
}

/// Apply UTF-16 text patches to a UTF-16 buffer, as a JS editor patches its view.
fn apply_utf16(view: &mut Vec<u16>, patches: &[TextPatch]) {
    for p in patches {
        match p {
            TextPatch::SpliceText { index, value, .. } => {
                view.splice(*index..*index, value.encode_utf16());
            }
            TextPatch::DeleteSeq { index, length } => {
                view.drain(*index..*index + *length);
            }
            TextPatch::Mark { .. } => {}
        }
    }
}

/// Peer b's side of the test below: its handle, change subscription and UTF-16 view.
struct Receiver {
    handle: DocHandle,
    text: ObjId,
    changes: sheafdb::repo::Changes,
    view: Vec<u16>,
    deadline: tokio::time::Instant,
}

impl Receiver {
    /// Wait until the view, patched from change events, reads `expect`; the patches of the
    /// events until then: raw (of the text object), in UTF-16 (the ones applied to the
    /// view) and in code points.
    async fn receive(
        &mut self,
        expect: &str,
    ) -> (Vec<automerge::Patch>, Vec<TextPatch>, Vec<TextPatch>) {
        let t = &self.text;
        let (mut raw, mut u16, mut cp) = (Vec::new(), Vec::new(), Vec::new());
        while String::from_utf16(&self.view).unwrap() != expect {
            let ev = tokio::time::timeout_at(self.deadline, self.changes.next())
                .await
                .expect("b gets a's edit")
                .unwrap();
            raw.extend(ev.patches.iter().filter(|p| &p.obj == t).cloned());
            let p = ev.text_patches(t, TextIndex::Utf16).unwrap();
            apply_utf16(&mut self.view, &p);
            u16.extend(p);
            cp.extend(ev.text_patches(t, TextIndex::CodePoints).unwrap());
        }
        assert_eq!(self.handle.text(t).unwrap(), expect, "b's note");
        (raw, u16, cp)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_edits_arrive_as_patches_with_utf16_offsets() {
    let (url, _relay, _stop) = common::in_process_relay().await;
    let a = Repo::temporary(RepoConfig::default()).unwrap();
    let b = Repo::temporary(RepoConfig::default()).unwrap();
    a.connect(&url).unwrap();
    b.connect(&url).unwrap();
    let (ha, t) = {
        let h = a.create().await.unwrap();
        let t = h
            .change(|tx| {
                let t = tx.put_object(ROOT, "text", ObjType::Text)?;
                tx.splice_text(&t, 0, 0, "👋 hello")?;
                Ok(t)
            })
            .unwrap();
        (h, t)
    };
    let hb = tokio::time::timeout(Duration::from_secs(10), b.find(ha.id()))
        .await
        .unwrap()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut changes = hb.changes();
    while hb.text(&t).ok().as_deref() != Some("👋 hello") {
        tokio::time::timeout_at(deadline, changes.next())
            .await
            .expect("b gets a's text");
    }
    // b's view: a JS-style UTF-16 buffer, patched only from its change events from now on.
    let changes = hb.changes();
    let view: Vec<u16> = hb.text(&t).unwrap().encode_utf16().collect();

    // Each step: a edits; b waits for the edit and checks the patches it got for it (raw,
    // in code points, and converted to UTF-16 and applied to its view).
    let mut b_side = Receiver {
        handle: hb,
        text: t.clone(),
        changes,
        view,
        deadline,
    };
    // An insert after the emoji: code point 2, UTF-16 unit 3.
    ha.splice_text(&t, 2, 0, "big ", TextIndex::CodePoints)
        .unwrap();
    let (raw, u16, cp) = b_side.receive("👋 big hello").await;
    assert!(
        matches!(&raw[..], [p] if matches!(&p.action,
            PatchAction::SpliceText { index: 2, value, .. } if value.make_string() == "big ")),
        "{raw:?}"
    );
    let splice = |index, value: &str| TextPatch::SpliceText {
        index,
        value: value.into(),
        marks: None,
    };
    assert_eq!(u16, vec![splice(3, "big ")]);
    assert_eq!(cp, vec![splice(2, "big ")]);

    // Two inserts in one change: the second one's offset counts the first (and the emoji
    // it inserts: 2 UTF-16 units).
    ha.change(|tx| {
        tx.splice_text(&t, 11, 0, "!")?;
        tx.splice_text(&t, 1, 0, "🎉")
    })
    .unwrap();
    let (_, u16, cp) = b_side.receive("👋🎉 big hello!").await;
    assert_eq!(u16, vec![splice(2, "🎉"), splice(14, "!")]);
    assert_eq!(cp, vec![splice(1, "🎉"), splice(12, "!")]);

    // A deletion of an emoji, and a mark over the other one.
    ha.change(|tx| {
        tx.splice_text(&t, 0, 1, "")?;
        let bold = automerge::marks::Mark::new("bold".into(), true, 0, 1);
        tx.mark(&t, bold, ExpandMark::None)
    })
    .unwrap();
    let (_, u16, _) = b_side.receive("🎉 big hello!").await;
    assert_eq!(
        u16,
        vec![
            TextPatch::DeleteSeq {
                index: 0,
                length: 2
            },
            TextPatch::Mark {
                marks: vec![text::TextMark {
                    name: "bold".into(),
                    value: ScalarValue::Boolean(true),
                    range: 0..2,
                }]
            }
        ]
    );
    // Every event's patches were logged by the apply that brought its changes: none of
    // them diffed the note (a walk of all of it, tens of ms on a long note).
    let stats = b.stats();
    assert!(stats.change_events.load(Ordering::Relaxed) >= 3);
    assert_eq!(stats.change_events_diffed.load(Ordering::Relaxed), 0);
    // The text each conversion starts from was read from the note once, for the first
    // event: later events (and the second unit of each) start from what the previous left.
    assert_eq!(stats.text_reads.load(Ordering::Relaxed), 1);
}

/// A subscriber sees its own repo's edits as patches logged by the edits themselves (no diff
/// of the note), and what it builds from them is the note's text.
#[tokio::test]
async fn local_edits_reach_subscribers_as_logged_patches() {
    let (repo, h, t) = note_with_text("héllo").await;
    let mut changes = h.changes();
    let mut view: Vec<u16> = h.text(&t).unwrap().encode_utf16().collect();
    for (i, s) in ["🎉", " wörld", "!"].iter().enumerate() {
        h.change(|tx| {
            let len = tx.length(&t);
            tx.splice_text(&t, if i == 0 { 0 } else { len }, 0, s)
        })
        .unwrap();
        h.change(|tx| tx.splice_text(&t, 1, 1, "")).unwrap();
        // One event, or two if it caught the first edit alone.
        while String::from_utf16(&view).unwrap() != h.text(&t).unwrap() {
            let ev = tokio::time::timeout(Duration::from_secs(5), changes.next())
                .await
                .expect("an event for the edits")
                .unwrap();
            apply_utf16(&mut view, &ev.text_patches(&t, TextIndex::Utf16).unwrap());
        }
    }
    assert_eq!(String::from_utf16(&view).unwrap(), "🎉lo wörld!");
    let stats = repo.stats();
    assert!(stats.change_events.load(Ordering::Relaxed) >= 3);
    assert_eq!(stats.change_events_diffed.load(Ordering::Relaxed), 0);
    assert_eq!(stats.text_reads.load(Ordering::Relaxed), 1);
}

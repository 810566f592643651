//! Text with UTF-16 indices across sheaf and the real automerge-repo 2.5.6 JS client
//! (`tests/js/client.mjs`, whose indices are JS string indices: UTF-16 code units), through
//! the `sheaf-relay` binary: splices around emoji, marks and cursors land on the same
//! characters on both sides.
//!
//! Needs `node` and `npm ci --prefix tests/js` (fails with that instruction otherwise).

mod common;

use std::time::Duration;

use automerge::marks::ExpandMark;
use automerge::{ReadDoc, ROOT};
use common::{JsProc, RelayProc, WAIT};
use serde_json::json;
use sheafdb::repo::{TextError, TextIndex};
use sheafdb::{DocHandle, Repo, RepoConfig};
use tokio::time::{sleep, Instant};

const U16: TextIndex = TextIndex::Utf16;

fn text_obj(h: &DocHandle) -> automerge::ObjId {
    h.with_doc(|d| d.get(ROOT, "text").unwrap().unwrap().1)
}

/// JS's UTF-16 index of `needle` in `hay` (what `hay.indexOf(needle)` gives in JS).
fn js_index(hay: &str, needle: &str) -> usize {
    let byte = hay.find(needle).expect("needle present");
    hay[..byte].encode_utf16().count()
}

async fn wait_text(h: &DocHandle, want: &str) {
    let obj = text_obj(h);
    let deadline = Instant::now() + WAIT;
    while h.text(&obj).unwrap() != want {
        assert!(
            Instant::now() < deadline,
            "sheaf never saw {want:?}; has {:?}",
            h.text(&obj).unwrap()
        );
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn utf16_splices_marks_and_cursors_agree_with_js() {
    common::js_dir(); // fails first, with what to run, if node or node_modules is missing
    let data = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(data.path(), 0, &[]).await;
    let url = relay.url();
    let sheaf = Repo::temporary(RepoConfig {
        find_timeout: WAIT,
        ..RepoConfig::default()
    })
    .unwrap();
    sheaf.connect(&url).unwrap();
    let mut js = JsProc::spawn("client.mjs", &[&url, "js-text", "60000"]).await;
    js.expect(WAIT, |v| v["event"] == "ready").await;

    let h = sheaf.create().await.unwrap();
    let start = "héllo 👋 wörld";
    h.change(|tx| {
        use automerge::transaction::Transactable;
        let t = tx.put_object(ROOT, "text", automerge::ObjType::Text)?;
        tx.splice_text(&t, 0, 0, start)
    })
    .unwrap();
    let obj = text_obj(&h);
    let doc_url = h.url().to_string();
    let found = js.call(json!({"cmd": "find", "url": doc_url})).await;
    assert_eq!(found["doc"]["text"], start);

    // JS inserts at a UTF-16 index past the emoji; sheaf sees it in the right place.
    let at = js_index(start, "wörld");
    assert_eq!(at, 9, "👋 is two UTF-16 units");
    js.call(json!({"cmd": "splice", "url": doc_url, "key": "text", "index": at, "text": "🎉"}))
        .await;
    let s1 = "héllo 👋 🎉wörld";
    wait_text(&h, s1).await;

    // sheaf splices with UTF-16 offsets computed as a JS editor would; JS sees it.
    let after_party = js_index(s1, "wörld");
    h.splice_text(&obj, after_party, 0, ", ", U16).unwrap();
    let s2 = "héllo 👋 🎉, wörld";
    js.call(json!({"cmd": "waitDoc", "url": doc_url, "doc": {"text": s2}}))
        .await;

    // An offset inside a surrogate pair is refused and changes nothing.
    let inside = js_index(s2, "👋") + 1;
    let err = h.splice_text(&obj, inside, 0, "x", U16).unwrap_err();
    assert!(
        matches!(err, TextError::SplitsSurrogatePair { .. }),
        "{err:?}"
    );
    assert_eq!(h.text(&obj).unwrap(), s2);

    // Marks: sheaf marks "wörld" bold, JS marks "👋 🎉" as a link; both sides report the
    // same UTF-16 ranges.
    let w = js_index(s2, "wörld");
    let bold = w..w + "wörld".encode_utf16().count();
    h.mark(&obj, bold.clone(), "bold", true, ExpandMark::After, U16)
        .unwrap();
    let e = js_index(s2, "👋");
    let link = e..e + "👋 🎉".encode_utf16().count();
    js.call(
        json!({"cmd": "mark", "url": doc_url, "key": "text", "start": link.start,
        "end": link.end, "expand": "none", "name": "link", "value": "https://example.org"}),
    )
    .await;
    let deadline = Instant::now() + WAIT;
    let (ours, theirs) = loop {
        let ours = h.marks(&obj, U16).unwrap();
        let theirs = js
            .call(json!({"cmd": "marks", "url": doc_url, "key": "text"}))
            .await["marks"]
            .clone();
        if ours.len() == 2 && theirs.as_array().is_some_and(|a| a.len() == 2) {
            break (ours, theirs);
        }
        assert!(
            Instant::now() < deadline,
            "marks never met: {ours:?} / {theirs}"
        );
        sleep(Duration::from_millis(50)).await;
    };
    for m in &ours {
        let j = theirs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["name"] == m.name.as_str())
            .unwrap_or_else(|| panic!("JS lacks mark {}: {theirs}", m.name));
        assert_eq!(
            (j["start"].as_u64().unwrap() as usize)..(j["end"].as_u64().unwrap() as usize),
            m.range,
            "mark {} (JS {j})",
            m.name
        );
    }
    assert_eq!(ours.iter().find(|m| m.name == "bold").unwrap().range, bold);
    assert_eq!(ours.iter().find(|m| m.name == "link").unwrap().range, link);

    // Cursors: one made in JS resolves in sheaf to the same UTF-16 index, and both follow
    // the character when text is inserted before it.
    let cur = js
        .call(json!({"cmd": "cursor", "url": doc_url, "key": "text", "index": w}))
        .await["cursor"]
        .as_str()
        .expect("a cursor string")
        .to_string();
    let cursor = automerge::Cursor::try_from(cur.as_str()).expect("JS cursor parses");
    assert_eq!(h.cursor_position(&obj, &cursor, U16).unwrap(), w);
    h.splice_text(&obj, 0, 0, "👍", U16).unwrap();
    let moved = w + 2;
    assert_eq!(h.cursor_position(&obj, &cursor, U16).unwrap(), moved);
    let s3 = format!("👍{s2}");
    js.call(json!({"cmd": "waitDoc", "url": doc_url, "doc": {"text": s3}}))
        .await;
    let js_pos = js
        .call(json!({"cmd": "cursorPosition", "url": doc_url, "key": "text", "cursor": cur}))
        .await["index"]
        .clone();
    assert_eq!(js_pos, json!(moved));
    // And a cursor made in sheaf resolves in JS.
    let ours = h.cursor(&obj, moved, U16).unwrap().to_string();
    let js_pos = js
        .call(json!({"cmd": "cursorPosition", "url": doc_url, "key": "text", "cursor": ours}))
        .await["index"]
        .clone();
    assert_eq!(js_pos, json!(moved));

    js.finish().await;
    relay.terminate().await;
}

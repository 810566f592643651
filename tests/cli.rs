//! The `sheaf` binary against a temporary data directory, and `sheaf sync` against an
//! in-process relay.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use sheafdb::{AutomergeUrl, DocumentId};

fn sheaf(dir: &Path, args: &[&str]) -> Output {
    sheaf_env(dir, args, &[])
}

fn sheaf_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sheaf"));
    c.arg("--data-dir").arg(dir).args(args);
    c.env_remove("VISUAL").env_remove("SHEAF_DATA_DIR");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Fails with exactly one line on stderr.
fn fails(o: Output) -> String {
    assert!(!o.status.success(), "expected a failure");
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("sheaf: "), "{err}");
    err
}

#[test]
fn cat_at_heads_reads_the_field_as_it_was_then() {
    use automerge::transaction::Transactable;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    // `body` was text, then became a string; `later` did not exist yet
    let mut d = automerge::AutoCommit::new();
    let body = d
        .put_object(automerge::ROOT, "body", automerge::ObjType::Text)
        .unwrap();
    d.splice_text(&body, 0, 0, "first draft").unwrap();
    d.commit();
    let then = d.get_heads();
    d.put(automerge::ROOT, "body", "a plain string now")
        .unwrap();
    let later = d
        .put_object(automerge::ROOT, "later", automerge::ObjType::Text)
        .unwrap();
    d.splice_text(&later, 0, 0, "added later").unwrap();
    d.commit();
    let file = tmp.path().join("note.am");
    std::fs::write(&file, d.save()).unwrap();
    let url: AutomergeUrl = ok(sheaf(&dir, &["import", file.to_str().unwrap()]))
        .trim()
        .parse()
        .unwrap();
    let at = AutomergeUrl {
        id: url.id,
        heads: Some(then),
    }
    .to_string();
    assert_eq!(
        ok(sheaf(&dir, &["cat", &at, "--text", "body"])),
        "first draft\n"
    );
    let e = fails(sheaf(&dir, &["cat", &url.to_string(), "--text", "body"]));
    assert!(e.contains("field \"body\" is a string, not text"), "{e}");
    let e = fails(sheaf(&dir, &["cat", &at, "--text", "later"]));
    assert!(e.contains("has no field \"later\""), "{e}");
    assert_eq!(
        ok(sheaf(&dir, &["cat", &url.to_string(), "--text", "later"])),
        "added later\n"
    );
}

#[test]
fn new_ls_cat_edit_log_export_import() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let url = ok(sheaf(&dir, &["new", "--title", "Groceries"]))
        .trim()
        .to_string();
    let parsed: AutomergeUrl = url.parse().unwrap();
    let untitled = ok(sheaf(&dir, &["new"])).trim().to_string();
    let ls = ok(sheaf(&dir, &["ls"]));
    assert_eq!(ls.lines().count(), 2, "{ls}");
    assert!(ls.lines().any(|l| l == format!("{url}\tGroceries")), "{ls}");
    assert!(ls.lines().any(|l| l == untitled), "{ls}");

    // edit: an editor script writes the text, then sed rewrites a word
    let script = tmp.path().join("write.sh");
    std::fs::write(&script, "#!/bin/sh\nprintf 'eggs 🥚\\nmilk\\n' > \"$1\"\n").unwrap();
    let editor = format!("sh {}", script.display());
    ok(sheaf_env(
        &dir,
        &["edit", &url, "--message", "first list"],
        &[("EDITOR", &editor)],
    ));
    assert_eq!(
        ok(sheaf(&dir, &["cat", &url, "--text", "text"])),
        "eggs 🥚\nmilk\n"
    );
    let before: serde_json::Value = serde_json::from_str(&ok(sheaf(&dir, &["cat", &url]))).unwrap();
    assert_eq!(
        before,
        serde_json::json!({"title": "Groceries", "text": "eggs 🥚\nmilk\n"})
    );
    ok(sheaf_env(
        &dir,
        &["edit", &url, "--key", "text", "-m", "oat milk, not milk"],
        &[("EDITOR", "sed -i s/milk/oat-milk/")],
    ));
    assert_eq!(
        ok(sheaf(&dir, &["cat", &url, "--text", "text"])),
        "eggs 🥚\noat-milk\n"
    );
    // an editor that fails leaves the note alone
    fails(sheaf_env(&dir, &["edit", &url], &[("EDITOR", "false")]));

    // log: create's empty change, the title, two edits (the sed edit is small)
    let log = ok(sheaf(&dir, &["log", &url]));
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 4, "{log}");
    assert!(
        lines[3].contains("seq=1") && lines[3].contains("ops=4"),
        "{log}"
    );
    // the message of the sed edit ends its line; the others have none
    // messages end their line (`edit --message` / `-m`); the other changes have none
    assert!(lines[2].ends_with("] first list"), "{log}");
    assert!(lines[3].ends_with("] oat milk, not milk"), "{log}");
    assert!(lines[..2].iter().all(|l| l.ends_with(']')), "{log}");
    let first_edit = lines[2].split(' ').next().unwrap();

    // a URL with heads shows that version
    let head = automerge::ChangeHash::try_from(
        &(0..32)
            .map(|i| u8::from_str_radix(&first_edit[2 * i..2 * i + 2], 16).unwrap())
            .collect::<Vec<u8>>()[..],
    )
    .unwrap();
    let at = AutomergeUrl {
        id: parsed.id,
        heads: Some(vec![head]),
    };
    assert_eq!(
        ok(sheaf(&dir, &["cat", &at.to_string(), "--text", "text"])),
        "eggs 🥚\nmilk\n"
    );

    // export / import, binary and JSON
    let am = tmp.path().join("note.am");
    ok(sheaf(&dir, &["export", &url, "-o", am.to_str().unwrap()]));
    let copy = ok(sheaf(&dir, &["import", am.to_str().unwrap()]))
        .trim()
        .to_string();
    assert_ne!(copy, url);
    assert_eq!(
        ok(sheaf(&dir, &["cat", &copy])),
        ok(sheaf(&dir, &["cat", &url]))
    );
    let json = ok(sheaf(&dir, &["export", &url, "--json"]));
    let jf = tmp.path().join("note.json");
    std::fs::write(&jf, &json).unwrap();
    let from_json = ok(sheaf(&dir, &["import", jf.to_str().unwrap()]))
        .trim()
        .to_string();
    assert_eq!(
        ok(sheaf(&dir, &["cat", &from_json, "--text", "text"])),
        "eggs 🥚\noat-milk\n"
    );
    std::fs::write(&jf, r#"{"n": [1, 2.5, {"a": null}], "ok": true}"#).unwrap();
    let u = ok(sheaf(&dir, &["import", jf.to_str().unwrap()]))
        .trim()
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&ok(sheaf(&dir, &["cat", &u]))).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"n": [1, 2.5, {"a": null}], "ok": true})
    );
    // A JSON import is one change, stored in one write (a failed import leaves no empty
    // note behind); `{}` imports as an empty note.
    let log = ok(sheaf(&dir, &["log", &u]));
    assert_eq!(log.lines().count(), 1, "{log}");
    std::fs::write(&jf, "{}").unwrap();
    let empty = ok(sheaf(&dir, &["import", jf.to_str().unwrap()]))
        .trim()
        .to_string();
    assert_eq!(ok(sheaf(&dir, &["cat", &empty])).trim(), "{}");
    assert_eq!(ok(sheaf(&dir, &["log", &empty])).lines().count(), 1);
    assert_eq!(ok(sheaf(&dir, &["ls"])).lines().count(), 6);
}

#[test]
fn the_default_data_dir_is_sheaf_data_in_the_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sheaf"));
        c.current_dir(tmp.path()).args(args);
        c.env_remove("SHEAF_DATA_DIR").env_remove("VISUAL");
        c.output().unwrap()
    };
    let url = ok(run(&["new", "--title", "here"])).trim().to_string();
    assert!(tmp.path().join("sheaf-data").is_dir());
    assert!(tmp.path().join("sheaf-data/storage-id").is_file());
    assert_eq!(ok(run(&["ls"])), format!("{url}\there\n"));
    // SHEAF_DATA_DIR still overrides it
    let other = tmp.path().join("other");
    let o = Command::new(env!("CARGO_BIN_EXE_sheaf"))
        .current_dir(tmp.path())
        .env("SHEAF_DATA_DIR", &other)
        .arg("ls")
        .output()
        .unwrap();
    assert_eq!(ok(o), "");
    assert!(other.is_dir());
}

#[test]
fn clear_errors_for_unknown_notes_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let unknown = DocumentId::random().url().to_string();
    let e = fails(sheaf(&dir, &["cat", &unknown]));
    assert!(e.contains("no note") && e.contains(&unknown), "{e}");
    fails(sheaf(&dir, &["log", &unknown]));
    fails(sheaf(&dir, &["edit", &unknown]));
    let e = fails(sheaf(&dir, &["cat", "not-a-url"]));
    assert!(e.contains("not a note URL"), "{e}");
    let bad = tmp.path().join("bad");
    std::fs::write(&bad, b"\x00\x01 garbage").unwrap();
    let e = fails(sheaf(&dir, &["import", bad.to_str().unwrap()]));
    assert!(
        e.contains("neither Automerge bytes nor a JSON object"),
        "{e}"
    );
    let e = fails(sheaf(&dir, &["import", "/no/such/file"]));
    assert!(e.contains("reading /no/such/file"), "{e}");
    let url = ok(sheaf(&dir, &["new", "--title", "plain"]))
        .trim()
        .to_string();
    let e = fails(sheaf(&dir, &["cat", &url, "--text", "body"]));
    assert!(e.contains("no field \"body\""), "{e}");

    // heads the note does not have, heads that do not parse, and a '#' without heads
    let parsed: AutomergeUrl = url.parse().unwrap();
    let at = |h: u8| {
        AutomergeUrl {
            id: parsed.id,
            heads: Some(vec![automerge::ChangeHash([h; 32])]),
        }
        .to_string()
    };
    for (h, text) in [(7, None), (8, Some("text"))] {
        let u = at(h);
        let mut args = vec!["cat", u.as_str()];
        args.extend(text.map(|k| ["--text", k]).into_iter().flatten());
        let e = fails(sheaf(&dir, &args));
        let missing = format!("{h:02x}").repeat(32);
        assert!(
            e.contains(&format!("note {url} has no change {missing}")),
            "{e}"
        );
    }
    let e = fails(sheaf(&dir, &["export", &at(9)]));
    assert!(e.contains("has no change"), "{e}");
    let e = fails(sheaf(&dir, &["cat", &format!("{url}#2wQbx8Yz3Xb")]));
    assert!(
        e.contains("not a note URL") && e.contains("heads in URL are not valid"),
        "{e}"
    );
    let bare = url.strip_prefix("automerge:").unwrap();
    let e = fails(sheaf(&dir, &["cat", &format!("{bare}#nope")]));
    assert!(e.contains("heads in URL are not valid"), "{e}");
    let e = fails(sheaf(&dir, &["cat", &format!("{url}#")]));
    assert!(e.contains("no heads after '#'"), "{e}");

    // `edit --key` on a field that is not text: refused before the editor runs
    let marker = tmp.path().join("editor-ran");
    let editor = format!("touch {}", marker.display());
    let e = fails(sheaf_env(
        &dir,
        &["edit", &url, "--key", "title"],
        &[("EDITOR", &editor)],
    ));
    assert!(e.contains("field \"title\" is a string, not text"), "{e}");
    assert!(!marker.exists(), "the editor ran");
    let e = fails(sheaf(&dir, &["cat", &url, "--text", "title"]));
    assert!(e.contains("field \"title\" is a string, not text"), "{e}");
    let e = fails(sheaf_env(&dir, &["edit", &at(7)], &[("EDITOR", &editor)]));
    assert!(e.contains("has no change"), "{e}");
    assert!(!marker.exists(), "the editor ran");
    ok(sheaf_env(
        &dir,
        &["edit", &url, "--key", "body"],
        &[("EDITOR", &editor)],
    ));
    assert!(marker.exists(), "a text field (new) does run the editor");
    let e = fails(sheaf(&dir, &["sync", "--relay", "http://x"]));
    assert!(e.contains("ws://"), "{e}");
    assert!(!sheaf(&dir, &["frobnicate"]).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_pushes_every_note_to_a_relay() {
    let (relay_url, relay, _stop) = common::in_process_relay().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut urls = Vec::new();
    for t in ["one", "two", "three"] {
        let d = dir.clone();
        let u = tokio::task::spawn_blocking(move || ok(sheaf(&d, &["new", "--title", t])))
            .await
            .unwrap();
        urls.push(u.trim().to_string());
    }
    let d = dir.clone();
    let r = relay_url.clone();
    let out =
        tokio::task::spawn_blocking(move || sheaf(&d, &["sync", "--relay", &r, "--timeout", "30"]))
            .await
            .unwrap();
    let stdout = ok(out.clone());
    assert_eq!(stdout.trim(), "synced 3 notes");
    let progress = String::from_utf8(out.stderr).unwrap();
    assert!(progress.contains("synced 3/3"), "{progress}");
    for u in &urls {
        let h = tokio::time::timeout(
            Duration::from_secs(10),
            relay.find(u.parse::<AutomergeUrl>().unwrap()),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(h.to_json()["title"].is_string(), "{}", h.to_json());
    }

    // nothing listening: a clear timeout
    let d = dir.clone();
    let out = tokio::task::spawn_blocking(move || {
        sheaf(
            &d,
            &["sync", "--relay", "ws://127.0.0.1:9", "--timeout", "1"],
        )
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let last = err.trim_end().lines().last().unwrap();
    assert!(
        last.starts_with("sheaf: could not connect to ws://127.0.0.1:9"),
        "{err}"
    );
}

/// Run `sheaf` off the async runtime (the relay in this process must keep serving).
async fn sheaf_async(dir: &Path, args: &[&str]) -> Output {
    let (dir, args): (std::path::PathBuf, Vec<String>) =
        (dir.into(), args.iter().map(|a| a.to_string()).collect());
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sheaf(&dir, &args)
    })
    .await
    .unwrap()
}

/// The last line on stderr of a run that failed.
fn failed_with(o: Output) -> String {
    assert!(!o.status.success(), "expected a failure");
    let err = String::from_utf8(o.stderr).unwrap();
    let last = err
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(last.starts_with("sheaf: "), "{err}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_reports_the_notes_a_relay_declines_instead_of_waiting_for_them() {
    // A relay that takes one note per connection declines the second.
    let relay = sheafdb::Repo::temporary(sheafdb::RepoConfig::relay()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_url = format!("ws://{}", listener.local_addr().unwrap());
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = sheafdb::relay::ServerConfig {
        max_docs_per_connection: Some(1),
        ..Default::default()
    };
    tokio::spawn(sheafdb::relay::run(listener, relay.hub(), config, async {
        let _ = stopped.await;
    }));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    for t in ["one", "two"] {
        ok(sheaf_async(&dir, &["new", "--title", t]).await);
    }
    let started = std::time::Instant::now();
    let sync = ["sync", "--relay", &relay_url, "--timeout", "60"];
    let out = sheaf_async(&dir, &sync).await;
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(
        failed_with(out),
        format!("sheaf: 1 of 2 notes synced; 1 declined by {relay_url}")
    );
    assert!(err.contains("declined by ws://"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the declined note was waited for"
    );
    assert_eq!(relay.list().unwrap().len(), 1);
}

async fn sheaf_env_async(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = dir.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        sheaf_env(&dir, &args, &env)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_with_a_token_says_why_a_relay_refuses_and_what_a_read_only_token_keeps_here() {
    use sheafdb::auth::{Claims, DocScope, Key, Keyring};
    let mut keys = Keyring::new();
    keys.insert("k1", Key::from_bytes([7; 32]));
    let mint =
        |docs: DocScope, write: bool| keys.mint(&Claims::new("k1", docs, write, 3600)).unwrap();
    let relay = sheafdb::Repo::temporary(sheafdb::RepoConfig::relay()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_url = format!("ws://{}", listener.local_addr().unwrap());
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = sheafdb::relay::ServerConfig {
        auth: Some(std::sync::Arc::new(keys.clone())),
        ..Default::default()
    };
    tokio::spawn(sheafdb::relay::run(listener, relay.hub(), config, async {
        let _ = stopped.await;
    }));
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let url = ok(sheaf_async(&a, &["new", "--title", "shared"]).await)
        .trim()
        .to_string();
    let sync = ["sync", "--relay", &relay_url, "--timeout", "30"];

    // No token: the relay's reason, at once.
    let started = std::time::Instant::now();
    let err = failed_with(sheaf_async(&a, &sync).await);
    assert!(
        err.starts_with(&format!(
            "sheaf: the relay {relay_url} refused the connection (1008): unauthorized: "
        )),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "waited for the timeout"
    );

    // A write token (from the environment) pushes the note.
    let write = mint(DocScope::All, true);
    let out = sheaf_env_async(&a, &sync, &[("SHEAF_TOKEN", &write)]).await;
    assert_eq!(ok(out).trim(), "synced 1 notes");

    // A read-only token fetches it elsewhere...
    let id: AutomergeUrl = url.parse().unwrap();
    let read = mint(DocScope::Docs([id.id].into()), false);
    let mut fetch = sync.to_vec();
    fetch.extend(["--token", &read, &url]);
    assert_eq!(ok(sheaf_async(&b, &fetch).await).trim(), "synced 1 notes");
    // ...but an edit made there stays there, and sync says so instead of timing out.
    ok(sheaf_env_async(
        &b,
        &["edit", &url, "--key", "text"],
        &[("EDITOR", "sh -c 'echo local > \"$0\"'")],
    )
    .await);
    let started = std::time::Instant::now();
    let out = sheaf_async(&b, &fetch[..fetch.len() - 1]).await;
    let stderr = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(
        failed_with(out),
        format!("sheaf: 0 of 1 notes synced; 1 read-only at {relay_url}")
    );
    assert!(
        stderr.contains(&format!("read-only at {relay_url}: {url}")),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "waited for the timeout"
    );
    let at_relay = relay.find(id).await.unwrap();
    assert!(at_relay.with_doc(|d| {
        use automerge::ReadDoc;
        d.get(automerge::ROOT, "text").unwrap().is_none()
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_pulls_edits_made_elsewhere() {
    let (relay_url, relay, _stop) = common::in_process_relay().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let url = ok(sheaf_async(&dir, &["new", "--title", "draft"]).await)
        .trim()
        .to_string();
    let sync = ["sync", "--relay", &relay_url, "--timeout", "30"];
    assert_eq!(ok(sheaf_async(&dir, &sync).await).trim(), "synced 1 notes");

    // The note is edited on the relay's side (as another device's edit would land there).
    let on_relay = relay
        .find(url.parse::<AutomergeUrl>().unwrap())
        .await
        .unwrap();
    on_relay
        .change(|tx| {
            use automerge::transaction::Transactable;
            tx.put(automerge::ROOT, "title", "edited elsewhere")
        })
        .unwrap();
    on_relay.saved().await.unwrap();

    assert_eq!(ok(sheaf_async(&dir, &sync).await).trim(), "synced 1 notes");
    let v: serde_json::Value =
        serde_json::from_str(&ok(sheaf_async(&dir, &["cat", &url]).await)).unwrap();
    assert_eq!(v, serde_json::json!({"title": "edited elsewhere"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_fetches_notes_by_url_from_the_relay() {
    let (relay_url, relay, _stop) = common::in_process_relay().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let local = ok(sheaf_async(&dir, &["new", "--title", "local"]).await)
        .trim()
        .to_string();

    // Another device (a JS app, a phone) makes a note and syncs it to the relay.
    let phone = sheafdb::Repo::temporary(sheafdb::RepoConfig::default()).unwrap();
    phone.connect(&relay_url).unwrap();
    let note = phone.create().await.unwrap();
    note.change(|tx| {
        use automerge::transaction::Transactable;
        tx.put(automerge::ROOT, "title", "from the phone")
    })
    .unwrap();
    let on_relay = tokio::time::timeout(Duration::from_secs(10), relay.find(note.id()))
        .await
        .unwrap()
        .unwrap();
    let mut heads = on_relay.heads_watch();
    tokio::time::timeout(
        Duration::from_secs(10),
        heads.wait_for(|h| *h == note.heads()),
    )
    .await
    .unwrap()
    .unwrap();
    phone.shutdown().unwrap();
    let remote = note.url().to_string();

    let out = ok(sheaf_async(
        &dir,
        &["sync", "--relay", &relay_url, "--timeout", "30", &remote],
    )
    .await);
    assert_eq!(out.trim(), "synced 2 notes");
    let v: serde_json::Value =
        serde_json::from_str(&ok(sheaf_async(&dir, &["cat", &remote]).await)).unwrap();
    assert_eq!(v, serde_json::json!({"title": "from the phone"}));
    let ls = ok(sheaf_async(&dir, &["ls"]).await);
    assert_eq!(
        ls.lines().collect::<Vec<_>>(),
        {
            let mut want = vec![
                format!("{local}\tlocal"),
                format!("{remote}\tfrom the phone"),
            ];
            want.sort();
            want
        },
        "{ls}"
    );

    // A note the relay does not have: a clear error, and nothing is created.
    let unknown = DocumentId::random().url().to_string();
    let e = failed_with(
        sheaf_async(
            &dir,
            &["sync", "--relay", &relay_url, "--timeout", "30", &unknown],
        )
        .await,
    );
    assert!(
        e.contains(&unknown) && e.contains("does not have") && e.contains(&relay_url),
        "{e}"
    );
    assert_eq!(ok(sheaf_async(&dir, &["ls"]).await).lines().count(), 2);
    // Not a URL: refused before connecting.
    let e = failed_with(sheaf_async(&dir, &["sync", "--relay", &relay_url, "nope"]).await);
    assert!(e.contains("not a note URL"), "{e}");
}

/// `sheaf cat ... | head`: a reader that goes away is not a crash. The command stops
/// quietly and the store is closed properly (it opens again).
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let url = ok(sheaf(dir.path(), &["new", "--title", "piped"]));
    let url = url.trim();
    for args in [vec!["cat", url], vec!["ls"]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sheaf"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The read end is closed before the command gets to print anything.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {} {err}", out.status);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(ok(sheaf(dir.path(), &["ls"])).contains(url));
}

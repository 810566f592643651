//! `sheaf`: the command line for a local sheaf store: create, list, read, edit (in `$EDITOR`),
//! inspect history, import/export and sync notes with a relay.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{
    Automerge, AutomergeError, ChangeHash, ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT,
};
use clap::{Parser, Subcommand};
use sheafdb::engine::PeerSyncStatus;
use sheafdb::id::URL_PREFIX;
use sheafdb::{
    AutomergeUrl, ConnectOptions, ConnectionState, DocHandle, Repo, RepoConfig, RepoError,
};

#[derive(Parser, Debug)]
#[command(name = "sheaf", version, about = "A local-first note store")]
struct Args {
    /// Data directory of the store.
    #[arg(long, global = true, env = "SHEAF_DATA_DIR", default_value = sheafdb::repo::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a note and print its URL.
    New {
        #[arg(long)]
        title: Option<String>,
    },
    /// List notes: URL and title.
    Ls,
    /// Print a note as JSON (a URL with `#heads` prints that version).
    Cat {
        url: String,
        /// Print only this text field, as plain text.
        #[arg(long, value_name = "KEY")]
        text: Option<String>,
    },
    /// Edit a text field in $EDITOR; the result is merged in as a minimal diff.
    Edit {
        url: String,
        #[arg(long, default_value = "text")]
        key: String,
        /// A message for the change, shown by `sheaf log`.
        #[arg(short, long)]
        message: Option<String>,
    },
    /// List a note's changes, oldest first.
    Log { url: String },
    /// Sync every local note with a relay (pushing local edits, pulling remote ones), then
    /// exit. Notes named by URL are fetched from the relay if they are not here yet.
    Sync {
        #[arg(long, value_name = "ws://HOST:PORT")]
        relay: String,
        /// Notes to fetch from the relay too (made by another device or a JS app); the
        /// whole note is synced, any #heads are ignored.
        #[arg(value_name = "NOTE_URL")]
        notes: Vec<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Capability token for a relay with auth on (`sheaf-relay token`).
        #[arg(long, env = "SHEAF_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Write a note as Automerge bytes (or JSON with --json) to stdout or a file.
    Export {
        url: String,
        #[arg(long)]
        json: bool,
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Create a note from a file of Automerge bytes or a JSON object; prints its URL.
    Import { file: PathBuf },
}

/// `print!` / `println!` to stdout that return an error instead of panicking when stdout is
/// closed (`sheaf cat ... | head`): the command stops there, the store is still closed
/// properly, and `main` exits quietly.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout(), $($t)*)?
    }};
}
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($t)*)?
    }};
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sheaf: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`| head`): nothing to report.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // one line: the error and its causes
            eprintln!("sheaf: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    // `sync` fetches named notes from the relay, which waits a few seconds before it says
    // it does not have one (another peer may be uploading it): let that answer arrive.
    let find_timeout = match &args.cmd {
        Cmd::Sync { timeout, .. } => Duration::from_secs(*timeout),
        _ => Duration::from_secs(5),
    };
    let config = RepoConfig {
        find_timeout,
        ..RepoConfig::default()
    };
    let repo = Repo::open_with(&args.data_dir, config)
        .with_context(|| format!("opening data directory {}", args.data_dir.display()))?;
    let out = command(&repo, args.cmd).await;
    let closed = repo.shutdown().context("closing the store");
    out.and(closed)
}

async fn command(repo: &Repo, cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::New { title } => {
            let h = repo.create().await?;
            if let Some(t) = title {
                h.change(|tx| tx.put(ROOT, "title", t))?;
            }
            h.saved().await?;
            outln!("{}", h.url());
        }
        Cmd::Ls => {
            let mut ids = repo.list()?;
            ids.sort_by_key(|id| id.to_string());
            for id in ids {
                let h = repo.find(id).await?;
                match h.with_doc(title) {
                    Some(t) => outln!("{}\t{t}", h.url()),
                    None => outln!("{}", h.url()),
                }
            }
        }
        Cmd::Cat { url, text } => {
            let (h, heads) = open(repo, &url).await?;
            match text {
                Some(key) => {
                    let s = h.with_doc(|d| -> anyhow::Result<String> {
                        // The field as it was at those heads: it may have been text then
                        // and something else now, or the other way round.
                        let t = text_obj(d, &key, heads.as_deref())?
                            .ok_or_else(|| anyhow!("{url} has no field {key:?}"))?;
                        Ok(match &heads {
                            Some(hd) => d.text_at(&t, hd)?,
                            None => d.text(&t)?,
                        })
                    })?;
                    out!("{s}");
                    if !s.ends_with('\n') {
                        outln!();
                    }
                }
                None => {
                    let v = match &heads {
                        Some(hd) => h.json_at(hd)?,
                        None => h.to_json(),
                    };
                    outln!("{}", serde_json::to_string_pretty(&v)?);
                }
            }
        }
        Cmd::Edit { url, key, message } => edit(repo, &url, &key, message).await?,
        Cmd::Log { url } => {
            let (h, _) = open(repo, &url).await?;
            for c in h.history() {
                let deps: Vec<String> = c.deps.iter().map(|d| short(&d.to_string())).collect();
                out!(
                    "{} actor={} seq={} time={} ops={} deps=[{}]",
                    c.hash,
                    short(&c.actor),
                    c.seq,
                    c.time,
                    c.ops,
                    deps.join(",")
                );
                match &c.message {
                    Some(m) => outln!(" {m}"),
                    None => outln!(),
                }
            }
        }
        Cmd::Sync {
            relay,
            notes,
            timeout,
            token,
        } => {
            let options = token.map(ConnectOptions::token).unwrap_or_default();
            sync(repo, &relay, options, &notes, Duration::from_secs(timeout)).await?
        }
        Cmd::Export { url, json, output } => {
            let (h, heads) = open(repo, &url).await?;
            let bytes = match (json, &heads) {
                (true, Some(hd)) => serde_json::to_vec_pretty(&h.json_at(hd)?)?,
                (true, None) => serde_json::to_vec_pretty(&h.to_json())?,
                (false, Some(hd)) => h.with_doc(|d| d.fork_at(hd))?.save(),
                (false, None) => h.export(),
            };
            match output {
                Some(p) => std::fs::write(&p, &bytes)
                    .with_context(|| format!("writing {}", p.display()))?,
                None => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&bytes)?;
                    if json {
                        o.write_all(b"\n")?;
                    }
                }
            }
        }
        Cmd::Import { file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let h = import(repo, &file, &bytes).await?;
            h.saved().await?;
            outln!("{}", h.url());
        }
    }
    Ok(())
}

/// A note URL (`automerge:…`, optionally `#heads`) or bare id (also with `#heads`). Heads
/// that do not parse, or a `#` with none after it, are errors, not the current version.
fn parse_url(url: &str) -> anyhow::Result<AutomergeUrl> {
    let full = match url.starts_with(URL_PREFIX) {
        true => url.to_string(),
        false => format!("{URL_PREFIX}{url}"),
    };
    match full.parse::<AutomergeUrl>() {
        Ok(AutomergeUrl { heads: Some(h), .. }) if h.is_empty() => {
            bail!("not a note URL: {url:?} (no heads after '#')")
        }
        Ok(u) => Ok(u),
        Err(e) => bail!("not a note URL: {url:?} ({e})"),
    }
}

/// A note by URL (`automerge:…`, optionally `#heads`) or bare id; only notes in the store.
async fn open(
    repo: &Repo,
    url: &str,
) -> anyhow::Result<(DocHandle, Option<Vec<automerge::ChangeHash>>)> {
    let url = parse_url(url)?;
    if !repo.contains(&url.id)? {
        bail!("no note {} in this store", AutomergeUrl::new(url.id));
    }
    let h = repo.find(url.id).await?;
    if let Some(heads) = &url.heads {
        if let Some(missing) = heads.iter().find(|x| h.change_info(x).is_none()) {
            bail!("note {} has no change {missing}", h.url());
        }
    }
    Ok((h, url.heads))
}

fn title(d: &automerge::Automerge) -> Option<String> {
    match d.get(ROOT, "title").ok()?? {
        (Value::Scalar(s), _) => match s.as_ref() {
            ScalarValue::Str(s) => Some(s.to_string()),
            _ => None,
        },
        (Value::Object(ObjType::Text), id) => d.text(&id).ok(),
        _ => None,
    }
}

/// The text object at root `key` (at `heads`, or now): `None` if absent, an error if
/// something else is there.
fn text_obj<D: ReadDoc>(
    d: &D,
    key: &str,
    heads: Option<&[ChangeHash]>,
) -> anyhow::Result<Option<ObjId>> {
    let value = match heads {
        Some(h) => d.get_at(ROOT, key, h)?,
        None => d.get(ROOT, key)?,
    };
    let what = match value {
        None => return Ok(None),
        Some((Value::Object(ObjType::Text), id)) => return Ok(Some(id)),
        Some((Value::Object(ObjType::Map | ObjType::Table), _)) => "a map",
        Some((Value::Object(ObjType::List), _)) => "a list",
        Some((Value::Scalar(v), _)) => match v.as_ref() {
            ScalarValue::Str(_) => "a string",
            ScalarValue::Int(_) | ScalarValue::Uint(_) | ScalarValue::F64(_) => "a number",
            ScalarValue::Counter(_) => "a counter",
            ScalarValue::Boolean(_) => "a boolean",
            ScalarValue::Null => "null",
            ScalarValue::Timestamp(_) => "a timestamp",
            ScalarValue::Bytes(_) | ScalarValue::Unknown { .. } => "binary",
        },
    };
    bail!("field {key:?} is {what}, not text")
}

fn short(s: &str) -> String {
    s.chars().take(8).collect()
}

async fn edit(repo: &Repo, url: &str, key: &str, message: Option<String>) -> anyhow::Result<()> {
    let (h, heads) = open(repo, url).await?;
    if heads.is_some() {
        bail!("cannot edit a past version; drop the #heads from the URL");
    }
    let current = h.with_doc(|d| -> anyhow::Result<String> {
        Ok(match text_obj(d, key, None)? {
            Some(t) => d.text(&t)?,
            None => String::new(),
        })
    })?;
    let dir = tempfile_dir()?;
    let path = dir.join(format!("{}-{key}.txt", h.id()));
    let result = (|| -> anyhow::Result<String> {
        std::fs::write(&path, &current).with_context(|| format!("writing {}", path.display()))?;
        let editor = std::env::var("VISUAL")
            .or_else(|_| std::env::var("EDITOR"))
            .unwrap_or_else(|_| "vi".into());
        // Through the shell, so EDITOR may carry arguments ("code --wait", "sed -i s/a/b/").
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{editor} \"$1\""))
            .arg("sh")
            .arg(&path)
            .status()
            .with_context(|| format!("running the editor {editor:?}"))?;
        if !status.success() {
            bail!("the editor {editor:?} failed ({status}); the note is unchanged");
        }
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let new = result?;
    if new == current {
        eprintln!("no changes");
        return Ok(());
    }
    // The note may have changed meanwhile (another process can't: the store is locked; but a
    // future long-running sync could): update_text diffs against the text as it is now.
    let key = key.to_string();
    let options = match message {
        Some(m) => CommitOptions::default().with_message(m),
        None => CommitOptions::default(),
    };
    h.change_with(options, |tx| {
        let t = match tx.get(ROOT, key.as_str())? {
            Some((Value::Object(ObjType::Text), id)) => id,
            None => tx.put_object(ROOT, key.as_str(), ObjType::Text)?,
            Some(_) => return Err(AutomergeError::Fail),
        };
        tx.update_text(&t, &new)
    })
    .with_context(|| format!("updating field {key:?}"))?;
    h.saved().await?;
    eprintln!("updated {} ({key})", h.url());
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "sheaf-edit-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

async fn import(repo: &Repo, file: &Path, bytes: &[u8]) -> anyhow::Result<DocHandle> {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(bytes) {
        // Built in memory and imported whole: the note is stored in one write, so an import
        // that fails (a full disk) leaves no empty note behind, as creating it first and
        // then filling it in did.
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        for (k, v) in &map {
            put_json(&mut tx, &ROOT, k.as_str().into(), v)?;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let options = CommitOptions::default().with_time(now);
        if tx.pending_ops() == 0 {
            // `{}`: an empty change, as `Repo::create` makes, so that peers can tell it exists.
            tx.rollback();
            doc.empty_commit(options);
        } else {
            tx.commit_with(options);
        }
        return Ok(repo.import(&doc.save()).await?);
    }
    repo.import(bytes).await.with_context(|| {
        format!(
            "{} is neither Automerge bytes nor a JSON object",
            file.display()
        )
    })
}

enum Slot<'a> {
    Key(&'a str),
    Index(usize),
}

impl<'a> From<&'a str> for Slot<'a> {
    fn from(k: &'a str) -> Self {
        Slot::Key(k)
    }
}

/// Write a JSON value into `obj` (strings become collaborative text).
fn put_json(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    slot: Slot<'_>,
    v: &serde_json::Value,
) -> Result<(), AutomergeError> {
    use serde_json::Value as J;
    let scalar = |v: &J| -> Option<ScalarValue> {
        Some(match v {
            J::Null => ScalarValue::Null,
            J::Bool(b) => ScalarValue::Boolean(*b),
            J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => ScalarValue::Int(i),
                (None, Some(u), _) => ScalarValue::Uint(u),
                (_, _, f) => ScalarValue::F64(f.unwrap_or(0.0)),
            },
            _ => return None,
        })
    };
    if let Some(s) = scalar(v) {
        return match slot {
            Slot::Key(k) => tx.put(obj, k, s),
            Slot::Index(i) => tx.insert(obj, i, s),
        };
    }
    let typ = match v {
        J::String(_) => ObjType::Text,
        J::Array(_) => ObjType::List,
        _ => ObjType::Map,
    };
    let child = match slot {
        Slot::Key(k) => tx.put_object(obj, k, typ)?,
        Slot::Index(i) => tx.insert_object(obj, i, typ)?,
    };
    match v {
        J::String(s) => tx.splice_text(&child, 0, 0, s),
        J::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                put_json(tx, &child, Slot::Index(i), item)?;
            }
            Ok(())
        }
        J::Object(m) => {
            for (k, item) in m {
                put_json(tx, &child, Slot::Key(k), item)?;
            }
            Ok(())
        }
        _ => unreachable!("scalars handled above"),
    }
}

async fn sync(
    repo: &Repo,
    relay: &str,
    options: ConnectOptions,
    notes: &[String],
    timeout: Duration,
) -> anyhow::Result<()> {
    if !(relay.starts_with("ws://") || relay.starts_with("wss://")) {
        bail!("the relay must be a ws:// or wss:// URL, not {relay:?}");
    }
    let named = notes
        .iter()
        .map(|u| parse_url(u).map(|u| u.id))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut state = repo.connect_with(relay, options)?;
    eprintln!("connecting to {relay}");
    // A relay with auth upgrades the socket, then closes it with its reason (1008) if the
    // token does not do: say that rather than wait for a handshake that will not come.
    let refused = |s: &ConnectionState| match s {
        ConnectionState::Refused { code, reason, .. } => Some(anyhow!(
            "the relay {relay} refused the connection ({code}): {reason}"
        )),
        ConnectionState::Stopped => Some(anyhow!("the connection to {relay} ended")),
        _ => None,
    };
    let connected = tokio::time::timeout_at(
        deadline,
        state.wait_for(|s| matches!(s, ConnectionState::Connected) || refused(s).is_some()),
    )
    .await
    .map(|s| s.map(|s| refused(&s)));
    match connected {
        Err(_) => bail!("could not connect to {relay} within {timeout:?}"),
        Ok(Err(_)) => bail!("the connection to {relay} ended"),
        Ok(Ok(Some(why))) => return Err(why),
        Ok(Ok(None)) => {}
    }
    let mut peers = repo.peers();
    let handshake = tokio::time::timeout_at(deadline, async {
        tokio::select! {
            _ = peers.wait_for(|p| !p.is_empty()) => None,
            s = state.wait_for(|s| refused(s).is_some()) => {
                Some(s.ok().and_then(|s| refused(&s)).unwrap_or_else(|| anyhow!("the connection to {relay} ended")))
            }
        }
    })
    .await;
    match handshake {
        Err(_) => {
            bail!("connected to {relay} but the handshake did not finish within {timeout:?}")
        }
        Ok(Some(why)) => return Err(why),
        Ok(None) => {}
    }
    let relay_peers = peers.borrow().clone();
    let ids = repo.list()?;
    let mut handles = Vec::with_capacity(ids.len() + named.len());
    for id in &ids {
        handles.push(repo.find(*id).await?);
    }
    // Named notes not here yet come from the relay (sheaf-relay says it lacks one after
    // its request grace, 5 s).
    for id in named {
        if ids.contains(&id) || handles.iter().any(|h| h.id() == id) {
            continue;
        }
        let url = AutomergeUrl::new(id);
        eprintln!("fetching {url}");
        match tokio::time::timeout_at(deadline, repo.find(id)).await {
            Ok(Ok(h)) => handles.push(h),
            Ok(Err(RepoError::NotFound(_))) => bail!("the relay {relay} does not have note {url}"),
            Ok(Err(RepoError::FindTimeout { after, .. })) => {
                bail!("note {url} did not arrive from {relay} within {after:?}")
            }
            Ok(Err(e)) => return Err(e).with_context(|| format!("fetching note {url}")),
            Err(_) => bail!("timed out after {timeout:?} fetching note {url} from {relay}"),
        }
    }
    let total = handles.len();
    eprintln!("syncing {total} notes");
    let relay_says = |h: &DocHandle, want: PeerSyncStatus| {
        let st: HashMap<_, _> = h.sync_status().borrow().clone();
        relay_peers.iter().any(|p| st.get(p) == Some(&want))
    };
    let mut done = 0;
    let mut pending: Vec<DocHandle> = handles;
    let mut declined: Vec<DocHandle> = Vec::new();
    let mut read_only: Vec<DocHandle> = Vec::new();
    while !pending.is_empty() {
        // A note the relay declines, or whose edits here it will not take, will not sync
        // by waiting.
        let (no, rest): (Vec<_>, Vec<_>) = pending
            .into_iter()
            .partition(|h| relay_says(h, PeerSyncStatus::Declined));
        declined.extend(no);
        let (ro, rest): (Vec<_>, Vec<_>) = rest
            .into_iter()
            .partition(|h| relay_says(h, PeerSyncStatus::ReadOnly));
        read_only.extend(ro);
        pending = rest;
        pending.retain(|h| !relay_says(h, PeerSyncStatus::Synced));
        let now_done = total - pending.len() - declined.len() - read_only.len();
        if now_done != done {
            done = now_done;
            eprintln!("synced {done}/{total}");
        }
        if pending.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?}: {done} of {total} notes synced");
        }
        // Wake on any status change of a pending note, or poll again shortly.
        let mut rx = pending[0].sync_status();
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
    }
    repo.flush().await?;
    for h in &declined {
        eprintln!(
            "declined by {relay}: {} (the relay takes no more notes on one connection, \
             or its access rules exclude this one)",
            h.url()
        );
    }
    for h in &read_only {
        eprintln!(
            "read-only at {relay}: {} (received what the relay has; the edits made here \
             stay here, as the token does not allow writing)",
            h.url()
        );
    }
    if !declined.is_empty() || !read_only.is_empty() {
        let mut why = Vec::new();
        if !declined.is_empty() {
            why.push(format!("{} declined by {relay}", declined.len()));
        }
        if !read_only.is_empty() {
            why.push(format!("{} read-only at {relay}", read_only.len()));
        }
        bail!(
            "{} of {total} notes synced; {}",
            total - declined.len() - read_only.len(),
            why.join("; ")
        );
    }
    outln!("synced {total} notes");
    Ok(())
}

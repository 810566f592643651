//! Two people edit one note while the relay is down, and converge when it comes back.
//!
//! ```sh
//! cargo run --example offline_notes
//! ```
//!
//! Starts a relay in this process (`Repo` + `sheafdb::relay::run` on 127.0.0.1:0, with a
//! persistent data directory), connects alice and bob, stops the relay, lets both edit the
//! note offline, starts a new relay on the same port and data directory, and waits until
//! alice and bob hold the same text. Prints connection and sync status changes as they
//! happen. Ends by itself (or fails after 10 s).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{ObjType, ReadDoc, ROOT};
use sheafdb::net::client::ConnectionState;
use sheafdb::{DocHandle, NoteStatus, Repo, RepoConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

/// A relay running in this process: its repo, its server task and the way to stop it.
struct Relay {
    repo: Repo,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

async fn start_relay(dir: &Path, addr: SocketAddr) -> anyhow::Result<(Relay, SocketAddr)> {
    let repo = Repo::open_with(dir, RepoConfig::relay())?;
    // Right after the previous relay closed, the port can take a moment to be free.
    let deadline = Instant::now() + Duration::from_secs(3);
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) if Instant::now() < deadline => {
                eprintln!("  (bind {addr}: {e}; retrying)");
                sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let hub = repo.hub();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = sheafdb::relay::run(listener, hub, Default::default(), shutdown).await {
            eprintln!("relay failed: {e}");
        }
    });
    println!("relay: listening on ws://{addr}");
    Ok((Relay { repo, stop, task }, addr))
}

impl Relay {
    /// Close every socket, wait for the server, flush and close the store.
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await?;
        let repo = self.repo;
        tokio::task::spawn_blocking(move || repo.shutdown().map_err(anyhow::Error::from)).await??;
        println!("relay: stopped");
        Ok(())
    }
}

/// Print a peer's connection state whenever it changes.
fn watch_connection(who: &'static str, repo: &Repo, url: &str) -> anyhow::Result<()> {
    let mut state = repo.connect(url)?;
    tokio::spawn(async move {
        loop {
            let s = state.borrow_and_update().clone();
            match s {
                ConnectionState::Offline { retry_in } => {
                    println!("{who}: offline, retrying in {} ms", retry_in.as_millis())
                }
                other => println!("{who}: {other:?}"),
            }
            if state.changed().await.is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// Print a note's status (saving, saved, offline, syncing, synced) whenever it changes.
fn watch_status(who: &'static str, h: &DocHandle) {
    let mut st = h.status();
    tokio::spawn(async move {
        println!("{who}: note {:?}", st.get());
        while let Ok(now) = st.changed().await {
            println!("{who}: note {now:?}");
        }
    });
}

fn text(h: &DocHandle) -> String {
    h.with_doc(|d| match d.get(ROOT, "text") {
        Ok(Some((_, t))) => d.text(&t).unwrap_or_default(),
        _ => String::new(),
    })
}

fn append(h: &DocHandle, s: &str) -> anyhow::Result<()> {
    h.change(|tx| {
        let t = match tx.get(ROOT, "text")? {
            Some((_, t)) => t,
            None => tx.put_object(ROOT, "text", ObjType::Text)?,
        };
        let end = tx.length(&t);
        tx.splice_text(&t, end, 0, s)
    })?;
    Ok(())
}

async fn wait_synced(h: &DocHandle) -> anyhow::Result<()> {
    h.status().wait_for(|s| s == NoteStatus::Synced).await?;
    Ok(())
}

async fn run() -> anyhow::Result<()> {
    let relay_dir = tempfile::tempdir()?;
    let (relay, addr) = start_relay(relay_dir.path(), "127.0.0.1:0".parse()?).await?;
    let url = format!("ws://{addr}");

    let alice = Repo::temporary(RepoConfig::default())?;
    let bob = Repo::temporary(RepoConfig::default())?;
    watch_connection("alice", &alice, &url)?;
    watch_connection("bob", &bob, &url)?;

    let a = alice.create().await?;
    append(&a, "Shopping:")?;
    watch_status("alice", &a);
    let b = bob.find(a.id()).await?;
    watch_status("bob", &b);
    wait_synced(&a).await?;
    println!("bob sees {:?}", text(&b));

    // The relay goes down; both keep editing.
    relay.stop().await?;
    let mut peers = alice.peers();
    peers.wait_for(|p| p.is_empty()).await?;
    append(&a, " milk")?;
    append(&b, " eggs")?;
    println!("offline: alice has {:?}, bob has {:?}", text(&a), text(&b));
    sleep(Duration::from_millis(300)).await;

    // It comes back on the same port with what it stored.
    let (relay, _) = start_relay(relay_dir.path(), addr).await?;
    loop {
        let (ha, hb) = (a.heads(), b.heads());
        if ha == hb && !ha.is_empty() {
            break;
        }
        let mut changes = a.changes();
        let _ = timeout(Duration::from_millis(200), changes.next()).await;
    }
    wait_synced(&a).await?;
    wait_synced(&b).await?;
    assert_eq!(text(&a), text(&b));
    println!("converged: {:?}", text(&a));

    alice.shutdown()?;
    bob.shutdown()?;
    relay.stop().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match timeout(Duration::from_secs(10), run()).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("did not converge within 10 s"),
    }
}

//! The store at work: create notes, edit them, wait until they are durable, reopen the
//! store and print what is there. Run it twice: the second run finds the first run's notes.
//!
//! `cargo run --release --example store_tour [DATA_DIR]` (default `./sheaf-data-tour`)

use automerge::transaction::Transactable;
use automerge::{ObjType, ReadDoc, ROOT};
use sheafdb::repo::SaveState;
use sheafdb::Repo;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "./sheaf-data-tour".into());

    {
        let repo = Repo::open(&dir)?;
        let before = repo.list()?.len();
        println!("opened {dir}: {before} note(s) stored");

        let note = repo.create().await?;
        note.change(|tx| {
            tx.put(ROOT, "title", format!("note #{}", before + 1))?;
            let body = tx.put_object(ROOT, "body", ObjType::Text)?;
            tx.splice_text(&body, 0, 0, "written offline, saved locally first")?;
            tx.put_object(ROOT, "tags", ObjType::List)?;
            Ok(())
        })?;
        println!("created {} ({:?})", note.url(), *note.save_state().borrow());
        note.saved().await?;
        println!(
            "saved: {:?}",
            *note.save_state().borrow() == SaveState::Saved
        );
        repo.shutdown()?;
    }

    let repo = Repo::open(&dir)?;
    let ids = repo.list()?;
    println!("reopened {dir}: {} note(s)", ids.len());
    for id in ids {
        let h = repo.find(id).await?;
        let (title, body) = h.with_doc(|d| {
            let title = d
                .get(ROOT, "title")
                .ok()
                .flatten()
                .map(|(v, _)| v.to_string());
            let body = d
                .get(ROOT, "body")
                .ok()
                .flatten()
                .and_then(|(_, o)| d.text(&o).ok());
            (title, body)
        });
        println!(
            "  {}  {}  {}",
            h.url(),
            title.unwrap_or_default(),
            body.unwrap_or_default()
        );
    }
    repo.shutdown()?;
    Ok(())
}

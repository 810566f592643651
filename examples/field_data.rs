//! Field data collected offline on two devices, with a schema invariant, merged through a
//! relay.
//!
//! ```sh
//! cargo run --release --example field_data
//! ```
//!
//! A survey note holds a site name and a list of sample records; every record's `id` must be
//! unique and the site is required. Both devices join the survey, lose the network, and
//! record samples: the same sample (`S-002`) ends up recorded on both. Each device refuses
//! a local duplicate right away (a typed error); the duplicate made *across* devices can
//! only show up when they merge, through a relay running in this process. Then each device
//! that merges the two lists repairs it deterministically (the first record in list order is
//! kept), the repair is synced like any change, and both devices end with the same, valid
//! survey. Prints what each device sees and the repair events; ends by itself (or fails
//! after 10 s).

use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{ObjType, ReadDoc, ROOT};
use sheafdb::schema::{FieldDefault, RepairEvent, RequiredField, Schema, UniqueList};
use sheafdb::{DocHandle, Repo, RepoConfig, RepoError};
use tokio::time::timeout;

fn schema() -> Schema {
    Schema::new() // a note's kind is its root field "kind"
        .invariant("survey", UniqueList::by_field("records", "id"))
        .invariant(
            "survey",
            RequiredField::new("site", FieldDefault::Text("unknown site".into())),
        )
}

/// A relay in this process on 127.0.0.1: its URL, and what stops it.
async fn start_relay() -> anyhow::Result<(String, Repo, tokio::sync::oneshot::Sender<()>)> {
    let relay = Repo::temporary(RepoConfig::relay())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let hub = relay.hub();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = sheafdb::relay::run(listener, hub, Default::default(), shutdown).await {
            eprintln!("relay failed: {e}");
        }
    });
    println!("relay: listening on {url}");
    Ok((url, relay, stop))
}

/// Append a sample record `{id, value, device}`. (The error is boxed: `RepoError` is large.)
fn record(h: &DocHandle, device: &str, id: &str, value: f64) -> Result<(), Box<RepoError>> {
    h.change(|tx| {
        let (_, records) = tx.get(ROOT, "records")?.expect("a survey has records");
        let end = tx.length(&records);
        let r = tx.insert_object(&records, end, ObjType::Map)?;
        tx.put(&r, "id", id)?;
        tx.put(&r, "value", value)?;
        tx.put(&r, "device", device)
    })
    .map_err(Box::new)
}

/// The records as `id=value (device)` lines.
fn records(h: &DocHandle) -> Vec<String> {
    let json = h.to_json();
    json["records"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    let id = r["id"].as_str().unwrap_or("?");
                    let device = r["device"].as_str().unwrap_or("?");
                    format!("{id} = {} (from the {device})", r["value"])
                })
                .collect()
        })
        .unwrap_or_default()
}

fn site(h: &DocHandle) -> String {
    h.with_doc(|d| match d.get(ROOT, "site") {
        Ok(Some((_, t))) => d.text(&t).unwrap_or_default(),
        _ => String::new(),
    })
}

fn show(device: &str, h: &DocHandle) {
    println!("{device}: site {:?}, records:", site(h));
    for r in records(h) {
        println!("{device}:   {r}");
    }
}

fn print_repair(device: &str, e: &RepairEvent) {
    match &e.outcome {
        Ok(change) => println!(
            "{device}: repaired `{}` of the {} note ({}) with change {}",
            e.invariant,
            e.kind,
            e.violation,
            &change.to_string()[..12]
        ),
        Err(err) => println!("{device}: could not repair `{}`: {err}", e.invariant),
    }
}

async fn run() -> anyhow::Result<()> {
    let (url, relay, stop_relay) = start_relay().await?;
    let config = || RepoConfig {
        schema: schema(),
        ..RepoConfig::default()
    };
    let tablet = Repo::temporary(config())?;
    let phone = Repo::temporary(config())?;

    // Online: the tablet sets up the survey, the phone joins it.
    let tablet_link = tablet.connection(&url)?;
    let phone_link = phone.connection(&url)?;
    let survey = tablet.create().await?;
    survey.change(|tx| {
        tx.put(ROOT, "kind", "survey")?;
        let s = tx.put_object(ROOT, "site", ObjType::Text)?;
        tx.splice_text(&s, 0, 0, "North plot")?;
        tx.put_object(ROOT, "records", ObjType::List)?;
        Ok(())
    })?;
    let on_phone = phone.find(survey.url()).await?;
    while on_phone.heads() != survey.heads() {
        let _ = timeout(Duration::from_millis(100), on_phone.changes().next()).await;
    }
    println!("phone: joined survey {}", survey.url());

    // Offline in the field.
    tablet_link.disconnect().await;
    phone_link.disconnect().await;
    println!("-- both devices offline --");
    record(&survey, "tablet", "S-001", 14.2)?;
    record(&survey, "tablet", "S-002", 15.1)?;
    record(&on_phone, "phone", "S-002", 15.3)?;
    record(&on_phone, "phone", "S-003", 13.8)?;
    // A duplicate on one device is refused at once, as is dropping the site.
    match record(&survey, "tablet", "S-001", 99.0).map_err(|e| *e) {
        Err(e @ RepoError::Invariant(_)) => println!("tablet: refused: {e}"),
        other => anyhow::bail!("a local duplicate must be refused, got {other:?}"),
    }
    match on_phone.change(|tx| tx.delete(ROOT, "site")) {
        Err(e @ RepoError::Invariant(_)) => println!("phone: refused: {e}"),
        other => anyhow::bail!("deleting the site must be refused, got {other:?}"),
    }
    show("tablet", &survey);
    show("phone", &on_phone);

    // Back in range: both sync through the relay; the merge holds S-002 twice.
    let mut tablet_repairs = tablet.repairs();
    let mut phone_repairs = phone.repairs();
    println!("-- both devices back online --");
    let _tablet_link = tablet.connection(&url)?;
    let _phone_link = phone.connection(&url)?;
    let mut changes = survey.changes();
    let converged = |a: &DocHandle, b: &DocHandle| {
        a.heads() == b.heads() && records(a).iter().filter(|r| r.starts_with("S-002")).count() == 1
    };
    while !converged(&survey, &on_phone) {
        let _ = timeout(Duration::from_millis(100), changes.next()).await;
    }

    // A device publishes its repair event right after the step that made the repair, so
    // the event can trail the converged state by a moment.
    let mut repairs = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        while let Some(e) = tablet_repairs.try_next() {
            print_repair("tablet", &e);
            repairs += 1;
        }
        while let Some(e) = phone_repairs.try_next() {
            print_repair("phone", &e);
            repairs += 1;
        }
        if repairs > 0 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    show("tablet", &survey);
    show("phone", &on_phone);

    // Both devices hold the same, valid survey.
    assert!(
        repairs >= 1,
        "the merge broke the invariant, so someone repaired it"
    );
    assert_eq!(survey.heads(), on_phone.heads());
    assert_eq!(survey.to_json(), on_phone.to_json());
    // (Which S-002 survives depends on where the merge put each device's records: the same
    // on both devices, whichever it is.)
    let mut ids: Vec<String> = survey.to_json()["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    assert_eq!(ids, ["S-001", "S-002", "S-003"]);
    assert_eq!(site(&survey), "North plot");
    println!(
        "converged: {} records, ids unique, {repairs} repair event(s)",
        ids.len()
    );

    tablet.shutdown()?;
    phone.shutdown()?;
    let _ = stop_relay.send(());
    relay.shutdown()?;
    Ok(())
}

/// The whole example, failing if it takes more than 10 s.
async fn run_bounded() -> anyhow::Result<()> {
    match timeout(Duration::from_secs(10), run()).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("did not converge within 10 s"),
    }
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

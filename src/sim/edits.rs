//! Random edits of every kind sheaf documents see: map puts and deletes, list inserts and
//! removes, text splices, counter increments and nested maps.

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, ObjType, ReadDoc, ScalarValue, ROOT};
use rand::Rng;

/// Changes are stamped with time 0 so that, with the actor drawn from the RNG (here) or fixed
/// by the caller, a change's hash depends only on the RNG: runs replay exactly.
fn fixed_time() -> CommitOptions {
    CommitOptions::default().with_time(0)
}

/// A document with a list, a text, a counter and a nested map, as one change.
pub fn seed_document<R: Rng + ?Sized>(rng: &mut R) -> Automerge {
    let mut doc = Automerge::new().with_actor(ActorId::from(rng.gen::<[u8; 16]>()));
    let mut tx = doc.transaction();
    tx.put_object(ROOT, "list", ObjType::List)
        .expect("fresh doc");
    tx.put_object(ROOT, "text", ObjType::Text)
        .expect("fresh doc");
    tx.put(ROOT, "counter", ScalarValue::counter(0))
        .expect("fresh doc");
    let nested = tx
        .put_object(ROOT, "nested", ObjType::Map)
        .expect("fresh doc");
    tx.put(&nested, "seed", rng.gen::<u32>() as i64)
        .expect("fresh doc");
    tx.commit_with(fixed_time());
    doc
}

fn obj(doc: &Automerge, key: &str) -> Option<automerge::ObjId> {
    doc.get(ROOT, key).ok().flatten().map(|(_, id)| id)
}

/// Make one random change; returns a short description for traces.
pub fn random_edit<R: Rng + ?Sized>(doc: &mut Automerge, rng: &mut R) -> String {
    let kind = rng.gen_range(0..7);
    let list = obj(doc, "list");
    let text = obj(doc, "text");
    let nested = obj(doc, "nested");
    let mut tx = doc.transaction();
    let desc = match (kind, list, text, nested) {
        (0, _, _, _) => {
            let k = format!("k{}", rng.gen_range(0..4));
            let v = rng.gen_range(0..1000i64);
            let _ = tx.put(ROOT, k.as_str(), v);
            format!("put {k}={v}")
        }
        (1, _, _, _) => {
            let k = format!("k{}", rng.gen_range(0..4));
            let _ = tx.delete(ROOT, k.as_str());
            format!("delete {k}")
        }
        (2, Some(l), _, _) => {
            let len = tx.length(&l);
            let at = rng.gen_range(0..=len);
            let v = rng.gen_range(0..100i64);
            let _ = tx.insert(&l, at, v);
            format!("list insert {at}={v}")
        }
        (3, Some(l), _, _) => {
            let len = tx.length(&l);
            if len > 0 {
                let at = rng.gen_range(0..len);
                let _ = tx.delete(&l, at);
                format!("list remove {at}")
            } else {
                "list remove (empty)".into()
            }
        }
        (4, _, Some(t), _) => {
            let len = tx.length(&t);
            let at = rng.gen_range(0..=len);
            let del = if at < len {
                rng.gen_range(0..=(len - at).min(3))
            } else {
                0
            };
            let ins: String = (0..rng.gen_range(0..4))
                .map(|_| rng.gen_range(b'a'..=b'z') as char)
                .collect();
            let _ = tx.splice_text(&t, at, del as isize, &ins);
            format!("text splice {at} -{del} +{ins:?}")
        }
        (5, _, _, _) => {
            let by = rng.gen_range(-3..=5i64);
            let _ = tx.increment(ROOT, "counter", by);
            format!("counter += {by}")
        }
        (_, _, _, Some(n)) => {
            let k = format!("n{}", rng.gen_range(0..3));
            if rng.gen_bool(0.3) {
                let inner = tx.put_object(&n, k.as_str(), ObjType::Map);
                if let Ok(inner) = inner {
                    let _ = tx.put(&inner, "x", rng.gen_range(0..10i64));
                }
                format!("nested map {k}")
            } else {
                let _ = tx.put(&n, k.as_str(), rng.gen_range(0..10i64));
                format!("nested put {k}")
            }
        }
        _ => "noop".into(),
    };
    tx.commit_with(fixed_time());
    desc
}

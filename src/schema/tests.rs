//! The schema at the Automerge level: checks, repairs, and repairs made by several replicas
//! at once merging to one valid state.

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ObjType, ReadDoc, ScalarValue, ROOT};

use super::*;

fn schema() -> Schema {
    Schema::new()
        .invariant("task", UniqueList::new("tags"))
        .invariant(
            "task",
            RequiredField::new(["meta", "title"], FieldDefault::Text("untitled".into())),
        )
        .invariant("log", UniqueList::by_field("records", "id"))
}

fn actor(n: u8) -> ActorId {
    ActorId::from(vec![0xa0, n])
}

fn task() -> Automerge {
    let mut doc = Automerge::new().with_actor(actor(0));
    let mut tx = doc.transaction();
    tx.put(ROOT, "kind", "task").unwrap();
    tx.put_object(ROOT, "tags", ObjType::List).unwrap();
    let meta = tx.put_object(ROOT, "meta", ObjType::Map).unwrap();
    let title = tx.put_object(&meta, "title", ObjType::Text).unwrap();
    tx.splice_text(&title, 0, 0, "buy milk").unwrap();
    tx.commit();
    doc
}

fn fork(doc: &Automerge, n: u8) -> Automerge {
    doc.fork().with_actor(actor(n))
}

fn list(doc: &Automerge, key: &str) -> automerge::ObjId {
    doc.get(ROOT, key).unwrap().unwrap().1
}

fn add_tag(doc: &mut Automerge, tag: &str) {
    let tags = list(doc, "tags");
    let mut tx = doc.transaction();
    let end = tx.length(&tags);
    tx.insert(&tags, end, tag).unwrap();
    tx.commit();
}

fn tags(doc: &Automerge) -> Vec<String> {
    let tags = list(doc, "tags");
    (0..doc.length(&tags))
        .map(|i| match doc.get(&tags, i).unwrap().unwrap().0 {
            automerge::Value::Scalar(s) => s.as_str().unwrap_or("?").to_string(),
            _ => "?".into(),
        })
        .collect()
}

fn enforce_at(s: &Schema, doc: &mut Automerge) -> Vec<RepairEvent> {
    let cx = RepairContext {
        doc: DocumentId::from_bytes([7; 16]),
        actor: None,
        time: 0,
    };
    enforce(s, doc, &cx)
}

fn merge_into(a: &mut Automerge, b: &Automerge) {
    a.merge(&mut b.clone()).unwrap();
}

/// What a peer without the schema may do: delete the required `meta.title`.
fn delete_title(doc: &mut Automerge) {
    let meta = list(doc, "meta");
    let mut tx = doc.transaction();
    tx.delete(&meta, "title").unwrap();
    tx.commit();
}

/// Each replica merges what the other had (as of before this call).
fn exchange(a: &mut Automerge, b: &mut Automerge) {
    let (a0, b0) = (a.clone(), b.clone());
    merge_into(a, &b0);
    merge_into(b, &a0);
}

fn json(doc: &Automerge) -> serde_json::Value {
    serde_json::to_value(automerge::AutoSerde::from(doc)).unwrap()
}

#[test]
fn a_valid_note_costs_no_change() {
    let s = schema();
    let mut doc = task();
    let heads = doc.get_heads();
    assert!(enforce_at(&s, &mut doc).is_empty());
    assert_eq!(doc.get_heads(), heads);
    assert!(s.violations_of(&mut doc).is_empty());
}

#[test]
fn notes_of_other_kinds_or_without_a_kind_are_not_checked() {
    let s = schema();
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    let tags = tx.put_object(ROOT, "tags", ObjType::List).unwrap();
    tx.insert(&tags, 0, "x").unwrap();
    tx.insert(&tags, 1, "x").unwrap();
    tx.commit();
    assert!(enforce_at(&s, &mut doc).is_empty());
    let mut tx = doc.transaction();
    tx.put(ROOT, "kind", "shopping").unwrap();
    tx.commit();
    assert!(enforce_at(&s, &mut doc).is_empty());
    // The classifier can be anything the app likes.
    let s2 = Schema::new()
        .kind_key("@type")
        .invariant("shopping", UniqueList::new("tags"));
    assert!(s2.violations_of(&mut doc).is_empty());
    let mut tx = doc.transaction();
    tx.put(ROOT, "@type", "shopping").unwrap();
    tx.commit();
    assert_eq!(s2.violations_of(&mut doc).len(), 1);
}

#[test]
fn two_replicas_adding_the_same_tag_repair_to_one_identical_state() {
    let s = schema();
    let base = task();
    let mut a = fork(&base, 1);
    let mut b = fork(&base, 2);
    add_tag(&mut a, "urgent");
    add_tag(&mut b, "urgent");
    add_tag(&mut b, "home");
    // Each replica merges the other's change and repairs on its own.
    exchange(&mut a, &mut b);
    assert_eq!(tags(&a).iter().filter(|t| *t == "urgent").count(), 2);
    let ea = enforce_at(&s, &mut a);
    let eb = enforce_at(&s, &mut b);
    assert_eq!(ea.len(), 1, "{ea:?}");
    assert_eq!(eb.len(), 1);
    assert!(ea[0].repaired() && eb[0].repaired());
    assert_eq!(ea[0].invariant, "unique tags");
    assert!(
        ea[0].violation.message.contains("\"urgent\" 2 times"),
        "{:?}",
        ea[0]
    );
    // Both deleted the same element: identical content before they even hear of each other.
    assert_eq!(json(&a), json(&b));
    // Their repairs merge to a state that needs no more repair.
    exchange(&mut a, &mut b);
    assert_eq!(a.get_heads(), b.get_heads());
    assert!(enforce_at(&s, &mut a).is_empty());
    let mut t = tags(&a);
    t.sort();
    assert_eq!(t, vec!["home", "urgent"]);
}

#[test]
fn three_replicas_with_repairs_arriving_after_more_duplicates_converge() {
    let s = schema();
    let base = task();
    let mut r: Vec<Automerge> = (1..=3).map(|n| fork(&base, n)).collect();
    for d in r.iter_mut() {
        add_tag(d, "x");
    }
    // 0 and 1 meet and repair; 2 is still away, and adds another "x" meanwhile.
    let r1 = r[1].clone();
    merge_into(&mut r[0], &r1);
    let r0 = r[0].clone();
    merge_into(&mut r[1], &r0);
    assert_eq!(enforce_at(&s, &mut r[0]).len(), 1);
    assert_eq!(enforce_at(&s, &mut r[1]).len(), 1);
    add_tag(&mut r[2], "x");
    // 2 gets 0's repaired state and repairs (its own two plus theirs).
    let r0 = r[0].clone();
    merge_into(&mut r[2], &r0);
    assert_eq!(enforce_at(&s, &mut r[2]).len(), 1);
    // 1 gets 2's state (which holds 0's repair but not 1's): concurrent repairs of
    // overlapping states. Everything meets; at most a bounded number of rounds.
    for _round in 0..4 {
        let all: Vec<Automerge> = r.clone();
        for (i, d) in r.iter_mut().enumerate() {
            for (j, other) in all.iter().enumerate() {
                if i != j {
                    merge_into(d, other);
                }
            }
            enforce_at(&s, d);
        }
    }
    let all: Vec<Automerge> = r.clone();
    for d in r.iter_mut() {
        for o in &all {
            merge_into(d, o);
        }
    }
    assert_eq!(r[0].get_heads(), r[1].get_heads());
    assert_eq!(r[1].get_heads(), r[2].get_heads());
    assert_eq!(tags(&r[0]), vec!["x"]);
    assert!(s.violations_of(&mut r[0]).is_empty());
}

#[test]
fn a_repair_racing_with_a_delete_of_the_kept_tag_never_brings_it_back_twice() {
    let s = schema();
    let base = task();
    let mut a = fork(&base, 1);
    let mut b = fork(&base, 2);
    add_tag(&mut a, "x");
    add_tag(&mut b, "x");
    let bb = b.clone();
    merge_into(&mut a, &bb);
    enforce_at(&s, &mut a);
    // b, having merged too, deletes the tag it sees first (a user edit, not a repair).
    let unrelated = {
        let mut c = fork(&base, 3);
        add_tag(&mut c, "y");
        c
    };
    let aa = a.clone();
    merge_into(&mut b, &aa);
    let tags_b = list(&b, "tags");
    let mut tx = b.transaction();
    tx.delete(&tags_b, 0).unwrap();
    tx.commit();
    merge_into(&mut a, &b);
    merge_into(&mut a, &unrelated);
    assert!(enforce_at(&s, &mut a).is_empty());
    assert!(tags(&a).iter().filter(|t| *t == "x").count() <= 1);
}

#[test]
fn a_required_field_deleted_on_one_side_and_edited_on_the_other_comes_back_once() {
    let s = schema();
    let base = task();
    let mut a = fork(&base, 1);
    let mut b = fork(&base, 2);
    // A peer without the schema deletes the title; another edits it.
    delete_title(&mut a);
    let meta_b = list(&b, "meta");
    let title = b.get(&meta_b, "title").unwrap().unwrap().1;
    let mut tx = b.transaction();
    tx.splice_text(&title, 0, 0, "please ").unwrap();
    tx.commit();
    exchange(&mut a, &mut b);
    let ea = enforce_at(&s, &mut a);
    let eb = enforce_at(&s, &mut b);
    assert_eq!((ea.len(), eb.len()), (1, 1));
    assert_eq!(ea[0].invariant, "required meta.title");
    exchange(&mut a, &mut b);
    assert_eq!(json(&a), json(&b));
    assert_eq!(json(&a)["meta"]["title"], "untitled");
    // Two concurrent recreations conflict on the key: automerge keeps both, picks one.
    let meta = list(&a, "meta");
    assert_eq!(a.get_all(&meta, "title").unwrap().len(), 2);
    assert!(enforce_at(&s, &mut a).is_empty());
}

#[test]
fn a_required_field_overwritten_while_deleted_elsewhere_survives_unrepaired() {
    // The module docs: a new value put at the key survives a concurrent delete.
    let s = schema();
    let base = task();
    let mut a = fork(&base, 1);
    let mut b = fork(&base, 2);
    delete_title(&mut a);
    let meta = list(&b, "meta");
    let mut tx = b.transaction();
    tx.put(&meta, "title", "a new title").unwrap();
    tx.commit();
    let b0 = b.clone();
    merge_into(&mut a, &b0);
    assert!(enforce_at(&s, &mut a).is_empty());
    assert_eq!(json(&a)["meta"]["title"], "a new title");
}

#[test]
fn a_missing_parent_map_is_recreated_with_the_field() {
    let s = schema();
    let mut doc = task();
    let mut tx = doc.transaction();
    tx.delete(ROOT, "meta").unwrap();
    tx.commit();
    let ev = enforce_at(&s, &mut doc);
    assert!(ev[0].repaired());
    assert_eq!(json(&doc)["meta"]["title"], "untitled");
    // The repair change says what it is, for history.
    let hash = ev[0].outcome.clone().unwrap();
    let change = doc.get_change_by_hash(&hash).unwrap();
    assert_eq!(change.message(), Some("repair: required meta.title"));
}

#[test]
fn unique_records_by_field_keep_the_first_in_list_order() {
    let s = schema();
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    tx.put(ROOT, "kind", "log").unwrap();
    let recs = tx.put_object(ROOT, "records", ObjType::List).unwrap();
    for (i, (id, v)) in [("r1", 1), ("r2", 2), ("r1", 3), ("r3", 4), ("r2", 5)]
        .into_iter()
        .enumerate()
    {
        let m = tx.insert_object(&recs, i, ObjType::Map).unwrap();
        tx.put(&m, "id", id).unwrap();
        tx.put(&m, "v", v).unwrap();
    }
    // A record without an id is not compared.
    tx.insert_object(&recs, 5, ObjType::Map).unwrap();
    tx.commit();
    let ev = enforce_at(&s, &mut doc);
    assert_eq!(ev.len(), 1);
    assert!(
        ev[0].violation.message.contains("id = \"r1\" 2 times"),
        "{ev:?}"
    );
    let j = json(&doc);
    let kept: Vec<(String, i64)> = j["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r.get("id").is_some())
        .map(|r| (r["id"].as_str().unwrap().into(), r["v"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        kept,
        vec![("r1".into(), 1), ("r2".into(), 2), ("r3".into(), 4)]
    );
    assert_eq!(j["records"].as_array().unwrap().len(), 4);
}

#[test]
fn values_compare_as_values() {
    let s = Schema::new().invariant("n", UniqueList::new("l"));
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    tx.put(ROOT, "kind", "n").unwrap();
    let l = tx.put_object(ROOT, "l", ObjType::List).unwrap();
    tx.insert(&l, 0, ScalarValue::Int(1)).unwrap();
    tx.insert(&l, 1, ScalarValue::Str("1".into())).unwrap();
    tx.insert(&l, 2, ScalarValue::F64(1.0)).unwrap();
    tx.insert(&l, 3, ScalarValue::Null).unwrap();
    tx.commit();
    assert!(s.violations_of(&mut doc).is_empty());
    let mut tx = doc.transaction();
    tx.insert(&l, 4, ScalarValue::Uint(1)).unwrap();
    let t = tx.insert_object(&l, 5, ObjType::Text).unwrap();
    tx.splice_text(&t, 0, 0, "1").unwrap();
    tx.commit();
    let ev = enforce_at(&s, &mut doc);
    assert!(ev[0].repaired());
    assert_eq!(json(&doc)["l"], serde_json::json!([1, "1", 1.0, null]));
}

struct Broken {
    panic: bool,
}

impl Invariant for Broken {
    fn name(&self) -> &str {
        "always broken"
    }
    fn check(&self, _: &Transaction<'_>) -> Result<(), Violation> {
        Err(Violation::new("never satisfied"))
    }
    fn repair(&self, tx: &mut Transaction<'_>, _: &Violation) -> Result<(), AutomergeError> {
        tx.put(ROOT, "tried", true)?;
        if self.panic {
            panic!("app bug");
        }
        Ok(())
    }
}

#[test]
fn a_repair_that_does_not_restore_or_panics_is_rolled_back_and_reported() {
    for panic in [false, true] {
        let s = Schema::new().invariant("task", Broken { panic });
        let mut doc = task();
        let heads = doc.get_heads();
        let ev = enforce_at(&s, &mut doc);
        assert_eq!(ev.len(), 1);
        let expected = if panic {
            RepairError::Panicked
        } else {
            RepairError::StillViolated(Violation::new("never satisfied"))
        };
        assert_eq!(ev[0].outcome, Err(expected));
        assert_eq!(doc.get_heads(), heads);
        assert!(doc.get(ROOT, "tried").unwrap().is_none());
    }
}

#[test]
fn a_guard_rejects_new_violations_but_not_old_ones() {
    let s = schema().invariant("task", Broken { panic: false });
    let mut doc = task();
    // Already broken (Broken): an unrelated edit passes.
    let mut tx = doc.transaction();
    let guard = s.guard(&tx);
    tx.put(ROOT, "done", true).unwrap();
    assert!(guard.verdict(&s, &tx).is_ok());
    // A duplicate tag is new: refused, with what and why.
    let tags = tx.get(ROOT, "tags").unwrap().unwrap().1;
    tx.insert(&tags, 0, "a").unwrap();
    tx.insert(&tags, 1, "a").unwrap();
    let err = guard.verdict(&s, &tx).unwrap_err();
    assert_eq!(err.kind, "task");
    assert_eq!(err.invariant, "unique tags");
    tx.rollback();
}

#[test]
fn registering_the_same_name_replaces_and_debug_lists_invariants() {
    let s = Schema::new()
        .invariant("a", UniqueList::new("l"))
        .invariant("a", UniqueList::new("m").named("unique l"));
    assert_eq!(s.invariants("a").len(), 1);
    let d = format!("{s:?}");
    assert!(d.contains("unique l") && d.contains("root field"), "{d}");
    assert!(Schema::default().is_empty());
}

//! Convergence under the deterministic simulator: many seeds, faults on, star and mesh.

use sheafdb::sim::{Action, Sim, SimConfig, Topology};

fn run_seed(seed: u64, config: SimConfig) {
    let mut sim = Sim::new(seed, config.clone());
    sim.run();
    let settled = sim.heal_and_settle();
    let converged = settled.and_then(|_| sim.check_converged());
    if let Err(e) = converged {
        let tail: Vec<&String> = sim.trace.iter().rev().take(60).collect();
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
        panic!("seed {seed} ({config:?}) failed: {e}\nreplay: Sim::new({seed}, {config:?})");
    }
}

#[test]
fn star_topology_converges_under_faults() {
    for seed in 0..500 {
        run_seed(
            seed,
            SimConfig {
                topology: Topology::Star,
                ..SimConfig::default()
            },
        );
    }
}

#[test]
fn mesh_topology_converges_under_faults() {
    for seed in 1000..1500 {
        run_seed(
            seed,
            SimConfig {
                topology: Topology::Mesh,
                peers: 4,
                ..SimConfig::default()
            },
        );
    }
}

#[test]
fn many_peers_few_faults_converge() {
    for seed in 5000..5050 {
        run_seed(
            seed,
            SimConfig {
                peers: 6,
                docs: 3,
                steps: 600,
                ..SimConfig::default()
            },
        );
    }
}

// ---- invariants: repairs after merges, made by several peers at once ------------------------

use automerge::transaction::{Transactable, Transaction};
use automerge::{AutomergeError, ObjId, ObjType, ReadDoc, ScalarValue, ROOT};
use sheafdb::schema::{FieldDefault, RequiredField, Schema, UniqueList};
use sheafdb::DocumentId;

/// Every simulated document (a list, a text, a counter, a nested map; no "kind" field) is a
/// "note" whose list holds no value twice and whose text must exist.
fn sim_schema() -> Schema {
    Schema::new()
        .classify_with(|_| Some("note".to_string()))
        .invariant("note", UniqueList::new("list"))
        .invariant(
            "note",
            RequiredField::new("text", FieldDefault::Text(String::new())),
        )
}

/// [`sim_schema`] plus two root keys the simulator's random edits delete now and then.
fn random_schema() -> Schema {
    sim_schema()
        .invariant(
            "note",
            RequiredField::new("k0", FieldDefault::Scalar(ScalarValue::Int(0))),
        )
        .invariant(
            "note",
            RequiredField::new("k1", FieldDefault::Scalar(ScalarValue::Int(1))),
        )
}

fn obj(tx: &Transaction<'_>, key: &str) -> Result<ObjId, AutomergeError> {
    tx.get(ROOT, key)?
        .map(|(_, id)| id)
        .ok_or(AutomergeError::InvalidOp(ObjType::Map))
}

fn append(tx: &mut Transaction<'_>, value: &str) -> Result<(), AutomergeError> {
    let list = obj(tx, "list")?;
    let end = tx.length(&list);
    tx.insert(&list, end, value)
}

/// The list of `doc` on `node`, as JSON.
fn list_json(sim: &Sim, node: usize, doc: &DocumentId) -> Vec<serde_json::Value> {
    let h = &sim.nodes[node].handles[doc];
    let d = h.lock();
    let json = serde_json::to_value(automerge::AutoSerde::from(&**d)).unwrap();
    json["list"].as_array().cloned().unwrap_or_default()
}

/// Cut every pair of nodes apart (peers and relay).
fn partition_all(sim: &mut Sim) {
    let n = sim.nodes.len() as u8;
    for a in 0..n {
        for b in (a + 1)..n {
            sim.apply(&Action::Partition(a, b));
        }
    }
}

fn settle_valid(sim: &mut Sim, what: &str) {
    let r = sim
        .heal_and_settle()
        .and_then(|_| sim.check_converged())
        .and_then(|_| sim.check_invariants());
    if let Err(e) = r {
        for line in sim
            .trace
            .iter()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            eprintln!("{line}");
        }
        panic!("{what}: {e}");
    }
}

/// A simulator whose peers all hold every document, with the schema on.
fn synced_sim(seed: u64, peers: usize, topology: Topology) -> Sim {
    let config = SimConfig {
        peers,
        docs: 1,
        topology,
        steps: 0,
        faults: false,
        ..SimConfig::default()
    };
    let mut sim = Sim::with_schema(seed, config, sim_schema());
    settle_valid(&mut sim, "initial sync");
    sim
}

#[test]
fn peers_adding_the_same_unique_tag_while_partitioned_converge_to_one() {
    for topology in [Topology::Star, Topology::Mesh] {
        for seed in 0..25 {
            // Without, then with random traffic and edits (random list inserts and removes:
            // more duplicates, and deletes of the kept entry) racing with the repairs.
            for racing in [false, true] {
                let what = format!("seed {seed} {topology:?} racing: {racing}");
                let mut sim = synced_sim(seed, 3, topology);
                let doc = sim.docs[0];
                partition_all(&mut sim);
                for p in 0..3 {
                    assert!(sim.edit_with(p, doc, |tx| append(tx, "urgent")), "{what}");
                }
                assert!(sim.edit_with(1, doc, |tx| append(tx, "home")));
                sim.pump(3);
                sim.apply(&Action::Heal);
                if racing {
                    for _ in 0..150 {
                        sim.step();
                    }
                }
                settle_valid(&mut sim, &what);
                for p in 0..3 {
                    let list = list_json(&sim, p, &doc);
                    let urgent = list.iter().filter(|v| *v == "urgent").count();
                    let home = list.iter().filter(|v| *v == "home").count();
                    if racing {
                        // A random edit may have removed them; never twice.
                        assert!(urgent <= 1 && home <= 1, "{what}: p{p} has {list:?}");
                    } else {
                        assert_eq!(list, vec!["urgent", "home"], "{what}: p{p}");
                        assert_eq!((urgent, home), (1, 1), "{what}: p{p} has {list:?}");
                    }
                }
                let repairs: Vec<_> = sim.nodes.iter().flat_map(|n| n.repairs.iter()).collect();
                // (Racing, random removes may have taken the duplicates out before any merge.)
                assert!(racing || !repairs.is_empty(), "{what}: nobody repaired");
                for r in &repairs {
                    assert_eq!(r.doc, doc);
                    assert_eq!(r.invariant, "unique list");
                    assert!(r.repaired(), "{what}: {r:?}");
                }
                assert!(sim
                    .nodes
                    .iter()
                    .filter(|n| n.relay)
                    .all(|n| n.repairs.is_empty()));
            }
        }
    }
}

#[test]
fn repairs_made_by_several_peers_at_once_converge() {
    let mut sim = synced_sim(7, 3, Topology::Mesh);
    let doc = sim.docs[0];
    partition_all(&mut sim);
    for p in 0..3 {
        assert!(sim.edit_with(p, doc, |tx| append(tx, "x")));
    }
    sim.pump(2);
    settle_valid(&mut sim, "three-way duplicate");
    let repairers: Vec<&str> = sim
        .nodes
        .iter()
        .filter(|n| !n.repairs.is_empty())
        .map(|n| n.name.as_str())
        .collect();
    // Every peer saw the merged duplicates and repaired them on its own, concurrently...
    assert!(repairers.len() >= 2, "repairers: {repairers:?}");
    // ... and the concurrent repairs merged to a valid state. A peer repairs once per state
    // it merges (the first two duplicates, then the third when it arrives): never more than
    // twice here, so no ping-pong; the list holds "x" once.
    for n in sim.nodes.iter().filter(|n| !n.relay) {
        assert!(n.repairs.len() <= 2, "{}: {:?}", n.name, n.repairs);
    }
    for p in 0..3 {
        assert_eq!(list_json(&sim, p, &doc), vec![serde_json::json!("x")]);
    }
}

#[test]
fn a_repair_that_arrives_after_more_concurrent_duplicates_is_repaired_again() {
    for seed in 0..10 {
        let what = format!("seed {seed}");
        let mut sim = synced_sim(100 + seed, 3, Topology::Star);
        let doc = sim.docs[0];
        let relay = 3u8;
        // p2 is cut off; p0 and p1 duplicate "x" and repair it between themselves.
        sim.apply(&Action::Partition(2, relay));
        sim.edit_with(0, doc, |tx| append(tx, "x"));
        sim.edit_with(1, doc, |tx| append(tx, "x"));
        sim.pump(30);
        assert_eq!(
            list_json(&sim, 0, &doc),
            vec![serde_json::json!("x")],
            "{what}"
        );
        assert_eq!(list_json(&sim, 0, &doc), list_json(&sim, 1, &doc), "{what}");
        let first_round: usize = sim.nodes.iter().map(|n| n.repairs.len()).sum();
        assert!(first_round >= 1, "{what}");
        // Meanwhile p2 added two more, at the front: the repairs it receives do not cover
        // them, and the occurrence p0/p1 kept is no longer the first.
        sim.edit_with(2, doc, |tx| {
            let l = obj(tx, "list")?;
            tx.insert(&l, 0, "x")?;
            tx.insert(&l, 0, "x")
        });
        settle_valid(&mut sim, &what);
        assert!(sim.nodes[2].repairs.iter().any(|r| r.repaired()), "{what}");
        for p in 0..3 {
            assert_eq!(
                list_json(&sim, p, &doc),
                vec![serde_json::json!("x")],
                "{what}"
            );
        }
    }
}

#[test]
fn a_required_field_deleted_on_one_peer_while_edited_on_another_comes_back() {
    for topology in [Topology::Star, Topology::Mesh] {
        for seed in 0..10 {
            let what = format!("seed {seed} {topology:?}");
            let mut sim = synced_sim(200 + seed, 3, topology);
            let doc = sim.docs[0];
            partition_all(&mut sim);
            // p0 runs an app without the schema (the sim edits the document directly): it
            // deletes the text. p1 types into it meanwhile.
            assert!(sim.edit_with(0, doc, |tx| tx.delete(ROOT, "text")));
            assert!(sim.edit_with(1, doc, |tx| {
                let t = obj(tx, "text")?;
                tx.splice_text(&t, 0, 0, "typed offline")
            }));
            sim.pump(3);
            settle_valid(&mut sim, &what);
            for p in 0..3 {
                assert_eq!(sim.text(p, &doc).as_deref(), Some(""), "{what}: p{p}");
            }
            let repaired: Vec<_> = sim
                .nodes
                .iter()
                .flat_map(|n| n.repairs.iter())
                .filter(|r| r.invariant == "required text")
                .collect();
            assert!(!repaired.is_empty(), "{what}");
            assert!(repaired.iter().all(|r| r.repaired()), "{what}");
        }
    }
}

#[test]
fn random_schedules_with_invariants_converge_to_valid_states() {
    // Random list inserts (values 0..100) duplicate all the time; crashes, drops and
    // partitions race with the repairs.
    let mut repairs = 0;
    for (seed, topology, peers) in (0..120u64)
        .map(|s| (9000 + s, Topology::Star, 3))
        .chain((0..80u64).map(|s| (9500 + s, Topology::Mesh, 4)))
    {
        let config = SimConfig {
            peers,
            docs: 2,
            topology,
            ..SimConfig::default()
        };
        let mut sim = Sim::with_schema(seed, config.clone(), random_schema());
        sim.run();
        settle_valid(&mut sim, &format!("seed {seed} ({config:?})"));
        repairs += sim.nodes.iter().map(|n| n.repairs.len()).sum::<usize>();
        for n in &sim.nodes {
            for r in &n.repairs {
                assert!(r.repaired(), "seed {seed}: {r:?}");
            }
        }
    }
    eprintln!("{repairs} repairs in 200 runs");
    assert!(repairs > 100, "only {repairs} repairs in 200 runs");
}

#[test]
fn the_same_seed_replays_the_same_repairs() {
    let run = || {
        let mut sim = Sim::with_schema(42, SimConfig::default(), sim_schema());
        sim.run();
        sim.heal_and_settle().unwrap();
        let heads: Vec<_> = sim
            .docs
            .clone()
            .iter()
            .map(|d| sim.nodes[0].handles[d].lock().get_heads())
            .collect();
        let repairs: Vec<_> = sim.nodes.iter().map(|n| n.repairs.clone()).collect();
        (heads, repairs)
    };
    assert_eq!(run(), run());
}

#[test]
fn without_a_schema_duplicates_stay() {
    // The same partitioned scenario with no schema: the merge keeps both (what the
    // invariant is for).
    let config = SimConfig {
        peers: 2,
        docs: 1,
        steps: 0,
        faults: false,
        ..SimConfig::default()
    };
    let mut sim = Sim::new(3, config);
    sim.heal_and_settle().unwrap();
    let doc = sim.docs[0];
    partition_all(&mut sim);
    sim.edit_with(0, doc, |tx| append(tx, "x"));
    sim.edit_with(1, doc, |tx| append(tx, "x"));
    sim.heal_and_settle().unwrap();
    sim.check_converged().unwrap();
    assert_eq!(list_json(&sim, 0, &doc).len(), 2);
}

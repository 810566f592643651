//! Convergence under the deterministic simulator: many seeds, faults on, star and mesh.

use sheafdb::sim::{Sim, SimConfig, Topology};

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

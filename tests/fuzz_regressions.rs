//! Replays every minimized fuzz crash (`fuzz/regressions/<target>/`) and every committed seed
//! (`fuzz/corpus-seed/<target>/`) through the same functions the cargo-fuzz targets call
//! (`sheafdb::fuzzing`), so a fixed bug stays fixed without a nightly toolchain.
//!
//! `cargo run --release --example fuzz_seeds` rebuilds the seed corpora from the JS frames
//! in `tests/fixtures/js-frames`, real Automerge sync exchanges and a prefix of the
//! automerge-paper editing trace (`../shared/traces`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use sheafdb::fuzzing;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.file_name().is_none_or(|n| n != "README.md"))
        .collect();
    v.sort();
    v
}

/// Runs `f` over every regression and seed of `target`; fails naming each input that panics.
fn replay(target: &str, f: fn(&[u8]), min_seeds: usize) {
    let regressions = files(&root().join("fuzz/regressions").join(target));
    let seeds = files(&root().join("fuzz/corpus-seed").join(target));
    assert!(
        seeds.len() >= min_seeds,
        "{target}: expected at least {min_seeds} committed seeds, found {}",
        seeds.len()
    );
    let mut failed = Vec::new();
    for path in regressions.iter().chain(&seeds) {
        let data = std::fs::read(path).expect("readable");
        if catch_unwind(AssertUnwindSafe(|| f(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs panic:\n{}",
        failed.len(),
        regressions.len() + seeds.len(),
        failed.join("\n")
    );
}

#[test]
fn wire_decode_regressions_and_seeds() {
    replay("wire_decode", fuzzing::wire_decode, 20);
}

#[test]
fn sync_message_regressions_and_seeds() {
    replay("sync_message", fuzzing::sync_message, 5);
}

#[test]
fn forged_changes_regressions_and_seeds() {
    replay("forged_changes", fuzzing::forged_changes, 10);
}

#[test]
fn store_load_regressions_and_seeds() {
    replay("store_load", fuzzing::store_load, 3);
}

#[test]
fn converge_regressions_and_seeds() {
    replay("converge", fuzzing::converge, 3);
}

#[test]
fn presence_regressions_and_seeds() {
    replay("presence", fuzzing::presence, 5);
}

#[test]
fn converge_invariants_regressions_and_seeds() {
    replay("converge_invariants", fuzzing::converge_invariants, 3);
}

#[test]
fn http_auth_regressions_and_seeds() {
    replay("http_auth", fuzzing::http_auth, 10);
}

/// The `http_auth` harness is not vacuous: a head carrying a token the ring did sign (which
/// no fuzz input can forge) trips its check.
#[test]
fn http_auth_flags_a_head_whose_token_verifies() {
    use sheafdb::auth::{Claims, DocScope};
    let claims = Claims {
        kid: "fuzz".into(),
        sub: String::new(),
        docs: DocScope::All,
        write: true,
        exp: fuzzing::AUTH_NOW + 60,
        nbf: None,
    };
    let token = fuzzing::auth_ring().mint(&claims).unwrap();
    let head = format!("GET /?token={token} HTTP/1.1\r\nHost: relay\r\n\r\n");
    let input = fuzzing::seeds::http_auth(0, head.as_bytes());
    assert!(catch_unwind(AssertUnwindSafe(|| fuzzing::http_auth(&input))).is_err());
}

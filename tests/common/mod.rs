//! Helpers shared by integration tests and benchmarks (`benches/` include this file with
//! `#[path]`): opening the gzipped editing traces in `shared/traces`.
#![allow(dead_code)]

use std::fs::File;
use std::io::Read;

use sheafdb::traces::{self, ConcurrentTrace, SequentialTrace};

/// The path of a trace file, relative to the crate root (`../shared/traces/<name>`).
pub fn trace_path(name: &str) -> String {
    format!("{}/../shared/traces/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Open a gzipped trace for reading (decompressed).
pub fn open_trace(name: &str) -> impl Read {
    let path = trace_path(name);
    let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    flate2::read::GzDecoder::new(file)
}

pub fn sequential(name: &str) -> SequentialTrace {
    traces::parse_sequential(open_trace(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub fn concurrent(name: &str) -> ConcurrentTrace {
    traces::parse_concurrent(open_trace(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

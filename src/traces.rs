//! Editing traces for tests and benchmarks (`shared/traces`, see its README).
//!
//! The traces are gzipped JSON. This module parses the JSON from any reader and builds
//! Automerge documents from it; decompression is left to the caller (the tests and benches
//! wrap the file in `flate2::read::GzDecoder`, a dev-dependency), so the library does not
//! depend on a gzip crate for test data.
//!
//! - Sequential traces: `{startContent, endContent, txns: [{patches: [[pos, del, ins]]}]}`.
//! - The concurrent trace: `{kind: "concurrent", numAgents, endContent,
//!   txns: [{parents, agent, patches}]}`; a txn applies on the merge of its parents.
//!
//! Positions count Unicode code points, which is automerge's default text indexing.

use std::io::Read;

use automerge::transaction::Transactable;
use automerge::{Automerge, AutomergeError, ObjId, ObjType, ReadDoc, ROOT};
use serde::Deserialize;

/// The key of the text object in documents built from traces.
pub const TEXT_KEY: &str = "text";

/// One edit: at `pos` delete `del` code points, then insert `ins`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "(usize, usize, String)")]
pub struct Patch {
    pub pos: usize,
    pub del: usize,
    pub ins: String,
}

impl From<(usize, usize, String)> for Patch {
    fn from((pos, del, ins): (usize, usize, String)) -> Self {
        Self { pos, del, ins }
    }
}

/// A sequential trace: one author, txns applied in order.
#[derive(Debug, Clone)]
pub struct SequentialTrace {
    pub start_content: String,
    pub end_content: String,
    /// Each txn's patches, applied in order.
    pub txns: Vec<Vec<Patch>>,
}

/// One txn of a concurrent trace.
#[derive(Debug, Clone)]
pub struct ConcurrentTxn {
    /// Indices of earlier txns; empty = the empty document.
    pub parents: Vec<usize>,
    pub agent: usize,
    pub patches: Vec<Patch>,
}

/// A concurrent trace: several agents, each txn applied on the merge of its parents.
#[derive(Debug, Clone)]
pub struct ConcurrentTrace {
    pub num_agents: usize,
    pub end_content: String,
    pub txns: Vec<ConcurrentTxn>,
}

/// Either kind of trace.
#[derive(Debug, Clone)]
pub enum Trace {
    Sequential(SequentialTrace),
    Concurrent(ConcurrentTrace),
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("trace JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("expected a {expected} trace")]
    WrongKind { expected: &'static str },
    #[error("txn {txn}: {reason}")]
    Invalid { txn: usize, reason: String },
    #[error("automerge: {0}")]
    Automerge(#[from] AutomergeError),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTrace {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    start_content: String,
    end_content: String,
    #[serde(default)]
    num_agents: Option<usize>,
    txns: Vec<RawTxn>,
}

#[derive(Deserialize)]
struct RawTxn {
    #[serde(default)]
    parents: Vec<usize>,
    #[serde(default)]
    agent: usize,
    patches: Vec<Patch>,
}

/// Parse a trace (uncompressed JSON) of either kind.
pub fn parse(reader: impl Read) -> Result<Trace, TraceError> {
    let raw: RawTrace = serde_json::from_reader(std::io::BufReader::new(reader))?;
    if raw.kind.as_deref() == Some("concurrent") {
        let num_agents = raw.num_agents.unwrap_or(1);
        let txns: Vec<ConcurrentTxn> = raw
            .txns
            .into_iter()
            .map(|t| ConcurrentTxn {
                parents: t.parents,
                agent: t.agent,
                patches: t.patches,
            })
            .collect();
        for (i, t) in txns.iter().enumerate() {
            if t.parents.iter().any(|p| *p >= i) {
                return Err(TraceError::Invalid {
                    txn: i,
                    reason: "a parent is not an earlier txn".into(),
                });
            }
            if t.agent >= num_agents {
                return Err(TraceError::Invalid {
                    txn: i,
                    reason: format!("agent {} >= numAgents {num_agents}", t.agent),
                });
            }
        }
        Ok(Trace::Concurrent(ConcurrentTrace {
            num_agents,
            end_content: raw.end_content,
            txns,
        }))
    } else {
        Ok(Trace::Sequential(SequentialTrace {
            start_content: raw.start_content,
            end_content: raw.end_content,
            txns: raw.txns.into_iter().map(|t| t.patches).collect(),
        }))
    }
}

/// Parse a sequential trace.
pub fn parse_sequential(reader: impl Read) -> Result<SequentialTrace, TraceError> {
    match parse(reader)? {
        Trace::Sequential(t) => Ok(t),
        Trace::Concurrent(_) => Err(TraceError::WrongKind {
            expected: "sequential",
        }),
    }
}

/// Parse a concurrent trace.
pub fn parse_concurrent(reader: impl Read) -> Result<ConcurrentTrace, TraceError> {
    match parse(reader)? {
        Trace::Concurrent(t) => Ok(t),
        Trace::Sequential(_) => Err(TraceError::WrongKind {
            expected: "concurrent",
        }),
    }
}

/// Apply patches to a text object inside a transaction.
pub fn apply_patches<T: Transactable>(
    tx: &mut T,
    text: &ObjId,
    patches: &[Patch],
) -> Result<(), AutomergeError> {
    for p in patches {
        tx.splice_text(text, p.pos, p.del as isize, &p.ins)?;
    }
    Ok(())
}

/// The text object under [`TEXT_KEY`], if there is one.
pub fn text_obj(doc: &Automerge) -> Option<ObjId> {
    match doc.get(ROOT, TEXT_KEY).ok()?? {
        (automerge::Value::Object(ObjType::Text), id) => Some(id),
        _ => None,
    }
}

/// The text under [`TEXT_KEY`] (empty if there is none).
pub fn text(doc: &Automerge) -> String {
    text_obj(doc)
        .and_then(|o| doc.text(&o).ok())
        .unwrap_or_default()
}

/// Build a document from a sequential trace: the text object lives under [`TEXT_KEY`]
/// (created in the first change, with `startContent`), and every `txns_per_change` txns
/// are committed as one change. `1` gives one change per txn (T1, as an editor makes
/// them); `1000` gives T2.
pub fn build_doc(trace: &SequentialTrace, txns_per_change: usize) -> Result<Automerge, TraceError> {
    build_doc_prefix(trace, txns_per_change, trace.txns.len())
}

/// Like [`build_doc`] over the first `n` txns only.
pub fn build_doc_prefix(
    trace: &SequentialTrace,
    txns_per_change: usize,
    n: usize,
) -> Result<Automerge, TraceError> {
    let per = txns_per_change.max(1);
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    let text = tx.put_object(ROOT, TEXT_KEY, ObjType::Text)?;
    if !trace.start_content.is_empty() {
        tx.splice_text(&text, 0, 0, &trace.start_content)?;
    }
    let mut in_tx = 0;
    for (i, patches) in trace.txns.iter().take(n).enumerate() {
        apply_patches(&mut tx, &text, patches).map_err(|e| TraceError::Invalid {
            txn: i,
            reason: e.to_string(),
        })?;
        in_tx += 1;
        if in_tx == per {
            tx.commit();
            tx = doc.transaction();
            in_tx = 0;
        }
    }
    if in_tx > 0 {
        tx.commit();
    } else {
        tx.rollback();
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEQ: &str = r#"{"startContent":"","endContent":"hi!","txns":[
        {"time":"t","patches":[[0,0,"hx"]]},
        {"time":"t","patches":[[1,1,""],[1,0,"i"]]},
        {"time":"t","patches":[[2,0,"!"]]}]}"#;

    #[test]
    fn sequential_trace_builds_the_end_content() {
        let t = parse_sequential(SEQ.as_bytes()).unwrap();
        assert_eq!(t.txns.len(), 3);
        assert_eq!(
            t.txns[1][0],
            Patch {
                pos: 1,
                del: 1,
                ins: String::new()
            }
        );
        for per in [1, 2, 1000] {
            let doc = build_doc(&t, per).unwrap();
            assert_eq!(text(&doc), t.end_content);
            assert_eq!(doc.get_changes(&[]).len(), 3usize.div_ceil(per));
        }
    }

    #[test]
    fn concurrent_trace_is_recognised_and_checked() {
        let ok = r#"{"kind":"concurrent","numAgents":2,"endContent":"ab","txns":[
            {"parents":[],"numChildren":1,"agent":0,"patches":[[0,0,"a"]]},
            {"parents":[0],"agent":1,"patches":[[1,0,"b"]]}]}"#;
        let t = parse_concurrent(ok.as_bytes()).unwrap();
        assert_eq!(t.num_agents, 2);
        assert_eq!(t.txns[1].parents, vec![0]);
        assert!(parse_sequential(ok.as_bytes()).is_err());
        let bad = r#"{"kind":"concurrent","numAgents":1,"endContent":"","txns":[
            {"parents":[0],"agent":0,"patches":[]}]}"#;
        assert!(matches!(
            parse(bad.as_bytes()),
            Err(TraceError::Invalid { txn: 0, .. })
        ));
    }
}

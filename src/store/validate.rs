//! Checking that a payload really is Automerge before it is applied.
//!
//! `Automerge::load_incremental` in 0.12 is lenient on purpose: when a chunk in the middle of
//! the input fails to parse it logs "partial load", applies what came before, and returns
//! `Ok`. That is right for network input and wrong for storage, where a chunk that does not
//! parse must be named and quarantined. So before applying a stored payload we split it into
//! Automerge chunks ourselves (magic, checksum, type, LEB128 length) and parse each one
//! strictly: change chunks with `Change::try_from` (which also checks the change hash),
//! document and bundle chunks with a strict `load_with_options`.
//!
//! The splitter is total: any input returns `Ok` or `Err`, never panics.

use automerge::{Automerge, Change, LoadOptions, OnPartialLoad, VerificationMode};

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const TYPE_DOCUMENT: u8 = 0;
const TYPE_CHANGE: u8 = 1;
const TYPE_COMPRESSED_CHANGE: u8 = 2;
const TYPE_BUNDLE: u8 = 3;

/// Checks that `payload` is a non-empty sequence of valid Automerge chunks.
pub(crate) fn validate(payload: &[u8]) -> Result<(), String> {
    if payload.is_empty() {
        return Err("empty payload".into());
    }
    let mut rest = payload;
    let mut index = 0usize;
    while !rest.is_empty() {
        let (chunk_type, len) = header(rest).map_err(|e| format!("chunk {index}: {e}"))?;
        let (chunk, tail) = rest.split_at(len);
        match chunk_type {
            TYPE_CHANGE | TYPE_COMPRESSED_CHANGE => {
                Change::try_from(chunk).map_err(|e| format!("chunk {index}: {e}"))?;
            }
            TYPE_DOCUMENT | TYPE_BUNDLE => {
                load_strict(chunk).map_err(|e| format!("chunk {index}: {e}"))?;
            }
            other => return Err(format!("chunk {index}: unknown chunk type {other}")),
        }
        rest = tail;
        index += 1;
    }
    Ok(())
}

/// Loads a document, failing on any chunk that does not parse.
pub(crate) fn load_strict(bytes: &[u8]) -> Result<Automerge, automerge::AutomergeError> {
    Automerge::load_with_options(
        bytes,
        LoadOptions::new()
            .on_partial_load(OnPartialLoad::Error)
            .verification_mode(VerificationMode::Check),
    )
}

/// Parses one chunk header; returns the chunk type and the chunk's total length (header
/// included), which is guaranteed to be at most `input.len()`.
fn header(input: &[u8]) -> Result<(u8, usize), String> {
    if input.len() < 9 {
        return Err(format!("truncated header ({} bytes)", input.len()));
    }
    if input[..4] != MAGIC {
        return Err("bad magic bytes".into());
    }
    let chunk_type = input[8];
    let mut len: u64 = 0;
    let mut pos = 9;
    let mut shift = 0u32;
    loop {
        let Some(&b) = input.get(pos) else {
            return Err("truncated length".into());
        };
        pos += 1;
        if shift >= 64 || (shift == 63 && b > 1) {
            return Err("length overflows u64".into());
        }
        len |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let total = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(pos))
        .filter(|&t| t <= input.len())
        .ok_or_else(|| format!("chunk claims {len} bytes, {} available", input.len() - pos))?;
    Ok((chunk_type, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{transaction::Transactable, AutoCommit, ROOT};

    fn doc_with_edits(n: usize) -> AutoCommit {
        let mut d = AutoCommit::new();
        for i in 0..n {
            d.put(ROOT, format!("k{i}"), i as i64).unwrap();
            d.commit();
        }
        d
    }

    #[test]
    fn real_automerge_bytes_validate() {
        let mut d = doc_with_edits(3);
        let changes = d.save_incremental();
        validate(&changes).unwrap();
        validate(&d.save()).unwrap();
        let mut both = d.save();
        d.put(ROOT, "x", 1).unwrap();
        both.extend(d.save_incremental());
        validate(&both).unwrap();
    }

    #[test]
    fn garbage_and_truncation_are_rejected() {
        assert!(validate(b"").is_err());
        assert!(validate(b"not automerge at all").is_err());
        let mut d = doc_with_edits(2);
        let bytes = d.save_incremental();
        assert!(validate(&bytes[..bytes.len() - 1]).is_err());
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(b"junk");
        assert!(validate(&trailing).is_err());
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        assert!(validate(&flipped).is_err());
        // a header claiming a huge length
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&[0, 0, 0, 0, TYPE_CHANGE]);
        huge.extend_from_slice(&[0xff; 10]);
        assert!(validate(&huge).is_err());
    }

    #[test]
    fn load_incremental_alone_would_accept_garbage_after_a_good_chunk() {
        // The reason this module exists: document it with a test that fails if automerge
        // becomes strict (then validate() could be simplified).
        let mut d = doc_with_edits(2);
        let mut bytes = d.save_incremental();
        let mut loaded = Automerge::new();
        loaded.load_incremental(&bytes).unwrap();
        d.put(ROOT, "y", 2).unwrap();
        bytes = d.save_incremental();
        bytes.extend_from_slice(b"garbage garbage garbage");
        assert!(loaded.load_incremental(&bytes).is_ok());
        assert!(validate(&bytes).is_err());
    }
}

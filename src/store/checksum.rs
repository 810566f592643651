//! Value framing: `[blake3(payload): 32][payload]`.
//!
//! sled 0.34 has open reports of corruption after unclean shutdown and no repair tool, so
//! every value we store carries its own checksum. A bad value is detected and named at load
//! time instead of being handed to Automerge (or silently loaded as a different document).

/// Bytes of checksum in front of every payload.
pub(crate) const CHECKSUM_LEN: usize = 32;

/// Why a stored value failed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    TooShort(usize),
    Mismatch,
}

/// Frames `payload` for storage.
pub(crate) fn seal(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(CHECKSUM_LEN + payload.len());
    v.extend_from_slice(blake3::hash(payload).as_bytes());
    v.extend_from_slice(payload);
    v
}

/// Verifies a stored value and returns its payload.
pub(crate) fn open(value: &[u8]) -> Result<&[u8], FrameError> {
    let Some((sum, payload)) = value.split_at_checked(CHECKSUM_LEN) else {
        return Err(FrameError::TooShort(value.len()));
    };
    // blake3::Hash's PartialEq is constant-time; not that it matters here.
    if blake3::hash(payload)
        == blake3::Hash::from_bytes(sum.try_into().map_err(|_| FrameError::Mismatch)?)
    {
        Ok(payload)
    } else {
        Err(FrameError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open_round_trips() {
        assert_eq!(open(&seal(b"hello")), Ok(&b"hello"[..]));
        assert_eq!(open(&seal(b"")), Ok(&b""[..]));
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let v = seal(b"some automerge bytes");
        for i in 0..v.len() {
            let mut bad = v.clone();
            bad[i] ^= 0x10;
            assert_eq!(open(&bad), Err(FrameError::Mismatch), "byte {i}");
        }
        assert_eq!(open(&v[..31]), Err(FrameError::TooShort(31)));
    }
}

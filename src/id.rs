//! Identifiers that cross the wire: document ids, URLs, peer and storage ids.
//!
//! A [`DocumentId`] is 16 random bytes written as a base58check string, exactly as
//! `@automerge/automerge-repo` 2.x writes them, so ids and `automerge:` URLs round-trip
//! between sheaf and JS apps. Peer and storage ids are opaque strings chosen by each peer.

use std::fmt;
use std::str::FromStr;

/// The URL scheme automerge-repo uses for documents.
pub const URL_PREFIX: &str = "automerge:";

/// Why a string is not a document id or URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("document id is not valid base58check: {0}")]
    Base58(String),
    #[error("document id must be 16 bytes, got {0}")]
    Length(usize),
    #[error("not an automerge URL (expected `automerge:<id>`): {0:?}")]
    NotAUrl(String),
    #[error("heads in URL are not valid base58check hashes: {0:?}")]
    BadHeads(String),
    /// A URL with `#heads` names a version of a document; parsing it as a bare
    /// [`DocumentId`] would silently drop the version.
    #[error("{0:?} names heads: parse it as an AutomergeUrl to keep them")]
    HeadsInId(String),
}

/// A document's id: 16 bytes (a UUID), shown as base58check.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocumentId([u8; 16]);

impl DocumentId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// An id from an explicit random source (deterministic tests and the simulator).
    pub fn from_rng<R: rand::Rng + ?Sized>(rng: &mut R) -> Self {
        let mut b = [0u8; 16];
        rng.fill_bytes(&mut b);
        Self(b)
    }

    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// An id from a byte slice (samod also accepts raw ids as CBOR byte strings).
    pub fn try_from_slice(bytes: &[u8]) -> Result<Self, IdError> {
        let arr: [u8; 16] = bytes.try_into().map_err(|_| IdError::Length(bytes.len()))?;
        Ok(Self(arr))
    }

    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The `automerge:<id>` URL of this document.
    pub fn url(&self) -> AutomergeUrl {
        AutomergeUrl {
            id: *self,
            heads: None,
        }
    }
}

impl fmt::Display for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.0).with_check().into_string())
    }
}

impl fmt::Debug for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocumentId({self})")
    }
}

/// A bare id, or an `automerge:<id>` URL without heads (one with heads is an error, not a
/// version silently dropped: see [`AutomergeUrl`]).
impl FromStr for DocumentId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.contains('#') {
            return Err(IdError::HeadsInId(s.to_string()));
        }
        let s = s.strip_prefix(URL_PREFIX).unwrap_or(s);
        let bytes = bs58::decode(s)
            .with_check(None)
            .into_vec()
            .map_err(|e| IdError::Base58(e.to_string()))?;
        Self::try_from_slice(&bytes)
    }
}

/// `automerge:<documentId>` optionally followed by `#<head>|<head>...` (base58check hashes).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct AutomergeUrl {
    pub id: DocumentId,
    pub heads: Option<Vec<automerge::ChangeHash>>,
}

impl AutomergeUrl {
    pub fn new(id: DocumentId) -> Self {
        Self { id, heads: None }
    }
}

impl fmt::Display for AutomergeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{URL_PREFIX}{}", self.id)?;
        if let Some(heads) = &self.heads {
            let enc: Vec<String> = heads.iter().map(encode_head).collect();
            write!(f, "#{}", enc.join("|"))?;
        }
        Ok(())
    }
}

impl fmt::Debug for AutomergeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AutomergeUrl({self})")
    }
}

impl FromStr for AutomergeUrl {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let rest = s
            .strip_prefix(URL_PREFIX)
            .ok_or_else(|| IdError::NotAUrl(s.to_string()))?;
        let (id, heads) = match rest.split_once('#') {
            Some((id, heads)) => (id, Some(heads)),
            None => (rest, None),
        };
        let id: DocumentId = id.parse()?;
        let heads = match heads {
            None => None,
            Some(h) => Some(
                h.split('|')
                    .filter(|p| !p.is_empty())
                    .map(decode_head)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| IdError::BadHeads(h.to_string()))?,
            ),
        };
        Ok(Self { id, heads })
    }
}

impl From<DocumentId> for AutomergeUrl {
    fn from(id: DocumentId) -> Self {
        Self::new(id)
    }
}

/// A change hash as automerge-repo writes heads: base58check of the 32 bytes.
pub fn encode_head(h: &automerge::ChangeHash) -> String {
    bs58::encode(h.0).with_check().into_string()
}

/// Inverse of [`encode_head`].
pub fn decode_head(s: &str) -> Result<automerge::ChangeHash, IdError> {
    let bytes = bs58::decode(s)
        .with_check(None)
        .into_vec()
        .map_err(|e| IdError::Base58(e.to_string()))?;
    let arr: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| IdError::Length(bytes.len()))?;
    Ok(automerge::ChangeHash(arr))
}

/// A peer's id on the wire (any string; sheaf makes `sheaf-<random>`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub String);

impl PeerId {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn random() -> Self {
        Self::from_rng(&mut rand::thread_rng())
    }
    pub fn from_rng<R: rand::Rng + ?Sized>(rng: &mut R) -> Self {
        Self(format!("sheaf-{:016x}", rng.next_u64()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.0)
    }
}

/// The id of a peer's durable storage: sync state is persisted per storage id so that a
/// reconnect after a restart exchanges only the delta.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageId(pub String);

impl StorageId {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn random() -> Self {
        Self::from_rng(&mut rand::thread_rng())
    }
    pub fn from_rng<R: rand::Rng + ?Sized>(rng: &mut R) -> Self {
        let b: [u8; 16] = rng.gen();
        Self(format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_be_bytes([b[4], b[5]]),
            u16::from_be_bytes([b[6], b[7]]),
            u16::from_be_bytes([b[8], b[9]]),
            u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
        ))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StorageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for StorageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorageId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_id_round_trips_through_string_and_url() {
        let id = DocumentId::from_bytes([7; 16]);
        let s = id.to_string();
        assert_eq!(s.parse::<DocumentId>().unwrap(), id);
        let url = id.url().to_string();
        assert!(url.starts_with("automerge:"));
        assert_eq!(url.parse::<AutomergeUrl>().unwrap().id, id);
        assert_eq!(url.parse::<DocumentId>().unwrap(), id);
        // a URL naming a version is not a bare id: the heads are not dropped silently
        let head = automerge::ChangeHash([3; 32]);
        let versioned = AutomergeUrl {
            id,
            heads: Some(vec![head]),
        }
        .to_string();
        assert!(matches!(
            versioned.parse::<DocumentId>(),
            Err(IdError::HeadsInId(_))
        ));
        let back: AutomergeUrl = versioned.parse().unwrap();
        assert_eq!((back.id, back.heads), (id, Some(vec![head])));
    }

    #[test]
    fn bad_ids_are_typed_errors() {
        assert!(matches!(
            "".parse::<DocumentId>(),
            Err(IdError::Base58(_)) | Err(IdError::Length(_))
        ));
        assert!(matches!(
            "0OIl".parse::<DocumentId>(),
            Err(IdError::Base58(_))
        ));
        // valid base58check but wrong length
        let short = bs58::encode([1u8, 2, 3]).with_check().into_string();
        assert_eq!(short.parse::<DocumentId>(), Err(IdError::Length(3)));
        assert!(matches!(
            "http://x".parse::<AutomergeUrl>(),
            Err(IdError::NotAUrl(_))
        ));
        let id = DocumentId::from_bytes([1; 16]);
        assert!(matches!(
            format!("automerge:{id}#nothash").parse::<AutomergeUrl>(),
            Err(IdError::BadHeads(_))
        ));
    }

    #[test]
    fn url_with_heads_round_trips() {
        let id = DocumentId::from_bytes([9; 16]);
        let url = AutomergeUrl {
            id,
            heads: Some(vec![automerge::ChangeHash([3; 32])]),
        };
        let s = url.to_string();
        assert_eq!(s.parse::<AutomergeUrl>().unwrap(), url);
    }
}

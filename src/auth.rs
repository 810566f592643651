//! Capability tokens for the relay: who may read or write which documents.
//!
//! A token is `<payload>.<mac>`, both parts base58 (bitcoin alphabet: URL-safe, no escaping
//! in a `?token=` query). The payload is a compact binary record (see [`Claims`]) that
//! starts with a version byte ([`TOKEN_VERSION`]); the MAC is `blake3::keyed_hash(key,
//! payload)` with the 32-byte key named by the payload's key id. A [`Keyring`] holds several
//! keys at once, so a new key can be added (and used for minting) while tokens made with
//! the old one stay valid until it is removed.
//!
//! Verification never compares raw bytes: the MAC is compared as a [`blake3::Hash`], whose
//! `PartialEq` is constant-time. Decoding is total: anything that is not a well-formed,
//! correctly signed, current token is a typed [`AuthError`].
//!
//! Payload layout (integers big-endian):
//!
//! ```text
//! version u8 (= 1)
//! kid_len u8, kid (UTF-8)
//! sub_len u16, sub (UTF-8)
//! flags u8: bit 0 write, bit 1 all documents, bit 2 has nbf (other bits must be 0)
//! exp u64 (unix seconds)
//! [nbf u64 (unix seconds), if flag bit 2]
//! doc_count u16, doc_count * 16 bytes of document ids (0 when "all documents")
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::id::DocumentId;

/// The first byte of every token payload this version mints and accepts.
pub const TOKEN_VERSION: u8 = 1;
/// Longest token string accepted (bytes); longer ones are `Malformed` without decoding.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Most document ids one token may list (keeps tokens well under URL and header limits).
pub const MAX_TOKEN_DOCS: usize = 256;
/// Environment variable holding `kid hexkey` entries (newline, `,` or `;` separated).
pub const KEYS_ENV: &str = "SHEAF_RELAY_KEYS";

const FLAG_WRITE: u8 = 1;
const FLAG_ALL: u8 = 2;
const FLAG_NBF: u8 = 4;

/// Why a token (or a key) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: pass ?token=... or an Authorization: Bearer header")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("unsupported token version {0}")]
    Version(u8),
    #[error("token signed with unknown key id {0:?}")]
    UnknownKey(String),
    #[error("token signature does not verify")]
    BadMac,
    #[error("token expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("token not valid before {nbf} (now {now})")]
    NotYetValid { nbf: u64, now: u64 },
    #[error("invalid claims: {0}")]
    InvalidClaims(&'static str),
    #[error("bad key: {0}")]
    BadKey(String),
}

impl AuthError {
    /// A short label for metrics (`sheaf_connections_rejected_total{reason="auth_..."}`).
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "auth_missing",
            AuthError::Malformed(_) | AuthError::Version(_) | AuthError::InvalidClaims(_) => {
                "auth_malformed"
            }
            AuthError::UnknownKey(_) => "auth_unknown_key",
            AuthError::BadMac => "auth_bad_mac",
            AuthError::Expired { .. } => "auth_expired",
            AuthError::NotYetValid { .. } => "auth_not_yet_valid",
            AuthError::BadKey(_) => "auth_bad_key",
        }
    }
}

/// Which documents a token (or a connection) covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocScope {
    /// Every document (`*`).
    All,
    /// Only these.
    Docs(BTreeSet<DocumentId>),
}

impl DocScope {
    pub fn covers(&self, doc: &DocumentId) -> bool {
        match self {
            DocScope::All => true,
            DocScope::Docs(d) => d.contains(doc),
        }
    }
}

/// What a token grants. Minted by an app backend, checked by the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Id of the key that signs it (at most 255 bytes).
    pub kid: String,
    /// Who it was issued to (free text for logs, at most 65535 bytes).
    pub sub: String,
    pub docs: DocScope,
    /// May send changes; otherwise read-only.
    pub write: bool,
    /// Expiry, unix seconds (the token is refused from this second on).
    pub exp: u64,
    /// Not valid before, unix seconds.
    pub nbf: Option<u64>,
}

impl Claims {
    /// Claims for `docs`, valid for `ttl_secs` from now.
    pub fn new(kid: impl Into<String>, docs: DocScope, write: bool, ttl_secs: u64) -> Self {
        Self {
            kid: kid.into(),
            sub: String::new(),
            docs,
            write,
            exp: unix_now().saturating_add(ttl_secs),
            nbf: None,
        }
    }

    /// What a connection holding these claims may do.
    pub fn access(&self) -> Access {
        Access {
            docs: self.docs.clone(),
            write: self.write,
            max_docs: None,
        }
    }

    fn encode(&self) -> Result<Vec<u8>, AuthError> {
        let kid = self.kid.as_bytes();
        let sub = self.sub.as_bytes();
        if kid.is_empty() || kid.len() > u8::MAX as usize {
            return Err(AuthError::InvalidClaims("kid must be 1..=255 bytes"));
        }
        if sub.len() > u16::MAX as usize {
            return Err(AuthError::InvalidClaims("sub longer than 65535 bytes"));
        }
        let mut flags = 0u8;
        if self.write {
            flags |= FLAG_WRITE;
        }
        let docs: Vec<&DocumentId> = match &self.docs {
            DocScope::All => {
                flags |= FLAG_ALL;
                Vec::new()
            }
            DocScope::Docs(d) => d.iter().collect(),
        };
        if docs.len() > MAX_TOKEN_DOCS {
            return Err(AuthError::InvalidClaims("more than 256 documents"));
        }
        if self.nbf.is_some() {
            flags |= FLAG_NBF;
        }
        let mut out = Vec::with_capacity(32 + kid.len() + sub.len() + docs.len() * 16);
        out.push(TOKEN_VERSION);
        out.push(kid.len() as u8);
        out.extend_from_slice(kid);
        out.extend_from_slice(&(sub.len() as u16).to_be_bytes());
        out.extend_from_slice(sub);
        out.push(flags);
        out.extend_from_slice(&self.exp.to_be_bytes());
        if let Some(nbf) = self.nbf {
            out.extend_from_slice(&nbf.to_be_bytes());
        }
        out.extend_from_slice(&(docs.len() as u16).to_be_bytes());
        for d in docs {
            out.extend_from_slice(d.as_bytes());
        }
        Ok(out)
    }

    fn decode(bytes: &[u8]) -> Result<Self, AuthError> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if version != TOKEN_VERSION {
            return Err(AuthError::Version(version));
        }
        let kid_len = r.u8()? as usize;
        let kid = r.str(kid_len)?;
        if kid.is_empty() {
            return Err(AuthError::Malformed("empty key id"));
        }
        let sub_len = r.u16()? as usize;
        let sub = r.str(sub_len)?;
        let flags = r.u8()?;
        if flags & !(FLAG_WRITE | FLAG_ALL | FLAG_NBF) != 0 {
            return Err(AuthError::Malformed("unknown flags"));
        }
        let exp = r.u64()?;
        let nbf = if flags & FLAG_NBF != 0 {
            Some(r.u64()?)
        } else {
            None
        };
        let count = r.u16()? as usize;
        if count > MAX_TOKEN_DOCS {
            // What `encode` refuses to mint: nothing verifies that could not be minted again.
            return Err(AuthError::Malformed("more than 256 documents"));
        }
        let docs = if flags & FLAG_ALL != 0 {
            if count != 0 {
                return Err(AuthError::Malformed("documents listed with \"all\""));
            }
            DocScope::All
        } else {
            let mut set = BTreeSet::new();
            for _ in 0..count {
                let raw = r.take(16)?;
                let id = DocumentId::try_from_slice(raw)
                    .map_err(|_| AuthError::Malformed("document id"))?;
                set.insert(id);
            }
            DocScope::Docs(set)
        };
        if !r.0.is_empty() {
            return Err(AuthError::Malformed("trailing bytes"));
        }
        Ok(Self {
            kid,
            sub,
            docs,
            write: flags & FLAG_WRITE != 0,
            exp,
            nbf,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], AuthError> {
        if self.0.len() < n {
            return Err(AuthError::Malformed("truncated payload"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, AuthError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, AuthError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Result<u64, AuthError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn str(&mut self, n: usize) -> Result<String, AuthError> {
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| AuthError::Malformed("invalid UTF-8"))
    }
}

/// What one connection may do, as the engine enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Documents the peer may request, sync and send ephemeral messages for; any other gets
    /// `doc-unavailable`.
    pub docs: DocScope,
    /// Otherwise the peer's changes are ignored (its sync states are read-only).
    pub write: bool,
    /// Distinct documents the peer may sync over this connection; later new ones get
    /// `doc-unavailable`.
    pub max_docs: Option<usize>,
}

impl Access {
    /// Everything, with an optional cap on documents.
    pub fn all(max_docs: Option<usize>) -> Self {
        Self {
            docs: DocScope::All,
            write: true,
            max_docs,
        }
    }
}

/// A 32-byte MAC key. Its `Debug` does not print it.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl Key {
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        Self(k)
    }

    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, AuthError> {
        let s = s.trim().as_bytes();
        if s.len() != 64 {
            return Err(AuthError::BadKey(format!(
                "expected 64 hex digits, got {}",
                s.len()
            )));
        }
        let mut k = [0u8; 32];
        for (i, pair) in s.chunks(2).enumerate() {
            let hi = hex_val(pair[0]);
            let lo = hex_val(pair[1]);
            match (hi, lo) {
                (Some(h), Some(l)) => k[i] = (h << 4) | l,
                _ => return Err(AuthError::BadKey("not hex".into())),
            }
        }
        Ok(Self(k))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub(crate) fn mac(&self, payload: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.0, payload)
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Sign `claims` with `key` (whose id must be `claims.kid`).
pub fn mint(key: &Key, claims: &Claims) -> Result<String, AuthError> {
    let payload = claims.encode()?;
    let mac = key.mac(&payload);
    Ok(format!(
        "{}.{}",
        bs58::encode(&payload).into_string(),
        bs58::encode(mac.as_bytes()).into_string()
    ))
}

/// Keys by id. The last key added is the one [`Keyring::mint`] uses by default.
#[derive(Clone, Default)]
pub struct Keyring {
    keys: Vec<(String, Key)>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Keyring").field("kids", &ids).finish()
    }
}

impl Keyring {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace) a key.
    pub fn insert(&mut self, kid: impl Into<String>, key: Key) {
        let kid = kid.into();
        self.keys.retain(|(k, _)| *k != kid);
        self.keys.push((kid, key));
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn get(&self, kid: &str) -> Option<&Key> {
        self.keys.iter().find(|(k, _)| k == kid).map(|(_, v)| v)
    }

    /// The id of the newest key (the last one added or listed).
    pub fn newest_kid(&self) -> Option<&str> {
        self.keys.last().map(|(k, _)| k.as_str())
    }

    /// Parse `kid hexkey` entries, one per line (or separated by `,` / `;`); blank lines and
    /// lines starting with `#` are skipped.
    pub fn parse(text: &str) -> Result<Self, AuthError> {
        let mut ring = Self::new();
        for (n, entry) in text.split(['\n', ',', ';']).enumerate() {
            let entry = entry.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let mut parts = entry.split_whitespace();
            let (Some(kid), Some(hex), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(AuthError::BadKey(format!(
                    "entry {}: expected `kid hexkey`",
                    n + 1
                )));
            };
            if kid.len() > u8::MAX as usize {
                return Err(AuthError::BadKey(format!("entry {}: kid too long", n + 1)));
            }
            let key = Key::from_hex(hex)
                .map_err(|e| AuthError::BadKey(format!("entry {} ({kid}): {e}", n + 1)))?;
            ring.insert(kid, key);
        }
        Ok(ring)
    }

    /// Read a keys file (see [`Keyring::parse`]).
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AuthError::BadKey(format!("reading {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// Keys from [`KEYS_ENV`], if it is set and not empty.
    pub fn from_env() -> Result<Option<Self>, AuthError> {
        match std::env::var(KEYS_ENV) {
            Ok(v) if !v.trim().is_empty() => Self::parse(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// Sign `claims` with the key named by `claims.kid`.
    pub fn mint(&self, claims: &Claims) -> Result<String, AuthError> {
        let key = self
            .get(&claims.kid)
            .ok_or_else(|| AuthError::UnknownKey(claims.kid.clone()))?;
        mint(key, claims)
    }

    /// Check a token at the current time.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        self.verify_at(token, unix_now())
    }

    /// Check a token at `now` (unix seconds): well-formed, signed by a key we hold, and
    /// current.
    pub fn verify_at(&self, token: &str, now: u64) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed("too long"));
        }
        let (p, m) = token
            .split_once('.')
            .ok_or(AuthError::Malformed("no `.` between payload and MAC"))?;
        let payload = bs58::decode(p)
            .into_vec()
            .map_err(|_| AuthError::Malformed("payload is not base58"))?;
        let mac = bs58::decode(m)
            .into_vec()
            .map_err(|_| AuthError::Malformed("MAC is not base58"))?;
        let mac: [u8; 32] = mac
            .try_into()
            .map_err(|_| AuthError::Malformed("MAC is not 32 bytes"))?;
        let claims = Claims::decode(&payload)?;
        let key = self
            .get(&claims.kid)
            .ok_or_else(|| AuthError::UnknownKey(claims.kid.clone()))?;
        // `blake3::Hash`'s `PartialEq` is constant-time.
        if key.mac(&payload) != blake3::Hash::from_bytes(mac) {
            return Err(AuthError::BadMac);
        }
        if now >= claims.exp {
            return Err(AuthError::Expired {
                exp: claims.exp,
                now,
            });
        }
        if let Some(nbf) = claims.nbf {
            if now < nbf {
                return Err(AuthError::NotYetValid { nbf, now });
            }
        }
        Ok(claims)
    }
}

/// Seconds since the unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parse a duration like `90`, `90s`, `15m`, `1h`, `7d` into seconds.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?}: use e.g. 90s, 15m, 1h, 7d"))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("bad duration {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        let mut r = Keyring::new();
        r.insert("k1", Key::from_bytes([1; 32]));
        r.insert("k2", Key::from_bytes([2; 32]));
        r
    }

    fn claims(kid: &str) -> Claims {
        let mut docs = BTreeSet::new();
        docs.insert(DocumentId::from_bytes([7; 16]));
        Claims {
            kid: kid.into(),
            sub: "alice".into(),
            docs: DocScope::Docs(docs),
            write: false,
            exp: 1_000,
            nbf: Some(100),
        }
    }

    #[test]
    fn round_trip_with_either_key() {
        let r = ring();
        for kid in ["k1", "k2"] {
            let t = r.mint(&claims(kid)).unwrap();
            assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'));
            assert_eq!(r.verify_at(&t, 500).unwrap(), claims(kid));
        }
        let all = Claims {
            docs: DocScope::All,
            write: true,
            nbf: None,
            ..claims("k1")
        };
        assert_eq!(r.verify_at(&r.mint(&all).unwrap(), 0).unwrap(), all);
    }

    #[test]
    fn refusals_are_typed() {
        let r = ring();
        let t = r.mint(&claims("k1")).unwrap();
        assert!(matches!(
            r.verify_at(&t, 1_000),
            Err(AuthError::Expired { .. })
        ));
        assert!(matches!(
            r.verify_at(&t, 99),
            Err(AuthError::NotYetValid { .. })
        ));
        let mut other = Keyring::new();
        other.insert("k9", Key::from_bytes([9; 32]));
        assert_eq!(
            other.verify_at(&t, 500),
            Err(AuthError::UnknownKey("k1".into()))
        );
        // Same kid, different key: a forgery.
        let mut forger = Keyring::new();
        forger.insert("k1", Key::from_bytes([3; 32]));
        let forged = forger.mint(&claims("k1")).unwrap();
        assert_eq!(r.verify_at(&forged, 500), Err(AuthError::BadMac));
        // Changing the payload (write instead of read) breaks the MAC.
        let (_, mac) = t.split_once('.').unwrap();
        let mut c = claims("k1");
        c.write = true;
        let payload = bs58::encode(c.encode().unwrap()).into_string();
        assert_eq!(
            r.verify_at(&format!("{payload}.{mac}"), 500),
            Err(AuthError::BadMac)
        );
        for bad in ["", "x", "a.b", "0OIl.abc", &"1".repeat(MAX_TOKEN_LEN + 1)] {
            assert!(r.verify_at(bad, 500).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_signed_token_listing_more_documents_than_can_be_minted_is_refused() {
        let r = ring();
        let mut c = claims("k1");
        c.docs = DocScope::Docs((0..MAX_TOKEN_DOCS).map(|_| DocumentId::random()).collect());
        let mut payload = c.encode().unwrap();
        assert!(r.mint(&c).is_ok());
        // One more id, and the count raised to match: well-formed, correctly signed.
        let at = payload.len() - MAX_TOKEN_DOCS * 16 - 2;
        payload[at..at + 2].copy_from_slice(&(MAX_TOKEN_DOCS as u16 + 1).to_be_bytes());
        payload.extend_from_slice(DocumentId::random().as_bytes());
        let key = r.get("k1").unwrap();
        let token = format!(
            "{}.{}",
            bs58::encode(&payload).into_string(),
            bs58::encode(key.mac(&payload).as_bytes()).into_string()
        );
        assert!(token.len() <= MAX_TOKEN_LEN);
        assert_eq!(
            r.verify_at(&token, 500),
            Err(AuthError::Malformed("more than 256 documents"))
        );
    }

    #[test]
    fn garbage_never_panics() {
        use rand::{Rng, SeedableRng};
        let r = ring();
        let good = r.mint(&claims("k1")).unwrap();
        let (p, m) = good.split_once('.').unwrap();
        let payload = bs58::decode(p).into_vec().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..2000 {
            let mut bytes = payload.clone();
            let n = rng.gen_range(0..bytes.len());
            match rng.gen_range(0..3) {
                0 => bytes.truncate(n),
                1 => bytes[n] = rng.gen(),
                _ => bytes.push(rng.gen()),
            }
            let t = format!("{}.{m}", bs58::encode(&bytes).into_string());
            assert!(r.verify_at(&t, 500).is_err() || bytes == payload);
        }
    }

    #[test]
    fn keyring_parsing() {
        let hex = "00".repeat(31) + "ff";
        let r = Keyring::parse(&format!(
            "# comment\nold {hex}\n\nnew {}\n",
            "ab".repeat(32)
        ))
        .unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r.newest_kid(), Some("new"));
        assert_eq!(r.get("old").unwrap().to_hex(), hex);
        let r = Keyring::parse(&format!("a {hex}, b {hex}")).unwrap();
        assert_eq!(r.len(), 2);
        assert!(Keyring::parse("a 1234").is_err());
        assert!(Keyring::parse("a").is_err());
        assert!(Keyring::parse(&format!("a {} x", hex)).is_err());
        assert!(Key::from_hex(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("15m"), Ok(900));
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("7d"), Ok(604_800));
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("0").is_err());
    }
}

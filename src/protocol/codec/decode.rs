//! The total decoder. See the parent module for the approach.

use std::borrow::Cow;
use std::collections::BTreeMap;

use minicbor::data::{Tag, Type};
use minicbor::Decoder;

use super::{DecodeError, MAX_DEPTH};
use crate::id::{DocumentId, PeerId, StorageId};
use crate::protocol::{HeadsAt, Message, PeerMetadata, PROTOCOL_VERSION};

/// The CBOR tag cbor-x uses for a `Uint8Array` when `tagUint8Array` is on (RFC 8746).
const TAG_UINT8_ARRAY: u64 = 64;

/// Top-level keys the decoder knows. Everything else is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Type,
    SenderId,
    TargetId,
    DocumentId,
    Data,
    PeerMetadata,
    SupportedProtocolVersions,
    SelectedProtocolVersion,
    SessionId,
    Count,
    Message,
    Add,
    Remove,
    NewHeads,
}

const KEYS: [Key; 14] = [
    Key::Type,
    Key::SenderId,
    Key::TargetId,
    Key::DocumentId,
    Key::Data,
    Key::PeerMetadata,
    Key::SupportedProtocolVersions,
    Key::SelectedProtocolVersion,
    Key::SessionId,
    Key::Count,
    Key::Message,
    Key::Add,
    Key::Remove,
    Key::NewHeads,
];

impl Key {
    fn name(self) -> &'static str {
        match self {
            Key::Type => "type",
            Key::SenderId => "senderId",
            Key::TargetId => "targetId",
            Key::DocumentId => "documentId",
            Key::Data => "data",
            Key::PeerMetadata => "peerMetadata",
            Key::SupportedProtocolVersions => "supportedProtocolVersions",
            Key::SelectedProtocolVersion => "selectedProtocolVersion",
            Key::SessionId => "sessionId",
            Key::Count => "count",
            Key::Message => "message",
            Key::Add => "add",
            Key::Remove => "remove",
            Key::NewHeads => "newHeads",
        }
    }

    fn from_name(s: &str) -> Option<Key> {
        KEYS.iter().copied().find(|k| k.name() == s)
    }
}

/// Decode one protocol message from one WebSocket frame.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let fields = scan(bytes)?;
    let msg_type = match fields.value(Key::Type)? {
        None => return Err(DecodeError::MissingType),
        Some(mut d) => text(&mut d, "type")?,
    };
    let f = Typed {
        fields: &fields,
        msg_type: match known_type(&msg_type) {
            Some(t) => t,
            None => return Err(DecodeError::UnknownType(msg_type.into_owned())),
        },
    };
    Ok(match f.msg_type {
        "join" => Message::Join {
            sender_id: f.peer(Key::SenderId)?,
            peer_metadata: f.peer_metadata()?,
            supported_protocol_versions: match f.opt(Key::SupportedProtocolVersions)? {
                Some(mut d) => text_array(&mut d, "supportedProtocolVersions", 2)?,
                None => vec![PROTOCOL_VERSION.to_string()],
            },
        },
        "peer" => Message::Peer {
            sender_id: f.peer(Key::SenderId)?,
            target_id: f.peer(Key::TargetId)?,
            peer_metadata: f.peer_metadata()?,
            selected_protocol_version: f.string(Key::SelectedProtocolVersion)?,
        },
        "error" => Message::Error {
            sender_id: f.opt_string(Key::SenderId)?.map(PeerId),
            target_id: f.opt_string(Key::TargetId)?.map(PeerId),
            message: f.string(Key::Message)?,
        },
        "sync" => Message::Sync {
            sender_id: f.peer(Key::SenderId)?,
            target_id: f.peer(Key::TargetId)?,
            document_id: f.document_id()?,
            data: f.data()?,
        },
        "request" => Message::Request {
            sender_id: f.peer(Key::SenderId)?,
            target_id: f.peer(Key::TargetId)?,
            document_id: f.document_id()?,
            data: f.data()?,
        },
        "doc-unavailable" => Message::DocUnavailable {
            sender_id: f.peer(Key::SenderId)?,
            target_id: f.peer(Key::TargetId)?,
            document_id: f.document_id()?,
        },
        "ephemeral" => Message::Ephemeral {
            sender_id: f.peer(Key::SenderId)?,
            target_id: f.peer(Key::TargetId)?,
            document_id: f.document_id()?,
            session_id: f.string(Key::SessionId)?,
            count: f.count()?,
            data: f.data()?,
        },
        "remote-subscription-change" => Message::RemoteSubscriptionChange {
            sender_id: f.peer(Key::SenderId)?,
            target_id: f.peer(Key::TargetId)?,
            add: f.storage_ids(Key::Add)?,
            remove: f.storage_ids(Key::Remove)?,
        },
        "remote-heads-changed" => Message::RemoteHeadsChanged {
            sender_id: f.peer(Key::SenderId)?,
            target_id: f.peer(Key::TargetId)?,
            document_id: f.document_id()?,
            new_heads: f.new_heads()?,
        },
        // `known_type` only returns the names matched above.
        other => return Err(DecodeError::UnknownType(other.to_string())),
    })
}

fn known_type(t: &str) -> Option<&'static str> {
    [
        "join",
        "peer",
        "error",
        "sync",
        "request",
        "doc-unavailable",
        "ephemeral",
        "remote-subscription-change",
        "remote-heads-changed",
    ]
    .into_iter()
    .find(|k| *k == t)
}

/// Where each known top-level field's value starts.
struct Fields<'b> {
    input: &'b [u8],
    pos: [Option<usize>; KEYS.len()],
}

impl<'b> Fields<'b> {
    /// A decoder at the field's value, or `None` if the field is absent, `null` or `undefined`.
    fn value(&self, key: Key) -> Result<Option<Decoder<'b>>, DecodeError> {
        let Some(p) = self.pos[key as usize] else {
            return Ok(None);
        };
        let mut d = Decoder::new(self.input);
        d.set_position(p);
        Ok(if is_absent(&d)? { None } else { Some(d) })
    }
}

/// Pass one: walk the top-level map, validate every value's structure (bounded depth), note
/// where known fields start and reject trailing bytes.
fn scan(bytes: &[u8]) -> Result<Fields<'_>, DecodeError> {
    let mut d = Decoder::new(bytes);
    let mut fields = Fields {
        input: bytes,
        pos: [None; KEYS.len()],
    };
    let ty = d.datatype()?;
    if !matches!(ty, Type::Map | Type::MapIndef) {
        return Err(DecodeError::NotAMap {
            found: type_name(ty),
        });
    }
    for_each_entry(&mut d, Some(""), 1, |d| {
        let key = text(d, "")?;
        match Key::from_name(&key) {
            Some(k) => {
                if fields.pos[k as usize].is_some() {
                    return Err(DecodeError::DuplicateField(k.name()));
                }
                fields.pos[k as usize] = Some(d.position());
                skip(d, 2)
            }
            None => skip(d, 2),
        }
    })?;
    let rest = bytes.len() - d.position().min(bytes.len());
    if rest > 0 {
        return Err(DecodeError::TrailingBytes(rest));
    }
    Ok(fields)
}

/// Field access for one message type (so "missing" errors can name the type).
struct Typed<'a, 'b> {
    fields: &'a Fields<'b>,
    msg_type: &'static str,
}

impl<'b> Typed<'_, 'b> {
    fn opt(&self, key: Key) -> Result<Option<Decoder<'b>>, DecodeError> {
        self.fields.value(key)
    }

    fn req(&self, key: Key) -> Result<Decoder<'b>, DecodeError> {
        self.opt(key)?.ok_or(DecodeError::MissingField {
            field: key.name(),
            msg_type: self.msg_type,
        })
    }

    fn string(&self, key: Key) -> Result<String, DecodeError> {
        Ok(text(&mut self.req(key)?, key.name())?.into_owned())
    }

    fn opt_string(&self, key: Key) -> Result<Option<String>, DecodeError> {
        match self.opt(key)? {
            Some(mut d) => Ok(Some(text(&mut d, key.name())?.into_owned())),
            None => Ok(None),
        }
    }

    fn peer(&self, key: Key) -> Result<PeerId, DecodeError> {
        self.string(key).map(PeerId)
    }

    fn document_id(&self) -> Result<DocumentId, DecodeError> {
        let mut d = self.req(Key::DocumentId)?;
        match d.datatype()? {
            Type::String | Type::StringIndef => Ok(text(&mut d, "documentId")?.parse()?),
            _ => match bytes_like(&mut d, "documentId", "base58check text or 16 bytes") {
                Ok(b) => Ok(DocumentId::try_from_slice(&b)?),
                Err(e) => Err(e),
            },
        }
    }

    fn data(&self) -> Result<Vec<u8>, DecodeError> {
        Ok(bytes_like(&mut self.req(Key::Data)?, "data", "bytes")?.into_owned())
    }

    fn count(&self) -> Result<u64, DecodeError> {
        let mut d = self.req(Key::Count)?;
        uint(&mut d, "count")
    }

    fn storage_ids(&self, key: Key) -> Result<Vec<StorageId>, DecodeError> {
        match self.opt(key)? {
            Some(mut d) => Ok(text_array(&mut d, key.name(), 2)?
                .into_iter()
                .map(StorageId)
                .collect()),
            None => Ok(Vec::new()),
        }
    }

    /// `peerMetadata` may be missing, null/undefined, or lack either field.
    fn peer_metadata(&self) -> Result<PeerMetadata, DecodeError> {
        let mut meta = PeerMetadata::default();
        let Some(mut d) = self.opt(Key::PeerMetadata)? else {
            return Ok(meta);
        };
        expect_map(&d, "peerMetadata")?;
        for_each_entry(&mut d, Some("peerMetadata"), 2, |d| {
            let key = text(d, "peerMetadata")?;
            match &*key {
                "storageId" if !is_absent(d)? => {
                    meta.storage_id =
                        Some(StorageId(text(d, "peerMetadata.storageId")?.into_owned()));
                    Ok(())
                }
                "isEphemeral" if !is_absent(d)? => {
                    meta.is_ephemeral = boolean(d, "peerMetadata.isEphemeral")?;
                    Ok(())
                }
                "sheafAcceptsUnchecked" if !is_absent(d)? => {
                    meta.accepts_unchecked = boolean(d, "peerMetadata.sheafAcceptsUnchecked")?;
                    Ok(())
                }
                _ => skip(d, 3),
            }
        })?;
        Ok(meta)
    }

    /// `newHeads: { [storageId]: { heads: string[], timestamp: number } }`.
    fn new_heads(&self) -> Result<BTreeMap<StorageId, HeadsAt>, DecodeError> {
        let mut d = self.req(Key::NewHeads)?;
        expect_map(&d, "newHeads")?;
        let mut out = BTreeMap::new();
        let msg_type = self.msg_type;
        for_each_entry(&mut d, Some("newHeads"), 2, |d| {
            let storage = StorageId(text(d, "newHeads")?.into_owned());
            if is_absent(d)? {
                return skip(d, 3);
            }
            expect_map(d, "newHeads.*")?;
            let mut heads = None;
            let mut timestamp = None;
            for_each_entry(d, Some("newHeads.*"), 3, |d| {
                let key = text(d, "newHeads.*")?;
                match &*key {
                    "heads" if !is_absent(d)? => {
                        heads = Some(text_array(d, "newHeads.*.heads", 4)?);
                        Ok(())
                    }
                    "timestamp" if !is_absent(d)? => {
                        timestamp = Some(number(d, "newHeads.*.timestamp")?);
                        Ok(())
                    }
                    _ => skip(d, 4),
                }
            })?;
            let missing = |field| DecodeError::MissingField { field, msg_type };
            out.insert(
                storage,
                HeadsAt {
                    heads: heads.ok_or_else(|| missing("newHeads.*.heads"))?,
                    timestamp: timestamp.ok_or_else(|| missing("newHeads.*.timestamp"))?,
                },
            );
            Ok(())
        })?;
        Ok(out)
    }
}

// ---- CBOR helpers -------------------------------------------------------------------------

fn is_absent(d: &Decoder<'_>) -> Result<bool, DecodeError> {
    Ok(matches!(d.datatype()?, Type::Null | Type::Undefined))
}

fn wrong(field: &'static str, expected: &'static str, found: Type) -> DecodeError {
    DecodeError::WrongType {
        field,
        expected,
        found: type_name(found),
    }
}

fn expect_map(d: &Decoder<'_>, field: &'static str) -> Result<(), DecodeError> {
    match d.datatype()? {
        Type::Map | Type::MapIndef => Ok(()),
        t => Err(wrong(field, "map", t)),
    }
}

/// Call `entry` once per map entry with the decoder at the entry's key; `entry` must consume
/// the key and the value. Handles definite and indefinite maps. `depth` is the map's own depth.
/// Keys must be text when `field` (the map's name, for errors) is given; the maps inside
/// unknown values (`field == None`) may have keys of any kind.
fn for_each_entry<'b>(
    d: &mut Decoder<'b>,
    field: Option<&'static str>,
    depth: usize,
    mut entry: impl FnMut(&mut Decoder<'b>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    let check_key = |d: &Decoder<'b>| -> Result<(), DecodeError> {
        let Some(field) = field else { return Ok(()) };
        match d.datatype()? {
            Type::String | Type::StringIndef => Ok(()),
            t => Err(DecodeError::NonTextKey {
                field,
                found: type_name(t),
            }),
        }
    };
    match d.map()? {
        Some(n) => {
            // Each entry consumes at least two bytes, so a huge `n` fails fast with
            // `Incomplete` instead of looping.
            for _ in 0..n {
                check_key(d)?;
                entry(d)?;
            }
        }
        None => loop {
            if d.datatype()? == Type::Break {
                d.set_position(d.position() + 1); // the 0xff
                break;
            }
            check_key(d)?;
            entry(d)?;
        },
    }
    Ok(())
}

/// Call `item` once per array element. Handles definite and indefinite arrays.
fn for_each_item<'b>(
    d: &mut Decoder<'b>,
    depth: usize,
    mut item: impl FnMut(&mut Decoder<'b>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    match d.array()? {
        Some(n) => {
            for _ in 0..n {
                item(d)?;
            }
        }
        None => loop {
            if d.datatype()? == Type::Break {
                d.set_position(d.position() + 1);
                break;
            }
            item(d)?;
        },
    }
    Ok(())
}

/// Skip one value of any kind; `depth` is the depth a container here would have.
fn skip(d: &mut Decoder<'_>, depth: usize) -> Result<(), DecodeError> {
    // Tags only prefix a value; loop instead of recursing so a tag chain costs no stack.
    while d.datatype()? == Type::Tag {
        d.tag()?;
    }
    match d.datatype()? {
        Type::Map | Type::MapIndef => for_each_entry(d, None, depth, |d| {
            skip(d, depth + 1)?;
            skip(d, depth + 1)
        }),
        Type::Array | Type::ArrayIndef => for_each_item(d, depth, |d| skip(d, depth + 1)),
        Type::Bytes | Type::BytesIndef => {
            for chunk in d.bytes_iter()? {
                chunk?;
            }
            Ok(())
        }
        Type::String | Type::StringIndef => {
            for chunk in d.str_iter()? {
                chunk?;
            }
            Ok(())
        }
        Type::Break => Err(DecodeError::Malformed(format!(
            "unexpected break at byte {}",
            d.position()
        ))),
        Type::Unknown(b) => Err(DecodeError::Malformed(format!(
            "reserved initial byte {b:#04x} at byte {}",
            d.position()
        ))),
        // Scalars: ints, floats, simple values, bool, null, undefined. minicbor's skip reads
        // exactly one head for these.
        _ => Ok(d.skip()?),
    }
}

/// A text string, definite or indefinite.
fn text<'b>(d: &mut Decoder<'b>, field: &'static str) -> Result<Cow<'b, str>, DecodeError> {
    match d.datatype()? {
        Type::String => Ok(Cow::Borrowed(d.str()?)),
        Type::StringIndef => {
            let mut s = String::new();
            for chunk in d.str_iter()? {
                s.push_str(chunk?);
            }
            Ok(Cow::Owned(s))
        }
        t => Err(wrong(field, "text", t)),
    }
}

/// A byte string, definite or indefinite, optionally wrapped in tag 64 (a cbor-x
/// `Uint8Array` with `tagUint8Array: true`).
fn bytes_like<'b>(
    d: &mut Decoder<'b>,
    field: &'static str,
    expected: &'static str,
) -> Result<Cow<'b, [u8]>, DecodeError> {
    if d.datatype()? == Type::Tag {
        let tag = d.tag()?;
        if tag != Tag::new(TAG_UINT8_ARRAY) {
            return Err(wrong(field, expected, Type::Tag));
        }
    }
    match d.datatype()? {
        Type::Bytes => Ok(Cow::Borrowed(d.bytes()?)),
        Type::BytesIndef => {
            let mut v = Vec::new();
            for chunk in d.bytes_iter()? {
                v.extend_from_slice(chunk?);
            }
            Ok(Cow::Owned(v))
        }
        t => Err(wrong(field, expected, t)),
    }
}

fn boolean(d: &mut Decoder<'_>, field: &'static str) -> Result<bool, DecodeError> {
    match d.datatype()? {
        Type::Bool => Ok(d.bool()?),
        t => Err(wrong(field, "bool", t)),
    }
}

/// An array of text strings. `depth` is the array's own depth.
fn text_array(
    d: &mut Decoder<'_>,
    field: &'static str,
    depth: usize,
) -> Result<Vec<String>, DecodeError> {
    match d.datatype()? {
        Type::Array | Type::ArrayIndef => {}
        t => return Err(wrong(field, "array of text", t)),
    }
    // No `with_capacity` from the length prefix: it is attacker-controlled.
    let mut out = Vec::new();
    for_each_item(d, depth, |d| {
        out.push(text(d, field)?.into_owned());
        Ok(())
    })?;
    Ok(out)
}

/// Any CBOR number as an `f64` (JS numbers). Non-finite values are rejected.
fn number(d: &mut Decoder<'_>, field: &'static str) -> Result<f64, DecodeError> {
    let v = match d.datatype()? {
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => d.u64()? as f64,
        Type::I8 | Type::I16 | Type::I32 | Type::I64 => d.i64()? as f64,
        Type::Int => i128::from(d.int()?) as f64,
        Type::F16 | Type::F32 | Type::F64 => d.f64()?,
        t => return Err(wrong(field, "number", t)),
    };
    if v.is_finite() {
        Ok(v)
    } else {
        Err(DecodeError::InvalidNumber {
            field,
            reason: "not finite",
        })
    }
}

/// A non-negative integer; integral floats (as JS may send) are accepted.
fn uint(d: &mut Decoder<'_>, field: &'static str) -> Result<u64, DecodeError> {
    let invalid = |reason| DecodeError::InvalidNumber { field, reason };
    match d.datatype()? {
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => Ok(d.u64()?),
        Type::I8 | Type::I16 | Type::I32 | Type::I64 | Type::Int => {
            d.int()?;
            Err(invalid("negative"))
        }
        Type::F16 | Type::F32 | Type::F64 => {
            let f = d.f64()?;
            if f.is_nan() {
                Err(invalid("NaN"))
            } else if f < 0.0 {
                Err(invalid("negative"))
            } else if f.is_infinite() || f >= 18_446_744_073_709_551_616.0 {
                Err(invalid("too large"))
            } else if f.fract() != 0.0 {
                Err(invalid("not an integer"))
            } else {
                Ok(f as u64)
            }
        }
        t => Err(wrong(field, "unsigned integer", t)),
    }
}

/// A short name for a CBOR type, for error messages.
pub(super) fn type_name(t: Type) -> &'static str {
    match t {
        Type::Bool => "bool",
        Type::Null => "null",
        Type::Undefined => "undefined",
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => "unsigned integer",
        Type::I8 | Type::I16 | Type::I32 | Type::I64 | Type::Int => "integer",
        Type::F16 | Type::F32 | Type::F64 => "float",
        Type::Simple => "simple value",
        Type::Bytes | Type::BytesIndef => "bytes",
        Type::String | Type::StringIndef => "text",
        Type::Array | Type::ArrayIndef => "array",
        Type::Map | Type::MapIndef => "map",
        Type::Tag => "tag",
        Type::Break => "break",
        _ => "reserved byte",
    }
}

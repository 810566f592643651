//! CBOR codec for [`Message`](super::Message), as `@automerge/automerge-repo` 2.x frames it.
//!
//! - [`decode`] is total: any bytes give a message or a typed [`DecodeError`]; it never
//!   panics, never allocates more than the input's size, and bounds the nesting depth of the
//!   values it skips. It tolerates what cbor-x peers really send: CBOR `undefined`/`null` for
//!   absent optionals, floats where integers are meant, unknown keys (any value), indefinite
//!   lengths, document ids as base58check text or 16 raw bytes, `data` as plain or tag-64 bytes.
//! - [`encode`] writes what JS cbor-x (`useRecords: false, tagUint8Array: false`) writes: one
//!   definite-length map with text keys and the JS field names, absent optionals omitted.
//!
//! Decoding is two passes over one map: the first walks every entry (so a truncated frame is
//! always [`DecodeError::Incomplete`], whatever it contains) and remembers where each known
//! field's value starts; the second reads the fields the message `type` needs.

mod decode;
mod encode;

pub use decode::decode;
pub use encode::encode;

use crate::id::IdError;

/// How deep values may nest (maps, arrays; the top-level map counts as one). JS messages
/// nest at most three deep (`newHeads` -> storage id -> `heads`); anything deeper is junk.
pub const MAX_DEPTH: usize = 16;

/// Why bytes are not a protocol message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ends in the middle of a CBOR value (or is empty).
    #[error("incomplete message")]
    Incomplete,
    /// The bytes are not well-formed CBOR (reserved bytes, bad UTF-8, a stray break...).
    #[error("malformed CBOR: {0}")]
    Malformed(String),
    /// The top-level value is not a CBOR map.
    #[error("message is not a CBOR map (found {found})")]
    NotAMap { found: &'static str },
    /// A map key is not a text string (`field` names the map; "" is the top level).
    #[error("non-text key in map `{field}` (found {found})")]
    NonTextKey {
        field: &'static str,
        found: &'static str,
    },
    /// A known top-level key appears twice.
    #[error("duplicate field `{0}`")]
    DuplicateField(&'static str),
    /// No `type` field (or `type` is null/undefined).
    #[error("missing field `type`")]
    MissingType,
    /// The `type` is not one automerge-repo 2.x defines.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A field the message type requires is absent (or null/undefined).
    #[error("missing field `{field}` for message type `{msg_type}`")]
    MissingField {
        field: &'static str,
        msg_type: &'static str,
    },
    /// A field holds a CBOR value of the wrong kind.
    #[error("field `{field}`: expected {expected}, found {found}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    /// A number is out of range: negative, NaN, infinite or non-integral where an
    /// integer is meant.
    #[error("field `{field}`: invalid number ({reason})")]
    InvalidNumber {
        field: &'static str,
        reason: &'static str,
    },
    /// `documentId` is neither base58check of 16 bytes nor 16 raw bytes.
    #[error("bad document id: {0}")]
    BadDocumentId(#[from] IdError),
    /// Bytes follow the message's map.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// Values nest deeper than [`MAX_DEPTH`].
    #[error("values nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

impl From<minicbor::decode::Error> for DecodeError {
    fn from(e: minicbor::decode::Error) -> Self {
        if e.is_end_of_input() {
            DecodeError::Incomplete
        } else {
            DecodeError::Malformed(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use minicbor::data::Tag;
    use minicbor::Encoder;
    use proptest::prelude::*;

    use super::*;
    use crate::id::{DocumentId, PeerId, StorageId};
    use crate::protocol::{HeadsAt, Message, PeerMetadata};

    fn doc() -> DocumentId {
        DocumentId::from_bytes([0x2a; 16])
    }
    fn p(s: &str) -> PeerId {
        PeerId::new(s)
    }

    fn samples() -> Vec<Message> {
        let mut heads = BTreeMap::new();
        heads.insert(
            StorageId::new("s1"),
            HeadsAt {
                heads: vec!["2DrjgbFdhvpmvSdfnNKn3x7ZqVKQwvGKrUTkGrn8B9Rk".into()],
                timestamp: 1_700_000_000_123.0,
            },
        );
        heads.insert(
            StorageId::new("s2"),
            HeadsAt {
                heads: vec![],
                timestamp: 0.5,
            },
        );
        vec![
            Message::Join {
                sender_id: p("client"),
                peer_metadata: PeerMetadata {
                    storage_id: Some(StorageId::new("st")),
                    is_ephemeral: false,
                    accepts_unchecked: false,
                },
                supported_protocol_versions: vec!["1".into()],
            },
            Message::Peer {
                sender_id: p("server"),
                target_id: p("client"),
                peer_metadata: PeerMetadata::default(),
                selected_protocol_version: "1".into(),
            },
            Message::Error {
                sender_id: Some(p("server")),
                target_id: Some(p("client")),
                message: "unsupported protocol version".into(),
            },
            Message::Error {
                sender_id: None,
                target_id: None,
                message: String::new(),
            },
            Message::Sync {
                sender_id: p("a"),
                target_id: p("b"),
                document_id: doc(),
                data: vec![0x42, 1, 2, 3],
            },
            Message::Request {
                sender_id: p("a"),
                target_id: p("b"),
                document_id: doc(),
                data: vec![0x42],
            },
            Message::DocUnavailable {
                sender_id: p("a"),
                target_id: p("b"),
                document_id: doc(),
            },
            Message::Ephemeral {
                sender_id: p("a"),
                target_id: p("b"),
                document_id: doc(),
                session_id: "k3j4h5".into(),
                count: 7,
                data: vec![0xa0],
            },
            Message::RemoteSubscriptionChange {
                sender_id: p("a"),
                target_id: p("b"),
                add: vec![StorageId::new("x"), StorageId::new("y")],
                remove: vec![],
            },
            Message::RemoteSubscriptionChange {
                sender_id: p("a"),
                target_id: p("b"),
                add: vec![],
                remove: vec![StorageId::new("z")],
            },
            Message::RemoteHeadsChanged {
                sender_id: p("a"),
                target_id: p("b"),
                document_id: doc(),
                new_heads: heads,
            },
        ]
    }

    #[test]
    fn every_variant_round_trips() {
        for m in samples() {
            let bytes = encode(&m);
            assert_eq!(decode(&bytes), Ok(m.clone()), "{m:?}");
        }
    }

    #[test]
    fn every_strict_prefix_is_incomplete() {
        for m in samples() {
            let bytes = encode(&m);
            for n in 0..bytes.len() {
                assert_eq!(
                    decode(&bytes[..n]),
                    Err(DecodeError::Incomplete),
                    "{m:?} cut at {n}"
                );
            }
        }
    }

    #[test]
    fn encode_writes_js_field_names_and_omits_absent_optionals() {
        let bytes = encode(&Message::Error {
            sender_id: None,
            target_id: Some(p("t")),
            message: "m".into(),
        });
        // {"type":"error","message":"m","targetId":"t"}: definite map of 3, no null/undefined.
        assert_eq!(bytes[0], 0xa3);
        assert!(!bytes.contains(&0xf6) && !bytes.contains(&0xf7));
        let join = encode(&samples()[0]);
        for key in ["senderId", "peerMetadata", "storageId", "isEphemeral"] {
            assert!(
                join.windows(key.len()).any(|w| w == key.as_bytes()),
                "{key}"
            );
        }
        let sync = encode(&samples()[4]);
        let id = doc().to_string();
        assert!(sync.windows(id.len()).any(|w| w == id.as_bytes()));
    }

    #[test]
    fn numbers_are_written_as_cbor_x_writes_js_numbers() {
        // cbor-x writes numbers beyond 32 bits as float64 and decodes CBOR u64 as BigInt.
        let mut heads = BTreeMap::new();
        heads.insert(
            StorageId::new("s"),
            HeadsAt {
                heads: vec![],
                timestamp: 1_795_614_297_454.0,
            },
        );
        let bytes = encode(&Message::RemoteHeadsChanged {
            sender_id: p("a"),
            target_id: p("b"),
            document_id: doc(),
            new_heads: heads,
        });
        let ts = 1_795_614_297_454f64.to_be_bytes();
        assert!(bytes.windows(9).any(|w| w[0] == 0xfb && w[1..] == ts));
        let eph = |count| {
            encode(&Message::Ephemeral {
                sender_id: p("a"),
                target_id: p("b"),
                document_id: doc(),
                session_id: "s".into(),
                count,
                data: vec![],
            })
        };
        let after_count = |b: Vec<u8>| {
            let i = b.windows(6).position(|w| w == b"\x65count").unwrap();
            b[i + 6]
        };
        assert_eq!(after_count(eph(7)), 0x07);
        assert_eq!(after_count(eph(1 << 40)), 0xfb);
        assert_eq!(after_count(eph(u64::MAX)), 0x1b);
    }

    // ---- hand-built CBOR ---------------------------------------------------------------

    /// Build a frame with a minicbor encoder.
    fn cbor(
        f: impl FnOnce(
            &mut Encoder<Vec<u8>>,
        ) -> Result<(), minicbor::encode::Error<core::convert::Infallible>>,
    ) -> Vec<u8> {
        let mut e = Encoder::new(Vec::new());
        f(&mut e).unwrap();
        e.into_writer()
    }

    fn sync_with(
        extra: usize,
        f: impl FnOnce(
            &mut Encoder<Vec<u8>>,
        ) -> Result<(), minicbor::encode::Error<core::convert::Infallible>>,
    ) -> Vec<u8> {
        cbor(|e| {
            e.map(5 + extra as u64)?;
            e.str("type")?.str("sync")?;
            e.str("senderId")?.str("a")?;
            e.str("targetId")?.str("b")?;
            e.str("documentId")?.str(&doc().to_string())?;
            e.str("data")?.bytes(&[1, 2])?;
            f(e)
        })
    }

    fn expect_sync() -> Message {
        Message::Sync {
            sender_id: p("a"),
            target_id: p("b"),
            document_id: doc(),
            data: vec![1, 2],
        }
    }

    #[test]
    fn undefined_and_null_optionals_are_absent() {
        // What a JS repo without storage sends: peerMetadata {storageId: undefined, ...}.
        let bytes = cbor(|e| {
            e.map(4)?;
            e.str("type")?.str("join")?;
            e.str("senderId")?.str("c")?;
            e.str("peerMetadata")?.map(2)?;
            e.str("storageId")?.undefined()?;
            e.str("isEphemeral")?.null()?;
            e.str("supportedProtocolVersions")?.undefined()?;
            Ok(())
        });
        assert_eq!(
            decode(&bytes),
            Ok(Message::Join {
                sender_id: p("c"),
                peer_metadata: PeerMetadata::default(),
                supported_protocol_versions: vec!["1".into()],
            })
        );
        // Error with undefined sender, null target.
        let bytes = cbor(|e| {
            e.map(4)?;
            e.str("type")?.str("error")?;
            e.str("senderId")?.undefined()?;
            e.str("targetId")?.null()?;
            e.str("message")?.str("boom")?;
            Ok(())
        });
        assert_eq!(
            decode(&bytes),
            Ok(Message::Error {
                sender_id: None,
                target_id: None,
                message: "boom".into()
            })
        );
        // A required field set to undefined is missing.
        let bytes = cbor(|e| {
            e.map(4)?;
            e.str("type")?.str("doc-unavailable")?;
            e.str("senderId")?.str("a")?;
            e.str("targetId")?.str("b")?;
            e.str("documentId")?.undefined()?;
            Ok(())
        });
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::MissingField {
                field: "documentId",
                msg_type: "doc-unavailable"
            })
        );
    }

    #[test]
    fn missing_or_partial_peer_metadata_and_versions() {
        let bytes = cbor(|e| {
            e.map(2)?;
            e.str("type")?.str("join")?;
            e.str("senderId")?.str("c")?;
            Ok(())
        });
        assert_eq!(
            decode(&bytes),
            Ok(Message::Join {
                sender_id: p("c"),
                peer_metadata: PeerMetadata::default(),
                supported_protocol_versions: vec!["1".into()],
            })
        );
        let bytes = cbor(|e| {
            e.map(5)?;
            e.str("type")?.str("peer")?;
            e.str("senderId")?.str("s")?;
            e.str("targetId")?.str("c")?;
            e.str("selectedProtocolVersion")?.str("1")?;
            e.str("peerMetadata")?.map(2)?;
            e.str("isEphemeral")?.bool(true)?;
            e.str("futureField")?.array(1)?.u8(1)?;
            Ok(())
        });
        assert_eq!(
            decode(&bytes),
            Ok(Message::Peer {
                sender_id: p("s"),
                target_id: p("c"),
                peer_metadata: PeerMetadata {
                    storage_id: None,
                    is_ephemeral: true,
                    accepts_unchecked: false,
                },
                selected_protocol_version: "1".into(),
            })
        );
        // Versions offered without "1" decode as offered (the engine answers with `error`).
        let bytes = cbor(|e| {
            e.map(3)?;
            e.str("type")?.str("join")?;
            e.str("senderId")?.str("c")?;
            e.str("supportedProtocolVersions")?
                .begin_array()?
                .str("2")?
                .end()?;
            Ok(())
        });
        match decode(&bytes) {
            Ok(Message::Join {
                supported_protocol_versions,
                ..
            }) => assert_eq!(supported_protocol_versions, vec!["2".to_string()]),
            other => panic!("{other:?}"),
        }
    }

    fn ephemeral_count(
        f: impl FnOnce(
            &mut Encoder<Vec<u8>>,
        ) -> Result<(), minicbor::encode::Error<core::convert::Infallible>>,
    ) -> Result<Message, DecodeError> {
        let bytes = cbor(|e| {
            e.map(7)?;
            e.str("type")?.str("ephemeral")?;
            e.str("senderId")?.str("a")?;
            e.str("targetId")?.str("b")?;
            e.str("documentId")?.str(&doc().to_string())?;
            e.str("sessionId")?.str("s")?;
            e.str("data")?.bytes(&[0xa0])?;
            e.str("count")?;
            f(e)
        });
        decode(&bytes)
    }

    #[test]
    fn count_accepts_integral_floats_and_rejects_the_rest() {
        let count = |r: Result<Message, DecodeError>| match r {
            Ok(Message::Ephemeral { count, .. }) => Ok(count),
            Ok(m) => panic!("{m:?}"),
            Err(e) => Err(e),
        };
        assert_eq!(count(ephemeral_count(|e| e.u8(3).map(drop))), Ok(3));
        assert_eq!(count(ephemeral_count(|e| e.f64(12.0).map(drop))), Ok(12));
        assert_eq!(count(ephemeral_count(|e| e.f32(5.0).map(drop))), Ok(5));
        assert_eq!(
            count(ephemeral_count(|e| e.f16(2.0).map(drop))),
            Ok(2),
            "half floats too"
        );
        assert_eq!(
            count(ephemeral_count(|e| e.u64(u64::MAX).map(drop))),
            Ok(u64::MAX)
        );
        let bad = |reason| {
            Err(DecodeError::InvalidNumber {
                field: "count",
                reason,
            })
        };
        assert_eq!(
            count(ephemeral_count(|e| e.f64(1.5).map(drop))),
            bad("not an integer")
        );
        assert_eq!(
            count(ephemeral_count(|e| e.f64(-1.0).map(drop))),
            bad("negative")
        );
        assert_eq!(
            count(ephemeral_count(|e| e.i8(-1).map(drop))),
            bad("negative")
        );
        assert_eq!(
            count(ephemeral_count(|e| e.f64(f64::NAN).map(drop))),
            bad("NaN")
        );
        assert_eq!(
            count(ephemeral_count(|e| e.f64(f64::INFINITY).map(drop))),
            bad("too large")
        );
        assert_eq!(
            count(ephemeral_count(|e| e.f64(1e20).map(drop))),
            bad("too large")
        );
        assert_eq!(
            count(ephemeral_count(|e| e.str("1").map(drop))),
            Err(DecodeError::WrongType {
                field: "count",
                expected: "unsigned integer",
                found: "text"
            })
        );
    }

    #[test]
    fn timestamps_may_be_ints_or_floats() {
        for (write, want) in [
            (0u8, 1_700_000_000_000.0),
            (1, 1_700_000_000_000.5),
            (2, 12.0),
        ] {
            let bytes = cbor(|e| {
                e.map(5)?;
                e.str("type")?.str("remote-heads-changed")?;
                e.str("senderId")?.str("a")?;
                e.str("targetId")?.str("b")?;
                e.str("documentId")?.str(&doc().to_string())?;
                e.str("newHeads")?.map(1)?.str("st")?.map(2)?;
                e.str("timestamp")?;
                match write {
                    0 => e.u64(1_700_000_000_000)?,
                    1 => e.f64(1_700_000_000_000.5)?,
                    _ => e.f32(12.0)?,
                };
                e.str("heads")?.array(0)?;
                Ok(())
            });
            match decode(&bytes) {
                Ok(Message::RemoteHeadsChanged { new_heads, .. }) => {
                    assert_eq!(new_heads[&StorageId::new("st")].timestamp, want)
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn unknown_keys_with_any_value_are_skipped() {
        let bytes = sync_with(4, |e| {
            e.str("nested")?.map(2)?;
            e.str("a")?.array(3)?.u8(1)?.str("x")?.begin_map()?;
            e.str("deep")?
                .begin_array()?
                .bytes(&[1])?
                .null()?
                .end()?
                .end()?;
            e.str("b")?.tag(Tag::new(1))?.f64(1.5)?;
            e.str("big")?.i64(-1_000_000)?;
            e.str("tagged")?
                .tag(Tag::new(64))?
                .tag(Tag::new(99))?
                .bytes(&[9; 3])?;
            e.str("undef")?
                .map(2)?
                .u8(1)?
                .undefined()?
                .bytes(b"k")?
                .f16(0.5)?;
            Ok(())
        });
        assert_eq!(decode(&bytes), Ok(expect_sync()));
        // Unknown key order does not matter: put one before `type`.
        let bytes = cbor(|e| {
            e.map(6)?;
            e.str("zzz")?.simple(99)?;
            e.str("type")?.str("sync")?;
            e.str("senderId")?.str("a")?;
            e.str("targetId")?.str("b")?;
            e.str("documentId")?.str(&doc().to_string())?;
            e.str("data")?.bytes(&[1, 2])?;
            Ok(())
        });
        assert_eq!(decode(&bytes), Ok(expect_sync()));
    }

    #[test]
    fn document_id_as_raw_bytes_and_data_as_tagged_bytes() {
        let bytes = cbor(|e| {
            e.map(5)?;
            e.str("type")?.str("sync")?;
            e.str("senderId")?.str("a")?;
            e.str("targetId")?.str("b")?;
            e.str("documentId")?.bytes(doc().as_bytes())?;
            e.str("data")?.tag(Tag::new(64))?.bytes(&[1, 2])?;
            Ok(())
        });
        assert_eq!(decode(&bytes), Ok(expect_sync()));
        // A URL-shaped id is accepted too (the id parser strips `automerge:`).
        let bytes = cbor(|e| {
            e.map(4)?;
            e.str("type")?.str("doc-unavailable")?;
            e.str("senderId")?.str("a")?;
            e.str("targetId")?.str("b")?;
            e.str("documentId")?.str(&doc().url().to_string())?;
            Ok(())
        });
        assert_eq!(decode(&bytes).map(|m| m.document_id()), Ok(Some(doc())));
    }

    #[test]
    fn indefinite_lengths_decode() {
        let id = doc().to_string();
        let (id1, id2) = id.split_at(5);
        let bytes = cbor(|e| {
            e.begin_map()?;
            e.begin_str()?.str("ty")?.str("pe")?.end()?;
            e.str("sync")?;
            e.str("senderId")?.begin_str()?.str("a")?.end()?;
            e.str("targetId")?.str("b")?;
            e.str("documentId")?
                .begin_str()?
                .str(id1)?
                .str(id2)?
                .end()?;
            e.str("data")?
                .begin_bytes()?
                .bytes(&[1])?
                .bytes(&[])?
                .bytes(&[2])?
                .end()?;
            e.str("x")?.begin_array()?.begin_map()?.end()?.end()?;
            e.end()?;
            Ok(())
        });
        assert_eq!(decode(&bytes), Ok(expect_sync()));
    }

    // ---- one test per error variant ---------------------------------------------------

    #[test]
    fn error_incomplete() {
        assert_eq!(decode(&[]), Err(DecodeError::Incomplete));
        assert_eq!(decode(&[0xa1]), Err(DecodeError::Incomplete));
        // A definite map claiming 2^64-1 entries: fails fast, allocates nothing.
        assert_eq!(
            decode(&[0xbb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::Incomplete)
        );
        // A byte string claiming 2^64-1 bytes inside an unknown key.
        let mut b = vec![0xa1, 0x61, b'x', 0x5b];
        b.extend([0xff; 8]);
        assert_eq!(decode(&b), Err(DecodeError::Incomplete));
        // Indefinite map without its break.
        assert_eq!(
            decode(&[0xbf, 0x61, b'x', 0x01]),
            Err(DecodeError::Incomplete)
        );
    }

    #[test]
    fn error_malformed() {
        // Reserved additional info 28 as a value.
        assert!(matches!(
            decode(&[0xa1, 0x61, b'x', 0x1c]),
            Err(DecodeError::Malformed(_))
        ));
        // A stray break as a value.
        assert!(matches!(
            decode(&[0xa1, 0x61, b'x', 0xff]),
            Err(DecodeError::Malformed(_))
        ));
        // Invalid UTF-8 in a key.
        assert!(matches!(
            decode(&[0xa1, 0x61, 0xff, 0x01]),
            Err(DecodeError::Malformed(_))
        ));
        // An indefinite text with a byte-string chunk.
        assert!(matches!(
            decode(&[0xa1, 0x61, b'x', 0x7f, 0x41, 0x00, 0xff]),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn error_not_a_map() {
        assert_eq!(
            decode(&[0x80]),
            Err(DecodeError::NotAMap { found: "array" })
        );
        assert_eq!(
            decode(&[0x61, b'x']),
            Err(DecodeError::NotAMap { found: "text" })
        );
        assert_eq!(
            decode(&[0xf7]),
            Err(DecodeError::NotAMap { found: "undefined" })
        );
    }

    #[test]
    fn error_non_text_key() {
        assert_eq!(
            decode(&[0xa1, 0x01, 0x02]),
            Err(DecodeError::NonTextKey {
                field: "",
                found: "unsigned integer"
            })
        );
        let bytes = cbor(|e| {
            e.map(2)?;
            e.str("type")?.str("join")?;
            e.str("senderId")?.str("c")?;
            Ok(())
        });
        assert!(decode(&bytes).is_ok());
        let bytes = cbor(|e| {
            e.map(3)?;
            e.str("type")?.str("join")?;
            e.str("senderId")?.str("c")?;
            e.str("peerMetadata")?.map(1)?.bytes(b"k")?.bool(true)?;
            Ok(())
        });
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::NonTextKey {
                field: "peerMetadata",
                found: "bytes"
            })
        );
    }

    #[test]
    fn error_duplicate_field() {
        let bytes = sync_with(1, |e| e.str("senderId")?.str("evil").map(drop));
        assert_eq!(decode(&bytes), Err(DecodeError::DuplicateField("senderId")));
    }

    #[test]
    fn error_missing_type() {
        assert_eq!(decode(&[0xa0]), Err(DecodeError::MissingType));
        let bytes = cbor(|e| e.map(1)?.str("type")?.undefined().map(drop));
        assert_eq!(decode(&bytes), Err(DecodeError::MissingType));
    }

    #[test]
    fn error_unknown_type() {
        let bytes = cbor(|e| e.map(1)?.str("type")?.str("leave").map(drop));
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::UnknownType("leave".into()))
        );
    }

    #[test]
    fn error_missing_field() {
        let bytes = cbor(|e| {
            e.map(3)?;
            e.str("type")?.str("request")?;
            e.str("senderId")?.str("a")?;
            e.str("targetId")?.str("b")?;
            Ok(())
        });
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::MissingField {
                field: "documentId",
                msg_type: "request"
            })
        );
        let bytes = cbor(|e| {
            e.map(5)?;
            e.str("type")?.str("remote-heads-changed")?;
            e.str("senderId")?.str("a")?;
            e.str("targetId")?.str("b")?;
            e.str("documentId")?.str(&doc().to_string())?;
            e.str("newHeads")?
                .map(1)?
                .str("st")?
                .map(1)?
                .str("heads")?
                .array(0)?;
            Ok(())
        });
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::MissingField {
                field: "newHeads.*.timestamp",
                msg_type: "remote-heads-changed"
            })
        );
    }

    #[test]
    fn error_wrong_type() {
        let bytes = cbor(|e| {
            e.map(5)?;
            e.str("type")?.str("sync")?;
            e.str("senderId")?.u8(1)?;
            e.str("targetId")?.str("b")?;
            e.str("documentId")?.str(&doc().to_string())?;
            e.str("data")?.bytes(&[1])?;
            Ok(())
        });
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::WrongType {
                field: "senderId",
                expected: "text",
                found: "unsigned integer"
            })
        );
        // data as text; data under the wrong tag.
        let bytes = cbor(|e| {
            e.map(5)?;
            e.str("type")?.str("sync")?;
            e.str("senderId")?.str("a")?;
            e.str("targetId")?.str("b")?;
            e.str("documentId")?.str(&doc().to_string())?;
            e.str("data")?.tag(Tag::new(65))?.bytes(&[1])?;
            Ok(())
        });
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::WrongType {
                field: "data",
                expected: "bytes",
                found: "tag"
            })
        );
        let bytes = cbor(|e| {
            e.map(3)?;
            e.str("type")?.str("join")?;
            e.str("senderId")?.str("c")?;
            e.str("peerMetadata")?.str("nope")?;
            Ok(())
        });
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::WrongType {
                field: "peerMetadata",
                expected: "map",
                found: "text"
            })
        );
    }

    #[test]
    fn error_invalid_number() {
        let bytes = cbor(|e| {
            e.map(5)?;
            e.str("type")?.str("remote-heads-changed")?;
            e.str("senderId")?.str("a")?;
            e.str("targetId")?.str("b")?;
            e.str("documentId")?.str(&doc().to_string())?;
            e.str("newHeads")?.map(1)?.str("st")?.map(2)?;
            e.str("heads")?.array(0)?.str("timestamp")?.f64(f64::NAN)?;
            Ok(())
        });
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::InvalidNumber {
                field: "newHeads.*.timestamp",
                reason: "not finite"
            })
        );
    }

    #[test]
    fn error_bad_document_id() {
        for id in [
            cbor(|e| e.str("not base58 0OIl").map(drop)),
            cbor(|e| {
                e.str(&bs58::encode([1u8; 5]).with_check().into_string())
                    .map(drop)
            }),
            cbor(|e| e.bytes(&[1; 15]).map(drop)),
        ] {
            let mut bytes = cbor(|e| {
                e.map(4)?;
                e.str("type")?.str("doc-unavailable")?;
                e.str("senderId")?.str("a")?;
                e.str("targetId")?.str("b")?;
                e.str("documentId")?;
                Ok(())
            });
            bytes.extend(id);
            assert!(
                matches!(decode(&bytes), Err(DecodeError::BadDocumentId(_))),
                "{:?}",
                decode(&bytes)
            );
        }
        let bytes = cbor(|e| {
            e.map(4)?;
            e.str("type")?.str("doc-unavailable")?;
            e.str("senderId")?.str("a")?;
            e.str("targetId")?.str("b")?;
            e.str("documentId")?.u8(3)?;
            Ok(())
        });
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::WrongType {
                field: "documentId",
                expected: "base58check text or 16 bytes",
                found: "unsigned integer"
            })
        );
    }

    #[test]
    fn error_trailing_bytes() {
        let mut bytes = encode(&expect_sync());
        bytes.extend([0x00, 0x01]);
        assert_eq!(decode(&bytes), Err(DecodeError::TrailingBytes(2)));
    }

    #[test]
    fn error_too_deep() {
        // {"x": [[[[...]]]]} deeper than MAX_DEPTH: rejected, not a stack overflow.
        let mut bytes = vec![0xa1, 0x61, b'x'];
        bytes.extend(std::iter::repeat_n(0x81, 10_000));
        bytes.push(0x00);
        assert_eq!(decode(&bytes), Err(DecodeError::TooDeep));
        // Exactly at the limit is fine: top map (1) + MAX_DEPTH - 1 arrays.
        let mut bytes = vec![0xa2, 0x61, b'x'];
        bytes.extend(std::iter::repeat_n(0x81, MAX_DEPTH - 1));
        bytes.push(0x00);
        bytes.extend(cbor(|e| e.str("type")?.str("leave").map(drop)));
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::UnknownType("leave".into()))
        );
        // Long tag chains cost no stack either.
        let mut bytes = vec![0xa1, 0x61, b'x'];
        bytes.extend(std::iter::repeat_n(0xc1, 100_000));
        bytes.push(0x00);
        assert_eq!(decode(&bytes), Err(DecodeError::MissingType));
    }

    // ---- properties ---------------------------------------------------------------------

    fn peer_id() -> impl Strategy<Value = PeerId> {
        ".{0,12}".prop_map(PeerId)
    }
    fn storage_id() -> impl Strategy<Value = StorageId> {
        ".{0,12}".prop_map(StorageId)
    }
    fn document_id() -> impl Strategy<Value = DocumentId> {
        any::<[u8; 16]>().prop_map(DocumentId::from_bytes)
    }
    fn data() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..64)
    }
    fn meta() -> impl Strategy<Value = PeerMetadata> {
        (prop::option::of(storage_id()), any::<bool>(), any::<bool>()).prop_map(
            |(storage_id, is_ephemeral, accepts_unchecked)| PeerMetadata {
                storage_id,
                is_ephemeral,
                accepts_unchecked,
            },
        )
    }
    fn timestamp() -> impl Strategy<Value = f64> {
        prop_oneof![
            (0u64..1 << 53).prop_map(|n| n as f64),
            any::<f64>().prop_filter("finite", |f| f.is_finite()),
        ]
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (peer_id(), meta(), prop::collection::vec(".{0,3}", 0..3)).prop_map(|(s, m, v)| {
                Message::Join {
                    sender_id: s,
                    peer_metadata: m,
                    supported_protocol_versions: v,
                }
            }),
            (peer_id(), peer_id(), meta(), ".{0,3}").prop_map(|(s, t, m, v)| Message::Peer {
                sender_id: s,
                target_id: t,
                peer_metadata: m,
                selected_protocol_version: v,
            }),
            (
                prop::option::of(peer_id()),
                prop::option::of(peer_id()),
                ".{0,20}"
            )
                .prop_map(|(s, t, m)| Message::Error {
                    sender_id: s,
                    target_id: t,
                    message: m,
                }),
            (peer_id(), peer_id(), document_id(), data()).prop_map(|(s, t, d, x)| {
                Message::Sync {
                    sender_id: s,
                    target_id: t,
                    document_id: d,
                    data: x,
                }
            }),
            (peer_id(), peer_id(), document_id(), data()).prop_map(|(s, t, d, x)| {
                Message::Request {
                    sender_id: s,
                    target_id: t,
                    document_id: d,
                    data: x,
                }
            }),
            (peer_id(), peer_id(), document_id()).prop_map(|(s, t, d)| {
                Message::DocUnavailable {
                    sender_id: s,
                    target_id: t,
                    document_id: d,
                }
            }),
            (
                peer_id(),
                peer_id(),
                document_id(),
                ".{0,8}",
                any::<u64>(),
                data()
            )
                .prop_map(|(s, t, d, sess, c, x)| Message::Ephemeral {
                    sender_id: s,
                    target_id: t,
                    document_id: d,
                    session_id: sess,
                    count: c,
                    data: x,
                }),
            (
                peer_id(),
                peer_id(),
                prop::collection::vec(storage_id(), 0..3),
                prop::collection::vec(storage_id(), 0..3)
            )
                .prop_map(|(s, t, a, r)| Message::RemoteSubscriptionChange {
                    sender_id: s,
                    target_id: t,
                    add: a,
                    remove: r,
                }),
            (
                peer_id(),
                peer_id(),
                document_id(),
                prop::collection::btree_map(
                    storage_id(),
                    (prop::collection::vec(".{0,8}", 0..3), timestamp())
                        .prop_map(|(heads, timestamp)| HeadsAt { heads, timestamp }),
                    0..3
                )
            )
                .prop_map(|(s, t, d, h)| Message::RemoteHeadsChanged {
                    sender_id: s,
                    target_id: t,
                    document_id: d,
                    new_heads: h,
                }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_messages_round_trip(m in message()) {
            let bytes = encode(&m);
            prop_assert_eq!(decode(&bytes), Ok(m));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn mutated_messages_never_panic(
            m in message(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = encode(&m);
            for (i, b) in flips {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            let _ = decode(&bytes);
            let n = cut.index(bytes.len() + 1);
            let _ = decode(&bytes[..n]);
        }
    }
}

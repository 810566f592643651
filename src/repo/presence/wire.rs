//! The presence envelope on the wire: what goes into an `ephemeral` message's `data`.
//!
//! The shape is the one automerge-repo's JS `Presence` class sends through
//! `handle.broadcast(...)`, so a JS app using that class (or hand-rolling the same objects)
//! and a sheaf [`Presence`](super::Presence) see each other:
//!
//! ```text
//! { "__presence": { "type": "snapshot", "state": { <key>: <any>, ... } } }   full state
//! { "__presence": { "type": "update", "channel": <key>, "value": <any> } }   one key of it
//! { "__presence": { "type": "heartbeat" } }                                  "still here"
//! { "__presence": { "type": "goodbye" } }                                    "forget me"
//! ```
//!
//! Decoding is total and lenient, because these bytes come from any peer of the document:
//! bytes that are not CBOR, or a CBOR value that is not a map with a `__presence` key, are
//! [`Decoded::NotPresence`] (another app's ephemeral message: left alone); a `__presence`
//! value we cannot make sense of (no `type`, an unknown `type`, a snapshot whose state is not
//! a map, an update without a text `channel`) is [`Decoded::Malformed`]. Unknown extra keys
//! are skipped, CBOR `undefined` (which cbor-x writes for absent optionals) reads as null, and
//! state keys that are not text (JS objects only have text keys) are dropped. Nesting deeper
//! than [`MAX_DEPTH`] is refused rather than recursed into.

use std::collections::BTreeMap;

use ciborium::Value;

/// The key of the envelope (automerge-repo's `PRESENCE_MESSAGE_MARKER`).
pub const MARKER: &str = "__presence";

/// How deep a payload may nest before it is refused (a presence state is a few levels).
pub const MAX_DEPTH: usize = 64;

/// One peer's presence state: a map with text keys (a JS `Record<string, any>`). Each key is
/// a "channel" that can be updated on its own.
pub type StateMap = BTreeMap<String, Value>;

/// A presence message.
#[derive(Debug, Clone, PartialEq)]
pub enum Wire {
    /// The sender's whole state.
    Snapshot(StateMap),
    /// One key of the sender's state.
    Update { channel: String, value: Value },
    /// The sender is still there (its state unchanged).
    Heartbeat,
    /// The sender leaves: forget it now.
    Goodbye,
}

/// What a received ephemeral payload turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Presence(Wire),
    /// Not a presence envelope: another kind of ephemeral message.
    NotPresence,
    /// A presence envelope we cannot use (the reason, for a debug log).
    Malformed(&'static str),
}

/// The CBOR bytes of `msg`, as `handle.broadcast` would send them.
pub fn encode(msg: &Wire) -> Vec<u8> {
    let text = |s: &str| Value::Text(s.to_string());
    let inner = match msg {
        Wire::Snapshot(state) => vec![
            (text("type"), text("snapshot")),
            (text("state"), state_to_value(state)),
        ],
        Wire::Update { channel, value } => vec![
            (text("type"), text("update")),
            (text("channel"), text(channel)),
            (text("value"), value.clone()),
        ],
        Wire::Heartbeat => vec![(text("type"), text("heartbeat"))],
        Wire::Goodbye => vec![(text("type"), text("goodbye"))],
    };
    let envelope = Value::Map(vec![(text(MARKER), Value::Map(inner))]);
    let mut out = Vec::new();
    // Writing a `Value` into a `Vec` cannot fail: no I/O error, no unserializable type.
    ciborium::into_writer(&envelope, &mut out).expect("CBOR of a Value into a Vec");
    out
}

/// Decode one ephemeral payload (never panics; see the module docs for what is accepted).
pub fn decode(bytes: &[u8]) -> Decoded {
    let Ok(value) = ciborium::de::from_reader_with_recursion_limit::<Value, _>(bytes, MAX_DEPTH)
    else {
        return Decoded::NotPresence;
    };
    let Value::Map(entries) = canonical(value) else {
        return Decoded::NotPresence;
    };
    let Some(inner) = take(entries, MARKER) else {
        return Decoded::NotPresence;
    };
    let Value::Map(mut fields) = inner else {
        return Decoded::Malformed("the __presence value is not a map");
    };
    let Some(Value::Text(kind)) = take_ref(&mut fields, "type") else {
        return Decoded::Malformed("no text `type`");
    };
    match kind.as_str() {
        "snapshot" => match take_ref(&mut fields, "state") {
            Some(Value::Map(state)) => Decoded::Presence(Wire::Snapshot(state_from_entries(state))),
            // cbor-x writes `undefined` for a missing state; JS starts from `{}` then.
            Some(Value::Null) | None => Decoded::Presence(Wire::Snapshot(StateMap::new())),
            Some(_) => Decoded::Malformed("snapshot state is not a map"),
        },
        "update" => {
            let Some(Value::Text(channel)) = take_ref(&mut fields, "channel") else {
                return Decoded::Malformed("update without a text `channel`");
            };
            let value = take_ref(&mut fields, "value").unwrap_or(Value::Null);
            Decoded::Presence(Wire::Update { channel, value })
        }
        "heartbeat" => Decoded::Presence(Wire::Heartbeat),
        "goodbye" => Decoded::Presence(Wire::Goodbye),
        _ => Decoded::Malformed("unknown `type`"),
    }
}

/// `v` with every bignum (tags 2 and 3 on a byte string) that fits a CBOR integer written as
/// that integer. ciborium reads a bignum whose bytes come in one piece as an integer, but one
/// whose bytes are chunked (an indefinite-length string) as the tag itself; the two are the
/// same number. Without this, a state relayed on (encoded again, in one piece) would read
/// back different from what arrived (found by the `presence` fuzz target).
fn canonical(v: Value) -> Value {
    match v {
        Value::Tag(tag @ (2 | 3), inner) => match *inner {
            Value::Bytes(b) => {
                let digits = &b[b.iter().take_while(|x| **x == 0).count()..];
                if digits.len() > 8 {
                    return Value::Tag(tag, Box::new(Value::Bytes(b)));
                }
                let n = digits.iter().fold(0u64, |n, d| (n << 8) | u64::from(*d));
                let int = if tag == 2 {
                    ciborium::value::Integer::from(n)
                } else {
                    // -1 - n is at least -2^64, the least CBOR integer.
                    match ciborium::value::Integer::try_from(-1 - i128::from(n)) {
                        Ok(i) => i,
                        Err(_) => return Value::Tag(tag, Box::new(Value::Bytes(b))),
                    }
                };
                Value::Integer(int)
            }
            other => Value::Tag(tag, Box::new(canonical(other))),
        },
        Value::Tag(tag, inner) => Value::Tag(tag, Box::new(canonical(*inner))),
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        Value::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| (canonical(k), canonical(v)))
                .collect(),
        ),
        other => other,
    }
}

/// A state as a CBOR map value.
pub fn state_to_value(state: &StateMap) -> Value {
    Value::Map(
        state
            .iter()
            .map(|(k, v)| (Value::Text(k.clone()), v.clone()))
            .collect(),
    )
}

/// The entries of a CBOR map with text keys (others dropped; a repeated key: the last wins,
/// as in a JS object).
pub fn state_from_entries(entries: Vec<(Value, Value)>) -> StateMap {
    entries
        .into_iter()
        .filter_map(|(k, v)| match k {
            Value::Text(k) => Some((k, v)),
            _ => None,
        })
        .collect()
}

fn take(entries: Vec<(Value, Value)>, key: &str) -> Option<Value> {
    entries
        .into_iter()
        .rev()
        .find_map(|(k, v)| matches!(&k, Value::Text(t) if t == key).then_some(v))
}

fn take_ref(entries: &mut Vec<(Value, Value)>, key: &str) -> Option<Value> {
    let i = entries
        .iter()
        .rposition(|(k, _)| matches!(k, Value::Text(t) if t == key))?;
    Some(entries.swap_remove(i).1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    fn t(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn every_message_round_trips() {
        let mut state = StateMap::new();
        state.insert("user".into(), t("ada"));
        state.insert("cursor".into(), Value::Integer(7.into()));
        for msg in [
            Wire::Snapshot(state),
            Wire::Snapshot(StateMap::new()),
            Wire::Update {
                channel: "cursor".into(),
                value: Value::Null,
            },
            Wire::Heartbeat,
            Wire::Goodbye,
        ] {
            assert_eq!(decode(&encode(&msg)), Decoded::Presence(msg));
        }
    }

    #[test]
    fn the_envelope_is_a_plain_map_js_can_read() {
        // {"__presence": {"type": "heartbeat"}}, byte for byte as cbor-x writes it.
        let mut want = vec![0xa1, 0x6a];
        want.extend_from_slice(b"__presence");
        want.extend_from_slice(&[0xa1, 0x64]);
        want.extend_from_slice(b"type");
        want.push(0x69);
        want.extend_from_slice(b"heartbeat");
        assert_eq!(encode(&Wire::Heartbeat), want);
    }

    #[test]
    fn other_payloads_are_not_presence() {
        for bytes in [
            vec![],
            vec![0xff],
            cbor(&t("hello")),
            cbor(&Value::Map(vec![(t("cursor"), Value::Integer(3.into()))])),
            cbor(&Value::Map(vec![(
                Value::Integer(1.into()),
                t("__presence"),
            )])),
        ] {
            assert_eq!(decode(&bytes), Decoded::NotPresence, "{bytes:?}");
        }
    }

    #[test]
    fn malformed_presence_is_named_not_trusted() {
        let env = |inner: Value| cbor(&Value::Map(vec![(t(MARKER), inner)]));
        let map =
            |kv: Vec<(&str, Value)>| Value::Map(kv.into_iter().map(|(k, v)| (t(k), v)).collect());
        for inner in [
            t("snapshot"),
            map(vec![]),
            map(vec![("type", Value::Integer(1.into()))]),
            map(vec![("type", t("dance"))]),
            map(vec![("type", t("snapshot")), ("state", t("x"))]),
            map(vec![("type", t("update")), ("value", Value::Bool(true))]),
        ] {
            assert!(
                matches!(decode(&env(inner.clone())), Decoded::Malformed(_)),
                "{inner:?}"
            );
        }
    }

    #[test]
    fn lenient_about_what_js_may_send() {
        // Unknown keys, `undefined` (0xf7) for the value, a non-text state key, extra
        // fields inside the state.
        let mut bytes = vec![0xa2, 0x65];
        bytes.extend_from_slice(b"extra");
        bytes.push(0xf5);
        bytes.push(0x6a);
        bytes.extend_from_slice(b"__presence");
        bytes.extend_from_slice(&[0xa3, 0x64]);
        bytes.extend_from_slice(b"type");
        bytes.push(0x66);
        bytes.extend_from_slice(b"update");
        bytes.push(0x67);
        bytes.extend_from_slice(b"channel");
        bytes.push(0x66);
        bytes.extend_from_slice(b"cursor");
        bytes.push(0x65);
        bytes.extend_from_slice(b"value");
        bytes.push(0xf7);
        assert_eq!(
            decode(&bytes),
            Decoded::Presence(Wire::Update {
                channel: "cursor".into(),
                value: Value::Null
            })
        );
        let snap = cbor(&Value::Map(vec![(
            t(MARKER),
            Value::Map(vec![
                (t("type"), t("snapshot")),
                (
                    t("state"),
                    Value::Map(vec![
                        (Value::Integer(1.into()), t("dropped")),
                        (t("user"), t("ada")),
                    ]),
                ),
            ]),
        )]));
        let Decoded::Presence(Wire::Snapshot(state)) = decode(&snap) else {
            panic!("not a snapshot")
        };
        assert_eq!(state.len(), 1);
        assert_eq!(state["user"], t("ada"));
    }

    #[test]
    fn hostile_lengths_and_depth_are_refused_without_allocating() {
        // A map claiming 2^63 entries, a text claiming 2^63 bytes, an array nested 10,000
        // deep: all end as "not presence", quickly.
        let huge_map = [0xbb, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        let huge_text = [0xa1, 0x7b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        let deep = vec![0x81; 10_000];
        for bytes in [&huge_map[..], &huge_text[..], &deep[..]] {
            assert_eq!(decode(bytes), Decoded::NotPresence);
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_is_total(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
            let mut env = encode(&Wire::Heartbeat);
            env.extend_from_slice(&bytes);
            let _ = decode(&env);
        }
    }
}

//! The encoder: one definite-length map with text keys, as JS cbor-x writes it.

use minicbor::Encoder;

use crate::protocol::{Message, PeerMetadata};

/// Largest integer a JS number holds exactly (2^53).
const JS_MAX_SAFE: u64 = 1 << 53;

/// Encode one message as one WebSocket frame's payload.
///
/// Absent optionals are omitted (never `null`/`undefined`); empty `add`/`remove` lists are
/// omitted too (JS treats a missing list as empty). `peerMetadata` is always written, with
/// `isEphemeral` always present and `storageId` only when known.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut e = Encoder::new(Vec::new());
    write(&mut e, msg).expect("writing CBOR to a Vec cannot fail");
    e.into_writer()
}

type Res = Result<(), minicbor::encode::Error<core::convert::Infallible>>;

fn kv_str(e: &mut Encoder<Vec<u8>>, k: &str, v: &str) -> Res {
    e.str(k)?.str(v)?;
    Ok(())
}

fn write(e: &mut Encoder<Vec<u8>>, msg: &Message) -> Res {
    match msg {
        Message::Join {
            sender_id,
            peer_metadata,
            supported_protocol_versions,
        } => {
            e.map(4)?;
            kv_str(e, "type", "join")?;
            kv_str(e, "senderId", sender_id.as_str())?;
            e.str("peerMetadata")?;
            peer_meta(e, peer_metadata)?;
            e.str("supportedProtocolVersions")?;
            e.array(supported_protocol_versions.len() as u64)?;
            for v in supported_protocol_versions {
                e.str(v)?;
            }
        }
        Message::Peer {
            sender_id,
            target_id,
            peer_metadata,
            selected_protocol_version,
        } => {
            e.map(5)?;
            kv_str(e, "type", "peer")?;
            kv_str(e, "senderId", sender_id.as_str())?;
            e.str("peerMetadata")?;
            peer_meta(e, peer_metadata)?;
            kv_str(e, "selectedProtocolVersion", selected_protocol_version)?;
            kv_str(e, "targetId", target_id.as_str())?;
        }
        Message::Error {
            sender_id,
            target_id,
            message,
        } => {
            e.map(2 + u64::from(sender_id.is_some()) + u64::from(target_id.is_some()))?;
            kv_str(e, "type", "error")?;
            if let Some(s) = sender_id {
                kv_str(e, "senderId", s.as_str())?;
            }
            kv_str(e, "message", message)?;
            if let Some(t) = target_id {
                kv_str(e, "targetId", t.as_str())?;
            }
        }
        Message::Sync {
            sender_id,
            target_id,
            document_id,
            data,
        }
        | Message::Request {
            sender_id,
            target_id,
            document_id,
            data,
        } => {
            e.map(5)?;
            kv_str(e, "type", msg.type_name())?;
            kv_str(e, "senderId", sender_id.as_str())?;
            kv_str(e, "targetId", target_id.as_str())?;
            kv_str(e, "documentId", &document_id.to_string())?;
            e.str("data")?.bytes(data)?;
        }
        Message::DocUnavailable {
            sender_id,
            target_id,
            document_id,
        } => {
            e.map(4)?;
            kv_str(e, "type", "doc-unavailable")?;
            kv_str(e, "senderId", sender_id.as_str())?;
            kv_str(e, "targetId", target_id.as_str())?;
            kv_str(e, "documentId", &document_id.to_string())?;
        }
        Message::Ephemeral {
            sender_id,
            target_id,
            document_id,
            session_id,
            count,
            data,
        } => {
            e.map(7)?;
            kv_str(e, "type", "ephemeral")?;
            kv_str(e, "senderId", sender_id.as_str())?;
            kv_str(e, "targetId", target_id.as_str())?;
            kv_str(e, "documentId", &document_id.to_string())?;
            kv_str(e, "sessionId", session_id)?;
            e.str("count")?;
            js_uint(e, *count)?;
            e.str("data")?.bytes(data)?;
        }
        Message::RemoteSubscriptionChange {
            sender_id,
            target_id,
            add,
            remove,
        } => {
            e.map(3 + u64::from(!add.is_empty()) + u64::from(!remove.is_empty()))?;
            kv_str(e, "type", "remote-subscription-change")?;
            kv_str(e, "senderId", sender_id.as_str())?;
            kv_str(e, "targetId", target_id.as_str())?;
            for (k, list) in [("add", add), ("remove", remove)] {
                if !list.is_empty() {
                    e.str(k)?.array(list.len() as u64)?;
                    for s in list {
                        e.str(s.as_str())?;
                    }
                }
            }
        }
        Message::RemoteHeadsChanged {
            sender_id,
            target_id,
            document_id,
            new_heads,
        } => {
            e.map(5)?;
            kv_str(e, "type", "remote-heads-changed")?;
            kv_str(e, "senderId", sender_id.as_str())?;
            kv_str(e, "targetId", target_id.as_str())?;
            kv_str(e, "documentId", &document_id.to_string())?;
            e.str("newHeads")?.map(new_heads.len() as u64)?;
            for (storage, at) in new_heads {
                e.str(storage.as_str())?.map(2)?;
                e.str("heads")?.array(at.heads.len() as u64)?;
                for h in &at.heads {
                    e.str(h)?;
                }
                e.str("timestamp")?;
                js_number(e, at.timestamp)?;
            }
        }
    }
    Ok(())
}

fn peer_meta(e: &mut Encoder<Vec<u8>>, m: &PeerMetadata) -> Res {
    e.map(1 + u64::from(m.storage_id.is_some()) + u64::from(m.accepts_unchecked))?;
    if let Some(s) = &m.storage_id {
        kv_str(e, "storageId", s.as_str())?;
    }
    e.str("isEphemeral")?.bool(m.is_ephemeral)?;
    if m.accepts_unchecked {
        e.str("sheafAcceptsUnchecked")?.bool(true)?;
    }
    Ok(())
}

/// A JS number the way cbor-x writes it: integers that fit 32 bits as CBOR integers,
/// everything else (e.g. a millisecond timestamp) as a float64. cbor-x never writes 64-bit
/// integers for numbers, and decodes them as `BigInt`, which JS code does not expect.
fn js_number(e: &mut Encoder<Vec<u8>>, v: f64) -> Res {
    if v.fract() == 0.0 && v >= 0.0 && v <= f64::from(u32::MAX) {
        e.u32(v as u32)?;
    } else if v.fract() == 0.0 && v < 0.0 && v >= f64::from(i32::MIN) {
        e.i32(v as i32)?;
    } else {
        e.f64(v)?;
    }
    Ok(())
}

/// An unsigned count as cbor-x would write the same JS number; above 2^53 (which no JS peer
/// can produce) a CBOR u64 keeps the value exact.
fn js_uint(e: &mut Encoder<Vec<u8>>, v: u64) -> Res {
    if let Ok(small) = u32::try_from(v) {
        e.u32(small)?;
    } else if v <= JS_MAX_SAFE {
        e.f64(v as f64)?;
    } else {
        e.u64(v)?;
    }
    Ok(())
}

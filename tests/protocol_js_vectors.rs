//! Golden vectors: frames the real JS automerge-repo 2.5.6 packages put on the wire, captured
//! by `tests/js/capture-frames.mjs` into `tests/fixtures/js-frames/`. Every frame must decode,
//! match what cbor-x decoded in JS (recorded in `index.json`), and survive encode/decode.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sheafdb::protocol::{decode, encode, Message, PeerMetadata};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/js-frames")
}

fn index() -> Vec<Value> {
    let text = std::fs::read_to_string(dir().join("index.json")).expect("index.json");
    let v: Value = serde_json::from_str(&text).expect("index.json is JSON");
    v["frames"].as_array().expect("frames").clone()
}

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2));
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// A JS value that cbor-x decoded as `undefined` (or that is missing) counts as absent.
fn present(v: &Value) -> Option<&Value> {
    match v {
        Value::Null => None,
        Value::Object(o) if o.contains_key("$undefined") => None,
        v => Some(v),
    }
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

fn bytes(v: &Value) -> Vec<u8> {
    hex(s(&v["$bytes"]))
}

fn strings(v: &Value) -> Vec<String> {
    match present(v) {
        None => vec![],
        Some(v) => v
            .as_array()
            .expect("array")
            .iter()
            .map(|x| s(x).to_string())
            .collect(),
    }
}

fn check_meta(got: &PeerMetadata, js: &Value) {
    let js = present(js);
    let storage = js.and_then(|m| present(&m["storageId"])).map(s);
    assert_eq!(got.storage_id.as_ref().map(|x| x.as_str()), storage);
    let eph = js
        .and_then(|m| present(&m["isEphemeral"]))
        .map(|b| b.as_bool().expect("bool"))
        .unwrap_or(false);
    assert_eq!(got.is_ephemeral, eph);
}

/// Assert the fields we decoded equal what cbor-x decoded.
fn check(msg: &Message, js: &Value) {
    let peer = |k: &str| s(&js[k]).to_string();
    match msg {
        Message::Join {
            sender_id,
            peer_metadata,
            supported_protocol_versions,
        } => {
            assert_eq!(sender_id.as_str(), peer("senderId"));
            check_meta(peer_metadata, &js["peerMetadata"]);
            assert_eq!(
                supported_protocol_versions,
                &strings(&js["supportedProtocolVersions"])
            );
        }
        Message::Peer {
            sender_id,
            target_id,
            peer_metadata,
            selected_protocol_version,
        } => {
            assert_eq!(sender_id.as_str(), peer("senderId"));
            assert_eq!(target_id.as_str(), peer("targetId"));
            check_meta(peer_metadata, &js["peerMetadata"]);
            assert_eq!(selected_protocol_version, s(&js["selectedProtocolVersion"]));
        }
        Message::Error {
            sender_id,
            target_id,
            message,
        } => {
            assert_eq!(
                sender_id.as_ref().map(|p| p.as_str()),
                js["senderId"].as_str()
            );
            assert_eq!(
                target_id.as_ref().map(|p| p.as_str()),
                js["targetId"].as_str()
            );
            assert_eq!(message, s(&js["message"]));
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
            assert_eq!(sender_id.as_str(), peer("senderId"));
            assert_eq!(target_id.as_str(), peer("targetId"));
            assert_eq!(document_id.to_string(), s(&js["documentId"]));
            assert_eq!(data, &bytes(&js["data"]));
            automerge::sync::Message::decode(data)
                .unwrap_or_else(|e| panic!("`data` is not an automerge sync message: {e}"));
        }
        Message::DocUnavailable {
            sender_id,
            target_id,
            document_id,
        } => {
            assert_eq!(sender_id.as_str(), peer("senderId"));
            assert_eq!(target_id.as_str(), peer("targetId"));
            assert_eq!(document_id.to_string(), s(&js["documentId"]));
        }
        Message::Ephemeral {
            sender_id,
            target_id,
            document_id,
            session_id,
            count,
            data,
        } => {
            assert_eq!(sender_id.as_str(), peer("senderId"));
            assert_eq!(target_id.as_str(), peer("targetId"));
            assert_eq!(document_id.to_string(), s(&js["documentId"]));
            assert_eq!(session_id, s(&js["sessionId"]));
            assert_eq!(Some(*count), js["count"].as_u64());
            assert_eq!(data, &bytes(&js["data"]));
            // The payload is itself CBOR (cbor-x of the app's value).
            minicbor::Decoder::new(data)
                .skip()
                .expect("ephemeral data is CBOR");
        }
        Message::RemoteSubscriptionChange {
            sender_id,
            target_id,
            add,
            remove,
        } => {
            assert_eq!(sender_id.as_str(), peer("senderId"));
            assert_eq!(target_id.as_str(), peer("targetId"));
            let ids = |v: &Vec<sheafdb::StorageId>| -> Vec<String> {
                v.iter().map(|x| x.0.clone()).collect()
            };
            assert_eq!(ids(add), strings(&js["add"]));
            assert_eq!(ids(remove), strings(&js["remove"]));
        }
        Message::RemoteHeadsChanged {
            sender_id,
            target_id,
            document_id,
            new_heads,
        } => {
            assert_eq!(sender_id.as_str(), peer("senderId"));
            assert_eq!(target_id.as_str(), peer("targetId"));
            assert_eq!(document_id.to_string(), s(&js["documentId"]));
            let js_heads = js["newHeads"].as_object().expect("newHeads map");
            assert_eq!(new_heads.len(), js_heads.len());
            for (storage, at) in new_heads {
                let j = &js_heads[storage.as_str()];
                assert_eq!(at.heads, strings(&j["heads"]));
                for h in &at.heads {
                    sheafdb::id::decode_head(h).expect("heads are base58check change hashes");
                }
                assert_eq!(Some(at.timestamp), j["timestamp"].as_f64());
            }
        }
    }
}

#[test]
fn every_js_frame_decodes_to_what_cbor_x_saw() {
    let frames = index();
    assert!(!frames.is_empty());
    // Our re-encodings, for `node tests/js/decode-check.mjs` (JS decodes them back).
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("js-reencoded");
    std::fs::create_dir_all(&out).expect("target tmp dir");
    let mut types = BTreeSet::new();
    for f in &frames {
        let file = s(&f["file"]);
        let raw = std::fs::read(dir().join(file)).expect(file);
        let msg = decode(&raw).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(msg.type_name(), s(&f["type"]), "{file}");
        check(&msg, &f["message"]);
        // Our encoding of the message decodes to the same message.
        let ours = encode(&msg);
        assert_eq!(decode(&ours).as_ref(), Ok(&msg), "{file}");
        std::fs::write(out.join(file), &ours).expect("write re-encoding");
        types.insert(msg.type_name());
    }
    // The capture covers every message type the JS packages send.
    for t in [
        "join",
        "peer",
        "error",
        "sync",
        "request",
        "doc-unavailable",
        "ephemeral",
        "remote-subscription-change",
        "remote-heads-changed",
    ] {
        assert!(types.contains(t), "no `{t}` frame captured");
    }
}

#[test]
fn truncated_js_frames_are_incomplete() {
    for f in index() {
        let raw = std::fs::read(dir().join(s(&f["file"]))).unwrap();
        for n in 0..raw.len() {
            assert_eq!(
                decode(&raw[..n]),
                Err(sheafdb::protocol::DecodeError::Incomplete),
                "{} cut at {n}",
                f["file"]
            );
        }
    }
}

#[test]
fn js_wire_facts_hold() {
    // Facts the engine relies on, as seen in the capture.
    for f in index() {
        let js = &f["message"];
        let ty = s(&f["type"]);
        let keys: Vec<&str> = f["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        // After the handshake every message names sender and target.
        if ty != "join" {
            assert!(
                keys.contains(&"senderId") && keys.contains(&"targetId"),
                "{f}"
            );
        }
        // A client without storage sends `storageId: undefined` rather than omitting it.
        if ty == "join" && js["peerMetadata"]["isEphemeral"] == Value::Bool(true) {
            assert_eq!(
                js["peerMetadata"]["storageId"]["$undefined"],
                Value::Bool(true)
            );
        }
    }
}

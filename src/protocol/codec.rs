//! CBOR codec for [`Message`](super::Message). (Placeholder until the codec lands.)
use super::Message;

/// Why bytes are not a protocol message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("incomplete message")]
    Incomplete,
    #[error("invalid message: {0}")]
    Invalid(String),
}

pub fn decode(_bytes: &[u8]) -> Result<Message, DecodeError> {
    Err(DecodeError::Invalid("codec not implemented".into()))
}

pub fn encode(_msg: &Message) -> Vec<u8> {
    Vec::new()
}

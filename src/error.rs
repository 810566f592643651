//! The crate's top-level error: each module has its own typed error, and this wraps them.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Id(#[from] crate::id::IdError),
    #[error(transparent)]
    Decode(#[from] crate::protocol::DecodeError),
    #[error(transparent)]
    Server(#[from] crate::relay::ServerError),
    #[error(transparent)]
    Dial(#[from] crate::net::client::DialError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

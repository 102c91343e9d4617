//! The wire codec of control messages.

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not enough bytes yet for a whole frame.
    #[error("incomplete frame")]
    Incomplete,
    /// A tag this version does not know.
    #[error("unknown tag {0}")]
    UnknownTag(u8),
    /// A length above the fixed bound.
    #[error("length {0} exceeds the bound")]
    TooLong(u64),
    /// A structurally invalid value.
    #[error("invalid frame: {0}")]
    Invalid(&'static str),
}

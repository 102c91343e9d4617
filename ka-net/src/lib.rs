//! ka-net: the tokio shell and data plane of ka.
//!
//! DATAPLANE_DOCS
#![warn(missing_docs)]

use std::io;

pub mod blockdev;
pub mod digest;
pub mod process;
pub mod relay;
pub mod sink;
pub mod source;

pub use digest::{digest_source, ImageDigest, ImageHasher, SessionKey, BLOCK};
pub use relay::{relay, send_image, NodeWriter, RelayEnd, RelayEvent, SendEnd, BUF_SIZE};
pub use sink::{open_sink, ImageSink, SinkSpec};
pub use source::{open_source, ImageSource, SourceSpec};

/// Errors of the data plane. Messages name the file, device or command
/// involved and, where the user can act, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. "writing /dev/sda at 4096".
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A block device cannot be used as it is.
    #[error(transparent)]
    BlockDevice(#[from] blockdev::BlockDeviceError),
    /// A source or sink command failed.
    #[error("`{command}` failed ({status}){}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Command {
        /// The command (or a label for it).
        command: String,
        /// Its exit status, as the OS describes it.
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
    /// A record or write did not start where the stream stands.
    #[error("record out of order: expected offset {expected}, got {got}")]
    OutOfOrder {
        /// The offset the stream is at.
        expected: u64,
        /// The offset that came.
        got: u64,
    },
    /// A stream source or sink was asked to move.
    #[error(
        "a stream cannot move from offset {at} to {wanted}: resume needs a file or block device"
    )]
    NotSeekable {
        /// Where the stream is.
        at: u64,
        /// Where it was asked to go.
        wanted: u64,
    },
    /// The sink (a command or untar) cannot be read back.
    #[error("`{0}` cannot be read back: verify and serve downstream from the source instead")]
    NotReadable(String),
    /// A stream ended before its `End` record.
    #[error("image stream ended early at offset {at}")]
    Truncated {
        /// Where it ended.
        at: u64,
    },
    /// The upstream closed the connection between records.
    #[error("upstream closed the data connection at offset {at}")]
    UpstreamClosed {
        /// The offset of the next record expected.
        at: u64,
    },
    /// A record header failed to decode.
    #[error("bad record header at offset {at}: {error}")]
    Record {
        /// The offset of the next record expected.
        at: u64,
        /// The decoding error.
        error: ka_core::codec::DecodeError,
    },
    /// A request that makes no sense (a non-directory for tar, a bad offset).
    #[error("{0}")]
    Invalid(String),
    /// The data-plane worker thread is gone after an earlier error.
    #[error("the disk writer failed earlier: {0}")]
    WriterFailed(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

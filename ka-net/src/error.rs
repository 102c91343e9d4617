//! The error of every ka-net operation: a leaf module, imported by all the others.

use std::io;
use std::path::PathBuf;

use ka_core::codec::Digest;

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
    BlockDevice(#[from] BlockDeviceError),
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
    /// A written copy does not match the source's digest.
    #[error("the written image does not match the source (digest {got}, expected {expected}): the copy is corrupt")]
    DigestMismatch {
        /// The source's digest.
        expected: Digest,
        /// The digest of what was read back.
        got: Digest,
    },
    /// The running system cannot be cloned file by file as it is (a file
    /// system ka cannot rebuild, a root that is not on a disk partition, a
    /// bad `--exclude`, `--raw` or `--skip-disk`). Raised before anything is
    /// sent; the message says what to use instead.
    #[error("{0}")]
    NotClonable(String),
    /// A source disk's layout does not fit a node's disk, or a layout file
    /// asks for something the layout cannot give. The message gives the sizes.
    #[error("{0}")]
    Plan(String),
    /// A layout file (`--layout FILE`) that does not parse; the message names
    /// the file, the line and the field.
    #[error("{0}")]
    LayoutFile(String),
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

/// Why a block device cannot be used; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum BlockDeviceError {
    /// The path is not a block device.
    #[error("{0} is not a block device")]
    NotABlockDevice(PathBuf),
    /// The device is smaller than the image.
    #[error("{path} holds {size} bytes but the image needs {needed}: choose a larger disk or a smaller image")]
    TooSmall {
        /// The device.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The image size in bytes.
        needed: u64,
    },
    /// The device or one of its partitions is mounted.
    #[error("{part} (on {path}) is mounted at {mountpoint}: unmount it (umount {mountpoint}) before cloning onto {path}")]
    Mounted {
        /// The device asked for.
        path: PathBuf,
        /// The mounted device or partition (kernel name).
        part: String,
        /// Where it is mounted.
        mountpoint: String,
    },
    /// The device or one of its partitions is active swap.
    #[error("{part} (on {path}) is in use as swap: run `swapoff /dev/{part}` before cloning onto {path}")]
    Swap {
        /// The device asked for.
        path: PathBuf,
        /// The swap device or partition (kernel name).
        part: String,
    },
    /// A device-mapper, RAID or similar device is built on the device.
    #[error("{part} (on {path}) is held by {holder} (LVM, RAID, dm-crypt or multipath): deactivate {holder} first")]
    Held {
        /// The device asked for.
        path: PathBuf,
        /// The held device or partition (kernel name).
        part: String,
        /// The holder (kernel name, e.g. `dm-0`).
        holder: String,
    },
    /// A file system on the device or one of its partitions is mounted
    /// read-write: it changes while it is read, so a copy of its bytes would
    /// be inconsistent.
    #[error("{part} (on {path}) holds a file system mounted read-write at {mountpoint}: its bytes change while they are read, so the copy would be inconsistent. Clone the running system file by file with `ka serve --system`, remount it read-only (mount -o remount,ro {mountpoint}), or pass --force to send it anyway")]
    MountedReadWrite {
        /// The device asked for.
        path: PathBuf,
        /// The mounted device, partition or holder (kernel name).
        part: String,
        /// Where it is mounted.
        mountpoint: String,
    },
    /// The kernel refused exclusive access: something else has it open exclusively.
    #[error("{0} is busy (another program holds it exclusively): stop that program first")]
    Busy(PathBuf),
    /// An I/O error while inspecting the device.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The device.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

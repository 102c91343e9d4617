//! Spools: how streams (a command's output, a tar of a directory, stdin) take
//! part in a protocol built on re-readable images.
//!
//! The protocol resumes nodes from any offset and lets every node serve its
//! downstream from what it has written. A stream can be read only once, so
//! the source copies it into a spool file as it reads it, and serves nodes
//! from the spool exactly as a node serves from its target; history is then
//! never short, whatever the chain's slowest node. A node whose sink is a
//! command or a directory receives into a spool the same way and feeds the
//! sink from it once the whole image has arrived and matched, so a sink
//! never sees bytes that failed verification.

use std::path::Path;

use tokio::sync::watch;

use super::conn::Written;
use crate::datapath::BUF_SIZE;
use crate::image::digest::{DigestKey, ImageHasher};
use crate::image::sinks::{open_sink, ImageSink, SinkSpec};
use crate::image::sources::{open_source, ImageSource, SourceSpec};
use crate::Error;
use ka_core::codec::Digest;
use ka_core::record::{RecordHeader, RecordKind};

/// How far ahead a file of still unknown size is made to reach while it is
/// written and served at once. A server reads such a file up to what is
/// written, but a file's length must stay beyond that point, or a reader
/// would take a trailing run of zeros not yet materialised for the image's
/// end. The sink sets the true length when the image is complete; until then
/// the span is a hole and costs nothing.
pub const UNKNOWN_SIZE_SPAN: u64 = 1 << 40;

/// Makes a regular file of unknown final size reach [`UNKNOWN_SIZE_SPAN`]
/// (see there). Block devices and larger files are left alone.
pub fn reach_ahead(path: &Path) -> Result<(), Error> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    if meta.is_file() && meta.len() < UNKNOWN_SIZE_SPAN {
        file.set_len(UNKNOWN_SIZE_SPAN)
            .map_err(|e| Error::io(format!("extending {}", path.display()), e))?;
    }
    Ok(())
}

/// Reads `source` to its end into the file `spool`, publishing progress on
/// `written` for the servers that follow it. Returns the image size and its
/// digest. Blocking: run it on a blocking thread.
pub fn spool_source(
    mut source: Box<dyn ImageSource>,
    spool: &Path,
    key: &DigestKey,
    written: &watch::Sender<Written>,
) -> Result<(u64, Digest), Error> {
    let mut sink = open_sink(&SinkSpec::File(spool.to_path_buf()), None)?;
    reach_ahead(spool)?;
    let mut hasher = ImageHasher::new(key);
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let Some(header) = source.next_record(&mut buf)? else {
            return Err(Error::Truncated {
                at: hasher.position(),
            });
        };
        let payload: &[u8] = match header.kind {
            RecordKind::Data => &buf[..header.len as usize],
            _ => &[],
        };
        write_record(sink.as_mut(), &header, payload)?;
        if let Some(digest) = hasher.record(&header, payload)? {
            written.send_replace(Written {
                upto: header.offset,
                size: Some(header.offset),
            });
            return Ok((header.offset, digest));
        }
        written.send_modify(|w| w.upto = header.end());
    }
}

/// Feeds the complete image in `spool` (of `size` bytes) to the sink `spec`
/// and waits for it to finish (a command's exit status, tar's). Blocking.
pub fn feed_sink(spool: &Path, size: u64, spec: &SinkSpec) -> Result<(), Error> {
    let mut source = open_source(&SourceSpec::File(spool.to_path_buf()))?;
    let mut sink = open_sink(spec, Some(size))?;
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let Some(header) = source.next_record(&mut buf)? else {
            return Err(Error::Truncated {
                at: sink.position(),
            });
        };
        let payload: &[u8] = match header.kind {
            RecordKind::Data => &buf[..header.len as usize],
            _ => &[],
        };
        if header.kind == RecordKind::End {
            return sink.finish(header.offset);
        }
        write_record(sink.as_mut(), &header, payload)?;
    }
}

fn write_record(
    sink: &mut dyn ImageSink,
    header: &RecordHeader,
    payload: &[u8],
) -> Result<(), Error> {
    match header.kind {
        RecordKind::Data => sink.write_data(header.offset, payload),
        RecordKind::Zero => sink.write_zero(header.offset, header.len),
        RecordKind::End => sink.finish(header.offset),
    }
}

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
use crate::image::packed::{FrameEnd, SinkWriter, Unpacker};
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
/// and waits for it to finish (a command's exit status, tar's). A packed
/// stream is unpacked on the way with the digest key `unpack`, and its
/// trailer checked before the sink is finished; the unpacked image's digest
/// is returned. Blocking.
pub fn feed_sink(
    spool: &Path,
    size: u64,
    spec: &SinkSpec,
    unpack: Option<&DigestKey>,
) -> Result<Option<Digest>, Error> {
    if let Some(key) = unpack {
        let mut file = std::fs::File::open(spool)
            .map_err(|e| Error::io(format!("opening the spool {}", spool.display()), e))?;
        let mut sink = open_sink(spec, None)?;
        let mut writer = SinkWriter::new(sink.as_mut(), None);
        let mut unpacker = Unpacker::new(key)?;
        let mut buf = vec![0u8; BUF_SIZE];
        let mut left = size;
        while left > 0 {
            let n = (left as usize).min(buf.len());
            std::io::Read::read_exact(&mut file, &mut buf[..n])
                .map_err(|e| Error::io("reading the spool", e))?;
            unpacker.feed(&buf[..n], &mut |bytes| writer.write(bytes))?;
            left -= n as u64;
        }
        let trailer = unpacker.finish()?;
        return writer.finish(trailer.size).map(|()| Some(trailer.digest));
    }
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
            return sink.finish(header.offset).map(|()| None);
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

/// Where and how a packed stream is unpacked ([`unpack_following`]).
#[derive(Debug, Clone)]
pub struct UnpackTo {
    /// The file or block device the image goes to.
    pub target: std::path::PathBuf,
    /// The session's digest key.
    pub key: DigestKey,
    /// The image size the source announced, so a target too small is
    /// refused before a byte is written.
    pub expected: Option<u64>,
    /// Read the target back and check it again once written.
    pub read_back: bool,
    /// Where a restarted node goes on: the frame end it recorded, before
    /// which the target holds the image already. `None`: from the start.
    pub from: Option<FrameEnd>,
}

/// Unpacks a packed stream ([`crate::image::packed`]) into `to.target` as
/// it is received into a windowed spool, following `written`, then checks
/// the copy: its digest as written against the stream's trailer and, if
/// asked, again as read back from the target. Each frame end it passes is
/// handed to `frame_ended` once the image before it is written to the
/// target (not yet synced), for the node to record. A restarted node's
/// unpacking goes on from `to.from`, whose image prefix it reads back from
/// the target to rebuild the digest. Blocking: run it on a blocking thread
/// of the runtime `rt`.
pub fn unpack_following(
    spool: &Path,
    written: watch::Receiver<Written>,
    window: std::sync::Arc<crate::datapath::window::Window>,
    to: &UnpackTo,
    rt: tokio::runtime::Handle,
    frame_ended: &mut dyn FnMut(FrameEnd),
) -> Result<crate::system::Unpacked, Error> {
    let result = (|| {
        let mut follower = crate::datapath::window::Follower::open(
            spool,
            written,
            std::sync::Arc::clone(&window),
            rt,
        )?;
        let mut sink = open_sink(&SinkSpec::File(to.target.clone()), to.expected)?;
        if to.expected.is_none() {
            // A frame end recorded after a run of zeros must not lie past
            // the file's end, or a restart could not read its prefix back.
            reach_ahead(&to.target)?;
        }
        let mut unpacker = match to.from {
            None => Unpacker::new(&to.key)?,
            Some(from) => {
                sink.resume(from.image)?;
                let hasher = crate::datapath::rehash_written(sink.as_ref(), &to.key)
                    .map_err(|e| Error::Invalid(format!("reading the image's prefix back: {e}")))?;
                Unpacker::resume(hasher, from.stream)?
            }
        };
        if follower.position() != unpacker.frame_end().stream {
            return Err(Error::Invalid(format!(
                "the spool starts at {}, the unpacking at {}",
                follower.position(),
                unpacker.frame_end().stream
            )));
        }
        let mut writer = SinkWriter::new(sink.as_mut(), to.expected);
        let mut buf = vec![0u8; BUF_SIZE];
        let mut last = unpacker.frame_end();
        while let Some(piece) = follower.next(&mut buf)? {
            unpacker.feed(piece, &mut |bytes| writer.write(bytes))?;
            if unpacker.frame_end() != last {
                last = unpacker.frame_end();
                writer.write_through(last.image)?;
                frame_ended(last);
            }
        }
        let stream = follower.position();
        let trailer = unpacker.finish()?;
        writer.finish(trailer.size)?;
        let mut steps = vec![format!(
            "unpacked {} bytes from a stream of {stream} ({:.2}:1), digest checked",
            trailer.size,
            trailer.size as f64 / stream.max(1) as f64
        )];
        steps.extend(to.from.map(|from| {
            format!(
                "went on from a frame end at {} bytes of image ({} of the stream), its prefix read back",
                from.image, from.stream
            )
        }));
        if to.read_back {
            crate::datapath::verify_readback(sink.as_ref(), &to.key, &trailer.digest)?;
            steps.push("read back and checked again".into());
        }
        Ok(crate::system::Unpacked {
            steps,
            image: Some(trailer.digest),
        })
    })();
    if result.is_err() {
        window.close();
    }
    result
}

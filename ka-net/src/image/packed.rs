//! Compressed streams: an image packed with Zstandard once at the source,
//! forwarded as it is by every node, and unpacked only to be written.
//!
//! # The packed stream
//!
//! A packed stream is an ordinary Zstandard stream of the image (any number
//! of frames; `zstd -d` reads it) followed by one *skippable frame*, the
//! [`Trailer`], that carries the image's size and keyed digest
//! ([`crate::image::digest`]). Everything the chain does with a stream —
//! offsets, resumes, its digest in `ImageDone` — counts bytes of the packed
//! stream; the trailer, covered by that digest, then tells a node what its
//! unpacked copy must be. A node checks both: the stream against the
//! source's digest, and its written copy against the trailer.
//!
//! Zstandard stores a block that does not shrink as it is (a raw block), so
//! incompressible data costs five bytes per 128 KiB and a copy, not a
//! second try.
//!
//! # Resuming
//!
//! A node whose upstream is lost goes on in stream offsets from what its
//! new upstream (or the source's spool) still holds: its own unpacker
//! never stopped. A node whose *process* restarts has lost its decoder's
//! state, and a decoder can only start at a frame's beginning. So a source
//! ends a frame every [`FRAME_IMAGE`] bytes of image, and a node records
//! the last frame end it has unpacked and made durable: the stream offset
//! and the image offset there ([`FrameEnd`]). Started again, it asks for
//! the stream from that offset, reads its target's prefix back to rebuild
//! the image's digest, and unpacks on from there. Cutting the image into
//! frames of 64 MiB costs nothing measurable in size: a frame at the
//! default level refers back only 2 MiB anyway.
//!
//! # Images that are already compressed
//!
//! [`ImageFormat::sniff`] recognises an image file by its first bytes. A
//! `.zst` image is sent as it is ([`PackedSource::passthrough`]): the
//! source only decodes it once, beside the stream, for the digest. Its
//! frames are the file's: what `zstd` writes is one frame, so a restarted
//! node starts such an image over, while a file of many frames (`pzstd`'s,
//! or concatenated `.zst` pieces) resumes at its frames' ends. A gzip or xz image is decoded at the source and then
//! either packed again or sent plain.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use ka_core::codec::Digest;
use ka_core::record::RecordKind;
use zstd::stream::raw::{Decoder as RawDecoder, InBuffer, Operation, OutBuffer};

use super::digest::{DigestKey, ImageHasher};
use super::sinks::ImageSink;
use super::sources::ImageSource;
use super::{is_zero, BLOCK};
use crate::Error;

/// The level `--compress zstd` and `auto` pack at: Zstandard's default,
/// a few hundred MB/s per core, near the best ratio of the fast levels.
pub const DEFAULT_LEVEL: i32 = 3;

/// A packing source ends a Zstandard frame after this many bytes of image:
/// a restarted node resumes from the last frame end it recorded, so this
/// is the most it fetches again (see the module docs).
pub const FRAME_IMAGE: u64 = 64 << 20;

/// Where a frame of a packed stream ends: a decoder can start afresh here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameEnd {
    /// Bytes of the packed stream before it.
    pub stream: u64,
    /// Bytes of the image before it.
    pub image: u64,
}

/// What a source does to its image's bytes before they travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Send the image as it is (a compressed image file is decoded first).
    #[default]
    Off,
    /// Pack with Zstandard at this level (1–19; negative levels are faster).
    Zstd(i32),
    /// Pack an image file when a sample of it shrinks by [`AUTO_MIN_RATIO`]
    /// or more and packs faster than the nodes' link carries
    /// ([`auto_packs`]), send it as it is otherwise; a `.zst` image is
    /// always sent packed.
    Auto,
}

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let level = |l: &str| {
            l.parse::<i32>()
                .ok()
                .filter(|l| (-7..=19).contains(l) && *l != 0)
                .ok_or_else(|| {
                    format!("zstd level {l:?}: give a number from 1 to 19 (or -7 to -1)")
                })
        };
        match s {
            "off" | "none" => Ok(Compression::Off),
            "auto" => Ok(Compression::Auto),
            "zstd" => Ok(Compression::Zstd(DEFAULT_LEVEL)),
            _ => match s.strip_prefix("zstd:") {
                Some(l) => level(l).map(Compression::Zstd),
                None => Err(format!(
                    "unknown compression {s:?}: use off, auto, zstd or zstd:LEVEL"
                )),
            },
        }
    }
}

/// `auto` packs an image whose sample shrinks at least this much: below it,
/// the source's and the nodes' CPU buys less than a fifth of the wire.
pub const AUTO_MIN_RATIO: f64 = 1.2;

/// How an image file is stored, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// The image's own bytes.
    Raw,
    /// A Zstandard stream.
    Zstd,
    /// An xz stream.
    Xz,
    /// A gzip stream.
    Gzip,
}

impl ImageFormat {
    /// Recognises a file's format by its magic number. Block devices and
    /// anything else without a known magic are [`ImageFormat::Raw`].
    pub fn sniff(path: &Path) -> Result<Self, Error> {
        let mut head = [0u8; 6];
        let mut file =
            File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let mut n = 0;
        while n < head.len() {
            match file.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
            }
        }
        Ok(match &head[..n] {
            [0x28, 0xb5, 0x2f, 0xfd, ..] => ImageFormat::Zstd,
            [0xfd, b'7', b'z', b'X', b'Z', 0] => ImageFormat::Xz,
            [0x1f, 0x8b, ..] => ImageFormat::Gzip,
            _ => ImageFormat::Raw,
        })
    }
}

/// The end of a packed stream: the unpacked image's size and keyed digest,
/// in a Zstandard skippable frame (decoders pass over it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// The image's size in bytes.
    pub size: u64,
    /// The image's keyed digest.
    pub digest: Digest,
}

impl Trailer {
    /// Encoded size: frame magic and length, a tag, the size, the digest.
    pub const SIZE: usize = 4 + 4 + 8 + 8 + 32;
    /// Skippable frame magic (0x184D2A50–5F are reserved for such frames).
    const MAGIC: u32 = 0x184D_2A5B;
    const TAG: &'static [u8; 8] = b"ka-image";

    /// The frame's bytes.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[..4].copy_from_slice(&Self::MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&((Self::SIZE - 8) as u32).to_le_bytes());
        out[8..16].copy_from_slice(Self::TAG);
        out[16..24].copy_from_slice(&self.size.to_le_bytes());
        out[24..].copy_from_slice(&self.digest.0);
        out
    }

    /// Reads the frame back; `None` if these bytes are not one.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::SIZE] = bytes.try_into().ok()?;
        let ok = bytes[..4] == Self::MAGIC.to_le_bytes()
            && bytes[4..8] == ((Self::SIZE - 8) as u32).to_le_bytes()
            && &bytes[8..16] == Self::TAG;
        ok.then(|| Trailer {
            size: u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")),
            digest: Digest(bytes[24..].try_into().expect("32 bytes")),
        })
    }
}

/// How far a packed source has got: the image bytes it has read, so the
/// source's report can give the image's size beside the stream's, and the
/// trailer once it is made, whose digest the nodes' copies are checked by.
#[derive(Debug, Default)]
pub struct PackStats {
    /// Unpacked image bytes read so far.
    pub image: std::sync::atomic::AtomicU64,
    /// The stream's trailer, once produced.
    pub trailer: std::sync::OnceLock<Trailer>,
}

/// A Zstandard decoder that also tells whether what it decoded ends at a
/// frame's end, which a complete stream must.
struct FrameDecoder {
    decoder: RawDecoder<'static>,
    /// The decoder's last hint: 0 once a frame ended exactly.
    hint: usize,
    out: Vec<u8>,
    /// What is decoded, for errors.
    what: &'static str,
}

impl FrameDecoder {
    fn new(what: &'static str) -> Result<Self, Error> {
        Ok(FrameDecoder {
            decoder: RawDecoder::new().map_err(|e| Error::io("starting the zstd decoder", e))?,
            hint: 0,
            out: vec![0u8; zstd::zstd_safe::DCtx::out_size()],
            what,
        })
    }

    /// Decodes `bytes`, handing what comes out to `out` in order, up to
    /// the end of a frame or of `bytes`, whichever comes first; returns how
    /// many bytes it used. (Stopping at a frame's end tells the caller
    /// exactly where a decoder could start afresh.)
    fn decode_some(
        &mut self,
        bytes: &[u8],
        out: &mut dyn FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<usize, Error> {
        let mut input = InBuffer::around(bytes);
        loop {
            let mut output = OutBuffer::around(&mut self.out[..]);
            let before = input.pos;
            let hint = self
                .decoder
                .run(&mut input, &mut output)
                .map_err(|e| Error::Invalid(format!("{}: {e}", self.what)))?;
            let got = output.pos();
            // A call that moved nothing after a frame's end asks for the
            // next frame's header: only calls that did something tell
            // whether the stream stands at a frame's end.
            let moved = input.pos > before || got > 0;
            if moved {
                self.hint = hint;
            }
            if got > 0 {
                out(&self.out[..got])?;
            }
            // A frame ended, everything of it handed on.
            if moved && hint == 0 {
                return Ok(input.pos);
            }
            // Done once it is all in and the decoder had room to spare: it
            // holds nothing back.
            if input.pos == bytes.len() && got < self.out.len() {
                return Ok(input.pos);
            }
        }
    }

    /// Decodes all of `bytes`, handing what comes out to `out` in order.
    fn decode(
        &mut self,
        bytes: &[u8],
        out: &mut dyn FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut used = 0;
        while used < bytes.len() {
            used += self.decode_some(&bytes[used..], out)?;
        }
        Ok(())
    }

    /// Whether what was decoded so far ends exactly at a frame's end.
    fn at_frame_end(&self) -> bool {
        self.hint == 0
    }
}

/// The packed stream of an image, as a byte stream (see the module docs):
/// either an image read and compressed here, or a `.zst` file sent as it
/// is. Wrap it in a [`super::sources::StreamSource`] to serve it; the
/// source spools it like any stream, so any node can resume from any
/// offset of it.
pub struct PackedSource {
    input: Input,
    hasher: Option<ImageHasher>,
    /// Produced and not yet read, from `out_at` on.
    out: Vec<u8>,
    out_at: usize,
    stats: std::sync::Arc<PackStats>,
}

enum Input {
    /// Image records, compressed here.
    Pack {
        source: Box<dyn ImageSource>,
        encoder: zstd::stream::raw::Encoder<'static>,
        buf: Vec<u8>,
        /// Frames: how much image each holds, and how much the open one has.
        frame: u64,
        in_frame: u64,
    },
    /// A Zstandard file, sent as it is and decoded beside for its digest.
    Passthrough {
        file: File,
        frames: FrameDecoder,
        buf: Vec<u8>,
    },
}

impl PackedSource {
    /// Packs the records of `source` at `level` with `workers` threads
    /// (0: on the reading thread), a frame per `frame` bytes of image
    /// ([`FRAME_IMAGE`]), digesting them with `key`.
    pub fn pack(
        source: Box<dyn ImageSource>,
        level: i32,
        workers: u32,
        frame: u64,
        key: &DigestKey,
    ) -> Result<Self, Error> {
        let mut encoder = zstd::stream::raw::Encoder::new(level)
            .map_err(|e| Error::io("starting the zstd encoder", e))?;
        if workers > 0 {
            use zstd::zstd_safe::CParameter;
            encoder
                .set_parameter(CParameter::NbWorkers(workers))
                .map_err(|e| Error::io("starting zstd's workers", e))?;
        }
        // Nodes check the trailer's digest; a frame checksum would be a
        // second, weaker check of the same bytes.
        encoder
            .set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false))
            .map_err(|e| Error::io("configuring the zstd encoder", e))?;
        Ok(Self::new(
            Input::Pack {
                source,
                encoder,
                buf: vec![0u8; crate::datapath::BUF_SIZE],
                frame: frame.max(1),
                in_frame: 0,
            },
            key,
        ))
    }

    /// Sends the Zstandard file `path` as it is.
    pub fn passthrough(path: &Path, key: &DigestKey) -> Result<Self, Error> {
        let file =
            File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        Ok(Self::new(
            Input::Passthrough {
                file,
                frames: FrameDecoder::new("the zstd image")?,
                buf: vec![0u8; 1 << 20],
            },
            key,
        ))
    }

    fn new(input: Input, key: &DigestKey) -> Self {
        PackedSource {
            input,
            hasher: Some(ImageHasher::new(key)),
            out: Vec::new(),
            out_at: 0,
            stats: Default::default(),
        }
    }

    /// Its progress counters, shared.
    pub fn stats(&self) -> std::sync::Arc<PackStats> {
        std::sync::Arc::clone(&self.stats)
    }

    /// Produces more of the stream into `out`, the trailer last (the
    /// hasher goes with it: nothing follows).
    fn produce(&mut self) -> Result<(), Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let hasher = self.hasher.as_mut().expect("hasher until the trailer");
        let mut ended = None;
        match &mut self.input {
            Input::Pack {
                source,
                encoder,
                buf,
                frame,
                in_frame,
            } => match source.next_record(buf)? {
                None => {
                    return Err(Error::Truncated {
                        at: hasher.position(),
                    })
                }
                Some(h) => {
                    let mut framed = Framed {
                        encoder,
                        frame: *frame,
                        in_frame,
                        out: &mut self.out,
                    };
                    match h.kind {
                        RecordKind::Data => {
                            let data = &buf[..h.len as usize];
                            hasher.data(h.offset, data)?;
                            framed.compress(data)?;
                        }
                        RecordKind::Zero => {
                            hasher.zero(h.offset, h.len)?;
                            let mut left = h.len;
                            while left > 0 {
                                let n = left.min(BLOCK) as usize;
                                framed.compress(&super::ZEROS[..n])?;
                                left -= n as u64;
                            }
                        }
                        RecordKind::End => {
                            if *in_frame > 0 || h.offset == 0 {
                                // An empty image is still one (empty) frame.
                                finish(encoder, &mut self.out)?;
                            }
                            ended = Some(h.offset);
                        }
                    }
                    self.stats.image.fetch_add(h.len, Relaxed);
                }
            },
            Input::Passthrough { file, frames, buf } => {
                let n = read_some(file, buf)?;
                if n == 0 {
                    if !frames.at_frame_end() {
                        return Err(Error::Invalid(
                            "the zstd image ends inside a frame: is it complete?".into(),
                        ));
                    }
                    ended = Some(hasher.position());
                } else {
                    self.out.extend_from_slice(&buf[..n]);
                    let stats = &self.stats;
                    frames.decode(&buf[..n], &mut |decoded| {
                        stats.image.fetch_add(decoded.len() as u64, Relaxed);
                        hasher.data(hasher.position(), decoded)
                    })?;
                }
            }
        }
        if let Some(size) = ended {
            let digest = self.hasher.take().expect("hasher").finish(size)?;
            let trailer = Trailer { size, digest };
            self.out.extend_from_slice(&trailer.encode());
            let _ = self.stats.trailer.set(trailer);
        }
        Ok(())
    }
}

/// A packing encoder that ends its frame every `frame` bytes of image.
struct Framed<'a> {
    encoder: &'a mut zstd::stream::raw::Encoder<'static>,
    frame: u64,
    in_frame: &'a mut u64,
    out: &'a mut Vec<u8>,
}

impl Framed<'_> {
    /// Packs `data`, ending the frame wherever it reaches `frame` bytes.
    fn compress(&mut self, mut data: &[u8]) -> Result<(), Error> {
        while !data.is_empty() {
            let room = (self.frame - *self.in_frame).min(data.len() as u64) as usize;
            compress(self.encoder, &data[..room], self.out)?;
            *self.in_frame += room as u64;
            data = &data[room..];
            if *self.in_frame == self.frame {
                // The next bytes open a new frame, with the same settings.
                finish(self.encoder, self.out)?;
                *self.in_frame = 0;
            }
        }
        Ok(())
    }
}

fn read_some(file: &mut File, buf: &mut [u8]) -> Result<usize, Error> {
    loop {
        match file.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("reading the zstd image", e)),
        }
    }
}

/// Runs `data` through the encoder, appending what it emits to `out`.
fn compress(
    encoder: &mut zstd::stream::raw::Encoder<'static>,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    let mut input = InBuffer::around(data);
    while input.pos < data.len() {
        let room = out.len();
        out.resize(room + zstd::zstd_safe::CCtx::out_size(), 0);
        let mut output = OutBuffer::around(&mut out[room..]);
        encoder
            .run(&mut input, &mut output)
            .map_err(|e| Error::io("compressing", e))?;
        let got = output.pos();
        out.truncate(room + got);
    }
    Ok(())
}

/// Ends the encoder's frame, appending the rest to `out`.
fn finish(
    encoder: &mut zstd::stream::raw::Encoder<'static>,
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    loop {
        let room = out.len();
        out.resize(room + zstd::zstd_safe::CCtx::out_size(), 0);
        let mut output = OutBuffer::around(&mut out[room..]);
        let left = encoder
            .finish(&mut output, true)
            .map_err(|e| Error::io("compressing", e))?;
        let got = output.pos();
        out.truncate(room + got);
        if left == 0 {
            return Ok(());
        }
    }
}

impl Read for PackedSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.out_at == self.out.len() {
            self.out.clear();
            self.out_at = 0;
            if self.hasher.is_none() {
                // The trailer was produced and read: the stream is over.
                return Ok(0);
            }
            self.produce().map_err(io::Error::other)?;
        }
        let n = buf.len().min(self.out.len() - self.out_at);
        buf[..n].copy_from_slice(&self.out[self.out_at..self.out_at + n]);
        self.out_at += n;
        Ok(n)
    }
}

/// What a sample of an image says about packing it: how much it shrinks,
/// and how fast this machine packs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Sampled bytes over their packed size.
    pub ratio: f64,
    /// Image bytes per second this source would pack at [`DEFAULT_LEVEL`]:
    /// the sample's own speed on one core, times the zstd workers a packing
    /// source runs here.
    pub pack_rate: f64,
}

/// Samples the image at `path` (of `size` bytes): up to 16 pieces of 1 MiB
/// spread over it, packed at [`DEFAULT_LEVEL`] and timed, all-zero pieces
/// left out (holes cost nothing either way). `None` if every piece is zero.
pub fn sample_image(path: &Path, size: u64) -> Result<Option<Sample>, Error> {
    use std::os::unix::fs::FileExt;
    const PIECE: u64 = 1 << 20;
    const PIECES: u64 = 16;
    let file = File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut buf = vec![0u8; PIECE as usize];
    let mut compressor = zstd::bulk::Compressor::new(DEFAULT_LEVEL)
        .map_err(|e| Error::io("starting the zstd encoder", e))?;
    let (mut raw, mut packed) = (0usize, 0usize);
    let mut packing = std::time::Duration::ZERO;
    for i in 0..PIECES {
        let at = (size.saturating_sub(PIECE)) / PIECES.max(1) * i;
        let n = (size - at.min(size)).min(PIECE) as usize;
        if n == 0 {
            break;
        }
        file.read_exact_at(&mut buf[..n], at)
            .map_err(|e| Error::io(format!("sampling {}", path.display()), e))?;
        if is_zero(&buf[..n]) {
            continue;
        }
        raw += n;
        let started = std::time::Instant::now();
        packed += compressor
            .compress(&buf[..n])
            .map_err(|e| Error::io("compressing a sample", e))?
            .len();
        packing += started.elapsed();
    }
    Ok((packed > 0).then(|| Sample {
        ratio: raw as f64 / packed as f64,
        pack_rate: raw as f64 / packing.as_secs_f64().max(1e-6) * f64::from(pack_workers()),
    }))
}

/// The rate the nodes' links carry, which `auto` weighs packing against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRate {
    /// Bytes per second.
    pub bytes_per_sec: u64,
    /// Where the figure comes from, for the line that explains the choice
    /// (`eth0's 10000 Mbit/s`, `--link-rate`).
    pub from: String,
}

/// `auto` packs only when the sample packs this many times faster than the
/// link carries: the sample times zstd alone, and the source's pipeline
/// (reading, records, spooling) packs about a third slower than that.
pub const AUTO_RATE_MARGIN: f64 = 1.5;

/// `auto`'s choice for an image file: whether to pack it, and one line
/// that says why. Packing pays when the image shrinks by
/// [`AUTO_MIN_RATIO`] or more *and* the source packs faster than the link
/// carries: a chain then moves `min(pack rate, ratio × link)` of image per
/// second instead of `link`. Packing slower than the link would make the
/// copy slower, however well the image packs. Without a known link rate the
/// ratio decides alone.
pub fn auto_packs(sample: Option<Sample>, link: Option<&LinkRate>) -> (bool, String) {
    let Some(s) = sample else {
        return (
            false,
            "the image's sample is all zeros (sent as holes anyway): sending it as it is".into(),
        );
    };
    let r = s.ratio;
    if r < AUTO_MIN_RATIO {
        return (
            false,
            format!("a sample of the image packs only {r:.2}:1: sending it as it is"),
        );
    }
    let shrinks = format!("a sample of the image packs {r:.2}:1");
    let packs = s.pack_rate / 1e6;
    let Some(l) = link else {
        return (
            true,
            format!(
                "{shrinks}: sending it packed with zstd \
                 (no link rate known to weigh this source's {packs:.0} MB/s against; --link-rate gives one)"
            ),
        );
    };
    let carries = l.bytes_per_sec as f64 / 1e6;
    if s.pack_rate < l.bytes_per_sec as f64 * AUTO_RATE_MARGIN {
        return (
            false,
            format!(
                "{shrinks}, but this source packs about {packs:.0} MB/s, too slow for {} \
                 ({carries:.0} MB/s): sending it as it is (--compress zstd packs anyway)",
                l.from
            ),
        );
    }
    (
        true,
        format!(
            "{shrinks} and this source packs about {packs:.0} MB/s, more than {} carries \
             ({carries:.0} MB/s): sending it packed with zstd",
            l.from
        ),
    )
}

/// Unpacks a packed stream: fed the stream piece by piece
/// ([`Unpacker::feed`]), it hands on the image's bytes as they come and
/// digests them; at the end ([`Unpacker::finish`]) it checks them against
/// the stream's [`Trailer`]. [`SinkWriter`] writes what it hands on to a
/// file or device.
pub struct Unpacker {
    frames: FrameDecoder,
    hasher: ImageHasher,
    /// The stream's last [`Trailer::SIZE`] bytes are not fed to the decoder
    /// until more follows: at the end they are the trailer.
    held: Vec<u8>,
    /// Stream bytes decoded so far (counted from the stream's start).
    decoded: u64,
    /// Image bytes handed on so far.
    unpacked: u64,
    /// The last frame end decoded.
    frame_end: FrameEnd,
}

impl Unpacker {
    /// An unpacker digesting with `key`.
    pub fn new(key: &DigestKey) -> Result<Self, Error> {
        Self::resume(ImageHasher::new(key), 0)
    }

    /// An unpacker going on from a frame end: the stream from offset
    /// `stream` on unpacks to the image from `hasher`'s position on, and
    /// `hasher` has digested the image before it.
    pub fn resume(hasher: ImageHasher, stream: u64) -> Result<Self, Error> {
        let image = hasher.position();
        Ok(Unpacker {
            frames: FrameDecoder::new("unpacking the stream")?,
            hasher,
            held: Vec::with_capacity(2 * Trailer::SIZE),
            decoded: stream,
            unpacked: image,
            frame_end: FrameEnd { stream, image },
        })
    }

    /// The last frame end unpacked: everything before it in the image has
    /// been handed on, and a decoder could start afresh there.
    pub fn frame_end(&self) -> FrameEnd {
        self.frame_end
    }

    /// Takes the next piece of the packed stream, handing what it unpacks
    /// to `out` in order.
    pub fn feed(
        &mut self,
        piece: &[u8],
        out: &mut dyn FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        // Keep the last trailer's worth back; decode the rest.
        self.held.extend_from_slice(piece);
        if self.held.len() <= Trailer::SIZE {
            return Ok(());
        }
        let feed = self.held.len() - Trailer::SIZE;
        let Unpacker {
            frames,
            hasher,
            held,
            decoded,
            unpacked,
            frame_end,
        } = self;
        let mut used = 0;
        while used < feed {
            used += frames.decode_some(&held[used..feed], &mut |chunk| {
                hasher.data(*unpacked, chunk)?;
                *unpacked += chunk.len() as u64;
                out(chunk)
            })?;
            if frames.at_frame_end() {
                *frame_end = FrameEnd {
                    stream: *decoded + used as u64,
                    image: *unpacked,
                };
            }
        }
        *decoded += feed as u64;
        held.drain(..feed);
        Ok(())
    }

    /// The stream has ended: checks what was unpacked against its trailer,
    /// which it returns.
    pub fn finish(self) -> Result<Trailer, Error> {
        let trailer = Trailer::decode(&self.held).ok_or_else(|| {
            Error::Invalid(
                "the stream does not end with ka's trailer: is the source's stream packed by ka?"
                    .into(),
            )
        })?;
        if !self.frames.at_frame_end() {
            return Err(Error::Invalid(
                "the packed stream ends inside a zstd frame".into(),
            ));
        }
        if self.unpacked != trailer.size {
            return Err(Error::Invalid(format!(
                "the stream unpacked to {} bytes, the image has {}",
                self.unpacked, trailer.size
            )));
        }
        let digest = self.hasher.finish(trailer.size)?;
        if digest != trailer.digest {
            return Err(Error::Invalid(
                "the unpacked image's digest differs from the source's".into(),
            ));
        }
        Ok(trailer)
    }
}

/// Writes an unpacked image to a sink in whole blocks, so zero blocks are
/// found as blocks and left as holes.
pub struct SinkWriter<'s> {
    sink: &'s mut dyn ImageSink,
    pending: Vec<u8>,
    written: u64,
    /// The size the source announced, if it did: an image growing past it
    /// is refused before it overruns the target.
    expected: Option<u64>,
}

impl<'s> SinkWriter<'s> {
    /// A writer to `sink`, from where it stands (0 for a new image), of an
    /// image of `expected` bytes if known.
    pub fn new(sink: &'s mut dyn ImageSink, expected: Option<u64>) -> Self {
        let written = sink.position();
        SinkWriter {
            sink,
            pending: Vec::with_capacity(crate::datapath::BUF_SIZE),
            written,
            expected,
        }
    }

    /// Writes what it holds of the image before `offset` to the sink
    /// (not yet durable: that takes the sink's sync), so a frame end can be
    /// recorded once the target is synced.
    pub fn write_through(&mut self, offset: u64) -> Result<(), Error> {
        let behind = offset.saturating_sub(self.written);
        self.flush_bytes((behind as usize).min(self.pending.len()))
    }

    /// Takes the next bytes of the image.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= crate::datapath::BUF_SIZE {
            self.flush(false)?;
        }
        Ok(())
    }

    /// Writes the pending whole blocks (all of it when `all`).
    fn flush(&mut self, all: bool) -> Result<(), Error> {
        let len = self.pending.len();
        self.flush_bytes(if all { len } else { len - len % BLOCK as usize })
    }

    /// Writes the first `whole` pending bytes.
    fn flush_bytes(&mut self, whole: usize) -> Result<(), Error> {
        if let Some(max) = self.expected {
            if self.written + whole as u64 > max {
                return Err(Error::Invalid(format!(
                    "the stream unpacks to more than the {max} bytes the source announced"
                )));
            }
        }
        let block = |i: usize| &self.pending[i..(i + BLOCK as usize).min(whole)];
        let mut i = 0;
        while i < whole {
            let zero = is_zero(block(i));
            let mut j = i;
            while j < whole && is_zero(block(j)) == zero {
                j = (j + BLOCK as usize).min(whole);
            }
            if zero {
                self.sink.write_zero(self.written, (j - i) as u64)?;
            } else {
                self.sink.write_data(self.written, &self.pending[i..j])?;
            }
            self.written += (j - i) as u64;
            i = j;
        }
        self.pending.drain(..whole);
        Ok(())
    }

    /// Writes the rest and ends the image at `size` (durable once this
    /// returns).
    pub fn finish(mut self, size: u64) -> Result<(), Error> {
        self.flush(true)?;
        if self.written != size {
            return Err(Error::Invalid(format!(
                "unpacked {} bytes, the image has {size}",
                self.written
            )));
        }
        self.sink.finish(size)
    }
}

impl std::fmt::Debug for PackedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedSource")
            .field("ended", &self.hasher.is_none())
            .finish_non_exhaustive()
    }
}

/// A stream for a source to spool and serve, and how it encodes the image.
pub struct EncodedStream {
    /// The stream.
    pub source: Box<dyn ImageSource>,
    /// How it encodes the image (told to every node).
    pub encoding: ka_core::codec::Encoding,
    /// The packing's counters, when it is packed here: the report gives the
    /// image's size beside the stream's.
    pub stats: Option<std::sync::Arc<PackStats>>,
}

impl std::fmt::Debug for EncodedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodedStream")
            .field("encoding", &self.encoding)
            .finish_non_exhaustive()
    }
}

/// What a source serves once its compression is decided.
#[derive(Debug)]
pub enum Plan {
    /// The image file as it is, plain (served straight from the file).
    File,
    /// A stream made of it: packed, or decoded from a compressed file.
    Stream(EncodedStream),
}

/// The zstd worker threads a packing source uses besides its reading
/// thread: one per spare core, at most four (more do not pay at the rates
/// one source's link carries).
fn pack_workers() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    cores.saturating_sub(1).clamp(1, 4)
}

/// Packs `source` (an image of `size` bytes, if known) at `level`: what
/// `--compress zstd` makes of a stream (a command, a tar, a system), and
/// of an image file that [`plan_file`] decides to pack.
pub fn pack_stream(
    source: Box<dyn ImageSource>,
    level: i32,
    size: Option<u64>,
    key: &DigestKey,
) -> Result<EncodedStream, Error> {
    let packed = PackedSource::pack(source, level, pack_workers(), FRAME_IMAGE, key)?;
    let stats = packed.stats();
    Ok(EncodedStream {
        source: Box::new(super::sources::StreamSource::new(packed)),
        encoding: ka_core::codec::Encoding::Zstd { image_size: size },
        stats: Some(stats),
    })
}

/// Decides how the image file at `path` travels under `compression`:
/// a raw image as it is or packed (with `auto`, as [`auto_packs`] decides
/// from a sample and the nodes' `link`); a `.zst` image as it is, packed
/// (decoded first with `off`); a gzip or xz image decoded, then packed
/// unless `off`. `why` receives one line saying what was decided.
pub fn plan_file(
    path: &Path,
    compression: Compression,
    link: Option<&LinkRate>,
    key: &DigestKey,
    why: &mut dyn FnMut(String),
) -> Result<Plan, Error> {
    use super::sources::{FileSource, StreamSource};
    let format = if std::fs::metadata(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        .file_type()
        .is_file()
    {
        ImageFormat::sniff(path)?
    } else {
        ImageFormat::Raw
    };
    let open = || File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e));
    let decoded: Box<dyn ImageSource> = match format {
        ImageFormat::Raw => {
            let level = match compression {
                Compression::Off => return Ok(Plan::File),
                Compression::Zstd(level) => level,
                Compression::Auto => {
                    let size = FileSource::open(path)?.size().unwrap_or(0);
                    let (pack, line) = auto_packs(sample_image(path, size)?, link);
                    why(line);
                    if !pack {
                        return Ok(Plan::File);
                    }
                    DEFAULT_LEVEL
                }
            };
            let source = FileSource::open(path)?;
            let size = source.size();
            return pack_stream(Box::new(source), level, size, key).map(Plan::Stream);
        }
        ImageFormat::Zstd => {
            if compression != Compression::Off {
                why("the image is a zstd stream: sending it as it is".into());
                let packed = PackedSource::passthrough(path, key)?;
                let stats = packed.stats();
                return Ok(Plan::Stream(EncodedStream {
                    source: Box::new(StreamSource::new(packed)),
                    encoding: ka_core::codec::Encoding::Zstd { image_size: None },
                    stats: Some(stats),
                }));
            }
            why("the image is a zstd stream: decoding it at the source (--compress off)".into());
            let decoder = zstd::stream::read::Decoder::new(open()?)
                .map_err(|e| Error::io("starting the zstd decoder", e))?;
            Box::new(StreamSource::new(decoder))
        }
        ImageFormat::Gzip => {
            why("the image is gzip: decoding it at the source".into());
            Box::new(StreamSource::new(flate2::read::MultiGzDecoder::new(
                io::BufReader::with_capacity(1 << 20, open()?),
            )))
        }
        ImageFormat::Xz => {
            why("the image is xz: decoding it at the source with xz -dc".into());
            let mut xz = std::process::Command::new("xz");
            xz.args(["-dc", "-T0", "--"]).arg(path);
            Box::new(super::sources::CommandSource::spawn(
                xz,
                format!("xz -dc {}", path.display()),
            )?)
        }
    };
    match compression {
        Compression::Off => Ok(Plan::Stream(EncodedStream {
            source: decoded,
            encoding: ka_core::codec::Encoding::Plain,
            stats: None,
        })),
        Compression::Zstd(level) => pack_stream(decoded, level, None, key).map(Plan::Stream),
        Compression::Auto => pack_stream(decoded, DEFAULT_LEVEL, None, key).map(Plan::Stream),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::digest::digest_file;
    use crate::image::sinks::FileSink;
    use crate::image::sources::{FileSource, StreamSource};
    use std::io::Write;

    const KEY: DigestKey = DigestKey([9; 32]);

    /// An image like a disk's: text that packs well, random bytes that do
    /// not, written zeros and a hole at the end.
    fn disk_like(path: &Path) -> Vec<u8> {
        let mut img = Vec::new();
        let words = [
            "kernel ",
            "module ",
            "libc.so.6 ",
            "/usr/lib ",
            "systemd ",
            "\n",
        ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rand = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        while img.len() < 3 << 20 {
            img.extend_from_slice(words[(rand() % 6) as usize].as_bytes());
        }
        img.extend((0..(1 << 20)).map(|_| rand() as u8));
        img.extend(std::iter::repeat_n(0u8, 1 << 20));
        let mut f = File::create(path).unwrap();
        f.write_all(&img).unwrap();
        // A hole of 2 MiB at the end.
        f.set_len(img.len() as u64 + (2 << 20)).unwrap();
        img.resize(img.len() + (2 << 20), 0);
        img
    }

    fn packed_bytes(mut source: PackedSource) -> Vec<u8> {
        let mut out = Vec::new();
        source.read_to_end(&mut out).unwrap();
        out
    }

    fn unpack_to(stream: &[u8], target: &Path, pieces: usize) -> Result<Trailer, Error> {
        let mut sink = FileSink::open(target, None)?;
        let mut unpacker = Unpacker::new(&KEY)?;
        let mut writer = SinkWriter::new(&mut sink, None);
        for piece in stream.chunks(pieces) {
            unpacker.feed(piece, &mut |b| writer.write(b))?;
        }
        let trailer = unpacker.finish()?;
        writer.finish(trailer.size)?;
        Ok(trailer)
    }

    #[test]
    fn a_packed_image_unpacks_to_the_same_bytes_and_its_trailer_holds_the_images_own_digest() {
        let dir = tempfile::tempdir().unwrap();
        let (image, target) = (dir.path().join("image"), dir.path().join("target"));
        let bytes = disk_like(&image);
        let source = FileSource::open(&image).unwrap();
        let stream =
            packed_bytes(PackedSource::pack(Box::new(source), 3, 1, FRAME_IMAGE, &KEY).unwrap());
        assert!(
            stream.len() < bytes.len() / 2,
            "{} bytes packed to {}",
            bytes.len(),
            stream.len()
        );
        // Pieces of odd sizes: the trailer is found however the stream is cut.
        let trailer = unpack_to(&stream, &target, 77_777).unwrap();
        assert_eq!(trailer.size, bytes.len() as u64);
        assert_eq!(trailer.digest, digest_file(&image, &KEY).unwrap());
        assert_eq!(std::fs::read(&target).unwrap(), bytes);
        // The written zeros and the hole stay holes in the copy.
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&target).unwrap().blocks() * 512;
        assert!(
            blocks <= (4 << 20) + (256 << 10),
            "{blocks} bytes allocated"
        );
        // `zstd -d` reads the stream as it is: the trailer is a skippable frame.
        let plain = zstd::stream::decode_all(&stream[..]).unwrap();
        assert_eq!(plain, bytes);
    }

    /// Every frame end `stream` passes, fed in pieces of `piece` bytes.
    fn frame_ends(stream: &[u8], piece: usize) -> Vec<FrameEnd> {
        let mut unpacker = Unpacker::new(&KEY).unwrap();
        let mut ends = vec![];
        for p in stream.chunks(piece) {
            unpacker.feed(p, &mut |_| Ok(())).unwrap();
            if ends.last() != Some(&unpacker.frame_end()) {
                ends.push(unpacker.frame_end());
            }
        }
        unpacker.finish().unwrap();
        ends
    }

    #[test]
    fn a_packing_source_ends_a_frame_per_frame_of_image_and_a_node_goes_on_from_any_frame_end() {
        let dir = tempfile::tempdir().unwrap();
        let (image, target) = (dir.path().join("image"), dir.path().join("target"));
        let bytes = disk_like(&image);
        let size = bytes.len() as u64;
        let frame = 1 << 20;
        let source = FileSource::open(&image).unwrap();
        let stream = packed_bytes(PackedSource::pack(Box::new(source), 3, 1, frame, &KEY).unwrap());
        // Frame ends where the image reaches each MiB, the last one at the
        // image's end. Fed in larger pieces, the unpacker tells the last
        // frame end of each, one of the same.
        let ends = frame_ends(&stream, 13);
        let coarse = frame_ends(&stream, 77_777);
        assert!(
            coarse.iter().all(|e| ends.contains(e)),
            "{coarse:?} {ends:?}"
        );
        assert_eq!(coarse.last(), ends.last());
        let images: Vec<u64> = ends.iter().map(|e| e.image).collect();
        let mut expected: Vec<u64> = (0..=size / frame).map(|k| k * frame).collect();
        if size % frame != 0 {
            expected.push(size);
        }
        assert_eq!(images[1..], expected[1..], "{ends:?}");
        assert_eq!(
            ends.last().unwrap().stream,
            (stream.len() - Trailer::SIZE) as u64
        );
        // A node that stopped at a frame end and kept the image before it
        // goes on from there: the whole image and its digest come out.
        let full = digest_file(&image, &KEY).unwrap();
        for end in &ends[1..ends.len() - 1] {
            std::fs::write(&target, &bytes[..end.image as usize]).unwrap();
            let mut sink = FileSink::open(&target, None).unwrap();
            sink.resume(end.image).unwrap();
            let hasher = crate::datapath::rehash_written(&sink, &KEY).unwrap();
            let mut unpacker = Unpacker::resume(hasher, end.stream).unwrap();
            let mut writer = SinkWriter::new(&mut sink, None);
            for p in stream[end.stream as usize..].chunks(100_000) {
                unpacker.feed(p, &mut |b| writer.write(b)).unwrap();
            }
            let trailer = unpacker.finish().unwrap();
            writer.finish(trailer.size).unwrap();
            assert_eq!(trailer.digest, full, "from {end:?}");
            assert!(std::fs::read(&target).unwrap() == bytes, "from {end:?}");
        }
        // One frame for the whole image: nowhere to go on from but the end.
        let source = FileSource::open(&image).unwrap();
        let one = packed_bytes(PackedSource::pack(Box::new(source), 3, 0, u64::MAX, &KEY).unwrap());
        let ends = frame_ends(&one, 1 << 16);
        assert_eq!(ends.len(), 2, "{ends:?}");
        assert_eq!(ends[1].image, size);
        // A resume from anywhere but a frame end is refused.
        let mut unpacker = Unpacker::resume(ImageHasher::new(&KEY), 1000).unwrap();
        let e = unpacker
            .feed(&stream[1000..], &mut |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unpacking"), "{e}");
    }

    #[test]
    fn a_zstd_file_is_sent_as_it_is_with_the_trailer_of_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let (image, zst, target) = (
            dir.path().join("image"),
            dir.path().join("image.zst"),
            dir.path().join("target"),
        );
        let bytes = disk_like(&image);
        // Two frames, as `zstd` writes for concatenated files.
        let mut file = zstd::stream::encode_all(&bytes[..1 << 20], 5).unwrap();
        file.extend(zstd::stream::encode_all(&bytes[1 << 20..], 5).unwrap());
        std::fs::write(&zst, &file).unwrap();
        assert_eq!(ImageFormat::sniff(&zst).unwrap(), ImageFormat::Zstd);
        assert_eq!(ImageFormat::sniff(&image).unwrap(), ImageFormat::Raw);
        let stream = packed_bytes(PackedSource::passthrough(&zst, &KEY).unwrap());
        assert_eq!(
            &stream[..file.len()],
            &file[..],
            "the file's bytes, unchanged"
        );
        assert_eq!(stream.len(), file.len() + Trailer::SIZE);
        // A node can go on from the end of the file's first frame.
        let ends = frame_ends(&stream, 1 << 16);
        assert_eq!(ends[1].image, 1 << 20, "{ends:?}");
        assert_eq!(ends.len(), 3, "{ends:?}");
        let trailer = unpack_to(&stream, &target, 1 << 20).unwrap();
        assert_eq!(trailer.digest, digest_file(&image, &KEY).unwrap());
        assert_eq!(std::fs::read(&target).unwrap(), bytes);
    }

    #[test]
    fn a_cut_or_altered_stream_is_refused_never_taken_for_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let (image, target) = (dir.path().join("image"), dir.path().join("target"));
        disk_like(&image);
        let source = FileSource::open(&image).unwrap();
        let stream =
            packed_bytes(PackedSource::pack(Box::new(source), 3, 0, FRAME_IMAGE, &KEY).unwrap());
        // Cut before the trailer: no trailer.
        let cut = &stream[..stream.len() - Trailer::SIZE - 1000];
        let e = unpack_to(cut, &target, 1 << 16).unwrap_err().to_string();
        assert!(e.contains("trailer") || e.contains("frame"), "{e}");
        // A trailer for another image.
        let mut other = stream.clone();
        let n = other.len();
        other[n - 1] ^= 1;
        let e = unpack_to(&other, &target, 1 << 16).unwrap_err().to_string();
        assert!(e.contains("digest differs"), "{e}");
        // A plain stream is not a packed one.
        let e = unpack_to(&std::fs::read(&image).unwrap(), &target, 1 << 16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unpacking") || e.contains("trailer"), "{e}");
    }

    #[test]
    fn a_stream_of_records_packs_like_the_file_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let (image, target) = (dir.path().join("image"), dir.path().join("target"));
        let bytes = disk_like(&image);
        let source = StreamSource::new(File::open(&image).unwrap());
        let stream =
            packed_bytes(PackedSource::pack(Box::new(source), 1, 0, FRAME_IMAGE, &KEY).unwrap());
        let trailer = unpack_to(&stream, &target, 1 << 20).unwrap();
        assert_eq!(trailer.digest, digest_file(&image, &KEY).unwrap());
        assert_eq!(std::fs::read(&target).unwrap(), bytes);
    }

    #[test]
    fn auto_finds_what_packs_and_what_does_not_from_a_sample() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("text");
        disk_like(&text);
        let sampled = sample_image(&text, std::fs::metadata(&text).unwrap().len())
            .unwrap()
            .unwrap();
        assert!(sampled.ratio > AUTO_MIN_RATIO, "{sampled:?}");
        // A MB/s on the slowest machine, not a GB/s on the fastest.
        assert!((1e6..1e11).contains(&sampled.pack_rate), "{sampled:?}");
        let random = dir.path().join("random");
        let mut x = 7u64;
        let bytes: Vec<u8> = (0..(8 << 20))
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        std::fs::write(&random, &bytes).unwrap();
        let r = sample_image(&random, bytes.len() as u64)
            .unwrap()
            .unwrap()
            .ratio;
        assert!(r < 1.01, "{r}");
        let zeros = dir.path().join("zeros");
        File::create(&zeros).unwrap().set_len(8 << 20).unwrap();
        assert_eq!(sample_image(&zeros, 8 << 20).unwrap(), None);
        let mut why = Vec::new();
        let plan = plan_file(&random, Compression::Auto, None, &KEY, &mut |l| why.push(l)).unwrap();
        assert!(matches!(plan, Plan::File), "{plan:?}");
        assert!(why[0].contains("as it is"), "{why:?}");
        let plan = plan_file(&text, Compression::Auto, None, &KEY, &mut |l| why.push(l)).unwrap();
        assert!(
            matches!(
                plan,
                Plan::Stream(EncodedStream {
                    encoding: ka_core::codec::Encoding::Zstd {
                        image_size: Some(_)
                    },
                    stats: Some(_),
                    ..
                })
            ),
            "{plan:?}"
        );
        assert!(matches!(
            plan_file(&text, Compression::Off, None, &KEY, &mut |_| {}).unwrap(),
            Plan::File
        ));
    }

    #[test]
    fn auto_packs_only_what_this_source_packs_faster_than_the_link_carries() {
        let link = |mbit: u64| LinkRate {
            bytes_per_sec: mbit * 125_000,
            from: format!("eth0's {mbit} Mbit/s"),
        };
        // 3:1 at 300 MB/s of image.
        let packs_well = Some(Sample {
            ratio: 3.0,
            pack_rate: 300e6,
        });
        let (pack, why) = auto_packs(packs_well, Some(&link(1000)));
        assert!(pack, "300 MB/s beats 1 Gbit/s: {why}");
        assert!(
            why.contains("eth0's 1000 Mbit/s carries (125 MB/s)"),
            "{why}"
        );
        let (pack, why) = auto_packs(packs_well, Some(&link(10_000)));
        assert!(!pack, "300 MB/s loses to 10 Gbit/s: {why}");
        assert!(why.contains("too slow for eth0's 10000 Mbit/s"), "{why}");
        assert!(why.contains("--compress zstd packs anyway"), "{why}");
        // Within the margin: zstd alone would keep up, the source would not.
        let (pack, _) = auto_packs(packs_well, Some(&link(2000)));
        assert!(!pack, "300 MB/s is under 1.5 x 250 MB/s");
        let (pack, why) = auto_packs(packs_well, None);
        assert!(pack, "{why}");
        assert!(why.contains("--link-rate"), "{why}");
        let barely = Sample {
            ratio: 1.1,
            pack_rate: 300e6,
        };
        let (pack, why) = auto_packs(Some(barely), Some(&link(100)));
        assert!(!pack, "1.1:1 is not worth packing: {why}");
        assert!(!auto_packs(None, Some(&link(100))).0, "all zeros");
        // Through plan_file: the text packs over a slow link and is sent as
        // it is over one no source packs for.
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("text");
        disk_like(&text);
        let plan = |mbit| {
            plan_file(
                &text,
                Compression::Auto,
                Some(&link(mbit)),
                &KEY,
                &mut |_| {},
            )
        };
        assert!(matches!(plan(10).unwrap(), Plan::Stream(_)));
        assert!(matches!(plan(1 << 40).unwrap(), Plan::File));
    }

    #[test]
    fn compression_settings_parse_or_say_what_to_give() {
        assert_eq!("zstd".parse(), Ok(Compression::Zstd(DEFAULT_LEVEL)));
        assert_eq!("zstd:19".parse(), Ok(Compression::Zstd(19)));
        assert_eq!("auto".parse(), Ok(Compression::Auto));
        assert_eq!("off".parse(), Ok(Compression::Off));
        for bad in ["zstd:0", "zstd:20", "zstd:x", "gzip", ""] {
            let e = bad.parse::<Compression>().unwrap_err();
            assert!(e.contains("zstd"), "{bad}: {e}");
        }
    }
}

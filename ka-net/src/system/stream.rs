//! The system stream: how a whole machine travels as one ka image.
//!
//! A system clone is an ordinary ka session whose image is this stream, so
//! the chain, repair, authentication and the keyed digest work unchanged.
//! It is a sequence of sections, each behind a 16-byte header:
//!
//! ```text
//! "KASYSTM1"                                   magic, 8 bytes
//! PLAN  index 0  length N    N bytes of JSON   (the layout and what nodes run)
//! TREE  index i  length 0    chunks: u32 length, bytes … ; a zero length ends it
//! RAW   index i  length N    zero padding to the next BLOCK, then N bytes
//! …
//! END   index 0  length 0
//! ```
//!
//! Header fields are little-endian: a 4-byte tag, a `u32` index (the
//! partition's position in the plan's layout) and a `u64` length.
//!
//! A tree is a GNU tar archive cut into chunks, because its length is known
//! only once `tar` has finished reading a live file system; the node feeds
//! the chunks to `tar -x` as they come. A raw partition starts on a
//! [`BLOCK`] boundary of the stream so that its zero runs fall on the data
//! plane's zero blocks and cross the wire as extents, not bytes.
//!
//! [`Decoder`] takes the stream in pieces of any size, as a node receives
//! it, and never holds more than one chunk header or the plan.

use crate::image::BLOCK;
use crate::Error;

/// The first bytes of every system stream.
pub const MAGIC: &[u8; 8] = b"KASYSTM1";

/// The size of a section header.
pub const HEADER_LEN: usize = 16;

/// The largest plan a node accepts: a layout of many disks is a few
/// kilobytes, and a node must not be made to hold an unbounded one.
pub const MAX_PLAN: u64 = 16 << 20;

/// The largest tree chunk a node accepts.
pub const MAX_CHUNK: u32 = 4 << 20;

/// The kinds of section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// The plan: layout, layout file and post-command, as JSON.
    Plan,
    /// A file system as a chunked tar archive.
    Tree,
    /// A partition's bytes.
    Raw,
    /// The end of the stream.
    End,
}

impl SectionKind {
    fn tag(self) -> [u8; 4] {
        match self {
            SectionKind::Plan => *b"PLAN",
            SectionKind::Tree => *b"TREE",
            SectionKind::Raw => *b"RAW ",
            SectionKind::End => *b"END ",
        }
    }

    fn from_tag(tag: [u8; 4]) -> Option<Self> {
        [
            SectionKind::Plan,
            SectionKind::Tree,
            SectionKind::Raw,
            SectionKind::End,
        ]
        .into_iter()
        .find(|k| k.tag() == tag)
    }
}

/// Encodes a section header.
pub fn header(kind: SectionKind, index: u32, len: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&kind.tag());
    h[4..8].copy_from_slice(&index.to_le_bytes());
    h[8..].copy_from_slice(&len.to_le_bytes());
    h
}

/// The zero bytes that bring a stream at `position` to the next [`BLOCK`]
/// boundary (where a raw partition's bytes begin).
pub fn padding_after(position: u64) -> u64 {
    (BLOCK - position % BLOCK) % BLOCK
}

/// What the decoder found, in stream order. Data borrows from the piece
/// being decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The plan, whole.
    Plan(Vec<u8>),
    /// A tree begins for the partition at `index`.
    TreeStart {
        /// The partition's position in the layout.
        index: u32,
    },
    /// The next bytes of the tree's tar archive.
    TreeData(&'a [u8]),
    /// The tree is complete.
    TreeEnd,
    /// A raw partition begins.
    RawStart {
        /// The partition's position in the layout.
        index: u32,
        /// Its length in bytes.
        len: u64,
    },
    /// Bytes of the raw partition at `offset` within it.
    RawData {
        /// Where they go in the partition.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// The raw partition is complete.
    RawEnd,
    /// The stream is complete.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Magic,
    Header,
    Plan { left: u64 },
    ChunkLen,
    Chunk { left: u32 },
    Padding { left: u64, len: u64 },
    Raw { done: u64, len: u64 },
    Ended,
}

/// Decodes a system stream given in pieces of any size.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// Stream offset of the next byte.
    position: u64,
    /// A header, magic or chunk length being gathered.
    small: Vec<u8>,
    plan: Vec<u8>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Decoder {
            state: State::Magic,
            position: 0,
            small: Vec::with_capacity(HEADER_LEN),
            plan: Vec::new(),
        }
    }

    /// Stream offset of the next byte expected.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Whether the `END` section has been read.
    pub fn ended(&self) -> bool {
        self.state == State::Ended
    }

    /// Decodes `piece`, the stream's next bytes, calling `on` for each
    /// event. A malformed stream is an error that says what was expected.
    pub fn feed(
        &mut self,
        mut piece: &[u8],
        on: &mut dyn FnMut(Event<'_>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        while !piece.is_empty() {
            let used = self.step(piece, on)?;
            self.position += used as u64;
            piece = &piece[used..];
        }
        Ok(())
    }

    /// Takes what the current state needs from `piece`; returns how much.
    fn step(
        &mut self,
        piece: &[u8],
        on: &mut dyn FnMut(Event<'_>) -> Result<(), Error>,
    ) -> Result<usize, Error> {
        match self.state {
            State::Magic => {
                let used = self.gather(piece, MAGIC.len());
                if self.small.len() == MAGIC.len() {
                    if self.small != MAGIC {
                        return Err(Error::Invalid(
                            "this image is not a ka system stream (it does not start with \
                             KASYSTM1): join a `ka serve --system` session, or write the image \
                             with --target instead of --system"
                                .into(),
                        ));
                    }
                    self.small.clear();
                    self.state = State::Header;
                }
                Ok(used)
            }
            State::Header => {
                let used = self.gather(piece, HEADER_LEN);
                if self.small.len() == HEADER_LEN {
                    let at = self.position + used as u64 - HEADER_LEN as u64;
                    self.start_section(at, on)?;
                }
                Ok(used)
            }
            State::Plan { left } => {
                let n = (left as usize).min(piece.len());
                self.plan.extend_from_slice(&piece[..n]);
                let left = left - n as u64;
                if left == 0 {
                    on(Event::Plan(std::mem::take(&mut self.plan)))?;
                    self.state = State::Header;
                } else {
                    self.state = State::Plan { left };
                }
                Ok(n)
            }
            State::ChunkLen => {
                let used = self.gather(piece, 4);
                if self.small.len() == 4 {
                    let len = u32::from_le_bytes(self.small[..4].try_into().expect("4 bytes"));
                    self.small.clear();
                    if len == 0 {
                        on(Event::TreeEnd)?;
                        self.state = State::Header;
                    } else if len > MAX_CHUNK {
                        return Err(self.malformed(format!(
                            "a tree chunk of {len} bytes (at most {MAX_CHUNK})"
                        )));
                    } else {
                        self.state = State::Chunk { left: len };
                    }
                }
                Ok(used)
            }
            State::Chunk { left } => {
                let n = (left as usize).min(piece.len());
                on(Event::TreeData(&piece[..n]))?;
                let left = left - n as u32;
                self.state = if left == 0 {
                    State::ChunkLen
                } else {
                    State::Chunk { left }
                };
                Ok(n)
            }
            State::Padding { left, len } => {
                let n = (left as usize).min(piece.len());
                let left = left - n as u64;
                if left == 0 {
                    self.state = if len == 0 {
                        on(Event::RawEnd)?;
                        State::Header
                    } else {
                        State::Raw { done: 0, len }
                    };
                } else {
                    self.state = State::Padding { left, len };
                }
                Ok(n)
            }
            State::Raw { done, len } => {
                let n = ((len - done) as usize).min(piece.len());
                on(Event::RawData {
                    offset: done,
                    data: &piece[..n],
                })?;
                let done = done + n as u64;
                if done == len {
                    on(Event::RawEnd)?;
                    self.state = State::Header;
                } else {
                    self.state = State::Raw { done, len };
                }
                Ok(n)
            }
            State::Ended => Err(self.malformed("bytes after the END section".into())),
        }
    }

    fn start_section(
        &mut self,
        header_at: u64,
        on: &mut dyn FnMut(Event<'_>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let tag: [u8; 4] = self.small[..4].try_into().expect("4 bytes");
        let index = u32::from_le_bytes(self.small[4..8].try_into().expect("4 bytes"));
        let len = u64::from_le_bytes(self.small[8..16].try_into().expect("8 bytes"));
        self.small.clear();
        let Some(kind) = SectionKind::from_tag(tag) else {
            return Err(self.malformed(format!(
                "an unknown section {:?} at offset {header_at}",
                String::from_utf8_lossy(&tag)
            )));
        };
        match kind {
            SectionKind::Plan => {
                if len > MAX_PLAN {
                    return Err(self.malformed(format!("a plan of {len} bytes")));
                }
                self.state = State::Plan { left: len };
                if len == 0 {
                    return Err(self.malformed("an empty plan".into()));
                }
            }
            SectionKind::Tree => {
                on(Event::TreeStart { index })?;
                self.state = State::ChunkLen;
            }
            SectionKind::Raw => {
                on(Event::RawStart { index, len })?;
                let pad = padding_after(header_at + HEADER_LEN as u64);
                self.state = State::Padding { left: pad, len };
                if pad == 0 {
                    self.state = if len == 0 {
                        on(Event::RawEnd)?;
                        State::Header
                    } else {
                        State::Raw { done: 0, len }
                    };
                }
            }
            SectionKind::End => {
                self.state = State::Ended;
                on(Event::End)?;
            }
        }
        Ok(())
    }

    /// Moves bytes of `piece` into `small` until it holds `want`.
    fn gather(&mut self, piece: &[u8], want: usize) -> usize {
        let n = (want - self.small.len()).min(piece.len());
        self.small.extend_from_slice(&piece[..n]);
        n
    }

    fn malformed(&self, what: String) -> Error {
        Error::Invalid(format!(
            "the system stream is malformed: {what} (near offset {})",
            self.position
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A stream with a plan, a tree of `tree` in chunks of `chunk`, a raw
    /// partition, and the end.
    fn sample(tree: &[u8], chunk: usize, raw: &[u8]) -> Vec<u8> {
        let mut s = MAGIC.to_vec();
        let plan = br#"{"plan":1}"#;
        s.extend_from_slice(&header(SectionKind::Plan, 0, plan.len() as u64));
        s.extend_from_slice(plan);
        s.extend_from_slice(&header(SectionKind::Tree, 2, 0));
        for c in tree.chunks(chunk.max(1)) {
            s.extend_from_slice(&(c.len() as u32).to_le_bytes());
            s.extend_from_slice(c);
        }
        s.extend_from_slice(&0u32.to_le_bytes());
        s.extend_from_slice(&header(SectionKind::Raw, 3, raw.len() as u64));
        s.resize(s.len() + padding_after(s.len() as u64) as usize, 0);
        assert_eq!(s.len() as u64 % BLOCK, 0, "raw bytes start on a block");
        s.extend_from_slice(raw);
        s.extend_from_slice(&header(SectionKind::End, 0, 0));
        s
    }

    #[derive(Debug, Default, PartialEq)]
    struct Seen {
        plan: Vec<u8>,
        trees: Vec<(u32, Vec<u8>)>,
        raws: Vec<(u32, u64, Vec<u8>)>,
        ended: bool,
    }

    fn decode(stream: &[u8], cuts: &[usize]) -> Result<Seen, Error> {
        let mut seen = Seen::default();
        let mut d = Decoder::new();
        let mut on = |e: Event<'_>| {
            match e {
                Event::Plan(p) => seen.plan = p,
                Event::TreeStart { index } => seen.trees.push((index, Vec::new())),
                Event::TreeData(b) => seen.trees.last_mut().unwrap().1.extend_from_slice(b),
                Event::TreeEnd => {}
                Event::RawStart { index, len } => seen.raws.push((index, len, Vec::new())),
                Event::RawData { offset, data } => {
                    let raw = &mut seen.raws.last_mut().unwrap().2;
                    assert_eq!(offset, raw.len() as u64, "raw bytes come in order");
                    raw.extend_from_slice(data)
                }
                Event::RawEnd => {}
                Event::End => seen.ended = true,
            }
            Ok(())
        };
        let mut at = 0;
        for &c in cuts {
            let c = c.min(stream.len()).max(at);
            d.feed(&stream[at..c], &mut on)?;
            at = c;
        }
        d.feed(&stream[at..], &mut on)?;
        assert_eq!(d.position(), stream.len() as u64);
        Ok(seen)
    }

    proptest! {
        #[test]
        fn any_cutting_decodes_the_same(
            tree in proptest::collection::vec(any::<u8>(), 0..3000),
            chunk in 1usize..700,
            raw in proptest::collection::vec(any::<u8>(), 0..2000),
            mut cuts in proptest::collection::vec(0usize..80_000, 0..12),
        ) {
            let stream = sample(&tree, chunk, &raw);
            cuts.sort();
            let seen = decode(&stream, &cuts).unwrap();
            prop_assert_eq!(seen.plan, br#"{"plan":1}"#.to_vec());
            prop_assert_eq!(seen.trees, vec![(2, tree)]);
            prop_assert_eq!(seen.raws, vec![(3, raw.len() as u64, raw)]);
            prop_assert!(seen.ended);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut stream = MAGIC.to_vec();
            stream.extend_from_slice(&bytes);
            let _ = decode(&stream, &[9, 30]);
        }
    }

    #[test]
    fn a_plain_image_is_refused_with_what_to_do() {
        let err = decode(&[0u8; 64], &[]).unwrap_err().to_string();
        assert!(err.contains("not a ka system stream"), "{err}");
        assert!(err.contains("--system"), "{err}");
    }

    #[test]
    fn oversized_sections_are_refused_before_anything_is_held() {
        let mut s = MAGIC.to_vec();
        s.extend_from_slice(&header(SectionKind::Plan, 0, MAX_PLAN + 1));
        assert!(decode(&s, &[]).unwrap_err().to_string().contains("plan"));
        let mut s = MAGIC.to_vec();
        s.extend_from_slice(&header(SectionKind::Tree, 0, 0));
        s.extend_from_slice(&(MAX_CHUNK + 1).to_le_bytes());
        assert!(decode(&s, &[]).unwrap_err().to_string().contains("chunk"));
    }

    #[test]
    fn bytes_after_the_end_are_refused() {
        let mut s = sample(b"t", 1, b"r");
        s.push(1);
        assert!(decode(&s, &[])
            .unwrap_err()
            .to_string()
            .contains("after the END"));
    }
}

//! The image digest: BLAKE3 keyed with the session's digest key over the *canonical*
//! record stream of an image.
//!
//! # Definition
//!
//! The image (its logical bytes, holes read as zeros, and its size) is cut into
//! blocks of [`BLOCK`] bytes at absolute offsets 0, `BLOCK`, 2·`BLOCK`, …; the
//! last block is shorter when the size is not a multiple. A block is *zero* when
//! every byte in it is zero. The canonical record stream is:
//!
//! - for every maximal run of consecutive zero blocks, one `Zero` header
//!   `{offset: run start, len: run length}`;
//! - for every non-zero block, one `Data` header `{offset, len: block length}`
//!   and the block's bytes as its payload;
//! - last, one `End` header `{offset: image size, len: 0}`.
//!
//! With `K` the 32-byte digest key ([`DigestKey`]) and `H_K` keyed BLAKE3:
//!
//! ```text
//! layout  = H_K(all canonical 17-byte headers, in order)
//! content = H_K(all Data payloads, in order)
//! digest  = H_K(layout ‖ content)
//! ```
//!
//! The headers fix where every payload byte belongs, so the pair determines
//! the image exactly as one interleaved stream would. They are two streams
//! because BLAKE3 hashes 8 chunks at once (AVX2) only in subtrees aligned to
//! its chunk counter, and a 17-byte header before every 64 KiB block breaks
//! that alignment: one interleaved stream hashes about a fifth slower than
//! raw BLAKE3. The content stream is plain, aligned BLAKE3 at full speed; the
//! layout stream costs 17 bytes per block.
//!
//! The digest is a function of the image content and size only, not of how
//! records were cut on the wire, which source produced them, or where a
//! transfer was resumed. The same [`ImageHasher`] runs on the source, on every
//! node as the bytes pass, and over a read-back of the written disk
//! ([`digest_source`]); all must agree.
//!
//! Canonicalising at a node costs a zero test per block; for real data it stops
//! at the first non-zero bytes, so only blocks that really are zero are scanned
//! in full (and those are not hashed).

use std::fmt;

use ka_core::codec::Digest;
use ka_core::record::{RecordHeader, RecordKind};

use super::sources::ImageSource;
use super::{is_zero, BLOCK};
use crate::Error;

/// The key of a session's image digest, derived from the session's root key
/// (`ka_core::auth::digest_key_context`) and handed to every node with its
/// own key. It authenticates nothing by itself: the digest a node checks its
/// copy against arrives sealed on its own connection, and BLAKE3 keeps its
/// collision resistance under a known key, so knowing this key helps nobody
/// pass altered data off. It keeps strangers from recognising a known image
/// by its digest, so it is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct DigestKey(pub [u8; 32]);

impl fmt::Debug for DigestKey {
    // The key is a secret: never print it, even in debug logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DigestKey(..)")
    }
}

/// Incremental canonical digest of an image (see the module docs).
///
/// Feed it the image in order with [`data`](Self::data) and
/// [`zero`](Self::zero), in pieces of any size and alignment, then call
/// [`finish`](Self::finish) with the image size. Block-aligned input (what every
/// ka source produces) is hashed straight from the caller's buffer; only a
/// misaligned piece is copied into a one-block staging buffer.
#[derive(Clone)]
pub struct ImageHasher {
    key: [u8; 32],
    /// Keyed hash of the canonical headers.
    layout: blake3::Hasher,
    /// Keyed hash of the Data payloads.
    content: blake3::Hasher,
    /// Image bytes accounted for so far (hashed, pending in a zero run, or staged).
    position: u64,
    /// Start of the zero run not yet hashed, if the last block was zero.
    zero_run: Option<u64>,
    /// Bytes of the block containing `position` when it is not block-aligned.
    partial: Vec<u8>,
}

impl fmt::Debug for ImageHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageHasher")
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

impl ImageHasher {
    /// A hasher for a new image, keyed with the session's digest key.
    pub fn new(key: &DigestKey) -> Self {
        ImageHasher {
            key: key.0,
            layout: blake3::Hasher::new_keyed(&key.0),
            content: blake3::Hasher::new_keyed(&key.0),
            position: 0,
            zero_run: None,
            partial: Vec::new(),
        }
    }

    /// The image offset up to which input has been accepted; the next piece
    /// must start here.
    pub fn position(&self) -> u64 {
        self.position
    }

    fn expect_at(&self, offset: u64) -> Result<(), Error> {
        if offset != self.position {
            return Err(Error::OutOfOrder {
                expected: self.position,
                got: offset,
            });
        }
        Ok(())
    }

    /// Accepts image bytes `bytes` at `offset` (which must equal
    /// [`position`](Self::position)).
    pub fn data(&mut self, offset: u64, mut bytes: &[u8]) -> Result<(), Error> {
        self.expect_at(offset)?;
        // Complete a staged partial block first.
        if !self.partial.is_empty() || self.position % BLOCK != 0 {
            let room = (BLOCK - self.position % BLOCK) as usize;
            let take = room.min(bytes.len());
            self.partial.extend_from_slice(&bytes[..take]);
            self.position += take as u64;
            bytes = &bytes[take..];
            if self.position % BLOCK == 0 {
                self.flush_partial();
            }
        }
        // Whole blocks straight from the caller's buffer; consecutive data
        // blocks go to the content hasher in one call, so BLAKE3 sees long
        // aligned runs.
        let whole = bytes.len() - bytes.len() % BLOCK as usize;
        let mut run_start = 0; // start in `bytes` of the pending data run
        for (i, block) in bytes[..whole].chunks_exact(BLOCK as usize).enumerate() {
            let at = i * BLOCK as usize;
            let start = self.position + at as u64;
            if is_zero(block) {
                self.content.update(&bytes[run_start..at]);
                run_start = at + BLOCK as usize;
                self.zero_run.get_or_insert(start);
            } else {
                self.close_zero_run(start);
                self.hash_header(RecordKind::Data, start, BLOCK);
            }
        }
        self.content.update(&bytes[run_start..whole]);
        self.position += whole as u64;
        let rest = &bytes[whole..];
        if !rest.is_empty() {
            self.partial.extend_from_slice(rest);
            self.position += rest.len() as u64;
        }
        Ok(())
    }

    /// Accepts `len` zero bytes at `offset` (which must equal
    /// [`position`](Self::position)). Whole zero blocks cost O(1).
    pub fn zero(&mut self, offset: u64, mut len: u64) -> Result<(), Error> {
        self.expect_at(offset)?;
        if !self.partial.is_empty() || self.position % BLOCK != 0 {
            let room = BLOCK - self.position % BLOCK;
            let take = room.min(len);
            self.partial.resize(self.partial.len() + take as usize, 0);
            self.position += take;
            len -= take;
            if self.position % BLOCK == 0 {
                self.flush_partial();
            }
        }
        let whole = len - len % BLOCK;
        if whole > 0 {
            self.zero_run.get_or_insert(self.position);
            self.position += whole;
        }
        let rest = len % BLOCK;
        if rest > 0 {
            self.partial.resize(rest as usize, 0);
            self.position += rest;
        }
        Ok(())
    }

    /// Feeds one record as read from a data connection: `payload` is the
    /// record's bytes for `Data` and ignored otherwise. Returns the digest when
    /// the record is `End`.
    pub fn record(
        &mut self,
        header: &RecordHeader,
        payload: &[u8],
    ) -> Result<Option<Digest>, Error> {
        match header.kind {
            RecordKind::Data => self.data(header.offset, payload).map(|()| None),
            RecordKind::Zero => self.zero(header.offset, header.len).map(|()| None),
            RecordKind::End => self.clone().finish(header.offset).map(Some),
        }
    }

    /// Ends the image at `size` (which must equal [`position`](Self::position))
    /// and returns the digest.
    pub fn finish(mut self, size: u64) -> Result<Digest, Error> {
        self.expect_at(size)?;
        if !self.partial.is_empty() {
            self.flush_partial();
        }
        self.close_zero_run(size);
        self.hash_header(RecordKind::End, size, 0);
        let mut top = blake3::Hasher::new_keyed(&self.key);
        top.update(self.layout.finalize().as_bytes());
        top.update(self.content.finalize().as_bytes());
        Ok(Digest(*top.finalize().as_bytes()))
    }

    fn flush_partial(&mut self) {
        let partial = std::mem::take(&mut self.partial);
        let start = self.position - partial.len() as u64;
        self.block(start, &partial);
        // Keep the allocation for the next misaligned piece.
        self.partial = partial;
        self.partial.clear();
    }

    fn block(&mut self, start: u64, bytes: &[u8]) {
        if is_zero(bytes) {
            self.zero_run.get_or_insert(start);
        } else {
            self.close_zero_run(start);
            self.hash_header(RecordKind::Data, start, bytes.len() as u64);
            self.content.update(bytes);
        }
    }

    fn close_zero_run(&mut self, end: u64) {
        if let Some(run) = self.zero_run.take() {
            self.hash_header(RecordKind::Zero, run, end - run);
        }
    }

    fn hash_header(&mut self, kind: RecordKind, offset: u64, len: u64) {
        self.layout
            .update(&RecordHeader { kind, offset, len }.encode());
    }
}

/// Reads a whole source from its current position to its `End` record and
/// returns its digest; the source must be at offset 0 (or `hasher` must already
/// cover everything before its position).
///
/// Used on the source to publish the digest of a seekable image, and on a node
/// to verify its written copy: `digest_source(sink.readback()?, …)` re-reads the
/// data regions from disk and checks that zero regions read as zero (the source
/// yields them as `Zero` only after reading or mapping them as holes).
pub fn digest_source(
    source: &mut dyn ImageSource,
    mut hasher: ImageHasher,
    buf: &mut [u8],
) -> Result<Digest, Error> {
    loop {
        match source.next_record(buf)? {
            None => {
                return Err(Error::Truncated {
                    at: hasher.position(),
                })
            }
            Some(h) => {
                let payload = if h.kind == RecordKind::Data {
                    &buf[..h.len as usize]
                } else {
                    &[][..]
                };
                if let Some(d) = hasher.record(&h, payload)? {
                    return Ok(d);
                }
            }
        }
    }
}

/// Bytes read per step when hashing a file: small enough that a piece is
/// still in the core's own cache (L2) when the hash reads it after `pread`
/// put it there.
const HASH_READ: usize = 256 << 10;

/// The session digest of the image in the file or block device at `path`:
/// how a source computes its digest, in a pass of its own beside the stream.
pub fn digest_file(path: &std::path::Path, key: &DigestKey) -> Result<Digest, Error> {
    let mut source = crate::image::sources::FileSource::open(path)?;
    digest_source(&mut source, ImageHasher::new(key), &mut vec![0; HASH_READ])
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: DigestKey = DigestKey([7; 32]);

    /// The definition, written the slow and obvious way, to check the
    /// incremental hasher against.
    fn reference_digest(key: &DigestKey, image: &[u8]) -> Digest {
        let mut h = blake3::Hasher::new_keyed(&key.0);
        let mut c = blake3::Hasher::new_keyed(&key.0);
        let mut run: Option<u64> = None;
        let mut off = 0u64;
        for block in image.chunks(BLOCK as usize) {
            if block.iter().all(|&b| b == 0) {
                run.get_or_insert(off);
            } else {
                if let Some(r) = run.take() {
                    h.update(
                        &RecordHeader {
                            kind: RecordKind::Zero,
                            offset: r,
                            len: off - r,
                        }
                        .encode(),
                    );
                }
                h.update(
                    &RecordHeader {
                        kind: RecordKind::Data,
                        offset: off,
                        len: block.len() as u64,
                    }
                    .encode(),
                );
                c.update(block);
            }
            off += block.len() as u64;
        }
        if let Some(r) = run.take() {
            h.update(
                &RecordHeader {
                    kind: RecordKind::Zero,
                    offset: r,
                    len: off - r,
                }
                .encode(),
            );
        }
        h.update(
            &RecordHeader {
                kind: RecordKind::End,
                offset: off,
                len: 0,
            }
            .encode(),
        );
        let mut top = blake3::Hasher::new_keyed(&key.0);
        top.update(h.finalize().as_bytes());
        top.update(c.finalize().as_bytes());
        Digest(*top.finalize().as_bytes())
    }

    /// An image with data blocks, zero blocks, a zero run inside a data block
    /// and a short tail.
    fn sample_image() -> Vec<u8> {
        let b = BLOCK as usize;
        let mut img = vec![0u8; 7 * b + 1234];
        for (i, x) in img[..b].iter_mut().enumerate() {
            *x = (i % 251) as u8 + 1;
        }
        img[3 * b + 17] = 9; // a data block that is mostly zero
        img[5 * b..6 * b].fill(0xaa);
        img[7 * b + 1000] = 1; // data in the short tail
        img
    }

    fn feed(hasher: &mut ImageHasher, image: &[u8], cuts: &[usize], zero_as_hole: bool) {
        let mut start = 0;
        for &end in cuts.iter().chain(std::iter::once(&image.len())) {
            let piece = &image[start..end];
            if zero_as_hole && piece.iter().all(|&b| b == 0) {
                hasher.zero(start as u64, piece.len() as u64).unwrap();
            } else {
                hasher.data(start as u64, piece).unwrap();
            }
            start = end;
        }
    }

    #[test]
    fn digest_ignores_how_the_image_is_cut() {
        let img = sample_image();
        let want = reference_digest(&KEY, &img);
        let b = BLOCK as usize;
        let cuttings: [&[usize]; 4] = [
            &[],
            &[b, 2 * b, 3 * b, 5 * b],
            &[1, 100, b + 3, 3 * b - 1, 6 * b + 5],
            &[b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b],
        ];
        for cuts in cuttings {
            for holes in [false, true] {
                let mut h = ImageHasher::new(&KEY);
                feed(&mut h, &img, cuts, holes);
                assert_eq!(
                    h.finish(img.len() as u64).unwrap(),
                    want,
                    "cuts {cuts:?} holes {holes}"
                );
            }
        }
    }

    #[test]
    fn digest_depends_on_key_content_and_size() {
        let img = sample_image();
        let base = reference_digest(&KEY, &img);
        assert_ne!(reference_digest(&DigestKey([8; 32]), &img), base);
        let mut flipped = img.clone();
        flipped[2 * BLOCK as usize] = 1; // a zero block becomes data
        assert_ne!(reference_digest(&KEY, &flipped), base);
        let mut longer = img.clone();
        longer.push(0); // same bytes, one more zero at the end
        assert_ne!(reference_digest(&KEY, &longer), base);
    }

    #[test]
    fn out_of_order_input_is_refused() {
        let mut h = ImageHasher::new(&KEY);
        h.data(0, &[1; 10]).unwrap();
        assert!(matches!(
            h.data(20, &[1]),
            Err(Error::OutOfOrder {
                expected: 10,
                got: 20
            })
        ));
        assert!(h.clone().finish(11).is_err());
    }
}

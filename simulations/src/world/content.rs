//! The content of image copies, and how a copy keeps up with its offset.
//!
//! The source's image is random, drawn from the seed. A small image is held
//! as real bytes; a larger one as one random tag per 1 MiB granule, which
//! keeps a 10,000-node run of a 1 GiB image in memory while every copy is
//! still really made. A node's copy is copied granule by granule from its
//! sender's copy (the source's image for the first level), so a node that
//! took data its sender did not hold ends with a copy that differs, and the
//! end check sees it.
//!
//! Offsets are analytic (see the data module); a copy is brought up to its
//! offset only when that matters (a rate change, a relink, the end), which
//! keeps a long chain from copying again on every heartbeat.

use ka_core::codec::Digest;
use rand::RngCore;
use rand_chacha::ChaCha8Rng;

use super::{End, Sim};

/// Content of an image copy: real bytes in small runs, a tag per granule in large ones.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Content {
    /// Real bytes, one per granule.
    Bytes(Vec<u8>),
    /// A random tag per granule of 1 MiB.
    Tags(Vec<u64>),
}

impl Content {
    /// The source's image of `size` bytes, drawn from `rng`, with its
    /// granule: real bytes while they fit comfortably (up to 4 MiB), a tag
    /// per 1 MiB granule beyond.
    pub(super) fn image(size: u64, rng: &mut ChaCha8Rng) -> (u64, Content) {
        if size <= 4 << 20 {
            let mut v = vec![0u8; size as usize];
            rng.fill_bytes(&mut v);
            (1, Content::Bytes(v))
        } else {
            let g = 1u64 << 20;
            let n = size.div_ceil(g) as usize;
            (g, Content::Tags((0..n).map(|_| rng.next_u64()).collect()))
        }
    }

    /// An empty copy of the same kind and length: what a node starts with.
    pub(super) fn blank(&self) -> Content {
        match self {
            Content::Bytes(v) => Content::Bytes(vec![0; v.len()]),
            Content::Tags(v) => Content::Tags(vec![0; v.len()]),
        }
    }

    /// Copies `granules` from `other`, a copy of the same kind.
    fn copy_from(&mut self, other: &Content, granules: core::ops::Range<usize>) {
        match (self, other) {
            (Content::Bytes(d), Content::Bytes(s)) => {
                d[granules.clone()].copy_from_slice(&s[granules])
            }
            (Content::Tags(d), Content::Tags(s)) => {
                d[granules.clone()].copy_from_slice(&s[granules])
            }
            _ => unreachable!("one content kind per run"),
        }
    }

    /// The copy's digest (a stand-in for BLAKE3: cheap and deterministic).
    pub(super) fn digest(&self) -> Digest {
        let mut h: u64 = 0x8422_2325_cbf2_9ce4;
        let mut feed = |b: u8| h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        match self {
            Content::Bytes(v) => v.iter().for_each(|&b| feed(b)),
            Content::Tags(v) => v.iter().flat_map(|t| t.to_le_bytes()).for_each(&mut feed),
        }
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&h.to_le_bytes());
        Digest(d)
    }
}

impl Sim {
    /// The digest of the image a packed stream unpacks to, which the source
    /// sends with the stream's and packed nodes are checked by. The world
    /// models no unpacking: a node's copy of the stream stands for the
    /// image it unpacked, so its digest is what the node reports, and the
    /// source's is the stream's own. `None` for a plain stream.
    pub(super) fn image_digest(&self) -> Option<Digest> {
        self.cfg.packed.then_some(self.source_digest)
    }

    /// Brings a node's copy up to its offset now, copying the newly covered
    /// granules from its sender, which must hold them. Senders up the chain
    /// are brought up to date first, as far as needed.
    pub(super) fn settle(&mut self, i: usize) {
        let mut chain = vec![i];
        loop {
            let x = *chain.last().expect("non-empty");
            let Some((_, End::Node(u))) = self.nodes[x].data.inflow else {
                break;
            };
            if self.nodes[u].data.copied >= self.granules_at(x) || chain.contains(&u) {
                break;
            }
            chain.push(u);
        }
        for &x in chain.iter().rev() {
            self.copy_up_to_now(x);
        }
        self.dirty.push(i);
    }

    /// The granules a node's offset covers now (all of them at the end).
    fn granules_at(&self, i: usize) -> usize {
        let off = self.offset_at(i, self.now);
        if off >= self.cfg.size as f64 {
            self.granules
        } else {
            (off as u64 / self.granule) as usize
        }
    }

    /// Copies what a node's offset newly covers from its sender, which
    /// must hold it.
    fn copy_up_to_now(&mut self, i: usize) {
        let upto = self.granules_at(i);
        let d = &self.nodes[i].data;
        if upto <= d.copied {
            return;
        }
        let Some((_, from)) = d.inflow else {
            let what = format!("node{i} advanced to granule {upto} without an upstream");
            return self.violate(what);
        };
        let held = match from {
            End::Source => self.granules,
            End::Node(u) => self.nodes[u].data.copied,
        };
        // Offsets are floating point: one granule of rounding is noise, more
        // is a node taking data its upstream does not have.
        let upto = if upto == held + 1 { held } else { upto };
        let range = d.copied..upto;
        if held < range.end {
            return self.violate(format!(
                "node{i} copied granules {range:?} but its upstream {from:?} holds {held}"
            ));
        }
        let mut content =
            core::mem::replace(&mut self.nodes[i].data.content, Content::Tags(Vec::new()));
        match from {
            End::Source => content.copy_from(&self.source_data, range),
            End::Node(u) => content.copy_from(&self.nodes[u].data.content, range),
        }
        let d = &mut self.nodes[i].data;
        d.content = content;
        d.copied = upto;
    }
}

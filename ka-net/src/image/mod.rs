//! What an image is: its bytes and where they come from and go to.
//!
//! [`sources`] read an image as records (files and block devices with their
//! holes, command output, a directory as tar, stdin); [`sinks`] write one
//! (files and block devices, command input, untar). [`digest`] defines the
//! session digest of an image and computes it. [`blockdev`] inspects and
//! guards block devices, [`mounts`] reads the kernel's mount table,
//! [`process`] supervises the commands of command sources and sinks and
//! runs short tools, and [`write_atomically`] replaces small files (keys,
//! saved sessions, generated configuration) whole or not at all.
//!
//! This module knows nothing of sockets or of the protocol: it is used by
//! the data path and the shell, and uses neither.

pub mod atomic;
pub mod blockdev;
pub mod digest;
pub mod mounts;
pub mod packed;
pub mod process;
pub mod sinks;
pub mod sources;

pub use atomic::write_atomically;

/// Granularity of zero detection and of the canonical digest stream: 64 KiB.
///
/// Small enough that the free space of a used filesystem is found (free extents
/// are usually much larger), large enough that a `Zero` header per run and a
/// `Data` header per block cost nothing (17 bytes per 64 KiB hashed).
pub const BLOCK: u64 = 64 * 1024;

/// A block of zeros, for what must take zero bytes as bytes: pipes, the
/// unaligned edges of a zeroed block-device range, a packing encoder fed a
/// hole (which it turns into a few bytes, so holes cost the wire nothing).
pub(crate) static ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];

/// True when every byte of `bytes` is zero.
///
/// Reduces 256-byte chunks with OR (which the compiler vectorises) and exits at
/// the first non-zero chunk, so a block of real data is rejected after a few
/// cycles.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(256);
    for chunk in &mut chunks {
        if chunk.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_finds_a_single_set_byte_anywhere() {
        let mut v = vec![0u8; 1000];
        assert!(is_zero(&v));
        for i in [0, 255, 256, 511, 999] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            v[i] = 0;
        }
    }
}

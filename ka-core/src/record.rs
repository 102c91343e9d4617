//! The framing of a data connection: after its handshake, a data connection
//! carries a sequence of records, each a fixed-size [`RecordHeader`] followed,
//! for [`RecordKind::Data`] only, by `len` bytes of image data.
//!
//! Zero extents travel as a header alone, so a sparse image costs only its
//! data on the wire. The data plane (ka-net) moves the payload bytes; the core
//! only defines the header so both ends agree on it.

use crate::codec::DecodeError;

/// What a record stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// `len` bytes of image data follow the header.
    Data,
    /// `len` bytes of zeros at `offset`; nothing follows the header.
    Zero,
    /// The image ends at `offset` (its total logical size); `len` is 0.
    End,
}

impl RecordKind {
    fn tag(self) -> u8 {
        match self {
            RecordKind::Data => 1,
            RecordKind::Zero => 2,
            RecordKind::End => 3,
        }
    }
}

/// The fixed-size header of a record on a data connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordHeader {
    /// What the record stands for.
    pub kind: RecordKind,
    /// Absolute offset of the record in the logical image.
    pub offset: u64,
    /// Length in bytes of the region the record covers.
    pub len: u64,
}

impl RecordHeader {
    /// Size of an encoded header in bytes: tag, offset, length.
    pub const SIZE: usize = 17;

    /// Largest payload one data record may announce; bounds what a receiver
    /// must be ready to buffer and lets it reject a corrupt length at once.
    pub const MAX_DATA_LEN: u64 = 16 << 20;

    /// Encodes the header in its fixed wire form (big-endian).
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[0] = self.kind.tag();
        out[1..9].copy_from_slice(&self.offset.to_be_bytes());
        out[9..17].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Decodes a header, refusing unknown tags, oversized data records,
    /// regions that overflow 64-bit offsets and an `End` with a length.
    pub fn decode(buf: &[u8; Self::SIZE]) -> Result<Self, DecodeError> {
        let offset = u64::from_be_bytes(buf[1..9].try_into().expect("8 bytes"));
        let len = u64::from_be_bytes(buf[9..17].try_into().expect("8 bytes"));
        let kind = match buf[0] {
            1 => RecordKind::Data,
            2 => RecordKind::Zero,
            3 => RecordKind::End,
            tag => return Err(DecodeError::UnknownTag(tag)),
        };
        if kind == RecordKind::Data && len > Self::MAX_DATA_LEN {
            return Err(DecodeError::TooLong(len));
        }
        if kind == RecordKind::End && len != 0 {
            return Err(DecodeError::Invalid("end record with a length"));
        }
        if offset.checked_add(len).is_none() {
            return Err(DecodeError::Invalid("record region overflows 64 bits"));
        }
        Ok(RecordHeader { kind, offset, len })
    }

    /// The first offset after the region this record covers.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        for kind in [RecordKind::Data, RecordKind::Zero] {
            let h = RecordHeader {
                kind,
                offset: 1 << 40,
                len: 4096,
            };
            assert_eq!(RecordHeader::decode(&h.encode()), Ok(h));
        }
        let end = RecordHeader {
            kind: RecordKind::End,
            offset: 7,
            len: 0,
        };
        assert_eq!(RecordHeader::decode(&end.encode()), Ok(end));
    }

    #[test]
    fn oversized_data_record_is_refused() {
        let h = RecordHeader {
            kind: RecordKind::Data,
            offset: 0,
            len: RecordHeader::MAX_DATA_LEN + 1,
        };
        assert!(RecordHeader::decode(&h.encode()).is_err());
    }
}

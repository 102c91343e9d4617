//! Control frames on a tokio stream: ka-core's codec as a tokio-util codec.

use bytes::BytesMut;
use ka_core::codec::{DecodeError, Message, MAX_FRAME};
use tokio_util::codec::{Decoder, Encoder};

/// Frames [`Message`]s with ka-core's codec.
#[derive(Debug, Default, Clone, Copy)]
pub struct MessageCodec;

impl Decoder for MessageCodec {
    type Item = Message;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, std::io::Error> {
        Message::decode(src)
            .map_err(|e: DecodeError| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

impl Encoder<Message> for MessageCodec {
    type Error = std::io::Error;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        msg.encode(dst);
        Ok(())
    }
}

/// [`MessageCodec`] with a cap on the frame length a peer may announce, so
/// that a partial frame holds no more buffer than the cap allows
/// ([`super::gate::FIRST_MESSAGE_MAX`] before a peer's first message).
#[derive(Debug, Clone, Copy)]
pub struct BoundedCodec {
    /// The longest frame body accepted, in bytes (at most [`MAX_FRAME`]).
    pub limit: usize,
}

impl Default for BoundedCodec {
    fn default() -> Self {
        BoundedCodec { limit: MAX_FRAME }
    }
}

impl Decoder for BoundedCodec {
    type Item = Message;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, std::io::Error> {
        if let Some(prefix) = src.get(..4) {
            let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
            if len > self.limit {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "frame of {len} bytes where at most {} are allowed",
                        self.limit
                    ),
                ));
            }
        }
        MessageCodec.decode(src)
    }
}

impl Encoder<Message> for BoundedCodec {
    type Error = std::io::Error;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        MessageCodec.encode(msg, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_announced_past_the_limit_is_refused_before_it_arrives() {
        let mut codec = BoundedCodec { limit: 4096 };
        let mut buf = BytesMut::from(&4097u32.to_be_bytes()[..]);
        assert!(codec.decode(&mut buf).is_err());
        let mut buf = BytesMut::from(&4096u32.to_be_bytes()[..]);
        buf.extend_from_slice(&[0u8; 100]);
        assert!(matches!(codec.decode(&mut buf), Ok(None)));
        let mut buf = BytesMut::from(&60_000u32.to_be_bytes()[..]);
        assert!(matches!(BoundedCodec::default().decode(&mut buf), Ok(None)));
    }
}

//! Control frames on a tokio stream: ka-core's codec as a tokio-util codec.

use bytes::BytesMut;
use ka_core::codec::{DecodeError, Message};
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

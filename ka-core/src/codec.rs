//! The wire codec: every control message and the handshake of a data connection.
//!
//! A frame is `[length: u32 BE][tag: u8][body]`, where `length` counts the tag
//! and the body and never exceeds [`MAX_FRAME`]. Integers are big-endian,
//! strings are a `u16` length then UTF-8 bounded by [`MAX_STRING`], lists a
//! `u16` count checked against the bytes that remain before anything is
//! allocated. So decoding arbitrary bytes never panics, and never allocates
//! more than one frame's worth. The protocol version travels in the messages
//! that open a conversation ([`Message::Challenge`], [`Message::Join`],
//! [`Message::DataHello`]), so a peer of another version is refused with a
//! reason instead of being misread.

use bytes::{Buf, BufMut, BytesMut};
use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::ids::{Epoch, NodeId};

/// The protocol version this crate speaks; a peer of any other version is
/// refused ([`RefusalCode::VersionMismatch`]). Version 4 added bounded-window
/// upstreams: [`Join::readable`], [`Join::holds_from`],
/// [`Progress::holds_from`], [`RefusalCode::CannotResume`] and
/// [`Message::Stranded`]. Version 5 made authentication mutual and per
/// node ([`crate::auth`]): the connecting side's nonce in [`Join::nonce`],
/// [`Message::DataHello`] and [`Message::Go`], the source's run in
/// [`Message::Welcome`], the link ticket in [`Upstream::ticket`], and
/// [`Message::Sealed`] around every message after the handshake. Version 6
/// added the nodes' lines for the source's logs ([`Message::Log`]) and the
/// report of a node that could not join ([`Message::JoinFailed`]). Version 7
/// added the stream's [`Encoding`] to [`Message::Welcome`]. Version 8 added
/// the unpacked image's digest to [`Message::ImageDone`], which is what an
/// encoded stream's copy is checked by.
pub const PROTOCOL_VERSION: u16 = 8;
/// The most lines one [`Message::Log`] carries: with every line at
/// [`MAX_STRING`] the message still fits a frame.
pub const MAX_LOG_LINES: usize = 32;
/// The largest frame (tag and body) a peer may send.
pub const MAX_FRAME: usize = 64 * 1024;
/// The longest string field in bytes.
pub const MAX_STRING: usize = 1024;
/// Size of the length prefix.
const LEN_PREFIX: usize = 4;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not enough bytes yet for a whole frame.
    #[error("incomplete frame")]
    Incomplete,
    /// A tag this version does not know.
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    /// A length above its fixed bound.
    #[error("length {0} exceeds the protocol bound")]
    TooLong(u64),
    /// A structurally invalid value.
    #[error("invalid frame: {0}")]
    Invalid(&'static str),
}

macro_rules! bytes32 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub [u8; 32]);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(", stringify!($name))?;
                for b in &self.0[..4] {
                    write!(f, "{b:02x}")?;
                }
                write!(f, "…)")
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for b in &self.0 {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    };
}

bytes32!(
    /// A fresh random challenge a server sends so a proof cannot be replayed.
    Nonce
);
bytes32!(
    /// A keyed MAC proving knowledge of the session secret.
    Tag
);
bytes32!(
    /// The keyed BLAKE3 digest of a logical image.
    Digest
);

/// A key the source hands a node for one data link: the downstream proves
/// it in its [`Message::DataHello`], and the upstream, which derives the
/// same key from its own ([`crate::auth::link_ticket`]), proves it back. On
/// the wire it only ever travels encrypted for the node it is meant for
/// ([`crate::auth::Channel`]); it is never printed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Ticket(pub [u8; 32]);

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Ticket(..)")
    }
}
bytes32!(
    /// What a source calls the image it serves, so a node holding part of a
    /// copy can tell whether a (restarted) source still serves the same one.
    /// The source's shell derives it cheaply from what identifies the image
    /// without reading it all (a file's size, modification time and inode; a
    /// device's size and its first and last MiB); a stream gets a fresh random
    /// one per source process, since it cannot be read again the same.
    ImageId
);

/// How a session's stream encodes its image.
///
/// Whatever the encoding, offsets on data connections count bytes of the
/// stream (what travels, what nodes forward and resume from). An encoded
/// stream's copy is checked by the image it unpacks to: the source's
/// [`Message::ImageDone`] carries that image's keyed digest beside the
/// stream's, since a node that resumed after a restart holds the whole
/// image but only the part of the stream it received since. The stream
/// also carries the image's size and digest at its end, which the node
/// checks what it decoded and wrote against as it finishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Encoding {
    /// The stream is the image.
    #[default]
    Plain,
    /// The stream is a Zstandard stream of the image: compressed once at
    /// the source, forwarded as received, decoded only to be written.
    Zstd {
        /// The decoded image's size, when the source knows it before
        /// streaming, so a node can refuse a target too small at once.
        image_size: Option<u64>,
    },
}

/// Why a join, a data connection or a request was refused. The code lets the
/// shell pick an exit status; the detail is for the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalCode {
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// The peer asked for another session.
    WrongSession,
    /// The proof of the session secret did not verify.
    BadProof,
    /// The session already has every node it waits for.
    SessionFull,
    /// Another live node, on another machine, already uses this name.
    NameInUse,
    /// The session ended or was aborted.
    SessionOver,
    /// A data connection for a node or epoch this peer does not expect.
    NotExpected,
    /// The offset asked for has left this upstream's bounded window: a node
    /// that keeps only the last part of the stream cannot serve what it
    /// dropped. The downstream tells the source ([`Message::Stranded`]),
    /// which feeds it from elsewhere.
    CannotResume,
}

impl RefusalCode {
    const ALL: [RefusalCode; 8] = [
        RefusalCode::VersionMismatch,
        RefusalCode::WrongSession,
        RefusalCode::BadProof,
        RefusalCode::SessionFull,
        RefusalCode::NameInUse,
        RefusalCode::SessionOver,
        RefusalCode::NotExpected,
        RefusalCode::CannotResume,
    ];

    fn code(self) -> u8 {
        Self::ALL.iter().position(|c| *c == self).expect("listed") as u8
    }
}

/// A refusal with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What kind of refusal.
    pub code: RefusalCode,
    /// A sentence for the operator saying what to do.
    pub detail: String,
}

impl Refusal {
    /// A refusal whose detail fits a string field: details quote what the
    /// peer sent (its session, its name), so they are cut to [`MAX_STRING`]
    /// bytes here rather than trusted to be short.
    pub fn new(code: RefusalCode, detail: String) -> Refusal {
        let detail = fit(&detail).into_owned();
        Refusal { code, detail }
    }
}

/// Who a node takes its data from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream {
    /// The upstream node, or `None` for the source itself.
    pub node: Option<NodeId>,
    /// Where its data port listens.
    pub addr: SocketAddr,
    /// The key of this link: the node proves it in its data hello, and the
    /// upstream proves it back before the node takes a byte
    /// ([`crate::auth::link_ticket`]). Encrypted on the wire.
    pub ticket: Ticket,
}

/// A node's identity and options as it joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    /// The protocol version the node speaks.
    pub version: u16,
    /// The session it wants to join.
    pub session: String,
    /// Its name, unique in the session (hostname or inventory name).
    pub name: String,
    /// Its MAC address, for the report and the boot-mode flip.
    pub mac: [u8; 6],
    /// Where its own data port listens for its downstream.
    pub data_addr: SocketAddr,
    /// It waits for the source's release before leaving (Ka-deploy's `-w`).
    pub wait_release: bool,
    /// It can serve any offset it wrote (its sink is read back: a file, a
    /// block device). A node that is not keeps only a bounded window of the
    /// stream and serves from [`Progress::holds_from`] on.
    pub readable: bool,
    /// The contiguous prefix it already holds (non-zero after a restart, of
    /// the node or of the source).
    pub have: u64,
    /// Where its window starts, as in [`Progress::holds_from`] (0 when
    /// `readable`): the source may place nodes under it before it first
    /// reports progress (a restarted source lays its chain out as the last
    /// node joins).
    pub holds_from: u64,
    /// The image that prefix belongs to, as a source named it in an earlier
    /// welcome; `None` when `have` is 0.
    pub image: Option<ImageId>,
    /// The node's own fresh nonce: the source proves its key over it (its
    /// first sealed message), and the connection's keys derive from both.
    pub nonce: Nonce,
    /// MAC with the node's key over the server's nonce and every other
    /// field of this join ([`crate::auth::join_proof`]).
    pub proof: Tag,
}

/// A node that could not join reports why, proved with its key like a
/// join ([`crate::auth::join_failed_proof`]), so the source shows a node
/// that failed before joining instead of just waiting for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinFailed {
    /// The protocol version the node speaks.
    pub version: u16,
    /// The session it meant to join.
    pub session: String,
    /// Its name.
    pub name: String,
    /// Its MAC address, when it knows it (all zeros when not).
    pub mac: [u8; 6],
    /// Why it cannot join (its target is missing, too small, read-only…).
    pub reason: String,
    /// The node's fresh nonce (covered by the proof like every field).
    pub nonce: Nonce,
    /// MAC with the node's key over the server's nonce and every other
    /// field ([`crate::auth::join_failed_proof`]).
    pub proof: Tag,
}

/// Where a node's data stands, sent periodically; it doubles as the heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// End of the contiguous prefix received from upstream.
    pub received: u64,
    /// End of the contiguous prefix written to the sink.
    pub written: u64,
    /// The lowest offset it can still serve to a downstream: 0 for a node
    /// that can serve anything it wrote ([`Join::readable`]); for one that
    /// keeps a bounded window, where that window starts. Only grows.
    pub holds_from: u64,
}

/// Every message of the protocol, control and data handshake alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Server → client, first on every connection: version and a fresh nonce.
    Challenge {
        /// The server's protocol version.
        version: u16,
        /// The nonce the client's proof must cover.
        nonce: Nonce,
    },
    /// Node → source: ask for a place in the session (boxed: by far the
    /// largest message, and one of the rarest).
    Join(Box<Join>),
    /// Source → node: admitted.
    Welcome {
        /// The node's identifier for the session.
        node: NodeId,
        /// How often the node must report progress (its heartbeat), in ms.
        heartbeat_ms: u32,
        /// Silence after which either side declares the other gone, in ms.
        dead_after_ms: u32,
        /// The image's size when the source knows it before streaming (a file
        /// or device), so a node can refuse a target too small before
        /// writing a byte.
        image_size: Option<u64>,
        /// The image this source serves.
        image: ImageId,
        /// Where the node's copy goes on from: the `have` of its join when
        /// that prefix belongs to this very image, else 0 (start over).
        resume_from: u64,
        /// This source process's run: the tickets of the data links the
        /// node serves derive from it ([`crate::auth::link_ticket`]), so a
        /// ticket of an earlier run, when node identifiers meant other
        /// nodes, is worth nothing.
        run: Nonce,
        /// How the stream encodes the image, so the node knows before the
        /// first byte whether it writes the stream or decodes it.
        encoding: Encoding,
    },
    /// Any server → client: refused, with the reason.
    Refused(Refusal),
    /// Source → node: where to take data from and whom to serve.
    Topology {
        /// The topology generation this instruction belongs to.
        epoch: Epoch,
        /// Who feeds this node, or `None` while it waits for a place.
        upstream: Option<Upstream>,
        /// The nodes this node must accept and serve.
        downstreams: Vec<NodeId>,
    },
    /// Source → node: the image is complete; its size and keyed digest.
    ImageDone {
        /// Total size of the stream (the image itself when plain).
        total: u64,
        /// Keyed digest of the stream.
        digest: Digest,
        /// Keyed digest of the image an encoded stream unpacks to, which
        /// its copies are checked by; `None` for a plain stream.
        image_digest: Option<Digest>,
    },
    /// Source → node: you may leave now.
    Release,
    /// Source → node: the session is over without success.
    Abort {
        /// Why.
        reason: String,
    },
    /// Source → node: the source is alive (sent when it has nothing else to say).
    Heartbeat,
    /// Node → source: data progress and heartbeat.
    Progress(Progress),
    /// Node → source: the node's check of its copy.
    Verified {
        /// Whether its digest matched.
        ok: bool,
        /// Why not, when not.
        reason: String,
    },
    /// Node → source: the node cannot go on (disk error, sink died).
    Failed {
        /// Why.
        reason: String,
    },
    /// Operator → source: start now with the nodes present (Ka-deploy's `-g`).
    Go {
        /// The session to start.
        session: String,
        /// The operator's fresh nonce, which the source's answer is proved over.
        nonce: Nonce,
        /// MAC with the operator key over the server's nonce and this message.
        proof: Tag,
    },
    /// Source → operator: what the go did.
    GoAck {
        /// Whether this go started the stream (false if it had already started).
        started: bool,
        /// Nodes in the session.
        nodes: u32,
    },
    /// Downstream → upstream, after the upstream's challenge on a data connection.
    DataHello {
        /// The downstream's protocol version.
        version: u16,
        /// The session.
        session: String,
        /// The downstream node.
        node: NodeId,
        /// The topology generation it connects for.
        epoch: Epoch,
        /// The offset it wants data from: its own contiguous prefix.
        from: u64,
        /// The downstream's fresh nonce, which the upstream's acceptance is
        /// proved over.
        nonce: Nonce,
        /// MAC with the link's ticket over the server's nonce and this message.
        proof: Tag,
    },
    /// Upstream → downstream: admitted; records from `from` follow.
    DataAccepted {
        /// The offset the records start at.
        from: u64,
    },
    /// Node → source: the upstream the node was given refused it with
    /// [`RefusalCode::CannotResume`]: what it lacks has left that
    /// upstream's window, so retrying there is pointless. The source feeds
    /// it itself (it holds the whole image) and says so in a new
    /// [`Message::Topology`]. Sent once per placement.
    Stranded {
        /// The topology generation of the placement that named the refusing
        /// upstream: a report about an older placement is stale.
        epoch: Epoch,
        /// The offset the node asked for and was refused.
        from: u64,
    },
    /// Node → source, on its sealed control connection: lines for its log
    /// at the source (its own events, its console). At most
    /// [`MAX_LOG_LINES`]; the source bounds their length and the bytes it
    /// takes per node per second.
    Log {
        /// The lines, without line ends.
        lines: Vec<String>,
    },
    /// Node → source, instead of a join: the node cannot start and says
    /// why (boxed: large and rare).
    JoinFailed(Box<JoinFailed>),
    /// Any message after the handshake, authenticated on its connection
    /// ([`crate::auth::Channel`]): `body` is the inner message's frame
    /// without its length prefix, `tag` a MAC over the sender's sequence
    /// number and `body` with the connection's key for that direction.
    Sealed {
        /// The MAC.
        tag: Tag,
        /// The inner message, encoded (tag byte and body).
        body: Vec<u8>,
    },
}

mod tag {
    pub const CHALLENGE: u8 = 1;
    pub const JOIN: u8 = 2;
    pub const WELCOME: u8 = 3;
    pub const REFUSED: u8 = 4;
    pub const TOPOLOGY: u8 = 5;
    pub const IMAGE_DONE: u8 = 6;
    pub const RELEASE: u8 = 7;
    pub const ABORT: u8 = 8;
    pub const HEARTBEAT: u8 = 9;
    pub const PROGRESS: u8 = 10;
    pub const VERIFIED: u8 = 11;
    pub const FAILED: u8 = 12;
    pub const GO: u8 = 13;
    pub const GO_ACK: u8 = 14;
    pub const DATA_HELLO: u8 = 15;
    pub const DATA_ACCEPTED: u8 = 16;
    pub const STRANDED: u8 = 17;
    pub const SEALED: u8 = 18;
    pub const LOG: u8 = 19;
    pub const JOIN_FAILED: u8 = 20;
}

impl Message {
    /// Appends this message as one frame to `out`.
    ///
    /// A string field longer than [`MAX_STRING`] is cut to fit (at a
    /// character, ending in `…`): reasons quote error texts with paths and
    /// peers' names, whose length nobody bounds for us.
    ///
    /// # Panics
    /// If a list is longer than fits a frame: callers build lists from
    /// bounded values, so this is a programming error, not a peer's.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0);
        match self {
            Message::Challenge { version, nonce } => {
                out.put_u8(tag::CHALLENGE);
                out.put_u16(*version);
                out.put_slice(&nonce.0);
            }
            Message::Join(j) => {
                out.put_u8(tag::JOIN);
                out.put_u16(j.version);
                put_str(out, &j.session);
                put_str(out, &j.name);
                out.put_slice(&j.mac);
                put_addr(out, &j.data_addr);
                out.put_u8(
                    u8::from(j.wait_release)
                        | (u8::from(j.readable) << 1)
                        | (u8::from(j.image.is_some()) << 2),
                );
                out.put_u64(j.have);
                out.put_u64(j.holds_from);
                if let Some(image) = &j.image {
                    out.put_slice(&image.0);
                }
                out.put_slice(&j.nonce.0);
                out.put_slice(&j.proof.0);
            }
            Message::Welcome {
                node,
                heartbeat_ms,
                dead_after_ms,
                image_size,
                image,
                resume_from,
                run,
                encoding,
            } => {
                out.put_u8(tag::WELCOME);
                out.put_u32(node.0);
                out.put_u32(*heartbeat_ms);
                out.put_u32(*dead_after_ms);
                out.put_u64(image_size.unwrap_or(u64::MAX));
                out.put_slice(&image.0);
                out.put_u64(*resume_from);
                out.put_slice(&run.0);
                match encoding {
                    Encoding::Plain => out.put_u8(0),
                    Encoding::Zstd { image_size } => {
                        out.put_u8(1);
                        out.put_u64(image_size.unwrap_or(u64::MAX));
                    }
                }
            }
            Message::Refused(r) => {
                out.put_u8(tag::REFUSED);
                out.put_u8(r.code.code());
                put_str(out, &r.detail);
            }
            Message::Topology {
                epoch,
                upstream,
                downstreams,
            } => {
                out.put_u8(tag::TOPOLOGY);
                out.put_u64(epoch.0);
                match upstream {
                    None => out.put_u8(0),
                    Some(Upstream {
                        node: None,
                        addr,
                        ticket,
                    }) => {
                        out.put_u8(1);
                        put_addr(out, addr);
                        out.put_slice(&ticket.0);
                    }
                    Some(Upstream {
                        node: Some(n),
                        addr,
                        ticket,
                    }) => {
                        out.put_u8(2);
                        out.put_u32(n.0);
                        put_addr(out, addr);
                        out.put_slice(&ticket.0);
                    }
                }
                let count = u16::try_from(downstreams.len()).expect("downstream list fits a frame");
                out.put_u16(count);
                for d in downstreams {
                    out.put_u32(d.0);
                }
            }
            Message::ImageDone {
                total,
                digest,
                image_digest,
            } => {
                out.put_u8(tag::IMAGE_DONE);
                out.put_u64(*total);
                out.put_slice(&digest.0);
                match image_digest {
                    None => out.put_u8(0),
                    Some(d) => {
                        out.put_u8(1);
                        out.put_slice(&d.0);
                    }
                }
            }
            Message::Release => out.put_u8(tag::RELEASE),
            Message::Abort { reason } => {
                out.put_u8(tag::ABORT);
                put_str(out, reason);
            }
            Message::Heartbeat => out.put_u8(tag::HEARTBEAT),
            Message::Progress(p) => {
                out.put_u8(tag::PROGRESS);
                out.put_u64(p.received);
                out.put_u64(p.written);
                out.put_u64(p.holds_from);
            }
            Message::Verified { ok, reason } => {
                out.put_u8(tag::VERIFIED);
                out.put_u8(u8::from(*ok));
                put_str(out, reason);
            }
            Message::Failed { reason } => {
                out.put_u8(tag::FAILED);
                put_str(out, reason);
            }
            Message::Go {
                session,
                nonce,
                proof,
            } => {
                out.put_u8(tag::GO);
                put_str(out, session);
                out.put_slice(&nonce.0);
                out.put_slice(&proof.0);
            }
            Message::GoAck { started, nodes } => {
                out.put_u8(tag::GO_ACK);
                out.put_u8(u8::from(*started));
                out.put_u32(*nodes);
            }
            Message::DataHello {
                version,
                session,
                node,
                epoch,
                from,
                nonce,
                proof,
            } => {
                out.put_u8(tag::DATA_HELLO);
                out.put_u16(*version);
                put_str(out, session);
                out.put_u32(node.0);
                out.put_u64(epoch.0);
                out.put_u64(*from);
                out.put_slice(&nonce.0);
                out.put_slice(&proof.0);
            }
            Message::DataAccepted { from } => {
                out.put_u8(tag::DATA_ACCEPTED);
                out.put_u64(*from);
            }
            Message::Stranded { epoch, from } => {
                out.put_u8(tag::STRANDED);
                out.put_u64(epoch.0);
                out.put_u64(*from);
            }
            Message::Log { lines } => {
                out.put_u8(tag::LOG);
                assert!(
                    lines.len() <= MAX_LOG_LINES,
                    "a log message of {} lines",
                    lines.len()
                );
                out.put_u16(lines.len() as u16);
                for line in lines {
                    put_str(out, line);
                }
            }
            Message::JoinFailed(f) => {
                out.put_u8(tag::JOIN_FAILED);
                out.put_u16(f.version);
                put_str(out, &f.session);
                put_str(out, &f.name);
                out.put_slice(&f.mac);
                put_str(out, &f.reason);
                out.put_slice(&f.nonce.0);
                out.put_slice(&f.proof.0);
            }
            Message::Sealed { tag, body } => {
                out.put_u8(tag::SEALED);
                out.put_slice(&tag.0);
                out.put_slice(body);
            }
        }
        let len = out.len() - start - LEN_PREFIX;
        assert!(len <= MAX_FRAME, "frame of {len} bytes exceeds MAX_FRAME");
        out[start..start + LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    }

    /// The message's name, for error texts.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Challenge { .. } => "Challenge",
            Message::Join(_) => "Join",
            Message::Welcome { .. } => "Welcome",
            Message::Refused(_) => "Refused",
            Message::Topology { .. } => "Topology",
            Message::ImageDone { .. } => "ImageDone",
            Message::Release => "Release",
            Message::Abort { .. } => "Abort",
            Message::Heartbeat => "Heartbeat",
            Message::Progress(_) => "Progress",
            Message::Verified { .. } => "Verified",
            Message::Failed { .. } => "Failed",
            Message::Go { .. } => "Go",
            Message::GoAck { .. } => "GoAck",
            Message::DataHello { .. } => "DataHello",
            Message::DataAccepted { .. } => "DataAccepted",
            Message::Stranded { .. } => "Stranded",
            Message::Log { .. } => "Log",
            Message::JoinFailed(_) => "JoinFailed",
            Message::Sealed { .. } => "Sealed",
        }
    }

    /// Whether this message opens a conversation or answers its challenge,
    /// and so travels in the clear: a challenge, a join, a join failure, a
    /// data hello, a go. ([`Message::Refused`] also travels in the clear, but may come at
    /// any point.)
    pub fn is_handshake(&self) -> bool {
        matches!(
            self,
            Message::Challenge { .. }
                | Message::Join(_)
                | Message::JoinFailed(_)
                | Message::DataHello { .. }
                | Message::Go { .. }
        )
    }

    /// Decodes one frame's content (its tag byte and body, without the
    /// length prefix), as [`Message::Sealed`] carries it. Every byte must
    /// belong to the message.
    pub fn decode_body(body: &[u8]) -> Result<Message, DecodeError> {
        if body.is_empty() {
            return Err(DecodeError::Invalid("empty frame"));
        }
        if body.len() > MAX_FRAME {
            return Err(DecodeError::TooLong(body.len() as u64));
        }
        let mut r = Reader(body);
        let msg = r.message()?;
        if !r.0.is_empty() {
            return Err(DecodeError::Invalid("trailing bytes in frame"));
        }
        Ok(msg)
    }

    /// The frame content [`Message::decode_body`] reads: this message
    /// encoded without its length prefix.
    pub fn encode_body(&self) -> Vec<u8> {
        let framed = self.to_bytes();
        framed[LEN_PREFIX..].to_vec()
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> BytesMut {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out
    }

    /// Takes one whole frame off the front of `buf` and decodes it.
    ///
    /// Returns `Ok(None)` when `buf` does not yet hold a whole frame (read
    /// more and call again); an error means the peer is broken or hostile and
    /// the connection should be closed. A frame that decodes with bytes left
    /// over is an error too: a peer of this version never sends one.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
        if buf.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes(buf[..LEN_PREFIX].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(DecodeError::TooLong(len as u64));
        }
        if len == 0 {
            return Err(DecodeError::Invalid("empty frame"));
        }
        if buf.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        buf.advance(LEN_PREFIX);
        let frame = buf.split_to(len);
        let mut r = Reader(&frame[..]);
        let msg = r.message()?;
        if !r.0.is_empty() {
            return Err(DecodeError::Invalid("trailing bytes in frame"));
        }
        Ok(Some(msg))
    }

    /// Decodes a buffer that must hold exactly one frame.
    pub fn decode_exact(bytes: &[u8]) -> Result<Message, DecodeError> {
        let mut buf = BytesMut::from(bytes);
        match Message::decode(&mut buf)? {
            Some(m) if buf.is_empty() => Ok(m),
            Some(_) => Err(DecodeError::Invalid("bytes after the frame")),
            None => Err(DecodeError::Incomplete),
        }
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    let s = fit(s);
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

/// `s`, or its longest prefix that fits a string field with `…` after it.
fn fit(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= MAX_STRING {
        return s.into();
    }
    let mut end = MAX_STRING - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

fn put_addr(out: &mut BytesMut, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.put_u8(4);
            out.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.put_u8(6);
            out.put_slice(&ip.octets());
        }
    }
    out.put_u16(addr.port());
}

/// Bounds-checked reads from one frame; every read can fail, none can panic.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Invalid("frame ends inside a field"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid("boolean out of range")),
        }
    }
    fn bytes32(&mut self) -> Result<[u8; 32], DecodeError> {
        Ok(self.take(32)?.try_into().expect("32"))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        if len > MAX_STRING {
            return Err(DecodeError::TooLong(len as u64));
        }
        let raw = self.take(len)?;
        core::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Invalid("string is not UTF-8"))
    }
    fn addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(self.take(4)?).expect("4"),
            )),
            6 => IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(self.take(16)?).expect("16"),
            )),
            _ => return Err(DecodeError::Invalid("unknown address family")),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }

    fn message(&mut self) -> Result<Message, DecodeError> {
        Ok(match self.u8()? {
            tag::CHALLENGE => Message::Challenge {
                version: self.u16()?,
                nonce: Nonce(self.bytes32()?),
            },
            tag::JOIN => {
                let version = self.u16()?;
                let session = self.string()?;
                let name = self.string()?;
                let mac = self.take(6)?.try_into().expect("6");
                let data_addr = self.addr()?;
                let flags = self.u8()?;
                if flags > 7 {
                    return Err(DecodeError::Invalid("unknown join flags"));
                }
                let have = self.u64()?;
                let holds_from = self.u64()?;
                let image = if flags & 4 != 0 {
                    Some(ImageId(self.bytes32()?))
                } else {
                    None
                };
                Message::Join(Box::new(Join {
                    version,
                    session,
                    name,
                    mac,
                    data_addr,
                    wait_release: flags & 1 != 0,
                    readable: flags & 2 != 0,
                    have,
                    holds_from,
                    image,
                    nonce: Nonce(self.bytes32()?),
                    proof: Tag(self.bytes32()?),
                }))
            }
            tag::WELCOME => Message::Welcome {
                node: NodeId(self.u32()?),
                heartbeat_ms: self.u32()?,
                dead_after_ms: self.u32()?,
                image_size: Some(self.u64()?).filter(|&s| s != u64::MAX),
                image: ImageId(self.bytes32()?),
                resume_from: self.u64()?,
                run: Nonce(self.bytes32()?),
                encoding: match self.u8()? {
                    0 => Encoding::Plain,
                    1 => Encoding::Zstd {
                        image_size: Some(self.u64()?).filter(|&s| s != u64::MAX),
                    },
                    _ => return Err(DecodeError::Invalid("unknown stream encoding")),
                },
            },
            tag::REFUSED => {
                let code = *RefusalCode::ALL
                    .get(self.u8()? as usize)
                    .ok_or(DecodeError::Invalid("unknown refusal code"))?;
                Message::Refused(Refusal {
                    code,
                    detail: self.string()?,
                })
            }
            tag::TOPOLOGY => {
                let epoch = Epoch(self.u64()?);
                let upstream = match self.u8()? {
                    0 => None,
                    1 => Some(Upstream {
                        node: None,
                        addr: self.addr()?,
                        ticket: Ticket(self.bytes32()?),
                    }),
                    2 => {
                        let node = Some(NodeId(self.u32()?));
                        Some(Upstream {
                            node,
                            addr: self.addr()?,
                            ticket: Ticket(self.bytes32()?),
                        })
                    }
                    _ => return Err(DecodeError::Invalid("unknown upstream kind")),
                };
                let count = self.u16()? as usize;
                // Check the count against what is left before allocating.
                if count * 4 > self.0.len() {
                    return Err(DecodeError::Invalid("list longer than its frame"));
                }
                let mut downstreams = Vec::with_capacity(count);
                for _ in 0..count {
                    downstreams.push(NodeId(self.u32()?));
                }
                Message::Topology {
                    epoch,
                    upstream,
                    downstreams,
                }
            }
            tag::IMAGE_DONE => Message::ImageDone {
                total: self.u64()?,
                digest: Digest(self.bytes32()?),
                image_digest: match self.u8()? {
                    0 => None,
                    1 => Some(Digest(self.bytes32()?)),
                    _ => return Err(DecodeError::Invalid("unknown image digest kind")),
                },
            },
            tag::RELEASE => Message::Release,
            tag::ABORT => Message::Abort {
                reason: self.string()?,
            },
            tag::HEARTBEAT => Message::Heartbeat,
            tag::PROGRESS => Message::Progress(Progress {
                received: self.u64()?,
                written: self.u64()?,
                holds_from: self.u64()?,
            }),
            tag::VERIFIED => Message::Verified {
                ok: self.bool()?,
                reason: self.string()?,
            },
            tag::FAILED => Message::Failed {
                reason: self.string()?,
            },
            tag::GO => Message::Go {
                session: self.string()?,
                nonce: Nonce(self.bytes32()?),
                proof: Tag(self.bytes32()?),
            },
            tag::GO_ACK => Message::GoAck {
                started: self.bool()?,
                nodes: self.u32()?,
            },
            tag::DATA_HELLO => Message::DataHello {
                version: self.u16()?,
                session: self.string()?,
                node: NodeId(self.u32()?),
                epoch: Epoch(self.u64()?),
                from: self.u64()?,
                nonce: Nonce(self.bytes32()?),
                proof: Tag(self.bytes32()?),
            },
            tag::DATA_ACCEPTED => Message::DataAccepted { from: self.u64()? },
            tag::STRANDED => Message::Stranded {
                epoch: Epoch(self.u64()?),
                from: self.u64()?,
            },
            tag::LOG => {
                let count = self.u16()? as usize;
                if count > MAX_LOG_LINES {
                    return Err(DecodeError::TooLong(count as u64));
                }
                // Every line takes at least its length prefix.
                if count * 2 > self.0.len() {
                    return Err(DecodeError::Invalid("list longer than its frame"));
                }
                let mut lines = Vec::with_capacity(count);
                for _ in 0..count {
                    lines.push(self.string()?);
                }
                Message::Log { lines }
            }
            tag::JOIN_FAILED => Message::JoinFailed(Box::new(JoinFailed {
                version: self.u16()?,
                session: self.string()?,
                name: self.string()?,
                mac: self.take(6)?.try_into().expect("6"),
                reason: self.string()?,
                nonce: Nonce(self.bytes32()?),
                proof: Tag(self.bytes32()?),
            })),
            tag::SEALED => {
                let tag = Tag(self.bytes32()?);
                let body = self.take(self.0.len())?.to_vec();
                if body.is_empty() {
                    return Err(DecodeError::Invalid("sealed message without a body"));
                }
                Message::Sealed { tag, body }
            }
            other => return Err(DecodeError::UnknownTag(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        ".{0,40}"
    }

    fn message() -> impl Strategy<Value = Message> {
        let join = (
            any::<u16>(),
            text(),
            text(),
            any::<[u8; 6]>(),
            addr(),
            any::<(bool, bool)>(),
            any::<(u64, u64)>(),
            (
                proptest::option::of(any::<[u8; 32]>()),
                any::<[u8; 32]>(),
                any::<[u8; 32]>(),
            ),
        )
            .prop_map(
                |(
                    version,
                    session,
                    name,
                    mac,
                    data_addr,
                    (w, r),
                    (have, holds_from),
                    (image, nonce, proof),
                )| {
                    Message::Join(Box::new(Join {
                        version,
                        session,
                        name,
                        mac,
                        data_addr,
                        wait_release: w,
                        readable: r,
                        have,
                        holds_from,
                        image: image.map(ImageId),
                        nonce: Nonce(nonce),
                        proof: Tag(proof),
                    }))
                },
            );
        let upstream = prop_oneof![
            Just(None),
            (addr(), any::<[u8; 32]>()).prop_map(|(addr, t)| Some(Upstream {
                node: None,
                addr,
                ticket: Ticket(t)
            })),
            (any::<u32>(), addr(), any::<[u8; 32]>()).prop_map(|(n, addr, t)| Some(Upstream {
                node: Some(NodeId(n)),
                addr,
                ticket: Ticket(t)
            })),
        ];
        prop_oneof![
            (any::<u16>(), any::<[u8; 32]>()).prop_map(|(version, n)| Message::Challenge {
                version,
                nonce: Nonce(n)
            }),
            join,
            (
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                proptest::option::of(0..u64::MAX),
                any::<[u8; 32]>(),
                any::<u64>(),
                any::<[u8; 32]>(),
                prop_oneof![
                    Just(Encoding::Plain),
                    proptest::option::of(0..u64::MAX)
                        .prop_map(|image_size| Encoding::Zstd { image_size }),
                ],
            )
                .prop_map(
                    |(n, h, d, image_size, image, resume_from, run, encoding)| {
                        Message::Welcome {
                            node: NodeId(n),
                            heartbeat_ms: h,
                            dead_after_ms: d,
                            image_size,
                            image: ImageId(image),
                            resume_from,
                            run: Nonce(run),
                            encoding,
                        }
                    }
                ),
            (0..RefusalCode::ALL.len(), text()).prop_map(|(c, detail)| Message::Refused(Refusal {
                code: RefusalCode::ALL[c],
                detail
            })),
            (
                any::<u64>(),
                upstream,
                proptest::collection::vec(any::<u32>(), 0..20)
            )
                .prop_map(|(e, upstream, d)| {
                    Message::Topology {
                        epoch: Epoch(e),
                        upstream,
                        downstreams: d.into_iter().map(NodeId).collect(),
                    }
                }),
            (
                any::<u64>(),
                any::<[u8; 32]>(),
                proptest::option::of(any::<[u8; 32]>())
            )
                .prop_map(|(total, d, image)| Message::ImageDone {
                    total,
                    digest: Digest(d),
                    image_digest: image.map(Digest),
                }),
            Just(Message::Release),
            text().prop_map(|reason| Message::Abort { reason }),
            Just(Message::Heartbeat),
            any::<(u64, u64, u64)>().prop_map(|(received, written, holds_from)| {
                Message::Progress(Progress {
                    received,
                    written,
                    holds_from,
                })
            }),
            (any::<bool>(), text()).prop_map(|(ok, reason)| Message::Verified { ok, reason }),
            text().prop_map(|reason| Message::Failed { reason }),
            (text(), any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(session, n, p)| {
                Message::Go {
                    session,
                    nonce: Nonce(n),
                    proof: Tag(p),
                }
            }),
            (any::<bool>(), any::<u32>())
                .prop_map(|(started, nodes)| Message::GoAck { started, nodes }),
            (
                any::<u16>(),
                text(),
                any::<u32>(),
                any::<u64>(),
                any::<u64>(),
                (any::<[u8; 32]>(), any::<[u8; 32]>())
            )
                .prop_map(|(version, session, n, e, from, (nonce, p))| {
                    Message::DataHello {
                        version,
                        session,
                        node: NodeId(n),
                        epoch: Epoch(e),
                        from,
                        nonce: Nonce(nonce),
                        proof: Tag(p),
                    }
                }),
            any::<u64>().prop_map(|from| Message::DataAccepted { from }),
            stranded(),
            sealed(),
            log(),
            join_failed(),
        ]
    }

    fn log() -> impl Strategy<Value = Message> {
        proptest::collection::vec(text(), 0..=MAX_LOG_LINES)
            .prop_map(|lines| Message::Log { lines })
    }

    fn join_failed() -> impl Strategy<Value = Message> {
        (
            any::<u16>(),
            (text(), text(), text()),
            any::<[u8; 6]>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
        )
            .prop_map(|(version, (session, name, reason), mac, nonce, proof)| {
                Message::JoinFailed(Box::new(JoinFailed {
                    version,
                    session,
                    name,
                    mac,
                    reason,
                    nonce: Nonce(nonce),
                    proof: Tag(proof),
                }))
            })
    }

    fn sealed() -> impl Strategy<Value = Message> {
        (
            any::<[u8; 32]>(),
            proptest::collection::vec(any::<u8>(), 1..200),
        )
            .prop_map(|(tag, body)| Message::Sealed {
                tag: Tag(tag),
                body,
            })
    }

    fn stranded() -> impl Strategy<Value = Message> {
        any::<(u64, u64)>().prop_map(|(e, from)| Message::Stranded {
            epoch: Epoch(e),
            from,
        })
    }

    proptest! {
        #[test]
        fn every_message_round_trips(msg in message()) {
            let bytes = msg.to_bytes();
            prop_assert_eq!(Message::decode_exact(&bytes), Ok(msg));
        }

        #[test]
        fn frames_split_anywhere_decode_the_same(msgs in proptest::collection::vec(message(), 1..5), cut in 0usize..400) {
            let mut all = BytesMut::new();
            for m in &msgs { m.encode(&mut all); }
            let cut = cut.min(all.len());
            let mut buf = BytesMut::from(&all[..cut]);
            let mut decoded = Vec::new();
            while let Some(m) = Message::decode(&mut buf).unwrap() { decoded.push(m); }
            buf.extend_from_slice(&all[cut..]);
            while let Some(m) = Message::decode(&mut buf).unwrap() { decoded.push(m); }
            prop_assert_eq!(decoded, msgs);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn bounded_window_messages_round_trip(
            msg in prop_oneof![
                stranded(),
                any::<(u64, u64, u64)>().prop_map(|(received, written, holds_from)| {
                    Message::Progress(Progress { received, written, holds_from })
                }),
                (0..RefusalCode::ALL.len(), text()).prop_map(|(c, detail)| {
                    Message::Refused(Refusal { code: RefusalCode::ALL[c], detail })
                }),
            ],
            cut in 0usize..40,
        ) {
            let bytes = msg.to_bytes();
            prop_assert_eq!(Message::decode_exact(&bytes), Ok(msg.clone()));
            // Any shorter prefix is incomplete, never a different message.
            let cut = cut.min(bytes.len() - 1);
            let mut short = BytesMut::from(&bytes[..cut]);
            prop_assert_eq!(Message::decode(&mut short), Ok(None));
        }

        #[test]
        fn a_sealed_body_round_trips_the_message_inside(msg in message()) {
            let body = msg.encode_body();
            prop_assert_eq!(Message::decode_body(&body), Ok(msg.clone()));
            let sealed = Message::Sealed { tag: Tag([1; 32]), body };
            prop_assert_eq!(Message::decode_exact(&sealed.to_bytes()), Ok(sealed));
        }

        #[test]
        fn garbage_in_a_sealed_body_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Message::decode_body(&bytes);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = BytesMut::from(&bytes[..]);
            // Errors are fine; panics and unbounded loops are not.
            for _ in 0..bytes.len() + 1 {
                match Message::decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }

        #[test]
        fn garbage_inside_a_valid_length_never_panics(body in proptest::collection::vec(any::<u8>(), 1..300)) {
            let mut framed = BytesMut::new();
            framed.put_u32(body.len() as u32);
            framed.put_slice(&body);
            let _ = Message::decode(&mut framed);
        }
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut buf = BytesMut::from(&((MAX_FRAME as u32) + 1).to_be_bytes()[..]);
        assert_eq!(
            Message::decode(&mut buf),
            Err(DecodeError::TooLong(MAX_FRAME as u64 + 1))
        );
    }

    #[test]
    fn an_overlong_reason_is_cut_to_fit_not_a_panic() {
        // An abort quoting an error about a long path, say.
        let reason = format!("the image could not be read: {}", "é/".repeat(2000));
        let mut out = BytesMut::new();
        Message::Abort { reason }.encode(&mut out);
        let Ok(Some(Message::Abort { reason })) = Message::decode(&mut out) else {
            panic!("the cut message does not decode")
        };
        assert!(
            reason.len() <= MAX_STRING && reason.ends_with('…'),
            "{reason}"
        );
        assert!(reason.starts_with("the image could not be read: é/"));
    }

    #[test]
    fn stranded_and_the_window_fields_have_a_fixed_layout() {
        let stranded = Message::Stranded {
            epoch: Epoch(0x0102),
            from: 0x0a0b,
        };
        let mut want = vec![0, 0, 0, 17, tag::STRANDED];
        want.extend_from_slice(&0x0102u64.to_be_bytes());
        want.extend_from_slice(&0x0a0bu64.to_be_bytes());
        assert_eq!(&stranded.to_bytes()[..], &want[..]);

        let progress = Message::Progress(Progress {
            received: 3,
            written: 2,
            holds_from: 1,
        });
        let bytes = progress.to_bytes();
        assert_eq!(bytes.len(), 4 + 1 + 3 * 8);
        assert_eq!(&bytes[bytes.len() - 8..], &1u64.to_be_bytes());
        // A version 3 progress (no holds_from) is refused, not misread.
        let mut v3 = BytesMut::new();
        v3.put_u32(17);
        v3.put_u8(tag::PROGRESS);
        v3.put_u64(3);
        v3.put_u64(2);
        assert!(matches!(
            Message::decode(&mut v3),
            Err(DecodeError::Invalid(_))
        ));

        let refused = Message::Refused(Refusal::new(RefusalCode::CannotResume, "gone".into()));
        assert_eq!(refused.to_bytes()[5], 7, "CannotResume's code on the wire");
    }

    #[test]
    fn join_flags_carry_wait_release_readable_and_image() {
        let join = |wait_release, readable, image: Option<ImageId>| {
            Message::Join(Box::new(Join {
                version: PROTOCOL_VERSION,
                session: "s".into(),
                name: "n".into(),
                mac: [0; 6],
                data_addr: SocketAddr::from(([10, 0, 0, 1], 9000)),
                wait_release,
                readable,
                have: 0,
                holds_from: 0,
                image,
                nonce: Nonce([0; 32]),
                proof: Tag([0; 32]),
            }))
        };
        // The flags byte sits after version, two strings, the MAC and a v4 address.
        let flags_at = 4 + 1 + 2 + (2 + 1) + (2 + 1) + 6 + (1 + 4 + 2);
        for (w, r, image, flags) in [
            (false, false, None, 0u8),
            (true, false, None, 1),
            (false, true, None, 2),
            (true, true, Some(ImageId([1; 32])), 7),
        ] {
            let msg = join(w, r, image);
            let bytes = msg.to_bytes();
            assert_eq!(bytes[flags_at], flags, "{msg:?}");
            assert_eq!(Message::decode_exact(&bytes), Ok(msg));
        }
    }

    #[test]
    fn the_handshake_fields_of_version_5_have_a_fixed_layout() {
        let nonce = Nonce([0xab; 32]);
        let hello = Message::DataHello {
            version: PROTOCOL_VERSION,
            session: "s".into(),
            node: NodeId(1),
            epoch: Epoch(2),
            from: 3,
            nonce,
            proof: Tag([0xcd; 32]),
        };
        let bytes = hello.to_bytes();
        // The nonce, then the proof, end the hello.
        assert_eq!(&bytes[bytes.len() - 64..bytes.len() - 32], &[0xab; 32]);
        assert_eq!(&bytes[bytes.len() - 32..], &[0xcd; 32]);
        let sealed = Message::Sealed {
            tag: Tag([1; 32]),
            body: vec![tag::HEARTBEAT],
        };
        let mut want = vec![0, 0, 0, 34, tag::SEALED];
        want.extend_from_slice(&[1; 32]);
        want.push(tag::HEARTBEAT);
        assert_eq!(&sealed.to_bytes()[..], &want[..]);
        // A sealed frame with no body is refused, not an empty message.
        let mut empty = BytesMut::new();
        empty.put_u32(33);
        empty.put_u8(tag::SEALED);
        empty.put_slice(&[0; 32]);
        assert!(Message::decode(&mut empty).is_err());
        // A ticket never shows in a log.
        let up = Upstream {
            node: None,
            addr: SocketAddr::from(([10, 0, 0, 1], 1)),
            ticket: Ticket([0x77; 32]),
        };
        assert!(!format!("{up:?}").contains("77"));
        assert!(hello.is_handshake() && !sealed.is_handshake());
    }

    #[test]
    fn a_log_message_is_bounded_in_lines_and_line_length() {
        // The most lines, each as long as a string may be, fit a frame.
        let long = "x".repeat(5000);
        let full = Message::Log {
            lines: vec![long; MAX_LOG_LINES],
        };
        let bytes = full.to_bytes();
        assert!(bytes.len() <= MAX_FRAME + 4);
        let Ok(Message::Log { lines }) = Message::decode_exact(&bytes) else {
            panic!("a full log message does not decode")
        };
        assert_eq!(lines.len(), MAX_LOG_LINES);
        assert!(lines
            .iter()
            .all(|l| l.len() <= MAX_STRING && l.ends_with('…')));
        // A count above the bound is refused before anything is read.
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_u8(tag::LOG);
        buf.put_u16(MAX_LOG_LINES as u16 + 1);
        assert_eq!(
            Message::decode(&mut buf),
            Err(DecodeError::TooLong(MAX_LOG_LINES as u64 + 1))
        );
        // So is a count the frame cannot hold.
        let mut buf = BytesMut::new();
        buf.put_u32(5);
        buf.put_u8(tag::LOG);
        buf.put_u16(2);
        buf.put_u16(0);
        assert!(matches!(
            Message::decode(&mut buf),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    #[should_panic(expected = "a log message of 33 lines")]
    fn encoding_too_many_log_lines_is_a_programming_error() {
        let _ = Message::Log {
            lines: vec![String::new(); MAX_LOG_LINES + 1],
        }
        .to_bytes();
    }

    #[test]
    fn huge_list_count_is_refused_without_allocating() {
        let mut buf = BytesMut::new();
        let body_start = {
            buf.put_u32(0);
            buf.len()
        };
        buf.put_u8(tag::TOPOLOGY);
        buf.put_u64(1);
        buf.put_u8(0);
        buf.put_u16(u16::MAX);
        let len = (buf.len() - body_start) as u32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            Message::decode(&mut buf),
            Err(DecodeError::Invalid(_))
        ));
    }
}

//! Direct forwarding: a node's receiving thread sends each piece it has just
//! written straight on to the downstreams that are caught up with it.
//!
//! A downstream is normally served from the node's written file
//! ([`send_growing`](super::send_growing)): its serving task wakes when the
//! writer has written more, finds the new extents and `sendfile`s them. On
//! a slow link that is a task wakeup, an `lseek`, a zero probe and two sends
//! for every piece of a few kilobytes the node receives: about four times a
//! plain relay's CPU, enough to saturate two cores shared by many nodes.
//!
//! So while a downstream keeps up, its serving task *lends* its socket to the
//! receiving thread (`Downstreams::lend`), which then forwards each piece
//! itself, right after writing it, with one non-blocking `sendmsg` of the
//! record header and the piece from the buffer it is still holding. The
//! thread never waits for a downstream: when a send comes up short (the
//! downstream fell behind) or finds no room, it hands the socket back,
//! telling the serving task what part of the record is still unsent; the
//! task finishes it from the file and serves from the file as before, and
//! lends the socket again once it has caught up. When the relay stops (at
//! the end of the image, on an error, or when it is dropped to relink) every
//! lent socket goes back.
//!
//! The forwarded stream is made of the node's own records (one per piece),
//! not the upstream's: records carry absolute offsets and the digest does
//! not depend on where records are cut, so a downstream cannot tell.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use ka_core::record::{RecordHeader, RecordKind};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::Error;

/// The downstreams a node's receiving thread may feed directly: shared by
/// the node's writer (see [`NodeWriter`](super::NodeWriter)'s relays)
/// and the tasks serving its downstreams.
#[derive(Default)]
pub struct Downstreams {
    state: Mutex<State>,
}

impl std::fmt::Debug for Downstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("Downstreams")
            .field("feeding", &s.feeding)
            .field("upto", &s.upto)
            .field("lent", &s.leases.len())
            .field("stats", &s.stats)
            .finish()
    }
}

/// What direct forwarding has done so far, for the log and for tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirectStats {
    /// Records the receiving thread sent whole, straight to a downstream.
    pub records: u64,
    /// Their bytes of payload.
    pub bytes: u64,
    /// Sockets handed back because the downstream could not take a whole
    /// record at once (it fell behind).
    pub fell_behind: u64,
    /// Of those, the times part of the record had gone and the serving
    /// task finished it from the file.
    pub split_records: u64,
}

#[derive(Default)]
struct State {
    /// A receiving thread is running, and hands back every lease when it stops.
    feeding: bool,
    /// While feeding: everything before this offset is written.
    upto: u64,
    /// The thread's pieces are small (a slow link: written once complete
    /// or at their deadline), so sending them straight on pays. A full buffer (a fast
    /// link) goes better by `sendfile` from the serving task: it would not
    /// fit the socket at once anyway, and it needs no copy.
    pieces_small: bool,
    leases: Vec<Lease>,
    next_id: u64,
    stats: DirectStats,
}

impl State {
    /// Hands every lent socket back where its downstream stands.
    fn return_all(&mut self) {
        for lease in self.leases.drain(..) {
            let _ = lease.back.send(Returned {
                sent: lease.sent,
                unsent: None,
            });
        }
    }
}

/// A downstream socket lent to the receiving thread.
struct Lease {
    id: u64,
    /// A duplicate of the serving task's socket, closed when the lease ends.
    socket: OwnedFd,
    /// The downstream has every byte before this offset, and its stream is
    /// at a record boundary.
    sent: u64,
    back: oneshot::Sender<Returned>,
}

/// Where a downstream stands when its socket comes back.
#[derive(Debug)]
pub(crate) struct Returned {
    /// Once `unsent` is sent, the downstream has every byte before this
    /// offset and its stream is at a record boundary.
    pub sent: u64,
    /// The end of a record the thread could send only part of.
    pub unsent: Option<Unsent>,
}

/// The rest of a partly sent record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unsent {
    /// The header's bytes not yet sent (empty if all of it went).
    pub header_tail: Vec<u8>,
    /// The payload not yet sent, as `(offset, len)` in the written file.
    pub payload: (u64, u64),
}

impl Downstreams {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (each change is one
        // assignment or one Vec operation), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lends `socket`, whose downstream has everything before `at` at a
    /// record boundary, to the receiving thread, if one is running and has
    /// written exactly up to `at`. `None`: serve from the file instead.
    pub(crate) fn lend(
        self: &Arc<Self>,
        socket: &TcpStream,
        at: u64,
    ) -> Result<Option<Loan>, Error> {
        let mut s = self.lock();
        if !s.feeding || !s.pieces_small || s.upto != at {
            return Ok(None);
        }
        let dup = socket
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicating a downstream socket", e))?;
        let (tx, rx) = oneshot::channel();
        let id = s.next_id;
        s.next_id += 1;
        s.leases.push(Lease {
            id,
            socket: dup,
            sent: at,
            back: tx,
        });
        Ok(Some(Loan {
            owner: Arc::clone(self),
            id,
            back: rx,
        }))
    }

    /// What direct forwarding has done so far.
    pub fn stats(&self) -> DirectStats {
        self.lock().stats
    }

    /// How many downstream sockets are lent to the receiving thread now.
    pub fn lent(&self) -> usize {
        self.lock().leases.len()
    }

    /// A receiving thread starts writing at `at`; it feeds the lent
    /// downstreams until the returned guard is dropped.
    pub(crate) fn start_feeding(self: &Arc<Self>, at: u64) -> Feeding {
        let mut s = self.lock();
        s.feeding = true;
        s.upto = at;
        s.pieces_small = false;
        Feeding {
            owner: Arc::clone(self),
        }
    }
}

/// A socket lent to the receiving thread; dropping it takes the socket back
/// (so a serving task that is cancelled never leaves the thread writing to
/// a connection it closed).
pub(crate) struct Loan {
    owner: Arc<Downstreams>,
    id: u64,
    back: oneshot::Receiver<Returned>,
}

impl Loan {
    /// Waits until the receiving thread hands the socket back.
    pub(crate) async fn returned(&mut self) -> Result<Returned, Error> {
        (&mut self.back)
            .await
            .map_err(|_| Error::Invalid("a lent downstream socket was lost".into()))
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        self.owner.lock().leases.retain(|l| l.id != self.id);
    }
}

/// Held by a receiving thread while it feeds the lent downstreams; dropping
/// it (when the thread stops, even by a panic) hands every socket back.
pub(crate) struct Feeding {
    owner: Arc<Downstreams>,
}

impl Feeding {
    /// The record `header` was just written (`payload` is its bytes; empty
    /// for a `Zero` record): sends it to every lent downstream, and hands
    /// back each socket that cannot take all of it now. A piece that is not
    /// `small` (a full buffer) is not sent: every socket goes back, and
    /// none is lent again until pieces are small.
    pub(crate) fn written(&self, header: &RecordHeader, payload: &[u8], small: bool) {
        let mut s = self.owner.lock();
        let end = header.end();
        s.upto = end;
        s.pieces_small = small;
        if s.leases.is_empty() {
            return;
        }
        if !small {
            s.return_all();
            return;
        }
        let encoded = header.encode();
        let mut i = 0;
        while i < s.leases.len() {
            match forward(&mut s.leases[i], header, &encoded, payload) {
                None => {
                    s.stats.records += 1;
                    s.stats.bytes += payload.len() as u64;
                    i += 1;
                }
                Some(returned) => {
                    s.stats.fell_behind += 1;
                    s.stats.split_records += u64::from(returned.unsent.is_some());
                    let lease = s.leases.swap_remove(i);
                    let _ = lease.back.send(returned);
                }
            }
        }
    }
}

impl Drop for Feeding {
    fn drop(&mut self) {
        let mut s = self.owner.lock();
        s.feeding = false;
        s.return_all();
    }
}

/// Sends one record to a lent downstream without waiting; `Some` (where it
/// stands) if the socket must go back to its serving task.
fn forward(
    lease: &mut Lease,
    header: &RecordHeader,
    encoded: &[u8; RecordHeader::SIZE],
    payload: &[u8],
) -> Option<Returned> {
    use nix::sys::socket::{sendmsg, MsgFlags, SockaddrStorage};
    if lease.sent != header.offset {
        // Not caught up after all (cannot happen while every written piece
        // passes through here): the serving task finds the gap in the file.
        return Some(Returned {
            sent: lease.sent,
            unsent: None,
        });
    }
    let iov = [IoSlice::new(encoded), IoSlice::new(payload)];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    let total = encoded.len() + payload.len();
    let sent = sendmsg::<SockaddrStorage>(lease.socket.as_raw_fd(), &iov, &[], flags, None);
    match sent {
        Ok(n) if n == total => {
            lease.sent = header.end();
            None
        }
        Ok(n) if n > 0 => Some(Returned {
            sent: header.end(),
            unsent: Some(unsent_part(header, encoded, n)),
        }),
        // No room at all, or an error the serving task meets (and reports)
        // on its own next send.
        _ => Some(Returned {
            sent: lease.sent,
            unsent: None,
        }),
    }
}

/// What remains of record `header` (`encoded` on the wire) after its first
/// `n` bytes (header first, then payload) went out.
fn unsent_part(header: &RecordHeader, encoded: &[u8], n: usize) -> Unsent {
    let header_tail = encoded[n.min(encoded.len())..].to_vec();
    let payload_len = if header.kind == RecordKind::Data {
        header.len
    } else {
        0
    };
    let payload_sent = (n.saturating_sub(encoded.len()) as u64).min(payload_len);
    Unsent {
        header_tail,
        payload: (header.offset + payload_sent, payload_len - payload_sent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(offset: u64, len: u64) -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Data,
            offset,
            len,
        }
    }

    #[test]
    fn unsent_part_splits_header_and_payload() {
        let h = data(4096, 1000);
        assert_eq!(
            unsent_part(&h, &h.encode(), 5),
            Unsent {
                header_tail: h.encode()[5..].to_vec(),
                payload: (4096, 1000)
            }
        );
        assert_eq!(
            unsent_part(&h, &h.encode(), RecordHeader::SIZE + 300),
            Unsent {
                header_tail: vec![],
                payload: (4396, 700)
            }
        );
        let z = RecordHeader {
            kind: RecordKind::Zero,
            offset: 0,
            len: 1 << 30,
        };
        assert_eq!(
            unsent_part(&z, &z.encode(), 3),
            Unsent {
                header_tail: z.encode()[3..].to_vec(),
                payload: (0, 0)
            }
        );
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn a_socket_is_lent_only_to_a_running_thread_caught_up_on_small_pieces() {
        let (down, _far) = pair().await;
        let d = Arc::new(Downstreams::default());
        assert!(d.lend(&down, 0).unwrap().is_none(), "no thread runs");
        let feeding = d.start_feeding(0);
        assert!(d.lend(&down, 0).unwrap().is_none(), "no piece written yet");
        feeding.written(&data(0, 100), &[1; 100], true);
        assert!(d.lend(&down, 0).unwrap().is_none(), "behind the thread");
        let loan = d.lend(&down, 100).unwrap();
        assert!(loan.is_some(), "caught up on small pieces");
        assert_eq!(d.lent(), 1);
        feeding.written(&data(100, 1 << 20), &vec![2; 1 << 20], false);
        assert_eq!(d.lent(), 0, "a full buffer hands every socket back");
        assert!(d.lend(&down, 100 + (1 << 20)).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_lent_socket_carries_pieces_and_comes_back_where_its_downstream_stands() {
        let (down, mut far) = pair().await;
        let d = Arc::new(Downstreams::default());
        let feeding = d.start_feeding(0);
        feeding.written(&data(0, 10), &[1; 10], true);
        let mut loan = d.lend(&down, 10).unwrap().unwrap();
        feeding.written(&data(10, 20), &[2; 20], true);
        assert_eq!(d.stats().records, 1);
        drop(feeding);
        let back = loan.returned().await.unwrap();
        assert_eq!(back.sent, 30);
        assert!(back.unsent.is_none());
        let mut got = vec![0u8; RecordHeader::SIZE + 20];
        tokio::io::AsyncReadExt::read_exact(&mut far, &mut got)
            .await
            .unwrap();
        assert_eq!(&got[..RecordHeader::SIZE], &data(10, 20).encode());
        assert_eq!(&got[RecordHeader::SIZE..], &[2; 20]);
    }

    #[tokio::test]
    async fn a_dropped_loan_takes_its_socket_back() {
        let (down, _far) = pair().await;
        let d = Arc::new(Downstreams::default());
        let feeding = d.start_feeding(0);
        feeding.written(&data(0, 10), &[1; 10], true);
        let loan = d.lend(&down, 10).unwrap().unwrap();
        assert_eq!(d.lent(), 1);
        drop(loan);
        assert_eq!(d.lent(), 0);
        feeding.written(&data(10, 10), &[1; 10], true);
        assert_eq!(
            d.stats().records,
            0,
            "nothing is sent to a socket taken back"
        );
    }
}

//! The network: connections between processes, and what travels on them.
//!
//! Every host has one port on a switch. A control message, or the news that
//! a connection opened, closed or failed, arrives one hop latency after it
//! leaves, and waits while either end's port is cut. A connection keeps the
//! order of what it carries in each direction, as TCP does; the two
//! directions do not wait for each other. The source's messages may be held
//! back by a drawn jitter, as a busy source writes its many connections in
//! no fixed order: that reorders messages across connections, never on one.
//!
//! Everything is addressed to one incarnation of a process: what reaches a
//! process that has died or restarted since is dropped, and what reaches a
//! frozen one waits until it continues. Image data does not travel here as
//! messages; the data module moves it as a fluid over the same ports.

use core::net::SocketAddr;
use core::time::Duration;

use ka_core::codec::{Message, Nonce};
use ka_core::ids::ConnId;
use ka_core::time::Time;
use rand::{Rng, RngCore};

use super::{Ev, Sim};

/// One end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum End {
    /// The source.
    Source,
    /// A node, by index.
    Node(usize),
}

/// A simulated TCP connection between two process incarnations.
#[derive(Debug, Clone)]
pub(super) struct Conn {
    /// The side that connected, with its process incarnation.
    pub(super) client: (End, u32),
    /// The side that accepted.
    pub(super) server: (End, u32),
    /// Neither end has closed it, reset it or died.
    pub(super) open: bool,
    /// When the last input sent on it arrives, towards the server and
    /// towards the client: none may overtake it. Each way keeps its own
    /// order, as TCP does, and the two ways do not wait for each other.
    pub(super) last_arrival: [Time; 2],
}

/// What travels to a process.
#[derive(Debug, Clone)]
pub(super) enum Input {
    /// A control message on a connection.
    Msg(ConnId, Message),
    /// The other end closed the connection, or its process died.
    Closed(ConnId),
    /// A peer connected to this process, which greets it with `nonce`.
    Accepted { conn: ConnId, nonce: Nonce },
    /// This process's connection attempt succeeded.
    Connected {
        conn: ConnId,
        to_source: bool,
        /// The nonce the connecting side answers the challenge with.
        nonce: Nonce,
    },
    /// This process's connection attempt was refused or reset.
    ConnectFailed { to_source: bool },
}

impl Sim {
    /// How long a control message takes over a hop. Control messages are a
    /// few dozen bytes: their share of the port and their frame overhead are
    /// negligible next to the image's, so they pay only the latency.
    pub(super) fn latency(&self) -> Duration {
        self.cfg.latency
    }

    /// Until when `end`'s port is cut, if it is now.
    fn cut_until(&self, end: End) -> Option<Time> {
        match end {
            End::Source => None,
            End::Node(i) => self.nodes[i].cut_until.filter(|&t| t > self.now),
        }
    }

    /// When something sent now from `a` reaches `b`: one hop later, or one hop
    /// after the later of their ports is restored.
    fn arrival(&self, a: End, b: End) -> Time {
        let held = self.cut_until(a).max(self.cut_until(b)).unwrap_or(self.now);
        held + self.latency()
    }

    /// The generation of `end`'s current process.
    pub(super) fn incarnation(&self, end: End) -> u32 {
        match end {
            End::Source => self.source_incarnation,
            End::Node(i) => self.nodes[i].incarnation,
        }
    }

    /// Whether `end` has a process running (frozen or not).
    fn alive(&self, end: End) -> bool {
        match end {
            End::Source => !self.source_down,
            End::Node(i) => self.nodes[i].machine.is_some(),
        }
    }

    /// Sends `input` from `from` to `to`, outside any connection's order.
    fn send(&mut self, from: End, to: End, input: Input) {
        let at = self.arrival(from, to);
        self.deliver_at(at, to, input);
    }

    /// Hands `input` to `to`'s current process at `at`.
    fn deliver_at(&mut self, at: Time, to: End, input: Input) {
        let incarnation = self.incarnation(to);
        self.schedule(
            at,
            Ev::Deliver {
                to,
                incarnation,
                input,
            },
        );
    }

    /// The other end of `conn` from `me`, with the incarnation it was
    /// opened with.
    pub(super) fn other_end(&self, conn: ConnId, me: End) -> Option<(End, u32)> {
        let c = self.conns.get(conn.0 as usize)?;
        if c.client.0 == me {
            Some(c.server)
        } else {
            Some(c.client)
        }
    }

    /// Sends a control message on `conn`, jittered if it leaves the
    /// source; dropped if the connection is closed or its peer is gone.
    pub(super) fn transmit(&mut self, from: End, conn: ConnId, msg: Message) {
        let Some(c) = self.conns.get(conn.0 as usize) else {
            return;
        };
        if !c.open {
            return;
        }
        let Some((to, inc)) = self.other_end(conn, from) else {
            return;
        };
        if self.incarnation(to) != inc {
            return;
        }
        let mut at = self.arrival(from, to);
        if from == End::Source && !self.cfg.control_jitter.is_zero() {
            let most = self.cfg.control_jitter.as_nanos() as u64;
            at = at + Duration::from_nanos(self.rng.gen_range(0..=most));
        }
        self.send_in_order(conn, at, to, Input::Msg(conn, msg));
    }

    /// Delivers `input` on `conn` at `at`, or later: after everything sent
    /// on `conn` before it.
    fn send_in_order(&mut self, conn: ConnId, at: Time, to: End, input: Input) {
        let c = &mut self.conns[conn.0 as usize];
        let way = usize::from(c.server.0 != to);
        let at = at.max(c.last_arrival[way]);
        c.last_arrival[way] = at;
        self.deliver_at(at, to, input);
    }

    /// `from` closes `conn`: its flows stop, and the other end hears of it
    /// after everything sent before.
    pub(super) fn close(&mut self, from: End, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn.0 as usize) else {
            return;
        };
        if !c.open {
            return;
        }
        c.open = false;
        self.stop_flows_on(conn);
        if let Some((to, inc)) = self.other_end(conn, from) {
            if self.incarnation(to) == inc && self.alive(to) {
                let at = self.arrival(from, to);
                self.send_in_order(conn, at, to, Input::Closed(conn));
            }
        }
    }

    /// `from` connects to `to_addr`: both ends hear of it, or `from` is
    /// refused if nobody lives there.
    pub(super) fn connect(&mut self, from: End, to_addr: SocketAddr, to_source: bool) {
        let target = if to_addr == self.source_addr {
            Some(End::Source)
        } else {
            self.by_addr.get(&to_addr).copied().map(End::Node)
        };
        let reachable = target.filter(|&t| self.alive(t));
        match reachable {
            Some(to) => {
                let conn = ConnId(self.conns.len() as u64);
                self.conns.push(Conn {
                    client: (from, self.incarnation(from)),
                    server: (to, self.incarnation(to)),
                    open: true,
                    last_arrival: [Time::ZERO; 2],
                });
                let mut nonce = [0u8; 32];
                self.rng.fill_bytes(&mut nonce);
                let mut client_nonce = [0u8; 32];
                self.rng.fill_bytes(&mut client_nonce);
                // The kernel completes the handshake even for a frozen process.
                self.send(
                    from,
                    to,
                    Input::Accepted {
                        conn,
                        nonce: Nonce(nonce),
                    },
                );
                let back = self.arrival(to, from) + self.latency();
                let incarnation = self.incarnation(from);
                self.schedule(
                    back,
                    Ev::Deliver {
                        to: from,
                        incarnation,
                        input: Input::Connected {
                            conn,
                            to_source,
                            nonce: Nonce(client_nonce),
                        },
                    },
                );
            }
            None => {
                // A reset from a dead host's kernel, or nobody at that address.
                let at = self.arrival(from, from) + self.latency();
                let incarnation = self.incarnation(from);
                self.schedule(
                    at,
                    Ev::Deliver {
                        to: from,
                        incarnation,
                        input: Input::ConnectFailed { to_source },
                    },
                );
            }
        }
    }

    /// `input` reaches `to`: dropped if that process is gone, queued if it
    /// is frozen, handed to it otherwise.
    pub(super) fn deliver(&mut self, to: End, incarnation: u32, input: Input) {
        match to {
            End::Source => {
                if incarnation == self.source_incarnation && !self.source_down {
                    self.source_input(input)
                }
            }
            End::Node(i) => {
                let s = &mut self.nodes[i];
                if s.incarnation != incarnation || s.machine.is_none() {
                    return;
                }
                if s.frozen {
                    s.pending.push_back(input);
                    return;
                }
                self.node_input(i, input);
            }
        }
    }
}

//! The event queue and the loop that drives the world.
//!
//! Every change in the world is an event at a simulated time. Events wait in
//! one queue ordered by (time, sequence): two events due at the same moment
//! run in the order they were scheduled, so a run is a function of its seed
//! alone. The loop takes one event at a time, lets it act, then runs the
//! checkers that hold after every event. Every trace line is folded into the
//! trace hash, so a run can tell whether it repeated itself byte for byte.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use ka_core::time::Time;

use super::{End, Input, Sim};

/// Pending events, ordered by (time, sequence). The events themselves wait
/// in slots that are reused once taken, so the heap holds only small keys.
pub(super) struct Queue {
    /// When, the order of scheduling, and the event's slot.
    heap: BinaryHeap<Reverse<(Time, u64, usize)>>,
    /// Events scheduled so far: the tie-break between events due together.
    seq: u64,
    slots: Vec<Option<Ev>>,
    free: Vec<usize>,
}

impl Queue {
    /// An empty queue.
    pub(super) fn new() -> Self {
        Queue {
            heap: BinaryHeap::new(),
            seq: 0,
            slots: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Adds `ev` at `at`, after every event already due then.
    pub(super) fn push(&mut self, at: Time, ev: Ev) {
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(ev);
                i
            }
            None => {
                self.slots.push(Some(ev));
                self.slots.len() - 1
            }
        };
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, idx)));
    }

    /// Takes the earliest event, with its time.
    pub(super) fn pop(&mut self) -> Option<(Time, Ev)> {
        let Reverse((at, _, idx)) = self.heap.pop()?;
        let ev = self.slots[idx].take().expect("queued event present");
        self.free.push(idx);
        Some((at, ev))
    }
}

/// Something due at a moment of simulated time.
#[derive(Debug)]
pub(super) enum Ev {
    /// An input reaches a process (if it is still the same incarnation).
    Deliver {
        to: End,
        incarnation: u32,
        input: Input,
    },
    /// A machine's timer.
    Timer { to: End, incarnation: u32 },
    /// Recompute a node's data rate (gen guards against stale ones).
    Retime { node: usize, gen: u64 },
    /// A node's offset reaches the end of the image.
    Arrive { node: usize, gen: u64 },
    /// A node may have fallen out of its sender's window (gen as for
    /// `Retime`).
    WindowCheck { node: usize, gen: u64 },
    /// A fault strikes.
    Fault(usize),
    /// A node process starts (at the beginning, late, or after a restart).
    Start(usize),
    /// A frozen node continues.
    Thaw(usize),
    /// The source process starts again (after a restart fault).
    SourceStart,
    /// A restarted source has read its image through and knows its digest.
    SourceHashed { incarnation: u32 },
}

impl Sim {
    /// Runs events in order until none is left, the session has finished,
    /// a checker has found a violation, or the next event is due after
    /// `limit`.
    pub(super) fn run_events(&mut self, limit: Time) {
        while let Some((at, ev)) = self.queue.pop() {
            if at > limit || self.violation.is_some() {
                break;
            }
            self.now = at;
            self.processed += 1;
            self.step(ev);
            if self.finished_at.is_some() {
                break;
            }
        }
    }

    /// Makes `ev` happen at `at`.
    pub(super) fn schedule(&mut self, at: Time, ev: Ev) {
        self.queue.push(at, ev);
    }

    /// Adds a line to the trace: into the hash always, to stdout when asked.
    pub(super) fn trace(&mut self, line: impl FnOnce() -> String) {
        let line = line();
        for b in line.bytes().chain([b'\n']) {
            self.trace_hash = (self.trace_hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        if self.cfg.trace {
            println!("{} {line}", self.now);
        }
    }

    /// Lets one event act, then checks the world.
    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver {
                to,
                incarnation,
                input,
            } => self.deliver(to, incarnation, input),
            Ev::Timer { to, incarnation } => match to {
                End::Source => {
                    if incarnation == self.source_incarnation
                        && !self.source_down
                        && self.source_timer.is_some_and(|t| t <= self.now)
                    {
                        self.source_timer = None;
                        self.source.handle_timeout(self.now);
                        self.drain_source();
                    }
                }
                End::Node(i) => {
                    let s = &self.nodes[i];
                    if s.incarnation == incarnation
                        && !s.frozen
                        && s.timer_at.is_some_and(|t| t <= self.now)
                    {
                        self.nodes[i].timer_at = None;
                        self.with_node(i, |n, now| n.handle_timeout(now));
                    }
                }
            },
            Ev::Retime { node, gen } => {
                if self.nodes[node].data.gen == gen {
                    self.retime(node);
                }
            }
            Ev::Arrive { node, gen } => {
                if self.nodes[node].data.gen == gen {
                    self.arrive(node);
                }
            }
            Ev::WindowCheck { node, gen } => {
                if self.nodes[node].data.gen == gen {
                    self.window_check(node, gen);
                }
            }
            Ev::Fault(f) => self.fault(f),
            Ev::Start(i) => self.start_node(i),
            Ev::Thaw(i) => self.thaw(i),
            Ev::SourceStart => self.start_source(),
            Ev::SourceHashed { incarnation } => {
                if incarnation == self.source_incarnation && !self.source_down {
                    let (size, digest, now) = (self.cfg.size, self.source_digest, self.now);
                    let image = self.image_digest();
                    self.source.handle_image_done(now, size, digest, image);
                    self.drain_source();
                }
            }
        }
        self.check_invariants();
    }
}

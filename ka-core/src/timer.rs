//! A small table of deadlines indexed by a machine's timer enum, as in
//! quinn-proto: the next timeout is the earliest armed entry, reported with
//! its reason.

use core::time::Duration;

use crate::time::Time;

/// The timers of one machine: a fieldless enum whose `N` values are listed
/// in [`TimerKind::VALUES`], each at its own [`TimerKind::index`].
pub(crate) trait TimerKind<const N: usize>: Copy + 'static {
    /// Every timer, in index order.
    const VALUES: [Self; N];

    /// Where this timer's deadline lives in the table.
    fn index(self) -> usize;

    /// Why a machine wakes at this timer's deadline, for traces.
    fn reason(self) -> &'static str;
}

/// Deadlines for the timers `T` of one machine.
#[derive(Debug, Clone)]
pub(crate) struct TimerTable<T: TimerKind<N>, const N: usize> {
    at: [Option<Time>; N],
    kind: core::marker::PhantomData<T>,
}

impl<T: TimerKind<N>, const N: usize> TimerTable<T, N> {
    /// A table with no timer armed.
    pub(crate) fn new() -> Self {
        TimerTable {
            at: [None; N],
            kind: core::marker::PhantomData,
        }
    }

    /// Arms `timer` for `at`, replacing any earlier deadline.
    pub(crate) fn set(&mut self, timer: T, at: Time) {
        self.at[timer.index()] = Some(at);
    }

    /// Disarms `timer`.
    pub(crate) fn stop(&mut self, timer: T) {
        self.at[timer.index()] = None;
    }

    /// Disarms `timer` and returns whether it is due at `now`.
    pub(crate) fn expire(&mut self, timer: T, now: Time) -> bool {
        self.overdue(timer, now).is_some()
    }

    /// Disarms `timer` if it is due at `now`, and returns how late `now` is
    /// for it: more than a little means the machine's owner was not running
    /// when it should have fired (stopped, starved of CPU).
    pub(crate) fn overdue(&mut self, timer: T, now: Time) -> Option<Duration> {
        let slot = &mut self.at[timer.index()];
        match *slot {
            Some(t) if t <= now => {
                *slot = None;
                Some(now.saturating_since(t))
            }
            _ => None,
        }
    }

    /// The earliest armed deadline and its timer; of timers due at the same
    /// time, the first in [`TimerKind::VALUES`].
    pub(crate) fn next(&self) -> Option<(Time, T)> {
        T::VALUES
            .iter()
            .filter_map(|&timer| self.at[timer.index()].map(|t| (t, timer)))
            .min_by_key(|&(t, timer)| (t, timer.index()))
    }
}

/// Checks that every timer of `T` sits at its own index.
#[cfg(test)]
pub(crate) fn assert_indexed<T: TimerKind<N>, const N: usize>() {
    for (i, timer) in T::VALUES.iter().enumerate() {
        assert_eq!(
            timer.index(),
            i,
            "{} is listed out of place",
            timer.reason()
        );
    }
}

//! A small table of deadlines indexed by an enum, as in quinn-proto: the next
//! timeout is the earliest armed entry, reported with its reason.

use core::time::Duration;

use crate::time::Time;

/// Deadlines for a machine whose timers are the `N` values of some enum.
#[derive(Debug, Clone)]
pub(crate) struct TimerTable<const N: usize> {
    at: [Option<Time>; N],
}

impl<const N: usize> TimerTable<N> {
    pub(crate) fn new() -> Self {
        TimerTable { at: [None; N] }
    }

    pub(crate) fn set(&mut self, index: usize, at: Time) {
        self.at[index] = Some(at);
    }

    pub(crate) fn stop(&mut self, index: usize) {
        self.at[index] = None;
    }

    /// Disarms and returns whether timer `index` is due at `now`.
    pub(crate) fn expire(&mut self, index: usize, now: Time) -> bool {
        self.overdue(index, now).is_some()
    }

    /// Disarms timer `index` if it is due at `now`, and returns how late
    /// `now` is for it: more than a little means the machine's owner was not
    /// running when it should have fired (stopped, starved of CPU).
    pub(crate) fn overdue(&mut self, index: usize, now: Time) -> Option<Duration> {
        match self.at[index] {
            Some(t) if t <= now => {
                self.at[index] = None;
                Some(now.saturating_since(t))
            }
            _ => None,
        }
    }

    /// The earliest armed deadline and its index.
    pub(crate) fn next(&self) -> Option<(Time, usize)> {
        self.at
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.map(|t| (t, i)))
            .min()
    }
}

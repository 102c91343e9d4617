//! A small table of deadlines indexed by an enum, as in quinn-proto: the next
//! timeout is the earliest armed entry, reported with its reason.

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
        match self.at[index] {
            Some(t) if t <= now => {
                self.at[index] = None;
                true
            }
            _ => false,
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

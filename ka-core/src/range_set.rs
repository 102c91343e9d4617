//! Sets of byte offsets kept as disjoint, non-adjacent half-open ranges.
//!
//! A node tracks what it has received and written as a `RangeSet`: normally
//! one range `[0, n)`, but a node that restarts, or an image written out of
//! order, leaves gaps, and "ask only for what you lack" means computing them.

use core::ops::Range;
use std::collections::BTreeMap;

/// A set of `u64` offsets stored as maximal disjoint ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end of each maximal range; ranges never overlap or touch.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds every offset of `range`, merging with neighbours it overlaps or touches.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        // A range starting at or before `start` may overlap or touch it.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.ranges.remove(&s);
            }
        }
        // Swallow every range that starts inside the new one or touches its end.
        while let Some((&s, &e)) = self.ranges.range(start..=end).next() {
            end = end.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(start, end);
    }

    /// Removes every offset of `range`, splitting a range it falls inside.
    pub fn remove(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        if let Some((&s, &e)) = self.ranges.range(..range.start).next_back() {
            if e > range.start {
                self.ranges.insert(s, range.start);
                if e > range.end {
                    self.ranges.insert(range.end, e);
                }
            }
        }
        while let Some((&s, &e)) = self.ranges.range(range.start..range.end).next() {
            self.ranges.remove(&s);
            if e > range.end {
                self.ranges.insert(range.end, e);
            }
        }
    }

    /// Whether `offset` is in the set.
    pub fn contains(&self, offset: u64) -> bool {
        self.ranges
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, &e)| e > offset)
    }

    /// Whether every offset of `range` is in the set.
    pub fn contains_range(&self, range: Range<u64>) -> bool {
        if range.is_empty() {
            return true;
        }
        self.ranges
            .range(..=range.start)
            .next_back()
            .is_some_and(|(_, &e)| e >= range.end)
    }

    /// The end of the contiguous run starting at 0: the offset a sequential
    /// stream has reached. 0 if offset 0 is missing.
    pub fn prefix_end(&self) -> u64 {
        match self.ranges.first_key_value() {
            Some((&0, &e)) => e,
            _ => 0,
        }
    }

    /// The parts of `within` that are not in the set, in order.
    pub fn gaps(&self, within: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        let mut cursor = within.start;
        let end = within.end;
        let mut iter = self.ranges.iter();
        let mut done = cursor >= end;
        core::iter::from_fn(move || {
            while !done {
                match iter.next() {
                    Some((&s, &e)) => {
                        if e <= cursor {
                            continue;
                        }
                        if s > cursor {
                            let gap = cursor..s.min(end);
                            cursor = e;
                            if cursor >= end {
                                done = true;
                            }
                            return Some(gap);
                        }
                        cursor = e;
                        if cursor >= end {
                            done = true;
                        }
                    }
                    None => {
                        done = true;
                        return Some(cursor..end);
                    }
                }
            }
            None
        })
    }

    /// The total number of offsets in the set.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// Whether the set holds no offset.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The maximal ranges, in order.
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.ranges.iter().map(|(&s, &e)| s..e)
    }
}

impl FromIterator<Range<u64>> for RangeSet {
    fn from_iter<I: IntoIterator<Item = Range<u64>>>(iter: I) -> Self {
        let mut set = RangeSet::new();
        for r in iter {
            set.insert(r);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Remove(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        (any::<bool>(), 0u64..64, 0u64..16).prop_map(|(ins, s, l)| {
            if ins {
                Op::Insert(s, s + l)
            } else {
                Op::Remove(s, s + l)
            }
        })
    }

    proptest! {
        #[test]
        fn behaves_like_a_set_of_offsets(ops in proptest::collection::vec(op(), 0..40)) {
            let mut set = RangeSet::new();
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Insert(s, e) => { set.insert(s..e); model.extend(s..e); }
                    Op::Remove(s, e) => { set.remove(s..e); for x in s..e { model.remove(&x); } }
                }
                // Ranges are maximal: disjoint and never touching.
                let ranges: Vec<_> = set.iter().collect();
                for w in ranges.windows(2) {
                    prop_assert!(w[0].end < w[1].start, "ranges touch: {:?}", ranges);
                }
                prop_assert!(ranges.iter().all(|r| !r.is_empty()));
                for x in 0..90 {
                    prop_assert_eq!(set.contains(x), model.contains(&x), "offset {}", x);
                }
                prop_assert_eq!(set.len(), model.len() as u64);
                let prefix = (0..).take_while(|x| model.contains(x)).count() as u64;
                prop_assert_eq!(set.prefix_end(), prefix);
            }
        }

        #[test]
        fn gaps_are_exactly_the_missing_offsets(
            ops in proptest::collection::vec(op(), 0..20), a in 0u64..80, l in 0u64..40,
        ) {
            let mut set = RangeSet::new();
            for op in ops {
                match op {
                    Op::Insert(s, e) => set.insert(s..e),
                    Op::Remove(s, e) => set.remove(s..e),
                }
            }
            let gaps: Vec<_> = set.gaps(a..a + l).collect();
            let from_gaps: BTreeSet<u64> = gaps.iter().flat_map(|r| r.clone()).collect();
            let expected: BTreeSet<u64> = (a..a + l).filter(|x| !set.contains(*x)).collect();
            prop_assert_eq!(from_gaps, expected);
            prop_assert!(gaps.iter().all(|r| !r.is_empty()));
            for r in &gaps {
                prop_assert_eq!(set.contains_range(r.clone()), false);
            }
        }
    }

    #[test]
    fn contains_range_needs_one_covering_range() {
        let set: RangeSet = [0..10, 11..20].into_iter().collect();
        assert!(set.contains_range(2..10));
        assert!(!set.contains_range(2..12));
        assert!(set.contains_range(5..5));
        assert_eq!(set.prefix_end(), 10);
    }
}

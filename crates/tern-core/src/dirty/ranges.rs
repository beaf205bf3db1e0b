//! [`RangeSet`]: sorted, disjoint, page-aligned `[start, end)` address ranges.

use crate::pages::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

/// A set of page-aligned address ranges, kept sorted, disjoint and coalesced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// From ranges in any order, possibly overlapping.
    pub fn from_ranges(it: impl IntoIterator<Item = (u64, u64)>) -> RangeSet {
        let mut v: Vec<(u64, u64)> = it.into_iter().filter(|(s, e)| e > s).collect();
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        RangeSet { ranges: out }
    }

    /// Appends `[start, end)`; cheap when ranges arrive in ascending order (a scan's output).
    pub fn push(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        match self.ranges.last_mut() {
            Some(last) if start >= last.0 && start <= last.1 => {
                last.1 = last.1.max(end);
                return;
            }
            Some(last) if start > last.1 => {
                self.ranges.push((start, end));
                return;
            }
            None => {
                self.ranges.push((start, end));
                return;
            }
            _ => {}
        }
        let mut all = std::mem::take(&mut self.ranges);
        all.push((start, end));
        *self = RangeSet::from_ranges(all);
    }

    pub fn union(&self, other: &RangeSet) -> RangeSet {
        RangeSet::from_ranges(self.ranges.iter().chain(other.ranges.iter()).copied())
    }

    pub fn extend(&mut self, other: &RangeSet) {
        if !other.is_empty() {
            *self = self.union(other);
        }
    }

    /// The parts of the set inside `[start, end)`.
    pub fn intersect_range(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let first = self.ranges.partition_point(|r| r.1 <= start);
        self.ranges[first..]
            .iter()
            .take_while(|r| r.0 < end)
            .map(|&(s, e)| (s.max(start), e.min(end)))
            .filter(|(s, e)| e > s)
            .collect()
    }

    pub fn contains(&self, addr: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.1 <= addr);
        self.ranges.get(i).is_some_and(|r| r.0 <= addr)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().copied()
    }

    pub fn len_ranges(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn pages(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| (e - s) / PAGE).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.pages() * PAGE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_and_intersects() {
        let p = PAGE;
        let s = RangeSet::from_ranges([(5 * p, 7 * p), (0, p), (p, 2 * p), (6 * p, 9 * p)]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(0, 2 * p), (5 * p, 9 * p)]);
        assert_eq!(s.pages(), 6);
        assert_eq!(s.intersect_range(p, 6 * p), vec![(p, 2 * p), (5 * p, 6 * p)]);
        assert!(s.contains(5 * p) && !s.contains(3 * p) && !s.contains(9 * p));
        let mut a = RangeSet::new();
        a.push(0, p);
        a.push(p, 2 * p);
        a.push(4 * p, 5 * p);
        a.push(3 * p, 4 * p); // out of order
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![(0, 2 * p), (3 * p, 5 * p)]);
        assert_eq!(a.union(&s).pages(), 8);
    }
}

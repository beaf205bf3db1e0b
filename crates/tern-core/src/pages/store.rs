//! The page store: pages of one migration held in memory on the destination until restore (and,
//! later, the post-copy source of truth on the source).
//!
//! Layout: a `BTreeMap` from a run's first address to the run. A run is either a contiguous block
//! of page data in one large `Vec<u8>` (at most [`RUN_MAX_BYTES`]) or a count of zero pages (no
//! memory at all). Runs never overlap. A 1 GiB address space streamed in order costs ~32 buffers
//! and ~32 map entries, not 262144 allocations.
//!
//! Writes:
//! - A later write of a page replaces the earlier one (pre-copy rounds resend dirty pages).
//! - Data written over existing data is copied in place (no allocation: the common case of a
//!   pre-copy round). Data over a zero run splits the zero run (cheap). Zeros over data cut the data
//!   run (the cut-off tail is copied once; rare).
//! - Data written just after a data run is appended to it while the run stays under the cap (the
//!   dump streams in address order, so runs grow to the cap). Zero runs merge with both neighbours.
//! - Adjacent runs are therefore not always maximal: [`PageStore::ranges`] may yield two touching
//!   data runs. Consumers must not assume maximality.
//!
//! All addresses are page-aligned user addresses below [`USER_ADDR_LIMIT`] (47-bit x86_64).

use super::{PageSink, PAGE_SIZE};
use serde::Serialize;
use std::collections::BTreeMap;

/// Exclusive upper bound of a user-space address on x86_64 with 4-level paging (47 bits).
/// (5-level paging allows 56 bits; not supported by this engine: see the transfer module header.)
pub const USER_ADDR_LIMIT: u64 = 1 << 47;

/// Largest data run kept in one buffer. Big enough that runs are few, small enough that growing
/// one (doubling) or cutting one never moves more than this.
pub const RUN_MAX_BYTES: usize = 32 << 20;

const PAGE: u64 = PAGE_SIZE as u64;

/// Why a write into a [`PageStore`] was refused. Nothing is written when a write is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("page store: address {vaddr:#x} is not page-aligned")]
    Unaligned { vaddr: u64 },
    #[error("page store: data length {len} at {vaddr:#x} is not a whole number of pages")]
    PartialPage { vaddr: u64, len: usize },
    #[error("page store: {pages} page(s) at {vaddr:#x} reach beyond the user address space (limit {USER_ADDR_LIMIT:#x})")]
    OutOfRange { vaddr: u64, pages: u64 },
}

/// One page as the store holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageRef<'a> {
    /// Exactly [`PAGE_SIZE`] bytes.
    Data(&'a [u8]),
    Zero,
}

/// A run of pages as the store holds it: data (a whole number of pages) or `count` zero pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageRun<'a> {
    Data(&'a [u8]),
    Zero { count: u64 },
}

impl PageRun<'_> {
    pub fn pages(&self) -> u64 {
        match self {
            PageRun::Data(d) => (d.len() / PAGE_SIZE) as u64,
            PageRun::Zero { count } => *count,
        }
    }
}

/// Counters of a [`PageStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreStats {
    pub data_pages: u64,
    pub zero_pages: u64,
    /// Bytes of page data held (`data_pages * PAGE_SIZE`).
    pub bytes: u64,
    /// Number of runs (map entries).
    pub runs: u64,
}

#[derive(Debug)]
enum Run {
    Data(Vec<u8>),
    Zero(u64),
}

impl Run {
    fn pages(&self) -> u64 {
        match self {
            Run::Data(v) => (v.len() / PAGE_SIZE) as u64,
            Run::Zero(c) => *c,
        }
    }
    fn end(&self, start: u64) -> u64 {
        start + self.pages() * PAGE
    }
}

/// Received pages of one migration. See the module header for the layout and write rules.
#[derive(Debug, Default)]
pub struct PageStore {
    runs: BTreeMap<u64, Run>,
    data_pages: u64,
    zero_pages: u64,
}

fn check(vaddr: u64, pages: u64) -> Result<u64, StoreError> {
    if vaddr & (PAGE - 1) != 0 {
        return Err(StoreError::Unaligned { vaddr });
    }
    pages
        .checked_mul(PAGE)
        .and_then(|len| vaddr.checked_add(len))
        .filter(|&end| end <= USER_ADDR_LIMIT)
        .ok_or(StoreError::OutOfRange { vaddr, pages })
}

impl PageStore {
    pub fn new() -> PageStore {
        PageStore::default()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            data_pages: self.data_pages,
            zero_pages: self.zero_pages,
            bytes: self.data_pages * PAGE,
            runs: self.runs.len() as u64,
        }
    }

    /// Heap bytes reserved by data runs (≥ `stats().bytes`; see [`PageStore::compact`]).
    pub fn allocated_bytes(&self) -> u64 {
        self.runs
            .values()
            .map(|r| match r {
                Run::Data(v) => v.capacity() as u64,
                Run::Zero(_) => 0,
            })
            .sum()
    }

    /// Gives back the growth slack of every data run.
    pub fn compact(&mut self) {
        for run in self.runs.values_mut() {
            if let Run::Data(v) = run {
                v.shrink_to_fit();
            }
        }
    }

    pub fn clear(&mut self) {
        *self = PageStore::default();
    }

    /// The run containing `addr`, if any.
    fn containing(&self, addr: u64) -> Option<(u64, &Run)> {
        self.runs
            .range(..=addr)
            .next_back()
            .filter(|(&s, r)| r.end(s) > addr)
            .map(|(&s, r)| (s, r))
    }

    /// The page containing `vaddr` (any address inside the page).
    pub fn get(&self, vaddr: u64) -> Option<PageRef<'_>> {
        let page = vaddr & !(PAGE - 1);
        self.containing(page).map(|(s, r)| match r {
            Run::Data(v) => {
                let off = (page - s) as usize;
                PageRef::Data(&v[off..off + PAGE_SIZE])
            }
            Run::Zero(_) => PageRef::Zero,
        })
    }

    pub fn contains(&self, vaddr: u64) -> bool {
        self.containing(vaddr & !(PAGE - 1)).is_some()
    }

    /// Every run in address order (see the module header: touching runs are possible).
    pub fn ranges(&self) -> impl Iterator<Item = (u64, PageRun<'_>)> + '_ {
        self.runs.iter().map(|(&s, r)| (s, as_page_run(r)))
    }

    /// The runs overlapping `[start, end)`, clipped to it, in address order (e.g. one VMA).
    /// Holes (pages never written) are simply absent.
    pub fn range(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, PageRun<'_>)> + '_ {
        let start = start & !(PAGE - 1);
        let first = self
            .runs
            .range(..start)
            .next_back()
            .filter(|(&s, r)| r.end(s) > start);
        let rest = self.runs.range(start..end.max(start));
        first.into_iter().chain(rest).filter_map(move |(&s, r)| {
            let lo = s.max(start);
            let hi = r.end(s).min(end);
            if hi <= lo {
                return None;
            }
            // Clipping to whole pages: `end` may be unaligned; round it up to cover its page.
            let hi = hi.next_multiple_of(PAGE).min(r.end(s));
            Some((
                lo,
                match r {
                    Run::Data(v) => PageRun::Data(&v[(lo - s) as usize..(hi - s) as usize]),
                    Run::Zero(_) => PageRun::Zero {
                        count: (hi - lo) / PAGE,
                    },
                },
            ))
        })
    }

    fn take(&mut self, start: u64) -> Run {
        let run = self.runs.remove(&start).expect("run exists");
        match &run {
            Run::Data(v) => self.data_pages -= (v.len() / PAGE_SIZE) as u64,
            Run::Zero(c) => self.zero_pages -= c,
        }
        run
    }

    fn place(&mut self, start: u64, run: Run) {
        match &run {
            Run::Data(v) if v.is_empty() => return,
            Run::Zero(0) => return,
            Run::Data(v) => self.data_pages += (v.len() / PAGE_SIZE) as u64,
            Run::Zero(c) => self.zero_pages += c,
        }
        let old = self.runs.insert(start, run);
        debug_assert!(old.is_none(), "runs never overlap");
    }

    /// Removes every page in `[a, b)`, cutting runs that straddle either end.
    fn punch(&mut self, a: u64, b: u64) {
        let straddling = self
            .runs
            .range(..a)
            .next_back()
            .filter(|(&s, r)| r.end(s) > a)
            .map(|(&s, _)| s);
        let inside: Vec<u64> = self.runs.range(a..b).map(|(&s, _)| s).collect();
        for s in straddling.into_iter().chain(inside) {
            let run = self.take(s);
            let e = run.end(s);
            match run {
                Run::Zero(_) => {
                    if s < a {
                        self.place(s, Run::Zero((a - s) / PAGE));
                    }
                    if e > b {
                        self.place(b, Run::Zero((e - b) / PAGE));
                    }
                }
                Run::Data(mut v) => {
                    if e > b {
                        self.place(b, Run::Data(v[(b - s) as usize..].to_vec()));
                    }
                    if s < a {
                        v.truncate((a - s) as usize);
                        v.shrink_to_fit();
                        self.place(s, Run::Data(v));
                    }
                }
            }
        }
    }

    /// Inserts data into `[at, at + bytes.len())`, which must be free.
    fn insert_data(&mut self, at: u64, mut bytes: &[u8]) {
        // Append to a data run ending exactly at `at`, while it stays under the cap.
        if let Some((&s, Run::Data(v))) = self.runs.range_mut(..at).next_back() {
            if s + v.len() as u64 == at && v.len() + bytes.len() <= RUN_MAX_BYTES {
                let want = v.len() + bytes.len();
                if want > v.capacity() {
                    // Double, but never past the cap: a run's slack is bounded by RUN_MAX_BYTES.
                    let target = want.max((v.len() * 2).min(RUN_MAX_BYTES));
                    v.reserve_exact(target - v.len());
                }
                v.extend_from_slice(bytes);
                self.data_pages += (bytes.len() / PAGE_SIZE) as u64;
                return;
            }
        }
        let mut at = at;
        while !bytes.is_empty() {
            let n = bytes.len().min(RUN_MAX_BYTES);
            self.place(at, Run::Data(bytes[..n].to_vec()));
            at += n as u64;
            bytes = &bytes[n..];
        }
    }

    /// Inserts `count` zero pages at `at` (free), merging with touching zero runs.
    fn insert_zero(&mut self, at: u64, count: u64) {
        let end = at + count * PAGE;
        let mut start = at;
        let mut total = count;
        let before = self
            .runs
            .range(..at)
            .next_back()
            .filter(|(&s, r)| matches!(r, Run::Zero(_)) && r.end(s) == at)
            .map(|(&s, _)| s);
        if let Some(s) = before {
            total += self.take(s).pages();
            start = s;
        }
        if matches!(self.runs.get(&end), Some(Run::Zero(_))) {
            total += self.take(end).pages();
        }
        self.place(start, Run::Zero(total));
    }

    fn write_data(&mut self, vaddr: u64, data: &[u8]) {
        let end = vaddr + data.len() as u64;
        let mut cur = vaddr;
        while cur < end {
            let src = |from: u64, to: u64| &data[(from - vaddr) as usize..(to - vaddr) as usize];
            match self
                .containing(cur)
                .map(|(s, r)| (s, r.end(s), matches!(r, Run::Data(_))))
            {
                Some((s, run_end, true)) => {
                    let seg_end = end.min(run_end);
                    let Some(Run::Data(v)) = self.runs.get_mut(&s) else {
                        unreachable!()
                    };
                    v[(cur - s) as usize..(seg_end - s) as usize]
                        .copy_from_slice(src(cur, seg_end));
                    cur = seg_end;
                }
                Some((_, run_end, false)) => {
                    let seg_end = end.min(run_end);
                    self.punch(cur, seg_end);
                    self.insert_data(cur, src(cur, seg_end));
                    cur = seg_end;
                }
                None => {
                    let next = self.runs.range(cur..end).next().map(|(&s, _)| s);
                    let seg_end = next.unwrap_or(end);
                    self.insert_data(cur, src(cur, seg_end));
                    cur = seg_end;
                }
            }
        }
    }

    /// Applies every run of `other` on top of this store (pages in `other` win).
    /// Moves the buffers when this store is empty.
    pub fn merge_from(&mut self, other: PageStore) {
        if self.is_empty() {
            *self = other;
            return;
        }
        for (s, run) in other.runs {
            match run {
                Run::Data(v) => self.write_data(s, &v),
                Run::Zero(c) => {
                    let e = s + c * PAGE;
                    self.punch(s, e);
                    self.insert_zero(s, c);
                }
            }
        }
    }
}

fn as_page_run(r: &Run) -> PageRun<'_> {
    match r {
        Run::Data(v) => PageRun::Data(v),
        Run::Zero(c) => PageRun::Zero { count: *c },
    }
}

impl PageSink for PageStore {
    type Error = StoreError;

    fn put_pages(&mut self, vaddr: u64, data: &[u8]) -> Result<(), StoreError> {
        if data.len() & (PAGE_SIZE - 1) != 0 {
            return Err(StoreError::PartialPage {
                vaddr,
                len: data.len(),
            });
        }
        check(vaddr, (data.len() / PAGE_SIZE) as u64)?;
        if !data.is_empty() {
            self.write_data(vaddr, data);
        }
        Ok(())
    }

    fn put_zero_pages(&mut self, vaddr: u64, count: u64) -> Result<(), StoreError> {
        let end = check(vaddr, count)?;
        if count > 0 {
            self.punch(vaddr, end);
            self.insert_zero(vaddr, count);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE;

    fn page(tag: u8) -> Vec<u8> {
        vec![tag; PAGE_SIZE]
    }
    fn pages(tags: &[u8]) -> Vec<u8> {
        tags.iter().flat_map(|&t| page(t)).collect()
    }

    /// The store as (page address, Some(tag) for data / None for zero), page by page, checking
    /// that every data page is uniform and runs are disjoint and ordered.
    fn dump(store: &PageStore) -> Vec<(u64, Option<u8>)> {
        let mut out = Vec::new();
        let mut last_end = 0;
        for (s, run) in store.ranges() {
            assert!(s >= last_end, "runs overlap or are out of order");
            match run {
                PageRun::Data(d) => {
                    for (i, p) in d.chunks(PAGE_SIZE).enumerate() {
                        assert!(p.iter().all(|&b| b == p[0]));
                        out.push((s + i as u64 * P, Some(p[0])));
                    }
                }
                PageRun::Zero { count } => {
                    for i in 0..count {
                        out.push((s + i * P, None));
                    }
                }
            }
            last_end = s + run.pages() * P;
        }
        out
    }

    fn check_stats(store: &PageStore) {
        let d = dump(store);
        let st = store.stats();
        assert_eq!(
            st.data_pages,
            d.iter().filter(|x| x.1.is_some()).count() as u64
        );
        assert_eq!(
            st.zero_pages,
            d.iter().filter(|x| x.1.is_none()).count() as u64
        );
        assert_eq!(st.bytes, st.data_pages * P);
    }

    #[test]
    fn ascending_puts_merge_into_one_run() {
        let mut s = PageStore::new();
        for i in 0..100u64 {
            s.put_pages(0x10000 + i * P, &page(i as u8)).unwrap();
        }
        assert_eq!(s.stats().runs, 1);
        assert_eq!(s.stats().data_pages, 100);
        assert_eq!(
            s.get(0x10000 + 7 * P + 123),
            Some(PageRef::Data(&page(7)[..]))
        );
        assert_eq!(s.get(0x10000 + 100 * P), None);
        assert!(s.contains(0x10000) && !s.contains(0xf000));
    }

    #[test]
    fn runs_are_capped() {
        let mut s = PageStore::new();
        let big = vec![1u8; RUN_MAX_BYTES + 3 * PAGE_SIZE];
        s.put_pages(0, &big).unwrap();
        assert_eq!(s.stats().runs, 2);
        s.put_pages(big.len() as u64, &page(2)).unwrap();
        assert_eq!(s.stats().runs, 2, "appends to the second run");
        assert!(s.allocated_bytes() >= s.stats().bytes);
        s.compact();
        assert_eq!(s.allocated_bytes(), s.stats().bytes);
    }

    #[test]
    fn zero_runs_merge_both_sides() {
        let mut s = PageStore::new();
        s.put_zero_pages(0, 2).unwrap();
        s.put_zero_pages(4 * P, 2).unwrap();
        s.put_zero_pages(2 * P, 2).unwrap();
        assert_eq!(
            s.ranges().collect::<Vec<_>>(),
            vec![(0, PageRun::Zero { count: 6 })]
        );
        assert_eq!(s.get(5 * P), Some(PageRef::Zero));
        check_stats(&s);
    }

    #[test]
    fn overwrite_inside_data_is_in_place() {
        let mut s = PageStore::new();
        s.put_pages(0, &pages(&[1, 1, 1, 1, 1])).unwrap();
        s.put_pages(P, &pages(&[2, 3])).unwrap();
        assert_eq!(s.stats().runs, 1);
        let got: Vec<_> = dump(&s).into_iter().map(|x| x.1.unwrap()).collect();
        assert_eq!(got, vec![1, 2, 3, 1, 1]);
        check_stats(&s);
    }

    #[test]
    fn overlapping_and_replacing_writes() {
        let mut s = PageStore::new();
        // data [0,4) zero [4,8) data [10,12)
        s.put_pages(0, &pages(&[1, 1, 1, 1])).unwrap();
        s.put_zero_pages(4 * P, 4).unwrap();
        s.put_pages(10 * P, &pages(&[5, 5])).unwrap();
        // data over everything from page 2 to 11: straddles data, zero, a hole, data.
        s.put_pages(2 * P, &pages(&[9; 9])).unwrap();
        let mut want: Vec<(u64, Option<u8>)> = vec![(0, Some(1)), (P, Some(1))];
        want.extend((2..11).map(|i| (i * P, Some(9))));
        want.push((11 * P, Some(5)));
        assert_eq!(dump(&s), want);
        check_stats(&s);

        // zeros cutting the middle of data: head and tail survive.
        s.put_zero_pages(3 * P, 2).unwrap();
        let d = dump(&s);
        assert_eq!(d[2], (2 * P, Some(9)));
        assert_eq!(d[3], (3 * P, None));
        assert_eq!(d[4], (4 * P, None));
        assert_eq!(d[5], (5 * P, Some(9)));
        assert_eq!(d.len(), 12);
        check_stats(&s);

        // data over a zero run's middle splits it.
        s.put_zero_pages(20 * P, 5).unwrap();
        s.put_pages(22 * P, &page(7)).unwrap();
        let d: Vec<_> = dump(&s).into_iter().filter(|x| x.0 >= 20 * P).collect();
        assert_eq!(
            d,
            vec![
                (20 * P, None),
                (21 * P, None),
                (22 * P, Some(7)),
                (23 * P, None),
                (24 * P, None)
            ]
        );
        check_stats(&s);

        // zeros over everything.
        s.put_zero_pages(0, 30).unwrap();
        assert_eq!(
            s.ranges().collect::<Vec<_>>(),
            vec![(0, PageRun::Zero { count: 30 })]
        );
        check_stats(&s);
    }

    #[test]
    fn range_clips_to_a_vma() {
        let mut s = PageStore::new();
        s.put_pages(0, &pages(&[1, 2, 3, 4])).unwrap();
        s.put_zero_pages(6 * P, 4).unwrap();
        let r: Vec<_> = s.range(2 * P, 8 * P).collect();
        assert_eq!(
            r,
            vec![
                (2 * P, PageRun::Data(&pages(&[3, 4])[..])),
                (6 * P, PageRun::Zero { count: 2 })
            ]
        );
        assert_eq!(s.range(4 * P, 6 * P).count(), 0);
        assert_eq!(
            s.range(7 * P, 7 * P + 1).collect::<Vec<_>>(),
            vec![(7 * P, PageRun::Zero { count: 1 })]
        );
    }

    #[test]
    fn refuses_bad_writes_without_effect() {
        let mut s = PageStore::new();
        assert_eq!(
            s.put_pages(1, &page(0)),
            Err(StoreError::Unaligned { vaddr: 1 })
        );
        assert_eq!(
            s.put_pages(0, &[0; 100]),
            Err(StoreError::PartialPage { vaddr: 0, len: 100 })
        );
        assert!(matches!(
            s.put_pages(USER_ADDR_LIMIT - P, &pages(&[1, 1])),
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            s.put_zero_pages(P, u64::MAX),
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(s.is_empty());
        s.put_pages(USER_ADDR_LIMIT - P, &page(1)).unwrap();
    }

    #[test]
    fn merge_later_wins() {
        let mut a = PageStore::new();
        a.put_pages(0, &pages(&[1, 1, 1])).unwrap();
        a.put_zero_pages(3 * P, 3).unwrap();
        let mut b = PageStore::new();
        b.put_pages(P, &page(2)).unwrap();
        b.put_pages(4 * P, &page(3)).unwrap();
        b.put_zero_pages(0, 1).unwrap();
        a.merge_from(b);
        assert_eq!(
            dump(&a),
            vec![
                (0, None),
                (P, Some(2)),
                (2 * P, Some(1)),
                (3 * P, None),
                (4 * P, Some(3)),
                (5 * P, None)
            ]
        );
        check_stats(&a);
        let mut empty = PageStore::new();
        empty.merge_from(a);
        assert_eq!(empty.stats().data_pages, 3);
    }

    /// Random writes against a page-by-page model.
    #[test]
    fn random_writes_match_a_model() {
        let mut s = PageStore::new();
        let mut model: BTreeMap<u64, Option<u8>> = BTreeMap::new();
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for step in 0..2000u64 {
            let start = rnd(200);
            let count = 1 + rnd(12);
            let tag = (step % 250) as u8 + 1;
            if rnd(3) == 0 {
                s.put_zero_pages(start * P, count).unwrap();
                for p in start..start + count {
                    model.insert(p * P, None);
                }
            } else {
                s.put_pages(start * P, &vec![tag; (count * P) as usize])
                    .unwrap();
                for p in start..start + count {
                    model.insert(p * P, Some(tag));
                }
            }
        }
        assert_eq!(dump(&s), model.into_iter().collect::<Vec<_>>());
        check_stats(&s);
    }
}

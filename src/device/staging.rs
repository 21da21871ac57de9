//! Where uploads go in a ring of pinned host memory when they must not wait for the GPU
//! (`KernelDevice::set_async_copies`): a copy from pageable memory may make the driver wait for
//! the stream before it stages the bytes, so a host that queues the next iteration's inputs while
//! the GPU runs this one would stall behind it. The bytes are copied into the ring, and the copy
//! to the device reads them from there in stream order.
//!
//! This module only places regions (plain data, tested here); `cuda.rs` owns the memory and the
//! event recorded after each region's copy.

use std::collections::VecDeque;

/// Region starts are multiples of this (the driver's fastest pinned copies start aligned).
const ALIGN: usize = 256;

/// Regions of a ring of `cap` bytes, handed out in order and wrapping to 0 when one would not
/// fit before the end. A region is live until the copy that reads it has run; copies run in the
/// order they were queued (one stream), so the oldest live regions are always the first to free.
#[derive(Debug)]
pub struct StagingRing {
    cap: usize,
    head: usize,
    /// `[start, end)` of each live region, oldest first.
    live: VecDeque<(usize, usize)>,
}

impl StagingRing {
    pub fn new(cap: usize) -> StagingRing {
        StagingRing {
            cap,
            head: 0,
            live: VecDeque::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The offset of a new region of `len` bytes, and how many of the oldest live regions the
    /// caller must wait for (and forget: they are dropped here) before writing it; `None` when
    /// `len` does not fit in the ring at all.
    pub fn place(&mut self, len: usize) -> Option<(usize, usize)> {
        if len == 0 || len > self.cap {
            return None;
        }
        let start = if self.head + len > self.cap {
            0
        } else {
            self.head
        };
        let end = start + len;
        let mut waits = 0;
        while self.live.iter().any(|&(s, e)| s < end && start < e) {
            self.live.pop_front();
            waits += 1;
        }
        self.live.push_back((start, end));
        self.head = end.next_multiple_of(ALIGN).min(self.cap);
        Some((start, waits))
    }

    /// Regions still live (their copies not yet waited for).
    pub fn live(&self) -> usize {
        self.live.len()
    }

    /// Forgets every region (the caller waited for all copies).
    pub fn clear(&mut self) {
        self.live.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_follow_each_other_then_wrap_after_the_oldest_free() {
        let mut r = StagingRing::new(1024);
        assert_eq!(r.place(100), Some((0, 0)));
        assert_eq!(r.place(300), Some((256, 0)));
        assert_eq!(r.place(200), Some((768, 0)));
        // 400 bytes do not fit after 1024 − 968: wrap to 0, over the first two regions
        assert_eq!(r.place(400), Some((0, 2)));
        assert_eq!(r.live(), 2);
        // the next one starts after it, where the (now forgotten) second region was
        assert_eq!(r.place(100), Some((512, 0)));
        // 300 bytes do not fit after 768: wrap to 0, over the 400-byte region, behind the older
        // [768, 968) (copies finish in order): both waited for
        assert_eq!(r.place(300), Some((0, 2)));
        assert_eq!(r.live(), 2);
    }

    #[test]
    fn a_region_never_overlaps_a_live_one() {
        let mut r = StagingRing::new(4096);
        let mut live: VecDeque<(usize, usize)> = VecDeque::new();
        let mut seed = 12345u64;
        for _ in 0..2000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = 1 + (seed >> 33) as usize % 1500;
            let (start, waits) = r.place(len).expect("fits");
            for _ in 0..waits {
                live.pop_front();
            }
            assert!(start + len <= 4096);
            assert!(start % ALIGN == 0);
            for &(s, e) in &live {
                assert!(
                    e <= start || start + len <= s,
                    "[{start}, +{len}) over [{s}, {e})"
                );
            }
            live.push_back((start, start + len));
            assert_eq!(live.len(), r.live());
        }
    }

    #[test]
    fn too_large_or_empty_is_refused() {
        let mut r = StagingRing::new(512);
        assert_eq!(r.place(513), None);
        assert_eq!(r.place(0), None);
        assert_eq!(r.place(512), Some((0, 0)));
        assert_eq!(r.place(1), Some((0, 1)));
    }
}

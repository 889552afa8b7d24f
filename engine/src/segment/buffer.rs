//! The in-memory copy of an active (log) segment: one writer appends, any
//! number of readers read the published prefix without taking a lock.
//!
//! Memory-ordering rule: the writer copies bytes into the unpublished tail,
//! then stores the new length with `Release`; a reader loads the length with
//! `Acquire` and only ever reads below it, so every byte it reads was written
//! before the length that covers it was published. Bytes below the published
//! length are never written again.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A fixed-capacity, append-only byte buffer with a published length.
pub struct AppendBuf {
    /// Owns the anonymous mapping; never touched after construction (all
    /// access goes through `ptr`), only unmapped on drop.
    _map: memmap2::MmapMut,
    ptr: *mut u8,
    cap: usize,
    published: AtomicUsize,
    /// Bytes from the start already populated by `prefault_to`.
    prefaulted: AtomicUsize,
}

// SAFETY: the buffer owns its mapping (so it may move between threads); the
// only mutation is staging by the single writer (the shard writer holds its
// mutex) at or above the published length, and readers only touch bytes
// below it (see the module doc).
#[allow(unsafe_code)]
unsafe impl Send for AppendBuf {}
#[allow(unsafe_code)]
unsafe impl Sync for AppendBuf {}

impl std::fmt::Debug for AppendBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AppendBuf({}/{})", self.len(), self.capacity())
    }
}

impl AppendBuf {
    /// A zeroed buffer in an anonymous mapping: capacity costs no RSS until
    /// written. It is advised for transparent huge pages: reads of the
    /// active segment follow record links all over it, and with 4 KiB pages
    /// most hops were TLB misses (docs/benchmarks.md, "W2").
    pub fn with_capacity(cap: usize) -> std::io::Result<Self> {
        let mut map = memmap2::MmapMut::map_anon(cap.max(1))?;
        // Advice only; a kernel without THP just ignores the hint's effect.
        let _ = map.advise(memmap2::Advice::HugePage);
        let ptr = map.as_mut_ptr();
        Ok(AppendBuf {
            _map: map,
            ptr,
            cap,
            published: AtomicUsize::new(0),
            prefaulted: AtomicUsize::new(0),
        })
    }

    /// How far `prefault_to` has populated the buffer.
    pub fn prefaulted(&self) -> usize {
        self.prefaulted.load(Ordering::Relaxed)
    }

    /// Populate the page tables of `[prefaulted, to)` (MADV_POPULATE_WRITE):
    /// the kernel allocates and zeroes those pages now, on the caller's
    /// thread, instead of in the writer's page faults (measured: 35% of W1's
    /// CPU on fresh buffers). It never changes the buffer's contents, so it
    /// may run while the writer stages bytes in the same range. One caller
    /// at a time (the maintenance thread).
    pub fn prefault_to(&self, to: usize) {
        let from = self.prefaulted();
        let to = to.min(self.cap);
        if to <= from {
            return;
        }
        // Best effort: an old kernel without MADV_POPULATE_WRITE just leaves
        // the faults to the writer.
        let _ = self
            ._map
            .advise_range(memmap2::Advice::PopulateWrite, from, to - from);
        self.prefaulted.store(to, Ordering::Relaxed);
    }

    /// Empty the buffer for reuse (its pages stay mapped and faulted in:
    /// a recycled buffer costs no page faults). `&mut`: nobody else holds it.
    pub fn reset(&mut self) {
        *self.published.get_mut() = 0;
        // A recycled buffer's pages are all still mapped.
        *self.prefaulted.get_mut() = self.cap;
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Published length.
    pub fn len(&self) -> usize {
        self.published.load(Ordering::Acquire)
    }

    /// The published prefix.
    pub fn published(&self) -> &[u8] {
        let n = self.len();
        // SAFETY: bytes below the published length are immutable from now on
        // (module doc), and `n <= capacity` because `publish` checks it.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.ptr as *const u8, n)
        }
    }

    /// Copy `src` to `at`, which must be at or above the published length.
    /// Only the single writer may call this (see the `Sync` impl).
    pub fn write_tail(&self, at: usize, src: &[u8]) {
        assert!(at >= self.len(), "write below the published length");
        let end = at.checked_add(src.len()).expect("overflow");
        assert!(end <= self.capacity(), "write past capacity");
        // SAFETY: [at, end) is inside the allocation (checked above) and at
        // or above the published length, so no reader looks at it and the
        // single writer is us.
        #[allow(unsafe_code)]
        unsafe {
            let dst = self.ptr.add(at);
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
        }
    }

    /// Let the single writer fill `[at, at + len)` in place (at or above the
    /// published length): `f` gets exclusive access to exactly that range.
    pub fn stage_with<R>(&self, at: usize, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        assert!(at >= self.len(), "stage below the published length");
        let end = at.checked_add(len).expect("overflow");
        assert!(end <= self.capacity(), "stage past capacity");
        // SAFETY: the range is inside the allocation and at or above the
        // published length, so no reader looks at it; the single writer (see
        // the `Sync` impl) holds no other reference into it while `f` runs,
        // and the `&mut` does not outlive `f`.
        #[allow(unsafe_code)]
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), len) };
        f(dst)
    }

    /// The writer's view of staged, not yet published bytes `[from, to)`
    /// (to hand them to the file before publishing).
    pub fn staged(&self, from: usize, to: usize) -> &[u8] {
        assert!(
            from <= to && to <= self.capacity(),
            "staged range out of bounds"
        );
        // SAFETY: in bounds (checked); bytes below `to` are written only by
        // the single writer, who calls this between staging and publishing,
        // so nothing mutates them while the returned slice lives (the writer
        // does not stage below `to` again: staging only moves forward).
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.ptr.add(from) as *const u8, to - from)
        }
    }

    /// Make everything below `len` visible to readers.
    pub fn publish(&self, len: usize) {
        assert!(len <= self.capacity() && len >= self.len());
        self.published.store(len, Ordering::Release);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn readers_see_only_published_bytes() {
        let b = Arc::new(AppendBuf::with_capacity(1 << 16).unwrap());
        let w = b.clone();
        let t = std::thread::spawn(move || {
            let mut at = 0;
            for i in 0..4096u32 {
                let chunk = [i as u8; 16];
                w.write_tail(at, &chunk);
                at += 16;
                w.publish(at);
            }
        });
        for _ in 0..1000 {
            let s = b.published();
            for (i, c) in s.chunks(16).enumerate() {
                assert!(c.iter().all(|&x| x == i as u8));
            }
        }
        t.join().unwrap();
        assert_eq!(b.len(), 1 << 16);
    }

    #[test]
    #[should_panic]
    fn write_past_capacity_panics_in_the_writer() {
        let b = AppendBuf::with_capacity(8).unwrap();
        b.write_tail(4, &[0; 8]);
    }
}

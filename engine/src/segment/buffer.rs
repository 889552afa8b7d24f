//! The in-memory copy of an active (log) segment: one writer appends, any
//! number of readers read the published prefix without taking a lock.
//!
//! The single-writer rule is in the types: readers share an
//! `Arc<AppendBuf>`, whose methods only read below the published length;
//! every write goes through the one [`Tail`] made with the buffer, which is
//! not `Clone` and writes through `&mut self`, so a second writer, or a
//! write while the writer still holds a view of its staged bytes, does not
//! compile.
//!
//! Memory-ordering rule: the writer copies bytes into the unpublished tail,
//! then stores the new length with `Release`; a reader loads the length with
//! `Acquire` and only ever reads below it, so every byte it reads was written
//! before the length that covers it was published. Bytes below the published
//! length are never written again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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
// only mutation is staging through its one `Tail` (not `Clone`, `&mut self`)
// at or above the published length, and readers only touch bytes below it
// (see the module doc).
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
    fn with_capacity(cap: usize) -> std::io::Result<Self> {
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
}

/// The one writer of an [`AppendBuf`]: made with it, never cloned.
pub struct Tail(Arc<AppendBuf>);

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tail({:?})", self.0)
    }
}

impl Tail {
    /// A new buffer (see [`AppendBuf`]) and its writer.
    pub fn with_capacity(cap: usize) -> std::io::Result<Tail> {
        Ok(Tail(Arc::new(AppendBuf::with_capacity(cap)?)))
    }

    /// The buffer, as readers see it.
    pub fn buf(&self) -> &Arc<AppendBuf> {
        &self.0
    }

    /// Give up writing: the buffer becomes a plain shared one.
    pub fn into_buf(self) -> Arc<AppendBuf> {
        self.0
    }

    /// Writing to `buf` again, emptied for reuse (its pages stay mapped and
    /// faulted in: a recycled buffer costs no page faults). Only if nothing
    /// else holds it, so no other `Tail` (or reader) can exist; otherwise
    /// it is handed back.
    pub fn reclaim(mut buf: Arc<AppendBuf>) -> Result<Tail, Arc<AppendBuf>> {
        let Some(b) = Arc::get_mut(&mut buf) else {
            return Err(buf);
        };
        *b.published.get_mut() = 0;
        // A recycled buffer's pages are all still mapped.
        *b.prefaulted.get_mut() = b.cap;
        Ok(Tail(buf))
    }

    /// Copy `src` to `at`, which must be at or above the published length.
    pub fn write(&mut self, at: usize, src: &[u8]) {
        assert!(at >= self.0.len(), "write below the published length");
        let end = at.checked_add(src.len()).expect("overflow");
        assert!(end <= self.0.capacity(), "write past capacity");
        // SAFETY: [at, end) is inside the allocation (checked above) and at
        // or above the published length, so no reader looks at it, and this
        // `Tail` (the only writer, borrowed mutably) is us.
        #[allow(unsafe_code)]
        unsafe {
            let dst = self.0.ptr.add(at);
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
        }
    }

    /// Let the single writer fill `[at, at + len)` in place (at or above the
    /// published length): `f` gets exclusive access to exactly that range.
    pub fn stage_with<R>(&mut self, at: usize, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        assert!(at >= self.0.len(), "stage below the published length");
        let end = at.checked_add(len).expect("overflow");
        assert!(end <= self.0.capacity(), "stage past capacity");
        // SAFETY: the range is inside the allocation and at or above the
        // published length, so no reader looks at it; `&mut self` means the
        // writer holds no other view into it (no `staged` slice) while `f`
        // runs, and the `&mut` does not outlive `f`.
        #[allow(unsafe_code)]
        let dst = unsafe { std::slice::from_raw_parts_mut(self.0.ptr.add(at), len) };
        f(dst)
    }

    /// The writer's view of staged, not yet published bytes `[from, to)`
    /// (to hand them to the file before publishing).
    pub fn staged(&self, from: usize, to: usize) -> &[u8] {
        assert!(
            from <= to && to <= self.0.capacity(),
            "staged range out of bounds"
        );
        // SAFETY: in bounds (checked); bytes are written only through this
        // `Tail`'s `&mut self` methods, which cannot run while the returned
        // slice (borrowing `self`) lives.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.0.ptr.add(from) as *const u8, to - from)
        }
    }

    /// Make everything below `len` visible to readers.
    pub fn publish(&mut self, len: usize) {
        assert!(len <= self.0.capacity() && len >= self.0.len());
        self.0.published.store(len, Ordering::Release);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_only_published_bytes() {
        let mut w = Tail::with_capacity(1 << 16).unwrap();
        let b = w.buf().clone();
        let t = std::thread::spawn(move || {
            let mut at = 0;
            for i in 0..4096u32 {
                let chunk = [i as u8; 16];
                w.write(at, &chunk);
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
        let mut b = Tail::with_capacity(8).unwrap();
        b.write(4, &[0; 8]);
    }
}

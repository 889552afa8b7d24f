use hashbrown::HashTable;
use parking_lot::RwLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Where a timeline's newest record is: segment generation and byte offset
/// in it, packed in a u64 so readers load it atomically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub gen: u32,
    pub off: u32,
}

impl Pos {
    pub const NONE: Pos = Pos {
        gen: u32::MAX,
        off: u32::MAX,
    };
    pub fn pack(self) -> u64 {
        ((self.gen as u64) << 32) | self.off as u64
    }
    pub fn unpack(v: u64) -> Pos {
        Pos {
            gen: (v >> 32) as u32,
            off: v as u32,
        }
    }
}

/// Per-timeline state. Written only by the shard's writer (which holds the
/// shard mutex); read by anyone without a lock.
///
/// Ordering rule: the writer stores `pos` then `last_seq`, both `Release`,
/// and only after the record bytes are published; a reader loads `last_seq`
/// (`Acquire`) then `pos`, so the `pos` it sees is at least as new as the
/// record `last_seq` names, and every byte `pos` leads to is published. A
/// reader ignores records with a seq above the `last_seq` it loaded.
#[derive(Debug)]
pub struct Meta {
    pub id: u64,
    pub last_seq: AtomicU64,
    pub pos: AtomicU64,
    /// Writer-only: the `anchor` the timeline's next record carries if it
    /// lands in the same segment as `pos` (see `format::record`). Kept here
    /// so an append need not read its predecessor's header (a cache miss
    /// per message; measured 16% of W1 time).
    pub next_anchor: AtomicU32,
}

impl Meta {
    /// A consistent (last_seq, pos) pair, see the ordering rule.
    pub fn snapshot(&self) -> (u64, Pos) {
        let last = self.last_seq.load(Ordering::Acquire);
        let pos = Pos::unpack(self.pos.load(Ordering::Acquire));
        (last, pos)
    }
    pub fn publish(&self, last_seq: u64, pos: Pos) {
        self.pos.store(pos.pack(), Ordering::Release);
        self.last_seq.store(last_seq, Ordering::Release);
    }
    /// Publish and remember the next record's anchor (writer only).
    pub fn publish_with_anchor(&self, last_seq: u64, pos: Pos, next_anchor: u32) {
        self.next_anchor.store(next_anchor, Ordering::Relaxed);
        self.publish(last_seq, pos);
    }
    /// The writer's view: (last_seq, pos, next_anchor).
    pub fn writer_state(&self) -> (u64, Pos, u32) {
        let (l, p) = self.snapshot();
        (l, p, self.next_anchor.load(Ordering::Relaxed))
    }
}

const CHUNK: usize = 4096;

struct Inner {
    table: HashTable<u32>,
    chunks: Vec<Box<[Meta]>>,
    len: usize,
}

/// Timeline id -> [`Meta`] for one shard.
///
/// Readers take the read lock only to find the slot and load two atomics;
/// the write lock is taken only to insert a timeline the shard has never
/// seen (or to grow the table), never for an append to a known timeline.
pub struct TimelineTable {
    inner: RwLock<Inner>,
}

impl std::fmt::Debug for TimelineTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TimelineTable({} timelines)", self.len())
    }
}

#[inline]
pub fn hash_id(id: u64) -> u64 {
    // A fixed, fast mixer (splitmix64 finaliser): ids are not attacker-chosen
    // keys into a table that could be flooded across connections without
    // limit; each shard's table only slows down, it does not break.
    let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Default for TimelineTable {
    fn default() -> Self {
        Self::new()
    }
}

impl TimelineTable {
    pub fn new() -> Self {
        TimelineTable {
            inner: RwLock::new(Inner {
                table: HashTable::new(),
                chunks: Vec::new(),
                len: 0,
            }),
        }
    }

    pub fn len(&self) -> usize {
        self.inner.read().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (last_seq, pos) of a timeline, or None if the shard never saw it.
    pub fn snapshot(&self, id: u64) -> Option<(u64, Pos)> {
        let g = self.inner.read();
        let idx = *g
            .table
            .find(hash_id(id), |&i| meta_at(&g.chunks, i).id == id)?;
        Some(meta_at(&g.chunks, idx).snapshot())
    }

    /// Index of a timeline's slot, if present.
    pub fn find(&self, id: u64) -> Option<u32> {
        let g = self.inner.read();
        g.table
            .find(hash_id(id), |&i| meta_at(&g.chunks, i).id == id)
            .copied()
    }

    /// Index of a timeline's slot, inserting an empty one if absent. Only the
    /// shard writer calls this.
    pub fn find_or_insert(&self, id: u64) -> u32 {
        if let Some(i) = self.find(id) {
            return i;
        }
        let mut g = self.inner.write();
        let h = hash_id(id);
        if let Some(&i) = g.table.find(h, |&i| meta_at(&g.chunks, i).id == id) {
            return i;
        }
        let idx = g.len;
        if idx.is_multiple_of(CHUNK) {
            let chunk: Box<[Meta]> = (0..CHUNK)
                .map(|_| Meta {
                    id: 0,
                    last_seq: AtomicU64::new(0),
                    pos: AtomicU64::new(Pos::NONE.pack()),
                    next_anchor: AtomicU32::new(u32::MAX),
                })
                .collect();
            g.chunks.push(chunk);
        }
        let Inner { table, chunks, len } = &mut *g;
        if let Some(m) = chunks
            .get_mut(idx / CHUNK)
            .and_then(|c| c.get_mut(idx % CHUNK))
        {
            m.id = id;
        }
        *len += 1;
        table.insert_unique(h, idx as u32, |&i| hash_id(meta_at(chunks, i).id));
        idx as u32
    }

    /// Make room for `n` more timelines (recovery knows how many are coming).
    pub fn reserve(&self, n: usize) {
        let mut g = self.inner.write();
        let Inner { table, chunks, .. } = &mut *g;
        table.reserve(n, |&i| hash_id(meta_at(chunks, i).id));
    }

    /// Slot indices for many ids at once (inserting missing ones: one read
    /// lock for the lookups, one write lock only if some id is new), with
    /// each timeline's [`Meta::writer_state`] read under the same lock (the
    /// append path used to take the lock again per record to read it; 13%
    /// of a fan-out profile). Only the shard's writer changes the state, and
    /// it holds the writer lock, so the values stay current.
    pub fn resolve_batch_state(
        &self,
        ids: impl Iterator<Item = u64> + Clone,
        out: &mut Vec<(u32, (u64, Pos, u32))>,
    ) {
        out.clear();
        let mut missing = false;
        {
            let g = self.inner.read();
            for id in ids.clone() {
                match g
                    .table
                    .find(hash_id(id), |&i| meta_at(&g.chunks, i).id == id)
                {
                    Some(&i) => out.push((i, meta_at(&g.chunks, i).writer_state())),
                    None => {
                        missing = true;
                        out.push((u32::MAX, (0, Pos::NONE, 0)));
                    }
                }
            }
        }
        if missing {
            for (slot, id) in out.iter_mut().zip(ids) {
                if slot.0 == u32::MAX {
                    let i = self.find_or_insert(id);
                    *slot = (i, self.with(i, |m| m.writer_state()));
                }
            }
        }
    }

    /// A read guard for many meta accesses in a row.
    pub fn read(&self) -> TableRead<'_> {
        TableRead {
            g: self.inner.read(),
        }
    }

    /// Run `f` on the meta at `idx` (from `find`/`find_or_insert`).
    pub fn with<R>(&self, idx: u32, f: impl FnOnce(&Meta) -> R) -> R {
        let g = self.inner.read();
        f(meta_at(&g.chunks, idx))
    }

    /// Visit every timeline: (id, last_seq, pos).
    pub fn for_each(&self, mut f: impl FnMut(u64, u64, Pos)) {
        let g = self.inner.read();
        for i in 0..g.len {
            let m = meta_at(&g.chunks, i as u32);
            let (l, p) = m.snapshot();
            f(m.id, l, p);
        }
    }

    /// Bytes of memory this table holds (the `index_bytes` accounting).
    pub fn memory_bytes(&self) -> usize {
        let g = self.inner.read();
        let slots = g.table.capacity();
        // hashbrown: buckets are the next power of two above capacity * 8/7;
        // each holds a u32 and a control byte (+ 16 trailing control bytes).
        let buckets = if slots == 0 {
            0
        } else {
            (slots * 8 / 7).next_power_of_two()
        };
        buckets * 5
            + g.chunks.len() * CHUNK * std::mem::size_of::<Meta>()
            + g.chunks.capacity() * 16
    }
}

/// Shared access to a table's metas (see [`TimelineTable::read`]).
pub struct TableRead<'a> {
    g: parking_lot::RwLockReadGuard<'a, Inner>,
}

impl TableRead<'_> {
    pub fn meta(&self, idx: u32) -> &Meta {
        meta_at(&self.g.chunks, idx)
    }
}

#[inline]
fn meta_at(chunks: &[Box<[Meta]>], idx: u32) -> &Meta {
    let i = idx as usize;
    // Indices come only from this table, so they are in range.
    &chunks[i / CHUNK][i % CHUNK]
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn insert_find_publish() {
        let t = TimelineTable::new();
        assert!(t.snapshot(5).is_none());
        let mut idxs = Vec::new();
        for id in 0..10_000u64 {
            idxs.push(t.find_or_insert(id * 7919));
        }
        for (k, id) in (0..10_000u64).enumerate() {
            assert_eq!(t.find_or_insert(id * 7919), idxs[k]);
            t.with(idxs[k], |m| {
                m.publish(
                    id + 1,
                    Pos {
                        gen: 1,
                        off: id as u32,
                    },
                )
            });
        }
        assert_eq!(t.len(), 10_000);
        assert_eq!(t.snapshot(7919 * 3), Some((4, Pos { gen: 1, off: 3 })));
        let per = t.memory_bytes() as f64 / 10_000.0;
        assert!(per < 64.0, "{per} bytes per timeline");
    }

    #[test]
    fn pos_packing() {
        let p = Pos {
            gen: 7,
            off: 0xdead_beef,
        };
        assert_eq!(Pos::unpack(p.pack()), p);
        assert_eq!(Pos::unpack(Pos::NONE.pack()), Pos::NONE);
    }
}

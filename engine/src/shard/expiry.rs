//! Retention: whole sealed segments are dropped once their newest record
//! is older than the keyspace's TTL, or once every record they hold was
//! released by its owner (`Engine::release`).

use super::*;

impl Shard {
    /// Drop sealed segments whose newest record is older than the TTL. Only
    /// a prefix (oldest first) is dropped, so every timeline's retained
    /// records stay one unbroken range.
    pub fn drop_expired(&self) -> Result<usize> {
        let Some(ttl) = self.ttl_ms() else {
            return Ok(0);
        };
        let _g = self.maint.lock();
        let now = self.clock.now_ms();
        if self
            .segs()
            .sealed
            .first()
            .is_none_or(|s| s.footer.max_ts.saturating_add(ttl) > now)
        {
            return Ok(0);
        }
        // The checkpoint must remember every timeline of the segments about
        // to go (its last seq above all): recovery can no longer read them.
        self.write_checkpoint()?;
        let dropped: Vec<Arc<SealedSeg>> = {
            let mut g = self.segs.write();
            let n = g
                .sealed
                .iter()
                .take_while(|s| s.footer.max_ts.saturating_add(ttl) <= now)
                .count();
            if n == 0 {
                return Ok(0);
            }
            let mut s = (**g).clone();
            let dropped = s.sealed.drain(..n).collect();
            *g = Arc::new(s);
            dropped
        };
        self.remove_dropped(&dropped)
    }

    fn remove_dropped(&self, dropped: &[Arc<SealedSeg>]) -> Result<usize> {
        for s in dropped {
            self.io.remove_file(&s.path).map_err(ioe(&s.path))?;
        }
        self.io.sync_dir(&self.dir).map_err(ioe(&self.dir))?;
        self.stats
            .dropped_segments
            .fetch_add(dropped.len() as u64, Ordering::Relaxed);
        Ok(dropped.len())
    }

    /// Records of timeline `id` through `upto` are no longer needed.
    pub fn release(&self, id: u64, upto: u64) {
        let mut r = self.released.lock();
        let e = r.entry(id).or_insert(0);
        *e = (*e).max(upto);
    }

    /// Drop the oldest sealed segments whose every record was released
    /// (only a prefix, as for the TTL: every timeline's retained records
    /// stay one unbroken range).
    pub fn drop_released(&self) -> Result<usize> {
        let released = {
            let r = self.released.lock();
            if r.is_empty() {
                return Ok(0);
            }
            r.clone()
        };
        let _g = self.maint.lock();
        let segs = self.segs();
        let mut n = 0;
        for s in &segs.sealed {
            let mut all = true;
            for e in s.entries()? {
                let e = e?;
                if released.get(&e.timeline).is_none_or(|&r| r < e.last_seq) {
                    all = false;
                    break;
                }
            }
            if !all {
                break;
            }
            n += 1;
        }
        if n == 0 {
            return Ok(0);
        }
        self.write_checkpoint()?;
        let dropped: Vec<Arc<SealedSeg>> = {
            let mut g = self.segs.write();
            let mut s = (**g).clone();
            // Only what was checked (sealing appends at the end; nothing
            // else removes from the front while `maint` is held).
            let dropped = s.sealed.drain(..n.min(s.sealed.len())).collect();
            *g = Arc::new(s);
            dropped
        };
        self.remove_dropped(&dropped)
    }
}

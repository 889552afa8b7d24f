//! TTL: whole sealed segments are dropped once their newest record is
//! older than the keyspace's TTL.

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
        for s in &dropped {
            self.io.remove_file(&s.path).map_err(ioe(&s.path))?;
        }
        self.io.sync_dir(&self.dir).map_err(ioe(&self.dir))?;
        self.stats
            .dropped_segments
            .fetch_add(dropped.len() as u64, Ordering::Relaxed);
        Ok(dropped.len())
    }
}

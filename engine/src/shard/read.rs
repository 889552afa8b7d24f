//! The read side: ranges of a timeline across the active, frozen and
//! sealed segments, and what retention kept.

use super::*;

impl Shard {
    /// (timelines, sum of their last SeqIds): what the shard holds by
    /// number, whatever process appended it.
    pub fn census(&self) -> (u64, u64) {
        let (mut n, mut sum) = (0u64, 0u64);
        self.table.for_each(|_, last, _| {
            n += 1;
            sum += last;
        });
        (n, sum)
    }

    pub fn last_seq(&self, id: u64) -> u64 {
        self.table.snapshot(id).map(|(l, _)| l).unwrap_or(0)
    }

    /// Records with seq in `[lo, hi]` (clamped to the last seq), ascending.
    /// `Err(Truncated)` if retention dropped any of them.
    pub fn range(&self, id: u64, lo: u64, hi: u64, out: &mut Vec<Record>) -> Result<()> {
        let Some((last, pos)) = self.table.snapshot(id) else {
            return Ok(());
        };
        let hi = hi.min(last);
        if lo > hi || lo == 0 {
            return Ok(());
        }
        let segs = self.segs();
        let mut gen = pos.gen;
        let mut head = Some(pos.off);
        let mut chunks: Vec<Vec<Record>> = Vec::new();
        let mut buf = Vec::with_capacity((hi - lo + 1).min(1024) as usize);
        let mut need_hi = hi;
        let mut first_known = last + 1;
        loop {
            let Some(seg) = segs.find(gen) else {
                // Retention dropped this segment and everything before it.
                return Err(Error::Truncated {
                    timeline: id,
                    requested: lo,
                    first_retained: first_known,
                });
            };
            let step = collect(
                &seg,
                id,
                if matches!(seg, SegRef::Log(_)) {
                    head
                } else {
                    None
                },
                lo,
                need_hi,
                &mut buf,
            )?;
            if !buf.is_empty() {
                chunks.push(std::mem::take(&mut buf));
            }
            match step {
                Step::Done => break,
                Step::Continue {
                    first_seq,
                    prev_gen,
                    prev_head,
                } => {
                    if prev_gen == NONE || first_seq <= lo {
                        break;
                    }
                    need_hi = need_hi.min(first_seq - 1);
                    first_known = first_seq;
                    gen = prev_gen;
                    head = Some(prev_head);
                }
            }
        }
        for c in chunks.into_iter().rev() {
            out.extend(c);
        }
        Ok(())
    }

    /// The first seq still retained (1 if nothing was dropped; last + 1 if
    /// everything was).
    pub fn first_retained(&self, id: u64) -> Result<u64> {
        let Some((last, pos)) = self.table.snapshot(id) else {
            return Ok(1);
        };
        if last == 0 {
            return Ok(1);
        }
        let segs = self.segs();
        let mut gen = pos.gen;
        let mut head = Some(pos.off);
        let mut first = last + 1;
        loop {
            let Some(seg) = segs.find(gen) else {
                return Ok(first);
            };
            let (f, prev, prev_head) = match &seg {
                SegRef::Sealed(s) => match s.lookup(id)? {
                    Some(e) => (e.first_seq, e.prev_gen, NONE),
                    None => {
                        return Err(Error::corruption(
                            &s.path,
                            s.footer.index_off,
                            format!("timeline {id} missing from index"),
                        ))
                    }
                },
                SegRef::Log(l) => chain_start(l, id, head.unwrap_or(NONE))?,
            };
            first = f;
            if prev == NONE {
                return Ok(first);
            }
            gen = prev;
            head = Some(prev_head);
        }
    }
}

/// First seq of the timeline in a log segment, its previous segment and the
/// head offset there.
fn chain_start(l: &LogSeg, id: u64, head: u32) -> Result<(u64, u32, u32)> {
    let bytes = l.buf.published();
    let mut cur = head;
    loop {
        let h = decode_header(bytes.get(cur as usize..).unwrap_or_default())
            .map_err(|e| Error::corruption(&l.path, cur as u64, e.to_string()))?;
        if h.timeline != id {
            return Err(Error::corruption(
                &l.path,
                cur as u64,
                "chain leads to another timeline",
            ));
        }
        if !is_local(h.prev) {
            return Ok(match crate::segment::continue_from(&h) {
                Step::Continue {
                    first_seq,
                    prev_gen,
                    prev_head,
                } => (first_seq, prev_gen, prev_head),
                Step::Done => (h.seq, NONE, NONE),
            });
        }
        // Jump by anchors when they lead further back.
        cur = if h.anchor != NONE && h.anchor < h.prev {
            h.anchor
        } else {
            h.prev
        };
    }
}

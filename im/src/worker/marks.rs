//! Read markers and deletes-for-me: the user's worker writes a catalog
//! record (replayed on open) and a sync entry (so the user's other devices
//! learn it).

use super::plan::MarkRequest;
use super::{write_engine, Mark, Worker};
use crate::directory::covers;
use crate::entry::{CatalogRecord, SyncRecord};
use crate::subscribe::Push;
use crate::{bump, Body, ConvId, Entry, ImError, Result, SyncEntry, UserId};
use timeline_engine::{SeqId, TimelineId};

impl Worker {
    pub(super) fn user_marks(&self, marks: Vec<MarkRequest>) {
        for (user, conv, seq, mark, reply) in marks {
            reply.send(self.user_mark(user, conv, seq, mark));
        }
    }

    /// The seq a mark of `seq` lands on: a delete must name a message the
    /// user can see; a read marker is clamped to what it can see and only
    /// moves forward (`Ok(None)`: it does not move).
    fn mark_target(
        &self,
        user: UserId,
        conv: ConvId,
        seq: SeqId,
        mark: Mark,
    ) -> Result<Option<SeqId>> {
        let sh = &self.sh;
        let (visible, iv) = {
            let convs = sh.dir.convs[sh.conv_shard(conv)].read();
            let c = convs.get(&conv).ok_or(ImError::NoSuchConversation(conv))?;
            let iv = c
                .members
                .get(&user)
                .cloned()
                .ok_or(ImError::NotMember { conv, user })?;
            (c.visible.get(), iv)
        };
        let upper = visible.min(iv.last().map_or(0, |l| l.1));
        match mark {
            Mark::Delete if seq == 0 || seq > upper || !covers(&iv, seq) => {
                Err(ImError::InvalidArgument(format!(
                    "user {user} cannot see seq {seq} of conversation {conv}"
                )))
            }
            Mark::Delete => Ok(Some(seq)),
            Mark::Read => {
                let old = sh.dir.users[self.p]
                    .read()
                    .get(&user)
                    .and_then(|u| u.read.get(&conv).copied())
                    .unwrap_or(0);
                let new = seq.min(upper).max(old);
                Ok((new != old).then_some(new))
            }
        }
    }

    fn user_mark(&self, user: UserId, conv: ConvId, seq: SeqId, mark: Mark) -> Result<SeqId> {
        let sh = &self.sh;
        let q = self.p;
        let Some(target) = self.mark_target(user, conv, seq, mark)? else {
            // The read marker is already there (or past it).
            return Ok(self.read_marker(user, conv));
        };
        let (cat, rec, body) = match mark {
            Mark::Delete => (
                CatalogRecord::Delete {
                    user,
                    conv,
                    seq: target,
                },
                SyncRecord::Deleted { conv, seq: target },
                Body::DeletedMarker,
            ),
            Mark::Read => (
                CatalogRecord::ReadMark {
                    user,
                    conv,
                    seq: target,
                },
                SyncRecord::ReadMarker { conv, seq: target },
                Body::ReadMarker,
            ),
        };
        // The sync entry first, then the catalog record (two keyspaces: two
        // writes). A failure or a crash between them leaves at most a
        // marker the devices were shown and the catalog does not hold: the
        // request was not answered as done, its retry writes both, and a
        // second marker of the same seq changes nothing on a device. The
        // other order could leave a mark applied (replayed from the catalog
        // on open) that the user's other devices never learn.
        let mut sb = Vec::with_capacity(17);
        rec.encode_into(&mut sb);
        let s = write_engine(sh, &[(TimelineId::sync(user), &sb)])?;
        bump(&sh.stats.sync_writes, 1);
        let sync_seq = s.first().copied().unwrap_or(0);
        let mut cb = Vec::with_capacity(32);
        cat.encode_into(&mut cb);
        let catalogued = write_engine(sh, &[(TimelineId::store(sh.catalog[q]), &cb)]);
        if catalogued.is_err() {
            // The entry is durable: let the user's syncs see it (and what
            // follows it) rather than hold it back until its next entry.
            let mut users = sh.dir.users[q].write();
            users.entry(user).or_default().visible.publish(sync_seq);
        }
        catalogued?;
        bump(&sh.stats.meta_writes, 1);
        {
            let mut users = sh.dir.users[q].write();
            let u = users.entry(user).or_default();
            match mark {
                Mark::Delete => {
                    u.deleted.insert((conv, target));
                }
                Mark::Read => {
                    u.read.insert(conv, target);
                }
            }
            u.visible.publish(sync_seq);
        }
        if sh.subs.any() {
            let entry = Entry {
                conv,
                conv_seq: target,
                sender: user,
                timestamp_ms: sh.now_ms(),
                body,
            };
            sh.subs.push(q, user, || Push::Entry {
                user,
                entry: SyncEntry {
                    seq: sync_seq,
                    entry: entry.clone(),
                },
            });
        }
        // A read marker answers where the marker now is (a conversation
        // seq); a delete answers the seq of the user's `DeletedMarker` sync
        // entry (protocol.md, DELETE_FOR_USER).
        Ok(match mark {
            Mark::Read => target,
            Mark::Delete => sync_seq,
        })
    }

    fn read_marker(&self, user: UserId, conv: ConvId) -> SeqId {
        self.sh.dir.users[self.p]
            .read()
            .get(&user)
            .and_then(|u| u.read.get(&conv).copied())
            .unwrap_or(0)
    }
}

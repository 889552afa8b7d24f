//! Admission to a worker whose mailbox is full. The plain `*_async` calls
//! wait for room (backpressure on the calling thread). A caller that must
//! never block, such as a server's event loop, uses [`Im::no_wait`]: a
//! full worker answers [`ImError::Busy`](crate::ImError::Busy) at once and
//! the caller's [`RoomWaker`] runs once it has room, so the caller retries
//! then, without polling.

use crate::worker::{Mark, MemberChange};
use crate::{ConvId, Im, Pending, Result, SendAck, UserId};
use std::sync::Arc;
use timeline_engine::SeqId;

/// Called (on the worker's thread, so it must be quick: post a message,
/// wake a loop) once after a refused call, when the worker has room. It
/// may run spuriously (room made while the retry succeeded anyway).
pub type RoomWaker = Arc<dyn Fn() + Send + Sync>;

/// What a submit does when the worker's mailbox is full.
#[derive(Clone, Copy)]
pub(crate) enum WhenFull<'a> {
    Wait,
    Notify(&'a RoomWaker),
}

/// The IM layer's asynchronous writes, refusing instead of blocking; see
/// [`Im::no_wait`]. Every call is otherwise the `Im` method of the same
/// name.
pub struct NoWait<'a> {
    im: &'a Im,
    waker: &'a RoomWaker,
}

impl<'a> NoWait<'a> {
    pub(crate) fn new(im: &'a Im, waker: &'a RoomWaker) -> Self {
        NoWait { im, waker }
    }

    fn when(&self) -> WhenFull<'a> {
        WhenFull::Notify(self.waker)
    }

    pub fn send_async(
        &self,
        conv: ConvId,
        sender: UserId,
        client_msg_id: u64,
        payload: &[u8],
    ) -> Result<Pending<SendAck>> {
        self.im
            .send_with(conv, sender, client_msg_id, payload, self.when())
    }

    pub fn recall_async(
        &self,
        conv: ConvId,
        user: UserId,
        target: SeqId,
    ) -> Result<Pending<SeqId>> {
        self.im.recall_with(conv, user, target, self.when())
    }

    pub fn mark_read_async(
        &self,
        user: UserId,
        conv: ConvId,
        seq: SeqId,
    ) -> Result<Pending<SeqId>> {
        self.im.user_mark(user, conv, seq, Mark::Read, self.when())
    }

    pub fn delete_for_user_async(
        &self,
        user: UserId,
        conv: ConvId,
        seq: SeqId,
    ) -> Result<Pending<SeqId>> {
        self.im
            .user_mark(user, conv, seq, Mark::Delete, self.when())
    }

    pub fn add_member_async(&self, conv: ConvId, user: UserId) -> Result<Pending<SeqId>> {
        self.im
            .member_op(conv, user, MemberChange::Add, self.when())
    }

    pub fn remove_member_async(&self, conv: ConvId, user: UserId) -> Result<Pending<SeqId>> {
        self.im
            .member_op(conv, user, MemberChange::Remove, self.when())
    }
}

//! Typed bodies: the requests a client sends, the replies, errors and pushes
//! a server sends. Byte grids of every body: `docs/protocol.md`; the
//! grammar of each is repeated above its encoder below.
//!
//! Requests borrow their payloads from the input buffer (`&'a [u8]`): the
//! server's hot path hands `APPEND_BATCH` items to `Engine::append_batch`
//! as they lie in its read buffer, without a copy. Replies own their values
//! and reuse the engine's and IM layer's own types (`Record`, `SyncReply`,
//! `Entry`, ...): the server moves what the engine returned into a
//! [`Response`] and encodes it, and the client hands the same types to its
//! callers. A client decoding a reply copies payloads once; that is the
//! cheap side.

use super::codes::{ErrorCode, Opcode};
use super::frame::{begin, finish, Frame, FrameKind, Header, HEADER_LEN};
use super::types::{
    ConvId, ConvKind, ConvSummary, Direction, Durability, Entry, HistoryFrom, HistoryPage, Push,
    Record, SendAck, SeqId, SyncEntry, SyncReply, TimelineId, UserId,
};
use super::wire::{
    bytes_len, conv_kind, conv_kind_code, direction, direction_code, durability, durability_code,
    list_len, Put, Reader, Wire, R,
};
use super::ProtocolError;
use bytes::BufMut;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// The first bytes of a HELLO body: a connection from something that does
/// not speak this protocol fails its handshake at once.
pub const HELLO_MAGIC: [u8; 4] = *b"TMLN";

/// The handshake: the first request of every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello<'a> {
    pub version: u16,
    /// The largest frame the client accepts (0: [`DEFAULT_MAX_FRAME`](super::DEFAULT_MAX_FRAME)).
    pub max_frame: u32,
    /// Credentials: empty, or a [`token`](super::token) (49 bytes).
    pub token: &'a [u8],
}

/// Who the server takes the connection to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// Auth is off: everything is allowed.
    Anonymous,
    /// A user token: the connection acts as this user only.
    User(UserId),
    /// An admin token: everything is allowed.
    Admin(UserId),
}

/// The server's answer to HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloReply {
    pub version: u16,
    /// The largest frame the server accepts.
    pub max_frame: u32,
    pub identity: Identity,
}

/// A request body, by command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    Hello(Hello<'a>),
    /// Echoed in the reply.
    Ping(&'a [u8]),
    Stats,
    Append {
        timeline: TimelineId,
        /// `None`: the server's default.
        durability: Option<Durability>,
        payload: &'a [u8],
    },
    AppendBatch {
        durability: Option<Durability>,
        /// In `Engine::append_batch`'s own shape.
        items: Vec<(TimelineId, &'a [u8])>,
    },
    Get {
        timeline: TimelineId,
        seq: SeqId,
    },
    Scan {
        timeline: TimelineId,
        from: SeqId,
        limit: u32,
        direction: Direction,
    },
    LastSeq {
        timeline: TimelineId,
    },
    /// The partition map of a cluster node (docs/protocol.md §13).
    ClusterMap,
    Send {
        conv: ConvId,
        sender: UserId,
        client_msg_id: u64,
        payload: &'a [u8],
    },
    Sync {
        user: UserId,
        checkpoint: SeqId,
        limit: u32,
        /// `(conversation, checkpoint)` of the device's read-fan-out groups.
        groups: Vec<(ConvId, SeqId)>,
    },
    History {
        conv: ConvId,
        user: UserId,
        from: HistoryFrom,
        limit: u32,
    },
    Conversations {
        user: UserId,
    },
    MarkRead {
        user: UserId,
        conv: ConvId,
        seq: SeqId,
    },
    Recall {
        conv: ConvId,
        user: UserId,
        target: SeqId,
    },
    DeleteForUser {
        user: UserId,
        conv: ConvId,
        seq: SeqId,
    },
    CreateConversation {
        conv: ConvId,
        kind: ConvKind,
        members: Vec<UserId>,
    },
    AddMember {
        conv: ConvId,
        user: UserId,
    },
    RemoveMember {
        conv: ConvId,
        user: UserId,
    },
    Members {
        conv: ConvId,
    },
    /// Pushes for `user` follow the reply, tagged with this request's id.
    Subscribe {
        user: UserId,
    },
    /// Stop the subscription opened by the SUBSCRIBE with request id
    /// `subscription`; no push of it follows the reply.
    Unsubscribe {
        subscription: u64,
    },
}

fn malformed(opcode: Opcode) -> impl FnOnce(&'static str) -> ProtocolError {
    move |why| ProtocolError::Malformed { opcode, why }
}

/// `history_from = tag:u8 (0 before, 1 after) seq:u64`.
fn history_from(r: &mut Reader<'_>) -> R<HistoryFrom> {
    let tag = r.u8()?;
    let seq = r.u64()?;
    match tag {
        0 => Ok(HistoryFrom::Before(seq)),
        1 => Ok(HistoryFrom::After(seq)),
        _ => Err("unknown history direction"),
    }
}

fn put_history_from(b: &mut Vec<u8>, f: HistoryFrom) {
    let (tag, seq) = match f {
        HistoryFrom::Before(s) => (0, s),
        HistoryFrom::After(s) => (1, s),
    };
    b.put_u8(tag);
    b.put_u64_le(seq);
}

impl<'a> Request<'a> {
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Hello(_) => Opcode::HELLO,
            Request::Ping(_) => Opcode::PING,
            Request::Stats => Opcode::STATS,
            Request::Append { .. } => Opcode::APPEND,
            Request::AppendBatch { .. } => Opcode::APPEND_BATCH,
            Request::Get { .. } => Opcode::GET,
            Request::Scan { .. } => Opcode::SCAN,
            Request::LastSeq { .. } => Opcode::LAST_SEQ,
            Request::ClusterMap => Opcode::CLUSTER_MAP,
            Request::Send { .. } => Opcode::SEND,
            Request::Sync { .. } => Opcode::SYNC,
            Request::History { .. } => Opcode::HISTORY,
            Request::Conversations { .. } => Opcode::CONVERSATIONS,
            Request::MarkRead { .. } => Opcode::MARK_READ,
            Request::Recall { .. } => Opcode::RECALL,
            Request::DeleteForUser { .. } => Opcode::DELETE_FOR_USER,
            Request::CreateConversation { .. } => Opcode::CREATE_CONVERSATION,
            Request::AddMember { .. } => Opcode::ADD_MEMBER,
            Request::RemoveMember { .. } => Opcode::REMOVE_MEMBER,
            Request::Members { .. } => Opcode::MEMBERS,
            Request::Subscribe { .. } => Opcode::SUBSCRIBE,
            Request::Unsubscribe { .. } => Opcode::UNSUBSCRIBE,
        }
    }

    /// Bytes of the body.
    pub fn body_len(&self) -> usize {
        match self {
            Request::Hello(h) => 4 + 2 + 4 + bytes_len(h.token),
            Request::Ping(d) => d.len(),
            Request::Stats | Request::ClusterMap => 0,
            Request::Append { payload, .. } => 9 + 1 + bytes_len(payload),
            Request::AppendBatch { items, .. } => 1 + list_len(items),
            Request::Get { .. } => 9 + 8,
            Request::Scan { .. } => 9 + 8 + 4 + 1,
            Request::LastSeq { .. } => 9,
            Request::Send { payload, .. } => 24 + bytes_len(payload),
            Request::Sync { groups, .. } => 8 + 8 + 4 + list_len(groups),
            Request::History { .. } => 8 + 8 + 9 + 4,
            Request::Conversations { .. } => 8,
            Request::MarkRead { .. } | Request::Recall { .. } | Request::DeleteForUser { .. } => 24,
            Request::CreateConversation { members, .. } => 8 + 1 + list_len(members),
            Request::AddMember { .. } | Request::RemoveMember { .. } => 16,
            Request::Members { .. } => 8,
            Request::Subscribe { .. } | Request::Unsubscribe { .. } => 8,
        }
    }

    /// The whole frame: header plus body.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body_len()
    }

    /// Append the body to `b`.
    pub fn encode_body(&self, b: &mut Vec<u8>) {
        match self {
            // magic:[u8;4] version:u16 max_frame:u32 token:bytes
            Request::Hello(h) => {
                b.extend_from_slice(&HELLO_MAGIC);
                b.put_u16_le(h.version);
                b.put_u32_le(h.max_frame);
                b.put_blob(h.token);
            }
            // data: the rest of the body
            Request::Ping(d) => b.extend_from_slice(d),
            Request::Stats | Request::ClusterMap => {}
            // timeline durability:u8 payload:bytes
            Request::Append {
                timeline,
                durability,
                payload,
            } => {
                timeline.encode(b);
                b.put_u8(durability_code(*durability));
                b.put_blob(payload);
            }
            // durability:u8 items:list<timeline payload:bytes>
            Request::AppendBatch { durability, items } => {
                b.put_u8(durability_code(*durability));
                b.put_list(items);
            }
            // timeline seq:u64
            Request::Get { timeline, seq } => {
                timeline.encode(b);
                b.put_u64_le(*seq);
            }
            // timeline from:u64 limit:u32 direction:u8
            Request::Scan {
                timeline,
                from,
                limit,
                direction,
            } => {
                timeline.encode(b);
                b.put_u64_le(*from);
                b.put_u32_le(*limit);
                b.put_u8(direction_code(*direction));
            }
            // timeline
            Request::LastSeq { timeline } => timeline.encode(b),
            // conv:u64 sender:u64 client_msg_id:u64 payload:bytes
            Request::Send {
                conv,
                sender,
                client_msg_id,
                payload,
            } => {
                b.put_u64_le(*conv);
                b.put_u64_le(*sender);
                b.put_u64_le(*client_msg_id);
                b.put_blob(payload);
            }
            // user:u64 checkpoint:u64 limit:u32 groups:list<conv:u64 checkpoint:u64>
            Request::Sync {
                user,
                checkpoint,
                limit,
                groups,
            } => {
                b.put_u64_le(*user);
                b.put_u64_le(*checkpoint);
                b.put_u32_le(*limit);
                b.put_list(groups);
            }
            // conv:u64 user:u64 from:u8 seq:u64 limit:u32
            Request::History {
                conv,
                user,
                from,
                limit,
            } => {
                b.put_u64_le(*conv);
                b.put_u64_le(*user);
                put_history_from(b, *from);
                b.put_u32_le(*limit);
            }
            // user:u64
            Request::Conversations { user } => b.put_u64_le(*user),
            // user:u64 conv:u64 seq:u64
            Request::MarkRead { user, conv, seq } | Request::DeleteForUser { user, conv, seq } => {
                b.put_u64_le(*user);
                b.put_u64_le(*conv);
                b.put_u64_le(*seq);
            }
            // conv:u64 user:u64 target:u64
            Request::Recall { conv, user, target } => {
                b.put_u64_le(*conv);
                b.put_u64_le(*user);
                b.put_u64_le(*target);
            }
            // conv:u64 kind:u8 members:list<u64>
            Request::CreateConversation {
                conv,
                kind,
                members,
            } => {
                b.put_u64_le(*conv);
                b.put_u8(conv_kind_code(*kind));
                b.put_list(members);
            }
            // conv:u64 user:u64
            Request::AddMember { conv, user } | Request::RemoveMember { conv, user } => {
                b.put_u64_le(*conv);
                b.put_u64_le(*user);
            }
            // conv:u64
            Request::Members { conv } => b.put_u64_le(*conv),
            // user:u64
            Request::Subscribe { user } => b.put_u64_le(*user),
            // subscription:u64
            Request::Unsubscribe { subscription } => b.put_u64_le(*subscription),
        }
    }

    /// Append the whole frame (header with `request_id`, then the body).
    pub fn encode_frame(&self, request_id: u64, b: &mut Vec<u8>) {
        b.reserve(self.encoded_len());
        let start = begin(
            b,
            Header {
                opcode: self.opcode(),
                flags: FrameKind::Request.flags(),
                request_id,
            },
        );
        self.encode_body(b);
        finish(b, start);
    }

    /// Decode the body of a request with `opcode`. `UnknownCommand` for an
    /// opcode that is not a request, `Malformed` for a body that does not
    /// decode; neither is fatal to the connection.
    pub fn decode_body(opcode: Opcode, body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(body);
        let req = Self::read(opcode, &mut r).map_err(malformed(opcode))?;
        let req = req.ok_or(ProtocolError::UnknownCommand(opcode))?;
        r.end().map_err(malformed(opcode))?;
        Ok(req)
    }

    fn read(opcode: Opcode, r: &mut Reader<'a>) -> R<Option<Self>> {
        Ok(Some(match opcode {
            Opcode::HELLO => {
                if r.magic()? != HELLO_MAGIC {
                    return Err("bad HELLO magic");
                }
                Request::Hello(Hello {
                    version: r.u16()?,
                    max_frame: r.u32()?,
                    token: r.bytes()?,
                })
            }
            Opcode::PING => Request::Ping(r.rest()),
            Opcode::STATS => Request::Stats,
            Opcode::CLUSTER_MAP => Request::ClusterMap,
            Opcode::APPEND => Request::Append {
                timeline: TimelineId::decode(r)?,
                durability: durability(r)?,
                payload: r.bytes()?,
            },
            Opcode::APPEND_BATCH => Request::AppendBatch {
                durability: durability(r)?,
                items: r.list()?,
            },
            Opcode::GET => Request::Get {
                timeline: TimelineId::decode(r)?,
                seq: r.u64()?,
            },
            Opcode::SCAN => Request::Scan {
                timeline: TimelineId::decode(r)?,
                from: r.u64()?,
                limit: r.u32()?,
                direction: direction(r)?,
            },
            Opcode::LAST_SEQ => Request::LastSeq {
                timeline: TimelineId::decode(r)?,
            },
            Opcode::SEND => Request::Send {
                conv: r.u64()?,
                sender: r.u64()?,
                client_msg_id: r.u64()?,
                payload: r.bytes()?,
            },
            Opcode::SYNC => Request::Sync {
                user: r.u64()?,
                checkpoint: r.u64()?,
                limit: r.u32()?,
                groups: r.list()?,
            },
            Opcode::HISTORY => Request::History {
                conv: r.u64()?,
                user: r.u64()?,
                from: history_from(r)?,
                limit: r.u32()?,
            },
            Opcode::CONVERSATIONS => Request::Conversations { user: r.u64()? },
            Opcode::MARK_READ => Request::MarkRead {
                user: r.u64()?,
                conv: r.u64()?,
                seq: r.u64()?,
            },
            Opcode::RECALL => Request::Recall {
                conv: r.u64()?,
                user: r.u64()?,
                target: r.u64()?,
            },
            Opcode::DELETE_FOR_USER => Request::DeleteForUser {
                user: r.u64()?,
                conv: r.u64()?,
                seq: r.u64()?,
            },
            Opcode::CREATE_CONVERSATION => Request::CreateConversation {
                conv: r.u64()?,
                kind: conv_kind(r)?,
                members: r.list()?,
            },
            Opcode::ADD_MEMBER => Request::AddMember {
                conv: r.u64()?,
                user: r.u64()?,
            },
            Opcode::REMOVE_MEMBER => Request::RemoveMember {
                conv: r.u64()?,
                user: r.u64()?,
            },
            Opcode::MEMBERS => Request::Members { conv: r.u64()? },
            Opcode::SUBSCRIBE => Request::Subscribe { user: r.u64()? },
            Opcode::UNSUBSCRIBE => Request::Unsubscribe {
                subscription: r.u64()?,
            },
            _ => return Ok(None),
        }))
    }
}

/// A request with its id: what the server reads off a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFrame<'a> {
    /// Chosen by the client, never 0; echoed by the reply.
    pub id: u64,
    pub request: Request<'a>,
}

impl<'a> RequestFrame<'a> {
    /// Decode a frame the server received. On error, answer with
    /// `frame.header.request_id` and `frame.header.opcode` and read on
    /// (none of these errors is fatal).
    pub fn decode(frame: &Frame<'a>) -> Result<Self, ProtocolError> {
        let h = frame.header;
        if h.kind()? != FrameKind::Request {
            return Err(ProtocolError::Malformed {
                opcode: h.opcode,
                why: "reply or push flags on a request",
            });
        }
        let request = Request::decode_body(h.opcode, frame.body)?;
        if h.request_id == 0 {
            return Err(ProtocolError::Malformed {
                opcode: h.opcode,
                why: "request id 0 is reserved",
            });
        }
        Ok(RequestFrame {
            id: h.request_id,
            request,
        })
    }
    pub fn encoded_len(&self) -> usize {
        self.request.encoded_len()
    }
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        self.request.encode_frame(self.id, b);
    }
}

/// A successful reply's body, by command: the IM and engine API's own types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Hello(HelloReply),
    /// The PING body, echoed.
    Ping(Vec<u8>),
    /// `(key, value)` counters; keys are informal (not a stable contract).
    Stats(Vec<(String, u64)>),
    Append(SeqId),
    /// SeqIds in item order.
    AppendBatch(Vec<SeqId>),
    Get(Option<Record>),
    Scan(Vec<Record>),
    LastSeq(SeqId),
    /// A cluster node's view: the map version, P, and `(leader address,
    /// partition)` for every partition whose leader it knows.
    ClusterMap {
        version: u64,
        partitions: u32,
        leaders: Vec<(String, u64)>,
    },
    Send(SendAck),
    Sync(SyncReply),
    History(HistoryPage),
    Conversations(Vec<ConvSummary>),
    /// The read marker now (never lowered, never above the last seq).
    MarkRead(SeqId),
    /// The seq of the `Recall` event.
    Recall(SeqId),
    /// The seq of the user's `DeletedMarker` sync entry.
    DeleteForUser(SeqId),
    /// The seq of the `Created` event (1).
    CreateConversation(SeqId),
    /// The seq of the `MemberAdded` event.
    AddMember(SeqId),
    /// The seq of the `MemberRemoved` event.
    RemoveMember(SeqId),
    Members(Vec<UserId>),
    Subscribe,
    Unsubscribe,
}

const SYNC_HAS_MORE: u8 = 0x01;
const SYNC_TRUNCATED: u8 = 0x02;

const IDENTITY_ANONYMOUS: u8 = 0;
const IDENTITY_USER: u8 = 1;
const IDENTITY_ADMIN: u8 = 2;

impl Response {
    pub fn opcode(&self) -> Opcode {
        match self {
            Response::Hello(_) => Opcode::HELLO,
            Response::Ping(_) => Opcode::PING,
            Response::Stats(_) => Opcode::STATS,
            Response::Append(_) => Opcode::APPEND,
            Response::AppendBatch(_) => Opcode::APPEND_BATCH,
            Response::Get(_) => Opcode::GET,
            Response::Scan(_) => Opcode::SCAN,
            Response::LastSeq(_) => Opcode::LAST_SEQ,
            Response::ClusterMap { .. } => Opcode::CLUSTER_MAP,
            Response::Send(_) => Opcode::SEND,
            Response::Sync(_) => Opcode::SYNC,
            Response::History(_) => Opcode::HISTORY,
            Response::Conversations(_) => Opcode::CONVERSATIONS,
            Response::MarkRead(_) => Opcode::MARK_READ,
            Response::Recall(_) => Opcode::RECALL,
            Response::DeleteForUser(_) => Opcode::DELETE_FOR_USER,
            Response::CreateConversation(_) => Opcode::CREATE_CONVERSATION,
            Response::AddMember(_) => Opcode::ADD_MEMBER,
            Response::RemoveMember(_) => Opcode::REMOVE_MEMBER,
            Response::Members(_) => Opcode::MEMBERS,
            Response::Subscribe => Opcode::SUBSCRIBE,
            Response::Unsubscribe => Opcode::UNSUBSCRIBE,
        }
    }

    pub fn body_len(&self) -> usize {
        match self {
            Response::Hello(_) => 2 + 4 + 1 + 8,
            Response::Ping(d) => d.len(),
            Response::Stats(kv) => list_len(kv),
            Response::ClusterMap { leaders, .. } => 8 + 4 + list_len(leaders),
            Response::Append(_)
            | Response::LastSeq(_)
            | Response::MarkRead(_)
            | Response::Recall(_)
            | Response::DeleteForUser(_)
            | Response::CreateConversation(_)
            | Response::AddMember(_)
            | Response::RemoveMember(_) => 8,
            Response::AppendBatch(seqs) => list_len(seqs),
            Response::Get(r) => 1 + r.as_ref().map_or(0, Wire::encoded_len),
            Response::Scan(rs) => list_len(rs),
            Response::Send(a) => a.encoded_len(),
            Response::Sync(s) => 8 + 1 + 8 + list_len(&s.entries) + list_len(&s.groups),
            Response::History(h) => 1 + list_len(&h.entries),
            Response::Conversations(cs) => list_len(cs),
            Response::Members(ms) => list_len(ms),
            Response::Subscribe | Response::Unsubscribe => 0,
        }
    }

    /// The whole frame: header plus body.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body_len()
    }

    pub fn encode_body(&self, b: &mut Vec<u8>) {
        match self {
            // version:u16 max_frame:u32 identity:u8 (0 anonymous, 1 user, 2 admin) user:u64
            Response::Hello(h) => {
                b.put_u16_le(h.version);
                b.put_u32_le(h.max_frame);
                let (tag, user) = match h.identity {
                    Identity::Anonymous => (IDENTITY_ANONYMOUS, 0),
                    Identity::User(u) => (IDENTITY_USER, u),
                    Identity::Admin(u) => (IDENTITY_ADMIN, u),
                };
                b.put_u8(tag);
                b.put_u64_le(user);
            }
            // data: the rest of the body
            Response::Ping(d) => b.extend_from_slice(d),
            // list<key:str value:u64>
            Response::Stats(kv) => b.put_list(kv),
            // version:u64 partitions:u32 list<addr:str partition:u64>
            Response::ClusterMap {
                version,
                partitions,
                leaders,
            } => {
                b.put_u64_le(*version);
                b.put_u32_le(*partitions);
                b.put_list(leaders);
            }
            // seq:u64
            Response::Append(s)
            | Response::LastSeq(s)
            | Response::MarkRead(s)
            | Response::Recall(s)
            | Response::DeleteForUser(s)
            | Response::CreateConversation(s)
            | Response::AddMember(s)
            | Response::RemoveMember(s) => b.put_u64_le(*s),
            // list<u64>
            Response::AppendBatch(seqs) => b.put_list(seqs),
            // found:bool [record]
            Response::Get(r) => {
                b.put_bool(r.is_some());
                if let Some(r) = r {
                    r.encode(b);
                }
            }
            // list<record>
            Response::Scan(rs) => b.put_list(rs),
            // conv:u64 seq:u64 duplicate:bool
            Response::Send(a) => a.encode(b),
            // checkpoint:u64 flags:u8 first_retained:u64 entries:list<sync_entry>
            // groups:list<group_page>
            Response::Sync(s) => {
                b.put_u64_le(s.checkpoint);
                let mut f = 0;
                if s.has_more {
                    f |= SYNC_HAS_MORE;
                }
                if s.truncated.is_some() {
                    f |= SYNC_TRUNCATED;
                }
                b.put_u8(f);
                b.put_u64_le(s.truncated.unwrap_or(0));
                b.put_list(&s.entries);
                b.put_list(&s.groups);
            }
            // has_more:bool entries:list<entry>
            Response::History(h) => {
                b.put_bool(h.has_more);
                b.put_list(&h.entries);
            }
            // list<conv_summary>
            Response::Conversations(cs) => b.put_list(cs),
            // list<u64>
            Response::Members(ms) => b.put_list(ms),
            Response::Subscribe | Response::Unsubscribe => {}
        }
    }

    /// Append the whole reply frame for request `request_id`.
    pub fn encode_frame(&self, request_id: u64, b: &mut Vec<u8>) {
        b.reserve(self.encoded_len());
        let start = begin(
            b,
            Header {
                opcode: self.opcode(),
                flags: FrameKind::Reply.flags(),
                request_id,
            },
        );
        self.encode_body(b);
        finish(b, start);
    }

    /// Decode the body of a successful reply to a request with `opcode`.
    pub fn decode_body(opcode: Opcode, body: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(body);
        let resp = Self::read(opcode, &mut r).map_err(malformed(opcode))?;
        let resp = resp.ok_or(ProtocolError::UnknownCommand(opcode))?;
        r.end().map_err(malformed(opcode))?;
        Ok(resp)
    }

    fn read(opcode: Opcode, r: &mut Reader<'_>) -> R<Option<Self>> {
        Ok(Some(match opcode {
            Opcode::HELLO => {
                let version = r.u16()?;
                let max_frame = r.u32()?;
                let tag = r.u8()?;
                let user = r.u64()?;
                let identity = match tag {
                    IDENTITY_ANONYMOUS if user == 0 => Identity::Anonymous,
                    IDENTITY_ANONYMOUS => return Err("anonymous identity with a user"),
                    IDENTITY_USER => Identity::User(user),
                    IDENTITY_ADMIN => Identity::Admin(user),
                    _ => return Err("unknown identity"),
                };
                Response::Hello(HelloReply {
                    version,
                    max_frame,
                    identity,
                })
            }
            Opcode::PING => Response::Ping(r.rest().to_vec()),
            Opcode::STATS => Response::Stats(r.list()?),
            Opcode::CLUSTER_MAP => Response::ClusterMap {
                version: r.u64()?,
                partitions: r.u32()?,
                leaders: r.list()?,
            },
            Opcode::APPEND => Response::Append(r.u64()?),
            Opcode::APPEND_BATCH => Response::AppendBatch(r.list()?),
            Opcode::GET => Response::Get(if r.bool()? {
                Some(Record::decode(r)?)
            } else {
                None
            }),
            Opcode::SCAN => Response::Scan(r.list()?),
            Opcode::LAST_SEQ => Response::LastSeq(r.u64()?),
            Opcode::SEND => Response::Send(SendAck::decode(r)?),
            Opcode::SYNC => {
                let checkpoint = r.u64()?;
                let f = r.u8()?;
                if f & !(SYNC_HAS_MORE | SYNC_TRUNCATED) != 0 {
                    return Err("undefined sync flags");
                }
                let first = r.u64()?;
                let truncated = if f & SYNC_TRUNCATED != 0 {
                    Some(first)
                } else if first != 0 {
                    return Err("first_retained without the truncated flag");
                } else {
                    None
                };
                Response::Sync(SyncReply {
                    checkpoint,
                    has_more: f & SYNC_HAS_MORE != 0,
                    truncated,
                    entries: r.list()?,
                    groups: r.list()?,
                })
            }
            Opcode::HISTORY => Response::History(HistoryPage {
                has_more: r.bool()?,
                entries: r.list()?,
            }),
            Opcode::CONVERSATIONS => Response::Conversations(r.list()?),
            Opcode::MARK_READ => Response::MarkRead(r.u64()?),
            Opcode::RECALL => Response::Recall(r.u64()?),
            Opcode::DELETE_FOR_USER => Response::DeleteForUser(r.u64()?),
            Opcode::CREATE_CONVERSATION => Response::CreateConversation(r.u64()?),
            Opcode::ADD_MEMBER => Response::AddMember(r.u64()?),
            Opcode::REMOVE_MEMBER => Response::RemoveMember(r.u64()?),
            Opcode::MEMBERS => Response::Members(r.list()?),
            Opcode::SUBSCRIBE => Response::Subscribe,
            Opcode::UNSUBSCRIBE => Response::Unsubscribe,
            _ => return Ok(None),
        }))
    }
}

/// The body of an error reply: a stable code, an argument whose meaning the
/// code defines (0 if none), and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub arg: u64,
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, arg: u64, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            arg,
            message: message.into(),
        }
    }

    pub fn body_len(&self) -> usize {
        2 + 8 + bytes_len(self.message.as_bytes())
    }

    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body_len()
    }

    /// `code:u16 arg:u64 message:str`
    pub fn encode_body(&self, b: &mut Vec<u8>) {
        b.put_u16_le(self.code.0);
        b.put_u64_le(self.arg);
        b.put_blob(self.message.as_bytes());
    }

    /// Append the error frame answering request `request_id` of `opcode`
    /// (request id 0 and opcode 0 for an error about the connection).
    pub fn encode_frame(&self, request_id: u64, opcode: Opcode, b: &mut Vec<u8>) {
        b.reserve(self.encoded_len());
        let start = begin(
            b,
            Header {
                opcode,
                flags: FrameKind::Error.flags(),
                request_id,
            },
        );
        self.encode_body(b);
        finish(b, start);
    }

    pub fn decode_body(opcode: Opcode, body: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(body);
        let read = |r: &mut Reader<'_>| -> R<ErrorReply> {
            let e = ErrorReply {
                code: ErrorCode(r.u16()?),
                arg: r.u64()?,
                message: r.str()?.to_owned(),
            };
            r.end()?;
            Ok(e)
        };
        read(&mut r).map_err(malformed(opcode))
    }
}

const PUSH_ENTRY: u8 = 1;
const PUSH_GROUP: u8 = 2;
const PUSH_RESYNC: u8 = 3;

/// Bytes of a PUSH body.
pub fn push_body_len(p: &Push) -> usize {
    1 + match p {
        Push::Entry { entry, .. } => 8 + entry.encoded_len(),
        Push::Group { entry, .. } => 8 + entry.encoded_len(),
        Push::Resync => 0,
    }
}

/// A PUSH body: `tag:u8` then 1 entry `user:u64 sync_entry`, 2 group
/// `user:u64 entry`, 3 resync (nothing).
pub fn encode_push_body(p: &Push, b: &mut Vec<u8>) {
    match p {
        Push::Entry { user, entry } => {
            b.put_u8(PUSH_ENTRY);
            b.put_u64_le(*user);
            entry.encode(b);
        }
        Push::Group { user, entry } => {
            b.put_u8(PUSH_GROUP);
            b.put_u64_le(*user);
            entry.encode(b);
        }
        Push::Resync => b.put_u8(PUSH_RESYNC),
    }
}

/// Append a PUSH frame of the subscription opened by request `subscription`.
/// Bytes of a PUSH frame of `p`, header included.
pub fn push_frame_len(p: &Push) -> usize {
    HEADER_LEN + push_body_len(p)
}

pub fn encode_push_frame(subscription: u64, p: &Push, b: &mut Vec<u8>) {
    b.reserve(HEADER_LEN + push_body_len(p));
    let start = begin(
        b,
        Header {
            opcode: Opcode::PUSH,
            flags: FrameKind::Push.flags(),
            request_id: subscription,
        },
    );
    encode_push_body(p, b);
    finish(b, start);
}

pub fn decode_push_body(body: &[u8]) -> Result<Push, ProtocolError> {
    let mut r = Reader::new(body);
    let read = |r: &mut Reader<'_>| -> R<Push> {
        let p = match r.u8()? {
            PUSH_ENTRY => Push::Entry {
                user: r.u64()?,
                entry: SyncEntry::decode(r)?,
            },
            PUSH_GROUP => Push::Group {
                user: r.u64()?,
                entry: Entry::decode(r)?,
            },
            PUSH_RESYNC => Push::Resync,
            _ => return Err("unknown push tag"),
        };
        r.end()?;
        Ok(p)
    };
    read(&mut r).map_err(malformed(Opcode::PUSH))
}

/// A frame the server sends, decoded: what a client reads off a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMsg {
    /// Request `id` succeeded.
    Reply { id: u64, response: Response },
    /// Request `id` (of `opcode`) failed; `id` and `opcode` are 0 for an
    /// error about the whole connection (sent before the server closes it).
    Error {
        id: u64,
        opcode: Opcode,
        error: ErrorReply,
    },
    /// An entry for the subscription opened by the SUBSCRIBE with request
    /// id `subscription`.
    Push { subscription: u64, push: Push },
}

impl ServerMsg {
    /// Decode a frame a client received.
    pub fn decode(frame: &Frame<'_>) -> Result<Self, ProtocolError> {
        let h = frame.header;
        match h.kind()? {
            FrameKind::Request => Err(ProtocolError::Malformed {
                opcode: h.opcode,
                why: "a request frame from the server",
            }),
            FrameKind::Reply => Ok(ServerMsg::Reply {
                id: h.request_id,
                response: Response::decode_body(h.opcode, frame.body)?,
            }),
            FrameKind::Error => Ok(ServerMsg::Error {
                id: h.request_id,
                opcode: h.opcode,
                error: ErrorReply::decode_body(h.opcode, frame.body)?,
            }),
            FrameKind::Push if h.opcode == Opcode::PUSH => Ok(ServerMsg::Push {
                subscription: h.request_id,
                push: decode_push_body(frame.body)?,
            }),
            FrameKind::Push => Err(ProtocolError::Malformed {
                opcode: h.opcode,
                why: "push flag on an opcode other than PUSH",
            }),
        }
    }

    pub fn encoded_len(&self) -> usize {
        match self {
            ServerMsg::Reply { response, .. } => response.encoded_len(),
            ServerMsg::Error { error, .. } => error.encoded_len(),
            ServerMsg::Push { push, .. } => HEADER_LEN + push_body_len(push),
        }
    }

    pub fn encode_into(&self, b: &mut Vec<u8>) {
        match self {
            ServerMsg::Reply { id, response } => response.encode_frame(*id, b),
            ServerMsg::Error { id, opcode, error } => error.encode_frame(*id, *opcode, b),
            ServerMsg::Push { subscription, push } => encode_push_frame(*subscription, push, b),
        }
    }
}

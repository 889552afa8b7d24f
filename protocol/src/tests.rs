//! Round trips of every request and reply kind, golden bytes of the grids in
//! `docs/protocol.md`, and garbage that must never panic the decoder.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use super::*;
use crate::types::{
    Body, ConvKind, ConvSummary, Direction, Durability, Entry, GroupPage, HistoryFrom, HistoryPage,
    Push, Record, SendAck, SyncEntry, SyncReply, TimelineId,
};
use proptest::collection::vec;
use proptest::prelude::*;

// -- strategies --------------------------------------------------------------

/// Requests borrow their payloads; tests leak small buffers to get `'static`.
fn bytes() -> impl Strategy<Value = &'static [u8]> {
    vec(any::<u8>(), 0..48).prop_map(|v| &*Box::leak(v.into_boxed_slice()))
}

fn owned_bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..48)
}

fn timeline() -> impl Strategy<Value = TimelineId> {
    (any::<bool>(), any::<u64>()).prop_map(|(s, id)| {
        if s {
            TimelineId::sync(id)
        } else {
            TimelineId::store(id)
        }
    })
}

fn durability() -> impl Strategy<Value = Option<Durability>> {
    prop_oneof![
        Just(None),
        Just(Some(Durability::Buffered)),
        Just(Some(Durability::GroupCommit)),
        Just(Some(Durability::Sync)),
    ]
}

fn direction() -> impl Strategy<Value = Direction> {
    prop_oneof![Just(Direction::Forward), Just(Direction::Backward)]
}

fn conv_kind() -> impl Strategy<Value = ConvKind> {
    prop_oneof![Just(ConvKind::Direct), Just(ConvKind::Group)]
}

fn history_from() -> impl Strategy<Value = HistoryFrom> {
    prop_oneof![
        any::<u64>().prop_map(HistoryFrom::Before),
        any::<u64>().prop_map(HistoryFrom::After),
    ]
}

fn request() -> impl Strategy<Value = Request<'static>> {
    let session = prop_oneof![
        (any::<u16>(), any::<u32>(), bytes()).prop_map(|(version, max_frame, token)| {
            Request::Hello(Hello {
                version,
                max_frame,
                token,
            })
        }),
        bytes().prop_map(Request::Ping),
        Just(Request::Stats),
        Just(Request::ClusterMap),
    ];
    let raw = prop_oneof![
        (timeline(), durability(), bytes()).prop_map(|(timeline, durability, payload)| {
            Request::Append {
                timeline,
                durability,
                payload,
            }
        }),
        (durability(), vec((timeline(), bytes()), 0..8))
            .prop_map(|(durability, items)| Request::AppendBatch { durability, items }),
        (timeline(), any::<u64>()).prop_map(|(timeline, seq)| Request::Get { timeline, seq }),
        (timeline(), any::<u64>(), any::<u32>(), direction()).prop_map(
            |(timeline, from, limit, direction)| Request::Scan {
                timeline,
                from,
                limit,
                direction,
            }
        ),
        timeline().prop_map(|timeline| Request::LastSeq { timeline }),
    ];
    let im = prop_oneof![
        (any::<u64>(), any::<u64>(), any::<u64>(), bytes()).prop_map(
            |(conv, sender, client_msg_id, payload)| Request::Send {
                conv,
                sender,
                client_msg_id,
                payload,
            }
        ),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            vec(any::<(u64, u64)>(), 0..8)
        )
            .prop_map(|(user, checkpoint, limit, groups)| Request::Sync {
                user,
                checkpoint,
                limit,
                groups,
            }),
        (any::<u64>(), any::<u64>(), history_from(), any::<u32>()).prop_map(
            |(conv, user, from, limit)| Request::History {
                conv,
                user,
                from,
                limit,
            }
        ),
        any::<u64>().prop_map(|user| Request::Conversations { user }),
        any::<(u64, u64, u64)>().prop_map(|(user, conv, seq)| Request::MarkRead {
            user,
            conv,
            seq
        }),
        any::<(u64, u64, u64)>().prop_map(|(conv, user, target)| Request::Recall {
            conv,
            user,
            target
        }),
        any::<(u64, u64, u64)>().prop_map(|(user, conv, seq)| Request::DeleteForUser {
            user,
            conv,
            seq
        }),
    ];
    let members = prop_oneof![
        (any::<u64>(), conv_kind(), vec(any::<u64>(), 0..8)).prop_map(|(conv, kind, members)| {
            Request::CreateConversation {
                conv,
                kind,
                members,
            }
        }),
        any::<(u64, u64)>().prop_map(|(conv, user)| Request::AddMember { conv, user }),
        any::<(u64, u64)>().prop_map(|(conv, user)| Request::RemoveMember { conv, user }),
        any::<u64>().prop_map(|conv| Request::Members { conv }),
        any::<u64>().prop_map(|user| Request::Subscribe { user }),
        any::<u64>().prop_map(|subscription| Request::Unsubscribe { subscription }),
    ];
    prop_oneof![session, raw, im, members]
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        owned_bytes().prop_map(Body::Message),
        Just(Body::Recalled),
        Just(Body::Deleted),
        conv_kind().prop_map(|kind| Body::Created { kind }),
        any::<u64>().prop_map(Body::MemberAdded),
        any::<u64>().prop_map(Body::MemberRemoved),
        any::<u64>().prop_map(|target| Body::Recall { target }),
        Just(Body::ReadMarker),
        Just(Body::DeletedMarker),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    (any::<(u64, u64, u64, u64)>(), body()).prop_map(
        |((conv, conv_seq, sender, timestamp_ms), body)| Entry {
            conv,
            conv_seq,
            sender,
            timestamp_ms,
            body,
        },
    )
}

fn sync_entry() -> impl Strategy<Value = SyncEntry> {
    (any::<u64>(), entry()).prop_map(|(seq, entry)| SyncEntry { seq, entry })
}

fn record() -> impl Strategy<Value = Record> {
    (any::<u64>(), any::<u64>(), owned_bytes()).prop_map(|(seq, timestamp_ms, payload)| Record {
        seq,
        timestamp_ms,
        payload,
    })
}

fn sync_reply() -> impl Strategy<Value = SyncReply> {
    let group = (
        any::<u64>(),
        vec(entry(), 0..4),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(conv, entries, checkpoint, has_more)| GroupPage {
            conv,
            entries,
            checkpoint,
            has_more,
        });
    (
        vec(sync_entry(), 0..6),
        any::<u64>(),
        any::<bool>(),
        proptest::option::of(any::<u64>()),
        vec(group, 0..3),
    )
        .prop_map(
            |(entries, checkpoint, has_more, truncated, groups)| SyncReply {
                entries,
                checkpoint,
                has_more,
                truncated,
                groups,
            },
        )
}

fn summary() -> impl Strategy<Value = ConvSummary> {
    (
        any::<u64>(),
        conv_kind(),
        any::<(u64, u64, u64)>(),
        any::<(bool, bool)>(),
    )
        .prop_map(
            |(conv, kind, (last_seq, read_seq, unread), (member, read_fanout))| ConvSummary {
                conv,
                kind,
                last_seq,
                read_seq,
                unread,
                member,
                read_fanout,
            },
        )
}

fn identity() -> impl Strategy<Value = Identity> {
    prop_oneof![
        Just(Identity::Anonymous),
        any::<u64>().prop_map(Identity::User),
        any::<u64>().prop_map(Identity::Admin),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    let a = prop_oneof![
        (any::<u16>(), any::<u32>(), identity()).prop_map(|(version, max_frame, identity)| {
            Response::Hello(HelloReply {
                version,
                max_frame,
                identity,
            })
        }),
        owned_bytes().prop_map(Response::Ping),
        vec(("[a-z._]{0,12}", any::<u64>()), 0..6).prop_map(Response::Stats),
        (
            any::<u64>(),
            any::<u32>(),
            vec(("[0-9.:]{0,21}", any::<u64>()), 0..6)
        )
            .prop_map(|(version, partitions, leaders)| Response::ClusterMap {
                version,
                partitions,
                leaders
            }),
        any::<u64>().prop_map(Response::Append),
        vec(any::<u64>(), 0..8).prop_map(Response::AppendBatch),
        proptest::option::of(record()).prop_map(Response::Get),
        vec(record(), 0..6).prop_map(Response::Scan),
        any::<u64>().prop_map(Response::LastSeq),
    ];
    let b = prop_oneof![
        (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(conv, seq, duplicate)| {
            Response::Send(SendAck {
                conv,
                seq,
                duplicate,
            })
        }),
        sync_reply().prop_map(Response::Sync),
        (vec(entry(), 0..6), any::<bool>())
            .prop_map(|(entries, has_more)| Response::History(HistoryPage { entries, has_more })),
        vec(summary(), 0..5).prop_map(Response::Conversations),
        any::<u64>().prop_map(Response::MarkRead),
        any::<u64>().prop_map(Response::Recall),
        any::<u64>().prop_map(Response::DeleteForUser),
    ];
    let c = prop_oneof![
        any::<u64>().prop_map(Response::CreateConversation),
        any::<u64>().prop_map(Response::AddMember),
        any::<u64>().prop_map(Response::RemoveMember),
        vec(any::<u64>(), 0..8).prop_map(Response::Members),
        Just(Response::Subscribe),
        Just(Response::Unsubscribe),
    ];
    prop_oneof![a, b, c]
}

fn push() -> impl Strategy<Value = Push> {
    prop_oneof![
        (any::<u64>(), sync_entry()).prop_map(|(user, entry)| Push::Entry { user, entry }),
        (any::<u64>(), entry()).prop_map(|(user, entry)| Push::Group { user, entry }),
        Just(Push::Resync),
    ]
}

fn error_reply() -> impl Strategy<Value = ErrorReply> {
    (any::<u16>(), any::<u64>(), "\\PC{0,24}")
        .prop_map(|(code, arg, message)| ErrorReply::new(ErrorCode(code), arg, message))
}

fn server_msg() -> impl Strategy<Value = ServerMsg> {
    prop_oneof![
        (any::<u64>(), response()).prop_map(|(id, response)| ServerMsg::Reply { id, response }),
        (any::<u64>(), any::<u16>(), error_reply()).prop_map(|(id, op, error)| {
            ServerMsg::Error {
                id,
                opcode: Opcode(op),
                error,
            }
        }),
        (any::<u64>(), push())
            .prop_map(|(subscription, push)| ServerMsg::Push { subscription, push }),
    ]
}

// -- helpers -----------------------------------------------------------------

const MAX: usize = DEFAULT_MAX_FRAME;

fn one_frame(b: &[u8]) -> Frame<'_> {
    let (f, used) = decode(b, MAX).unwrap().unwrap();
    assert_eq!(used, b.len());
    f
}

/// Every strict prefix of a frame asks for more bytes.
fn prefixes_need_more(b: &[u8]) {
    for n in 0..b.len() {
        assert_eq!(
            decode(&b[..n], MAX).unwrap(),
            None,
            "prefix {n} of {}",
            b.len()
        );
    }
}

/// Whatever decodes re-encodes to the very same bytes (the codec is strict).
fn reencode_is_identity(frame: &Frame<'_>, original: &[u8]) {
    let mut again = Vec::new();
    frame.encode_into(&mut again);
    assert_eq!(again, original);
    if let Ok(req) = RequestFrame::decode(frame) {
        let mut b = Vec::new();
        req.encode_into(&mut b);
        assert_eq!(b.len(), req.encoded_len());
        assert_eq!(b, original, "{req:?}");
        assert_eq!(RequestFrame::decode(&one_frame(&b)).unwrap(), req);
    }
    if let Ok(msg) = ServerMsg::decode(frame) {
        let mut b = Vec::new();
        msg.encode_into(&mut b);
        assert_eq!(b.len(), msg.encoded_len());
        assert_eq!(b, original, "{msg:?}");
        assert_eq!(ServerMsg::decode(&one_frame(&b)).unwrap(), msg);
    }
}

/// Decode a stream of frames until it needs more bytes or fails; check
/// each frame that decodes. Never panics.
fn chew(mut b: &[u8], max: usize) {
    while let Ok(Some((f, used))) = decode(b, max) {
        assert!(used >= HEADER_LEN && used <= b.len() && used <= max);
        reencode_is_identity(&f, &b[..used]);
        b = &b[used..];
    }
}

// -- properties --------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_request_round_trips(req in request(), id in 1u64..) {
        let mut b = Vec::new();
        req.encode_frame(id, &mut b);
        prop_assert_eq!(b.len(), req.encoded_len());
        prop_assert_eq!(peek_len(&b), Some(b.len() as u64));
        let f = one_frame(&b);
        prop_assert_eq!(f.header.opcode, req.opcode());
        prop_assert_eq!(f.header.kind().unwrap(), FrameKind::Request);
        let back = RequestFrame::decode(&f).unwrap();
        prop_assert_eq!(back.id, id);
        prop_assert_eq!(&back.request, &req);
        // A request is not a server message.
        prop_assert!(ServerMsg::decode(&f).is_err());
        prefixes_need_more(&b);
    }

    #[test]
    fn every_server_message_round_trips(msg in server_msg()) {
        let mut b = Vec::new();
        msg.encode_into(&mut b);
        prop_assert_eq!(b.len(), msg.encoded_len());
        let f = one_frame(&b);
        prop_assert_eq!(ServerMsg::decode(&f).unwrap(), msg);
        prop_assert!(RequestFrame::decode(&f).is_err());
        prefixes_need_more(&b);
    }

    #[test]
    fn pipelined_frames_decode_in_order(reqs in vec((request(), 1u64..), 1..12)) {
        let mut b = Vec::new();
        for (r, id) in &reqs {
            r.encode_frame(*id, &mut b);
        }
        let mut at = 0;
        for (r, id) in &reqs {
            let (f, used) = decode(&b[at..], MAX).unwrap().unwrap();
            let back = RequestFrame::decode(&f).unwrap();
            prop_assert_eq!((back.id, &back.request), (*id, r));
            at += used;
        }
        prop_assert_eq!(at, b.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in vec(any::<u8>(), 0..512), max in 0usize..1024) {
        chew(&b, max);
        chew(&b, MAX);
    }

    /// Garbage behind a plausible header reaches the body decoders.
    #[test]
    fn arbitrary_bodies_never_panic(
        op_idx in 0usize..Opcode::ALL.len(),
        raw_op: u16,
        use_raw: bool,
        flags in prop_oneof![Just(0u16), Just(1), Just(3), Just(4), any::<u16>()],
        id: u64,
        body in vec(any::<u8>(), 0..256),
    ) {
        let opcode = if use_raw { Opcode(raw_op) } else { Opcode::ALL[op_idx].0 };
        let mut b = Vec::new();
        Frame { header: Header { opcode, flags, request_id: id }, body: &body }.encode_into(&mut b);
        chew(&b, MAX);
    }

    /// Bit flips in valid frames: decode or fail cleanly, never panic.
    #[test]
    fn flipped_bits_never_panic(msg in server_msg(), req in request(), flips in vec(any::<(usize, u8)>(), 1..4)) {
        let mut b = Vec::new();
        msg.encode_into(&mut b);
        req.encode_frame(1, &mut b);
        for (at, x) in &flips {
            let n = b.len();
            b[at % n] ^= x | 1;
        }
        chew(&b, MAX);
    }
}

// -- examples ----------------------------------------------------------------

#[test]
fn append_request_golden_bytes() {
    let mut b = Vec::new();
    Request::Append {
        timeline: TimelineId::sync(7),
        durability: Some(Durability::GroupCommit),
        payload: b"hi",
    }
    .encode_frame(0x0102, &mut b);
    #[rustfmt::skip]
    let want: &[u8] = &[
        16, 0, 0, 0,                // len: 9 + 1 + 4 + 2
        0x10, 0x00,                 // opcode APPEND
        0x00, 0x00,                 // flags: request
        0x02, 0x01, 0, 0, 0, 0, 0, 0, // request id
        1,                          // keyspace sync
        7, 0, 0, 0, 0, 0, 0, 0,     // id
        2,                          // durability group
        2, 0, 0, 0, b'h', b'i',     // payload
    ];
    assert_eq!(b, want);
}

#[test]
fn error_reply_golden_bytes() {
    let mut b = Vec::new();
    ErrorReply::new(ErrorCode::TRUNCATED, 5, "gone").encode_frame(9, Opcode::SCAN, &mut b);
    #[rustfmt::skip]
    let want: &[u8] = &[
        18, 0, 0, 0,                // len: 2 + 8 + 4 + 4
        0x13, 0x00,                 // opcode SCAN
        0x03, 0x00,                 // flags: REPLY | ERROR
        9, 0, 0, 0, 0, 0, 0, 0,     // request id
        200, 0,                     // code TRUNCATED
        5, 0, 0, 0, 0, 0, 0, 0,     // arg: first_retained
        4, 0, 0, 0, b'g', b'o', b'n', b'e',
    ];
    assert_eq!(b, want);
}

#[test]
fn hello_golden_bytes() {
    let mut b = Vec::new();
    Request::Hello(Hello {
        version: PROTOCOL_VERSION,
        max_frame: 0,
        token: &[],
    })
    .encode_frame(1, &mut b);
    assert_eq!(
        &b[HEADER_LEN..],
        b"TMLN\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    );
    // A wrong magic is malformed, not fatal.
    b[HEADER_LEN] = b'X';
    let e = RequestFrame::decode(&one_frame(&b)).unwrap_err();
    assert_eq!(e.code(), ErrorCode::MALFORMED_FRAME);
    assert!(!e.is_fatal());
}

#[test]
fn push_frames_carry_the_subscription_id() {
    let mut b = Vec::new();
    encode_push_frame(77, &Push::Resync, &mut b);
    assert_eq!(
        b,
        [1, 0, 0, 0, 0x42, 0, 0x04, 0, 77, 0, 0, 0, 0, 0, 0, 0, 3]
    );
    assert_eq!(
        ServerMsg::decode(&one_frame(&b)).unwrap(),
        ServerMsg::Push {
            subscription: 77,
            push: Push::Resync
        }
    );
    // The PUSH flag on another opcode is malformed.
    b[4] = 0x40;
    assert!(ServerMsg::decode(&one_frame(&b)).is_err());
}

#[test]
fn unknown_opcode_is_answered_and_the_stream_goes_on() {
    let mut b = Vec::new();
    Frame {
        header: Header {
            opcode: Opcode(0x7abc),
            flags: 0,
            request_id: 5,
        },
        body: b"whatever",
    }
    .encode_into(&mut b);
    Request::Stats.encode_frame(6, &mut b);

    let (f, used) = decode(&b, MAX).unwrap().unwrap();
    let e = RequestFrame::decode(&f).unwrap_err();
    assert_eq!(e, ProtocolError::UnknownCommand(Opcode(0x7abc)));
    assert!(!e.is_fatal());
    // The server answers with the frame's id and opcode...
    let mut out = Vec::new();
    ErrorReply::from(&e).encode_frame(f.header.request_id, f.header.opcode, &mut out);
    match ServerMsg::decode(&one_frame(&out)).unwrap() {
        ServerMsg::Error { id, opcode, error } => {
            assert_eq!(
                (id, opcode, error.code),
                (5, Opcode(0x7abc), ErrorCode::UNKNOWN_COMMAND)
            );
        }
        m => panic!("{m:?}"),
    }
    // ...and reads the next request.
    let (f2, _) = decode(&b[used..], MAX).unwrap().unwrap();
    assert_eq!(
        RequestFrame::decode(&f2).unwrap(),
        RequestFrame {
            id: 6,
            request: Request::Stats
        }
    );
    // PUSH is not a request either.
    let mut p = Vec::new();
    Frame {
        header: Header {
            opcode: Opcode::PUSH,
            flags: 0,
            request_id: 1,
        },
        body: &[3],
    }
    .encode_into(&mut p);
    assert_eq!(
        RequestFrame::decode(&one_frame(&p)).unwrap_err(),
        ProtocolError::UnknownCommand(Opcode::PUSH)
    );
}

#[test]
fn oversized_frame_is_frame_too_large() {
    let mut b = Vec::new();
    Request::Append {
        timeline: TimelineId::store(1),
        durability: None,
        payload: &[0; 100],
    }
    .encode_frame(3, &mut b);
    let max = b.len() - 1;
    let e = decode(&b, max).unwrap_err();
    assert_eq!(e.code(), ErrorCode::FRAME_TOO_LARGE);
    assert!(e.is_fatal());
    // Known from the header alone, before the body arrives.
    assert_eq!(decode(&b[..HEADER_LEN], max).unwrap_err(), e);
    assert_eq!(ErrorReply::from(&e).arg, max as u64);
    assert!(decode(&b, max + 1).unwrap().is_some());
}

#[test]
fn malformed_bodies_are_not_fatal() {
    let cases: &[(Opcode, &[u8], &str)] = &[
        (Opcode::GET, &[0, 1, 0, 0, 0, 0, 0, 0, 0], "truncated body"),
        (
            Opcode::LAST_SEQ,
            &[2, 1, 0, 0, 0, 0, 0, 0, 0],
            "unknown keyspace",
        ),
        (Opcode::STATS, &[0], "trailing bytes"),
        (
            Opcode::APPEND_BATCH,
            &[0, 0xff, 0xff, 0xff, 0xff],
            "list count exceeds the body",
        ),
        (
            Opcode::APPEND,
            &[0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0],
            "unknown durability",
        ),
    ];
    for (op, body, why) in cases {
        let mut b = Vec::new();
        Frame {
            header: Header {
                opcode: *op,
                flags: 0,
                request_id: 1,
            },
            body,
        }
        .encode_into(&mut b);
        let e = RequestFrame::decode(&one_frame(&b)).unwrap_err();
        assert_eq!(e, ProtocolError::Malformed { opcode: *op, why });
        assert!(!e.is_fatal());
    }
}

#[test]
fn request_id_zero_and_reply_flags_are_refused_on_requests() {
    let mut b = Vec::new();
    Request::Stats.encode_frame(0, &mut b);
    assert!(matches!(
        RequestFrame::decode(&one_frame(&b)),
        Err(ProtocolError::Malformed { .. })
    ));
    let mut b = Vec::new();
    Response::Subscribe.encode_frame(4, &mut b);
    assert!(matches!(
        RequestFrame::decode(&one_frame(&b)),
        Err(ProtocolError::Malformed { .. })
    ));
}

#[test]
fn sync_reply_is_strict_about_first_retained() {
    let mut b = Vec::new();
    Response::Sync(SyncReply {
        truncated: Some(4),
        ..Default::default()
    })
    .encode_frame(1, &mut b);
    let f = HEADER_LEN + 8;
    assert_eq!(b[f], 0x02);
    // Clearing the flag while first_retained stays: refused, not guessed.
    b[f] = 0;
    assert!(ServerMsg::decode(&one_frame(&b)).is_err());
}

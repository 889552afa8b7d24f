//! The network targets speak `timeline_protocol`'s own wire types; the
//! workloads' bookkeeping (`imkit::Device`, the W2 page check) is written
//! on the engine's and the IM layer's. These translate at that edge, for
//! the server targets only (the in-process targets never convert).

use timeline_engine as e;
use timeline_im as im;
use timeline_server::protocol as p;

pub fn timeline(t: e::TimelineId) -> p::TimelineId {
    p::TimelineId::new(p::Keyspace(t.keyspace.0), t.id)
}

pub fn durability(d: e::Durability) -> p::Durability {
    match d {
        e::Durability::Buffered => p::Durability::Buffered,
        e::Durability::GroupCommit => p::Durability::GroupCommit,
        e::Durability::Sync => p::Durability::Sync,
    }
}

pub fn direction(d: e::Direction) -> p::Direction {
    match d {
        e::Direction::Forward => p::Direction::Forward,
        e::Direction::Backward => p::Direction::Backward,
    }
}

pub fn conv_kind(k: im::ConvKind) -> p::ConvKind {
    match k {
        im::ConvKind::Direct => p::ConvKind::Direct,
        im::ConvKind::Group => p::ConvKind::Group,
    }
}

pub fn records(v: Vec<p::Record>) -> Vec<e::Record> {
    v.into_iter()
        .map(|r| e::Record {
            seq: r.seq,
            timestamp_ms: r.timestamp_ms,
            payload: r.payload,
        })
        .collect()
}

fn body(b: p::Body) -> im::Body {
    match b {
        p::Body::Message(m) => im::Body::Message(m),
        p::Body::Recalled => im::Body::Recalled,
        p::Body::Deleted => im::Body::Deleted,
        p::Body::Created { kind } => im::Body::Created {
            kind: match kind {
                p::ConvKind::Direct => im::ConvKind::Direct,
                p::ConvKind::Group => im::ConvKind::Group,
            },
        },
        p::Body::MemberAdded(u) => im::Body::MemberAdded(u),
        p::Body::MemberRemoved(u) => im::Body::MemberRemoved(u),
        p::Body::Recall { target } => im::Body::Recall { target },
        p::Body::ReadMarker => im::Body::ReadMarker,
        p::Body::DeletedMarker => im::Body::DeletedMarker,
    }
}

fn entry(x: p::Entry) -> im::Entry {
    im::Entry {
        conv: x.conv,
        conv_seq: x.conv_seq,
        sender: x.sender,
        timestamp_ms: x.timestamp_ms,
        body: body(x.body),
    }
}

pub fn sync_reply(r: p::SyncReply) -> im::SyncReply {
    im::SyncReply {
        entries: r
            .entries
            .into_iter()
            .map(|x| im::SyncEntry {
                seq: x.seq,
                entry: entry(x.entry),
            })
            .collect(),
        checkpoint: r.checkpoint,
        has_more: r.has_more,
        truncated: r.truncated,
        groups: r
            .groups
            .into_iter()
            .map(|g| im::GroupPage {
                conv: g.conv,
                entries: g.entries.into_iter().map(entry).collect(),
                checkpoint: g.checkpoint,
                has_more: g.has_more,
            })
            .collect(),
    }
}

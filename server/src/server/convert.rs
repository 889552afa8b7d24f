//! Between the protocol's own wire types (`timeline_protocol::types`) and
//! the engine's and the IM layer's: the protocol crate knows neither, so
//! the server translates, field for field, at the edge. Nothing here
//! allocates beyond moving the payloads.

use crate::protocol as p;
use timeline_engine as e;
use timeline_im as im;

/// An engine or IM value as the wire carries it.
pub(crate) trait ToWire {
    type Wire;
    fn wire(self) -> Self::Wire;
}

/// A wire value as the engine or the IM layer takes it.
pub(crate) trait FromWire {
    type Native;
    fn native(self) -> Self::Native;
}

impl FromWire for p::TimelineId {
    type Native = e::TimelineId;
    fn native(self) -> e::TimelineId {
        e::TimelineId::new(e::Keyspace(self.keyspace.0), self.id)
    }
}

impl FromWire for p::Durability {
    type Native = e::Durability;
    fn native(self) -> e::Durability {
        match self {
            p::Durability::Buffered => e::Durability::Buffered,
            p::Durability::GroupCommit => e::Durability::GroupCommit,
            p::Durability::Sync => e::Durability::Sync,
        }
    }
}

impl FromWire for p::Direction {
    type Native = e::Direction;
    fn native(self) -> e::Direction {
        match self {
            p::Direction::Forward => e::Direction::Forward,
            p::Direction::Backward => e::Direction::Backward,
        }
    }
}

impl FromWire for p::HistoryFrom {
    type Native = im::HistoryFrom;
    fn native(self) -> im::HistoryFrom {
        match self {
            p::HistoryFrom::Before(s) => im::HistoryFrom::Before(s),
            p::HistoryFrom::After(s) => im::HistoryFrom::After(s),
        }
    }
}

impl FromWire for p::ConvKind {
    type Native = im::ConvKind;
    fn native(self) -> im::ConvKind {
        match self {
            p::ConvKind::Direct => im::ConvKind::Direct,
            p::ConvKind::Group => im::ConvKind::Group,
        }
    }
}

impl ToWire for im::ConvKind {
    type Wire = p::ConvKind;
    fn wire(self) -> p::ConvKind {
        match self {
            im::ConvKind::Direct => p::ConvKind::Direct,
            im::ConvKind::Group => p::ConvKind::Group,
        }
    }
}

impl ToWire for e::Record {
    type Wire = p::Record;
    fn wire(self) -> p::Record {
        p::Record {
            seq: self.seq,
            timestamp_ms: self.timestamp_ms,
            payload: self.payload,
        }
    }
}

impl<T: ToWire> ToWire for Vec<T> {
    type Wire = Vec<T::Wire>;
    fn wire(self) -> Vec<T::Wire> {
        self.into_iter().map(ToWire::wire).collect()
    }
}

impl<T: ToWire> ToWire for Option<T> {
    type Wire = Option<T::Wire>;
    fn wire(self) -> Option<T::Wire> {
        self.map(ToWire::wire)
    }
}

impl ToWire for im::Body {
    type Wire = p::Body;
    fn wire(self) -> p::Body {
        use im::Body as B;
        match self {
            B::Message(m) => p::Body::Message(m),
            B::Recalled => p::Body::Recalled,
            B::Deleted => p::Body::Deleted,
            B::Created { kind } => p::Body::Created { kind: kind.wire() },
            B::MemberAdded(u) => p::Body::MemberAdded(u),
            B::MemberRemoved(u) => p::Body::MemberRemoved(u),
            B::Recall { target } => p::Body::Recall { target },
            B::ReadMarker => p::Body::ReadMarker,
            B::DeletedMarker => p::Body::DeletedMarker,
        }
    }
}

impl ToWire for im::Entry {
    type Wire = p::Entry;
    fn wire(self) -> p::Entry {
        p::Entry {
            conv: self.conv,
            conv_seq: self.conv_seq,
            sender: self.sender,
            timestamp_ms: self.timestamp_ms,
            body: self.body.wire(),
        }
    }
}

impl ToWire for im::SyncEntry {
    type Wire = p::SyncEntry;
    fn wire(self) -> p::SyncEntry {
        p::SyncEntry {
            seq: self.seq,
            entry: self.entry.wire(),
        }
    }
}

impl ToWire for im::GroupPage {
    type Wire = p::GroupPage;
    fn wire(self) -> p::GroupPage {
        p::GroupPage {
            conv: self.conv,
            entries: self.entries.wire(),
            checkpoint: self.checkpoint,
            has_more: self.has_more,
        }
    }
}

impl ToWire for im::SyncReply {
    type Wire = p::SyncReply;
    fn wire(self) -> p::SyncReply {
        p::SyncReply {
            entries: self.entries.wire(),
            checkpoint: self.checkpoint,
            has_more: self.has_more,
            truncated: self.truncated,
            groups: self.groups.wire(),
        }
    }
}

impl ToWire for im::HistoryPage {
    type Wire = p::HistoryPage;
    fn wire(self) -> p::HistoryPage {
        p::HistoryPage {
            entries: self.entries.wire(),
            has_more: self.has_more,
        }
    }
}

impl ToWire for im::ConvSummary {
    type Wire = p::ConvSummary;
    fn wire(self) -> p::ConvSummary {
        p::ConvSummary {
            conv: self.conv,
            kind: self.kind.wire(),
            last_seq: self.last_seq,
            read_seq: self.read_seq,
            unread: self.unread,
            member: self.member,
            read_fanout: self.read_fanout,
        }
    }
}

impl ToWire for im::SendAck {
    type Wire = p::SendAck;
    fn wire(self) -> p::SendAck {
        p::SendAck {
            conv: self.conv,
            seq: self.seq,
            duplicate: self.duplicate,
        }
    }
}

impl ToWire for im::Push {
    type Wire = p::Push;
    fn wire(self) -> p::Push {
        match self {
            im::Push::Entry { user, entry } => p::Push::Entry {
                user,
                entry: entry.wire(),
            },
            im::Push::Group { user, entry } => p::Push::Group {
                user,
                entry: entry.wire(),
            },
            im::Push::Resync => p::Push::Resync,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_enums_keep_their_values_across_the_edge() {
        let t = p::TimelineId::new(p::Keyspace(7), 42).native();
        assert_eq!((t.keyspace, t.id), (e::Keyspace(7), 42));
        assert_eq!(p::Durability::Sync.native(), e::Durability::Sync);
        assert_eq!(p::Direction::Backward.native(), e::Direction::Backward);
        assert_eq!(p::HistoryFrom::After(3).native(), im::HistoryFrom::After(3));
        assert_eq!(p::ConvKind::Group.native().wire(), p::ConvKind::Group);
        let b = im::Body::Created {
            kind: im::ConvKind::Direct,
        };
        assert_eq!(
            b.wire(),
            p::Body::Created {
                kind: p::ConvKind::Direct
            }
        );
    }
}

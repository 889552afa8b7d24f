//! The stable number tables: command codes (opcodes) and error codes.
//!
//! A number, once published, keeps its meaning forever. A command or error
//! that is withdrawn moves to [`RETIRED_OPCODES`] / [`RETIRED_ERRORS`] and its
//! number is never handed out again (a test checks that no live code is
//! retired and no two codes share a number; another pins every value).
//! Both are `u16` newtypes rather than enums so that a peer speaking a newer
//! table (an opcode this build does not know, an error code added later)
//! still decodes: an unknown opcode is answered with `UNKNOWN_COMMAND`, an
//! unknown error code is shown by number.

use std::fmt;

macro_rules! code_table {
    ($ty:ident { $($(#[$m:meta])* $name:ident = $val:expr,)* }) => {
        impl $ty {
            $($(#[$m])* pub const $name: $ty = $ty($val);)*
            /// Every live code with its name, in the order of the table.
            pub const ALL: &'static [($ty, &'static str)] = &[$(($ty::$name, stringify!($name)),)*];
        }
    };
}

/// A command code: the `opcode` field of a frame header. A request and its
/// reply (or error) carry the same opcode.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Opcode(pub u16);

code_table!(Opcode {
    // 0x0000 is never a command: connection-level errors (not about any
    // request) are sent with opcode 0 and request id 0.
    // -- session: 0x0001..=0x000F
    /// Version handshake and credentials; the first frame of a connection.
    HELLO = 0x0001,
    /// Echoes its body.
    PING = 0x0002,
    /// Engine, IM-layer and server counters as key/value pairs.
    STATS = 0x0003,
    // -- raw timelines: 0x0010..=0x001F
    APPEND = 0x0010,
    APPEND_BATCH = 0x0011,
    GET = 0x0012,
    SCAN = 0x0013,
    LAST_SEQ = 0x0014,
    // -- IM messaging: 0x0020..=0x002F
    SEND = 0x0020,
    SYNC = 0x0021,
    HISTORY = 0x0022,
    CONVERSATIONS = 0x0023,
    MARK_READ = 0x0024,
    RECALL = 0x0025,
    /// Delete a message for one user only (`Im::delete_for_user`).
    DELETE_FOR_USER = 0x0026,
    // -- membership: 0x0030..=0x003F
    CREATE_CONVERSATION = 0x0030,
    ADD_MEMBER = 0x0031,
    REMOVE_MEMBER = 0x0032,
    MEMBERS = 0x0033,
    // -- push: 0x0040..=0x004F
    SUBSCRIBE = 0x0040,
    UNSUBSCRIBE = 0x0041,
    /// Server to client only: a pushed entry of a subscription.
    PUSH = 0x0042,
    // -- cluster: 0x0050..=0x005F
    /// A cluster node's partition map and the leaders it knows.
    CLUSTER_MAP = 0x0050,
});

/// Opcodes that were once assigned and must never be reused:
/// `(code, what it was, why it went)`. Empty: nothing has been retired yet.
pub const RETIRED_OPCODES: &[(u16, &str, &str)] = &[];

impl Opcode {
    /// The opcode's name, if this build knows it.
    pub fn name(self) -> Option<&'static str> {
        Self::ALL.iter().find(|(c, _)| *c == self).map(|(_, n)| *n)
    }
    /// A command a client may send (every live opcode but `PUSH`).
    pub fn is_request(self) -> bool {
        self != Opcode::PUSH && self.name().is_some()
    }
}

impl fmt::Debug for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}"),
            None => write!(f, "Opcode({:#06x})", self.0),
        }
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// An error code: the first field of an error reply. Each code says what
/// its reply's `arg` field holds (0 where nothing is said).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ErrorCode(pub u16);

code_table!(ErrorCode {
    // -- protocol and session: 1..=99
    /// The opcode is not a command this server knows. The connection stays up.
    UNKNOWN_COMMAND = 1,
    /// The frame's body (or flags, or request id) does not decode. The
    /// connection stays up: framing is intact.
    MALFORMED_FRAME = 2,
    /// The frame's length is above the limit; `arg` = the limit in bytes.
    /// The server closes the connection after this reply.
    FRAME_TOO_LARGE = 3,
    /// HELLO asked for a protocol version this server does not speak;
    /// `arg` = the version it speaks. Then the connection is closed.
    UNSUPPORTED_VERSION = 4,
    /// A command before a successful HELLO. Then the connection is closed.
    HANDSHAKE_REQUIRED = 5,
    /// The credentials are missing, malformed, badly signed or expired.
    /// Then the connection is closed.
    UNAUTHORIZED = 6,
    /// Valid credentials that do not allow this command on this user or
    /// conversation (auth on only).
    FORBIDDEN = 7,
    /// The reply would exceed the client's max frame size; `arg` = that
    /// limit. Nothing was changed by a read; ask for a smaller page.
    RESPONSE_TOO_LARGE = 8,
    /// The server has its maximum number of connections; sent with request
    /// id 0 before closing.
    TOO_MANY_CONNECTIONS = 9,
    /// The connection was idle or too slow for too long; sent with request
    /// id 0 before closing.
    TIMEOUT = 10,
    /// The server (or the engine under it) is shutting down.
    CLOSED = 11,
    /// A server bug or an unexpected failure; the message says more.
    INTERNAL = 12,
    // -- arguments: 100..=199
    /// An argument outside its domain (seq 0, an id above 2^63 - 1, a direct
    /// conversation without exactly two members, an unknown subscription...).
    INVALID_ARGUMENT = 100,
    /// A payload above the engine's limit; `arg` = the limit in bytes.
    PAYLOAD_TOO_LARGE = 101,
    // -- storage engine: 200..=299
    /// The requested seqs were dropped by retention (TTL); `arg` =
    /// first_retained, where data starts now. Roam, then resume there.
    TRUNCATED = 200,
    /// An I/O error on the server's disk.
    IO_ERROR = 201,
    /// The disk is full.
    STORAGE_FULL = 202,
    /// Damaged data on the server's disk (checksum, format version, an
    /// undecodable IM record).
    CORRUPTION = 203,
    /// An earlier write failed; the shard refuses writes until the server
    /// restarts (nothing acknowledged is at risk).
    POISONED = 204,
    // -- IM layer: 300..=399
    /// `arg` = the conversation.
    NO_SUCH_CONVERSATION = 300,
    /// `arg` = the conversation.
    CONVERSATION_EXISTS = 301,
    /// `arg` = the user.
    NOT_MEMBER = 302,
    /// `arg` = the user.
    ALREADY_MEMBER = 303,
    /// The message is stored at seq `arg` (it is in the history); its
    /// delivery to the members' sync timelines is pending and the server
    /// retries it by itself. Retry with the same client message id to learn
    /// when it is done; never resend under a new one.
    FANOUT_FAILED = 304,
    // -- cluster: 400..=499
    /// Another node leads the timeline's partition. `arg` = the partition
    /// map version; the message is `"<partition> <host:port>"`, the
    /// leader's client address (as Redis Cluster's `MOVED`). Nothing was
    /// done: send the request there.
    MOVED = 400,
    /// The timeline's partition is electing a leader (or has lost its
    /// quorum); `arg` = the partition. Nothing was done; retry shortly.
    NO_LEADER = 401,
    /// The command is not served in this server's mode (IM commands and
    /// `APPEND_BATCH` on a cluster node, `CLUSTER_MAP` on a single node);
    /// nothing was done.
    NOT_SUPPORTED = 402,
    /// The node lost the partition's leadership while the write was in
    /// flight: it may or may not be applied (a new leader may still commit
    /// it). `arg` = the partition. Read the timeline before retrying.
    UNCERTAIN = 403,
});

/// Error codes that were once assigned and must never be reused:
/// `(code, what it was, why it went)`. Empty: nothing has been retired yet.
pub const RETIRED_ERRORS: &[(u16, &str, &str)] = &[];

impl ErrorCode {
    pub fn name(self) -> Option<&'static str> {
        Self::ALL.iter().find(|(c, _)| *c == self).map(|(_, n)| *n)
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}"),
            None => write!(f, "ErrorCode({})", self.0),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn check_table(live: &[(u16, &str)], retired: &[(u16, &str, &str)]) {
        let mut seen = HashSet::new();
        for (c, n) in live {
            assert_ne!(*c, 0, "{n}: 0 is reserved");
            assert!(seen.insert(*c), "{n}: number {c:#x} used twice");
        }
        for (c, n, _) in retired {
            assert!(
                seen.insert(*c),
                "retired {n}: number {c:#x} is live or retired twice"
            );
        }
    }

    #[test]
    fn no_number_is_used_twice_or_reused_after_retirement() {
        let ops: Vec<_> = Opcode::ALL.iter().map(|(c, n)| (c.0, *n)).collect();
        check_table(&ops, RETIRED_OPCODES);
        let errs: Vec<_> = ErrorCode::ALL.iter().map(|(c, n)| (c.0, *n)).collect();
        check_table(&errs, RETIRED_ERRORS);
    }

    /// The published numbers. Changing one breaks every deployed client:
    /// retire the old number and add a new one instead of editing this list.
    #[test]
    fn numbers_are_pinned() {
        let ops: Vec<(&str, u16)> = Opcode::ALL.iter().map(|(c, n)| (*n, c.0)).collect();
        assert_eq!(
            ops,
            [
                ("HELLO", 0x0001),
                ("PING", 0x0002),
                ("STATS", 0x0003),
                ("APPEND", 0x0010),
                ("APPEND_BATCH", 0x0011),
                ("GET", 0x0012),
                ("SCAN", 0x0013),
                ("LAST_SEQ", 0x0014),
                ("SEND", 0x0020),
                ("SYNC", 0x0021),
                ("HISTORY", 0x0022),
                ("CONVERSATIONS", 0x0023),
                ("MARK_READ", 0x0024),
                ("RECALL", 0x0025),
                ("DELETE_FOR_USER", 0x0026),
                ("CREATE_CONVERSATION", 0x0030),
                ("ADD_MEMBER", 0x0031),
                ("REMOVE_MEMBER", 0x0032),
                ("MEMBERS", 0x0033),
                ("SUBSCRIBE", 0x0040),
                ("UNSUBSCRIBE", 0x0041),
                ("PUSH", 0x0042),
                ("CLUSTER_MAP", 0x0050),
            ]
        );
        let errs: Vec<(&str, u16)> = ErrorCode::ALL.iter().map(|(c, n)| (*n, c.0)).collect();
        assert_eq!(
            errs,
            [
                ("UNKNOWN_COMMAND", 1),
                ("MALFORMED_FRAME", 2),
                ("FRAME_TOO_LARGE", 3),
                ("UNSUPPORTED_VERSION", 4),
                ("HANDSHAKE_REQUIRED", 5),
                ("UNAUTHORIZED", 6),
                ("FORBIDDEN", 7),
                ("RESPONSE_TOO_LARGE", 8),
                ("TOO_MANY_CONNECTIONS", 9),
                ("TIMEOUT", 10),
                ("CLOSED", 11),
                ("INTERNAL", 12),
                ("INVALID_ARGUMENT", 100),
                ("PAYLOAD_TOO_LARGE", 101),
                ("TRUNCATED", 200),
                ("IO_ERROR", 201),
                ("STORAGE_FULL", 202),
                ("CORRUPTION", 203),
                ("POISONED", 204),
                ("NO_SUCH_CONVERSATION", 300),
                ("CONVERSATION_EXISTS", 301),
                ("NOT_MEMBER", 302),
                ("ALREADY_MEMBER", 303),
                ("FANOUT_FAILED", 304),
                ("MOVED", 400),
                ("NO_LEADER", 401),
                ("NOT_SUPPORTED", 402),
                ("UNCERTAIN", 403),
            ]
        );
    }

    #[test]
    fn names_and_unknown_codes_print() {
        assert_eq!(Opcode::SCAN.to_string(), "SCAN");
        assert_eq!(Opcode(0x7777).to_string(), "Opcode(0x7777)");
        assert!(!Opcode::PUSH.is_request());
        assert!(Opcode::HELLO.is_request());
        assert!(!Opcode(0).is_request());
        assert_eq!(ErrorCode::TRUNCATED.to_string(), "TRUNCATED");
        assert_eq!(ErrorCode(999).to_string(), "ErrorCode(999)");
    }
}

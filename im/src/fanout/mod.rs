//! The lock-free hand-off between fan-out workers: bounded mailboxes with
//! backpressure ([`mailbox`]) on a lock-free ring ([`ring`]), and the marks readers and recovery trust
//! ([`watermark`]). Everything here is built on the [`crate::sync`] facade
//! and model-checked by the `loom` tests (`RUSTFLAGS="--cfg loom" cargo test
//! -p timeline-im --release loom`).

pub(crate) mod mailbox;
pub(crate) mod ring;
pub(crate) mod watermark;

#[cfg(all(test, loom))]
#[allow(clippy::unwrap_used)]
mod loom_tests;

//! The io_uring engine: one ring per virtqueue, owned by that queue's worker thread.
//!
//! Owns: ring setup (registered image files, a completion eventfd, an opcode allowlist), the
//! submission backlog for when the SQ is full, and reaping completions. It does not know
//! virtio: the queue worker (`crate::worker`) turns requests into ops and ops' results into
//! statuses.

mod ring;

pub use ring::{EngineError, QueueRing};

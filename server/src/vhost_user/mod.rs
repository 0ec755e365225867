//! The vhost-user side: the frontend's messages (memory table, vrings, features, config) and
//! where the connection comes from (a listening path, an inherited fd, or connecting out).
//!
//! Built on the `vhost` crate's `BackendReqHandler`, which parses messages, with vublk's own
//! [`handler::BlkHandler`] answering them: vhost-user-backend's daemon cannot adopt an
//! already-connected socket, send config-change messages or track inflight descriptors,
//! all of which vublk needs. Its `VringMutex` holds each queue's vring state.

pub mod backend_channel;
pub mod connection;
pub mod handler;
pub mod inflight;

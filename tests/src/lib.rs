//! Shared fixtures for vublk's integration tests, end-to-end tests and benchmark.
//!
//! Owns: locating the built binaries, spawning a backend daemon (vublk or the incumbent,
//! qemu-storage-daemon) on a unix socket and waiting until that socket accepts connections,
//! and killing it when the fixture is dropped. It knows nothing about virtio-blk itself.

pub mod daemon;

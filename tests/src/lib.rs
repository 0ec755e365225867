//! Shared fixtures for vublk's integration tests, end-to-end tests and benchmark.
//!
//! Owns: locating the built binaries, spawning a backend daemon (vublk or the incumbent,
//! qemu-storage-daemon) on a unix socket and waiting until that socket accepts connections,
//! a small synchronous vhost-user-blk client on the `blkio` crate, a minimal split-virtqueue
//! driver for protocol tests, and the QEMU guest used by the end-to-end tests. It knows nothing
//! about vublk's internals: everything here talks to a daemon from the outside.

pub mod blk;
pub mod daemon;
pub mod guest;
pub mod hostile;
pub mod images;
pub mod qmp;
pub mod vring;

/// Defines `mod <scenario> { fn vublk(); fn qsd(); }` tests calling `<scenario>(kind)`, so one
/// scenario runs against vublk and, as a check of the test itself, against qemu-storage-daemon.
#[macro_export]
macro_rules! both_backends {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use $crate::daemon::BackendKind;

            #[test]
            fn vublk() {
                super::$scenario(BackendKind::Vublk)
            }

            #[test]
            fn qsd() {
                super::$scenario(BackendKind::Qsd)
            }
        }
    )*};
}

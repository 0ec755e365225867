//! `vublk serve`: setup in order (config -> disk -> vhost-user socket -> ready), then serving
//! until SIGTERM or SIGINT, then draining and flushing.

use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::args::ServeArgs;
use crate::config::ServeConfig;
use crate::disk::Disk;
use crate::vhost_user::connection::{self, Endpoint, Shutdown};

/// Largest allocation served from the heap rather than its own mmap. Request buffers (bounces,
/// the copies of writes handed to the metadata thread, clusters) are up to a few MiB and come
/// and go per request: with glibc's default threshold (128 KiB, adjusted upwards only after a
/// free) each would cost page faults to allocate and a TLB shootdown across threads to free.
const HEAP_ALLOCATION_LIMIT: libc::c_int = 64 << 20;

pub fn run(args: ServeArgs) -> Result<()> {
    // SAFETY: mallopt only changes allocator tuning; it is called before any thread exists.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_ALLOCATION_LIMIT) } != 1 {
        log::warn!("could not raise the mmap threshold; large request buffers will be mmapped");
    }
    let config = ServeConfig::try_from(args)?;
    // Block the termination signals before any thread exists, so every thread inherits the
    // mask and only the signalfd below sees them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().context("blocking SIGTERM/SIGINT")?;
    let signal_fd =
        SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC).context("creating a signalfd")?;

    // Before anything is opened or bound: without io_uring there is nothing to serve with.
    io_uring_probe()?;
    let disk = Arc::new(Disk::open(&config.disk, &config.device)?);
    let endpoint = Endpoint::prepare(&config.device.socket)?;
    log::info!(
        "serving {} ({} bytes, {}{}) with {} queue(s) of {}",
        config.disk.image,
        disk.params().capacity_bytes,
        disk.layer().format(),
        if disk.params().read_only {
            ", read-only"
        } else {
            ""
        },
        config.device.num_queues,
        config.device.queue_size,
    );
    if let Some(fd) = config.ready_fd {
        announce_ready(fd)?;
    }

    let shutdown = Shutdown::new()?;
    let server = {
        let disk = Arc::clone(&disk);
        let shutdown = shutdown.clone();
        std::thread::Builder::new()
            .name("vublk-vhost-user".into())
            .spawn(move || connection::serve(endpoint, &disk, &shutdown))
            .context("starting the vhost-user thread")?
    };

    let signal = loop {
        match signal_fd.read_signal() {
            Ok(Some(info)) => break info.ssi_signo,
            Ok(None) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e).context("reading the signalfd"),
        }
    };
    log::info!("signal {signal}: draining in-flight requests and flushing");
    shutdown.request();
    if server.join().is_err() {
        log::error!("the vhost-user thread panicked");
    }
    disk.sync().context("flushing the disk on shutdown")?;
    log::info!("stopped cleanly");
    Ok(())
}

/// Fails at startup, with a message that says why, when io_uring cannot be used here.
fn io_uring_probe() -> Result<()> {
    crate::engine::QueueRing::new(0, 4, &[], 0)
        .map(drop)
        .context("vublk needs io_uring")
}

/// Writes "READY=1\n" to the manager's fd and closes it.
fn announce_ready(fd: i32) -> Result<()> {
    // SAFETY: --ready-fd names an fd the manager passed for this purpose (checked > 2 by
    // ServeConfig); vublk owns it from here and closes it after the write.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(b"READY=1\n")
        .with_context(|| format!("--ready-fd {fd}: cannot write"))
}

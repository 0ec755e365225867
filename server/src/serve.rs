//! `vublk serve`: setup in order (config -> fds -> disk -> vhost-user and control sockets ->
//! ready), then serving until `quit`, SIGTERM or SIGINT, then draining and flushing.

use std::collections::HashSet;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::args::ServeArgs;
use crate::config::ServeConfig;
use crate::control::{self, ControlEndpoint};
use crate::device::Device;
use crate::disk::{CorruptionHook, Disk};
use crate::events::{Event, Events};
use crate::fds::{ManagerFds, SetupSource};
use crate::vhost_user::connection::{self, Endpoint, Shutdown};
use crate::virtio_blk::features::DeviceParams;
use crate::virtio_blk::VIRTIO_BLK_ID_BYTES;

/// Largest allocation served from the heap rather than its own mmap. Request buffers (bounces,
/// the copies of writes handed to the metadata thread, clusters) are up to a few MiB and come
/// and go per request: with glibc's default threshold (128 KiB, adjusted upwards only after a
/// free) each would cost page faults to allocate and a TLB shootdown across threads to free.
const HEAP_ALLOCATION_LIMIT: libc::c_int = 64 << 20;

/// Reports a layer's corruption to the manager as `BLOCK_IMAGE_CORRUPTED`.
pub fn corruption_hook(events: &Arc<Events>, device: &str) -> CorruptionHook {
    let events = Arc::clone(events);
    let device = device.to_string();
    Arc::new(move |msg: String| {
        events.emit(Event::BlockImageCorrupted {
            device: device.clone(),
            node_name: device.clone(),
            msg,
            fatal: true,
        })
    })
}

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
    let signal_fd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("creating a signalfd")?;

    // Before anything is opened or bound: without io_uring there is nothing to serve with.
    io_uring_probe()?;
    let events = Arc::new(Events::new().context("creating the event queue")?);
    let mut fds = ManagerFds::from_command_line(&config.add_fds)?;
    let disk = Disk::open(
        &config.disk,
        &mut SetupSource {
            fds: &mut fds,
            adopted: HashSet::new(),
        },
        corruption_hook(&events, &config.id),
    )?;
    log::info!(
        "serving {} ({} bytes, {}{}) with {} queue(s) of {}",
        config.disk.image,
        disk.capacity_bytes(),
        disk.layer()
            .map(|l| l.format().to_string())
            .unwrap_or_default(),
        if disk.read_only() { ", read-only" } else { "" },
        config.device.num_queues,
        config.device.queue_size,
    );
    let params = DeviceParams {
        capacity_bytes: disk.capacity_bytes(),
        logical_block_size: config.disk.logical_block_size,
        read_only: config.disk.read_only,
        discard: config.disk.discard,
        num_queues: config.device.num_queues,
        queue_size: config.device.queue_size,
    };
    let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
    serial[..config.disk.serial.len()].copy_from_slice(&config.disk.serial);
    let device = Arc::new(Device::new(
        config.id.clone(),
        params,
        serial,
        disk,
        Arc::clone(&events),
    ));
    let endpoint = Endpoint::prepare(&config.device.socket)?;
    let control_endpoint = config
        .control
        .as_ref()
        .map(ControlEndpoint::prepare)
        .transpose()?;
    if let Some(fd) = config.ready_fd {
        announce_ready(fd)?;
    }

    let shutdown = Shutdown::new()?;
    let server = {
        let device = Arc::clone(&device);
        let shutdown = shutdown.clone();
        std::thread::Builder::new()
            .name("vublk-vhost-user".into())
            .spawn(move || connection::serve(endpoint, &device, &shutdown))
            .context("starting the vhost-user thread")?
    };
    let control_thread = match control_endpoint {
        Some(endpoint) => Some(control::spawn(
            endpoint,
            Arc::clone(&device),
            fds,
            config.disk.clone(),
            shutdown.clone(),
        )?),
        None => None,
    };

    let signal_or_quit = shutdown.wait_for_signal_or_request(&signal_fd);
    match signal_or_quit {
        Some(signal) => log::info!("signal {signal}: draining in-flight requests and flushing"),
        None => log::info!("quit: draining in-flight requests and flushing"),
    }
    shutdown.request();
    if server.join().is_err() {
        log::error!("the vhost-user thread panicked");
    }
    if let Some(thread) = control_thread {
        if thread.join().is_err() {
            log::error!("the control thread panicked");
        }
    }
    device.sync().context("flushing the disk on shutdown")?;
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

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
use crate::config::{ControlSocket, VhostUserSocket};
use crate::control::{self, ControlEndpoint};
use crate::device::Device;
use crate::disk::{CorruptionHook, Disk};
use crate::events::{Event, Events};
use crate::fds::{ManagerFds, SetupSource};
use crate::sandbox;
use crate::sandbox::notify::Notifier;
use crate::sandbox::seccomp::{self, Role};
use crate::vhost_user::connection::{self, Endpoint, Shutdown};
use crate::virtio_blk::features::DeviceParams;
use crate::virtio_blk::VIRTIO_BLK_ID_BYTES;
use std::os::fd::RawFd;
use vublk_fdset::FileSpec;

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

/// The fds open in this process now.
fn open_fds() -> Result<Vec<RawFd>> {
    let mut fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .context("listing /proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    fds.sort_unstable();
    // The listing's own directory fd is in it, and closed by now.
    // SAFETY: F_GETFD on a number only reads the descriptor table.
    fds.retain(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
    Ok(fds)
}

/// The inherited fds vublk takes over (everything else inherited is closed when confining).
fn adopted_fds(config: &ServeConfig) -> Vec<RawFd> {
    let mut fds: Vec<RawFd> = config.add_fds.iter().map(|a| a.fd).collect();
    if let Some(medium) = &config.medium {
        let files = std::iter::once(&medium.image).chain(medium.backing.iter().map(|b| &b.file));
        fds.extend(files.filter_map(|f| match f {
            FileSpec::Fd(fd) => Some(*fd),
            _ => None,
        }));
    }
    if let VhostUserSocket::Inherited(fd) = config.device.socket {
        fds.push(fd);
    }
    if let Some(ControlSocket::Inherited(fd)) = config.control {
        fds.push(fd);
    }
    fds.extend(config.ready_fd);
    fds
}

pub fn run(args: ServeArgs) -> Result<()> {
    // Before vublk opens anything: what it inherited.
    let inherited = open_fds()?;
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
    sandbox::open_label_source().map_err(|e| anyhow::anyhow!("svirt: {e}"))?;
    let events = Arc::new(Events::new().context("creating the event queue")?);
    let mut fds = ManagerFds::from_command_line(&config.add_fds)?;
    let disk = match &config.medium {
        Some(medium) => Disk::open(
            medium,
            &mut SetupSource {
                fds: &mut fds,
                adopted: HashSet::new(),
            },
            corruption_hook(&events, &config.id),
        )?,
        None => Disk::empty(),
    };
    log::info!(
        "serving {} ({} bytes, {}{}) with {} queue(s) of {}",
        config
            .medium
            .as_ref()
            .map_or_else(|| "no medium".to_string(), |m| m.image.to_string()),
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
    let notifier = Notifier::from_env().context("connecting to $NOTIFY_SOCKET")?;
    let shutdown = Shutdown::new()?;

    if config.vmm_uid.is_some()
        && config.sandbox != crate::args::SandboxArg::Off
        && !nix::unistd::geteuid().is_root()
    {
        anyhow::bail!(
            "--vmm-uid cannot be checked by an unprivileged vublk: its own user namespace shows every other uid as 65534; start vublk as root (with --user), or rely on the socket file's owner and mode"
        );
    }
    // Confine while single-threaded: Landlock and namespaces hold for the calling thread and
    // every thread it starts afterwards.
    let adopted = adopted_fds(&config);
    let close: Vec<RawFd> = inherited
        .iter()
        .copied()
        .filter(|fd| *fd > 2 && !adopted.contains(fd))
        .collect();
    let keep: Vec<RawFd> = open_fds()?
        .into_iter()
        .filter(|fd| !close.contains(fd))
        .collect();
    sandbox::confine(&sandbox::Plan {
        mode: config.sandbox,
        user: config.user,
        close,
        keep,
    })?;
    device.disk().0.start()?;
    let server = {
        let device = Arc::clone(&device);
        let shutdown = shutdown.clone();
        let vmm_uid = config.vmm_uid;
        std::thread::Builder::new()
            .name("vublk-vhost-user".into())
            .spawn(move || {
                seccomp::enter(Role::VhostUser);
                connection::serve(endpoint, &device, &shutdown, vmm_uid)
            })
            .context("starting the vhost-user thread")?
    };
    let control_thread = match control_endpoint {
        Some(endpoint) => Some(control::spawn(
            endpoint,
            Arc::clone(&device),
            fds,
            config.disk.clone(),
            shutdown.clone(),
            config.medium.is_none(),
        )?),
        None => None,
    };
    if let Some(fd) = config.ready_fd {
        announce_ready(fd)?;
    }
    if let Some(n) = &notifier {
        n.ready().context("sending READY=1 to $NOTIFY_SOCKET")?;
    }
    seccomp::enter(Role::Main);

    let signal_or_quit = shutdown.wait_for_signal_or_request(&signal_fd);
    match signal_or_quit {
        Some(signal) => log::info!("signal {signal}: draining in-flight requests and flushing"),
        None => log::info!("quit: draining in-flight requests and flushing"),
    }
    // Drain while the VMM is connected, so it sees every completion (and its interrupt)
    // before the connection closes; a VMM that reconnects to the next vublk then has nothing
    // outstanding that this one took.
    device.drain_for_exit();
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

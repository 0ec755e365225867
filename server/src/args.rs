//! The command line, as clap parses it. Doc comments are the help text; nothing here is
//! validated beyond its syntax: `config.rs` turns [`ServeArgs`] into a checked `ServeConfig`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// vublk: a confined, per-VM vhost-user-blk storage daemon that serves disk images from file
/// descriptors its manager passes.
#[derive(Debug, Parser)]
#[command(name = "vublk", version, about)]
pub struct Cli {
    /// Print the vhost-user backend capabilities as JSON and exit (vhost-user backend program
    /// conventions).
    #[arg(long)]
    pub print_capabilities: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a disk image to a VMM over vhost-user-blk.
    Serve(Box<ServeArgs>),
    /// Print what an image's header says (qemu-img info's JSON keys), from a bounded read.
    Probe(ProbeArgs),
    /// Print the seccomp allowlist of each thread role as JSON.
    #[command(name = "x-seccomp-allowlist", hide = true)]
    XSeccompAllowlist,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The image: fd:N or a path.
    #[arg(value_name = "FILE")]
    pub file: String,

    /// Take the image as this format instead of detecting it.
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Raw,
    Qcow2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CacheArg {
    /// O_DIRECT: bypass the host page cache (an fd must already have O_DIRECT).
    None,
    /// Use the host page cache.
    Writeback,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SandboxArg {
    On,
    Weak,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiscardArg {
    /// Pass discards down (punch holes).
    Unmap,
    /// Do not offer discard to the guest.
    Ignore,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The top image: fd:N (an inherited fd), /dev/fdset/N, or a path (opened during setup).
    /// May be left out with --control: vublk then starts with no medium, and the manager
    /// inserts one with blockdev-change-medium.
    #[arg(long, alias = "blk-file", value_name = "FILE")]
    pub image: Option<String>,

    /// Format of --image. Required: a writable disk's format is never probed.
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,

    /// A backing layer as FILE,format=raw|qcow2; repeatable, in chain order (the image's own
    /// backing file first). Backing layers are opened read-only; the names written inside the
    /// images are reported, never opened.
    #[arg(long, value_name = "FILE,format=F")]
    pub backing: Vec<String>,

    /// Serve the disk read-only.
    #[arg(long)]
    pub read_only: bool,

    /// Host cache mode; for an fd, defaults to the fd's own O_DIRECT flag; for a path, writeback.
    #[arg(long, value_enum)]
    pub cache: Option<CacheArg>,

    /// Discard handling; `--discard` alone means `unmap`.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "unmap", default_value = "ignore")]
    pub discard: DiscardArg,

    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    #[arg(long)]
    pub serial: Option<String>,

    /// Logical block size the guest sees: 512 or 4096.
    #[arg(long, default_value_t = 512)]
    pub logical_block_size: u32,

    /// Listen for the VMM on this unix socket path.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["fd", "connect"])]
    pub socket_path: Option<PathBuf>,

    /// Inherited unix socket: listening (accepted on) or already connected (served).
    #[arg(long, value_name = "N", conflicts_with = "connect")]
    pub fd: Option<i32>,

    /// Connect to a VMM listening at PATH; reconnect when the connection is lost.
    #[arg(long, value_name = "PATH")]
    pub connect: Option<PathBuf>,

    /// Number of virtqueues (default: one per host CPU, at most 8).
    #[arg(long)]
    pub num_queues: Option<u16>,

    /// Size of each virtqueue.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,

    /// QMP control socket for the manager: a path to listen at, or fd:N (an inherited
    /// listening or connected unix socket).
    #[arg(long, value_name = "PATH|fd:N")]
    pub control: Option<String>,

    /// Put inherited fd N into fd set S, with an optional opaque text (QEMU's -add-fd);
    /// repeatable. The image and backing files may then be given as /dev/fdset/S.
    #[arg(long, value_name = "fd=N,set=S[,opaque=TEXT]")]
    pub add_fd: Vec<String>,

    /// Confinement: `on` (default) applies every layer and refuses to start if one cannot be;
    /// `weak` applies what this kernel and these privileges allow and says what is missing;
    /// `off` applies none (debugging only). Also read from $VUBLK_SANDBOX.
    #[arg(long, value_enum, default_value = "on", env = "VUBLK_SANDBOX")]
    pub sandbox: SandboxArg,

    /// Drop to this identity while confining (when started as root).
    #[arg(long, value_name = "UID[:GID]")]
    pub user: Option<String>,

    /// Accept vhost-user connections only from this peer uid (SO_PEERCRED).
    #[arg(long, value_name = "UID")]
    pub vmm_uid: Option<u32>,

    /// The device's name in control commands and events.
    #[arg(long, default_value = "disk0")]
    pub id: String,

    /// Write "READY=1\n" to this fd and close it once serving.
    #[arg(long, value_name = "N")]
    pub ready_fd: Option<i32>,
}

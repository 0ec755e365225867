//! The validated configuration of `vublk serve`: [`ServeConfig`] is built once from the parsed
//! command line with `TryFrom<ServeArgs>`, and nothing downstream re-checks its fields.
//!
//! Pure: it parses and checks values, but opens no file and inspects no fd (that is setup's job,
//! in `disk.rs` and `vhost_user/listener.rs`).

use std::os::fd::RawFd;
use std::path::PathBuf;

use vublk_fdset::{FileSpec, SpecError};

use crate::args::{CacheArg, DiscardArg, FormatArg, SandboxArg, ServeArgs};

/// The most virtqueues vublk serves: each gets a thread and an io_uring.
pub const MAX_NUM_QUEUES: u16 = 16;
/// Default cap on the number of queues when --num-queues is not given.
pub const DEFAULT_MAX_NUM_QUEUES: u16 = 8;
/// The largest virtqueue: QEMU's vhost-user-blk accepts at most 1024, and a request's segments
/// (queue size - 2) must fit in one preadv (IOV_MAX = 1024).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// virtio-blk GET_ID returns at most 20 bytes (VIRTIO_BLK_ID_BYTES).
pub const SERIAL_MAX_BYTES: usize = 20;

/// Where the vhost-user connection comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VhostUserSocket {
    /// Listen at this path (created, and removed first if stale).
    Listen(PathBuf),
    /// An inherited socket fd: listening or connected, told apart at setup.
    Inherited(RawFd),
    /// Connect to a listening VMM, reconnecting when the connection is lost.
    Connect(PathBuf),
}

/// How the host page cache is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// O_DIRECT.
    None,
    Writeback,
}

/// The deepest backing chain vublk opens (the image itself not counted): a chain is exactly
/// what the manager passes, and 16 layers is far past any real one (crosvm uses 16 too).
pub const MAX_BACKING_DEPTH: usize = 16;

/// One `--backing` layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingConfig {
    pub file: FileSpec,
    pub format: FormatArg,
}

/// Options of the disk the guest sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub image: FileSpec,
    pub format: FormatArg,
    /// Chain order: the image's backing file first.
    pub backing: Vec<BackingConfig>,
    pub read_only: bool,
    /// `None`: an fd's own O_DIRECT flag decides; a path is opened with writeback.
    pub cache: Option<CacheMode>,
    pub discard: bool,
    pub serial: Vec<u8>,
    pub logical_block_size: u32,
}

/// Options of the vhost-user device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    pub socket: VhostUserSocket,
    pub num_queues: u16,
    pub queue_size: u16,
}

/// Where the manager's control connection comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlSocket {
    /// Listen at this path.
    Listen(PathBuf),
    /// An inherited socket fd: listening or connected, told apart at setup.
    Inherited(RawFd),
}

/// One `--add-fd`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddFd {
    pub fd: RawFd,
    pub set: u64,
    pub opaque: Option<String>,
}

/// The longest device name (`--id`): QEMU's qdev ids are short identifiers too.
pub const MAX_ID_LEN: usize = 64;

/// The identity to drop to while confining.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    /// `None`: start with no medium (only with a control socket).
    pub medium: Option<DiskConfig>,
    /// The disk options a medium inserted later gets (cache, discard, block size, serial).
    pub disk: DiskConfig,
    pub sandbox: crate::args::SandboxArg,
    pub user: Option<User>,
    pub vmm_uid: Option<u32>,
    pub device: DeviceConfig,
    pub ready_fd: Option<RawFd>,
    pub control: Option<ControlSocket>,
    pub add_fds: Vec<AddFd>,
    pub id: String,
}

/// A command line that parses but does not make sense.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--image: {0}")]
    Image(#[source] SpecError),
    #[error("--image is required without --control (there would be no way to insert a medium)")]
    ImageMissing,
    #[error("--user {text}: expected UID or UID:GID (numbers)")]
    User { text: String },
    #[error("--connect needs socket() and connect() after confinement, which the sandbox forbids: pass a socket the manager connected with --fd, or use --sandbox off")]
    ConnectConfined,
    #[error("--format is required (a writable disk's format is never probed)")]
    FormatMissing,
    #[error("--backing {text}: expected FILE,format=raw|qcow2")]
    BackingSyntax { text: String },
    #[error("--backing {text}: {source}")]
    BackingFile {
        text: String,
        #[source]
        source: SpecError,
    },
    #[error("--backing: {count} layers is deeper than the limit of {MAX_BACKING_DEPTH}")]
    BackingDepth { count: usize },
    #[error("--backing: a raw image has no backing file")]
    BackingUnderRaw,
    #[error("--serial: {len} bytes is longer than the {SERIAL_MAX_BYTES} bytes virtio-blk allows")]
    SerialTooLong { len: usize },
    #[error("--logical-block-size: {0} is neither 512 nor 4096")]
    LogicalBlockSize(u32),
    #[error("one of --socket-path, --fd or --connect is required")]
    SocketMissing,
    #[error("--fd {0}: fds 0-2 are stdio, not a socket")]
    SocketFd(RawFd),
    #[error("--num-queues: {0} is not between 1 and {MAX_NUM_QUEUES}")]
    NumQueues(u16),
    #[error("--queue-size: {0} is not a power of two between 2 and {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("--ready-fd {0}: fds 0-2 are stdio")]
    ReadyFd(RawFd),
    #[error("--control {text}: fd:N needs an fd number above 2, or give a path")]
    ControlFd { text: String },
    #[error("--add-fd {text}: {reason}")]
    AddFd { text: String, reason: &'static str },
    #[error("--id '{0}': a device name is 1-{MAX_ID_LEN} letters, digits, '-', '_' or '.', starting with a letter")]
    Id(String),
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = ConfigError;

    fn try_from(args: ServeArgs) -> Result<Self, Self::Error> {
        let image: Option<FileSpec> = match &args.image {
            Some(text) => Some(text.parse().map_err(ConfigError::Image)?),
            None if args.control.is_none() => return Err(ConfigError::ImageMissing),
            None => None,
        };
        let user = args.user.as_deref().map(parse_user).transpose()?;
        let format = match (&image, args.format) {
            (_, Some(format)) => format,
            (Some(_), None) => return Err(ConfigError::FormatMissing),
            // No medium yet: each medium change names its own format.
            (None, None) => FormatArg::Raw,
        };
        let backing = args
            .backing
            .iter()
            .map(|text| parse_backing(text))
            .collect::<Result<Vec<_>, _>>()?;
        if backing.len() > MAX_BACKING_DEPTH {
            return Err(ConfigError::BackingDepth {
                count: backing.len(),
            });
        }
        if format == FormatArg::Raw && !backing.is_empty() {
            return Err(ConfigError::BackingUnderRaw);
        }
        let serial = args.serial.unwrap_or_default().into_bytes();
        if serial.len() > SERIAL_MAX_BYTES {
            return Err(ConfigError::SerialTooLong { len: serial.len() });
        }
        if !matches!(args.logical_block_size, 512 | 4096) {
            return Err(ConfigError::LogicalBlockSize(args.logical_block_size));
        }
        let socket = match (args.socket_path, args.fd, args.connect) {
            (Some(path), None, None) => VhostUserSocket::Listen(path),
            (None, Some(fd), None) if fd > 2 => VhostUserSocket::Inherited(fd),
            (None, Some(fd), None) => return Err(ConfigError::SocketFd(fd)),
            (None, None, Some(path)) => VhostUserSocket::Connect(path),
            // clap's conflicts_with rules out two at once; none at all is ours to refuse.
            _ => return Err(ConfigError::SocketMissing),
        };
        let num_queues = match args.num_queues {
            Some(n) if (1..=MAX_NUM_QUEUES).contains(&n) => n,
            Some(n) => return Err(ConfigError::NumQueues(n)),
            None => default_num_queues(),
        };
        let queue_size = args.queue_size;
        if !(2..=MAX_QUEUE_SIZE).contains(&queue_size) || !queue_size.is_power_of_two() {
            return Err(ConfigError::QueueSize(queue_size));
        }
        if let Some(fd) = args.ready_fd {
            if fd <= 2 {
                return Err(ConfigError::ReadyFd(fd));
            }
        }
        if matches!(socket, VhostUserSocket::Connect(_)) && args.sandbox != SandboxArg::Off {
            return Err(ConfigError::ConnectConfined);
        }
        let control = args.control.as_deref().map(parse_control).transpose()?;
        let add_fds = args
            .add_fd
            .iter()
            .map(|t| parse_add_fd(t))
            .collect::<Result<Vec<_>, _>>()?;
        let id_ok = !args.id.is_empty()
            && args.id.len() <= MAX_ID_LEN
            && args.id.starts_with(|c: char| c.is_ascii_alphabetic())
            && args
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !id_ok {
            return Err(ConfigError::Id(args.id));
        }
        let disk = DiskConfig {
            image: image.clone().unwrap_or(FileSpec::Fd(-1)),
            format,
            backing,
            read_only: args.read_only,
            cache: args.cache.map(|c| match c {
                CacheArg::None => CacheMode::None,
                CacheArg::Writeback => CacheMode::Writeback,
            }),
            discard: args.discard == DiscardArg::Unmap,
            serial,
            logical_block_size: args.logical_block_size,
        };
        Ok(ServeConfig {
            medium: image.map(|_| disk.clone()),
            disk,
            sandbox: args.sandbox,
            user,
            vmm_uid: args.vmm_uid,
            control,
            add_fds,
            id: args.id,
            device: DeviceConfig {
                socket,
                num_queues,
                queue_size,
            },
            ready_fd: args.ready_fd,
        })
    }
}

/// Parses `--user UID[:GID]` (the group defaults to the uid's number).
fn parse_user(text: &str) -> Result<User, ConfigError> {
    let bad = || ConfigError::User {
        text: text.to_string(),
    };
    let (uid, gid) = match text.split_once(':') {
        Some((u, g)) => (u, g),
        None => (text, text),
    };
    Ok(User {
        uid: uid.parse().map_err(|_| bad())?,
        gid: gid.parse().map_err(|_| bad())?,
    })
}

/// Parses `--control PATH|fd:N`.
fn parse_control(text: &str) -> Result<ControlSocket, ConfigError> {
    match text.strip_prefix("fd:") {
        Some(n) => match n.parse::<RawFd>() {
            Ok(fd) if fd > 2 => Ok(ControlSocket::Inherited(fd)),
            _ => Err(ConfigError::ControlFd {
                text: text.to_string(),
            }),
        },
        None => Ok(ControlSocket::Listen(PathBuf::from(text))),
    }
}

/// Parses `fd=N,set=S[,opaque=TEXT]` with QEMU's `-add-fd` rules. The opaque text comes last
/// and runs to the end, so it may hold commas.
fn parse_add_fd(text: &str) -> Result<AddFd, ConfigError> {
    let err = |reason| ConfigError::AddFd {
        text: text.to_string(),
        reason,
    };
    let (head, opaque) = match text.split_once(",opaque=") {
        Some((head, opaque)) => (head, Some(opaque.to_string())),
        None => (text, None),
    };
    let (mut fd, mut set) = (None, None);
    for part in head.split(',') {
        match part.split_once('=') {
            Some(("fd", v)) => {
                fd = Some(
                    v.parse::<RawFd>()
                        .map_err(|_| err("fd option is required and must be non-negative"))?,
                )
            }
            Some(("set", v)) => {
                set = Some(
                    v.parse::<u64>()
                        .map_err(|_| err("set option is required and must be non-negative"))?,
                )
            }
            _ => return Err(err("expected fd=N,set=S[,opaque=TEXT]")),
        }
    }
    let fd = fd.ok_or_else(|| err("fd option is required and must be non-negative"))?;
    if fd < 0 {
        return Err(err("fd option is required and must be non-negative"));
    }
    if fd <= 2 {
        return Err(err("fd cannot be a standard I/O stream"));
    }
    let set = set.ok_or_else(|| err("set option is required and must be non-negative"))?;
    Ok(AddFd { fd, set, opaque })
}

/// Parses `FILE,format=F` (the format is required: a backing layer's format is never probed).
fn parse_backing(text: &str) -> Result<BackingConfig, ConfigError> {
    let syntax = || ConfigError::BackingSyntax {
        text: text.to_string(),
    };
    let (file, format) = text.rsplit_once(",format=").ok_or_else(syntax)?;
    let format = match format {
        "raw" => FormatArg::Raw,
        "qcow2" => FormatArg::Qcow2,
        _ => return Err(syntax()),
    };
    let file = file.parse().map_err(|source| ConfigError::BackingFile {
        text: text.to_string(),
        source,
    })?;
    Ok(BackingConfig { file, format })
}

/// One queue per host CPU, at most [`DEFAULT_MAX_NUM_QUEUES`].
fn default_num_queues() -> u16 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    u16::try_from(cpus)
        .unwrap_or(DEFAULT_MAX_NUM_QUEUES)
        .clamp(1, DEFAULT_MAX_NUM_QUEUES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};
    use clap::Parser;

    fn parse(extra: &[&str]) -> Result<ServeConfig, ConfigError> {
        let mut argv = vec!["vublk", "serve"];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).expect("clap accepts the syntax");
        match cli.command {
            Some(Command::Serve(args)) => ServeConfig::try_from(*args),
            Some(Command::Probe(_) | Command::XSeccompAllowlist) | None => {
                panic!("not a serve command line")
            }
        }
    }

    const BASE: [&str; 6] = [
        "--image",
        "fd:5",
        "--format",
        "raw",
        "--socket-path",
        "/tmp/s",
    ];

    fn with(extra: &[&str]) -> Result<ServeConfig, ConfigError> {
        let mut v = BASE.to_vec();
        v.extend_from_slice(extra);
        parse(&v)
    }

    #[test]
    fn minimal_command_line_has_defaults() {
        let cfg = with(&[]).unwrap();
        assert_eq!(cfg.disk.image, FileSpec::Fd(5));
        assert_eq!(cfg.disk.cache, None);
        assert!(!cfg.disk.discard);
        assert!(!cfg.disk.read_only);
        assert_eq!(cfg.disk.logical_block_size, 512);
        assert_eq!(cfg.device.queue_size, 256);
        assert!((1..=DEFAULT_MAX_NUM_QUEUES).contains(&cfg.device.num_queues));
        assert_eq!(
            cfg.device.socket,
            VhostUserSocket::Listen(PathBuf::from("/tmp/s"))
        );
    }

    #[test]
    fn blk_file_is_an_alias_of_image() {
        let cfg = parse(&["--blk-file", "fd:9", "--format", "raw", "--fd", "4"]).unwrap();
        assert_eq!(cfg.disk.image, FileSpec::Fd(9));
        assert_eq!(cfg.device.socket, VhostUserSocket::Inherited(4));
    }

    #[test]
    fn bare_discard_means_unmap() {
        assert!(with(&["--discard"]).unwrap().disk.discard);
        assert!(!with(&["--discard", "ignore"]).unwrap().disk.discard);
    }

    #[test]
    fn backing_layers_parse_in_chain_order() {
        let cfg = parse(&[
            "--image",
            "fd:5",
            "--format",
            "qcow2",
            "--socket-path",
            "/s",
            "--backing",
            "fd:6,format=qcow2",
            "--backing",
            "/b/base.img,format=raw",
        ])
        .unwrap();
        assert_eq!(
            cfg.disk.backing,
            vec![
                BackingConfig {
                    file: FileSpec::Fd(6),
                    format: FormatArg::Qcow2
                },
                BackingConfig {
                    file: FileSpec::Path(PathBuf::from("/b/base.img")),
                    format: FormatArg::Raw
                },
            ]
        );
    }

    #[test]
    fn bad_backing_specs_are_refused() {
        let base = [
            "--image",
            "fd:5",
            "--format",
            "qcow2",
            "--socket-path",
            "/s",
        ];
        let with_backing = |b: &str| {
            let mut v = base.to_vec();
            v.extend_from_slice(&["--backing", b]);
            parse(&v)
        };
        assert!(matches!(
            with_backing("fd:6"),
            Err(ConfigError::BackingSyntax { .. })
        ));
        assert!(matches!(
            with_backing("fd:6,format=vmdk"),
            Err(ConfigError::BackingSyntax { .. })
        ));
        assert!(matches!(
            with_backing("fd:1,format=raw"),
            Err(ConfigError::BackingFile { .. })
        ));
        let deep: Vec<String> = (0..17)
            .map(|i| format!("fd:{},format=qcow2", i + 10))
            .collect();
        let mut v: Vec<&str> = base.to_vec();
        for d in &deep {
            v.extend_from_slice(&["--backing", d]);
        }
        assert_eq!(parse(&v), Err(ConfigError::BackingDepth { count: 17 }));
        assert_eq!(
            parse(&[
                "--image",
                "fd:5",
                "--format",
                "raw",
                "--socket-path",
                "/s",
                "--backing",
                "fd:6,format=raw"
            ]),
            Err(ConfigError::BackingUnderRaw)
        );
    }

    #[test]
    fn format_is_required() {
        let r = parse(&["--image", "fd:5", "--socket-path", "/tmp/s"]);
        assert_eq!(r, Err(ConfigError::FormatMissing));
    }

    #[test]
    fn serial_longer_than_20_bytes_is_refused() {
        assert_eq!(
            with(&["--serial", "123456789012345678901"]),
            Err(ConfigError::SerialTooLong { len: 21 })
        );
        assert_eq!(
            with(&["--serial", "12345678901234567890"])
                .unwrap()
                .disk
                .serial
                .len(),
            20
        );
    }

    #[test]
    fn odd_block_and_queue_sizes_are_refused() {
        assert_eq!(
            with(&["--logical-block-size", "1024"]),
            Err(ConfigError::LogicalBlockSize(1024))
        );
        assert_eq!(
            with(&["--queue-size", "100"]),
            Err(ConfigError::QueueSize(100))
        );
        assert_eq!(
            with(&["--queue-size", "2048"]),
            Err(ConfigError::QueueSize(2048))
        );
        assert_eq!(with(&["--num-queues", "0"]), Err(ConfigError::NumQueues(0)));
        assert_eq!(
            with(&["--num-queues", "17"]),
            Err(ConfigError::NumQueues(17))
        );
    }

    #[test]
    fn control_add_fd_and_id_parse_with_qemus_rules() {
        let c = with(&[
            "--control",
            "fd:7",
            "--add-fd",
            "fd=10,set=3",
            "--add-fd",
            "fd=11,set=3,opaque=a,b=c",
            "--id",
            "vm1-disk.0",
        ])
        .expect("valid");
        assert_eq!(c.control, Some(ControlSocket::Inherited(7)));
        assert_eq!(
            c.add_fds,
            [
                AddFd {
                    fd: 10,
                    set: 3,
                    opaque: None
                },
                AddFd {
                    fd: 11,
                    set: 3,
                    opaque: Some("a,b=c".into())
                }
            ]
        );
        assert_eq!(c.id, "vm1-disk.0");
        assert_eq!(
            with(&["--control", "/run/q.sock"]).expect("valid").control,
            Some(ControlSocket::Listen("/run/q.sock".into()))
        );
        assert_eq!(with(&[]).expect("valid").id, "disk0");
        for (bad, reason) in [
            ("fd=2,set=0", "fd cannot be a standard I/O stream"),
            (
                "fd=-4,set=0",
                "fd option is required and must be non-negative",
            ),
            ("set=0", "fd option is required and must be non-negative"),
            ("fd=9", "set option is required and must be non-negative"),
            (
                "fd=9,set=x",
                "set option is required and must be non-negative",
            ),
            ("fd=9,set=1,bogus=1", "expected fd=N,set=S[,opaque=TEXT]"),
        ] {
            assert_eq!(
                with(&["--add-fd", bad]),
                Err(ConfigError::AddFd {
                    text: bad.into(),
                    reason
                }),
                "{bad}"
            );
        }
        assert!(matches!(
            with(&["--control", "fd:1"]),
            Err(ConfigError::ControlFd { .. })
        ));
        for bad in ["", "0disk", "disk 0", "disk/0"] {
            assert_eq!(
                with(&["--id", bad]),
                Err(ConfigError::Id(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_socket_is_required_and_stdio_fds_are_refused() {
        assert_eq!(
            parse(&["--image", "fd:5", "--format", "raw"]),
            Err(ConfigError::SocketMissing)
        );
        assert_eq!(
            parse(&["--image", "fd:5", "--format", "raw", "--fd", "1"]),
            Err(ConfigError::SocketFd(1))
        );
        assert!(matches!(
            parse(&["--image", "fd:2", "--format", "raw", "--fd", "4"]),
            Err(ConfigError::Image(SpecError::StdioFd { .. }))
        ));
    }

    #[test]
    fn two_socket_modes_are_a_syntax_error() {
        let r = Cli::try_parse_from([
            "vublk",
            "serve",
            "--image",
            "x",
            "--format",
            "raw",
            "--fd",
            "4",
            "--connect",
            "/p",
        ]);
        assert!(r.is_err());
    }
}

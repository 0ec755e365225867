//! The QMP commands vublk answers, with QEMU's argument names, results and error classes.
//!
//! [`State`] is what the control thread owns: the manager's fds (fd sets, named fds), the
//! device, and the tray state. Each command checks its arguments first (nothing happens on a
//! bad one), and a medium change opens the whole new chain before the device is touched, so a
//! failure leaves the old medium serving as before. Fds that arrived with a command and were
//! not taken by it are closed when it returns. It does not know about sockets.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use vublk_fdset::{FdsTruncated, FileSpec};

use super::qmp::{self, Args, ErrorClass, QmpError};
use crate::args::FormatArg;
use crate::config::{BackingConfig, DiskConfig, MAX_BACKING_DEPTH};
use crate::device::Device;
use crate::disk::{Disk, DiskError};
use crate::events::Event;
use crate::fds::{ControlSource, ManagerFds, ReopenSource};
use crate::serve::corruption_hook;
use crate::updater::error_chain as chain;

/// What the loop does after a command.
pub enum Outcome {
    Reply(Value),
    /// `qmp_capabilities` succeeded: the client may now run commands and gets events.
    Negotiated(Value),
    /// `quit`: send the reply, then shut down.
    Quit(Value),
}

/// What `query-version` and the greeting report: vublk's own version (a QMP client only
/// shows it; no QEMU version is claimed), with the package naming vublk.
pub const VERSION: (u32, u32, u32) = (0, 1, 0);
pub const PACKAGE: &str = concat!("vublk ", env!("CARGO_PKG_VERSION"));

/// The commands, for `query-commands`.
const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "quit",
    "add-fd",
    "remove-fd",
    "query-fdsets",
    "getfd",
    "closefd",
    "blockdev-change-medium",
    "eject",
    "block_resize",
    "query-block",
    "query-blockstats",
    "query-vhost-user",
];

/// The control thread's state.
pub struct State {
    device: Arc<Device>,
    fds: ManagerFds,
    /// The command line's disk options: cache mode, discard, block size, for new media.
    template: DiskConfig,
    tray_open: bool,
    /// Whether the last medium inserted was read-only: `read-only-mode: retain` keeps it
    /// across an eject, as QEMU does.
    last_read_only: bool,
    quit: bool,
}

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc)
}

impl State {
    /// `tray_open`: vublk started with no medium.
    pub fn new(
        device: Arc<Device>,
        fds: ManagerFds,
        template: DiskConfig,
        tray_open: bool,
    ) -> State {
        State {
            device,
            fds,
            last_read_only: template.read_only,
            template,
            tray_open,
            quit: false,
        }
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    pub fn quit_requested(&self) -> bool {
        self.quit
    }

    /// Runs one command. `fds` arrived before or with it; any it does not take are closed.
    pub fn execute(
        &mut self,
        bytes: &[u8],
        negotiated: bool,
        fds: Vec<OwnedFd>,
        truncated: Option<FdsTruncated>,
    ) -> Outcome {
        let command = match qmp::parse_command(bytes) {
            Ok(c) => c,
            Err(e) => return Outcome::Reply(qmp::error(e.id, e.error)),
        };
        let id = command.id.clone();
        if command.name == "qmp_capabilities" {
            return match qmp::qmp_capabilities(&command.arguments, negotiated) {
                Ok(()) => Outcome::Negotiated(qmp::success(id, json!({}))),
                Err(e) => Outcome::Reply(qmp::error(id, e)),
            };
        }
        if !negotiated {
            return Outcome::Reply(qmp::error(id, QmpError::capabilities_expected()));
        }
        if let Some(t) = truncated {
            return Outcome::Reply(qmp::error(id, generic(t.to_string())));
        }
        if command.name == "quit" {
            return match Args::new(&command.arguments).finish() {
                Ok(()) => {
                    self.quit = true;
                    Outcome::Quit(qmp::success(id, json!({})))
                }
                Err(e) => Outcome::Reply(qmp::error(id, e)),
            };
        }
        let result = self.dispatch(&command.name, &command.arguments, fds);
        Outcome::Reply(match result {
            Ok(value) => qmp::success(id, value),
            Err(e) => qmp::error(id, e),
        })
    }

    fn dispatch(
        &mut self,
        name: &str,
        args: &Map<String, Value>,
        fds: Vec<OwnedFd>,
    ) -> Result<Value, QmpError> {
        match name {
            "query-version" => {
                Args::new(args).finish()?;
                Ok(qmp::version_info(VERSION, PACKAGE))
            }
            "query-commands" => {
                Args::new(args).finish()?;
                let mut names: Vec<&str> = COMMANDS.to_vec();
                if cfg!(feature = "sandbox-probe") {
                    names.push("x-sandbox-probe");
                }
                Ok(Value::Array(
                    names.iter().map(|n| json!({ "name": n })).collect(),
                ))
            }
            "add-fd" => self.add_fd(args, fds),
            "remove-fd" => self.remove_fd(args),
            "query-fdsets" => {
                Args::new(args).finish()?;
                Ok(self.query_fdsets())
            }
            "getfd" => self.getfd(args, fds),
            "closefd" => self.closefd(args),
            "blockdev-change-medium" => self.change_medium(args),
            "eject" => self.eject(args),
            "block_resize" => self.block_resize(args),
            "query-block" => {
                Args::new(args).finish()?;
                Ok(self.query_block())
            }
            "query-blockstats" => {
                let mut a = Args::new(args);
                a.opt_bool("query-nodes")?;
                a.finish()?;
                Ok(self.query_blockstats())
            }
            "query-vhost-user" => {
                Args::new(args).finish()?;
                Ok(self.query_vhost_user())
            }
            #[cfg(feature = "sandbox-probe")]
            "x-sandbox-probe" => {
                let mut a = Args::new(args);
                let unix = a.opt_str("unix")?;
                let tcp = a.opt_i64("tcp-port")?;
                let execve = a.opt_bool("execve")?.unwrap_or(false);
                a.finish()?;
                let port = tcp.and_then(|p| u16::try_from(p).ok());
                Ok(crate::sandbox::probe::run(unix, port, execve))
            }
            other => Err(QmpError::command_not_found(other)),
        }
    }

    fn add_fd(&mut self, args: &Map<String, Value>, fds: Vec<OwnedFd>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let set = a.opt_i64("fdset-id")?;
        let opaque = a.opt_str("opaque")?.map(str::to_string);
        a.finish()?;
        let set = match set {
            Some(s) if s < 0 => {
                return Err(generic("Parameter 'fdset-id' expects a non-negative value"))
            }
            Some(s) => Some(s.unsigned_abs()),
            None => None,
        };
        let fd = one_fd(fds)?;
        let added = self
            .fds
            .sets
            .add(fd, set, opaque)
            .map_err(|e| generic(chain(&e)))?;
        Ok(json!({"fdset-id": added.fdset_id, "fd": added.fd}))
    }

    fn remove_fd(&mut self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let set = a.req_i64("fdset-id")?;
        let fd = a.opt_i64("fd")?;
        a.finish()?;
        let (Ok(set), fd) = (u64::try_from(set), fd) else {
            return Err(generic(format!(
                "File descriptor named 'fdset-id:{set}' not found"
            )));
        };
        let fd = match fd.map(i32::try_from) {
            None => None,
            Some(Ok(fd)) => Some(fd),
            Some(Err(_)) => {
                return Err(generic(format!(
                    "File descriptor named 'fdset-id:{set}, fd:{}' not found",
                    fd.unwrap_or_default()
                )))
            }
        };
        self.fds
            .sets
            .remove(set, fd)
            .map_err(|e| generic(chain(&e)))?;
        Ok(json!({}))
    }

    fn query_fdsets(&mut self) -> Value {
        Value::Array(
            self.fds
                .sets
                .query()
                .into_iter()
                .map(|set| {
                    let fds: Vec<Value> = set
                        .fds
                        .into_iter()
                        .map(|f| {
                            let mut m = Map::new();
                            m.insert("fd".into(), json!(f.fd));
                            if let Some(o) = f.opaque {
                                m.insert("opaque".into(), json!(o));
                            }
                            Value::Object(m)
                        })
                        .collect();
                    json!({"fdset-id": set.fdset_id, "fds": fds})
                })
                .collect(),
        )
    }

    fn getfd(&mut self, args: &Map<String, Value>, fds: Vec<OwnedFd>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let name = a.req_str("fdname")?.to_string();
        a.finish()?;
        let fd = one_fd(fds)?;
        self.fds
            .named
            .insert(name, fd)
            .map_err(|e| generic(e.to_string()))?;
        Ok(json!({}))
    }

    fn closefd(&mut self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let name = a.req_str("fdname")?;
        a.finish()?;
        self.fds
            .named
            .close(name)
            .map_err(|e| generic(e.to_string()))?;
        Ok(json!({}))
    }

    /// Checks that `device`/`id` (QEMU accepts either) names this device.
    fn check_device(&self, device: Option<&str>, id: Option<&str>) -> Result<(), QmpError> {
        let name = match (device, id) {
            (Some(_), Some(_)) => return Err(generic("Need exactly one of 'device' and 'id'")),
            (Some(n), None) | (None, Some(n)) => n,
            (None, None) => return Err(generic("Need exactly one of 'device' and 'id'")),
        };
        if name == self.device.id() {
            Ok(())
        } else {
            Err(QmpError {
                class: ErrorClass::DeviceNotFound,
                desc: format!("Device '{name}' not found"),
            })
        }
    }

    fn tray(&mut self, open: bool) {
        if self.tray_open != open {
            self.tray_open = open;
            self.device.events().emit(Event::DeviceTrayMoved {
                device: self.device.id().to_string(),
                tray_open: open,
            });
        }
    }

    fn change_medium(&mut self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let device = a.opt_str("device")?;
        let id = a.opt_str("id")?;
        let filename = a.req_str("filename")?;
        let format = a.opt_str("format")?;
        let _force = a.opt_bool("force")?;
        let mode = a.opt_enum("read-only-mode", &["retain", "read-only", "read-write"])?;
        let backing = match a.opt_object_array("backing")? {
            Some(layers) => parse_backing(layers)?,
            None => Vec::new(),
        };
        a.finish()?;
        self.check_device(device, id)?;
        let format = parse_format(format, "format")?;
        let image = parse_file(filename)?;
        let read_only = match mode {
            Some("read-only") => true,
            Some("read-write") => false,
            _ => self.last_read_only || self.device.params().read_only,
        };
        if !read_only && self.device.params().read_only {
            return Err(generic(format!(
                "Device '{}' is read-only (started with --read-only): a medium cannot be inserted read-write",
                self.device.id()
            )));
        }
        let config = DiskConfig {
            image,
            format,
            backing,
            read_only,
            ..self.template.clone()
        };
        // The whole new chain is opened (and checked) before the device is touched.
        let new = Disk::open(
            &config,
            &mut ControlSource { fds: &mut self.fds },
            corruption_hook(self.device.events(), self.device.id()),
        )
        .map_err(|e| disk_error(&e))?;
        new.start().map_err(|e| disk_error(&e))?;
        self.tray(true);
        self.device.with_queues_paused(|old| {
            if let Err(e) = old.sync() {
                log::error!("flushing the old medium before a change: {e}");
            }
            Ok::<_, QmpError>((Some(new), ()))
        })?;
        self.tray(false);
        self.last_read_only = read_only;
        log::info!("{}: medium changed to {filename}", self.device.id());
        Ok(json!({}))
    }

    fn eject(&mut self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let device = a.opt_str("device")?;
        let id = a.opt_str("id")?;
        let _force = a.opt_bool("force")?;
        a.finish()?;
        self.check_device(device, id)?;
        self.tray(true);
        self.device.with_queues_paused(|old| {
            if let Err(e) = old.sync() {
                log::error!("flushing the medium before eject: {e}");
            }
            Ok::<_, QmpError>((Some(Disk::empty()), ()))
        })?;
        log::info!("{}: medium ejected", self.device.id());
        Ok(json!({}))
    }

    fn block_resize(&mut self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let device = a.opt_str("device")?;
        let node = a.opt_str("node-name")?;
        let size = a.req_i64("size")?;
        a.finish()?;
        match (device, node) {
            (Some(n), _) | (None, Some(n)) if n == self.device.id() => {}
            (Some(n), _) | (None, Some(n)) => {
                return Err(QmpError {
                    class: ErrorClass::DeviceNotFound,
                    desc: format!("Cannot find device='{n}' nor node-name='{n}'"),
                })
            }
            (None, None) => return Err(generic("One of device or node-name must be specified")),
        }
        let size =
            u64::try_from(size).map_err(|_| generic("Parameter 'size' expects a >0 size"))?;
        let lbs = u64::from(self.device.params().logical_block_size);
        if size % lbs != 0 {
            return Err(generic(format!(
                "size {size} is not a multiple of the logical block size {lbs}"
            )));
        }
        let device = Arc::clone(&self.device);
        let hook = corruption_hook(device.events(), device.id());
        device.with_queues_paused(|old| {
            if old.is_empty() {
                return Err(generic(format!("Device '{}' has no medium", device.id())));
            }
            if old.read_only() {
                return Err(generic(format!("Device '{}' is read only", device.id())));
            }
            if size == old.capacity_bytes() {
                return Ok((None, Ok(())));
            }
            // The layer is closed (metadata written, fds synced) before its file changes size.
            old.sync()
                .map_err(|e| generic(format!("flushing before resize: {e}")))?;
            let resized = old.resize_file(size).map_err(|e| generic(chain(&*e)));
            // Reopened whether or not the resize worked: the closed medium has no metadata
            // thread any more, and a refused resize left the file as it was.
            let config = old.config().clone();
            let reopened = Disk::open(
                &config,
                &mut ReopenSource::new(old).map_err(|e| generic(chain(&e)))?,
                hook,
            )
            .map_err(|e| disk_error(&e))?;
            reopened.start().map_err(|e| disk_error(&e))?;
            Ok((Some(reopened), resized))
        })??;
        log::info!("{}: resized to {size} bytes", self.device.id());
        Ok(json!({}))
    }

    fn query_block(&self) -> Value {
        let (disk, _) = self.device.disk();
        let mut entry = json!({
            "device": self.device.id(),
            "qdev": self.device.id(),
            "locked": false,
            "removable": true,
            "tray_open": self.tray_open,
            "type": "unknown",
        });
        if let Some(top) = disk.chain().first() {
            let mut image = Value::Null;
            for layer in disk.chain().iter().rev() {
                let mut info = json!({
                    "filename": layer.file,
                    "format": layer.format.to_string(),
                    "virtual-size": disk.capacity_bytes(),
                    "ro": layer.read_only,
                });
                if let Some(set) = layer.fdset {
                    info["x-fdset-id"] = json!(set);
                }
                if let Some(o) = &layer.opaque {
                    info["x-opaque"] = json!(o);
                }
                if !image.is_null() {
                    info["backing-image"] = image;
                }
                image = info;
            }
            entry["inserted"] = json!({
                "file": top.file,
                "node-name": self.device.id(),
                "drv": top.format.to_string(),
                "ro": disk.read_only() || self.device.params().read_only,
                "backing_file_depth": disk.chain().len().saturating_sub(1),
                "encrypted": false,
                "detect_zeroes": "off",
                "write_threshold": 0,
                "cache": {
                    "writeback": self.device.writeback(),
                    "direct": disk.direct(),
                    "no-flush": false,
                },
                "image": image,
            });
        }
        json!([entry])
    }

    fn query_blockstats(&self) -> Value {
        let (per_queue, total) = self.device.stats().snapshot();
        json!([{
            "device": self.device.id(),
            "node-name": self.device.id(),
            "qdev": self.device.id(),
            "stats": total.to_qmp(),
            "x-queues": per_queue.iter().map(|s| s.to_qmp()).collect::<Vec<_>>(),
        }])
    }

    fn query_vhost_user(&self) -> Value {
        let params = self.device.params();
        let mut v = json!({
            "device": self.device.id(),
            "connected": false,
            "num-queues": params.num_queues,
            "queue-size": params.queue_size,
        });
        if let Some(c) = self.device.connection() {
            v["connected"] = json!(true);
            v["features"] = json!(c.features);
            v["protocol-features"] = json!(c.protocol_features);
            if let Some(pid) = c.peer_pid {
                v["peer-pid"] = json!(pid);
            }
            if let Some(uid) = c.peer_uid {
                v["peer-uid"] = json!(uid);
            }
            v["config-change-notification"] = json!(self.device.has_channel());
        }
        v
    }
}

/// The one fd a command needs; more than one is an error (and all are closed).
fn one_fd(mut fds: Vec<OwnedFd>) -> Result<OwnedFd, QmpError> {
    match fds.len() {
        0 => Err(generic("No file descriptor supplied via SCM_RIGHTS")),
        1 => fds
            .pop()
            .ok_or_else(|| generic("No file descriptor supplied via SCM_RIGHTS")),
        n => Err(generic(format!(
            "{n} file descriptors were sent with one command; it takes exactly one (all were closed)"
        ))),
    }
}

fn parse_format(format: Option<&str>, what: &str) -> Result<FormatArg, QmpError> {
    match format {
        Some("raw") => Ok(FormatArg::Raw),
        Some("qcow2") => Ok(FormatArg::Qcow2),
        Some(other) => Err(generic(format!(
            "'{what}': unknown format '{other}' (vublk serves raw and qcow2)"
        ))),
        None => Err(generic(format!(
            "Parameter '{what}' is missing (vublk never probes a format)"
        ))),
    }
}

/// A file of a new medium: an fd set or an fd the manager added; never a path.
fn parse_file(filename: &str) -> Result<FileSpec, QmpError> {
    match filename.parse::<FileSpec>() {
        Ok(FileSpec::Path(_)) => Err(generic(format!(
            "'{filename}': vublk opens no path once serving; pass /dev/fdset/N or fd:N"
        ))),
        Ok(spec) => Ok(spec),
        Err(e) => Err(generic(e.to_string())),
    }
}

fn parse_backing(layers: Vec<Args<'_>>) -> Result<Vec<BackingConfig>, QmpError> {
    if layers.len() > MAX_BACKING_DEPTH {
        return Err(generic(format!(
            "'backing': {} layers is deeper than the limit of {MAX_BACKING_DEPTH}",
            layers.len()
        )));
    }
    layers
        .into_iter()
        .map(|mut a| {
            let filename = a.req_str("filename")?;
            let format = a.req_str("format")?;
            a.finish()?;
            Ok(BackingConfig {
                file: parse_file(filename)?,
                format: parse_format(Some(format), "format")?,
            })
        })
        .collect()
}

fn disk_error(e: &DiskError) -> QmpError {
    generic(chain(e))
}

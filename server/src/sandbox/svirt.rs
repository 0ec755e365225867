//! sVirt check for image fds (cargo feature `svirt`): when SELinux is on and vublk runs under an
//! MCS-confined label (`system_u:system_r:svirt_t:s0:c392,c662`), every image fd's label must
//! grant this process what serving needs, or the fd is refused with both labels named.
//!
//! This module owns the decision: parsing contexts and MLS/MCS levels, deciding whether the
//! process is confined to some categories at all, choosing the SELinux class and permissions
//! from the file type, and naming what is missing. It asks a [`LabelSource`] for the facts, so
//! the decision is unit-tested with a fake; [`KernelLabels`] is the real source, built on
//! selinuxfs, `/proc` and `fgetxattr` without libselinux. It does not know where fds come from
//! (command line, fd sets, medium change), when confinement happens, or any other LSM.
//!
//! # Why check what the kernel enforces anyway
//! SELinux already checks an fd when it is received (`selinux_file_receive`) and on each read
//! or write. This check turns a mislabelled image (another VM's categories, a label sVirt never
//! set) into a refusal at setup or at medium change that names the fd and both labels, instead
//! of an EACCES on the guest's first I/O, and it applies MCS separation even where SELinux is
//! permissive. The policy stays the authority: the answer comes from the kernel's own access
//! computation (type enforcement and the MCS constraints), nothing here compares categories.
//!
//! Background: qemu-pr-helper, cited as the model, has no SELinux check in the
//! `scsi/qemu-pr-helper.c` read for this (it trusts whoever can reach its socket and holds the
//! fd, and checks only the fd's access mode). The primitives come from libselinux instead (`fgetfilecon_raw`, `security_compute_av_flags_raw`,
//! `string_to_security_class`, `string_to_av_perm`, `is_selinux_enabled`) and from the kernel's
//! `security/selinux/selinuxfs.c` (`sel_write_access`) and `fs/libfs.c` (transactions).
//!
//! # Decisions
//! - Permissions are what serving does, no more: `read` (reads), `write` (writes, fallocate for
//!   discard and write-zeroes, growing or resizing the file), `getattr` (fstat for the size).
//!   A block device also needs `ioctl`: its size comes from `BLKGETSIZE64`. Not asked: `open`
//!   (checked when the manager opened the file, against the manager), `append` (O_APPEND image
//!   fds are refused elsewhere, and SELinux asks `append` only for them), `lock` (vublk takes
//!   no file locks, unlike QEMU), `map` (no mmap of images), and `fd:use` (the fd's own label
//!   is invisible from userspace; the kernel checked it on receipt).
//! - "Runs with an MCS label" means the process's clearance (the high level of its range, which
//!   the MCS constraints compare) lists some categories but not all of c0..c1023. No MLS field
//!   (a non-MLS policy), no categories (`s0`, `s0-s0`) or every category
//!   (`s0-s0:c0.c1023`, what unconfined, libvirtd and system services run with) means the
//!   process is not confined to one VM, and the check is [`Verdict::NotApplicable`].
//! - Permissive mode and permissive domains do not relax the check: it reports what the policy
//!   allows, not what the kernel would let through.
//!
//! # Limits of [`KernelLabels`]
//! vublk confines itself after setup (no paths, Landlock, seccomp), so everything with a path is
//! opened or read by [`KernelLabels::open`], before confinement:
//! - selinuxfs is looked for at `/sys/fs/selinux` only (not the legacy `/selinux`).
//! - This process's context is read once; vublk never changes its context after that.
//! - Class and permission numbers are read once for `file` and `blk_file`; a policy reload that
//!   renumbers them later is not seen (the kernel still enforces the real I/O).
//! - Each `/sys/fs/selinux/access` fd answers exactly one question (the kernel allows one write
//!   per open), so [`ACCESS_TRANSACTIONS`] of them are opened up front. One question returns the
//!   whole access vector for a (process, file label, class) triple, and the answer is kept, so
//!   only distinct triples use one up (a VM's images usually share one label). When all are
//!   used, later checks fail with [`SvirtError::NoTransactionsLeft`].
//! - Asking needs `security:compute_av` for vublk's domain (refpolicy's
//!   `selinux_compute_access_vector`); without it every question fails with EACCES. A policy
//!   reload after an answer is kept is not seen either.
//! - Once seccomp is on, the thread running the check needs `newfstatat`/`fstat`, `fgetxattr`,
//!   `write` and `pread64`.
//! - The `ioctl` permission bit does not cover extended ioctl rules (`allowxperm`): a policy can
//!   grant `ioctl` and still refuse `BLKGETSIZE64`.

use std::ffi::CStr;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, PoisonError};

use nix::errno::Errno;
use nix::sys::stat::fstat;

/// Where selinuxfs is mounted. libselinux also tries the legacy `/selinux`; no current
/// distribution mounts it there.
const SELINUXFS: &str = "/sys/fs/selinux";
/// Exists exactly when SELinux is enabled (selinuxfs creates its mount point only then).
const SELINUXFS_ENFORCE: &str = "/sys/fs/selinux/enforce";
/// The access-computation transaction file (`sel_write_access`).
const SELINUXFS_ACCESS: &str = "/sys/fs/selinux/access";
/// This thread's context, then the process's for kernels before 3.17 (no thread-self).
const PROC_ATTR_CURRENT: [&str; 2] = ["/proc/thread-self/attr/current", "/proc/self/attr/current"];
/// The context a process has before any policy is loaded: SELinux built in but not in use.
const NO_POLICY_CONTEXT: &str = "kernel";
/// The extended attribute that holds a file's SELinux label (`XATTR_NAME_SELINUX`).
const SELINUX_XATTR: &CStr = c"security.selinux";

/// The longest context accepted: one that does not fit in a page cannot be passed to the
/// kernel's access transaction anyway.
pub const CONTEXT_MAX: usize = 4096;
/// First buffer for a file label; libselinux starts with 255 bytes plus a NUL, which fits
/// nearly every label, and retries with the attribute's real size on ERANGE.
const LABEL_INITIAL: usize = 256;
/// Categories in an MCS policy: refpolicy's and Fedora/RHEL's `mcs_num_cats`, from which
/// libvirt picks each VM's pair. A clearance covering all of them confines nothing.
pub const MCS_CATEGORIES: u32 = 1024;
/// `/sys/fs/selinux/access` fds opened at setup, one per distinct (process, file label, class)
/// question: a VM's images, backing files and later media rarely have more than a few labels.
pub const ACCESS_TRANSACTIONS: usize = 32;
/// Longest access request: `simple_transaction_get` refuses more than
/// `SIMPLE_TRANSACTION_LIMIT - 1` bytes, i.e. a page less a `ssize_t` and a NUL, and the
/// smallest page Linux has is 4 KiB.
const ACCESS_REQUEST_MAX: usize = 4096 - 8 - 1;
/// Room for the reply, `"%x %x %x %x %u %x"`: at most 6 numbers of 10 digits and 5 spaces.
const ACCESS_REPLY_MAX: usize = 128;
/// Room for a class or permission index file (`"65535\n"` at most).
const INDEX_FILE_MAX: usize = 16;
/// Permissions per class: an access vector is a `u32`.
const PERMS_PER_CLASS: u32 = 32;

/// Where the facts come from: the kernel ([`KernelLabels`]) or a fake in tests.
pub trait LabelSource {
    /// Whether SELinux is enabled (a policy is loaded).
    fn enabled(&self) -> bool;
    /// This process's context, raw (untranslated).
    fn own_context(&self) -> Result<String, SvirtError>;
    /// The label of the file behind `fd` (its `security.selinux` attribute), raw.
    fn file_context(&self, fd: BorrowedFd<'_>) -> Result<String, SvirtError>;
    /// Whether the policy grants `subject` every one of `perms` on an object of class `class`
    /// labelled `object` (what libselinux's `security_compute_av` answers).
    fn allowed(
        &self,
        subject: &str,
        object: &str,
        class: &str,
        perms: &[&str],
    ) -> Result<bool, SvirtError>;
}

/// The outcome of [`check_image_fd`] when the fd is not refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// There is nothing to check; the fd was not looked at.
    NotApplicable { reason: NotApplicableReason },
    /// The policy grants this process everything serving the fd needs.
    Allowed,
}

/// Why [`check_image_fd`] did not check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotApplicableReason {
    /// SELinux is off.
    SelinuxDisabled,
    /// The policy has no MLS/MCS field, so there are no categories to separate VMs.
    NoMlsField { process: String },
    /// The process's clearance has no categories.
    NoCategories { process: String },
    /// The process's clearance covers every category: it is not confined to one VM.
    AllCategories { process: String },
}

impl fmt::Display for NotApplicableReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotApplicableReason::SelinuxDisabled => f.write_str("SELinux is disabled"),
            NotApplicableReason::NoMlsField { process } => {
                write!(f, "this process's context {process} has no MLS/MCS field")
            }
            NotApplicableReason::NoCategories { process } => {
                write!(f, "this process's context {process} has no MCS categories")
            }
            NotApplicableReason::AllCategories { process } => write!(
                f,
                "this process's context {process} covers all {MCS_CATEGORIES} MCS categories"
            ),
        }
    }
}

/// Whose context is at fault in an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Whose {
    Process,
    File { fd: RawFd },
}

impl fmt::Display for Whose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Whose::Process => f.write_str("this process"),
            Whose::File { fd } => write!(f, "fd {fd}"),
        }
    }
}

/// Why the sVirt check failed or refused an fd.
#[derive(Debug, thiserror::Error)]
pub enum SvirtError {
    #[error("cannot read {path}")]
    SelinuxFs {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds {text:?}, not a number in 1..={max}")]
    BadIndex {
        path: String,
        text: String,
        max: u32,
    },
    #[error("cannot read this process's SELinux context from {path}")]
    ProcessContext {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd}: cannot read its SELinux label (the security.selinux attribute)")]
    FileLabel {
        fd: RawFd,
        #[source]
        source: nix::Error,
    },
    #[error("fd {fd}: its SELinux label is {len} bytes, longer than a context may be ({max})")]
    FileLabelTooLong { fd: RawFd, len: usize, max: usize },
    #[error("{whose}: SELinux context {context:?} is malformed")]
    BadContext {
        whose: Whose,
        context: String,
        #[source]
        source: ContextError,
    },
    #[error("fd {fd} could not be inspected")]
    Stat {
        fd: RawFd,
        #[source]
        source: nix::Error,
    },
    #[error("fd {fd} is a {kind}; the sVirt check covers regular files and block devices only")]
    UnsupportedFileType { fd: RawFd, kind: &'static str },
    #[error("SELinux class {class:?} was not looked up when the sVirt check was set up")]
    UnknownClass { class: String },
    #[error("SELinux permission {perm:?} of class {class} was not looked up when the sVirt check was set up")]
    UnknownPermission { class: String, perm: String },
    #[error("{context:?} cannot be sent in an access request")]
    BadRequestContext {
        context: String,
        #[source]
        source: ContextError,
    },
    #[error("the access request for {subject} on {object} is {len} bytes, more than the kernel takes ({max})")]
    RequestTooLong {
        subject: String,
        object: String,
        len: usize,
        max: usize,
    },
    #[error("all {count} access transactions opened at setup are used: cannot ask about {object}")]
    NoTransactionsLeft { count: usize, object: String },
    #[error("asking the kernel whether {subject} may use {object} as {class} failed")]
    AccessQuery {
        subject: String,
        object: String,
        class: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel's access decision {reply:?} is malformed")]
    AccessReply { reply: String },
    #[error("fd {fd}: this process ({process}) is not granted {} on the {class} labelled {file}", .missing.join(", "))]
    Denied {
        fd: RawFd,
        process: String,
        file: String,
        class: ObjectClass,
        missing: Vec<String>,
    },
}

/// Why a context string is not a well-formed raw SELinux context.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("the context is empty")]
    Empty,
    #[error("the context is {len} bytes, more than {max}")]
    TooLong { len: usize, max: usize },
    #[error("byte {at} is not printable ASCII, or is a space")]
    BadCharacter { at: usize },
    #[error("the {field} field is missing or empty")]
    MissingField { field: &'static str },
    #[error("{text:?} is not a sensitivity (s0, s1, ...)")]
    BadSensitivity { text: String },
    #[error("{text:?} is not a category (c0, c1, ...)")]
    BadCategory { text: String },
    #[error("category range c{first}.c{last} runs backwards")]
    ReversedCategories { first: u16, last: u16 },
}

/// A raw SELinux context, `user:role:type[:level]`, borrowed from its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Context<'a> {
    pub user: &'a str,
    pub role: &'a str,
    pub type_: &'a str,
    /// `None` under a policy without MLS/MCS.
    pub level: Option<MlsRange>,
}

/// `low[-high]`; a single level is both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlsRange {
    pub low: Level,
    /// The clearance: what the MCS constraints compare against an object's level.
    pub high: Level,
}

/// `sN[:categories]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Level {
    pub sensitivity: u16,
    /// As written: `c1,c5.c9` is `[1..=1, 5..=9]`.
    pub categories: Vec<CategoryRange>,
}

/// `cN` (first == last) or `cN.cM`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CategoryRange {
    pub first: u16,
    pub last: u16,
}

/// How far a process's clearance reaches across MCS categories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum McsScope {
    NoCategories,
    AllCategories,
    /// Some categories, not all: confined, as sVirt confines each VM.
    Confined,
}

/// Checks that `text` can be a raw context: non-empty, at most [`CONTEXT_MAX`] bytes,
/// printable ASCII without spaces. The access transaction is space separated (`"%s %s %hu"`),
/// so a space or control character would change what the kernel is asked.
pub fn validate_context_text(text: &str) -> Result<(), ContextError> {
    if text.is_empty() {
        return Err(ContextError::Empty);
    }
    if text.len() > CONTEXT_MAX {
        return Err(ContextError::TooLong {
            len: text.len(),
            max: CONTEXT_MAX,
        });
    }
    match text.bytes().position(|b| !b.is_ascii_graphic()) {
        Some(at) => Err(ContextError::BadCharacter { at }),
        None => Ok(()),
    }
}

/// Parses a raw context. The level may itself contain colons (`s0:c1,c2`), so only the first
/// three separate fields.
pub fn parse_context(text: &str) -> Result<Context<'_>, ContextError> {
    validate_context_text(text)?;
    let mut fields = text.splitn(4, ':');
    let mut field = |name: &'static str| match fields.next() {
        Some(value) if !value.is_empty() => Ok(value),
        _ => Err(ContextError::MissingField { field: name }),
    };
    let user = field("user")?;
    let role = field("role")?;
    let type_ = field("type")?;
    let level = fields.next().map(parse_range).transpose()?;
    Ok(Context {
        user,
        role,
        type_,
        level,
    })
}

/// Parses `low[-high]`. Whether high dominates low is the kernel's to judge.
pub fn parse_range(text: &str) -> Result<MlsRange, ContextError> {
    match text.split_once('-') {
        Some((low, high)) => Ok(MlsRange {
            low: parse_level(low)?,
            high: parse_level(high)?,
        }),
        None => {
            let level = parse_level(text)?;
            Ok(MlsRange {
                low: level.clone(),
                high: level,
            })
        }
    }
}

/// Parses `sN[:cA,cB.cC,...]`.
pub fn parse_level(text: &str) -> Result<Level, ContextError> {
    let (sensitivity, categories) = match text.split_once(':') {
        Some((sensitivity, categories)) => (sensitivity, Some(categories)),
        None => (text, None),
    };
    let sensitivity = sensitivity
        .strip_prefix('s')
        .and_then(parse_decimal_u16)
        .ok_or_else(|| ContextError::BadSensitivity {
            text: sensitivity.to_owned(),
        })?;
    let categories = match categories {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(parse_category_item)
            .collect::<Result<_, _>>()?,
    };
    Ok(Level {
        sensitivity,
        categories,
    })
}

/// `cN` or `cN.cM` with N <= M.
fn parse_category_item(item: &str) -> Result<CategoryRange, ContextError> {
    let category = |text: &str| {
        text.strip_prefix('c')
            .and_then(parse_decimal_u16)
            .ok_or_else(|| ContextError::BadCategory {
                text: text.to_owned(),
            })
    };
    let (first, last) = match item.split_once('.') {
        Some((first, last)) => (category(first)?, category(last)?),
        None => {
            let only = category(item)?;
            (only, only)
        }
    };
    if first > last {
        return Err(ContextError::ReversedCategories { first, last });
    }
    Ok(CategoryRange { first, last })
}

/// Decimal digits only (`u16::from_str` would also take a sign).
fn parse_decimal_u16(text: &str) -> Option<u16> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| text.parse().ok()).flatten()
}

/// Decimal digits only.
fn parse_decimal_u32(text: &str) -> Option<u32> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| text.parse().ok()).flatten()
}

/// Hexadecimal digits only, no `0x` (the kernel prints `%x`).
fn parse_hex_u32(text: &str) -> Option<u32> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_hexdigit());
    digits.then(|| u32::from_str_radix(text, 16).ok()).flatten()
}

/// How far the clearance (the high level) reaches. The low level is dominated by the high
/// one, so it cannot add categories.
pub fn mcs_scope(range: &MlsRange) -> McsScope {
    let categories = &range.high.categories;
    if categories.is_empty() {
        McsScope::NoCategories
    } else if covers_all_categories(categories) {
        McsScope::AllCategories
    } else {
        McsScope::Confined
    }
}

/// Whether `level` (`s0:c1,c2`, `s0`, `s0-s0:c0.c1023`, ...) confines a process to some MCS
/// categories: the clearance has categories, but not all of c0..c1023.
#[cfg_attr(
    not(test),
    allow(
        dead_code,
        reason = "the MCS rule on a bare level; check_image_fd applies mcs_scope to the parsed context"
    )
)]
pub fn has_mcs_categories(level: &str) -> Result<bool, ContextError> {
    Ok(mcs_scope(&parse_range(level)?) == McsScope::Confined)
}

/// Whether the union of `categories` includes every one of c0..c(MCS_CATEGORIES - 1),
/// however it is spelled (`c0.c1023`, `c0.c511,c512.c1023`).
fn covers_all_categories(categories: &[CategoryRange]) -> bool {
    let mut sorted = categories.to_vec();
    sorted.sort_unstable_by_key(|range| range.first);
    let mut next_missing: u32 = 0;
    for range in &sorted {
        if u32::from(range.first) > next_missing {
            break;
        }
        next_missing = next_missing.max(u32::from(range.last) + 1);
    }
    next_missing >= MCS_CATEGORIES
}

/// The SELinux class of an image file, chosen from its type as libselinux's
/// `mode_to_security_class` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectClass {
    File,
    BlkFile,
}

/// `read`: reads. `write`: writes, fallocate, growing and resizing. `getattr`: fstat.
const FILE_READ_ONLY: &[&str] = &["read", "getattr"];
const FILE_WRITABLE: &[&str] = &["read", "write", "getattr"];
/// A block device's size also needs `ioctl` (BLKGETSIZE64).
const BLK_READ_ONLY: &[&str] = &["read", "getattr", "ioctl"];
const BLK_WRITABLE: &[&str] = &["read", "write", "getattr", "ioctl"];

impl ObjectClass {
    pub const ALL: [ObjectClass; 2] = [ObjectClass::File, ObjectClass::BlkFile];

    /// The class name in the policy.
    pub fn name(self) -> &'static str {
        match self {
            ObjectClass::File => "file",
            ObjectClass::BlkFile => "blk_file",
        }
    }

    /// The class of a file with `st_mode` `mode`; `None` for anything that cannot be an image.
    pub fn of_mode(mode: libc::mode_t) -> Option<ObjectClass> {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Some(ObjectClass::File),
            libc::S_IFBLK => Some(ObjectClass::BlkFile),
            _ => None,
        }
    }

    /// What serving an image of this class needs (see the module documentation).
    pub fn required_perms(self, writable: bool) -> &'static [&'static str] {
        match (self, writable) {
            (ObjectClass::File, false) => FILE_READ_ONLY,
            (ObjectClass::File, true) => FILE_WRITABLE,
            (ObjectClass::BlkFile, false) => BLK_READ_ONLY,
            (ObjectClass::BlkFile, true) => BLK_WRITABLE,
        }
    }
}

impl fmt::Display for ObjectClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A file type's name for an error.
fn file_type_name(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "regular file",
        libc::S_IFBLK => "block device",
        libc::S_IFDIR => "directory",
        libc::S_IFCHR => "character device",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFLNK => "symbolic link",
        _ => "file of unknown type",
    }
}

/// Checks that this process may serve `fd` (read-write if `writable`) under SELinux.
///
/// Not applicable when SELinux is off or the process is not confined to some MCS categories.
/// Otherwise asks `labels` for every permission at once; on a refusal, asks again one
/// permission at a time to name the missing ones (a source that refuses the set but grants each
/// alone gets the whole set named).
pub fn check_image_fd(
    labels: &dyn LabelSource,
    fd: BorrowedFd<'_>,
    writable: bool,
) -> Result<Verdict, SvirtError> {
    let not_applicable = |reason| Ok(Verdict::NotApplicable { reason });
    if !labels.enabled() {
        return not_applicable(NotApplicableReason::SelinuxDisabled);
    }
    let process = labels.own_context()?;
    let scope = parse_context(&process)
        .map_err(|source| SvirtError::BadContext {
            whose: Whose::Process,
            context: process.clone(),
            source,
        })?
        .level
        .as_ref()
        .map(mcs_scope);
    match scope {
        None => return not_applicable(NotApplicableReason::NoMlsField { process }),
        Some(McsScope::NoCategories) => {
            return not_applicable(NotApplicableReason::NoCategories { process })
        }
        Some(McsScope::AllCategories) => {
            return not_applicable(NotApplicableReason::AllCategories { process })
        }
        Some(McsScope::Confined) => {}
    }

    let raw = fd.as_raw_fd();
    let mode = fstat(fd)
        .map_err(|source| SvirtError::Stat { fd: raw, source })?
        .st_mode;
    let class = ObjectClass::of_mode(mode).ok_or(SvirtError::UnsupportedFileType {
        fd: raw,
        kind: file_type_name(mode),
    })?;
    let file = labels.file_context(fd)?;
    parse_context(&file).map_err(|source| SvirtError::BadContext {
        whose: Whose::File { fd: raw },
        context: file.clone(),
        source,
    })?;

    let perms = class.required_perms(writable);
    if labels.allowed(&process, &file, class.name(), perms)? {
        return Ok(Verdict::Allowed);
    }
    let mut missing = Vec::new();
    for perm in perms {
        if !labels.allowed(&process, &file, class.name(), &[perm])? {
            missing.push((*perm).to_owned());
        }
    }
    if missing.is_empty() {
        missing = perms.iter().map(|perm| (*perm).to_owned()).collect();
    }
    Err(SvirtError::Denied {
        fd: raw,
        process,
        file,
        class,
        missing,
    })
}

/// Strips what the kernel appends to a context (a NUL from `/proc/.../attr/current` and from
/// most labels; some tools also store a newline) and checks the rest.
pub fn trim_context(bytes: &[u8]) -> Result<&str, ContextError> {
    let end = bytes
        .iter()
        .rposition(|b| *b != 0 && *b != b'\n')
        .map_or(0, |last| last + 1);
    let trimmed = &bytes[..end];
    let text = std::str::from_utf8(trimmed).map_err(|error| ContextError::BadCharacter {
        at: error.valid_up_to(),
    })?;
    validate_context_text(text)?;
    Ok(text)
}

/// One `fgetxattr` call into `buf`; an empty `buf` asks for the attribute's size.
fn fgetxattr(fd: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> nix::Result<usize> {
    // SAFETY: `fd` is open for the borrow's lifetime; `name` is NUL-terminated; the kernel
    // writes at most `buf.len()` bytes through the pointer, and `buf` is valid for that many
    // (none when it is empty: with size 0 the kernel only returns the size).
    let ret = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    Errno::result(ret).map(isize::unsigned_abs)
}

/// Reads the context stored in extended attribute `name` of `fd`, as libselinux's
/// `fgetfilecon_raw`: a first try with [`LABEL_INITIAL`] bytes, then the attribute's size,
/// capped at [`CONTEXT_MAX`]. An empty attribute is an error, as there.
fn read_label_xattr(fd: BorrowedFd<'_>, name: &CStr) -> Result<String, SvirtError> {
    let raw = fd.as_raw_fd();
    let failed = |source| SvirtError::FileLabel { fd: raw, source };
    let mut buf = vec![0u8; LABEL_INITIAL];
    let len = match fgetxattr(fd, name, &mut buf) {
        Ok(len) => len,
        Err(Errno::ERANGE) => {
            let size = fgetxattr(fd, name, &mut []).map_err(failed)?;
            if size > CONTEXT_MAX + 1 {
                return Err(SvirtError::FileLabelTooLong {
                    fd: raw,
                    len: size,
                    max: CONTEXT_MAX,
                });
            }
            buf.resize(size, 0);
            // A label changed between the two calls fails with ERANGE again: reported.
            fgetxattr(fd, name, &mut buf).map_err(failed)?
        }
        Err(source) => return Err(failed(source)),
    };
    let bytes = buf.get(..len).unwrap_or(&buf);
    trim_context(bytes)
        .map(str::to_owned)
        .map_err(|source| SvirtError::BadContext {
            whose: Whose::File { fd: raw },
            context: String::from_utf8_lossy(bytes).into_owned(),
            source,
        })
}

/// Builds the request `sel_write_access` reads with `"%s %s %hu"`. The requested vector is
/// appended as libselinux does (`"%s %s %hu %x"`); the kernel computes the whole vector and
/// ignores it.
fn access_request(
    subject: &str,
    object: &str,
    class: u16,
    requested: u32,
) -> Result<String, SvirtError> {
    for context in [subject, object] {
        validate_context_text(context).map_err(|source| SvirtError::BadRequestContext {
            context: context.to_owned(),
            source,
        })?;
    }
    let request = format!("{subject} {object} {class} {requested:x}");
    if request.len() > ACCESS_REQUEST_MAX {
        return Err(SvirtError::RequestTooLong {
            subject: subject.to_owned(),
            object: object.to_owned(),
            len: request.len(),
            max: ACCESS_REQUEST_MAX,
        });
    }
    Ok(request)
}

/// Parses `sel_write_access`'s reply `"%x %x %x %x %u %x"` (allowed, decided, auditallow,
/// auditdeny, seqno, flags; kernels before 2.6.39 omit flags) and returns the allowed vector.
fn parse_access_reply(reply: &str) -> Result<u32, SvirtError> {
    let malformed = || SvirtError::AccessReply {
        reply: reply.to_owned(),
    };
    let fields: Vec<&str> = reply
        .trim_end_matches('\0')
        .split_ascii_whitespace()
        .collect();
    if !(5..=6).contains(&fields.len()) {
        return Err(malformed());
    }
    let mut numbers = fields.iter().enumerate().map(|(i, text)| match i {
        4 => parse_decimal_u32(text),
        _ => parse_hex_u32(text),
    });
    let allowed = numbers.next().flatten().ok_or_else(malformed)?;
    if numbers.any(|number| number.is_none()) {
        return Err(malformed());
    }
    Ok(allowed)
}

/// A class number from `class/<class>/index` (0 is no class).
fn parse_class_number(text: &str) -> Option<u16> {
    parse_decimal_u16(text.trim_end()).filter(|number| *number != 0)
}

/// A permission's bit from `class/<class>/perms/<perm>`, which holds its 1-based index (as
/// libselinux's `discover_class` reads it).
fn parse_perm_bit(text: &str) -> Option<u32> {
    let index = u32::from(parse_decimal_u16(text.trim_end())?);
    (1..=PERMS_PER_CLASS)
        .contains(&index)
        .then(|| 1 << (index - 1))
}

/// Reads a whole small file, refusing more than `limit` bytes.
fn read_small(path: &str, limit: usize) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    File::open(path)?.take(cap).read_to_end(&mut bytes)?;
    if bytes.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "file is longer than expected",
        ));
    }
    Ok(bytes)
}

/// Reads a class or permission index file of selinuxfs.
fn read_index_file(path: &str) -> Result<String, SvirtError> {
    let bytes = read_small(path, INDEX_FILE_MAX).map_err(|source| SvirtError::SelinuxFs {
        path: path.to_owned(),
        source,
    })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A class's number and the bits of the permissions vublk asks about.
#[derive(Debug)]
struct ClassNumbers {
    class: ObjectClass,
    number: u16,
    perms: Vec<(&'static str, u32)>,
}

impl ClassNumbers {
    fn load(class: ObjectClass) -> Result<ClassNumbers, SvirtError> {
        let dir = format!("{SELINUXFS}/class/{}", class.name());
        let path = format!("{dir}/index");
        let text = read_index_file(&path)?;
        let number = parse_class_number(&text).ok_or(SvirtError::BadIndex {
            path,
            text,
            max: u32::from(u16::MAX),
        })?;
        let perms = class
            .required_perms(true)
            .iter()
            .map(|perm| {
                let path = format!("{dir}/perms/{perm}");
                let text = read_index_file(&path)?;
                let bit = parse_perm_bit(&text).ok_or(SvirtError::BadIndex {
                    path,
                    text,
                    max: PERMS_PER_CLASS,
                })?;
                Ok((*perm, bit))
            })
            .collect::<Result<_, SvirtError>>()?;
        Ok(ClassNumbers {
            class,
            number,
            perms,
        })
    }

    /// The bits of `perms`, each of which must have been loaded.
    fn mask(&self, perms: &[&str]) -> Result<u32, SvirtError> {
        perms.iter().try_fold(0, |mask, perm| {
            self.perms
                .iter()
                .find(|(name, _)| name == perm)
                .map(|(_, bit)| mask | bit)
                .ok_or_else(|| SvirtError::UnknownPermission {
                    class: self.class.name().to_owned(),
                    perm: (*perm).to_owned(),
                })
        })
    }

    /// Every loaded permission: what a request names as requested.
    fn all_loaded(&self) -> u32 {
        self.perms.iter().fold(0, |mask, (_, bit)| mask | bit)
    }
}

/// A kept answer: the allowed vector of `subject` on `object` for class `class`.
#[derive(Debug)]
struct Decision {
    subject: String,
    object: String,
    class: u16,
    allowed: u32,
}

/// The unused single-question fds and the answers already had.
#[derive(Debug)]
struct Transactions {
    unused: Vec<File>,
    decisions: Vec<Decision>,
}

/// The kernel as a [`LabelSource`], without libselinux. Built before confinement; see the
/// module documentation for its limits.
#[derive(Debug)]
pub struct KernelLabels {
    process: String,
    classes: Vec<ClassNumbers>,
    transactions: Mutex<Transactions>,
}

impl KernelLabels {
    /// Opens and reads everything the check will need; `None` when SELinux is off (selinuxfs
    /// absent, or no policy loaded yet).
    pub fn open() -> Result<Option<KernelLabels>, SvirtError> {
        match std::fs::metadata(SELINUXFS_ENFORCE) {
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(SvirtError::SelinuxFs {
                    path: SELINUXFS_ENFORCE.to_owned(),
                    source,
                })
            }
        }
        let process = read_process_context()?;
        if process == NO_POLICY_CONTEXT {
            return Ok(None);
        }
        let classes = ObjectClass::ALL
            .into_iter()
            .map(ClassNumbers::load)
            .collect::<Result<Vec<_>, _>>()?;
        let unused = (0..ACCESS_TRANSACTIONS)
            .map(|_| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(SELINUXFS_ACCESS)
                    .map_err(|source| SvirtError::SelinuxFs {
                        path: SELINUXFS_ACCESS.to_owned(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(KernelLabels {
            process,
            classes,
            transactions: Mutex::new(Transactions {
                unused,
                decisions: Vec::new(),
            }),
        }))
    }

    /// The allowed vector for (`subject`, `object`, `class`): a kept answer, or one question.
    fn allowed_vector(
        &self,
        subject: &str,
        object: &str,
        class: &ClassNumbers,
    ) -> Result<u32, SvirtError> {
        let mut state = self
            .transactions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let kept = state.decisions.iter().find(|decision| {
            decision.class == class.number
                && decision.subject == subject
                && decision.object == object
        });
        if let Some(decision) = kept {
            return Ok(decision.allowed);
        }
        let request = access_request(subject, object, class.number, class.all_loaded())?;
        let transaction = state
            .unused
            .pop()
            .ok_or_else(|| SvirtError::NoTransactionsLeft {
                count: ACCESS_TRANSACTIONS,
                object: object.to_owned(),
            })?;
        let reply = transact(&transaction, &request).map_err(|source| SvirtError::AccessQuery {
            subject: subject.to_owned(),
            object: object.to_owned(),
            class: class.class.name(),
            source,
        })?;
        let allowed = parse_access_reply(&reply)?;
        state.decisions.push(Decision {
            subject: subject.to_owned(),
            object: object.to_owned(),
            class: class.number,
            allowed,
        });
        Ok(allowed)
    }
}

/// One question on a fresh `/sys/fs/selinux/access` fd: the request in a single write (the
/// kernel takes one write per open), then the reply, which the kernel keeps from offset 0.
fn transact(transaction: &File, request: &str) -> io::Result<String> {
    let written = (&*transaction).write(request.as_bytes())?;
    if written != request.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the request was cut short",
        ));
    }
    let mut reply = [0u8; ACCESS_REPLY_MAX];
    let len = transaction.read_at(&mut reply, 0)?;
    Ok(String::from_utf8_lossy(reply.get(..len).unwrap_or(&reply)).into_owned())
}

/// This process's raw context, as libselinux's `getcon_raw` reads it.
fn read_process_context() -> Result<String, SvirtError> {
    let mut last_missing = None;
    for path in PROC_ATTR_CURRENT {
        match read_small(path, CONTEXT_MAX + 1) {
            Ok(bytes) => {
                return trim_context(&bytes).map(str::to_owned).map_err(|source| {
                    SvirtError::BadContext {
                        whose: Whose::Process,
                        context: String::from_utf8_lossy(&bytes).into_owned(),
                        source,
                    }
                })
            }
            Err(source) if source.kind() == io::ErrorKind::NotFound => {
                last_missing = Some((path, source));
            }
            Err(source) => return Err(SvirtError::ProcessContext { path, source }),
        }
    }
    let (path, source) = last_missing.unwrap_or((
        PROC_ATTR_CURRENT[0],
        io::Error::from(io::ErrorKind::NotFound),
    ));
    Err(SvirtError::ProcessContext { path, source })
}

impl LabelSource for KernelLabels {
    /// Always: [`KernelLabels::open`] gives `None` when SELinux is off.
    fn enabled(&self) -> bool {
        true
    }

    fn own_context(&self) -> Result<String, SvirtError> {
        Ok(self.process.clone())
    }

    fn file_context(&self, fd: BorrowedFd<'_>) -> Result<String, SvirtError> {
        read_label_xattr(fd, SELINUX_XATTR)
    }

    fn allowed(
        &self,
        subject: &str,
        object: &str,
        class: &str,
        perms: &[&str],
    ) -> Result<bool, SvirtError> {
        let class = self
            .classes
            .iter()
            .find(|numbers| numbers.class.name() == class)
            .ok_or_else(|| SvirtError::UnknownClass {
                class: class.to_owned(),
            })?;
        let wanted = class.mask(perms)?;
        let allowed = self.allowed_vector(subject, object, class)?;
        Ok(allowed & wanted == wanted)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::os::fd::AsFd;

    use super::*;

    const PROCESS: &str = "system_u:system_r:svirt_t:s0:c392,c662";
    const IMAGE: &str = "system_u:object_r:svirt_image_t:s0:c392,c662";
    const OTHER_VM_IMAGE: &str = "system_u:object_r:svirt_image_t:s0:c17,c801";

    /// A question asked of [`FakeLabels::allowed`]: subject, object, class, permissions.
    type Question = (String, String, String, Vec<String>);

    /// A label source with one process context, one file label (or none: unreadable) and the
    /// permissions it grants; it records the questions asked.
    struct FakeLabels {
        enabled: bool,
        process: &'static str,
        file: Option<&'static str>,
        granted: &'static [&'static str],
        asked: RefCell<Vec<Question>>,
    }

    impl FakeLabels {
        fn new(
            process: &'static str,
            file: Option<&'static str>,
            granted: &'static [&'static str],
        ) -> Self {
            FakeLabels {
                enabled: true,
                process,
                file,
                granted,
                asked: RefCell::new(Vec::new()),
            }
        }

        fn disabled() -> Self {
            FakeLabels {
                enabled: false,
                ..FakeLabels::new(PROCESS, Some(IMAGE), &[])
            }
        }
    }

    impl LabelSource for FakeLabels {
        fn enabled(&self) -> bool {
            self.enabled
        }

        fn own_context(&self) -> Result<String, SvirtError> {
            Ok(self.process.to_owned())
        }

        fn file_context(&self, fd: BorrowedFd<'_>) -> Result<String, SvirtError> {
            self.file.map(str::to_owned).ok_or(SvirtError::FileLabel {
                fd: fd.as_raw_fd(),
                source: Errno::ENODATA,
            })
        }

        fn allowed(
            &self,
            subject: &str,
            object: &str,
            class: &str,
            perms: &[&str],
        ) -> Result<bool, SvirtError> {
            self.asked.borrow_mut().push((
                subject.to_owned(),
                object.to_owned(),
                class.to_owned(),
                perms.iter().map(|perm| (*perm).to_owned()).collect(),
            ));
            Ok(perms.iter().all(|perm| self.granted.contains(perm)))
        }
    }

    fn image() -> File {
        tempfile::tempfile().unwrap()
    }

    #[test]
    fn selinux_off_is_not_applicable() {
        let labels = FakeLabels::disabled();

        let verdict = check_image_fd(&labels, image().as_fd(), true).unwrap();

        assert_eq!(
            verdict,
            Verdict::NotApplicable {
                reason: NotApplicableReason::SelinuxDisabled
            }
        );
        assert!(labels.asked.borrow().is_empty());
    }

    #[test]
    fn process_without_categories_is_not_applicable() {
        let labels = FakeLabels::new("system_u:system_r:svirt_t:s0", Some(IMAGE), &[]);

        let verdict = check_image_fd(&labels, image().as_fd(), true).unwrap();

        assert_eq!(
            verdict,
            Verdict::NotApplicable {
                reason: NotApplicableReason::NoCategories {
                    process: "system_u:system_r:svirt_t:s0".to_owned()
                }
            }
        );
    }

    #[test]
    fn process_with_every_category_is_not_applicable() {
        let process = "unconfined_u:unconfined_r:unconfined_t:s0-s0:c0.c1023";
        let labels = FakeLabels::new(process, Some(IMAGE), &[]);

        let verdict = check_image_fd(&labels, image().as_fd(), true).unwrap();

        assert_eq!(
            verdict,
            Verdict::NotApplicable {
                reason: NotApplicableReason::AllCategories {
                    process: process.to_owned()
                }
            }
        );
    }

    #[test]
    fn process_under_a_policy_without_mls_is_not_applicable() {
        let labels = FakeLabels::new("user_u:user_r:user_t", Some(IMAGE), &[]);

        let verdict = check_image_fd(&labels, image().as_fd(), false).unwrap();

        assert_eq!(
            verdict,
            Verdict::NotApplicable {
                reason: NotApplicableReason::NoMlsField {
                    process: "user_u:user_r:user_t".to_owned()
                }
            }
        );
    }

    #[test]
    fn read_only_fd_with_a_granting_label_is_allowed_asking_read_and_getattr_on_file() {
        let labels = FakeLabels::new(PROCESS, Some(IMAGE), &["read", "getattr"]);

        let verdict = check_image_fd(&labels, image().as_fd(), false).unwrap();

        assert_eq!(verdict, Verdict::Allowed);
        assert_eq!(
            *labels.asked.borrow(),
            vec![(
                PROCESS.to_owned(),
                IMAGE.to_owned(),
                "file".to_owned(),
                vec!["read".to_owned(), "getattr".to_owned()]
            )]
        );
    }

    #[test]
    fn writable_fd_without_write_is_denied_naming_fd_labels_and_write() {
        let labels = FakeLabels::new(PROCESS, Some(OTHER_VM_IMAGE), &["read", "getattr"]);
        let file = image();

        let error = check_image_fd(&labels, file.as_fd(), true).unwrap_err();

        let message = error.to_string();
        let SvirtError::Denied {
            fd,
            process,
            file: label,
            class,
            missing,
        } = error
        else {
            panic!("expected Denied, got {error:?}");
        };
        assert_eq!(fd, file.as_raw_fd());
        assert_eq!(process, PROCESS);
        assert_eq!(label, OTHER_VM_IMAGE);
        assert_eq!(class, ObjectClass::File);
        assert_eq!(missing, vec!["write".to_owned()]);
        assert!(
            message.contains(&format!("fd {}", file.as_raw_fd())),
            "{message}"
        );
        assert!(message.contains(PROCESS), "{message}");
        assert!(message.contains(OTHER_VM_IMAGE), "{message}");
        assert!(message.contains("write"), "{message}");
    }

    #[test]
    fn denial_names_every_missing_permission() {
        let labels = FakeLabels::new(PROCESS, Some(OTHER_VM_IMAGE), &["getattr"]);

        let error = check_image_fd(&labels, image().as_fd(), true).unwrap_err();

        let SvirtError::Denied { missing, .. } = error else {
            panic!("expected Denied, got {error:?}");
        };
        assert_eq!(missing, vec!["read".to_owned(), "write".to_owned()]);
    }

    #[test]
    fn unreadable_file_label_is_an_error_naming_the_fd() {
        let labels = FakeLabels::new(PROCESS, None, &["read", "write", "getattr"]);
        let file = image();

        let error = check_image_fd(&labels, file.as_fd(), true).unwrap_err();

        assert!(matches!(error, SvirtError::FileLabel { fd, .. } if fd == file.as_raw_fd()));
        assert!(error
            .to_string()
            .contains(&format!("fd {}", file.as_raw_fd())));
    }

    #[test]
    fn malformed_file_label_is_an_error_naming_the_fd() {
        let labels = FakeLabels::new(
            PROCESS,
            Some("svirt_image_t"),
            &["read", "write", "getattr"],
        );
        let file = image();

        let error = check_image_fd(&labels, file.as_fd(), true).unwrap_err();

        assert!(matches!(
            error,
            SvirtError::BadContext { whose: Whose::File { fd }, source: ContextError::MissingField { field: "role" }, .. }
                if fd == file.as_raw_fd()
        ));
    }

    #[test]
    fn malformed_process_context_is_an_error() {
        let labels = FakeLabels::new("system_u:system_r:svirt_t:s0:c392,,c662", Some(IMAGE), &[]);

        let error = check_image_fd(&labels, image().as_fd(), true).unwrap_err();

        assert!(matches!(
            error,
            SvirtError::BadContext {
                whose: Whose::Process,
                source: ContextError::BadCategory { .. },
                ..
            }
        ));
    }

    #[test]
    fn a_fifo_is_refused_naming_the_fd() {
        let labels = FakeLabels::new(PROCESS, Some(IMAGE), &["read", "write", "getattr"]);
        let (read_end, _write_end) = nix::unistd::pipe().unwrap();

        let error = check_image_fd(&labels, read_end.as_fd(), false).unwrap_err();

        assert!(matches!(
            error,
            SvirtError::UnsupportedFileType { fd, kind: "fifo" } if fd == read_end.as_raw_fd()
        ));
    }

    #[test]
    fn class_follows_the_file_type() {
        assert_eq!(
            ObjectClass::of_mode(libc::S_IFREG | 0o644),
            Some(ObjectClass::File)
        );
        assert_eq!(
            ObjectClass::of_mode(libc::S_IFBLK | 0o660),
            Some(ObjectClass::BlkFile)
        );
        assert_eq!(ObjectClass::of_mode(libc::S_IFCHR | 0o666), None);
        assert_eq!(ObjectClass::of_mode(libc::S_IFDIR | 0o755), None);
        assert_eq!(ObjectClass::of_mode(libc::S_IFIFO), None);
        assert_eq!(ObjectClass::BlkFile.name(), "blk_file");
        assert_eq!(ObjectClass::File.name(), "file");
    }

    #[test]
    fn permissions_are_what_serving_needs() {
        assert_eq!(ObjectClass::File.required_perms(false), ["read", "getattr"]);
        assert_eq!(
            ObjectClass::File.required_perms(true),
            ["read", "write", "getattr"]
        );
        assert_eq!(
            ObjectClass::BlkFile.required_perms(false),
            ["read", "getattr", "ioctl"]
        );
        assert_eq!(
            ObjectClass::BlkFile.required_perms(true),
            ["read", "write", "getattr", "ioctl"]
        );
    }

    #[test]
    fn context_splits_into_user_role_type_and_a_level_with_colons() {
        let context = parse_context(PROCESS).unwrap();

        assert_eq!(context.user, "system_u");
        assert_eq!(context.role, "system_r");
        assert_eq!(context.type_, "svirt_t");
        let level = Level {
            sensitivity: 0,
            categories: vec![
                CategoryRange {
                    first: 392,
                    last: 392,
                },
                CategoryRange {
                    first: 662,
                    last: 662,
                },
            ],
        };
        assert_eq!(
            context.level,
            Some(MlsRange {
                low: level.clone(),
                high: level
            })
        );
    }

    #[test]
    fn context_range_has_a_low_and_a_high_level() {
        let context = parse_context("system_u:system_r:virtd_t:s0-s0:c0.c1023").unwrap();

        let range = context.level.unwrap();
        assert_eq!(
            range.low,
            Level {
                sensitivity: 0,
                categories: vec![]
            }
        );
        assert_eq!(
            range.high,
            Level {
                sensitivity: 0,
                categories: vec![CategoryRange {
                    first: 0,
                    last: 1023
                }]
            }
        );
    }

    #[test]
    fn context_without_level_has_none() {
        let context = parse_context("user_u:user_r:user_t").unwrap();

        assert_eq!(context.level, None);
        assert_eq!(context.type_, "user_t");
    }

    #[test]
    fn malformed_contexts_are_refused_precisely() {
        assert_eq!(parse_context(""), Err(ContextError::Empty));
        assert_eq!(
            parse_context("system_u::svirt_t:s0"),
            Err(ContextError::MissingField { field: "role" })
        );
        assert_eq!(
            parse_context("system_u:system_r"),
            Err(ContextError::MissingField { field: "type" })
        );
        assert_eq!(
            parse_context("system_u:system_r:svirt_t:s0 x"),
            Err(ContextError::BadCharacter { at: 28 })
        );
        assert_eq!(
            parse_context("system_u:system_r:svirt_t:"),
            Err(ContextError::BadSensitivity {
                text: String::new()
            })
        );
        assert_eq!(
            parse_context(&"u".repeat(CONTEXT_MAX + 1)),
            Err(ContextError::TooLong {
                len: CONTEXT_MAX + 1,
                max: CONTEXT_MAX
            })
        );
    }

    #[test]
    fn malformed_levels_are_refused_precisely() {
        assert_eq!(
            parse_level("x0"),
            Err(ContextError::BadSensitivity {
                text: "x0".to_owned()
            })
        );
        assert_eq!(
            parse_level("s+1"),
            Err(ContextError::BadSensitivity {
                text: "s+1".to_owned()
            })
        );
        assert_eq!(
            parse_level("s0:"),
            Err(ContextError::BadCategory {
                text: String::new()
            })
        );
        assert_eq!(
            parse_level("s0:c"),
            Err(ContextError::BadCategory {
                text: "c".to_owned()
            })
        );
        assert_eq!(
            parse_level("s0:c1,,c2"),
            Err(ContextError::BadCategory {
                text: String::new()
            })
        );
        assert_eq!(
            parse_level("s0:c70000"),
            Err(ContextError::BadCategory {
                text: "c70000".to_owned()
            })
        );
        assert_eq!(
            parse_level("s0:c5.c2"),
            Err(ContextError::ReversedCategories { first: 5, last: 2 })
        );
    }

    #[test]
    fn mcs_categories_are_some_but_not_all() {
        assert_eq!(has_mcs_categories("s0:c1,c2"), Ok(true));
        assert_eq!(has_mcs_categories("s0-s0:c1,c2"), Ok(true));
        assert_eq!(has_mcs_categories("s0:c0.c1022"), Ok(true));
        assert_eq!(has_mcs_categories("s0"), Ok(false));
        assert_eq!(has_mcs_categories("s0-s0"), Ok(false));
        assert_eq!(has_mcs_categories("s0-s0:c0.c1023"), Ok(false));
        assert_eq!(has_mcs_categories("s0:c512.c1023,c0.c511"), Ok(false));
        assert_eq!(has_mcs_categories("s0:c0.c100,c102.c1023"), Ok(true));
        assert_eq!(
            has_mcs_categories("s0:c"),
            Err(ContextError::BadCategory {
                text: "c".to_owned()
            })
        );
    }

    #[test]
    fn context_text_is_trimmed_of_the_kernels_nul_and_newline() {
        assert_eq!(
            trim_context(b"system_u:system_r:svirt_t:s0:c1,c2\0"),
            Ok("system_u:system_r:svirt_t:s0:c1,c2")
        );
        assert_eq!(trim_context(b"a:b:c\n\0"), Ok("a:b:c"));
        assert_eq!(trim_context(b"\0"), Err(ContextError::Empty));
        assert_eq!(
            trim_context(b"a:b\xff:c"),
            Err(ContextError::BadCharacter { at: 3 })
        );
    }

    #[test]
    fn label_is_read_from_the_xattr_without_its_nul() {
        let file = image();
        let name = c"user.vublk-svirt-test";
        set_xattr(&file, name, b"system_u:object_r:svirt_image_t:s0:c1,c2\0");

        let label = read_label_xattr(file.as_fd(), name).unwrap();

        assert_eq!(label, "system_u:object_r:svirt_image_t:s0:c1,c2");
    }

    #[test]
    fn label_longer_than_the_first_buffer_is_read_whole() {
        let file = image();
        let name = c"user.vublk-svirt-test";
        let long = format!("system_u:object_r:{}:s0:c1,c2", "t".repeat(LABEL_INITIAL));
        set_xattr(&file, name, long.as_bytes());

        let label = read_label_xattr(file.as_fd(), name).unwrap();

        assert_eq!(label, long);
    }

    #[test]
    fn missing_label_is_an_error_naming_the_fd() {
        let file = image();

        let error = read_label_xattr(file.as_fd(), c"user.vublk-svirt-absent").unwrap_err();

        assert!(
            matches!(error, SvirtError::FileLabel { fd, source: Errno::ENODATA } if fd == file.as_raw_fd())
        );
    }

    /// Sets a `user.` attribute: the real `fgetxattr` path, without SELinux or privileges.
    fn set_xattr(file: &File, name: &CStr, value: &[u8]) {
        // SAFETY: the fd is open; `name` is NUL-terminated; `value` is valid for reads of
        // `value.len()` bytes, the size passed.
        let ret = unsafe {
            libc::fsetxattr(
                file.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(ret, 0, "fsetxattr: {}", io::Error::last_os_error());
    }

    #[test]
    fn access_request_is_what_sel_write_access_scans() {
        let request = access_request(PROCESS, IMAGE, 6, 0x2000_0012).unwrap();

        assert_eq!(request, format!("{PROCESS} {IMAGE} 6 20000012"));
    }

    #[test]
    fn access_request_refuses_a_context_with_a_space() {
        let error = access_request(PROCESS, "a:b:c 7 0", 6, 1).unwrap_err();

        assert!(matches!(
            error,
            SvirtError::BadRequestContext {
                source: ContextError::BadCharacter { at: 5 },
                ..
            }
        ));
    }

    #[test]
    fn access_request_refuses_more_than_the_kernel_takes() {
        let long = format!("u:r:{}", "t".repeat(CONTEXT_MAX - 4));

        let error = access_request(&long, &long, 6, 1).unwrap_err();

        assert!(matches!(
            error,
            SvirtError::RequestTooLong {
                max: ACCESS_REQUEST_MAX,
                ..
            }
        ));
    }

    #[test]
    fn access_reply_gives_the_allowed_vector() {
        assert_eq!(
            parse_access_reply("12 ffffffff 0 ffffffff 41 0").unwrap(),
            0x12
        );
        assert_eq!(parse_access_reply("7 ffffffff 0 ffffffff 41").unwrap(), 0x7);
        assert_eq!(
            parse_access_reply("7 ffffffff 0 ffffffff 41 1\0").unwrap(),
            0x7
        );
    }

    #[test]
    fn malformed_access_replies_are_refused() {
        for reply in [
            "",
            "12 ffffffff 0 ffffffff",
            "12 ffffffff 0 ffffffff 4x 0",
            "-1 0 0 0 0 0",
            "1 0 0 0 0 0 0",
            "100000000 0 0 0 0",
        ] {
            assert!(
                matches!(
                    parse_access_reply(reply),
                    Err(SvirtError::AccessReply { .. })
                ),
                "{reply:?}"
            );
        }
    }

    #[test]
    fn class_and_permission_indices_parse_as_libselinux_reads_them() {
        assert_eq!(parse_class_number("6\n"), Some(6));
        assert_eq!(parse_class_number("0"), None);
        assert_eq!(parse_class_number("x"), None);
        assert_eq!(parse_perm_bit("1\n"), Some(1));
        assert_eq!(parse_perm_bit("2"), Some(2));
        assert_eq!(parse_perm_bit("32"), Some(1 << 31));
        assert_eq!(parse_perm_bit("0"), None);
        assert_eq!(parse_perm_bit("33"), None);
        assert_eq!(parse_perm_bit("+3"), None);
    }

    #[test]
    fn permission_mask_refuses_a_permission_not_loaded() {
        let class = ClassNumbers {
            class: ObjectClass::File,
            number: 6,
            perms: vec![("read", 1 << 1), ("write", 1 << 2), ("getattr", 1 << 4)],
        };

        assert_eq!(class.mask(&["read", "getattr"]).unwrap(), 0b1_0010);
        assert_eq!(class.all_loaded(), 0b1_0110);
        assert!(matches!(
            class.mask(&["lock"]),
            Err(SvirtError::UnknownPermission { perm, .. }) if perm == "lock"
        ));
    }
}

//! Confinement: after setup, vublk can touch nothing but the fds it was given.
//!
//! [`confine`] runs once, on the main thread, while the process is still single-threaded
//! (Landlock and namespaces apply to the calling thread and the threads it starts later), in
//! this order, each step a module of its own:
//! 1. `close_fds`: every inherited fd vublk did not adopt is closed (close_range).
//! 2. `namespaces`: new mount (an empty tmpfs root via pivot_root), network, IPC and UTS
//!    namespaces; a user namespace first when unprivileged.
//! 3. `identity`: the `--user` identity (as root), every capability and the bounding set
//!    dropped, no_new_privs, not dumpable, rlimits (NOFILE, CORE 0, NPROC bounded).
//! 4. `landlock`: every filesystem and network right handled, none granted; abstract unix
//!    sockets and signals scoped where the ABI has it.
//! 5. `seccomp`: a process-wide allowlist; each thread then narrows it to its role.
//!
//! Each step reports what it did. In `on` mode a step that cannot be applied stops startup
//! with the reason; in `weak` mode it is reported and skipped; `off` applies nothing.
//! io_uring rings are restricted where they are created (`engine/ring.rs`): seccomp cannot see
//! the operations inside a ring.

mod close_fds;
mod identity;
mod landlock_fs;
mod namespaces;
pub mod notify;
#[cfg(feature = "sandbox-probe")]
pub mod probe;
pub mod seccomp;
#[cfg(feature = "svirt")]
pub mod svirt;

/// The SELinux label source, opened during setup (feature `svirt`).
#[cfg(feature = "svirt")]
static LABELS: std::sync::OnceLock<Option<svirt::KernelLabels>> = std::sync::OnceLock::new();

/// Opens the SELinux label source while paths can still be opened (feature `svirt`; a no-op
/// without it).
pub fn open_label_source() -> Result<(), String> {
    #[cfg(feature = "svirt")]
    {
        let labels = svirt::KernelLabels::open().map_err(|e| e.to_string())?;
        if labels.is_none() {
            log::info!("svirt: SELinux is not enabled; image labels are not checked");
        }
        let _ = LABELS.set(labels);
    }
    Ok(())
}

/// With the `svirt` feature and SELinux enabled: refuses an image fd whose label this process
/// may not read (or write, for a writable one). Otherwise accepts every fd.
pub fn check_image_label(fd: std::os::fd::BorrowedFd<'_>, writable: bool) -> Result<(), String> {
    #[cfg(feature = "svirt")]
    if let Some(Some(labels)) = LABELS.get() {
        return svirt::check_image_fd(labels, fd, writable)
            .map(|verdict| log::debug!("svirt: fd {fd:?}: {verdict:?}"))
            .map_err(|e| e.to_string());
    }
    let _ = (fd, writable);
    Ok(())
}

use std::os::fd::RawFd;

use crate::args::SandboxArg;
use crate::config::User;

/// Why confinement failed in `on` mode.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("confinement step '{step}' could not be applied: {reason} (run with --sandbox weak to accept a weaker sandbox)")]
    Unavailable { step: &'static str, reason: String },
    #[error("confinement step '{step}' failed")]
    Failed {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What a step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    Applied(String),
    /// Not available here (kernel, privileges); only accepted in `weak` mode.
    Unavailable(String),
}

/// The steps' outcomes, in order.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub steps: Vec<(&'static str, StepOutcome)>,
}

impl Report {
    fn push(&mut self, step: &'static str, outcome: StepOutcome) {
        match &outcome {
            StepOutcome::Applied(what) => log::info!("sandbox: {step}: {what}"),
            StepOutcome::Unavailable(why) => {
                log::warn!("sandbox: {step}: NOT APPLIED: {why}")
            }
        }
        self.steps.push((step, outcome));
    }
}

/// What to confine with.
#[derive(Clone, Debug)]
pub struct Plan {
    pub mode: SandboxArg,
    pub user: Option<User>,
    /// Inherited fds vublk did not adopt: closed.
    pub close: Vec<RawFd>,
    /// Fds open now that must stay (everything vublk created or adopted).
    pub keep: Vec<RawFd>,
}

/// Applies every step of `plan`, in order. See the module comment.
pub fn confine(plan: &Plan) -> Result<Report, SandboxError> {
    let mut report = Report::default();
    if plan.mode == SandboxArg::Off {
        log::warn!("sandbox: OFF (--sandbox off): vublk runs with every right it was started with; for debugging only");
        return Ok(report);
    }
    let weak = plan.mode == SandboxArg::Weak;
    let step = |report: &mut Report,
                name: &'static str,
                result: Result<StepOutcome, SandboxError>|
     -> Result<(), SandboxError> {
        match result? {
            StepOutcome::Unavailable(reason) if !weak => {
                Err(SandboxError::Unavailable { step: name, reason })
            }
            outcome => {
                report.push(name, outcome);
                Ok(())
            }
        }
    };
    step(
        &mut report,
        "close fds",
        close_fds::apply(&plan.close, &plan.keep),
    )?;
    // Counted before the namespaces hide /proc.
    let nproc = identity::nproc_limit(plan.user);
    step(&mut report, "namespaces", namespaces::apply())?;
    step(&mut report, "rlimits", identity::set_limits(nproc))?;
    step(&mut report, "bounding set", identity::drop_bounding_set())?;
    step(&mut report, "identity", identity::drop_identity(plan.user))?;
    step(&mut report, "capabilities", identity::drop_capabilities())?;
    step(&mut report, "no_new_privs", identity::no_new_privs())?;
    step(&mut report, "not dumpable", identity::not_dumpable())?;
    step(&mut report, "landlock", landlock_fs::apply())?;
    step(&mut report, "seccomp", seccomp::apply_process_filter())?;
    Ok(report)
}

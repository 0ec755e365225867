//! Step 4: Landlock with every filesystem and network right handled and none granted.
//!
//! No path can be opened, created, removed, executed or truncated by name, no TCP port bound or
//! connected, and (ABI 6) no abstract unix socket outside the sandbox reached and no signal
//! sent outside it. Fds opened before keep their rights: Landlock checks at open time. A
//! kernel without Landlock, or one that cannot enforce the filesystem rights, makes this step
//! unavailable; missing network rights or scopes (older ABIs) are reported, and accepted
//! because seccomp already forbids socket() and kill() of other processes.

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetStatus,
    Scope, ABI,
};

use super::{SandboxError, StepOutcome};

/// The newest ABI this build knows; older kernels get what they support (best effort), and
/// the outcome says which ABI the kernel has.
const TARGET_ABI: ABI = ABI::V6;

/// The Landlock ABI the running kernel offers (0: none).
pub fn kernel_abi() -> i64 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag, the call only returns
    // the ABI number (or an error); nothing is read or written.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    rc.max(0)
}

pub fn apply() -> Result<StepOutcome, SandboxError> {
    let abi = kernel_abi();
    if abi == 0 {
        return Ok(StepOutcome::Unavailable(
            "the kernel has no Landlock (not built in, or not in the lsm= boot list)".into(),
        ));
    }
    let failed = |e: landlock::RulesetError| SandboxError::Failed {
        step: "landlock",
        source: std::io::Error::other(e.to_string()),
    };
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(TARGET_ABI))
        .map_err(failed)?
        .handle_access(AccessNet::from_all(TARGET_ABI))
        .map_err(failed)?
        .scope(Scope::from_all(TARGET_ABI))
        .map_err(failed)?
        .create()
        .map_err(failed)?
        .restrict_self()
        .map_err(failed)?;
    let net = if abi >= 4 {
        "TCP bind/connect denied"
    } else {
        "no network rights (ABI < 4)"
    };
    let scopes = if abi >= 6 {
        "abstract unix sockets and signals scoped"
    } else {
        "no scopes (ABI < 6)"
    };
    match status.ruleset {
        RulesetStatus::NotEnforced => Ok(StepOutcome::Unavailable(format!(
            "Landlock ABI {abi} could not enforce the ruleset"
        ))),
        RulesetStatus::FullyEnforced | RulesetStatus::PartiallyEnforced => {
            Ok(StepOutcome::Applied(format!(
                "ABI {abi}: every filesystem right handled, none granted; {net}; {scopes}"
            )))
        }
    }
}

//! Step 1: close every fd the process inherited and did not adopt.
//!
//! A manager may leak fds into vublk (a terminal, another VM's image); only the fds vublk
//! adopted (images, fd set members, sockets) and the ones it created stay. The closing is done
//! with close_range over the gaps between the fds kept, so fds above the highest one go too.

use std::os::fd::RawFd;

use super::{SandboxError, StepOutcome};

/// Closes `close` (and anything else open outside `keep` and stdio).
pub fn apply(close: &[RawFd], keep: &[RawFd]) -> Result<StepOutcome, SandboxError> {
    let mut kept: Vec<u32> = keep
        .iter()
        .chain([0, 1, 2].iter())
        .filter_map(|&fd| u32::try_from(fd).ok())
        .collect();
    kept.sort_unstable();
    kept.dedup();
    for fd in close {
        if let Ok(fd) = u32::try_from(*fd) {
            if kept.binary_search(&fd).is_ok() {
                return Err(SandboxError::Failed {
                    step: "close fds",
                    source: std::io::Error::other(format!(
                        "fd {fd} is both to be kept and to be closed"
                    )),
                });
            }
        }
    }
    for (first, last) in gaps(&kept) {
        // SAFETY: close_range only closes descriptors in [first, last]; none of them is one
        // vublk uses (every fd it adopted or created is in `kept`).
        let rc = unsafe { libc::close_range(first, last, 0) };
        if rc != 0 {
            return Err(SandboxError::Failed {
                step: "close fds",
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(StepOutcome::Applied(format!(
        "closed {} inherited fd(s) vublk did not adopt; {} kept",
        close.len(),
        kept.len()
    )))
}

/// The ranges of fd numbers between (and above) the sorted, distinct `kept` ones.
fn gaps(kept: &[u32]) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut next = 0u32;
    for &fd in kept {
        if fd > next {
            out.push((next, fd - 1));
        }
        next = fd.saturating_add(1);
    }
    out.push((next, u32::MAX));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_cover_everything_but_the_kept_fds() {
        assert_eq!(gaps(&[0, 1, 2]), [(3, u32::MAX)]);
        assert_eq!(gaps(&[0, 1, 2, 5, 6, 9]), [(3, 4), (7, 8), (10, u32::MAX)]);
    }
}

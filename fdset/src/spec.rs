//! The spelling of a file argument: `fd:N`, `/dev/fdset/N` or a path.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::str::FromStr;

/// Prefix of an fd set address, as QEMU spells it.
pub const FDSET_PREFIX: &str = "/dev/fdset/";

/// Where a file comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileSpec {
    /// An fd inherited from the manager (`fd:N`).
    Fd(RawFd),
    /// The fd set with this id (`/dev/fdset/N`).
    FdSet(u64),
    /// A path, opened once during setup (for trying vublk by hand).
    Path(PathBuf),
}

/// A file argument that cannot be parsed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("'{text}': fd:N needs a non-negative fd number")]
    BadFd { text: String },
    #[error(
        "'{text}': fds 0, 1 and 2 are stdin, stdout and stderr, not a file the manager passed"
    )]
    StdioFd { text: String },
    #[error("'{text}': /dev/fdset/N needs a non-negative fd set id")]
    BadFdSet { text: String },
    #[error("an empty string is not a file")]
    Empty,
}

impl FromStr for FileSpec {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(number) = text.strip_prefix("fd:") {
            let fd: RawFd = number.parse().map_err(|_| SpecError::BadFd {
                text: text.to_string(),
            })?;
            if fd < 0 {
                return Err(SpecError::BadFd {
                    text: text.to_string(),
                });
            }
            if fd <= 2 {
                return Err(SpecError::StdioFd {
                    text: text.to_string(),
                });
            }
            return Ok(FileSpec::Fd(fd));
        }
        if let Some(number) = text.strip_prefix(FDSET_PREFIX) {
            let set = number.parse().map_err(|_| SpecError::BadFdSet {
                text: text.to_string(),
            })?;
            return Ok(FileSpec::FdSet(set));
        }
        if text.is_empty() {
            return Err(SpecError::Empty);
        }
        Ok(FileSpec::Path(PathBuf::from(text)))
    }
}

impl std::fmt::Display for FileSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileSpec::Fd(fd) => write!(f, "fd:{fd}"),
            FileSpec::FdSet(set) => write!(f, "{FDSET_PREFIX}{set}"),
            FileSpec::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_spec_parses_number() {
        assert_eq!("fd:7".parse(), Ok(FileSpec::Fd(7)));
    }

    #[test]
    fn fd_spec_refuses_stdio() {
        assert!(matches!(
            "fd:1".parse::<FileSpec>(),
            Err(SpecError::StdioFd { .. })
        ));
    }

    #[test]
    fn fd_spec_refuses_negative_and_garbage() {
        assert!(matches!(
            "fd:-3".parse::<FileSpec>(),
            Err(SpecError::BadFd { .. })
        ));
        assert!(matches!(
            "fd:x".parse::<FileSpec>(),
            Err(SpecError::BadFd { .. })
        ));
        assert!(matches!(
            "fd:".parse::<FileSpec>(),
            Err(SpecError::BadFd { .. })
        ));
    }

    #[test]
    fn fdset_spec_parses_id() {
        assert_eq!("/dev/fdset/12".parse(), Ok(FileSpec::FdSet(12)));
        assert!(matches!(
            "/dev/fdset/a".parse::<FileSpec>(),
            Err(SpecError::BadFdSet { .. })
        ));
    }

    #[test]
    fn other_text_is_a_path() {
        assert_eq!(
            "disk.img".parse(),
            Ok(FileSpec::Path(PathBuf::from("disk.img")))
        );
        assert_eq!("".parse::<FileSpec>(), Err(SpecError::Empty));
    }

    #[test]
    fn display_round_trips() {
        for text in ["fd:9", "/dev/fdset/3", "/tmp/x.img"] {
            assert_eq!(text.parse::<FileSpec>().unwrap().to_string(), text);
        }
    }
}

//! `vublk probe FILE [--format F]`: what an image's header says, as JSON with
//! `qemu-img info --output=json` key names, from one bounded read. Managers use it to learn
//! which backing files to open next; it follows no name it finds.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{Context, Result};
use vublk_fdset::{FdStatus, FileSpec};
use vublk_formats::qcow2::probe_fd;
use vublk_formats::Format;

use crate::args::{FormatArg, ProbeArgs};

pub fn run(args: ProbeArgs) -> Result<()> {
    let spec: FileSpec = args.file.parse().context("probe")?;
    let hint = args.format.map(|f| match f {
        FormatArg::Raw => Format::Raw,
        FormatArg::Qcow2 => Format::Qcow2,
    });
    let info = match &spec {
        FileSpec::Fd(fd) => {
            FdStatus::of_raw(*fd).with_context(|| format!("probe {spec}"))?;
            // SAFETY: the fd was just checked to be open; it is only borrowed for the probe
            // and stays owned by whoever passed it.
            let borrowed = unsafe { BorrowedFd::borrow_raw(*fd) };
            probe_fd(borrowed, hint)
        }
        FileSpec::Path(path) => {
            let file = File::open(path).with_context(|| format!("probe {spec}: cannot open"))?;
            probe_fd(file.as_fd(), hint)
        }
        FileSpec::FdSet(_) => {
            anyhow::bail!("probe {spec}: fd sets exist only inside a running vublk")
        }
    }
    .with_context(|| format!("probe {spec}"))?;
    println!("{}", serde_json::to_string_pretty(&info)?);
    Ok(())
}

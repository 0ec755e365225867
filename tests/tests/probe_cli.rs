//! `vublk probe` as a manager runs it: on a path and on an inherited fd, its JSON agrees with
//! `qemu-img info --output=json` on the keys both report, and it never opens the backing file
//! an image names.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failure is the test failing"
)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use serde_json::Value;
use vublk_tests::daemon::{pass_fds, vublk_bin};

fn json(cmd: &mut Command) -> Value {
    let out = cmd.stderr(Stdio::piped()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn qemu_img_info(path: &std::path::Path) -> Value {
    json(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(path),
    )
}

#[test]
fn probe_of_an_fd_matches_qemu_img_info_and_does_not_follow_the_backing_name() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("top.qcow2");
    // The backing file named in the image does not exist: probe must not care.
    let status = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-F",
            "raw",
            "-b",
            "/nonexistent/base.raw",
        ])
        .arg(&top)
        .arg("64M")
        .status()
        .unwrap();
    assert!(status.success());
    let file = File::open(&top).unwrap();
    let mut cmd = Command::new(vublk_bin());
    cmd.args(["probe", "fd:7"]);
    pass_fds(&mut cmd, &[(file.as_raw_fd(), 7)]);

    let ours = json(&mut cmd);
    let theirs = qemu_img_info(&top);

    for key in [
        "format",
        "virtual-size",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
        "dirty-flag",
    ] {
        assert_eq!(ours[key], theirs[key], "key {key}");
    }
    for key in [
        "compat",
        "compression-type",
        "refcount-bits",
        "corrupt",
        "lazy-refcounts",
    ] {
        assert_eq!(
            ours["format-specific"]["data"][key], theirs["format-specific"]["data"][key],
            "format-specific key {key}"
        );
    }
}

#[test]
fn probe_of_a_raw_path_reports_raw_and_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.img");
    File::create(&raw).unwrap().set_len(3 << 20).unwrap();

    let ours = json(Command::new(vublk_bin()).arg("probe").arg(&raw));

    assert_eq!(ours["format"], "raw");
    assert_eq!(ours["virtual-size"], 3 << 20);
}

#[test]
fn probe_of_a_closed_fd_fails_naming_it() {
    let out = Command::new(vublk_bin())
        .args(["probe", "fd:63"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fd 63"), "stderr: {stderr}");
}

//! End-to-end tests with a real QEMU guest (TCG): a backend serves a raw image over
//! vhost-user-blk, a Debian cloud kernel runs fio `--verify` on the disk, and a second QEMU
//! process reconnecting to the same running backend verifies the first one's data. In between,
//! the host reads fio's block headers straight from the image file.
//!
//! The same tests run against qemu-storage-daemon as a check of the fixture itself. Guests are
//! serialised within this binary: TCG guests are CPU bound, and running several at once on a
//! small machine only stretches each one towards its timeout. The guest artifacts are built on
//! first use (`tests/e2e/build-guest.sh`); if they cannot be built every test fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use anyhow::{ensure, Result};
use vublk_tests::daemon::{BackendKind, Daemon, DiskOptions};
use vublk_tests::guest::{
    check_fio_blocks_in_image, FioJob, Guest, GuestArtifacts, GuestOptions, GuestStatus, IoEngine,
    Job,
};

/// Size of the images the write/verify tests use (sparse).
const IMAGE_SIZE: u64 = 256 << 20;
/// An image size that is not a power of two, to catch capacity rounding.
const ODD_IMAGE_SIZE: u64 = (200 << 20) + (12 << 10);
/// Serial passed to vublk; virtio-blk serials are at most 20 bytes.
const SERIAL: &str = "vublk-e2e-serial-01";

/// One guest at a time (see the module comment).
fn guest_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where the full serial console of `test`'s `job` goes, kept for post-mortems in
/// `target/e2e/logs`. A previous run's file is removed, so no stale console is left behind.
fn console_log(test: &str, job: &str) -> Result<PathBuf> {
    let dir = GuestArtifacts::default_dir().join("logs");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{test}-{job}.console"));
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(path)
}

fn sparse_image(dir: &Path, size: u64) -> Result<PathBuf> {
    let path = dir.join("disk.raw");
    File::create(&path)?.set_len(size)?;
    Ok(path)
}

/// The workload of the persistence tests: 32 MiB from 16 MiB, mixed block sizes, depth 8.
fn persistence_job() -> FioJob {
    FioJob {
        offset: 16 << 20,
        seed: 0x5eed,
        ..FioJob::default()
    }
}

/// Writes with fio --verify in one QEMU, then verifies from a second QEMU process that
/// reconnects to the same, still running, backend. `direct` is the backend's O_DIRECT
/// (`--cache none`).
fn write_then_verify_across_vmm_restart(
    test: &str,
    kind: BackendKind,
    ioengine: IoEngine,
    direct: bool,
) -> Result<()> {
    let _guard = guest_lock();
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let image = sparse_image(dir.path(), IMAGE_SIZE)?;
    let socket = dir.path().join("vhost-user-blk.sock");
    let mut disk = DiskOptions::raw(&image);
    disk.direct = direct;
    let mut daemon = Daemon::start(kind, &disk, &socket)?;
    let job = FioJob {
        ioengine,
        ..persistence_job()
    };

    let write_log = console_log(test, "write")?;
    let verify_log = console_log(test, "verify")?;
    let mut opts = GuestOptions::new(&socket, Job::Write(job.clone()));
    opts.console_log = Some(write_log);
    opts.diagnose = vec![(format!("{kind:?}"), daemon.pid())];
    let write = Guest::run(&opts)?;
    write.expect_pass()?;
    eprintln!("{kind:?}: {write}");
    ensure!(
        daemon.child.try_wait()?.is_none(),
        "{kind:?} exited after the first QEMU disconnected"
    );

    let blocks = check_fio_blocks_in_image(&image, &job)?;
    eprintln!("{kind:?}: the image holds all {blocks} verify intervals fio wrote");

    opts.job = Job::Verify(job);
    opts.console_log = Some(verify_log);
    let verify = Guest::run(&opts)?;
    verify.expect_pass()?;
    eprintln!("{kind:?}: {verify}; test took {:.1?}", started.elapsed());
    ensure!(
        daemon.child.try_wait()?.is_none(),
        "{kind:?} exited after the second QEMU disconnected"
    );
    Ok(())
}

/// Boots an `info` guest with `num_queues` queues against `kind` serving an odd-sized image.
fn disk_info(
    test: &str,
    kind: BackendKind,
    num_queues: u16,
    extra_args: &[&str],
) -> Result<vublk_tests::guest::DiskInfo> {
    let _guard = guest_lock();
    let dir = tempfile::tempdir()?;
    let image = sparse_image(dir.path(), ODD_IMAGE_SIZE)?;
    let socket = dir.path().join("vhost-user-blk.sock");
    let mut disk = DiskOptions::raw(&image);
    disk.num_queues = num_queues;
    disk.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
    let daemon = Daemon::start(kind, &disk, &socket)?;
    let mut opts = GuestOptions::new(&socket, Job::Info);
    opts.diagnose = vec![(format!("{kind:?}"), daemon.pid())];
    opts.num_queues = num_queues;
    opts.console_log = Some(console_log(test, "info")?);
    // virtio_blk uses at most one queue per possible CPU.
    opts.cpus = u32::from(num_queues);
    let output = Guest::run(&opts)?;
    output.expect_pass()?;
    eprintln!("{kind:?}: {output}; info {:?}", output.info);
    output.disk_info()
}

#[test]
fn vublk_guest_data_survives_vmm_restart() -> Result<()> {
    write_then_verify_across_vmm_restart(
        "vublk_guest_data_survives_vmm_restart",
        BackendKind::Vublk,
        IoEngine::Libaio,
        false,
    )
}

#[test]
fn vublk_guest_data_survives_vmm_restart_io_uring_cache_none() -> Result<()> {
    write_then_verify_across_vmm_restart(
        "vublk_guest_data_survives_vmm_restart_io_uring_cache_none",
        BackendKind::Vublk,
        IoEngine::IoUring,
        true,
    )
}

#[test]
fn vublk_guest_sees_capacity_serial_and_queues() -> Result<()> {
    let info = disk_info(
        "vublk_guest_sees_capacity_serial_and_queues",
        BackendKind::Vublk,
        2,
        &["--serial", SERIAL],
    )?;

    assert_eq!(info.size_sectors, ODD_IMAGE_SIZE / 512);
    assert_eq!(info.serial.as_deref(), Some(SERIAL));
    assert!(!info.read_only);
    assert_eq!(info.mq.len(), 2, "mq dirs: {:?}", info.mq);
    Ok(())
}

/// The guest's driver sees what vublk offers: 4 KiB logical blocks, discard with
/// `--discard unmap`, and a read-only disk with `--read-only`.
#[test]
fn vublk_guest_sees_block_size_discard_and_read_only() -> Result<()> {
    let lbs = disk_info(
        "vublk_guest_sees_block_size_and_discard",
        BackendKind::Vublk,
        1,
        &["--logical-block-size", "4096", "--discard", "unmap"],
    )?;
    let ro = disk_info(
        "vublk_guest_sees_read_only",
        BackendKind::Vublk,
        1,
        &["--read-only"],
    )?;

    assert_eq!(lbs.logical_block_size, 4096);
    // virtio feature bit 13 is VIRTIO_BLK_F_DISCARD.
    assert_eq!(
        lbs.features.chars().nth(13),
        Some('1'),
        "features {}",
        lbs.features
    );
    assert!(ro.read_only);
    assert_eq!(
        ro.features.chars().nth(5),
        Some('1'),
        "VIRTIO_BLK_F_RO in {}",
        ro.features
    );
    Ok(())
}

#[test]
fn qsd_guest_data_survives_vmm_restart() -> Result<()> {
    write_then_verify_across_vmm_restart(
        "qsd_guest_data_survives_vmm_restart",
        BackendKind::Qsd,
        IoEngine::Libaio,
        false,
    )
}

#[test]
fn qsd_guest_sees_capacity_and_queues() -> Result<()> {
    let info = disk_info(
        "qsd_guest_sees_capacity_and_queues",
        BackendKind::Qsd,
        2,
        &[],
    )?;

    assert_eq!(info.size_sectors, ODD_IMAGE_SIZE / 512);
    assert!(!info.read_only);
    assert_eq!(info.mq.len(), 2, "mq dirs: {:?}", info.mq);
    Ok(())
}

/// The `verify` job must not pass vacuously: on a disk nothing was written to it fails.
#[test]
fn qsd_verify_job_fails_on_unwritten_disk() -> Result<()> {
    let _guard = guest_lock();
    let dir = tempfile::tempdir()?;
    let image = sparse_image(dir.path(), IMAGE_SIZE)?;
    let socket = dir.path().join("vhost-user-blk.sock");
    let _daemon = Daemon::start(BackendKind::Qsd, &DiskOptions::raw(&image), &socket)?;

    let mut opts = GuestOptions::new(&socket, Job::Verify(persistence_job()));
    opts.console_log = Some(console_log(
        "qsd_verify_job_fails_on_unwritten_disk",
        "verify",
    )?);
    let output = Guest::run(&opts)?;
    eprintln!("Qsd: {output}");

    assert_eq!(output.result.status, GuestStatus::Fail);
    assert_eq!(
        output.result.fields.get("reason").map(String::as_str),
        Some("fio")
    );
    Ok(())
}

/// Runs a host command and returns its stdout, failing with its stderr.
fn host(cmd: &mut std::process::Command) -> Result<String> {
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A guest reads a qcow2 chain through vublk: a zstd-compressed qcow2 base under a qcow2
/// overlay with its own data, both passed as fds, served read-only. The md5 the guest computes
/// over what its virtio-blk driver read must equal the md5 of `qemu-img convert -O raw`.
#[test]
fn vublk_guest_reads_a_compressed_qcow2_chain_passed_as_fds() -> Result<()> {
    use std::os::fd::AsRawFd;
    const BYTES: u64 = 48 << 20;
    let _guard = guest_lock();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    // Content: a different 4 KiB pattern per block, with some runs of zeroes.
    let data: Vec<u8> = (0..BYTES)
        .map(|i| {
            let block = i / 4096;
            if block % 7 == 3 {
                0
            } else {
                u8::try_from((i % 251 + block * 13) % 256).unwrap_or(0)
            }
        })
        .collect();
    std::fs::write(d.join("src.raw"), &data)?;
    host(
        std::process::Command::new("qemu-img")
            .args([
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                "compression_type=zstd",
            ])
            .arg(d.join("src.raw"))
            .arg(d.join("base.qcow2")),
    )?;
    host(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(d.join("base.qcow2"))
            .arg(d.join("top.qcow2"))
            .arg(BYTES.to_string()),
    )?;
    host(
        std::process::Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0x5a 1M 3M",
                "-c",
                "write -z 8M 1M",
            ])
            .arg(d.join("top.qcow2")),
    )?;
    host(
        std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(d.join("top.qcow2"))
            .arg(d.join("oracle.raw")),
    )?;
    let oracle = host(std::process::Command::new("md5sum").arg(d.join("oracle.raw")))?;
    let oracle = oracle
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();

    let top = File::open(d.join("top.qcow2"))?;
    let base = File::open(d.join("base.qcow2"))?;
    let socket = d.join("vhost-user-blk.sock");
    let mut cmd = std::process::Command::new(vublk_tests::daemon::vublk_bin());
    cmd.args([
        "serve",
        "--image",
        "fd:10",
        "--format",
        "qcow2",
        "--read-only",
    ])
    .args([
        "--backing",
        "fd:11,format=qcow2",
        "--num-queues",
        "1",
        "--socket-path",
    ])
    .arg(&socket);
    vublk_tests::daemon::pass_fds(&mut cmd, &[(top.as_raw_fd(), 10), (base.as_raw_fd(), 11)]);
    let daemon = Daemon::spawn(BackendKind::Vublk, &mut cmd, &socket)?;

    let mut opts = GuestOptions::new(&socket, Job::Checksum { bytes: BYTES });
    opts.diagnose = vec![("vublk".into(), daemon.pid())];
    opts.console_log = Some(console_log("qcow2_chain", "checksum")?);
    let output = Guest::run(&opts)?;
    output.expect_pass()?;
    let guest_md5 = output.result.fields.get("md5").cloned().unwrap_or_default();

    ensure!(
        guest_md5 == oracle,
        "the guest read {guest_md5}, qemu-img convert gives {oracle}"
    );
    Ok(())
}

/// Opens `path` read-write (or read-only) for passing to vublk as an inherited fd.
fn open_image(path: &Path, writable: bool) -> Result<File> {
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)?)
}

/// A qcow2 overlay (64 KiB clusters) over a raw base with a pattern, the chain vublk serves in
/// the qcow2 end-to-end tests.
fn overlay_over_raw_base(d: &Path) -> Result<(PathBuf, PathBuf)> {
    let base = d.join("base.raw");
    let pattern: Vec<u8> = (0..(64u64 << 20)).map(|i| (i / 4096 % 199) as u8).collect();
    std::fs::write(&base, pattern)?;
    let top = d.join("top.qcow2");
    host(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&top)
            .arg(IMAGE_SIZE.to_string()),
    )?;
    Ok((top, base))
}

/// `vublk serve` on a qcow2 overlay (fd 10, read-write) over a raw base (fd 11, read-only).
fn serve_overlay_by_fds(top: &File, base: &File, socket: &Path) -> Result<Daemon> {
    use std::os::fd::AsRawFd;
    let mut cmd = std::process::Command::new(vublk_tests::daemon::vublk_bin());
    cmd.args(["serve", "--image", "fd:10", "--format", "qcow2"])
        .args(["--backing", "fd:11,format=raw", "--socket-path"])
        .arg(socket);
    vublk_tests::daemon::pass_fds(&mut cmd, &[(top.as_raw_fd(), 10), (base.as_raw_fd(), 11)]);
    Daemon::spawn(BackendKind::Vublk, &mut cmd, socket)
}

/// `qemu-img check`: its exit code (0 clean, 3 leaks only, 2 corruption) and report.
fn qemu_img_check(image: &Path) -> Result<(i32, String)> {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(image)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// The guest writes with fio --verify to a qcow2 overlay over a raw base, both passed to vublk
/// as fds, and verifies from a second QEMU; after vublk stops, `qemu-img check` finds the
/// image clean and the raw conversion holds every block fio wrote, while the base is untouched.
#[test]
fn vublk_guest_writes_a_qcow2_overlay_over_a_raw_base_passed_as_fds() -> Result<()> {
    let _guard = guest_lock();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (top_path, base_path) = overlay_over_raw_base(d)?;
    let base_before = std::fs::read(&base_path)?;
    let top = open_image(&top_path, true)?;
    let base = open_image(&base_path, false)?;
    let socket = d.join("vhost-user-blk.sock");
    let daemon = serve_overlay_by_fds(&top, &base, &socket)?;
    // Straddle the end of the base (64 MiB) so COW from it and allocation past it both happen.
    let job = FioJob {
        offset: 48 << 20,
        seed: 0x9c02,
        ..FioJob::default()
    };
    let mut opts = GuestOptions::new(&socket, Job::Write(job.clone()));
    opts.diagnose = vec![("vublk".into(), daemon.pid())];
    opts.console_log = Some(console_log("qcow2_overlay", "write")?);
    Guest::run(&opts)?.expect_pass()?;
    opts.job = Job::Verify(job.clone());
    opts.console_log = Some(console_log("qcow2_overlay", "verify")?);
    Guest::run(&opts)?.expect_pass()?;
    let status = daemon.terminate()?;
    ensure!(status.success(), "vublk exited with {status}");
    let (code, report) = qemu_img_check(&top_path)?;
    ensure!(code == 0, "qemu-img check exit {code}:\n{report}");
    let converted = d.join("converted.raw");
    host(
        std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&top_path)
            .arg(&converted),
    )?;
    let blocks = check_fio_blocks_in_image(&converted, &job)?;
    eprintln!("qemu-img convert of the overlay holds all {blocks} verify intervals fio wrote");
    ensure!(
        std::fs::read(&base_path)? == base_before,
        "the read-only base changed"
    );
    Ok(())
}

/// kill -9 of vublk while the guest's fio --verify writes to a qcow2 overlay: `qemu-img check`
/// must find no corruption (leaked clusters allowed), and a new vublk must serve the image
/// writable to a guest that writes and verifies again.
#[test]
fn vublk_killed_during_guest_qcow2_writes_leaves_no_corruption() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let _guard = guest_lock();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (top_path, base_path) = overlay_over_raw_base(d)?;
    let top = open_image(&top_path, true)?;
    let base = open_image(&base_path, false)?;
    let socket = d.join("vhost-user-blk.sock");
    let mut daemon = serve_overlay_by_fds(&top, &base, &socket)?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(daemon.pid())?);
    let job = FioJob {
        offset: 32 << 20,
        size: 96 << 20,
        seed: 0x4b11,
        ..FioJob::default()
    };
    let start_blocks = std::fs::metadata(&top_path)?.blocks();
    // Kill once the guest has written a few MiB through vublk (allocations under way).
    let watcher = {
        let top_path = top_path.clone();
        std::thread::spawn(move || -> Result<u64> {
            let deadline = Instant::now() + std::time::Duration::from_secs(240);
            loop {
                let blocks = std::fs::metadata(&top_path)?.blocks();
                if blocks > start_blocks + 8 * 2048 {
                    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
                    return Ok(blocks * 512);
                }
                ensure!(Instant::now() < deadline, "the guest never wrote 8 MiB");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        })
    };
    let mut opts = GuestOptions::new(&socket, Job::Write(job.clone()));
    opts.diagnose = vec![("vublk".into(), daemon.pid())];
    opts.console_log = Some(console_log("qcow2_kill", "write")?);
    opts.timeout = std::time::Duration::from_secs(60);
    // The guest loses its disk mid-run: its result is not the point.
    let _ = Guest::run(&opts);
    let allocated = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("watcher panicked"))??;
    let status = daemon.child.wait()?;
    eprintln!("vublk killed with {allocated} bytes allocated in the overlay: {status}");
    let (code, report) = qemu_img_check(&top_path)?;
    ensure!(
        code == 0 || code == 3,
        "qemu-img check after kill -9 exit {code}:\n{report}"
    );
    eprintln!("qemu-img check after kill -9: exit {code}");

    // A new vublk serves the same image: the guest writes and verifies elsewhere on it.
    let daemon = serve_overlay_by_fds(&top, &base, &socket)?;
    let again = FioJob {
        offset: 160 << 20,
        seed: 0x4b12,
        ..FioJob::default()
    };
    let mut opts = GuestOptions::new(&socket, Job::Write(again.clone()));
    opts.diagnose = vec![("vublk".into(), daemon.pid())];
    opts.console_log = Some(console_log("qcow2_kill", "rewrite")?);
    Guest::run(&opts)?.expect_pass()?;
    opts.job = Job::Verify(again);
    opts.console_log = Some(console_log("qcow2_kill", "reverify")?);
    Guest::run(&opts)?.expect_pass()?;
    let status = daemon.terminate()?;
    ensure!(status.success(), "vublk exited with {status}");
    let (code, report) = qemu_img_check(&top_path)?;
    ensure!(
        code == 0 || code == 3,
        "qemu-img check after the second run exit {code}:\n{report}"
    );
    Ok(())
}

/// Waits until the guest's console has a `watch` line containing `want`.
fn wait_for_watch(guest: &Guest, want: &str, timeout: std::time::Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let console = guest.console_so_far();
        if console
            .lines()
            .any(|l| l.contains("VUBLK-E2E-INFO watch") && l.contains(want))
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the guest never reported '{want}'; console:\n{}",
            vublk_tests::guest::tail(&console, 30)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The manager resizes the disk and then swaps the medium (for a qcow2 overlay over a raw base,
/// both passed as fd sets over the control socket by qemu.qmp) while a real guest runs: the
/// guest's virtio-blk driver sees the new size without a reboot (vublk's config-change
/// notification over the backend channel) and reads the new medium's contents.
#[test]
fn vublk_guest_sees_resize_and_medium_change_without_reboot() -> Result<()> {
    use serde_json::json;
    use vublk_tests::qmp::{FdMode, QmpClient};
    let _guard = guest_lock();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let first = d.join("first.raw");
    std::fs::write(&first, vec![0xa1u8; 32 << 20])?;
    let (top, base) = overlay_over_raw_base(d)?;
    host(
        std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0xb2 0 64k"])
            .arg(&top),
    )?;
    let socket = d.join("vhost-user-blk.sock");
    let control = d.join("qmp.sock");
    let mut cmd = std::process::Command::new(vublk_tests::daemon::vublk_bin());
    cmd.arg("serve")
        .arg("--image")
        .arg(&first)
        .args(["--format", "raw", "--socket-path"])
        .arg(&socket)
        .arg("--control")
        .arg(&control);
    let daemon = Daemon::spawn(BackendKind::Vublk, &mut cmd, &socket)?;
    let mut qmp = QmpClient::connect(&control)?;
    let mut opts = GuestOptions::new(&socket, Job::Watch { changes: 2 });
    opts.diagnose = vec![("vublk".into(), daemon.pid())];
    opts.console_log = Some(console_log("media", "watch")?);
    let guest = Guest::spawn(&opts)?;
    let wait = std::time::Duration::from_secs(90);
    wait_for_watch(
        &guest,
        &format!("size={} head={}", (32 << 20) / 512, "a1".repeat(16)),
        wait,
    )?;

    qmp.ok("block_resize", json!({"device": "disk0", "size": 48 << 20}))?;
    wait_for_watch(&guest, &format!("size={}", (48 << 20) / 512), wait)?;

    qmp.add_fd(1, &top, FdMode::ReadWrite, "top")?;
    qmp.add_fd(2, &base, FdMode::ReadOnly, "base")?;
    qmp.ok(
        "blockdev-change-medium",
        json!({"id": "disk0", "filename": "/dev/fdset/1", "format": "qcow2",
               "backing": [{"filename": "/dev/fdset/2", "format": "raw"}]}),
    )?;
    let out = guest.wait()?;
    out.expect_pass()?;
    let console = out.console.clone();
    ensure!(
        console.contains(&format!(
            "size={} head={}",
            IMAGE_SIZE / 512,
            "b2".repeat(16)
        )),
        "the guest did not see the new medium:\n{}",
        vublk_tests::guest::tail(&console, 30)
    );
    let status = daemon.terminate()?;
    ensure!(status.success(), "vublk exited with {status}");
    let (code, report) = qemu_img_check(&top)?;
    ensure!(code == 0, "qemu-img check exit {code}:\n{report}");
    Ok(())
}

/// Waits until the guest's console contains `needle`.
fn wait_for_console(guest: &Guest, needle: &str, timeout: std::time::Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !guest.console_so_far().contains(needle) {
        ensure!(
            Instant::now() < deadline,
            "the guest never printed '{needle}':\n{}",
            vublk_tests::guest::tail(&guest.console_so_far(), 30)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// kill -9 of vublk, twice, while the guest's fio writes and verifies; each time a new vublk is
/// started with the same arguments, QEMU reconnects (reconnect-ms), vublk resubmits the
/// requests the dead one left in flight (the inflight region QEMU kept), and fio finishes
/// with no I/O error and no verify failure. Run over raw and over a qcow2 overlay (whose
/// allocations in flight at the kill are redone or leaked, never half-applied).
fn survive_restarts(image_kind: &str, signal: nix::sys::signal::Signal) -> Result<()> {
    let _guard = guest_lock();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let socket = d.join("vhost-user-blk.sock");
    let (image, format, backing) = match image_kind {
        "raw" => (sparse_image(d, IMAGE_SIZE)?, "raw", None),
        _ => {
            let (top, base) = overlay_over_raw_base(d)?;
            (top, "qcow2", Some(base))
        }
    };
    // Up to 6 restarts: SIGKILL keeps going until one restart found requests in flight (after
    // at least 2), SIGTERM does 2.
    let logs: Vec<PathBuf> = (0..7).map(|i| d.join(format!("vublk-{i}.log"))).collect();
    let start = |log: &Path| -> Result<Daemon> {
        let mut cmd = std::process::Command::new(vublk_tests::daemon::vublk_bin());
        cmd.arg("serve")
            .arg("--image")
            .arg(&image)
            .args(["--format", format])
            .arg("--socket-path")
            .arg(&socket)
            .stderr(File::create(log)?);
        if let Some(base) = &backing {
            let mut arg = base.clone().into_os_string();
            arg.push(",format=raw");
            cmd.arg("--backing").arg(arg);
        }
        Daemon::spawn(BackendKind::Vublk, &mut cmd, &socket)
    };
    let mut daemon = start(&logs[0])?;
    let job = FioJob {
        size: 160 << 20,
        seed: 0x6a11,
        iodepth: 16,
        ..FioJob::default()
    };
    let mut opts = GuestOptions::new(&socket, Job::Write(job));
    opts.reconnect_ms = Some(100);
    opts.console_log = Some(console_log(&format!("restart_{image_kind}"), "write")?);
    let guest = Guest::spawn(&opts)?;
    wait_for_console(
        &guest,
        "running job write",
        std::time::Duration::from_secs(90),
    )?;
    let mut stalls = Vec::new();
    let resubmitted_in = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("resubmitting")
            .count()
    };
    for (used, log) in (1..).zip(logs[1..].iter()) {
        let found = logs[..used]
            .iter()
            .map(|l| resubmitted_in(l))
            .sum::<usize>()
            > 0;
        let enough = if signal == nix::sys::signal::Signal::SIGKILL {
            used > 2 && found
        } else {
            used > 2
        };
        if enough || guest.console_so_far().contains("VUBLK-E2E-RESULT") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(if used == 1 {
            900
        } else {
            400
        }));
        let killed_at = Instant::now();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(daemon.pid())?);
        nix::sys::signal::kill(pid, signal)?;
        let status = daemon.child.wait()?;
        if signal == nix::sys::signal::Signal::SIGTERM {
            ensure!(status.success(), "SIGTERM: vublk exited with {status}");
        }
        daemon = start(log)?;
        // Serving again once QEMU reconnected and a queue worker runs.
        let pid = daemon.pid();
        while !queue_worker_runs(pid) {
            ensure!(
                killed_at.elapsed() < std::time::Duration::from_secs(30),
                "QEMU did not reconnect to the restarted vublk"
            );
            if guest.console_so_far().contains("VUBLK-E2E-RESULT") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        stalls.push(killed_at.elapsed());
        // Give the new vublk time to log what it resubmitted.
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = guest.wait()?;
    out.expect_pass()?;
    let resubmitted: usize = logs[1..]
        .iter()
        .map(|l| {
            std::fs::read_to_string(l)
                .unwrap_or_default()
                .matches("resubmitting")
                .count()
        })
        .sum();
    eprintln!(
        "{image_kind}, {signal}: fio passed across {} restarts; signal to serving again: {stalls:?}; restarts that resubmitted requests: {resubmitted}",
        stalls.len()
    );
    // qcow2 allocation keeps requests in flight long enough for a kill to find some (raw
    // writes complete in microseconds while the TCG guest is the bottleneck); SIGTERM drains.
    if image_kind == "qcow2" && signal == nix::sys::signal::Signal::SIGKILL {
        ensure!(
            resubmitted > 0,
            "no restart found requests in flight: the kills missed fio's writes"
        );
    }
    let status = daemon.terminate()?;
    ensure!(status.success(), "vublk exited with {status}");
    if format == "qcow2" {
        let (code, report) = qemu_img_check(&image)?;
        ensure!(
            code == 0 || code == 3,
            "qemu-img check exit {code}:\n{report}"
        );
    }
    Ok(())
}

/// Whether process `pid` runs a queue worker thread (a frontend is connected and serving).
fn queue_worker_runs(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks.flatten().any(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "vublk-q0")
            })
        })
        .unwrap_or(false)
}

#[test]
fn vublk_killed_twice_during_guest_fio_on_raw_the_guest_sees_no_error() -> Result<()> {
    survive_restarts("raw", nix::sys::signal::Signal::SIGKILL)
}

#[test]
fn vublk_killed_twice_during_guest_fio_on_qcow2_the_guest_sees_no_error() -> Result<()> {
    survive_restarts("qcow2", nix::sys::signal::Signal::SIGKILL)
}

#[test]
fn vublk_stopped_with_sigterm_twice_during_guest_fio_the_guest_sees_no_error() -> Result<()> {
    survive_restarts("qcow2", nix::sys::signal::Signal::SIGTERM)
}

/// A deterministic pseudo-random sequence (xorshift64*), for the soak's timings.
struct SoakRng(u64);

impl SoakRng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// The restart soak: guests run fio --verify over qcow2 one after another while vublk is
/// killed (SIGKILL) at random moments and started again by a "manager" with the current
/// medium; between guest runs the manager grows the disk (block_resize) and swaps the medium
/// (add-fd + blockdev-change-medium). Every fio run must pass, and `qemu-img check` must find
/// no corruption at the end. `$VUBLK_SOAK_SECS` sets the duration (default 45 s; the closing
/// note's figures come from a 10-minute run).
#[test]
fn restart_soak_fio_verify_over_qcow2_with_random_kills_resizes_and_swaps() -> Result<()> {
    use serde_json::json;
    use vublk_tests::qmp::{FdMode, QmpClient};
    let _guard = guest_lock();
    let soak = std::time::Duration::from_secs(
        std::env::var("VUBLK_SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(45),
    );
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let images: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = d.join(format!("disk{i}.qcow2"));
            host(
                std::process::Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&p)
                    .arg("96M"),
            )
            .map(|_| p)
        })
        .collect::<Result<_>>()?;
    let socket = d.join("vhost-user-blk.sock");
    let control = d.join("qmp.sock");
    let log = d.join("vublk.log");
    let start = |image: &Path| -> Result<Daemon> {
        let mut cmd = std::process::Command::new(vublk_tests::daemon::vublk_bin());
        cmd.arg("serve")
            .arg("--image")
            .arg(image)
            .args(["--format", "qcow2", "--socket-path"])
            .arg(&socket)
            .arg("--control")
            .arg(&control)
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)?,
            );
        let daemon = Daemon::spawn(BackendKind::Vublk, &mut cmd, &socket)?;
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while !control.exists() && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(daemon)
    };
    let mut current = 0usize;
    let mut daemon = start(&images[current])?;
    let mut rng = SoakRng(0x50a1_7e57);
    let began = Instant::now();
    let (mut runs, mut restarts, mut longest) = (0u32, 0u32, std::time::Duration::ZERO);
    while began.elapsed() < soak || runs < 2 {
        let job = FioJob {
            size: 48 << 20,
            offset: (rng.below(4)) << 20,
            seed: u64::from(runs) + 1,
            iodepth: 16,
            ..FioJob::default()
        };
        let mut opts = GuestOptions::new(&socket, Job::Write(job));
        opts.reconnect_ms = Some(100);
        opts.console_log = Some(console_log("soak", &format!("run{runs}"))?);
        let guest = Guest::spawn(&opts)?;
        wait_for_console(
            &guest,
            "running job write",
            std::time::Duration::from_secs(90),
        )?;
        loop {
            std::thread::sleep(std::time::Duration::from_millis(200 + rng.below(1000)));
            if guest.console_so_far().contains("VUBLK-E2E-RESULT") {
                break;
            }
            let killed_at = Instant::now();
            daemon.child.kill()?;
            daemon.child.wait()?;
            daemon = start(&images[current])?;
            restarts += 1;
            let pid = daemon.pid();
            // Serving again once QEMU reconnected (unless the guest finished meanwhile: then
            // QEMU has exited and nobody reconnects).
            let mut finished = false;
            while !queue_worker_runs(pid) {
                if guest.console_so_far().contains("VUBLK-E2E-RESULT") {
                    finished = true;
                    break;
                }
                ensure!(
                    killed_at.elapsed() < std::time::Duration::from_secs(30),
                    "QEMU did not reconnect to the restarted vublk (restart {restarts})"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if !finished {
                longest = longest.max(killed_at.elapsed());
            }
        }
        guest.wait()?.expect_pass()?;
        runs += 1;
        // Between runs, as a manager would: grow the disk, and every other run swap media.
        let mut qmp = QmpClient::connect(&control)?;
        let block = qmp.ok("query-block", json!({}))?;
        let size = block[0]["inserted"]["image"]["virtual-size"]
            .as_u64()
            .unwrap_or(96 << 20);
        qmp.ok(
            "block_resize",
            json!({"device": "disk0", "size": size + (8 << 20)}),
        )?;
        if runs % 2 == 0 {
            let next = 1 - current;
            qmp.add_fd(u64::from(runs), &images[next], FdMode::ReadWrite, "soak")?;
            qmp.ok(
                "blockdev-change-medium",
                json!({"id": "disk0", "filename": format!("/dev/fdset/{runs}"),
                       "format": "qcow2"}),
            )?;
            current = next;
        }
    }
    let status = daemon.terminate()?;
    ensure!(status.success(), "vublk exited with {status}");
    for image in &images {
        let (code, report) = qemu_img_check(image)?;
        ensure!(
            code == 0 || code == 3,
            "qemu-img check {}: exit {code}:\n{report}",
            image.display()
        );
    }
    eprintln!(
        "soak: {:.0} s, {runs} fio --verify runs passed, {restarts} restarts survived, longest kill-to-serving {:?}",
        began.elapsed().as_secs_f64(),
        longest
    );
    ensure!(restarts > 0, "the soak never restarted vublk");
    Ok(())
}

/// vublk restarted (SIGTERM, then SIGKILL) while the guest is idle: QEMU reconnects each time,
/// and the guest's fio --verify afterwards passes.
#[test]
fn vublk_restarted_while_the_guest_is_idle_serves_it_on() -> Result<()> {
    let _guard = guest_lock();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let image = sparse_image(d, IMAGE_SIZE)?;
    let socket = d.join("vhost-user-blk.sock");
    let start = || Daemon::start(BackendKind::Vublk, &DiskOptions::raw(&image), &socket);
    let mut daemon = start()?;
    let mut opts = GuestOptions::new(&socket, Job::Write(FioJob::default()));
    opts.reconnect_ms = Some(100);
    opts.extra_append = vec!["vublk.delay=4".into()];
    opts.console_log = Some(console_log("idle_restart", "write")?);
    let guest = Guest::spawn(&opts)?;
    wait_for_console(&guest, "init: idle for", std::time::Duration::from_secs(90))?;
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(daemon.pid())?);
        nix::sys::signal::kill(pid, signal)?;
        daemon.child.wait()?;
        daemon = start()?;
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while !queue_worker_runs(daemon.pid()) {
            ensure!(
                Instant::now() < deadline,
                "QEMU did not reconnect after {signal}"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    ensure!(
        !guest.console_so_far().contains("running job write"),
        "the guest was not idle during the restarts; lengthen vublk.delay"
    );
    guest.wait()?.expect_pass()?;
    let status = daemon.terminate()?;
    ensure!(status.success(), "vublk exited with {status}");
    Ok(())
}

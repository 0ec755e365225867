//! The manager's control plane, tried the way a manager uses it: the `qemu.qmp` Python library
//! (the independent QMP client) passes fds into fd sets with `send_fd_scm`, changes the medium
//! to a qcow2 overlay over a raw base given as two fd sets, resizes and ejects; after each step
//! an independent vhost-user-blk client (libblkio) reads what the guest would see. Hostile
//! manager input (wrong fd types and modes, unknown sets, chains that do not match the image,
//! garbage JSON, 200 fds on one command) gets an error, leaks no fd, and leaves the old medium
//! serving. Afterwards `qemu-img` checks the images vublk wrote.

#![allow(
    clippy::unwrap_used,
    reason = "a test binary: the helpers panic like the #[test] fns that clippy already exempts"
)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use vublk_tests::blk::BlkClient;
use vublk_tests::daemon::{vublk_bin, BackendKind, Daemon};
use vublk_tests::qmp::{fd_count, FdMode, QmpClient, RawQmp};

const MIB: u64 = 1024 * 1024;
const EVENT_WAIT: Duration = Duration::from_secs(5);

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

fn qemu_io(format: &str, image: &Path, cmd: &str) {
    ok(Command::new("qemu-io")
        .args(["-f", format, "-c", cmd])
        .arg(image));
}

/// A raw image of `size` bytes filled with `byte`.
fn raw_filled(path: &Path, size: u64, byte: u8) {
    std::fs::write(path, vec![byte; usize::try_from(size).unwrap()]).unwrap();
}

/// A running vublk serving `image` (raw, by path) with a control socket.
struct Served {
    daemon: Daemon,
    control: PathBuf,
}

fn serve(dir: &Path, image: &Path) -> Served {
    let socket = dir.join("vu.sock");
    let control = dir.join("qmp.sock");
    let mut cmd = Command::new(vublk_bin());
    cmd.arg("serve")
        .arg("--image")
        .arg(image)
        .args(["--format", "raw", "--num-queues", "1"])
        .arg("--socket-path")
        .arg(&socket)
        .arg("--control")
        .arg(&control);
    let daemon = Daemon::spawn(BackendKind::Vublk, &mut cmd, &socket).unwrap();
    for _ in 0..500 {
        if control.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Served { daemon, control }
}

fn read_byte(client: &mut BlkClient, offset: u64) -> Vec<u8> {
    client.read(offset, 4096).unwrap()
}

#[test]
fn medium_change_to_a_qcow2_chain_of_fd_sets_then_resize_then_eject() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.raw");
    raw_filled(&first, 16 * MIB, 0xaa);
    let base = dir.path().join("base.raw");
    raw_filled(&base, 32 * MIB, 0xbb);
    qemu_io("raw", &base, "write -P 0xcc 8M 1M");
    let overlay = dir.path().join("overlay.qcow2");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&overlay));
    qemu_io("qcow2", &overlay, "write -P 0xdd 4M 1M");

    let served = serve(dir.path(), &first);
    let mut qmp = QmpClient::connect(&served.control).unwrap();
    let mut guest = BlkClient::connect(&served.daemon.socket, 1).unwrap();
    assert_eq!(guest.capacity(), 16 * MIB);
    assert_eq!(read_byte(&mut guest, 0), vec![0xaa; 4096]);
    qmp.events(&["VHOST_USER_CONNECTED"], EVENT_WAIT).unwrap();

    // The new chain: the overlay read-write in set 1, the base read-only in set 2.
    qmp.add_fd(1, &overlay, FdMode::ReadWrite, "overlay of vm1")
        .unwrap();
    qmp.add_fd(2, &base, FdMode::ReadOnly, "base of vm1")
        .unwrap();
    let sets = qmp.ok("query-fdsets", json!({})).unwrap();
    assert_eq!(sets.as_array().unwrap().len(), 2, "{sets}");

    // The change happens with the frontend connected and its queue running.
    qmp.ok(
        "blockdev-change-medium",
        json!({"id": "disk0", "filename": "/dev/fdset/1", "format": "qcow2",
               "backing": [{"filename": "/dev/fdset/2", "format": "raw"}]}),
    )
    .unwrap();
    let events = qmp
        .events(&["DEVICE_TRAY_MOVED", "DEVICE_TRAY_MOVED"], EVENT_WAIT)
        .unwrap();
    let trays: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "DEVICE_TRAY_MOVED")
        .map(|e| e["data"]["tray-open"].as_bool().unwrap())
        .collect();
    assert_eq!(trays, [true, false], "an open/close pair: {events:?}");
    // The same connection now reads the new medium.
    assert_eq!(read_byte(&mut guest, 0), vec![0xbb; 4096], "base data");
    assert_eq!(
        read_byte(&mut guest, 4 * MIB),
        vec![0xdd; 4096],
        "overlay data"
    );
    assert_eq!(
        read_byte(&mut guest, 8 * MIB),
        vec![0xcc; 4096],
        "base data"
    );
    guest.write(12 * MIB, &[0xee; 8192]).unwrap();
    guest.flush().unwrap();
    drop(guest);
    let guest = BlkClient::connect(&served.daemon.socket, 1).unwrap();
    assert_eq!(
        guest.capacity(),
        32 * MIB,
        "a new connection sees the new size"
    );

    let block = qmp.ok("query-block", json!({})).unwrap();
    let inserted = &block[0]["inserted"];
    assert_eq!(inserted["drv"], "qcow2", "{block}");
    assert_eq!(inserted["backing_file_depth"], 1, "{block}");
    assert_eq!(inserted["image"]["x-fdset-id"], 1, "{block}");
    assert_eq!(inserted["image"]["x-opaque"], "overlay of vm1", "{block}");
    let backing = &inserted["image"]["backing-image"];
    assert_eq!(backing["filename"], "/dev/fdset/2", "{block}");
    assert_eq!(backing["format"], "raw", "{block}");
    assert_eq!(backing["x-opaque"], "base of vm1", "{block}");

    // Growing the qcow2 overlay: its header and L1 table change in the file.
    drop(guest);
    qmp.ok("block_resize", json!({"device": "disk0", "size": 64 * MIB}))
        .unwrap();
    let mut guest = BlkClient::connect(&served.daemon.socket, 1).unwrap();
    assert_eq!(guest.capacity(), 64 * MIB);
    assert_eq!(read_byte(&mut guest, 12 * MIB), vec![0xee; 4096]);
    assert_eq!(
        read_byte(&mut guest, 40 * MIB),
        vec![0; 4096],
        "new space reads zero"
    );
    guest.write(60 * MIB, &[0x77; 4096]).unwrap();
    guest.flush().unwrap();
    let stats = qmp.ok("query-blockstats", json!({})).unwrap();
    assert!(
        stats[0]["stats"]["wr_operations"].as_u64().unwrap() >= 2,
        "{stats}"
    );
    drop(guest);

    qmp.ok("eject", json!({"id": "disk0"})).unwrap();
    let mut guest = BlkClient::connect(&served.daemon.socket, 1).unwrap();
    assert_eq!(guest.capacity(), 0, "no medium");
    assert!(guest.read(0, 512).is_err(), "I/O without a medium fails");
    drop(guest);
    let block = qmp.ok("query-block", json!({})).unwrap();
    assert!(block[0].get("inserted").is_none(), "{block}");
    assert_eq!(block[0]["tray_open"], true, "{block}");

    let status = served.daemon.terminate().unwrap();
    assert!(status.success(), "{status}");
    ok(Command::new("qemu-img").arg("check").arg(&overlay));
    let info = ok(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&overlay));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 64 * MIB);
    qemu_io("qcow2", &overlay, "read -P 0xee 12M 8k");
    qemu_io("qcow2", &overlay, "read -P 0x77 60M 4k");
    qemu_io("qcow2", &overlay, "read -P 0xdd 4M 1M");
    qemu_io("qcow2", &overlay, "read -P 0 40M 4k");
}

#[test]
fn raw_resize_and_read_only_to_read_write_by_new_fds() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.raw");
    raw_filled(&first, 8 * MIB, 0x11);
    let second = dir.path().join("second.raw");
    raw_filled(&second, 8 * MIB, 0x22);
    let served = serve(dir.path(), &first);
    let mut qmp = QmpClient::connect(&served.control).unwrap();

    // Read-only first: writes fail.
    qmp.add_fd(5, &second, FdMode::ReadOnly, "ro").unwrap();
    qmp.ok(
        "blockdev-change-medium",
        json!({"id": "disk0", "filename": "/dev/fdset/5", "format": "raw",
               "read-only-mode": "read-only"}),
    )
    .unwrap();
    let mut guest = BlkClient::connect(&served.daemon.socket, 1).unwrap();
    assert_eq!(read_byte(&mut guest, 0), vec![0x22; 4096]);
    assert!(guest.write(0, &[0x33; 4096]).is_err(), "read-only medium");
    drop(guest);
    // The same file, now by an O_RDWR fd added to the same set.
    qmp.add_fd(5, &second, FdMode::ReadWrite, "rw").unwrap();
    qmp.ok(
        "blockdev-change-medium",
        json!({"id": "disk0", "filename": "/dev/fdset/5", "format": "raw",
               "read-only-mode": "read-write"}),
    )
    .unwrap();
    let mut guest = BlkClient::connect(&served.daemon.socket, 1).unwrap();
    guest.write(0, &[0x33; 4096]).unwrap();
    guest.flush().unwrap();
    drop(guest);
    qmp.ok(
        "block_resize",
        json!({"node-name": "disk0", "size": 12 * MIB}),
    )
    .unwrap();
    assert_eq!(std::fs::metadata(&second).unwrap().len(), 12 * MIB);
    let mut guest = BlkClient::connect(&served.daemon.socket, 1).unwrap();
    assert_eq!(guest.capacity(), 12 * MIB);
    assert_eq!(read_byte(&mut guest, 0), vec![0x33; 4096]);
    assert_eq!(read_byte(&mut guest, 10 * MIB), vec![0; 4096]);
    drop(guest);
    let err = qmp
        .execute("block_resize", json!({"device": "nope", "size": 12 * MIB}))
        .unwrap()
        .unwrap_err();
    assert_eq!(err.0, "DeviceNotFound", "{err:?}");
    let err = qmp
        .execute("block_resize", json!({"device": "disk0", "size": 1000}))
        .unwrap()
        .unwrap_err();
    assert!(err.1.contains("multiple"), "{err:?}");
    assert!(served.daemon.terminate().unwrap().success());
    assert_eq!(&std::fs::read(&second).unwrap()[..4096], &[0x33; 4096][..]);
}

#[test]
fn fd_sets_leak_no_fd_across_many_adds_changes_and_removes() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.raw");
    raw_filled(&first, 4 * MIB, 0x01);
    let images: Vec<PathBuf> = (0..3)
        .map(|i| {
            let p = dir.path().join(format!("img{i}.raw"));
            raw_filled(&p, 4 * MIB, 0x40 + i);
            p
        })
        .collect();
    let served = serve(dir.path(), &first);
    let pid = served.daemon.pid();
    let mut qmp = QmpClient::connect(&served.control).unwrap();
    let round = |qmp: &mut QmpClient, i: usize| {
        let image = &images[i % images.len()];
        let fd = qmp.add_fd(7, image, FdMode::ReadWrite, "x").unwrap();
        qmp.ok(
            "blockdev-change-medium",
            json!({"id": "disk0", "filename": "/dev/fdset/7", "format": "raw"}),
        )
        .unwrap();
        // The set's fd is removed at once; the medium's dup keeps serving.
        qmp.ok("remove-fd", json!({"fdset-id": 7, "fd": fd}))
            .unwrap();
        let sets = qmp.ok("query-fdsets", json!({})).unwrap();
        assert_eq!(sets, json!([{"fdset-id": 7, "fds": []}]), "a dup is live");
    };
    round(&mut qmp, 0);
    let before = fd_count(pid).unwrap();
    for i in 1..40 {
        round(&mut qmp, i);
    }
    let mut guest = BlkClient::connect(&served.daemon.socket, 1).unwrap();
    assert_eq!(read_byte(&mut guest, 0), vec![0x40 + (39 % 3) as u8; 4096]);
    drop(guest);
    // The connection's fds (ring, eventfds, guest memory) go when vublk has torn it down.
    qmp.events(&["VHOST_USER_DISCONNECTED"], EVENT_WAIT)
        .unwrap();
    qmp.ok("eject", json!({"id": "disk0"})).unwrap();
    let sets = qmp.ok("query-fdsets", json!({})).unwrap();
    assert_eq!(sets, json!([]), "the last dup closed with the eject");
    let after = fd_count(pid).unwrap();
    assert!(
        after < before,
        "40 rounds of add/change/remove leaked fds: {before} open before, {after} after the eject"
    );
    assert!(served.daemon.terminate().unwrap().success());
}

#[test]
fn hostile_manager_input_gets_clear_errors_and_the_old_medium_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.raw");
    raw_filled(&first, 4 * MIB, 0x5a);
    let base = dir.path().join("base.raw");
    raw_filled(&base, 4 * MIB, 0);
    let overlay = dir.path().join("overlay.qcow2");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&overlay));
    let served = serve(dir.path(), &first);
    let pid = served.daemon.pid();
    let mut qmp = QmpClient::connect(&served.control).unwrap();
    let before = fd_count(pid).unwrap();
    let change = |qmp: &mut QmpClient, args: serde_json::Value| {
        let mut a = json!({"id": "disk0", "format": "raw"});
        for (k, v) in args.as_object().unwrap() {
            a[k] = v.clone();
        }
        qmp.execute("blockdev-change-medium", a)
            .unwrap()
            .expect_err("the change must fail")
    };

    // A directory in a set.
    qmp.add_fd(1, dir.path(), FdMode::ReadOnly, "dir").unwrap();
    let e = change(
        &mut qmp,
        json!({"filename": "/dev/fdset/1", "read-only-mode": "read-only"}),
    );
    assert!(e.1.contains("directory"), "{e:?}");
    // A read-only fd for a read-write medium.
    qmp.add_fd(2, &first, FdMode::ReadOnly, "ro").unwrap();
    let e = change(
        &mut qmp,
        json!({"filename": "/dev/fdset/2", "read-only-mode": "read-write"}),
    );
    assert!(e.1.contains("fd set 2 has no fd opened O_RDWR"), "{e:?}");
    // No such set.
    let e = change(&mut qmp, json!({"filename": "/dev/fdset/99"}));
    assert!(e.1.contains("fd set 99 does not exist"), "{e:?}");
    // A path: vublk opens none once serving.
    let e = change(&mut qmp, json!({"filename": "/etc/passwd"}));
    assert!(e.1.contains("opens no path"), "{e:?}");
    // An fd number the manager never added.
    let e = change(&mut qmp, json!({"filename": "fd:0"}));
    assert!(e.1.contains("fd:0"), "{e:?}");
    // A qcow2 with a backing file, given without its backing layer, and with one too many.
    qmp.add_fd(3, &overlay, FdMode::ReadWrite, "overlay")
        .unwrap();
    qmp.add_fd(4, &base, FdMode::ReadOnly, "base").unwrap();
    let e = change(
        &mut qmp,
        json!({"filename": "/dev/fdset/3", "format": "qcow2"}),
    );
    assert!(e.1.contains("backing"), "{e:?}");
    let e = change(
        &mut qmp,
        json!({"filename": "/dev/fdset/3", "format": "qcow2",
               "backing": [{"filename": "/dev/fdset/4", "format": "raw"},
                           {"filename": "/dev/fdset/4", "format": "raw"}]}),
    );
    assert!(e.1.contains("backing"), "{e:?}");
    // Unknown format, device, and argument type.
    let e = change(
        &mut qmp,
        json!({"filename": "/dev/fdset/2", "format": "vmdk"}),
    );
    assert!(e.1.contains("vmdk"), "{e:?}");
    let e = change(&mut qmp, json!({"filename": "/dev/fdset/2", "id": "disk9"}));
    assert_eq!(e.0, "DeviceNotFound", "{e:?}");
    let e = change(&mut qmp, json!({"filename": 7}));
    assert_eq!(
        e.1, "Invalid parameter type for 'filename', expected: string",
        "{e:?}"
    );
    // add-fd without an fd.
    let e = qmp
        .execute("add-fd", json!({"fdset-id": 9}))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.1, "No file descriptor supplied via SCM_RIGHTS");
    let e = qmp
        .execute("remove-fd", json!({"fdset-id": 42}))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.1, "File descriptor named 'fdset-id:42' not found");

    // Malformed input and fd floods on a bare socket.
    let mut raw = RawQmp::connect(&served.control).unwrap();
    raw.send(b"{\"execute\": }\n").unwrap();
    let r = raw.reply().unwrap();
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    raw.send(b"[1, 2]").unwrap();
    let r = raw.reply().unwrap();
    assert_eq!(r["error"]["desc"], "QMP input must be a JSON object", "{r}");
    let socket = std::os::unix::net::UnixStream::pair().unwrap();
    let files: Vec<std::fs::File> = (0..200)
        .map(|_| std::fs::File::open(&first).unwrap())
        .collect();
    let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    raw.send_with_fds(
        br#"{"execute": "add-fd", "arguments": {"fdset-id": 11}}"#,
        &fds,
    )
    .unwrap();
    let r = raw.reply().unwrap();
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("200 file descriptors"),
        "{r}"
    );
    raw.send_with_fds(
        br#"{"execute": "add-fd", "arguments": {"fdset-id": 12}}"#,
        &[socket.0.as_raw_fd()],
    )
    .unwrap();
    let r = raw.reply().unwrap();
    assert!(
        r.get("return").is_some(),
        "QEMU accepts any fd in add-fd: {r}"
    );
    let e = change(
        &mut qmp,
        json!({"filename": "/dev/fdset/12", "read-only-mode": "read-write"}),
    );
    assert!(e.1.contains("socket"), "{e:?}");
    raw.send(br#"{"execute": "remove-fd", "arguments": {"fdset-id": 12}}"#)
        .unwrap();
    assert!(raw.reply().unwrap().get("return").is_some());
    raw.send(br#"{"execute": "query-fdsets", "id": {"any": ["json", 1]}}"#)
        .unwrap();
    let r = raw.reply().unwrap();
    assert_eq!(
        r["id"],
        json!({"any": ["json", 1]}),
        "the id comes back unchanged"
    );

    // Nothing leaked beyond the fds the sets now hold (sets 1-4), and the medium is the old one.
    for set in 1..=4 {
        qmp.ok("remove-fd", json!({"fdset-id": set})).unwrap();
    }
    drop(raw);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(qmp.ok("query-fdsets", json!({})).unwrap(), json!([]));
    let after = fd_count(pid).unwrap();
    assert_eq!(
        after, before,
        "fds open in vublk before and after the hostile input"
    );
    let mut guest = BlkClient::connect(&served.daemon.socket, 1).unwrap();
    assert_eq!(read_byte(&mut guest, 0), vec![0x5a; 4096]);
    guest.write(0, &[0x5b; 4096]).unwrap();
    drop(guest);
    assert!(served.daemon.terminate().unwrap().success());
}

#[test]
fn add_fd_on_the_command_line_fills_a_set_the_image_is_opened_from() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.raw");
    raw_filled(&image, 4 * MIB, 0x3c);
    let rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let ro = std::fs::File::open(&image).unwrap();
    let socket = dir.path().join("vu.sock");
    let control = dir.path().join("qmp.sock");
    let mut cmd = Command::new(vublk_bin());
    cmd.args(["serve", "--image", "/dev/fdset/3", "--format", "raw"])
        .args(["--add-fd", "fd=10,set=3,opaque=read-only copy"])
        .args(["--add-fd", "fd=11,set=3,opaque=rw, with a comma"])
        .arg("--socket-path")
        .arg(&socket)
        .arg("--control")
        .arg(&control);
    vublk_tests::daemon::pass_fds(&mut cmd, &[(ro.as_raw_fd(), 10), (rw.as_raw_fd(), 11)]);
    let daemon = Daemon::spawn(BackendKind::Vublk, &mut cmd, &socket).unwrap();
    let mut guest = BlkClient::connect(&socket, 1).unwrap();
    assert_eq!(read_byte(&mut guest, 0), vec![0x3c; 4096]);
    guest.write(0, &[0x3d; 4096]).unwrap();
    drop(guest);
    let mut qmp = QmpClient::connect(&control).unwrap();
    let sets = qmp.ok("query-fdsets", json!({})).unwrap();
    let fds = sets[0]["fds"].as_array().unwrap();
    assert_eq!(sets[0]["fdset-id"], 3, "{sets}");
    let opaques: Vec<_> = fds.iter().map(|f| f["opaque"].as_str().unwrap()).collect();
    assert_eq!(opaques, ["read-only copy", "rw, with a comma"], "{sets}");
    let block = qmp.ok("query-block", json!({})).unwrap();
    assert_eq!(
        block[0]["inserted"]["image"]["x-opaque"], "rw, with a comma",
        "the O_RDWR member serves a read-write disk: {block}"
    );
    assert!(daemon.terminate().unwrap().success());
    assert_eq!(&std::fs::read(&image).unwrap()[..4096], &[0x3d; 4096][..]);

    // Bad --add-fd values are refused at startup with QEMU's words.
    for (arg, want) in [
        ("fd=2,set=1", "fd cannot be a standard I/O stream"),
        ("fd=10", "set option is required and must be non-negative"),
        (
            "fd=10,set=-1",
            "set option is required and must be non-negative",
        ),
        ("set=1", "fd option is required"),
    ] {
        let (status, stderr) = vublk_tests::daemon::run_vublk_expecting_exit(
            &[
                "serve",
                "--image",
                "/dev/fdset/1",
                "--format",
                "raw",
                "--socket-path",
                "/nonexistent/s",
                "--add-fd",
                arg,
            ],
            &[],
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(!status.success());
        assert!(stderr.contains(want), "--add-fd {arg}: {stderr}");
    }
}

#[test]
fn a_stalled_client_blocks_neither_other_clients_nor_io() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.raw");
    raw_filled(&first, 4 * MIB, 0x42);
    let served = serve(dir.path(), &first);
    // One client sends half a command and never reads; another never negotiates.
    let mut stalled = RawQmp::connect(&served.control).unwrap();
    stalled.send(br#"{"execute": "query-"#).unwrap();
    let _silent = std::os::unix::net::UnixStream::connect(&served.control).unwrap();
    let mut qmp = QmpClient::connect(&served.control).unwrap();
    let mut guest = BlkClient::connect(&served.daemon.socket, 1).unwrap();
    for i in 0..50u64 {
        guest.write(i * 4096, &[0x43; 4096]).unwrap();
        assert_eq!(read_byte(&mut guest, i * 4096), vec![0x43; 4096]);
    }
    qmp.ok("query-block", json!({})).unwrap();
    let events = qmp.events(&["VHOST_USER_CONNECTED"], EVENT_WAIT).unwrap();
    assert!(!events.is_empty());
    drop(guest);
    qmp.events(&["VHOST_USER_DISCONNECTED"], EVENT_WAIT)
        .unwrap();
    // The stalled client finishes its command and is answered.
    stalled.send(br#"fdsets"}"#).unwrap();
    let r = stalled.reply().unwrap();
    assert_eq!(r["return"], json!([]), "{r}");
    let info = qmp.ok("query-vhost-user", json!({})).unwrap();
    assert_eq!(info["connected"], false, "{info}");
    assert!(served.daemon.terminate().unwrap().success());
}

#[test]
fn a_broken_table_and_a_failed_read_are_reported_as_events() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.raw");
    raw_filled(&first, 4 * MIB, 0);
    let image = dir.path().join("broken.qcow2");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("8M"));
    qemu_io("qcow2", &image, "write -P 0x61 0 64k");
    // Point the first L2 entry at an offset that is not cluster-aligned.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let be64 = |at: u64| {
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, at).unwrap();
        u64::from_be_bytes(b)
    };
    let l1 = be64(40);
    let l2 = be64(l1) & 0x00ff_ffff_ffff_fe00;
    let entry = be64(l2);
    file.write_all_at(&(entry | 0x200).to_be_bytes(), l2)
        .unwrap();
    drop(file);

    let served = serve(dir.path(), &first);
    let mut qmp = QmpClient::connect(&served.control).unwrap();
    qmp.add_fd(1, &image, FdMode::ReadOnly, "broken").unwrap();
    qmp.ok(
        "blockdev-change-medium",
        json!({"id": "disk0", "filename": "/dev/fdset/1", "format": "qcow2",
               "read-only-mode": "read-only"}),
    )
    .unwrap();
    let mut guest = BlkClient::connect_read_only(&served.daemon.socket, 1).unwrap();
    assert!(
        guest.read(0, 4096).is_err(),
        "the broken cluster fails the read"
    );
    assert_eq!(
        guest.read(MIB, 4096).unwrap(),
        vec![0; 4096],
        "the rest reads"
    );
    drop(guest);
    let events = qmp
        .events(&["BLOCK_IMAGE_CORRUPTED", "BLOCK_IO_ERROR"], EVENT_WAIT)
        .unwrap();
    let corrupted = events
        .iter()
        .find(|e| e["event"] == "BLOCK_IMAGE_CORRUPTED")
        .unwrap();
    assert_eq!(corrupted["data"]["device"], "disk0", "{corrupted}");
    assert_eq!(corrupted["data"]["fatal"], false, "{corrupted}");
    let io_error = events
        .iter()
        .find(|e| e["event"] == "BLOCK_IO_ERROR")
        .unwrap();
    assert_eq!(io_error["data"]["operation"], "read", "{io_error}");
    assert_eq!(io_error["data"]["action"], "report", "{io_error}");
    let stats = qmp.ok("query-blockstats", json!({})).unwrap();
    assert_eq!(stats[0]["stats"]["failed_rd_operations"], 1, "{stats}");
    assert!(served.daemon.terminate().unwrap().success());
}

#[test]
fn named_fds_oversized_input_reconnects_and_quit() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.raw");
    raw_filled(&first, 4 * MIB, 0x10);
    let mut served = serve(dir.path(), &first);
    let mut qmp = QmpClient::connect(&served.control).unwrap();
    qmp.execute_with_fd(
        "getfd",
        json!({"fdname": "spare"}),
        Some((&first, FdMode::ReadOnly)),
    )
    .unwrap()
    .unwrap();
    // The same name again replaces (and closes) the first fd.
    qmp.execute_with_fd(
        "getfd",
        json!({"fdname": "spare"}),
        Some((&first, FdMode::ReadOnly)),
    )
    .unwrap()
    .unwrap();
    let e = qmp
        .execute_with_fd(
            "getfd",
            json!({"fdname": "9lives"}),
            Some((&first, FdMode::ReadOnly)),
        )
        .unwrap()
        .unwrap_err();
    assert_eq!(
        e.1,
        "Parameter 'fdname' expects a name not starting with a digit"
    );
    let e = qmp
        .execute("getfd", json!({"fdname": "nofd"}))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.1, "No file descriptor supplied via SCM_RIGHTS");
    qmp.ok("closefd", json!({"fdname": "spare"})).unwrap();
    let e = qmp
        .execute("closefd", json!({"fdname": "spare"}))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.1, "File descriptor named 'spare' not found");
    qmp.add_fd(4, &first, FdMode::ReadOnly, "kept").unwrap();
    drop(qmp);

    // A control client going away closes nothing: a new one sees the set.
    let mut raw = RawQmp::connect(&served.control).unwrap();
    raw.send(br#"{"execute": "query-fdsets"}"#).unwrap();
    let r = raw.reply().unwrap();
    assert_eq!(r["return"][0]["fdset-id"], 4, "{r}");
    assert_eq!(r["return"][0]["fds"][0]["opaque"], "kept", "{r}");
    // An oversized command is refused, and the connection goes on.
    let mut huge = br#"{"execute": "query-fdsets", "arguments": {"x": ""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 2 << 20));
    huge.extend_from_slice(b"\"}}\n");
    raw.send(&huge).unwrap();
    let r = raw.reply().unwrap();
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    raw.send(br#"{"execute": "query-fdsets", "id": 5}"#)
        .unwrap();
    let r = raw.reply().unwrap();
    assert_eq!(r["id"], 5, "{r}");

    raw.send(br#"{"execute": "quit", "id": "bye"}"#).unwrap();
    let r = raw.reply().unwrap();
    assert_eq!(r, json!({"return": {}, "id": "bye"}));
    let status = served.daemon.child.wait().unwrap();
    assert!(status.success(), "quit exits 0: {status}");

    // An --add-fd naming a closed fd stops startup with the fd named.
    let (status, stderr) = vublk_tests::daemon::run_vublk_expecting_exit(
        &[
            "serve",
            "--image",
            "/dev/fdset/1",
            "--format",
            "raw",
            "--socket-path",
            "/nonexistent/s",
            "--add-fd",
            "fd=77,set=1",
        ],
        &[],
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("--add-fd fd=77: the fd is not open"),
        "{stderr}"
    );
}

#[test]
fn reads_racing_twenty_medium_changes_each_come_whole_from_one_medium() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    raw_filled(&a, 8 * MIB, 0xa0);
    let b = dir.path().join("b.raw");
    raw_filled(&b, 8 * MIB, 0xb0);
    let served = serve(dir.path(), &a);
    let socket = served.daemon.socket.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut guest = BlkClient::connect(&socket, 1).unwrap();
            let (mut seen_a, mut seen_b) = (0u32, 0u32);
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let data = guest.read((i % 64) * 128 * 1024, 128 * 1024).unwrap();
                match data[0] {
                    0xa0 => seen_a += 1,
                    0xb0 => seen_b += 1,
                    other => panic!("read {i} saw byte {other:#x}"),
                }
                assert!(
                    data.iter().all(|&x| x == data[0]),
                    "read {i} mixes two media"
                );
                i += 1;
            }
            (seen_a, seen_b)
        })
    };
    let mut qmp = QmpClient::connect(&served.control).unwrap();
    qmp.add_fd(1, &a, FdMode::ReadWrite, "a").unwrap();
    qmp.add_fd(2, &b, FdMode::ReadWrite, "b").unwrap();
    for round in 0..20 {
        std::thread::sleep(Duration::from_millis(20));
        let set = if round % 2 == 0 { 2 } else { 1 };
        qmp.ok(
            "blockdev-change-medium",
            json!({"id": "disk0", "filename": format!("/dev/fdset/{set}"), "format": "raw"}),
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (seen_a, seen_b) = reader.join().unwrap();
    assert!(
        seen_a > 0 && seen_b > 0,
        "reads saw both media: {seen_a} / {seen_b}"
    );
    let stats = qmp.ok("query-blockstats", json!({})).unwrap();
    assert_eq!(stats[0]["stats"]["failed_rd_operations"], 0, "{stats}");
    assert!(served.daemon.terminate().unwrap().success());
}

#[test]
fn retain_keeps_a_read_only_device_read_only_across_an_eject() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.raw");
    raw_filled(&first, 4 * MIB, 0x21);
    let second = dir.path().join("second.raw");
    raw_filled(&second, 4 * MIB, 0x22);
    let socket = dir.path().join("vu.sock");
    let control = dir.path().join("qmp.sock");
    let mut cmd = Command::new(vublk_bin());
    cmd.arg("serve")
        .arg("--image")
        .arg(&first)
        .args(["--format", "raw", "--read-only", "--socket-path"])
        .arg(&socket)
        .arg("--control")
        .arg(&control);
    let daemon = Daemon::spawn(BackendKind::Vublk, &mut cmd, &socket).unwrap();
    let mut qmp = QmpClient::connect(&control).unwrap();
    qmp.ok("eject", json!({"id": "disk0"})).unwrap();
    qmp.add_fd(1, &second, FdMode::ReadOnly, "ro").unwrap();
    qmp.ok(
        "blockdev-change-medium",
        json!({"id": "disk0", "filename": "/dev/fdset/1", "format": "raw"}),
    )
    .unwrap();
    let mut guest = BlkClient::connect_read_only(&socket, 1).unwrap();
    assert_eq!(read_byte(&mut guest, 0), vec![0x22; 4096]);
    drop(guest);
    let block = qmp.ok("query-block", json!({})).unwrap();
    assert_eq!(block[0]["inserted"]["ro"], true, "{block}");
    assert!(daemon.terminate().unwrap().success());
}

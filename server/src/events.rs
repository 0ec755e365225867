//! Asynchronous events for the control socket (QMP's `event` messages).
//!
//! Any thread (queue workers, the metadata thread, the vhost-user thread, the control thread
//! itself) posts an [`Event`]; the control thread drains the queue when its eventfd fires and
//! sends each event to every client that finished capabilities negotiation. The queue is
//! bounded: a guest that fails I/O in a tight loop cannot make vublk hold an unbounded backlog
//! for a manager that does not read. It does not know about sockets or JSON framing.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Events held for the control thread; past this the oldest are dropped (and counted).
const MAX_QUEUED_EVENTS: usize = 256;
/// One `BLOCK_IO_ERROR` per operation kind, and one `BLOCK_IMAGE_CORRUPTED`, per this
/// interval: a guest retrying failed I/O (or reading a broken table again and again) would
/// otherwise flood the manager (QEMU throttles its chattiest events the same way).
const IO_ERROR_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// Something the manager is told about without asking.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A guest request failed (QEMU's `BLOCK_IO_ERROR`, action "report").
    BlockIoError {
        device: String,
        node_name: String,
        operation: IoOperation,
        nospace: bool,
        reason: String,
    },
    /// The image was found inconsistent and marked corrupt (QEMU's `BLOCK_IMAGE_CORRUPTED`).
    BlockImageCorrupted {
        device: String,
        node_name: String,
        msg: String,
        fatal: bool,
    },
    /// The (virtual) tray opened or closed around a medium change or eject.
    DeviceTrayMoved {
        device: String,
        tray_open: bool,
    },
    /// A vhost-user frontend connected or went away.
    VhostUserConnected {
        device: String,
    },
    VhostUserDisconnected {
        device: String,
    },
}

/// QEMU's `IoOperationType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOperation {
    Read,
    Write,
}

impl Event {
    /// The QMP event name and its `data` member.
    pub fn to_qmp(&self) -> (&'static str, Value) {
        match self {
            Event::BlockIoError {
                device,
                node_name,
                operation,
                nospace,
                reason,
            } => (
                "BLOCK_IO_ERROR",
                json!({
                    "device": device,
                    "node-name": node_name,
                    "operation": match operation {
                        IoOperation::Read => "read",
                        IoOperation::Write => "write",
                    },
                    "action": "report",
                    "nospace": nospace,
                    "reason": reason,
                }),
            ),
            Event::BlockImageCorrupted {
                device,
                node_name,
                msg,
                fatal,
            } => (
                "BLOCK_IMAGE_CORRUPTED",
                json!({"device": device, "node-name": node_name, "msg": msg, "fatal": fatal}),
            ),
            Event::DeviceTrayMoved { device, tray_open } => (
                "DEVICE_TRAY_MOVED",
                json!({"device": device, "id": device, "tray-open": tray_open}),
            ),
            Event::VhostUserConnected { device } => {
                ("VHOST_USER_CONNECTED", json!({ "device": device }))
            }
            Event::VhostUserDisconnected { device } => {
                ("VHOST_USER_DISCONNECTED", json!({ "device": device }))
            }
        }
    }
}

/// An event with the time it happened.
#[derive(Clone, Debug)]
pub struct Stamped {
    pub event: Event,
    pub at: SystemTime,
}

/// The queue of events for the control thread.
pub struct Events {
    queue: Mutex<Queue>,
    wake: EventFd,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Stamped>,
    dropped: u64,
    /// When the last throttled event of each kind went out: read errors, write errors,
    /// corruption reports.
    last_io_error: [Option<Instant>; 3],
}

impl Events {
    pub fn new() -> std::io::Result<Events> {
        Ok(Events {
            queue: Mutex::new(Queue::default()),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Queues `event` and wakes the control thread.
    pub fn emit(&self, event: Event) {
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let throttled = match &event {
                Event::BlockIoError { operation, .. } => Some(*operation as usize),
                // A fatal report (the image is now marked corrupt) always goes out.
                Event::BlockImageCorrupted { fatal: false, .. } => Some(2),
                _ => None,
            };
            if let Some(slot) = throttled {
                let slot = &mut q.last_io_error[slot];
                let now = Instant::now();
                if slot.is_some_and(|t| now.duration_since(t) < IO_ERROR_EVENT_INTERVAL) {
                    return;
                }
                *slot = Some(now);
            }
            if q.events.len() >= MAX_QUEUED_EVENTS {
                q.events.pop_front();
                q.dropped += 1;
            }
            q.events.push_back(Stamped {
                event,
                at: SystemTime::now(),
            });
        }
        let _ = self.wake.write(1);
    }

    /// Takes every queued event (and how many were dropped since the last call).
    pub fn drain(&self) -> (Vec<Stamped>, u64) {
        let _ = self.wake.read();
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = std::mem::take(&mut q.dropped);
        (q.events.drain(..).collect(), dropped)
    }

    /// Readable when events are queued.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the eventfd is owned by `self`, which the returned borrow cannot outlive.
        unsafe { BorrowedFd::borrow_raw(self.wake.as_raw_fd()) }
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_error(operation: IoOperation) -> Event {
        Event::BlockIoError {
            device: "disk0".into(),
            node_name: "disk0".into(),
            operation,
            nospace: false,
            reason: "x".into(),
        }
    }

    #[test]
    fn events_are_drained_in_order_and_io_errors_are_throttled_per_operation() {
        let events = Events::new().expect("eventfd");
        events.emit(io_error(IoOperation::Read));
        events.emit(io_error(IoOperation::Read));
        events.emit(io_error(IoOperation::Write));
        events.emit(Event::DeviceTrayMoved {
            device: "disk0".into(),
            tray_open: true,
        });
        let (got, dropped) = events.drain();
        assert_eq!(dropped, 0);
        let names: Vec<_> = got.iter().map(|s| s.event.to_qmp().0).collect();
        assert_eq!(
            names,
            ["BLOCK_IO_ERROR", "BLOCK_IO_ERROR", "DEVICE_TRAY_MOVED"],
            "the second read error within a second is not reported"
        );
        assert_eq!(got[1].event, io_error(IoOperation::Write));
        assert!(events.drain().0.is_empty());
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_them() {
        let events = Events::new().expect("eventfd");
        for i in 0..MAX_QUEUED_EVENTS + 3 {
            events.emit(Event::DeviceTrayMoved {
                device: format!("d{i}"),
                tray_open: false,
            });
        }
        let (got, dropped) = events.drain();
        assert_eq!(dropped, 3);
        assert_eq!(got.len(), MAX_QUEUED_EVENTS);
        assert_eq!(
            got[0].event,
            Event::DeviceTrayMoved {
                device: "d3".into(),
                tray_open: false
            }
        );
    }

    #[test]
    fn tray_event_data_uses_qemu_member_names() {
        let (name, data) = Event::DeviceTrayMoved {
            device: "disk0".into(),
            tray_open: true,
        }
        .to_qmp();
        assert_eq!(name, "DEVICE_TRAY_MOVED");
        assert_eq!(
            data,
            json!({"device": "disk0", "id": "disk0", "tray-open": true})
        );
    }
}

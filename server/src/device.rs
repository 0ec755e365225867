//! The virtio-blk device the VMM sees, as opposed to the medium in it.
//!
//! The device outlives both VMM connections and media: its feature set, serial, cache mode
//! and I/O counters stay while the manager swaps, ejects or resizes the medium ([`Disk`]).
//! Swapping follows one protocol ([`Device::with_queues_paused`]): every queue of the current
//! connection stops taking requests and drains what it popped (requests in flight complete
//! against the old medium), the change is made, the generation moves on, and the queues
//! resume, each picking the new medium up before it pops again. No request is lost, and none
//! is served from a mix of two media. The device does not parse requests or know QMP.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::disk::Disk;
use crate::events::Events;
use crate::stats::DeviceStats;
use crate::vhost_user::backend_channel::BackendChannel;
use crate::virtio_blk::config_space::BlkConfig;
use crate::virtio_blk::features::{DeviceParams, MAX_DISCARD_SECTORS};
use crate::virtio_blk::request::Geometry;
use crate::virtio_blk::SECTOR_SHIFT;
use crate::virtio_blk::VIRTIO_BLK_ID_BYTES;
use crate::worker::QueueShared;

/// The device: what is fixed at start, the current medium, and who serves it.
pub struct Device {
    /// The device name QMP commands and events use (`--id`).
    id: String,
    /// Device-level options; the feature bits follow from these and never change.
    params: DeviceParams,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    /// The configuration space; the driver may change `writeback` through it, and the
    /// capacity follows the medium.
    config: Mutex<BlkConfig>,
    /// Mirror of `config.writeback` read on the fast path.
    writeback: AtomicBool,
    medium: Mutex<Arc<Disk>>,
    /// Bumped on every change of `medium`; workers compare it before popping requests.
    generation: AtomicU64,
    /// Serialises medium changes against each other and against queues being attached.
    changing: Mutex<()>,
    /// The queues of the current VMM connection.
    queues: Mutex<Vec<Arc<QueueShared>>>,
    /// The backend-to-frontend channel, for config-change notifications.
    channel: Mutex<Option<BackendChannel>>,
    stats: DeviceStats,
    events: Arc<Events>,
    /// What `query-vhost-user` reports about the current connection.
    connection: Mutex<Option<ConnectionInfo>>,
}

/// The current vhost-user connection, as negotiated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub features: u64,
    pub protocol_features: u64,
    pub peer_pid: Option<i32>,
    pub peer_uid: Option<u32>,
}

impl Device {
    pub fn new(
        id: String,
        params: DeviceParams,
        serial: [u8; VIRTIO_BLK_ID_BYTES],
        disk: Disk,
        events: Arc<Events>,
    ) -> Device {
        let mut config = params.config();
        config.capacity = disk.capacity_bytes() >> SECTOR_SHIFT;
        Device {
            id,
            params,
            serial,
            config: Mutex::new(config),
            writeback: AtomicBool::new(true),
            medium: Mutex::new(Arc::new(disk)),
            generation: AtomicU64::new(0),
            changing: Mutex::new(()),
            queues: Mutex::new(Vec::new()),
            channel: Mutex::new(None),
            stats: DeviceStats::new(params.num_queues),
            events,
            connection: Mutex::new(None),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn params(&self) -> &DeviceParams {
        &self.params
    }

    pub fn serial(&self) -> &[u8; VIRTIO_BLK_ID_BYTES] {
        &self.serial
    }

    pub fn stats(&self) -> &DeviceStats {
        &self.stats
    }

    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }

    /// The current medium and its generation.
    pub fn disk(&self) -> (Arc<Disk>, u64) {
        let medium = self.medium.lock().unwrap_or_else(|e| e.into_inner());
        (Arc::clone(&medium), self.generation.load(Ordering::Acquire))
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// What requests on `disk` are checked against: the device's features, the medium's size
    /// and access mode.
    pub fn geometry(&self, disk: &Disk) -> Geometry {
        let features = self.params.features();
        let has = |bit: u32| features & (1 << bit) != 0;
        use crate::virtio_blk::feature::{VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES};
        Geometry {
            capacity_bytes: disk.capacity_bytes(),
            logical_block_size: self.params.logical_block_size,
            read_only: self.params.read_only || disk.read_only(),
            discard: has(VIRTIO_BLK_F_DISCARD),
            write_zeroes: has(VIRTIO_BLK_F_WRITE_ZEROES),
            max_dwz_sectors: MAX_DISCARD_SECTORS,
        }
    }

    pub fn config(&self) -> BlkConfig {
        *self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a driver write to the configuration space.
    pub fn write_config(&self, offset: u32, data: &[u8], wce_negotiated: bool) {
        let mut config = self.config.lock().unwrap_or_else(|e| e.into_inner());
        if config.write(offset, data, wce_negotiated) {
            log::info!(
                "guest set the write cache to {}",
                if config.writeback == 1 {
                    "writeback"
                } else {
                    "writethrough"
                }
            );
        }
        self.writeback
            .store(config.writeback == 1, Ordering::Release);
    }

    /// Writeback cache: writes complete before they are durable; FLUSH makes them so.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Acquire)
    }

    /// The queues of the current connection.
    fn attached_queues(&self) -> Vec<Arc<QueueShared>> {
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Registers a queue of a new connection. Called before its worker starts, so a medium
    /// change that begins afterwards pauses it too.
    pub fn attach_queue(&self, queue: &Arc<QueueShared>) {
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::clone(queue));
    }

    pub fn detach_queue(&self, queue: &Arc<QueueShared>) {
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|q| !Arc::ptr_eq(q, queue));
    }

    /// Runs `change` with every queue stopped and drained; when it returns a new medium, that
    /// medium replaces the current one before the queues resume. Returns `change`'s result.
    pub fn with_queues_paused<T, E>(
        &self,
        change: impl FnOnce(&Arc<Disk>) -> Result<(Option<Disk>, T), E>,
    ) -> Result<T, E> {
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let queues = self.attached_queues();
        for queue in &queues {
            queue.pause();
        }
        let (current, _) = self.disk();
        let result = change(&current);
        let mut capacity_changed = false;
        let result = result.map(|(new, value)| {
            if let Some(new) = new {
                let new = Arc::new(new);
                capacity_changed = new.capacity_bytes() != current.capacity_bytes();
                {
                    let mut config = self.config.lock().unwrap_or_else(|e| e.into_inner());
                    config.capacity = new.capacity_bytes() >> SECTOR_SHIFT;
                }
                *self.medium.lock().unwrap_or_else(|e| e.into_inner()) = new;
                self.generation.fetch_add(1, Ordering::AcqRel);
            }
            value
        });
        for queue in &queues {
            queue.resume();
        }
        drop(_changing);
        if capacity_changed {
            self.notify_config_change();
        }
        result
    }

    /// Stops every queue and waits until the requests they popped have completed (and their
    /// completions were signalled to the guest), for a graceful exit: the VMM is still
    /// connected, so it sees every completion before the connection goes.
    pub fn drain_for_exit(&self) {
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let queues = self.attached_queues();
        for queue in &queues {
            queue.pause();
        }
    }

    /// Installs (or clears) the backend channel of the current connection.
    pub fn set_channel(&self, channel: Option<BackendChannel>) {
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = channel;
    }

    /// Tells the frontend the configuration space changed, when it negotiated a way to be
    /// told; otherwise it reads the new capacity the next time it asks.
    pub fn notify_config_change(&self) {
        let mut channel = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        match channel.as_mut() {
            Some(ch) => {
                if let Err(e) = ch.send_config_change() {
                    log::warn!("{}: config-change notification failed: {e}", self.id);
                    *channel = None;
                }
            }
            None => log::info!(
                "{}: no backend channel; the frontend sees the new configuration when it next reads it",
                self.id
            ),
        }
    }

    pub fn has_channel(&self) -> bool {
        self.channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    pub fn set_connection(&self, info: Option<ConnectionInfo>) {
        *self.connection.lock().unwrap_or_else(|e| e.into_inner()) = info;
    }

    pub fn connection(&self) -> Option<ConnectionInfo> {
        self.connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Flushes the current medium (on shutdown).
    pub fn sync(&self) -> std::io::Result<()> {
        self.disk().0.sync()
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({})", self.id)
    }
}

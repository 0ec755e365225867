//! Answers one frontend connection's vhost-user messages for the virtio-blk device.
//!
//! Owns the connection's guest memory map, its vrings and its queue workers (one thread per
//! queue, started with the connection and stopped, after draining, when it ends). The disk
//! outlives connections: a VMM that reconnects is served the same disk.

use std::fs::File;
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::VringT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};

use super::inflight::InflightRegion;
use crate::device::{ConnectionInfo, Device};
use crate::virtio_blk::feature::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_RING_F_EVENT_IDX};
use crate::worker::{self, QueueShared, Vring};

/// Memory slots offered with CONFIGURE_MEM_SLOTS: QEMU's vhost-user maximum.
pub const MAX_MEM_SLOTS: u64 = 509;

/// Protocol features vublk offers.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// A guest memory region as the frontend's address space sees it, for SET_VRING_ADDR.
#[derive(Clone, Copy, Debug)]
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

/// The device's side of one vhost-user connection.
pub struct BlkHandler {
    device: Arc<Device>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    mappings: Vec<AddrMapping>,
    acked_features: u64,
    acked_protocol_features: u64,
    queues: Vec<Arc<QueueShared>>,
    workers: Vec<JoinHandle<()>>,
    /// The inflight region the frontend keeps for a restarted vublk.
    inflight: Option<Arc<InflightRegion>>,
}

fn invalid(reason: &str) -> VuError {
    log::warn!("vhost-user: refused message: {reason}");
    VuError::InvalidParam
}

impl BlkHandler {
    /// Creates the handler and starts one worker per queue.
    pub fn new(device: Arc<Device>) -> Result<BlkHandler, crate::engine::EngineError> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let params = *device.params();
        // Built up queue by queue: if one fails, dropping the handler stops the workers
        // already started.
        let mut handler = BlkHandler {
            device: Arc::clone(&device),
            mem: mem.clone(),
            mappings: Vec::new(),
            acked_features: 0,
            acked_protocol_features: 0,
            queues: Vec::new(),
            workers: Vec::new(),
            inflight: None,
        };
        for index in 0..params.num_queues {
            let vring = Vring::new(mem.clone(), params.queue_size).map_err(|e| {
                crate::engine::EngineError::Setup {
                    queue: index,
                    step: "create vring",
                    source: std::io::Error::other(format!("{e:?}")),
                }
            })?;
            let shared = QueueShared::new(index, vring).map_err(|source| {
                crate::engine::EngineError::Setup {
                    queue: index,
                    step: "create wake eventfd",
                    source,
                }
            })?;
            // Attached before the worker starts, so a medium change pauses it from the start.
            device.attach_queue(&shared);
            handler.queues.push(Arc::clone(&shared));
            let worker = worker::spawn(shared, Arc::clone(&device), mem.clone())?;
            handler.workers.push(worker);
        }
        Ok(handler)
    }

    /// Drains every queue and joins the workers (the connection ended).
    pub fn shutdown(&mut self) {
        for queue in &self.queues {
            queue.request_exit();
        }
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                log::error!("a queue worker panicked");
            }
        }
        for queue in &self.queues {
            self.device.detach_queue(queue);
        }
    }

    /// Whether REPLY_ACK was negotiated (the backend channel then expects replies).
    pub fn reply_ack(&self) -> bool {
        self.acked_protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// Whether the frontend can be told of config changes: BACKEND_REQ and CONFIG negotiated.
    pub fn config_change_negotiated(&self) -> bool {
        let want =
            (VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::CONFIG).bits();
        self.acked_protocol_features & want == want
    }

    fn publish_connection(&self) {
        let mut info = self.device.connection().unwrap_or_default();
        info.features = self.acked_features;
        info.protocol_features = self.acked_protocol_features;
        self.device.set_connection(Some(ConnectionInfo { ..info }));
    }

    /// The queue count and size of an inflight request, checked against the device.
    fn inflight_shape(&self, inflight: &VhostUserInflight) -> VuResult<(u16, u16)> {
        let params = self.device.params();
        if inflight.num_queues == 0
            || inflight.num_queues > params.num_queues
            || inflight.queue_size == 0
            || inflight.queue_size > params.queue_size
        {
            return Err(invalid("inflight region shape does not fit the device"));
        }
        Ok((inflight.num_queues, inflight.queue_size))
    }

    /// Hands each queue its part of `region`.
    fn install_inflight(&mut self, region: Arc<InflightRegion>) {
        for (i, queue) in self.queues.iter().enumerate() {
            let handle = u16::try_from(i)
                .ok()
                .and_then(|i| region.queue_handle(i))
                .map(Arc::new);
            queue.set_inflight(handle);
        }
        self.inflight = Some(region);
    }

    fn offered_features(&self) -> u64 {
        self.device.params().features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn queue(&self, index: u32) -> VuResult<&Arc<QueueShared>> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.queues.get(i))
            .ok_or_else(|| invalid("vring index out of range"))
    }

    fn vmm_va_to_gpa(&self, vmm_va: u64) -> VuResult<u64> {
        self.mappings
            .iter()
            .find(|m| vmm_va >= m.vmm_addr && vmm_va - m.vmm_addr < m.size)
            .map(|m| vmm_va - m.vmm_addr + m.gpa_base)
            .ok_or_else(|| invalid("vring address outside every memory region"))
    }

    fn protocol_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn region(
        guest_phys_addr: u64,
        region: &VhostUserMemoryRegion,
        file: File,
    ) -> VuResult<GuestRegionMmap> {
        let mmap = region.mmap_region(file)?;
        GuestRegionMmap::new(mmap, GuestAddress(guest_phys_addr))
            .ok_or_else(|| invalid("memory region overflows the guest address space"))
    }

    fn update_memory(&mut self, mem: GuestMemoryMmap) {
        // Workers load the new map on their next batch; requests in flight keep the old one
        // mapped through their Arc until they complete.
        self.mem
            .lock()
            .map(|guard| guard.replace(mem))
            .unwrap_or_else(|_| {
                log::error!("guest memory lock poisoned");
            });
        for queue in &self.queues {
            queue.poke();
        }
    }
}

impl Drop for BlkHandler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl VhostUserBackendReqHandlerMut for BlkHandler {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        for queue in &self.queues {
            queue.vring.set_queue_ready(false);
            queue.stop_and_drain();
            queue.vring.set_enabled(false);
            queue.set_kick(None);
            queue.vring.set_call(None);
        }
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.offered_features() != 0 {
            return Err(invalid("driver acked features the device did not offer"));
        }
        self.acked_features = features;
        self.publish_connection();
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        // Without PROTOCOL_FEATURES, rings start enabled (vhost-user spec, "Ring states").
        let enabled = !self.protocol_acked();
        for queue in &self.queues {
            queue.vring.set_queue_event_idx(event_idx);
            if enabled {
                queue.vring.set_enabled(true);
            }
            queue.poke();
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            regions.push(Self::region(region.guest_phys_addr, region, file)?);
            mappings.push(AddrMapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa_base: region.guest_phys_addr,
            });
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|_| invalid("memory regions overlap or are empty"))?;
        self.update_memory(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = u32::from(self.device.params().queue_size);
        if num == 0 || num > max || !num.is_power_of_two() {
            return Err(invalid(
                "vring size is not a power of two within the queue size",
            ));
        }
        let queue = self.queue(index)?;
        queue
            .vring
            .set_queue_size(u16::try_from(num).map_err(|_| VuError::InvalidParam)?);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let desc = self.vmm_va_to_gpa(descriptor)?;
        let avail = self.vmm_va_to_gpa(available)?;
        let used = self.vmm_va_to_gpa(used)?;
        let queue = self.queue(index)?;
        queue
            .vring
            .set_queue_info(desc, avail, used)
            .map_err(|_| invalid("vring addresses are misaligned or outside guest memory"))?;
        // The used index continues from what the ring holds (the driver may have run before).
        let used_idx = queue
            .vring
            .queue_used_idx()
            .map_err(|_| invalid("used ring unreadable"))?;
        queue.vring.set_queue_next_used(used_idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let queue = self.queue(index)?;
        let base = u16::try_from(base).map_err(|_| invalid("vring base above 65535"))?;
        queue.vring.set_queue_next_avail(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let queue = self.queue(index)?;
        // "stop ring upon receiving VHOST_USER_GET_VRING_BASE": stop, then drain, so the
        // returned index accounts for every request the device has popped.
        queue.vring.set_queue_ready(false);
        queue.stop_and_drain();
        let next_avail = queue.vring.queue_next_avail();
        queue.set_kick(None);
        queue.vring.set_call(None);
        if self.protocol_acked() {
            queue.vring.set_enabled(false);
        }
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let queue = self.queue(u32::from(index))?;
        // The queue (re)starts: requests a previous vublk left in flight go first.
        queue.request_recovery();
        queue.set_kick(fd);
        queue.vring.set_queue_ready(true);
        queue.poke();
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let queue = self.queue(u32::from(index))?;
        queue.vring.set_call(fd);
        queue.poke();
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.queue(u32::from(index))?.vring.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        if features & !protocol_features().bits() != 0 {
            return Err(invalid(
                "frontend acked protocol features the device did not offer",
            ));
        }
        self.acked_protocol_features = features;
        self.publish_connection();
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.device.params().num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if !self.protocol_acked() {
            return Err(VuError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        let queue = self.queue(index)?;
        queue.vring.set_enabled(enable);
        queue.poke();
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        self.device
            .config()
            .read(offset, size)
            .ok_or_else(|| invalid("config space read out of range"))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        let wce = self.acked_features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        self.device.write_config(offset, buf, wce);
        Ok(())
    }

    fn set_backend_req_fd(&mut self, _backend: vhost::vhost_user::Backend) {
        // The crate's `Backend` cannot send config-change messages; the connection loop
        // peeked this message and keeps its own copy of the channel (see backend_channel.rs).
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation(
            "shared objects are not supported",
        ))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        let (num_queues, queue_size) = self.inflight_shape(inflight)?;
        let (region, file) = InflightRegion::create(num_queues, queue_size).map_err(|e| {
            log::error!("vhost-user: {e}");
            VuError::ReqHandlerError(std::io::Error::other(e.to_string()))
        })?;
        let size = file.metadata().map(|m| m.len()).unwrap_or_default();
        self.install_inflight(region);
        Ok((
            VhostUserInflight::new(size, 0, num_queues, queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let (num_queues, queue_size) = self.inflight_shape(inflight)?;
        let region = InflightRegion::map(
            &file,
            inflight.mmap_size,
            inflight.mmap_offset,
            num_queues,
            queue_size,
        )
        .map_err(|e| invalid(&e.to_string()))?;
        self.install_inflight(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        if self.mappings.len() as u64 >= MAX_MEM_SLOTS {
            return Err(invalid("more memory regions than the slots offered"));
        }
        let as_region = VhostUserMemoryRegion::new(
            region.guest_phys_addr,
            region.memory_size,
            region.user_addr,
            region.mmap_offset,
        );
        let guest_region = Self::region(region.guest_phys_addr, &as_region, fd)?;
        let mem = self
            .mem
            .memory()
            .insert_region(Arc::new(guest_region))
            .map_err(|_| invalid("memory region overlaps an existing one"))?;
        self.update_memory(mem);
        self.mappings.push(AddrMapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa_base: region.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (mem, _removed) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|_| invalid("no such memory region"))?;
        self.update_memory(mem);
        self.mappings
            .retain(|m| m.gpa_base != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("shared memory is not supported"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation("dirty logging is not supported"))
    }
}

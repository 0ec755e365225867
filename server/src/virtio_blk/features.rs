//! What the device offers the driver: feature bits, limits and the initial configuration
//! space, all derived from the disk and device options in one place.

use super::config_space::BlkConfig;
use super::feature::*;
use super::SECTOR_SHIFT;

/// Largest single data segment the driver may submit (`size_max`): 1 MiB, so that Linux, which
/// otherwise caps segments at 64 KiB, can send large requests in few descriptors.
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest DISCARD or WRITE_ZEROES range in one segment, in sectors (4 GiB - 512 B would not
/// fit u32 bytes; QEMU offers about 2 GiB as well).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 22) - 1;
/// Segments per DISCARD or WRITE_ZEROES request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Largest data transfer of one IN/OUT request, whatever its segments: bounds the work a
/// single request may ask for.
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;

/// The disk and device facts the feature set follows from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceParams {
    pub capacity_bytes: u64,
    pub logical_block_size: u32,
    pub read_only: bool,
    pub discard: bool,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl DeviceParams {
    /// The virtio feature bits offered (the vhost-user layer adds its own protocol bit).
    pub fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | (1u64 << bit));
        if self.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            bits |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            if self.discard {
                bits |= 1 << VIRTIO_BLK_F_DISCARD;
            }
        }
        bits
    }

    /// Data segments per request: the queue size less the header and status descriptors, as
    /// QEMU computes it.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// The configuration space at device start (writeback cache on).
    pub fn config(&self) -> BlkConfig {
        let lbs_sectors = self.logical_block_size >> SECTOR_SHIFT;
        BlkConfig {
            capacity: self.capacity_bytes >> SECTOR_SHIFT,
            size_max: SIZE_MAX,
            seg_max: self.seg_max(),
            blk_size: self.logical_block_size,
            physical_block_exp: 0,
            alignment_offset: 0,
            min_io_size: 1,
            opt_io_size: 0,
            writeback: 1,
            num_queues: self.num_queues,
            max_discard_sectors: MAX_DISCARD_SECTORS / lbs_sectors * lbs_sectors,
            max_discard_seg: MAX_DISCARD_SEG,
            discard_sector_alignment: lbs_sectors,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS / lbs_sectors * lbs_sectors,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
            write_zeroes_may_unmap: u8::from(self.discard),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> DeviceParams {
        DeviceParams {
            capacity_bytes: 1 << 30,
            logical_block_size: 512,
            read_only: false,
            discard: true,
            num_queues: 2,
            queue_size: 256,
        }
    }

    fn has(bits: u64, bit: u32) -> bool {
        bits & (1 << bit) != 0
    }

    #[test]
    fn writable_disk_offers_discard_and_write_zeroes_not_ro() {
        let f = params().features();
        assert!(has(f, VIRTIO_BLK_F_DISCARD));
        assert!(has(f, VIRTIO_BLK_F_WRITE_ZEROES));
        assert!(!has(f, VIRTIO_BLK_F_RO));
        assert!(has(f, VIRTIO_F_VERSION_1));
        assert!(has(f, VIRTIO_BLK_F_MQ));
    }

    #[test]
    fn read_only_disk_offers_ro_and_no_writes() {
        let f = DeviceParams {
            read_only: true,
            ..params()
        }
        .features();
        assert!(has(f, VIRTIO_BLK_F_RO));
        assert!(!has(f, VIRTIO_BLK_F_DISCARD));
        assert!(!has(f, VIRTIO_BLK_F_WRITE_ZEROES));
    }

    #[test]
    fn discard_ignore_hides_discard_and_unmap() {
        let p = DeviceParams {
            discard: false,
            ..params()
        };
        assert!(!has(p.features(), VIRTIO_BLK_F_DISCARD));
        assert_eq!(p.config().write_zeroes_may_unmap, 0);
    }

    #[test]
    fn config_follows_params() {
        let c = DeviceParams {
            logical_block_size: 4096,
            ..params()
        }
        .config();
        assert_eq!(c.capacity, (1 << 30) / 512);
        assert_eq!(c.seg_max, 254);
        assert_eq!(c.blk_size, 4096);
        assert_eq!(c.num_queues, 2);
        assert_eq!(c.discard_sector_alignment, 8);
        assert_eq!(c.max_discard_sectors % 8, 0);
    }
}

//! The virtio-blk configuration space (`struct virtio_blk_config`, VIRTIO 1.2 5.2.4), as bytes
//! the driver reads, and the one field it may write (`writeback`, with CONFIG_WCE).

/// Length of the configuration space vublk exposes: up to and including `unused1`
/// (everything before the secure-erase and zoned fields, which vublk does not offer).
pub const CONFIG_SPACE_LEN: usize = 60;

/// Byte offset of `writeback`, the only field a driver writes.
pub const WRITEBACK_OFFSET: usize = 32;

/// The values of `struct virtio_blk_config` vublk offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// In 512-byte sectors, whatever the logical block size.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    /// 1: writeback cache (FLUSH needed); 0: writethrough.
    pub writeback: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// The little-endian layout the driver reads.
    pub fn to_bytes(self) -> [u8; CONFIG_SPACE_LEN] {
        let mut b = [0u8; CONFIG_SPACE_LEN];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20: geometry, not offered (VIRTIO_BLK_F_GEOMETRY).
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[25] = self.alignment_offset;
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[WRITEBACK_OFFSET] = self.writeback;
        // 33: unused0.
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        b
    }

    /// Bytes `offset..offset+len` of the configuration space; reads past its end return zeroes
    /// for the part past the end (as QEMU does), and an absurd range returns `None`.
    pub fn read(&self, offset: u32, len: u32) -> Option<Vec<u8>> {
        let offset = usize::try_from(offset).ok()?;
        let len = usize::try_from(len).ok()?;
        // VHOST_USER_GET_CONFIG payloads are at most 256 bytes (vhost-user spec).
        if len > 256 || offset > 256 {
            return None;
        }
        let bytes = self.to_bytes();
        let mut out = vec![0u8; len];
        for (i, byte) in out.iter_mut().enumerate() {
            if let Some(b) = bytes.get(offset + i) {
                *byte = *b;
            }
        }
        Some(out)
    }

    /// Applies a driver write. Only `writeback` is writable, and only with CONFIG_WCE; every
    /// other byte is ignored. Returns whether `writeback` changed.
    pub fn write(&mut self, offset: u32, data: &[u8], wce_negotiated: bool) -> bool {
        let Ok(offset) = usize::try_from(offset) else {
            return false;
        };
        if !wce_negotiated {
            return false;
        }
        let Some(index) = WRITEBACK_OFFSET.checked_sub(offset) else {
            return false;
        };
        match data.get(index) {
            Some(&value) => {
                let value = u8::from(value != 0);
                let changed = value != self.writeback;
                self.writeback = value;
                changed
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WB: u32 = 32;

    #[test]
    fn writeback_offset_constant_matches() {
        assert_eq!(WB as usize, WRITEBACK_OFFSET);
    }

    fn sample() -> BlkConfig {
        BlkConfig {
            capacity: 0x0102_0304_0506_0708,
            seg_max: 254,
            blk_size: 4096,
            num_queues: 3,
            writeback: 1,
            max_discard_seg: 32,
            write_zeroes_may_unmap: 1,
            ..BlkConfig::default()
        }
    }

    #[test]
    fn layout_matches_virtio_blk_config_offsets() {
        let b = sample().to_bytes();
        assert_eq!(
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            0x0102_0304_0506_0708
        );
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 32);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn partial_read_and_read_past_end() {
        let c = sample();
        assert_eq!(c.read(34, 2).unwrap(), vec![3, 0]);
        assert_eq!(c.read(58, 4).unwrap(), vec![0, 0, 0, 0]);
        assert!(c.read(0, 4096).is_none());
    }

    #[test]
    fn only_writeback_is_writable_and_only_with_wce() {
        let mut c = sample();
        assert!(!c.write(WB, &[0], false));
        assert_eq!(c.writeback, 1);
        assert!(c.write(WB, &[0], true));
        assert_eq!(c.writeback, 0);
        // A write covering capacity does not change it.
        assert!(c.write(0, &[0xff; 40], true));
        assert_eq!(c.capacity, sample().capacity);
        assert_eq!(c.writeback, 1);
        assert!(!c.write(40, &[0], true));
    }
}

//! The virtio-blk device model, free of any transport: request parsing, the configuration
//! space and the feature set. Nothing here knows vhost-user or io_uring; it reads guest memory
//! only through vm-memory's `GuestMemory` trait, so tests run on anonymous memory.
//!
//! Numbers are from the VIRTIO 1.2 specification, section 5.2 ("Block Device").

pub mod config_space;
pub mod features;
pub mod request;

/// Request types (5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status values (5.2.6).
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Bytes GET_ID returns: "The device ID string is ... up to 20 bytes".
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// The unit of `sector` fields, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
pub const SECTOR_SHIFT: u32 = 9;

/// Device feature bits (5.2.3) and transport bits (6).
pub mod feature {
    pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
    pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
    pub const VIRTIO_BLK_F_RO: u32 = 5;
    pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
    pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
    pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
    pub const VIRTIO_BLK_F_CONFIG_WCE: u32 = 11;
    pub const VIRTIO_BLK_F_MQ: u32 = 12;
    pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
    pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
    pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
    pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
    pub const VIRTIO_F_VERSION_1: u32 = 32;
}

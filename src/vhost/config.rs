//! virtio-blk configuration space and feature bits (SPEC §1, virtio 1.2 §5.2.4).
//!
//! # Design
//! [`BlkConfig`] is computed once per export from the bdev's facts and the export options; it is
//! serialised little-endian into the `virtio_blk_config` layout on every `GET_CONFIG`. Only `wce`
//! is writable, and it lives in the device (an atomic) rather than here.

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::request::{Limits, SECTOR_SIZE};
use crate::bdev::BdevInfo;

/// Offset of `wce` in `virtio_blk_config`.
pub const WCE_OFFSET: u32 = 32;
/// Size of the config space we expose (up to and including `write_zeroes_may_unmap` + padding).
pub const CONFIG_LEN: usize = 60;
/// Upper bound of the largest data descriptor we accept (`size_max`), bytes.
pub const SIZE_MAX_BYTES: u32 = 128 << 20;
/// Default cap for discard / write-zeroes length, sectors (when the bdev declares no limit).
const DEFAULT_DWZ_MAX_SECTORS: u64 = 1 << 22;

/// The device's static configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// Size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Parser limits (also advertised).
    pub limits: Limits,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Optimal I/O size in logical blocks.
    pub opt_io_size_blocks: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Discard / write-zeroes granularity in sectors.
    pub discard_sector_alignment: u32,
    /// write-zeroes may deallocate.
    pub write_zeroes_may_unmap: bool,
    /// Offered virtio feature bits.
    pub features: u64,
}

impl BlkConfig {
    /// Derives the configuration from the bdev and the export options.
    pub fn new(info: &BdevInfo, num_queues: u16, queue_size: u16, read_only: bool) -> Self {
        let bs = info.block_size.max(512);
        let sectors_per_block = u64::from(bs) / SECTOR_SIZE;
        let capacity_sectors = info.num_blocks.saturating_mul(sectors_per_block);
        let cap = |blocks: u64| -> u32 {
            let s =
                if blocks == 0 { DEFAULT_DWZ_MAX_SECTORS } else { blocks.saturating_mul(sectors_per_block) };
            let s = s.min(DEFAULT_DWZ_MAX_SECTORS);
            // Multiple of the block size; fits in u32 by the min above.
            u32::try_from(s - s % sectors_per_block).unwrap_or(0)
        };
        let discard = info.supports.unmap;
        let seg_max = u32::from(queue_size.saturating_sub(2).max(1));
        // Frontends compute size_max * seg_max in an i32 (libblkio panics on overflow): keep it below.
        let size_max = SIZE_MAX_BYTES.min((i32::MAX.unsigned_abs() / seg_max) & !4095).max(4096);
        let limits = Limits {
            block_size: bs,
            seg_max,
            size_max,
            max_discard_sectors: if discard { cap(info.max_unmap_blocks) } else { 0 },
            max_write_zeroes_sectors: cap(info.max_write_zeroes_blocks),
            discard,
            read_only,
        };
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1 << VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            if discard {
                features |= 1 << VIRTIO_BLK_F_DISCARD;
            }
        }
        let opt_io_size_blocks = info.optimal_io_boundary_blocks;
        Self {
            capacity_sectors,
            limits,
            physical_block_exp: 0,
            opt_io_size_blocks,
            num_queues,
            discard_sector_alignment: u32::try_from(sectors_per_block).unwrap_or(1),
            write_zeroes_may_unmap: discard && info.unmap_reads_zeroes,
            features,
        }
    }

    /// The `virtio_blk_config` bytes with the current `wce`.
    pub fn to_bytes(&self, wce: u8) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0, &self.capacity_sectors.to_le_bytes());
        put(8, &self.limits.size_max.to_le_bytes());
        put(12, &self.limits.seg_max.to_le_bytes());
        // 16..20 geometry: zero.
        put(20, &self.limits.block_size.to_le_bytes());
        put(24, &[self.physical_block_exp]);
        // 25 alignment_offset, 26..28 min_io_size: 0 / 1 block.
        put(26, &1u16.to_le_bytes());
        put(28, &self.opt_io_size_blocks.to_le_bytes());
        put(32, &[wce]);
        put(34, &self.num_queues.to_le_bytes());
        put(36, &self.limits.max_discard_sectors.to_le_bytes());
        put(40, &u32::from(self.limits.discard).to_le_bytes());
        put(44, &self.discard_sector_alignment.to_le_bytes());
        put(48, &self.limits.max_write_zeroes_sectors.to_le_bytes());
        put(52, &1u32.to_le_bytes());
        put(56, &[u8::from(self.write_zeroes_may_unmap)]);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> BdevInfo {
        let mut i = BdevInfo::new("t", "test", 4096, 1000);
        i.supports.unmap = true;
        i.unmap_reads_zeroes = true;
        i.max_unmap_blocks = 16;
        i.optimal_io_boundary_blocks = 32;
        i
    }

    #[test]
    fn layout_and_limits() {
        let c = BlkConfig::new(&info(), 4, 256, false);
        let b = c.to_bytes(1);
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().expect("8")), 8000);
        let le32 = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        assert_eq!(le32(12), 254, "seg_max");
        assert!(u64::from(le32(8)) * 254 <= i32::MAX as u64, "size_max * seg_max fits i32");
        assert_eq!(le32(20), 4096, "blk_size");
        assert_eq!(le32(28), 32, "opt_io_size");
        assert_eq!(b[WCE_OFFSET as usize], 1);
        assert_eq!(u16::from_le_bytes([b[34], b[35]]), 4);
        assert_eq!(le32(36), 128, "max_discard_sectors = 16 blocks");
        assert_eq!(le32(44), 8, "discard_sector_alignment");
        assert_eq!(b[56], 1);
        assert!(c.features & (1 << VIRTIO_BLK_F_DISCARD) != 0);
        assert!(c.features & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0);
        assert_eq!(c.features & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn read_only_and_no_unmap() {
        let mut i = info();
        i.supports.unmap = false;
        let c = BlkConfig::new(&i, 1, 128, true);
        assert!(c.features & (1 << VIRTIO_BLK_F_RO) != 0);
        assert_eq!(c.features & ((1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)), 0);
        assert!(c.limits.read_only && !c.limits.discard);
        let c = BlkConfig::new(&i, 1, 128, false);
        assert_eq!(c.features & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert!(c.features & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0);
        assert_eq!(c.to_bytes(0)[56], 0, "write_zeroes_may_unmap without unmap");
    }
}

//! The block model of the crash tests that run the real binary and kill it (`ftl_crash`,
//! `ftl_nvcache`): self-describing 4 KiB blocks (LBA + version + a pattern of both), so a read tells
//! garbage, another block's data and a stale version apart; the versions each LBA must or may hold;
//! and the whole-device check after a restart.
#![allow(dead_code)]

use std::collections::HashMap;

use vblkd::client::BlkClient;

pub const BS: usize = 4096;

/// Version `ver` of block `lba` (version 0: zeros, as never written or unmapped).
pub fn block(lba: u64, ver: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    if ver == 0 {
        return b;
    }
    b[0..8].copy_from_slice(&lba.to_le_bytes());
    b[8..16].copy_from_slice(&ver.to_le_bytes());
    for (i, x) in b.iter_mut().enumerate().skip(16) {
        *x = (lba as u8).wrapping_mul(29) ^ (ver as u8).wrapping_mul(11) ^ (i as u8);
    }
    b
}

/// (LBA, version) of a block made by [`block`] (`(u64::MAX, 0)` for zeros); None for anything else.
pub fn decode(b: &[u8]) -> Option<(u64, u64)> {
    if b.iter().all(|x| *x == 0) {
        return Some((u64::MAX, 0));
    }
    let lba = u64::from_le_bytes(b[0..8].try_into().ok()?);
    let ver = u64::from_le_bytes(b[8..16].try_into().ok()?);
    (block(lba, ver) == b).then_some((lba, ver))
}

/// xorshift64: reproducible per seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The version each LBA must hold after a crash (`sure`: durable) and the others it may hold
/// (`maybe`: written or unmapped since, not yet durable).
#[derive(Default)]
pub struct Model {
    pub sure: HashMap<u64, u64>,
    pub maybe: HashMap<u64, Vec<u64>>,
}

/// Reads the whole device and checks every block against the model, then takes what was read as the
/// new sure state (clearing `maybe`).
pub fn verify(c: &mut BlkClient, m: &mut Model, nblocks: u64, cycle: usize) {
    let per = 64u64;
    let mut lba = 0;
    while lba < nblocks {
        let n = per.min(nblocks - lba);
        let r = c.sync(0, |c, u| c.read(0, lba * BS as u64, 0, (n as usize) * BS, u)).expect("read");
        assert_eq!(r, 0, "cycle {cycle}: read of {lba}+{n} failed");
        for i in 0..n {
            let l = lba + i;
            let b = &c.mem()[(i as usize) * BS..(i as usize + 1) * BS];
            let (gl, gv) = decode(b).unwrap_or_else(|| panic!("cycle {cycle}: lba {l} holds garbage"));
            assert!(gv == 0 || gl == l, "cycle {cycle}: lba {l} holds lba {gl}'s data");
            let sure = m.sure.get(&l).copied().unwrap_or(0);
            let ok = gv == sure || m.maybe.get(&l).is_some_and(|p| p.contains(&gv));
            assert!(
                ok,
                "cycle {cycle}: lba {l} reads version {gv}; must be {sure}, may be {:?}",
                m.maybe.get(&l)
            );
            if gv == 0 {
                m.sure.remove(&l);
            } else {
                m.sure.insert(l, gv);
            }
        }
        lba += n;
    }
    m.maybe.clear();
}

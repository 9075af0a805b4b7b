//! Request parser promises, asserted exactly (issue 12): what a chain longer than 4 GiB gets, and
//! that every accepted request's status byte is in a device-writable descriptor.
//!
//! # Design
//! Chains are built with virtio-queue's `MockSplitQueue` and parsed with the public
//! `Request::parse`, as the poller does. The chain iterator of virtio-queue 0.18 stops at the
//! descriptor that takes the chain past 2^32 bytes (VIRTIO 1.2, 2.7.5.2), so the parser sees a chain
//! cut short (`Truncated`, no status write) and its own `checked_add` of the data lengths
//! (`LengthOverflow`) cannot be reached through a real queue: a header (16 bytes) and a status byte are
//! always counted too. That is why the `checked_add` → `wrapping_add` mutant survives every test; it
//! is listed as equivalent (with this reason) in `.cargo/mutants.toml`. If a virtio-queue update
//! stops cutting such chains, `chain_past_4_gib_is_cut_short` fails and says so.

use vblkd::vhost::request::{GuestMem, Limits, ParseError, Request};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x8000;
const CAP: u64 = 1 << 20;

fn mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory")
}

fn limits() -> Limits {
    Limits {
        block_size: 512,
        seg_max: 8,
        size_max: u32::MAX,
        max_discard_sectors: 1 << 16,
        max_write_zeroes_sectors: 1 << 16,
        discard: true,
        read_only: false,
    }
}

fn header(m: &GuestMem, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(HDR)).expect("header");
}

fn parse(m: &GuestMem, descs: &[(u64, u32, bool)]) -> Result<Request, vblkd::vhost::request::BadRequest> {
    let q = MockSplitQueue::create(m, GuestAddress(0x10_000), 16);
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .map(|&(a, len, w)| {
            RawDescriptor::from(Descriptor::new(a, len, if w { VRING_DESC_F_WRITE as u16 } else { 0 }, 0))
        })
        .collect();
    let chain = q.build_desc_chain(&raw).expect("chain");
    Request::parse(chain, m, CAP, &limits())
}

#[test]
fn chain_past_4_gib_is_cut_short() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    // 16 + 2 GiB + 2 GiB: the second data descriptor takes the chain past 2^32 bytes.
    let e = parse(
        &m,
        &[(HDR, 16, false), (DATA, 0x8000_0000, true), (DATA, 0x8000_0000, true), (STATUS, 1, true)],
    )
    .expect_err("refused");
    assert_eq!(e.error, ParseError::Truncated, "virtio-queue cuts the chain; the parser must say Truncated");
    assert_eq!(e.status_addr, None, "a cut chain gets no status write");
    // Just under 4 GiB in total is a whole chain: refused for its length, with a status write.
    let e = parse(
        &m,
        &[(HDR, 16, false), (DATA, 0x8000_0000, true), (DATA, 0x7fff_f000, true), (STATUS, 1, true)],
    )
    .expect_err("refused");
    assert_ne!(e.error, ParseError::Truncated);
    assert_eq!(e.status_addr, Some(GuestAddress(STATUS)));
}

/// Every accepted request's status byte lies in a device-writable descriptor, and every chain whose
/// last descriptor is device-readable is refused without a status write, whatever comes before it.
#[test]
fn status_byte_is_always_in_a_device_writable_descriptor() {
    let m = mem();
    let kinds = [
        (VIRTIO_BLK_T_IN, true),
        (VIRTIO_BLK_T_OUT, false),
        (VIRTIO_BLK_T_FLUSH, false),
        (VIRTIO_BLK_T_GET_ID, true),
    ];
    for (kind, data_writable) in kinds {
        header(&m, kind, 8);
        let data_len = if kind == VIRTIO_BLK_T_GET_ID { 20 } else { 4096 };
        for with_data in [false, true] {
            for status_len in [1u32, 2, 16] {
                for status_writable in [false, true] {
                    let mut d = vec![(HDR, 16, false)];
                    if with_data && kind != VIRTIO_BLK_T_FLUSH {
                        d.push((DATA, data_len, data_writable));
                    }
                    d.push((STATUS, status_len, status_writable));
                    let r = parse(&m, &d);
                    let last = STATUS + u64::from(status_len) - 1;
                    match (status_writable, r) {
                        (true, Ok(req)) => assert_eq!(req.status_addr, GuestAddress(last)),
                        (true, Err(e)) => assert_eq!(e.status_addr, Some(GuestAddress(last)), "{kind} {d:?}"),
                        (false, Ok(req)) => panic!("{kind} {d:?}: accepted with a read-only status: {req:?}"),
                        (false, Err(e)) => {
                            assert_eq!(e.error, ParseError::BadStatus, "{kind} {d:?}");
                            assert_eq!(e.status_addr, None, "{kind} {d:?}: no write into a read-only status");
                        }
                    }
                }
            }
        }
    }
}

//! Fuzz entry points: one function per target, shared by the cargo-fuzz targets in `fuzz/` and by
//! the ordinary tests that replay the checked-in corpus (`tests/fuzz_replay.rs`).
//!
//! ```text
//!  bytes ─► chain_parser   descriptor table + buffers in a mock guest memory ─► ChainWalker ─► Request::parse_descs
//!        ─► avail_ring     a split ring over fuzzed memory ─► avail_peek / pop / parse / add_used loop
//!        ─► front_door     a sequence of vhost-user messages (+ fd sizes) ─► FrontDoor::check
//!        ─► wire           a byte stream on a socket ─► recv_message
//!        ─► ocssd_image    header / chunk-record decoders (crc fixed up on request)
//!        ─► cache_md       cache superblocks + line records ─► the cache's load path (`load_map`)
//!        ─► ftl_md         FTL checkpoint area (superblock + regions), band head/tail, nv-cache metadata
//! ```
//!
//! # Design
//! Each function must never panic on any input; each also asserts the properties its caller relies
//! on (a parsed request lies inside guest memory and the device; the avail loop ends within the
//! queue size and never publishes a head outside the queue; accepted memory tables never overlap).
//! Guest memory is created once per thread and rewritten for each input, so a run reaches millions of
//! executions.

use std::cell::RefCell;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::vhost::chain::ChainWalker;
use crate::vhost::frontdoor::{FrontDoor, Header, Verdict, HDR_LEN};
use crate::vhost::poller::avail_peek;
use crate::vhost::request::{GuestMem, Limits, Request};

/// Size of each of the two guest memory regions (a hole separates them).
const REGION: u64 = 0x4000;
/// Second region's start.
const REGION2: u64 = 0x10000;

thread_local! {
    static MEM: RefCell<Option<(GuestMem, Vec<u8>)>> = const { RefCell::new(None) };
}

fn with_mem<R>(data: &[u8], f: impl FnOnce(&GuestMem) -> R) -> R {
    MEM.with(|m| {
        let mut m = m.borrow_mut();
        let (mem, buf) = m.get_or_insert_with(|| {
            let mem = GuestMem::from_ranges(&[
                (GuestAddress(0), REGION as usize),
                (GuestAddress(REGION2), REGION as usize),
            ])
            .unwrap_or_else(|_| GuestMem::new());
            (mem, vec![0u8; REGION as usize])
        });
        // Fill both regions from the input (repeated), so every descriptor and buffer is fuzzed.
        if data.is_empty() {
            buf.fill(0);
        } else {
            let mut at = 0;
            while at < buf.len() {
                let n = data.len().min(buf.len() - at);
                buf[at..at + n].copy_from_slice(&data[..n]);
                at += n;
            }
        }
        let _ = mem.write_slice(buf, GuestAddress(0));
        let _ = mem.write_slice(buf, GuestAddress(REGION2));
        f(mem)
    })
}

fn limits(flags: u8) -> Limits {
    Limits {
        block_size: if flags & 1 == 0 { 512 } else { 4096 },
        seg_max: u32::from(flags >> 4) + 1,
        size_max: 1 << 16,
        max_discard_sectors: 1 << 12,
        max_write_zeroes_sectors: 1 << 12,
        discard: flags & 2 != 0,
        read_only: flags & 4 != 0,
    }
}

const CAPACITY: u64 = 1 << 16;

fn check_request(mem: &GuestMem, req: &Request, l: &Limits) {
    assert!(GuestMemoryBackend::check_range(mem, req.status_addr, 1), "status outside memory");
    let total: usize = req.iovecs.iter().map(|v| v.iov_len).sum();
    match req.kind {
        crate::vhost::request::RequestKind::Read { sector }
        | crate::vhost::request::RequestKind::Write { sector } => {
            assert_eq!(total as u64, u64::from(req.data_len), "iovecs cover the data length");
            assert!(sector + u64::from(req.data_len) / 512 <= CAPACITY, "beyond capacity");
            assert_eq!(u64::from(req.data_len) % u64::from(l.block_size), 0);
            assert!(!l.read_only || matches!(req.kind, crate::vhost::request::RequestKind::Read { .. }));
        }
        crate::vhost::request::RequestKind::Discard { sector, num_sectors }
        | crate::vhost::request::RequestKind::WriteZeroes { sector, num_sectors, .. } => {
            assert!(!l.read_only);
            assert!(sector + u64::from(num_sectors) <= CAPACITY);
        }
        _ => {}
    }
    for &(addr, len) in &req.segments {
        assert!(GuestMemoryBackend::check_range(mem, addr, len as usize), "segment outside memory");
    }
}

/// Target `chain_parser`: input = [head lo, head hi, log2 table size, flags, ...memory]. Returns
/// 1 when the chain parsed into a request.
pub fn chain_parser(data: &[u8]) -> u64 {
    if data.len() < 4 {
        return 0;
    }
    let head = u16::from_le_bytes([data[0], data[1]]) % 64;
    let size = 1u16 << (data[2] % 8);
    let l = limits(data[3]);
    with_mem(&data[4..], |mem| {
        // The descriptor table sits at 0x100 in the first region.
        let walker = ChainWalker::new(mem, GuestAddress(0x100), size, head);
        match Request::parse_descs(head, walker, mem, CAPACITY, &l) {
            Ok(req) => {
                check_request(mem, &req, &l);
                1
            }
            Err(_) => 0,
        }
    })
}

/// Target `avail_ring`: input = [size exp, next_avail lo, next_avail hi, flags, ...memory]. The
/// ring is at 0x100 (descriptors), avail and used rings after it, all in fuzzed memory. Returns the
/// number of chains popped.
pub fn avail_ring(data: &[u8]) -> u64 {
    if data.len() < 4 {
        return 0;
    }
    let size = 1u16 << (data[0] % 7);
    let next = u16::from_le_bytes([data[1], data[2]]);
    let l = limits(data[3]);
    with_mem(&data[4..], |mem| {
        let Ok(mut q) = Queue::new(64) else { return 0 };
        q.set_size(size);
        let desc = 0x100u64;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_next_avail(next);
        q.set_next_used(next);
        q.set_ready(true);
        if !q.is_valid(mem) {
            return 0;
        }
        // The poller's loop: it must end within `size` pops, and every popped head is in range.
        let mut pops = 0u32;
        loop {
            let peeked = match avail_peek(&q, mem) {
                Ok(None) | Err(_) => break,
                Ok(Some((n, head))) => {
                    assert!(n <= size, "pending {n} > size {size}");
                    assert!(head < size, "peeked head {head} outside the queue of {size}");
                    head
                }
            };
            let Some(chain) = q.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            assert_eq!(head, peeked, "the poller would walk another chain than the one popped");
            pops += 1;
            assert!(pops <= u32::from(size), "more pops than the queue holds: the loop would spin");
            if let Ok(req) = Request::parse(chain, mem, CAPACITY, &l) {
                check_request(mem, &req, &l);
            }
            assert!(q.add_used(mem, head, 1).is_ok(), "add_used of an in-range head failed");
        }
        let _ = q.iter(mem);
        u64::from(pops)
    })
}

/// Target `front_door`: input = a sequence of [12-byte header][fd count][fd sizes 8 B each][body].
/// Returns the number of messages forwarded.
pub fn front_door(data: &[u8]) -> u64 {
    let mut forwarded = 0;
    let features = (1u64 << 32) | (1 << 30) | (1 << 29) | 0x3fff;
    let protocol = (1 << 0) | (1 << 3) | (1 << 9) | (1 << 15);
    let mut door = FrontDoor::new(2, 64, features, protocol, 1 << 12);
    let mut rest = data;
    let mut total_regions: Vec<(u64, u64)> = Vec::new();
    while rest.len() > HDR_LEN {
        let mut hb = [0u8; HDR_LEN];
        hb.copy_from_slice(&rest[..HDR_LEN]);
        let mut hdr = Header::parse(&hb);
        // Keep most headers well-formed so the checker's body logic is reached.
        if rest[HDR_LEN] & 0x80 == 0 {
            hdr.flags = (hdr.flags & 0x8) | 1;
            hdr.request %= 40;
        }
        let nfds = usize::from(rest[HDR_LEN] & 0x7);
        rest = &rest[HDR_LEN + 1..];
        let mut sizes = Vec::new();
        for _ in 0..nfds {
            if rest.len() < 8 {
                break;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&rest[..8]);
            let v = u64::from_le_bytes(b);
            sizes.push(if v & 1 == 0 { Some(v >> 1) } else { None });
            rest = &rest[8..];
        }
        let len = (hdr.size as usize).min(rest.len()).min(4096);
        let body = &rest[..len];
        // Usually the header's size is the body's; sometimes it lies (a truncated message).
        if rest.first().map_or(true, |b| b & 1 == 0) {
            hdr.size = len as u32;
        }
        rest = &rest[len..];
        let verdict = door.check(&hdr, body, &sizes);
        if let Verdict::Forward(_) = verdict {
            forwarded += 1;
            match hdr.request {
                5 => {
                    // An accepted table: regions fit their fds and do not overlap.
                    let n = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
                    total_regions.clear();
                    for k in 0..n {
                        let r = &body[8 + 32 * k..8 + 32 * (k + 1)];
                        let gpa = u64::from_le_bytes(r[0..8].try_into().unwrap_or([0; 8]));
                        let sz = u64::from_le_bytes(r[8..16].try_into().unwrap_or([0; 8]));
                        let off = u64::from_le_bytes(r[24..32].try_into().unwrap_or([0; 8]));
                        assert!(sz > 0);
                        if let Some(Some(fsz)) = sizes.get(k) {
                            assert!(off.checked_add(sz).is_some_and(|e| e <= *fsz), "region past its fd");
                        }
                        for &(g, s) in &total_regions {
                            assert!(gpa + sz <= g || g + s <= gpa, "overlapping regions accepted");
                        }
                        total_regions.push((gpa, sz));
                    }
                }
                8 => {
                    let num = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
                    assert!(num.is_power_of_two() && num <= 64, "ring size {num} accepted");
                }
                _ => {}
            }
        }
    }
    forwarded
}

/// Target `wire`: the bytes arrive on a socket; `recv_message` must end with a message or an error,
/// never panic or allocate more than one payload's bound. Returns the number of messages read.
pub fn wire(data: &[u8]) -> u64 {
    use std::io::Write;
    let Ok((mut a, b)) = std::os::unix::net::UnixStream::pair() else { return 0 };
    let mut n = 0;
    let data = &data[..data.len().min(64 * 1024)];
    let _ = a.set_nonblocking(true);
    let _ = a.write_all(data);
    drop(a);
    for _ in 0..64 {
        match crate::vhost::frontdoor::recv_message(&b) {
            Ok(m) => {
                assert!(m.body.len() <= crate::vhost::frontdoor::MAX_PAYLOAD);
                n += 1;
            }
            Err(_) => break,
        }
    }
    n
}

/// Target `ocssd_image`: header and chunk-record decoders. Byte 0 bit 0 asks for the header's
/// crc32c to be fixed up (to reach the field checks), bit 1 for the record's. Returns 1 when the
/// header decoded, plus 2 when the chunk record did.
pub fn ocssd_image(data: &[u8]) -> u64 {
    use crate::ocssd::emu::image::{decode_header, ChunkRecord, CHUNK_RECORD_BYTES, HEADER_BYTES, MAGIC};
    if data.is_empty() {
        return 0;
    }
    let flags = data[0];
    let mut r = 0;
    let body = &data[1..];
    let mut hdr = vec![0u8; HEADER_BYTES];
    hdr[..MAGIC.len()].copy_from_slice(&MAGIC);
    let n = body.len().min(HEADER_BYTES - MAGIC.len());
    hdr[MAGIC.len()..MAGIC.len() + n].copy_from_slice(&body[..n]);
    if flags & 1 != 0 {
        let crc = crc32c::crc32c(&hdr[..HEADER_BYTES - 4]);
        hdr[HEADER_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    }
    let short = usize::from(flags >> 4) * 256;
    let _ = decode_header("fuzz", &hdr[..HEADER_BYTES.saturating_sub(short)]);
    if let Ok((g, layout)) = decode_header("fuzz", &hdr) {
        assert!(layout.image_bytes >= layout.data_offset);
        let _ = g.total_chunks();
        r |= 1;
    }
    let mut rec = [0u8; CHUNK_RECORD_BYTES];
    let m = body.len().min(CHUNK_RECORD_BYTES);
    rec[..m].copy_from_slice(&body[body.len() - m..]);
    if flags & 2 != 0 {
        let crc = crc32c::crc32c(&rec[..60]);
        rec[60..].copy_from_slice(&crc.to_le_bytes());
    }
    let slba = u64::from_le_bytes(rec[8..16].try_into().unwrap_or([0; 8]));
    let cnlb = u64::from_le_bytes(rec[16..24].try_into().unwrap_or([0; 8]));
    if ChunkRecord::decode(&rec, slba, cnlb).is_ok() {
        r |= 2;
    }
    let _ = ChunkRecord::decode(&rec[..m], 0, 0);
    r
}

/// Lines at most loaded per input (keeps executions fast; the load loop is the same for any count).
const CACHE_MD_MAX_LINES: u32 = 4096;

/// Fuzz target `cache_md`: a cache device's superblock area and line records, fed to the load path
/// (`decode_superblock`, `check_superblock`, `load_map`). Input: a flags byte, then either the raw
/// first 8 KiB of the device (flags bit 0 clear) or 16 bytes of superblock fields encoded with a
/// valid CRC (bit 0 set: line size, line count, clean flag, cores, block size, perturbations), then
/// the record area (bit 4: slot CRCs fixed up; bit 3: the area is cut short). Damage must give an
/// error, never a panic; a loaded map must be consistent. Returns bits: 1 superblock decoded,
/// 2 accepted for the device, 4 records loaded, 8 at least one line loaded.
pub fn cache_md(data: &[u8]) -> u64 {
    use crate::cache::layout::{self, CoreEntry, Superblock};
    let Some((&flags, body)) = data.split_first() else { return 0 };
    let mut first = vec![0u8; layout::MD_OFFSET as usize];
    let records: &[u8];
    if flags & 1 == 0 {
        let n = body.len().min(first.len());
        first[..n].copy_from_slice(&body[..n]);
        records = &body[n..];
    } else {
        let mut f = [0u8; 16];
        let n = body.len().min(16);
        f[..n].copy_from_slice(&body[..n]);
        records = &body[n..];
        let line_size = if f[0] & 0x80 != 0 { u32::from(f[0]) << 9 } else { 4096 << (f[0] % 5) };
        let lines = 1 + u32::from(u16::from_le_bytes([f[1], f[2]])) % 1024;
        let block = if f[3] & 1 != 0 { 4096 } else { 512 };
        let dev = layout::MD_OFFSET
            + u64::from(lines.div_ceil(layout::LINES_PER_PAGE)) * layout::PAGE_BYTES
            + u64::from(lines) * u64::from(line_size.max(1));
        let (num_lines, data_offset) =
            layout::geometry(dev, u64::from(line_size.max(1))).unwrap_or((lines, 0));
        let cores = (0..f[4] % 4)
            .map(|k| CoreEntry {
                id: u16::from(f[5 + usize::from(k)]) % 8,
                cache_bdev: format!("c{k}"),
                core_bdev: format!("core{k}"),
                core_blocks: u64::from(f[9]) << 12,
                block_size: 512,
                stats: if f[10] & 1 != 0 {
                    serde_json::json!({"read_hits": f[11], "evictions": -1})
                } else {
                    serde_json::json!({"read_hits": f[11], "write_misses": f[12]})
                },
            })
            .collect();
        let sb = Superblock {
            uuid: "fuzz".into(),
            line_size,
            mode: "wb".into(),
            cleaner: "alru".into(),
            num_lines: num_lines.wrapping_add(u32::from(f[13] & 3)).wrapping_sub(1),
            cache_block_size: block,
            data_offset: data_offset ^ u64::from(f[14] & 0x10),
            clean_shutdown: f[3] & 2 != 0,
            cores,
        };
        let seq = u64::from(f[15]);
        if let Ok(copy) = layout::encode_superblock(&sb, seq) {
            let at = if f[15] & 1 != 0 { layout::SB_BYTES as usize } else { 0 };
            first[at..at + layout::SB_BYTES as usize].copy_from_slice(&copy);
        }
    }
    let mut r = 0;
    let Ok((sb, _seq)) = layout::decode_superblock(&first) else { return r };
    r |= 1;
    // The device the superblock claims (the loader checks it against the real one).
    let dev_bytes = u64::from(sb.num_lines)
        .checked_mul(u64::from(sb.line_size))
        .and_then(|d| d.checked_add(sb.data_offset));
    let Some(dev_bytes) = dev_bytes else { return r };
    if layout::check_superblock(&sb, dev_bytes, sb.cache_block_size).is_err() {
        return r;
    }
    r |= 2;
    if sb.num_lines > CACHE_MD_MAX_LINES {
        return r;
    }
    let md_bytes =
        (layout::page_offset(sb.num_lines.div_ceil(layout::LINES_PER_PAGE)) - layout::MD_OFFSET) as usize;
    let mut image = vec![0u8; if flags & 8 != 0 { md_bytes.min(records.len()) } else { md_bytes }];
    let n = image.len().min(records.len());
    image[..n].copy_from_slice(&records[..n]);
    if flags & 16 != 0 {
        for slot in image.chunks_mut(layout::SLOT_BYTES) {
            if slot.len() == layout::SLOT_BYTES && slot.iter().any(|&b| b != 0) {
                let crc = crc32c::crc32c(&slot[..60]);
                slot[60..].copy_from_slice(&crc.to_le_bytes());
            }
        }
    }
    let Ok((map, loaded, dirty)) = crate::cache::load_map(&sb, &image, sb.num_lines, "fuzz") else {
        return r;
    };
    r |= 4;
    assert!(dirty <= loaded && loaded <= u64::from(sb.num_lines));
    let known: Vec<u16> = sb.cores.iter().map(|c| c.id).collect();
    let mut seen = 0u64;
    for (i, l) in map.lines.iter().enumerate() {
        if let Some(k) = l.key() {
            seen += 1;
            assert!(known.contains(&k.0), "line {i} of an unknown core");
            assert_eq!(map.lookup(k), Some(i as u32), "index and lines disagree");
            assert_eq!(l.dirty & !l.valid(), 0, "dirty sectors must be valid");
            assert!(l.valid() != 0, "an empty line is not loaded");
        }
    }
    assert_eq!(seen, loaded);
    if loaded > 0 {
        r |= 8;
    }
    r
}

/// Target `ftl_md`: the FTL's on-media metadata and the nv-cache's, as restore reads them. Byte 0:
/// bit 0 fixes up the CRC32C of every region found in the area image (header and payload, so the
/// field checks are reached), bits 2..=7 pick the valid-map size. The rest is a checkpoint area image
/// (4 KiB blocks, decoded by the same `md::decode_checkpoint` restore uses) whose first and last
/// blocks are also decoded as a band head, a band tail, an OOB entry and an nv-cache superblock and
/// record header. Returns 1 when a checkpoint decoded, plus 2 for a tail, 4 for an nv-cache
/// superblock.
pub fn ftl_md(data: &[u8]) -> u64 {
    use crate::ftl::layout::{self, BLOCK_BYTES};
    use crate::ftl::{md, nvcache, FtlError};
    if data.is_empty() {
        return 0;
    }
    let flags = data[0];
    let body = &data[1..];
    let mut img = body.to_vec();
    img.resize(body.len().div_ceil(BLOCK_BYTES).max(1) * BLOCK_BYTES, 0);
    if flags & 1 != 0 {
        // Region header: magic 0..4, length 16..24, payload crc 24..28, header crc 28..32.
        let magic = layout::encode_region(layout::RegionId::Superblock, &[]);
        for b in (0..img.len()).step_by(BLOCK_BYTES) {
            if img[b..b + 4] != magic[0..4] {
                continue;
            }
            let len = u64::from_le_bytes(img[b + 16..b + 24].try_into().unwrap_or([0; 8]));
            let end = usize::try_from(len).ok().and_then(|l| (b + 32).checked_add(l)).unwrap_or(usize::MAX);
            let end = end.min(img.len());
            let pc = crc32c::crc32c(&img[b + 32..end]);
            img[b + 24..b + 28].copy_from_slice(&pc.to_le_bytes());
            let hc = crc32c::crc32c(&img[b..b + 28]);
            img[b + 28..b + 32].copy_from_slice(&hc.to_le_bytes());
        }
    }
    let mut r = 0;
    let blocks = (img.len() / BLOCK_BYTES) as u64;
    let mut read = |off: u64, n: u64| -> Result<Vec<u8>, FtlError> {
        match off.checked_add(n) {
            Some(end) if end <= blocks => {
                Ok(img[(off as usize) * BLOCK_BYTES..(end as usize) * BLOCK_BYTES].to_vec())
            }
            _ => Err(FtlError::Corrupt("metadata runs past its area".into())),
        }
    };
    let addr_space = u64::from(flags >> 2) * 1000;
    if let Ok(c) = md::decode_checkpoint(&mut read, &|_| Ok(()), addr_space) {
        assert_eq!(c.l2p.len() as u64, c.sb.num_lbas);
        assert_eq!(c.bands.len(), c.sb.num_bands as usize);
        r |= 1;
    }
    let first = &img[..BLOCK_BYTES];
    let last = &img[img.len() - BLOCK_BYTES..];
    let _ = layout::BandHead::decode(first);
    if layout::decode_tail(&img).is_ok() {
        r |= 2;
    }
    let _ = layout::decode_tail(last);
    let _ = layout::decode_oob(body);
    if let Ok(Some(s)) = nvcache::NvSuper::decode(first) {
        assert!(s.ring_units > 0 && s.durable_seq > 0);
        r |= 4;
    }
    let _ = nvcache::RecordHeader::decode(last, &[0; 16]);
    r
}

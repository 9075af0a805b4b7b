//! `rbd`: a Ceph RBD image through librbd's C API (SPEC §9: storage beyond one host comes from an
//! existing distributed engine, never a home-made replication layer).
//!
//! ```text
//!  channel (poller thread) ──rbd_aio_readv/writev/flush/discard/write_zeroes──► librbd ──► cluster
//!        ▲                                                                         │ librbd thread
//!        └── poll ◄── done list (Mutex) + eventfd ◄── completion callback ◄────────┘
//! ```
//!
//! # Design
//! * librbd and librados are loaded at run time (`dlopen` of `librbd.so.1` / `librados.so.2`, the
//!   Debian packages `librbd1`/`librados2`) through a thin hand-written FFI table: the daemon builds
//!   and runs without Ceph installed, and an `rbd` bdev on such a host fails with a clear error.
//!   Every call into the C library is an `unsafe` block with its `// SAFETY:` reasoning.
//! * One cluster connection and one open image per bdev, shared by all its channels (librbd is
//!   thread-safe); each channel keeps many requests in flight and completes them out of order.
//! * Zero copy: reads and writes hand the guest's iovecs to `rbd_aio_readv`/`rbd_aio_writev`. The
//!   request context (boxed, passed as the callback argument) owns the `IoVecs`, which keep the guest
//!   memory mapped until librbd calls back, and an `Arc` of the channel's completion list, so a callback
//!   arriving after the channel is gone is harmless.
//! * Callbacks run on librbd's threads: they only push `(tag, result)` to the channel's list and
//!   signal its eventfd (the poller's `wait_fd`); all other work stays on the poller thread.
//! * Time-outs: `timeout` (seconds, default 30) bounds the connect (`client_mount_timeout`) and every
//!   operation (`rados_osd_op_timeout`, `rados_mon_op_timeout`): an unreachable cluster becomes an I/O
//!   error for the guest, never a hung daemon.
//! * Block size 512; the optimal I/O boundary is the object size (reported to the guest as
//!   `opt_io_size`, not split). Unmap and write_zeroes are native; flush is `rbd_aio_flush`.
//!
//! # Limitations
//! No snapshots, clones or resize; `create=SIZE` only makes a missing image (never resizes one).

use std::ffi::{c_char, c_int, c_void, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use super::{
    Bdev, BdevError, BdevInfo, BdevIo, Completion, IoError, IoKind, IoKinds, IoVecs, ModuleChannel, Rejected,
};

type RadosT = *mut c_void;
type IoctxT = *mut c_void;
type ImageT = *mut c_void;
type CompletionT = *mut c_void;
type Callback = unsafe extern "C" fn(CompletionT, *mut c_void);

/// `rbd_image_info_t` (librbd.h).
#[repr(C)]
struct ImageInfo {
    size: u64,
    obj_size: u64,
    num_objs: u64,
    order: c_int,
    block_name_prefix: [c_char; 24],
    parent_pool: i64,
    parent_name: [c_char; 96],
}

/// The C functions used, resolved once per process.
struct Lib {
    rados_create2: unsafe extern "C" fn(*mut RadosT, *const c_char, *const c_char, u64) -> c_int,
    rados_conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    rados_conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    rados_connect: unsafe extern "C" fn(RadosT) -> c_int,
    rados_shutdown: unsafe extern "C" fn(RadosT),
    rados_ioctx_create: unsafe extern "C" fn(RadosT, *const c_char, *mut IoctxT) -> c_int,
    rados_ioctx_destroy: unsafe extern "C" fn(IoctxT),
    rbd_create: unsafe extern "C" fn(IoctxT, *const c_char, u64, *mut c_int) -> c_int,
    rbd_open: unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    rbd_close: unsafe extern "C" fn(ImageT) -> c_int,
    rbd_stat: unsafe extern "C" fn(ImageT, *mut ImageInfo, usize) -> c_int,
    rbd_flush: unsafe extern "C" fn(ImageT) -> c_int,
    rbd_aio_create_completion: unsafe extern "C" fn(*mut c_void, Callback, *mut CompletionT) -> c_int,
    rbd_aio_release: unsafe extern "C" fn(CompletionT),
    rbd_aio_get_return_value: unsafe extern "C" fn(CompletionT) -> isize,
    rbd_aio_readv: unsafe extern "C" fn(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int,
    rbd_aio_writev: unsafe extern "C" fn(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int,
    rbd_aio_flush: unsafe extern "C" fn(ImageT, CompletionT) -> c_int,
    rbd_aio_discard: unsafe extern "C" fn(ImageT, u64, u64, CompletionT) -> c_int,
    rbd_aio_write_zeroes: unsafe extern "C" fn(ImageT, u64, usize, CompletionT, c_int, c_int) -> c_int,
    _rbd: libloading::Library,
    _rados: libloading::Library,
}

/// Loads librbd/librados once; the error says which package to install.
fn lib() -> Result<&'static Lib, BdevError> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(|e| BdevError::Module(e.clone()))
}

fn load() -> Result<Lib, String> {
    // SAFETY: loading the system's librados/librbd runs their initialisers, which only set up
    // library-internal state (no process-wide side effects beyond registering their own code).
    let rados = unsafe { libloading::Library::new("librados.so.2") }
        .map_err(|e| format!("cannot load librados.so.2 ({e}): install the librados2 package"))?;
    // SAFETY: as above.
    let rbd = unsafe { libloading::Library::new("librbd.so.1") }
        .map_err(|e| format!("cannot load librbd.so.1 ({e}): install the librbd1 package"))?;
    macro_rules! sym {
        ($lib:expr, $name:ident) => {{
            // SAFETY: the symbol is looked up by its C name and given the signature declared in
            // librbd.h / librados.h (Ceph 16+), which the field's type spells out.
            let s = unsafe { $lib.get(concat!(stringify!($name), "\0").as_bytes()) }
                .map_err(|e| format!("{} lacks {}: {e}", stringify!($lib), stringify!($name)))?;
            *s
        }};
    }
    Ok(Lib {
        rados_create2: sym!(rados, rados_create2),
        rados_conf_read_file: sym!(rados, rados_conf_read_file),
        rados_conf_set: sym!(rados, rados_conf_set),
        rados_connect: sym!(rados, rados_connect),
        rados_shutdown: sym!(rados, rados_shutdown),
        rados_ioctx_create: sym!(rados, rados_ioctx_create),
        rados_ioctx_destroy: sym!(rados, rados_ioctx_destroy),
        rbd_create: sym!(rbd, rbd_create),
        rbd_open: sym!(rbd, rbd_open),
        rbd_close: sym!(rbd, rbd_close),
        rbd_stat: sym!(rbd, rbd_stat),
        rbd_flush: sym!(rbd, rbd_flush),
        rbd_aio_create_completion: sym!(rbd, rbd_aio_create_completion),
        rbd_aio_release: sym!(rbd, rbd_aio_release),
        rbd_aio_get_return_value: sym!(rbd, rbd_aio_get_return_value),
        rbd_aio_readv: sym!(rbd, rbd_aio_readv),
        rbd_aio_writev: sym!(rbd, rbd_aio_writev),
        rbd_aio_flush: sym!(rbd, rbd_aio_flush),
        rbd_aio_discard: sym!(rbd, rbd_aio_discard),
        rbd_aio_write_zeroes: sym!(rbd, rbd_aio_write_zeroes),
        _rbd: rbd,
        _rados: rados,
    })
}

/// Options of an rbd bdev (`--bdev driver=rbd,...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdConfig {
    /// Pool name.
    pub pool: String,
    /// Image name.
    pub image: String,
    /// ceph.conf (None: librados's default search).
    pub conf: Option<PathBuf>,
    /// Ceph user without the `client.` prefix.
    pub user: String,
    /// Keyring file.
    pub keyring: Option<PathBuf>,
    /// Create the image with this size when it does not exist.
    pub create_bytes: Option<u64>,
    /// Connect and operation time-out in seconds.
    pub timeout_secs: u32,
}

/// The open cluster handle, pool context and image; closed in reverse order on drop.
struct Image {
    lib: &'static Lib,
    cluster: RadosT,
    ioctx: IoctxT,
    image: ImageT,
}

// SAFETY: librados/librbd handles are thread-safe (documented for rados_t, rados_ioctx_t and
// rbd_image_t aio calls); we never free them while a channel can use them (the Arc keeps them).
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: each handle was created by the matching open call and is closed exactly once, image
        // first; rbd_close waits for librbd's own in-flight operations.
        unsafe {
            if !self.image.is_null() {
                (self.lib.rbd_close)(self.image);
            }
            if !self.ioctx.is_null() {
                (self.lib.rados_ioctx_destroy)(self.ioctx);
            }
            if !self.cluster.is_null() {
                (self.lib.rados_shutdown)(self.cluster);
            }
        }
    }
}

fn errno_text(rc: c_int) -> String {
    std::io::Error::from_raw_os_error(rc.saturating_abs()).to_string()
}

fn cstr(what: &str, s: &str) -> Result<CString, BdevError> {
    CString::new(s).map_err(|_| BdevError::InvalidConfig(format!("{what} '{s}' contains a NUL byte")))
}

impl Image {
    fn open(cfg: &RbdConfig) -> Result<(Self, Option<u64>), BdevError> {
        let lib = lib()?;
        let user = cstr("user", &format!("client.{}", cfg.user))?;
        let cluster_name = cstr("cluster", "ceph")?;
        let mut img = Image {
            lib,
            cluster: std::ptr::null_mut(),
            ioctx: std::ptr::null_mut(),
            image: std::ptr::null_mut(),
        };
        // SAFETY: out-pointer to a live local field; names are NUL-terminated CStrings alive for the call.
        let rc = unsafe { (lib.rados_create2)(&mut img.cluster, cluster_name.as_ptr(), user.as_ptr(), 0) };
        if rc < 0 {
            return Err(BdevError::Module(format!("user={}: rados_create2: {}", cfg.user, errno_text(rc))));
        }
        let conf = match &cfg.conf {
            Some(p) => Some(cstr("conf", &p.display().to_string())?),
            None => None,
        };
        let conf_ptr = conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: a live cluster handle; a NUL-terminated path or NULL (librados's default search).
        let rc = unsafe { (lib.rados_conf_read_file)(img.cluster, conf_ptr) };
        if rc < 0 {
            let shown =
                cfg.conf.as_deref().map_or("the default ceph.conf".to_string(), |p| p.display().to_string());
            return Err(BdevError::Module(format!("conf: cannot read {shown}: {}", errno_text(rc))));
        }
        let t = cfg.timeout_secs.to_string();
        let mut settings = vec![
            ("client_mount_timeout", t.clone()),
            ("rados_osd_op_timeout", t.clone()),
            ("rados_mon_op_timeout", t),
            // Discards of part of an object zero that part, so unmapped blocks read back as zeros.
            ("rbd_skip_partial_discard", "false".to_string()),
        ];
        if let Some(k) = &cfg.keyring {
            settings.push(("keyring", k.display().to_string()));
        }
        for (k, v) in settings {
            let (kc, vc) = (cstr("option", k)?, cstr(k, &v)?);
            // SAFETY: a live cluster handle and two NUL-terminated strings alive for the call.
            let rc = unsafe { (lib.rados_conf_set)(img.cluster, kc.as_ptr(), vc.as_ptr()) };
            if rc < 0 {
                return Err(BdevError::Module(format!("setting {k}={v}: {}", errno_text(rc))));
            }
        }
        // SAFETY: a configured cluster handle; the call blocks at most client_mount_timeout.
        let rc = unsafe { (lib.rados_connect)(img.cluster) };
        if rc < 0 {
            let why = match -rc {
                libc::ETIMEDOUT => format!("timed out after {} s (is the cluster up?)", cfg.timeout_secs),
                libc::EACCES | libc::EPERM => format!("permission denied for client.{}", cfg.user),
                _ => errno_text(rc),
            };
            return Err(BdevError::Module(format!("cannot connect to the Ceph cluster: {why}")));
        }
        let pool = cstr("pool", &cfg.pool)?;
        // SAFETY: a connected cluster handle, a NUL-terminated pool name, an out-pointer to a live field.
        let rc = unsafe { (lib.rados_ioctx_create)(img.cluster, pool.as_ptr(), &mut img.ioctx) };
        if rc < 0 {
            let why = if -rc == libc::ENOENT { "does not exist".to_string() } else { errno_text(rc) };
            return Err(BdevError::InvalidConfig(format!("pool={}: pool '{}' {why}", cfg.pool, cfg.pool)));
        }
        let name = cstr("image", &cfg.image)?;
        let mut created = None;
        // SAFETY: a live ioctx, NUL-terminated name, out-pointer to a live field, NULL snapshot (head).
        let mut rc = unsafe { (lib.rbd_open)(img.ioctx, name.as_ptr(), &mut img.image, std::ptr::null()) };
        if -rc == libc::ENOENT {
            if let Some(size) = cfg.create_bytes {
                let mut order: c_int = 0;
                // SAFETY: a live ioctx, NUL-terminated name, out-pointer to a live local (0 = default order).
                let crc = unsafe { (lib.rbd_create)(img.ioctx, name.as_ptr(), size, &mut order) };
                if crc < 0 {
                    return Err(BdevError::Module(format!(
                        "create: cannot create image {}/{}: {}",
                        cfg.pool,
                        cfg.image,
                        errno_text(crc)
                    )));
                }
                created = Some(size);
                // SAFETY: as for the first rbd_open.
                rc = unsafe { (lib.rbd_open)(img.ioctx, name.as_ptr(), &mut img.image, std::ptr::null()) };
            } else {
                return Err(BdevError::InvalidConfig(format!(
                    "image={}: image '{}/{}' does not exist (create=SIZE makes it)",
                    cfg.image, cfg.pool, cfg.image
                )));
            }
        }
        if rc < 0 {
            img.image = std::ptr::null_mut();
            let why = match -rc {
                libc::EACCES | libc::EPERM => format!("permission denied for client.{}", cfg.user),
                _ => errno_text(rc),
            };
            return Err(BdevError::Module(format!(
                "image={}: cannot open {}/{}: {why}",
                cfg.image, cfg.pool, cfg.image
            )));
        }
        Ok((img, created))
    }

    fn stat(&self) -> Result<ImageInfo, BdevError> {
        let mut info = ImageInfo {
            size: 0,
            obj_size: 0,
            num_objs: 0,
            order: 0,
            block_name_prefix: [0; 24],
            parent_pool: 0,
            parent_name: [0; 96],
        };
        // SAFETY: a live image handle and an out-struct of exactly the size passed.
        let rc = unsafe { (self.lib.rbd_stat)(self.image, &mut info, std::mem::size_of::<ImageInfo>()) };
        if rc < 0 {
            return Err(BdevError::Module(format!("rbd_stat: {}", errno_text(rc))));
        }
        Ok(info)
    }
}

/// An RBD image as a bdev.
pub struct RbdBdev {
    info: BdevInfo,
    image: Arc<Image>,
}

impl RbdBdev {
    /// Connects, opens (or creates, with `create_bytes`) the image and describes it.
    pub fn open(name: &str, cfg: &RbdConfig) -> Result<Self, BdevError> {
        let (image, created) = Image::open(cfg)?;
        let st = image.stat()?;
        if let Some(size) = created {
            log::info!("rbd bdev '{name}': created image {}/{} of {size} bytes", cfg.pool, cfg.image);
        } else if cfg.create_bytes.is_some_and(|s| s != st.size) {
            log::info!(
                "rbd bdev '{name}': image {}/{} exists with {} bytes; create= never resizes it",
                cfg.pool,
                cfg.image,
                st.size
            );
        }
        if st.size < 512 {
            return Err(BdevError::InvalidConfig(format!(
                "image={}: image has {} bytes",
                cfg.image, st.size
            )));
        }
        let mut info = BdevInfo::new(name, "rbd", 512, st.size / 512);
        info.optimal_io_boundary_blocks = u32::try_from(st.obj_size / 512).unwrap_or(0);
        info.split_on_optimal_io_boundary = false;
        info.volatile_write_cache = true;
        info.unmap_reads_zeroes = true;
        info.supports = IoKinds { flush: true, unmap: true, write_zeroes: true, reset: false };
        Ok(Self { info, image: Arc::new(image) })
    }
}

impl Bdev for RbdBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn create_channel(&self) -> Result<Box<dyn ModuleChannel>, BdevError> {
        // SAFETY: plain syscall; the returned fd is owned by the OwnedFd below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(BdevError::io("eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Box::new(RbdChannel {
            image: self.image.clone(),
            shared: Arc::new(Shared { done: Mutex::new(Vec::new()), efd }),
            bs: u64::from(self.info.block_size),
        }))
    }

    fn shutdown(&self) -> Result<(), BdevError> {
        // SAFETY: a live image handle (channels are gone, nothing else in flight from us).
        let rc = unsafe { (self.image.lib.rbd_flush)(self.image.image) };
        if rc < 0 {
            return Err(BdevError::Module(format!("rbd_flush: {}", errno_text(rc))));
        }
        Ok(())
    }
}

/// What a channel and its in-flight callbacks share.
struct Shared {
    done: Mutex<Vec<Completion>>,
    efd: OwnedFd,
}

/// The callback argument of one request: owns the guest buffers until librbd is done with them.
struct Ctx {
    tag: u64,
    shared: Arc<Shared>,
    /// Keeps the guest memory mapped while librbd uses it.
    bufs: IoVecs,
    lib: &'static Lib,
}

/// librbd's completion callback (on a librbd thread).
unsafe extern "C" fn complete(c: CompletionT, arg: *mut c_void) {
    // SAFETY: `arg` is the Box<Ctx> leaked in `submit` for exactly this completion; librbd calls back
    // once, so the box is reclaimed exactly once.
    let ctx = unsafe { Box::from_raw(arg.cast::<Ctx>()) };
    // SAFETY: `c` is the live completion this callback is for; it is released right after.
    let rv = unsafe { (ctx.lib.rbd_aio_get_return_value)(c) };
    // SAFETY: librbd allows releasing the completion from its own callback; it is not used again.
    unsafe { (ctx.lib.rbd_aio_release)(c) };
    let result = if rv < 0 { Err(IoError::Errno(i32::try_from(-rv).unwrap_or(libc::EIO))) } else { Ok(()) };
    ctx.shared.done.lock().unwrap_or_else(|e| e.into_inner()).push(Completion { tag: ctx.tag, result });
    let v: u64 = 1;
    // SAFETY: writes 8 bytes from a live local to the channel's eventfd (kept open by `ctx.shared`).
    unsafe { libc::write(ctx.shared.efd.as_raw_fd(), (&v as *const u64).cast(), 8) };
    // `ctx` (and with it the guest buffers' keep-alive) is dropped here, after librbd is done.
}

struct RbdChannel {
    image: Arc<Image>,
    shared: Arc<Shared>,
    bs: u64,
}

impl ModuleChannel for RbdChannel {
    fn submit(&mut self, io: BdevIo) -> Result<(), Rejected> {
        let lib = self.image.lib;
        let off = io.offset_blocks * self.bs;
        let len = io.num_blocks * self.bs;
        let Ok(iovcnt) = c_int::try_from(io.bufs.segments()) else {
            return Err(Rejected::Failed(io, IoError::InvalidRange));
        };
        let Ok(len_usize) = usize::try_from(len) else {
            return Err(Rejected::Failed(io, IoError::InvalidRange));
        };
        let (kind, offset_blocks, num_blocks, tag) = (io.kind, io.offset_blocks, io.num_blocks, io.tag);
        let back = |ctx: Box<Ctx>| BdevIo { kind, offset_blocks, num_blocks, bufs: ctx.bufs, tag };
        let ctx = Box::new(Ctx { tag, shared: self.shared.clone(), bufs: io.bufs, lib });
        // librbd may use the iovec array itself until completion, not only the memory it describes:
        // both live in `ctx.bufs` (a heap Vec of iovecs that does not move with the box).
        let iov_ptr = ctx.bufs.as_iovecs().as_ptr();
        let arg = Box::into_raw(ctx).cast::<c_void>();
        let mut c: CompletionT = std::ptr::null_mut();
        // SAFETY: `arg` stays valid until the callback reclaims it; `complete` has the rbd_callback_t ABI.
        let rc = unsafe { (lib.rbd_aio_create_completion)(arg, complete, &mut c) };
        if rc < 0 {
            // SAFETY: the completion was not created, so no callback will reclaim `arg`: take it back.
            let ctx = unsafe { Box::from_raw(arg.cast::<Ctx>()) };
            return Err(Rejected::NoMem(back(ctx)));
        }
        let img = self.image.image;
        // SAFETY: a live image and completion; for reads and writes the iovec array and the guest
        // memory it describes are owned by the IoVecs in `ctx`, which lives until the callback runs
        // (zero copy: librbd reads or writes the memory in place).
        let rc = unsafe {
            match kind {
                IoKind::Read => (lib.rbd_aio_readv)(img, iov_ptr, iovcnt, off, c),
                IoKind::Write => (lib.rbd_aio_writev)(img, iov_ptr, iovcnt, off, c),
                IoKind::Flush => (lib.rbd_aio_flush)(img, c),
                IoKind::Unmap => (lib.rbd_aio_discard)(img, off, len, c),
                IoKind::WriteZeroes => (lib.rbd_aio_write_zeroes)(img, off, len_usize, c, 0, 0),
                IoKind::Reset => -libc::ENOTSUP,
            }
        };
        if rc < 0 {
            // SAFETY: the request was refused, so librbd will not call back: release the completion
            // and reclaim the context (which drops the buffers' keep-alive).
            let ctx = unsafe {
                (lib.rbd_aio_release)(c);
                Box::from_raw(arg.cast::<Ctx>())
            };
            return Err(Rejected::Failed(back(ctx), IoError::Errno(-rc)));
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<Completion>) -> usize {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live local from our non-blocking eventfd (EAGAIN ignored).
        unsafe { libc::read(self.shared.efd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        let mut list = self.shared.done.lock().unwrap_or_else(|e| e.into_inner());
        let n = list.len();
        done.append(&mut list);
        n
    }

    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.shared.efd.as_raw_fd())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Brings up (or reuses) the machine's one-node test cluster; returns its ceph.conf.
    pub(crate) fn test_cluster() -> PathBuf {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ceph-cluster.sh");
        let out =
            std::process::Command::new("bash").args([script, "start"]).output().expect("run ceph-cluster.sh");
        assert!(
            out.status.success(),
            "ceph-cluster.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn cfg(conf: &std::path::Path, image: &str, create: Option<u64>) -> RbdConfig {
        RbdConfig {
            pool: "rbd".into(),
            image: image.into(),
            conf: Some(conf.to_path_buf()),
            user: "admin".into(),
            keyring: None,
            create_bytes: create,
            timeout_secs: 10,
        }
    }

    #[test]
    fn conformance_rbd() {
        let conf = test_cluster();
        let image = format!("conf-{}", std::process::id());
        let bdev = RbdBdev::open("r0", &cfg(&conf, &image, Some(16 << 20))).expect("open rbd");
        assert_eq!(bdev.info().num_blocks, (16 << 20) / 512);
        assert_eq!(bdev.info().optimal_io_boundary_blocks, (4 << 20) / 512, "object size boundary");
        crate::bdev::tests::conformance(Arc::new(bdev));
        // The image persists: reopening it (create= never resizes) sees the data of the suite.
        let again = RbdBdev::open("r1", &cfg(&conf, &image, Some(32 << 20))).expect("reopen");
        assert_eq!(again.info().num_blocks, (16 << 20) / 512, "create= must not resize an existing image");
    }

    #[test]
    fn open_errors_name_the_option() {
        let conf = test_cluster();
        let e =
            RbdBdev::open("r", &cfg(&conf, "no-such-image", None)).err().expect("missing image").to_string();
        assert!(e.contains("image=no-such-image") && e.contains("does not exist"), "{e}");
        let mut c = cfg(&conf, "x", None);
        c.pool = "nopool".into();
        let e = RbdBdev::open("r", &c).err().expect("missing pool").to_string();
        assert!(e.contains("pool=nopool") && e.contains("does not exist"), "{e}");
        let e = RbdBdev::open("r", &cfg(std::path::Path::new("/nonexistent/ceph.conf"), "x", None))
            .err()
            .expect("bad conf")
            .to_string();
        assert!(e.contains("conf:"), "{e}");
    }

    #[test]
    fn unreachable_cluster_fails_within_the_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("ceph.conf");
        // A monitor address where nothing listens.
        std::fs::write(&conf, "[global]\nmon host = 127.0.0.1:1\nauth client required = none\n")
            .expect("conf");
        let mut c = cfg(&conf, "x", None);
        c.timeout_secs = 2;
        let t = std::time::Instant::now();
        let e = RbdBdev::open("r", &c).err().expect("unreachable").to_string();
        assert!(t.elapsed() < std::time::Duration::from_secs(20), "took {:?}", t.elapsed());
        assert!(e.contains("cannot connect to the Ceph cluster"), "{e}");
    }
}

//! The CUDA runtime behind [`super::kernel::KernelDevice`] on a GPU: one context, a main stream
//! and a side stream (used only between a fork and a join, `KernelDevice::on_side`),
//! the embedded fatbins loaded lazily on the first launch, stream-ordered allocation from the
//! device's memory pool (kept cached: the release threshold is raised so freed blocks are reused
//! rather than returned to the driver), copies, launches and event timing.
//!
//! Works at cudarc's `result`/`sys` level: the safe API's per-slice event tracking and its PTX-only
//! module loading (which needs NVRTC) are not wanted here (design/CUDA.md §2).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext, CudaStream};

use super::kernel::{KernelError, KernelResult, LaunchCfg};
use super::tma::{TileMap4, TmaMap};

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Cuda(format!("{what}: {e:?}"))
}

/// A function handle; CUfunction is a raw pointer owned by its (never unloaded) module.
#[derive(Clone, Copy)]
struct Function {
    handle: sys::CUfunction,
    /// Dynamic shared memory the function is currently allowed.
    max_dynamic_shared: u32,
}

// SAFETY: CUDA function handles may be used from any thread once the context is current.
unsafe impl Send for Function {}

/// Modules loaded so far (by family name) and functions looked up so far (by kernel name).
struct Modules {
    loaded: HashMap<&'static str, ModuleHandle>,
    functions: HashMap<String, Function>,
}

struct ModuleHandle(sys::CUmodule);
// SAFETY: module handles are plain driver handles, valid from any thread of the context.
unsafe impl Send for ModuleHandle {}

/// `ADVDMD_CUDA_SYNC=1`: synchronize after every launch so an asynchronous error names its
/// kernel (debugging only). Read once: launches are on the hot path.
fn sync_after_launch() -> bool {
    static SYNC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SYNC.get_or_init(|| crate::device::kernel::env_flag("ADVDMD_CUDA_SYNC").unwrap_or(false))
}

/// The two events of a fork (main → side) and a join (side → main).
struct LaneEvents([sys::CUevent; 2]);
// SAFETY: events are driver handles, valid from any thread of the context.
unsafe impl Send for LaneEvents {}
unsafe impl Sync for LaneEvents {}

pub struct CudaRuntime {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    side: Arc<CudaStream>,
    /// Whether new work (allocations and frees included) goes to the side stream.
    on_side: std::sync::atomic::AtomicBool,
    /// Kernels launch as programmatic dependents (`KernelDevice::set_pdl`).
    pdl: std::sync::atomic::AtomicBool,
    lane_events: LaneEvents,
    name: String,
    modules: Mutex<Modules>,
    cublaslt: std::sync::OnceLock<super::cublaslt::Cublaslt>,
    /// Set while `capture` records (its launches are not profiled).
    capturing: std::sync::atomic::AtomicBool,
    /// Bytes allocated outside a capture since the last graph launch, and whether a launched
    /// graph may hold physical memory now: see `hand_over_to_direct_work`.
    direct_bytes: std::sync::atomic::AtomicUsize,
    graph_memory_mapped: std::sync::atomic::AtomicBool,
    /// The events of the op profile in progress (`KernelDevice::profile`).
    profile: Mutex<ProfileEvents>,
    /// Uploads through pinned staging and downloads into pinned memory
    /// (`KernelDevice::set_async_copies`, `download_later`).
    async_copies: std::sync::atomic::AtomicBool,
    staging: Mutex<Staging>,
}

/// Pinned host memory for copies that must not wait for the stream: the upload ring (allocated
/// on first use) with one event a live region (oldest first), and free blocks for downloads
/// queued for later, by size.
struct Staging {
    ring: super::staging::StagingRing,
    base: *mut u8,
    events: std::collections::VecDeque<sys::CUevent>,
    spare: Vec<sys::CUevent>,
    free_blocks: Vec<(usize, *mut u8)>,
}

// SAFETY: pinned host pointers and events are valid from any thread of the context; the mutex
// around `Staging` serialises their use.
unsafe impl Send for Staging {}

impl Staging {
    /// Nothing allocated yet: a ring of `cap` bytes to come, no events, no blocks.
    fn empty(cap: usize) -> Staging {
        Staging {
            ring: super::staging::StagingRing::new(cap),
            base: std::ptr::null_mut(),
            events: Default::default(),
            spare: Vec::new(),
            free_blocks: Vec::new(),
        }
    }
}

/// Bytes of the upload ring: ~4 iterations of the SD3.5-medium AdvDMD step's inputs at 512 px.
/// A larger upload takes the pageable path.
const STAGING_BYTES: usize = 64 << 20;

/// A copy from the device into pinned host memory queued on the main stream
/// (`KernelDevice::download_later`): its bytes are read once its event has passed. Dropped
/// unread, it still waits for the copy before giving the memory back.
pub struct PendingCopy {
    rt: Arc<CudaRuntime>,
    block: (usize, *mut u8),
    bytes: usize,
    event: sys::CUevent,
}

// SAFETY: as `Staging`: the block and the event are only touched through `rt`'s methods.
unsafe impl Send for PendingCopy {}

impl PendingCopy {
    /// Waits for the copy and returns its bytes.
    pub fn wait(self, dst: &mut [u8]) -> KernelResult<()> {
        if dst.len() != self.bytes {
            return Err(KernelError::Invalid(format!(
                "download_later: {} bytes read into {}",
                self.bytes,
                dst.len()
            )));
        }
        self.rt.bind()?;
        self.rt.release_gate();
        // SAFETY: the event was recorded after the copy on the main stream.
        unsafe { result::event::synchronize(self.event) }
            .map_err(|e| cuda_err("download_later", e))?;
        // SAFETY: the copy into the block's first `bytes` bytes has completed.
        unsafe { std::ptr::copy_nonoverlapping(self.block.1, dst.as_mut_ptr(), self.bytes) };
        Ok(())
    }
}

impl Drop for PendingCopy {
    fn drop(&mut self) {
        let _ = self.rt.bind();
        self.rt.release_gate();
        // SAFETY: as in `wait`; the block goes back only once nothing writes to it.
        let _ = unsafe { result::event::synchronize(self.event) };
        let mut st = self.rt.staging();
        st.free_blocks.push(self.block);
        st.spare.push(self.event);
    }
}

/// A profile's timing events: one per stream at its start, then one after each op, and the
/// created events kept for the next profile (creating one costs a driver call).
#[derive(Default)]
struct ProfileEvents {
    start: Vec<sys::CUevent>,
    marks: Vec<sys::CUevent>,
    spare: Vec<sys::CUevent>,
    gate: ProfileGate,
}

/// The profiler's gate (cuda/profile.cu): a `profile_gate` kernel queued on the main stream
/// ahead of the next ops holds the GPU until the host has queued them and writes the gate's
/// epoch into `flag` (pinned host memory the kernel polls), so the ops run back to back and the
/// gaps between their events are their own durations, whatever the host's launch rate. A call
/// that waits for the GPU (a synchronisation, a copy) releases the gate first.
struct ProfileGate {
    /// Null until the first profile allocates it.
    flag: *mut u32,
    /// The epoch of the last gate queued and of the last released.
    queued: u32,
    released: u32,
    /// Ops queued behind the held gate.
    ops: usize,
}

impl Default for ProfileGate {
    fn default() -> Self {
        ProfileGate {
            flag: std::ptr::null_mut(),
            queued: 0,
            released: 0,
            ops: 0,
        }
    }
}

/// Ops a gate holds back: few enough that they and their events, allocations and frees stay well
/// inside the driver's queue of pending work (a full queue would block the host behind a closed
/// gate), many enough that a gate's own launch is a small share of the ops.
const GATE_OPS: usize = 48;
/// How long a gate holds the stream at most, in nanoseconds.
const GATE_TIMEOUT_NS: u64 = 100_000_000;
// SAFETY: events are driver handles, valid from any thread of the context.
unsafe impl Send for ProfileEvents {}

impl CudaRuntime {
    pub fn new(ordinal: usize) -> KernelResult<Arc<CudaRuntime>> {
        // SAFETY: only dlopens the driver library (CUDA.md §2: CudaContext::new panics without).
        if !unsafe { sys::is_culib_present() } {
            return Err(KernelError::Cuda("no CUDA driver found".into()));
        }
        if crate::info::EMBEDDED_KERNELS.is_empty() {
            return Err(KernelError::Cuda(
                "this build embeds no kernels (nvcc was absent when it was built)".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("context", e))?;
        // Raw device pointers are used throughout; the safe API's event tracking is not needed.
        // SAFETY: called before any allocation through the safe API.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| cuda_err("stream", e))?;
        let side = ctx.new_stream().map_err(|e| cuda_err("side stream", e))?;
        let no_timing = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let lane_events = LaneEvents([
            result::event::create(no_timing).map_err(|e| cuda_err("event", e))?,
            result::event::create(no_timing).map_err(|e| cuda_err("event", e))?,
        ]);
        let name = ctx.name().unwrap_or_else(|_| format!("cuda:{ordinal}"));
        // Keep freed pool memory for reuse: the default threshold (0) returns it at every sync.
        // SAFETY: the device handle is valid; the attribute takes a u64.
        unsafe {
            let pool = result::device::get_default_mem_pool(ctx.cu_device())
                .map_err(|e| cuda_err("memory pool", e))?;
            let mut threshold = u64::MAX;
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut c_void,
            )
            .result()
            .map_err(|e| cuda_err("memory pool threshold", e))?;
        }
        Ok(Arc::new(CudaRuntime {
            ctx,
            stream,
            side,
            on_side: std::sync::atomic::AtomicBool::new(false),
            pdl: std::sync::atomic::AtomicBool::new(false),
            lane_events,
            name,
            modules: Mutex::new(Modules {
                loaded: HashMap::new(),
                functions: HashMap::new(),
            }),
            cublaslt: std::sync::OnceLock::new(),
            capturing: std::sync::atomic::AtomicBool::new(false),
            direct_bytes: std::sync::atomic::AtomicUsize::new(0),
            graph_memory_mapped: std::sync::atomic::AtomicBool::new(false),
            profile: Mutex::new(ProfileEvents::default()),
            async_copies: std::sync::atomic::AtomicBool::new(false),
            staging: Mutex::new(Staging::empty(STAGING_BYTES)),
        }))
    }

    fn staging(&self) -> std::sync::MutexGuard<'_, Staging> {
        self.staging.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Uploads through the pinned ring from now on (`true`), or straight from the caller's
    /// pageable memory (the default; the driver may then wait for the stream).
    pub fn set_async_copies(&self, on: bool) {
        self.async_copies
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn async_copies(&self) -> bool {
        self.async_copies.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// An event from the spare ones (or a new one) recorded on the main stream.
    fn record_on_main(&self, st: &mut Staging) -> KernelResult<sys::CUevent> {
        let e = match st.spare.pop() {
            Some(e) => e,
            None => result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(|e| cuda_err("event", e))?,
        };
        // SAFETY: the event and the stream belong to this context.
        unsafe { result::event::record(e, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("record", e))?;
        Ok(e)
    }

    /// [`Self::htod`] through the pinned ring: the bytes are copied there now, the copy to the
    /// device is queued on the main stream reading them, and their region is reused only after
    /// an event recorded behind that copy has passed.
    fn htod_staged(&self, src: &[u8], dst: u64) -> KernelResult<()> {
        if self.capturing.load(std::sync::atomic::Ordering::Relaxed) {
            // a captured copy would replay whatever the ring holds by then
            return Err(KernelError::Invalid(
                "an upload inside a capture (stage inputs before it)".into(),
            ));
        }
        let mut st = self.staging();
        if st.base.is_null() {
            // SAFETY: plain pinned host memory, freed in Drop.
            st.base = unsafe { result::malloc_host(STAGING_BYTES, 0) }
                .map_err(|e| cuda_err("pinned staging", e))? as *mut u8;
        }
        let (off, waits) = st
            .ring
            .place(src.len())
            .ok_or_else(|| KernelError::Invalid("staged upload larger than the ring".into()))?;
        for _ in 0..waits {
            let e = st.events.pop_front().expect("one event a live region");
            // SAFETY: an event recorded behind an earlier staged copy.
            unsafe { result::event::synchronize(e) }.map_err(|e| cuda_err("staging", e))?;
            st.spare.push(e);
        }
        // SAFETY: `[off, off + len)` lies in the ring and no queued copy reads it any more.
        let staged = unsafe {
            let p = st.base.add(off);
            std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len());
            std::slice::from_raw_parts(p as *const u8, src.len())
        };
        // SAFETY: `dst` holds `src.len()` bytes; the staged bytes stay untouched until the event
        // recorded next has passed.
        unsafe { result::memcpy_htod_async(dst, staged, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("upload", e))?;
        let e = self.record_on_main(&mut st)?;
        st.events.push_back(e);
        Ok(())
    }

    /// Queues a copy of `bytes` bytes at `src` into pinned host memory on the main stream.
    pub fn dtoh_later(self: &Arc<Self>, src: u64, bytes: usize) -> KernelResult<PendingCopy> {
        if self.side_now() {
            return Err(KernelError::Invalid(
                "streams: a download inside on_side (download after the join)".into(),
            ));
        }
        if self.capturing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(KernelError::Invalid("a download inside a capture".into()));
        }
        self.bind()?;
        let size = bytes.max(1).next_power_of_two().max(256);
        let mut st = self.staging();
        let block = match st.free_blocks.iter().position(|b| b.0 == size) {
            Some(i) => st.free_blocks.swap_remove(i),
            None => {
                // (pinning host memory is a driver call that may wait: not behind a held gate)
                self.release_gate();
                // SAFETY: plain pinned host memory, freed in Drop (or reused).
                let p = unsafe { result::malloc_host(size, 0) }
                    .map_err(|e| cuda_err("pinned block", e))?;
                (size, p as *mut u8)
            }
        };
        if bytes > 0 {
            // SAFETY: the block holds ≥ `bytes` bytes and nothing else uses it until the copy's
            // event has passed; `src` holds `bytes` bytes.
            let dst = unsafe { std::slice::from_raw_parts_mut(block.1, bytes) };
            if let Err(e) = unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            {
                st.free_blocks.push(block);
                return Err(cuda_err("download_later", e));
            }
        }
        let event = self.record_on_main(&mut st)?;
        Ok(PendingCopy {
            rt: self.clone(),
            block,
            bytes,
            event,
        })
    }

    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// The GPU's streaming multiprocessors (132 on an H100 SXM or H200; 1 if the query fails).
    pub fn sm_count(&self) -> usize {
        self.ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_or(1, |n| n.max(1) as usize)
    }

    /// The GPU's compute capability, `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.ctx.compute_capability().unwrap_or((0, 0))
    }

    fn bind(&self) -> KernelResult<()> {
        self.ctx.bind_to_thread().map_err(|e| cuda_err("bind", e))
    }

    fn side_now(&self) -> bool {
        self.on_side.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The stream new work goes to.
    fn current(&self) -> sys::CUstream {
        if self.side_now() {
            self.side.cu_stream()
        } else {
            self.stream.cu_stream()
        }
    }

    pub fn set_pdl(&self, on: bool) {
        self.pdl.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn pdl(&self) -> bool {
        self.pdl.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends new work to the side stream (or back); returns the previous choice.
    pub fn set_side(&self, on: bool) -> bool {
        self.on_side.swap(on, std::sync::atomic::Ordering::Relaxed)
    }

    /// `to` waits for what `from` has queued so far (through `event`; no host wait).
    fn order(
        &self,
        from: sys::CUstream,
        to: sys::CUstream,
        event: sys::CUevent,
    ) -> KernelResult<()> {
        self.bind()?;
        // SAFETY: both streams and the event belong to this context; a re-recorded event is
        // waited on at its latest record, as the driver defines.
        unsafe {
            result::event::record(event, from).map_err(|e| cuda_err("record", e))?;
            result::stream::wait_event(to, event, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                .map_err(|e| cuda_err("stream wait", e))
        }
    }

    /// The side stream waits for the main stream.
    pub fn fork(&self) -> KernelResult<()> {
        self.order(
            self.stream.cu_stream(),
            self.side.cu_stream(),
            self.lane_events.0[0],
        )
    }

    /// The main stream waits for the side stream.
    pub fn join(&self) -> KernelResult<()> {
        self.order(
            self.side.cu_stream(),
            self.stream.cu_stream(),
            self.lane_events.0[1],
        )
    }

    pub fn alloc(&self, bytes: usize) -> KernelResult<u64> {
        self.bind()?;
        self.hand_over_to_direct_work(bytes)?;
        // SAFETY: the stream belongs to this context; the memory is used on this stream, or on
        // the other after a fork or join orders the two.
        unsafe { result::malloc_async(self.current(), bytes) }
            .map_err(|e| cuda_err(&format!("allocating {bytes} bytes"), e))
    }

    pub fn free(&self, ptr: u64) {
        if self.bind().is_ok() {
            // SAFETY: `ptr` came from `alloc` and is freed once (DevBuf's drop), on the stream
            // of the work queued last that uses it (the model joins the side stream first).
            let _ = unsafe { result::free_async(ptr, self.current()) };
        }
    }

    pub fn memset_zero(&self, ptr: u64, bytes: usize) -> KernelResult<()> {
        self.bind()?;
        // SAFETY: `ptr` holds at least `bytes` bytes (DevBuf invariant).
        unsafe { result::memset_d8_async(ptr, 0, bytes, self.current()) }
            .map_err(|e| cuda_err("memset", e))
    }

    /// Queues an upload on the main stream, after the work queued before it. Not
    /// `cuMemcpyHtoD`: that copies on the legacy default stream, which our non-blocking streams
    /// do not wait for, and from pageable memory it may return before its last transfer lands,
    /// so a kernel queued next could read a half-written input.
    pub fn htod(&self, src: &[u8], dst: u64) -> KernelResult<()> {
        if self.side_now() {
            // the copy is on the main stream: side work would not be ordered with it
            return Err(KernelError::Invalid(
                "streams: an upload inside on_side (upload before the fork)".into(),
            ));
        }
        self.bind()?;
        // (staging pageable memory may wait for the stream)
        self.release_gate();
        if self.async_copies() && !src.is_empty() && src.len() <= STAGING_BYTES {
            return self.htod_staged(src, dst);
        }
        // SAFETY: `dst` holds `src.len()` bytes. `src` is pageable (a Rust slice): the driver
        // stages it before returning, so it may be released as soon as this returns.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("upload", e))
    }

    pub fn dtoh(&self, src: u64, dst: &mut [u8]) -> KernelResult<()> {
        self.bind()?;
        self.release_gate();
        let s = self.stream.cu_stream();
        // SAFETY: `src` holds `dst.len()` bytes; the stream is drained first (so an earlier
        // kernel's error is reported as such), and again after the copy queued on it.
        unsafe {
            result::stream::synchronize(s)
                .map_err(|e| cuda_err("kernel error (reported at download)", e))?;
            result::memcpy_dtoh_async(dst, src, s).map_err(|e| cuda_err("download", e))?;
            result::stream::synchronize(s).map_err(|e| cuda_err("download", e))
        }
    }

    pub fn synchronize(&self) -> KernelResult<()> {
        self.bind()?;
        self.release_gate();
        // SAFETY: the stream is alive for `self`'s lifetime.
        unsafe { result::stream::synchronize(self.stream.cu_stream()) }
            .map_err(|e| cuda_err("synchronize", e))
    }

    /// Both streams drained (`ADVDMD_CUDA_SYNC`: a side-stream kernel's error named at once).
    fn synchronize_both(&self) -> KernelResult<()> {
        self.synchronize()?;
        // SAFETY: the side stream is alive for `self`'s lifetime.
        unsafe { result::stream::synchronize(self.side.cu_stream()) }
            .map_err(|e| cuda_err("synchronize the side stream", e))
    }

    /// Loads the embedded fatbin of `family`. The bytes are copied to an 8-byte aligned buffer
    /// first: `include_bytes!` promises no alignment and the driver reads the header in place.
    fn load_module(family: &str) -> KernelResult<ModuleHandle> {
        let bytes = crate::info::EMBEDDED_KERNELS
            .iter()
            .find(|(n, _)| *n == family)
            .map(|(_, b)| *b)
            .ok_or_else(|| KernelError::MissingKernel(format!("module {family}")))?;
        let mut aligned = vec![0u64; bytes.len().div_ceil(8) + 1];
        bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: a complete fatbin produced by build.rs, kept alive across the call.
        let m = unsafe { result::module::load_data(aligned.as_ptr() as *const c_void) }
            .map_err(|e| cuda_err(&format!("loading module {family}"), e))?;
        Ok(ModuleHandle(m))
    }

    fn function(&self, kernel: &str, shared_bytes: u32) -> KernelResult<sys::CUfunction> {
        self.function_gated(kernel, shared_bytes, true)
    }

    /// `function`; with `release`, a profile gate is released before a first lookup: loading a
    /// module or a kernel (lazily, at cuModuleGetFunction) may wait for the context's work to
    /// finish, which behind a held gate waits for the host, so the host would stall until the
    /// gate's timeout. The gate's own launch passes `false` (`profile_begin` loads its kernel
    /// before queueing one).
    fn function_gated(
        &self,
        kernel: &str,
        shared_bytes: u32,
        release: bool,
    ) -> KernelResult<sys::CUfunction> {
        let lock = || self.modules.lock().unwrap_or_else(|p| p.into_inner());
        let mut guard = lock();
        if release && !guard.functions.contains_key(kernel) {
            drop(guard);
            self.release_gate();
            guard = lock();
        }
        let modules = &mut *guard;
        if !modules.functions.contains_key(kernel) {
            let family = crate::info::KERNEL_MODULES
                .iter()
                .find(|(k, _)| *k == kernel)
                .map(|(_, m)| *m)
                .ok_or_else(|| KernelError::MissingKernel(kernel.into()))?;
            if !modules.loaded.contains_key(family) {
                modules.loaded.insert(family, Self::load_module(family)?);
            }
            let cname = CString::new(kernel).map_err(|_| KernelError::Invalid(kernel.into()))?;
            // SAFETY: the module is loaded and never unloaded.
            let handle = unsafe { result::module::get_function(modules.loaded[family].0, cname) }
                .map_err(|e| cuda_err(&format!("{kernel} in module {family}"), e))?;
            modules.functions.insert(
                kernel.to_string(),
                Function {
                    handle,
                    max_dynamic_shared: 48 * 1024,
                },
            );
        }
        let f = modules.functions.get_mut(kernel).expect("inserted above");
        if shared_bytes > f.max_dynamic_shared {
            // SAFETY: a valid function handle; the driver rejects sizes the device cannot give.
            unsafe {
                result::function::set_function_attribute(
                    f.handle,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_bytes as i32,
                )
            }
            .map_err(|e| cuda_err(&format!("{kernel}: {shared_bytes} B of shared memory"), e))?;
            f.max_dynamic_shared = shared_bytes;
        }
        Ok(f.handle)
    }

    /// `m` encoded by the driver (`cuTensorMapEncodeTiled`: bf16 or f32, the 128-byte swizzle, zeros
    /// outside the tensor, L2 lines fetched 256 bytes at a time); `m` already checked.
    pub fn encode_tile_map(&self, m: &TileMap4) -> KernelResult<TmaMap> {
        use sys::{
            CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
            CUtensorMapL2promotion, CUtensorMapSwizzle,
        };
        let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
        let element_strides = [1u32; 4];
        // SAFETY: the arrays hold the rank's 4 (3 strides) entries and live across the call;
        // the driver only writes `map`.
        unsafe {
            sys::cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                if m.elem_bytes == 4 {
                    CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                } else {
                    CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                },
                4,
                m.base as *mut c_void,
                m.dims.as_ptr(),
                m.strides.as_ptr(),
                m.boxes.as_ptr(),
                element_strides.as_ptr(),
                CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
            .result()
        }
        .map_err(|e| cuda_err(&format!("tensor map {m:?}"), e))?;
        // SAFETY: the call succeeded, so the driver wrote the map (zeroed before in any case).
        Ok(TmaMap(unsafe { map.assume_init() }.opaque))
    }

    pub fn launch(
        &self,
        kernel: &str,
        cfg: LaunchCfg,
        args: &mut [*mut c_void],
    ) -> KernelResult<()> {
        self.bind()?;
        let f = self.function(kernel, cfg.shared_bytes)?;
        let g = (cfg.grid[0], cfg.grid[1], cfg.grid[2]);
        let b = (cfg.block[0], cfg.block[1], cfg.block[2]);
        let launched = if self.pdl() {
            // A programmatic dependent of the grid before it on the stream: every kernel begins
            // with kernel_prologue (griddepcontrol.wait; build.rs checks), so none touches memory
            // before that grid is complete.
            // SAFETY: the attribute value is the union's integer member; the rest as below.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id =
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            let config = sys::CUlaunchConfig {
                gridDimX: g.0,
                gridDimY: g.1,
                gridDimZ: g.2,
                blockDimX: b.0,
                blockDimY: b.1,
                blockDimZ: b.2,
                sharedMemBytes: cfg.shared_bytes,
                hStream: self.current(),
                attrs: &mut attr,
                numAttrs: 1,
            };
            // SAFETY: as launch_kernel below; `config` and `attr` outlive the call.
            unsafe {
                sys::cuLaunchKernelEx(&config, f, args.as_mut_ptr(), std::ptr::null_mut()).result()
            }
        } else {
            // SAFETY: `args` holds one pointer per kernel parameter (KernelArgs); buffers outlive
            // the launch because every later host access synchronizes the stream first.
            unsafe { result::launch_kernel(f, g, b, cfg.shared_bytes, self.current(), args) }
        };
        launched.map_err(|e| cuda_err(&format!("launching {kernel} {cfg:?}"), e))?;
        // (not while capturing: a capturing stream cannot be synchronised)
        if sync_after_launch() && !self.is_capturing() {
            self.synchronize_both()
                .map_err(|e| KernelError::Cuda(format!("after {kernel}: {e}")))?;
        }
        Ok(())
    }

    /// The cuBLASLt handle and workspaces, created on first use (outside any capture: creating
    /// them allocates with `cuMemAlloc`, which a capture forbids).
    fn cublaslt(&self) -> KernelResult<&super::cublaslt::Cublaslt> {
        if self.cublaslt.get().is_none() {
            let lt = super::cublaslt::Cublaslt::new(|bytes| {
                // SAFETY: a plain allocation kept for the runtime's lifetime (never freed).
                unsafe { result::malloc_sync(bytes) }.map_err(|e| cuda_err("workspace", e))
            })?;
            let _ = self.cublaslt.set(lt);
        }
        Ok(self.cublaslt.get().expect("set above"))
    }

    /// Graphs and direct (uncaptured) runs draw on two pools: a graph's allocations are mapped
    /// from the driver's graph memory and stay mapped after its replay; direct runs allocate from
    /// the default pool, which keeps what they free (the release threshold). Where one step of a
    /// training loop replays a graph and the next runs directly (a kind of iteration before its
    /// graph is recorded), the two working sets would be held at once: at 1024 px the AdvDMD
    /// iteration's ~7 GB each, past an 80 GB card. So a direct run that allocates a large amount
    /// (`HANDOVER_BYTES`) after a replay first returns the graphs' memory to the driver (the next
    /// replay maps it again), and a replay after direct runs first trims the default pool.
    const HANDOVER_BYTES: usize = 1 << 30;

    fn hand_over_to_direct_work(&self, bytes: usize) -> KernelResult<()> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.is_capturing() {
            return Ok(());
        }
        let since = self.direct_bytes.fetch_add(bytes, Relaxed) + bytes;
        if since < Self::HANDOVER_BYTES || !self.graph_memory_mapped.swap(false, Relaxed) {
            return Ok(());
        }
        // a replay still running holds its memory: trim only frees what no graph uses
        self.synchronize_both()?;
        // SAFETY: the context's device; trimming frees only blocks no queued graph uses.
        unsafe { sys::cuDeviceGraphMemTrim(self.ctx.cu_device()) }
            .result()
            .map_err(|e| cuda_err("graph memory trim", e))
    }

    fn hand_over_to_graph(&self) -> KernelResult<()> {
        use std::sync::atomic::Ordering::Relaxed;
        self.graph_memory_mapped.store(true, Relaxed);
        if self.direct_bytes.swap(0, Relaxed) < Self::HANDOVER_BYTES {
            return Ok(());
        }
        self.synchronize_both()?;
        self.trim_default_pool()
    }

    /// Gives the default pool's free blocks back to the driver (the release threshold keeps
    /// them otherwise).
    fn trim_default_pool(&self) -> KernelResult<()> {
        // SAFETY: the device's default pool; trimming frees only blocks no allocation holds.
        unsafe {
            let pool = result::device::get_default_mem_pool(self.ctx.cu_device())
                .map_err(|e| cuda_err("memory pool", e))?;
            sys::cuMemPoolTrimTo(pool, 0)
                .result()
                .map_err(|e| cuda_err("memory pool trim", e))
        }
    }

    /// Bytes of graph memory the driver holds mapped now (`CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT`).
    pub fn graph_memory_reserved(&self) -> KernelResult<u64> {
        self.bind()?;
        let mut v = 0u64;
        // SAFETY: the attribute is a u64 the call writes.
        unsafe {
            sys::cuDeviceGetGraphMemAttribute(
                self.ctx.cu_device(),
                sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT,
                &mut v as *mut u64 as *mut c_void,
            )
        }
        .result()
        .map_err(|e| cuda_err("graph memory attribute", e))?;
        Ok(v)
    }

    /// What a capture must not do the first time: create cuBLASLt's handle and workspaces, load
    /// the modules and look up their kernels (a module load inside a capture is legal only on
    /// recent drivers). Then the pool gives back the memory it keeps
    /// (the release threshold keeps all of it): the graph's allocations come from the driver's
    /// separate graph pool, and the last direct run's working set would otherwise be held twice.
    fn prepare_capture(&self) -> KernelResult<()> {
        // (without cuBLASLt a capture with no GEMM still works; one with a GEMM fails in it)
        let _ = self.cublaslt();
        // (a module this card cannot load fails here only if the capture launches from it)
        for (kernel, _) in crate::info::KERNEL_MODULES {
            let _ = self.function(kernel, 0);
        }
        self.synchronize()?;
        self.trim_default_pool()
    }

    /// Queues a cuBLASLt GEMM (the handle and its workspace are created on first use).
    pub fn gemm(
        &self,
        spec: &super::kernel::GemmSpec,
        ptrs: &super::kernel::GemmPtrs,
        out: super::kernel::GemmOut,
    ) -> KernelResult<bool> {
        self.bind()?;
        if self.cublaslt.get().is_none_or(|lt| !lt.has_plan(spec, out)) {
            // A new shape loads cuBLASLt's kernels (and may time candidates): as `function`,
            // nothing that may wait for the GPU runs behind a held profile gate.
            self.release_gate();
        }
        self.cublaslt()?.matmul(
            spec,
            out,
            ptrs,
            self.current() as *mut c_void,
            self.side_now(),
            self.is_capturing(),
        )
    }

    pub fn is_capturing(&self) -> bool {
        self.capturing.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn profile_events(&self) -> std::sync::MutexGuard<'_, ProfileEvents> {
        self.profile.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A timing event on `stream`, from the spare ones when there are.
    fn stamp(&self, p: &mut ProfileEvents, stream: sys::CUstream) -> KernelResult<sys::CUevent> {
        let event = match p.spare.pop() {
            Some(e) => e,
            None => result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
                .map_err(|e| cuda_err("profile event", e))?,
        };
        // SAFETY: the event and the stream belong to this context.
        unsafe { result::event::record(event, stream) }.map_err(|e| cuda_err("record", e))?;
        Ok(event)
    }

    /// Queues a gate holding the main stream (the previous one released), whose epoch the host
    /// writes to let it pass.
    fn queue_gate(&self, p: &mut ProfileEvents) -> KernelResult<()> {
        let g = &mut p.gate;
        if g.flag.is_null() {
            // SAFETY: 4 bytes of pinned, device-mapped host memory, freed in Drop.
            let flag = unsafe { result::malloc_host(4, sys::CU_MEMHOSTALLOC_DEVICEMAP) }
                .map_err(|e| cuda_err("profile gate", e))?;
            g.flag = flag as *mut u32;
            // SAFETY: the allocation above, 4 bytes, not yet read by any kernel.
            unsafe { std::ptr::write_volatile(g.flag, 0) };
            (g.queued, g.released) = (0, 0);
        }
        let mut dflag: sys::CUdeviceptr = 0;
        // SAFETY: a device-mapped allocation of this context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dflag, g.flag as *mut c_void, 0) }
            .result()
            .map_err(|e| cuda_err("profile gate's device pointer", e))?;
        let f = self.function_gated("profile_gate", 0, false)?;
        let (mut epoch, mut timeout) = (g.queued + 1, GATE_TIMEOUT_NS);
        let mut args = [
            &mut dflag as *mut _ as *mut c_void,
            &mut epoch as *mut _ as *mut c_void,
            &mut timeout as *mut _ as *mut c_void,
        ];
        let s = self.stream.cu_stream();
        // SAFETY: the kernel's three parameters, in order; the flag outlives the profile.
        unsafe { result::launch_kernel(f, (1, 1, 1), (1, 1, 1), 0, s, &mut args) }
            .map_err(|e| cuda_err("launching profile_gate", e))?;
        g.queued = epoch;
        g.ops = 0;
        Self::release(g, epoch - 1);
        Ok(())
    }

    /// Lets every gate up to `epoch` pass.
    fn release(g: &mut ProfileGate, epoch: u32) {
        if !g.flag.is_null() && g.released < epoch {
            // SAFETY: the gate's pinned word; the kernel only reads it.
            unsafe { std::ptr::write_volatile(g.flag, epoch) };
            g.released = epoch;
        }
    }

    /// Lets the held gate pass (before the host waits for the GPU).
    fn release_gate(&self) {
        let mut p = self.profile_events();
        let queued = p.gate.queued;
        Self::release(&mut p.gate, queued);
    }

    /// Starts a profile: a timestamp on each stream, then a gate with its timestamp (the first
    /// mark: the caller names it `profile::GATE`).
    pub fn profile_begin(&self) -> KernelResult<()> {
        self.bind()?;
        self.function("profile_gate", 0)?;
        let mut guard = self.profile_events();
        let p = &mut *guard;
        let used: Vec<_> = p.start.drain(..).chain(p.marks.drain(..)).collect();
        p.spare.extend(used);
        for s in [self.stream.cu_stream(), self.side.cu_stream()] {
            let e = self.stamp(p, s)?;
            p.start.push(e);
        }
        self.queue_gate(p)?;
        let e = self.stamp(p, self.stream.cu_stream())?;
        p.marks.push(e);
        Ok(())
    }

    /// A timestamp after the op just queued, on its stream; returns whether that is the side,
    /// and whether a new gate (with its own timestamp, the next mark's start) followed it.
    pub fn profile_mark(&self) -> KernelResult<(bool, bool)> {
        let mut guard = self.profile_events();
        let p = &mut *guard;
        let e = self.stamp(p, self.current())?;
        p.marks.push(e);
        let side = self.side_now();
        p.gate.ops += 1;
        let held = p.gate.released < p.gate.queued;
        let gated = !side && (!held || p.gate.ops >= GATE_OPS);
        if gated {
            self.queue_gate(p)?;
            let e = self.stamp(p, self.stream.cu_stream())?;
            p.marks.push(e);
        }
        Ok((side, gated))
    }

    /// Ends a profile (the caller synchronised both streams): every mark's time and each
    /// stream's start, in milliseconds from the main stream's start.
    pub fn profile_end(&self) -> KernelResult<(Vec<f64>, [f64; 2])> {
        self.bind()?;
        let mut p = self.profile_events();
        let queued = p.gate.queued;
        Self::release(&mut p.gate, queued);
        let (starts, marks) = (std::mem::take(&mut p.start), std::mem::take(&mut p.marks));
        let since = |e: sys::CUevent| -> KernelResult<f64> {
            // SAFETY: both events were recorded and have completed (the streams were drained).
            unsafe { result::event::synchronize(e) }.map_err(|e| cuda_err("event sync", e))?;
            unsafe { result::event::elapsed(starts[0], e) }
                .map(f64::from)
                .map_err(|e| cuda_err("elapsed", e))
        };
        let out = (|| {
            let stamps = marks
                .iter()
                .map(|&e| since(e))
                .collect::<KernelResult<Vec<_>>>()?;
            Ok((stamps, [0.0, since(starts[1])?]))
        })();
        p.spare.extend(starts.into_iter().chain(marks));
        out
    }

    /// Records the launches `work` queues into an executable CUDA graph (nothing runs yet).
    /// Capture is thread-local: other threads' calls are unaffected; a call that may not be
    /// captured (a synchronous copy, a module load) fails the capture with the driver's error.
    pub fn capture(
        self: &Arc<Self>,
        work: impl FnOnce() -> KernelResult<()>,
    ) -> KernelResult<CudaGraph> {
        self.bind()?;
        self.prepare_capture()?;
        let s = self.stream.cu_stream();
        // SAFETY: the stream is ours; the graph is destroyed once instantiated (the executable
        // keeps what it needs), or here on any error.
        unsafe {
            result::stream::begin_capture(
                s,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .map_err(|e| cuda_err("begin capture", e))?;
            self.capturing
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let queued = work();
            self.capturing
                .store(false, std::sync::atomic::Ordering::Relaxed);
            let graph = result::stream::end_capture(s).map_err(|e| cuda_err("end capture", e));
            if let Err(e) = queued {
                if let Ok(g) = graph {
                    let _ = result::graph::destroy(g);
                }
                return Err(e);
            }
            let graph = graph?;
            let exec = result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0))
                .map_err(|e| cuda_err("graph instantiate", e));
            let _ = result::graph::destroy(graph);
            Ok(CudaGraph {
                exec: exec?,
                rt: self.clone(),
            })
        }
    }

    /// Captures the launches `work` queues into a CUDA graph, replays it once to warm up, then
    /// returns the milliseconds of one more replay: device time without the host's launch gaps
    /// (METHOD.md: short kernels are otherwise timed at the host's launch rate).
    pub fn time_graph_ms(
        self: &Arc<Self>,
        work: impl FnOnce() -> KernelResult<()>,
    ) -> KernelResult<f32> {
        let graph = self.capture(work)?;
        graph.launch()?;
        self.time_ms(|| graph.launch())
    }

    pub fn time_ms(&self, work: impl FnOnce() -> KernelResult<()>) -> KernelResult<f32> {
        self.bind()?;
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let start = result::event::create(flags).map_err(|e| cuda_err("event", e))?;
        let end = result::event::create(flags).map_err(|e| cuda_err("event", e))?;
        let s = self.stream.cu_stream();
        // SAFETY: events and stream belong to this context; the events are destroyed below.
        let ms = unsafe {
            let timed = (|| {
                result::event::record(start, s).map_err(|e| cuda_err("record", e))?;
                work()?;
                result::event::record(end, s).map_err(|e| cuda_err("record", e))?;
                self.release_gate();
                result::event::synchronize(end).map_err(|e| cuda_err("event sync", e))?;
                result::event::elapsed(start, end).map_err(|e| cuda_err("elapsed", e))
            })();
            let _ = result::event::destroy(start);
            let _ = result::event::destroy(end);
            timed
        }?;
        Ok(ms)
    }
}

impl Drop for CudaRuntime {
    /// Gives back what the runtime made itself: events and cuBLASLt's workspaces (a test
    /// process makes many runtimes). Buffers and graphs hold the runtime, so they are gone.
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        let profile = std::mem::take(self.profile.get_mut().unwrap_or_else(|e| e.into_inner()));
        // SAFETY: every handle below was made by this runtime and is released once, after both
        // streams have finished with them.
        unsafe {
            let _ = result::stream::synchronize(self.stream.cu_stream());
            let _ = result::stream::synchronize(self.side.cu_stream());
            let events = profile
                .start
                .into_iter()
                .chain(profile.marks)
                .chain(profile.spare);
            for e in events.chain(self.lane_events.0) {
                let _ = result::event::destroy(e);
            }
            if let Some(lt) = self.cublaslt.get() {
                for w in lt.workspaces() {
                    let _ = result::free_sync(w);
                }
            }
            if !profile.gate.flag.is_null() {
                let _ = result::free_host(profile.gate.flag as *mut c_void);
            }
            let st = std::mem::replace(
                self.staging.get_mut().unwrap_or_else(|e| e.into_inner()),
                Staging::empty(0),
            );
            for e in st.events.into_iter().chain(st.spare) {
                let _ = result::event::destroy(e);
            }
            for (_, p) in st.free_blocks {
                let _ = result::free_host(p as *mut c_void);
            }
            if !st.base.is_null() {
                let _ = result::free_host(st.base as *mut c_void);
            }
        }
    }
}

/// An instantiated CUDA graph on a runtime's stream; destroyed on drop.
pub struct CudaGraph {
    exec: sys::CUgraphExec,
    rt: Arc<CudaRuntime>,
}

// SAFETY: an executable graph is a driver handle usable from any thread of its context.
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    /// Queues one replay of the recorded launches on the runtime's stream.
    pub fn launch(&self) -> KernelResult<()> {
        self.rt.bind()?;
        self.rt.hand_over_to_graph()?;
        // SAFETY: `exec` is alive while `self` is; the stream belongs to the same context.
        unsafe { result::graph::launch(self.exec, self.rt.stream.cu_stream()) }
            .map_err(|e| cuda_err("graph launch", e))?;
        if sync_after_launch() {
            self.rt.synchronize()?;
        }
        Ok(())
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        if self.rt.bind().is_ok() {
            // SAFETY: replays queued on the stream finish first; the handle is destroyed once.
            unsafe {
                let _ = result::stream::synchronize(self.rt.stream.cu_stream());
                let _ = result::graph::exec_destroy(self.exec);
            }
        }
    }
}

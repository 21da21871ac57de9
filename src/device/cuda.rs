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
    *SYNC.get_or_init(|| std::env::var("ADVDMD_CUDA_SYNC").is_ok_and(|v| v == "1"))
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
    lane_events: LaneEvents,
    name: String,
    modules: Mutex<Modules>,
    cublaslt: std::sync::OnceLock<super::cublaslt::Cublaslt>,
}

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
            lane_events,
            name,
            modules: Mutex::new(Modules {
                loaded: HashMap::new(),
                functions: HashMap::new(),
            }),
            cublaslt: std::sync::OnceLock::new(),
        }))
    }

    pub fn name(&self) -> String {
        self.name.clone()
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

    pub fn htod(&self, src: &[u8], dst: u64) -> KernelResult<()> {
        self.bind()?;
        // SAFETY: `dst` holds `src.len()` bytes; the sync copy finishes before `src` is released.
        unsafe {
            result::stream::synchronize(self.stream.cu_stream())
                .map_err(|e| cuda_err("sync before upload", e))?;
            result::memcpy_htod_sync(dst, src)
        }
        .map_err(|e| cuda_err("upload", e))
    }

    pub fn dtoh(&self, src: u64, dst: &mut [u8]) -> KernelResult<()> {
        self.bind()?;
        // SAFETY: `src` holds `dst.len()` bytes; the stream is drained first so the data is final.
        unsafe {
            result::stream::synchronize(self.stream.cu_stream())
                .map_err(|e| cuda_err("kernel error (reported at download)", e))?;
            result::memcpy_dtoh_sync(dst, src)
        }
        .map_err(|e| cuda_err("download", e))
    }

    pub fn synchronize(&self) -> KernelResult<()> {
        self.bind()?;
        // SAFETY: the stream is alive for `self`'s lifetime.
        unsafe { result::stream::synchronize(self.stream.cu_stream()) }
            .map_err(|e| cuda_err("synchronize", e))
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
        let mut guard = self.modules.lock().unwrap_or_else(|p| p.into_inner());
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
        // SAFETY: `args` holds one pointer per kernel parameter (KernelArgs); buffers outlive the
        // launch because every later host access synchronizes the stream first.
        unsafe { result::launch_kernel(f, g, b, cfg.shared_bytes, self.current(), args) }
            .map_err(|e| cuda_err(&format!("launching {kernel} {cfg:?}"), e))?;
        if sync_after_launch() {
            self.synchronize()
                .map_err(|e| KernelError::Cuda(format!("after {kernel}: {e}")))?;
        }
        Ok(())
    }

    /// Queues a cuBLASLt GEMM (the handle and its workspace are created on first use).
    pub fn gemm(
        &self,
        spec: &super::kernel::GemmSpec,
        ptrs: &super::kernel::GemmPtrs,
        out: super::kernel::GemmOut,
    ) -> KernelResult<bool> {
        self.bind()?;
        if self.cublaslt.get().is_none() {
            let lt = super::cublaslt::Cublaslt::new(|bytes| {
                // SAFETY: a plain allocation kept for the runtime's lifetime (never freed).
                unsafe { result::malloc_sync(bytes) }.map_err(|e| cuda_err("workspace", e))
            })?;
            let _ = self.cublaslt.set(lt);
        }
        let lt = self.cublaslt.get().expect("set above");
        lt.matmul(
            spec,
            out,
            ptrs,
            self.current() as *mut c_void,
            self.side_now(),
        )
    }

    /// Records the launches `work` queues into an executable CUDA graph (nothing runs yet).
    /// Capture is thread-local: other threads' calls are unaffected; a call that may not be
    /// captured (a synchronous copy, a module load) fails the capture with the driver's error.
    pub fn capture(
        self: &Arc<Self>,
        work: impl FnOnce() -> KernelResult<()>,
    ) -> KernelResult<CudaGraph> {
        self.bind()?;
        let s = self.stream.cu_stream();
        // SAFETY: the stream is ours; the graph is destroyed once instantiated (the executable
        // keeps what it needs), or here on any error.
        unsafe {
            result::stream::begin_capture(
                s,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .map_err(|e| cuda_err("begin capture", e))?;
            let queued = work();
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

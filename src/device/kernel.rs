//! The kernel device: where the `cuda/*.cu` kernels run. One launch path for both back ends —
//! (kernel name, grid, block, shared bytes, one pointer per argument), as `cuLaunchKernel` takes
//! it — dispatched to the CUDA driver on a GPU and to the CPU SIMT emulator (`device::emu`)
//! everywhere else (design/CUDA.md §4). In emulator mode "device memory" is host memory, so the
//! same launcher code and the same tests run in CI.
//!
//! Kept deliberately small: typed buffers ([`DevBuf`]), uploads/downloads, launches, events for
//! timing. The GPU side is in `device::cuda`.

use std::ffi::c_void;
use std::marker::PhantomData;

use bytemuck::Pod;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::emu;
use super::emu_graph::{CaptureSlot, EmuGraph, Op};
use super::emu_lanes::{EmuLanes, Span};
use super::profile::{gaps, Mark, OpProfile, ProfileLog};
use super::tma::{TileMap4, TmaMap};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    // (EmuError's messages begin with "emulator: "; transparent, so a `{:#}` chain says it once)
    #[error(transparent)]
    Emu(#[from] emu::EmuError),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("kernel {0:?} is not in any embedded module (built without nvcc?)")]
    MissingKernel(String),
    #[error("{0}")]
    Invalid(String),
}

pub type KernelResult<T> = Result<T, KernelError>;

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

impl LaunchCfg {
    /// A 1-D launch: `blocks` blocks of `threads` threads.
    pub fn linear(blocks: u32, threads: u32) -> LaunchCfg {
        LaunchCfg {
            grid: [blocks.max(1), 1, 1],
            block: [threads, 1, 1],
            shared_bytes: 0,
        }
    }

    pub fn grid2(gx: u32, gy: u32, threads: u32) -> LaunchCfg {
        LaunchCfg {
            grid: [gx.max(1), gy.max(1), 1],
            block: [threads, 1, 1],
            shared_bytes: 0,
        }
    }

    pub fn with_shared(mut self, bytes: u32) -> LaunchCfg {
        self.shared_bytes = bytes;
        self
    }
}

/// `ADVDMD_STREAMS=1|2`: whether new devices queue the model's text-token work on a second
/// stream (default 2: on an H200 it took the SD3.5-medium forward+backward from 113.8 to
/// 107.5 ms and the AdvDMD iteration from 426.8 to 414.4 ms, docs/perf-log.md 2026-11-27), so
/// a GPU session can time both without a rebuild. An error names the accepted values (the CLI
/// checks at start).
pub fn streams_env() -> Result<usize, String> {
    match std::env::var("ADVDMD_STREAMS") {
        Err(_) => Ok(2),
        Ok(v) => match v.trim() {
            "1" => Ok(1),
            "2" => Ok(2),
            _ => Err(format!("ADVDMD_STREAMS={v:?} is not 1 or 2")),
        },
    }
}

/// `ADVDMD_PDL`: `1` launches every kernel as a programmatic dependent of the grid before it on
/// its stream (sm_90: it may be scheduled while that grid finishes, and waits in its
/// `kernel_prologue`, cuda/common.cuh); `0` or unset: plain launches. Anything else is an error.
pub fn pdl_env() -> Result<bool, String> {
    env_flag("ADVDMD_PDL")
}

/// An on/off environment variable: `1` on, `0` or unset off, anything else an error naming it.
pub fn env_flag(var: &str) -> Result<bool, String> {
    match std::env::var(var) {
        Err(_) => Ok(false),
        Ok(v) => match v.trim() {
            "0" => Ok(false),
            "1" => Ok(true),
            _ => Err(format!("{var}={v:?} is not 0 or 1")),
        },
    }
}

/// `host` rounded to bf16 (to nearest even) on all cores: what the host stages is often
/// millions of values (SD3.5's 333 × 4096 context a prompt, a model's weights).
pub fn bf16_of(host: &[f32]) -> Vec<half::bf16> {
    use rayon::prelude::*;
    host.par_iter().map(|&v| half::bf16::from_f32(v)).collect()
}

/// Blocks of `threads` needed to cover `n` items, one per thread.
pub fn blocks_for(n: usize, threads: u32) -> u32 {
    n.div_ceil(threads as usize).max(1) as u32
}

/// The argument list of one launch. An argument occupies one 8-byte slot (the kernel reads the
/// first `sizeof(param)` bytes of it, on a little-endian machine the value itself) or, a
/// [`TmaMap`] set, the slots of its bytes; `starts` says where each argument begins.
#[derive(Default)]
pub struct KernelArgs {
    slots: Vec<u64>,
    starts: Vec<usize>,
    /// Each map set's argument index and an aligned copy of it (a GPU launch points there: the
    /// slots are only 8-byte aligned, a CUtensorMap 128).
    aligned: Vec<(usize, Box<[TmaMap]>)>,
    /// The byte ranges of the buffer arguments (the emulator's stream checker reads them).
    spans: Vec<Span>,
}

impl KernelArgs {
    pub fn new() -> KernelArgs {
        KernelArgs::default()
    }
    fn word(mut self, v: u64) -> Self {
        self.starts.push(self.slots.len());
        self.slots.push(v);
        self
    }
    pub fn buf<T>(mut self, b: &DevBuf<T>) -> Self {
        self.spans.push(b.span());
        self.word(b.ptr)
    }
    /// A null pointer argument (an optional input the kernel skips).
    pub fn null(self) -> Self {
        self.word(0)
    }
    pub fn i32(self, v: i32) -> Self {
        self.word(v as u32 as u64)
    }
    pub fn u32(self, v: u32) -> Self {
        self.word(v as u64)
    }
    pub fn i64(self, v: i64) -> Self {
        self.word(v as u64)
    }
    pub fn f32(self, v: f32) -> Self {
        self.word(v.to_bits() as u64)
    }
    pub fn f64(self, v: f64) -> Self {
        self.word(v.to_bits())
    }
    /// One argument: a struct of tensor maps by value (`const __grid_constant__`), `maps` in order.
    /// In the slots for the emulator (which copies an argument bytewise) and, aligned as the
    /// type is, for the driver.
    pub fn maps(mut self, maps: &[TmaMap]) -> Self {
        self.aligned.push((self.starts.len(), maps.into()));
        self.starts.push(self.slots.len());
        for m in maps {
            self.slots.extend_from_slice(&m.0);
        }
        self
    }
    /// One pointer per argument, into this list's own slots or aligned map copies (valid while
    /// `self` is borrowed).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn pointers(&mut self) -> Vec<*mut c_void> {
        let mut p = arg_pointers(&mut self.slots, &self.starts);
        for (i, maps) in &mut self.aligned {
            p[*i] = maps.as_mut_ptr().cast();
        }
        p
    }
}

/// Each argument's pointer: `slots` at each of `starts`.
pub(crate) fn arg_pointers(slots: &mut [u64], starts: &[usize]) -> Vec<*mut c_void> {
    let base = slots.as_mut_ptr();
    // SAFETY: every start indexes `slots` (the builder pushes it before the argument's slots).
    starts
        .iter()
        .map(|&i| unsafe { base.add(i) } as *mut c_void)
        .collect()
}

/// The epilogue kind, without its pointers (part of the cache key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EpilogueKind {
    None,
    /// `+ bias[n]`
    Bias,
    /// `gelu_tanh(·)`
    Gelu,
    /// `gelu_tanh(· + bias[n])`
    GeluBias,
    /// `gelu_tanh(· + bias[n])`, storing the pre-activation in `aux` (`[M, N]`, bf16)
    GeluAuxBias,
    /// `· ∘ gelu_tanh'(aux)` and the bias gradient `Σ_m` of that into `bias_grad[n]`
    DGeluBgrad,
    /// The plain product, plus `bias_grad[m] = Σ_k op(A)[m, k]` (length M): a linear layer's
    /// weight gradient `dW = dYᵀ·X` (A = dY stored `[tokens, out]`, `trans_a`) with its bias
    /// gradient `Σ_tokens dY` in the same call.
    BgradB,
}

/// A row-major GEMM `C[M, N] = op(A)[M, K] · op(B)[K, N]` over bf16 buffers. `trans_a`: A is
/// stored `[K, M]`; `trans_b`: B is stored `[N, K]` (a PyTorch weight in a linear layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmSpec {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub epilogue: EpilogueKind,
}

impl GemmSpec {
    /// `C = A·B` with both stored as they are and no epilogue (a linear layer's input gradient).
    pub fn nn(m: usize, n: usize, k: usize) -> GemmSpec {
        GemmSpec {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            epilogue: EpilogueKind::None,
        }
    }

    /// 2·M·N·K.
    pub fn flops(&self) -> u64 {
        2 * (self.m * self.n * self.k) as u64
    }
}

/// A GEMM's name in a profile: `gemm M×N×K`, the operands' storage (`N` as is, `T` transposed,
/// A then B), the epilogue and the output (`bf16`, or `+=f32` accumulated into f32).
fn gemm_name(s: &GemmSpec, out: GemmOut) -> String {
    let t = |on: bool| if on { 'T' } else { 'N' };
    let out = match out {
        GemmOut::Bf16 => "bf16",
        GemmOut::F32Accumulate => "+=f32",
        GemmOut::F32Overwrite => "=f32",
    };
    format!(
        "gemm {}×{}×{} {}{} {:?} {out}",
        s.m,
        s.n,
        s.k,
        t(s.trans_a),
        t(s.trans_b),
        s.epilogue
    )
}

/// Where a GEMM's product goes (part of the cuBLASLt plan's key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmOut {
    /// `C = epilogue(op(A)·op(B))`, C bf16.
    Bf16,
    /// `C += op(A)·op(B)`, C f32 (a weight gradient added straight into the f32 gradients); with
    /// `BgradB` the bias gradient is written as f32.
    F32Accumulate,
    /// `C = op(A)·op(B)`, C f32: `F32Accumulate`'s first write into a gradient since it was
    /// last zeroed (β = 0: C is not read, so it needs no zeroing).
    F32Overwrite,
}

/// Device pointers of one call (0 where unused).
#[derive(Clone, Copy, Debug, Default)]
pub struct GemmPtrs {
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub bias: u64,
    pub aux: u64,
    pub bias_grad: u64,
}

/// A download queued by [`KernelDevice::download_later`].
pub struct Later<T> {
    len: usize,
    pending: PendingBytes,
    _t: std::marker::PhantomData<T>,
}

enum PendingBytes {
    Ready(Vec<u8>),
    #[cfg(feature = "cuda")]
    Gpu(super::cuda::PendingCopy),
}

impl<T: Pod> Later<T> {
    /// Waits for the copy (only it) and returns the values.
    pub fn wait(self) -> KernelResult<Vec<T>> {
        let mut host = vec![T::zeroed(); self.len];
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut host);
        match self.pending {
            PendingBytes::Ready(b) => dst.copy_from_slice(&b),
            #[cfg(feature = "cuda")]
            PendingBytes::Gpu(p) => p.wait(dst)?,
        }
        Ok(host)
    }
}

/// Which back end a [`KernelDevice`] drives.
#[derive(Clone)]
enum Backend {
    Emulator,
    #[cfg(feature = "cuda")]
    Gpu(std::sync::Arc<super::cuda::CudaRuntime>),
}

/// Runs kernels: a CUDA GPU or the CPU SIMT emulator. Cheap to clone.
#[derive(Clone)]
pub struct KernelDevice {
    backend: Backend,
    memory: Arc<MemoryCounter>,
    /// Matmul FLOPs queued so far (GEMMs at 2·M·N·K, attention in the FlashAttention
    /// convention): what the benchmarks' MFU divides by, counted where the work is issued.
    flops: Arc<FlopCounter>,
    /// The column kernels' tickets ([`KernelDevice::column_tickets`]).
    tickets: Arc<std::sync::OnceLock<ColumnTickets>>,
}

/// Counters in device memory, all zero between launches, from which [`KernelDevice::column_tickets`]
/// hands each launch of a column kernel that sums its own partial rows (cuda/column_lanes.cuh's
/// `column_tail`) one per column slice; the last block of a slice sets its counter back to zero.
/// Handed round a ring, so launches that may run at the same time (the two streams' work between
/// a fork and its join, a few dozen column launches) never share one; allocated with the device,
/// outside any capture, and left out of the memory figures (device plumbing, 64 KiB).
struct ColumnTickets {
    buf: DevBuf<u32>,
    next: std::sync::Mutex<usize>,
}

/// Counters in the ring of [`ColumnTickets`].
const COLUMN_TICKETS: usize = 16384;

/// The matmul FLOPs a device queued: the model's, and those queued again by a recomputation
/// (activation checkpointing's second forward of a block), which MFU leaves out — a model's
/// FLOPs count once however the engine schedules them — and hardware FLOPs utilisation counts.
#[derive(Default)]
struct FlopCounter {
    model: std::sync::atomic::AtomicU64,
    recomputed: std::sync::atomic::AtomicU64,
    /// Nesting depth of [`KernelDevice::recomputing`]: counts go to `recomputed` while > 0.
    recomputing: AtomicUsize,
}

impl FlopCounter {
    fn add(&self, flops: u64) {
        let to = if self.recomputing.load(Ordering::Relaxed) > 0 {
            &self.recomputed
        } else {
            &self.model
        };
        to.fetch_add(flops, Ordering::Relaxed);
    }
}

/// Bytes of the buffers this device handed out and not yet dropped, and their high-water mark:
/// the engine's own device memory (not the driver's, cuBLASLt's workspace or pool slack), the
/// same on a GPU and under the emulator.
/// Also the emulator's capture and stream state, which a buffer's drop must reach.
#[derive(Default)]
struct MemoryCounter {
    live: AtomicUsize,
    peak: AtomicUsize,
    capture: CaptureSlot,
    /// Whether the side stream is in use (both back ends), and the emulator's checker of it.
    lanes: EmuLanes,
    /// The op profile in progress (`KernelDevice::profile`), if any; `profiling` says so without
    /// the lock (every launch asks).
    profile: std::sync::Mutex<Option<ProfileLog>>,
    profiling: std::sync::atomic::AtomicBool,
    /// Matmul FLOPs counted by [`KernelDevice::count_matmul_flops`] since the last timed launch:
    /// the next launch's (attention counts its FLOPs, then launches).
    pending_flops: std::sync::atomic::AtomicU64,
}

impl MemoryCounter {
    fn add(&self, bytes: usize) {
        let now = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
    fn sub(&self, bytes: usize) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Who frees a buffer's memory.
enum Owner {
    /// Emulator memory: host memory ending against a guard page.
    Host(super::emu_memory::HostMemory),
    /// A window into another buffer ([`DevBuf::view`]): frees nothing.
    View,
    #[cfg(feature = "cuda")]
    Gpu(std::sync::Arc<super::cuda::CudaRuntime>),
}

/// A typed buffer of `len` elements in device memory (host memory under the emulator).
pub struct DevBuf<T> {
    ptr: u64,
    len: usize,
    owner: Owner,
    /// The counter this buffer's bytes were added to (`None` for views).
    counted: Option<Arc<MemoryCounter>>,
    /// The emulator capture it was allocated in (0: none).
    born: u64,
    _t: PhantomData<T>,
}

impl<T> DevBuf<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The raw device address (a host address under the emulator).
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
    /// The byte range the buffer covers (what [`KernelDevice::fork`] takes as shared).
    pub fn span(&self) -> Span {
        (self.ptr, self.bytes())
    }
}

impl<T> DevBuf<T> {
    /// Elements `offset .. offset + len` as a buffer of their own, borrowed from this one: how one
    /// flat parameter buffer hands each GEMM its weight. Errors when the range does not fit.
    pub fn view(&self, offset: usize, len: usize) -> KernelResult<DevView<'_, T>> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(KernelError::Invalid(format!(
                "view of {len} elements at {offset} in a buffer of {}",
                self.len
            )));
        }
        Ok(DevView {
            buf: DevBuf {
                ptr: self.ptr + (offset * std::mem::size_of::<T>()) as u64,
                len,
                owner: Owner::View,
                counted: None,
                born: 0,
                _t: PhantomData,
            },
            _parent: PhantomData,
        })
    }

    /// A view of the same memory that borrows nothing, for work recorded into an emulator graph
    /// (which outlives the borrow). The caller keeps the memory alive for as long as the alias
    /// is used — a graph's replays, as on a GPU.
    pub(crate) fn alias(&self) -> DevBuf<T> {
        DevBuf {
            ptr: self.ptr,
            len: self.len,
            owner: Owner::View,
            counted: None,
            born: 0,
            _t: PhantomData,
        }
    }
}

/// A borrowed window of a [`DevBuf`]; dereferences to a `DevBuf` every launcher takes.
pub struct DevView<'a, T> {
    buf: DevBuf<T>,
    _parent: PhantomData<&'a DevBuf<T>>,
}

impl<T> std::ops::Deref for DevView<'_, T> {
    type Target = DevBuf<T>;
    fn deref(&self) -> &DevBuf<T> {
        &self.buf
    }
}

impl<T> Drop for DevBuf<T> {
    fn drop(&mut self) {
        if let Some(c) = &self.counted {
            c.sub(self.bytes());
        }
        match &mut self.owner {
            Owner::Host(host) => {
                if let Some(c) = &self.counted {
                    let host = std::mem::take(host);
                    let host = if c.capture.is_active() {
                        Some(host)
                    } else {
                        c.lanes.freed((self.ptr, self.bytes().max(1)), host)
                    };
                    c.capture.freed(self.born, host);
                }
            }
            Owner::View => {}
            #[cfg(feature = "cuda")]
            Owner::Gpu(rt) => rt.free(self.ptr),
        }
    }
}

/// The profile's name for the time before a copy: the host preparing its data (or reading the
/// last one's) while the stream has nothing left to run. Timed apart, so that a copy's row is the
/// transfer alone.
const HOST_GAP: &str = "idle (host work before a copy)";

/// Byte pattern written into fresh buffers under the emulator: 0xFF bytes are NaN in f32 and
/// bf16, so an element a kernel forgot to write shows up in every comparison.
const POISON: u8 = 0xFF;

impl KernelDevice {
    /// The CPU SIMT emulator: always available. `ADVDMD_STREAMS` as [`streams_env`] reads it.
    pub fn emulator() -> KernelDevice {
        let dev = KernelDevice {
            backend: Backend::Emulator,
            memory: Arc::default(),
            flops: Arc::default(),
            tickets: Arc::default(),
        };
        let _ = dev.set_streams(streams_env().unwrap_or(2));
        // host memory: cannot fail short of an abort; a failure would surface at the first
        // column launch as an error
        let _ = dev.init_column_tickets();
        dev
    }

    /// The CUDA GPU `ordinal`, if the driver and the embedded kernels are there.
    #[cfg(feature = "cuda")]
    pub fn cuda(ordinal: usize) -> KernelResult<KernelDevice> {
        let dev = KernelDevice {
            backend: Backend::Gpu(super::cuda::CudaRuntime::new(ordinal)?),
            memory: Arc::default(),
            flops: Arc::default(),
            tickets: Arc::default(),
        };
        dev.set_streams(streams_env().map_err(KernelError::Invalid)?)?;
        dev.set_pdl(pdl_env().map_err(KernelError::Invalid)?);
        dev.init_column_tickets()?;
        Ok(dev)
    }

    fn init_column_tickets(&self) -> KernelResult<()> {
        let mut buf = self.zeros::<u32>(COLUMN_TICKETS)?;
        if let Some(counter) = buf.counted.take() {
            counter.sub(buf.bytes());
            counter
                .peak
                .store(counter.live.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let ring = ColumnTickets {
            buf,
            next: std::sync::Mutex::new(0),
        };
        self.tickets
            .set(ring)
            .map_err(|_| KernelError::Invalid("the column tickets exist already".into()))
    }

    /// `n` zero counters for one launch of a column kernel that sums its own partials (one per
    /// column slice, `grid.x`), the next `n` of a ring of 16384 ([`ColumnTickets`]).
    pub(crate) fn column_tickets(&self, n: usize) -> KernelResult<DevBuf<u32>> {
        let ring = self
            .tickets
            .get()
            .ok_or_else(|| KernelError::Invalid("no column tickets on this device".into()))?;
        if n == 0 || n > COLUMN_TICKETS / 16 {
            return Err(KernelError::Invalid(format!(
                "{n} column tickets for one launch (1 to {})",
                COLUMN_TICKETS / 16
            )));
        }
        let mut next = ring.next.lock().unwrap_or_else(|e| e.into_inner());
        let start = if *next + n > COLUMN_TICKETS { 0 } else { *next };
        *next = start + n;
        Ok(ring.buf.view(start, n)?.alias())
    }

    /// Every counter of the ring [`Self::column_tickets`] hands out, as the device holds them
    /// now (all zero once the launches that took them have run): for tests.
    pub fn column_ticket_counts(&self) -> KernelResult<Vec<u32>> {
        let ring = self
            .tickets
            .get()
            .ok_or_else(|| KernelError::Invalid("no column tickets on this device".into()))?;
        self.download(&ring.buf)
    }

    /// The first GPU when one is usable, else `None` (never panics; CUDA.md §2).
    pub fn gpu_if_available() -> Option<KernelDevice> {
        #[cfg(feature = "cuda")]
        {
            match super::probe_cuda() {
                super::CudaProbe::Found(_) => KernelDevice::cuda(0).ok(),
                _ => None,
            }
        }
        #[cfg(not(feature = "cuda"))]
        {
            None
        }
    }

    pub fn is_emulator(&self) -> bool {
        matches!(self.backend, Backend::Emulator)
    }

    /// Streaming multiprocessors: the GPU's, and under the emulator an H100's 132 (the card the
    /// emulator's wgmma path stands for), so launch plans that depend on it (the attention
    /// forward's split of its last wave) take the same shape in CI as on that card.
    pub fn sm_count(&self) -> usize {
        match &self.backend {
            Backend::Emulator => 132,
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.sm_count(),
        }
    }

    /// Whether the Hopper-only kernels (attention_hopper.cu, wgmma.cu: built for sm_90a alone)
    /// run here: on an sm_90 GPU (H100, H200) and under the emulator, which models wgmma.
    /// The tensor map of `m` for this device's bulk tensor copies (cuda/common.cuh's
    /// `tma_load_4d`): the driver's encoding on a GPU, the emulator's layout under it.
    pub fn tile_map(&self, m: &TileMap4) -> KernelResult<TmaMap> {
        m.check().map_err(KernelError::Invalid)?;
        match &self.backend {
            Backend::Emulator => Ok(m.emulator_map()),
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.encode_tile_map(m),
        }
    }

    pub fn has_wgmma(&self) -> bool {
        match &self.backend {
            Backend::Emulator => true,
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.compute_capability() == (9, 0),
        }
    }

    /// "emulator" or the GPU's name.
    pub fn name(&self) -> String {
        match &self.backend {
            Backend::Emulator => "emulator".into(),
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.name(),
        }
    }

    fn counted(&self, bytes: usize) -> Arc<MemoryCounter> {
        self.memory.add(bytes);
        self.memory.clone()
    }

    /// Bytes of graph memory the driver keeps mapped for this device's CUDA graphs (their
    /// temporaries: outside the buffer counter); `None` under the emulator.
    pub fn graph_memory_bytes(&self) -> KernelResult<Option<u64>> {
        match &self.backend {
            Backend::Emulator => Ok(None),
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.graph_memory_reserved().map(Some),
        }
    }

    /// Bytes of this device's buffers alive now.
    pub fn live_bytes(&self) -> usize {
        self.memory.live.load(Ordering::Relaxed)
    }

    /// Adds to the matmul FLOP counter: the FLOPs of the next kernel launch (the attention
    /// launchers call this before launching; a profile credits them to that launch).
    pub fn count_matmul_flops(&self, flops: u64) {
        self.flops.add(flops);
        self.memory
            .pending_flops
            .fetch_add(flops, Ordering::Relaxed);
    }

    /// Adds a GEMM's FLOPs to the matmul FLOP counter (a profile takes them from its shape).
    pub(crate) fn count_gemm_flops(&self, flops: u64) {
        self.flops.add(flops);
    }

    /// Matmul FLOPs queued on this device (and its clones) since it was made, outside
    /// [`Self::recomputing`]: the model's FLOPs, what MFU divides by.
    pub fn matmul_flops(&self) -> u64 {
        self.flops.model.load(Ordering::Relaxed)
    }

    /// Matmul FLOPs queued inside [`Self::recomputing`] since the device was made: work done
    /// twice to save memory, which hardware FLOPs utilisation adds to [`Self::matmul_flops`].
    pub fn recomputed_flops(&self) -> u64 {
        self.flops.recomputed.load(Ordering::Relaxed)
    }

    /// Adds a graph replay's counts, as its capture measured them (a replay queues nothing
    /// through the launchers).
    pub fn count_replayed_flops(&self, model: u64, recomputed: u64) {
        self.flops.model.fetch_add(model, Ordering::Relaxed);
        self.flops
            .recomputed
            .fetch_add(recomputed, Ordering::Relaxed);
    }

    /// Runs `f` as a recomputation: the matmul FLOPs it queues (on either stream) count in
    /// [`Self::recomputed_flops`] instead of [`Self::matmul_flops`]. Nests.
    pub fn recomputing<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Depth<'a>(&'a AtomicUsize);
        impl Drop for Depth<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.flops.recomputing.fetch_add(1, Ordering::Relaxed);
        let _depth = Depth(&self.flops.recomputing);
        f()
    }

    /// The most bytes alive at once since the device was made or [`Self::reset_peak`].
    pub fn peak_bytes(&self) -> usize {
        self.memory.peak.load(Ordering::Relaxed)
    }

    /// Starts a new high-water mark from what is alive now.
    pub fn reset_peak(&self) {
        self.memory.peak.store(self.live_bytes(), Ordering::Relaxed);
    }

    /// An uninitialised buffer (poisoned under the emulator).
    pub fn alloc<T: Pod>(&self, len: usize) -> KernelResult<DevBuf<T>> {
        let bytes = len * std::mem::size_of::<T>();
        match &self.backend {
            Backend::Emulator => {
                let host =
                    super::emu_memory::HostMemory::filled(bytes, POISON).ok_or_else(|| {
                        KernelError::Invalid(format!("emulator: cannot map {bytes} bytes"))
                    })?;
                Ok(DevBuf {
                    ptr: host.ptr() as u64,
                    len,
                    owner: Owner::Host(host),
                    counted: Some(self.counted(bytes)),
                    born: self.memory.capture.allocated(),
                    _t: PhantomData,
                })
            }
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => Ok(DevBuf {
                ptr: rt.alloc(bytes.max(1))?,
                len,
                owner: Owner::Gpu(rt.clone()),
                counted: Some(self.counted(bytes)),
                born: 0,
                _t: PhantomData,
            }),
        }
    }

    /// A buffer of zeros.
    pub fn zeros<T: Pod>(&self, len: usize) -> KernelResult<DevBuf<T>> {
        let b = self.alloc::<T>(len)?;
        self.memset_zero(&b)?;
        Ok(b)
    }

    pub fn memset_zero<T: Pod>(&self, b: &DevBuf<T>) -> KernelResult<()> {
        match &self.backend {
            Backend::Emulator => self.run_or_record(
                Op::Memset {
                    ptr: b.ptr,
                    bytes: b.bytes(),
                },
                vec![b.span()],
            )?,
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.memset_zero(b.ptr, b.bytes())?,
        }
        self.mark(|| "memset".into(), 0)
    }

    pub fn upload<T: Pod>(&self, host: &[T]) -> KernelResult<DevBuf<T>> {
        let b = self.alloc::<T>(host.len())?;
        self.copy_to_device(host, &b)?;
        Ok(b)
    }

    pub fn copy_to_device<T: Pod>(&self, host: &[T], b: &DevBuf<T>) -> KernelResult<()> {
        if host.len() != b.len {
            return Err(KernelError::Invalid(format!(
                "upload of {} elements into a buffer of {}",
                host.len(),
                b.len
            )));
        }
        let src: &[u8] = bytemuck::cast_slice(host);
        match &self.backend {
            Backend::Emulator => {
                self.memory.capture.forbid("an upload")?;
                self.memory.lanes.require_joined("an upload")?;
                // SAFETY: `b` owns exactly `src.len()` bytes at `b.ptr`; the regions are disjoint.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), b.ptr as *mut u8, src.len()) };
                Ok(())
            }
            // (a profile times a GPU's copies; the emulator's are its GEMMs' own host copies)
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => {
                self.mark(|| HOST_GAP.into(), 0)?;
                rt.htod(src, b.ptr)?;
                self.mark(|| "upload (host to device)".into(), 0)
            }
        }
    }

    /// Copies the buffer back (waits for the work queued before it).
    pub fn download<T: Pod>(&self, b: &DevBuf<T>) -> KernelResult<Vec<T>> {
        let mut host = vec![T::zeroed(); b.len];
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut host);
        match &self.backend {
            Backend::Emulator => {
                self.memory.capture.forbid("a download")?;
                self.memory.lanes.require_joined("a download")?;
                // SAFETY: as in `copy_to_device`.
                unsafe {
                    std::ptr::copy_nonoverlapping(b.ptr as *const u8, dst.as_mut_ptr(), dst.len())
                };
            }
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => {
                self.mark(|| HOST_GAP.into(), 0)?;
                rt.dtoh(b.ptr, dst)?;
                self.mark(|| "download (device to host)".into(), 0)?;
            }
        }
        Ok(host)
    }

    /// Copies the buffer back later: the copy is queued on the main stream behind the work
    /// queued so far, into pinned memory on a GPU, and [`Later::wait`] waits for it alone (not for
    /// work queued after it) — how a host that keeps the next iteration queued reads this one's
    /// figures. The emulator copies at once.
    pub fn download_later<T: Pod>(&self, b: &DevBuf<T>) -> KernelResult<Later<T>> {
        let bytes = b.bytes();
        let pending = match &self.backend {
            Backend::Emulator => {
                self.memory.capture.forbid("a download")?;
                self.memory.lanes.require_joined("a download")?;
                let mut host = vec![0u8; bytes];
                // SAFETY: `b` owns `bytes` bytes at `b.ptr`; the regions are disjoint.
                unsafe {
                    std::ptr::copy_nonoverlapping(b.ptr as *const u8, host.as_mut_ptr(), bytes)
                };
                PendingBytes::Ready(host)
            }
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => {
                let p = rt.dtoh_later(b.ptr, bytes)?;
                self.mark(|| "download (queued, device to host)".into(), 0)?;
                PendingBytes::Gpu(p)
            }
        };
        Ok(Later {
            len: b.len,
            pending,
            _t: std::marker::PhantomData,
        })
    }

    /// Uploads that must not wait for the GPU (`true`): on a GPU each upload is copied into a
    /// ring of pinned host memory and the copy to the device reads it from there, so the host can
    /// queue inputs behind running work (from pageable memory the driver may wait for the stream
    /// first). Off by default; the emulator copies at once either way.
    pub fn set_async_copies(&self, on: bool) {
        match &self.backend {
            Backend::Emulator => {}
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.set_async_copies(on),
        }
    }

    /// Launches `kernel` (an `extern "C" __global__` name from `cuda/*.cu`).
    pub fn launch(&self, kernel: &str, cfg: LaunchCfg, mut args: KernelArgs) -> KernelResult<()> {
        let threads = cfg.block.iter().map(|&d| d as u64).product::<u64>();
        if threads == 0 || threads > 1024 || cfg.grid.contains(&0) {
            return Err(KernelError::Invalid(format!(
                "{kernel}: bad launch {cfg:?}"
            )));
        }
        match &self.backend {
            Backend::Emulator => self.run_or_record(
                Op::Launch {
                    kernel: kernel.to_string(),
                    cfg,
                    slots: std::mem::take(&mut args.slots),
                    starts: std::mem::take(&mut args.starts),
                },
                std::mem::take(&mut args.spans),
            )?,
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.launch(kernel, cfg, &mut args.pointers())?,
        }
        let flops = self.memory.pending_flops.swap(0, Ordering::Relaxed);
        self.mark(|| kernel.to_string(), flops)
    }

    /// Waits for every queued launch and reports the first asynchronous error.
    pub fn synchronize(&self) -> KernelResult<()> {
        match &self.backend {
            Backend::Emulator => {
                self.memory.capture.forbid("a synchronisation")?;
                self.memory.lanes.require_joined("a synchronisation")
            }
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.synchronize(),
        }
    }

    /// Queues a cuBLASLt GEMM (GPU only; the emulator's GEMMs run on the CPU in `kernels::gemm`).
    /// Queues a cuBLASLt GEMM on a GPU: `None` under the emulator, `Some(Ok(false))` when
    /// cuBLASLt has no algorithm for an `F32Accumulate` call (the caller falls back).
    pub(crate) fn gpu_gemm(
        &self,
        spec: &GemmSpec,
        ptrs: &GemmPtrs,
        out: GemmOut,
    ) -> Option<KernelResult<bool>> {
        match &self.backend {
            Backend::Emulator => {
                let _ = (spec, ptrs, out);
                None
            }
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => Some(rt.gemm(spec, ptrs, out).and_then(|queued| {
                if queued {
                    self.mark(|| gemm_name(spec, out), spec.flops())?;
                }
                Ok(queued)
            })),
        }
    }

    /// Records the work `work` queues into a [`DeviceGraph`] to replay later; nothing runs until
    /// [`DeviceGraph::launch`], on a GPU and under the emulator alike (whose recorder also
    /// enforces the capture rules, `device::emu_graph`). Buffers `work` allocates and drops become
    /// the graph's own, allocated and freed at each replay; buffers it reads or writes that were
    /// allocated before must stay alive while the graph is used.
    pub fn capture(&self, work: impl FnOnce() -> KernelResult<()>) -> KernelResult<DeviceGraph> {
        match &self.backend {
            Backend::Emulator => {
                self.memory.lanes.require_joined("a capture's start")?;
                self.memory.lanes.require_no_fork("a capture's start")?;
                let slot = &self.memory.capture;
                slot.begin()?;
                let ended =
                    work().and_then(|_| self.memory.lanes.require_no_fork("a capture's end"));
                if let Err(e) = ended {
                    slot.abort();
                    return Err(e);
                }
                Ok(DeviceGraph {
                    inner: GraphInner::Emu(slot.end()?),
                    dev: self.clone(),
                })
            }
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => {
                let lanes = &self.memory.lanes;
                lanes.require_no_fork("a capture's start")?;
                let graph =
                    rt.capture(|| work().and_then(|_| lanes.require_no_fork("a capture's end")))?;
                Ok(DeviceGraph {
                    inner: GraphInner::Gpu(graph),
                    dev: self.clone(),
                })
            }
        }
    }

    /// Runs `op` now (or at the side stream's join), or records it when a capture is running
    /// (emulator). `touches`: the byte ranges it reads or writes.
    fn run_or_record(&self, op: Op, touches: Vec<Span>) -> KernelResult<()> {
        match self.memory.capture.record(op) {
            Some(op) => self.memory.lanes.submit(op, touches),
            None => Ok(()),
        }
    }

    /// Work the emulator does on the host in place of a device call (its GEMMs): run now, or
    /// recorded into the running capture. `step` reaches device memory through
    /// [`DevBuf::alias`]es (`touches` are their spans), and may copy to and from it (it runs
    /// outside any capture).
    /// `gemm`: the GEMM it stands for (the profile's name for it).
    pub(crate) fn emulated_host_step(
        &self,
        gemm: (&GemmSpec, GemmOut),
        touches: Vec<Span>,
        step: impl Fn() -> KernelResult<()> + Send + Sync + 'static,
    ) -> KernelResult<()> {
        self.run_or_record(Op::Host(Box::new(step)), touches)?;
        self.mark(|| gemm_name(gemm.0, gemm.1), gemm.0.flops())
    }

    // ---- the op profile (device::profile) -------------------------------------------------

    /// Whether a graph capture is recording now (its ops are not timed).
    fn capturing(&self) -> bool {
        match &self.backend {
            Backend::Emulator => self.memory.capture.is_active(),
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.is_capturing(),
        }
    }

    /// Timestamps the op just queued when a profile is running (outside captures).
    fn mark(&self, name: impl FnOnce() -> String, flops: u64) -> KernelResult<()> {
        if !self.memory.profiling.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut guard = self
            .memory
            .profile
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(log) = guard.as_mut() else {
            return Ok(());
        };
        if self.capturing() {
            return Ok(());
        }
        let (side, gated) = match &self.backend {
            Backend::Emulator => {
                let t = log.started.map_or(0.0, |s| s.elapsed().as_secs_f64() * 1e3);
                log.host_s.push(t);
                (self.memory.lanes.is_side(), false)
            }
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.profile_mark()?,
        };
        log.marks.push(Mark {
            name: name(),
            flops,
            side,
        });
        if gated {
            log.marks.push(Mark {
                name: super::profile::GATE.into(),
                flops: 0,
                side: false,
            });
        }
        Ok(())
    }

    /// Runs `work` and times every op it queues ([`super::profile`]): per kernel, per GEMM
    /// shape. Waits for the device before and after. Not inside a capture, a fork or another
    /// profile.
    pub fn profile(&self, work: impl FnOnce() -> KernelResult<()>) -> KernelResult<OpProfile> {
        if self.capturing() {
            return Err(KernelError::Invalid("profile: inside a capture".into()));
        }
        self.synchronize()?;
        let streams = self.streams();
        {
            let mut guard = self
                .memory
                .profile
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if guard.is_some() {
                return Err(KernelError::Invalid(
                    "profile: one is running already".into(),
                ));
            }
            let mut log = ProfileLog {
                started: Some(std::time::Instant::now()),
                ..Default::default()
            };
            #[cfg(feature = "cuda")]
            if let Backend::Gpu(rt) = &self.backend {
                rt.profile_begin()?;
                log.marks.push(Mark {
                    name: super::profile::GATE.into(),
                    flops: 0,
                    side: false,
                });
            }
            *guard = Some(log);
            self.memory.profiling.store(true, Ordering::Relaxed);
        }
        let ran = work().and_then(|_| self.synchronize());
        let log = {
            let mut guard = self
                .memory
                .profile
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.memory.profiling.store(false, Ordering::Relaxed);
            guard.take().unwrap_or_default()
        };
        let stamps = match &self.backend {
            Backend::Emulator => ran.map(|_| (log.host_s, [0.0, 0.0])),
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => {
                let stamps = rt.profile_end();
                ran.and(stamps)
            }
        }?;
        let ms = gaps(&log.marks, &stamps.0, stamps.1);
        Ok(OpProfile {
            streams,
            ..OpProfile::from_marks(&log.marks, &ms)
        })
    }

    /// Launches kernels as programmatic dependents (`true`; see [`pdl_env`]) or plainly. The
    /// emulator runs launches one after another either way.
    pub fn set_pdl(&self, on: bool) {
        match &self.backend {
            Backend::Emulator => {}
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.set_pdl(on),
        }
    }

    /// Whether kernels launch as programmatic dependents (always `false` under the emulator).
    pub fn pdl(&self) -> bool {
        match &self.backend {
            Backend::Emulator => false,
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.pdl(),
        }
    }

    // ---- two streams -----------------------------------------------------------------------

    /// Uses a second stream for the work inside [`Self::on_side`] (`2`), or queues everything on
    /// one (`1`, the default). With one, `fork`, `join` and `on_side` change nothing.
    pub fn set_streams(&self, streams: usize) -> KernelResult<()> {
        if !matches!(streams, 1 | 2) {
            return Err(KernelError::Invalid(format!("streams: {streams} (1 or 2)")));
        }
        self.memory.lanes.set_enabled(streams == 2)
    }

    /// 1 or 2: see [`Self::set_streams`].
    pub fn streams(&self) -> usize {
        if self.memory.lanes.enabled() {
            2
        } else {
            1
        }
    }

    /// The side stream waits for all the main stream queued so far. `shared`: buffers both
    /// streams read, and neither writes, until the [`Self::join`] (the emulator's checker).
    pub fn fork(&self, shared: &[Span]) -> KernelResult<()> {
        if !self.memory.lanes.enabled() {
            return Ok(());
        }
        match &self.backend {
            Backend::Emulator => self.memory.lanes.fork(shared),
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => {
                rt.fork()?;
                self.memory.lanes.set_forked(true);
                Ok(())
            }
        }
    }

    /// The main stream waits for all the side stream queued so far. Every buffer the side work
    /// used must stay alive until here.
    pub fn join(&self) -> KernelResult<()> {
        if !self.memory.lanes.enabled() {
            return Ok(());
        }
        match &self.backend {
            Backend::Emulator => self.memory.lanes.join(),
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => {
                rt.join()?;
                self.memory.lanes.set_forked(false);
                Ok(())
            }
        }
    }

    /// Queues what `work` queues on the side stream (allocations and frees included), after a
    /// [`Self::fork`] and before a [`Self::join`]; on the main stream with one stream.
    pub fn on_side<R>(&self, work: impl FnOnce() -> KernelResult<R>) -> KernelResult<R> {
        if !self.memory.lanes.enabled() {
            return work();
        }
        let set = |on: bool| match &self.backend {
            Backend::Emulator => self.memory.lanes.set_side(on),
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.set_side(on),
        };
        if set(true) {
            set(true);
            return Err(KernelError::Invalid(
                "streams: on_side inside on_side".into(),
            ));
        }
        let r = work();
        set(false);
        r
    }

    /// Device milliseconds of the launches `work` queues, replayed from a graph so the host's
    /// launch gaps are not counted (GPU); the host clock over one replay under the emulator.
    pub fn time_graph_ms(&self, work: impl FnOnce() -> KernelResult<()>) -> KernelResult<f32> {
        match &self.backend {
            Backend::Emulator => {
                let graph = self.capture(work)?;
                graph.launch()?;
                self.time_ms(|| graph.launch())
            }
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.time_graph_ms(work),
        }
    }

    /// Milliseconds `work` takes on the device: CUDA events around it on a GPU, the host clock
    /// under the emulator (meaningless for speed, but the same code path).
    pub fn time_ms(&self, work: impl FnOnce() -> KernelResult<()>) -> KernelResult<f32> {
        match &self.backend {
            Backend::Emulator => {
                let t = std::time::Instant::now();
                work()?;
                Ok(t.elapsed().as_secs_f32() * 1e3)
            }
            #[cfg(feature = "cuda")]
            Backend::Gpu(rt) => rt.time_ms(work),
        }
    }
}

/// Launches recorded once by [`KernelDevice::capture`], replayed as one unit: thousands of
/// kernels without a host launch gap between them.
pub struct DeviceGraph {
    inner: GraphInner,
    /// The device it replays on (a profile times each replay as one op).
    dev: KernelDevice,
}

enum GraphInner {
    Emu(EmuGraph),
    #[cfg(feature = "cuda")]
    Gpu(super::cuda::CudaGraph),
}

impl DeviceGraph {
    /// Queues one replay on the device's stream (runs it, under the emulator).
    pub fn launch(&self) -> KernelResult<()> {
        match &self.inner {
            GraphInner::Emu(g) => g.replay()?,
            #[cfg(feature = "cuda")]
            GraphInner::Gpu(g) => g.launch()?,
        }
        let flops = self.dev.memory.pending_flops.swap(0, Ordering::Relaxed);
        self.dev.mark(|| "graph replay".into(), flops)
    }

    /// Pieces of work recorded (emulator); `None` on a GPU, which does not say.
    pub fn recorded_ops(&self) -> Option<usize> {
        match &self.inner {
            GraphInner::Emu(g) => Some(g.len()),
            #[cfg(feature = "cuda")]
            GraphInner::Gpu(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map set is one argument: its pointer is 128-byte aligned (a CUtensorMap's alignment)
    /// and reads the maps' bytes; the arguments around it keep their own slots.
    #[test]
    fn a_map_set_is_one_aligned_argument() {
        let maps = [TmaMap([7; 16]), TmaMap([9; 16])];
        let mut args = KernelArgs::new().i32(-1).maps(&maps).f32(2.0);
        assert_eq!(args.starts, vec![0, 1, 33]);
        let p = args.pointers();
        assert_eq!(p.len(), 3);
        assert_eq!(p[1] as usize % 128, 0);
        // SAFETY: p[1] points at the two maps' 256 bytes, p[0] and p[2] at 8-byte slots.
        unsafe {
            let got = std::slice::from_raw_parts(p[1] as *const TmaMap, 2);
            assert_eq!(got, &maps);
            assert_eq!(*(p[0] as *const i32), -1);
            assert_eq!(*(p[2] as *const f32), 2.0);
        }
    }
}

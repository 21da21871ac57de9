//! cuBLASLt GEMMs for the CUDA device: bf16 in and out, f32 accumulation, with the epilogues the
//! MMDiT needs (bias, GELU, GELU saving its pre-activation) and their backward (DGELU with the
//! bias gradient, the bias gradient of a weight-gradient GEMM). cudarc's safe wrapper rebuilds
//! descriptors and reruns the algorithm heuristic on every call and lacks the backward
//! epilogues (CUDA.md §2), so this works at the `result`/`sys` level with a cache keyed by shape,
//! transposes and epilogue; per call only the pointer attributes are set.
//!
//! The API is row-major (see [`GemmSpec`]); cuBLASLt is column-major, so `C = op(A)·op(B)` is
//! issued as `Cᵀ = op(B)ᵀ·op(A)ᵀ` with the operands swapped and no data moved.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::{result as lt, sys as ltsys};

use super::kernel::{EpilogueKind, GemmOut, GemmPtrs, GemmSpec, KernelError, KernelResult};

struct Plan {
    desc: ltsys::cublasLtMatmulDesc_t,
    layout_first: ltsys::cublasLtMatrixLayout_t,
    layout_second: ltsys::cublasLtMatrixLayout_t,
    layout_c: ltsys::cublasLtMatrixLayout_t,
    algo: ltsys::cublasLtMatmulAlgo_t,
    /// The heuristic's candidates, best first (`algo` is the first until tuned).
    candidates: Vec<ltsys::cublasLtMatmulAlgo_t>,
    tuned: bool,
}

/// Heuristic candidates asked for per GEMM shape.
const CANDIDATES: usize = 8;

/// `ADVDMD_GEMM_AUTOTUNE=1`: on a GEMM shape's first call, time the heuristic's candidates on
/// scratch outputs and keep the fastest. Off by default: the choice follows the timing of the
/// moment, so two runs may pick different algorithms (and round differently); the heuristic's
/// first choice is the same every run. Read once.
fn autotune_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ADVDMD_GEMM_AUTOTUNE").is_ok_and(|v| v == "1"))
}

// SAFETY: descriptors are plain heap objects of cuBLASLt, used under the cache's mutex.
unsafe impl Send for Plan {}

pub struct Cublaslt {
    handle: ltsys::cublasLtHandle_t,
    /// `None`: no algorithm for an `F32Accumulate` call (asked once; the caller falls back).
    plans: Mutex<HashMap<(GemmSpec, GemmOut), Option<Plan>>>,
    workspace: u64,
    workspace_bytes: usize,
}

// SAFETY: the handle is thread-safe per cuBLASLt's documentation; plans sit behind a mutex.
unsafe impl Send for Cublaslt {}
unsafe impl Sync for Cublaslt {}

fn lt_err(what: &str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Cuda(format!("cuBLASLt {what}: {e:?}"))
}

const OP_N: i32 = 0;
const OP_T: i32 = 1;

fn epilogue_code(e: EpilogueKind) -> ltsys::cublasLtEpilogue_t {
    use ltsys::cublasLtEpilogue_t as E;
    match e {
        EpilogueKind::None => E::CUBLASLT_EPILOGUE_DEFAULT,
        EpilogueKind::Bias => E::CUBLASLT_EPILOGUE_BIAS,
        EpilogueKind::Gelu => E::CUBLASLT_EPILOGUE_GELU,
        EpilogueKind::GeluBias => E::CUBLASLT_EPILOGUE_GELU_BIAS,
        EpilogueKind::GeluAuxBias => E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
        EpilogueKind::DGeluBgrad => E::CUBLASLT_EPILOGUE_DGELU_BGRAD,
        EpilogueKind::BgradB => E::CUBLASLT_EPILOGUE_BGRADB,
    }
}

unsafe fn set_desc<T>(
    desc: ltsys::cublasLtMatmulDesc_t,
    attr: ltsys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> KernelResult<()> {
    lt::set_matmul_desc_attribute(
        desc,
        attr,
        value as *const T as *const c_void,
        std::mem::size_of::<T>(),
    )
    .map_err(|e| lt_err(&format!("{attr:?}"), e))
}

impl Cublaslt {
    /// Creates the handle and a 32 MiB workspace; `alloc` gives device memory that lives as long
    /// as the runtime.
    pub fn new(alloc: impl FnOnce(usize) -> KernelResult<u64>) -> KernelResult<Cublaslt> {
        // SAFETY: only dlopens the library.
        if !unsafe { ltsys::is_culib_present() } {
            return Err(KernelError::Cuda("libcublasLt not found".into()));
        }
        let handle = lt::create_handle().map_err(|e| lt_err("create", e))?;
        let workspace_bytes = 32 << 20;
        Ok(Cublaslt {
            handle,
            plans: Mutex::new(HashMap::new()),
            workspace: alloc(workspace_bytes)?,
            workspace_bytes,
        })
    }

    pub fn workspace_ptr(&self) -> u64 {
        self.workspace
    }

    /// Builds the descriptors and picks the algorithm for `spec` (once per spec).
    unsafe fn plan(&self, spec: &GemmSpec, out: GemmOut) -> KernelResult<Plan> {
        use ltsys::cublasLtMatmulDescAttributes_t as A;
        use ltsys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_32F};
        let (m, n, k) = (spec.m as u64, spec.n as u64, spec.k as u64);
        let desc =
            lt::create_matmul_desc(ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F, CUDA_R_32F)
                .map_err(|e| lt_err("desc", e))?;
        // Column-major view: Cᵀ[N, M] = first[N, K] · second[K, M] with first = op(B)ᵀ,
        // second = op(A)ᵀ. B stored row-major [K, N] is column-major [N, K] (no transpose).
        let (op_first, first_rows, first_cols) = if spec.trans_b {
            (OP_T, k, n)
        } else {
            (OP_N, n, k)
        };
        let (op_second, second_rows, second_cols) = if spec.trans_a {
            (OP_T, m, k)
        } else {
            (OP_N, k, m)
        };
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &op_first)?;
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &op_second)?;
        set_desc(
            desc,
            A::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epilogue_code(spec.epilogue),
        )?;
        let layout = |r: u64, c: u64| {
            lt::create_matrix_layout(CUDA_R_16BF, r, c, r as i64).map_err(|e| lt_err("layout", e))
        };
        let layout_first = layout(first_rows, first_cols)?;
        let layout_second = layout(second_rows, second_cols)?;
        let layout_c = match out {
            GemmOut::Bf16 => layout(n, m)?,
            GemmOut::F32Accumulate => {
                // an f32 bias gradient beside the f32 product
                set_desc(
                    desc,
                    A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    &(CUDA_R_32F as i32),
                )?;
                lt::create_matrix_layout(CUDA_R_32F, n, m, n as i64)
                    .map_err(|e| lt_err("layout", e))?
            }
        };
        if matches!(
            spec.epilogue,
            EpilogueKind::GeluAuxBias | EpilogueKind::DGeluBgrad
        ) {
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &(n as i64))?;
        }
        let pref = lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
        let ws = self.workspace_bytes as u64;
        lt::set_matmul_pref_attribute(
            pref,
            ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws as *const u64 as *const c_void,
            8,
        )
        .map_err(|e| lt_err("preference", e))?;
        // The heuristic checks the epilogue's pointers for alignment: give it plausible ones.
        self.set_pointers(
            desc,
            spec,
            &GemmPtrs {
                bias: self.workspace,
                aux: self.workspace,
                bias_grad: self.workspace,
                ..Default::default()
            },
        )?;
        let asked = if autotune_enabled() { CANDIDATES } else { 1 };
        let mut results: Vec<ltsys::cublasLtMatmulHeuristicResult_t> =
            vec![std::mem::zeroed(); asked];
        let mut count = 0i32;
        let status = ltsys::cublasLtMatmulAlgoGetHeuristic(
            self.handle,
            desc,
            layout_first,
            layout_second,
            layout_c,
            layout_c,
            pref,
            asked as i32,
            results.as_mut_ptr(),
            &mut count,
        );
        let _ = lt::destroy_matmul_pref(pref);
        let candidates: Vec<_> = results[..(count.max(0) as usize).min(asked)]
            .iter()
            .filter(|r| r.state == ltsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        if status != ltsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || candidates.is_empty() {
            return Err(lt_err(&format!("no algorithm for {spec:?}"), status));
        }
        Ok(Plan {
            desc,
            layout_first,
            layout_second,
            layout_c,
            algo: candidates[0],
            candidates,
            tuned: false,
        })
    }

    unsafe fn set_pointers(
        &self,
        desc: ltsys::cublasLtMatmulDesc_t,
        spec: &GemmSpec,
        p: &GemmPtrs,
    ) -> KernelResult<()> {
        use ltsys::cublasLtMatmulDescAttributes_t as A;
        match spec.epilogue {
            EpilogueKind::Bias | EpilogueKind::GeluBias => {
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias)?;
            }
            EpilogueKind::GeluAuxBias => {
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias)?;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &p.aux)?;
            }
            EpilogueKind::DGeluBgrad => {
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias_grad)?;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &p.aux)?;
            }
            EpilogueKind::BgradB => {
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias_grad)?;
            }
            EpilogueKind::None | EpilogueKind::Gelu => {}
        }
        Ok(())
    }

    /// Queues `C = epilogue(op(A)·op(B))` (or `C += op(A)·op(B)`) on `stream`; `Ok(false)` when
    /// an `F32Accumulate` call has no algorithm.
    // `stream` is an opaque driver handle passed through to cuBLASLt, never dereferenced here.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn matmul(
        &self,
        spec: &GemmSpec,
        out: GemmOut,
        p: &GemmPtrs,
        stream: *mut c_void,
    ) -> KernelResult<bool> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let key = (*spec, out);
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                // SAFETY: the handle is live; the plan's objects are owned by the cache from here on.
                let plan = match (unsafe { self.plan(spec, out) }, out) {
                    (Ok(plan), _) => Some(plan),
                    (Err(_), GemmOut::F32Accumulate) => None,
                    (Err(e), GemmOut::Bf16) => return Err(e),
                };
                e.insert(plan)
            }
        };
        let Some(plan) = plan else {
            return Ok(false);
        };
        if autotune_enabled() && !plan.tuned && plan.candidates.len() > 1 && !capturing(stream) {
            plan.tuned = true;
            // SAFETY: scratch outputs of the sizes `spec` implies; inputs as the caller's call.
            if let Ok(best) = unsafe { self.fastest(plan, spec, out, p, stream) } {
                plan.algo = best;
            }
        }
        let algo = plan.algo;
        // SAFETY: pointers are device buffers of the sizes `spec` implies (checked by the
        // caller); the workspace is owned by the runtime.
        unsafe { self.run(plan, &algo, spec, out, p, stream) }
            .map_err(|e| lt_err(&format!("matmul {spec:?} {out:?}"), e))?;
        Ok(true)
    }

    /// Queues one product with `algo`.
    unsafe fn run(
        &self,
        plan: &Plan,
        algo: &ltsys::cublasLtMatmulAlgo_t,
        spec: &GemmSpec,
        out: GemmOut,
        p: &GemmPtrs,
        stream: *mut c_void,
    ) -> Result<(), KernelError> {
        let (alpha, beta) = match out {
            GemmOut::Bf16 => (1f32, 0f32),
            GemmOut::F32Accumulate => (1f32, 1f32),
        };
        self.set_pointers(plan.desc, spec, p)?;
        lt::matmul(
            self.handle,
            plan.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            p.b as *const c_void,
            plan.layout_first,
            p.a as *const c_void,
            plan.layout_second,
            p.c as *const c_void,
            plan.layout_c,
            p.c as *mut c_void,
            plan.layout_c,
            algo,
            self.workspace as *mut c_void,
            self.workspace_bytes,
            stream as ltsys::cudaStream_t,
        )
        .map_err(|e| lt_err("matmul", e))
    }

    /// The fastest of `plan`'s candidates on this call's inputs, each timed over 3 runs after a
    /// warm-up, writing scratch outputs (the caller's C, aux and bias gradient are untouched).
    unsafe fn fastest(
        &self,
        plan: &Plan,
        spec: &GemmSpec,
        out: GemmOut,
        p: &GemmPtrs,
        stream: *mut c_void,
    ) -> KernelResult<ltsys::cublasLtMatmulAlgo_t> {
        use cudarc::driver::{result as drv, sys as dsys};
        let c_elem = if out == GemmOut::F32Accumulate { 4 } else { 2 };
        let mut scratch = Vec::new();
        let mut alloc = |bytes: usize| -> KernelResult<u64> {
            let ptr = drv::malloc_sync(bytes.max(16)).map_err(|e| lt_err("tuning scratch", e))?;
            scratch.push(ptr);
            Ok(ptr)
        };
        let mut tp = *p;
        tp.c = alloc(spec.m * spec.n * c_elem)?;
        if spec.epilogue == EpilogueKind::GeluAuxBias {
            tp.aux = alloc(spec.m * spec.n * 2)?;
        }
        if matches!(
            spec.epilogue,
            EpilogueKind::DGeluBgrad | EpilogueKind::BgradB
        ) {
            tp.bias_grad = alloc(spec.m.max(spec.n) * 4)?;
        }
        let flags = dsys::CUevent_flags::CU_EVENT_DEFAULT;
        let events = (drv::event::create(flags), drv::event::create(flags));
        let s = stream as dsys::CUstream;
        let mut best: Option<(f32, ltsys::cublasLtMatmulAlgo_t)> = None;
        if let (Ok(e0), Ok(e1)) = events {
            for algo in &plan.candidates {
                let timed = (|| -> Result<f32, KernelError> {
                    self.run(plan, algo, spec, out, &tp, stream)?;
                    drv::event::record(e0, s).map_err(|e| lt_err("event", e))?;
                    for _ in 0..3 {
                        self.run(plan, algo, spec, out, &tp, stream)?;
                    }
                    drv::event::record(e1, s).map_err(|e| lt_err("event", e))?;
                    drv::event::synchronize(e1).map_err(|e| lt_err("event", e))?;
                    drv::event::elapsed(e0, e1).map_err(|e| lt_err("event", e))
                })();
                if let Ok(ms) = timed {
                    if best.is_none_or(|(b, _)| ms < b) {
                        best = Some((ms, *algo));
                    }
                }
            }
        }
        let _ = drv::stream::synchronize(s);
        if let Ok(e) = events.0 {
            let _ = drv::event::destroy(e);
        }
        if let Ok(e) = events.1 {
            let _ = drv::event::destroy(e);
        }
        for ptr in scratch {
            let _ = drv::free_sync(ptr);
        }
        best.map(|(_, a)| a)
            .ok_or_else(|| KernelError::Cuda("cuBLASLt tuning: no candidate ran".into()))
    }
}

/// Whether `stream` is being recorded into a graph (tuning synchronises, which a capture forbids).
fn capturing(stream: *mut c_void) -> bool {
    use cudarc::driver::sys as dsys;
    let mut status = dsys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: a query on a live stream.
    let r = unsafe { dsys::cuStreamIsCapturing(stream as dsys::CUstream, &mut status) };
    r != dsys::CUresult::CUDA_SUCCESS
        || status != dsys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
}

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
    /// The heuristic's other candidates, best first (`ADVDMD_GEMM_AUTOTUNE`: timed once).
    others: Vec<ltsys::cublasLtMatmulAlgo_t>,
}

/// `ADVDMD_GEMM_AUTOTUNE=1`: the first call of each GEMM shape outside a capture times the
/// heuristic's candidates (up to `AUTOTUNE_ALGOS`) on scratch operands and keeps the fastest.
/// The heuristic's first choice left context GEMMs of 666 rows at 355–476 TFLOP/s on an H100
/// (docs/perf-log.md, 2026-11-27) where the token GEMMs ran 627–807. Off by default until a card
/// has timed it.
fn autotune_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::device::kernel::env_flag("ADVDMD_GEMM_AUTOTUNE").unwrap_or(false))
}

const AUTOTUNE_ALGOS: usize = 8;

// SAFETY: descriptors are plain heap objects of cuBLASLt, used under the cache's mutex.
unsafe impl Send for Plan {}

pub struct Cublaslt {
    handle: ltsys::cublasLtHandle_t,
    /// `None`: no algorithm for an `F32Accumulate` call (asked once; the caller falls back).
    plans: Mutex<HashMap<(GemmSpec, GemmOut), Option<Plan>>>,
    /// One workspace per stream (main, side): GEMMs on both may run at once.
    workspaces: [u64; 2],
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
    /// Creates the handle and a 32 MiB workspace per stream; `alloc` gives device memory that lives as long
    /// as the runtime.
    pub fn new(alloc: impl Fn(usize) -> KernelResult<u64>) -> KernelResult<Cublaslt> {
        // SAFETY: only dlopens the library.
        if !unsafe { ltsys::is_culib_present() } {
            return Err(KernelError::Cuda("libcublasLt not found".into()));
        }
        let handle = lt::create_handle().map_err(|e| lt_err("create", e))?;
        let workspace_bytes = 32 << 20;
        Ok(Cublaslt {
            handle,
            plans: Mutex::new(HashMap::new()),
            workspaces: [alloc(workspace_bytes)?, alloc(workspace_bytes)?],
            workspace_bytes,
        })
    }

    pub fn workspace_ptr(&self) -> u64 {
        self.workspaces[0]
    }

    /// Both workspaces (the runtime frees them when it is dropped).
    pub fn workspaces(&self) -> [u64; 2] {
        self.workspaces
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
            GemmOut::F32Accumulate | GemmOut::F32Overwrite => {
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
                bias: self.workspaces[0],
                aux: self.workspaces[0],
                bias_grad: self.workspaces[0],
                ..Default::default()
            },
        )?;
        let wanted = if autotune_enabled() {
            AUTOTUNE_ALGOS
        } else {
            1
        };
        let mut results: Vec<ltsys::cublasLtMatmulHeuristicResult_t> =
            vec![std::mem::zeroed(); wanted];
        let mut found = 0i32;
        let status = ltsys::cublasLtMatmulAlgoGetHeuristic(
            self.handle,
            desc,
            layout_first,
            layout_second,
            layout_c,
            layout_c,
            pref,
            wanted as i32,
            results.as_mut_ptr(),
            &mut found,
        );
        let _ = lt::destroy_matmul_pref(pref);
        if status != ltsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || found < 1 {
            return Err(lt_err(&format!("no algorithm for {spec:?}"), status));
        }
        let mut algos = results[..found as usize]
            .iter()
            .filter(|r| r.state == ltsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo);
        let algo = algos
            .next()
            .ok_or_else(|| lt_err(&format!("no usable algorithm for {spec:?}"), status))?;
        Ok(Plan {
            desc,
            layout_first,
            layout_second,
            layout_c,
            algo,
            others: algos.collect(),
        })
    }

    /// Times `plan`'s candidates on scratch operands of `spec`'s sizes on `stream` (nothing the
    /// caller owns is read or written; `side`: the stream's own workspace, as the call's) and
    /// makes the fastest its algorithm. Any failure keeps the heuristic's choice.
    unsafe fn autotune(
        &self,
        plan: &mut Plan,
        spec: &GemmSpec,
        out: GemmOut,
        stream: *mut c_void,
        side: bool,
    ) {
        use cudarc::driver::{result as drv, sys as dsys};
        if plan.others.is_empty() {
            return;
        }
        let (m, n, k) = (spec.m, spec.n, spec.k);
        let c_bytes = m * n * if out == GemmOut::Bf16 { 2 } else { 4 };
        // A, B, C, the aux matrix (bf16 m × n) and a bias vector, each 256-byte aligned
        let sizes = [m * k * 2, k * n * 2, c_bytes, m * n * 2, 4 * m.max(n)];
        let round = |b: usize| b.div_ceil(256) * 256;
        let Ok(base) = drv::malloc_sync(sizes.iter().map(|&b| round(b)).sum()) else {
            return;
        };
        let mut at = base;
        let mut ptr = |b: usize| {
            let p = at;
            at += round(b) as u64;
            p
        };
        let (a, b, c, aux, vec) = (
            ptr(sizes[0]),
            ptr(sizes[1]),
            ptr(sizes[2]),
            ptr(sizes[3]),
            ptr(sizes[4]),
        );
        // operands of small finite values (the bf16 pattern 0x3c00: 2^-7), not zeros, which can
        // run faster than data (METHOD.md)
        let _ = dsys::cuMemsetD16Async(a, 0x3c00, m * k, stream as dsys::CUstream);
        let _ = dsys::cuMemsetD16Async(b, 0x3c00, k * n, stream as dsys::CUstream);
        let p = GemmPtrs {
            a,
            b,
            c,
            bias: vec,
            aux,
            bias_grad: vec,
        };
        let time = |algo: &ltsys::cublasLtMatmulAlgo_t| -> Option<f32> {
            let flags = dsys::CUevent_flags::CU_EVENT_DEFAULT;
            let (e0, e1) = (
                drv::event::create(flags).ok()?,
                drv::event::create(flags).ok()?,
            );
            let run = || self.launch(plan, spec, out, &p, algo, stream, side).is_ok();
            let mut best = f32::INFINITY;
            let ok = run()
                && (0..3).all(|_| {
                    let ok = drv::event::record(e0, stream as dsys::CUstream).is_ok()
                        && run()
                        && drv::event::record(e1, stream as dsys::CUstream).is_ok()
                        && drv::event::synchronize(e1).is_ok();
                    if let Ok(ms) = drv::event::elapsed(e0, e1) {
                        best = best.min(ms);
                    }
                    ok
                });
            let _ = drv::event::destroy(e0);
            let _ = drv::event::destroy(e1);
            ok.then_some(best)
        };
        let mut best = (time(&plan.algo).unwrap_or(f32::INFINITY), plan.algo);
        for algo in &plan.others {
            if let Some(ms) = time(algo) {
                if ms < best.0 {
                    best = (ms, *algo);
                }
            }
        }
        plan.algo = best.1;
        plan.others.clear();
        let _ = drv::stream::synchronize(stream as dsys::CUstream);
        let _ = drv::free_sync(base);
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

    /// Whether `spec` with `out` has been planned (its kernels chosen and loaded) already.
    pub fn has_plan(&self, spec: &GemmSpec, out: GemmOut) -> bool {
        let plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        plans.contains_key(&(*spec, out))
    }

    /// Queues `C = epilogue(op(A)·op(B))` (or `C += op(A)·op(B)`) on `stream`; `Ok(false)` when
    /// an `F32Accumulate` call has no algorithm.
    // `stream` is an opaque driver handle passed through to cuBLASLt, never dereferenced here
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn matmul(
        &self,
        spec: &GemmSpec,
        out: GemmOut,
        p: &GemmPtrs,
        stream: *mut c_void,
        side: bool,
        capturing: bool,
    ) -> KernelResult<bool> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let key = (*spec, out);
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                // SAFETY: the handle is live; the plan's objects are owned by the cache from here on.
                let plan = match (unsafe { self.plan(spec, out) }, out) {
                    (Ok(mut plan), _) => {
                        if autotune_enabled() && !capturing {
                            // SAFETY: as `plan`; the scratch operands are its own
                            unsafe { self.autotune(&mut plan, spec, out, stream, side) };
                        }
                        Some(plan)
                    }
                    (Err(_), GemmOut::F32Accumulate | GemmOut::F32Overwrite) => None,
                    (Err(e), GemmOut::Bf16) => return Err(e),
                };
                e.insert(plan)
            }
        };
        let Some(plan) = plan else {
            return Ok(false);
        };
        // SAFETY: pointers are device buffers of the sizes `spec` implies (checked by the
        // caller); the workspace is owned by the runtime.
        unsafe { self.launch(plan, spec, out, p, &plan.algo, stream, side) }?;
        Ok(true)
    }

    /// Queues one product with `algo` (the plan's, or a candidate being timed).
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch(
        &self,
        plan: &Plan,
        spec: &GemmSpec,
        out: GemmOut,
        p: &GemmPtrs,
        algo: &ltsys::cublasLtMatmulAlgo_t,
        stream: *mut c_void,
        side: bool,
    ) -> KernelResult<()> {
        let (alpha, beta) = match out {
            GemmOut::Bf16 => (1f32, 0f32),
            GemmOut::F32Accumulate => (1f32, 1f32),
            GemmOut::F32Overwrite => (1f32, 0f32),
        };
        // SAFETY: the caller's
        unsafe {
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
                self.workspaces[usize::from(side)] as *mut c_void,
                self.workspace_bytes,
                stream as ltsys::cudaStream_t,
            )
        }
        .map_err(|e| lt_err(&format!("matmul {spec:?} {out:?}"), e))
    }
}

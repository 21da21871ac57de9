//! CPU GEMM through the `gemm` crate: any row/column strides, so transposed operands cost nothing.

use gemm::Parallelism;

/// A strided matrix operand: `ptr[i * rs + j * cs]` is element (i, j).
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        MatRef {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn rows_t(data: &'a [f32], cols: usize) -> Self {
        MatRef {
            data,
            rs: 1,
            cs: cols,
        }
    }
    fn check(&self, r: usize, c: usize, what: &str) {
        if r > 0 && c > 0 {
            let last = (r - 1) * self.rs + (c - 1) * self.cs;
            assert!(
                last < self.data.len(),
                "gemm: operand {what} ({r}x{c}) reaches index {last} of {}",
                self.data.len()
            );
        }
    }
}

/// `c = alpha·a·b + (accumulate ? c : 0)`, `a` m×k, `b` k×n, `c` row-major m×n with row stride `ldc`.
/// `parallel` lets the GEMM use rayon; pass false when calling from inside a parallel loop.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        ldc >= n && c.len() >= (m - 1) * ldc + n,
        "gemm: output too small"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: `c` is exclusively borrowed and holds the m×n output at row stride `ldc` (checked).
    unsafe {
        gemm_into(
            m,
            n,
            k,
            alpha,
            a,
            b,
            c.as_mut_ptr(),
            ldc,
            accumulate,
            parallel,
        )
    }
}

/// `alpha·a·b` (`a` m×k, `b` k×n) into a new row-major m×n vector. The product is written into
/// the vector's fresh capacity: a zero fill first would cost a second pass over the output (a
/// single-threaded memset, ~5% of the CPU trainer's step).
pub fn sgemm_new(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: MatRef,
    b: MatRef,
    parallel: bool,
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    let mut c = Vec::with_capacity(m * n);
    // SAFETY: the capacity holds the m×n output at row stride n. Without `accumulate` (gemm's
    // `read_dst`) the GEMM writes every element before any read: its first k-panel stores
    // beta·product, later ones add onto that (gemm 0.19's microkernel, gemv and gevv paths all
    // branch on a zero dst factor), so all m·n values are initialised when the length is set.
    unsafe {
        gemm_into(m, n, k, alpha, a, b, c.as_mut_ptr(), n, false, parallel);
        c.set_len(m * n);
    }
    c
}

/// # Safety
/// `c` must be valid for reads and writes of the m×n output at row stride `ldc`, and not
/// aliased; with `accumulate` its elements must be initialised.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: MatRef,
    b: MatRef,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    a.check(m, k, "a");
    b.check(k, n, "b");
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 && m * n * k >= super::PARALLEL_MIN_WORK * 4 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the operands' bounds were checked above, the output's by the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// Naive triple loop, the reference the tests hold `sgemm` to.
pub fn sgemm_naive(m: usize, n: usize, k: usize, a: MatRef, b: MatRef) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                s += a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
            }
            c[i * n + j] = s as f32;
        }
    }
    c
}

/// GEMMs on a [`KernelDevice`]: cuBLASLt on a GPU; under the emulator the same call runs on the
/// CPU GEMM above (CUDA.md §4: the emulator does not emulate tensor-core libraries), reading and
/// writing the emulator's host-memory buffers, so model code is identical on both.
pub mod dev {
    use super::{sgemm, MatRef};
    use crate::device::kernel::{
        DevBuf, EpilogueKind, GemmOut, GemmPtrs, GemmSpec, KernelArgs, KernelDevice, KernelError,
        KernelResult, LaunchCfg,
    };
    use half::bf16;

    /// Extra buffers an epilogue reads or writes.
    #[derive(Clone, Copy, Default)]
    pub struct EpilogueBufs<'a> {
        /// `[N]` bias (Bias, GeluBias, GeluAuxBias).
        pub bias: Option<&'a DevBuf<bf16>>,
        /// `[M, N]` GELU pre-activation: written by GeluAuxBias, read by DGeluBgrad.
        pub aux: Option<&'a DevBuf<bf16>>,
        /// Bias gradient: `[N]` for DGeluBgrad, `[M]` for BgradB.
        pub bias_grad: Option<&'a DevBuf<bf16>>,
    }

    const GELU_C: f32 = 0.797_884_6; // √(2/π)

    pub fn gelu_tanh(x: f32) -> f32 {
        0.5 * x * (1.0 + (GELU_C * (x + 0.044715 * x * x * x)).tanh())
    }

    pub fn gelu_tanh_grad(x: f32) -> f32 {
        let t = (GELU_C * (x + 0.044715 * x * x * x)).tanh();
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
    }

    fn need<'a>(
        b: Option<&'a DevBuf<bf16>>,
        len: usize,
        what: &str,
    ) -> KernelResult<&'a DevBuf<bf16>> {
        let b = b.ok_or_else(|| KernelError::Invalid(format!("gemm: epilogue needs {what}")))?;
        if b.len() < len {
            return Err(KernelError::Invalid(format!(
                "gemm: {what} holds {} < {len}",
                b.len()
            )));
        }
        Ok(b)
    }

    /// `c = epilogue(op(a)·op(b))` (see [`GemmSpec`]); bf16 buffers, f32 accumulation.
    pub fn gemm_bf16(
        dev: &KernelDevice,
        spec: GemmSpec,
        a: &DevBuf<bf16>,
        b: &DevBuf<bf16>,
        c: &DevBuf<bf16>,
        ep: EpilogueBufs,
    ) -> KernelResult<()> {
        gemm_bf16_via(dev, spec, a, b, c, ep, SmallProducts::Fastest)
    }

    /// Where the products over at most 8 rows go: our memory-bound kernels (`gemv_small_m`,
    /// `gemv_small_m_nn_partial`, `weight_grad_small_k`) or the library (cuBLASLt; the CPU GEMM
    /// under the emulator), the `kernels` bench's same-run reference for those kernels.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum SmallProducts {
        /// What the model uses: each product where it was measured faster (docs/perf-log.md,
        /// H100, 2026-11-28, `kernels` bench at 1–2 × 9216 × 1536): cuBLASLt for the gemv
        /// (12.1 against 13.9–16.6 µs) and the input gradient (14.0 against 17.6–19.1 µs), ours
        /// for the weight gradient (41.0 against 66.1–69.0 µs).
        Fastest,
        OwnKernels,
        Library,
    }

    impl SmallProducts {
        /// Our kernels for the products over few rows of M (the gemv, the NN input gradient).
        fn own_small_m(self) -> bool {
            self == SmallProducts::OwnKernels
        }

        /// Ours for the weight gradient over few rows (K ≤ 8).
        fn own_weight_grad(self) -> bool {
            self != SmallProducts::Library
        }
    }

    /// [`gemm_bf16`] with the small products sent `via`.
    pub fn gemm_bf16_via(
        dev: &KernelDevice,
        spec: GemmSpec,
        a: &DevBuf<bf16>,
        b: &DevBuf<bf16>,
        c: &DevBuf<bf16>,
        ep: EpilogueBufs,
        via: SmallProducts,
    ) -> KernelResult<()> {
        let GemmSpec { m, n, k, .. } = spec;
        if a.len() < m * k || b.len() < k * n || c.len() < m * n {
            return Err(KernelError::Invalid(format!(
                "gemm {spec:?}: operands hold {}, {}, {} elements",
                a.len(),
                b.len(),
                c.len()
            )));
        }
        if via.own_small_m() && small_m_gemv(&spec, a, b) && m > 0 && n > 0 {
            let bias = match spec.epilogue {
                EpilogueKind::Bias => Some(need(ep.bias, n, "bias")?),
                _ => None,
            };
            // a memory-bound read of the weight: its own kernel (`gemv_small_m`), credited its
            // FLOPs in a profile
            dev.count_matmul_flops(2 * (m * n * k) as u64);
            let args = KernelArgs::new().buf(c).buf(a).buf(b);
            let args = match bias {
                Some(bias) => args.buf(bias),
                None => args.null(),
            };
            return dev.launch(
                "gemv_small_m",
                LaunchCfg::linear(n.div_ceil(8) as u32, 256),
                args.i32(m as i32).i32(n as i32).i32(k as i32),
            );
        }
        dev.count_gemm_flops(2 * (m * n * k) as u64);
        let mut ptrs = GemmPtrs {
            a: a.device_ptr(),
            b: b.device_ptr(),
            c: c.device_ptr(),
            ..Default::default()
        };
        use EpilogueKind as E;
        if matches!(spec.epilogue, E::Bias | E::GeluBias | E::GeluAuxBias) {
            ptrs.bias = need(ep.bias, n, "bias")?.device_ptr();
        }
        if matches!(spec.epilogue, E::GeluAuxBias | E::DGeluBgrad) {
            ptrs.aux = need(ep.aux, m * n, "aux")?.device_ptr();
        }
        match spec.epilogue {
            E::DGeluBgrad => ptrs.bias_grad = need(ep.bias_grad, n, "bias_grad")?.device_ptr(),
            E::BgradB => ptrs.bias_grad = need(ep.bias_grad, m, "bias_grad")?.device_ptr(),
            _ => {}
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if let Some(r) = dev.gpu_gemm(&spec, &ptrs, GemmOut::Bf16) {
            return r.map(|_| ());
        }
        // the emulator's GEMM runs on the host, or is recorded into a running capture
        let (a, b, c) = (a.alias(), b.alias(), c.alias());
        let alias = |x: Option<&DevBuf<bf16>>| x.map(DevBuf::alias);
        let (bias, aux, bias_grad) = (alias(ep.bias), alias(ep.aux), alias(ep.bias_grad));
        let d = dev.clone();
        let touches = [Some(&a), Some(&b), Some(&c), bias.as_ref(), aux.as_ref()]
            .into_iter()
            .flatten()
            .map(DevBuf::span)
            .chain(bias_grad.as_ref().map(DevBuf::span))
            .collect();
        dev.emulated_host_step((&spec, GemmOut::Bf16), touches, move || {
            let ep = EpilogueBufs {
                bias: bias.as_ref(),
                aux: aux.as_ref(),
                bias_grad: bias_grad.as_ref(),
            };
            gemm_cpu(&d, spec, &a, &b, &c, &ep)
        })
    }

    /// An MLP's backward through its GELU: `dpre = (dy·w) ⊙ GELU′(pre)` with `dy [M, K]`,
    /// `w [K, N]` (NN), `pre`, `dpre [M, N]`, and with `bias_grad` (f32 `[N]`) the column sums
    /// of `dpre` added into it — what the DGeluBgrad epilogue computes, as a plain GEMM and then
    /// GELU′ with the column sums in the same pass (`gelu_tanh_bwd_colsum`): on an H200
    /// cuBLASLt's DGeluBgrad GEMM ran the SD3.5-medium MLP's [4096 × 6144 × 1536] at 292
    /// TFLOP/s against ~700–800 for the plain GEMMs of the same size (docs/perf-log.md,
    /// 2026-11-27). `dh` (`[M, N]` bf16) holds the product.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16_dgelu(
        dev: &KernelDevice,
        (m, n, k): (usize, usize, usize),
        dy: &DevBuf<bf16>,
        w: &DevBuf<bf16>,
        pre: &DevBuf<bf16>,
        dh: &DevBuf<bf16>,
        dpre: &DevBuf<bf16>,
        bias_grad: Option<&DevBuf<f32>>,
    ) -> KernelResult<()> {
        use crate::kernels::elementwise::{dev as ew, Activation};
        let spec = GemmSpec::nn(m, n, k);
        if pre.len() != m * n || dh.len() != m * n || dpre.len() != m * n {
            return Err(KernelError::Invalid(format!(
                "gemm_bf16_dgelu [{m} × {n} × {k}]: pre {}, dh {}, dpre {}",
                pre.len(),
                dh.len(),
                dpre.len()
            )));
        }
        gemm_bf16(dev, spec, dy, w, dh, EpilogueBufs::default())?;
        match bias_grad {
            Some(g) => ew::gelu_tanh_bwd_colsum(dev, dpre, pre, dh, (m, n), g),
            None => ew::activation_bwd_into(dev, dpre, pre, dh, Activation::GeluTanh),
        }
    }

    /// Whether [`gemm_bf16`] runs `spec` as `gemv_small_m`: a linear layer (`a·bᵀ`, epilogue
    /// `None` or `Bias`) over at most 8 rows — bound by reading the weight, where cuBLASLt ran at
    /// 45% of the copy rate — with `k % 8 == 0` and `a`, `b` 16-byte aligned.
    fn small_m_gemv(spec: &GemmSpec, a: &DevBuf<bf16>, b: &DevBuf<bf16>) -> bool {
        !spec.trans_a
            && spec.trans_b
            && spec.m <= 8
            && spec.k % 8 == 0
            && matches!(spec.epilogue, EpilogueKind::None | EpilogueKind::Bias)
            && a.device_ptr() % 16 == 0
            && b.device_ptr() % 16 == 0
    }

    /// Whether [`gemm_bf16_acc_f32`] runs `spec` as `gemv_small_m_nn_partial` (which sums its
    /// own splits, or `sum_splits` after it: `ColumnSums`):
    /// `a·b` (no transposes, no epilogue) over at most 8 rows of `a` — a modulation layer's
    /// input gradient, bound by reading the weight `b` along its rows — with `n % 8 == 0` and `b`
    /// 16-byte aligned.
    fn small_m_nn(spec: &GemmSpec, b: &DevBuf<bf16>) -> bool {
        !spec.trans_a
            && !spec.trans_b
            && (1..=8).contains(&spec.m)
            && spec.n % 8 == 0
            && spec.k > 0
            && spec.epilogue == EpilogueKind::None
            && b.device_ptr() % 16 == 0
    }

    /// Splits of `gemv_small_m_nn_partial` along K: about two blocks per SM of a 132-SM card
    /// over the 256-column tiles, at least 8 rows a split — from the shape alone, so the sums
    /// are the same on every card.
    fn nn_splits(n: usize, k: usize) -> usize {
        let tiles = n.div_ceil(256);
        264usize.div_ceil(tiles).clamp(1, k.div_ceil(8).max(1))
    }

    /// Whether [`gemm_bf16_acc_f32`] runs `spec` as `weight_grad_small_k`: a weight gradient
    /// (`aᵀ·b`) over at most 8 rows — an outer product, bound by reading and writing the f32
    /// gradient, where cuBLASLt ran at 40% of the copy rate — with `n % 8 == 0` and `b`, `c`
    /// 16-byte aligned.
    fn small_k_weight_grad(spec: &GemmSpec, b: &DevBuf<bf16>, c: &DevBuf<f32>) -> bool {
        spec.trans_a
            && !spec.trans_b
            && (1..=8).contains(&spec.k)
            && spec.n % 8 == 0
            && spec.m <= 65535
            && b.device_ptr() % 16 == 0
            && c.device_ptr() % 16 == 0
    }

    /// `c += op(a)·op(b)` into the f32 buffer `c` — a linear layer's weight gradient added
    /// straight into its f32 gradient, with no bf16 rounding of the product and no second pass
    /// (the bf16 product plus `accumulate_f32_bf16` took 6.5% of an SD3.5-medium backward,
    /// docs/perf-log.md). Epilogue `None`, or `BgradB` with the bias gradient added into
    /// `bias_acc` (f32, length M). Where cuBLASLt has no algorithm for the f32 output the bf16
    /// product is accumulated instead.
    pub fn gemm_bf16_acc_f32(
        dev: &KernelDevice,
        spec: GemmSpec,
        a: &DevBuf<bf16>,
        b: &DevBuf<bf16>,
        c: &DevBuf<f32>,
        bias_acc: Option<&DevBuf<f32>>,
    ) -> KernelResult<()> {
        gemm_bf16_f32(dev, spec, a, b, c, bias_acc, false, SmallProducts::Fastest)
    }

    /// [`gemm_bf16_acc_f32`], or with `overwrite` `c = op(a)·op(b)` (β = 0: `c` is neither read
    /// nor needs zeroing; a gradient's first write since `DeviceParams::zero_grad`), the small
    /// products sent `via`. The bias gradient is added into `bias_acc` either way.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16_f32(
        dev: &KernelDevice,
        spec: GemmSpec,
        a: &DevBuf<bf16>,
        b: &DevBuf<bf16>,
        c: &DevBuf<f32>,
        bias_acc: Option<&DevBuf<f32>>,
        overwrite: bool,
        via: SmallProducts,
    ) -> KernelResult<()> {
        use crate::kernels::shape::dev::{accumulate_bf16, accumulate_f32};
        let out_kind = if overwrite {
            GemmOut::F32Overwrite
        } else {
            GemmOut::F32Accumulate
        };
        let GemmSpec { m, n, k, .. } = spec;
        let bias = match (spec.epilogue, bias_acc) {
            (EpilogueKind::None, None) => false,
            (EpilogueKind::BgradB, Some(g)) if g.len() == m => true,
            _ => {
                return Err(KernelError::Invalid(format!(
                "gemm_acc_f32 {spec:?}: epilogue None, or BgradB with an f32 bias gradient of {m}"
            )))
            }
        };
        if a.len() < m * k || b.len() < k * n || c.len() < m * n {
            return Err(KernelError::Invalid(format!(
                "gemm_acc_f32 {spec:?}: operands hold {}, {}, {} elements",
                a.len(),
                b.len(),
                c.len()
            )));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if via.own_small_m() && small_m_nn(&spec, b) && !bias {
            // a memory-bound read of the weight along its rows (a modulation layer's input
            // gradient): split partials, summed into c
            dev.count_matmul_flops(2 * (m * n * k) as u64);
            let splits = nn_splits(n, k);
            let rows = k.div_ceil(splits);
            let part = dev.alloc::<f32>(splits * m * n)?;
            let cfg = LaunchCfg {
                grid: [n.div_ceil(256) as u32, splits as u32, 1],
                block: [256, 1, 1],
                shared_bytes: (8 * m * 256 * 4) as u32,
            };
            let args = KernelArgs::new()
                .buf(&part)
                .buf(a)
                .buf(b)
                .i32(m as i32)
                .i32(n as i32)
                .i32(k as i32)
                .i32(rows as i32);
            use crate::kernels::adaln::dev::{column_sums, sum_splits_acc, ColumnSums};
            if column_sums() == ColumnSums::InKernel {
                let tickets = dev.column_tickets(cfg.grid[0] as usize)?;
                let args = args.buf(c).i32(i32::from(!overwrite)).buf(&tickets);
                return dev.launch("gemv_small_m_nn_partial", cfg, args);
            }
            dev.launch("gemv_small_m_nn_partial", cfg, args.null().i32(0).null())?;
            return sum_splits_acc(dev, c, &part, splits, !overwrite);
        }
        if via.own_weight_grad() && small_k_weight_grad(&spec, b, c) {
            // a memory-bound outer product: its own kernel (`weight_grad_small_k`), named as such
            // in a profile, credited its FLOPs
            dev.count_matmul_flops(2 * (m * n * k) as u64);
            let args = KernelArgs::new().buf(c);
            let args = match bias_acc {
                Some(g) => args.buf(g),
                None => args.null(),
            };
            return dev.launch(
                "weight_grad_small_k",
                LaunchCfg {
                    grid: [(n / 8).div_ceil(128) as u32, m as u32, 1],
                    block: [128, 1, 1],
                    shared_bytes: 0,
                },
                args.buf(a)
                    .buf(b)
                    .i32(k as i32)
                    .i32(m as i32)
                    .i32(n as i32)
                    .i32(overwrite.into()),
            );
        }
        let bias_out = if bias {
            Some(dev.alloc::<f32>(m)?)
        } else {
            None
        };
        let ptrs = GemmPtrs {
            a: a.device_ptr(),
            b: b.device_ptr(),
            c: c.device_ptr(),
            bias_grad: bias_out.as_ref().map_or(0, |g| g.device_ptr()),
            ..Default::default()
        };
        match dev.gpu_gemm(&spec, &ptrs, out_kind) {
            Some(Ok(true)) => dev.count_gemm_flops(2 * (m * n * k) as u64),
            Some(Ok(false)) => {
                // no f32-output algorithm: the bf16 product, then accumulated
                let d = dev.alloc::<bf16>(m * n)?;
                let db = if bias {
                    Some(dev.alloc::<bf16>(m)?)
                } else {
                    None
                };
                let ep = EpilogueBufs {
                    bias_grad: db.as_ref(),
                    ..Default::default()
                };
                gemm_bf16(dev, spec, a, b, &d, ep)?;
                if overwrite {
                    dev.memset_zero(&*c.view(0, m * n)?)?;
                }
                accumulate_bf16(dev, c, &d)?;
                if let (Some(db), Some(g)) = (db, bias_acc) {
                    accumulate_bf16(dev, g, &db)?;
                }
                return Ok(());
            }
            Some(Err(e)) => return Err(e),
            None => {
                dev.count_gemm_flops(2 * (m * n * k) as u64);
                let (a, b, c) = (a.alias(), b.alias(), c.alias());
                let out = bias_out.as_ref().map(DevBuf::alias);
                let d = dev.clone();
                let mut touches = vec![a.span(), b.span(), c.span()];
                touches.extend(out.as_ref().map(DevBuf::span));
                dev.emulated_host_step((&spec, out_kind), touches, move || {
                    gemm_acc_cpu(&d, spec, &a, &b, &c, out.as_ref(), overwrite)
                })?;
            }
        }
        if let (Some(out), Some(g)) = (bias_out, bias_acc) {
            accumulate_f32(dev, g, &out)?;
        }
        Ok(())
    }

    /// The emulator's [`gemm_bf16_f32`]: the f32 product of the bf16 operands added into `c`
    /// (written over it with `overwrite`, `c` unread), the bias gradient (row sums of op(A))
    /// written to `bias_out`.
    fn gemm_acc_cpu(
        dev: &KernelDevice,
        spec: GemmSpec,
        a: &DevBuf<bf16>,
        b: &DevBuf<bf16>,
        c: &DevBuf<f32>,
        bias_out: Option<&DevBuf<f32>>,
        overwrite: bool,
    ) -> KernelResult<()> {
        let (m, n) = (spec.m, spec.n);
        let (av, bv) = (to_f32(dev, a)?, to_f32(dev, b)?);
        let mut out = if overwrite {
            vec![0f32; c.len()]
        } else {
            dev.download(c)?
        };
        if overwrite && c.len() > m * n {
            // only the product's elements are written
            out[m * n..].copy_from_slice(&dev.download(c)?[m * n..]);
        }
        cpu_product(spec, &av, &bv, &mut out[..m * n], !overwrite);
        dev.copy_to_device(&out, c)?;
        if let Some(g) = bias_out {
            dev.copy_to_device(&row_sums_of_a(spec, &av), g)?;
        }
        Ok(())
    }

    /// `out (+)= op(a)·op(b)` in f32 on the host.
    fn cpu_product(spec: GemmSpec, av: &[f32], bv: &[f32], out: &mut [f32], accumulate: bool) {
        let GemmSpec { m, n, k, .. } = spec;
        let am = if spec.trans_a {
            MatRef::rows_t(av, m)
        } else {
            MatRef::rows(av, k)
        };
        let bm = if spec.trans_b {
            MatRef::rows_t(bv, k)
        } else {
            MatRef::rows(bv, n)
        };
        sgemm(m, n, k, 1.0, am, bm, out, n, accumulate, true);
    }

    /// BGRADB's bias gradient: `Σ_k op(A)[i, k]` for each of the M rows.
    fn row_sums_of_a(spec: GemmSpec, av: &[f32]) -> Vec<f32> {
        let GemmSpec { m, k, .. } = spec;
        (0..m)
            .map(|i| {
                (0..k)
                    .map(|j| av[if spec.trans_a { j * m + i } else { i * k + j }])
                    .sum()
            })
            .collect()
    }

    fn to_f32(dev: &KernelDevice, b: &DevBuf<bf16>) -> KernelResult<Vec<f32>> {
        Ok(dev.download(b)?.iter().map(|x| x.to_f32()).collect())
    }

    fn store(dev: &KernelDevice, b: &DevBuf<bf16>, v: &[f32]) -> KernelResult<()> {
        let mut host = dev.download(b)?;
        for (h, &x) in host.iter_mut().zip(v) {
            *h = bf16::from_f32(x);
        }
        dev.copy_to_device(&host, b)
    }

    /// The emulator's GEMM: f32 product of the bf16 operands, epilogue in f32, bf16 outputs.
    fn gemm_cpu(
        dev: &KernelDevice,
        spec: GemmSpec,
        a: &DevBuf<bf16>,
        b: &DevBuf<bf16>,
        c: &DevBuf<bf16>,
        ep: &EpilogueBufs,
    ) -> KernelResult<()> {
        let GemmSpec { m, n, .. } = spec;
        let (av, bv) = (to_f32(dev, a)?, to_f32(dev, b)?);
        let mut out = vec![0f32; m * n];
        cpu_product(spec, &av, &bv, &mut out, false);
        let bias = match ep.bias {
            Some(bb)
                if matches!(
                    spec.epilogue,
                    EpilogueKind::Bias | EpilogueKind::GeluBias | EpilogueKind::GeluAuxBias
                ) =>
            {
                to_f32(dev, bb)?
            }
            _ => vec![0f32; n],
        };
        match spec.epilogue {
            EpilogueKind::None => {}
            EpilogueKind::Bias => out
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v += bias[i % n]),
            EpilogueKind::Gelu => out.iter_mut().for_each(|v| *v = gelu_tanh(*v)),
            EpilogueKind::GeluBias => out
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = gelu_tanh(*v + bias[i % n])),
            EpilogueKind::GeluAuxBias => {
                let pre: Vec<f32> = out
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v + bias[i % n])
                    .collect();
                store(dev, ep.aux.expect("checked"), &pre)?;
                out = pre.iter().map(|&x| gelu_tanh(x)).collect();
            }
            EpilogueKind::DGeluBgrad => {
                let aux = to_f32(dev, ep.aux.expect("checked"))?;
                let mut grad = vec![0f32; n];
                for (i, v) in out.iter_mut().enumerate() {
                    *v *= gelu_tanh_grad(aux[i]);
                    grad[i % n] += *v;
                }
                store(dev, ep.bias_grad.expect("checked"), &grad)?;
            }
            EpilogueKind::BgradB => {
                store(
                    dev,
                    ep.bias_grad.expect("checked"),
                    &row_sums_of_a(spec, &av),
                )?;
            }
        }
        store(dev, c, &out)
    }
}

//! adaLN: LayerNorm without affine parameters fused with the adaLN modulation
//! `x̂·(1+scale)+shift` (MMDIT.md A.3, eps 1e-6), and the gated residual `x + g·y`. Both take
//! per-sample modulation vectors `[B, D]` broadcast over the tokens of `[B, L, D]`.

use crate::tensor::Tensor;
use rayon::prelude::*;

/// Saved statistics of a LayerNorm: per token mean and reciprocal standard deviation.
pub struct LnStats {
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

fn dims3(x: &Tensor, what: &str) -> (usize, usize, usize) {
    match *x.shape() {
        [b, l, d] => (b, l, d),
        ref s => panic!("{what}: expected [B, L, D], got {s:?}"),
    }
}

fn check_mod(m: &Tensor, b: usize, d: usize, what: &str) {
    assert_eq!(
        m.shape(),
        [b, d],
        "{what}: modulation must be [B, D] = [{b}, {d}]"
    );
}

/// `y = LN(x)·(1+scale)+shift` for `x [B, L, D]`, `shift, scale [B, D]`.
pub fn adaln_modulate_fwd(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f32,
) -> (Tensor, LnStats) {
    let (b, l, d) = dims3(x, "adaln_modulate");
    check_mod(shift, b, d, "adaln_modulate shift");
    check_mod(scale, b, d, "adaln_modulate scale");
    let (xs, sh, sc) = (x.f32s(), shift.f32s(), scale.f32s());
    let mut y = vec![0f32; xs.len()];
    let mut mean = vec![0f32; b * l];
    let mut rstd = vec![0f32; b * l];
    if d > 0 {
        y.par_chunks_mut(d)
            .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
            .enumerate()
            .for_each(|(t, (y, (m, r)))| {
                let row = &xs[t * d..(t + 1) * d];
                let mu = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                let var = row.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / d as f64;
                let rs = 1.0 / (var + eps as f64).sqrt();
                let (mu, rs) = (mu as f32, rs as f32);
                let s = t / l;
                let (sh, sc) = (&sh[s * d..(s + 1) * d], &sc[s * d..(s + 1) * d]);
                for j in 0..d {
                    y[j] = (row[j] - mu) * rs * (1.0 + sc[j]) + sh[j];
                }
                *m = mu;
                *r = rs;
            });
    }
    (Tensor::from_vec(y, x.shape()), LnStats { mean, rstd })
}

/// Gradients of [`adaln_modulate_fwd`]: (dx, dshift, dscale).
pub fn adaln_modulate_bwd(
    x: &Tensor,
    scale: &Tensor,
    stats: &LnStats,
    dy: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let (b, l, d) = dims3(x, "adaln_modulate_bwd");
    let (xs, sc, g) = (x.f32s(), scale.f32s(), dy.f32s());
    let mut dx = vec![0f32; xs.len()];
    // Per sample: dshift = Σ_l dy, dscale = Σ_l dy·x̂, reduced per sample to stay deterministic.
    let mut dshift = vec![0f32; b * d];
    let mut dscale = vec![0f32; b * d];
    if d > 0 && l > 0 {
        dx.par_chunks_mut(l * d)
            .zip(dshift.par_chunks_mut(d).zip(dscale.par_chunks_mut(d)))
            .enumerate()
            .for_each(|(s, (dx, (dsh, dsc)))| {
                let sc = &sc[s * d..(s + 1) * d];
                let mut xhat = vec![0f32; d];
                let mut dxhat = vec![0f32; d];
                for t in 0..l {
                    let tok = s * l + t;
                    let (mu, rs) = (stats.mean[tok], stats.rstd[tok]);
                    let row = &xs[tok * d..(tok + 1) * d];
                    let gr = &g[tok * d..(tok + 1) * d];
                    let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                    for j in 0..d {
                        xhat[j] = (row[j] - mu) * rs;
                        dsh[j] += gr[j];
                        dsc[j] += gr[j] * xhat[j];
                        dxhat[j] = gr[j] * (1.0 + sc[j]);
                        sum_g += dxhat[j] as f64;
                        sum_gx += (dxhat[j] * xhat[j]) as f64;
                    }
                    let (mg, mgx) = ((sum_g / d as f64) as f32, (sum_gx / d as f64) as f32);
                    let out = &mut dx[t * d..(t + 1) * d];
                    for j in 0..d {
                        out[j] = rs * (dxhat[j] - mg - xhat[j] * mgx);
                    }
                }
            });
    }
    (
        Tensor::from_vec(dx, x.shape()),
        Tensor::from_vec(dshift, &[b, d]),
        Tensor::from_vec(dscale, &[b, d]),
    )
}

/// `x + g·y` for `x, y [B, L, D]`, `g [B, D]`.
pub fn gated_residual_fwd(x: &Tensor, gate: &Tensor, y: &Tensor) -> Tensor {
    let (b, l, d) = dims3(x, "gated_residual");
    assert_eq!(
        x.shape(),
        y.shape(),
        "gated_residual: x and y shapes differ"
    );
    check_mod(gate, b, d, "gated_residual gate");
    let (xs, gs, ys) = (x.f32s(), gate.f32s(), y.f32s());
    let mut out = vec![0f32; xs.len()];
    if d > 0 {
        out.par_chunks_mut(d).enumerate().for_each(|(t, o)| {
            let g = &gs[(t / l) * d..(t / l + 1) * d];
            for j in 0..d {
                o[j] = xs[t * d + j] + g[j] * ys[t * d + j];
            }
        });
    }
    Tensor::from_vec(out, x.shape())
}

/// Gradients of [`gated_residual_fwd`]: (dgate, dy); dx is the incoming gradient itself.
pub fn gated_residual_bwd(gate: &Tensor, y: &Tensor, dz: &Tensor) -> (Tensor, Tensor) {
    let (b, l, d) = dims3(y, "gated_residual_bwd");
    let (gs, ys, g) = (gate.f32s(), y.f32s(), dz.f32s());
    let mut dy = vec![0f32; ys.len()];
    let mut dgate = vec![0f32; b * d];
    if d > 0 && l > 0 {
        dy.par_chunks_mut(l * d)
            .zip(dgate.par_chunks_mut(d))
            .enumerate()
            .for_each(|(s, (dy, dg))| {
                let gate = &gs[s * d..(s + 1) * d];
                for t in 0..l {
                    let base = (s * l + t) * d;
                    for j in 0..d {
                        dy[t * d + j] = gate[j] * g[base + j];
                        dg[j] += g[base + j] * ys[base + j];
                    }
                }
            });
    }
    (
        Tensor::from_vec(dgate, &[b, d]),
        Tensor::from_vec(dy, y.shape()),
    )
}

/// Launchers of `cuda/adaln.cu` on a [`KernelDevice`] (a GPU, or the emulator in CI). Tensors
/// are bf16 device buffers of `[B, L, D]` (x, y) and `[B, D]` (modulation); statistics f32.
pub mod dev {
    use crate::device::kernel::{
        blocks_for, DevBuf, KernelArgs, KernelDevice, KernelResult, LaunchCfg,
    };
    use half::bf16;

    const ROWS_PER_BLOCK: u32 = 4;

    /// Splits of the token axis for the one-column-a-thread reductions (the scalar kernels and
    /// [`ColumnLayout::OneLane`]): enough blocks to fill a GPU, few enough partial rows to keep
    /// the final sum cheap.
    fn splits(b: usize, l: usize, d: usize) -> usize {
        let cols = if d % 8 == 0 { d / 8 } else { d };
        let col_blocks = cols.div_ceil(128).max(1);
        (1024 / (col_blocks * b.max(1))).clamp(1, l.max(1)).min(256)
    }

    /// How the 16-byte column kernels (`adaln_modulate_bwd_params_vec`, `gated_residual_bwd_vec`,
    /// `colsum_partial_vec`, `gelu_tanh_bwd_colsum`) spread a `[B, L, D]` tensor over threads.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum ColumnLayout {
        /// Blocks of 32 packs × 8 row lanes, each split ≥ 32 rows, one wave of
        /// [`LANE_BLOCKS_PER_SM`] blocks an SM: the partials stay a few percent of the input (the
        /// default).
        RowLanes,
        /// The first layout: 128 packs a block, one lane, up to 256 splits — at 2 × 1024 tokens
        /// its f32 partials were as large as the bf16 input. Kept for the kernels bench's A/B.
        OneLane,
    }

    static ONE_LANE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// Sets the layout of every later column-kernel launch in this process (the kernels bench
    /// times both; everything else keeps the default).
    pub fn set_column_layout(layout: ColumnLayout) {
        ONE_LANE.store(
            layout == ColumnLayout::OneLane,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn column_layout() -> ColumnLayout {
        if ONE_LANE.load(std::sync::atomic::Ordering::Relaxed) {
            ColumnLayout::OneLane
        } else {
            ColumnLayout::RowLanes
        }
    }

    /// Resident blocks an SM of the row-lane kernels (`LANE_BLOCKS_PER_SM` in column_lanes.cuh,
    /// their launch bound).
    const LANE_BLOCKS_PER_SM: usize = 3;

    /// Rows a split of [`ColumnLayout::RowLanes`] spans at least: 8 lanes × `COLUMN_ROWS` (4),
    /// one batch of loads a lane.
    const MIN_SPLIT_ROWS: usize = 32;

    /// The launch of the 16-byte column kernels (cuda/column_lanes.cuh) over `b` samples of `l`
    /// rows of `d` (`d % 8 == 0`), and its number of splits a sample. Row lanes: as many splits
    /// as one wave of resident blocks holds (rounded down: a second wave of a few blocks would
    /// double the time), none under [`MIN_SPLIT_ROWS`] rows.
    pub(crate) fn pack_cols_plan(
        dev: &KernelDevice,
        b: usize,
        l: usize,
        d: usize,
    ) -> (LaunchCfg, usize) {
        let packs = d / 8;
        let (x, y, s) = match column_layout() {
            ColumnLayout::OneLane => (128, 1, splits(b, l, d)),
            ColumnLayout::RowLanes => {
                let col_blocks = packs.div_ceil(32).max(1);
                let wave = LANE_BLOCKS_PER_SM * dev.sm_count().max(1);
                let s =
                    (wave / (col_blocks * b.max(1))).clamp(1, l.div_ceil(MIN_SPLIT_ROWS).max(1));
                (32, 8, s)
            }
        };
        let cfg = LaunchCfg {
            grid: [packs.div_ceil(x).max(1) as u32, b as u32, s as u32],
            block: [x as u32, y, 1],
            shared_bytes: 0,
        };
        (cfg, s)
    }

    /// Who sums the partial rows of the row-lane column kernels (cuda/column_lanes.cuh), of the
    /// RMSNorm backward's weight gradient (cuda/qknorm.cu) and of `gemv_small_m_nn_partial`,
    /// and the ρ-step's per-sample partials into its log-probabilities (cuda/sde.cu).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum ColumnSums {
        /// The kernel's last block of each column slice, counted by tickets
        /// ([`KernelDevice::column_tickets`]): no launch after it, but 2–11 µs slower a call
        /// than the launch it saves on the H100 (docs/perf-log.md, 2026-11-28), so not the
        /// default.
        InKernel,
        /// A `sum_splits` launch after the kernel (the default).
        SumSplits,
    }

    static IN_KERNEL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// Sets who sums the column partials in every later launch in this process (the kernels
    /// bench times both; everything else keeps the default).
    pub fn set_column_sums(sums: ColumnSums) {
        IN_KERNEL.store(
            sums == ColumnSums::InKernel,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub(crate) fn column_sums() -> ColumnSums {
        if IN_KERNEL.load(std::sync::atomic::Ordering::Relaxed) {
            ColumnSums::InKernel
        } else {
            ColumnSums::SumSplits
        }
    }

    /// One accumulator's destination in a row-lane column kernel: `out` (f32) gets the column
    /// sums, added to it when `accumulate`; `whole`: one row `[D]` over every sample's rows, else
    /// `[B, D]`, each sample's own.
    #[derive(Clone, Copy)]
    pub(crate) struct ColumnOut<'a> {
        pub out: &'a DevBuf<f32>,
        pub accumulate: bool,
        pub whole: bool,
    }

    /// Launches a row-lane column kernel (`args`: its operands up to its partials' shape) whose
    /// accumulators' partial rows `parts` (`s` splits of `b` samples) go to `outs`: summed by the
    /// kernel itself ([`ColumnSums::InKernel`]: the outputs, tickets and flags appended) or by a
    /// `sum_splits` launch after it.
    pub(crate) fn launch_column_kernel(
        dev: &KernelDevice,
        name: &str,
        (cfg, s, b): (LaunchCfg, usize, usize),
        args: KernelArgs,
        parts: &[&DevBuf<f32>],
        outs: &[ColumnOut],
    ) -> KernelResult<()> {
        for (part, o) in parts.iter().zip(outs) {
            let rows = if o.whole { 1 } else { b };
            if o.out.len() != rows * part.len() / (s * b).max(1) {
                return Err(crate::device::kernel::KernelError::Invalid(format!(
                    "{name}: {} sums for {} partials of {s} splits of {b} samples",
                    o.out.len(),
                    part.len()
                )));
            }
        }
        if column_sums() == ColumnSums::SumSplits {
            let mut args = args;
            for _ in outs {
                args = args.null();
            }
            dev.launch(name, cfg, args.null().i32(0))?;
            let s_of = |o: &ColumnOut| if o.whole { s * b } else { s };
            return match (parts, outs) {
                ([p], [o]) => sum_splits_acc(dev, o.out, p, s_of(o), o.accumulate),
                ([p0, p1], [o0, o1]) => sum_splits_pair(
                    dev,
                    [
                        (o0.out, p0, s_of(o0), o0.accumulate),
                        (o1.out, p1, s_of(o1), o1.accumulate),
                    ],
                ),
                _ => Err(crate::device::kernel::KernelError::Invalid(format!(
                    "{name}: {} partials for {} outputs",
                    parts.len(),
                    outs.len()
                ))),
            };
        }
        let tickets = dev.column_tickets(cfg.grid[0] as usize)?;
        let mut args = args;
        let mut flags = 0;
        for (a, o) in outs.iter().enumerate() {
            args = args.buf(o.out);
            flags |= i32::from(o.accumulate) << a | i32::from(o.whole) << (4 + a);
        }
        dev.launch(name, cfg, args.buf(&tickets).i32(flags))
    }

    /// Sums `[S, n]` partial rows into `out [n]`: 32 columns per block, and up to 32 threads per
    /// column walking the splits (see `sum_splits` in adaln.cu).
    pub fn sum_splits(
        dev: &KernelDevice,
        out: &DevBuf<f32>,
        part: &DevBuf<f32>,
        s: usize,
    ) -> KernelResult<()> {
        sum_splits_acc(dev, out, part, s, false)
    }

    /// [`sum_splits`], adding into `out` when `accumulate`.
    pub fn sum_splits_acc(
        dev: &KernelDevice,
        out: &DevBuf<f32>,
        part: &DevBuf<f32>,
        s: usize,
        accumulate: bool,
    ) -> KernelResult<()> {
        let n = out.len();
        if n == 0 {
            return Ok(());
        }
        enough_partials(out, part, s)?;
        let y = s.clamp(1, 32) as u32;
        dev.launch(
            "sum_splits",
            LaunchCfg {
                grid: [blocks_for(n, 32), 1, 1],
                block: [32, y, 1],
                shared_bytes: 0,
            },
            KernelArgs::new()
                .buf(out)
                .buf(part)
                .i32(s as i32)
                .i64(n as i64)
                .i32(i32::from(accumulate)),
        )
    }

    /// `part` holds `s` partial rows of `out`'s length.
    fn enough_partials(out: &DevBuf<f32>, part: &DevBuf<f32>, s: usize) -> KernelResult<()> {
        if part.len() < s * out.len() {
            return Err(crate::device::kernel::KernelError::Invalid(format!(
                "sum_splits: {} partials for {s} splits of {}",
                part.len(),
                out.len()
            )));
        }
        Ok(())
    }

    /// Two independent [`sum_splits_acc`] in one launch (`sum_splits2`): each of `pairs` is
    /// `(out, part, splits, accumulate)`.
    pub fn sum_splits_pair(
        dev: &KernelDevice,
        pairs: [(&DevBuf<f32>, &DevBuf<f32>, usize, bool); 2],
    ) -> KernelResult<()> {
        for (out, part, s, _) in pairs {
            enough_partials(out, part, s)?;
        }
        let n = pairs[0].0.len().max(pairs[1].0.len());
        if n == 0 {
            return Ok(());
        }
        let y = pairs[0].2.max(pairs[1].2).clamp(1, 32) as u32;
        let mut args = KernelArgs::new();
        for (out, part, s, acc) in pairs {
            args = args
                .buf(out)
                .buf(part)
                .i32(s as i32)
                .i64(out.len() as i64)
                .i32(i32::from(acc));
        }
        dev.launch(
            "sum_splits2",
            LaunchCfg {
                grid: [blocks_for(n, 32), 2, 1],
                block: [32, y, 1],
                shared_bytes: 0,
            },
            args,
        )
    }

    /// 16-byte packs (8 bf16) per thread of the vector kernels (`PACKS` in adaln.cu).
    const PACKS: usize = 2;

    /// Threads of the block-per-row vector kernels when `d` allows them (`d % 8 == 0`, at most
    /// 1024 threads of [`PACKS`] packs), rounded up to whole warps.
    fn row_threads(d: usize) -> Option<u32> {
        let threads = (d / 8).div_ceil(PACKS).div_ceil(32) * 32;
        (d % 8 == 0 && threads <= 1024).then_some(threads as u32)
    }

    /// Threads of the block-per-row dx kernel of the split backward (one pack per thread,
    /// `d % 8 == 0`, at most 1024 packs).
    fn dx_threads(d: usize) -> Option<u32> {
        (d % 8 == 0 && d / 8 <= 1024).then(|| (d / 8).div_ceil(32) as u32 * 32)
    }

    /// Checks that `m` holds `b` modulation rows of `d` at stride `ld` (sample `s`'s at `s·ld`),
    /// and says whether the 16-byte vector kernels may read them.
    fn mod_rows(
        m: &DevBuf<bf16>,
        ld: usize,
        (b, d): (usize, usize),
        what: &str,
    ) -> KernelResult<bool> {
        let need = if b == 0 { 0 } else { (b - 1) * ld + d };
        if ld < d || m.len() < need {
            return Err(crate::device::kernel::KernelError::Invalid(format!(
                "{what}: a modulation of {} elements for {b} rows of {d} at stride {ld}",
                m.len()
            )));
        }
        Ok(ld % 8 == 0 && m.device_ptr() % 16 == 0)
    }

    /// `y = LN(x)·(1+scale)+shift` into preallocated `y [B·L·D]`, `mean`, `rstd [B·L]`.
    #[allow(clippy::too_many_arguments)]
    pub fn adaln_modulate_fwd_into(
        dev: &KernelDevice,
        y: &DevBuf<bf16>,
        mean: &DevBuf<f32>,
        rstd: &DevBuf<f32>,
        x: &DevBuf<bf16>,
        shift: &DevBuf<bf16>,
        scale: &DevBuf<bf16>,
        dims: (usize, usize, usize),
        eps: f32,
    ) -> KernelResult<()> {
        let mods = (shift, scale, dims.2);
        adaln_modulate_fwd_into_ld(dev, y, mean, rstd, x, mods, dims, eps)
    }

    /// [`adaln_modulate_fwd_into`] with `shift` and `scale` rows at stride `ld` (`(shift, scale,
    /// ld)`): windows of the modulation GEMM's output, no copies.
    #[allow(clippy::too_many_arguments)]
    pub fn adaln_modulate_fwd_into_ld(
        dev: &KernelDevice,
        y: &DevBuf<bf16>,
        mean: &DevBuf<f32>,
        rstd: &DevBuf<f32>,
        x: &DevBuf<bf16>,
        (shift, scale, ld): (&DevBuf<bf16>, &DevBuf<bf16>, usize),
        (b, l, d): (usize, usize, usize),
        eps: f32,
    ) -> KernelResult<()> {
        let rows = b * l;
        if rows == 0 || d == 0 {
            return Ok(());
        }
        let vec = mod_rows(shift, ld, (b, d), "adaln shift")?
            & mod_rows(scale, ld, (b, d), "adaln scale")?;
        let (name, cfg) = match row_threads(d).filter(|_| vec) {
            Some(t) => ("adaln_modulate_fwd", LaunchCfg::linear(rows as u32, t)),
            None => (
                "adaln_modulate_fwd_rows",
                LaunchCfg::linear(blocks_for(rows, ROWS_PER_BLOCK), 32 * ROWS_PER_BLOCK),
            ),
        };
        dev.launch(
            name,
            cfg,
            KernelArgs::new()
                .buf(y)
                .buf(mean)
                .buf(rstd)
                .buf(x)
                .buf(shift)
                .buf(scale)
                .i32(rows as i32)
                .i32(l as i32)
                .i32(d as i32)
                .f32(eps)
                .i32(ld as i32),
        )
    }

    /// [`gated_residual_fwd_ld`] then [`adaln_modulate_fwd_ld`] of its output:
    /// `mid = x + gate·yres`, `(y, mean, rstd)` of `mid`; returns `(mid, y, mean, rstd)`. One
    /// pass (`gated_residual_adaln_fwd`) where the vector kernels run and every buffer is 16-byte
    /// aligned, the two launches otherwise; the same values either way. `(gate, gate_ld)` and
    /// `(shift, scale, ld)`: modulation chunks, rows at those strides (one block's gate and the
    /// next block's adaLN may come from different products).
    #[allow(clippy::type_complexity)]
    pub fn gated_residual_adaln_fwd_ld(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        yres: &DevBuf<bf16>,
        gate: (&DevBuf<bf16>, usize),
        mods: (&DevBuf<bf16>, &DevBuf<bf16>, usize),
        dims: (usize, usize, usize),
        eps: f32,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<bf16>, DevBuf<f32>, DevBuf<f32>)> {
        residual_with_adaln(dev, x, yres, gate, mods, dims, eps, LnOf::Sum)
    }

    /// [`gated_residual_fwd_ld`] and [`adaln_modulate_fwd_ld`] of its input `x` (not of the
    /// sum): `mid = x + gate·yres`, `(y, mean, rstd)` of `x`; returns `(mid, y, mean, rstd)`. One
    /// pass reading x once (`gated_residual_adaln_of_x_fwd`) under the conditions of
    /// [`gated_residual_adaln_fwd_ld`], the two launches otherwise; the same values either way.
    #[allow(clippy::type_complexity)]
    pub fn gated_residual_adaln_of_x_fwd_ld(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        yres: &DevBuf<bf16>,
        gate: (&DevBuf<bf16>, usize),
        mods: (&DevBuf<bf16>, &DevBuf<bf16>, usize),
        dims: (usize, usize, usize),
        eps: f32,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<bf16>, DevBuf<f32>, DevBuf<f32>)> {
        residual_with_adaln(dev, x, yres, gate, mods, dims, eps, LnOf::X)
    }

    /// Which row the adaLN of [`residual_with_adaln`] normalises.
    #[derive(Clone, Copy, PartialEq)]
    enum LnOf {
        /// `x + gate·yres`
        Sum,
        /// `x`
        X,
    }

    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn residual_with_adaln(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        yres: &DevBuf<bf16>,
        (gate, gate_ld): (&DevBuf<bf16>, usize),
        (shift, scale, ld): (&DevBuf<bf16>, &DevBuf<bf16>, usize),
        (b, l, d): (usize, usize, usize),
        eps: f32,
        of: LnOf,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<bf16>, DevBuf<f32>, DevBuf<f32>)> {
        let rows = b * l;
        let vec = mod_rows(gate, gate_ld, (b, d), "gate")?
            & mod_rows(shift, ld, (b, d), "adaln shift")?
            & mod_rows(scale, ld, (b, d), "adaln scale")?;
        let aligned = [x.device_ptr(), yres.device_ptr()]
            .iter()
            .all(|p| p % 16 == 0);
        let threads = row_threads(d).filter(|_| vec && aligned && rows > 0);
        let kernel = match of {
            LnOf::Sum => "gated_residual_adaln_fwd",
            LnOf::X => "gated_residual_adaln_of_x_fwd",
        };
        let Some(t) = threads else {
            let mid = gated_residual_fwd_ld(dev, x, (gate, gate_ld), yres, (b, l, d))?;
            let normalised = if of == LnOf::Sum { &mid } else { x };
            let (y, mean, rstd) =
                adaln_modulate_fwd_ld(dev, normalised, (shift, scale, ld), (b, l, d), eps)?;
            return Ok((mid, y, mean, rstd));
        };
        for (what, len) in [("x", x.len()), ("yres", yres.len())] {
            if len != rows * d {
                return Err(crate::device::kernel::KernelError::Invalid(format!(
                    "{kernel}: {what} has {len} elements, the rows {}",
                    rows * d
                )));
            }
        }
        let mid = dev.alloc::<bf16>(rows * d)?;
        let y = dev.alloc::<bf16>(rows * d)?;
        let mean = dev.alloc::<f32>(rows)?;
        let rstd = dev.alloc::<f32>(rows)?;
        dev.launch(
            kernel,
            LaunchCfg::linear(rows as u32, t),
            KernelArgs::new()
                .buf(&mid)
                .buf(&y)
                .buf(&mean)
                .buf(&rstd)
                .buf(x)
                .buf(gate)
                .buf(yres)
                .buf(shift)
                .buf(scale)
                .i32(rows as i32)
                .i32(l as i32)
                .i32(d as i32)
                .f32(eps)
                .i32(ld as i32)
                .i32(gate_ld as i32),
        )?;
        Ok((mid, y, mean, rstd))
    }

    /// `y = LN(x)·(1+scale)+shift`; returns (y, mean, rstd).
    pub fn adaln_modulate_fwd(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        shift: &DevBuf<bf16>,
        scale: &DevBuf<bf16>,
        dims: (usize, usize, usize),
        eps: f32,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<f32>, DevBuf<f32>)> {
        adaln_modulate_fwd_ld(dev, x, (shift, scale, dims.2), dims, eps)
    }

    /// [`adaln_modulate_fwd`] with the modulation rows at stride `ld` (`(shift, scale, ld)`).
    pub fn adaln_modulate_fwd_ld(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        mods: (&DevBuf<bf16>, &DevBuf<bf16>, usize),
        dims: (usize, usize, usize),
        eps: f32,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<f32>, DevBuf<f32>)> {
        let rows = dims.0 * dims.1;
        let y = dev.alloc::<bf16>(rows * dims.2)?;
        let mean = dev.alloc::<f32>(rows)?;
        let rstd = dev.alloc::<f32>(rows)?;
        adaln_modulate_fwd_into_ld(dev, &y, &mean, &rstd, x, mods, dims, eps)?;
        Ok((y, mean, rstd))
    }

    /// Gradients of [`adaln_modulate_fwd`]: (dx bf16, dshift f32, dscale f32). Three kernels: dx
    /// per row, the column partials of dshift and dscale, and `sum_splits` for each. (A fused
    /// one-pass kernel, dx and the partials from one read of x and dy with 4-row groups per
    /// barrier, measured 37.6–48.2 µs against these kernels' 34.3 µs at 4429×1536 on an H100:
    /// docs/perf-log.md.)
    #[allow(clippy::too_many_arguments)]
    pub fn adaln_modulate_bwd(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        scale: &DevBuf<bf16>,
        mean: &DevBuf<f32>,
        rstd: &DevBuf<f32>,
        dy: &DevBuf<bf16>,
        dims: (usize, usize, usize),
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<f32>, DevBuf<f32>)> {
        adaln_modulate_bwd_ld(dev, x, (scale, dims.2), mean, rstd, dy, dims)
    }

    /// [`adaln_modulate_bwd`] with the scale rows at stride `ld` (`(scale, ld)`).
    #[allow(clippy::too_many_arguments)]
    pub fn adaln_modulate_bwd_ld(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        scale: (&DevBuf<bf16>, usize),
        mean: &DevBuf<f32>,
        rstd: &DevBuf<f32>,
        dy: &DevBuf<bf16>,
        dims: (usize, usize, usize),
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<f32>, DevBuf<f32>)> {
        let dx = dev.alloc::<bf16>(dims.0 * dims.1 * dims.2)?;
        let (dshift, dscale) = bwd(dev, x, scale, mean, rstd, dy, dims, DxOut::Bf16(&dx))?;
        Ok((dx, dshift, dscale))
    }

    /// [`adaln_modulate_bwd_ld`] with dx added into the residual stream's f32 gradient instead of
    /// returned: `out = a + dx` (dx rounded to bf16 first) and, with `out16`, its bf16 rounding
    /// (`out` may be `a`). One pass where the vector kernel runs (`adaln_modulate_bwd_dx_acc`),
    /// else dx and `residual_grad_add`: the same values either way. Returns `(dshift, dscale)`.
    #[allow(clippy::too_many_arguments)]
    pub fn adaln_modulate_bwd_acc_ld(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        scale: (&DevBuf<bf16>, usize),
        mean: &DevBuf<f32>,
        rstd: &DevBuf<f32>,
        dy: &DevBuf<bf16>,
        dims: (usize, usize, usize),
        (out, out16, a): (&DevBuf<f32>, Option<&DevBuf<bf16>>, &DevBuf<f32>),
    ) -> KernelResult<(DevBuf<f32>, DevBuf<f32>)> {
        let n = dims.0 * dims.1 * dims.2;
        for (what, len) in [("out", out.len()), ("a", a.len())]
            .into_iter()
            .chain(out16.map(|o| ("out16", o.len())))
        {
            if len != n {
                return Err(crate::device::kernel::KernelError::Invalid(format!(
                    "adaln_modulate_bwd_acc: {what} has {len} elements, the rows {n}"
                )));
            }
        }
        bwd(
            dev,
            x,
            scale,
            mean,
            rstd,
            dy,
            dims,
            DxOut::Acc { out, out16, a },
        )
    }

    /// One adaLN's operands for [`adaln_modulate_bwd_acc2_ld`]: its scale chunk (rows `ld`
    /// apart), its saved statistics and its output gradient.
    pub struct LnBwdIn<'a> {
        pub scale: (&'a DevBuf<bf16>, usize),
        pub mean: &'a DevBuf<f32>,
        pub rstd: &'a DevBuf<f32>,
        pub dy: &'a DevBuf<bf16>,
    }

    /// Two adaLNs of the same `x` (an MMDiT-X block's first and its second attention's), both
    /// dx added into the residual stream's f32 gradient in one pass where the vector kernel runs
    /// (`adaln_modulate_bwd_dx_acc2`): `out = (a + bf16(dx₀)) + bf16(dx₁)` and, with `out16`, its
    /// bf16 rounding — the bits of [`adaln_modulate_bwd_acc_ld`] for the first (`out16` none) and
    /// then the second, which it runs otherwise. Returns each one's `(dshift, dscale)`.
    pub fn adaln_modulate_bwd_acc2_ld(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        [p0, p1]: [LnBwdIn; 2],
        dims: (usize, usize, usize),
        (out, out16, a): (&DevBuf<f32>, Option<&DevBuf<bf16>>, &DevBuf<f32>),
    ) -> KernelResult<[(DevBuf<f32>, DevBuf<f32>); 2]> {
        let (b, l, d) = dims;
        let rows = b * l;
        let vec = mod_rows(p0.scale.0, p0.scale.1, (b, d), "adaln scale")?
            & mod_rows(p1.scale.0, p1.scale.1, (b, d), "adaln scale")?;
        let threads = dx_threads(d).filter(|_| vec && rows > 0);
        let Some(t) = threads else {
            let one = |p: &LnBwdIn, acc| {
                adaln_modulate_bwd_acc_ld(dev, x, p.scale, p.mean, p.rstd, p.dy, dims, acc)
            };
            let first = one(&p0, (out, None, a))?;
            return Ok([first, one(&p1, (out, out16, out))?]);
        };
        let n = rows * d;
        let lens = [("out", out.len()), ("a", a.len()), ("x", x.len())];
        for (what, len) in lens.into_iter().chain(out16.map(|o| ("out16", o.len()))) {
            if len != n {
                return Err(crate::device::kernel::KernelError::Invalid(format!(
                    "adaln_modulate_bwd_acc2: {what} has {len} elements, the rows {n}"
                )));
            }
        }
        for p in [&p0, &p1] {
            for (what, len, want) in [
                ("dy", p.dy.len(), n),
                ("mean", p.mean.len(), rows),
                ("rstd", p.rstd.len(), rows),
            ] {
                if len != want {
                    return Err(crate::device::kernel::KernelError::Invalid(format!(
                        "adaln_modulate_bwd_acc2: {what} has {len} elements, not {want}"
                    )));
                }
            }
        }
        let args = KernelArgs::new().buf(out);
        let args = match out16 {
            Some(o) => args.buf(o),
            None => args.null(),
        };
        let args = [&p0, &p1].into_iter().fold(args.buf(a).buf(x), |args, p| {
            args.buf(p.scale.0)
                .buf(p.mean)
                .buf(p.rstd)
                .buf(p.dy)
                .i32(p.scale.1 as i32)
        });
        let args = args.i32(rows as i32).i32(l as i32).i32(d as i32);
        let cfg = LaunchCfg::linear(rows as u32, t);
        dev.launch("adaln_modulate_bwd_dx_acc2", cfg, args)?;
        let params = |p: &LnBwdIn| -> KernelResult<_> {
            let sums = (dev.alloc::<f32>(b * d)?, dev.alloc::<f32>(b * d)?);
            params_bwd(dev, x, p.mean, p.rstd, p.dy, dims, sums)
        };
        Ok([params(&p0)?, params(&p1)?])
    }

    /// Where the adaLN backward puts dx.
    enum DxOut<'a> {
        Bf16(&'a DevBuf<bf16>),
        Acc {
            out: &'a DevBuf<f32>,
            out16: Option<&'a DevBuf<bf16>>,
            a: &'a DevBuf<f32>,
        },
    }

    #[allow(clippy::too_many_arguments)]
    fn bwd(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        (scale, ld): (&DevBuf<bf16>, usize),
        mean: &DevBuf<f32>,
        rstd: &DevBuf<f32>,
        dy: &DevBuf<bf16>,
        (b, l, d): (usize, usize, usize),
        dx_out: DxOut,
    ) -> KernelResult<(DevBuf<f32>, DevBuf<f32>)> {
        let rows = b * l;
        if rows == 0 || d == 0 {
            return Ok((dev.zeros::<f32>(b * d)?, dev.zeros::<f32>(b * d)?));
        }
        // written whole by the column sums
        let dshift = dev.alloc::<f32>(b * d)?;
        let dscale = dev.alloc::<f32>(b * d)?;
        let vec = mod_rows(scale, ld, (b, d), "adaln scale")?;
        // the dx kernels' operands after their outputs
        let prepend = |head: KernelArgs| {
            head.buf(x)
                .buf(scale)
                .buf(mean)
                .buf(rstd)
                .buf(dy)
                .i32(rows as i32)
                .i32(l as i32)
                .i32(d as i32)
                .i32(ld as i32)
        };
        match (dx_threads(d).filter(|_| vec), dx_out) {
            (Some(t), DxOut::Bf16(dx)) => dev.launch(
                "adaln_modulate_bwd_dx",
                LaunchCfg::linear(rows as u32, t),
                prepend(KernelArgs::new().buf(dx)),
            )?,
            (Some(t), DxOut::Acc { out, out16, a }) => {
                let head = KernelArgs::new().buf(out);
                let head = match out16 {
                    Some(o) => head.buf(o),
                    None => head.null(),
                };
                dev.launch(
                    "adaln_modulate_bwd_dx_acc",
                    LaunchCfg::linear(rows as u32, t),
                    prepend(head.buf(a)),
                )?
            }
            (None, out) => {
                let cfg = LaunchCfg::linear(blocks_for(rows, ROWS_PER_BLOCK), 32 * ROWS_PER_BLOCK);
                let tmp;
                let dx = match out {
                    DxOut::Bf16(dx) => dx,
                    DxOut::Acc { .. } => {
                        tmp = dev.alloc::<bf16>(rows * d)?;
                        &tmp
                    }
                };
                let args = prepend(KernelArgs::new().buf(dx));
                dev.launch("adaln_modulate_bwd_dx_rows", cfg, args)?;
                if let DxOut::Acc { out, out16, a } = out {
                    crate::kernels::shape::dev::residual_grad_add(dev, out, out16, a, dx)?;
                }
            }
        }
        params_bwd(dev, x, mean, rstd, dy, (b, l, d), (dshift, dscale))
    }

    /// The adaLN backward's parameter gradients (dshift, dscale per sample) into the given
    /// buffers (written whole), returned.
    fn params_bwd(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        mean: &DevBuf<f32>,
        rstd: &DevBuf<f32>,
        dy: &DevBuf<bf16>,
        (b, l, d): (usize, usize, usize),
        (dshift, dscale): (DevBuf<f32>, DevBuf<f32>),
    ) -> KernelResult<(DevBuf<f32>, DevBuf<f32>)> {
        let (cfg, s) = if d % 8 == 0 {
            pack_cols_plan(dev, b, l, d)
        } else {
            let s = splits(b, l, d);
            let cfg = LaunchCfg {
                grid: [d.div_ceil(128) as u32, b as u32, s as u32],
                block: [128, 1, 1],
                shared_bytes: 0,
            };
            (cfg, s)
        };
        let part_shift = dev.alloc::<f32>(s * b * d)?;
        let part_scale = dev.alloc::<f32>(s * b * d)?;
        let args = KernelArgs::new()
            .buf(&part_shift)
            .buf(&part_scale)
            .buf(x)
            .buf(mean)
            .buf(rstd)
            .buf(dy)
            .i32(b as i32)
            .i32(l as i32)
            .i32(d as i32);
        if d % 8 == 0 {
            let sums = |out| ColumnOut {
                out,
                accumulate: false,
                whole: false,
            };
            launch_column_kernel(
                dev,
                "adaln_modulate_bwd_params_vec",
                (cfg, s, b),
                args,
                &[&part_shift, &part_scale],
                &[sums(&dshift), sums(&dscale)],
            )?;
            return Ok((dshift, dscale));
        }
        dev.launch("adaln_modulate_bwd_params", cfg, args)?;
        sum_splits_pair(
            dev,
            [
                (&dshift, &part_shift, s, false),
                (&dscale, &part_scale, s, false),
            ],
        )?;
        Ok((dshift, dscale))
    }

    /// Elements per thread of the gated-residual kernels: a 16-byte pack when rows allow it.
    fn per_thread(d: usize) -> usize {
        if d % 8 == 0 {
            8
        } else {
            1
        }
    }

    /// `x + gate·y`.
    pub fn gated_residual_fwd(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        gate: &DevBuf<bf16>,
        y: &DevBuf<bf16>,
        dims: (usize, usize, usize),
    ) -> KernelResult<DevBuf<bf16>> {
        gated_residual_fwd_ld(dev, x, (gate, dims.2), y, dims)
    }

    /// [`gated_residual_fwd`] with the gate rows at stride `ld` (`(gate, ld)`).
    pub fn gated_residual_fwd_ld(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        (gate, ld): (&DevBuf<bf16>, usize),
        y: &DevBuf<bf16>,
        (b, l, d): (usize, usize, usize),
    ) -> KernelResult<DevBuf<bf16>> {
        let n = b * l * d;
        mod_rows(gate, ld, (b, d), "gate")?;
        let out = dev.alloc::<bf16>(n)?;
        if n > 0 {
            dev.launch(
                "gated_residual_fwd",
                LaunchCfg::linear(blocks_for(n.div_ceil(per_thread(d)), 256), 256),
                KernelArgs::new()
                    .buf(&out)
                    .buf(x)
                    .buf(gate)
                    .buf(y)
                    .i64((b * l) as i64)
                    .i32(l as i32)
                    .i32(d as i32)
                    .i32(ld as i32),
            )?;
        }
        Ok(out)
    }

    /// Gradients of [`gated_residual_fwd`]: (dgate f32, dy bf16); dx is dz itself.
    pub fn gated_residual_bwd(
        dev: &KernelDevice,
        gate: &DevBuf<bf16>,
        y: &DevBuf<bf16>,
        dz: &DevBuf<bf16>,
        dims: (usize, usize, usize),
    ) -> KernelResult<(DevBuf<f32>, DevBuf<bf16>)> {
        gated_residual_bwd_ld(dev, (gate, dims.2), y, dz, dims)
    }

    /// [`gated_residual_bwd`] with the gate rows at stride `ld` (`(gate, ld)`).
    pub fn gated_residual_bwd_ld(
        dev: &KernelDevice,
        (gate, ld): (&DevBuf<bf16>, usize),
        y: &DevBuf<bf16>,
        dz: &DevBuf<bf16>,
        (b, l, d): (usize, usize, usize),
    ) -> KernelResult<(DevBuf<f32>, DevBuf<bf16>)> {
        let n = b * l * d;
        mod_rows(gate, ld, (b, d), "gate")?;
        let dgate = dev.zeros::<f32>(b * d)?;
        let dy = dev.alloc::<bf16>(n)?;
        if n == 0 {
            return Ok((dgate, dy));
        }
        dev.launch(
            "gated_residual_bwd_dy",
            LaunchCfg::linear(blocks_for(n.div_ceil(per_thread(d)), 256), 256),
            KernelArgs::new()
                .buf(&dy)
                .buf(gate)
                .buf(dz)
                .i64((b * l) as i64)
                .i32(l as i32)
                .i32(d as i32)
                .i32(ld as i32),
        )?;
        let dgate_out = ColumnOut {
            out: &dgate,
            accumulate: false,
            whole: false,
        };
        colsum(dev, dz, Some(y), (b, l, d), dgate_out)?;
        Ok((dgate, dy))
    }

    /// `out[j] += Σ_r a[r, j]` over the `rows` rows of `a [rows, d]` (bf16 into f32): a bias
    /// gradient.
    pub fn colsum_acc(
        dev: &KernelDevice,
        a: &DevBuf<bf16>,
        (rows, d): (usize, usize),
        out: &DevBuf<f32>,
    ) -> KernelResult<()> {
        if a.len() != rows * d || out.len() != d {
            return Err(crate::device::kernel::KernelError::Invalid(format!(
                "colsum_acc: {} values for [{rows}, {d}] into {}",
                a.len(),
                out.len()
            )));
        }
        if rows == 0 || d == 0 {
            return Ok(());
        }
        let sums = ColumnOut {
            out,
            accumulate: true,
            whole: true,
        };
        colsum(dev, a, None, (1, rows, d), sums)
    }

    /// The column sums of `a·c` (or of `a` without `c`) over each sample's rows into `sums`:
    /// per-split partials (`colsum_mul_partial`; without `c`, where rows allow 16-byte packs,
    /// `colsum_partial_vec`, which may sum its own) and `sum_splits`.
    fn colsum(
        dev: &KernelDevice,
        a: &DevBuf<bf16>,
        c: Option<&DevBuf<bf16>>,
        (b, l, d): (usize, usize, usize),
        sums: ColumnOut,
    ) -> KernelResult<()> {
        if c.is_none() && d % 8 == 0 && a.device_ptr() % 16 == 0 {
            let (cfg, s) = pack_cols_plan(dev, b, l, d);
            let part = dev.alloc::<f32>(s * b * d)?;
            let args = KernelArgs::new()
                .buf(&part)
                .buf(a)
                .i32(b as i32)
                .i32(l as i32)
                .i32(d as i32);
            return launch_column_kernel(
                dev,
                "colsum_partial_vec",
                (cfg, s, b),
                args,
                &[&part],
                &[sums],
            );
        }
        let s = splits(b, l, d);
        let part = dev.alloc::<f32>(s * b * d)?;
        let args = KernelArgs::new().buf(&part).buf(a);
        let args = match c {
            Some(c) => args.buf(c),
            None => args.null(),
        };
        dev.launch(
            "colsum_mul_partial",
            LaunchCfg {
                grid: [d.div_ceil(128) as u32, b as u32, s as u32],
                block: [128, 1, 1],
                shared_bytes: 0,
            },
            args.i32(b as i32).i32(l as i32).i32(d as i32),
        )?;
        let rows = if sums.whole { s * b } else { s };
        sum_splits_acc(dev, sums.out, &part, rows, sums.accumulate)
    }

    /// [`gated_residual_bwd_ld`], and the bias gradient of the linear layer that produced `y`
    /// (`Σ_rows dy` as stored in bf16) added into `bias_grad [D]` (f32): in one pass over `dz`
    /// and `y` when `D % 8 == 0` and the buffers are 16-byte aligned (`gated_residual_bwd_vec`),
    /// else the two-kernel path and a column sum of `dy`.
    pub fn gated_residual_bwd_bias(
        dev: &KernelDevice,
        (gate, ld): (&DevBuf<bf16>, usize),
        y: &DevBuf<bf16>,
        dz: &DevBuf<bf16>,
        (b, l, d): (usize, usize, usize),
        bias_grad: &DevBuf<f32>,
    ) -> KernelResult<(DevBuf<f32>, DevBuf<bf16>)> {
        if bias_grad.len() != d {
            return Err(crate::device::kernel::KernelError::Invalid(format!(
                "gated_residual_bwd_bias: a bias gradient of {} for width {d}",
                bias_grad.len()
            )));
        }
        let n = b * l * d;
        let vec = mod_rows(gate, ld, (b, d), "gate")?;
        if y.len() != n || dz.len() != n {
            return Err(crate::device::kernel::KernelError::Invalid(format!(
                "gated_residual_bwd_bias: y {}, dz {} for [{b}, {l}, {d}]",
                y.len(),
                dz.len()
            )));
        }
        let aligned = vec
            && [y.device_ptr(), dz.device_ptr()]
                .iter()
                .all(|p| p % 16 == 0);
        if n == 0 || d % 8 != 0 || !aligned {
            let (dgate, dy) = gated_residual_bwd_ld(dev, (gate, ld), y, dz, (b, l, d))?;
            if n > 0 {
                let sums = ColumnOut {
                    out: bias_grad,
                    accumulate: true,
                    whole: true,
                };
                colsum(dev, &dy, None, (b, l, d), sums)?;
            }
            return Ok((dgate, dy));
        }
        let dgate = dev.alloc::<f32>(b * d)?;
        let dy = dev.alloc::<bf16>(n)?;
        let (cfg, s) = pack_cols_plan(dev, b, l, d);
        let (part_gate, part_bias) = (dev.alloc::<f32>(s * b * d)?, dev.alloc::<f32>(s * b * d)?);
        let args = KernelArgs::new()
            .buf(&dy)
            .buf(&part_gate)
            .buf(&part_bias)
            .buf(gate)
            .buf(y)
            .buf(dz)
            .i32(b as i32)
            .i32(l as i32)
            .i32(d as i32)
            .i32(ld as i32);
        let outs = [
            ColumnOut {
                out: &dgate,
                accumulate: false,
                whole: false,
            },
            ColumnOut {
                out: bias_grad,
                accumulate: true,
                whole: true,
            },
        ];
        launch_column_kernel(
            dev,
            "gated_residual_bwd_vec",
            (cfg, s, b),
            args,
            &[&part_gate, &part_bias],
            &outs,
        )?;
        Ok((dgate, dy))
    }
}

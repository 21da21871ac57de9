//! Per-head RMSNorm with a learned weight: SD3.5's QK normalisation (`ln_q`, `ln_k`, eps 1e-6),
//! applied over the last dimension (the head dim) of any tensor.

use crate::tensor::Tensor;
use rayon::prelude::*;

/// `y = x·rsqrt(mean(x²)+eps)·w` over the last dim; returns y and the per-row rsqrt.
pub fn rms_norm_fwd(x: &Tensor, weight: &Tensor, eps: f32) -> (Tensor, Vec<f32>) {
    let d = x.dim(-1);
    assert_eq!(weight.shape(), [d], "rms_norm: weight must be [{d}]");
    let (xs, w) = (x.f32s(), weight.f32s());
    let rows = xs.len().checked_div(d).unwrap_or(0);
    let mut y = vec![0f32; xs.len()];
    let mut rstd = vec![0f32; rows];
    if d > 0 {
        y.par_chunks_mut(d)
            .zip(rstd.par_iter_mut())
            .enumerate()
            .for_each(|(r, (y, rs))| {
                let row = &xs[r * d..(r + 1) * d];
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
                *rs = (1.0 / (ms + eps as f64).sqrt()) as f32;
                for j in 0..d {
                    y[j] = row[j] * *rs * w[j];
                }
            });
    }
    (Tensor::from_vec(y, x.shape()), rstd)
}

/// Gradients of [`rms_norm_fwd`]: (dx, dweight).
pub fn rms_norm_bwd(x: &Tensor, weight: &Tensor, rstd: &[f32], dy: &Tensor) -> (Tensor, Tensor) {
    let d = x.dim(-1);
    let (xs, w, g) = (x.f32s(), weight.f32s(), dy.f32s());
    let mut dx = vec![0f32; xs.len()];
    // dweight partial sums per parallel chunk of rows, then reduced in a fixed order.
    const ROWS_PER_TASK: usize = 256;
    let partials: Vec<Vec<f64>> = if d == 0 {
        Vec::new()
    } else {
        dx.par_chunks_mut(d * ROWS_PER_TASK)
            .enumerate()
            .map(|(c, dx)| {
                let mut dw = vec![0f64; d];
                for (i, dx) in dx.chunks_mut(d).enumerate() {
                    let r = c * ROWS_PER_TASK + i;
                    let rs = rstd[r];
                    let (row, gr) = (&xs[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
                    let mut dot = 0f64;
                    for j in 0..d {
                        let xhat = row[j] * rs;
                        dw[j] += (gr[j] * xhat) as f64;
                        dot += (gr[j] * w[j] * xhat) as f64;
                    }
                    let m = (dot / d as f64) as f32;
                    for j in 0..d {
                        dx[j] = rs * (gr[j] * w[j] - row[j] * rs * m);
                    }
                }
                dw
            })
            .collect()
    };
    let mut dw = vec![0f64; d];
    for p in partials {
        for (a, v) in dw.iter_mut().zip(p) {
            *a += v;
        }
    }
    (
        Tensor::from_vec(dx, x.shape()),
        Tensor::from_vec(dw.into_iter().map(|v| v as f32).collect(), &[d]),
    )
}

/// Launchers of `cuda/qknorm.cu` on a [`KernelDevice`] (a GPU, or the emulator in CI). `x`, `y`,
/// `dy`, `dx` and the weight are bf16 device buffers of `[rows, D]` and `[D]` (D = the head dim);
/// `rstd` and the weight gradient are f32.
pub mod dev {
    use crate::device::kernel::{
        blocks_for, DevBuf, KernelArgs, KernelDevice, KernelError, KernelResult, LaunchCfg,
    };
    use crate::kernels::adaln::dev::{column_sums, sum_splits, sum_splits_pair, ColumnSums};
    use half::bf16;

    const THREADS: u32 = 256;
    /// Rows per lane group of the forward (`QK_ROWS` in qknorm.cu).
    const FWD_ROWS: u32 = 2;
    /// Rows per lane group per step of the backward (`QK_BWD_ROWS` in qknorm.cu).
    const BWD_ROWS: usize = 2;
    /// The most partial weight-gradient rows of the backward: one wave of its blocks on a
    /// 132-SM H100/H200 (4 resident 256-thread blocks per SM at 60 registers = 528).
    pub const MAX_PARTS: usize = 512;

    /// Lanes per row: the power of two ≥ D/8, at most 32 (the kernels' register path); 32 for
    /// widths that are not a multiple of 8 (their scalar path).
    fn group_lanes(d: usize) -> u32 {
        if d % 8 != 0 {
            return 32;
        }
        (d / 8).next_power_of_two().clamp(1, 32) as u32
    }

    fn check_len<T>(b: &DevBuf<T>, want: usize, what: &str) -> KernelResult<()> {
        if b.len() != want {
            return Err(KernelError::Invalid(format!(
                "rms_norm: {what} has {} elements, expected {want}",
                b.len()
            )));
        }
        Ok(())
    }

    /// Where the rows of x (and dx) lie in their buffer: rows are (token, head) pairs, head `h`
    /// of token `t` at element `off + t·ld + h·D`. [`RowLayout::contiguous`] is a plain
    /// `[rows, D]` tensor; the MMDiT reads q and k in place from its fused qkv projection
    /// (`heads` = H, `ld` = 3·H·D, `off` = 0 or H·D).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RowLayout {
        pub heads: usize,
        pub ld: usize,
        pub off: usize,
    }

    impl RowLayout {
        pub fn contiguous(d: usize) -> RowLayout {
            RowLayout {
                heads: 1,
                ld: d,
                off: 0,
            }
        }

        /// Checks that `rows` rows of `d` fit a buffer of `len` elements.
        fn check(&self, rows: usize, d: usize, len: usize, what: &str) -> KernelResult<()> {
            let ok = self.heads > 0
                && rows % self.heads == 0
                && self.ld >= self.heads * d
                && (rows == 0
                    || self.off + (rows / self.heads - 1) * self.ld + self.heads * d <= len);
            if ok {
                return Ok(());
            }
            Err(KernelError::Invalid(format!(
                "rms_norm: {rows} rows of {d} as {self:?} do not fit {what} of {len} elements"
            )))
        }
    }

    /// `y = x·rsqrt(mean(x²)+eps)·w` per row into `y`, the per-row rsqrt into `rstd`.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_fwd_into(
        dev: &KernelDevice,
        y: &DevBuf<bf16>,
        rstd: &DevBuf<f32>,
        x: &DevBuf<bf16>,
        weight: &DevBuf<bf16>,
        (rows, d): (usize, usize),
        eps: f32,
    ) -> KernelResult<()> {
        check_len(x, rows * d, "x")?;
        rms_norm_fwd_laid_into(
            dev,
            y,
            rstd,
            x,
            RowLayout::contiguous(d),
            weight,
            (rows, d),
            eps,
        )
    }

    /// [`rms_norm_fwd_into`] with the rows of x at `layout` in its buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_fwd_laid_into(
        dev: &KernelDevice,
        y: &DevBuf<bf16>,
        rstd: &DevBuf<f32>,
        x: &DevBuf<bf16>,
        layout: RowLayout,
        weight: &DevBuf<bf16>,
        (rows, d): (usize, usize),
        eps: f32,
    ) -> KernelResult<()> {
        layout.check(rows, d, x.len(), "x")?;
        check_len(y, rows * d, "y")?;
        check_len(rstd, rows, "rstd")?;
        check_len(weight, d, "weight")?;
        if rows == 0 || d == 0 {
            return Ok(());
        }
        let x = x.view(layout.off, x.len() - layout.off)?;
        let g = group_lanes(d);
        dev.launch(
            "rms_norm_fwd",
            LaunchCfg::linear(blocks_for(rows, FWD_ROWS * THREADS / g), THREADS),
            KernelArgs::new()
                .buf(y)
                .buf(rstd)
                .buf(&x)
                .buf(weight)
                .i64(rows as i64)
                .i32(d as i32)
                .f32(eps)
                .i32(g as i32)
                .i32(layout.heads as i32)
                .i64(layout.ld as i64),
        )
    }

    /// `y = x·rsqrt(mean(x²)+eps)·w` per row; returns (y, rstd).
    pub fn rms_norm_fwd(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        weight: &DevBuf<bf16>,
        (rows, d): (usize, usize),
        eps: f32,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<f32>)> {
        check_len(x, rows * d, "x")?;
        rms_norm_fwd_laid(dev, x, RowLayout::contiguous(d), weight, (rows, d), eps)
    }

    /// [`rms_norm_fwd`] with the rows of x at `layout` in its buffer; y is contiguous.
    pub fn rms_norm_fwd_laid(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        layout: RowLayout,
        weight: &DevBuf<bf16>,
        (rows, d): (usize, usize),
        eps: f32,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<f32>)> {
        let y = dev.alloc::<bf16>(rows * d)?;
        let rstd = dev.alloc::<f32>(rows)?;
        rms_norm_fwd_laid_into(dev, &y, &rstd, x, layout, weight, (rows, d), eps)?;
        Ok((y, rstd))
    }

    /// Gradients of [`rms_norm_fwd`]: (dx bf16, dweight f32).
    pub fn rms_norm_bwd(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        weight: &DevBuf<bf16>,
        rstd: &DevBuf<f32>,
        dy: &DevBuf<bf16>,
        (rows, d): (usize, usize),
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<f32>)> {
        let dx = dev.alloc::<bf16>(rows * d)?;
        let dw = dev.zeros::<f32>(d)?;
        rms_norm_bwd_into(dev, &dx, &dw, x, weight, rstd, dy, (rows, d), MAX_PARTS)?;
        Ok((dx, dw))
    }

    /// Gradients of [`rms_norm_fwd_laid`]: dx written at `layout` into `dx` (a buffer shaped like
    /// x's, e.g. the fused qkv gradient; the rest of it untouched); returns dweight (f32).
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_bwd_laid(
        dev: &KernelDevice,
        dx: &DevBuf<bf16>,
        x: &DevBuf<bf16>,
        layout: RowLayout,
        weight: &DevBuf<bf16>,
        rstd: &DevBuf<f32>,
        dy: &DevBuf<bf16>,
        (rows, d): (usize, usize),
    ) -> KernelResult<DevBuf<f32>> {
        let dw = dev.alloc::<f32>(d)?;
        rms_norm_bwd_run(
            dev,
            dx,
            &dw,
            x,
            layout,
            weight,
            rstd,
            dy,
            (rows, d),
            MAX_PARTS,
        )?;
        Ok(dw)
    }

    /// [`rms_norm_bwd`] into given buffers, with at most `max_parts` partial rows of the weight
    /// gradient (the tests use a small number to run the blocks' row loop several times).
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_bwd_into(
        dev: &KernelDevice,
        dx: &DevBuf<bf16>,
        dweight: &DevBuf<f32>,
        x: &DevBuf<bf16>,
        weight: &DevBuf<bf16>,
        rstd: &DevBuf<f32>,
        dy: &DevBuf<bf16>,
        (rows, d): (usize, usize),
        max_parts: usize,
    ) -> KernelResult<()> {
        for (b, what) in [(x, "x"), (dx, "dx")] {
            check_len(b, rows * d, what)?;
        }
        let layout = RowLayout::contiguous(d);
        rms_norm_bwd_run(
            dev,
            dx,
            dweight,
            x,
            layout,
            weight,
            rstd,
            dy,
            (rows, d),
            max_parts,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn rms_norm_bwd_run(
        dev: &KernelDevice,
        dx: &DevBuf<bf16>,
        dweight: &DevBuf<f32>,
        x: &DevBuf<bf16>,
        layout: RowLayout,
        weight: &DevBuf<bf16>,
        rstd: &DevBuf<f32>,
        dy: &DevBuf<bf16>,
        (rows, d): (usize, usize),
        max_parts: usize,
    ) -> KernelResult<()> {
        layout.check(rows, d, x.len(), "x")?;
        check_len(dx, x.len(), "dx (shaped like x)")?;
        check_len(dy, rows * d, "dy")?;
        check_len(rstd, rows, "rstd")?;
        check_len(weight, d, "weight")?;
        check_len(dweight, d, "dweight")?;
        if d == 0 {
            return Ok(());
        }
        if rows == 0 {
            return dev.memset_zero(dweight);
        }
        let x = x.view(layout.off, x.len() - layout.off)?;
        let dx = dx.view(layout.off, dx.len() - layout.off)?;
        let g = group_lanes(d);
        let (groups, parts) = bwd_partition(rows, d, max_parts);
        let part = dev.alloc::<f32>(parts * d)?;
        let args = KernelArgs::new()
            .buf(&dx)
            .buf(&part)
            .buf(&x)
            .buf(weight)
            .buf(rstd)
            .buf(dy)
            .i64(rows as i64)
            .i32(d as i32)
            .i32(g as i32)
            .i32(layout.heads as i32)
            .i64(layout.ld as i64);
        let cfg = LaunchCfg::linear(parts as u32, THREADS).with_shared((groups * d * 4) as u32);
        if column_sums() == ColumnSums::InKernel {
            let tickets = dev.column_tickets(1)?;
            let args = args.buf(dweight).i32(0).buf(&tickets);
            return dev.launch("rms_norm_bwd", cfg, args);
        }
        dev.launch("rms_norm_bwd", cfg, args.null().i32(0).null())?;
        sum_splits(dev, dweight, &part, parts)
    }

    /// Partial rows of the backward's weight gradient for `rows` rows of `d`: (lane groups a
    /// block, partials). Depends on the shape only: the same partition, hence the same sums, on
    /// every GPU. As few steps per block as `max_parts` allows, then as few blocks as give every
    /// block that many steps (at 106296 rows of 64: 1661 steps, 416 blocks of 4, no ragged tail).
    fn bwd_partition(rows: usize, d: usize, max_parts: usize) -> (usize, usize) {
        let groups = (THREADS / group_lanes(d)) as usize;
        let steps = rows.div_ceil(groups * BWD_ROWS);
        let per_block = steps.div_ceil(max_parts.max(1));
        (groups, steps.div_ceil(per_block).max(1))
    }

    /// Two layouts of one buffer that one paired launch can take (the kernels read one head count
    /// and row stride).
    fn check_pair(layouts: &[RowLayout; 2]) -> KernelResult<()> {
        if layouts[0].heads == layouts[1].heads && layouts[0].ld == layouts[1].ld {
            return Ok(());
        }
        Err(KernelError::Invalid(format!(
            "rms_norm pair: layouts {layouts:?} differ in heads or row stride"
        )))
    }

    /// Two [`rms_norm_fwd_laid`] over the same buffer and shape in one launch
    /// (`rms_norm_fwd2`): the MMDiT's q and k, each with its weight, out of the fused qkv
    /// projection. Returns each one's (y, rstd).
    pub fn rms_norm_fwd_laid_pair(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        layouts: [RowLayout; 2],
        weights: [&DevBuf<bf16>; 2],
        (rows, d): (usize, usize),
        eps: f32,
    ) -> KernelResult<[(DevBuf<bf16>, DevBuf<f32>); 2]> {
        check_pair(&layouts)?;
        for (l, w) in layouts.iter().zip(weights) {
            l.check(rows, d, x.len(), "x")?;
            check_len(w, d, "weight")?;
        }
        let alloc = || -> KernelResult<_> { Ok((dev.alloc(rows * d)?, dev.alloc(rows)?)) };
        let out = [alloc()?, alloc()?];
        if rows == 0 || d == 0 {
            return Ok(out);
        }
        let view = |j: usize| x.view(layouts[j].off, x.len() - layouts[j].off);
        let xs = [view(0)?, view(1)?];
        let g = group_lanes(d);
        let mut args = KernelArgs::new();
        for j in 0..2 {
            args = args
                .buf(&out[j].0)
                .buf(&out[j].1)
                .buf(&xs[j])
                .buf(weights[j]);
        }
        let blocks = blocks_for(rows, FWD_ROWS * THREADS / g);
        dev.launch(
            "rms_norm_fwd2",
            LaunchCfg {
                grid: [blocks, 2, 1],
                block: [THREADS, 1, 1],
                shared_bytes: 0,
            },
            args.i64(rows as i64)
                .i32(d as i32)
                .f32(eps)
                .i32(g as i32)
                .i32(layouts[0].heads as i32)
                .i64(layouts[0].ld as i64),
        )?;
        Ok(out)
    }

    /// Gradients of [`rms_norm_fwd_laid_pair`] in one launch (`rms_norm_bwd2`): each dx written
    /// at its layout into `dx`, and with `dweights` the two weight gradients summed into them
    /// (each added to what it holds when its flag says so, else overwriting it) by the launch's
    /// last block of each ([`ColumnSums::InKernel`]) or one `sum_splits2`; without, not formed.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_bwd_laid_pair(
        dev: &KernelDevice,
        dx: &DevBuf<bf16>,
        x: &DevBuf<bf16>,
        layouts: [RowLayout; 2],
        weights: [&DevBuf<bf16>; 2],
        rstd: [&DevBuf<f32>; 2],
        dy: [&DevBuf<bf16>; 2],
        dims: (usize, usize),
        dweights: Option<[(&DevBuf<f32>, bool); 2]>,
    ) -> KernelResult<()> {
        let dy = (FirstDy::Bf16(dy[0]), dy[1]);
        bwd_pair(dev, dx, x, layouts, weights, rstd, dy, dims, dweights)
    }

    /// [`rms_norm_bwd_laid_pair`] with the first pair's output gradient (q's) given as the
    /// attention backward's unscaled f32 dQ accumulator and its scale (`rms_norm_bwd2_dq32`):
    /// dy = bf16(scale · acc), rounded as `joint_attn_dq_convert` rounds it — the same results bit
    /// for bit, without that kernel's pass over dQ.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_bwd_laid_pair_dq32(
        dev: &KernelDevice,
        dx: &DevBuf<bf16>,
        x: &DevBuf<bf16>,
        layouts: [RowLayout; 2],
        weights: [&DevBuf<bf16>; 2],
        rstd: [&DevBuf<f32>; 2],
        (dq_acc, dq_scale): (&DevBuf<f32>, f32),
        dk: &DevBuf<bf16>,
        dims: (usize, usize),
        dweights: Option<[(&DevBuf<f32>, bool); 2]>,
    ) -> KernelResult<()> {
        let dy = (FirstDy::ScaledF32(dq_acc, dq_scale), dk);
        bwd_pair(dev, dx, x, layouts, weights, rstd, dy, dims, dweights)
    }

    /// The first pair's output gradient of [`bwd_pair`].
    enum FirstDy<'a> {
        Bf16(&'a DevBuf<bf16>),
        ScaledF32(&'a DevBuf<f32>, f32),
    }

    #[allow(clippy::too_many_arguments)]
    fn bwd_pair(
        dev: &KernelDevice,
        dx: &DevBuf<bf16>,
        x: &DevBuf<bf16>,
        layouts: [RowLayout; 2],
        weights: [&DevBuf<bf16>; 2],
        rstd: [&DevBuf<f32>; 2],
        (dy0, dy1): (FirstDy, &DevBuf<bf16>),
        (rows, d): (usize, usize),
        dweights: Option<[(&DevBuf<f32>, bool); 2]>,
    ) -> KernelResult<()> {
        check_pair(&layouts)?;
        check_len(dx, x.len(), "dx (shaped like x)")?;
        match dy0 {
            FirstDy::Bf16(dy) => check_len(dy, rows * d, "dy")?,
            FirstDy::ScaledF32(acc, _) => check_len(acc, rows * d, "dq accumulator")?,
        }
        check_len(dy1, rows * d, "dy")?;
        for j in 0..2 {
            layouts[j].check(rows, d, x.len(), "x")?;
            check_len(rstd[j], rows, "rstd")?;
            check_len(weights[j], d, "weight")?;
            if let Some(dw) = &dweights {
                check_len(dw[j].0, d, "dweight")?;
            }
        }
        if d == 0 {
            return Ok(());
        }
        if rows == 0 {
            let overwritten = dweights.into_iter().flatten().filter(|(_, acc)| !acc);
            return overwritten
                .into_iter()
                .try_for_each(|(w, _)| dev.memset_zero(w));
        }
        let [o0, o1] = layouts.map(|l| l.off);
        let (x0, x1) = (x.view(o0, x.len() - o0)?, x.view(o1, x.len() - o1)?);
        let (dx0, dx1) = (dx.view(o0, dx.len() - o0)?, dx.view(o1, dx.len() - o1)?);
        let g = group_lanes(d);
        let (groups, parts) = bwd_partition(rows, d, MAX_PARTS);
        let part = dev.alloc::<f32>(2 * parts * d)?;
        let args = KernelArgs::new()
            .buf(&dx0)
            .buf(&x0)
            .buf(weights[0])
            .buf(rstd[0]);
        let (kernel, args) = match dy0 {
            FirstDy::Bf16(dy) => ("rms_norm_bwd2", args.buf(dy)),
            FirstDy::ScaledF32(acc, scale) => ("rms_norm_bwd2_dq32", args.buf(acc).f32(scale)),
        };
        let args = args
            .buf(&dx1)
            .buf(&x1)
            .buf(weights[1])
            .buf(rstd[1])
            .buf(dy1);
        let cfg = LaunchCfg {
            grid: [parts as u32, 2, 1],
            block: [THREADS, 1, 1],
            shared_bytes: (groups * d * 4) as u32,
        };
        let args = args
            .buf(&part)
            .i64(rows as i64)
            .i32(d as i32)
            .i32(g as i32)
            .i32(layouts[0].heads as i32)
            .i64(layouts[0].ld as i64);
        let Some([(dw0, acc0), (dw1, acc1)]) = dweights else {
            return dev.launch(kernel, cfg, args.null().i32(0).null().i32(0).null());
        };
        if column_sums() == ColumnSums::InKernel {
            let tickets = dev.column_tickets(2)?;
            let args = args
                .buf(dw0)
                .i32(i32::from(acc0))
                .buf(dw1)
                .i32(i32::from(acc1))
                .buf(&tickets);
            return dev.launch(kernel, cfg, args);
        }
        dev.launch(kernel, cfg, args.null().i32(0).null().i32(0).null())?;
        let (p0, p1) = (part.view(0, parts * d)?, part.view(parts * d, parts * d)?);
        sum_splits_pair(dev, [(dw0, &p0, parts, acc0), (dw1, &p1, parts, acc1)])
    }
}

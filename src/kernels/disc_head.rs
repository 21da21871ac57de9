//! Kernels of the discriminator head (ALGORITHM.md §2) other than its convolutions (those are in
//! `conv`): GroupNorm forward and backward, and the global mean pool over spatial dimensions.
//!
//! Layout `[B, C, *spatial]`: the channels of a group are adjacent, so each (b, g) group is one
//! contiguous run of `C/G · S` values (S = product of the spatial dims, 1 when there are none) and
//! one rayon task. Statistics accumulate in f64: this CPU code is the oracle for the GPU kernels.

use crate::tensor::Tensor;
use rayon::prelude::*;

/// (B, C, S, C/G) of a `[B, C, *spatial]` shape split into `groups` groups.
fn group_dims(shape: &[usize], groups: usize, what: &str) -> (usize, usize, usize, usize) {
    assert!(
        shape.len() >= 2,
        "{what}: input must be [B, C, *spatial], got {shape:?}"
    );
    let (b, c) = (shape[0], shape[1]);
    let s: usize = shape[2..].iter().product();
    assert!(
        groups > 0 && c % groups == 0,
        "{what}: {groups} groups do not divide {c} channels (input {shape:?})"
    );
    assert!(c > 0 && s > 0, "{what}: empty groups in input {shape:?}");
    (b, c, s, c / groups)
}

fn check_affine(t: &Tensor, c: usize, what: &str, name: &str) {
    assert_eq!(
        t.shape(),
        [c],
        "{what}: {name} {:?} for {c} channels",
        t.shape()
    );
}

/// GroupNorm: `y = (x − mean_g)·rstd_g·weight[c] + bias[c]` with biased variance per (b, g).
/// Returns `(y, mean, rstd)`, the statistics as `[B·G]` in (b, g) order for the backward.
pub fn group_norm_fwd(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> (Tensor, Tensor, Tensor) {
    let (b, c, s, cg) = group_dims(x.shape(), groups, "group_norm");
    check_affine(weight, c, "group_norm", "weight");
    check_affine(bias, c, "group_norm", "bias");
    let (xd, wd, bd) = (x.f32s(), weight.f32s(), bias.f32s());
    let n = cg * s;
    let mut y = vec![0f32; xd.len()];
    let mut mean = vec![0f32; b * groups];
    let mut rstd = vec![0f32; b * groups];
    y.par_chunks_mut(n)
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .enumerate()
        .for_each(|(bg, (yg, (mean, rstd)))| {
            let xg = &xd[bg * n..(bg + 1) * n];
            // Two passes: the one-pass E[x²] − E[x]² loses everything when |mean| ≫ std.
            let m = xg.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = xg.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n as f64;
            let r = 1.0 / (var + eps as f64).sqrt();
            (*mean, *rstd) = (m as f32, r as f32);
            let c0 = (bg % groups) * cg;
            for (ci, (yc, xc)) in yg.chunks_mut(s).zip(xg.chunks(s)).enumerate() {
                let scale = r * wd[c0 + ci] as f64;
                let shift = bd[c0 + ci] as f64;
                for (yv, &xv) in yc.iter_mut().zip(xc) {
                    *yv = ((xv as f64 - m) * scale + shift) as f32;
                }
            }
        });
    (
        Tensor::from_vec(y, x.shape()),
        Tensor::from_vec(mean, &[b * groups]),
        Tensor::from_vec(rstd, &[b * groups]),
    )
}

/// Gradients of [`group_norm_fwd`] for output gradient `dy`, given the saved statistics:
/// `(dx, dweight, dbias)`.
pub fn group_norm_bwd(
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    groups: usize,
) -> (Tensor, Tensor, Tensor) {
    let (b, c, s, cg) = group_dims(x.shape(), groups, "group_norm backward");
    check_affine(weight, c, "group_norm backward", "weight");
    assert_eq!(
        dy.shape(),
        x.shape(),
        "group_norm backward: output gradient {:?} for input {:?}",
        dy.shape(),
        x.shape()
    );
    for (t, name) in [(mean, "mean"), (rstd, "rstd")] {
        assert_eq!(
            t.shape(),
            [b * groups],
            "group_norm backward: {name} {:?} for {b}x{groups} groups",
            t.shape()
        );
    }
    let (xd, gd, wd) = (x.f32s(), dy.f32s(), weight.f32s());
    let (md, rd) = (mean.f32s(), rstd.f32s());
    let n = cg * s;
    let mut dx = vec![0f32; xd.len()];
    // Per-(b, c) partial sums, reduced over b afterwards so the tasks never share an accumulator.
    let mut dw_part = vec![0f64; b * c];
    let mut db_part = vec![0f64; b * c];
    dx.par_chunks_mut(n)
        .zip(dw_part.par_chunks_mut(cg).zip(db_part.par_chunks_mut(cg)))
        .enumerate()
        .for_each(|(bg, (dxg, (dwg, dbg)))| {
            let (xg, gg) = (&xd[bg * n..(bg + 1) * n], &gd[bg * n..(bg + 1) * n]);
            let (m, r) = (md[bg] as f64, rd[bg] as f64);
            let c0 = (bg % groups) * cg;
            // With x̂ = (x − m)·r and dx̂ = dy·w: dx = r·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)).
            let (mut sum_dxh, mut sum_dxh_xh) = (0f64, 0f64);
            for ci in 0..cg {
                let w = wd[c0 + ci] as f64;
                let (mut sdy, mut sdy_xh) = (0f64, 0f64);
                for (&xv, &gv) in xg[ci * s..(ci + 1) * s]
                    .iter()
                    .zip(&gg[ci * s..(ci + 1) * s])
                {
                    let xh = (xv as f64 - m) * r;
                    sdy += gv as f64;
                    sdy_xh += gv as f64 * xh;
                }
                dbg[ci] = sdy;
                dwg[ci] = sdy_xh;
                sum_dxh += sdy * w;
                sum_dxh_xh += sdy_xh * w;
            }
            let (mean_dxh, mean_dxh_xh) = (sum_dxh / n as f64, sum_dxh_xh / n as f64);
            for ci in 0..cg {
                let w = wd[c0 + ci] as f64;
                let range = ci * s..(ci + 1) * s;
                for ((d, &xv), &gv) in dxg[range.clone()]
                    .iter_mut()
                    .zip(&xg[range.clone()])
                    .zip(&gg[range])
                {
                    let xh = (xv as f64 - m) * r;
                    *d = (r * (gv as f64 * w - mean_dxh - xh * mean_dxh_xh)) as f32;
                }
            }
        });
    let reduce = |part: &[f64]| -> Vec<f32> {
        (0..c)
            .map(|ci| (0..b).map(|bi| part[bi * c + ci]).sum::<f64>() as f32)
            .collect()
    };
    (
        Tensor::from_vec(dx, x.shape()),
        Tensor::from_vec(reduce(&dw_part), &[c]),
        Tensor::from_vec(reduce(&db_part), &[c]),
    )
}

/// Mean over the spatial dims: `[B, C, *spatial]` → `[B, C]` (a copy when there are none).
pub fn mean_pool_spatial(x: &Tensor) -> Tensor {
    let shape = x.shape();
    assert!(
        shape.len() >= 2,
        "mean_pool_spatial: input must be [B, C, *spatial], got {shape:?}"
    );
    let (b, c) = (shape[0], shape[1]);
    let s: usize = shape[2..].iter().product();
    assert!(s > 0, "mean_pool_spatial: empty spatial dims in {shape:?}");
    let xd = x.f32s();
    let mut out = vec![0f32; b * c];
    out.par_iter_mut().enumerate().for_each(|(row, o)| {
        let sum: f64 = xd[row * s..(row + 1) * s].iter().map(|&v| v as f64).sum();
        *o = (sum / s as f64) as f32;
    });
    Tensor::from_vec(out, &[b, c])
}

/// The backward of [`mean_pool_spatial`]: spreads `dy [B, C]` evenly over `input_shape`.
pub fn mean_pool_spatial_bwd(dy: &Tensor, input_shape: &[usize]) -> Tensor {
    assert!(
        input_shape.len() >= 2 && dy.shape() == [input_shape[0], input_shape[1]],
        "mean_pool_spatial backward: gradient {:?} for input {input_shape:?}",
        dy.shape()
    );
    let s: usize = input_shape[2..].iter().product();
    let gd = dy.f32s();
    let mut dx = vec![0f32; gd.len() * s];
    if s > 0 {
        let inv = 1.0 / s as f32;
        dx.par_chunks_mut(s)
            .zip(gd.par_iter())
            .for_each(|(d, &g)| d.fill(g * inv));
    }
    Tensor::from_vec(dx, input_shape)
}

/// Launchers of `cuda/disc_head.cu` on a [`KernelDevice`] (a GPU, or the emulator in CI).
/// Activations `[B, C, S]` and the affine parameters are bf16; statistics `[B·G]`, parameter
/// gradients `[C]` and pooled values `[B, C]` are f32.
/// The head's last 1×1 convolution after the pool: `logits[b] = Σ_c pooled[b, c]·w[c] + bias`
/// (f32, the sum in c order), the twin of `head_logits_fwd`.
pub fn head_logits(pooled: &[f32], w: &[f32], bias: f32) -> Vec<f32> {
    let h = w.len();
    pooled
        .chunks(h.max(1))
        .map(|row| {
            let mut acc = 0f32;
            for (a, c) in row.iter().zip(w) {
                acc += a * c;
            }
            acc + bias
        })
        .collect()
}

/// Its backward from `dl [B]`: `(dpooled [B, h], dw [h], db)` with `dw[c] = Σ_b dl[b]·pooled[b, c]`
/// and `db = Σ_b dl[b]` (sums in b order), the twin of `head_logits_bwd`.
pub fn head_logits_bwd(dl: &[f32], pooled: &[f32], w: &[f32]) -> (Vec<f32>, Vec<f32>, f32) {
    let h = w.len();
    let dpooled = (0..dl.len() * h).map(|i| dl[i / h] * w[i % h]).collect();
    let dw = (0..h)
        .map(|c| {
            let mut acc = 0f32;
            for (b, &d) in dl.iter().enumerate() {
                acc += d * pooled[b * h + c];
            }
            acc
        })
        .collect();
    let mut db = 0f32;
    for &d in dl {
        db += d;
    }
    (dpooled, dw, db)
}

pub mod dev {
    use crate::device::kernel::{
        blocks_for, DevBuf, KernelArgs, KernelDevice, KernelError, KernelResult, LaunchCfg,
    };
    use half::bf16;

    const GN_THREADS: u32 = 1024;
    const POOL_ROWS: u32 = 8;

    /// The register kernel `<base>_r<P>` for a group of `cg` channels of `s` positions: the
    /// smallest P of `ps` with the group's `cg·s/8` packs ≤ 1024·P, and ⌈packs/P⌉ threads rounded
    /// up to whole warps; `(name, threads, packs)`. None when `s % 8 != 0` or the group is larger.
    fn regs_kernel(
        names: &[(u32, &'static str)],
        cg: usize,
        s: usize,
    ) -> Option<(&'static str, u32, usize)> {
        if s % 8 != 0 {
            return None;
        }
        let packs = cg * s / 8;
        names
            .iter()
            .find(|(p, _)| packs <= 1024 * *p as usize)
            .map(|&(p, name)| {
                (
                    name,
                    (packs.div_ceil(p as usize).div_ceil(32) * 32) as u32,
                    packs,
                )
            })
    }

    /// The forward kernel, its block size and the group's pack count (0 for the loop kernel).
    fn fwd_kernel(cg: usize, s: usize) -> (&'static str, u32, usize) {
        const R: &[(u32, &str)] = &[
            (1, "group_norm_fwd_r1"),
            (2, "group_norm_fwd_r2"),
            (4, "group_norm_fwd_r4"),
            (8, "group_norm_fwd_r8"),
        ];
        regs_kernel(R, cg, s).unwrap_or(("group_norm_fwd", GN_THREADS, 0))
    }

    /// The backward kernel, its block size and its dynamic shared memory in bytes.
    fn bwd_kernel(cg: usize, s: usize) -> (&'static str, u32, u32) {
        const R: &[(u32, &str)] = &[
            (1, "group_norm_bwd_r1"),
            (2, "group_norm_bwd_r2"),
            (4, "group_norm_bwd_r4"),
        ];
        match regs_kernel(R, cg, s) {
            Some((name, threads, packs)) => (name, threads, ((2 * packs + 2 * cg) * 4) as u32),
            None => ("group_norm_bwd", GN_THREADS, (2 * cg * 4) as u32),
        }
    }

    fn check_dims(c: usize, s: usize, groups: usize) -> KernelResult<()> {
        if groups == 0 || c % groups != 0 || s == 0 {
            return Err(KernelError::Invalid(format!(
                "group_norm: {groups} groups for {c} channels of {s} positions"
            )));
        }
        Ok(())
    }

    fn check_len<T>(b: &DevBuf<T>, want: usize, what: &str) -> KernelResult<()> {
        if b.len() != want {
            return Err(KernelError::Invalid(format!(
                "disc_head: {what} has {} elements, expected {want}",
                b.len()
            )));
        }
        Ok(())
    }

    /// `(slope, flag)` kernel arguments of an optional fused LeakyReLU.
    fn leaky_args(leaky: Option<f32>) -> (f32, i32) {
        match leaky {
            Some(s) => (s, 1),
            None => (1.0, 0),
        }
    }

    /// GroupNorm with affine `weight`, `bias [C]`, followed by LeakyReLU(`slope`) when `leaky`
    /// is `Some(slope)` (the head uses 0.2), into `y` and the statistics `mean`, `rstd [B·G]`.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm_fwd_into(
        dev: &KernelDevice,
        (y, mean, rstd): (&DevBuf<bf16>, &DevBuf<f32>, &DevBuf<f32>),
        x: &DevBuf<bf16>,
        weight: &DevBuf<bf16>,
        bias: &DevBuf<bf16>,
        (b, c, s): (usize, usize, usize),
        groups: usize,
        eps: f32,
        leaky: Option<f32>,
    ) -> KernelResult<()> {
        check_dims(c, s, groups)?;
        check_len(x, b * c * s, "x")?;
        check_len(y, b * c * s, "y")?;
        check_len(weight, c, "weight")?;
        check_len(bias, c, "bias")?;
        check_len(mean, b * groups, "mean")?;
        check_len(rstd, b * groups, "rstd")?;
        if b == 0 {
            return Ok(());
        }
        let (slope, flag) = leaky_args(leaky);
        let (name, threads, _) = fwd_kernel(c / groups, s);
        dev.launch(
            name,
            LaunchCfg::linear((b * groups) as u32, threads),
            KernelArgs::new()
                .buf(y)
                .buf(mean)
                .buf(rstd)
                .buf(x)
                .buf(weight)
                .buf(bias)
                .i32(c as i32)
                .i32(s as i32)
                .i32(groups as i32)
                .f32(eps)
                .f32(slope)
                .i32(flag),
        )
    }

    /// [`group_norm_fwd_into`] with fresh buffers: returns (y, mean, rstd).
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm_fwd(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        weight: &DevBuf<bf16>,
        bias: &DevBuf<bf16>,
        (b, c, s): (usize, usize, usize),
        groups: usize,
        eps: f32,
        leaky: Option<f32>,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<f32>, DevBuf<f32>)> {
        let y = dev.alloc::<bf16>(b * c * s)?;
        let mean = dev.alloc::<f32>(b * groups)?;
        let rstd = dev.alloc::<f32>(b * groups)?;
        group_norm_fwd_into(
            dev,
            (&y, &mean, &rstd),
            x,
            weight,
            bias,
            (b, c, s),
            groups,
            eps,
            leaky,
        )?;
        Ok((y, mean, rstd))
    }

    /// Gradients of [`group_norm_fwd`] (with the same `leaky`): (dx bf16, dweight f32,
    /// dbias f32). The per-sample parameter partials are summed over the batch in sample order.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm_bwd(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        mean: &DevBuf<f32>,
        rstd: &DevBuf<f32>,
        weight: &DevBuf<bf16>,
        bias: &DevBuf<bf16>,
        dy: &DevBuf<bf16>,
        (b, c, s): (usize, usize, usize),
        groups: usize,
        leaky: Option<f32>,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<f32>, DevBuf<f32>)> {
        check_dims(c, s, groups)?;
        for (t, what) in [(x, "x"), (dy, "dy")] {
            check_len(t, b * c * s, what)?;
        }
        for (t, what) in [(weight, "weight"), (bias, "bias")] {
            check_len(t, c, what)?;
        }
        for (t, what) in [(mean, "mean"), (rstd, "rstd")] {
            check_len(t, b * groups, what)?;
        }
        if b == 0 {
            return Ok((
                dev.alloc::<bf16>(0)?,
                dev.zeros::<f32>(c)?,
                dev.zeros::<f32>(c)?,
            ));
        }
        let dx = dev.alloc::<bf16>(b * c * s)?;
        let dw = dev.alloc::<f32>(c)?;
        let db = dev.alloc::<f32>(c)?;
        // Per-(b, c) partials, reduced over b by the kernel's last block, and its counter (a
        // ticket: zero, and left at zero by the launch).
        let dw_part = dev.alloc::<f32>(b * c)?;
        let db_part = dev.alloc::<f32>(b * c)?;
        let counter = dev.column_tickets(1)?;
        let (slope, flag) = leaky_args(leaky);
        let (name, threads, shared) = bwd_kernel(c / groups, s);
        dev.launch(
            name,
            LaunchCfg::linear((b * groups) as u32, threads).with_shared(shared),
            KernelArgs::new()
                .buf(&dx)
                .buf(&dw)
                .buf(&db)
                .buf(&dw_part)
                .buf(&db_part)
                .buf(&counter)
                .buf(x)
                .buf(mean)
                .buf(rstd)
                .buf(weight)
                .buf(bias)
                .buf(dy)
                .i32(b as i32)
                .i32(c as i32)
                .i32(s as i32)
                .i32(groups as i32)
                .f32(slope)
                .i32(flag),
        )?;
        Ok((dx, dw, db))
    }

    /// The mean over the `s` positions of each of `rows` rows (`rows = B·C`) into `out [rows]`.
    pub fn mean_pool_fwd_into(
        dev: &KernelDevice,
        out: &DevBuf<f32>,
        x: &DevBuf<bf16>,
        (rows, s): (usize, usize),
    ) -> KernelResult<()> {
        check_len(x, rows * s, "x")?;
        check_len(out, rows, "out")?;
        if rows == 0 || s == 0 {
            return Ok(());
        }
        dev.launch(
            "mean_pool_fwd",
            LaunchCfg::linear(blocks_for(rows, POOL_ROWS), 32 * POOL_ROWS),
            KernelArgs::new()
                .buf(out)
                .buf(x)
                .i64(rows as i64)
                .i32(s as i32),
        )
    }

    pub fn mean_pool_fwd(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        (rows, s): (usize, usize),
    ) -> KernelResult<DevBuf<f32>> {
        let out = dev.alloc::<f32>(rows)?;
        mean_pool_fwd_into(dev, &out, x, (rows, s))?;
        Ok(out)
    }

    /// `dx[r, ·] = dy[r]/s` into `dx [rows, s]`.
    pub fn mean_pool_bwd_into(
        dev: &KernelDevice,
        dx: &DevBuf<bf16>,
        dy: &DevBuf<f32>,
        (rows, s): (usize, usize),
    ) -> KernelResult<()> {
        check_len(dx, rows * s, "dx")?;
        check_len(dy, rows, "dy")?;
        let n = rows * s;
        if n == 0 {
            return Ok(());
        }
        dev.launch(
            "mean_pool_bwd",
            LaunchCfg::linear(blocks_for(n.div_ceil(8), 256), 256),
            KernelArgs::new()
                .buf(dx)
                .buf(dy)
                .i64(rows as i64)
                .i32(s as i32),
        )
    }

    pub fn mean_pool_bwd(
        dev: &KernelDevice,
        dy: &DevBuf<f32>,
        (rows, s): (usize, usize),
    ) -> KernelResult<DevBuf<bf16>> {
        let dx = dev.alloc::<bf16>(rows * s)?;
        mean_pool_bwd_into(dev, &dx, dy, (rows, s))?;
        Ok(dx)
    }

    /// `logits[b] = Σ_c pooled[b, c]·w[c] + bias[0]` for `pooled [B, h]` (f32), `w [h]`, `bias [1]`.
    pub fn head_logits_fwd(
        dev: &KernelDevice,
        logits: &DevBuf<f32>,
        pooled: &DevBuf<f32>,
        w: &DevBuf<bf16>,
        bias: &DevBuf<bf16>,
    ) -> KernelResult<()> {
        let (b, h) = (logits.len(), w.len());
        if h == 0 || pooled.len() != b * h || bias.is_empty() {
            return Err(KernelError::Invalid(format!(
                "head_logits_fwd: {} pooled values for {b} logits of a {h}-wide head",
                pooled.len()
            )));
        }
        if b == 0 {
            return Ok(());
        }
        dev.launch(
            "head_logits_fwd",
            LaunchCfg::linear(blocks_for(b, 256), 256),
            KernelArgs::new()
                .buf(logits)
                .buf(pooled)
                .buf(w)
                .buf(bias)
                .i32(b as i32)
                .i32(h as i32),
        )
    }

    /// The backward of [`head_logits_fwd`] from `dl [B]`: writes `dpooled [B, h]` and, with
    /// `grads = Some((gw [h], gb [1]))`, adds the weight's and the bias's gradients into them.
    pub fn head_logits_bwd(
        dev: &KernelDevice,
        dpooled: &DevBuf<f32>,
        grads: Option<(&DevBuf<f32>, &DevBuf<f32>)>,
        dl: &DevBuf<f32>,
        pooled: &DevBuf<f32>,
        w: &DevBuf<bf16>,
    ) -> KernelResult<()> {
        let (b, h) = (dl.len(), w.len());
        let grads_ok = grads.is_none_or(|(gw, gb)| gw.len() == h && !gb.is_empty());
        if h == 0 || pooled.len() != b * h || dpooled.len() != b * h || !grads_ok {
            return Err(KernelError::Invalid(format!(
                "head_logits_bwd: {b} logit gradients, {} pooled, {} dpooled, a {h}-wide head",
                pooled.len(),
                dpooled.len()
            )));
        }
        let args = KernelArgs::new().buf(dpooled);
        let args = match grads {
            Some((gw, gb)) => args.buf(gw).buf(gb),
            None => args.null().null(),
        };
        dev.launch(
            "head_logits_bwd",
            LaunchCfg::linear(blocks_for((b * h).max(h + 1), 256), 256),
            args.buf(dl).buf(pooled).buf(w).i32(b as i32).i32(h as i32),
        )
    }
}

//! Memory bandwidth of every non-GEMM kernel family on a kernel device (issue 6 "Performance"):
//! GB/s computed from the bytes each kernel must move — every input read once, every output
//! written once — over the device time of a CUDA graph of launches, next to a device-to-device
//! copy (the `copy_bytes` kernel) as the ceiling. Each case cycles through enough copies of its
//! buffers that a copy is out of L2 (50 MB on an H100) before it is used again.
//!
//! On a GPU it runs the production shapes (adaLN at [4429 × 1536] bf16, ...); under the SIMT
//! emulator the same code at tiny sizes (a functional check: those timings say nothing about
//! speed). `advdmd bench kernels --device cuda|emu` and `cargo bench --bench kernels` both run it.

use crate::device::kernel::{DevBuf, KernelArgs, KernelDevice, KernelResult, LaunchCfg};
use crate::kernels::elementwise::{dev as ew, Activation};
use crate::kernels::{disc_head, optim, qknorm, sde};
use crate::Rng;
use bytemuck::Pod;
use half::bf16;

/// Bytes of buffers a case cycles through, at least: three times the H100's L2.
const ROTATE_BYTES: usize = 150 << 20;

struct Bench {
    dev: KernelDevice,
    gpu: bool,
    /// Normal samples tiled into every input (generating hundreds of millions would take the
    /// bench's time budget; values only need to be ordinary numbers).
    pool: Vec<f32>,
    next: usize,
    rows: Vec<KernelRow>,
}

/// One kernel's figure: bytes it must move per call and device milliseconds per call.
#[derive(Clone, Debug)]
pub struct KernelRow {
    pub kernel: String,
    pub shape: String,
    pub bytes: usize,
    pub ms: f64,
}

impl KernelRow {
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / (self.ms * 1e6)
    }
}

impl Bench {
    /// `gpu` on a GPU, `emu` under the emulator.
    fn size(&self, gpu: usize, emu: usize) -> usize {
        if self.gpu {
            gpu
        } else {
            emu
        }
    }

    /// How many copies of a case's buffers (`bytes` per call) to cycle through.
    fn sets(&self, bytes: usize) -> usize {
        if self.gpu {
            ROTATE_BYTES.div_ceil(bytes.max(1)).clamp(2, 64)
        } else {
            1
        }
    }

    fn upload_randn<T: Pod>(
        &mut self,
        n: usize,
        conv: impl Fn(f32) -> T,
    ) -> KernelResult<DevBuf<T>> {
        let start = self.next;
        self.next += 7919;
        let len = self.pool.len();
        let host: Vec<T> = (0..n).map(|i| conv(self.pool[(start + i) % len])).collect();
        self.dev.upload(&host)
    }
    fn bf(&mut self, n: usize) -> KernelResult<DevBuf<bf16>> {
        self.upload_randn(n, bf16::from_f32)
    }
    fn f(&mut self, n: usize) -> KernelResult<DevBuf<f32>> {
        self.upload_randn(n, |v| v)
    }

    /// Times `launch(set)` over the rotating sets: a few untimed calls, then `reps` calls
    /// between two events; records ms per call.
    fn time(
        &mut self,
        kernel: &str,
        shape: &str,
        bytes: usize,
        sets: usize,
        mut launch: impl FnMut(usize) -> KernelResult<()>,
    ) -> KernelResult<()> {
        let (warm, reps) = if self.gpu { (3, 30) } else { (1, 2) };
        for i in 0..warm {
            launch(i % sets)?;
        }
        self.dev.synchronize()?;
        // One graph of `reps` launches: device time without host launch gaps, which for the
        // 10 µs kernels here would otherwise set the measured rate.
        let ms = self.dev.time_graph_ms(|| {
            for i in 0..reps {
                launch(i % sets)?;
            }
            Ok(())
        })? as f64
            / reps as f64;
        self.rows.push(KernelRow {
            kernel: kernel.into(),
            shape: shape.into(),
            bytes,
            ms,
        });
        Ok(())
    }
}

/// The copy ceiling (first row, what every "% copy" divides by), then copies of the sizes the
/// kernels below move (27 MB: adaLN; 34 MB: the SDE kernels; 6 MB: GroupNorm): a ~10 µs kernel
/// loses a fixed microsecond or two to its launch and its tail that a 180 µs copy does not, so
/// these rows show what a kernel of that size can reach.
fn copy_baseline(b: &mut Bench) -> KernelResult<()> {
    for (gpu, emu) in [
        (256 << 20, 1 << 16),
        (27 << 19, 1 << 12),
        (17 << 20, 1 << 12),
        (3 << 20, 1 << 12),
    ] {
        let n = b.size(gpu, emu);
        let sets = b.sets(2 * n);
        let bufs: Vec<(DevBuf<u8>, DevBuf<u8>)> = (0..sets)
            .map(|_| -> KernelResult<_> { Ok((b.dev.zeros::<u8>(n)?, b.dev.zeros::<u8>(n)?)) })
            .collect::<KernelResult<Vec<_>>>()?;
        let dev = b.dev.clone();
        b.time("copy_bytes", &format!("{n} B"), 2 * n, sets, |i| {
            ew::copy(&dev, &bufs[i].1, &bufs[i].0)
        })?;
    }
    Ok(())
}

/// adaLN forward and the gated residual at the MMDiT's [tokens × hidden], into preallocated
/// outputs: the allocating launchers would put host-side allocation work between kernels this
/// short (~10 µs).
fn adaln(b: &mut Bench) -> KernelResult<()> {
    let (l, d) = (b.size(4429, 33), b.size(1536, 64));
    let rows = l;
    let per_call = 2 * rows * d * 2 + 2 * d * 2 + 2 * rows * 4;
    let sets = b.sets(per_call);
    struct Set {
        x: DevBuf<bf16>,
        y: DevBuf<bf16>,
        mean: DevBuf<f32>,
        rstd: DevBuf<f32>,
        shift: DevBuf<bf16>,
        scale: DevBuf<bf16>,
        out: DevBuf<bf16>,
        gate: DevBuf<bf16>,
    }
    let s: Vec<Set> = (0..sets)
        .map(|_| -> KernelResult<_> {
            Ok(Set {
                x: b.bf(rows * d)?,
                y: b.bf(rows * d)?,
                mean: b.dev.zeros(rows)?,
                rstd: b.dev.zeros(rows)?,
                shift: b.bf(d)?,
                scale: b.bf(d)?,
                out: b.bf(rows * d)?,
                gate: b.bf(d)?,
            })
        })
        .collect::<KernelResult<Vec<_>>>()?;
    let dev = b.dev.clone();
    let shape = format!("{rows}x{d} bf16");
    b.time("adaln_modulate_fwd", &shape, per_call, sets, |i| {
        let t = &s[i];
        crate::kernels::adaln::dev::adaln_modulate_fwd_into(
            &dev,
            &t.y,
            &t.mean,
            &t.rstd,
            &t.x,
            &t.shift,
            &t.scale,
            (1, l, d),
            1e-6,
        )
    })?;
    let bytes = 3 * rows * d * 2 + d * 2;
    b.time("gated_residual_fwd", &shape, bytes, sets, |i| {
        let t = &s[i];
        dev.launch(
            "gated_residual_fwd",
            LaunchCfg::linear((rows * d).div_ceil(8).div_ceil(256) as u32, 256),
            KernelArgs::new()
                .buf(&t.out)
                .buf(&t.x)
                .buf(&t.gate)
                .buf(&t.y)
                .i64(rows as i64)
                .i32(l as i32)
                .i32(d as i32)
                .i32(d as i32),
        )
    })?;
    // A gated residual with an adaLN in one pass — of its sum (a block's residual and the next
    // adaLN) and of its input (an MMDiT-X block's first residual and attn2's adaLN) — beside the
    // two kernels each replaces: x and y read, the sum and the adaLN written.
    use crate::kernels::adaln::dev as adaln_dev;
    let bytes = 4 * rows * d * 2 + 3 * d * 2 + 2 * rows * 4;
    for of_x in [false, true] {
        let (fused, two) = if of_x {
            (
                "gated_residual_adaln_of_x_fwd",
                "gated_residual_fwd + adaln_modulate_fwd (of x)",
            )
        } else {
            (
                "gated_residual_adaln_fwd",
                "gated_residual_fwd + adaln_modulate_fwd (of the sum)",
            )
        };
        b.time(fused, &shape, bytes, sets, |i| {
            let t = &s[i];
            let (mods, dims) = ((&t.shift, &t.scale, d), (1, l, d));
            let run = if of_x {
                adaln_dev::gated_residual_adaln_of_x_fwd_ld
            } else {
                adaln_dev::gated_residual_adaln_fwd_ld
            };
            run(&dev, &t.x, &t.y, (&t.gate, d), mods, dims, 1e-6).map(|_| ())
        })?;
        b.time(two, &shape, bytes, sets, |i| {
            let t = &s[i];
            let dims = (1, l, d);
            let mid = adaln_dev::gated_residual_fwd_ld(&dev, &t.x, (&t.gate, d), &t.y, dims)?;
            let normalised = if of_x { &t.x } else { &mid };
            let mods = (&t.shift, &t.scale, d);
            adaln_dev::adaln_modulate_fwd_ld(&dev, normalised, mods, dims, 1e-6).map(|_| ())
        })?;
    }
    // The gated residual's backward (dy, the gate's column partials, sum_splits): reads gate, y
    // and dz, writes dy and the f32 gate gradient.
    let bytes = 3 * rows * d * 2 + d * 2 + d * 4;
    b.time("gated_residual_bwd (3 kernels)", &shape, bytes, sets, |i| {
        let t = &s[i];
        crate::kernels::adaln::dev::gated_residual_bwd(&dev, &t.gate, &t.y, &t.x, (1, l, d))
            .map(|_| ())
    })?;
    Ok(())
}

/// The backwards with column sums over tokens — the gated residual's one pass (dy, dgate and the
/// producing layer's bias gradient: what the model runs), the MLP's GELU backward with fc1's bias
/// gradient at [tokens × 4·D], and adaLN's as the model runs it (dx added into the f32 residual
/// gradient in place, dshift, dscale) — at the MMDiT's shapes: 4429 rows,
/// SD3.5-medium's 1024 px image stream (1 × 4096), 512 px at batch 2 (2 × 1024) and a text stream
/// (1 × 333), in both column layouts and both ways of summing the partials, so each change's
/// gain is a ratio measured in one run.
fn column_backwards(b: &mut Bench) -> KernelResult<()> {
    use crate::kernels::adaln::dev::{self as adaln_dev, ColumnLayout, ColumnSums};
    let timed = column_backward_rows(b);
    adaln_dev::set_column_layout(ColumnLayout::RowLanes);
    adaln_dev::set_column_sums(ColumnSums::SumSplits);
    timed
}

fn column_backward_rows(b: &mut Bench) -> KernelResult<()> {
    use crate::kernels::adaln::dev::{self as adaln_dev, ColumnLayout, ColumnSums};
    let d = b.size(1536, 64);
    let shapes: &[(usize, usize)] = if b.gpu {
        &[(1, 4429), (1, 4096), (2, 1024), (1, 333)]
    } else {
        &[(1, 33), (2, 40)]
    };
    struct Set {
        x: DevBuf<bf16>,
        dy: DevBuf<bf16>,
        mean: DevBuf<f32>,
        rstd: DevBuf<f32>,
        modulation: DevBuf<bf16>,
        grad: DevBuf<f32>,
        bias: DevBuf<f32>,
    }
    for &(batch, l) in shapes {
        let rows = batch * l;
        // the adaLN backward's traffic, the larger of the two
        let adaln_bytes = rows * d * (2 + 2 + 4 + 4) + rows * 8 + batch * d * (2 + 2 * 4);
        let gated_bytes = 3 * rows * d * 2 + batch * d * (2 + 4) + 2 * d * 4;
        let sets = b.sets(adaln_bytes);
        let s: Vec<Set> = (0..sets)
            .map(|_| -> KernelResult<_> {
                Ok(Set {
                    x: b.bf(rows * d)?,
                    dy: b.bf(rows * d)?,
                    mean: b.f(rows)?,
                    rstd: b.f(rows)?,
                    modulation: b.bf(batch * d)?,
                    grad: b.f(rows * d)?,
                    bias: b.f(d)?,
                })
            })
            .collect::<KernelResult<Vec<_>>>()?;
        // the MLP's GELU backward with fc1's bias gradient, [rows, 4·D]
        let gelu_bytes = 3 * rows * 4 * d * 2 + 2 * 4 * d * 4;
        let gelu_sets = b.sets(gelu_bytes);
        let g = (0..gelu_sets)
            .map(|_| -> KernelResult<_> {
                Ok((
                    b.bf(rows * 4 * d)?,
                    b.bf(rows * 4 * d)?,
                    b.bf(rows * 4 * d)?,
                    b.f(4 * d)?,
                ))
            })
            .collect::<KernelResult<Vec<_>>>()?;
        let dev = b.dev.clone();
        let shape = format!("{batch}x{l}x{d} bf16");
        // in-kernel sums (measured slower: no longer the default), then the default "row lanes"
        // and "one lane" (each with a sum_splits launch after the kernel)
        for (layout, sums, tag) in [
            (
                ColumnLayout::RowLanes,
                ColumnSums::InKernel,
                "row lanes, in-kernel sums",
            ),
            (ColumnLayout::RowLanes, ColumnSums::SumSplits, "row lanes"),
            (ColumnLayout::OneLane, ColumnSums::SumSplits, "one lane"),
        ] {
            adaln_dev::set_column_layout(layout);
            adaln_dev::set_column_sums(sums);
            let name = format!("gated_residual_bwd_bias, {tag}");
            b.time(&name, &shape, gated_bytes, sets, |i| {
                let t = &s[i];
                adaln_dev::gated_residual_bwd_bias(
                    &dev,
                    (&t.modulation, d),
                    &t.x,
                    &t.dy,
                    (batch, l, d),
                    &t.bias,
                )
                .map(|_| ())
            })?;
            let name = format!("gelu_tanh_bwd_colsum, {tag}");
            let wide = format!("{rows}x{} bf16", 4 * d);
            b.time(&name, &wide, gelu_bytes, gelu_sets, |i| {
                let (x, dy, dx, bias) = &g[i];
                ew::gelu_tanh_bwd_colsum(&dev, dx, x, dy, (rows, 4 * d), bias)
            })?;
            let name = format!("adaln_modulate_bwd_acc, {tag}");
            b.time(&name, &shape, adaln_bytes, sets, |i| {
                let t = &s[i];
                adaln_dev::adaln_modulate_bwd_acc_ld(
                    &dev,
                    &t.x,
                    (&t.modulation, d),
                    &t.mean,
                    &t.rstd,
                    &t.dy,
                    (batch, l, d),
                    (&t.grad, None, &t.grad),
                )
                .map(|_| ())
            })?;
        }
        // An MMDiT-X block's two adaLNs of x (its first and attn2's) in one dx pass, beside two
        // adaln_modulate_bwd_acc (the defaults: row lanes, a sum_splits launch)
        adaln_dev::set_column_layout(ColumnLayout::RowLanes);
        adaln_dev::set_column_sums(ColumnSums::SumSplits);
        let pair_bytes = rows * d * (2 + 2 * 2 + 4 + 4) + rows * 16 + batch * d * 2 * (2 + 2 * 4);
        let other = |i: usize| &s[(i + 1) % sets];
        b.time(
            "adaln_modulate_bwd_acc2 (two adaLNs of x)",
            &shape,
            pair_bytes,
            sets,
            |i| {
                let (t, u) = (&s[i], other(i));
                let pair = [t, u].map(|v| adaln_dev::LnBwdIn {
                    scale: (&v.modulation, d),
                    mean: &t.mean,
                    rstd: &t.rstd,
                    dy: &v.dy,
                });
                let acc = (&t.grad, None, &t.grad);
                adaln_dev::adaln_modulate_bwd_acc2_ld(&dev, &t.x, pair, (batch, l, d), acc)
                    .map(|_| ())
            },
        )?;
        b.time("adaln_modulate_bwd_acc x2", &shape, pair_bytes, sets, |i| {
            let (t, u) = (&s[i], other(i));
            for v in [t, u] {
                adaln_dev::adaln_modulate_bwd_acc_ld(
                    &dev,
                    &t.x,
                    (&v.modulation, d),
                    &t.mean,
                    &t.rstd,
                    &v.dy,
                    (batch, l, d),
                    (&t.grad, None, &t.grad),
                )?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// QK RMSNorm over SD3-medium's heads: [tokens·heads, 64].
fn qk(b: &mut Bench) -> KernelResult<()> {
    use crate::kernels::adaln::dev::{self as adaln_dev, ColumnSums};
    let (rows, d) = (b.size(4429 * 24, 12 * 24), 64);
    let per_call = 2 * rows * d * 2 + rows * 4 + d * 2;
    let sets = b.sets(per_call);
    let s: Vec<_> = (0..sets)
        .map(|_| -> KernelResult<_> {
            Ok({
                (
                    b.bf(rows * d)?,
                    b.bf(rows * d)?,
                    b.dev.zeros::<f32>(rows)?,
                    b.bf(d)?,
                    b.bf(rows * d)?,
                    b.dev.zeros::<f32>(d)?,
                )
            })
        })
        .collect::<KernelResult<Vec<_>>>()?;
    let dev = b.dev.clone();
    let shape = format!("{rows}x{d} bf16");
    b.time("rms_norm_fwd", &shape, per_call, sets, |i| {
        let (x, y, rstd, w, _, _) = &s[i];
        qknorm::dev::rms_norm_fwd_into(&dev, y, rstd, x, w, (rows, d), 1e-6)
    })?;
    let bytes = 3 * rows * d * 2 + rows * 4 + d * 2 + d * 4;
    // the weight gradient's partials summed by the kernel's last block, then by a
    // sum_splits launch (the default)
    for (sums, tag) in SUMS {
        adaln_dev::set_column_sums(sums);
        b.time(&format!("rms_norm_bwd ({tag})"), &shape, bytes, sets, |i| {
            let (x, dx, rstd, w, dy, dw) = &s[i];
            qknorm::dev::rms_norm_bwd_into(
                &dev,
                dx,
                dw,
                x,
                w,
                rstd,
                dy,
                (rows, d),
                qknorm::dev::MAX_PARTS,
            )
        })?;
    }
    // the model's layout: q read from (and its gradient written into) the fused qkv tensor,
    // [tokens, 3·heads·64], a token's heads 128-byte rows in a row of 3·heads·64
    let heads = 24;
    let fused = rows / heads * 3 * heads * d;
    let layout = qknorm::dev::RowLayout {
        heads,
        ld: 3 * heads * d,
        off: 0,
    };
    let laid: Vec<_> = (0..sets)
        .map(|_| -> KernelResult<_> { Ok((b.bf(fused)?, b.bf(fused)?, b.dev.zeros::<f32>(d)?)) })
        .collect::<KernelResult<Vec<_>>>()?;
    let shape = format!("{rows}x{d} bf16 in qkv");
    b.time("rms_norm_fwd (laid)", &shape, per_call, sets, |i| {
        let ((x, _, _), (_, y, rstd, w, _, _)) = (&laid[i], &s[i]);
        qknorm::dev::rms_norm_fwd_laid_into(&dev, y, rstd, x, layout, w, (rows, d), 1e-6)
    })?;
    b.time("rms_norm_bwd (laid)", &shape, bytes, sets, |i| {
        let ((x, dx, _), (_, _, rstd, w, dy, _)) = (&laid[i], &s[i]);
        qknorm::dev::rms_norm_bwd_laid(&dev, dx, x, layout, w, rstd, dy, (rows, d)).map(|_| ())
    })?;
    // q's and k's in one launch each way, as the model runs them: twice the bytes of a row above
    let k_layout = qknorm::dev::RowLayout {
        off: heads * d,
        ..layout
    };
    let pair = [layout, k_layout];
    b.time(
        "rms_norm_fwd2 (q and k, laid)",
        &shape,
        2 * per_call,
        sets,
        |i| {
            let ((x, _, _), (_, _, _, w, _, _)) = (&laid[i], &s[i]);
            qknorm::dev::rms_norm_fwd_laid_pair(&dev, x, pair, [w, w], (rows, d), 1e-6).map(|_| ())
        },
    )?;
    for (sums, tag) in SUMS {
        adaln_dev::set_column_sums(sums);
        let name = format!("rms_norm_bwd2 (q and k, laid, {tag})");
        b.time(&name, &shape, 2 * bytes, sets, |i| {
            let ((x, dx, dk), (_, _, rstd, w, dy, dq)) = (&laid[i], &s[i]);
            let dws = Some([(dq, false), (dk, true)]);
            let (ws, rs, dys) = ([w, w], [rstd, rstd], [dy, dy]);
            qknorm::dev::rms_norm_bwd_laid_pair(&dev, dx, x, pair, ws, rs, dys, (rows, d), dws)
        })?;
    }
    adaln_dev::set_column_sums(ColumnSums::SumSplits);
    // q's gradient from the attention backward's f32 dQ accumulator: read by the pair's launch
    // itself (the default), or first converted to bf16 by joint_attn_dq_convert (the first way)
    let accs: Vec<_> = (0..sets)
        .map(|_| b.f(rows * d))
        .collect::<KernelResult<Vec<_>>>()?;
    let none = (b.dev.alloc::<bf16>(0)?, b.dev.alloc::<f32>(0)?);
    let scale = 0.125;
    let name = "rms_norm_bwd2 (q from the f32 dQ accumulator, laid)";
    b.time(name, &shape, 2 * bytes + rows * d * 2, sets, |i| {
        let ((x, dx, dk), (_, _, rstd, w, dy, dq)) = (&laid[i], &s[i]);
        let dws = Some([(dq, false), (dk, true)]);
        let (ws, rs, acc) = ([w, w], [rstd, rstd], (&accs[i], scale));
        qknorm::dev::rms_norm_bwd_laid_pair_dq32(&dev, dx, x, pair, ws, rs, acc, dy, (rows, d), dws)
    })?;
    let name = "joint_attn_dq_convert + rms_norm_bwd2 (laid)";
    b.time(name, &shape, 2 * bytes + rows * d * 6, sets, |i| {
        let ((x, dx, dk), (_, _, rstd, w, dy, dq)) = (&laid[i], &s[i]);
        let q16 = &s[(i + 1) % sets].4;
        let (acc, (none16, none32)) = (&accs[i], &none);
        crate::kernels::attention::dev::dq_convert(&dev, [q16, none16], [acc, none32], scale)?;
        let dws = Some([(dq, false), (dk, true)]);
        let (ws, rs, dys) = ([w, w], [rstd, rstd], [q16, dy]);
        qknorm::dev::rms_norm_bwd_laid_pair(&dev, dx, x, pair, ws, rs, dys, (rows, d), dws)
    })?;
    Ok(())
}

/// Who sums a backward's partial rows, with the rows' tags: in-kernel, then the default.
const SUMS: [(crate::kernels::adaln::dev::ColumnSums, &str); 2] = [
    (
        crate::kernels::adaln::dev::ColumnSums::InKernel,
        "in-kernel sums",
    ),
    (
        crate::kernels::adaln::dev::ColumnSums::SumSplits,
        "+sum_splits",
    ),
];

/// GELU and SiLU over an MLP hidden activation [tokens × 4·hidden]; the casts over 32 Mi values.
fn elementwise(b: &mut Bench) -> KernelResult<()> {
    let n = b.size(4429 * 6144, 4099);
    let sets = b.sets(3 * n * 2);
    let s: Vec<_> = (0..sets)
        .map(|_| -> KernelResult<_> { Ok((b.bf(n)?, b.bf(n)?, b.bf(n)?)) })
        .collect::<KernelResult<Vec<_>>>()?;
    let dev = b.dev.clone();
    let shape = format!("{n} bf16");
    for (act, name) in [
        (Activation::GeluTanh, "gelu_tanh"),
        (Activation::Silu, "silu"),
    ] {
        b.time(&format!("{name}_fwd"), &shape, 2 * n * 2, sets, |i| {
            ew::activation_fwd_into(&dev, &s[i].1, &s[i].0, act)
        })?;
        b.time(&format!("{name}_bwd"), &shape, 3 * n * 2, sets, |i| {
            ew::activation_bwd_into(&dev, &s[i].2, &s[i].0, &s[i].1, act)
        })?;
    }
    drop(s);
    let n = b.size(32 << 20, 4099);
    let sets = b.sets(n * 6);
    let s: Vec<_> = (0..sets)
        .map(|_| -> KernelResult<_> { Ok((b.f(n)?, b.bf(n)?)) })
        .collect::<KernelResult<Vec<_>>>()?;
    let shape = format!("{n}");
    b.time("cast_f32_to_bf16", &shape, n * 6, sets, |i| {
        ew::cast_f32_to_bf16_into(&dev, &s[i].1, &s[i].0)
    })?;
    b.time("cast_bf16_to_f32", &shape, n * 6, sets, |i| {
        ew::cast_bf16_to_f32_into(&dev, &s[i].0, &s[i].1)
    })?;
    Ok(())
}

/// The MLP's backward through its GELU at SD3.5-medium 1024 px ([4096 × 6144], K = 1536): the
/// DGeluBgrad GEMM epilogue (its bf16 bias gradient then added into the f32 gradient) against
/// `gemm_bf16_dgelu` (plain GEMM, then GELU′ with the column sums in one pass). GEMM-bound:
/// compare the µs.
fn mlp_backward(b: &mut Bench) -> KernelResult<()> {
    use crate::device::kernel::{EpilogueKind, GemmSpec};
    use crate::kernels::gemm::dev::{gemm_bf16, gemm_bf16_dgelu, EpilogueBufs};
    use crate::kernels::shape::dev::accumulate_bf16;
    let (m, n, k) = (b.size(4096, 48), b.size(6144, 96), b.size(1536, 32));
    let bytes = (m * k + k * n + 2 * m * n) * 2;
    let sets = b.sets(bytes);
    let s: Vec<_> = (0..sets)
        .map(|_| -> KernelResult<_> {
            Ok((b.bf(m * k)?, b.bf(k * n)?, b.bf(m * n)?, b.bf(m * n)?))
        })
        .collect::<KernelResult<Vec<_>>>()?;
    let (dh, db, db32) = (b.bf(m * n)?, b.bf(n)?, b.f(n)?);
    let dev = b.dev.clone();
    let shape = format!("{m}x{n}x{k} bf16");
    let spec = GemmSpec {
        m,
        n,
        k,
        trans_a: false,
        trans_b: false,
        epilogue: EpilogueKind::DGeluBgrad,
    };
    b.time(
        "mlp_bwd: DGeluBgrad GEMM (+bias add)",
        &shape,
        bytes,
        sets,
        |i| {
            let (dy, w, pre, dpre) = &s[i];
            let ep = EpilogueBufs {
                aux: Some(pre),
                bias_grad: Some(&db),
                ..Default::default()
            };
            gemm_bf16(&dev, spec, dy, w, dpre, ep)?;
            accumulate_bf16(&dev, &db32, &db)
        },
    )?;
    b.time(
        "mlp_bwd: GEMM + gelu_tanh_bwd_colsum",
        &shape,
        bytes,
        sets,
        |i| {
            let (dy, w, pre, dpre) = &s[i];
            gemm_bf16_dgelu(&dev, (m, n, k), dy, w, pre, &dh, dpre, Some(&db32))
        },
    )?;
    drop(s);
    qkv_weight_grad(b)
}

/// The qkv projection's weight gradient with its bias gradient at SD3.5-medium 1024 px
/// ([4608 × 1536], 4096 tokens, added into f32): the BGRADB epilogue against a plain GEMM and
/// `colsum_acc`. GEMM-bound: compare the µs.
fn qkv_weight_grad(b: &mut Bench) -> KernelResult<()> {
    use crate::device::kernel::{EpilogueKind, GemmSpec};
    use crate::kernels::adaln::dev::colsum_acc;
    use crate::kernels::gemm::dev::gemm_bf16_acc_f32;
    let (out, inp, rows) = (b.size(4608, 96), b.size(1536, 64), b.size(4096, 40));
    let bytes = (rows * (out + inp)) * 2 + out * inp * 8;
    let sets = b.sets(bytes);
    let s: Vec<_> = (0..sets)
        .map(|_| -> KernelResult<_> { Ok((b.bf(rows * out)?, b.bf(rows * inp)?)) })
        .collect::<KernelResult<Vec<_>>>()?;
    let (gw, gb) = (b.f(out * inp)?, b.f(out)?);
    let dev = b.dev.clone();
    let shape = format!("{out}x{inp}x{rows} f32+=");
    let spec = |epilogue| GemmSpec {
        m: out,
        n: inp,
        k: rows,
        trans_a: true,
        trans_b: false,
        epilogue,
    };
    b.time("qkv_wgrad: BgradB GEMM", &shape, bytes, sets, |i| {
        let (dy, x) = &s[i];
        gemm_bf16_acc_f32(&dev, spec(EpilogueKind::BgradB), dy, x, &gw, Some(&gb))
    })?;
    b.time("qkv_wgrad: GEMM + colsum_acc", &shape, bytes, sets, |i| {
        let (dy, x) = &s[i];
        gemm_bf16_acc_f32(&dev, spec(EpilogueKind::None), dy, x, &gw, None)?;
        colsum_acc(&dev, dy, (rows, out), &gb)
    })
}

/// The modulation layers' products at batch 1 and 2 (SD3.5-medium's [9216 × 1536] with its bias):
/// the forward (`gemv_small_m`; bytes: the weight read) and the weight gradient
/// (`weight_grad_small_k`; bytes: the f32 gradient read and written, or written only on its first
/// write after zero_grad). cuBLASLt on an H200
/// (2026-11-27): 14.7 µs and 67 µs at batch 1.
fn modulation_products(b: &mut Bench) -> KernelResult<()> {
    use crate::device::kernel::{EpilogueKind, GemmSpec};
    use crate::kernels::gemm::dev::{gemm_bf16_f32, gemm_bf16_via, EpilogueBufs, SmallProducts};
    let (out, inp) = (b.size(9216, 40), b.size(1536, 64));
    let dev = b.dev.clone();
    for rows in [1, 2] {
        let wsets = b.sets(out * inp * 2);
        let w: Vec<_> = (0..wsets)
            .map(|_| b.bf(out * inp))
            .collect::<KernelResult<Vec<_>>>()?;
        let (x, bias, y) = (b.bf(rows * inp)?, b.bf(out)?, b.bf(rows * out)?);
        let fwd = GemmSpec {
            m: rows,
            n: out,
            k: inp,
            trans_a: false,
            trans_b: true,
            epilogue: EpilogueKind::Bias,
        };
        let shape = format!("{rows}x{out}x{inp} bf16");
        let ep = EpilogueBufs {
            bias: Some(&bias),
            ..Default::default()
        };
        // ours, then the same product through cuBLASLt: the reference it must beat
        for (name, via) in [
            ("gemv_small_m (+bias)", SmallProducts::OwnKernels),
            ("gemv: cuBLASLt (+bias)", SmallProducts::Library),
        ] {
            b.time(name, &shape, out * inp * 2, wsets, |i| {
                gemm_bf16_via(&dev, fwd, &x, &w[i], &y, ep, via)
            })?;
        }
        // the input gradient added into the f32 gradient of the conditioning: ours, cuBLASLt
        // with f32 output, and the path before ours (cuBLASLt in bf16, then accumulated)
        let (dm, dx, dx16) = (b.bf(rows * out)?, b.f(rows * inp)?, b.bf(rows * inp)?);
        let bwd = GemmSpec::nn(rows, inp, out);
        let shape = format!("{rows}x{inp}x{out} f32+=");
        for (sums, tag) in SUMS {
            crate::kernels::adaln::dev::set_column_sums(sums);
            let name = format!("gemv_small_m_nn (+=f32, {tag})");
            b.time(&name, &shape, out * inp * 2, wsets, |i| {
                let via = SmallProducts::OwnKernels;
                gemm_bf16_f32(&dev, bwd, &dm, &w[i], &dx, None, false, via)
            })?;
        }
        crate::kernels::adaln::dev::set_column_sums(SUMS[1].0);
        b.time(
            "input grad: cuBLASLt (+=f32)",
            &shape,
            out * inp * 2,
            wsets,
            |i| {
                let via = SmallProducts::Library;
                gemm_bf16_f32(&dev, bwd, &dm, &w[i], &dx, None, false, via)
            },
        )?;
        b.time(
            "input grad: cuBLASLt bf16 + accumulate",
            &shape,
            out * inp * 2,
            wsets,
            |i| {
                crate::kernels::gemm::dev::gemm_bf16(
                    &dev,
                    bwd,
                    &dm,
                    &w[i],
                    &dx16,
                    EpilogueBufs::default(),
                )?;
                crate::kernels::shape::dev::accumulate_bf16(&dev, &dx, &dx16)
            },
        )?;
        drop(w);
        let bytes = out * inp * 8 + (out + inp) * rows * 2 + out * 8;
        let sets = b.sets(bytes);
        let s: Vec<_> = (0..sets)
            .map(|_| -> KernelResult<_> {
                Ok((
                    b.bf(rows * out)?,
                    b.bf(rows * inp)?,
                    b.f(out * inp)?,
                    b.f(out)?,
                ))
            })
            .collect::<KernelResult<Vec<_>>>()?;
        let wgrad = GemmSpec {
            m: out,
            n: inp,
            k: rows,
            trans_a: true,
            trans_b: false,
            epilogue: EpilogueKind::BgradB,
        };
        // accumulating (ours, then cuBLASLt), and the first write after zero_grad (the
        // gradient written, not read)
        let first_write = bytes - out * inp * 4;
        for (name, op, bytes, overwrite, via) in [
            (
                "weight_grad_small_k (+bias)",
                "+=",
                bytes,
                false,
                SmallProducts::OwnKernels,
            ),
            (
                "weight_grad: cuBLASLt (+bias)",
                "+=",
                bytes,
                false,
                SmallProducts::Library,
            ),
            (
                "weight_grad_small_k (=, +bias)",
                "=",
                first_write,
                true,
                SmallProducts::OwnKernels,
            ),
        ] {
            let shape = format!("{out}x{inp}x{rows} f32{op}");
            b.time(name, &shape, bytes, sets, |i| {
                let (dy, x, g, gb) = &s[i];
                gemm_bf16_f32(&dev, wgrad, dy, x, g, Some(gb), overwrite, via)
            })?;
        }
    }
    Ok(())
}

/// The SDE step, the DMD gradient and flow noising over SD3 1024² latents: [8, 16·128·128] f32.
fn sde_kernels(b: &mut Bench) -> KernelResult<()> {
    let (bs, d) = (b.size(8, 2), b.size(16 * 128 * 128, 5000));
    let n = bs * d;
    let sets = b.sets(7 * n * 4);
    let s: Vec<Vec<DevBuf<f32>>> = (0..sets)
        .map(|_| (0..7).map(|_| b.f(n)).collect::<KernelResult<Vec<_>>>())
        .collect::<KernelResult<Vec<_>>>()?;
    let sig = b.dev.upload(&vec![0.9f32; bs])?;
    let sig_next = b.dev.upload(&vec![0.75f32; bs])?;
    let lp = b.dev.zeros::<f64>(bs)?;
    let dev = b.dev.clone();
    let shape = format!("{bs}x{d} f32");
    // Reads x, v, z; writes x', x̂0, μ, ∂ℓ/∂v̂ (the log-prob itself is B values): the
    // log-probabilities formed by each sample's last block, then by a
    // sde_logprob_finalize launch after the kernel (the default)
    let names = [
        "sde_rho_step (in-kernel log-prob)",
        "sde_rho_step (+finalize)",
    ];
    for ((sums, _), name) in SUMS.into_iter().zip(names) {
        crate::kernels::adaln::dev::set_column_sums(sums);
        b.time(name, &shape, 7 * n * 4, sets, |i| {
            let t = &s[i];
            let out = sde::dev::RhoStepOutputs {
                next: Some(&t[3]),
                x0: Some(&t[4]),
                mean: Some(&t[5]),
                grad_v: Some(&t[6]),
                log_prob: &lp,
            };
            sde::dev::rho_step_into(
                &dev,
                &out,
                &t[0],
                &t[1],
                sde::dev::NextState::Sample(&t[2]),
                &sig,
                &sig_next,
                0.9877,
                (bs, d),
            )
        })?;
    }
    crate::kernels::adaln::dev::set_column_sums(SUMS[1].0);
    // Must move: x, x̂0_real, x̂0_fake in, g out (the kernel pair reads x̂0_real twice).
    b.time("dmd_gradient (2 kernels)", &shape, 4 * n * 4, sets, |i| {
        let t = &s[i];
        sde::dev::dmd_gradient_into(&dev, &t[3], &t[0], &t[1], &t[2], (bs, d), 1.0)
    })?;
    b.time("flow_noise", &shape, 4 * n * 4, sets, |i| {
        let t = &s[i];
        sde::dev::flow_noise_into(&dev, &t[3], Some(&t[4]), &t[0], &t[1], &sig, (bs, d))
    })?;
    Ok(())
}

/// The discriminator head's GroupNorm(32) + LeakyReLU and mean pool (ALGORITHM.md §2,
/// src/train/disc_head.rs) for SD3.5-medium at 1024px, batch 2: latents 128×128 → 64×64 image
/// tokens of D = 1536 → Conv 4×4 s2 (D → 768) → GroupNorm/LeakyReLU on [2, 768, 32·32] bf16
/// (3.1 MB) → Conv 1×1 (768 → 1) → mean pool of [2, 1, 32·32]. Also [4, 768, 32·32], the shape of
/// the earlier table, for comparison. At these sizes a launch is a few µs against ~1.5 µs of
/// copying: the rates below are bounded by launch latency, not bandwidth.
fn head(b: &mut Bench) -> KernelResult<()> {
    let (c, sp, g) = (b.size(768, 64), b.size(1024, 37), 32);
    for bs in [b.size(2, 2), b.size(4, 3)] {
        head_case(b, bs, c, sp, g, bs == b.size(2, 2))?;
    }
    Ok(())
}

/// The head's 4 × 4 stride-2 convolution's gather and its adjoint (`cuda/conv.cu`) on the
/// MMDiT's image tokens — SD3.5-medium's 1536 channels at 512 px (32 × 32 tokens, the AdvDMD
/// iteration's 2 samples) and 1024 px (64 × 64, 1 sample) — the tiled kernels (the launchers'
/// choice) beside the plain ones they replace.
fn head_conv(b: &mut Bench) -> KernelResult<()> {
    use crate::kernels::conv::tokens::{dev as conv, ConvDims};
    let c = b.size(1536, 16);
    let cases = [(b.size(2, 1), b.size(32, 8)), (1, b.size(64, 12))];
    for (case, (bs, side)) in cases.into_iter().enumerate() {
        let d = ConvDims {
            b: bs,
            h: side,
            w: side,
            c,
            kh: 4,
            kw: 4,
            stride: 2,
            pad: 1,
        };
        let (nx, nc) = (bs * side * side * c, bs * d.rows() * d.spatial());
        let bytes = (nx + nc) * 2;
        let sets = b.sets(bytes);
        let s: Vec<_> = (0..sets)
            .map(|_| -> KernelResult<_> { Ok((b.bf(nx)?, b.bf(nc)?)) })
            .collect::<KernelResult<Vec<_>>>()?;
        let dev = b.dev.clone();
        let shape = format!("{bs}x{side}x{side}x{c} k4s2");
        // the forward's bias-augmented weight [h, K+1] (h = C/2) from conv1's [h, K]: an
        // odd destination stride, so the element-wise path of copy_cols_bf16
        if case == 1 {
            let (h, k) = (c / 2, d.rows() - 1);
            let (w, w_aug) = (b.bf(h * k)?, b.dev.zeros::<bf16>(h * (k + 1))?);
            b.time(
                "copy_cols_bf16 (odd stride)",
                &format!("{h}x{k} bf16"),
                2 * h * k * 2,
                1,
                |_| {
                    use crate::kernels::shape::dev::{copy_cols, Cols};
                    let (dst, src) = (Cols { ld: k + 1, off: 0 }, Cols { ld: k, off: 0 });
                    copy_cols(&dev, &w_aug, dst, &w, src, h, k)
                },
            )?;
        }
        for tiled in [true, false] {
            let tag = if tiled { "" } else { ", plain" };
            b.time(&format!("im2col_tokens{tag}"), &shape, bytes, sets, |i| {
                conv::im2col_with(&dev, &s[i].1, &s[i].0, &d, tiled)
            })?;
            // the bias row is not read
            let bytes = bytes - bs * d.spatial() * 2;
            b.time(&format!("col2im_tokens{tag}"), &shape, bytes, sets, |i| {
                conv::col2im_with(&dev, &s[i].0, &s[i].1, &d, tiled)
            })?;
        }
    }
    Ok(())
}

fn head_case(
    b: &mut Bench,
    bs: usize,
    c: usize,
    sp: usize,
    g: usize,
    pool_realistic: bool,
) -> KernelResult<()> {
    let n = bs * c * sp;
    let sets = b.sets(3 * n * 2);
    let s: Vec<_> = (0..sets)
        .map(|_| -> KernelResult<_> {
            Ok({
                (
                    b.bf(n)?,
                    b.bf(n)?,
                    b.bf(n)?,
                    b.dev.zeros::<f32>(bs * g)?,
                    b.dev.zeros::<f32>(bs * g)?,
                )
            })
        })
        .collect::<KernelResult<Vec<_>>>()?;
    let (w, bias) = (b.bf(c)?, b.bf(c)?);
    let dev = b.dev.clone();
    let shape = format!("{bs}x{c}x{sp} bf16");
    b.time("group_norm_fwd+leaky", &shape, 2 * n * 2, sets, |i| {
        let (x, y, _, mean, rstd) = &s[i];
        disc_head::dev::group_norm_fwd_into(
            &dev,
            (y, mean, rstd),
            x,
            &w,
            &bias,
            (bs, c, sp),
            g,
            1e-5,
            Some(0.2),
        )
    })?;
    // The backward through its public launcher (allocates its outputs and partials; one kernel,
    // its last block's counter a ticket of the device's ring: no memset since the seventeenth
    // session).
    b.time("group_norm_bwd+leaky", &shape, 3 * n * 2, sets, |i| {
        let (x, _, dy, mean, rstd) = &s[i];
        disc_head::dev::group_norm_bwd(
            &dev,
            x,
            mean,
            rstd,
            &w,
            &bias,
            dy,
            (bs, c, sp),
            g,
            Some(0.2),
        )
        .map(|_| ())
    })?;
    // The head pools the 1-channel output of its Conv 1×1: [B, 1, S] (the first case); the
    // [B, C, S] pool of the second case only tracks the kernels' bandwidth at a larger size.
    let rows = if pool_realistic { bs } else { bs * c };
    let pn = rows * sp;
    let psets = b.sets(2 * pn * 2);
    let p: Vec<_> = (0..psets)
        .map(|_| -> KernelResult<_> { Ok((b.bf(pn)?, b.bf(pn)?, b.f(rows)?)) })
        .collect::<KernelResult<Vec<_>>>()?;
    let pshape = format!("{bs}x{}x{sp} bf16", rows / bs);
    b.time("mean_pool_fwd", &pshape, pn * 2 + rows * 4, psets, |i| {
        disc_head::dev::mean_pool_fwd_into(&dev, &p[i].2, &p[i].0, (rows, sp))
    })?;
    b.time("mean_pool_bwd", &pshape, pn * 2 + rows * 4, psets, |i| {
        disc_head::dev::mean_pool_bwd_into(&dev, &p[i].1, &p[i].2, (rows, sp))
    })?;
    Ok(())
}

/// The fused AdamW over 16 Mi f32 masters (with the bf16 copy, with and without the EMA) and the
/// gradient norm over 64 Mi values.
fn optimiser(b: &mut Bench) -> KernelResult<()> {
    let n = b.size(16 << 20, 4103);
    let sets = b.sets(n * 38);
    // w, m, g, ema random; v zeros (so sqrt(v) stays a number).
    let s: Vec<Vec<DevBuf<f32>>> = (0..sets)
        .map(|_| (0..4).map(|_| b.f(n)).collect::<KernelResult<Vec<_>>>())
        .collect::<KernelResult<Vec<_>>>()?;
    let vz: Vec<DevBuf<f32>> = (0..sets)
        .map(|_| b.dev.zeros::<f32>(n))
        .collect::<KernelResult<Vec<_>>>()?;
    let wb: Vec<DevBuf<bf16>> = (0..sets)
        .map(|_| b.dev.zeros::<bf16>(n))
        .collect::<KernelResult<Vec<_>>>()?;
    let clip = b.dev.upload(&[1.0f32, 1.0])?;
    let dev = b.dev.clone();
    let h = optim::AdamWStep {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 10,
    };
    let shape = format!("{n} f32");
    // the step's scalars staged once, outside the timed graphs
    let sched = b.dev.upload(&optim::dev::adamw_sched(&h, 7))?;
    for with_ema in [true, false] {
        // Reads w, m, v, g (+ema); writes w, m, v (+ema) and the bf16 copy.
        let bytes = n * (4 * 4 + 3 * 4 + 2) + if with_ema { n * 8 } else { 0 };
        let name = if with_ema {
            "adamw_step (+bf16 +ema)"
        } else {
            "adamw_step (+bf16)"
        };
        b.time(name, &shape, bytes, sets, |i| {
            let t = &s[i];
            let bufs = optim::dev::FlatAdamW {
                w: &t[0],
                w_bf16: Some(&wb[i]),
                m: &t[1],
                v: &vz[i],
                g: &t[2],
                ema: with_ema.then_some((&t[3], 0.999)),
                n_decay: n / 2,
            };
            optim::dev::adamw_step_staged(&dev, &bufs, Some(&clip), &sched, &h)
        })?;
    }
    // The same step with bf16 moments (m random, v zero), stochastically rounded: reads w, m, v,
    // g; writes w, m, v and the bf16 copy.
    let m16: Vec<(DevBuf<bf16>, DevBuf<bf16>)> = (0..sets)
        .map(|_| -> KernelResult<_> { Ok((b.bf(n)?, b.dev.zeros::<bf16>(n)?)) })
        .collect::<KernelResult<Vec<_>>>()?;
    let bytes = n * (4 + 2 + 2 + 4) + n * (4 + 2 + 2 + 2);
    b.time("adamw_step_bf16m (+bf16)", &shape, bytes, sets, |i| {
        let t = &s[i];
        let bufs = optim::dev::FlatAdamW {
            w: &t[0],
            w_bf16: Some(&wb[i]),
            m: &m16[i].0,
            v: &m16[i].1,
            g: &t[2],
            ema: None,
            n_decay: n / 2,
        };
        optim::dev::adamw_step_bf16_moments_staged(&dev, &bufs, Some(&clip), &sched, &h)
    })?;
    drop((s, m16));
    let n = b.size(64 << 20, 70_001);
    let sets = b.sets(n * 4);
    let g: Vec<DevBuf<f32>> = (0..sets)
        .map(|_| b.f(n))
        .collect::<KernelResult<Vec<_>>>()?;
    let out = b.dev.zeros::<f32>(2)?;
    b.time(
        "grad_norm_clip (2 kernels)",
        &format!("{n} f32"),
        n * 4,
        sets,
        |i| optim::dev::grad_norm_clip_into(&dev, &out, &g[i], 1.0),
    )?;
    Ok(())
}

/// Every case on `dev`: the copy ceiling first, then each kernel family.
pub fn measure(dev: &KernelDevice) -> KernelResult<Vec<KernelRow>> {
    let gpu = !dev.is_emulator();
    let mut rng = Rng::new(1);
    let mut b = Bench {
        dev: dev.clone(),
        gpu,
        pool: (0..1 << 20).map(|_| rng.normal()).collect(),
        next: 0,
        rows: Vec::new(),
    };
    copy_baseline(&mut b)?;
    adaln(&mut b)?;
    column_backwards(&mut b)?;
    qk(&mut b)?;
    elementwise(&mut b)?;
    mlp_backward(&mut b)?;
    modulation_products(&mut b)?;
    sde_kernels(&mut b)?;
    head(&mut b)?;
    head_conv(&mut b)?;
    optimiser(&mut b)?;
    Ok(b.rows)
}

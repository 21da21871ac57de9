//! Elementwise kernels: broadcasting binary ops, their reduction back to an operand's shape, and
//! the pointwise activations with their derivatives.

use crate::tensor::{numel, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// NumPy-style broadcast of two shapes (right-aligned; a size-1 dim stretches).
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Vec<usize> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let da = if i + a.len() >= r {
                a[i + a.len() - r]
            } else {
                1
            };
            let db = if i + b.len() >= r {
                b[i + b.len() - r]
            } else {
                1
            };
            assert!(
                da == db || da == 1 || db == 1,
                "shapes {a:?} and {b:?} do not broadcast"
            );
            da.max(db)
        })
        .collect()
}

/// Strides of `shape` read as the broadcast `out` shape (0 along stretched dims).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let r = out.len();
    let mut strides = vec![0; r];
    let mut s = 1;
    for i in (0..shape.len()).rev() {
        let o = i + r - shape.len();
        strides[o] = if shape[i] == 1 { 0 } else { s };
        s *= shape[i];
    }
    strides
}

/// Offset in a broadcast operand of the first element of output row `row` (rows = all dims but the last).
fn row_offset(row: usize, out: &[usize], strides: &[usize]) -> usize {
    let mut rem = row;
    let mut off = 0;
    for d in (0..out.len().saturating_sub(1)).rev() {
        off += (rem % out[d]) * strides[d];
        rem /= out[d];
    }
    off
}

/// `f(a, b)` with broadcasting.
pub fn binary(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync) -> Tensor {
    let (x, y) = (a.f32s(), b.f32s());
    if a.shape() == b.shape() {
        // Collected straight into the new vector (no zero fill first), as `Tensor::map`.
        let mut out = Vec::with_capacity(x.len());
        x.par_iter()
            .zip(y)
            .with_min_len(CHUNK)
            .map(|(&x, &y)| f(x, y))
            .collect_into_vec(&mut out);
        return Tensor::from_vec(out, a.shape());
    }
    let shape = broadcast_shape(a.shape(), b.shape());
    let (sa, sb) = (
        broadcast_strides(a.shape(), &shape),
        broadcast_strides(b.shape(), &shape),
    );
    let last = *shape.last().unwrap_or(&1);
    let (la, lb) = (*sa.last().unwrap_or(&0), *sb.last().unwrap_or(&0));
    let mut out = vec![0f32; numel(&shape)];
    if last > 0 {
        out.par_chunks_mut(last).enumerate().for_each(|(row, o)| {
            let (oa, ob) = (row_offset(row, &shape, &sa), row_offset(row, &shape, &sb));
            for (j, o) in o.iter_mut().enumerate() {
                *o = f(x[oa + j * la], y[ob + j * lb]);
            }
        });
    }
    Tensor::from_vec(out, &shape)
}

pub fn add(a: &Tensor, b: &Tensor) -> Tensor {
    binary(a, b, |x, y| x + y)
}

/// Sums a gradient of the broadcast shape back to `shape` (the inverse of broadcasting).
pub fn sum_to_shape(g: &Tensor, shape: &[usize]) -> Tensor {
    if g.shape() == shape {
        return g.clone();
    }
    let out_shape = g.shape().to_vec();
    let strides = broadcast_strides(shape, &out_shape);
    let last = *out_shape.last().unwrap_or(&1);
    let ls = *strides.last().unwrap_or(&0);
    let mut out = vec![0f32; numel(shape)];
    let src = g.f32s();
    if last > 0 {
        for (row, r) in src.chunks(last).enumerate() {
            let o = row_offset(row, &out_shape, &strides);
            if ls == 0 {
                out[o] += r.iter().sum::<f32>();
            } else {
                for (j, v) in r.iter().enumerate() {
                    out[o + j] += v;
                }
            }
        }
    }
    Tensor::from_vec(out, shape)
}

/// Pointwise activations with their derivatives (`d` returns dy/dx at x).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// GELU, tanh approximation (what SD3 uses).
    GeluTanh,
    Silu,
    LeakyRelu(f32),
    Softplus,
    LogSigmoid,
    Exp,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// eˣ to within ~2 ulp, branch-free so that loops over it vectorise (libm's `expf` and
/// `tanhf` are scalar calls and made GELU a third of the Shapes model's training step).
/// Range reduction x = n·ln2 + r, |r| ≤ ln2/2, then a degree-6 polynomial for eʳ.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by the 1.5·2²³ trick: exact for |v| < 2²², needs no SSE4.1 round.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + MAGIC;
    let n = shifted - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    // 2ⁿ from the low mantissa bits of `shifted` (MAGIC's bits plus n): `n as i32` would be a
    // saturating cast, which LLVM scalarises lane by lane (2.4× slower GELU on AVX2).
    let biased = shifted
        .to_bits()
        .wrapping_sub(MAGIC.to_bits())
        .wrapping_add(127);
    f32::from_bits(biased << 23) * p
}

/// tanh(x) = 1 − 2/(e^{2x}+1), odd-symmetrised so large |x| saturate cleanly. Absolute error
/// ~1e-7 (relative error grows only where tanh itself is tiny).
#[inline(always)]
pub fn fast_tanh(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 - 2.0 / (fast_exp(2.0 * a) + 1.0);
    t.copysign(x)
}

pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// σ(x) with [`fast_exp`]; e^{−|x|} never overflows.
#[inline(always)]
fn fast_sigmoid(x: f32) -> f32 {
    let e = fast_exp(-x.abs());
    let s = 1.0 / (1.0 + e);
    if x >= 0.0 {
        s
    } else {
        1.0 - s
    }
}

/// log(1 + e^x) without overflow.
pub fn softplus(x: f32) -> f32 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + fast_tanh(SQRT_2_OVER_PI * (x + GELU_C * x * x * x)))
}

#[inline(always)]
fn gelu_tanh_d(x: f32) -> f32 {
    let t = fast_tanh(SQRT_2_OVER_PI * (x + GELU_C * x * x * x));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x)
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x * fast_sigmoid(x)
}

#[inline(always)]
fn silu_d(x: f32) -> f32 {
    let s = fast_sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

impl Activation {
    pub fn f(self, x: f32) -> f32 {
        match self {
            Activation::GeluTanh => gelu_tanh(x),
            Activation::Silu => silu(x),
            Activation::LeakyRelu(s) => {
                if x > 0.0 {
                    x
                } else {
                    s * x
                }
            }
            Activation::Softplus => softplus(x),
            Activation::LogSigmoid => -softplus(-x),
            Activation::Exp => x.exp(),
        }
    }

    pub fn d(self, x: f32) -> f32 {
        match self {
            Activation::GeluTanh => gelu_tanh_d(x),
            Activation::Silu => silu_d(x),
            Activation::LeakyRelu(s) => {
                if x > 0.0 {
                    1.0
                } else {
                    s
                }
            }
            Activation::Softplus => sigmoid(x),
            Activation::LogSigmoid => sigmoid(-x),
            Activation::Exp => x.exp(),
        }
    }
}

// One monomorphised loop per activation: a `match` inside the element loop keeps LLVM from
// vectorising it.
pub fn activation_fwd(x: &Tensor, act: Activation) -> Tensor {
    match act {
        Activation::GeluTanh => x.map(gelu_tanh),
        Activation::Silu => x.map(silu),
        _ => x.map(|v| act.f(v)),
    }
}

/// dx = dy · act'(x).
pub fn activation_bwd(x: &Tensor, dy: &Tensor, act: Activation) -> Tensor {
    match act {
        Activation::GeluTanh => binary(x, dy, |x, g| g * gelu_tanh_d(x)),
        Activation::Silu => binary(x, dy, |x, g| g * silu_d(x)),
        _ => binary(x, dy, |x, g| g * act.d(x)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate_over_the_float_range() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((fast_exp(x) as f64 - want) / want).abs());
        }
        assert!(worst < 4e-7, "fast_exp worst relative error {worst:e}");
    }

    #[test]
    fn fast_exp_scale_bits_equal_the_integer_exponent() {
        // The 2ⁿ read from the shifted sum's bits must be the 2ⁿ of n as an integer.
        fn with_cast(x: f32) -> f32 {
            let x = x.clamp(-87.0, 88.0);
            let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            f32::from_bits(((n as i32 + 127) << 23) as u32)
        }
        let mut bits = 0u32;
        for _ in 0..1_000_000 {
            let x = f32::from_bits(bits);
            if !x.is_nan() {
                let r = fast_exp(x) / with_cast(x);
                assert!((0.7..1.42).contains(&r), "2^n differs at {x}: ratio {r}");
            }
            bits = bits.wrapping_add(4_294_967_291 / 1_000_000);
        }
    }

    #[test]
    fn fast_tanh_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -12.0 + 24.0 * i as f32 / 200_000.0;
            worst = worst.max((fast_tanh(x) as f64 - (x as f64).tanh()).abs());
        }
        assert!(worst < 3e-7, "fast_tanh worst absolute error {worst:e}");
        assert_eq!(fast_tanh(0.0), 0.0);
        assert_eq!(fast_tanh(50.0), 1.0);
        assert_eq!(fast_tanh(-50.0), -1.0);
    }
}

/// Launchers of `cuda/elementwise.cu` on a [`KernelDevice`] (a GPU, or the emulator in CI):
/// GELU-tanh and SiLU forward and backward on bf16 buffers, the f32 ↔ bf16 casts and a byte copy.
/// Every kernel works on whole buffers of equal length.
pub mod dev {
    use super::Activation;
    use crate::device::kernel::{
        blocks_for, DevBuf, KernelArgs, KernelDevice, KernelError, KernelResult, LaunchCfg,
    };
    use bytemuck::Pod;
    use half::bf16;

    const THREADS: u32 = 256;

    /// One 16-byte vector (8 bf16) per thread; the kernels' grid-stride loops cover any rest.
    fn cfg(n: usize) -> LaunchCfg {
        LaunchCfg::linear(blocks_for(n.div_ceil(8), THREADS), THREADS)
    }

    /// 16-byte vectors per thread of the activation kernels (`EW_UNROLL` in elementwise.cu).
    const ACT_UNROLL: u32 = 4;

    /// The activations: `ACT_UNROLL` vectors per thread, all loaded before the first is used.
    fn act_cfg(n: usize) -> LaunchCfg {
        LaunchCfg::linear(blocks_for(n.div_ceil(8), THREADS * ACT_UNROLL), THREADS)
    }

    fn same_len(a: usize, b: usize, what: &str) -> KernelResult<()> {
        if a != b {
            return Err(KernelError::Invalid(format!(
                "{what}: buffers of {a} and {b} elements"
            )));
        }
        Ok(())
    }

    fn kernel_names(act: Activation) -> KernelResult<(&'static str, &'static str)> {
        match act {
            Activation::GeluTanh => Ok(("gelu_tanh_fwd", "gelu_tanh_bwd")),
            Activation::Silu => Ok(("silu_fwd", "silu_bwd")),
            other => Err(KernelError::Invalid(format!(
                "no device kernel for {other:?} (GeluTanh and Silu only)"
            ))),
        }
    }

    /// `y = act(x)` into `y`.
    pub fn activation_fwd_into(
        dev: &KernelDevice,
        y: &DevBuf<bf16>,
        x: &DevBuf<bf16>,
        act: Activation,
    ) -> KernelResult<()> {
        let (name, _) = kernel_names(act)?;
        same_len(y.len(), x.len(), name)?;
        if x.is_empty() {
            return Ok(());
        }
        dev.launch(
            name,
            act_cfg(x.len()),
            KernelArgs::new().buf(y).buf(x).i64(x.len() as i64),
        )
    }

    /// `act(x)` for [`Activation::GeluTanh`] or [`Activation::Silu`].
    pub fn activation_fwd(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        act: Activation,
    ) -> KernelResult<DevBuf<bf16>> {
        let y = dev.alloc::<bf16>(x.len())?;
        activation_fwd_into(dev, &y, x, act)?;
        Ok(y)
    }

    /// `dx = dy·act'(x)` into `dx`.
    pub fn activation_bwd_into(
        dev: &KernelDevice,
        dx: &DevBuf<bf16>,
        x: &DevBuf<bf16>,
        dy: &DevBuf<bf16>,
        act: Activation,
    ) -> KernelResult<()> {
        let (_, name) = kernel_names(act)?;
        same_len(dx.len(), x.len(), name)?;
        same_len(dy.len(), x.len(), name)?;
        if x.is_empty() {
            return Ok(());
        }
        dev.launch(
            name,
            act_cfg(x.len()),
            KernelArgs::new().buf(dx).buf(x).buf(dy).i64(x.len() as i64),
        )
    }

    /// `dx = dy·GELU′(x)` over `[m, n]` rows into `dx`, and the column sums of `dx` (as stored
    /// in bf16) added into `bias_grad` (f32 `[n]`): an MLP's fc1 bias gradient. One pass
    /// (`gelu_tanh_bwd_colsum`) where `n % 8 == 0` and the buffers are 16-byte aligned, else
    /// the activation's backward and a column sum.
    pub fn gelu_tanh_bwd_colsum(
        dev: &KernelDevice,
        dx: &DevBuf<bf16>,
        x: &DevBuf<bf16>,
        dy: &DevBuf<bf16>,
        (m, n): (usize, usize),
        bias_grad: &DevBuf<f32>,
    ) -> KernelResult<()> {
        let what = "gelu_tanh_bwd_colsum";
        for len in [dx.len(), x.len(), dy.len()] {
            same_len(len, m * n, what)?;
        }
        same_len(bias_grad.len(), n, what)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let aligned = [dx, x, dy].iter().all(|b| b.device_ptr() % 16 == 0);
        if n % 8 != 0 || !aligned {
            activation_bwd_into(dev, dx, x, dy, Activation::GeluTanh)?;
            return crate::kernels::adaln::dev::colsum_acc(dev, dx, (m, n), bias_grad);
        }
        use crate::kernels::adaln::dev::{launch_column_kernel, pack_cols_plan, ColumnOut};
        let (cfg, s) = pack_cols_plan(dev, 1, m, n);
        let part = dev.alloc::<f32>(s * n)?;
        let args = KernelArgs::new()
            .buf(dx)
            .buf(&part)
            .buf(x)
            .buf(dy)
            .i32(m as i32)
            .i32(n as i32);
        let sums = ColumnOut {
            out: bias_grad,
            accumulate: true,
            whole: true,
        };
        launch_column_kernel(dev, what, (cfg, s, 1), args, &[&part], &[sums])
    }

    /// `dy·act'(x)`.
    pub fn activation_bwd(
        dev: &KernelDevice,
        x: &DevBuf<bf16>,
        dy: &DevBuf<bf16>,
        act: Activation,
    ) -> KernelResult<DevBuf<bf16>> {
        let dx = dev.alloc::<bf16>(x.len())?;
        activation_bwd_into(dev, &dx, x, dy, act)?;
        Ok(dx)
    }

    /// `out = bf16(x)` (round to nearest even) into `out`.
    pub fn cast_f32_to_bf16_into(
        dev: &KernelDevice,
        out: &DevBuf<bf16>,
        x: &DevBuf<f32>,
    ) -> KernelResult<()> {
        same_len(out.len(), x.len(), "cast_f32_to_bf16")?;
        if x.is_empty() {
            return Ok(());
        }
        dev.launch(
            "cast_f32_to_bf16",
            cfg(x.len()),
            KernelArgs::new().buf(out).buf(x).i64(x.len() as i64),
        )
    }

    pub fn cast_f32_to_bf16(dev: &KernelDevice, x: &DevBuf<f32>) -> KernelResult<DevBuf<bf16>> {
        let out = dev.alloc::<bf16>(x.len())?;
        cast_f32_to_bf16_into(dev, &out, x)?;
        Ok(out)
    }

    /// `out = f32(x)` (exact) into `out`.
    pub fn cast_bf16_to_f32_into(
        dev: &KernelDevice,
        out: &DevBuf<f32>,
        x: &DevBuf<bf16>,
    ) -> KernelResult<()> {
        same_len(out.len(), x.len(), "cast_bf16_to_f32")?;
        if x.is_empty() {
            return Ok(());
        }
        dev.launch(
            "cast_bf16_to_f32",
            cfg(x.len()),
            KernelArgs::new().buf(out).buf(x).i64(x.len() as i64),
        )
    }

    pub fn cast_bf16_to_f32(dev: &KernelDevice, x: &DevBuf<bf16>) -> KernelResult<DevBuf<f32>> {
        let out = dev.alloc::<f32>(x.len())?;
        cast_bf16_to_f32_into(dev, &out, x)?;
        Ok(out)
    }

    /// Copies `src` into `dst` (equal lengths) with the `copy_bytes` kernel: the device-to-device
    /// bandwidth ceiling the kernel benchmarks compare against.
    pub fn copy<T: Pod>(dev: &KernelDevice, dst: &DevBuf<T>, src: &DevBuf<T>) -> KernelResult<()> {
        same_len(dst.len(), src.len(), "copy_bytes")?;
        let bytes = src.bytes();
        if bytes == 0 {
            return Ok(());
        }
        dev.launch(
            "copy_bytes",
            LaunchCfg::linear(blocks_for(bytes.div_ceil(16), THREADS), THREADS),
            KernelArgs::new().buf(dst).buf(src).i64(bytes as i64),
        )
    }
}

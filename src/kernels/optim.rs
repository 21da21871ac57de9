//! The optimiser's arithmetic over flat f32 master weights: one fused AdamW step (decoupled
//! weight decay, bias correction, optional gradient clip factor, optional EMA of the updated
//! weights) and the global gradient L2 norm with its clip factor.
//!
//! These CPU functions are the twins of `cuda/optim.cu`. They mirror — rather than call, since
//! `kernels` sits below `optim` — `optim::AdamW::step`, `optim::clip_grad_norm` and
//! `optim::Ema::update`, operation for operation in f32 (tests/kernels/optim.rs checks that both
//! agree). The flat layout puts the parameters that take weight decay (the matrices) first:
//! elements `[0, n_decay)` decay, the rest do not.

use rayon::prelude::*;

/// AdamW's hyper-parameters at one step (`step` counts from 1, as after `AdamW::step`'s increment).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
}

impl AdamWStep {
    /// `(1 − β1^t, 1 − β2^t)` in f32, as `AdamW::step` computes them.
    pub fn bias_corrections(&self) -> (f32, f32) {
        (
            1.0 - self.beta1.powi(self.step as i32),
            1.0 - self.beta2.powi(self.step as i32),
        )
    }
}

const CHUNK: usize = 4096;

/// One AdamW step over flat `w, m, v` with gradient `g·grad_scale`; then, when `ema` is given
/// as `(shadow, decay)`, `shadow ← decay·shadow + (1−decay)·w`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    w: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    grad_scale: f32,
    n_decay: usize,
    h: &AdamWStep,
    ema: Option<(&mut [f32], f32)>,
) {
    let n = w.len();
    assert!(
        m.len() == n && v.len() == n && g.len() == n,
        "adamw_step: buffer sizes differ"
    );
    let (bc1, bc2) = h.bias_corrections();
    w.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (((w, m), v), g))| {
            for i in 0..w.len() {
                let decay = if c * CHUNK + i < n_decay {
                    h.weight_decay
                } else {
                    0.0
                };
                // clip_grad_norm's scaled gradient, then AdamW::step's update, term for term.
                let gi = g[i] * grad_scale;
                m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * gi;
                v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * gi * gi;
                let update = (m[i] / bc1) / ((v[i] / bc2).sqrt() + h.eps);
                w[i] -= h.lr * (update + decay * w[i]);
            }
        });
    if let Some((shadow, d)) = ema {
        assert_eq!(shadow.len(), n, "adamw_step: EMA size");
        shadow
            .par_iter_mut()
            .zip(w.par_iter())
            .for_each(|(s, &wv)| *s = d * *s + (1.0 - d) * wv);
    }
}

/// The L2 norm of a flat gradient, summed in f64 (as `clip_grad_norm`).
pub fn grad_norm(g: &[f32]) -> f32 {
    g.iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt() as f32
}

/// The factor `clip_grad_norm` scales gradients by: `max_norm/(norm + 1e-6)` when
/// `norm > max_norm > 0`, else 1.
pub fn clip_factor(norm: f32, max_norm: f32) -> f32 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Launchers of `cuda/optim.cu` on a [`KernelDevice`] (a GPU, or the emulator in CI). All
/// buffers flat f32 `[n]` except the bf16 weight copy.
pub mod dev {
    use super::AdamWStep;
    use crate::device::kernel::{
        blocks_for, DevBuf, KernelArgs, KernelDevice, KernelError, KernelResult, LaunchCfg,
    };
    use half::bf16;

    const THREADS: u32 = 256;
    /// The most partial sums of the gradient norm (one per block of the first stage).
    const MAX_PARTS: usize = 1024;

    /// The buffers of one fused AdamW step over a flat parameter vector.
    pub struct FlatAdamW<'a> {
        /// f32 master weights, updated in place.
        pub w: &'a DevBuf<f32>,
        /// The bf16 copy the forward reads, written from the updated weights (when given).
        pub w_bf16: Option<&'a DevBuf<bf16>>,
        pub m: &'a DevBuf<f32>,
        pub v: &'a DevBuf<f32>,
        pub g: &'a DevBuf<f32>,
        /// `(shadow, decay)`: the EMA updated from the new weights in the same pass (when given).
        pub ema: Option<(&'a DevBuf<f32>, f32)>,
        /// Elements `[0, n_decay)` take weight decay, the rest do not.
        pub n_decay: usize,
    }

    fn invalid(msg: String) -> KernelError {
        KernelError::Invalid(msg)
    }

    /// One AdamW step. `clip`: `None`, or the `[norm, factor]` pair of [`grad_norm_clip_into`]
    /// (read on the device, so no host synchronisation sits between the two).
    pub fn adamw_step(
        dev: &KernelDevice,
        b: &FlatAdamW,
        clip: Option<&DevBuf<f32>>,
        h: &AdamWStep,
    ) -> KernelResult<()> {
        let n = b.w.len();
        let sizes_ok = b.m.len() == n
            && b.v.len() == n
            && b.g.len() == n
            && b.w_bf16.is_none_or(|t| t.len() == n)
            && b.ema.is_none_or(|(t, _)| t.len() == n);
        if !sizes_ok {
            return Err(invalid(format!("adamw_step: every buffer must hold {n}")));
        }
        if clip.is_some_and(|c| c.len() != 2) {
            return Err(invalid("adamw_step: clip must be [norm, factor]".into()));
        }
        if n == 0 {
            return Ok(());
        }
        let (bc1, bc2) = h.bias_corrections();
        let mut args = KernelArgs::new().buf(b.w);
        args = match b.w_bf16 {
            Some(t) => args.buf(t),
            None => args.null(),
        };
        args = args.buf(b.m).buf(b.v);
        args = match b.ema {
            Some((t, _)) => args.buf(t),
            None => args.null(),
        };
        args = args.buf(b.g);
        args = match clip {
            Some(t) => args.buf(t),
            None => args.null(),
        };
        args = args
            .i64(n as i64)
            .i64(b.n_decay.min(n) as i64)
            .f32(h.lr)
            .f32(h.beta1)
            .f32(h.beta2)
            .f32(h.eps)
            .f32(h.weight_decay)
            .f32(bc1)
            .f32(bc2)
            .f32(b.ema.map_or(0.0, |(_, d)| d));
        dev.launch(
            "adamw_step",
            LaunchCfg::linear(blocks_for(n.div_ceil(8), THREADS), THREADS),
            args,
        )
    }

    /// Blocks of the norm's first stage: from `n` alone, so the summation order (hence the
    /// result, bit for bit) is the same on every GPU.
    fn norm_parts(n: usize) -> usize {
        n.div_ceil(THREADS as usize * 16).clamp(1, MAX_PARTS)
    }

    /// The global L2 norm of `g` and its clip factor into `clip = [norm, factor]`
    /// (`factor = max_norm/(norm + 1e-6)` when `norm > max_norm > 0`, else 1).
    pub fn grad_norm_clip_into(
        dev: &KernelDevice,
        clip: &DevBuf<f32>,
        g: &DevBuf<f32>,
        max_norm: f32,
    ) -> KernelResult<()> {
        if clip.len() != 2 {
            return Err(invalid("grad_norm: clip must be [norm, factor]".into()));
        }
        let p = norm_parts(g.len());
        let part = dev.alloc::<f64>(p)?;
        dev.launch(
            "grad_sq_partial",
            LaunchCfg::linear(p as u32, THREADS),
            KernelArgs::new().buf(&part).buf(g).i64(g.len() as i64),
        )?;
        dev.launch(
            "grad_norm_finalize",
            LaunchCfg::linear(1, THREADS),
            KernelArgs::new()
                .buf(clip)
                .buf(&part)
                .i32(p as i32)
                .f32(max_norm),
        )
    }

    /// `[norm, clip factor]` of `g`.
    pub fn grad_norm_clip(
        dev: &KernelDevice,
        g: &DevBuf<f32>,
        max_norm: f32,
    ) -> KernelResult<DevBuf<f32>> {
        let clip = dev.alloc::<f32>(2)?;
        grad_norm_clip_into(dev, &clip, g, max_norm)?;
        Ok(clip)
    }
}

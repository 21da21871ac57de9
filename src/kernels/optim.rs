//! The optimiser's arithmetic over flat f32 master weights: one fused AdamW step (decoupled
//! weight decay, bias correction, optional gradient clip factor, optional EMA of the updated
//! weights) and the global gradient L2 norm — of one flat gradient or of several together — with
//! its clip factor.
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
                let decay = c * CHUNK + i < n_decay;
                adamw_elem(
                    h,
                    (bc1, bc2),
                    decay,
                    g[i] * grad_scale,
                    &mut w[i],
                    &mut m[i],
                    &mut v[i],
                );
            }
        });
    update_ema(w, ema);
}

/// One element: `clip_grad_norm`'s scaled gradient `g`, then `AdamW::step`'s update, term for
/// term.
fn adamw_elem(
    h: &AdamWStep,
    (bc1, bc2): (f32, f32),
    decay: bool,
    g: f32,
    w: &mut f32,
    m: &mut f32,
    v: &mut f32,
) {
    let wd = if decay { h.weight_decay } else { 0.0 };
    *m = h.beta1 * *m + (1.0 - h.beta1) * g;
    *v = h.beta2 * *v + (1.0 - h.beta2) * g * g;
    let update = (*m / bc1) / ((*v / bc2).sqrt() + h.eps);
    *w -= h.lr * (update + wd * *w);
}

fn update_ema(w: &[f32], ema: Option<(&mut [f32], f32)>) {
    if let Some((shadow, d)) = ema {
        assert_eq!(shadow.len(), w.len(), "adamw_step: EMA size");
        shadow
            .par_iter_mut()
            .zip(w.par_iter())
            .for_each(|(s, &wv)| *s = d * *s + (1.0 - d) * wv);
    }
}

/// The stochastic rounding's random bits for element `i` at `seed` (`cuda/optim.cu` `sr_hash`).
pub fn sr_hash(i: u64, seed: u32) -> u32 {
    let mut h =
        (i as u32).wrapping_mul(0x9E37_79B1) ^ ((i >> 32) as u32).wrapping_mul(0x85EB_CA77) ^ seed;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// `x` rounded to bf16 stochastically with the low 16 bits of `r`: added below bf16's mantissa,
/// then truncated (rounds up with probability equal to the discarded fraction); inf and NaN
/// unchanged.
pub fn bf16_sr(x: f32, r: u32) -> half::bf16 {
    let u = x.to_bits();
    if u & 0x7f80_0000 == 0x7f80_0000 {
        return half::bf16::from_f32(x);
    }
    half::bf16::from_bits((u.wrapping_add(r & 0xffff) >> 16) as u16)
}

/// [`adamw_step`] with the moments stored in bf16 (`cuda/optim.cu` `adamw_step_bf16m`): read as
/// f32, updated in f32, stored rounded stochastically — m with the low 16 bits of
/// `sr_hash(i, seed)`, v with the high 16.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_bf16_moments(
    w: &mut [f32],
    m: &mut [half::bf16],
    v: &mut [half::bf16],
    g: &[f32],
    grad_scale: f32,
    n_decay: usize,
    h: &AdamWStep,
    ema: Option<(&mut [f32], f32)>,
    seed: u32,
) {
    let n = w.len();
    assert!(
        m.len() == n && v.len() == n && g.len() == n,
        "adamw_step_bf16_moments: buffer sizes differ"
    );
    let bc = h.bias_corrections();
    w.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (((w, m), v), g))| {
            for i in 0..w.len() {
                let at = c * CHUNK + i;
                let (mut mf, mut vf) = (m[i].to_f32(), v[i].to_f32());
                adamw_elem(
                    h,
                    bc,
                    at < n_decay,
                    g[i] * grad_scale,
                    &mut w[i],
                    &mut mf,
                    &mut vf,
                );
                let r = sr_hash(at as u64, seed);
                m[i] = bf16_sr(mf, r);
                v[i] = bf16_sr(vf, r >> 16);
            }
        });
    update_ema(w, ema);
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

/// Threads per block of the gradient norm's two kernels (`OPT_THREADS` in `cuda/optim.cu`).
const NORM_THREADS: usize = 256;
/// The most blocks (partial sums) of the norm's first stage for one gradient.
const NORM_MAX_PARTS: usize = 1024;

/// Blocks of the norm's first stage (`grad_sq_partial`) for `n` elements: from `n` alone, so the
/// summation order (hence the result, bit for bit) is the same on every GPU.
pub fn norm_parts(n: usize) -> usize {
    n.div_ceil(NORM_THREADS * 16).clamp(1, NORM_MAX_PARTS)
}

/// `block_sum_f64`: thread t's value in `red[t]`, summed in `cuda/optim.cu`'s tree order.
fn tree_sum(red: &mut [f64; NORM_THREADS]) -> f64 {
    let mut s = NORM_THREADS / 2;
    while s > 0 {
        for t in 0..s {
            red[t] += red[t + s];
        }
        s /= 2;
    }
    red[0]
}

/// `grad_sq_partial` over `g` with [`norm_parts`] blocks: each block's Σ g² in f64, in the
/// kernel's order — thread t of block b takes the 4-element groups b·256 + t, + P·256, … (each
/// group summed left to right), then the tail's elements with the same stride, then the block's
/// tree. Assumes `g` starts 16-byte aligned on the device (every allocation does, and so does a
/// view at offset 0); elsewhere the kernel skips the grouping and only the last bits differ.
fn sq_partials(g: &[f32]) -> Vec<f64> {
    let n = g.len();
    let parts = norm_parts(n);
    let stride = parts * NORM_THREADS;
    let nv = n / 4;
    let sq = |x: f32| (x as f64) * (x as f64);
    (0..parts)
        .into_par_iter()
        .map(|b| {
            let mut red = [0f64; NORM_THREADS];
            for (t, r) in red.iter_mut().enumerate() {
                let t0 = b * NORM_THREADS + t;
                let mut acc = 0f64;
                for k in (t0..nv).step_by(stride) {
                    let a = &g[4 * k..4 * k + 4];
                    acc += sq(a[0]) + sq(a[1]) + sq(a[2]) + sq(a[3]);
                }
                for &x in g.iter().skip(4 * nv + t0).step_by(stride) {
                    acc += sq(x);
                }
                *r = acc;
            }
            tree_sum(&mut red)
        })
        .collect()
}

/// `[norm, clip factor]` of several flat gradients together (the twin of
/// [`dev::joint_grad_norm_clip`], in its summation order): every gradient's partial sums of
/// squares one after the other, then `grad_norm_finalize`'s — thread t sums partials t, t + 256,
/// … in order, then the tree — and the factor of [`clip_factor`]. The same up to f64 rounding as
/// `sqrt(Σ_i ‖g_i‖²)` with [`grad_norm`]s, the host's rule.
pub fn joint_grad_norm_clip(gs: &[&[f32]], max_norm: f32) -> [f32; 2] {
    let mut red = [0f64; NORM_THREADS];
    for (p, s) in gs.iter().flat_map(|g| sq_partials(g)).enumerate() {
        red[p % NORM_THREADS] += s;
    }
    let norm = tree_sum(&mut red).sqrt() as f32;
    [norm, clip_factor(norm, max_norm)]
}

/// Launchers of `cuda/optim.cu` on a [`KernelDevice`] (a GPU, or the emulator in CI). All
/// buffers flat f32 `[n]` except the bf16 weight copy.
pub mod dev {
    use super::{norm_parts, AdamWStep, NORM_THREADS};
    use crate::device::kernel::{
        blocks_for, DevBuf, KernelArgs, KernelDevice, KernelError, KernelResult, LaunchCfg,
    };
    use half::bf16;

    const THREADS: u32 = NORM_THREADS as u32;

    /// The buffers of one fused AdamW step over a flat parameter vector.
    /// The moments `M` are f32 ([`adamw_step`]) or bf16 ([`adamw_step_bf16_moments`]).
    pub struct FlatAdamW<'a, M = f32> {
        /// f32 master weights, updated in place.
        pub w: &'a DevBuf<f32>,
        /// The bf16 copy the forward reads, written from the updated weights (when given).
        pub w_bf16: Option<&'a DevBuf<bf16>>,
        pub m: &'a DevBuf<M>,
        pub v: &'a DevBuf<M>,
        pub g: &'a DevBuf<f32>,
        /// `(shadow, decay)`: the EMA updated from the new weights in the same pass (when given).
        pub ema: Option<(&'a DevBuf<f32>, f32)>,
        /// Elements `[0, n_decay)` take weight decay, the rest do not.
        pub n_decay: usize,
    }

    fn invalid(msg: String) -> KernelError {
        KernelError::Invalid(msg)
    }

    /// The step's scalars an AdamW launch reads from device memory: `[lr, 1 − β1^t, 1 − β2^t,
    /// seed]` (the seed's bits as an f32: the bf16-moment rounding's, ignored with f32 moments).
    pub fn adamw_sched(h: &AdamWStep, seed: u32) -> [f32; 4] {
        let (bc1, bc2) = h.bias_corrections();
        [h.lr, bc1, bc2, f32::from_bits(seed)]
    }

    /// One AdamW step. `clip`: `None`, or the `[norm, factor]` pair of [`grad_norm_clip_into`]
    /// (read on the device, so no host synchronisation sits between the two). Uploads the
    /// step's scalars first: outside a graph; [`adamw_step_staged`] reads staged ones.
    pub fn adamw_step(
        dev: &KernelDevice,
        b: &FlatAdamW,
        clip: Option<&DevBuf<f32>>,
        h: &AdamWStep,
    ) -> KernelResult<()> {
        let sched = dev.upload(&adamw_sched(h, 0))?;
        adamw_step_staged(dev, b, clip, &sched, h)
    }

    /// [`adamw_step`] with bf16 moments, stochastically rounded with the random bits of `seed`
    /// (give every step its own).
    pub fn adamw_step_bf16_moments(
        dev: &KernelDevice,
        b: &FlatAdamW<bf16>,
        clip: Option<&DevBuf<f32>>,
        h: &AdamWStep,
        seed: u32,
    ) -> KernelResult<()> {
        let sched = dev.upload(&adamw_sched(h, seed))?;
        adamw_step_bf16_moments_staged(dev, b, clip, &sched, h)
    }

    /// One AdamW step reading its scalars from `sched` ([`adamw_sched`], staged beforehand):
    /// no host copy, so a graph can replay it. `h` gives the constant hyper-parameters (its `lr`
    /// and `step` are not read).
    pub fn adamw_step_staged(
        dev: &KernelDevice,
        b: &FlatAdamW,
        clip: Option<&DevBuf<f32>>,
        sched: &DevBuf<f32>,
        h: &AdamWStep,
    ) -> KernelResult<()> {
        launch_adamw(dev, "adamw_step", b, clip, sched, h)
    }

    /// [`adamw_step_staged`] with bf16 moments (the seed is `sched[3]`).
    pub fn adamw_step_bf16_moments_staged(
        dev: &KernelDevice,
        b: &FlatAdamW<bf16>,
        clip: Option<&DevBuf<f32>>,
        sched: &DevBuf<f32>,
        h: &AdamWStep,
    ) -> KernelResult<()> {
        launch_adamw(dev, "adamw_step_bf16m", b, clip, sched, h)
    }

    fn launch_adamw<M: bytemuck::Pod>(
        dev: &KernelDevice,
        kernel: &str,
        b: &FlatAdamW<M>,
        clip: Option<&DevBuf<f32>>,
        sched: &DevBuf<f32>,
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
        if sched.len() != 4 {
            return Err(invalid(
                "adamw_step: sched must be [lr, bc1, bc2, seed]".into(),
            ));
        }
        if n == 0 {
            return Ok(());
        }
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
            .buf(sched)
            .i64(n as i64)
            .i64(b.n_decay.min(n) as i64)
            .f32(h.beta1)
            .f32(h.beta2)
            .f32(h.eps)
            .f32(h.weight_decay)
            .f32(b.ema.map_or(0.0, |(_, d)| d));
        dev.launch(
            kernel,
            LaunchCfg::linear(blocks_for(n.div_ceil(8), THREADS), THREADS),
            args,
        )
    }

    /// The global L2 norm of `g` and its clip factor into `clip = [norm, factor]`
    /// (`factor = max_norm/(norm + 1e-6)` when `norm > max_norm > 0`, else 1).
    pub fn grad_norm_clip_into(
        dev: &KernelDevice,
        clip: &DevBuf<f32>,
        g: &DevBuf<f32>,
        max_norm: f32,
    ) -> KernelResult<()> {
        joint_grad_norm_clip(dev, clip, &[g], max_norm)
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

    /// The joint L2 norm of several flat gradients and its clip factor into
    /// `clip = [norm, factor]` (the CPU `clip_grad_norm` over several parameter maps;
    /// `factor = max_norm/(norm + 1e-6)` when `norm > max_norm > 0`, else 1): each gradient's
    /// partial sums of squares ([`norm_parts`] of them) into consecutive slices of one buffer,
    /// then one `grad_norm_finalize` over all of them — a fixed order, so deterministic. Launches
    /// only, no host copies: a graph can record it. CPU twin:
    /// [`super::joint_grad_norm_clip`].
    pub fn joint_grad_norm_clip(
        dev: &KernelDevice,
        clip: &DevBuf<f32>,
        grads: &[&DevBuf<f32>],
        max_norm: f32,
    ) -> KernelResult<()> {
        if clip.len() != 2 {
            return Err(invalid("grad_norm: clip must be [norm, factor]".into()));
        }
        if grads.is_empty() {
            return Err(invalid("joint grad norm: no gradients".into()));
        }
        let parts: Vec<usize> = grads.iter().map(|g| norm_parts(g.len())).collect();
        let total: usize = parts.iter().sum();
        let part = dev.alloc::<f64>(total)?;
        let mut at = 0;
        for (g, &p) in grads.iter().zip(&parts) {
            dev.launch(
                "grad_sq_partial",
                LaunchCfg::linear(p as u32, THREADS),
                KernelArgs::new()
                    .buf(&*part.view(at, p)?)
                    .buf(*g)
                    .i64(g.len() as i64),
            )?;
            at += p;
        }
        dev.launch(
            "grad_norm_finalize",
            LaunchCfg::linear(1, THREADS),
            KernelArgs::new()
                .buf(clip)
                .buf(&part)
                .i32(total as i32)
                .f32(max_norm),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stochastic_rounding_is_unbiased_and_lands_on_neighbours() {
        let x = 1.0f32 + 0.3 * 2f32.powi(-7); // 30% of the way between two bf16 values
        let (lo, hi) = (1.0f32, 1.0 + 2f32.powi(-7));
        let n = 100_000;
        let mut ups = 0;
        for i in 0..n {
            let r = bf16_sr(x, sr_hash(i, 7)).to_f32();
            assert!(r == lo || r == hi, "{r}");
            ups += (r == hi) as u32;
        }
        let p = ups as f64 / n as f64;
        assert!(
            (p - 0.3).abs() < 0.01,
            "rounded up {p} of the time, want 0.3"
        );
        assert_eq!(bf16_sr(f32::INFINITY, 0xffff).to_f32(), f32::INFINITY);
        assert!(bf16_sr(f32::NAN, 0xffff).to_f32().is_nan());
        assert_eq!(bf16_sr(-2.0, 0xffff).to_f32(), -2.0); // exact values stay
    }

    /// Adam's v with β2 = 0.999 after the gradient shrinks 100×: with f32 moments it decays;
    /// with bf16 moments stochastically rounded it follows on average (round-to-nearest would
    /// freeze it — each step's change is under half an ulp — and shrink the step size 100×).
    #[test]
    fn bf16_moments_follow_f32_moments_through_a_decay() {
        let n = 4096;
        let h = |step| AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step,
        };
        let (mut w32, mut m32, mut v32) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let mut w16 = vec![0f32; n];
        let (mut m16, mut v16) = (vec![half::bf16::ZERO; n], vec![half::bf16::ZERO; n]);
        for step in 1..=3000u64 {
            let scale = if step <= 100 { 1.0 } else { 0.01 };
            let g: Vec<f32> = (0..n)
                .map(|i| {
                    scale
                        * if (i as u64 + step) % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        }
                })
                .collect();
            adamw_step(&mut w32, &mut m32, &mut v32, &g, 1.0, 0, &h(step), None);
            let seed = (step as u32).wrapping_mul(0x9E37_79B9);
            adamw_step_bf16_moments(
                &mut w16,
                &mut m16,
                &mut v16,
                &g,
                1.0,
                0,
                &h(step),
                None,
                seed,
            );
        }
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let v16f: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
        let (a, b) = (mean(&v32), mean(&v16f));
        assert!((b / a - 1.0).abs() < 0.05, "mean v: f32 {a:e}, bf16 {b:e}");
        // and the weights took the same path
        let dw: f64 = w32
            .iter()
            .zip(&w16)
            .map(|(x, y)| ((x - y) as f64).abs())
            .sum::<f64>();
        let wn: f64 = w32.iter().map(|x| (*x as f64).abs()).sum::<f64>();
        assert!(
            dw < 0.05 * wn.max(1e-12),
            "weights drift apart: {dw:e} of {wn:e}"
        );
    }
}

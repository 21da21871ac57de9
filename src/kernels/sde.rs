//! The SDE and loss arithmetic of the few-step sampler and the AdvDMD losses on flat `[B, D]`
//! batches (ALGORITHM.md §3.1, §4.1, §4.2): the ρ-family transition with its Gaussian
//! log-probability and the log-probability's gradient with respect to the velocity, the DMD
//! gradient with its per-sample normaliser, and flow-matching noising.
//!
//! These CPU functions are the twins of `cuda/sde.cu`. They mirror — rather than call, since
//! `kernels` sits below `flow` and `train` — `flow::sde::{rho_step, log_prob, log_prob_grad_v}`,
//! `train::losses::dmd_gradient` and the noising inside `train::losses::fake_score_loss`, with
//! σ and σ' per sample; tests/kernels/sde.rs checks that both agree.

/// Where the transition's next state comes from.
#[derive(Clone, Copy, Debug)]
pub enum NextState<'a> {
    /// The rollout: `x' = μ + s·z` with this noise `z [B, D]`.
    Sample(&'a [f32]),
    /// The policy-gradient recompute: `x' [B, D]` from the rollout, held fixed while `μ` moves.
    Given(&'a [f32]),
}

/// The ρ-step of a batch.
#[derive(Clone, Debug)]
pub struct RhoStepBatch {
    /// `x'` (the sampled state, or the given one).
    pub next: Vec<f32>,
    /// `x̂0 = x − σ·v`.
    pub x0: Vec<f32>,
    /// `μ = (1−σ')·x̂0 + σ'·sqrt(1−ρ²)·ε̂` (`x̂0` when σ' ≤ 0).
    pub mean: Vec<f32>,
    /// `∂ℓ/∂v̂ = c·(x' − μ)/(D·s²)`; 0 where `s = 0` (no density).
    pub grad_v: Vec<f32>,
    /// `ℓ = (1/D)·Σ [−(x' − μ)²/(2s²) − log s − ½ log 2π]` per sample; NaN where `s = 0`.
    pub log_prob: Vec<f64>,
}

/// The ρ-family transition of every sample of `x, v [B, D]` from `sigma[b]` to `sigma_next[b]`
/// (`B = sigma.len()`), with its log-probability and the log-probability's velocity gradient.
pub fn rho_step_batch(
    x: &[f32],
    v: &[f32],
    next: NextState,
    sigma: &[f32],
    sigma_next: &[f32],
    rho: f32,
) -> RhoStepBatch {
    let b = sigma.len();
    assert_eq!(sigma_next.len(), b, "rho_step_batch: σ and σ' lengths");
    assert!(
        x.len() == v.len() && (b == 0 || x.len() % b == 0),
        "rho_step_batch: x {} and v {} for {b} samples",
        x.len(),
        v.len()
    );
    let d = x.len().checked_div(b).unwrap_or(0);
    let src = match next {
        NextState::Sample(z) | NextState::Given(z) => z,
    };
    assert_eq!(src.len(), x.len(), "rho_step_batch: noise / next size");
    let mut out = RhoStepBatch {
        next: vec![0.0; x.len()],
        x0: vec![0.0; x.len()],
        mean: vec![0.0; x.len()],
        grad_v: vec![0.0; x.len()],
        log_prob: vec![f64::NAN; b],
    };
    for s in 0..b {
        let r = s * d..(s + 1) * d;
        let (sg, sn) = (sigma[s], sigma_next[s]);
        let det = sn <= 0.0 || sn.is_nan();
        let keep = if det {
            0.0
        } else {
            sn * (1.0 - rho * rho).max(0.0).sqrt()
        };
        let std = if det { 0.0 } else { sn * rho };
        let mut sq = 0f64;
        for i in r.clone() {
            let x0 = x[i] - sg * v[i];
            let eps = x[i] + (1.0 - sg) * v[i];
            let mean = if det {
                x0
            } else {
                (1.0 - sn) * x0 + keep * eps
            };
            let nx = match next {
                NextState::Given(given) => given[i],
                NextState::Sample(z) if !det => mean + std * z[i],
                NextState::Sample(_) => x0,
            };
            out.x0[i] = x0;
            out.mean[i] = mean;
            out.next[i] = nx;
            sq += (nx as f64 - mean as f64).powi(2);
        }
        if std > 0.0 {
            // flow::sde::log_prob and log_prob_grad_v, term for term.
            let sd = std as f64;
            out.log_prob[s] = -sq / (2.0 * sd * sd * d as f64)
                - sd.ln()
                - 0.5 * (2.0 * std::f64::consts::PI).ln();
            let c = keep * (1.0 - sg) - sg * (1.0 - sn);
            let scale = c as f64 / (d as f64 * sd.powi(2));
            for i in r {
                out.grad_v[i] = (scale * (out.next[i] as f64 - out.mean[i] as f64)) as f32;
            }
        }
    }
    out
}

/// The DMD gradient of every sample of `[B, D]` (`B = len / d`): `scale·(x̂0_fake − x̂0_real) /
/// mean_d |x − x̂0_real|`, non-finite entries → 0 before scaling (`train::losses::dmd_gradient`).
pub fn dmd_gradient_batch(
    x: &[f32],
    x0_real: &[f32],
    x0_fake: &[f32],
    d: usize,
    scale: f32,
) -> Vec<f32> {
    assert!(
        x.len() == x0_real.len() && x.len() == x0_fake.len(),
        "dmd_gradient_batch: sizes differ"
    );
    if d == 0 {
        return Vec::new();
    }
    let mut g = vec![0f32; x.len()];
    for (s, gs) in g.chunks_mut(d).enumerate() {
        let r = s * d..(s + 1) * d;
        let norm = x[r.clone()]
            .iter()
            .zip(&x0_real[r.clone()])
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / d as f64;
        for ((o, f), rr) in gs.iter_mut().zip(&x0_fake[r.clone()]).zip(&x0_real[r]) {
            let q = ((*f as f64 - *rr as f64) / norm) as f32;
            *o = if q.is_finite() { scale * q } else { 0.0 };
        }
    }
    g
}

/// Flow-matching noising of `x0, noise [B, D]` at `sigma[b]`: `(x_σ, target)` with
/// `x_σ = (1−σ)·x0 + σ·noise` and the velocity target `noise − x0`.
pub fn flow_noise(x0: &[f32], noise: &[f32], sigma: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x0.len(), noise.len(), "flow_noise: sizes differ");
    let b = sigma.len();
    assert!(
        b > 0 && x0.len() % b == 0,
        "flow_noise: {} elements for {b} samples",
        x0.len()
    );
    let d = x0.len() / b;
    let xt = (0..x0.len())
        .map(|i| (1.0 - sigma[i / d]) * x0[i] + sigma[i / d] * noise[i])
        .collect();
    let target = x0.iter().zip(noise).map(|(a, n)| n - a).collect();
    (xt, target)
}

/// One Euler step with optional classifier-free guidance on `x [n]` (f32), from velocities `v`
/// (`[2, n]` conditional half first when `guided`, else `[n]`): `x += dt·(u + w·(c − u))` as
/// `flow::cfg` + `flow::euler_step`. The twin of `euler_cfg_step`.
pub fn euler_cfg_step(x: &mut [f32], v: &[f32], guided: bool, w: f32, dt: f32) {
    let n = x.len();
    assert_eq!(
        v.len(),
        if guided { 2 * n } else { n },
        "euler_cfg_step: v size"
    );
    for (i, xi) in x.iter_mut().enumerate() {
        let g = if guided {
            let (c, u) = (v[i], v[n + i]);
            u + w * (c - u)
        } else {
            v[i]
        };
        *xi += dt * g;
    }
}

/// The flow-matching loss `mean((v − target)²)` and its gradient `2·(v − target)/N`: the twin of
/// `velocity_mse_grad` (the loss summed in f64 here).
pub fn velocity_mse_grad(v: &[f32], target: &[f32]) -> (f32, Vec<f32>) {
    assert_eq!(v.len(), target.len(), "velocity_mse_grad: sizes differ");
    let n = v.len().max(1) as f32;
    let mut sq = 0f64;
    let grad = v
        .iter()
        .zip(target)
        .map(|(a, t)| {
            let e = a - t;
            sq += (e as f64) * (e as f64);
            2.0 / n * e
        })
        .collect();
    ((sq / n as f64) as f32, grad)
}

/// `x̂0 = x − σ_b·g`, `g = v` or (guided, `v` is `[2, B·d]` conditional rows first) the CFG
/// combination `u + w·(c − u)`: the twin of `x0_from_velocity`.
pub fn x0_from_velocity(x: &[f32], v: &[f32], sigma: &[f32], guided: bool, w: f32) -> Vec<f32> {
    let n = x.len();
    let d = n / sigma.len().max(1);
    assert_eq!(
        v.len(),
        if guided { 2 * n } else { n },
        "x0_from_velocity: v size"
    );
    (0..n)
        .map(|i| {
            let g = if guided {
                v[n + i] + w * (v[i] - v[n + i])
            } else {
                v[i]
            };
            x[i] - sigma[i / d] * g
        })
        .collect()
}

/// `dv = −scale·σ_b·g`: the twin of `velocity_grad_from_x0`.
pub fn velocity_grad_from_x0(g: &[f32], sigma: &[f32], scale: f32) -> Vec<f32> {
    let d = g.len() / sigma.len().max(1);
    g.iter()
        .enumerate()
        .map(|(i, &gi)| -scale * sigma[i / d] * gi)
        .collect()
}

/// Launchers of `cuda/sde.cu` on a [`KernelDevice`] (a GPU, or the emulator in CI). All data f32
/// `[B, D]` device buffers, σ and σ' f32 `[B]`, log-probabilities f64 `[B]`.
pub mod dev {
    use crate::device::kernel::{
        DevBuf, KernelArgs, KernelDevice, KernelError, KernelResult, LaunchCfg,
    };

    const THREADS: u32 = 256;
    /// Elements per block of the reducing kernels and flow_noise: 16 per thread, one step of 4
    /// vectors per array (`SDE_WIDE` in sde.cu: the two-input kernels) or two of 2 (`SDE_UNROLL`:
    /// the ρ-step). At SD3's 16×128×128 latents that is 64 blocks per sample, 512 for 8 samples:
    /// one wave on an H100, where the kernels' ≤ 64 registers let 4 blocks share an SM.
    const CHUNK: usize = 4096;

    /// (blocks per sample, elements per block): depends on D alone, so the partial sums — and
    /// the results — are the same on every GPU. `per` is a multiple of 4 (whole vectors).
    fn chunking(d: usize) -> (usize, usize) {
        let per = CHUNK.min(d.div_ceil(4) * 4).max(4);
        (d.div_ceil(per).max(1), per)
    }

    fn grid(p: usize, b: usize) -> LaunchCfg {
        LaunchCfg::grid2(p as u32, b as u32, THREADS)
    }

    fn opt<T>(a: KernelArgs, b: Option<&DevBuf<T>>) -> KernelArgs {
        match b {
            Some(b) => a.buf(b),
            None => a.null(),
        }
    }

    fn check(cond: bool, what: impl FnOnce() -> String) -> KernelResult<()> {
        if cond {
            Ok(())
        } else {
            Err(KernelError::Invalid(what()))
        }
    }

    /// Where the next state comes from (see [`super::NextState`]).
    #[derive(Clone, Copy)]
    pub enum NextState<'a> {
        /// The rollout: `x' = μ + s·z`, written to the `next` output.
        Sample(&'a DevBuf<f32>),
        /// The recompute: `x'` given and held fixed; no `next` output.
        Given(&'a DevBuf<f32>),
    }

    /// Output buffers of [`rho_step_into`]; `None` skips writing that output.
    pub struct RhoStepOutputs<'a> {
        /// Written only for [`NextState::Sample`].
        pub next: Option<&'a DevBuf<f32>>,
        pub x0: Option<&'a DevBuf<f32>>,
        pub mean: Option<&'a DevBuf<f32>>,
        pub grad_v: Option<&'a DevBuf<f32>>,
        /// `[B]`, always written.
        pub log_prob: &'a DevBuf<f64>,
    }

    /// The ρ-step of `x, v [B, D]` from `sigma[b]` to `sigma_next[b]`: one pass over x, v and z
    /// (or the given x'), then a per-sample reduction of the log-probability.
    #[allow(clippy::too_many_arguments)]
    pub fn rho_step_into(
        dev: &KernelDevice,
        out: &RhoStepOutputs,
        x: &DevBuf<f32>,
        v: &DevBuf<f32>,
        next: NextState,
        sigma: &DevBuf<f32>,
        sigma_next: &DevBuf<f32>,
        rho: f32,
        (b, d): (usize, usize),
    ) -> KernelResult<()> {
        let n = b * d;
        let (src, z, given) = match next {
            NextState::Sample(z) => (z, Some(z), None),
            NextState::Given(g) => (g, None, Some(g)),
        };
        let sizes = [
            Some(x),
            Some(v),
            Some(src),
            out.next,
            out.x0,
            out.mean,
            out.grad_v,
        ];
        check(sizes.iter().flatten().all(|t| t.len() == n), || {
            format!("sde_rho_step: every [B, D] buffer must hold {b}x{d}")
        })?;
        check(
            sigma.len() == b && sigma_next.len() == b && out.log_prob.len() == b,
            || format!("sde_rho_step: σ, σ' and log_prob must hold {b}"),
        )?;
        if b == 0 {
            return Ok(());
        }
        let (p, per) = chunking(d);
        let sq = dev.alloc::<f32>(b * p)?;
        let next_out = if given.is_some() { None } else { out.next };
        let mut args = opt(KernelArgs::new(), next_out);
        args = opt(args, out.x0);
        args = opt(args, out.mean);
        args = opt(args, out.grad_v);
        args = args.buf(&sq).buf(x).buf(v);
        args = opt(args, z);
        args = opt(args, given);
        args = args
            .buf(sigma)
            .buf(sigma_next)
            .f32(rho)
            .i64(d as i64)
            .i64(per as i64);
        use crate::kernels::adaln::dev::{column_sums, ColumnSums};
        if column_sums() == ColumnSums::InKernel {
            // each sample's last block forms its log-probability
            let tickets = dev.column_tickets(b)?;
            let args = args.buf(out.log_prob).buf(&tickets);
            return dev.launch("sde_rho_step", grid(p, b), args);
        }
        dev.launch("sde_rho_step", grid(p, b), args.null().null())?;
        // One warp per sample: its partials are loaded at once and summed in a fixed order.
        dev.launch(
            "sde_logprob_finalize",
            LaunchCfg::linear(b as u32, 32),
            KernelArgs::new()
                .buf(out.log_prob)
                .buf(&sq)
                .buf(sigma_next)
                .f32(rho)
                .i32(b as i32)
                .i32(p as i32)
                .i64(d as i64),
        )
    }

    /// Every output of the ρ-step (`next` is `None` for [`NextState::Given`]).
    pub struct RhoStep {
        pub next: Option<DevBuf<f32>>,
        pub x0: DevBuf<f32>,
        pub mean: DevBuf<f32>,
        pub grad_v: DevBuf<f32>,
        pub log_prob: DevBuf<f64>,
    }

    /// [`rho_step_into`] with fresh buffers for every output.
    #[allow(clippy::too_many_arguments)]
    pub fn rho_step(
        dev: &KernelDevice,
        x: &DevBuf<f32>,
        v: &DevBuf<f32>,
        next: NextState,
        sigma: &DevBuf<f32>,
        sigma_next: &DevBuf<f32>,
        rho: f32,
        (b, d): (usize, usize),
    ) -> KernelResult<RhoStep> {
        let n = b * d;
        let next_buf = match next {
            NextState::Sample(_) => Some(dev.alloc::<f32>(n)?),
            NextState::Given(_) => None,
        };
        let (x0, mean, grad_v) = (dev.alloc(n)?, dev.alloc(n)?, dev.alloc(n)?);
        let log_prob = dev.alloc::<f64>(b)?;
        rho_step_into(
            dev,
            &RhoStepOutputs {
                next: next_buf.as_ref(),
                x0: Some(&x0),
                mean: Some(&mean),
                grad_v: Some(&grad_v),
                log_prob: &log_prob,
            },
            x,
            v,
            next,
            sigma,
            sigma_next,
            rho,
            (b, d),
        )?;
        Ok(RhoStep {
            next: next_buf,
            x0,
            mean,
            grad_v,
            log_prob,
        })
    }

    /// The DMD gradient `scale·nan_to_num((x̂0_fake − x̂0_real) / mean_d|x − x̂0_real|)` per
    /// sample, into `g`: a partial-sum pass over x and x̂0_real, then the elementwise pass.
    #[allow(clippy::too_many_arguments)]
    pub fn dmd_gradient_into(
        dev: &KernelDevice,
        g: &DevBuf<f32>,
        x: &DevBuf<f32>,
        x0_real: &DevBuf<f32>,
        x0_fake: &DevBuf<f32>,
        (b, d): (usize, usize),
        scale: f32,
    ) -> KernelResult<()> {
        let n = b * d;
        check(
            [g, x, x0_real, x0_fake].iter().all(|t| t.len() == n),
            || format!("dmd_gradient: every buffer must hold {b}x{d}"),
        )?;
        if n == 0 {
            return Ok(());
        }
        let (p, per) = chunking(d);
        let part = dev.alloc::<f32>(b * p)?;
        dev.launch(
            "dmd_abs_partial",
            grid(p, b),
            KernelArgs::new()
                .buf(&part)
                .buf(x)
                .buf(x0_real)
                .i64(d as i64)
                .i64(per as i64),
        )?;
        dev.launch(
            "dmd_grad_apply",
            grid(p, b),
            KernelArgs::new()
                .buf(g)
                .buf(x0_real)
                .buf(x0_fake)
                .buf(&part)
                .i64(d as i64)
                .i64(per as i64)
                .f32(scale),
        )
    }

    pub fn dmd_gradient(
        dev: &KernelDevice,
        x: &DevBuf<f32>,
        x0_real: &DevBuf<f32>,
        x0_fake: &DevBuf<f32>,
        (b, d): (usize, usize),
        scale: f32,
    ) -> KernelResult<DevBuf<f32>> {
        let g = dev.alloc::<f32>(b * d)?;
        dmd_gradient_into(dev, &g, x, x0_real, x0_fake, (b, d), scale)?;
        Ok(g)
    }

    /// `x_σ = (1−σ_b)·x0 + σ_b·noise` into `xt` and, when given, `noise − x0` into `target`.
    #[allow(clippy::too_many_arguments)]
    pub fn flow_noise_into(
        dev: &KernelDevice,
        xt: &DevBuf<f32>,
        target: Option<&DevBuf<f32>>,
        x0: &DevBuf<f32>,
        noise: &DevBuf<f32>,
        sigma: &DevBuf<f32>,
        (b, d): (usize, usize),
    ) -> KernelResult<()> {
        let n = b * d;
        check(
            [Some(xt), target, Some(x0), Some(noise)]
                .iter()
                .flatten()
                .all(|t| t.len() == n)
                && sigma.len() == b,
            || format!("flow_noise: buffers must hold {b}x{d} and σ {b}"),
        )?;
        if n == 0 {
            return Ok(());
        }
        // One step per thread (any grid is correct): every load is in flight at once.
        let (p, _) = chunking(d);
        let args = opt(KernelArgs::new().buf(xt), target)
            .buf(x0)
            .buf(noise)
            .buf(sigma)
            .i64(d as i64);
        dev.launch("flow_noise", grid(p, b), args)
    }

    /// `(x_σ, target)`.
    pub fn flow_noise(
        dev: &KernelDevice,
        x0: &DevBuf<f32>,
        noise: &DevBuf<f32>,
        sigma: &DevBuf<f32>,
        (b, d): (usize, usize),
    ) -> KernelResult<(DevBuf<f32>, DevBuf<f32>)> {
        let (xt, target) = (dev.alloc(b * d)?, dev.alloc(b * d)?);
        flow_noise_into(dev, &xt, Some(&target), x0, noise, sigma, (b, d))?;
        Ok((xt, target))
    }

    /// [`super::euler_cfg_step`] on the device: `x [n]` f32 updated in place, `v` bf16 (`[2, n]`
    /// when `guided`), and the next model input `bf16(x)` written to `x_model` (`[2, n]` when
    /// guided, both halves).
    pub fn euler_cfg_step(
        dev: &KernelDevice,
        x: &DevBuf<f32>,
        x_model: &DevBuf<half::bf16>,
        v: &DevBuf<half::bf16>,
        guided: bool,
        w: f32,
        dt: f32,
    ) -> KernelResult<()> {
        let n = x.len();
        let rows = if guided { 2 } else { 1 };
        check(v.len() == rows * n && x_model.len() == rows * n, || {
            format!(
                "euler_cfg_step: x {n}, v {}, model input {} (want {rows}×{n})",
                v.len(),
                x_model.len()
            )
        })?;
        if n == 0 {
            return Ok(());
        }
        let blocks = n.div_ceil(THREADS as usize).min(65_535) as u32;
        dev.launch(
            "euler_cfg_step",
            LaunchCfg::linear(blocks, THREADS),
            KernelArgs::new()
                .buf(x)
                .buf(x_model)
                .buf(v)
                .i64(n as i64)
                .i32(guided as i32)
                .f32(w)
                .f32(dt),
        )
    }

    /// [`super::velocity_mse_grad`] on the device: writes `dv` (bf16) and returns the loss
    /// (reads back one float per block, summed on the host in order).
    pub fn velocity_mse_grad(
        dev: &KernelDevice,
        dv: &DevBuf<half::bf16>,
        v: &DevBuf<half::bf16>,
        target: &DevBuf<f32>,
    ) -> KernelResult<f32> {
        let part = dev.alloc::<f32>(mse_parts(v.len()))?;
        velocity_mse_grad_into(dev, dv, &part, v, target)?;
        Ok(mse_from_parts(&dev.download(&part)?, v.len()))
    }

    /// How many partial sums [`velocity_mse_grad_into`] writes for `n` elements.
    pub fn mse_parts(n: usize) -> usize {
        n.div_ceil(THREADS as usize).clamp(1, 256)
    }

    /// The loss from the partial sums, read back.
    pub fn mse_from_parts(part: &[f32], n: usize) -> f32 {
        let sum: f64 = part.iter().map(|&p| p as f64).sum();
        (sum / n.max(1) as f64) as f32
    }

    /// [`velocity_mse_grad`] with the loss left on the device as [`mse_parts`]`(n)` partial sums
    /// of the squared error in `part` (no host copy: recordable into a graph).
    pub fn velocity_mse_grad_into(
        dev: &KernelDevice,
        dv: &DevBuf<half::bf16>,
        part: &DevBuf<f32>,
        v: &DevBuf<half::bf16>,
        target: &DevBuf<f32>,
    ) -> KernelResult<()> {
        let n = v.len();
        check(
            dv.len() == n && target.len() == n && part.len() == mse_parts(n),
            || {
                format!(
                    "velocity_mse_grad: v {n}, dv {}, target {}, {} partial sums",
                    dv.len(),
                    target.len(),
                    part.len()
                )
            },
        )?;
        if n == 0 {
            return dev.memset_zero(part);
        }
        dev.launch(
            "velocity_mse_grad",
            LaunchCfg::linear(mse_parts(n) as u32, THREADS),
            KernelArgs::new()
                .buf(dv)
                .buf(part)
                .buf(v)
                .buf(target)
                .i64(n as i64)
                .f32(2.0 / n as f32),
        )
    }

    fn rows_cfg(n: usize) -> LaunchCfg {
        LaunchCfg::linear(n.div_ceil(THREADS as usize).min(65_535) as u32, THREADS)
    }

    /// [`super::x0_from_velocity`] into `x0` (f32 `[B, d]`; `v` bf16, `[2, B·d]` when guided).
    pub fn x0_from_velocity(
        dev: &KernelDevice,
        x0: &DevBuf<f32>,
        x: &DevBuf<f32>,
        v: &DevBuf<half::bf16>,
        sigma: &DevBuf<f32>,
        guided: bool,
        w: f32,
    ) -> KernelResult<()> {
        let (n, b) = (x.len(), sigma.len());
        let rows = if guided { 2 } else { 1 };
        check(
            b > 0 && n % b == 0 && x0.len() == n && v.len() == rows * n,
            || {
                format!(
                    "x0_from_velocity: x {n}, x0 {}, v {}, {b} sigmas",
                    x0.len(),
                    v.len()
                )
            },
        )?;
        if n == 0 {
            return Ok(());
        }
        dev.launch(
            "x0_from_velocity",
            rows_cfg(n),
            KernelArgs::new()
                .buf(x0)
                .buf(x)
                .buf(v)
                .buf(sigma)
                .i64((n / b) as i64)
                .i32(b as i32)
                .i32(guided as i32)
                .f32(w),
        )
    }

    /// [`super::velocity_grad_from_x0`] into `dv` (bf16).
    pub fn velocity_grad_from_x0(
        dev: &KernelDevice,
        dv: &DevBuf<half::bf16>,
        g: &DevBuf<f32>,
        sigma: &DevBuf<f32>,
        scale: f32,
    ) -> KernelResult<()> {
        let (n, b) = (g.len(), sigma.len());
        check(b > 0 && n % b == 0 && dv.len() == n, || {
            format!("velocity_grad_from_x0: g {n}, dv {}, {b} sigmas", dv.len())
        })?;
        if n == 0 {
            return Ok(());
        }
        dev.launch(
            "velocity_grad_from_x0",
            rows_cfg(n),
            KernelArgs::new()
                .buf(dv)
                .buf(g)
                .buf(sigma)
                .i64((n / b) as i64)
                .i32(b as i32)
                .f32(scale),
        )
    }
}

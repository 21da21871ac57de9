//! Flow-matching training on a kernel device: the loss of teacher pretraining and of the fake
//! score's update (ALGORITHM.md §4), every op on the device — noising, the bf16 MMDiT, the MSE
//! gradient, the backward — then [`crate::optim::device::DeviceAdamW`].

use half::bf16;

use crate::device::kernel::{DevBuf, KernelError, KernelResult};
use crate::kernels::elementwise::dev::cast_f32_to_bf16_into;
use crate::kernels::sde::dev::{flow_noise, mse_from_parts, mse_parts, velocity_mse_grad_into};
use crate::mmdit::device::{DeviceInputs, DeviceMmdit, Forward, Keep};
use crate::tensor::Tensor;

/// One batch: clean samples `x0 [B, C, H, W]`, the noise, per-sample σ, the conditioning.
pub struct FlowBatch<'a> {
    pub x0: &'a Tensor,
    pub noise: &'a Tensor,
    pub sigma: &'a [f32],
    pub pooled: &'a Tensor,
    pub context: &'a Tensor,
}

/// `x_σ = (1−σ)·x0 + σ·noise`, `v = model(x_σ, σ·1000)`, loss `mean((v − (noise − x0))²)`: returns
/// the loss and adds its gradients into `model.grads` (`keep`: what the forward keeps, e.g.
/// [`Keep::BlockInputs`] for activation checkpointing).
pub fn flow_matching_grads(
    model: &DeviceMmdit,
    batch: &FlowBatch,
    keep: Keep,
) -> KernelResult<f32> {
    let dev = &model.dev;
    let shape = batch.x0.shape();
    let b = shape.first().copied().unwrap_or(0);
    if batch.noise.shape() != shape || batch.sigma.len() != b || b == 0 || keep == Keep::Nothing {
        return Err(KernelError::Invalid(format!(
            "flow matching: x0 {shape:?}, noise {:?}, {} sigmas, keep {keep:?}",
            batch.noise.shape(),
            batch.sigma.len()
        )));
    }
    let t: Vec<f32> = batch
        .sigma
        .iter()
        .map(|&s| crate::flow::timestep_of(s))
        .collect();
    // x0 stands in for the model input's shape; the noised state replaces it on the device
    let inputs = model.inputs(batch.x0, &t, batch.pooled, batch.context)?;
    let (x0, noise, sigma) = (
        dev.upload(batch.x0.f32s())?,
        dev.upload(batch.noise.f32s())?,
        dev.upload(batch.sigma)?,
    );
    let parts = dev.alloc::<f32>(mse_parts(x0.len()))?;
    flow_matching_grads_dev(model, &inputs, &x0, &noise, &sigma, &parts, keep)?;
    Ok(mse_from_parts(&dev.download(&parts)?, x0.len()))
}

/// [`flow_matching_grads`] from device buffers — `inputs` with the timestep features of `sigma`
/// and the conditioning staged (their latents are written here), `x0`, `noise` f32 `[B, C, H, W]`
/// — leaving the loss as partial sums in `parts` (`mse_parts(len)` of them). No host copies.
pub fn flow_matching_grads_dev(
    model: &DeviceMmdit,
    inputs: &DeviceInputs,
    x0: &DevBuf<f32>,
    noise: &DevBuf<f32>,
    sigma: &DevBuf<f32>,
    parts: &DevBuf<f32>,
    keep: Keep,
) -> KernelResult<()> {
    let dev = &model.dev;
    let b = sigma.len();
    if b == 0 || x0.len() % b != 0 || keep == Keep::Nothing {
        return Err(KernelError::Invalid(format!(
            "flow matching: x0 of {}, {b} sigmas, keep {keep:?}",
            x0.len()
        )));
    }
    let (xt, target) = flow_noise(dev, x0, noise, sigma, (b, x0.len() / b))?;
    cast_f32_to_bf16_into(dev, &inputs.x, &xt)?;
    let fwd = model.forward(inputs, keep)?;
    if fwd.velocity.len() != target.len() {
        return Err(KernelError::Invalid(
            "flow matching needs as many output channels as input channels".into(),
        ));
    }
    let dv = dev.alloc::<bf16>(target.len())?;
    velocity_mse_grad_into(dev, &dv, parts, &fwd.velocity, &target)?;
    let saved = fwd.saved.as_ref().expect("a kept forward");
    model.backward(inputs, saved, &dv, true)?;
    Ok(())
}

/// The conditioning of one DMD generator update: the prompts' and the empty prompt's (CFG's
/// unconditional branch of the teacher), one row per sample.
pub struct DmdBatch<'a> {
    /// The rollout state the generator denoises, `[n, C, H, W]`, at σ = `sigma`.
    pub x: &'a Tensor,
    pub sigma: f32,
    /// Per-sample re-noising levels τ and the noise of `x_τ = (1−τ)·x̂0 + τ·noise`.
    pub tau: &'a [f32],
    pub noise: &'a Tensor,
    pub pooled: &'a Tensor,
    pub context: &'a Tensor,
    pub pooled_uncond: &'a Tensor,
    pub context_uncond: &'a Tensor,
    /// The teacher's CFG scale and the DMD weight λ.
    pub w_real: f32,
    pub lambda: f32,
}

/// The generator's `x̂0 = x − σ·G(x)` of a batch, with what its backward needs (besides the
/// inputs, which the caller keeps).
pub struct GeneratorX0 {
    pub forward: Forward,
    /// f32 `[n, C, H, W]`.
    pub x0: DevBuf<f32>,
    sigma: DevBuf<f32>,
}

/// `x̂0 = x − σ·G(x)` for the rollout state `x` (f32 `[n, C, H, W]` on the device) at per-sample
/// `sigma`, through `inputs` (timestep features of `sigma` and the conditioning staged; their
/// latents are written here). No host copies.
pub fn generator_x0(
    generator: &DeviceMmdit,
    inputs: &DeviceInputs,
    x: &DevBuf<f32>,
    sigma: &DevBuf<f32>,
    keep: Keep,
) -> KernelResult<GeneratorX0> {
    use crate::kernels::elementwise::dev::copy;
    use crate::kernels::sde::dev::x0_from_velocity;
    let dev = &generator.dev;
    cast_f32_to_bf16_into(dev, &inputs.x, x)?;
    let forward = generator.forward(inputs, keep)?;
    let x0 = dev.alloc::<f32>(x.len())?;
    x0_from_velocity(dev, &x0, x, &forward.velocity, sigma, false, 1.0)?;
    // its own copy of σ: the staged one may change before the backward runs
    let own = dev.alloc::<f32>(sigma.len())?;
    copy(dev, &own, sigma)?;
    Ok(GeneratorX0 {
        forward,
        x0,
        sigma: own,
    })
}

/// Takes the gradient `g` at x̂0 back through the generator into its parameter gradients
/// (`∂x̂0/∂v = −σ`); `inputs` are the forward's.
pub fn generator_backward_from_x0(
    generator: &DeviceMmdit,
    inputs: &DeviceInputs,
    gx: &GeneratorX0,
    g: &DevBuf<f32>,
) -> KernelResult<()> {
    use crate::kernels::sde::dev::velocity_grad_from_x0;
    let dev = &generator.dev;
    let saved = gx.forward.saved.as_ref().ok_or_else(|| {
        KernelError::Invalid("generator x̂0: the forward kept nothing to differentiate".into())
    })?;
    let dv = dev.alloc::<bf16>(g.len())?;
    velocity_grad_from_x0(dev, &dv, g, &gx.sigma, 1.0)?;
    generator.backward(inputs, saved, &dv, true)?;
    Ok(())
}

/// The device side of one DMD seed: the teacher's inputs (`2n` rows: the conditional then the
/// unconditional, both with the timestep features of τ) and the fake score's (`n` rows), staged;
/// τ and the re-noising noise on the device.
pub struct DmdInputs<'a> {
    pub teacher: &'a DeviceInputs,
    pub fake: &'a DeviceInputs,
    pub tau: &'a DevBuf<f32>,
    pub noise: &'a DevBuf<f32>,
    pub w_real: f32,
    pub lambda: f32,
}

/// The DMD gradient at the generator's `x̂0` (ALGORITHM.md §4.1, as `AdvDmd::generator_update`):
/// the frozen teacher (with CFG) and the fake score denoise `x_τ = (1−τ)·x̂0 + τ·noise`; returns
/// `λ·(x̂0_fake − x̂0_real) / mean|x̂0 − x̂0_real| / N` (f32, the seed at x̂0) and its unscaled RMS
/// per sample (the trainer's `dmd_grad_norm`).
pub fn dmd_seed(
    teacher: &DeviceMmdit,
    fake: &DeviceMmdit,
    x0: &DevBuf<f32>,
    batch: &DmdBatch,
) -> KernelResult<(DevBuf<f32>, f32)> {
    use crate::kernels::shape::concat;
    let dev = &teacher.dev;
    let n = batch.x.shape().first().copied().unwrap_or(0);
    let numel = batch.x.numel();
    if n == 0 || batch.tau.len() != n || batch.noise.numel() != numel || x0.len() != numel {
        return Err(KernelError::Invalid(format!(
            "DMD: x {:?}, {} taus, noise {:?}, x̂0 of {}",
            batch.x.shape(),
            batch.tau.len(),
            batch.noise.shape(),
            x0.len()
        )));
    }
    let t_of = |s: &[f32]| -> Vec<f32> { s.iter().map(|&v| crate::flow::timestep_of(v)).collect() };
    let both_tau: Vec<f32> = batch.tau.iter().chain(batch.tau).copied().collect();
    let tin = teacher.inputs(
        &concat(&[batch.x, batch.x], 0),
        &t_of(&both_tau),
        &concat(&[batch.pooled, batch.pooled_uncond], 0),
        &concat(&[batch.context, batch.context_uncond], 0),
    )?;
    let fin = fake.inputs(batch.x, &t_of(batch.tau), batch.pooled, batch.context)?;
    let (tau, noise) = (dev.upload(batch.tau)?, dev.upload(batch.noise.f32s())?);
    let norm = dev.alloc::<f32>(2)?;
    let g = dmd_seed_dev(
        teacher,
        fake,
        x0,
        &DmdInputs {
            teacher: &tin,
            fake: &fin,
            tau: &tau,
            noise: &noise,
            w_real: batch.w_real,
            lambda: batch.lambda,
        },
        &norm,
    )?;
    let l2 = dev.download(&norm)?[0];
    Ok((g, dmd_rms(l2, batch.lambda, numel, n)))
}

/// The trainer's `dmd_grad_norm` — the seed's RMS per sample before the `λ/N` scale — from the
/// seed's L2 norm.
pub fn dmd_rms(seed_l2: f32, lambda: f32, numel: usize, n: usize) -> f32 {
    let scale = lambda as f64 / numel as f64;
    (seed_l2 as f64 / scale / (n.max(1) as f64).sqrt()) as f32
}

/// [`dmd_seed`] from device buffers; the seed's L2 norm goes to `norm[0]` (`norm`: 2 floats,
/// see [`dmd_rms`]). No host copies.
pub fn dmd_seed_dev(
    teacher: &DeviceMmdit,
    fake: &DeviceMmdit,
    x0: &DevBuf<f32>,
    b: &DmdInputs,
    norm: &DevBuf<f32>,
) -> KernelResult<DevBuf<f32>> {
    use crate::kernels::optim::dev::grad_norm_clip_into;
    use crate::kernels::sde::dev::{dmd_gradient, flow_noise_into, x0_from_velocity};
    let dev = &teacher.dev;
    let (n, numel) = (b.tau.len(), x0.len());
    if n == 0 || b.noise.len() != numel || numel % n != 0 || b.teacher.batch != 2 * n {
        return Err(KernelError::Invalid(format!(
            "DMD: x̂0 of {numel}, {n} taus, noise of {}, teacher inputs of {} rows",
            b.noise.len(),
            b.teacher.batch
        )));
    }
    let per = numel / n;
    let xt = dev.alloc::<f32>(numel)?;
    flow_noise_into(dev, &xt, None, x0, b.noise, b.tau, (n, per))?;
    // the teacher's conditional and unconditional rows in one call, then the fake score
    cast_f32_to_bf16_into(dev, &*b.teacher.x.view(0, numel)?, &xt)?;
    cast_f32_to_bf16_into(dev, &*b.teacher.x.view(numel, numel)?, &xt)?;
    let vt = teacher.forward(b.teacher, Keep::Nothing)?.velocity;
    let x0_real = dev.alloc::<f32>(numel)?;
    x0_from_velocity(dev, &x0_real, &xt, &vt, b.tau, true, b.w_real)?;
    cast_f32_to_bf16_into(dev, &b.fake.x, &xt)?;
    let vf = fake.forward(b.fake, Keep::Nothing)?.velocity;
    let x0_fake = dev.alloc::<f32>(numel)?;
    x0_from_velocity(dev, &x0_fake, &xt, &vf, b.tau, false, 1.0)?;
    let g = dmd_gradient(
        dev,
        x0,
        &x0_real,
        &x0_fake,
        (n, per),
        b.lambda / numel as f32,
    )?;
    grad_norm_clip_into(dev, norm, &g, 0.0)?;
    Ok(g)
}

/// The DMD term of the generator update alone: [`generator_x0`], [`dmd_seed`] and the
/// generator's backward. Returns the trainer's `dmd_grad_norm`.
pub fn dmd_generator_grads(
    generator: &DeviceMmdit,
    teacher: &DeviceMmdit,
    fake: &DeviceMmdit,
    batch: &DmdBatch,
    keep: Keep,
) -> KernelResult<f32> {
    if keep == Keep::Nothing {
        return Err(KernelError::Invalid(
            "DMD: the generator's forward must keep what its backward reads".into(),
        ));
    }
    let dev = &generator.dev;
    let n = batch.x.shape().first().copied().unwrap_or(0);
    let t = vec![crate::flow::timestep_of(batch.sigma); n];
    let inputs = generator.inputs(batch.x, &t, batch.pooled, batch.context)?;
    let (x, sigma) = (
        dev.upload(batch.x.f32s())?,
        dev.upload(&vec![batch.sigma; n])?,
    );
    let gx = generator_x0(generator, &inputs, &x, &sigma, keep)?;
    let (g, norm) = dmd_seed(teacher, fake, &gx.x0, batch)?;
    generator_backward_from_x0(generator, &inputs, &gx, &g)?;
    Ok(norm)
}

/// One batch of trajectories on the device (as `train::rollout::Rollout`): the K+1 states, the
/// K x̂0's (f32 `[n, C, H, W]` device buffers) and the log-probability of every stochastic
/// transition (`log_probs[k][i]`, read back: K−1 small vectors).
pub struct DeviceRollout {
    pub states: Vec<crate::device::kernel::DevBuf<f32>>,
    pub x0: Vec<crate::device::kernel::DevBuf<f32>>,
    pub log_probs: Vec<Vec<f64>>,
}

/// A rollout in three stacked device buffers: states `[K+1][n·per]`, x̂0's `[K][n·per]`, and the
/// log-probabilities of the stochastic transitions `[T][n]` (f64; T of the K steps are
/// stochastic, and they come first: σ only reaches 0 at the end).
pub struct StackedRollout {
    pub states: DevBuf<f32>,
    pub x0: DevBuf<f32>,
    pub log_probs: DevBuf<f64>,
    /// Elements of one state (`n·per`).
    pub len: usize,
    pub n: usize,
}

impl StackedRollout {
    pub fn state(&self, k: usize) -> KernelResult<crate::device::kernel::DevView<'_, f32>> {
        self.states.view(k * self.len, self.len)
    }
    pub fn x0_at(&self, k: usize) -> KernelResult<crate::device::kernel::DevView<'_, f32>> {
        self.x0.view(k * self.len, self.len)
    }
    pub fn log_prob(&self, t: usize) -> KernelResult<crate::device::kernel::DevView<'_, f64>> {
        self.log_probs.view(t * self.n, self.n)
    }
}

/// Whether step `k` of the ρ-SDE along `sigmas` is stochastic (has a density).
pub fn stochastic_step(sigmas: &[f32], rho: f32, k: usize) -> bool {
    sigmas[k + 1] > 0.0 && rho > 0.0
}

/// What a device rollout reads: the generator's inputs for `n` rows with the conditioning
/// staged (their latents and timestep features are written at each step), every step's timestep
/// features `[K][n·freq_dim]`, the start noise `[n·per]`, the steps' noises `[K][n·per]`, and
/// each step's per-sample σ and σ' (`[K][n]` each).
pub struct RolloutInputs<'a> {
    pub inputs: &'a DeviceInputs,
    pub t_features: &'a DevBuf<bf16>,
    pub noise: &'a DevBuf<f32>,
    pub z: &'a DevBuf<f32>,
    pub sigma: &'a DevBuf<f32>,
    pub sigma_next: &'a DevBuf<f32>,
}

/// The unified ρ-SDE rollout (ALGORITHM.md §3.2) from device buffers: every step's modulations
/// in one product a layer ([`DeviceMmdit::step_modulations`]), then K generator calls, each
/// followed by the `sde_rho_step` kernel (host `sigmas` only decide which steps are stochastic).
/// No host copies; `r.inputs.t_features` is not read (the step features are).
pub fn rollout_sde_dev(
    model: &DeviceMmdit,
    r: &RolloutInputs,
    sigmas: &[f32],
    rho: f32,
) -> KernelResult<StackedRollout> {
    use crate::kernels::elementwise::dev::{cast_bf16_to_f32, copy};
    use crate::kernels::sde::dev::{rho_step_into, NextState, RhoStepOutputs};
    let dev = &model.dev;
    let k = sigmas.len().saturating_sub(1);
    let (n, len) = (r.inputs.batch, r.noise.len());
    let tf = r.inputs.t_features.len();
    let fits = n > 0
        && len % n == 0
        && r.z.len() == k * len
        && r.sigma.len() == k * n
        && r.sigma_next.len() == k * n
        && r.t_features.len() == k * tf;
    if !fits {
        return Err(KernelError::Invalid(format!(
            "rollout: {n} rows, noise {len}, step noises {}, σ {} / {}, features {} for {k} steps",
            r.z.len(),
            r.sigma.len(),
            r.sigma_next.len(),
            r.t_features.len()
        )));
    }
    let stochastic = (0..k).filter(|&s| stochastic_step(sigmas, rho, s)).count();
    let out = StackedRollout {
        states: dev.alloc::<f32>((k + 1) * len)?,
        x0: dev.alloc::<f32>(k * len)?,
        log_probs: dev.alloc::<f64>(stochastic.max(1) * n)?,
        len,
        n,
    };
    copy(dev, &*out.state(0)?, r.noise)?;
    let scratch = dev.alloc::<f64>(n)?;
    if k == 0 {
        return Ok(out);
    }
    // every step's modulations in one product a layer (its timesteps are known in advance)
    let mods = model.step_modulations(r.t_features, &r.inputs.pooled, (k, n))?;
    for step in 0..k {
        let x = out.state(step)?;
        cast_f32_to_bf16_into(dev, &r.inputs.x, &x)?;
        let v = model.forward_modulated(r.inputs, &mods, step)?.velocity;
        let v = cast_bf16_to_f32(dev, &v)?;
        let lp = if stochastic_step(sigmas, rho, step) {
            Some(out.log_prob(step)?)
        } else {
            None
        };
        let (next, x0) = (out.state(step + 1)?, out.x0_at(step)?);
        rho_step_into(
            dev,
            &RhoStepOutputs {
                next: Some(&next),
                x0: Some(&x0),
                mean: None,
                grad_v: None,
                log_prob: lp.as_deref().unwrap_or(&scratch),
            },
            &x,
            &v,
            NextState::Sample(&*r.z.view(step * len, len)?),
            &*r.sigma.view(step * n, n)?,
            &*r.sigma_next.view(step * n, n)?,
            rho,
            (n, len / n),
        )?;
    }
    Ok(out)
}

/// Every step's per-sample σ and σ' (`[K][n]` each) and timestep features (`[K][n][freq_dim]`,
/// bf16) of a rollout of `n` samples along `sigmas`.
pub fn rollout_schedule(
    sigmas: &[f32],
    n: usize,
    freq_dim: usize,
) -> (Vec<f32>, Vec<f32>, Vec<bf16>) {
    let k = sigmas.len().saturating_sub(1);
    let rows = |off: usize| -> Vec<f32> {
        (0..k)
            .flat_map(|s| std::iter::repeat_n(sigmas[s + off], n))
            .collect()
    };
    let features = (0..k)
        .flat_map(|s| {
            let t = vec![crate::flow::timestep_of(sigmas[s]); n];
            crate::nn::timestep_features(&t, freq_dim)
                .f32s()
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect::<Vec<_>>()
        })
        .collect();
    (rows(0), rows(1), features)
}

/// The unified ρ-SDE rollout (ALGORITHM.md §3.2) of `model` from the start noise `noise` along
/// `sigmas`, with `z[k]` the noise of step k's transition (ignored on deterministic steps: ρ = 0
/// or σ' = 0): [`rollout_sde_dev`] from host tensors, its stacks split and the log-probabilities
/// read back.
pub fn rollout_sde(
    model: &DeviceMmdit,
    noise: &Tensor,
    z: &[Tensor],
    sigmas: &[f32],
    rho: f32,
    pooled: &Tensor,
    context: &Tensor,
) -> KernelResult<DeviceRollout> {
    use crate::kernels::elementwise::dev::copy;
    let dev = &model.dev;
    let k = sigmas.len().saturating_sub(1);
    let n = noise.shape().first().copied().unwrap_or(0);
    if n == 0 || z.len() < k || z.iter().any(|t| t.numel() != noise.numel()) {
        return Err(KernelError::Invalid(format!(
            "rollout: noise {:?}, {} step noises for {k} steps",
            noise.shape(),
            z.len()
        )));
    }
    let t0 = vec![crate::flow::timestep_of(sigmas[0]); n];
    let inputs = model.inputs(noise, &t0, pooled, context)?;
    let (sig, sig_next, features) = rollout_schedule(sigmas, n, model.config.freq_dim);
    let zs: Vec<f32> = z[..k]
        .iter()
        .flat_map(|t| t.f32s().iter().copied())
        .collect();
    let (noise_d, z_d) = (dev.upload(noise.f32s())?, dev.upload(&zs)?);
    let (sig_d, next_d, feat_d) = (
        dev.upload(&sig)?,
        dev.upload(&sig_next)?,
        dev.upload(&features)?,
    );
    let r = rollout_sde_dev(
        model,
        &RolloutInputs {
            inputs: &inputs,
            t_features: &feat_d,
            noise: &noise_d,
            z: &z_d,
            sigma: &sig_d,
            sigma_next: &next_d,
        },
        sigmas,
        rho,
    )?;
    let split = |stack: &DevBuf<f32>, count: usize| -> KernelResult<Vec<DevBuf<f32>>> {
        (0..count)
            .map(|i| {
                let b = dev.alloc::<f32>(r.len)?;
                copy(dev, &b, &*stack.view(i * r.len, r.len)?)?;
                Ok(b)
            })
            .collect()
    };
    let stochastic = (0..k).filter(|&s| stochastic_step(sigmas, rho, s)).count();
    Ok(DeviceRollout {
        states: split(&r.states, k + 1)?,
        x0: split(&r.x0, k)?,
        log_probs: (0..stochastic)
            .map(|t| dev.download(&*r.log_prob(t)?))
            .collect::<KernelResult<_>>()?,
    })
}

/// The discriminator head on a kernel device (the CPU `DiscHead`: Conv 4×4 s2 p1 → GroupNorm →
/// LeakyReLU(0.2) → Conv 1×1 → mean pool). The first convolution is one GEMM per sample over
/// token-major columns (`cuda/conv.cu`), writing channel-major maps for GroupNorm; the 1×1
/// convolution and the mean pool commute, so the maps are pooled first and the last `[B, h]·[h]`
/// product (and its gradient) runs on the host — B·h numbers, one small read-back per call.
pub struct DeviceDiscHead {
    pub params: crate::nn::device::DeviceParams,
    pub hidden: usize,
    pub groups: usize,
}

/// What [`DeviceDiscHead::backward`] reads of a forward.
pub struct HeadSaved {
    dims: crate::kernels::conv::tokens::ConvDims,
    cols: crate::device::kernel::DevBuf<bf16>,
    w_aug: crate::device::kernel::DevBuf<bf16>,
    maps: crate::device::kernel::DevBuf<bf16>,
    mean: crate::device::kernel::DevBuf<f32>,
    rstd: crate::device::kernel::DevBuf<f32>,
    /// `[B, h]` f32.
    pooled: crate::device::kernel::DevBuf<f32>,
}

impl DeviceDiscHead {
    /// Uploads a CPU head (trainable: masters and gradients too; else bf16 only).
    pub fn new(
        dev: &crate::device::kernel::KernelDevice,
        head: &super::disc_head::DiscHead,
        trainable: bool,
    ) -> KernelResult<DeviceDiscHead> {
        Ok(DeviceDiscHead {
            params: crate::nn::device::DeviceParams::upload(dev, &head.params, trainable)?,
            hidden: head.hidden,
            groups: head.groups,
        })
    }

    /// Logits `[B]` (f32, on the device) of image-token features `[B, gh·gw, D]`, and what the
    /// backward needs. No host copies: it can be recorded into a graph.
    pub fn forward_device(
        &self,
        features: &crate::device::kernel::DevBuf<bf16>,
        (b, gh, gw): (usize, usize, usize),
    ) -> KernelResult<(crate::device::kernel::DevBuf<f32>, HeadSaved)> {
        use crate::device::kernel::GemmSpec;
        use crate::kernels::conv::tokens::{dev::im2col, ConvDims};
        use crate::kernels::disc_head::dev::{group_norm_fwd, head_logits_fwd, mean_pool_fwd};
        use crate::kernels::gemm::dev::{gemm_bf16, EpilogueBufs};
        use crate::kernels::shape::dev::{copy_cols, Cols};
        let p = &self.params;
        let dev = &p.dev;
        let (h, tokens) = (self.hidden, gh * gw);
        if b == 0 || features.len() % (b * tokens.max(1)) != 0 {
            return Err(KernelError::Invalid(format!(
                "disc head: {} feature elements for [{b}, {gh}·{gw}, D]",
                features.len()
            )));
        }
        let d = features.len() / (b * tokens);
        let dims = ConvDims {
            b,
            h: gh,
            w: gw,
            c: d,
            kh: 4,
            kw: 4,
            stride: 2,
            pad: 1,
        };
        let (rows, s) = (dims.rows(), dims.spatial());
        let cols = dev.alloc::<bf16>(b * rows * s)?;
        im2col(dev, &cols, features, &dims)?;
        // [conv1.weight | conv1.bias] as one [h, K+1] matrix against the ones row
        let w_aug = dev.alloc::<bf16>(h * rows)?;
        let k = rows - 1;
        copy_cols(
            dev,
            &w_aug,
            Cols { ld: rows, off: 0 },
            &*p.weight("conv1.weight")?,
            Cols { ld: k, off: 0 },
            h,
            k,
        )?;
        copy_cols(
            dev,
            &w_aug,
            Cols { ld: rows, off: k },
            &*p.weight("conv1.bias")?,
            Cols { ld: 1, off: 0 },
            h,
            1,
        )?;
        let maps = dev.alloc::<bf16>(b * h * s)?;
        for i in 0..b {
            let spec = GemmSpec::nn(h, s, rows);
            let (ci, mi) = (
                cols.view(i * rows * s, rows * s)?,
                maps.view(i * h * s, h * s)?,
            );
            gemm_bf16(dev, spec, &w_aug, &ci, &mi, EpilogueBufs::default())?;
        }
        let (act, mean, rstd) = group_norm_fwd(
            dev,
            &maps,
            &*p.weight("norm.weight")?,
            &*p.weight("norm.bias")?,
            (b, h, s),
            self.groups,
            1e-5,
            Some(0.2),
        )?;
        let pooled = mean_pool_fwd(dev, &act, (b * h, s))?;
        let logits = dev.alloc::<f32>(b)?;
        head_logits_fwd(
            dev,
            &logits,
            &pooled,
            &*p.weight("conv2.weight")?,
            &*p.weight("conv2.bias")?,
        )?;
        let saved = HeadSaved {
            dims,
            cols,
            w_aug,
            maps,
            mean,
            rstd,
            pooled,
        };
        Ok((logits, saved))
    }

    /// [`Self::forward_device`] with the logits read back.
    pub fn forward(
        &self,
        features: &crate::device::kernel::DevBuf<bf16>,
        dims: (usize, usize, usize),
    ) -> KernelResult<(Vec<f32>, HeadSaved)> {
        let (logits, saved) = self.forward_device(features, dims)?;
        Ok((self.params.dev.download(&logits)?, saved))
    }

    /// [`Self::backward_device`] from host logit gradients.
    pub fn backward(
        &self,
        s: &HeadSaved,
        dlogits: &[f32],
        params: bool,
    ) -> KernelResult<crate::device::kernel::DevBuf<bf16>> {
        let dl = self.params.dev.upload(dlogits)?;
        self.backward_device(s, &dl, params)
    }

    /// Gradients from `dlogits [B]` (device): returns the features' gradient `[B, gh·gw, D]`
    /// and, with `params`, adds the head's parameter gradients. No host copies.
    pub fn backward_device(
        &self,
        s: &HeadSaved,
        dlogits: &crate::device::kernel::DevBuf<f32>,
        params: bool,
    ) -> KernelResult<crate::device::kernel::DevBuf<bf16>> {
        use crate::device::kernel::{EpilogueKind, GemmSpec};
        use crate::kernels::conv::tokens::dev::col2im;
        use crate::kernels::disc_head::dev::{group_norm_bwd, head_logits_bwd, mean_pool_bwd};
        use crate::kernels::gemm::dev::{gemm_bf16, EpilogueBufs};
        use crate::kernels::shape::dev::{accumulate_bf16, accumulate_f32, copy_cols, Cols};
        let p = &self.params;
        let dev = &p.dev;
        let (b, h) = (s.dims.b, self.hidden);
        let (rows, sp) = (s.dims.rows(), s.dims.spatial());
        if dlogits.len() != b {
            return Err(KernelError::Invalid(format!(
                "disc head: {} logit gradients for {b}",
                dlogits.len()
            )));
        }
        if params && !p.is_trainable() {
            return Err(KernelError::Invalid(
                "a frozen head takes no parameter gradients".into(),
            ));
        }
        let dpooled = dev.alloc::<f32>(b * h)?;
        let (gw, gb);
        let grads = if params {
            gw = p.grad("conv2.weight")?;
            gb = p.grad("conv2.bias")?;
            Some((&*gw, &*gb))
        } else {
            None
        };
        head_logits_bwd(
            dev,
            &dpooled,
            grads,
            dlogits,
            &s.pooled,
            &*p.weight("conv2.weight")?,
        )?;
        let dact = mean_pool_bwd(dev, &dpooled, (b * h, sp))?;
        let (dmaps, dgw, dgb) = group_norm_bwd(
            dev,
            &s.maps,
            &s.mean,
            &s.rstd,
            &*p.weight("norm.weight")?,
            &*p.weight("norm.bias")?,
            &dact,
            (b, h, sp),
            self.groups,
            Some(0.2),
        )?;
        if params {
            accumulate_f32(dev, &*p.grad("norm.weight")?, &dgw)?;
            accumulate_f32(dev, &*p.grad("norm.bias")?, &dgb)?;
        }
        let dcols = dev.alloc::<bf16>(b * rows * sp)?;
        let k = rows - 1;
        let (dw_aug, dw, db) = (
            dev.alloc::<bf16>(h * rows)?,
            dev.alloc::<bf16>(h * k)?,
            dev.alloc::<bf16>(h)?,
        );
        for i in 0..b {
            let (ci, di) = (
                s.cols.view(i * rows * sp, rows * sp)?,
                dmaps.view(i * h * sp, h * sp)?,
            );
            if params {
                // dW_aug = dmaps_i · cols_iᵀ: the weight's and (last column) the bias's gradient
                let spec = GemmSpec {
                    m: h,
                    n: rows,
                    k: sp,
                    trans_a: false,
                    trans_b: true,
                    epilogue: EpilogueKind::None,
                };
                gemm_bf16(dev, spec, &di, &ci, &dw_aug, EpilogueBufs::default())?;
                copy_cols(
                    dev,
                    &dw,
                    Cols { ld: k, off: 0 },
                    &dw_aug,
                    Cols { ld: rows, off: 0 },
                    h,
                    k,
                )?;
                copy_cols(
                    dev,
                    &db,
                    Cols { ld: 1, off: 0 },
                    &dw_aug,
                    Cols { ld: rows, off: k },
                    h,
                    1,
                )?;
                accumulate_bf16(dev, &*p.grad("conv1.weight")?, &dw)?;
                accumulate_bf16(dev, &*p.grad("conv1.bias")?, &db)?;
            }
            // dcols_i = W_augᵀ · dmaps_i
            let spec = GemmSpec {
                m: rows,
                n: sp,
                k: h,
                trans_a: true,
                trans_b: false,
                epilogue: EpilogueKind::None,
            };
            gemm_bf16(
                dev,
                spec,
                &s.w_aug,
                &di,
                &*dcols.view(i * rows * sp, rows * sp)?,
                EpilogueBufs::default(),
            )?;
        }
        let dfeatures = dev.alloc::<bf16>(b * s.dims.h * s.dims.w * s.dims.c)?;
        col2im(dev, &dfeatures, &dcols, &s.dims)?;
        Ok(dfeatures)
    }
}

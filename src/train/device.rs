//! Flow-matching training on a kernel device: the loss of teacher pretraining and of the fake
//! score's update (ALGORITHM.md §4), every op on the device — noising, the bf16 MMDiT, the MSE
//! gradient, the backward — then [`crate::optim::device::DeviceAdamW`].

use half::bf16;

use crate::device::kernel::{DevBuf, KernelError, KernelResult};
use crate::kernels::elementwise::dev::cast_f32_to_bf16_into;
use crate::kernels::sde::dev::{flow_noise, velocity_mse_grad};
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
    // x0 stands in for the model input's shape; the noised state replaces it below
    let inputs = model.inputs(batch.x0, &t, batch.pooled, batch.context)?;
    let (x0, noise, sigma) = (
        dev.upload(batch.x0.f32s())?,
        dev.upload(batch.noise.f32s())?,
        dev.upload(batch.sigma)?,
    );
    let (xt, target) = flow_noise(dev, &x0, &noise, &sigma, (b, x0.len() / b))?;
    cast_f32_to_bf16_into(dev, &inputs.x, &xt)?;
    let fwd = model.forward(&inputs, keep)?;
    if fwd.velocity.len() != target.len() {
        return Err(KernelError::Invalid(
            "flow matching needs as many output channels as input channels".into(),
        ));
    }
    let dv = dev.alloc::<bf16>(target.len())?;
    let loss = velocity_mse_grad(dev, &dv, &fwd.velocity, &target)?;
    let saved = fwd.saved.as_ref().expect("a kept forward");
    model.backward(&inputs, saved, &dv, true)?;
    Ok(loss)
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

/// The generator's `x̂0 = x − σ·G(x)` of a batch, with what its backward needs.
pub struct GeneratorX0 {
    pub inputs: DeviceInputs,
    pub forward: Forward,
    /// f32 `[n, C, H, W]`.
    pub x0: DevBuf<f32>,
    sigma: DevBuf<f32>,
}

/// `x̂0 = x − σ·G(x)` for the rollout state `x` (host, `[n, C, H, W]`) at one σ.
pub fn generator_x0(
    generator: &DeviceMmdit,
    x: &Tensor,
    sigma: f32,
    (pooled, context): (&Tensor, &Tensor),
    keep: Keep,
) -> KernelResult<GeneratorX0> {
    use crate::kernels::sde::dev::x0_from_velocity;
    let dev = &generator.dev;
    let n = x.shape().first().copied().unwrap_or(0);
    let sig = vec![sigma; n];
    let t: Vec<f32> = sig.iter().map(|&s| crate::flow::timestep_of(s)).collect();
    let inputs = generator.inputs(x, &t, pooled, context)?;
    let forward = generator.forward(&inputs, keep)?;
    let (xd, sigma) = (dev.upload(x.f32s())?, dev.upload(&sig)?);
    let x0 = dev.alloc::<f32>(x.numel())?;
    x0_from_velocity(dev, &x0, &xd, &forward.velocity, &sigma, false, 1.0)?;
    Ok(GeneratorX0 {
        inputs,
        forward,
        x0,
        sigma,
    })
}

/// Takes the gradient `g` at x̂0 back through the generator into its parameter gradients
/// (`∂x̂0/∂v = −σ`).
pub fn generator_backward_from_x0(
    generator: &DeviceMmdit,
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
    generator.backward(&gx.inputs, saved, &dv, true)?;
    Ok(())
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
    use crate::kernels::sde::dev::{dmd_gradient, flow_noise_into, x0_from_velocity};
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
    let per = numel / n;
    let t_of = |s: &[f32]| -> Vec<f32> { s.iter().map(|&v| crate::flow::timestep_of(v)).collect() };
    let (tau, noise) = (dev.upload(batch.tau)?, dev.upload(batch.noise.f32s())?);
    let xt = dev.alloc::<f32>(numel)?;
    flow_noise_into(dev, &xt, None, x0, &noise, &tau, (n, per))?;
    // the teacher's conditional and unconditional rows in one call, then the fake score
    let both_tau: Vec<f32> = batch.tau.iter().chain(batch.tau).copied().collect();
    let tin = teacher.inputs(
        &concat(&[batch.x, batch.x], 0),
        &t_of(&both_tau),
        &concat(&[batch.pooled, batch.pooled_uncond], 0),
        &concat(&[batch.context, batch.context_uncond], 0),
    )?;
    cast_f32_to_bf16_into(dev, &*tin.x.view(0, numel)?, &xt)?;
    cast_f32_to_bf16_into(dev, &*tin.x.view(numel, numel)?, &xt)?;
    let vt = teacher.forward(&tin, Keep::Nothing)?.velocity;
    let x0_real = dev.alloc::<f32>(numel)?;
    x0_from_velocity(dev, &x0_real, &xt, &vt, &tau, true, batch.w_real)?;
    let fin = fake.inputs(batch.x, &t_of(batch.tau), batch.pooled, batch.context)?;
    cast_f32_to_bf16_into(dev, &fin.x, &xt)?;
    let vf = fake.forward(&fin, Keep::Nothing)?.velocity;
    let x0_fake = dev.alloc::<f32>(numel)?;
    x0_from_velocity(dev, &x0_fake, &xt, &vf, &tau, false, 1.0)?;
    let scale = batch.lambda / numel as f32;
    let g = dmd_gradient(dev, x0, &x0_real, &x0_fake, (n, per), scale)?;
    let sq: f64 = dev
        .download(&g)?
        .iter()
        .map(|&v| (v as f64 / scale as f64).powi(2))
        .sum();
    Ok((g, (sq / n as f64).sqrt() as f32))
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
    let gx = generator_x0(
        generator,
        batch.x,
        batch.sigma,
        (batch.pooled, batch.context),
        keep,
    )?;
    let (g, norm) = dmd_seed(teacher, fake, &gx.x0, batch)?;
    generator_backward_from_x0(generator, &gx, &g)?;
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

/// The unified ρ-SDE rollout (ALGORITHM.md §3.2) of `model` from the start noise `noise` along
/// `sigmas`, with `z[k]` the noise of step k's transition (ignored on deterministic steps: ρ = 0
/// or σ' = 0): K generator calls, each followed by the `sde_rho_step` kernel.
pub fn rollout_sde(
    model: &DeviceMmdit,
    noise: &Tensor,
    z: &[Tensor],
    sigmas: &[f32],
    rho: f32,
    pooled: &Tensor,
    context: &Tensor,
) -> KernelResult<DeviceRollout> {
    use crate::kernels::elementwise::dev::cast_bf16_to_f32;
    use crate::kernels::sde::dev::{rho_step, NextState};
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
    let per = noise.numel() / n;
    let t_of = |s: f32| vec![crate::flow::timestep_of(s); n];
    let inputs = model.inputs(noise, &t_of(sigmas[0]), pooled, context)?;
    let mut out = DeviceRollout {
        states: vec![dev.upload(noise.f32s())?],
        x0: Vec::new(),
        log_probs: Vec::new(),
    };
    for step in 0..k {
        let (s, s_next) = (sigmas[step], sigmas[step + 1]);
        let x = out.states.last().expect("the start state");
        cast_f32_to_bf16_into(dev, &inputs.x, x)?;
        if step > 0 {
            let f = crate::nn::timestep_features(&t_of(s), model.config.freq_dim);
            let host: Vec<bf16> = f.f32s().iter().map(|&v| bf16::from_f32(v)).collect();
            dev.copy_to_device(&host, &inputs.t_features)?;
        }
        let v = cast_bf16_to_f32(dev, &model.forward(&inputs, Keep::Nothing)?.velocity)?;
        let zs = dev.upload(z[step].f32s())?;
        let (sd, snd) = (dev.upload(&vec![s; n])?, dev.upload(&vec![s_next; n])?);
        let t = rho_step(dev, x, &v, NextState::Sample(&zs), &sd, &snd, rho, (n, per))?;
        if s_next > 0.0 && rho > 0.0 {
            out.log_probs.push(dev.download(&t.log_prob)?);
        }
        out.x0.push(t.x0);
        out.states
            .push(t.next.expect("a sampled transition writes its next state"));
    }
    Ok(out)
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
    pooled: Vec<f32>,
    w2: Vec<f32>,
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

    /// Logits `[B]` (host) of image-token features `[B, gh·gw, D]`, and what the backward needs.
    pub fn forward(
        &self,
        features: &crate::device::kernel::DevBuf<bf16>,
        (b, gh, gw): (usize, usize, usize),
    ) -> KernelResult<(Vec<f32>, HeadSaved)> {
        use crate::device::kernel::{EpilogueKind, GemmSpec};
        use crate::kernels::conv::tokens::{dev::im2col, ConvDims};
        use crate::kernels::disc_head::dev::{group_norm_fwd, mean_pool_fwd};
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
            let spec = GemmSpec {
                m: h,
                n: s,
                k: rows,
                trans_a: false,
                trans_b: false,
                epilogue: EpilogueKind::None,
            };
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
        let pooled = dev.download(&mean_pool_fwd(dev, &act, (b * h, s))?)?;
        let w: Vec<f32> = dev
            .download(&*p.weight("conv2.weight")?)?
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let b2 = dev.download(&*p.weight("conv2.bias")?)?[0].to_f32();
        let logits = (0..b)
            .map(|i| {
                pooled[i * h..(i + 1) * h]
                    .iter()
                    .zip(&w)
                    .map(|(a, c)| a * c)
                    .sum::<f32>()
                    + b2
            })
            .collect();
        let saved = HeadSaved {
            dims,
            cols,
            w_aug,
            maps,
            mean,
            rstd,
            pooled,
            w2: w,
        };
        Ok((logits, saved))
    }

    /// Gradients from `dlogits [B]`: returns the features' gradient `[B, gh·gw, D]` and, with
    /// `params`, adds the head's parameter gradients.
    pub fn backward(
        &self,
        s: &HeadSaved,
        dlogits: &[f32],
        params: bool,
    ) -> KernelResult<crate::device::kernel::DevBuf<bf16>> {
        use crate::device::kernel::{EpilogueKind, GemmSpec};
        use crate::kernels::conv::tokens::dev::col2im;
        use crate::kernels::disc_head::dev::{group_norm_bwd, mean_pool_bwd};
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
        let dpooled: Vec<f32> = (0..b * h).map(|i| dlogits[i / h] * s.w2[i % h]).collect();
        if params {
            let dw2: Vec<f32> = (0..h)
                .map(|c| (0..b).map(|i| dlogits[i] * s.pooled[i * h + c]).sum())
                .collect();
            let db2 = [dlogits.iter().sum::<f32>()];
            accumulate_f32(dev, &*p.grad("conv2.weight")?, &dev.upload(&dw2)?)?;
            accumulate_f32(dev, &*p.grad("conv2.bias")?, &dev.upload(&db2)?)?;
        }
        let dact = mean_pool_bwd(dev, &dev.upload(&dpooled)?, (b * h, sp))?;
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

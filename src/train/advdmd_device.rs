//! One AdvDMD iteration on a kernel device (ALGORITHM.md §5.2): the CPU trainer's
//! [`super::advdmd::AdvDmd::step`] step for step — the same host random draws in the same order,
//! the same losses and cadence — with every model call on the device (the bf16 MMDiTs, the
//! discriminator head, the ρ-SDE, the DMD seed, the fused AdamW with EMA). The host keeps what is
//! a handful of numbers per sample: logits, rewards, advantages, the PPO objective.
//!
//! Conditioning comes in per iteration as host tensors ([`IterBatch`]): the Shapes world builds
//! it from prompts with the teacher's frozen text encoder ([`shapes_batch`]); the SD3 benchmarks
//! from random context and pooled vectors. Generator and fake score share one gradient buffer
//! (their backward passes never overlap). A run saves through the CPU trainer's checkpoint
//! ([`DeviceAdvDmd::sync_to_host`] + `AdvDmd::save`) and resumes exactly from one
//! (`AdvDmd::load` + [`DeviceAdvDmd::from_host`]). A frozen discriminator (`frozen_disc_after`)
//! is a bf16 snapshot of the fake score's backbone with the head held fixed, as on the CPU.

use half::bf16;

use super::advdmd::{AdvDmd, AdvDmdConfig, DiscStates, IterMetrics};
use super::device::{
    dmd_seed, flow_matching_grads, generator_backward_from_x0, generator_x0, rollout_sde,
    DeviceDiscHead, DeviceRollout, DmdBatch, FlowBatch, HeadSaved,
};
use super::disc_head::DiscHead;
use super::losses::{group_advantages, ppo_loss, returns_to_go};
use super::rollout::few_step_sigmas;
use super::shapes_model::ShapesModel;
use crate::device::kernel::{DevBuf, KernelDevice, KernelResult};
use crate::error::{Error, Result};
use crate::kernels::elementwise::dev::{cast_bf16_to_f32, cast_f32_to_bf16_into, copy};
use crate::kernels::elementwise::sigmoid;
use crate::kernels::sde::dev::{
    flow_noise_into, rho_step, velocity_grad_from_x0, x0_from_velocity, NextState,
};
use crate::mmdit::device::{DeviceInputs, DeviceMmdit, Keep, Saved};
use crate::mmdit::Mmdit;
use crate::nn::device::DeviceParams;
use crate::optim::device::{DeviceAdamW, FlatParams};
use crate::optim::AdamWConfig;
use crate::tensor::{Rng, Tensor};

/// Context `[B, L, ctx_dim]` and pooled `[B, pooled_dim]` of B rows (host).
#[derive(Clone, Debug)]
pub struct Cond {
    pub context: Tensor,
    pub pooled: Tensor,
}

impl Cond {
    fn rows(&self) -> usize {
        self.pooled.shape().first().copied().unwrap_or(0)
    }

    /// The rows `times` times over, block after block.
    fn repeated(&self, times: usize) -> Cond {
        use crate::kernels::shape::concat;
        Cond {
            context: concat(&vec![&self.context; times], 0),
            pooled: concat(&vec![&self.pooled; times], 0),
        }
    }
}

/// What one iteration reads besides its own random draws: M real samples with their prompts'
/// conditioning, and the conditioning of the N = M·G generated samples (prompt i repeated G
/// times, sample-major) and of the empty prompt (CFG's unconditional branch), N rows each.
pub struct IterBatch {
    pub real: Tensor,
    pub real_cond: Cond,
    pub cond: Cond,
    pub uncond: Cond,
}

/// The Shapes world's batch: `prompts` scenes from `rng` (as the CPU step draws them), encoded by
/// the teacher's frozen text encoder.
pub fn shapes_batch(
    teacher: &ShapesModel,
    prompts: usize,
    group: usize,
    rng: &mut Rng,
) -> Result<IterBatch> {
    let (real_prompts, real) = crate::data::shapes::sample_batch(prompts, rng);
    let repeated: Vec<String> = real_prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), group))
        .collect();
    let encode = |ids: &[u32]| {
        let _ng = crate::autograd::no_grad();
        let (context, pooled) = teacher.text.forward(ids);
        Cond {
            context: context.value().clone(),
            pooled: pooled.value().clone(),
        }
    };
    let empty = teacher.tokenizer.encode("")?;
    let n = prompts * group;
    Ok(IterBatch {
        real,
        real_cond: encode(&teacher.tokenizer.encode_batch(&real_prompts)?),
        cond: encode(&teacher.tokenizer.encode_batch(&repeated)?),
        uncond: encode(&empty.repeat(n)),
    })
}

/// One parameter set of a joint optimizer step: its optimizer, its buffers and (the generator)
/// its EMA `(shadow, decay)`.
type StepPart<'a> = (
    &'a mut DeviceAdamW,
    &'a DeviceParams,
    Option<(&'a DevBuf<f32>, f32)>,
);

/// A discriminator call kept for its backward.
struct LogitsSaved {
    inputs: DeviceInputs,
    saved: Saved,
    head: HeadSaved,
}

/// How a device run holds its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRunOptions {
    /// What the differentiated forwards keep ([`Keep::BlockInputs`]: activation checkpointing).
    pub keep: Keep,
    /// Adam's moments in bf16 with stochastic rounding (4 instead of 8 bytes a trained
    /// parameter: docs/memory-plan.md item 3).
    pub bf16_moments: bool,
}

impl Default for DeviceRunOptions {
    fn default() -> Self {
        DeviceRunOptions {
            keep: Keep::All,
            bf16_moments: false,
        }
    }
}

pub struct DeviceAdvDmd {
    pub config: AdvDmdConfig,
    pub dev: KernelDevice,
    /// bf16 only.
    pub teacher: DeviceMmdit,
    pub generator: DeviceMmdit,
    pub fake: DeviceMmdit,
    pub head: DeviceDiscHead,
    /// The fake score's backbone as it was when the discriminator froze
    /// (`config.frozen_disc_after`): its bf16 weights, which the discriminator then evaluates
    /// with the head held fixed.
    pub frozen_backbone: Option<DeviceMmdit>,
    pub feature_block: usize,
    /// What the forwards that are differentiated keep ([`Keep::BlockInputs`]: checkpointing).
    pub keep: Keep,
    opt_generator: DeviceAdamW,
    opt_fake: DeviceAdamW,
    opt_head: DeviceAdamW,
    /// The generator's EMA over its trainable elements (f32).
    pub ema: DevBuf<f32>,
    pub rng: Rng,
    pub iteration: u64,
    pub generator_steps: u64,
}

/// A flat vector over `p`'s trainable elements (its optimizer's layout) from per-name values;
/// a name without a value (a CPU optimizer that has not stepped yet) stays zero.
fn flat_trainable(p: &DeviceParams, value: impl Fn(&str) -> Option<Vec<f32>>) -> Result<Vec<f32>> {
    let mut flat = vec![0f32; p.n_trainable];
    for (name, slot) in p.slots() {
        if !slot.trainable {
            continue;
        }
        if let Some(v) = value(name) {
            if v.len() != slot.numel() || slot.offset + v.len() > flat.len() {
                return Err(Error::Invalid(format!(
                    "device AdvDMD: {name} has {} values for {} elements",
                    v.len(),
                    slot.numel()
                )));
            }
            flat[slot.offset..slot.offset + v.len()].copy_from_slice(&v);
        }
    }
    Ok(flat)
}

/// The rollout's `states` one after another in one buffer (state-major rows).
fn stack_states(
    dev: &KernelDevice,
    roll: &DeviceRollout,
    states: &[usize],
) -> KernelResult<DevBuf<f32>> {
    let len = roll.states[0].len();
    let out = dev.alloc::<f32>(states.len() * len)?;
    for (j, &s) in states.iter().enumerate() {
        copy(dev, &*out.view(j * len, len)?, &roll.states[s])?;
    }
    Ok(out)
}

/// Each state's σ repeated for its `rows` samples, state after state.
fn state_sigmas(states: &[usize], sig: &[f32], rows: usize) -> Vec<f32> {
    states
        .iter()
        .flat_map(|&s| std::iter::repeat_n(sig[s], rows))
        .collect()
}

fn softplus(x: f32) -> f32 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `(norm, factor)` of the joint gradient norm of several flat gradients (the CPU
/// `clip_grad_norm` over several parameter maps).
fn joint_clip(norms: &[f32], max_norm: f32) -> (f32, f32) {
    let norm = norms
        .iter()
        .map(|&n| (n as f64).powi(2))
        .sum::<f64>()
        .sqrt() as f32;
    let factor = if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    };
    (norm, factor)
}

impl DeviceAdvDmd {
    /// The device copy of a CPU trainer — fresh, or loaded from a checkpoint (`AdvDmd::load`,
    /// which [`Self::sync_to_host`] + `AdvDmd::save` write): weights, optimizer moments and steps,
    /// EMA, configuration, RNG and counters, so the run continues exactly.
    pub fn from_host(
        dev: &KernelDevice,
        host: &AdvDmd,
        opts: DeviceRunOptions,
    ) -> Result<DeviceAdvDmd> {
        let mut run = Self::build(
            dev,
            host.config.clone(),
            (&host.teacher.mmdit, &host.generator.mmdit, &host.fake.mmdit),
            &host.head,
            opts,
            host.rng.clone(),
        )?;
        run.feature_block = host.feature_block;
        if let Some(b) = &host.frozen_backbone {
            run.frozen_backbone = Some(DeviceMmdit::frozen(dev, &b.mmdit)?);
        }
        run.iteration = host.iteration;
        run.generator_steps = host.generator_steps;
        let shadow = flat_trainable(&run.generator, |name| {
            Some(host.ema.shadow.param(name).value().f32s().to_vec())
        })?;
        dev.copy_to_device(&shadow, &run.ema)?;
        let opt_generator = &host.opt_generator;
        let moments = |p: &DeviceParams, opt: &crate::optim::AdamW| {
            let get = |map: &std::collections::BTreeMap<String, Vec<f32>>| {
                flat_trainable(p, |name| map.get(name).cloned())
            };
            Result::Ok((get(&opt.m)?, get(&opt.v)?))
        };
        for (dst, p, src) in [
            (&mut run.opt_generator, &*run.generator, opt_generator),
            (&mut run.opt_fake, &*run.fake, &host.opt_fake),
            (&mut run.opt_head, &run.head.params, &host.opt_fake),
        ] {
            let (m, v) = moments(p, src)?;
            dst.upload_moments(dev, &m, &v, src.step)?;
        }
        Ok(run)
    }

    /// Writes the run's state into `host` — weights (f32 masters), EMA, optimizer moments and
    /// steps, RNG and counters — for `AdvDmd::save` (the teacher and configuration are the
    /// host's own and stay).
    pub fn sync_to_host(&self, host: &mut AdvDmd) -> Result<()> {
        let dev = &self.dev;
        let put = |p: &DeviceParams, map: &crate::nn::ParamMap| -> Result<()> {
            for (name, t) in p.download_named(&p.master)? {
                map.param(&name).set_value(t);
            }
            Ok(())
        };
        put(&self.generator, &host.generator.mmdit.params)?;
        put(&self.fake, &host.fake.mmdit.params)?;
        put(&self.head.params, &host.head.params)?;
        for (name, t) in self.ema_named()? {
            host.ema.shadow.param(&name).set_value(t);
        }
        let split = |p: &DeviceParams,
                     flat: &[f32],
                     into: &mut std::collections::BTreeMap<String, Vec<f32>>| {
            for (name, slot) in p.slots() {
                if slot.trainable {
                    into.insert(
                        name.clone(),
                        flat[slot.offset..slot.offset + slot.numel()].to_vec(),
                    );
                }
            }
        };
        let (m, v) = self.opt_generator.download_moments(dev)?;
        split(&self.generator, &m, &mut host.opt_generator.m);
        split(&self.generator, &v, &mut host.opt_generator.v);
        host.opt_generator.step = self.opt_generator.step;
        for (opt, p) in [
            (&self.opt_fake, &*self.fake),
            (&self.opt_head, &self.head.params),
        ] {
            let (m, v) = opt.download_moments(dev)?;
            split(p, &m, &mut host.opt_fake.m);
            split(p, &v, &mut host.opt_fake.v);
        }
        host.opt_fake.step = self.opt_fake.step;
        host.frozen_backbone = match &self.frozen_backbone {
            Some(b) => {
                // the snapshot as the device evaluates it: the fake score's bf16 weights at the
                // freeze (a resumed device run rounds them to the same bf16 values)
                let snap = host.fake.copy_transformer();
                snap.mmdit.params.set_trainable(false);
                for (name, t) in b.params.download_weights_named()? {
                    snap.mmdit.params.param(&name).set_value(t);
                }
                Some(snap)
            }
            None => None,
        };
        host.rng = self.rng.clone();
        host.iteration = self.iteration;
        host.generator_steps = self.generator_steps;
        Ok(())
    }

    /// A fresh run: generator and fake score start as the teacher (`teacher`'s trainable flags
    /// say which tensors train; `pos_embed` never does), a fresh head from `config.seed`.
    pub fn new(
        dev: &KernelDevice,
        teacher: &Mmdit,
        config: AdvDmdConfig,
        opts: DeviceRunOptions,
    ) -> Result<DeviceAdvDmd> {
        let mut rng = Rng::new(config.seed);
        let head = DiscHead::init(teacher.config.hidden, &mut rng);
        let trainable_copy = || {
            let p = teacher.params.duplicate();
            p.set_trainable(true);
            p.param("pos_embed").set_trainable(false);
            Mmdit::new(teacher.config.clone(), p)
        };
        let (generator, fake) = (trainable_copy(), trainable_copy());
        Self::build(dev, config, (teacher, &generator, &fake), &head, opts, rng)
    }

    fn build(
        dev: &KernelDevice,
        config: AdvDmdConfig,
        (teacher, generator, fake): (&Mmdit, &Mmdit, &Mmdit),
        head: &DiscHead,
        opts: DeviceRunOptions,
        rng: Rng,
    ) -> Result<DeviceAdvDmd> {
        let keep = opts.keep;
        if keep == Keep::Nothing {
            return Err(Error::Invalid(
                "device AdvDMD: the differentiated forwards must keep activations".into(),
            ));
        }
        let generator = DeviceMmdit::new(dev, generator)?;
        let mut fake = DeviceMmdit::new(dev, fake)?;
        // the critic's backward and step finish before the generator's backward starts
        fake.params.share_grads_with(&generator)?;
        let head = DeviceDiscHead::new(dev, head, true)?;
        let adam = |p: &DeviceParams, lr: f32, salt: u32| {
            let config = AdamWConfig {
                lr,
                ..Default::default()
            };
            if opts.bf16_moments {
                DeviceAdamW::with_bf16_moments(dev, p.n_trainable, config, salt)
            } else {
                DeviceAdamW::new(dev, p.n_trainable, config)
            }
        };
        let ema = dev.zeros::<f32>(generator.n_trainable)?;
        crate::kernels::shape::dev::accumulate_f32(
            dev,
            &ema,
            &*generator.master.view(0, generator.n_trainable)?,
        )?;
        Ok(DeviceAdvDmd {
            feature_block: teacher.config.depth / 2,
            teacher: DeviceMmdit::frozen(dev, teacher)?,
            opt_generator: adam(&generator, config.lr_generator, 0x6e6e_0001)?,
            opt_fake: adam(&fake, config.lr_fake, 0x6e6e_0002)?,
            opt_head: adam(&head.params, config.lr_fake, 0x6e6e_0003)?,
            generator,
            fake,
            head,
            frozen_backbone: None,
            keep,
            ema,
            rng,
            iteration: 0,
            generator_steps: 0,
            config,
            dev: dev.clone(),
        })
    }

    pub fn sigmas(&self) -> Vec<f32> {
        few_step_sigmas(self.config.steps_per_sample, self.config.shift)
    }

    fn lr(&self, peak: f32) -> f32 {
        crate::optim::lr_at(self.iteration, peak, self.config.lr_warmup, 0, 1.0)
    }

    /// One iteration on `batch` (M real samples, N = M·G generated).
    pub fn step(&mut self, batch: &IterBatch) -> Result<IterMetrics> {
        let c = self.config.clone();
        let (m, n) = (c.prompts, c.prompts * c.group);
        let rs = batch.real.shape();
        if rs.len() != 4
            || rs[0] != m
            || batch.real_cond.rows() != m
            || batch.cond.rows() != n
            || batch.uncond.rows() != n
        {
            return Err(Error::Invalid(format!(
                "device AdvDMD: a batch of {m} real samples {rs:?} with {} / {} / {} conditioning \
                 rows (want {m} / {n} / {n})",
                batch.real_cond.rows(),
                batch.cond.rows(),
                batch.uncond.rows()
            )));
        }
        if c.frozen_disc_after.is_some_and(|f| self.iteration >= f)
            && self.frozen_backbone.is_none()
        {
            self.frozen_backbone = Some(self.fake.frozen_copy()?);
        }
        let sig = self.sigmas();
        let k = c.steps_per_sample;
        let shape = [n, rs[1], rs[2], rs[3]];
        // the rollout's noise, drawn as train::rollout::rollout_sde draws it
        let noise = Tensor::randn(&shape, &mut self.rng);
        let z: Vec<Tensor> = (0..k)
            .map(|s| {
                if sig[s + 1] > 0.0 && c.rho > 0.0 {
                    Tensor::randn(&shape, &mut self.rng)
                } else {
                    Tensor::zeros(&shape)
                }
            })
            .collect();
        let roll = rollout_sde(
            &self.generator,
            &noise,
            &z,
            &sig,
            c.rho,
            &batch.cond.pooled,
            &batch.cond.context,
        )?;
        let mut metrics = IterMetrics {
            iteration: self.iteration + 1,
            ..Default::default()
        };
        let (generator_step, rl_step) = c.step_kind(self.iteration, self.generator_steps);
        // rewards with the discriminator as it is now, before it learns from this rollout
        let rewards = if rl_step {
            Some(self.rewards(&roll, &batch.cond, &sig, &shape)?)
        } else {
            None
        };
        self.guidance_update(&roll, batch, &sig, &shape, &mut metrics)?;
        if generator_step {
            self.generator_update(&roll, batch, &sig, &shape, rewards.as_deref(), &mut metrics)?;
            self.generator_steps += 1;
        }
        metrics.generator_step = generator_step;
        metrics.rl_step = rl_step;
        self.iteration += 1;
        Ok(metrics)
    }

    /// `model`'s inputs for the device state `x` (f32, `shape`) at per-sample `sigma`.
    fn inputs_at(
        model: &DeviceMmdit,
        x: &DevBuf<f32>,
        shape: &[usize],
        sigma: &[f32],
        cond: &Cond,
    ) -> KernelResult<DeviceInputs> {
        let t: Vec<f32> = sigma.iter().map(|&s| crate::flow::timestep_of(s)).collect();
        // a placeholder of the right shape, overwritten on the device
        let inputs = model.inputs(&Tensor::zeros(shape), &t, &cond.pooled, &cond.context)?;
        cast_f32_to_bf16_into(&model.dev, &inputs.x, x)?;
        Ok(inputs)
    }

    /// Discriminator logits `[B]` of the device images `x` at per-sample `sigma`; with `keep`,
    /// what [`Self::logits_backward`] needs.
    fn logits(
        &self,
        x: &DevBuf<f32>,
        shape: &[usize],
        sigma: &[f32],
        cond: &Cond,
        keep: bool,
    ) -> KernelResult<(Vec<f32>, Option<LogitsSaved>)> {
        let backbone = self.disc_backbone();
        let inputs = Self::inputs_at(backbone, x, shape, sigma, cond)?;
        let mode = if keep { self.keep } else { Keep::Nothing };
        let f = backbone.forward_features(&inputs, self.feature_block, mode)?;
        let p = backbone.config.patch;
        let (logits, head) = self
            .head
            .forward(&f.features, (shape[0], shape[2] / p, shape[3] / p))?;
        let saved = match (keep, f.saved) {
            (true, Some(saved)) => Some(LogitsSaved {
                inputs,
                saved,
                head,
            }),
            _ => None,
        };
        Ok((logits, saved))
    }

    /// Gradients of a kept discriminator call from `dlogits`: into the head's and the fake
    /// backbone's parameter gradients when asked; returns the image's gradient (bf16).
    fn logits_backward(
        &self,
        s: &LogitsSaved,
        dlogits: &[f32],
        params: bool,
    ) -> KernelResult<DevBuf<bf16>> {
        let dfeat = self.head.backward(&s.head, dlogits, params)?;
        Ok(self
            .disc_backbone()
            .backward_features(&s.inputs, &s.saved, &dfeat, params)?
            .x)
    }

    /// The discriminator's backbone: the fake score, or its snapshot once frozen.
    fn disc_backbone(&self) -> &DeviceMmdit {
        self.frozen_backbone.as_ref().unwrap_or(&self.fake)
    }

    /// `r_{i,k} = clip(D(x_k, σ_k))` for k = 1..K, sample-major `[n][K]`: one call over every
    /// state's samples.
    fn rewards(
        &self,
        roll: &DeviceRollout,
        cond: &Cond,
        sig: &[f32],
        shape: &[usize],
    ) -> KernelResult<Vec<Vec<f32>>> {
        let (n, k) = (shape[0], sig.len() - 1);
        let clip = self.config.reward_clip;
        let states: Vec<usize> = (1..=k).collect();
        let x = stack_states(&self.dev, roll, &states)?;
        let (l, _) = self.logits(
            &x,
            &[n * k, shape[1], shape[2], shape[3]],
            &state_sigmas(&states, sig, n),
            &cond.repeated(k),
            false,
        )?;
        Ok((0..n)
            .map(|i| (0..k).map(|j| l[j * n + i].clamp(-clip, clip)).collect())
            .collect())
    }

    /// Clips the gradients of `params` to their joint norm and steps each with its optimizer.
    fn step_jointly(
        dev: &KernelDevice,
        parts: &mut [StepPart],
        lr: f32,
        max_norm: f32,
    ) -> KernelResult<f32> {
        let mut norms = Vec::with_capacity(parts.len());
        for (_, p, _) in parts.iter() {
            let g = p.grads.view(0, p.n_trainable)?;
            norms
                .push(dev.download(&crate::kernels::optim::dev::grad_norm_clip(dev, &g, 0.0)?)?[0]);
        }
        let (norm, factor) = joint_clip(&norms, max_norm);
        for (opt, p, ema) in parts.iter_mut() {
            let flat = FlatParams {
                master: &p.master,
                bf16: &p.weights,
                grads: &p.grads,
                n_decay: p.n_decay,
            };
            opt.step_with_clip(dev, &flat, lr, [norm, factor], *ema)?;
        }
        Ok(norm)
    }

    fn guidance_update(
        &mut self,
        roll: &DeviceRollout,
        batch: &IterBatch,
        sig: &[f32],
        shape: &[usize],
        metrics: &mut IterMetrics,
    ) -> Result<()> {
        let c = self.config.clone();
        let dev = self.dev.clone();
        let k = sig.len() - 1;
        let (n, m) = (shape[0], c.prompts);
        self.fake.zero_grad()?;
        self.head.params.zero_grad()?;

        // the fake score's flow-matching loss on one of the rollout's x̂0 (train::losses::fake_score_loss)
        let pick = self.rng.below(k as u64) as usize;
        let x0 = Tensor::from_vec(dev.download(&roll.x0[pick])?, shape);
        let sigma: Vec<f32> = (0..n).map(|_| sigmoid(self.rng.normal())).collect();
        let noise = Tensor::randn(shape, &mut self.rng);
        let fake_loss = flow_matching_grads(
            &self.fake,
            &FlowBatch {
                x0: &x0,
                noise: &noise,
                sigma: &sigma,
                pooled: &batch.cond.pooled,
                context: &batch.cond.context,
            },
            self.keep,
        )?;

        // The discriminator on generated states and noised real samples. Every kept state goes
        // into one call for the generated rows and one for the real rows (state-major: the
        // state's n, resp. m, samples at its σ) instead of a call per state: the GEMMs get
        // S times the rows. A softplus loss is per logit, so the rows' gradients are independent
        // and one backward per call carries them all. The real samples' noises are drawn state
        // by state, in the CPU trainer's order.
        let states: Vec<usize> = match c.disc_states {
            DiscStates::Trajectory => (1..=k).collect(),
            DiscStates::Final => vec![k],
        };
        let ns = states.len();
        let (n_fake, n_real) = ((n * ns) as f32, (m * ns) as f32);
        let per = roll.states[0].len() / n;
        let xf = stack_states(&dev, roll, &states)?;
        let xr = dev.alloc::<f32>(ns * m * per)?;
        let real = dev.upload(batch.real.f32s())?;
        for (j, &s) in states.iter().enumerate() {
            let noise = dev.upload(Tensor::randn(batch.real.shape(), &mut self.rng).f32s())?;
            let sm = dev.upload(&vec![sig[s]; m])?;
            let y = xr.view(j * m * per, m * per)?;
            flow_noise_into(&dev, &y, None, &real, &noise, &sm, (m, per))?;
        }
        let at = |rows: usize| state_sigmas(&states, sig, rows);
        let rows_shape = |rows: usize| [rows * ns, shape[1], shape[2], shape[3]];
        // A frozen discriminator is still evaluated (its accuracy is the reward model's), but
        // neither its head nor its snapshot learns: no backward.
        let train = self.frozen_backbone.is_none();
        let (lf, saved) =
            self.logits(&xf, &rows_shape(n), &at(n), &batch.cond.repeated(ns), train)?;
        if let Some(saved) = saved {
            let dl: Vec<f32> = lf
                .iter()
                .map(|&l| c.lambda_d * sigmoid(l) / n_fake)
                .collect();
            self.logits_backward(&saved, &dl, true)?;
        }
        let (lr, saved) = self.logits(
            &xr,
            &rows_shape(m),
            &at(m),
            &batch.real_cond.repeated(ns),
            train,
        )?;
        if let Some(saved) = saved {
            let dl: Vec<f32> = lr
                .iter()
                .map(|&l| -c.lambda_d * sigmoid(-l) / n_real)
                .collect();
            self.logits_backward(&saved, &dl, true)?;
        }
        let d_loss = lf.iter().map(|&l| softplus(l)).sum::<f32>() / n_fake
            + lr.iter().map(|&l| softplus(-l)).sum::<f32>() / n_real;
        let frac = |v: &[f32], pos: bool| {
            v.iter().filter(|&&x| (x > 0.0) == pos).count() as f32 / v.len().max(1) as f32
        };
        let by_sigma = states
            .iter()
            .enumerate()
            .map(|(j, &s)| {
                let (f, r) = (&lf[j * n..(j + 1) * n], &lr[j * m..(j + 1) * m]);
                (sig[s], frac(r, true), frac(f, false))
            })
            .collect();
        let lr_fake = self.lr(c.lr_fake);
        if train {
            Self::step_jointly(
                &dev,
                &mut [
                    (&mut self.opt_fake, &*self.fake, None),
                    (&mut self.opt_head, &self.head.params, None),
                ],
                lr_fake,
                c.grad_clip,
            )?;
        } else {
            // the fixed head takes no step (AdamW's decay would still move it)
            Self::step_jointly(
                &dev,
                &mut [(&mut self.opt_fake, &*self.fake, None)],
                lr_fake,
                c.grad_clip,
            )?;
        }
        metrics.fake_loss = fake_loss;
        metrics.d_loss = d_loss;
        metrics.d_acc_real = frac(&lr, true);
        metrics.d_acc_fake = frac(&lf, false);
        metrics.d_acc_by_sigma = by_sigma;
        Ok(())
    }

    fn generator_update(
        &mut self,
        roll: &DeviceRollout,
        batch: &IterBatch,
        sig: &[f32],
        shape: &[usize],
        rewards: Option<&[Vec<f32>]>,
        metrics: &mut IterMetrics,
    ) -> Result<()> {
        let c = self.config.clone();
        let dev = self.dev.clone();
        let k = sig.len() - 1;
        let n = shape[0];
        let per = shape[1..].iter().product::<usize>();
        self.generator.zero_grad()?;

        // x̂0 at a random step k*, kept for the backward
        let ks = self.rng.below(k as u64) as usize;
        let xk = Tensor::from_vec(dev.download(&roll.states[ks])?, shape);
        let cond = (&batch.cond.pooled, &batch.cond.context);
        let gx = generator_x0(&self.generator, &xk, sig[ks], cond, self.keep)?;

        // DMD: teacher (CFG) and fake denoise a re-noised x̂0
        let tau: Vec<f32> = (0..n)
            .map(|_| {
                let u = (0.02 + 0.96 * self.rng.uniform()) as f64;
                crate::flow::shift_sigma(u, c.shift) as f32
            })
            .collect();
        let noise = Tensor::randn(shape, &mut self.rng);
        let (g, dmd_norm) = dmd_seed(
            &self.teacher,
            &self.fake,
            &gx.x0,
            &DmdBatch {
                x: &xk,
                sigma: sig[ks],
                tau: &tau,
                noise: &noise,
                pooled: &batch.cond.pooled,
                context: &batch.cond.context,
                pooled_uncond: &batch.uncond.pooled,
                context_uncond: &batch.uncond.context,
                w_real: c.w_real,
                lambda: c.lambda_dmd,
            },
        )?;
        metrics.dmd_grad_norm = dmd_norm;

        // GAN: mean softplus(−D(x̃)), x̃ = (1−σ̃)·x̂0 + σ̃·noise, through the fake backbone and
        // the head (neither takes gradients here), added to the DMD seed at x̂0
        let st: Vec<f32> = (0..n)
            .map(|_| sig[self.rng.below(k as u64) as usize])
            .collect();
        let noise = Tensor::randn(shape, &mut self.rng);
        let (std, zd) = (dev.upload(&st)?, dev.upload(noise.f32s())?);
        let xt = dev.alloc::<f32>(n * per)?;
        flow_noise_into(&dev, &xt, None, &gx.x0, &zd, &std, (n, per))?;
        let (l, saved) = self.logits(&xt, shape, &st, &batch.cond, true)?;
        metrics.gan_loss = l.iter().map(|&v| softplus(-v)).sum::<f32>() / n as f32;
        let dl: Vec<f32> = l
            .iter()
            .map(|&v| -c.lambda_gan * sigmoid(-v) / n as f32)
            .collect();
        let dxt = self.logits_backward(saved.as_ref().expect("kept"), &dl, false)?;
        drop(saved);
        // g += (1−σ̃_i)·dx̃: the per-sample axpy of x0_from_velocity (x − c_i·v) with c_i = σ̃_i − 1
        let coef = dev.upload(&st.iter().map(|s| s - 1.0).collect::<Vec<_>>())?;
        let total = dev.alloc::<f32>(n * per)?;
        x0_from_velocity(&dev, &total, &g, &dxt, &coef, false, 1.0)?;
        generator_backward_from_x0(&self.generator, &gx, &total)?;
        drop(gx);

        if let Some(rewards) = rewards {
            self.rl_grads(roll, &batch.cond, sig, shape, rewards, metrics)?;
        }
        let lr_g = self.lr(c.lr_generator);
        Self::step_jointly(
            &dev,
            &mut [(
                &mut self.opt_generator,
                &*self.generator,
                Some((&self.ema, c.ema_decay)),
            )],
            lr_g,
            c.grad_clip,
        )?;
        Ok(())
    }

    /// The RL term: for every stochastic transition the generator's velocity is recomputed with
    /// grad, its log-probability of the rollout's next state taken on the device, and the PPO
    /// objective's gradient `λ_RL·∂L/∂ℓ·∂ℓ/∂v̂` seeded into the generator's backward. The clipped
    /// objective's gradient is per transition, so each backward runs right after its forward.
    fn rl_grads(
        &mut self,
        roll: &DeviceRollout,
        cond: &Cond,
        sig: &[f32],
        shape: &[usize],
        rewards: &[Vec<f32>],
        metrics: &mut IterMetrics,
    ) -> Result<()> {
        let c = self.config.clone();
        let dev = self.dev.clone();
        let n = shape[0];
        let per = shape[1..].iter().product::<usize>();
        let transitions = sig.len() - 2;
        let returns: Vec<Vec<f32>> = rewards.iter().map(|r| returns_to_go(r)).collect();
        metrics.mean_reward = rewards.iter().map(|r| r[r.len() - 1]).sum::<f32>() / n as f32;
        let share = 1.0 / transitions as f64;
        let mut loss = 0f64;
        for t in 0..transitions {
            let adv = group_advantages(
                &returns.iter().map(|r| r[t]).collect::<Vec<_>>(),
                c.group,
                c.adv_clip,
            );
            let inputs = Self::inputs_at(
                &self.generator,
                &roll.states[t],
                shape,
                &vec![sig[t]; n],
                cond,
            )?;
            let f = self.generator.forward(&inputs, self.keep)?;
            let v = cast_bf16_to_f32(&dev, &f.velocity)?;
            let (sd, snd) = (
                dev.upload(&vec![sig[t]; n])?,
                dev.upload(&vec![sig[t + 1]; n])?,
            );
            let tr = rho_step(
                &dev,
                &roll.states[t],
                &v,
                NextState::Given(&roll.states[t + 1]),
                &sd,
                &snd,
                c.rho,
                (n, per),
            )?;
            let logp = dev.download(&tr.log_prob)?;
            // ppo_loss over this transition's n entries is the mean over all of them scaled by
            // the transition's share
            let (l, dl) = ppo_loss(&logp, &roll.log_probs[t], &adv, c.clip_eps);
            loss += l * share;
            // dv_i = λ·dl_i·∂ℓ_i/∂v (velocity_grad_from_x0: −scale·c_i·g with c_i = dl_i, scale = −λ)
            let coef: Vec<f32> = dl.iter().map(|&d| (d * share) as f32).collect();
            let dv = dev.alloc::<bf16>(n * per)?;
            velocity_grad_from_x0(&dev, &dv, &tr.grad_v, &dev.upload(&coef)?, -c.lambda_rl)?;
            let saved = f.saved.as_ref().expect("a kept forward");
            self.generator.backward(&inputs, saved, &dv, true)?;
        }
        metrics.rl_loss = loss as f32;
        Ok(())
    }

    /// Bytes of the three optimizers' moments on the device.
    pub fn optimizer_bytes(&self) -> usize {
        self.opt_generator.state_bytes() + self.opt_fake.state_bytes() + self.opt_head.state_bytes()
    }

    /// The generator's EMA weights as named host tensors (its trainable tensors).
    pub fn ema_named(&self) -> KernelResult<Vec<(String, Tensor)>> {
        let full = self.dev.zeros::<f32>(self.generator.master.len())?;
        crate::kernels::shape::dev::accumulate_f32(
            &self.dev,
            &*full.view(0, self.ema.len())?,
            &self.ema,
        )?;
        let named = self.generator.download_named(&full)?;
        let slots = self.generator.slots();
        Ok(named
            .into_iter()
            .filter(|(name, _)| slots.get(name).is_some_and(|s| s.trainable))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joint_clip_matches_the_cpu_rule() {
        let (norm, f) = joint_clip(&[3.0, 4.0], 1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((f - 1.0 / (5.0 + 1e-6)).abs() < 1e-7);
        assert_eq!(joint_clip(&[0.3, 0.4], 1.0).1, 1.0);
        assert_eq!(joint_clip(&[3.0, 4.0], 0.0).1, 1.0);
    }

    #[test]
    fn softplus_is_stable_at_both_ends() {
        assert!((softplus(0.0) - std::f32::consts::LN_2).abs() < 1e-7);
        assert!((softplus(50.0) - 50.0).abs() < 1e-5);
        assert!(softplus(-50.0) > 0.0 && softplus(-50.0) < 1e-20);
    }
}

//! One AdvDMD iteration on the Shapes world (ALGORITHM.md §5.2): rollout with the ρ-SDE, rewards
//! from the discriminator, the fake-score + discriminator update, and every `r_dmd` iterations
//! the generator update with the DMD gradient seeded at x̂0, the GAN term through the frozen fake
//! backbone, and (after warm-up) the RL term seeded on the velocities through ∂ℓ/∂v̂.
//! `advdmd distill` (run loop, checkpoints, evaluation) is built on this.

use super::disc_head::{discriminator_logits, DiscHead};
use super::losses::{
    discriminator_loss, dmd_gradient, fake_score_loss, generator_gan_loss, group_advantages,
    ppo_loss, returns_to_go,
};
use super::rollout::{few_step_sigmas, rollout_sde, Rollout};
use super::shapes_model::ShapesModel;
use super::state::{rng_from_json, rng_to_json, save_state, StateFile};
use crate::autograd::{backward, no_grad, Var};
use crate::data::shapes::sample_batch;
use crate::device::host_memory::{product, Footprint};
use crate::error::Result;
use crate::flow::sde::{log_prob, log_prob_grad_v, rho_step};
use crate::flow::{cfg, shift_sigma};
use crate::kernels::shape::concat;
use crate::mmdit::{MmditConfig, MmditInputs};
use crate::nn::device::DeviceParams;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, Ema};
use crate::tensor::{Rng, Tensor};

/// Which generator states the discriminator is trained on (§4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscStates {
    /// Every state x_1..x_K of the trajectory at its own σ (the final one at σ = 0).
    Trajectory,
    /// The final samples only (DMD2's discriminator).
    Final,
}

#[derive(Clone, Debug)]
pub struct AdvDmdConfig {
    pub steps_per_sample: usize,
    pub shift: f64,
    pub rho: f32,
    /// Prompts per iteration (M) and samples per prompt (G).
    pub prompts: usize,
    pub group: usize,
    pub w_real: f32,
    pub lambda_dmd: f32,
    pub lambda_gan: f32,
    pub lambda_d: f32,
    pub lambda_rl: f32,
    pub r_dmd: u64,
    pub r_rl: u64,
    /// Generator steps before RL starts.
    pub rl_warmup: u64,
    pub rl: bool,
    pub disc_states: DiscStates,
    pub lr_generator: f32,
    pub lr_fake: f32,
    /// Both learning rates ramp linearly over the first `lr_warmup` iterations, then stay
    /// constant (ALGORITHM.md §5.2: constant LR after a short warm-up).
    pub lr_warmup: u64,
    pub grad_clip: f32,
    pub ema_decay: f32,
    pub clip_eps: f64,
    pub adv_clip: f32,
    pub reward_clip: f32,
    /// From this iteration on the discriminator is frozen: the head stops training and its
    /// features come from a snapshot of the fake score taken then (the fake score itself keeps
    /// training for the DMD gradient). The control for reward hacking (ALGORITHM.md).
    pub frozen_disc_after: Option<u64>,
    pub seed: u64,
}

impl Default for AdvDmdConfig {
    fn default() -> Self {
        AdvDmdConfig {
            steps_per_sample: 4,
            shift: 3.0,
            rho: (0.9f32 * std::f32::consts::FRAC_PI_2).sin(),
            prompts: 8,
            group: 4,
            w_real: 3.0,
            lambda_dmd: 1.0,
            lambda_gan: 5e-3,
            lambda_d: 1e-2,
            lambda_rl: 1.0,
            r_dmd: 5,
            r_rl: 1,
            rl_warmup: 500,
            rl: true,
            disc_states: DiscStates::Trajectory,
            lr_generator: 1e-4,
            lr_fake: 1e-4,
            lr_warmup: 50,
            grad_clip: 1.0,
            ema_decay: 0.99,
            clip_eps: 1e-4,
            adv_clip: 5.0,
            reward_clip: 10.0,
            frozen_disc_after: None,
            seed: 0,
        }
    }
}

/// What one iteration measured (0 for the parts that did not run this iteration).
#[derive(Clone, Debug, Default)]
pub struct IterMetrics {
    pub iteration: u64,
    pub fake_loss: f32,
    pub d_loss: f32,
    pub d_acc_real: f32,
    pub d_acc_fake: f32,
    /// Discriminator accuracy per noise level it saw: (σ, on real, on fake).
    pub d_acc_by_sigma: Vec<(f32, f32, f32)>,
    pub dmd_grad_norm: f32,
    pub gan_loss: f32,
    pub rl_loss: f32,
    pub mean_reward: f32,
    pub generator_step: bool,
    pub rl_step: bool,
}

pub struct AdvDmd {
    pub config: AdvDmdConfig,
    pub teacher: ShapesModel,
    pub generator: ShapesModel,
    pub fake: ShapesModel,
    pub head: DiscHead,
    /// The fake score's MMDiT as it was when the discriminator froze (see `frozen_disc_after`).
    pub frozen_backbone: Option<ShapesModel>,
    pub feature_block: usize,
    pub opt_generator: AdamW,
    pub opt_fake: AdamW,
    pub ema: Ema,
    pub rng: Rng,
    pub iteration: u64,
    pub generator_steps: u64,
}

impl AdvDmdConfig {
    /// The least host memory the CPU trainer adds to a loaded teacher of configuration
    /// `teacher`, `tokens` tokens a sample: the generator and the fake score (f32 weights,
    /// gradients, AdamW's two moments), the EMA, and the generator's activations over the
    /// iteration's prompts·group samples.
    /// With `emulated_moments` (`Some(bf16_moments)`: the iterations run on the emulator), the
    /// device run's state as well, whose buffers are host memory there.
    pub fn host_footprint(
        &self,
        teacher: &MmditConfig,
        tokens: usize,
        emulated_moments: Option<bool>,
    ) -> Footprint {
        let weights = (teacher.param_count() as u64).saturating_mul(4);
        let samples = product(&[self.prompts as u64, self.group as u64]);
        let emulated = emulated_moments.map_or(0, |bf16| self.device_state_bytes(teacher, bf16));
        Footprint::new()
            .with(
                "generator and fake score: f32 weights, gradients, AdamW moments",
                product(&[weights, 2, 4]),
            )
            .with("the EMA", weights)
            .with(
                "activations",
                teacher.activation_floor_bytes(samples, tokens as u64, true),
            )
            .with("the emulated device's state", emulated)
    }

    /// The bytes of a device run's state (`DeviceAdvDmd`; host memory on the emulator): the
    /// trained generator, the fake score sharing its gradients, the frozen teacher, the EMA and
    /// both models' AdamW moments (f32, or bf16 with `bf16_moments`).
    pub fn device_state_bytes(&self, teacher: &MmditConfig, bf16_moments: bool) -> u64 {
        let moments = if bf16_moments { 4 } else { 8 };
        let (f32_grads, f32_ema) = (4, 4);
        let per_param = DeviceParams::TRAINED_BYTES_PER_PARAM
            + (DeviceParams::TRAINED_BYTES_PER_PARAM - f32_grads)
            + DeviceParams::FROZEN_BYTES_PER_PARAM
            + f32_ema
            + 2 * moments;
        (teacher.param_count() as u64).saturating_mul(per_param)
    }

    /// An error naming the first setting out of its range (each named as its `distill` flag):
    /// checked before a run starts, so a bad flag never reaches a kernel.
    pub fn check(&self) -> Result<()> {
        let bad = |what: String| Err(crate::error::Error::Invalid(what));
        if self.prompts == 0 || self.group == 0 {
            return bad("--prompts and --group must be at least 1".into());
        }
        if !(1..=8).contains(&self.steps_per_sample) {
            return bad(format!(
                "--steps-per-sample must be 1 to 8, got {}",
                self.steps_per_sample
            ));
        }
        if self.r_dmd == 0 || self.r_rl == 0 {
            return bad("--r-dmd and --r-rl must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.rho) {
            return bad(format!("--rho must be in [0, 1], got {}", self.rho));
        }
        for (flag, lr) in [("--lr", self.lr_generator), ("--lr", self.lr_fake)] {
            if !(lr > 0.0 && lr.is_finite()) {
                return bad(format!("{flag} must be a positive number, got {lr}"));
            }
        }
        let weights = [
            ("--w-real", self.w_real),
            ("--lambda-dmd", self.lambda_dmd),
            ("--lambda-gan", self.lambda_gan),
            ("--lambda-d", self.lambda_d),
            ("--lambda-rl", self.lambda_rl),
        ];
        for (flag, w) in weights {
            if !(w >= 0.0 && w.is_finite()) {
                return bad(format!("{flag} must be a number ≥ 0, got {w}"));
            }
        }
        let (ema, shift) = (self.ema_decay, self.shift);
        if !((0.0..=1.0).contains(&ema) && shift > 0.0 && shift.is_finite()) {
            return bad(format!(
                "EMA decay {ema} not in [0, 1] or shift {shift} not positive"
            ));
        }
        let clips = [
            self.grad_clip,
            self.adv_clip,
            self.reward_clip,
            self.clip_eps as f32,
        ];
        if clips.iter().any(|c| !(*c > 0.0 && c.is_finite())) {
            return bad(format!("clips must be positive numbers, got {clips:?}"));
        }
        Ok(())
    }

    /// `(generator step, RL term)` of the iteration after `iteration` iterations and
    /// `generator_steps` generator updates: the generator updates every `r_dmd` iterations, and
    /// after the RL warm-up every `r_rl`-th of those carries the RL term, which needs a stochastic
    /// transition (K ≥ 2, ρ > 0).
    pub fn step_kind(&self, iteration: u64, generator_steps: u64) -> (bool, bool) {
        let generator = iteration % self.r_dmd.max(1) == 0;
        let rl_due =
            self.rl && generator_steps >= self.rl_warmup && generator_steps % self.r_rl.max(1) == 0;
        let rl = generator && rl_due && self.steps_per_sample >= 2 && self.rho > 0.0;
        (generator, rl)
    }

    /// The configuration without the late switches a fork may change (see [`AdvDmd::fork`]).
    pub fn core(&self) -> AdvDmdConfig {
        let d = AdvDmdConfig::default();
        AdvDmdConfig {
            rl: d.rl,
            rl_warmup: d.rl_warmup,
            r_rl: d.r_rl,
            lambda_rl: d.lambda_rl,
            clip_eps: d.clip_eps,
            adv_clip: d.adv_clip,
            reward_clip: d.reward_clip,
            frozen_disc_after: d.frozen_disc_after,
            ..self.clone()
        }
    }
}

fn per_sample_tensor(values: &[f32], shape: &[usize]) -> Tensor {
    let mut s = vec![1; shape.len()];
    s[0] = values.len();
    Tensor::from_vec(values.to_vec(), &s)
}

impl AdvDmd {
    /// Generator and fake score start as copies of the teacher's MMDiT; the head is fresh.
    pub fn new(teacher: ShapesModel, config: AdvDmdConfig) -> AdvDmd {
        let mut rng = Rng::new(config.seed);
        teacher.mmdit.params.set_trainable(false);
        teacher.text.params.set_trainable(false);
        let generator = teacher.copy_transformer();
        let fake = teacher.copy_transformer();
        let head = DiscHead::init(teacher.mmdit.config.hidden, &mut rng);
        let ema = Ema::new(&generator.mmdit.params, config.ema_decay);
        let adam = |lr| {
            AdamW::new(AdamWConfig {
                lr,
                ..Default::default()
            })
        };
        AdvDmd {
            feature_block: teacher.mmdit.config.depth / 2,
            opt_generator: adam(config.lr_generator),
            opt_fake: adam(config.lr_fake),
            teacher,
            generator,
            fake,
            head,
            frozen_backbone: None,
            ema,
            rng,
            iteration: 0,
            generator_steps: 0,
            config,
        }
    }

    pub fn sigmas(&self) -> Vec<f32> {
        few_step_sigmas(self.config.steps_per_sample, self.config.shift)
    }

    /// Whether the discriminator is frozen (head fixed, backbone snapshot in use).
    pub fn disc_frozen(&self) -> bool {
        self.frozen_backbone.is_some()
    }

    fn freeze_disc(&mut self) {
        let snap = self.fake.copy_transformer();
        snap.mmdit.params.set_trainable(false);
        self.frozen_backbone = Some(snap);
    }

    /// Discriminator logits `[B]` of images `x` at noise levels `sigma` (one per sample).
    fn logits(&self, x: &Var, sigma: &[f32], ids: &[u32]) -> Var {
        let backbone = self.frozen_backbone.as_ref().unwrap_or(&self.fake);
        let (context, pooled) = backbone.text.forward(ids);
        let t: Vec<f32> = sigma.iter().map(|&s| crate::flow::timestep_of(s)).collect();
        let inputs = MmditInputs {
            x,
            timestep: &t,
            pooled: &pooled,
            context: &context,
        };
        discriminator_logits(&backbone.mmdit, &self.head, &inputs, self.feature_block)
    }

    /// The learning rate at this iteration: the linear warm-up, then `peak` (the shared schedule
    /// with no decay).
    pub fn lr(&self, peak: f32) -> f32 {
        crate::optim::lr_at(self.iteration, peak, self.config.lr_warmup, 0, 1.0)
    }

    /// One iteration.
    pub fn step(&mut self) -> Result<IterMetrics> {
        let c = self.config.clone();
        if c.frozen_disc_after.is_some_and(|n| self.iteration >= n) && !self.disc_frozen() {
            self.freeze_disc();
        }
        let sig = self.sigmas();
        let (m, g) = (c.prompts, c.group);
        let n = m * g;
        let (real_prompts, real) = sample_batch(m, &mut self.rng);
        let prompts: Vec<String> = real_prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), g))
            .collect();
        let ids = self.generator.tokenizer.encode_batch(&prompts)?;
        let real_ids = self.generator.tokenizer.encode_batch(&real_prompts)?;
        let roll = rollout_sde(&self.generator, &ids, n, &sig, c.rho, &mut self.rng);
        let mut metrics = IterMetrics {
            iteration: self.iteration + 1,
            ..Default::default()
        };
        let (generator_step, rl_step) = c.step_kind(self.iteration, self.generator_steps);

        // Rewards with the discriminator as it is now, before it learns from this rollout.
        let rewards = if rl_step {
            Some(self.rewards(&roll, &ids, &sig))
        } else {
            None
        };

        self.guidance_update(&roll, &ids, &real, &real_ids, &sig, &mut metrics);
        if generator_step {
            self.generator_update(&roll, &ids, &sig, rewards.as_deref(), &mut metrics)?;
            self.generator_steps += 1;
        }
        metrics.generator_step = generator_step;
        metrics.rl_step = rl_step;
        self.iteration += 1;
        Ok(metrics)
    }

    /// `r_{i,k} = clip(D(x_k, σ_k))` for k = 1..K, sample-major `[n][K]`.
    fn rewards(&self, roll: &Rollout, ids: &[u32], sig: &[f32]) -> Vec<Vec<f32>> {
        let _ng = no_grad();
        let n = roll.states[0].shape()[0];
        let k = sig.len() - 1;
        let mut r = vec![vec![0f32; k]; n];
        for step in 1..=k {
            let l = self.logits(
                &Var::constant(roll.states[step].clone()),
                &vec![sig[step]; n],
                ids,
            );
            for (i, v) in l.value().f32s().iter().enumerate() {
                r[i][step - 1] = v.clamp(-self.config.reward_clip, self.config.reward_clip);
            }
        }
        r
    }

    fn guidance_update(
        &mut self,
        roll: &Rollout,
        ids: &[u32],
        real: &Tensor,
        real_ids: &[u32],
        sig: &[f32],
        metrics: &mut IterMetrics,
    ) {
        let c = &self.config;
        let k = sig.len() - 1;
        let (n, m) = (roll.states[0].shape()[0], real.shape()[0]);
        let frozen = self.disc_frozen();
        self.fake.mmdit.params.set_trainable(true);
        self.head.params.set_trainable(!frozen);
        self.fake.mmdit.params.zero_grad();
        self.head.params.zero_grad();
        let pick = self.rng.below(k as u64) as usize;
        let fake_loss = fake_score_loss(&self.fake, &roll.x0[pick], ids, &mut self.rng);
        let states: Vec<usize> = match c.disc_states {
            DiscStates::Trajectory => (1..=k).collect(),
            DiscStates::Final => vec![k],
        };
        let (mut fake_logits, mut real_logits) = (Vec::new(), Vec::new());
        for &s in &states {
            fake_logits.push(self.logits(
                &Var::constant(roll.states[s].clone()),
                &vec![sig[s]; n],
                ids,
            ));
            let noise = Tensor::randn(real.shape(), &mut self.rng);
            let y: Vec<f32> = real
                .f32s()
                .iter()
                .zip(noise.f32s())
                .map(|(y, z)| (1.0 - sig[s]) * y + sig[s] * z)
                .collect();
            real_logits.push(self.logits(
                &Var::constant(Tensor::from_vec(y, real.shape())),
                &vec![sig[s]; m],
                real_ids,
            ));
        }
        let lf = crate::ops::concat(&fake_logits.iter().collect::<Vec<_>>(), 0);
        let lr = crate::ops::concat(&real_logits.iter().collect::<Vec<_>>(), 0);
        let d_loss = discriminator_loss(&lf, &lr);
        // A frozen discriminator is still evaluated (its accuracy is the reward model's).
        if frozen {
            fake_loss.backward();
        } else {
            fake_loss.add(&d_loss.scale(c.lambda_d)).backward();
        }
        clip_grad_norm(&[&self.fake.mmdit.params, &self.head.params], c.grad_clip);
        self.opt_fake.step(
            &[&self.fake.mmdit.params, &self.head.params],
            self.lr(c.lr_fake),
        );
        let frac = |v: &[f32], pos: bool| {
            v.iter().filter(|&&x| (x > 0.0) == pos).count() as f32 / v.len().max(1) as f32
        };
        metrics.fake_loss = fake_loss.value().item();
        metrics.d_loss = d_loss.value().item();
        metrics.d_acc_real = frac(lr.value().f32s(), true);
        metrics.d_acc_fake = frac(lf.value().f32s(), false);
        metrics.d_acc_by_sigma = states
            .iter()
            .zip(real_logits.iter().zip(&fake_logits))
            .map(|(&s, (r, f))| {
                (
                    sig[s],
                    frac(r.value().f32s(), true),
                    frac(f.value().f32s(), false),
                )
            })
            .collect();
    }

    fn generator_update(
        &mut self,
        roll: &Rollout,
        ids: &[u32],
        sig: &[f32],
        rewards: Option<&[Vec<f32>]>,
        metrics: &mut IterMetrics,
    ) -> Result<()> {
        let c = self.config.clone();
        let k = sig.len() - 1;
        let n = roll.states[0].shape()[0];
        let shape = roll.states[0].shape().to_vec();
        let per = roll.states[0].numel() / n;
        self.fake.mmdit.params.set_trainable(false);
        self.head.params.set_trainable(false);
        self.generator.mmdit.params.zero_grad();

        // x̂0 at a random step k*, with grad.
        let ks = self.rng.below(k as u64) as usize;
        let xk = Var::constant(roll.states[ks].clone());
        let v = self.generator.velocity(&xk, &vec![sig[ks]; n], ids);
        let x0 = xk.sub(&v.scale(sig[ks]));

        // DMD: teacher (CFG) and fake denoise of a re-noised x̂0.
        let seed_dmd = {
            let _ng = no_grad();
            let tau: Vec<f32> = (0..n)
                .map(|_| shift_sigma((0.02 + 0.96 * self.rng.uniform()) as f64, c.shift) as f32)
                .collect();
            let noise = Tensor::randn(&shape, &mut self.rng);
            let xv = x0.value().f32s();
            let xt: Vec<f32> = (0..xv.len())
                .map(|i| (1.0 - tau[i / per]) * xv[i] + tau[i / per] * noise.f32s()[i])
                .collect();
            let xt_t = Tensor::from_vec(xt.clone(), &shape);
            let empty = self.teacher.tokenizer.encode("")?;
            let mut both_ids = ids.to_vec();
            for _ in 0..n {
                both_ids.extend_from_slice(&empty);
            }
            let both_tau: Vec<f32> = tau.iter().chain(&tau).copied().collect();
            let vt = self.teacher.velocity(
                &Var::constant(concat(&[&xt_t, &xt_t], 0)),
                &both_tau,
                &both_ids,
            );
            let (vc, vu) = vt.value().f32s().split_at(n * per);
            let vw = cfg(vc, vu, c.w_real);
            let vf = self.fake.velocity(&Var::constant(xt_t), &tau, ids);
            let mut seed = vec![0f32; n * per];
            let mut norm = 0f64;
            for (i, &ti) in tau.iter().enumerate() {
                let r = i * per..(i + 1) * per;
                let x0_real: Vec<f32> = r.clone().map(|j| xt[j] - ti * vw[j]).collect();
                let x0_fake: Vec<f32> = r
                    .clone()
                    .map(|j| xt[j] - ti * vf.value().f32s()[j])
                    .collect();
                let gi = dmd_gradient(&xv[r.clone()], &x0_real, &x0_fake);
                for (d, gv) in seed[r].iter_mut().zip(&gi) {
                    norm += (*gv as f64).powi(2);
                    *d = c.lambda_dmd * gv / (n * per) as f32;
                }
            }
            metrics.dmd_grad_norm = (norm / n as f64).sqrt() as f32;
            Tensor::from_vec(seed, &shape)
        };

        // GAN: mean softplus(−D(x̃)), x̃ = (1−σ̃)·x̂0 + σ̃·n through the frozen fake backbone.
        let st: Vec<f32> = (0..n)
            .map(|_| sig[self.rng.below(k as u64) as usize])
            .collect();
        let noise = Tensor::randn(&shape, &mut self.rng);
        let scaled_noise: Vec<f32> = noise
            .f32s()
            .iter()
            .enumerate()
            .map(|(j, z)| st[j / per] * z)
            .collect();
        let keep = Var::constant(per_sample_tensor(
            &st.iter().map(|s| 1.0 - s).collect::<Vec<_>>(),
            &shape,
        ));
        let xt = x0
            .mul(&keep)
            .add(&Var::constant(Tensor::from_vec(scaled_noise, &shape)));
        let gan = generator_gan_loss(&self.logits(&xt, &st, ids));
        metrics.gan_loss = gan.value().item();

        let mut seeds: Vec<(Var, Tensor)> =
            vec![(x0, seed_dmd), (gan, Tensor::scalar(c.lambda_gan))];
        if let Some(rewards) = rewards {
            seeds.extend(self.rl_seeds(roll, ids, sig, rewards, metrics));
        }
        let pairs: Vec<(&Var, Tensor)> = seeds.iter().map(|(v, t)| (v, t.clone())).collect();
        backward(&pairs);
        clip_grad_norm(&[&self.generator.mmdit.params], c.grad_clip);
        self.opt_generator
            .step(&[&self.generator.mmdit.params], self.lr(c.lr_generator));
        self.ema.update(&self.generator.mmdit.params);
        Ok(())
    }

    /// The RL term's seeds on the recomputed velocities of every stochastic transition:
    /// `λ_RL·∂L/∂ℓ_{i,k}·∂ℓ_{i,k}/∂v̂`.
    fn rl_seeds(
        &mut self,
        roll: &Rollout,
        ids: &[u32],
        sig: &[f32],
        rewards: &[Vec<f32>],
        metrics: &mut IterMetrics,
    ) -> Vec<(Var, Tensor)> {
        let c = self.config.clone();
        let n = roll.states[0].shape()[0];
        let per = roll.states[0].numel() / n;
        let transitions = sig.len() - 2;
        let returns: Vec<Vec<f32>> = rewards.iter().map(|r| returns_to_go(r)).collect();
        metrics.mean_reward = rewards.iter().map(|r| r[r.len() - 1]).sum::<f32>() / n as f32;
        // Advantages per transition, normalised within each prompt's group.
        let adv: Vec<Vec<f32>> = (0..transitions)
            .map(|t| {
                group_advantages(
                    &returns.iter().map(|r| r[t]).collect::<Vec<_>>(),
                    c.group,
                    c.adv_clip,
                )
            })
            .collect();
        let mut vs = Vec::new();
        let (mut logp, mut logp_old, mut a_flat, mut grads_v) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for t in 0..transitions {
            let x = Var::constant(roll.states[t].clone());
            let v = self.generator.velocity(&x, &vec![sig[t]; n], ids);
            let zeros = vec![0f32; per];
            for (i, &a) in adv[t].iter().enumerate() {
                let r = i * per..(i + 1) * per;
                let tr = rho_step(
                    &roll.states[t].f32s()[r.clone()],
                    &v.value().f32s()[r.clone()],
                    sig[t],
                    sig[t + 1],
                    c.rho,
                    &zeros,
                );
                let next = &roll.states[t + 1].f32s()[r];
                logp.push(log_prob(next, &tr.mean, tr.std));
                logp_old.push(roll.log_probs[t][i]);
                a_flat.push(a);
                grads_v.push(log_prob_grad_v(
                    next,
                    &tr.mean,
                    tr.std,
                    sig[t],
                    sig[t + 1],
                    c.rho,
                ));
            }
            vs.push(v);
        }
        let (loss, dl) = ppo_loss(&logp, &logp_old, &a_flat, c.clip_eps);
        metrics.rl_loss = loss as f32;
        vs.into_iter()
            .enumerate()
            .map(|(t, v)| {
                let mut seed = Vec::with_capacity(n * per);
                for i in 0..n {
                    let j = t * n + i;
                    seed.extend(
                        grads_v[j]
                            .iter()
                            .map(|gv| c.lambda_rl * (dl[j] as f32) * gv),
                    );
                }
                let shape = v.shape().to_vec();
                (v, Tensor::from_vec(seed, &shape))
            })
            .collect()
    }
}

/// The metadata record of a distillation checkpoint (the CPU trainer's and the device's alike).
pub(crate) fn checkpoint_meta(
    config: &AdvDmdConfig,
    iteration: u64,
    generator_steps: u64,
    rng: &Rng,
    disc_frozen: bool,
) -> serde_json::Value {
    serde_json::json!({
        "kind": "advdmd",
        "iteration": iteration,
        "generator_steps": generator_steps,
        "rng": rng_to_json(rng),
        "config": format!("{config:?}"),
        "config_core": format!("{:?}", config.core()),
        "rl": config.rl,
        "rl_warmup": config.rl_warmup,
        "disc_frozen": disc_frozen,
    })
}

/// Whether the checkpoint `f` may continue under `config`: as a resumed run (`fork` false: the
/// same configuration), or as a fork ([`AdvDmd::fork`]: the late switches may differ, and only
/// where none of them has acted yet in either run).
pub(crate) fn check_checkpoint(f: &StateFile, config: &AdvDmdConfig, fork: bool) -> Result<()> {
    let path = f.path();
    let bad = |why: String| {
        let what = if fork {
            format!("cannot fork from {}", path.display())
        } else {
            path.display().to_string()
        };
        crate::error::Error::Invalid(format!("{what}: {why}"))
    };
    let meta = f.meta();
    if meta["kind"] != "advdmd" {
        return Err(bad("not a distillation checkpoint".into()));
    }
    if !fork {
        let now = format!("{config:?}");
        if meta["config"].as_str() != Some(now.as_str()) {
            return Err(bad(format!(
                "was written with another configuration: {} (now {now})",
                meta["config"]
            )));
        }
        return Ok(());
    }
    let core = format!("{:?}", config.core());
    if meta["config_core"].as_str() != Some(core.as_str()) {
        return Err(bad(format!(
            "it differs in more than the late switches (RL, frozen discriminator): {} (now {config:?})",
            meta["config"]
        )));
    }
    let (iteration, gen_steps) = checkpoint_counters(f)?;
    // RL ran in a prefix iff some generator step had generator_steps >= rl_warmup.
    let rl_ran = |rl: bool, warmup: u64| rl && gen_steps > warmup;
    let old_rl = meta["rl"].as_bool().unwrap_or(true);
    let old_warmup = meta["rl_warmup"].as_u64().unwrap_or(0);
    if rl_ran(old_rl, old_warmup) || rl_ran(config.rl, config.rl_warmup) {
        return Err(bad(format!(
            "RL has started by generator step {gen_steps} (warm-up {old_warmup} there, {} here)",
            config.rl_warmup
        )));
    }
    if meta["disc_frozen"].as_bool() != Some(false)
        || config.frozen_disc_after.is_some_and(|n| n < iteration)
    {
        return Err(bad(format!(
            "the discriminator froze before iteration {iteration} in one of the two runs"
        )));
    }
    Ok(())
}

/// A checkpoint's `(iteration, generator_steps)`.
pub(crate) fn checkpoint_counters(f: &StateFile) -> Result<(u64, u64)> {
    let bad =
        |what: &str| crate::error::Error::Invalid(format!("{}: bad `{what}`", f.path().display()));
    let meta = f.meta();
    let iteration = meta["iteration"].as_u64().ok_or_else(|| bad("iteration"))?;
    let gen_steps = meta["generator_steps"]
        .as_u64()
        .ok_or_else(|| bad("generator_steps"))?;
    Ok((iteration, gen_steps))
}

/// A checkpoint's RNG state.
pub(crate) fn checkpoint_rng(f: &StateFile) -> Result<Rng> {
    rng_from_json(&f.meta()["rng"]).ok_or_else(|| {
        crate::error::Error::Invalid(format!("{}: bad `rng` state", f.path().display()))
    })
}

impl AdvDmd {
    /// Everything a resumed run needs except the teacher (reloaded from its folder): generator,
    /// fake score, head, EMA, both optimizers, RNG and counters, written atomically.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let meta = checkpoint_meta(
            &self.config,
            self.iteration,
            self.generator_steps,
            &self.rng,
            self.disc_frozen(),
        );
        let mut groups = vec![
            ("generator.", &self.generator.mmdit.params),
            ("fake.", &self.fake.mmdit.params),
            ("head.", &self.head.params),
            ("ema.", &self.ema.shadow),
        ];
        if let Some(b) = &self.frozen_backbone {
            groups.push(("frozen_fake.", &b.mmdit.params));
        }
        save_state(
            path,
            &groups,
            &[
                ("adam_g.", &self.opt_generator),
                ("adam_f.", &self.opt_fake),
            ],
            meta,
        )
    }

    /// Restores a run saved by [`AdvDmd::save`] (same teacher, same configuration).
    pub fn load(
        path: &std::path::Path,
        teacher: ShapesModel,
        config: AdvDmdConfig,
    ) -> Result<AdvDmd> {
        let f = StateFile::open(path)?;
        check_checkpoint(&f, &config, false)?;
        Self::restore(&f, teacher, config)
    }

    /// Starts a new run from another run's checkpoint with a configuration that may differ in the
    /// switches that act late (RL on/off and its warm-up, cadence, weight and clips; the iteration
    /// the discriminator freezes at) — but only where none of them has acted yet in either run, so
    /// the fork continues exactly as a run started with `config` from scratch would have (the
    /// shared-prefix ablations of the results table: DMD2 vs AdvDMD vs frozen discriminator).
    pub fn fork(
        path: &std::path::Path,
        teacher: ShapesModel,
        config: AdvDmdConfig,
    ) -> Result<AdvDmd> {
        let f = StateFile::open(path)?;
        check_checkpoint(&f, &config, true)?;
        Self::restore(&f, teacher, config)
    }

    fn restore(f: &StateFile, teacher: ShapesModel, config: AdvDmdConfig) -> Result<AdvDmd> {
        let mut run = AdvDmd::new(teacher, config);
        f.load_group("generator.", &run.generator.mmdit.params)?;
        f.load_group("fake.", &run.fake.mmdit.params)?;
        f.load_group("head.", &run.head.params)?;
        f.load_group("ema.", &run.ema.shadow)?;
        let generator = [&run.generator.mmdit.params];
        f.load_optimizer("adam_g.", &mut run.opt_generator, &generator)?;
        let critic = [&run.fake.mmdit.params, &run.head.params];
        f.load_optimizer("adam_f.", &mut run.opt_fake, &critic)?;
        if f.meta()["disc_frozen"].as_bool() == Some(true) {
            run.freeze_disc();
            let b = run.frozen_backbone.as_ref().expect("just frozen");
            f.load_group("frozen_fake.", &b.mmdit.params)?;
        }
        (run.iteration, run.generator_steps) = checkpoint_counters(f)?;
        run.rng = checkpoint_rng(f)?;
        Ok(run)
    }
}

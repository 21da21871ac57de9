//! One AdvDMD iteration on a kernel device (ALGORITHM.md §5.2): the CPU trainer's
//! [`super::advdmd::AdvDmd::step`] step for step — the same host random draws in the same order,
//! the same losses and cadence — with every model call on the device (the bf16 MMDiTs, the
//! discriminator head, the ρ-SDE, the DMD seed, the fused AdamW with EMA) and so is the
//! arithmetic between them (logit gradients, advantages, the PPO gradient, the joint clip).
//!
//! An iteration is three phases: the host draws its random numbers and stages them, with the
//! conditioning and every model call's timestep features, into buffers kept across iterations
//! (`StepBuffers`); the device does the whole iteration from them without a host copy
//! (`DeviceAdvDmd::device_work`) — directly, or replayed from a CUDA graph recorded per kind of
//! iteration ([`DeviceRunOptions::graph`]); the host reads the metrics back at the end.
//!
//! Conditioning comes in per iteration as host tensors ([`IterBatch`]): the Shapes world builds
//! it from prompts with the teacher's frozen text encoder ([`shapes_batch`]); the SD3 benchmarks
//! from random context and pooled vectors. Generator and fake score share one gradient buffer
//! (their backward passes never overlap). A Shapes run saves through the CPU trainer's checkpoint
//! ([`DeviceAdvDmd::sync_to_host`] + `AdvDmd::save`) and resumes exactly from one
//! (`AdvDmd::load` + [`DeviceAdvDmd::from_host`]); a checkpoint teacher's run, which has no CPU
//! trainer, writes and reads the same format itself, a tensor at a time
//! ([`DeviceAdvDmd::save`], [`DeviceAdvDmd::resume`]); precomputed data makes its batches
//! ([`latents_batch`]). A frozen discriminator (`frozen_disc_after`)
//! is a bf16 snapshot of the fake score's backbone with the head held fixed, as on the CPU.

use half::bf16;

use super::advdmd::{
    check_checkpoint, checkpoint_counters, checkpoint_meta, checkpoint_rng, AdvDmd, AdvDmdConfig,
    DiscStates, IterMetrics,
};
use super::checkpoint_sample::sample_checkpoint_latents_device;
use super::device::{
    dmd_rms, dmd_seed_dev, flow_matching_grads_dev, generator_backward_from_x0, generator_x0,
    rollout_schedule, rollout_sde_dev, stochastic_step, DeviceDiscHead, DmdInputs, HeadSaved,
    RolloutInputs, StackedRollout,
};
use super::disc_head::DiscHead;
use super::rollout::few_step_sigmas;
use super::shapes_model::ShapesModel;
use super::state::{state_record, StateFile};
use crate::checkpoint::{check_finite, write_safetensors, PendingTensor};
use crate::data::latents::{EpochOrder, LatentData};
use crate::device::kernel::{DevBuf, DeviceGraph, KernelDevice, KernelError, KernelResult, Later};
use crate::error::{Error, Result};
use crate::kernels::elementwise::dev::{cast_bf16_to_f32, cast_f32_to_bf16_into, copy};
use crate::kernels::elementwise::sigmoid;
use crate::kernels::optim::dev::joint_grad_norm_clip;
use crate::kernels::rl::dev::{advantages, logit_grads, ppo_grad};
use crate::kernels::sde::dev::{
    flow_noise_into, mse_from_parts, mse_parts, rho_step, velocity_grad_from_x0, x0_from_velocity,
    NextState,
};
use crate::kernels::shape::dev::select_block_f32;
use crate::mmdit::device::{DeviceInputs, DeviceMmdit, Keep, Saved};
use crate::mmdit::MmditConfig;
use crate::nn::device::{DeviceParams, Slot};
use crate::nn::ParamSource;
use crate::optim::device::{DeviceAdamW, FlatParams};
use crate::optim::{AdamW, AdamWConfig};
use crate::tensor::StoredDType;
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

/// A batch of precomputed data: the `prompts` samples at positions `first ..` of the run's
/// `order`, their latents the real side, their captions' embeddings the conditioning (each
/// repeated `group` times for the generated side), and the folder's empty prompt the
/// unconditional one.
pub fn latents_batch(
    data: &LatentData,
    order: &mut EpochOrder,
    first: u64,
    prompts: usize,
    group: usize,
) -> Result<IterBatch> {
    let picks: Vec<usize> = (0..prompts as u64).map(|j| order.at(first + j)).collect();
    let rows = data.rows(&picks)?;
    let repeat_rows = |t: &Tensor| {
        let per = t.numel() / prompts;
        let values: Vec<f32> = t
            .f32s()
            .chunks(per)
            .flat_map(|row| row.repeat(group))
            .collect();
        let mut shape = t.shape().to_vec();
        shape[0] = prompts * group;
        Tensor::from_vec(values, &shape)
    };
    let (context, pooled) = data.uncond(prompts * group);
    Ok(IterBatch {
        cond: Cond {
            context: repeat_rows(&rows.context),
            pooled: repeat_rows(&rows.pooled),
        },
        uncond: Cond { context, pooled },
        real_cond: Cond {
            context: rows.context,
            pooled: rows.pooled,
        },
        real: rows.latents,
    })
}

/// Where one tensor of a checkpoint written from the device lives: an f32 or a bf16 flat buffer
/// at an offset, or an optimizer's first or second moment (`true`) at an offset.
enum StateSource<'a> {
    F32(&'a DevBuf<f32>, usize),
    Bf16(&'a DevBuf<bf16>, usize),
    Moment(&'a DeviceAdamW, bool, usize),
}

impl StateSource<'_> {
    /// Its `len` values, as f32.
    fn read(&self, dev: &KernelDevice, len: usize) -> KernelResult<Vec<f32>> {
        match *self {
            StateSource::F32(b, offset) => dev.download(&*b.view(offset, len)?),
            StateSource::Bf16(b, offset) => Ok(dev
                .download(&*b.view(offset, len)?)?
                .iter()
                .map(|x| x.to_f32())
                .collect()),
            StateSource::Moment(opt, second, offset) => {
                opt.download_moment_range(dev, second, offset, len)
            }
        }
    }
}

/// One parameter set of a joint optimizer step: its optimizer, its buffers and (the generator)
/// its EMA `(shadow, decay)`.
type StepPart<'a> = (
    &'a DeviceAdamW,
    &'a DeviceParams,
    Option<(&'a DevBuf<f32>, f32)>,
);

/// A discriminator call kept for its backward (its inputs live in the step's buffers).
struct LogitsSaved {
    saved: Saved,
    head: HeadSaved,
}

/// An iteration queued by [`DeviceAdvDmd::step_queued`]: its kind and the queued downloads its
/// metrics are made of.
pub struct QueuedIteration {
    kind: StepKind,
    iteration: u64,
    /// Elements of one batch of states, generated and real samples.
    len: usize,
    n: usize,
    m: usize,
    fake_logits: Later<f32>,
    real_logits: Later<f32>,
    fm_parts: Later<f32>,
    /// `dmd_norm`, `gan_logits` of a generator update.
    generator: Option<(Later<f32>, Later<f32>)>,
    /// `reward_logits`, `rl_loss` of an RL update.
    rl: Option<(Later<f32>, Later<f64>)>,
}

impl QueuedIteration {
    /// The iteration's number (1 for a run's first), as its metrics will say.
    pub fn iteration(&self) -> u64 {
        self.iteration
    }
}

/// Which work an iteration does: the generator update, the RL term, the discriminator's
/// training. Each kind is one CUDA graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct StepKind {
    generator: bool,
    rl: bool,
    train_disc: bool,
}

/// A kind's graph, recorded the second time the kind runs (the first loads the kernel modules
/// and GEMM plans, which a capture may not do).
#[derive(Default)]
struct KindGraph {
    runs: usize,
    graph: Option<DeviceGraph>,
    /// Matmul FLOPs of one run, counted at the capture: the model's and the recomputed.
    flops: (u64, u64),
}

/// How a device run holds its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRunOptions {
    /// What the differentiated forwards keep ([`Keep::BlockInputs`]: activation checkpointing).
    pub keep: Keep,
    /// Adam's moments in bf16 with stochastic rounding (4 instead of 8 bytes a trained
    /// parameter: docs/memory-plan.md item 3).
    pub bf16_moments: bool,
    /// Replay each kind of iteration from a CUDA graph (recorded the second time the kind runs):
    /// no host launch gaps. The step's buffers persist between iterations either way.
    pub graph: bool,
}

impl Default for DeviceRunOptions {
    fn default() -> Self {
        DeviceRunOptions {
            keep: Keep::All,
            bf16_moments: false,
            graph: false,
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
    /// Graphs first: they read the step's buffers, so they go before them.
    graphs: std::collections::HashMap<StepKind, KindGraph>,
    buffers: Option<StepBuffers>,
    use_graphs: bool,
    replays: u64,
    predrawn: Option<Predrawn>,
    /// What a checkpoint teacher's run started from (the teacher's configuration, the data's
    /// description), saved in its checkpoints under `run` and read back by [`Self::resume`], so
    /// a resume on another teacher or data is caught.
    pub run_record: Option<serde_json::Value>,
    /// Host milliseconds the last [`Self::step`] spent before queuing its device work (checks,
    /// draws, conversions, uploads): with the previous iteration's metrics read back, the device
    /// idles through it.
    pub last_host_lead_ms: f64,
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

fn softplus(x: f32) -> f32 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// The rollout states the discriminator sees (ALGORITHM.md §4.3).
fn disc_states(c: &AdvDmdConfig) -> Vec<usize> {
    let k = c.steps_per_sample;
    match c.disc_states {
        DiscStates::Trajectory => (1..=k).collect(),
        DiscStates::Final => vec![k],
    }
}

/// The generator update's draws.
struct GeneratorDraws {
    ks: usize,
    tau: Vec<f32>,
    dmd_noise: Vec<f32>,
    gan_sigma: Vec<f32>,
    gan_noise: Vec<f32>,
}

/// One iteration's random draws (host, in the CPU trainer's order).
struct Draws {
    noise: Vec<f32>,
    z: Vec<f32>,
    pick: usize,
    fm_sigma: Vec<f32>,
    fm_noise: Vec<f32>,
    real_noise: Vec<f32>,
    gen: Option<GeneratorDraws>,
}

/// What an iteration's draws depend on besides the generator state.
#[derive(PartialEq)]
struct DrawKey {
    shape: [usize; 4],
    sigmas: Vec<f32>,
    rho: f32,
    shift: f64,
    prompts: usize,
    states: Vec<usize>,
}

impl DrawKey {
    fn new(c: &AdvDmdConfig, shape: &[usize; 4]) -> DrawKey {
        DrawKey {
            shape: *shape,
            sigmas: few_step_sigmas(c.steps_per_sample, c.shift),
            rho: c.rho,
            shift: c.shift,
            prompts: c.prompts,
            states: disc_states(c),
        }
    }
}

/// The next iteration's draws, made while the device ran this one: `common` from `from` leaves
/// the generator at `mid`; the generator update's `gen` after them leaves it at `after`.
struct Predrawn {
    from: Rng,
    key: DrawKey,
    common: Draws,
    mid: Rng,
    gen: GeneratorDraws,
    after: Rng,
}

/// The draws every iteration makes (the generator update's are [`draw_generator`]'s).
fn draw_common(c: &AdvDmdConfig, sig: &[f32], rng: &mut Rng, shape: &[usize; 4]) -> Draws {
    let k = c.steps_per_sample;
    let n = shape[0];
    let per: usize = shape[1..].iter().product();
    // the rollout's noise, drawn as train::rollout::rollout_sde draws it
    let noise = Tensor::randn(shape, rng).f32s().to_vec();
    let mut z = Vec::with_capacity(k * n * per);
    for s in 0..k {
        if stochastic_step(sig, c.rho, s) {
            z.extend_from_slice(Tensor::randn(shape, rng).f32s());
        } else {
            z.extend(std::iter::repeat_n(0f32, n * per));
        }
    }
    // the fake score's flow-matching loss on one of the rollout's x̂0
    let pick = rng.below(k as u64) as usize;
    let fm_sigma: Vec<f32> = (0..n).map(|_| sigmoid(rng.normal())).collect();
    let fm_noise = Tensor::randn(shape, rng).f32s().to_vec();
    // the real samples' noises, state by state
    let real_shape = [c.prompts, shape[1], shape[2], shape[3]];
    let real_noise: Vec<f32> = (0..disc_states(c).len())
        .flat_map(|_| Tensor::randn(&real_shape, rng).f32s().to_vec())
        .collect();
    Draws {
        noise,
        z,
        pick,
        fm_sigma,
        fm_noise,
        real_noise,
        gen: None,
    }
}

/// The generator update's draws, after [`draw_common`]'s.
fn draw_generator(
    c: &AdvDmdConfig,
    sig: &[f32],
    rng: &mut Rng,
    shape: &[usize; 4],
) -> GeneratorDraws {
    let k = c.steps_per_sample;
    let n = shape[0];
    let ks = rng.below(k as u64) as usize;
    let tau: Vec<f32> = (0..n)
        .map(|_| {
            let u = (0.02 + 0.96 * rng.uniform()) as f64;
            crate::flow::shift_sigma(u, c.shift) as f32
        })
        .collect();
    let dmd_noise = Tensor::randn(shape, rng).f32s().to_vec();
    let gan_sigma: Vec<f32> = (0..n).map(|_| sig[rng.below(k as u64) as usize]).collect();
    let gan_noise = Tensor::randn(shape, rng).f32s().to_vec();
    GeneratorDraws {
        ks,
        tau,
        dmd_noise,
        gan_sigma,
        gan_noise,
    }
}

/// What fixes the step buffers' sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StepKey {
    /// `[n, C, H, W]` of the generated batch.
    shape: [usize; 4],
    m: usize,
    context_len: usize,
}

/// Everything an iteration's device work reads that the host provides, and everything the host
/// reads back, in buffers kept across iterations: a replayed graph finds this iteration's draws
/// and conditioning where the recorded one found its own. Each model call has its own inputs
/// (timestep features and conditioning staged; the device writes the latents).
struct StepBuffers {
    key: StepKey,
    // drawn each iteration
    noise: DevBuf<f32>,
    z: DevBuf<f32>,
    /// `[pick, k*]`: the rollout x̂0 the fake score learns from, the state the generator denoises.
    picks: DevBuf<i32>,
    fm_sigma: DevBuf<f32>,
    fm_noise: DevBuf<f32>,
    real: DevBuf<f32>,
    real_noise: DevBuf<f32>,
    gx_sigma: DevBuf<f32>,
    tau: DevBuf<f32>,
    dmd_noise: DevBuf<f32>,
    gan_sigma: DevBuf<f32>,
    /// `σ̃ − 1` per sample.
    gan_coef: DevBuf<f32>,
    gan_noise: DevBuf<f32>,
    // fixed by the schedule
    roll_sigma: DevBuf<f32>,
    roll_sigma_next: DevBuf<f32>,
    roll_features: DevBuf<bf16>,
    real_sigma: DevBuf<f32>,
    /// The batch's conditioning (bf16), staged once and copied on the device into every call's
    /// inputs (`fill_conditioning`): the prompts', the empty prompt's, the real samples'.
    cond: DevCond,
    uncond: DevCond,
    real_cond: DevCond,
    // the model calls' inputs
    roll_in: DeviceInputs,
    reward_in: DeviceInputs,
    fm_in: DeviceInputs,
    dfake_in: DeviceInputs,
    dreal_in: DeviceInputs,
    gx_in: DeviceInputs,
    teacher_in: DeviceInputs,
    dmd_fake_in: DeviceInputs,
    gan_in: DeviceInputs,
    rl_in: Vec<DeviceInputs>,
    // read back
    reward_logits: DevBuf<f32>,
    adv: DevBuf<f32>,
    fake_logits: DevBuf<f32>,
    real_logits: DevBuf<f32>,
    gan_logits: DevBuf<f32>,
    fm_parts: DevBuf<f32>,
    dmd_norm: DevBuf<f32>,
    rl_loss: DevBuf<f64>,
    clip_fake: DevBuf<f32>,
    clip_generator: DevBuf<f32>,
}

/// Conditioning rows on the device: pooled `[rows, P]` and context `[rows, L, C]`, bf16.
struct DevCond {
    pooled: DevBuf<bf16>,
    context: DevBuf<bf16>,
}

impl DevCond {
    fn new(
        dev: &KernelDevice,
        rows: usize,
        pooled_dim: usize,
        context_len: usize,
        context_dim: usize,
    ) -> KernelResult<DevCond> {
        Ok(DevCond {
            pooled: dev.alloc(rows * pooled_dim)?,
            context: dev.alloc(rows * context_len * context_dim)?,
        })
    }

    fn stage(&self, dev: &KernelDevice, cond: &Cond) -> KernelResult<()> {
        let bf = |t: &Tensor| crate::device::kernel::bf16_of(t.f32s());
        dev.copy_to_device(&bf(&cond.pooled), &self.pooled)?;
        dev.copy_to_device(&bf(&cond.context), &self.context)
    }
}

/// Writes `parts` — each a block of conditioning rows, repeated — one after another into the
/// conditioning of `inputs` (device copies: a graph records them).
fn fill_conditioning(
    dev: &KernelDevice,
    inputs: &DeviceInputs,
    parts: &[(&DevCond, usize)],
) -> KernelResult<()> {
    let (mut p_at, mut c_at) = (0, 0);
    for &(src, times) in parts {
        let (pl, cl) = (src.pooled.len(), src.context.len());
        for _ in 0..times {
            copy(dev, &*inputs.pooled.view(p_at, pl)?, &src.pooled)?;
            copy(dev, &*inputs.context.view(c_at, cl)?, &src.context)?;
            p_at += pl;
            c_at += cl;
        }
    }
    if p_at != inputs.pooled.len() || c_at != inputs.context.len() {
        return Err(KernelError::Invalid(format!(
            "device AdvDMD: {p_at} / {c_at} conditioning values for inputs of {} / {}",
            inputs.pooled.len(),
            inputs.context.len()
        )));
    }
    Ok(())
}

impl StepBuffers {
    /// Copies the staged conditioning into the inputs of the calls `kind` makes.
    fn fill_conditioning(
        &self,
        dev: &KernelDevice,
        c: &AdvDmdConfig,
        kind: StepKind,
    ) -> KernelResult<()> {
        let ns = disc_states(c).len();
        let (cond, real) = (&self.cond, &self.real_cond);
        fill_conditioning(dev, &self.roll_in, &[(cond, 1)])?;
        fill_conditioning(dev, &self.fm_in, &[(cond, 1)])?;
        fill_conditioning(dev, &self.dfake_in, &[(cond, ns)])?;
        fill_conditioning(dev, &self.dreal_in, &[(real, ns)])?;
        if kind.rl {
            fill_conditioning(dev, &self.reward_in, &[(cond, c.steps_per_sample)])?;
            for inputs in &self.rl_in {
                fill_conditioning(dev, inputs, &[(cond, 1)])?;
            }
        }
        if kind.generator {
            fill_conditioning(dev, &self.gx_in, &[(cond, 1)])?;
            fill_conditioning(dev, &self.teacher_in, &[(cond, 1), (&self.uncond, 1)])?;
            fill_conditioning(dev, &self.dmd_fake_in, &[(cond, 1)])?;
            fill_conditioning(dev, &self.gan_in, &[(cond, 1)])?;
        }
        Ok(())
    }

    /// Elements of one batch of states (`n·C·H·W`).
    fn len(&self) -> usize {
        self.key.shape.iter().product()
    }

    fn new(run: &DeviceAdvDmd, key: StepKey) -> KernelResult<StepBuffers> {
        let c = &run.config;
        let dev = &run.dev;
        let [n, ch, h, w] = key.shape;
        let (m, k) = (key.m, c.steps_per_sample);
        let len = n * ch * h * w;
        let per = len / n;
        let ns = disc_states(c).len();
        let sig = run.sigmas();
        // placeholders: every call's timestep features are restaged before each iteration, its
        // conditioning copied on the device
        let inputs = |model: &DeviceMmdit, rows: usize| {
            let cfg = &model.config;
            model.inputs(
                &Tensor::zeros(&[rows, ch, h, w]),
                &vec![0.0; rows],
                &Tensor::zeros(&[rows, cfg.pooled_dim]),
                &Tensor::zeros(&[rows, key.context_len, cfg.context_dim]),
            )
        };
        let disc = run.disc_backbone();
        let (roll_sigma, roll_sigma_next, roll_features) =
            rollout_schedule(&sig, n, run.generator.config.freq_dim);
        let real_sigma: Vec<f32> = disc_states(c)
            .iter()
            .flat_map(|&s| std::iter::repeat_n(sig[s], m))
            .collect();
        let rl_count = if c.rl { k.saturating_sub(1) } else { 0 };
        let g = &run.generator.config;
        let dev_cond = |rows| DevCond::new(dev, rows, g.pooled_dim, key.context_len, g.context_dim);
        Ok(StepBuffers {
            key,
            cond: dev_cond(n)?,
            uncond: dev_cond(n)?,
            real_cond: dev_cond(m)?,
            noise: dev.alloc(len)?,
            z: dev.alloc(k * len)?,
            picks: dev.alloc(2)?,
            fm_sigma: dev.alloc(n)?,
            fm_noise: dev.alloc(len)?,
            real: dev.alloc(m * per)?,
            real_noise: dev.alloc(ns * m * per)?,
            gx_sigma: dev.alloc(n)?,
            tau: dev.alloc(n)?,
            dmd_noise: dev.alloc(len)?,
            gan_sigma: dev.alloc(n)?,
            gan_coef: dev.alloc(n)?,
            gan_noise: dev.alloc(len)?,
            roll_sigma: dev.upload(&roll_sigma)?,
            roll_sigma_next: dev.upload(&roll_sigma_next)?,
            roll_features: dev.upload(&roll_features)?,
            real_sigma: dev.upload(&real_sigma)?,
            roll_in: inputs(&run.generator, n)?,
            reward_in: inputs(disc, if c.rl { n * k } else { 1 })?,
            fm_in: inputs(&run.fake, n)?,
            dfake_in: inputs(disc, n * ns)?,
            dreal_in: inputs(disc, m * ns)?,
            gx_in: inputs(&run.generator, n)?,
            teacher_in: inputs(&run.teacher, 2 * n)?,
            dmd_fake_in: inputs(&run.fake, n)?,
            gan_in: inputs(disc, n)?,
            rl_in: (0..rl_count)
                .map(|_| inputs(&run.generator, n))
                .collect::<KernelResult<_>>()?,
            reward_logits: dev.zeros(n * k)?,
            adv: dev.zeros(n * k.saturating_sub(1).max(1))?,
            fake_logits: dev.zeros(n * ns)?,
            real_logits: dev.zeros(m * ns)?,
            gan_logits: dev.zeros(n)?,
            fm_parts: dev.zeros(mse_parts(len))?,
            dmd_norm: dev.zeros(2)?,
            rl_loss: dev.zeros(rl_count.max(1))?,
            clip_fake: dev.zeros(2)?,
            clip_generator: dev.zeros(2)?,
        })
    }

    /// Uploads this iteration's draws and conditioning (outside any graph).
    fn stage(&self, run: &DeviceAdvDmd, batch: &IterBatch, d: &Draws) -> KernelResult<()> {
        let c = &run.config;
        let dev = &run.dev;
        let sig = run.sigmas();
        let (n, k) = (self.key.shape[0], c.steps_per_sample);
        let t_of =
            |s: &[f32]| -> Vec<f32> { s.iter().map(|&v| crate::flow::timestep_of(v)).collect() };
        let rows_at = |s: f32, rows: usize| vec![crate::flow::timestep_of(s); rows];
        dev.copy_to_device(&d.noise, &self.noise)?;
        dev.copy_to_device(&d.z, &self.z)?;
        dev.copy_to_device(&d.fm_sigma, &self.fm_sigma)?;
        dev.copy_to_device(&d.fm_noise, &self.fm_noise)?;
        dev.copy_to_device(batch.real.f32s(), &self.real)?;
        dev.copy_to_device(&d.real_noise, &self.real_noise)?;
        self.cond.stage(dev, &batch.cond)?;
        self.uncond.stage(dev, &batch.uncond)?;
        self.real_cond.stage(dev, &batch.real_cond)?;
        run.generator
            .restage_timesteps(&self.roll_in, &rows_at(sig[0], n))?;
        run.fake
            .restage_timesteps(&self.fm_in, &t_of(&d.fm_sigma))?;
        let states = disc_states(c);
        let disc = run.disc_backbone();
        let at = |rows: usize| -> Vec<f32> {
            states.iter().flat_map(|&s| rows_at(sig[s], rows)).collect()
        };
        disc.restage_timesteps(&self.dfake_in, &at(n))?;
        disc.restage_timesteps(&self.dreal_in, &at(self.key.m))?;
        if c.rl {
            let all: Vec<f32> = (1..=k).flat_map(|s| rows_at(sig[s], n)).collect();
            disc.restage_timesteps(&self.reward_in, &all)?;
            for (t, inputs) in self.rl_in.iter().enumerate() {
                run.generator
                    .restage_timesteps(inputs, &rows_at(sig[t], n))?;
            }
        }
        let ks = match &d.gen {
            Some(g) => {
                let gx_sigma = vec![sig[g.ks]; n];
                dev.copy_to_device(&gx_sigma, &self.gx_sigma)?;
                dev.copy_to_device(&g.tau, &self.tau)?;
                dev.copy_to_device(&g.dmd_noise, &self.dmd_noise)?;
                dev.copy_to_device(&g.gan_sigma, &self.gan_sigma)?;
                let coef: Vec<f32> = g.gan_sigma.iter().map(|s| s - 1.0).collect();
                dev.copy_to_device(&coef, &self.gan_coef)?;
                dev.copy_to_device(&g.gan_noise, &self.gan_noise)?;
                run.generator
                    .restage_timesteps(&self.gx_in, &t_of(&gx_sigma))?;
                let both_tau: Vec<f32> = g.tau.iter().chain(&g.tau).copied().collect();
                run.teacher
                    .restage_timesteps(&self.teacher_in, &t_of(&both_tau))?;
                run.fake
                    .restage_timesteps(&self.dmd_fake_in, &t_of(&g.tau))?;
                disc.restage_timesteps(&self.gan_in, &t_of(&g.gan_sigma))?;
                g.ks
            }
            None => 0,
        };
        if d.pick >= k || ks >= k {
            return Err(KernelError::Invalid(format!(
                "device AdvDMD: picks {} / {ks} of {k} steps",
                d.pick
            )));
        }
        dev.copy_to_device(&[d.pick as i32, ks as i32], &self.picks)
    }
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
        let models = (
            DeviceMmdit::frozen(dev, &host.teacher.mmdit)?,
            DeviceMmdit::new(dev, &host.generator.mmdit)?,
            DeviceMmdit::new(dev, &host.fake.mmdit)?,
        );
        let mut run = Self::build(
            dev,
            host.config.clone(),
            models,
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
        run.upload_host_state(&host.ema.shadow, &host.opt_generator, &host.opt_fake)?;
        Ok(run)
    }

    /// Uploads the EMA (of the generator's trainable tensors, by name) and the optimizers'
    /// moments and steps: the generator's, and the critic's over the fake score and the head.
    fn upload_host_state(
        &mut self,
        ema: &crate::nn::ParamMap,
        opt_generator: &AdamW,
        opt_critic: &AdamW,
    ) -> Result<()> {
        let dev = self.dev.clone();
        let shadow = flat_trainable(&self.generator, |name| {
            ema.get(name).map(|p| p.value().f32s().to_vec())
        })?;
        dev.copy_to_device(&shadow, &self.ema)?;
        let moments = |p: &DeviceParams, opt: &AdamW| {
            let get = |map: &std::collections::BTreeMap<String, Vec<f32>>| {
                flat_trainable(p, |name| map.get(name).cloned())
            };
            Result::Ok((get(&opt.m)?, get(&opt.v)?))
        };
        for (dst, p, src) in [
            (&mut self.opt_generator, &*self.generator, opt_generator),
            (&mut self.opt_fake, &*self.fake, opt_critic),
            (&mut self.opt_head, &self.head.params, opt_critic),
        ] {
            let (m, v) = moments(p, src)?;
            dst.upload_moments(&dev, &m, &v, src.step)?;
        }
        Ok(())
    }

    /// Writes the run's state into `host` — weights (f32 masters), EMA, optimizer moments and
    /// steps, RNG and counters — for `AdvDmd::save` (the teacher and configuration are the
    /// host's own and stay).
    pub fn sync_to_host(&self, host: &mut AdvDmd) -> Result<()> {
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
        self.download_optimizers(&mut host.opt_generator, &mut host.opt_fake)?;
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

    /// The optimizers' moments (by name) and steps: the generator's into `generator`, the fake
    /// score's and the head's into `critic` (the CPU trainer's one critic optimizer).
    fn download_optimizers(&self, generator: &mut AdamW, critic: &mut AdamW) -> Result<()> {
        let split = |opt: &DeviceAdamW, p: &DeviceParams, into: &mut AdamW| -> Result<()> {
            let (m, v) = opt.download_moments(&self.dev)?;
            for (name, slot) in p.slots() {
                if slot.trainable {
                    let range = slot.offset..slot.offset + slot.numel();
                    into.m.insert(name.clone(), m[range.clone()].to_vec());
                    into.v.insert(name.clone(), v[range].to_vec());
                }
            }
            Ok(())
        };
        split(&self.opt_generator, &self.generator, generator)?;
        generator.step = self.opt_generator.step;
        split(&self.opt_fake, &self.fake, critic)?;
        split(&self.opt_head, &self.head.params, critic)?;
        critic.step = self.opt_fake.step;
        Ok(())
    }

    /// Writes the run's checkpoint straight from the device, in the CPU trainer's format
    /// (`AdvDmd::save`: the same groups, moments and record), atomically and streamed: one
    /// tensor at a time goes through host memory, so a model of any size saves. The EMA group is
    /// a whole model (its frozen tensors are the generator's). A NaN or an infinity anywhere
    /// leaves the file on disk as it was.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let mut sources: Vec<(String, Vec<usize>, StateSource)> = Vec::new();
        for (prefix, p) in self.weight_groups() {
            for (name, slot) in p.slots() {
                let src = StateSource::F32(&p.master, slot.offset);
                sources.push((format!("{prefix}{name}"), slot.shape.clone(), src));
            }
        }
        for (name, slot) in self.generator.slots() {
            let src = StateSource::F32(self.ema_buffer(slot), slot.offset);
            sources.push((format!("ema.{name}"), slot.shape.clone(), src));
        }
        if let Some(b) = &self.frozen_backbone {
            for (name, slot) in b.slots() {
                let src = StateSource::Bf16(&b.weights, slot.offset);
                sources.push((format!("frozen_fake.{name}"), slot.shape.clone(), src));
            }
        }
        let (mut steps, mut counts) = (serde_json::Map::new(), serde_json::Map::new());
        for (prefix, parts) in self.optimizer_parts() {
            let mut count = 0;
            for &(opt, p) in &parts {
                for (name, slot) in p.slots().iter().filter(|(_, s)| s.trainable) {
                    for (kind, second) in [("m.", false), ("v.", true)] {
                        let src = StateSource::Moment(opt, second, slot.offset);
                        sources.push((format!("{prefix}{kind}{name}"), vec![slot.numel()], src));
                    }
                    count += 1;
                }
            }
            steps.insert(prefix.to_string(), parts[0].0.step.into());
            counts.insert(prefix.to_string(), count.into());
        }
        let pending: Vec<PendingTensor> = sources
            .into_iter()
            .map(|(name, shape, src)| PendingTensor {
                name: name.clone(),
                shape: shape.clone(),
                dtype: StoredDType::F32,
                produce: Box::new(move || {
                    let v = src.read(&self.dev, shape.iter().product())?;
                    let t = Tensor::from_vec(v, &shape);
                    check_finite(path, &name, &t)?;
                    Ok(t)
                }),
            })
            .collect();
        let mut meta = checkpoint_meta(
            &self.config,
            self.iteration,
            self.generator_steps,
            &self.rng,
            self.frozen_backbone.is_some(),
        );
        if let Some(run) = &self.run_record {
            meta["run"] = run.clone();
        }
        let record = state_record(meta, steps, counts);
        write_safetensors(path, &pending, Some(record)).map_err(|e| {
            Error::Invalid(format!(
                "not saved: {e}; the file on disk is left as it was"
            ))
        })
    }

    /// The trained weights' checkpoint groups: prefix and parameter set.
    fn weight_groups(&self) -> [(&'static str, &DeviceParams); 3] {
        [
            ("generator.", &self.generator),
            ("fake.", &self.fake),
            ("head.", &self.head.params),
        ]
    }

    /// Each optimizer's checkpoint prefix and the parameter sets it steps: the generator's, and
    /// the critic's (the CPU trainer's one optimizer over the fake score and the head).
    fn optimizer_parts(&self) -> [(&'static str, Vec<(&DeviceAdamW, &DeviceParams)>); 2] {
        [
            ("adam_g.", vec![(&self.opt_generator, &*self.generator)]),
            (
                "adam_f.",
                vec![
                    (&self.opt_fake, &*self.fake),
                    (&self.opt_head, &self.head.params),
                ],
            ),
        ]
    }

    /// Continues (`fork` false) or forks ([`AdvDmd::fork`]'s rules) the run saved in `path`
    /// by [`Self::save`] (or `AdvDmd::save`) from the frozen teacher it distils (`teacher`
    /// describes it, `weights` holds it): a fresh run whose state is then read from the file one
    /// tensor at a time.
    pub fn resume(
        dev: &KernelDevice,
        (teacher, weights): (&MmditConfig, &dyn ParamSource),
        config: AdvDmdConfig,
        opts: DeviceRunOptions,
        path: &std::path::Path,
        fork: bool,
    ) -> Result<DeviceAdvDmd> {
        let f = StateFile::open(path)?;
        check_checkpoint(&f, &config, fork)?;
        let mut run = Self::new(dev, (teacher, weights), config, opts)?;
        for (prefix, p) in run.weight_groups() {
            for (name, slot) in p.slots() {
                let t = f.load_f32(&format!("{prefix}{name}"), &slot.shape)?;
                dev.copy_to_device(t.f32s(), &*p.master.view(slot.offset, slot.numel())?)?;
            }
            p.refresh_weights()?;
        }
        for (name, slot) in run.generator.slots().iter().filter(|(_, s)| s.trainable) {
            let t = f.load_f32(&format!("ema.{name}"), &slot.shape)?;
            dev.copy_to_device(t.f32s(), &*run.ema.view(slot.offset, slot.numel())?)?;
        }
        let mut steps = Vec::new();
        for (prefix, parts) in run.optimizer_parts() {
            let trained = |p: &DeviceParams| p.slots().values().filter(|s| s.trainable).count();
            f.check_moment_count(prefix, parts.iter().map(|(_, p)| trained(p)).sum())?;
            for (opt, p) in &parts {
                for (name, slot) in p.slots().iter().filter(|(_, s)| s.trainable) {
                    for (kind, second) in [("m.", false), ("v.", true)] {
                        let t = f.load_f32(&format!("{prefix}{kind}{name}"), &[slot.numel()])?;
                        opt.upload_moment_range(dev, second, slot.offset, t.f32s())?;
                    }
                }
            }
            steps.push(f.optimizer_step(prefix)?);
        }
        run.opt_generator.step = steps[0];
        (run.opt_fake.step, run.opt_head.step) = (steps[1], steps[1]);
        if f.meta()["disc_frozen"].as_bool() == Some(true) {
            let b = run.fake.frozen_copy()?;
            for (name, slot) in b.slots() {
                let t = f.load_f32(&format!("frozen_fake.{name}"), &slot.shape)?;
                let narrow: Vec<bf16> = t.f32s().iter().map(|&v| bf16::from_f32(v)).collect();
                dev.copy_to_device(&narrow, &*b.weights.view(slot.offset, slot.numel())?)?;
            }
            run.frozen_backbone = Some(b);
        }
        (run.iteration, run.generator_steps) = checkpoint_counters(&f)?;
        run.rng = checkpoint_rng(&f)?;
        run.run_record = Some(f.meta()["run"].clone()).filter(|r| !r.is_null());
        Ok(run)
    }

    /// A fresh run of the teacher `teacher` describes and `weights` holds: generator and fake
    /// score start as the teacher (every tensor trains but `pos_embed`), a fresh head from
    /// `config.seed`. The weights stream from `weights` one tensor at a time, each read once
    /// for all three models: a checkpoint teacher of any size starts without a host copy.
    pub fn new(
        dev: &KernelDevice,
        (teacher, weights): (&MmditConfig, &dyn ParamSource),
        config: AdvDmdConfig,
        opts: DeviceRunOptions,
    ) -> Result<DeviceAdvDmd> {
        let mut rng = Rng::new(config.seed);
        let head = DiscHead::init(teacher.hidden, &mut rng);
        let trained = |name: &str| name != "pos_embed";
        let models = (
            DeviceMmdit::allocate(dev, teacher, false, trained)?,
            DeviceMmdit::allocate(dev, teacher, true, trained)?,
            DeviceMmdit::allocate(dev, teacher, true, trained)?,
        );
        let targets = [&models.0.params, &models.1.params, &models.2.params];
        DeviceParams::fill(&targets, |name| weights.param(name))?;
        Self::build(dev, config, models, &head, opts, rng)
    }

    fn build(
        dev: &KernelDevice,
        config: AdvDmdConfig,
        (teacher, generator, mut fake): (DeviceMmdit, DeviceMmdit, DeviceMmdit),
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
            teacher,
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
            graphs: Default::default(),
            buffers: None,
            use_graphs: opts.graph,
            replays: 0,
            predrawn: None,
            run_record: None,
            last_host_lead_ms: 0.0,
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

    /// One iteration on `batch` (M real samples, N = M·G generated): the host draws every
    /// random number (in the CPU trainer's order) and stages them with the conditioning into the
    /// step's buffers, the device does the rest — run directly, or replayed from the kind's graph
    /// — and the metrics are read back at the end.
    pub fn step(&mut self, batch: &IterBatch) -> Result<IterMetrics> {
        let queued = self.step_queued(batch)?;
        self.finish(queued)
    }

    /// [`Self::step`] without waiting for it: the iteration is queued on the device and its
    /// figures are queued downloads, read by [`Self::finish`] — in between the host can queue the
    /// next iteration, so the device never idles through the host's share of it (its draws,
    /// conversions and uploads; with [`KernelDevice::set_async_copies`] on, the uploads do not
    /// wait for the device either). Any number may be in flight, finished in any order.
    pub fn step_queued(&mut self, batch: &IterBatch) -> Result<QueuedIteration> {
        let lead = std::time::Instant::now();
        let c = self.config.clone();
        let (m, n) = (c.prompts, c.prompts * c.group);
        let rs = batch.real.shape();
        if rs.len() != 4
            || rs[0] != m
            || batch.real_cond.rows() != m
            || batch.cond.rows() != n
            || batch.uncond.rows() != n
            || batch.cond.context.shape() != batch.uncond.context.shape()
            || batch.real_cond.context.shape()[1..] != batch.cond.context.shape()[1..]
        {
            return Err(Error::Invalid(format!(
                "device AdvDMD: a batch of {m} real samples {rs:?} with {} / {} / {} conditioning \
                 rows (want {m} / {n} / {n}, one context length)",
                batch.real_cond.rows(),
                batch.cond.rows(),
                batch.uncond.rows()
            )));
        }
        if c.frozen_disc_after.is_some_and(|f| self.iteration >= f)
            && self.frozen_backbone.is_none()
        {
            self.frozen_backbone = Some(self.fake.frozen_copy()?);
            // the kinds that train the discriminator never run again: free their graphs
            self.graphs.retain(|k, _| !k.train_disc);
        }
        let (generator, rl) = c.step_kind(self.iteration, self.generator_steps);
        let kind = StepKind {
            generator,
            rl,
            train_disc: self.frozen_backbone.is_none(),
        };
        let shape = [n, rs[1], rs[2], rs[3]];
        let draws = self.take_draws(&shape, generator);
        let key = StepKey {
            shape,
            m,
            context_len: batch.cond.context.shape()[1],
        };
        if self.buffers.as_ref().is_none_or(|b| b.key != key) {
            // the graphs read the old buffers
            self.graphs.clear();
            self.buffers = None;
            self.buffers = Some(StepBuffers::new(self, key)?);
        }
        let bufs = self.buffers.as_ref().expect("made above");
        bufs.stage(self, batch, &draws)?;
        self.opt_fake.stage(&self.dev, self.lr(c.lr_fake))?;
        if kind.train_disc {
            self.opt_head.stage(&self.dev, self.lr(c.lr_fake))?;
        }
        if generator {
            self.opt_generator
                .stage(&self.dev, self.lr(c.lr_generator))?;
        }
        self.last_host_lead_ms = lead.elapsed().as_secs_f64() * 1e3;
        self.run_kind(kind)?;
        // the host's share of the next iteration, while the device runs this one
        self.predraw(&shape);
        let queued = self.queue_metrics(kind)?;
        if generator {
            self.generator_steps += 1;
        }
        self.iteration += 1;
        Ok(queued)
    }

    /// This iteration's random draws, in the CPU trainer's order: the ones the previous
    /// iteration drew ahead ([`Self::predraw`]) when they were drawn from this state for this
    /// shape and configuration, else drawn now.
    fn take_draws(&mut self, shape: &[usize; 4], generator: bool) -> Draws {
        let key = DrawKey::new(&self.config, shape);
        if let Some(p) = self.predrawn.take() {
            if p.from == self.rng && p.key == key {
                let mut d = p.common;
                if generator {
                    d.gen = Some(p.gen);
                    self.rng = p.after;
                } else {
                    self.rng = p.mid;
                }
                return d;
            }
        }
        let mut d = draw_common(&self.config, &key.sigmas, &mut self.rng, shape);
        if generator {
            d.gen = Some(draw_generator(
                &self.config,
                &key.sigmas,
                &mut self.rng,
                shape,
            ));
        }
        d
    }

    /// Draws the next iteration's randoms on the host (for either kind; the generator's part
    /// last, as the CPU trainer draws it) while the device runs this one, from a copy of the
    /// generator state: `self.rng` stays what a checkpoint saves.
    fn predraw(&mut self, shape: &[usize; 4]) {
        let key = DrawKey::new(&self.config, shape);
        let mut rng = self.rng.clone();
        let common = draw_common(&self.config, &key.sigmas, &mut rng, shape);
        let mid = rng.clone();
        let gen = draw_generator(&self.config, &key.sigmas, &mut rng, shape);
        self.predrawn = Some(Predrawn {
            from: self.rng.clone(),
            key,
            common,
            mid,
            gen,
            after: rng,
        });
    }

    /// Runs `kind`'s device work: directly, or from its graph. A replay adds the matmul FLOPs
    /// its capture counted (the launchers count as they queue, and a replay queues nothing).
    fn run_kind(&mut self, kind: StepKind) -> Result<()> {
        let entry = self.graphs.entry(kind).or_default();
        entry.runs += 1;
        let record = self.use_graphs && entry.runs >= 2 && entry.graph.is_none();
        if record {
            let counts = |d: &KernelDevice| (d.matmul_flops(), d.recomputed_flops());
            let before = counts(&self.dev);
            let graph = {
                let this = &*self;
                this.dev.capture(|| this.device_work(kind))?
            };
            let after = counts(&self.dev);
            let entry = self.graphs.get_mut(&kind).expect("entry above");
            entry.flops = (after.0 - before.0, after.1 - before.1);
            entry.graph = Some(graph);
            self.graphs[&kind].graph.as_ref().expect("set").launch()?;
            return Ok(());
        }
        let entry = &self.graphs[&kind];
        match &entry.graph {
            Some(g) => {
                self.dev.count_replayed_flops(entry.flops.0, entry.flops.1);
                g.launch()?;
                self.replays += 1;
            }
            None => self.device_work(kind)?,
        }
        Ok(())
    }

    /// The whole iteration on the device: reads only the step's staged buffers, the models and
    /// the optimizers; no host copies, so it can be recorded into a graph.
    fn device_work(&self, kind: StepKind) -> KernelResult<()> {
        let b = self.buffers.as_ref().expect("staged");
        let c = &self.config;
        let sig = self.sigmas();
        b.fill_conditioning(&self.dev, c, kind)?;
        let roll = rollout_sde_dev(
            &self.generator,
            &RolloutInputs {
                inputs: &b.roll_in,
                t_features: &b.roll_features,
                noise: &b.noise,
                z: &b.z,
                sigma: &b.roll_sigma,
                sigma_next: &b.roll_sigma_next,
            },
            &sig,
            c.rho,
        )?;
        // rewards with the discriminator as it is now, before it learns from this rollout
        if kind.rl {
            self.rewards(b, &roll)?;
        }
        self.guidance_update(b, &roll, kind)?;
        if kind.generator {
            self.generator_update(b, &roll, kind)?;
        }
        Ok(())
    }

    /// Queues the downloads of what the iteration's metrics are made of (behind its work: the
    /// next iteration's work, queued after them, may overwrite the buffers).
    fn queue_metrics(&self, kind: StepKind) -> Result<QueuedIteration> {
        let b = self.buffers.as_ref().expect("staged");
        let dev = &self.dev;
        Ok(QueuedIteration {
            kind,
            iteration: self.iteration + 1,
            len: b.len(),
            n: b.key.shape[0],
            m: b.key.m,
            fake_logits: dev.download_later(&b.fake_logits)?,
            real_logits: dev.download_later(&b.real_logits)?,
            fm_parts: dev.download_later(&b.fm_parts)?,
            generator: match kind.generator {
                true => Some((
                    dev.download_later(&b.dmd_norm)?,
                    dev.download_later(&b.gan_logits)?,
                )),
                false => None,
            },
            rl: match kind.rl {
                true => Some((
                    dev.download_later(&b.reward_logits)?,
                    dev.download_later(&b.rl_loss)?,
                )),
                false => None,
            },
        })
    }

    /// A queued iteration's metrics: waits for its figures (not for anything queued after).
    pub fn finish(&self, q: QueuedIteration) -> Result<IterMetrics> {
        let c = &self.config;
        let sig = self.sigmas();
        let (kind, n, m) = (q.kind, q.n, q.m);
        let states = disc_states(c);
        let ns = states.len();
        let (n_fake, n_real) = ((n * ns) as f32, (m * ns) as f32);
        let (lf, lr) = (q.fake_logits.wait()?, q.real_logits.wait()?);
        let frac = |v: &[f32], pos: bool| {
            v.iter().filter(|&&x| (x > 0.0) == pos).count() as f32 / v.len().max(1) as f32
        };
        let mut metrics = IterMetrics {
            iteration: q.iteration,
            fake_loss: mse_from_parts(&q.fm_parts.wait()?, q.len),
            d_loss: lf.iter().map(|&l| softplus(l)).sum::<f32>() / n_fake
                + lr.iter().map(|&l| softplus(-l)).sum::<f32>() / n_real,
            d_acc_real: frac(&lr, true),
            d_acc_fake: frac(&lf, false),
            d_acc_by_sigma: states
                .iter()
                .enumerate()
                .map(|(j, &s)| {
                    let (f, r) = (&lf[j * n..(j + 1) * n], &lr[j * m..(j + 1) * m]);
                    (sig[s], frac(r, true), frac(f, false))
                })
                .collect(),
            generator_step: kind.generator,
            rl_step: kind.rl,
            ..Default::default()
        };
        if let Some((dmd_norm, gan_logits)) = q.generator {
            let l2 = dmd_norm.wait()?[0];
            metrics.dmd_grad_norm = dmd_rms(l2, c.lambda_dmd, q.len, n);
            let l = gan_logits.wait()?;
            metrics.gan_loss = l.iter().map(|&v| softplus(-v)).sum::<f32>() / n as f32;
        }
        if let Some((reward_logits, rl_loss)) = q.rl {
            let k = sig.len() - 1;
            let last = &reward_logits.wait()?[(k - 1) * n..];
            let clip = c.reward_clip;
            metrics.mean_reward = last.iter().map(|l| l.clamp(-clip, clip)).sum::<f32>() / n as f32;
            let share = 1.0 / (k - 1) as f64;
            metrics.rl_loss = rl_loss.wait()?.iter().map(|&l| l * share).sum::<f64>() as f32;
        }
        Ok(metrics)
    }

    /// Discriminator logits of the f32 images `x` (rows of `inputs`, whose timestep features and
    /// conditioning are staged) into `out`; with `keep`, what [`Self::logits_backward`] needs.
    fn logits(
        &self,
        inputs: &DeviceInputs,
        x: &DevBuf<f32>,
        out: &DevBuf<f32>,
        keep: bool,
    ) -> KernelResult<Option<LogitsSaved>> {
        let backbone = self.disc_backbone();
        cast_f32_to_bf16_into(&self.dev, &inputs.x, x)?;
        let mode = if keep { self.keep } else { Keep::Nothing };
        let f = backbone.forward_features(inputs, self.feature_block, mode)?;
        let p = backbone.config.patch;
        let dims = (inputs.batch, inputs.height / p, inputs.width / p);
        let (logits, head) = self.head.forward_device(&f.features, dims)?;
        copy(&self.dev, out, &logits)?;
        Ok(match (keep, f.saved) {
            (true, Some(saved)) => Some(LogitsSaved { saved, head }),
            _ => None,
        })
    }

    /// Gradients of a kept discriminator call from `dlogits` (device): into the head's and the
    /// fake backbone's parameter gradients when asked; returns the image's gradient (bf16).
    fn logits_backward(
        &self,
        inputs: &DeviceInputs,
        s: &LogitsSaved,
        dlogits: &DevBuf<f32>,
        params: bool,
    ) -> KernelResult<DevBuf<bf16>> {
        let dfeat = self.head.backward_device(&s.head, dlogits, params)?;
        Ok(self
            .disc_backbone()
            .backward_features(inputs, &s.saved, &dfeat, params)?
            .x)
    }

    /// The discriminator's backbone: the fake score, or its snapshot once frozen.
    fn disc_backbone(&self) -> &DeviceMmdit {
        self.frozen_backbone.as_ref().unwrap_or(&self.fake)
    }

    /// `r_{i,k} = clip(D(x_k, σ_k))` for k = 1..K in one call over every state's samples, and
    /// from them each transition's group-normalised advantages (`b.adv`, `[K−1][n]`).
    fn rewards(&self, b: &StepBuffers, roll: &StackedRollout) -> KernelResult<()> {
        let c = &self.config;
        let k = c.steps_per_sample;
        let n = b.key.shape[0];
        let x = roll.states.view(roll.len, k * roll.len)?;
        self.logits(&b.reward_in, &x, &b.reward_logits, false)?;
        advantages(
            &self.dev,
            &b.adv,
            &b.reward_logits,
            n,
            k,
            c.group,
            c.reward_clip,
            c.adv_clip,
        )
    }

    /// Clips the gradients of `parts` to their joint norm (into `clip`) and steps each with its
    /// optimizer (staged before the work) and, for the generator, its EMA.
    fn step_jointly(
        dev: &KernelDevice,
        parts: &[StepPart],
        clip: &DevBuf<f32>,
        max_norm: f32,
    ) -> KernelResult<()> {
        let grads: Vec<_> = parts
            .iter()
            .map(|(_, p, _)| p.grads()?.view(0, p.n_trainable))
            .collect::<KernelResult<_>>()?;
        let refs: Vec<&DevBuf<f32>> = grads.iter().map(|g| &**g).collect();
        joint_grad_norm_clip(dev, clip, &refs, max_norm)?;
        for (opt, p, ema) in parts {
            let flat = FlatParams {
                master: &p.master,
                bf16: &p.weights,
                grads: p.grads()?,
                n_decay: p.n_decay,
            };
            opt.update_staged(dev, &flat, clip, *ema)?;
        }
        Ok(())
    }

    fn guidance_update(
        &self,
        b: &StepBuffers,
        roll: &StackedRollout,
        kind: StepKind,
    ) -> KernelResult<()> {
        let c = &self.config;
        let dev = &self.dev;
        let (n, m) = (b.key.shape[0], b.key.m);
        let per = b.len() / n;
        self.fake.zero_grad()?;
        self.head.params.zero_grad()?;

        // the fake score's flow-matching loss on one of the rollout's x̂0 (train::losses::fake_score_loss)
        let x0 = dev.alloc::<f32>(b.len())?;
        select_block_f32(dev, &x0, &roll.x0, &b.picks, 0)?;
        flow_matching_grads_dev(
            &self.fake,
            &b.fm_in,
            &x0,
            &b.fm_noise,
            &b.fm_sigma,
            &b.fm_parts,
            self.keep,
        )?;
        drop(x0);

        // The discriminator on generated states and noised real samples. Every kept state goes
        // into one call for the generated rows and one for the real rows (state-major: the
        // state's n, resp. m, samples at its σ) instead of a call per state: the GEMMs get
        // S times the rows. A softplus loss is per logit, so the rows' gradients are independent
        // and one backward per call carries them all.
        let states = disc_states(c);
        let ns = states.len();
        let (n_fake, n_real) = ((n * ns) as f32, (m * ns) as f32);
        let xf = roll.states.view(states[0] * roll.len, ns * roll.len)?;
        let xr = dev.alloc::<f32>(ns * m * per)?;
        for j in 0..ns {
            let y = xr.view(j * m * per, m * per)?;
            let noise = b.real_noise.view(j * m * per, m * per)?;
            let sm = b.real_sigma.view(j * m, m)?;
            flow_noise_into(dev, &y, None, &b.real, &noise, &sm, (m, per))?;
        }
        // A frozen discriminator is still evaluated (its accuracy is the reward model's), but
        // neither its head nor its snapshot learns: no backward.
        let train = kind.train_disc;
        for (inputs, x, out, sign, rows) in [
            (&b.dfake_in, &*xf, &b.fake_logits, 1.0, n_fake),
            (&b.dreal_in, &xr, &b.real_logits, -1.0, n_real),
        ] {
            if let Some(saved) = self.logits(inputs, x, out, train)? {
                // d/dl λ·softplus(±l)/rows
                let dl = dev.alloc::<f32>(out.len())?;
                logit_grads(dev, &dl, out, sign, c.lambda_d / rows)?;
                self.logits_backward(inputs, &saved, &dl, true)?;
            }
        }
        drop(xr);
        let parts: &[StepPart] = if train {
            &[
                (&self.opt_fake, &self.fake, None),
                (&self.opt_head, &self.head.params, None),
            ]
        } else {
            // the fixed head takes no step (AdamW's decay would still move it)
            &[(&self.opt_fake, &self.fake, None)]
        };
        Self::step_jointly(dev, parts, &b.clip_fake, c.grad_clip)
    }

    fn generator_update(
        &self,
        b: &StepBuffers,
        roll: &StackedRollout,
        kind: StepKind,
    ) -> KernelResult<()> {
        let c = &self.config;
        let dev = &self.dev;
        let n = b.key.shape[0];
        let per = b.len() / n;
        self.generator.zero_grad()?;

        // x̂0 at a random step k*, kept for the backward
        let xk = dev.alloc::<f32>(b.len())?;
        select_block_f32(dev, &xk, &roll.states, &b.picks, 1)?;
        let gx = generator_x0(&self.generator, &b.gx_in, &xk, &b.gx_sigma, self.keep)?;
        drop(xk);

        // DMD: teacher (CFG) and fake denoise a re-noised x̂0
        let g = dmd_seed_dev(
            &self.teacher,
            &self.fake,
            &gx.x0,
            &DmdInputs {
                teacher: &b.teacher_in,
                fake: &b.dmd_fake_in,
                tau: &b.tau,
                noise: &b.dmd_noise,
                w_real: c.w_real,
                lambda: c.lambda_dmd,
            },
            &b.dmd_norm,
        )?;

        // GAN: mean softplus(−D(x̃)), x̃ = (1−σ̃)·x̂0 + σ̃·noise, through the fake backbone and
        // the head (neither takes gradients here), added to the DMD seed at x̂0
        let xt = dev.alloc::<f32>(n * per)?;
        flow_noise_into(dev, &xt, None, &gx.x0, &b.gan_noise, &b.gan_sigma, (n, per))?;
        let saved = self
            .logits(&b.gan_in, &xt, &b.gan_logits, true)?
            .expect("kept");
        drop(xt);
        let dl = dev.alloc::<f32>(n)?;
        logit_grads(dev, &dl, &b.gan_logits, -1.0, c.lambda_gan / n as f32)?;
        let dxt = self.logits_backward(&b.gan_in, &saved, &dl, false)?;
        drop(saved);
        // g += (1−σ̃)·dx̃: the per-sample axpy of x0_from_velocity (x − c_i·v) with c_i = σ̃_i − 1
        let total = dev.alloc::<f32>(n * per)?;
        x0_from_velocity(dev, &total, &g, &dxt, &b.gan_coef, false, 1.0)?;
        drop((g, dxt));
        generator_backward_from_x0(&self.generator, &b.gx_in, &gx, &total)?;
        drop((gx, total));

        if kind.rl {
            self.rl_grads(b, roll)?;
        }
        Self::step_jointly(
            dev,
            &[(
                &self.opt_generator,
                &self.generator,
                Some((&self.ema, c.ema_decay)),
            )],
            &b.clip_generator,
            c.grad_clip,
        )
    }

    /// The RL term: for every stochastic transition the generator's velocity is recomputed with
    /// grad, its log-probability of the rollout's next state taken on the device, and the PPO
    /// objective's gradient `λ_RL·∂L/∂ℓ·∂ℓ/∂v̂` seeded into the generator's backward. The clipped
    /// objective's gradient is per transition, so each backward runs right after its forward.
    fn rl_grads(&self, b: &StepBuffers, roll: &StackedRollout) -> KernelResult<()> {
        let c = &self.config;
        let dev = &self.dev;
        let n = b.key.shape[0];
        let per = b.len() / n;
        let transitions = c.steps_per_sample - 1;
        let share = 1.0 / transitions as f64;
        for (t, inputs) in b.rl_in.iter().enumerate() {
            let x = roll.state(t)?;
            cast_f32_to_bf16_into(dev, &inputs.x, &x)?;
            let f = self.generator.forward(inputs, self.keep)?;
            let v = cast_bf16_to_f32(dev, &f.velocity)?;
            let tr = rho_step(
                dev,
                &x,
                &v,
                NextState::Given(&*roll.state(t + 1)?),
                &*b.roll_sigma.view(t * n, n)?,
                &*b.roll_sigma_next.view(t * n, n)?,
                c.rho,
                (n, per),
            )?;
            drop(v);
            // dv_i = λ·dl_i·∂ℓ_i/∂v (velocity_grad_from_x0: −scale·c_i·g with c_i = dl_i·share,
            // scale = −λ)
            let coef = dev.alloc::<f32>(n)?;
            ppo_grad(
                dev,
                &coef,
                &*b.rl_loss.view(t, 1)?,
                &tr.log_prob,
                &*roll.log_prob(t)?,
                &*b.adv.view(t * n, n)?,
                c.clip_eps,
                share,
            )?;
            let dv = dev.alloc::<bf16>(n * per)?;
            velocity_grad_from_x0(dev, &dv, &tr.grad_v, &coef, -c.lambda_rl)?;
            drop(tr);
            let saved = f.saved.as_ref().expect("a kept forward");
            self.generator.backward(inputs, saved, &dv, true)?;
        }
        Ok(())
    }

    /// Iterations replayed from an already recorded graph.
    pub fn graph_replays(&self) -> u64 {
        self.replays
    }

    /// Bytes of the three optimizers' moments on the device.
    pub fn optimizer_bytes(&self) -> usize {
        self.opt_generator.state_bytes() + self.opt_fake.state_bytes() + self.opt_head.state_bytes()
    }

    /// Latents of the EMA generator on its K-step schedule (Euler, no guidance) for `data`'s
    /// rows `indices`, sample k seeded `seed + k`, in one batch: what `advdmd sample` draws from
    /// the exported model (`OUT/model`). The EMA is rounded into the generator's bf16 weights
    /// for the loop, and the weights are made from the masters again after (as every step
    /// leaves them), so the run goes on exactly as it would have; no memory is added but the
    /// loop's activations.
    pub fn sample_ema_latents(
        &self,
        data: &LatentData,
        indices: &[usize],
        seed: u64,
    ) -> Result<Tensor> {
        let g = &self.generator;
        cast_f32_to_bf16_into(&self.dev, &*g.weights.view(0, self.ema.len())?, &self.ema)?;
        let latents = sample_checkpoint_latents_device(
            g,
            data,
            indices,
            &self.sigmas(),
            1.0,
            crate::flow::sample::Sampler::Euler,
            seed,
            indices.len(),
            |_| {},
        );
        g.refresh_weights()?;
        latents
    }

    /// The generator's EMA weights as named host tensors (its trainable tensors).
    pub fn ema_named(&self) -> KernelResult<Vec<(String, Tensor)>> {
        let trained = self.generator.slots().iter().filter(|(_, s)| s.trainable);
        trained
            .map(|(name, slot)| Ok((name.clone(), self.ema_tensor(slot)?)))
            .collect()
    }

    /// The EMA generator as a model ([`ParamSource`], one tensor downloaded at a time): what
    /// the checkpoint's `ema.` group holds and a checkpoint teacher's run exports.
    pub fn ema_model(&self) -> EmaModel<'_> {
        EmaModel(self)
    }

    /// Where the EMA model's tensor in `slot` (of the generator's layout) is: a trained tensor
    /// in the EMA, a frozen one (the teacher's, never stepped) in the generator's masters.
    fn ema_buffer(&self, slot: &Slot) -> &DevBuf<f32> {
        if slot.trainable {
            &self.ema
        } else {
            &self.generator.master
        }
    }

    fn ema_tensor(&self, slot: &Slot) -> KernelResult<Tensor> {
        let view = self.ema_buffer(slot).view(slot.offset, slot.numel())?;
        Ok(Tensor::from_vec(self.dev.download(&*view)?, &slot.shape))
    }
}

/// [`DeviceAdvDmd::ema_model`].
pub struct EmaModel<'a>(&'a DeviceAdvDmd);

impl ParamSource for EmaModel<'_> {
    fn param(&self, name: &str) -> Result<Tensor> {
        Ok(self.0.ema_tensor(self.0.generator.slot(name)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softplus_is_stable_at_both_ends() {
        assert!((softplus(0.0) - std::f32::consts::LN_2).abs() < 1e-7);
        assert!((softplus(50.0) - 50.0).abs() < 1e-5);
        assert!(softplus(-50.0) > 0.0 && softplus(-50.0) < 1e-20);
    }
}

//! The few-step samplers on a kernel device — Euler, and the re-noising (DMD2 multistep) one:
//! the whole K-step loop (model calls, classifier-free guidance, the step) stays on the device;
//! the host uploads the inputs, every step's timestep features and the re-noising draws once and
//! reads the final latents back. [`EulerPlan`] keeps the buffers for repeated samples and
//! replays the loop from a CUDA graph.

use half::bf16;

use crate::device::kernel::{bf16_of, DevBuf, DeviceGraph, KernelError, KernelResult};
use crate::kernels::elementwise::dev::{cast_f32_to_bf16_into, copy};
use crate::kernels::sde::dev::{euler_cfg_step, flow_noise_into};
use crate::kernels::shape::concat;
use crate::mmdit::device::{DeviceInputs, DeviceMmdit, Keep};
use crate::nn::timestep_features;
use crate::tensor::Tensor;

/// The unconditional inputs and the guidance scale of classifier-free guidance.
pub struct Guidance<'a> {
    pub pooled: &'a Tensor,
    pub context: &'a Tensor,
    pub scale: f32,
}

/// Euler ODE sampling from `noise [B, C, H, W]` along `sigmas` (`K + 1` values ending in the
/// last σ), conditioned on `pooled`, `context`; with `guidance` each step runs the conditional
/// and unconditional batch in one model call. Returns the final latents (f32, from the f32 state
/// the device keeps; the model reads its bf16 rounding).
pub fn sample_euler(
    model: &DeviceMmdit,
    noise: &Tensor,
    sigmas: &[f32],
    pooled: &Tensor,
    context: &Tensor,
    guidance: Option<Guidance>,
) -> KernelResult<Tensor> {
    let scale = guidance.as_ref().map(|g| g.scale);
    EulerPlan::new(model, sigmas, scale, false).sample(noise, pooled, context, guidance)
}

/// The Euler sampler kept ready for repeated samples of one shape: the inputs stay in device
/// buffers that each sample overwrites, every step's timestep features are uploaded once, and —
/// with `graph` on a GPU — the whole K-step loop is recorded into a CUDA graph and each later
/// sample is one graph launch, with no host launch gap between its kernels. The first sample
/// runs the loop directly (it loads the kernel modules and cuBLASLt's plans, which a capture may
/// not do); the second records the graph. The emulator records and replays the graph too.
pub struct EulerPlan<'m> {
    model: &'m DeviceMmdit,
    sigmas: Vec<f32>,
    /// The guidance scale when the plan samples with classifier-free guidance.
    scale: Option<f32>,
    graph: bool,
    /// Every step's modulations from one product a layer before the first step
    /// ([`DeviceMmdit::step_modulations`]), or each step's own (the first way, kept for A/B).
    modulate_ahead: bool,
    /// The re-noising sampler ([`Self::renoising`]) instead of Euler's.
    renoise: bool,
    state: Option<PlanState>,
}

/// The device buffers of a plan's shape, and its graph once recorded.
struct PlanState {
    shapes: [Vec<usize>; 3],
    inputs: DeviceInputs,
    /// The f32 state `[B, C, H, W]`.
    x: DevBuf<f32>,
    /// Each step's timestep features, `[K, calls, freq_dim]`.
    t_features: DevBuf<bf16>,
    /// The pooled conditioning once for each step, `[K, calls, pooled_dim]` (what the step
    /// modulations read).
    pooled_steps: DevBuf<bf16>,
    /// The re-noising sampler's draws `[steps into σ' > 0, B, C, H, W]` and each step's σ'
    /// for every sample `[K, B]` (empty for Euler).
    step_noise: DevBuf<f32>,
    sigma_next: DevBuf<f32>,
    graph: Option<DeviceGraph>,
    samples: usize,
}

impl<'m> EulerPlan<'m> {
    /// A plan over `sigmas` (`K + 1` values), guided with `scale` when given; `graph`: replay
    /// the loop from a CUDA graph after the first sample.
    pub fn new(
        model: &'m DeviceMmdit,
        sigmas: &[f32],
        scale: Option<f32>,
        graph: bool,
    ) -> EulerPlan<'m> {
        EulerPlan {
            model,
            sigmas: sigmas.to_vec(),
            scale,
            graph,
            modulate_ahead: true,
            renoise: false,
            state: None,
        }
    }

    /// The re-noising sampler (`flow::sample::Sampler::Sde`, DMD2's multistep one) instead of
    /// Euler's: each step goes to the clean prediction `x̂0 = x − σ·v` and noises it afresh to
    /// the next level, `(1 − σ')·x̂0 + σ'·z`, with draws `z` given to [`Self::sample_renoised`].
    pub fn renoising(mut self) -> Self {
        self.renoise = true;
        self.state = None;
        self
    }

    /// How many steps draw noise (those into σ' > 0): `step_noise` holds that many `noise`-sized
    /// draws for [`Self::sample_renoised`].
    pub fn noisy_steps(&self) -> usize {
        self.sigmas.iter().skip(1).filter(|&&s| s > 0.0).count()
    }

    /// Whether the model's modulations for every step come from one product a layer before
    /// the first step (the default) or each step computes its own: the same values, the
    /// modulation weights read once a sample or once a step (`bench sample
    /// --modulation-per-step` times the second). Drops a recorded graph.
    pub fn modulate_ahead(mut self, on: bool) -> Self {
        self.modulate_ahead = on;
        self.state = None;
        self
    }

    /// Whether the last sample was a graph replay.
    pub fn replayed(&self) -> bool {
        self.state
            .as_ref()
            .is_some_and(|s| s.graph.is_some() && s.samples > 1)
    }

    /// One sample (see [`sample_euler`]); `guidance` must be given exactly when the plan was
    /// made with a scale, and its scale is the plan's.
    pub fn sample(
        &mut self,
        noise: &Tensor,
        pooled: &Tensor,
        context: &Tensor,
        guidance: Option<Guidance>,
    ) -> KernelResult<Tensor> {
        if self.renoise {
            return Err(KernelError::Invalid(
                "a re-noising plan samples with its draws (sample_renoised)".into(),
            ));
        }
        self.sample_with(noise, &[], pooled, context, guidance)
    }

    /// One sample of a [`Self::renoising`] plan: `step_noise` holds the draws of each step into
    /// σ' > 0 in turn ([`Self::noisy_steps`] of them), each the size of `noise`.
    pub fn sample_renoised(
        &mut self,
        noise: &Tensor,
        step_noise: &[f32],
        pooled: &Tensor,
        context: &Tensor,
        guidance: Option<Guidance>,
    ) -> KernelResult<Tensor> {
        if !self.renoise || step_noise.len() != self.noisy_steps() * noise.numel() {
            return Err(KernelError::Invalid(format!(
                "re-noised sample: {} draws for {} steps of {} (a re-noising plan wants one \
                 draw a step into σ' > 0)",
                step_noise.len(),
                self.noisy_steps(),
                noise.numel()
            )));
        }
        self.sample_with(noise, step_noise, pooled, context, guidance)
    }

    fn sample_with(
        &mut self,
        noise: &Tensor,
        step_noise: &[f32],
        pooled: &Tensor,
        context: &Tensor,
        guidance: Option<Guidance>,
    ) -> KernelResult<Tensor> {
        let dev = &self.model.dev;
        if guidance.is_some() != self.scale.is_some() {
            return Err(KernelError::Invalid(
                "Euler plan: guidance given to an unguided plan, or missing".into(),
            ));
        }
        let (x_in, pooled_in, ctx_in) = match &guidance {
            Some(g) => (
                concat(&[noise, noise], 0),
                concat(&[pooled, g.pooled], 0),
                concat(&[context, g.context], 0),
            ),
            None => (noise.clone(), pooled.clone(), context.clone()),
        };
        let shapes = [
            x_in.shape().to_vec(),
            pooled_in.shape().to_vec(),
            ctx_in.shape().to_vec(),
        ];
        let steps = self.sigmas.len().saturating_sub(1);
        let fresh = self.state.as_ref().is_none_or(|s| s.shapes != shapes);
        if fresh {
            let calls = x_in.shape().first().copied().unwrap_or(0);
            let t_of = |sigma: f32| vec![crate::flow::timestep_of(sigma); calls];
            let sigma0 = self.sigmas.first().copied().unwrap_or(1.0);
            let inputs = self
                .model
                .inputs(&x_in, &t_of(sigma0), &pooled_in, &ctx_in)?;
            let mut all = Vec::new();
            for &sigma in &self.sigmas[..steps] {
                let f = timestep_features(&t_of(sigma), self.model.config.freq_dim);
                all.extend(f.f32s().iter().map(|&v| bf16::from_f32(v)));
            }
            let samples = noise.shape().first().copied().unwrap_or(0);
            let sigma_next: Vec<f32> = match self.renoise {
                true => self.sigmas[1..]
                    .iter()
                    .flat_map(|&s| vec![s; samples])
                    .collect(),
                false => Vec::new(),
            };
            self.state = Some(PlanState {
                shapes,
                inputs,
                x: dev.upload(noise.f32s())?,
                t_features: dev.upload(&all)?,
                pooled_steps: dev.upload(&repeated(&pooled_in, steps))?,
                step_noise: dev.upload(step_noise)?,
                sigma_next: dev.upload(&sigma_next)?,
                graph: None,
                samples: 0,
            });
        }
        let st = self.state.as_mut().expect("set above");
        if !fresh {
            let bf = |t: &Tensor| bf16_of(t.f32s());
            dev.copy_to_device(&bf(&x_in), &st.inputs.x)?;
            dev.copy_to_device(&bf(&pooled_in), &st.inputs.pooled)?;
            dev.copy_to_device(&repeated(&pooled_in, steps), &st.pooled_steps)?;
            dev.copy_to_device(&bf(&ctx_in), &st.inputs.context)?;
            dev.copy_to_device(noise.f32s(), &st.x)?;
            dev.copy_to_device(step_noise, &st.step_noise)?;
        }
        let (model, sigmas, w) = (self.model, &self.sigmas, self.scale);
        let (ahead, renoise) = (self.modulate_ahead, self.renoise);
        let run = |st: &PlanState| euler_steps(model, st, sigmas, w, ahead, renoise);
        if self.graph && st.samples >= 1 && st.graph.is_none() {
            st.graph = Some(dev.capture(|| run(st))?);
        }
        match &st.graph {
            Some(g) => g.launch()?,
            None => run(st)?,
        }
        st.samples += 1;
        Ok(Tensor::from_vec(dev.download(&st.x)?, noise.shape()))
    }
}

/// `pooled` rounded to bf16, `steps` times over: the step modulations' input.
fn repeated(pooled: &Tensor, steps: usize) -> Vec<bf16> {
    bf16_of(pooled.f32s()).repeat(steps)
}

/// The K-step loop over a plan's buffers: every step's modulations (or, the first way, each
/// step's timestep features copied into the model's input), one model call a step, the guided
/// Euler step on the f32 state (which also writes the model's bf16 input for the next step) —
/// or with `renoise` the Euler step to σ = 0 (`x̂0`) and its noising to the next σ.
/// Device work only: it can be recorded into a graph.
fn euler_steps(
    model: &DeviceMmdit,
    st: &PlanState,
    sigmas: &[f32],
    scale: Option<f32>,
    modulate_ahead: bool,
    renoise: bool,
) -> KernelResult<()> {
    let dev = &model.dev;
    let steps = sigmas.len().saturating_sub(1);
    let per_step = st.inputs.t_features.len();
    let mods = if modulate_ahead && steps > 0 {
        let shape = (steps, st.inputs.batch);
        Some(model.step_modulations(&st.t_features, &st.pooled_steps, shape)?)
    } else {
        None
    };
    let mut noisy = 0;
    for i in 0..steps {
        let v = match &mods {
            Some(m) => model.forward_modulated(&st.inputs, m, i)?.velocity,
            None => {
                let features = st.t_features.view(i * per_step, per_step)?;
                copy(dev, &st.inputs.t_features, &features)?;
                model.forward(&st.inputs, Keep::Nothing)?.velocity
            }
        };
        let (sigma, next) = (sigmas[i], sigmas[i + 1]);
        let dt = if renoise { -sigma } else { next - sigma };
        let guided = scale.is_some();
        euler_cfg_step(
            dev,
            &st.x,
            &st.inputs.x,
            &v,
            guided,
            scale.unwrap_or(1.0),
            dt,
        )?;
        if renoise && next > 0.0 {
            renoise_step(dev, st, i, noisy)?;
            noisy += 1;
        }
    }
    Ok(())
}

/// `x = (1 − σ')·x + σ'·z` on the f32 state (`x̂0` there) with the `noisy`-th step's draws, and
/// the model's bf16 input (both halves when guided) from it.
fn renoise_step(
    dev: &crate::device::kernel::KernelDevice,
    st: &PlanState,
    step: usize,
    noisy: usize,
) -> KernelResult<()> {
    let n = st.x.len();
    let d: usize = st.shapes[0][1..].iter().product();
    let b = n / d.max(1);
    let z = st.step_noise.view(noisy * n, n)?;
    let sigma = st.sigma_next.view(step * b, b)?;
    flow_noise_into(dev, &st.x, None, &st.x, &z, &sigma, (b, d))?;
    for half in 0..st.inputs.x.len() / n.max(1) {
        cast_f32_to_bf16_into(dev, &*st.inputs.x.view(half * n, n)?, &st.x)?;
    }
    Ok(())
}

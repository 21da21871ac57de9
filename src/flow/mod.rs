//! Flow matching basics (MMDIT.md A.6): the shifted sigma schedule and timesteps exactly as the
//! reference scheduler computes them, the Euler step, classifier-free guidance. The few-step
//! schedules and the trainer's use of the ρ-SDE (`sde`) come with the trainer.

pub mod device;
pub mod sample;
pub mod sde;

/// Training timesteps of the reference scheduler (σ·1000 is what the model is fed).
pub const NUM_TRAIN_TIMESTEPS: f64 = 1000.0;

/// `σ' = s·σ / (1 + (s−1)·σ)`.
pub fn shift_sigma(sigma: f64, shift: f64) -> f64 {
    shift * sigma / (1.0 + (shift - 1.0) * sigma)
}

/// The σ that [`shift_sigma`] maps to `sigma`: `σ / (s − (s−1)·σ)`. diffusers'
/// `FlowMatchEulerDiscreteScheduler` shifts the sigmas a pipeline is given, so a schedule of
/// shifted sigmas is handed to it unshifted.
pub fn unshift_sigma(sigma: f64, shift: f64) -> f64 {
    sigma / (shift - (shift - 1.0) * sigma)
}

/// The multi-step (teacher) schedule of diffusers' `FlowMatchEulerDiscreteScheduler` with a
/// constant shift: timesteps linear from σ_max·1000 to σ_min·1000, where σ_min is the *shifted*
/// σ of training step 1, divided by 1000 and shifted again; then a final 0. Returns `n + 1`
/// sigmas. (The double shift of σ_min is the reference's behaviour; at shift 3 and 4 steps it
/// gives 1, 0.8577, 0.6022, 0.0089, 0.)
pub fn reference_sigmas(n: usize, shift: f64) -> Vec<f32> {
    assert!(n >= 1, "a schedule needs at least one step");
    // The reference keeps its training sigmas in f32; σ_min and σ_max are read back from them.
    let train_sigma =
        |t: f64| shift_sigma((t as f32 / NUM_TRAIN_TIMESTEPS as f32) as f64, shift) as f32 as f64;
    let (t_max, t_min) = (
        train_sigma(NUM_TRAIN_TIMESTEPS) * NUM_TRAIN_TIMESTEPS,
        train_sigma(1.0) * NUM_TRAIN_TIMESTEPS,
    );
    let mut sigmas: Vec<f32> = (0..n)
        .map(|i| {
            let t = if n == 1 {
                t_max
            } else {
                t_max + (t_min - t_max) * i as f64 / (n - 1) as f64
            };
            shift_sigma(t / NUM_TRAIN_TIMESTEPS, shift) as f32
        })
        .collect();
    sigmas.push(0.0);
    sigmas
}

/// The timestep an SD3-family MMDiT is called with at noise level σ: `1000·σ` (ALGORITHM.md §7.5
/// invariant 8; Qwen-Image, when it arrives, takes σ itself). Every model call of the sampler and
/// the trainer goes through this one function, and the MMDiT fixtures' golden values test it.
pub fn timestep_of(sigma: f32) -> f32 {
    sigma * NUM_TRAIN_TIMESTEPS as f32
}

/// The model timesteps for the first `n` sigmas of a schedule.
pub fn timesteps(sigmas: &[f32]) -> Vec<f32> {
    sigmas[..sigmas.len() - 1]
        .iter()
        .map(|&s| timestep_of(s))
        .collect()
}

/// Euler ODE step `x + (σ_next − σ)·v`, in place.
pub fn euler_step(x: &mut [f32], v: &[f32], sigma: f32, sigma_next: f32) {
    assert_eq!(x.len(), v.len(), "euler_step: x and v sizes differ");
    let dt = sigma_next - sigma;
    for (x, v) in x.iter_mut().zip(v) {
        *x += dt * v;
    }
}

/// Classifier-free guidance `v_u + w·(v_c − v_u)`.
pub fn cfg(v_cond: &[f32], v_uncond: &[f32], w: f32) -> Vec<f32> {
    assert_eq!(v_cond.len(), v_uncond.len(), "cfg: sizes differ");
    v_cond
        .iter()
        .zip(v_uncond)
        .map(|(c, u)| u + w * (c - u))
        .collect()
}

//! The Euler sampler on a kernel device: the whole K-step loop (model calls, classifier-free
//! guidance, the step) stays on the device; the host only uploads each step's timestep features
//! (`[B, 256]`, a few kB) and reads the final latents back.

use half::bf16;

use crate::device::kernel::KernelResult;
use crate::kernels::sde::dev::euler_cfg_step;
use crate::kernels::shape::concat;
use crate::mmdit::device::{DeviceMmdit, Keep};
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
    let dev = &model.dev;
    let b = noise.shape().first().copied().unwrap_or(0);
    let guided = guidance.is_some();
    let (x_in, pooled_in, ctx_in, w) = match &guidance {
        Some(g) => (
            concat(&[noise, noise], 0),
            concat(&[pooled, g.pooled], 0),
            concat(&[context, g.context], 0),
            g.scale,
        ),
        None => (noise.clone(), pooled.clone(), context.clone(), 1.0),
    };
    let calls = if guided { 2 * b } else { b };
    let t_of = |sigma: f32| vec![crate::flow::timestep_of(sigma); calls];
    let steps = sigmas.len().saturating_sub(1);
    let inputs = model.inputs(&x_in, &t_of(sigmas[0]), &pooled_in, &ctx_in)?;
    let x = dev.upload(noise.f32s())?;
    for i in 0..steps {
        if i > 0 {
            let f = timestep_features(&t_of(sigmas[i]), model.config.freq_dim);
            let host: Vec<bf16> = f.f32s().iter().map(|&v| bf16::from_f32(v)).collect();
            dev.copy_to_device(&host, &inputs.t_features)?;
        }
        let v = model.forward(&inputs, Keep::Nothing)?.velocity;
        euler_cfg_step(dev, &x, &inputs.x, &v, guided, w, sigmas[i + 1] - sigmas[i])?;
    }
    Ok(Tensor::from_vec(dev.download(&x)?, noise.shape()))
}

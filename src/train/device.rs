//! Flow-matching training on a kernel device: the loss of teacher pretraining and of the fake
//! score's update (ALGORITHM.md §4), every op on the device — noising, the bf16 MMDiT, the MSE
//! gradient, the backward — then [`crate::optim::device::DeviceAdamW`].

use half::bf16;

use crate::device::kernel::{KernelError, KernelResult};
use crate::kernels::elementwise::dev::cast_f32_to_bf16_into;
use crate::kernels::sde::dev::{flow_noise, velocity_mse_grad};
use crate::mmdit::device::{DeviceMmdit, Keep};
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

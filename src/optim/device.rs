//! AdamW on a kernel device over flat parameter buffers (a `DeviceMmdit`'s layout: trainable
//! matrices, then other trainable tensors, then frozen ones): global-norm clipping and one fused
//! step through `kernels::optim::dev`, the same arithmetic as [`super::AdamW`] with
//! [`super::clip_grad_norm`]. Only the first `n_trainable` elements are touched.

use half::bf16;

use super::AdamWConfig;
use crate::device::kernel::{DevBuf, KernelDevice, KernelResult};
use crate::kernels::optim::dev::{adamw_step, grad_norm_clip_into, FlatAdamW};
use crate::kernels::optim::AdamWStep;

/// The flat buffers one step updates: f32 masters, their bf16 copy (rewritten from the new
/// masters), the f32 gradients; elements `[0, n_decay)` take weight decay.
pub struct FlatParams<'a> {
    pub master: &'a DevBuf<f32>,
    pub bf16: &'a DevBuf<bf16>,
    pub grads: &'a DevBuf<f32>,
    pub n_decay: usize,
}

pub struct DeviceAdamW {
    pub config: AdamWConfig,
    pub step: u64,
    m: DevBuf<f32>,
    v: DevBuf<f32>,
    /// `[norm, clip factor]` of the last step's gradient, on the device.
    clip: DevBuf<f32>,
}

impl DeviceAdamW {
    /// Zero moments for `n_trainable` elements.
    pub fn new(dev: &KernelDevice, n_trainable: usize, config: AdamWConfig) -> KernelResult<Self> {
        Ok(DeviceAdamW {
            config,
            step: 0,
            m: dev.zeros(n_trainable)?,
            v: dev.zeros(n_trainable)?,
            clip: dev.zeros(2)?,
        })
    }

    /// Clips the gradient to global norm `max_norm` (`≤ 0`: no clipping) and takes one step at
    /// `lr`; no host synchronisation.
    pub fn step(
        &mut self,
        dev: &KernelDevice,
        p: &FlatParams,
        lr: f32,
        max_norm: f32,
    ) -> KernelResult<()> {
        let g = p.grads.view(0, self.m.len())?;
        grad_norm_clip_into(dev, &self.clip, &g, max_norm)?;
        self.update(dev, p, lr, None)
    }

    /// One step with a clip decided elsewhere — `[norm, factor]`, e.g. the joint norm of several
    /// parameter sets clipped together — and, when given, the EMA `(shadow, decay)` of the
    /// trainable elements updated in the same pass.
    pub fn step_with_clip(
        &mut self,
        dev: &KernelDevice,
        p: &FlatParams,
        lr: f32,
        clip: [f32; 2],
        ema: Option<(&DevBuf<f32>, f32)>,
    ) -> KernelResult<()> {
        dev.copy_to_device(&clip, &self.clip)?;
        self.update(dev, p, lr, ema)
    }

    fn update(
        &mut self,
        dev: &KernelDevice,
        p: &FlatParams,
        lr: f32,
        ema: Option<(&DevBuf<f32>, f32)>,
    ) -> KernelResult<()> {
        let n = self.m.len();
        let (w, wb, g) = (
            p.master.view(0, n)?,
            p.bf16.view(0, n)?,
            p.grads.view(0, n)?,
        );
        self.step += 1;
        let c = &self.config;
        let h = AdamWStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            step: self.step,
        };
        let flat = FlatAdamW {
            w: &w,
            w_bf16: Some(&wb),
            m: &self.m,
            v: &self.v,
            g: &g,
            ema,
            n_decay: p.n_decay.min(n),
        };
        adamw_step(dev, &flat, Some(&self.clip), &h)
    }

    /// The last step's gradient norm before clipping (reads it back: a synchronisation).
    pub fn last_grad_norm(&self, dev: &KernelDevice) -> KernelResult<f32> {
        Ok(dev.download(&self.clip)?[0])
    }
}

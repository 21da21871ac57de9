//! AdamW on a kernel device over flat parameter buffers (a `DeviceMmdit`'s layout: trainable
//! matrices, then other trainable tensors, then frozen ones): global-norm clipping and one fused
//! step through `kernels::optim::dev`, the same arithmetic as [`super::AdamW`] with
//! [`super::clip_grad_norm`]. Only the first `n_trainable` elements are touched.

use half::bf16;

use super::AdamWConfig;
use crate::device::kernel::{DevBuf, KernelDevice, KernelResult};
use crate::kernels::optim::dev::{
    adamw_sched, adamw_step_bf16_moments_staged, adamw_step_staged, grad_norm_clip_into, FlatAdamW,
};
use crate::kernels::optim::AdamWStep;

/// The flat buffers one step updates: f32 masters, their bf16 copy (rewritten from the new
/// masters), the f32 gradients; elements `[0, n_decay)` take weight decay.
pub struct FlatParams<'a> {
    pub master: &'a DevBuf<f32>,
    pub bf16: &'a DevBuf<bf16>,
    pub grads: &'a DevBuf<f32>,
    pub n_decay: usize,
}

/// Adam's moments: f32, or bf16 storage with f32 arithmetic and stochastic rounding (half the
/// bytes; docs/memory-plan.md item 3) and the salt that makes its random bits this optimizer's.
enum Moments {
    F32(DevBuf<f32>, DevBuf<f32>),
    Bf16(DevBuf<bf16>, DevBuf<bf16>, u32),
}

pub struct DeviceAdamW {
    pub config: AdamWConfig,
    /// Steps staged so far ([`Self::stage`] counts them): the step the next
    /// [`Self::update_staged`] takes, and the count a checkpoint saves and
    /// [`Self::upload_moments`] restores.
    pub step: u64,
    moments: Moments,
    /// `[norm, clip factor]` of the last [`Self::step`] / [`Self::step_with_clip`], on the device.
    clip: DevBuf<f32>,
    /// The staged step's `[lr, bc1, bc2, seed]` (`kernels::optim::dev::adamw_sched`).
    sched: DevBuf<f32>,
}

impl DeviceAdamW {
    /// Zero moments for `n_trainable` elements.
    pub fn new(dev: &KernelDevice, n_trainable: usize, config: AdamWConfig) -> KernelResult<Self> {
        Ok(DeviceAdamW {
            config,
            step: 0,
            moments: Moments::F32(dev.zeros(n_trainable)?, dev.zeros(n_trainable)?),
            clip: dev.zeros(2)?,
            sched: dev.zeros(4)?,
        })
    }

    /// Zero moments stored in bf16 (2 bytes each instead of 4), stochastically rounded with
    /// random bits drawn from `salt` and the step count.
    pub fn with_bf16_moments(
        dev: &KernelDevice,
        n_trainable: usize,
        config: AdamWConfig,
        salt: u32,
    ) -> KernelResult<Self> {
        Ok(DeviceAdamW {
            config,
            step: 0,
            moments: Moments::Bf16(dev.zeros(n_trainable)?, dev.zeros(n_trainable)?, salt),
            clip: dev.zeros(2)?,
            sched: dev.zeros(4)?,
        })
    }

    /// Elements the optimizer updates.
    pub fn len(&self) -> usize {
        match &self.moments {
            Moments::F32(m, _) => m.len(),
            Moments::Bf16(m, _, _) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The moments `(m, v)` as f32 host vectors (bf16 moments widened exactly).
    pub fn download_moments(&self, dev: &KernelDevice) -> KernelResult<(Vec<f32>, Vec<f32>)> {
        let wide = |b: &DevBuf<bf16>| -> KernelResult<Vec<f32>> {
            Ok(dev.download(b)?.iter().map(|x| x.to_f32()).collect())
        };
        match &self.moments {
            Moments::F32(m, v) => Ok((dev.download(m)?, dev.download(v)?)),
            Moments::Bf16(m, v, _) => Ok((wide(m)?, wide(v)?)),
        }
    }

    /// Replaces the moments (a resumed run's; bf16 moments round to nearest, which keeps values
    /// that came from bf16 exact) and the step count.
    pub fn upload_moments(
        &mut self,
        dev: &KernelDevice,
        m: &[f32],
        v: &[f32],
        step: u64,
    ) -> KernelResult<()> {
        let n = self.len();
        if m.len() != n || v.len() != n {
            return Err(crate::device::kernel::KernelError::Invalid(format!(
                "optimizer moments of {} and {} elements for {n}",
                m.len(),
                v.len()
            )));
        }
        let narrow = |x: &[f32]| -> Vec<bf16> { x.iter().map(|&f| bf16::from_f32(f)).collect() };
        match &self.moments {
            Moments::F32(dm, dv) => {
                dev.copy_to_device(m, dm)?;
                dev.copy_to_device(v, dv)?;
            }
            Moments::Bf16(dm, dv, _) => {
                dev.copy_to_device(&narrow(m), dm)?;
                dev.copy_to_device(&narrow(v), dv)?;
            }
        }
        self.step = step;
        Ok(())
    }

    /// Elements `[offset, offset + len)` of the first moment (`second`: the second), as f32: one
    /// parameter's moments, for a checkpoint streamed tensor by tensor.
    pub fn download_moment_range(
        &self,
        dev: &KernelDevice,
        second: bool,
        offset: usize,
        len: usize,
    ) -> KernelResult<Vec<f32>> {
        match &self.moments {
            Moments::F32(m, v) => dev.download(&*if second { v } else { m }.view(offset, len)?),
            Moments::Bf16(m, v, _) => {
                let b = dev.download(&*if second { v } else { m }.view(offset, len)?)?;
                Ok(b.iter().map(|x| x.to_f32()).collect())
            }
        }
    }

    /// Writes `values` into elements `[offset, offset + len)` of the first moment (`second`: the
    /// second); bf16 moments round to nearest, which keeps values that came from bf16 exact.
    pub fn upload_moment_range(
        &self,
        dev: &KernelDevice,
        second: bool,
        offset: usize,
        values: &[f32],
    ) -> KernelResult<()> {
        let len = values.len();
        match &self.moments {
            Moments::F32(m, v) => {
                dev.copy_to_device(values, &*if second { v } else { m }.view(offset, len)?)
            }
            Moments::Bf16(m, v, _) => {
                let narrow: Vec<bf16> = values.iter().map(|&f| bf16::from_f32(f)).collect();
                dev.copy_to_device(&narrow, &*if second { v } else { m }.view(offset, len)?)
            }
        }
    }

    /// Bytes of optimizer state on the device.
    pub fn state_bytes(&self) -> usize {
        match &self.moments {
            Moments::F32(..) => 8 * self.len(),
            Moments::Bf16(..) => 4 * self.len(),
        }
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
        self.stage(dev, lr)?;
        let g = p.grads.view(0, self.len())?;
        grad_norm_clip_into(dev, &self.clip, &g, max_norm)?;
        self.update_staged(dev, p, &self.clip, None)
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
        self.stage(dev, lr)?;
        dev.copy_to_device(&clip, &self.clip)?;
        self.update_staged(dev, p, &self.clip, ema)
    }

    /// Counts the next step and writes its scalars `[lr, bc1, bc2, seed]` (learning rate, bias
    /// corrections, the bf16 moments' rounding seed) into this optimizer's device buffer for
    /// [`Self::update_staged`]: the host half of a step — a host→device copy, so outside a graph,
    /// before each launch or replay of one that recorded `update_staged`.
    pub fn stage(&mut self, dev: &KernelDevice, lr: f32) -> KernelResult<()> {
        self.step += 1;
        let seed = match &self.moments {
            Moments::F32(..) => 0,
            Moments::Bf16(_, _, salt) => salt ^ (self.step as u32).wrapping_mul(0x9E37_79B9),
        };
        dev.copy_to_device(&adamw_sched(&self.hyper(lr), seed), &self.sched)
    }

    /// The device half of a step: the fused AdamW (and, when given, the EMA `(shadow, decay)` of
    /// the trainable elements) with the scalars [`Self::stage`] wrote and the clip
    /// `[norm, factor]` read from device memory (e.g. `kernels::optim::dev::joint_grad_norm_clip`'s).
    /// Launches only, and changes no host state: a graph can record it, and each replay takes
    /// the step staged before it.
    pub fn update_staged(
        &self,
        dev: &KernelDevice,
        p: &FlatParams,
        clip: &DevBuf<f32>,
        ema: Option<(&DevBuf<f32>, f32)>,
    ) -> KernelResult<()> {
        let n = self.len();
        let (w, wb, g) = (
            p.master.view(0, n)?,
            p.bf16.view(0, n)?,
            p.grads.view(0, n)?,
        );
        let h = self.hyper(0.0);
        let n_decay = p.n_decay.min(n);
        match &self.moments {
            Moments::F32(m, v) => {
                let flat = flat_step(&w, &wb, &g, (m, v), ema, n_decay);
                adamw_step_staged(dev, &flat, Some(clip), &self.sched, &h)
            }
            Moments::Bf16(m, v, _) => {
                let flat = flat_step(&w, &wb, &g, (m, v), ema, n_decay);
                adamw_step_bf16_moments_staged(dev, &flat, Some(clip), &self.sched, &h)
            }
        }
    }

    /// The hyper-parameters of the current step at `lr`.
    fn hyper(&self, lr: f32) -> AdamWStep {
        let c = &self.config;
        AdamWStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            step: self.step,
        }
    }

    /// The gradient norm before clipping of the last [`Self::step`] or [`Self::step_with_clip`]
    /// (reads it back: a synchronisation). After [`Self::update_staged`], the norm is the first
    /// element of the clip buffer it was given.
    pub fn last_grad_norm(&self, dev: &KernelDevice) -> KernelResult<f32> {
        Ok(dev.download(&self.clip)?[0])
    }
}

/// The buffers of one fused step with moments of type `M`.
fn flat_step<'a, M>(
    w: &'a DevBuf<f32>,
    w_bf16: &'a DevBuf<bf16>,
    g: &'a DevBuf<f32>,
    (m, v): (&'a DevBuf<M>, &'a DevBuf<M>),
    ema: Option<(&'a DevBuf<f32>, f32)>,
    n_decay: usize,
) -> FlatAdamW<'a, M> {
    FlatAdamW {
        w,
        w_bf16: Some(w_bf16),
        m,
        v,
        g,
        ema,
        n_decay,
    }
}

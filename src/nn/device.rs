//! Named parameters on a kernel device: one flat buffer each for the f32 masters an optimizer
//! updates, their bf16 copy the kernels read and the f32 gradients a backward accumulates into,
//! with one aligned slot per tensor under its `ParamMap` name. The slots are grouped as the flat
//! AdamW kernel wants them: trainable matrices (weight decay, as `optim::AdamW`) first, then the
//! other trainable tensors, then the frozen ones, which no optimizer step touches. A frozen
//! upload keeps the bf16 copy only.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use half::bf16;

use super::ParamMap;
use crate::device::kernel::{DevBuf, DevView, KernelDevice, KernelError, KernelResult};
use crate::kernels::elementwise::dev as ew;
use crate::tensor::Tensor;

/// Slot alignment in elements: 128 bytes of bf16, so every weight a GEMM or a vector kernel reads
/// starts 16-byte aligned (and cuBLASLt's preferred alignment holds).
const ALIGN: usize = 64;

/// Where one parameter sits in the flat buffers.
#[derive(Clone, Debug)]
pub struct Slot {
    pub offset: usize,
    pub shape: Vec<usize>,
    pub trainable: bool,
}

impl Slot {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

pub struct DeviceParams {
    pub dev: KernelDevice,
    slots: BTreeMap<String, Slot>,
    /// Elements `[0, n_decay)` are trainable matrices, `[n_decay, n_trainable)` the other
    /// trainable tensors; the frozen ones follow.
    pub n_decay: usize,
    pub n_trainable: usize,
    /// f32 master weights (empty for a frozen upload).
    pub master: DevBuf<f32>,
    /// The bf16 copy every kernel reads.
    pub weights: DevBuf<bf16>,
    /// f32 gradients, accumulated until [`DeviceParams::zero_grad`] (empty for a frozen upload);
    /// possibly shared with another model of the same layout ([`Self::share_grads_with`]).
    /// Read through [`Self::grads`].
    grads: Arc<DevBuf<f32>>,
    /// The offsets of the trainable matrices' slots not written since the last `zero_grad`:
    /// their contents are stale, and their first write overwrites (shared with the gradients).
    unwritten: Arc<Mutex<BTreeSet<usize>>>,
}

fn invalid(msg: String) -> KernelError {
    KernelError::Invalid(msg)
}

impl DeviceParams {
    /// Device bytes a trainable upload holds a parameter: f32 master, bf16 copy, f32 gradient.
    pub const TRAINED_BYTES_PER_PARAM: u64 = 10;
    /// Device bytes a frozen upload holds a parameter: the bf16 copy.
    pub const FROZEN_BYTES_PER_PARAM: u64 = 2;

    /// Uploads the current values of `params`: masters, bf16 copy and zero gradients when
    /// `trainable`, else the bf16 copy only (2 bytes a parameter).
    pub fn upload(
        dev: &KernelDevice,
        params: &ParamMap,
        trainable: bool,
    ) -> KernelResult<DeviceParams> {
        let layout = params
            .iter()
            .map(|(name, p)| (name.clone(), p.value().shape().to_vec(), p.trainable()));
        let up = Self::allocate(dev, layout, trainable)?;
        Self::fill(&[&up], |name| KernelResult::Ok(params.param(name).value()))?;
        Ok(up)
    }

    /// Zeroed buffers for the parameters `(name, shape, trained)` in the layout the AdamW kernel
    /// wants: masters, bf16 copy and gradients when `trainable`, else the bf16 copy only. Their
    /// values come next, from [`Self::fill`].
    pub fn allocate(
        dev: &KernelDevice,
        layout: impl IntoIterator<Item = (String, Vec<usize>, bool)>,
        trainable: bool,
    ) -> KernelResult<DeviceParams> {
        let mut tensors: Vec<(String, Vec<usize>, bool)> = layout.into_iter().collect();
        let group = |shape: &[usize], trained: bool| match (trained, shape.len() >= 2) {
            (true, true) => 0,
            (true, false) => 1,
            (false, _) => 2,
        };
        tensors.sort_by_key(|(name, shape, tr)| (group(shape, *tr), name.clone()));
        let mut slots = BTreeMap::new();
        let (mut total, mut n_decay, mut n_trainable) = (0usize, 0usize, 0usize);
        for (name, shape, tr) in tensors {
            let (g, offset) = (group(&shape, tr), total);
            total += shape.iter().product::<usize>().div_ceil(ALIGN) * ALIGN;
            if g == 0 {
                n_decay = total;
            }
            if g <= 1 {
                n_trainable = total;
            }
            let slot = Slot {
                offset,
                shape,
                trainable: tr,
            };
            slots.insert(name, slot);
        }
        let n_decay = n_decay.min(n_trainable);
        let len = total.max(1);
        let (master, weights, grads) = if trainable {
            (
                dev.zeros::<f32>(len)?,
                dev.zeros::<bf16>(len)?,
                dev.zeros::<f32>(len)?,
            )
        } else {
            (dev.alloc(0)?, dev.zeros::<bf16>(len)?, dev.alloc(0)?)
        };
        Ok(DeviceParams {
            dev: dev.clone(),
            slots,
            n_decay,
            n_trainable,
            master,
            weights,
            grads: Arc::new(grads),
            unwritten: Default::default(),
        })
    }

    /// Writes every parameter's value, read from `load` one tensor at a time, into each of
    /// `targets` (allocated for the same names by [`Self::allocate`], trainable or frozen, in
    /// any layout): the host holds one tensor, never a model, and a tensor read once starts
    /// several models (the AdvDMD teacher, generator and fake score). A trainable target's bf16
    /// copy is made from its masters at the end.
    pub fn fill<E: From<KernelError>>(
        targets: &[&DeviceParams],
        mut load: impl FnMut(&str) -> Result<Tensor, E>,
    ) -> Result<(), E> {
        let Some(first) = targets.first() else {
            return Ok(());
        };
        if targets.iter().any(|t| {
            t.slots.len() != first.slots.len()
                || t.slots
                    .iter()
                    .zip(&first.slots)
                    .any(|(a, b)| a.0 != b.0 || a.1.shape != b.1.shape)
        }) {
            return Err(
                invalid("uploads filled together must hold the same parameters".into()).into(),
            );
        }
        for (name, slot) in &first.slots {
            let t = load(name)?;
            if t.shape() != slot.shape.as_slice() {
                return Err(invalid(format!(
                    "parameter `{name}`: {:?}, the model wants {:?}",
                    t.shape(),
                    slot.shape
                ))
                .into());
            }
            let values = t.f32s();
            let narrow = targets
                .iter()
                .any(|t| !t.is_trainable())
                .then(|| crate::device::kernel::bf16_of(values));
            for target in targets {
                let s = &target.slots[name];
                match &narrow {
                    Some(b) if !target.is_trainable() => target
                        .dev
                        .copy_to_device(b, &*target.weights.view(s.offset, s.numel())?)?,
                    _ => target
                        .dev
                        .copy_to_device(values, &*target.master.view(s.offset, s.numel())?)?,
                }
            }
        }
        for target in targets.iter().filter(|t| t.is_trainable()) {
            target.refresh_weights()?;
        }
        Ok(())
    }

    /// Whether there are masters and gradients (a trainable upload).
    pub fn is_trainable(&self) -> bool {
        !self.master.is_empty()
    }

    /// Every parameter's slot, by name.
    pub fn slots(&self) -> &BTreeMap<String, Slot> {
        &self.slots
    }

    pub fn contains(&self, name: &str) -> bool {
        self.slots.contains_key(name)
    }

    pub fn slot(&self, name: &str) -> KernelResult<&Slot> {
        self.slots
            .get(name)
            .ok_or_else(|| invalid(format!("no parameter {name:?}")))
    }

    /// The bf16 weight of `name`.
    pub fn weight(&self, name: &str) -> KernelResult<DevView<'_, bf16>> {
        let s = self.slot(name)?;
        self.weights.view(s.offset, s.numel())
    }

    /// The f32 gradient of `name` to add into (an error for a frozen upload); zeroed first if
    /// nothing wrote it since [`Self::zero_grad`].
    pub fn grad(&self, name: &str) -> KernelResult<DevView<'_, f32>> {
        let (g, first) = self.grad_first_write(name)?;
        if first {
            self.dev.memset_zero(&*g)?;
        }
        Ok(g)
    }

    /// The f32 gradient of `name`, and whether this is its first write since
    /// [`Self::zero_grad`]: then its contents are stale and the caller must write all of it
    /// (a weight-gradient GEMM with β = 0), else add into it.
    pub fn grad_first_write(&self, name: &str) -> KernelResult<(DevView<'_, f32>, bool)> {
        let s = self.slot(name)?;
        let first = self.unwritten().remove(&s.offset);
        Ok((self.grads.view(s.offset, s.numel())?, first))
    }

    fn unwritten(&self) -> std::sync::MutexGuard<'_, BTreeSet<usize>> {
        self.unwritten.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The whole gradient buffer, every slot as the backward passes since [`Self::zero_grad`]
    /// left it (slots none of them wrote are zeroed now): what an optimizer step reads.
    pub fn grads(&self) -> KernelResult<&DevBuf<f32>> {
        let offsets = std::mem::take(&mut *self.unwritten());
        for s in self.slots.values().filter(|s| offsets.contains(&s.offset)) {
            self.dev
                .memset_zero(&*self.grads.view(s.offset, s.numel())?)?;
        }
        Ok(&self.grads)
    }

    /// Gives up this model's gradient buffer for `other`'s: two trained models whose backward
    /// passes never overlap (the AdvDMD generator and fake score) need one between them
    /// (docs/memory-plan.md, item 2; 4 bytes a parameter). Each zeroes it before its backward and
    /// takes its optimizer step before the other's backward starts. Both must be trainable
    /// uploads of the same layout (copies of one configuration).
    pub fn share_grads_with(&mut self, other: &DeviceParams) -> KernelResult<()> {
        let same_layout = self.slots.len() == other.slots.len()
            && self
                .slots
                .iter()
                .zip(&other.slots)
                .all(|((a, x), (b, y))| a == b && x.offset == y.offset && x.shape == y.shape)
            && self.grads.len() == other.grads.len();
        if !self.is_trainable() || !other.is_trainable() || !same_layout {
            return Err(invalid(
                "gradients can be shared only between trainable models of one layout".into(),
            ));
        }
        self.grads = Arc::clone(&other.grads);
        self.unwritten = Arc::clone(&other.unwritten);
        Ok(())
    }

    /// Whether `self` and `other` accumulate into one gradient buffer.
    pub fn shares_grads_with(&self, other: &DeviceParams) -> bool {
        Arc::ptr_eq(&self.grads, &other.grads)
    }

    /// Starts a new gradient: the trainable matrices' slots are marked unwritten (their first
    /// write overwrites: the memset of SD3.5-medium's 9.9 GB of f32 gradients took 2.9 ms of a
    /// 1024 px forward+backward on an H200, and the first accumulating GEMM then read the zeros
    /// back), the other trainable tensors (biases, norms: small) are zeroed.
    pub fn zero_grad(&self) -> KernelResult<()> {
        if !self.is_trainable() {
            return self.dev.memset_zero(&self.grads);
        }
        let rest = self.n_trainable - self.n_decay;
        if rest > 0 {
            self.dev
                .memset_zero(&*self.grads.view(self.n_decay, rest)?)?;
        }
        let mut unwritten = self.unwritten();
        unwritten.clear();
        unwritten.extend(
            self.slots
                .values()
                .filter(|s| s.trainable && s.offset < self.n_decay)
                .map(|s| s.offset),
        );
        Ok(())
    }

    /// The bf16 weights again from the masters (after the masters changed).
    pub fn refresh_weights(&self) -> KernelResult<()> {
        if !self.is_trainable() {
            return Err(invalid(
                "a frozen upload has no masters to refresh from".into(),
            ));
        }
        ew::cast_f32_to_bf16_into(&self.dev, &self.weights, &self.master)
    }

    /// A frozen copy of the current bf16 weights (same layout, no masters, no gradients): a
    /// snapshot that later steps of `self` do not change.
    pub fn frozen_copy(&self) -> KernelResult<DeviceParams> {
        let weights = self.dev.alloc::<bf16>(self.weights.len())?;
        ew::copy(&self.dev, &weights, &self.weights)?;
        Ok(DeviceParams {
            dev: self.dev.clone(),
            slots: self.slots.clone(),
            n_decay: self.n_decay,
            n_trainable: self.n_trainable,
            master: self.dev.alloc(0)?,
            weights,
            grads: Arc::new(self.dev.alloc(0)?),
            unwritten: Default::default(),
        })
    }

    /// The bf16 weights as named f32 tensors (exact: every bf16 value is an f32).
    pub fn download_weights_named(&self) -> KernelResult<Vec<(String, Tensor)>> {
        self.download_named(&ew::cast_bf16_to_f32(&self.dev, &self.weights)?)
    }

    /// Downloads one flat f32 buffer (masters or gradients) as named tensors.
    pub fn download_named(&self, flat: &DevBuf<f32>) -> KernelResult<Vec<(String, Tensor)>> {
        let host = self.dev.download(flat)?;
        Ok(self
            .slots
            .iter()
            .map(|(name, s)| {
                let v = host[s.offset..s.offset + s.numel()].to_vec();
                (name.clone(), Tensor::from_vec(v, &s.shape))
            })
            .collect())
    }
}

//! Building blocks over the ops: a named parameter collection (names follow the checkpoint,
//! ARCHITECTURE.md rule 7) and the small layers every model here shares — linear layers by name,
//! two-layer SiLU embedders, the sinusoidal timestep features.

pub mod device;

use crate::autograd::{Param, Var};
use crate::error::{Error, Result};
use crate::ops::linear;
use crate::tensor::Tensor;
use std::collections::BTreeMap;

/// Where a model's tensors come from, one at a time: an opened checkpoint, a model in memory, a
/// device run's weights. Saving (`mmdit::save_mmdit`) and uploading
/// ([`device::DeviceParams::fill`]) stream from it, so the host holds one tensor, not a model.
pub trait ParamSource {
    /// Parameter `name` (its checkpoint name), f32.
    fn param(&self, name: &str) -> Result<Tensor>;
}

impl ParamSource for ParamMap {
    fn param(&self, name: &str) -> Result<Tensor> {
        self.get(name)
            .map(|p| p.value())
            .ok_or_else(|| Error::Invalid(format!("the model has no parameter `{name}`")))
    }
}

/// Named parameters of a model, in name order.
#[derive(Clone, Default)]
pub struct ParamMap {
    params: BTreeMap<String, Param>,
}

impl ParamMap {
    pub fn new() -> ParamMap {
        ParamMap::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, value: Tensor) -> Param {
        let name = name.into();
        let p = Param::new(name.clone(), value);
        self.params.insert(name, p.clone());
        p
    }

    pub fn get(&self, name: &str) -> Option<&Param> {
        self.params.get(name)
    }

    /// The parameter `name`; a missing one is a bug in the model code (loading validated names).
    pub fn param(&self, name: &str) -> &Param {
        self.params
            .get(name)
            .unwrap_or_else(|| panic!("model has no parameter `{name}`"))
    }

    /// A graph variable for parameter `name`.
    pub fn var(&self, name: &str) -> Var {
        self.param(name).var()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.params.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Param)> {
        self.params.iter()
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.params.values().map(|p| p.value().numel()).sum()
    }

    /// Freezes (false) or unfreezes (true) every parameter.
    pub fn set_trainable(&self, trainable: bool) {
        for p in self.params.values() {
            p.set_trainable(trainable);
        }
    }

    pub fn zero_grad(&self) {
        for p in self.params.values() {
            p.zero_grad();
        }
    }

    /// (name, value) pairs, for saving.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, p)| (n.clone(), p.value()))
            .collect()
    }

    /// A deep copy with fresh parameters holding the same values (for initialising a model from
    /// another, e.g. the generator from the teacher).
    pub fn duplicate(&self) -> ParamMap {
        let mut out = ParamMap::new();
        for (n, p) in &self.params {
            let q = out.insert(n.clone(), p.value());
            q.set_trainable(p.trainable());
        }
        out
    }
}

/// `x·Wᵀ + b` with `{prefix}.weight` and `{prefix}.bias` (the bias is optional in the map).
pub fn linear_named(params: &ParamMap, prefix: &str, x: &Var) -> Var {
    let w = params.var(&format!("{prefix}.weight"));
    let b = params.get(&format!("{prefix}.bias")).map(|p| p.var());
    linear(x, &w, b.as_ref())
}

/// `Linear → SiLU → Linear` with weights `{prefix}.0.*` and `{prefix}.2.*` (SD3's t/y embedders).
pub fn silu_mlp_embedder(params: &ParamMap, prefix: &str, x: &Var) -> Var {
    let h = linear_named(params, &format!("{prefix}.0"), x).silu();
    linear_named(params, &format!("{prefix}.2"), &h)
}

/// Sinusoidal features of timesteps `t [B]`: `[cos(t·f_i), sin(t·f_i)]` (cos first) with
/// `f_i = exp(−ln(10000)·i/half)`, `half = dim/2` (MMDIT.md A.2).
///
/// Computed in f32 step by step as the reference implementations do (they cast t to f32 before
/// the product even in f64 runs): at t ≈ 1000 the f32 rounding of `t·f_i` moves the features by
/// ~1e-5, which an f64 computation would turn into a systematic mismatch.
pub fn timestep_features(t: &[f32], dim: usize) -> Tensor {
    let half = dim / 2;
    let neg_log = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (neg_log * i as f32 / half as f32).exp())
        .collect();
    let mut out = vec![0f32; t.len() * dim];
    for (b, &tb) in t.iter().enumerate() {
        let row = &mut out[b * dim..(b + 1) * dim];
        for (i, &f) in freqs.iter().enumerate() {
            let a = tb * f;
            row[i] = a.cos();
            row[half + i] = a.sin();
        }
    }
    Tensor::from_vec(out, &[t.len(), dim])
}

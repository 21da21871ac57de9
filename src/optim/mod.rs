//! AdamW with decoupled weight decay, global-norm gradient clipping, an exponential moving
//! average of weights, and the learning-rate schedule (linear warm-up, cosine decay). All state is
//! plain tensors keyed by parameter name so a checkpoint can store it and a resumed run continues
//! bit for bit.

pub mod device;

use crate::nn::ParamMap;
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW state: first and second moments per parameter and the step count.
pub struct AdamW {
    pub config: AdamWConfig,
    pub step: u64,
    pub m: BTreeMap<String, Vec<f32>>,
    pub v: BTreeMap<String, Vec<f32>>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> AdamW {
        AdamW {
            config,
            step: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        }
    }

    /// One update of every trainable parameter that has a gradient, at learning rate `lr`.
    /// Weight decay applies to matrices only (not biases, norms or embeddings' 1-D vectors).
    pub fn step(&mut self, params: &[&ParamMap], lr: f32) {
        self.step += 1;
        let c = self.config.clone();
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for map in params {
            for (name, p) in map.iter() {
                let Some(g) = p.grad() else { continue };
                if !p.trainable() {
                    continue;
                }
                let value = p.value();
                let n = value.numel();
                let m = self.m.entry(name.clone()).or_insert_with(|| vec![0.0; n]);
                let v = self.v.entry(name.clone()).or_insert_with(|| vec![0.0; n]);
                let decay = if value.rank() >= 2 {
                    c.weight_decay
                } else {
                    0.0
                };
                let mut w = value.to_vec();
                w.par_chunks_mut(4096)
                    .zip(m.par_chunks_mut(4096))
                    .zip(v.par_chunks_mut(4096))
                    .zip(g.f32s().par_chunks(4096))
                    .for_each(|(((w, m), v), g)| {
                        for i in 0..w.len() {
                            m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
                            v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
                            let update = (m[i] / bc1) / ((v[i] / bc2).sqrt() + c.eps);
                            w[i] -= lr * (update + decay * w[i]);
                        }
                    });
                p.set_value(Tensor::from_vec(w, value.shape()));
            }
        }
    }
}

/// The global L2 norm of all gradients; when it exceeds `max_norm` every gradient is scaled down
/// to that norm. Returns the norm before clipping.
pub fn clip_grad_norm(params: &[&ParamMap], max_norm: f32) -> f32 {
    let mut sq = 0f64;
    for map in params {
        for (_, p) in map.iter() {
            if let Some(g) = p.grad() {
                sq += g
                    .f32s()
                    .iter()
                    .map(|&v| (v as f64) * (v as f64))
                    .sum::<f64>();
            }
        }
    }
    let norm = sq.sqrt() as f32;
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for map in params {
            for (_, p) in map.iter() {
                if let Some(g) = p.grad() {
                    p.zero_grad();
                    p.set_grad(g.map(|v| v * s));
                }
            }
        }
    }
    norm
}

/// An exponential moving average of a model's weights: `ema ← d·ema + (1−d)·w`.
pub struct Ema {
    pub decay: f32,
    pub shadow: ParamMap,
}

impl Ema {
    pub fn new(params: &ParamMap, decay: f32) -> Ema {
        let shadow = params.duplicate();
        shadow.set_trainable(false);
        Ema { decay, shadow }
    }

    pub fn update(&self, params: &ParamMap) {
        let d = self.decay;
        for (name, p) in params.iter() {
            let s = self.shadow.param(name);
            let (sv, pv) = (s.value(), p.value());
            let out: Vec<f32> = sv
                .f32s()
                .iter()
                .zip(pv.f32s())
                .map(|(&a, &b)| d * a + (1.0 - d) * b)
                .collect();
            s.set_value(Tensor::from_vec(out, sv.shape()));
        }
    }
}

/// Linear warm-up over `warmup` steps to `peak`, then cosine decay to `peak·final_fraction` at
/// `total` steps.
pub fn lr_at(step: u64, peak: f32, warmup: u64, total: u64, final_fraction: f32) -> f32 {
    if step < warmup {
        return peak * (step + 1) as f32 / warmup as f32;
    }
    let span = total.saturating_sub(warmup).max(1);
    let t = ((step - warmup) as f32 / span as f32).min(1.0);
    let lo = peak * final_fraction;
    lo + (peak - lo) * 0.5 * (1.0 + (std::f32::consts::PI * t).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_minimises_a_quadratic() {
        let mut params = ParamMap::new();
        let p = params.insert("w", Tensor::from_vec(vec![3.0, -2.0], &[2]));
        let mut opt = AdamW::new(AdamWConfig {
            lr: 0.1,
            ..Default::default()
        });
        for _ in 0..300 {
            params.zero_grad();
            let w = p.var();
            w.mul(&w).sum().backward();
            opt.step(&[&params], 0.1);
        }
        assert!(
            p.value().f32s().iter().all(|v| v.abs() < 1e-2),
            "{:?}",
            p.value().f32s()
        );
    }

    #[test]
    fn first_adam_step_moves_each_weight_by_lr() {
        let mut params = ParamMap::new();
        let p = params.insert("w", Tensor::from_vec(vec![1.0, 1.0], &[2]));
        p.set_grad(Tensor::from_vec(vec![0.5, -4.0], &[2]));
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.step(&[&params], 0.01);
        let w = p.value();
        assert!((w.f32s()[0] - 0.99).abs() < 1e-6 && (w.f32s()[1] - 1.01).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut params = ParamMap::new();
        let p = params.insert("w", Tensor::zeros(&[2]));
        p.set_grad(Tensor::from_vec(vec![3.0, 4.0], &[2]));
        assert_eq!(clip_grad_norm(&[&params], 1.0), 5.0);
        let g = p.grad().unwrap();
        assert!((g.f32s()[0] - 0.6).abs() < 1e-5 && (g.f32s()[1] - 0.8).abs() < 1e-5);
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        assert!((lr_at(0, 1.0, 10, 100, 0.1) - 0.1).abs() < 1e-6);
        assert!((lr_at(9, 1.0, 10, 100, 0.1) - 1.0).abs() < 1e-6);
        assert!((lr_at(100, 1.0, 10, 100, 0.1) - 0.1).abs() < 1e-6);
        assert!(lr_at(50, 1.0, 10, 100, 0.1) < 1.0);
    }
}

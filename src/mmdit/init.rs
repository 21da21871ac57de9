//! Fresh parameters for an MMDiT of any configuration (training from scratch, benchmarks):
//! Xavier-uniform linear and patch weights, zero biases, unit RMSNorm weights, adaLN-Zero
//! (every modulation and the final projection start at zero, so each block starts as the
//! identity), and a fixed 2-D sin-cos position grid.

use super::config::MmditConfig;
use crate::nn::ParamMap;
use crate::tensor::{Rng, Tensor};

fn xavier(shape: &[usize], rng: &mut Rng) -> Tensor {
    let fan_out = shape[0];
    let fan_in: usize = shape[1..].iter().product();
    let bound = (6.0 / (fan_in + fan_out) as f32).sqrt();
    Tensor::rand_uniform(shape, -bound, bound, rng)
}

/// The `[1, P², D]` sin-cos grid: the first half of the channels encodes the column, the second
/// the row, each as `[sin(pos·ω), cos(pos·ω)]` with `ω_i = 10000^(−i/(D/4))`.
pub fn sincos_pos_embed(p: usize, d: usize) -> Tensor {
    let quarter = d / 4;
    let mut out = vec![0f32; p * p * d];
    for r in 0..p {
        for c in 0..p {
            let row = &mut out[(r * p + c) * d..(r * p + c + 1) * d];
            for (half, pos) in [(0, c), (1, r)] {
                for i in 0..quarter {
                    let omega = 1.0 / 10000f64.powf(i as f64 / quarter.max(1) as f64);
                    let a = pos as f64 * omega;
                    row[half * 2 * quarter + i] = a.sin() as f32;
                    row[half * 2 * quarter + quarter + i] = a.cos() as f32;
                }
            }
        }
    }
    Tensor::from_vec(out, &[1, p * p, d])
}

pub fn init_params(config: &MmditConfig, rng: &mut Rng) -> ParamMap {
    let mut params = ParamMap::new();
    for (name, shape) in config.param_shapes() {
        let value = if name == "pos_embed" {
            sincos_pos_embed(config.pos_embed_max_size, config.hidden)
        } else if name.ends_with(".bias")
            || name.contains("adaLN_modulation")
            || name.starts_with("final_layer.linear")
        {
            Tensor::zeros(&shape)
        } else if name.ends_with("ln_q.weight") || name.ends_with("ln_k.weight") {
            Tensor::ones(&shape)
        } else {
            xavier(&shape, rng)
        };
        let p = params.insert(name.clone(), value);
        if name == "pos_embed" {
            p.set_trainable(false);
        }
    }
    params
}

//! The sampling loop every model shares: each sample's noise from its own seed (so results do
//! not depend on batching), Euler or re-noising steps over a schedule, classifier-free guidance.
//! The model comes in as a velocity function; `ShapesModel` and SD3-family checkpoints (with
//! precomputed prompt embeddings) both sample through it.

use crate::error::Result;
use crate::flow::cfg;
use crate::kernels::shape::concat;
use crate::tensor::{Rng, Tensor};

/// How each sampling step moves from σ to σ'.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    /// The Euler ODE step `x + (σ'−σ)·v`.
    Euler,
    /// Re-noising: `x̂0 = x − σ·v`, then `(1−σ')·x̂0 + σ'·ε` with fresh noise.
    Sde,
}

impl Sampler {
    pub fn parse(s: &str) -> Option<Sampler> {
        match s {
            "euler" => Some(Sampler::Euler),
            "sde" => Some(Sampler::Sde),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Sampler::Euler => "euler",
            Sampler::Sde => "sde",
        }
    }
}

/// The seeds of `n` samples asked with `seed`: sample `i` draws from `seed + i` (wrapping),
/// whatever batch it falls in.
pub fn sample_seeds(seed: u64, n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| seed.wrapping_add(i)).collect()
}

/// Each sample's starting noise, `per` standard normals from its own seed, concatenated; and
/// the generators, to draw on from (the re-noising sampler does).
pub fn seeded_noise(seeds: &[u64], per: usize) -> (Vec<Rng>, Vec<f32>) {
    let mut rngs: Vec<Rng> = seeds.iter().map(|&s| Rng::new(s)).collect();
    let x = rngs
        .iter_mut()
        .flat_map(|r| (0..per).map(|_| r.normal()).collect::<Vec<_>>())
        .collect();
    (rngs, x)
}

/// Samples `seeds.len()` images of shape `shape` (one sample's, e.g. `[C, H, W]`) over `sigmas`
/// (ending in 0), sample `i` from noise drawn from `seeds[i]`. `velocity(x, σ)` returns the
/// model's velocity for the rows of `x`: the n samples, or with CFG (`w ≠ 1`) 2n rows — the
/// samples conditioned, then unconditioned. `progress(n)` after every step. Returns
/// `[n, shape...]`.
pub fn sample_flow(
    seeds: &[u64],
    shape: &[usize],
    sigmas: &[f32],
    w: f32,
    sampler: Sampler,
    mut velocity: impl FnMut(&Tensor, f32) -> Result<Tensor>,
    mut progress: impl FnMut(usize),
) -> Result<Tensor> {
    let n = seeds.len();
    let per: usize = shape.iter().product();
    let (mut rngs, mut x) = seeded_noise(seeds, per);
    let full: Vec<usize> = std::iter::once(n).chain(shape.iter().copied()).collect();
    let guided = w != 1.0;
    for step in sigmas.windows(2) {
        let (s, s_next) = (step[0], step[1]);
        let xt = Tensor::from_vec(x.clone(), &full);
        let input = if guided { concat(&[&xt, &xt], 0) } else { xt };
        let v = velocity(&input, s)?;
        let v = if guided {
            let (c, u) = v.f32s().split_at(n * per);
            cfg(c, u, w)
        } else {
            v.to_vec()
        };
        match sampler {
            Sampler::Euler => crate::flow::euler_step(&mut x, &v, s, s_next),
            Sampler::Sde => {
                for (j, (xv, vv)) in x.iter_mut().zip(&v).enumerate() {
                    let x0 = *xv - s * vv;
                    let eps = if s_next > 0.0 {
                        rngs[j / per].normal()
                    } else {
                        0.0
                    };
                    *xv = (1.0 - s_next) * x0 + s_next * eps;
                }
            }
        }
        progress(n);
    }
    Ok(Tensor::from_vec(x, &full))
}

//! The unified SDE rollout of a few-step generator (ALGORITHM.md §3.2): K steps of the ρ-family
//! transition without grad, keeping every state, every x̂0 and the log-probability of every
//! stochastic transition, so DMD, the discriminator and RL all draw on the same trajectories.

use super::shapes_model::{ShapesModel, CHANNELS, RESOLUTION};
use crate::autograd::{no_grad, Var};
use crate::flow::sde::{log_prob, rho_step};
use crate::flow::shift_sigma;
use crate::tensor::{Rng, Tensor};

/// The generator's K-step schedule (§3.3): raw levels `1 − k/K` for k = 0..K−1, shifted, then 0.
/// K = 4 at shift 3 gives 1, 0.9, 0.75, 0.5, 0.
pub fn few_step_sigmas(k: usize, shift: f64) -> Vec<f32> {
    assert!(k >= 1, "a generator needs at least one step");
    let mut s: Vec<f32> = (0..k)
        .map(|i| shift_sigma(1.0 - i as f64 / k as f64, shift) as f32)
        .collect();
    s.push(0.0);
    s
}

/// One batch of trajectories. Sample-major tensors `[N, C, H, W]`.
pub struct Rollout {
    /// `x_0 .. x_K` (K+1 states; `x_0` is pure noise, `x_K` the final sample).
    pub states: Vec<Tensor>,
    /// `x̂0_0 .. x̂0_{K−1}`.
    pub x0: Vec<Tensor>,
    /// `log_probs[k][i]`: ℓ(x_{k+1} | x_k) of sample i, for the K−1 stochastic transitions
    /// (empty when ρ = 0: deterministic steps have no density).
    pub log_probs: Vec<Vec<f64>>,
    pub sigmas: Vec<f32>,
    pub rho: f32,
}

/// Rolls `n` samples (token ids `[n, L]`) through `sigmas` with the ρ-family transition; all
/// noise comes from `rng` (first the start noise, then each step's z, sample by sample).
pub fn rollout_sde(
    model: &ShapesModel,
    ids: &[u32],
    n: usize,
    sigmas: &[f32],
    rho: f32,
    rng: &mut Rng,
) -> Rollout {
    let _ng = no_grad();
    let shape = [n, CHANNELS, RESOLUTION, RESOLUTION];
    let per: usize = shape[1..].iter().product();
    let k = sigmas.len() - 1;
    let mut x = Tensor::randn(&shape, rng);
    let (mut states, mut x0s, mut log_probs) = (vec![x.clone()], Vec::new(), Vec::new());
    for step in 0..k {
        let (s, s_next) = (sigmas[step], sigmas[step + 1]);
        let v = model.velocity(&Var::constant(x.clone()), &vec![s; n], ids);
        let z: Vec<f32> = if s_next > 0.0 && rho > 0.0 {
            (0..n * per).map(|_| rng.normal()).collect()
        } else {
            vec![0.0; n * per]
        };
        let (mut next, mut x0, mut lp) = (
            Vec::with_capacity(n * per),
            Vec::with_capacity(n * per),
            Vec::new(),
        );
        for i in 0..n {
            let r = i * per..(i + 1) * per;
            let t = rho_step(
                &x.f32s()[r.clone()],
                &v.value().f32s()[r.clone()],
                s,
                s_next,
                rho,
                &z[r.clone()],
            );
            x0.extend(
                x.f32s()[r.clone()]
                    .iter()
                    .zip(&v.value().f32s()[r])
                    .map(|(a, b)| a - s * b),
            );
            if t.std > 0.0 {
                lp.push(log_prob(&t.next, &t.mean, t.std));
            }
            next.extend(t.next);
        }
        if !lp.is_empty() {
            log_probs.push(lp);
        }
        x0s.push(Tensor::from_vec(x0, &shape));
        x = Tensor::from_vec(next, &shape);
        states.push(x.clone());
    }
    Rollout {
        states,
        x0: x0s,
        log_probs,
        sigmas: sigmas.to_vec(),
        rho,
    }
}

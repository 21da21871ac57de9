//! The AdvDMD loss pieces (ALGORITHM.md §4). Plain arithmetic on rollout data: the DMD gradient
//! with its per-sample normaliser, returns-to-go, group-normalised advantages and the clipped
//! policy objective with its gradient (per sample on flat slices; the trainer seeds the gradients
//! they return into the generator's backward). Differentiable ones on the tape: the fake score's
//! flow-matching loss and the two GAN losses.

use super::shapes_model::ShapesModel;
use crate::autograd::Var;
use crate::tensor::{Rng, Tensor};

/// The DMD gradient `g = (x̂0_fake − x̂0_real) / mean_d |x − x̂0_real|` of one sample (§4.1), with
/// non-finite entries replaced by 0 (`nan_to_num`). Descending `g` moves `x` toward the teacher's
/// denoise and away from the fake score's.
pub fn dmd_gradient(x: &[f32], x0_real: &[f32], x0_fake: &[f32]) -> Vec<f32> {
    assert!(
        x.len() == x0_real.len() && x.len() == x0_fake.len(),
        "dmd_gradient: sizes differ"
    );
    let norm = x
        .iter()
        .zip(x0_real)
        .map(|(a, r)| (*a as f64 - *r as f64).abs())
        .sum::<f64>()
        / x.len().max(1) as f64;
    x0_fake
        .iter()
        .zip(x0_real)
        .map(|(f, r)| {
            let g = ((*f as f64 - *r as f64) / norm) as f32;
            if g.is_finite() {
                g
            } else {
                0.0
            }
        })
        .collect()
}

/// Returns-to-go `R_k = Σ_{j>k} r_j` for the `K−1` stochastic transitions of one rollout whose
/// per-state rewards are `r_1..r_K` (`rewards[j−1] = r_j`).
pub fn returns_to_go(rewards: &[f32]) -> Vec<f32> {
    let k = rewards.len();
    (0..k.saturating_sub(1))
        .map(|t| rewards[t..].iter().map(|&r| r as f64).sum::<f64>() as f32)
        .collect()
}

/// Group-normalised advantages: `values` holds `groups × group_size` entries, each group the same
/// prompt; `A = (v − mean)/(std + 1e-4)` within the group (population std), clamped to ±`clip`.
pub fn group_advantages(values: &[f32], group_size: usize, clip: f32) -> Vec<f32> {
    assert!(
        group_size > 0 && values.len() % group_size == 0,
        "group_advantages: {} values in groups of {group_size}",
        values.len()
    );
    values
        .chunks(group_size)
        .flat_map(|g| {
            let n = g.len() as f64;
            let mean = g.iter().map(|&v| v as f64).sum::<f64>() / n;
            let std = (g.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            g.iter()
                .map(move |&v| (((v as f64 - mean) / (std + 1e-4)) as f32).clamp(-clip, clip))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The clipped policy objective `mean_i max(−A_i·r_i, −A_i·clip(r_i, 1−ε, 1+ε))` with
/// `r_i = exp(ℓ_i − ℓ_old,i)`, and its gradient with respect to each `ℓ_i`: `−A_i·r_i/N` where
/// the unclipped branch is the max, 0 where the clipped (constant) branch is.
pub fn ppo_loss(logp: &[f64], logp_old: &[f64], adv: &[f32], eps: f64) -> (f64, Vec<f64>) {
    assert!(
        logp.len() == logp_old.len() && logp.len() == adv.len(),
        "ppo_loss: sizes differ"
    );
    let n = logp.len().max(1) as f64;
    let mut loss = 0.0;
    let grad = logp
        .iter()
        .zip(logp_old)
        .zip(adv)
        .map(|((l, lo), &a)| {
            let a = a as f64;
            let r = (l - lo).exp();
            let unclipped = -a * r;
            let clipped = -a * r.clamp(1.0 - eps, 1.0 + eps);
            loss += unclipped.max(clipped) / n;
            if unclipped >= clipped {
                -a * r / n
            } else {
                0.0
            }
        })
        .collect();
    (loss, grad)
}

/// The fake score's loss on detached generator samples `x0 [B, C, H, W]` (§4.2): velocity MSE at
/// σ ~ logit-normal(0, 1), `x_σ = (1−σ)·x0 + σ·n`, target `n − x0`.
pub fn fake_score_loss(fake: &ShapesModel, x0: &Tensor, ids: &[u32], rng: &mut Rng) -> Var {
    let b = x0.shape()[0];
    let per = x0.numel() / b.max(1);
    let sigma: Vec<f32> = (0..b)
        .map(|_| crate::kernels::elementwise::sigmoid(rng.normal()))
        .collect();
    let noise: Vec<f32> = (0..x0.numel()).map(|_| rng.normal()).collect();
    let xs = x0.f32s();
    let noisy: Vec<f32> = (0..xs.len())
        .map(|i| (1.0 - sigma[i / per]) * xs[i] + sigma[i / per] * noise[i])
        .collect();
    let target: Vec<f32> = (0..xs.len()).map(|i| noise[i] - xs[i]).collect();
    let v = fake.velocity(
        &Var::constant(Tensor::from_vec(noisy, x0.shape())),
        &sigma,
        ids,
    );
    v.mse(&Var::constant(Tensor::from_vec(target, x0.shape())))
}

/// The discriminator's non-saturating loss (§4.3): `mean softplus(D(fake)) + mean softplus(−D(real))`.
pub fn discriminator_loss(logits_fake: &Var, logits_real: &Var) -> Var {
    logits_fake
        .softplus()
        .mean()
        .add(&logits_real.scale(-1.0).softplus().mean())
}

/// The generator's GAN term (§4.4): `mean softplus(−D(x̃))`.
pub fn generator_gan_loss(logits: &Var) -> Var {
    logits.scale(-1.0).softplus().mean()
}

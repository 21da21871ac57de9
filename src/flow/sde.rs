//! The ρ-family transition of the unified SDE rollout (ALGORITHM.md §3.1): one formula from the
//! Euler ODE step (ρ = 0) to DMD2's re-noising (ρ = 1), with the exact Gaussian log-probability of
//! a transition (mean-reduced over the D elements) and its gradient with respect to the velocity.
//! All math in f32 storage with f64 reductions, per sample.

/// The clean and noise estimates implied by a velocity: `x̂0 = x − σ·v`, `ε̂ = x + (1−σ)·v`.
pub fn x0_eps(x: &[f32], v: &[f32], sigma: f32) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), v.len(), "x0_eps: sizes differ");
    let x0 = x.iter().zip(v).map(|(x, v)| x - sigma * v).collect();
    let eps = x
        .iter()
        .zip(v)
        .map(|(x, v)| x + (1.0 - sigma) * v)
        .collect();
    (x0, eps)
}

/// One transition from σ to σ' of one sample.
#[derive(Clone, Debug)]
pub struct Transition {
    /// `x_{k+1}` (= x̂0 when σ' = 0).
    pub next: Vec<f32>,
    /// The Gaussian's mean `μ = (1−σ')·x̂0 + σ'·sqrt(1−ρ²)·ε̂`.
    pub mean: Vec<f32>,
    /// Its isotropic standard deviation `s = σ'·ρ` (0 on a deterministic step).
    pub std: f32,
}

/// `x_{k+1} = μ + s·z`. With σ' = 0 the step returns x̂0 (deterministic), whatever ρ.
pub fn rho_step(
    x: &[f32],
    v: &[f32],
    sigma: f32,
    sigma_next: f32,
    rho: f32,
    z: &[f32],
) -> Transition {
    let (x0, eps) = x0_eps(x, v, sigma);
    if sigma_next <= 0.0 {
        return Transition {
            next: x0.clone(),
            mean: x0,
            std: 0.0,
        };
    }
    let keep = sigma_next * (1.0 - rho * rho).max(0.0).sqrt();
    let mean: Vec<f32> = x0
        .iter()
        .zip(&eps)
        .map(|(a, e)| (1.0 - sigma_next) * a + keep * e)
        .collect();
    let std = sigma_next * rho;
    assert_eq!(z.len(), x.len(), "rho_step: noise size");
    let next = mean.iter().zip(z).map(|(m, z)| m + std * z).collect();
    Transition { next, mean, std }
}

/// `(1/D)·Σ_d [−(x'_d − μ_d)²/(2s²) − log s − ½ log 2π]`; needs `s > 0`.
pub fn log_prob(next: &[f32], mean: &[f32], std: f32) -> f64 {
    assert!(std > 0.0, "log_prob of a deterministic transition");
    let s = std as f64;
    let d = next.len() as f64;
    let sq: f64 = next
        .iter()
        .zip(mean)
        .map(|(a, m)| (*a as f64 - *m as f64).powi(2))
        .sum();
    -sq / (2.0 * s * s * d) - s.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
}

/// `∂μ/∂v̂ = σ'·sqrt(1−ρ²)·(1−σ) − σ·(1−σ')`, the same scalar for every element.
pub fn mean_velocity_coefficient(sigma: f32, sigma_next: f32, rho: f32) -> f32 {
    sigma_next * (1.0 - rho * rho).max(0.0).sqrt() * (1.0 - sigma) - sigma * (1.0 - sigma_next)
}

/// `∂ℓ/∂v̂ = c·(x' − μ)/(D·s²)` with `x'` held fixed (the policy-gradient direction).
pub fn log_prob_grad_v(
    next: &[f32],
    mean: &[f32],
    std: f32,
    sigma: f32,
    sigma_next: f32,
    rho: f32,
) -> Vec<f32> {
    let c = mean_velocity_coefficient(sigma, sigma_next, rho) as f64;
    let scale = c / (next.len() as f64 * (std as f64).powi(2));
    next.iter()
        .zip(mean)
        .map(|(a, m)| (scale * (*a as f64 - *m as f64)) as f32)
        .collect()
}

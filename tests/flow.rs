//! The ρ-family transition (ALGORITHM.md §3.1) and its invariants (§7.5 items 1–3).

use advdmd::flow::euler_step;
use advdmd::flow::sde::{log_prob, log_prob_grad_v, mean_velocity_coefficient, rho_step, x0_eps};
use advdmd::Rng;

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

#[test]
fn x0_eps_v_round_trip() {
    let (x, v) = (randn(97, 1), randn(97, 2));
    for sigma in [0.05f32, 0.5, 0.9, 1.0] {
        let (x0, eps) = x0_eps(&x, &v, sigma);
        for i in 0..x.len() {
            // x_σ = (1−σ)·x̂0 + σ·ε̂ and v = ε̂ − x̂0.
            let xs = (1.0 - sigma as f64) * x0[i] as f64 + sigma as f64 * eps[i] as f64;
            assert!(
                (xs - x[i] as f64).abs() < 1e-5,
                "x reconstruct at σ={sigma}"
            );
            assert!(
                ((eps[i] - x0[i]) - v[i]).abs() < 1e-5,
                "v reconstruct at σ={sigma}"
            );
        }
    }
}

#[test]
fn rho_zero_is_euler_and_rho_one_is_renoising() {
    let (x, v, z) = (randn(64, 3), randn(64, 4), randn(64, 5));
    let (s, sn) = (0.9f32, 0.75f32);
    let t = rho_step(&x, &v, s, sn, 0.0, &z);
    let mut euler = x.clone();
    euler_step(&mut euler, &v, s, sn);
    for (a, b) in t.next.iter().zip(&euler) {
        assert!((a - b).abs() < 1e-5, "ρ=0 differs from Euler: {a} vs {b}");
    }
    let t = rho_step(&x, &v, s, sn, 1.0, &z);
    let (x0, _) = x0_eps(&x, &v, s);
    for i in 0..x.len() {
        let want = (1.0 - sn) * x0[i] + sn * z[i];
        assert!((t.next[i] - want).abs() < 1e-5);
    }
    assert_eq!(t.std, sn);
    // The last step (σ' = 0) returns x̂0 deterministically.
    let t = rho_step(&x, &v, 0.5, 0.0, 0.98, &z);
    assert_eq!(t.next, x0_eps(&x, &v, 0.5).0);
    assert_eq!(t.std, 0.0);
}

#[test]
fn log_prob_matches_the_gaussian_density() {
    let (x, v, z) = (randn(50, 6), randn(50, 7), randn(50, 8));
    let rho = (0.9f32 * std::f32::consts::FRAC_PI_2).sin();
    let t = rho_step(&x, &v, 0.9, 0.75, rho, &z);
    let s = t.std as f64;
    let direct: f64 = t
        .next
        .iter()
        .zip(&t.mean)
        .map(|(a, m)| {
            let d = *a as f64 - *m as f64;
            (-(d * d) / (2.0 * s * s)).exp().ln() - (s * (2.0 * std::f64::consts::PI).sqrt()).ln()
        })
        .sum::<f64>()
        / 50.0;
    assert!((log_prob(&t.next, &t.mean, t.std) - direct).abs() < 1e-9);
}

#[test]
fn log_prob_grad_v_matches_finite_differences() {
    let (x, v, z) = (randn(40, 9), randn(40, 10), randn(40, 11));
    let rho = 0.9877f32;
    let (s, sn) = (0.9f32, 0.75f32);
    let t = rho_step(&x, &v, s, sn, rho, &z);
    let analytic = log_prob_grad_v(&t.next, &t.mean, t.std, s, sn, rho);
    // ℓ(v) with x' held fixed: perturb v, recompute μ.
    let ell = |v: &[f32]| {
        let m = rho_step(&x, v, s, sn, rho, &z).mean;
        log_prob(&t.next, &m, t.std)
    };
    let h = 1e-2f32;
    for i in [0usize, 7, 39] {
        let (mut vp, mut vm) = (v.clone(), v.clone());
        vp[i] += h;
        vm[i] -= h;
        let fd = (ell(&vp) - ell(&vm)) / (2.0 * h as f64);
        assert!(
            (fd - analytic[i] as f64).abs() <= 1e-3 * analytic[i].abs().max(1e-3) as f64 + 1e-6,
            "entry {i}: finite difference {fd} vs analytic {}",
            analytic[i]
        );
    }
    // For ρ = 1 the coefficient is −σ(1−σ').
    assert!((mean_velocity_coefficient(0.9, 0.75, 1.0) + 0.9 * 0.25).abs() < 1e-7);
}

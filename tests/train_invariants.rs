//! ALGORITHM.md §7.5 invariants 4–7 on the loss pieces (1–3 are in tests/flow.rs), and 8's
//! plumbing half (its golden-value half is in tests/mmdit_parity.rs).

mod common;

use advdmd::autograd::{backward, Var};
use advdmd::train::losses::{dmd_gradient, group_advantages, ppo_loss, returns_to_go};
use advdmd::{Rng, Tensor};

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

/// E[x0 | x_τ] for x ~ N(μ, 1) noised as x_τ = (1−σ)x + σn.
fn gaussian_denoise(x_tau: f32, mu: f32, sigma: f32) -> f32 {
    let a = 1.0 - sigma;
    mu + a * (x_tau - a * mu) / (a * a + sigma * sigma)
}

#[test]
fn dmd_gradient_vanishes_when_fake_equals_teacher() {
    let (x, x0) = (randn(64, 1), randn(64, 2));
    assert!(dmd_gradient(&x, &x0, &x0).iter().all(|&g| g == 0.0));
    // Non-finite entries (zero normaliser) become 0, not NaN.
    assert!(dmd_gradient(&x0, &x0, &x).iter().all(|g| g.is_finite()));
}

#[test]
fn dmd_gradient_moves_the_generator_toward_the_teacher_on_a_gaussian_toy() {
    // Teacher N(2, 1); generator (and the fake score tracking it) N(μ_G, 1).
    let mut rng = Rng::new(3);
    for mu_g in [-1.0f32, 0.5, 3.5] {
        let mut mean_g = 0f64;
        for _ in 0..2000 {
            let x = mu_g + rng.normal();
            let sigma = 0.2 + 0.6 * rng.uniform();
            let x_tau = (1.0 - sigma) * x + sigma * rng.normal();
            let g = dmd_gradient(
                &[x],
                &[gaussian_denoise(x_tau, 2.0, sigma)],
                &[gaussian_denoise(x_tau, mu_g, sigma)],
            );
            mean_g += g[0] as f64 / 2000.0;
        }
        // Descent x ← x − η·g must move the mean toward 2.
        assert!(
            (-mean_g) * (2.0 - mu_g as f64) > 0.0,
            "μ_G = {mu_g}: mean g = {mean_g}"
        );
    }
}

#[test]
fn detached_target_mse_gradient_equals_g_over_bd() {
    let (b, d) = (3, 10);
    let x = Tensor::from_vec(randn(b * d, 4), &[b, d]);
    let g = Tensor::from_vec(randn(b * d, 5), &[b, d]);
    let xv = Var::input(x.clone());
    // L = 0.5·mean((x − sg(x − g))²)
    let target = Var::constant(Tensor::from_vec(
        x.f32s().iter().zip(g.f32s()).map(|(a, b)| a - b).collect(),
        &[b, d],
    ));
    let loss = xv.mse(&target).scale(0.5);
    let grads = backward(&[(&loss, Tensor::scalar(1.0))]);
    for (got, want) in grads.get(&xv).unwrap().f32s().iter().zip(g.f32s()) {
        assert!((got - want / (b * d) as f32).abs() < 1e-6);
    }
}

#[test]
fn ppo_gradient_at_ratio_one_and_in_the_clipped_branch() {
    let adv = [1.5f32, -0.5, 2.0, -1.0];
    let old = [-1.0f64, -2.0, 0.5, 0.0];
    // ℓ = ℓ_old: the gradient is −A/N (= −mean(A·∇ℓ) with ∇ℓ the unit direction).
    let (_, grad) = ppo_loss(&old, &old, &adv, 1e-4);
    for (g, a) in grad.iter().zip(adv) {
        assert!((g + a as f64 / 4.0).abs() < 1e-12);
    }
    // Ratio above 1+ε with A > 0, and below 1−ε with A < 0: the clipped branch is the max → 0.
    let new = [old[0] + 0.01, old[1] - 0.01, old[2] + 0.01, old[3] - 0.01];
    let (_, grad) = ppo_loss(&new, &old, &adv, 1e-4);
    assert!(grad.iter().all(|&g| g == 0.0), "{grad:?}");
    // Outside the band on the other side the unclipped branch stays active.
    let new = [old[0] - 0.01, old[1] + 0.01, old[2] - 0.01, old[3] + 0.01];
    let (_, grad) = ppo_loss(&new, &old, &adv, 1e-4);
    assert!(grad.iter().all(|&g| g != 0.0), "{grad:?}");
}

#[test]
fn group_advantages_have_zero_mean_and_unit_std_per_group() {
    let values = randn(8 * 6, 6);
    let adv = group_advantages(&values, 8, 5.0);
    for g in adv.chunks(8) {
        let mean = g.iter().map(|&v| v as f64).sum::<f64>() / 8.0;
        let std = (g.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 8.0).sqrt();
        assert!(mean.abs() < 1e-6, "mean {mean}");
        assert!((std - 1.0).abs() < 1e-3, "std {std}");
    }
    // A constant group gives zero advantages; clipping bounds outliers.
    assert!(group_advantages(&[3.0; 4], 4, 5.0)
        .iter()
        .all(|&a| a == 0.0));
    let mut outlier = vec![0.0f32; 40];
    outlier[39] = 100.0;
    let out = group_advantages(&outlier, 40, 5.0);
    assert_eq!(out[39], 5.0);
}

#[test]
fn returns_to_go_sum_the_later_rewards() {
    // Rewards r_1..r_4 of a 4-step rollout: transitions 0..2 get Σ_{j>k} r_j.
    assert_eq!(returns_to_go(&[1.0, 2.0, 3.0, 4.0]), vec![10.0, 9.0, 7.0]);
    assert_eq!(returns_to_go(&[5.0, -1.0]), vec![4.0]);
}

#[test]
fn gan_losses_match_their_formulas_and_fake_score_trains() {
    use advdmd::data::shapes::sample_batch;
    use advdmd::optim::{AdamW, AdamWConfig};
    use advdmd::train::losses::{discriminator_loss, fake_score_loss, generator_gan_loss};
    let f = Var::constant(Tensor::from_vec(vec![0.5, -1.0], &[2]));
    let r = Var::constant(Tensor::from_vec(vec![2.0, 0.0], &[2]));
    let sp = |x: f64| (1.0 + x.exp()).ln();
    let want_d = (sp(0.5) + sp(-1.0)) / 2.0 + (sp(-2.0) + sp(0.0)) / 2.0;
    assert!((discriminator_loss(&f, &r).value().item() as f64 - want_d).abs() < 1e-6);
    let want_g = (sp(-0.5) + sp(1.0)) / 2.0;
    assert!((generator_gan_loss(&f).value().item() as f64 - want_g).abs() < 1e-6);

    // The fake score starts as a copy of a (tiny) teacher and its loss falls on a fixed batch.
    let teacher = common::tiny_shapes_model(2, false);
    let fake = teacher.copy_transformer();
    assert_eq!(
        fake.mmdit
            .params
            .param("final_layer.linear.weight")
            .value()
            .f32s(),
        teacher
            .mmdit
            .params
            .param("final_layer.linear.weight")
            .value()
            .f32s()
    );
    let (prompts, x0) = sample_batch(16, &mut Rng::new(3));
    let ids = fake.tokenizer.encode_batch(&prompts).unwrap();
    fake.text.params.set_trainable(false);
    let mut opt = AdamW::new(AdamWConfig::default());
    let mut losses = Vec::new();
    for _ in 0..15 {
        fake.mmdit.params.zero_grad();
        let loss = fake_score_loss(&fake, &x0, &ids, &mut Rng::new(4));
        losses.push(loss.value().item());
        loss.backward();
        opt.step(&[&fake.mmdit.params], 3e-3);
    }
    assert!(losses[14] < 0.8 * losses[0], "fake-score loss {:?}", losses);
    // Training the copy leaves the teacher untouched; the text encoder is shared and frozen.
    assert!(teacher.mmdit.params.iter().all(|(_, p)| p.grad().is_none()));
    assert!(fake.text.params.iter().all(|(_, p)| p.grad().is_none()));
    assert_ne!(
        fake.mmdit
            .params
            .param("final_layer.linear.weight")
            .value()
            .f32s(),
        teacher
            .mmdit
            .params
            .param("final_layer.linear.weight")
            .value()
            .f32s()
    );
}

/// Invariant 8: the trainer calls the MMDiT with `flow::timestep_of(σ)` (= 1000σ for SD3), the map
/// tests/mmdit_parity.rs holds to the reference implementation's golden timesteps and outputs.
#[test]
fn the_trainer_calls_the_mmdit_with_the_golden_timestep_map() {
    use advdmd::mmdit::MmditInputs;
    let model = common::tiny_shapes_model(3, true);
    let ids = model
        .tokenizer
        .encode_batch(&["a red circle".to_string(), String::new()])
        .unwrap();
    let sigma = [0.7f32, 0.05];
    let x = Var::constant(Tensor::from_vec(randn(2 * 3 * 16 * 16, 5), &[2, 3, 16, 16]));
    let via_trainer = model.velocity(&x, &sigma, &ids);
    let (context, pooled) = model.text.forward(&ids);
    let t = sigma.map(advdmd::flow::timestep_of);
    assert!(
        (t[0] - 700.0).abs() < 1e-3 && (t[1] - 50.0).abs() < 1e-4,
        "{t:?}"
    );
    let direct = model.mmdit.forward(&MmditInputs {
        x: &x,
        timestep: &t,
        pooled: &pooled,
        context: &context,
    });
    assert_eq!(via_trainer.value().f32s(), direct.value().f32s());
}

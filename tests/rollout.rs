//! The unified SDE rollout on a tiny Shapes model: the schedule, ρ = 0 equals the Euler ODE,
//! ρ = 1 re-noises the clean prediction, log-probabilities are those of the drawn noise.

mod common;

use advdmd::autograd::{no_grad, Var};
use advdmd::flow::euler_step;
use advdmd::train::rollout::{few_step_sigmas, rollout_sde};
use advdmd::train::shapes_model::ShapesModel;
use advdmd::{Rng, Tensor};

fn tiny() -> ShapesModel {
    common::tiny_shapes_model(1, true)
}

#[test]
fn few_step_schedule_matches_the_reference_table() {
    let s = few_step_sigmas(4, 3.0);
    let want = [1.0, 0.9, 0.75, 0.5, 0.0];
    for (a, b) in s.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{s:?}");
    }
    assert_eq!(few_step_sigmas(2, 3.0), vec![1.0, 0.75, 0.0]);
}

#[test]
fn rho_zero_rollout_is_the_euler_ode() {
    let m = tiny();
    let ids = m
        .tokenizer
        .encode_batch(&["a red circle".into(), "two blue squares".into()])
        .unwrap();
    let sig = few_step_sigmas(4, 3.0);
    let r = rollout_sde(&m, &ids, 2, &sig, 0.0, &mut Rng::new(9));
    assert_eq!(r.states.len(), 5);
    assert_eq!(r.x0.len(), 4);
    assert!(r.log_probs.is_empty());
    // The same start noise through plain Euler steps.
    let _ng = no_grad();
    let mut x = Tensor::randn(&[2, 3, 16, 16], &mut Rng::new(9)).to_vec();
    for k in 0..4 {
        let v = m.velocity(
            &Var::constant(Tensor::from_vec(x.clone(), &[2, 3, 16, 16])),
            &[sig[k]; 2],
            &ids,
        );
        euler_step(&mut x, v.value().f32s(), sig[k], sig[k + 1]);
    }
    let fin = r.states[4].f32s();
    for (a, b) in fin.iter().zip(&x) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    // The last step lands on x̂0 of the last state.
    assert_eq!(r.states[4].f32s(), r.x0[3].f32s());
}

#[test]
fn rho_one_renoises_and_log_probs_are_those_of_the_noise() {
    let m = tiny();
    let ids = m
        .tokenizer
        .encode_batch(&vec!["a green triangle".to_string(); 3])
        .unwrap();
    let sig = few_step_sigmas(4, 3.0);
    let r = rollout_sde(&m, &ids, 3, &sig, 1.0, &mut Rng::new(4));
    assert_eq!(r.log_probs.len(), 3);
    assert!(r
        .log_probs
        .iter()
        .all(|l| l.len() == 3 && l.iter().all(|v| v.is_finite())));
    // x_{k+1} = (1−σ')·x̂0_k + σ'·z, so z = (x_{k+1} − (1−σ')x̂0_k)/σ' and
    // ℓ = mean(−z²/2) − log σ' − ½ log 2π.
    for k in 0..3 {
        let sn = sig[k + 1] as f64;
        for i in 0..3 {
            let per = 3 * 16 * 16;
            let (xn, x0) = (
                &r.states[k + 1].f32s()[i * per..(i + 1) * per],
                &r.x0[k].f32s()[i * per..(i + 1) * per],
            );
            let mean_sq: f64 = xn
                .iter()
                .zip(x0)
                .map(|(a, b)| ((*a as f64 - (1.0 - sn) * *b as f64) / sn).powi(2))
                .sum::<f64>()
                / per as f64;
            let want = -mean_sq / 2.0 - sn.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln();
            assert!(
                (r.log_probs[k][i] - want).abs() < 1e-4,
                "step {k} sample {i}: {} vs {want}",
                r.log_probs[k][i]
            );
        }
    }
    // Deterministic per seed.
    let again = rollout_sde(&m, &ids, 3, &sig, 1.0, &mut Rng::new(4));
    assert_eq!(again.states[4].f32s(), r.states[4].f32s());
}

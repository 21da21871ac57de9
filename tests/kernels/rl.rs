//! cuda/rl.cu ↔ src/kernels/rl.rs, and src/kernels/rl.rs ↔ the functions it mirrors
//! (src/train/losses.rs).

use super::*;
use advdmd::kernels::rl::{self as cpu, dev as gpu};
use advdmd::train::losses;

fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * std).collect()
}

/// Bit for bit (the sign of zero included), any NaN matching any NaN (payloads differ by device).
fn same_bits(got: &[f32], want: &[f32]) -> bool {
    got.len() == want.len()
        && got
            .iter()
            .zip(want)
            .all(|(g, w)| g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()))
}

#[test]
fn logit_grads_match_cpu() {
    for dev in devices() {
        let mut rng = Rng::new(1);
        for n in [0, 1, 7, 300, 1000] {
            // beyond ±30 too: both sigmoid branches saturate without overflow
            let l = randn(&mut rng, n, 20.0);
            for (sign, scale) in [(1.0, 0.25), (-1.0, 0.5 / n as f32)] {
                let (ld, dl) = (dev.upload(&l).unwrap(), dev.alloc::<f32>(n).unwrap());
                gpu::logit_grads(&dev, &dl, &ld, sign, scale).unwrap();
                let want = cpu::logit_grads(&l, sign, scale);
                let got = dev.download(&dl).unwrap();
                check(
                    "rl_logit_grads",
                    &dev,
                    &format!("[{n}] sign {sign}"),
                    &got,
                    &want,
                    1e-6,
                );
                // the trainer's seeds: λ·sigmoid(±l)/rows with the sign of the loss
                let host: Vec<f32> = l
                    .iter()
                    .map(|&v| scale * sign * advdmd::kernels::elementwise::sigmoid(sign * v))
                    .collect();
                assert_eq!(want, host);
            }
        }
        let (a, b) = (dev.zeros::<f32>(3).unwrap(), dev.zeros::<f32>(4).unwrap());
        assert!(gpu::logit_grads(&dev, &a, &b, 1.0, 1.0).is_err());
    }
}

#[test]
fn advantages_match_cpu_and_the_trainers_losses() {
    for dev in devices() {
        let mut rng = Rng::new(2);
        // n not a multiple of the block (256); (1028, 2, 4): 257 (t, group) pairs, two blocks
        let shapes = [
            (4, 2, 2),
            (8, 4, 4),
            (6, 4, 1),
            (300, 4, 2),
            (12, 3, 3),
            (20, 2, 1),
            (1028, 2, 4),
        ];
        for (n, k, group) in shapes {
            // logits past the reward clip (2.0) on both sides
            let logits = randn(&mut rng, n * k, 2.5);
            let (rc, ac) = (2.0, 2.5);
            let want = cpu::advantages(&logits, n, k, group, rc, ac);
            // the trainer's arithmetic: clipped rewards, returns-to-go, group advantages
            let rewards: Vec<Vec<f32>> = (0..n)
                .map(|i| (0..k).map(|j| logits[j * n + i].clamp(-rc, rc)).collect())
                .collect();
            let returns: Vec<Vec<f32>> = rewards.iter().map(|r| losses::returns_to_go(r)).collect();
            for t in 0..k - 1 {
                let col: Vec<f32> = returns.iter().map(|r| r[t]).collect();
                let host = losses::group_advantages(&col, group, ac);
                assert_eq!(want[t * n..(t + 1) * n], host, "twin vs losses at t = {t}");
            }
            let (ld, ad) = (
                dev.upload(&logits).unwrap(),
                dev.alloc::<f32>((k - 1) * n).unwrap(),
            );
            gpu::advantages(&dev, &ad, &ld, n, k, group, rc, ac).unwrap();
            let got = dev.download(&ad).unwrap();
            let shape = format!("n {n} k {k} group {group}");
            check("rl_advantages", &dev, &shape, &got, &want, 0.0);
            assert!(same_bits(&got, &want), "rl_advantages {shape}: not bitwise");
        }
        // Edge values, bit for bit against the trainer's functions: a sample whose rewards are
        // all −0.0 beside one of +0.0 (Rust's sums start at −0.0: advantages −0.0 and +0.0), a
        // NaN logit (Rust's clamp keeps it: its whole group NaN), ±∞ (clamped to the bound).
        let (n, k, group) = (6, 2, 2);
        let logits = [
            -0.0,
            0.0,
            f32::NAN,
            1.0,
            f32::INFINITY,
            0.5,
            -0.0,
            0.0,
            0.25,
            -1.0,
            f32::NEG_INFINITY,
            3.0,
        ];
        let want = cpu::advantages(&logits, n, k, group, 2.0, 2.5);
        let rewards: Vec<Vec<f32>> = (0..n)
            .map(|i| (0..k).map(|j| logits[j * n + i].clamp(-2.0, 2.0)).collect())
            .collect();
        let col: Vec<f32> = rewards
            .iter()
            .map(|r| losses::returns_to_go(r)[0])
            .collect();
        assert!(same_bits(
            &want,
            &losses::group_advantages(&col, group, 2.5)
        ));
        assert_eq!(
            (want[0].to_bits(), want[1].to_bits()),
            ((-0f32).to_bits(), 0)
        );
        assert!(want[2].is_nan() && want[3].is_nan() && want[4].is_finite());
        let (ld, ad) = (dev.upload(&logits).unwrap(), dev.alloc::<f32>(n).unwrap());
        gpu::advantages(&dev, &ad, &ld, n, k, group, 2.0, 2.5).unwrap();
        let got = dev.download(&ad).unwrap();
        assert!(same_bits(&got, &want), "edge values: {got:?} vs {want:?}");
        println!(
            "kernel {:<28} device {:<24} shape {:<18} bitwise (±0, NaN, ±inf)",
            "rl_advantages",
            dev.name(),
            "edge values"
        );
        let (a, l) = (dev.zeros::<f32>(4).unwrap(), dev.zeros::<f32>(8).unwrap());
        assert!(
            gpu::advantages(&dev, &a, &l, 4, 2, 3, 1.0, 1.0).is_err(),
            "4 % 3 != 0"
        );
        assert!(
            gpu::advantages(&dev, &a, &l, 8, 1, 1, 1.0, 1.0).is_err(),
            "one state"
        );
        assert!(
            gpu::advantages(&dev, &a, &l, 4, 2, 2, -1.0, 1.0).is_err(),
            "negative reward clip"
        );
        assert!(
            gpu::advantages(&dev, &a, &l, 4, 2, 2, 1.0, f32::NAN).is_err(),
            "NaN advantage clip"
        );
        assert!(
            gpu::advantages(&dev, &a, &l, 2, 2, 1, 1.0, 1.0).is_err(),
            "logits for 4 samples, not 2"
        );
    }
}

#[test]
fn ppo_grad_matches_cpu_and_the_trainers_loss() {
    for dev in devices() {
        let mut rng = Rng::new(3);
        for n in [0, 1, 5, 64, 333] {
            let old: Vec<f64> = (0..n).map(|_| rng.normal() as f64).collect();
            // ratios on both sides of the clip range 1 ± 0.2
            let logp: Vec<f64> = old.iter().map(|o| o + 0.4 * rng.normal() as f64).collect();
            let adv = randn(&mut rng, n, 1.0);
            let (eps, share) = (0.2, 1.0 / 3.0);
            let (want, want_loss) = cpu::ppo_grad(&logp, &old, &adv, eps, share);
            let (host_loss, host_grad) = losses::ppo_loss(&logp, &old, &adv, eps);
            let host: Vec<f32> = host_grad.iter().map(|g| (g * share) as f32).collect();
            assert_eq!(want, host);
            assert_eq!(want_loss, host_loss);
            let (lp, lo, ad) = (
                dev.upload(&logp).unwrap(),
                dev.upload(&old).unwrap(),
                dev.upload(&adv).unwrap(),
            );
            let (coef, loss) = (dev.alloc::<f32>(n).unwrap(), dev.alloc::<f64>(1).unwrap());
            gpu::ppo_grad(&dev, &coef, &loss, &lp, &lo, &ad, eps, share).unwrap();
            let got = dev.download(&coef).unwrap();
            check("rl_ppo_grad", &dev, &format!("[{n}]"), &got, &want, 1e-6);
            let l = dev.download(&loss).unwrap()[0];
            // exp in f64 may differ from Rust's in the last place on a GPU
            let err = (l - want_loss).abs() / want_loss.abs().max(1.0);
            println!(
                "kernel {:<28} device {:<24} shape {:<18} max_rel_err {err:.3e}",
                "rl_ppo_grad (loss)",
                dev.name(),
                format!("[{n}]")
            );
            assert!(err <= 1e-12, "loss {l} vs {want_loss}");
        }
        // A NaN log-prob: Rust's clamp keeps it, so the loss is NaN and its coefficient 0.
        let (logp, old, adv) = ([0.1, f64::NAN, -0.3], [0.0, 0.0, 0.0], [1.0f32, -2.0, 0.5]);
        let (want, want_loss) = cpu::ppo_grad(&logp, &old, &adv, 0.2, 1.0);
        let (host_loss, _) = losses::ppo_loss(&logp, &old, &adv, 0.2);
        assert!(want_loss.is_nan() && host_loss.is_nan() && want[1] == 0.0);
        let (lp, lo, ad) = (
            dev.upload(&logp).unwrap(),
            dev.upload(&old).unwrap(),
            dev.upload(&adv).unwrap(),
        );
        let (coef, loss) = (dev.alloc::<f32>(3).unwrap(), dev.alloc::<f64>(1).unwrap());
        gpu::ppo_grad(&dev, &coef, &loss, &lp, &lo, &ad, 0.2, 1.0).unwrap();
        check(
            "rl_ppo_grad",
            &dev,
            "[3] NaN log-prob",
            &dev.download(&coef).unwrap(),
            &want,
            1e-6,
        );
        assert!(dev.download(&loss).unwrap()[0].is_nan());
        assert!(gpu::ppo_grad(&dev, &coef, &loss, &lp, &lo, &ad, -0.1, 1.0).is_err());
        let (c, l, x) = (
            dev.zeros::<f32>(3).unwrap(),
            dev.zeros::<f64>(1).unwrap(),
            dev.zeros::<f64>(4).unwrap(),
        );
        let a = dev.zeros::<f32>(4).unwrap();
        assert!(gpu::ppo_grad(&dev, &c, &l, &x, &x, &a, 0.2, 1.0).is_err());
    }
}

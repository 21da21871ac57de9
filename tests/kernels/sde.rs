//! cuda/sde.cu ↔ src/kernels/sde.rs, and src/kernels/sde.rs ↔ the functions it mirrors
//! (src/flow/sde.rs, src/train/losses.rs).

use super::*;
use advdmd::flow::sde as flow;
use advdmd::kernels::sde::{self as cpu, dev as gpu};
use advdmd::train::losses;

/// (B, D): one vector, odd D (scalar path), exactly one block per sample, several blocks per
/// sample with and without a partial last block and with D % 4 != 0.
const SHAPES: &[(usize, usize)] = &[
    (1, 4),
    (3, 37),
    (2, 4096),
    (2, 5000),
    (3, 4099),
    (1, 12_288),
];

/// SD3's 4-step schedule: the last transition (σ' = 0) is deterministic.
const SIGMAS: &[(f32, f32)] = &[(1.0, 0.9), (0.9, 0.75), (0.75, 0.0), (0.5, 0.25)];
const RHO: f32 = 0.987_688_3; // sin(0.9·π/2)

fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * std).collect()
}

fn sigmas(b: usize, offset: usize) -> (Vec<f32>, Vec<f32>) {
    (0..b).map(|i| SIGMAS[(i + offset) % SIGMAS.len()]).unzip()
}

/// Log-probabilities: NaN exactly where the CPU has NaN (no density), else within `tol` of it
/// relative to the largest magnitude.
fn check_logp(kernel: &str, dev: &KernelDevice, shape: &str, got: &[f64], want: &[f64], tol: f32) {
    for (g, w) in got.iter().zip(want) {
        assert_eq!(
            g.is_nan(),
            w.is_nan(),
            "{kernel} on {} at {shape}: {got:?} vs {want:?}",
            dev.name()
        );
    }
    let finite = |v: &[f64]| -> Vec<f32> {
        v.iter()
            .filter(|x| !x.is_nan())
            .map(|&x| x as f32)
            .collect()
    };
    check(kernel, dev, shape, &finite(got), &finite(want), tol);
}

#[test]
fn cpu_twin_matches_flow_sde_and_losses() {
    let (b, d) = (4, 37);
    let mut rng = Rng::new(3);
    let (x, v, z) = (
        randn(&mut rng, b * d, 1.0),
        randn(&mut rng, b * d, 1.0),
        randn(&mut rng, b * d, 1.0),
    );
    let (sg, sn) = sigmas(b, 0);
    let out = cpu::rho_step_batch(&x, &v, cpu::NextState::Sample(&z), &sg, &sn, RHO);
    let v2: Vec<f32> = v.iter().map(|a| a + 0.01).collect();
    let re = cpu::rho_step_batch(&x, &v2, cpu::NextState::Given(&out.next), &sg, &sn, RHO);
    for s in 0..b {
        let r = s * d..(s + 1) * d;
        let t = flow::rho_step(
            &x[r.clone()],
            &v[r.clone()],
            sg[s],
            sn[s],
            RHO,
            &z[r.clone()],
        );
        assert_eq!(t.next, out.next[r.clone()]);
        assert_eq!(t.mean, out.mean[r.clone()]);
        assert_eq!(
            flow::x0_eps(&x[r.clone()], &v[r.clone()], sg[s]).0,
            out.x0[r.clone()]
        );
        if t.std > 0.0 {
            assert_eq!(flow::log_prob(&t.next, &t.mean, t.std), out.log_prob[s]);
            assert_eq!(
                flow::log_prob_grad_v(&t.next, &t.mean, t.std, sg[s], sn[s], RHO),
                out.grad_v[r.clone()]
            );
            // The recompute: x' held fixed, μ from the new velocity.
            let t2 = flow::rho_step(
                &x[r.clone()],
                &v2[r.clone()],
                sg[s],
                sn[s],
                RHO,
                &z[r.clone()],
            );
            assert_eq!(
                flow::log_prob(&out.next[r.clone()], &t2.mean, t2.std),
                re.log_prob[s]
            );
            assert_eq!(
                flow::log_prob_grad_v(&out.next[r.clone()], &t2.mean, t2.std, sg[s], sn[s], RHO),
                re.grad_v[r.clone()]
            );
        } else {
            assert!(out.log_prob[s].is_nan() && out.grad_v[r].iter().all(|&g| g == 0.0));
        }
    }

    let (xr, xf) = (randn(&mut rng, b * d, 1.0), randn(&mut rng, b * d, 1.0));
    let g = cpu::dmd_gradient_batch(&x, &xr, &xf, d, 0.5);
    for s in 0..b {
        let r = s * d..(s + 1) * d;
        let want: Vec<f32> = losses::dmd_gradient(&x[r.clone()], &xr[r.clone()], &xf[r.clone()])
            .iter()
            .map(|v| 0.5 * v)
            .collect();
        assert_eq!(want, g[r]);
    }

    let (xt, target) = cpu::flow_noise(&x, &z, &sg);
    for i in 0..b * d {
        let s = sg[i / d];
        assert_eq!(xt[i], (1.0 - s) * x[i] + s * z[i]);
        assert_eq!(target[i], z[i] - x[i]);
    }
}

#[test]
fn rho_step_matches_cpu() {
    for dev in devices() {
        for (k, &(b, d)) in SHAPES.iter().enumerate() {
            let mut rng = Rng::new(101 + k as u64);
            let (x, v, z) = (
                randn(&mut rng, b * d, 1.0),
                randn(&mut rng, b * d, 1.0),
                randn(&mut rng, b * d, 1.0),
            );
            let (sg, sn) = sigmas(b, k);
            let shape = format!("{b}x{d}");
            let up = |h: &[f32]| dev.upload(h).unwrap();
            let (xd, vd, zd, sgd, snd) = (up(&x), up(&v), up(&z), up(&sg), up(&sn));

            let out = gpu::rho_step(
                &dev,
                &xd,
                &vd,
                gpu::NextState::Sample(&zd),
                &sgd,
                &snd,
                RHO,
                (b, d),
            )
            .unwrap();
            let want = cpu::rho_step_batch(&x, &v, cpu::NextState::Sample(&z), &sg, &sn, RHO);
            let next = dev.download(out.next.as_ref().unwrap()).unwrap();
            check("sde_rho_step.next", &dev, &shape, &next, &want.next, 1e-5);
            check(
                "sde_rho_step.x0",
                &dev,
                &shape,
                &dev.download(&out.x0).unwrap(),
                &want.x0,
                1e-5,
            );
            check(
                "sde_rho_step.mean",
                &dev,
                &shape,
                &dev.download(&out.mean).unwrap(),
                &want.mean,
                1e-5,
            );
            check(
                "sde_rho_step.grad_v",
                &dev,
                &shape,
                &dev.download(&out.grad_v).unwrap(),
                &want.grad_v,
                1e-4,
            );
            check_logp(
                "sde_rho_step.log_prob",
                &dev,
                &shape,
                &dev.download(&out.log_prob).unwrap(),
                &want.log_prob,
                1e-5,
            );

            // The policy-gradient recompute: the rollout's x' with a moved velocity.
            let v2: Vec<f32> = v.iter().zip(&z).map(|(a, n)| a + 0.05 * n).collect();
            let re = gpu::rho_step(
                &dev,
                &xd,
                &up(&v2),
                gpu::NextState::Given(&up(&next)),
                &sgd,
                &snd,
                RHO,
                (b, d),
            )
            .unwrap();
            assert!(re.next.is_none());
            let want = cpu::rho_step_batch(&x, &v2, cpu::NextState::Given(&next), &sg, &sn, RHO);
            check(
                "sde_rho_step[given].mean",
                &dev,
                &shape,
                &dev.download(&re.mean).unwrap(),
                &want.mean,
                1e-5,
            );
            check(
                "sde_rho_step[given].grad_v",
                &dev,
                &shape,
                &dev.download(&re.grad_v).unwrap(),
                &want.grad_v,
                1e-4,
            );
            check_logp(
                "sde_rho_step[given].log_prob",
                &dev,
                &shape,
                &dev.download(&re.log_prob).unwrap(),
                &want.log_prob,
                1e-5,
            );

            // Optional outputs left out: only the log-probability is written.
            let lp = dev.alloc::<f64>(b).unwrap();
            let outs = gpu::RhoStepOutputs {
                next: None,
                x0: None,
                mean: None,
                grad_v: None,
                log_prob: &lp,
            };
            gpu::rho_step_into(
                &dev,
                &outs,
                &xd,
                &vd,
                gpu::NextState::Sample(&zd),
                &sgd,
                &snd,
                RHO,
                (b, d),
            )
            .unwrap();
            let again = cpu::rho_step_batch(&x, &v, cpu::NextState::Sample(&z), &sg, &sn, RHO);
            check_logp(
                "sde_rho_step[logp only]",
                &dev,
                &shape,
                &dev.download(&lp).unwrap(),
                &again.log_prob,
                1e-5,
            );
        }
    }
}

#[test]
fn dmd_gradient_matches_cpu() {
    for dev in devices() {
        for (k, &(b, d)) in SHAPES.iter().enumerate() {
            let mut rng = Rng::new(201 + k as u64);
            let x = randn(&mut rng, b * d, 1.0);
            let mut xr = randn(&mut rng, b * d, 1.0);
            let xf = randn(&mut rng, b * d, 1.0);
            if b > 1 {
                // A sample whose teacher denoise equals x: normaliser 0, gradient nan_to_num'd to 0.
                xr[..d].copy_from_slice(&x[..d]);
            }
            let shape = format!("{b}x{d}");
            let up = |h: &[f32]| dev.upload(h).unwrap();
            let g = gpu::dmd_gradient(&dev, &up(&x), &up(&xr), &up(&xf), (b, d), 0.5).unwrap();
            let want = cpu::dmd_gradient_batch(&x, &xr, &xf, d, 0.5);
            let got = dev.download(&g).unwrap();
            check("dmd_gradient", &dev, &shape, &got, &want, 1e-5);
            if b > 1 {
                assert!(
                    got[..d].iter().all(|&v| v == 0.0),
                    "zero normaliser must give 0"
                );
            }
        }
    }
}

#[test]
fn flow_noise_matches_cpu() {
    for dev in devices() {
        for (k, &(b, d)) in SHAPES.iter().enumerate() {
            let mut rng = Rng::new(301 + k as u64);
            let (x0, n) = (randn(&mut rng, b * d, 1.0), randn(&mut rng, b * d, 1.0));
            let sg: Vec<f32> = (0..b).map(|_| rng.uniform()).collect();
            let shape = format!("{b}x{d}");
            let up = |h: &[f32]| dev.upload(h).unwrap();
            let (x0d, nd, sgd) = (up(&x0), up(&n), up(&sg));
            let (xt, target) = gpu::flow_noise(&dev, &x0d, &nd, &sgd, (b, d)).unwrap();
            let (xtc, tc) = cpu::flow_noise(&x0, &n, &sg);
            check(
                "flow_noise.x_sigma",
                &dev,
                &shape,
                &dev.download(&xt).unwrap(),
                &xtc,
                1e-6,
            );
            check(
                "flow_noise.target",
                &dev,
                &shape,
                &dev.download(&target).unwrap(),
                &tc,
                1e-6,
            );
            let xt2 = dev.alloc::<f32>(b * d).unwrap();
            gpu::flow_noise_into(&dev, &xt2, None, &x0d, &nd, &sgd, (b, d)).unwrap();
            check(
                "flow_noise[no target]",
                &dev,
                &shape,
                &dev.download(&xt2).unwrap(),
                &xtc,
                1e-6,
            );
        }
    }
}

#[test]
fn euler_cfg_step_matches_cpu() {
    for dev in devices() {
        for guided in [false, true] {
            let mut rng = Rng::new(21 + guided as u64);
            let n = 1003;
            let x = randn_bf16(&mut rng, n, 1.0);
            let v = randn_bf16(&mut rng, if guided { 2 * n } else { n }, 1.0);
            let (w, dt) = (4.5, -0.25);
            let xd = dev.upload(&x).unwrap();
            let model_in = dev.alloc::<bf16>(v.len()).unwrap();
            gpu::euler_cfg_step(&dev, &xd, &model_in, &upload_bf16(&dev, &v), guided, w, dt)
                .unwrap();
            let mut want = x.clone();
            cpu::euler_cfg_step(&mut want, &v, guided, w, dt);
            let shape = format!("{n} guided={guided}");
            let got = dev.download(&xd).unwrap();
            check("euler_cfg_step", &dev, &shape, &got, &want, 1e-6);
            // the next model input: bf16(x), in both halves when guided
            let input = download_f32(&dev, &model_in);
            let rounded: Vec<f32> = got.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            assert_eq!(input[..n], rounded[..], "model input on {}", dev.name());
            if guided {
                assert_eq!(input[n..], rounded[..], "second half on {}", dev.name());
            }
            let bad = dev.alloc::<bf16>(n + 1).unwrap();
            assert!(gpu::euler_cfg_step(&dev, &xd, &bad, &bad, guided, w, dt).is_err());
        }
    }
}

#[test]
fn velocity_mse_grad_matches_cpu() {
    for dev in devices() {
        for n in [5, 1000, 100_003] {
            let mut rng = Rng::new(31 + n as u64);
            let v = randn_bf16(&mut rng, n, 1.0);
            let t: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let dv = dev.alloc::<bf16>(n).unwrap();
            let loss =
                gpu::velocity_mse_grad(&dev, &dv, &upload_bf16(&dev, &v), &dev.upload(&t).unwrap())
                    .unwrap();
            let (want_loss, want) = cpu::velocity_mse_grad(&v, &t);
            let shape = format!("{n}");
            check(
                "velocity_mse_grad",
                &dev,
                &shape,
                &download_f32(&dev, &dv),
                &want,
                4e-3,
            );
            assert!(
                (loss - want_loss).abs() <= 1e-5 * want_loss,
                "loss {loss} vs {want_loss} on {}",
                dev.name()
            );
        }
    }
}

#[test]
fn x0_from_velocity_and_its_gradient_match_cpu() {
    for dev in devices() {
        for guided in [false, true] {
            let mut rng = Rng::new(41 + guided as u64);
            let (b, d) = (3, 257);
            let x: Vec<f32> = (0..b * d).map(|_| rng.normal()).collect();
            let v = randn_bf16(&mut rng, if guided { 2 * b * d } else { b * d }, 1.0);
            let sigma = [0.2f32, 0.5, 0.9];
            let (xd, sd) = (dev.upload(&x).unwrap(), dev.upload(&sigma).unwrap());
            let x0 = dev.alloc::<f32>(b * d).unwrap();
            gpu::x0_from_velocity(&dev, &x0, &xd, &upload_bf16(&dev, &v), &sd, guided, 3.0)
                .unwrap();
            let want = cpu::x0_from_velocity(&x, &v, &sigma, guided, 3.0);
            let shape = format!("{b}x{d} guided={guided}");
            check(
                "x0_from_velocity",
                &dev,
                &shape,
                &dev.download(&x0).unwrap(),
                &want,
                1e-6,
            );

            let dv = dev.alloc::<bf16>(b * d).unwrap();
            gpu::velocity_grad_from_x0(&dev, &dv, &xd, &sd, 0.5).unwrap();
            let want = cpu::velocity_grad_from_x0(&x, &sigma, 0.5);
            check(
                "velocity_grad_from_x0",
                &dev,
                &shape,
                &download_f32(&dev, &dv),
                &want,
                4e-3,
            );
            assert!(gpu::velocity_grad_from_x0(
                &dev,
                &dv,
                &xd,
                &dev.upload(&[1f32; 2]).unwrap(),
                1.0
            )
            .is_err());
        }
    }
}

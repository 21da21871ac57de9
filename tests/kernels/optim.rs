//! cuda/optim.cu ↔ src/kernels/optim.rs, and src/kernels/optim.rs ↔ src/optim/mod.rs.

use super::*;
use advdmd::kernels::optim::{self as cpu, dev as gpu, AdamWStep};
use advdmd::nn::ParamMap;
use advdmd::optim::{clip_grad_norm, AdamW, AdamWConfig, Ema};

fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * std).collect()
}

fn hyper(step: u64) -> AdamWStep {
    AdamWStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        step,
    }
}

/// The flat twin against the optimiser the CPU trainer uses: a matrix (decayed) and a vector
/// (not), three steps with clipping on, then the EMA.
#[test]
fn cpu_twin_matches_optim_module() {
    let mut params = ParamMap::new();
    let mut rng = Rng::new(5);
    let a = params.insert("a.weight", tensor(randn(&mut rng, 15, 1.0), &[3, 5]));
    let b = params.insert("b.bias", tensor(randn(&mut rng, 7, 1.0), &[7]));
    let h0 = hyper(0);
    let mut opt = AdamW::new(AdamWConfig {
        lr: h0.lr,
        beta1: h0.beta1,
        beta2: h0.beta2,
        eps: h0.eps,
        weight_decay: h0.weight_decay,
    });
    let ema = Ema::new(&params, 0.99);
    let mut w: Vec<f32> = [a.value().f32s(), b.value().f32s()].concat();
    let (mut m, mut v) = (vec![0f32; 22], vec![0f32; 22]);
    let mut shadow = w.clone();
    for step in 1..=3u64 {
        let g = randn(&mut rng, 22, 2.0);
        params.zero_grad();
        a.set_grad(tensor(g[..15].to_vec(), &[3, 5]));
        b.set_grad(tensor(g[15..].to_vec(), &[7]));
        let max_norm = 3.0;
        let norm = clip_grad_norm(&[&params], max_norm);
        opt.step(&[&params], h0.lr);
        ema.update(&params);

        let n2 = cpu::grad_norm(&g);
        assert!((n2 - norm).abs() <= 1e-6 * norm, "norm {n2} vs {norm}");
        cpu::adamw_step(
            &mut w,
            &mut m,
            &mut v,
            &g,
            cpu::clip_factor(n2, max_norm),
            15,
            &hyper(step),
            Some((&mut shadow, 0.99)),
        );
        let want: Vec<f32> = [a.value().f32s(), b.value().f32s()].concat();
        let want_ema: Vec<f32> = [
            ema.shadow.param("a.weight").value().f32s(),
            ema.shadow.param("b.bias").value().f32s(),
        ]
        .concat();
        let err = max_rel_err(&w, &want).max(max_rel_err(&shadow, &want_ema));
        assert!(
            err <= 1e-6,
            "step {step}: flat AdamW differs from optim::AdamW by {err:e}"
        );
    }
}

#[test]
fn grad_norm_matches_cpu() {
    for dev in devices() {
        for n in [1usize, 7, 1000, 4103, 70_001, 300_000] {
            let mut rng = Rng::new(71 + n as u64);
            let g = randn(&mut rng, n, 0.5);
            let norm = cpu::grad_norm(&g);
            let shape = format!("{n}");
            for max_norm in [0.0, norm * 0.5, norm * 2.0] {
                let clip = dev
                    .download(
                        &gpu::grad_norm_clip(&dev, &dev.upload(&g).unwrap(), max_norm).unwrap(),
                    )
                    .unwrap();
                check(
                    "grad_norm_clip",
                    &dev,
                    &shape,
                    &clip,
                    &[norm, cpu::clip_factor(norm, max_norm)],
                    1e-6,
                );
            }
        }
    }
}

#[test]
fn adamw_step_matches_cpu() {
    for dev in devices() {
        for n in [1usize, 7, 8, 1000, 4103, 70_001] {
            for (with_extras, clip_on) in [(true, true), (false, false)] {
                let mut rng = Rng::new(81 + n as u64);
                let mut w = randn(&mut rng, n, 1.0);
                let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
                let mut shadow = w.clone();
                let n_decay = n * 2 / 3;
                let up = |h: &[f32]| dev.upload(h).unwrap();
                let (wd, md, vd, ed) = (up(&w), up(&m), up(&v), up(&shadow));
                let wb = dev.alloc::<bf16>(n).unwrap();
                let shape = format!("{n}{}", if with_extras { "+bf16+ema+clip" } else { "" });
                for step in 1..=3u64 {
                    let g = randn(&mut rng, n, 1.0);
                    let gd = up(&g);
                    let max_norm = if clip_on {
                        cpu::grad_norm(&g) * 0.5
                    } else {
                        0.0
                    };
                    let clip = gpu::grad_norm_clip(&dev, &gd, max_norm).unwrap();
                    let bufs = gpu::FlatAdamW {
                        w: &wd,
                        w_bf16: with_extras.then_some(&wb),
                        m: &md,
                        v: &vd,
                        g: &gd,
                        ema: with_extras.then_some((&ed, 0.99)),
                        n_decay,
                    };
                    gpu::adamw_step(&dev, &bufs, clip_on.then_some(&clip), &hyper(step)).unwrap();
                    let scale = cpu::clip_factor(cpu::grad_norm(&g), max_norm);
                    let ema = with_extras.then_some((&mut shadow[..], 0.99));
                    cpu::adamw_step(
                        &mut w,
                        &mut m,
                        &mut v,
                        &g,
                        scale,
                        n_decay,
                        &hyper(step),
                        ema,
                    );
                }
                check(
                    "adamw_step.w",
                    &dev,
                    &shape,
                    &dev.download(&wd).unwrap(),
                    &w,
                    1e-5,
                );
                check(
                    "adamw_step.m",
                    &dev,
                    &shape,
                    &dev.download(&md).unwrap(),
                    &m,
                    1e-5,
                );
                check(
                    "adamw_step.v",
                    &dev,
                    &shape,
                    &dev.download(&vd).unwrap(),
                    &v,
                    1e-5,
                );
                if with_extras {
                    let wbf: Vec<f32> = w.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
                    check(
                        "adamw_step.w_bf16",
                        &dev,
                        &shape,
                        &download_f32(&dev, &wb),
                        &wbf,
                        1e-2,
                    );
                    check(
                        "adamw_step.ema",
                        &dev,
                        &shape,
                        &dev.download(&ed).unwrap(),
                        &shadow,
                        1e-5,
                    );
                }
            }
        }
    }
}

/// The bf16-moment step against its twin: the same stochastic rounding bits, so m and v agree
/// bit for bit where the f32 arithmetic does (and within one bf16 ulp where an f32 rounding
/// difference moves a value across a rounding threshold), the weights to f32 accuracy.
#[test]
fn adamw_step_with_bf16_moments_matches_cpu() {
    for dev in devices() {
        for n in [7usize, 1000, 4103] {
            let mut rng = Rng::new(93 + n as u64);
            let mut w = randn(&mut rng, n, 1.0);
            let (mut m, mut v) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
            let mut shadow = w.clone();
            let n_decay = n / 2;
            let (wd, ed) = (dev.upload(&w).unwrap(), dev.upload(&shadow).unwrap());
            let (md, vd) = (dev.upload(&m).unwrap(), dev.upload(&v).unwrap());
            let wb = dev.alloc::<bf16>(n).unwrap();
            for step in 1..=3u64 {
                let g = randn(&mut rng, n, 1.0);
                let gd = dev.upload(&g).unwrap();
                let seed = 0x1234 ^ step as u32;
                let bufs = gpu::FlatAdamW {
                    w: &wd,
                    w_bf16: Some(&wb),
                    m: &md,
                    v: &vd,
                    g: &gd,
                    ema: Some((&ed, 0.99)),
                    n_decay,
                };
                gpu::adamw_step_bf16_moments(&dev, &bufs, None, &hyper(step), seed).unwrap();
                let ema = Some((&mut shadow[..], 0.99));
                cpu::adamw_step_bf16_moments(
                    &mut w,
                    &mut m,
                    &mut v,
                    &g,
                    1.0,
                    n_decay,
                    &hyper(step),
                    ema,
                    seed,
                );
            }
            let shape = format!("{n} bf16 moments");
            let f = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
            for (name, got, want) in [("m", &md, &m), ("v", &vd, &v)] {
                let got = dev.download(got).unwrap();
                let off_by_ulp = got
                    .iter()
                    .zip(want.iter())
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .map(|(a, b)| (a.to_bits() as i32 - b.to_bits() as i32).abs())
                    .collect::<Vec<_>>();
                assert!(
                    off_by_ulp.iter().all(|&d| d <= 1) && off_by_ulp.len() * 100 <= n.max(100),
                    "adamw_step_bf16m.{name} on {}: {} of {n} differ ({off_by_ulp:?})",
                    dev.name(),
                    off_by_ulp.len()
                );
                check(
                    &format!("adamw_step_bf16m.{name}"),
                    &dev,
                    &shape,
                    &f(&got),
                    &f(want),
                    1e-2,
                );
            }
            let got_w = dev.download(&wd).unwrap();
            check("adamw_step_bf16m.w", &dev, &shape, &got_w, &w, 1e-5);
            let got_e = dev.download(&ed).unwrap();
            check("adamw_step_bf16m.ema", &dev, &shape, &got_e, &shadow, 1e-5);
        }
    }
}

/// The joint norm of several gradients and its clip factor on the device, against the CPU twin.
#[test]
fn joint_grad_norm_clip_matches_cpu() {
    for dev in devices() {
        let mut rng = Rng::new(11);
        let gs: Vec<Vec<f32>> = [37, 70_001, 5]
            .iter()
            .map(|&n| randn(&mut rng, n, 1.0))
            .collect();
        let up: Vec<DevBuf<f32>> = gs.iter().map(|g| dev.upload(g).unwrap()).collect();
        for count in 1..=3 {
            let refs: Vec<&DevBuf<f32>> = up[..count].iter().collect();
            let host: Vec<&[f32]> = gs[..count].iter().map(|g| g.as_slice()).collect();
            let norm = cpu::joint_grad_norm(&host);
            for max_norm in [0.0, 1.0, 1e9] {
                let clip = dev.alloc::<f32>(2).unwrap();
                gpu::joint_grad_norm_clip(&dev, &clip, &refs, max_norm).unwrap();
                let got = dev.download(&clip).unwrap();
                let want = [norm, cpu::clip_factor(norm, max_norm)];
                let shape = format!("{count} grads, max {max_norm}");
                check("joint_grad_norm_clip", &dev, &shape, &got, &want, 1e-6);
            }
        }
        let bad = dev.alloc::<f32>(3).unwrap();
        assert!(gpu::joint_grad_norm_clip(&dev, &bad, &[&up[0]], 1.0).is_err());
        assert!(gpu::joint_grad_norm_clip(&dev, &up[2], &[], 1.0).is_err() || up[2].len() != 2);
    }
}

/// `DeviceAdamW::stage` + `update_staged` (the split a replayed graph needs) against the plain
/// step with the clip given by value: the same weights, moments and EMA, bit for bit, over
/// several steps — and a step recorded into a graph once, then replayed after each staging,
/// equals them too.
#[test]
fn staged_optimizer_steps_equal_plain_ones() {
    use advdmd::optim::device::{DeviceAdamW, FlatParams};
    for dev in devices() {
        for bf16_moments in [false, true] {
            let mut rng = Rng::new(12);
            let n = 1000;
            let config = AdamWConfig {
                lr: 1e-2,
                weight_decay: 0.1,
                ..Default::default()
            };
            let make = || {
                if bf16_moments {
                    DeviceAdamW::with_bf16_moments(&dev, n, config.clone(), 77).unwrap()
                } else {
                    DeviceAdamW::new(&dev, n, config.clone()).unwrap()
                }
            };
            let w0 = randn(&mut rng, n, 1.0);
            let grads: Vec<Vec<f32>> = (0..4).map(|_| randn(&mut rng, n, 3.0)).collect();
            let runs: Vec<_> = (0..3)
                .map(|_| {
                    (
                        dev.upload(&w0).unwrap(),
                        dev.zeros::<bf16>(n).unwrap(),
                        dev.zeros::<f32>(n).unwrap(),
                        dev.upload(&w0).unwrap(),
                        make(),
                    )
                })
                .collect();
            let clip = dev.alloc::<f32>(2).unwrap();
            let mut runs = runs;
            let mut graph = None;
            for (s, g) in grads.iter().enumerate() {
                let lr = 1e-2 * (s + 1) as f32 / 4.0;
                for (r, (w, wb, gb, ema, opt)) in runs.iter_mut().enumerate() {
                    dev.copy_to_device(g, gb).unwrap();
                    let flat = FlatParams {
                        master: w,
                        bf16: wb,
                        grads: gb,
                        n_decay: n / 2,
                    };
                    let norm = cpu::grad_norm(g);
                    match r {
                        0 => {
                            let f = [norm, cpu::clip_factor(norm, 5.0)];
                            opt.step_with_clip(&dev, &flat, lr, f, Some((ema, 0.9)))
                                .unwrap()
                        }
                        1 => {
                            opt.stage(&dev, lr).unwrap();
                            gpu::joint_grad_norm_clip(&dev, &clip, &[gb], 5.0).unwrap();
                            opt.update_staged(&dev, &flat, &clip, Some((ema, 0.9)))
                                .unwrap()
                        }
                        _ => {
                            opt.stage(&dev, lr).unwrap();
                            let g = graph.get_or_insert_with(|| {
                                dev.capture(|| {
                                    gpu::joint_grad_norm_clip(&dev, &clip, &[gb], 5.0)?;
                                    opt.update_staged(&dev, &flat, &clip, Some((ema, 0.9)))
                                })
                                .unwrap()
                            });
                            g.launch().unwrap()
                        }
                    }
                }
            }
            let (a, b, c) = (&runs[0], &runs[1], &runs[2]);
            for (what, x, y, z) in [("w", &a.0, &b.0, &c.0), ("ema", &a.3, &b.3, &c.3)] {
                let (x, y, z) = (
                    dev.download(x).unwrap(),
                    dev.download(y).unwrap(),
                    dev.download(z).unwrap(),
                );
                let shape = format!("{n} bf16 moments {bf16_moments}");
                // the plain step's clip factor comes from the host's f64 norm: the last bits
                check(&format!("staged AdamW {what}"), &dev, &shape, &y, &x, 1e-5);
                assert_eq!(
                    y,
                    z,
                    "the graph replays the staged step ({what}) on {}",
                    dev.name()
                );
            }
            assert_eq!((a.4.step, b.4.step, c.4.step), (4, 4, 4));
        }
    }
}

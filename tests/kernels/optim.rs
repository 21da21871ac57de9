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

/// The host's joint clip (what `step_jointly` computed before the device did): each part's norm,
/// then `sqrt(Σ norm²)` in f64 and `clip_factor`.
fn host_joint_clip(gs: &[&[f32]], max_norm: f32) -> [f32; 2] {
    let norm = gs
        .iter()
        .map(|g| (cpu::grad_norm(g) as f64).powi(2))
        .sum::<f64>()
        .sqrt() as f32;
    [norm, cpu::clip_factor(norm, max_norm)]
}

/// The joint norm of 1, 2 and 3 gradients of odd lengths and its clip factor, unclipped and
/// clipped, on the device against the CPU twin (bit for bit on the emulator, which sums in the
/// twin's order without FMA contraction), and the twin against the host's rule (to f32 rounding).
#[test]
fn joint_grad_norm_clip_matches_cpu() {
    let mut rng = Rng::new(11);
    let gs: Vec<Vec<f32>> = [37usize, 70_001, 5, 4097]
        .iter()
        .map(|&n| randn(&mut rng, n, 1.0))
        .collect();
    let sets: [&[usize]; 4] = [&[0], &[1], &[0, 1], &[2, 1, 3]];
    for dev in devices() {
        let up: Vec<DevBuf<f32>> = gs.iter().map(|g| dev.upload(g).unwrap()).collect();
        for set in sets {
            let refs: Vec<&DevBuf<f32>> = set.iter().map(|&i| &up[i]).collect();
            let host: Vec<&[f32]> = set.iter().map(|&i| gs[i].as_slice()).collect();
            let norm = cpu::joint_grad_norm_clip(&host, 0.0)[0];
            for max_norm in [0.0, norm * 0.25, 1.0, norm * 2.0] {
                let want = cpu::joint_grad_norm_clip(&host, max_norm);
                let rule = host_joint_clip(&host, max_norm);
                let ulps = (want[0].to_bits() as i64 - rule[0].to_bits() as i64).abs();
                assert!(ulps <= 1, "twin {want:?} vs the host rule {rule:?}");
                assert!((want[1] - rule[1]).abs() <= 2.0 * f32::EPSILON * rule[1]);
                if max_norm == 0.0 || max_norm > norm {
                    assert_eq!(want[1], 1.0);
                } else {
                    assert!(want[1] < 1.0);
                }

                let clip = dev.alloc::<f32>(2).unwrap();
                gpu::joint_grad_norm_clip(&dev, &clip, &refs, max_norm).unwrap();
                let got = dev.download(&clip).unwrap();
                let lens: Vec<usize> = set.iter().map(|&i| gs[i].len()).collect();
                let shape = format!("{lens:?} max {max_norm:.3}");
                check("joint_grad_norm_clip", &dev, &shape, &got, &want, 1e-6);
                if dev.is_emulator() {
                    assert_eq!(got, want, "{shape}: the emulator sums in the twin's order");
                }
            }
        }
        let bad = dev.alloc::<f32>(3).unwrap();
        assert!(gpu::joint_grad_norm_clip(&dev, &bad, &[&up[0]], 1.0).is_err());
        let clip = dev.alloc::<f32>(2).unwrap();
        assert!(gpu::joint_grad_norm_clip(&dev, &clip, &[], 1.0).is_err());
    }
}

/// One [`DeviceAdamW`](advdmd::optim::device::DeviceAdamW) run's buffers: f32 weights, their
/// bf16 copy, the gradient, the EMA shadow (starting at the weights).
struct OptRun {
    w: DevBuf<f32>,
    wb: DevBuf<bf16>,
    g: DevBuf<f32>,
    ema: DevBuf<f32>,
    opt: advdmd::optim::device::DeviceAdamW,
}

impl OptRun {
    fn new(dev: &KernelDevice, w0: &[f32], opt: advdmd::optim::device::DeviceAdamW) -> Self {
        OptRun {
            w: dev.upload(w0).unwrap(),
            wb: dev.zeros(w0.len()).unwrap(),
            g: dev.zeros(w0.len()).unwrap(),
            ema: dev.upload(w0).unwrap(),
            opt,
        }
    }

    /// Everything a step writes: weights, their bf16 copy (as bits), EMA, moments.
    fn state(&self, dev: &KernelDevice) -> Vec<Vec<u32>> {
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        let (m, v) = self.opt.download_moments(dev).unwrap();
        vec![
            bits(dev.download(&self.w).unwrap()),
            dev.download(&self.wb)
                .unwrap()
                .iter()
                .map(|x| x.to_bits() as u32)
                .collect(),
            bits(dev.download(&self.ema).unwrap()),
            bits(m),
            bits(v),
        ]
    }
}

/// `DeviceAdamW::stage` + `update_staged` (the split a replayed graph needs) against the plain
/// `step_with_clip` given the same clip by value: the same weights, bf16 copy, EMA and moments,
/// bit for bit, over several steps with and without clipping and a changing learning rate, with
/// f32 and bf16 moments — and the clip + update recorded into a graph once, then replayed after
/// each staging, equals them too.
#[test]
fn staged_optimizer_steps_equal_plain_ones() {
    use advdmd::optim::device::{DeviceAdamW, FlatParams};
    const MAX_NORM: f32 = 60.0;
    for dev in devices() {
        for bf16_moments in [false, true] {
            let mut rng = Rng::new(12);
            let n = 1003;
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
            // norms ≈ 32, 95, 16, 126 against MAX_NORM: clipped and not
            let grads: Vec<Vec<f32>> = [1.0, 3.0, 0.5, 4.0]
                .iter()
                .map(|&std| randn(&mut rng, n, std))
                .collect();
            let mut runs: Vec<OptRun> = (0..3).map(|_| OptRun::new(&dev, &w0, make())).collect();
            let clip = dev.alloc::<f32>(2).unwrap();
            let mut graph = None;
            let mut clipped = 0;
            for (s, g) in grads.iter().enumerate() {
                let lr = 1e-2 * (s + 1) as f32 / 4.0;
                for (r, run) in runs.iter_mut().enumerate() {
                    dev.copy_to_device(g, &run.g).unwrap();
                    let flat = FlatParams {
                        master: &run.w,
                        bf16: &run.wb,
                        grads: &run.g,
                        n_decay: n / 2,
                    };
                    let ema = Some((&run.ema, 0.9));
                    match r {
                        0 => {
                            // the plain step, with the device's clip read back
                            gpu::joint_grad_norm_clip(&dev, &clip, &[&run.g], MAX_NORM).unwrap();
                            let f = dev.download(&clip).unwrap();
                            clipped += (f[1] < 1.0) as usize;
                            run.opt
                                .step_with_clip(&dev, &flat, lr, [f[0], f[1]], ema)
                                .unwrap();
                        }
                        1 => {
                            run.opt.stage(&dev, lr).unwrap();
                            gpu::joint_grad_norm_clip(&dev, &clip, &[&run.g], MAX_NORM).unwrap();
                            run.opt.update_staged(&dev, &flat, &clip, ema).unwrap();
                        }
                        _ => {
                            run.opt.stage(&dev, lr).unwrap();
                            let opt = &run.opt;
                            let g = graph.get_or_insert_with(|| {
                                dev.capture(|| {
                                    gpu::joint_grad_norm_clip(
                                        &dev,
                                        &clip,
                                        &[flat.grads],
                                        MAX_NORM,
                                    )?;
                                    opt.update_staged(&dev, &flat, &clip, ema)
                                })
                                .unwrap()
                            });
                            g.launch().unwrap();
                        }
                    }
                }
            }
            assert_eq!(clipped, 2, "two of the four steps clip");
            let want = runs[0].state(&dev);
            let names = ["w", "w_bf16", "ema", "m", "v"];
            for (r, how) in [(1, "staged"), (2, "graph-replayed")] {
                for (k, (got, want)) in runs[r].state(&dev).iter().zip(&want).enumerate() {
                    assert!(
                        got == want,
                        "{how} AdamW ({}) differs from step_with_clip in {} on {} (bf16 moments \
                         {bf16_moments})",
                        names[k],
                        got.iter().zip(want).filter(|(a, b)| a != b).count(),
                        dev.name()
                    );
                }
            }
            println!(
                "staged AdamW (bf16 moments {bf16_moments}) on {}: plain, staged, replayed equal",
                dev.name()
            );
            assert!(runs.iter().all(|r| r.opt.step == 4));
        }
    }
}

/// `step_jointly`'s pattern — stage every part's optimizer, then the joint clip of all parts'
/// gradients on the device and each part's `update_staged` reading it, recorded once and replayed
/// — against the CPU twin's AdamW with the host's joint clip, over four steps (clipped and not).
#[test]
fn staged_joint_steps_match_cpu_twin() {
    use advdmd::optim::device::{DeviceAdamW, FlatParams};
    let sizes = [301usize, 1027, 19];
    let lrs = [1e-2f32, 3e-3, 5e-2];
    let max_norm = 40.0;
    for dev in devices() {
        let mut rng = Rng::new(13);
        let config = AdamWConfig {
            weight_decay: 0.05,
            ..Default::default()
        };
        let w0: Vec<Vec<f32>> = sizes.iter().map(|&n| randn(&mut rng, n, 1.0)).collect();
        let runs: Vec<OptRun> = w0
            .iter()
            .map(|w| {
                OptRun::new(
                    &dev,
                    w,
                    DeviceAdamW::new(&dev, w.len(), config.clone()).unwrap(),
                )
            })
            .collect();
        let mut runs = runs;
        // the twin's state: w, m, v, and the EMA of part 0
        let mut host: Vec<[Vec<f32>; 3]> = w0
            .iter()
            .map(|w| [w.clone(), vec![0.0; w.len()], vec![0.0; w.len()]])
            .collect();
        let mut shadow = w0[0].clone();
        let clip = dev.alloc::<f32>(2).unwrap();
        let mut graph = None;
        let mut clipped = 0;
        // joint norms ≈ 55, 11, 73, 18 against max_norm 40: steps 1 and 3 clip
        for (step, std) in [(1u64, 1.5f32), (2, 0.3), (3, 2.0), (4, 0.5)] {
            let gs: Vec<Vec<f32>> = sizes.iter().map(|&n| randn(&mut rng, n, std)).collect();
            for (run, g) in runs.iter_mut().zip(&gs) {
                dev.copy_to_device(g, &run.g).unwrap();
            }
            let decay = |n: usize| n * 3 / 4;
            for (run, lr) in runs.iter_mut().zip(lrs) {
                run.opt.stage(&dev, lr).unwrap();
            }
            let work = || -> advdmd::device::kernel::KernelResult<()> {
                let grads: Vec<&DevBuf<f32>> = runs.iter().map(|r| &r.g).collect();
                gpu::joint_grad_norm_clip(&dev, &clip, &grads, max_norm)?;
                for (i, r) in runs.iter().enumerate() {
                    let flat = FlatParams {
                        master: &r.w,
                        bf16: &r.wb,
                        grads: &r.g,
                        n_decay: decay(r.w.len()),
                    };
                    r.opt
                        .update_staged(&dev, &flat, &clip, (i == 0).then_some((&r.ema, 0.99)))?;
                }
                Ok(())
            };
            if step == 1 {
                work().unwrap(); // directly, then recorded once and replayed
            } else {
                graph
                    .get_or_insert_with(|| dev.capture(work).unwrap())
                    .launch()
                    .unwrap();
            }

            let host_gs: Vec<&[f32]> = gs.iter().map(|g| g.as_slice()).collect();
            let [norm, factor] = host_joint_clip(&host_gs, max_norm);
            clipped += (factor < 1.0) as usize;
            let got = dev.download(&clip).unwrap();
            check(
                "joint clip (staged step)",
                &dev,
                &format!("step {step}"),
                &got,
                &[norm, factor],
                1e-6,
            );
            for (i, ([w, m, v], g)) in host.iter_mut().zip(&gs).enumerate() {
                let h = AdamWStep {
                    lr: lrs[i],
                    beta1: config.beta1,
                    beta2: config.beta2,
                    eps: config.eps,
                    weight_decay: config.weight_decay,
                    step,
                };
                let (ema, n_decay) = ((i == 0).then_some((&mut shadow[..], 0.99)), decay(w.len()));
                cpu::adamw_step(w, m, v, g, factor, n_decay, &h, ema);
            }
        }
        assert_eq!(clipped, 2, "two of the four steps clip");
        for (i, (run, [w, m, v])) in runs.iter().zip(&host).enumerate() {
            assert_eq!(run.opt.step, 4);
            let shape = format!("part {i}: {}", w.len());
            let (dm, dv) = run.opt.download_moments(&dev).unwrap();
            check(
                "staged joint AdamW.w",
                &dev,
                &shape,
                &dev.download(&run.w).unwrap(),
                w,
                1e-5,
            );
            check("staged joint AdamW.m", &dev, &shape, &dm, m, 1e-5);
            check("staged joint AdamW.v", &dev, &shape, &dv, v, 1e-5);
            let wbf: Vec<f32> = w.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
            check(
                "staged joint AdamW.w_bf16",
                &dev,
                &shape,
                &download_f32(&dev, &run.wb),
                &wbf,
                1e-2,
            );
        }
        let got_ema = dev.download(&runs[0].ema).unwrap();
        check(
            "staged joint AdamW.ema",
            &dev,
            "part 0",
            &got_ema,
            &shadow,
            1e-5,
        );
    }
}

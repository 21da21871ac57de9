//! The AdvDMD iteration on a kernel device (`train::advdmd_device`) against the CPU trainer
//! (`train::advdmd`) from the same tiny Shapes teacher, state and seed: the device run draws the
//! same random numbers in the same order, so every metric of an iteration with the generator
//! update and the RL term, and of the critic-only iteration after it (which sees both updates),
//! agrees within bf16 tolerance; the generator's and fake score's parameter updates point the
//! same way. Through the SIMT emulator here, and on the GPU when there is one.

mod common;

use advdmd::device::kernel::KernelDevice;
use advdmd::mmdit::device::Keep;
use advdmd::train::advdmd::{AdvDmd, AdvDmdConfig, IterMetrics};
use advdmd::train::advdmd_device::{shapes_batch, DeviceAdvDmd, DeviceRunOptions};
use advdmd::Tensor;
use common::ScratchDir;

fn devices() -> Vec<KernelDevice> {
    common::kernel_devices("advdmd_device")
}

fn config() -> AdvDmdConfig {
    AdvDmdConfig {
        prompts: 2,
        group: 2,
        steps_per_sample: 2,
        r_dmd: 2,
        rl_warmup: 0,
        lr_warmup: 0,
        lr_generator: 1e-3,
        lr_fake: 1e-3,
        ..Default::default()
    }
}

fn close(what: &str, device: f32, cpu: f32, tol: f32) {
    let err = (device - cpu).abs() / cpu.abs().max(1.0);
    assert!(
        device.is_finite() && err <= tol,
        "{what}: device {device} vs CPU {cpu} (error {err:.2e} > {tol:.0e})"
    );
}

fn compare(it: usize, d: &IterMetrics, c: &IterMetrics) {
    println!("iteration {it}: device {d:?}\n             CPU    {c:?}");
    assert_eq!((d.generator_step, d.rl_step), (c.generator_step, c.rl_step));
    close("fake_loss", d.fake_loss, c.fake_loss, 2e-2);
    close("d_loss", d.d_loss, c.d_loss, 2e-2);
    if c.generator_step {
        close("dmd_grad_norm", d.dmd_grad_norm, c.dmd_grad_norm, 2e-2);
        close("gan_loss", d.gan_loss, c.gan_loss, 2e-2);
    }
    if c.rl_step {
        close("mean_reward", d.mean_reward, c.mean_reward, 2e-2);
        // group-normalised advantages magnify the logits' bf16 noise: finite and same sign
        assert!(
            d.rl_loss.is_finite() && (d.rl_loss * c.rl_loss >= 0.0 || c.rl_loss.abs() < 1e-3),
            "rl_loss: device {} vs CPU {}",
            d.rl_loss,
            c.rl_loss
        );
    }
}

/// cos of the angle between two parameter updates.
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64) * (*y as f64))
        .sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b)).max(1e-30)
}

fn delta(after: &Tensor, before: &Tensor) -> Vec<f32> {
    after
        .f32s()
        .iter()
        .zip(before.f32s())
        .map(|(a, b)| a - b)
        .collect()
}

#[test]
fn the_device_iteration_follows_the_cpu_trainer() {
    for dev in devices() {
        let mut cpu = AdvDmd::new(common::tiny_shapes_model(1, true), config());
        let mut gpu = DeviceAdvDmd::from_host(&dev, &cpu, DeviceRunOptions::default()).unwrap();
        let watch = [
            "final_layer.linear.weight",
            "joint_blocks.0.x_block.mlp.fc2.weight",
        ];
        let before: Vec<(Tensor, Tensor)> = watch
            .iter()
            .map(|w| {
                (
                    cpu.generator.mmdit.params.param(w).value(),
                    cpu.fake.mmdit.params.param(w).value(),
                )
            })
            .collect();
        for it in 0..2 {
            let batch = shapes_batch(&cpu.teacher, 2, 2, &mut gpu.rng).unwrap();
            let c = cpu.step().unwrap();
            let d = gpu.step(&batch).unwrap();
            assert_eq!(c.generator_step, it == 0);
            assert!(
                !c.generator_step || c.rl_step,
                "iteration 0 carries the RL term"
            );
            compare(it, &d, &c);
        }
        // the updates of both iterations: the same direction on the device
        let named = |p: &advdmd::nn::device::DeviceParams| {
            p.download_named(&p.master)
                .unwrap()
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let (g_dev, f_dev) = (named(&gpu.generator), named(&gpu.fake));
        for (w, (g0, f0)) in watch.iter().zip(&before) {
            let gc = delta(&cpu.generator.mmdit.params.param(w).value(), g0);
            let fc = delta(&cpu.fake.mmdit.params.param(w).value(), f0);
            let (gd, fd) = (delta(&g_dev[*w], g0), delta(&f_dev[*w], f0));
            let (cg, cf) = (cosine(&gd, &gc), cosine(&fd, &fc));
            println!(
                "{w} on {}: update cosine generator {cg:.3}, fake {cf:.3}",
                dev.name()
            );
            assert!(
                cg > 0.8 && cf > 0.8,
                "{w}: updates differ (cos {cg:.3}, {cf:.3})"
            );
        }
    }
}

#[test]
fn bad_batches_and_unsupported_settings_are_refused() {
    let dev = KernelDevice::emulator();
    let cpu = AdvDmd::new(common::tiny_shapes_model(1, true), config());
    let mut gpu = DeviceAdvDmd::from_host(&dev, &cpu, DeviceRunOptions::default()).unwrap();
    // three prompts' worth for a two-prompt configuration
    let batch = shapes_batch(&cpu.teacher, 3, 2, &mut gpu.rng).unwrap();
    assert!(gpu.step(&batch).is_err());
    let nothing = DeviceRunOptions {
        keep: Keep::Nothing,
        ..Default::default()
    };
    assert!(DeviceAdvDmd::from_host(&dev, &cpu, nothing).is_err());
}

/// The discriminator frozen after the first iteration (`frozen_disc_after`): the device run
/// follows the CPU trainer's metrics through the freeze, the head stops moving while the fake
/// score goes on training, and (emulator) a checkpoint written after the freeze carries the
/// snapshot the resumed device run evaluates, bit for bit.
#[test]
fn a_frozen_discriminator_follows_the_cpu_trainer() {
    let frozen_config = AdvDmdConfig {
        frozen_disc_after: Some(1),
        ..config()
    };
    for dev in devices() {
        let mut cpu = AdvDmd::new(common::tiny_shapes_model(1, true), frozen_config.clone());
        let mut gpu = DeviceAdvDmd::from_host(&dev, &cpu, DeviceRunOptions::default()).unwrap();
        let head_at = |g: &DeviceAdvDmd| dev.download(&g.head.params.master).unwrap();
        let fake_at = |g: &DeviceAdvDmd| dev.download(&g.fake.params.master).unwrap();
        let mut head_after_first = None;
        for it in 0..3 {
            let batch = shapes_batch(&cpu.teacher, 2, 2, &mut gpu.rng).unwrap();
            let c = cpu.step().unwrap();
            let (head0, fake0) = (head_at(&gpu), fake_at(&gpu));
            let d = gpu.step(&batch).unwrap();
            compare(it, &d, &c);
            assert_eq!(cpu.disc_frozen(), it >= 1);
            assert_eq!(gpu.frozen_backbone.is_some(), it >= 1);
            if it >= 1 {
                assert_eq!(
                    head_at(&gpu),
                    head0,
                    "iteration {it}: the frozen head moved"
                );
                assert_ne!(
                    fake_at(&gpu),
                    fake0,
                    "iteration {it}: the fake score stopped"
                );
            } else {
                head_after_first = Some(head_at(&gpu));
                assert_ne!(
                    head_after_first.as_ref(),
                    Some(&head0),
                    "the head did not train"
                );
            }
        }
        assert_eq!(Some(head_at(&gpu)), head_after_first);
        if !dev.is_emulator() {
            continue;
        }
        let mut host = AdvDmd::new(common::tiny_shapes_model(1, true), frozen_config.clone());
        gpu.sync_to_host(&mut host).unwrap();
        let dir = ScratchDir::new("device-frozen");
        let path = dir.join("state.safetensors");
        host.save(&path).unwrap();
        let loaded = AdvDmd::load(
            &path,
            common::tiny_shapes_model(1, true),
            frozen_config.clone(),
        )
        .unwrap();
        assert!(loaded.disc_frozen());
        let resumed = DeviceAdvDmd::from_host(&dev, &loaded, DeviceRunOptions::default()).unwrap();
        let weights = |g: &DeviceAdvDmd| {
            dev.download(&g.frozen_backbone.as_ref().unwrap().params.weights)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        // the resumed snapshot is laid out as a frozen upload: compare by name
        let named = |g: &DeviceAdvDmd| {
            g.frozen_backbone
                .as_ref()
                .unwrap()
                .params
                .download_weights_named()
                .unwrap()
                .into_iter()
                .map(|(n, t)| (n, t.f32s().iter().map(|v| v.to_bits()).collect::<Vec<_>>()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        assert!(!weights(&gpu).is_empty());
        assert_eq!(
            named(&resumed),
            named(&gpu),
            "the resumed frozen snapshot differs"
        );
        assert_eq!(head_at(&resumed), head_at(&gpu));
    }
}

/// A run built on the device from a bare MMDiT (as `bench step` builds the SD3 presets), with
/// activation checkpointing and graphs: iterations of every kind run, the generator and fake score move,
/// the teacher and the EMA's distance from the generator behave.
#[test]
fn a_fresh_checkpointed_run_trains_the_generator_and_not_the_teacher() {
    for dev in devices() {
        fresh_run(&dev);
    }
}

fn fresh_run(dev: &KernelDevice) {
    let dev = dev.clone();
    let shapes = common::tiny_shapes_model(1, true);
    let teacher = &shapes.mmdit;
    // checkpointed, with bf16 moments: the configuration that fits SD3.5-medium in 80 GB; the
    // generator's kind recorded into a graph on its second run (iteration 2) and launched
    let opts = DeviceRunOptions {
        keep: Keep::BlockInputs,
        bf16_moments: true,
        graph: true,
    };
    let mut run =
        DeviceAdvDmd::new(&dev, (&teacher.config, &teacher.params), config(), opts).unwrap();
    let n_g = run.generator.n_trainable + run.fake.n_trainable + run.head.params.n_trainable;
    assert_eq!(
        run.optimizer_bytes(),
        4 * n_g,
        "bf16 moments: 4 bytes a trained parameter"
    );
    assert!(run.fake.shares_grads_with(&run.generator));
    let batch = shapes_batch(&shapes, 2, 2, &mut advdmd::Rng::new(4)).unwrap();
    let w = "final_layer.linear.weight";
    let get = |p: &advdmd::nn::device::DeviceParams, flat: &advdmd::device::kernel::DevBuf<f32>| {
        p.download_named(flat)
            .unwrap()
            .into_iter()
            .find(|(n, _)| n == w)
            .unwrap()
            .1
    };
    let g0 = get(&run.generator, &run.generator.master);
    let f0 = get(&run.fake, &run.fake.master);
    for it in 0..3 {
        let m = run.step(&batch).unwrap();
        assert_eq!(m.generator_step, it % 2 == 0, "{m:?}");
        assert!(m.fake_loss.is_finite() && m.d_loss.is_finite(), "{m:?}");
        if m.generator_step {
            assert!(m.rl_step && m.dmd_grad_norm.is_finite() && m.gan_loss.is_finite());
        }
    }
    let g1 = get(&run.generator, &run.generator.master);
    let f1 = get(&run.fake, &run.fake.master);
    assert!(
        delta(&g1, &g0).iter().any(|d| *d != 0.0),
        "the generator did not move"
    );
    assert!(
        delta(&f1, &f0).iter().any(|d| *d != 0.0),
        "the fake score did not move"
    );
    // the teacher's bf16 weights are the CPU teacher's, rounded
    let t = run.teacher.weight(w).unwrap();
    let host: Vec<f32> = dev
        .download(&*t)
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let want = teacher.params.param(w).value();
    let worst = host
        .iter()
        .zip(want.f32s())
        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
        .fold(0f32, f32::max);
    assert!(worst < 1e-2, "teacher weights moved: {worst}");
    // the EMA (decay 0.99 from the initial weights) lags the generator: between the two
    let ema: std::collections::BTreeMap<_, _> = run.ema_named().unwrap().into_iter().collect();
    let (lag, moved): (f64, f64) = ema[w]
        .f32s()
        .iter()
        .zip(g0.f32s().iter().zip(g1.f32s()))
        .map(|(e, (a, b))| (((e - a) as f64).abs(), ((b - a) as f64).abs()))
        .fold((0.0, 0.0), |(x, y), (a, b)| (x + a, y + b));
    assert!(
        lag > 0.0 && lag < 0.1 * moved,
        "EMA moved {lag} for the generator's {moved}"
    );
}

/// A device run written through the CPU trainer's checkpoint (`sync_to_host` + `AdvDmd::save`)
/// and read back (`AdvDmd::load` + `from_host`) continues exactly: after a generator and a
/// critic iteration, saved, then the next generator iteration, every weight, the EMA and the
/// metrics equal a straight run's bit for bit (the emulator is deterministic). With bf16
/// moments, which the f32 checkpoint holds exactly.
#[test]
fn a_saved_and_resumed_device_run_continues_exactly() {
    // Bit-exact only where the arithmetic is deterministic: the GPU's attention backward adds dQ
    // with atomics, so two straight GPU runs already differ in the last bits. The emulator is.
    if std::env::var("ADVDMD_KERNEL_TESTS_GPU_ONLY").is_ok_and(|v| v == "1") {
        eprintln!("resume bit-exactness: emulator-only test, skipped under ADVDMD_KERNEL_TESTS_GPU_ONLY=1 (CI runs it)");
        return;
    }
    let dev = KernelDevice::emulator();
    let opts = DeviceRunOptions {
        keep: Keep::All,
        bf16_moments: true,
        graph: false,
    };
    let step = |run: &mut DeviceAdvDmd, host: &AdvDmd| {
        let b = shapes_batch(&host.teacher, 2, 2, &mut run.rng).unwrap();
        run.step(&b).unwrap()
    };
    let host = AdvDmd::new(common::tiny_shapes_model(1, true), config());
    let mut straight = DeviceAdvDmd::from_host(&dev, &host, opts).unwrap();
    let mut last = None;
    for _ in 0..3 {
        last = Some(step(&mut straight, &host));
    }

    let mut host = AdvDmd::new(common::tiny_shapes_model(1, true), config());
    let mut run = DeviceAdvDmd::from_host(&dev, &host, opts).unwrap();
    step(&mut run, &host);
    step(&mut run, &host);
    run.sync_to_host(&mut host).unwrap();
    let dir = ScratchDir::new("device-resume");
    let path = dir.join("state.safetensors");
    host.save(&path).unwrap();
    drop(run);
    let loaded = AdvDmd::load(&path, common::tiny_shapes_model(1, true), config()).unwrap();
    let mut resumed = DeviceAdvDmd::from_host(&dev, &loaded, opts).unwrap();
    let m = step(&mut resumed, &loaded);

    let last = last.unwrap();
    assert!(m.generator_step && m.rl_step, "{m:?}");
    assert_eq!(
        format!("{m:?}"),
        format!("{last:?}"),
        "metrics of the third iteration"
    );
    assert_eq!(
        (resumed.iteration, resumed.generator_steps),
        (straight.iteration, straight.generator_steps)
    );
    let flat = |p: &advdmd::nn::device::DeviceParams| dev.download(&p.master).unwrap();
    for (what, a, b) in [
        (
            "generator",
            flat(&resumed.generator),
            flat(&straight.generator),
        ),
        ("fake score", flat(&resumed.fake), flat(&straight.fake)),
        (
            "head",
            flat(&resumed.head.params),
            flat(&straight.head.params),
        ),
        (
            "EMA",
            dev.download(&resumed.ema).unwrap(),
            dev.download(&straight.ema).unwrap(),
        ),
    ] {
        let differ = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        assert_eq!(differ, 0, "{what}: {differ} of {} values differ", a.len());
    }
}

/// Every kind of iteration replayed from a CUDA graph (`--graph`), with selective activation
/// checkpointing: a run recording each kind on its second occurrence and replaying it after gives
/// a direct run's (keeping every activation) metrics, weights and EMA:
/// bit for bit on the emulator (the replay runs the recorded launches on each iteration's newly
/// staged draws and conditioning), within bf16 noise on a GPU. (The freeze's new kinds take the
/// same path; `a_frozen_discriminator_follows_the_cpu_trainer` covers the freeze itself.)
#[test]
fn graph_replayed_iterations_equal_direct_ones() {
    for dev in devices() {
        // one prompt, two samples: the emulator's cheapest iteration that still has groups
        let config = AdvDmdConfig {
            prompts: 1,
            ..config()
        };
        let host = AdvDmd::new(common::tiny_shapes_model(1, true), config);
        // the graphed run also checkpoints selectively: its recomputations read the records'
        // buffers through aliases, inside the recorded graph
        let opts = |graph, keep| DeviceRunOptions {
            graph,
            keep,
            ..DeviceRunOptions::default()
        };
        let mut direct = DeviceAdvDmd::from_host(&dev, &host, opts(false, Keep::All)).unwrap();
        let graphed_opts = opts(true, Keep::Selective);
        let mut graphed = DeviceAdvDmd::from_host(&dev, &host, graphed_opts).unwrap();
        let mut rng = advdmd::Rng::new(9);
        let exact = dev.is_emulator();
        for it in 0..6 {
            // new prompts and real samples each iteration: the replay must read them
            let batch = shapes_batch(&host.teacher, 1, 2, &mut rng).unwrap();
            let (a, b) = (direct.step(&batch).unwrap(), graphed.step(&batch).unwrap());
            println!(
                "iteration {it} on {} (generator {}, rl {}): direct d_loss {} / graphed {}",
                dev.name(),
                a.generator_step,
                a.rl_step,
                a.d_loss,
                b.d_loss
            );
            if exact {
                assert_eq!(format!("{a:?}"), format!("{b:?}"), "iteration {it}");
            } else {
                compare(it, &b, &a);
            }
        }
        // kinds alternate (generator + RL, critic): each recorded at its second run (iterations
        // 2, 3), replayed at its third (4, 5)
        assert_eq!((direct.graph_replays(), graphed.graph_replays()), (0, 2));
        assert_same_weights(&dev, &direct, &graphed, "after replays");
    }
}

/// Every trained parameter (generator, fake score, discriminator head) and the EMA of two runs
/// agree: bit for bit on the emulator, within bf16 noise (5e-2 relative) on a GPU.
fn assert_same_weights(dev: &KernelDevice, a: &DeviceAdvDmd, b: &DeviceAdvDmd, when: &str) {
    let flat = |r: &DeviceAdvDmd| {
        let mut v = dev.download(&r.generator.master).unwrap();
        v.extend(dev.download(&r.fake.master).unwrap());
        v.extend(dev.download(&r.head.params.master).unwrap());
        v.extend(dev.download(&r.ema).unwrap());
        v
    };
    let (x, y) = (flat(a), flat(b));
    if dev.is_emulator() {
        assert!(x == y, "weights differ {when}");
    } else {
        let worst = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (p - q).abs() / p.abs().max(1e-2))
            .fold(0f32, f32::max);
        assert!(
            worst < 5e-2,
            "weights differ by {worst} {when} on {}",
            dev.name()
        );
    }
}

/// Iterations queued one ahead (`step_queued`, each one's metrics read by `finish` after the
/// next is queued; uploads through pinned memory, graphs recorded and replayed) give waited-for
/// iterations' metrics and weights: bit for bit on the emulator, within bf16 noise on a GPU.
#[test]
fn iterations_queued_ahead_equal_waited_ones() {
    for dev in devices() {
        let config = AdvDmdConfig {
            prompts: 1,
            ..config()
        };
        let host = AdvDmd::new(common::tiny_shapes_model(1, true), config);
        let opts = DeviceRunOptions {
            graph: true,
            ..DeviceRunOptions::default()
        };
        let mut waited = DeviceAdvDmd::from_host(&dev, &host, opts).unwrap();
        let mut queued = DeviceAdvDmd::from_host(&dev, &host, opts).unwrap();
        let mut rng = advdmd::Rng::new(11);
        // kinds alternate: each recorded at its second run (iterations 2, 3), the first replayed
        // at iteration 4
        let batches: Vec<_> = (0..5)
            .map(|_| shapes_batch(&host.teacher, 1, 2, &mut rng).unwrap())
            .collect();
        let a: Vec<IterMetrics> = batches.iter().map(|b| waited.step(b).unwrap()).collect();
        dev.set_async_copies(true);
        let mut b = Vec::new();
        let mut in_flight = None;
        for batch in &batches {
            let q = queued.step_queued(batch).unwrap();
            if let Some(prev) = in_flight.replace(q) {
                b.push(queued.finish(prev).unwrap());
            }
        }
        b.push(queued.finish(in_flight.unwrap()).unwrap());
        dev.set_async_copies(false);
        assert_eq!(queued.graph_replays(), 1);
        for (it, (x, y)) in a.iter().zip(&b).enumerate() {
            if dev.is_emulator() {
                assert_eq!(format!("{x:?}"), format!("{y:?}"), "iteration {it}");
            } else {
                compare(it, y, x);
            }
        }
        assert_same_weights(&dev, &waited, &queued, "when queued ahead");
    }
}

/// The iteration with the text tokens' work on a second stream (every model call forks and
/// joins, the emulator checking each) gives the one-stream iteration's metrics: exactly on the
/// emulator, within bf16 noise on a GPU (its attention backward sums dQ in no fixed order).
#[test]
fn two_streams_run_the_iteration_as_one_does() {
    for dev in devices() {
        let run = |streams: usize| {
            dev.set_streams(streams).unwrap();
            let cpu = AdvDmd::new(common::tiny_shapes_model(1, true), config());
            let mut d = DeviceAdvDmd::from_host(&dev, &cpu, DeviceRunOptions::default()).unwrap();
            let metrics: Vec<IterMetrics> = (0..2)
                .map(|_| {
                    let batch = shapes_batch(&cpu.teacher, 2, 2, &mut d.rng).unwrap();
                    d.step(&batch).unwrap()
                })
                .collect();
            dev.set_streams(1).unwrap();
            metrics
        };
        let (one, two) = (run(1), run(2));
        let tol = if dev.is_emulator() { 0.0 } else { 2e-2 };
        for (a, b) in one.iter().zip(&two) {
            println!(
                "streams on {}: one {a:?}\n             two {b:?}",
                dev.name()
            );
            assert_eq!((a.generator_step, a.rl_step), (b.generator_step, b.rl_step));
            close("fake_loss", b.fake_loss, a.fake_loss, tol);
            close("d_loss", b.d_loss, a.d_loss, tol);
            close("dmd_grad_norm", b.dmd_grad_norm, a.dmd_grad_norm, tol);
            close("gan_loss", b.gan_loss, a.gan_loss, tol);
            close("mean_reward", b.mean_reward, a.mean_reward, tol);
        }
    }
}

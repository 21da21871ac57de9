//! The device MMDiT (`mmdit::device`: bf16 weights and activations, f32 masters and gradients)
//! against the CPU oracle, through the SIMT emulator here and on the GPU when there is one:
//! the output, the inputs' gradients and every parameter's gradient within bf16 tolerance
//! (relative L2 ≤ 2e-2, issue 8).
//!
//! * A random head-dim-64 model (the fused attention kernels, an MMDiT-X block, a cropped
//!   position grid) against the CPU model: every tensor within 2e-2.
//! * The reference fixtures (head dim 16: the attention fallback; MMDiT-X blocks) against the
//!   reference's own values. Their weights make some gradients sensitive beyond what bf16 can
//!   hold: the f32 CPU model run on the weights and inputs merely *rounded* to bf16 already misses
//!   2e-2 on some tensors (`sd35m_tiny`: dx 1.5e-2, parameter gradients median 1.3e-2, worst
//!   3.3e-2). That run is the floor; each tensor must be within max(2e-2, 4 × its floor).
//!   Gradients below 1e-4 of the largest parameter gradient's norm are cancellation residue
//!   (`sd35m_tiny`'s block-1 image-only attention: q/k gradients 1e-5 of its v gradient, nearly
//!   one-hot rows) that bf16 activations cannot resolve; they must be within 0.5 — a missing or
//!   wrong term shows as ≥ 1 (before the fallback's exact row term they were at 10–30).

mod common;

use advdmd::autograd::backward;
use advdmd::checkpoint::SafetensorsFile;
use advdmd::device::kernel::{DevBuf, KernelDevice};
use advdmd::mmdit::checkpoint::diffusers_part;
use advdmd::mmdit::device::{DeviceMmdit, Keep};
use advdmd::mmdit::init::init_params;
use advdmd::mmdit::layout::original_to_diffusers;
use advdmd::mmdit::{Mmdit, MmditCheckpoint, MmditConfig, MmditInputs};
use advdmd::{Rng, Tensor, Var};
use half::bf16;
use std::collections::BTreeMap;
use std::path::Path;

/// bf16 tolerance on outputs and gradients (relative L2).
const TOL: f64 = 2e-2;

/// How far above the bf16-rounding floor a fixture tensor may be (the device also rounds every
/// activation to bf16, which the floor run does not).
const FLOOR_FACTOR: f64 = 4.0;

/// Below this fraction of the largest parameter gradient's norm a gradient is cancellation
/// residue, held to [`RESIDUE_TOL`].
const RESIDUE_NORM: f64 = 1e-4;
const RESIDUE_TOL: f64 = 0.5;

fn l2(t: &Tensor) -> f64 {
    t.f32s()
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

/// A copy of `m` with every weight rounded to bf16 (the floor runs' model).
fn rounded(m: &Mmdit) -> Mmdit {
    let r = Mmdit::new(m.config.clone(), m.params.duplicate());
    for (_, p) in r.params.iter() {
        p.set_value(round_bf16(&p.value()));
    }
    r
}

fn round_bf16(t: &Tensor) -> Tensor {
    let v = t
        .f32s()
        .iter()
        .map(|&x| bf16::from_f32(x).to_f32())
        .collect();
    Tensor::from_vec(v, t.shape())
}

fn devices() -> Vec<KernelDevice> {
    common::kernel_devices("mmdit_device")
}

fn to_bf16(t: &Tensor) -> Vec<bf16> {
    t.f32s().iter().map(|&x| bf16::from_f32(x)).collect()
}

fn download(dev: &KernelDevice, b: &DevBuf<bf16>, shape: &[usize]) -> Tensor {
    let v: Vec<f32> = dev
        .download(b)
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect();
    Tensor::from_vec(v, shape)
}

struct Check {
    what: String,
    failures: Vec<String>,
}

impl Check {
    fn new(what: String) -> Check {
        Check {
            what,
            failures: vec![],
        }
    }
    fn rel(&mut self, name: &str, got: &Tensor, want: &Tensor) -> f64 {
        self.within(name, got, want, TOL)
    }
    fn within(&mut self, name: &str, got: &Tensor, want: &Tensor, tol: f64) -> f64 {
        let err = got.rel_l2(want);
        if err.is_nan() || err > tol {
            let norm = |t: &Tensor| t.f32s().iter().map(|v| (v * v) as f64).sum::<f64>().sqrt();
            println!(
                "  {name:<64} {err:.3e} > {tol:.3e}  FAIL (|got| {:.3e}, |want| {:.3e})",
                norm(got),
                norm(want)
            );
            self.failures.push(format!("{name}: {err:.3e} > {tol:.3e}"));
        }
        err
    }
    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{}: {} comparisons above their bound: {:?}",
            self.what,
            self.failures.len(),
            self.failures
        );
    }
}

/// The device model's forward and backward for `x, t, pooled, context` seeded with `seed`:
/// (velocity, dx, dpooled, dcontext, named parameter gradients).
fn device_run(
    dev: &KernelDevice,
    model: &Mmdit,
    (x, t, pooled, ctx): (&Tensor, &[f32], &Tensor, &Tensor),
    seed: &Tensor,
) -> (Tensor, Tensor, Tensor, Tensor, Vec<(String, Tensor)>) {
    let m = DeviceMmdit::new(dev, model).unwrap();
    let inputs = m.inputs(x, t, pooled, ctx).unwrap();
    let fwd = m.forward(&inputs, Keep::All).unwrap();
    let dv = dev.upload(&to_bf16(seed)).unwrap();
    let g = m
        .backward(&inputs, fwd.saved.as_ref().unwrap(), &dv, true)
        .unwrap();
    (
        download(dev, &fwd.velocity, seed.shape()),
        download(dev, &g.x, x.shape()),
        download(dev, &g.pooled, pooled.shape()),
        download(dev, &g.context, ctx.shape()),
        m.download_named(m.grads().unwrap()).unwrap(),
    )
}

/// The f32 CPU model on bf16-rounded weights, inputs and seed: output, dx, dcontext and the
/// parameter gradients in the diffusers layout (what the fixture stores).
fn floor_run(
    dir: &Path,
    (x, t, pooled, ctx): (&Tensor, &[f32], &Tensor, &Tensor),
    seed: &Tensor,
) -> (Tensor, Tensor, Tensor, BTreeMap<String, Tensor>) {
    let ckpt = MmditCheckpoint::open(dir.join("original.safetensors")).unwrap();
    let params = ckpt.load_params().unwrap();
    for (_, p) in params.iter() {
        p.set_value(round_bf16(&p.value()));
    }
    let model = Mmdit::new(ckpt.config.clone(), params);
    let (xv, pv, cv) = (
        Var::input(round_bf16(x)),
        Var::input(round_bf16(pooled)),
        Var::input(round_bf16(ctx)),
    );
    let out = model.forward(&MmditInputs {
        x: &xv,
        timestep: t,
        pooled: &pv,
        context: &cv,
    });
    let g = backward(&[(&out, round_bf16(seed))]);
    let mut grads = BTreeMap::new();
    for (name, p) in model.params.iter() {
        if let Some(gr) = p.grad() {
            for (key, part) in original_to_diffusers(name, model.config.depth).unwrap() {
                grads.insert(key, diffusers_part(&gr, &part));
            }
        }
    }
    (
        out.value().clone(),
        g.get(&xv).unwrap().clone(),
        g.get(&cv).unwrap().clone(),
        grads,
    )
}

#[test]
fn the_device_mmdit_matches_the_reference_fixtures() {
    let dirs = common::fixture_dirs();
    for dir in &dirs {
        let ckpt = MmditCheckpoint::open(dir.join("original.safetensors")).unwrap();
        let model = Mmdit::new(ckpt.config.clone(), ckpt.load_params().unwrap());
        let fb = SafetensorsFile::open(dir.join("forward_backward.safetensors")).unwrap();
        let get = |k: &str| fb.load_f32(k, None).unwrap();
        let (x, ctx, pooled) = (
            get("hidden_states"),
            get("encoder_hidden_states"),
            get("pooled_projections"),
        );
        let t = get("timestep").to_vec();
        let seed = get("grad_seed");
        let inputs = (&x, t.as_slice(), &pooled, &ctx);
        let (f_out, f_dx, f_dctx, f_grads) = floor_run(dir, inputs, &seed);
        for dev in devices() {
            let (v, dx, _, dctx, grads) = device_run(&dev, &model, inputs, &seed);
            let mut check = Check::new(format!("{} on {}", dir.display(), dev.name()));
            let mut compared = 0;
            let (mut above_tol, mut worst_ratio) = (0, (0f64, String::new()));
            let largest = fb
                .names()
                .iter()
                .filter(|k| k.starts_with("grad_param."))
                .map(|k| l2(&get(k)))
                .fold(0f64, f64::max);
            let mut compare = |check: &mut Check, name: &str, got: &Tensor, floor: &Tensor| {
                let want = get(name);
                let floor_err = floor.rel_l2(&want);
                let residue = name.starts_with("grad_param.") && l2(&want) < RESIDUE_NORM * largest;
                let bound = if residue {
                    RESIDUE_TOL
                } else {
                    TOL.max(FLOOR_FACTOR * floor_err)
                };
                let err = check.within(name, got, &want, bound);
                if err > TOL {
                    above_tol += 1;
                }
                if err / floor_err.max(1e-12) > worst_ratio.0 {
                    worst_ratio = (err / floor_err.max(1e-12), name.to_string());
                }
                compared += 1;
                (err, floor_err)
            };
            let e_out = compare(&mut check, "output", &v, &f_out);
            let e_dx = compare(&mut check, "grad_hidden_states", &dx, &f_dx);
            let e_dc = compare(&mut check, "grad_encoder_hidden_states", &dctx, &f_dctx);
            for (name, g) in &grads {
                if name == "pos_embed" {
                    continue; // a buffer in the reference: no gradient to compare
                }
                for (key, part) in original_to_diffusers(name, model.config.depth).unwrap() {
                    let key = format!("grad_param.{key}");
                    let floor = &f_grads[key.strip_prefix("grad_param.").unwrap()];
                    compare(&mut check, &key, &diffusers_part(g, &part), floor);
                }
            }
            let expected = fb
                .names()
                .iter()
                .filter(|k| k.starts_with("grad_param."))
                .count();
            assert_eq!(compared, expected + 3, "tensors compared");
            println!(
                "{} on {}: (device error, bf16 floor) output {:.2e} ({:.2e}), dx {:.2e} ({:.2e}), \
                 dcontext {:.2e} ({:.2e}); {above_tol} of {compared} tensors above {TOL:e}; \
                 largest device/floor ratio {:.2} ({})",
                dir.file_name().unwrap().to_string_lossy(),
                dev.name(),
                e_out.0,
                e_out.1,
                e_dx.0,
                e_dx.1,
                e_dc.0,
                e_dc.1,
                worst_ratio.0,
                worst_ratio.1
            );
            check.finish();
        }
    }
}

/// A head-dim-64 model (the fused attention kernels) with every parameter random, so that no
/// zero-initialised modulation hides a path.
fn random_model() -> Mmdit {
    random_model_seeded(17)
}

fn random_model_seeded(seed: u64) -> Mmdit {
    let config = MmditConfig {
        depth: 3,
        hidden: 128,
        heads: 2,
        head_dim: 64,
        patch: 2,
        in_channels: 3,
        out_channels: 3,
        pos_embed_max_size: 8,
        context_dim: 40,
        pooled_dim: 24,
        freq_dim: 256,
        mlp_hidden: 512,
        qk_norm: true,
        dual_attention_blocks: vec![1],
    };
    let mut rng = Rng::new(seed);
    let params = init_params(&config, &mut rng);
    for (name, p) in params.iter() {
        let v = p.value();
        let fan_in = if v.rank() >= 2 {
            v.numel() / v.shape()[0]
        } else {
            16
        };
        let std = if name.contains("ln_") {
            0.2
        } else {
            (1.0 / fan_in as f32).sqrt()
        };
        let base = if name.contains("ln_") { 1.0 } else { 0.0 };
        let data: Vec<f32> = (0..v.numel()).map(|_| base + std * rng.normal()).collect();
        p.set_value(Tensor::from_vec(data, v.shape()));
        p.set_trainable(true);
    }
    Mmdit::new(config, params)
}

#[test]
fn the_device_mmdit_matches_the_cpu_model_at_head_dim_64() {
    let model = random_model();
    let mut rng = Rng::new(5);
    let mut randn = |shape: &[usize]| Tensor::randn(shape, &mut rng);
    // a 6×4 patch grid inside the 8×8 position table: the centred crop is off the corner
    let (x, pooled, ctx) = (randn(&[2, 3, 12, 8]), randn(&[2, 24]), randn(&[2, 7, 40]));
    let seed = randn(&[2, 3, 12, 8]);
    let t = [250.0, 875.0];

    let (xv, pv, cv) = (
        Var::input(x.clone()),
        Var::input(pooled.clone()),
        Var::input(ctx.clone()),
    );
    let out = model.forward(&MmditInputs {
        x: &xv,
        timestep: &t,
        pooled: &pv,
        context: &cv,
    });
    let cpu = backward(&[(&out, seed.clone())]);

    for dev in devices() {
        let (v, dx, dp, dc, grads) = device_run(&dev, &model, (&x, &t, &pooled, &ctx), &seed);
        let mut check = Check::new(format!("head dim 64 on {}", dev.name()));
        let errs = [
            check.rel("output", &v, out.value()),
            check.rel("grad x", &dx, cpu.get(&xv).unwrap()),
            check.rel("grad pooled", &dp, cpu.get(&pv).unwrap()),
            check.rel("grad context", &dc, cpu.get(&cv).unwrap()),
        ];
        let mut worst = (0f64, String::new());
        for (name, g) in &grads {
            let want = model.params.param(name).grad().unwrap_or_else(|| {
                panic!("the CPU model gave {name} no gradient");
            });
            let err = check.rel(&format!("grad {name}"), g, &want);
            if err > worst.0 || worst.1.is_empty() {
                worst = (err, name.clone());
            }
        }
        println!(
            "head dim 64 on {}: output {:.2e}, dx {:.2e}, dpooled {:.2e}, dcontext {:.2e}, worst of {} parameter grads {:.2e} ({})",
            dev.name(),
            errs[0],
            errs[1],
            errs[2],
            errs[3],
            grads.len(),
            worst.0,
            worst.1
        );
        check.finish();
    }
}

#[test]
fn inputs_that_do_not_fit_are_refused() {
    let model = random_model();
    let dev = KernelDevice::emulator();
    let m = DeviceMmdit::new(&dev, &model).unwrap();
    let z = |s: &[usize]| Tensor::zeros(s);
    // 4 channels for a 3-channel model; an odd height; a 20×20 grid beyond the 8×8 table
    for x in [z(&[1, 4, 8, 8]), z(&[1, 3, 7, 8]), z(&[1, 3, 40, 40])] {
        assert!(m.inputs(&x, &[1.0], &z(&[1, 24]), &z(&[1, 5, 40])).is_err());
    }
    assert!(m
        .inputs(
            &z(&[1, 3, 8, 8]),
            &[1.0, 2.0],
            &z(&[1, 24]),
            &z(&[1, 5, 40])
        )
        .is_err());
    assert!(m
        .inputs(&z(&[1, 3, 8, 8]), &[1.0], &z(&[1, 24]), &z(&[1, 5, 41]))
        .is_err());
    // a forward that kept nothing cannot be differentiated
    let inputs = m
        .inputs(&z(&[1, 3, 8, 8]), &[1.0], &z(&[1, 24]), &z(&[1, 5, 40]))
        .unwrap();
    let fwd = m.forward(&inputs, Keep::Nothing).unwrap();
    assert!(fwd.saved.is_none());
}

/// The fixture's 4-step CFG Euler trajectory (conditional = sample 0, unconditional = zeros) with
/// the whole loop on the device, against the reference's final latents (relative L2 ≤ 2e-2).
#[test]
fn the_device_euler_sampler_follows_the_reference_trajectory() {
    use advdmd::flow::device::{sample_euler, Guidance};
    use advdmd::flow::reference_sigmas;
    use advdmd::kernels::shape::split;
    for dir in common::fixture_dirs() {
        let ckpt = MmditCheckpoint::open(dir.join("original.safetensors")).unwrap();
        let model = Mmdit::new(ckpt.config.clone(), ckpt.load_params().unwrap());
        let fb = SafetensorsFile::open(dir.join("forward_backward.safetensors")).unwrap();
        let s = SafetensorsFile::open(dir.join("sampling.safetensors")).unwrap();
        let first = |t: Tensor| {
            let n = t.shape()[0];
            split(&t, 0, &[1, n - 1]).swap_remove(0)
        };
        let ctx = first(fb.load_f32("encoder_hidden_states", None).unwrap());
        let pooled = first(fb.load_f32("pooled_projections", None).unwrap());
        let (zc, zp) = (Tensor::zeros(ctx.shape()), Tensor::zeros(pooled.shape()));
        let w = s.load_f32("cfg_guidance_scale", None).unwrap().item();
        let init = s.load_f32("cfg_init_latents", None).unwrap();
        let want = s.load_f32("cfg_final_latents", None).unwrap();
        let sig = reference_sigmas(4, 3.0);
        for dev in devices() {
            let m = DeviceMmdit::new(&dev, &model).unwrap();
            let guidance = Some(Guidance {
                pooled: &zp,
                context: &zc,
                scale: w,
            });
            let x = sample_euler(&m, &init, &sig, &pooled, &ctx, guidance).unwrap();
            let err = x.rel_l2(&want);
            println!(
                "{} on {}: 4-step CFG trajectory, final latents {err:.2e}",
                dir.file_name().unwrap().to_string_lossy(),
                dev.name()
            );
            assert!(err <= TOL, "device trajectory {err:e} > {TOL:e}");
            // without guidance the loop runs the plain batch: one call per step
            let plain = sample_euler(&m, &init, &sig, &pooled, &ctx, None).unwrap();
            assert!(plain.rel_l2(&x) > 1e-3, "guidance changed nothing");
        }
    }
}

/// What the sampler plans' tests share: 3 steps of the reference schedule and classifier-free
/// guidance at 2.5 with zero unconditional inputs (2 samples).
struct PlanCase {
    sig: Vec<f32>,
    up: Tensor,
    uc: Tensor,
}

impl PlanCase {
    const SCALE: f32 = 2.5;

    fn new() -> PlanCase {
        PlanCase {
            sig: advdmd::flow::reference_sigmas(3, 3.0),
            up: Tensor::zeros(&[2, 24]),
            uc: Tensor::zeros(&[2, 5, 40]),
        }
    }

    fn guide(&self) -> Option<advdmd::flow::device::Guidance<'_>> {
        Some(advdmd::flow::device::Guidance {
            pooled: &self.up,
            context: &self.uc,
            scale: Self::SCALE,
        })
    }
}

/// The reusable Euler plan — inputs overwritten in place, the loop replayed from a CUDA graph
/// from the second sample on (recorded and replayed by the emulator too) — samples what
/// `sample_euler` samples, for new noise and conditioning each time: bit for bit on the emulator
/// (the replay runs the same launches), within 1e-3 on a GPU; and so does a plan whose steps
/// compute their own modulations instead of taking them from one product before the first step,
/// where that product has at most 8 rows (within bf16 rounding where it has more).
#[test]
fn the_euler_plan_replays_the_sampler() {
    use advdmd::flow::device::{sample_euler, EulerPlan};
    let model = random_model();
    let mut rng = Rng::new(21);
    let mut randn = |shape: &[usize]| Tensor::randn(shape, &mut rng);
    let case = PlanCase::new();
    let (sig, guide) = (&case.sig, || case.guide());
    let draws: Vec<_> = (0..3)
        .map(|_| (randn(&[2, 3, 8, 8]), randn(&[2, 24]), randn(&[2, 5, 40])))
        .collect();
    for dev in devices() {
        let m = DeviceMmdit::new(&dev, &model).unwrap();
        let mut plan = EulerPlan::new(&m, sig, Some(PlanCase::SCALE), true);
        // each step computing its own modulations, the first way
        let mut per_step =
            EulerPlan::new(&m, sig, Some(PlanCase::SCALE), true).modulate_ahead(false);
        for (i, (x, pooled, ctx)) in draws.iter().enumerate() {
            let want = sample_euler(&m, x, sig, pooled, ctx, guide()).unwrap();
            let got = plan.sample(x, pooled, ctx, guide()).unwrap();
            let err = got.rel_l2(&want);
            let own = per_step.sample(x, pooled, ctx, guide()).unwrap();
            let err_own = own.rel_l2(&want);
            println!(
                "Euler plan on {}, sample {i} (graph replay: {}): {err:.2e}; modulations a step: {err_own:.2e}",
                dev.name(),
                plan.replayed()
            );
            let tol = if dev.is_emulator() { 0.0 } else { 1e-3 };
            assert!(err <= tol, "sample {i}: plan vs sampler {err:e} > {tol:e}");
            // 3 steps of 4 calls: 12 rows, a GEMM's product rather than each step's
            // `gemv_small_m` (at most 8 rows, each row summed alone): rounding apart
            assert!(
                err_own <= 1e-2,
                "sample {i}: modulations a step {err_own:e}"
            );
            assert_eq!(plan.replayed(), i >= 1);
            assert_eq!(per_step.replayed(), i >= 1);
        }
        // unguided, 3 steps of 2 calls: 6 rows, `gemv_small_m` either way — the same samples
        let mut ahead = EulerPlan::new(&m, sig, None, true);
        let mut own = EulerPlan::new(&m, sig, None, true).modulate_ahead(false);
        for (i, (x, pooled, ctx)) in draws.iter().enumerate() {
            let a = ahead.sample(x, pooled, ctx, None).unwrap();
            let b = own.sample(x, pooled, ctx, None).unwrap();
            let err = a.rel_l2(&b);
            println!(
                "unguided sample {i} on {}: modulations ahead vs a step: {err:.2e}",
                dev.name()
            );
            let tol = if dev.is_emulator() { 0.0 } else { 1e-3 };
            assert!(err <= tol, "unguided sample {i}: {err:e} > {tol:e}");
        }
        assert!(
            plan.sample(&draws[0].0, &draws[0].1, &draws[0].2, None)
                .is_err(),
            "an unguided call of a guided plan is refused"
        );
    }
}

/// The re-noising plan (DMD2's multistep sampler) replays from its graph with each sample's own
/// draws: every replayed sample equals a fresh plan's direct run (bit for bit on the emulator),
/// and other draws give another sample; a plain `sample` or a wrong number of draws is refused.
#[test]
fn the_renoising_plan_replays_with_fresh_draws() {
    use advdmd::flow::device::EulerPlan;
    let model = random_model();
    let mut rng = Rng::new(22);
    let mut randn = |shape: &[usize]| Tensor::randn(shape, &mut rng);
    let case = PlanCase::new();
    let (sig, guide) = (&case.sig, || case.guide());
    let draws: Vec<_> = (0..3)
        .map(|_| {
            let x = randn(&[2, 3, 8, 8]);
            let z = randn(&[2, 2, 3, 8, 8]).to_vec();
            (x, z, randn(&[2, 24]), randn(&[2, 5, 40]))
        })
        .collect();
    for dev in devices() {
        let m = DeviceMmdit::new(&dev, &model).unwrap();
        let mut plan = EulerPlan::new(&m, sig, Some(PlanCase::SCALE), true).renoising();
        assert_eq!(plan.noisy_steps(), 2);
        let mut last = None;
        for (i, (x, z, pooled, ctx)) in draws.iter().enumerate() {
            let got = plan.sample_renoised(x, z, pooled, ctx, guide()).unwrap();
            let mut direct = EulerPlan::new(&m, sig, Some(PlanCase::SCALE), false).renoising();
            let want = direct.sample_renoised(x, z, pooled, ctx, guide()).unwrap();
            let err = got.rel_l2(&want);
            println!(
                "re-noising plan on {}, sample {i} (graph replay: {}): {err:.2e}",
                dev.name(),
                plan.replayed()
            );
            let tol = if dev.is_emulator() { 0.0 } else { 1e-3 };
            assert!(err <= tol, "sample {i}: replay vs direct {err:e} > {tol:e}");
            assert_eq!(plan.replayed(), i >= 1);
            last = Some(got);
        }
        // the last sample's start with the first sample's draws: another sample
        let (x, _, pooled, ctx) = &draws[2];
        let other = plan
            .sample_renoised(x, &draws[0].1, pooled, ctx, guide())
            .unwrap();
        assert!(other.rel_l2(last.as_ref().unwrap()) > 1e-2);
        assert!(plan.sample(x, pooled, ctx, guide()).is_err());
        assert!(plan
            .sample_renoised(x, &draws[0].1[1..], pooled, ctx, guide())
            .is_err());
    }
}

/// Activation checkpointing (only the blocks' inputs kept, each block recomputed in the backward)
/// and selective checkpointing (the attention, projection and fc2 outputs kept too, the rest
/// recomputed) give the same gradients: bit for bit on the emulator (every kernel deterministic
/// there); on a GPU the attention backward's dQ sums in no fixed order, so within 1e-3. The
/// device's FLOP counter sees the same model FLOPs in all three and the recomputed ones apart —
/// a block's whole forward for each block, less under selective checkpointing — and the record a
/// forward leaves is smallest with full checkpointing, largest with none.
#[test]
fn checkpointed_activations_give_the_same_gradients() {
    let model = random_model();
    let mut rng = Rng::new(8);
    let mut randn = |shape: &[usize]| Tensor::randn(shape, &mut rng);
    let (x, pooled, ctx) = (randn(&[2, 3, 8, 8]), randn(&[2, 24]), randn(&[2, 5, 40]));
    let seed = to_bf16(&randn(&[2, 3, 8, 8]));
    for dev in devices() {
        let m = DeviceMmdit::new(&dev, &model).unwrap();
        let inputs = m.inputs(&x, &[100.0, 900.0], &pooled, &ctx).unwrap();
        let dv = dev.upload(&seed).unwrap();
        let run = |keep: Keep| {
            m.zero_grad().unwrap();
            let before = (dev.live_bytes(), dev.matmul_flops(), dev.recomputed_flops());
            let f = m.forward(&inputs, keep).unwrap();
            let record = dev.live_bytes() - before.0;
            let g = m
                .backward(&inputs, f.saved.as_ref().unwrap(), &dv, true)
                .unwrap();
            let dx = dev.download(&g.x).unwrap();
            let flops = (
                dev.matmul_flops() - before.1,
                dev.recomputed_flops() - before.2,
            );
            (
                (
                    dev.download(&f.velocity).unwrap(),
                    dx,
                    dev.download(m.grads().unwrap()).unwrap(),
                ),
                flops,
                record,
            )
        };
        let full = run(Keep::All);
        for keep in [Keep::BlockInputs, Keep::Selective] {
            let ckpt = run(keep);
            let (a, b) = (&full.0, &ckpt.0);
            if dev.is_emulator() {
                assert!(a.0 == b.0 && a.1 == b.1, "{keep:?}: outputs or dx differ");
                assert!(a.2 == b.2, "{keep:?}: parameter gradients differ");
            } else {
                let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), &[v.len()]);
                let f32s = |v: &[bf16]| t(v.iter().map(|x| x.to_f32()).collect());
                assert!(f32s(&b.1).rel_l2(&f32s(&a.1)) < 1e-3, "{keep:?}");
                assert!(t(b.2.clone()).rel_l2(&t(a.2.clone())) < 1e-3, "{keep:?}");
            }
            assert_eq!(ckpt.1 .0, full.1 .0, "{keep:?}: model FLOPs differ");
            assert!(ckpt.2 < full.2, "{keep:?}: record {} ≥ {}", ckpt.2, full.2);
            println!(
                "{keep:?} on {}: gradients equal; {} of {} FLOPs recomputed; record {} of {} bytes",
                dev.name(),
                ckpt.1 .1,
                ckpt.1 .0,
                ckpt.2,
                full.2
            );
        }
        assert_eq!(full.1 .1, 0, "nothing recomputed without checkpointing");
        let (inputs_only, selective) = (run(Keep::BlockInputs), run(Keep::Selective));
        // one more forward of the blocks: all but the embedders' and final layer's products
        let blocks = inputs_only.1 .1;
        assert!(blocks > 0 && blocks < full.1 .0 / 3, "{blocks}");
        let reused = selective.1 .1;
        assert!(
            reused > 0 && reused < blocks,
            "selective {reused} vs {blocks}"
        );
        assert!(
            inputs_only.2 < selective.2,
            "{} vs {}",
            inputs_only.2,
            selective.2
        );
    }
}

/// `zero_grad` leaves the weight matrices' slots to be overwritten by their first write (no
/// memset): two backward passes after it add up (the second accumulates onto the first's), one
/// after a new `zero_grad` shows none of the earlier values, and a pass that writes no parameter
/// gradient leaves zeros, not the stale slots.
#[test]
fn gradients_restart_at_zero_grad_and_accumulate_after() {
    let model = random_model();
    let mut rng = Rng::new(21);
    let mut randn = |shape: &[usize]| Tensor::randn(shape, &mut rng);
    let (x, pooled, ctx) = (randn(&[2, 3, 8, 8]), randn(&[2, 24]), randn(&[2, 5, 40]));
    let (seed_a, seed_b) = (
        to_bf16(&randn(&[2, 3, 8, 8])),
        to_bf16(&randn(&[2, 3, 8, 8])),
    );
    for dev in devices() {
        let m = DeviceMmdit::new(&dev, &model).unwrap();
        let inputs = m.inputs(&x, &[100.0, 900.0], &pooled, &ctx).unwrap();
        let (da, db) = (dev.upload(&seed_a).unwrap(), dev.upload(&seed_b).unwrap());
        let backward = |dv: &DevBuf<bf16>, params: bool| {
            let f = m.forward(&inputs, Keep::All).unwrap();
            m.backward(&inputs, f.saved.as_ref().unwrap(), dv, params)
                .unwrap();
        };
        let grads = || dev.download(m.grads().unwrap()).unwrap();
        m.zero_grad().unwrap();
        backward(&da, true);
        let ga = grads();
        backward(&db, true);
        let gab = grads();
        m.zero_grad().unwrap();
        backward(&db, true);
        let gb = grads();
        let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), &[v.len()]);
        let sum: Vec<f32> = ga.iter().zip(&gb).map(|(a, b)| a + b).collect();
        // on a GPU the attention backward's dQ sums in no fixed order
        let tol = if dev.is_emulator() { 1e-5 } else { 1e-3 };
        let err = t(gab.clone()).rel_l2(&t(sum));
        assert!(err < tol, "two passes do not add up: rel L2 {err:.2e}");
        assert!(
            t(gb.clone()).rel_l2(&t(ga.clone())) > 1e-2,
            "the two seeds give different gradients"
        );
        // a fresh device model's gradients for seed b: what a pass after zero_grad must give
        let fresh = DeviceMmdit::new(&dev, &model).unwrap();
        let fi = fresh.inputs(&x, &[100.0, 900.0], &pooled, &ctx).unwrap();
        fresh.zero_grad().unwrap();
        let f = fresh.forward(&fi, Keep::All).unwrap();
        fresh
            .backward(&fi, f.saved.as_ref().unwrap(), &db, true)
            .unwrap();
        let want = dev.download(fresh.grads().unwrap()).unwrap();
        let err = t(gb).rel_l2(&t(want));
        assert!(
            err < tol,
            "stale gradients leaked past zero_grad: rel L2 {err:.2e}"
        );
        m.zero_grad().unwrap();
        backward(&da, false);
        assert!(
            grads().iter().all(|&g| g == 0.0),
            "a pass with no parameter gradients left stale values"
        );
        println!("gradients restart at zero_grad on {}: ok", dev.name());
    }
}

/// One flow-matching step on the device (noising, bf16 MMDiT, MSE gradient, backward, clipped
/// AdamW) against the CPU: the loss and every gradient within bf16 tolerance of the CPU model's
/// (max(2e-2, 4 × the floor of the f32 model on bf16-rounded weights and inputs), as for the
/// fixtures: here the loss's own gradient comes from the bf16 velocity, so a few tensors sit
/// just above 2e-2),
/// the update exactly the CPU twin's AdamW applied to the device's gradients, and a frozen
/// parameter (the position table) left alone.
#[test]
fn a_flow_matching_step_on_the_device_matches_the_cpu() {
    use advdmd::kernels::optim::{adamw_step, clip_factor, grad_norm, AdamWStep};
    use advdmd::optim::device::{DeviceAdamW, FlatParams};
    use advdmd::optim::AdamWConfig;
    use advdmd::train::device::{flow_matching_grads, FlowBatch};

    let model = random_model();
    model.params.param("pos_embed").set_trainable(false);
    let mut rng = Rng::new(12);
    let mut randn = |shape: &[usize]| Tensor::randn(shape, &mut rng);
    let shape = [2, 3, 8, 8];
    let (x0, noise, pooled, ctx) = (
        randn(&shape),
        randn(&shape),
        randn(&[2, 24]),
        randn(&[2, 5, 40]),
    );
    let sigma = [0.3f32, 0.8];

    // the CPU: same noising, f32 model, autograd; and the floor: the same on bf16-rounded
    // weights and inputs
    let per = x0.numel() / 2;
    let (xt, target): (Vec<f32>, Vec<f32>) = (0..x0.numel())
        .map(|i| {
            let s = sigma[i / per];
            let (a, n) = (x0.f32s()[i], noise.f32s()[i]);
            ((1.0 - s) * a + s * n, n - a)
        })
        .unzip();
    let (xt, target) = (
        Tensor::from_vec(xt, &shape),
        Tensor::from_vec(target, &shape),
    );
    let floor = rounded(&model);
    let cpu_step = |m: &Mmdit, round: bool| {
        let r = |t: &Tensor| if round { round_bf16(t) } else { t.clone() };
        let v = m.forward(&MmditInputs {
            x: &Var::constant(r(&xt)),
            timestep: &[300.0, 800.0],
            pooled: &Var::constant(r(&pooled)),
            context: &Var::constant(r(&ctx)),
        });
        let loss = v.mse(&Var::constant(target.clone()));
        loss.backward();
        loss.value().item()
    };
    let cpu_loss = cpu_step(&model, false);
    cpu_step(&floor, true);

    let config = AdamWConfig {
        lr: 1e-3,
        weight_decay: 0.01,
        ..Default::default()
    };
    for dev in devices() {
        let m = DeviceMmdit::new(&dev, &model).unwrap();
        let batch = FlowBatch {
            x0: &x0,
            noise: &noise,
            sigma: &sigma,
            pooled: &pooled,
            context: &ctx,
        };
        let dev_loss = flow_matching_grads(&m, &batch, Keep::All).unwrap();
        let rel = ((dev_loss - cpu_loss) / cpu_loss).abs() as f64;
        let mut check = Check::new(format!("flow-matching step on {}", dev.name()));
        assert!(rel <= TOL, "loss {dev_loss} vs CPU {cpu_loss}");
        let mut above = 0;
        for (name, g) in m.download_named(m.grads().unwrap()).unwrap() {
            if let Some(want) = model.params.param(&name).grad() {
                let floor_grad = floor.params.param(&name).grad().unwrap();
                let bound = TOL.max(FLOOR_FACTOR * floor_grad.rel_l2(&want));
                if check.within(&format!("grad {name}"), &g, &want, bound) > TOL {
                    above += 1;
                }
            }
        }
        println!(
            "flow-matching step on {}: {above} gradients above {TOL:e}",
            dev.name()
        );
        check.finish();

        let n = m.n_trainable;
        let (w0, g) = (
            dev.download(&m.master).unwrap(),
            dev.download(m.grads().unwrap()).unwrap(),
        );
        let mut opt = DeviceAdamW::new(&dev, n, config.clone()).unwrap();
        let flat = FlatParams {
            master: &m.master,
            bf16: &m.weights,
            grads: m.grads().unwrap(),
            n_decay: m.n_decay,
        };
        opt.step(&dev, &flat, 1e-3, 1.0).unwrap();
        let w1 = dev.download(&m.master).unwrap();

        let norm = grad_norm(&g[..n]);
        assert!((opt.last_grad_norm(&dev).unwrap() - norm).abs() <= 1e-5 * norm);
        let (mut w, mut mm, mut vv) = (w0[..n].to_vec(), vec![0f32; n], vec![0f32; n]);
        let h = AdamWStep {
            lr: 1e-3,
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            weight_decay: config.weight_decay,
            step: 1,
        };
        adamw_step(
            &mut w,
            &mut mm,
            &mut vv,
            &g[..n],
            clip_factor(norm, 1.0),
            m.n_decay,
            &h,
            None,
        );
        let worst = w
            .iter()
            .zip(&w1)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-6,
            "AdamW update differs from the CPU twin by {worst}"
        );
        assert!(w1[..n] != w0[..n], "the step changed nothing");
        assert_eq!(w1[n..], w0[n..], "a frozen parameter moved");
        let wb = dev.download(&m.weights).unwrap();
        assert!(
            wb.iter().zip(&w1).all(|(b, f)| *b == bf16::from_f32(*f)),
            "the bf16 copy is not the rounding of the new masters"
        );
        println!(
            "flow-matching step on {}: loss {dev_loss:.5} (CPU {cpu_loss:.5}), grad norm {norm:.4}, AdamW vs twin {worst:.1e}",
            dev.name()
        );
    }
}

/// The teacher's form: bf16 weights only (2 bytes a parameter, measured by the device's counter),
/// the same forward and input gradients as the trainable model, and no parameter gradients.
#[test]
fn a_frozen_device_model_is_bf16_only_and_computes_the_same() {
    let model = random_model();
    let mut rng = Rng::new(4);
    let mut randn = |shape: &[usize]| Tensor::randn(shape, &mut rng);
    let (x, pooled, ctx) = (randn(&[1, 3, 8, 8]), randn(&[1, 24]), randn(&[1, 5, 40]));
    let seed = to_bf16(&randn(&[1, 3, 8, 8]));
    for dev in devices() {
        let before = dev.live_bytes();
        let frozen = DeviceMmdit::frozen(&dev, &model).unwrap();
        let bytes = dev.live_bytes() - before;
        let weights = frozen.weights.len() * 2;
        assert_eq!(bytes, weights, "a frozen model holds its bf16 weights only");
        assert!(!frozen.is_trainable());
        let full = DeviceMmdit::new(&dev, &model).unwrap();
        assert_eq!(
            dev.live_bytes() - before - bytes,
            weights * 5,
            "trainable: 10 bytes a parameter"
        );

        let run = |m: &DeviceMmdit| {
            let inputs = m.inputs(&x, &[500.0], &pooled, &ctx).unwrap();
            let f = m.forward(&inputs, Keep::All).unwrap();
            let dv = dev.upload(&seed).unwrap();
            let g = m
                .backward(&inputs, f.saved.as_ref().unwrap(), &dv, false)
                .unwrap();
            let refused = m.backward(&inputs, f.saved.as_ref().unwrap(), &dv, true);
            (
                dev.download(&f.velocity).unwrap(),
                dev.download(&g.x).unwrap(),
                refused.is_err(),
            )
        };
        let (a, b) = (run(&frozen), run(&full));
        assert!(
            a.2 && !b.2,
            "only the frozen model refuses parameter gradients"
        );
        if dev.is_emulator() {
            assert!(
                a.0 == b.0 && a.1 == b.1,
                "frozen and trainable models differ"
            );
        }
        assert!(frozen.refresh_weights().is_err());
    }
}

/// The DMD term of the generator update on the device (generator forward, the frozen teacher
/// with CFG and the fake score on the re-noised x̂0, the DMD gradient seeded at x̂0, the
/// generator's backward) against the same computation on the CPU models: every generator
/// gradient within max(2e-2, 4 × the bf16 floor), the DMD gradient's norm within 2e-2.
#[test]
fn the_dmd_generator_gradient_on_the_device_matches_the_cpu() {
    use advdmd::flow::cfg;
    use advdmd::kernels::sde::dmd_gradient_batch;
    use advdmd::kernels::shape::{concat, split};
    use advdmd::train::device::{dmd_generator_grads, DmdBatch};

    let (generator, teacher, fake) = (
        random_model_seeded(17),
        random_model_seeded(18),
        random_model_seeded(19),
    );
    let mut rng = Rng::new(23);
    let mut randn = |shape: &[usize]| Tensor::randn(shape, &mut rng);
    let shape = [2, 3, 8, 8];
    let (x, noise, pooled, ctx) = (
        randn(&shape),
        randn(&shape),
        randn(&[2, 24]),
        randn(&[2, 5, 40]),
    );
    let (pooled_u, ctx_u) = (randn(&[2, 24]), randn(&[2, 5, 40]));
    let (sigma, tau, w, lambda) = (0.6f32, [0.3f32, 0.7], 3.0f32, 1.0f32);
    let (numel, per) = (x.numel(), x.numel() / 2);

    // the CPU, on the models as they are and (the floor) on their bf16 roundings and inputs
    let cpu_dmd = |generator: &Mmdit, teacher: &Mmdit, fake: &Mmdit, round: bool| -> f32 {
        let c = |t: &Tensor| Var::constant(if round { round_bf16(t) } else { t.clone() });
        let xk = c(&x);
        let v = generator.forward(&MmditInputs {
            x: &xk,
            timestep: &[600.0, 600.0],
            pooled: &c(&pooled),
            context: &c(&ctx),
        });
        let x0 = xk.sub(&v.scale(sigma));
        let (seed, norm) = {
            let _ng = advdmd::autograd::no_grad();
            let xv = x0.value().f32s();
            let xt: Vec<f32> = (0..numel)
                .map(|i| (1.0 - tau[i / per]) * xv[i] + tau[i / per] * noise.f32s()[i])
                .collect();
            let xt = Tensor::from_vec(xt, &shape);
            let vt = teacher.forward(&MmditInputs {
                x: &c(&concat(&[&xt, &xt], 0)),
                timestep: &[300.0, 700.0, 300.0, 700.0],
                pooled: &c(&concat(&[&pooled, &pooled_u], 0)),
                context: &c(&concat(&[&ctx, &ctx_u], 0)),
            });
            let halves = split(vt.value(), 0, &[2, 2]);
            let vw = cfg(halves[0].f32s(), halves[1].f32s(), w);
            let vf = fake.forward(&MmditInputs {
                x: &c(&xt),
                timestep: &[300.0, 700.0],
                pooled: &c(&pooled),
                context: &c(&ctx),
            });
            let x0_of = |v: &[f32]| -> Vec<f32> {
                (0..numel)
                    .map(|i| xt.f32s()[i] - tau[i / per] * v[i])
                    .collect()
            };
            let (real, fake_x0) = (x0_of(&vw), x0_of(vf.value().f32s()));
            let unscaled = dmd_gradient_batch(xv, &real, &fake_x0, per, 1.0);
            let norm = (unscaled.iter().map(|&g| (g as f64).powi(2)).sum::<f64>() / 2.0).sqrt();
            let seed: Vec<f32> = unscaled.iter().map(|g| g * lambda / numel as f32).collect();
            (Tensor::from_vec(seed, &shape), norm as f32)
        };
        backward(&[(&x0, seed)]);
        norm
    };
    let cpu_norm = cpu_dmd(&generator, &teacher, &fake, false);
    let floor_gen = rounded(&generator);
    cpu_dmd(&floor_gen, &rounded(&teacher), &rounded(&fake), true);

    for dev in devices() {
        let g = DeviceMmdit::new(&dev, &generator).unwrap();
        let t = DeviceMmdit::frozen(&dev, &teacher).unwrap();
        let f = DeviceMmdit::frozen(&dev, &fake).unwrap();
        let batch = DmdBatch {
            x: &x,
            sigma,
            tau: &tau,
            noise: &noise,
            pooled: &pooled,
            context: &ctx,
            pooled_uncond: &pooled_u,
            context_uncond: &ctx_u,
            w_real: w,
            lambda,
        };
        let norm = dmd_generator_grads(&g, &t, &f, &batch, Keep::All).unwrap();
        let mut check = Check::new(format!("DMD generator gradient on {}", dev.name()));
        let rel_norm = ((norm - cpu_norm) / cpu_norm).abs() as f64;
        let mut worst = (0f64, String::new());
        for (name, gr) in g.download_named(g.grads().unwrap()).unwrap() {
            if let Some(want) = generator.params.param(&name).grad() {
                let floor = floor_gen.params.param(&name).grad().unwrap().rel_l2(&want);
                let bound = TOL.max(FLOOR_FACTOR * floor);
                let e = check.within(&format!("grad {name}"), &gr, &want, bound);
                if e > worst.0 {
                    worst = (e, name);
                }
            }
        }
        println!(
            "DMD generator gradient on {}: dmd_grad_norm {norm:.4} (CPU {cpu_norm:.4}), worst parameter gradient {:.2e} ({})",
            dev.name(),
            worst.0,
            worst.1
        );
        assert!(rel_norm <= TOL, "dmd_grad_norm {norm} vs {cpu_norm}");
        check.finish();
    }
}

/// The ρ-SDE rollout on the device against the same transitions on the CPU model (same start
/// noise and step noises): every state and x̂0 within bf16 tolerance, every log-probability to
/// 1e-4 (it depends on the model only through μ, which x' is drawn around).
#[test]
fn the_device_rollout_follows_the_cpu_rollout() {
    use advdmd::flow::sde::{log_prob, rho_step};
    use advdmd::train::device::rollout_sde;
    use advdmd::train::rollout::few_step_sigmas;

    let model = random_model_seeded(31);
    let mut rng = Rng::new(37);
    let mut randn = |shape: &[usize]| Tensor::randn(shape, &mut rng);
    let shape = [2, 3, 8, 8];
    let (noise, pooled, ctx) = (randn(&shape), randn(&[2, 24]), randn(&[2, 5, 40]));
    let sig = few_step_sigmas(4, 3.0);
    let z: Vec<Tensor> = (0..4).map(|_| randn(&shape)).collect();
    let rho = 0.5;

    // the CPU
    let per = noise.numel() / 2;
    let (mut x, mut states, mut x0s, mut lps) = (noise.clone(), vec![], vec![], vec![]);
    for k in 0..4 {
        let v = model.forward(&MmditInputs {
            x: &Var::constant(x.clone()),
            timestep: &[sig[k] * 1000.0; 2],
            pooled: &Var::constant(pooled.clone()),
            context: &Var::constant(ctx.clone()),
        });
        let (mut next, mut x0, mut lp) = (vec![], vec![], vec![]);
        for i in 0..2 {
            let r = i * per..(i + 1) * per;
            let (xs, vs) = (&x.f32s()[r.clone()], &v.value().f32s()[r.clone()]);
            let t = rho_step(xs, vs, sig[k], sig[k + 1], rho, &z[k].f32s()[r]);
            x0.extend(xs.iter().zip(vs).map(|(a, b)| a - sig[k] * b));
            if t.std > 0.0 {
                lp.push(log_prob(&t.next, &t.mean, t.std));
            }
            next.extend(t.next);
        }
        if !lp.is_empty() {
            lps.push(lp);
        }
        x0s.push(Tensor::from_vec(x0, &shape));
        x = Tensor::from_vec(next, &shape);
        states.push(x.clone());
    }

    for dev in devices() {
        let m = DeviceMmdit::frozen(&dev, &model).unwrap();
        let r = rollout_sde(&m, &noise, &z, &sig, rho, &pooled, &ctx).unwrap();
        assert_eq!(r.states.len(), 5);
        assert_eq!(r.log_probs.len(), lps.len(), "stochastic transitions");
        let t = |b: &DevBuf<f32>| Tensor::from_vec(dev.download(b).unwrap(), &shape);
        let mut check = Check::new(format!("rollout on {}", dev.name()));
        for k in 0..4 {
            check.rel(
                &format!("state {}", k + 1),
                &t(&r.states[k + 1]),
                &states[k],
            );
            check.rel(&format!("x0 {k}"), &t(&r.x0[k]), &x0s[k]);
        }
        let worst = r
            .log_probs
            .iter()
            .flatten()
            .zip(lps.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        println!(
            "rollout on {}: final state {:.2e}, log-probs within {worst:.1e}",
            dev.name(),
            t(&r.states[4]).rel_l2(&states[3])
        );
        assert!(worst <= 1e-4, "log-probabilities differ by {worst}");
        check.finish();
    }
}

/// The forward stopped at a feature block (the discriminator's features) and the backward from
/// those features, against the CPU model's `forward_with(.., Some(block), true)` and a seeded
/// backward: features and input gradients within 2e-2, every parameter gradient within
/// max(2e-2, 4 × the bf16 floor); those of later blocks and the final layer stay zero on both.
#[test]
fn features_and_their_backward_match_the_cpu() {
    let model = random_model_seeded(43);
    let mut rng = Rng::new(47);
    let mut randn = |shape: &[usize]| Tensor::randn(shape, &mut rng);
    let (x, pooled, ctx) = (randn(&[2, 3, 8, 8]), randn(&[2, 24]), randn(&[2, 5, 40]));
    let seed = randn(&[2, 16, 128]);
    let block = 1;

    let (xv, pv, cv) = (
        Var::input(x.clone()),
        Var::input(pooled.clone()),
        Var::input(ctx.clone()),
    );
    let out = model.forward_with(
        &MmditInputs {
            x: &xv,
            timestep: &[200.0, 700.0],
            pooled: &pv,
            context: &cv,
        },
        Some(block),
        true,
    );
    let features = out.features.unwrap();
    let cpu = backward(&[(&features, seed.clone())]);
    // the floor: the same on bf16-rounded weights and inputs
    let floor = rounded(&model);
    let rf = floor.forward_with(
        &MmditInputs {
            x: &Var::constant(round_bf16(&x)),
            timestep: &[200.0, 700.0],
            pooled: &Var::constant(round_bf16(&pooled)),
            context: &Var::constant(round_bf16(&ctx)),
        },
        Some(block),
        true,
    );
    backward(&[(&rf.features.unwrap(), round_bf16(&seed))]);

    for dev in devices() {
        let m = DeviceMmdit::new(&dev, &model).unwrap();
        let inputs = m.inputs(&x, &[200.0, 700.0], &pooled, &ctx).unwrap();
        assert!(
            m.forward_features(&inputs, 3, Keep::All).is_err(),
            "block past the depth"
        );
        let f = m.forward_features(&inputs, block, Keep::All).unwrap();
        let saved = f.saved.as_ref().unwrap();
        let ds = dev.upload(&to_bf16(&seed)).unwrap();
        assert!(
            m.backward(&inputs, saved, &ds, true).is_err(),
            "no velocity was computed"
        );
        let g = m.backward_features(&inputs, saved, &ds, true).unwrap();
        let mut check = Check::new(format!("features on {}", dev.name()));
        check.rel(
            "features",
            &download(&dev, &f.features, &[2, 16, 128]),
            features.value(),
        );
        check.rel(
            "grad x",
            &download(&dev, &g.x, x.shape()),
            cpu.get(&xv).unwrap(),
        );
        check.rel(
            "grad pooled",
            &download(&dev, &g.pooled, pooled.shape()),
            cpu.get(&pv).unwrap(),
        );
        check.rel(
            "grad context",
            &download(&dev, &g.context, ctx.shape()),
            cpu.get(&cv).unwrap(),
        );
        let (mut compared, mut untouched) = (0, 0);
        for (name, gr) in m.download_named(m.grads().unwrap()).unwrap() {
            match model.params.param(&name).grad() {
                Some(want) if want.f32s().iter().any(|&v| v != 0.0) => {
                    let fl = floor.params.param(&name).grad().unwrap().rel_l2(&want);
                    let bound = TOL.max(FLOOR_FACTOR * fl);
                    check.within(&format!("grad {name}"), &gr, &want, bound);
                    compared += 1;
                }
                _ => {
                    assert!(gr.f32s().iter().all(|&v| v == 0.0), "{name} got a gradient");
                    untouched += 1;
                }
            }
        }
        println!(
            "features after block {block} on {}: {compared} parameter gradients compared, {untouched} untouched",
            dev.name()
        );
        assert!(untouched > 0 && compared > 0);
        check.finish();
    }
}

/// The discriminator head on the device against the CPU `DiscHead`: logits, the features'
/// gradient and every head parameter's gradient within bf16 tolerance.
#[test]
fn the_device_discriminator_head_matches_the_cpu() {
    use advdmd::train::device::DeviceDiscHead;
    use advdmd::train::disc_head::DiscHead;

    let mut rng = Rng::new(53);
    let head = DiscHead::init(128, &mut rng);
    for (name, p) in head.params.iter() {
        if name.ends_with("bias") || name.starts_with("norm") {
            let v = p.value();
            let base = if name == "norm.weight" { 1.0 } else { 0.0 };
            let t = Tensor::randn(v.shape(), &mut rng);
            p.set_value(Tensor::from_vec(
                t.f32s().iter().map(|x| base + 0.3 * x).collect(),
                v.shape(),
            ));
        }
    }
    let (b, gh, gw) = (2, 4, 6);
    let features = Tensor::randn(&[b, gh * gw, 128], &mut rng);
    let dlogits = [0.7f32, -1.3];

    let fv = Var::input(features.clone());
    let logits = head.forward(&fv, gh, gw);
    let cpu = backward(&[(&logits, Tensor::from_vec(dlogits.to_vec(), &[b]))]);

    for dev in devices() {
        let dh = DeviceDiscHead::new(&dev, &head, true).unwrap();
        let f = dev.upload(&to_bf16(&features)).unwrap();
        let (got, saved) = dh.forward(&f, (b, gh, gw)).unwrap();
        let mut check = Check::new(format!("disc head on {}", dev.name()));
        let lg = Tensor::from_vec(got.clone(), &[b]);
        check.rel("logits", &lg, logits.value());
        let df = dh.backward(&saved, &dlogits, true).unwrap();
        check.rel(
            "grad features",
            &download(&dev, &df, features.shape()),
            cpu.get(&fv).unwrap(),
        );
        for (name, g) in dh
            .params
            .download_named(dh.params.grads().unwrap())
            .unwrap()
        {
            let want = head.params.param(&name).grad().unwrap();
            check.rel(&format!("grad {name}"), &g, &want);
        }
        assert!(
            dh.backward(&saved, &[1.0], true).is_err(),
            "one gradient per logit"
        );
        println!(
            "disc head on {}: logits {got:?} (CPU {:?})",
            dev.name(),
            logits.value().f32s()
        );
        check.finish();
    }
}

/// The kernel device's matmul FLOP counter (what `bench step --device` divides by) counts a
/// forward exactly as the analytic count of `bench::flops` does.
#[test]
fn the_device_counts_a_forwards_matmul_flops() {
    use advdmd::bench::flops::{mmdit_forward_flops, CallShape};
    let model = random_model();
    let c = &model.config;
    let dev = KernelDevice::emulator();
    let m = DeviceMmdit::new(&dev, &model).unwrap();
    let (b, side, l) = (2, 8, 5);
    let mut rng = Rng::new(3);
    let inputs = m
        .inputs(
            &Tensor::randn(&[b, c.in_channels, side, side], &mut rng),
            &[300.0, 700.0],
            &Tensor::randn(&[b, c.pooled_dim], &mut rng),
            &Tensor::randn(&[b, l, c.context_dim], &mut rng),
        )
        .unwrap();
    let before = dev.matmul_flops();
    m.forward(&inputs, Keep::Nothing).unwrap();
    let shape = CallShape {
        batch: b,
        image_tokens: (side / c.patch).pow(2),
        text_tokens: l,
    };
    assert_eq!(dev.matmul_flops() - before, mmdit_forward_flops(c, shape));
}

/// With two streams (the text tokens' work on the side stream) the model computes what it does
/// with one: on the emulator, which defers the side stream's work to each join and refuses any
/// race (`device::emu_lanes`), the velocity, the input gradients and the parameter gradients bit
/// for bit; recomputed blocks (activation checkpointing) too.
#[test]
fn two_streams_compute_what_one_does() {
    let model = random_model();
    let mut rng = Rng::new(12);
    let mut randn = |shape: &[usize]| Tensor::randn(shape, &mut rng);
    let (x, pooled, ctx) = (randn(&[2, 3, 8, 8]), randn(&[2, 24]), randn(&[2, 5, 40]));
    let seed = to_bf16(&randn(&[2, 3, 8, 8]));
    for dev in devices() {
        let m = DeviceMmdit::new(&dev, &model).unwrap();
        let inputs = m.inputs(&x, &[300.0, 700.0], &pooled, &ctx).unwrap();
        let dv = dev.upload(&seed).unwrap();
        let run = |streams: usize, keep: Keep| {
            dev.set_streams(streams).unwrap();
            m.zero_grad().unwrap();
            let f = m.forward(&inputs, keep).unwrap();
            let g = m
                .backward(&inputs, f.saved.as_ref().unwrap(), &dv, true)
                .unwrap();
            dev.set_streams(1).unwrap();
            (
                dev.download(&f.velocity).unwrap(),
                dev.download(&g.x).unwrap(),
                dev.download(&g.context).unwrap(),
                dev.download(m.grads().unwrap()).unwrap(),
            )
        };
        let one = run(1, Keep::All);
        for keep in [Keep::All, Keep::BlockInputs] {
            let two = run(2, keep);
            let t = |v: &[f32]| Tensor::from_vec(v.to_vec(), &[v.len()]);
            let f32s = |v: &[bf16]| t(&v.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
            let grads = t(&two.3).rel_l2(&t(&one.3));
            if dev.is_emulator() {
                assert!(two.0 == one.0, "velocity differs ({keep:?})");
                assert!(two.1 == one.1 && two.2 == one.2, "dx or dcontext differs");
                assert!(two.3 == one.3, "parameter gradients {grads:.3e} apart");
            } else {
                assert!(f32s(&two.0).rel_l2(&f32s(&one.0)) < 1e-3);
                assert!(f32s(&two.1).rel_l2(&f32s(&one.1)) < 1e-3);
                assert!(grads < 1e-3, "parameter gradients {grads:.3e} apart");
            }
            println!(
                "two streams on {} ({keep:?}): velocity and dx as one stream's, gradients {grads:.2e} apart",
                dev.name()
            );
        }
    }
}

/// The modulation chunks are strided windows of the modulation GEMM's output (sample s's row at
/// s·n·D) and their gradients are cast straight into its gradient's columns: the first sample of
/// a batch of two and the same sample alone give the same velocity and input gradients.
#[test]
fn batch_one_gives_what_the_first_of_a_batch_of_two_does() {
    use advdmd::kernels::shape::split;
    let model = random_model();
    let mut rng = Rng::new(21);
    let mut randn = |shape: &[usize]| Tensor::randn(shape, &mut rng);
    // 9 text tokens: a batch of one has more than 8 context rows too, so both batches' context
    // embedding is the same GEMM (`gemv_small_m` takes at most 8 rows, in another summation order)
    let (x, pooled, ctx) = (randn(&[2, 3, 8, 8]), randn(&[2, 24]), randn(&[2, 9, 40]));
    let seed = randn(&[2, 3, 8, 8]);
    let first = |t: &Tensor| split(t, 0, &[1, 1]).swap_remove(0);
    for dev in devices() {
        let t = [400.0, 400.0];
        let (v2, dx2, dp2, dc2, _) = device_run(&dev, &model, (&x, &t, &pooled, &ctx), &seed);
        let one = (&first(&x), &t[..1], &first(&pooled), &first(&ctx));
        let (v1, dx1, dp1, dc1, _) = device_run(&dev, &model, one, &first(&seed));
        let tol = if dev.is_emulator() { 1e-6 } else { 1e-2 };
        for (name, a, b) in [
            ("velocity", &v1, &v2),
            ("dx", &dx1, &dx2),
            ("dpooled", &dp1, &dp2),
            ("dcontext", &dc1, &dc2),
        ] {
            let err = a.rel_l2(&first(b));
            println!(
                "batch 1 vs the first of 2 on {}: {name} {err:.2e}",
                dev.name()
            );
            assert!(err <= tol, "{name}: {err:.3e} > {tol:.0e}");
        }
    }
}

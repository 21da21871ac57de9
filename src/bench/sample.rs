//! `bench sample`: the latency of one K-step Euler sample of a batch, no grad. For `shapes` it is
//! the committed teacher end to end through `train::shapes_model::sample_images` (tokenizer,
//! text encoder, K MMDiT calls, Euler updates); for the SD3 presets a random-weight MMDiT on
//! random conditioning, with the same schedule, CFG and Euler step from `flow`. With
//! `--device cuda|emu` the whole K-step loop runs on the device (`flow::device::sample_euler`,
//! bf16 MMDiT) for any preset — the MMDiT with random weights, the final latents read back.

use super::flops::mmdit_forward_flops;
use super::measure::{
    gemm_ceiling_tflops, tflops, time_fallible, PeakRss, Timing, GEMM_CEILING_SIZE, WARMUP,
};
use super::presets::{ModelSpec, Preset, RandomInputs};
use super::profile::{add_profile, profile_fallible};
use super::report::{Cell, Report};
use super::{ceiling_figures, common_parameters, kernel_device, mfu_figures, SampleArgs};
use crate::autograd::no_grad;
use crate::device::kernel::KernelDevice;
use crate::device::profile::OpProfile;
use crate::error::{Error, Result};
use crate::eval::evaluation_prompts;
use crate::flow::device::{EulerPlan, Guidance};
use crate::flow::{cfg, euler_step, reference_sigmas, timestep_of};
use crate::kernels::shape::{concat, split};
use crate::mmdit::device::DeviceMmdit;
use crate::mmdit::{Mmdit, MmditInputs};
use crate::nn::device::DeviceParams;
use crate::tensor::Tensor;
use crate::train::shapes_model::{sample_images, Sampler, ShapesModel, RESOLUTION};
use crate::Var;
use std::path::Path;

/// The SD3 family's sampling shift (MMDIT.md A.6).
const SD3_SHIFT: f64 = 3.0;

pub fn run(a: &SampleArgs, teacher: &Path) -> Result<Report> {
    if a.steps == 0 {
        return Err(Error::Invalid(
            "bench sample: --steps must be at least 1".into(),
        ));
    }
    if !a.cfg.is_finite() {
        return Err(Error::Invalid(
            "bench sample: --cfg must be a number".into(),
        ));
    }
    if let Some((dev, kind)) = kernel_device(a.common.device, "sample")? {
        let spec = ModelSpec::new(a.model.model, a.model.res, teacher)?;
        let (timing, profile) = time_device(&spec, a, &dev)?;
        let place = Where::Device {
            kind,
            name: dev.name(),
        };
        let mut r = sample_report(a, (spec, timing, place));
        if let Some(p) = profile {
            let what = if a.graph {
                "one sample (its loop one graph replay)"
            } else {
                "one sample"
            };
            add_profile(&mut r, what, ("sample", "sample_ops"), &p);
        }
        return Ok(r);
    }
    let ceiling = gemm_ceiling_tflops(GEMM_CEILING_SIZE, a.common.iters);
    let timed = if a.model.model == Preset::Shapes {
        time_teacher(a, teacher)?
    } else {
        let spec = ModelSpec::new(a.model.model, a.model.res, teacher)?;
        spec.cpu_footprint(a.model.batch, false)
            .check("bench sample")?;
        time_random_preset(spec, a)?
    };
    Ok(cpu_report(a, timed, ceiling))
}

fn cpu_report(a: &SampleArgs, (spec, timing, memory, peak): Timed, ceiling: f64) -> Report {
    let place = Where::Cpu {
        ceiling,
        memory,
        peak,
    };
    sample_report(a, (spec, timing, place))
}

/// Where a sample was timed, with what its report needs from there.
enum Where {
    Cpu {
        ceiling: f64,
        memory: PeakRss,
        peak: Option<u64>,
    },
    Device {
        kind: &'static str,
        name: String,
    },
}

fn sample_report(a: &SampleArgs, (spec, timing, place): (ModelSpec, Timing, Where)) -> Report {
    let batch = a.model.batch;
    let guided = a.cfg != 1.0;

    // Each step calls the MMDiT once on the batch, on twice the batch with CFG.
    let per_call = spec.call_shape(if guided { 2 * batch } else { batch });
    let flops = a.steps as u64 * mmdit_forward_flops(&spec.config, per_call);
    let ms = timing.median_ms();
    let tf = tflops(flops as f64, ms);

    let mut params = vec![
        ("model", spec.preset.name().into()),
        ("res", spec.resolution.into()),
        ("batch", batch.into()),
        ("steps", a.steps.into()),
        ("cfg", a.cfg.into()),
        ("sampler", "euler".into()),
        ("graph", a.graph.into()),
        ("modulation_per_step", a.modulation_per_step.into()),
        ("image_tokens", spec.image_tokens().into()),
        ("text_tokens", spec.text_tokens.into()),
    ];
    params.extend(common_parameters(&a.common));
    let mut r = Report::new("sample", params);
    r.figure(
        "sample_ms",
        "K-step sample of the batch",
        Cell::num(ms, 2),
        "ms",
    );
    r.figure(
        "ms_per_step",
        "per step",
        Cell::num(ms / a.steps as f64, 2),
        "ms",
    );
    r.figure(
        "images_per_s",
        "throughput",
        Cell::num(batch as f64 / (ms * 1e-3), 2),
        "images/s",
    );
    r.figure("mmdit_flops", "MMDiT FLOPs", Cell::Count(flops), "FLOP");
    r.figure("tflops", "effective", Cell::num(tf, 4), "TFLOP/s");
    let memory = match place {
        Where::Cpu {
            ceiling,
            memory,
            peak,
        } => {
            ceiling_figures(
                &mut r,
                ceiling,
                [("ceiling_ratio", "effective / GEMM ceiling", tf)],
            );
            r.figure("peak_memory_bytes", "peak memory", Cell::bytes(peak), "");
            memory
        }
        Where::Device { kind, name } => {
            mfu_figures(&mut r, &name, kind, [("mfu", "MFU", tf)]);
            r.kernel_device = Some((kind, name));
            r.note("the device path: the K-step loop on the device (bf16 MMDiT with random weights, CFG and the Euler step in one kernel), the final latents read back; no text encoder, no VAE decode");
            if a.graph && kind == "cuda" {
                r.note("--graph: each timed sample is one CUDA graph launch of the whole loop (recorded in the warm-up), plus the input uploads and the download");
            }
            if kind == "emu" {
                r.note("emu: the CPU SIMT emulator — a functional check of the device path, not a speed figure");
            }
            return r;
        }
    };
    if spec.preset == Preset::Shapes {
        r.note("the committed teacher end to end (tokenizer, text encoder, MMDiT, Euler); the FLOPs count the MMDiT only");
    } else {
        r.note("the MMDiT only, random weights and random conditioning (no text encoders, no VAE decode)");
    }
    r.note(format!(
        "peak memory is on top of the model and inputs: {}",
        memory.method()
    ));
    r
}

type Timed = (ModelSpec, Timing, PeakRss, Option<u64>);

/// The K-step sample on a kernel device: random weights and conditioning (the unconditional
/// branch reuses the conditioning: its cost, not its value, is measured), end to end from the
/// upload of the noise to the download of the final latents.
fn time_device(
    spec: &ModelSpec,
    a: &SampleArgs,
    dev: &KernelDevice,
) -> Result<(Timing, Option<OpProfile>)> {
    if dev.is_emulator() {
        spec.emulated_footprint(DeviceParams::FROZEN_BYTES_PER_PARAM)
            .check("bench sample --device emu")?;
    }
    // sampling needs the bf16 weights only (2 bytes a parameter: SD3.5-large fits an 80 GB card)
    let model = DeviceMmdit::frozen(dev, &spec.random_model(0))?;
    let inputs = spec.random_inputs(a.model.batch, 1);
    let shift = if spec.preset == Preset::Shapes {
        1.0
    } else {
        SD3_SHIFT
    };
    let sigmas = reference_sigmas(a.steps, shift);
    let scale = (a.cfg != 1.0).then_some(a.cfg);
    // One plan for every run: its buffers (and with --graph its recorded graph) are reused, the
    // inputs uploaded into them each run. The second run records the graph: warm up past it.
    let mut plan =
        EulerPlan::new(&model, &sigmas, scale, a.graph).modulate_ahead(!a.modulation_per_step);
    let mut one = || -> Result<()> {
        let guidance = scale.map(|scale| Guidance {
            pooled: &inputs.pooled,
            context: &inputs.context,
            scale,
        });
        let x = plan.sample(&inputs.x, &inputs.pooled, &inputs.context, guidance)?;
        std::hint::black_box(x);
        Ok(())
    };
    if a.graph {
        one()?;
    }
    let timing = time_fallible(WARMUP, a.common.iters, &mut one)?;
    if !a.common.profile {
        return Ok((timing, None));
    }
    Ok((timing, Some(profile_fallible(dev, one)?)))
}

/// The committed teacher through the sampler the `sample` command uses.
fn time_teacher(a: &SampleArgs, teacher: &Path) -> Result<Timed> {
    let model = ShapesModel::load(teacher)?;
    let spec = ModelSpec::shapes(&model, a.model.res)?;
    if spec.resolution != RESOLUTION {
        return Err(Error::Invalid(format!(
            "bench sample: the Shapes sampler draws {RESOLUTION}×{RESOLUTION} images (--res {})",
            spec.resolution
        )));
    }
    let batch = a.model.batch;
    spec.cpu_footprint(batch, false).check("bench sample")?;
    let prompts: Vec<String> = evaluation_prompts(batch.div_ceil(5), 0)
        .into_iter()
        .map(|(_, p)| p)
        .take(batch)
        .collect();
    let memory = PeakRss::start();
    let timing = time_fallible(WARMUP, a.common.iters, || {
        let images = sample_images(
            &model,
            &prompts,
            a.steps,
            a.cfg,
            Sampler::Euler,
            0,
            batch,
            |_| {},
        )?;
        std::hint::black_box(images);
        Ok(())
    })?;
    let peak = memory.growth_bytes();
    Ok((spec, timing, memory, peak))
}

/// A random-weight SD3 preset through the same schedule, CFG and Euler step.
fn time_random_preset(spec: ModelSpec, a: &SampleArgs) -> Result<Timed> {
    let model = spec.random_model(0);
    let inputs = spec.random_inputs(a.model.batch, 1);
    let memory = PeakRss::start();
    let timing = time_fallible(WARMUP, a.common.iters, || {
        std::hint::black_box(euler_sample(&model, &inputs, a.steps, a.cfg));
        Ok(())
    })?;
    let peak = memory.growth_bytes();
    Ok((spec, timing, memory, peak))
}

/// K Euler steps from `inputs.x` as the initial noise; the unconditional branch of CFG reuses
/// the same random conditioning (its cost, not its value, is what is measured).
fn euler_sample(model: &Mmdit, inputs: &RandomInputs, steps: usize, w: f32) -> Tensor {
    let _ng = no_grad();
    let guided = w != 1.0;
    let shape = inputs.x.shape().to_vec();
    let n = shape[0];
    let sigmas = reference_sigmas(steps, SD3_SHIFT);
    let doubled = |t: &Tensor| {
        if guided {
            concat(&[t, t], 0)
        } else {
            t.clone()
        }
    };
    let context = Var::constant(doubled(&inputs.context));
    let pooled = Var::constant(doubled(&inputs.pooled));
    let mut x = inputs.x.to_vec();
    for i in 0..steps {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        let xt = Var::constant(doubled(&Tensor::from_vec(x.clone(), &shape)));
        let t = vec![timestep_of(s); if guided { 2 * n } else { n }];
        let v = model.forward(&MmditInputs {
            x: &xt,
            timestep: &t,
            pooled: &pooled,
            context: &context,
        });
        let v = if guided {
            let halves = split(v.value(), 0, &[n, n]);
            cfg(halves[0].f32s(), halves[1].f32s(), w)
        } else {
            v.value().to_vec()
        };
        euler_step(&mut x, &v, s, s_next);
    }
    Tensor::from_vec(x, &shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::presets::tests::tiny_sd3_spec;
    use crate::bench::{BenchDevice, CommonArgs, ModelArgs};

    fn args(cfg: f32) -> SampleArgs {
        SampleArgs {
            common: CommonArgs {
                device: BenchDevice::Cpu,
                iters: 1,
                json: false,
                profile: false,
            },
            model: ModelArgs {
                model: Preset::Sd35Medium,
                res: None,
                batch: 2,
            },
            steps: 3,
            cfg,
            graph: false,
            modulation_per_step: false,
        }
    }

    #[test]
    fn an_sd3_style_sample_is_timed_with_and_without_cfg() {
        for (w, calls_per_step) in [(1.0, 2u64), (2.0, 4)] {
            let spec = tiny_sd3_spec();
            let per_sample_call = mmdit_forward_flops(&spec.config, spec.call_shape(1));
            let a = args(w);
            let r = cpu_report(&a, time_random_preset(spec, &a).unwrap(), 1.0);
            assert!(matches!(r.value("sample_ms"), Some(Cell::Num { value, .. }) if *value > 0.0));
            // Per-sample FLOPs scale with the batch: 3 steps × (2 or 4 samples per call).
            let want = 3 * calls_per_step * per_sample_call;
            assert!(
                matches!(r.value("mmdit_flops"), Some(Cell::Count(f)) if *f == want),
                "{:?}",
                r.value("mmdit_flops")
            );
        }
    }

    #[test]
    fn the_euler_sample_moves_the_noise_and_stays_finite() {
        let spec = tiny_sd3_spec();
        let model = spec.random_model(0);
        let inputs = spec.random_inputs(2, 1);
        for w in [1.0, 3.0] {
            let x = euler_sample(&model, &inputs, 2, w);
            assert_eq!(x.shape(), inputs.x.shape());
            assert!(x.f32s().iter().all(|v| v.is_finite()));
        }
    }
}

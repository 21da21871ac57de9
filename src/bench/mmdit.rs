//! `bench mmdit`: forward (no grad) and forward+backward (a scalar loss through the autograd,
//! parameter gradients included) of a random-weight MMDiT preset — on the CPU backend, or with
//! `--device cuda|emu` the device model path (`mmdit::device`, bf16) on a GPU or the emulator.

use super::flops::{mmdit_forward_flops, mmdit_training_flops};
use super::measure::Timing;
use super::measure::{gemm_ceiling_tflops, tflops, time_runs, PeakRss, GEMM_CEILING_SIZE, WARMUP};
use super::presets::{ModelSpec, RandomInputs};
use super::profile::{add_profile, profile_one_stream};
use super::report::{Cell, Report};
use super::{ceiling_figures, kernel_device, mfu_figures};
use super::{common_parameters, MmditArgs};
use crate::autograd::no_grad;
use crate::device::kernel::{KernelDevice, KernelResult};
use crate::error::Result;
use crate::mmdit::device::{Checkpointing, DeviceMmdit, Keep};
use crate::mmdit::{Mmdit, MmditInputs};
use crate::nn::device::DeviceParams;
use crate::Var;
use std::hint::black_box;
use std::path::Path;

pub fn run(a: &MmditArgs, teacher: &Path) -> Result<Report> {
    let spec = ModelSpec::new(a.model.model, a.model.res, teacher)?;
    match kernel_device(a.common.device, "mmdit")? {
        None if a.checkpoint_activations.is_some() || a.forward_only => {
            Err(crate::error::Error::Invalid(
                "bench mmdit --checkpoint-activations / --forward-only: only on the device path \
             (--device cuda|emu)"
                    .into(),
            ))
        }
        None => {
            spec.cpu_footprint(a.model.batch, true)
                .check("bench mmdit")?;
            Ok(measure(&spec, a))
        }
        Some((dev, kind)) => measure_device(&spec, a, &dev, kind),
    }
}

/// The device model path: forward (nothing kept) and forward+backward (every parameter's
/// gradient, seeded with the gradient of the velocity's mean), timed with the device's clock.
fn measure_device(
    spec: &ModelSpec,
    a: &MmditArgs,
    dev: &KernelDevice,
    kind: &'static str,
) -> Result<Report> {
    let batch = a.model.batch;
    if dev.is_emulator() {
        let per_param = if a.forward_only {
            DeviceParams::FROZEN_BYTES_PER_PARAM
        } else {
            DeviceParams::TRAINED_BYTES_PER_PARAM
        };
        spec.emulated_footprint(per_param)
            .check("bench mmdit --device emu")?;
    }
    let model = if a.forward_only {
        DeviceMmdit::frozen(dev, &spec.random_model(0))?
    } else {
        DeviceMmdit::new(dev, &spec.random_model(0))?
    };
    let host = spec.random_inputs(batch, 1);
    let inputs = model.inputs(&host.x, &host.timestep, &host.pooled, &host.context)?;
    let out_numel = batch * spec.config.out_channels * spec.input_side * spec.input_side;
    let seed = vec![half::bf16::from_f32(1.0 / out_numel as f32); out_numel];
    let dv = dev.upload(&seed)?;

    let keep = Checkpointing::keep(a.checkpoint_activations);
    let forward = || model.forward(&inputs, Keep::Nothing).map(|_| ());
    let training = || {
        model.zero_grad()?;
        let f = model.forward(&inputs, keep)?;
        let saved = f.saved.as_ref().expect("kept");
        model.backward(&inputs, saved, &dv, true).map(|_| ())
    };
    // (timing, peak bytes above the resident model state and inputs)
    let resident = dev.live_bytes();
    let time = |work: &dyn Fn() -> KernelResult<()>| -> Result<(Timing, usize)> {
        dev.reset_peak();
        for _ in 0..WARMUP {
            work()?;
        }
        dev.synchronize()?;
        let mut runs_ms = Vec::new();
        for _ in 0..a.common.iters {
            runs_ms.push(dev.time_ms(work)? as f64);
        }
        Ok((
            Timing { runs_ms },
            dev.peak_bytes().saturating_sub(resident),
        ))
    };
    let (fwd, fwd_peak) = time(&forward)?;
    let recomputed_before = dev.recomputed_flops();
    let train = if a.forward_only {
        None
    } else {
        Some(time(&training)?)
    };
    // per forward+backward: what checkpointing recomputed (0 without)
    let recomputed =
        (dev.recomputed_flops() - recomputed_before) as f64 / (WARMUP + a.common.iters) as f64;

    let precision = if a.forward_only {
        "bf16 weights and activations (a frozen model: no masters, no gradients)"
    } else {
        "bf16 weights and activations, f32 masters and gradients"
    };
    let extra = [
        ("precision", precision.into()),
        (
            "checkpoint_activations",
            Checkpointing::name(a.checkpoint_activations).into(),
        ),
        ("forward_only", a.forward_only.into()),
    ];
    let (mut r, fwd_tf, train_tf) =
        timed_report(spec, a, &fwd, train.as_ref().map(|t| &t.0), &extra);
    r.kernel_device = Some((kind, dev.name()));
    let what = if a.forward_only {
        "weights (bf16), inputs"
    } else {
        "weights (f32 + bf16), gradients, inputs"
    };
    r.figure("resident_bytes", what, Cell::Bytes(resident as u64), "");
    r.figure(
        "peak_memory_forward_bytes",
        "peak memory, forward",
        Cell::Bytes(fwd_peak as u64),
        "",
    );
    match (train, train_tf) {
        (Some((train_timing, train_peak)), Some(train_tf)) => {
            r.figure(
                "peak_memory_bytes",
                "peak memory, forward+backward",
                Cell::Bytes(train_peak as u64),
                "",
            );
            r.figure(
                "recomputed_flops",
                "matmul FLOPs recomputed per forward+backward (activation checkpointing)",
                Cell::num(recomputed, 0),
                "FLOP",
            );
            let hfu_tf = train_tf + tflops(recomputed, train_timing.median_ms());
            mfu_figures(
                &mut r,
                &dev.name(),
                kind,
                [
                    ("forward_mfu", "forward MFU", fwd_tf),
                    ("forward_backward_mfu", "forward+backward MFU", train_tf),
                    (
                        "forward_backward_hfu",
                        "forward+backward hardware FLOPs utilisation (recomputation counted)",
                        hfu_tf,
                    ),
                ],
            );
        }
        _ => mfu_figures(
            &mut r,
            &dev.name(),
            kind,
            [("forward_mfu", "forward MFU", fwd_tf)],
        ),
    }
    if a.common.profile {
        let p = profile_one_stream(dev, forward)?;
        add_profile(&mut r, "one forward", ("forward", "forward_ops"), &p);
        if !a.forward_only {
            let p = profile_one_stream(dev, training)?;
            add_profile(
                &mut r,
                "one forward+backward",
                ("forward_backward", "forward_backward_ops"),
                &p,
            );
        }
    }
    r.note("the device model path: every op a kernel of cuda/ or a cuBLASLt GEMM (on the emulator, the CPU GEMM); inputs uploaded once, outside the timing; forward+backward includes zeroing the gradients");
    r.note("memory: the engine's own device buffers (a counter in the kernel device), peaks above the resident state; cuBLASLt's workspace and the pool's slack are not counted");
    r.note("FLOPs: matmuls and attention products at 2·M·N·K, backward = 2× forward (src/bench/flops.rs)");
    if kind == "emu" {
        r.note("emu: the CPU SIMT emulator runs the CUDA kernels one thread at a time — a functional check of the device path, not a speed figure");
    }
    Ok(r)
}

/// The report's parameters and the figures every device shares: times, FLOPs, TFLOP/s; returns
/// the report and the two throughputs.
fn timed_report(
    spec: &ModelSpec,
    a: &MmditArgs,
    forward: &Timing,
    training: Option<&Timing>,
    extra: &[(&'static str, serde_json::Value)],
) -> (Report, f64, Option<f64>) {
    let batch = a.model.batch;
    let shape = spec.call_shape(batch);
    let fwd_flops = mmdit_forward_flops(&spec.config, shape);
    let train_flops = mmdit_training_flops(&spec.config, shape);
    let fwd_ms = forward.median_ms();
    let fwd_tf = tflops(fwd_flops as f64, fwd_ms);
    let mut params = vec![
        ("model", spec.preset.name().into()),
        ("res", spec.resolution.into()),
        ("input_side", spec.input_side.into()),
        ("batch", batch.into()),
        ("image_tokens", spec.image_tokens().into()),
        ("text_tokens", spec.text_tokens.into()),
        ("model_parameters", spec.config.param_count().into()),
    ];
    params.extend(extra.iter().cloned());
    params.extend(common_parameters(&a.common));
    let mut r = Report::new("mmdit", params);
    r.figure("forward_ms", "forward", Cell::num(fwd_ms, 3), "ms");
    r.figure(
        "forward_flops",
        "forward FLOPs",
        Cell::Count(fwd_flops),
        "FLOP",
    );
    r.figure(
        "forward_tflops",
        "forward throughput",
        Cell::num(fwd_tf, 4),
        "TFLOP/s",
    );
    let Some(training) = training else {
        return (r, fwd_tf, None);
    };
    let train_ms = training.median_ms();
    let train_tf = tflops(train_flops as f64, train_ms);
    r.figure(
        "forward_backward_ms",
        "forward+backward",
        Cell::num(train_ms, 3),
        "ms",
    );
    r.figure(
        "forward_backward_flops",
        "forward+backward FLOPs",
        Cell::Count(train_flops),
        "FLOP",
    );
    r.figure(
        "forward_backward_tflops",
        "forward+backward throughput",
        Cell::num(train_tf, 4),
        "TFLOP/s",
    );
    (r, fwd_tf, Some(train_tf))
}

/// Builds the model of `spec`, times it and writes the report.
fn measure(spec: &ModelSpec, a: &MmditArgs) -> Report {
    let batch = a.model.batch;
    let iters = a.common.iters;
    let model = spec.random_model(0);
    let inputs = spec.random_inputs(batch, 1);
    let ceiling = gemm_ceiling_tflops(GEMM_CEILING_SIZE, iters);

    let memory = PeakRss::start();
    let forward = time_runs(WARMUP, iters, || {
        let _ng = no_grad();
        black_box(forward_once(&model, &inputs));
    });
    let forward_peak = memory.growth_bytes();
    let training = time_runs(WARMUP, iters, || {
        // The mean of the velocity as the loss: one scalar seed, every parameter's gradient.
        black_box(forward_once(&model, &inputs).mean().backward());
        model.params.zero_grad();
    });
    let training_peak = memory.growth_bytes();

    let (mut r, fwd_tf, train_tf) = timed_report(spec, a, &forward, Some(&training), &[]);
    let train_tf = train_tf.unwrap_or(f64::NAN);
    ceiling_figures(
        &mut r,
        ceiling,
        [
            ("forward_ceiling_ratio", "forward / GEMM ceiling", fwd_tf),
            (
                "forward_backward_ceiling_ratio",
                "forward+backward / GEMM ceiling",
                train_tf,
            ),
        ],
    );
    r.figure(
        "weights_bytes",
        "weights (f32)",
        Cell::Bytes(spec.weight_bytes()),
        "",
    );
    r.figure(
        "peak_memory_forward_bytes",
        "peak memory, forward",
        Cell::bytes(forward_peak),
        "",
    );
    r.figure(
        "peak_memory_bytes",
        "peak memory, forward+backward",
        Cell::bytes(training_peak),
        "",
    );
    r.note(format!(
        "the ceiling is a {n}x{n}x{n} f32 GEMM through the engine's sgemm, timed in this run: the ratios are a CPU stand-in for MFU, not a fraction of the chip's peak",
        n = GEMM_CEILING_SIZE
    ));
    r.note("FLOPs: matmuls and attention products at 2·M·N·K, backward = 2× forward (src/bench/flops.rs)");
    r.note(format!(
        "peak memory is on top of the weights and inputs: {}",
        memory.method()
    ));
    if spec.preset.sd3_config().is_some() {
        r.note("random weights and random conditioning (no text encoders, no VAE)");
    }
    r
}

fn forward_once(model: &Mmdit, inputs: &RandomInputs) -> Var {
    let (x, context, pooled) = inputs.vars(false);
    model.forward(&MmditInputs {
        x: &x,
        timestep: &inputs.timestep,
        pooled: &pooled,
        context: &context,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::presets::tests::tiny_sd3_spec;
    use crate::bench::{BenchDevice, CommonArgs, ModelArgs};

    #[test]
    fn an_sd3_style_spec_is_measured_end_to_end() {
        let spec = tiny_sd3_spec();
        let args = MmditArgs {
            common: CommonArgs {
                device: BenchDevice::Cpu,
                iters: 1,
                json: true,
                profile: false,
            },
            model: ModelArgs {
                model: spec.preset,
                res: Some(spec.resolution),
                batch: 2,
            },
            checkpoint_activations: None,
            forward_only: false,
        };
        let r = measure(&spec, &args);
        for key in ["forward_ms", "forward_backward_ms", "forward_tflops"] {
            match r.value(key) {
                Some(Cell::Num { value, .. }) => assert!(value.is_finite() && *value > 0.0),
                other => panic!("{key}: {other:?}"),
            }
        }
        let flops = mmdit_forward_flops(&spec.config, spec.call_shape(2));
        assert!(matches!(r.value("forward_flops"), Some(Cell::Count(f)) if *f == flops));
    }
}

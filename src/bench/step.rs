//! `bench step`: AdvDMD iterations (`train::advdmd::AdvDmd::step`) on the committed Shapes
//! teacher with the default configuration.
//!
//! An iteration's cost depends on its kind: every iteration rolls out the generator and updates
//! the fake score and discriminator ("critic"); every `r_dmd`-th also updates the generator (DMD +
//! GAN), and after the RL warm-up that update carries the RL term too. Each kind is timed on its
//! own by setting the trainer's public counters before each call, and the steady-state mean per
//! iteration follows from the cadence. No MFU: an iteration mixes batch sizes, partial forwards
//! (the discriminator stops at its feature block) and the text encoder, and a FLOP count of all
//! that would be a guess dressed as a figure.

use super::measure::{time_fallible, PeakRss, Timing, WARMUP};
use super::report::{Cell, Column, Report, Table};
use super::{common_parameters, Preset, StepArgs};
use crate::error::{Error, Result};
use crate::train::advdmd::{AdvDmd, AdvDmdConfig, IterMetrics};
use crate::train::shapes_model::ShapesModel;
use std::path::Path;

/// The kinds of iteration, in the order they are timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Critic,
    Generator,
    GeneratorRl,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Critic => "critic only (fake score + discriminator)",
            Kind::Generator => "with generator update (DMD + GAN)",
            Kind::GeneratorRl => "with generator update (DMD + GAN + RL)",
        }
    }

    /// `(iteration, generator_steps)` that make a trainer's next `step` of this kind: far past
    /// the LR warm-up, on (or just after) a generator iteration, before or after the RL warm-up.
    fn counters(self, c: &AdvDmdConfig) -> (u64, u64) {
        let r_dmd = c.r_dmd.max(1);
        let generator_iteration = 1000 * r_dmd;
        let iteration = match self {
            Kind::Critic => generator_iteration + 1,
            Kind::Generator | Kind::GeneratorRl => generator_iteration,
        };
        let generator_steps = match self {
            Kind::GeneratorRl => c.rl_warmup.next_multiple_of(c.r_rl.max(1)),
            _ => 0,
        };
        (iteration, generator_steps)
    }

    fn arm(self, t: &mut AdvDmd) {
        (t.iteration, t.generator_steps) = self.counters(&t.config);
    }

    /// Whether `step` did what this kind stands for.
    fn matches(self, generator_step: bool, rl_step: bool) -> bool {
        match self {
            Kind::Critic => !generator_step,
            Kind::Generator => generator_step && !rl_step,
            Kind::GeneratorRl => generator_step && rl_step,
        }
    }
}

pub fn run(a: &StepArgs, teacher: &Path) -> Result<Report> {
    if a.prompts == 0 || a.group == 0 {
        return Err(Error::Invalid(
            "bench step: --prompts and --group must be at least 1".into(),
        ));
    }
    if !(1..=8).contains(&a.steps_per_sample) {
        return Err(Error::Invalid(
            "bench step: --steps-per-sample must be 1 to 8".into(),
        ));
    }
    let config = AdvDmdConfig {
        prompts: a.prompts,
        group: a.group,
        steps_per_sample: a.steps_per_sample,
        ..Default::default()
    };
    if let Some((dev, kind)) = super::kernel_device(a.common.device, "step")? {
        return device::run(a, teacher, config, &dev, kind);
    }
    if a.model != Preset::Shapes
        || a.res.is_some()
        || a.checkpoint_activations.is_some()
        || a.bf16_moments
        || a.graph
        || a.pipeline
    {
        return Err(Error::Invalid(
            "bench step on the CPU: the Shapes teacher only (--model, --res, \
             --checkpoint-activations, --bf16-moments, --graph and --pipeline are for --device \
             cuda|emu)"
                .into(),
        ));
    }
    let teacher = ShapesModel::load(teacher)?;
    config
        .host_footprint(&teacher.mmdit.config, teacher.tokens_per_sample(), None)
        .check("bench step")?;
    let mut trainer = AdvDmd::new(teacher, config);
    let (kinds, rl_possible) = kinds_to_time(&trainer.config)?;

    let memory = PeakRss::start();
    let mut timings = Vec::new();
    for &kind in &kinds {
        timings.push((kind, time_kind(&mut trainer, kind, a.common.iters)?));
    }
    let peak = memory.growth_bytes();

    let median = |k: Kind| {
        timings
            .iter()
            .find(|(kind, _)| *kind == k)
            .map(|(_, t)| t.median_ms())
    };
    let r_dmd = trainer.config.r_dmd;
    // Steady state (after the RL warm-up): r_dmd − 1 critic iterations per generator iteration.
    let generator_kind = if rl_possible {
        Kind::GeneratorRl
    } else {
        Kind::Generator
    };
    let critic = median(Kind::Critic).expect("always timed");
    let generator = median(generator_kind).expect("timed");
    let steady = ((r_dmd - 1) as f64 * critic + generator) / r_dmd as f64;
    let samples = a.prompts * a.group;

    let mut params = vec![
        ("model", "shapes".into()),
        ("prompts", a.prompts.into()),
        ("group", a.group.into()),
        ("steps_per_sample", a.steps_per_sample.into()),
        ("r_dmd", r_dmd.into()),
    ];
    params.extend(common_parameters(&a.common));
    let mut r = Report::new("step", params);
    r.figure(
        "iteration_ms",
        "mean iteration, steady state",
        Cell::num(steady, 1),
        "ms",
    );
    r.figure(
        "critic_iteration_ms",
        "critic-only iteration",
        Cell::num(critic, 1),
        "ms",
    );
    r.figure(
        "generator_iteration_ms",
        "generator iteration (DMD + GAN)",
        Cell::num(median(Kind::Generator).expect("always timed"), 1),
        "ms",
    );
    r.figure(
        "generator_rl_iteration_ms",
        "generator iteration (DMD + GAN + RL)",
        median(Kind::GeneratorRl).map_or(Cell::NotAvailable, |v| Cell::num(v, 1)),
        "ms",
    );
    r.figure(
        "samples_per_s",
        "generator samples, steady state",
        Cell::num(samples as f64 / (steady * 1e-3), 2),
        "samples/s",
    );
    r.figure("mfu", "MFU", Cell::NotAvailable, "");
    r.figure("peak_memory_bytes", "peak memory", Cell::bytes(peak), "");
    r.tables.push(kinds_table(&timings));
    r.note(format!(
        "steady state = ((r_dmd − 1)·critic + generator{}) / r_dmd with r_dmd = {r_dmd}",
        if rl_possible { " with RL" } else { "" }
    ));
    r.note("MFU n/a: an iteration mixes batch sizes, partial forwards and the text encoder; no honest FLOP count");
    r.note(format!(
        "peak memory is on top of the loaded teacher, generator, fake score and head: {}",
        memory.method()
    ));
    Ok(r)
}

/// The iteration kinds a configuration has, and whether the RL term is among them (it needs a
/// stochastic transition: K ≥ 2 and ρ > 0); an error when no critic-only iteration exists.
fn kinds_to_time(c: &AdvDmdConfig) -> Result<(Vec<Kind>, bool)> {
    if c.r_dmd <= 1 {
        return Err(Error::Invalid(
            "bench step: r_dmd = 1 leaves no critic-only iterations to time".into(),
        ));
    }
    let rl_possible = c
        .step_kind(0, c.rl_warmup.next_multiple_of(c.r_rl.max(1)))
        .1;
    let kinds = [Kind::Critic, Kind::Generator, Kind::GeneratorRl]
        .into_iter()
        .filter(|&k| k != Kind::GeneratorRl || rl_possible)
        .collect();
    Ok((kinds, rl_possible))
}

/// A warm-up then `iters` timed iterations of one kind, each checked to be of that kind.
fn time_kind(trainer: &mut AdvDmd, kind: Kind, iters: usize) -> Result<Timing> {
    time_fallible(WARMUP, iters, || {
        kind.arm(trainer);
        let m = trainer.step()?;
        if !kind.matches(m.generator_step, m.rl_step) {
            return Err(Error::Invalid(format!(
                "bench step: an iteration meant as `{}` ran generator={} rl={}",
                kind.name(),
                m.generator_step,
                m.rl_step
            )));
        }
        Ok(())
    })
}

fn kinds_table(timings: &[(Kind, Timing)]) -> Table {
    Table {
        name: "iterations",
        columns: vec![
            Column {
                key: "kind",
                header: "iteration kind",
            },
            Column {
                key: "median_ms",
                header: "median ms",
            },
            Column {
                key: "runs_ms",
                header: "runs (ms)",
            },
        ],
        rows: timings
            .iter()
            .map(|(k, t)| {
                let runs: Vec<String> = t.runs_ms.iter().map(|v| format!("{v:.1}")).collect();
                vec![
                    Cell::Text(k.name().into()),
                    Cell::num(t.median_ms(), 1),
                    Cell::Text(runs.join(" ")),
                ]
            })
            .collect(),
    }
}

/// `bench step --device cuda|emu`: the same iteration kinds through `train::advdmd_device` —
/// the Shapes teacher (from its folder, batches from the Shapes world) or an SD3 preset with
/// random weights and conditioning — with MFU from the matmul FLOPs the device counted.
mod device {
    use super::*;
    use crate::bench::measure::time_fallible;
    use crate::bench::presets::ModelSpec;
    use crate::bench::profile::profile_fallible;
    use crate::device::host_memory::Footprint;
    use crate::device::kernel::KernelDevice;
    use crate::mmdit::device::Checkpointing;
    use crate::train::advdmd_device::{
        shapes_batch, Cond, DeviceAdvDmd, DeviceRunOptions, IterBatch,
    };
    use crate::Rng;

    pub fn run(
        a: &StepArgs,
        teacher: &Path,
        config: AdvDmdConfig,
        dev: &KernelDevice,
        kind: &'static str,
    ) -> Result<Report> {
        let opts = DeviceRunOptions {
            keep: Checkpointing::keep(a.checkpoint_activations),
            bf16_moments: a.bf16_moments,
            graph: a.graph,
        };
        let (m, g, n) = (
            config.prompts,
            config.group,
            config.prompts.saturating_mul(config.group),
        );
        let (mut run, batch, spec) = if a.model == Preset::Shapes {
            let teacher = ShapesModel::load(teacher)?;
            let emulated_moments = dev.is_emulator().then_some(a.bf16_moments);
            config
                .host_footprint(
                    &teacher.mmdit.config,
                    teacher.tokens_per_sample(),
                    emulated_moments,
                )
                .check("bench step")?;
            let host = AdvDmd::new(teacher, config);
            let mut rng = Rng::new(1);
            let batch = shapes_batch(&host.teacher, m, g, &mut rng)?;
            (DeviceAdvDmd::from_host(dev, &host, opts)?, batch, None)
        } else {
            let spec = ModelSpec::new(a.model, a.res, teacher)?;
            if dev.is_emulator() {
                let state = config.device_state_bytes(&spec.config, a.bf16_moments);
                Footprint::new()
                    .with(
                        "the f32 teacher, generator and fake score on the host",
                        3 * spec.weight_bytes(),
                    )
                    .with("the emulated device's state", state)
                    .check("bench step --device emu")?;
            }
            let teacher = spec.random_model(0);
            let run = DeviceAdvDmd::new(dev, (&teacher.config, &teacher.params), config, opts)?;
            let cond = |rows, seed| {
                let r = spec.random_inputs(rows, seed);
                (
                    r.x,
                    Cond {
                        context: r.context,
                        pooled: r.pooled,
                    },
                )
            };
            let (real, real_cond) = cond(m, 1);
            let batch = IterBatch {
                real,
                real_cond,
                cond: cond(n, 2).1,
                uncond: cond(n, 3).1,
            };
            (run, batch, Some(spec))
        };
        let (kinds, rl_possible) = kinds_to_time(&run.config)?;
        // with graphs, a kind's second run records its graph: warm up past it, so every timed
        // iteration is a replay
        let warmup = WARMUP + usize::from(a.graph);
        let resident = dev.live_bytes();
        dev.reset_peak();
        let mut timings = Vec::new();
        let mut profiles = Vec::new();
        for &k in &kinds {
            let counts = || (dev.matmul_flops(), dev.recomputed_flops());
            let flops_before = counts();
            let mut leads = Vec::new();
            let t = if a.pipeline {
                for _ in 0..warmup {
                    one_iteration(&mut run, &batch, k, &mut leads)?;
                }
                pipelined(&mut run, &batch, k, a.common.iters, &mut leads)?
            } else {
                time_fallible(warmup, a.common.iters, || {
                    one_iteration(&mut run, &batch, k, &mut leads)
                })?
            };
            let runs = (warmup + a.common.iters) as f64;
            let after = counts();
            let flops = (
                (after.0 - flops_before.0) as f64 / runs,
                (after.1 - flops_before.1) as f64 / runs,
            );
            if a.common.profile {
                let one = || one_iteration(&mut run, &batch, k, &mut leads);
                profiles.push((k, profile_fallible(dev, one)?));
            }
            // the timed runs' (a profile's run comes after them)
            let timed = leads.iter().skip(warmup).take(a.common.iters);
            let lead_ms = Timing {
                runs_ms: timed.copied().collect(),
            }
            .median_ms();
            timings.push((k, t, flops, lead_ms));
        }
        let peak = dev.peak_bytes().saturating_sub(resident);
        // with graphs, their temporaries come from the driver's graph memory, not the counter
        let graph_memory = dev.graph_memory_bytes()?;

        let r_dmd = run.config.r_dmd;
        let generator_kind = if rl_possible {
            Kind::GeneratorRl
        } else {
            Kind::Generator
        };
        let get = |k: Kind| {
            timings
                .iter()
                .find(|t| t.0 == k)
                .map(|t| (t.1.median_ms(), t.2))
        };
        let (critic_ms, (critic_flops, critic_re)) = get(Kind::Critic).expect("always timed");
        let (gen_ms, (gen_flops, gen_re)) = get(generator_kind).expect("timed");
        let lead = |k: Kind| timings.iter().find(|t| t.0 == k).map_or(0.0, |t| t.3);
        let w = (r_dmd - 1) as f64;
        let steady_ms = (w * critic_ms + gen_ms) / r_dmd as f64;
        let steady_lead_ms = (w * lead(Kind::Critic) + lead(generator_kind)) / r_dmd as f64;
        let steady_flops = (w * critic_flops + gen_flops) / r_dmd as f64;
        let steady_recomputed = (w * critic_re + gen_re) / r_dmd as f64;

        let mut params = vec![
            ("model", a.model.name().into()),
            ("prompts", a.prompts.into()),
            ("group", a.group.into()),
            ("steps_per_sample", a.steps_per_sample.into()),
            ("r_dmd", r_dmd.into()),
            (
                "checkpoint_activations",
                Checkpointing::name(a.checkpoint_activations).into(),
            ),
            ("bf16_moments", a.bf16_moments.into()),
            ("graph", a.graph.into()),
            ("pipeline", a.pipeline.into()),
        ];
        if let Some(spec) = &spec {
            params.push(("res", spec.resolution.into()));
            params.push(("text_tokens", spec.text_tokens.into()));
            params.push(("model_parameters", spec.config.param_count().into()));
        }
        params.extend(common_parameters(&a.common));
        let mut r = Report::new("step", params);
        r.kernel_device = Some((kind, dev.name()));
        r.figure(
            "iteration_ms",
            "mean iteration, steady state",
            Cell::num(steady_ms, 1),
            "ms",
        );
        r.figure(
            "critic_iteration_ms",
            "critic-only iteration",
            Cell::num(critic_ms, 1),
            "ms",
        );
        r.figure(
            "generator_iteration_ms",
            "generator iteration (DMD + GAN)",
            Cell::num(get(Kind::Generator).expect("always timed").0, 1),
            "ms",
        );
        r.figure(
            "generator_rl_iteration_ms",
            "generator iteration (DMD + GAN + RL)",
            get(Kind::GeneratorRl).map_or(Cell::NotAvailable, |v| Cell::num(v.0, 1)),
            "ms",
        );
        r.figure(
            "host_lead_ms",
            "host time before an iteration's device work (draws, conversions, uploads), steady \
             state: the device idles through it",
            Cell::num(steady_lead_ms, 2),
            "ms",
        );
        r.figure(
            "samples_per_s",
            "generator samples, steady state",
            Cell::num(n as f64 / (steady_ms * 1e-3), 2),
            "samples/s",
        );
        r.figure(
            "iteration_flops",
            "matmul FLOPs per iteration, steady state",
            Cell::num(steady_flops, 0),
            "FLOP",
        );
        r.figure(
            "recomputed_flops",
            "matmul FLOPs recomputed per iteration (activation checkpointing), steady state",
            Cell::num(steady_recomputed, 0),
            "FLOP",
        );
        let tf = |flops: f64, ms: f64| flops / (ms * 1e-3) / 1e12;
        r.figure(
            "tflops",
            "throughput, steady state",
            Cell::num(tf(steady_flops, steady_ms), 2),
            "TFLOP/s",
        );
        r.figure(
            "graph_replays",
            "iterations replayed from a recorded CUDA graph",
            Cell::num(run.graph_replays() as f64, 0),
            "",
        );
        r.figure(
            "resident_bytes",
            "models, gradients, optimizer and EMA state",
            Cell::Bytes(resident as u64),
            "",
        );
        r.figure(
            "peak_memory_bytes",
            "peak memory above the resident state",
            Cell::Bytes(peak as u64),
            "",
        );
        if let (true, Some(bytes)) = (a.graph, graph_memory) {
            r.figure(
                "graph_memory_bytes",
                "graph memory the driver holds for the recorded iterations",
                Cell::Bytes(bytes),
                "",
            );
        }
        super::super::mfu_figures(
            &mut r,
            &dev.name(),
            kind,
            [
                ("mfu", "MFU, steady state", tf(steady_flops, steady_ms)),
                (
                    "critic_mfu",
                    "MFU, critic-only iteration",
                    tf(critic_flops, critic_ms),
                ),
                (
                    "generator_mfu",
                    "MFU, generator iteration",
                    tf(gen_flops, gen_ms),
                ),
                (
                    "hfu",
                    "hardware FLOPs utilisation (recomputation counted), steady state",
                    tf(steady_flops + steady_recomputed, steady_ms),
                ),
            ],
        );
        let table_timings: Vec<(Kind, Timing)> =
            timings.iter().map(|(k, t, _, _)| (*k, t.clone())).collect();
        r.tables.push(kinds_table(&table_timings));
        for (k, p) in &profiles {
            let names = match k {
                Kind::Critic => ("critic", "critic_ops"),
                Kind::Generator => ("generator", "generator_ops"),
                Kind::GeneratorRl => ("generator_rl", "generator_rl_ops"),
            };
            let what = format!("one iteration, {}", k.name());
            super::super::profile::add_profile(&mut r, &what, names, p);
        }
        r.note(format!(
            "steady state = ((r_dmd − 1)·critic + generator{}) / r_dmd with r_dmd = {r_dmd}",
            if rl_possible { " with RL" } else { "" }
        ));
        r.note("FLOPs: the matmuls the device was given (GEMMs at 2·M·N·K, attention in the FlashAttention convention, backward 2.5× forward), counted per iteration kind; MFU counts each model FLOP once: the blocks recomputed by activation checkpointing are left out of it (`recomputed_flops`) and counted in HFU");
        r.note("memory: the engine's own device buffers (a counter in the kernel device); cuBLASLt's workspace and the pool's slack are not counted");
        if kind == "emu" {
            r.note("emu: the SIMT emulator, a functional check, not a speed figure");
        }
        Ok(r)
    }

    /// One iteration of kind `k`, waited for; its host lead into `leads`.
    fn one_iteration(
        run: &mut DeviceAdvDmd,
        batch: &IterBatch,
        k: Kind,
        leads: &mut Vec<f64>,
    ) -> Result<()> {
        (run.iteration, run.generator_steps) = k.counters(&run.config);
        let m = run.step(batch)?;
        leads.push(run.last_host_lead_ms);
        run.dev.synchronize()?;
        check_kind(k, &m)
    }

    fn check_kind(k: Kind, m: &IterMetrics) -> Result<()> {
        if !k.matches(m.generator_step, m.rl_step) {
            return Err(Error::Invalid(format!(
                "bench step: an iteration meant as `{}` ran generator={} rl={}",
                k.name(),
                m.generator_step,
                m.rl_step
            )));
        }
        Ok(())
    }

    /// `iters` iterations of kind `k` back to back, each queued before the previous one's
    /// metrics are read, uploads through pinned memory: the mean time an iteration (as each of
    /// `iters` runs: they are not timed apart).
    fn pipelined(
        run: &mut DeviceAdvDmd,
        batch: &IterBatch,
        k: Kind,
        iters: usize,
        leads: &mut Vec<f64>,
    ) -> Result<Timing> {
        run.dev.synchronize()?;
        run.dev.set_async_copies(true);
        let start = std::time::Instant::now();
        let timed = (|| {
            let mut queued = None;
            for _ in 0..iters {
                (run.iteration, run.generator_steps) = k.counters(&run.config);
                let q = run.step_queued(batch)?;
                leads.push(run.last_host_lead_ms);
                if let Some(prev) = queued.replace(q) {
                    check_kind(k, &run.finish(prev)?)?;
                }
            }
            if let Some(last) = queued {
                check_kind(k, &run.finish(last)?)?;
            }
            run.dev.synchronize().map_err(Error::from)
        })();
        run.dev.set_async_copies(false);
        timed?;
        let each = start.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64;
        Ok(Timing {
            runs_ms: vec![each; iters],
        })
    }
}

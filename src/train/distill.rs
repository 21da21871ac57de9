//! `advdmd distill`: the AdvDMD run loop around [`AdvDmd::step`] or a device's iteration —
//! metrics (JSON lines), atomic checkpoints every `checkpoint_every` iterations with bit-exact
//! `--resume`, and at the end the EMA generator as a model folder (`OUT/model`, sampled on its own
//! K-step schedule). A Shapes teacher trains on the CPU or a device and is evaluated beside its
//! student; an SD3-family checkpoint trains on a device from precomputed data
//! ([`distill_latents`]).

use super::advdmd::{AdvDmd, AdvDmdConfig, IterMetrics};
use super::advdmd_device::{
    latents_batch, shapes_batch, DeviceAdvDmd, DeviceRunOptions, IterBatch, QueuedIteration,
};
use super::checkpoint_sample::write_latent_samples;
use super::shapes_model::{sample_images, Sampler, ShapesModel};
use crate::data::latents::{EpochOrder, LatentData};
use crate::device::host_memory::Footprint;
use crate::device::kernel::KernelDevice;
use crate::error::{Error, Result};
use crate::eval::image::to_u8;
use crate::eval::{evaluate_images, evaluation_prompts, EvalReport};
use crate::mmdit::{save_mmdit_sized, Layout, MmditCheckpoint};
use crate::nn::ParamSource;
use crate::tensor::Rng;
use std::io::Write;
use std::path::{Path, PathBuf};

/// How a run begins.
#[derive(Clone, Debug)]
pub enum Start {
    /// From the teacher.
    Fresh,
    /// From `OUT/checkpoint.safetensors`, with the same configuration.
    Resume,
    /// From another run's folder, with late switches changed ([`AdvDmd::fork`]); its metrics up
    /// to the fork are copied, so `OUT/metrics.jsonl` reads as one run.
    ForkFrom(std::path::PathBuf),
}

pub struct DistillRun {
    pub config: AdvDmdConfig,
    pub iterations: u64,
    pub checkpoint_every: u64,
    /// Where the iterations run: `None` the CPU trainer, else a kernel device (a GPU, or the
    /// emulator) through [`DeviceAdvDmd`], which checkpoints through the CPU trainer's state.
    pub device: Option<(KernelDevice, DeviceRunOptions)>,
    /// A checkpoint teacher's run: at each checkpoint the EMA generator samples the data's first
    /// this many prompts into `OUT/samples/iter-NNNNNNN/` (0: none).
    pub samples: usize,
}

fn metrics_line(m: &IterMetrics) -> serde_json::Value {
    serde_json::json!({
        "iteration": m.iteration, "fake_loss": m.fake_loss, "d_loss": m.d_loss,
        "d_acc_real": m.d_acc_real, "d_acc_fake": m.d_acc_fake,
        "d_acc_by_sigma": m.d_acc_by_sigma.iter()
            .map(|&(s, r, f)| serde_json::json!({"sigma": s, "real": r, "fake": f}))
            .collect::<Vec<_>>(),
        "dmd_grad_norm": m.dmd_grad_norm,
        "gan_loss": m.gan_loss, "rl_loss": m.rl_loss, "mean_reward": m.mean_reward,
        "generator_step": m.generator_step, "rl_step": m.rl_step,
    })
}

/// The first of an iteration's losses (and the DMD gradient's norm) that is not finite: its name
/// and value.
fn non_finite_loss(m: &IterMetrics) -> Option<(&'static str, f32)> {
    [
        ("fake_loss", m.fake_loss),
        ("d_loss", m.d_loss),
        ("dmd_grad_norm", m.dmd_grad_norm),
        ("gan_loss", m.gan_loss),
        ("rl_loss", m.rl_loss),
        ("mean_reward", m.mean_reward),
    ]
    .into_iter()
    .find(|(_, v)| !v.is_finite())
}

/// What the run loop drives: the CPU trainer, or a device run with its batches.
trait Iterations {
    /// The next finished iteration's metrics; `None` once the run has done its iterations.
    fn next(&mut self) -> Result<Option<IterMetrics>>;
    /// Writes the checkpoint of the state after the last iteration `next` returned.
    fn save(&mut self) -> Result<()>;
}

struct CpuIterations<'a> {
    state: &'a mut AdvDmd,
    iterations: u64,
    ckpt: &'a Path,
}

impl Iterations for CpuIterations<'_> {
    fn next(&mut self) -> Result<Option<IterMetrics>> {
        if self.state.iteration >= self.iterations {
            return Ok(None);
        }
        self.state.step().map(Some)
    }

    fn save(&mut self) -> Result<()> {
        self.state.save(self.ckpt)
    }
}

/// A device run: the next iteration is queued before this one's metrics are read (its batch
/// drawn, converted and uploaded while the device runs this one), except after an iteration
/// whose state is saved: that one is finished first, so the state saved is its own.
struct DeviceIterations<'a, B, S> {
    device: &'a mut DeviceAdvDmd,
    in_flight: Option<QueuedIteration>,
    iterations: u64,
    checkpoint_every: u64,
    /// The batch of the iteration of the given number (0-based), drawn from the run's RNG or
    /// read from its data.
    batch: B,
    save: S,
}

impl<B, S> Iterations for DeviceIterations<'_, B, S>
where
    B: FnMut(&mut Rng, u64) -> Result<IterBatch>,
    S: FnMut(&DeviceAdvDmd) -> Result<()>,
{
    fn next(&mut self) -> Result<Option<IterMetrics>> {
        let d = &mut *self.device;
        loop {
            let saves = self.in_flight.as_ref().is_some_and(|q| {
                saves_state(q.iteration(), self.checkpoint_every, self.iterations)
            });
            if d.iteration >= self.iterations || saves {
                return self.in_flight.take().map(|q| d.finish(q)).transpose();
            }
            let batch = (self.batch)(&mut d.rng, d.iteration)?;
            let q = d.step_queued(&batch)?;
            if let Some(prev) = self.in_flight.replace(q) {
                return d.finish(prev).map(Some);
            }
        }
    }

    fn save(&mut self) -> Result<()> {
        (self.save)(self.device)
    }
}

/// Whether the state after iteration `it` is saved.
fn saves_state(it: u64, checkpoint_every: u64, iterations: u64) -> bool {
    it % checkpoint_every.max(1) == 0 || it == iterations
}

/// The run folder's checkpoint and metrics for `start`: a fresh run removes the old metrics; a
/// resumed or forked one keeps (copies) the source's first `iteration` lines, so
/// `OUT/metrics.jsonl` reads as one run.
fn start_metrics(out: &Path, start: &Start, iteration: u64) -> Result<std::fs::File> {
    let metrics_path = out.join("metrics.jsonl");
    match start {
        Start::Fresh => {
            let _ = std::fs::remove_file(&metrics_path);
        }
        Start::Resume | Start::ForkFrom(_) => {
            let dir = match start {
                Start::ForkFrom(dir) => dir.as_path(),
                _ => out,
            };
            let prefix = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
            let kept: String = prefix
                .lines()
                .take(iteration as usize)
                .map(|l| format!("{l}\n"))
                .collect();
            crate::checkpoint::write_atomic(&metrics_path, kept.as_bytes())?;
        }
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))
}

/// The checkpoint a resumed or forked run starts from; an error naming it when absent.
fn source_checkpoint(out: &Path, start: &Start) -> Result<Option<PathBuf>> {
    let dir = match start {
        Start::Fresh => return Ok(None),
        Start::Resume => out,
        Start::ForkFrom(dir) => dir.as_path(),
    };
    let src = dir.join("checkpoint.safetensors");
    if !src.exists() {
        return Err(Error::Invalid(format!(
            "no checkpoint at {}",
            src.display()
        )));
    }
    Ok(Some(src))
}

/// The run loop: each iteration's metrics line, the stop on a non-finite loss (before anything
/// is saved: the last checkpoint stays as it was, and its metrics line is written for the
/// diagnosis), and the checkpoints. `saved`: the iteration the run folder's checkpoint holds
/// (0: none, or one this run will overwrite).
fn run_iterations(
    run: &DistillRun,
    it: &mut dyn Iterations,
    out: &Path,
    metrics: &mut std::fs::File,
    mut saved: u64,
    on_iter: &mut dyn FnMut(&IterMetrics),
) -> Result<()> {
    let ckpt = out.join("checkpoint.safetensors");
    let metrics_path = out.join("metrics.jsonl");
    while let Some(m) = it.next()? {
        writeln!(metrics, "{}", metrics_line(&m)).map_err(|e| Error::io(&metrics_path, e))?;
        if let Some((name, value)) = non_finite_loss(&m) {
            metrics.flush().map_err(|e| Error::io(&metrics_path, e))?;
            let kept = if saved > 0 {
                format!("{} (iteration {saved}) is kept", ckpt.display())
            } else {
                "no checkpoint was written".to_string()
            };
            return Err(Error::Invalid(format!(
                "iteration {}: {name} became {value}; stopped without saving ({kept}): \
                 a lower --lr or a longer --lr-warmup may help",
                m.iteration
            )));
        }
        on_iter(&m);
        if saves_state(m.iteration, run.checkpoint_every, run.iterations) {
            metrics.flush().map_err(|e| Error::io(&metrics_path, e))?;
            it.save()?;
            saved = m.iteration;
        }
    }
    Ok(())
}

/// Runs (or resumes) a distillation of the teacher in `teacher_dir` into `out`. An iteration
/// whose losses are not finite stops the run with an error before anything is saved: the last
/// checkpoint stays as it was (its metrics line is written, for the diagnosis).
pub fn distill(
    run: &DistillRun,
    teacher_dir: &Path,
    out: &Path,
    start: &Start,
    mut on_iter: impl FnMut(&IterMetrics),
) -> Result<AdvDmd> {
    run.config.check()?;
    let teacher = ShapesModel::load(teacher_dir)?;
    let emulated_moments = run
        .device
        .as_ref()
        .filter(|(dev, _)| dev.is_emulator())
        .map(|(_, opts)| opts.bf16_moments);
    run.config
        .host_footprint(
            &teacher.mmdit.config,
            teacher.tokens_per_sample(),
            emulated_moments,
        )
        .check("distill")?;
    crate::checkpoint::create_out_dir(out)?;
    let ckpt = out.join("checkpoint.safetensors");
    let mut state = match source_checkpoint(out, start)? {
        None => AdvDmd::new(teacher, run.config.clone()),
        Some(src) if matches!(start, Start::Resume) => {
            AdvDmd::load(&src, teacher, run.config.clone())?
        }
        Some(src) => AdvDmd::fork(&src, teacher, run.config.clone())?,
    };
    let mut metrics = start_metrics(out, start, state.iteration)?;
    let saved = match start {
        Start::Resume => state.iteration,
        _ => 0,
    };
    match &run.device {
        None => {
            let mut cpu = CpuIterations {
                state: &mut state,
                iterations: run.iterations,
                ckpt: &ckpt,
            };
            run_iterations(run, &mut cpu, out, &mut metrics, saved, &mut on_iter)?;
        }
        // On a kernel device the run's state lives there; the CPU trainer holds the teacher and
        // receives the state at every checkpoint and at the end.
        Some((dev, opts)) => {
            let mut device = DeviceAdvDmd::from_host(dev, &state, *opts)?;
            let text = ShapesModel::load(teacher_dir)?;
            let (prompts, group) = (run.config.prompts, run.config.group);
            let state = &mut state;
            let mut it = DeviceIterations {
                device: &mut device,
                in_flight: None,
                iterations: run.iterations,
                checkpoint_every: run.checkpoint_every,
                batch: |rng: &mut Rng, _| shapes_batch(&text, prompts, group, rng),
                save: |d: &DeviceAdvDmd| {
                    d.sync_to_host(state)?;
                    state.save(&ckpt)
                },
            };
            run_iterations(run, &mut it, out, &mut metrics, saved, &mut on_iter)?;
            device.sync_to_host(state)?;
        }
    }
    let model = distilled_model(&state);
    let extra = serde_json::json!({ "distill": format!("{:?}", run.config), "iterations": state.iteration, "weights": "ema" });
    model.save(
        &out.join("model"),
        &state.ema.shadow,
        &state.teacher.text.params,
        extra,
    )?;
    Ok(state)
}

/// Distils an SD3-family checkpoint (`teacher`: a file or a diffusers folder, either layout) on
/// the precomputed latents and prompt embeddings in `data` ([`LatentData`]) into `out`, on a
/// kernel device: checkpoints straight from the device ([`DeviceAdvDmd::save`]), and at the end
/// the EMA generator in the teacher's layout and dtype as `OUT/model` with its few-step schedule
/// (`OUT/model/advdmd.json`). Returns the iterations done.
pub fn distill_latents(
    run: &DistillRun,
    teacher: &Path,
    data: &Path,
    out: &Path,
    start: &Start,
    mut on_iter: impl FnMut(&IterMetrics),
) -> Result<u64> {
    run.config.check()?;
    let Some((dev, opts)) = &run.device else {
        return Err(Error::Invalid(
            "a checkpoint teacher is distilled on a kernel device (--device cuda, or emu for a \
             functional check); the CPU trainer distils Shapes teachers"
                .into(),
        ));
    };
    let ckpt_in = MmditCheckpoint::open(teacher)?;
    let data = LatentData::open(data)?;
    data.check_model(&ckpt_in.config)?;
    let config = ckpt_in.config.clone();
    // the teacher streams from its file to the device one tensor at a time: on a GPU the host
    // holds a tensor, on the emulator the device's state is host memory
    if dev.is_emulator() {
        let emulated = run.config.device_state_bytes(&config, opts.bf16_moments);
        Footprint::new()
            .with("the emulated device's state", emulated)
            .check("distill")?;
    }
    crate::checkpoint::create_out_dir(out)?;
    let ckpt = out.join("checkpoint.safetensors");
    let source = source_checkpoint(out, start)?;
    let record = serde_json::json!({
        "teacher_config": format!("{config:?}"),
        "data": data.describe(),
    });
    let mut device = {
        let teacher = (&config, &ckpt_in.finite() as &dyn ParamSource);
        let c = run.config.clone();
        match &source {
            None => DeviceAdvDmd::new(dev, teacher, c, *opts)?,
            Some(src) => {
                let fork = matches!(start, Start::ForkFrom(_));
                let d = DeviceAdvDmd::resume(dev, teacher, c, *opts, src, fork)?;
                if d.run_record.as_ref() != Some(&record) {
                    return Err(Error::Invalid(format!(
                        "{}: its run distilled another teacher or on other data: {} (now {record}); \
                         a run continues exactly only on the same",
                        src.display(),
                        d.run_record.as_ref().unwrap_or(&serde_json::Value::Null)
                    )));
                }
                d
            }
        }
    };
    device.run_record = Some(record);
    let mut metrics = start_metrics(out, start, device.iteration)?;
    let saved = match start {
        Start::Resume => device.iteration,
        _ => 0,
    };
    let (prompts, group) = (run.config.prompts, run.config.group);
    let mut order = EpochOrder::new(run.config.seed, data.len());
    let mut it = DeviceIterations {
        device: &mut device,
        in_flight: None,
        iterations: run.iterations,
        checkpoint_every: run.checkpoint_every,
        batch: |_: &mut Rng, iteration: u64| {
            let first = iteration.saturating_mul(prompts as u64);
            latents_batch(&data, &mut order, first, prompts, group)
        },
        save: |d: &DeviceAdvDmd| {
            d.save(&ckpt)?;
            save_ema_samples(d, &data, run.samples, out)
        },
    };
    run_iterations(run, &mut it, out, &mut metrics, saved, &mut on_iter)?;
    save_distilled_checkpoint(&device, &ckpt_in, &out.join("model"))?;
    Ok(device.iteration)
}

/// The EMA generator's latents of the data's first `count` prompts (seeds 0, 1, …; one batch)
/// at the run's current iteration, as `out/samples/iter-NNNNNNN/` (`tools/decode.py` makes them
/// images): the same samples at every checkpoint, so a run's progress can be seen.
fn save_ema_samples(run: &DeviceAdvDmd, data: &LatentData, count: usize, out: &Path) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let indices: Vec<usize> = (0..count.min(data.len())).collect();
    let latents = run.sample_ema_latents(data, &indices, 0)?;
    let c = &run.config;
    let fields = serde_json::json!({
        "model": format!("EMA generator, iteration {}", run.iteration), "steps": c.steps_per_sample,
        "sampler": "euler", "shift": c.shift, "cfg": 1.0, "device": if run.dev.is_emulator() { "emu" } else { "cuda" },
    });
    let dir = out
        .join("samples")
        .join(format!("iter-{:07}", run.iteration));
    write_latent_samples(&dir, latents, data, &indices, 0, &fields)
}

/// The EMA generator of a checkpoint teacher's run as a model, streamed from the device one
/// tensor at a time: `dir` in the teacher's layout (the original one as
/// `dir/transformer.safetensors`) and main dtype, with `advdmd.json`: its K-step schedule, the
/// iterations and the configuration it came from.
fn save_distilled_checkpoint(
    run: &DeviceAdvDmd,
    teacher: &MmditCheckpoint,
    dir: &Path,
) -> Result<()> {
    crate::checkpoint::create_out_dir(dir)?;
    let target = match teacher.layout {
        Layout::Original => dir.join("transformer.safetensors"),
        Layout::Diffusers => dir.to_path_buf(),
    };
    save_mmdit_sized(
        &run.ema_model(),
        &teacher.config,
        teacher.sample_size,
        teacher.layout,
        &target,
        teacher.main_dtype(),
    )?;
    let c = &run.config;
    let info = serde_json::json!({
        "weights": "ema",
        "teacher": teacher.path.display().to_string(),
        "iterations": run.iteration,
        "steps": c.steps_per_sample,
        "shift": c.shift,
        "sigmas": run.sigmas(),
        // what to pass as `sigmas=` to diffusers' StableDiffusion3Pipeline, whose scheduler
        // (shift `shift`) shifts them into `sigmas`; the last 0 is the scheduler's own
        "diffusers_sigmas": diffusers_sigmas(&run.sigmas(), c.shift),
        "rho": c.rho,
        "distill": format!("{c:?}"),
    });
    let text = serde_json::to_string_pretty(&info).expect("JSON");
    crate::checkpoint::write_atomic(&dir.join("advdmd.json"), text.as_bytes())
}

/// A K-step schedule (K + 1 shifted sigmas, ending in 0) as diffusers' pipelines take it: the K
/// noisy sigmas unshifted, rounded to f32's precision.
fn diffusers_sigmas(sigmas: &[f32], shift: f64) -> Vec<f64> {
    let noisy = &sigmas[..sigmas.len().saturating_sub(1)];
    noisy
        .iter()
        .map(|&s| crate::flow::unshift_sigma(s as f64, shift) as f32 as f64)
        .collect()
}

/// The EMA generator as a Shapes model (sharing the teacher's text encoder and tokenizer).
pub fn distilled_model(state: &AdvDmd) -> ShapesModel {
    let mut m = state.teacher.copy_transformer();
    for (n, p) in state.ema.shadow.iter() {
        m.mmdit.params.param(n).set_value(p.value());
    }
    m.sample_shift = state.config.shift;
    m.few_step = Some(state.config.steps_per_sample);
    m
}

/// Scores `model` on the fixed evaluation prompts (`per_task` each) at its default steps/CFG.
pub fn evaluate_model(
    model: &ShapesModel,
    per_task: usize,
    steps: Option<usize>,
    cfg: Option<f32>,
) -> Result<EvalReport> {
    let prompts: Vec<String> = evaluation_prompts(per_task, 0)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let (ds, dc) = model.default_steps_and_cfg();
    let images = sample_images(
        model,
        &prompts,
        steps.unwrap_or(ds),
        cfg.unwrap_or(dc),
        Sampler::Euler,
        0,
        128,
        |_| {},
    )?;
    let per = images.numel() / prompts.len();
    let rgb: Vec<Vec<u8>> = images.f32s().chunks(per).map(to_u8).collect();
    evaluate_images(&prompts, &rgb, 0)
}

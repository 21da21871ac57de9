//! `advdmd distill`: the AdvDMD run loop around [`AdvDmd::step`] — metrics (JSON lines), atomic
//! checkpoints every `checkpoint_every` iterations with bit-exact `--resume`, and at the end the
//! EMA generator as a model folder (`OUT/model`, sampled on its own K-step schedule) and an
//! evaluation of it beside the teacher.

use super::advdmd::{AdvDmd, AdvDmdConfig, IterMetrics};
use super::advdmd_device::{shapes_batch, DeviceAdvDmd, DeviceRunOptions, QueuedIteration};
use super::shapes_model::{sample_images, Sampler, ShapesModel};
use crate::device::kernel::KernelDevice;
use crate::error::{Error, Result};
use crate::eval::image::to_u8;
use crate::eval::{evaluate_images, evaluation_prompts, EvalReport};
use std::io::Write;
use std::path::Path;

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
    let metrics_path = out.join("metrics.jsonl");
    let from = match start {
        Start::Fresh => None,
        Start::Resume => Some(out.to_path_buf()),
        Start::ForkFrom(dir) => Some(dir.clone()),
    };
    let mut state = match &from {
        None => {
            let _ = std::fs::remove_file(&metrics_path);
            AdvDmd::new(teacher, run.config.clone())
        }
        Some(dir) => {
            let src = dir.join("checkpoint.safetensors");
            if !src.exists() {
                return Err(Error::Invalid(format!(
                    "no checkpoint at {}",
                    src.display()
                )));
            }
            let st = if matches!(start, Start::Resume) {
                AdvDmd::load(&src, teacher, run.config.clone())?
            } else {
                AdvDmd::fork(&src, teacher, run.config.clone())?
            };
            let prefix = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
            let kept: String = prefix
                .lines()
                .take(st.iteration as usize)
                .map(|l| format!("{l}\n"))
                .collect();
            crate::checkpoint::write_atomic(&metrics_path, kept.as_bytes())?;
            st
        }
    };
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    // On a kernel device the run's state lives there; the CPU trainer holds the teacher and
    // receives the state at every checkpoint and at the end.
    let mut on_device = match &run.device {
        Some((dev, opts)) => Some(DeviceAdvDmd::from_host(dev, &state, *opts)?),
        None => None,
    };
    let (prompts, group) = (run.config.prompts, run.config.group);
    // The iterations after which the state is saved.
    let saves_state = |it: u64| it % run.checkpoint_every.max(1) == 0 || it == run.iterations;
    // The iteration the checkpoint in `out` holds (0: none, or one this run will overwrite).
    let mut saved = if matches!(start, Start::Resume) {
        state.iteration
    } else {
        0
    };
    // On a device the next iteration is queued before this one's metrics are read (its batch
    // drawn, converted and uploaded while the device runs this one), except after an iteration
    // whose state is saved: that one is finished first, so the state saved is its own.
    let mut in_flight = None;
    loop {
        let m = match on_device.as_mut() {
            Some(d) => {
                let saves = in_flight
                    .as_ref()
                    .is_some_and(|q: &QueuedIteration| saves_state(q.iteration()));
                if d.iteration >= run.iterations || saves {
                    match in_flight.take() {
                        Some(q) => d.finish(q)?,
                        None => break,
                    }
                } else {
                    let batch = shapes_batch(&state.teacher, prompts, group, &mut d.rng)?;
                    let q = d.step_queued(&batch)?;
                    match in_flight.replace(q) {
                        Some(prev) => d.finish(prev)?,
                        None => continue,
                    }
                }
            }
            None if state.iteration >= run.iterations => break,
            None => state.step()?,
        };
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
        if saves_state(m.iteration) {
            metrics.flush().map_err(|e| Error::io(&metrics_path, e))?;
            if let Some(d) = &on_device {
                d.sync_to_host(&mut state)?;
            }
            state.save(&ckpt)?;
            saved = m.iteration;
        }
    }
    if let Some(d) = &on_device {
        d.sync_to_host(&mut state)?;
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

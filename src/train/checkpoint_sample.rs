//! Sampling an SD3-family checkpoint — a teacher, or the generator `advdmd distill --data` wrote —
//! from precomputed prompt embeddings ([`LatentData`]), on the CPU or a kernel device (Euler, the
//! whole loop on the device): latents out, which `tools/decode.py` turns into images (no VAE or
//! text encoder here).

use crate::autograd::{no_grad, Var};
use crate::data::latents::LatentData;
use crate::error::{Error, Result};
use crate::flow::device::{EulerPlan, Guidance};
use crate::flow::sample::{sample_flow, sample_seeds, seeded_noise, Sampler};
use crate::flow::{reference_sigmas, timestep_of};
use crate::kernels::shape::concat;
use crate::mmdit::device::DeviceMmdit;
use crate::mmdit::{Mmdit, MmditInputs};
use crate::tensor::Tensor;
use crate::train::rollout::few_step_sigmas;
use std::path::Path;

/// SD3 / SD3.5's sampling defaults for a teacher: 40 steps, CFG 4.5, shift 3.
pub const TEACHER_STEPS: usize = 40;
pub const TEACHER_CFG: f32 = 4.5;
pub const TEACHER_SHIFT: f64 = 3.0;

/// How a checkpoint samples by default: a distilled generator on its K-step schedule without
/// CFG (its `advdmd.json`), a teacher on the reference schedule with CFG.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleDefaults {
    /// `Some(K)` for a distilled generator.
    pub few_step: Option<usize>,
    pub steps: usize,
    pub cfg: f32,
    pub shift: f64,
}

impl SampleDefaults {
    /// Reads `advdmd.json` beside the weights of `checkpoint` (a folder, or a file in one).
    pub fn of(checkpoint: &Path) -> Result<SampleDefaults> {
        let dir = if checkpoint.is_dir() {
            checkpoint
        } else {
            checkpoint.parent().unwrap_or(Path::new("."))
        };
        let path = dir.join("advdmd.json");
        if !path.is_file() {
            return Ok(SampleDefaults {
                few_step: None,
                steps: TEACHER_STEPS,
                cfg: TEACHER_CFG,
                shift: TEACHER_SHIFT,
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let bad = |why: String| Error::Invalid(format!("{}: {why}", path.display()));
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let steps = v["steps"]
            .as_u64()
            .filter(|k| (1..=8).contains(k))
            .ok_or_else(|| bad("no `steps` of 1 to 8".into()))? as usize;
        let shift = v["shift"]
            .as_f64()
            .filter(|s| *s > 0.0 && s.is_finite())
            .ok_or_else(|| bad("no positive `shift`".into()))?;
        Ok(SampleDefaults {
            few_step: Some(steps),
            steps,
            cfg: 1.0,
            shift,
        })
    }

    /// The `steps`-step schedule (n + 1 sigmas ending in 0) at `shift`.
    pub fn schedule(&self, steps: usize, shift: f64) -> Vec<f32> {
        match self.few_step {
            Some(_) => few_step_sigmas(steps, shift),
            None => reference_sigmas(steps, shift),
        }
    }
}

/// Samples the latents of `data`'s samples `indices` (their prompts' embeddings; the folder's
/// empty prompt for CFG), `batch` at a time: sample `i` from noise seeded `seed + i`, so a
/// sample does not depend on its batch (up to the rounding of GEMMs of other row counts).
/// Returns `[n, C, H, W]`.
#[allow(clippy::too_many_arguments)]
pub fn sample_checkpoint_latents(
    model: &Mmdit,
    data: &LatentData,
    indices: &[usize],
    sigmas: &[f32],
    w: f32,
    sampler: Sampler,
    seed: u64,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Tensor> {
    let _ng = no_grad();
    let shape = data.latent_shape;
    let mut out = Vec::new();
    let seeds = sample_seeds(seed, indices.len());
    let b = batch.max(1);
    for (chunk, seeds) in indices.chunks(b).zip(seeds.chunks(b)) {
        let n = chunk.len();
        let rows = data.rows(chunk)?;
        let (context, pooled) = if w != 1.0 {
            let (uc, up) = data.uncond(n);
            (
                concat(&[&rows.context, &uc], 0),
                concat(&[&rows.pooled, &up], 0),
            )
        } else {
            (rows.context, rows.pooled)
        };
        let (context, pooled) = (Var::constant(context), Var::constant(pooled));
        let velocity = |x: &Tensor, s: f32| {
            let t = vec![timestep_of(s); x.shape()[0]];
            let v = model.forward(&MmditInputs {
                x: &Var::constant(x.clone()),
                timestep: &t,
                pooled: &pooled,
                context: &context,
            });
            Ok(v.value().clone())
        };
        let x = sample_flow(seeds, &shape, sigmas, w, sampler, velocity, &mut progress)?;
        out.extend_from_slice(x.f32s());
    }
    Ok(Tensor::from_vec(
        out,
        &[indices.len(), shape[0], shape[1], shape[2]],
    ))
}

/// [`sample_checkpoint_latents`] on a kernel device: the same noise (sample `i` seeded
/// `seed + i`; the re-noising sampler's draws go on from each sample's generator as on the CPU),
/// the K-step loop on the device (bf16 model, f32 state).
#[allow(clippy::too_many_arguments)]
pub fn sample_checkpoint_latents_device(
    model: &DeviceMmdit,
    data: &LatentData,
    indices: &[usize],
    sigmas: &[f32],
    w: f32,
    sampler: Sampler,
    seed: u64,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Tensor> {
    let [c, h, wd] = data.latent_shape;
    let scale = (w != 1.0).then_some(w);
    let mut plan = EulerPlan::new(model, sigmas, scale, false);
    if sampler == Sampler::Sde {
        plan = plan.renoising();
    }
    let mut out = Vec::new();
    let seeds = sample_seeds(seed, indices.len());
    let b = batch.max(1);
    for (chunk, seeds) in indices.chunks(b).zip(seeds.chunks(b)) {
        let n = chunk.len();
        let (mut rngs, noise) = seeded_noise(seeds, c * h * wd);
        let noise = Tensor::from_vec(noise, &[n, c, h, wd]);
        let mut step_noise = Vec::new();
        if sampler == Sampler::Sde {
            for _ in 0..plan.noisy_steps() {
                for rng in &mut rngs {
                    step_noise.extend((0..c * h * wd).map(|_| rng.normal()));
                }
            }
        }
        let rows = data.rows(chunk)?;
        let (uc, up) = data.uncond(n);
        let guidance = scale.map(|scale| Guidance {
            pooled: &up,
            context: &uc,
            scale,
        });
        let x = match sampler {
            Sampler::Euler => plan.sample(&noise, &rows.pooled, &rows.context, guidance)?,
            Sampler::Sde => {
                plan.sample_renoised(&noise, &step_noise, &rows.pooled, &rows.context, guidance)?
            }
        };
        out.extend_from_slice(x.f32s());
        progress(n * (sigmas.len() - 1));
    }
    Ok(Tensor::from_vec(out, &[indices.len(), c, h, wd]))
}

/// Writes sampled latents (`[N, C, H, W]`, the samples of `data`'s rows `indices`, sample k
/// seeded `seed + k`) as `dir/latents.safetensors` (`latents`, the `noise` each started from, the
/// captions in its metadata) and
/// `dir/manifest.jsonl` (a line a sample: its index, data row, caption and seed, then `fields`):
/// what `tools/decode.py` reads.
pub fn write_latent_samples(
    dir: &Path,
    latents: Tensor,
    data: &LatentData,
    indices: &[usize],
    seed: u64,
    fields: &serde_json::Value,
) -> Result<()> {
    crate::checkpoint::create_out_dir(dir)?;
    let captions: Vec<String> = indices
        .iter()
        .map(|&i| data.caption(i).unwrap_or_default().to_string())
        .collect();
    let mut manifest = String::new();
    for (k, (&i, caption)) in indices.iter().zip(&captions).enumerate() {
        let mut line = serde_json::json!({
            "index": k, "sample": i, "caption": caption, "seed": seed.wrapping_add(k as u64),
        });
        if let (Some(line), Some(fields)) = (line.as_object_mut(), fields.as_object()) {
            line.extend(fields.clone());
        }
        manifest.push_str(&format!("{line}\n"));
    }
    let captions = serde_json::to_string(&captions).expect("JSON of strings");
    let meta = std::collections::HashMap::from([("advdmd.captions".to_string(), captions)]);
    // each sample's starting noise (its manifest seed's draws, as the samplers draw it), so a
    // sample can be replayed elsewhere: diffusers' pipelines take it as `latents=`
    let per = latents.numel() / indices.len().max(1);
    let (_, noise) = seeded_noise(&sample_seeds(seed, indices.len()), per);
    let noise = Tensor::from_vec(noise, latents.shape());
    crate::checkpoint::save_safetensors(
        dir.join("latents.safetensors"),
        &[
            ("latents".to_string(), latents),
            ("noise".to_string(), noise),
        ],
        Some(meta),
    )?;
    crate::checkpoint::write_atomic(&dir.join("manifest.jsonl"), manifest.as_bytes())
}

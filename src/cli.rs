//! Pieces of the command line that are more than a call: the progress bar style and `sample`.

use advdmd::data::shapes::{Prompt, Task};
use advdmd::device::host_memory::{product, Footprint};
use advdmd::eval::evaluation_prompts;
use advdmd::eval::image::{to_u8, write_grid, write_png};
use advdmd::train::shapes_model::{sample_images, Sampler, ShapesModel, CHANNELS, RESOLUTION};
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

/// The committed Shapes teacher (`ADVDMD_TEACHER` overrides).
pub fn default_teacher() -> PathBuf {
    std::env::var_os("ADVDMD_TEACHER")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/shapes-teacher"))
}

pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}<{eta_precise}] {bar:30} {pos}/{len} {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Images one `sample` call writes at most (a million 16×16 images: ~0.8 GB of pixels held at
/// once); a larger request is an error, not an allocation failure.
const MAX_IMAGES: usize = 1_000_000;

fn read_prompts(prompt: Option<String>, prompts: Option<String>) -> anyhow::Result<Vec<String>> {
    if let Some(p) = prompt {
        return Ok(vec![p]);
    }
    let Some(spec) = prompts else {
        bail!("give --prompt \"...\" or --prompts FILE (or --prompts eval:N)")
    };
    if let Some(n) = spec.strip_prefix("eval:") {
        let n: usize = n
            .parse()
            .with_context(|| format!("--prompts {spec}: N must be a number"))?;
        if !(1..=MAX_IMAGES / 5).contains(&n) {
            bail!("--prompts {spec}: N must be 1 to {}", MAX_IMAGES / 5);
        }
        return Ok(evaluation_prompts(n, 0)
            .into_iter()
            .map(|(_, p)| p)
            .collect());
    }
    let text = std::fs::read_to_string(&spec).with_context(|| format!("--prompts {spec}"))?;
    let list: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if list.is_empty() {
        bail!("--prompts {spec}: no prompts in the file");
    }
    Ok(list)
}

pub struct SampleOptions {
    pub per_prompt: usize,
    pub steps: Option<usize>,
    pub cfg: Option<f32>,
    pub shift: Option<f64>,
    pub sampler: String,
    pub seed: u64,
    pub batch: usize,
}

pub fn sample(
    checkpoint: Option<PathBuf>,
    prompt: Option<String>,
    prompts: Option<String>,
    opts: &SampleOptions,
    out: &Path,
) -> anyhow::Result<()> {
    let SampleOptions {
        per_prompt,
        shift,
        seed,
        batch,
        ..
    } = *opts;
    if let Some(s) = shift {
        if !(s > 0.0 && s.is_finite()) {
            bail!("--shift must be a positive number, got {s}");
        }
    }
    let sampler = Sampler::parse(&opts.sampler).expect("clap checked the sampler");
    let dir = checkpoint.unwrap_or_else(default_teacher);
    let mut model = ShapesModel::load(&dir)
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    if let Some(s) = shift {
        model.sample_shift = s;
    }
    let (default_steps, default_cfg) = model.default_steps_and_cfg();
    let (steps, cfg) = (
        opts.steps.unwrap_or(default_steps),
        opts.cfg.unwrap_or(default_cfg),
    );
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    if !cfg.is_finite() {
        bail!("--cfg must be a number, got {cfg}");
    }
    let base = read_prompts(prompt, prompts)?;
    let total = base.len().saturating_mul(per_prompt.max(1));
    if total > MAX_IMAGES {
        bail!("{total} images asked (prompts × --per-prompt); at most {MAX_IMAGES} a call");
    }
    // a batch of the model's calls (twice the rows with CFG) and every image, held until written
    let rows = batch.clamp(1, total.max(1)) as u64 * if cfg != 1.0 { 2 } else { 1 };
    let per = CHANNELS * RESOLUTION * RESOLUTION;
    Footprint::new()
        .with("the images (f32)", product(&[total as u64, per as u64, 4]))
        .with(
            "activations",
            model.mmdit.config.activation_floor_bytes(
                rows,
                model.tokens_per_sample() as u64,
                false,
            ),
        )
        .check("sample")?;
    // a file in the way is said before the sampling, not after
    advdmd::checkpoint::create_out_dir(out)?;
    let mut list = Vec::new();
    for p in &base {
        let task: Task = Prompt::parse(p).map(|q| q.task())?;
        model.tokenizer.encode(p)?;
        for _ in 0..per_prompt.max(1) {
            list.push((p.clone(), task));
        }
    }
    let prompts: Vec<String> = list.iter().map(|(p, _)| p.clone()).collect();
    let bar = progress_bar((prompts.len() * steps) as u64, "sample");
    let start = std::time::Instant::now();
    let images = sample_images(&model, &prompts, steps, cfg, sampler, seed, batch, |n| {
        bar.inc(n as u64)
    })?;
    bar.finish();
    let mut manifest = String::new();
    let mut tiles = Vec::new();
    for (i, ((p, task), img)) in list.iter().zip(images.f32s().chunks(per)).enumerate() {
        let file = format!("{i:05}.png");
        let rgb = to_u8(img);
        write_png(out.join(&file), &rgb, RESOLUTION, RESOLUTION)?;
        let line = serde_json::json!({
            "file": file, "prompt": p, "task": task.name(), "seed": seed.wrapping_add(i as u64),
            "model": dir.display().to_string(), "steps": steps, "sampler": sampler.name(), "shift": model.sample_shift, "cfg": cfg,
        });
        manifest.push_str(&format!("{line}\n"));
        tiles.push(rgb);
    }
    advdmd::checkpoint::write_atomic(&out.join("manifest.jsonl"), manifest.as_bytes())?;
    let cols = (tiles.len() as f64).sqrt().ceil() as usize;
    write_grid(out.join("grid.png"), &tiles, cols.max(1), 4)?;
    eprintln!(
        "{} images, {} steps, cfg {cfg}, {} in {:.1} s → {}",
        tiles.len(),
        steps,
        sampler.name(),
        start.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}

/// `advdmd distill --device`: `None` for the CPU trainer, else the kernel device (the first
/// usable GPU, or a clear error; or the emulator) and how the run holds its state. The device
/// flags without a device are an error rather than silently ignored.
pub fn distill_device(
    device: &str,
    bf16_moments: bool,
    checkpoint_activations: Option<advdmd::mmdit::device::Checkpointing>,
    graph: bool,
) -> advdmd::Result<
    Option<(
        advdmd::device::kernel::KernelDevice,
        advdmd::train::advdmd_device::DeviceRunOptions,
    )>,
> {
    use advdmd::device::kernel::KernelDevice;
    use advdmd::mmdit::device::Checkpointing;
    let dev = match device {
        "cpu" if bf16_moments || checkpoint_activations.is_some() || graph => {
            return Err(advdmd::Error::Invalid(
                "distill: --bf16-moments, --checkpoint-activations and --graph need --device \
                     cuda or emu"
                    .into(),
            ))
        }
        "cpu" => return Ok(None),
        "emu" => KernelDevice::emulator(),
        _ => KernelDevice::gpu_if_available().ok_or_else(|| {
            advdmd::Error::Invalid(format!(
                "distill --device cuda: no usable CUDA GPU ({})",
                advdmd::device::probe_cuda()
            ))
        })?,
    };
    let keep = Checkpointing::keep(checkpoint_activations);
    Ok(Some((
        dev,
        advdmd::train::advdmd_device::DeviceRunOptions {
            keep,
            bf16_moments,
            graph,
        },
    )))
}

/// `e` from distilling `teacher` as a Shapes model, with a pointer to `--data` when `teacher`
/// is an SD3-family checkpoint instead.
pub fn shapes_teacher_hint(e: advdmd::error::Error, teacher: &Path) -> anyhow::Error {
    if teacher.join("shapes.json").exists() {
        return e.into();
    }
    match advdmd::mmdit::MmditCheckpoint::open(teacher) {
        Ok(c) => anyhow::anyhow!(
            "{} is an MMDiT checkpoint ({}), not a Shapes model folder: distil it with --data DIR \
             (its precomputed latents and prompt embeddings, written by tools/precompute.py) \
             and --device cuda",
            teacher.display(),
            c.config.family()
        ),
        Err(_) => e.into(),
    }
}

/// `advdmd sample --checkpoint CHECKPOINT --data DIR`: the first `count` prompts of `data`
/// (`--per-prompt` samples each) through an SD3-family checkpoint on the CPU or, with `device`
/// cuda or emu, the Euler loop on a kernel device, written as
/// `OUT/latents.safetensors` (`latents [n, C, H, W]`, the captions in its metadata as a data
/// shard's) and `OUT/manifest.jsonl`; `tools/decode.py` decodes them with the VAE.
pub fn sample_checkpoint(
    checkpoint: &Path,
    data: &Path,
    count: usize,
    device: &str,
    opts: &SampleOptions,
    out: &Path,
) -> anyhow::Result<()> {
    use advdmd::data::latents::LatentData;
    use advdmd::device::kernel::KernelDevice;
    use advdmd::train::checkpoint_sample::{
        sample_checkpoint_latents, sample_checkpoint_latents_device, write_latent_samples,
        SampleDefaults,
    };
    let sampler = Sampler::parse(&opts.sampler).expect("clap checked the sampler");
    let dev = match device {
        "cpu" => None,
        "emu" => Some(KernelDevice::emulator()),
        _ => Some(KernelDevice::gpu_if_available().ok_or_else(|| {
            anyhow::anyhow!(
                "sample --device cuda: no usable CUDA GPU ({})",
                advdmd::device::probe_cuda()
            )
        })?),
    };
    let ckpt = advdmd::mmdit::MmditCheckpoint::open(checkpoint)?;
    let data = LatentData::open(data)?;
    data.check_model(&ckpt.config)?;
    let defaults = SampleDefaults::of(checkpoint)?;
    let steps = opts.steps.unwrap_or(defaults.steps);
    let cfg = opts.cfg.unwrap_or(defaults.cfg);
    let shift = opts.shift.unwrap_or(defaults.shift);
    if !(shift > 0.0 && shift.is_finite()) {
        bail!("--shift must be a positive number, got {shift}");
    }
    if steps == 0 || (defaults.few_step.is_some() && steps > 8) {
        bail!("--steps must be at least 1 (at most 8 on a distilled generator's schedule)");
    }
    if !cfg.is_finite() {
        bail!("--cfg must be a number, got {cfg}");
    }
    if count == 0 || count > data.len() {
        bail!(
            "--count must be 1 to the {} samples of {}",
            data.len(),
            data.dir().display()
        );
    }
    let indices: Vec<usize> = (0..count)
        .flat_map(|i| std::iter::repeat_n(i, opts.per_prompt.max(1)))
        .collect();
    if indices.len() > MAX_IMAGES {
        bail!(
            "{} samples asked (--count × --per-prompt); at most {MAX_IMAGES} a call",
            indices.len()
        );
    }
    let c = &ckpt.config;
    let [ch, h, w] = data.latent_shape;
    let tokens = (h / c.patch) * (w / c.patch) + data.context_shape[0];
    let rows = opts.batch.clamp(1, indices.len()) as u64 * if cfg != 1.0 { 2 } else { 1 };
    // a GPU holds the activations (and the bf16 model) itself
    let on_host = dev.as_ref().is_none_or(|d| d.is_emulator());
    let activations = c.activation_floor_bytes(rows, tokens as u64, false);
    // a device reads the model from the file one tensor at a time into its bf16 copy
    let model_bytes_per_param = match &dev {
        None => 4,
        Some(_) if on_host => 2,
        Some(_) => 0,
    };
    Footprint::new()
        .with(
            "the model (f32; bf16 on an emulated device)",
            product(&[c.param_count() as u64, model_bytes_per_param]),
        )
        .with(
            "the latents (f32)",
            product(&[indices.len() as u64, (ch * h * w) as u64, 4]),
        )
        .with("activations", if on_host { activations } else { 0 })
        .check("sample")?;
    advdmd::checkpoint::create_out_dir(out)?;
    let sigmas = defaults.schedule(steps, shift);
    let bar = progress_bar((indices.len() * steps) as u64, "sample");
    let start = std::time::Instant::now();
    let progress = |n: usize| bar.inc(n as u64);
    let latents = match &dev {
        None => {
            let model = advdmd::mmdit::Mmdit::new(c.clone(), ckpt.load_params()?);
            sample_checkpoint_latents(
                &model, &data, &indices, &sigmas, cfg, sampler, opts.seed, opts.batch, progress,
            )?
        }
        Some(dev) => {
            let on_device =
                advdmd::mmdit::device::DeviceMmdit::frozen_from(dev, c, &ckpt.finite())?;
            sample_checkpoint_latents_device(
                &on_device, &data, &indices, &sigmas, cfg, sampler, opts.seed, opts.batch, progress,
            )?
        }
    };
    bar.finish();
    let fields = serde_json::json!({
        "model": checkpoint.display().to_string(), "steps": steps, "sampler": sampler.name(),
        "shift": shift, "cfg": cfg, "device": device,
    });
    write_latent_samples(out, latents, &data, &indices, opts.seed, &fields)?;
    eprintln!(
        "{} latents, {steps} steps, cfg {cfg}, {} in {:.1} s → {} (images: tools/decode.py)",
        indices.len(),
        sampler.name(),
        start.elapsed().as_secs_f64(),
        out.join("latents.safetensors").display()
    );
    Ok(())
}

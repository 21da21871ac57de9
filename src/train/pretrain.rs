//! `advdmd pretrain`: the Shapes teacher, trained by flow matching in pixel space.
//!
//! Each step draws a batch of scenes, drops 10% of the prompts (the empty prompt is CFG's
//! unconditional input), draws σ from a logit-normal, noises `x_σ = (1−σ)·x0 + σ·ε` and regresses
//! the velocity `ε − x0`; the text encoder trains with the MMDiT. AdamW with warm-up and cosine
//! decay, gradient clipping, an EMA of the weights. Every `checkpoint_every` steps the whole state
//! (weights, EMA, optimizer moments, RNG, step) goes atomically to `OUT/checkpoint.safetensors`,
//! and `--resume` continues the exact run; metrics go to `OUT/metrics.jsonl`, one line per step.
//! At the end the EMA model is written to `OUT/model/`.

use super::shapes_model::{ShapesModel, ShapesModelSize, CHANNELS, RESOLUTION};
use super::state::{rng_from_json, rng_to_json, save_state, StateFile};
use crate::autograd::Var;
use crate::data::shapes::{sample_batch, vocabulary};
use crate::device::host_memory::{product, Footprint};
use crate::error::{Error, Result};
use crate::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig, Ema};
use crate::tensor::{Rng, Tensor};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug, PartialEq)]
pub struct PretrainConfig {
    pub steps: u64,
    pub batch: usize,
    pub lr: f32,
    pub warmup: u64,
    /// The learning rate decays (cosine) to `lr·final_lr_fraction`.
    pub final_lr_fraction: f32,
    pub weight_decay: f32,
    pub ema_decay: f32,
    pub grad_clip: f32,
    pub prompt_dropout: f32,
    pub seed: u64,
    pub checkpoint_every: u64,
    pub size: ShapesModelSize,
}

impl PretrainConfig {
    /// The least host memory a run allocates: the MMDiT's f32 weights five times over (weights,
    /// gradients, AdamW's two moments, the EMA) and a batch's activations.
    pub fn footprint(&self) -> Footprint {
        let mmdit = self.size.mmdit_config();
        let copies = product(&[mmdit.min_param_count(), 4, 5]);
        let tokens = self.size.tokens_per_sample() as u64;
        Footprint::new()
            .with("f32 weights, gradients, AdamW moments and EMA", copies)
            .with(
                "activations",
                mmdit.activation_floor_bytes(self.batch as u64, tokens, true),
            )
    }

    /// An error naming the first setting out of its range (each named as its `pretrain` flag).
    pub fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Invalid(what));
        if self.batch == 0 || self.checkpoint_every == 0 {
            return bad("--batch and --checkpoint-every must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("--lr must be a positive number, got {}", self.lr));
        }
        if !(0.0..=1.0).contains(&self.ema_decay) {
            return bad(format!(
                "--ema-decay must be in [0, 1], got {}",
                self.ema_decay
            ));
        }
        let rest = [
            self.final_lr_fraction,
            self.weight_decay,
            self.grad_clip,
            self.prompt_dropout,
        ];
        if rest.iter().any(|v| !(*v >= 0.0 && v.is_finite())) || self.prompt_dropout > 1.0 {
            return bad(format!(
                "final lr fraction, weight decay, grad clip, prompt dropout out of range: {rest:?}"
            ));
        }
        self.size.check()
    }
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            steps: 17000,
            batch: 64,
            lr: 1e-3,
            warmup: 300,
            final_lr_fraction: 0.05,
            weight_decay: 0.0,
            ema_decay: 0.999,
            grad_clip: 1.0,
            prompt_dropout: 0.1,
            seed: 0,
            checkpoint_every: 250,
            size: ShapesModelSize::default(),
        }
    }
}

impl PretrainConfig {
    /// The configuration as the model folder records it (`shapes.json`, `training.pretrain`).
    pub fn to_json(&self) -> serde_json::Value {
        let s = &self.size;
        serde_json::json!({
            "steps": self.steps, "batch": self.batch, "lr": self.lr, "warmup": self.warmup,
            "final_lr_fraction": self.final_lr_fraction, "weight_decay": self.weight_decay,
            "ema_decay": self.ema_decay, "grad_clip": self.grad_clip,
            "prompt_dropout": self.prompt_dropout, "seed": self.seed,
            "hidden": s.hidden, "depth": s.depth, "head_dim": s.head_dim,
            "text_dim": s.text_dim, "text_layers": s.text_layers, "text_heads": s.text_heads,
        })
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub seconds: f64,
}

/// Everything a run carries from step to step.
pub struct PretrainState {
    pub model: ShapesModel,
    pub opt: AdamW,
    pub ema_mmdit: Ema,
    pub ema_text: Ema,
    pub rng: Rng,
    pub step: u64,
}

impl PretrainState {
    pub fn new(config: &PretrainConfig) -> Result<PretrainState> {
        let mut rng = Rng::new(config.seed);
        let words = vocabulary();
        let model = ShapesModel::init(&config.size, &words, &mut rng)?;
        let ema_mmdit = Ema::new(&model.mmdit.params, config.ema_decay);
        let ema_text = Ema::new(&model.text.params, config.ema_decay);
        let opt = AdamW::new(AdamWConfig {
            lr: config.lr,
            weight_decay: config.weight_decay,
            ..Default::default()
        });
        Ok(PretrainState {
            model,
            opt,
            ema_mmdit,
            ema_text,
            rng,
            step: 0,
        })
    }

    /// One optimisation step.
    pub fn train_step(&mut self, config: &PretrainConfig) -> Result<StepMetrics> {
        let start = Instant::now();
        let b = config.batch;
        let (mut prompts, x0) = sample_batch(b, &mut self.rng);
        for p in prompts.iter_mut() {
            if self.rng.uniform() < config.prompt_dropout {
                p.clear();
            }
        }
        let ids = self.model.tokenizer.encode_batch(&prompts)?;
        // σ ~ logit-normal(0, 1).
        let sigma: Vec<f32> = (0..b)
            .map(|_| crate::kernels::elementwise::sigmoid(self.rng.normal()))
            .collect();
        let per = CHANNELS * RESOLUTION * RESOLUTION;
        let eps: Vec<f32> = (0..b * per).map(|_| self.rng.normal()).collect();
        let x0v = x0.f32s();
        let mut xt = vec![0f32; b * per];
        let mut target = vec![0f32; b * per];
        for i in 0..b * per {
            let s = sigma[i / per];
            xt[i] = (1.0 - s) * x0v[i] + s * eps[i];
            target[i] = eps[i] - x0v[i];
        }
        let shape = [b, CHANNELS, RESOLUTION, RESOLUTION];
        let v = self
            .model
            .velocity(&Var::constant(Tensor::from_vec(xt, &shape)), &sigma, &ids);
        let loss = v.mse(&Var::constant(Tensor::from_vec(target, &shape)));
        let maps = [&self.model.mmdit.params, &self.model.text.params];
        for m in maps {
            m.zero_grad();
        }
        loss.backward();
        let grad_norm = clip_grad_norm(&maps, config.grad_clip);
        let lr = lr_at(
            self.step,
            config.lr,
            config.warmup,
            config.steps,
            config.final_lr_fraction,
        );
        self.opt.step(&maps, lr);
        self.ema_mmdit.update(&self.model.mmdit.params);
        self.ema_text.update(&self.model.text.params);
        self.step += 1;
        Ok(StepMetrics {
            step: self.step,
            loss: loss.value().item(),
            lr,
            grad_norm,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// The whole state as one safetensors file (written atomically).
    pub fn save(&self, path: &Path, config: &PretrainConfig) -> Result<()> {
        let meta = serde_json::json!({
            "kind": "pretrain",
            "step": self.step,
            "rng": rng_to_json(&self.rng),
            // As a string: f32 fields do not survive a JSON number round trip exactly.
            "config": config.to_json().to_string(),
        });
        save_state(
            path,
            &[
                ("mmdit.", &self.model.mmdit.params),
                ("text.", &self.model.text.params),
                ("ema.mmdit.", &self.ema_mmdit.shadow),
                ("ema.text.", &self.ema_text.shadow),
            ],
            &[("adam.", &self.opt)],
            meta,
        )
    }

    /// Restores a state saved by [`PretrainState::save`] under the same configuration.
    pub fn load(path: &Path, config: &PretrainConfig) -> Result<PretrainState> {
        let f = StateFile::open(path)?;
        let bad = |why: String| Error::Invalid(format!("{}: {why}", path.display()));
        let meta = f.meta();
        if meta["kind"] != "pretrain" {
            return Err(bad("not a pretraining checkpoint".into()));
        }
        let now = config.to_json().to_string();
        if meta["config"].as_str() != Some(now.as_str()) {
            return Err(bad(format!(
                "was written with another configuration: {} (now {now})",
                meta["config"]
            )));
        }
        let mut st = PretrainState::new(config)?;
        f.load_group("mmdit.", &st.model.mmdit.params)?;
        f.load_group("text.", &st.model.text.params)?;
        f.load_group("ema.mmdit.", &st.ema_mmdit.shadow)?;
        f.load_group("ema.text.", &st.ema_text.shadow)?;
        let trained = [&st.model.mmdit.params, &st.model.text.params];
        f.load_optimizer("adam.", &mut st.opt, &trained)?;
        st.step = meta["step"]
            .as_u64()
            .ok_or_else(|| bad("bad `step`".into()))?;
        st.rng = rng_from_json(&meta["rng"]).ok_or_else(|| bad("bad `rng` state".into()))?;
        Ok(st)
    }
}

/// Paths of a run folder.
pub struct RunDir {
    pub checkpoint: PathBuf,
    pub metrics: PathBuf,
    pub model: PathBuf,
}

impl RunDir {
    pub fn new(out: &Path) -> RunDir {
        RunDir {
            checkpoint: out.join("checkpoint.safetensors"),
            metrics: out.join("metrics.jsonl"),
            model: out.join("model"),
        }
    }
}

/// Keeps the first `steps` lines of a metrics file (a resumed run rewrites what came after its
/// checkpoint).
fn truncate_metrics(path: &Path, steps: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .take(steps as usize)
        .map(|l| format!("{l}\n"))
        .collect();
    crate::checkpoint::write_atomic(path, kept.as_bytes())
}

/// Runs (or resumes) pretraining into `out`; `on_step` sees every step's metrics (progress bar).
pub fn pretrain(
    config: &PretrainConfig,
    out: &Path,
    resume: bool,
    mut on_step: impl FnMut(&StepMetrics),
) -> Result<PretrainState> {
    config.check()?;
    config.footprint().check("pretrain")?;
    crate::checkpoint::create_out_dir(out)?;
    let run = RunDir::new(out);
    let mut state = if resume && run.checkpoint.exists() {
        let st = PretrainState::load(&run.checkpoint, config)?;
        truncate_metrics(&run.metrics, st.step)?;
        st
    } else {
        if resume {
            return Err(Error::Invalid(format!(
                "--resume: no checkpoint at {}",
                run.checkpoint.display()
            )));
        }
        let _ = std::fs::remove_file(&run.metrics);
        PretrainState::new(config)?
    };
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&run.metrics)
        .map_err(|e| Error::io(&run.metrics, e))?;
    while state.step < config.steps {
        let m = state.train_step(config)?;
        if !m.loss.is_finite() {
            return Err(Error::Invalid(format!(
                "loss became {} at step {}",
                m.loss, m.step
            )));
        }
        let line = serde_json::json!({
            "step": m.step, "loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm, "seconds": m.seconds,
        });
        writeln!(metrics, "{line}").map_err(|e| Error::io(&run.metrics, e))?;
        on_step(&m);
        if state.step % config.checkpoint_every == 0 || state.step == config.steps {
            metrics.flush().map_err(|e| Error::io(&run.metrics, e))?;
            state.save(&run.checkpoint, config)?;
        }
    }
    let extra = serde_json::json!({ "pretrain": config.to_json(), "steps_done": state.step, "weights": "ema" });
    state.model.save(
        &run.model,
        &state.ema_mmdit.shadow,
        &state.ema_text.shadow,
        extra,
    )?;
    Ok(state)
}

/// Writes the EMA model of the run's last checkpoint to `OUT/model-step{N}/` (to look at a run
/// while it trains). Returns the folder.
pub fn export_checkpoint(config: &PretrainConfig, out: &Path) -> Result<PathBuf> {
    let run = RunDir::new(out);
    let state = PretrainState::load(&run.checkpoint, config)?;
    let dir = out.join(format!("model-step{}", state.step));
    let extra = serde_json::json!({ "pretrain": config.to_json(), "steps_done": state.step, "weights": "ema" });
    state
        .model
        .save(&dir, &state.ema_mmdit.shadow, &state.ema_text.shadow, extra)?;
    Ok(dir)
}

//! The Shapes text-to-image model: tokenizer + text encoder + pixel-space MMDiT, with its folder
//! format and its sampler.
//!
//! A model folder holds `transformer/` (the MMDiT in the diffusers layout), `text_encoder/`
//! (`model.safetensors`), `tokenizer.json` and `shapes.json` (the text encoder's head count and
//! length, the sampling shift, how it was trained).

use crate::autograd::{no_grad, Var};
use crate::checkpoint::{save_safetensors, write_atomic, SafetensorsFile};
use crate::error::{Error, Result};
use crate::flow::reference_sigmas;
use crate::flow::sample::{sample_flow, sample_seeds};
use crate::mmdit::checkpoint::{save_mmdit, Layout, MmditCheckpoint};
use crate::mmdit::init::init_params;
use crate::mmdit::{Mmdit, MmditConfig, MmditInputs};
use crate::nn::ParamMap;
use crate::tensor::{Rng, StoredDType, Tensor};
use crate::text::{PromptTokenizer, TextEncoder, TextEncoderConfig};
use std::path::Path;

/// Canvas side and channels of the Shapes world.
pub const RESOLUTION: usize = 16;
pub const CHANNELS: usize = 3;
/// Tokens per prompt: `[CLS]` + up to 9 words (the longest template has 8).
pub const MAX_TOKENS: usize = 10;

/// Sizes of a fresh Shapes model.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapesModelSize {
    pub hidden: usize,
    pub depth: usize,
    pub head_dim: usize,
    pub text_dim: usize,
    pub text_layers: usize,
    pub text_heads: usize,
}

impl ShapesModelSize {
    /// An error naming the first size the model cannot take: at least one block, a hidden size a
    /// positive multiple of the head size, text heads that divide the text width.
    pub fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Invalid(what));
        if self.depth == 0 || self.text_layers == 0 {
            return bad("the model needs at least one block (--depth)".into());
        }
        if self.head_dim == 0 || self.hidden == 0 || self.hidden % self.head_dim != 0 {
            return bad(format!(
                "--hidden must be a positive multiple of the head size {}, got {}",
                self.head_dim, self.hidden
            ));
        }
        if self.text_heads == 0 || self.text_dim == 0 || self.text_dim % self.text_heads != 0 {
            return bad(format!(
                "the text width {} must be a positive multiple of its {} heads",
                self.text_dim, self.text_heads
            ));
        }
        Ok(())
    }

    /// The MMDiT of a Shapes model of this size (pixel space, patch 2, QK norm).
    pub fn mmdit_config(&self) -> MmditConfig {
        MmditConfig {
            depth: self.depth,
            hidden: self.hidden,
            heads: self.hidden / self.head_dim,
            head_dim: self.head_dim,
            patch: 2,
            in_channels: CHANNELS,
            out_channels: CHANNELS,
            pos_embed_max_size: RESOLUTION / 2,
            context_dim: self.text_dim,
            pooled_dim: self.text_dim,
            freq_dim: 256,
            mlp_hidden: 4 * self.hidden,
            qk_norm: true,
            dual_attention_blocks: Vec::new(),
        }
    }

    /// Tokens of one sample, both streams: the image's patches and the prompt's positions.
    pub fn tokens_per_sample(&self) -> usize {
        (RESOLUTION / self.mmdit_config().patch).pow(2) + MAX_TOKENS
    }
}

impl Default for ShapesModelSize {
    fn default() -> Self {
        ShapesModelSize {
            hidden: 128,
            depth: 4,
            head_dim: 64,
            text_dim: 128,
            text_layers: 2,
            text_heads: 2,
        }
    }
}

pub struct ShapesModel {
    pub tokenizer: PromptTokenizer,
    pub text: TextEncoder,
    pub mmdit: Mmdit,
    /// The sigma-schedule shift used for sampling.
    pub sample_shift: f64,
    /// `Some(K)` for a distilled few-step generator: it samples on the K-step schedule of
    /// ALGORITHM.md §3.3 (no CFG) instead of the teacher's reference schedule.
    pub few_step: Option<usize>,
}

impl ShapesModel {
    /// Tokens of one sample, both streams: the image's patches and the prompt's positions.
    pub fn tokens_per_sample(&self) -> usize {
        (RESOLUTION / self.mmdit.config.patch).pow(2) + self.text.config.max_len
    }

    pub fn init(size: &ShapesModelSize, words: &[&str], rng: &mut Rng) -> Result<ShapesModel> {
        let tokenizer = PromptTokenizer::new(words, MAX_TOKENS)?;
        let text = TextEncoder::init(
            TextEncoderConfig {
                vocab: tokenizer.vocab_size(),
                max_len: MAX_TOKENS,
                dim: size.text_dim,
                layers: size.text_layers,
                heads: size.text_heads,
            },
            rng,
        );
        let config = size.mmdit_config();
        let params = init_params(&config, rng);
        Ok(ShapesModel {
            tokenizer,
            text,
            mmdit: Mmdit::new(config, params),
            sample_shift: 1.0,
            few_step: None,
        })
    }

    /// A model with its own copy of the MMDiT weights (initialised from these) that shares this
    /// model's tokenizer and text encoder: how the generator and the fake score start from the
    /// teacher (ALGORITHM.md §2).
    pub fn copy_transformer(&self) -> ShapesModel {
        let params = self.mmdit.params.duplicate();
        params.set_trainable(true);
        params.param("pos_embed").set_trainable(false);
        ShapesModel {
            tokenizer: self.tokenizer.clone(),
            text: self.text.clone(),
            mmdit: Mmdit::new(self.mmdit.config.clone(), params),
            sample_shift: self.sample_shift,
            few_step: self.few_step,
        }
    }

    /// The sampling schedule of `steps` steps (n + 1 sigmas ending in 0).
    pub fn schedule(&self, steps: usize) -> Vec<f32> {
        match self.few_step {
            Some(_) => crate::train::rollout::few_step_sigmas(steps, self.sample_shift),
            None => reference_sigmas(steps, self.sample_shift),
        }
    }

    /// Default steps and CFG weight: the K-step schedule without CFG for a distilled generator,
    /// 40 steps with CFG 1.5 for a teacher (the best of {1.5, 2, 3, 4, 6}, assets/README.md).
    pub fn default_steps_and_cfg(&self) -> (usize, f32) {
        match self.few_step {
            Some(k) => (k, 1.0),
            None => (40, 1.5),
        }
    }

    /// The velocity for noisy images `x [B, 3, 16, 16]` at `sigma`, given token ids `[B, L]`.
    pub fn velocity(&self, x: &Var, sigma: &[f32], ids: &[u32]) -> Var {
        let (context, pooled) = self.text.forward(ids);
        let t: Vec<f32> = sigma.iter().map(|&s| crate::flow::timestep_of(s)).collect();
        self.mmdit.forward(&MmditInputs {
            x,
            timestep: &t,
            pooled: &pooled,
            context: &context,
        })
    }

    /// Writes the model folder (see the module comment) with the given weights.
    pub fn save(
        &self,
        dir: &Path,
        mmdit: &ParamMap,
        text: &ParamMap,
        extra: serde_json::Value,
    ) -> Result<()> {
        std::fs::create_dir_all(dir.join("text_encoder")).map_err(|e| Error::io(dir, e))?;
        save_mmdit(
            mmdit,
            &self.mmdit.config,
            Layout::Diffusers,
            &dir.join("transformer"),
            StoredDType::F32,
        )?;
        save_safetensors(
            dir.join("text_encoder/model.safetensors"),
            &text.tensors(),
            None,
        )?;
        self.tokenizer.save(&dir.join("tokenizer.json"))?;
        let meta = serde_json::json!({
            "text_heads": self.text.config.heads,
            "max_tokens": self.text.config.max_len,
            "sample_shift": self.sample_shift,
            "few_step": self.few_step,
            "resolution": RESOLUTION,
            "training": extra,
        });
        write_atomic(
            &dir.join("shapes.json"),
            serde_json::to_string_pretty(&meta)
                .expect("json")
                .as_bytes(),
        )
    }

    pub fn load(dir: &Path) -> Result<ShapesModel> {
        let meta_path = dir.join("shapes.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
        let meta: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: {e}", meta_path.display())))?;
        let field = |k: &str| {
            meta[k].as_u64().map(|v| v as usize).ok_or_else(|| {
                Error::Invalid(format!("{}: missing number `{k}`", meta_path.display()))
            })
        };
        let (heads, max_tokens) = (field("text_heads")?, field("max_tokens")?);
        let tokenizer = PromptTokenizer::load(&dir.join("tokenizer.json"), max_tokens)?;
        let te_path = dir.join("text_encoder/model.safetensors");
        let f = SafetensorsFile::open(&te_path)?;
        let mut tparams = ParamMap::new();
        for n in f.names() {
            tparams.insert(n.clone(), f.load_f32(&n, None)?);
        }
        let tconfig = TextEncoderConfig::detect(&tparams, heads)
            .map_err(|e| Error::Invalid(format!("{}: {e}", te_path.display())))?;
        if tconfig.max_len != max_tokens {
            return Err(Error::Invalid(format!(
                "{}: `max_tokens` {max_tokens} is not the text encoder's {} positions",
                meta_path.display(),
                tconfig.max_len
            )));
        }
        let sample_shift = meta["sample_shift"].as_f64().unwrap_or(1.0);
        let few_step = meta["few_step"].as_u64().map(|k| k as usize);
        if sample_shift.is_nan() || sample_shift <= 0.0 || few_step == Some(0) {
            return Err(Error::Invalid(format!(
                "{}: `sample_shift` must be positive and `few_step` at least 1",
                meta_path.display()
            )));
        }
        let ckpt = MmditCheckpoint::open(dir.join("transformer"))?;
        let mmdit = Mmdit::new(ckpt.config.clone(), ckpt.load_params()?);
        Ok(ShapesModel {
            tokenizer,
            text: TextEncoder {
                config: tconfig,
                params: tparams,
            },
            mmdit,
            sample_shift,
            few_step,
        })
    }
}

pub use crate::flow::sample::Sampler;

/// Samples one image per prompt: `steps` steps of the shifted reference schedule with CFG weight
/// `w` (unconditional = empty prompt; `w = 1` skips it). Sample `i` draws its noise from
/// `seed + i`, so results do not depend on batching. Returns `[N, 3, 16, 16]` in [−1, 1] (unclamped).
#[allow(clippy::too_many_arguments)]
pub fn sample_images(
    model: &ShapesModel,
    prompts: &[String],
    steps: usize,
    w: f32,
    sampler: Sampler,
    seed: u64,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Tensor> {
    let _ng = no_grad();
    let per = CHANNELS * RESOLUTION * RESOLUTION;
    let sigmas = model.schedule(steps);
    let mut out = Vec::with_capacity(prompts.len() * per);
    let empty = model.tokenizer.encode("")?;
    let seeds = sample_seeds(seed, prompts.len());
    let b = batch.max(1);
    for (chunk, seeds) in prompts.chunks(b).zip(seeds.chunks(b)) {
        let n = chunk.len();
        let mut ids = model.tokenizer.encode_batch(chunk)?;
        if w != 1.0 {
            for _ in 0..n {
                ids.extend_from_slice(&empty);
            }
        }
        let velocity = |x: &Tensor, s: f32| {
            let rows = x.shape()[0];
            Ok(model
                .velocity(&Var::constant(x.clone()), &vec![s; rows], &ids)
                .value()
                .clone())
        };
        let shape = [CHANNELS, RESOLUTION, RESOLUTION];
        let x = sample_flow(seeds, &shape, &sigmas, w, sampler, velocity, &mut progress)?;
        out.extend_from_slice(x.f32s());
    }
    Ok(Tensor::from_vec(
        out,
        &[prompts.len(), CHANNELS, RESOLUTION, RESOLUTION],
    ))
}

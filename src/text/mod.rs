//! Text conditioning for the Shapes world: a word-level tokenizer over the closed vocabulary
//! (built with the `tokenizers` crate and saved as `tokenizer.json`), and a small transformer text
//! encoder that gives the MMDiT what SD3's encoders give it: a context sequence `[B, L, E]` and a
//! pooled vector `[B, E]` (the output at the leading `[CLS]` token). The empty prompt is the
//! unconditional input for CFG.

use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::nn::{linear_named, ParamMap};
use crate::ops::attention::joint_attention;
use crate::ops::linear::embedding;
use crate::ops::norm::layer_norm;
use crate::tensor::{Rng, Tensor};
use std::path::Path;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::Tokenizer;

pub const PAD: &str = "[PAD]";
pub const UNK: &str = "[UNK]";
pub const CLS: &str = "[CLS]";

/// Word-level tokenizer: `[CLS]` + one id per word + `[PAD]` up to a fixed length.
#[derive(Clone)]
pub struct PromptTokenizer {
    inner: Tokenizer,
    pub max_len: usize,
    pad_id: u32,
    cls_id: u32,
}

impl PromptTokenizer {
    /// A tokenizer over `words` (ids 0..3 are `[PAD]`, `[UNK]`, `[CLS]`).
    pub fn new(words: &[&str], max_len: usize) -> Result<PromptTokenizer> {
        let vocab: Vec<(String, u32)> = [PAD, UNK, CLS]
            .iter()
            .chain(words)
            .enumerate()
            .map(|(i, w)| (w.to_string(), i as u32))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token(UNK.to_string())
            .build()
            .map_err(|e| Error::Invalid(format!("tokenizer: {e}")))?;
        let mut inner = Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(WhitespaceSplit));
        PromptTokenizer::wrap(inner, max_len)
    }

    fn wrap(inner: Tokenizer, max_len: usize) -> Result<PromptTokenizer> {
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| Error::Invalid(format!("tokenizer has no `{t}` token")))
        };
        Ok(PromptTokenizer {
            pad_id: id(PAD)?,
            cls_id: id(CLS)?,
            inner,
            max_len,
        })
    }

    pub fn load(path: &Path, max_len: usize) -> Result<PromptTokenizer> {
        let inner = Tokenizer::from_file(path).map_err(|e| {
            Error::Invalid(format!("{}: not a tokenizer.json: {e}", path.display()))
        })?;
        PromptTokenizer::wrap(inner, max_len)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| Error::Invalid(format!("tokenizer: {e}")))?;
        crate::checkpoint::write_atomic(path, json.as_bytes())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids of one prompt: `[CLS]`, the words, then `[PAD]`s to `max_len`. Errors on unknown words
    /// or prompts longer than `max_len − 1` words.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| Error::Invalid(format!("prompt `{prompt}`: {e}")))?;
        let unk = self.inner.token_to_id(UNK);
        if let Some(pos) = enc.get_ids().iter().position(|&i| Some(i) == unk) {
            // the word as the prompt spells it (the token is `[UNK]`)
            let (a, b) = enc.get_offsets()[pos];
            let word = prompt.get(a..b).unwrap_or(&enc.get_tokens()[pos]);
            return Err(Error::Invalid(format!(
                "prompt `{prompt}`: unknown word `{word}` (the Shapes vocabulary is closed)"
            )));
        }
        if enc.get_ids().len() + 1 > self.max_len {
            return Err(Error::Invalid(format!(
                "prompt `{prompt}` has {} words; at most {} fit",
                enc.get_ids().len(),
                self.max_len.saturating_sub(1)
            )));
        }
        let mut ids = vec![self.cls_id];
        ids.extend_from_slice(enc.get_ids());
        ids.resize(self.max_len, self.pad_id);
        Ok(ids)
    }

    /// The words of an id sequence (without `[CLS]` and padding).
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .filter(|&&i| i != self.pad_id && i != self.cls_id)
            .filter_map(|&i| self.inner.id_to_token(i))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Ids of a batch, row-major `[B, max_len]`.
    pub fn encode_batch(&self, prompts: &[String]) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(prompts.len() * self.max_len);
        for p in prompts {
            out.extend(self.encode(p)?);
        }
        Ok(out)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextEncoderConfig {
    pub vocab: usize,
    pub max_len: usize,
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
}

impl TextEncoderConfig {
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let e = self.dim;
        let mut out = vec![
            ("token_embedding.weight".to_string(), vec![self.vocab, e]),
            (
                "position_embedding.weight".to_string(),
                vec![self.max_len, e],
            ),
        ];
        for i in 0..self.layers {
            for (name, shape) in [
                ("attn.qkv.weight", vec![3 * e, e]),
                ("attn.qkv.bias", vec![3 * e]),
                ("attn.proj.weight", vec![e, e]),
                ("attn.proj.bias", vec![e]),
                ("mlp.fc1.weight", vec![4 * e, e]),
                ("mlp.fc1.bias", vec![4 * e]),
                ("mlp.fc2.weight", vec![e, 4 * e]),
                ("mlp.fc2.bias", vec![e]),
            ] {
                out.push((format!("layers.{i}.{name}"), shape));
            }
        }
        out
    }

    /// Reads the configuration back from parameter shapes (`heads` is not in the shapes).
    pub fn detect(params: &ParamMap, heads: usize) -> Result<TextEncoderConfig> {
        let shape = |n: &str| {
            params
                .get(n)
                .map(|p| p.value().shape().to_vec())
                .ok_or_else(|| Error::Invalid(format!("text encoder: missing `{n}`")))
        };
        let tok = shape("token_embedding.weight")?;
        let pos = shape("position_embedding.weight")?;
        let layers = (0..)
            .take_while(|i| params.contains(&format!("layers.{i}.attn.qkv.weight")))
            .count();
        if tok.len() != 2 || pos.len() != 2 {
            return Err(Error::Invalid(
                "text encoder: the embeddings must be matrices".into(),
            ));
        }
        if heads == 0 || tok[1] % heads != 0 {
            return Err(Error::Invalid(format!(
                "text encoder: its width {} does not split into {heads} heads",
                tok[1]
            )));
        }
        let cfg = TextEncoderConfig {
            vocab: tok[0],
            max_len: pos[0],
            dim: tok[1],
            layers,
            heads,
        };
        for (n, s) in cfg.param_shapes() {
            if shape(&n)? != s {
                return Err(Error::Invalid(format!(
                    "text encoder: `{n}` has the wrong shape"
                )));
            }
        }
        Ok(cfg)
    }
}

/// Cloning shares the parameters (one text encoder serves teacher, generator and fake score).
#[derive(Clone)]
pub struct TextEncoder {
    pub config: TextEncoderConfig,
    pub params: ParamMap,
}

impl TextEncoder {
    /// Fresh weights: N(0, 0.02) embeddings, Xavier-uniform linears, zero biases.
    pub fn init(config: TextEncoderConfig, rng: &mut Rng) -> TextEncoder {
        let mut params = ParamMap::new();
        for (name, shape) in config.param_shapes() {
            let t = if name.ends_with("embedding.weight") {
                Tensor::randn(&shape, rng).map(|v| 0.02 * v)
            } else if name.ends_with(".bias") {
                Tensor::zeros(&shape)
            } else {
                let bound = (6.0 / (shape[0] + shape[1]) as f32).sqrt();
                Tensor::rand_uniform(&shape, -bound, bound, rng)
            };
            params.insert(name, t);
        }
        TextEncoder { config, params }
    }

    /// `ids` is `[B, max_len]` row-major; returns (context `[B, L, E]`, pooled `[B, E]`).
    pub fn forward(&self, ids: &[u32]) -> (Var, Var) {
        let c = &self.config;
        let (l, e) = (c.max_len, c.dim);
        assert_eq!(ids.len() % l, 0, "token ids must be [B, {l}]");
        let b = ids.len() / l;
        let pos = self
            .params
            .var("position_embedding.weight")
            .reshape(&[1, l, e]);
        let mut h = embedding(&self.params.var("token_embedding.weight"), ids, &[b, l]).add(&pos);
        let hd = e / c.heads;
        for i in 0..c.layers {
            let p = format!("layers.{i}");
            let qkv = linear_named(&self.params, &format!("{p}.attn.qkv"), &layer_norm(&h))
                .reshape(&[b, l, 3, c.heads, hd])
                .split(2, &[1, 1, 1]);
            let [q, k, v] = [0, 1, 2].map(|j| qkv[j].reshape(&[b, l, c.heads, hd]));
            let none = Var::constant(Tensor::zeros(&[b, 0, c.heads, hd]));
            let (_, o) = joint_attention(&none, &none, &none, &q, &k, &v);
            h = h.add(&linear_named(
                &self.params,
                &format!("{p}.attn.proj"),
                &o.reshape(&[b, l, e]),
            ));
            let m = linear_named(&self.params, &format!("{p}.mlp.fc1"), &layer_norm(&h)).gelu();
            h = h.add(&linear_named(&self.params, &format!("{p}.mlp.fc2"), &m));
        }
        let out = layer_norm(&h);
        let pooled = out.split(1, &[1, l - 1]).swap_remove(0).reshape(&[b, e]);
        (out, pooled)
    }
}

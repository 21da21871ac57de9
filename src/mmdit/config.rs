//! The MMDiT's configuration, detected from the weights' names and shapes (never hard-coded):
//! any depth, width, head size, patch, channel count and conditioning size, with or without QK
//! norm and MMDiT-X dual attention.

use crate::device::host_memory::product;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmditConfig {
    /// Joint blocks.
    pub depth: usize,
    /// Hidden size D.
    pub hidden: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub patch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Side of the square position-embedding grid (`pos_embed` is `[1, P², D]`).
    pub pos_embed_max_size: usize,
    pub context_dim: usize,
    pub pooled_dim: usize,
    /// Width of the sinusoidal timestep features (256 in SD3).
    pub freq_dim: usize,
    /// Hidden width of the MLPs (4·D in SD3).
    pub mlp_hidden: usize,
    /// Per-head RMSNorm on q and k (SD3.5).
    pub qk_norm: bool,
    /// Blocks whose x stream has the MMDiT-X second, image-only attention.
    pub dual_attention_blocks: Vec<usize>,
}

/// Names and shapes of a checkpoint's tensors in the original layout (no prefix).
pub type ShapeMap = BTreeMap<String, Vec<usize>>;

fn shape_of<'a>(shapes: &'a ShapeMap, path: &Path, key: &str) -> Result<&'a Vec<usize>> {
    shapes.get(key).ok_or_else(|| Error::MissingTensor {
        path: path.to_path_buf(),
        key: key.to_string(),
    })
}

fn bad(path: &Path, key: &str, why: String) -> Error {
    Error::Invalid(format!("{}: tensor `{key}`: {why}", path.display()))
}

impl MmditConfig {
    /// Detects the configuration from the tensor shapes (original names). `head_dim_hint`
    /// resolves the head size when the weights cannot (no QK norm): from a `config.json` or the
    /// file's metadata; otherwise SD3's 64 is assumed when it divides D.
    pub fn detect(shapes: &ShapeMap, path: &Path, head_dim_hint: Option<usize>) -> Result<Self> {
        let x_emb = shape_of(shapes, path, "x_embedder.proj.weight")?;
        let [hidden, in_channels, patch, patch2] = x_emb[..] else {
            return Err(bad(
                path,
                "x_embedder.proj.weight",
                format!("shape {x_emb:?} is not [D, C, p, p]"),
            ));
        };
        if patch != patch2 || patch == 0 || hidden == 0 {
            return Err(bad(
                path,
                "x_embedder.proj.weight",
                format!("shape {x_emb:?} is not [D, C, p, p]"),
            ));
        }
        let depth = (0..)
            .take_while(|i| {
                shapes.contains_key(&format!(
                    "joint_blocks.{i}.x_block.adaLN_modulation.1.weight"
                ))
            })
            .count();
        if depth == 0 {
            return Err(Error::MissingTensor {
                path: path.to_path_buf(),
                key: "joint_blocks.0.x_block.adaLN_modulation.1.weight".into(),
            });
        }
        let pe = shape_of(shapes, path, "pos_embed")?;
        let p = match pe[..] {
            [1, n, d] if d == hidden => (n as f64).sqrt().round() as usize,
            _ => {
                return Err(bad(
                    path,
                    "pos_embed",
                    format!("shape {pe:?} is not [1, P², {hidden}]"),
                ))
            }
        };
        if p * p != pe[1] {
            return Err(bad(
                path,
                "pos_embed",
                format!("{} rows is not a square grid", pe[1]),
            ));
        }
        let dim1 = |key: &str| -> Result<usize> {
            let s = shape_of(shapes, path, key)?;
            match s[..] {
                [_, i] => Ok(i),
                _ => Err(bad(path, key, format!("shape {s:?} is not a matrix"))),
            }
        };
        let dim0 = |key: &str| -> Result<usize> { Ok(shape_of(shapes, path, key)?[0]) };
        let context_dim = dim1("context_embedder.weight")?;
        let pooled_dim = dim1("y_embedder.mlp.0.weight")?;
        let freq_dim = dim1("t_embedder.mlp.0.weight")?;
        let mlp_hidden = dim0("joint_blocks.0.x_block.mlp.fc1.weight")?;
        let final_out = dim0("final_layer.linear.weight")?;
        if final_out % (patch * patch) != 0 {
            return Err(bad(
                path,
                "final_layer.linear.weight",
                format!(
                    "{final_out} outputs is not a multiple of patch² = {}",
                    patch * patch
                ),
            ));
        }
        let qk_norm = shapes.contains_key("joint_blocks.0.x_block.attn.ln_q.weight");
        let head_dim = if qk_norm {
            shape_of(shapes, path, "joint_blocks.0.x_block.attn.ln_q.weight")?[0]
        } else if let Some(h) = head_dim_hint {
            h
        } else if hidden % 64 == 0 {
            64
        } else {
            return Err(Error::Invalid(format!(
                "{}: cannot tell the head size (no QK norm weights, hidden {hidden} is not a multiple of 64); give it in config.json as attention_head_dim",
                path.display()
            )));
        };
        if head_dim == 0 || hidden % head_dim != 0 {
            return Err(Error::Invalid(format!(
                "{}: head size {head_dim} does not divide hidden size {hidden}",
                path.display()
            )));
        }
        let dual_attention_blocks = (0..depth)
            .filter(|i| shapes.contains_key(&format!("joint_blocks.{i}.x_block.attn2.qkv.weight")))
            .collect();
        let cfg = MmditConfig {
            depth,
            hidden,
            heads: hidden / head_dim,
            head_dim,
            patch,
            in_channels,
            out_channels: final_out / (patch * patch),
            pos_embed_max_size: p,
            context_dim,
            pooled_dim,
            freq_dim,
            mlp_hidden,
            qk_norm,
            dual_attention_blocks,
        };
        cfg.check_shapes(shapes, path)?;
        Ok(cfg)
    }

    /// Every parameter name with its shape, in the original layout.
    pub fn param_shapes(&self) -> ShapeMap {
        let d = self.hidden;
        let mut m = ShapeMap::new();
        let mut add = |k: String, s: &[usize]| {
            m.insert(k, s.to_vec());
        };
        add("pos_embed".into(), &[1, self.pos_embed_max_size.pow(2), d]);
        add(
            "x_embedder.proj.weight".into(),
            &[d, self.in_channels, self.patch, self.patch],
        );
        add("x_embedder.proj.bias".into(), &[d]);
        for (pre, input) in [
            ("t_embedder", self.freq_dim),
            ("y_embedder", self.pooled_dim),
        ] {
            add(format!("{pre}.mlp.0.weight"), &[d, input]);
            add(format!("{pre}.mlp.0.bias"), &[d]);
            add(format!("{pre}.mlp.2.weight"), &[d, d]);
            add(format!("{pre}.mlp.2.bias"), &[d]);
        }
        add("context_embedder.weight".into(), &[d, self.context_dim]);
        add("context_embedder.bias".into(), &[d]);
        for i in 0..self.depth {
            let last = i + 1 == self.depth;
            for stream in ["x_block", "context_block"] {
                let pre = format!("joint_blocks.{i}.{stream}");
                let pre_only = last && stream == "context_block";
                let dual = stream == "x_block" && self.dual_attention_blocks.contains(&i);
                let chunks = if pre_only {
                    2
                } else if dual {
                    9
                } else {
                    6
                };
                add(format!("{pre}.adaLN_modulation.1.weight"), &[chunks * d, d]);
                add(format!("{pre}.adaLN_modulation.1.bias"), &[chunks * d]);
                let attns: &[&str] = if dual { &["attn", "attn2"] } else { &["attn"] };
                for attn in attns {
                    add(format!("{pre}.{attn}.qkv.weight"), &[3 * d, d]);
                    add(format!("{pre}.{attn}.qkv.bias"), &[3 * d]);
                    if self.qk_norm {
                        add(format!("{pre}.{attn}.ln_q.weight"), &[self.head_dim]);
                        add(format!("{pre}.{attn}.ln_k.weight"), &[self.head_dim]);
                    }
                    if !pre_only {
                        add(format!("{pre}.{attn}.proj.weight"), &[d, d]);
                        add(format!("{pre}.{attn}.proj.bias"), &[d]);
                    }
                }
                if !pre_only {
                    add(format!("{pre}.mlp.fc1.weight"), &[self.mlp_hidden, d]);
                    add(format!("{pre}.mlp.fc1.bias"), &[self.mlp_hidden]);
                    add(format!("{pre}.mlp.fc2.weight"), &[d, self.mlp_hidden]);
                    add(format!("{pre}.mlp.fc2.bias"), &[d]);
                }
            }
        }
        let out = self.patch * self.patch * self.out_channels;
        add("final_layer.adaLN_modulation.1.weight".into(), &[2 * d, d]);
        add("final_layer.adaLN_modulation.1.bias".into(), &[2 * d]);
        add("final_layer.linear.weight".into(), &[out, d]);
        add("final_layer.linear.bias".into(), &[out]);
        m
    }

    /// Every expected tensor is present with its expected shape.
    fn check_shapes(&self, shapes: &ShapeMap, path: &Path) -> Result<()> {
        for (key, want) in self.param_shapes() {
            let found = shape_of(shapes, path, &key)?;
            if *found != want {
                return Err(Error::ShapeMismatch {
                    path: path.to_path_buf(),
                    key,
                    found: found.clone(),
                    expected: want,
                });
            }
        }
        Ok(())
    }

    pub fn param_count(&self) -> usize {
        self.param_shapes()
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }

    /// A lower bound on [`MmditConfig::param_count`] that allocates nothing and cannot overflow
    /// (it saturates): every block's image-stream attention and MLP matrices. A configuration
    /// made from flags may be far too large for the shape map `param_count` builds.
    pub fn min_param_count(&self) -> u64 {
        let (d, m) = (self.hidden as u64, self.mlp_hidden as u64);
        let block = product(&[4, d, d]).saturating_add(product(&[2, d, m]));
        product(&[self.depth as u64, block])
    }

    /// Host bytes a CPU call on `samples` sequences of `tokens` tokens (both streams) holds at
    /// the least: with a backward to come, every block's f32 input kept on the tape; without,
    /// one MLP's hidden activation.
    pub fn activation_floor_bytes(&self, samples: u64, tokens: u64, backward: bool) -> u64 {
        if backward {
            product(&[samples, tokens, self.hidden as u64, self.depth as u64, 4])
        } else {
            product(&[samples, tokens, self.mlp_hidden as u64, 4])
        }
    }

    /// A name for the published configurations, if this is one of them.
    pub fn family(&self) -> &'static str {
        match (
            self.depth,
            self.hidden,
            self.dual_attention_blocks.is_empty(),
            self.qk_norm,
        ) {
            (24, 1536, true, false) => "SD3-medium",
            (24, 1536, false, true) => "SD3.5-medium (MMDiT-X)",
            (38, 2432, true, true) => "SD3.5-large",
            _ => "custom MMDiT",
        }
    }
}

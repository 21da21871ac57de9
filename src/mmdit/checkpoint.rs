//! Opening MMDiT checkpoints in either layout, loading them tensor by tensor, and saving them in
//! either layout, streamed one tensor at a time and written atomically.
//!
//! Accepted inputs: an original single file (with or without the `model.diffusion_model.`
//! prefix; other prefixes such as text encoders or the VAE are skipped and reported in one note),
//! a diffusers `diffusion_pytorch_model.safetensors`, a sharded diffusers model through its
//! `.index.json`, or a folder holding any of these (also a pipeline folder's `transformer/`).

use super::config::{MmditConfig, ShapeMap};
use super::layout::{diffusers_to_original, original_to_diffusers, Part};
use crate::checkpoint::{write_atomic, write_safetensors, PendingTensor, SafetensorsFile};
use crate::error::{Error, Result};
use crate::kernels::shape::{concat, split};
use crate::nn::ParamMap;
pub use crate::nn::ParamSource;
use crate::tensor::{StoredDType, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The prefix of MMDiT keys in Stability's single-file checkpoints.
pub const ORIGINAL_PREFIX: &str = "model.diffusion_model.";
/// The diffusers weights file name.
pub const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
/// Metadata key recording the head size in files we write (the weights cannot tell it without
/// QK norm).
const HEAD_DIM_METADATA: &str = "advdmd.head_dim";
/// The latent side a model samples at by default (diffusers' `sample_size`), kept through our
/// exports and conversions: the weights do not hold it.
const SAMPLE_SIZE_METADATA: &str = "advdmd.sample_size";
/// `sample_size` where a checkpoint does not say (every SD3 release: 1024 px / the VAE's 8).
pub const DEFAULT_SAMPLE_SIZE: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Original,
    Diffusers,
}

impl Layout {
    pub fn parse(s: &str) -> Option<Layout> {
        match s {
            "original" => Some(Layout::Original),
            "diffusers" => Some(Layout::Diffusers),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Layout::Original => "original",
            Layout::Diffusers => "diffusers",
        }
    }
}

/// One stored tensor that makes up (part of) an original parameter.
#[derive(Clone, Debug)]
struct Source {
    file: usize,
    key: String,
    part: Part,
}

/// An opened checkpoint: files mapped, names resolved, config detected and every tensor's
/// presence, shape and dtype validated. No tensor data has been read yet.
pub struct MmditCheckpoint {
    pub path: PathBuf,
    pub layout: Layout,
    pub config: MmditConfig,
    /// Things worth one info line (skipped keys), for the caller to print.
    pub notes: Vec<String>,
    /// diffusers' `sample_size` (the default latent side), where the checkpoint says: a
    /// `config.json` beside diffusers weights, or our exports' metadata.
    pub sample_size: Option<usize>,
    files: Vec<SafetensorsFile>,
    sources: BTreeMap<String, Vec<Source>>,
}

fn not_mmdit(path: &Path) -> Error {
    Error::Invalid(format!(
        "{}: not an MMDiT checkpoint: no `x_embedder.proj.weight` (original layout) or `pos_embed.proj.weight` (diffusers layout) tensor",
        path.display()
    ))
}

/// Resolves a folder or file argument to the file(s) to read.
fn resolve(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        let index = path.join(format!("{DIFFUSERS_WEIGHTS}.index.json"));
        if index.is_file() {
            return resolve(&index);
        }
        let single = path.join(DIFFUSERS_WEIGHTS);
        if single.is_file() {
            return Ok(vec![single]);
        }
        let transformer = path.join("transformer");
        if transformer.is_dir() {
            return resolve(&transformer);
        }
        let files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        return match files.len() {
            1 => Ok(files),
            0 => Err(Error::Invalid(format!("{}: no .safetensors file in this folder", path.display()))),
            _ => Err(Error::Invalid(format!(
                "{}: several .safetensors files and no {DIFFUSERS_WEIGHTS}(.index.json); name the file",
                path.display()
            ))),
        };
    }
    if path.to_string_lossy().ends_with(".index.json") {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: not valid JSON: {e}", path.display())))?;
        let map = json["weight_map"]
            .as_object()
            .ok_or_else(|| Error::Invalid(format!("{}: no `weight_map` object", path.display())))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = Vec::new();
        for (key, f) in map {
            let f = f.as_str().ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: weight_map entry `{key}` is not a file name",
                    path.display()
                ))
            })?;
            let p = dir.join(f);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        files.sort();
        return Ok(files);
    }
    Ok(vec![path.to_path_buf()])
}

/// A size a diffusers `config.json` beside the weights gives (`attention_head_dim`,
/// `sample_size`), if any.
fn config_json_size(weights: &Path, key: &str) -> Option<usize> {
    let text = std::fs::read_to_string(weights.parent()?.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v[key].as_u64().and_then(|h| usize::try_from(h).ok())
}

/// A size our metadata `key` or else the diffusers `config.json` key gives, from the first file
/// that says.
fn stored_size(files: &[SafetensorsFile], metadata: &str, json: &str) -> Option<usize> {
    files.iter().find_map(|f| {
        f.user_metadata()
            .get(metadata)
            .and_then(|v| v.parse().ok())
            .or_else(|| config_json_size(f.path(), json))
    })
}

impl MmditCheckpoint {
    pub fn open(path: impl AsRef<Path>) -> Result<MmditCheckpoint> {
        let path = path.as_ref().to_path_buf();
        if !path.exists() {
            return Err(Error::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ));
        }
        let files: Vec<SafetensorsFile> = resolve(&path)?
            .iter()
            .map(SafetensorsFile::open)
            .collect::<Result<_>>()?;
        let keys: Vec<(usize, String)> = files
            .iter()
            .enumerate()
            .flat_map(|(i, f)| f.names().into_iter().map(move |k| (i, k)))
            .collect();
        let is_diffusers = keys.iter().any(|(_, k)| k == "pos_embed.proj.weight");
        let original_prefix = keys
            .iter()
            .filter_map(|(_, k)| k.strip_suffix("x_embedder.proj.weight"))
            .min_by_key(|p| (*p != ORIGINAL_PREFIX && !p.is_empty(), p.len()))
            .map(str::to_string);

        let mut sources: BTreeMap<String, Vec<Source>> = BTreeMap::new();
        let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
        let mut skip = |k: &str| {
            let top = k.split('.').next().unwrap_or(k).to_string();
            *skipped.entry(top).or_default() += 1;
        };
        let prefix = original_prefix.clone();
        let layout = if let Some(prefix) = original_prefix {
            for (file, k) in &keys {
                match k.strip_prefix(prefix.as_str()) {
                    Some(name) if !name.is_empty() => {
                        sources.entry(name.to_string()).or_default().push(Source {
                            file: *file,
                            key: k.clone(),
                            part: Part::Whole,
                        })
                    }
                    _ => skip(k),
                }
            }
            Layout::Original
        } else if is_diffusers {
            let depth = (0..)
                .take_while(|i| {
                    keys.iter()
                        .any(|(_, k)| *k == format!("transformer_blocks.{i}.norm1.linear.weight"))
                })
                .count();
            for (file, k) in &keys {
                match diffusers_to_original(k, depth) {
                    Some((name, part)) => sources.entry(name).or_default().push(Source {
                        file: *file,
                        key: k.clone(),
                        part,
                    }),
                    None => skip(k),
                }
            }
            for parts in sources.values_mut() {
                parts.sort_by_key(|s| match s.part {
                    Part::QkvChunk(c) => c,
                    _ => 0,
                });
            }
            Layout::Diffusers
        } else {
            return Err(not_mmdit(&path));
        };

        let mut notes = Vec::new();
        if !skipped.is_empty() {
            let list: Vec<String> = skipped
                .iter()
                .map(|(p, n)| format!("{p}.* ({n})"))
                .collect();
            notes.push(format!(
                "{}: skipped {} tensors that are not MMDiT weights: {}",
                path.display(),
                skipped.values().sum::<usize>(),
                list.join(", ")
            ));
        }

        let shapes = original_shapes(&files, &sources)?;
        let hint = stored_size(&files, HEAD_DIM_METADATA, "attention_head_dim");
        let sample_size =
            stored_size(&files, SAMPLE_SIZE_METADATA, "sample_size").filter(|&s| s > 0);
        let config = MmditConfig::detect(&shapes, &path, hint)
            .map_err(|e| name_stored_key(e, layout, prefix.as_deref(), &sources, &files))?;
        let ckpt = MmditCheckpoint {
            path,
            layout,
            config,
            notes,
            sample_size,
            files,
            sources,
        };
        // Every needed tensor has a readable dtype (checked now, before any data is read).
        for name in ckpt.config.param_shapes().keys() {
            for s in &ckpt.sources[name] {
                ckpt.files[s.file].stored_dtype(&s.key)?;
            }
        }
        Ok(ckpt)
    }

    /// Loads parameter `name` (original name) as f32, assembled from its stored parts, values as
    /// stored.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        self.load_checked(name, false)
    }

    /// [`Self::load`], with `finite`: an error naming the stored tensor when a part holds a NaN
    /// or an infinity.
    fn load_checked(&self, name: &str, finite: bool) -> Result<Tensor> {
        let parts = self.sources.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            key: name.to_string(),
        })?;
        let load = |s: &Source| -> Result<Tensor> {
            let file = &self.files[s.file];
            let t = file.load(&s.key)?.to_dtype(crate::DType::F32);
            if finite {
                crate::checkpoint::check_finite(file.path(), &s.key, &t)?;
            }
            Ok(t)
        };
        let t = match parts[0].part {
            Part::Whole => load(&parts[0])?,
            Part::SwappedHalves => swap_halves(&load(&parts[0])?),
            Part::QkvChunk(_) => {
                let ts: Vec<Tensor> = parts.iter().map(load).collect::<Result<_>>()?;
                concat(&ts.iter().collect::<Vec<_>>(), 0)
            }
        };
        Ok(t)
    }

    /// The parameters as a [`ParamSource`] that refuses a NaN or an infinity (naming the stored
    /// tensor), as [`Self::load_params`]: what a run that starts from this checkpoint streams.
    pub fn finite(&self) -> FiniteParams<'_> {
        FiniteParams(self)
    }

    /// Loads every parameter, one tensor at a time, refusing a NaN or an infinity in any.
    /// `pos_embed` is a fixed buffer: frozen.
    pub fn load_params(&self) -> Result<ParamMap> {
        let mut params = ParamMap::new();
        for name in self.config.param_shapes().keys() {
            let p = params.insert(name.clone(), self.load_checked(name, true)?);
            if name == "pos_embed" {
                p.set_trainable(false);
            }
        }
        Ok(params)
    }

    /// Count of stored tensors per dtype among the MMDiT's weights.
    pub fn stored_dtypes(&self) -> BTreeMap<&'static str, usize> {
        let mut out = BTreeMap::new();
        for name in self.config.param_shapes().keys() {
            for s in &self.sources[name] {
                if let Ok(d) = self.files[s.file].stored_dtype(&s.key) {
                    *out.entry(d.name()).or_default() += 1;
                }
            }
        }
        out
    }

    /// The most common stored dtype (what `convert` writes by default).
    pub fn main_dtype(&self) -> StoredDType {
        let counts = self.stored_dtypes();
        let name = counts
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(d, _)| *d)
            .unwrap_or("f32");
        StoredDType::parse(name).unwrap_or(StoredDType::F32)
    }
}

/// The original-name shape of every parameter found, assembling fused qkv from its parts.
fn original_shapes(
    files: &[SafetensorsFile],
    sources: &BTreeMap<String, Vec<Source>>,
) -> Result<ShapeMap> {
    let mut shapes = ShapeMap::new();
    for (name, parts) in sources {
        let first = &parts[0];
        let file = &files[first.file];
        let mut shape = file.shape(&first.key)?;
        if let Part::QkvChunk(_) = first.part {
            let path = file.path().to_path_buf();
            let depth = usize::MAX; // only the names of q, k and v are needed here
            let want = original_to_diffusers(name, depth).unwrap_or_default();
            for (c, (key, _)) in want.iter().enumerate() {
                let Some(s) = parts.iter().find(|s| s.part == Part::QkvChunk(c)) else {
                    return Err(Error::MissingTensor {
                        path,
                        key: key.clone(),
                    });
                };
                let sh = files[s.file].shape(&s.key)?;
                if sh != shape {
                    return Err(Error::ShapeMismatch {
                        path: files[s.file].path().to_path_buf(),
                        key: s.key.clone(),
                        found: sh,
                        expected: shape,
                    });
                }
            }
            shape[0] *= 3;
        } else if parts.len() > 1 {
            return Err(Error::Invalid(format!(
                "{}: tensor `{}` is stored more than once",
                file.path().display(),
                first.key
            )));
        }
        shapes.insert(name.clone(), shape);
    }
    Ok(shapes)
}

/// Rewrites an error about an original parameter name into one about the key as stored in the
/// input (with its prefix, or its diffusers name) and the file that holds it.
fn name_stored_key(
    e: Error,
    layout: Layout,
    prefix: Option<&str>,
    sources: &BTreeMap<String, Vec<Source>>,
    files: &[SafetensorsFile],
) -> Error {
    let stored = |name: &str| -> (Option<PathBuf>, String) {
        if let Some(s) = sources.get(name).and_then(|v| v.first()) {
            return (Some(files[s.file].path().to_path_buf()), s.key.clone());
        }
        let key = match layout {
            Layout::Original => format!("{}{name}", prefix.unwrap_or("")),
            Layout::Diffusers => original_to_diffusers(name, usize::MAX)
                .and_then(|v| v.into_iter().next())
                .map(|(k, _)| k)
                .unwrap_or_else(|| name.to_string()),
        };
        (None, key)
    };
    match e {
        Error::MissingTensor { path, key } => {
            let (_, key) = stored(&key);
            Error::MissingTensor { path, key }
        }
        Error::ShapeMismatch {
            path,
            key,
            found,
            expected,
        } => {
            let (file, key) = stored(&key);
            Error::ShapeMismatch {
                path: file.unwrap_or(path),
                key,
                found,
                expected,
            }
        }
        other => other,
    }
}

/// Exchanges the two halves along dim 0 ((shift, scale) ↔ (scale, shift)).
pub fn swap_halves(t: &Tensor) -> Tensor {
    let n = t.shape()[0];
    let halves = split(t, 0, &[n / 2, n - n / 2]);
    concat(&[&halves[1], &halves[0]], 0)
}

/// The diffusers tensor that `part` of original parameter `t` becomes.
pub fn diffusers_part(t: &Tensor, part: &Part) -> Tensor {
    match part {
        Part::Whole => t.clone(),
        Part::SwappedHalves => swap_halves(t),
        Part::QkvChunk(c) => {
            let rows = t.shape()[0] / 3;
            split(t, 0, &[rows; 3]).swap_remove(*c)
        }
    }
}

/// [`MmditCheckpoint::finite`].
pub struct FiniteParams<'a>(&'a MmditCheckpoint);

impl ParamSource for FiniteParams<'_> {
    fn param(&self, name: &str) -> Result<Tensor> {
        self.0.load_checked(name, true)
    }
}

impl ParamSource for MmditCheckpoint {
    /// The values as stored (a conversion copies them, NaN or not).
    fn param(&self, name: &str) -> Result<Tensor> {
        self.load(name)
    }
}

/// Writes an MMDiT in `layout`: the original layout as one file `out` (keys prefixed with
/// `model.diffusion_model.`), the diffusers layout as a folder `out` holding
/// `diffusion_pytorch_model.safetensors` and a `config.json` diffusers accepts. Tensors are
/// streamed from `source` one at a time and converted to `dtype`; every file is written atomically.
pub fn save_mmdit(
    source: &dyn ParamSource,
    config: &MmditConfig,
    layout: Layout,
    out: &Path,
    dtype: StoredDType,
) -> Result<()> {
    save_mmdit_sized(source, config, None, layout, out, dtype)
}

/// [`save_mmdit`] of a model whose default latent side is known (`sample_size`: a teacher's, a
/// converted checkpoint's), kept in the metadata and the diffusers `config.json`.
pub fn save_mmdit_sized(
    source: &dyn ParamSource,
    config: &MmditConfig,
    sample_size: Option<usize>,
    layout: Layout,
    out: &Path,
    dtype: StoredDType,
) -> Result<()> {
    let shapes = config.param_shapes();
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert(HEAD_DIM_METADATA.to_string(), config.head_dim.to_string());
    if let Some(size) = sample_size {
        metadata.insert(SAMPLE_SIZE_METADATA.to_string(), size.to_string());
    }
    match layout {
        Layout::Original => {
            let pending: Vec<PendingTensor> = shapes
                .iter()
                .map(|(name, shape)| PendingTensor {
                    name: format!("{ORIGINAL_PREFIX}{name}"),
                    shape: shape.clone(),
                    dtype,
                    produce: Box::new(move || source.param(name)),
                })
                .collect();
            write_safetensors(out, &pending, Some(metadata))
        }
        Layout::Diffusers => {
            let json = diffusers_config_json(config, sample_size)?;
            std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
            let mut pending = Vec::new();
            for (name, shape) in &shapes {
                let parts = original_to_diffusers(name, config.depth)
                    .unwrap_or_else(|| panic!("parameter `{name}` has no diffusers name"));
                let n = parts.len();
                for (key, part) in parts {
                    let mut shape = shape.clone();
                    shape[0] /= n;
                    pending.push(PendingTensor {
                        name: key,
                        shape,
                        dtype,
                        produce: Box::new(move || Ok(diffusers_part(&source.param(name)?, &part))),
                    });
                }
            }
            write_safetensors(&out.join(DIFFUSERS_WEIGHTS), &pending, Some(metadata))?;
            let text = serde_json::to_string_pretty(&json).expect("JSON");
            write_atomic(&out.join("config.json"), text.as_bytes())
        }
    }
}

/// The `config.json` of diffusers' `SD3Transformer2DModel` for this configuration (its
/// `sample_size`, diffusers' default latent side, [`DEFAULT_SAMPLE_SIZE`] unless given).
pub fn diffusers_config_json(
    c: &MmditConfig,
    sample_size: Option<usize>,
) -> Result<serde_json::Value> {
    if c.mlp_hidden != 4 * c.hidden || c.freq_dim != 256 {
        return Err(Error::Invalid(format!(
            "this MMDiT (MLP width {}, timestep features {}) cannot be described by diffusers' SD3Transformer2DModel, which fixes them to 4·D = {} and 256",
            c.mlp_hidden,
            c.freq_dim,
            4 * c.hidden
        )));
    }
    Ok(serde_json::json!({
        "_class_name": "SD3Transformer2DModel",
        "_diffusers_version": "0.32.0",
        "sample_size": sample_size.unwrap_or(DEFAULT_SAMPLE_SIZE),
        "patch_size": c.patch,
        "in_channels": c.in_channels,
        "num_layers": c.depth,
        "attention_head_dim": c.head_dim,
        "num_attention_heads": c.heads,
        "joint_attention_dim": c.context_dim,
        "caption_projection_dim": c.hidden,
        "pooled_projection_dim": c.pooled_dim,
        "out_channels": c.out_channels,
        "pos_embed_max_size": c.pos_embed_max_size,
        "dual_attention_layers": c.dual_attention_blocks,
        "qk_norm": if c.qk_norm { serde_json::Value::from("rms_norm") } else { serde_json::Value::Null },
    }))
}

impl MmditCheckpoint {
    /// A human-readable summary: layout, files, detected configuration, size, stored dtypes.
    pub fn describe(&self) -> String {
        let c = &self.config;
        let dtypes: Vec<String> = self
            .stored_dtypes()
            .iter()
            .map(|(d, n)| format!("{d} ×{n}"))
            .collect();
        let files: Vec<String> = self
            .files
            .iter()
            .map(|f| f.path().display().to_string())
            .collect();
        let dual = if c.dual_attention_blocks.is_empty() {
            "none".to_string()
        } else {
            format!("{:?}", c.dual_attention_blocks)
        };
        let sample_size = match self.sample_size {
            Some(s) => s.to_string(),
            None => format!("not stored (exports say {DEFAULT_SAMPLE_SIZE})"),
        };
        format!(
            "checkpoint: {}\nlayout: {}\nfiles: {}\nmodel: {}\ndepth: {}\nhidden: {}\nheads: {} × {}\npatch: {}\nchannels: {} in, {} out\npos_embed_max_size: {}\nsample size: {sample_size}\ncontext dim: {}\npooled dim: {}\ntimestep features: {}\nmlp hidden: {}\nqk norm: {}\ndual attention blocks: {dual}\nparameters: {} ({})\nstored dtypes: {}\n",
            self.path.display(),
            self.layout.name(),
            files.join(", "),
            c.family(),
            c.depth,
            c.hidden,
            c.heads,
            c.head_dim,
            c.patch,
            c.in_channels,
            c.out_channels,
            c.pos_embed_max_size,
            c.context_dim,
            c.pooled_dim,
            c.freq_dim,
            c.mlp_hidden,
            if c.qk_norm { "rms_norm" } else { "none" },
            c.param_count(),
            human_count(c.param_count()),
            dtypes.join(", ")
        )
    }

    /// The same summary as JSON.
    pub fn describe_json(&self) -> serde_json::Value {
        let c = &self.config;
        serde_json::json!({
            "checkpoint": self.path.display().to_string(),
            "layout": self.layout.name(),
            "files": self.files.iter().map(|f| f.path().display().to_string()).collect::<Vec<_>>(),
            "model": c.family(),
            "depth": c.depth,
            "hidden": c.hidden,
            "heads": c.heads,
            "head_dim": c.head_dim,
            "patch": c.patch,
            "in_channels": c.in_channels,
            "out_channels": c.out_channels,
            "pos_embed_max_size": c.pos_embed_max_size,
            "sample_size": self.sample_size,
            "context_dim": c.context_dim,
            "pooled_dim": c.pooled_dim,
            "freq_dim": c.freq_dim,
            "mlp_hidden": c.mlp_hidden,
            "qk_norm": c.qk_norm,
            "dual_attention_blocks": c.dual_attention_blocks,
            "parameters": c.param_count(),
            "stored_dtypes": self.stored_dtypes(),
            "notes": self.notes,
        })
    }
}

/// `advdmd convert`: reads `input` (either layout) and writes it to `out` in `layout`, tensor by
/// tensor, in `dtype` (default: the input's main stored dtype). Returns the opened input.
pub fn convert(
    input: &Path,
    out: &Path,
    layout: Layout,
    dtype: Option<StoredDType>,
) -> Result<MmditCheckpoint> {
    let ckpt = MmditCheckpoint::open(input)?;
    let dtype = dtype.unwrap_or_else(|| ckpt.main_dtype());
    if layout == Layout::Diffusers {
        diffusers_config_json(&ckpt.config, ckpt.sample_size)?;
        if out.is_file() {
            return Err(Error::Invalid(format!(
                "{}: is a file; the diffusers layout is written as a folder",
                out.display()
            )));
        }
    } else if out.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: is a folder; the original layout is written as one .safetensors file",
            out.display()
        )));
    }
    save_mmdit_sized(&ckpt, &ckpt.config, ckpt.sample_size, layout, out, dtype)?;
    Ok(ckpt)
}

fn human_count(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} M", n / 1e6)
    } else {
        format!("{:.1} K", n / 1e3)
    }
}

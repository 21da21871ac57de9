//! Precomputed SD3-family data: the real side of distilling a real checkpoint. VAE latents of
//! captioned images and their captions' text-encoder embeddings, computed once by
//! `tools/precompute.py` (or [`write_shard`]) so a run never loads a VAE or a text encoder, and
//! read row by row through memory maps (a folder may be far larger than memory).
//!
//! A data folder holds
//! * `shard-*.safetensors`, read in name order, each with `latents [n, C, H, W]` (normalised as
//!   the transformer sees them: `(VAE(x) − shift)·scale`), `context [n, L, ctx_dim]` and
//!   `pooled [n, pooled_dim]`, stored f32, bf16 or f16; optionally the captions, a JSON array
//!   of n strings under the metadata key `advdmd.captions`;
//! * `uncond.safetensors`: `context [1, L, ctx_dim]` and `pooled [1, pooled_dim]` of the empty
//!   prompt, the unconditional branch of the teacher's CFG.
//!
//! Every shard has the same latent shape and the same L (one batch, one token count).

use crate::checkpoint::{save_safetensors, SafetensorsFile};
use crate::error::{Error, Result};
use crate::mmdit::MmditConfig;
use crate::tensor::{Rng, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const CAPTIONS_KEY: &str = "advdmd.captions";
pub const UNCOND_FILE: &str = "uncond.safetensors";

/// Latents `[n, C, H, W]` with their prompts' context `[n, L, ctx_dim]` and pooled
/// `[n, pooled_dim]` embeddings, f32.
#[derive(Clone, Debug)]
pub struct LatentRows {
    pub latents: Tensor,
    pub context: Tensor,
    pub pooled: Tensor,
}

struct Shard {
    file: SafetensorsFile,
    rows: usize,
    captions: Option<Vec<String>>,
}

/// An opened data folder, every shard's header validated; no row read yet.
pub struct LatentData {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// `[C, H, W]` of one latent.
    pub latent_shape: [usize; 3],
    /// `[L, ctx_dim]` of one prompt's context.
    pub context_shape: [usize; 2],
    pub pooled_dim: usize,
    uncond: LatentRows,
}

fn invalid(path: &Path, why: String) -> Error {
    Error::Invalid(format!("{}: {why}", path.display()))
}

/// The shape of `name` in `file`, which must have `rank` axes, none of them 0.
fn shape_of(file: &SafetensorsFile, name: &str, rank: usize) -> Result<Vec<usize>> {
    file.stored_dtype(name)?;
    let shape = file.shape(name)?;
    if shape.len() != rank || shape.contains(&0) {
        return Err(invalid(
            file.path(),
            format!("tensor `{name}` has shape {shape:?}: expected {rank} axes, none empty"),
        ));
    }
    Ok(shape)
}

impl LatentData {
    pub fn open(dir: &Path) -> Result<LatentData> {
        if !dir.is_dir() {
            return Err(invalid(dir, "not a folder of precomputed shards".into()));
        }
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                name.is_some_and(|n| n.starts_with("shard-") && n.ends_with(".safetensors"))
            })
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(invalid(
                dir,
                "no shard-*.safetensors (write them with tools/precompute.py)".into(),
            ));
        }
        let uncond_path = dir.join(UNCOND_FILE);
        if !uncond_path.is_file() {
            return Err(invalid(
                dir,
                format!("no {UNCOND_FILE} (the empty prompt's embeddings)"),
            ));
        }
        let uncond_file = SafetensorsFile::open(&uncond_path)?;
        let u_ctx = shape_of(&uncond_file, "context", 3)?;
        let u_pooled = shape_of(&uncond_file, "pooled", 2)?;
        if u_ctx[0] != 1 || u_pooled[0] != 1 {
            return Err(invalid(
                &uncond_path,
                format!(
                    "holds {} contexts and {} pooled rows, not one",
                    u_ctx[0], u_pooled[0]
                ),
            ));
        }
        let context_shape = [u_ctx[1], u_ctx[2]];
        let pooled_dim = u_pooled[1];
        let mut shards = Vec::new();
        let mut latent_shape = None;
        for path in paths {
            let file = SafetensorsFile::open(&path)?;
            let lat = shape_of(&file, "latents", 4)?;
            let ctx = shape_of(&file, "context", 3)?;
            let pooled = shape_of(&file, "pooled", 2)?;
            let rows = lat[0];
            if ctx[0] != rows || pooled[0] != rows {
                return Err(invalid(
                    &path,
                    format!(
                        "{rows} latents but {} contexts and {} pooled rows",
                        ctx[0], pooled[0]
                    ),
                ));
            }
            let this = [lat[1], lat[2], lat[3]];
            if *latent_shape.get_or_insert(this) != this {
                return Err(invalid(
                    &path,
                    format!(
                        "latents of shape {this:?}, the first shard's are {:?} (one resolution a folder)",
                        latent_shape.expect("set")
                    ),
                ));
            }
            if [ctx[1], ctx[2]] != context_shape || pooled[1] != pooled_dim {
                return Err(invalid(
                    &path,
                    format!(
                        "context {:?} and pooled {} per row, {UNCOND_FILE} has {context_shape:?} and {pooled_dim}",
                        &ctx[1..],
                        pooled[1]
                    ),
                ));
            }
            let captions = match file.user_metadata().get(CAPTIONS_KEY) {
                None => None,
                Some(text) => {
                    let list: Vec<String> = serde_json::from_str(text).map_err(|e| {
                        invalid(
                            &path,
                            format!("`{CAPTIONS_KEY}` is not a JSON list of strings: {e}"),
                        )
                    })?;
                    if list.len() != rows {
                        return Err(invalid(
                            &path,
                            format!("{} captions for {rows} latents", list.len()),
                        ));
                    }
                    Some(list)
                }
            };
            shards.push(Shard {
                file,
                rows,
                captions,
            });
        }
        let uncond = LatentRows {
            latents: Tensor::zeros(&[0]),
            context: uncond_file.load_rows_f32("context", 0, 1)?,
            pooled: uncond_file.load_rows_f32("pooled", 0, 1)?,
        };
        Ok(LatentData {
            dir: dir.to_path_buf(),
            shards,
            latent_shape: latent_shape.expect("at least one shard"),
            context_shape,
            pooled_dim,
            uncond,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Samples in all shards.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.rows).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What identifies the folder's contents for a run that must continue on the same data:
    /// sample count, shapes, and each shard's file name and rows.
    pub fn describe(&self) -> serde_json::Value {
        let shards: Vec<serde_json::Value> = self
            .shards
            .iter()
            .map(|s| {
                let name = s.file.path().file_name().map(|n| n.to_string_lossy());
                serde_json::json!([name.unwrap_or_default(), s.rows])
            })
            .collect();
        serde_json::json!({
            "samples": self.len(),
            "latent_shape": self.latent_shape,
            "context_shape": self.context_shape,
            "pooled_dim": self.pooled_dim,
            "shards": shards,
        })
    }

    /// [`Self::describe`] as lines, with the first captions.
    pub fn describe_text(&self) -> String {
        let [c, h, w] = self.latent_shape;
        let [l, d] = self.context_shape;
        let mut text = format!(
            "data: {}\nsamples: {} in {} shards\nlatents: {c} × {h} × {w}\ncontext: {l} tokens × {d}\npooled: {}\n",
            self.dir.display(),
            self.len(),
            self.shards.len(),
            self.pooled_dim
        );
        let captions: Vec<&str> = (0..self.len().min(3))
            .filter_map(|i| self.caption(i))
            .collect();
        if captions.is_empty() {
            text.push_str("captions: none stored\n");
        }
        for caption in captions {
            text.push_str(&format!("caption: {caption}\n"));
        }
        text
    }

    /// An error unless a transformer of configuration `c` takes these latents and embeddings:
    /// channels, context and pooled widths, and a token grid its position table covers.
    pub fn check_model(&self, c: &MmditConfig) -> Result<()> {
        let [ch, h, w] = self.latent_shape;
        let [_, ctx_dim] = self.context_shape;
        let bad = |why: String| {
            Err(invalid(
                &self.dir,
                format!("{why}: not data for this model"),
            ))
        };
        if ch != c.in_channels {
            return bad(format!(
                "latents of {ch} channels, the model takes {}",
                c.in_channels
            ));
        }
        if ctx_dim != c.context_dim || self.pooled_dim != c.pooled_dim {
            return bad(format!(
                "context width {ctx_dim} and pooled {}, the model takes {} and {}",
                self.pooled_dim, c.context_dim, c.pooled_dim
            ));
        }
        let p = c.patch;
        if h % p != 0 || w % p != 0 || h / p > c.pos_embed_max_size || w / p > c.pos_embed_max_size
        {
            return bad(format!(
                "latents {h}×{w} are not a grid of {p}×{p} patches within the model's {0}×{0} positions",
                c.pos_embed_max_size
            ));
        }
        Ok(())
    }

    fn locate(&self, index: usize) -> Result<(&Shard, usize)> {
        let mut i = index;
        for s in &self.shards {
            if i < s.rows {
                return Ok((s, i));
            }
            i -= s.rows;
        }
        Err(invalid(
            &self.dir,
            format!("sample {index} asked of {}", self.len()),
        ))
    }

    /// The caption of sample `index`, when its shard holds captions.
    pub fn caption(&self, index: usize) -> Option<&str> {
        let (s, i) = self.locate(index).ok()?;
        s.captions.as_ref().map(|c| c[i].as_str())
    }

    /// Samples `indices` (any order, repeats allowed), stacked, f32, each value checked finite.
    pub fn rows(&self, indices: &[usize]) -> Result<LatentRows> {
        let (mut lat, mut ctx, mut pooled) = (Vec::new(), Vec::new(), Vec::new());
        for &index in indices {
            let (s, i) = self.locate(index)?;
            lat.extend_from_slice(s.file.load_rows_f32("latents", i, 1)?.f32s());
            ctx.extend_from_slice(s.file.load_rows_f32("context", i, 1)?.f32s());
            pooled.extend_from_slice(s.file.load_rows_f32("pooled", i, 1)?.f32s());
        }
        let n = indices.len();
        let [c, h, w] = self.latent_shape;
        let [l, d] = self.context_shape;
        Ok(LatentRows {
            latents: Tensor::from_vec(lat, &[n, c, h, w]),
            context: Tensor::from_vec(ctx, &[n, l, d]),
            pooled: Tensor::from_vec(pooled, &[n, self.pooled_dim]),
        })
    }

    /// The empty prompt's context `[n, L, ctx_dim]` and pooled `[n, pooled_dim]`, repeated n times.
    pub fn uncond(&self, n: usize) -> (Tensor, Tensor) {
        let repeat = |t: &Tensor| {
            let mut shape = t.shape().to_vec();
            shape[0] = n;
            Tensor::from_vec(t.f32s().repeat(n), &shape)
        };
        (repeat(&self.uncond.context), repeat(&self.uncond.pooled))
    }
}

/// The order a run reads a data folder in: epoch after epoch, each a permutation of every sample
/// drawn from the run's seed and the epoch's number, so the sample at position `k` of the run is
/// a function of `(seed, k)` alone — a resumed run reads on exactly where it stopped.
pub struct EpochOrder {
    seed: u64,
    len: usize,
    /// The current epoch's number and permutation.
    epoch: Option<(u64, Vec<usize>)>,
}

impl EpochOrder {
    pub fn new(seed: u64, len: usize) -> EpochOrder {
        EpochOrder {
            seed,
            len,
            epoch: None,
        }
    }

    /// The sample at position `k` of the run.
    pub fn at(&mut self, k: u64) -> usize {
        let len = self.len.max(1) as u64;
        let (epoch, pos) = (k / len, (k % len) as usize);
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut rng =
                Rng::new(self.seed ^ epoch.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut order: Vec<usize> = (0..self.len).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            self.epoch = Some((epoch, order));
        }
        self.epoch.as_ref().expect("just set").1[pos]
    }
}

/// Writes one shard (atomically): `latents [n, C, H, W]`, `context [n, L, ctx_dim]`,
/// `pooled [n, pooled_dim]` in their own dtypes, and `captions` (n of them) when given.
pub fn write_shard(path: &Path, rows: &LatentRows, captions: Option<&[String]>) -> Result<()> {
    let n = rows.latents.shape().first().copied().unwrap_or(0);
    let ok = rows.latents.shape().len() == 4
        && rows.context.shape().len() == 3
        && rows.pooled.shape().len() == 2
        && rows.context.shape()[0] == n
        && rows.pooled.shape()[0] == n
        && captions.is_none_or(|c| c.len() == n);
    if !ok {
        return Err(invalid(
            path,
            format!(
                "a shard takes latents [n, C, H, W], context [n, L, D], pooled [n, P] (and n captions); got {:?}, {:?}, {:?}",
                rows.latents.shape(),
                rows.context.shape(),
                rows.pooled.shape()
            ),
        ));
    }
    let tensors = [
        ("latents".to_string(), rows.latents.clone()),
        ("context".to_string(), rows.context.clone()),
        ("pooled".to_string(), rows.pooled.clone()),
    ];
    let metadata = captions.map(|c| {
        HashMap::from([(
            CAPTIONS_KEY.to_string(),
            serde_json::to_string(c).expect("strings serialise"),
        )])
    });
    save_safetensors(path, &tensors, metadata)
}

/// Writes a folder's `uncond.safetensors`: the empty prompt's `context [1, L, ctx_dim]` and
/// `pooled [1, pooled_dim]`.
pub fn write_uncond(dir: &Path, context: &Tensor, pooled: &Tensor) -> Result<()> {
    let tensors = [
        ("context".to_string(), context.clone()),
        ("pooled".to_string(), pooled.clone()),
    ];
    save_safetensors(dir.join(UNCOND_FILE), &tensors, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| rng.normal()).collect(), shape)
    }

    fn rows(n: usize, rng: &mut Rng) -> LatentRows {
        LatentRows {
            latents: random(&[n, 4, 8, 6], rng),
            context: random(&[n, 5, 12], rng),
            pooled: random(&[n, 7], rng),
        }
    }

    /// The empty prompt's embeddings of [`rows`]' widths.
    fn write_test_uncond(dir: &Path, rng: &mut Rng) {
        write_uncond(dir, &random(&[1, 5, 12], rng), &random(&[1, 7], rng)).unwrap();
    }

    fn folder(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("advdmd-latents-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn rows_come_back_across_shards_and_bad_folders_are_named() {
        let dir = folder("rows");
        let mut rng = Rng::new(7);
        let (a, b) = (rows(3, &mut rng), rows(2, &mut rng));
        let caps: Vec<String> = ["a red circle", "two squares", ""]
            .map(String::from)
            .to_vec();
        write_shard(&dir.join("shard-00000.safetensors"), &a, Some(&caps)).unwrap();
        let b16 = LatentRows {
            latents: b.latents.to_dtype(crate::tensor::DType::BF16),
            ..b.clone()
        };
        write_shard(&dir.join("shard-00001.safetensors"), &b16, None).unwrap();
        let missing = LatentData::open(&dir).err().unwrap().to_string();
        assert!(missing.contains(UNCOND_FILE), "{missing}");
        write_test_uncond(&dir, &mut rng);

        let data = LatentData::open(&dir).unwrap();
        assert_eq!(
            (data.len(), data.latent_shape, data.context_shape),
            (5, [4, 8, 6], [5, 12])
        );
        assert_eq!(data.caption(1), Some("two squares"));
        assert_eq!(data.caption(4), None);
        let got = data.rows(&[4, 0, 4]).unwrap();
        let per = 4 * 8 * 6;
        let want_b1 = b16.latents.to_dtype(crate::tensor::DType::F32).f32s()[per..].to_vec();
        assert_eq!(&got.latents.f32s()[..per], &want_b1[..]);
        assert_eq!(&got.latents.f32s()[per..2 * per], &a.latents.f32s()[..per]);
        assert_eq!(&got.context.f32s()[..60], &b.context.f32s()[60..]);
        assert_eq!(got.pooled.shape(), &[3, 7]);
        let (uc, up) = data.uncond(3);
        assert_eq!((uc.shape(), up.shape()), (&[3, 5, 12][..], &[3, 7][..]));
        assert!(data.rows(&[5]).is_err());

        // a shard at another resolution, or disagreeing row counts, is refused by name
        let odd = LatentRows {
            latents: random(&[2, 4, 8, 8], &mut rng),
            ..rows(2, &mut rng)
        };
        write_shard(&dir.join("shard-00002.safetensors"), &odd, None).unwrap();
        let e = LatentData::open(&dir).err().unwrap().to_string();
        assert!(
            e.contains("shard-00002") && e.contains("one resolution"),
            "{e}"
        );
        let short = LatentRows {
            pooled: random(&[1, 7], &mut rng),
            ..rows(2, &mut rng)
        };
        assert!(write_shard(&dir.join("shard-00002.safetensors"), &short, None).is_err());
        std::fs::write(dir.join("shard-00002.safetensors"), b"not safetensors").unwrap();
        assert!(LatentData::open(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn each_epoch_reads_every_sample_once_in_an_order_of_its_own() {
        let mut order = EpochOrder::new(5, 7);
        let epoch = |o: &mut EpochOrder, e: u64| (7 * e..7 * e + 7).map(|k| o.at(k)).collect();
        let (first, second): (Vec<usize>, Vec<usize>) =
            (epoch(&mut order, 0), epoch(&mut order, 1));
        for e in [&first, &second] {
            let mut sorted = e.clone();
            sorted.sort();
            assert_eq!(sorted, (0..7).collect::<Vec<_>>());
        }
        assert_ne!(first, second);
        // a fresh order (a resumed run) reads the same at any position, in any order of asking
        let mut fresh = EpochOrder::new(5, 7);
        assert_eq!(fresh.at(9), second[2]);
        assert_eq!(fresh.at(3), first[3]);
        assert_ne!(epoch(&mut EpochOrder::new(6, 7), 0), first);
    }

    #[test]
    fn data_is_checked_against_the_model() {
        let dir = folder("model");
        let mut rng = Rng::new(3);
        write_shard(&dir.join("shard-0.safetensors"), &rows(2, &mut rng), None).unwrap();
        write_test_uncond(&dir, &mut rng);
        let data = LatentData::open(&dir).unwrap();
        let c = MmditConfig {
            depth: 1,
            hidden: 16,
            heads: 2,
            head_dim: 8,
            patch: 2,
            in_channels: 4,
            out_channels: 4,
            pos_embed_max_size: 4,
            context_dim: 12,
            pooled_dim: 7,
            freq_dim: 8,
            mlp_hidden: 32,
            qk_norm: false,
            dual_attention_blocks: vec![],
        };
        data.check_model(&c).unwrap();
        for (what, c) in [
            (
                "channels",
                MmditConfig {
                    in_channels: 16,
                    ..c.clone()
                },
            ),
            (
                "context width",
                MmditConfig {
                    context_dim: 4096,
                    ..c.clone()
                },
            ),
            (
                "positions",
                MmditConfig {
                    pos_embed_max_size: 3,
                    ..c.clone()
                },
            ),
            (
                "patches",
                MmditConfig {
                    patch: 4,
                    pos_embed_max_size: 8,
                    ..c.clone()
                },
            ),
        ] {
            let e = data.check_model(&c).err().unwrap().to_string();
            assert!(e.contains("not data for this model"), "{what}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

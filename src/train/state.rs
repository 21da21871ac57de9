//! Training state on disk: groups of named parameters, AdamW moments and a JSON metadata record
//! in one safetensors file, written atomically, so a resumed run continues bit for bit.

use crate::checkpoint::{check_finite, save_safetensors, SafetensorsFile};
use crate::error::{Error, Result};
use crate::nn::ParamMap;
use crate::optim::AdamW;
use crate::tensor::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

const META_KEY: &str = "advdmd.state";

/// Writes `groups` (prefix, parameters), `optimizers` (prefix, AdamW) and `meta` to `path`; a
/// state holding a NaN or an infinity is refused, naming the tensor, and the file on disk is left
/// as it was (a diverged run never overwrites its last good checkpoint).
pub fn save_state(
    path: &Path,
    groups: &[(&str, &ParamMap)],
    optimizers: &[(&str, &AdamW)],
    meta: serde_json::Value,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (prefix, map) in groups {
        for (n, t) in map.tensors() {
            tensors.push((format!("{prefix}{n}"), t));
        }
    }
    let (mut steps, mut moment_counts) = (serde_json::Map::new(), serde_json::Map::new());
    for (prefix, opt) in optimizers {
        for (kind, moments) in [("m.", &opt.m), ("v.", &opt.v)] {
            for (n, m) in moments {
                tensors.push((
                    format!("{prefix}{kind}{n}"),
                    Tensor::from_vec(m.clone(), &[m.len()]),
                ));
            }
        }
        steps.insert(prefix.to_string(), opt.step.into());
        moment_counts.insert(prefix.to_string(), opt.m.len().into());
    }
    for (name, t) in &tensors {
        check_finite(path, name, &t.to_dtype(DType::F32)).map_err(|e| {
            Error::Invalid(format!(
                "not saved: {e}; the file on disk is left as it was"
            ))
        })?;
    }
    save_safetensors(
        path,
        &tensors,
        Some(state_record(meta, steps, moment_counts)),
    )
}

/// The metadata of a state file: `meta`, and per optimizer prefix its step count and how many
/// parameters' moments it saved.
pub fn state_record(
    meta: serde_json::Value,
    steps: serde_json::Map<String, serde_json::Value>,
    moment_counts: serde_json::Map<String, serde_json::Value>,
) -> HashMap<String, String> {
    let record = serde_json::json!({
        "meta": meta, "optimizer_steps": steps, "optimizer_moments": moment_counts,
    });
    HashMap::from([(META_KEY.to_string(), record.to_string())])
}

/// An opened state file.
pub struct StateFile {
    file: SafetensorsFile,
    record: serde_json::Value,
}

impl StateFile {
    pub fn open(path: &Path) -> Result<StateFile> {
        let file = SafetensorsFile::open(path)?;
        let record = file
            .user_metadata()
            .get(META_KEY)
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: not a training state (no {META_KEY} metadata)",
                    path.display()
                ))
            })?;
        Ok(StateFile { file, record })
    }

    pub fn meta(&self) -> &serde_json::Value {
        &self.record["meta"]
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Tensor `name` as f32, of shape `shape`, every value finite.
    pub fn load_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.file.load_f32(name, Some(shape))
    }

    /// The step count of optimizer `prefix`.
    pub fn optimizer_step(&self, prefix: &str) -> Result<u64> {
        self.record["optimizer_steps"][prefix]
            .as_u64()
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: no step count for optimizer `{prefix}`",
                    self.path().display()
                ))
            })
    }

    /// An error unless optimizer `prefix` saved the moments of exactly `count` parameters (both
    /// moments of each; a moment lost would restart from zero).
    pub fn check_moment_count(&self, prefix: &str, count: usize) -> Result<()> {
        let names = self.file.names();
        let of = |kind: &str| {
            let start = format!("{prefix}{kind}");
            names.iter().filter(|n| n.starts_with(&start)).count()
        };
        let recorded = self.record["optimizer_moments"][prefix].as_u64();
        if of("m.") != count || of("v.") != count || recorded.is_some_and(|r| r != count as u64) {
            return Err(Error::Invalid(format!(
                "{}: optimizer `{prefix}` saved {} first and {} second moments (recorded {recorded:?}) for {count} trained parameters",
                self.path().display(),
                of("m."),
                of("v.")
            )));
        }
        Ok(())
    }

    /// Loads every parameter of `map` from `prefix` + name, checking shapes.
    pub fn load_group(&self, prefix: &str, map: &ParamMap) -> Result<()> {
        for (n, p) in map.iter() {
            p.set_value(
                self.file
                    .load_f32(&format!("{prefix}{n}"), Some(p.value().shape()))?,
            );
        }
        Ok(())
    }

    /// Loads the moments saved under `prefix` into `opt`, which steps `params`: each moment must
    /// be of a parameter there, of its size, with its pair (m with v), and as many as were saved
    /// (a moment lost would restart from zero: the run would not continue exactly).
    pub fn load_optimizer(
        &self,
        prefix: &str,
        opt: &mut AdamW,
        params: &[&ParamMap],
    ) -> Result<()> {
        let bad = |why: String| Error::Invalid(format!("{}: {why}", self.path().display()));
        for n in self.file.names() {
            let Some(rest) = n.strip_prefix(prefix) else {
                continue;
            };
            let (moments, name) = match (rest.strip_prefix("m."), rest.strip_prefix("v.")) {
                (Some(name), _) => (&mut opt.m, name),
                (_, Some(name)) => (&mut opt.v, name),
                _ => continue,
            };
            let size = params
                .iter()
                .find_map(|m| m.get(name))
                .map(|p| p.value().numel());
            let values = self.file.load_f32(&n, None)?.to_vec();
            if size != Some(values.len()) {
                return Err(bad(format!(
                    "moment `{n}` ({} values) is of no parameter of that size",
                    values.len()
                )));
            }
            moments.insert(name.to_string(), values);
        }
        if !opt.m.keys().eq(opt.v.keys()) {
            return Err(bad(format!(
                "optimizer `{prefix}`: its first and second moments name different parameters"
            )));
        }
        // (states written before the count was recorded carry none)
        if let Some(saved) = self.record["optimizer_moments"][prefix].as_u64() {
            if saved != opt.m.len() as u64 {
                return Err(bad(format!(
                    "optimizer `{prefix}`: {} moments of the {saved} saved",
                    opt.m.len()
                )));
            }
        }
        opt.step = self.optimizer_step(prefix)?;
        Ok(())
    }
}

/// The RNG state as JSON strings (u64s do not survive every JSON reader as numbers).
pub fn rng_to_json(rng: &crate::tensor::Rng) -> serde_json::Value {
    rng.state()
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .into()
}

pub fn rng_from_json(v: &serde_json::Value) -> Option<crate::tensor::Rng> {
    let s: Vec<u64> = v
        .as_array()?
        .iter()
        .filter_map(|x| x.as_str()?.parse().ok())
        .collect();
    Some(crate::tensor::Rng::from_state(s.try_into().ok()?))
}

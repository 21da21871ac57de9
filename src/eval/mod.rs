//! Evaluation in the Shapes world (design/TOY.md): the Shapes-GenEval checker (`checker`),
//! Shapes-FD (`fd`), image IO (`image`), and here the scoring of a sample folder or of images in
//! memory, always reported next to the oracle (the checker on real renders of the same prompts)
//! and the real-vs-real FD floor, since a score means little without them.

pub mod checker;
pub mod fd;
pub mod image;

use crate::data::shapes::{
    all_prompts, derive_seed, render_u8, scene_for_prompt, Prompt, Task, CANVAS,
};
use crate::error::{Error, Result};
use crate::tensor::Rng;
use rayon::prelude::*;
use std::path::Path;

/// Seed of the fixed evaluation prompt list that sampling and distillation report on.
pub const EVAL_PROMPT_SEED: u64 = 0x5EED_E7A1;

/// RNG streams of the two real image sets (placements for the oracle/FD set and the floor set).
const REAL_STREAM: u64 = 1;
const FLOOR_STREAM: u64 = 2;
const PROMPT_STREAM: u64 = 3;

/// The fixed evaluation prompts: for every task, `per_task` prompts from a seeded shuffle of all
/// the task's prompts (distinct while the task has enough, then cycling in the same order).
pub fn evaluation_prompts(per_task: usize, seed: u64) -> Vec<(Task, String)> {
    let mut out = Vec::with_capacity(per_task * Task::ALL.len());
    for task in Task::ALL {
        let mut all = all_prompts(task);
        let mut rng = Rng::new(derive_seed(seed, PROMPT_STREAM, task as u64));
        for i in (1..all.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            all.swap(i, j);
        }
        out.extend((0..per_task).map(|i| (task, all[i % all.len()].clone())));
    }
    out
}

/// One line of a `manifest.jsonl`.
#[derive(Clone, Debug, PartialEq)]
pub struct ManifestEntry {
    /// 1-based line number in the manifest.
    pub line: usize,
    pub file: String,
    pub prompt: String,
    pub task: Task,
    pub seed: Option<u64>,
}

/// Reads `dir/manifest.jsonl`; blank lines are skipped, anything malformed is an error naming the
/// file and line.
pub fn read_manifest(dir: impl AsRef<Path>) -> Result<Vec<ManifestEntry>> {
    let path = dir.as_ref().join("manifest.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| Error::Invalid(format!("{}:{line}: {msg}", path.display()));
        let v: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let field = |k: &str| -> Result<String> {
            v.get(k)
                .and_then(|x| x.as_str())
                .map(str::to_string)
                .ok_or_else(|| bad(format!("missing string field `{k}`")))
        };
        let file = field("file")?;
        let prompt = field("prompt")?;
        let parsed = Prompt::parse(&prompt).map_err(|e| bad(e.to_string()))?;
        let task = parsed.task();
        if let Some(t) = v.get("task") {
            let named = t
                .as_str()
                .ok_or_else(|| bad("field `task` is not a string".into()))?;
            let named = Task::parse(named).map_err(|e| bad(e.to_string()))?;
            if named != task {
                return Err(bad(format!(
                    "task `{}` does not match prompt `{prompt}` (a `{}` prompt)",
                    named.name(),
                    task.name()
                )));
            }
        }
        let seed = match v.get("seed") {
            None | Some(serde_json::Value::Null) => None,
            Some(s) => Some(
                s.as_u64()
                    .ok_or_else(|| bad("field `seed` is not a non-negative integer".into()))?,
            ),
        };
        out.push(ManifestEntry {
            line,
            file,
            prompt,
            task,
            seed,
        });
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no images listed",
            path.display()
        )));
    }
    Ok(out)
}

/// Per-task results.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskReport {
    pub task: Task,
    pub images: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// Checker accuracy on real renders of the same prompts.
    pub oracle_accuracy: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    pub images: usize,
    /// Tasks present, in `Task::ALL` order.
    pub tasks: Vec<TaskReport>,
    /// Mean over the tasks present of their accuracy.
    pub score: f64,
    pub oracle_score: f64,
    /// Shapes-FD between the images and real renders of their prompts.
    pub fd: f64,
    /// Shapes-FD between two independent real sets for the same prompts.
    pub fd_floor: f64,
    pub seed: u64,
}

impl EvalReport {
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{:<10} {:>7} {:>7} {:>7}\n",
            "task", "images", "score", "oracle"
        );
        for t in &self.tasks {
            s += &format!(
                "{:<10} {:>7} {:>7.3} {:>7.3}\n",
                t.task.name(),
                t.images,
                t.accuracy,
                t.oracle_accuracy
            );
        }
        s += &format!(
            "{:<10} {:>7} {:>7.3} {:>7.3}\n",
            "overall", self.images, self.score, self.oracle_score
        );
        s += &format!(
            "Shapes-FD {:.4} (real-vs-real floor {:.4})\n",
            self.fd, self.fd_floor
        );
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        let tasks: serde_json::Map<String, serde_json::Value> = self
            .tasks
            .iter()
            .map(|t| {
                (
                    t.task.name().to_string(),
                    serde_json::json!({
                        "images": t.images,
                        "correct": t.correct,
                        "accuracy": t.accuracy,
                        "oracle_accuracy": t.oracle_accuracy,
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "images": self.images,
            "score": self.score,
            "oracle_score": self.oracle_score,
            "fd": self.fd,
            "fd_floor": self.fd_floor,
            "seed": self.seed,
            "tasks": tasks,
        })
    }
}

/// Scores a folder written by `sample` or `dataset` (PNG files + `manifest.jsonl`). `seed` fixes
/// the placements of the real reference images.
pub fn evaluate_folder(dir: impl AsRef<Path>, seed: u64) -> Result<EvalReport> {
    let dir = dir.as_ref();
    let entries = read_manifest(dir)?;
    let images: Vec<Vec<u8>> = entries
        .par_iter()
        .map(|e| -> Result<Vec<u8>> {
            let path = dir.join(&e.file);
            let (rgb, w, h) = image::read_png(&path).map_err(|err| match err {
                Error::Io { err: source, .. } => Error::Invalid(format!(
                    "{}:{}: image `{}`: {source}",
                    dir.join("manifest.jsonl").display(),
                    e.line,
                    path.display()
                )),
                other => other,
            })?;
            if (w, h) != (CANVAS, CANVAS) {
                return Err(Error::Invalid(format!(
                    "{}: {w}×{h} image, Shapes images are {CANVAS}×{CANVAS}",
                    path.display()
                )));
            }
            Ok(rgb)
        })
        .collect::<Result<_>>()?;
    let prompts: Vec<String> = entries.into_iter().map(|e| e.prompt).collect();
    evaluate_images(&prompts, &images, seed)
}

/// Scores 8-bit RGB HWC 16×16 images against their prompts (the in-memory form of
/// [`evaluate_folder`]).
pub fn evaluate_images(prompts: &[String], images: &[Vec<u8>], seed: u64) -> Result<EvalReport> {
    if prompts.len() != images.len() || prompts.is_empty() {
        return Err(Error::Invalid(format!(
            "evaluation needs one image per prompt and at least one: {} prompts, {} images",
            prompts.len(),
            images.len()
        )));
    }
    let parsed: Vec<Prompt> = prompts
        .iter()
        .map(|p| Prompt::parse(p))
        .collect::<Result<_>>()?;
    let real_set = |stream: u64| -> Result<Vec<Vec<u8>>> {
        prompts
            .par_iter()
            .enumerate()
            .map(|(i, p)| {
                let mut rng = Rng::new(derive_seed(seed, stream, i as u64));
                Ok(render_u8(&scene_for_prompt(p, &mut rng)?))
            })
            .collect()
    };
    let real = real_set(REAL_STREAM)?;
    let floor = real_set(FLOOR_STREAM)?;
    let judge_all = |set: &[Vec<u8>]| -> Result<Vec<bool>> {
        set.par_iter()
            .zip(parsed.par_iter())
            .map(|(im, p)| Ok(checker::judge(&checker::detect_objects(im)?, p)))
            .collect()
    };
    let verdicts = judge_all(images)?;
    let oracle = judge_all(&real)?;
    let feats = |set: &[Vec<u8>]| -> Result<Vec<fd::Features>> {
        set.par_iter()
            .map(|im| {
                if im.len() != 3 * CANVAS * CANVAS {
                    return Err(Error::Invalid(format!(
                        "an image has {} bytes, expected {}",
                        im.len(),
                        3 * CANVAS * CANVAS
                    )));
                }
                Ok(fd::features_u8(im))
            })
            .collect()
    };
    let (f_fake, f_real, f_floor) = (feats(images)?, feats(&real)?, feats(&floor)?);
    let (fd_value, fd_floor) =
        rayon::join(|| fd::fd(&f_real, &f_fake), || fd::fd(&f_real, &f_floor));

    let mut tasks = Vec::new();
    for task in Task::ALL {
        let idx: Vec<usize> = (0..parsed.len())
            .filter(|&i| parsed[i].task() == task)
            .collect();
        if idx.is_empty() {
            continue;
        }
        let correct = idx.iter().filter(|&&i| verdicts[i]).count();
        let oracle_correct = idx.iter().filter(|&&i| oracle[i]).count();
        tasks.push(TaskReport {
            task,
            images: idx.len(),
            correct,
            accuracy: correct as f64 / idx.len() as f64,
            oracle_accuracy: oracle_correct as f64 / idx.len() as f64,
        });
    }
    let mean = |f: fn(&TaskReport) -> f64| tasks.iter().map(f).sum::<f64>() / tasks.len() as f64;
    Ok(EvalReport {
        images: images.len(),
        score: mean(|t| t.accuracy),
        oracle_score: mean(|t| t.oracle_accuracy),
        tasks,
        fd: fd_value,
        fd_floor,
        seed,
    })
}

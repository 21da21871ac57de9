//! The `advdmd` command line: parse, call the library, report errors in one line.

use advdmd::mmdit::checkpoint::{convert, Layout, MmditCheckpoint};
use advdmd::tensor::StoredDType;
use advdmd::train::pretrain::{export_checkpoint, pretrain, PretrainConfig};
use advdmd::train::shapes_model::ShapesModelSize;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

mod cli;

#[derive(Parser)]
#[command(
    name = "advdmd",
    version,
    about = "Few-step AdvDMD distillation of MMDiT diffusion transformers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Version, build features, devices found and kernels embedded.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Detected configuration, parameter count, layout and stored dtypes of an MMDiT checkpoint.
    Inspect {
        /// A .safetensors file, a diffusers folder, or a sharded model's .index.json.
        checkpoint: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Trains the Shapes teacher by flow matching (the default settings make the committed teacher).
    Pretrain {
        /// Run folder: checkpoint.safetensors, metrics.jsonl, model/ at the end.
        #[arg(long)]
        out: PathBuf,
        /// Continue the run in --out from its last checkpoint, exactly.
        #[arg(long)]
        resume: bool,
        /// Only write the EMA model of the last checkpoint to OUT/model-stepN/ (with the run's flags).
        #[arg(long)]
        export_only: bool,
        #[arg(long, default_value_t = PretrainConfig::default().steps)]
        steps: u64,
        #[arg(long, default_value_t = PretrainConfig::default().batch)]
        batch: usize,
        #[arg(long, default_value_t = PretrainConfig::default().lr)]
        lr: f32,
        #[arg(long, default_value_t = PretrainConfig::default().warmup)]
        warmup: u64,
        #[arg(long, default_value_t = PretrainConfig::default().ema_decay)]
        ema_decay: f32,
        #[arg(long, default_value_t = PretrainConfig::default().seed)]
        seed: u64,
        #[arg(long, default_value_t = PretrainConfig::default().checkpoint_every)]
        checkpoint_every: u64,
        /// MMDiT hidden size.
        #[arg(long, default_value_t = ShapesModelSize::default().hidden)]
        hidden: usize,
        /// MMDiT joint blocks.
        #[arg(long, default_value_t = ShapesModelSize::default().depth)]
        depth: usize,
    },
    /// Samples images from a Shapes model (PNGs, manifest.jsonl, grid.png).
    Sample {
        /// A model folder (default: the committed teacher, assets/shapes-teacher).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// One prompt ...
        #[arg(long, conflicts_with = "prompts")]
        prompt: Option<String>,
        /// ... or a file with one prompt per line, or `eval:N` for the fixed evaluation set with N prompts per task.
        #[arg(long)]
        prompts: Option<String>,
        /// Images per prompt.
        #[arg(long, default_value_t = 1)]
        per_prompt: usize,
        #[arg(long, default_value_t = 40)]
        steps: usize,
        #[arg(long, default_value_t = 1.5)]
        cfg: f32,
        /// Sigma-schedule shift (default: the model's own, from shapes.json).
        #[arg(long)]
        shift: Option<f64>,
        #[arg(long, default_value = "euler", value_parser = ["euler", "sde"])]
        sampler: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 128)]
        batch: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes real Shapes scenes (PNGs + manifest.jsonl).
    Dataset {
        #[arg(long)]
        out: PathBuf,
        /// Scenes per task.
        #[arg(long)]
        n: usize,
        /// One task only (single, position, two, relation, counting).
        #[arg(long)]
        task: Option<String>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Scores a folder of images: Shapes-GenEval per task, Shapes-FD, the oracle.
    Eval {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
        /// Seed of the real reference images.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Converts an MMDiT checkpoint between the original single-file and the diffusers layout.
    Convert {
        /// Input checkpoint (either layout).
        input: PathBuf,
        /// Output: a .safetensors file (original) or a folder (diffusers).
        output: PathBuf,
        #[arg(long, value_parser = ["diffusers", "original"])]
        layout: String,
        /// Stored dtype of the output (default: the input's).
        #[arg(long, value_parser = ["f32", "f16", "bf16"])]
        dtype: Option<String>,
    },
}

fn main() {
    advdmd::device::tune_allocator();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info { json } => {
            let info = advdmd::info::gather();
            emit(json, &info.to_json(), || info.to_text())?;
        }
        Command::Inspect { checkpoint, json } => {
            let ckpt = MmditCheckpoint::open(&checkpoint)?;
            if !json {
                for n in &ckpt.notes {
                    eprintln!("info: {n}");
                }
            }
            emit(json, &ckpt.describe_json(), || ckpt.describe())?;
        }
        Command::Pretrain {
            out,
            resume,
            export_only,
            steps,
            batch,
            lr,
            warmup,
            ema_decay,
            seed,
            checkpoint_every,
            hidden,
            depth,
        } => {
            let config = PretrainConfig {
                steps,
                batch,
                lr,
                warmup,
                ema_decay,
                seed,
                checkpoint_every,
                size: ShapesModelSize {
                    hidden,
                    depth,
                    ..Default::default()
                },
                ..Default::default()
            };
            if export_only {
                let dir = export_checkpoint(&config, &out)?;
                eprintln!("wrote {}", dir.display());
                return Ok(());
            }
            let bar = cli::progress_bar(steps, "pretrain");
            let start = std::time::Instant::now();
            let mut smooth = None::<f32>;
            let state = pretrain(&config, &out, resume, |m| {
                let s = smooth.map_or(m.loss, |s| 0.98 * s + 0.02 * m.loss);
                smooth = Some(s);
                bar.set_position(m.step);
                bar.set_message(format!(
                    "loss {:.4} (avg {s:.4}) lr {:.2e} |g| {:.2}",
                    m.loss, m.lr, m.grad_norm
                ));
            })?;
            bar.finish();
            eprintln!(
                "done: {} steps in {:.1} min; EMA model in {}",
                state.step,
                start.elapsed().as_secs_f64() / 60.0,
                out.join("model").display()
            );
        }
        Command::Sample {
            checkpoint,
            prompt,
            prompts,
            per_prompt,
            steps,
            cfg,
            shift,
            sampler,
            seed,
            batch,
            out,
        } => {
            let opts = cli::SampleOptions {
                per_prompt,
                steps,
                cfg,
                shift,
                sampler,
                seed,
                batch,
            };
            cli::sample(checkpoint, prompt, prompts, &opts, &out)?;
        }
        Command::Dataset { out, n, task, seed } => {
            let task = task
                .map(|t| advdmd::data::shapes::Task::parse(&t))
                .transpose()?;
            let written = advdmd::data::shapes::write_dataset(&out, n, task, seed)?;
            eprintln!("wrote {written} scenes to {}", out.display());
        }
        Command::Eval { dir, json, seed } => {
            let report = advdmd::eval::evaluate_folder(&dir, seed)?;
            emit(json, &report.to_json(), || report.to_text())?;
        }
        Command::Convert {
            input,
            output,
            layout,
            dtype,
        } => {
            let layout = Layout::parse(&layout).expect("clap checked the layout");
            let dtype = dtype.map(|d| StoredDType::parse(&d).expect("clap checked the dtype"));
            let ckpt = convert(&input, &output, layout, dtype)?;
            for n in &ckpt.notes {
                eprintln!("info: {n}");
            }
            eprintln!(
                "wrote {} ({} layout, {} parameters)",
                output.display(),
                layout.name(),
                ckpt.config.param_count()
            );
        }
    }
    Ok(())
}

/// Prints a report as pretty JSON or as text.
fn emit(
    json: bool,
    value: &serde_json::Value,
    text: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        out(&format!("{}\n", serde_json::to_string_pretty(value)?))
    } else {
        out(&text())
    }
}

/// Writes to stdout; a closed pipe (`advdmd inspect X | head`) ends the output quietly.
fn out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

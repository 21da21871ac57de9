//! The `advdmd` command line: parse, call the library, report errors in one line.

use advdmd::mmdit::checkpoint::{convert, Layout, MmditCheckpoint};
use advdmd::tensor::StoredDType;
use advdmd::train::advdmd::{AdvDmdConfig, DiscStates};
use advdmd::train::distill::{
    distill, distill_latents, distilled_model, evaluate_model, DistillRun, Start,
};
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
    /// Detected configuration, parameter count, layout and stored dtypes of an MMDiT checkpoint; or a precomputed data folder's samples, shapes and first captions.
    Inspect {
        /// A .safetensors file, a diffusers folder, or a sharded model's .index.json; or a data
        /// folder of `distill --data` (one with uncond.safetensors).
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
    /// Distils the Shapes teacher (or with --data an SD3-family checkpoint) into a K-step generator with AdvDMD (DMD2 + discriminator-reward RL).
    Distill {
        /// Run folder: checkpoint.safetensors, metrics.jsonl, model/ (the EMA generator).
        #[arg(long)]
        out: PathBuf,
        /// Teacher: a Shapes model folder (default: assets/shapes-teacher), or with --data an
        /// SD3-family checkpoint (a file or a diffusers folder, either layout).
        #[arg(long)]
        teacher: Option<PathBuf>,
        /// Precomputed latents and prompt embeddings (shard-*.safetensors + uncond.safetensors,
        /// written by tools/precompute.py) to distil an SD3-family --teacher on; needs --device
        /// cuda (or emu).
        #[arg(long, requires = "teacher")]
        data: Option<PathBuf>,
        #[arg(long)]
        resume: bool,
        /// Start from another run's folder at its last checkpoint, with flags that may differ in
        /// the late switches only (--no-rl, --rl-warmup, --frozen-disc-after, RL weight/clips),
        /// and only before any of them acted: the fork equals a fresh run with these flags.
        #[arg(long, conflicts_with = "resume")]
        fork_from: Option<PathBuf>,
        /// Iterations (the default run takes about 21 minutes on 2 cores, its evaluation included).
        #[arg(long, default_value_t = 1200)]
        iterations: u64,
        #[arg(long, default_value_t = 100)]
        checkpoint_every: u64,
        /// With --data: at each checkpoint the EMA generator samples the data's first N prompts
        /// (seeds 0..N, its K-step schedule) into OUT/samples/iter-NNNNNNN/ (latents.safetensors
        /// + manifest.jsonl, for tools/decode.py); 0: none.
        #[arg(long, default_value_t = 4, requires = "data", value_parser = clap::value_parser!(u64).range(0..=64))]
        samples: u64,
        /// Generator steps K (1–8).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=8))]
        steps_per_sample: u64,
        /// The DMD2 baseline: no RL term.
        #[arg(long)]
        no_rl: bool,
        #[arg(long, default_value = "trajectory", value_parser = ["trajectory", "final"])]
        disc_states: String,
        /// Freeze the discriminator (head and feature backbone) from this iteration on: the
        /// reward-hacking control.
        #[arg(long)]
        frozen_disc_after: Option<u64>,
        #[arg(long, default_value_t = AdvDmdConfig::default().rho)]
        rho: f32,
        /// The teacher's CFG weight in the DMD gradient (default: 3 for Shapes, 4.5 for an
        /// SD3-family checkpoint).
        #[arg(long)]
        w_real: Option<f32>,
        #[arg(long, default_value_t = AdvDmdConfig::default().lambda_dmd)]
        lambda_dmd: f32,
        #[arg(long, default_value_t = AdvDmdConfig::default().lambda_gan)]
        lambda_gan: f32,
        #[arg(long, default_value_t = AdvDmdConfig::default().lambda_d)]
        lambda_d: f32,
        #[arg(long, default_value_t = AdvDmdConfig::default().lambda_rl)]
        lambda_rl: f32,
        /// A generator update every r_dmd iterations.
        #[arg(long, default_value_t = AdvDmdConfig::default().r_dmd)]
        r_dmd: u64,
        /// The RL term on every r_rl-th generator update (after --rl-warmup).
        #[arg(long, default_value_t = AdvDmdConfig::default().r_rl)]
        r_rl: u64,
        #[arg(long, default_value_t = 100)]
        rl_warmup: u64,
        /// cpu (the CPU trainer); cuda (the iteration on the GPU: bf16 models, f32 masters);
        /// emu (the same on the CPU SIMT emulator: slow, a functional check).
        #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "emu"])]
        device: String,
        /// On a device: Adam's moments in bf16 with stochastic rounding (half the optimizer memory).
        #[arg(long)]
        bf16_moments: bool,
        /// On a device: activation checkpointing of every differentiated forward; without a
        /// value or `=full` each block's inputs are kept and the block recomputed, `=selective`
        /// also keeps the attention, projection and fc2 outputs (less recomputation, more memory).
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "full", value_enum)]
        checkpoint_activations: Option<advdmd::mmdit::device::Checkpointing>,
        /// On a device: replay each kind of iteration from a CUDA graph (recorded the second time
        /// the kind runs; the emulator records and replays too).
        #[arg(long)]
        graph: bool,
        /// Prompts per iteration (M) and samples per prompt (G).
        #[arg(long, default_value_t = AdvDmdConfig::default().prompts)]
        prompts: usize,
        #[arg(long, default_value_t = AdvDmdConfig::default().group)]
        group: usize,
        #[arg(long, default_value_t = AdvDmdConfig::default().lr_generator)]
        lr: f32,
        /// Iterations over which both learning rates ramp up linearly (then constant).
        #[arg(long, default_value_t = AdvDmdConfig::default().lr_warmup)]
        lr_warmup: u64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Evaluation prompts per task for the final table of a Shapes teacher (0 skips it; at
        /// most 100000).
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(0..=100_000))]
        eval_per_task: u64,
    },
    /// Samples images from a Shapes model (PNGs, manifest.jsonl, grid.png), or with --data the latents of an SD3-family checkpoint (latents.safetensors and manifest.jsonl, for tools/decode.py).
    Sample {
        /// A model folder (default: the committed teacher, assets/shapes-teacher); with --data an
        /// SD3-family checkpoint (a teacher, or the model/ of `distill --data`).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Precomputed prompt embeddings (a `distill --data` folder): the first --count samples'
        /// prompts are sampled, on the CPU.
        #[arg(long, requires = "checkpoint", conflicts_with_all = ["prompt", "prompts"])]
        data: Option<PathBuf>,
        /// With --data: how many of its prompts.
        #[arg(long, default_value_t = 4, requires = "data")]
        count: usize,
        /// With --data: cpu, cuda (the whole loop on the GPU, bf16; either sampler), or emu (the
        /// same on the emulator: slow, a functional check).
        #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "emu"], requires = "data")]
        device: String,
        /// One prompt ...
        #[arg(long, conflicts_with = "prompts")]
        prompt: Option<String>,
        /// ... or a file with one prompt per line, or `eval:N` for the fixed evaluation set with N prompts per task.
        #[arg(long)]
        prompts: Option<String>,
        /// Images per prompt.
        #[arg(long, default_value_t = 1)]
        per_prompt: usize,
        /// Steps (default: 40 for a teacher, K for a distilled generator).
        #[arg(long)]
        steps: Option<usize>,
        /// CFG weight (default: 1.5 for a Shapes teacher, 4.5 for an SD3-family one, 1 = none for
        /// a distilled generator).
        #[arg(long)]
        cfg: Option<f32>,
        /// Sigma-schedule shift (default: the model's own: shapes.json, advdmd.json, else 3).
        #[arg(long)]
        shift: Option<f64>,
        /// euler (the ODE step), or sde (DMD2's multistep sampler: each step's clean prediction
        /// re-noised to the next σ with fresh noise).
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
        /// Scenes per task (at most 1,000,000).
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
        n: u64,
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
    /// Performance figures: CPU kernels, MMDiT forward/backward, a K-step sample, one AdvDMD
    /// iteration (`--json` for one JSON object).
    Bench {
        #[command(subcommand)]
        what: advdmd::bench::BenchCommand,
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
    advdmd::kernels::attention::dev::check_variant_env().map_err(anyhow::Error::msg)?;
    advdmd::device::kernel::streams_env().map_err(anyhow::Error::msg)?;
    advdmd::device::kernel::pdl_env().map_err(anyhow::Error::msg)?;
    for var in [
        "ADVDMD_ATTN_NO_HOPPER",
        "ADVDMD_GEMM_AUTOTUNE",
        "ADVDMD_CUDA_SYNC",
    ] {
        advdmd::device::kernel::env_flag(var).map_err(anyhow::Error::msg)?;
    }
    advdmd::device::emu_memory::guard_env().map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Info { json } => {
            let info = advdmd::info::gather();
            emit(json, &info.to_json(), || info.to_text())?;
        }
        Command::Inspect { checkpoint, json } => {
            if checkpoint
                .join(advdmd::data::latents::UNCOND_FILE)
                .is_file()
            {
                let data = advdmd::data::latents::LatentData::open(&checkpoint)?;
                return emit(json, &data.describe(), || data.describe_text());
            }
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
            data,
            count,
            device,
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
            match (data, checkpoint) {
                (Some(data), Some(checkpoint)) => {
                    cli::sample_checkpoint(&checkpoint, &data, count, &device, &opts, &out)?
                }
                (_, checkpoint) => cli::sample(checkpoint, prompt, prompts, &opts, &out)?,
            }
        }
        Command::Distill {
            out,
            teacher,
            data,
            resume,
            fork_from,
            iterations,
            checkpoint_every,
            samples,
            steps_per_sample,
            no_rl,
            disc_states,
            frozen_disc_after,
            rho,
            w_real,
            lambda_dmd,
            lambda_gan,
            lambda_d,
            lambda_rl,
            r_dmd,
            r_rl,
            rl_warmup,
            device,
            bf16_moments,
            checkpoint_activations,
            graph,
            prompts,
            group,
            lr,
            lr_warmup,
            seed,
            eval_per_task,
        } => {
            let device = cli::distill_device(&device, bf16_moments, checkpoint_activations, graph)?;
            let config = AdvDmdConfig {
                steps_per_sample: steps_per_sample as usize,
                rho,
                prompts,
                group,
                w_real: w_real.unwrap_or(if data.is_some() { 4.5 } else { 3.0 }),
                lambda_dmd,
                lambda_gan,
                lambda_d,
                lambda_rl,
                r_dmd,
                r_rl,
                rl_warmup,
                rl: !no_rl,
                disc_states: if disc_states == "final" {
                    DiscStates::Final
                } else {
                    DiscStates::Trajectory
                },
                lr_generator: lr,
                lr_fake: lr,
                lr_warmup,
                frozen_disc_after,
                seed,
                ..Default::default()
            };
            let run = DistillRun {
                config,
                iterations,
                checkpoint_every,
                device,
                samples: samples as usize,
            };
            let teacher_dir = teacher.unwrap_or_else(cli::default_teacher);
            let bar = cli::progress_bar(iterations, "distill");
            let start = std::time::Instant::now();
            let start_from = match (resume, fork_from) {
                (true, _) => Start::Resume,
                (false, Some(dir)) => Start::ForkFrom(dir),
                (false, None) => Start::Fresh,
            };
            let show = |m: &advdmd::train::advdmd::IterMetrics| {
                bar.set_position(m.iteration);
                bar.set_message(format!(
                    "fake {:.3} D {:.3} acc r/f {:.2}/{:.2} |g_dmd| {:.2} reward {:.2}",
                    m.fake_loss,
                    m.d_loss,
                    m.d_acc_real,
                    m.d_acc_fake,
                    m.dmd_grad_norm,
                    m.mean_reward
                ));
            };
            if let Some(data) = data {
                let done = distill_latents(&run, &teacher_dir, &data, &out, &start_from, show)?;
                bar.finish();
                eprintln!(
                    "done: {done} iterations in {:.1} min; EMA generator in {}",
                    start.elapsed().as_secs_f64() / 60.0,
                    out.join("model").display()
                );
                return Ok(());
            }
            let state = distill(&run, &teacher_dir, &out, &start_from, show)
                .map_err(|e| cli::shapes_teacher_hint(e, &teacher_dir))?;
            bar.finish();
            eprintln!(
                "done: {} iterations in {:.1} min; EMA generator in {}",
                state.iteration,
                start.elapsed().as_secs_f64() / 60.0,
                out.join("model").display()
            );
            if eval_per_task > 0 {
                let eval_per_task = eval_per_task as usize;
                let student = distilled_model(&state);
                let g = evaluate_model(&student, eval_per_task, None, None)?;
                let t = evaluate_model(&state.teacher, eval_per_task, None, None)?;
                crate::out(&format!(
                    "EMA generator, {} steps:\n{}\nteacher, 40 steps, CFG 1.5:\n{}",
                    steps_per_sample,
                    g.to_text(),
                    t.to_text()
                ))?;
            }
        }
        Command::Dataset { out, n, task, seed } => {
            let task = task
                .map(|t| advdmd::data::shapes::Task::parse(&t))
                .transpose()?;
            let written = advdmd::data::shapes::write_dataset(&out, n as usize, task, seed)?;
            eprintln!("wrote {written} scenes to {}", out.display());
        }
        Command::Eval { dir, json, seed } => {
            let report = advdmd::eval::evaluate_folder(&dir, seed)?;
            emit(json, &report.to_json(), || report.to_text())?;
        }
        Command::Bench { what } => {
            let report = advdmd::bench::run(&what, &cli::default_teacher())?;
            emit(what.json(), &report.to_json(), || report.to_text())?;
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

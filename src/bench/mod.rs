//! `advdmd bench`: the engine's performance figures, as a table or one JSON object (issue 8).
//!
//! * `kernels` — each CPU kernel family's GB/s (TFLOP/s for attention) beside a memcpy (GEMM)
//!   ceiling measured in the same run;
//! * `mmdit` — forward and forward+backward of a random-weight MMDiT preset: ms, TFLOP/s from the
//!   analytic FLOP count (`flops`), the ratio to a measured GEMM ceiling, peak memory;
//! * `sample` — end-to-end latency of a K-step Euler sample;
//! * `step` — one AdvDMD iteration of the Shapes trainer, per kind of iteration.
//!
//! This module owns the presets (`presets`, also used by `benches/mmdit.rs`), the FLOP count, the
//! measuring (`measure`) and the report; `main.rs` only parses the flags defined here. Every
//! bench takes `--device cpu|cuda|emu`; `mmdit` and `sample` run the device model path
//! (`mmdit::device`, `flow::device`) on a GPU or the emulator, the others say that their device
//! side is not built yet.

pub mod flops;
mod kernels;
pub mod kernels_device;
pub mod measure;
mod mmdit;
pub mod presets;
pub mod profile;
pub mod report;
mod sample;
mod step;

use crate::error::{Error, Result};
use crate::mmdit::device::Checkpointing;
use crate::train::advdmd::AdvDmdConfig;
pub use presets::{ModelSpec, Preset};
pub use report::Report;
use std::path::Path;

/// Where a bench runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchDevice {
    Cpu,
    Cuda,
    /// The CPU SIMT emulator running the CUDA model path (its times say nothing about a GPU; it
    /// exercises the path where there is none).
    Emu,
}

impl BenchDevice {
    pub fn name(self) -> &'static str {
        match self {
            BenchDevice::Cpu => "cpu",
            BenchDevice::Cuda => "cuda",
            BenchDevice::Emu => "emu",
        }
    }
}

impl std::str::FromStr for BenchDevice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<BenchDevice, String> {
        match s {
            "cpu" => Ok(BenchDevice::Cpu),
            "cuda" => Ok(BenchDevice::Cuda),
            "emu" => Ok(BenchDevice::Emu),
            _ => Err(format!("unknown device `{s}` (expected cpu, cuda or emu)")),
        }
    }
}

/// Flags every bench takes.
#[derive(Clone, Debug, clap::Args)]
pub struct CommonArgs {
    /// cpu; cuda (the device path: the CUDA kernels, the bf16 model, the AdvDMD iteration); emu
    /// (the same path on the CPU SIMT emulator: a functional check, not a speed figure).
    #[arg(long, default_value = "cpu")]
    pub device: BenchDevice,
    /// Timed repetitions, after one untimed warm-up run; figures are their median.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// After the timed runs, time every op of one more run (each kernel, each GEMM shape) and
    /// add where the time goes to the report (`--device cuda|emu`; mmdit, sample, step).
    #[arg(long)]
    pub profile: bool,
}

impl CommonArgs {
    /// The checks every bench shares; `what` names the subcommand in messages.
    fn check(&self, what: &str) -> Result<()> {
        if self.iters == 0 {
            return Err(Error::Invalid(format!(
                "bench {what}: --iters must be at least 1"
            )));
        }
        if self.profile && (what == "kernels" || matches!(self.device, BenchDevice::Cpu)) {
            return Err(Error::Invalid(format!(
                "bench {what}: --profile times the device path's ops: bench mmdit, sample or step \
                 with --device cuda or emu"
            )));
        }
        Ok(())
    }
}

/// The kernel device a model bench runs on: `None` for the CPU backend, else the device and its
/// kind (`cuda`: the first usable GPU, or a clear error; `emu`: the SIMT emulator).
fn kernel_device(
    d: BenchDevice,
    what: &str,
) -> Result<Option<(crate::device::kernel::KernelDevice, &'static str)>> {
    use crate::device::kernel::KernelDevice;
    match d {
        BenchDevice::Cpu => Ok(None),
        BenchDevice::Emu => Ok(Some((KernelDevice::emulator(), "emu"))),
        BenchDevice::Cuda => match KernelDevice::gpu_if_available() {
            Some(dev) => Ok(Some((dev, "cuda"))),
            None => Err(Error::Invalid(format!(
                "bench {what} --device cuda: no usable CUDA GPU ({})",
                crate::device::probe_cuda()
            ))),
        },
    }
}

/// Dense bf16 tensor-core peak of the cards whose MFU the benches report, TFLOP/s (NVIDIA's
/// datasheets; H200 has the H100 SXM's compute).
pub fn bf16_peak_tflops(card: &str) -> Option<f64> {
    if card.contains("H100") && card.contains("PCIe") {
        Some(756.0)
    } else if card.contains("H100") || card.contains("H200") {
        Some(989.4)
    } else if card.contains("A100") {
        Some(312.0)
    } else {
        None
    }
}

/// The GEMM ceiling measured in the same run and each `(key, label, TFLOP/s)` as a fraction of
/// it: the CPU backend's stand-in for MFU.
fn ceiling_figures<const N: usize>(
    r: &mut Report,
    ceiling: f64,
    figures: [(&'static str, &'static str, f64); N],
) {
    r.figure(
        "gemm_ceiling_tflops",
        "measured GEMM ceiling",
        report::Cell::num(ceiling, 4),
        "TFLOP/s",
    );
    for (key, label, tf) in figures {
        r.figure(key, label, report::Cell::num(tf / ceiling, 3), "");
    }
}

/// The card's bf16 peak and each `(key, label, TFLOP/s)` as a fraction of it, on a GPU whose
/// peak is known; a note otherwise.
fn mfu_figures<const N: usize>(
    r: &mut Report,
    card: &str,
    kind: &str,
    figures: [(&'static str, &'static str, f64); N],
) {
    match bf16_peak_tflops(card).filter(|_| kind == "cuda") {
        Some(peak) => {
            r.figure(
                "bf16_peak_tflops",
                "card's dense bf16 peak",
                report::Cell::num(peak, 1),
                "TFLOP/s",
            );
            for (key, label, tf) in figures {
                r.figure(key, label, report::Cell::num(tf / peak, 3), "");
            }
        }
        None => r.note("MFU: no bf16 peak known for this device"),
    }
}

/// The model flags of `mmdit` and `sample`.
#[derive(Clone, Debug, clap::Args)]
pub struct ModelArgs {
    /// sd3.5-medium, sd3.5-large, sd3-medium (random weights), or shapes (the committed
    /// teacher's configuration).
    #[arg(long, default_value = "shapes")]
    pub model: Preset,
    /// Image side in pixels (default 512 for the SD3 presets, 16 for shapes).
    #[arg(long)]
    pub res: Option<usize>,
    /// Samples per batch: per MMDiT call (`mmdit`), images sampled together (`sample`).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
}

impl ModelArgs {
    fn check(&self, what: &str) -> Result<()> {
        if self.batch == 0 {
            return Err(Error::Invalid(format!(
                "bench {what}: --batch must be at least 1"
            )));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct KernelsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// f32 elements per buffer (the default, 2^24, is 64 MiB: far beyond any CPU cache); CPU
    /// only: the device runs the production shapes.
    #[arg(long, default_value_t = 1 << 24)]
    pub size: usize,
}

#[derive(Clone, Debug, clap::Args)]
pub struct MmditArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Activation checkpointing in forward+backward (device path only): without a value or `=full` keep
    /// each block's inputs and recompute the block; `=selective` also keeps the attention,
    /// projection and fc2 outputs, recomputing only the cheaper rest.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "full", value_enum)]
    pub checkpoint_activations: Option<Checkpointing>,
    /// The forward alone, on a frozen bf16 model (2 bytes a parameter instead of 10: SD3.5-large
    /// fits an 80 GB card); device path only.
    #[arg(long, conflicts_with = "checkpoint_activations")]
    pub forward_only: bool,
}

#[derive(Clone, Debug, clap::Args)]
pub struct SampleArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sampling steps K.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// CFG weight (1 = none, as a distilled few-step generator samples; otherwise every step
    /// runs the batch twice).
    #[arg(long, default_value_t = 1.0)]
    pub cfg: f32,
    /// On a GPU: replay the K-step loop from a CUDA graph recorded once (`flow::device::EulerPlan`),
    /// so the host's launch gaps leave the figure; the untimed warm-up records it.
    #[arg(long)]
    pub graph: bool,
    /// On a device: each step computes its own modulations (the weights read once a step), not
    /// every step's from one product a layer before the first step (the default): the A/B.
    #[arg(long)]
    pub modulation_per_step: bool,
}

#[derive(Clone, Debug, clap::Args)]
pub struct StepArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Prompts per iteration (M).
    #[arg(long, default_value_t = AdvDmdConfig::default().prompts)]
    pub prompts: usize,
    /// Samples per prompt (G).
    #[arg(long, default_value_t = AdvDmdConfig::default().group)]
    pub group: usize,
    /// Generator steps K.
    #[arg(long, default_value_t = AdvDmdConfig::default().steps_per_sample)]
    pub steps_per_sample: usize,
    /// shapes (the committed teacher), or on a kernel device also sd3.5-medium, sd3.5-large,
    /// sd3-medium (random weights and conditioning: teacher, generator and fake score).
    #[arg(long, default_value = "shapes")]
    pub model: Preset,
    /// Image side in pixels of the SD3 presets (default 512).
    #[arg(long)]
    pub res: Option<usize>,
    /// Activation checkpointing of every differentiated forward (device path only): without a value or `=full` keep
    /// each block's inputs and recompute the block; `=selective` also keeps the attention,
    /// projection and fc2 outputs, recomputing only the cheaper rest.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "full", value_enum)]
    pub checkpoint_activations: Option<Checkpointing>,
    /// Adam's moments in bf16 with stochastic rounding (device path only).
    #[arg(long)]
    pub bf16_moments: bool,
    /// Replay each kind of iteration from a CUDA graph (device path only; recorded the second
    /// time the kind runs).
    #[arg(long)]
    pub graph: bool,
    /// Time each kind as back-to-back iterations with the next one queued before this one's
    /// metrics are read, uploads through pinned memory (device path only): the device does not
    /// idle through the host's share of an iteration.
    #[arg(long)]
    pub pipeline: bool,
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// CPU kernels' GB/s (attention: TFLOP/s) beside a memcpy (GEMM) ceiling measured in the same run.
    Kernels(KernelsArgs),
    /// MMDiT forward and forward+backward (random weights): ms, TFLOP/s, ratio to a measured GEMM ceiling, peak memory.
    Mmdit(MmditArgs),
    /// End-to-end latency of a K-step Euler sample (shapes: the committed teacher).
    Sample(SampleArgs),
    /// One AdvDMD iteration on the committed Shapes teacher: ms per kind of iteration, peak memory.
    Step(StepArgs),
}

impl BenchCommand {
    pub fn json(&self) -> bool {
        self.common().json
    }

    fn common(&self) -> &CommonArgs {
        match self {
            BenchCommand::Kernels(a) => &a.common,
            BenchCommand::Mmdit(a) => &a.common,
            BenchCommand::Sample(a) => &a.common,
            BenchCommand::Step(a) => &a.common,
        }
    }
}

/// Runs one bench. `teacher` is the Shapes teacher folder (the `shapes` preset's configuration,
/// the sampler's and the trainer's model).
pub fn run(command: &BenchCommand, teacher: &Path) -> Result<Report> {
    match command {
        BenchCommand::Kernels(a) => {
            a.common.check("kernels")?;
            kernels::run(a)
        }
        BenchCommand::Mmdit(a) => {
            a.common.check("mmdit")?;
            a.model.check("mmdit")?;
            mmdit::run(a, teacher)
        }
        BenchCommand::Sample(a) => {
            a.common.check("sample")?;
            a.model.check("sample")?;
            sample::run(a, teacher)
        }
        BenchCommand::Step(a) => {
            a.common.check("step")?;
            step::run(a, teacher)
        }
    }
}

/// The parameters every report lists.
fn common_parameters(c: &CommonArgs) -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("device", c.device.name().into()),
        // the kernel devices' streams (ADVDMD_STREAMS): the text tokens' work on a second one
        (
            "streams",
            crate::device::kernel::streams_env().unwrap_or(2).into(),
        ),
        ("iters", c.iters.into()),
        ("warmup", measure::WARMUP.into()),
    ]
}

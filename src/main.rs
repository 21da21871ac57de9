//! The `advdmd` command line: parse, call the library, report errors in one line.

use advdmd::mmdit::checkpoint::{convert, Layout, MmditCheckpoint};
use advdmd::tensor::StoredDType;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
            if json {
                out(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&info.to_json())?
                ))?;
            } else {
                out(&info.to_text())?;
            }
        }
        Command::Inspect { checkpoint, json } => {
            let ckpt = MmditCheckpoint::open(&checkpoint)?;
            if json {
                out(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&ckpt.describe_json())?
                ))?;
            } else {
                for n in &ckpt.notes {
                    eprintln!("info: {n}");
                }
                out(&ckpt.describe())?;
            }
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

/// Writes to stdout; a closed pipe (`advdmd inspect X | head`) ends the output quietly.
fn out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

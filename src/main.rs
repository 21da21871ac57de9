//! The `advdmd` command line: parse, call the library, report errors in one line.

use clap::{Parser, Subcommand};

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
                println!("{}", serde_json::to_string_pretty(&info.to_json())?);
            } else {
                print!("{}", info.to_text());
            }
        }
    }
    Ok(())
}

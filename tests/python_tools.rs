//! tools/precompute.py and tools/decode.py run end to end on the CPU with a tiny random
//! SD3.5-family diffusers pipeline (tests/tools/tiny_sd3.py): a trainer's whole path from
//! captioned images to the decoded samples of a distilled generator, with the pipeline's own
//! transformer folder as the teacher. tests/tools/check_tools.py holds the written files against
//! the pipeline's components called directly.
//!
//! Needs torch, diffusers and transformers in `ADVDMD_TORCH_PYTHON`
//! (`tools/install-python-tools.sh --torch` prints one); without them each test says so and
//! returns, unless `ADVDMD_REQUIRE_TORCH_TOOLS=1` (CI) makes that a failure.

mod common;

use advdmd::data::latents::LatentData;
use advdmd::mmdit::MmditCheckpoint;
use common::ScratchDir;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn torch_python(test: &str) -> Option<String> {
    let python = std::env::var("ADVDMD_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args([
            "-c",
            "import torch, diffusers, transformers, PIL, safetensors",
        ])
        .output();
    if probe.is_ok_and(|o| o.status.success()) {
        return Some(python);
    }
    let required = std::env::var("ADVDMD_REQUIRE_TORCH_TOOLS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{python} cannot import torch, diffusers and transformers"
    );
    eprintln!(
        "{test}: not run: {python} lacks torch, diffusers or transformers \
         (`tools/install-python-tools.sh --torch` prints a python that has them: set ADVDMD_TORCH_PYTHON)"
    );
    None
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Runs a Python script offline, its Hugging Face cache in the scratch folder; fails the test
/// with the script's output when it fails.
fn python(py: &str, scratch: &Path, script: &str, args: &[&Path], flags: &[&str]) -> String {
    let out = Command::new(py)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", scratch.join("hf-home"))
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("DIFFUSERS_VERBOSITY", "error")
        .arg(repo(script))
        .args(args)
        .args(flags)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `advdmd ARGS` then each (flag, path) pair (an empty flag: the path alone, positional).
fn advdmd(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_advdmd"));
    cmd.args(args);
    for (flag, path) in paths {
        if !flag.is_empty() {
            cmd.arg(flag);
        }
        cmd.arg(path);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "advdmd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The tiny pipeline and its images (tiny_sd3.py), in `dir`.
struct Tiny {
    py: String,
    dir: ScratchDir,
    pipe: PathBuf,
    images: PathBuf,
}

impl Tiny {
    fn new(test: &str) -> Option<Tiny> {
        let py = torch_python(test)?;
        let dir = ScratchDir::new(test);
        let (pipe, images) = (dir.join("pipe"), dir.join("images"));
        python(&py, &dir, "tests/tools/tiny_sd3.py", &[&pipe, &images], &[]);
        Some(Tiny {
            py,
            dir,
            pipe,
            images,
        })
    }

    /// precompute.py at 64 px on the CPU: 5 images in shards of 2, text-encoder batches of 2, 8 T5
    /// tokens; its output.
    fn precompute(&self, out: &Path, flags: &[&str]) -> String {
        let mut all = vec![
            "--resolution",
            "64",
            "--shard-size",
            "2",
            "--batch",
            "2",
            "--max-sequence-length",
            "8",
            "--dtype",
            "f32",
            "--device",
            "cpu",
        ];
        all.extend_from_slice(flags);
        python(
            &self.py,
            &self.dir,
            "tools/precompute.py",
            &[
                Path::new("--model"),
                &self.pipe,
                Path::new("--images"),
                &self.images,
                Path::new("--out"),
                out,
            ],
            &all,
        )
    }

    fn decode(&self, latents: &Path, out: &Path) {
        python(
            &self.py,
            &self.dir,
            "tools/decode.py",
            &[
                Path::new("--model"),
                &self.pipe,
                Path::new("--latents"),
                latents,
                Path::new("--out"),
                out,
            ],
            &["--device", "cpu"],
        );
    }

    /// check_tools.py MODE on `folders` (its `ok:` lines).
    fn check(&self, mode: &str, folders: &[&Path]) -> String {
        let mut args = vec![Path::new(mode), &self.pipe, &self.images];
        args.extend_from_slice(folders);
        let said = python(
            &self.py,
            &self.dir,
            "tests/tools/check_tools.py",
            &args,
            &[],
        );
        said.lines()
            .filter(|l| l.starts_with("ok:"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn shard_bytes(data: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// What precompute.py writes is what the pipeline computes and what the reader reads; captions
/// from a JSON-lines file give the same bytes as captions beside the images; a resumed run
/// (a shard deleted) writes that shard again byte for byte, the posterior's draws included; bf16
/// embeddings read as the f32 ones to bf16's precision.
#[test]
fn precompute_py_writes_the_pipelines_latents_and_embeddings() {
    let Some(tiny) = Tiny::new("precompute-py-pipeline") else {
        return;
    };
    let data = tiny.dir.join("data");
    let said = tiny.precompute(&data, &[]);
    assert!(said.contains("5 samples in 3 shards"), "{said}");
    let checked = tiny.check("precompute", &[&data]);
    eprintln!("{checked}");
    assert_eq!(checked.lines().count(), 6, "{checked}");

    let read = LatentData::open(&data).unwrap();
    assert_eq!(
        (read.len(), read.latent_shape, read.context_shape),
        (5, [4, 8, 8], [16, 24])
    );
    assert_eq!(read.caption(4), Some("three small dots, left"));
    let inspect = advdmd(&["inspect", data.to_str().unwrap()], &[]);
    let inspect = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.contains("samples: 5 in 3 shards"), "{inspect}");

    let listed = tiny.dir.join("data-jsonl");
    let captions = tiny.images.join("captions.jsonl");
    tiny.precompute(&listed, &["--captions", captions.to_str().unwrap()]);
    assert!(shard_bytes(&data) == shard_bytes(&listed));

    let sampled = tiny.dir.join("data-sampled");
    let bf16 = ["--vae-sample", "--seed", "5", "--dtype", "bf16"];
    tiny.precompute(&sampled, &bf16);
    let first = shard_bytes(&sampled);
    assert!(first != shard_bytes(&data), "--vae-sample drew nothing");
    std::fs::remove_file(sampled.join("shard-00001.safetensors")).unwrap();
    let said = tiny.precompute(&sampled, &bf16);
    assert!(
        said.contains("shard-00000.safetensors: exists, skipped"),
        "{said}"
    );
    // bf16 embeddings (precompute's default: the encoders compute in bf16 too) read as the f32
    // ones to bf16's precision (measured: context 5.4e-3, pooled 1.4e-2)
    let (a, b) = (LatentData::open(&sampled).unwrap(), read);
    let (ra, rb) = (a.rows(&[0, 4]).unwrap(), b.rows(&[0, 4]).unwrap());
    assert!(ra.context.rel_l2(&rb.context) < 3e-2 && ra.pooled.rel_l2(&rb.pooled) < 3e-2);
    assert!(
        ra.latents.rel_l2(&rb.latents) > 1e-3,
        "--vae-sample gave the mean"
    );
    assert!(
        shard_bytes(&sampled) == first,
        "a resumed run drew other latents"
    );
}

/// The trainer's path: precompute, distil the pipeline's own transformer folder on the emulator
/// (its original-layout conversion loads in diffusers' single-file loader too),
/// load the exported generator in diffusers (every key, the teacher's configuration, the
/// generator's sigmas through `diffusers_sigmas`), sample it, decode its latents to PNGs. The
/// CPU samples of the generator and of the teacher (4 steps, CFG 4.5) are what diffusers'
/// StableDiffusion3Pipeline samples from the same noise and embeddings; decode.py inverts
/// precompute.py's normalisation (a data shard decodes to the VAE's reconstruction).
#[test]
fn precomputed_data_distils_and_decodes() {
    let Some(tiny) = Tiny::new("python-tools-distill") else {
        return;
    };
    let data = tiny.dir.join("data");
    tiny.precompute(&data, &[]);
    let shard_png = tiny.dir.join("shard-png");
    tiny.decode(&data.join("shard-00000.safetensors"), &shard_png);
    let checked = tiny.check("decode", &[&shard_png]);
    assert!(checked.contains("2 decoded images"), "{checked}");

    let single = tiny.dir.join("transformer.safetensors");
    let transformer = tiny.pipe.join("transformer");
    advdmd(
        &["convert", "--layout", "original"],
        &[("", &transformer), ("", &single)],
    );
    let checked = tiny.check("single-file", &[&single]);
    assert!(checked.contains("loads with from_single_file"), "{checked}");

    let run = tiny.dir.join("run");
    advdmd(
        &[
            &["distill", "--device", "emu"][..],
            &common::TINY_RUN_FLAGS,
            &[
                "--iterations",
                "2",
                "--checkpoint-every",
                "2",
                "--samples",
                "2",
            ],
        ]
        .concat(),
        &[
            ("--teacher", &tiny.pipe.join("transformer")),
            ("--data", &data),
            ("--out", &run),
        ],
    );
    let checked = tiny.check("model", &[&run.join("model")]);
    assert!(checked.contains("samples with it"), "{checked}");
    let samples = tiny.dir.join("samples");
    advdmd(
        &["sample", "--count", "3"],
        &[
            ("--checkpoint", &run.join("model")),
            ("--data", &data),
            ("--out", &samples),
        ],
    );
    let checked = tiny.check("replay", &[&samples, &data]);
    assert!(checked.contains("3 samples of model (2 steps"), "{checked}");
    let teacher_samples = tiny.dir.join("teacher-samples");
    advdmd(
        &["sample", "--count", "2", "--steps", "4"],
        &[
            ("--checkpoint", &tiny.pipe.join("transformer")),
            ("--data", &data),
            ("--out", &teacher_samples),
        ],
    );
    let checked = tiny.check("replay", &[&teacher_samples, &data]);
    assert!(checked.contains("(4 steps, cfg 4.5)"), "{checked}");
    eprintln!("{checked}");
    let png = tiny.dir.join("png");
    tiny.decode(&samples.join("latents.safetensors"), &png);
    let manifest = std::fs::read_to_string(png.join("manifest.jsonl")).unwrap();
    let captions: Vec<String> = manifest
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["caption"].to_string())
        .collect();
    assert_eq!(
        captions,
        [
            "\"a red circle\"",
            "\"two blue squares\"",
            "\"a green triangle above a square\""
        ]
    );
    for i in 0..3 {
        let file = std::fs::File::open(png.join(format!("{i:05}.png"))).unwrap();
        let reader = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .unwrap();
        assert_eq!((reader.info().width, reader.info().height), (64, 64));
    }
    let in_training = run.join("samples/iter-0000002/latents.safetensors");
    tiny.decode(&in_training, &tiny.dir.join("png-in-training"));
    assert!(tiny.dir.join("png-in-training/00001.png").is_file());
}

/// The CPU MMDiT against diffusers (float64, the pinned version) on the SD3-family blocks the
/// shared fixture does not hold: SD3-medium's (no q/k norm, no MMDiT-X block; a 6 × 10 latent
/// cropped from a larger position table) and SD3.5-large's (RMS q/k norms, no MMDiT-X block),
/// written by tests/tools/make_mmdit_fixture.py; each original layout is `advdmd convert`'s. And
/// diffusers' sharded save of each (shards + index, as large models ship) reads as the one file.
#[test]
fn the_mmdit_matches_diffusers_on_sd3_medium_and_sd35_large_blocks() {
    let Some(py) = torch_python("mmdit-diffusers-fixtures") else {
        return;
    };
    let dir = ScratchDir::new("mmdit-diffusers-fixtures");
    python(
        &py,
        &dir,
        "tests/tools/make_mmdit_fixture.py",
        &[dir.path()],
        &[],
    );
    let mut failures = Vec::new();
    for name in ["sd3m_tiny", "sd35l_tiny"] {
        let fixture = dir.join(name);
        let (from, to) = (
            fixture.join("diffusers.safetensors"),
            fixture.join("original.safetensors"),
        );
        advdmd(
            &["convert", "--layout", "original"],
            &[("", &from), ("", &to)],
        );
        failures.extend(common::parity::check_fixture(&fixture));
        // diffusers' own sharded save of the same weights reads as the single file
        let sharded = MmditCheckpoint::open(fixture.join("sharded")).unwrap();
        let single = MmditCheckpoint::open(&from).unwrap();
        let shards = std::fs::read_dir(fixture.join("sharded"))
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(".safetensors")
            })
            .count();
        assert!(shards > 2, "{name}: {shards} shards");
        assert_eq!(sharded.config, single.config);
        assert_eq!(sharded.sample_size, Some(8));
        for (param, shape) in single.config.param_shapes() {
            let (a, b) = (sharded.load(&param).unwrap(), single.load(&param).unwrap());
            assert_eq!(
                (a.shape(), a.f32s()),
                (&shape[..], b.f32s()),
                "{name}: {param}"
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

//! `advdmd distill --teacher CHECKPOINT --data DIR`: an SD3-family checkpoint (the tiny
//! SD3.5-medium fixture: original layout, QK norm, MMDiT-X blocks) distilled on the emulator from
//! precomputed latents and prompt embeddings. A run interrupted and resumed ends byte for byte as
//! the uninterrupted one, its generator comes out in the teacher's layout, misuse is an error that
//! says what to do, and the device's own checkpoint is the CPU trainer's format.

mod common;

use advdmd::data::latents::{write_shard, write_uncond, LatentData, LatentRows};
use advdmd::device::kernel::KernelDevice;
use advdmd::mmdit::{save_mmdit, Layout, MmditCheckpoint, ParamSource};
use advdmd::tensor::StoredDType;
use advdmd::tensor::{Rng, Tensor};
use advdmd::train::advdmd::{AdvDmd, AdvDmdConfig};
use advdmd::train::advdmd_device::{shapes_batch, DeviceAdvDmd, DeviceRunOptions};
use common::ScratchDir;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture_teacher() -> PathBuf {
    common::fixture_dirs()[0].join("original.safetensors")
}

fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.normal()).collect(), shape)
}

/// Five samples in two shards (the second stored bf16) for a model of `ctx`/`pooled` widths and
/// `channels` latent channels, with the empty prompt's embeddings.
fn write_data(dir: &Path, channels: usize, ctx: usize, pooled: usize) {
    let mut rng = Rng::new(11);
    for (i, rows) in [3usize, 2].into_iter().enumerate() {
        let shard = LatentRows {
            latents: randn(&[rows, channels, 8, 8], &mut rng),
            context: randn(&[rows, 7, ctx], &mut rng),
            pooled: randn(&[rows, pooled], &mut rng),
        };
        let shard = if i == 1 {
            LatentRows {
                context: shard.context.to_dtype(advdmd::tensor::DType::BF16),
                ..shard
            }
        } else {
            shard
        };
        let captions: Vec<String> = (0..rows).map(|r| format!("caption {i}.{r}")).collect();
        let path = dir.join(format!("shard-{i:05}.safetensors"));
        write_shard(&path, &shard, Some(&captions)).unwrap();
    }
    write_uncond(
        dir,
        &randn(&[1, 7, ctx], &mut rng),
        &randn(&[1, pooled], &mut rng),
    )
    .unwrap();
}

fn distill(teacher: &Path, data: &Path, out: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_advdmd"))
        .arg("distill")
        .args(common::TINY_RUN_FLAGS)
        .arg("--teacher")
        .arg(teacher)
        .arg("--data")
        .arg(data)
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn succeeded(out: Output) -> Output {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn failed_with(out: Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded: {err}");
    assert!(err.contains(needle), "no `{needle}` in: {err}");
}

fn read(p: PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn a_checkpoint_teacher_distils_resumes_exactly_and_exports_its_generator() {
    let base = ScratchDir::new("distill-latents");
    let teacher = fixture_teacher();
    let config = MmditCheckpoint::open(&teacher).unwrap().config;
    let data = base.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_data(
        &data,
        config.in_channels,
        config.context_dim,
        config.pooled_dim,
    );
    assert_eq!(LatentData::open(&data).unwrap().len(), 5);
    let inspect = succeeded(
        Command::new(env!("CARGO_BIN_EXE_advdmd"))
            .arg("inspect")
            .arg(&data)
            .output()
            .unwrap(),
    );
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains("samples: 5 in 2 shards") && text.contains("caption: caption 0.0"),
        "{text}"
    );

    let (whole, parts) = (base.join("whole"), base.join("parts"));
    let emu = ["--device", "emu", "--checkpoint-every", "2"];
    succeeded(distill(
        &teacher,
        &data,
        &whole,
        &[&emu[..], &["--iterations", "4"]].concat(),
    ));
    succeeded(distill(
        &teacher,
        &data,
        &parts,
        &[&emu[..], &["--iterations", "2"]].concat(),
    ));
    let resumed = [&emu[..], &["--iterations", "4", "--resume"]].concat();
    succeeded(distill(&teacher, &data, &parts, &resumed));

    let metrics = String::from_utf8(read(whole.join("metrics.jsonl"))).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[2]["generator_step"], true);
    for key in ["fake_loss", "d_loss", "dmd_grad_norm", "gan_loss"] {
        assert!(
            lines[2][key].as_f64().unwrap().is_finite(),
            "{key}: {}",
            lines[2]
        );
    }
    assert!(lines[2]["dmd_grad_norm"].as_f64().unwrap() > 0.0);
    assert_eq!(
        metrics,
        String::from_utf8(read(parts.join("metrics.jsonl"))).unwrap()
    );
    assert!(
        read(whole.join("checkpoint.safetensors")) == read(parts.join("checkpoint.safetensors")),
        "the resumed run's checkpoint differs from the uninterrupted run's"
    );
    // each checkpoint sampled the EMA generator (4 prompts by default), the resumed run's samples
    // the same; sampling leaves the run as it was (the same checkpoint without samples)
    let samples = |run: &Path, it: u64| run.join(format!("samples/iter-{it:07}"));
    for it in [2, 4] {
        let manifest = String::from_utf8(read(samples(&whole, it).join("manifest.jsonl"))).unwrap();
        assert_eq!(manifest.lines().count(), 4, "{manifest}");
        assert!(
            manifest.contains("\"caption\":\"caption 0.0\""),
            "{manifest}"
        );
        let file = |run: &Path| read(samples(run, it).join("latents.safetensors"));
        assert!(
            file(&whole) == file(&parts),
            "iteration {it}: the resumed run samples otherwise"
        );
    }
    let quiet = base.join("quiet");
    let no_samples = [&emu[..], &["--iterations", "4", "--samples", "0"]].concat();
    succeeded(distill(&teacher, &data, &quiet, &no_samples));
    assert!(!quiet.join("samples").exists());
    assert!(
        read(whole.join("checkpoint.safetensors")) == read(quiet.join("checkpoint.safetensors")),
        "sampling at the checkpoints changed the run"
    );

    // a resume on other data is refused, the run folder left as it was
    let other = base.join("other");
    std::fs::create_dir_all(&other).unwrap();
    write_data(
        &other,
        config.in_channels,
        config.context_dim,
        config.pooled_dim,
    );
    std::fs::remove_file(other.join("shard-00001.safetensors")).unwrap();
    let before = read(parts.join("checkpoint.safetensors"));
    let longer = [&emu[..], &["--iterations", "6", "--resume"]].concat();
    failed_with(
        distill(&teacher, &other, &parts, &longer),
        "another teacher or on other data",
    );
    assert!(before == read(parts.join("checkpoint.safetensors")));

    // the EMA generator, in the teacher's (original) layout, opens as the same architecture
    // with trained weights, beside its schedule
    let model = MmditCheckpoint::open(whole.join("model")).unwrap();
    assert_eq!(model.layout, advdmd::mmdit::Layout::Original);
    assert_eq!(model.config, config);
    let name = "final_layer.linear.weight";
    let (trained, original) = (
        model.load(name).unwrap(),
        MmditCheckpoint::open(&teacher).unwrap().load(name).unwrap(),
    );
    assert!(
        trained.rel_l2(&original) > 0.0,
        "the generator did not move"
    );
    let info: serde_json::Value =
        serde_json::from_slice(&read(whole.join("model/advdmd.json"))).unwrap();
    assert_eq!(info["steps"], 2);
    assert_eq!(info["iterations"], 4);
    assert_eq!(info["sigmas"].as_array().unwrap().len(), 3);

    // the generator samples on its own 2-step schedule; batching does not change a sample
    let sample = |checkpoint: &Path, out: &Path, args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_advdmd"))
            .args([
                "sample",
                "--count",
                "2",
                "--per-prompt",
                "2",
                "--checkpoint",
            ])
            .arg(checkpoint)
            .arg("--data")
            .arg(&data)
            .args(args)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        succeeded(o);
        read(out.join("latents.safetensors"))
    };
    let (one, four) = (base.join("s1"), base.join("s4"));
    let model_dir = whole.join("model");
    // the last checkpoint's samples are what `sample` draws from the exported generator
    let exported = base.join("exported");
    let o = Command::new(env!("CARGO_BIN_EXE_advdmd"))
        .args(["sample", "--count", "4", "--device", "emu", "--checkpoint"])
        .arg(&model_dir)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&exported)
        .output()
        .unwrap();
    succeeded(o);
    let latents_of = |file: PathBuf| {
        let f = advdmd::checkpoint::SafetensorsFile::open(file).unwrap();
        f.load_f32("latents", Some(&[4, config.in_channels, 8, 8]))
            .unwrap()
    };
    let (during, after) = (
        latents_of(whole.join("samples/iter-0000004/latents.safetensors")),
        latents_of(exported.join("latents.safetensors")),
    );
    assert!(
        during.f32s() == after.f32s(),
        "the run's last samples differ from the exported generator's (rel L2 {})",
        during.rel_l2(&after)
    );
    sample(&model_dir, &one, &["--batch", "1"]);
    sample(&model_dir, &four, &["--batch", "4"]);
    let latents_in = |dir: &Path| {
        let file = advdmd::checkpoint::SafetensorsFile::open(dir.join("latents.safetensors"));
        file.unwrap()
            .load_f32("latents", Some(&[4, config.in_channels, 8, 8]))
            .unwrap()
    };
    let (latents, batched) = (latents_in(&one), latents_in(&four));
    // (a GEMM's rounding may depend on its row count: equal up to that)
    let diff = latents.rel_l2(&batched);
    assert!(
        diff < 1e-5,
        "batching changed the samples: relative L2 {diff}"
    );
    let manifest = String::from_utf8(read(one.join("manifest.jsonl"))).unwrap();
    let first: serde_json::Value = serde_json::from_str(manifest.lines().next().unwrap()).unwrap();
    assert_eq!(
        (first["steps"].clone(), first["cfg"].clone()),
        (2.into(), 1.0.into())
    );
    assert_eq!(first["caption"], "caption 0.0");
    let per = latents.numel() / 4;
    assert!(
        latents.f32s()[..per] != latents.f32s()[per..2 * per],
        "seeds did not differ"
    );
    // the teacher, on the reference schedule with CFG
    let teacher_out = base.join("teacher");
    sample(&teacher, &teacher_out, &["--steps", "3"]);
    let manifest = String::from_utf8(read(teacher_out.join("manifest.jsonl"))).unwrap();
    assert!(manifest.contains("\"cfg\":4.5"), "{manifest}");

    // the Euler loop and the re-noising one on the device (the emulator) follow the CPU's within
    // bf16 rounding, with and without CFG (the re-noising draws as the CPU's)
    for (model, args) in [
        (&model_dir, &["--batch", "4"][..]),
        (&teacher, &["--steps", "3"][..]),
    ] {
        let (mut by_sampler, mut device_diffs) = (Vec::new(), Vec::new());
        for sampler in ["euler", "sde"] {
            let (cpu, on_device) = (base.join("cpu"), base.join("device"));
            let args = [args, &["--sampler", sampler]].concat();
            sample(model, &cpu, &args);
            sample(
                model,
                &on_device,
                &[&args[..], &["--device", "emu"]].concat(),
            );
            let (on_cpu, on_device) = (latents_in(&cpu), latents_in(&on_device));
            let diff = on_device.rel_l2(&on_cpu);
            eprintln!(
                "{} ({sampler}): device vs CPU relative L2 {diff}",
                model.display()
            );
            assert!(
                diff < 2e-2,
                "{} ({sampler}): device vs CPU relative L2 {diff}",
                model.display()
            );
            by_sampler.push(on_cpu);
            device_diffs.push(diff);
        }
        // the generator's re-noising (to σ = 0.75) moves its samples far more than bf16 does:
        // the device drew the CPU's noise (measured: 0.148 apart, 0.009 device vs CPU)
        let apart = by_sampler[0].rel_l2(&by_sampler[1]);
        assert!(
            model != &model_dir || apart > 5.0 * device_diffs[1],
            "re-noising vs Euler relative L2 {apart}, device vs CPU {}",
            device_diffs[1]
        );
    }
}

#[test]
fn checkpoint_teacher_misuse_is_a_clear_error() {
    let base = ScratchDir::new("distill-latents-misuse");
    let teacher = fixture_teacher();
    let data = base.join("data");
    std::fs::create_dir_all(&data).unwrap();
    // data for another model: 16 latent channels, SD3's context width
    write_data(&data, 16, 4096, 20);
    let out = base.join("run");
    failed_with(
        distill(&teacher, &data, &out, &["--device", "emu"]),
        "not data for this model",
    );
    failed_with(distill(&teacher, &data, &out, &[]), "kernel device");
    failed_with(
        distill(&teacher, &base.join("none"), &out, &["--device", "emu"]),
        "not a folder of precomputed shards",
    );
    // a checkpoint given where a Shapes teacher is expected points at --data
    let shapes = Command::new(env!("CARGO_BIN_EXE_advdmd"))
        .args(["distill", "--teacher"])
        .arg(&teacher)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    failed_with(shapes, "--data DIR");
    // a Shapes run is evaluated at its end: --samples is for checkpoint teachers' runs
    let shapes_samples = Command::new(env!("CARGO_BIN_EXE_advdmd"))
        .args(["distill", "--samples", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    failed_with(shapes_samples, "--data");
    assert!(!out.join("checkpoint.safetensors").exists());
}

/// The device writes its checkpoint itself ([`DeviceAdvDmd::save`], streamed tensor by tensor)
/// in the CPU trainer's format: after two iterations (the discriminator frozen after the first),
/// byte for byte the file the CPU trainer writes from the device's state; read back by
/// [`DeviceAdvDmd::resume`] and saved again, the same bytes; and a master weight turned NaN is
/// refused, the file on disk left as it was.
#[test]
fn a_device_checkpoint_is_the_cpu_trainers_format() {
    let base = ScratchDir::new("device-checkpoint");
    let teacher = common::tiny_shapes_model(1, true);
    let config = AdvDmdConfig {
        prompts: 1,
        group: 2,
        steps_per_sample: 2,
        r_dmd: 1,
        rl_warmup: 0,
        frozen_disc_after: Some(1),
        ..Default::default()
    };
    let mut host = AdvDmd::new(teacher, config.clone());
    let dev = KernelDevice::emulator();
    let opts = DeviceRunOptions {
        bf16_moments: true,
        ..Default::default()
    };
    let mut run = DeviceAdvDmd::from_host(&dev, &host, opts).unwrap();
    for _ in 0..2 {
        let batch = shapes_batch(&host.teacher, 1, 2, &mut run.rng).unwrap();
        run.step(&batch).unwrap();
    }
    assert!(run.frozen_backbone.is_some());
    let device_file = base.join("device.safetensors");
    run.save(&device_file).unwrap();
    run.sync_to_host(&mut host).unwrap();
    host.save(&base.join("host.safetensors")).unwrap();
    let saved = read(device_file.clone());
    assert!(
        saved == read(base.join("host.safetensors")),
        "the device's checkpoint differs from the CPU trainer's"
    );

    let teacher = (
        &host.teacher.mmdit.config,
        &host.teacher.mmdit.params as &dyn ParamSource,
    );
    let back = DeviceAdvDmd::resume(&dev, teacher, config, opts, &device_file, false).unwrap();
    back.save(&base.join("again.safetensors")).unwrap();
    assert!(
        saved == read(base.join("again.safetensors")),
        "resume + save changed the state"
    );

    let slot = run
        .generator
        .slot("final_layer.linear.weight")
        .unwrap()
        .clone();
    let nan = [f32::NAN];
    dev.copy_to_device(&nan, &*run.generator.master.view(slot.offset, 1).unwrap())
        .unwrap();
    let err = run.save(&device_file).unwrap_err().to_string();
    assert!(
        err.contains("not saved") && err.contains("generator.final_layer"),
        "{err}"
    );
    assert!(
        read(device_file) == saved,
        "a refused save changed the file"
    );
}

/// A run started from a checkpoint file streams it to the device one tensor at a time (read once
/// for the teacher, generator and fake score; no host copy of the model): it starts exactly as
/// the CPU trainer's run of the same teacher (their checkpoints at iteration 0, byte for byte),
/// its EMA model streamed back from the device holds the file's values, and a teacher holding a
/// NaN is refused, naming the tensor.
#[test]
fn a_run_streams_its_teacher_from_the_file() {
    let base = ScratchDir::new("streamed-teacher");
    let teacher = common::tiny_shapes_model(1, true);
    let (model, file) = (&teacher.mmdit, base.join("teacher.safetensors"));
    save_mmdit(
        &model.params,
        &model.config,
        Layout::Original,
        &file,
        StoredDType::F32,
    )
    .unwrap();
    let config = AdvDmdConfig {
        prompts: 1,
        group: 2,
        steps_per_sample: 2,
        ..Default::default()
    };
    let (dev, opts) = (KernelDevice::emulator(), DeviceRunOptions::default());
    let ckpt = MmditCheckpoint::open(&file).unwrap();
    let streamed =
        DeviceAdvDmd::new(&dev, (&ckpt.config, &ckpt.finite()), config.clone(), opts).unwrap();
    streamed.save(&base.join("streamed.safetensors")).unwrap();
    let mut poisoned = model.params.duplicate();
    let host = DeviceAdvDmd::from_host(
        &dev,
        &AdvDmd::new(common::tiny_shapes_model(1, true), config.clone()),
        opts,
    );
    host.unwrap().save(&base.join("host.safetensors")).unwrap();
    assert!(
        read(base.join("streamed.safetensors")) == read(base.join("host.safetensors")),
        "a run streamed from the file starts otherwise than the CPU trainer's"
    );

    let export = base.join("export.safetensors");
    let layout = Layout::Original;
    save_mmdit(
        &streamed.ema_model(),
        &ckpt.config,
        layout,
        &export,
        StoredDType::F32,
    )
    .unwrap();
    let exported = MmditCheckpoint::open(&export).unwrap();
    for name in ckpt.config.param_shapes().keys() {
        let (a, b) = (exported.load(name).unwrap(), ckpt.load(name).unwrap());
        assert!(
            a.f32s() == b.f32s(),
            "the EMA model at iteration 0 differs in {name}"
        );
    }

    let name = "joint_blocks.0.x_block.mlp.fc1.weight";
    let mut values = poisoned.param(name).value().to_vec();
    values[3] = f32::NAN;
    let shape = poisoned.param(name).value().shape().to_vec();
    poisoned.insert(name, Tensor::from_vec(values, &shape));
    let bad = base.join("bad.safetensors");
    save_mmdit(&poisoned, &model.config, layout, &bad, StoredDType::F32).unwrap();
    let ckpt = MmditCheckpoint::open(&bad).unwrap();
    let err = DeviceAdvDmd::new(&dev, (&ckpt.config, &ckpt.finite()), config, opts)
        .err()
        .expect("a NaN teacher was accepted")
        .to_string();
    assert!(err.contains(name), "{err}");
}

/// tools/precompute.py's shard writer and the reader agree: shapes, dtypes (f16 widened), values,
/// captions; the writer refuses disagreeing row counts. Needs numpy and safetensors in
/// `ADVDMD_PYTHON` (tools/install-python-tools.sh; CI sets ADVDMD_REQUIRE_PYTHON_TOOLS=1).
#[test]
fn precompute_py_shards_are_what_the_reader_reads() {
    let python = std::env::var("ADVDMD_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import numpy, safetensors"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        let required = std::env::var("ADVDMD_REQUIRE_PYTHON_TOOLS").is_ok_and(|v| v == "1");
        assert!(!required, "{python} cannot import numpy and safetensors");
        eprintln!(
            "precompute.py's writer not tested: {python} lacks numpy or safetensors \
             (tools/install-python-tools.sh prints a python that has them: set ADVDMD_PYTHON)"
        );
        return;
    }
    let dir = ScratchDir::new("precompute-py");
    let script = r#"
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import precompute
out = sys.argv[2]
n, C, H, W, L, D, P = 3, 4, 8, 6, 5, 12, 7
lat = (np.arange(n * C * H * W, dtype=np.float32) * 0.25).reshape(n, C, H, W)
ctx = ((np.arange(n * L * D) % 97) * 0.5).astype(np.float16).reshape(n, L, D)
pooled = -np.arange(n * P, dtype=np.float32).reshape(n, P)
precompute.write_shard(f"{out}/shard-00000.safetensors", lat, ctx, pooled, ["a", "b", "c"])
precompute.write_uncond(out, np.ones((1, L, D), np.float32), np.zeros((1, P), np.float32))
try:
    precompute.write_shard(f"{out}/shard-00001.safetensors", lat, ctx[:2], pooled, None)
except ValueError:
    print("refused")
"#;
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools");
    let out = Command::new(&python)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args(["-c", script])
        .arg(&tools)
        .arg(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.trim() == "refused",
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = LatentData::open(dir.path()).unwrap();
    assert_eq!(
        (data.len(), data.latent_shape, data.context_shape),
        (3, [4, 8, 6], [5, 12])
    );
    assert_eq!(data.caption(2), Some("c"));
    let rows = data.rows(&[2]).unwrap();
    let (per, ctx, pooled) = (4 * 8 * 6, 5 * 12, 7);
    let want = |n: usize, f: &dyn Fn(usize) -> f32| (0..n).map(f).collect::<Vec<f32>>();
    assert_eq!(
        rows.latents.f32s(),
        want(per, &|j| (2 * per + j) as f32 * 0.25)
    );
    assert_eq!(
        rows.context.f32s(),
        want(ctx, &|j| ((2 * ctx + j) % 97) as f32 * 0.5)
    );
    assert_eq!(
        rows.pooled.f32s(),
        want(pooled, &|j| -((2 * pooled + j) as f32))
    );
    let (uc, up) = data.uncond(1);
    assert!(uc.f32s().iter().all(|&v| v == 1.0) && up.f32s().iter().all(|&v| v == 0.0));
}

//! `advdmd bench`: the FLOP count against an explicit count of the products, each subcommand's
//! JSON at tiny settings (figures positive and finite, FLOPs as counted), and bad input as clean
//! errors. Timings are only checked to be positive: the machine may be busy.

use advdmd::bench::flops::{mmdit_forward_flops, CallShape};
use advdmd::bench::presets::{ModelSpec, Preset};
use advdmd::mmdit::MmditConfig;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn teacher() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/shapes-teacher")
}

fn advdmd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_advdmd"))
        .args(args)
        .env_remove("ADVDMD_TEACHER")
        .output()
        .expect("running advdmd")
}

/// Runs a bench with `--json` and returns its report.
fn bench_json(args: &[&str]) -> Value {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = advdmd(&all);
    assert!(
        out.status.success(),
        "advdmd {all:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn positive(v: &Value, key: &str) -> f64 {
    let x = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {v}"));
    assert!(x.is_finite() && x > 0.0, "`{key}` = {x}");
    x
}

fn check_device(report: &Value) {
    assert_eq!(report["device"]["kind"], "cpu");
    assert!(report["device"]["threads"].as_u64().unwrap() >= 1);
    assert!(!report["device"]["cpu_model"].as_str().unwrap().is_empty());
}

fn tiny_config() -> MmditConfig {
    MmditConfig {
        depth: 2,
        hidden: 8,
        heads: 2,
        head_dim: 4,
        patch: 2,
        in_channels: 1,
        out_channels: 1,
        pos_embed_max_size: 4,
        context_dim: 4,
        pooled_dim: 4,
        freq_dim: 4,
        mlp_hidden: 16,
        qk_norm: true,
        dual_attention_blocks: vec![0],
    }
}

/// The products counted from the parameter list instead of the architecture: every weight
/// matrix multiplies each row of the stream it acts on once (2 FLOPs per weight per row), plus
/// the attention products, `4·B·H·L²·d` per attention over L tokens.
fn count_from_parameters(c: &MmditConfig, s: CallShape) -> u64 {
    let (b, n, l) = (s.batch as u64, s.image_tokens as u64, s.text_tokens as u64);
    let mut total = 0u64;
    for (name, shape) in c.param_shapes() {
        if !name.ends_with(".weight") || shape.len() < 2 {
            continue; // biases, QK-norm weights, the position grid
        }
        let rows = if name.contains("adaLN_modulation")
            || name.starts_with("t_embedder")
            || name.starts_with("y_embedder")
        {
            b
        } else if name.starts_with("context") || name.contains("context_block") {
            b * l
        } else {
            assert!(
                name.starts_with("x_embedder")
                    || name.contains("x_block")
                    || name.starts_with("final_layer"),
                "{name}"
            );
            b * n
        };
        total += 2 * rows * shape.iter().product::<usize>() as u64;
    }
    let hd = (c.heads * c.head_dim) as u64;
    total += c.depth as u64 * 4 * b * hd * (n + l) * (n + l);
    total += c.dual_attention_blocks.len() as u64 * 4 * b * hd * n * n;
    total
}

#[test]
fn flop_count_of_a_tiny_model_by_hand() {
    // B = 1, 4×4 input → 4 tokens (n), 2 text tokens (l), D = 8, F = 16, H·d = 8.
    let embeddings = 2 * 4 * 4 * 8 // patch: n × (C·p² = 4) × D
        + 2 * (4 * 8 + 8 * 8) * 2 // timestep and pooled MLPs
        + 2 * 2 * 4 * 8; // context embedder
    let block0 = 2 * 8 * (9 + 6) * 8 // adaLN: 9 chunks (dual) + 6
        + 2 * 4 * (4 * 64 + 2 * 8 * 16) // x: qkv + proj + MLP
        + 2 * 2 * (4 * 64 + 2 * 8 * 16) // context: qkv + proj + MLP
        + 4 * 8 * 6 * 6 // joint attention over 6 tokens
        + 2 * 4 * 4 * 64 + 4 * 8 * 4 * 4; // attn2: qkv + proj, image-only attention
    let block1 = 2 * 8 * (6 + 2) * 8 // last block: context adaLN has 2 chunks
        + 2 * 4 * (4 * 64 + 2 * 8 * 16)
        + 2 * 2 * 3 * 64 // context: qkv only (pre-only)
        + 4 * 8 * 6 * 6;
    let final_layer = 2 * 8 * 2 * 8 + 2 * 4 * 8 * 4;
    let by_hand: u64 = embeddings + block0 + block1 + final_layer;
    assert_eq!(by_hand, 20096);
    let shape = CallShape {
        batch: 1,
        image_tokens: 4,
        text_tokens: 2,
    };
    assert_eq!(mmdit_forward_flops(&tiny_config(), shape), by_hand);
    assert_eq!(count_from_parameters(&tiny_config(), shape), by_hand);
}

#[test]
fn flop_count_matches_the_parameter_count_for_every_preset() {
    let shape = CallShape {
        batch: 3,
        image_tokens: 1024,
        text_tokens: 333,
    };
    for preset in Preset::ALL {
        let spec = ModelSpec::new(preset, None, &teacher()).unwrap();
        assert_eq!(
            mmdit_forward_flops(&spec.config, shape),
            count_from_parameters(&spec.config, shape),
            "{}",
            preset.name()
        );
    }
    // SD3-medium at 512 px against the convention PERF.md quotes (verl-omni's diffusion MFU):
    // forward = 2·(L·12·D²)·T + 4·L·D·T² over T = image + text tokens. It leaves out the
    // embedders, adaLN and the last block's missing context MLP, so agreement is within 2 %.
    let spec = ModelSpec::new(Preset::Sd3Medium, Some(512), &teacher()).unwrap();
    assert_eq!((spec.image_tokens(), spec.text_tokens), (1024, 333));
    let (l, d, t) = (24.0, 1536.0, 1357.0);
    let convention = 2.0 * l * 12.0 * d * d * t + 4.0 * l * d * t * t;
    let ours = mmdit_forward_flops(&spec.config, spec.call_shape(1)) as f64;
    assert!(
        (ours / convention - 1.0).abs() < 0.02,
        "{ours:e} vs {convention:e}"
    );
}

#[test]
fn mmdit_json_on_the_shapes_config() {
    let r = bench_json(&["mmdit", "--model", "shapes", "--batch", "2", "--iters", "1"]);
    check_device(&r);
    assert_eq!(r["command"], "mmdit");
    assert_eq!(r["parameters"]["batch"], 2);
    assert_eq!(r["parameters"]["model"], "shapes");
    let res = &r["results"];
    for key in [
        "forward_ms",
        "forward_backward_ms",
        "forward_tflops",
        "forward_backward_tflops",
        "gemm_ceiling_tflops",
        "forward_ceiling_ratio",
        "forward_backward_ceiling_ratio",
        "weights_bytes",
        "peak_memory_bytes",
    ] {
        positive(res, key);
    }
    let spec = ModelSpec::new(Preset::Shapes, None, &teacher()).unwrap();
    let expected = mmdit_forward_flops(&spec.config, spec.call_shape(2));
    assert_eq!(res["forward_flops"].as_u64(), Some(expected));
    assert_eq!(res["forward_backward_flops"].as_u64(), Some(3 * expected));
    assert_eq!(res["weights_bytes"].as_u64(), Some(spec.weight_bytes()));
}

/// The device model path of `bench mmdit` on the emulator: the same report, the device named.
#[test]
fn mmdit_json_on_the_emulator() {
    let r = bench_json(&[
        "mmdit", "--model", "shapes", "--batch", "1", "--iters", "1", "--device", "emu",
    ]);
    assert_eq!(r["device"]["kind"], "emu");
    assert_eq!(r["device"]["name"], "emulator");
    let res = &r["results"];
    for key in [
        "forward_ms",
        "forward_backward_ms",
        "forward_tflops",
        "forward_backward_tflops",
    ] {
        positive(res, key);
    }
    let spec = ModelSpec::new(Preset::Shapes, None, &teacher()).unwrap();
    let expected = mmdit_forward_flops(&spec.config, spec.call_shape(1));
    assert_eq!(res["forward_flops"].as_u64(), Some(expected));
    assert!(res["forward_mfu"].is_null(), "no MFU off a known GPU");
    let ck = bench_json(&[
        "mmdit",
        "--model",
        "shapes",
        "--iters",
        "1",
        "--device",
        "emu",
        "--checkpoint-activations",
    ]);
    assert_eq!(ck["parameters"]["checkpoint_activations"], "full");
    assert_eq!(r["parameters"]["checkpoint_activations"], "none");
    // the recomputed blocks are counted apart, not in the model's FLOPs
    assert_eq!(r["results"]["recomputed_flops"].as_f64(), Some(0.0));
    let recomputed = positive(&ck["results"], "recomputed_flops");
    assert!(recomputed < positive(&ck["results"], "forward_backward_flops") / 3.0);
    positive(&ck["results"], "forward_backward_ms");
    // checkpointing keeps less: its forward+backward peak is below the full record's
    let peak = |r: &Value| positive(&r["results"], "peak_memory_bytes");
    assert!(peak(&ck) < peak(&r), "{} vs {}", peak(&ck), peak(&r));
    positive(&r["results"], "resident_bytes");
    // --forward-only: a frozen bf16 model, the forward alone, a fifth of the resident state
    let fo = bench_json(&[
        "mmdit",
        "--model",
        "shapes",
        "--iters",
        "1",
        "--device",
        "emu",
        "--forward-only",
        "--profile",
    ]);
    assert_eq!(fo["parameters"]["forward_only"], true);
    positive(&fo["results"], "forward_ms");
    check_profile(&fo, "forward", "forward_ops");
    assert!(fo["results"]["forward_backward_ms"].is_null());
    let resident = |r: &Value| positive(&r["results"], "resident_bytes");
    assert!(
        resident(&fo) < 0.3 * resident(&r),
        "{} vs {}",
        resident(&fo),
        resident(&r)
    );
}

/// `--profile`'s two tables: per family and per op, each op's calls, time and FLOPs; every GEMM
/// and attention row with its TFLOP/s, and the per-op calls summing to the families'.
fn check_profile(r: &Value, families: &str, ops: &str) {
    let rows = |key: &str| {
        r[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key}: {r}"))
            .clone()
    };
    let (fam, op) = (rows(families), rows(ops));
    let calls = |v: &[Value]| v.iter().map(|x| x["calls"].as_u64().unwrap()).sum::<u64>();
    assert!(calls(&fam) > 10, "{fam:?}");
    assert_eq!(calls(&fam), calls(&op));
    let gemm = fam
        .iter()
        .find(|x| x["op"] == "gemm")
        .expect("a gemm family");
    assert!(gemm["tflops"].as_f64().is_some(), "{gemm}");
    assert!(op
        .iter()
        .any(|x| x["op"].as_str().unwrap().starts_with("gemm ")));
    assert!(fam
        .iter()
        .any(|x| x["op"].as_str().unwrap().starts_with("joint_attn_fwd") && x["tflops"].is_f64()));
    assert!(r["notes"].to_string().contains("profile of"));
}

#[test]
fn sample_json_of_the_teacher() {
    let r = bench_json(&["sample", "--steps", "2", "--batch", "2", "--iters", "1"]);
    check_device(&r);
    let res = &r["results"];
    for key in [
        "sample_ms",
        "ms_per_step",
        "images_per_s",
        "tflops",
        "ceiling_ratio",
    ] {
        positive(res, key);
    }
    // Two steps without CFG: two MMDiT calls on the batch of 2.
    let spec = ModelSpec::new(Preset::Shapes, None, &teacher()).unwrap();
    let per_call = mmdit_forward_flops(&spec.config, spec.call_shape(2));
    assert_eq!(res["mmdit_flops"].as_u64(), Some(2 * per_call));
}

/// `bench sample` with the loop on the device (emulator): CFG doubles the calls per step; with
/// `--graph` the reusable plan runs (the loop directly: the emulator has no graphs).
#[test]
fn sample_json_on_the_emulator() {
    let r = bench_json(&[
        "sample",
        "--steps",
        "2",
        "--batch",
        "1",
        "--cfg",
        "2",
        "--iters",
        "1",
        "--device",
        "emu",
        "--profile",
    ]);
    check_profile(&r, "sample", "sample_ops");
    let r = bench_json(&[
        "sample", "--steps", "2", "--batch", "1", "--cfg", "2", "--iters", "1", "--device", "emu",
        "--graph",
    ]);
    assert_eq!(r["device"]["kind"], "emu");
    assert_eq!(r["parameters"]["graph"], true);
    let res = &r["results"];
    for key in ["sample_ms", "ms_per_step", "images_per_s", "tflops"] {
        positive(res, key);
    }
    let spec = ModelSpec::new(Preset::Shapes, None, &teacher()).unwrap();
    let per_call = mmdit_forward_flops(&spec.config, spec.call_shape(2));
    assert_eq!(res["mmdit_flops"].as_u64(), Some(2 * per_call));
}

/// The device iteration through the bench (its parity is tests/advdmd_device.rs): every kind
/// timed, FLOPs counted, the state's bytes reported.
#[test]
fn step_json_on_the_emulator() {
    let r = bench_json(&[
        "step",
        "--device",
        "emu",
        "--iters",
        "1",
        "--prompts",
        "1",
        "--group",
        "2",
        "--steps-per-sample",
        "2",
        "--bf16-moments",
        "--checkpoint-activations=selective",
        // each kind's second run (a warm-up) records its graph; the timed third replays it
        "--graph",
        // the timed iterations queued one ahead (their metrics read after the next is queued)
        "--pipeline",
    ]);
    assert_eq!(r["device"]["kind"], "emu");
    assert_eq!(r["parameters"]["pipeline"], true);
    assert_eq!(r["parameters"]["checkpoint_activations"], "selective");
    assert_eq!(
        r["results"]["graph_replays"].as_f64(),
        Some(3.0),
        "one replay per kind"
    );
    let res = &r["results"];
    for key in [
        "iteration_ms",
        "critic_iteration_ms",
        "generator_iteration_ms",
        "generator_rl_iteration_ms",
        "iteration_flops",
        "recomputed_flops",
        "resident_bytes",
        "host_lead_ms",
    ] {
        positive(res, key);
    }
    // the recomputation is counted apart from the model's FLOPs (graph replays included)
    let recomputed = res["recomputed_flops"].as_f64().unwrap();
    assert!(recomputed < res["iteration_flops"].as_f64().unwrap() / 3.0);
    assert_eq!(r["iterations"].as_array().unwrap().len(), 3);
}

#[test]
fn step_json_times_every_kind_of_iteration() {
    let r = bench_json(&["step", "--iters", "1", "--prompts", "1", "--group", "2"]);
    check_device(&r);
    let res = &r["results"];
    for key in [
        "iteration_ms",
        "critic_iteration_ms",
        "generator_iteration_ms",
        "generator_rl_iteration_ms",
        "samples_per_s",
    ] {
        positive(res, key);
    }
    assert!(res["mfu"].is_null(), "MFU is n/a for a step");
    assert_eq!(r["iterations"].as_array().unwrap().len(), 3);
}

#[test]
fn kernels_json_at_a_small_size() {
    let r = bench_json(&["kernels", "--size", "16384", "--iters", "1"]);
    check_device(&r);
    positive(&r["results"], "memcpy_gbps");
    positive(&r["results"], "gemm_ceiling_tflops");
    let rows = r["kernels"].as_array().unwrap();
    assert!(rows.len() >= 15, "{} kernels", rows.len());
    for row in rows {
        positive(row, "ms");
        positive(row, "ceiling_ratio");
        // A memory-bound row has bytes and GB/s, a compute-bound one FLOPs and TFLOP/s.
        if row["bytes"].is_null() {
            positive(row, "flops");
            positive(row, "tflops");
        } else {
            positive(row, "bytes");
            positive(row, "gbps");
        }
    }
}

/// The CUDA kernels' bench through the emulator (tiny sizes): every family's row, the copy first.
#[test]
fn kernels_json_on_the_emulator() {
    let r = bench_json(&["kernels", "--device", "emu"]);
    assert_eq!(r["device"]["kind"], "emu");
    positive(&r["results"], "copy_gbps");
    let rows = r["kernels"].as_array().unwrap();
    assert_eq!(rows[0]["kernel"], "copy_bytes");
    assert!(rows.len() >= 20, "{} kernels", rows.len());
    for row in rows {
        positive(row, "ms");
        positive(row, "bytes");
        positive(row, "gbps");
    }
}

/// A bad flag: a non-zero exit with `expect` in the message, and no panic.
fn fails_cleanly(args: &[&str], expect: &str) {
    let out = advdmd(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(err.contains(expect), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn bad_input_is_a_clean_error() {
    fails_cleanly(
        &[
            "bench",
            "step",
            "--device",
            "emu",
            "--checkpoint-activations=some",
        ],
        "invalid value 'some'",
    );
    fails_cleanly(
        &["bench", "mmdit", "--model", "sd4-huge"],
        "unknown model `sd4-huge`",
    );
    fails_cleanly(
        &["bench", "mmdit", "--batch", "0"],
        "--batch must be at least 1",
    );
    if advdmd::device::kernel::KernelDevice::gpu_if_available().is_none() {
        fails_cleanly(
            &["bench", "mmdit", "--device", "cuda"],
            "no usable CUDA GPU",
        );
    }
    if advdmd::device::kernel::KernelDevice::gpu_if_available().is_none() {
        fails_cleanly(
            &["bench", "sample", "--device", "cuda"],
            "no usable CUDA GPU",
        );
    }
    if advdmd::device::kernel::KernelDevice::gpu_if_available().is_none() {
        fails_cleanly(&["bench", "step", "--device", "cuda"], "no usable CUDA GPU");
    }
    fails_cleanly(
        &["bench", "step", "--model", "sd3.5-medium"],
        "the Shapes teacher only",
    );
    fails_cleanly(
        &["bench", "step", "--bf16-moments"],
        "the Shapes teacher only",
    );
    fails_cleanly(&["bench", "step", "--pipeline"], "the Shapes teacher only");
    if advdmd::device::kernel::KernelDevice::gpu_if_available().is_none() {
        fails_cleanly(
            &["bench", "kernels", "--device", "cuda"],
            "no usable CUDA GPU",
        );
    }
    fails_cleanly(
        &["bench", "mmdit", "--checkpoint-activations"],
        "only on the device path",
    );
    fails_cleanly(
        &["bench", "mmdit", "--forward-only"],
        "only on the device path",
    );
    fails_cleanly(
        &["bench", "mmdit", "--profile"],
        "--profile times the device path's ops",
    );
    fails_cleanly(
        &["bench", "kernels", "--device", "emu", "--profile"],
        "--profile times the device path's ops",
    );
    fails_cleanly(
        &["bench", "mmdit", "--device", "tpu"],
        "unknown device `tpu`",
    );
    fails_cleanly(
        &["bench", "mmdit", "--model", "sd3.5-medium", "--res", "520"],
        "--res 520",
    );
    fails_cleanly(
        &["bench", "mmdit", "--iters", "0"],
        "--iters must be at least 1",
    );
    fails_cleanly(
        &["bench", "sample", "--steps", "0"],
        "--steps must be at least 1",
    );
    fails_cleanly(
        &["bench", "kernels", "--size", "10"],
        "--size must be at least",
    );
}

//! The binary on a machine without CUDA: `advdmd info` exits 0 and says what it found; bad
//! subcommands and flags are clear errors, not panics.
mod common;

use common::ScratchDir;
use std::process::Command;

fn advdmd(args: &[&str]) -> std::process::Output {
    advdmd_env(args, &[])
}

/// `advdmd args` with environment variables `env` set.
fn advdmd_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_advdmd"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("running advdmd")
}

#[test]
fn info_runs_and_reports_devices() {
    let out = advdmd(&["info"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("cpu: "), "{text}");
    assert!(text.contains("cuda: "), "{text}");
    assert!(text.contains("kernels embedded: "), "{text}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn info_json_is_valid_json() {
    let out = advdmd(&["info", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert!(v["cpu_threads"].as_u64().unwrap() >= 1);
    assert!(v["cuda"].is_string());
}

#[test]
fn unknown_subcommand_is_a_clean_error() {
    let out = advdmd(&["no-such-command"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-command"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `ADVDMD_ATTN_FWD` / `ADVDMD_ATTN_BWD` set to something other than a kernel variant is an
/// error that names the accepted values, before any work; so is a bad skip list.
#[test]
fn bad_attention_variant_env_is_an_error() {
    let out = advdmd_env(&["info"], &[("ADVDMD_ATTN_FWD", "h99")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("ADVDMD_ATTN_FWD") && err.contains("h3"),
        "{err}"
    );
    // a skip list naming no variant, or skipping the variant chosen, is refused too
    for env in [
        &[("ADVDMD_ATTN_BWD_SKIP", "h4,h40")][..],
        &[("ADVDMD_ATTN_FWD", "h7"), ("ADVDMD_ATTN_FWD_SKIP", "h7,h8")][..],
    ] {
        let out = advdmd_env(&["info"], env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{env:?}");
        assert!(err.contains("_SKIP") && !err.contains("panicked"), "{err}");
    }
    // so is a bench-cut switch that is neither 0 nor 1
    let out = advdmd_env(&["info"], &[("ADVDMD_ATTN_ABLATIONS", "off")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("ADVDMD_ATTN_ABLATIONS") && !err.contains("panicked"),
        "{err}"
    );
    // and any other switch given a value it does not take (these were read as "off")
    for (var, value) in [
        ("ADVDMD_ATTN_NO_HOPPER", "yes"),
        ("ADVDMD_GEMM_AUTOTUNE", "on"),
        ("ADVDMD_CUDA_SYNC", "true"),
        ("ADVDMD_EMU_GUARD", "strat"),
    ] {
        let out = advdmd_env(&["info"], &[(var, value)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} accepted");
        assert!(
            err.starts_with("error:") && err.contains(var) && err.contains(value),
            "{err}"
        );
    }
    // a valid choice is what `info` reports the model path launches
    let out = advdmd_env(
        &["info", "--json"],
        &[("ADVDMD_ATTN_FWD", "H3"), ("ADVDMD_ATTN_BWD", "h2")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    for d in v["attention"].as_array().unwrap() {
        assert_eq!(
            (d["fwd"].as_str(), d["bwd"].as_str()),
            (Some("h3"), Some("h2")),
            "{d}"
        );
    }
    // by default, the wgmma kernels where they run (here: the emulator, or an sm_90 GPU): H4 / H6
    // at d = 64, H3 / H3 at d = 128 (whose backward runs H2); without them
    // (ADVDMD_ATTN_NO_HOPPER=1) V4 / V3, whose backward runs K128 at d = 128
    let gpu = std::process::Command::new("nvidia-smi").output().is_ok();
    for (env, want) in [
        (None, [("h4", "h6"), ("h3", "h2")]),
        (Some("1"), [("v4", "v3"), ("v3", "k128")]),
    ] {
        if gpu && env.is_none() {
            continue; // depends on the GPU's architecture
        }
        let out = match env {
            Some(v) => advdmd_env(&["info", "--json"], &[("ADVDMD_ATTN_NO_HOPPER", v)]),
            None => advdmd(&["info", "--json"]),
        };
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
        for (d, (f, b)) in [64, 128].into_iter().zip(want) {
            let got = &v["attention"][usize::from(d == 128)];
            assert_eq!(got["head_dim"], d);
            assert_eq!(
                (got["fwd"].as_str(), got["bwd"].as_str()),
                (Some(f), Some(b)),
                "{got}"
            );
        }
    }
}

/// `ADVDMD_STREAMS` other than 1 or 2 is an error before any work; `info` reports the choice.
#[test]
fn bad_streams_env_is_an_error() {
    let out = advdmd_env(&["info"], &[("ADVDMD_STREAMS", "3")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("ADVDMD_STREAMS") && err.contains("1 or 2"),
        "{err}"
    );
    for (set, want) in [(Some("1"), 1), (None, 2)] {
        let out = match set {
            Some(v) => advdmd_env(&["info", "--json"], &[("ADVDMD_STREAMS", v)]),
            None => advdmd(&["info", "--json"]),
        };
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
        assert_eq!(v["streams"], want);
    }
}

/// `ADVDMD_PDL` other than 0 or 1 is an error before any work; `info` reports the choice.
#[test]
fn bad_pdl_env_is_an_error() {
    let out = advdmd_env(&["info"], &[("ADVDMD_PDL", "yes")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("ADVDMD_PDL") && err.contains("0 or 1"),
        "{err}"
    );
    for (set, want) in [(Some("1"), true), (Some("0"), false), (None, false)] {
        let out = match set {
            Some(v) => advdmd_env(&["info", "--json"], &[("ADVDMD_PDL", v)]),
            None => advdmd(&["info", "--json"]),
        };
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
        assert_eq!(v["pdl"], want);
    }
}

/// Training and sampling flags out of their range are one clear error each, naming the flag,
/// before any work (each of these once panicked in a kernel or a reshape, or trained on NaN).
#[test]
fn out_of_range_training_and_sampling_flags_are_errors() {
    let dir = ScratchDir::new("cli-flags");
    let out_path = dir.join("out");
    let out_dir = out_path.to_str().unwrap();
    // a small distillation, where a case does not set these itself
    let small = [
        ("--prompts", "1"),
        ("--group", "2"),
        ("--eval-per-task", "0"),
    ];
    let cases: &[(&[&str], &str)] = &[
        (&["pretrain", "--batch", "0"], "--batch"),
        (
            &["pretrain", "--checkpoint-every", "0"],
            "--checkpoint-every",
        ),
        (&["pretrain", "--hidden", "7"], "--hidden"),
        (&["pretrain", "--depth", "0"], "--depth"),
        (&["pretrain", "--lr", "nan"], "--lr"),
        (&["pretrain", "--ema-decay", "2"], "--ema-decay"),
        (&["distill", "--prompts", "0"], "--prompts"),
        (&["distill", "--group", "0"], "--group"),
        (&["distill", "--lr", "inf"], "--lr"),
        (&["distill", "--rho", "2"], "--rho"),
        (&["distill", "--w-real", "nan"], "--w-real"),
        (&["distill", "--lambda-d=-1"], "--lambda-d"),
        (&["distill", "--r-dmd", "0"], "--r-dmd"),
        (
            &["sample", "--prompt", "a red circle", "--cfg", "nan"],
            "--cfg",
        ),
        (&["sample", "--prompts", "eval:0"], "eval:0"),
        (
            &["sample", "--prompts", "eval:99999999999"],
            "N must be 1 to",
        ),
        (
            &[
                "sample",
                "--prompt",
                "a red circle",
                "--per-prompt",
                "99999999999",
            ],
            "--per-prompt",
        ),
        (&["sample", "--prompt", "A red circle"], "unknown word `A`"),
        (
            &["distill", "--eval-per-task", "99999999999"],
            "--eval-per-task",
        ),
        (&["dataset", "--n", "99999999999"], "--n"),
        // runs far past any machine's memory: refused before their first large allocation
        // (these aborted the process on a failed allocation, or ran into the OOM killer)
        (
            &["pretrain", "--batch", "100000000"],
            "pretrain needs at least",
        ),
        (
            &["pretrain", "--hidden", "1048576"],
            "pretrain needs at least",
        ),
        (
            &["pretrain", "--depth", "100000000"],
            "pretrain needs at least",
        ),
        (
            &["distill", "--prompts", "100000000"],
            "distill needs at least",
        ),
        (
            &["sample", "--prompts", "eval:200000", "--batch", "1000000"],
            "sample needs at least",
        ),
    ];
    for (args, flag) in cases {
        let mut all: Vec<&str> = args.to_vec();
        if args[0] == "distill" {
            for (key, value) in small {
                if !args.contains(&key) {
                    all.extend([key, value]);
                }
            }
        }
        all.extend(["--out", out_dir]);
        let out = advdmd(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{all:?} succeeded");
        assert!(
            err.contains(flag) && err.starts_with("error:") && !err.contains("panicked"),
            "{all:?}: {err}"
        );
    }
    for (args, what) in [
        (
            &[
                "bench",
                "mmdit",
                "--model",
                "shapes",
                "--batch",
                "100000000",
            ][..],
            "bench mmdit needs at least",
        ),
        (
            &["bench", "sample", "--batch", "100000000"][..],
            "bench sample needs at least",
        ),
        (
            &["bench", "step", "--prompts", "100000000"][..],
            "bench step needs at least",
        ),
        (
            &["bench", "step", "--device", "emu", "--prompts", "100000000"][..],
            "bench step needs at least",
        ),
    ] {
        let out = advdmd(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(what) && err.contains("GiB available"),
            "{args:?}: {err}"
        );
    }
    // an --out that is a file
    let file = dir.join("a-file");
    std::fs::write(&file, b"not a folder").unwrap();
    for args in [
        &["sample", "--prompt", "a red circle", "--steps", "1"][..],
        &["dataset", "--n", "1"][..],
        &[
            "distill",
            "--iterations",
            "1",
            "--prompts",
            "1",
            "--group",
            "2",
        ][..],
    ] {
        let out = advdmd(&[args, &["--out", file.to_str().unwrap()]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("exists and is not a folder"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"not a folder");
}

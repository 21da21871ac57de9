//! A 10-iteration AdvDMD run on a tiny Shapes teacher through every loss, with RL on and off and
//! both discriminator-state modes: every metric finite, the generator moves, the teacher does not.

mod common;

use advdmd::train::advdmd::{AdvDmd, AdvDmdConfig, DiscStates};
use advdmd::train::shapes_model::ShapesModel;
use common::ScratchDir;

fn tiny_teacher() -> ShapesModel {
    common::tiny_shapes_model(1, true)
}

fn run(rl: bool, states: DiscStates) {
    let config = AdvDmdConfig {
        prompts: 2,
        group: 3,
        r_dmd: 2,
        rl,
        rl_warmup: 1,
        disc_states: states,
        lr_generator: 1e-3,
        ..Default::default()
    };
    let mut t = AdvDmd::new(tiny_teacher(), config);
    let before = t
        .generator
        .mmdit
        .params
        .param("final_layer.linear.weight")
        .value();
    let teacher_before = t
        .teacher
        .mmdit
        .params
        .param("final_layer.linear.weight")
        .value();
    let mut rl_steps = 0;
    for _ in 0..10 {
        let m = t.step().unwrap();
        println!("{m:?}");
        assert!(m.fake_loss.is_finite() && m.d_loss.is_finite(), "{m:?}");
        assert!((0.0..=1.0).contains(&m.d_acc_real) && (0.0..=1.0).contains(&m.d_acc_fake));
        if m.generator_step {
            assert!(
                m.dmd_grad_norm.is_finite() && m.gan_loss.is_finite(),
                "{m:?}"
            );
        }
        if m.rl_step {
            rl_steps += 1;
            assert!(m.rl_loss.is_finite() && m.mean_reward.is_finite(), "{m:?}");
        }
    }
    assert_eq!(t.generator_steps, 5);
    assert_eq!(rl_steps > 0, rl, "RL steps: {rl_steps}");
    let after = t
        .generator
        .mmdit
        .params
        .param("final_layer.linear.weight")
        .value();
    assert_ne!(before.f32s(), after.f32s(), "the generator did not move");
    assert!(after.f32s().iter().all(|v| v.is_finite()));
    assert_eq!(
        teacher_before.f32s(),
        t.teacher
            .mmdit
            .params
            .param("final_layer.linear.weight")
            .value()
            .f32s()
    );
}

#[test]
fn ten_iterations_with_rl_through_every_loss() {
    run(true, DiscStates::Trajectory);
}

#[test]
fn ten_iterations_without_rl_and_final_state_discriminator() {
    run(false, DiscStates::Final);
}

#[test]
fn interrupted_and_resumed_distillation_equals_the_uninterrupted_run() {
    resume_equals_straight(None, "plain");
}

#[test]
fn resume_after_the_discriminator_froze_equals_the_uninterrupted_run() {
    resume_equals_straight(Some(2), "frozen");
}

#[test]
fn a_frozen_discriminator_stops_learning_while_the_fake_score_trains_on() {
    let config = AdvDmdConfig {
        prompts: 2,
        group: 2,
        r_dmd: 2,
        rl_warmup: 1,
        frozen_disc_after: Some(2),
        ..Default::default()
    };
    let mut t = AdvDmd::new(tiny_teacher(), config);
    t.step().unwrap();
    t.step().unwrap();
    assert!(!t.disc_frozen());
    let head = |t: &AdvDmd| t.head.params.param("conv2.weight").value().f32s().to_vec();
    let fake = |t: &AdvDmd| {
        let p = t.fake.mmdit.params.param("final_layer.linear.weight");
        p.value().f32s().to_vec()
    };
    let (h0, f0) = (head(&t), fake(&t));
    for _ in 0..3 {
        let m = t.step().unwrap();
        assert!(m.d_loss.is_finite() && m.d_acc_by_sigma.len() == 4, "{m:?}");
    }
    assert!(t.disc_frozen());
    assert_eq!(h0, head(&t), "the frozen head moved");
    assert_ne!(f0, fake(&t), "the fake score stopped training");
    let snap = t.frozen_backbone.as_ref().unwrap();
    let p = snap.mmdit.params.param("final_layer.linear.weight");
    assert_eq!(
        p.value().f32s(),
        &f0[..],
        "the snapshot is not the fake score at freezing time"
    );
}

fn resume_equals_straight(frozen_disc_after: Option<u64>, what: &str) {
    let config = AdvDmdConfig {
        prompts: 2,
        group: 2,
        r_dmd: 2,
        rl_warmup: 1,
        frozen_disc_after,
        ..Default::default()
    };
    let mut straight = AdvDmd::new(tiny_teacher(), config.clone());
    for _ in 0..6 {
        straight.step().unwrap();
    }
    let dir = ScratchDir::new(&format!("distill-resume-{what}"));
    let path = dir.join("checkpoint.safetensors");
    let mut first = AdvDmd::new(tiny_teacher(), config.clone());
    for _ in 0..3 {
        first.step().unwrap();
    }
    first.save(&path).unwrap();
    drop(first);
    let mut resumed = AdvDmd::load(&path, tiny_teacher(), config.clone()).unwrap();
    for _ in 0..3 {
        resumed.step().unwrap();
    }
    assert_same_state(&straight, &resumed);
    let other = AdvDmdConfig { rho: 1.0, ..config };
    assert!(AdvDmd::load(&path, tiny_teacher(), other).is_err());
}

#[test]
fn distill_cli_writes_a_generator_that_samples_on_its_own_schedule() {
    let dir = ScratchDir::new("distill-cli");
    let bin = env!("CARGO_BIN_EXE_advdmd");
    let out = std::process::Command::new(bin)
        .args([
            "distill",
            "--iterations",
            "3",
            "--prompts",
            "2",
            "--group",
            "2",
            "--r-dmd",
            "2",
        ])
        .args(["--rl-warmup", "0", "--eval-per-task", "1", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("EMA generator, 4 steps") && table.contains("teacher, 40 steps"),
        "{table}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    let model = ShapesModel::load(&dir.join("model")).unwrap();
    assert_eq!(model.few_step, Some(4));
    assert_eq!(model.default_steps_and_cfg(), (4, 1.0));
    assert_eq!(model.schedule(4), vec![1.0, 0.9, 0.75, 0.5, 0.0]);
    let s = std::process::Command::new(bin)
        .args(["sample", "--prompt", "a blue square", "--checkpoint"])
        .arg(dir.join("model"))
        .arg("--out")
        .arg(dir.join("samples"))
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    let line = std::fs::read_to_string(dir.join("samples/manifest.jsonl")).unwrap();
    assert!(
        line.contains("\"steps\":4") && line.contains("\"cfg\":1.0"),
        "{line}"
    );
    // The inspect/convert tools read the generator's transformer like any MMDiT.
    let i = std::process::Command::new(bin)
        .arg("inspect")
        .arg(dir.join("model/transformer"))
        .output()
        .unwrap();
    assert!(i.status.success());
}

/// Every parameter, EMA weight, frozen snapshot and the RNG are equal bit for bit.
fn assert_same_state(straight: &AdvDmd, resumed: &AdvDmd) {
    for (maps, name) in [
        (
            (
                &straight.generator.mmdit.params,
                &resumed.generator.mmdit.params,
            ),
            "generator",
        ),
        (
            (&straight.fake.mmdit.params, &resumed.fake.mmdit.params),
            "fake",
        ),
        ((&straight.head.params, &resumed.head.params), "head"),
        ((&straight.ema.shadow, &resumed.ema.shadow), "ema"),
    ] {
        for (n, p) in maps.0.iter() {
            assert_eq!(
                p.value().f32s(),
                maps.1.param(n).value().f32s(),
                "{name}.{n}"
            );
        }
    }
    assert_eq!(straight.disc_frozen(), resumed.disc_frozen());
    if let (Some(a), Some(b)) = (&straight.frozen_backbone, &resumed.frozen_backbone) {
        for (n, p) in a.mmdit.params.iter() {
            assert_eq!(
                p.value().f32s(),
                b.mmdit.params.param(n).value().f32s(),
                "frozen.{n}"
            );
        }
    }
    assert_eq!(straight.rng.state(), resumed.rng.state());
}

/// The shared-prefix ablations: a fork taken before RL starts (and before the discriminator
/// freezes) with RL switched off and a freeze scheduled equals that configuration run from scratch.
#[test]
fn a_fork_before_the_late_switches_act_equals_the_straight_run() {
    let with_rl = AdvDmdConfig {
        prompts: 2,
        group: 2,
        r_dmd: 2,
        rl_warmup: 2,
        ..Default::default()
    };
    let branch = AdvDmdConfig {
        rl: false,
        frozen_disc_after: Some(4),
        ..with_rl.clone()
    };
    let mut straight = AdvDmd::new(tiny_teacher(), branch.clone());
    for _ in 0..6 {
        straight.step().unwrap();
    }
    let dir = ScratchDir::new("distill-fork");
    let path = dir.join("checkpoint.safetensors");
    // Iterations 0 and 2 are generator steps 0 and 1: RL (warm-up 2) has not run yet.
    let mut prefix = AdvDmd::new(tiny_teacher(), with_rl.clone());
    for _ in 0..4 {
        prefix.step().unwrap();
    }
    prefix.save(&path).unwrap();
    assert!(AdvDmd::load(&path, tiny_teacher(), branch.clone()).is_err());
    let mut forked = AdvDmd::fork(&path, tiny_teacher(), branch.clone()).unwrap();
    for _ in 0..2 {
        forked.step().unwrap();
    }
    assert!(forked.disc_frozen());
    assert_same_state(&straight, &forked);

    // Refused: a change to the core, a freeze already due, RL already started in the prefix.
    let rho = AdvDmdConfig {
        rho: 1.0,
        ..branch.clone()
    };
    assert!(AdvDmd::fork(&path, tiny_teacher(), rho).is_err());
    let early = AdvDmdConfig {
        frozen_disc_after: Some(3),
        ..branch.clone()
    };
    assert!(AdvDmd::fork(&path, tiny_teacher(), early).is_err());
    for _ in 0..2 {
        prefix.step().unwrap();
    }
    prefix.save(&path).unwrap();
    let err = AdvDmd::fork(&path, tiny_teacher(), branch).err().unwrap();
    assert!(err.to_string().contains("RL has started"), "{err}");
}

#[test]
fn learning_rates_warm_up_linearly_then_stay_constant() {
    let config = AdvDmdConfig {
        lr_warmup: 4,
        ..Default::default()
    };
    let mut t = AdvDmd::new(tiny_teacher(), config);
    let at = |t: &mut AdvDmd, i: u64| {
        t.iteration = i;
        t.lr(2.0)
    };
    assert_eq!(at(&mut t, 0), 0.5);
    assert_eq!(at(&mut t, 2), 1.5);
    assert_eq!(at(&mut t, 3), 2.0);
    assert_eq!(at(&mut t, 1000), 2.0);
}

/// `advdmd distill` of one prompt, two samples of two steps, r_dmd 2, RL from the start, no
/// evaluation, into `dir`, with `args`; asserts it succeeds.
fn small_distill(dir: &std::path::Path, args: &[&str]) {
    let out = small_distill_output(dir, args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// [`small_distill`]'s command, whatever its outcome.
fn small_distill_output(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_advdmd"))
        .args([
            "distill",
            "--prompts",
            "1",
            "--group",
            "2",
            "--steps-per-sample",
            "2",
        ])
        .args(["--r-dmd", "2", "--rl-warmup", "0", "--eval-per-task", "0"])
        .args(args)
        .arg("--out")
        .arg(dir)
        .output()
        .unwrap()
}

/// A run whose losses turn NaN (a learning rate of 10⁴) stops with an error naming the loss and
/// the iteration, without saving: the checkpoint it leaves is, byte for byte, the one a run
/// stopped at the iteration before writes.
#[test]
fn a_run_whose_losses_turn_nan_stops_and_keeps_its_last_checkpoint() {
    let base = ScratchDir::new("distill-nan");
    let args = |iterations: &'static str| {
        [
            "--lr",
            "1e4",
            "--checkpoint-every",
            "1",
            "--iterations",
            iterations,
        ]
    };
    let failed = base.join("failed");
    let out = small_distill_output(&failed, &args("8"));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "the run did not fail: {err}");
    assert!(
        err.contains("became NaN") || err.contains("became inf"),
        "{err}"
    );
    // "iteration K: <loss> became NaN; stopped without saving (<path> (iteration N) is kept)"
    let number_after = |key: &str| -> u64 {
        let at = err
            .find(key)
            .unwrap_or_else(|| panic!("no `{key}` in: {err}"))
            + key.len();
        err[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    };
    let (k, n) = (
        number_after("error: iteration "),
        number_after("(iteration "),
    );
    assert!(n >= 1 && n == k - 1, "{err}");
    let lines = std::fs::read_to_string(failed.join("metrics.jsonl")).unwrap();
    assert_eq!(
        lines.lines().count() as u64,
        k,
        "one metrics line an iteration run"
    );
    assert!(!failed.join("model").exists(), "no generator is written");

    let clean = base.join("clean");
    let n = n.to_string().leak();
    small_distill(&clean, &args(n));
    assert!(
        std::fs::read(failed.join("checkpoint.safetensors")).unwrap()
            == std::fs::read(clean.join("checkpoint.safetensors")).unwrap(),
        "the failed iteration changed the checkpoint"
    );
}

/// `advdmd distill --device emu`: the iterations on the kernel device (the emulator here),
/// checkpointing through the CPU trainer's state and resuming; its first iteration's losses
/// agree with the CPU trainer's from the same teacher and seed (bf16 tolerance).
#[test]
fn distill_cli_on_a_device_checkpoints_resumes_and_follows_the_cpu() {
    let base = ScratchDir::new("distill-dev");
    let bin = env!("CARGO_BIN_EXE_advdmd");
    let run = |dir: &std::path::Path, iterations: &str, extra: &[&str]| {
        let mut args = vec!["--iterations", iterations, "--checkpoint-every", "1"];
        args.extend(extra);
        small_distill(dir, &args);
    };
    let metrics = |dir: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (dev_dir, cpu_dir) = (base.join("emu"), base.join("cpu"));
    run(&dev_dir, "2", &["--device", "emu", "--bf16-moments"]);
    // resumed with --graph: iteration 4 is the generator's kind's second run in this process,
    // recorded into a graph and launched
    run(
        &dev_dir,
        "5",
        &["--device", "emu", "--bf16-moments", "--resume", "--graph"],
    );
    run(&cpu_dir, "1", &[]);
    let (d, c) = (metrics(&dev_dir), metrics(&cpu_dir));
    assert_eq!(d.len(), 5);
    assert_eq!(d[2]["generator_step"], true);
    assert_eq!(d[4]["generator_step"], true);
    assert!(d[4]["d_loss"].as_f64().unwrap().is_finite());
    for key in ["fake_loss", "d_loss", "dmd_grad_norm", "gan_loss"] {
        let (a, b) = (d[0][key].as_f64().unwrap(), c[0][key].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 2e-2 * b.abs().max(1.0),
            "{key}: device {a}, CPU {b}"
        );
    }
    assert!(ShapesModel::load(&dev_dir.join("model")).is_ok());
    for flag in ["--bf16-moments", "--graph"] {
        let bad = std::process::Command::new(bin)
            .args(["distill", flag, "--out"])
            .arg(base.join("bad"))
            .output()
            .unwrap();
        assert!(!bad.status.success());
        assert!(String::from_utf8_lossy(&bad.stderr).contains("need --device"));
    }
}

/// `advdmd distill --device emu` queues each iteration before the previous one's metrics are read,
/// except after an iteration whose state is saved: saving every iteration (nothing queued ahead)
/// and only at the end (three iterations queued ahead) give the same metrics and the same final
/// checkpoint, bit for bit on the emulator.
#[test]
fn distill_on_a_device_queues_ahead_without_changing_the_run() {
    let base = ScratchDir::new("distill-ahead");
    let run = |dir: &std::path::Path, every: &str| {
        let args = [
            "--iterations",
            "4",
            "--checkpoint-every",
            every,
            "--device",
            "emu",
        ];
        small_distill(dir, &args);
    };
    let (each, end) = (base.join("each"), base.join("end"));
    run(&each, "1");
    run(&end, "4");
    let read = |p: std::path::PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    assert_eq!(
        String::from_utf8(read(each.join("metrics.jsonl"))).unwrap(),
        String::from_utf8(read(end.join("metrics.jsonl"))).unwrap()
    );
    assert!(
        read(each.join("checkpoint.safetensors")) == read(end.join("checkpoint.safetensors")),
        "final checkpoints differ"
    );
}

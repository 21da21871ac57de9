//! Teacher pretraining and the Shapes model: tokenizer round trip, a short run whose loss falls,
//! interrupted-and-resumed equals uninterrupted bit for bit, and the model folder round trip with
//! deterministic sampling.

mod common;

use advdmd::data::shapes::{all_prompts, vocabulary, Task};
use advdmd::text::PromptTokenizer;
use advdmd::train::pretrain::{pretrain, PretrainConfig};
use advdmd::train::shapes_model::{sample_images, Sampler, ShapesModel, MAX_TOKENS};
use common::ScratchDir;

fn tmpdir(name: &str) -> ScratchDir {
    ScratchDir::new(&format!("pretrain-{name}"))
}

fn tiny(steps: u64) -> PretrainConfig {
    PretrainConfig {
        steps,
        batch: 16,
        lr: 2e-3,
        warmup: 2,
        checkpoint_every: 5,
        size: common::tiny_shapes_size(),
        ..Default::default()
    }
}

#[test]
fn tokenizer_round_trips_every_prompt_and_rejects_unknown_words() {
    let d = tmpdir("tok");
    let tok = PromptTokenizer::new(&vocabulary(), MAX_TOKENS).unwrap();
    tok.save(&d.join("tokenizer.json")).unwrap();
    let back = PromptTokenizer::load(&d.join("tokenizer.json"), MAX_TOKENS).unwrap();
    for task in [
        Task::Single,
        Task::Position,
        Task::Two,
        Task::Relation,
        Task::Counting,
    ] {
        for p in all_prompts(task).iter().step_by(7) {
            let ids = tok.encode(p).unwrap();
            assert_eq!(ids.len(), MAX_TOKENS);
            assert_eq!(back.encode(p).unwrap(), ids, "{p}");
            assert_eq!(tok.decode(&ids), *p);
        }
    }
    let empty = tok.encode("").unwrap();
    assert_eq!(tok.decode(&empty), "");
    assert!(tok.encode("a purple circle").is_err());
    assert!(tok
        .encode("a red circle and a red circle and a red circle")
        .is_err());
}

#[test]
fn twenty_step_pretraining_loss_falls() {
    let d = tmpdir("smoke");
    let mut losses = Vec::new();
    pretrain(&tiny(20), &d, false, |m| losses.push(m.loss)).unwrap();
    assert_eq!(losses.len(), 20);
    let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = losses[15..].iter().sum::<f32>() / 5.0;
    println!("loss first 5 {first:.4}, last 5 {last:.4}");
    assert!(last < 0.9 * first, "loss did not fall: {first} → {last}");
    let metrics = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 20);
    assert!(d.join("model/transformer/config.json").is_file());
}

#[test]
fn resumed_pretraining_equals_uninterrupted_bit_for_bit() {
    let (a, b) = (tmpdir("straight"), tmpdir("resumed"));
    let full = pretrain(&tiny(12), &a, false, |_| {}).unwrap();
    // Interrupt at step 7 (the last checkpoint is at step 5), then resume to 12.
    let mut seen = 0;
    let stop = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pretrain(&tiny(12), &b, false, |m| {
            seen = m.step;
            if m.step == 7 {
                panic!("simulated interruption at step 7");
            }
        })
    }));
    assert!(stop.is_err() && seen == 7);
    let resumed = pretrain(&tiny(12), &b, true, |_| {}).unwrap();
    assert_eq!(resumed.step, 12);
    for (name, p) in full.model.mmdit.params.iter() {
        assert_eq!(
            p.value().f32s(),
            resumed.model.mmdit.params.param(name).value().f32s(),
            "{name}"
        );
    }
    for (name, p) in full.ema_text.shadow.iter() {
        assert_eq!(
            p.value().f32s(),
            resumed.ema_text.shadow.param(name).value().f32s(),
            "{name}"
        );
    }
    let la = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let lb = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    let strip = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("seconds");
                v.to_string()
            })
            .collect()
    };
    assert_eq!(strip(&la), strip(&lb), "metrics differ after resume");
    // A resume under another configuration is refused with a clear error.
    let err = pretrain(&tiny(13), &b, true, |_| {}).err().unwrap();
    assert!(err.to_string().contains("another configuration"), "{err}");
}

#[test]
fn model_folder_round_trip_and_sampling_is_deterministic() {
    let d = tmpdir("folder");
    let state = pretrain(&tiny(3), &d, false, |_| {}).unwrap();
    let model = ShapesModel::load(&d.join("model")).unwrap();
    assert_eq!(model.mmdit.config, state.model.mmdit.config);
    let prompts: Vec<String> = vec![
        "a red circle".into(),
        "two blue squares".into(),
        "a green triangle on the left".into(),
    ];
    let a = sample_images(&model, &prompts, 3, 3.0, Sampler::Euler, 7, 2, |_| {}).unwrap();
    let b = sample_images(&model, &prompts, 3, 3.0, Sampler::Euler, 7, 3, |_| {}).unwrap();
    assert_eq!(a.shape(), [3, 3, 16, 16]);
    assert_eq!(a.f32s(), b.f32s(), "batching changed the samples");
    let c = sample_images(&model, &prompts, 3, 3.0, Sampler::Sde, 7, 3, |_| {}).unwrap();
    assert!(c.f32s().iter().all(|v| v.is_finite()));
    assert_ne!(a.f32s(), c.f32s());
}

#[test]
fn committed_teacher_loads_and_samples_through_the_cli() {
    let teacher = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/shapes-teacher");
    let model = ShapesModel::load(&teacher).unwrap();
    assert_eq!(model.mmdit.config.hidden, 128);
    // It was trained by `advdmd pretrain` with every default, to the end.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(teacher.join("shapes.json")).unwrap())
            .unwrap();
    let defaults = PretrainConfig::default();
    // serde_json's parser may differ from the printed f32→f64 value in the last bit.
    let (got, want) = (&meta["training"]["pretrain"], defaults.to_json());
    for (k, w) in want.as_object().unwrap() {
        let g = &got[k];
        match (g.as_f64(), w.as_f64()) {
            (Some(a), Some(b)) => {
                assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{k}: {a} vs {b}")
            }
            _ => assert_eq!(g, w, "{k}"),
        }
    }
    assert_eq!(meta["training"]["steps_done"], defaults.steps);
    let d = tmpdir("teacher-cli");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_advdmd"))
        .args([
            "sample",
            "--prompt",
            "a red circle",
            "--per-prompt",
            "3",
            "--steps",
            "4",
        ])
        .arg("--out")
        .arg(&d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = std::fs::read_to_string(d.join("manifest.jsonl")).unwrap();
    assert_eq!(manifest.lines().count(), 3);
    assert!(d.join("grid.png").is_file() && d.join("00002.png").is_file());
    let report = advdmd::eval::evaluate_folder(&d, 0).unwrap();
    assert_eq!(report.images, 3);
}

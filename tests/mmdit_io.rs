//! MMDiT checkpoint IO and model options: layout round trips (both directions, dtypes, sharded
//! diffusers, prefixes), bad input through the CLI (non-zero exit, one message naming file and
//! key, no panic, no output), frozen mode, the feature tap, non-square latents.
mod common;

use advdmd::autograd::backward;
use advdmd::checkpoint::{save_safetensors, SafetensorsFile};
use advdmd::mmdit::checkpoint::{save_mmdit, Layout, MmditCheckpoint};
use advdmd::mmdit::{Mmdit, MmditInputs};
use advdmd::tensor::StoredDType;
use advdmd::{DType, Rng, Tensor, Var};
use common::ScratchDir;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/mmdit/sd35m_tiny")
}

fn tmpdir(name: &str) -> ScratchDir {
    ScratchDir::new(&format!("mmdit-{name}"))
}

fn all_tensors(path: &Path) -> Vec<(String, Tensor)> {
    let f = SafetensorsFile::open(path).unwrap();
    f.names()
        .into_iter()
        .map(|k| (k.clone(), f.load(&k).unwrap()))
        .collect()
}

fn assert_same_params(a: &MmditCheckpoint, b: &MmditCheckpoint) {
    assert_eq!(a.config, b.config);
    let (pa, pb) = (a.load_params().unwrap(), b.load_params().unwrap());
    assert_eq!(pa.len(), pb.len());
    for (name, p) in pa.iter() {
        assert_eq!(p.value().f32s(), pb.param(name).value().f32s(), "{name}");
    }
}

#[test]
fn original_to_diffusers_to_original_is_exact() {
    let d = tmpdir("rt1");
    let orig = MmditCheckpoint::open(fixture().join("original.safetensors")).unwrap();
    save_mmdit(
        &orig,
        &orig.config,
        Layout::Diffusers,
        &d.join("diff"),
        StoredDType::F32,
    )
    .unwrap();
    let diff = MmditCheckpoint::open(d.join("diff")).unwrap();
    assert_eq!(diff.layout, Layout::Diffusers);
    assert_same_params(&orig, &diff);
    // The written diffusers file holds exactly the reference's diffusers tensors.
    let ours = all_tensors(&d.join("diff/diffusion_pytorch_model.safetensors"));
    let reference = all_tensors(&fixture().join("diffusers.safetensors"));
    assert_eq!(ours.len(), reference.len());
    for ((ka, ta), (kb, tb)) in ours.iter().zip(&reference) {
        assert_eq!(ka, kb);
        assert_eq!(ta.f32s(), tb.f32s(), "{ka}");
    }
    // config.json matches the reference's on every field the reference gives.
    let ours: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("diff/config.json")).unwrap())
            .unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    for (k, v) in reference.as_object().unwrap() {
        if k != "sample_size" {
            assert_eq!(&ours[k], v, "config.json field {k}");
        }
    }
    save_mmdit(
        &diff,
        &diff.config,
        Layout::Original,
        &d.join("back.safetensors"),
        StoredDType::F32,
    )
    .unwrap();
    assert_same_params(
        &orig,
        &MmditCheckpoint::open(d.join("back.safetensors")).unwrap(),
    );
}

#[test]
fn diffusers_to_original_to_diffusers_is_exact() {
    let d = tmpdir("rt2");
    let diff = MmditCheckpoint::open(fixture().join("diffusers.safetensors")).unwrap();
    save_mmdit(
        &diff,
        &diff.config,
        Layout::Original,
        &d.join("o.safetensors"),
        StoredDType::F32,
    )
    .unwrap();
    let orig = MmditCheckpoint::open(d.join("o.safetensors")).unwrap();
    assert_eq!(orig.layout, Layout::Original);
    assert_same_params(&diff, &orig);
    // Keys carry the single-file prefix, as Stability's checkpoints do.
    let f = SafetensorsFile::open(d.join("o.safetensors")).unwrap();
    assert!(f
        .names()
        .iter()
        .all(|k| k.starts_with("model.diffusion_model.")));
    save_mmdit(
        &orig,
        &orig.config,
        Layout::Diffusers,
        &d.join("dd"),
        StoredDType::F32,
    )
    .unwrap();
    assert_same_params(&diff, &MmditCheckpoint::open(d.join("dd")).unwrap());
}

/// diffusers' `sample_size` (the default latent side: not in the weights) goes through
/// `convert` both ways: read from a `config.json` beside diffusers weights, kept in an original
/// file's metadata, written back; a checkpoint that does not say gets SD3's 128.
#[test]
fn convert_keeps_the_sample_size() {
    use advdmd::mmdit::checkpoint::{convert, DEFAULT_SAMPLE_SIZE};
    let d = tmpdir("sample-size");
    let sample_size = |dir: &Path| {
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["sample_size"].as_u64()
    };
    // the fixture's config.json (beside its weights) says 8
    let diff = convert(
        &fixture().join("diffusers.safetensors"),
        &d.join("o.safetensors"),
        Layout::Original,
        None,
    )
    .unwrap();
    assert_eq!(diff.sample_size, Some(8));
    let orig = MmditCheckpoint::open(d.join("o.safetensors")).unwrap();
    assert_eq!(orig.sample_size, Some(8));
    convert(
        &d.join("o.safetensors"),
        &d.join("back"),
        Layout::Diffusers,
        None,
    )
    .unwrap();
    assert_eq!(sample_size(&d.join("back")), Some(8));
    // an original file alone says nothing
    std::fs::copy(
        fixture().join("original.safetensors"),
        d.join("bare.safetensors"),
    )
    .unwrap();
    let bare = convert(
        &d.join("bare.safetensors"),
        &d.join("bare"),
        Layout::Diffusers,
        None,
    )
    .unwrap();
    assert_eq!(bare.sample_size, None);
    assert_eq!(
        sample_size(&d.join("bare")),
        Some(DEFAULT_SAMPLE_SIZE as u64)
    );
}

#[test]
fn bf16_and_f16_storage_round_to_the_stored_dtype() {
    let d = tmpdir("dtype");
    let orig = MmditCheckpoint::open(fixture().join("original.safetensors")).unwrap();
    let params = orig.load_params().unwrap();
    for (dtype, name) in [
        (StoredDType::BF16, "b.safetensors"),
        (StoredDType::F16, "h.safetensors"),
    ] {
        save_mmdit(&orig, &orig.config, Layout::Original, &d.join(name), dtype).unwrap();
        let back = MmditCheckpoint::open(d.join(name)).unwrap();
        assert_eq!(back.main_dtype(), dtype);
        let w = back.load("joint_blocks.1.x_block.mlp.fc1.weight").unwrap();
        let want = params
            .param("joint_blocks.1.x_block.mlp.fc1.weight")
            .value();
        let want: Vec<f32> = match dtype {
            StoredDType::BF16 => want.to_dtype(DType::BF16).to_vec(),
            _ => want
                .f32s()
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect(),
        };
        assert_eq!(w.f32s(), want.as_slice());
    }
}

#[test]
fn sharded_diffusers_with_index_loads() {
    let d = tmpdir("shard");
    let tensors = all_tensors(&fixture().join("diffusers.safetensors"));
    let (a, b) = tensors.split_at(tensors.len() / 2);
    save_safetensors(
        d.join("diffusion_pytorch_model-00001-of-00002.safetensors"),
        a,
        None,
    )
    .unwrap();
    save_safetensors(
        d.join("diffusion_pytorch_model-00002-of-00002.safetensors"),
        b,
        None,
    )
    .unwrap();
    let mut map = serde_json::Map::new();
    for (k, _) in a {
        map.insert(
            k.clone(),
            "diffusion_pytorch_model-00001-of-00002.safetensors".into(),
        );
    }
    for (k, _) in b {
        map.insert(
            k.clone(),
            "diffusion_pytorch_model-00002-of-00002.safetensors".into(),
        );
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(
        d.join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded = MmditCheckpoint::open(&d).unwrap();
    assert_same_params(
        &MmditCheckpoint::open(fixture().join("diffusers.safetensors")).unwrap(),
        &sharded,
    );
}

#[test]
fn unprefixed_original_and_foreign_keys_are_handled() {
    let d = tmpdir("prefix");
    let mut tensors: Vec<(String, Tensor)> = all_tensors(&fixture().join("original.safetensors"))
        .into_iter()
        .map(|(k, t)| {
            (
                k.strip_prefix("model.diffusion_model.")
                    .unwrap()
                    .to_string(),
                t,
            )
        })
        .collect();
    save_safetensors(d.join("bare.safetensors"), &tensors, None).unwrap();
    let bare = MmditCheckpoint::open(d.join("bare.safetensors")).unwrap();
    assert!(bare.notes.is_empty(), "{:?}", bare.notes);
    let reference = MmditCheckpoint::open(fixture().join("original.safetensors")).unwrap();
    assert_same_params(&reference, &bare);

    // An all-in-one file: the MMDiT under its prefix, a VAE and a text encoder beside it.
    tensors = all_tensors(&fixture().join("original.safetensors"));
    tensors.push((
        "first_stage_model.decoder.conv_in.weight".into(),
        Tensor::zeros(&[2, 2]),
    ));
    tensors.push((
        "text_encoders.clip_l.transformer.x".into(),
        Tensor::zeros(&[3]),
    ));
    save_safetensors(d.join("aio.safetensors"), &tensors, None).unwrap();
    let aio = MmditCheckpoint::open(d.join("aio.safetensors")).unwrap();
    assert_eq!(aio.notes.len(), 1, "{:?}", aio.notes);
    assert!(aio.notes[0].contains("skipped 2"), "{}", aio.notes[0]);
    assert_same_params(&reference, &aio);
}

// ---- bad input through the CLI ----

fn advdmd(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_advdmd"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "panic: {err}");
    (out.status.success(), err)
}

/// `convert` and `inspect` both fail with one error line naming `must_name`, and write nothing.
fn assert_rejected(input: &Path, must_name: &[&str]) {
    let d = tmpdir("rej-out");
    for layout in ["original", "diffusers"] {
        let out = d.join(format!("out-{layout}"));
        let (ok, err) = advdmd(&[
            "convert",
            input.to_str().unwrap(),
            out.to_str().unwrap(),
            "--layout",
            layout,
        ]);
        assert!(!ok, "convert succeeded on bad input {}", input.display());
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "one error line expected: {err}");
        for m in must_name {
            assert!(
                lines[0].contains(m),
                "error should name `{m}`: {}",
                lines[0]
            );
        }
        assert!(!out.exists(), "partial output left at {}", out.display());
    }
    let (ok, err) = advdmd(&["inspect", input.to_str().unwrap()]);
    assert!(!ok && err.contains("error:"), "{err}");
    assert_eq!(
        std::fs::read_dir(&d).unwrap().count(),
        0,
        "temporary files left behind"
    );
}

fn original_without(skip: &str, replace: Option<(&str, Tensor)>) -> Vec<(String, Tensor)> {
    all_tensors(&fixture().join("original.safetensors"))
        .into_iter()
        .filter(|(k, _)| k != skip)
        .map(|(k, t)| match &replace {
            Some((r, t2)) if k == *r => (k, t2.clone()),
            _ => (k, t),
        })
        .collect()
}

/// A NaN or an infinity in a weight: loading the model for use refuses it, naming the tensor and
/// the count; `inspect` and `convert` (a change of layout, not of values) pass it through.
#[test]
fn non_finite_weights_are_refused_for_use_and_converted_as_they_are() {
    let d = tmpdir("nonfinite");
    let key = "model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight";
    let mut t = all_tensors(&fixture().join("original.safetensors"))
        .into_iter()
        .find(|(k, _)| k == key)
        .unwrap()
        .1
        .to_dtype(DType::F32)
        .to_vec();
    t[3] = f32::NAN;
    t[7] = f32::NEG_INFINITY;
    let shape = SafetensorsFile::open(fixture().join("original.safetensors"))
        .unwrap()
        .shape(key)
        .unwrap();
    let p = d.join("nan.safetensors");
    let poisoned = Tensor::from_vec(t, &shape);
    save_safetensors(&p, &original_without("", Some((key, poisoned))), None).unwrap();

    let err = MmditCheckpoint::open(&p)
        .unwrap()
        .load_params()
        .err()
        .expect("a NaN weight loaded");
    let msg = err.to_string();
    assert!(
        matches!(err, advdmd::Error::NonFinite { count: 2, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("nan.safetensors") && msg.contains("joint_blocks.1.x_block.mlp.fc2.weight"),
        "{msg}"
    );

    let (ok, err) = advdmd(&["inspect", p.to_str().unwrap()]);
    assert!(ok, "{err}");
    let out = d.join("diff");
    let (ok, err) = advdmd(&[
        "convert",
        p.to_str().unwrap(),
        out.to_str().unwrap(),
        "--layout",
        "diffusers",
    ]);
    assert!(ok, "{err}");
    let converted = all_tensors(&out.join("diffusion_pytorch_model.safetensors"));
    let bad: usize = converted
        .iter()
        .map(|(_, t)| {
            t.to_dtype(DType::F32)
                .to_vec()
                .iter()
                .filter(|v| !v.is_finite())
                .count()
        })
        .sum();
    assert_eq!(bad, 2, "the converted checkpoint keeps the two values");
}

#[test]
fn truncated_checkpoint_is_rejected() {
    let d = tmpdir("bad-trunc");
    let bytes = std::fs::read(fixture().join("original.safetensors")).unwrap();
    let p = d.join("trunc.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_rejected(&p, &["trunc.safetensors"]);
}

#[test]
fn malformed_header_is_rejected() {
    let d = tmpdir("bad-header");
    let p = d.join("garbage.safetensors");
    let mut bytes = 40u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{ this is not json at all, no no no no }");
    std::fs::write(&p, &bytes).unwrap();
    assert_rejected(&p, &["garbage.safetensors"]);
}

#[test]
fn missing_tensor_is_rejected_with_its_stored_name() {
    let d = tmpdir("bad-missing");
    let key = "model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.bias";
    let p = d.join("missing.safetensors");
    save_safetensors(&p, &original_without(key, None), None).unwrap();
    assert_rejected(&p, &["missing.safetensors", key]);
    // The same in the diffusers layout names the diffusers key.
    let tensors: Vec<(String, Tensor)> = all_tensors(&fixture().join("diffusers.safetensors"))
        .into_iter()
        .filter(|(k, _)| k != "transformer_blocks.0.attn.add_k_proj.weight")
        .collect();
    let dir = d.join("diff");
    std::fs::create_dir_all(&dir).unwrap();
    save_safetensors(
        dir.join("diffusion_pytorch_model.safetensors"),
        &tensors,
        None,
    )
    .unwrap();
    assert_rejected(&dir, &["transformer_blocks.0.attn.add_k_proj.weight"]);
}

#[test]
fn wrong_shape_is_rejected() {
    let d = tmpdir("bad-shape");
    let key = "model.diffusion_model.joint_blocks.0.context_block.mlp.fc1.weight";
    let p = d.join("shape.safetensors");
    save_safetensors(
        &p,
        &original_without("", Some((key, Tensor::zeros(&[32, 128])))),
        None,
    )
    .unwrap();
    assert_rejected(&p, &["shape.safetensors", key]);
}

#[test]
fn unknown_dtype_is_rejected() {
    let d = tmpdir("bad-dtype");
    let key = "model.diffusion_model.final_layer.linear.bias";
    let mut tensors: Vec<(String, Tensor)> = original_without(key, None);
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    // Write the file with the engine, then append an I32 tensor by rebuilding the header.
    let p = d.join("dtype.safetensors");
    save_safetensors(&p, &tensors, None).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data_len = bytes.len() - 8 - n;
    header[key] = serde_json::json!({"dtype": "I32", "shape": [16], "data_offsets": [data_len, data_len + 64]});
    let h = header.to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    out.extend_from_slice(&[0u8; 64]);
    std::fs::write(&p, out).unwrap();
    assert_rejected(&p, &["dtype.safetensors", key, "I32"]);
}

#[test]
fn a_file_that_is_not_an_mmdit_is_rejected() {
    assert_rejected(
        &fixture().join("forward_backward.safetensors"),
        &["forward_backward.safetensors", "not an MMDiT"],
    );
    let (ok, err) = advdmd(&["inspect", "/no/such/file.safetensors"]);
    assert!(!ok && err.contains("/no/such/file.safetensors"), "{err}");
}

#[test]
fn convert_and_inspect_cli_work() {
    let d = tmpdir("cli");
    let out = d.join("diff");
    let (ok, err) = advdmd(&[
        "convert",
        fixture().join("original.safetensors").to_str().unwrap(),
        out.to_str().unwrap(),
        "--layout",
        "diffusers",
        "--dtype",
        "bf16",
    ]);
    assert!(ok, "{err}");
    let o = Command::new(env!("CARGO_BIN_EXE_advdmd"))
        .args(["inspect", out.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["layout"], "diffusers");
    assert_eq!(v["depth"], 3);
    assert_eq!(v["head_dim"], 16);
    assert_eq!(v["dual_attention_blocks"], serde_json::json!([0, 1]));
    assert_eq!(v["parameters"], 138064);
    assert_eq!(v["stored_dtypes"]["bf16"], 127);
    let (ok, err) = advdmd(&["convert", "a", "b", "--layout", "sideways"]);
    assert!(!ok && err.contains("sideways"), "{err}");
}

// ---- model options ----

fn model_and_inputs() -> (Mmdit, Tensor, Tensor, Tensor, Vec<f32>) {
    let ckpt = MmditCheckpoint::open(fixture().join("original.safetensors")).unwrap();
    let model = Mmdit::new(ckpt.config.clone(), ckpt.load_params().unwrap());
    let fb = SafetensorsFile::open(fixture().join("forward_backward.safetensors")).unwrap();
    let get = |k: &str| fb.load_f32(k, None).unwrap();
    (
        model,
        get("hidden_states"),
        get("encoder_hidden_states"),
        get("pooled_projections"),
        get("timestep").to_vec(),
    )
}

#[test]
fn frozen_model_gives_input_grads_only_and_the_same_ones() {
    let (model, x, ctx, pooled, t) = model_and_inputs();
    let run = |frozen: bool| {
        model.params.set_trainable(!frozen);
        model.params.zero_grad();
        let (xv, cv, pv) = (
            Var::input(x.clone()),
            Var::input(ctx.clone()),
            Var::constant(pooled.clone()),
        );
        let out = model.forward(&MmditInputs {
            x: &xv,
            timestep: &t,
            pooled: &pv,
            context: &cv,
        });
        let g = out.sum().backward();
        (g.get(&xv).unwrap().clone(), g.get(&cv).unwrap().clone())
    };
    let (gx_f, gc_f) = run(true);
    assert!(
        model.params.iter().all(|(_, p)| p.grad().is_none()),
        "frozen weights got gradients"
    );
    let (gx, gc) = run(false);
    assert!(model
        .params
        .iter()
        .filter(|(n, _)| *n != "pos_embed")
        .all(|(_, p)| p.grad().is_some()));
    assert_eq!(gx.f32s(), gx_f.f32s());
    assert_eq!(gc.f32s(), gc_f.f32s());
}

#[test]
fn feature_tap_returns_block_output_and_can_stop_early() {
    let (model, x, ctx, pooled, t) = model_and_inputs();
    let (xv, cv, pv) = (Var::input(x), Var::constant(ctx), Var::constant(pooled));
    let inputs = MmditInputs {
        x: &xv,
        timestep: &t,
        pooled: &pv,
        context: &cv,
    };
    let full = model.forward_with(&inputs, Some(1), false);
    let early = model.forward_with(&inputs, Some(1), true);
    assert!(full.velocity.is_some() && early.velocity.is_none());
    let (ff, fe) = (full.features.unwrap(), early.features.unwrap());
    assert_eq!(fe.shape(), [2, 16, 32]);
    assert_eq!(ff.value().f32s(), fe.value().f32s());
    // Features are differentiable back to the input (the discriminator's gradient path).
    let g = backward(&[(&fe, Tensor::ones(fe.shape()))]);
    assert!(g.get(&xv).unwrap().f32s().iter().any(|&v| v != 0.0));
    // The velocity of the full run does not depend on asking for features.
    let plain = model.forward(&inputs);
    assert_eq!(plain.value().f32s(), full.velocity.unwrap().value().f32s());
}

#[test]
fn non_square_latents_use_the_centre_crop() {
    let (model, _, ctx, pooled, _) = model_and_inputs();
    let (p, d) = (model.config.pos_embed_max_size, model.config.hidden);
    let (gh, gw) = (3, 5);
    let crop = model.cropped_pos_embed(gh, gw);
    let pe = model.params.param("pos_embed").value();
    let (top, left) = ((p - gh) / 2, (p - gw) / 2);
    let mut want = Vec::new();
    for r in 0..gh {
        for c in 0..gw {
            let row = (top + r) * p + left + c;
            want.extend_from_slice(&pe.f32s()[row * d..(row + 1) * d]);
        }
    }
    assert_eq!(crop.value().f32s(), want.as_slice());
    let x = Var::constant(Tensor::randn(&[2, 4, 2 * gh, 2 * gw], &mut Rng::new(3)));
    let (cv, pv) = (Var::constant(ctx), Var::constant(pooled));
    let out = model.forward(&MmditInputs {
        x: &x,
        timestep: &[500.0, 20.0],
        pooled: &pv,
        context: &cv,
    });
    assert_eq!(out.shape(), [2, 4, 2 * gh, 2 * gw]);
    assert!(out.value().f32s().iter().all(|v| v.is_finite()));
}

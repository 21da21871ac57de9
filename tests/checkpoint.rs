//! safetensors IO: round trips in f32 and bf16, reading f16, and clear errors (never a panic, never
//! a partial file) for truncated, malformed and unsupported input.

mod common;

use advdmd::checkpoint::{save_safetensors, write_safetensors, PendingTensor, SafetensorsFile};
use advdmd::tensor::StoredDType;
use advdmd::{DType, Error, Tensor};
use common::{randn, ScratchDir};
use half::{bf16, f16};
use std::path::PathBuf;

fn tmpdir(name: &str) -> ScratchDir {
    ScratchDir::new(&format!("ckpt-{name}"))
}

/// Hand-assembled safetensors bytes for one tensor (to test dtypes the engine never writes).
fn raw_file(name: &str, dtype: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let header = format!(
        "{{\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[0,{}]}}}}",
        data.len()
    );
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn round_trip_f32_and_bf16() {
    let d = tmpdir("rt");
    let a = randn(&[3, 5], 1);
    let b = randn(&[7], 2).to_dtype(DType::BF16);
    let p = d.join("m.safetensors");
    save_safetensors(
        &p,
        &[("a".into(), a.clone()), ("b.c".into(), b.clone())],
        None,
    )
    .unwrap();
    let f = SafetensorsFile::open(&p).unwrap();
    assert_eq!(f.names().len(), 2);
    let a2 = f.load("a").unwrap();
    assert_eq!(a2.dtype(), DType::F32);
    assert_eq!(a2.shape(), [3, 5]);
    assert_eq!(a2.f32s(), a.f32s());
    let b2 = f.load("b.c").unwrap();
    assert_eq!(b2.dtype(), DType::BF16);
    assert_eq!(b2.to_vec(), b.to_vec());
    // No temporary file is left next to the checkpoint.
    let names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn reads_f16_and_bf16_as_stored() {
    let d = tmpdir("f16");
    let vals = [1.5f32, -2.25, 0.1];
    let data: Vec<u8> = vals
        .iter()
        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
        .collect();
    let p = d.join("h.safetensors");
    std::fs::write(&p, raw_file("w", "F16", &[3], &data)).unwrap();
    let t = SafetensorsFile::open(&p).unwrap().load("w").unwrap();
    assert_eq!(t.dtype(), DType::F32);
    let want: Vec<f32> = vals.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    assert_eq!(t.f32s(), want.as_slice());

    let data: Vec<u8> = vals
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect();
    std::fs::write(&p, raw_file("w", "BF16", &[3], &data)).unwrap();
    let f = SafetensorsFile::open(&p).unwrap();
    let t = f.load_f32("w", Some(&[3])).unwrap();
    let want: Vec<f32> = vals.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    assert_eq!(t.f32s(), want.as_slice());
}

#[test]
fn truncated_file_is_an_error_naming_the_file() {
    let d = tmpdir("trunc");
    let p = d.join("t.safetensors");
    save_safetensors(&p, &[("a".into(), randn(&[64], 3))], None).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    let err = SafetensorsFile::open(&p)
        .err()
        .expect("truncated file must fail");
    assert!(matches!(err, Error::Safetensors { .. }), "{err}");
    assert!(err.to_string().contains("t.safetensors"), "{err}");
    // A file too short for even the header length.
    std::fs::write(&p, [1u8, 2, 3]).unwrap();
    assert!(SafetensorsFile::open(&p).is_err());
}

#[test]
fn garbage_and_missing_files_are_errors() {
    let d = tmpdir("garbage");
    let p = d.join("g.safetensors");
    std::fs::write(&p, b"this is not a safetensors file at all").unwrap();
    assert!(SafetensorsFile::open(&p).is_err());
    let err = SafetensorsFile::open(d.join("absent.safetensors"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("absent.safetensors"), "{err}");
}

#[test]
fn unsupported_dtype_and_missing_key_and_wrong_shape_are_errors() {
    let d = tmpdir("dtype");
    let p = d.join("i.safetensors");
    std::fs::write(&p, raw_file("ids", "I32", &[2], &[0u8; 8])).unwrap();
    let f = SafetensorsFile::open(&p).unwrap();
    let err = f.load("ids").err().unwrap();
    assert!(matches!(err, Error::UnsupportedDType { .. }), "{err}");
    assert!(err.to_string().contains("ids"), "{err}");
    let err = f.load("nope").err().unwrap();
    assert!(matches!(err, Error::MissingTensor { .. }), "{err}");

    let p = d.join("s.safetensors");
    save_safetensors(&p, &[("w".into(), Tensor::zeros(&[2, 3]))], None).unwrap();
    let err = SafetensorsFile::open(&p)
        .unwrap()
        .load_f32("w", Some(&[3, 2]))
        .err()
        .unwrap();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn failed_save_leaves_nothing_behind() {
    let d = tmpdir("fail");
    let target = d.join("no_such_dir").join("x.safetensors");
    assert!(save_safetensors(&target, &[("a".into(), Tensor::zeros(&[1]))], None).is_err());
    assert!(!target.exists());
}

/// The same tensors and metadata save to the same bytes (the metadata's hash-map order does not
/// leak into the header), mixed dtypes included, and the safetensors crate reads the file back.
#[test]
fn a_save_is_a_function_of_its_contents() {
    let d = tmpdir("deterministic");
    let tensors = vec![
        ("b.weight".to_string(), Tensor::ones(&[3, 2])),
        (
            "a \"quoted\"".to_string(),
            Tensor::zeros(&[5]).to_dtype(DType::BF16),
        ),
        ("c".to_string(), Tensor::ones(&[1])),
    ];
    let metadata = || -> std::collections::HashMap<String, String> {
        (0..8)
            .map(|i| (format!("key{i}"), format!("value \"{i}\"")))
            .collect()
    };
    let files: Vec<Vec<u8>> = (0..4)
        .map(|i| {
            let path = d.join(format!("{i}.safetensors"));
            save_safetensors(&path, &tensors, Some(metadata())).unwrap();
            std::fs::read(path).unwrap()
        })
        .collect();
    assert!(files.iter().all(|f| f == &files[0]), "two saves differ");
    let parsed = safetensors::SafeTensors::deserialize(&files[0]).unwrap();
    assert_eq!(parsed.len(), 3);
    assert_eq!(parsed.tensor("a \"quoted\"").unwrap().shape(), &[5]);
    let (_, header) = safetensors::SafeTensors::read_metadata(&files[0]).unwrap();
    assert_eq!(header.metadata().as_ref().unwrap()["key3"], "value \"3\"");
    let f = SafetensorsFile::open(d.join("0.safetensors")).unwrap();
    assert_eq!(f.load("b.weight").unwrap().to_vec(), vec![1.0; 6]);
}

/// A streamed write whose producer fails (a read, a download), or produces another shape than the
/// header declared, is an error — not a panic, not a partial file: the file already there stays
/// as it was, no temporary file is left, and no producer runs after the failure (the writer
/// takes tensors of one dtype in name order).
#[test]
fn a_failed_producer_fails_the_write_and_keeps_the_old_file() {
    let d = tmpdir("producer");
    let target = d.join("x.safetensors");
    save_safetensors(&target, &[("a".into(), Tensor::ones(&[2]))], None).unwrap();
    let before = std::fs::read(&target).unwrap();
    let after_failure = std::cell::Cell::new(0);
    type Produce<'a> = Box<dyn Fn() -> advdmd::Result<Tensor> + 'a>;
    fn pending<'a>(second: Produce<'a>, count: &'a std::cell::Cell<u32>) -> Vec<PendingTensor<'a>> {
        let tensor = |name: &str, n, dtype, produce| PendingTensor {
            name: name.into(),
            shape: vec![n],
            dtype,
            produce,
        };
        let counted: Produce = Box::new(move || {
            count.set(count.get() + 1);
            Ok(Tensor::zeros(&[1]))
        });
        vec![
            tensor(
                "a",
                2,
                StoredDType::F32,
                Box::new(|| Ok(Tensor::zeros(&[2]))),
            ),
            tensor("b", 3, StoredDType::F32, second),
            tensor("c", 1, StoredDType::F32, counted),
        ]
    }
    let failing = pending(
        Box::new(|| Err(Error::Invalid("download failed".into()))),
        &after_failure,
    );
    let err = write_safetensors(&target, &failing, None).unwrap_err();
    assert!(err.to_string().contains("download failed"), "{err}");
    let misshapen = pending(Box::new(|| Ok(Tensor::zeros(&[4]))), &after_failure);
    let err = write_safetensors(&target, &misshapen, None).unwrap_err();
    assert!(err.to_string().contains("`b`"), "{err}");
    assert_eq!(after_failure.get(), 0, "a producer ran after a failure");
    assert_eq!(std::fs::read(&target).unwrap(), before);
    let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "a temporary file was left behind");
    let fine = pending(Box::new(|| Ok(Tensor::ones(&[3]))), &after_failure);
    write_safetensors(&target, &fine, None).unwrap();
    assert_eq!(after_failure.get(), 1);
    let f = SafetensorsFile::open(&target).unwrap();
    assert_eq!(f.load("b").unwrap().to_vec(), vec![1.0; 3]);
}

/// `load_f32` (weights and optimizer states loaded for use) refuses a NaN or an infinity, naming
/// the file, the tensor and the count; `load` returns the values as stored.
#[test]
fn non_finite_values_are_refused_where_loaded_for_use() {
    let d = tmpdir("nonfinite");
    let p = d.join("nan.safetensors");
    let t = Tensor::from_vec(vec![1.0, f32::NAN, 2.0, f32::INFINITY, 0.5], &[5]);
    save_safetensors(&p, &[("w".into(), t)], None).unwrap();
    let f = SafetensorsFile::open(&p).unwrap();
    assert!(f.load("w").unwrap().f32s()[1].is_nan());
    let err = f.load_f32("w", None).unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { key, count: 2, total: 5, .. } if key == "w"),
        "{err}"
    );
    assert!(err.to_string().contains("nan.safetensors"), "{err}");

    // A Shapes model with one NaN weight is refused, naming it.
    let model = copy_teacher(&d.join("model"));
    let weights = model.join("transformer/diffusion_pytorch_model.safetensors");
    let f = SafetensorsFile::open(&weights).unwrap();
    let names = f.names();
    let mut tensors: Vec<(String, Tensor)> = names
        .iter()
        .map(|n| (n.clone(), f.load(n).unwrap()))
        .collect();
    drop(f);
    let (name, t) = &mut tensors[names.len() / 2];
    let mut v = t.to_dtype(DType::F32).to_vec();
    v[0] = f32::NAN;
    *t = Tensor::from_vec(v, t.shape());
    let name = name.clone();
    save_safetensors(&weights, &tensors, None).unwrap();
    let err = advdmd::train::shapes_model::ShapesModel::load(&model)
        .err()
        .expect("a NaN weight loaded");
    assert!(err.to_string().contains(&format!("`{name}`")), "{err}");
}

/// A training state holding a NaN is not saved: the error names the tensor and the file already on
/// disk stays byte for byte as it was.
#[test]
fn a_non_finite_training_state_is_not_saved_over_the_last_one() {
    use advdmd::nn::ParamMap;
    use advdmd::train::state::save_state;
    let d = tmpdir("nonfinite-save");
    let p = d.join("state.safetensors");
    let mut params = ParamMap::new();
    params.insert("w", randn(&[4, 3], 7));
    let meta = serde_json::json!({ "kind": "test" });
    save_state(&p, &[("g.", &params)], &[], meta.clone()).unwrap();
    let before = std::fs::read(&p).unwrap();

    let mut diverged = ParamMap::new();
    diverged.insert("w", Tensor::from_vec(vec![0.0, f32::NAN, 1.0], &[3]));
    let err = save_state(&p, &[("g.", &diverged)], &[], meta).unwrap_err();
    assert!(
        err.to_string()
            .contains("`g.w` holds 1 of 3 values not finite"),
        "{err}"
    );
    assert!(
        std::fs::read(&p).unwrap() == before,
        "the saved state changed"
    );
    assert_eq!(
        std::fs::read_dir(&d).unwrap().count(),
        1,
        "a temporary file was left"
    );
}

/// A copy of the committed Shapes teacher's folder at `to`.
fn copy_teacher(to: &std::path::Path) -> PathBuf {
    let teacher = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/shapes-teacher");
    for sub in ["", "transformer", "text_encoder"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for e in std::fs::read_dir(teacher.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), to.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    to.to_path_buf()
}

/// A Shapes model's `shapes.json` that does not fit its weights (text heads that do not divide
/// the width, a token count other than the encoder's positions, a shift ≤ 0, zero steps) is an
/// error naming the field, not a panic in a reshape.
#[test]
fn a_shapes_json_that_does_not_fit_the_weights_is_an_error() {
    let d = tmpdir("shapes-json");
    for (i, (field, value, says)) in [
        ("text_heads", 0, "heads"),
        ("text_heads", 3, "heads"),
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", 5, "max_tokens"),
        ("sample_shift", -1, "sample_shift"),
        ("few_step", 0, "few_step"),
    ]
    .into_iter()
    .enumerate()
    {
        let model = copy_teacher(&d.join(format!("m{i}")));
        let meta_path = model.join("shapes.json");
        let mut meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
        meta[field] = value.into();
        std::fs::write(&meta_path, meta.to_string()).unwrap();
        let err = advdmd::train::shapes_model::ShapesModel::load(&model)
            .err()
            .unwrap_or_else(|| panic!("{field} = {value} loaded"));
        assert!(err.to_string().contains(says), "{field} = {value}: {err}");
    }
}

/// A training state's optimizer moments come back exactly; one dropped from the file (both of
/// its moments, or one of the pair) or renamed to another parameter is an error, not a moment
/// silently restarted from zero.
#[test]
fn a_lost_or_foreign_optimizer_moment_is_an_error() {
    use advdmd::nn::ParamMap;
    use advdmd::optim::{AdamW, AdamWConfig};
    use advdmd::train::state::{save_state, StateFile};
    let d = tmpdir("moments");
    let mut params = ParamMap::new();
    params.insert("w", randn(&[4, 3], 7));
    params.insert("b", randn(&[3], 8));
    let mut opt = AdamW::new(AdamWConfig::default());
    for (i, (n, p)) in params.iter().enumerate() {
        let k = p.value().numel();
        opt.m.insert(n.clone(), vec![0.25 + i as f32; k]);
        opt.v.insert(n.clone(), vec![0.5 + i as f32; k]);
    }
    opt.step = 3;
    let p = d.join("state.safetensors");
    let meta = serde_json::json!({ "kind": "test" });
    save_state(&p, &[("g.", &params)], &[("opt.", &opt)], meta).unwrap();
    let load = |path: &std::path::Path| {
        let mut back = AdamW::new(AdamWConfig::default());
        StateFile::open(path)?.load_optimizer("opt.", &mut back, &[&params])?;
        Ok::<AdamW, Error>(back)
    };
    let back = load(&p).unwrap();
    assert_eq!(
        (back.m, back.v, back.step),
        (opt.m.clone(), opt.v.clone(), 3)
    );

    // the same file with `opt.` tensors dropped or renamed
    let edited = |name: &str, edit: &dyn Fn(&str) -> Option<String>| {
        let f = SafetensorsFile::open(&p).unwrap();
        let tensors: Vec<(String, Tensor)> = f
            .names()
            .into_iter()
            .filter_map(|n| edit(&n).map(|to| (to, f.load(&n).unwrap())))
            .collect();
        let out = d.join(name);
        save_safetensors(&out, &tensors, Some(f.user_metadata())).unwrap();
        load(&out).err().map(|e| e.to_string()).unwrap_or_default()
    };
    let err = edited("both.safetensors", &|n| {
        (!n.starts_with("opt.") || !n.ends_with(".b")).then(|| n.to_string())
    });
    assert!(err.contains("1 moments of the 2 saved"), "{err}");
    let err = edited("one.safetensors", &|n| {
        (n != "opt.v.w").then(|| n.to_string())
    });
    assert!(err.contains("different parameters"), "{err}");
    let err = edited("foreign.safetensors", &|n| {
        Some(n.replace("opt.m.b", "opt.m.c").to_string())
    });
    assert!(
        err.contains("`opt.m.c`") && err.contains("no parameter"),
        "{err}"
    );
}

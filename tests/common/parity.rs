//! Parity of the CPU MMDiT with a fixture folder of ../shared/fixtures/mmdit/README.md's format:
//! output, input gradients and every parameter gradient for both checkpoint layouts, the
//! sigma/timestep tables, and a 4-step CFG Euler trajectory (tests/mmdit_parity.rs over the shared
//! fixtures, tests/python_tools.rs over fixtures diffusers writes in the test).

use advdmd::autograd::{backward, no_grad};
use advdmd::checkpoint::SafetensorsFile;
use advdmd::flow::{cfg, euler_step, reference_sigmas, timesteps};
use advdmd::kernels::shape::{concat, split};
use advdmd::mmdit::checkpoint::diffusers_part;
use advdmd::mmdit::layout::original_to_diffusers;
use advdmd::mmdit::{Mmdit, MmditCheckpoint, MmditInputs};
use advdmd::{Tensor, Var};
use std::path::Path;

const TOL: f64 = 1e-4;
const SIGMA_TOL: f32 = 1e-6;
const SHIFT: f64 = 3.0;

fn first_sample(t: &Tensor) -> Tensor {
    let n = t.shape()[0];
    split(t, 0, &[1, n - 1]).swap_remove(0)
}

struct Report {
    name: String,
    failures: Vec<String>,
}

impl Report {
    fn check(&mut self, what: &str, err: f64, tol: f64) {
        println!(
            "  {:<70} {err:.3e}{}",
            what,
            if err < tol { "" } else { "  FAIL" }
        );
        if err.is_nan() || err >= tol {
            self.failures
                .push(format!("{}: {what}: {err:.3e} ≥ {tol:.0e}", self.name));
        }
    }
}

fn check_forward_backward(dir: &Path, layout_file: &str, report: &mut Report) {
    let ckpt = MmditCheckpoint::open(dir.join(layout_file)).unwrap();
    let model = Mmdit::new(ckpt.config.clone(), ckpt.load_params().unwrap());
    let fb = SafetensorsFile::open(dir.join("forward_backward.safetensors")).unwrap();
    let get = |k: &str| fb.load_f32(k, None).unwrap();
    let x = Var::input(get("hidden_states"));
    let ctx = Var::input(get("encoder_hidden_states"));
    let pooled = Var::input(get("pooled_projections"));
    let t = get("timestep").to_vec();
    let out = model.forward(&MmditInputs {
        x: &x,
        timestep: &t,
        pooled: &pooled,
        context: &ctx,
    });
    report.check(
        &format!("{layout_file}: output"),
        out.value().rel_l2(&get("output")),
        TOL,
    );

    let grads = backward(&[(&out, get("grad_seed"))]);
    report.check(
        &format!("{layout_file}: grad hidden_states"),
        grads.get(&x).unwrap().rel_l2(&get("grad_hidden_states")),
        TOL,
    );
    report.check(
        &format!("{layout_file}: grad encoder_hidden_states"),
        grads
            .get(&ctx)
            .unwrap()
            .rel_l2(&get("grad_encoder_hidden_states")),
        TOL,
    );
    let mut compared = 0;
    let mut worst = (0f64, String::new());
    for (name, param) in model.params.iter() {
        let Some(g) = param.grad() else {
            assert_eq!(name, "pos_embed", "parameter {name} got no gradient");
            continue;
        };
        for (key, part) in original_to_diffusers(name, model.config.depth).unwrap() {
            let want = fb
                .load_f32(&format!("grad_param.{key}"), None)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let err = diffusers_part(&g, &part).rel_l2(&want);
            if err > worst.0 || worst.1.is_empty() {
                worst = (err, key.clone());
            }
            if err >= TOL {
                report.check(&format!("{layout_file}: grad {key}"), err, TOL);
            }
            compared += 1;
        }
    }
    let expected = fb
        .names()
        .iter()
        .filter(|k| k.starts_with("grad_param."))
        .count();
    assert_eq!(
        compared,
        expected,
        "{}: compared {compared} of {expected} parameter gradients",
        dir.display()
    );
    report.check(
        &format!(
            "{layout_file}: worst of {compared} parameter grads ({})",
            worst.1
        ),
        worst.0,
        TOL,
    );
}

fn check_sampling(dir: &Path, report: &mut Report) {
    let s = SafetensorsFile::open(dir.join("sampling.safetensors")).unwrap();
    let get = |k: &str| s.load_f32(k, None).unwrap();
    let mut steps: Vec<usize> = s
        .names()
        .iter()
        .filter_map(|k| k.strip_prefix("sigmas_").and_then(|n| n.parse().ok()))
        .collect();
    steps.sort();
    assert!(!steps.is_empty(), "{}: no sigma tables", dir.display());
    for n in steps {
        let sig = reference_sigmas(n, SHIFT);
        let want = get(&format!("sigmas_{n}"));
        let got = Tensor::from_vec(sig.clone(), &[n + 1]);
        report.check(
            &format!("sigmas_{n} (max abs)"),
            got.max_abs_diff(&want) as f64,
            SIGMA_TOL as f64,
        );
        let ts = Tensor::from_vec(timesteps(&sig), &[n]);
        let want_t = get(&format!("timesteps_{n}"));
        // Timesteps are σ·1000: the same relative precision.
        report.check(
            &format!("timesteps_{n} (max abs / 1000)"),
            ts.max_abs_diff(&want_t) as f64 / 1000.0,
            SIGMA_TOL as f64,
        );
    }

    // 4-step CFG Euler run, conditional = sample 0 of the fixture's conditioning, unconditional =
    // zeros, both in one batch.
    let ckpt = MmditCheckpoint::open(dir.join("original.safetensors")).unwrap();
    let model = Mmdit::new(ckpt.config.clone(), ckpt.load_params().unwrap());
    let fb = SafetensorsFile::open(dir.join("forward_backward.safetensors")).unwrap();
    let ctx_c = first_sample(&fb.load_f32("encoder_hidden_states", None).unwrap());
    let pooled_c = first_sample(&fb.load_f32("pooled_projections", None).unwrap());
    let ctx = Var::constant(concat(&[&ctx_c, &Tensor::zeros(ctx_c.shape())], 0));
    let pooled = Var::constant(concat(&[&pooled_c, &Tensor::zeros(pooled_c.shape())], 0));
    let w = get("cfg_guidance_scale").item();
    let mut x = get("cfg_init_latents");
    let sig = reference_sigmas(4, SHIFT);
    let _g = no_grad();
    for i in 0..4 {
        let xb = Var::constant(concat(&[&x, &x], 0));
        // Invariant 8 (ALGORITHM.md §7.5): the trainer's σ → timestep map against golden values.
        let t = [advdmd::flow::timestep_of(sig[i]); 2];
        let v = model.forward(&MmditInputs {
            x: &xb,
            timestep: &t,
            pooled: &pooled,
            context: &ctx,
        });
        let vs = split(v.value(), 0, &[1, 1]);
        let guided = cfg(vs[0].f32s(), vs[1].f32s(), w);
        let mut data = x.to_vec();
        euler_step(&mut data, &guided, sig[i], sig[i + 1]);
        x = Tensor::from_vec(data, x.shape());
    }
    report.check(
        "cfg 4-step trajectory (final latents)",
        x.rel_l2(&get("cfg_final_latents")),
        TOL,
    );
}

/// Every check of one fixture folder, printed a line each; the failures, named.
pub fn check_fixture(dir: &Path) -> Vec<String> {
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    println!("fixture {name} ({})", dir.display());
    let mut report = Report {
        name,
        failures: Vec::new(),
    };
    for layout in ["original.safetensors", "diffusers.safetensors"] {
        check_forward_backward(dir, layout, &mut report);
    }
    check_sampling(dir, &mut report);
    report.failures
}

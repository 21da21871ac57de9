//! Joint attention: the tiled GEMM kernels against the f64 references, finite-difference gradient
//! checks of the op, determinism and the shape checks.

mod common;

use advdmd::autograd::backward;
use advdmd::kernels::attention::{
    joint_attention_bwd, joint_attention_bwd_masked, joint_attention_bwd_naive,
    joint_attention_fwd, joint_attention_naive, JointAttentionOut, QUERY_TILE,
};
use advdmd::ops::attention::joint_attention;
use advdmd::{Tensor, Var};
use common::{gradcheck, randn};

/// q, k, v of stream a then of stream b, `[B, L, H, d]`.
fn inputs(batch: usize, la: usize, lb: usize, heads: usize, d: usize, seed: u64) -> [Tensor; 6] {
    std::array::from_fn(|i| {
        let len = if i < 3 { la } else { lb };
        randn(&[batch, len, heads, d], seed * 10 + i as u64)
    })
}

fn fwd(x: &[Tensor; 6]) -> JointAttentionOut {
    joint_attention_fwd(&x[0], &x[1], &x[2], &x[3], &x[4], &x[5])
}

fn naive(x: &[Tensor; 6]) -> JointAttentionOut {
    joint_attention_naive(&x[0], &x[1], &x[2], &x[3], &x[4], &x[5])
}

fn bwd(x: &[Tensor; 6], out: &JointAttentionOut, do_a: &Tensor, do_b: &Tensor) -> [Tensor; 6] {
    joint_attention_bwd(
        &x[0], &x[1], &x[2], &x[3], &x[4], &x[5], &out.lse, do_a, do_b,
    )
}

fn bwd_naive(x: &[Tensor; 6], do_a: &Tensor, do_b: &Tensor) -> [Tensor; 6] {
    joint_attention_bwd_naive(&x[0], &x[1], &x[2], &x[3], &x[4], &x[5], do_a, do_b)
}

/// Entrywise `|got − ref| ≤ tol·(|ref| + max|ref|·1e-1)`: relative, with a floor for entries
/// much smaller than the tensor's scale (where cancellation makes a relative bound meaningless).
fn assert_rel(name: &str, got: &Tensor, reference: &Tensor, tol: f64) {
    assert_eq!(got.shape(), reference.shape(), "{name}: shapes");
    let (g, r) = (got.f32s(), reference.f32s());
    let scale = r.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
    let mut worst = (0f64, 0usize);
    for (i, (&g, &r)) in g.iter().zip(r).enumerate() {
        let allowed = tol * (r.abs() as f64 + 0.1 * scale) + 1e-12;
        let ratio = (g as f64 - r as f64).abs() / allowed;
        if ratio > worst.0 || ratio.is_nan() {
            worst = (ratio, i);
        }
    }
    println!("{name}: worst error/allowed {:.3}", worst.0);
    assert!(
        worst.0 <= 1.0,
        "{name}: entry {}: got {} vs reference {} (scale {scale:.3e}, error/allowed {:.3})",
        worst.1,
        g[worst.1],
        r[worst.1],
        worst.0
    );
}

fn assert_fwd_matches_naive(name: &str, x: &[Tensor; 6], tol: f64) {
    let (got, want) = (fwd(x), naive(x));
    assert_rel(&format!("{name} o_a"), &got.o_a, &want.o_a, tol);
    assert_rel(&format!("{name} o_b"), &got.o_b, &want.o_b, tol);
    assert_rel(&format!("{name} lse"), &got.lse, &want.lse, tol);
}

fn assert_bwd_matches_naive(name: &str, x: &[Tensor; 6], seed: u64, tol: f64) {
    let out = fwd(x);
    let do_a = randn(x[0].shape(), seed);
    let do_b = randn(x[3].shape(), seed + 1);
    let got = bwd(x, &out, &do_a, &do_b);
    let want = bwd_naive(x, &do_a, &do_b);
    for (i, what) in ["dq_a", "dk_a", "dv_a", "dq_b", "dk_b", "dv_b"]
        .iter()
        .enumerate()
    {
        assert_rel(&format!("{name} {what}"), &got[i], &want[i], tol);
    }
}

fn op_outputs(v: &[Var]) -> Vec<Var> {
    let (o_a, o_b) = joint_attention(&v[0], &v[1], &v[2], &v[3], &v[4], &v[5]);
    vec![o_a, o_b]
}

#[test]
fn forward_matches_naive() {
    for (la, lb) in [(0, 16), (7, 64), (77, 130)] {
        for d in [8, 64] {
            let x = inputs(2, la, lb, 3, d, (la * 1000 + lb + d) as u64);
            assert_fwd_matches_naive(&format!("La={la} Lb={lb} d={d}"), &x, 1e-5);
        }
    }
}

#[test]
fn forward_is_stable_for_large_scores() {
    // Scores of a few hundred: exp overflows f32 unless the row max is taken out first.
    let mut x = inputs(1, 9, 21, 2, 16, 5);
    for i in [0, 3] {
        x[i] = x[i].map(|v| 30.0 * v);
    }
    let out = fwd(&x);
    assert!(out
        .o_a
        .f32s()
        .iter()
        .chain(out.o_b.f32s())
        .all(|v| v.is_finite()));
    assert!(out.lse.f32s().iter().all(|v| v.is_finite()));
    // Scores of ~200 carry f32 rounding of ~1e-5 absolute, which exp turns into relative error
    // of the probabilities: the tolerance is looser than for unit-sized scores.
    assert_fwd_matches_naive("large scores", &x, 5e-5);
}

/// (La, Lb) with several query tiles in stream b only (300 rows with the 256-row tile), then in
/// both streams, the last tile of each stream partial.
fn tiled_lengths() -> [(usize, usize); 2] {
    [(5, QUERY_TILE + 44), (QUERY_TILE + 4, QUERY_TILE + 44)]
}

#[test]
fn forward_tiles_queries_longer_than_a_tile() {
    for (la, lb) in tiled_lengths() {
        let x = inputs(1, la, lb, 2, 8, 31 + la as u64);
        assert_fwd_matches_naive(&format!("La={la} Lb={lb}"), &x, 1e-5);
    }
}

#[test]
fn backward_tiles_queries_longer_than_a_tile() {
    for (la, lb) in tiled_lengths() {
        let x = inputs(1, la, lb, 2, 8, 37 + la as u64);
        assert_bwd_matches_naive(&format!("La={la} Lb={lb}"), &x, 41, 1e-4);
    }
}

#[test]
fn backward_matches_naive_medium() {
    for (la, lb, d) in [(7, 64, 16), (0, 33, 16), (77, 130, 64)] {
        let x = inputs(2, la, lb, 3, d, 50 + la as u64);
        assert_bwd_matches_naive(&format!("La={la} Lb={lb} d={d}"), &x, 60, 1e-4);
    }
}

#[test]
fn op_gradients_equal_the_kernel_backward() {
    let x = inputs(2, 7, 64, 3, 16, 70);
    let vars: Vec<Var> = x.iter().cloned().map(Var::input).collect();
    let outs = op_outputs(&vars);
    let do_a = randn(x[0].shape(), 71);
    let do_b = randn(x[3].shape(), 72);
    let grads = backward(&[(&outs[0], do_a.clone()), (&outs[1], do_b.clone())]);
    let out = fwd(&x);
    assert_eq!(outs[0].value().f32s(), out.o_a.f32s());
    assert_eq!(outs[1].value().f32s(), out.o_b.f32s());
    let want = bwd(&x, &out, &do_a, &do_b);
    for (i, v) in vars.iter().enumerate() {
        let g = grads.get(v).expect("every input requires grad");
        assert_eq!(g.f32s(), want[i].f32s(), "input {i}");
    }
}

#[test]
fn grad_check_both_streams() {
    gradcheck(
        "joint attention La=3 Lb=5 d=4",
        &inputs(2, 3, 5, 2, 4, 80),
        op_outputs,
    );
    gradcheck(
        "joint attention La=4 Lb=3 d=5",
        &inputs(2, 4, 3, 2, 5, 81),
        op_outputs,
    );
}

#[test]
fn grad_check_image_stream_only() {
    gradcheck(
        "joint attention La=0 Lb=7 d=5",
        &inputs(2, 0, 7, 2, 5, 82),
        op_outputs,
    );
}

#[test]
fn grad_check_with_unused_text_output() {
    // The context-pre-only last block discards o_a: its gradient reaches the op as zeros.
    gradcheck(
        "joint attention, o_b only",
        &inputs(2, 3, 5, 2, 4, 83),
        |v| vec![op_outputs(v).pop().expect("o_b")],
    );
}

#[test]
fn grad_check_with_unused_image_output() {
    gradcheck(
        "joint attention, o_a only",
        &inputs(2, 3, 5, 2, 4, 84),
        |v| vec![op_outputs(v).swap_remove(0)],
    );
}

#[test]
fn grad_mask_computes_only_what_is_asked_and_the_same_values() {
    let x = inputs(2, 7, 40, 2, 8, 90);
    let out = fwd(&x);
    let do_a = randn(x[0].shape(), 91);
    let do_b = randn(x[3].shape(), 92);
    let full = bwd(&x, &out, &do_a, &do_b);
    for mask in 0u32..64 {
        let need: [bool; 6] = std::array::from_fn(|i| mask & (1 << i) != 0);
        let got = joint_attention_bwd_masked(
            &x[0], &x[1], &x[2], &x[3], &x[4], &x[5], &out.lse, &do_a, &do_b, need,
        );
        for i in 0..6 {
            match (&got[i], need[i]) {
                (Some(g), true) => {
                    assert_eq!(g.f32s(), full[i].f32s(), "mask {mask:06b} input {i}")
                }
                (None, false) => {}
                _ => panic!(
                    "mask {mask:06b} input {i}: asked {} got {:?}",
                    need[i], got[i]
                ),
            }
        }
    }
}

#[test]
fn grad_through_op_with_constant_inputs() {
    // Constants are not asked for (need = false); the other inputs' gradients must not change.
    let x = inputs(2, 3, 9, 2, 4, 95);
    let all: Vec<Var> = x.iter().cloned().map(Var::input).collect();
    let some: Vec<Var> = x
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if i % 2 == 0 {
                Var::constant(t.clone())
            } else {
                Var::input(t.clone())
            }
        })
        .collect();
    let seeds = [randn(x[0].shape(), 96), randn(x[3].shape(), 97)];
    let run = |vars: &[Var]| {
        let outs = op_outputs(vars);
        backward(&[(&outs[0], seeds[0].clone()), (&outs[1], seeds[1].clone())])
    };
    let (g_all, g_some) = (run(&all), run(&some));
    for i in 0..6 {
        if i % 2 == 0 {
            assert!(
                g_some.get(&some[i]).is_none(),
                "constant input {i} got a gradient"
            );
        } else {
            let (a, s) = (g_all.get(&all[i]).unwrap(), g_some.get(&some[i]).unwrap());
            assert_eq!(a.f32s(), s.f32s(), "input {i}");
        }
    }
}

#[test]
fn forward_and_backward_are_deterministic() {
    let x = inputs(2, 77, 300, 3, 64, 100);
    let do_a = randn(x[0].shape(), 101);
    let do_b = randn(x[3].shape(), 102);
    let run = || {
        let out = fwd(&x);
        let grads = bwd(&x, &out, &do_a, &do_b);
        let mut all = vec![out.o_a.to_vec(), out.o_b.to_vec(), out.lse.to_vec()];
        all.extend(grads.iter().map(|g| g.to_vec()));
        all
    };
    let first = run();
    // Same bits on a second run and with another thread count: no result depends on scheduling.
    let again = run();
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool")
        .install(run);
    for (i, (a, (b, c))) in first.iter().zip(again.iter().zip(&one_thread)).enumerate() {
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "output {i} differs between runs"
        );
        assert!(
            a.iter().zip(c).all(|(x, y)| x.to_bits() == y.to_bits()),
            "output {i} differs with one thread"
        );
    }
}

#[test]
#[should_panic(expected = "streams differ in batch, heads or head dim")]
fn rejects_streams_with_different_head_dims() {
    let mut x = inputs(1, 3, 4, 2, 8, 110);
    for t in &mut x[3..] {
        *t = randn(&[1, 4, 2, 4], 111);
    }
    fwd(&x);
}

#[test]
#[should_panic(expected = "stream a needs q, k, v of one shape")]
fn rejects_keys_of_another_length() {
    let mut x = inputs(1, 3, 4, 2, 8, 120);
    x[1] = randn(&[1, 5, 2, 8], 121);
    fwd(&x);
}

#[test]
#[should_panic(expected = "must be [B, L, H, d]")]
fn rejects_wrong_rank() {
    let mut x = inputs(1, 3, 4, 2, 8, 130);
    x[4] = randn(&[4, 2, 8], 131);
    fwd(&x);
}

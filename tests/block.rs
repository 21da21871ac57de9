//! A composed graph checked end to end: two stacked MMDiT-style joint blocks (adaLN from a
//! conditioning vector, qkv, per-head RMSNorm, joint attention over text + image tokens, gated
//! residuals, GELU MLP) with a patchify in front and an unpatchify behind, gradient-checked with
//! respect to the inputs and every weight.

mod common;

use advdmd::ops::attention::joint_attention;
use advdmd::ops::norm::{adaln_modulate, gated_residual, rms_norm, LN_EPS};
use advdmd::ops::{linear, PatchOrder};
use advdmd::{Param, Tensor, Var};
use common::{randn, GradCheck};

const D: usize = 8;
const HEADS: usize = 2;
const HD: usize = D / HEADS;
const B: usize = 2;
const LC: usize = 3;

/// Per-stream weights of one block: adaLN [6D, D] + bias, qkv [3D, D] + bias, ln_q, ln_k [HD],
/// proj [D, D] + bias, fc1 [2D, D] + bias, fc2 [D, 2D] + bias.
fn stream_shapes() -> Vec<Vec<usize>> {
    vec![
        vec![6 * D, D],
        vec![6 * D],
        vec![3 * D, D],
        vec![3 * D],
        vec![HD],
        vec![HD],
        vec![D, D],
        vec![D],
        vec![2 * D, D],
        vec![2 * D],
        vec![D, 2 * D],
        vec![D],
    ]
}

fn stream(s: &Var, c: &Var, w: &[Var]) -> (Vec<Var>, Var, Var, Var) {
    let l = s.shape()[1];
    let m = linear(&c.silu(), &w[0], Some(&w[1])).chunk(6, -1);
    let h = adaln_modulate(s, &m[0], &m[1], LN_EPS);
    let qkv = linear(&h, &w[2], Some(&w[3])).reshape(&[B, l, 3, HEADS, HD]);
    let parts = qkv.split(2, &[1, 1, 1]);
    let q = rms_norm(&parts[0].reshape(&[B, l, HEADS, HD]), &w[4], 1e-6);
    let k = rms_norm(&parts[1].reshape(&[B, l, HEADS, HD]), &w[5], 1e-6);
    let v = parts[2].reshape(&[B, l, HEADS, HD]);
    (m, q, k, v)
}

fn post(s: &Var, o: &Var, m: &[Var], w: &[Var]) -> Var {
    let l = s.shape()[1];
    let s = gated_residual(
        s,
        &m[2],
        &linear(&o.reshape(&[B, l, D]), &w[6], Some(&w[7])),
    );
    let h = adaln_modulate(&s, &m[3], &m[4], LN_EPS);
    let mlp = linear(&linear(&h, &w[8], Some(&w[9])).gelu(), &w[10], Some(&w[11]));
    gated_residual(&s, &m[5], &mlp)
}

fn joint_block(x: &Var, ctx: &Var, c: &Var, wx: &[Var], wc: &[Var]) -> (Var, Var) {
    let (mc, qc, kc, vc) = stream(ctx, c, wc);
    let (mx, qx, kx, vx) = stream(x, c, wx);
    let (oc, ox) = joint_attention(&qc, &kc, &vc, &qx, &kx, &vx);
    (post(x, &ox, &mx, wx), post(ctx, &oc, &mc, wc))
}

/// image [B, 2, 4, 6] → patch embed (patch 2) → two joint blocks → linear → unpatchify.
fn model(v: &[Var]) -> Vec<Var> {
    let (img, ctx, c, embed_w, embed_b, out_w, out_b) =
        (&v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6]);
    let n = stream_shapes().len();
    let mut x = linear(
        &img.patchify(2, PatchOrder::ChannelFirst),
        embed_w,
        Some(embed_b),
    );
    let mut ctx = ctx.clone();
    for layer in 0..2 {
        let base = 7 + layer * 2 * n;
        let (nx, nc) = joint_block(&x, &ctx, c, &v[base..base + n], &v[base + n..base + 2 * n]);
        x = nx;
        ctx = nc;
    }
    let out = linear(&x, out_w, Some(out_b)).unpatchify(2, 2, 3, PatchOrder::ChannelLast);
    vec![out, ctx]
}

fn inputs() -> Vec<Tensor> {
    let mut shapes: Vec<Vec<usize>> = vec![
        vec![B, 2, 4, 6],
        vec![B, LC, D],
        vec![B, D],
        vec![D, 2 * 4],
        vec![D],
        vec![4 * 2, D],
        vec![4 * 2],
    ];
    for _ in 0..4 {
        shapes.extend(stream_shapes());
    }
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let t = randn(s, 100 + i as u64);
            // Weights scaled so activations stay O(1); RMSNorm weights near 1.
            if s.len() == 1 && s[0] == HD {
                t.map(|v| 1.0 + 0.3 * v)
            } else if i >= 3 {
                t.map(|v| 0.4 * v)
            } else {
                t
            }
        })
        .collect()
}

#[test]
fn two_joint_blocks_grad() {
    GradCheck {
        eps: 3e-3,
        max_entries: 48,
        ..Default::default()
    }
    .run("two_joint_blocks", &inputs(), model);
}

#[test]
fn frozen_block_passes_input_grads_and_accumulates_none() {
    // The generator's GAN term flows through a frozen fake-score network: weights as frozen
    // Params, inputs differentiable. Input grads must equal the ones of the unfrozen run.
    let ts = inputs();
    let params: Vec<Param> = ts[3..]
        .iter()
        .enumerate()
        .map(|(i, t)| Param::new(format!("w{i}"), t.clone()))
        .collect();
    let run = |frozen: bool| {
        for p in &params {
            p.set_trainable(!frozen);
            p.zero_grad();
        }
        let mut v: Vec<Var> = ts[..3].iter().cloned().map(Var::input).collect();
        v.extend(params.iter().map(|p| p.var()));
        let outs = model(&v);
        let loss = outs[0].sum().add(&outs[1].mean());
        let g = loss.backward();
        (g.get(&v[0]).unwrap().clone(), g.get(&v[2]).unwrap().clone())
    };
    let (img_frozen, c_frozen) = run(true);
    assert!(
        params.iter().all(|p| p.grad().is_none()),
        "frozen weights got gradients"
    );
    let (img_free, c_free) = run(false);
    assert!(
        params.iter().all(|p| p.grad().is_some()),
        "trainable weights got no gradient"
    );
    assert_eq!(img_frozen.f32s(), img_free.f32s());
    assert_eq!(c_frozen.f32s(), c_free.f32s());
}

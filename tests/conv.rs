//! conv2d (im2col + GEMM) against a direct convolution, im2col/col2im adjointness, GroupNorm
//! against a naive reference, and finite-difference gradient checks of all of them.

mod common;

use advdmd::kernels::{conv as kconv, disc_head as khead};
use advdmd::ops::conv::{conv2d, Conv2dSpec};
use advdmd::ops::disc_head::{group_norm, mean_pool_spatial};
use advdmd::ops::{linear, PatchOrder};
use advdmd::{Tensor, Var};
use common::{assert_close, gradcheck, randn};

/// The MMDiT patch embedding: kernel 2, stride 2, no padding.
const PATCH: Conv2dSpec = Conv2dSpec {
    stride: (2, 2),
    padding: (0, 0),
};
/// The discriminator head's downsampling conv: kernel 4, stride 2, padding 1.
const HEAD: Conv2dSpec = Conv2dSpec {
    stride: (2, 2),
    padding: (1, 1),
};
/// Unequal strides, paddings and kernel sides, so that any (h, w) mix-up shows.
const SKEW: Conv2dSpec = Conv2dSpec {
    stride: (1, 2),
    padding: (2, 0),
};

fn forward_vs_naive(name: &str, x: [usize; 4], w: [usize; 4], spec: Conv2dSpec) {
    let xv = randn(&x, 1);
    let wv = randn(&w, 2);
    let bv = randn(&[w[0]], 3);
    for bias in [None, Some(&bv)] {
        let got = conv2d(
            &Var::constant(xv.clone()),
            &Var::constant(wv.clone()),
            bias.map(|b| Var::constant(b.clone())).as_ref(),
            spec,
        );
        let reference = kconv::conv2d_naive(&xv, &wv, bias, spec);
        assert_eq!(got.shape(), reference.shape(), "{name}: output shape");
        let label = format!("{name} (bias: {})", bias.is_some());
        assert_close(&label, got.value().f32s(), reference.f32s(), 1e-5, 1e-4);
    }
}

#[test]
fn conv2d_forward_patch_embed_matches_naive() {
    forward_vs_naive("patch embed", [2, 3, 6, 6], [5, 3, 2, 2], PATCH);
}

#[test]
fn conv2d_forward_disc_head_matches_naive() {
    forward_vs_naive("disc head", [2, 3, 7, 9], [4, 3, 4, 4], HEAD);
    let y = conv2d(
        &Var::constant(randn(&[2, 3, 7, 9], 4)),
        &Var::constant(randn(&[4, 3, 4, 4], 5)),
        None,
        HEAD,
    );
    assert_eq!(y.shape(), [2, 4, 3, 4]);
}

#[test]
fn conv2d_forward_asymmetric_matches_naive() {
    forward_vs_naive("asymmetric", [2, 3, 5, 8], [4, 3, 3, 2], SKEW);
}

/// MMDIT.md §A.2: the patch-embedding conv equals patchify in (c, kh, kw) order followed by a
/// linear layer with the weight flattened to [D, C·p·p].
#[test]
fn conv2d_patch_embed_matches_patchify_linear() {
    let (b, c, h, w, d) = (2, 3, 6, 4, 5);
    let x = Var::constant(randn(&[b, c, h, w], 11));
    let wt = randn(&[d, c, 2, 2], 12);
    let bias = Var::constant(randn(&[d], 13));
    let conv = conv2d(&x, &Var::constant(wt.clone()), Some(&bias), PATCH);
    let tokens = linear(
        &x.patchify(2, PatchOrder::ChannelFirst),
        &Var::constant(wt.reshape(&[d, c * 4])),
        Some(&bias),
    );
    let as_nchw = tokens.permute(&[0, 2, 1]).reshape(&[b, d, h / 2, w / 2]);
    assert_close(
        "patchify+linear",
        conv.value().f32s(),
        as_nchw.value().f32s(),
        1e-5,
        1e-4,
    );
}

#[test]
fn im2col_layout_is_c_kh_kw() {
    // One image, 2 channels of 2x2, kernel 2 without padding: a single patch holding the whole
    // input, which must come out in (c, kh, kw) order, i.e. the input's own order.
    let x = Tensor::from_vec((0..8).map(|v| v as f32).collect(), &[1, 2, 2, 2]);
    let cols = kconv::im2col(&x, 2, 2, PATCH);
    assert_eq!(cols.shape(), [1, 1, 8]);
    assert_eq!(cols.f32s(), x.f32s());
    // Padding 1 and kernel 3 over a 1x1 input: only the centre tap sees the input.
    let x = Tensor::from_vec(vec![7.0], &[1, 1, 1, 1]);
    let cols = kconv::im2col(&x, 3, 3, Conv2dSpec::new((1, 1), (1, 1)));
    let mut expected = vec![0.0; 9];
    expected[4] = 7.0;
    assert_eq!(cols.f32s(), expected);
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

#[test]
fn im2col_col2im_adjoint() {
    let cases: [([usize; 4], usize, usize, Conv2dSpec); 4] = [
        ([2, 3, 6, 6], 2, 2, PATCH),
        ([2, 3, 7, 9], 4, 4, HEAD),
        ([2, 3, 5, 8], 3, 2, SKEW),
        ([1, 2, 4, 4], 4, 4, Conv2dSpec::new((4, 4), (0, 0))),
    ];
    for (i, (shape, kh, kw, spec)) in cases.into_iter().enumerate() {
        let x = randn(&shape, 20 + i as u64);
        let cols = kconv::im2col(&x, kh, kw, spec);
        let c = randn(cols.shape(), 30 + i as u64);
        let back = kconv::col2im(&c, &shape, kh, kw, spec);
        assert_eq!(back.shape(), shape);
        let (lhs, rhs) = (dot(cols.f32s(), c.f32s()), dot(x.f32s(), back.f32s()));
        assert!(
            (lhs - rhs).abs() <= 1e-5 * lhs.abs().max(rhs.abs()).max(1.0),
            "case {i}: <im2col(x), c> = {lhs} but <x, col2im(c)> = {rhs}"
        );
    }
}

fn conv_grad(name: &str, x: [usize; 4], w: [usize; 4], spec: Conv2dSpec, bias: bool) {
    let mut inputs = vec![randn(&x, 40), randn(&w, 41)];
    if bias {
        inputs.push(randn(&[w[0]], 42));
    }
    gradcheck(name, &inputs, |v| {
        vec![conv2d(&v[0], &v[1], v.get(2), spec)]
    });
}

#[test]
fn conv2d_grad_patch_embed() {
    // H = 5 leaves the last input row outside every patch: its gradient must be zero.
    conv_grad("conv patch embed", [2, 3, 5, 6], [5, 3, 2, 2], PATCH, true);
    conv_grad(
        "conv patch embed, no bias",
        [2, 3, 5, 6],
        [5, 3, 2, 2],
        PATCH,
        false,
    );
}

#[test]
fn conv2d_grad_disc_head() {
    conv_grad("conv disc head", [2, 3, 7, 9], [4, 3, 4, 4], HEAD, true);
    conv_grad(
        "conv disc head, no bias",
        [2, 3, 7, 9],
        [4, 3, 4, 4],
        HEAD,
        false,
    );
}

#[test]
fn conv2d_grad_asymmetric() {
    conv_grad("conv asymmetric", [2, 3, 5, 8], [4, 3, 3, 2], SKEW, true);
}

#[test]
fn conv2d_grad_only_some_inputs() {
    // A frozen weight and bias (the generator turn) must still pass the gradient to the input.
    let x = Var::input(randn(&[2, 3, 7, 9], 50));
    let w = Var::constant(randn(&[4, 3, 4, 4], 51));
    let b = Var::constant(randn(&[4], 52));
    let y = conv2d(&x, &w, Some(&b), HEAD);
    let grads = y.sum().backward();
    let dx = grads.get(&x).expect("input gradient");
    let (reference, _, _) = kconv::conv2d_backward(
        x.value(),
        w.value(),
        &Tensor::ones(y.shape()),
        HEAD,
        (true, false, false),
    );
    assert_eq!(dx.f32s(), reference.expect("dx").f32s());
}

#[test]
fn im2col_op_grad() {
    gradcheck("im2col op", &[randn(&[2, 3, 7, 9], 60)], |v| {
        vec![v[0].im2col(4, 4, HEAD)]
    });
}

/// Straightforward GroupNorm in f64.
fn group_norm_naive(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f32) -> Vec<f32> {
    let shape = x.shape();
    let (n, c) = (shape[0], shape[1]);
    let s: usize = shape[2..].iter().product();
    let cg = c / groups;
    let xd = x.f32s();
    let mut y = vec![0f32; xd.len()];
    for bi in 0..n {
        for g in 0..groups {
            let idx = |ci: usize, j: usize| (bi * c + g * cg + ci) * s + j;
            let mut vals = Vec::new();
            for ci in 0..cg {
                for j in 0..s {
                    vals.push(xd[idx(ci, j)] as f64);
                }
            }
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            for ci in 0..cg {
                let ch = g * cg + ci;
                for j in 0..s {
                    let xh = (xd[idx(ci, j)] as f64 - mean) / (var + eps as f64).sqrt();
                    y[idx(ci, j)] = (xh * w.f32s()[ch] as f64 + b.f32s()[ch] as f64) as f32;
                }
            }
        }
    }
    y
}

#[test]
fn group_norm_forward_matches_naive() {
    let cases: [(&[usize], usize); 5] = [
        (&[2, 6, 3, 5], 3),
        (&[2, 6, 3, 5], 1),
        (&[2, 6, 3, 5], 6),
        (&[3, 6], 2),
        (&[2, 4, 2, 3, 2], 2),
    ];
    for (i, (shape, groups)) in cases.into_iter().enumerate() {
        let c = shape[1];
        let (w, b) = (randn(&[c], 70 + i as u64), randn(&[c], 80 + i as u64));
        // An offset far larger than the spread checks the statistics keep their precision.
        for offset in [0.0, 300.0] {
            let x = randn(shape, 90 + i as u64).map(|v| v + offset);
            let y = group_norm(
                &Var::constant(x.clone()),
                groups,
                &Var::constant(w.clone()),
                &Var::constant(b.clone()),
                1e-5,
            );
            assert_eq!(y.shape(), shape);
            let reference = group_norm_naive(&x, groups, &w, &b, 1e-5);
            let name = format!("group_norm {shape:?} groups {groups} offset {offset}");
            // With the offset, x itself is only known to f32 precision relative to 300.
            let atol = if offset == 0.0 { 1e-5 } else { 1e-3 };
            assert_close(&name, y.value().f32s(), &reference, atol, 1e-4);
        }
    }
}

#[test]
fn group_norm_statistics() {
    let x = randn(&[2, 6, 3, 5], 100);
    let (_, mean, rstd) =
        khead::group_norm_fwd(&x, 3, &Tensor::ones(&[6]), &Tensor::zeros(&[6]), 0.0);
    assert_eq!(mean.shape(), [6]);
    assert_eq!(rstd.shape(), [6]);
    let group = &x.f32s()[..2 * 15];
    let m = group.iter().map(|&v| v as f64).sum::<f64>() / 30.0;
    let var = group.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / 30.0;
    assert!((mean.f32s()[0] as f64 - m).abs() < 1e-6);
    assert!((rstd.f32s()[0] as f64 - 1.0 / var.sqrt()).abs() < 1e-5);
}

fn group_norm_grad(name: &str, shape: &[usize], groups: usize) {
    let c = shape[1];
    let inputs = [randn(shape, 110), randn(&[c], 111), randn(&[c], 112)];
    gradcheck(name, &inputs, |v| {
        vec![group_norm(&v[0], groups, &v[1], &v[2], 1e-5)]
    });
}

#[test]
fn group_norm_grad_groups3() {
    group_norm_grad("group_norm groups 3", &[2, 6, 3, 5], 3);
}

#[test]
fn group_norm_grad_groups1() {
    group_norm_grad("group_norm groups 1", &[2, 6, 3, 5], 1);
}

#[test]
fn group_norm_grad_no_spatial() {
    group_norm_grad("group_norm [B, C]", &[3, 6], 2);
}

#[test]
fn mean_pool_spatial_forward_and_grad() {
    let x = randn(&[2, 3, 4, 5], 120);
    let y = mean_pool_spatial(&Var::constant(x.clone()));
    assert_eq!(y.shape(), [2, 3]);
    let reference: Vec<f32> = x
        .f32s()
        .chunks(20)
        .map(|r| (r.iter().map(|&v| v as f64).sum::<f64>() / 20.0) as f32)
        .collect();
    assert_close(
        "mean_pool_spatial",
        y.value().f32s(),
        &reference,
        1e-6,
        1e-5,
    );
    for shape in [&[2, 3, 4, 5][..], &[2, 3], &[2, 3, 2, 3, 2]] {
        gradcheck(
            &format!("mean_pool_spatial grad {shape:?}"),
            &[randn(shape, 121)],
            |v| vec![mean_pool_spatial(&v[0])],
        );
    }
}

/// One MMDiT discriminator head end to end (ALGORITHM.md §2), with SiLU in place of LeakyReLU so
/// the finite differences never straddle a kink: conv 4×4 s2 p1 → GroupNorm → act → conv 1×1 →
/// mean pool. Groups span two channels, so neither the conv bias nor the pool is normalised away.
#[test]
fn disc_head_chain_grad() {
    let (b, d, h, w, mid) = (2, 3, 6, 5, 4);
    let inputs = [
        randn(&[b, d, h, w], 130),
        randn(&[mid, d, 4, 4], 131).map(|v| v * 0.25),
        randn(&[mid], 132),
        randn(&[mid], 133),
        randn(&[mid], 134),
        randn(&[1, mid, 1, 1], 135),
        randn(&[1], 136),
    ];
    gradcheck("disc head chain", &inputs, |v| {
        let y = conv2d(&v[0], &v[1], Some(&v[2]), HEAD);
        let y = group_norm(&y, 2, &v[3], &v[4], 1e-5).silu();
        let y = conv2d(&y, &v[5], Some(&v[6]), Conv2dSpec::default());
        vec![mean_pool_spatial(&y)]
    });
}

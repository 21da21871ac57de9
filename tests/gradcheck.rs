//! Finite-difference gradient checks (central differences, random inputs, odd sizes) and naive
//! forward references for the elementwise, reduction, layout, linear and normalisation ops.
//! Attention and convolution/GroupNorm have their own files (attention.rs, conv.rs).

// Naive references index like the formulas they spell out.
#![allow(clippy::needless_range_loop)]

mod common;

use advdmd::kernels::gemm::{sgemm, sgemm_naive, sgemm_new, MatRef};
use advdmd::ops::norm::{adaln_modulate, gated_residual, rms_norm, LN_EPS};
use advdmd::ops::{concat, linear, matmul, Activation, PatchOrder};
use advdmd::{Tensor, Var};
use common::{assert_close, gradcheck, randn, randn_away_from_zero, GradCheck};

#[test]
fn add_grad_with_broadcast() {
    gradcheck("add", &[randn(&[2, 3, 5], 1), randn(&[3, 1], 2)], |v| {
        vec![v[0].add(&v[1])]
    });
}

#[test]
fn sub_grad_with_broadcast() {
    gradcheck("sub", &[randn(&[5], 1), randn(&[2, 3, 5], 2)], |v| {
        vec![v[0].sub(&v[1])]
    });
}

#[test]
fn mul_grad_with_broadcast() {
    gradcheck("mul", &[randn(&[2, 1, 5], 1), randn(&[2, 3, 1], 2)], |v| {
        vec![v[0].mul(&v[1])]
    });
}

#[test]
fn broadcast_forward_matches_naive() {
    let (a, b) = (randn(&[2, 1, 5], 1), randn(&[3, 1], 2));
    let got = Var::constant(a.clone()).mul(&Var::constant(b.clone()));
    assert_eq!(got.shape(), [2, 3, 5]);
    let (av, bv) = (a.f32s(), b.f32s());
    let mut want = vec![];
    for i in 0..2 {
        for j in 0..3 {
            for k in 0..5 {
                want.push(av[i * 5 + k] * bv[j]);
            }
        }
    }
    assert_close("broadcast mul", got.value().f32s(), &want, 0.0, 0.0);
}

#[test]
fn scale_and_add_scalar_grad() {
    gradcheck("scale", &[randn(&[7, 3], 3)], |v| {
        vec![v[0].scale(-1.7).add_scalar(0.3)]
    });
}

fn activation_gradcheck(act: Activation, x: Tensor) {
    gradcheck(&format!("{act:?}"), &[x], |v| vec![v[0].activation(act)]);
}

#[test]
fn gelu_tanh_grad() {
    activation_gradcheck(Activation::GeluTanh, randn(&[3, 7, 5], 4).map(|v| 2.0 * v));
}

#[test]
fn silu_grad() {
    activation_gradcheck(Activation::Silu, randn(&[3, 7, 5], 5).map(|v| 2.0 * v));
}

#[test]
fn leaky_relu_grad() {
    activation_gradcheck(
        Activation::LeakyRelu(0.2),
        randn_away_from_zero(&[3, 7, 5], 6, 0.05),
    );
}

#[test]
fn softplus_grad() {
    activation_gradcheck(Activation::Softplus, randn(&[3, 7, 5], 7).map(|v| 4.0 * v));
}

#[test]
fn log_sigmoid_grad() {
    activation_gradcheck(
        Activation::LogSigmoid,
        randn(&[3, 7, 5], 8).map(|v| 4.0 * v),
    );
}

#[test]
fn exp_grad() {
    activation_gradcheck(Activation::Exp, randn(&[3, 5], 9));
}

#[test]
fn activations_forward_match_formulas() {
    let x = Tensor::from_vec(vec![-30.0, -2.5, -0.3, 0.0, 0.7, 3.0, 40.0], &[7]);
    for (i, &v) in x.f32s().iter().enumerate() {
        let v64 = v as f64;
        let sig = 1.0 / (1.0 + (-v64).exp());
        let gelu = 0.5
            * v64
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v64 + 0.044715 * v64.powi(3))).tanh());
        let softplus = (1.0 + v64.exp()).ln();
        let cases = [
            (Activation::GeluTanh, gelu),
            (Activation::Silu, v64 * sig),
            (
                Activation::LeakyRelu(0.2),
                if v64 > 0.0 { v64 } else { 0.2 * v64 },
            ),
            (Activation::Softplus, softplus),
            (Activation::LogSigmoid, -(1.0 + (-v64).exp()).ln()),
        ];
        for (act, want) in cases {
            let got = act.f(v) as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{act:?}({v}) entry {i}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn sum_and_mean_grad() {
    gradcheck("sum", &[randn(&[3, 5], 10)], |v| vec![v[0].sum()]);
    gradcheck("mean", &[randn(&[3, 5], 11)], |v| vec![v[0].mean()]);
}

#[test]
fn sum_dim_and_mean_dim_grad() {
    for dim in [0isize, 1, -1] {
        gradcheck("sum_dim", &[randn(&[3, 4, 5], 12)], |v| {
            vec![v[0].sum_dim(dim, false), v[0].mean_dim(dim, true)]
        });
    }
    let x = randn(&[3, 4, 5], 12);
    let s = Var::constant(x.clone()).sum_dim(1, false);
    assert_eq!(s.shape(), [3, 5]);
    let xv = x.f32s();
    let want: Vec<f32> = (0..15)
        .map(|i| (0..4).map(|j| xv[(i / 5) * 20 + j * 5 + i % 5]).sum())
        .collect();
    assert_close("sum_dim", s.value().f32s(), &want, 1e-6, 1e-6);
}

#[test]
fn mse_grad() {
    gradcheck(
        "mse",
        &[randn(&[2, 3, 5], 13), randn(&[2, 3, 5], 14)],
        |v| vec![v[0].mse(&v[1])],
    );
}

#[test]
fn reshape_permute_grad() {
    gradcheck("permute", &[randn(&[2, 3, 5, 7], 15)], |v| {
        vec![v[0].permute(&[2, 0, 3, 1]).reshape(&[5, 2, 21])]
    });
}

#[test]
fn permute_forward_matches_naive() {
    let x = randn(&[2, 3, 5], 16);
    let y = Var::constant(x.clone()).permute(&[2, 0, 1]);
    assert_eq!(y.shape(), [5, 2, 3]);
    let xv = x.f32s();
    let mut want = vec![];
    for k in 0..5 {
        for i in 0..2 {
            for j in 0..3 {
                want.push(xv[i * 15 + j * 5 + k]);
            }
        }
    }
    assert_close("permute", y.value().f32s(), &want, 0.0, 0.0);
}

#[test]
fn split_concat_grad() {
    gradcheck("split", &[randn(&[3, 9, 2], 17)], |v| {
        v[0].split(1, &[2, 4, 3])
    });
    gradcheck(
        "concat",
        &[randn(&[3, 2, 5], 18), randn(&[3, 4, 5], 19)],
        |v| vec![concat(&[&v[0], &v[1]], -2)],
    );
    // chunk + only some outputs used: gradient of unused pieces is zero.
    gradcheck("chunk", &[randn(&[2, 6], 20)], |v| {
        vec![v[0].chunk(3, -1)[1].clone()]
    });
}

#[test]
fn split_then_concat_is_identity() {
    let x = randn(&[4, 7, 3], 21);
    let parts = Var::constant(x.clone()).split(1, &[1, 4, 2]);
    let back = concat(&parts.iter().collect::<Vec<_>>(), 1);
    assert_eq!(back.value().f32s(), x.f32s());
}

#[test]
fn patchify_unpatchify_grad() {
    for order in [PatchOrder::ChannelFirst, PatchOrder::ChannelLast] {
        gradcheck("patchify", &[randn(&[2, 3, 4, 6], 22)], |v| {
            vec![v[0].patchify(2, order)]
        });
        gradcheck("unpatchify", &[randn(&[2, 6, 12], 23)], |v| {
            vec![v[0].unpatchify(2, 2, 3, order)]
        });
    }
}

#[test]
fn patchify_channel_orders_match_naive() {
    let (b, c, h, w, p) = (2, 3, 4, 6, 2);
    let x = randn(&[b, c, h, w], 24);
    let xv = x.f32s();
    let at = |bi: usize, ci: usize, y: usize, xx: usize| xv[((bi * c + ci) * h + y) * w + xx];
    for order in [PatchOrder::ChannelFirst, PatchOrder::ChannelLast] {
        let got = Var::constant(x.clone()).patchify(p, order);
        assert_eq!(got.shape(), [b, (h / p) * (w / p), c * p * p]);
        let mut want = vec![];
        for bi in 0..b {
            for gy in 0..h / p {
                for gx in 0..w / p {
                    match order {
                        PatchOrder::ChannelFirst => {
                            for ci in 0..c {
                                for py in 0..p {
                                    for px in 0..p {
                                        want.push(at(bi, ci, gy * p + py, gx * p + px));
                                    }
                                }
                            }
                        }
                        PatchOrder::ChannelLast => {
                            for py in 0..p {
                                for px in 0..p {
                                    for ci in 0..c {
                                        want.push(at(bi, ci, gy * p + py, gx * p + px));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        assert_close("patchify", got.value().f32s(), &want, 0.0, 0.0);
        let back = got.unpatchify(p, h / p, w / p, order);
        assert_eq!(
            back.value().f32s(),
            xv,
            "unpatchify inverts patchify ({order:?})"
        );
    }
}

#[test]
fn linear_grad() {
    gradcheck(
        "linear",
        &[randn(&[2, 3, 7], 25), randn(&[5, 7], 26), randn(&[5], 27)],
        |v| vec![linear(&v[0], &v[1], Some(&v[2]))],
    );
    gradcheck(
        "linear_nobias",
        &[randn(&[3, 7], 28), randn(&[5, 7], 29)],
        |v| vec![linear(&v[0], &v[1], None)],
    );
}

#[test]
fn linear_forward_matches_naive() {
    let (x, w, b) = (randn(&[13, 37], 30), randn(&[11, 37], 31), randn(&[11], 32));
    let y = linear(
        &Var::constant(x.clone()),
        &Var::constant(w.clone()),
        Some(&Var::constant(b.clone())),
    );
    let (xv, wv, bv) = (x.f32s(), w.f32s(), b.f32s());
    let want: Vec<f32> = (0..13 * 11)
        .map(|i| {
            let (r, o) = (i / 11, i % 11);
            bv[o]
                + (0..37)
                    .map(|k| xv[r * 37 + k] * wv[o * 37 + k])
                    .sum::<f32>()
        })
        .collect();
    assert_close("linear", y.value().f32s(), &want, 1e-4, 1e-4);
}

#[test]
fn matmul_grad() {
    gradcheck(
        "matmul",
        &[randn(&[2, 3, 5, 7], 33), randn(&[2, 3, 7, 4], 34)],
        |v| vec![matmul(&v[0], &v[1])],
    );
}

#[test]
fn sgemm_matches_naive_with_transposes_and_large_sizes() {
    // (40, 33, 1100): k spans several of gemm's k-panels, the later ones adding onto the first's
    // output — which `sgemm_new` writes into unfilled memory.
    for &(m, n, k) in &[
        (1, 1, 1),
        (5, 7, 0),
        (17, 29, 13),
        (129, 67, 255),
        (300, 257, 301),
        (40, 33, 1100),
    ] {
        let a = randn(&[m * k], 35);
        let b = randn(&[k * n], 36);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let am = if ta {
                MatRef::rows_t(a.f32s(), m)
            } else {
                MatRef::rows(a.f32s(), k)
            };
            let bm = if tb {
                MatRef::rows_t(b.f32s(), k)
            } else {
                MatRef::rows(b.f32s(), n)
            };
            let mut c = vec![0f32; m * n];
            sgemm(m, n, k, 1.0, am, bm, &mut c, n, false, true);
            let want = sgemm_naive(m, n, k, am, bm);
            assert_close(
                &format!("sgemm {m}x{n}x{k} {ta} {tb}"),
                &c,
                &want,
                1e-3,
                1e-4,
            );
            // Freed just before, NaNs are what the allocator likely hands `sgemm_new` back: a
            // GEMM that read its unfilled output (even to scale it by 0) would leave NaNs.
            drop(std::hint::black_box(vec![f32::NAN; m * n]));
            let fresh = sgemm_new(m, n, k, 1.0, am, bm, true);
            assert!(
                fresh.len() == c.len()
                    && fresh
                        .iter()
                        .zip(&c)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                "sgemm_new {m}x{n}x{k} {ta} {tb} differs from sgemm into zeros"
            );
        }
    }
}

#[test]
fn adaln_modulate_grad() {
    // Inputs with a non-zero mean per token, as real activations have.
    let x = randn(&[2, 5, 7], 37).map(|v| 1.5 * v + 0.5);
    GradCheck {
        eps: 3e-3,
        ..Default::default()
    }
    .run(
        "adaln_modulate",
        &[x, randn(&[2, 7], 38), randn(&[2, 7], 39)],
        |v| vec![adaln_modulate(&v[0], &v[1], &v[2], LN_EPS)],
    );
}

#[test]
fn adaln_modulate_forward_matches_naive() {
    let (x, sh, sc) = (
        randn(&[2, 3, 9], 40),
        randn(&[2, 9], 41),
        randn(&[2, 9], 42),
    );
    let y = adaln_modulate(
        &Var::constant(x.clone()),
        &Var::constant(sh.clone()),
        &Var::constant(sc.clone()),
        LN_EPS,
    );
    let (xv, shv, scv) = (x.f32s(), sh.f32s(), sc.f32s());
    let mut want = vec![];
    for t in 0..6 {
        let row: Vec<f64> = xv[t * 9..t * 9 + 9].iter().map(|&v| v as f64).collect();
        let mu = row.iter().sum::<f64>() / 9.0;
        let var = row.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / 9.0;
        for j in 0..9 {
            let xhat = (row[j] - mu) / (var + 1e-6).sqrt();
            want.push(
                (xhat * (1.0 + scv[(t / 3) * 9 + j] as f64) + shv[(t / 3) * 9 + j] as f64) as f32,
            );
        }
    }
    assert_close("adaln", y.value().f32s(), &want, 1e-5, 1e-5);
}

#[test]
fn gated_residual_grad() {
    gradcheck(
        "gated_residual",
        &[
            randn(&[2, 5, 7], 43),
            randn(&[2, 7], 44),
            randn(&[2, 5, 7], 45),
        ],
        |v| vec![gated_residual(&v[0], &v[1], &v[2])],
    );
}

#[test]
fn gated_residual_forward_matches_broadcast_ops() {
    let (x, g, y) = (
        randn(&[2, 5, 7], 46),
        randn(&[2, 7], 47),
        randn(&[2, 5, 7], 48),
    );
    let (xv, gv, yv) = (Var::constant(x), Var::constant(g), Var::constant(y));
    let fused = gated_residual(&xv, &gv, &yv);
    let composed = xv.add(&gv.reshape(&[2, 1, 7]).mul(&yv));
    assert_close(
        "gated",
        fused.value().f32s(),
        composed.value().f32s(),
        1e-6,
        1e-6,
    );
}

#[test]
fn rms_norm_grad() {
    gradcheck(
        "rms_norm",
        &[randn(&[2, 3, 5, 7], 49), randn(&[7], 50)],
        |v| vec![rms_norm(&v[0], &v[1], 1e-6)],
    );
}

#[test]
fn rms_norm_forward_matches_naive() {
    let (x, w) = (randn(&[600, 16], 51), randn(&[16], 52));
    let y = rms_norm(&Var::constant(x.clone()), &Var::constant(w.clone()), 1e-6);
    let (xv, wv) = (x.f32s(), w.f32s());
    let mut want = vec![];
    for r in 0..600 {
        let row = &xv[r * 16..r * 16 + 16];
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 16.0;
        for j in 0..16 {
            want.push((row[j] as f64 / (ms + 1e-6).sqrt() * wv[j] as f64) as f32);
        }
    }
    assert_close("rms_norm", y.value().f32s(), &want, 1e-5, 1e-5);
}

#[test]
fn embedding_grad_with_repeated_ids() {
    use advdmd::ops::linear::embedding;
    let ids = [3u32, 0, 3, 4, 1, 3];
    gradcheck("embedding", &[randn(&[5, 7], 53)], |v| {
        vec![embedding(&v[0], &ids, &[2, 3])]
    });
    let table = randn(&[5, 7], 53);
    let out = embedding(&Var::constant(table.clone()), &ids, &[2, 3]);
    assert_eq!(out.shape(), [2, 3, 7]);
    assert_eq!(&out.value().f32s()[7..14], &table.f32s()[0..7]);
}

#[test]
fn layer_norm_grad() {
    use advdmd::ops::norm::layer_norm;
    let x = randn(&[2, 3, 9], 54).map(|v| 2.0 * v + 1.0);
    GradCheck {
        eps: 3e-3,
        ..Default::default()
    }
    .run("layer_norm", &[x], |v| vec![layer_norm(&v[0])]);
}
